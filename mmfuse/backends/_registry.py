"""The backend registry: which implementation of which operator runs for which inputs.

An *operator* (``"lowrank_fusion"``, ...) is declared once by the public layer with its public
signature.  An *implementation* is a function with that same signature less ``backend=``,
registered under a backend name together with a ``supports`` predicate that says, from the
namespace and device alone, whether it can take the inputs (and if not, why not).

``lookup`` turns a backend *policy* into a function: a named backend must support the inputs
or the call fails with the reason; ``"auto"`` takes the highest-priority implementation that
supports them and falls back to the Array-API core.  Accelerated backends live in optional
modules that are imported only when asked for by name, or under ``"auto"`` once their framework
is already imported by the user (so ``import mmfuse`` never imports a framework).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._config import BACKEND_NAMES, resolve_backend
from .._namespace import array_namespace, device_of, namespace_name

__all__ = [
    "BackendUnsupported",
    "Implementation",
    "available",
    "define_op",
    "lookup",
    "register",
    "unavailable",
]


class BackendUnsupported(TypeError, ValueError):
    """A backend, forced by name, cannot run an operator on the given inputs.

    One type for every refusal, so callers (the CLI among them) catch it by type, not by
    message.  It derives from ``TypeError`` (the inputs are of a kind the backend does not
    take) and, for code written before it existed, from ``ValueError`` (what a backend
    without the operator used to raise).
    """


Supports = Callable[[Any, Any], "str | None"]


@dataclass(frozen=True)
class Implementation:
    """One registered implementation of an operator."""

    op: str
    backend: str
    func: Callable[..., Any]
    supports: Supports
    priority: int


def _any_input(xp: Any, device: Any) -> str | None:
    return None


# op name -> public parameters (name, kind) without ``backend``
_OPS: dict[str, tuple[tuple[str, Any], ...]] = {}
# op name -> backend name -> implementation
_IMPLS: dict[str, dict[str, Implementation]] = {}

# Optional backends: backend name -> (module, framework whose presence in sys.modules lets
# "auto" import the module).  Their modules call ``register`` when imported.
_PLUGINS: dict[str, tuple[str, str]] = {
    "torch": ("mmfuse.backends.torch", "torch"),
    "numba": ("mmfuse.backends.numba", "numba"),
    "cupy": ("mmfuse.backends.cupy", "cupy"),
    "triton": ("mmfuse.backends.triton", "triton"),
}
_plugin_errors: dict[str, str] = {}
# Plugins whose module finished importing.  Another thread may be half-way through importing
# one (its module already in sys.modules, its ``register`` calls not yet run), so a plugin
# counts as loaded only once ``import_module`` has returned, and loads take turns.
_plugins_loaded: set[str] = set()
_plugin_lock = threading.RLock()


def _parameters(func: Callable[..., Any], *, drop: tuple[str, ...] = ()) -> tuple[tuple[str, Any], ...]:
    sig = inspect.signature(func)
    return tuple((p.name, p.kind) for p in sig.parameters.values() if p.name not in drop)


def define_op(public: Callable[..., Any], name: str | None = None) -> None:
    """Declare an operator from its public function (whose last keyword is ``backend``)."""
    op = name or public.__name__
    _OPS[op] = _parameters(public, drop=("backend",))
    _IMPLS.setdefault(op, {})


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
    what it needs.  Under ``"auto"`` the highest ``priority`` among supporting
    implementations wins; the Array-API core has priority 0.
    """
    if op not in _OPS:
        raise ValueError(f"unknown operator {op!r}; known operators: {sorted(_OPS)}")
    if backend not in BACKEND_NAMES or backend == "auto":
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES[1:])}, got {backend!r}")
    got = _parameters(func)
    if got != _OPS[op]:
        want = ", ".join(n for n, _ in _OPS[op])
        have = ", ".join(n for n, _ in got)
        raise TypeError(
            f"{backend} implementation of {op} must have the public signature ({want}); "
            f"got ({have})"
        )
    impl = Implementation(op, backend, func, supports or _any_input, priority)
    _IMPLS[op][backend] = impl
    return impl


def _load_plugin(backend: str, *, only_if_imported: bool) -> None:
    if backend not in _PLUGINS or backend in _plugins_loaded or backend in _plugin_errors:
        return
    module, framework = _PLUGINS[backend]
    if only_if_imported and framework not in sys.modules:
        return
    with _plugin_lock:
        if backend in _plugins_loaded or backend in _plugin_errors:
            return
        try:
            # returns at once if already imported; waits if another thread is importing it
            importlib.import_module(module)
        except ImportError as exc:  # the module or its framework is not installed
            _plugin_errors[backend] = f"{type(exc).__name__}: {exc}"
            return
        _plugins_loaded.add(backend)


def unavailable() -> dict[str, str]:
    """Optional backends that could not be loaded, with the reason for each."""
    for backend in _PLUGINS:
        _load_plugin(backend, only_if_imported=False)
    return dict(_plugin_errors)


def available(op: str | None = None) -> dict[str, list[str]] | list[str]:
    """Backends registered per operator (for one operator: a list).

    Optional backends whose framework is not importable are left out; see
    :func:`unavailable` for why.
    """
    for backend in _PLUGINS:
        _load_plugin(backend, only_if_imported=False)
    if op is not None:
        if op not in _IMPLS:
            raise ValueError(f"unknown operator {op!r}; known operators: {sorted(_OPS)}")
        return sorted(_IMPLS[op])
    return {name: sorted(impls) for name, impls in sorted(_IMPLS.items())}


def lookup(op: str, backend: str | None = None, *, like: Any = None) -> Callable[..., Any]:
    """The implementation of ``op`` to run for inputs like the array ``like``.

    ``backend`` is the call's ``backend=`` keyword (``None``: the configured policy).
    """
    if op not in _IMPLS:
        raise ValueError(f"unknown operator {op!r}; known operators: {sorted(_OPS)}")
    name = resolve_backend(backend)
    xp = array_namespace(like) if like is not None else None
    device = device_of(like) if like is not None else None
    impls = _IMPLS[op]
    if name == "auto":
        for plugin in _PLUGINS:
            _load_plugin(plugin, only_if_imported=True)
        ranked = sorted(impls.values(), key=lambda i: -i.priority)
        for impl in ranked:
            if impl.backend == "reference":
                continue
            if xp is None or impl.supports(xp, device) is None:
                return impl.func
        return impls["array_api"].func
    _load_plugin(name, only_if_imported=False)
    if name not in impls:
        reason = _plugin_errors.get(name, "it has no implementation of this operator")
        raise BackendUnsupported(
            f"backend {name!r} cannot run {op}: {reason}; "
            f"backends available for {op}: {sorted(impls)}"
        )
    impl = impls[name]
    if xp is not None:
        refusal = impl.supports(xp, device)
        if refusal is not None:
            raise BackendUnsupported(
                f"backend {name!r} cannot take {namespace_name(xp)} arrays on device "
                f"{device!r} for {op}: {refusal}"
            )
    return impl.func
