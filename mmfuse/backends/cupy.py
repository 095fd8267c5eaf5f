"""The ``"cupy"`` backend: cuBLAS GEMMs plus fused CuPy kernels, for CuPy arrays.

``lowrank_fusion`` / ``cp_fusion``, per batch chunk (workspace near ``WORKSPACE_BYTES``):

1. Projections: one cuBLAS GEMM per modality (``cupy.matmul`` into a preallocated
   (M, rows, N) workspace) on the raw features; the factor's constant row is *not* folded in.
2. One fused ``ElementwiseKernel``: adds each modality's constant row, applies the
   missing-modality rule (an absent modality contributes only its constant row; its GEMM row,
   possibly NaN, is never used), multiplies across modalities, applies the rank weights and
   (LMF) reduces over the rank, adds the bias and writes the output.  For CP the kernel
   writes the (rows, R) rank vector, and a second cuBLAS GEMM contracts it with the output
   factor (nothing of shape (R, B, h) exists at all).

``moments`` / ``zoom_shift``: one ``RawModule`` kernel (the same design as the numba backend:
one block per (sample, channel tile); the core's shifted two-pass statistics about a pivot,
the token lanes' partial sums merged in a fixed order, in double for float32 too; then the
slab mapped about the pivot, by the core's rule; the later passes read the slab from the L2
cache only for short token axes, as the numba kernels' docstring says:
:func:`mmfuse.backends.numba.align_kernel_sources`).  Deterministic: no
atomics.  ``tests/test_cupy_kernel_on_host.py`` runs this kernel's source on the host.

float16 inputs are upcast to float32 (CuPy has no bfloat16) and the result cast back;
non-contiguous inputs are copied; inputs are never written.  Importing this module imports
nothing from CuPy; kernels are built on first use.  All work runs on CuPy's current stream.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from typing import Any

from .._core import align as core_align
from .._extras import install_command

if importlib.util.find_spec("cupy") is None:
    raise ImportError(f"the cupy backend needs CuPy ({install_command('cupy')})")


__all__ = ["MAX_STAT_BLOCKS", "WORKSPACE_BYTES", "cp_fusion", "lowrank_fusion", "moments", "zoom_shift"]

#: Target size of the per-chunk projection workspace (bytes).
WORKSPACE_BYTES = 64 << 20
MIN_CHUNK_ROWS = 256
STAT_CHANNELS = 32
STAT_LANES = 8
#: The most blocks the statistics kernel launches: one per (row, channel tile) on CUDA's grid
#: axis x, which takes at most 2**31 - 1 (and CuPy packs as a C int: a larger grid raised
#: OverflowError; a review's find).  Larger calls (2**31 rows of one channel: 8 GiB of float32
#: at least) take the core's Array-API path on the same arrays.
MAX_STAT_BLOCKS = 2**31 - 1

# ----------------------------------------------------------------------------- kernels

# P: (M, rows, N) GEMM results; C: (M, N) constant rows (or unused); present: the chunk's
# (rows, M) bool rows (the host passes each chunk its own slice: a row offset added in 32 bits
# wrapped past 2**31 rows and read before the mask; a review's find).  One thread per output
# element; flags: 1 weights, 2 bias, 4 present, 8 constant rows.
_LOWRANK_BODY = r"""
const int b = i / h;
const int k = i - b * h;
const long long N = (long long)R * h;
T total = 0;
for (int r = 0; r < R; ++r) {
    const long long col = (long long)r * h + k;
    T term = (flags & 1) ? w[r] : (T)1;
    for (int m = 0; m < M; ++m) {
        T v = (flags & 8) ? C[m * N + col] : (T)0;
        if (!(flags & 4) || present[(long long)b * M + m]) {
            v += P[((long long)m * rows + b) * N + col];
        }
        term *= v;
    }
    total += term;
}
if (flags & 2) total += bias[k];
out = total;
"""

_CP_BODY = r"""
const int b = i / R;
const int r = i - b * R;
T term = (flags & 1) ? w[r] : (T)1;
for (int m = 0; m < M; ++m) {
    T v = (flags & 8) ? C[m * R + r] : (T)0;
    if (!(flags & 4) || present[(long long)b * M + m]) {
        v += P[((long long)m * rows + b) * R + r];
    }
    term *= v;
}
q = term;
"""

_STATS_SOURCE = r"""
template <typename T, typename A, int CH, int LANES>
__global__ void stats_map(const T* __restrict__ x, const bool* __restrict__ mask, int use_mask,
                          long long L, long long C, T eps, A* mean_out, T* std_out, int apply,
                          const A* __restrict__ g_mean, const T* __restrict__ g_std, A alpha,
                          T* out) {
    // The core's shifted two-pass statistics (mmfuse._core.align): pivot p = sum(x) / n,
    // then sums of d = x - p and d * d (from cache where the slab fits it: short token axes);
    // lanes merged in lane order.
    // Token and channel indices are 64-bit: an int token loop wrapped past 2**31 - 1 tokens
    // (t += LANES from 2**31 - 32) and read before x, and C + CH - 1 wrapped for 2**31 - 31
    // channels (a review's find, in nvcc's PTX); the grid's blocks: MAX_STAT_BLOCKS.
    // Accumulated, and the map computed, in A (double for float inputs too: the numba
    // kernels' reasons, mmfuse.backends.numba.ALIGN_ACCUMULATOR), rounded once on the store;
    // the means written and read (mean_out, g_mean) and alpha stay in A: a partial step's
    // target mixes two means, which may cancel (the core's rule, zoom_shift_map).
    __shared__ A sn[LANES][CH];
    __shared__ A s1[LANES][CH];
    __shared__ A s2[LANES][CH];
    __shared__ A sc[CH];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long c_tiles = (C + CH - 1) / CH;
    const long long b = blockIdx.x / c_tiles;
    const long long c = (blockIdx.x - b * c_tiles) * CH + tx;
    A n = 0, total = 0;
    if (c < C) {
        for (long long t = ty; t < L; t += LANES) {
            if (!use_mask || mask[b * L + t]) { n += 1; total += (A)x[(b * L + t) * C + c]; }
        }
    }
    sn[ty][tx] = n; s1[ty][tx] = total;
    __syncthreads();
    if (ty == 0) {
        for (int k = 1; k < LANES; ++k) { n += sn[k][tx]; total += s1[k][tx]; }
        sn[0][tx] = n;
        s2[0][tx] = (n > 0) ? total / n : (A)0;
    }
    __syncthreads();
    n = sn[0][tx];
    const A pivot = s2[0][tx];
    __syncthreads();
    A d1 = 0, d2 = 0;
    if (c < C) {
        for (long long t = ty; t < L; t += LANES) {
            if (!use_mask || mask[b * L + t]) {
                const A d = (A)x[(b * L + t) * C + c] - pivot;
                d1 += d; d2 += d * d;
            }
        }
    }
    s1[ty][tx] = d1; s2[ty][tx] = d2;
    __syncthreads();
    if (ty == 0) {
        for (int k = 1; k < LANES; ++k) { d1 += s1[k][tx]; d2 += s2[k][tx]; }
        A corr = 0, mean = 0, sigma = 0;
        if (c < C) {  // (threads past the last channel have no tokens: n = 0)
            corr = d1 / n;
            A var = d2 / n - corr * corr;
            if (var < (A)0) var = 0;  // rounding can go below 0
            mean = pivot + corr;
            sigma = sqrt(var + (A)eps);
        }
        if (!apply) {
            if (c < C) { mean_out[b * C + c] = mean; std_out[b * C + c] = (T)sigma; }
        } else {
            A scale = 1, target = 0;
            if (c < C) {
                if (sigma != 0) {  // NaN is no "no spread" (the core's zoom_scale)
                    A ratio = (A)g_std[b * C + c] / sigma;
                    scale = (alpha == (A)1) ? ratio : pow(ratio, alpha);
                }
                target = g_mean[b * C + c];
                if (alpha != (A)1) target = ((A)1 - alpha) * mean + alpha * target;
            }
            // the core's map about the pivot, ((x - p) - corr) s + target (zoom_shift_map)
            s1[0][tx] = scale; s2[0][tx] = target; sc[tx] = corr;
        }
    }
    if (apply) {
        __syncthreads();
        if (c < C) {
            const A scale = s1[0][tx], target = s2[0][tx], corr = sc[tx];
            for (long long t = ty; t < L; t += LANES) {
                out[(b * L + t) * C + c] = (T)((((A)x[(b * L + t) * C + c] - pivot) - corr) * scale + target);
            }
        }
    }
}
"""


@functools.cache
def _elementwise() -> tuple[Any, Any]:
    import cupy

    params = (
        "raw T P, raw T C, raw T w, raw T bias, raw bool present, "
        "int32 M, int32 rows, int32 R, int32 h, int32 flags"
    )
    lowrank = cupy.ElementwiseKernel(params, "T out", _LOWRANK_BODY, "mmfuse_lowrank_combine")
    cp = cupy.ElementwiseKernel(params, "T q", _CP_BODY, "mmfuse_cp_combine")
    return lowrank, cp


@functools.cache
def _stats_module() -> Any:
    import cupy

    names = [f"stats_map<{t},double,{STAT_CHANNELS},{STAT_LANES}>" for t in ("float", "double")]
    return cupy.RawModule(code=_STATS_SOURCE, options=("-std=c++14",), name_expressions=names)


def _stats_kernel(dtype: Any) -> Any:
    import cupy

    t = "float" if cupy.dtype(dtype) == cupy.float32 else "double"
    return _stats_module().get_function(f"stats_map<{t},double,{STAT_CHANNELS},{STAT_LANES}>")


# ----------------------------------------------------------------------------- helpers


def _work_dtype(a: Any) -> Any:
    import cupy

    return cupy.dtype(cupy.float32) if a.dtype == cupy.float16 else a.dtype


def _prep(a: Any, dtype: Any) -> Any:
    import cupy

    if a is None:
        return None
    if a.dtype != dtype:
        a = a.astype(dtype)
    return cupy.ascontiguousarray(a)


def _chunk_rows(batch: int, n_mod: int, width: int, itemsize: int) -> int:
    rows = max(MIN_CHUNK_ROWS, WORKSPACE_BYTES // max(1, n_mod * width * itemsize))
    return min(rows, batch)


def _combine_args(
    cupy: Any, consts: Any, weights: Any, bias: Any, present: Any, dtype: Any, append_one: bool
) -> tuple[Any, Any, Any, Any, int]:
    one = cupy.zeros((1,), dtype=dtype)
    flags = (1 if weights is not None else 0) | (2 if bias is not None else 0)
    flags |= (4 if present is not None else 0) | (8 if append_one else 0)
    pres = present if present is not None else cupy.zeros((1,), dtype=cupy.bool_)
    return (
        consts if append_one else one,
        weights if weights is not None else one,
        bias if bias is not None else one,
        pres,
        flags,
    )


def _chunk_present(p_arg: Any, present: Any, start: int, stop: int) -> Any:
    """The combine kernel's ``present`` for rows [start, stop): the mask's own rows (a view),
    or the one-element stand-in when there is no mask."""
    return p_arg if present is None else p_arg[start:stop]


# ----------------------------------------------------------------------------- fusion


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.lowrank_fusion` for CuPy arrays: cuBLAS projections + one fused kernel."""
    import cupy

    in_dtype = xs[0].dtype
    dtype = _work_dtype(xs[0])
    with cupy.cuda.Device(xs[0].device.id):
        xs_p = [_prep(x, dtype) for x in xs]
        rank, _, out_dim = factors[0].shape
        width = rank * out_dim
        # (R, D, h) -> (D, R h): the GEMM operand (a copy of the small factor).
        mats = [_prep(f, dtype).transpose(1, 0, 2).reshape(f.shape[1], width) for f in factors]
        mats = [cupy.ascontiguousarray(a) for a in mats]
        dims = [x.shape[1] for x in xs_p]
        consts = cupy.stack([a[d] for a, d in zip(mats, dims)]) if append_one else None
        w, b = _prep(weights, dtype), _prep(bias, dtype)
        pres = _prep(present, cupy.bool_)
        batch, n_mod = xs_p[0].shape[0], len(xs_p)
        out = cupy.empty((batch, out_dim), dtype=dtype)
        rows = _chunk_rows(batch, n_mod, width, dtype.itemsize)
        work = cupy.empty((n_mod, max(rows, 1), width), dtype=dtype)
        c_arg, w_arg, b_arg, p_arg, flags = _combine_args(cupy, consts, w, b, pres, dtype, append_one)
        kernel, _ = _elementwise()
        for start in range(0, batch, max(rows, 1)):
            stop = min(start + rows, batch)
            n = stop - start
            for m, (x, a) in enumerate(zip(xs_p, mats)):
                cupy.matmul(x[start:stop], a[: dims[m]], out=work[m, :n])
            kernel(work, c_arg, w_arg, b_arg, _chunk_present(p_arg, pres, start, stop), n_mod, rows, rank,
                   out_dim, flags, out[start:stop])
        # (the cast inside the device's block: CuPy's astype allocates on the current device)
        return out if out.dtype == in_dtype else out.astype(in_dtype)


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.cp_fusion` for CuPy arrays: cuBLAS projections, fused product, cuBLAS."""
    import cupy

    weights, factors = cp
    in_dtype = xs[0].dtype
    dtype = _work_dtype(xs[0])
    with cupy.cuda.Device(xs[0].device.id):
        xs_p = [_prep(x, dtype) for x in xs]
        mats = [_prep(a, dtype) for a in factors[:-1]]
        out_t = _prep(factors[-1], dtype).T  # (R, h)
        rank = out_t.shape[0]
        dims = [x.shape[1] for x in xs_p]
        consts = cupy.stack([a[d] for a, d in zip(mats, dims)]) if append_one else None
        w, b = _prep(weights, dtype), _prep(bias, dtype)
        pres = _prep(present, cupy.bool_)
        batch, n_mod = xs_p[0].shape[0], len(xs_p)
        out = cupy.empty((batch, out_t.shape[1]), dtype=dtype)
        rows = _chunk_rows(batch, n_mod, rank, dtype.itemsize)
        work = cupy.empty((n_mod, max(rows, 1), rank), dtype=dtype)
        q = cupy.empty((max(rows, 1), rank), dtype=dtype)
        c_arg, w_arg, b_arg, p_arg, flags = _combine_args(cupy, consts, w, None, pres, dtype, append_one)
        _, kernel = _elementwise()
        for start in range(0, batch, max(rows, 1)):
            stop = min(start + rows, batch)
            n = stop - start
            for m, (x, a) in enumerate(zip(xs_p, mats)):
                cupy.matmul(x[start:stop], a[: dims[m]], out=work[m, :n])
            kernel(work, c_arg, w_arg, b_arg, _chunk_present(p_arg, pres, start, stop), n_mod, rows, rank, 1,
                   flags, q[:n])
            cupy.matmul(q[:n], out_t, out=out[start:stop])
        if b is not None:
            out += b
        return out if out.dtype == in_dtype else out.astype(in_dtype)  # (as lowrank_fusion's)


# ----------------------------------------------------------------------------- alignment


def _lanes(a: Any, ax: int) -> Any:
    shape = tuple(a.shape)
    return a.reshape(math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :]))


def _launch_stats(x3: Any, mask: Any, eps: float, mean: Any, std: Any, apply: bool,
                  g_mean: Any, g_std: Any, alpha: float, out: Any) -> None:
    import cupy
    import numpy as np

    _, length, chans = x3.shape
    blocks = _stat_blocks(x3)
    if not blocks or not length:
        return
    scalar = np.float32 if x3.dtype == cupy.float32 else np.float64
    dummy_mask = cupy.zeros((1,), dtype=cupy.bool_)
    _stats_kernel(x3.dtype)(
        (blocks,), (STAT_CHANNELS, STAT_LANES),
        (x3, mask if mask is not None else dummy_mask, np.int32(mask is not None),
         np.int64(length), np.int64(chans), scalar(eps), mean, std, np.int32(apply), g_mean, g_std,
         np.float64(alpha), out),
    )


def _stat_blocks(x3: Any) -> int:
    """The statistics kernel's blocks for (rows, tokens, channels) ``x3``: one per (row,
    channel tile)."""
    return int(x3.shape[0]) * math.ceil(int(x3.shape[2]) / STAT_CHANNELS)


def moments(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments` for CuPy arrays (two passes over x, deterministic)."""
    import cupy

    ax = axis % x.ndim
    dtype = _work_dtype(x)
    with cupy.cuda.Device(x.device.id):
        x3 = _lanes(_prep(x, dtype), ax)
        if _stat_blocks(x3) > MAX_STAT_BLOCKS:  # (past CUDA's grid: the core's path)
            mean, std = core_align.moments(_prep(x, dtype), axis=ax, mask=mask, eps=eps)
            return mean.astype(x.dtype, copy=False), std.astype(x.dtype, copy=False)
        mk = None if mask is None else _prep(mask, cupy.bool_).reshape(x3.shape[0], x3.shape[1])
        kept = core_align.kept_shape(x.shape, ax)
        mean = cupy.empty(kept, dtype=cupy.float64)  # (the kernel's accumulator: rounded once below)
        std = cupy.empty(kept, dtype=dtype)
        _launch_stats(x3, mk, eps, mean, std, False, mean, std, 1.0, std)
        # the casts on x's device too: CuPy's astype allocates on the current device (a
        # float32 moments on device 1 returned its mean on device 0; a code review's find)
        if dtype != x.dtype:
            std = std.astype(x.dtype)
        return mean.astype(x.dtype, copy=False), std


def zoom_shift(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """:func:`mmfuse.zoom_shift` for CuPy arrays: guide statistics, then one fused kernel."""
    import cupy

    ax = axis % x.ndim
    dtype = _work_dtype(x)
    with cupy.cuda.Device(x.device.id):
        x3 = _lanes(_prep(x, dtype), ax)
        g3 = _lanes(_prep(guide, dtype), ax)
        if max(_stat_blocks(x3), _stat_blocks(g3)) > MAX_STAT_BLOCKS:  # (as moments')
            out = core_align.zoom_shift(
                _prep(x, dtype), _prep(guide, dtype), alpha=alpha, axis=ax, mask=mask,
                guide_mask=guide_mask, eps=eps,
            )  # fmt: skip
            return out.astype(x.dtype, copy=False)
        mk = None if mask is None else _prep(mask, cupy.bool_).reshape(x3.shape[0], x3.shape[1])
        gmk = None if guide_mask is None else _prep(guide_mask, cupy.bool_).reshape(g3.shape[0], g3.shape[1])
        # the guide's mean in the kernel's float64 accumulator, not rounded to x's dtype: a
        # partial step's target mixes it with x's mean, which may cancel (the core's rule,
        # zoom_shift_map; half an ulp of a mean of 1e4 in a target near 0)
        g_mean = cupy.empty((g3.shape[0], g3.shape[2]), dtype=cupy.float64)
        g_std = cupy.empty((g3.shape[0], g3.shape[2]), dtype=dtype)
        _launch_stats(g3, gmk, eps, g_mean, g_std, False, g_mean, g_std, 1.0, g_std)
        out = cupy.empty(x3.shape, dtype=dtype)
        _launch_stats(x3, mk, eps, g_mean, g_std, True, g_mean, g_std, alpha, out)
        out = out.reshape(x.shape)
        return out if dtype == x.dtype else out.astype(x.dtype)  # (as moments')
