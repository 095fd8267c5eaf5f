"""The dispatcher: which implementation of which operator runs for which inputs.

The one place that decides.  Operators and their signatures come from the leaf catalogue
(:mod:`mmfuse.backends._catalogue`); mmfuse's own implementations from the static table
(:mod:`mmfuse.backends._table`), whose rows name a function (imported only when its row is
chosen), the condition it sets on the call (:mod:`mmfuse.backends._conditions`) and a
priority.  Users may add implementations with :func:`register`; such a row replaces the
built-in rows of its backend for its operator.

A call is described once (:func:`~mmfuse.backends._conditions.call_info`: namespace, device,
dtype, autograd state) and the choice is cached on that description, the policy and the set
of optional frameworks imported, so a call like a previous one costs a dictionary lookup.
Nothing here depends on import order: ``import mmfuse`` registers nothing and imports no
optional framework; a backend's module is imported when one of its rows is first chosen
(under ``"auto"``: once the user has imported its framework, or, for rows the table marks
with ``import_at``, for a call of at least that many elements).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from typing import Any, overload

from .._config import BACKEND_NAMES, backend_policy, config_source
from .._extras import install_hint
from .._namespace import array_namespace, device_key, first_floating, half_imported, is_array, namespace_name
from ._catalogue import CALL_SIZES, OPERATORS, Signature, cp_pair
from ._conditions import CONDITIONS, DELEGATIONS, SIZE_THRESHOLDS, CallInfo, call_info, triton_interpreting
from ._table import FRAMEWORKS, ROWS, Row

__all__ = [
    "BackendUnsupported",
    "Explanation",
    "Implementation",
    "available",
    "choose",
    "define_op",
    "explain",
    "implementations",
    "installed",
    "lookup",
    "register",
    "unavailable",
    "unregister",
]


class BackendUnsupported(TypeError, ValueError):
    """A backend, forced by name, cannot run an operator on the given inputs.

    One type for every refusal, so callers (the CLI among them) catch it by type, not by
    message.  It derives from ``TypeError`` (the inputs are of a kind the backend does not
    take) and, for code written before it existed, from ``ValueError`` (what a backend
    without the operator used to raise).
    """


Supports = Callable[[Any, Any], "str | None"]
Condition = Callable[[CallInfo], "str | None"]


@dataclass(frozen=True)
class Implementation:
    """One implementation of an operator.

    ``supports(xp, device)`` answers from the namespace and device alone (the form
    :func:`register` takes); ``condition(info)`` from the whole ``CallInfo`` (autograd
    state too).  Both return ``None`` when the implementation can take the call, else what it
    needs.
    """

    op: str
    backend: str
    func: Callable[..., Any]
    supports: Supports
    priority: int
    variant: str = "registered"
    condition: Condition | None = field(default=None, compare=False)

    def refusal(self, info: CallInfo) -> str | None:
        if self.condition is not None:
            return self.condition(info)
        answer = self.supports(info.xp, info.device)
        if answer is not None and not isinstance(answer, str):
            raise TypeError(
                f"the supports callable registered for {self.backend}'s {self.op} must return None "
                f"or a str (why it cannot take the call), got {type(answer).__name__}"
            )
        return answer


# operators declared at run time by define_op (a user's own operators), beside the catalogue's
_EXTRA_OPS: dict[str, Signature] = {}
# (op, backend) -> an implementation added by register(); it replaces that backend's rows
_REGISTERED: dict[tuple[str, str], Implementation] = {}
# table rows resolved to implementations (their modules imported)
_RESOLVED: dict[Row, Implementation] = {}
# backend -> why its module could not be imported
_plugin_errors: dict[str, str] = {}
_failed_modules: dict[str, str] = {}  # backend -> the module whose failure _plugin_errors holds
_ABSENT = object()  # (sys.modules.get's default: a module absent, not blocked)
# framework -> why its import failed though it is installed (:func:`_framework_refusal`)
_broken_frameworks: dict[str, str] = {}
# (op, policy, namespace, device, dtype, grad, traced, intercepted, imported frameworks and size
# class under "auto") -> implementation
_CHOICES: dict[tuple[Any, ...], Implementation] = {}
# Bumped whenever registrations change, or a framework's import fails (_framework_refusal), so
# that plans made before (mmfuse._plan) are not reused.
_generation = [0]
# Importing a backend's module takes turns: another thread may be half-way through it.
_lock = threading.RLock()


def _new_lock_in_child() -> None:
    """A forked child's own lock: one held by another thread of the parent at the fork
    (registering a backend) would stay held in the child, whose first dispatch would then
    wait for it for ever (a review's find)."""
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_new_lock_in_child)

# Optional frameworks in a fixed order, for the cache key of "auto" choices.
_OPTIONAL = tuple(sorted({fw for fw in FRAMEWORKS.values() if fw is not None}))
# The size classes of the cache key of "auto" choices: the element counts at which "auto" may
# import a framework (rows' import_at) and those at which a condition's answer changes.
_SIZE_CLASSES = tuple(sorted({r.import_at for r in ROWS if r.import_at} | set(SIZE_THRESHOLDS)))


def _signature(op: str) -> Signature:
    if not isinstance(op, str):  # (a list would fail as a dict key, naming nothing)
        raise TypeError(f"op must be an operator's name (a str), got {type(op).__name__}")
    if op in OPERATORS:
        return OPERATORS[op]
    if op in _EXTRA_OPS:
        return _EXTRA_OPS[op]
    raise ValueError(f"unknown operator {op!r}; known operators: {sorted({*OPERATORS, *_EXTRA_OPS})}")


def _parameters(func: Callable[..., Any], *, drop: tuple[str, ...] = ()) -> Signature:
    sig = inspect.signature(func)
    return tuple((p.name, p.kind) for p in sig.parameters.values() if p.name not in drop)


def _spelt(signature: Signature) -> str:
    """A signature as Python writes it, ``(xs, factors, *, append_one)``: its kinds shown, so
    that a mismatch of kinds alone does not read as two equal lists of names."""
    parts: list[str] = []
    star = False
    for name, kind in signature:
        if kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{name}")
            star = True
        elif kind is inspect.Parameter.VAR_KEYWORD:
            parts.append(f"**{name}")
        else:
            if kind is inspect.Parameter.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            parts.append(name)
    return f"({', '.join(parts)})"


def _check_signature(op: str, backend: str, func: Callable[..., Any]) -> None:
    want = _signature(op)
    try:
        got = _parameters(func)
    except (TypeError, ValueError) as exc:  # a builtin, a C extension's function
        raise TypeError(
            f"{backend} implementation of {op}: its parameters cannot be read ({exc}); wrap it in "
            f"a Python function with the public signature {_spelt(want)}"
        ) from None
    if got != want:
        raise TypeError(
            f"{backend} implementation of {op} must have the public signature {_spelt(want)}; "
            f"got {_spelt(got)}"
        )


_KEYWORD_KINDS = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def define_op(public: Callable[..., Any], name: str | None = None) -> None:
    """Declare a new operator from its public function (which takes the keyword ``backend``,
    last by mmfuse's convention).

    mmfuse's own operators are in the catalogue already; this is for operators of your own,
    which you then give implementations with :func:`register`.  ``name`` defaults to the
    function's ``__name__``.  Defining an operator again with the same parameters changes
    nothing; with other parameters it is refused while implementations of it are registered
    (they were checked against the old ones).

    Raises
    ------
    TypeError
        ``public`` not callable, without a ``backend`` keyword, or with parameters that
        cannot be read (a builtin); ``name`` neither a str nor None, or None where ``public``
        has no name that is an identifier (a ``functools.partial``, a lambda).
    ValueError
        An empty name or one that is not an identifier, the name of one of mmfuse's own
        operators, or a redefinition with other parameters while implementations are
        registered.
    """
    if not callable(public):
        raise TypeError(f"public must be the operator's public function, got {type(public).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    op = getattr(public, "__name__", None) if name is None else name
    if name is None and not (isinstance(op, str) and op.isidentifier()):
        # (a partial or a callable object has no __name__, and a lambda's is "<lambda>")
        raise TypeError(
            f"public ({type(public).__name__}) has no name an operator can take: give one (name=...)"
        )
    if not op:
        raise ValueError("name must not be empty")
    if not op.isidentifier():  # (as a default name must be: messages and tables show it)
        raise ValueError(f"name must be an identifier, such as 'my_norm', got {op!r}")
    if op in OPERATORS:
        raise ValueError(f"{op!r} is one of mmfuse's own operators; give yours another name (name=...)")
    try:
        parameters = inspect.signature(public).parameters
    except (TypeError, ValueError) as exc:  # a builtin, a C extension's function
        raise TypeError(f"public's parameters cannot be read ({exc}); define it in Python") from None
    if "backend" not in parameters or parameters["backend"].kind not in _KEYWORD_KINDS:
        raise TypeError(
            f"public must take the keyword backend (as mmfuse's public functions do), e.g. "
            f"def {op}(x, *, backend=None)"
        )
    signature = _parameters(public, drop=("backend",))
    with _lock:
        if _EXTRA_OPS.get(op, signature) != signature:
            # its implementations were checked against the old signature
            held = sorted(backend for (defined, backend) in _REGISTERED if defined == op)
            if held:
                raise ValueError(
                    f"operator {op!r} is defined already with parameters {_spelt(_EXTRA_OPS[op])} and "
                    f"has implementations registered for {held}; unregister them before defining "
                    f"it with parameters {_spelt(signature)}"
                )
        _EXTRA_OPS[op] = signature


def _check_named_backend(backend: Any) -> None:
    """``backend`` names a backend (not "auto"): what :func:`register` and :func:`unregister`
    take."""
    if backend not in BACKEND_NAMES or backend == "auto":
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES[1:])}, got {backend!r}")


def register(
    op: str,
    backend: str,
    func: Callable[..., Any],
    *,
    supports: Supports | None = None,
    priority: int = 0,
) -> Implementation:
    """Register ``func`` as backend ``backend``'s implementation of operator ``op``.

    ``func`` must have the public signature of ``op`` without ``backend`` (checked here, by
    parameter names and kinds).  ``supports(xp, device)`` returns ``None`` when the
    implementation can take arrays of namespace ``xp`` on ``device``, else a sentence saying
    what it needs.  Under ``"auto"`` the highest ``priority`` among the implementations that
    can take a call wins, a registration winning ties (the Array-API core's rows have
    priority 0, and 1 for its NumPy and Dask paths: ``explain`` lists every row's); one
    registered for ``"reference"`` runs only when that backend is asked for by name, whatever
    its priority.  It replaces mmfuse's own implementations of ``op`` for ``backend``, and an
    earlier registration of the same ``op`` and ``backend`` (:func:`unregister` then brings
    back mmfuse's own, not the earlier registration).  The
    public function checks the call's arguments before ``func`` runs, and gives ``func`` the
    checked values (``align``'s ``hub``, for one, as the int the topology uses: 0 where
    ``topology`` is not ``"hub"``), and returns ``func``'s result as it is (``align``'s as a
    list of its items, as the function documents): giving it in the inputs' namespace, dtype
    and device, as mmfuse's own do, is ``func``'s part.  Under
    ``torch.compile`` the ``nn`` layers call a ``"torch"`` registration directly, without
    its ``supports`` or priority (Dynamo traces no registry choice; the eager layers do ask).
    ``func`` should have no attribute ``plan``: mmfuse's own implementations plan their calls
    through one.
    """
    _signature(op)
    _check_named_backend(backend)
    if not callable(func):
        raise TypeError(f"func must be the implementation (a callable), got {type(func).__name__}")
    _check_signature(op, backend, func)
    if supports is not None and not callable(supports):
        raise TypeError(f"supports must be None or a callable (xp, device) -> str | None, got {supports!r}")
    if supports is not None:  # its arity here, not at every call of op (a review's find)
        try:
            inspect.signature(supports).bind(None, None)
        except TypeError:
            raise TypeError(
                f"supports must take two arguments (xp, device), got {supports!r} with signature "
                f"{inspect.signature(supports)}"
            ) from None
        except ValueError:  # a builtin without a signature: taken as it is
            pass
    # priorities are compared (and negated) at every choice: a bad one must fail here, not there
    if isinstance(priority, bool) or not isinstance(priority, numbers.Real) or not _finite(priority):
        raise TypeError(f"priority must be a finite real number (e.g. 10), got {priority!r}")
    impl = Implementation(op, backend, func, supports or _any_input, priority)
    with _lock:
        _REGISTERED[(op, backend)] = impl
        _CHOICES.clear()
        _generation[0] += 1
    return impl


def unregister(op: str, backend: str) -> None:
    """Remove what :func:`register` added for ``op`` and ``backend`` (mmfuse's own
    implementations of that backend come back); nothing happens if there is none.  An
    unknown operator or backend name is refused as :func:`register` refuses it (a typo
    would leave the registration in place, silently)."""
    _signature(op)
    _check_named_backend(backend)
    with _lock:
        if _REGISTERED.pop((op, backend), None) is not None:
            _CHOICES.clear()
            _generation[0] += 1


def registration(op: str, backend: str) -> Implementation | None:
    """What :func:`register` added for ``op`` and ``backend`` and :func:`unregister` has not
    removed, or None.  One dict read, which Dynamo traces (the compiled layers of
    :mod:`mmfuse.nn` ask it per call: a registration made after their import holds there
    too)."""
    return _REGISTERED.get((op, backend))


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range (10**400)
        return False


def generation() -> int:
    """How many times registrations have changed (a part of every plan's key)."""
    return _generation[0]


def _any_input(xp: Any, device: Any) -> str | None:
    return None


def _import_untraced(module: str) -> Any:
    """``importlib.import_module(module)``, out of Dynamo's sight where it is loaded.  The first
    call of a ``torch.compile``-d function that needs a backend imports the backend there, and
    Dynamo compiled each function its import runs: the op bindings, one function called with
    a new op each time, recompiled up to Dynamo's limit (8), with a warning, after which that
    frame ran uncompiled (a review's find).  Nothing of an import belongs in a graph."""
    if "torch._dynamo" not in sys.modules:  # (no compilation without it: not imported for this)
        return importlib.import_module(module)
    return sys.modules["torch"].compiler.disable(importlib.import_module)(module)


def _resolve(row: Row) -> Implementation | None:
    """The row's implementation (its module imported), or None if the module cannot load."""
    impl = _RESOLVED.get(row)
    if impl is not None:
        return impl
    module, attr = row.target.split(":")
    with _lock:
        if row in _RESOLVED:
            return _RESOLVED[row]
        framework = FRAMEWORKS[row.backend]
        try:
            func = getattr(_import_untraced(module), attr)
            # and the backend's framework installed: some rows run the core's functions (the
            # torch backend's autograd rows, numba's gradient rows), whose modules load
            # without it, and the backend was listed as available on a machine without its
            # framework.  Looked up, not imported: a lookup importing numba would make "auto"
            # send small NumPy calls to its kernels
            if framework in _broken_frameworks and sys.modules.get(framework) is None:
                # (until it imports after all: installed() then says so too)
                raise ImportError(_import_failed(framework))
            if framework is not None and not installed(framework):
                raise ModuleNotFoundError(f"No module named {framework!r}", name=framework)
        except Exception as exc:  # the backend's framework (or its module) is not installed, or
            # fails at import with another error (a broken install: AttributeError, say), which
            # unavailable() and ``mmfuse info`` then report rather than raise (a diff review's find)
            if row.backend not in _plugin_errors:
                _plugin_errors[row.backend] = f"{type(exc).__name__}: {exc}{install_hint(exc)}"
                _failed_modules[row.backend] = module
            return None
        _check_signature(row.op, row.backend, func)
        # the module whose failure was recorded loads now (its framework's import was blocked,
        # then unblocked): that error no longer stands.  Only that module's: a backend's rows
        # span modules, and one that loads says nothing of another's failure
        if _failed_modules.get(row.backend) == module:
            _plugin_errors.pop(row.backend, None)
            _failed_modules.pop(row.backend, None)
        condition = CONDITIONS[row.condition]
        supports = _ConditionSupports(condition)
        impl = Implementation(row.op, row.backend, func, supports, row.priority, row.variant, condition)
        _RESOLVED[row] = impl
    return impl


@dataclass(frozen=True)
class _ConditionSupports:
    """A table row's ``supports(xp, device)``: its condition asked with the namespace and
    device alone.  A module-level class, not a closure, so that implementations (and
    :func:`explain`'s answers holding them) pickle, and compare equal after a round trip (a
    review's find)."""

    condition: Condition

    def __call__(self, xp: Any, device: Any) -> str | None:
        return self.condition(CallInfo(xp, device, None))


def installed(name: str) -> bool:
    """Whether the top-level module ``name`` is imported or importable, looked up, not
    imported (importing numba would change "auto"'s choices, CuPy initialises CUDA, JAX takes
    seconds); ``sys.modules[name] = None``, the usual way to block an import, says no, and so
    does a broken install, and one whose import has failed (:func:`_framework_refusal`).
    (The registry's rows and ``mmfuse verify``'s namespaces.)"""
    if name in sys.modules:
        return sys.modules[name] is not None
    if name in _broken_frameworks:
        return False
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install
        return False


def _framework_refusal(impl: Implementation, *, importing: bool) -> str | None:
    """Why a table row's implementation ``impl`` cannot run for want of its framework, or None.

    Its framework, installed (the row resolved) but not imported yet, or still being imported
    by another thread, is imported here (waiting for that thread's import, as an import
    statement does): a row "auto" takes past its ``import_at``, or one ``backend=`` names
    (their modules load without it; their kernels import it when they run).  An import that
    fails (numba refusing a newer NumPy, a half-removed install) is then this row's refusal,
    and the framework counts as not installed until it does import (:func:`installed`: its rows
    stop resolving, and :func:`unavailable` gives the error), where the import's error used to rise
    from inside the call, "auto"'s large calls included (a review's find; a call made while
    another thread's failing import ran had still met it: a diff review's).  Without
    ``importing`` (:func:`explain`'s question, which must import nothing that changes later
    choices) only a blocked import is a refusal.  Registrations (no ``condition``) import what
    they need themselves.
    """
    fw = FRAMEWORKS.get(impl.backend)
    if fw is None or impl.condition is None:
        return None
    module = sys.modules.get(fw, _ABSENT)
    if module is None:  # an import blocked (sys.modules[fw] = None), maybe lifted later
        return f"ImportError: the import of {fw} is blocked (sys.modules[{fw!r}] is None)"
    if (module is not _ABSENT and not half_imported(module)) or not importing:
        return None
    try:
        _import_untraced(fw)
    except Exception as exc:  # (ImportError, or whatever a broken package raises at import)
        with _lock:
            _broken_frameworks[fw] = f"{type(exc).__name__}: {exc}"
            for row in [r for r in _RESOLVED if FRAMEWORKS[r.backend] == fw]:
                del _RESOLVED[row]
            _CHOICES.clear()
            _generation[0] += 1
        return f"ImportError: {_import_failed(fw)}"
    return None


def _import_failed(fw: str) -> str:
    """What the registry says of framework ``fw`` whose import failed (its rows' refusal, and
    their load error in :func:`unavailable`)."""
    return f"{fw} is installed but its import fails ({_broken_frameworks[fw]})"


def _rows(op: str, backend: str | None) -> list[Row]:
    """The table rows of ``op`` (of one backend), highest priority first."""
    rows = [r for r in ROWS if r.op == op and (backend is None or r.backend == backend)]
    return sorted(rows, key=lambda r: -r.priority)


def _auto_skips(row: Row, info: CallInfo | None) -> bool:
    """Whether "auto" leaves ``row`` out: its framework is not imported, and the row has no
    ``import_at``, or the call is smaller than it, or the row's condition refuses the call
    (read from metadata, before anything is imported: Triton's rows would otherwise import
    triton, seconds, for every large CPU tensor, to refuse it)."""
    fw = FRAMEWORKS[row.backend]
    if fw is None or sys.modules.get(fw) is not None:  # (None: an import blocked)
        return False
    if not (row.import_at and info is not None and info.size >= row.import_at):
        return True
    return CONDITIONS[row.condition](info) is not None


def _candidates(
    op: str, backend: str | None, *, imported_only: bool, info: CallInfo | None = None
) -> list[Implementation | Row]:
    """Implementations to try in order (user registrations replace their backend's rows);
    with ``imported_only``, rows "auto" leaves out for ``info`` (:func:`_auto_skips`) are
    returned unresolved, as rows."""
    found: list[tuple[int, int, Implementation | Row]] = []
    with _lock:  # (a snapshot: register / unregister in another thread change the dict)
        registered = list(_REGISTERED.items())
    replaced = {b for (o, b), _ in registered if o == op}
    for i, row in enumerate(_rows(op, backend)):
        if row.backend in replaced:
            continue
        if imported_only and _auto_skips(row, info):
            found.append((-row.priority, i, row))
            continue
        impl = _resolve(row)
        if impl is not None:
            found.append((-row.priority, i, impl))
    for (o, b), impl in registered:
        if o == op and (backend is None or b == backend):
            found.append((-impl.priority, -1, impl))
    found.sort(key=lambda t: (t[0], t[1]))
    return [c for _, _, c in found]


def implementations(op: str) -> list[Implementation]:
    """Every implementation of ``op`` that can be loaded, highest priority first.

    Imports the optional backends' modules (and so their frameworks) to find out.
    """
    _signature(op)
    return [c for c in _candidates(op, None, imported_only=False) if isinstance(c, Implementation)]


def unavailable() -> dict[str, str]:
    """Optional backends that could not be loaded, with the reason for each."""
    for op in OPERATORS:
        _candidates(op, None, imported_only=False)
    return dict(_plugin_errors)


@overload
def available(op: None = None) -> dict[str, list[str]]: ...
@overload
def available(op: str) -> list[str]: ...


def available(op: str | None = None) -> dict[str, list[str]] | list[str]:
    """Backends with an implementation per operator (for one operator: a list).  (Typed per
    call: ``available()["lowrank_fusion"]`` and ``available("moments")[0]`` both check under
    mypy; an API review's find.)

    Optional backends whose framework is not importable are left out; see
    :func:`unavailable` for why.
    """
    if op is not None:
        return sorted({impl.backend for impl in implementations(op)})
    ops = sorted({*OPERATORS, *_EXTRA_OPS})
    return {name: sorted({impl.backend for impl in implementations(name)}) for name in ops}


def _backends_for(op: str) -> str:
    """The backends with rows or registrations for ``op``, for a refusal's message, read from
    the table without loading any (:func:`available` imports each backend's framework to say
    which load: seconds for torch and Triton, on a path a soft preference takes and drops)."""
    with _lock:  # (a snapshot, as _candidates: register / unregister in another thread change the dict)
        registered = list(_REGISTERED)
    names = {row.backend for row in _rows(op, None)} | {b for (o, b) in registered if o == op}
    return f"backends with an implementation of {op}: {sorted(names)} (available() says which load here)"


def _check_leaves(items: Sequence[Any], label: str) -> None:
    """Every entry of ``items`` (lists and tuples walked) is an array or None: explain() of
    something else would silently describe a call without inputs."""
    for i, item in enumerate(items):
        where = f"{label}[{i}]"
        if isinstance(item, (list, tuple)):
            _check_leaves(item, where)
        elif item is not None and not is_array(item):
            raise TypeError(
                f"explain: {where} is a {type(item).__name__}, not an array; pass the call's "
                "arrays (lists of them allowed), e.g. explain('lowrank_fusion', xs, factors)"
            )


def _cp_arrays(arg: Any) -> Any:
    """A CP argument (TensorLy's ``CPTensor``, which ``cp_fusion`` and ``cp_interactions``
    take) as its (weights, factors); any other argument as it is."""
    if is_array(arg) or arg is None or isinstance(arg, (list, tuple)):
        return arg
    return cp_pair(arg) or arg


def _first_array(obj: Any) -> Any:
    if is_array(obj):
        return obj
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_array(item)
            if found is not None:
                return found
    return None


def _key(op: str, name: str, info: CallInfo) -> tuple[Any, ...]:
    frameworks: tuple[Any, ...] = ()
    if name.startswith("auto"):  # what "auto" may choose from: frameworks, size class
        # each framework's entry in sys.modules: the module, None (an import blocked) or
        # absent (0), as the plans' key (mmfuse._plan.policy_key) holds it
        states = [sys.modules.get(fw, 0) for fw in _OPTIONAL]
        frameworks = (*states, *(info.size >= n for n in _SIZE_CLASSES))
    # the Triton rows' conditions read TRITON_INTERPRET per call (a review found a choice made
    # with it set kept after it was unset): a policy naming triton, or "auto" on a CUDA device
    # (its Triton rows' only device); an environment read costs 0.5 us, so nowhere else
    cuda = getattr(info.device, "type", None) == "cuda"
    interpreting = ("triton" in name or (cuda and name.startswith("auto"))) and triton_interpreting()
    device = device_key(info.device)  # CuPy's devices have no hash
    call = (info.xp, device, info.dtype, info.grad, info.traced, info.intercepted, info.values_hidden)
    return (op, name, *call, frameworks, interpreting)


def _policy(backend: str | None) -> str:
    """The call's policy: a backend name, ``"auto"``, or ``"auto, prefer <name>"``."""
    name, prefer = backend_policy(backend)
    return name if prefer is None else f"auto, prefer {prefer}"


def _choose(op: str, name: str, info: CallInfo | None, *, to_run: bool = False) -> Implementation:
    """The implementation policy ``name`` takes for a call described by ``info``; with
    ``to_run`` (:func:`choose`'s, not the questions of :func:`lookup` and :func:`explain`, which
    must import nothing that changes later choices) a framework the choice needs is imported
    first (:func:`_framework_refusal`)."""

    def loads(impl: Implementation) -> str | None:
        return _framework_refusal(impl, importing=to_run)

    if name.startswith("auto, prefer "):
        try:
            return _choose(op, name[len("auto, prefer ") :], info, to_run=to_run)
        except BackendUnsupported:  # a preference, not a demand: "auto" decides
            return _choose(op, "auto", info, to_run=to_run)
    reasons: list[str] = []
    if name == "auto":
        for cand in _candidates(op, None, imported_only=True, info=info):
            if isinstance(cand, Row) or cand.backend == "reference":
                continue
            refusal = None if info is None else cand.refusal(info)
            if refusal is None:
                refusal = loads(cand)
            if refusal is None:
                return cand
            if refusal not in reasons:
                reasons.append(refusal)
        # mmfuse's own generic rows take anything; a registration that replaced them, or an
        # operator defined with none that takes these inputs, can leave nothing
        what = "these inputs"
        if info is not None:
            what = _arrays_of(info)
        raise BackendUnsupported(
            f"'auto' finds no implementation of {op} that takes {what}: "
            f"{_join(reasons) if reasons else 'none is registered'}; {_backends_for(op)}"
        )
    if info is not None:
        refused = _table_refusals(op, name, info)
        if refused:  # every row refuses on metadata: said without importing the backend
            raise BackendUnsupported(
                f"backend {name!r} cannot take {_arrays_of(info)} for {op}: {_join(refused)}"
            )
    cands = [c for c in _candidates(op, name, imported_only=False) if isinstance(c, Implementation)]
    if not cands:
        reason = "it has no implementation of this operator"
        if _rows(op, name):  # its rows could not load: why (installing it would not help otherwise)
            reason = _plugin_errors.get(name, reason)
        raise BackendUnsupported(
            f"backend {name!r} cannot run {op}: {reason}; {_backends_for(op)}"
        )
    if info is None:
        return cands[0]
    for cand in cands:
        refusal = cand.refusal(info)
        if refusal is None and (failure := loads(cand)) is not None:
            # said as when its rows cannot load (the next call's message), not as one more
            # reason among the other rows' refusals of these arrays (a diff review's find)
            raise BackendUnsupported(f"backend {name!r} cannot run {op}: {failure}; {_backends_for(op)}")
        if refusal is None:
            return cand
        if refusal not in reasons:
            reasons.append(refusal)
    raise BackendUnsupported(f"backend {name!r} cannot take {_arrays_of(info)} for {op}: {_join(reasons)}")


def _arrays_of(info: CallInfo) -> str:
    """The call's arrays as a refusal names them: "numpy arrays on device 'cpu'", or without
    a device where they have none (a JAX tracer under jax.jit: "on device None" before)."""
    where = "" if info.device is None else f" on device {_device_name(info.device)!r}"
    return f"{namespace_name(info.xp)} arrays{where}"


def _table_refusals(op: str, name: str, info: CallInfo) -> list[str]:
    """The reasons of backend ``name``'s table rows for ``op`` when every one refuses the
    call by its condition (which reads metadata only), and no user registration replaces
    them; else []: then the rows are loaded and asked.  A forced or preferred backend that
    cannot take the call is so refused without importing its framework (a preferred torch or
    Triton imported both on NumPy calls: seconds)."""
    with _lock:
        if any(o == op and b == name for (o, b) in _REGISTERED):
            return []
    reasons: list[str] = []
    for row in _rows(op, name):
        refusal = CONDITIONS[row.condition](info)
        if refusal is None:
            return []
        if refusal not in reasons:
            reasons.append(refusal)
    return reasons


def _join(reasons: list[str]) -> str:
    """The rows' reasons as one: "needs A or B" when each says what it needs."""
    if all(r.startswith("needs ") for r in reasons):
        return "needs " + " or ".join(r[len("needs ") :] for r in reasons)
    return "; ".join(reasons)


def _device_name(device: Any) -> Any:
    return str(device) if type(device).__module__.startswith("torch") else device


def _describe(like: Any, arrays: Sequence[Any], size: int | None = None) -> CallInfo | None:
    if like is None:
        return None
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0):
        raise TypeError(f"size must be None or a non-negative int, got {size!r}")
    info = call_info(array_namespace(like, names=("like",)), like, arrays)
    if size is None or info.intercepted:  # intercepted: no (symbolic) sizes, as call_info
        return info
    return replace(info, size=size)


def lookup(
    op: str,
    backend: str | None = None,
    *,
    like: Any = None,
    arrays: Sequence[Any] = (),
    size: int | None = None,
) -> Callable[..., Any]:
    """The implementation of ``op`` to run for inputs like the array ``like``.

    ``backend`` is the call's ``backend=`` keyword (``None``: the configured policy);
    ``arrays`` the call's other arrays, masks included (nested lists allowed), whose autograd
    and tracing state the choice may depend on; ``size`` the call's size for the rows'
    ``import_at`` where ``like``'s element count does not measure its work (the interaction
    terms: their recursion's products).  Raises :class:`BackendUnsupported` when a named
    backend cannot run it.  A question: it imports no framework that "auto" reads (numba: a
    choice of its rows imports it when it runs), so it never changes what "auto" picks; the
    public functions ask ``choose`` instead.
    """
    return _lookup(op, backend, like, arrays, size, to_run=False)


def choose(
    op: str,
    backend: str | None = None,
    *,
    like: Any = None,
    arrays: Sequence[Any] = (),
    size: int | None = None,
) -> Callable[..., Any]:
    """:func:`lookup` for a call about to run (mmfuse's public functions plan with it): a
    chosen row's framework that is installed but not imported yet is imported first, and one
    whose import fails is refused (:func:`_framework_refusal`), so the call runs another
    implementation instead of meeting the import's error."""
    return _lookup(op, backend, like, arrays, size, to_run=True)


def _lookup(
    op: str, backend: str | None, like: Any, arrays: Sequence[Any], size: int | None, to_run: bool
) -> Callable[..., Any]:  # fmt: skip
    try:
        return _lookup_policy(op, backend, like, arrays, size, to_run)
    except BackendUnsupported as exc:
        if backend is not None or (source := _configured_by()) is None:
            raise
        # a backend the caller never named: say where it was set (an environment variable in a
        # shell profile or a CI job was nowhere in sight; a review's find).  ``refusal`` keeps
        # the refusal alone, for the mmfuse command, which says what is in force its own way
        configured = BackendUnsupported(f"{exc} ({source})")
        configured.refusal = str(exc)  # type: ignore[attr-defined]
        raise configured from None


def _configured_by() -> str | None:
    """Where the backend in force was set, as a refusal says it, or None for the default."""
    source = config_source()["backend"]
    if source == "default":
        return None
    if source.startswith("environment (") and source.endswith(")"):
        return f"the backend is set by the environment variable {source[len('environment (') : -1]}"
    return f"the backend is set by mmfuse.{source}"


def _lookup_policy(
    op: str, backend: str | None, like: Any, arrays: Sequence[Any], size: int | None, to_run: bool
) -> Callable[..., Any]:  # fmt: skip
    name = _policy(backend)
    info = _describe(like, arrays, size)
    if info is None or info.intercepted:
        # chosen, not remembered: no arrays to describe; or Dynamo traces this (or a dispatch
        # mode is on), where the plans never plan either: the key's sys.modules entries would
        # guard a compiled frame on the module table, which torch's own imports change while
        # it compiles ("Guard failed on the same frame it was created"; a review's find), and
        # any later import would recompile it
        return _signed_choice(op, name, info, to_run).func
    key = (*_key(op, name, info), to_run)  # (a question's choice may not have imported)
    try:
        impl = _CHOICES.get(key)
    except TypeError:  # an unhashable sys.modules entry in the key (a module class with
        # __eq__ and no __hash__): chosen, not remembered, as the plan caches do
        return _signed_choice(op, name, info, to_run).func
    if impl is None:
        seen = _generation[0]
        impl = _signed_choice(op, name, info, to_run)
        with _lock:
            # kept only if no register()/unregister() ran meanwhile (in another thread): a
            # choice made among the old registrations, stored after their clear(), would
            # stay for good
            if _generation[0] == seen:
                _CHOICES[key] = impl
    return impl.func


def _signed_choice(op: str, name: str, info: CallInfo | None, to_run: bool) -> Implementation:
    """:func:`_choose` for an operator checked to exist (:func:`_signature`)."""
    _signature(op)
    return _choose(op, name, info, to_run=to_run)


def own(op: str, backend: str, *, like: Any = None) -> Callable[..., Any]:
    """mmfuse's own implementation of ``op`` in ``backend`` (for inputs like the array
    ``like``: the first of the table's rows that takes them), whatever :func:`register` has
    put in its place: a caller keeping it must not keep a registration, which
    :func:`unregister` would not reach.  Raises :class:`BackendUnsupported` where no row loads
    or takes such inputs."""
    info = _describe(like, ())
    for row in _rows(op, backend):
        impl = _resolve(row)
        if impl is not None and (info is None or impl.refusal(info) is None):
            return impl.func
    raise BackendUnsupported(f"mmfuse's backend {backend!r} has no implementation of {op} for such inputs")


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found: the implementation that would run, and why each other
    would not.  ``str()`` gives a table."""

    op: str
    policy: str
    chosen: Implementation | None
    rows: tuple[tuple[str, str, Any, str], ...]  # (backend, variant, priority: a real, verdict)

    def __str__(self) -> str:
        width = max([len(f"{b} / {v}") for b, v, _, _ in self.rows] + [14])
        lines = [f"{self.op} under backend={self.policy!r}:"]
        for backend, variant, priority, verdict in self.rows:
            # (as str: a registered priority may be any finite real, and a Fraction has no
            # format spec; a review's find)
            lines.append(f"  {f'{backend} / {variant}':<{width}}  {priority!s:>3}  {verdict}")
        return "\n".join(lines)


def explain(op: str, *arrays: Any, backend: str | None = None, size: int | None = None) -> Explanation:
    """Which implementation of ``op`` would run for ``arrays``, and why the others would not.

    ``arrays``: the call's arrays (or some of them, at least one: a TypeError otherwise; the
    first floating one decides the namespace, device and dtype, as in the call; TensorLy's
    ``CPTensor`` for ``cp``, as the call takes it).  Lists the
    forced backend's implementations, or under ``"auto"`` every one (importing the optional
    backends' modules that are installed).  Raises nothing for a refusal: a forced backend
    that cannot take the inputs shows ``chosen=None`` and its reasons; a chosen row that
    passes the inputs on says what runs them beside "runs" (``backend="triton"`` on float64
    tensors: the torch backend's ops).  ``size``: the call's
    size as the public function passes it to ``choose``; by default computed as the public
    function does: for the interaction terms from ``arrays`` given as the call's leading
    arguments (``xs, factors`` or ``xs, cp``: their recursion's products, M^2 B R h or M^2 B
    R, as for a call by order with the appended constant; a call by subset or with
    ``append_one=False`` passes 0, which ``size=0`` shows), otherwise (and for arrays that are
    not those) the first floating array's element count.

    Examples
    --------
    >>> import numpy as np
    >>> from mmfuse.backends import explain
    >>> found = explain("lowrank_fusion", np.ones((4, 3)), backend="array_api")
    >>> found.chosen.variant
    'numpy, cache-blocked'
    >>> print(found)  # doctest: +NORMALIZE_WHITESPACE
    lowrank_fusion under backend='array_api':
      array_api / numpy, cache-blocked        1  runs
      array_api / dask, one task per chunk    1  cannot take them: needs Dask arrays
      array_api / generic                     0  would run if the rows above could not
    """
    _signature(op)  # an unknown operator: a ValueError listing the known ones
    name = _policy(backend)
    arrays = tuple(_cp_arrays(a) for a in arrays)
    _check_leaves(arrays, "arrays")
    if _first_array(list(arrays)) is None:
        # (without arrays the choice was "auto"'s among what happened to be imported, and
        # building the table imports the rest: a second call answered otherwise)
        raise TypeError(
            f"explain: give the call's arrays, e.g. explain({op!r}, x, ...): which implementation "
            "runs depends on their namespace, device, dtype and size"
        )
    # as the public functions read them: the first floating array (not a mask given first)
    like = first_floating(list(arrays))
    if like is None:
        like = _first_array(list(arrays))
    if size is None and op in CALL_SIZES:
        # (arrays of another structure, "some of them": the first array's count, as documented)
        with contextlib.suppress(AttributeError, IndexError, TypeError, ValueError):
            size = CALL_SIZES[op](*arrays)
    info = _describe(like, arrays, size)
    try:
        chosen: Implementation | None = _choose(op, name, info, to_run=False)
    except BackendUnsupported:
        chosen = None
    rows: list[tuple[str, str, int, str]] = []
    candidates = _candidates(op, None, imported_only=False)
    with _lock:
        row_of = {id(impl): row for row, impl in _RESOLVED.items()}
    passed_chosen = False
    for cand in candidates:
        if isinstance(cand, Row):  # not reached: imported_only=False resolves every row
            continue
        if not name.startswith("auto") and name != cand.backend:
            continue  # a forced backend: only its own rows are candidates
        row = row_of.get(id(cand))
        if cand is chosen:  # first: a preference may pick a row "auto" itself would not
            verdict, passed_chosen = "runs", True
            # (a row whose own code does not run these inputs: what does, from DELEGATIONS)
            delegation = None if row is None else DELEGATIONS.get(row.condition)
            if delegation is not None and info is not None and (instead := delegation(info)) is not None:
                verdict = f"runs ({instead})"
        elif name.startswith("auto") and cand.backend == "reference" and name != "auto, prefer reference":
            verdict = "not considered: 'auto' never picks the reference (force backend='reference')"
        elif (refusal := None if info is None else cand.refusal(info)) is not None:
            verdict = f"cannot take them: {refusal}"  # (before a skip: the reason that stands)
        elif name.startswith("auto") and row is not None and _auto_skips(row, info):
            verdict = _skipped(row, info)
        elif chosen is not None and not passed_chosen:  # above the chosen: passed over
            verdict = f"passed over: {name.split(', ')[-1]} runs first"
        else:
            verdict = "would run if the rows above could not"
        rows.append((cand.backend, cand.variant, cand.priority, verdict))
    with _lock:
        errors = sorted(_plugin_errors.items())
    if not rows and not name.startswith("auto") and not any(r.op == op and r.backend == name for r in ROWS):
        # a forced backend without this operator (one that has rows but cannot load says so
        # below, "not installed"; "no implementation" was untrue of it)
        rows.append((name, "(none)", 0, f"cannot run {op}: it has no implementation of this operator"))
    with _lock:
        replaced = {b for (o, b) in _REGISTERED if o == op}
    for backend, reason in errors:
        has_rows = any(r.op == op and r.backend == backend for r in ROWS)
        # (a registration replaces the backend's rows: their loading error is not this op's)
        if has_rows and backend not in replaced and (name.startswith("auto") or name == backend):
            rows.append((backend, "(not installed)", 0, f"unavailable: {reason}"))
    return Explanation(op, name, chosen, tuple(rows))


def _skipped(row: Row, info: CallInfo | None) -> str:
    fw = FRAMEWORKS[row.backend]
    why = f"not considered: 'auto' takes it once {fw} is imported"
    if row.import_at:
        size = "" if info is None else f"; this call's is {info.size}"
        why += f", or for calls of size at least {row.import_at} ({fw} installed{size})"
    return why
