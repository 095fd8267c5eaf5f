"""The Triton backend imported for Triton's interpreter, for the test modules of its kernels.

The interpreter is chosen when triton decorates the kernels, i.e. when
``mmfuse.backends.triton`` is first imported; ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
for the whole session where no NVIDIA driver is installed, and :func:`import_interpreted` also
sets it for that import (restoring it afterwards) for sessions that did not.  If triton or the
package was already imported without it (built for a GPU), the calling module is skipped.
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
    return backend


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
