"""Host side of ``mmfuse.align`` on the ``"triton"`` backend: the core's algorithm over Triton
primitives.

``align`` is :func:`mmfuse._core.align.align_with` (statistics once per modality, the rounds
or their closed-form limit on the (B, 1, C) statistics, one map per modality) over
:class:`TritonPrimitives`, whose two passes are ``triton_op``s (namespace ``mmfuse_triton``,
kernels in :mod:`._align_kernels`, launched through ``wrap_triton``):

- ``align_stats(x, mask) -> (pivot, corr, var)``: one read of x, float32 (…, 1, C) results
  (the core's shifted two-pass statistics about a pivot, as the CPU paths);
- ``align_map(x, pivot, corr, scale, target) -> y``: one read of x and one write of y, the
  map ``((x - pivot) - corr) scale + target`` about the pivot (the core's rule; ``pivot`` and
  ``corr`` None: ``x scale + target``, the identity map of a modality the rounds leave alone).

So an M-modality alignment moves 3 x-sized passes per modality (read, read, write) and
2M + M kernels' worth of (B, 1, C) statistics, whatever the number of rounds.

The forward is itself the ``triton_op`` ``mmfuse_triton::align`` (same arguments as the torch
backend's ``mmfuse::align``), so ``torch.compile`` sees through it to the kernel launches and
the rounds' torch operations.  Gradients: the torch backend's ``mmfuse::align`` backward
(:mod:`mmfuse.backends.torch.align`: the inputs saved, the statistics' gradients from autograd
through the rounds on the small statistics), registered as ``mmfuse_triton::align``'s autograd
(what ``torch.compile``, dispatch modes and direct ``torch.ops`` calls use) and bound around the
kernels' forward in eager mode.  (Under Triton's interpreter ``wrap_triton`` returns the
interpreted kernels unwrapped, so the ops cannot be traced with fake tensors there: compiled
code needs kernels built for a GPU.)  Calls under a
``torch.func`` transform, float64 inputs, statistics axes other than -2, inputs of fewer than
three dimensions or with an empty axis run the core's :func:`~mmfuse._core.align.align` under
autograd (which differentiates the same algorithm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..._core.align import Primitives, Stats, align_with, kept_shape
from ..._core.align import align as core_align
from ..torch.align import _align_backward, _align_setup_context, bind_align, call_align
from . import _align_kernels as AK
from . import _ops

__all__ = ["TRITON", "TritonPrimitives", "align", "map_tiles"]

# A map program's tile: at most this many elements (16 KiB of float32 read, 16 KiB written)
_MAP_ELEMENTS = 4096


def map_tiles(n_tok: int, n_ch: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of ``map_kernel``: up to 128 channels (512-byte float32 row
    segments), and tokens to fill _MAP_ELEMENTS.  Not yet timed on a GPU."""
    block_c = min(128, _ops._pow2(n_ch))
    block_t = max(1, min(_ops._pow2(n_tok), _MAP_ELEMENTS // block_c))
    return block_t, block_c


def _align_stats(
    x: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pivot, corr, var) over axis -2 of a (B, ..., T, C) tensor, float32, kept as size 1."""
    kept = kept_shape(x.shape, x.dim() - 2)
    pivot, corr, var = (_ops._empty(kept, torch.float32, x.device) for _ in range(3))
    rows = _ops._rows(x)
    n_rows, n_tok, n_ch = (int(v) for v in rows.shape)
    t = _ops._stat_tiles(n_tok, n_ch, 16384)  # moments' tiles: the same kernel body
    wrap_triton(AK.stats_kernel)[(n_rows, triton.cdiv(n_ch, t.block_c))](
        pivot, corr, var, rows, _ops._mask_rows(mask, rows), n_tok, n_ch,
        HAS_MASK=mask is not None, SINGLE=t.single, BLOCK_T=t.block_t, BLOCK_C=t.block_c,
        num_warps=t.num_warps,
    )  # fmt: skip
    return pivot, corr, var


def _align_map(
    x: torch.Tensor,
    pivot: torch.Tensor | None,
    corr: torch.Tensor | None,
    scale: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """``((x - pivot) - corr) scale + target`` (``pivot`` None: ``x scale + target``; ``corr``
    None: no correction) in float32, rounded once to x's dtype; the constants broadcast to
    (B, ..., 1, C)."""
    y = _ops._empty(x.shape, x.dtype, x.device)
    rows = _ops._rows(x)
    n_rows, n_tok, n_ch = (int(v) for v in rows.shape)
    kept = kept_shape(x.shape, x.dim() - 2)

    def per_channel(a: torch.Tensor) -> torch.Tensor:
        return _ops.dense(a.to(torch.float32).broadcast_to(kept))

    s, o = per_channel(scale), per_channel(target)
    p = s if pivot is None else per_channel(pivot)  # (s: an unread placeholder)
    k = s if pivot is None else (torch.zeros_like(p) if corr is None else per_channel(corr))
    block_t, block_c = map_tiles(n_tok, n_ch)
    n_tblk = triton.cdiv(n_tok, block_t)
    wrap_triton(AK.map_kernel)[(n_rows * n_tblk, triton.cdiv(n_ch, block_c))](
        y, rows, p, k, s, o, n_tok, n_ch, n_tblk,
        HAS_PIVOT=pivot is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return y


_stats_op = triton_op("mmfuse_triton::align_stats", mutates_args={})(_align_stats)
_map_op = triton_op("mmfuse_triton::align_map", mutates_args={})(_align_map)
# eager calls launch the kernels directly (wrap_triton off, as in the ops); torch.compile and
# dispatch modes see the ops
_stats_call = _ops.eager_op(torch.ops.mmfuse_triton.align_stats, _align_stats)
_map_call = _ops.eager_op(torch.ops.mmfuse_triton.align_map, _align_map)


class TritonPrimitives(Primitives):
    """The alignment primitives as Triton kernels, statistics over the last-but-one axis of
    float32 / float16 / bfloat16 tensors (what :func:`align` checks before using them)."""

    def stats(self, x: Any, axis: int, mask: Any, *, keep_dev: bool = False, with_mean: bool = True) -> Stats:
        if axis != x.ndim - 2:
            raise ValueError(f"the Triton statistics run over axis -2 (got axis {axis} of {x.ndim})")
        pivot, corr, var = _stats_call(x, mask)
        return Stats(pivot + corr, var, pivot, corr)

    def apply(
        self, x: Any, axis: int, pivot: Any, corr: Any, scale: Any, target: Any, dev: Any = None
    ) -> Any:
        return _map_call(x, pivot, corr, scale, target)


TRITON = TritonPrimitives()


def _kernels_take(xs: Sequence[Any], axis: int, masks: Sequence[Any] | None) -> bool:
    """The statistics kernels' conditions (``_stats_kernels_take``: dtype, axis -2, masks,
    no empty axis, no transform) for every modality, and one dtype and rank."""
    from . import _stats_kernels_take

    x0 = xs[0]
    if any(not isinstance(x, torch.Tensor) or x.dtype != x0.dtype or x.ndim != x0.ndim for x in xs):
        return False
    ms = list(masks) if masks is not None else [None] * len(xs)
    return _stats_kernels_take(x0, axis, ms, *xs[1:])


def align(
    xs: list[Any],
    *,
    rounds: int | None = 1,
    alpha: float = 1.0,
    schedule: str = "gauss-seidel",
    topology: str = "consensus",
    hub: int = 0,
    axis: int = -2,
    masks: list[Any] | None = None,
    eps: float = 1e-5,
) -> list[Any]:
    """``mmfuse.align`` as the core's algorithm over :data:`TRITON` (inputs checked), with the
    torch backend's analytic backward; other calls (see :func:`_kernels_take`) run the core
    under autograd."""
    if not _kernels_take(xs, axis, masks):
        return core_align(
            xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
            axis=axis, masks=masks, eps=eps,
        )  # fmt: skip
    return call_align(
        _align_eager, xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=masks, eps=eps,
    )  # fmt: skip


def _align_forward(
    xs: list[torch.Tensor],
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: list[torch.Tensor | None],
    eps: float,
) -> list[torch.Tensor]:
    """The kernels' forward: the core's algorithm over :data:`TRITON` (``mmfuse::align``'s
    arguments and outputs)."""
    from . import _on_device

    with _on_device(xs[0]):
        return align_with(
            TRITON, list(xs), rounds=rounds, alpha=alpha, schedule=schedule, topology=topology,
            hub=hub, axis=axis, masks=None if all(k is None for k in masks) else list(masks), eps=eps,
        )  # fmt: skip


# ``mmfuse_triton::align``: the kernels' forward as a ``triton_op``, which ``torch.compile``
# sees into (AOTAutograd decomposes it into its statistics and map kernel launches and the
# rounds' torch operations on the (B, 1, C) statistics), where a plain custom op would be one
# opaque node.  Its autograd is the torch backend's mmfuse::align backward (same argument
# layout: the inputs saved, the statistics' gradients from autograd through the rounds on the
# small statistics), registered here for torch.compile and direct calls, and bound around the
# kernels' forward for eager calls.
_align_op = triton_op("mmfuse_triton::align", mutates_args={})(_align_forward)
_align_op.register_autograd(_align_backward, setup_context=_align_setup_context)


# Eager calls run the kernels' forward directly (its launches with wrap_triton off, as in the
# op: _stats_call and _map_call); torch.compile and dispatch modes see mmfuse_triton::align.
_align_eager = bind_align("_TritonAlign", torch.ops.mmfuse_triton.align, _align_forward)
