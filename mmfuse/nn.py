"""PyTorch layers over mmfuse's fusion and alignment operators.

Fusion of feature vectors: :class:`TensorFusion`, :class:`LowRankFusion`, :class:`CPFusion`.
Token sequences: :class:`WanderAdapter` (Wander's adapter), :class:`ZoomShift` (parameter-free
Zoom-and-Shift alignment and fusion) and :class:`GuidedZoomShift` (its learned, FiLM-style
variant).

Each layer owns its parameters (registered ``nn.Parameter`` / ``nn.ParameterList``), takes
``device`` and ``dtype`` like ``torch.nn.Linear``, has ``reset_parameters`` and an
``extra_repr``, and its ``forward`` takes a sequence of per-modality tensors (plus ``present``
or ``masks`` where the functional operator has them).  Inputs are checked at the layer
boundary (count, shapes, dtypes; the message names the modality).  Since those tensors come in
one list, a full backward hook (``register_full_backward_hook``) sees no input gradients
(``grad_input`` is ``(None,)``, and torch warns that no input requires grad); its
``grad_output`` is right.  For the inputs' gradients, hook the tensors themselves
(``x.register_hook``).

In eager mode ``forward`` calls the functional API (:func:`mmfuse.lowrank_fusion`, ...), so the
backend policy (``backend=`` config, ``MMFUSE_BACKEND``) applies; under ``"auto"`` the torch
backend (:mod:`mmfuse.backends.torch`) runs the fusions, its ``mmfuse::*`` custom operators
for large batches and plain autograd for small ones (the size rule: ``docs/backends.rst``,
"Small problems"), and on the CPU, where numba is imported (or a call of at least 2**20
elements imports it), the numba backend's compiled kernels take the alignment calls they can
(``zoom_shift`` with gradients too, inside a torch op).  Under ``torch.compile`` the layers call
those custom operators directly (the functional layer's namespace dispatch is Python that
Dynamo need not trace): :class:`ZoomShift` the ``mmfuse::align`` op and the core's pooling,
:class:`TensorFusion` the core's contraction (it has no custom op), so
``torch.compile(layer, fullgraph=True)`` works.  For ``torch.jit.trace``, trace under
``torch.no_grad()``: the fusions choose their autograd form by grad mode, and trace's check
re-runs the layer, so a trace with gradients on fails that check (a traced custom autograd
function could not be saved either).  A program exported or traced with the custom operators
loads where ``mmfuse.nn`` is imported; the getting-started guide's notes on saving and deploying
say more (ONNX, ``torch.jit.script``).

Importing this module imports torch.

Examples
--------
>>> import torch
>>> from mmfuse.nn import LowRankFusion
>>> layer = LowRankFusion([32, 16], out_dim=8, rank=4)
>>> layer([torch.randn(5, 32), torch.randn(5, 16)]).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ._extras import install_command

try:
    import torch
    from torch import nn
    from torch.nn.utils import parametrize
except ImportError as exc:  # the one extra this module needs, named (it was a bare "No module named 'torch'")
    raise ImportError(f"mmfuse.nn needs torch ({exc}); install it with: {install_command('torch')}") from exc

from . import _fusion
from ._autocast import autocast_device, cast_tree
from ._autocast import eligible as autocast_eligible
from ._core.align import GENERIC, limit_weights, pool, wide_mean
from ._core.align import zoom_shift_fusion as pool_and_fuse
from ._fusion import DEFAULT_MAX_ELEMENTS
from ._namespace import from_numpy, low_precision, mask_tokens, rounded_to, torch_namespace, work_dtype
from ._plan import PlanCache, call_key
from ._sequence import activation_key, plan_wander
from ._validation import (
    check_bool_option,
    check_device,
    check_positive_int,
    check_size_list,
    check_wide_float,
    nested_tensor_error,
)
from .backends import BackendUnsupported
from .backends._registry import own, registration

__all__ = ["CPFusion", "GuidedZoomShift", "LowRankFusion", "TensorFusion", "WanderAdapter", "ZoomShift"]


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


@contextlib.contextmanager
def _layer_call(module: nn.Module, method: str = "forward") -> Iterator[None]:
    """A forced backend's refusal, and the functional operator's own errors about the
    inputs (a mask hiding every token of a sample, ...), named after the layer the user
    called, as its boundary checks' errors are (the operator is named in the rest of a
    refusal's message); a refusal names the layer's ``method`` too."""
    name = type(module).__name__
    try:
        yield
    except BackendUnsupported as exc:
        named = BackendUnsupported(f"{name}.{method}: {exc}")
        if hasattr(exc, "refusal"):  # (the registry's, without its note of a configured backend)
            named.refusal = f"{name}.{method}: {exc.refusal}"  # type: ignore[attr-defined]
        raise named from None
    except (ValueError, TypeError) as exc:
        if type(exc) not in (ValueError, TypeError):
            raise
        message = str(exc)
        # the functional operator's names for the layer's parameters, as the layer names them
        for pattern, layer_name in getattr(type(module), "_FUNCTIONAL_NAMES", ()):
            message = re.sub(pattern, layer_name, message)
        if message == str(exc) and message.startswith(name):
            raise
        raise type(exc)(message if message.startswith(name) else f"{name}: {message}") from None


_LAYER_PLANS = PlanCache()


def _layer_plan(
    module: nn.Module, options: tuple[Any, ...], arrays: tuple[Any, ...], plan: Callable[[], Any]
) -> Any:
    """What a layer's call runs: on a seen signature (the layer's class and configuration
    ``options``, the inputs' and parameters' metadata ``arrays``, the dispatch state; see
    :mod:`mmfuse._plan`), the functional plan its checks and dispatch chose the first time;
    otherwise ``plan()`` (the layer's boundary checks, then the functional operator's), kept
    only if it passed.  So a step with a seen signature runs no checks beyond torch's own."""
    cls = type(module)
    if "parametrizations" in module._modules:  # (parametrize.is_parametrized's test, without
        # nn.Module's attribute look-up, which costs a step about a microsecond)
        # torch's parametrizations give the layer a class of its own, whose properties hold the
        # layer: in a key it kept every such layer and its parameters alive until the cache
        # was cleared (a review's find).  The class they derive from; the parametrized values
        # are in the key as the arrays they are.
        cls = parametrize.type_before_parametrizations(module)
    key = call_key(None, (cls, *options), *arrays)
    run = _LAYER_PLANS.get(key)
    if run is None:  # (not PlanCache.plan: the layer names itself in a refusal)
        with _layer_call(module):
            run = _LAYER_PLANS.remember(key, plan())
    return run


# The torch backend's implementation of each operator the layers call: under torch.compile
# the layers call these directly, skipping the functional layer's checks and dispatch, which
# Dynamo need not trace; in eager mode they call the functional API, whose registry picks the
# same implementations under "auto".  mmfuse's own, resolved once here (importing the torch
# backend defines the mmfuse::* custom operators before anything is compiled); one that
# ``mmfuse.backends.register(op, "torch", ...)`` put in their place is read per call
# (:func:`_torch_impl`), whenever it was registered.  (Own ones, not what the registry holds
# at this import: a registration made before it had stayed here after its unregister; a
# review's find.)
_LAYER_OPS = ("tensor_fusion", "lowrank_fusion", "cp_fusion", "wander", "align")
_TORCH = {op: own(op, "torch") for op in _LAYER_OPS}
# ... and the Array-API core's, which the compiled path calls inside a torch.func transform
# (grad, vmap, ...), as the eager registry does: the custom ops have no batching rules, and
# their autograd registration does not run under functorch's grad (a review of program capture)
_CORE = {op: own(op, "array_api", like=torch.empty(0)) for op in _LAYER_OPS}


def _torch_impl(op: str) -> Any:
    """The torch backend's implementation of ``op`` as the registry has it now: a registered
    replacement (one dict read, which Dynamo traces and guards), else mmfuse's own; inside a
    ``torch.func`` transform (its depth, which Dynamo traces), the Array-API core's."""
    if torch._C._functorch.get_dynamic_layer_stack_depth() > 0:
        return _CORE[op]
    replacement = registration(op, "torch")
    return _TORCH[op] if replacement is None else replacement.func


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _what(value: Any) -> str:
    """A refused argument in a message: a tensor's dtype, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__


def _check_dims(in_dims: Sequence[int]) -> tuple[int, ...]:
    if isinstance(in_dims, int) or not isinstance(in_dims, Sequence):
        raise TypeError(
            f"in_dims must be a sequence of ints (one per modality), got {type(in_dims).__name__}"
        )
    if isinstance(in_dims, str):
        raise TypeError("in_dims must be a sequence of ints (one per modality), got str")
    if not in_dims:
        raise ValueError("in_dims must hold at least 1 modality, got 0")
    return tuple(check_positive_int(f"in_dims[{m}]", d) for m, d in enumerate(in_dims))


def _check_index(name: str, value: Any, n: int) -> int:
    """A modality index in [-n, n), as a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer modality index, got {type(value).__name__} {value!r}")
    if not -n <= int(value) < n:
        raise ValueError(f"{name}={value} is out of range for {n} modalities")
    return int(value) % n


_LAYER_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _check_modality_tensors(
    xs: Any,
    shapes: Sequence[tuple[int | None, ...]],
    dtype: torch.dtype,
    layer: str,
    count_note: str = "",
    dtype_source: str = "the layer's parameters have dtype",
    remedy: str = "cast the input or the layer (layer.to(dtype))",
) -> list[torch.Tensor]:
    """Layer-boundary checks shared by every layer: a list or tuple of one tensor per modality,
    ``xs[m]`` of shape ``shapes[m]`` (``None``: any size; axis 0 is the batch, axis 1 of a
    3-D input the tokens), of the layer's dtype (``dtype_source`` says where it comes from,
    for the message; ``remedy`` says what to do), all with one batch size."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(
            f"{layer}: xs must be a list or tuple of tensors (one per modality), got {type(xs).__name__}"
        )
    n = len(shapes)
    if len(xs) != n:
        raise ValueError(f"{layer}: expected {n} modalities{count_note}, got {len(xs)} input tensors")
    for m, (x, shape) in enumerate(zip(xs, shapes)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer}: xs[{m}] must be a torch.Tensor, got {type(x).__name__}")
        if x.is_nested:  # (a strided one's sizes raise torch's internal error; a jagged one's
            # hold a symbolic token count the checks below cannot read)
            raise TypeError(f"{layer}: {nested_tensor_error(f'xs[{m}]')}")
        sizes = x.shape
        fits = len(sizes) == len(shape) and all(w is None or sizes[k] == w for k, w in enumerate(shape))
        if not fits:
            want = ", ".join(str(w) if w is not None else "BT"[k] for k, w in enumerate(shape))
            raise ValueError(f"{layer}: xs[{m}] must have shape ({want}), got {_fmt(sizes)}")
        if x.dtype != dtype:
            raise TypeError(
                f"{layer}: xs[{m}] has dtype {x.dtype} but {dtype_source} {dtype}; {remedy}"
            )
    # the dtypes mmfuse computes in, which every input now has (a layer cast with
    # layer.to(dtype) escapes the constructor's check): a complex GuidedZoomShift had dropped
    # the imaginary parts, and float8 layers failed in torch, or not, by layer and batch size
    # (review finds).  Once, by look-up: the alignment layers check every forward
    if dtype not in _LAYER_DTYPES:
        if not dtype.is_floating_point:
            raise TypeError(f"{layer}: xs[0] must have a real floating dtype, got {dtype}")
        check_wide_float(torch, dtype, f"{layer}: xs[0] has dtype {dtype}")
    batch = xs[0].shape[0]
    for m, x in enumerate(xs):
        if x.shape[0] != batch:
            raise ValueError(
                f"{layer}: xs[{m}] has batch size {x.shape[0]} (shape {_fmt(x.shape)}) but xs[0] "
                f"has batch size {batch} (shape {_fmt(xs[0].shape)})"
            )
        _check_device(layer, f"xs[{m}]", x, xs[0])
    return list(xs)


def _check_device(layer: str, name: str, t: torch.Tensor, first: torch.Tensor) -> None:
    """``t`` on ``first``'s device (xs[0]'s), named with the layer like its other checks."""
    if t.device != first.device:
        raise ValueError(f"{layer}: {name} is on device {t.device} but xs[0] is on {first.device}")


def _check_inputs(
    xs: Any, in_dims: tuple[int, ...], dtype: torch.dtype, present: Any, layer: str
) -> list[torch.Tensor]:
    """Checks for (B, d_m) inputs and the optional (B, M) boolean ``present``."""
    shapes = [(None, d) for d in in_dims]
    xs = _check_modality_tensors(xs, shapes, dtype, layer, f" (in_dims={list(in_dims)})")
    if present is not None:
        batch, n = xs[0].shape[0], len(in_dims)
        if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
            raise TypeError(
                f"{layer}: present must be a boolean tensor of shape (B, M), got {_what(present)}"
            )
        if tuple(present.shape) != (batch, n):
            raise ValueError(
                f"{layer}: present must have shape (B, M) = ({batch}, {n}), got {_fmt(present.shape)}"
            )
        _check_device(layer, "present", present, xs[0])
    return xs


# --------------------------------------------------------------------------- autocast
#
# Under torch.autocast the fusion layers behave like nn.Linear: their work is matrix products,
# so inputs and floating parameters are cast to the region's dtype (gradients flow back to the
# parameters in their own dtype) and the layer runs with autocast off inside (the custom ops
# compute half precisions in float32 and round the result once).  The alignment layers compute
# statistics, which autocast keeps in float32 as it does for normalisations: half-precision
# inputs are cast up to the layer's dtype (float32 for a ZoomShift built without one).  As in
# autocast, float64 inputs are never cast.


def _autocast_fusion(
    module: nn.Module, device_type: str, forward: Callable[..., Any], xs: Sequence[Any], *args: Any,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """``forward(view, xs, *args, **kwargs)`` (the layer class's own forward or
    ``interactions``, not ``module(...)``: its hooks have run once already) with the inputs in
    the autocast dtype of ``device_type`` and ``view`` the layer with its tensors in it
    (:func:`_cast_view`), autocast off inside.  Parameters follow the inputs' rule: a float64
    layer stays float64 (as ``nn.Linear``)."""
    dtype = torch.get_autocast_dtype(device_type)
    own = list(_own_parameters(module))  # (computed here, in the region: as nn.Linear's weight)
    cast_params = any(autocast_eligible(p) and p.dtype != dtype for _, p in own)
    for m, x in enumerate(xs if cast_params and isinstance(xs, (list, tuple)) else ()):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            # autocast never casts float64 (torch's rule), while it does cast the parameters:
            # say so, rather than "the layer's parameters have dtype bfloat16"
            layer_dtype = own[0][1].dtype
            raise TypeError(
                f"{type(module).__name__}: xs[{m}] has dtype torch.float64, which autocast never "
                f"casts, but this {layer_dtype} layer computes in {dtype} under autocast; pass "
                f"{layer_dtype} inputs, or call the layer outside the autocast region"
            )
    if own and own[0][1].dtype == torch.float64:
        # a float64 layer is never cast, nor then its inputs: float32 ones are refused naming
        # float32, not the region's dtype (a review's find); float64 ones run in float64
        with torch.autocast(device_type, enabled=False):
            return forward(module, xs, *args, **kwargs)
    view = _cast_view(module, own, dtype)
    with torch.autocast(device_type, enabled=False):
        return forward(view, cast_tree(xs, dtype), *args, **kwargs)


def _cast_view(module: nn.Module, own: list[tuple[str, Any]], dtype: torch.dtype) -> nn.Module:
    """A shallow copy of the layer (:func:`_cast_copy`: its parameters and its submodules'
    cast to ``dtype``) whose own tensors ``own`` (:func:`_own_parameters`, as computed:
    parametrized, pruned) read cast to ``dtype``.

    The layer itself is left as it is.  Its tensors had been swapped for the call on the
    layer itself (``functional_call``'s swap): threads running one layer under autocast
    restored each other's bfloat16 copies, leaving plain bfloat16 tensors in place of its
    parameters, and other threads' calls refused (a review's find).  A pruning hook's value
    (an attribute of the instance) is replaced in the copy's ``__dict__``; a parametrized
    tensor, a property of the layer's class that calls ``self.parametrizations[name]()``, by
    a :class:`_Computed` in the copy's ``parametrizations`` where Dynamo traces (which
    cannot see a class changed), else a parameter of the copy, whose class becomes the one
    before parametrizations."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    view = _cast_copy(module, dtype, always=True)
    for name, value in own:
        owner: Any = view
        source: Any = module
        attr, _, index = name.partition(".")
        if index:  # an entry of a ParameterList
            owner, source, attr = _own_child(view, module, attr, dtype), module._modules[attr], index
        if attr in owner._parameters:
            continue  # a parameter: cast by the copy already
        cast = cast_tree(value, dtype)
        if attr in owner.__dict__:
            owner.__dict__[attr] = cast
        elif _compiling():  # a parametrized tensor, traced: its parametrization stands in
            _own_child(owner, source, "parametrizations", dtype)._modules[attr] = _computed(cast)
        else:  # eager: the copy's class without the properties (an enclosing
            # parametrize.cached() would answer them from the original's cache), the value a
            # parameter of the copy
            owner.__class__ = type_before_parametrizations(source)
            owner._parameters[attr] = cast
    return view


def _own_child(copy: nn.Module, original: nn.Module, name: str, dtype: torch.dtype) -> Any:
    """``copy``'s submodule ``name`` (``copy`` a :func:`_cast_copy` of ``original``), as a
    copy of its own: made now where it is still ``original``'s, whose entries are about to
    be replaced."""
    child = copy._modules[name]
    if child is original._modules[name]:
        child = copy._modules[name] = _cast_copy(child, dtype, always=True)  # type: ignore[arg-type]
    return child


class _Computed(nn.Module):
    """A parametrization's stand-in in :func:`_cast_view`'s copy: called, it gives the value
    already computed.  A module, as what it stands in for (Dynamo resuming after a graph
    break walks the copy's modules: a plain object there crashed it; a review's find), made
    by :func:`_computed` from a template's state rather than by ``__init__`` (a module
    constructed while Dynamo traces breaks its graph)."""

    def forward(self) -> Any:
        return self.__dict__["value"]


_COMPUTED_STATE = dict(_Computed().__dict__)  # (its empty dicts are never written to)


def _computed(value: Any) -> _Computed:
    stand_in: _Computed = object.__new__(_Computed)
    stand_in.__dict__.update(_COMPUTED_STATE)
    stand_in.__dict__["value"] = value
    return stand_in


def _cast_copy(m: nn.Module, dtype: torch.dtype, always: bool = False) -> nn.Module:
    """``m``'s shallow copy (its ``__dict__``; nothing run, no module made, which Dynamo
    would refuse) with its parameters and its submodules' (an activation's, say) cast to
    ``dtype`` as autocast casts (:func:`mmfuse._autocast.cast_tree`); ``m`` itself where
    nothing in it is cast, unless ``always``.  (Attributes a copied module sets on itself
    during the call stay on the copy; its buffers are the original's.)"""
    subs = {k: sub if sub is None else _cast_copy(sub, dtype) for k, sub in m._modules.items()}
    copied = any(sub is not m._modules[k] for k, sub in subs.items())
    if not (always or copied or any(autocast_eligible(p) for p in m._parameters.values())):
        return m
    copy: nn.Module = object.__new__(type(m))
    copy.__dict__.update(m.__dict__)
    copy.__dict__["_parameters"] = cast_tree(dict(m._parameters), dtype)
    copy.__dict__["_modules"] = subs
    return copy


def _own_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The layer's own (name, tensor) pairs: the attributes its class names in
    ``_PARAMETERS``, which its operator computes with (all of them in its plans' key), read as
    the forward reads them (a ParameterList entry by entry, ``factors.0``, ...; None left out).
    So a parameter under a parametrization (``weight_norm``, ``prune``, ...) is its computed
    value: ``named_parameters()`` names it ``parametrizations.weight.original``, and a layer
    whose every such tensor was parametrized had none to ask (a bare StopIteration)."""
    for attr in type(module)._PARAMETERS:  # type: ignore[attr-defined]
        value = getattr(module, attr)
        if isinstance(value, nn.ParameterList):
            yield from ((f"{attr}.{i}", p) for i, p in enumerate(_entries(value)))
        elif value is not None:
            yield attr, value


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype all of the layer's own parameters have, which its inputs must have; a
    TypeError naming one of another (one replaced through ``.data``, or by
    ``load_state_dict(assign=True)``).  Asked where the layer plans a call (eager) and where it
    is traced (compiled, which skips the functional API's own checks and would otherwise
    compute in mixed dtypes: a float64 bias gave a float32 layer float64 outputs).

    Its own parameters are those its class names (``_PARAMETERS``: what its operator computes
    with, all of them in its plans' key); parameters a user or a subclass adds are theirs.  A
    float64 one added to a float32 layer was refused by unplanned calls only, so whether a
    call passed depended on whether another call of its signature had been planned."""
    named = _own_parameters(module)
    first_name, first = next(named)
    for name, p in named:
        if p.dtype != first.dtype:
            raise TypeError(
                f"{type(module).__name__}: parameter {name} has dtype {p.dtype} but {first_name} "
                f"has {first.dtype}; give the layer one dtype (layer.to(dtype))"
            )
    return first.dtype


def _entries(plist: nn.ParameterList) -> list[Any]:
    """``list(plist)``.  A layer reads its parameter lists on every call, and
    ``ParameterList``'s own iteration checks and looks up each index in Python (about 2 us
    per entry); its registered parameters, when they are exactly its entries in order (keys
    "0", "1", ...: always, unless something other than a Parameter was stored or entries were
    deleted and re-added), are read in one step."""
    params = plist._parameters
    n = len(params)
    if n == len(plist) and n < len(_INDEX_KEYS) and tuple(params) == _INDEX_KEYS[n]:
        return list(params.values())
    return list(plist)


_INDEX_KEYS = [tuple(str(i) for i in range(n)) for n in range(33)]


def _check_dtype(dtype: Any) -> Any:
    """``dtype`` if it is a floating ``torch.dtype`` or None (a layer's parameters, or the
    dtype it expects, must be floating), else TypeError."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if dtype is not None:
        check_wide_float(torch, dtype, f"dtype is {dtype}")
    return dtype


def _factory(device: Any, dtype: Any) -> dict[str, Any]:
    return {"device": _check_factory_device(device), "dtype": _check_dtype(dtype)}


def _check_factory_device(device: Any) -> Any:
    """``device`` if torch can make tensors there (None passes): the initialisers' check
    (:func:`mmfuse._validation.check_device`), before the first parameter's allocation would
    raise torch's RuntimeError ("Invalid device string", a CPU build asked for CUDA)."""
    if device is not None:
        check_device(torch_namespace(), device)
    return device


def _as_loaded(name: str, value: Any) -> torch.Tensor:
    """An array handed to a loader (``from_lmf``, ``from_cp``) as a tensor: torch tensors,
    NumPy arrays, ... go through ``torch.as_tensor``; None or a non-array is a TypeError
    naming the argument."""
    if value is None:
        raise TypeError(f"{name} must be a tensor or array, got None")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__}") from None
    if t.is_complex() or t.dtype == torch.bool:  # copied into real parameters: a silent loss
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t


def _loaded_dtype(name: str, first: torch.Tensor, dtype: Any) -> Any:
    """The dtype of a layer loaded from arrays: ``dtype``, else that of ``first`` (named
    ``name``), which must then be floating."""
    if dtype is None and not first.is_floating_point():
        raise TypeError(
            f"{name} has dtype {first.dtype}; the layer takes its dtype from it, so it must be "
            "floating: pass floating arrays, or dtype="
        )
    return _check_dtype(first.dtype if dtype is None else dtype)


def _loaded_limit(arrays: Sequence[Any]) -> int:
    """``max_elements`` for a layer that will hold copies of ``arrays``: the caller already
    holds arrays that large, so the size check (which guards against absurd sizes) passes
    them; the default limit still applies to smaller ones."""
    return max(DEFAULT_MAX_ELEMENTS, *(math.prod(a.shape) for a in arrays))


def _register_bias(module: nn.Module, bias: bool, out_dim: int, fk: dict[str, Any]) -> None:
    """An (h,) ``bias`` parameter, or a registered ``None`` (so ``layer.bias`` always exists)."""
    if check_bool_option("bias", bias):
        module.bias = nn.Parameter(torch.empty(out_dim, **fk))
    else:
        module.register_parameter("bias", None)


class _RankedFusion(nn.Module):
    """Construction shared by the rank-R fusion layers (:class:`LowRankFusion`, :class:`CPFusion`).

    Subclasses say which factor shapes they hold (``_factor_shapes``, and with their layouts
    for the size check, ``_planned``) and how to draw them (``reset_parameters``).
    """

    _PARAMETERS = ("factors", "weights", "bias")  # (the ones the layer computes with)
    bias: nn.Parameter | None

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        rank: int,
        *,
        append_one: bool = True,
        bias: bool = True,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.rank = check_positive_int("rank", rank)
        self.append_one = check_bool_option("append_one", append_one)
        self.max_elements = check_positive_int("max_elements", max_elements)
        _fusion.check_allocations(type(self).__name__, self._planned(), self.max_elements)
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(shape, **fk)) for shape in self._factor_shapes()]
        )
        self.weights = nn.Parameter(torch.empty(self.rank, **fk))
        _register_bias(self, bias, self.out_dim, fk)
        self.reset_parameters()

    def _factor_shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def _planned(self) -> list[_fusion.Planned]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_dims={list(self.in_dims)}, out_dim={self.out_dim}, rank={self.rank}, "
            f"append_one={self.append_one}, bias={self.bias is not None}"
        )


# --------------------------------------------------------------------------- LowRankFusion


class LowRankFusion(_RankedFusion):
    r"""Low-rank Multimodal Fusion (LMF, Liu et al. 2018, Eq. 8) as a layer.

    Parameters
    ----------
    in_dims : sequence of int
        Feature sizes d_m of the M modalities.
    out_dim : int
        Output size h.
    rank : int
        R.
    append_one : bool, default True
        Append the constant 1 to each modality (last); factors then have d_m + 1 rows.
    bias : bool, default True
        Learn an additive bias (h,).
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError) a factor with more elements than this, before allocating it (the
        rule of :func:`mmfuse.init_lowrank` and :class:`TensorFusion`).
    device, dtype : optional
        Of the parameters.

    Attributes
    ----------
    factors : nn.ParameterList of M tensors, shapes (R, d_m + 1, h)
    weights : nn.Parameter, shape (R,)
    bias : nn.Parameter, shape (h,), or None

    Notes
    -----
    ``forward(xs, present=None)`` returns
    :math:`\sum_r w_r \prod_m (\hat x_m W_m^{(r)}) + b`, shape (B, h); see
    :func:`mmfuse.lowrank_fusion`.  ``reset_parameters`` draws factors
    :math:`\mathcal N(0, 1/D_m)` (:math:`D_m = d_m + 1` with the appended one), sets weights
    to 1/R and the bias to zero, the scheme of :func:`mmfuse.init_lowrank` (LMF's released
    code uses Xavier-normal factors and weights).
    Load LMF's released weights with :meth:`from_lmf`.

    Built on the ``meta`` device (``device="meta"``) the layer allocates nothing, and
    ``forward`` on ``meta`` inputs returns ``meta`` outputs of the right shapes; materialise
    it later with ``layer.to_empty(device=...)`` and ``layer.reset_parameters()``, as FSDP and
    large-model tooling do (under ``torch.manual_seed(s)`` the draw equals that of a layer
    built on the CPU under the same seed).
    """

    def _factor_shapes(self) -> list[tuple[int, ...]]:
        extra = int(self.append_one)
        return [(self.rank, d + extra, self.out_dim) for d in self.in_dims]

    def _planned(self) -> list[_fusion.Planned]:
        return _fusion.lowrank_planned(self.in_dims, self.rank, self.out_dim, self.append_one, "in_dims")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for f in self.factors:
                nn.init.normal_(f, 0.0, 1.0 / math.sqrt(f.shape[1]))
            self.weights.fill_(1.0 / self.rank)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        r"""Fuse a batch: :math:`\sum_r w_r \prod_m (\hat x_m W_m^{(r)}) + b`.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, d_m)
            One tensor per modality (``d_m = in_dims[m]``), in the layer's dtype and on its
            device, sharing the batch size B.
        present : bool tensor, shape (B, M), optional
            False where modality m of sample b is missing: it then contributes only its
            constant row, as if its features were zero (:func:`mmfuse.lowrank_fusion`).

        Returns
        -------
        tensor, shape (B, h)
            ``h = out_dim``, in the inputs' dtype (the region's under ``torch.autocast``).
            On ``meta`` inputs (a layer built with ``device="meta"``, not yet materialised)
            the output is a ``meta`` tensor of this shape: nothing is computed.

        Raises
        ------
        ValueError
            A wrong number of tensors, a shape other than (B, d_m), differing batch sizes or a
            ``present`` of the wrong shape (the message names the modality).
        TypeError
            ``xs`` not a list or tuple of tensors, a dtype other than the layer's, or a
            non-boolean ``present``.
        """
        if (device_type := autocast_device(xs)) is not None:
            return _autocast_fusion(self, device_type, LowRankFusion.forward, xs, present)
        factors = _entries(self.factors)
        if _compiling():
            xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
            return _torch_impl("lowrank_fusion")(
                xs, factors, self.weights, self.bias, append_one=self.append_one, present=present
            )

        def plan() -> Any:
            checked = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
            return _fusion.plan_lowrank(
                checked, factors, self.weights, self.bias, self.append_one, present, None
            )

        arrays = (xs, present, self.weights, self.bias, factors)
        run = _layer_plan(self, (self.in_dims, self.append_one), arrays, plan)
        return run(xs, factors, self.weights, self.bias, present=present)

    def interactions(
        self, xs: Sequence[torch.Tensor], *, by: str = "order", present: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Any]]:
        """The exact interaction terms of this layer's output, by order or by modality subset.

        Parameters
        ----------
        xs : sequence of M tensors, shapes (B, d_m)
            As in ``forward``.
        by : {"order", "subset"}, default "order"
            M + 1 terms by interaction order, or 2^M terms by subset of modalities (refused
            over the layer's ``max_elements``).
        present : bool tensor, shape (B, M), optional
            As in ``forward``: an absent modality contributes only through its constant.

        Returns
        -------
        terms : tensor, shape (K, B, h)
            ``terms.sum(0) + bias`` (``terms.sum(0)`` for a layer built with ``bias=False``)
            equals ``self(xs, present)``; gradients flow to the inputs and the parameters.
            See :func:`mmfuse.lowrank_interactions`.
        labels : list
            The orders 0..M, or the subsets as sorted tuples of modality indices.

        Examples
        --------
        >>> import torch
        >>> from mmfuse.nn import LowRankFusion
        >>> layer = LowRankFusion([3, 2], out_dim=4, rank=2)
        >>> xs = [torch.randn(5, 3), torch.randn(5, 2)]
        >>> terms, orders = layer.interactions(xs)
        >>> terms.shape, orders
        (torch.Size([3, 5, 4]), [0, 1, 2])
        >>> bool(torch.allclose(terms.sum(0) + layer.bias, layer(xs), atol=1e-5))
        True
        """
        if (device_type := autocast_device(xs)) is not None:  # (as forward: matmul-like)
            return _autocast_fusion(self, device_type, LowRankFusion.interactions, xs, by=by, present=present)
        from ._interactions import lowrank_interactions

        xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
        with _layer_call(self, "interactions"):
            return lowrank_interactions(
                xs, list(self.factors), self.weights, by=by, present=present, append_one=self.append_one,
                max_elements=self.max_elements,
            )

    @classmethod
    def from_lmf(
        cls,
        factors: Sequence[torch.Tensor],
        fusion_weights: torch.Tensor,
        fusion_bias: torch.Tensor,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> LowRankFusion:
        r"""A layer computing exactly the fusion of LMF's released code (Liu et al., 2018).

        Parameters
        ----------
        factors : sequence of M tensors, shapes (R, d_m + 1, h)
            LMF's modality factors in its order of modalities, e.g.
            ``[state["audio_factor"], state["video_factor"], state["text_factor"]]``.  In LMF's
            layout the constant's row is row 0 (LMF prepends the 1); it is moved to the end.
            Tensors, or arrays (NumPy arrays, ...: each goes through ``torch.as_tensor``, as in
            :meth:`CPFusion.from_cp`).
        fusion_weights : tensor or array, shape (1, R)
        fusion_bias : tensor or array, shape (1, h)
        device, dtype : optional
            Default: those of ``factors[0]`` (whose dtype must then be floating).

        Returns
        -------
        LowRankFusion
            With ``append_one=True``; ``layer(xs)`` equals LMF's
            ``matmul(fusion_weights, prod_m matmul([1, x_m], factor_m).permute(1, 0, 2))
            .squeeze() + fusion_bias`` viewed as (B, h).

        Raises
        ------
        TypeError
            An argument that is None or not an array, or integer ``factors`` without ``dtype``.
        ValueError
            Shapes not in LMF's layout.
        """
        if factors is None or isinstance(factors, (str, bytes)) or not isinstance(factors, Iterable):
            raise TypeError(
                f"factors must be a sequence of M tensors (one per modality), got {type(factors).__name__}"
            )
        factors = [_as_loaded(f"factors[{m}]", f) for m, f in enumerate(factors)]
        fusion_weights = _as_loaded("fusion_weights", fusion_weights)
        fusion_bias = _as_loaded("fusion_bias", fusion_bias)
        if not factors:
            raise ValueError("factors must hold at least 1 modality factor, got 0")
        for m, f in enumerate(factors):
            if f.dim() != 3 or f.shape[1] < 2:
                raise ValueError(f"factors[{m}] must have LMF's shape (R, d_m + 1, h), got {_fmt(f.shape)}")
        rank, _, out_dim = factors[0].shape
        if rank < 1 or out_dim < 1:  # (the layer's own check would name its rank / out_dim)
            raise ValueError(
                f"factors[0] has shape {_fmt(factors[0].shape)}: LMF's (R, d_0 + 1, h) needs "
                "R >= 1 and h >= 1"
            )
        for m, f in enumerate(factors):
            if f.shape[0] != rank or f.shape[2] != out_dim:
                raise ValueError(
                    f"factors[{m}] has shape {_fmt(f.shape)} but factors[0] has {_fmt(factors[0].shape)}; "
                    "rank R and output size h must match"
                )
        if tuple(fusion_weights.shape) != (1, rank):
            raise ValueError(
                f"fusion_weights must have shape (1, R) = (1, {rank}), got {_fmt(fusion_weights.shape)}"
            )
        if tuple(fusion_bias.shape) != (1, out_dim):
            raise ValueError(
                f"fusion_bias must have shape (1, h) = (1, {out_dim}), got {_fmt(fusion_bias.shape)}"
            )
        device = factors[0].device if device is None else device
        dtype = _loaded_dtype("factors[0]", factors[0], dtype)
        layer = cls(
            [f.shape[1] - 1 for f in factors], int(out_dim), int(rank), device=device, dtype=dtype,
            max_elements=_loaded_limit(factors),
        )  # fmt: skip
        with torch.no_grad():
            for mine, f in zip(layer.factors, factors):
                # LMF's row 0 multiplies its prepended constant; ours is the last row.
                mine.copy_(torch.cat([f[:, 1:, :], f[:, :1, :]], dim=1))
            layer.weights.copy_(fusion_weights.reshape(rank))
            assert layer.bias is not None
            layer.bias.copy_(fusion_bias.reshape(out_dim))
        return layer


# --------------------------------------------------------------------------- CPFusion


class CPFusion(_RankedFusion):
    r"""TFN whose weight tensor is a learned CP decomposition (TensorLy layout) as a layer.

    Parameters
    ----------
    in_dims : sequence of int
        Feature sizes d_m.
    out_dim : int
        h.
    rank : int
        R.
    append_one : bool, default True
    bias : bool, default True
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError) a factor with more elements than this, before allocating it.
    device, dtype : optional

    Attributes
    ----------
    weights : nn.Parameter, shape (R,)
    factors : nn.ParameterList, ``[A_1 (d_1 + 1, R), ..., A_M (d_M + 1, R), C (h, R)]``
    bias : nn.Parameter (h,) or None

    Notes
    -----
    ``forward(xs, present=None)`` returns :math:`C (w \odot \prod_m A_m^\top \hat x_m) + b`
    (:func:`mmfuse.cp_fusion`).  ``reset_parameters``: :math:`A_m \sim \mathcal N(0, 1/D_m)`
    (:math:`D_m = d_m + 1` with the appended one), :math:`C \sim \mathcal N(0, 1/R)`, weights
    one, bias zero.  :meth:`from_cp` loads a
    ``tensorly`` CPTensor or a ``(weights, factors)`` pair.

    Built on the ``meta`` device (``device="meta"``) the layer allocates nothing, and
    ``forward`` on ``meta`` inputs returns ``meta`` outputs of the right shapes; materialise
    it later with ``layer.to_empty(device=...)`` and ``layer.reset_parameters()``, as FSDP and
    large-model tooling do (under ``torch.manual_seed(s)`` the draw equals that of a layer
    built on the CPU under the same seed).
    """

    # the functional API's names for the layer's parameters, in its errors (a factor replaced
    # by one of the wrong shape was "cp factor 2"; the layer calls it factors[2])
    _FUNCTIONAL_NAMES = ((r"cp factor (\d+)", r"factors[\1]"), (r"cp factors", "factors"),
                         (r"cp weights", "weights"))  # fmt: skip

    def _factor_shapes(self) -> list[tuple[int, ...]]:
        extra = int(self.append_one)
        shapes: list[tuple[int, ...]] = [(d + extra, self.rank) for d in self.in_dims]
        return [*shapes, (self.out_dim, self.rank)]

    def _planned(self) -> list[_fusion.Planned]:
        n, r, label = len(self.in_dims), self.rank, "d_{m} + 1" if self.append_one else "d_{m}"
        planned: list[_fusion.Planned] = [
            (f"factors[{m}]", f"({label.format(m=m)}, R)", shape, f"in_dims[{m}]={self.in_dims[m]}, rank={r}")
            for m, shape in enumerate(self._factor_shapes()[:n])
        ]
        out = (f"factors[{n}]", "(h, R)", (self.out_dim, r), f"out_dim={self.out_dim}, rank={r}")
        return [*planned, out, ("weights", "(R,)", (r,), f"rank={r}")]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for a in self.factors[:-1]:
                nn.init.normal_(a, 0.0, 1.0 / math.sqrt(a.shape[0]))
            nn.init.normal_(self.factors[-1], 0.0, 1.0 / math.sqrt(self.rank))
            self.weights.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        r"""Fuse a batch: :math:`C (w \odot \prod_m A_m^\top \hat x_m) + b`.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, d_m)
            One tensor per modality (``d_m = in_dims[m]``), in the layer's dtype and on its
            device, sharing the batch size B.
        present : bool tensor, shape (B, M), optional
            False where modality m of sample b is missing: it then contributes only its
            constant row, as if its features were zero (:func:`mmfuse.cp_fusion`).

        Returns
        -------
        tensor, shape (B, h)
            ``h = out_dim``, in the inputs' dtype (the region's under ``torch.autocast``).
            On ``meta`` inputs (a layer built with ``device="meta"``, not yet materialised)
            the output is a ``meta`` tensor of this shape: nothing is computed.

        Raises
        ------
        ValueError
            A wrong number of tensors, a shape other than (B, d_m), differing batch sizes or a
            ``present`` of the wrong shape (the message names the modality).
        TypeError
            ``xs`` not a list or tuple of tensors, a dtype other than the layer's, or a
            non-boolean ``present``.
        """
        if (device_type := autocast_device(xs)) is not None:
            return _autocast_fusion(self, device_type, CPFusion.forward, xs, present)
        cp = (self.weights, list(self.factors))
        if _compiling():
            xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
            return _torch_impl("cp_fusion")(xs, cp, self.bias, append_one=self.append_one, present=present)

        def plan() -> Any:
            checked = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
            return _fusion.plan_cp(checked, cp, self.bias, self.append_one, present, None)

        run = _layer_plan(self, (self.in_dims, self.append_one), (xs, present, cp, self.bias), plan)
        return run(xs, cp, self.bias, present=present)

    def interactions(
        self, xs: Sequence[torch.Tensor], *, by: str = "order", present: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Any]]:
        """The exact interaction terms of this layer's output, by order or by modality subset.

        Parameters
        ----------
        xs : sequence of M tensors, shapes (B, d_m)
            As in ``forward``.
        by : {"order", "subset"}, default "order"
            M + 1 terms by interaction order, or 2^M terms by subset of modalities (refused
            over the layer's ``max_elements``).
        present : bool tensor, shape (B, M), optional
            As in ``forward``: an absent modality contributes only through its constant.

        Returns
        -------
        terms : tensor, shape (K, B, h)
            ``terms.sum(0) + bias`` (``terms.sum(0)`` for a layer built with ``bias=False``)
            equals ``self(xs, present)``; gradients flow to the inputs and the parameters.
            See :func:`mmfuse.cp_interactions`.
        labels : list
            The orders 0..M, or the subsets as sorted tuples of modality indices.

        Examples
        --------
        >>> import torch
        >>> from mmfuse.nn import CPFusion
        >>> layer = CPFusion([3, 2], out_dim=4, rank=2)
        >>> xs = [torch.randn(5, 3), torch.randn(5, 2)]
        >>> terms, subsets = layer.interactions(xs, by="subset")
        >>> terms.shape, subsets
        (torch.Size([4, 5, 4]), [(), (0,), (1,), (0, 1)])
        >>> bool(torch.allclose(terms.sum(0) + layer.bias, layer(xs), atol=1e-5))
        True
        """
        if (device_type := autocast_device(xs)) is not None:  # (as forward: matmul-like)
            return _autocast_fusion(self, device_type, CPFusion.interactions, xs, by=by, present=present)
        from ._interactions import cp_interactions

        xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), present, type(self).__name__)
        with _layer_call(self, "interactions"):
            return cp_interactions(
                xs, (self.weights, list(self.factors)), by=by, present=present, append_one=self.append_one,
                max_elements=self.max_elements,
            )

    @classmethod
    def from_cp(
        cls,
        cp: Any,
        bias: torch.Tensor | None = None,
        *,
        append_one: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> CPFusion:
        """A layer holding the CP decomposition ``cp`` (CPTensor or ``(weights, factors)``).

        ``factors`` are ``[A_1 (d_1 + 1, R), ..., A_M, C (h, R)]`` as arrays (torch tensors,
        NumPy arrays, ...: each goes through ``torch.as_tensor``); ``weights`` may be None
        (ones); ``bias`` (h,) likewise.
        """
        weights, factors = _fusion.as_cp(cp)
        factors = [_as_loaded(f"cp factor {i}", f) for i, f in enumerate(factors)]
        rank = factors[0].shape[1]
        if rank < 1:
            raise ValueError(f"cp factors have rank R = 0 (cp factor 0 has shape {_fmt(factors[0].shape)})")
        extra = int(check_bool_option("append_one", append_one))
        for i, f in enumerate(factors[:-1]):
            if f.shape[0] < 1 + extra:
                need = "d_m + 1 >= 2 rows (append_one=True)" if extra else "d_m >= 1 rows"
                raise ValueError(f"cp factor {i} has {f.shape[0]} rows; a modality factor needs {need}")
        if factors[-1].shape[0] < 1:
            raise ValueError(
                f"cp factor {len(factors) - 1} (the output factor) has 0 rows; it needs h >= 1 rows"
            )
        device = factors[0].device if device is None else device
        dtype = _loaded_dtype("cp factor 0", factors[0], dtype)
        layer = cls(
            [f.shape[0] - extra for f in factors[:-1]],
            factors[-1].shape[0],
            rank,
            append_one=append_one,
            bias=bias is not None,
            max_elements=_loaded_limit(factors),
            device=device,
            dtype=dtype,
        )
        if bias is not None:
            bias = _as_loaded("bias", bias)
            if tuple(bias.shape) != (layer.out_dim,):
                raise ValueError(
                    f"bias must have shape (h,) = ({layer.out_dim},) for the output factor of shape "
                    f"{_fmt(factors[-1].shape)}, got {_fmt(bias.shape)}"
                )
        with torch.no_grad():
            for mine, f in zip(layer.factors, factors):
                mine.copy_(f)
            layer.weights.copy_(torch.ones(rank) if weights is None else _as_loaded("cp weights", weights))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias)
        return layer


# --------------------------------------------------------------------------- TensorFusion


class TensorFusion(nn.Module):
    r"""Tensor Fusion (TFN, Zadeh et al. 2017) as a layer: a linear map of the outer product.

    Parameters
    ----------
    in_dims : sequence of int
    out_dim : int
    append_one : bool, default True
    bias : bool, default True
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError) a weight with more elements than this, at construction.  At call
        time it bounds the intermediates, not the batch size: an eager forward contracts the
        batch in blocks whose intermediates stay within it.  Where autograd records, each
        block's intermediates are kept for the backward (memory grows with the batch, as in
        the plain code), and under ``torch.compile`` the batch is one block (a graph cannot
        loop over a count of blocks that depends on a symbolic batch); there only one
        sample's intermediates are checked against it.
    device, dtype : optional

    Attributes
    ----------
    weight : nn.Parameter, shape (D_1, ..., D_M, h)
        D_m = d_m + 1 with ``append_one`` (the constant's index last), d_m without.
    bias : nn.Parameter (h,) or None

    Notes
    -----
    ``forward(xs)`` is :func:`mmfuse.tensor_fusion`; the outer product is built only where it
    is no larger than the mode-by-mode contraction's first intermediate (D_1 <= h).
    ``reset_parameters`` draws :math:`W \sim \mathcal N(0, 1/\prod_m D_m)` (unit output
    variance for unit-variance inputs) and zeroes the bias.

    Built on the ``meta`` device (``device="meta"``) the layer allocates nothing, and
    ``forward`` on ``meta`` inputs returns ``meta`` outputs of the right shapes; materialise
    it later with ``layer.to_empty(device=...)`` and ``layer.reset_parameters()``, as FSDP and
    large-model tooling do (under ``torch.manual_seed(s)`` the draw equals that of a layer
    built on the CPU under the same seed).
    """

    _PARAMETERS = ("weight", "bias")  # (the ones the layer computes with)
    bias: nn.Parameter | None

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        append_one: bool = True,
        bias: bool = True,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.append_one = check_bool_option("append_one", append_one)
        self.max_elements = check_positive_int("max_elements", max_elements)
        shape = (*(d + int(self.append_one) for d in self.in_dims), self.out_dim)
        size = math.prod(shape)
        if size > self.max_elements:
            raise ValueError(
                f"TensorFusion: weight of shape {_fmt(shape)} has {size} elements, over "
                f"max_elements={self.max_elements}; use LowRankFusion, or raise max_elements"
            )
        self.weight = nn.Parameter(torch.empty(shape, **fk))
        _register_bias(self, bias, self.out_dim, fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            fan_in = math.prod(self.weight.shape[:-1])
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_dims={list(self.in_dims)}, out_dim={self.out_dim}, "
            f"append_one={self.append_one}, bias={self.bias is not None}"
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        r"""Fuse a batch: :math:`W \cdot (\hat x_1 \otimes \cdots \otimes \hat x_M) + b`.

        W is contracted with one modality at a time (or, where D_1 <= h, with the outer
        product, then no larger), the batch in blocks whose intermediates hold at most
        ``max_elements`` elements.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, d_m)
            One tensor per modality (``d_m = in_dims[m]``), in the layer's dtype and on its
            device, sharing the batch size B.

        Returns
        -------
        tensor, shape (B, h)
            ``h = out_dim``, in the inputs' dtype (the region's under ``torch.autocast``).
            On ``meta`` inputs (a layer built with ``device="meta"``, not yet materialised)
            the output is a ``meta`` tensor of this shape: nothing is computed.

        Raises
        ------
        ValueError
            A wrong number of tensors, a shape other than (B, d_m) or differing batch sizes
            (the message names the modality).
        TypeError
            ``xs`` not a list or tuple of tensors, or a dtype other than the layer's.
        """
        if (device_type := autocast_device(xs)) is not None:
            return _autocast_fusion(self, device_type, TensorFusion.forward, xs)
        if _compiling():
            xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), None, type(self).__name__)
            # the functional API's size check (torch tensors: one sample's intermediates, as
            # the core blocks the batch; the batch may be symbolic)
            dims = tuple(self.weight.shape[:-1])
            _fusion.check_intermediates(
                "TensorFusion", torch, xs[0], dims, self.out_dim, self.max_elements, "LowRankFusion"
            )
            return _torch_impl("tensor_fusion")(
                xs, self.weight, self.bias, append_one=self.append_one, max_elements=self.max_elements
            )

        def plan() -> Any:
            checked = _check_inputs(xs, self.in_dims, _parameter_dtype(self), None, type(self).__name__)
            return _fusion.plan_tensor(
                checked, self.weight, self.bias, self.append_one, self.max_elements, None
            )

        options = (self.in_dims, self.append_one, self.max_elements)
        return _layer_plan(self, options, (xs, self.weight, self.bias), plan)(xs, self.weight, self.bias)

    def interactions(
        self, xs: Sequence[torch.Tensor], *, by: str = "order"
    ) -> tuple[torch.Tensor, list[Any]]:
        """The exact interaction terms of this layer's output, by order or by modality subset.

        Parameters
        ----------
        xs : sequence of M tensors, shapes (B, d_m)
            As in ``forward``.
        by : {"order", "subset"}, default "order"
            M + 1 terms by interaction order, or 2^M terms by subset of modalities (refused
            over the layer's ``max_elements``, as are the contraction's intermediates).

        Returns
        -------
        terms : tensor, shape (K, B, h)
            ``terms.sum(0) + bias`` (``terms.sum(0)`` for a layer built with ``bias=False``)
            equals ``self(xs)``; gradients flow to the inputs and the weight.  See
            :func:`mmfuse.tensor_interactions`.
        labels : list
            The orders 0..M, or the subsets as sorted tuples of modality indices.

        Examples
        --------
        >>> import torch
        >>> from mmfuse.nn import TensorFusion
        >>> layer = TensorFusion([3, 2], out_dim=4)
        >>> xs = [torch.randn(5, 3), torch.randn(5, 2)]
        >>> terms, orders = layer.interactions(xs)
        >>> terms.shape, orders
        (torch.Size([3, 5, 4]), [0, 1, 2])
        >>> bool(torch.allclose(terms.sum(0) + layer.bias, layer(xs), atol=1e-5))
        True
        """
        if (device_type := autocast_device(xs)) is not None:  # (as forward: matmul-like)
            return _autocast_fusion(self, device_type, TensorFusion.interactions, xs, by=by)
        from ._interactions import tensor_interactions

        xs = _check_inputs(xs, self.in_dims, _parameter_dtype(self), None, type(self).__name__)
        with _layer_call(self, "interactions"):
            return tensor_interactions(
                xs, self.weight, by=by, append_one=self.append_one, max_elements=self.max_elements
            )


# --------------------------------------------------------------------------- sequence layers


def _check_seq_inputs(
    xs: Any,
    dims: tuple[int, ...],
    lengths: tuple[int, ...] | None,
    dtype: torch.dtype,
    masks: Any,
    layer: str,
    dtype_source: str = "the layer's parameters have dtype",
    remedy: str = "cast the input or the layer (layer.to(dtype))",
) -> tuple[list[torch.Tensor], list[torch.Tensor | None] | None]:
    """Layer-boundary checks for (B, T_m, d_m) inputs and their (B, T_m) boolean masks."""
    n = len(dims)
    shapes = [(None, None if lengths is None else lengths[m], d) for m, d in enumerate(dims)]
    xs = _check_modality_tensors(xs, shapes, dtype, layer, dtype_source=dtype_source, remedy=remedy)
    for m, x in enumerate(xs):
        if x.shape[1] == 0:  # no tokens: no statistics, no pooling (NaN otherwise)
            raise ValueError(
                f"{layer}: xs[{m}] has no tokens (shape {_fmt(x.shape)}); every modality needs at least one"
            )
    if masks is None:
        return list(xs), None
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise TypeError(
            f"{layer}: masks must be a list of {n} boolean (B, T_m) tensors (or None entries), "
            f"got {type(masks).__name__}"
        )
    if len(masks) != n:
        raise ValueError(f"{layer}: masks must have one entry per modality ({n}), got {len(masks)}")
    for m, (k, x) in enumerate(zip(masks, xs)):
        if k is None:
            continue
        if not isinstance(k, torch.Tensor) or k.dtype != torch.bool:
            raise TypeError(
                f"{layer}: masks[{m}] must be a boolean tensor of shape (B, T_{m}), got {_what(k)}"
            )
        if tuple(k.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{layer}: masks[{m}] must have shape (B, T_{m}) = {_fmt(x.shape[:2])}, got {_fmt(k.shape)}"
            )
        _check_device(layer, f"masks[{m}]", k, xs[0])
    return list(xs), list(masks)


def _copy_host_draw(param: torch.Tensor, values: Any) -> None:
    """``param.copy_(values)`` for a draw made on the host (a NumPy array).  A DTensor
    parameter (FSDP2's ``fully_shard``, tensor parallelism) takes the draw distributed as
    itself (rank 0's, scattered to the shards): copying a plain tensor into it raised "got
    mixed torch.Tensor and DTensor", so ``reset_parameters`` after ``to_empty`` failed there
    (a review's find).  The draw comes over as :func:`mmfuse._namespace.from_numpy` brings any
    host array, rounded once to the parameter's dtype (torch's own float64 -> float16 /
    bfloat16 copy rounds twice, so a 16-bit layer's draw was not init_wander's; a diff
    review's find)."""
    src = from_numpy(values, torch_namespace(), dtype=param.dtype, device="cpu")
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src, param.device_mesh, param.placements)
    param.copy_(src)


def _check_module_factory(name: str, module: Any, like: torch.Tensor) -> None:
    """Refuse (TypeError) an ``nn.Module`` argument (a layer's submodule) whose parameters or
    buffers are not on the device of ``like`` (a parameter the layer has just made: its
    ``device``/``dtype`` arguments, or torch's defaults), or whose floating parameters are
    not in its dtype where that is float32 or float64.  (A 16-bit layer computes in float32
    and calls such a module in its parameters' own dtype: :func:`~mmfuse._core.sequence.in_own_dtype`.)
    The layer does not move the module (``.to()`` would change the caller's module in place;
    ``torch.nn`` layers that take modules leave them as given); unchecked, the first forward
    failed inside the module with torch's dtype or device error, which named neither."""
    if not isinstance(module, nn.Module):
        return
    full = not low_precision(torch_namespace(), like.dtype)  # (computed in its own dtype)
    for part, t in (*module.named_parameters(), *module.named_buffers()):
        wrong_dtype = full and isinstance(t, nn.Parameter) and t.is_floating_point() and t.dtype != like.dtype
        if wrong_dtype or t.device != like.device:
            raise TypeError(
                f"{name} holds {part} in {t.dtype} on {t.device}, where the layer's parameters are "
                f"{like.dtype} on {like.device}: build the {name} there too (e.g. "
                f"nn.PReLU(device=..., dtype=...)) or move it with .to() first; the layer does "
                f"not move a module it is given"
            )


class WanderAdapter(nn.Module):
    r"""The Wander adapter (Guo et al., AAAI 2025) as a layer: :func:`mmfuse.wander`.

    Parameters
    ----------
    in_dims : sequence of int
        Feature sizes d_m of the M modalities.
    lengths : sequence of int
        Token counts T_m (the token factors have one row per token).
    rank : int
        r, the width of the down-projections.
    feature_rank, token_rank : int
        R_h and R_t.
    out_dim : int, optional
        D; default ``in_dims[0]`` (``residual="first"`` needs every d_m = D).
    n_out : int, optional
        T_out; default ``rank`` (the released code).
    mode : {"cp", "collapsed"}, default "cp"
        As in :func:`mmfuse.sequence_fusion`; ``"collapsed"`` is the released contraction.
    activation : {"gelu", "gelu_tanh", "relu", "identity"} or callable, default "gelu"
        A callable ``nn.Module`` becomes a submodule (its parameters are the layer's, and
        ``.to()`` moves them); it must be on the layer's device and, for a float32 or
        float64 layer, hold its floating parameters in the layer's dtype (TypeError
        otherwise: the layer does not move a module it is given; a 16-bit layer calls it in
        its parameters' own dtype).
    residual : {"first", "none"}, default "first"
    init : {"trainable", "parity"}, default "trainable"
        The scheme of :func:`mmfuse.init_wander` used by ``reset_parameters``; ``"parity"``
        reproduces the released code (which never trains for M >= 2).
    bias : bool, default True
        Biases of the down-projections.
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError) a parameter with more elements than this, before allocating it
        (the rule of :func:`mmfuse.init_wander`, which ``reset_parameters`` calls with it).
    device, dtype : optional

    Attributes
    ----------
    down_weights : nn.ParameterList of M tensors (d_m, r)
    down_biases : nn.ParameterList of M tensors (r,) (empty when ``bias=False``)
    feature_factors : nn.ParameterList of M tensors (R_h, r, D)
    token_factors : nn.ParameterList of M tensors (R_t, T_m, T_out)

    Notes
    -----
    ``forward(xs, masks=None)`` takes M tensors (B, T_m, d_m) and optional boolean padding
    masks (B, T_m) (True: real token) and returns (B, T_out, D); a sample with every token
    of one modality padded gets a fused term of 0 (its output is the residual alone, see
    :func:`mmfuse.wander`).  ``reset_parameters`` draws
    from :func:`mmfuse.init_wander` with a seed taken from torch's global generator, so
    ``torch.manual_seed`` makes it reproducible.  Under ``"auto"`` (the torch backend's
    :func:`mmfuse.wander`): batches of at most 128 samples whose kept terms, M B R_t R_h T_out
    D elements (ranks 1 in collapsed mode), are at most 2**23 (off the CPU, in the stacked
    configuration below, up to 2**25 elements in its largest arrays) run under autograd (the released
    configuration, collapsed with the GELU on modalities of one shape, as one stacked
    computation, which without gradients on the CPU only batches under 16 take; others the
    Array-API core), where the custom ops' fixed costs would
    dominate; larger batches, and every call under ``torch.compile``, run the custom ops with
    memory-lean backward passes (``mmfuse::wander_collapsed`` for the released
    configuration, ``mmfuse::sequence_fusion`` otherwise).

    Built on the ``meta`` device (``device="meta"``) the layer allocates nothing, and
    ``forward`` on ``meta`` inputs returns ``meta`` outputs of the right shapes; materialise
    it later with ``layer.to_empty(device=...)`` and ``layer.reset_parameters()``, as FSDP and
    large-model tooling do (under ``torch.manual_seed(s)`` the draw equals that of a layer
    built on the CPU under the same seed).
    """

    _PARAMETERS = ("down_weights", "down_biases", "feature_factors", "token_factors")
    # wander()'s names for them in its messages -> this layer's (mmfuse.nn._layer_call)
    _FUNCTIONAL_NAMES = (
        (r"params\['down'\]\[(\d+)\]\[0\]", r"down_weights[\1]"),
        (r"params\['down'\]\[(\d+)\]\[1\]", r"down_biases[\1]"),
        (r"params\['feature'\]", "feature_factors"),
        (r"params\['token'\]", "token_factors"),
    )

    def __init__(
        self,
        in_dims: Sequence[int],
        lengths: Sequence[int],
        rank: int,
        feature_rank: int,
        token_rank: int,
        *,
        out_dim: int | None = None,
        n_out: int | None = None,
        mode: str = "cp",
        activation: Any = "gelu",
        residual: str = "first",
        init: str = "trainable",
        bias: bool = True,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        from . import _sequence

        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.lengths = tuple(check_size_list("lengths", lengths))  # a set or dict has no modality order
        if len(self.lengths) != len(self.in_dims):
            raise ValueError(
                f"in_dims and lengths must have one entry per modality: got {len(self.in_dims)} "
                f"and {len(self.lengths)}"
            )
        self.rank = check_positive_int("rank", rank)
        self.feature_rank = check_positive_int("feature_rank", feature_rank)
        self.token_rank = check_positive_int("token_rank", token_rank)
        self.out_dim = check_positive_int("out_dim", self.in_dims[0] if out_dim is None else out_dim)
        self.n_out = check_positive_int("n_out", self.rank if n_out is None else n_out)
        _sequence.check_mode(mode)
        _sequence.check_activation(activation)
        if residual not in _sequence.RESIDUALS:
            raise ValueError(f"residual must be one of {list(_sequence.RESIDUALS)}, got {residual!r}")
        if init not in ("trainable", "parity"):
            raise ValueError(f"init must be 'trainable' or 'parity', got {init!r}")
        if residual == "first":
            bad = [m for m, d in enumerate(self.in_dims) if d != self.out_dim]
            if bad:
                raise ValueError(
                    f"residual='first' needs every d_m = out_dim = {self.out_dim}: in_dims[{bad[0]}] = "
                    f"{self.in_dims[bad[0]]}; use residual='none'"
                )
            if self.n_out > sum(self.lengths):
                raise ValueError(
                    f"residual='first' needs n_out <= sum(lengths) = {sum(self.lengths)}, got {self.n_out}"
                )
        self.mode, self.activation, self.residual, self.init = mode, activation, residual, init
        with_bias = check_bool_option("bias", bias)
        self.max_elements = check_positive_int("max_elements", max_elements)
        sizes = {"rank": self.rank, "feature_rank": self.feature_rank, "token_rank": self.token_rank,
                 "out_dim": self.out_dim, "n_out": self.n_out}  # fmt: skip
        planned = _sequence.wander_planned(self.in_dims, self.lengths, sizes, bias=with_bias, layer=True)
        _fusion.check_allocations(type(self).__name__, planned, self.max_elements)
        r = self.rank
        self.down_weights = nn.ParameterList([nn.Parameter(torch.empty(d, r, **fk)) for d in self.in_dims])
        _check_module_factory("activation", activation, self.down_weights[0])
        self.down_biases = nn.ParameterList(
            [nn.Parameter(torch.empty(r, **fk)) for _ in self.in_dims] if with_bias else []
        )
        self.feature_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(self.feature_rank, r, self.out_dim, **fk)) for _ in self.in_dims]
        )
        self.token_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(self.token_rank, t, self.n_out, **fk)) for t in self.lengths]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        from ._sequence import init_wander

        if self.down_weights[0].is_meta:  # nothing to fill: skip the host-side draw (as torch's
            return  # own initialisers, which draw nothing on meta), so a meta build allocates nothing
        seed = int(torch.randint(0, 2**62, ()).item())
        params = init_wander(
            self.in_dims, self.lengths, rank=self.rank, feature_rank=self.feature_rank,
            token_rank=self.token_rank, out_dim=self.out_dim, n_out=self.n_out, seed=seed,
            init=self.init, max_elements=self.max_elements,
        )  # fmt: skip
        with torch.no_grad():
            for m, (w, b) in enumerate(params["down"]):
                _copy_host_draw(self.down_weights[m], w)
                if len(self.down_biases):
                    _copy_host_draw(self.down_biases[m], b)
            for mine, f in zip(self.feature_factors, params["feature"]):
                _copy_host_draw(mine, f)
            for mine, t in zip(self.token_factors, params["token"]):
                _copy_host_draw(mine, t)

    def extra_repr(self) -> str:
        act = repr(self.activation)
        if not isinstance(self.activation, str):  # a callable's name, unquoted: not an option string
            act = f"<{getattr(self.activation, '__name__', type(self.activation).__name__)}>"
        return (
            f"in_dims={list(self.in_dims)}, lengths={list(self.lengths)}, rank={self.rank}, "
            f"feature_rank={self.feature_rank}, token_rank={self.token_rank}, out_dim={self.out_dim}, "
            f"n_out={self.n_out}, mode={self.mode!r}, activation={act}, residual={self.residual!r}, "
            f"init={self.init!r}, bias={len(self.down_biases) > 0}"
        )

    def params(self) -> dict[str, Any]:
        """The parameters as :func:`mmfuse.wander` takes them (the registered tensors)."""
        n_mod = len(self.in_dims)
        biases: list[Any] = _entries(self.down_biases) if len(self.down_biases) else [None] * n_mod
        return {
            "down": list(zip(_entries(self.down_weights), biases)),
            "feature": _entries(self.feature_factors),
            "token": _entries(self.token_factors),
        }

    def forward(
        self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        r"""Adapt a batch of token sequences: down-projection, activation, sequence fusion
        (:func:`mmfuse.sequence_fusion`) and the residual.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, T_m, d_m)
            One tensor per modality (``T_m = lengths[m]``, ``d_m = in_dims[m]``), in the
            layer's dtype and on its device, sharing the batch size B.
        masks : list or tuple of M entries, optional
            Each None or a boolean (B, T_m) padding mask, True for real tokens; padded tokens
            are zeroed before the token contraction.

        Returns
        -------
        tensor, shape (B, T_out, D)
            ``T_out = n_out``, ``D = out_dim``, in the inputs' dtype (the region's under
            ``torch.autocast``).  On ``meta`` inputs (a layer built with ``device="meta"``,
            not yet materialised) a ``meta`` tensor of this shape: nothing is computed.

        Raises
        ------
        ValueError
            A wrong number of tensors, shapes other than (B, T_m, d_m), differing batch sizes,
            or masks of the wrong number or shape (the message names the modality).
        TypeError
            ``xs`` not a list or tuple of tensors, a dtype other than the layer's, or a
            non-boolean mask.
        """
        if (device_type := autocast_device(xs)) is not None:
            return _autocast_fusion(self, device_type, WanderAdapter.forward, xs, masks)
        params = self.params()
        name = type(self).__name__
        if _compiling():
            dtype = _parameter_dtype(self)
            xs, mask_list = _check_seq_inputs(xs, self.in_dims, self.lengths, dtype, masks, name)
            return _torch_impl("wander")(
                xs, params, mode=self.mode, masks=mask_list, activation=self.activation,
                residual=self.residual,
            )  # fmt: skip

        def plan() -> Any:
            dtype = _parameter_dtype(self)
            checked, mask_list = _check_seq_inputs(xs, self.in_dims, self.lengths, dtype, masks, name)
            return plan_wander(checked, params, self.mode, mask_list, self.activation, self.residual, None)

        # (a callable activation as one marker, passed per call: a deleted layer's activation
        # module must not live on in the plan cache)
        options = (self.in_dims, self.lengths, self.mode, activation_key(self.activation), self.residual)
        # the parameters' metadata as one flat list (their number follows from in_dims): a
        # quicker signature than the nested (weight, bias) pairs
        down = params["down"]
        flat = [*(w for w, _ in down), *(b for _, b in down), *params["feature"], *params["token"]]
        run = _layer_plan(self, options, (xs, masks, flat), plan)
        return run(xs, params, masks=masks, activation=self.activation)


# --------------------------------------------------------------------------- Zoom and Shift


class ZoomShift(nn.Module):
    r"""Parameter-free Zoom-and-Shift alignment and fusion: :func:`mmfuse.zoom_shift_fusion`.

    Parameters
    ----------
    channels : int
        C, the channel count shared by the modalities.
    num_modalities : int
        M >= 2.
    fuse : {"concat", "sum", "mean", None}, default "concat"
    pool : {"max", "mean"}, default "max"
        Pooling over tokens.  ``"mean"`` pools what alignment equalises (the aligned means:
        with the defaults and M = 2 both modalities pool to modality 1's mean, and modality 0
        gets no gradient); see :func:`mmfuse.zoom_shift_fusion`'s Notes.
    rounds : int in [0, 10**6] or None, default 1
        Rounds of alignment; ``None``: the exact limit of the rounds.
    alpha : float in (0, 1], default 1.0
    schedule : {"gauss-seidel", "jacobi"}, default "gauss-seidel"
    topology : {"consensus", "hub"}, default "consensus"
    hub : int, optional
        The guide modality for ``topology="hub"`` (default 0); refused with "consensus".
    eps : float, default 1e-5
    device, dtype : optional
        The layer has no parameters; if ``dtype`` is given, inputs must have it, and it moves
        with ``layer.to(...)``, ``layer.double()`` and the like (it is held by an empty,
        non-persistent buffer, so ``state_dict`` is empty either way).  Without ``dtype``
        every input must have the first input's dtype.

    Notes
    -----
    ``forward(xs, masks=None)`` takes M tensors (B, T_m, C) and optional (B, T_m) boolean
    masks and returns (B, M C) for ``fuse="concat"``, (B, C) for sum / mean, or the tuple of
    pooled aligned (B, C) features for ``fuse=None``.  Statistics are over the token axis.

    The layer has no parameters; it runs on ``meta`` inputs (shapes only, e.g. in a model
    built on the ``meta`` device to be materialised later), masks included.

    Under ``torch.autocast`` the layer is a normalisation, as ``nn.LayerNorm`` is there: its
    inputs (float64 excepted) are cast to the layer's dtype (float32 for a layer built
    without one) and the result is in that dtype, where :func:`mmfuse.zoom_shift_fusion`
    keeps its inputs' dtype in and out of the region.  (So are :class:`GuidedZoomShift`'s,
    to its parameters' dtype.)
    """

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        fuse: str | None = "concat",
        pool: str = "max",
        rounds: int | None = 1,
        alpha: float = 1.0,
        schedule: str = "gauss-seidel",
        topology: str = "consensus",
        hub: int | None = None,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        from . import _align

        self.channels = check_positive_int("channels", channels)
        self.num_modalities = check_positive_int("num_modalities", num_modalities)
        if self.num_modalities < 2:
            raise ValueError(f"num_modalities must be at least 2, got {num_modalities}")
        _align.check_choice(fuse, "fuse", _align.FUSE_MODES)
        _align.check_choice(pool, "pool", _align.POOL_MODES)
        _align.check_choice(schedule, "schedule", _align.SCHEDULES)
        _align.check_choice(topology, "topology", _align.TOPOLOGIES)
        self.rounds = _align.check_rounds(rounds)
        self.alpha = _align.check_alpha(alpha)
        self.eps = _align.check_eps(eps)
        # the guide's index under the hub topology (default 0), None under consensus, which
        # has no hub (a hub given with it is refused, as by align)
        if hub is not None:  # the layer's own type and range messages first
            _check_index("hub", hub, self.num_modalities)
            hub = _align.check_hub(hub, topology, self.num_modalities)
        self.hub = 0 if hub is None and topology == "hub" else hub
        self.fuse, self.pool, self.schedule, self.topology = fuse, pool, schedule, topology
        if (
            self.rounds is None
            and limit_weights(self.num_modalities, self.alpha, schedule, topology, self.hub or 0)
            is None
        ):
            raise ValueError("rounds=None: Jacobi consensus with M = 2 and alpha = 1 has no limit")
        _check_dtype(dtype)
        _check_factory_device(device)  # (nothing is allocated there without a dtype: still checked)
        # an empty buffer: .to() / .double() / .half() move the layer's dtype with it
        self._dtype_buffer: torch.Tensor | None
        self.register_buffer(
            "_dtype_buffer", None if dtype is None else torch.empty(0, device=device, dtype=dtype),
            persistent=False,
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype inputs must have (None: any floating dtype, shared by the inputs)."""
        return None if self._dtype_buffer is None else self._dtype_buffer.dtype

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        # The dtype's buffer holds no data, but built on meta it stays there through
        # load_state_dict(assign=True) (it is not persistent), and torch refuses to copy any meta
        # tensor, an empty one too: ``.to(device)`` failed ("Cannot copy out of meta tensor"; a
        # review's find).  Remade on the CPU first, it moves as any buffer does.
        # Only where the conversion refuses it: one that keeps the model on meta (.half()) keeps
        # the buffer there too (a diff review's find).
        buffer = self._dtype_buffer
        if buffer is not None and buffer.is_meta:
            try:
                fn(buffer)  # (a probe: torch's conversions make a new tensor, left unused)
            except NotImplementedError:  # ("Cannot copy out of meta tensor")
                self._dtype_buffer = torch.empty(0, dtype=buffer.dtype, device="cpu")
        return super()._apply(fn, recurse)

    def reset_parameters(self) -> None:
        """Nothing to reset: the layer is parameter-free."""

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_modalities={self.num_modalities}, fuse={self.fuse!r}, "
            f"pool={self.pool!r}, rounds={self.rounds}, alpha={self.alpha}, "
            f"schedule={self.schedule!r}, topology={self.topology!r}, hub={self.hub}, eps={self.eps}"
            + ("" if self.dtype is None else f", dtype={self.dtype}")  # parameter-free: shown nowhere else
        )

    def forward(self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None) -> Any:
        r"""Align a batch of token sequences by Zoom and Shift, pool them and fuse.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, T_m, C)
            One tensor per modality (token counts T_m may differ, ``C = channels``), sharing
            the batch size and the dtype: the layer's if it was built with one, else
            ``xs[0]``'s.
        masks : list or tuple of M entries, optional
            Each None or a boolean (B, T_m) mask, True for tokens that count in the
            statistics and the pooling.  Every sample needs an unmasked token: checked in eager
            mode, except on the ``meta`` device, whose tensors have no values, and inside
            ``torch.func`` transforms (``vmap``), whose values cannot steer Python.  A sample with
            a single unmasked token is taken (refusing it would refuse padded batches with a
            one-token utterance), but its spread is sqrt(eps), as for a one-token input, which
            the layer refuses: its partners are zoomed to it, and their spread in that sample
            is lost.

        Returns
        -------
        tensor or tuple of tensors
            (B, M C) for ``fuse="concat"``, (B, C) for ``"sum"`` and ``"mean"``, the M pooled
            aligned (B, C) features for ``fuse=None`` (a tuple, as torch's modules return
            several outputs).  On ``meta`` inputs, ``meta`` tensors
            of these shapes.

        Raises
        ------
        ValueError
            A wrong number of tensors, shapes other than (B, T_m, C), differing batch sizes,
            masks of the wrong number or shape, or a sample with every token masked (where
            the masks have values: not under ``torch.compile`` or ``torch.export``, whose
            masks are fake; there such a sample's output is not finite: NaN statistics, and
            max pooling of no tokens gives -inf).
        TypeError
            ``xs`` not a list or tuple of tensors, differing dtypes (or not the layer's), or a
            non-boolean mask.
        """
        if (device_type := autocast_device(xs)) is not None:
            # inputs cast to the layer's dtype (float32 for a layer built without one), not the
            # region's: the statistics are never computed in a 16-bit autocast dtype
            with torch.autocast(device_type, enabled=False):
                # this class's forward, not self.forward: a subclass's forward around
                # super().forward() would run its own body twice
                return ZoomShift.forward(self, cast_tree(xs, self.dtype or torch.float32), masks)
        dtype, source = self.dtype, "the layer's dtype is"
        remedy = "cast the input or the layer (layer.to(dtype))"
        if dtype is None:  # parameter-free: the inputs must share the first one's dtype
            first = xs[0] if isinstance(xs, (list, tuple)) and xs else None
            dtype = first.dtype if isinstance(first, torch.Tensor) else torch.get_default_dtype()
            if not dtype.is_floating_point:  # (the functional API's check, which compiling skips)
                raise TypeError(f"{type(self).__name__}: xs[0] must have a real floating dtype, got {dtype}")
            # a layer built without a dtype has none that layer.to could change
            source, remedy = "xs[0] has dtype", "cast the inputs to one dtype"
        dims = (self.channels,) * self.num_modalities
        xs, mask_list = _check_seq_inputs(xs, dims, None, dtype, masks, type(self).__name__, source, remedy)
        for m, x in enumerate(xs):
            if x.shape[1] == 1:  # (align's own message would advise an axis the layer has not)
                from ._align import SINGLE_ENTRY

                raise ValueError(
                    f"{type(self).__name__}: xs[{m}] has a single token (shape {_fmt(x.shape)}): "
                    f"{SINGLE_ENTRY}; the layer takes statistics over the token axis, so give it "
                    "at least 2 tokens"
                )
        if _compiling():
            from ._align import check_eps_dtype

            with _layer_call(self):  # (the functional API's check, which compiling skips)
                check_eps_dtype(torch_namespace(), self.eps, dtype)
            if mask_list is not None:  # as zoom_shift_fusion: padding never reaches gradients
                xs = [mask_tokens(torch_namespace(), x, k) for x, k in zip(xs, mask_list)]
            # float16 / bfloat16: aligned, pooled and fused in float32, rounded once (as
            # zoom_shift_fusion)
            work = work_dtype(torch_namespace(), dtype)
            ys = _torch_impl("align")(
                [x.to(work) for x in xs], rounds=self.rounds, alpha=self.alpha,
                schedule=self.schedule, topology=self.topology, hub=self.hub or 0, axis=-2,
                masks=mask_list, eps=self.eps,
            )  # fmt: skip
            out = pool_and_fuse(ys, fuse_how=self.fuse, pool_how=self.pool, masks=mask_list)
            return _outputs(rounded_to(torch_namespace(), dtype, out) if work != dtype else out)
        from ._align import zoom_shift_fusion

        with _layer_call(self):
            return _outputs(zoom_shift_fusion(
                xs, fuse=self.fuse, pool=self.pool, rounds=self.rounds, alpha=self.alpha,
                schedule=self.schedule, topology=self.topology, hub=self.hub, masks=mask_list,
                eps=self.eps,
            ))  # fmt: skip


def _outputs(out: Any) -> Any:
    """A layer's result as torch's modules give several outputs: the per-modality list of
    ``fuse=None`` as a tuple (a module's full backward hooks take a tensor or a tuple of
    tensors, and never fired on the list: a review's find)."""
    return tuple(out) if isinstance(out, list) else out


class GuidedZoomShift(nn.Module):
    r"""Learned Zoom and Shift: the guide's pooled features predict every other modality's
    per-channel zoom and shift (FiLM-style), then pooling and fusion.

    Parameters
    ----------
    channels : int
        C, shared by the modalities.
    num_modalities : int
        M >= 2.
    guide : int, default 0
        The guide modality g; it passes through unchanged.
    fuse : {"concat", "sum", "mean", None}, default "concat"
    pool : {"max", "mean"}, default "max"
        Pooling of the modulated sequences for the fusion (the guide's summary that drives
        the modulation is always its masked mean).  With ``"mean"`` the zoom never reaches
        the output (see Notes), and the log-zoom half of ``weight`` and ``bias`` gets a
        gradient of rounding noise only (which an adaptive optimiser such as Adam still
        turns into steps: freeze that half if it matters).
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError) a ``weight`` with more elements than this, before allocating it.
    device, dtype : optional

    Attributes
    ----------
    weight : nn.Parameter, shape (M - 1, 2 C, C)
        Per non-guide modality (in index order), the rows predicting the log-zoom (first C)
        and the shift (last C) from the guide's pooled features.
    bias : nn.Parameter, shape (M - 1, 2 C)

    Notes
    -----
    With :math:`p = \mathrm{mean}_t\, x_g` (B, C) the guide's pooled (masked-mean) features
    and, for every other modality m, :math:`[a_m; b_m] = W_m p + c_m` (two (B, C) heads),

    .. math:: y_m = \mu_m + (x_m - \mu_m) \odot e^{a_m} + b_m,

    where :math:`\mu_m` (B, 1, C) is x_m's own masked token mean: a zoom about x_m's mean by
    the positive per-channel factor :math:`e^{a_m}` (parameterised in log-space, the space in
    which :func:`mmfuse.zoom_shift` moves spreads) and a shift by :math:`b_m`, both predicted
    from the guide, as FiLM (Perez et al., 2018) predicts scale and shift from a conditioning
    input.  The parameter-free :func:`mmfuse.zoom_shift` at alpha = 1 is the special case
    :math:`e^{a_m} = \sigma_g / \sigma_m`, :math:`b_m = \mu_g - \mu_m`, which depends on
    x_m's statistics; here only the guide conditions the map.  Then every modality (the
    guide unchanged) is pooled over its unmasked tokens and the M (B, C) features fused as
    in :func:`mmfuse.zoom_shift_fusion`.

    Padded tokens (``masks``) of the modulated modalities are zeroed before the map, so that
    NaN or inf padding never reaches a gradient: their outputs in :meth:`modulate` are the
    map of 0, and pooling never reads them (the guide is returned as given, padding and all).

    ``reset_parameters`` sets W and c to zero: :math:`a = b = 0`, so the layer starts as the
    identity on the sequences' real tokens (the parameter-free pooling and fusion, up to
    rounding: the map recomputes each token about its pivot, ``(x - pivot - corr) e^0 + mu``,
    which re-rounds some entries by an ulp of the channel's scale) and still
    trains: :math:`\partial L / \partial W_m = (\partial L / \partial [a_m; b_m])\, p^\top` is
    non-zero as soon as the upstream gradient and the guide's features are, with one
    exception: the token mean of :math:`y_m` is :math:`\mu_m + b_m` whatever :math:`a_m`, so
    under ``pool="mean"`` the log-zoom head's gradient is zero up to rounding (hence the
    default ``pool="max"``, through which both heads train; under Adam, which normalises the
    rounding noise into steps of the learning rate's order, that head drifts without changing
    the output).

    Built on the ``meta`` device (``device="meta"``) the layer allocates nothing, and
    ``forward`` on ``meta`` inputs returns ``meta`` outputs of the right shapes; materialise
    it later with ``layer.to_empty(device=...)`` and ``layer.reset_parameters()``, as FSDP and
    large-model tooling do (under ``torch.manual_seed(s)`` the draw equals that of a layer
    built on the CPU under the same seed).
    """

    _PARAMETERS = ("weight", "bias")

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        guide: int = 0,
        fuse: str | None = "concat",
        pool: str = "max",
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        from . import _align

        fk = _factory(device, dtype)
        self.channels = check_positive_int("channels", channels)
        self.num_modalities = check_positive_int("num_modalities", num_modalities)
        if self.num_modalities < 2:
            raise ValueError(f"num_modalities must be at least 2, got {num_modalities}")
        self.guide = _check_index("guide", guide, self.num_modalities)
        _align.check_choice(fuse, "fuse", _align.FUSE_MODES)
        _align.check_choice(pool, "pool", _align.POOL_MODES)
        self.fuse, self.pool = fuse, pool
        c, k = self.channels, self.num_modalities - 1
        self.max_elements = check_positive_int("max_elements", max_elements)
        planned = [
            ("weight", "(M - 1, 2 C, C)", (k, 2 * c, c), f"num_modalities={k + 1}, channels={c}"),
            ("bias", "(M - 1, 2 C)", (k, 2 * c), f"num_modalities={k + 1}, channels={c}"),
        ]
        _fusion.check_allocations(type(self).__name__, planned, self.max_elements)
        self.weight = nn.Parameter(torch.empty(self.num_modalities - 1, 2 * c, c, **fk))
        self.bias = nn.Parameter(torch.empty(self.num_modalities - 1, 2 * c, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_modalities={self.num_modalities}, guide={self.guide}, "
            f"fuse={self.fuse!r}, pool={self.pool!r}"
        )

    def modulate(
        self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor]:
        """The modulated (B, T_m, C) sequences (the guide's unchanged), before pooling; padded
        tokens of the others hold the map of 0 (zeroed first: see the class Notes)."""
        if (device_type := autocast_device(xs)) is not None:  # statistics in the layer's dtype
            with torch.autocast(device_type, enabled=False):
                # (this class's modulate, as forward: not a subclass's a second time)
                return GuidedZoomShift.modulate(self, cast_tree(xs, self._check_parameters()), masks)
        xs, ys = self._modulated(xs, masks)
        # float16 / bfloat16: the statistics are float32, so is y; rounded once to x's dtype
        return [x if m == self.guide else y.to(x.dtype) for m, (x, y) in enumerate(zip(xs, ys))]

    def _modulated(
        self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The checked inputs and :meth:`modulate`'s sequences in the statistics' dtype
        (float32 for a 16-bit layer, the guide's upcast exactly), not yet rounded."""
        dims = (self.channels,) * self.num_modalities
        dtype = self._check_parameters()  # before the inputs, which are checked against it
        xs, mask_list = _check_seq_inputs(xs, dims, None, dtype, masks, type(self).__name__)
        full = mask_list if mask_list is not None else [None] * len(xs)
        _check_device(type(self).__name__, "weight", self.weight, xs[0])
        _check_device(type(self).__name__, "bias", self.bias, xs[0])
        if not _compiling():  # as ZoomShift: a sample without tokens has no statistics
            from ._align import check_mask
            from ._namespace import array_namespace

            with _layer_call(self):
                for m, (seq, mask) in enumerate(zip(xs, full)):
                    check_mask(array_namespace(seq), mask, seq, 1, f"masks[{m}]", f"xs[{m}]")
        c = self.channels
        # the guide's summary and the heads in the statistics' dtype (float32 for 16-bit
        # layers): exp(log_zoom) turns their rounding into relative error of every output
        # (heads rounded to bfloat16 gave 10-45x the error of float32 maths rounded once)
        guide: torch.Tensor = xs[self.guide]
        weight: torch.Tensor = self.weight
        bias: torch.Tensor = self.bias
        if low_precision(torch_namespace(), weight.dtype):  # (cached: no cost for 32/64 bits)
            work = work_dtype(torch_namespace(), weight.dtype)
            guide, weight, bias = guide.to(work), weight.to(work), bias.to(work)
        p = pool(guide, full[self.guide], "mean")  # (B, C)
        heads = torch.einsum("bc,kdc->kbd", p, weight) + bias[:, None, :]  # (M - 1, B, 2 C)
        out = []
        k = 0
        for m, (x, mask) in enumerate(zip(xs, full)):
            if m == self.guide:
                out.append(guide)
                continue
            # masked tokens zeroed first (mapped, never pooled): NaN or inf padding would reach
            # the parameters' gradients as 0 * NaN through the zoom (as ZoomShift's)
            x = mask_tokens(torch_namespace(), x, mask)
            # x - mean as (x - pivot) - corr, the core's statistics: exact near the mean, where
            # x - mean rounded to one float64 put ulp(mean) into every log-zoom gradient
            # (3e5 ulps for data 1e6 + N(0, 1); a review against exact arithmetic)
            st = GENERIC.stats(x, 1, mask, keep_dev=True)
            log_zoom, shift = heads[k, :, None, :c], heads[k, :, None, c:]
            # the mean plus the learned shift in float64 where float32 widens, rounded once: a
            # mean of 1e4 shifted near 0 kept half an ulp of 1e4 there (a review's find)
            target = (wide_mean(torch_namespace(), st) + shift).to(st.var.dtype)
            out.append((st.dev - st.corr) * torch.exp(log_zoom) + target)
            k += 1
        return xs, out

    def _check_parameters(self) -> torch.dtype:
        """The parameters' types, shapes and one dtype, returned (a user may replace them;
        both are required: the heads are ``W p + c``), checked before the inputs, so that a
        replaced parameter of another dtype is named as such rather than the inputs blamed for
        differing from ``weight`` (a review's find).  Their device is checked against the
        inputs' after those (einsum would take a CPU tensor beside a meta one)."""
        layer, k, c = type(self).__name__, self.num_modalities - 1, self.channels
        shapes = (("weight", "(M - 1, 2 C, C)", (k, 2 * c, c)), ("bias", "(M - 1, 2 C)", (k, 2 * c)))
        for name, layout, want in shapes:
            got = getattr(self, name)
            if not isinstance(got, torch.Tensor):
                raise TypeError(
                    f"{layer}: {name} must be a tensor of shape {layout} = {want}, got {type(got).__name__}"
                )
            if tuple(got.shape) != want:
                raise ValueError(f"{layer}: {name} must have shape {layout} = {want}, got {_fmt(got.shape)}")
        return _parameter_dtype(self)  # one dtype for all parameters (the layers' one rule and message)

    def forward(self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None) -> Any:
        r"""Modulate a batch of token sequences from the guide's pooled features (see
        :meth:`modulate`), pool them and fuse.

        Parameters
        ----------
        xs : list or tuple of M tensors, shapes (B, T_m, C)
            One tensor per modality (token counts T_m may differ, ``C = channels``), in the
            layer's dtype and on its device, sharing the batch size B.
        masks : list or tuple of M entries, optional
            Each None or a boolean (B, T_m) mask, True for tokens that count in the
            statistics and the pooling.  Every sample needs an unmasked token: checked in eager
            mode, except on the ``meta`` device, whose tensors have no values, and inside
            ``torch.func`` transforms (``vmap``), whose values cannot steer Python.

        Returns
        -------
        tensor or tuple of tensors
            (B, M C) for ``fuse="concat"``, (B, C) for ``"sum"`` and ``"mean"``, the M pooled
            (B, C) features for ``fuse=None`` (a tuple, as torch's modules return several
            outputs).  On ``meta`` inputs (a layer built with
            ``device="meta"``, not yet materialised), ``meta`` tensors of these shapes.

        Raises
        ------
        ValueError
            A wrong number of tensors, shapes other than (B, T_m, C), differing batch sizes,
            masks of the wrong number or shape, or a sample with every token masked (where
            the masks have values: not under ``torch.compile`` or ``torch.export``, whose
            masks are fake; there that modality's pooled features are not finite: NaN for
            mean pooling of no tokens, -inf for max pooling).
        TypeError
            ``xs`` not a list or tuple of tensors, a dtype other than the layer's, or a
            non-boolean mask.
        """
        if (device_type := autocast_device(xs)) is not None:  # pooling and fusion too
            with torch.autocast(device_type, enabled=False):
                # (this class's forward, as ZoomShift's: not a subclass's a second time)
                return GuidedZoomShift.forward(self, cast_tree(xs, self._check_parameters()), masks)
        xs, ys = self._modulated(xs, masks)
        # pooled and fused in the statistics' dtype, rounded once (float16 / bfloat16: pooling
        # sequences rounded to 16 bits cost many ulps of a small pooled mean)
        mask_list = None if masks is None else list(masks)
        out = pool_and_fuse(ys, fuse_how=self.fuse, pool_how=self.pool, masks=mask_list)
        dtype = xs[0].dtype
        return _outputs(rounded_to(torch_namespace(), dtype, out) if ys[0].dtype != dtype else out)
