"""The exact erf GELU, x Phi(x), at 40 digits or more (mpmath), for the tests that measure mmfuse's
GELU in float64 ulps: one home for the reference values they compare with."""

from __future__ import annotations

import numpy as np
import pytest


def exact_gelu(x, digits: int = 40) -> np.ndarray:
    """x Phi(x) for each element of ``x`` (taken as the float64 value it holds), computed with
    ``digits`` decimal digits and rounded once to float64; skips the calling test where
    mpmath is not installed."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()  # (its own precision: the shared context is left as it is)
    mp.dps = digits
    return np.array([float(mp.mpf(float(v)) * mp.ncdf(mp.mpf(float(v)))) for v in np.ravel(x)])


def ulps(got, want) -> float:
    """The largest error of ``got`` in float64 ulps of ``want``."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.spacing(np.abs(want))))
