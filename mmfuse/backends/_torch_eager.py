"""Eager-mode autograd binding for the torch backend's custom operators.

Each ``mmfuse::*`` op registers its autograd with ``torch.library`` (``register_autograd``),
which is what ``torch.compile`` and direct ``torch.ops`` calls use.  In eager mode that
registration runs through ``torch.library``'s Python autograd wrapper, which flattens and
rebuilds the op's nested list arguments on every call: 0.15-0.4 ms per call on the CI machine
(measured for ``lowrank_fusion`` and ``wander_collapsed``), a large share of a small step.

:func:`bind` makes, from the same op, ``setup_context`` and ``backward``, a plain
``torch.autograd.Function`` whose ``apply`` takes the op's arguments with list arguments
flattened into tensors; the op runs once, under no grad, as in the registered path.  The
registered functions see a context whose ``needs_input_grad`` has the op's argument structure
(a list of flags for a list argument), so one ``setup_context`` / ``backward`` pair serves both
bindings and the two cannot drift apart (the tests run both).

Eager calls also skip torch's dispatcher: the op's own implementation (``forward``, the
function ``torch.library.custom_op`` registered) runs directly, inside the Function when a
gradient is needed and alone when none is.  Each op has that one implementation for every
device, so nothing is bypassed but the dispatch itself: its per-call cost (about 18 us on
the CI machine for a tiny ``zoom_shift``, ``benchmarks/overhead.py`` part 3) and, on a custom
op's first dispatch, the import of ``torch._dynamo`` (2-3 s).
Under ``torch.compile`` and while a ``TorchDispatchMode`` is active (fake tensors, export,
logging modes) the registered op runs, so those see one operator with its fake
implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._namespace import torch_intercepts

__all__ = ["any_requires_grad", "bind", "direct"]


class _Slot:
    """A tensor's place in the flattened arguments."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _Slot()


class _Const:
    """A non-tensor argument (or a ``None`` in place of a tensor), passed through as is."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _flatten(args: Sequence[Any]) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """(spec, tensors): a spec entry per argument is _SLOT, a _Const, or for a list argument
    a list of _SLOT / _Const entries."""
    spec: list[Any] = []
    tensors: list[torch.Tensor] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            spec.append(_SLOT)
            tensors.append(arg)
        elif isinstance(arg, (list, tuple)):
            entries: list[Any] = []
            for item in arg:
                if isinstance(item, torch.Tensor):
                    entries.append(_SLOT)
                    tensors.append(item)
                else:
                    entries.append(_Const(item))
            spec.append(entries)
        else:
            spec.append(_Const(arg))
    return tuple(spec), tensors


def any_requires_grad(args: Sequence[Any]) -> bool:
    """True when a tensor among the arguments (or in a list or tuple argument) requires grad:
    the question :func:`_flatten` would answer, without building the spec."""
    for arg in args:
        kind = type(arg)
        if kind is float or kind is int or kind is str or arg is None:
            # the ops' options and absent masks, skipped by type: the isinstance tests below
            # cost about 0.15 us per argument (a fifth of a tiny op's dispatch)
            continue
        if isinstance(arg, torch.Tensor):
            if arg.requires_grad:
                return True
        elif isinstance(arg, (list, tuple)):
            for item in arg:
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    return True
    return False


def _rebuild(spec: Sequence[Any], flat: Sequence[Any], const: Callable[[_Const], Any]) -> list[Any]:
    """The op's arguments from the spec: flat values fill the slots, ``const`` the rest."""
    it = iter(flat)
    out: list[Any] = []
    for entry in spec:
        if entry is _SLOT:
            out.append(next(it))
        elif isinstance(entry, list):
            out.append([next(it) if e is _SLOT else const(e) for e in entry])
        else:
            out.append(const(entry))
    return out


def _flatten_grads(spec: Sequence[Any], grads: Sequence[Any]) -> list[Any]:
    """The registered backward's per-argument gradients, in the order of the tensor slots."""
    flat: list[Any] = []
    for entry, grad in zip(spec, grads):
        if entry is _SLOT:
            flat.append(grad)
        elif isinstance(entry, list):
            flat.extend((None if grad is None else grad[i]) for i, e in enumerate(entry) if e is _SLOT)
    return flat


class _Context:
    """The autograd.Function context as the registered functions expect it: attributes go to
    the real context, ``needs_input_grad`` has the op's argument structure."""

    __slots__ = ("_ctx", "needs_input_grad")

    def __init__(self, ctx: Any, needs: list[Any]) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "needs_input_grad", tuple(needs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._ctx, name, value)


def _needs(ctx: Any, spec: Sequence[Any]) -> list[Any]:
    return _rebuild(spec, ctx.needs_input_grad[1:], lambda _: False)


def direct(op: Callable[..., Any], implementation: Callable[..., Any]) -> Callable[..., Any]:
    """``implementation`` (the function a custom op registered) where nothing intercepts torch
    operations (:func:`~mmfuse._namespace.torch_intercepts`), else the op ``op``: under
    ``torch.compile`` and dispatch modes the registered op, with its fake implementation, must
    be seen, and ``torch.jit.trace`` records dispatched operators only (an implementation that
    reads the tensors' memory, NumPy or a Triton launch, would leave nothing in its graph)."""

    def call(*args: Any) -> Any:
        if torch_intercepts(torch):
            return op(*args)
        return implementation(*args)

    return call


def bind(
    name: str,
    op: Callable[..., Any],
    setup_context: Callable[[Any, tuple[Any, ...], Any], None],
    backward: Callable[..., tuple[Any, ...]],
    forward: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``call(*args)``: the op ``op`` (``torch.ops.*``) with autograd by a plain
    ``autograd.Function`` named ``name`` (its graph nodes are ``<name>Backward``), running
    ``forward`` (the op's implementation; default: the op) directly in eager mode; the op
    itself (with its registered autograd) under ``torch.compile`` or a dispatch mode."""

    run = op if forward is None else direct(op, forward)
    # without gradients: the implementation itself where direct() would call it (the checks
    # inlined: the compile check below has run already; one Python frame less per call)
    bare = op if forward is None else forward

    def forward_fn(ctx: Any, spec: tuple[Any, ...], *tensors: torch.Tensor) -> Any:
        args = tuple(_rebuild(spec, tensors, lambda c: c.value))
        out = run(*args)
        ctx.spec = spec
        setup_context(_Context(ctx, _needs(ctx, spec)), args, out)
        return out

    def backward_flat(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        grads = backward(_Context(ctx, _needs(ctx, ctx.spec)), *grad_outputs)
        return (None, *_flatten_grads(ctx.spec, grads))

    function: Any = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_fn),
            "backward": staticmethod(backward_flat),
            "__module__": __name__,
        },
    )

    def call(*args: Any) -> Any:
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return op(*args)
        if torch.is_grad_enabled() and any_requires_grad(args):
            spec, tensors = _flatten(args)
            return function.apply(spec, *tensors)
        # Nothing to differentiate: the implementation alone, in the caller's grad mode (with
        # no input requiring grad torch records nothing in either mode, so no no_grad block,
        # about 1.7 us of a tiny call); under a dispatch mode, the op (as direct())
        if torch._C._len_torch_dispatch_stack():
            return op(*args)
        return bare(*args)

    return call
