"""How the numba CPU kernels are compiled (:func:`cpu_kernel`): one rule for
:mod:`mmfuse.backends._numba_cpu` and :mod:`mmfuse.backends._numba_orders`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

__all__ = ["cpu_kernel"]


def cpu_kernel(fn: Callable[..., Any]) -> Any:
    """``numba.njit(cache=True, nogil=True)(fn)``: compiled on first use, per signature, and
    cached on disk, so later processes load it.

    Where numba finds no writable place for that cache, the kernel is compiled without it
    (in every process, on first use) instead.  numba refuses ``cache=True`` at decoration
    ("cannot cache function ...: no locator available") when ``NUMBA_CACHE_DIR`` is unset
    and neither the package's folder (a read-only install, a container's read-only root)
    nor the user's cache folder (no writable home: a service account) takes it; every numba
    call, "auto" ones included, then failed with that error (a review's find).
    """
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError as err:
        if "cannot cache" not in str(err):
            raise
        return numba.njit(nogil=True)(fn)
