"""The ``"triton"`` backend: fused Triton kernels for torch CUDA tensors.

Importing this package imports torch and triton; the registry imports it lazily (by name, or
under ``"auto"`` once the user has imported triton, or for the first call its measured rows
would take: CUDA tensors of at least 2^20 elements), so ``import mmfuse`` never does.

Why a fused kernel
------------------
LMF-style code (and the CuPy / numba / torch backends) computes each modality's projection
P_m = [x_m, 1] F_m with a GEMM that writes a (B, R h) array, then multiplies and rank-sums
them in further passes: M (B, R h) intermediates go through memory, and the training step
keeps them alive for the backward.  Here one kernel does it all per tile (see
:mod:`._kernels` for the conventions):

Forward (``lowrank_fwd_kernel``), per program = (BLOCK_B rows) x (BLOCK_H outputs, all R
ranks), grid flattened so one row block's output slices are neighbours (their x rows stay
in L2)::

    prod = 1                                    # (BLOCK_B, R * BLOCK_H) float32 registers
    for m in range(M):                          # unrolled at compile time, M <= 8
        acc = 0
        for k0 in range(0, d_m, BLOCK_K):       # K loop, tl.dot (tensor cores for 16-bit,
            acc += x_m[rows, k0:] @ F_m[:, k0:, slice]   # TF32 iff torch allows it)
        prod *= acc + F_m[:, d_m, slice]        # the constant row; absent rows: only this
    out[rows, slice] = sum_r w_r prod[:, r, :] + bias

Nothing but (B, h) is written; x_m of an absent sample is never loaded (masked load), so
NaNs stored there cannot leak.

Backward, saving only the inputs (the caller holds them), with G_m = g w_r prod_{j != m} P_j;
two paths (``_ops._backward_path``):

"gemm" (wide outputs, R h > 16): ``lowrank_bwd_g_kernel`` recomputes the M projection tiles
once and writes every G_m for a batch chunk (128 MiB, or a quarter of the batch's G_m where
that is more), and
cuBLAS does the products, dL/dx_m = G_m F_m^T and dL/dF_m = [x_m, 1]^T G_m (chunks summed in
order; bfloat16 G as hi + lo terms so that dL/dx's products, and dL/dF's in a single chunk,
run on tensor cores while the gradients keep float32's intermediate; over several chunks
dL/dF's run in float32).  On an H200 this took 9.1-10.8 ms at B = 65536, (32, 32, 128),
h 128, R 16, float32, against LMF-style torch's 14.1 and the fused path's 31.9.

"fused" (R h <= 16, where G_m is a few columns and the GEMMs would be all launch), two kernels:

- ``lowrank_bwd_x_kernel`` (one program per row block, walking the output slices in order):
  recomputes the M projection tiles, forms each G_m from the others (no division), and
  accumulates dL/dx_m = G_m F_m^T in the program's own rows (read-modify-write, no atomics);
- ``lowrank_bwd_f_kernel`` (one program per (batch split, output slice)): recomputes the
  tiles block by block and accumulates dL/dF_m = [x_m, 1]^T G_m and the rank-weight sums into
  per-split float32 partials; the host sums the S partials (torch's fixed-shape reduction: a
  fixed order).  S is chosen to fill the device with at most 64 MiB of partials.

So the fused backward costs the forward's projections twice more (once per kernel) plus the
dx and dF products, the "gemm" one once more; in exchange neither keeps the (M, B, R h)
projections (LMF's dominant memory).  Everything is deterministic: same inputs, same bits.
The kernels have no derivative of their own: where a graph of the backward is recorded
(``create_graph=True``: gradient penalties, Hessian-vector products) or the backward is batched
(``is_grads_batched``), the low-rank op's backward runs the torch backend's differentiable
formulas (``whole_batch_grads``) instead, so second-order gradients are the torch backend's.

CP fusion (``cp_fwd_kernel``): per row block the (BLOCK_B, R) product
w * prod_m [x_m, 1] A_m is formed in registers, then multiplied by C^T slice by slice.  Its
backward is plain torch code (projections are only (B, R)).

``moments`` and ``zoom_shift`` (``moments_kernel``, ``zoom_shift_kernel``): one program per
(sample, 8-32 channels) computes the statistics over the token axis by the core's shifted
two-pass algorithm about a pivot (p = sum(x) / n, d = x - p, mean = p + sum(d) / n,
var = sum(d^2) / n - (sum(d) / n)^2; masked tokens selected out, so NaN padding cannot leak)
and, for ``zoom_shift``, the guide's statistics and then the map about x's pivot,
y = ((x - p) - corr) s + target (the core's rule).  When the token axis fits one register tile (T <= 512 at
32 channels, 1024 at 16, 2048 at 8) x is read once and y written once; longer axes loop over
token blocks.  Their ops carry autograd (:mod:`._ops`): ``zoom_shift``'s backward is the torch
backend's closed form (called, not copied), ``moments``' the per-token derivative of mean
and std, both plain torch operations from the saved inputs (so double backward works).
Other statistics axes than -2 go to the torch backend's ``zoom_shift`` op or the Array-API
core's ``moments``.

Tiles: the low-rank forward's, the G kernel's and ``zoom_shift``'s were timed on an H200
(``benchmarks/gpu_tune.py``; benchmarks/RESULTS.md), the others come from ``ptxas -v``
register counts for sm_90a (:mod:`._compile_check`).  Besides DRAM traffic, the tiles re-read
data from L2: each forward program reads its factor slice for all modalities (B / BLOCK_B
times the factors in all), and each output slice re-reads x (h / BLOCK_H times x); the
backward's read-modify-writes of its own dx rows (once per output slice) and dF partials
(once per row block) stay in L2 but are several GB at the issue's largest sizes.  float32
dots with TF32 off run on the FMA units (no tensor cores), as torch's own.

Numerics: float32 accumulation everywhere (16-bit inputs included; results cast back).
float32 dots use TF32 exactly when torch's own CUDA matmuls do (``torch.backends.cuda.matmul.fp32_precision``,
which ``allow_tf32`` and ``torch.set_float32_matmul_precision`` also set; off by default, as torch).
float64 inputs and more than eight modalities go to the torch backend's custom ops (the
kernels are built for float32/float16/bfloat16; fp64 dots would run far below the GPU's
FP32/TF32 rate), and so do ranks over ``_ops.MAX_RANK`` (512: the tiles of larger ones need
more shared memory than a block gets), batches over ``_ops.MAX_BATCH`` (2**31 - 1: the
kernels' row index is 32-bit), and factor slabs over ``_ops.MAX_SLAB_ELEMENTS`` (one rank's
(d_m + 1) h, a CP factor: 32-bit offsets inside them); alignment inputs with over
``_ops.MAX_CHANNELS`` channels (524280), or over ``_ops.MAX_ROWS`` rows (CUDA's grid, both), go
to the torch backend or the core.  Inside ``torch.func`` transforms and forward-mode AD this
module's functions, called directly, hand the call to the torch backend too; through the
public functions the registry refuses ``backend="triton"`` there (``BackendUnsupported``),
and "auto" takes the torch backend.
The spreads take ``sqrt_rn`` (the default ``tl.sqrt`` is approximate and flushes a subnormal
variance, possible at ``eps=0``, to 0).

Without a GPU the kernels run under Triton's interpreter: with ``TRITON_INTERPRET=1`` set
before triton itself is first imported (``torch.compile`` imports it) and before this package
is, and still set when the call is made, CPU torch tensors are accepted too (that is how the
tests check them).  Triton builds its language for the interpreter or for a GPU at its first
import, and this package its kernels at its own: a call the two builds cannot run is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..._core.sequence import torch_transformed
from ..._namespace import is_torch
from .._conditions import triton_build_refusal, triton_interpreting
from . import _ops
from ._align_ops import align  # the core's alignment over Triton primitives
from ._sequence_ops import sequence_fusion, wander  # Wander's token-level fusion, the adapter

__all__ = [
    "INTERPRETED", "align", "cp_fusion", "lowrank_fusion", "moments", "sequence_fusion", "supports",
    "wander", "zoom_shift",
]  # fmt: skip

INTERPRETED = _ops.INTERPRETED


def supports(xp: Any, device: Any) -> str | None:
    """None when the kernels can take arrays of namespace ``xp`` on ``device``: torch
    tensors on a CUDA device; built for the interpreter and with ``TRITON_INTERPRET=1`` set
    now, also CPU tensors.  Else what is needed."""
    if not is_torch(xp):
        return "needs torch tensors on a CUDA device"
    refusal = triton_build_refusal(INTERPRETED)  # triton's language built as the kernels
    if refusal is not None:
        return refusal
    kind = getattr(device, "type", str(device))
    if INTERPRETED:
        if not triton_interpreting():
            return "its kernels were built for Triton's interpreter; set TRITON_INTERPRET=1 to run them"
        return None if kind in ("cpu", "cuda") else f"the interpreter takes CPU or CUDA tensors, not {kind!r}"
    if kind == "cuda" and torch.cuda.is_available():
        return None
    if kind == "cpu" and triton_interpreting():
        return (
            "its kernels were built for a GPU: mmfuse.backends.triton was first imported before "
            "TRITON_INTERPRET=1 was set; set it before that import (in a new process) to run "
            "them on CPU tensors"
        )
    return f"needs torch tensors on a CUDA device, got device {device!r}"


def _on_device(t: Any) -> Any:
    """Triton launches on the current CUDA device: make it the tensors' (several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _delegated(xs: Sequence[Any], *more: Any) -> bool:
    """Calls the kernels are not built for (see the module docstring): the torch backend's
    ops take them."""
    if len(xs) > _ops.MAX_MODALITIES or xs[0].dtype not in _ops.KERNEL_DTYPES:
        return True
    tensors = [t for group in (xs, *more) for t in (group if isinstance(group, (list, tuple)) else (group,))]
    return torch_transformed(*(t for t in tensors if isinstance(t, torch.Tensor)))


def _too_many_rows(xs: Sequence[Any]) -> bool:
    """Whether a fusion's batch is over :data:`~._ops.MAX_BATCH`: the fusion kernels' row index
    (program id times the row block) is 32-bit, so a batch over 2**31 - 1 rows wrapped to
    negative rows, read before x and written before the output (a review's find)."""
    return int(xs[0].shape[0]) > _ops.MAX_BATCH


def _slabs_too_large(sizes: Iterable[int]) -> bool:
    """Whether a factor slab the fusion kernels index with 32-bit offsets (``sizes``: one
    rank's (d_m + 1) h per low-rank factor, a CP factor's elements) is over
    :data:`~._ops.MAX_SLAB_ELEMENTS`."""
    return max(sizes, default=0) > _ops.MAX_SLAB_ELEMENTS


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.lowrank_fusion`` as the ``mmfuse_triton::lowrank_fusion`` op (inputs checked)."""
    if (
        _delegated(xs, factors, weights, bias)
        or factors[0].shape[0] > _ops.MAX_RANK
        or _too_many_rows(xs)
        or _slabs_too_large(int(f.shape[1]) * int(f.shape[2]) for f in factors)
    ):
        from .. import torch as torch_backend

        return torch_backend.lowrank_fusion(
            xs, factors, weights, bias, append_one=append_one, present=present
        )
    with _on_device(xs[0]):
        return _ops.lowrank_call(list(xs), list(factors), weights, bias, append_one, present)


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> Any:
    """``mmfuse.cp_fusion`` as the ``mmfuse_triton::cp_fusion`` op (inputs checked)."""
    weights, factors = cp
    if (
        _delegated(xs, factors, weights, bias)
        or factors[-1].shape[1] > _ops.MAX_RANK
        or _too_many_rows(xs)
        or _slabs_too_large(int(f.numel()) for f in factors)
    ):
        from .. import torch as torch_backend

        return torch_backend.cp_fusion(xs, cp, bias, append_one=append_one, present=present)
    with _on_device(xs[0]):
        return _ops.cp_call(list(xs), weights, list(factors), bias, append_one, present)


def _stats_kernels_take(x: Any, axis: int, masks: Sequence[Any], *others: Any) -> bool:
    """Whether the statistics kernels take a call: float32/16-bit tensors of at least three
    dimensions, statistics over axis -2, at most :data:`~._ops.MAX_CHANNELS` channels and
    :data:`~._ops.MAX_ROWS` rows (CUDA's grid), masks of shape x.shape[:-1], no empty axis,
    and no ``torch.func`` transform (the ops carry autograd, but no batching rule or
    forward-mode derivative)."""
    tensors = [x, *others]
    if x.dtype not in _ops.KERNEL_DTYPES or x.ndim < 3 or axis % x.ndim != x.ndim - 2:
        return False
    if x.shape[-1] > _ops.MAX_CHANNELS or any(math.prod(t.shape[:-2]) > _ops.MAX_ROWS for t in tensors):
        return False
    if any(t.numel() == 0 for t in tensors):
        return False
    for mask, like in zip(masks, tensors):
        if mask is not None and (tuple(mask.shape) != tuple(like.shape[:-1]) or mask.dtype != torch.bool):
            return False
    return not torch_transformed(*tensors)


def moments(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[Any, Any]:
    """``mmfuse.moments`` as the ``mmfuse_triton::moments`` op (inputs checked); other calls
    (see :func:`_stats_kernels_take`) run the Array-API core."""
    if not _stats_kernels_take(x, axis, [mask]):
        from ..._core import align as core_align

        return core_align.moments(x, axis=axis, mask=mask, eps=eps)
    with _on_device(x):
        return _ops.moments_call(x, mask, float(eps))


def zoom_shift(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """``mmfuse.zoom_shift`` as the ``mmfuse_triton::zoom_shift`` op (inputs checked; its
    backward is the torch backend's closed form); other calls (see
    :func:`_stats_kernels_take`) go to the torch backend."""
    if not _stats_kernels_take(x, axis, [mask, guide_mask], guide):
        from .. import torch as torch_backend

        return torch_backend.zoom_shift(
            x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps
        )
    with _on_device(x):
        return _ops.zoom_shift_call(x, guide, float(alpha), mask, guide_mask, float(eps))

