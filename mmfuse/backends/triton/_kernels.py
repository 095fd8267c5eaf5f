"""The Triton kernels of the ``"triton"`` backend (see the package docstring for the design).

Conventions shared by every kernel here:

- Modalities are passed as up to eight separate pointer arguments (``x0 .. x7``, ``f0 .. f7``,
  feature sizes ``d0 .. d7``) with the modality count ``M`` a compile-time constant: Triton
  has no arrays of pointers that ``torch.compile`` can see through, and a packed copy of the
  inputs would cost a full extra read and write of them.  Unused slots repeat modality 0 and
  are never touched (every use sits under a compile-time ``if M > j``).
- Inputs are contiguous: ``x_m`` is (B, d_m) row-major, a low-rank factor is (R, D_m, h)
  with D_m = d_m + APPEND (the constant row last), ``present`` is (B, M) uint8.
- A program owns BLOCK_B rows and an output slice of BLOCK_H columns for *all* ranks: its
  projection tile has BLOCK_N = RANK_P * BLOCK_H columns, column c standing for rank
  c // BLOCK_H and output k = h0 + c % BLOCK_H.  RANK_P is R rounded up to a power of two
  (and padded further so that BLOCK_N >= 16, the smallest ``tl.dot`` operand); padded ranks
  and outputs load zeros and are never stored.
- Products accumulate in float32 (``tl.dot`` with a float32 accumulator; float16/bfloat16
  operands go to the tensor cores as they are, float32 ones with ``PRECISION`` "ieee" or
  "tf32" as torch's own CUDA matmuls, ``_ops.tf32_matmuls``).
- Masked loads never read absent or out-of-range data: an absent modality's row is loaded
  as zeros (so NaNs stored there cannot reach the result) and contributes only its constant
  row, exactly as the reference's hat x = [0, ..., 0, 1].
- No atomics: every reduction over the batch writes per-program partials into a buffer
  that the host sums in a fixed order, so results are bit-identical from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

# --------------------------------------------------------------------------- shared helpers


@triton.jit
def _pick(j: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``j`` of eight (``j`` is a compile-time constant, so this is free)."""
    if j == 0:
        r = a0
    elif j == 1:
        r = a1
    elif j == 2:
        r = a2
    elif j == 3:
        r = a3
    elif j == 4:
        r = a4
    elif j == 5:
        r = a5
    elif j == 6:
        r = a6
    else:
        r = a7
    return r


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot`` with a float32 accumulator.  PRECISION "ieee" / "tf32" is the float32 dots'
    input precision (16-bit operands go to the tensor cores either way); "upcast" converts
    the operands to float32 first: only for bfloat16 under Triton's interpreter, whose
    bfloat16 ``tl.dot`` returns garbage (triton 3.9).  That is exact: a product of two
    bfloat16 values fits a float32 mantissa, so the sums match the tensor cores' float32
    accumulation up to summation order."""
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _present_rows(present_ptr, rows, row_ok, j: tl.constexpr, M: tl.constexpr, HAS_PRESENT: tl.constexpr):
    """Which of ``rows`` hold modality ``j`` (rows past the batch count as absent)."""
    if HAS_PRESENT:
        flag = tl.load(present_ptr + rows.to(tl.int64) * M + j, mask=row_ok, other=0)
        ok = row_ok & (flag != 0)
    else:
        ok = row_ok
    return ok


@triton.jit
def _columns(h0, n_out, rank, BLOCK_H: tl.constexpr, RANK_P: tl.constexpr):
    """(rank, output index, valid) of a program's BLOCK_N = RANK_P * BLOCK_H columns."""
    c = tl.arange(0, RANK_P * BLOCK_H)
    r = c // BLOCK_H
    k = h0 + c % BLOCK_H
    return r, k, (r < rank) & (k < n_out)


@triton.jit
def _row_block_tile(batch, n_out, rank, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, RANK_P: tl.constexpr):
    """The (BLOCK_B rows, BLOCK_H outputs) tile of this program in a 1-D grid whose output
    slices of one row block are adjacent (so the programs re-reading the same x rows run
    together and find them in L2): (pid, first output, rows, rows in the batch, and
    :func:`_columns`' rank, output index and valid flag of the tile's columns)."""
    n_hblk = tl.cdiv(n_out, BLOCK_H)
    pid = tl.program_id(0)
    h0 = (pid % n_hblk) * BLOCK_H
    rows = (pid // n_hblk) * BLOCK_B + tl.arange(0, BLOCK_B)
    r, k, col_ok = _columns(h0, n_out, rank, BLOCK_H, RANK_P)
    return pid, h0, rows, rows < batch, r, k, col_ok


@triton.jit
def _project(
    x_ptr, f_ptr, d, rows, ok, r, k, col_ok, n_out,
    APPEND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """The projection tile [x_m, 1] @ F_m[r, :, k] for ``rows`` (BLOCK_B) and the program's
    columns (BLOCK_N), float32.  ``ok``: rows that are in the batch and present; the others
    load zeros, so their tile is the constant row (APPEND) or zero."""
    rows64 = rows.to(tl.int64)
    depth = d + APPEND  # rows of the factor
    # factor element (r, i, k) of a contiguous (R, D, h) tensor
    f_col = r.to(tl.int64) * depth * n_out + k
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        i = k0 + tl.arange(0, BLOCK_K)
        i_ok = i < d
        xt = tl.load(x_ptr + rows64[:, None] * d + i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        f_ok = i_ok[:, None] & col_ok[None, :]
        ft = tl.load(f_ptr + f_col[None, :] + i[:, None] * n_out, mask=f_ok, other=0.0)
        acc = _dot(xt, ft, acc, PRECISION)
    if APPEND:
        const = tl.load(f_ptr + f_col + d * n_out, mask=col_ok, other=0.0)
        acc += const.to(tl.float32)[None, :]
    return acc


@triton.jit
def _project_j(
    j: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
    M: tl.constexpr, APPEND: tl.constexpr, HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """:func:`_project` for modality ``j``."""
    ok = _present_rows(present_ptr, rows, row_ok, j, M, HAS_PRESENT)
    return _project(
        _pick(j, x0, x1, x2, x3, x4, x5, x6, x7), _pick(j, f0, f1, f2, f3, f4, f5, f6, f7),
        _pick(j, d0, d1, d2, d3, d4, d5, d6, d7), rows, ok, r, k, col_ok, n_out,
        APPEND, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION,
    )  # fmt: skip


@triton.jit
def _others(j: tl.constexpr, q, p0, p1, p2, p3, p4, p5, p6, p7, M: tl.constexpr):
    """q * prod_{i < M, i != j} p_i: the product of the other modalities' projections,
    without division (so an exact zero in p_j is harmless)."""
    if j != 0:
        q = q * p0
    if M > 1 and j != 1:
        q = q * p1
    if M > 2 and j != 2:
        q = q * p2
    if M > 3 and j != 3:
        q = q * p3
    if M > 4 and j != 4:
        q = q * p4
    if M > 5 and j != 5:
        q = q * p5
    if M > 6 and j != 6:
        q = q * p6
    if M > 7 and j != 7:
        q = q * p7
    return q


@triton.jit
def _all_projections(
    x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
    M: tl.constexpr, APPEND: tl.constexpr, HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The M projection tiles as eight values (slots past M repeat p0 and are never used).
    The backward holds them all: each modality's gradient needs the product of the others."""
    p0 = _project_j(0, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                    d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                    M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    p1 = p0
    p2 = p0
    p3 = p0
    p4 = p0
    p5 = p0
    p6 = p0
    p7 = p0
    if M > 1:
        p1 = _project_j(1, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 2:
        p2 = _project_j(2, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 3:
        p3 = _project_j(3, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 4:
        p4 = _project_j(4, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 5:
        p5 = _project_j(5, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 6:
        p6 = _project_j(6, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    if M > 7:
        p7 = _project_j(7, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    return p0, p1, p2, p3, p4, p5, p6, p7


# --------------------------------------------------------------------------- low-rank forward


@triton.jit
def lowrank_fwd_kernel(
    out_ptr, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, bias_ptr, present_ptr, batch, n_out, rank,
    M: tl.constexpr, APPEND: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    RANK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[b, k] = sum_r w_r prod_m ([x_m, 1] F_m[r])[b, k] + bias[k], one program per
    (BLOCK_B rows, BLOCK_H outputs), all ranks at once.

    The grid is 1-D with the output slices of one row block adjacent, so the programs that
    re-read the same x rows run together and find them in L2.  The running product lives in
    registers; only (B, h) is written.
    """
    BLOCK_N: tl.constexpr = RANK_P * BLOCK_H
    _, h0, rows, row_ok, r, k, col_ok = _row_block_tile(batch, n_out, rank, BLOCK_B, BLOCK_H, RANK_P)

    prod = _project_j(0, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                      d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                      M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
    for j in tl.static_range(1, M):
        p = _project_j(j, x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
                       d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
                       M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION)  # fmt: skip
        prod = prod * p

    # epilogue: rank weights per column (padded ranks weigh 0), then the rank sum
    if HAS_W:
        wcol = tl.load(w_ptr + r, mask=r < rank, other=0.0).to(tl.float32)
    else:
        wcol = tl.where(r < rank, 1.0, 0.0)
    # selected, not multiplied: a padded column (zero factor columns) is 0 * inf = NaN where an
    # input is infinite, and NaN * 0 would reach the rank sum
    prod = tl.where(col_ok[None, :], prod * wcol[None, :], 0.0)
    out = tl.sum(tl.reshape(prod, (BLOCK_B, RANK_P, BLOCK_H)), axis=1)
    ks = h0 + tl.arange(0, BLOCK_H)
    k_ok = ks < n_out
    if HAS_BIAS:
        out += tl.load(bias_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + rows.to(tl.int64)[:, None] * n_out + ks[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------- low-rank backward


@triton.jit
def _g_times_w(g_ptr, w_ptr, rows, row_ok, r, k, col_ok, n_out, rank, HAS_W: tl.constexpr):
    """The (BLOCK_B, BLOCK_N) tile of g[b, k] w_r (zero on padded rows, ranks, outputs)."""
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * n_out + k[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if HAS_W:
        wcol = tl.load(w_ptr + r, mask=r < rank, other=0.0).to(tl.float32)
        g = g * wcol[None, :]
    return g


@triton.jit
def lowrank_bwd_x_kernel(
    gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7, g_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, present_ptr, batch, n_out, rank,
    NEED_X: tl.constexpr, M: tl.constexpr, APPEND: tl.constexpr, HAS_W: tl.constexpr,
    HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    RANK_P: tl.constexpr, PRECISION: tl.constexpr, PRECISION32: tl.constexpr,
):  # fmt: skip
    """dL/dx_m = G_m F_m[:, :d_m]^T with G_m[b, r, k] = g[b, k] w_r prod_{j != m} P_j[b, r, k].

    One program per BLOCK_B rows; it walks the output slices in a fixed order, recomputes the
    M projection tiles of each slice (nothing from the forward is kept), and accumulates each
    modality's (BLOCK_B, d_m) gradient in its own rows of the float32 ``gx_m`` buffers (a
    read-modify-write of rows no other program touches: no atomics, deterministic; the first
    slice's load is masked off, so the buffers need no zero fill).  ``NEED_X`` is a bit mask
    of the modalities whose gradient is wanted; absent rows get exact zeros.
    """
    BLOCK_N: tl.constexpr = RANK_P * BLOCK_H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    rows64 = rows.to(tl.int64)
    n_hblk = tl.cdiv(n_out, BLOCK_H)
    for hb in range(0, n_hblk):
        h0 = hb * BLOCK_H
        r, k, col_ok = _columns(h0, n_out, rank, BLOCK_H, RANK_P)
        p0, p1, p2, p3, p4, p5, p6, p7 = _all_projections(
            x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
            d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
            M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        gw = _g_times_w(g_ptr, w_ptr, rows, row_ok, r, k, col_ok, n_out, rank, HAS_W)
        for j in tl.static_range(M):
            if (NEED_X >> j) & 1:
                gm = _others(j, gw, p0, p1, p2, p3, p4, p5, p6, p7, M)
                f_ptr = _pick(j, f0, f1, f2, f3, f4, f5, f6, f7)
                gx_ptr = _pick(j, gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7)
                d = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7)
                ok = _present_rows(present_ptr, rows, row_ok, j, M, HAS_PRESENT)
                depth = d + APPEND
                f_col = r.to(tl.int64) * depth * n_out + k
                for k0 in range(0, d, BLOCK_K):
                    i = k0 + tl.arange(0, BLOCK_K)
                    i_ok = i < d
                    # F^T tile (BLOCK_N, BLOCK_K)
                    ft = tl.load(f_ptr + f_col[:, None] + i[None, :] * n_out,
                                 mask=col_ok[:, None] & i_ok[None, :], other=0.0)  # fmt: skip
                    # G_m stays float32 (an intermediate: in a 16-bit dtype it overflowed, 9e4
                    # in float16 where the gradient is 90); the input tile converts exactly
                    part = _dot(gm, ft.to(tl.float32), None, PRECISION32)
                    dst = gx_ptr + rows64[:, None] * d + i[None, :]
                    store_ok = row_ok[:, None] & i_ok[None, :]
                    # this program's earlier pass stored these elements, from threads other
                    # than those loading them now: a store then a load of one address by
                    # different threads is ordered only by a barrier (the dots' own
                    # synchronisation happens to give one today; a review of the kernels)
                    tl.debug_barrier()
                    prev = tl.load(dst, mask=store_ok & (hb > 0), other=0.0)
                    # absent rows: exact zeros (their x never entered the fusion)
                    tl.store(dst, tl.where(ok[:, None], prev + part, 0.0), mask=store_ok)


@triton.jit
def _split_rows(split, rows_per_split, batch):
    """Rows [start, stop) of batch split ``split``, in 32 bits without overflow: start is
    below the batch (the host launches cdiv(B, rows_per_split) splits), and so is the stop,
    as ``start + min(rows_per_split, B - start)``.  ``min(start + rows_per_split, B)``
    wrapped past 2**31 - 1 for the last split of a batch within 2**22 rows of that bound,
    whose rows then all failed ``rows < stop``: their dL/dF and dL/dw dropped silently (a
    review's find, by the interpreter).  Rows stay in 32 bits too: start and the block
    offsets are multiples of BLOCK_B (rows_per_split is whole row blocks), so a block's last
    row is at most 2**31 - 1."""
    start = split * rows_per_split
    return start, start + tl.minimum(rows_per_split, batch - start)


@triton.jit
def lowrank_bwd_f_kernel(
    pf0, pf1, pf2, pf3, pf4, pf5, pf6, pf7, pw_ptr, g_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, present_ptr, batch, n_out, rank, rows_per_split,
    NEED_F: tl.constexpr, NEED_W: tl.constexpr, M: tl.constexpr, APPEND: tl.constexpr,
    HAS_W: tl.constexpr, HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, RANK_P: tl.constexpr, PRECISION: tl.constexpr, PRECISION32: tl.constexpr,
):  # fmt: skip
    """Partial sums over the batch of dL/dF_m = [x_m, 1]^T G_m and dL/dw_r = sum g prod_m P_m.

    One program per (batch split s, output slice): it walks its split's row blocks in order,
    recomputes the M projection tiles, and adds [x_m, 1]^T G_m of each block into its own slot
    ``pf_m[s]`` (float32, shaped like the factor: (S, R, D_m, h)); the first block stores
    (masked load), later blocks read-modify-write, so there is no zero fill and no atomics.
    The rank-weight gradient's partial goes to ``pw[s, slice, :]``.  The host sums the S
    partials in a fixed order: a deterministic two-stage reduction.
    """
    BLOCK_N: tl.constexpr = RANK_P * BLOCK_H
    n_hblk = tl.cdiv(n_out, BLOCK_H)
    pid = tl.program_id(0)
    split = pid // n_hblk
    hb = pid % n_hblk
    h0 = hb * BLOCK_H
    r, k, col_ok = _columns(h0, n_out, rank, BLOCK_H, RANK_P)
    r64 = r.to(tl.int64)
    start, stop = _split_rows(split, rows_per_split, batch)
    wacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in range(0, tl.cdiv(stop - start, BLOCK_B)):
        later = it > 0  # the first block stores, later ones add
        rows = start + it * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < stop
        rows64 = rows.to(tl.int64)
        p0, p1, p2, p3, p4, p5, p6, p7 = _all_projections(
            x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
            d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
            M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION,
        )  # fmt: skip
        g = _g_times_w(g_ptr, w_ptr, rows, row_ok, r, k, col_ok, n_out, rank, False)
        if NEED_W:  # sum over rows of g * prod_m P_m, per column (summed over k on the host)
            wacc += tl.sum(_others(M, g, p0, p1, p2, p3, p4, p5, p6, p7, M), axis=0)
        if HAS_W:
            g = g * tl.load(w_ptr + r, mask=r < rank, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(M):
            if (NEED_F >> j) & 1:
                gm = _others(j, g, p0, p1, p2, p3, p4, p5, p6, p7, M)
                x_ptr = _pick(j, x0, x1, x2, x3, x4, x5, x6, x7)
                pf_ptr = _pick(j, pf0, pf1, pf2, pf3, pf4, pf5, pf6, pf7)
                d = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7)
                ok = _present_rows(present_ptr, rows, row_ok, j, M, HAS_PRESENT)
                depth = d + APPEND
                slot = pf_ptr + split.to(tl.int64) * rank * depth * n_out + r64 * depth * n_out + k
                for k0 in range(0, d, BLOCK_K):
                    i = k0 + tl.arange(0, BLOCK_K)
                    i_ok = i < d
                    # x^T tile (BLOCK_K, BLOCK_B); absent and padded rows load zeros
                    xt = tl.load(x_ptr + rows64[None, :] * d + i[:, None],
                                 mask=i_ok[:, None] & ok[None, :], other=0.0)  # fmt: skip
                    part = _dot(xt.to(tl.float32), gm, None, PRECISION32)  # G_m float32, as above
                    dst = slot[None, :] + i[:, None] * n_out
                    st_ok = i_ok[:, None] & col_ok[None, :]
                    tl.debug_barrier()  # earlier passes' stores, by other threads (as above)
                    prev = tl.load(dst, mask=st_ok & later, other=0.0)
                    tl.store(dst, prev + part, mask=st_ok)
                if APPEND:  # the constant row: sum over rows of G_m (every row has its 1)
                    const_dst = slot + d * n_out
                    tl.debug_barrier()  # (as above: a different thread layout from the store's)
                    const_prev = tl.load(const_dst, mask=col_ok & later, other=0.0)
                    tl.store(const_dst, const_prev + tl.sum(gm, axis=0), mask=col_ok)
    if NEED_W:
        c = tl.arange(0, BLOCK_N)
        tl.store(pw_ptr + pid.to(tl.int64) * BLOCK_N + c, wacc)


@triton.jit
def lowrank_bwd_g_kernel(
    gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7, pw_ptr, g_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
    d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, present_ptr, batch, n_out, rank, lo_offset,
    NEED_G: tl.constexpr, SPLIT: tl.constexpr, NEED_W: tl.constexpr, M: tl.constexpr, APPEND: tl.constexpr,
    HAS_W: tl.constexpr, HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, RANK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """G_m[b, r, k] = g[b, k] w_r prod_{j != m} P_j[b, r, k], written to (B, R, h) buffers
    ``gm_m`` (in their dtype) for the modalities in the bit mask ``NEED_G``, and the
    rank-weight gradient's partials sum_b g prod_m P_m per program into ``pw`` (as
    :func:`lowrank_bwd_f_kernel`).  ``SPLIT`` (16-bit buffers): G_m as two terms,
    hi = G_m rounded and lo = G_m - hi rounded (``lo_offset`` elements further), whose sum
    carries about 16 of float32's 24 bits: the host's tensor-core products of both then meet
    the float32 intermediate to far below the result's own rounding.

    The backward's other half is two GEMMs per modality on the host (cuBLAS, tensor cores
    for 16-bit G): dL/dx_m = G_m F_m^T and dL/dF_m = [x_m, 1]^T G_m.  One program per
    (BLOCK_B rows, BLOCK_H outputs), grid as the forward's; the M projection tiles are
    recomputed and held at once (each G_m needs the others).  G_m is written for absent rows
    too: their constant row still enters dL/dF_m; the host zeroes their dL/dx_m.
    """
    BLOCK_N: tl.constexpr = RANK_P * BLOCK_H
    pid, _, rows, row_ok, r, k, col_ok = _row_block_tile(batch, n_out, rank, BLOCK_B, BLOCK_H, RANK_P)
    p0, p1, p2, p3, p4, p5, p6, p7 = _all_projections(
        x0, x1, x2, x3, x4, x5, x6, x7, f0, f1, f2, f3, f4, f5, f6, f7,
        d0, d1, d2, d3, d4, d5, d6, d7, present_ptr, rows, row_ok, r, k, col_ok, n_out,
        M, APPEND, HAS_PRESENT, BLOCK_B, BLOCK_K, BLOCK_N, PRECISION,
    )  # fmt: skip
    g = _g_times_w(g_ptr, w_ptr, rows, row_ok, r, k, col_ok, n_out, rank, False)
    if NEED_W:
        wsum = tl.sum(_others(M, g, p0, p1, p2, p3, p4, p5, p6, p7, M), axis=0)
        tl.store(pw_ptr + pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N), wsum)
    if HAS_W:
        g = g * tl.load(w_ptr + r, mask=r < rank, other=0.0).to(tl.float32)[None, :]
    # element (b, r, k) of a contiguous (B, R, h) buffer
    dst = rows.to(tl.int64)[:, None] * rank * n_out + (r.to(tl.int64) * n_out + k)[None, :]
    st_ok = row_ok[:, None] & col_ok[None, :]
    for j in tl.static_range(M):
        if (NEED_G >> j) & 1:
            gm_ptr = _pick(j, gm0, gm1, gm2, gm3, gm4, gm5, gm6, gm7)
            gm = _others(j, g, p0, p1, p2, p3, p4, p5, p6, p7, M)
            hi = gm.to(gm_ptr.dtype.element_ty)
            tl.store(gm_ptr + dst, hi, mask=st_ok)
            if SPLIT:
                lo = (gm - hi.to(tl.float32)).to(gm_ptr.dtype.element_ty)
                tl.store(gm_ptr + lo_offset + dst, lo, mask=st_ok)


# --------------------------------------------------------------------------- CP forward


@triton.jit
def _cp_project(
    x_ptr, a_ptr, d, rows, ok, rank,
    APPEND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """[x_m, 1] @ A_m for ``rows``: (BLOCK_B, RANK_P) float32, A_m a contiguous (D_m, R)."""
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, RANK_P)
    r_ok = rr < rank
    acc = tl.zeros((BLOCK_B, RANK_P), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        i = k0 + tl.arange(0, BLOCK_K)
        i_ok = i < d
        xt = tl.load(x_ptr + rows64[:, None] * d + i[None, :], mask=ok[:, None] & i_ok[None, :], other=0.0)
        at = tl.load(a_ptr + i[:, None] * rank + rr[None, :], mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(xt, at, acc, PRECISION)
    if APPEND:
        acc += tl.load(a_ptr + d * rank + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def cp_fwd_kernel(
    out_ptr, x0, x1, x2, x3, x4, x5, x6, x7, a0, a1, a2, a3, a4, a5, a6, a7,
    d0, d1, d2, d3, d4, d5, d6, d7, c_ptr, w_ptr, bias_ptr, present_ptr, batch, n_out, rank,
    M: tl.constexpr, APPEND: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PRESENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    RANK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out = (w * prod_m [x_m, 1] A_m) C^T + bias, one program per BLOCK_B rows.

    The (BLOCK_B, R) product is formed once in registers and then multiplied by C^T one
    BLOCK_H slice at a time (a float32 ``tl.dot``: the product is kept at full precision
    whatever the inputs' dtype).
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    rr = tl.arange(0, RANK_P)
    r_ok = rr < rank
    q = tl.zeros((BLOCK_B, RANK_P), dtype=tl.float32) + 1.0
    for j in tl.static_range(M):
        ok = _present_rows(present_ptr, rows, row_ok, j, M, HAS_PRESENT)
        q = q * _cp_project(
            _pick(j, x0, x1, x2, x3, x4, x5, x6, x7), _pick(j, a0, a1, a2, a3, a4, a5, a6, a7),
            _pick(j, d0, d1, d2, d3, d4, d5, d6, d7), rows, ok, rank,
            APPEND, BLOCK_B, BLOCK_K, RANK_P, PRECISION,
        )  # fmt: skip
    if HAS_W:
        q = q * tl.load(w_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    # padded ranks (zero factor columns) are 0 * inf = NaN for an infinite input: zeroed, so
    # that the dot with C's padded (zero) rows cannot spread it
    q = tl.where(r_ok[None, :], q, 0.0)
    rows64 = rows.to(tl.int64)
    for h0 in range(0, n_out, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        k_ok = ks < n_out
        # C^T tile (RANK_P, BLOCK_H) of the contiguous (h, R) output factor
        ct = tl.load(c_ptr + ks[None, :] * rank + rr[:, None], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        out = _dot(q, ct.to(tl.float32), None, PRECISION)
        if HAS_BIAS:
            out += tl.load(bias_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * n_out + ks[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])  # fmt: skip


# --------------------------------------------------------------------------- moments / zoom_shift
#
# x is a contiguous (N, T, C) array (N = batch times any middle axes), statistics over T per
# (n, channel); ``mask`` a contiguous (N, T) uint8 array.  One program per (n, BLOCK_C
# channels).  The statistics are the core's shifted two-pass algorithm about a pivot
# (mmfuse._core.align, statistics section): p = sum(x) / n, d = x - p,
# mean = p + sum(d) / n, var = sum(d^2) / n - (sum(d) / n)^2, with masked tokens never
# entering a sum (selected out with ``where``, so NaN padding cannot leak) and float32
# accumulation.  When the whole token axis fits one tile (SINGLE: BLOCK_T >= T) the tile is
# loaded once and kept in registers for both sums and the map, so zoom_shift reads x once
# and writes y once; otherwise the passes loop over BLOCK_T tokens (the re-reads of a
# program's (T, BLOCK_C) slab mostly come from L2).


@triton.jit
def _load_tokens(x_ptr, m_ptr, n, t, c, n_tok, n_ch, HAS_MASK: tl.constexpr):
    """The (BLOCK_T, BLOCK_C) tile of tokens ``t`` and channels ``c`` of row ``n`` as float32
    (every token, masked ones included: the map applies to them; out of range: 0), and its
    (BLOCK_T, 1) flags of the tokens that count in the statistics."""
    t_ok = t < n_tok
    if HAS_MASK:  # noqa: SIM108  (a compile-time branch: no mask load is emitted without one)
        keep = (tl.load(m_ptr + n * n_tok + t, mask=t_ok, other=0) != 0) & t_ok
    else:
        keep = t_ok
    ok = t_ok[:, None] & (c < n_ch)[None, :]
    x = tl.load(x_ptr + (n * n_tok + t)[:, None] * n_ch + c[None, :], mask=ok, other=0.0)
    return x.to(tl.float32), keep[:, None]


@triton.jit
def _finish(count, total, s1, s2):
    """(pivot, corr, var) from the count, sum(x), and sum(d), sum(d^2) about the pivot."""
    pivot = total / count
    corr = s1 / count
    var = s2 / count - corr * corr
    return pivot, corr, tl.where(var < 0.0, 0.0, var)  # rounding can go below 0; NaN stays


@triton.jit
def _tile_stats(x, keep):
    """(pivot, corr, var) of a tile holding every token (SINGLE)."""
    count = tl.sum(keep.to(tl.float32), axis=0)
    total = tl.sum(tl.where(keep, x, 0.0), axis=0)
    d = tl.where(keep, x - (total / count)[None, :], 0.0)
    return _finish(count, total, tl.sum(d, axis=0), tl.sum(d * d, axis=0))


@triton.jit
def _loop_stats(
    x_ptr, m_ptr, n, c, n_tok, n_ch, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
):
    """(pivot, corr, var) over all tokens of row ``n``, BLOCK_T at a time (two passes)."""
    t0 = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(0, n_tok, BLOCK_T):
        x, keep = _load_tokens(x_ptr, m_ptr, n, t_start + t0, c, n_tok, n_ch, HAS_MASK)
        total += tl.sum(tl.where(keep, x, 0.0), axis=0)
        count += tl.sum(tl.where(keep, 1.0, 0.0), axis=0)  # (1,), broadcast over channels
    pivot = total / count
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t_start in range(0, n_tok, BLOCK_T):
        x, keep = _load_tokens(x_ptr, m_ptr, n, t_start + t0, c, n_tok, n_ch, HAS_MASK)
        d = tl.where(keep, x - pivot[None, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    return _finish(count, total, s1, s2)


@triton.jit
def _row_stats(
    x_ptr, m_ptr, n, c, n_tok, n_ch,
    HAS_MASK: tl.constexpr, SINGLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(pivot, corr, var) of row ``n``'s channels ``c``: one register tile when every token
    fits (SINGLE), else the two looping passes.  (zoom_shift's kernel keeps the SINGLE tile
    for its map, so it calls the two pieces itself.)"""
    if SINGLE:
        x, keep = _load_tokens(x_ptr, m_ptr, n, tl.arange(0, BLOCK_T), c, n_tok, n_ch, HAS_MASK)
        return _tile_stats(x, keep)
    return _loop_stats(x_ptr, m_ptr, n, c, n_tok, n_ch, HAS_MASK, BLOCK_T, BLOCK_C)


@triton.jit
def moments_kernel(
    mean_ptr, std_ptr, x_ptr, m_ptr, n_tok, n_ch, eps,
    HAS_MASK: tl.constexpr, SINGLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """mean and sqrt(var + eps) per (row, channel), written as (N, 1, C) in x's dtype."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pivot, corr, var = _row_stats(x_ptr, m_ptr, n, c, n_tok, n_ch, HAS_MASK, SINGLE, BLOCK_T, BLOCK_C)
    c_ok = c < n_ch
    tl.store(mean_ptr + n * n_ch + c, (pivot + corr).to(mean_ptr.dtype.element_ty), mask=c_ok)
    tl.store(std_ptr + n * n_ch + c, tl.sqrt_rn(var + eps).to(std_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def zoom_shift_kernel(
    y_ptr, x_ptr, g_ptr, m_ptr, gm_ptr, n_tok, n_gtok, n_ch, alpha, alpha_lo, eps,
    HAS_MASK: tl.constexpr, HAS_GMASK: tl.constexpr, ALPHA_ONE: tl.constexpr, SINGLE: tl.constexpr,
    GSINGLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_GT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = ((x - p) - corr) s + target, the core's map about x's pivot, with
    s = (sigma_g / sigma_x) ** alpha, sigma = sqrt(var + eps), target = mu_g at alpha = 1
    else (1 - alpha) mu_x + alpha mu_g.  Every token of x is mapped, masked ones included
    (the mask only keeps them out of the statistics), as the core does.

    A partial step's target is computed in float64 from the pivots and corrections and
    rounded once, as the core's (``zoom_shift_map``): the two means may cancel, and rounded
    to float32 first they left half an ulp of their size in a target near 0.  ``alpha`` is
    passed as float32 (the zoom's exponent) plus ``alpha_lo``, the float32 remainder of the
    caller's float64 alpha, so that the weights are the caller's to 2**-48."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < n_ch
    if GSINGLE:
        g, g_keep = _load_tokens(g_ptr, gm_ptr, n, tl.arange(0, BLOCK_GT), c, n_gtok, n_ch, HAS_GMASK)
        g_piv, g_corr, g_var = _tile_stats(g, g_keep)
    else:
        g_piv, g_corr, g_var = _loop_stats(g_ptr, gm_ptr, n, c, n_gtok, n_ch, HAS_GMASK, BLOCK_GT, BLOCK_C)
    t0 = tl.arange(0, BLOCK_T)
    if SINGLE:
        x, keep = _load_tokens(x_ptr, m_ptr, n, t0, c, n_tok, n_ch, HAS_MASK)
        pivot, corr, var = _tile_stats(x, keep)
    else:
        pivot, corr, var = _loop_stats(x_ptr, m_ptr, n, c, n_tok, n_ch, HAS_MASK, BLOCK_T, BLOCK_C)
    # sqrt_rn: tl.sqrt is sqrt.approx.ftz on a GPU, 0 for a subnormal variance (eps = 0)
    sigma = tl.sqrt_rn(var + eps)
    live = sigma != 0.0  # no spread: nothing to zoom (NaN is a spread, as in the core)
    ratio = tl.sqrt_rn(g_var + eps) / tl.where(live, sigma, 1.0)
    if ALPHA_ONE:
        s = tl.where(live, ratio, 1.0)
        target = g_piv + g_corr
    else:
        s = tl.where(live, tl.exp2(alpha * tl.log2(ratio)), 1.0)
        a64 = tl.cast(alpha, tl.float64) + tl.cast(alpha_lo, tl.float64)
        mean64 = pivot.to(tl.float64) + corr.to(tl.float64)
        g_mean64 = g_piv.to(tl.float64) + g_corr.to(tl.float64)
        target = ((1.0 - a64) * mean64 + a64 * g_mean64).to(tl.float32)
    c_ok2 = c_ok[None, :]
    if SINGLE:  # the tile is still in registers: x read once
        at = (n * n_tok + t0)[:, None] * n_ch + c[None, :]
        y = ((x - pivot[None, :]) - corr[None, :]) * s[None, :] + target[None, :]
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=(t0 < n_tok)[:, None] & c_ok2)
    else:
        for t_start in range(0, n_tok, BLOCK_T):
            t = t_start + t0
            ok = (t < n_tok)[:, None] & c_ok2
            at = (n * n_tok + t)[:, None] * n_ch + c[None, :]
            xb = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
            y = ((xb - pivot[None, :]) - corr[None, :]) * s[None, :] + target[None, :]
            tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)
