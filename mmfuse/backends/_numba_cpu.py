"""CPU kernels of the ``"numba"`` backend: Zoom-and-Shift statistics and maps on NumPy arrays.

Why compiled kernels here: the NumPy fast path of :mod:`mmfuse._core.align` is limited by
the number of elementwise passes NumPy needs (sum, centre, square-sum, scale, shift: about
3 G elements/s per core), not by memory.  These kernels do each pass over a sample in one
loop nest, so :func:`zoom_shift` reads x from memory once (its second pass hits the cache),
reads the guide once and writes the output once.

Work split: the batch of a (B', T, C') lane view (statistics axis in the middle) is cut into
tasks of one sample and a run of channels (the whole row when there are enough samples to
keep every thread busy); each task's result depends on its own data only, so results do not
depend on the number of threads.  The kernels are serial loops over a range of tasks that
release the GIL (``nogil=True``); :func:`~mmfuse._core.threads.run_tasks` runs inputs of at least
:data:`PARALLEL_ELEMENTS` elements on up to :func:`max_workers` threads that take runs of
tasks as they become free, the calling thread among them, and waits only for runs a thread
has taken.  Why not ``numba.prange``: its threading layers give each thread a fixed share of
the tasks and (OpenMP) spin while waiting, so on a machine whose cores are busy with other
work a call waits for a descheduled thread.  Measured on the 2-core CI machine under load
(load average about 4): a zoom_shift of 120 elements took 24 ms with ``prange`` against 0.15
ms for the NumPy core, and (64, 512, 256) float32 35 ms against 21 ms single-threaded.
Here a busy machine costs at most the serial time plus one run of tasks.

Numerics: sums accumulate in float64 whatever the input dtype; the variance is the corrected
two-pass one (mean, then centred sums and squares, the first correcting the mean), as the
core's pivot form and the reference, so accuracy does not depend on the mean-to-spread ratio
and a channel with no spread has variance exactly 0.  The map is the core's,
``((x - c) - (mu - c)) * s + (mu + alpha (mu_g - mu))``, with ``c`` the mean rounded to the
input's dtype (``x - c`` is exact near the mean) and the scale, correction and target in
float64: computed in float64 and rounded once to the input's dtype (:func:`apply_map`).

Compilation: on first use, per dtype, cached on disk (``cache=True``, where numba finds a
writable place: :func:`mmfuse.backends._numba_jit.cpu_kernel`), so a process after the first
loads them in well under a second.  Importing this module imports numba but compiles
nothing (the ``"numba"`` backend module, its only importer, needs numba anyway).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from .._core.threads import available_cores, run_tasks
from ._numba_jit import cpu_kernel

__all__ = ["PARALLEL_ELEMENTS", "apply_map", "channel_chunk", "max_workers", "stats", "zoom_shift"]

#: Inputs with fewer elements run on the calling thread alone: below this a second thread
#: costs about what it saves (a serial zoom_shift of 2**18 float32 elements takes about 0.4 ms).
PARALLEL_ELEMENTS = 1 << 18
_MAX_WORKERS = 8


#: Tasks of at most this many channels run one channel at a time on scalars (_lane_stats,
#: _lane_map) instead of the row loops: C' = 1 above all (every axis=-1 call, (B, T, 1)
#: inputs), where a row view per token, a one-step channel loop and sums kept in arrays made
#: the kernels 2.5-10x slower than plain NumPy (a performance review's measurement, under
#: load: moments of (64, 4096, 1) float32 3.9 ms against NumPy's 0.57 ms; the fix's, in
#: interleaved rounds: 2.13 -> 0.74 ms against NumPy's 0.32, what was left the serial float64
#: sums' latency, which running four lanes side by side took off: _four_lane_stats).
#: Measured on 262144 float32 elements, one thread (before the four lanes): the lanes win
#: to 4 channels (statistics 1.09 -> 0.54 ms at 2, 0.62 -> 0.52 at 4), break even at 5-6
#: and lose from 8 (0.29 -> 0.52).  Same operations in the same order as the row loops, so
#: the same bits (tests/test_numba_cpu.py compares the two); read on each call, so tests
#: may force either path.
SCALAR_CHANNELS = 4


# Loops run over row views (``x[b, t, c0:c1]``): indexing the 3-d array inside the channel
# loop keeps LLVM from vectorising it (several times slower).


@cpu_kernel
def _centred_sums(corr, var, d):  # pragma: no cover - compiled
    """One token's deviation ``d`` added to a lane's sums of deviations and of their squares:
    the second pass of every statistics kernel below, token after token."""
    return corr + d, var + d * d


@cpu_kernel
def _spread(total, corr, var):  # pragma: no cover - compiled
    """(variance, shift) from a lane's sums of deviations and of their squares over ``total``
    tokens: the one home of the corrected two-pass finish, shift = sum d / n and
    var = sum d^2 / n - shift^2, clamped at 0 (rounding can go below it; NaN stays, NaN < 0
    being False)."""
    shift = corr / total
    v = var / total - shift * shift
    return 0.0 if v < 0.0 else v, shift


@cpu_kernel
def _sample_stats(x, mask, use_mask, b, c0, c1, mean, var, shift):  # pragma: no cover - compiled
    """x[b, :, c0:c1]'s statistics over its tokens (masked ones skipped): the first mean in
    ``mean[:]``, the second pass's correction in ``shift[:]`` (the mean is their sum, which
    float64 alone would round to ulps of a large mean), the variance in ``var[:]``."""
    n = c1 - c0
    xb = x[b]
    mean[:] = 0.0
    var[:] = 0.0
    count = 0
    for t in range(xb.shape[0]):
        if use_mask and not mask[b, t]:
            continue
        count += 1
        row = xb[t, c0:c1]
        for c in range(n):
            mean[c] += row[c]
    # Divided by the count, not multiplied by its reciprocal (an ulp closer to the value).
    total = float(count) if count > 0 else math.nan
    for c in range(n):
        mean[c] /= total
    # Second pass (the sample is still in cache): the corrected two-pass algorithm, as the
    # reference's moments: sums of d = x - mean and d^2, then the shift sum d / n and
    # var = sum d^2 / n - (sum d / n)^2.  The correction gives back what rounding took from
    # the first mean, so a channel with no spread (the same d for every token) has variance
    # exactly 0, which the zero-spread rule (scale 1) needs at eps = 0: without it, 7 float64
    # tokens of 3.7 left a variance of ~1e-32 and a zoom by ~1e15 of rounding noise.
    corr = np.zeros(n)
    for t in range(xb.shape[0]):
        if use_mask and not mask[b, t]:
            continue
        row = xb[t, c0:c1]
        for c in range(n):
            d = row[c] - mean[c]
            corr[c] += d
            var[c] += d * d
    for c in range(n):
        var[c], shift[c] = _spread(total, corr[c], var[c])


@cpu_kernel
def _lane_stats(x, mask, use_mask, b, c):  # pragma: no cover - compiled
    """(first mean, variance, shift) of the one channel x[b, :, c]: _sample_stats's
    operations, in its order, on scalars (the sums in registers, no row views)."""
    xb = x[b]
    n_tok = xb.shape[0]
    mean = 0.0
    count = 0
    for t in range(n_tok):
        if use_mask and not mask[b, t]:
            continue
        count += 1
        mean += xb[t, c]
    total = float(count) if count > 0 else math.nan
    mean /= total
    corr = 0.0
    var = 0.0
    for t in range(n_tok):
        if use_mask and not mask[b, t]:
            continue
        corr, var = _centred_sums(corr, var, xb[t, c] - mean)
    var, shift = _spread(total, corr, var)
    return mean, var, shift


# Unmasked scalar lanes of at least this many tokens run four at a time (_four_lane_stats,
# the grouped kernels): on shorter ones (and masked ones, whose per-lane mask tests the
# four-at-a-time loop made slower) the grouping's bookkeeping cost more than the latency it
# hides: measured (float32, 2 cores), moments of (8192, 4, 2) 334 -> 379 us and zoom_shift
# 926 -> 1172 grouped, (2048, 6, 1) 1.08-1.13x, masked (64, 4096, 1) 659 -> 706 us;
# unmasked (512, 40, 1) 0.84-0.86x, (64, 4096, 1) 0.68-0.73x.
LANE_GROUP_TOKENS = 16


@cpu_kernel
def _four_lane_stats(x, lb, lc, first, var, shift):  # pragma: no cover - compiled
    """:func:`_lane_stats` of the four unmasked lanes x[lb[i], :, lc[i]] into ``first[i]``,
    ``var[i]`` and ``shift[i]``, side by side: each lane's sums in their own order (token after
    token, the same operations as one lane alone, so the same bits), the four chains of
    additions interleaved, where one lane's chain waits on each addition's latency."""
    b0, b1, b2, b3 = lb[0], lb[1], lb[2], lb[3]
    c0, c1, c2, c3 = lc[0], lc[1], lc[2], lc[3]
    n_tok = x.shape[1]
    s0 = s1 = s2 = s3 = 0.0
    for t in range(n_tok):
        s0 += x[b0, t, c0]
        s1 += x[b1, t, c1]
        s2 += x[b2, t, c2]
        s3 += x[b3, t, c3]
    total = float(n_tok)  # (at least LANE_GROUP_TOKENS)
    m0, m1, m2, m3 = s0 / total, s1 / total, s2 / total, s3 / total
    k0 = k1 = k2 = k3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    for t in range(n_tok):
        k0, q0 = _centred_sums(k0, q0, x[b0, t, c0] - m0)
        k1, q1 = _centred_sums(k1, q1, x[b1, t, c1] - m1)
        k2, q2 = _centred_sums(k2, q2, x[b2, t, c2] - m2)
        k3, q3 = _centred_sums(k3, q3, x[b3, t, c3] - m3)
    first[0], first[1], first[2], first[3] = m0, m1, m2, m3
    var[0], shift[0] = _spread(total, k0, q0)
    var[1], shift[1] = _spread(total, k1, q1)
    var[2], shift[2] = _spread(total, k2, q2)
    var[3], shift[3] = _spread(total, k3, q3)


@cpu_kernel
def _lane_map(x, b, c, centre, corr, scale, target, out):  # pragma: no cover - compiled
    """out[b, :, c] = the map of x[b, :, c] (constants float64, ``centre`` the value of x's
    dtype): the row loops' expression, one channel at a time."""
    for t in range(x.shape[1]):
        out[b, t, c] = ((np.float64(x[b, t, c]) - centre) - corr) * scale + target


@cpu_kernel
def _map_constants(first, var, shift, centre, g_mean, g_sigma, alpha, eps):  # pragma: no cover
    """(scale, correction, target) of a channel's map from its statistics, ``centre`` (the
    first mean rounded to x's dtype) and the guide's mean and sigma."""
    sigma = math.sqrt(var + eps)
    s = 1.0  # no spread: nothing to zoom (as the core's _scale)
    if sigma != 0.0:  # NaN is no "no spread" (the core's zoom_scale)
        s = g_sigma / sigma
        if alpha != 1.0:
            s = s**alpha
    # about the first mean rounded to x's dtype (x - centre is exact near the mean); what
    # the rounding dropped, and the second pass's shift, are the correction, taken off
    # x - centre before the zoom (the core's rule, zoom_shift_map: folded into an offset,
    # target - corr s, it cancelled on constant float64 lanes of large values, 171 ulps at
    # 3e16 / 7; the final review of the diff)
    corr = (first - centre) + shift
    # the target mean as the core's _target_mean: a convex combination, exactly the guide's
    # at alpha = 1 (mean + alpha (g - mean) cancels the same way)
    target = g_mean
    if alpha != 1.0:
        target = (1.0 - alpha) * (first + shift) + alpha * target
    return s, corr, target


@cpu_kernel
def _task_span(task, per, chunk, n_chan):  # pragma: no cover - compiled
    """(sample, first channel, end channel) of task ``task`` (``per`` tasks per sample)."""
    b = task // per
    c0 = (task - b * per) * chunk
    return b, c0, min(c0 + chunk, n_chan)


@cpu_kernel
def _stats_kernel(x, mask, use_mask, chunk, scalar, mean_out, var_out, shift_out, t0, t1):  # pragma: no cover
    n_chan = x.shape[2]
    per = (n_chan + chunk - 1) // chunk
    for task in range(t0, t1):
        b, c0, c1 = _task_span(task, per, chunk, n_chan)
        if c1 - c0 <= scalar:  # (SCALAR_CHANNELS)
            for c in range(c0, c1):
                m, v, k = _lane_stats(x, mask, use_mask, b, c)
                mean_out[b, c] = m
                var_out[b, c] = v
                shift_out[b, c] = k
            continue
        mean = np.empty(c1 - c0)
        var = np.empty(c1 - c0)
        shift = np.empty(c1 - c0)
        _sample_stats(x, mask, use_mask, b, c0, c1, mean, var, shift)
        mean_out[b, c0:c1] = mean
        var_out[b, c0:c1] = var
        shift_out[b, c0:c1] = shift


@cpu_kernel
def _zoom_shift_kernel(
    x, mask, use_mask, g_mean, g_sigma, alpha, eps, chunk, scalar, out, t0, t1
):  # pragma: no cover - compiled
    _, n_tok, n_chan = x.shape
    per = (n_chan + chunk - 1) // chunk
    rounded = np.empty(1, dtype=x.dtype)  # rounds a lane's first mean to x's dtype
    for task in range(t0, t1):
        b, c0, c1 = _task_span(task, per, chunk, n_chan)
        n = c1 - c0
        if n <= scalar:  # (SCALAR_CHANNELS)
            for c in range(c0, c1):
                first, var, shift = _lane_stats(x, mask, use_mask, b, c)
                rounded[0] = first
                centre = np.float64(rounded[0])
                s, k, o = _map_constants(first, var, shift, centre, g_mean[b, c], g_sigma[b, c], alpha, eps)
                _lane_map(x, b, c, centre, k, s, o, out)
            continue
        first = np.empty(n)
        var = np.empty(n)
        shift = np.empty(n)
        _sample_stats(x, mask, use_mask, b, c0, c1, first, var, shift)
        centre = np.empty(n, dtype=x.dtype)
        # scale, correction and target in float64, the map computed in it and rounded once:
        # stored in a float32 x's dtype, the zoom of a subnormal spread (1.4e40) overflowed
        # to inf, and the output to +-inf and NaN where the exact one is of unit size
        scale = np.empty(n)
        corr = np.empty(n)
        target = np.empty(n)
        for c in range(n):
            centre[c] = first[c]
            scale[c], corr[c], target[c] = _map_constants(
                first[c], var[c], shift[c], np.float64(centre[c]),
                g_mean[b, c0 + c], g_sigma[b, c0 + c], alpha, eps,
            )  # fmt: skip
        for t in range(n_tok):
            row = x[b, t, c0:c1]
            dest = out[b, t, c0:c1]
            for c in range(n):
                # x - centre in float64: exact whatever the distance from the mean (in
                # float32 it rounded far from the mean: 1.4 ulps of the output, a review's find)
                dest[c] = ((np.float64(row[c]) - centre[c]) - corr[c]) * scale[c] + target[c]


@cpu_kernel
def _task_lanes(t0, t1, chunk, n_chan):  # pragma: no cover - compiled
    """The (sample, channel) lanes of tasks t0 to t1 in order, as two arrays."""
    per = (n_chan + chunk - 1) // chunk
    lanes_b, lanes_c = np.empty(n_chan * (t1 - t0), np.int64), np.empty(n_chan * (t1 - t0), np.int64)
    n = 0
    for task in range(t0, t1):
        b, c0, c1 = _task_span(task, per, chunk, n_chan)
        for c in range(c0, c1):
            lanes_b[n], lanes_c[n] = b, c
            n += 1
    return lanes_b[:n], lanes_c[:n]


@cpu_kernel
def _lanes_stats(x, lanes_b, lanes_c, first, var, shift):  # pragma: no cover - compiled
    """:func:`_lane_stats` of the unmasked lanes x[lanes_b[i], :, lanes_c[i]] into ``first[i]``,
    ``var[i]``, ``shift[i]``: four at a time by :func:`_four_lane_stats`, the last few one by
    one; the same operations per lane, so the same bits."""
    n = len(lanes_b)
    whole = n - n % 4
    for g in range(0, whole, 4):
        _four_lane_stats(x, lanes_b[g : g + 4], lanes_c[g : g + 4], first[g : g + 4], var[g : g + 4],
                         shift[g : g + 4])  # fmt: skip
    for i in range(whole, n):
        first[i], var[i], shift[i] = _lane_stats(x, _NO_MASK, False, lanes_b[i], lanes_c[i])


@cpu_kernel
def _grouped_stats_kernel(x, chunk, mean_out, var_out, shift_out, t0, t1):  # pragma: no cover
    """:func:`_stats_kernel` of unmasked scalar lanes (LANE_GROUP_TOKENS tokens or more, at
    most SCALAR_CHANNELS channels a task) by :func:`_lanes_stats`.  (Kernels of their own:
    folded into _stats_kernel, the lanes that are not grouped ran up to 1.1x slower, the
    machine code of the whole loop changed with it.)"""
    lanes_b, lanes_c = _task_lanes(t0, t1, chunk, x.shape[2])
    n = len(lanes_b)
    first, var, shift = np.empty(n), np.empty(n), np.empty(n)
    _lanes_stats(x, lanes_b, lanes_c, first, var, shift)
    for i in range(n):
        b, c = lanes_b[i], lanes_c[i]
        mean_out[b, c], var_out[b, c], shift_out[b, c] = first[i], var[i], shift[i]


# Lanes whose statistics the grouped zoom_shift kernel takes before mapping them: a few groups
# of four, so that a lane is mapped while it is still in cache
_MAP_LANES = 16


@cpu_kernel
def _grouped_zoom_shift_kernel(x, g_mean, g_sigma, alpha, eps, chunk, out, t0, t1):  # pragma: no cover
    """:func:`_zoom_shift_kernel` of unmasked scalar lanes (as :func:`_grouped_stats_kernel`):
    their statistics by :func:`_lanes_stats`, _MAP_LANES lanes at a time, then their maps."""
    lanes_b, lanes_c = _task_lanes(t0, t1, chunk, x.shape[2])
    rounded = np.empty(1, dtype=x.dtype)  # rounds a lane's first mean to x's dtype
    first, var, shift = np.empty(_MAP_LANES), np.empty(_MAP_LANES), np.empty(_MAP_LANES)
    for start in range(0, len(lanes_b), _MAP_LANES):
        lb, lc = lanes_b[start : start + _MAP_LANES], lanes_c[start : start + _MAP_LANES]
        _lanes_stats(x, lb, lc, first, var, shift)
        for i in range(len(lb)):
            b, c = lb[i], lc[i]
            _lane_zoom_shift(x, b, c, first[i], var[i], shift[i], g_mean, g_sigma, alpha, eps, rounded, out)


@cpu_kernel
def _lane_zoom_shift(
    x, b, c, first, var, shift, g_mean, g_sigma, alpha, eps, rounded, out
):  # pragma: no cover - compiled
    """The map of the one channel x[b, :, c] from its statistics into ``out`` (``rounded``: a
    one-element array of x's dtype, scratch that rounds the first mean to it)."""
    rounded[0] = first
    centre = np.float64(rounded[0])
    s, k, o = _map_constants(first, var, shift, centre, g_mean[b, c], g_sigma[b, c], alpha, eps)
    _lane_map(x, b, c, centre, k, s, o, out)


@cpu_kernel
def _apply_kernel(x, centre, corr, scale, target, chunk, scalar, out, t0, t1):  # pragma: no cover - compiled
    _, n_tok, n_chan = x.shape
    per = (n_chan + chunk - 1) // chunk
    for task in range(t0, t1):
        b, c0, c1 = _task_span(task, per, chunk, n_chan)
        if c1 - c0 <= scalar:  # (SCALAR_CHANNELS)
            for c in range(c0, c1):
                _lane_map(x, b, c, np.float64(centre[b, c]), corr[b, c], scale[b, c], target[b, c], out)
            continue
        p = centre[b, c0:c1]
        k = corr[b, c0:c1]
        s = scale[b, c0:c1]
        o = target[b, c0:c1]
        for t in range(n_tok):
            row = x[b, t, c0:c1]
            dest = out[b, t, c0:c1]
            for c in range(c1 - c0):
                dest[c] = ((np.float64(row[c]) - p[c]) - k[c]) * s[c] + o[c]  # (as above)


def max_workers() -> int:
    """Threads a large call may use: the cores this process may run on, at most
    ``NUMBA_NUM_THREADS`` (numba's setting, from the environment) and 8.  Not
    ``numba.get_num_threads()``: ``numba.set_num_threads`` sizes numba's own parallel
    runtime, which these kernels (run on mmfuse's threads) do not use, and asking it would
    start that runtime's threads."""
    cores = available_cores()
    limit = int(getattr(numba.config, "NUMBA_NUM_THREADS", cores))
    return max(1, min(cores, limit, _MAX_WORKERS))


def _workers(elements: int, n_tasks: int) -> int:
    return 1 if elements < PARALLEL_ELEMENTS else max(1, min(max_workers(), n_tasks))


def channel_chunk(n_rows: int, n_chan: int, workers: int | None = None) -> int:
    """Channels per task: whole rows when there are at least two samples per thread, else
    rows cut so that every thread gets about two tasks (never below 16 channels)."""
    tasks = 2 * (max_workers() if workers is None else workers)
    if n_rows >= tasks or n_chan <= 16:
        return max(1, n_chan)
    pieces = math.ceil(tasks / max(1, n_rows))
    return max(16, math.ceil(n_chan / pieces))


def _plan(x3: Any) -> tuple[int, int, int]:
    """(channels per task, tasks, threads) for a (B', T, C') lane view."""
    n_rows, _, n_chan = x3.shape
    workers = _workers(x3.size, n_rows * n_chan)
    chunk = channel_chunk(n_rows, n_chan, workers)
    return chunk, n_rows * -(-n_chan // chunk) if n_chan else 0, workers


# The kernels' mask argument when there is none (never read then; never written)
_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def _mask_arg(mask: Any) -> tuple[Any, bool]:
    if mask is None:
        return _NO_MASK, False
    return np.ascontiguousarray(mask, dtype=np.bool_), True


def _grouped(x3: Any, mask2: Any, chunk: int) -> bool:
    """Whether a call's tasks are all scalar lanes that run four at a time (the grouped
    kernels): unmasked, at least :data:`LANE_GROUP_TOKENS` tokens, at most
    :data:`SCALAR_CHANNELS` channels a task (read on each call, as the kernels' own test)."""
    return mask2 is None and x3.shape[1] >= LANE_GROUP_TOKENS and chunk <= SCALAR_CHANNELS


def stats(x3: Any, mask2: Any) -> tuple[Any, Any, Any]:
    """float64 (first mean, population variance, shift) of a C-contiguous float32/float64
    (B', T, C') array over T, masked tokens (``mask2`` (B', T) bool, or None) excluded; each of
    shape (B', C').  The mean is first mean + shift (kept apart: see _sample_stats)."""
    n_rows, _, n_chan = x3.shape
    first = np.empty((n_rows, n_chan))
    var = np.empty((n_rows, n_chan))
    shift = np.empty((n_rows, n_chan))
    chunk, n_tasks, workers = _plan(x3)
    if _grouped(x3, mask2, chunk):
        run_tasks(_grouped_stats_kernel, n_tasks, workers, x3, chunk, first, var, shift)
        return first, var, shift
    mk, use = _mask_arg(mask2)
    run_tasks(_stats_kernel, n_tasks, workers, x3, mk, use, chunk, SCALAR_CHANNELS, first, var, shift)
    return first, var, shift


def zoom_shift(x3: Any, mask2: Any, g_mean: Any, g_sigma: Any, alpha: float, eps: float) -> Any:
    """Zoom-and-Shift of a C-contiguous (B', T, C') array toward guide statistics (B', C')
    (float64 mean and ``sqrt(var + eps)``); one read of x, output in x's dtype."""
    out = np.empty(x3.shape, dtype=x3.dtype)
    chunk, n_tasks, workers = _plan(x3)
    if _grouped(x3, mask2, chunk):
        args = (x3, g_mean, g_sigma, float(alpha), float(eps), chunk, out)
        run_tasks(_grouped_zoom_shift_kernel, n_tasks, workers, *args)
        return out
    mk, use = _mask_arg(mask2)
    run_tasks(
        _zoom_shift_kernel, n_tasks, workers,
        x3, mk, use, g_mean, g_sigma, float(alpha), float(eps), chunk, SCALAR_CHANNELS, out,
    )  # fmt: skip
    return out


def apply_map(x3: Any, centre: Any, corr: Any, scale: Any, target: Any) -> Any:
    """``((x - centre) - corr) * scale + target`` (the core's rule, ``zoom_shift_map``) for a
    C-contiguous (B', T, C') array and (B', C') constants (``centre`` in x's dtype, the others
    float64: the map computed in float64 and rounded once): the map about a pivot (``x -
    centre`` is exact near the mean; a zero centre and correction give ``x * scale + target``
    exactly, as identity maps need)."""
    out = np.empty(x3.shape, dtype=x3.dtype)
    chunk, n_tasks, workers = _plan(x3)
    run_tasks(_apply_kernel, n_tasks, workers, x3, centre, corr, scale, target, chunk, SCALAR_CHANNELS, out)
    return out
