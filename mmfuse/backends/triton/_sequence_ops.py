"""Host side of the Triton sequence-fusion kernel (:mod:`._sequence_kernels`): the
``mmfuse_triton::sequence_fusion`` op, its analytic autograd, and the backend's
``sequence_fusion`` and ``wander``.

- ``sequence_fusion(hs, feature_factors, token_factors, mode, masks) -> Tensor``: one kernel
  launch for either mode (collapsed: the host sums each modality's ranks first, (R, ., .) ->
  (1, ., .), and the kernel runs with R_h = R_t = 1; the sums are small torch ops, rounded
  once to the inputs' dtype so that 16-bit inputs keep their tensor-core dots).
- Backward: plain torch ops, the torch backend's own ``setup_context`` and backward for its
  ``mmfuse::sequence_fusion`` (same signature): its analytic routines
  (:func:`mmfuse.backends.torch.sequence.collapsed_grads` for collapsed mode, its blocked
  cp-mode routine otherwise), in float32 for 16-bit inputs.  Both save only the inputs,
  recompute the per-modality terms in cache-sized blocks, use no atomics (deterministic) and
  stay differentiable (double backward).  Collapsed mode's intermediates are (B, T_out, D)
  per modality, as small as the output; cp mode's are R_t R_h times that, held a block at a
  time.  (No backward kernels yet: the forward kernel is what this op adds.)
- ``wander``: the down-projection (one ``addmm`` per modality: cuBLAS), the activation, the
  fusion op above and the residual; everything but the fusion is torch ops, so autograd
  differentiates them and the op supplies the fusion's backward.

Calls the kernel is not built for go to the torch backend's functions: float64, more than
eight modalities, ``torch.func`` transforms (as for the other Triton ops), and widths r_m
above :data:`MAX_WIDTH` (the kernel keeps each modality's (T_out slice, r_m) token-first
tile in registers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..._core import sequence as _core_sequence
from .._torch_eager import bind
from ..torch.sequence import _sequence_backward, _sequence_setup_context
from . import _ops
from . import _sequence_kernels as SK
from ._ops import MAX_MODALITIES, _pow2, _precision, _slots

__all__ = ["MAX_WIDTH", "sequence_call", "sequence_fusion", "takes", "wander"]

#: The largest r_m the kernel takes (rounded up to a power of two it is the width of every
#: modality's token-first register tile; M of them live through the feature-rank loop).
MAX_WIDTH = 64


class _SeqTiles(NamedTuple):
    block_t: int
    block_d: int
    block_k: int
    rank_p: int
    num_warps: int


def _sequence_tiles(
    n_mod: int, widths: Sequence[int], n_out: int, out_dim: int, dtype: torch.dtype
) -> _SeqTiles:
    """Tile sizes (powers of two, every ``tl.dot`` operand >= 16).  Not yet measured on a
    GPU: RANK_P = r_m rounded up; BLOCK_T = T_out up to 32, 16 once the M token-first tiles
    (M RANK_P BLOCK_T float32) would pass 128 x 32 registers a thread at 4 warps; BLOCK_D =
    D up to 64; BLOCK_K = 16 float32 / 32 16-bit tokens per K step, as the low-rank
    kernels."""
    rank_p = max(16, _pow2(max(widths)))
    cap_t = 32 if n_mod * rank_p <= 128 else 16
    block_t = max(16, min(cap_t, _pow2(n_out)))
    block_d = max(16, min(64, _pow2(out_dim)))
    block_k = 32 if dtype in (torch.float16, torch.bfloat16) else 16
    return _SeqTiles(block_t, block_d, block_k, rank_p, 4)


def _counts(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values] + [0] * (MAX_MODALITIES - len(values))


# --------------------------------------------------------------------------- forward


@triton_op("mmfuse_triton::sequence_fusion", mutates_args={})
def _sequence_op(
    hs: list[torch.Tensor],
    feature_factors: list[torch.Tensor],
    token_factors: list[torch.Tensor],
    mode: str,
    masks: list[torch.Tensor | None],
) -> torch.Tensor:
    h0 = hs[0]
    dtype = h0.dtype
    batch, n_mod = int(h0.shape[0]), len(hs)
    n_out, out_dim = int(token_factors[0].shape[2]), int(feature_factors[0].shape[2])
    out = _ops._empty((batch, n_out, out_dim), dtype, h0.device)  # (the tests poison it)
    if batch == 0:
        return out
    if mode == "collapsed":  # the rank sums: cp mode's kernel with R_h = R_t = 1
        feats = [f.sum(dim=0, keepdim=True, dtype=torch.float32).to(dtype) for f in feature_factors]
        toks = [t.sum(dim=0, keepdim=True, dtype=torch.float32).to(dtype) for t in token_factors]
    else:
        feats = [f.contiguous() for f in feature_factors]
        toks = [t.contiguous() for t in token_factors]
    hs = [h.contiguous() for h in hs]
    mask_args = [h0 if k is None else k.contiguous().view(torch.uint8) for k in masks]
    has_mask = sum(1 << m for m, k in enumerate(masks) if k is not None)
    widths = [int(h.shape[2]) for h in hs]
    t = _sequence_tiles(n_mod, widths, n_out, out_dim, dtype)
    grid = (batch * triton.cdiv(n_out, t.block_t) * triton.cdiv(out_dim, t.block_d),)
    wrap_triton(SK.sequence_fwd_kernel)[grid](
        out, *_slots(hs), *_slots(feats), *_slots(toks), *_slots(mask_args),
        *_counts([int(h.shape[1]) for h in hs]), *_counts(widths),
        n_out, out_dim, int(feats[0].shape[0]), int(toks[0].shape[0]),
        M=n_mod, HAS_MASK=has_mask, BLOCK_T=t.block_t, BLOCK_D=t.block_d, BLOCK_K=t.block_k,
        RANK_P=t.rank_p, PRECISION=_precision(dtype), PRECISION32=_precision(torch.float32),
        num_warps=t.num_warps,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- backward
#
# The torch backend's setup_context and backward, unchanged (the two ops share a signature):
# inputs saved, the analytic gradients recomputed block by block, in float32 for 16-bit inputs
# (its opaque backward op), differentiable where a graph of the backward is built.


_sequence_op.register_autograd(_sequence_backward, setup_context=_sequence_setup_context)
sequence_call = bind(
    "_TritonSequenceFusion",
    torch.ops.mmfuse_triton.sequence_fusion,
    _sequence_setup_context,
    _sequence_backward,
)


# --------------------------------------------------------------------------- entry points


def takes(hs_or_xs: Sequence[Any], widths: Sequence[int], *more: Any) -> bool:
    """Whether the kernel serves a call: the other Triton ops' rules (float32 / 16-bit, at
    most eight modalities, no ``torch.func`` transform) and every width r_m <= MAX_WIDTH."""
    from . import _delegated  # the package's routing rule (imported by now)

    return not _delegated(hs_or_xs, *more) and max(widths) <= MAX_WIDTH


def sequence_fusion(
    hs: Sequence[Any],
    feature_factors: Sequence[Any],
    token_factors: Sequence[Any],
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
) -> Any:
    """``mmfuse.sequence_fusion`` as the ``mmfuse_triton::sequence_fusion`` op (inputs
    checked); other calls (see :func:`takes`) go to the torch backend."""
    masks_list = [None] * len(hs) if masks is None else list(masks)
    if not takes(hs, [int(h.shape[2]) for h in hs], feature_factors, token_factors):
        from .. import torch as torch_backend

        return torch_backend.sequence_fusion(hs, feature_factors, token_factors, mode=mode, masks=masks)
    from . import _on_device

    with _on_device(hs[0]):
        return sequence_call(list(hs), list(feature_factors), list(token_factors), mode, masks_list)


def wander(
    xs: Sequence[Any],
    params: Any,
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
    activation: Any = "gelu",
    residual: str = "first",
) -> Any:
    """``mmfuse.wander`` (inputs checked): the core's adapter (down-projections, activation,
    residual: :func:`mmfuse._core.sequence.wander_with`) around the fused kernel; other calls
    (see :func:`takes`) go to the torch backend."""
    down = list(params["down"])
    weights, biases = [w for w, _ in down], [b for _, b in down]
    feats, toks = list(params["feature"]), list(params["token"])
    if not takes(xs, [int(w.shape[1]) for w in weights], weights, biases, feats, toks):
        from .. import torch as torch_backend

        return torch_backend.wander(
            xs, params, mode=mode, masks=masks, activation=activation, residual=residual
        )
    from . import _on_device

    def fuse(hs: list[Any], feats: list[Any], toks: list[Any], *, mode: str, masks: list[Any]) -> Any:
        with _on_device(xs[0]):
            return sequence_call(hs, feats, toks, mode, masks)

    return _core_sequence.wander_with(
        fuse, list(xs), params, mode=mode, masks=masks, activation=activation, residual=residual
    )
