"""torch's autocast and mmfuse's fusions: one rule for the functional API and the layers.

Inside a ``torch.autocast`` region torch runs matmul-like operators on their floating inputs
(float64 excepted) cast to the region's dtype.  The fusions (tensor, low-rank and CP fusion,
sequence fusion and the Wander adapter, their interaction terms) are matmul-like: under
autocast their floating tensors are cast once to the region's dtype and the fusion runs with
autocast off, as ``torch.library.register_autocast`` does for a custom operator.  Every
implementation then computes the same thing, the fusion of the cast inputs (accumulated in
float32, rounded once to the 16-bit dtype), and its backward is the derivative of what ran.
Without this, the output's dtype and precision depended on the path a call's size took:
small forms of plain operators were cast op by op, the custom operators' ``out=`` buffers and
kernels were not (bfloat16 at B = 5, float32 at B = 300 for one low-rank fusion).

The alignment operators (``moments``, ``zoom_shift``, ``align``) are normalisations, which
autocast runs in float32: they keep their inputs' dtype.

Nothing here imports torch: a region can only be active where torch is imported, and the
inputs are looked up in ``sys.modules["torch"]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from ._namespace import half_imported

__all__ = ["autocast_device", "cast_tree", "eligible", "without_autocast"]


def autocast_device(xs: Any) -> str | None:
    """The device type of ``xs[0]`` (a list or tuple of torch tensors) if an autocast region
    is active for it, else None (also for anything that is not such a list: the checks report
    it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch._C._is_any_autocast_enabled():  # the usual case: one call
            return None
    except AttributeError:  # a torch another thread still imports: no tensor exists yet
        if half_imported(torch):
            return None
        raise
    if not isinstance(xs, (list, tuple)) or not xs or not isinstance(xs[0], torch.Tensor):
        return None
    device_type = xs[0].device.type
    # torch has no autocast for some device types ("meta", for models built there and
    # materialised later) and raises when asked about one: no region can be active there
    if not torch.amp.is_autocast_available(device_type):
        return None
    return device_type if torch.is_autocast_enabled(device_type) else None


def eligible(x: Any) -> bool:
    """Whether autocast casts ``x``: floating tensors other than float64 (as torch's own)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    if tensor is None or not isinstance(x, tensor):
        return False
    torch = sys.modules["torch"]
    return bool(x.is_floating_point() and x.dtype != torch.float64)


def cast_tree(obj: Any, dtype: Any) -> Any:
    """``obj`` with every tensor autocast casts (:func:`eligible`) cast to ``dtype``, through
    lists, tuples and dicts (a new container; other values as they are)."""
    if eligible(obj):
        return obj.to(dtype)
    if isinstance(obj, list):
        return [cast_tree(v, dtype) for v in obj]
    if isinstance(obj, tuple):  # (a tuple subclass, such as TensorLy's CPTensor, as its items)
        return tuple(cast_tree(v, dtype) for v in obj)
    if isinstance(obj, Mapping):  # (a dict, or another mapping: as a dict)
        return {k: cast_tree(v, dtype) for k, v in obj.items()}
    return obj


def without_autocast(device_type: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the floating tensors of ``args`` in the autocast dtype of
    ``device_type``, autocast off inside.  The callers pass the arrays to cast (inputs and
    parameters) positionally, and the masks and options by keyword, which go as given: a
    floating mask's refusal then names the caller's dtype, not the region's (a review's
    find).  A call with a float64 tensor is not cast at all (autocast never casts float64):
    its other tensors keep the dtypes the caller gave, so that the dtype checks name those."""
    torch = sys.modules["torch"]
    if _has_float64(torch, (args, kwargs)):
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return fn(*cast_tree(args, dtype), **kwargs)


def _has_float64(torch: Any, obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.float64
    if isinstance(obj, (list, tuple)):
        return any(_has_float64(torch, v) for v in obj)
    if isinstance(obj, Mapping):
        return any(_has_float64(torch, v) for v in obj.values())
    return False
