"""``mmfuse::wander_collapsed``: the whole Wander adapter in the released configuration as one
custom op, and the torch implementation of ``wander``.

The Wander adapter as the released code computes it (collapsed mode, GELU) is one op,
``mmfuse::wander_collapsed``: down-projection, GELU, collapsed fusion and residual.  Why
fused: on CPU the layer's step is bound by passes over memory, and as separate autograd
nodes the residual alone costs a full-size gradient accumulation for x_0 (slice backward,
then an out-of-place add), while the GELU's node and the fusion op each keep their own
copy of the activations.

What it saves for backward, and why: besides the inputs (held by the caller anyway), the
pre-activations (B, T_m, r_m), the first contractions (Psi^T H (B, T_out, r_m) or H Phi
(B, T_m, D), whichever order the plan picked) and the terms (B, T_out, D), returned by the
forward as one flat non-differentiable by-product (``kept``).  The pre-activations give the
GELU's derivative and, through the GELU again, H (an elementwise pass, cheaper to redo than
to keep); the contractions and terms spare the backward both GEMMs per modality of the
forward.  At the CMU-MOSI defaults that is 5.0 MiB held from forward to backward, against
13.1 MiB for the released layer under autograd (per-modality products, their permuted
copies, the activations) and 4.7 MiB for the layer built from a torch down-projection and
``mmfuse::sequence_fusion`` (which recomputes its contractions).

Its backward is the opaque ``mmfuse::wander_collapsed_backward`` (:func:`_wander_grads`
for the fusion, then the GELU's derivative, the down-projection's gradients and the
residual added in place).  With ``create_graph=True`` the backward instead re-runs the
Array-API core's wander on the saved inputs under autograd and differentiates it, so double
backward works (at autograd's memory cost, only when asked for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..._core import sequence as _core_sequence
from ..._namespace import in_work_dtype, jit_tracing, mask_tokens, torch_namespace
from .._torch_eager import any_requires_grad, bind, direct
from ._common import (
    LOW_PRECISION,
    autograd_grads,
    cast,
    compute_dtype,
    flat_rows,
)
from .sequence import collapsed_grads, core_terms_fit, sequence_op_eager

__all__ = ['wander', 'wander_torch']

_XP = torch_namespace()  # the namespace the core's helpers take for torch tensors


class _KeptLayout(NamedTuple):
    shapes: list[tuple[int, int]]  # per modality (T_m, r_m)
    orders: tuple[str, ...]  # the plan's contraction order per modality
    layout: list[tuple[int, ...]]  # the kept tensors' shapes, in their flat order
    size: int  # elements of the flat buffer


def _kept_layout(xs: Any, weights: Any, feature_factors: Any, token_factors: Any) -> _KeptLayout:
    """What the fused op keeps, derived from its arguments (forward, fake and backward alike),
    in its flat order: per modality the pre-activation (B T_m, r_m), then per modality the
    first contraction (A = Psi^T H (B, T_out, r_m) token first, F = H Phi (B, T_m, D) feature
    first), then per modality the term (B, T_out, D)."""
    batch = xs[0].shape[0]
    n_out, out_dim = token_factors[0].shape[2], feature_factors[0].shape[2]
    shapes = [(x.shape[1], w.shape[1]) for x, w in zip(xs, weights)]
    sizes = [v for shape in shapes for v in shape] + [n_out, out_dim]
    # the plan is cached on its (hashable) sizes; symbolic ones (shape inference under
    # torch.compile with dynamic shapes) go to the uncached function
    plan = _core_sequence.plan if all(type(v) is int for v in sizes) else _core_sequence.plan.__wrapped__
    orders = plan("collapsed", *zip(*shapes), 1, 1, n_out, out_dim).orders
    pres = [(batch * t, r) for t, r in shapes]
    firsts = [(batch, n_out, r) if o == "token" else (batch, t, out_dim) for (t, r), o in zip(shapes, orders)]
    layout = [*pres, *firsts, *[(batch, n_out, out_dim)] * len(shapes)]
    return _KeptLayout(shapes, orders, layout, sum(math.prod(v) for v in layout))


def _kept_views(kept: torch.Tensor, layout: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    views, at = [], 0
    for shape in layout:
        size = math.prod(shape)
        views.append(kept[at : at + size].view(shape))
        at += size
    return views


_INV_SQRT_2PI = 0.39894228040143267794


def _gelu_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dL/dpre of GELU(pre) = pre Phi(pre): grad (Phi + pre phi).  float64 uses the core's
    accurate normal CDF (:func:`~mmfuse._core.sequence.normal_cdf_torch`, its forward's);
    other dtypes torch's own exact-GELU derivative."""
    if pre.dtype != torch.float64:
        if _core_sequence.aten_gelu_view(pre):  # (as the forward: ATen's kernel, not oneDNN's)
            return torch.ops.aten.gelu_backward(grad.mT, pre.mT).mT
        return torch.ops.aten.gelu_backward(grad, pre)
    cdf = _core_sequence.normal_cdf_torch(torch, pre, False)
    # phi from the split exp(-x^2 / 2) (the forward's): exp of the rounded x * x lost about
    # x^2 / 2 ulps far in the lower tail (256 at x = -30; a review against exact arithmetic)
    pdf = _core_sequence._exp_neg_square(torch, pre.abs().clamp_(max=_core_sequence._GELU_XMAX), 0.5)
    pdf.mul_(_INV_SQRT_2PI)
    return cdf.addcmul_(pre, pdf).mul_(grad)


def _wander_forward(
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    feature_factors: list[torch.Tensor],
    token_factors: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapsed-mode Wander with the GELU; returns (Y, kept) (see the comment above)."""
    dtype = xs[0].dtype
    cdt = compute_dtype(dtype)
    batch, n_mod = xs[0].shape[0], len(xs)
    shapes, orders, layout, size = _kept_layout(xs, weights, feature_factors, token_factors)
    kept = torch.empty(size, dtype=cdt, device=xs[0].device)
    views = _kept_views(kept, layout)
    pres, firsts, terms = views[:n_mod], views[n_mod : 2 * n_mod], views[2 * n_mod :]
    y = None
    for m, x in enumerate(xs):
        x = mask_tokens(_XP, cast(x, cdt), masks[m])  # padded tokens zeroed, as in the core
        torch.addmm(cast(biases[m], cdt), flat_rows(x), cast(weights[m], cdt), out=pres[m])
        h = mask_tokens(_XP, _core_sequence.gelu_torch(pres[m]).view(batch, *shapes[m]), masks[m])
        phi, psi = cast(feature_factors[m], cdt).sum(dim=0), cast(token_factors[m], cdt).sum(dim=0)
        if orders[m] == "token":
            torch.matmul(torch.matmul(psi.t(), h, out=firsts[m]), phi, out=terms[m])
        else:
            torch.matmul(psi.t(), torch.matmul(h, phi, out=firsts[m]), out=terms[m])
        y = terms[m].clone() if y is None else y.mul_(terms[m])
    assert y is not None
    if residual:
        for m, take, at in _core_sequence.residual_spans([t for t, _ in shapes], y.shape[1]):
            y[:, at : at + take].add_(cast(xs[m][:, :take], cdt))
    return cast(y, dtype), kept


_wander_op = torch.library.custom_op("mmfuse::wander_collapsed", _wander_forward, mutates_args=())


@_wander_op.register_fake
def _(
    xs: Any, weights: Any, biases: Any, feature_factors: Any, token_factors: Any, masks: Any, residual: bool
) -> Any:
    n_out, out_dim = token_factors[0].shape[2], feature_factors[0].shape[2]
    kept = xs[0].new_empty((_kept_layout(xs, weights, feature_factors, token_factors).size,),
                           dtype=compute_dtype(xs[0].dtype))  # fmt: skip
    return xs[0].new_empty((xs[0].shape[0], n_out, out_dim)), kept


def _wander_grads_impl(
    grad: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    feature_factors: list[torch.Tensor],
    token_factors: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    residual: bool,
    kept: torch.Tensor,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients [x_0.., w_0.., b_0.., feature_0.., token_0..]; unneeded ones come back empty."""
    n_mod = len(xs)
    dtype = grad.dtype
    cdt = compute_dtype(dtype)
    g = cast(grad, cdt)
    batch = g.shape[0]
    shapes, _, layout, _ = _kept_layout(xs, weights, feature_factors, token_factors)
    views = _kept_views(kept, layout)
    pres, firsts, terms = views[:n_mod], views[n_mod : 2 * n_mod], views[2 * n_mod :]
    need_x, need_w, need_b = needs[:n_mod], needs[n_mod : 2 * n_mod], needs[2 * n_mod : 3 * n_mod]
    need_h = [a or b or c for a, b, c in zip(need_x, need_w, need_b)]
    hs = [_core_sequence.gelu_torch(p).view(batch, *shp) for p, shp in zip(pres, shapes)]
    gx: list[Any] = [None] * n_mod
    gw: list[Any] = [None] * n_mod
    gb: list[Any] = [None] * n_mod

    def down_projection_grads(m: int, blk: slice, gh: torch.Tensor) -> None:
        # right after the fusion's dL/dH_m, while it is in cache (whole batch: one block)
        # reshape, not view: a masked gh takes the mask's strides (torch.where), and a mask
        # built transposed, (T, B).T, is column-major
        gpre = _gelu_backward(gh.reshape(pres[m].shape), pres[m])
        x = cast(xs[m], cdt)
        if need_x[m]:
            gx[m] = (gpre @ cast(weights[m], cdt).t()).view(x.shape)
        if need_w[m]:  # padded tokens zeroed, so a NaN there cannot reach dL/dW as 0 * NaN
            gw[m] = flat_rows(mask_tokens(_XP, x, masks[m])).t() @ gpre
        if need_b[m]:
            gb[m] = gpre.sum(dim=0)

    fused = collapsed_grads(
        g, hs, [cast(f, cdt) for f in feature_factors], [cast(t, cdt) for t in token_factors], masks,
        [*need_h, *needs[3 * n_mod :]], terms=terms, firsts=firsts, on_grad_h=down_projection_grads,
    )  # fmt: skip
    if residual:  # the residual's share of dL/dx, added where the fusion's already lies
        for m, take, at in _core_sequence.residual_spans([t for t, _ in shapes], g.shape[1]):
            if need_x[m]:
                gx[m][:, :take].add_(g[:, at : at + take])
    out = [*gx, *gw, *gb, *fused[n_mod:]]
    return [grad.new_empty((0,)) if v is None else cast(v, dtype).contiguous() for v in out]


_wander_backward_op = torch.library.custom_op(
    "mmfuse::wander_collapsed_backward", _wander_grads_impl, mutates_args=()
)
# eager backward passes run the implementation itself (mmfuse.backends._torch_eager.direct)
_wander_backward_call = direct(torch.ops.mmfuse.wander_collapsed_backward, _wander_grads_impl)


@_wander_backward_op.register_fake
def _(
    grad: Any, xs: Any, weights: Any, feature_factors: Any, token_factors: Any, masks: Any, residual: bool,
    kept: Any, needs: Any,
) -> Any:
    like = [*xs, *weights, *(w[0] for w in weights), *feature_factors, *token_factors]
    return [t.new_empty(t.shape) if need else grad.new_empty((0,)) for t, need in zip(like, needs)]


def _wander_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, weights, biases, feats, toks, masks, residual = inputs
    kept = output[1]
    ctx.mark_non_differentiable(kept)  # an internal by-product, not a result
    ctx.set_materialize_grads(False)
    ctx.n_mod = len(xs)
    ctx.residual = residual
    ctx.mask_at = [k is not None for k in masks]
    # Saved: the inputs (the caller holds them) and kept; see the comment above.
    ctx.save_for_backward(*xs, *weights, *biases, *feats, *toks, *(k for k in masks if k is not None), kept)


def _wander_grads(
    saved: Sequence[torch.Tensor], n_mod: int, residual: bool, mask_at: Sequence[bool],
    need: Sequence[Sequence[bool]], grad: torch.Tensor,
) -> list[list[Any]]:
    """Gradients of ``mmfuse::wander_collapsed`` as [xs, weights, biases, features, tokens]
    lists (None where not needed) from what its autograd saved (the inputs, the present
    masks, kept) and ``need`` (the same five groups of flags)."""
    groups = [list(saved[i * n_mod : (i + 1) * n_mod]) for i in range(5)]
    rest = iter(saved[5 * n_mod :])
    masks = [next(rest) if present else None for present in mask_at]
    kept = next(rest)
    # a graph of the backward wanted, or a backward under vmap (batched gradients), where the
    # opaque backward's buffers have no batching rule: differentiate the core
    if torch.is_grad_enabled() or _core_sequence.torch_transformed(grad):
        params = {"down": list(zip(groups[1], groups[2])), "feature": groups[3], "token": groups[4]}

        def core() -> torch.Tensor:
            return _core_sequence.wander(
                groups[0], params, mode="collapsed", masks=masks if any(mask_at) else None,
                activation="gelu", residual="first" if residual else "none",
            )  # fmt: skip

        flags = [f for group_flags in need for f in group_flags]
        found = autograd_grads(core, [t for group in groups for t in group], flags, grad)
        return [found[i * n_mod : (i + 1) * n_mod] for i in range(5)]
    flat = _wander_backward_call(
        grad.contiguous(), groups[0], groups[1], groups[3], groups[4], masks, residual, kept,
        [f for flags in need for f in flags],
    )  # fmt: skip
    return [[flat[i * n_mod + m] if need[i][m] else None for m in range(n_mod)] for i in range(5)]


def _wander_backward(ctx: Any, grad: torch.Tensor | None, _grad_kept: Any = None) -> tuple[Any, ...]:
    n_mod = ctx.n_mod
    masks_grad = [None] * n_mod if all(ctx.mask_at) else None
    if grad is None:  # the output did not reach the loss
        return (*([None] * n_mod for _ in range(5)), masks_grad, None)
    need = [[bool(v) for v in ctx.needs_input_grad[i]] for i in range(5)]
    grads = _wander_grads(ctx.saved_tensors, n_mod, ctx.residual, ctx.mask_at, need, grad)
    return (*grads, masks_grad, None)


_wander_op.register_autograd(_wander_backward, setup_context=_wander_setup_context)
_wander_eager = bind(
    "_WanderCollapsed",
    torch.ops.mmfuse.wander_collapsed,
    _wander_setup_context,
    _wander_backward,
    _wander_forward,
)


def _activate(h: torch.Tensor, activation: Any) -> torch.Tensor:
    if callable(activation):
        return _core_sequence.apply_activation(activation, h)
    if activation == "gelu":  # the core's torch GELU, without its namespace check (Dynamo)
        return _core_sequence.gelu_torch(h)
    return _core_sequence.ACTIVATIONS[activation](torch, h)


def wander_torch(
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    feature_factors: Sequence[torch.Tensor],
    token_factors: Sequence[torch.Tensor],
    mode: str,
    masks: Sequence[torch.Tensor | None] | None,
    activation: Any,
    residual: str,
) -> torch.Tensor:
    """The Wander adapter on torch tensors, through the custom ops.

    Collapsed mode with the GELU (the released configuration) is the fused
    ``mmfuse::wander_collapsed`` op (absent biases become zeros).  Otherwise: down-projection
    (one GEMM per modality), activation (the core's, so values agree), the
    ``mmfuse::sequence_fusion`` op, residual.  Traceable by Dynamo (used by
    :class:`mmfuse.nn.WanderAdapter` under ``torch.compile``).  Under ``torch.jit.trace``,
    the core's algorithm (:func:`mmfuse._namespace.jit_tracing`: the ops take the masks as a
    list of optional tensors, which the tracer cannot record; a review's find, at B > 128).
    """
    if jit_tracing(torch):  # the tracer cannot record an op taking a list of optional tensors
        down = list(zip(weights, biases))
        params = {"down": down, "feature": list(feature_factors), "token": list(token_factors)}
        return _core_sequence.wander(
            list(xs), params, mode=mode, masks=None if masks is None else list(masks),
            activation=activation, residual=residual,
        )  # fmt: skip
    masks_list = [None] * len(xs) if masks is None else list(masks)
    if xs[0].dtype in LOW_PRECISION and not (mode == "collapsed" and activation == "gelu"):
        # float16 / bfloat16: down-projections and activation in float32 too, rounded once
        # (as the core and the fused op: a pre-activation over 65504 is no overflow)
        return in_work_dtype(
            wander_torch, _XP, xs[0].dtype, list(xs), list(weights), list(biases),
            list(feature_factors), list(token_factors), mode, masks,
            _core_sequence.in_own_dtype(_XP, activation), residual,
        )  # fmt: skip
    if mode == "collapsed" and activation == "gelu":  # the released configuration: one op
        biases = [torch.zeros(w.shape[1], dtype=w.dtype, device=w.device) if b is None else b
                  for w, b in zip(weights, biases)]  # fmt: skip
        args = (list(xs), list(weights), biases, list(feature_factors), list(token_factors))
        return _wander_eager(*args, masks_list, residual == "first")[0]
    hs = []
    for x, w, b, k in zip(xs, weights, biases, masks_list):
        batch, t_m, d = x.shape
        flat = mask_tokens(_XP, x, k).reshape(batch * t_m, d)  # padded tokens zeroed: as the core
        h = flat @ w if b is None else torch.addmm(b, flat, w)
        hs.append(_activate(h.reshape(batch, t_m, w.shape[1]), activation))
    y = sequence_op_eager(hs, list(feature_factors), list(token_factors), mode, masks_list)
    if residual == "first":
        y = y + _core_sequence.first_tokens(torch, list(xs), y.shape[1])
    return y




def _plan_wander(
    xs: Sequence[Any], params: Any, *, mode: str, masks: Sequence[Any] | None, activation: Any, residual: str
) -> Any:
    """What a planned :func:`wander` call with this metadata runs (``mmfuse._plan``): the path
    :func:`wander` takes for small batches, whose conditions are checked once
    (:func:`_stack_conditions`: shapes, dtypes, devices, which masks are present and whether
    autograd records, all in the signature), with the bounds :data:`WHOLE_BATCH_ROWS`,
    :data:`ACCELERATOR_SMALL_ELEMENTS` and :data:`NO_GRAD_STACK_ROWS` read per call, so that
    a changed bound holds for planned calls too.  (A WanderAdapter step at B = 1 spent about
    8 us of its forward choosing the path.)"""
    stackable, any_batch = _stack_conditions(xs, params, mode, masks, activation)

    def planned(
        xs: Sequence[Any], params: Any, *, mode: str = "cp", masks: Any = None, activation: Any = "gelu",
        residual: str = "first",
    ) -> Any:  # fmt: skip
        if _small_batch(xs, params, stackable, mode):
            path = _small_path(stackable, any_batch, xs[0].shape[0])
            return path(xs, params, mode, masks, activation, residual)
        return wander(xs, params, mode=mode, masks=masks, activation=activation, residual=residual)

    return planned


# Without autograd recording, CPU batches of at least this many samples leave the stacked
# adapter for the core: its stacks copy every modality's inputs and parameters, which a
# training step repays with fewer operators in backward, a forward alone only at small
# batches.  Measured (no grad, collapsed mode, CMU-MOSI sizes, float32, 2-core CI box):
# stacked against core 77 against 107 us at B = 1, 157 / 165 at 8, 185 / 189 at 12, 222 / 216
# at 16, 363 / 336 at 32, 914 / 685 at 128.  Not measured on a GPU, where the stacked form's
# fewer launches may matter more than its copies: CUDA tensors keep it.
NO_GRAD_STACK_ROWS = 16


def _stack_conditions(
    xs: Sequence[Any], params: Any, mode: str, masks: Sequence[Any] | None, activation: Any
) -> tuple[bool, bool]:
    """``(stackable, stack_without_grad)`` for a small batch: whether the call may run
    :func:`stacked_adapter` (the released configuration, collapsed with the GELU, on
    modalities of one shape without masks: :func:`_stackable`), and whether it does so at any
    batch (autograd records, or the tensors are not on the CPU) rather than only below
    :data:`NO_GRAD_STACK_ROWS` samples."""
    released = mode == "collapsed" and isinstance(activation, str) and activation == "gelu"
    if not (released and _stackable(xs, params, masks)):
        return False, False
    down = params["down"]
    tensors = [*xs, *(w for w, _ in down), *(b for _, b in down), *params["feature"], *params["token"]]
    recording = torch.is_grad_enabled() and any_requires_grad(tensors)
    return True, recording or not xs[0].is_cpu


def _small_path(stackable: bool, any_batch: bool, batch: int) -> Any:
    """The path of a small batch (:func:`_small_batch`), from :func:`_stack_conditions`'
    answers: :func:`stacked_adapter` where allowed, for any batch or below
    :data:`NO_GRAD_STACK_ROWS` samples; else the Array-API core."""
    return _stacked if stackable and (any_batch or batch < NO_GRAD_STACK_ROWS) else _on_core


def _stacked(xs: Sequence[Any], params: Any, mode: str, masks: Any, activation: Any, residual: str) -> Any:
    return stacked_adapter(xs, params, residual == "first")


def _on_core(xs: Sequence[Any], params: Any, mode: str, masks: Any, activation: Any, residual: str) -> Any:
    return _core_sequence.wander(
        list(xs), params, mode=mode, masks=masks, activation=activation, residual=residual
    )


# Batches up to this many samples run under autograd: measured (WanderAdapter,
# collapsed mode, CMU-MOSI sizes, one training step, 2-core CI box, float32), the core's
# step took 0.65-0.93x the custom ops' time from B = 1 to 128 (1.41 against 2.16 ms at B = 1,
# 6.97 against 7.54 ms at B = 128): the ops' fixed costs (their Python, the dispatcher,
# buffers) outweigh their memory-lean backward there.  At B = 256 the core was still faster
# (0.84x) but held 8.0 MiB for backward against the ops' 5.0 MiB (the released layer: 13.1),
# which would give up issue 5's memory target (at most half the released layer's) at its
# benchmark size; at 512 it was slower (1.06x).  What runs is the core, or, for the released
# configuration on modalities of one shape, :func:`stacked_adapter`.
WHOLE_BATCH_ROWS = 128

# On an accelerator the stacked adapter runs while its largest arrays hold at most this many
# elements (:func:`_stacked_elements`), instead of WHOLE_BATCH_ROWS: there the step's device
# work stays hidden behind the host's launches, so the path launching the fewest operators
# decides it.  Measured on an H200 (benchmarks/gpu.py, RESULTS.md, twenty-fifth session;
# collapsed mode, CMU-MOSI sizes): the released layer's training step took 3.27 ms at B = 32,
# 3.44 at 256 and 3.39 at 4096 (host-bound throughout); the stacked adapter (the released
# form, fewer operators) 2.63 at B = 32, the custom ops 4.41 at B = 256 and 4.11 at 4096.
# The bound takes in B = 4096 there (30.7 M elements); not timed at B = 256 to 4096 on the
# stacked adapter itself (benchmarks/gpu_tune.py's "layers" sweep times it).  The other small
# path, the core under autograd (cp mode, masks, modalities of other shapes), keeps every
# block's terms for backward and stays at WHOLE_BATCH_ROWS on every device.
ACCELERATOR_SMALL_ELEMENTS = 1 << 25


def _stacked_elements(xs: Sequence[torch.Tensor], params: Any) -> int:
    """Elements of the stacked adapter's largest arrays for these modalities (of one shape):
    (M, B, T, k) for k in d, r and D (inputs, activations, the feature contraction) and
    (M, B, T_out, k) for k in T and D (the token contraction's per-sample copy of Psi, the
    terms)."""
    batch, n_tok, d = xs[0].shape
    rank = params["down"][0][0].shape[-1]
    out_dim, n_out = params["feature"][0].shape[-1], params["token"][0].shape[-1]
    return len(xs) * batch * max(n_tok * max(d, rank, out_dim), n_out * max(n_tok, out_dim))


def _small_batch(xs: Sequence[torch.Tensor], params: Any, stackable: bool, mode: str) -> bool:
    """Whether a call takes the small-batch paths: at most :data:`WHOLE_BATCH_ROWS` samples
    whose terms fit the core's bound (:func:`.sequence.core_terms_fit`: cp mode with large
    ranks kept tens of times the ops' memory, as sequence_fusion's did; a diff review), or off
    the CPU, for the stacked adapter (``stackable``: :func:`_stack_conditions`), at most
    :data:`ACCELERATOR_SMALL_ELEMENTS` in its largest arrays (bounds read per call)."""
    batch = xs[0].shape[0]
    if batch <= WHOLE_BATCH_ROWS and core_terms_fit(batch, params["feature"], params["token"], mode):
        return True
    return stackable and not xs[0].is_cpu and _stacked_elements(xs, params) <= ACCELERATOR_SMALL_ELEMENTS


def _stackable(xs: Sequence[Any], params: Any, masks: Sequence[Any] | None) -> bool:
    """Whether the modalities can be stacked (:func:`stacked_adapter`): at least two, no
    masks, and every modality's inputs and parameters of one shape and dtype."""
    if len(xs) < 2 or (masks is not None and any(k is not None for k in masks)):
        return False
    if not _one_shape(xs):  # modalities of other lengths: out before building the lists below
        return False
    down = params["down"]
    groups = ([w for w, _ in down], [b for _, b in down], params["feature"], params["token"])
    return all(_one_shape(group) for group in groups)


def _one_shape(arrays: Sequence[Any]) -> bool:
    """Whether the arrays (or Nones) all have the first one's shape and dtype (all None)."""
    first = arrays[0]
    for t in arrays[1:]:
        if first is None or t is None:
            if first is not t:
                return False
        elif t.shape != first.shape or t.dtype != first.dtype:
            return False
    return True


def _token_contraction(psi_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Psi_m^T A_m for psi_t (M, T_out, T) and a contiguous a (M, B, T, k): (M, B, T_out, k).

    One sample: a bmm on a's (M, T, k) view.  More: the broadcast matmul, which copies psi_t
    per sample and sums its gradient back over them; at B = 1 that machinery is a third of
    the pair's forward and backward (55 against 38 us here).
    """
    n_mod, batch, t_m, k = a.shape
    if batch == 1:
        return torch.bmm(psi_t, a.view(n_mod, t_m, k)).unsqueeze(1)
    return torch.matmul(psi_t.unsqueeze(1), a)


def stacked_adapter(xs: Sequence[torch.Tensor], params: Any, residual: bool) -> torch.Tensor:
    """Collapsed-mode Wander with the GELU on M modalities of one shape, as plain operations
    over the modalities stacked along a leading axis, recorded by autograd.

    H = GELU(X W + b) (M, B, T, r) is one GEMM per modality, stacked, and one GELU; Phi
    (M, r, D) and Psi (M, T, T_out) are the rank sums of the stacked factors; the terms
    Psi_m^T H_m Phi_m (M, B, T_out, D) are two batched GEMMs (in the plan's order, which is
    one for all modalities); Y is the product over the leading axis, plus the residual.  The
    same maths as the core's :func:`~mmfuse._core.sequence.wander` with, past the
    down-projections, one operator where the core has one per modality: a WanderAdapter
    training step at the CMU-MOSI sizes dispatches 106-107 operators at the top level
    (243-256 in all, B = 1 and 32) against the core's 154 (462; the released layer: 147,
    415).  (Stacking the inputs
    and parameters for one ``baddbmm`` would save a few more, at the price of a copy of the
    inputs held for backward: 2.0 MiB at B = 32, against 1.3 MiB here, the core's 1.0 and
    the released layer's 1.6.)

    Measured (WanderAdapter training steps at the CMU-MOSI sizes, single thread, CPU time,
    interleaved rounds, medians and 10th percentiles): 0.76x the core's time at B = 1,
    0.8-0.9x at B = 32.
    """
    dtype = xs[0].dtype
    cdt = compute_dtype(dtype)
    down = params["down"]
    n_mod = len(xs)
    batch, t_m, d = xs[0].shape
    # the pre-activations per modality, then stacked: as many operators as stacking the
    # inputs and parameters for one baddbmm, without a copy of the inputs held for backward
    # (reshape: a view of contiguous inputs, a copy of strided ones)
    pre = torch.stack([
        torch.mm(cast(x, cdt).reshape(batch * t_m, d), cast(w, cdt)) if b is None
        else torch.addmm(cast(b, cdt), cast(x, cdt).reshape(batch * t_m, d), cast(w, cdt))
        for x, (w, b) in zip(xs, down)
    ])  # fmt: skip
    # (M, B, T, r); r named, not -1: an empty batch leaves -1 undetermined
    h = _core_sequence.gelu_torch(pre).view(n_mod, batch, t_m, pre.shape[-1])
    phi = cast(torch.stack(list(params["feature"])), cdt).sum(dim=1)  # (M, r, D)
    psi_t = cast(torch.stack(list(params["token"])), cdt).sum(dim=1).transpose(1, 2)  # (M, T_out, T)
    rank, (n_out, out_dim) = h.shape[3], (psi_t.shape[1], phi.shape[2])
    order = _core_sequence.plan("collapsed", (t_m,), (rank,), 1, 1, n_out, out_dim).orders[0]
    if order == "token":  # A = Psi^T H (M, B, T_out, r), then A Phi
        first = _token_contraction(psi_t, h).view(n_mod, batch * n_out, rank)
        terms = torch.bmm(first, phi).view(n_mod, batch, n_out, out_dim)
    else:  # F = H Phi (M, B, T, D), then Psi^T F
        first = torch.bmm(h.view(n_mod, batch * t_m, rank), phi).view(n_mod, batch, t_m, out_dim)
        terms = _token_contraction(psi_t, first)
    # unbind, not terms[m]: its backward stacks the M gradients in one operator, where each
    # select's backward zero-fills a tensor of all M terms and copies one in (M of each, and
    # the sums: 19 of a B = 1 step's 262 aten operators)
    parts = terms.unbind(0)
    y = parts[0]
    for m in range(1, n_mod):
        y = y * parts[m]
    if residual:
        y = y + cast(_core_sequence.first_tokens(torch, list(xs), n_out), cdt)
    return cast(y, dtype)


def wander(
    xs: Sequence[Any],
    params: Any,
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
    activation: Any = "gelu",
    residual: str = "first",
) -> Any:
    """``mmfuse.wander`` on torch tensors (inputs checked): small batches (:func:`_small_batch`:
    at most :data:`WHOLE_BATCH_ROWS` samples; off the CPU, for the stacked adapter, up to an
    element bound) run under autograd (:func:`_small_path`: the released
    configuration on modalities of one shape as :func:`stacked_adapter`, without autograd on
    the CPU only below :data:`NO_GRAD_STACK_ROWS` samples; others the Array-API core); larger
    ones (and every call under ``torch.compile``) the custom ops
    (:func:`wander_torch`)."""
    # (the compile test first: a size test on a traced call's symbolic batch guards its graph)
    if not torch.compiler.is_compiling():
        stackable, any_batch = _stack_conditions(xs, params, mode, masks, activation)
        if _small_batch(xs, params, stackable, mode):
            path = _small_path(stackable, any_batch, xs[0].shape[0])
            return path(xs, params, mode, masks, activation, residual)
    down = list(params["down"])
    return wander_torch(
        list(xs), [w for w, _ in down], [b for _, b in down], list(params["feature"]),
        list(params["token"]), mode, masks, activation, residual,
    )  # fmt: skip


wander.plan = _plan_wander  # type: ignore[attr-defined]  # (mmfuse._plan.planned_impl)
