r"""Array-API core of the exact interaction terms of TFN, LMF and CP fusion.

Inputs arrive validated by the public layer (:mod:`mmfuse._interactions`).  The algorithms:

- LMF and CP, ``by="order"``: per rank and output, the terms of order k are the coefficients of
  :math:`t^k` in :math:`\prod_m (c_m + t P_m)` (:math:`P_m` the projection of the features,
  :math:`c_m` the constant's row), built one modality at a time (O(M^2) elementwise products,
  no subset enumerated), then reduced over the rank.  On NumPy arrays (the ``*_numpy``
  variants) the same recursion runs in cache-sized batch blocks and reused buffers
  (:func:`orders_blocked`), rank-major so that the rank sum adds contiguous slabs; the
  recursion of a block is a primitive (:class:`NumPyOrders`, in-place ufuncs), which a
  backend may replace with a compiled kernel (``mmfuse.backends._numba_interactions``).
- LMF and CP, ``by="subset"``: a depth-first walk over the modalities multiplies each prefix
  product by :math:`c_m` (m not in S) or :math:`P_m` (m in S): 2^(M+1) products of the kept
  projections, at most M partial products alive.
- TFN: the weight is contracted one mode at a time (as :func:`mmfuse._core.fusion.tensor_fusion`
  does), each mode either with the features (m in S) or by selecting the constant's index
  (m not in S).  By order, the partial contractions are grouped by how many feature modes they
  hold (O(M^2) contractions); by subset, a depth-first walk.  The all-constant branch never
  depends on the sample, so it stays unbatched until it meets a feature.

Outside the NumPy variants only standard Array-API functions are used (matmul, reshape,
broadcasting, sum, stack, concat): NumPy, array-api-strict, PyTorch (autograd flows through),
CuPy, JAX and Dask.
Inputs are never written to and never passed through ``xp.asarray``.  A part that is
identically zero (every term but the top one when ``append_one=False``) is carried as ``None``
and materialised as zeros only in the result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from .._namespace import (
    array_namespace,
    block_budget,
    block_slices,
    in_work_dtype,
    is_dask,
    is_jax,
    is_lazy,
    low_precision,
    pinned_device,
    traced_by_dynamo,
)
from .chunks import dask_max, one_chunk, reshaped
from .fusion import Joined, flat_lowrank, mask_absent, tensor_fusion_blocks

__all__ = [
    "NumPyOrders",
    "cp_interactions",
    "cp_interactions_numpy",
    "cp_interactions_with",
    "interaction_shares",
    "labels_for",
    "lowrank_interactions",
    "lowrank_interactions_numpy",
    "lowrank_interactions_with",
    "orders_blocked",
    "subset_labels",
    "tensor_interactions",
    "tiled",
]

# Generic path: per batch block, the order recursion keeps M + 2 arrays of (rows, R h); a block
# is sized so that they stay near this many bytes (in L2 on the 2-core CI box).
_BLOCK_BYTES = 1 << 20


def subset_labels(n_modalities: int) -> list[tuple[int, ...]]:
    """The 2^M subsets of ``range(M)`` as sorted tuples: by size, then lexicographically."""
    return [s for k in range(n_modalities + 1) for s in itertools.combinations(range(n_modalities), k)]


def labels_for(by: str, n_modalities: int) -> list[Any]:
    """The labels of the parts: the orders 0..M, or the subsets (:func:`subset_labels`)."""
    return list(range(n_modalities + 1)) if by == "order" else list(subset_labels(n_modalities))


def _mask(subset: tuple[int, ...]) -> int:
    return sum(1 << m for m in subset)


def _mul(a: Any, b: Any) -> Any:
    """a * b, where ``None`` is an exact zero."""
    return None if a is None or b is None else a * b


def _add(a: Any, b: Any) -> Any:
    """a + b, where ``None`` is an exact zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _blocks(xp: Any, x: Any, width: int) -> list[slice]:
    """Batch blocks whose ``width`` elements per row fill about ``_BLOCK_BYTES``; one block on
    lazy or traced namespaces (Dask, JAX), whose schedulers handle memory, and for a batch
    traced by ``torch.compile`` or ``torch.export``, as :func:`mmfuse._core.fusion.batch_blocks`
    (the size tests fixed a dynamic batch: a graph per batch size, and exports refused; a
    review's find)."""
    batch = x.shape[0]
    if is_lazy(x) or is_dask(xp) or is_jax(xp) or batch is None or traced_by_dynamo(x):
        return [slice(None)]
    itemsize = int(xp.finfo(x.dtype).bits) // 8
    budget = block_budget(x, _BLOCK_BYTES)
    rows = max(16, budget // max(1, width * itemsize) // 16 * 16)
    return block_slices(int(batch), int(batch) if rows * 2 > batch else rows)


def order_coefficients(projs: list[Any], consts: list[Any]) -> list[Any]:
    """Coefficients of t^0 .. t^M of ``prod_m (consts[m] + t projs[m])``, elementwise.

    ``projs[m]`` (rows, W); ``consts[m]`` (1, W) or ``None`` (zero).  Coefficient 0 is
    ``prod_m consts[m]``, (1, W) or None; the others are (rows, W) or None.
    """
    coef: list[Any] = [consts[0], projs[0]]
    for p, c in zip(projs[1:], consts[1:]):
        top = len(coef)
        coef = [
            _mul(coef[0], c),
            *(_add(_mul(coef[k], c), _mul(coef[k - 1], p)) for k in range(1, top)),
            _mul(coef[top - 1], p),
        ]
    return coef


def subset_products(projs: list[Any], consts: list[Any], reduce: Callable[[Any], Any]) -> dict[int, Any]:
    """``reduce(prod_{m in S} projs[m] * prod_{m not in S} consts[m])`` for every subset S
    (keyed by its bit mask; None for a product that is zero), by a depth-first walk that
    shares prefixes (2^(M+1) products).  Each product is reduced as soon as the walk makes it,
    so only the walk's path of M + 1 (rows, W) products is held, not all 2^M of them (at
    M = 8, R h = 65536: 68 times the result's memory)."""
    out: dict[int, Any] = {}
    _walk(1, consts[0], 0, projs, consts, out, reduce)
    _walk(1, projs[0], 1, projs, consts, out, reduce)
    return out


def _walk(
    m: int, acc: Any, mask: int, projs: list[Any], consts: list[Any], out: dict[int, Any],
    reduce: Callable[[Any], Any],
) -> None:  # fmt: skip
    """One node of :func:`subset_products`' walk (a module-level function: a recursive closure
    would be a reference cycle holding every product until the garbage collector runs)."""
    if m == len(projs):
        out[mask] = None if acc is None else reduce(acc)
        return
    _walk(m + 1, _mul(acc, consts[m]), mask, projs, consts, out, reduce)
    _walk(m + 1, None if acc is None else acc * projs[m], mask | (1 << m), projs, consts, out, reduce)


def _ranked_terms(
    xp: Any,
    xs: list[Any],
    project: Callable[[Any, int, slice], tuple[Any, Any]],
    reduce: Callable[[Any], Any],
    width: int,
    out_dim: int,
    by: str,
) -> Any:
    """Shared driver of LMF and CP: per batch block, the projections, the per-part products
    (orders or subsets) and their rank reduction ``reduce`` ((n, W) -> (n, h)); (K, B, h)."""
    n = len(xs)
    labels = labels_for(by, n)
    x0 = xs[0]
    const_device = pinned_device(x0)
    # per row: the order recursion's M + 1 coefficients and a projection; the subset walk's
    # path of M + 1 products and the 2^M reduced terms (with their stack, twice)
    row_width = (n + 2) * width if by == "order" else (n + 1) * width + 2 * (1 << n) * out_dim
    joined = Joined(xp, x0.shape[0], axis=1)
    for blk in _blocks(xp, x0, row_width):
        projs, consts = zip(*(project(x[blk, ...], m, blk) for m, x in enumerate(xs)))
        rows = projs[0].shape[0]
        if by == "order":
            found = [None if t is None else reduce(t) for t in order_coefficients(list(projs), list(consts))]
        else:
            products = subset_products(list(projs), list(consts), reduce)
            found = [products[_mask(s)] for s in labels]
        terms = []
        for r in found:
            if r is None:
                terms.append(xp.zeros((rows, out_dim), dtype=x0.dtype, device=const_device))
            else:
                terms.append(r if r.shape[0] == rows else xp.broadcast_to(r, (rows, out_dim)))
        joined.add(xp.stack(terms, axis=0))
    return joined.result()


def lowrank_interactions(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """LMF's terms (K, B, h): each factor laid out as a (D_m, R h) matrix (the rank weights
    folded into the first), one GEMM per modality and block, then the recursion or the walk.
    Generic (any namespace); :func:`lowrank_interactions_numpy` is NumPy's variant."""
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):  # in float32, rounded once (as the fusion)
        return in_work_dtype(
            lowrank_interactions, xp, xs[0].dtype, xs, factors, weights, by=by, present=present,
            append_one=append_one,
        )  # fmt: skip
    if is_dask(xp):  # in one chunk, as the fusions'
        weights, *factors = one_chunk([weights, *factors])
    rank, _, out_dim = factors[0].shape
    mats = [flat_lowrank(xp, f, weights if m == 0 else None) for m, f in enumerate(factors)]
    dims = [x.shape[1] for x in xs]
    feats = [mat[: dims[m], :] for m, mat in enumerate(mats)]
    consts = [mat[dims[m] : dims[m] + 1, :] if append_one else None for m, mat in enumerate(mats)]

    def project(x: Any, m: int, blk: slice) -> tuple[Any, Any]:
        rows = None if present is None else present[blk, ...]
        return mask_absent(xp, x, rows, m) @ feats[m], consts[m]

    def reduce(t: Any) -> Any:
        return xp.sum(reshaped(xp, t, (t.shape[0], rank, out_dim)), axis=1)

    terms = _ranked_terms(xp, xs, project, reduce, rank * out_dim, out_dim, by)
    return terms, labels_for(by, len(xs))


def runs_recursion(by: str, append_one: bool) -> bool:
    """Whether an interaction-terms call runs the order recursion (:class:`NumPyOrders` or a
    backend's compiled twin): by order, with the appended constant.  Other calls (by subset,
    or without the constant) take the generic path whatever implementation was chosen, so
    the public functions weigh them as size 0 for "auto" (``CALL_SIZES``): such a call had
    imported numba (0.4 s) for a kernel it never ran (a review's find)."""
    return by == "order" and append_one


def lowrank_interactions_numpy(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """NumPy's variant: orders by :func:`orders_blocked` with NumPy's in-place recursion
    (:class:`NumPyOrders`) where the constant is appended; everything else as the generic
    path."""
    return lowrank_interactions_with(
        NumPyOrders, xs, factors, weights, by=by, present=present, append_one=append_one
    )


def lowrank_interactions_with(
    recursion: Callable[..., Any],
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
) -> tuple[Any, list[Any]]:
    """LMF's terms on NumPy arrays with the order recursion of ``recursion`` (a class like
    :class:`NumPyOrders`, e.g. a backend's compiled kernel): rank-major (R, d_m, h) factors
    (the rank weights folded into the first), :func:`orders_blocked`, the rank sum.  Other
    calls (by subset, no appended constant; no rank or no output, whose empty slabs the
    blocked recursion cannot tile) run the generic path."""
    rank, _, out_dim = factors[0].shape
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):  # in float32, rounded once
        return in_work_dtype(
            lowrank_interactions_with, xp, xs[0].dtype, recursion, xs, factors, weights, by=by,
            present=present, append_one=append_one,
        )  # fmt: skip
    if not runs_recursion(by, append_one) or rank == 0 or out_dim == 0:
        return lowrank_interactions(xs, factors, weights, by=by, present=present, append_one=append_one)
    import numpy as np

    first = factors[0] if weights is None else factors[0] * weights[:, None, None]
    dims = [x.shape[1] for x in xs]
    feats = [(first if m == 0 else f)[:, : dims[m], :] for m, f in enumerate(factors)]
    consts = [(first if m == 0 else f)[:, dims[m], :] for m, f in enumerate(factors)]

    def rank_sum(coef: Any, target: Any) -> None:
        # coef (K, R, rows, h) -> target (K, rows, h): R - 1 adds of contiguous slabs
        if coef.shape[1] == 1:
            np.copyto(target, coef[:, 0])
            return
        np.add(coef[:, 0], coef[:, 1], out=target)
        for r in range(2, coef.shape[1]):
            target += coef[:, r]

    terms = orders_blocked(recursion, xs, feats, consts, present, factors[0].shape[2], rank_sum)
    return terms, labels_for(by, len(xs))


# Per batch block, each (R, rows, H) array of orders_blocked is kept near this many bytes:
# large enough that NumPy's per-call overhead is small, small enough that the M projections
# a compiled recursion reads per block stay in L2/L3 (measured: benchmarks/interactions.py).
_ORDER_ARRAY_BYTES = 1 << 18
# Rows per tile: constant rows are tiled this many times (up to _TILE_WIDTH elements), so an
# elementwise product with a per-output constant is one long contiguous loop rather than
# one short loop per sample (NumPy's iterator cannot merge a broadcast axis).
_TILE_WIDTH = 512


def orders_blocked(
    recursion: Callable[..., Any],
    xs: list[Any],
    feats: list[Any],
    consts: list[Any],
    present: Any,
    out_dim: int,
    reduce_into: Callable[[Any, Any], None],
) -> Any:
    """The terms by order on NumPy arrays, (M + 1, B, out_dim), in batch blocks and reused
    buffers.

    ``feats[m]`` (R, d_m, H) and ``consts[m]`` (R, H): the features' and the constant's rows
    of modality m, rank-major (LMF: R ranks of H = h outputs; CP: R = 1, H = the CP rank).
    Per block of ``rows`` samples, every modality's projection (R, rows, H) is one batched
    GEMM into a reused buffer (absent samples enter as zeros); ``recursion(const, prefix,
    tile, rows)``, made once per call (:class:`NumPyOrders` or a backend's kernel) turns the M
    projections into the coefficients of orders 1..M (per rank, sample and output, of
    ``prod_m (c_m + t P_m)``); ``reduce_into(coef, target)`` writes their reduction over the
    rank axis into the (M, rows, out_dim) block of the result.  Order 0 (the product of the
    constants) does not depend on the sample: it is reduced once.
    """
    import numpy as np

    n = len(xs)
    batch = int(xs[0].shape[0])
    rank, _, width = feats[0].shape
    dtype = np.result_type(*xs, *feats)
    const = np.stack([np.asarray(c, dtype=dtype) for c in consts])  # (M, R, H)
    prefix = np.cumprod(const, axis=0)  # prefix[m] = c_0 ... c_m, in order
    f3 = [np.asarray(f, dtype=dtype) for f in feats]
    # Zeroed, not np.empty: every buffer here is a GEMM's target or operand slice, and a CI
    # run once stopped on "invalid value encountered in matmul" with finite operands and
    # finite results (reduce_into at B = 1); uninitialised memory next to or under a BLAS
    # operand is the one input that varies between runs.  The memsets cost one pass over
    # memory the recursion passes over M times.
    out = np.zeros((n + 1, batch, out_dim), dtype=dtype)
    order0 = np.zeros((1, 1, out_dim), dtype=dtype)
    reduce_into(prefix[-1].reshape(1, rank, 1, width), order0)
    out[0] = order0[0]
    tile = max(1, _TILE_WIDTH // width)  # samples per tile of the constant rows
    per_row = rank * width * dtype.itemsize
    rows = max(tile, _ORDER_ARRAY_BYTES // per_row // tile * tile)
    rows = min(rows, -(-batch // tile) * tile) if batch else tile
    run = recursion(const, prefix, tile, rows)
    size = n * rank * rows * width
    proj_buf = np.zeros(size, dtype=dtype)
    coef_buf = np.zeros(size, dtype=dtype)
    for blk in block_slices(batch, rows):
        start, stop = blk.start, blk.stop
        k = stop - start
        if k == 0:
            break
        shape = (n, rank, k, width)
        proj = proj_buf[: n * rank * k * width].reshape(shape)
        coef = coef_buf[: n * rank * k * width].reshape(shape)
        for m, x in enumerate(xs):
            x = x[start:stop]
            if present is not None:  # absent samples enter as zeros (where: NaN-safe)
                x = np.where(np.asarray(present[start:stop, m : m + 1]), x, 0)
            np.matmul(x, f3[m], out=proj[m])
        run(proj, coef)
        reduce_into(coef, out[1:, start:stop])
    return out


def tiled(a: Any, tile: int) -> Any:
    """(M, R, H) per-output rows as views that broadcast against blocks viewed as
    (M, R, rows / tile, tile H): each row repeated ``tile`` times along the last axis
    (``tile = 1``: (M, R, 1, H), against (M, R, rows, H))."""
    import numpy as np

    if tile == 1:
        return a[:, :, None, :]
    n, rank, width = a.shape
    return np.tile(a, (1, 1, tile)).reshape(n, rank, 1, tile * width)


class NumPyOrders:
    """NumPy's order recursion on one batch block: in-place ufuncs into a reused buffer.

    Made once per call by :func:`orders_blocked` with the constants ``const`` (M, R, H), their
    running products ``prefix`` (M, R, H) and the tile size; called per block with the
    projections ``proj`` (M, R, rows, H) and the output ``coef`` (M, R, rows, H), where
    ``coef[k - 1]`` receives the coefficient of order k.  A step (modality m) updates every
    coefficient with one call per operation (the orders 2..m as one call over a slab), so the
    Python overhead per block grows with M, not M^2.  The per-output constants are tiled
    (:func:`tiled`) so that their products are long contiguous loops.
    """

    def __init__(self, const: Any, prefix: Any, tile: int, rows: int) -> None:
        import numpy as np

        n, rank, width = const.shape
        self.tile = tile
        self.const = {t: tiled(const, t) for t in {1, tile}}
        self.prefix = {t: tiled(prefix, t) for t in {1, tile}}
        self.tmp = np.empty((n - 1) * rank * rows * width, dtype=const.dtype)

    def __call__(self, proj: Any, coef: Any) -> None:
        import numpy as np

        n, rank, k, width = proj.shape
        if n == 1:
            np.copyto(coef, proj)
            return
        t = self.tile if k % self.tile == 0 else 1
        view = (rank, k // t, t * width)
        proj = proj.reshape(n, *view)
        coef = coef.reshape(n, *view)
        const, prefix = self.const[t], self.prefix[t]
        tmp = self.tmp[: (n - 1) * rank * k * width].reshape(n - 1, *view)
        p0 = proj[0]
        for m in range(1, n):
            p, c = proj[m], const[m]
            # new order j = c * (order j) + p * (order j - 1) for j = 1..m + 1, where order 0
            # is prefix[m - 1] and order m + 1 starts at zero; coef[j - 1] holds order j, and
            # after step 1 the order-1 coefficient of the first modality alone is p0
            np.multiply(p0 if m == 1 else coef[m - 1], p, out=coef[m])  # the top order first
            if m >= 2:
                np.multiply(coef[: m - 1], p, out=tmp[1:m])
            np.multiply(p, prefix[m - 1], out=tmp[0])
            if m == 1:
                np.multiply(p0, c, out=coef[0])
            else:
                coef[:m] *= c
            coef[:m] += tmp[:m]


def cp_interactions(
    xs: list[Any],
    cp: tuple[Any, list[Any]],
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """CP's terms (K, B, h): (B, R) projections, the recursion or the walk over them, then one
    (R, h) product with the weighted output factor per part.  Generic (any namespace);
    :func:`cp_interactions_numpy` is NumPy's variant."""
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):  # in float32, rounded once (as the fusion)
        return in_work_dtype(
            cp_interactions, xp, xs[0].dtype, xs, cp, by=by, present=present, append_one=append_one
        )
    weights, factors = cp
    if is_dask(xp):  # in one chunk, as the fusions'
        weights, *factors = one_chunk([weights, *factors])
    out_factor = factors[-1]
    out_dim = out_factor.shape[0]
    out_t = xp.matrix_transpose(out_factor if weights is None else out_factor * weights)  # (R, h)
    dims = [x.shape[1] for x in xs]
    feats = [a[: dims[m], :] for m, a in enumerate(factors[:-1])]
    consts = [a[dims[m] : dims[m] + 1, :] if append_one else None for m, a in enumerate(factors[:-1])]

    def project(x: Any, m: int, blk: slice) -> tuple[Any, Any]:
        rows = None if present is None else present[blk, ...]
        return mask_absent(xp, x, rows, m) @ feats[m], consts[m]

    def reduce(t: Any) -> Any:
        return t @ out_t

    terms = _ranked_terms(xp, xs, project, reduce, out_factor.shape[1], out_dim, by)
    return terms, labels_for(by, len(xs))


def cp_interactions_numpy(
    xs: list[Any],
    cp: tuple[Any, list[Any]],
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """NumPy's variant: orders by :func:`orders_blocked` with NumPy's in-place recursion
    where the constant is appended."""
    return cp_interactions_with(NumPyOrders, xs, cp, by=by, present=present, append_one=append_one)


def cp_interactions_with(
    recursion: Callable[..., Any],
    xs: list[Any],
    cp: tuple[Any, list[Any]],
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
) -> tuple[Any, list[Any]]:
    """CP's terms on NumPy arrays with the order recursion of ``recursion``: the CP rank as
    the width of one rank-major slab (R = 1), :func:`orders_blocked`, one GEMM per block with
    the weighted output factor.  Other calls (and those with no CP rank or no output, whose
    empty slabs the blocked recursion cannot tile) run the generic path."""
    out_dim, rank = cp[1][-1].shape
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):  # in float32, rounded once
        return in_work_dtype(
            cp_interactions_with, xp, xs[0].dtype, recursion, xs, cp, by=by, present=present,
            append_one=append_one,
        )  # fmt: skip
    if not runs_recursion(by, append_one) or rank == 0 or out_dim == 0:
        return cp_interactions(xs, cp, by=by, present=present, append_one=append_one)
    import numpy as np

    weights, factors = cp
    out_factor = factors[-1]
    out_t = np.asarray(out_factor if weights is None else out_factor * weights).T  # (R, h)
    dims = [x.shape[1] for x in xs]
    feats = [a[None, : dims[m], :] for m, a in enumerate(factors[:-1])]
    consts = [a[None, dims[m], :] for m, a in enumerate(factors[:-1])]

    def reduce_into(coef: Any, target: Any) -> None:
        np.matmul(coef[:, 0], out_t, out=target)

    terms = orders_blocked(recursion, xs, feats, consts, present, out_factor.shape[0], reduce_into)
    return terms, labels_for(by, len(xs))


# --------------------------------------------------------------------------- TFN


def _contract(xp: Any, x: Any, g: Any, batched: bool, d: int) -> Any:
    """The features' contraction of mode ``g``'s axis 1: (B, rest) from g (b, D, rest)."""
    if not batched:
        return x @ g[0, :d, :]  # one GEMM: the part does not depend on the sample yet
    return (x[:, None, :] @ g[:, :d, :])[:, 0, :]


def _tfn_walk(
    m: int,
    g: Any,
    batched: bool,
    mask: int,
    n: int,
    split: Callable[[Any, bool, int], tuple[Any, Any]],
    out: dict[int, Any],
) -> None:
    """One node of TFN's walk over the subsets: mode m at the constant's index, or contracted
    with the features (module level, so that no reference cycle keeps the parts alive)."""
    if m == n:
        out[mask] = g
        return
    const, feat = (None, None) if g is None else split(g, batched, m)
    _tfn_walk(m + 1, const, batched, mask, n, split, out)
    _tfn_walk(m + 1, feat, True, mask | (1 << m), n, split, out)


def tensor_interactions(
    xs: list[Any],
    weight: Any,
    *,
    by: str = "order",
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[Any, list[Any]]:
    """TFN's terms (K, B, h) by mode-by-mode contraction, each mode with the features or at the
    constant's index.

    The batch is contracted in the blocks of :func:`mmfuse._core.fusion.tensor_fusion_blocks`,
    as :func:`mmfuse._core.fusion.tensor_fusion`'s, so that no intermediate holds
    more than ``max_elements`` elements (the public layer has refused a problem where one
    sample's would); ``None``: the whole batch at once."""
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):  # in float32, rounded once (as the fusion)
        return in_work_dtype(
            tensor_interactions, xp, xs[0].dtype, xs, weight, by=by, append_one=append_one,
            max_elements=max_elements,
        )  # fmt: skip
    if is_dask(xp):  # in one chunk, as the fusion's: its reshapes would split the batch's
        (weight,) = one_chunk([weight])
    n = len(xs)
    batch = xs[0].shape[0]
    dims = tuple(weight.shape[:-1])
    out_dim = weight.shape[-1]
    blocks = None if max_elements is None else tensor_fusion_blocks(xp, xs[0], dims, out_dim, max_elements)
    if blocks is not None:
        joined = Joined(xp, batch, axis=1)
        for blk in blocks:
            terms, _ = tensor_interactions([x[blk, ...] for x in xs], weight, by=by, append_one=append_one)
            joined.add(terms)
        return joined.result(), labels_for(by, n)
    sizes = [x.shape[1] for x in xs]

    def split(g: Any, batched: bool, m: int) -> tuple[Any, Any]:
        """(constant's slice, features' contraction) of mode m, each (b, D_{m+1}, rest)."""
        lead = dims[m + 1] if m + 1 < n else out_dim
        # the rest's size over lead, formed without dividing (an empty output width, h = 0)
        tail = math.prod(dims[m + 2 :]) * out_dim if m + 1 < n else 1
        d = sizes[m]
        const = g[:, d, :] if append_one else None
        feat = _contract(xp, xs[m], g, batched, d)
        shape_c = (g.shape[0], lead, tail)
        shape_f = (batch, lead, tail)
        return (None if const is None else reshaped(xp, const, shape_c)), reshaped(xp, feat, shape_f)

    start = xp.reshape(weight, (1, dims[0], math.prod(dims[1:]) * out_dim))
    if by == "order":
        # groups[k]: the sum over subsets of the contracted modes with k features, and whether
        # it depends on the sample (only group 0 does not)
        groups: list[tuple[Any, bool]] = [(start, False)]
        for m in range(n):
            pieces = [split(g, b, m) if g is not None else (None, None) for g, b in groups]
            new: list[tuple[Any, bool]] = [(pieces[0][0], groups[0][1])]
            for k in range(1, len(groups)):
                new.append((_add(pieces[k][0], pieces[k - 1][1]), True))
            new.append((pieces[-1][1], True))
            groups = new
        found = [g for g, _ in groups]
    else:
        out: dict[int, Any] = {}
        _tfn_walk(0, start, False, 0, n, split, out)
        found = [out[_mask(s)] for s in subset_labels(n)]
    terms = []
    for g in found:
        if g is None:
            terms.append(xp.zeros((batch, out_dim), dtype=weight.dtype, device=pinned_device(weight)))
        else:
            g = xp.reshape(g, (g.shape[0], out_dim))
            terms.append(g if g.shape[0] == batch else xp.broadcast_to(g, (batch, out_dim)))
    return xp.stack(terms, axis=0), labels_for(by, n)


# --------------------------------------------------------------------------- shares


def _largest_about_one(xp: Any, terms: Any) -> Any:
    """``terms`` times the power of two that brings its largest magnitude into [1, 2) (exact;
    within the dtype's normal range, and unscaled where that is 0 or not finite)."""
    big = (dask_max if is_dask(xp) else xp.max)(xp.abs(terms))  # (Dask's own: see dask_max)
    usable = xp.isfinite(big) & (big > 0)
    # 2**emax and 2**-emax normal: finfo's maxexp where the namespace gives it (NumPy's long
    # double reaches 2**16383: capped at float64's 1022, its terms of 1e3000 gave NaN; a
    # review's find), else by the bits (the standard's finfo has no exponents)
    maxexp = getattr(xp.finfo(terms.dtype), "maxexp", None)
    emax = int(maxexp) - 2 if maxexp else 126 if xp.finfo(terms.dtype).bits <= 32 else 1022
    k = xp.floor(xp.log2(xp.where(usable, big, 1.0)))
    k = xp.where(k > emax, float(emax), xp.where(k < -emax, float(-emax), k))  # (no clip before 2023.12)
    return terms * 2.0 ** (-k)


def interaction_shares(terms: Any, *, kind: str = "variance") -> Any:
    """(K,) shares: <T_k - mean, y - mean> / <y - mean, y - mean> (``"variance"``) or
    <T_k, y> / <y, y> (``"norm"``), with y = sum_k T_k, summed over samples and outputs;
    NaN where the denominator is zero.  float16 / bfloat16 are computed in float32 and rounded
    once (sums of squares overflow float16's 65504 long before the shares do)."""
    xp = array_namespace(terms)
    if terms.shape[0] == 0:  # no term: no share
        return xp.zeros((0,), dtype=terms.dtype, device=pinned_device(terms))
    if terms.shape[1] == 0 or terms.shape[2] == 0:  # no sample or no output: nothing to share
        return xp.full((terms.shape[0],), math.nan, dtype=terms.dtype, device=pinned_device(terms))
    if low_precision(xp, terms.dtype):
        return in_work_dtype(interaction_shares, xp, terms.dtype, terms, kind=kind)
    # The shares do not depend on the terms' scale: rescaled by a power of two (exact) so that
    # the largest is about 1, the sums of squares neither overflow nor underflow (float32
    # terms of 1e18 gave NaN or silently zero shares, of 1e-25 all NaN)
    terms = _largest_about_one(xp, terms)
    if kind == "variance":
        # each term centred before the sum (centring y = sum_k T_k came after a constant term
        # of 1 had absorbed varying ones of 1e-10: shares off by 1e-7, or NaN), by a corrected
        # two-pass: the second mean gives back what the first rounded away (a term whose spread
        # is a few ulps of its mean, 1e12 + 1e-3 noise, lost most of its deviations: shares
        # and gradients off by 1e7 ulps)
        dev = terms - xp.mean(terms, axis=1, keepdims=True)
        # and rescaled again: the deviations are what is squared, and beside a constant term
        # 1e24 times their size (float32; 1e300 in float64) they had underflowed, all NaN (a
        # review's find).  (The first scaling keeps the means from overflowing.)
        terms = _largest_about_one(xp, dev - xp.mean(dev, axis=1, keepdims=True))
    y = xp.sum(terms, axis=0)
    num = xp.sum(terms * y, axis=(1, 2))
    den = xp.sum(y * y)
    zero = den == 0
    safe = xp.where(zero, xp.ones_like(den), den)
    return xp.where(zero, xp.full_like(num, math.nan), num / safe)
