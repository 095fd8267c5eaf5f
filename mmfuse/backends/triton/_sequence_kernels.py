"""Triton kernel of token-level sequence fusion (Wander), both modes.

Y[b] = sum_{i < R_h} sum_{j < R_t} prod_m Psi_m[j]^T H_m[b] Phi_m[i]   (T_out, D) per sample

with H_m (B, T_m, r_m), feature factors Phi_m (R_h, r_m, D) and token factors Psi_m
(R_t, T_m, T_out), all contiguous.  Collapsed mode is the same sum with R_h = R_t = 1 on
the rank-summed factors (the host sums them), so one kernel serves both modes.

Conventions are those of :mod:`._kernels` (eight pointer slots per modality argument with
``M`` a compile-time constant, float32 accumulation, ``PRECISION`` for the dots, masked loads
so that nothing hidden by a mask or outside the arrays is ever read, no atomics).

One program per (sample b, BLOCK_T output tokens, BLOCK_D output features); the output
slices of one sample are neighbours in the 1-D grid, so they re-read that sample's H_m from
L2.  Per token rank j the program contracts each modality's tokens first (the plan's
"token first" order, the cheaper one whenever r_m <= T_m, and in every released
configuration)::

    A_m = Psi_m[j][:, tslice]^T @ H_m[b]        (BLOCK_T, RANK_P) float32, K loop over T_m

and keeps the M tiles A_m in registers while it walks the feature ranks::

    acc += prod_m A_m @ Phi_m[i][:, dslice]     (BLOCK_T, BLOCK_D) float32

so per sample it costs exactly the token-first multiply-adds of the core's plan
(R_t T_out T_m r_m + R_t R_h T_out r_m D per modality) and writes only Y.  Padded tokens
(``HAS_MASK`` bit m: a (B, T_m) uint8 mask) load as zeros, as the core's zeroing of them
before the token contraction: NaNs stored there cannot reach the result.  RANK_P is the
largest r_m rounded up to a power of two (>= 16, the smallest ``tl.dot`` operand); padded
ranks, tokens and features load zeros and are never stored.

The second contraction takes A_m in float32 (never rounded to a 16-bit dtype), so it runs as
a float32 dot: ``PRECISION32`` is "tf32" exactly when torch's own float32 matmuls use TF32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kernels import _dot, _pick


@triton.jit
def _token_first(
    h_ptr, t_ptr, k_ptr, b, j, n_tok, width, ts, t_ok, n_out,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """A = Psi[j][:, ts]^T @ H[b] as a (BLOCK_T, RANK_P) float32 tile (K loop over tokens)."""
    rr = tl.arange(0, RANK_P)
    r_ok = rr < width
    b64 = b.to(tl.int64)
    h_base = h_ptr + b64 * n_tok * width
    t_base = t_ptr + j * n_tok * n_out  # factors are small: int32 offsets
    acc = tl.zeros((BLOCK_T, RANK_P), dtype=tl.float32)
    for k0 in range(0, n_tok, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < n_tok
        if HAS_MASK:  # noqa: SIM108  (compile-time: no mask load without one; padded H never read)
            keep = k_ok & (tl.load(k_ptr + b64 * n_tok + kk, mask=k_ok, other=0) != 0)
        else:
            keep = k_ok
        # Psi^T tile (BLOCK_T, BLOCK_K): element (t, k) is token factor [j, k, t]
        pt = tl.load(
            t_base + kk[None, :] * n_out + ts[:, None], mask=t_ok[:, None] & k_ok[None, :], other=0.0
        )
        ht = tl.load(
            h_base + kk[:, None] * width + rr[None, :], mask=keep[:, None] & r_ok[None, :], other=0.0
        )
        acc = _dot(pt, ht, acc, PRECISION)
    # the padded rank columns (loaded as 0) are 0 * inf = NaN where Psi holds an inf: zeroed,
    # so that the product with Phi's padded (zero) rows cannot spread it
    return tl.where(r_ok[None, :], acc, 0.0)


@triton.jit
def _token_first_j(
    m: tl.constexpr, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
    k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7, w0, w1, w2, w3, w4, w5, w6, w7,
    b, j, ts, t_ok, n_out, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    RANK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """:func:`_token_first` for modality ``m``."""
    return _token_first(
        _pick(m, h0, h1, h2, h3, h4, h5, h6, h7), _pick(m, t0, t1, t2, t3, t4, t5, t6, t7),
        _pick(m, k0, k1, k2, k3, k4, k5, k6, k7), b, j, _pick(m, n0, n1, n2, n3, n4, n5, n6, n7),
        _pick(m, w0, w1, w2, w3, w4, w5, w6, w7), ts, t_ok, n_out, (HAS_MASK >> m) & 1,
        BLOCK_T, BLOCK_K, RANK_P, PRECISION,
    )  # fmt: skip


@triton.jit
def _feature_second(a, f_ptr, i, width, ds, d_ok, out_dim, RANK_P: tl.constexpr, PRECISION32: tl.constexpr):
    """A @ Phi[i][:, ds]: (BLOCK_T, BLOCK_D) float32, A kept at float32."""
    rr = tl.arange(0, RANK_P)
    f_base = f_ptr + i * width * out_dim
    ft = tl.load(
        f_base + rr[:, None] * out_dim + ds[None, :], mask=(rr < width)[:, None] & d_ok[None, :], other=0.0
    )
    return _dot(a, ft.to(tl.float32), None, PRECISION32)


@triton.jit
def sequence_fwd_kernel(
    out_ptr, h0, h1, h2, h3, h4, h5, h6, h7, f0, f1, f2, f3, f4, f5, f6, f7,
    t0, t1, t2, t3, t4, t5, t6, t7, k0, k1, k2, k3, k4, k5, k6, k7,
    n0, n1, n2, n3, n4, n5, n6, n7, w0, w1, w2, w3, w4, w5, w6, w7,
    n_out, out_dim, rank_h, rank_t,
    M: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, RANK_P: tl.constexpr, PRECISION: tl.constexpr, PRECISION32: tl.constexpr,
):  # fmt: skip
    """out[b, t, k] = sum_{i, j} prod_m (Psi_m[j]^T H_m[b] Phi_m[i])[t, k], one program per
    (sample, BLOCK_T x BLOCK_D output tile); ``h*`` (B, T_m, r_m), ``f*`` (R_h, r_m, D),
    ``t*`` (R_t, T_m, T_out), ``k*`` (B, T_m) uint8 masks (``HAS_MASK`` bit m), ``n*`` the
    token counts T_m and ``w*`` the widths r_m."""
    n_tblk = tl.cdiv(n_out, BLOCK_T)
    n_dblk = tl.cdiv(out_dim, BLOCK_D)
    pid = tl.program_id(0)
    per_sample = n_tblk * n_dblk
    b = pid // per_sample
    rest = pid % per_sample
    ts = (rest // n_dblk) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = (rest % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < n_out
    d_ok = ds < out_dim
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, rank_t):
        # the M token-first tiles of this token rank (slots past M repeat a0, never used)
        a0 = _token_first_j(0, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                            k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                            w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                            HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        a1 = a0
        a2 = a0
        a3 = a0
        a4 = a0
        a5 = a0
        a6 = a0
        a7 = a0
        if M > 1:
            a1 = _token_first_j(1, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 2:
            a2 = _token_first_j(2, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 3:
            a3 = _token_first_j(3, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 4:
            a4 = _token_first_j(4, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 5:
            a5 = _token_first_j(5, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 6:
            a6 = _token_first_j(6, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        if M > 7:
            a7 = _token_first_j(7, h0, h1, h2, h3, h4, h5, h6, h7, t0, t1, t2, t3, t4, t5, t6, t7,
                                k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, n3, n4, n5, n6, n7,
                                w0, w1, w2, w3, w4, w5, w6, w7, b, j, ts, t_ok, n_out,
                                HAS_MASK, BLOCK_T, BLOCK_K, RANK_P, PRECISION)  # fmt: skip
        for i in range(0, rank_h):
            prod = _feature_second(a0, f0, i, w0, ds, d_ok, out_dim, RANK_P, PRECISION32)
            for m in tl.static_range(1, M):
                prod = prod * _feature_second(
                    _pick(m, a0, a1, a2, a3, a4, a5, a6, a7), _pick(m, f0, f1, f2, f3, f4, f5, f6, f7), i,
                    _pick(m, w0, w1, w2, w3, w4, w5, w6, w7), ds, d_ok, out_dim, RANK_P, PRECISION32,
                )  # fmt: skip
            acc += prod
    dst = out_ptr + b.to(tl.int64) * n_out * out_dim + ts[:, None] * out_dim + ds[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
