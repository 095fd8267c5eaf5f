"""The ``"numba"`` backend: numba-cuda kernels for CUDA arrays, and numba CPU kernels for
Zoom-and-Shift on NumPy arrays.

CPU (NumPy arrays; needs numba only): ``moments``, ``zoom_shift`` and ``align`` run the
parallel kernels of :mod:`mmfuse.backends._numba_cpu` (one loop nest per pass over a sample, so
``zoom_shift`` moves about the bytes of a copy; the NumPy core needs five elementwise passes).

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
import sys
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

if importlib.util.find_spec("numba") is None:
    raise ImportError("the numba backend needs numba (pip install 'mmfuse[numba]')")

from .. import _fusion  # noqa: F401  (defines the operators registered below)
from .._core import fusion as core
from .._namespace import array_namespace, device_of, is_numpy, is_torch
from ._registry import _OPS, register

#: Whether numba-cuda (the CUDA half of this backend) is installed.
HAS_CUDA = importlib.util.find_spec("numba_cuda") is not None

__all__ = [
    "HAS_CUDA",
    "TILE",
    "WORKSPACE_BYTES",
    "align",
    "align_kernels",
    "cp_fusion",
    "cp_fusion_device",
    "kernels",
    "lowrank_fusion",
    "lowrank_fusion_device",
    "moments",
    "moments_device",
    "simulator_enabled",
    "zoom_shift",
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

_NEEDS = "needs CuPy arrays or torch CUDA tensors on a CUDA device"

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

    One block owns ``channels`` adjacent channels of one sample: its ``lanes`` token lanes
    each run Welford's update over every ``lanes``-th token (in ``acc``), the lanes' partial
    (count, mean, M2) are merged in a fixed order (Chan et al.) by lane 0, so the result does
    not depend on scheduling.  ``zoom_shift`` then maps the same slab of x, which the block
    has just read (an L2 hit on a GPU): x is read from memory about once.
    """
    global cuda
    import numba.cuda

    cuda = numba.cuda

    def stats_map(x, mask, use_mask, eps, mean_out, std_out, apply, g_mean, g_std, alpha, out):
        """Statistics of x[b, :, c] and, when ``apply``, the Zoom-and-Shift map of the slab.

        ``apply`` False (moments): mean_out[b, c] = mean, std_out[b, c] = sqrt(var + eps).
        ``apply`` True (zoom_shift): out = x * s + t with s = (g_std / sigma_x) ** alpha
        (1 where sigma_x = 0) and t = mu_x (1 - s) + alpha (g_mean - mu_x); the slab of x is
        mapped right after the block reduced it.  Grid: one block per (sample, channel tile),
        flattened on blockIdx.x; threads (channels, lanes).
        """
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n_tok = x.shape[1]
        n_chan = x.shape[2]
        c_tiles = (n_chan + channels - 1) // channels
        b = cuda.blockIdx.x // c_tiles
        c = (cuda.blockIdx.x - b * c_tiles) * channels + tx
        sn = cuda.shared.array((lanes, channels), acc)
        smean = cuda.shared.array((lanes, channels), acc)
        sm2 = cuda.shared.array((lanes, channels), acc)
        # Welford over tokens ty, ty + lanes, ... (masked tokens are never read).
        n = acc(0)
        mean = acc(0)
        m2 = acc(0)
        if c < n_chan:
            for t in range(ty, n_tok, lanes):
                if not use_mask or mask[b, t]:
                    v = acc(x[b, t, c])
                    n += acc(1)
                    d = v - mean
                    mean += d / n
                    m2 += d * (v - mean)
        sn[ty, tx] = n
        smean[ty, tx] = mean
        sm2[ty, tx] = m2
        cuda.syncthreads()
        if ty == 0:
            # Merge the lanes in lane order (Chan et al.): deterministic.
            for k in range(1, lanes):
                nb = sn[k, tx]
                if nb > acc(0):
                    tot = n + nb
                    d = smean[k, tx] - mean
                    mean += d * (nb / tot)
                    m2 += sm2[k, tx] + d * d * (n * nb / tot)
                    n = tot
            sigma = acc(0)
            if c < n_chan:
                sigma = math.sqrt(m2 / n + acc(eps))
            if not apply:
                if c < n_chan:
                    mean_out[b, c] = mean
                    std_out[b, c] = sigma
            else:
                scale = acc(1)
                offset = acc(0)
                if c < n_chan:
                    if sigma > acc(0):
                        ratio = acc(g_std[b, c]) / sigma
                        scale = ratio if alpha == 1.0 else ratio ** acc(alpha)
                    offset = mean * (acc(1) - scale) + acc(alpha) * (acc(g_mean[b, c]) - mean)
                sn[0, tx] = scale
                smean[0, tx] = offset
        if apply:
            cuda.syncthreads()
            if c < n_chan:
                scale = sn[0, tx]
                offset = smean[0, tx]
                for t in range(ty, n_tok, lanes):
                    out[b, t, c] = acc(x[b, t, c]) * scale + offset

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


def align_kernels(dtype: Any, channels: int = STAT_CHANNELS, lanes: int = STAT_LANES) -> Any:
    """The compiled statistics / affine-map kernels accumulating in ``dtype``."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise TypeError(f"numba kernels run in float32 or float64, got {name}")
    return _align_kernels_cached(name, int(channels), int(lanes))


def kernels(dtype: Any, tile: int = TILE) -> Any:
    """The compiled kernels accumulating in ``dtype`` (float32 or float64), tiles ``tile``."""
    import numpy as np

    name = np.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise TypeError(f"numba kernels run in float32 or float64, got {name}")
    return _kernels_cached(name, int(tile))


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

    ``mask`` (B', T) bool or None; outputs (B', C'), float32 or float64 (accumulation is in
    x's dtype).  One read of x, deterministic.
    """
    import numpy as np

    empty = empty or _default_empty
    kern = align_kernels(x.dtype, channels, lanes)
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
    reduces each (sample, channel tile) slab of x and maps it (x read about once).
    """
    empty = empty or _default_empty
    if guide.dtype != x.dtype or out.dtype != x.dtype:
        raise TypeError(f"x, guide and out must share one dtype, got {x.dtype}, {guide.dtype}, {out.dtype}")
    import numpy as np

    batch, _, n_chan = x.shape
    g_mean = empty((batch, n_chan), x.dtype)
    g_std = empty((batch, n_chan), x.dtype)
    moments_device(
        guide, guide_mask, eps, g_mean, g_std, empty=empty, stream=stream, channels=channels, lanes=lanes
    )
    kern = align_kernels(x.dtype, channels, lanes)
    blocks = batch * math.ceil(n_chan / channels)
    if blocks and x.shape[1]:
        use_mask = mask is not None
        mk = mask if use_mask else empty((1, 1), np.dtype(np.bool_))
        kern.stats_map[blocks, (channels, lanes), stream](
            x, mk, use_mask, float(eps), g_mean, g_std, True, g_mean, g_std, float(alpha), out
        )
    return out


# ----------------------------------------------------------------------------- CuPy / torch glue


def _supports(xp: Any, device: Any) -> str | None:
    """The CUDA kernels: CuPy arrays and torch CUDA tensors, with numba-cuda installed."""
    if array_api_compat.is_cupy_namespace(xp) or (
        is_torch(xp) and getattr(device, "type", None) == "cuda"
    ):
        if not HAS_CUDA:
            return f"{_NEEDS}, and numba-cuda (pip install 'mmfuse[numba]')"
        if simulator_enabled():
            return (
                f"{_NEEDS}, with numba's CUDA simulator off (NUMBA_ENABLE_CUDASIM is set, so "
                "numba cannot use device memory)"
            )
        return None
    return _NEEDS


def _supports_cpu_or_cuda(xp: Any, device: Any) -> str | None:
    """moments / zoom_shift: NumPy arrays (CPU kernels) or what the CUDA kernels take."""
    if is_numpy(xp):
        return None
    refusal = _supports(xp, device)
    return None if refusal is None else f"needs NumPy arrays (CPU kernels) or {refusal[len('needs '):]}"


def _supports_cpu(xp: Any, device: Any) -> str | None:
    """align: the CPU kernels only."""
    return None if is_numpy(xp) else "needs NumPy arrays (align has CPU kernels only)"


def _needs_grad(arrays: Sequence[Any]) -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in arrays)


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
            a = a.detach().contiguous()
        else:
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
        if out.dtype != self.in_dtype:
            out = out.to(self.in_dtype) if self.torch else out.astype(self.in_dtype)
        return out


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
    if _needs_grad([*xs, *factors, weights, bias]):
        return core.lowrank_fusion(
            list(xs), list(factors), weights, bias, append_one=append_one, present=present
        )
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
    if _needs_grad([*xs, *factors, weights, bias]):
        return core.cp_fusion(
            list(xs), (weights, list(factors)), bias, append_one=append_one, present=present
        )
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


def moments(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments` with the numba kernels (one read of x): CPU or CUDA."""
    if is_numpy(array_namespace(x)):
        return _moments_cpu(x, axis, mask, eps)
    if _needs_grad([x]):
        from .._core import align as core_align

        return core_align.moments(x, axis=axis, mask=mask, eps=eps)
    frame = _Frame(x)
    ax = axis % x.ndim
    xp_ = frame.prepare(x)
    mk = frame.prepare(mask, floating=False)
    kept = list(x.shape)
    kept[ax] = 1
    mean, std = frame.empty(tuple(kept)), frame.empty(tuple(kept))
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
    """:func:`mmfuse.zoom_shift` with the numba kernels (see the module): CPU or CUDA."""
    if is_numpy(array_namespace(x)):
        return _zoom_shift_cpu(x, guide, alpha, axis, mask, guide_mask, eps)
    if _needs_grad([x, guide]):
        from .._core import align as core_align

        return core_align.zoom_shift(
            x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps
        )
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

    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    return _lane_view(np.ascontiguousarray(x, dtype=dtype), ax)


def _cpu_mask(mask: Any) -> Any:
    return None if mask is None else _mask_view(mask)


def _cpu_mean_sigma(x: Any, ax: int, mask: Any, eps: float) -> tuple[Any, Any]:
    """float64 (B', C') mean and ``sqrt(var + eps)`` of x over ``ax`` (one read of x)."""
    import numpy as np

    from . import _numba_cpu

    mean, var = _numba_cpu.stats(_cpu_lanes(x, ax), _cpu_mask(mask))
    return mean, np.sqrt(var + eps)


def _moments_cpu(x: Any, axis: int, mask: Any, eps: float) -> tuple[Any, Any]:
    ax = axis % x.ndim
    mean, std = _cpu_mean_sigma(x, ax, mask, eps)
    kept = list(x.shape)
    kept[ax] = 1
    return mean.astype(x.dtype).reshape(kept), std.astype(x.dtype).reshape(kept)


def _zoom_shift_cpu(
    x: Any, guide: Any, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Any:
    from . import _numba_cpu

    ax = axis % x.ndim
    g_mean, g_sigma = _cpu_mean_sigma(guide, ax, guide_mask, eps)
    out = _numba_cpu.zoom_shift(_cpu_lanes(x, ax), _cpu_mask(mask), g_mean, g_sigma, alpha, eps)
    return out.reshape(x.shape).astype(x.dtype, copy=False)


def align(
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
    """:func:`mmfuse.align` on NumPy arrays: statistics and the final map with the CPU kernels.

    As in the core, every input is read once for its statistics, the rounds (or the closed-form
    limit) run on the (B', C') statistics alone, and each input is mapped once.
    """
    import numpy as np

    from .._core import align as core_align
    from . import _numba_cpu

    ax = axis % xs[0].ndim
    masks = list(masks) if masks is not None else [None] * len(xs)
    lanes = [_cpu_lanes(x, ax) for x in xs]  # converted once, read by both passes

    def apply(x3: Any, scale: Any, offset: Any) -> Any:
        return _numba_cpu.apply_map(x3, scale.astype(x3.dtype), offset.astype(x3.dtype))

    ys = core_align.align_with(
        lanes, [_cpu_mask(m) for m in masks], _numba_cpu.stats, apply,
        rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub, eps=eps, xp=np,
    )  # fmt: skip
    return [y.reshape(x.shape).astype(x.dtype, copy=False) for x, y in zip(xs, ys)]


# Priority: above the Array-API core (0), below the CuPy backend's cuBLAS path (20) on CuPy
# arrays, and below the torch backend on torch tensors (its custom ops carry the backward).
PRIORITY = 10

register("lowrank_fusion", "numba", lowrank_fusion, supports=_supports, priority=PRIORITY)
register("cp_fusion", "numba", cp_fusion, supports=_supports, priority=PRIORITY)
# The alignment operators exist once mmfuse._align is imported (mmfuse/__init__ does it).
for _name, _impl, _takes in (
    ("moments", moments, _supports_cpu_or_cuda),
    ("zoom_shift", zoom_shift, _supports_cpu_or_cuda),
    ("align", align, _supports_cpu),
):
    if _name in _OPS:
        register(_name, "numba", _impl, supports=_takes, priority=PRIORITY)
