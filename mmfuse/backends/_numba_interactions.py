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

Compilation: on first use, per dtype, cached on disk (``cache=True``).  Importing this module
imports numba but compiles nothing.

Dispatch: the numba backend's "CPU kernels" rows of ``lowrank_interactions`` and
``cp_interactions`` (:mod:`mmfuse.backends._table`), for NumPy arrays and for torch CPU tensors
that need no gradient.  "auto" takes them once numba is imported, or for calls of at least
:data:`~mmfuse.backends._table.AUTO_IMPORT_PRODUCTS` recursion products, which import it.
"""

from __future__ import annotations

import sys
from typing import Any

import numba
import numpy as np

from .._core.interactions import (
    cp_interactions_numpy,
    cp_interactions_with,
    lowrank_interactions_numpy,
    lowrank_interactions_with,
    tiled,
)

__all__ = ["NumbaOrders", "coefficients", "cp_interactions_cpu", "lowrank_interactions_cpu"]

# Loops run over contiguous row views, with the row's own length as the bound: LLVM then
# vectorises them (indexing the 4-d arrays inside the loops, or bounding by another array's
# length, keeps it from doing so: several times slower).


@numba.njit(cache=True, nogil=True)
def _copy(dst, a):  # pragma: no cover - compiled
    for w in range(dst.shape[0]):
        dst[w] = a[w]


@numba.njit(cache=True, nogil=True)
def _times(dst, a, p):  # pragma: no cover - compiled
    """dst = a * p."""
    for w in range(dst.shape[0]):
        dst[w] = a[w] * p[w]


@numba.njit(cache=True, nogil=True)
def _step(dst, c, low, p):  # pragma: no cover - compiled
    """dst = dst * c + low * p (order j from orders j and j - 1 and modality m's c and p)."""
    for w in range(dst.shape[0]):
        dst[w] = dst[w] * c[w] + low[w] * p[w]


@numba.njit(cache=True, nogil=True)
def _step2(a, b, c, low, p):  # pragma: no cover - compiled
    """Two adjacent orders in one pass (b the lower): each from the old values, as _step."""
    for w in range(a.shape[0]):
        bw = b[w]
        a[w] = a[w] * c[w] + bw * p[w]
        b[w] = bw * c[w] + low[w] * p[w]


@numba.njit(cache=True, nogil=True)
def _step4(a, b, d, e, c, low, p):  # pragma: no cover - compiled
    """Four adjacent orders in one pass (a the highest, e the lowest), as _step: each row is
    loaded once for two updates, about half the loads of four single passes."""
    for w in range(a.shape[0]):
        bw = b[w]
        dw = d[w]
        ew = e[w]
        cw = c[w]
        pw = p[w]
        a[w] = a[w] * cw + bw * pw
        b[w] = bw * cw + dw * pw
        d[w] = dw * cw + ew * pw
        e[w] = ew * cw + low[w] * pw


@numba.njit(cache=True, nogil=True)
def _first(dst, a, c, low, p):  # pragma: no cover - compiled
    """dst = a * c + low * p (order 1 after the second modality, from the first's row a)."""
    for w in range(dst.shape[0]):
        dst[w] = a[w] * c[w] + low[w] * p[w]


@numba.njit(cache=True, nogil=True)
def coefficients(proj, const, prefix, coef):  # pragma: no cover - compiled
    """Orders 1..M of ``prod_m (const[m] + t proj[m])`` into ``coef``.

    proj, coef: (M, R, C, L) (C rows of L elements per rank); const, prefix: (M, R, L), the
    constants' rows and their running products, repeated to the row length.  ``coef[k - 1]``
    receives order k.
    """
    n, rank, chunks, _ = proj.shape
    for r in range(rank):
        for i in range(chunks):
            p0 = proj[0, r, i]
            if n == 1:
                _copy(coef[0, r, i], p0)
                continue
            for m in range(1, n):
                p = proj[m, r, i]
                c = const[m, r]
                low = prefix[m - 1, r]  # order 0 before this step
                if m == 1:
                    _times(coef[1, r, i], p0, p)
                    _first(coef[0, r, i], p0, c, low, p)
                    continue
                _times(coef[m, r, i], coef[m - 1, r, i], p)  # the top order first
                # then orders m..1 (coef[m - 1] .. coef[0]), downwards, four or two a pass
                j = m - 1
                while j >= 3:
                    below = coef[j - 4, r, i] if j >= 4 else low
                    a, b, d, e = coef[j, r, i], coef[j - 1, r, i], coef[j - 2, r, i], coef[j - 3, r, i]
                    _step4(a, b, d, e, c, below, p)
                    j -= 4
                if j >= 1:
                    _step2(coef[j, r, i], coef[j - 1, r, i], c, coef[j - 2, r, i] if j >= 2 else low, p)
                    j -= 2
                if j == 0:
                    _step(coef[0, r, i], c, low, p)


class NumbaOrders:
    """The order recursion of :func:`mmfuse._core.interactions.orders_blocked` as the compiled
    :func:`coefficients` (same interface as :class:`~mmfuse._core.interactions.NumPyOrders`)."""

    def __init__(self, const: Any, prefix: Any, tile: int, rows: int) -> None:
        self.tile = tile
        self.const = {t: np.ascontiguousarray(tiled(const, t)[:, :, 0, :]) for t in {1, tile}}
        self.prefix = {t: np.ascontiguousarray(tiled(prefix, t)[:, :, 0, :]) for t in {1, tile}}

    def __call__(self, proj: Any, coef: Any) -> None:
        n, rank, k, width = proj.shape
        t = self.tile if k % self.tile == 0 else 1
        view = (n, rank, k // t, t * width)
        coefficients(proj.reshape(view), self.const[t], self.prefix[t], coef.reshape(view))


def _compiled_dtype(arrays: list[Any]) -> bool:
    return all(getattr(a, "dtype", None) in (np.float32, np.float64) for a in arrays)


def _torch_tensor(a: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _view(a: Any) -> Any:
    """A torch CPU tensor's memory as a NumPy array (no copy); None stays None."""
    return None if a is None else a.detach().resolve_neg().numpy()


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
