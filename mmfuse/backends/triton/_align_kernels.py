"""The Triton kernels of ``mmfuse.align`` (the primitives of :mod:`._align_ops`).

``align`` runs the core's algorithm (:func:`mmfuse._core.align.align_with`) over two
primitives, each one pass over a modality's data:

- ``stats_kernel``: per (row, channel) the pivot, correction and population variance of the
  core's shifted two-pass algorithm (:mod:`._kernels`' ``moments_kernel``, whose helpers it
  calls: the same statistics, kept in float32 and with the pivot, since the map needs it);
- ``map_kernel``: y = ((x - pivot) - corr) s + target per (row, channel) (the core's
  :func:`~mmfuse._core.align.zoom_shift_map` rule), or x s + target for a modality the
  rounds leave alone (its identity map, which copies x exactly), computed in float32 and
  rounded once to x's dtype.

Conventions as in :mod:`._kernels`: contiguous (N, T, C) rows, masks (N, T) uint8, float32
arithmetic, masked loads (out-of-range tokens and channels never read), no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import _row_stats


@triton.jit
def stats_kernel(
    pivot_ptr, corr_ptr, var_ptr, x_ptr, m_ptr, n_tok, n_ch,
    HAS_MASK: tl.constexpr, SINGLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """pivot, corr and var (mean = pivot + corr) per (row, channel), float32 (N, C).  One
    program per (row, BLOCK_C channels); masked tokens never enter a sum."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pivot, corr, var = _row_stats(x_ptr, m_ptr, n, c, n_tok, n_ch, HAS_MASK, SINGLE, BLOCK_T, BLOCK_C)
    c_ok = c < n_ch
    tl.store(pivot_ptr + n * n_ch + c, pivot, mask=c_ok)
    tl.store(corr_ptr + n * n_ch + c, corr, mask=c_ok)
    tl.store(var_ptr + n * n_ch + c, var, mask=c_ok)


@triton.jit
def map_kernel(
    y_ptr, x_ptr, pivot_ptr, corr_ptr, scale_ptr, target_ptr, n_tok, n_ch, n_tblk,
    HAS_PIVOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = ((x - pivot) - corr) s + target (HAS_PIVOT) else x s + target, per-(row, channel)
    float32 constants; every token is mapped (masks only keep tokens out of the statistics).
    One program per (row, BLOCK_T tokens) x BLOCK_C channels: one read of x, one write of y."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_tblk
    t = (pid % n_tblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < n_ch
    s = tl.load(scale_ptr + n * n_ch + c, mask=c_ok, other=1.0)
    target = tl.load(target_ptr + n * n_ch + c, mask=c_ok, other=0.0)
    ok = (t < n_tok)[:, None] & c_ok[None, :]
    at = (n * n_tok + t)[:, None] * n_ch + c[None, :]
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_PIVOT:
        pivot = tl.load(pivot_ptr + n * n_ch + c, mask=c_ok, other=0.0)
        corr = tl.load(corr_ptr + n * n_ch + c, mask=c_ok, other=0.0)
        y = ((x - pivot[None, :]) - corr[None, :]) * s[None, :] + target[None, :]
    else:
        y = x * s[None, :] + target[None, :]
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)
