"""numba CPU kernel of the order recursion of the interaction terms (LMF and CP, by order).

Why a compiled kernel: the terms by order cost O(M^2) elementwise products per rank, sample
and output (the coefficients of t^k in prod_m (c_m + t P_m)).  NumPy runs them as separate
passes over the block (3m + 1 passes at step m, 91 at M = 8, each limited by NumPy's 3-5 G
elements per second on the CI machine), which is what keeps :func:`mmfuse.lowrank_interactions`
at about 3x a :func:`mmfuse.lowrank_fusion` call at M = 8 on NumPy.  This kernel runs the same
recursion over one short row (a tile of samples of one rank) at a time, the row's M
coefficients in L1 (up to four orders updated per pass), so the projections are read once and
the coefficients written once: about 1.5x the fusion (benchmarks/interactions.py).

Only the recursion is here: the algorithm (blocks, projections, masks, order 0, the rank
reduction) is the core's (:func:`mmfuse._core.interactions.orders_blocked`), which calls
:class:`NumbaOrders` in place of NumPy's :class:`~mmfuse._core.interactions.NumPyOrders`.

Numerics: the same operations in the same order as NumPy's recursion (order j becomes
``c * (order j) + p * (order j - 1)``, no fused multiply-add), so the coefficients are the
NumPy path's to the last bit; float32 and float64 compute in their own dtype.

Compilation: on first use, per dtype, cached on disk where numba can
(:func:`mmfuse.backends._numba_jit.cpu_kernel`).  The kernels live in
:mod:`mmfuse.backends._numba_orders`, imported on a kernel's first run: importing this module
(as resolving the registry's rows does) imports no numba.

Dispatch: the numba backend's "CPU kernels" rows of ``lowrank_interactions`` and
``cp_interactions`` (:mod:`mmfuse.backends._table`), for NumPy arrays and for torch CPU tensors
that need no gradient.  "auto" takes them once numba is imported, or for calls of at least
:data:`~mmfuse.backends._table.AUTO_IMPORT_PRODUCTS` recursion products, which import it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .._core.interactions import (
    cp_interactions_numpy,
    cp_interactions_with,
    lowrank_interactions_numpy,
    lowrank_interactions_with,
    tiled,
)
from .._namespace import is_torch_tensor, tensor_memory

__all__ = ["NumbaOrders", "cp_interactions_cpu", "lowrank_interactions_cpu"]

class NumbaOrders:
    """The order recursion of :func:`mmfuse._core.interactions.orders_blocked` as the compiled
    :func:`coefficients` (same interface as :class:`~mmfuse._core.interactions.NumPyOrders`)."""

    def __init__(self, const: Any, prefix: Any, tile: int, rows: int) -> None:
        self.tile = tile
        self.const = {t: np.ascontiguousarray(tiled(const, t)[:, :, 0, :]) for t in {1, tile}}
        self.prefix = {t: np.ascontiguousarray(tiled(prefix, t)[:, :, 0, :]) for t in {1, tile}}

    def __call__(self, proj: Any, coef: Any) -> None:
        from ._numba_orders import coefficients  # numba, on the kernels' first run

        n, rank, k, width = proj.shape
        t = self.tile if k % self.tile == 0 else 1
        view = (n, rank, k // t, t * width)
        coefficients(proj.reshape(view), self.const[t], self.prefix[t], coef.reshape(view))


def _compiled_dtype(arrays: list[Any]) -> bool:
    return all(getattr(a, "dtype", None) in (np.float32, np.float64) for a in arrays)


_torch_tensor, _view = is_torch_tensor, tensor_memory  # (mmfuse._namespace's)


def lowrank_interactions_cpu(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """:func:`mmfuse.lowrank_interactions` with the order recursion compiled: NumPy arrays,
    or torch CPU tensors that need no gradient (read through NumPy views, the terms returned
    as a tensor sharing the result's memory).  float32 / float64 by order with the constant
    appended take the kernel; anything else runs the NumPy core."""
    if _torch_tensor(xs[0]):
        terms, labels = lowrank_interactions_cpu(
            [_view(x) for x in xs], [_view(f) for f in factors], _view(weights),
            by=by, present=_view(present), append_one=append_one, max_elements=max_elements,
        )  # fmt: skip
        return sys.modules["torch"].from_numpy(terms), labels
    if not _compiled_dtype([*xs, *factors]):
        return lowrank_interactions_numpy(
            xs, factors, weights, by=by, present=present, append_one=append_one, max_elements=max_elements
        )
    return lowrank_interactions_with(
        NumbaOrders, xs, factors, weights, by=by, present=present, append_one=append_one
    )


def cp_interactions_cpu(
    xs: list[Any],
    cp: tuple[Any, list[Any]],
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """:func:`mmfuse.cp_interactions` with the order recursion compiled: NumPy arrays, or
    torch CPU tensors that need no gradient (as :func:`lowrank_interactions_cpu`)."""
    if _torch_tensor(xs[0]):
        weights, factors = cp
        terms, labels = cp_interactions_cpu(
            [_view(x) for x in xs], (_view(weights), [_view(a) for a in factors]),
            by=by, present=_view(present), append_one=append_one, max_elements=max_elements,
        )  # fmt: skip
        return sys.modules["torch"].from_numpy(terms), labels
    if not _compiled_dtype([*xs, *cp[1]]):
        return cp_interactions_numpy(
            xs, cp, by=by, present=present, append_one=append_one, max_elements=max_elements
        )
    return cp_interactions_with(NumbaOrders, xs, cp, by=by, present=present, append_one=append_one)
