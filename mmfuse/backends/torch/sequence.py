"""``mmfuse::sequence_fusion``: Wander's token-level fusion (both modes) as a custom op with a
blocked analytic backward.

What the backward of ``sequence_fusion`` saves, and why
--------------------------------------------------------
In cp mode each modality's term Psi_m[j]^T H_m Phi_m[i] is a (B, R_t, R_h, T_out, D) array:
R_t R_h times the output (96x at the CMU-MOSI defaults, 63 MB per modality at B = 256 in
float32).  Autograd through the Array-API core keeps all M of them (and the first
contractions) alive from forward to backward.  Here ``setup_context`` saves only the
*inputs* (hs, the factors, the masks), which the caller holds anyway.  The backward walks the
same (batch block, token-rank chunk) schedule as the core's forward
(:func:`mmfuse._core.sequence.cp_blocking`), recomputes each block's terms (the forward's
cost once more) and forms dL/dterm_m = G * prod_{k != m} term_k with prefix and suffix
products (no division, so zeros are harmless); peak extra memory is a few cache-sized blocks
plus the gradients themselves, independent of B.  Collapsed mode is the same computation on
the rank-summed factors with R_h = R_t = 1; its terms are only (B, T_out, D), but
recomputing them costs two small GEMMs per modality, so it too saves only the inputs; its
backward is a routine of its own (:func:`collapsed_grads`, one GEMM per product), and each
mode has one backward, used with and without a graph of the backward.

The backward formulas are written with out-of-place torch operations.  Without a graph of
the backward (the usual case) they run inside the opaque ``mmfuse::sequence_fusion_backward``
op; with ``create_graph=True`` (double backward) the same Python function runs directly, so
autograd differentiates it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..._core import sequence as _core_sequence
from ..._namespace import block_budget, block_slices, jit_tracing, mask_tokens, torch_namespace
from .._torch_eager import bind, direct
from ._common import (
    autograd_grads,
    cast,
    compute_dtype,
    flat_rows,
    store,
)

__all__ = ['collapsed_grads', 'core_terms_fit', 'sequence_fusion', 'sequence_op_eager']

_XP = torch_namespace()  # the namespace the core's helpers take for torch tensors


def _seq_matrices(feature: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, R_h D) feature matrix and (R_t T_out, T) token matrix of cp mode."""
    r_h, r_m, d = feature.shape
    r_t, t_m, t_out = token.shape
    return feature.permute(1, 0, 2).reshape(r_m, r_h * d), token.permute(0, 2, 1).reshape(r_t * t_out, t_m)


def _seq_plan(
    hs: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], toks: Sequence[torch.Tensor], mode: str
) -> Any:
    r_h, _, out_dim = feats[0].shape
    r_t, _, n_out = toks[0].shape
    lengths = tuple(int(h.shape[1]) for h in hs)
    ranks = tuple(int(h.shape[2]) for h in hs)
    return _core_sequence.plan(mode, lengths, ranks, int(r_h), int(r_t), int(n_out), int(out_dim))


def _sequence_grads(
    grad: torch.Tensor,
    hs: Sequence[torch.Tensor],
    feats: Sequence[torch.Tensor],
    toks: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    """Gradients of cp-mode sequence fusion, blocked; ``needs`` = [h_0.., feature_0.., token_0..].

    With a graph of the backward wanted (double backward, or under a transform) out-of-place
    torch operations only, so autograd can differentiate it; otherwise dL/dH is written block
    by block into one buffer.  Returns the gradients in that order, None where not needed.
    (Collapsed mode has its own routine, :func:`collapsed_grads`.)
    """
    n_mod = len(hs)
    r_h, _, out_dim = feats[0].shape
    r_t, _, n_out = toks[0].shape
    rh, rt = int(r_h), int(r_t)
    orders = _seq_plan(hs, feats, toks, "cp").orders
    need_h = list(needs[:n_mod])
    need_f = list(needs[n_mod : 2 * n_mod])
    need_t = list(needs[2 * n_mod :])
    if not any(needs):
        return [None] * (3 * n_mod)
    mats = [_seq_matrices(f, t) for f, t in zip(feats, toks)]
    batch = grad.shape[0]
    rows_b, chunk_j = _core_sequence.cp_blocking(
        int(batch), rt, int(n_out), rh, int(out_dim), grad.element_size(),
        block_budget(grad, _core_sequence.CP_BLOCK_BYTES),
    )
    # The inputs masked and dL/dH written block by block: masking them whole first, and
    # joining the blocks' dL/dH at the end, had held up to three input-sized copies, so the
    # peak grew with B (a review's find).  With a graph of the backward wanted (double
    # backward, or under a transform) the blocks' dL/dH are joined out of place instead.
    graph = torch.is_grad_enabled() or _core_sequence.torch_transformed(grad)
    gh_parts: list[list[torch.Tensor]] = [[] for _ in range(n_mod)]
    gh_out: list[torch.Tensor | None] = [None] * n_mod

    def keep_grad_h(m: int, blk: slice, part: torch.Tensor) -> None:
        mask = masks[m]
        part = mask_tokens(_XP, part, None if mask is None else mask[blk])
        if graph:
            gh_parts[m].append(part)
            return
        buffer = gh_out[m]
        if buffer is None:
            buffer = gh_out[m] = part.new_empty((batch, *part.shape[1:]))
        buffer[blk] = part
    gphi: list[torch.Tensor | None] = [None] * n_mod
    gpsi: list[torch.Tensor | None] = [None] * n_mod
    gpsi_rows: list[dict[int, torch.Tensor]] = [{} for _ in range(n_mod)]  # feature first

    def add(acc: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        return v if acc is None else acc + v

    for blk in block_slices(batch, rows_b):
        hb = [mask_tokens(_XP, h[blk], None if k is None else k[blk]) for h, k in zip(hs, masks)]
        nb = hb[0].shape[0]
        # token first: Psi^T H (b, R_t T_out, r); feature first: H Phi (b, T, R_h D)
        firsts = [
            psi_t @ h if order == "token" else h @ phi for h, (phi, psi_t), order in zip(hb, mats, orders)
        ]
        gfirst_chunks: list[list[torch.Tensor]] = [[] for _ in range(n_mod)]  # token first
        gfirst_sum: list[torch.Tensor | None] = [None] * n_mod  # feature first
        gb = grad[blk]
        for j0 in range(0, rt, chunk_j):
            jn = min(j0 + chunk_j, rt) - j0
            rows = slice(j0 * n_out, (j0 + jn) * n_out)
            terms = [
                first[:, rows, :] @ phi if order == "token" else psi_t[rows, :] @ first
                for first, (phi, psi_t), order in zip(firsts, mats, orders)
            ]  # each (b, jn T_out, R_h D)
            # dL/dY broadcast over the token ranks j and feature ranks i of the block
            run = gb[:, None, :, None, :].expand(nb, jn, n_out, rh, out_dim)
            run = run.reshape(nb, jn * n_out, rh * out_dim)
            prefix: list[torch.Tensor | None] = [None]
            for m in range(1, n_mod):
                prev = prefix[m - 1]
                prefix.append(terms[m - 1] if prev is None else prev * terms[m - 1])
            for m in range(n_mod - 1, -1, -1):
                if need_h[m] or need_f[m] or need_t[m]:
                    pm = prefix[m]
                    gterm = run if pm is None else run * pm
                    phi, psi_t = mats[m]
                    if orders[m] == "token":
                        first = firsts[m][:, rows, :]
                        if need_f[m]:
                            flat = flat_rows(first)
                            gphi[m] = add(gphi[m], flat.t() @ flat_rows(gterm))
                        if need_h[m] or need_t[m]:
                            gfirst_chunks[m].append(gterm @ phi.t())
                    else:
                        if need_t[m]:  # this chunk's rows of Psi^T, summed over blocks
                            g_rows = torch.einsum("bpq,btq->pt", gterm, firsts[m])
                            gpsi_rows[m][j0] = add(gpsi_rows[m].get(j0), g_rows)
                        if need_h[m] or need_f[m]:
                            gfirst_sum[m] = add(gfirst_sum[m], psi_t[rows, :].t() @ gterm)
                if m:
                    run = run * terms[m]
        for m in range(n_mod):
            phi, psi_t = mats[m]
            if orders[m] == "token":
                if not gfirst_chunks[m]:
                    continue
                ga = gfirst_chunks[m][0] if len(gfirst_chunks[m]) == 1 else torch.cat(gfirst_chunks[m], dim=1)
                if need_h[m]:
                    keep_grad_h(m, blk, psi_t.t() @ ga)
                if need_t[m]:
                    gpsi[m] = add(gpsi[m], torch.einsum("bpr,btr->pt", ga, hb[m]))
            else:
                gf = gfirst_sum[m]
                if gf is None:
                    continue
                if need_h[m]:
                    keep_grad_h(m, blk, gf @ phi.t())
                if need_f[m]:
                    flat_h = flat_rows(hb[m])
                    gphi[m] = add(gphi[m], flat_h.t() @ flat_rows(gf))

    for m in range(n_mod):
        if gpsi_rows[m]:
            parts = [gpsi_rows[m][j] for j in sorted(gpsi_rows[m])]
            gpsi[m] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    out: list[torch.Tensor | None] = []
    for m in range(n_mod):
        if not need_h[m]:
            out.append(None)
        elif not graph:
            out.append(gh_out[m] if gh_out[m] is not None else torch.zeros_like(hs[m]))  # (no block: B = 0)
        else:
            parts = gh_parts[m] or [torch.zeros_like(hs[m])]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
    for m, f in enumerate(feats):
        g = gphi[m]
        if not need_f[m] or g is None:
            out.append(None if not need_f[m] else torch.zeros_like(f))
        else:
            out.append(g.reshape(f.shape[1], f.shape[0], f.shape[2]).permute(1, 0, 2).contiguous())
    for m, t in enumerate(toks):
        g = gpsi[m]
        if not need_t[m] or g is None:
            out.append(None if not need_t[m] else torch.zeros_like(t))
        else:
            out.append(g.reshape(t.shape[0], t.shape[2], t.shape[1]).permute(0, 2, 1).contiguous())
    return out


def collapsed_grads(
    grad: torch.Tensor,
    hs: Sequence[torch.Tensor],
    feats: Sequence[torch.Tensor],
    toks: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    terms: Sequence[torch.Tensor] | None = None,
    firsts: Sequence[torch.Tensor] | None = None,
    on_grad_h: Callable[[int, slice, torch.Tensor], None] | None = None,
) -> list[torch.Tensor | None]:
    """The gradients of collapsed-mode sequence fusion, in the order of
    :func:`_sequence_grads` (cp mode's routine).  Without a graph of the backward it runs
    blocked into buffers (the opaque backward op); with one (double backward) the same
    formulas run out of place on the whole batch.  ``terms`` and ``firsts``: the
    forward's terms and first contractions when it kept them (the fused Wander op; the whole
    batch is then one block), else they are recomputed.  ``on_grad_h(m, block, dL/dH_m[block])``,
    when given, receives each block's (masked) dL/dH_m as soon as it is formed, in place of
    returning it (the fused op continues through the GELU and the down-projection there).

    With Phi_m = sum_i feature_m[i] (r_m, D) and Psi_m = sum_j token_m[j] (T_m, T_out),
    term_m[b] = Psi_m^T H_m[b] Phi_m and Y = prod_m term_m.  Per batch block, the terms are
    recomputed in the forward's order (the plan's; A = Psi^T H, term = A Phi when token
    first; F = H Phi, term = Psi^T F when feature first), G_m = dY * prod_{k != m} term_k comes
    from prefix and suffix products, and then

    - token first:   dA = G Phi^T, dH = Psi dA, dPhi = sum_b A^T G, dPsi = sum_b H dA^T;
    - feature first: dF = Psi G,   dH = dF Phi^T, dPhi = sum_b H^T dF, dPsi = sum_b F G^T.

    Unlike the general routine (built for cp mode's token-rank chunks), every product here is
    one GEMM or one batched GEMM over the block, the transposed contractions are batched
    GEMMs on strided views (no transposing copies), and the running products are updated in
    place.  On the CMU-MOSI Wander shapes it ran about 15% faster than the general routine
    (median 5.3 against 6.3 ms, interleaved calls on the 2-core CI machine).
    """
    n_mod = len(hs)
    orders = _seq_plan(hs, feats, toks, "collapsed").orders
    need_h = list(needs[:n_mod])
    need_f = list(needs[n_mod : 2 * n_mod])
    need_t = list(needs[2 * n_mod :])
    # With a graph of the backward wanted (double backward) the same formulas run out of place
    # on the whole batch, so autograd can differentiate them; otherwise blocked, into buffers.
    graph = torch.is_grad_enabled() or _core_sequence.torch_transformed(grad)  # (or under vmap)
    # the inputs masked block by block, and dL/dH masked in its buffer (as cp mode's routine:
    # masked whole they were held twice more)
    phis = [f.sum(dim=0) for f in feats]  # (r_m, D)
    psis = [t.sum(dim=0) for t in toks]  # (T_m, T_out)
    batch, n_out, out_dim = grad.shape
    rows_b = batch if graph or terms is not None or firsts is not None else _core_sequence.cp_blocking(
        int(batch), 1, int(n_out), 1, int(out_dim), grad.element_size(),
        block_budget(grad, _core_sequence.CP_BLOCK_BYTES),
    )[0]  # fmt: skip
    keep_gh = [need and on_grad_h is None for need in need_h]
    # contiguous whatever h's strides (a permuted h would give matmul(out=) a strided target)
    gh: list[Any] = [
        torch.empty_like(h, memory_format=torch.contiguous_format) if keep and not graph else None
        for h, keep in zip(hs, keep_gh)
    ]
    # the first block writes the factor gradients, later blocks add to them (store)
    gphi: list[Any] = [torch.empty_like(p) if need_f[m] and not graph else None for m, p in enumerate(phis)]
    gpsi: list[Any] = [torch.empty_like(p) if need_t[m] and not graph else None for m, p in enumerate(psis)]

    def put(acc: list[Any], m: int, value: torch.Tensor, first: bool) -> None:
        if graph:
            acc[m] = value if first else acc[m] + value
        else:
            store(acc[m], value, first)

    for blk in block_slices(batch, rows_b):
        first_block = blk.start == 0
        hb = [mask_tokens(_XP, h[blk], None if k is None else k[blk]) for h, k in zip(hs, masks)]
        first_blk = [f[blk] for f in firsts] if firsts is not None else [
            torch.matmul(psi.t(), h) if order == "token" else torch.matmul(h, phi)
            for h, phi, psi, order in zip(hb, phis, psis, orders)
        ]  # token first: A (nb, T_out, r_m); feature first: F (nb, T_m, D)
        term_blk = [t[blk] for t in terms] if terms is not None else [
            torch.matmul(first, phi) if order == "token" else torch.matmul(psi.t(), first)
            for first, phi, psi, order in zip(first_blk, phis, psis, orders)
        ]  # (nb, T_out, D)
        pre: list[Any] = [None, term_blk[0]][:n_mod]  # pre[m] = prod_{k<m} term_k
        for m in range(2, n_mod):
            pre.append(pre[m - 1] * term_blk[m - 1])
        run = grad[blk]  # dY * prod_{k>m} term_k, walked from the last modality down
        for m in range(n_mod - 1, -1, -1):
            if need_h[m] or need_f[m] or need_t[m]:
                g_m = run if m == 0 else run * pre[m]
                h, first, phi, psi = hb[m], first_blk[m], phis[m], psis[m]
                gh_blk = None
                if orders[m] == "token":
                    if need_f[m]:
                        part = flat_rows(first).t() @ flat_rows(g_m)
                        put(gphi, m, part, first_block)
                    g_first = torch.matmul(g_m, phi.t())  # dA (nb, T_out, r_m)
                    if need_t[m]:
                        put(gpsi, m, torch.bmm(h, g_first.transpose(1, 2)).sum(dim=0), first_block)
                    if need_h[m]:
                        gh_blk = torch.matmul(psi, g_first, out=None if gh[m] is None else gh[m][blk])
                else:
                    if need_t[m]:
                        put(gpsi, m, torch.bmm(first, g_m.transpose(1, 2)).sum(dim=0), first_block)
                    g_first = torch.matmul(psi, g_m)  # dF (nb, T_m, D)
                    if need_f[m]:
                        part = flat_rows(h).t() @ flat_rows(g_first)
                        put(gphi, m, part, first_block)
                    if need_h[m]:
                        gh_blk = torch.matmul(g_first, phi.t(), out=None if gh[m] is None else gh[m][blk])
                    if graph and keep_gh[m]:
                        gh[m] = gh_blk  # the whole batch: one block
                if graph and keep_gh[m] and orders[m] == "token":
                    gh[m] = gh_blk  # the whole batch: one block
                mask = masks[m]
                if gh_blk is not None and on_grad_h is not None:
                    on_grad_h(m, blk, gh_blk if mask is None else mask_tokens(_XP, gh_blk, mask[blk]))
                elif gh_blk is not None and mask is not None and not graph:  # (its buffer's rows)
                    gh_blk.masked_fill_(~mask[blk].unsqueeze(-1), 0)
            if m:
                run = run * term_blk[m] if graph or m == n_mod - 1 else run.mul_(term_blk[m])
    out: list[torch.Tensor | None] = [
        g if g is None or k is None or not graph else mask_tokens(_XP, g, k) for g, k in zip(gh, masks)
    ]
    # every rank's slice gets the gradient of the rank sum
    out += [None if g is None else g.unsqueeze(0).expand(f.shape).clone() for g, f in zip(gphi, feats)]
    out += [None if g is None else g.unsqueeze(0).expand(t.shape).clone() for g, t in zip(gpsi, toks)]
    return out


def _sequence_forward(
    hs: list[torch.Tensor],
    feature_factors: list[torch.Tensor],
    token_factors: list[torch.Tensor],
    mode: str,
    masks: list[torch.Tensor | None],
) -> torch.Tensor:
    dtype = hs[0].dtype
    cdt = compute_dtype(dtype)
    out = _core_sequence.sequence_fusion(
        [cast(h, cdt) for h in hs],
        [cast(f, cdt) for f in feature_factors],
        [cast(t, cdt) for t in token_factors],
        mode=mode,
        masks=None if all(k is None for k in masks) else list(masks),
    )
    return cast(out, dtype)


_sequence_op = torch.library.custom_op("mmfuse::sequence_fusion", _sequence_forward, mutates_args=())


@_sequence_op.register_fake
def _(hs: Any, feature_factors: Any, token_factors: Any, mode: str, masks: Any) -> Any:
    return hs[0].new_empty((hs[0].shape[0], token_factors[0].shape[2], feature_factors[0].shape[2]))


def _sequence_grads_impl(
    grad: torch.Tensor,
    hs: list[torch.Tensor],
    feature_factors: list[torch.Tensor],
    token_factors: list[torch.Tensor],
    mode: str,
    masks: list[torch.Tensor | None],
    needs: list[bool],
) -> list[torch.Tensor]:
    """The blocked backward as one opaque op; unneeded gradients come back empty."""
    dtype = grad.dtype
    cdt = compute_dtype(dtype)
    # one backward per maths: collapsed mode's routine, cp mode's blocked one
    grads_of = collapsed_grads if mode == "collapsed" else _sequence_grads
    grads = grads_of(
        cast(grad, cdt),
        [cast(h, cdt) for h in hs],
        [cast(f, cdt) for f in feature_factors],
        [cast(t, cdt) for t in token_factors],
        masks=masks,
        needs=needs,
    )
    return [grad.new_empty((0,)) if g is None else cast(g, dtype).contiguous() for g in grads]


_sequence_backward_op = torch.library.custom_op(
    "mmfuse::sequence_fusion_backward", _sequence_grads_impl, mutates_args=()
)
# eager backward passes run the implementation itself (mmfuse.backends._torch_eager.direct)
_sequence_backward_call = direct(torch.ops.mmfuse.sequence_fusion_backward, _sequence_grads_impl)


@_sequence_backward_op.register_fake
def _(grad: Any, hs: Any, feature_factors: Any, token_factors: Any, mode: str, masks: Any, needs: Any) -> Any:
    like = [*hs, *feature_factors, *token_factors]
    return [t.new_empty(t.shape) if need else grad.new_empty((0,)) for t, need in zip(like, needs)]


def _sequence_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hs, feats, toks, mode, masks = inputs
    # Saved: the inputs only (the caller holds them anyway); see the comment above.
    ctx.n_mod = len(hs)
    ctx.mode = mode
    ctx.mask_at = [k is not None for k in masks]
    ctx.save_for_backward(*hs, *feats, *toks, *(k for k in masks if k is not None))


def _sequence_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    n_mod = ctx.n_mod
    saved = list(ctx.saved_tensors)
    hs, feats, toks = saved[:n_mod], saved[n_mod : 2 * n_mod], saved[2 * n_mod : 3 * n_mod]
    rest = iter(saved[3 * n_mod :])
    masks = [next(rest) if present else None for present in ctx.mask_at]
    need_h, need_f, need_t = ctx.needs_input_grad[:3]
    needs = [bool(v) for v in (*need_h, *need_f, *need_t)]
    if torch.is_grad_enabled() or _core_sequence.torch_transformed(grad):
        # a graph of the backward wanted, or a backward under vmap (batched gradients): the
        # differentiable, out-of-place formulas (cp mode's einsums have no batching rule
        # there: its formulas by the core's autograd, as the fused Wander op does)
        if ctx.mode == "cp" and not torch.is_grad_enabled():
            def core() -> torch.Tensor:
                return _core_sequence.sequence_fusion(
                    hs, feats, toks, mode="cp", masks=masks if any(k is not None for k in masks) else None
                )

            grads: list[Any] = autograd_grads(core, [*hs, *feats, *toks], needs, grad)
        else:
            grads_of = collapsed_grads if ctx.mode == "collapsed" else _sequence_grads
            grads = grads_of(grad, hs, feats, toks, masks, needs)
    else:
        grads = _sequence_backward_call(grad.contiguous(), hs, feats, toks, ctx.mode, masks, needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
    # torch.library sees a Tensor?[] argument as a list only when every entry is a tensor
    masks_grad = [None] * n_mod if all(ctx.mask_at) else None
    return grads[:n_mod], grads[n_mod : 2 * n_mod], grads[2 * n_mod :], None, masks_grad


_sequence_op.register_autograd(_sequence_backward, setup_context=_sequence_setup_context)
sequence_op_eager = bind(
    "_SequenceFusion",
    torch.ops.mmfuse.sequence_fusion,
    _sequence_setup_context,
    _sequence_backward,
    _sequence_forward,
)



# On the CPU, batches of at most this many samples run the Array-API core (under autograd,
# when it records) rather than the custom op, as wander's small batches do
# (mmfuse.backends.torch.wander.WHOLE_BATCH_ROWS, whose memory reasoning sets the bound: the
# core keeps every term for backward, the op none).  Measured (one thread, thread CPU time,
# medians of 5 interleaved rounds, float32, the 2-core CI box, the forty-third session),
# core / op: training steps (forward and backward) 0.53-0.58 at (8, 8) tokens, r 4, R_h 2, R_t
# 2, D 16, T_out 4 from B = 1 to 128, both modes, and 0.40-0.85 at the CMU-MOSI shapes ((50,
# 50, 50), r 16, R_h 8, R_t 12, D 40, T_out 16); forwards without autograd 0.64-1.00 at
# both.  The op's fixed costs (its Python, the dispatcher, its backward's blocking) decided
# those steps: 1.4-2.2x the plain torch code's at B <= 128 (a review's measurement).  Beyond
# (0.46-0.97 at B 256 and 512) the op's memory-lean backward is kept.  Not measured on an
# accelerator: there the op runs at every size.
CORE_ROWS = 128

# ... and only while the terms the core keeps for backward, M B R_t R_h T_out D elements (R_t
# = R_h = 1 in collapsed mode), are at most this many (32 MiB of float32).  Autograd keeps the
# running product over the modalities too, so the core holds up to about twice the terms: a
# review measured 1.33x them at M = 3 and 1.78x at M = 8 (2**23 elements: 57 MiB of float32,
# 114 of float64), against the op's inputs alone.  Past the bound the op's
# saved inputs are the point (the module docstring): at M = 3, T 50, r 32, R_h = R_t = 16,
# T_out 32, D 128, B = 128 (2**28 elements) the core held 2823 MB against the op's 282 and its
# step took 1.56x the op's wall time (a diff review's find), where its thread CPU time had
# been 0.82-0.96x the op's from 2**23 to 2**26 elements (the forty-third session): a little
# time for tens of times the memory.  The measured small cases stay inside (the CMU-MOSI
# shapes in cp mode up to B = 32: 5.9 million elements, core / op 0.40-0.78 per step; at B =
# 128, 23.6 million and 0.85, the op).
CORE_TERM_ELEMENTS = 1 << 23


def core_terms_fit(
    batch: int, feature_factors: Sequence[Any], token_factors: Sequence[Any], mode: str
) -> bool:
    """Whether the terms the core keeps for backward, M B R_t R_h T_out D elements (ranks 1 in
    collapsed mode), are at most :data:`CORE_TERM_ELEMENTS` (this module's small batches, and
    :mod:`.wander`'s).  What autograd then holds is up to about twice that (the running
    products besides the terms; the constant's comment)."""
    r_h, _, out_dim = feature_factors[0].shape
    r_t, _, n_out = token_factors[0].shape
    ranks = 1 if mode == "collapsed" else r_t * r_h
    return len(feature_factors) * batch * ranks * n_out * out_dim <= CORE_TERM_ELEMENTS


def _on_core(
    hs: Sequence[Any], feature_factors: Sequence[Any], token_factors: Sequence[Any], mode: str
) -> bool:
    """Whether a call runs the core rather than the op: on the CPU, outside ``torch.compile``
    (which traces the op), at most :data:`CORE_ROWS` samples whose kept terms fit
    (:func:`core_terms_fit`)."""
    if torch.compiler.is_compiling() or not hs[0].is_cpu:
        return False
    batch = hs[0].shape[0]
    return batch <= CORE_ROWS and core_terms_fit(batch, feature_factors, token_factors, mode)


def sequence_fusion(
    hs: Sequence[Any],
    feature_factors: Sequence[Any],
    token_factors: Sequence[Any],
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
) -> Any:
    """``mmfuse.sequence_fusion`` as the ``mmfuse::sequence_fusion`` custom op (inputs
    checked); small problems on the CPU (:func:`_on_core`), and every call under
    ``torch.jit.trace`` (:func:`mmfuse._namespace.jit_tracing`), the core's algorithm."""
    if jit_tracing(torch) or _on_core(hs, feature_factors, token_factors, mode):
        return _core_sequence.sequence_fusion(
            list(hs), list(feature_factors), list(token_factors), mode=mode,
            masks=None if masks is None else list(masks),
        )  # fmt: skip
    masks_list = [None] * len(hs) if masks is None else list(masks)
    return sequence_op_eager(list(hs), list(feature_factors), list(token_factors), mode, masks_list)
