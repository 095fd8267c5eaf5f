"""The ``"reference"`` backend: run :mod:`mmfuse.reference` on any namespace's arrays.

Inputs are copied to NumPy, the float64 reference runs, and the result comes back in the
caller's namespace, dtype and device.  Slow and gradient-free by design: it is the oracle.
Its row's condition (``"values, no grad"``) refuses torch tensors that require grad in grad
mode, tensors on the meta device, fake tensors, traced arrays, and calls while
``torch.compile``, ``torch.jit.trace`` or ``make_fx`` traces.
The registry's table names the functions below, one per operator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .. import reference
from .._core.sequence import apply_activation
from .._namespace import (
    array_namespace,
    first_floating,
    first_of,
    from_numpy,
    native_dtype,
    pinned_device,
    to_numpy,
    tree_map,
)

__all__ = [
    "align",
    "as_backend",
    "cp_fusion",
    "cp_interactions",
    "lowrank_fusion",
    "lowrank_interactions",
    "moments",
    "sequence_fusion",
    "tensor_fusion",
    "tensor_interactions",
    "wander",
    "zoom_shift",
]


def as_backend(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a NumPy reference function as an implementation for any namespace."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        like = first_floating((args, kwargs))
        xp = array_namespace(like)
        # results in native byte order, as every other backend gives (a ">f8" input's own dtype
        # came back big-endian from the fusions), on the first device one of the call's arrays is
        # bound to (pinned_device: an uncommitted JAX array binds none, and follows the others,
        # as in JAX's own operations: the result had been committed to the first array's default
        # device beside parameters on another; a review's find)
        dtype, device = native_dtype(like.dtype), first_of((args, kwargs), pinned_device)
        np_args = tree_map(lambda a: to_numpy(a, dtype=None), (args, kwargs))
        out = func(*np_args[0], **np_args[1])
        return tree_map(lambda a: from_numpy(a, xp, dtype=dtype, device=device), out)

    # named as this module's attribute of the same name holds it (functools.wraps took the
    # reference function's names, under which pickle found another object: the reference
    # backend's implementations could not be pickled; a review's find)
    run.__module__, run.__qualname__ = __name__, func.__name__
    return run


# The oracle's wander with a caller's ``activation`` given the checks the other backends give
# theirs (apply_activation): an array of the pre-activations' shape, dtype and library.  Here
# those are the float64 NumPy arrays the oracle calls it on (as the public docstring says), so
# a callable must take and return NumPy float64 arrays: one returning a scalar, a str or
# another shape had failed deep in the oracle's einsums (an IndexError, NumPy's "shape-mismatch
# for sum"), and one returning another dtype or another library's array (a JAX function, whose
# float32 result the oracle widened) had passed (a review's find).  The oracle, which reads
# like the equations, checks nothing itself.
@functools.wraps(reference.wander)
def _wander_checked(
    xs: Any, params: Any, *, mode: str = "cp", masks: Any = None, activation: Any = "gelu",
    residual: str = "first",
) -> Any:  # fmt: skip
    if callable(activation):
        activation = functools.partial(apply_activation, activation)
    return reference.wander(xs, params, mode=mode, masks=masks, activation=activation, residual=residual)


tensor_fusion = as_backend(reference.tensor_fusion)
lowrank_fusion = as_backend(reference.lowrank_fusion)
cp_fusion = as_backend(reference.cp_fusion)
sequence_fusion = as_backend(reference.sequence_fusion)
wander = as_backend(_wander_checked)
moments = as_backend(reference.moments)
zoom_shift = as_backend(reference.zoom_shift)
align = as_backend(reference.align)
tensor_interactions = as_backend(reference.tensor_interactions)
lowrank_interactions = as_backend(reference.lowrank_interactions)
cp_interactions = as_backend(reference.cp_interactions)
