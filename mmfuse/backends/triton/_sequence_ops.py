"""Host side of the Triton sequence-fusion kernel (:mod:`._sequence_kernels`): the
``mmfuse_triton::sequence_fusion`` op, its analytic autograd, and the backend's
``sequence_fusion`` and ``wander``.

- ``sequence_fusion(hs, feature_factors, token_factors, mode, masks) -> Tensor``: one kernel
  launch for either mode (collapsed: the host sums each modality's ranks first, (R, ., .) ->
  (1, ., .), and the kernel runs with R_h = R_t = 1; the sums are small torch ops, in
  float32, the token factors' rounded once to the inputs' dtype so that 16-bit inputs keep
  their tensor-core dot with H: one rounding more than the other backends, and a token-rank
  sum over float16's 65504 overflows).
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
eight modalities, ``torch.func`` transforms (as for the other Triton ops), widths r_m
above :data:`MAX_WIDTH` (the kernel keeps each modality's (T_out slice, r_m) token-first
tile in registers), a factor of more than :data:`MAX_FACTOR_ELEMENTS` elements, and a launch
of more than :data:`MAX_PROGRAMS` programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..._core import sequence as _core_sequence
from ..._namespace import jit_tracing
from ..torch.sequence import _sequence_backward, _sequence_setup_context
from . import _ops
from . import _sequence_kernels as SK
from ._ops import MAX_MODALITIES, _pow2, _precision, _slots

__all__ = [
    "MAX_FACTOR_ELEMENTS", "MAX_PROGRAMS", "MAX_WIDTH", "sequence_call", "sequence_fusion", "takes", "wander",
]

#: The largest r_m the kernel takes (rounded up to a power of two it is the width of every
#: modality's token-first register tile; M of them live through the feature-rank loop).
MAX_WIDTH = 64
#: The most elements a feature or token factor, or one sample of an input's activations (T_m r_m)
#: or of the output (T_out D), may have: the kernel's offsets inside them are 32-bit (a token
#: factor's rank j starts at ``j T_m T_out``, which wrapped past 2**31 to a negative offset: a
#: read before the factor; a review's find, shown in the interpreter; the in-sample offsets
#: ``t r`` and ``t D`` likewise: a diff review's).
MAX_FACTOR_ELEMENTS = 2**31 - 1
#: The most programs the kernel's launch may have: one per (sample, output token tile, output
#: feature tile) on CUDA's grid axis 0, which takes at most 2**31 - 1 (Triton's launcher reads
#: it as a C int: a larger grid, B >= 2**31 with T_out = D = 1, raised OverflowError rather
#: than going to the torch backend; a review's find, by reading).
MAX_PROGRAMS = 2**31 - 1
#: The smallest BLOCK_T and BLOCK_D of :func:`_sequence_tiles` (a ``tl.dot`` operand's least):
#: the launch bound is read with them, the most programs any tile choice gives.
_MIN_TILE = 16


class _SeqTiles(NamedTuple):
    block_t: int
    block_d: int
    block_k: int
    rank_p: int
    num_warps: int
    num_stages: int


#: Per-thread register estimate (see :func:`_sequence_regs`) the tile rule keeps tiles
#: under.  sm_90 gives a thread at most 255 registers (65536 per SM, so 4 warps at 255 each
#: leave room for two programs per SM); past that ptxas spills to local memory.  The estimate
#: counts only the large live values, so the bound leaves about 90 registers for addresses,
#: masks, loop state and the pipelined loads.  168 is what the largest tile that compiled
#: clean before this rule (T_out, D >= 64 at M = 2, r_m <= 16: 32 x 64, 4 warps) estimates.
_REG_BUDGET = 168


def _sequence_regs(n_mod: int, rank_p: int, block_t: int, block_d: int, num_warps: int) -> int:
    """Registers a thread holds for the large live values of one program (an estimate):

    - the feature contraction ``A_m @ Phi_m[i][:, dslice]`` is a float32 dot without tensor
      cores (FMA): a thread computing ``e = BLOCK_T BLOCK_D / (32 num_warps)`` outputs, r rows
      by c columns (r c = e, as square as powers of two allow), holds r rows of A_m and c
      columns of Phi_m, ``RANK_P (r + c)`` floats: this is the term that grows with width;
    - the M token-first tiles, ``M BLOCK_T RANK_P`` floats spread over the program's threads
      (registers when the token loops end; in cp mode Triton then parks them in shared
      memory through the feature-rank loop);
    - the accumulator and the running product, ``2 e``.
    """
    threads = 32 * num_warps
    per_thread = max(1, block_t * block_d // threads)
    rows = 1 << ((per_thread.bit_length() - 1) // 2)
    operands = rank_p * (rows + per_thread // rows)
    return operands + -(-n_mod * block_t * rank_p // threads) + 2 * per_thread


def _sequence_tiles(
    n_mod: int, widths: Sequence[int], n_out: int, out_dim: int, dtype: torch.dtype
) -> _SeqTiles:
    """Tile sizes (powers of two, every ``tl.dot`` operand >= 16) and launch options.  Not yet
    measured on a GPU; checked for spills by :mod:`._compile_check` (sm_90a).

    RANK_P = r_m rounded up.  The starting tile is BLOCK_T = T_out up to 32 by BLOCK_D = D up
    to 64 at 4 warps, with BLOCK_K = 16 float32 / 32 16-bit tokens per K step (as the low-rank
    kernels).  While :func:`_sequence_regs` of the tile passes :data:`_REG_BUDGET` the rule
    gives up, in this order: 4 warps for 8 (the same tile over twice the threads: half the
    outputs and token-first tiles per thread; the operands stay RANK_P long), BLOCK_T down to
    16 (no work is repeated: the output's token tiles are independent), then BLOCK_D down to
    16 (each output feature tile repeats the token-first contraction, so it goes last).  A
    problem that needed any of this also takes 16-bit tokens 16 per K step (the token-first
    dot's operands and their pipelined copies half the size).  The operand term
    ``RANK_P (r + c)`` is why the width rules: at r_m = 64 the feature dot alone takes 128
    registers even at one output per thread, so wide problems end at 16 x 16 over 8 warps
    whatever M is, while r_m = 16 problems keep 32 x 64 (M = 2 at 4 warps, M = 8 at 8).
    A tile that estimates under the budget is kept as it is: small problems (the CMU-MOSI
    adapter: M = 3, r_m = 16, T_out = 16, D = 40 -> 16 x 64 at 4 warps) keep the tiles
    they had.

    Two pipeline stages, not Triton's default three: each stage keeps another set of the
    token loop's and the feature-rank loop's prefetched loads (their addresses, masks and
    async tokens) live across the loop; at three the masked CMU-MOSI float32 cp-mode kernel
    spilled 80 bytes, at two 4 (sm_90a, ptxas of the triton wheel; the unmasked one about 30
    either way)."""
    rank_p = max(16, _pow2(max(widths)))
    block_t = max(_MIN_TILE, min(32, _pow2(n_out)))
    block_d = max(_MIN_TILE, min(64, _pow2(out_dim)))
    block_k = _ops.block_k_for(dtype)
    num_warps = 4
    shrunk = False
    while _sequence_regs(n_mod, rank_p, block_t, block_d, num_warps) > _REG_BUDGET:
        if num_warps < 8:
            num_warps = 8
        elif block_t > 16:
            block_t //= 2
        elif block_d > 16:
            block_d //= 2
        else:  # the smallest tile tl.dot takes (only reached if the budget were lowered)
            break
        shrunk = True
    if shrunk:
        block_k = 16
    return _SeqTiles(block_t, block_d, block_k, rank_p, num_warps, 2)


def _counts(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values] + [0] * (MAX_MODALITIES - len(values))


# --------------------------------------------------------------------------- forward


def _sequence_launch(
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
        # Phi's sums stay float32 (the kernel's second dot is a float32 one: rounding them to
        # 16 bits bought nothing, and a sum over 65504 became inf); Psi's are rounded once to
        # the inputs' dtype, the operand of the tensor-core dot with H
        feats = [f.sum(dim=0, keepdim=True, dtype=torch.float32) for f in feature_factors]
        toks = [t.sum(dim=0, keepdim=True, dtype=torch.float32).to(dtype) for t in token_factors]
    else:
        feats = [_ops.dense(f) for f in feature_factors]
        toks = [_ops.dense(t) for t in token_factors]
    hs = [_ops.dense(h) for h in hs]
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
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out


_sequence_op = triton_op("mmfuse_triton::sequence_fusion", mutates_args={})(_sequence_launch)


# --------------------------------------------------------------------------- backward
#
# The torch backend's setup_context and backward, unchanged (the two ops share a signature):
# inputs saved, the analytic gradients recomputed block by block, in float32 for 16-bit inputs
# (its opaque backward op), differentiable where a graph of the backward is built.


_sequence_op.register_autograd(_sequence_backward, setup_context=_sequence_setup_context)
sequence_call = _ops.bind_launch(
    "_TritonSequenceFusion",
    torch.ops.mmfuse_triton.sequence_fusion,
    _sequence_setup_context,
    _sequence_backward,
    _sequence_launch,
)


# --------------------------------------------------------------------------- entry points


def takes(
    hs_or_xs: Sequence[Any], widths: Sequence[int], feature: Sequence[Any], token: Sequence[Any], *more: Any
) -> bool:  # fmt: skip
    """Whether the kernel serves a call: the other Triton ops' rules (float32 / 16-bit, at
    most eight modalities, no ``torch.func`` transform), every width r_m <= MAX_WIDTH,
    every factor, sample of activations (T_m r_m) and sample of the output (T_out D) of at
    most MAX_FACTOR_ELEMENTS elements, and a launch of at most MAX_PROGRAMS programs (with
    the smallest tiles: B cdiv(T_out, 16) cdiv(D, 16))."""
    from . import _delegated  # the package's routing rule (imported by now)

    if _delegated(hs_or_xs, feature, token, *more) or max(widths) > MAX_WIDTH:
        return False
    sizes = [f.numel() for f in (*feature, *token)]
    sizes += [int(x.shape[1]) * w for x, w in zip(hs_or_xs, widths)]
    n_out, out_dim = int(token[0].shape[2]), int(feature[0].shape[2])
    sizes.append(n_out * out_dim)
    programs = int(hs_or_xs[0].shape[0]) * -(-n_out // _MIN_TILE) * -(-out_dim // _MIN_TILE)
    return max(sizes) <= MAX_FACTOR_ELEMENTS and programs <= MAX_PROGRAMS


def _mask_list(masks: Sequence[Any] | None, n: int) -> list[Any]:
    """The op's ``Tensor?[] masks``: one entry per modality (None: no mask)."""
    return [None] * n if masks is None else list(masks)


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
    masks_list = _mask_list(masks, len(hs))
    # (torch.jit.trace: the torch backend's, which runs the core there; see its jit_tracing)
    if jit_tracing(torch) or not takes(hs, [int(h.shape[2]) for h in hs], feature_factors, token_factors):
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
    # (torch.jit.trace: the torch backend's, which runs the core there, as sequence_fusion
    # above; the op's list of optional masks failed the tracer; a review's find)
    widths = [int(w.shape[1]) for w in weights]
    if jit_tracing(torch) or not takes(xs, widths, feats, toks, weights, biases):
        from .. import torch as torch_backend

        return torch_backend.wander(
            xs, params, mode=mode, masks=masks, activation=activation, residual=residual
        )
    from . import _on_device

    def fuse(hs: list[Any], feats: list[Any], toks: list[Any], *, mode: str, masks: Any) -> Any:
        with _on_device(xs[0]):
            return sequence_call(hs, feats, toks, mode, _mask_list(masks, len(hs)))

    return _core_sequence.wander_with(
        fuse, list(xs), params, mode=mode, masks=masks, activation=activation, residual=residual
    )
