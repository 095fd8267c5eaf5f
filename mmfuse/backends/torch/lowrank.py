"""``mmfuse::lowrank_fusion``: LMF Eq. 8 as a custom op with a blocked, memory-lean analytic
backward (see the package docstring for what it saves and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..._core import fusion as _core_fusion
from ..._core.sequence import torch_transformed
from ..._namespace import block_budget, block_slices
from .._torch_eager import any_requires_grad, bind, direct
from ._common import (
    BLOCK_BYTES,
    LOW_PRECISION,
    cast,
    column_sums,
    compute_dtype,
    flat_factor,
    load_fusion_inputs,
    masked_rows,
    project_into,
    save_fusion_inputs,
    store,
    store_gram,
)

__all__ = ['lowrank_fusion']


# Kept projections' rank sums run as a GEMM (R h^2 multiply-adds per row, against R h for the
# strided sum) up to this output width h.
_RANK_SUM_GEMM_WIDTH = 8


def _rank_sum_matrix(
    weights: torch.Tensor | None, rank: int, out_dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The (R h, h) matrix S with S[r h + k, k] = w_r (w = 1 without weights), so that a
    (n, R h) product times S is the rank-weighted sum.  Used for kept projections with
    h <= _RANK_SUM_GEMM_WIDTH only, where this GEMM costs little: there it runs about 4x
    faster than the strided sum over the rank axis (measured at R h = 4).  (The backward's
    spread of (n, h) gradients over the ranks stays a broadcast multiply: as the GEMM g S^T,
    with its inner dimension of h, it ran slower.)"""
    w = torch.ones(rank, dtype=dtype, device=device) if weights is None else cast(weights, dtype)
    return torch.kron(w.view(rank, 1), torch.eye(out_dim, dtype=dtype, device=device))


def _keeps_projections(xs: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]) -> bool:
    """Whether a fusion keeps its M (B, R h) projections for backward (which then skips one
    GEMM per modality) instead of recomputing them.

    Kept when they are cheap to hold: narrow fusions, whose projections take at most a quarter
    of the inputs' elements (M R h per sample against sum_m d_m; e.g. (8, 16, 64) with R h = 4:
    12 against 88).  Otherwise they are recomputed: the memory-lean backward.  The rule reads
    no batch size: the op's second output has this shape, and a rule on B (small batches
    once kept theirs too) guarded traced graphs on it, so that ``torch.export`` failed for a
    dynamic batch and ``torch.compile(dynamic=True)`` recompiled across it.  (Eager calls up
    to a size run without the op: :func:`plain_form`, :func:`whole_batch`.)
    """
    rank, _, out_dim = factors[0].shape
    return 4 * len(xs) * rank * out_dim <= sum(x.shape[1] for x in xs)


def _lowrank_forward(
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the fusion and, where :func:`_keeps_projections` says so, the (M, B, R h)
    projections in the compute dtype for backward (else an empty tensor)."""
    dtype = xs[0].dtype
    cdt = compute_dtype(dtype)
    xs = [cast(x, cdt) for x in xs]
    rank, _, out_dim = factors[0].shape
    keep = _keeps_projections(xs, factors)
    # kept projections must be the unweighted P_m the backward uses; else fold w into W_0
    mats = [
        flat_factor(cast(f, cdt), cast(weights, cdt) if m == 0 and weights is not None and not keep else None)
        for m, f in enumerate(factors)
    ]
    batch = xs[0].shape[0]
    width = rank * out_dim
    dev = xs[0].device
    out = torch.empty((batch, out_dim), dtype=cdt, device=dev)
    kept = torch.empty((len(xs), batch, width) if keep else (0,), dtype=cdt, device=dev)
    # Fusions that keep their projections run on the whole batch at once (module docstring).
    rows = batch if keep else _core_fusion.block_rows(
        batch, sum(x.shape[1] for x in xs) + 2 * width, out.element_size(), block_budget(out, BLOCK_BYTES)
    )
    acc = torch.empty((min(rows, batch), width), dtype=cdt, device=dev)
    proj = torch.empty_like(acc) if len(xs) > 1 and not keep else acc  # kept: projections go there
    # kept projections are unweighted: their rank sum applies w (as a GEMM while h is small)
    # (on the CPU only, where it was measured, and where the finiteness check below is no
    # device synchronisation)
    gemm_sum = keep and out_dim <= _RANK_SUM_GEMM_WIDTH and dev.type == "cpu"
    rank_sum = _rank_sum_matrix(weights, rank, out_dim, cdt, dev) if gemm_sum else None
    rank_w = cast(weights, cdt).view(1, rank, 1) if keep and not gemm_sum and weights is not None else None
    for blk in block_slices(batch, rows):
        n = blk.stop - blk.start
        for m, (x, mat) in enumerate(zip(xs, mats)):
            target = kept[m, blk] if keep else (acc[:n] if m == 0 else proj[:n])
            project_into(target, masked_rows(x, present, m, blk), mat, append_one)
            if keep and m == 1:
                torch.mul(kept[0, blk], target, out=acc[:n])
            elif m:
                acc[:n].mul_(target)
        prod = kept[0, blk] if keep and len(xs) == 1 else acc[:n]
        if rank_sum is not None:
            torch.mm(prod, rank_sum, out=out[blk])
            # any inf or NaN makes the block's sum inf or NaN (one reduction, where isfinite
            # and all took five operators, 0.13 ms at 65536 rows); an overflowing sum of finite
            # outputs redoes nothing (below: no sample is non-finite)
            if bool(torch.isfinite(out[blk].sum())):
                continue
            # an inf in prod met the GEMM's zeros (inf * 0 = NaN) and spread NaN to the
            # sample's other outputs: those samples again as the weighted sum itself.  Those
            # alone: the block's other samples keep the GEMM's sums (redone as sums too, their
            # last bits changed with a neighbour's inf; a review's find)
            bad = (~torch.isfinite(out[blk]).all(dim=1)).nonzero().squeeze(1)
            redone = prod[bad].view(-1, rank, out_dim)
            if weights is not None:
                redone = redone * cast(weights, cdt).view(1, rank, 1)
            out[blk].index_copy_(0, bad, torch.sum(redone, dim=1))
            continue
        if rank_w is not None:
            torch.sum(prod.view(n, rank, out_dim) * rank_w, dim=1, out=out[blk])
        else:
            torch.sum(prod.view(n, rank, out_dim), dim=1, out=out[blk])
    if bias is not None:
        out.add_(cast(bias, cdt))
    return cast(out, dtype), kept


_lowrank_op = torch.library.custom_op("mmfuse::lowrank_fusion", _lowrank_forward, mutates_args=())


@_lowrank_op.register_fake
def _(xs: Any, factors: Any, weights: Any, bias: Any, append_one: bool, present: Any) -> Any:
    batch, (rank, _, out_dim) = xs[0].shape[0], factors[0].shape
    cdt = compute_dtype(xs[0].dtype)
    keep = _keeps_projections(xs, factors)
    kept = xs[0].new_empty((len(xs), batch, rank * out_dim) if keep else (0,), dtype=cdt)
    return xs[0].new_empty((batch, out_dim)), kept


# --------------------------------------------------------------------------- lowrank backward


def lowrank_grads(
    grad: torch.Tensor,
    xs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
    needs: Sequence[bool],
    projections: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """The analytic backward of the blocked custom op, into buffers (no graph of it).

    ``needs`` = [x_0..x_{M-1}, f_0..f_{M-1}, weights, bias]; returns the gradients in that
    order, None where not needed.  It runs in batch blocks, reusing the forward's kept
    ``projections`` (M, B, R h) where there are some, else recomputing them per block.  Per
    block ``G_m = (g w) * prod_{k != m} P_k`` comes from prefix and suffix products (no
    division, so exact zeros in a projection are harmless).  The same formulas on the whole
    batch, differentiable (double backward) and with the fewest operations (small
    problems), are :func:`whole_batch_grads`.
    """
    n_mod = len(xs)
    dtype = grad.dtype
    cdt = compute_dtype(dtype)
    dev = grad.device
    g_all = cast(grad, cdt)
    xs = [cast(x, cdt) for x in xs]
    rank, _, out_dim = factors[0].shape
    width = rank * out_dim
    mats = [flat_factor(cast(f, cdt)) for f in factors]
    w = cast(weights, cdt) if weights is not None else torch.ones(rank, dtype=cdt, device=dev)
    need_x, need_f = needs[:n_mod], needs[n_mod : 2 * n_mod]
    need_w, need_b = needs[2 * n_mod], needs[2 * n_mod + 1]
    batch = xs[0].shape[0]
    # C-contiguous, as the fake says (empty_like kept a transposed x's strides, which
    # torch.compile's inductor asserts against the fake; a review's find)
    gx: list[Any] = [torch.empty(x.shape, dtype=cdt, device=dev) if need_x[m] else None
                     for m, x in enumerate(xs)]  # fmt: skip
    # the first block writes the factor and weight gradients, later blocks add to them
    gmat: list[Any] = [torch.empty_like(mat) if need_f[m] else None for m, mat in enumerate(mats)]
    gw = torch.empty_like(w) if need_w else None

    # With kept projections the whole batch is one block (the forward's choice too: per-row
    # arrays are narrow or rows are few); otherwise blocks keep the recomputation in cache.
    rows = batch if projections is not None else _core_fusion.block_rows(
        batch, 2 * sum(x.shape[1] for x in xs) + (2 * n_mod + 1) * width, g_all.element_size(),
        block_budget(g_all, BLOCK_BYTES),
    )  # fmt: skip
    cap = min(rows, batch)
    n_buf = 0 if projections is not None else n_mod  # recomputed projections go here
    buf = [torch.empty((cap, width), dtype=cdt, device=dev) for _ in range(n_buf)]
    # buffers for the prefix products of modalities 2.. (see pre below)
    prefix: list[Any] = [None, None]
    prefix += [torch.empty((cap, width), dtype=cdt, device=dev) for _ in range(2, n_mod)]
    run = torch.empty((cap, width), dtype=cdt, device=dev)
    gm = torch.empty((cap, width), dtype=cdt, device=dev)
    w3 = w.view(1, rank, 1)
    for blk in block_slices(batch, rows):
        n = blk.stop - blk.start
        first = blk.start == 0
        feats = [masked_rows(x, present, m, blk) for m, x in enumerate(xs)]
        if projections is not None:
            proj = [projections[m, blk] for m in range(n_mod)]
        else:
            proj = [b[:n] for b in buf]
            for m in range(n_mod):
                project_into(proj[m], feats[m], mats[m], append_one)
        # pre[m] = prod_{k<m} P_k for m >= 1 (pre[0] is implicitly ones)
        pre: list[Any] = [None, proj[0]][:n_mod]
        for m in range(2, n_mod):
            pre.append(torch.mul(pre[m - 1], proj[m - 1], out=prefix[m][:n]))
        g = g_all[blk]
        if need_w:  # dL/dw_r = sum_{b,k} g[b,k] prod_m P_m[b,r,k]
            full = proj[0] if n_mod == 1 else torch.mul(pre[-1], proj[-1], out=gm[:n])
            assert gw is not None
            if out_dim == 1 and dev.type == "cpu":
                # (n, R) times g (n, 1), summed over the samples: the GEMV below would take
                # full's transposed view, on which MKL's ran 40x slower than on rows (400
                # against 10 us at (65536, 4)); this took 120 (a transposing copy alone, 300)
                store(gw, column_sums(full * g), first)
            else:
                by_rank = full.reshape(n, rank, out_dim).permute(1, 0, 2).reshape(rank, n * out_dim)
                store(gw, torch.mv(by_rank, g.reshape(-1)), first)
        # run = (g w) * prod_{k>m} P_k, walked from the last modality down
        torch.mul(g.unsqueeze(1), w3, out=run[:n].view(n, rank, out_dim))
        run_b = run[:n]
        for m in range(n_mod - 1, -1, -1):
            if need_x[m] or need_f[m]:
                gmm = run_b if m == 0 else torch.mul(run_b, pre[m], out=gm[:n])
                d = feats[m].shape[1]
                if need_x[m]:
                    gxb = torch.mm(gmm, mats[m][:d].t(), out=gx[m][blk])
                    if present is not None:
                        gxb.masked_fill_(~present[blk, m : m + 1], 0)
                if need_f[m]:
                    store_gram(gmat[m][:d], gmm, feats[m], first)
                    if append_one:
                        store(gmat[m][d], column_sums(gmm), first)
            if m:
                run_b.mul_(proj[m])

    out: list[torch.Tensor | None] = [None if gx[m] is None else cast(gx[m], dtype) for m in range(n_mod)]
    for m, f in enumerate(factors):
        rows_m = f.shape[1]
        g_f = None if gmat[m] is None else gmat[m].reshape(rows_m, rank, out_dim).permute(1, 0, 2)
        out.append(None if g_f is None else g_f.contiguous().to(dtype))
    out.append(None if gw is None else cast(gw, dtype))
    out.append(column_sums(g_all).to(dtype) if need_b else None)
    return out


def _lowrank_grads_impl(
    grad: torch.Tensor,
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
    needs: list[bool],
    projections: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`lowrank_grads` as one opaque op (no graph of the backward): gradients in the
    order of ``needs``; one not needed comes back as an empty tensor (custom ops cannot
    return None in a list; outputs must not alias one another: a fresh one each)."""
    grads = lowrank_grads(grad, xs, factors, weights, append_one, present, needs, projections)
    return [grad.new_empty((0,)) if g is None else g for g in grads]


_lowrank_backward_op = torch.library.custom_op(
    "mmfuse::lowrank_fusion_backward", _lowrank_grads_impl, mutates_args=()
)
# eager backward passes run the implementation itself (mmfuse.backends._torch_eager.direct)
_lowrank_backward_call = direct(torch.ops.mmfuse.lowrank_fusion_backward, _lowrank_grads_impl)


@_lowrank_backward_op.register_fake
def _(
    grad: Any, xs: Any, factors: Any, weights: Any, append_one: bool, present: Any, needs: Any,
    projections: Any = None,
) -> Any:
    n_mod = len(xs)
    out = []
    # in grad's dtype, as the implementation casts them (the inputs' own in any autograd use)
    for m, x in enumerate(xs):
        out.append(grad.new_empty(x.shape) if needs[m] else grad.new_empty((0,)))
    for m, f in enumerate(factors):
        out.append(grad.new_empty(f.shape) if needs[n_mod + m] else grad.new_empty((0,)))
    rank, out_dim = factors[0].shape[0], factors[0].shape[2]
    out.append(grad.new_empty((rank,)) if needs[2 * n_mod] else grad.new_empty((0,)))
    out.append(grad.new_empty((out_dim,)) if needs[2 * n_mod + 1] else grad.new_empty((0,)))
    return out


def _lowrank_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, factors, weights, _bias, append_one, present = inputs
    kept = output[1]
    ctx.mark_non_differentiable(kept)  # an internal by-product, not a result
    ctx.set_materialize_grads(False)  # so autograd does not fill a zero gradient for it
    # saved last where the forward kept projections (their absence: an empty tensor, not saved)
    save_fusion_inputs(ctx, xs, factors, weights, present, append_one, *([kept] if kept.numel() > 0 else []))


def _lowrank_backward(ctx: Any, grad: torch.Tensor | None, _grad_kept: Any = None) -> tuple[Any, ...]:
    n_mod = ctx.n_mod
    if grad is None:  # the fusion did not reach the loss (grads are not materialised)
        return ([None] * n_mod, [None] * n_mod, None, None, None, None)
    need_xs, need_fs, need_w, need_b = (ctx.needs_input_grad[i] for i in range(4))
    xs, factors, weights, present, rest = load_fusion_inputs(ctx, n_mod)
    kept = rest[0] if rest else None
    need_w = bool(need_w) and weights is not None
    needs = [bool(v) for v in (*need_xs, *need_fs, need_w, need_b)]
    # a graph of the backward wanted, or a backward under vmap (batched gradients:
    # is_grads_batched, vectorized Jacobians), where the buffers' in-place writes have no
    # batching rule: the differentiable, out-of-place formulas
    if torch.is_grad_enabled() or torch_transformed(grad):
        grads: list[Any] = whole_batch_grads(grad, xs, factors, weights, ctx.append_one, present, needs)
    else:
        grads = _lowrank_backward_call(
            grad.contiguous(), xs, factors, weights, ctx.append_one, present, needs, kept
        )
    return (
        [grads[m] if need_xs[m] else None for m in range(n_mod)],
        [grads[n_mod + m] if need_fs[m] else None for m in range(n_mod)],
        grads[2 * n_mod] if need_w else None,
        grads[2 * n_mod + 1] if need_b else None,
        None,
        None,
    )


_lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)
_lowrank_eager = bind(
    "_LowRankFusion",
    torch.ops.mmfuse.lowrank_fusion,
    _lowrank_setup_context,
    _lowrank_backward,
    _lowrank_forward,
)



# --------------------------------------------------------------------------- whole batch
#
# Small fusions (whole_batch below) run as one plain autograd.Function over the core's
# rank-major form instead of the blocked custom op: there every torch operator's fixed cost (a
# few microseconds on a CPU, a kernel launch on a GPU) decides the time, and this form
# dispatches the fewest of them (about three per modality forward, a dozen per modality
# backward; benchmarks/overhead.py counts them), with one batched GEMM per modality.  Its
# backward, whole_batch_grads, is also the differentiable backward of the blocked op
# (create_graph=True).  Fusions with few outputs (h = 1, or R h <= PLAIN_RANK_OUTPUTS) and
# those past its bounds up to PLAIN_ELEMENTS instead run plain_fusion under autograd (see
# plain_form).
#
# The size rule (measured: one training step, 2-core CI box, float32; docs/backends.rst
# "Small problems"): the whole-batch function took 0.57-0.67x the blocked op's time at
# (32, 32, 128), R 16, h 128 for B = 32 to 128, and 0.66-0.96x at (8, 16, 64), R 4, h 1 for
# B = 64 to 256; at h = 1 it lost beyond (1.0x at B = 512, 2.1x at B = 1024: its R
# matrix-vector products against the blocked op's one GEMM with R h columns).  Hence the
# core's bound on B R h and, on torch, at most WHOLE_BATCH_ROWS samples.  (Since the
# thirty-second session h = 1, and R h <= PLAIN_RANK_OUTPUTS, run plain_fusion on the CPU
# instead; the bound stays as measured.)
WHOLE_BATCH_ROWS = 256


# On the CPU, plain_fusion runs while its projections, (R h, B) or (B, R h), hold at most this
# many elements: plain GEMMs under autograd, whose fixed costs are those of a handful of
# operators.  Beyond, the blocked op wins: its cache-sized blocks keep the projections and
# their products in cache, where the plain form streams every (R h, B) intermediate through
# memory, forward and backward.  Measured (one training step of LowRankFusion, (8, 16, 64),
# 2-core CI box, float32, medians of rounds alternating the order; benchmarks/RESULTS.md,
# thirty-second session): with h = 1, R 4 to 128, against the blocked op 0.74-0.83x its time
# at B R = 2**19, 0.82-0.92x at 2**20, 0.94-1.25x at 2**21 (R 32: 1.25, R 128: 1.08); with h 2
# to 32 and R 4 or 16 past WHOLE_BATCH_ROWS samples, 0.49-0.93x (B = 512 to 65536, R h B up
# to 2**20; 1.02 at the bound, h 16, R 16, B 4096; (32, 32, 128) with h 16 to 128, R 16:
# 0.80-0.91x).
PLAIN_ELEMENTS = 1 << 20


# Within the whole-batch function's bounds (whole_batch), plain_fusion runs instead, while
# autograd records, where R h is at most this: there its one GEMM per modality with R h rows
# beat the function's batched GEMMs (R of them, h columns each) and Python backward, and
# beyond the plain form's copy of each factor as (R h, D) (its GEMM's layout) costs more than
# that saves.  Measured (one training step, 2-core CI box, float32, (8, 16, 64) unless noted),
# plain / whole-batch: 0.79-0.99x at B = 32 to 256 for R h = 8 to 64 (1.02 at h 16, R 4, B
# 256), 1.02-1.05x at B = 1 (a few microseconds, within the rounds' spread: kept plain there);
# 0.87-1.14x for R h = 128 to 512 (above 1 in 10 of 12), and 1.06-1.29x at (32, 32, 128), h
# 16 to 128, R 16, B = 32.
# With h = 1 the plain form runs at every size within PLAIN_ELEMENTS (see plain_fusion).
# Without autograd the whole-batch form runs as plain operations without the function, fewer
# than plain_fusion's (see plain_form).
PLAIN_RANK_OUTPUTS = 64


# Without autograd (a forward alone: no_grad, inference), plain_fusion runs past the
# whole-batch bounds only while B R h is at most FORWARD_PLAIN_ELEMENTS or R h at most
# FORWARD_PLAIN_RANK_OUTPUTS: a forward alone gains less from it than a training step.
# Measured (forward under no_grad, (8, 16, 64), 2-core CI box, float32, rounds alternating
# the order), plain / op: 0.52-0.93x at B R h = 2**14 to 2**16 for R h = 4 to 64; with R h 4
# and 8, 0.76-1.01x at 2**18 and 0.78-0.91x at 2**20; with R h 16 to 256, 1.10-1.19x at 2**18
# and 1.12-1.31x at 2**20.
FORWARD_PLAIN_ELEMENTS = 1 << 16
FORWARD_PLAIN_RANK_OUTPUTS = 8


# Without autograd on the CPU, the whole-batch form also runs beyond the core's bound on B R h
# where B is at most FORWARD_WHOLE_BATCH_ROWS and h over FORWARD_WHOLE_BATCH_WIDTH (NumPy's own
# rule, mmfuse._core.fusion.NUMPY_WHOLE_BATCH_ROWS, measured again for torch).  There the
# blocked op's copy of every factor as (D_m, R h) per call (1/B of the GEMMs' flops, but a
# strided copy of R D_m h elements) decided the time: 2.0x the plain torch expression at B =
# 16, (32, 32, 32), R 512, h 64 (benchmarks/sizes.py).  Measured (forward under no_grad, one
# thread, thread CPU time, minima of 3 calls, medians of 7 interleaved rounds, float32, on the
# 2-core CI box, the forty-third session), whole-batch / op: 0.52-1.08 for B R h = 2**19 to
# 2**22, B 16 to 128, h 32 to 128, R 64 to 1024 ((32, 32, 32), (8, 16, 64), (32, 32, 128),
# (64, 64, 64)), the whole-batch form 0.92-1.05x the plain expression; with h = 4 or 8 (R
# 1024 to 4096) 1.36-4.53: there the op's one GEMM of R h columns beats R GEMMs of h columns,
# as on NumPy.  Not while autograd records: there the step's rules above hold, and mmfuse's
# step already took 0.52-0.87x the plain expression's at those sizes (the whole-batch function
# 0.82-1.01x of it, but holding M (R, B, h) projections for backward where the op holds none).
# And only within the measured sizes, B R h <= FORWARD_WHOLE_BATCH_ELEMENTS: the whole-batch
# form holds M (R, B, h) projections at once where the op's workspaces are chunked, 450 against
# 166 MB at B 128, R 1024, h 256 (2**25) and 892 against 323 at R 2048, for about the op's time
# (a diff review's find).
FORWARD_WHOLE_BATCH_ROWS = 128
FORWARD_WHOLE_BATCH_WIDTH = 8
FORWARD_WHOLE_BATCH_ELEMENTS = 1 << 22


# Up to this many samples on the CPU, and always on an accelerator, plain_fusion stages the
# constant (``[x_m, 1]``, one copy of x_m), and with h = 1 runs batch-major, (B, R); beyond, it
# runs rank-major, (R h, B), with the constant's row of F_m as addmm's bias.  Measured (one
# training step, (8, 16, 64), R 4 and 16, h = 1, 2-core CI box, float32, interleaved medians):
# the rank-major form took 1.1-1.2x the batch-major one's time at B = 32 to 256 (more
# operators: the slices of F_m, their backward's zero-filled gradients, the views of the last
# product), about even at 512 and 1024, 0.86-0.94x at 2048, 0.82-0.87x at 4096 and 0.65-0.74x
# at 16384 (the batch-major GEMMs' R columns are too few for the CPU's GEMM kernels, and its
# copy of every x_m costs its bytes); with h = 2 to 32 the staged rank-major form was the
# faster up to B = 512, the unstaged from 4096.  Accelerators keep the forms launching fewer
# operators.
STAGED_ROWS = 1024


# On an accelerator (tensors off the CPU) both small forms run while their largest arrays
# hold at most this many elements, instead of the CPU's bounds above: the whole-batch form's
# rank-major projections and its dL/dx partials, (R, B, h) and (R, B, d_m), so B R max(h,
# d_m); with h = 1 the plain operations' (B, R).  There a step's device work stays hidden
# behind the host's launches up to far larger batches than on a CPU, so the form launching the
# fewest operators decides the step.  Measured on an H200 (benchmarks/gpu.py, RESULTS.md,
# twenty-fifth session): the LMF layer's training step took 1.86 ms at B = 32 and 1.75 at
# B = 4096 ((32, 32, 128), R 16, h 128: B R h = B R d_m = 2**23), the
# whole-batch form's 1.37 at B = 32 and the blocked op's 2.10 at B = 4096; torch's profiler
# counts 60 top-level (138 in all) operators a step for the whole-batch form, 150 (352) for
# the op on one block (an accelerator's blocks are whole batches), 88 (311) for LMF.  The
# whole-batch form runs the GEMMs LMF runs, and LMF's step at B = 4096 was still host-bound:
# the bound takes in that size (and twice it, B = 8192 there, not measured).  Not timed at
# batches between 32 and 4096 nor on other devices (benchmarks/gpu_tune.py's "layers" sweep
# times it).
# Memory: each such array at most 64 MiB in float32; M kept projections and, in backward,
# their prefix products (the op on one block held more at B = 4096: 294 MiB peak against
# LMF's 226).
ACCELERATOR_WHOLE_BATCH_ELEMENTS = 1 << 24


def plain_form(
    batch: int, rank: int, out_dim: int, on_cpu: bool = True, masked: bool = False, records: bool = True
) -> bool:
    """Whether a torch low-rank fusion of this size (its tensors on the CPU or not; with a
    ``present`` mask or not; autograd recording it or not) runs :func:`plain_fusion`: on
    the CPU while ``B R h`` <= :data:`PLAIN_ELEMENTS`, where :func:`whole_batch` holds only
    with h = 1 or, while autograd records, ``R h`` <= :data:`PLAIN_RANK_OUTPUTS`, without
    autograd only while ``B R h`` <= :data:`FORWARD_PLAIN_ELEMENTS` or ``R h`` <=
    :data:`FORWARD_PLAIN_RANK_OUTPUTS`, and with a mask at most :data:`STAGED_ROWS` samples;
    elsewhere with h = 1 while ``B R`` <= :data:`ACCELERATOR_WHOLE_BATCH_ELEMENTS`; never
    under ``torch.compile``.

    Why only while autograd records: without it the whole-batch form runs as plain
    operations too (no autograd.Function), the fewest: a tiny call (B = 4, h 2, R 2) took
    45 us in the plain form against 35 us.

    Why the masked bound: the plain form masks whole modalities (``torch.where``), and autograd
    keeps each masked copy of x_m for the factors' gradients, B sum d_m elements (1 GiB at
    B = 2**18, d_m 512, 512 in float32), where the blocked op masks block by block and keeps
    only the inputs; up to STAGED_ROWS samples the plain form copies every x_m anyway (its
    staged constant), as the whole-batch function does."""
    if torch.compiler.is_compiling():
        return False
    if not on_cpu:
        return out_dim == 1 and batch * rank <= ACCELERATOR_WHOLE_BATCH_ELEMENTS
    elements = batch * rank * out_dim
    if elements > PLAIN_ELEMENTS or (masked and batch > STAGED_ROWS):
        return False
    if not records and elements > FORWARD_PLAIN_ELEMENTS and rank * out_dim > FORWARD_PLAIN_RANK_OUTPUTS:
        return False
    if out_dim == 1 or not whole_batch(batch, rank, out_dim):
        return True
    return records and rank * out_dim <= PLAIN_RANK_OUTPUTS


def whole_batch(batch: int, rank: int, out_dim: int, on_cpu: bool = True, widest: int = 0) -> bool:
    """Whether a torch low-rank (or CP) fusion of this size (its tensors on the CPU or not)
    runs whole-batch: on the CPU small enough for the core's rule and at most
    :data:`WHOLE_BATCH_ROWS` samples, elsewhere while ``B R max(h, widest)`` <=
    :data:`ACCELERATOR_WHOLE_BATCH_ELEMENTS` (``widest``: the widest modality's ``d_m``);
    never under ``torch.compile`` (which traces the custom ops).  (CP fusion asks with the
    CPU's rule: its small form is the core's, which keeps the core's own bound.)"""
    # the compile test first: the size tests on a traced call's symbolic batch would guard
    # its graph on them (a recompile per side of each bound, and no dynamic-batch export)
    if torch.compiler.is_compiling():
        return False
    if not on_cpu:
        return batch * rank * max(out_dim, widest) <= ACCELERATOR_WHOLE_BATCH_ELEMENTS
    return batch <= WHOLE_BATCH_ROWS and _core_fusion.whole_batch(batch, rank, out_dim)


def wide_forward(batch: int, rank: int, out_dim: int) -> bool:
    """Whether a forward without autograd on the CPU runs whole-batch beyond
    :func:`whole_batch`'s bounds: at most :data:`FORWARD_WHOLE_BATCH_ROWS` samples, h over
    :data:`FORWARD_WHOLE_BATCH_WIDTH` and B R h at most :data:`FORWARD_WHOLE_BATCH_ELEMENTS`
    (the measurements are theirs); never under ``torch.compile``, which traces the custom op."""
    if torch.compiler.is_compiling():
        return False
    return (
        batch <= FORWARD_WHOLE_BATCH_ROWS
        and out_dim > FORWARD_WHOLE_BATCH_WIDTH
        and batch * rank * out_dim <= FORWARD_WHOLE_BATCH_ELEMENTS
    )


def whole_batch_grads(
    grad: torch.Tensor,
    xs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
    needs: Sequence[bool],
    kept: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor | None]:
    """The analytic backward of low-rank fusion on the whole batch, rank-major, out of place.

    ``needs`` and the result as :func:`lowrank_grads`.  With ``g_r = w_r g``, the features
    ``hat x_m = [x_m, 1]`` (absent samples' zeroed) and the projections ``P_m = hat x_m F_m``
    (R, B, h): ``G_m = g_r * prod_{k != m} P_k`` (prefix and suffix products),
    ``dL/dx_m = (sum_r G_m[r] F_m[r]^T)[:, :d_m]``, ``dL/dF_m[r] = hat x_m^T G_m[r]``,
    ``dL/dw_r = sum_{b,k} g * prod_m P_m[r]``, ``dL/db = sum_b g``.  ``kept``: the forward's
    (features, projections) in the compute dtype; without them (and always while a graph of
    the backward is recorded, where they must be functions of the inputs) they are
    recomputed.  Every operation is differentiable, so the same routine serves double
    backward.
    """
    n_mod = len(xs)
    dtype = grad.dtype
    low = dtype in LOW_PRECISION
    g = cast(grad, torch.float32) if low else grad
    if low:
        xs = [cast(x, torch.float32) for x in xs]
        factors = [cast(f, torch.float32) for f in factors]
    w = None if weights is None else cast(weights, g.dtype)
    if kept is None or torch.is_grad_enabled():
        kept = rank_major_projections(xs, factors, append_one, present)
    hats, projections = kept
    need_x, need_f = needs[:n_mod], needs[n_mod : 2 * n_mod]
    rank = factors[0].shape[0]
    run = g if w is None else g * w.view(rank, 1, 1)  # (R, B, h) by broadcasting
    pre: list[Any] = [None, projections[0]][:n_mod]  # pre[m] = prod_{k<m} P_k
    for m in range(2, n_mod):
        pre.append(pre[m - 1] * projections[m - 1])
    out: list[torch.Tensor | None] = [None] * (2 * n_mod + 2)
    if needs[2 * n_mod]:
        full = projections[0] if n_mod == 1 else pre[-1] * projections[-1]
        out[2 * n_mod] = cast((full * g).sum(dim=(1, 2)), dtype)
    if needs[2 * n_mod + 1]:
        out[2 * n_mod + 1] = cast(g.sum(dim=0), dtype)
    for m in range(n_mod - 1, -1, -1):
        if need_x[m] or need_f[m]:
            gm = run.expand(rank, *g.shape) if m == 0 else run * pre[m]
            if need_x[m]:
                # the factor's feature rows only: dL/dx contiguous (no slice of it, which
                # autograd would copy into the gradient's layout)
                gx = torch.bmm(gm, factors[m][:, : xs[m].shape[1]].transpose(1, 2)).sum(dim=0)
                out[m] = cast(gx if present is None else masked_rows(gx, present, m, _ALL), dtype)
            if need_f[m]:
                hat = hats[m]
                out[n_mod + m] = cast(torch.bmm(hat.t().expand(rank, *hat.shape[::-1]), gm), dtype)
        if m:
            run = run * projections[m]
    return out


_ALL = slice(None)


def rank_major_projections(
    xs: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], append_one: bool, present: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The projections of the core's :func:`~mmfuse._core.fusion.lowrank_whole_batch` with
    fewer operators: the features ``hat x_m`` (the constant appended by one ``pad``, absent
    samples zeroed) and per modality one ``bmm`` of them with F_m, (R, B, h).  Returns
    (features, projections); the backward reuses both."""
    hats = []
    projections = []
    for m, (x, f) in enumerate(zip(xs, factors)):
        if present is not None:
            x = masked_rows(x, present, m, _ALL)
        hat = torch.nn.functional.pad(x, (0, 1), value=1.0) if append_one else x
        hats.append(hat)
        projections.append(torch.bmm(hat.expand(f.shape[0], *hat.shape), f))
    return hats, projections


def _whole_batch_forward(
    append_one: bool, present: Any, weights: Any, bias: Any, xs: list[Any], factors: list[Any]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The rank-major forward of a small low-rank fusion: (y, features, projections)."""
    dtype = xs[0].dtype
    low = dtype in LOW_PRECISION
    if low:  # computed in float32, rounded once at the end
        xs, factors = [cast(x, torch.float32) for x in xs], [cast(f, torch.float32) for f in factors]
    hats, projections = rank_major_projections(xs, factors, append_one, present)
    acc = projections[0]
    for proj in projections[1:]:
        acc = acc * proj
    rank, batch, out_dim = acc.shape
    flat = acc.view(rank, batch * out_dim)
    y = flat.sum(0) if weights is None else torch.mv(flat.t(), cast(weights, acc.dtype))
    y = y.view(batch, out_dim)
    if bias is not None:
        y = y + cast(bias, acc.dtype)
    return (cast(y, dtype) if low else y), hats, projections


class _LowRankWholeBatch(torch.autograd.Function):
    """Low-rank fusion of a small problem: the rank-major forward, its features and
    projections kept, :func:`whole_batch_grads` as the backward.  ``apply(append_one,
    present, weights, bias, *xs, *factors)``."""

    @staticmethod
    def forward(ctx: Any, append_one: bool, present: Any, weights: Any, bias: Any, *arrays: Any) -> Any:
        n_mod = len(arrays) // 2
        y, hats, projections = _whole_batch_forward(
            append_one, present, weights, bias, list(arrays[:n_mod]), list(arrays[n_mod:])
        )
        ctx.append_one, ctx.n_mod = append_one, n_mod
        ctx.has_weights, ctx.has_present = weights is not None, present is not None
        extra = [t for t in (weights, present) if t is not None]
        ctx.save_for_backward(*arrays, *extra, *hats, *projections)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        n_mod = ctx.n_mod
        saved = ctx.saved_tensors
        xs, factors = saved[:n_mod], saved[n_mod : 2 * n_mod]
        rest = saved[2 * n_mod :]
        weights = rest[0] if ctx.has_weights else None
        present = rest[ctx.has_weights] if ctx.has_present else None
        kept = rest[ctx.has_weights + ctx.has_present :]
        need = ctx.needs_input_grad
        needs = [*need[4 : 4 + 2 * n_mod], need[2] and weights is not None, need[3]]
        features, projections = list(kept[:n_mod]), list(kept[n_mod:])
        grads = whole_batch_grads(
            grad, xs, factors, weights, ctx.append_one, present, needs, (features, projections)
        )
        return (None, None, grads[2 * n_mod], grads[2 * n_mod + 1], *grads[: 2 * n_mod])


def plain_fusion(
    xs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    append_one: bool,
    present: Any,
) -> torch.Tensor:
    """Low-rank fusion as plain torch operations recorded by autograd: per modality the projections
    ``P_m[r] = hat x_m F_m[r]`` by one GEMM, their product, and ``y = sum_r w_r P[r] + b``
    by one more (without weights, a sum).  Rank-major, ``P_m`` as (R h, B) against ``F_m``
    as (R h, D) (a copy when h > 1), with the constant's row of ``F_m`` as the GEMM's bias
    past :data:`STAGED_ROWS` samples on the CPU and staged in ``hat x_m`` up to it; with h =
    1 up to it (and on an accelerator), batch-major, ``P_m`` (B, R) and ``y`` by ``addmv``.

    Why not :class:`_LowRankWholeBatch` (with few outputs, see :data:`PLAIN_RANK_OUTPUTS`):
    at h = 1 its rank-major GEMMs are R matrix-vector products, and their batched GEMM took
    about twice a plain GEMM's time on the CI machine (12-16 us against 7 us at B = 32, R 4,
    h = 1: its threads' start-up), and its backward's Python, not the arithmetic, then
    decides the step; here every GEMM is a plain one and autograd's backward runs without
    Python.  Measured (one training step, single thread, CPU time, interleaved rounds; (8,
    16, 64), R 4, h = 1): 0.70-0.78x the rank-major function's time at B = 32 and at B = 1.
    The rules: :func:`plain_form`.
    """
    dtype = xs[0].dtype
    low = dtype in LOW_PRECISION
    rank, _, out_dim = factors[0].shape
    staged_rows = xs[0].shape[0] <= STAGED_ROWS or not xs[0].is_cpu
    batch_major = staged_rows and out_dim == 1
    # F_m as (R h, D): F_m[:, :, 0] a view with h = 1, a copy otherwise (sizes, not -1: R or D
    # may be 0)
    mats = [
        f.squeeze(2) if out_dim == 1 else f.transpose(1, 2).reshape(rank * out_dim, f.shape[1])
        for f in factors
    ]
    acc = projections_product(xs, mats, append_one, present, staged=staged_rows, batch_major=batch_major)
    if not batch_major:
        y = _rank_major_output(acc, weights, bias, rank, out_dim)
    elif weights is None:
        y = acc.sum(dim=1, keepdim=True)
        if bias is not None:
            y = y + cast(bias, acc.dtype)
    else:  # the bias (1,) broadcasts over the batch
        w = cast(weights, acc.dtype)
        if bias is None or acc.numel() == 0:
            # (addmv over an empty batch, or rank 0, returns its (1,) input as is, where y is
            # (B,))
            y = torch.mv(acc, w) if bias is None else torch.mv(acc, w) + cast(bias, acc.dtype)
        else:
            y = torch.addmv(cast(bias, acc.dtype), acc, w)
        y = y.unsqueeze(1)
    return cast(y, dtype) if low else y


def projections_product(
    xs: Sequence[torch.Tensor],
    mats: Sequence[torch.Tensor],
    append_one: bool,
    present: Any,
    *,
    staged: bool,
    batch_major: bool,
) -> torch.Tensor:
    """The product over modalities of the projections ``hat x_m M_m^T`` against ``mats`` (K,
    D each: D = d_m + 1 with ``append_one``, the constant's column last) as plain torch
    operations: rank-major, (K, B), or with ``batch_major`` (B, K) (staged).  ``staged``:
    the constant appended to x_m (``hat x_m``, the form of small batches); else, with
    ``append_one``, M_m's last column is the GEMM's bias.  Absent modalities (``present``)
    enter as zeros; 16-bit inputs are computed in float32 (the caller rounds the result once).
    Low-rank fusion's :func:`plain_fusion` (M_m = F_m as (R h, D)) and CP fusion's
    (``mmfuse.backends.torch.cp``, M_m = A_m^T) share it."""
    low = xs[0].dtype in LOW_PRECISION
    acc = None
    for m, (x, mat) in enumerate(zip(xs, mats)):
        if low:  # computed in float32, rounded once at the end
            x, mat = cast(x, torch.float32), cast(mat, torch.float32)
        if present is not None:
            x = masked_rows(x, present, m, _ALL)
        if batch_major:
            hat = torch.constant_pad_nd(x, (0, 1), 1.0) if append_one else x
            proj = torch.mm(hat, mat.t())  # (B, K)
        elif staged and append_one:
            proj = torch.mm(mat, torch.constant_pad_nd(x, (0, 1), 1.0).t())  # (K, B)
        elif append_one:
            d = x.shape[1]
            proj = torch.addmm(mat[:, d:], mat[:, :d], x.t())
        else:
            proj = torch.mm(mat, x.t())
        acc = proj if acc is None else acc * proj
    assert acc is not None
    return acc


def _rank_major_output(
    acc: torch.Tensor, weights: torch.Tensor | None, bias: torch.Tensor | None, rank: int, out_dim: int
) -> torch.Tensor:
    """``y = sum_r w_r acc[r] + b`` (B, h) from rank-major products ``acc`` (R h, B), by one
    (1, R) x (R, h B) GEMM, so that backward's dL/dacc is again contiguous (the products'
    backward then runs over contiguous rows); with h > 1 the (h, B) result is copied out as
    (B, h), contiguous as the other forms' results."""
    batch = acc.shape[1]
    flat = acc.view(rank, out_dim * batch)  # (R, h B); (sizes, not -1: B may be 0)
    w = None if weights is None else cast(weights, acc.dtype).unsqueeze(0)  # (1, R)
    b = None if bias is None else cast(bias, acc.dtype)
    if out_dim == 1:
        if w is None:
            y = flat.sum(dim=0, keepdim=True)
            y = y if b is None else y + b
        else:  # (the bias (1,) broadcasts over (1, B) as it is)
            y = torch.mm(w, flat) if b is None else torch.addmm(b, w, flat)
        return as_batch_rows(y)
    y = (flat.sum(dim=0) if w is None else torch.mm(w, flat)).view(out_dim, batch)  # (h, B)
    if b is not None:
        y = y + b.unsqueeze(1)
    return as_batch_rows(y)


def as_batch_rows(y: torch.Tensor) -> torch.Tensor:
    """A rank-major form's (h, B) result as (B, h), contiguous as the other forms' results: a
    view with h = 1 (sizes, not -1: B may be 0), a copy otherwise."""
    out_dim, batch = y.shape
    return y.view(batch, 1) if out_dim == 1 else y.t().contiguous()


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.lowrank_fusion`` on torch tensors (inputs checked): problems up to a size
    (:func:`plain_form`) as plain operations under autograd (:func:`plain_fusion`), small
    ones with many outputs as one autograd function over the rank-major form (see above; a
    forward without autograd also at few samples with wide outputs, :func:`wide_forward`),
    others as the blocked ``mmfuse::lowrank_fusion`` custom op (always under
    ``torch.compile``)."""
    rank, _, out_dim = factors[0].shape
    batch, on_cpu = xs[0].shape[0], xs[0].is_cpu  # (is_cpu: a seventh of .device.type's cost)
    records = torch.is_grad_enabled() and any_requires_grad((xs, factors, weights, bias))
    if plain_form(batch, rank, out_dim, on_cpu, present is not None, records):
        return plain_fusion(xs, factors, weights, bias, append_one, present)
    widest = 0 if on_cpu else max(x.shape[1] for x in xs)  # (the CPU's rule ignores it)
    if whole_batch(batch, rank, out_dim, on_cpu, widest) or (
        not records and on_cpu and wide_forward(batch, rank, out_dim)
    ):
        if records:
            return _LowRankWholeBatch.apply(append_one, present, weights, bias, *xs, *factors)
        # nothing to differentiate: the same forward without autograd.Function's apply (a
        # quarter of a tiny call's time), as the eager binding does for the custom ops
        return _whole_batch_forward(append_one, present, weights, bias, list(xs), list(factors))[0]
    return _lowrank_eager(list(xs), list(factors), weights, bias, append_one, present)[0]
