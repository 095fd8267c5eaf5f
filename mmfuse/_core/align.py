"""Array-API core of Zoom-and-Shift alignment: moments, the two primitives, rounds, fusion.

Inputs arrive validated by the public layer (:mod:`mmfuse._align`).  Everything reduces to two
steps per modality:

1. the per-sample, per-channel statistics (mean and population variance over the statistics
   axis, masked tokens excluded), computed in at least float32 by the shifted two-pass
   algorithm about a pivot ``p`` (see the statistics section: accurate whatever the ratio
   of mean to spread; in float32 they overflow (inf / NaN) when the spread exceeds about
   1.8e19, since the variance exceeds float32's range: compute in float64 for such data);
2. one per-channel affine map ``y = S * x + T`` whose ``S`` and ``T`` come from a few small
   ``(B, 1, C)`` computations on the statistics alone, applied about the pivot as
   ``((x - p) - corr) * S + target`` with ``corr = mean - p`` and ``target = S mean + T``
   (:func:`zoom_shift_map`; the folded form ``S x + T`` loses ``|S x|`` ulps when the mean
   dwarfs the spread, and folding ``corr`` into the offset cancels on a lane with no
   spread).

Every zoom and shift is affine in x, so a round of alignment maps statistics to statistics
exactly (mean ``mu -> S mu + T``, variance ``var -> S**2 var``): the rounds run on the
statistics, and the data is read once for them and once for the single affine map at the end,
however many rounds are asked for.

One home: the algorithms (:func:`moments_with`, :func:`zoom_shift_with`, :func:`align_with`:
the map rules, the rounds and their limit) are written once, over a backend's *primitives*
(:class:`Primitives`: the statistics pass, the map pass, optionally both fused).  The
generic primitives use only standard Array-API functions (NumPy, array-api-strict, PyTorch
with autograd and ``torch.compile``, CuPy, ...); :class:`NumPyPrimitives` walk the batch in
cache-sized blocks, so each input is read from memory once for its statistics and, for
``zoom_shift``, the same block is mapped while still in cache (inputs of 8 MiB or more split
their blocks across threads, one per available core: NumPy releases the GIL in ufuncs,
reductions and GEMMs; no pool outlives the call); the numba backend's CPU kernels are a third
set.  The registry's table says which runs.  Inputs are never written to and never passed
through ``xp.asarray``.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache, partial
from typing import Any, NamedTuple

import numpy as np

from .._namespace import (
    array_namespace,
    block_slices,
    device_of,
    fake_tensors,
    is_cupy,
    is_dask,
    is_jax,
    is_lazy,
    is_torch,
    native_dtype,
    pinned_device,
    widens_float32,
    work_dtype,
)
from .chunks import dask_max
from .threads import available_cores

__all__ = [
    "GENERIC",
    "NUMPY",
    "NumPyPrimitives",
    "Primitives",
    "Stats",
    "align",
    "align_numpy",
    "align_with",
    "guide_mean",
    "limit_weights",
    "moments",
    "moments_numpy",
    "moments_with",
    "pool",
    "round_statistics",
    "shift",
    "wide_mean",
    "zoom",
    "zoom_scale",
    "zoom_shift",
    "zoom_shift_fusion",
    "zoom_shift_map",
    "zoom_shift_numpy",
    "zoom_shift_with",
]

# A batch block of the NumPy fast path is kept near this many bytes so that its statistics
# and its affine map read it from cache (the 2-core CI box has 1 MiB of L2 per core).
_BLOCK_BYTES = 1 << 19
# Inputs of at least this many bytes are split across threads (one per core, at most 8).
_PARALLEL_BYTES = 1 << 23
_MAX_WORKERS = 8
# Blocks of at most this many elements square into a temporary and reduce it, larger ones
# use einsum (no temporary): below it einsum's fixed cost is the larger one.
_SMALL_ELEMENTS = 1 << 12
# Blocks of more than this many elements with two or more channels per token sum over the
# tokens by einsum, not np.add.reduce (see _axis_sum): measured (float32, 2-core CI box),
# one sum took 7.3 -> 3.1 us at (32, 8, 16), 18 -> 5.3 at (64, 16, 8), 100 -> 23 at
# (512, 8, 16), 191 -> 41 at (256, 50, 2) and 34 -> 20 at (32, 50, 64), the squares' sums
# alike.  Below it the two were within a microsecond either way, one session's run against
# another's (2.3 -> 1.9 us at (8, 8, 8) in one, 3.1 -> 4.1 in a review's; whole calls at
# (2, 16, 16) and (2, 8, 32) 1.2-1.4x slower with einsum there), so small blocks keep the
# reduction.  One channel keeps it too: its token axis is the innermost, which NumPy sums
# pairwise and fast, as the reference does.
_EINSUM_ELEMENTS = _SMALL_ELEMENTS
# Blocks of 2 to _FOLD_LANES channels per token fold tokens into rows of up to _FOLD_WIDTH
# elements, leaving at least _FOLD_ROWS rows (see _fold_slots), in blocks of at least
# _FOLD_ELEMENTS elements: below it the fold's own operations (the lanes' constants tiled,
# the slots' sums added) cost about what it saves.  With 16 channels a block's statistics
# still ran 1.3x faster folded ((2, 4096, 16) float32, 154 against 207 us), but moments of
# (64, 4096, 16) on two threads 4.5-4.8 against 4.2-4.5 ms (zoom_shift 13.8 against 13.1-13.3):
# there the fold's few more Python calls per block, on threads sharing the interpreter, cost
# what the faster loops saved; 8 channels gained on both (2.5 against 3.1-3.6 ms).
_FOLD_WIDTH = 64
_FOLD_LANES = 8
_FOLD_ELEMENTS = 1 << 13
_FOLD_ROWS = 32


# --------------------------------------------------------------------------- helpers


def _expand_mask(xp: Any, mask: Any, ndim: int) -> Any:
    """A mask of shape ``x.shape[:axis + 1]`` with trailing unit axes, broadcastable to x."""
    extra = ndim - mask.ndim
    return mask if extra == 0 else xp.reshape(mask, (*mask.shape, *(1,) * extra))


def _rows_per_block(x: Any) -> int:
    per_sample = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)
    return max(1, _BLOCK_BYTES // per_sample)


def _blocks(x: Any) -> list[slice]:
    return block_slices(x.shape[0], _rows_per_block(x))


def _workers(x: Any, n_blocks: int) -> int:
    """Threads for the NumPy fast path: one per available core for large inputs.

    NumPy's ufuncs, reductions and GEMMs release the GIL, so disjoint batch blocks run in
    parallel; small inputs stay on the calling thread (a pool costs ~0.1 ms).
    """
    if x.nbytes < _PARALLEL_BYTES or n_blocks < 2:
        return 1
    return max(1, min(available_cores(), _MAX_WORKERS, n_blocks))


def _one_block(x: Any) -> bool:
    """True when x has at most :data:`_BLOCK_BYTES` (False where its size is not a known
    Python int: Dask's unknown chunks, traced shapes)."""
    if type(x) is np.ndarray:  # the NumPy path's own arrays first: one type comparison
        return bool(x.nbytes <= _BLOCK_BYTES)
    # isinstance, not is_torch(xp): Dynamo traces this line (None: see half_imported)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor is not None and isinstance(x, tensor):
        # not nbytes: under torch.compile with dynamic shapes it raises ("Cannot call numel()
        # on tensor with symbolic sizes"), where numel() gives a symbolic int
        n: Any = x.numel() * x.element_size()
    else:
        n = getattr(x, "nbytes", None)
    return type(n) is int and n <= _BLOCK_BYTES


def _run_blocks(x: Any, work: Any) -> None:
    """Call ``work(list_of_block_slices)`` over x's batch blocks, split across threads."""
    if _one_block(x):
        # one block on this thread (what _blocks and _workers would say): a tiny call pays
        # for no block arithmetic
        work([slice(0, x.shape[0])])
        return
    blocks = _blocks(x)
    workers = _workers(x, len(blocks))
    if workers == 1:
        work(blocks)
        return
    from concurrent.futures import ThreadPoolExecutor

    per = -(-len(blocks) // workers)
    chunks = [blocks[i : i + per] for i in range(0, len(blocks), per)]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        futures = []
        for chunk in chunks:
            try:
                futures.append(pool.submit(work, chunk))
            except RuntimeError:
                # the interpreter is shutting down (a non-daemon thread still running, an
                # atexit handler): concurrent.futures takes no new work, so this thread does it
                work(chunk)
        for done in futures:
            done.result()


# --------------------------------------------------------------------------- statistics
#
# The shifted (corrected two-pass) algorithm.  Per sample and channel, with n the unmasked
# tokens and p = sum(x) / n a first estimate of the mean (the pivot), d = x - p:
#
#     mean = p + sum(d) / n,    var = sum(d**2) / n - (sum(d) / n)**2
#
# exactly (for any p), and accurate whatever the mean-to-spread ratio: x - p is exact for
# tokens near the mean, and the correction sum(d) / n recovers what the rounded p lost (a
# float32 p of data 1e4 + 1e-2 noise is off by a tenth of the spread, and a plain two-pass
# variance by the square of that).  Chan, Golub & LeVeque (1983) recommend this form.  Where a
# float32 axis is summed in float64 (long axes: F32_TOKENS), the correction is instead the
# float64 mean's difference from p, its float32 rounding (exact in float64), so the mean is
# the float64 mean rounded once, and sum(d) / n is not taken.
# Limit: float32 statistics overflow (inf / NaN) when the spread exceeds about 1.8e19, since
# the variance then exceeds float32's range (and from about 1.8e19 / sqrt(n) on, where the
# sum of squares does): compute in float64 for such data.


class Stats(NamedTuple):
    """Per-sample, per-channel statistics over the statistics axis (kept, as size 1).

    ``mean = pivot + corr`` and ``x - mean = (x - pivot) - corr``, with ``x - pivot`` exact
    near the mean, which the maps use; all in the statistics dtype (at least float32).
    ``dev`` is ``x - pivot`` for every token (masked ones too) when the primitive kept it,
    else None; ``count`` the unmasked tokens (a Python float without a mask) and ``mask``
    the mask broadcastable to x (or None): what the torch op's backward needs besides.
    """

    mean: Any
    var: Any
    pivot: Any
    corr: Any
    dev: Any = None
    count: Any = None
    mask: Any = None


def _divisor(n: Any) -> Any:
    """A token count as the statistics' divisor: a Python float, or a symbolic size (while
    ``torch.compile`` traces with a dynamic token axis) as it is.  ``float()`` of the symbolic
    size specialised the graph to one length: the custom ops' backwards traced this, so a
    ZoomShift layer recompiled for every token count and failed past Dynamo's limit (a
    review's find).  Dividing by the int gives the same values as by its float."""
    return float(n) if isinstance(n, (int, float)) else n


def kept_shape(shape: Any, axis: int) -> tuple[int, ...]:
    """``shape`` with the statistics axis ``axis`` (non-negative) as size 1: the shape of the
    statistics of an array of ``shape``."""
    return (*shape[:axis], 1, *shape[axis + 1 :])


# CPU tensors of at most this many elements take torch's var_mean in _stats (tensors on an
# accelerator always: not measured there).  Past it var_mean, a Welford reduction, was the
# slower on the CPU: _stats of (B, T, C) float32 over T, one thread, torch 2.13 on the 2-core
# CI box (thread CPU time, medians; the forty-third session), var_mean / generic form 0.36 at
# 128 elements, 0.63 at 1024, 0.92 at 2048, 1.45 at 4096, 4.7-7.5 at 65536 to 524288
# ((512, 8, 16), (32, 50, 64), (64, 16, 64) over C, (512, 64, 16) over C): the generic form's
# sums and elementwise ops run vectorised where var_mean's update does not.  It runs in
# moments' forward under autograd and in the recomputed statistics of the zoom_shift and
# align ops' backwards, whose training steps at (512, 8, 16) took 2.65 -> 0.84 ms (moments),
# 6.23 -> 2.89 (zoom_shift), 7.60 -> 4.33 (align) (a review's measurement of the change).
TORCH_VAR_MEAN_ELEMENTS = 2048


def _var_mean_pays(xs: Any) -> bool:
    """Whether :func:`_stats` takes torch's var_mean for the tensor ``xs``: on the CPU up to
    :data:`TORCH_VAR_MEAN_ELEMENTS`, elsewhere always, and always while ``torch.compile`` or
    ``torch.export`` traces (as before the bound: a size test on a symbolic batch guards the
    graph on it, and ``torch.export`` with a dynamic batch refused the guard)."""
    torch = sys.modules["torch"]
    return torch.compiler.is_compiling() or not xs.is_cpu or xs.numel() <= TORCH_VAR_MEAN_ELEMENTS


def _stats(x: Any, axis: int, mask: Any = None, *, keep_dev: bool = False, with_mean: bool = True) -> Stats:
    """:class:`Stats` of x over ``axis`` (non-negative), masked tokens excluded: the shifted
    algorithm (section comment above) in standard Array-API calls.  ``dev`` is kept when
    ``keep_dev``; the mean (``pivot + corr``, an operation) is left out (None) without
    ``with_mean``.  Branch-free in the values, so ``torch.compile`` traces it."""
    xp = array_namespace(x)
    dt = work_dtype(xp, x.dtype)
    xs = x if dt == x.dtype else xp.astype(x, dt)
    # isinstance, not is_torch(xp): Dynamo traces this line (None: see half_imported)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    torch_stats = mask is None and tensor is not None and isinstance(xs, tensor) and xs.numel() > 0
    if torch_stats and _var_mean_pays(xs):
        torch = sys.modules["torch"]
        # Delegation: torch's var_mean gives corr = mean(d) and the variance of d in one
        # reduction (Welford's update, never negative), where the Array-API form below needs
        # three sums and seven elementwise operations: at small sizes each is a few
        # microseconds of fixed cost.  Same quantities about the same kind of pivot; the last
        # bits differ from the generic form's.  (Empty inputs take the generic form, whose
        # 0 / 0 gives the same NaN without var_mean's warning.)  On the CPU only up to
        # TORCH_VAR_MEAN_ELEMENTS: past it the generic form is the faster.
        pivot = torch.mean(xs, dim=axis, keepdim=True)
        dev = xs - pivot
        var, corr = torch.var_mean(dev, dim=axis, keepdim=True, correction=0)
        mean = pivot + corr if with_mean else None
        return Stats(mean, var, pivot, corr, dev if keep_dev else None, _divisor(x.shape[axis]), None)
    acc = _accumulator(xp, xs, axis)
    if mask is None:
        m = None
        count: Any = _divisor(x.shape[axis])
        mean = xp.sum(xs, axis=axis, keepdims=True, dtype=acc) / count
        pivot = _rounded(xp, mean, dt)
        dev = xs - pivot
        d = dev
    else:
        m = _expand_mask(xp, mask, x.ndim)
        zero = xp.zeros((), dtype=dt, device=pinned_device(x))
        count = xp.sum(xp.astype(m, dt), axis=axis, keepdims=True)
        mean = xp.sum(xp.where(m, xs, zero), axis=axis, keepdims=True, dtype=acc) / count
        pivot = _rounded(xp, mean, dt)
        dev = xs - pivot
        d = xp.where(m, dev, zero)  # masked tokens (even inf or NaN) never enter
    if acc is None:
        corr = xp.sum(d, axis=axis, keepdims=True, dtype=acc) / count
    else:
        # float64 sums of a float32 long axis: the correction is the float64 mean's difference
        # from its own float32 rounding (exact), as on the NumPy path (_wide_statistics); a
        # float64 sum of the float32 deviations, each rounded where the tokens' signs mix,
        # had left the mean thousands of float32 ulps off on standard normal data, without
        # bound where the tokens cancel (mean = pivot + corr is now the float64 mean rounded
        # once; inf - inf keeps a lane with an infinite token NaN)
        corr = mean - xp.astype(pivot, acc)
    var = xp.sum(d * d, axis=axis, keepdims=True, dtype=acc) / count - corr * corr
    corr, var = _rounded(xp, corr, dt), _rounded(xp, var, dt)
    # Rounding can go below 0 (NaN stays).  And a lane whose deviations are all equal (a
    # constant lane off its rounded pivot: d = corr everywhere) must give exactly 0, the
    # "no spread" every later step tests for; where a compiler fuses d * d - corr * corr into
    # an FMA (XLA under jax.jit) it gave the last bits of corr * corr instead (1e-49 at corr
    # 1e-17), and the lane's gradients took the spread branch, 1e12 where the eager call gave
    # 0.8 (a review's find).  A variance within an ulp of corr * corr is that subtraction's
    # noise: any real spread is ulps of the mean, far above it (corr is the pivot's rounding).
    # (A finite noise only: float32 corr * corr overflows where the spread itself does, and
    # inf <= inf had zeroed a variance past float32's range, which must stay inf; the
    # session's final review.)
    noise = float(xp.finfo(dt).eps) * (corr * corr)
    var = xp.where((var <= noise) & xp.isfinite(noise), 0.0, var)
    return Stats(pivot + corr if with_mean else None, var, pivot, corr, dev if keep_dev else None, count, m)


# Token axes at most this long are summed in float32 where float32 sums run row after row:
# at most 64 terms round (a pivot within 64 ulps of the mean; constant lanes measured exact),
# and a call of microseconds would pay a third more for float64 sums (casting ufuncs, about
# 0.5 us each: the tiny torch zoom_shift went 31 -> 41 us)
F32_TOKENS = 64


def _accumulator(xp: Any, x: Any, axis: int) -> Any:
    """The dtype in which sums of ``x`` over ``axis`` (its tokens) accumulate: float64 for
    float32 with more than :data:`F32_TOKENS` tokens where the namespace sums an axis one row
    after another (NumPy's sums, under array_api_strict and in Dask's chunks: a long float32
    token axis lost its statistics' pivot, as in :func:`_block_stats`); None, x's own dtype,
    otherwise: float64, short axes, and where sums run as trees (torch, JAX, CuPy), whose
    accelerators make float64 slow or lack it."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (isinstance: traced by Dynamo)
    if tensor is not None and isinstance(x, tensor):
        return None
    long_axis = not isinstance(x.shape[axis], int) or x.shape[axis] > F32_TOKENS
    # (widens_float32: float32, on a device that has float64; array-api-strict has one without)
    if long_axis and not (is_jax(xp) or is_cupy(xp)) and widens_float32(xp, x):
        return xp.float64
    return None


def _rounded(xp: Any, v: Any, dtype: Any) -> Any:
    """``v`` in ``dtype``: a float64 result rounded once, or float32 statistics widened
    (:func:`round_statistics`); nothing to do where the dtypes agree."""
    if v.dtype == dtype:
        return v
    # (NumPy: ndarray's own astype, without the namespace wrapper's checks: ~1 us at small sizes)
    return v.astype(dtype) if type(v) is np.ndarray else xp.astype(v, dtype)


def _stats_numpy(x: Any, axis: int, mask: Any) -> Stats:
    """Blocked statistics: each batch block is read from memory once, then reduced in cache."""
    if _one_block(x):  # one block, on this thread: no block bookkeeping
        scratch = None if mask is None else np.empty(x.shape, dtype=x.dtype)
        return _block_stats(x, axis, mask, None, scratch)
    kept = kept_shape(x.shape, axis)
    outs = tuple(np.empty(kept, dtype=x.dtype) for _ in range(4))  # mean, var, pivot, corr

    def work(blocks: list[slice]) -> None:
        rows = max(b.stop - b.start for b in blocks)
        dev = np.empty((rows, *x.shape[1:]), dtype=x.dtype)
        masked = None if mask is None else np.empty_like(dev)
        for blk in blocks:
            n = blk.stop - blk.start
            mb = None if mask is None else mask[blk]
            sub = None if masked is None else masked[:n]
            _block_stats(x[blk], axis, mb, dev[:n], sub, tuple(o[blk] for o in outs))

    _run_blocks(x, work)
    return Stats(*outs)


_CONSTANTS: dict[tuple[Any, int], Any] = {}


def _constant(dtype: Any, value: int) -> Any:
    """``value`` as a read-only 0-d NumPy array of ``dtype``.  The same operand as the Python
    int to a ufunc (converted to ``dtype`` exactly, so the same bits), without the Python
    scalar's conversion on every call: about 0.35 us of a 0.7 us ufunc call at small sizes."""
    key = (dtype, value)
    c = _CONSTANTS.get(key)
    if c is None:
        if len(_CONSTANTS) >= 256:  # token counts: a few per workload, but never unbounded
            _CONSTANTS.clear()
        c = np.array(value, dtype=dtype)
        c.flags.writeable = False
        _CONSTANTS[key] = c
    return c


@lru_cache(maxsize=64)
def _square_sum(ndim: int, axis: int) -> str:
    """einsum subscripts summing ``d * d`` over ``axis`` (NumPy fast path only)."""
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    return f"{letters},{letters}->{letters.replace(letters[axis], '')}"


@lru_cache(maxsize=64)
def _axis_sum(ndim: int, axis: int) -> str:
    """einsum subscripts summing over ``axis`` (NumPy fast path only).

    Why einsum and not ``np.add.reduce`` where the token axis is not the innermost (the
    channels are): the reduction then runs an inner loop over the C channels of one token
    at a time, einsum a loop that keeps the sums of all channels going, several times faster
    with few channels and not slower past a few thousand elements (:data:`_EINSUM_ELEMENTS`).
    The same order of terms per sum (token after token) on C-contiguous blocks, so the same
    bits there, in every case measured; on other layouts (a transposed or reversed input)
    the two iterate differently and a spread's last bits may differ (2-3 ulps measured).
    Measured (2-core CI box, float32 in, float64 sums of a long token axis,
    :func:`_wide_block_stats`): (16, 4096, 4) 1000 against 334 us, (64, 4096, 1) 84 against
    71, (32, 100, 2) 49 against 18, (256, 100, 128) 1415 against 1287."""
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    return f"{letters}->{letters.replace(letters[axis], '')}"


def _einsum_into(subscripts: str, out: Any, shape: tuple[int, ...], axis: int, *operands: Any) -> Any:
    """``np.einsum(subscripts, *operands)`` summing over ``axis`` into ``out`` (None: a new
    array of ``shape``, the operands' dtype), kept as size 1 as the reductions keep it."""
    res = np.empty(shape, dtype=operands[0].dtype) if out is None else out
    np.einsum(subscripts, *operands, out=res.squeeze(axis))
    return res


@lru_cache(maxsize=256)
def _fold_slots(tokens: int, lanes: int) -> int:
    """k, the number of tokens an unmasked, C-contiguous NumPy block of ``tokens`` tokens of
    ``lanes`` channels each folds side by side into one row (:func:`_folded`), or 0: the
    largest divisor of ``tokens`` with ``k * lanes`` at most :data:`_FOLD_WIDTH`, at least 2.

    Why: a ufunc broadcasting the lanes' constants over the tokens (``x - pivot``, the map)
    and einsum's sums over the tokens run an inner loop over one token's channels, whose fixed
    cost is nearly all their time when there are few: at (64, 4096, 2) float32 ``x - pivot``
    took 1125 us against 126 on the folded view (64, 128, 64), einsum's float64 sum 1168
    against 200 and its squares 1104 against 117; at (64, 4096, 8) 1425 against 543, 1874
    against 813 and 1206 against 452 (2-core CI box).  One channel needs no fold (its tokens
    are the inner axis already); an axis of a prime number of tokens (past the fold's width)
    takes none."""
    if not 2 <= lanes <= _FOLD_LANES:
        return 0
    for k in range(min(_FOLD_WIDTH // lanes, tokens // _FOLD_ROWS), 1, -1):
        if tokens % k == 0:
            return k
    return 0


def _fold_of(a: Any, axis: int) -> int:
    """:func:`_fold_slots` of the block ``a`` over ``axis`` (0 where it does not fold: under
    :data:`_FOLD_ELEMENTS` elements, or not C-contiguous)."""
    if a.size < _FOLD_ELEMENTS or not a.flags.c_contiguous:
        return 0
    return _fold_slots(a.shape[axis], math.prod(a.shape[axis + 1 :]))


def _folded(a: Any, axis: int, k: int) -> Any:
    """The (P, T / k, k W) view of a C-contiguous block ``a`` (P samples before ``axis``, T
    tokens, W channels after it) folded by ``k``: row j of a sample holds its tokens j k to
    j k + k - 1, token j k + i's channels in slot i."""
    return a.reshape(math.prod(a.shape[:axis]), a.shape[axis] // k, -1)


def _tiled(c: Any, kept: tuple[int, ...], axis: int, k: int) -> Any:
    """Lane constants ``c`` (broadcastable to the statistics' shape ``kept``) as a folded
    block's (P, 1, k W) row: each lane's value in each of the k slots."""
    rows = np.broadcast_to(c, kept).reshape(math.prod(kept[:axis]), -1)
    return np.tile(rows, (1, k))[:, None, :]


def _slot_sums(s: Any, k: int, kept: tuple[int, ...]) -> Any:
    """A folded block's (P, k W) sums per slot and lane, summed over the slots, in the
    statistics' shape ``kept``."""
    # (over the last axis of the transposed view: an inner loop over the k slots per lane,
    # not over a slot's few lanes)
    return np.add.reduce(s.reshape(s.shape[0], k, -1).transpose(0, 2, 1), 2).reshape(kept)


def _folded_block_stats(xb: Any, axis: int, k: int, dev: Any, outs: tuple[Any, ...] | None,
                        with_mean: bool) -> Stats:  # fmt: skip
    """:func:`_block_stats` (and :func:`_wide_block_stats`) of an unmasked block that folds by
    ``k`` (:func:`_fold_slots`): the same statistics by the same rules (the float64 mean of
    a long float32 axis, its squared deviations in float32 chunks of the folded rows), each
    sum over the folded rows, per slot and lane, then over the slots: another order of the
    terms than the unfolded path's, so the last bits may differ."""
    piv_o = None if outs is None else outs[2]
    kept = kept_shape(xb.shape, axis)
    tokens = xb.shape[axis]
    xf = _folded(xb, axis, k)
    dev_f = None if dev is None else _folded(dev, axis, k)
    if tokens > F32_TOKENS and xb.dtype.itemsize < 8:  # as _wide_block_stats
        mean64 = _slot_sums(np.einsum("abc->ac", xf, dtype=np.float64, casting="safe"), k, kept)
        mean64 /= tokens
        piv = _rounded_into(piv_o, mean64, native_dtype(xb.dtype), kept)
        devf = np.subtract(xf, _tiled(piv, kept, axis, k), dev_f)
        squares = _chunked_square_sum(devf, 1)
        squares = _slot_sums(squares.reshape(squares.shape[0], -1), k, kept)
        return _wide_statistics(mean64, piv, squares, tokens, outs, kept, with_mean, devf.reshape(xb.shape))
    count = _constant(xb.dtype, tokens)
    piv = np.divide(_slot_sums(np.einsum("abc->ac", xf), k, kept), count, piv_o)
    devf = np.subtract(xf, _tiled(piv, kept, axis, k), dev_f)
    corr = _slot_sums(np.einsum("abc->ac", devf), k, kept)
    var = _slot_sums(np.einsum("abc,abc->ac", devf, devf), k, kept)
    return _statistics(piv, corr, var, count, outs, with_mean, devf.reshape(xb.shape))


def _map_block(src: Any, ob: Any, axis: int, pivot: Any, corr: Any, scale: Any, target: Any) -> None:
    """``ob = ((src - pivot) - corr) * scale + target`` for a block, the lane constants in the
    statistics' shape over ``axis``: ``src`` None, ``ob`` holds ``src - pivot`` already;
    ``pivot`` None, ``src * scale + target`` (``corr`` unused).  On the folded views where
    the blocks fold (:func:`_fold_slots`); the same operations per element either way."""
    k = _fold_of(ob, axis) if src is None or src.flags.c_contiguous else 0
    if k:
        kept = kept_shape(ob.shape, axis)
        ob = _folded(ob, axis, k)
        src = None if src is None else _folded(src, axis, k)
        pivot, corr = (None if c is None else _tiled(c, kept, axis, k) for c in (pivot, corr))
        scale, target = _tiled(scale, kept, axis, k), _tiled(target, kept, axis, k)
    if src is not None and pivot is None:
        np.multiply(src, scale, out=ob)
    else:
        if src is not None:
            np.subtract(src, pivot, out=ob)
        ob -= corr
        ob *= scale
    ob += target


def _block_stats(
    xb: Any, axis: int, mb: Any, dev: Any, masked: Any, outs: tuple[Any, ...] | None = None,
    with_mean: bool = True,
) -> Stats:  # fmt: skip
    """Statistics of one block into ``outs = (mean, var, pivot, corr)``, returned as
    :class:`Stats` with ``dev``; None (for ``outs`` or ``dev``): new arrays.  Without
    ``with_mean`` the mean (``pivot + corr``) is left out (None; ``outs[0]`` not written):
    a full step's map about the pivot does not use x's own mean, nor does a float32 partial
    step, which forms it in float64 (:func:`wide_mean`).

    The shifted algorithm of :func:`_stats` (section comment above), all but the first sum
    reading the block from cache.  ``dev`` receives ``x - pivot`` for every token (masked ones
    too); ``masked`` (needed only with a mask) is scratch for the centred values with masked
    tokens zeroed, so huge or non-finite padding never enters a sum.

    Outputs not given are allocated by the reductions themselves, and the ufuncs take their
    arguments positionally: at small sizes a separate ``np.empty`` per output and a call's
    keyword parsing are a tenth of the statistics' time.

    A float32 block with a token axis over :data:`F32_TOKENS` long takes
    :func:`_wide_block_stats` instead: NumPy sums a non-contiguous axis one row after another,
    and in float32 such an axis lost the pivot (T = 262144 tokens of 1e5 + N(0, 1): pivot 1600
    spreads off, sigma 7x too large; a constant lane of 4096 tokens got a spread of 6e-7
    where it has none).
    """
    # (and only into a C-contiguous dev buffer, which its folded view must be, not a copy)
    if mb is None and (dev is None or dev.flags.c_contiguous) and (k := _fold_of(xb, axis)):
        return _folded_block_stats(xb, axis, k, dev, outs, with_mean)
    if xb.shape[axis] > F32_TOKENS and xb.dtype.itemsize < 8:
        return _wide_block_stats(xb, axis, mb, dev, masked, outs, with_mean)
    _, var_o, piv_o, corr_o = (None, None, None, None) if outs is None else outs
    # Sums by np.add.reduce(array, axis, dtype, out, keepdims), not np.sum: the same reduction
    # without np.sum's Python layer (about 3 us a call, the cost of the whole sum at small
    # sizes).  A reduction rather than a product with a ones row: the reference's order of
    # summation (the same bits, and the same NaN-or-infinite lanes where a variance overflows),
    # and no BLAS threads fighting the batch-block threads of _run_blocks (measured: 0.45 ->
    # 0.6 of copy bandwidth for zoom_shift at (64, 512, 256) float32 on 2 cores).  On one
    # thread the product is faster between the tiny and the blocked sizes (11-29%,
    # benchmarks/RESULTS.md, forty-ninth session), not taken for those two reasons
    total: Any = np.add.reduce  # (Any: the stubs do not take keepdims positionally)
    divide = np.divide  # (see _statistics)
    # the token sums by einsum where the channels are the inner axis (see _axis_sum); the
    # size first: a tiny call pays one comparison
    lanes = xb.size > _EINSUM_ELEMENTS and math.prod(xb.shape[axis + 1 :]) > 1
    kept = kept_shape(xb.shape, axis) if lanes else ()
    if mb is None:
        count: Any = _constant(xb.dtype, xb.shape[axis])
        if lanes:
            piv = _einsum_into(_axis_sum(xb.ndim, axis), piv_o, kept, axis, xb)
        else:
            piv = total(xb, axis, None, piv_o, True)
        divide(piv, count, piv)
        dev = np.subtract(xb, piv, dev)
        src = dev
    else:
        full = np.broadcast_to(_expand_mask(np, mb, xb.ndim), xb.shape)
        count = total(full, axis, native_dtype(xb.dtype), None, True)  # (">f8" refused there)
        piv = total(xb, axis, None, piv_o, True, where=full)
        divide(piv, count, piv)
        dev = np.subtract(xb, piv, dev)
        masked[...] = 0
        np.copyto(masked, dev, where=full)
        src = masked
    if lanes:
        corr = _einsum_into(_axis_sum(xb.ndim, axis), corr_o, kept, axis, src)
    else:
        corr = total(src, axis, None, corr_o, True)
    if src.size <= _SMALL_ELEMENTS:
        # a small block: the squares in a temporary, then one reduction (einsum's Python
        # wrapper costs more than that temporary below this size)
        var = total(np.multiply(src, src), axis, None, var_o, True)
    else:  # the sum of squares without an x-sized temporary
        var = _einsum_into(_square_sum(xb.ndim, axis), var_o, piv.shape, axis, src, src)
    return _statistics(piv, corr, var, count, outs, with_mean, dev)


def _statistics(piv: Any, corr: Any, var: Any, count: Any, outs: tuple[Any, ...] | None, with_mean: bool,
                dev: Any) -> Stats:  # fmt: skip
    """The shifted algorithm's statistics in the block's own dtype (a short axis, or float64):
    from the pivot and the sums of the deviations and of their squares (``corr``, ``var``,
    divided in place where no output is given for them), ``outs`` = (mean, var, pivot, corr)
    for the results (None: new arrays).  The one home of these rules for the unfolded and the
    folded blocks (:func:`_block_stats`, :func:`_folded_block_stats`)."""
    mean_o, var_o, _, corr_o = (None, None, None, None) if outs is None else outs
    # Divisions by the count as np.divide(a, count, out): the same ufunc as ``/=``, without
    # the operator's deferral checks, which cost about 0.25 us a call with a 0-d count
    corr = np.divide(corr, count, corr if corr_o is None else corr_o)
    var = np.divide(var, count, var if var_o is None else var_o)
    np.subtract(var, np.multiply(corr, corr), var)
    # rounding can go below 0; NaN stays (out= by keyword: NumPy deprecates it positional here)
    np.maximum(var, _constant(var.dtype, 0), out=var)
    return Stats(np.add(piv, corr, mean_o) if with_mean else None, var, piv, corr, dev)


def _wide_block_stats(
    xb: Any, axis: int, mb: Any, dev: Any, masked: Any, outs: tuple[Any, ...] | None = None,
    with_mean: bool = True,
) -> Stats:  # fmt: skip
    """:func:`_block_stats` of a float32 block with a token axis over :data:`F32_TOKENS` long:
    the same shifted algorithm, its sums accumulated in float64 and each statistic rounded
    once into the block's dtype.  The mean is one sum accumulating in float64 (a constant
    lane's is exact: its spread stays 0), the pivot that mean rounded to float32, and the
    correction ``sum(x - pivot) / n`` their difference, exact in float64: the float64 mean
    already holds what a sum of the deviations would recover (and more precisely than their
    float32 partial sums), so no pass over the deviations is spent on it.  The squared
    deviations' sum, whose terms are of the spread's size, is float32 sums of chunks of
    ``F32_TOKENS`` tokens added in float64 (:func:`_chunked_square_sum`), so that at most
    ``F32_TOKENS`` terms round in float32 whatever the axis' length, as on a short axis.  No
    copy of the block is made (a float64 one cost 3x the memory and 2.4x the time where a
    block is one large sample)."""
    dtype = native_dtype(xb.dtype)  # (">f4" refused as an output dtype)
    piv_o = None if outs is None else outs[2]
    kept = kept_shape(xb.shape, axis)
    total: Any = np.add.reduce  # (Any: the stubs do not take keepdims positionally)
    if mb is None:
        count: Any = float(xb.shape[axis])
        piv64 = np.einsum(_axis_sum(xb.ndim, axis), xb, dtype=np.float64, casting="safe").reshape(kept)
    else:
        full = np.broadcast_to(_expand_mask(np, mb, xb.ndim), xb.shape)
        count = total(full, axis, np.float64, None, True)
        piv64 = total(xb, axis, np.float64, None, True, where=full)
    mean64 = np.divide(piv64, count, piv64)
    piv = _rounded_into(piv_o, mean64, dtype, kept)
    dev = np.subtract(xb, piv, dev)
    src = dev
    if mb is not None:
        masked[...] = 0
        np.copyto(masked, dev, where=full)
        src = masked
    return _wide_statistics(mean64, piv, _chunked_square_sum(src, axis), count, outs, kept, with_mean, dev)


def _wide_statistics(mean64: Any, piv: Any, squares: Any, count: Any, outs: tuple[Any, ...] | None,
                     kept: tuple[int, ...], with_mean: bool, dev: Any) -> Stats:  # fmt: skip
    """A float32 long axis' statistics (:func:`_wide_block_stats`), rounded once into the
    pivot's dtype, from the float64 mean, the pivot (that mean rounded) and the float64 sum
    of the squared deviations; ``outs`` = (mean, var, pivot, corr) for the results (None:
    new arrays).  The one home of these rules for the unfolded and the folded blocks
    (:func:`_wide_block_stats`, :func:`_folded_block_stats`)."""
    mean_o, var_o, _, corr_o = (None, None, None, None) if outs is None else outs
    dtype = piv.dtype
    # (float64 minus its own float32 rounding: exact, and mean = pivot + corr is the float64
    # mean itself)
    corr64 = mean64 - piv
    var64 = squares / count - corr64 * corr64
    np.maximum(var64, 0.0, out=var64)  # rounding can go below 0; NaN stays
    corr = _rounded_into(corr_o, corr64, dtype, kept)
    var = _rounded_into(var_o, var64, dtype, kept)
    # the mean as pivot + correction (the float64 mean itself where both are finite): a lane
    # with an infinite token has a NaN correction (inf - inf), and so a NaN mean, as on every
    # other path and the reference, where the float64 mean alone was inf (a review's find)
    mean = _rounded_into(mean_o, piv + corr64, dtype, kept) if with_mean else None
    return Stats(mean, var, piv, corr, dev)


def _chunked_square_sum(a: Any, axis: int) -> Any:
    """The sum of ``a``'s squares over ``axis`` (kept), in float64: float32 sums of chunks of
    :data:`F32_TOKENS` tokens (a view with the axis split in two, reduced over the chunk by
    einsum, without an ``a``-sized temporary), added in float64, and the last partial
    chunk's squares summed in float64 directly."""
    total: Any = np.add.reduce  # (Any: the stubs do not take keepdims positionally)
    n = a.shape[axis]
    main = n - n % F32_TOKENS
    before, after = a.shape[:axis], a.shape[axis + 1 :]
    first, last = (slice(None),) * axis + (slice(0, main),), (slice(None),) * axis + (slice(main, n),)
    out = np.zeros((*before, 1, *after))
    if main:
        view = a[first].reshape((*before, main // F32_TOKENS, F32_TOKENS, *after))
        partial = np.einsum(_square_sum(view.ndim, axis + 1), view, view)
        total(partial, axis, np.float64, out, True)
    if main < n:
        out += total(np.square(a[last], dtype=np.float64), axis, np.float64, None, True)
    return out


def _rounded_into(out: Any, value: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    """``value`` (float64) rounded into ``out``, or into a new array of ``dtype``."""
    if out is None:
        out = np.empty(shape, dtype=dtype)
    np.copyto(out, value, casting="same_kind")
    return out


# --------------------------------------------------------------------------- the map rules


def zoom(x: Any, scale: Any, *, center: Any) -> Any:
    """``center + (x - center) * scale``."""
    return center + (x - center) * scale


def shift(x: Any, offset: Any) -> Any:
    """``x + offset``."""
    return x + offset


def spread(xp: Any, var: Any, eps: float) -> Any:
    """``sigma = sqrt(var + eps)``, the spread every map rule takes.

    At ``eps = 0`` a lane with no spread (one unmasked token, or equal values) has sigma = 0,
    where sqrt's derivative is infinite and autograd's chain gives ``inf * 0 = NaN``.  There
    the spread's derivative is taken as 0: sqrt is evaluated away from 0 and the lane takes
    ``var`` itself (0, or NaN, which stays NaN).  For a single unmasked token that is the
    exact derivative (its spread stays 0 under any small change); for equal values, where
    sqrt(var) has a corner, it is the subgradient 0, the term the custom ops' closed-form
    backwards drop.  Same values as ``sqrt(var + eps)`` everywhere.
    """
    if eps != 0:
        return xp.sqrt(var + eps)
    live = var > 0
    return xp.where(live, xp.sqrt(xp.where(live, var, 1.0)), var)


# From 2**-120 on, eps keeps every spread positive: sqrt(var + eps) is at least sqrt(eps) =
# 2**-60 in every dtype the statistics take (var >= 0; NaN and inf are not 0), and so is every
# zoomed spread (s sigma, about (sigma_t / sigma)^alpha sigma: between the two).  No lane is
# then "without spread", and the rules may skip their tests for one (``where`` on
# ``sigma != 0``): the same values in fewer operations (the tiny NumPy zoom_shift of
# benchmarks/overhead.py took 56-59 us with the tests, 49-50 without).  Not from float32's
# smallest normal number, 2**-126, on: a scale s = sigma_t / sigma of sqrt(2**-126) / 2**64 is
# subnormal, which hardware set to flush such results to zero (XLA on the CPU,
# torch.set_flush_denormal) made 0, and the zoomed spread's sqrt(eps) / (s sigma) inf, NaN
# outputs where the tests give finite ones (a review's find); from 2**-120 every such scale is
# at least 2**-60 / 2**64.5, a normal float32 number.  Smaller eps (the public calls take
# 2**-126 on, check_eps_dtype; a direct op call may pass less) keep the tests.
_EPS_KEEPS_SPREAD = 2.0**-120


def spreads_positive(eps: float) -> bool:
    """Whether ``eps`` keeps every spread positive (:data:`_EPS_KEEPS_SPREAD`)."""
    return eps >= _EPS_KEEPS_SPREAD


def live_lanes(sigma: Any, eps: float) -> Any:
    """The lanes with spread, as :func:`zoom_scale` and :func:`where_live` take them: True on
    every lane where ``eps`` keeps every spread positive (:func:`spreads_positive`: no
    operator), else ``sigma != 0`` (a NaN spread is a spread)."""
    return True if spreads_positive(eps) else sigma != 0


def zoom_scale(xp: Any, sigma: Any, target: Any, alpha: float, live: Any = None) -> Any:
    """``(target / sigma) ** alpha``, and 1 where ``sigma == 0`` (no spread: nothing to zoom),
    or where ``live`` (a boolean array, when given) is False; ``live`` True: every lane has
    spread (:func:`spreads_positive`), no test.

    Uses only ``where`` with a Python scalar, so it also traces under ``torch.compile``.  For
    alpha < 1 the power's infinite derivative at ``target = 0`` (a guide with no spread, at
    eps = 0) is taken as 0 (:func:`_power`).  A NaN spread (a NaN among the lane's unmasked
    tokens) gives a NaN scale: "no spread" is ``sigma == 0`` exactly, not ``not sigma > 0``,
    which would take NaN for it and return finite values computed without the NaN.
    """
    if live is True:
        ratio = target / sigma
        return ratio if alpha == 1.0 else _power(xp, ratio, alpha)
    if live is None:
        live = sigma != 0
    if type(sigma) is type(target) is np.ndarray and sigma.shape == target.shape:
        # Delegation: NumPy's divide fills the no-spread lanes with 1 in the same call
        # (``where=``, into a ones buffer), where the generic form's two ``where`` with a
        # Python scalar cost about 1.5 us each at small sizes.  The power of those lanes'
        # ratio 1 is 1: the same values for every alpha.
        ratio = np.divide(target, sigma, _filled(sigma, 1.0), where=live)
        return ratio if alpha == 1.0 else _power(xp, ratio, alpha)
    ratio = target / xp.where(live, sigma, 1.0)
    return xp.where(live, ratio if alpha == 1.0 else _power(xp, ratio, alpha), 1.0)


def where_live(xp: Any, live: Any, value: Any, other: Any) -> Any:
    """``xp.where(live, value, other)`` (``xp`` a namespace, or torch itself), or ``value``
    itself where ``live`` is True (every lane has spread: :func:`spreads_positive`; as
    :func:`zoom_scale` takes it): the closed-form backwards' guards of the lanes without
    spread, no operator where there are none."""
    return value if live is True else xp.where(live, value, other)


def _filled(like: Any, value: float) -> Any:
    """A new NumPy array of ``like``'s shape and dtype holding ``value`` (``np.full`` is a
    Python function: twice the time of these two C calls at small sizes)."""
    out = np.empty(like.shape, dtype=like.dtype)
    out.fill(value)
    return out


def _power(xp: Any, v: Any, p: float) -> Any:
    """``v ** p`` for ``v >= 0`` and ``0 < p < 1``, with its derivative at ``v = 0`` (infinite)
    taken as 0: the power is evaluated away from 0 (same values; NaN stays NaN).  A base of 0
    is a spread that stays 0 (:func:`spread`), so no derivative is lost."""
    flat = v == 0
    return xp.where(flat, 0.0, xp.where(flat, 1.0, v) ** p)


def _target_mean(mean: Any, g_mean: Any, alpha: float) -> Any:
    """``mean + alpha (g_mean - mean)`` as a convex combination: exactly g_mean at alpha = 1."""
    return g_mean if alpha == 1.0 else (1 - alpha) * mean + alpha * g_mean


def zoom_shift_map(
    xp: Any, st: Stats, g_mean: Any, g_sigma: Any, alpha: float, eps: float
) -> tuple[Any, Any]:
    """The Zoom-and-Shift step as a map about x's pivot: ``(s, target)`` with
    ``y = ((x - pivot) - corr) s + target``.

    ``s = (sigma_g / sigma_x) ** alpha`` and ``target = mu_x + alpha (mu_g - mu_x)``, since
    ``x - mu_x = (x - pivot) - corr``.  The correction is taken off the centred values before
    the zoom, not folded into the offset as ``target - corr s``: a pivot off the mean by a few
    of its ulps (a float32 sum) times a large zoom (a lane with no spread) made ``corr s``
    large beside the output, and the sum of ``(x - pivot) s`` and that offset cancelled (lanes
    of a constant 1e8 in float32 came out 3% off the guide's mean where they are exactly it;
    a review's find).  Here a constant lane's ``(x - pivot) - corr`` is exactly 0.  The rule
    every implementation written in Python applies (the compiled kernels carry their own
    transcription, checked by the same tests).
    """
    sigma = spread(xp, st.var, eps)
    s = zoom_scale(xp, sigma, g_sigma, alpha, live_lanes(sigma, eps))
    if alpha == 1.0:
        return s, g_mean
    # a partial step mixes x's mean with the guide's, which may cancel: in float64 where
    # float32 widens (wide_mean; the guide's from guide_mean), the target rounded once
    return s, _rounded(xp, _target_mean(wide_mean(xp, st), g_mean, alpha), st.var.dtype)


def wide_mean(xp: Any, st: Stats) -> Any:
    """The mean of statistics ``st``, in float64 as ``pivot + corr`` (exact unless corr is
    below about 2**-29 of the pivot, and then within half a float64 ulp) where they are
    float32 and the namespace has float64 (:func:`widens_float32`), else ``st.mean``: the
    mean that steps combining means take (:func:`round_statistics`, :func:`zoom_shift_map`)."""
    if not widens_float32(xp, st.var):
        return st.mean
    if type(st.pivot) is np.ndarray:  # one ufunc adding in float64 (the same exact sum)
        return np.add(st.pivot, st.corr, dtype=np.float64)
    return _rounded(xp, st.pivot, xp.float64) + _rounded(xp, st.corr, xp.float64)


def guide_mean(xp: Any, g: Stats, alpha: float) -> Any:
    """The guide's mean a Zoom-and-Shift map of step ``alpha`` takes (:func:`zoom_shift_map`):
    its rounded mean at alpha = 1, where it is the target itself, else :func:`wide_mean`."""
    return g.mean if alpha == 1.0 else wide_mean(xp, g)


# --------------------------------------------------------------------------- primitives
#
# An implementation of the alignment operators supplies two passes over the data: statistics
# about a pivot (:class:`Stats`), and the affine map about a pivot; and it may supply
# zoom_shift fused (statistics and map of a block while it is in cache).  The algorithms
# (moments_with, zoom_shift_with, align_with: the map rules, the rounds and their limit) are
# written once, over these primitives.


class Primitives:
    """The Array-API primitives: any namespace, autograd flows through, ``torch.compile``
    traces them.  Backends subclass it (NumPy's blocked buffers, numba's kernels)."""

    def stats(self, x: Any, axis: int, mask: Any, *, keep_dev: bool = False, with_mean: bool = True) -> Stats:
        """:class:`Stats` of x over ``axis`` (non-negative), masked tokens excluded; ``dev``
        kept with ``keep_dev``.  ``with_mean`` False: the caller does not read the mean, which
        these primitives then leave out (None; the others may compute it anyway)."""
        return _stats(x, axis, mask, keep_dev=keep_dev, with_mean=with_mean)

    def apply(
        self, x: Any, axis: int, pivot: Any, corr: Any, scale: Any, target: Any, dev: Any = None
    ) -> Any:
        """``((x - pivot) - corr) * scale + target`` in x's dtype, computed in the statistics'
        dtype (float16: round once): :func:`zoom_shift_map`'s rule.  ``pivot`` None (``corr``
        unused): ``x * scale + target``, for identity maps (scale 1, target 0), which then copy
        x exactly.  ``dev``: ``x - pivot`` if at hand (from :meth:`stats` with ``keep_dev``,
        for this call only: an implementation may write the map into it).

        Folding a map into ``x * s + (target - mean s)`` would lose ``|mean| s`` ulps to
        cancellation (data 1e4 + 1e-2 noise zoomed to unit spread: 6% of the output's spread
        in float32); ``x - pivot`` is exact near the mean.
        """
        xp = array_namespace(x)
        if pivot is None:
            if scale.dtype != x.dtype:
                return xp.astype(xp.astype(x, scale.dtype) * scale + target, x.dtype)
            return x * scale + target
        if dev is None:
            dev = (x if pivot.dtype == x.dtype else xp.astype(x, pivot.dtype)) - pivot
        y = (dev - corr) * scale + target
        return y if y.dtype == x.dtype else xp.astype(y, x.dtype)  # float16: round once

    def zoom_shift(
        self, x: Any, axis: int, mask: Any, g_mean: Any, g_sigma: Any, alpha: float, eps: float
    ) -> Any:
        """x zoomed and shifted toward guide statistics (``g_sigma = sqrt(var_g + eps)``)."""
        # (x's own mean enters the map only for a partial step: zoom_shift_map)
        st = self.stats(x, axis, mask, keep_dev=True, with_mean=alpha != 1.0)
        s, target = zoom_shift_map(array_namespace(st.var), st, g_mean, g_sigma, alpha, eps)
        return self.apply(x, axis, st.pivot, st.corr, s, target, st.dev)


class NumPyPrimitives(Primitives):
    """NumPy, float32 / float64: the batch walked in cache-sized blocks (threads for large
    inputs), so each pass reads x from memory once, and :meth:`zoom_shift` maps each block
    right after reducing it (one read of x in all)."""

    def stats(self, x: Any, axis: int, mask: Any, *, keep_dev: bool = False, with_mean: bool = True) -> Stats:
        return _stats_numpy(x, axis, mask)

    def apply(
        self, x: Any, axis: int, pivot: Any, corr: Any, scale: Any, target: Any, dev: Any = None
    ) -> Any:
        if dev is not None and pivot is not None:  # the statistics' own buffer (one block)
            _map_block(None, dev, axis, None, corr, scale, target)
            return dev
        return _apply_numpy(x, axis, scale, target, pivot, corr)

    def zoom_shift(
        self, x: Any, axis: int, mask: Any, g_mean: Any, g_sigma: Any, alpha: float, eps: float
    ) -> Any:
        return _zoom_shift_numpy(x, axis, mask, g_mean, g_sigma, alpha, eps)


GENERIC = Primitives()
NUMPY = NumPyPrimitives()


def _apply_numpy(x: Any, axis: int, scale: Any, target: Any, pivot: Any = None, corr: Any = None) -> Any:
    out = np.empty(x.shape, dtype=x.dtype)

    def work(blocks: list[slice]) -> None:
        for blk in blocks:  # later passes re-read the block from cache, not from memory
            piv, cor = (None, None) if pivot is None else (pivot[blk], corr[blk])
            _map_block(x[blk], out[blk], axis, piv, cor, scale[blk], target[blk])

    _run_blocks(x, work)
    return out


def _zoom_shift_numpy(
    x: Any, axis: int, mask: Any, g_mean: Any, g_sigma: Any, alpha: float, eps: float
) -> Any:
    """One read of x: per cache-sized block, statistics then the affine map, in place.

    ``out`` first holds ``x - pivot`` (the centred values the variance needs), and is then
    corrected, scaled and shifted in place by :func:`zoom_shift_map`'s rule.
    """
    out = np.empty(x.shape, dtype=x.dtype)
    if _one_block(x):  # one block, on this thread: no block bookkeeping
        scratch = None if mask is None else np.empty(x.shape, dtype=x.dtype)
        _zoom_shift_block(x, axis, mask, out, scratch, None, g_mean, g_sigma, alpha, eps)
        return out

    def work(blocks: list[slice]) -> None:
        rows = max(b.stop - b.start for b in blocks)
        shape = kept_shape((rows, *x.shape[1:]), axis)
        stats = tuple(np.empty(shape, dtype=x.dtype) for _ in range(4))  # mean, var, pivot, corr
        masked = None if mask is None else np.empty((rows, *x.shape[1:]), dtype=x.dtype)
        for blk in blocks:
            n = blk.stop - blk.start
            mk = None if mask is None else mask[blk]
            sub = None if masked is None else masked[:n]
            outs = tuple(a[:n] for a in stats)
            _zoom_shift_block(x[blk], axis, mk, out[blk], sub, outs, g_mean[blk], g_sigma[blk], alpha, eps)

    _run_blocks(x, work)
    return out


def _zoom_shift_block(
    xb: Any, axis: int, mb: Any, ob: Any, masked: Any, outs: Any, g_mean: Any, g_sigma: Any,
    alpha: float, eps: float,
) -> None:  # fmt: skip
    """One block: its statistics (``ob`` receiving ``x - pivot``), then :func:`zoom_shift_map`'s
    map applied to ``ob`` in place."""
    # x's own mean enters the map only for a partial step (_target_mean), and there as
    # pivot + corr in float64 where float32 widens (wide_mean)
    st = _block_stats(xb, axis, mb, ob, masked, outs, alpha != 1.0 and not widens_float32(np, xb))
    s, target = zoom_shift_map(np, st, g_mean, g_sigma, alpha, eps)
    _map_block(None, ob, axis, None, st.corr, s, target)


# --------------------------------------------------------------------------- moments, zoom_shift


def moments_with(prims: Primitives, x: Any, *, axis: int, mask: Any, eps: float) -> tuple[Any, Any]:
    """``(mean, sqrt(var + eps))`` over ``axis`` (kept), in x's dtype."""
    st = prims.stats(x, axis % x.ndim, mask)
    xp = array_namespace(st.var)
    mean, std = st.mean, spread(xp, st.var, eps)
    if mean.dtype != x.dtype:
        mean, std = xp.astype(mean, x.dtype), xp.astype(std, x.dtype)
    return mean, std


def zoom_shift_with(
    prims: Primitives, x: Any, guide: Any, *, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Any:
    """``mu_x + (x - mu_x) * (sigma_g / sigma_x) ** alpha + alpha * (mu_g - mu_x)``: the
    guide's statistics, then x's statistics and one map about x's pivot
    (:func:`zoom_shift_map`)."""
    ax = axis % x.ndim
    g = prims.stats(guide, ax, guide_mask)
    xp = array_namespace(g.var)
    return prims.zoom_shift(x, ax, mask, guide_mean(xp, g, alpha), spread(xp, g.var, eps), alpha, eps)


def moments(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments`, generic Array-API path."""
    return moments_with(GENERIC, x, axis=axis, mask=mask, eps=eps)


def moments_numpy(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """:func:`mmfuse.moments`, NumPy's blocked path (float32 / float64)."""
    return moments_with(NUMPY, x, axis=axis, mask=mask, eps=eps)


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
    """:func:`mmfuse.zoom_shift`, generic Array-API path."""
    return zoom_shift_with(
        GENERIC, x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps
    )


def zoom_shift_numpy(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """:func:`mmfuse.zoom_shift`, NumPy's blocked path: x is read from memory once."""
    return zoom_shift_with(NUMPY, x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)


# --------------------------------------------------------------------------- alignment


def limit_weights(n: int, alpha: float, schedule: str, topology: str, hub: int) -> tuple[float, ...] | None:
    """Weights w with ``z_i -> sum_j w_j z_j`` for every modality i as rounds -> infinity.

    ``z`` is either coordinate of the statistics ``(mu, log sigma)``: both follow the same
    linear round map ``A`` (an M x M row-stochastic matrix), so ``A**k -> 1 w^T`` where w is the
    left fixed vector of A (the weights of the quantity a round leaves invariant):

    - hub: the hub never moves and the others contract toward it by (1 - alpha) per round,
      so w = e_hub;
    - Jacobi consensus: A = (1 - alpha) I + alpha (J - I) / (M - 1) is symmetric and doubly
      stochastic (the plain average is invariant, w = 1/M) with eigenvalues 1 and
      1 - alpha M / (M - 1); it converges unless that is -1 (M = 2, alpha = 1: a swap);
    - Gauss-Seidel consensus: step i adds alpha (S - M z_i) / (M - 1) to z_i (S the total),
      and over one full sweep ``sum_j ((M - 1)(1 - alpha) + alpha j) z_j`` is invariant
      (for M = 2: (1 - alpha) a + b), so w_j is proportional to (M - 1)(1 - alpha) + alpha j.

    Returns ``None`` when the iteration has no limit.
    """
    if topology == "hub":
        return tuple(1.0 if j == hub else 0.0 for j in range(n))
    if schedule == "jacobi":
        # the eigenvalue 1 - alpha M / (M - 1) is -1 only there (alpha in (0, 1]); tested
        # without forming it: 1 - (a tiny alpha's term) rounded to 1 and refused alpha below
        # 3e-17 as if it were that swap (a review's find)
        if alpha * n >= 2 * (n - 1):
            return None
        return tuple(1.0 / n for _ in range(n))
    c = [(n - 1) * (1.0 - alpha) + alpha * j for j in range(n)]
    total = sum(c)
    return tuple(v / total for v in c)


def _var_share(xp: Any, var: Any, eps: float) -> Any:
    """``var / (var + eps)`` (None for eps = 0, where it is not needed); NaN stays NaN."""
    if eps == 0:
        return None
    den = var + eps
    if spreads_positive(eps):  # den >= eps > 0 on every lane: no test (same values)
        return var / den
    live = den != 0
    if type(var) is np.ndarray:
        # Delegation, as in zoom_scale: one divide with ``where=`` into a zeroed buffer, for
        # two ``where`` with a Python scalar (about 0.85 us each at small sizes); same values
        return np.divide(var, den, _filled(den, 0.0), where=live)
    return xp.where(live, var / xp.where(live, den, 1.0), 0.0)


def _zoomed_spread(xp: Any, sigma: Any, share: Any, s: Any, eps: float) -> tuple[Any, Any]:
    """``sqrt(s**2 var + eps)`` and the new ``var / (var + eps)``, from ``sigma = sqrt(var +
    eps)`` and ``share = var / (var + eps)``: never forms ``s**2`` or the variance, which can
    overflow float32 where the spreads do not (a spread of 1e-3 zoomed to 1e18: ``s**2`` is
    1e42), and ``z = s sigma >= sqrt(eps)`` keeps ``eps / z**2 <= 1``."""
    z = s * sigma
    if eps == 0:
        return z, share
    root_eps = math.sqrt(eps)
    if spreads_positive(eps):  # z > 0 on every lane: no test (same values)
        q = root_eps / z
        total = share + q * q
        return z * xp.sqrt(total), share / total
    live = z != 0  # NaN stays NaN (zoom_scale)
    if type(z) is type(share) is np.ndarray and share.shape == z.shape:
        # Delegation, as in zoom_scale: each ``where`` with a Python scalar becomes the ufunc's
        # ``where=`` into a buffer holding that scalar (the lanes it leaves alone); same values
        q = np.divide(root_eps, z, _filled(z, root_eps), where=live)
        total = np.multiply(q, q, q)
        total += share
        sig = np.multiply(z, np.sqrt(total), _filled(z, root_eps), where=live)
        return sig, np.divide(share, total, _filled(z, 0.0), where=live)
    q = root_eps / xp.where(live, z, 1.0)
    total = share + q * q
    return xp.where(live, z * xp.sqrt(total), root_eps), xp.where(live, share / total, 0.0)


# The rounds' running state per modality: means, spreads, variance shares, composed scales
# (None until a round first touches the modality)
_RoundState = tuple[list[Any], list[Any], list[Any], list[Any]]


def _round_maps(
    xp: Any,
    stats: list[tuple[Any, Any]],
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    eps: float,
) -> list[tuple[Any, Any, bool]]:
    """Per modality ``(S, M, moved)``: the output is ``S (x - mu) + M``.

    ``stats`` holds each modality's ``(mean, var)``.  The rounds track each modality's mean
    and ``sigma = sqrt(var + eps)`` (with ``var / (var + eps)``), never the variance itself.
    ``moved`` is False for a modality the rounds never touched (the hub, or every modality at
    rounds = 0), whose map is exactly the identity (``S`` = 1, ``M`` its mean).

    Only what a later step reads is computed: a modality's new spread is tracked unless no
    step after it reads it (in the last round: every modality under Jacobi, whose targets
    come from the round's start, and the hub topology, where only the hub is read; the last
    modality under Gauss-Seidel consensus), and ``var / (var + eps)`` is formed when first
    needed.  At M = 2, rounds = 1 that is one spread update instead of two.
    """
    n = len(stats)
    mus = [m for m, _ in stats]
    sig = [spread(xp, v, eps) for _, v in stats]
    if rounds is None:
        return _limit_maps(xp, mus, [v for _, v in stats], alpha, schedule, topology, hub, eps)
    # share: var / (var + eps), once a spread update needs it; scales: the composed zooms
    state: _RoundState = (mus, sig, [None] * n, [None] * n)
    # At eps > 0 a lane with no spread (variance 0) is zoomed by 1 in every round, as in the
    # limit and as at eps = 0 (where its sigma is 0): its spread stays sqrt(eps), so each
    # round's (sigma_t / sqrt(eps)) ** alpha compounded (geometrically under the hub
    # topology), the map's folded offset target - corr S cancelled (float64, 40 rounds: 0 where 5.26
    # was due) and S overflowed (0 * inf = NaN from 20 rounds in float32).  Such a lane maps
    # to its target mean whatever the scale; its slope along x is now 1, as at eps = 0.
    live = [v != 0 for _, v in stats] if eps > 0 else [None] * n
    options = (alpha, schedule, topology, hub, eps, live)
    if rounds > 2 and _jax_staged(mus[0]):
        # Delegation: under a JAX trace the middle rounds are one loop (lax.fori_loop: a scan,
        # differentiable), so the program does not grow with them; unrolled, compiling 50
        # rounds took 26 s.  The first round fills the state's None entries and the last
        # skips the spreads no later step reads: both stay outside the loop.
        import jax

        def middle(_: Any, state: _RoundState) -> _RoundState:
            return _one_round(xp, stats, state, False, *options)

        state = _one_round(xp, stats, state, False, *options)
        state = jax.lax.fori_loop(1, rounds - 1, middle, state)
        state = _one_round(xp, stats, state, True, *options)
    else:
        for r in range(rounds):
            state = _one_round(xp, stats, state, r == rounds - 1, *options)
    mus, _, _, scales = state
    out = []
    for i, s in enumerate(scales):
        if s is None:  # never moved: the identity
            like = stats[i][0]
            # (ones_like: the per-chunk maps pass NumPy itself, whose full() took no device=
            # before NumPy 2.0; a review's find)
            out.append((xp.ones_like(like), mus[i], False))
        else:
            out.append((s, mus[i], True))
    return out


def _jax_staged(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer staged out by ``jit`` (under ``jit(vmap)`` too), where a
    loop is one primitive of the program.  The tracers of eager transforms (``grad``, ``jvp``,
    ``vmap``) wrap concrete arrays, and a loop there would be compiled again on every call
    (its body a new closure each time: an eager ``vmap`` of ``align`` with 10 rounds compiled
    twice, 300 ms, on every call, where the rounds as Python steps take 16 ms after the
    first; a review's find).  Each tracer is unwrapped to what it carries (``val`` of a batch
    or jaxpr tracer, ``primal`` of a JVP one): under ``jit`` the innermost is a jaxpr variable,
    not an array."""
    # (None: no JAX, or one another thread still imports; see half_imported)
    tracer = getattr(getattr(sys.modules.get("jax"), "core", None), "Tracer", None)
    if tracer is None or not isinstance(x, tracer):
        return False
    jax = sys.modules["jax"]
    for _ in range(64):  # (the transforms' nesting)
        if not isinstance(x, jax.core.Tracer):
            return not isinstance(x, jax.Array)
        inner = getattr(x, "val", getattr(x, "primal", None))
        if inner is None:  # another kind of tracer: staged unless it carries its value
            concrete = getattr(x, "to_concrete_value", None)  # JAX >= 0.4.36; before: staged
            return concrete is None or concrete() is None
        x = inner
    return True


def _one_round(
    xp: Any,
    stats: list[tuple[Any, Any]],
    state: _RoundState,
    last: bool,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    eps: float,
    live: list[Any],
) -> _RoundState:
    """One round of :func:`_round_maps` on its running state (``last``: the final round,
    whose spreads only a later step of the same round reads; ``live``: per modality, the
    lanes a zoom may scale, or None for zoom_scale's own rule)."""
    mus, sig, share, scales = state  # updated in place: the lists are _round_maps' own
    n = len(stats)
    src_mu, src_sig = (list(mus), list(sig)) if schedule == "jacobi" else (mus, sig)
    for i in range(n):
        if topology == "hub":
            if i == hub:
                continue
            mu_t, sigma_t = src_mu[hub], src_sig[hub]
        else:
            others = [src for j, src in enumerate(zip(src_mu, src_sig)) if j != i]
            mu_t = _arithmetic_mean([m for m, _ in others])
            sigma_t = _geometric_mean(xp, [g for _, g in others])
        s = zoom_scale(xp, sig[i], sigma_t, alpha, live[i])
        # y = s (x - mu_i) + mu_i + alpha (mu_t - mu_i), composed with x = S (x0 - mu0) + ...
        scales[i] = s if scales[i] is None else s * scales[i]
        read_later = not last or (schedule != "jacobi" and topology != "hub" and i < n - 1)
        if alpha == 1.0 and topology != "hub" and read_later:
            # The mean the later steps read: at alpha = 1 the target mean is mu_t exactly,
            # without the modality's own mean, but where that mean is not finite (a NaN or
            # an infinite token) the map's output is NaN, and so is its mean: 0 * mu_i is 0
            # or NaN (a later modality whose lane has no spread, zoomed by 1, had taken a
            # finite target for NaN; a review's find).  The hub's others are never read.
            mus[i] = mu_t + 0.0 * mus[i]
        else:
            mus[i] = _target_mean(mus[i], mu_t, alpha)
        if read_later:
            if share[i] is None:
                share[i] = _var_share(xp, stats[i][1], eps)
            sig[i], share[i] = _zoomed_spread(xp, sig[i], share[i], s, eps)
    return mus, sig, share, scales


def _round_maps_per_chunk(
    stats: list[tuple[Any, Any]],
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    eps: float,
) -> list[tuple[Any, Any, bool]]:
    """:func:`_round_maps` of Dask statistics: one task per chunk runs it in NumPy.

    The rounds are elementwise in the statistics, so each chunk's maps depend on that chunk
    alone.  Which modalities move depends on the options only, not on the values: it is read
    from the same rule run once on scalars (one round stands for any positive count).
    """
    from .chunks import elementwise_per_chunk

    n = len(stats)
    probe = [(np.zeros(()), np.ones(()))] * n
    moved = [m for _, _, m in _round_maps(np, probe, rounds and 1, alpha, schedule, topology, hub, eps)]

    maps_of_chunk = partial(_chunk_maps, rounds, alpha, schedule, topology, hub, eps)
    lazy = elementwise_per_chunk(maps_of_chunk, [a for pair in stats for a in pair], 2 * n)
    return [(lazy[2 * i], lazy[2 * i + 1], moved[i]) for i in range(n)]


def _chunk_maps(
    rounds: Any, alpha: float, schedule: str, topology: str, hub: int, eps: float, blocks: list[Any]
) -> list[Any]:
    """One chunk's maps for :func:`_round_maps_per_chunk` (module-level, so its graph pickles):
    ``blocks`` the chunk's (sigma, mean) of each modality, in turn."""
    pairs = list(zip(blocks[::2], blocks[1::2]))
    maps = _round_maps(np, pairs, rounds, alpha, schedule, topology, hub, eps)
    return [a for s, mu, _ in maps for a in (s, mu)]


def _arithmetic_mean(values: list[Any]) -> Any:
    k = len(values)
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out if k == 1 else out / k


def _geometric_mean(xp: Any, values: list[Any]) -> Any:
    k = len(values)
    out = values[0] if k == 1 else _power(xp, values[0], 1.0 / k)
    for v in values[1:]:
        out = out * _power(xp, v, 1.0 / k)
    return out


def _limit_maps(
    xp: Any,
    mus: list[Any],
    variances: list[Any],
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    eps: float,
) -> list[tuple[Any, Any, bool]]:
    """The exact limit of the rounds, eps > 0 included (:mod:`mmfuse._core.align_limit`).

    Every modality ends at ``mu* = sum w_j mu_j`` and one common raw variance ``v*``: the
    hub's, the geometric mean (Jacobi consensus), or the root of a scalar equation
    (Gauss-Seidel consensus); for eps = 0, ``sigma* = prod sigma_j^w_j``.
    """
    from .align_limit import limit_maps

    w = limit_weights(len(mus), float(alpha), schedule, topology, hub)
    if w is None:  # the public layer refuses this case; kept as a guard
        raise ValueError("this iteration has no limit (Jacobi consensus, M = 2, alpha = 1)")
    # (float32 statistics arrive here in float64 where the namespace has it: round_statistics)
    return limit_maps(xp, mus, variances, w, alpha=float(alpha), schedule=schedule, topology=topology,
                      hub=hub, eps=eps)  # fmt: skip


def round_statistics(
    xp: Any, stats: list[Stats], rounds: int | None, alpha: float, topology: str
) -> list[tuple[Any, Any]]:
    """Each modality's ``(mean, var)`` that the rounds (:func:`_round_maps`) take.

    Where the rounds combine means or take their limit, float32 statistics go to float64
    where the namespace has it (:func:`widens_float32`), the mean formed there as ``pivot +
    corr`` (:func:`wide_mean`), so that the rounds and their limit run in float64 and each map is
    rounded once (:func:`align_with`; the torch backward takes the same inputs).  Why: means
    of opposite sign cancel, where a mean rounded to float32 first carries half an ulp of
    its own size into a target near 0 (means 1e4 and -1e4 with unit spreads, alpha 0.5:
    1.5e-4 of the outputs' size, 3e6 of their ulps; now within 4); and the limit's scales are
    ``exp((log v* - log v_i) / 2)``, differences of logs whose rounding grows with
    ``|log v|`` (float32: 20 ulps of the output at spreads near 1e15).  Only (B, 1, C)
    arrays are widened.  Statistics already in float64 (float64 inputs, the numba kernels'
    accumulators) and devices without float64 are taken as they are.

    At alpha = 1 with two modalities or a hub (and at rounds = 0) no round combines means:
    every target is one modality's mean, copied, and the scales are ratios of spreads, so
    float32 loses nothing and the statistics are taken as they are (the casts were a tenth
    of a tiny call).
    """
    combined = rounds is None or (rounds > 0 and (alpha != 1.0 or (topology != "hub" and len(stats) > 2)))
    if not combined or not widens_float32(xp, stats[0].var):
        return [(st.mean, st.var) for st in stats]
    return [(wide_mean(xp, st), _rounded(xp, st.var, xp.float64)) for st in stats]


def align_with(
    prims: Primitives,
    xs: list[Any],
    *,
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: list[Any] | None,
    eps: float,
) -> list[Any]:
    """The alignment algorithm over a backend's primitives: statistics once per modality, the
    rounds (or their limit) on the statistics alone (:func:`_round_maps`), one map each.

    The maps are applied about each modality's pivot; a modality the rounds leave alone (the
    hub, or all at rounds = 0) is copied exactly (its identity map, unfolded).
    """
    masks = list(masks) if masks is not None else [None] * len(xs)
    ax = axis % xs[0].ndim
    # Inputs of at most one block each keep x - pivot from their statistics for their map: M
    # such temporaries alive at once is little at that size, and the map skips a pass over x
    # (larger inputs form it again, one modality at a time)
    keep = all(_one_block(x) for x in xs)
    stats = [prims.stats(x, ax, m, keep_dev=keep) for x, m in zip(xs, masks)]
    xp = array_namespace(stats[0].var)
    pairs = round_statistics(xp, stats, rounds, alpha, topology)
    options = (rounds, alpha, schedule, topology, hub % len(xs), eps)
    # Delegation: on Dask the rounds run per chunk of the statistics, in NumPy.  Written in
    # Dask's calls they add about 86 tasks a round, one nested deeper than the last, and
    # computing one output failed with RecursionError from about 28 rounds.
    maps = _round_maps_per_chunk(pairs, *options) if is_dask(xp) else _round_maps(xp, pairs, *options)
    out = []
    dt = stats[0].var.dtype  # the maps in the statistics' dtype, each rounded once
    for x, st, (s, target, moved) in zip(xs, stats, maps):
        s, target = _rounded(xp, s, dt), _rounded(xp, target, dt)
        if moved:
            out.append(prims.apply(x, ax, st.pivot, st.corr, s, target, st.dev if keep else None))
        else:
            # (a target of -0.0: x + (-0.0) is x for every x, -0.0 included, where + 0.0
            # turned -0.0 into 0.0)
            out.append(prims.apply(x, ax, None, None, s, -xp.zeros_like(s)))
    return out


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
    """:func:`mmfuse.align`, generic Array-API path (also the torch backend's, under autograd
    and ``torch.compile``)."""
    return align_with(
        GENERIC, xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=masks, eps=eps,
    )  # fmt: skip


def align_numpy(
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
    """:func:`mmfuse.align`, NumPy's blocked path (float32 / float64)."""
    return align_with(
        NUMPY, xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=masks, eps=eps,
    )  # fmt: skip


# --------------------------------------------------------------------------- fusion


def pool(x: Any, mask: Any = None, how: str = "mean", *, wide: bool = False) -> Any:
    """Pool (B, T, C) over the token axis 1, masked tokens excluded: (B, C).  ``wide``: a
    float32 mean summed and returned in float64 (for :func:`zoom_shift_fusion`'s sums)."""
    xp = array_namespace(x)
    if how == "mean":
        # float64 sums of long float32 axes on NumPy-likes, and of any when asked
        acc = xp.float64 if wide else _accumulator(xp, x, 1)
        out_dt = xp.float64 if wide else x.dtype
        if mask is None:
            if acc is None:
                return xp.mean(x, axis=1)
            return _rounded(xp, xp.sum(x, axis=1, dtype=acc) / float(x.shape[1]), out_dt)
        dt = work_dtype(xp, x.dtype)
        m = _expand_mask(xp, mask, x.ndim)
        zero = xp.zeros((), dtype=x.dtype, device=pinned_device(x))
        # dtype= only to widen: NumPy's sum refuses a non-native one (">f8", as read from a file)
        widen = acc if acc is not None else (None if dt == x.dtype else dt)
        total = xp.sum(xp.where(m, x, zero), axis=1, dtype=widen)
        count = xp.sum(xp.astype(m, dt), axis=1)
        return _rounded(xp, total / count, out_dt)
    # max (Dask's own max fails on a batch chunk with no samples: dask_max)
    top = dask_max if is_dask(xp) else xp.max
    if mask is None:
        return top(x, axis=1)
    m = _expand_mask(xp, mask, x.ndim)
    low = xp.full((), -math.inf, dtype=x.dtype, device=pinned_device(x))
    return top(xp.where(m, x, low), axis=1)


def fuse(pooled: list[Any], how: str | None, xp: Any = None) -> Any:
    """concat / sum / mean of M pooled (B, C) arrays, or the list itself for ``None``.

    ``xp`` may be given to skip the namespace lookup (``torch`` itself under ``torch.compile``).
    """
    if how is None:
        return pooled
    xp = array_namespace(pooled[0]) if xp is None else xp
    if how == "concat":
        return xp.concat(pooled, axis=-1)
    total = pooled[0]
    for p in pooled[1:]:
        total = total + p
    return total if how == "sum" else total / len(pooled)


def zoom_shift_fusion(
    aligned: list[Any], *, fuse_how: str | None, pool_how: str, masks: list[Any] | None
) -> Any:
    """Pool the aligned (B, T_m, C) arrays over tokens (masked), then fuse.

    A sum or mean of pooled means runs in float64 where float32 widens, rounded once:
    pooled means of opposite sign cancel, and rounded to float32 first each left half an ulp
    of its size in a sum near 0 (means 1e4 and -1e4 at rounds = 0: 1.8e6 of the result's
    ulps; a review's find).  Not on torch: its float64 sum of a float32 tensor copies the
    tensor to float64 first (a second review: +224 MiB and 6.6x the time at two (16, 2048,
    1024) inputs), where NumPy's reduction casts inside its loop: torch's pooled means stay
    float32, a documented limit (alignment moves the means together, so it matters most at
    rounds = 0)."""
    masks = list(masks) if masks is not None else [None] * len(aligned)
    xp = array_namespace(aligned[0])
    wide = fuse_how in ("sum", "mean") and pool_how == "mean" and len(aligned) > 1
    wide = wide and not is_torch(xp) and widens_float32(xp, aligned[0])
    fused = fuse([pool(y, m, pool_how, wide=wide) for y, m in zip(aligned, masks)], fuse_how, xp)
    return _rounded(xp, fused, aligned[0].dtype) if wide else fused


def _functorch_wrapped(torch: Any, t: Any) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def is_eager(xp: Any, x: Any) -> bool:
    """True when mask values can be inspected (not Dask, not a traced JAX array, not a torch
    tensor on the ``meta`` device or a fake one, which have shapes but no values, as under
    ``FakeTensorMode`` and a non-strict ``torch.export``, nor one wrapped by a ``torch.func``
    transform: under ``vmap`` its values cannot steer Python, as a JAX tracer's cannot)."""
    if is_jax(xp):  # eager JAX arrays are checked as NumPy's are; under jit, vmap, grad not
        return not isinstance(x, sys.modules["jax"].core.Tracer)
    if is_lazy(x) or is_dask(xp):
        return False
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    if (
        tensor is not None
        and isinstance(x, tensor)
        and (_functorch_wrapped(sys.modules["torch"], x) or fake_tensors(sys.modules["torch"], (x,)))
    ):
        return False
    return getattr(device_of(x), "type", None) != "meta"
