"""Backend registry and the accelerated implementations that plug into it.

:func:`lookup` is the one dispatcher (see :mod:`mmfuse.backends._registry`; the public
functions ask its twin ``choose``, which also imports a chosen row's framework): it reads the
static table of mmfuse's implementations (:mod:`mmfuse.backends._table`) and the ones users
add with :func:`register`.  :func:`explain` says which implementation would run for given
arrays and why the others would not; every refusal of a forced backend raises
:class:`BackendUnsupported`.  Optional backends (``torch``, ``numba``, ``cupy``, ``triton``)
live in submodules that import their framework only when one of their implementations is
chosen, never at ``import mmfuse``.
"""

from ._registry import (
    BackendUnsupported,
    Explanation,
    Implementation,
    available,
    define_op,
    explain,
    implementations,
    lookup,
    register,
    unavailable,
    unregister,
)

__all__ = [
    "BackendUnsupported",
    "Explanation",
    "Implementation",
    "available",
    "define_op",
    "explain",
    "implementations",
    "lookup",
    "register",
    "unavailable",
    "unregister",
]
