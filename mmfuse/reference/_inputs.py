"""How the references take their arrays: every one as a float64 NumPy array (:func:`f64`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["f64"]


def f64(a: Any) -> np.ndarray:
    """``a`` as a float64 NumPy array (a copy only where it is not one already)."""
    return np.asarray(a, dtype=np.float64)
