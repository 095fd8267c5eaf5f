"""``mmfuse::cp_fusion``: CP fusion in TensorLy's layout as a custom op; its backward is plain
differentiable torch code (the projections are only (B, R)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..._core import fusion as _core_fusion
from .._torch_eager import any_requires_grad, bind
from ._common import (
    LOW_PRECISION,
    affine,
    cast,
    column_sums,
    compute_dtype,
    gram,
    load_fusion_inputs,
    masked_rows,
    project_into,
    save_fusion_inputs,
)
from .lowrank import STAGED_ROWS, as_batch_rows, projections_product, whole_batch

__all__ = ['cp_fusion', 'plain_cp_fusion', 'plain_form']


def _cp_parts(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    append_one: bool,
    present: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    feats = [masked_rows(x, present, m, slice(None)) for m, x in enumerate(xs)]
    proj = [affine(f, a, append_one) for f, a in zip(feats, factors[:-1])]
    return feats, proj


def _cp_forward(
    xs: list[torch.Tensor],
    weights: torch.Tensor | None,
    factors: list[torch.Tensor],
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> torch.Tensor:
    dtype = xs[0].dtype
    cdt = compute_dtype(dtype)
    xs = [cast(x, cdt) for x in xs]
    factors = [cast(f, cdt) for f in factors]
    # the projections into buffers (project_into: [x, 1] A, the constant row addmm's bias,
    # or for long narrow ones on the CPU added over a folded view after the GEMM)
    batch, rank = xs[0].shape[0], factors[-1].shape[1]
    prod = torch.empty((batch, rank), dtype=cdt, device=xs[0].device)
    proj = torch.empty_like(prod) if len(xs) > 1 else prod
    for m, (x, a) in enumerate(zip(xs, factors[:-1])):
        project_into(prod if m == 0 else proj, masked_rows(x, present, m, slice(None)), a, append_one)
        if m:
            prod.mul_(proj)
    if weights is not None:
        prod.mul_(cast(weights, cdt))
    out = prod @ factors[-1].t()
    if bias is not None:
        out.add_(cast(bias, cdt))
    return cast(out, dtype)


_cp_op = torch.library.custom_op("mmfuse::cp_fusion", _cp_forward, mutates_args=())


@_cp_op.register_fake
def _(xs: Any, weights: Any, factors: Any, bias: Any, append_one: bool, present: Any) -> Any:
    return xs[0].new_empty((xs[0].shape[0], factors[-1].shape[0]))


def _cp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, weights, factors, _bias, append_one, present = inputs
    # The (B, R) projections are recomputed in backward (one small GEMM per modality).
    save_fusion_inputs(ctx, xs, factors, weights, present, append_one)


def _cp_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """h = C (w * prod_m P_m) + b with P_m = hat x_m A_m; plain differentiable torch code."""
    n_mod = ctx.n_mod
    xs, factors, weights, present, _ = load_fusion_inputs(ctx, n_mod + 1)
    need_xs, need_w, need_fs, need_b = ctx.needs_input_grad[:4]
    dtype = grad.dtype
    cdt = compute_dtype(dtype)
    g = cast(grad, cdt)
    xs = [cast(x, cdt) for x in xs]
    factors = [cast(f, cdt) for f in factors]
    w = cast(weights, cdt) if weights is not None else None
    feats, proj = _cp_parts(xs, w, factors, append_one=ctx.append_one, present=present)
    out_factor = factors[-1]
    # run = dL/d(prod_m P_m) = (g C) * w, as g (C * w): the weights scale the small (h, R)
    # factor instead of a (B, R) matrix (a broadcast over a narrow row: about 450 us at
    # (65536, 16), twice per step)
    run = g @ (out_factor if w is None else out_factor * w)
    prefix: list[torch.Tensor | None] = [None]
    for m in range(1, n_mod):
        prev = prefix[m - 1]
        prefix.append(proj[m - 1] if prev is None else prev * proj[m - 1])
    last = prefix[n_mod - 1]
    full = proj[n_mod - 1] if last is None else last * proj[n_mod - 1]
    grad_w = grad_c = None
    if need_fs[-1] or (need_w and w is not None):
        # G = g^T full (h, R), reduced over the batch once (gram, the narrower operand
        # first); then dL/dC = G * w and dL/dw_r = sum_k C_kr G_kr, both on (h, R)
        gram_c = gram(g, full) if g.shape[1] <= full.shape[1] else gram(full, g).t()
        if need_fs[-1]:
            grad_c = (gram_c if w is None else gram_c * w).contiguous()
        if need_w and w is not None:
            grad_w = (out_factor * gram_c).sum(dim=0)
    grad_xs: list[torch.Tensor | None] = [None] * n_mod
    grad_as: list[torch.Tensor | None] = [None] * n_mod
    for m in range(n_mod - 1, -1, -1):
        pm = prefix[m]
        gm = run if pm is None else run * pm
        a = factors[m]
        d = feats[m].shape[1]
        if need_xs[m]:
            gx = gm @ a[:d].t()
            if present is not None:
                gx = torch.where(present[:, m : m + 1], gx, torch.zeros((), dtype=cdt, device=gx.device))
            grad_xs[m] = cast(gx, dtype)
        if need_fs[m]:
            ga = gram(gm, feats[m]).t()  # x_m^T G_m, reduced over the batch
            # (contiguous, as the factor: a caller of autograd.grad may view it)
            ga = torch.cat([ga, column_sums(gm).unsqueeze(0)], dim=0) if ctx.append_one else ga.contiguous()
            grad_as[m] = cast(ga, dtype)
        if m:
            run = run * proj[m]
    return (
        grad_xs,
        cast(grad_w, dtype) if grad_w is not None else None,
        [*grad_as, cast(grad_c, dtype) if grad_c is not None else None],
        # (in the compute dtype, rounded once: 16-bit partial sums rounded, and overflowed at
        # loss-scaling sizes, as the low-rank op's do not; a review of the fusion ops)
        cast(column_sums(g), dtype) if need_b else None,
        None,
        None,
    )


_cp_op.register_autograd(_cp_backward, setup_context=_cp_setup_context)
_cp_eager = bind("_CPFusion", torch.ops.mmfuse.cp_fusion, _cp_setup_context, _cp_backward, _cp_forward)



# Whether large eager CPU fusions may run as the core under autograd (_autograd_on_cpu);
# tests of the custom op on the CPU turn it off (tests/conftest.py, blocked_paths).
AUTOGRAD_ON_CPU = True


def _autograd_on_cpu(xs: Sequence[Any], rank: int, arrays: Sequence[Any]) -> bool:
    """Whether a CP fusion too large for :func:`.lowrank.whole_batch` still runs as the core
    under autograd: eagerly on the CPU, while autograd records (grad mode, and a tensor among
    ``arrays`` requiring grad: without, the op's forward into its own buffers is faster and
    leaner, 1.1-1.6x at B = 65536 and 2**20, found by review), where autograd's saved
    projections (M R numbers per sample) are no more than the inputs the custom op saves
    (sum d_m).  Measured on the
    2-core CI machine (``benchmarks/torch_cpu.py``, RESULTS.md's twenty-second session), in
    speed-up over a plain torch CP layer: the core 1.03x and 1.11x at B = 65536, (8, 16, 64),
    h 1, R 4 and 16, 1.13-1.19x at (32, 32, 128), h 128, R 16 and 64 (B 1024-4096), where the
    custom op, which recomputes its projections in backward, took 0.75-1.04x; peak memory
    the same or lower.  Not on other devices (not measured there: the custom op)."""
    # the compile test first: a size test on a traced call's symbolic shapes guards its graph
    return (
        AUTOGRAD_ON_CPU
        and not torch.compiler.is_compiling()
        and xs[0].device.type == "cpu"
        and torch.is_grad_enabled()
        and any_requires_grad(arrays)
        and len(xs) * rank <= sum(x.shape[1] for x in xs)
    )


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.cp_fusion`` on torch tensors (inputs checked): small problems
    (:func:`.lowrank.whole_batch`, the low-rank rule) and large eager CPU ones whose
    projections are no larger than their inputs (:func:`_autograd_on_cpu`) as the core's few
    operations under autograd (the custom op's fixed costs dominate small calls: 2-5x slower
    at B = 4, benchmarks/overhead.py), of those the narrow ones of 8192 to 24576 samples with
    few outputs in the plain rank-major form (:func:`plain_form`, :func:`plain_cp_fusion`),
    others as the
    ``mmfuse::cp_fusion`` custom op (always under ``torch.compile``)."""
    weights, factors = cp
    out_dim, rank = factors[-1].shape
    batch = xs[0].shape[0]
    on_core = whole_batch(batch, rank, out_dim)
    if not on_core and _autograd_on_cpu(xs, rank, (xs, factors, weights, bias)):
        if plain_form(batch, out_dim, sum(x.shape[1] for x in xs)):
            return plain_cp_fusion(xs, weights, factors, bias, append_one, present)
        on_core = True
    if on_core:
        cp = (weights, list(factors))
        return _core_fusion.cp_fusion(list(xs), cp, bias, append_one=append_one, present=present)
    return _cp_eager(list(xs), weights, list(factors), bias, append_one, present)


# Where the core ran under autograd (_autograd_on_cpu), the plain rank-major form takes calls
# of PLAIN_ROWS to PLAIN_MAX_ROWS samples with at most PLAIN_OUTPUTS outputs on inputs at most
# PLAIN_WIDTH wide in all (sum d_m): narrow projections, whose batch-major GEMMs of R columns
# are the CPU's slow case.  Measured (one CPFusion training step, float32, interleaved rounds
# on the 2-core CI machine; benchmarks/RESULTS.md, thirty-third session), the core's time over
# the plain form's: (8, 16, 64) with h 1, R 4: 0.75-0.93 at B = 512-2048, 1.04 at 4096,
# 1.05-1.24 from 8192 to 262144; h 1, R 16 and h 4, R 4 or 16: 1.09-1.21 (B 16384-65536); but
# h 8 and 16 1.01 and 0.98, and wider inputs 0.92-1.02 ((32, 32, 128) h 1 and 4, (256, 256,
# 256) h 1).
# And at most PLAIN_MAX_ROWS samples: on another 2-core VM (the fifty-first session, torch on
# one and two threads) the form lost to the core from B = 65536: at (8, 16, 64), h 1, R 4 the
# core / plain form time 0.81-0.92 (one pair of runs 1.01), the form 0.85-1.01x the plain CP
# layer's speed and the core 1.00-1.10x; at R 16 the form 0.79x, the core 1.05x.  The first VM
# had measured the form 1.13-1.20x the plain layer's speed at B = 65536-262144 and the core
# 0.97-1.14x.  At B = 32768 on two threads the form ran 0.84-1.27x over five runs (seven
# samples) and the core 0.96-1.10x.  Beyond the bound the core, whose worst on either VM
# (0.96) is above the form's (0.79); up to it the form ran 1.00-1.42x the plain layer's speed
# there (B = 8192-24576; the core 0.94-1.12x).  (The custom op, 1.35-1.71x the plain layer
# there from B = 65536 at R 4, had run 1.01x and 0.96x at R 4 and 16 on the twenty-second
# session's VM, the core 1.03x and 1.11x: not taken.)
PLAIN_ROWS = 8192
PLAIN_MAX_ROWS = 24576
PLAIN_OUTPUTS = 4
PLAIN_WIDTH = 128


def plain_form(batch: int, out_dim: int, width: int) -> bool:
    """Whether a CP fusion that runs as plain operations under autograd on the CPU
    (:func:`_autograd_on_cpu`) takes the rank-major form (:func:`plain_cp_fusion`) rather than
    the core's batch-major one: ``batch`` samples, ``out_dim`` outputs, inputs ``width`` wide
    in all (see the constants above)."""
    return PLAIN_ROWS <= batch <= PLAIN_MAX_ROWS and out_dim <= PLAIN_OUTPUTS and width <= PLAIN_WIDTH


def plain_cp_fusion(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    append_one: bool,
    present: Any,
) -> torch.Tensor:
    """CP fusion as plain torch operations recorded by autograd, rank-major: per modality the
    projections ``A_m^T hat x_m`` (R, B) by one GEMM (:func:`.lowrank.projections_product`,
    the low-rank plain form's; the constant staged in ``hat x_m`` up to
    :data:`.lowrank.STAGED_ROWS` samples, else ``A_m``'s constant row as the GEMM's bias),
    their product, and ``y^T = (C diag(w)) P + b`` (h, B) by one more, copied out as (B, h)
    where h > 1.

    Why rank-major: at the few ranks of the usual configurations the batch-major projections
    (B, R) of narrow inputs are GEMMs with R columns and a short inner dimension, the CPU's
    slow case, and with their backward they were most of the step, as for low-rank fusion.
    Where it runs: :func:`plain_form`.  16-bit inputs are computed in float32 and rounded
    once."""
    dtype = xs[0].dtype
    mats = [a.t() for a in factors[:-1]]  # A_m^T (R, D), views
    staged = xs[0].shape[0] <= STAGED_ROWS
    prod = projections_product(xs, mats, append_one, present, staged=staged, batch_major=False)  # (R, B)
    out = cast(factors[-1], prod.dtype)  # C diag(w), (h, R), in the products' float32 for 16 bits
    if weights is not None:
        out = out * cast(weights, prod.dtype)
    # (h, B), then (B, h); the bias as a column, broadcast over the batch
    b = None if bias is None else cast(bias, prod.dtype).unsqueeze(1)
    y = as_batch_rows(torch.mm(out, prod) if b is None else torch.addmm(b, out, prod))
    return cast(y, dtype) if dtype in LOW_PRECISION else y
