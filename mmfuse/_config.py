"""Backend policy: which implementation runs, chosen per call, per context or per process.

Precedence (highest first): the ``backend=`` keyword of a call > :func:`config_context` /
:func:`set_config`, the latest in force (a ``with config_context(...)`` block sets options
over what ``set_config`` set, and restores the state it entered with when it exits: a
``set_config`` inside the block holds until then, as scikit-learn's do) > the
``MMFUSE_BACKEND`` environment variable (read at first use, never at import) > ``"auto"``.
State lives in a :class:`contextvars.ContextVar`, so threads and asyncio tasks see their own
context and nothing global is patched.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

__all__ = ["BACKEND_NAMES", "config_context", "config_source", "get_config", "set_config"]

#: Every backend name mmfuse knows.  Which of them can run depends on what is installed.
BACKEND_NAMES = ("auto", "array_api", "reference", "numba", "cupy", "torch", "triton")

_DEFAULTS: dict[str, Any] = {"backend": "auto", "prefer": None}
_ENV_VARS = {"backend": "MMFUSE_BACKEND", "prefer": "MMFUSE_PREFER"}

# Each entry maps option -> (value, where it came from).  ``None`` means "not read yet":
# the environment is consulted lazily at the first get_config().
_state: contextvars.ContextVar[dict[str, tuple[Any, str]] | None] = contextvars.ContextVar(
    "mmfuse_config", default=None
)


def _check_option(key: str, value: Any) -> None:
    if key not in _DEFAULTS:
        raise TypeError(f"unknown mmfuse option {key!r}; known options: {sorted(_DEFAULTS)}")
    if key == "backend" and (not isinstance(value, str) or value not in BACKEND_NAMES):
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {value!r}")
    valid_prefer = value is None or (isinstance(value, str) and value in BACKEND_NAMES[1:])
    if key == "prefer" and not valid_prefer:
        raise ValueError(f"prefer must be None or one of {list(BACKEND_NAMES[1:])}, got {value!r}")


class _Refused(NamedTuple):
    """An environment variable's value that failed its check: its error, raised when the
    option is read (a call that names its own backend never reads ``MMFUSE_BACKEND``)."""

    message: str


# The environment's options, read once per process at the first use of any option (a list:
# filled once).  Every context and thread starts from this one dict (never mutated: setting an
# option makes a new dict), so one process never runs two policies from one environment.
_FROM_ENVIRONMENT: list[dict[str, tuple[Any, str]]] = []


def _initial_state() -> dict[str, tuple[Any, str]]:
    if not _FROM_ENVIRONMENT:
        _FROM_ENVIRONMENT.append(_read_environment())
    return _FROM_ENVIRONMENT[0]


def _read_environment() -> dict[str, tuple[Any, str]]:
    state: dict[str, tuple[Any, str]] = {}
    for key, default in _DEFAULTS.items():
        env = os.environ.get(_ENV_VARS[key], "").strip()
        if env:  # empty or blank: unset (a blank value was refused as "got ''")
            value: Any = env.lower()
            if key == "prefer" and value == "none":  # None spelt out (refused as "must be None")
                value = None
            try:
                _check_option(key, value)
            except ValueError as exc:
                value = _Refused(f"environment variable {_ENV_VARS[key]}: {exc}")
            state[key] = (value, f"environment ({_ENV_VARS[key]})")
        else:
            state[key] = (default, "default")
    return state


def _value(state: dict[str, tuple[Any, str]], key: str) -> Any:
    """Option ``key`` of ``state``; raises the environment's error if its value was refused."""
    value = state[key][0]
    if isinstance(value, _Refused):
        raise ValueError(value.message)
    return value


def _current() -> dict[str, tuple[Any, str]]:
    state = _state.get()
    if state is None:
        state = _initial_state()
        _state.set(state)
    return state


def get_config() -> dict[str, Any]:
    """Return the options in force, as a new dict (e.g. ``{"backend": "auto", "prefer": None}``).

    Examples
    --------
    >>> import mmfuse
    >>> with mmfuse.config_context(backend="reference"):
    ...     mmfuse.get_config()["backend"]
    'reference'
    """
    state = _current()
    backend = _value(state, "backend")
    if backend != "auto" and isinstance(state["prefer"][0], _Refused):
        # the preference is in force under "auto" only: a refused MMFUSE_PREFER does not stop
        # a context that names its backend (config_context(backend=...) yields this dict)
        return {"backend": backend, "prefer": None}
    return {"backend": backend, "prefer": _value(state, "prefer")}


def refused_options() -> dict[str, str]:
    """The options whose environment value was refused, with the refusal's message (for
    ``mmfuse info``: a refused ``MMFUSE_PREFER`` is not in force while the backend is named,
    and :func:`get_config` then reports ``prefer=None``)."""
    return {key: value.message for key, (value, _) in _current().items() if isinstance(value, _Refused)}


def config_source() -> dict[str, str]:
    """Where each option in force came from (``"default"``, ``"environment (...)"``, ...)."""
    return {key: source for key, (_, source) in _current().items()}


def set_config(**options: Any) -> None:
    """Set options for the current context (and contexts created from it later: asyncio
    tasks started after it, ``contextvars.copy_context()``; a thread started later begins
    from the defaults and the environment, as contextvars do, so set them in the thread or
    pass ``backend=``).  Inside a :func:`config_context` block it overrides the block's
    options, until the block exits and restores the state it entered with.

    Other processes do not see it: a child started by ``spawn`` or ``forkserver`` (a
    DataLoader's or a ``multiprocessing`` pool's under those start methods) and Dask's worker
    processes begin from the defaults and the environment, so set ``MMFUSE_BACKEND`` /
    ``MMFUSE_PREFER`` before starting them (or call this in each); a ``fork`` child begins
    with the settings of the thread that forked it, which for a ``multiprocessing`` pool's
    replacement workers (``maxtasksperchild``, a worker that died) is a thread of the pool's
    own, with the defaults and the environment (as this process read it at its first use,
    which a forked child inherits): set the environment variables before mmfuse's first use
    here, or call this in the pool's ``initializer``.  A thread that calls this keeps the setting for whatever
    it runs next (a ``ThreadPoolExecutor``'s worker, its later tasks): use
    :func:`config_context` in such code.  (A call on Dask arrays is decided on the client,
    when the graph is built: its tasks read no settings on the workers.)

    Parameters
    ----------
    backend : {"auto", "array_api", "reference", "numba", "cupy", "torch", "triton"}
        Which implementation runs, strictly: a named backend that cannot take a call raises
        :class:`mmfuse.backends.BackendUnsupported`.  ``"auto"`` picks the highest-priority
        implementation registered for the inputs (priorities are set by benchmark at large
        sizes), falling back to the Array-API core.
    prefer : backend name or None
        A soft preference, used while ``backend`` is ``"auto"``: calls the preferred backend
        can take run there, every other call runs what ``"auto"`` picks (as joblib's
        ``prefer=`` hint).  ``MMFUSE_PREFER`` sets it from the environment.  Example: with
        ``prefer="numba"``, ``moments`` on NumPy arrays runs numba's CPU kernels and
        ``lowrank_fusion`` (which numba has only for CUDA arrays) runs the core.

    Raises
    ------
    TypeError
        For an unknown option name.
    ValueError
        For an unknown backend name.
    """
    for key, value in options.items():
        _check_option(key, value)
    state = dict(_current())
    for key, value in options.items():
        state[key] = (value, "set_config")
    _state.set(state)


@contextmanager
def config_context(**options: Any) -> Iterator[dict[str, Any]]:
    """Temporarily set options inside a ``with`` block; the previous state comes back after.

    The state is a :mod:`contextvars` variable, and a block restores the state it entered
    with, as :func:`decimal.localcontext` does: blocks close last opened first, in the
    thread or asyncio task (the context) they opened in.  A generator that yields inside a
    block runs its caller under the block's options until it is resumed and the block
    closes; two such generators closed in the order they opened leave the state the one
    closed last had entered with (the other's options).  A block closed in another context
    (a generator finished by another thread, or finalised by an event loop) raises
    RuntimeError: it cannot restore the context it left.

    Examples
    --------
    >>> import mmfuse
    >>> with mmfuse.config_context(backend="array_api") as cfg:
    ...     cfg["backend"]
    'array_api'
    """
    for key, value in options.items():
        _check_option(key, value)
    state = dict(_current())
    for key, value in options.items():
        state[key] = (value, "config_context")
    token = _state.set(state)
    try:
        yield get_config()
    finally:
        try:
            _state.reset(token)
        except ValueError as exc:  # (contextvars' words name neither mmfuse nor the cause)
            raise RuntimeError(
                "mmfuse.config_context: the block was closed in another thread or asyncio task "
                "(another contextvars context) than it opened in, where its options cannot be "
                "undone; close a block where it opened (e.g. finish a generator that yields "
                "inside one in the thread that started it)"
            ) from exc  # (chained: an exception passing through the block stays in sight)


def backend_policy(backend: str | None) -> tuple[str, str | None]:
    """``(backend name, preference)`` in force for a call whose ``backend=`` keyword is
    ``backend``, from one read of the options (a part of every planned call's key).  The
    preference is None unless the backend in force is ``"auto"`` (only "auto" reads it).
    Options a call overrides are not read: a bad ``MMFUSE_BACKEND`` does not stop a call
    naming its own backend."""
    if backend is not None:
        _check_option("backend", backend)
        if backend != "auto":  # nothing else is read (not even the environment, at import)
            return (backend, None)
    state = _current()
    if backend is None:
        last = _last_policy  # (one read: another thread may replace it)
        if last[0] is state:
            return last[1]
    name = backend or _value(state, "backend")
    policy = (name, _value(state, "prefer") if name == "auto" else None)
    if backend is None:
        _remember_policy(state, policy)
    return policy


# The policy of the last options state read without a backend= keyword (every planned call
# reads it; states are never changed in place, each set_config / config_context makes a new
# one, which this holds alive until the next, so an identity test says it is still in force)
_last_policy: tuple[Any, Any] = (None, None)


def _remember_policy(state: Any, policy: tuple[str, str | None]) -> None:
    global _last_policy
    _last_policy = (state, policy)
