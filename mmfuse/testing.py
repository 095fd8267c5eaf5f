"""Helpers for testing mmfuse and code built on it: ``assert_close`` and random inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._namespace import array_namespace, device_of, namespace_name, to_numpy

__all__ = ["assert_close", "default_rtol", "make_inputs"]

# Relative tolerances per dtype.  The ops chain M products and sums of up to a few thousand
# terms, so float32 is allowed a few hundred ulps; float64 results are compared tightly.
_RTOL = {"float64": 1e-10, "float32": 2e-4, "float16": 2e-2, "bfloat16": 5e-2}


def default_rtol(dtype: Any) -> float:
    """The relative tolerance used for results of ``dtype`` (by name: float32, float64, ...)."""
    name = str(dtype).rsplit(".", 1)[-1]
    return _RTOL.get(name, 2e-4)


def assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    err_msg: str = "",
) -> None:
    """Assert ``actual`` matches ``desired`` in namespace, dtype, shape, device and values.

    Parameters
    ----------
    actual : array
        The result under test.
    desired : array
        The expected values (any namespace; typically the float64 NumPy reference).
    rtol : float, optional
        Relative tolerance; default from ``actual``'s dtype (see :func:`default_rtol`).
    atol : float, optional
        Absolute tolerance; default ``rtol * max|desired|``, so that entries that cancel to
        near zero are judged on the scale of the whole result.
    xp, dtype, device : optional
        When given, ``actual`` must live in namespace ``xp``, have dtype ``dtype`` and sit on
        ``device``.

    Raises
    ------
    AssertionError
        With the first mismatching property, or the worst element and the tolerances.

    Examples
    --------
    >>> import numpy as np
    >>> from mmfuse.testing import assert_close
    >>> assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), dtype=np.float32)
    """
    prefix = f"{err_msg}: " if err_msg else ""
    if not array_api_compat.is_array_api_obj(actual):
        raise AssertionError(f"{prefix}expected an array, got {type(actual).__name__}")
    got_xp = array_namespace(actual)
    if xp is not None and namespace_name(got_xp) != namespace_name(array_namespace(xp.asarray(0.0))):
        raise AssertionError(f"{prefix}namespace {namespace_name(got_xp)} != {namespace_name(xp)}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"{prefix}dtype {actual.dtype} != {dtype}")
    if device is not None and device_of(actual) != device:
        raise AssertionError(f"{prefix}device {device_of(actual)!r} != {device!r}")
    a = to_numpy(actual)
    d = to_numpy(desired)
    if a.shape != d.shape:
        raise AssertionError(f"{prefix}shape {a.shape} != {d.shape}")
    if rtol is None:
        rtol = default_rtol(actual.dtype)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    if atol is None:
        atol = rtol * scale
    if not np.all(np.isfinite(a) == np.isfinite(d)):
        raise AssertionError(f"{prefix}non-finite values differ")
    finite = np.isfinite(d)
    err = np.abs(a - d)[finite]
    allowed = (atol + rtol * np.abs(d))[finite]
    if err.size and np.any(err > allowed):
        i = int(np.argmax(err - allowed))
        raise AssertionError(
            f"{prefix}values differ: max |actual - desired| = {err.max():.3e} "
            f"(worst excess at flat index {i}: {err[i]:.3e} > {allowed[i]:.3e}); "
            f"rtol={rtol:g}, atol={atol:.3e}, max|desired|={scale:.3e}"
        )


def make_inputs(
    dims: Sequence[int],
    *,
    batch: int,
    seed: int | np.random.Generator | None = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    tokens: Sequence[int] | None = None,
) -> list[Any]:
    """Random standard-normal modality inputs, (B, d_m) or (B, T_m, d_m) with ``tokens``.

    Drawn in float64 from ``seed`` (never zeros), then cast, so every namespace sees the same
    values.

    Examples
    --------
    >>> from mmfuse.testing import make_inputs
    >>> [x.shape for x in make_inputs([3, 5], batch=2, seed=0)]
    [(2, 3), (2, 5)]
    """
    rng = np.random.default_rng(seed)
    shapes = [(batch, d) for d in dims] if tokens is None else [(batch, t, d) for t, d in zip(tokens, dims)]
    arrays = [rng.standard_normal(s) for s in shapes]
    if xp is None:
        return [a if dtype is None else a.astype(dtype) for a in arrays]
    from ._namespace import from_numpy

    return [from_numpy(a, xp, dtype=dtype, device=device) for a in arrays]
