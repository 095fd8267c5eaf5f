"""What a call's inputs are, and the conditions implementations state on them.

The registry describes each call once, from its arrays' metadata (:class:`CallInfo`: the
namespace, device, dtype, element count, and for torch whether autograd will need gradients
through the call, whether a ``torch.func`` transform sees it and whether ``torch.compile`` or
a dispatch mode intercepts its torch operations), and asks each candidate implementation's *condition*
whether it can take the call.  A condition returns ``None`` when it can, else a sentence saying
what it needs (shown by :func:`mmfuse.backends.explain` and in refusals).

Conditions are named in the registry's static table (:mod:`mmfuse.backends._table`) and live
here, so that deciding never imports a backend's module: a condition that asks about an
optional framework (numba-cuda installed, its simulator) looks it up only when asked.
Nothing here imports a framework.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._extras import install_command
from .._namespace import (
    device_of,
    is_cupy,
    is_dask,
    is_numpy,
    is_torch,
    python_dispatched,
    torch_intercepts,
    torch_values_hidden,
)

__all__ = ["CONDITIONS", "CallInfo", "call_info"]


@dataclass(frozen=True)
class CallInfo:
    """A call's inputs as the registry sees them (metadata only, never values).

    ``xp`` the namespace, ``device`` and ``dtype`` those of the first floating input,
    ``size`` its number of elements (0 where unknown: Dask's unknown chunks, or while torch
    operations are intercepted); ``grad``: torch autograd will need gradients through the call
    (grad mode on and an input requires grad); ``traced``: a ``torch.func`` transform sees the
    inputs, or forward-mode AD is active (the custom ops support neither); ``intercepted``:
    ``torch.compile`` (Dynamo) traces the call, or a ``TorchDispatchMode`` is active
    (``FakeTensorMode``, export's modes, a logging mode).  The custom ops are fine there, but
    nothing may read the tensors' memory behind torch's back.  ``values_hidden``: of those,
    the calls where a copy of the values would be wrong, not merely unseen
    (:func:`~mmfuse._namespace.torch_values_hidden`: tracing), or tensors whose memory is not
    their values (:func:`~mmfuse._namespace.python_dispatched`: fake tensors, wrapper
    subclasses).
    """

    xp: Any
    device: Any
    dtype: Any
    grad: bool = False
    traced: bool = False
    size: int = 0
    intercepted: bool = False
    values_hidden: bool = False


def _instances(arrays: Iterable[Any], kind: type) -> list[Any]:
    """The arrays of type ``kind`` among ``arrays``, lists and tuples walked."""
    found: list[Any] = []
    for a in arrays:
        if isinstance(a, kind):
            found.append(a)
        elif isinstance(a, (list, tuple)):  # wander's (weight, bias) pairs, cp's factors
            found.extend(_instances(a, kind))
    return found


def call_info(xp: Any, like: Any, arrays: Iterable[Any] = ()) -> CallInfo:
    """Describe a call whose first floating array is ``like`` and whose arrays are ``arrays``."""
    if not is_torch(xp):
        size = getattr(like, "size", 0)  # NumPy, CuPy, JAX: an int; Dask: NaN when unknown
        # a JAX tracer (jax.jit, jax.grad) has no values: what the reference copies.  Any
        # of the call's arrays (parameters traced under grad, data a closure's constant: the
        # first array alone had let the reference take them, to fail in JAX's conversion; a
        # review's find)
        # (None: no JAX, or one another thread still imports; see half_imported)
        tracer = getattr(getattr(sys.modules.get("jax"), "core", None), "Tracer", None)
        traced = tracer is not None and bool(_instances([like, *arrays], tracer))
        size = size if isinstance(size, int) else 0
        return CallInfo(xp, device_of(like), like.dtype, traced=traced, size=size)
    torch = sys.modules["torch"]
    tensors = _instances(arrays, torch.Tensor) or [like]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # inside any torch.func transform, not only for its wrapped tensors: an autograd.Function
    # applied there (the custom ops' bindings) fails on plain tensors too ("must override the
    # setup_context staticmethod"), and the CPU kernels read memory that batched tensors lack
    traced = torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
    if torch_intercepts(torch):  # no (symbolic) size
        return CallInfo(xp, like.device, like.dtype, grad, traced, 0, True, torch_values_hidden(torch))
    # fake tensors outside their mode have no values either, nor do wrapper subclasses in
    # their own memory (the reference copied uninitialised memory from both; review finds)
    hidden = python_dispatched(torch, tensors)
    return CallInfo(xp, like.device, like.dtype, grad, traced, like.numel(), False, hidden)


# --------------------------------------------------------------------------- conditions


def _any(info: CallInfo) -> str | None:
    return None


def _reference(info: CallInfo) -> str | None:
    # the reference copies the data to NumPy: a tensor on torch's meta device has none, and
    # the copy carries no gradient (as torch refuses Tensor.numpy() on a tensor that requires
    # grad: its result would train nothing through it, silently)
    if getattr(info.device, "type", None) == "meta":
        return "needs arrays with values (it copies them to NumPy), not tensors on the meta device"
    if info.grad:
        return (
            "needs inputs that require no gradient (it computes in NumPy float64, which carries "
            "none): detach them or call under torch.no_grad() to compare against the reference"
        )
    if info.traced:  # a tangent or a transform's wrapping would be dropped the same way
        return (
            "cannot run on traced arrays (inside a torch.func transform, a forward-mode AD "
            "dual level, jax.jit or jax.grad): it computes in NumPy float64, which carries no "
            "tangent and needs values; call it outside them"
        )
    # (Dynamo traced its copy to NumPy on fake tensors and failed; a counting or logging
    # dispatch mode sees real values, which the reference may copy)
    if info.values_hidden:
        return (
            "cannot run on fake tensors, nor while torch.compile, torch.jit.trace or make_fx "
            "traces, nor on tensor subclasses that run their operations in Python (TwoTensor, "
            "MaskedTensor, DTensor, ...): it copies the tensors' values to NumPy; call it on plain "
            "tensors with values, outside tracing"
        )
    return None


def _numpy(info: CallInfo) -> str | None:
    return None if is_numpy(info.xp) else "needs NumPy arrays"


def _numpy_f32_f64(info: CallInfo) -> str | None:
    # its blocked buffers and in-place ufuncs keep the input's dtype: float16 goes generic,
    # which computes statistics in float32.  By the dtype's name, so in either byte order:
    # the public functions hand it ">f4" data in native order (in_native_order), where a test
    # of "float32" had sent such calls to the generic path, at three times the memory of
    # that copy (a review's find)
    if is_numpy(info.xp) and getattr(info.dtype, "name", None) in ("float32", "float64"):
        return None
    return "needs float32 or float64 NumPy arrays"


def _dask(info: CallInfo) -> str | None:
    return None if is_dask(info.xp) else "needs Dask arrays"


def _torch(info: CallInfo) -> str | None:
    return None if is_torch(info.xp) else "needs torch tensors (any device)"


def _torch_eager(info: CallInfo) -> str | None:
    # The custom ops have no batching rule and no forward-mode derivative, and functorch
    # cannot trace their eager binding: such calls take the autograd implementation instead.
    if not is_torch(info.xp):
        return "needs torch tensors (any device)"
    if info.traced:
        return "needs torch tensors outside torch.func transforms and forward-mode AD"
    return None


def _torch_traced(info: CallInfo) -> str | None:
    if not is_torch(info.xp):
        return "needs torch tensors (any device)"
    return None if info.traced else "only under torch.func transforms or forward-mode AD"


def _cupy(info: CallInfo) -> str | None:
    return None if is_cupy(info.xp) else "needs CuPy arrays (on a CUDA device)"


_CUDA_ARRAYS = "needs CuPy arrays or torch CUDA tensors on a CUDA device"


def _cuda_arrays(info: CallInfo) -> bool:
    return bool(is_cupy(info.xp)) or (
        is_torch(info.xp) and getattr(info.device, "type", None) == "cuda"
    )


def _numba_cuda_usable() -> str | None:
    if importlib.util.find_spec("numba_cuda") is None:
        return f"{_CUDA_ARRAYS}, and numba-cuda ({install_command('numba_cuda')})"
    from numba.cuda.core import config

    if config.ENABLE_CUDASIM:
        return (
            f"{_CUDA_ARRAYS}, with numba's CUDA simulator off (NUMBA_ENABLE_CUDASIM is set, so "
            "numba cannot use device memory)"
        )
    return None


def _numba_cuda(info: CallInfo) -> str | None:
    """numba's CUDA kernels: forward only, so not when autograd needs gradients."""
    if not _cuda_arrays(info):
        return _CUDA_ARRAYS
    if info.grad:
        return f"{_CUDA_ARRAYS} that need no gradient (its kernels are forward-only)"
    if info.traced or info.intercepted or info.values_hidden:  # (as the CPU kernels' refusal)
        return (
            f"{_CUDA_ARRAYS} outside torch.func transforms, forward-mode AD, torch.compile and "
            "dispatch modes, and not subclasses that run their operations in Python: the kernels "
            "read the tensors' memory (a dual tensor's tangent was dropped; a code review's find)"
        )
    return _numba_cuda_usable()


def _numba_cuda_grad(info: CallInfo) -> str | None:
    """The numba backend's answer for CUDA arrays that need gradients: the Array-API core."""
    if not _cuda_arrays(info):
        return _CUDA_ARRAYS
    return None if info.grad else f"{_CUDA_ARRAYS} that need gradients"


# numba's CPU kernels compute in float64 for 8-byte floats and in float32 for the rest
# (backends/numba.py: _cpu_lanes); wider NumPy floats (longdouble) would lose their precision
def _numba_cpu_numpy(info: CallInfo) -> str | None:
    """For NumPy arrays: None where the CPU kernels keep their dtype's precision, else why not."""
    dtype = info.dtype
    if getattr(dtype, "kind", None) == "f" and dtype.itemsize <= 8:
        return None
    return f"needs float16/float32/float64 NumPy arrays (CPU kernels), got {dtype}"


def _numba_cpu(info: CallInfo) -> str | None:
    return _numba_cpu_numpy(info) if is_numpy(info.xp) else "needs NumPy arrays (CPU kernels)"


_TORCH_CPU = "torch CPU float32/float64 tensors"
_TORCH_CPU_DTYPES = ("torch.float32", "torch.float64")


def _torch_cpu_refusal(info: CallInfo) -> str | None:
    """Why numba's CPU kernels cannot take these torch tensors (None: they can).  They read
    the tensors' memory through NumPy views (``Tensor.numpy()``, no copy), so: CPU, a dtype
    the kernels have, real data (no ``torch.func`` wrapper, no tensor Dynamo traces, no
    dispatch mode that must see every operation: fake tensors have no memory)."""
    if getattr(info.device, "type", None) != "cpu" or str(info.dtype) not in _TORCH_CPU_DTYPES:
        return f"needs {_TORCH_CPU} (CPU kernels)"
    if info.traced or info.intercepted:
        return (
            f"needs {_TORCH_CPU} outside torch.func transforms, forward-mode AD, torch.compile "
            "and dispatch modes (the kernels read the tensors' memory)"
        )
    if info.values_hidden:
        return (
            f"needs plain {_TORCH_CPU}, not subclasses that run their operations in Python "
            "(fake tensors, TwoTensor, MaskedTensor, DTensor, ...): the kernels read the tensors' "
            "memory, which is not their values"
        )
    return None


def _numba_cpu_torch(info: CallInfo) -> str | None:
    """zoom_shift's CPU kernels inside the torch op ``mmfuse::zoom_shift_numba`` (its analytic
    backward, so gradients too)."""
    if not is_torch(info.xp):
        return f"needs {_TORCH_CPU} (CPU kernels)"
    return _torch_cpu_refusal(info)


def _numba_cpu_no_grad(info: CallInfo) -> str | None:
    """moments / align: NumPy arrays, or torch CPU tensors read through NumPy views when no
    gradient is needed (the kernels are forward-only; with gradients the torch backend's
    autograd row runs the core)."""
    if is_numpy(info.xp):
        return _numba_cpu_numpy(info)
    if not is_torch(info.xp):
        return f"needs NumPy arrays or {_TORCH_CPU} (CPU kernels)"
    refusal = _torch_cpu_refusal(info)
    if refusal is None and info.grad:
        return f"needs NumPy arrays, or {_TORCH_CPU} that need no gradient (the CPU kernels are forward-only)"
    return refusal


def _triton(info: CallInfo) -> str | None:
    if not is_torch(info.xp):
        return "needs torch tensors on a CUDA device"
    interpreting = importlib.util.find_spec("triton") is not None and triton_interpreting()
    backend = sys.modules.get("mmfuse.backends.triton")
    if backend is None:  # its import will build the kernels as the variable says now
        refusal = triton_build_refusal(interpreting)
        if refusal is not None:
            return refusal
    elif interpreting != backend.INTERPRETED or triton_build_refusal(backend.INTERPRETED) is not None:
        # its kernels were built at its first import, for a GPU or for the interpreter, and the
        # variable has changed since, or triton's language was built otherwise: the backend
        # says what it takes (a call the variable alone let through ran GPU-built kernels on
        # the CPU and failed inside Triton)
        refusal = backend.supports(info.xp, info.device)
        if refusal is not None:
            return refusal
    kind = getattr(info.device, "type", None)
    if kind != "cuda" and not (interpreting and kind == "cpu"):  # (the interpreter: no meta)
        return "needs torch tensors on a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    if info.traced:
        return "needs torch tensors outside torch.func transforms and forward-mode AD"
    return None


#: The dtypes the Triton kernels are built for, as torch names them (the backend's
#: ``KERNEL_DTYPES``): ``backend="triton"`` runs calls of other dtypes through the torch
#: backend's ops or the core (:func:`_triton_delegation`), and "auto" takes the torch rows
#: for them.
TRITON_KERNEL_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


def _kernel_dtypes(conjunction: str) -> str:
    """:data:`TRITON_KERNEL_DTYPES` as prose ("float32, float16 and bfloat16")."""
    *head, last = (name.removeprefix("torch.") for name in TRITON_KERNEL_DTYPES)
    return f"{', '.join(head)} {conjunction} {last}"


def _triton_delegation(info: CallInfo) -> str | None:
    """What runs a call the Triton backend takes but its kernels do not (None: the kernels),
    said from the call's metadata: its dtype, float64 (the one floating dtype the calls take
    beside the kernels'; an integer or complex input is refused by the call's checks).  (Other
    calls it passes on, which the metadata does not show: more than eight modalities, ranks
    over its tiles, see the backend's module.)"""
    if str(info.dtype) != "torch.float64":
        return None
    return f"the kernels take {_kernel_dtypes('and')}; {info.dtype} runs the torch backend's ops or the core"


# The first input's elements from which "auto" takes the Triton kernels measured faster.  On
# an H200 they won at issue 21's sizes (2-67 M elements: the kernels' device time), and lost
# in layer steps of 1 K and 131 K elements (B = 32 and 4096, (32, 32, 128)), where the host's
# launches dominate and the torch ops launch fewer, larger operations.
TRITON_AUTO_ELEMENTS = 1 << 20
#: Element counts at which a condition's answer changes with the call's size: the registry's
#: cache of "auto" choices keys calls by them (with the rows' ``import_at``).
SIZE_THRESHOLDS = (TRITON_AUTO_ELEMENTS,)


def _triton_cuda(info: CallInfo) -> str | None:
    """The Triton rows "auto" may take: what the other Triton rows take, on a CUDA device,
    compiled (never Triton's interpreter, which serves the tests and backend="triton" on CPU
    tensors, slowly), for inputs of at least TRITON_AUTO_ELEMENTS (so not while
    torch.compile traces: no size)."""
    refusal = _triton(info)  # the same words where both refuse: the backend's message says them once
    if refusal is not None:
        return refusal
    if getattr(info.device, "type", None) != "cuda" or triton_interpreting():
        return 'needs torch CUDA tensors and TRITON_INTERPRET unset (the interpreter: backend="triton" only)'
    if str(info.dtype) not in TRITON_KERNEL_DTYPES:
        # (the Triton backend would pass the call on to the torch backend's code: the torch
        # rows take it directly, and explain() says which code runs)
        return f"needs {_kernel_dtypes('or')} tensors (the kernels' dtypes)"
    if info.size < TRITON_AUTO_ELEMENTS:
        return f"needs inputs of at least {TRITON_AUTO_ELEMENTS} elements (below, the torch ops were faster)"
    return None


# The values of TRITON_INTERPRET that turn Triton's interpreter on (its getenv_bool, read at
# each kernel launch): any other value, "0", "2" and "off" among them, leaves it off
_TRUE_WORDS = ("1", "true", "on", "yes", "y")


def triton_build_refusal(interpreting: bool) -> str | None:
    """None unless triton is imported and its language was built for the other side of
    ``interpreting`` (whether Triton's interpreter is on now): triton builds its own helpers
    (``tl.cdiv``, ...) for the interpreter or for a GPU at its first import, as
    ``TRITON_INTERPRET`` then said, and mmfuse's kernels call them, so every kernel failed
    inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel") where the
    variable was set after that import (``torch.compile`` imports triton; a review's find).
    Not imported yet: its import, by this call's, sees the variable as it is now."""
    triton = sys.modules.get("triton")
    jit = getattr(getattr(triton, "runtime", None), "JITFunction", None)
    helper = getattr(getattr(triton, "language", None), "cdiv", None)
    if jit is None or helper is None or (not isinstance(helper, jit)) == interpreting:
        return None
    if interpreting:
        return (
            "triton was first imported before TRITON_INTERPRET=1 was set (torch.compile imports "
            "it), so its language is built for a GPU; set the variable before that import, in a new "
            "process, to run the kernels on CPU tensors"
        )
    return (
        "triton was first imported with TRITON_INTERPRET=1 set, so its language is built for the "
        "interpreter; unset the variable before that import, in a new process, to run the kernels "
        "on a GPU"
    )


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on now: ``TRITON_INTERPRET`` by the rule triton itself
    reads it with (read from the environment, not ``triton.knobs``: Dynamo cannot trace its C
    getenv, and the registry asks while torch.compile traces a public function).  Read per
    call: a process may set or unset it between calls, and the plan keys and the registry's
    cache of choices hold it for that reason."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_WORDS  # (no strip: " 1" is off)


#: condition name (as the static table writes it) -> condition
CONDITIONS: dict[str, Callable[[CallInfo], str | None]] = {
    "any": _any,
    "values, no grad": _reference,
    "numpy": _numpy,
    "numpy float32/float64": _numpy_f32_f64,
    "dask": _dask,
    "torch": _torch,
    "torch, no transform": _torch_eager,
    "torch, under a transform": _torch_traced,
    "cupy": _cupy,
    "CUDA arrays, no gradient": _numba_cuda,
    "CUDA arrays needing gradients": _numba_cuda_grad,
    "numpy (CPU kernels)": _numba_cpu,
    "torch CPU (CPU kernels)": _numba_cpu_torch,
    "numpy or torch CPU, no gradient (CPU kernels)": _numba_cpu_no_grad,
    "torch CUDA tensors": _triton,
    "torch CUDA tensors, compiled kernels": _triton_cuda,
}

#: condition name -> what runs a call its rows take but do not run with their own code
#: (:func:`~mmfuse.backends.explain` says it beside "runs"); None: their own code runs it
DELEGATIONS: dict[str, Callable[[CallInfo], str | None]] = {
    "torch CUDA tensors": _triton_delegation,
}
