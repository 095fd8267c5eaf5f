"""How the references take their arrays: every one as a float64 NumPy array (:func:`f64`)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["f64"]


def f64(a: Any) -> np.ndarray:
    """``a`` as a float64 NumPy array (a copy only where it is not one already); TypeError
    for complex values, whose imaginary parts the conversion would drop with only a warning
    (the public functions refuse them too; a review's find)."""
    arr = np.asarray(a)
    if np.iscomplexobj(arr):
        raise TypeError(f"the references take real arrays, got {arr.dtype}")
    return np.asarray(arr, dtype=np.float64)
