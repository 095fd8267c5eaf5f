"""Plan once per call signature: what a call's metadata decides, decided once.

Every check mmfuse makes at its public boundary reads metadata only (types, shapes, dtypes,
devices, options; :mod:`mmfuse._validation`), and so does the registry's choice of an
implementation (:mod:`mmfuse.backends._registry`).  So for a call whose *signature* (that
metadata, the options and the dispatch policy) has been seen before, both answers are known:
a public function looks its signature up here and, on a hit, calls the implementation it
chose last time, skipping validation and dispatch (the way opt_einsum caches contraction
paths and einops its recipes).  A miss runs the full checks, whose errors are exactly those of
an uncached call; only a call that passed them is remembered, so nothing bad is cached.

What a signature holds (:func:`_append_keys`): per array its type, shape and dtype, and, for
arrays of other namespaces than NumPy, its device; for torch tensors also ``requires_grad``
and the layout, for Dask arrays their chunks and their chunks' type.
Per call (:func:`policy_key`): the backend policy in force (the ``backend=`` keyword, the
configured backend and preference), which optional frameworks are imported (what "auto" may
choose from), the registry's generation (bumped by ``register``/``unregister``), and for torch
whether autograd records (grad mode) and whether forward-mode AD is active (the registry's
``grad`` and ``traced``).  Options enter with their types, so that
``append_one=1`` (refused: not a bool) never matches a plan made for ``True``.

An implementation may plan its own calls too: one with a ``plan`` attribute is asked, once
per signature, which function to run for calls with this metadata (:func:`planned_impl`; the
torch backend's choices by batch size, stackable modalities, autograd and the tensors' device
and dtype), so those choices are not remade on every call.

Calls are never planned while ``torch.compile`` traces them (Dynamo traces the checks as
before), while a torch dispatch mode is active, or inside a ``torch.func`` transform (whose
wrapped tensors the registry tells apart from plain ones of the same shape); a signature
that cannot be formed (an argument that is not an array, an unhashable option) simply runs
the full path every time, where the checks report it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ._config import backend_policy
from ._namespace import committed, device_key, half_imported, torch_intercepts
from .backends._conditions import triton_interpreting
from .backends._registry import generation

__all__ = ["PlanCache", "call_key", "planned_impl", "policy_key"]

T = TypeVar("T")

# Plans kept per operator; a program that keeps making new shapes (e.g. a growing batch)
# starts over rather than growing without bound.
MAX_PLANS = 1024


class PlanCache:
    """Plans of one operator by signature (bounded at :data:`MAX_PLANS`).

    A None key (a call that is not planned: under ``torch.compile``, a signature that cannot
    be formed) never reaches the dict.  That is for Dynamo: it guards on every entry of a dict
    it sees, so caches holding the plans of many eager calls made tracing the public
    functions many times slower (after 1000 eager calls of other shapes: 3 s -> 73 s,
    ``benchmarks/compile_plans.py``); an object whose dict it never reads costs one guard.
    """

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        self._plans: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def get(self, key: Any) -> Any:
        """The plan remembered for ``key``, or None (also for a key that cannot be hashed: an
        unhashable option, which the call's checks then report or accept unplanned)."""
        if key is None:
            return None
        try:
            return self._plans.get(key)
        except TypeError:
            return None

    def plan(self, key: Any, make: Callable[..., T], *args: Any) -> T:
        """The plan for ``key``; on a miss ``make(*args)`` (the checks and the dispatch,
        which raise for a bad call), remembered."""
        plan = self.get(key)
        if plan is None:
            plan = self.remember(key, make(*args))
        return plan

    def remember(self, key: Any, plan: T) -> T:
        """Keep ``plan`` for ``key`` (nothing for a None key, nor where torch's forward-mode AD
        level moved since the key was formed: :func:`_forward_ad_moved`); returns ``plan``."""
        if key is not None and not _forward_ad_moved(key):
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            with contextlib.suppress(TypeError):  # an unhashable key: the call stays unplanned
                self._plans[key] = plan
        return plan


def _forward_ad_moved(key: Any) -> bool:
    """Whether torch's forward-mode AD level, which ``key``'s policy recorded
    (:func:`policy_key`), is another now.  torch keeps that level per process, not per thread
    (grad mode is per thread): another thread entering or leaving ``dual_level`` between this
    call's key and its choice made the choice under the other state, and the plan, filed under
    the key, ran the custom op for later dual tensors and dropped their tangents (a
    concurrency review's find, reproduced by delaying the choice).  Such a plan runs once,
    unkept."""
    policy = key[0] if type(key) is tuple and key else None
    torch_state = policy[3] if type(policy) is tuple and len(policy) == 5 else None
    if torch_state is None:
        return False
    return bool(sys.modules["torch"].autograd.forward_ad._current_level != torch_state[1])


# Type -> whether it is a torch tensor type, remembered on first sight (sys.modules and
# issubclass are a few times the cost of this lookup)
_TORCH_TYPES: dict[type, bool] = {}


def _torch_type(t: type) -> bool:
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    if len(_TORCH_TYPES) >= 256:  # a few types per program, but classes made on the fly must
        _TORCH_TYPES.clear()  # not pile up (nor be kept alive) for good
    _TORCH_TYPES[t] = answer = tensor is not None and issubclass(t, tensor)
    return answer


def _append_keys(arrays: Any, out: list[Any]) -> None:
    """Append the arrays' signature to ``out``, flat (no tuple or Python call per NumPy array:
    a tiny call's signature has a dozen arrays, and the keys were a fifth of its planned
    time): a NumPy array as its shape and dtype, a list or tuple as its type and length
    followed by its elements, None as None, any other array as a tuple (type, shape, dtype,
    device; for torch tensors also ``requires_grad`` and layout, for others their ``chunks``
    and ``_meta``'s type where they have them: Dask's).  Unambiguous read left
    to right, since each kind starts with an entry of its own kind: a shape is a tuple of
    ints, a sequence starts with the type list or tuple, other arrays' tuples start with
    their type."""
    for a in arrays:
        t = type(a)
        if t is np.ndarray:
            out.append(a.shape)
            out.append(a.dtype)
        elif t is list or t is tuple:
            out.append(t)
            out.append(len(a))
            _append_keys(a, out)
        elif a is None:
            out.append(None)
        elif (known := _TORCH_TYPES.get(t)) or (known is None and _torch_type(t)):
            # (the table read once: a second read could see another thread's entry filed
            # meanwhile and take a tensor for another array, whose key has no requires_grad,
            # so that a tensor needing grad met a no-grad plan; a review's find)
            # the layout too: the checks refuse a sparse tensor, so it must not meet a dense
            # one's plan
            out.append((t, a.shape, a.dtype, a.device, a.requires_grad, a.layout))
        else:  # CuPy, JAX, Dask, array-api-strict, ...: the device where they have one, and
            # a Dask array's chunks (the size checks count its largest batch chunk: a plan of
            # fine chunks must not pass coarse ones of the same shape) and its chunks' type
            # (masked chunks are refused: a plan of plain ones must not pass them)
            device = device_key(getattr(a, "device", None))
            chunks = getattr(a, "chunks", None)
            meta = None if chunks is None else type(getattr(a, "_meta", None))
            out.append((t, a.shape, a.dtype, device, chunks, meta, committed(a)))


def call_key(backend: Any, options: tuple[Any, ...], *arrays: Any) -> Any:
    """A call's signature: its dispatch state (:func:`policy_key`), its ``options`` followed
    by their types (``options`` has one length per plan cache: one per public function, and
    the layers' cache starts it with the layer's class), and its arrays' metadata (flat,
    :func:`_append_keys`); None when the call must not be planned or the arrays make no key
    (the call then runs unplanned, and its checks say what is wrong).  The key is not hashed
    here: the plan cache's lookup hashes it once, and takes an unhashable one as unplanned."""
    policy = policy_key(backend)
    if policy is None:
        return None
    parts = [policy, *options, *map(type, options)]
    try:
        _append_keys(arrays, parts)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # (a nested tensor's sizes)
        return None
    return tuple(parts)


def policy_key(backend: Any) -> Any:
    """The dispatch state a plan depends on, or None while ``torch.compile`` traces (never
    plan there).  See the module docstring."""
    modules = sys.modules
    # (torch looked up: ``sys.modules["torch"] = None``, the usual way to block an import, is
    # no torch)
    torch = modules.get("torch")
    torch_state: Any = None
    if torch is not None:
        try:
            if _torch_intercepts(torch):  # first: nothing below is read while Dynamo traces
                return None
            torch_state = (torch.is_grad_enabled(), torch.autograd.forward_ad._current_level)
        except AttributeError:
            if not half_imported(torch):
                raise
            # another thread imports torch: wait for it to end, as ``import torch`` does, so
            # that this call's later reads of torch (its checks, isinstance tests) find it whole
            importlib.import_module("torch")
            if not half_imported(torch):
                return policy_key(backend)
            # still half built: this thread's own import of torch called mmfuse (an import
            # hook, a plugin torch loads), where the import statement returns the partial
            # module at once; no tensor exists yet: planned without torch (a diff review's find)
    # which optional frameworks are imported (what "auto" may choose from), each as its entry
    # in sys.modules stands: the module, None (an import blocked, ``sys.modules["numba"] =
    # None``) or absent (0).  Three states, not "imported or not": a plan made while numba
    # was blocked outlived its unblocking, both before numba's import (the plan's fallback
    # kept where "auto" or ``prefer="numba"`` would import it) and after (review finds).
    # Spelt out, as six tests cost a third of ``tuple(map(modules.__contains__, names))``;
    # Dask and JAX arrays cannot exist while theirs is blocked
    frameworks = (modules.get("torch", 0), modules.get("numba", 0), modules.get("cupy", 0),
                  modules.get("triton", 0), "dask" in modules, "jax" in modules)  # fmt: skip
    try:
        names = backend_policy(backend)
    except (TypeError, ValueError):  # a bad backend= : the unplanned path reports it
        return None
    # a policy naming triton (backend= or prefer=) takes CPU tensors only while Triton's
    # interpreter is on, which its conditions read per call (a plan made with it on ran the
    # interpreter after it was unset).  Only there: an environment read costs 0.5 us.  "auto"
    # takes the Triton rows for CUDA tensors alone, and only with the variable unset (the
    # registry's key holds it); its plans do not, so one made under either setting keeps its
    # choice when the variable changes: the compiled kernels (built at triton's import, which
    # the variable no longer changes) or the torch op, both right for CUDA tensors.
    interpreting = "triton" in names and triton_interpreting()
    # (by position: _forward_ad_moved reads torch_state, the fourth)
    return (names, frameworks, generation(), torch_state, interpreting)


def _torch_intercepts(torch: Any) -> bool:
    """Whether torch operations are intercepted now, so that no call may be planned: while
    Dynamo or ``torch.jit.trace`` traces, under a TorchDispatchMode (FakeTensorMode, export,
    logging modes), which the registry's choice depends on, or inside a torch.func transform,
    where the choice depends on whether each tensor is wrapped by it (a plain tensor may take
    the custom op or the CPU kernels, a batched or differentiated one of the same shape may
    not), which a key of types, shapes and dtypes cannot see.  (``torch.jit.trace`` records
    dispatched operators only: a plan's direct NumPy path or kernel launch would leave
    nothing in its graph.)"""
    return torch_intercepts(torch) or bool(torch._C._are_functorch_transforms_active())


def planned_impl(impl: Callable[..., T], args: tuple[Any, ...], options: dict[str, Any]) -> Callable[..., T]:
    """What a plan calls in place of the chosen implementation ``impl``: ``impl`` itself, or,
    where it plans its own calls (a ``plan`` attribute), ``impl.plan(*args, **options)``: a
    function taking ``impl``'s arguments, chosen from this call's metadata (``args``, the
    call's arrays as ``impl`` takes them, and ``options``, its keywords).  Only metadata that
    a signature holds may decide the choice (:func:`call_key`), since every later call of the
    same signature runs it; anything else (strides, values) the chosen function checks itself.
    """
    plan = getattr(impl, "plan", None)
    if plan is None:
        return impl
    # an unplanned call (its policy key is None) runs the implementation itself: its own plan
    # assumes what a planned call guarantees, no tracing, dispatch mode or transform
    torch = sys.modules.get("torch")
    if torch is not None and not half_imported(torch) and _torch_intercepts(torch):
        return impl
    return plan(*args, **options)
