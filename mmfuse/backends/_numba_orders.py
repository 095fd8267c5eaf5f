"""The compiled kernels of :mod:`mmfuse.backends._numba_interactions` (the order recursion of
the interaction terms), apart so that importing that module, which the registry does to
resolve its rows (``available()``, ``explain()``), imports no numba: the kernels load on first
use, and "auto" keeps choosing by whether the process has imported numba.

Compilation: on first use, per dtype, cached on disk where numba can
(:func:`mmfuse.backends._numba_jit.cpu_kernel`).
"""

from __future__ import annotations

from ._numba_jit import cpu_kernel

__all__ = ["coefficients"]

# Loops run over contiguous row views, with the row's own length as the bound: LLVM then
# vectorises them (indexing the 4-d arrays inside the loops, or bounding by another array's
# length, keeps it from doing so: several times slower).


@cpu_kernel
def _copy(dst, a):  # pragma: no cover - compiled
    for w in range(dst.shape[0]):
        dst[w] = a[w]


@cpu_kernel
def _times(dst, a, p):  # pragma: no cover - compiled
    """dst = a * p."""
    for w in range(dst.shape[0]):
        dst[w] = a[w] * p[w]


@cpu_kernel
def _step(dst, c, low, p):  # pragma: no cover - compiled
    """dst = dst * c + low * p (order j from orders j and j - 1 and modality m's c and p)."""
    for w in range(dst.shape[0]):
        dst[w] = dst[w] * c[w] + low[w] * p[w]


@cpu_kernel
def _step2(a, b, c, low, p):  # pragma: no cover - compiled
    """Two adjacent orders in one pass (b the lower): each from the old values, as _step."""
    for w in range(a.shape[0]):
        bw = b[w]
        a[w] = a[w] * c[w] + bw * p[w]
        b[w] = bw * c[w] + low[w] * p[w]


@cpu_kernel
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


@cpu_kernel
def _first(dst, a, c, low, p):  # pragma: no cover - compiled
    """dst = a * c + low * p (order 1 after the second modality, from the first's row a)."""
    for w in range(dst.shape[0]):
        dst[w] = a[w] * c[w] + low[w] * p[w]


@cpu_kernel
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
