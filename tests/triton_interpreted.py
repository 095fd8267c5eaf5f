"""The Triton backend imported for Triton's interpreter, for the test modules of its kernels.

The interpreter is chosen when triton decorates the kernels, i.e. when
``mmfuse.backends.triton`` is first imported; ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
for the whole session where no NVIDIA driver is installed, and :func:`import_interpreted` also
sets it for that import (restoring it afterwards) for sessions that did not.  If triton or the
package was already imported without it (built for a GPU), the calling module is skipped.

The interpreter truncates float32 to bfloat16 (triton 3.9's ``cast_impl`` passes no rounding
mode), where a GPU's conversion rounds to nearest even: about half of a kernel's bfloat16
outputs came out an ulp low, so "rounded once" could not be checked here.  The interpreted
process rounds that cast to nearest even, as the GPU does (:func:`_bfloat16_to_nearest`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest


def import_interpreted() -> Any:
    """``mmfuse.backends.triton`` with its kernels built for the interpreter, or a module skip.

    Triton builds its own ``triton.language`` helpers (``tl.cdiv``, ``tl.sum``, ...) as
    interpreted or compiled functions when it is first imported, and our kernels when the
    backend is first imported; both must have seen the variable."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(triton.language.cdiv, InterpretedFunction):
            pytest.skip(
                "triton was imported earlier in this process without TRITON_INTERPRET=1, so its "
                "kernels cannot run on CPU here; run this file on its own (or set TRITON_INTERPRET=1)",
                allow_module_level=True,
            )
        import mmfuse.backends.triton as backend
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    if not backend.INTERPRETED:
        pytest.skip(
            "mmfuse.backends.triton was imported earlier in this process without TRITON_INTERPRET=1 "
            "(its kernels are built for a GPU); run this file on its own",
            allow_module_level=True,
        )
    _bfloat16_to_nearest()
    return backend


#: Whether the interpreter's float32 -> bfloat16 cast rounds to nearest even in this process.
BFLOAT16_TO_NEAREST = False


def _bfloat16_to_nearest() -> None:
    """The interpreter's float32 -> bfloat16 cast rounded to nearest even (torch's
    conversion, the GPU's rule) instead of truncated; other casts as they were.  Once per
    process; nothing where the interpreter's builder has another shape (another triton),
    where :data:`BFLOAT16_TO_NEAREST` stays False and the tests that need it skip."""
    global BFLOAT16_TO_NEAREST
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    truncating = getattr(builder, "cast_impl", None)
    if BFLOAT16_TO_NEAREST or truncating is None or not hasattr(interpreter, "TensorHandle"):
        return

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data)  # (the interpreter keeps bfloat16 as uint16)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(data.shape), dst_type.scalar)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl
    BFLOAT16_TO_NEAREST = True


def share_not_rounded_once(got: Any, exact: Any) -> float:
    """The share of ``got``'s entries (a bfloat16 or float16 tensor) that are not ``exact``
    (float64 NumPy, the maths on ``got``'s rounded inputs) rounded to ``got``'s dtype (through
    float32: a second rounding, which differs from one only where float32 lands on a 16-bit
    midpoint, about 2**-16 of values).  A kernel computing in float32 and rounding once misses
    a few in ten thousand (where the float32 value and the exact one straddle a rounding
    boundary); truncation, or rounding an intermediate to 16 bits, misses a good share."""
    import torch

    once = torch.from_numpy(exact).to(torch.float32).to(got.dtype)
    return float((got.detach().cpu() != once).double().mean())


@contextlib.contextmanager
def poisoned_buffers() -> Iterator[None]:
    """Every buffer the Triton ops allocate (outputs, accumulators, partials: through
    ``_ops._empty``) starts as NaN, so a kernel that leaves an entry unwritten fails."""
    from mmfuse.backends.triton import _ops

    real = _ops._empty

    def nan_empty(shape: Any, dtype: Any, device: Any) -> Any:
        return real(shape, dtype, device).fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ops, "_empty", nan_empty)
        yield


def neg_bit_runs(call: Any, tensors: list[Any], upstream: Any) -> Iterator[tuple[list[Any], list[Any]]]:
    """Pairs of runs of ``call(inputs)`` (its output and its gradients with respect to the
    inputs' negations): one input, then the upstream gradient, given as a ``torch._neg_view``
    (memory holding -v, read as v by torch's operators, not by a kernel reading the raw
    memory), against the same values as plain tensors.  One at a time: with every input a
    view, a kernel reading them all negated can get the right answer by symmetry (an even
    number of negated factors)."""
    import torch

    bases = [(-t).detach().requires_grad_(True) for t in tensors]
    for which in range(len(bases) + 1):  # the last: the upstream gradient

        def run(view: Any, which: int = which) -> list[Any]:
            ins = [view(t) if i == which else -t for i, t in enumerate(bases)]
            out = call(ins)
            up = view(-upstream) if which == len(bases) else upstream
            return [out, *torch.autograd.grad(out, bases, up)]

        yield run(torch._neg_view), run(torch.neg)
