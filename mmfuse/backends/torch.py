"""The ``"torch"`` backend: ``torch.library`` custom operators with analytic, memory-lean backwards.

Importing this module imports torch; the registry imports it lazily (``backend="torch"``, or
under ``"auto"`` once the user has imported torch), so ``import mmfuse`` never does.

Operators (namespace ``mmfuse``), each a ``torch.library.custom_op`` with ``register_fake``
(shape inference for ``torch.compile`` and meta tensors) and ``register_autograd``:

- ``mmfuse::lowrank_fusion(xs, factors, weights, bias, append_one, present)``: LMF Eq. 8.
  Forward: per batch block, one GEMM per modality into a reused (rows, R h) buffer, an in-place
  product and the rank sum; no (B, R h) array is ever allocated.
- ``mmfuse::lowrank_fusion_backward``: the blocked analytic backward of the above (opaque to
  autograd, used when no graph of the backward is being built).
- ``mmfuse::cp_fusion(xs, weights, factors, bias, append_one, present)``: CP fusion in
  TensorLy's layout; its backward is plain differentiable torch code (projections are (B, R)).

What the backward of ``lowrank_fusion`` saves, and why
------------------------------------------------------
LMF's released code (and autograd through the Array-API core) keeps the M per-modality
projections ``hat x_m W_m`` alive from forward to backward: M arrays of B R h elements, the
dominant memory of the layer.  Here ``setup_context`` saves only the *inputs* (``xs``,
``factors``, ``weights``, ``present``), which the caller holds anyway, so saving them costs no
memory.  The backward recomputes the projections block by block (one extra GEMM per modality,
the forward's cost) and forms, per block, ``G_m = (g w) * prod_{k != m} P_k`` with prefix and
suffix products (no division, so exact zeros in a projection are harmless).  Peak extra memory
is a few (rows, R h) blocks plus the gradients themselves, independent of the batch size.

When a graph of the backward is requested (``create_graph=True``: double backward,
``gradgradcheck``), the same formulas run as ordinary differentiable torch operations on the
whole batch (:func:`_lowrank_grads_differentiable`); that path trades memory for
differentiability and is only taken when asked for.

float16 / bfloat16 inputs are computed in float32 and the results cast back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import _fusion  # noqa: F401  (defines the operators registered below)
from .._namespace import is_torch
from ._registry import register

__all__ = ["cp_fusion", "lowrank_fusion"]

# Per batch block, each (rows, R h) buffer is kept near this many bytes (cache-sized).
_BLOCK_BYTES = 1 << 20
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _block_rows(batch: int, width: int, itemsize: int) -> int:
    """Rows per batch block; ``width`` counts every element a block row touches (the inputs'
    features and the (R h)-wide buffers), so a block's working set stays near _BLOCK_BYTES."""
    rows = max(64, _BLOCK_BYTES // max(1, width * itemsize))
    return batch if rows * 2 > batch else rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _flat(factor: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(R, D, h) factor -> contiguous (D, R h) matrix, optionally scaling rank r by scale[r]."""
    rank, rows, out = factor.shape
    if scale is not None:
        factor = factor * scale[:, None, None]
    return factor.permute(1, 0, 2).reshape(rows, rank * out).contiguous()


def _masked(x: torch.Tensor, present: torch.Tensor | None, m: int, blk: slice) -> torch.Tensor:
    x = x[blk]
    if present is None:
        return x
    # where, not multiply: NaNs in absent samples must not leak into the result
    return torch.where(present[blk, m : m + 1], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _project_into(out: torch.Tensor, x: torch.Tensor, mat: torch.Tensor, append_one: bool) -> None:
    """``out = [x, 1] @ mat`` (``x @ mat`` without the constant), written into ``out``."""
    if append_one:
        d = x.shape[1]
        torch.addmm(mat[d], x, mat[:d], out=out)
    else:
        torch.mm(x, mat, out=out)


# --------------------------------------------------------------------------- lowrank forward


@torch.library.custom_op("mmfuse::lowrank_fusion", mutates_args=())
def _lowrank_op(
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> torch.Tensor:
    dtype = xs[0].dtype
    cdt = _compute_dtype(dtype)
    xs = [x.to(cdt) for x in xs]
    rank, _, out_dim = factors[0].shape
    mats = [
        _flat(f.to(cdt), weights.to(cdt) if (m == 0 and weights is not None) else None)
        for m, f in enumerate(factors)
    ]
    batch = xs[0].shape[0]
    width = rank * out_dim
    out = torch.empty((batch, out_dim), dtype=cdt, device=xs[0].device)
    rows = _block_rows(batch, sum(x.shape[1] for x in xs) + 2 * width, out.element_size())
    acc = torch.empty((min(rows, batch), width), dtype=cdt, device=out.device)
    proj = torch.empty_like(acc) if len(xs) > 1 else acc
    for start in range(0, batch, rows):
        blk = slice(start, min(start + rows, batch))
        n = blk.stop - start
        for m, (x, mat) in enumerate(zip(xs, mats)):
            target = acc[:n] if m == 0 else proj[:n]
            _project_into(target, _masked(x, present, m, blk), mat, append_one)
            if m:
                acc[:n].mul_(proj[:n])
        torch.sum(acc[:n].view(n, rank, out_dim), dim=1, out=out[blk])
    if bias is not None:
        out.add_(bias.to(cdt))
    return out.to(dtype)


@_lowrank_op.register_fake
def _(xs: Any, factors: Any, weights: Any, bias: Any, append_one: bool, present: Any) -> Any:
    return xs[0].new_empty((xs[0].shape[0], factors[0].shape[2]))


# --------------------------------------------------------------------------- lowrank backward


@torch.library.custom_op("mmfuse::lowrank_fusion_backward", mutates_args=())
def _lowrank_backward_op(
    grad: torch.Tensor,
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Blocked analytic backward.  ``needs`` = [x_0..x_{M-1}, f_0..f_{M-1}, weights, bias].

    Returns gradients in that order; a gradient that is not needed comes back as an empty
    tensor (custom ops cannot return None in a list).
    """
    n_mod = len(xs)
    dtype = grad.dtype
    cdt = _compute_dtype(dtype)
    dev = grad.device
    g_all = grad.to(cdt)
    xs = [x.to(cdt) for x in xs]
    rank, _, out_dim = factors[0].shape
    width = rank * out_dim
    mats = [_flat(f.to(cdt)) for f in factors]
    w = (
        weights.to(cdt)
        if weights is not None
        else torch.ones(rank, dtype=cdt, device=dev)
    )
    need_x, need_f = needs[:n_mod], needs[n_mod : 2 * n_mod]
    need_w, need_b = needs[2 * n_mod], needs[2 * n_mod + 1]
    batch = xs[0].shape[0]
    gx: list[Any] = [torch.empty_like(x) if need_x[m] else None for m, x in enumerate(xs)]
    gmat: list[Any] = [torch.zeros_like(mat) if need_f[m] else None for m, mat in enumerate(mats)]
    gw = torch.zeros(rank, dtype=cdt, device=dev) if need_w else None

    rows = _block_rows(batch, 2 * sum(x.shape[1] for x in xs) + (2 * n_mod + 1) * width, g_all.element_size())
    cap = min(rows, batch)
    proj = [torch.empty((cap, width), dtype=cdt, device=dev) for _ in range(n_mod)]
    # prefix[m] = prod_{k<m} P_k for m >= 1 (prefix[0] is implicitly ones)
    prefix: list[Any] = [None] + [torch.empty((cap, width), dtype=cdt, device=dev) for _ in range(1, n_mod)]
    run = torch.empty((cap, width), dtype=cdt, device=dev)
    gm = torch.empty((cap, width), dtype=cdt, device=dev)
    w3 = w.view(1, rank, 1)
    for start in range(0, batch, rows):
        blk = slice(start, min(start + rows, batch))
        n = blk.stop - start
        feats = [_masked(x, present, m, blk) for m, x in enumerate(xs)]
        for m in range(n_mod):
            _project_into(proj[m][:n], feats[m], mats[m], append_one)
            if m == 1:
                prefix[1][:n].copy_(proj[0][:n])
            elif m > 1:
                torch.mul(prefix[m - 1][:n], proj[m - 1][:n], out=prefix[m][:n])
        g = g_all[blk]
        g3 = g.unsqueeze(1)  # (n, 1, h)
        if gw is not None:  # dL/dw_r = sum_{b,k} g[b,k] prod_m P_m[b,r,k]
            full = gm[:n]
            if n_mod > 1:
                torch.mul(prefix[n_mod - 1][:n], proj[n_mod - 1][:n], out=full)
            else:
                full.copy_(proj[0][:n])
            gw.add_((full.view(n, rank, out_dim) * g3).sum(dim=(0, 2)))
        # run = (g w) * prod_{k>m} P_k, walked from the last modality down
        torch.mul(g3, w3, out=run[:n].view(n, rank, out_dim))
        for m in range(n_mod - 1, -1, -1):
            if need_x[m] or need_f[m]:
                gmm = run[:n] if m == 0 else torch.mul(run[:n], prefix[m][:n], out=gm[:n])
                d = feats[m].shape[1]
                if need_x[m]:
                    gxb = torch.mm(gmm, mats[m][:d].t(), out=gx[m][blk])
                    if present is not None:
                        gxb.masked_fill_(~present[blk, m : m + 1], 0)
                if need_f[m]:
                    # (G^T x)^T: the long batch axis is the GEMM's reduction; much faster than
                    # x^T G for narrow R h (measured), the same for wide
                    gmat[m][:d].add_(torch.mm(gmm.t(), feats[m]).t())
                    if append_one:
                        gmat[m][d].add_(gmm.sum(dim=0))
            if m:
                run[:n].mul_(proj[m][:n])

    def empty() -> torch.Tensor:  # outputs must not alias one another: a fresh one each
        return grad.new_empty((0,))

    out: list[torch.Tensor] = []
    for m in range(n_mod):
        out.append(gx[m].to(dtype) if gx[m] is not None else empty())
    for m, f in enumerate(factors):
        if gmat[m] is None:
            out.append(empty())
        else:
            rows_m = f.shape[1]
            out.append(gmat[m].view(rows_m, rank, out_dim).permute(1, 0, 2).contiguous().to(dtype))
    out.append(gw.to(dtype) if gw is not None else empty())
    out.append(g_all.sum(dim=0).to(dtype) if need_b else empty())
    return out


@_lowrank_backward_op.register_fake
def _(grad: Any, xs: Any, factors: Any, weights: Any, append_one: bool, present: Any, needs: Any) -> Any:
    n_mod = len(xs)
    out = []
    for m, x in enumerate(xs):
        out.append(x.new_empty(x.shape) if needs[m] else grad.new_empty((0,)))
    for m, f in enumerate(factors):
        out.append(f.new_empty(f.shape) if needs[n_mod + m] else grad.new_empty((0,)))
    rank, out_dim = factors[0].shape[0], factors[0].shape[2]
    out.append(grad.new_empty((rank,)) if needs[2 * n_mod] else grad.new_empty((0,)))
    out.append(grad.new_empty((out_dim,)) if needs[2 * n_mod + 1] else grad.new_empty((0,)))
    return out


def _affine(x: torch.Tensor, mat: torch.Tensor, append_one: bool) -> torch.Tensor:
    if not append_one:
        return x @ mat
    d = x.shape[-1]
    return x @ mat[..., :d, :] + mat[..., d : d + 1, :]


def _lowrank_grads_differentiable(
    grad: torch.Tensor,
    xs: Sequence[torch.Tensor],
    factors: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The same gradient formulas as out-of-place, differentiable torch operations.

    Used only when a graph of the backward is being built (double backward); it holds the M
    (B, R h) projections, which is what differentiating through the backward needs anyway.
    """
    n_mod = len(xs)
    rank, _, out_dim = factors[0].shape
    whole = slice(None)
    feats = [_masked(x, present, m, whole) for m, x in enumerate(xs)]
    proj = [_affine(f, _flat(fac), append_one) for f, fac, in zip(feats, factors)]
    w = weights if weights is not None else torch.ones(rank, dtype=grad.dtype, device=grad.device)
    g3 = grad.unsqueeze(1)
    prefix: list[torch.Tensor | None] = [None]
    for m in range(1, n_mod):
        prev = prefix[m - 1]
        prefix.append(proj[m - 1] if prev is None else prev * proj[m - 1])
    last = prefix[n_mod - 1]
    full = proj[n_mod - 1] if last is None else last * proj[n_mod - 1]
    gw = (full.reshape(-1, rank, out_dim) * g3).sum(dim=(0, 2))
    run = (g3 * w.view(1, rank, 1)).reshape(-1, rank * out_dim)
    gxs: list[torch.Tensor] = [grad] * n_mod
    gfs: list[torch.Tensor] = [grad] * n_mod
    for m in range(n_mod - 1, -1, -1):
        pm = prefix[m]
        gmm = run if pm is None else run * pm
        mat = _flat(factors[m])
        d = feats[m].shape[1]
        gx = gmm @ mat[:d].t()
        if present is not None:
            gx = torch.where(present[:, m : m + 1], gx, torch.zeros((), dtype=gx.dtype, device=gx.device))
        gxs[m] = gx
        gmat = feats[m].t() @ gmm
        if append_one:
            gmat = torch.cat([gmat, gmm.sum(dim=0, keepdim=True)], dim=0)
        gfs[m] = gmat.reshape(-1, rank, out_dim).permute(1, 0, 2)
        if m:
            run = run * proj[m]
    return gxs, gfs, gw, grad.sum(dim=0)


def _lowrank_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, factors, weights, _bias, append_one, present = inputs
    # Saved: the inputs only (the caller holds them anyway); see the module docstring.
    ctx.n_mod = len(xs)
    ctx.append_one = append_one
    ctx.has_weights = weights is not None
    ctx.has_present = present is not None
    extra = [t for t in (weights, present) if t is not None]
    ctx.save_for_backward(*xs, *factors, *extra)


def _lowrank_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    n_mod = ctx.n_mod
    saved = ctx.saved_tensors
    xs, factors = list(saved[:n_mod]), list(saved[n_mod : 2 * n_mod])
    rest = list(saved[2 * n_mod :])
    weights = rest.pop(0) if ctx.has_weights else None
    present = rest.pop(0) if ctx.has_present else None
    need_xs, need_fs, need_w, need_b = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[2],
        ctx.needs_input_grad[3],
    )
    need_w = bool(need_w) and weights is not None
    if torch.is_grad_enabled():
        gxs, gfs, gw, gb = _lowrank_grads_differentiable(grad, xs, factors, weights, ctx.append_one, present)
        return (
            [g if need else None for g, need in zip(gxs, need_xs)],
            [g if need else None for g, need in zip(gfs, need_fs)],
            gw if need_w else None,
            gb if need_b else None,
            None,
            None,
        )
    needs = [bool(v) for v in (*need_xs, *need_fs, need_w, need_b)]
    grads = _lowrank_backward_op(grad.contiguous(), xs, factors, weights, ctx.append_one, present, needs)
    return (
        [grads[m] if need_xs[m] else None for m in range(n_mod)],
        [grads[n_mod + m] if need_fs[m] else None for m in range(n_mod)],
        grads[2 * n_mod] if need_w else None,
        grads[2 * n_mod + 1] if need_b else None,
        None,
        None,
    )


_lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)


# --------------------------------------------------------------------------- cp fusion


def _cp_parts(
    xs: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    append_one: bool,
    present: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    feats = [_masked(x, present, m, slice(None)) for m, x in enumerate(xs)]
    proj = [_affine(f, a, append_one) for f, a in zip(feats, factors[:-1])]
    return feats, proj


@torch.library.custom_op("mmfuse::cp_fusion", mutates_args=())
def _cp_op(
    xs: list[torch.Tensor],
    weights: torch.Tensor | None,
    factors: list[torch.Tensor],
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> torch.Tensor:
    dtype = xs[0].dtype
    cdt = _compute_dtype(dtype)
    xs = [x.to(cdt) for x in xs]
    factors = [f.to(cdt) for f in factors]
    _, proj = _cp_parts(xs, weights, factors, append_one, present)
    prod = proj[0].clone() if len(proj) == 1 else proj[0] * proj[1]
    for p in proj[2:]:
        prod.mul_(p)
    if weights is not None:
        prod.mul_(weights.to(cdt))
    out = prod @ factors[-1].t()
    if bias is not None:
        out.add_(bias.to(cdt))
    return out.to(dtype)


@_cp_op.register_fake
def _(xs: Any, weights: Any, factors: Any, bias: Any, append_one: bool, present: Any) -> Any:
    return xs[0].new_empty((xs[0].shape[0], factors[-1].shape[0]))


def _cp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, weights, factors, _bias, append_one, present = inputs
    # Saved: the inputs only.  The (B, R) projections are recomputed in backward (one small
    # GEMM per modality) rather than kept, like lowrank_fusion.
    ctx.n_mod = len(xs)
    ctx.append_one = append_one
    ctx.has_weights = weights is not None
    ctx.has_present = present is not None
    extra = [t for t in (weights, present) if t is not None]
    ctx.save_for_backward(*xs, *factors, *extra)


def _cp_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """h = C (w * prod_m P_m) + b with P_m = hat x_m A_m; plain differentiable torch code."""
    n_mod = ctx.n_mod
    saved = ctx.saved_tensors
    xs, factors = list(saved[:n_mod]), list(saved[n_mod : 2 * n_mod + 1])
    rest = list(saved[2 * n_mod + 1 :])
    weights = rest.pop(0) if ctx.has_weights else None
    present = rest.pop(0) if ctx.has_present else None
    need_xs, need_w, need_fs, need_b = ctx.needs_input_grad[:4]
    dtype = grad.dtype
    cdt = _compute_dtype(dtype)
    g = grad.to(cdt)
    xs = [x.to(cdt) for x in xs]
    factors = [f.to(cdt) for f in factors]
    w = weights.to(cdt) if weights is not None else None
    feats, proj = _cp_parts(xs, w, factors, append_one=ctx.append_one, present=present)
    out_factor = factors[-1]
    gp = g @ out_factor  # (B, R): dL/d(w * prod)
    prefix: list[torch.Tensor | None] = [None]
    for m in range(1, n_mod):
        prev = prefix[m - 1]
        prefix.append(proj[m - 1] if prev is None else prev * proj[m - 1])
    last = prefix[n_mod - 1]
    full = proj[n_mod - 1] if last is None else last * proj[n_mod - 1]
    grad_w = (gp * full).sum(dim=0) if (need_w and w is not None) else None
    grad_c = g.t() @ (full if w is None else full * w) if need_fs[-1] else None
    run = gp if w is None else gp * w
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
            grad_xs[m] = gx.to(dtype)
        if need_fs[m]:
            ga = feats[m].t() @ gm
            if ctx.append_one:
                ga = torch.cat([ga, gm.sum(dim=0, keepdim=True)], dim=0)
            grad_as[m] = ga.to(dtype)
        if m:
            run = run * proj[m]
    return (
        grad_xs,
        grad_w.to(dtype) if grad_w is not None else None,
        [*grad_as, grad_c.to(dtype) if grad_c is not None else None],
        grad.sum(dim=0) if need_b else None,
        None,
        None,
    )


_cp_op.register_autograd(_cp_backward, setup_context=_cp_setup_context)


# --------------------------------------------------------------------------- registry


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.lowrank_fusion`` as the ``mmfuse::lowrank_fusion`` custom op (inputs checked)."""
    return torch.ops.mmfuse.lowrank_fusion(list(xs), list(factors), weights, bias, append_one, present)


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.cp_fusion`` as the ``mmfuse::cp_fusion`` custom op (inputs checked)."""
    weights, factors = cp
    return torch.ops.mmfuse.cp_fusion(list(xs), weights, list(factors), bias, append_one, present)


def _supports(xp: Any, device: Any) -> str | None:
    if is_torch(xp):
        return None
    return "needs torch tensors (any device)"


# Above the Array-API core (0): "auto" picks these for torch tensors.
_PRIORITY = 10

register("lowrank_fusion", "torch", lowrank_fusion, supports=_supports, priority=_PRIORITY)
register("cp_fusion", "torch", cp_fusion, supports=_supports, priority=_PRIORITY)
