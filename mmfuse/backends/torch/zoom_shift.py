"""``mmfuse::zoom_shift``: one Zoom-and-Shift step as a custom op whose closed-form backward
saves only the inputs.

What the backward of ``zoom_shift`` saves, and why
---------------------------------------------------
y = mu_x + s (x - mu_x) + alpha (mu_g - mu_x) with s = (sigma_g / sigma_x)^alpha, per sample
and channel.  Autograd through the Array-API core keeps several x-sized arrays (the centred
values, their squares, the cast input, x * s).  Here ``setup_context`` saves only the inputs
(x, guide, masks), which the caller holds anyway; the backward re-reads x and the guide once
for their (B, 1, C) statistics and applies the closed form (n: unmasked tokens, m: mask,
xc = x - mu_x, S0 = sum_t G, S1 = sum_t G xc over all tokens, G = dL/dy):

  dL/dx = s G + (m / n_x) [S0 (1 - alpha - s) - alpha s S1 xc / sigma_x^2]
  dL/dg = (alpha m_g / n_g) [S0 + s S1 (g - mu_g) / sigma_g^2]

(where sigma_x = 0, possible only with eps = 0, s is the constant 1 and the sigma terms
vanish).  The formulas are plain differentiable torch operations, so double backward works.
Forward and backward take xc as (x - pivot) - (mu_x - pivot) from the core's statistics (exact near
the mean, whatever its size); the map is applied about the pivot too, never folded into
x s + t.  float32 statistics overflow (inf / NaN) when the spread exceeds about 1.8e19,
since the variance exceeds float32's range: compute in float64 for such data.

Where the forward computes: CPU float32 / float64 tensors (x contiguous) run the core's NumPy
primitives (:data:`mmfuse._core.align.NUMPY`: the same algorithm, cache-blocked, threads for
large inputs) on NumPy views of the tensors' memory, no copy in, the primitives' output buffer
out; other tensors (CUDA, float16 / bfloat16, strided x, meta) run the core's generic
primitives in torch operations.  Measured on the 2-core CI machine (float32, forward only,
interleaved): the NumPy primitives took 0.75x torch's time at (4, 6, 5) (a torch operator's
fixed cost is 1.5-4 us, a NumPy ufunc's 0.3-2 us, and the step needs about 20), 0.3-0.4x from
(8, 32, 32) to (32, 128, 128), 0.5x at (16, 512, 256) and 0.25x at (64, 512, 256).  The
backward is the torch formula below either way.

Small training steps: planned eager calls on CPU float32 / float64 tensors that autograd
records, whose largest input has at most :data:`AUTOGRAD_CORE_ELEMENTS` elements, run the core's
algorithm under autograd instead of the op (:func:`plan_on_host`; ``align`` likewise): there the
op's fixed costs outweigh the memory its backward saves.

``mmfuse::zoom_shift_numba`` is the same step with the same backward, its forward numba's CPU
kernels on the tensors' memory (CPU float32/float64 tensors): what "auto" runs for torch CPU
tensors when numba is available (see :mod:`mmfuse.backends._table`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..._core.align import (
    GENERIC,
    NUMPY,
    guide_mean,
    live_lanes,
    spread,
    where_live,
    zoom_scale,
    zoom_shift_map,
    zoom_shift_with,
)
from ..._core.align import zoom_shift as _core_zoom_shift
from ..._namespace import python_dispatched, tensor_memory, torch_namespace
from .._torch_eager import any_requires_grad, bind
from ._common import cast, compute_dtype

_XP = torch_namespace()  # the torch namespace array_namespace gives the core for torch tensors

__all__ = [
    "host_kind", "host_layout", "on_host", "plan_on_host", "plan_zoom_shift_numba", "zoom_shift",
    "zoom_shift_numba",
]

_HOST_DTYPES = (torch.float32, torch.float64)

#: Planned eager calls on CPU float32 / float64 tensors that autograd records run as the core's
#: algorithm under autograd (:func:`plan_on_host`), not as the custom op, while their largest
#: input has at most this many elements (``align`` also bounds its rounds' statistics graph:
#: :data:`mmfuse.backends.torch.align.AUTOGRAD_CORE_ROUND_LANES`).  The op exists for its
#: memory: its backward keeps only the inputs; its fixed costs (the binding, re-reading the
#: inputs for their statistics, and for ``align`` a nested ``torch.autograd.grad`` through the
#: rounds) make it the slower form on the CPU.  Measured on the 2-core CI machine, a training
#: step of two float32 modalities, core / op time (``python benchmarks/align_cpu.py --grad``;
#: benchmarks/RESULTS.md, forty-eighth session), one torch thread and two:
#: ``align(rounds=1)`` 0.51-0.83 from (4, 6, 5) to 262144 elements, ``zoom_shift`` 0.92-0.99
#: up to 16384 elements and 0.46-0.80 from 32768 to 262144; at 2**19 to 2**20 elements the
#: core was still 0.46-0.92 but for single-threaded ``align`` (1.01 and 1.34).  Autograd
#: through the core keeps 1.5-2x the inputs' bytes beyond them for ``zoom_shift`` (5.9x with
#: one token per lane, whose statistics are as large as the data), counted with
#: ``saved_tensors_hooks``: a few MiB at this bound in float32; larger calls keep the op's
#: memory.  Values: the core under autograd computes in torch operations, whose last bits
#: differ (a few ulps) from the NumPy path that the same call takes without autograd, so a
#: small step's outputs are no longer bitwise those of its ``torch.no_grad()`` call.  Not on
#: other devices (not measured there; each extra operator is a kernel launch), never under
#: ``torch.compile`` (planned calls are eager); numba's op (``mmfuse::zoom_shift_numba``),
#: whose forward is its kernels, measured even with the core at these sizes (0.92-1.08) and
#: keeps its calls.
AUTOGRAD_CORE_ELEMENTS = 1 << 16


def on_host(data: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] = ()) -> bool:
    """True when a forward may run the core's NumPy primitives on these tensors' memory
    (module docstring): every tensor on the CPU, the data float32 / float64, non-empty and
    contiguous (the primitives' outputs are new C-contiguous arrays: the layout of
    ``empty_like`` of contiguous data, which the ops' fake implementations promise)."""
    return host_kind(data, masks) and host_layout(data)


def host_kind(data: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] = ()) -> bool:
    """:func:`on_host`'s conditions that a planned call's signature fixes (device, dtype,
    shape and type are in it): every tensor on the CPU and of a class with the plain tensor's
    dispatch (a wrapper subclass's memory is not its values: ``numpy()`` refuses it;
    :func:`mmfuse._namespace.python_dispatched`), the data float32 / float64 and non-empty."""
    for t in data:
        if not (t.is_cpu and t.dtype in _HOST_DTYPES) or t.numel() == 0:
            return False
    for k in masks:
        if k is not None and not k.is_cpu:
            return False
    return not python_dispatched(torch, [*data, *(k for k in masks if k is not None)])


def host_layout(data: Sequence[torch.Tensor]) -> bool:
    """:func:`on_host`'s conditions that a signature does not fix: contiguous data without the
    negative bit (``numpy()`` refuses such a view)."""
    for t in data:  # noqa: SIM110 (as above)
        if not t.is_contiguous() or t.is_neg():
            return False
    return True


def _zoom_shift_forward(
    x: torch.Tensor,
    guide: torch.Tensor,
    alpha: float,
    axis: int,
    mask: torch.Tensor | None,
    guide_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    if on_host((x, guide), (mask, guide_mask)):
        return _on_numpy(x, guide, alpha, axis, mask, guide_mask, eps)
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    ax = axis % x.dim()
    xc, gc = cast(x, cdt), cast(guide, cdt)
    g = GENERIC.stats(gc, ax, guide_mask)
    st = GENERIC.stats(xc, ax, mask, keep_dev=True, with_mean=alpha != 1.0)  # (as GENERIC.zoom_shift)
    # the core's rule, about the pivot: y = ((x - p) - corr) s + target, x - p exact near the mean
    s, target = zoom_shift_map(_XP, st, guide_mean(_XP, g, alpha), spread(_XP, g.var, eps), alpha, eps)
    # C-contiguous, as the fake says and the NumPy path gives: addcmul's layout follows its
    # broadcast operands, so a permuted x's output had other strides than the fake's, which
    # torch.compile's inductor asserts (a review's find; a no-op where it is contiguous)
    return torch.addcmul(target, st.dev - st.corr, s).to(dtype).contiguous()


def _on_numpy(
    x: torch.Tensor,
    guide: torch.Tensor,
    alpha: float,
    axis: int,
    mask: torch.Tensor | None,
    guide_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The forward by the core's NumPy primitives on the tensors' memory (:func:`on_host`)."""
    y = zoom_shift_with(
        NUMPY, tensor_memory(x), tensor_memory(guide), alpha=alpha, axis=axis, eps=eps,
        mask=tensor_memory(mask), guide_mask=tensor_memory(guide_mask),
    )  # fmt: skip
    return torch.from_numpy(y)


_zoom_shift_op = torch.library.custom_op("mmfuse::zoom_shift", _zoom_shift_forward, mutates_args=())


@_zoom_shift_op.register_fake
def _(x: Any, guide: Any, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float) -> Any:
    return x.new_empty(x.shape)  # C-contiguous (empty_like keeps a permuted x's strides)


def _zoom_shift_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, guide, alpha, axis, mask, guide_mask, eps = inputs
    # Saved: the inputs only; the (B, 1, C) statistics are recomputed (see the comment above).
    ctx.alpha, ctx.axis, ctx.eps = alpha, axis, eps
    ctx.has_mask, ctx.has_guide_mask = mask is not None, guide_mask is not None
    ctx.save_for_backward(x, guide, *(k for k in (mask, guide_mask) if k is not None))


def _zoom_shift_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, guide, *rest = ctx.saved_tensors
    mask = rest.pop(0) if ctx.has_mask else None
    guide_mask = rest.pop(0) if ctx.has_guide_mask else None
    need_x, need_g = ctx.needs_input_grad[:2]
    alpha, eps = ctx.alpha, ctx.eps
    dtype = grad.dtype
    cdt = compute_dtype(dtype)
    ax = ctx.axis % x.dim()
    xc, gc, g = cast(x, cdt), cast(guide, cdt), cast(grad, cdt)
    # (the means themselves are not read here: the centred values and the variances)
    gs = GENERIC.stats(gc, ax, guide_mask, keep_dev=True, with_mean=False)
    st = GENERIC.stats(xc, ax, mask, keep_dev=True, with_mean=False)
    m_g, n_g, g_corr, g_dev = gs.mask, gs.count, gs.corr, gs.dev
    m_x, n_x, corr, dev = st.mask, st.count, st.corr, st.dev
    # the core's spread: at eps = 0 a lane with no spread has sigma 0 with derivative 0, not
    # sqrt's infinite one, which a double backward turned into 0 * inf = NaN
    sigma_x, sigma_g = spread(_XP, st.var, eps), spread(_XP, gs.var, eps)
    # lanes without spread (their tests skipped where eps rules them out: spreads_positive)
    live = live_lanes(sigma_x, eps)
    s = zoom_scale(_XP, sigma_x, sigma_g, alpha, live)
    # centred values x - mu_x = dev - corr (dev = x - pivot, exact near the mean), formed
    # before they are summed or scaled, as the forward's map: folded in as - corr * s0 and
    # + k_var * corr they cancelled on a constant lane (exactly 0 there, where k_var may be
    # 1 / eps): 9% off in float32 for a lane of 7654321 (a review of the gradients)
    centred = dev - corr
    s0 = g.sum(dim=ax, keepdim=True)
    s1 = (g * centred).sum(dim=ax, keepdim=True)
    grad_x = grad_g = None
    if need_x:
        sx = where_live(torch, live, sigma_x, 1.0)  # two divisions: sigma**2 may leave float32's range
        k_var = where_live(torch, live, (s if alpha == 1.0 else alpha * s) * (s1 / sx) / sx, 0.0)
        per_token = (s0 * (1 - alpha - s) - k_var * centred) / n_x
        if m_x is not None:
            per_token = torch.where(m_x, per_token, 0.0)
        grad_x = cast(s * g + per_token, dtype)
    if need_g:
        ok = True if live is True else live & (sigma_g != 0)
        sg = where_live(torch, ok, sigma_g, 1.0)
        k_var = where_live(torch, ok, s * (s1 / sg) / sg, 0.0)
        per_token = s0 + k_var * (g_dev - g_corr)  # (the guide's centred values, as above)
        per_token = (per_token if alpha == 1.0 else alpha * per_token) / n_g
        if m_g is not None:
            per_token = torch.where(m_g, per_token, 0.0)
        grad_g = cast(per_token, dtype)  # full shape: (g - mu_g) broadcasts the statistics
    return grad_x, grad_g, None, None, None, None, None


_zoom_shift_op.register_autograd(_zoom_shift_backward, setup_context=_zoom_shift_setup_context)
_zoom_shift_eager = bind(
    "_ZoomShift",
    torch.ops.mmfuse.zoom_shift,
    _zoom_shift_setup_context,
    _zoom_shift_backward,
    _zoom_shift_forward,
)


# ``mmfuse::zoom_shift_numba``: the same step and the same backward, its forward the numba
# backend's CPU kernels (:func:`mmfuse.backends.numba.zoom_shift_arrays`: the core's algorithm
# over numba's primitives) on NumPy views of the tensors' memory: no copy in, the kernels'
# output buffer out.  CPU float32/float64 tensors; the registry's numba row for torch CPU
# tensors runs it (numba is imported when a call first chooses it, not here).
#
# Eager calls run the forward function itself, not the op (mmfuse.backends._torch_eager.bind):
# a custom op's first dispatch imports torch._dynamo (2-3 s on the CI machine, and triton with
# it where installed), which would dwarf numba's own one-time cost.


def _zoom_shift_numba_on_host(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any = None, guide_mask: Any = None, eps: float
) -> Any:  # fmt: skip
    """The kernels on the tensors' memory (any strides; the negative bit resolved): the op's
    forward after its checks, and :func:`zoom_shift_numba`'s planned path
    (:func:`plan_on_host`), where the public call's checks stand for the op's."""
    from ..numba import zoom_shift_arrays

    y = zoom_shift_arrays(
        tensor_memory(x), tensor_memory(guide), alpha=alpha, axis=axis, mask=tensor_memory(mask),
        guide_mask=tensor_memory(guide_mask), eps=eps,
    )  # fmt: skip
    return torch.from_numpy(y)  # the kernels' new C-contiguous array, as the fake says


def _zoom_shift_numba_forward(
    x: torch.Tensor,
    guide: torch.Tensor,
    alpha: float,
    axis: int,
    mask: torch.Tensor | None,
    guide_mask: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    # the kernels index the masks as (B', T) boolean arrays of x's and the guide's lanes,
    # unchecked: a mask of another shape or dtype, which the public call refuses but a direct
    # ``torch.ops.mmfuse.zoom_shift_numba`` call could pass, read outside it (a review's find)
    ax = axis % x.dim()
    if x.dtype not in _HOST_DTYPES or guide.dtype != x.dtype:  # (else an int32 x came back
        # truncated, in int32)
        raise TypeError(
            f"mmfuse::zoom_shift_numba: x and guide must be float32 or float64 tensors of one "
            f"dtype, got {x.dtype} and {guide.dtype}"
        )
    for name, m, like in (("mask", mask, x), ("guide_mask", guide_mask, guide)):
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != tuple(like.shape[: ax + 1])):
            raise ValueError(
                f"mmfuse::zoom_shift_numba: {name} must be a bool tensor of shape "
                f"{tuple(like.shape[: ax + 1])}, got {m.dtype} of shape {tuple(m.shape)}"
            )
    return _zoom_shift_numba_on_host(
        x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps
    )  # fmt: skip


_zoom_shift_numba_op = torch.library.custom_op(
    "mmfuse::zoom_shift_numba", _zoom_shift_numba_forward, mutates_args=(), device_types="cpu"
)


@_zoom_shift_numba_op.register_fake
def _(x: Any, guide: Any, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float) -> Any:
    # C-contiguous, as the kernels' new array (empty_like kept a transposed x's strides, which
    # opcheck and inductor compare; a review of program capture)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_zoom_shift_numba_op.register_autograd(_zoom_shift_backward, setup_context=_zoom_shift_setup_context)


_zoom_shift_numba_eager = bind(
    "_ZoomShiftNumba",
    torch.ops.mmfuse.zoom_shift_numba,
    _zoom_shift_setup_context,
    _zoom_shift_backward,
    _zoom_shift_numba_forward,
)


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
    """``mmfuse.zoom_shift`` as the ``mmfuse::zoom_shift`` custom op (inputs checked)."""
    return _zoom_shift_eager(x, guide, float(alpha), int(axis), mask, guide_mask, float(eps))


def plan_on_host(
    impl: Callable[..., Any],
    numpy_path: Callable[..., Any],
    data: Sequence[Any],
    masks: Sequence[Any],
    core: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """What a planned call of the op ``impl`` with this metadata runs (``mmfuse._plan``): where
    device, dtype and size allow the NumPy primitives (:func:`host_kind` of ``data`` and
    ``masks``) and autograd records nothing (no grad mode, or no input requiring grad: the
    eager binding's test), ``numpy_path``, which takes ``impl``'s arguments and runs the
    forward's NumPy path (checking what a signature does not fix: the NumPy primitives'
    :func:`host_layout`, else ``impl``; numba's kernels take any layout); where autograd
    records such a call and its largest input has at most :data:`AUTOGRAD_CORE_ELEMENTS`
    elements, ``core`` (the core's algorithm, taking ``impl``'s arguments, run under
    autograd), where given; else ``impl`` itself.  (About 3 us of the tiny ``zoom_shift``'s 32
    were those tests; ``numpy_path`` is a module-level function taking the arguments by name,
    since a generic ``*args, **kwargs`` wrapper and its closures cost about 1 us more a call.)"""
    if not host_kind(data, masks):
        return impl
    if torch.is_grad_enabled() and any_requires_grad(data):
        small = max(t.numel() for t in data) <= AUTOGRAD_CORE_ELEMENTS
        return core if core is not None and small else impl
    return numpy_path


def _zoom_shift_on_host(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any = None, guide_mask: Any = None, eps: float
) -> Any:  # fmt: skip
    """:func:`zoom_shift`'s planned NumPy path (:func:`plan_on_host`)."""
    if host_layout((x, guide)):
        return _on_numpy(x, guide, alpha, axis, mask, guide_mask, eps)
    return zoom_shift(x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)


def _plan_zoom_shift(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Any:
    """:func:`zoom_shift`'s own plan (:func:`plan_on_host`)."""
    return plan_on_host(zoom_shift, _zoom_shift_on_host, (x, guide), (mask, guide_mask), _core_zoom_shift)


zoom_shift.plan = _plan_zoom_shift  # type: ignore[attr-defined]  # (mmfuse._plan.planned_impl)


def zoom_shift_numba(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> Any:
    """``mmfuse.zoom_shift`` of torch CPU float32/float64 tensors as ``mmfuse::zoom_shift_numba``
    (numba's CPU kernels forward, the analytic backward; inputs checked)."""
    return _zoom_shift_numba_eager(x, guide, float(alpha), int(axis), mask, guide_mask, float(eps))


def plan_zoom_shift_numba(
    x: Any, guide: Any, *, alpha: float, axis: int, mask: Any, guide_mask: Any, eps: float
) -> Any:
    """:func:`zoom_shift_numba`'s plan (:func:`plan_on_host`), for the numba backend's
    ``zoom_shift_cpu`` (the registry's row), whose plan it is for torch tensors."""
    return plan_on_host(zoom_shift_numba, _zoom_shift_numba_on_host, (x, guide), (mask, guide_mask))

