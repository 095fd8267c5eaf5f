"""Host side of the ``"triton"`` backend: launch configurations, ``torch.library.triton_op``
registrations and their analytic autograd.

Operators (namespace ``mmfuse_triton``), each a ``triton_op`` whose body (``_*_launch``)
launches its kernels through ``wrap_triton`` (so ``torch.compile`` traces into them); eager
calls run the bodies directly, as the ops do, with ``wrap_triton`` off (:func:`launching`):

- ``lowrank_fusion(xs, factors, weights, bias, append_one, present) -> Tensor``: one kernel.
- ``lowrank_fusion_backward(grad, xs, factors, weights, append_one, present, needs)
  -> Tensor[]``: "gemm" (one kernel writing G_m per batch chunk, cuBLAS products) or
  "fused" (two kernels: dL/dx; dL/dfactor and dL/dw partials), fixed-order sums either way.
- ``cp_fusion(xs, weights, factors, bias, append_one, present) -> Tensor``: one kernel; its
  backward is plain torch code (the projections are only (B, R): no memory to save).
- ``moments(x, mask, eps) -> (Tensor, Tensor)`` and ``zoom_shift(x, guide, alpha, mask,
  guide_mask, eps) -> Tensor``: one kernel each; backwards in plain torch code from the
  saved inputs (zoom_shift's is the torch backend's closed form, called, not copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
from torch.library import triton_op, wrap_triton

from ..._core.align import GENERIC, live_lanes, spread, where_live
from ..._core.sequence import torch_transformed
from ..._namespace import torch_namespace
from .._conditions import TRITON_KERNEL_DTYPES
from .._torch_eager import bind, direct
from ..torch._common import cast, compute_dtype
from ..torch.lowrank import whole_batch_grads
from ..torch.zoom_shift import _zoom_shift_backward as _torch_zoom_shift_backward
from ..torch.zoom_shift import _zoom_shift_setup_context as _torch_zoom_shift_setup_context
from . import _kernels as K

__all__ = [
    "INTERPRETED", "KERNEL_DTYPES", "MAX_MODALITIES",
    "cp_call", "lowrank_call", "moments_call", "zoom_shift_call",
]  # fmt: skip

MAX_MODALITIES = 8
#: Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when
#: triton decorated them, i.e. when this package was first imported).
INTERPRETED: bool = not isinstance(K.lowrank_fwd_kernel, triton.runtime.JITFunction)
KERNEL_DTYPES = tuple(getattr(torch, name.removeprefix("torch.")) for name in TRITON_KERNEL_DTYPES)
#: The largest rank R the low-rank and CP kernels take (larger ones delegate to the torch
#: backend).  A program's column tile holds all R ranks rounded up to a power of two, and its
#: K loop's pipelined factor slices take (stages - 1) x BLOCK_K x RANK_P elements of shared
#: memory, past the 227 KiB a block gets on an H100/H200 from R = 1025 in float32 (258 KiB
#: for the low-rank forward at R = 2048, 384 KiB for CP; a review's find) and at R = 1024 in
#: the 16-bit backward's G kernel (256 KiB, four stages), so the launch would fail
#: (OutOfResources); compiled for sm_90a without a GPU (``_compile_check``, whose cases
#: include this rank).  Ranks over 512 are rare in fusion layers (LMF's are 4 to 16).
MAX_RANK = 512
#: The most channels C the statistics kernels take (larger ones: the torch backend or the
#: core).  Their grid puts channel blocks of BLOCK_C >= 8 on CUDA's axis 1, which takes at
#: most 65535 programs (axis 0 takes the rows: :data:`MAX_ROWS`).
MAX_CHANNELS = 65535 * 8
#: The most rows (the product of the axes before the last two) the statistics kernels take:
#: a program per row on CUDA's grid axis 0, which takes at most 2**31 - 1 (larger ones, 4 GiB
#: of float16 at least: the torch backend or the core).
MAX_ROWS = 2**31 - 1
#: The largest batch the fusion kernels take: their row index (program id times the row block)
#: is 32-bit (larger ones: the torch backend).
MAX_BATCH = 2**31 - 1
#: The most elements of one rank's low-rank factor slab ((d_m + 1) h for (R, d_m + 1, h)) and of
#: a CP factor that the fusion kernels take: their offsets inside those are 32-bit (a rank's
#: start is 64-bit), so a larger slab (R = 1, d_m = 65535, h = 32768: 4 GiB of float16) read
#: at wrapped, negative offsets (a review's find, by reading; larger ones: the torch backend).
MAX_SLAB_ELEMENTS = 2**31 - 1

_WrapSwitch = Callable[[bool], Any]
_wrap_switch: _WrapSwitch | None
try:  # torch's switch of wrap_triton (private): what triton_op's own implementation turns off
    from torch._library.triton import set_wrap_triton_enabled as _wrap_switch
except ImportError:  # (a torch without it: eager calls dispatch the ops, see launching)
    _wrap_switch = None


def launching(op: Callable[..., Any], launch: Callable[..., Any]) -> Callable[..., Any] | None:
    """``launch`` (a ``triton_op``'s function) run as the op runs it: with ``wrap_triton``
    off, so that its launches go straight to the kernels.  Eager calls run it so, through
    :func:`~mmfuse.backends._torch_eager.bind`'s ``forward`` or
    :func:`~mmfuse.backends._torch_eager.direct` (``torch.compile`` and dispatch modes still
    see the op), which skips the op's dispatch: a tiny low-rank forward's host time 36 -> 17
    us on a CPU (launches recorded, not run).  Called outside the op with ``wrap_triton``
    left on, each launch would take the higher-order op's eager path, which files the launch's
    constant arguments in torch's kernel side table, one entry per launch, never removed.
    Tensor subclasses (anything but a plain tensor or parameter) get the op ``op``: their
    ``__torch_dispatch__`` must see it, where a launch would read the wrapper's memory.  None
    where torch lacks the switch: the caller then dispatches the op."""
    switch = _wrap_switch
    if switch is None:
        return None

    def run(*args: Any) -> Any:
        if not _plain_tensors(args):
            return op(*args)
        with switch(False):
            return launch(*args)

    run.__name__ = run.__qualname__ = launch.__name__
    return run


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_tensors(args: Sequence[Any]) -> bool:
    """Whether every tensor among ``args`` (or in a list argument) is a plain tensor or a
    parameter."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return False
        elif isinstance(a, list):
            for t in a:
                if isinstance(t, torch.Tensor) and type(t) not in _PLAIN:
                    return False
    return True


def bind_launch(
    name: str, op: Any, setup_context: Callable[..., None], backward: Callable[..., Any],
    launch: Callable[..., Any],
) -> Callable[..., Any]:  # fmt: skip
    """:func:`~mmfuse.backends._torch_eager.bind` of the op ``op`` with autograd, its eager
    forward ``launch`` run by :func:`launching`."""
    return bind(name, op, setup_context, backward, launching(op, launch))


def eager_op(op: Callable[..., Any], launch: Callable[..., Any]) -> Callable[..., Any]:
    """The op ``op`` as eager code calls it: :func:`launching` ``launch`` where nothing
    intercepts torch operations (:func:`~mmfuse.backends._torch_eager.direct`), else (and
    without the switch) the op."""
    run = launching(op, launch)
    return op if run is None else direct(op, run)


# The backward's dL/dfactor partials: at most this many bytes of float32 per-split buffers
# (they replace the (M, B, R h) projections LMF-style code keeps: tens of MiB against GiB).
_PARTIAL_BYTES = 64 << 20
# Programs the dL/dfactor kernel aims for: a few waves on a 132-SM H100/H200.
_TARGET_PROGRAMS = 512


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


class _Tiles(NamedTuple):
    block_b: int
    block_k: int
    block_h: int
    rank_p: int
    num_warps: int
    num_stages: int = 3  # Triton's default on CUDA (software pipelining of the K loop)


def block_k_for(dtype: torch.dtype) -> int:
    """BLOCK_K of every kernel's K loop: 16 for float32 (the FMA path of "ieee" dots keeps
    K-long operand slices per thread: 32 spilled), 32 for 16-bit inputs (tensor cores)."""
    return 32 if dtype in (torch.float16, torch.bfloat16) else 16


def column_tile(rank: int, out_dim: int, cols: int) -> tuple[int, int]:
    """(RANK_P, BLOCK_H) of a low-rank tile of about ``cols`` columns holding all ranks of
    BLOCK_H outputs: R rounded up to a power of two, and padded further where the tile would
    have fewer than 16 columns (``tl.dot``'s least)."""
    rank_p = _pow2(rank)
    block_h = max(1, min(_pow2(out_dim), cols // rank_p))
    if rank_p * block_h < 16:
        rank_p = 16 // block_h
    return rank_p, block_h


def _lowrank_tiles(rank: int, out_dim: int, n_mod: int, dtype: torch.dtype, backward: bool) -> _Tiles:
    """Tile sizes of the low-rank forward and fused-backward kernels (powers of two; every
    ``tl.dot`` operand >= 16).

    A program's tile holds BLOCK_N = RANK_P * BLOCK_H columns (all ranks of BLOCK_H
    outputs); narrow outputs pad the rank instead (h = 1, R = 4: RANK_P = 16) so the dot has
    16 columns.

    - forward, timed on an H200 (``benchmarks/gpu_tune.py``, RESULTS.md), BLOCK_N <= 128:
      float32 ("ieee" FMA dots) 4 warps over BLOCK_B * BLOCK_N = 4096 (32 x 128: 1.63 ms
      against 1.77 for the first, register-count choice 64 x 128 at 8 warps, at
      B = 65536, (32, 32, 128), h 128, R 16; 256 x 16: 0.22 against 0.35 ms at h = 1, R = 4),
      8 warps where BLOCK_N = 16 (256 x 16 at h = 1, R = 4, B = 262144: 0.191 against 0.231 ms
      at 4 warps, twenty-fifth session's sweep);
      16-bit (tensor cores) 8 warps over 16384 (128 x 128: 0.46 against 0.74 ms; 256 x 16);
      BLOCK_B from 16 (``tl.dot``'s least, for R over 1024) to 256; for M > 4 at most 64,
      and 8 warps in float32 (``ptxas``: M = 8 at 256 x 16 spilled 2.3 KB a thread in
      float32, 80 bytes in 16-bit; at 64 x 32 with 4 warps 256 bytes in float32; none as
      chosen; not timed);
    - fused backward (the "fused" path, :func:`_backward_path`): all M projection tiles live
      at once, so BLOCK_N <= 64 and BLOCK_B = 32 (16 for M > 4), 8 warps, from ``ptxas -v``
      register counts (no spills for M <= 4); its gradient dots take G_m in float32 (an
      intermediate that overflows float16), so it is sized as float32 whatever the inputs;
    - BLOCK_K: :func:`block_k_for`.
    """
    rank_p, block_h = column_tile(rank, out_dim, 64 if backward else 128)
    block_n = rank_p * block_h
    low = dtype in (torch.float16, torch.bfloat16)
    block_k = block_k_for(dtype)
    if backward:
        return _Tiles(32 if n_mod <= 4 else 16, block_k, block_h, rank_p, 8)
    many = n_mod > 4  # M = 8 at 256 x 16: 2.3 KB spilled a thread (float32), 80 bytes (16-bit)
    most = 64 if many else 256
    if low:
        return _Tiles(max(16, min(most, 16384 // block_n)), block_k, block_h, rank_p, 8)
    warps = 8 if many or block_n <= 16 else 4
    return _Tiles(min(most, max(16, 4096 // block_n)), block_k, block_h, rank_p, warps)


def _g_tiles(rank: int, out_dim: int, n_mod: int, dtype: torch.dtype) -> _Tiles:
    """Tiles of ``lowrank_bwd_g_kernel``, which holds all M projection tiles at once.  Timed
    on an H200 (``benchmarks/gpu_tune.py``): 64 x 128 at 8 warps best of five at the issue's
    wide sizes (forward+backward 9.1 ms against 9.8 for 64 x 64, float32; 7.6 against 9.3,
    bfloat16, with 13 chunks of bfloat16 dL/dF products then), 256 x 16 at 4 warps for
    h = 1, R = 4 (1.69 against 1.71 ms); for M > 4,
    32 x 64 (eight live tiles), from register counts, not timed.  The 64 x 128 tile pipelines
    its K loop 4 deep: forward+backward 1.5-2% faster in float32 and 6-8% in bfloat16 than 3
    deep at issue 21's two wide sizes (M = 3; twenty-fifth session's sweep), with 36 KB
    (float32) and 48 KB (16-bit) of shared memory at M = 3 (``_compile_check``; M = 4 not
    timed)."""
    rank_p, block_h = column_tile(rank, out_dim, 128 if n_mod <= 4 else 64)
    block_k = block_k_for(dtype)
    if n_mod > 4:
        return _Tiles(32, block_k, block_h, rank_p, 8)
    if rank_p * block_h < 64:
        return _Tiles(256, block_k, block_h, rank_p, 4)
    return _Tiles(64, block_k, block_h, rank_p, 8, 4)


#: The low-rank backward: "gemm" (G kernel + cuBLAS products), "fused" (the two recomputing
#: kernels) or None for the size rule (:func:`_backward_path`); tests and the device sweep
#: set it.
LOWRANK_BACKWARD: str | None = None


def _backward_path(rank: int, out_dim: int) -> str:
    """Which low-rank backward runs.  The fused kernels recompute the M projections twice and
    run their gradient products as small FMA dots; "gemm" recomputes them once (into G_m
    buffers) and leaves the products to cuBLAS.  H200, forward+backward
    (``benchmarks/gpu_tune.py``, before the chunking and bfloat16 dL/dF of the review fixes):
    at R h = 2048 and 4096 "gemm" took 9.1 / 12.9 ms (float32) and 7.6-11.9 / 7.0-9.2 ms
    (bfloat16, varying between machines) against the fused kernels' 31.9 / 66.6 and
    32.7 / 65.0; at R h = 4 (h = 1, R = 4, B = 262144) the fused kernels are as fast in
    float32 (1.73 against 1.69-1.71 ms) and faster in bfloat16 (1.40 against 1.78), with
    half the memory (their partials against the G_m of the whole batch).  Measured at those
    two widths only; the switch sits between them."""
    if LOWRANK_BACKWARD is not None:
        return LOWRANK_BACKWARD
    return "fused" if rank * out_dim <= 16 else "gemm"


def _precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION: float32 dots use TF32 exactly when torch's own matmuls would
    (16-bit operands go to the tensor cores with float32 accumulation whatever this says);
    "upcast" works around the interpreter's broken bfloat16 dots (see ``_kernels._dot``)."""
    if INTERPRETED and dtype == torch.bfloat16:
        return "upcast"
    if dtype == torch.float32 and tf32_matmuls():
        return "tf32"
    return "ieee"


def tf32_matmuls() -> bool:
    """Whether torch's own float32 matmuls on CUDA use TF32: ``fp32_precision`` of
    ``torch.backends.cuda.matmul`` ("none": the generic ``torch.backends.fp32_precision``'s),
    which follows the legacy ``allow_tf32`` and ``set_float32_matmul_precision`` as well;
    the legacy flag alone on a torch without it.  Not the legacy flag where the new switch
    exists: reading it raises RuntimeError once the new API has set the precision, which
    made every Triton fusion call fail (a review's find)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # (a torch before the fp32_precision switches)
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes (outputs, accumulators, partials) comes from here,
    uninitialised: the kernels never read what they have not written (the tests fill these
    with NaN to prove it)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def dense(t: torch.Tensor) -> torch.Tensor:
    """The memory a kernel may read for ``t``: contiguous, with torch's negative bit resolved
    (a ``torch._neg_view`` shares its base's memory and is negated by torch's own operators
    only; ``contiguous`` keeps the bit, so a kernel reading the raw memory saw -t)."""
    return t.resolve_neg().contiguous()


def _slots(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Eight pointer arguments of inputs: the modalities' tensors, then repeats of the first
    (the kernels never touch slots past M)."""
    return [*tensors, *([tensors[0]] * (MAX_MODALITIES - len(tensors)))]


def _out_slots(buffers: Sequence[torch.Tensor | None], like: torch.Tensor) -> list[torch.Tensor]:
    """Eight pointer arguments of buffers a kernel writes: the buffers, and one scratch
    element for each unused or unwanted slot.  A written buffer never appears twice:
    ``torch.compile`` clones the tensors a user kernel mutates and copies each clone back, so
    a repeated output would come back as the copy of an unwritten clone."""
    scratch = _empty((1,), torch.float32, like.device)
    return [scratch if b is None else b for b in buffers] + [scratch] * (MAX_MODALITIES - len(buffers))


def _dims(xs: Sequence[torch.Tensor]) -> list[int]:
    return [int(x.shape[1]) for x in xs] + [0] * (MAX_MODALITIES - len(xs))


def _present_arg(present: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, M) uint8 flags (a free view of a contiguous bool mask), or a dummy pointer."""
    if present is None:
        return like
    p = present.contiguous()
    return p.view(torch.uint8) if p.dtype == torch.bool else (p != 0).view(torch.uint8)


# --------------------------------------------------------------------------- low-rank forward


def _lowrank_launch(
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> torch.Tensor:
    x0 = xs[0]
    batch, n_mod = int(x0.shape[0]), len(xs)
    rank, _, out_dim = (int(v) for v in factors[0].shape)
    out = _empty((batch, out_dim), x0.dtype, x0.device)
    if batch == 0 or out_dim == 0:
        return out
    xs = [dense(x) for x in xs]
    factors = [dense(f) for f in factors]
    t = _lowrank_tiles(rank, out_dim, n_mod, x0.dtype, backward=False)
    grid = (triton.cdiv(batch, t.block_b) * triton.cdiv(out_dim, t.block_h),)
    wrap_triton(K.lowrank_fwd_kernel)[grid](
        out, *_slots(xs), *_slots(factors), *_dims(xs),
        x0 if weights is None else dense(weights), x0 if bias is None else dense(bias),
        _present_arg(present, x0), batch, out_dim, rank,
        M=n_mod, APPEND=append_one, HAS_W=weights is not None, HAS_BIAS=bias is not None,
        HAS_PRESENT=present is not None, BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_H=t.block_h,
        RANK_P=t.rank_p, PRECISION=_precision(x0.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out


_lowrank_op = triton_op("mmfuse_triton::lowrank_fusion", mutates_args={})(_lowrank_launch)


# --------------------------------------------------------------------------- low-rank backward


def _splits(batch: int, block_b: int, n_hblk: int, factor_elems: int) -> tuple[int, int]:
    """(S, rows per split) of the dL/dfactor kernel: enough (split, slice) programs to fill
    the device, no more float32 partials than _PARTIAL_BYTES, whole row blocks per split."""
    n_blocks = triton.cdiv(batch, block_b)
    want = max(1, min(n_blocks, triton.cdiv(_TARGET_PROGRAMS, n_hblk)))
    cap = max(1, _PARTIAL_BYTES // (4 * max(1, factor_elems)))
    splits = min(want, cap)
    rows = triton.cdiv(n_blocks, splits) * block_b
    return triton.cdiv(batch, rows), rows


def _lowrank_backward_launch(
    grad: torch.Tensor,
    xs: list[torch.Tensor],
    factors: list[torch.Tensor],
    weights: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients [x_0.., factor_0.., weights, bias] (``needs`` in that order); those not
    needed come back empty (a custom op cannot return None in a list)."""
    n_mod = len(xs)
    dtype = grad.dtype
    x0 = xs[0]
    batch = int(x0.shape[0])
    rank, _, out_dim = (int(v) for v in factors[0].shape)
    need_x, need_f = needs[:n_mod], needs[n_mod : 2 * n_mod]
    need_w = needs[2 * n_mod] and weights is not None
    need_b = needs[2 * n_mod + 1]
    g = dense(grad)
    xs = [dense(x) for x in xs]
    factors = [dense(f) for f in factors]
    w_arg = x0 if weights is None else dense(weights)
    pres = _present_arg(present, x0)
    # the gradients' dots take G_m in float32 (PRECISION32): tiles sized for float32 operands
    t = _lowrank_tiles(rank, out_dim, n_mod, torch.float32, backward=True)
    n_hblk = triton.cdiv(out_dim, t.block_h)
    common: dict[str, Any] = {
        "M": n_mod, "APPEND": append_one, "HAS_W": weights is not None, "HAS_PRESENT": present is not None,
        "BLOCK_B": t.block_b, "BLOCK_K": t.block_k, "BLOCK_H": t.block_h, "RANK_P": t.rank_p,
        "PRECISION": _precision(dtype), "PRECISION32": _precision(torch.float32), "num_warps": t.num_warps,
        "num_stages": t.num_stages,
    }  # fmt: skip

    # an empty batch or output: every gradient is a sum over nothing (no kernel runs)
    live = batch > 0 and out_dim > 0
    if live and _backward_path(rank, out_dim) == "gemm":
        return _gradients(grad, *_backward_gemm(g, xs, factors, weights, append_one, present, need_x, need_f,
                                                need_w), need_b)  # fmt: skip
    make = _empty if live else _zeros
    # dL/dx: float32 accumulators (returned as they are for float32 inputs)
    gx: list[torch.Tensor | None] = [
        make(x.shape, torch.float32, x.device) if need else None for x, need in zip(xs, need_x)
    ]
    if any(need_x) and live:
        mask = sum(1 << m for m, need in enumerate(need_x) if need)
        wrap_triton(K.lowrank_bwd_x_kernel)[(triton.cdiv(batch, t.block_b),)](
            *_out_slots(gx, g), g, *_slots(xs), *_slots(factors), *_dims(xs),
            w_arg, pres, batch, out_dim, rank, NEED_X=mask, **common,
        )  # fmt: skip

    # dL/dfactor and dL/dw: per-split float32 partials, then fixed-order sums
    gf: list[torch.Tensor | None] = [None] * n_mod
    gw = None
    if (any(need_f) or need_w) and live:
        factor_elems = sum(f.numel() for f, need in zip(factors, need_f) if need)
        splits, rows = _splits(batch, t.block_b, n_hblk, factor_elems)
        parts = [
            _empty((splits, *f.shape), torch.float32, f.device) if need else None
            for f, need in zip(factors, need_f)
        ]
        block_n = t.rank_p * t.block_h
        pw = _empty((splits * n_hblk, block_n) if need_w else (1,), torch.float32, g.device)
        mask = sum(1 << m for m, need in enumerate(need_f) if need)
        wrap_triton(K.lowrank_bwd_f_kernel)[(splits * n_hblk,)](
            *_out_slots(parts, g), pw, g, *_slots(xs), *_slots(factors),
            *_dims(xs), w_arg, pres, batch, out_dim, rank, rows, NEED_F=mask, NEED_W=need_w, **common,
        )  # fmt: skip
        # torch's reductions over a fixed shape are deterministic (no atomics): stage two
        gf = [None if p is None else (p[0] if splits == 1 else p.sum(dim=0)) for p in parts]
        if need_w:
            gw = pw.view(splits, n_hblk, t.rank_p, t.block_h).sum(dim=(0, 1, 3))[:rank]
    elif not live:
        gf = [_zeros(f.shape, torch.float32, f.device) if need else None for f, need in zip(factors, need_f)]
        gw = _zeros((rank,), torch.float32, g.device) if need_w else None

    return _gradients(grad, gx, gf, gw, need_b)


_lowrank_backward_op = triton_op("mmfuse_triton::lowrank_fusion_backward", mutates_args={})(
    _lowrank_backward_launch
)


def _gradients(grad: torch.Tensor, gx: Any, gf: Any, gw: Any, need_b: bool) -> list[torch.Tensor]:
    """The backward op's list: the gradients in the inputs' dtype, empty where not needed (a
    custom op cannot return None in a list), the bias's from ``grad``."""

    def done(v: torch.Tensor | None) -> torch.Tensor:
        return grad.new_empty((0,)) if v is None else v.to(grad.dtype)

    gb = grad.to(torch.float32).sum(dim=0) if need_b else None
    return [*(done(v) for v in gx), *(done(v) for v in gf), done(gw), done(gb)]


# G_m buffers of the "gemm" backward, per batch chunk: _G_BYTES, or a quarter of the whole
# batch's where that is more (_MAX_CHUNKS chunks at most), so they grow with the batch.  The
# whole batch's G_m are as large as the M (B, R h) projections LMF-style code keeps for its
# backward (GiB at the issue's sizes): a quarter stays within issue 21's memory target.  Each chunk costs the
# host ~8 launches per modality: on the H200 the path's time varied 7.6-12.4 ms between
# machines at B = 65536 (32, 32, 128) h 128 R 16 bfloat16 with 13 chunks of 128 MiB, where
# LMF-style code's stayed at 9.4-9.5 ms, i.e. host-bound; 4 chunks: not yet measured.
_G_BYTES = 128 << 20
_MAX_CHUNKS = 4


def _g_dtype(dtype: torch.dtype) -> torch.dtype:
    """G_m's dtype: bfloat16 for bfloat16 inputs, as two terms (hi + lo, about 16 bits: G_m
    rounded once to bfloat16 moved gradients by an ulp of theirs), so that the products run
    on tensor cores; else float32 (float16 overflowed: 9e4 where the gradient is 90)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _backward_gemm(
    g: torch.Tensor, xs: list[torch.Tensor], factors: list[torch.Tensor], weights: torch.Tensor | None,
    append_one: bool, present: torch.Tensor | None, need_x: Sequence[bool], need_f: Sequence[bool],
    need_w: bool,
) -> tuple[list[Any], list[Any], Any]:
    """(dL/dx, dL/dF, dL/dw) by ``lowrank_bwd_g_kernel`` and cuBLAS, chunk by chunk of rows:

        G_m = g w prod_{j != m} P_j       (kernel, (C, R h) per modality, P recomputed once)
        dL/dx_m[chunk] = G_m F_m^T        (F_m as (R h, d_m), copied once)
        dL/dF_m += [x_m, 1]^T G_m         (float32 accumulator (D_m, R h), chunks in order)

    Absent rows: x_m loaded as zeros (NaN stored there cannot enter), dL/dx_m zeroed.  Every
    sum runs in a fixed order (cuBLAS on one stream, chunks in sequence): bit-identical runs.
    With bfloat16 G over several chunks, dL/dF_m's products run in float32 (hi + lo added;
    on the FMA units with TF32 off, not measured on a GPU; with TF32 on, G is rounded to
    TF32's 11 bits there, still finer than the bfloat16 result): cuBLAS writes a 16-bit
    product in 16 bits, and chunk sums rounded so before they are added lost whole ulps of
    the result where they cancel (a review's find).
    """
    n_mod, x0 = len(xs), xs[0]
    batch, dtype, device = int(x0.shape[0]), g.dtype, g.device
    rank, _, out_dim = (int(v) for v in factors[0].shape)
    width = rank * out_dim
    gdt = _g_dtype(dtype)
    terms = 2 if gdt != torch.float32 else 1  # hi and lo
    need_g = [a or b for a, b in zip(need_x, need_f)]
    if not (any(need_g) or need_w):  # only the bias's gradient (the caller's): no kernel
        return [None] * n_mod, [None] * n_mod, None
    t = _g_tiles(rank, out_dim, n_mod, dtype)
    per_row = max(1, sum(need_g)) * terms * width * gdt.itemsize
    quarter = triton.cdiv(triton.cdiv(batch, _MAX_CHUNKS), t.block_b) * t.block_b
    chunk = min(batch, max(t.block_b, _G_BYTES // per_row // t.block_b * t.block_b, quarter))
    gms: list[torch.Tensor | None] = [_empty((terms, chunk, width), gdt, device) if need else None
                                      for need in need_g]  # fmt: skip
    n_hblk = triton.cdiv(out_dim, t.block_h)
    block_n = t.rank_p * t.block_h
    w_arg = x0 if weights is None else dense(weights)
    # F_m as (R h, d_m): row r h + k of G_m's columns meets F_m[r, :d_m, k]
    dims = [int(x.shape[1]) for x in xs]
    fts: list[Any] = [f[:, :d, :].permute(0, 2, 1).reshape(width, d).to(gdt) if need else None
                      for d, f, need in zip(dims, factors, need_x)]  # fmt: skip
    gx: list[Any] = [_empty((batch, d), gdt, device) if need else None for d, need in zip(dims, need_x)]
    acc: list[Any] = [_zeros((d + append_one, width), torch.float32, device) if need else None
                      for d, need in zip(dims, need_f)]  # fmt: skip
    gw = _zeros((rank,), torch.float32, device) if need_w else None
    absent = None if present is None else ~present.to(torch.bool)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        rows = stop - start
        grid = (triton.cdiv(rows, t.block_b) * n_hblk,)
        pw = _empty((grid[0], block_n) if need_w else (1,), torch.float32, device)
        wrap_triton(K.lowrank_bwd_g_kernel)[grid](
            *_out_slots(gms, g), pw, g[start:stop], *_slots([x[start:stop] for x in xs]), *_slots(factors),
            *_dims(xs), w_arg, _present_arg(None if present is None else present[start:stop], x0),
            rows, out_dim, rank, chunk * width,
            NEED_G=sum(1 << m for m, need in enumerate(need_g) if need), SPLIT=terms == 2,
            NEED_W=need_w, M=n_mod, APPEND=append_one, HAS_W=weights is not None,
            HAS_PRESENT=present is not None, BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_H=t.block_h,
            RANK_P=t.rank_p, PRECISION=_precision(dtype), num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
        if gw is not None:
            gw += pw.view(grid[0], t.rank_p, t.block_h).sum(dim=(0, 2))[:rank]
        for m, gm in enumerate(gms):
            if gm is None:
                continue
            hi = gm[0, :rows]
            lo = gm[1, :rows] if terms == 2 else None
            if need_x[m]:
                if lo is None:
                    torch.mm(hi, fts[m], out=gx[m][start:stop])
                else:  # hi's product plus lo's, rounded once (lo's own rounding is ~2^-16 of G)
                    torch.addmm(torch.mm(lo, fts[m]), hi, fts[m], out=gx[m][start:stop])
                if absent is not None:
                    gx[m][start:stop].masked_fill_(absent[start:stop, m, None], 0.0)
            if need_f[m]:
                xm = xs[m][start:stop].to(gdt)
                if absent is not None:  # NaN may be stored in absent rows
                    xm = xm.masked_fill(absent[start:stop, m, None], 0.0)
                if append_one:
                    xm = torch.cat((xm, xm.new_ones((rows, 1))), dim=1)
                if lo is None:
                    acc[m].addmm_(xm.T, hi)
                elif chunk == batch:  # one 16-bit product, rounded once (as the result is)
                    acc[m] += torch.addmm(torch.mm(xm.T, lo), xm.T, hi)
                else:  # chunks summed in float32, each product too (see the docstring)
                    acc[m].addmm_(xm.T.float(), hi.float().add_(lo))
    gf = [None if a is None else a.view(-1, rank, out_dim).permute(1, 0, 2).contiguous() for a in acc]
    return gx, gf, gw


def _save_inputs(ctx: Any, xs: Any, factors: Any, weights: Any, present: Any, append_one: bool) -> None:
    """Save the inputs (the caller holds them anyway): the backward recomputes everything
    else in-kernel, so the op keeps no (B, R h) array alive between forward and backward."""
    ctx.n_mod = len(xs)
    ctx.n_factors = len(factors)
    ctx.append_one = append_one
    ctx.has_weights = weights is not None
    ctx.has_present = present is not None
    ctx.save_for_backward(*xs, *factors, *(v for v in (weights, present) if v is not None))


def _load_inputs(ctx: Any) -> tuple[list[Any], list[Any], Any, Any]:
    saved = list(ctx.saved_tensors)
    xs, factors = saved[: ctx.n_mod], saved[ctx.n_mod : ctx.n_mod + ctx.n_factors]
    rest = saved[ctx.n_mod + ctx.n_factors :]
    weights = rest.pop(0) if ctx.has_weights else None
    present = rest.pop(0) if ctx.has_present else None
    return xs, factors, weights, present


def _lowrank_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, factors, weights, _bias, append_one, present = inputs
    _save_inputs(ctx, xs, factors, weights, present, append_one)


def _lowrank_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    n_mod = ctx.n_mod
    need_xs, need_fs, need_w, need_b = (ctx.needs_input_grad[i] for i in range(4))
    xs, factors, weights, present = _load_inputs(ctx)
    needs = [bool(v) for v in (*need_xs, *need_fs, need_w and weights is not None, need_b)]
    if torch.is_grad_enabled() or torch_transformed(grad):
        # a graph of the backward wanted (create_graph=True: gradient penalties, Hessian-vector
        # products), or a backward under vmap (batched gradients): the torch backend's
        # differentiable, out-of-place formulas, as its own op does there.  The kernels have no
        # derivative, and "auto" takes them for large CUDA calls only: without this a second
        # derivative would have worked on small inputs and raised on large ones
        grads: list[Any] = whole_batch_grads(grad, xs, factors, weights, ctx.append_one, present, needs)
    else:
        grads = _lowrank_backward_eager(grad, xs, factors, weights, ctx.append_one, present, needs)
    return (
        [grads[m] if need_xs[m] else None for m in range(n_mod)],
        [grads[n_mod + m] if need_fs[m] else None for m in range(n_mod)],
        grads[2 * n_mod] if needs[2 * n_mod] else None,
        grads[2 * n_mod + 1] if need_b else None,
        None,
        None,
    )


_lowrank_backward_eager = eager_op(torch.ops.mmfuse_triton.lowrank_fusion_backward, _lowrank_backward_launch)


_lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_context)
lowrank_call = bind_launch(
    "_TritonLowRankFusion", torch.ops.mmfuse_triton.lowrank_fusion, _lowrank_setup_context, _lowrank_backward,
    _lowrank_launch,
)  # fmt: skip


# --------------------------------------------------------------------------- CP fusion


def _cp_tiles(rank: int, out_dim: int, dtype: torch.dtype) -> _Tiles:
    """CP's product is (BLOCK_B, RANK_P) (RANK_P >= 16 for the dots); the output is written
    BLOCK_H columns at a time from it."""
    rank_p = max(16, _pow2(rank))
    block_b = max(16, min(64, _pow2_floor(8192 // rank_p)))
    block_h = max(16, min(64, _pow2(out_dim)))
    return _Tiles(block_b, block_k_for(dtype), block_h, rank_p, 4)


def _cp_launch(
    xs: list[torch.Tensor],
    weights: torch.Tensor | None,
    factors: list[torch.Tensor],
    bias: torch.Tensor | None,
    append_one: bool,
    present: torch.Tensor | None,
) -> torch.Tensor:
    x0 = xs[0]
    batch, n_mod = int(x0.shape[0]), len(xs)
    out_dim, rank = (int(v) for v in factors[-1].shape)
    out = _empty((batch, out_dim), x0.dtype, x0.device)
    if batch == 0:
        return out
    xs = [dense(x) for x in xs]
    factors = [dense(f) for f in factors]
    t = _cp_tiles(rank, out_dim, x0.dtype)
    wrap_triton(K.cp_fwd_kernel)[(triton.cdiv(batch, t.block_b),)](
        out, *_slots(xs), *_slots(factors[:-1]), *_dims(xs), factors[-1],
        x0 if weights is None else dense(weights), x0 if bias is None else dense(bias),
        _present_arg(present, x0), batch, out_dim, rank,
        M=n_mod, APPEND=append_one, HAS_W=weights is not None, HAS_BIAS=bias is not None,
        HAS_PRESENT=present is not None, BLOCK_B=t.block_b, BLOCK_K=t.block_k, BLOCK_H=t.block_h,
        RANK_P=t.rank_p, PRECISION=_precision(x0.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out


_cp_op = triton_op("mmfuse_triton::cp_fusion", mutates_args={})(_cp_launch)


def _cp_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, weights, factors, _bias, append_one, present = inputs
    _save_inputs(ctx, xs, factors, weights, present, append_one)


def _cp_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """h = C (w * prod_m P_m) + b with P_m = [x_m, 1] A_m (B, R): the projections are
    recomputed with small GEMMs and the gradients formed with prefix/suffix products (no
    division), in float32 for 16-bit inputs."""
    n_mod = ctx.n_mod
    xs, factors, weights, present = _load_inputs(ctx)
    need_xs, need_w, need_fs, need_b = ctx.needs_input_grad[:4]
    dtype = grad.dtype
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    g = grad.to(cdt)
    feats = []
    for m, x in enumerate(xs):
        x = x.to(cdt)
        if present is not None:  # where, not multiply: NaNs in absent rows must not leak
            x = torch.where(present[:, m : m + 1], x, torch.zeros((), dtype=cdt, device=x.device))
        feats.append(x)
    mats = [a.to(cdt) for a in factors]
    proj = []
    for f, a in zip(feats, mats[:-1]):
        d = f.shape[1]
        proj.append(f @ a[:d] + a[d] if ctx.append_one else f @ a)
    w = weights.to(cdt) if weights is not None else None
    prefix: list[torch.Tensor | None] = [None]
    for m in range(1, n_mod):
        prev = prefix[m - 1]
        prefix.append(proj[m - 1] if prev is None else prev * proj[m - 1])
    last = prefix[-1]
    full = proj[-1] if last is None else last * proj[-1]
    gq = g @ mats[-1]  # dL/d(w * prod) (B, R)
    grad_w = (gq * full).sum(dim=0) if (need_w and w is not None) else None
    grad_c = g.t() @ (full if w is None else full * w) if need_fs[-1] else None
    run = gq if w is None else gq * w
    grad_xs: list[torch.Tensor | None] = [None] * n_mod
    grad_as: list[torch.Tensor | None] = [None] * n_mod
    for m in range(n_mod - 1, -1, -1):
        pm = prefix[m]
        gm = run if pm is None else run * pm
        d = feats[m].shape[1]
        if need_xs[m]:
            gx = gm @ mats[m][:d].t()
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
        None if grad_w is None else grad_w.to(dtype),
        [*grad_as, None if grad_c is None else grad_c.to(dtype)],
        g.sum(dim=0).to(dtype) if need_b else None,
        None,
        None,
    )


_cp_op.register_autograd(_cp_backward, setup_context=_cp_setup_context)
cp_call = bind_launch(
    "_TritonCPFusion", torch.ops.mmfuse_triton.cp_fusion, _cp_setup_context, _cp_backward, _cp_launch
)


# --------------------------------------------------------------------------- moments / zoom_shift


class _StatTiles(NamedTuple):
    block_c: int
    block_t: int
    single: bool
    num_warps: int = 8


# zoom_shift's register tile (x's stays live through the statistics; see _stat_tiles).  8192
# from ptxas (T = 512, BLOCK_C = 32 spilled 424 bytes a thread at 8 warps); timed on an H200
# at (256, 512, 512) float32, the spilling 512 x 32 tile ran at 71% of copy bandwidth against
# 54% for 512 x 16 (and 66% at 16 warps, 31% or less looping over token blocks)
_ZOOM_SHIFT_BUDGET = 16384
# ... and at 4 warps: 73.5% and 75% of copy in two sweeps on two machines (benchmarks/gpu_tune.py),
# against 67-70% at 8 (more programs resident per SM outweigh the spills)
_ZOOM_SHIFT_WARPS = 4


def _stat_tiles(
    n_tok: int, n_ch: int, budget: int, block_c: int | None = None, num_warps: int = 8
) -> _StatTiles:
    """BLOCK_C channels per program (at most 32: 128-byte rows of float32; at least 8 while a
    narrower tile would let the token axis fit) and the whole token axis in one register tile
    when it has at most ``budget`` elements, so x is read once; else 4096-element token
    blocks.  ``budget``: 16384 for ``moments`` (from ``ptxas -v`` for sm_90a at 8 warps: 119
    registers, no spills at T = 512, BLOCK_C = 32) and for ``zoom_shift`` (timed:
    :data:`_ZOOM_SHIFT_BUDGET`).  ``block_c``: fixed by the caller (the guide shares x's).
    ``num_warps``: 8 (``moments``' register count) or :data:`_ZOOM_SHIFT_WARPS`."""
    if block_c is None:
        block_c = min(32, _pow2(n_ch))
        while block_c > 8 and _pow2(n_tok) * block_c > budget:
            block_c //= 2
    if _pow2(n_tok) * block_c <= budget:
        return _StatTiles(block_c, _pow2(n_tok), True, num_warps)
    return _StatTiles(block_c, max(1, 4096 // block_c), False, num_warps)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., T, C) -> contiguous (N, T, C), its negative bit resolved (``contiguous`` keeps
    a ``torch._neg_view``'s bit and the kernels read the raw memory: negated data)."""
    return dense(x).view(-1, x.shape[-2], x.shape[-1])


def _mask_rows(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, ..., T) bool -> contiguous (N, T) uint8 (a free view when contiguous), or a dummy."""
    if mask is None:
        return like
    return mask.contiguous().view(torch.uint8).view(-1, mask.shape[-1])


def _moments_launch(
    x: torch.Tensor, mask: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over axis -2 of a (B, ..., T, C) tensor, kept as size 1, in x's dtype."""
    shape = (*x.shape[:-2], 1, x.shape[-1])
    mean, std = _empty(shape, x.dtype, x.device), _empty(shape, x.dtype, x.device)
    rows = _rows(x)
    n_rows, n_tok, n_ch = (int(v) for v in rows.shape)
    t = _stat_tiles(n_tok, n_ch, 16384)
    wrap_triton(K.moments_kernel)[(n_rows, triton.cdiv(n_ch, t.block_c))](
        mean, std, rows, _mask_rows(mask, rows), n_tok, n_ch, eps,
        HAS_MASK=mask is not None, SINGLE=t.single, BLOCK_T=t.block_t, BLOCK_C=t.block_c,
        num_warps=t.num_warps,
    )  # fmt: skip
    return mean, std


_moments_op = triton_op("mmfuse_triton::moments", mutates_args={})(_moments_launch)


def _moments_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """Saved: the inputs only (as zoom_shift's backward); the statistics are recomputed."""
    x, mask, eps = inputs
    ctx.eps, ctx.has_mask = eps, mask is not None
    ctx.save_for_backward(x, *(() if mask is None else (mask,)))


def _moments_backward(
    ctx: Any, grad_mean: torch.Tensor | None, grad_std: torch.Tensor | None
) -> tuple[Any, ...]:
    """mean = sum_t m_t x_t / n and std = sqrt(var + eps), var = sum_t m_t (x_t - mean)^2 / n:

        dL/dx_t = (m_t / n) [G_mean + G_std (x_t - mean) / std]

    (m: mask, n: unmasked tokens; the mean's own derivative in var sums to zero), with
    x - mean = (x - pivot) - corr from the core's statistics (exact near the mean), in
    float32 for 16-bit inputs; masked tokens get exact zeros (selected, so NaN padding cannot
    leak), and where std = 0 (eps = 0, constant tokens) the std term is dropped.  Plain torch
    operations: double backward differentiates through them."""
    if not ctx.needs_input_grad[0] or (grad_mean is None and grad_std is None):
        return None, None, None
    x, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    st = GENERIC.stats(cast(x, cdt), x.dim() - 2, mask, keep_dev=True, with_mean=False)  # (mean unread)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    per_token: Any = zero
    if grad_std is not None:
        # the core's spread: at eps = 0 a lane with no spread has derivative 0, not sqrt's
        # infinite one (a double backward made it 0 * inf = NaN), as the zoom_shift ops'
        sigma = spread(torch_namespace(), st.var, ctx.eps)
        live = live_lanes(sigma, ctx.eps)  # (no test where eps rules lanes without spread out)
        k = where_live(torch, live, cast(grad_std, cdt) / where_live(torch, live, sigma, 1.0), zero)
        per_token = k * st.dev - k * st.corr
    if grad_mean is not None:
        per_token = per_token + cast(grad_mean, cdt)
    # (expand, not broadcast_to, which has no rule for autograd's batched backward)
    grad_x = (per_token / st.count).expand(x.shape)
    if st.mask is not None:
        grad_x = torch.where(st.mask, grad_x, zero)
    return cast(grad_x, dtype), None, None


_moments_op.register_autograd(_moments_backward, setup_context=_moments_setup_context)
_moments_eager = bind_launch(
    "_TritonMoments", torch.ops.mmfuse_triton.moments, _moments_setup_context, _moments_backward,
    _moments_launch,
)  # fmt: skip


def _zoom_shift_launch(
    x: torch.Tensor,
    guide: torch.Tensor,
    alpha: float,
    mask: torch.Tensor | None,
    guide_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """One Zoom-and-Shift step over axis -2 (its backward: the torch backend's closed form)."""
    y = _empty(x.shape, x.dtype, x.device)
    rows, grows = _rows(x), _rows(guide)
    n_rows, n_tok, n_ch = (int(v) for v in rows.shape)
    n_gtok = int(grows.shape[1])
    t = _stat_tiles(n_tok, n_ch, _ZOOM_SHIFT_BUDGET, num_warps=_ZOOM_SHIFT_WARPS)
    tg = _stat_tiles(n_gtok, n_ch, _ZOOM_SHIFT_BUDGET, t.block_c)
    alpha_hi = float(np.float32(alpha))  # the kernel's float32 alpha and the remainder
    alpha_lo = float(np.float32(float(alpha) - alpha_hi))
    wrap_triton(K.zoom_shift_kernel)[(n_rows, triton.cdiv(n_ch, t.block_c))](
        y, rows, grows, _mask_rows(mask, rows), _mask_rows(guide_mask, rows), n_tok, n_gtok, n_ch,
        alpha_hi, alpha_lo, eps, HAS_MASK=mask is not None, HAS_GMASK=guide_mask is not None,
        ALPHA_ONE=alpha == 1.0, SINGLE=t.single, GSINGLE=tg.single, BLOCK_T=t.block_t,
        BLOCK_GT=tg.block_t, BLOCK_C=t.block_c, num_warps=t.num_warps,
    )  # fmt: skip
    return y


_zoom_shift_op = triton_op("mmfuse_triton::zoom_shift", mutates_args={})(_zoom_shift_launch)


# The backward is the torch backend's op's (mmfuse.backends.torch.zoom_shift: the closed form
# in its module docstring, saving only the inputs), called with that op's argument layout
# (x, guide, alpha, axis, mask, guide_mask, eps); the gradients' positions (x, guide first)
# are the same in both ops.  Plain torch operations: double backward differentiates them.


def _zoom_shift_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, guide, alpha, mask, guide_mask, eps = inputs
    _torch_zoom_shift_setup_context(ctx, (x, guide, alpha, x.dim() - 2, mask, guide_mask, eps), output)


def _zoom_shift_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    grad_x, grad_g = _torch_zoom_shift_backward(ctx, grad)[:2]
    return grad_x, grad_g, None, None, None, None


_zoom_shift_op.register_autograd(_zoom_shift_backward, setup_context=_zoom_shift_setup_context)
_zoom_shift_eager = bind_launch(
    "_TritonZoomShift", torch.ops.mmfuse_triton.zoom_shift, _zoom_shift_setup_context, _zoom_shift_backward,
    _zoom_shift_launch,
)  # fmt: skip


def moments_call(x: torch.Tensor, mask: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The moments op with autograd (eager: the bound Function; compiled: the op)."""
    mean, std = _moments_eager(x, mask, eps)
    return mean, std


def zoom_shift_call(
    x: torch.Tensor, guide: torch.Tensor, alpha: float, mask: torch.Tensor | None,
    guide_mask: torch.Tensor | None, eps: float,
) -> torch.Tensor:  # fmt: skip
    """The zoom_shift op with autograd (eager: the bound Function; compiled: the op)."""
    out: torch.Tensor = _zoom_shift_eager(x, guide, alpha, mask, guide_mask, eps)
    return out
