"""The ``"numba"`` backend: numba-cuda kernels for CUDA arrays, and numba CPU kernels for
Zoom-and-Shift on NumPy arrays.

CPU (NumPy arrays and torch CPU tensors; needs numba only): ``moments``, ``zoom_shift`` and
``align`` run the parallel kernels of :mod:`mmfuse.backends._numba_cpu` (one loop nest per pass
over a sample, so ``zoom_shift`` moves about the bytes of a copy; the NumPy core needs five
elementwise passes).  torch CPU float32/float64 tensors are read through NumPy views (no
copy): ``moments`` and ``align`` when no gradient is needed, ``zoom_shift`` always, as the
forward of the torch op ``mmfuse::zoom_shift_numba`` (the analytic backward of
``mmfuse::zoom_shift``).

CUDA (needs numba-cuda): takes any array exposing ``__cuda_array_interface__`` that mmfuse
can dispatch on: CuPy arrays and torch CUDA tensors.  Results come back as the same kind of
array, on the same device, computed on the producer's current stream (CuPy's or torch's), so
no extra synchronisation is needed.  Importing this module imports nothing from numba;
kernels are compiled on first use (:func:`kernels`), per accumulation dtype and tile size.

Algorithm (``lowrank_fusion``, ``cp_fusion``), per batch chunk:

1. Projections.  For each modality, one tiled shared-memory GEMM
   ``P[m] = hat x_m @ F_m`` writes a (rows, N) slab of a (M, rows, N) workspace, with
   ``N = R h`` for low-rank factors laid out (R, D_m, h) and ``N = R`` for CP factors
   (D_m, R).  The constant row of ``hat x = [x, 1]`` and the missing-modality rule are handled
   while loading the tile (an absent modality reads zeros; NaNs there are never read), so
   ``hat x`` is never built.
2. One fused kernel does everything else: the elementwise product across modalities, the rank
   weights, the rank reduction (LMF: a sum over r; CP: the contraction with the output factor
   C, tiled like a GEMM whose left operand is computed on the fly), the bias and the output
   write.  Nothing of shape (R, B, h) goes back to memory after the projections.

The batch is processed in chunks so that the workspace stays near ``WORKSPACE_BYTES`` (sized
to stay in an H100's 50 MB L2, so the fused kernel reads the projections back from cache).

Numerics: every output element is computed by one thread in a fixed order (no atomics), so
results are bit-identical across runs.  float32 and float64 inputs accumulate in their own
dtype; float16 and bfloat16 inputs are upcast to float32 (a copy, by the array's own
framework), computed in float32 and cast back.  Non-contiguous inputs are copied to contiguous
ones; inputs are never written to.

The kernels are forward-only.  A torch call that needs gradients (grad mode on and an input
that requires grad) runs the Array-API core instead, so autograd keeps working; the torch
backend's custom ops wrap these kernels with their own backward.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._extras import install_command

if importlib.util.find_spec("numba") is None:
    raise ImportError(f"the numba backend needs numba ({install_command('numba')})")

from .._core.align import Primitives, Stats, align_with, kept_shape, moments_with, zoom_shift_with
from .._namespace import array_namespace, device_of, is_torch, is_torch_tensor, tensor_memory

#: Whether numba-cuda (the CUDA half of this backend) is installed.
HAS_CUDA = importlib.util.find_spec("numba_cuda") is not None

__all__ = [
    "HAS_CUDA",
    "TILE",
    "WORKSPACE_BYTES",
    "align_cpu",
    "align_kernels",
    "cp_fusion",
    "cp_fusion_device",
    "kernels",
    "lowrank_fusion",
    "lowrank_fusion_device",
    "moments_cpu",
    "moments_cuda",
    "moments_device",
    "numpy_view",
    "simulator_enabled",
    "zoom_shift_arrays",
    "zoom_shift_cpu",
    "zoom_shift_cuda",
    "zoom_shift_device",
]

#: Edge of the square thread blocks and shared-memory tiles (TILE x TILE threads).
TILE = 16
#: Threads per block of the one-dimensional kernels.
BLOCK_1D = 256
#: Target size of the per-chunk projection workspace (bytes).
WORKSPACE_BYTES = 32 << 20
#: A chunk never has fewer rows than this (unless the batch is smaller).
MIN_CHUNK_ROWS = 256

#: ``numba.cuda``, bound on first use by :func:`kernel_sources` (never at import).
cuda: Any = None

# ----------------------------------------------------------------------------- kernels


def simulator_enabled() -> bool:
    """Whether numba-cuda runs in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def kernel_sources(acc: Any, tile: int) -> dict[str, Callable[..., Any]]:
    """The kernels as plain Python functions, closed over the accumulation type and tile.

    ``acc`` is a numba scalar type (``numba.float32`` or ``numba.float64``).  Exposed so that
    tests can compile them to PTX without a GPU (``numba.cuda.compile_ptx``).
    """
    # The kernels reach ``cuda`` as a module global: numba resolves it there when compiling,
    # and the CUDA simulator swaps module globals bound to numba.cuda for its fake module.
    global cuda
    import numba.cuda

    cuda = numba.cuda

    def proj(x, f, present, m, use_present, out, slot):
        """out[slot, b, j] = sum_i hat x[b, i] * f[j // h, i, j % h]  (tiled GEMM).

        x (B, d); f (R, D, h) with D = d + 1 when appending the constant (read as 1 at
        column d) and D = d otherwise; present (B, M) bool, read when ``use_present``.
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        b = cuda.blockIdx.y * tile + ty
        j = cuda.blockIdx.x * tile + tx
        n_rows = x.shape[0]
        d = x.shape[1]
        depth = f.shape[1]
        h = f.shape[2]
        n_cols = f.shape[0] * h
        xs = cuda.shared.array((tile, tile), acc)
        fs = cuda.shared.array((tile, tile), acc)
        keep = b < n_rows
        if keep and use_present:
            keep = present[b, m]
        total = acc(0)
        for i0 in range(0, depth, tile):
            i = i0 + tx
            v = acc(0)
            if b < n_rows and i < depth:
                if i < d:
                    if keep:
                        v = acc(x[b, i])
                else:
                    v = acc(1)
            xs[ty, tx] = v
            i = i0 + ty
            w = acc(0)
            if i < depth and j < n_cols:
                w = acc(f[j // h, i, j % h])
            fs[ty, tx] = w
            cuda.syncthreads()
            for t in range(tile):
                total += xs[ty, t] * fs[t, tx]
            cuda.syncthreads()
        if b < n_rows and j < n_cols:
            out[slot, b, j] = total

    def lowrank_combine(p, w, use_w, bias, use_bias, rank, out):
        """out[b, k] = sum_r w[r] prod_m p[m, b, r h + k] + bias[k]; one thread per (b, k)."""
        idx = cuda.grid(1)
        n_rows = out.shape[0]
        h = out.shape[1]
        if idx < n_rows * h:
            b = idx // h
            k = idx - b * h
            n_mod = p.shape[0]
            total = acc(0)
            for r in range(rank):
                col = r * h + k
                term = acc(p[0, b, col])
                for m in range(1, n_mod):
                    term *= p[m, b, col]
                if use_w:
                    term *= acc(w[r])
                total += term
            if use_bias:
                total += acc(bias[k])
            out[b, k] = total

    def cp_combine(p, w, use_w, c, bias, use_bias, out):
        """out[b, k] = sum_r c[k, r] * (w[r] prod_m p[m, b, r]) + bias[k]  (tiled GEMM).

        The left operand q[b, r] = w[r] prod_m p[m, b, r] is formed while loading the tile.
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        b = cuda.blockIdx.y * tile + ty
        k = cuda.blockIdx.x * tile + tx
        n_rows = out.shape[0]
        h = out.shape[1]
        rank = c.shape[1]
        n_mod = p.shape[0]
        qs = cuda.shared.array((tile, tile), acc)
        cs = cuda.shared.array((tile, tile), acc)
        k_load = cuda.blockIdx.x * tile + ty
        total = acc(0)
        for r0 in range(0, rank, tile):
            r = r0 + tx
            q = acc(0)
            if b < n_rows and r < rank:
                q = acc(p[0, b, r])
                for m in range(1, n_mod):
                    q *= p[m, b, r]
                if use_w:
                    q *= acc(w[r])
            qs[ty, tx] = q
            # cs[t, u] = c[k0 + u, r0 + t]; the load runs along r (c's fast axis) for
            # coalescing: thread (ty, tx) reads c[k0 + ty, r0 + tx] into cs[tx, ty].
            v = acc(0)
            if k_load < h and r < rank:
                v = acc(c[k_load, r])
            cs[tx, ty] = v
            cuda.syncthreads()
            for t in range(tile):
                total += qs[ty, t] * cs[t, tx]
            cuda.syncthreads()
        if b < n_rows and k < h:
            if use_bias:
                total += acc(bias[k])
            out[b, k] = total

    return {"proj": proj, "lowrank_combine": lowrank_combine, "cp_combine": cp_combine}


#: Zoom-and-Shift kernels: channels per block (threadIdx.x) and token lanes (threadIdx.y).
STAT_CHANNELS = 32
STAT_LANES = 8


def align_kernel_sources(acc: Any, channels: int, lanes: int) -> dict[str, Callable[..., Any]]:
    """Statistics and affine-map kernels over a (B', T, C') view, as plain Python functions.

    One block owns ``channels`` adjacent channels of one sample.  The statistics are the
    core's shifted two-pass algorithm (:mod:`mmfuse._core.align`, statistics section), in
    ``acc``: the ``lanes`` token lanes each sum every ``lanes``-th token, lane 0 merges the
    lanes' partial sums in lane order into the pivot ``p = sum(x) / n``; then each lane sums
    ``d = x - p`` and ``d**2`` over the same tokens, merged likewise into
    ``mean = p + sum(d) / n`` and ``var = sum(d**2) / n - (sum(d) / n)**2``.  The later passes
    over a block's slab (T tokens x ``channels``) read it from the L2 cache only while the
    resident blocks' slabs fit it: on an H100's 50 MB L2 up to about 370 float32 or 185 float64
    tokens (a review's estimate); longer token axes are read from memory on each pass, twice
    for ``moments`` and three times for ``zoom_shift`` (H100: CuPy's zoom_shift at
    (256, 512, 512) float32 ran at 50% of copy bandwidth, what three reads and a write give).
    Accurate whatever the mean-to-spread ratio (``x - p`` is exact near the mean), and the
    fixed merge order makes results independent of scheduling.  ``zoom_shift`` then maps the
    same slab about the pivot, ``((x - p) - corr) s + target`` (folding the map into ``x s + t``
    would lose ``|mean| s`` ulps, and the correction into the offset cancelled on constant
    lanes).  The drivers take ``acc`` float64 for float32
    inputs too (:data:`ALIGN_ACCUMULATOR`).
    """
    global cuda
    import numba.cuda

    cuda = numba.cuda

    def stats_map(x, mask, use_mask, eps, mean_out, std_out, apply, g_mean, g_std, alpha, out):
        """Statistics of x[b, :, c] and, when ``apply``, the Zoom-and-Shift map of the slab.

        ``apply`` False (moments): mean_out[b, c] = mean, std_out[b, c] = sqrt(var + eps).
        ``apply`` True (zoom_shift): out = ((x - p) - corr) * s + target with s = (g_std /
        sigma_x) ** alpha (1 where sigma_x = 0), corr = mu_x - p and target = (1 - alpha) mu_x +
        alpha g_mean, the core's rule (:func:`mmfuse._core.align.zoom_shift_map`).  Grid: one block per
        (sample, channel tile), flattened on blockIdx.x; threads (channels, lanes).
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n_tok = x.shape[1]
        n_chan = x.shape[2]
        c_tiles = (n_chan + channels - 1) // channels
        b = cuda.blockIdx.x // c_tiles
        c = (cuda.blockIdx.x - b * c_tiles) * channels + tx
        sn = cuda.shared.array((lanes, channels), acc)
        s1 = cuda.shared.array((lanes, channels), acc)
        s2 = cuda.shared.array((lanes, channels), acc)
        sc = cuda.shared.array(channels, acc)  # the correction, for the map
        # pass 1: counts and sums per lane (masked tokens are never read)
        n = acc(0)
        total = acc(0)
        if c < n_chan:
            for t in range(ty, n_tok, lanes):
                if not use_mask or mask[b, t]:
                    n += acc(1)
                    total += acc(x[b, t, c])
        sn[ty, tx] = n
        s1[ty, tx] = total
        cuda.syncthreads()
        if ty == 0:  # merge in lane order: deterministic
            for k in range(1, lanes):
                n += sn[k, tx]
                total += s1[k, tx]
            sn[0, tx] = n
            s2[0, tx] = total / n if n > acc(0) else acc(0)  # the pivot
        cuda.syncthreads()
        n = sn[0, tx]
        pivot = s2[0, tx]
        cuda.syncthreads()
        # pass 2: sums of d = x - pivot and d**2 over the same tokens
        d1 = acc(0)
        d2 = acc(0)
        if c < n_chan:
            for t in range(ty, n_tok, lanes):
                if not use_mask or mask[b, t]:
                    d = acc(x[b, t, c]) - pivot
                    d1 += d
                    d2 += d * d
        s1[ty, tx] = d1
        s2[ty, tx] = d2
        cuda.syncthreads()
        if ty == 0:
            for k in range(1, lanes):
                d1 += s1[k, tx]
                d2 += s2[k, tx]
            corr = acc(0)
            mean = acc(0)
            sigma = acc(0)
            if c < n_chan:  # (threads past the last channel have no tokens: n = 0)
                corr = d1 / n
                var = d2 / n - corr * corr
                if var < acc(0):  # rounding can go below 0
                    var = acc(0)
                mean = pivot + corr
                sigma = math.sqrt(var + acc(eps))
            if not apply:
                if c < n_chan:
                    mean_out[b, c] = mean
                    std_out[b, c] = sigma
            else:
                scale = acc(1)
                target = acc(0)
                if c < n_chan:
                    if sigma != acc(0):  # NaN is no "no spread" (the core's zoom_scale)
                        ratio = acc(g_std[b, c]) / sigma
                        scale = ratio if alpha == 1.0 else ratio ** acc(alpha)
                    target = acc(g_mean[b, c])
                    if alpha != 1.0:
                        target = (acc(1) - acc(alpha)) * mean + acc(alpha) * target
                s1[0, tx] = scale
                s2[0, tx] = target
                sc[tx] = corr
        if apply:
            cuda.syncthreads()
            if c < n_chan:
                scale = s1[0, tx]
                target = s2[0, tx]
                corr = sc[tx]
                for t in range(ty, n_tok, lanes):  # the core's rule: ((x - p) - corr) s + target
                    out[b, t, c] = ((acc(x[b, t, c]) - pivot) - corr) * scale + target

    return {"stats_map": stats_map}


class _Kernels:
    def __init__(self, sources: dict[str, Callable[..., Any]]) -> None:
        from numba import cuda

        for name, fn in sources.items():
            setattr(self, name, cuda.jit(fn))


@functools.cache
def _kernels_cached(acc_name: str, tile: int) -> _Kernels:
    import numba

    return _Kernels(kernel_sources(getattr(numba, acc_name), tile))


@functools.cache
def _align_kernels_cached(acc_name: str, channels: int, lanes: int) -> _Kernels:
    import numba

    return _Kernels(align_kernel_sources(getattr(numba, acc_name), channels, lanes))


# The Zoom-and-Shift kernels accumulate float32 inputs in float64 too, and map them in it
# (rounded once on the store).  In float32 each token lane's running sum drifted over long axes
# (T = 262144 tokens of 1e5 + N(0, 1): sigma 8.6e-4 off; a constant lane of 1e5 got a spread
# of 0.87), the variance left float32's range for spreads past 1.8e19, and the map's offset
# cancelled for large constant lanes (a review of the kernels under the CUDA simulator).  A
# memory-bound kernel: a few float64 operations per element read.
ALIGN_ACCUMULATOR = "float64"


def align_kernels(dtype: Any, channels: int = STAT_CHANNELS, lanes: int = STAT_LANES) -> Any:
    """The compiled statistics / affine-map kernels accumulating in ``dtype``."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise TypeError(f"numba kernels run in float32 or float64, got {name}")
    _check_block("channels * lanes", channels, lanes)
    return _align_kernels_cached(name, int(channels), int(lanes))


def kernels(dtype: Any, tile: int = TILE) -> Any:
    """The compiled kernels accumulating in ``dtype`` (float32 or float64), tiles ``tile``."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise TypeError(f"numba kernels run in float32 or float64, got {name}")
    _check_block("tile * tile", tile, tile)
    return _kernels_cached(name, int(tile))


#: The most threads of one CUDA block.
MAX_BLOCK_THREADS = 1024


def _check_block(label: str, x: Any, y: Any) -> None:
    """Refuse (ValueError) a thread block of ``x`` by ``y`` threads that CUDA cannot launch: a
    size that is not a positive int, or more than :data:`MAX_BLOCK_THREADS` threads (the
    device drivers' ``tile`` / ``channels`` and ``lanes`` had reached the launch, which failed
    with CUDA's "too many resources requested"; a review's find)."""
    whole = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in (x, y))
    if not whole or int(x) * int(y) > MAX_BLOCK_THREADS:
        raise ValueError(
            f"{label} must be positive ints with at most {MAX_BLOCK_THREADS} threads in all (one "
            f"CUDA block), got {x!r} and {y!r}"
        )


# ----------------------------------------------------------------------------- device drivers
#
# The drivers take numba device arrays (real, or the simulator's), contiguous, all float32 or
# all float64, and an allocator ``empty(shape, dtype)`` for the workspace.  They are what the
# CUDA-simulator tests call directly.


def _default_empty(shape: tuple[int, ...], dtype: Any) -> Any:
    from numba import cuda

    return cuda.device_array(shape, dtype=dtype)


def _chunk_rows(batch: int, n_mod: int, width: int, itemsize: int, tile: int) -> int:
    rows = WORKSPACE_BYTES // max(1, n_mod * width * itemsize)
    rows = min(max(MIN_CHUNK_ROWS, rows), 65535 * tile)  # the grid's y extent is at most 65535
    return batch if rows >= batch else rows


def _dummy(empty: Callable[..., Any], dtype: Any) -> Any:
    return empty((1,), dtype)


def _run_projections(
    kern: Any,
    xs: Sequence[Any],
    mats: Sequence[Any],
    present: Any,
    work: Any,
    start: int,
    stop: int,
    tile: int,
    stream: Any,
    empty: Callable[..., Any],
) -> None:
    import numpy as np

    use_present = present is not None
    pres = present[start:stop] if use_present else empty((1, 1), np.dtype(np.bool_))
    rows = stop - start
    for m, (x, f) in enumerate(zip(xs, mats)):
        n_cols = f.shape[0] * f.shape[2]
        if not n_cols:  # R h = 0: nothing to project (CUDA refuses a grid extent of 0)
            continue
        grid = (math.ceil(n_cols / tile), math.ceil(rows / tile))
        kern.proj[grid, (tile, tile), stream](x[start:stop], f, pres, m, use_present, work, m)


def _projected_chunks(
    kern: Any,
    xs: Sequence[Any],
    mats: Sequence[Any],
    present: Any,
    width: int,
    dtype: Any,
    tile: int,
    stream: Any,
    empty: Callable[..., Any],
) -> Any:
    """Yield ``(view, start, stop)`` per batch chunk, ``view`` (M, rows, width) holding that
    chunk's projections; one work buffer serves every chunk (what LMF and CP share)."""
    batch = xs[0].shape[0]
    rows = max(_chunk_rows(batch, len(xs), width, dtype.itemsize, tile), 1)
    work = empty((len(xs), rows, width), dtype)
    for start in range(0, batch, rows):
        stop = min(start + rows, batch)
        view = work if stop - start == rows else work[:, : stop - start, :]
        _run_projections(kern, xs, mats, present, view, start, stop, tile, stream, empty)
        yield view, start, stop


def _check_device_inputs(arrays: Sequence[Any], dtype: Any) -> None:
    for a in arrays:
        if a is not None and a.dtype != dtype:
            raise TypeError(f"all arrays must have dtype {dtype}, got {a.dtype}")


def lowrank_fusion_device(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any,
    bias: Any,
    out: Any,
    *,
    append_one: bool = True,
    present: Any = None,
    empty: Callable[..., Any] | None = None,
    stream: Any = 0,
    tile: int = TILE,
) -> Any:
    """LMF on numba device arrays, written into ``out`` (B, h); returns ``out``.

    ``xs[m]`` (B, d_m), ``factors[m]`` (R, d_m + append_one, h), ``weights`` (R,) or None,
    ``bias`` (h,) or None, ``present`` (B, M) bool or None.
    """
    empty = empty or _default_empty
    dtype = out.dtype
    _check_device_inputs([*xs, *factors, weights, bias], dtype)
    kern = kernels(dtype, tile)
    rank, _, out_dim = factors[0].shape
    if not out_dim:  # h = 0: an empty output (CUDA refuses a grid extent of 0)
        return out
    w = weights if weights is not None else _dummy(empty, dtype)
    bb = bias if bias is not None else _dummy(empty, dtype)
    chunks = _projected_chunks(kern, xs, factors, present, rank * out_dim, dtype, tile, stream, empty)
    for view, start, stop in chunks:
        total = (stop - start) * out_dim
        threads = min(BLOCK_1D, 32 * math.ceil(total / 32))
        kern.lowrank_combine[math.ceil(total / threads), threads, stream](
            view, w, weights is not None, bb, bias is not None, rank, out[start:stop]
        )
    return out


def cp_fusion_device(
    xs: Sequence[Any],
    cp_weights: Any,
    cp_factors: Sequence[Any],
    bias: Any,
    out: Any,
    *,
    append_one: bool = True,
    present: Any = None,
    empty: Callable[..., Any] | None = None,
    stream: Any = 0,
    tile: int = TILE,
) -> Any:
    """CP fusion on numba device arrays, written into ``out`` (B, h); returns ``out``.

    ``cp_factors`` = [A_1 (d_1 + append_one, R), ..., A_M, C (h, R)], contiguous.
    """
    empty = empty or _default_empty
    dtype = out.dtype
    _check_device_inputs([*xs, *cp_factors, cp_weights, bias], dtype)
    kern = kernels(dtype, tile)
    out_factor = cp_factors[-1]
    out_dim, rank = out_factor.shape
    if not out_dim:  # h = 0: an empty output (CUDA refuses a grid extent of 0)
        return out
    # A_m (D, R) seen as a rank-1, h = R low-rank factor (1, D, R): the same GEMM kernel.
    mats = [a.reshape(1, a.shape[0], a.shape[1]) for a in cp_factors[:-1]]
    w = cp_weights if cp_weights is not None else _dummy(empty, dtype)
    bb = bias if bias is not None else _dummy(empty, dtype)
    for view, start, stop in _projected_chunks(kern, xs, mats, present, rank, dtype, tile, stream, empty):
        grid = (math.ceil(out_dim / tile), math.ceil((stop - start) / tile))
        kern.cp_combine[grid, (tile, tile), stream](
            view, w, cp_weights is not None, out_factor, bb, bias is not None, out[start:stop]
        )
    return out


def moments_device(
    x: Any,
    mask: Any,
    eps: float,
    mean_out: Any,
    std_out: Any,
    *,
    empty: Callable[..., Any] | None = None,
    stream: Any = 0,
    channels: int = STAT_CHANNELS,
    lanes: int = STAT_LANES,
) -> tuple[Any, Any]:
    """Per-(sample, channel) mean and ``sqrt(var + eps)`` of a (B', T, C') device array.

    ``mask`` (B', T) bool or None; outputs (B', C'), float32 or float64 (accumulation in
    float64 for both, :data:`ALIGN_ACCUMULATOR`).  One read of x, deterministic.
    """
    import numpy as np

    empty = empty or _default_empty
    kern = align_kernels(ALIGN_ACCUMULATOR, channels, lanes)
    batch, _, n_chan = x.shape
    blocks = batch * math.ceil(n_chan / channels)
    if blocks:
        use_mask = mask is not None
        mk = mask if use_mask else empty((1, 1), np.dtype(np.bool_))
        unused2, unused3 = empty((1, 1), x.dtype), empty((1, 1, 1), x.dtype)
        kern.stats_map[blocks, (channels, lanes), stream](
            x, mk, use_mask, float(eps), mean_out, std_out, False, unused2, unused2, 1.0, unused3
        )
    return mean_out, std_out


def zoom_shift_device(
    x: Any,
    guide: Any,
    out: Any,
    *,
    alpha: float = 1.0,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
    empty: Callable[..., Any] | None = None,
    stream: Any = 0,
    channels: int = STAT_CHANNELS,
    lanes: int = STAT_LANES,
) -> Any:
    """Zoom-and-Shift of a (B', T, C') device array toward ``guide`` (B', T_g, C'), into ``out``.

    Two launches: the guide's statistics (one read of the guide), then one kernel that
    reduces each (sample, channel tile) slab of x and maps it (three passes over the slab, from
    memory once where it fits the cache: :func:`align_kernel_sources`).
    """
    empty = empty or _default_empty
    if guide.dtype != x.dtype or out.dtype != x.dtype:
        raise TypeError(f"x, guide and out must share one dtype, got {x.dtype}, {guide.dtype}, {out.dtype}")
    import numpy as np

    batch, _, n_chan = x.shape
    # a partial step's target mixes the guide's mean with x's, which may cancel: the guide's
    # mean kept in the kernels' float64 (the core's rule, zoom_shift_map), not rounded to x's
    # dtype first (half an ulp of a mean of 1e4 in a target near 0)
    g_mean = empty((batch, n_chan), x.dtype if alpha == 1.0 else np.dtype(np.float64))
    g_std = empty((batch, n_chan), x.dtype)
    moments_device(
        guide, guide_mask, eps, g_mean, g_std, empty=empty, stream=stream, channels=channels, lanes=lanes
    )
    kern = align_kernels(ALIGN_ACCUMULATOR, channels, lanes)
    blocks = batch * math.ceil(n_chan / channels)
    if blocks and x.shape[1]:
        use_mask = mask is not None
        mk = mask if use_mask else empty((1, 1), np.dtype(np.bool_))
        kern.stats_map[blocks, (channels, lanes), stream](
            x, mk, use_mask, float(eps), g_mean, g_std, True, g_mean, g_std, float(alpha), out
        )
    return out


# ----------------------------------------------------------------------------- CuPy / torch glue


class _Frame:
    """Moves one call's arrays between their framework (CuPy / torch) and numba."""

    def __init__(self, like: Any) -> None:
        from numba import cuda

        self.cuda = cuda
        self.fw: Any = None
        self.device: Any = None
        self.xp = array_namespace(like)
        self.torch = is_torch(self.xp)
        self.in_dtype = like.dtype
        if self.torch:
            import torch

            self.fw = torch
            self.device = like.device
            index = like.device.index
            self.device_id = index if index is not None else torch.cuda.current_device()
            half = self.in_dtype in (torch.float16, torch.bfloat16)
            self.dtype = torch.float32 if half else self.in_dtype
            ptr = torch.cuda.current_stream(self.device).cuda_stream
        else:
            import cupy

            self.fw = cupy
            self.device = device_of(like)
            self.device_id = like.device.id
            half = self.in_dtype == cupy.float16
            self.dtype = cupy.dtype(cupy.float32) if half else self.in_dtype
            with cupy.cuda.Device(self.device_id):
                ptr = cupy.cuda.get_current_stream().ptr
        self.stream = cuda.external_stream(ptr) if ptr else 0

    def prepare(self, a: Any, *, floating: bool = True) -> Any:
        """A contiguous (and, for half types, float32) copy if needed; never ``a`` mutated."""
        if a is None:
            return None
        if self.torch:
            if floating and a.dtype != self.dtype:
                a = a.to(self.dtype)
            # the negative bit resolved: contiguous() keeps a torch._neg_view's, and the
            # kernels read the raw memory (negated data)
            a = a.detach().resolve_neg().contiguous()
        else:  # on the arrays' device, as empty(): CuPy allocates (and runs) on the current one
            with self.fw.cuda.Device(self.device_id):
                if floating and a.dtype != self.dtype:
                    a = a.astype(self.dtype)
                a = self.fw.ascontiguousarray(a)
        return a

    def numba(self, a: Any) -> Any:
        return None if a is None else self.cuda.as_cuda_array(a, sync=False)

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        dtype = self.dtype if dtype is None else dtype
        if self.torch:
            return self.fw.empty(shape, dtype=dtype, device=self.device)
        with self.fw.cuda.Device(self.device_id):
            return self.fw.empty(shape, dtype=dtype)

    def empty_numba(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import numpy as np

        if self.torch:
            tdtype = {
                np.dtype("float32"): self.fw.float32,
                np.dtype("float64"): self.fw.float64,
                np.dtype("bool"): self.fw.bool,
            }[np.dtype(dtype)]
            return self.numba(self.empty(shape, tdtype))
        return self.numba(self.empty(shape, dtype))

    def finish(self, out: Any) -> Any:
        if out.dtype == self.in_dtype:
            return out
        if self.torch:
            return out.to(self.in_dtype)
        with self.fw.cuda.Device(self.device_id):  # (as prepare's)
            return out.astype(self.in_dtype)


def _prepared(frame: _Frame, xs: Sequence[Any], present: Any) -> tuple[list[Any], Any]:
    xs_p = [frame.prepare(x) for x in xs]
    pres = frame.prepare(present, floating=False) if present is not None else None
    return xs_p, pres


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.lowrank_fusion` on CUDA arrays with the numba kernels (see the module)."""
    frame = _Frame(xs[0])
    xs_p, pres = _prepared(frame, xs, present)
    fs_p = [frame.prepare(f) for f in factors]
    w_p, b_p = frame.prepare(weights), frame.prepare(bias)
    out = frame.empty((xs[0].shape[0], factors[0].shape[2]))
    with frame.cuda.gpus[frame.device_id]:
        lowrank_fusion_device(
            [frame.numba(x) for x in xs_p],
            [frame.numba(f) for f in fs_p],
            frame.numba(w_p),
            frame.numba(b_p),
            frame.numba(out),
            append_one=append_one,
            present=frame.numba(pres),
            empty=frame.empty_numba,
            stream=frame.stream,
        )
    return frame.finish(out)


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """:func:`mmfuse.cp_fusion` on CUDA arrays with the numba kernels (see the module)."""
    weights, factors = cp
    frame = _Frame(xs[0])
    xs_p, pres = _prepared(frame, xs, present)
    fs_p = [frame.prepare(f) for f in factors]
    w_p, b_p = frame.prepare(weights), frame.prepare(bias)
    out = frame.empty((xs[0].shape[0], factors[-1].shape[0]))
    with frame.cuda.gpus[frame.device_id]:
        cp_fusion_device(
            [frame.numba(x) for x in xs_p],
            frame.numba(w_p),
            [frame.numba(f) for f in fs_p],
            frame.numba(b_p),
            frame.numba(out),
            append_one=append_one,
            present=frame.numba(pres),
            empty=frame.empty_numba,
            stream=frame.stream,
        )
    return frame.finish(out)


def _lane_view(a: Any, ax: int) -> Any:
    """A contiguous array seen as (B', T, C'): axes before ``ax``, ``ax``, axes after."""
    shape = tuple(a.shape)
    return a.reshape(math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :]))


def _mask_view(mask: Any) -> Any:
    """A (B, ..., T) mask seen as (B', T)."""
    shape = tuple(mask.shape)
    return mask.reshape(math.prod(shape[:-1]), shape[-1])


def moments_cuda(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments` with the numba CUDA kernel (two passes over x, one read from
    memory where a block's slab fits the cache: :func:`align_kernel_sources`)."""
    frame = _Frame(x)
    ax = axis % x.ndim
    xp_ = frame.prepare(x)
    mk = frame.prepare(mask, floating=False)
    kept = kept_shape(x.shape, ax)
    mean, std = frame.empty(kept), frame.empty(kept)
    x3 = _lane_view(xp_, ax)
    with frame.cuda.gpus[frame.device_id]:
        moments_device(
            frame.numba(x3),
            None if mk is None else frame.numba(_mask_view(mk)),
            eps,
            frame.numba(mean.reshape(x3.shape[0], x3.shape[2])),
            frame.numba(std.reshape(x3.shape[0], x3.shape[2])),
            empty=frame.empty_numba,
            stream=frame.stream,
        )
    return frame.finish(mean), frame.finish(std)


def zoom_shift_cuda(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """:func:`mmfuse.zoom_shift` with the numba CUDA kernels (see the module)."""
    frame = _Frame(x)
    ax = axis % x.ndim
    x3 = _lane_view(frame.prepare(x), ax)
    g3 = _lane_view(frame.prepare(guide), ax)
    mk = frame.prepare(mask, floating=False)
    gmk = frame.prepare(guide_mask, floating=False)
    out = frame.empty(tuple(x.shape))
    with frame.cuda.gpus[frame.device_id]:
        zoom_shift_device(
            frame.numba(x3),
            frame.numba(g3),
            frame.numba(out.reshape(x3.shape)),
            alpha=alpha,
            mask=None if mk is None else frame.numba(_mask_view(mk)),
            guide_mask=None if gmk is None else frame.numba(_mask_view(gmk)),
            eps=eps,
            empty=frame.empty_numba,
            stream=frame.stream,
        )
    return frame.finish(out)


# ----------------------------------------------------------------------------- NumPy (CPU kernels)


def _cpu_lanes(x: Any, ax: int) -> Any:
    """x as a C-contiguous float32/float64 (B', T, C') array (a view when it already is one)."""
    import numpy as np

    # by kind and size, not dtype equality: a non-native byte order (">f8") is no float64 to
    # ==, and would be computed in float32; it is converted to the native dtype of its width
    wide = x.dtype.kind == "f" and x.dtype.itemsize == 8
    dtype = np.dtype(np.float64) if wide else np.dtype(np.float32)
    return _lane_view(np.ascontiguousarray(x, dtype=dtype), ax)


def _cpu_mask(mask: Any) -> Any:
    return None if mask is None else _mask_view(mask)


def _per_lane(a: Any, kept: tuple[int, ...], shape: tuple[int, int], dtype: Any) -> Any:
    """Statistics-shaped ``a`` (broadcastable to ``kept``, a :func:`kept_shape`) as a contiguous
    (B', C') array."""
    import numpy as np

    if a.shape != kept:  # (numpy.broadcast_to costs a tiny call's kernel time: only if needed)
        a = np.broadcast_to(a, kept)
    return np.ascontiguousarray(a.reshape(shape), dtype=dtype)


class CPUPrimitives(Primitives):
    """The alignment primitives as the numba CPU kernels of :mod:`._numba_cpu` (statistics
    accumulated in float64, one loop nest per pass over a sample); the algorithms are the
    core's (:mod:`mmfuse._core.align`)."""

    def stats(self, x: Any, axis: int, mask: Any, *, keep_dev: bool = False, with_mean: bool = True) -> Stats:
        from . import _numba_cpu

        lanes = _cpu_lanes(x, axis)
        first, var, shift = _numba_cpu.stats(lanes, _cpu_mask(mask))  # float64, (B', C')
        kept = kept_shape(x.shape, axis)
        first, var, shift = first.reshape(kept), var.reshape(kept), shift.reshape(kept)
        # the pivot: the first mean rounded to the lanes' dtype, so x - pivot is exact near the
        # mean; what the rounding dropped and the second pass's shift are the correction
        # (float64, kept apart from the pivot: as one float64 the mean costs ulps of its size)
        pivot = first.astype(lanes.dtype)
        return Stats(first + shift, var, pivot, (first - pivot) + shift)

    def apply(
        self, x: Any, axis: int, pivot: Any, corr: Any, scale: Any, target: Any, dev: Any = None
    ) -> Any:
        import numpy as np

        from . import _numba_cpu

        lanes = _cpu_lanes(x, axis)
        kept = kept_shape(x.shape, axis)
        shape = (lanes.shape[0], lanes.shape[2])
        dt = lanes.dtype  # the pivot in x's dtype (x - pivot is exact near the mean); the
        # scale, correction and target in float64, as the fused kernel's: in a float32 x's
        # dtype the zoom of a subnormal spread overflowed to inf
        centre = np.zeros(shape, dtype=dt) if pivot is None else _per_lane(pivot, kept, shape, dt)
        fix = np.zeros(shape) if pivot is None else _per_lane(corr, kept, shape, np.float64)
        scale, target = (_per_lane(a, kept, shape, np.float64) for a in (scale, target))
        out = _numba_cpu.apply_map(lanes, centre, fix, scale, target)
        return out.reshape(x.shape).astype(x.dtype, copy=False)

    def zoom_shift(
        self, x: Any, axis: int, mask: Any, g_mean: Any, g_sigma: Any, alpha: float, eps: float
    ) -> Any:
        import numpy as np

        from . import _numba_cpu

        lanes = _cpu_lanes(x, axis)
        shape = (lanes.shape[0], lanes.shape[2])
        kept = kept_shape(x.shape, axis)
        g_mean, g_sigma = (_per_lane(a, kept, shape, np.float64) for a in (g_mean, g_sigma))
        out = _numba_cpu.zoom_shift(lanes, _cpu_mask(mask), g_mean, g_sigma, alpha, eps)
        return out.reshape(x.shape).astype(x.dtype, copy=False)


CPU = CPUPrimitives()


# torch CPU tensors (float32 / float64) reach the kernels through NumPy views of their memory
# (``Tensor.numpy()``: no copy), and the results come back as tensors sharing the kernels'
# output buffers (``torch.from_numpy``).  moments and align take them when no gradient is
# needed (the registry's condition); zoom_shift through the torch op mmfuse::zoom_shift_numba,
# whose analytic backward is mmfuse::zoom_shift's.


_torch_tensor = is_torch_tensor
numpy_view = tensor_memory  # (the name this module exports)


def _from_numpy(a: Any) -> Any:
    return sys.modules["torch"].from_numpy(a)


def moments_cpu(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments` with the CPU kernels (one read of x): NumPy arrays, or torch
    CPU tensors that need no gradient."""
    if _torch_tensor(x):
        mean, std = moments_with(CPU, numpy_view(x), axis=axis, mask=numpy_view(mask), eps=eps)
        return _from_numpy(mean), _from_numpy(std)
    return moments_with(CPU, x, axis=axis, mask=mask, eps=eps)


def zoom_shift_arrays(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Any:
    """zoom_shift of NumPy arrays with the CPU kernels (the core's algorithm over
    :data:`CPU`); the forward of the torch op ``mmfuse::zoom_shift_numba`` too."""
    return zoom_shift_with(CPU, x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)


def zoom_shift_cpu(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """:func:`mmfuse.zoom_shift` with the CPU kernels: one read of the guide, one of x, one
    write.  NumPy arrays; torch CPU tensors go through the op ``mmfuse::zoom_shift_numba``
    (these kernels forward, ``mmfuse::zoom_shift``'s analytic backward)."""
    if _torch_tensor(x):
        from .torch.zoom_shift import zoom_shift_numba

        return zoom_shift_numba(x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)
    return zoom_shift_arrays(x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)


def _plan_zoom_shift_cpu(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Callable[..., Any]:
    """:func:`zoom_shift_cpu`'s own plan (:func:`mmfuse._plan.planned_impl`): NumPy arrays go
    straight to :func:`zoom_shift_arrays`; torch tensors to the op's planned path (without
    autograd, the kernels on the tensors' memory, past the op's binding and its checks)."""
    if _torch_tensor(x):
        from .torch.zoom_shift import plan_zoom_shift_numba

        options = {"alpha": alpha, "axis": axis, "mask": mask, "guide_mask": guide_mask, "eps": eps}
        return plan_zoom_shift_numba(x, guide, **options)
    return zoom_shift_arrays


zoom_shift_cpu.plan = _plan_zoom_shift_cpu  # type: ignore[attr-defined]


def align_cpu(
    xs: list[Any],
    *,
    rounds: int | None = 1,
    alpha: float = 1.0,
    schedule: str = "gauss-seidel",
    topology: str = "consensus",
    hub: int = 0,
    axis: int = -2,
    masks: list[Any] | None = None,
    eps: float = 1e-5,
) -> list[Any]:
    """:func:`mmfuse.align` with the CPU kernels: the core's algorithm over them (every input
    read once for its statistics, the rounds on the statistics, one map per input).  NumPy
    arrays, or torch CPU tensors that need no gradient."""
    torch_in = _torch_tensor(xs[0])
    if torch_in:
        xs = [numpy_view(x) for x in xs]
        masks = None if masks is None else [numpy_view(m) for m in masks]
    out = align_with(
        CPU, xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=masks, eps=eps,
    )  # fmt: skip
    return [_from_numpy(y) for y in out] if torch_in else out
