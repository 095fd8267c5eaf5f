"""Array-API core of the CP outer-product fusions (TFN, LMF, CP).

Inputs arrive validated by the public layer (:mod:`mmfuse._fusion`).  Only standard Array-API
functions are used (matmul, reshape, permute_dims, broadcasting), so the same code runs on
NumPy, array-api-strict, PyTorch (autograd flows through), CuPy, JAX and Dask.  Inputs are never
written to and never passed through ``xp.asarray`` (which would detach torch gradients).
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache, partial
from typing import Any

import numpy as np

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
from .chunks import one_chunk, reshaped

__all__ = [
    "Joined",
    "affine",
    "batch_blocks",
    "cp_fusion",
    "cp_to_lowrank",
    "flat_lowrank",
    "lowrank_fusion",
    "lowrank_fusion_dask",
    "lowrank_fusion_numpy",
    "lowrank_to_tensor",
    "lowrank_whole_batch",
    "lowrank_with",
    "mask_absent",
    "rank_sum",
    "tensor_fusion",
    "tensor_fusion_blocks",
    "tensor_fusion_rows",
    "whole_batch",
]

# A batch block's per-modality intermediate (rows x R*h) is kept near this many bytes so that
# the product and the rank sum read it from cache (the 2-core CI box has 1-2 MiB of L2 per core).
_BLOCK_BYTES = 1 << 21


@lru_cache(maxsize=256)
def block_rows(batch: int, width: int, itemsize: int, budget: int = _BLOCK_BYTES) -> int:
    """Rows per batch block so that a block's ``width`` elements per row fill about ``budget``
    bytes; the whole batch when two blocks would hold it.  A multiple of 256 rows, so that the
    tiled constant-row add (:func:`_add_row`) applies to every full block whenever R h divides
    256 (the narrow case it is for)."""
    rows = max(256, budget // max(1, width * itemsize) // 256 * 256)
    return batch if rows * 2 > batch else rows


def batch_blocks(xp: Any, x: Any, width: int) -> list[slice]:
    """Slices of the batch axis so each block's (rows, width) intermediate stays in cache.

    Lazy and traced namespaces (Dask, JAX) get one block: their own schedulers handle memory,
    and Python loops over blocks would only enlarge their graphs.  So does a batch traced by
    ``torch.compile`` or ``torch.export`` (:func:`tensor_fusion_blocks` says why).
    """
    batch = x.shape[0]
    if is_lazy(x) or is_dask(xp) or is_jax(xp) or batch is None or traced_by_dynamo(x):
        return [slice(None)]
    itemsize = _itemsize(xp, x.dtype)
    rows = block_rows(int(batch), width, itemsize, block_budget(x, _BLOCK_BYTES))
    return block_slices(int(batch), rows)


def _itemsize(xp: Any, dtype: Any) -> int:
    return int(xp.finfo(dtype).bits) // 8


# The constant row of ``[x, 1] @ mat`` costs either a copy of x into a buffer that ends in a
# column of ones (n (d + 1) elements) or an add of mat's last row after the GEMM (n W elements
# for a product of width W): the copy only where the add would move more, and not for small
# products, where the add is one ufunc call against the copy's three (NumPy, 2-core CI box:
# whole-batch low-rank fusion at (64, (16, 16, 16), 16, 8) 50 -> 38 us, (32, (32, 32, 128),
# 128, 16) 1.27 -> 1.14 ms; at 4096 output elements the two forms are about even).
_STAGE_MIN_ELEMENTS = 4096


def stage_constant(width: int, d: int, elements: int) -> bool:
    """Whether the NumPy paths append the constant to x before the GEMM (width ``width``,
    ``d`` features, ``elements`` in the product) rather than add mat's last row after it."""
    return width > d and elements >= _STAGE_MIN_ELEMENTS


def stage_stacked(d: int, elements: int) -> bool:
    """Whether a stack of R (d + 1, h) matrices against a 2-D x (the whole-batch low-rank
    projections, ``elements`` = B R h) is staged below :func:`stage_constant`'s sizes.

    There the add costs more than elsewhere: it broadcasts an (R, 1, h) row over the batch,
    R B inner loops of h elements each, and the GEMM reads the strided (R, d, h) slice of
    mat, so that small products pay more for the add than for the copy.  Staged over added
    (2-core CI box, ``timeit``, min of 7), (B, R, h) = (4, 2, 2) and (16, 4, 8): 0.80 and
    0.73 at d = 3, 0.86 and 0.83 at d = 32, 0.91 and 0.93 at d = 128, 1.02 and 1.07 at
    d = 512 (the tiny ``lowrank_fusion`` of ``benchmarks/overhead.py``: 1.51 -> 1.44).  Larger
    products keep :func:`stage_constant`'s rule: there the copy's cost depends on the BLAS
    (B = 4096, R h = 64: 0.89 at d = 32, 2.07 at d = 64; B = 16384, R h = 16: 1.22-1.45).
    """
    return elements < _STAGE_MIN_ELEMENTS and d <= 128


def affine(x: Any, mat: Any, append_one: bool) -> Any:
    """``hat x @ mat`` with ``hat x = [x, 1]``.

    ``mat`` has ``d + 1`` rows when ``append_one`` (the last row is the constant's) and ``d``
    rows otherwise.  Works batched: ``mat`` may carry leading batch dimensions.  NumPy builds
    ``hat x`` where that is cheaper (:func:`stage_constant`, :func:`stage_stacked`), else adds
    the constant's row to the product; the other namespaces never build it.
    """
    if not append_one:
        return x @ mat
    d = x.shape[-1]
    if type(x) is np.ndarray:  # the common tiny call first: one type comparison, no torch check
        # (the product's width per row of x: mat is (d + 1, W), or a stack of R such matrices
        # against a 2-D x, or one per row of a 3-D x; a stack's own rule, then the size
        # before stage_constant: a tiny 2-D call pays two comparisons, no function call)
        stacked = mat.ndim == 3 and x.ndim == 2
        width = mat.shape[-1] * mat.shape[0] if stacked else mat.shape[-1]
        if d and (
            (stacked and stage_stacked(d, x.shape[0] * width))
            or (x.size * width >= _STAGE_MIN_ELEMENTS * d and stage_constant(width, d, x.size // d * width))
        ):
            hat = np.empty((*x.shape[:-1], d + 1), dtype=x.dtype)
            hat[..., :d] = x
            hat[..., d] = 1
            return hat @ mat
        if mat.ndim == 2:  # (plain slices: an Ellipsis index costs twice as much, 0.15 us a modality)
            out = x @ mat[:d]
            out += mat[d]
        else:
            out = x @ mat[..., :d, :]
            out += mat[..., d : d + 1, :]  # the product's own buffer (x and mat are never written)
        return out
    # isinstance, not is_torch(xp): Dynamo traces this line (None: see half_imported)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor is not None and isinstance(x, tensor) and mat.ndim in (2, 3) and x.ndim <= mat.ndim:
        torch = sys.modules["torch"]
        # Delegation: torch's addmm / baddbmm add the constant row inside the product, one
        # operator where the generic form below dispatches four (two slices, the product, the
        # sum): at small sizes each is a few microseconds of fixed cost.  The same sum, its
        # last bit may differ.  Not a 2-D x against a stack of R matrices: baddbmm would take
        # x expanded to (R, B, d), a view whose gradient it forms whole, R times x's size,
        # before summing it (B = 16384, d = 2048, R = 16: 2.2 GB; a review's find), where
        # matmul below folds the stack.
        if mat.ndim == 2:
            return torch.addmm(mat[d], x, mat[:d])
        if x.ndim == 3 and x.shape[0] == mat.shape[0]:
            return torch.baddbmm(mat[:, d : d + 1], x, mat[:, :d])
    return x @ mat[..., :d, :] + mat[..., d : d + 1, :]


def mask_absent(xp: Any, x: Any, present: Any, m: int) -> Any:
    """Zero the features of samples whose modality ``m`` is absent (NaN-safe: ``where``)."""
    if present is None:
        return x
    zero = xp.zeros((), dtype=x.dtype, device=pinned_device(x))
    return xp.where(present[:, m : m + 1], x, zero)


class Joined:
    """The per-block results of a batched computation, joined along ``axis`` (the batch's
    axis in them) into one array of ``size`` along it: :meth:`add` each block's in order,
    then :meth:`result`.

    NumPy blocks are written into the result as they come, so the peak is the result and a
    block: a list of blocks joined at the end had held them all and their join, twice the
    result (a review's find, with tracemalloc: 32 MiB beyond a 32 MiB output of cp-mode
    sequence fusion).  Other namespaces' blocks are concatenated at the end (torch's
    autograd and JAX take no writes into a result).  One block is returned as it is.
    """

    def __init__(self, xp: Any, size: int, axis: int = 0) -> None:
        self.xp, self.size, self.axis = xp, size, axis
        self.parts: list[Any] = []
        self.out: Any = None
        self.at = 0

    def add(self, part: Any) -> None:
        n = part.shape[self.axis]
        if type(part) is np.ndarray and (self.out is not None or n < self.size):
            if self.out is None:
                shape = list(part.shape)
                shape[self.axis] = self.size
                self.out = np.empty(shape, dtype=part.dtype)
            self.out[(slice(None),) * self.axis + (slice(self.at, self.at + n),)] = part
        else:
            self.parts.append(part)
        self.at += n

    def result(self) -> Any:
        if self.out is not None:
            return self.out
        return self.parts[0] if len(self.parts) == 1 else self.xp.concat(self.parts, axis=self.axis)


def tensor_fusion_rows(xp: Any, x: Any, dims: tuple[int, ...], out_dim: int, max_elements: int) -> int | None:
    """Samples per batch block of :func:`tensor_fusion`, so that a block's intermediates hold
    at most ``max_elements`` elements (at least one sample a block); None: the whole batch is
    one block.

    The block bounds memory, not the batch size: the intermediates grow with the batch while
    the weight does not, so a large batch with a small weight runs in several blocks.  Lazy
    and traced namespaces (Dask, JAX) get one block, as in :func:`batch_blocks`: their own
    schedulers handle memory, and Python loops over blocks would only enlarge their graphs.
    """
    # torch tensors first, by type: never lazy, and array_api_compat's (lru-cached) checks
    # would warn under torch.compile, which traces this for the layers' compiled path
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    is_tensor = tensor is not None and isinstance(x, tensor)
    if not is_tensor and (is_lazy(x) or is_dask(xp) or is_jax(xp) or x.shape[0] is None):
        return None
    # (an output width of 0 makes every intermediate empty: one block)
    return max(1, max_elements // max(1, *intermediate_sizes(1, dims, out_dim)))


def tensor_fusion_blocks(
    xp: Any, x: Any, dims: tuple[int, ...], out_dim: int, max_elements: int
) -> list[slice] | None:
    """The batch blocks of :func:`tensor_fusion_rows` samples for inputs like ``x``, or None
    where the whole batch is one block (the contractions of :func:`tensor_fusion` and of
    :func:`mmfuse._core.interactions.tensor_interactions`).

    A traced batch (under ``torch.compile``, whose Dynamo takes a symbolic size for an int,
    and under ``torch.export``) is one block: a graph for every batch size cannot loop over
    a count of blocks that depends on it, and comparing the batch with the rows guarded the
    graph to ``B <= rows`` (``torch.export`` with an unbounded batch failed; dynamic
    compilation made a graph per batch size above it; a review of program capture).
    ``max_elements`` then bounds nothing there: the compiled program's memory is the whole
    batch's."""
    rows = tensor_fusion_rows(xp, x, dims, out_dim, max_elements)
    if rows is None or not isinstance(x.shape[0], int) or traced_by_dynamo(x) or rows >= x.shape[0]:
        return None
    return block_slices(int(x.shape[0]), rows)


def _contract(xp: Any, xs: list[Any], weight: Any, append_one: bool) -> Any:
    """One block of :func:`tensor_fusion`, without the bias: mode by mode, or as the outer
    product of the modalities and one GEMM (:func:`outer_first`, :func:`_contract_outer`)."""
    batch = xs[0].shape[0]
    dims = tuple(weight.shape[:-1])
    if outer_first(xs[0], dims, weight.shape[-1]):
        return _contract_outer(xp, xs, weight, append_one)
    # Mode 1 is one GEMM: (B, d_1) @ (D_1, D_2...D_M h).
    t = affine(xs[0], xp.reshape(weight, (dims[0], math.prod(weight.shape[1:]))), append_one)
    for m in range(1, len(xs)):
        # Modes 2..M are batched matrix-vector products: (B, 1, D_m) @ (B, D_m, rest).
        # explicit sizes, not -1: an empty batch leaves -1 undetermined
        t = reshaped(xp, t, (batch, dims[m], math.prod(weight.shape[m + 1 :])))
        t = affine(xs[m][:, None, :], t, append_one)[:, 0, :]
    return t


# NumPy's mode-by-mode contraction (its batched matrix products loop in C) was the faster one
# up to about this many elements in its first intermediate even where D_1 <= h (2-core CI box,
# float32: (256, (8, 8, 8), 16) 0.23 against 0.34 ms, (64, (32, 32), 64) 0.13 against 0.17),
# the outer product above ((1024, (4, 8, 16), 32) 1.2 against 2.7 ms, (1024, (16, 16, 16), 32)
# 6.6 against 8.2).
_NUMPY_OUTER_ELEMENTS = 1 << 20


def outer_first(x: Any, dims: tuple[int, ...], out_dim: int) -> bool:
    """Whether a block of :func:`tensor_fusion` (inputs like ``x``, weight D_1 x ... x D_M x
    h) builds the outer product first (:func:`_contract_outer`): where D_1 <= h, and on NumPy
    only where the mode-by-mode form's first intermediate has at least
    :data:`_NUMPY_OUTER_ELEMENTS` elements."""
    if dims[0] > out_dim or math.prod(dims) == 0:
        # (a modality of no features makes Z empty while the product of the ones before it is
        # not: the mode-by-mode form's bound would not hold for that partial product)
        return False
    return type(x) is not np.ndarray or x.shape[0] * math.prod(dims[1:]) * out_dim >= _NUMPY_OUTER_ELEMENTS


def _contract_outer(xp: Any, xs: list[Any], weight: Any, append_one: bool) -> Any:
    """``(hat x_1 (x) ... (x) hat x_M) @ W`` for a block, W flattened to (D_1...D_M, h).

    Mode by mode, the first intermediate (B, D_2...D_M h) holds h / D_1 times the outer
    product's B D_1...D_M elements and the later modes are batched matrix-vector products;
    where D_1 <= h the outer product, built modality by modality (each step one broadcast
    product), is the smaller and its contraction one GEMM (torch CPU, (1024, (16, 16, 16), 32):
    2.8 against 13 ms; (1024, (4, 8, 16), 32): 0.35 against 1.85 ms).  Every intermediate is
    at most the outer product, within the mode-by-mode form's bound (:func:`intermediate_sizes`).
    """
    batch = xs[0].shape[0]

    def hat(x: Any) -> Any:
        if not append_one:
            return x
        one = xp.ones((batch, 1), dtype=x.dtype, device=pinned_device(x))
        return xp.concat([x, one], axis=1)

    z = hat(xs[0])
    for x in xs[1:]:
        h = hat(x)
        width, d = z.shape[1], h.shape[1]
        z = xp.reshape(xp.reshape(z, (batch, width, 1)) * xp.reshape(h, (batch, 1, d)), (batch, width * d))
    return z @ xp.reshape(weight, (math.prod(weight.shape[:-1]), weight.shape[-1]))


def tensor_fusion(
    xs: list[Any],
    weight: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    max_elements: int,
) -> Any:
    """Contract ``weight`` with one modality at a time, or, where it is the smaller, build the
    outer product of the modalities and contract it in one GEMM (:func:`outer_first`).

    After contracting modes ``1..m`` the intermediate has shape ``(rows, D_{m+1} ... D_M h)``
    for a batch block of ``rows`` samples (:func:`tensor_fusion_rows`), so none exceeds
    ``max_elements``; the outer product, taken only where D_1 <= h, is no larger than the
    first of them.  The public layer has already refused a problem where one block (one
    sample, or the whole batch where it is one block) would exceed it.

    float16 / bfloat16 are computed in float32 and rounded once, as the other fusions (a
    mode's partial contraction overflows float16's 65504 long before the result does).
    """
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):
        return in_work_dtype(
            tensor_fusion, xp, xs[0].dtype, list(xs), weight, bias, append_one=append_one,
            max_elements=max_elements,
        )  # fmt: skip
    if is_dask(xp):  # in one chunk: a chunked weight split the output's h (and the graph grew)
        weight, bias = one_chunk([weight, bias])
    blocks = tensor_fusion_blocks(xp, xs[0], tuple(weight.shape[:-1]), weight.shape[-1], max_elements)
    if blocks is None:
        t = _contract(xp, xs, weight, append_one)
    else:
        # the weight laid out row-major once (a view where it already is): each block's
        # reshapes of a strided weight had copied it again (a Fortran-ordered one took 2.3x the
        # time at 97 blocks; a review's find)
        weight = xp.reshape(xp.reshape(weight, (-1,)), weight.shape)
        joined = Joined(xp, xs[0].shape[0])
        for blk in blocks:
            joined.add(_contract(xp, [x[blk, ...] for x in xs], weight, append_one))
        t = joined.result()
        if bias is not None and type(t) is np.ndarray:  # in the blocks' own output, not a copy
            t += bias
            return t
    if bias is not None:
        t = t + bias
    return t


def flat_lowrank(xp: Any, factor: Any, scale: Any = None) -> Any:
    """(R, D, h) factor -> (D, R*h) matrix, optionally scaling rank r by ``scale[r]``."""
    rank, rows, out = factor.shape
    if scale is not None:
        factor = factor * scale[:, None, None]
    return xp.reshape(xp.permute_dims(factor, (1, 0, 2)), (rows, rank * out))


# --------------------------------------------------------------------------- low-rank fusion
#
# The algorithm (lowrank_with) is written once: rank weights folded into the first factor,
# each factor laid out as a (D_m, R h) matrix, per batch block one GEMM per modality with
# the constant row (absent modalities entering as zeros), the product across modalities and
# the rank sum.  A *run* supplies the primitives for one call: the blocks, ``project``,
# ``multiply``, ``rank_sum`` and ``result``.  The generic run (any namespace) returns new
# arrays; NumPy's reuses cache-sized buffers and writes the rank sums into the output.


class _GenericRun:
    """Array-API primitives: new arrays per block, concatenated at the end."""

    def __init__(
        self, xp: Any, xs: list[Any], mats: list[Any], rank: int, out_dim: int, append_one: bool
    ) -> None:
        self.xp, self.rank, self.out_dim, self.append_one = xp, rank, out_dim, append_one
        self.blocks = batch_blocks(xp, xs[0], rank * out_dim)
        self.joined = Joined(xp, xs[0].shape[0])

    def project(self, m: int, blk: slice, feats: Any, mat: Any) -> Any:
        return affine(feats, mat, self.append_one)

    def multiply(self, acc: Any, proj: Any) -> Any:
        return acc * proj

    def rank_sum(self, blk: slice, acc: Any) -> None:
        xp = self.xp
        # the block's rows named, not -1: undetermined when R h = 0 (JAX refuses it)
        self.joined.add(xp.sum(xp.reshape(acc, (acc.shape[0], self.rank, self.out_dim)), axis=1))

    def result(self) -> Any:
        return self.joined.result()


class _NumPyRun:
    """NumPy primitives: cache-sized buffers reused by every block, in-place products.

    Each modality's ``[x, 1] @ mat`` runs as one GEMM into a preallocated buffer (the
    constant column is written into a small staging block, so the constant row is part of
    the GEMM rather than an extra pass), the product accumulates in place and the rank sum
    writes straight into the output.  No (B, R h) array is ever allocated.
    """

    def __init__(
        self, xp: Any, xs: list[Any], mats: list[Any], rank: int, out_dim: int, append_one: bool
    ) -> None:
        batch = xs[0].shape[0]
        dtype = np.result_type(*xs, *mats)
        width = rank * out_dim
        row_bytes = (sum(x.shape[1] + 1 for x in xs) + 2 * width) * dtype.itemsize
        rows = block_rows(batch, row_bytes, 1)
        self.rank, self.out_dim, self.append_one = rank, out_dim, append_one
        self.blocks = block_slices(batch, rows)
        # A rank sum over a short trailing axis is a slow strided reduction in NumPy; as a GEMM
        # with stacked identities (R h x h) it costs R h^2 per row, cheap while h is small.
        self.summer = np.tile(np.eye(out_dim, dtype=dtype), (rank, 1)) if out_dim <= 8 else None
        self.out = np.empty((batch, out_dim), dtype=dtype)
        self.acc = np.empty((rows, width), dtype=dtype)
        self.proj = np.empty((rows, width), dtype=dtype)
        # The constant row: a staging block ending in a column of ones, or an add after the
        # GEMM (stage_constant)
        self.staged = [
            np.ones((rows, x.shape[1] + 1), dtype=dtype)
            if append_one and stage_constant(width, x.shape[1], rows * width)
            else None
            for x in xs
        ]

    def project(self, m: int, blk: slice, feats: Any, mat: Any) -> Any:
        n = blk.stop - blk.start
        d = feats.shape[1]
        target = self.acc[:n] if m == 0 else self.proj[:n]
        buf = self.staged[m]
        if buf is not None:
            buf[:n, :d] = feats
            np.matmul(buf[:n], mat, out=target)
        elif self.append_one:
            np.matmul(feats, mat[:d], out=target)
            _add_row(target, mat[d])
        else:
            np.matmul(feats, mat, out=target)
        return target

    def multiply(self, acc: Any, proj: Any) -> Any:
        acc *= proj  # our own buffer
        return acc

    def rank_sum(self, blk: slice, acc: Any) -> None:
        out = self.out[blk]
        if self.summer is not None:
            with np.errstate(invalid="ignore"):  # inf * 0: handled below, not the caller's
                np.matmul(acc, self.summer, out=out)
            finite = np.isfinite(out).all(axis=1)
            if finite.all():
                return
            # an inf in acc met the GEMM's zeros (inf * 0 = NaN) and spread NaN to the sample's
            # other outputs: those samples again as the sum itself, which keeps inf where it
            # is.  Those alone: the block's other samples keep the GEMM's sums (redone as sums
            # too, their last bits changed with a neighbour's inf; a review's find)
            bad = (~finite).nonzero()[0]
            out[bad] = acc[bad].reshape(len(bad), self.rank, self.out_dim).sum(axis=1)
            return
        np.sum(acc.reshape(acc.shape[0], self.rank, self.out_dim), axis=1, out=out)

    def result(self) -> Any:
        return self.out


# Problems whose (R, B, h) projections hold at most this many elements run whole-batch and
# rank-major (lowrank_whole_batch): the fewest array operations (each one's fixed cost decides
# small problems' time) and one batched GEMM per modality.  Measured on NumPy (2-core CI box,
# float64, docs/backends.rst "Small problems"): the whole-batch form took 0.44-0.65x the
# blocked form's time from B R h = 256 to 4096 and 0.56-0.89x at (32, 32, 128), R 16, h 128
# from B = 32 to 128 (B R h = 2**16 to 2**18); 1.1-1.7x beyond, where the blocked form's
# cache-sized blocks pay off (but not at few rows and a wide R h: NUMPY_WHOLE_BATCH_ROWS).
WHOLE_BATCH_ELEMENTS = 1 << 18

# NumPy also runs whole-batch beyond that bound where B <= this many rows and h > 8.  There the
# blocked form's copy of every factor as (D_m, R h) (flat_lowrank: O(R D h) per call whatever B,
# 1/B of the GEMMs' flops but a strided copy) decided the time: B = 16, (32, 32, 32), R 512,
# h 64 took 2.1x the plain NumPy expression, 47% of it in that copy (a review's measurement).
# Measured on the 2-core CI box (thread CPU time, medians of 5-41 interleaved rounds, float32
# and float64, B R h > 2**18; docs/backends.rst "Small problems"): whole-batch / blocked
# 0.42-0.98 at (32, 32, 32) and (8, 16, 64), B 8-128, R 64-512, h 32 and 128, and 0.39-1.08
# at (4, 4, 4), (32, 32, 128) and (256, 512), h 12 to 128, R to 1024.  Not at h <= 8, where
# the whole-batch form's R GEMMs of h columns lose to the blocked form's one of R h columns
# (0.63-1.38, worst at d_m = 512), nor from B = 256, where the two are mixed (0.55-1.77,
# float32 losing at the largest R h).  At <= 128 rows the blocked form is one block anyway
# (block_rows: at least 256 rows), so the whole-batch form's (R, B, h) arrays are no more
# memory than that block's (B, R h) buffers (and it copies no factor).
NUMPY_WHOLE_BATCH_ROWS = 128


def whole_batch(batch: int, rank: int, out_dim: int) -> bool:
    """Whether a low-rank fusion of this size runs whole-batch (:func:`lowrank_whole_batch`;
    the torch backend adds a bound on the batch,
    :data:`mmfuse.backends.torch.lowrank.WHOLE_BATCH_ROWS`, and runs its plain form instead
    where that is faster, :func:`mmfuse.backends.torch.lowrank.plain_form`; NumPy adds few
    rows beyond it, :data:`NUMPY_WHOLE_BATCH_ROWS`)."""
    return batch * rank * out_dim <= WHOLE_BATCH_ELEMENTS


def rank_sum(xp: Any, acc: Any, weights: Any, bias: Any) -> Any:
    """``sum_r w_r acc[r] + b`` for a rank-major (R, B, h) ``acc``, as one (R,) @ (R, B h)
    product (a sum without weights)."""
    rank, batch, out_dim = acc.shape
    if type(acc) is np.ndarray:  # ndarray's own reshape and sum: the namespace's wrappers
        # cost a tenth of a tiny call's kernel; the same reductions
        flat = acc.reshape(rank, batch * out_dim)
        y = (flat.sum(axis=0) if weights is None else weights @ flat).reshape(batch, out_dim)
    else:
        flat = xp.reshape(acc, (rank, batch * out_dim))
        y = xp.reshape(xp.sum(flat, axis=0) if weights is None else weights @ flat, (batch, out_dim))
    return y if bias is None else y + bias


def lowrank_whole_batch(
    xp: Any, xs: list[Any], factors: list[Any], weights: Any, bias: Any, append_one: bool, present: Any
) -> Any:
    """LMF Eq. 8 on the whole batch in the paper's rank-major layout: per modality one
    broadcast product ``[x_m, 1] @ F_m`` of shape (R, B, h) (the constant row added, not
    appended), the product over modalities, and the weighted rank sum as one (R,) @ (R, B h)
    product.  About three array operations per modality and no layout copies: the form for
    small problems (:func:`whole_batch`), where each operation's fixed cost dominates.
    Absent samples' features are zeroed (``present``)."""
    in_place = type(xs[0]) is np.ndarray  # NumPy: acc is this function's own array
    if present is not None:
        xs = [mask_absent(xp, x, present, m) for m, x in enumerate(xs)]
    acc = None
    for x, f in zip(xs, factors):
        proj = affine(x, f, append_one)
        if acc is None:
            acc = proj
        elif in_place:
            acc *= proj
        else:
            acc = acc * proj
    return rank_sum(xp, acc, weights, bias)


def lowrank_with(
    new_run: Any,
    xs: list[Any],
    factors: list[Any],
    weights: Any,
    bias: Any,
    append_one: bool,
    present: Any,
) -> Any:
    """LMF Eq. 8 as one GEMM per modality, an elementwise product and a rank sum, over the
    primitives of a run made by ``new_run(xp, xs, mats, rank, out_dim, append_one)`` (see the
    section comment above)."""
    xp = array_namespace(xs[0])
    rank, _, out_dim = factors[0].shape
    batch = xs[0].shape[0]
    # a traced batch is one block, without comparing it (:func:`tensor_fusion_blocks`)
    if batch is not None and not is_lazy(xs[0]) and (
        traced_by_dynamo(xs[0]) or whole_batch(batch, rank, out_dim)
    ):
        return lowrank_whole_batch(xp, xs, factors, weights, bias, append_one, present)
    mats = [flat_lowrank(xp, f, weights if m == 0 else None) for m, f in enumerate(factors)]
    run = new_run(xp, xs, mats, rank, out_dim, append_one)
    for blk in run.blocks:
        acc = None
        for m, (x, mat) in enumerate(zip(xs, mats)):
            feats = mask_absent(xp, x[blk, ...], _rows(present, blk), m)
            proj = run.project(m, blk, feats, mat)
            acc = proj if acc is None else run.multiply(acc, proj)
        assert acc is not None
        run.rank_sum(blk, acc)
    y = run.result()
    if bias is not None and type(y) is np.ndarray:  # NumPy's run writes its own output: the
        y += bias  # bias in place, not a second output-sized array (2x the output's peak)
        return y
    return y if bias is None else y + bias


def lowrank_fusion(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.lowrank_fusion`, generic Array-API path (any namespace; autograd flows
    through on torch).  NumPy and Dask have variants (:func:`lowrank_fusion_numpy`,
    :func:`lowrank_fusion_dask`); the registry picks."""
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):
        return in_work_dtype(
            lowrank_fusion, xp, xs[0].dtype, xs, factors, weights, bias,
            append_one=append_one, present=present,
        )  # fmt: skip
    return lowrank_with(_GenericRun, xs, factors, weights, bias, append_one, present)


def lowrank_fusion_dask(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """Dask: one task per batch chunk, each running :func:`lowrank_fusion_numpy` (its
    intermediates stay in cache and worker memory stays at a few chunks)."""
    from .chunks import per_batch_chunk

    n = len(xs)
    out_dim = factors[0].shape[2]
    batched = [*xs] if present is None else [*xs, present]
    chunk = partial(_lowrank_chunk, n, append_one, present is not None)
    return per_batch_chunk(chunk, batched, [*factors, weights, bias], (out_dim,), xs[0].dtype)


def _lowrank_chunk(n: int, append_one: bool, with_present: bool, b: list[Any], p: list[Any]) -> Any:
    """One batch chunk of :func:`lowrank_fusion_dask` (module-level, so its graph pickles):
    ``b`` the chunk's n inputs (then ``present``), ``p`` the factors, weights and bias."""
    return lowrank_fusion_numpy(
        b[:n], p[:n], p[n], p[n + 1], append_one=append_one, present=b[n] if with_present else None
    )


def lowrank_fusion_numpy(
    xs: list[Any],
    factors: list[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.lowrank_fusion` on NumPy: the same algorithm with cache-sized, reused
    buffers and in-place products (:class:`_NumPyRun`)."""
    if xs[0].dtype.itemsize < 4:  # float16 (NumPy has no bfloat16): in float32, as the core
        return in_work_dtype(lowrank_fusion_numpy, array_namespace(xs[0]), xs[0].dtype, xs, factors,
                             weights, bias, append_one=append_one, present=present)  # fmt: skip
    return _lowrank_numpy_in(array_namespace(xs[0]), xs, factors, weights, bias, append_one, present)


def _lowrank_numpy_in(
    xp: Any, xs: list[Any], factors: list[Any], weights: Any, bias: Any, append_one: bool, present: Any
) -> Any:
    """:func:`lowrank_fusion_numpy` of float32 / float64 arrays, whose namespace is ``xp``."""
    rank, _, out_dim = factors[0].shape
    batch = xs[0].shape[0]
    if whole_batch(batch, rank, out_dim) or (
        batch <= NUMPY_WHOLE_BATCH_ROWS and out_dim > 8
    ):
        # lowrank_with's first branch, asked without its namespace and laziness checks (NumPy
        # arrays are never lazy): the form of tiny calls, where those checks cost a tenth; and
        # NumPy's own rule beyond it, few rows and h > 8 (NUMPY_WHOLE_BATCH_ROWS says why)
        return lowrank_whole_batch(xp, xs, factors, weights, bias, append_one, present)
    return lowrank_with(_NumPyRun, xs, factors, weights, bias, append_one, present)


def _plan_lowrank_numpy(
    xs: list[Any], factors: list[Any], weights: Any, bias: Any, *, append_one: bool, present: Any
) -> Any:
    """:func:`lowrank_fusion_numpy`'s own plan (:func:`mmfuse._plan.planned_impl`): calls in
    their own dtype go straight to its float32 / float64 body, their namespace bound (the
    size rule, :func:`whole_batch` and :data:`NUMPY_WHOLE_BATCH_ROWS`, still reads its bounds
    per call: a changed bound holds for planned calls too); float16 calls run the function
    itself."""
    if xs[0].dtype.itemsize < 4:
        return lowrank_fusion_numpy
    return partial(_lowrank_numpy_in, array_namespace(xs[0]))


lowrank_fusion_numpy.plan = _plan_lowrank_numpy  # type: ignore[attr-defined]


def _add_row(target: Any, row: Any) -> None:
    """``target += row`` for every row of a C-contiguous NumPy (n, w) block.

    Adding a short row to every row of a narrow block is a slow NumPy loop (w iterations
    inside n); viewed as (n / k, k w) with the row tiled k times it is one long vectorised add.
    """
    n, width = target.shape
    k = max(1, 256 // width)
    if k > 1 and n % k == 0:
        flat = target.reshape(n // k, k * width)
        flat += np.tile(row, k)
    else:
        target += row


def _rows(present: Any, blk: slice) -> Any:
    return None if present is None else present[blk, ...]


def cp_fusion(
    xs: list[Any],
    cp: tuple[Any, list[Any]],
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``h = C (w * prod_m A_m^T hat x_m) + b`` with TensorLy-layout factors.

    The per-modality projections are (B, R), so nothing needs blocking.
    """
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):
        return in_work_dtype(cp_fusion, xp, xs[0].dtype, xs, cp, bias, append_one=append_one, present=present)
    weights, factors = cp
    if is_dask(xp):  # in one chunk, as tensor_fusion's
        weights, bias, *factors = one_chunk([weights, bias, *factors])
    out_factor = factors[-1]
    prod = None
    for m, (x, a) in enumerate(zip(xs, factors[:-1])):
        proj = affine(x if present is None else mask_absent(xp, x, present, m), a, append_one)
        if prod is None:
            prod = proj
        elif type(prod) is np.ndarray:  # this function's own array: in place
            prod *= proj
        else:
            prod = prod * proj
    assert prod is not None
    if type(prod) is np.ndarray:
        # NumPy: prod is this function's own array, so the weights and the bias go in place
        # (the same operations; at tiny sizes each allocation is a tenth of a microsecond)
        if weights is not None:
            prod *= weights
        y = prod @ out_factor.T
        if bias is not None:
            y += bias
        return y
    if weights is not None:
        prod = prod * weights
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    if bias is not None and tensor is not None and isinstance(prod, tensor):
        torch = sys.modules["torch"]
        # Delegation, as in affine: the output projection and the bias in one addmm
        return torch.addmm(bias, prod, out_factor.mT)
    y = prod @ xp.matrix_transpose(out_factor)
    return y if bias is None else y + bias


def lowrank_to_tensor(factors: list[Any], weights: Any = None) -> Any:
    """``W = sum_r w_r (outer product over input modes of factors[m][r])``, output mode shared
    (float16 / bfloat16 in float32, rounded once: the rank terms' products overflow first).

    The rank terms' products over all but the last modality, (R, D_1 ... D_{M-1}, h), then
    the last modality and the rank sum as one product batched over the output mode: the
    (R, D_1 ... D_M, h) array of every rank term (R times the result; a review measured
    272 MiB and 313 ms for a 16 MiB weight at R = 16, against 48 MiB and 112 ms) is never
    formed.  (:func:`lowrank_intermediate` is its size, which the public function bounds.)"""
    xp = array_namespace(factors[0])
    if low_precision(xp, factors[0].dtype):
        return in_work_dtype(lowrank_to_tensor, xp, factors[0].dtype, list(factors), weights)
    rank, _, out_dim = factors[0].shape
    acc = factors[0] if weights is None else factors[0] * weights[:, None, None]
    if len(factors) == 1:
        return xp.sum(acc, axis=0)
    *head, last = factors
    for f in head[1:]:
        # (R, P, 1, h) * (R, 1, D_m, h) -> (R, P * D_m, h); sizes named, not -1, which an
        # empty rank or output leaves undetermined
        acc = xp.reshape(acc[:, :, None, :] * f[:, None, :, :], (rank, acc.shape[1] * f.shape[1], out_dim))
    # (h, P, R) @ (h, R, D_M) -> (h, P, D_M): the rank sum in the product; then (P, D_M, h)
    full = xp.matmul(xp.permute_dims(acc, (2, 1, 0)), xp.permute_dims(last, (2, 0, 1)))
    full = xp.permute_dims(full, (1, 2, 0))
    dims = tuple(f.shape[1] for f in factors)
    # through a flat copy: C-contiguous, as before (a reshape that only splits the P axis
    # returned a view with the output mode outermost in memory; the session's diff review)
    flat = xp.reshape(full, (full.shape[0] * full.shape[1] * full.shape[2],))
    return xp.reshape(flat, (*dims, out_dim))


def lowrank_intermediate(
    rank: int, dims: tuple[int, ...], out_dim: int, weighted: bool
) -> tuple[int, ...] | None:
    """The shape of :func:`lowrank_to_tensor`'s largest intermediate beyond its result (and
    that result's transpose): (R, D_1 ... D_{M-1}, h), the rank terms over all modalities but
    the last; one factor: its product with the weights, or None (a sum of the factor itself)."""
    if len(dims) == 1:
        return (rank, dims[0], out_dim) if weighted else None
    return (rank, *dims[:-1], out_dim)


def cp_to_lowrank(cp: tuple[Any, list[Any]]) -> tuple[list[Any], Any]:
    """Exact CP (TensorLy layout) -> low-rank (LMF layout) conversion.

    ``F_1[r] = a_{1r} c_r^T`` carries the output factor; ``F_m[r] = a_{mr} 1^T`` for m > 1.
    """
    weights, factors = cp
    xp = array_namespace(factors[0])
    out_factor = factors[-1]  # (h, R)
    out_t = xp.matrix_transpose(out_factor)  # (R, h)
    lowrank = []
    for m, a in enumerate(factors[:-1]):
        a_t = xp.matrix_transpose(a)[:, :, None]  # (R, D_m, 1)
        if m == 0:
            lowrank.append(a_t * out_t[:, None, :])
        else:
            ones = xp.ones((1, 1, out_t.shape[1]), dtype=a.dtype, device=pinned_device(a))
            lowrank.append(a_t * ones)
    if weights is None:
        weights = xp.ones((out_factor.shape[1],), dtype=out_factor.dtype, device=pinned_device(out_factor))
    else:
        # a new array, as every other output (the caller's own was returned: a write to it
        # changed the CP input); a product, not a copy call, so that autograd flows through
        # it and none is recorded under no_grad, in every namespace; exact (x 1)
        weights = weights * 1
    return lowrank, weights


def intermediate_sizes(batch: int, dims: tuple[int, ...], out_dim: int) -> list[int]:
    """Element counts of tensor_fusion's intermediates: (B, D_{m+1}...D_M h) for m = 1..M."""
    return [batch * math.prod(dims[m:]) * out_dim for m in range(1, len(dims) + 1)]
