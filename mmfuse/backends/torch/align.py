r"""``mmfuse::align``: Zoom-and-Shift alignment of M modalities (any number of rounds, or their
exact limit) as a custom op whose closed-form backward saves only the inputs.

The forward is the Array-API core's algorithm (:func:`mmfuse._core.align.align`: statistics
once per modality, the rounds or their limit on the (B, 1, C) statistics alone, one affine map
per modality, applied about each modality's pivot), run without autograd: on CPU float32 /
float64 tensors (contiguous, masks on the CPU) over the core's NumPy primitives on NumPy views
of their memory (:func:`mmfuse._core.align.align_with` with ``NUMPY``; why, and what it
measured, in :mod:`mmfuse.backends.torch.zoom_shift`'s docstring), elsewhere in torch
operations.

What the backward of ``align`` saves, and why
----------------------------------------------
Autograd through the core keeps several x-sized arrays per modality alive from forward to
backward (the cast input, the centred values ``x - pivot``, their masked copy and squares, the
map's product).  Here ``setup_context`` saves only the inputs (the M tensors and their masks),
which the caller holds anyway; the backward recomputes each input's (B, 1, C) statistics
(the forward's own :class:`~mmfuse._core.align.Stats`: same function, same bits) and applies
the closed form below in two passes over the modalities, one at a time: pass 1 the statistics
and the sums S0, S1; then the rounds' vector-Jacobian product on the statistics alone; pass 2
dL/dx (``x - pivot`` is formed again there rather than kept from pass 1, so at most one
modality's x-sized temporaries are alive besides the gradients).  Measured on the CI machine
(M = 3, (32, 512 + 64 k, 256) float32, 54 MiB of inputs, rounds=None, with and without masks;
tensor memory from the profiler): between forward and backward autograd through the core
holds 110 MiB besides the 54 MiB of outputs, this op nothing; the peak of forward plus
backward is 204-222 MiB through the core and 129-132 MiB here (54 MiB of it the gradients).

The maths.  Per modality k (sample, channel; sums over the statistics axis; n_k the unmasked
tokens, m_k the token mask, 1 where unmasked), the core computes the statistics

.. math:: \mu_k = \tfrac{1}{n_k} \sum_t m_{k,t} x_{k,t}, \qquad
          v_k = \tfrac{1}{n_k} \sum_t m_{k,t} (x_{k,t} - \mu_k)^2

(about a pivot p_k: ``mean = pivot + corr``, ``x - mean = (x - pivot) - corr``), then
``_round_maps`` turns all modalities' :math:`(\mu_j, v_j)` into tiny per-modality maps
:math:`(s_k, \tau_k)` (scale and target mean, functions of every modality's statistics: the
rounds, or their closed-form limit), and the output is

.. math:: y_k = (x_k - \mu_k)\, s_k + \tau_k

for a modality the rounds moved, on every token, masked ones included (the core maps them
too); a modality they never moved (the hub; every modality at rounds = 0) is copied exactly,
:math:`y_k = x_k`.  With :math:`G_k = \partial L / \partial y_k`, the sums over all tokens

.. math:: S0_k = \sum_t G_{k,t}, \qquad S1_k = \sum_t G_{k,t} (x_{k,t} - \mu_k)

are :math:`\partial L / \partial \tau_k` and :math:`\partial L / \partial s_k`, and
:math:`-s_k S0_k` is the explicit derivative with respect to :math:`\mu_k` through
:math:`(x_k - \mu_k)`.  The statistics' gradients are then a vector-Jacobian product through
``_round_maps`` on the small statistics graph:

.. math:: \frac{\partial L}{\partial \mu_j} = -[j\ \mathrm{moved}]\, s_j S0_j
          + \sum_{k\ \mathrm{moved}} \Big(S1_k \frac{\partial s_k}{\partial \mu_j}
          + S0_k \frac{\partial \tau_k}{\partial \mu_j}\Big), \qquad
          \frac{\partial L}{\partial v_j} = \sum_{k\ \mathrm{moved}} \Big(S1_k
          \frac{\partial s_k}{\partial v_j} + S0_k \frac{\partial \tau_k}{\partial v_j}\Big),

computed by ``torch.autograd.grad`` after re-running the core's ``_round_maps`` (the same
code as the forward, so the rounds, the Gauss-Seidel / Jacobi schedules, hub and consensus
and the Newton-solved limit are never re-derived) on the statistics made graph inputs.
Finally, since :math:`\partial \mu_k / \partial x_{k,t} = m_{k,t} / n_k` and
:math:`\partial v_k / \partial x_{k,t} = 2 m_{k,t} (x_{k,t} - \mu_k) / n_k`,

.. math:: \frac{\partial L}{\partial x_{k,t}} = s_k G_{k,t} + \frac{m_{k,t}}{n_k}
          \Big[\frac{\partial L}{\partial \mu_k}
          + 2 (x_{k,t} - \mu_k) \frac{\partial L}{\partial v_k}\Big]

(:math:`s_k = 1` for an unmoved modality, whose map is the identity): masked tokens get only
the direct term :math:`s_k G_{k,t}`, exactly as autograd through the core gives them (the map
reaches them, the statistics do not).  As in the core, :math:`x - \mu` is formed as
:math:`(x - p) - \mathrm{corr}` (exact near the mean, whatever its size), and the forward
and this backward see the same caveats: NaN padding makes the outputs there NaN and, through
:math:`S1`, every gradient but the direct term on masked tokens (pad with finite values),
and float32 statistics overflow when the spread exceeds about 1.8e19.  Where the core's
rounding clamps a slightly negative variance to 0 (constant data to rounding), its autograd
gives no gradient through the variance; the formula above gives
:math:`2 (x - \mu) \partial L / \partial v` with :math:`x - \mu` at rounding level there.

float16 / bfloat16: the statistics and the backward run in float32 (the core's forward does
the same) and the gradients are cast back.

The backward is written in differentiable torch operations: with ``create_graph=True``
(double backward, ``gradgradcheck``) the statistics are recomputed with autograd recording,
the statistics graph's vector-Jacobian product is taken with ``create_graph=True`` about the
recorded statistics themselves, so a graph of the whole backward is built; without it
(``torch.is_grad_enabled()`` False in the backward, the usual case) nothing is recorded but
the tiny statistics graph.

Calls: eager calls go through :func:`mmfuse.backends._torch_eager.bind` (graph node
``_AlignBackward``), but for small planned CPU calls that autograd records, which run the
core under autograd (:data:`~mmfuse.backends.torch.zoom_shift.AUTOGRAD_CORE_ELEMENTS` and
:data:`AUTOGRAD_CORE_ROUND_LANES`); under
``torch.compile``, dispatch modes, and for direct ``torch.ops.mmfuse.align`` calls the
registered op and autograd run.  The op returns a list of M tensors (``Tensor[]``); the eager
binding sees the same outputs as a tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..._core.align import GENERIC, NUMPY, _round_maps, align_with, round_statistics
from ..._core.align import align as _core_align
from ..._namespace import jit_tracing, tensor_memory, torch_namespace
from .._torch_eager import bind
from ._common import cast, compute_dtype
from .zoom_shift import host_layout, on_host, plan_on_host

_XP = torch_namespace()  # the torch namespace array_namespace gives the core for torch tensors

__all__ = ["align", "align_grads", "call_align"]


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
    if on_host(xs, masks):
        return _on_numpy(xs, rounds, alpha, schedule, topology, hub, axis, masks, eps)
    return _core_align(
        list(xs), rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=list(masks), eps=eps,
    )  # fmt: skip


def _on_numpy(
    xs: Sequence[torch.Tensor],
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: Sequence[torch.Tensor | None] | None,
    eps: float,
) -> list[torch.Tensor]:
    """The forward by the core's NumPy primitives on the tensors' memory (:func:`on_host`);
    ``masks`` None: none."""
    ys = align_with(
        NUMPY, [tensor_memory(x) for x in xs], rounds=rounds, alpha=alpha, schedule=schedule,
        topology=topology, hub=hub, axis=axis,
        masks=None if masks is None else [tensor_memory(k) for k in masks], eps=eps,
    )  # fmt: skip
    return [torch.from_numpy(y) for y in ys]  # new arrays: the primitives never write an input


_align_op = torch.library.custom_op("mmfuse::align", _align_forward, mutates_args=())


@_align_op.register_fake
def _(
    xs: Any,
    rounds: Any,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: Any,
    eps: float,
) -> Any:
    return [torch.empty_like(x) for x in xs]


def _align_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    xs, rounds, alpha, schedule, topology, hub, axis, masks, eps = inputs
    # Saved: the inputs only; the statistics are recomputed (module docstring).
    ctx.options = (rounds, alpha, schedule, topology, hub, axis, eps)
    ctx.n_mod = len(xs)
    ctx.mask_at = [k is not None for k in masks]
    ctx.save_for_backward(*xs, *(k for k in masks if k is not None))


def align_grads(
    xs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    grads: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    *,
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    eps: float,
) -> list[torch.Tensor | None]:
    """dL/dx_k for the modalities with ``needs[k]``, from the upstream gradients ``grads``
    (None: zero), by the closed form of the module docstring.  Builds a graph of itself when
    grad mode is on (double backward)."""
    n = len(xs)
    graph = torch.is_grad_enabled()
    dtype = xs[0].dtype
    cdt = compute_dtype(dtype)
    ax = axis % xs[0].dim()
    gs = [None if g is None else cast(g, cdt) for g in grads]
    # Pass 1, per modality: the statistics, and S0 = sum_t G (dL/dtarget), S1 = sum_t G (x -
    # mean) (dL/ds) over all tokens (the map reaches masked ones too), with x - mean = (x -
    # pivot) - corr.  Each x - pivot is dropped once used: only one modality's x-sized
    # temporaries are alive at a time.  (S0, S1 of a modality the rounds leave unmoved go
    # unused: which are moved is known only after the rounds, which need every statistic.)
    stats: list[Any] = []
    sums: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for x, m, g in zip(xs, masks, gs):
        st = GENERIC.stats(cast(x, cdt), ax, m, keep_dev=g is not None)
        if g is None:
            sums.append(None)
        else:
            s0 = g.sum(dim=ax, keepdim=True)
            # (x - mean formed before the sum, as the forward's map: - corr * S0 folded in
            # cancelled on a constant lane; a review of the gradients)
            sums.append((s0, (g * (st.dev - st.corr)).sum(dim=ax, keepdim=True)))
        stats.append(st._replace(dev=None))

    def node(t: torch.Tensor) -> torch.Tensor:
        # with a graph of the backward: the recorded statistics themselves, so the gradients
        # found below stay functions of x; else (or for a constant input) a fresh leaf
        return t if graph and t.requires_grad else t.detach().requires_grad_()

    # the rounds' inputs as the forward's (float64 where float32 widens: round_statistics);
    # their gradients and maps come back in the compute dtype below
    wide = round_statistics(_XP, stats, rounds, alpha, topology)
    means = [node(mean) for mean, _ in wide]
    variances = [node(var) for _, var in wide]
    with torch.enable_grad():
        maps = _round_maps(_XP, list(zip(means, variances)), rounds, alpha, schedule, topology, hub % n, eps)
        maps = [(cast(s, cdt), cast(target, cdt), moved) for s, target, moved in maps]  # (recorded)
    # dL/dmean, dL/dvar: the vector-Jacobian product of the rounds (or their limit) with
    # seeds S1 for s and S0 for target, on the (B, 1, C) statistics graph
    outs, seeds = [], []
    for sk, (s, target, moved) in zip(sums, maps):
        if not moved or sk is None:
            continue
        for out, seed in ((s, sk[1]), (target, sk[0])):
            if out.requires_grad:
                outs.append(out)
                seeds.append(seed)
    d_stats: list[Any] = [None] * (2 * n)
    if outs:
        found = torch.autograd.grad(outs, [*means, *variances], seeds, allow_unused=True, create_graph=graph)
        d_stats = [None if d is None else cast(d, cdt) for d in found]
    # Pass 2, per modality: dL/dx = s G + (m / n) [dL/dmean + 2 (x - mean) dL/dvar]
    result: list[torch.Tensor | None] = []
    for k, (x, st, g, sk, (s, _, moved)) in enumerate(zip(xs, stats, gs, sums, maps)):
        if not needs[k]:
            result.append(None)
            continue
        d_mean, d_var = d_stats[k], d_stats[n + k]
        if not graph:
            s = s.detach()
        if moved and sk is not None:  # the explicit -s S0 through (x - mean)
            d_mean = -s * sk[0] if d_mean is None else d_mean - s * sk[0]
        grad: torch.Tensor | None = None
        if d_mean is not None or d_var is not None:
            zero: Any = None  # (a zero tensor only where one stands in: it is an operator)
            if d_mean is None or d_var is None:
                zero = torch.zeros((), dtype=cdt, device=x.device)
            k_mean = zero if d_mean is None else d_mean / st.count
            k_var = zero if d_var is None else 2 * d_var / st.count
            # ((x - pivot) - corr) k_var + k_mean: x - mean about the pivot (the correction
            # folded into the offset, k_mean - corr k_var, cancelled where dL/dvar is large:
            # a constant lane pulled toward others' spreads, about 1 / eps)
            grad = torch.addcmul(k_mean, (cast(x, cdt) - st.pivot) - st.corr, k_var)
            if st.mask is not None:
                grad = torch.where(st.mask, grad, 0.0)
        if g is not None:
            if not moved:  # the identity map
                grad = g if grad is None else grad + g
            else:
                grad = g * s if grad is None else torch.addcmul(grad, g, s)
        if grad is None:
            grad = torch.zeros_like(x)
        result.append(cast(grad, dtype))
    return result


def _align_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):
        grads = tuple(grads[0])  # registered autograd: the one Tensor[] output's gradients
    n = ctx.n_mod
    saved = ctx.saved_tensors
    rest = iter(saved[n:])
    masks = [next(rest) if present else None for present in ctx.mask_at]
    rounds, alpha, schedule, topology, hub, axis, eps = ctx.options
    grad_xs = align_grads(
        list(saved[:n]), masks, grads, list(ctx.needs_input_grad[0]), rounds=rounds, alpha=alpha,
        schedule=schedule, topology=topology, hub=hub, axis=axis, eps=eps,
    )  # fmt: skip
    # a list argument's gradient: one entry per tensor (all present), else None as a whole
    masks_grad = [None] * n if all(ctx.mask_at) else None
    return grad_xs, None, None, None, None, None, None, masks_grad, None


_align_op.register_autograd(_align_backward, setup_context=_align_setup_context)


def bind_align(name: str, op: Any, forward: Any) -> Any:
    """The eager binding (:func:`~mmfuse.backends._torch_eager.bind`) of an align op ``op``
    (``mmfuse::align`` here, ``mmfuse_triton::align`` in the Triton backend) whose
    implementation is ``forward``, with this module's setup_context and backward.  The
    binding's autograd.Function needs its outputs as a tuple of tensors, where the op returns a
    list (Tensor[]): both the op and its implementation are seen through tuple()."""
    return bind(
        name, lambda *args: tuple(op(*args)), _align_setup_context, _align_backward,
        lambda *args: tuple(forward(*args)),
    )  # fmt: skip


_align_eager = bind_align("_Align", torch.ops.mmfuse.align, _align_forward)


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
    """``mmfuse.align`` as the ``mmfuse::align`` custom op (inputs checked)."""
    return call_align(
        _align_eager, xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
        axis=axis, masks=masks, eps=eps,
    )  # fmt: skip


def _align_on_host(
    xs: list[Any], *, rounds: int | None, alpha: float, schedule: str, topology: str, hub: int,
    axis: int, masks: list[Any] | None = None, eps: float,
) -> list[Any]:  # fmt: skip
    """:func:`align`'s planned NumPy path (:func:`~.zoom_shift.plan_on_host`)."""
    if host_layout(xs):
        return _on_numpy(xs, rounds, alpha, schedule, topology, hub, axis, masks, eps)
    return align(
        xs, rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub, axis=axis,
        masks=masks, eps=eps,
    )  # fmt: skip


#: ``align``'s own bound on its small steps (:data:`.zoom_shift.AUTOGRAD_CORE_ELEMENTS`):
#: autograd through the core also keeps the rounds' statistics graph, about 90-150 bytes per
#: lane (a sample's channel), modality and round in float32, the limit about 240 (two rounds'
#: worth; ``python benchmarks/align_cpu.py --grad``, its second table: 93-143 at rounds 1-16
#: with 8 tokens, the data's own share included), so with few tokens
#: it outgrows the inputs (4.5x their bytes at two (512, 8, 16) modalities, one round; 46x
#: at 16 rounds; a review found 557 MiB held at (512, 2, 64), 100 rounds).  The core runs only
#: while lanes x modalities x rounds (the limit counted as 2) is at most this: at most about
#: 2 MiB of statistics graph.
AUTOGRAD_CORE_ROUND_LANES = 1 << 14


def _rounds_graph_small(xs: Sequence[Any], rounds: int | None, axis: int) -> bool:
    """Whether the rounds' statistics graph of these inputs is within
    :data:`AUTOGRAD_CORE_ROUND_LANES` (lanes: a modality's elements over its token count)."""
    steps = 2 if rounds is None else rounds
    lanes = sum(x.numel() // max(1, x.shape[axis]) for x in xs)
    return lanes * steps <= AUTOGRAD_CORE_ROUND_LANES


def _plan_align(
    xs: list[Any], *, rounds: int | None, alpha: float, schedule: str, topology: str, hub: int,
    axis: int, masks: list[Any] | None, eps: float,
) -> Any:  # fmt: skip
    """:func:`align`'s own plan (:func:`~.zoom_shift.plan_on_host`; small steps the core under
    autograd while its rounds' graph is small too, :func:`_rounds_graph_small`)."""
    core = _core_align if _rounds_graph_small(xs, rounds, axis) else None
    return plan_on_host(align, _align_on_host, xs, [] if masks is None else masks, core)


align.plan = _plan_align  # type: ignore[attr-defined]  # (mmfuse._plan.planned_impl)


def call_align(
    binding: Any,
    xs: Sequence[Any],
    *,
    rounds: int | None,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: Sequence[Any] | None,
    eps: float,
) -> list[Any]:
    """``binding`` (this op's eager binding, or one with its argument layout: the Triton
    backend's) called with ``align``'s keywords as the op's arguments, typed as its schema;
    under ``torch.jit.trace``, the core's algorithm (:func:`mmfuse._namespace.jit_tracing`)."""
    if jit_tracing(torch):
        return _core_align(
            list(xs), rounds=rounds, alpha=alpha, schedule=schedule, topology=topology, hub=hub,
            axis=axis, masks=None if masks is None else list(masks), eps=eps,
        )  # fmt: skip
    masks_list = [None] * len(xs) if masks is None else list(masks)
    out = binding(
        list(xs), None if rounds is None else int(rounds), float(alpha), str(schedule), str(topology),
        int(hub), int(axis), masks_list, float(eps),
    )  # fmt: skip
    return list(out)
