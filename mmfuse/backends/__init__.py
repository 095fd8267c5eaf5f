"""Backend registry and the accelerated implementations that plug into it.

``register`` / ``lookup`` / ``available`` are the registry (see :mod:`mmfuse.backends._registry`).
Optional backends (``torch``, ``numba``, ``cupy``) live in submodules that import their framework
only inside functions and are loaded on demand, never by ``import mmfuse``.
"""

from ._registry import BackendUnsupported, Implementation, available, define_op, lookup, register, unavailable

__all__ = ["BackendUnsupported", "Implementation", "available", "define_op", "lookup", "register", "unavailable"]
