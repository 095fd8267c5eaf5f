"""Error-free transformations of float64 arithmetic, for the references that need more
than float64 (Dekker, Knuth; a pair (hi, lo) stands for the unevaluated sum hi + lo).

The references are the oracle: where a float64 evaluation would round away more than an ulp
of the answer (the limit of the alignment rounds, the lower tail of the GELU), they carry the
lost bits in a second float64 instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dd_add", "dd_mul", "split", "two_prod", "two_sum"]


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bp = s - a
    return s, (a - (s - bp)) + (b - bp)


def two_prod(a: Any, b: Any) -> tuple[Any, Any]:
    """(p, e) with p = fl(a b) and p + e = a b exactly (Dekker, Veltkamp's split; for |a|,
    |b| below about 1e300, where the split does not overflow)."""
    p = a * b
    with np.errstate(over="ignore", invalid="ignore"):
        (ah, al), (bh, bl) = split(a), split(b)
        e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, np.where(np.isfinite(e), e, 0.0)


def split(a: Any) -> tuple[Any, Any]:
    """(hi, lo) = a with hi holding a's upper 26 bits (Veltkamp), so products of halves are exact."""
    t = 134217729.0 * a  # 2**27 + 1
    hi = t - (t - a)
    return hi, a - hi


def dd_add(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """a + b of two pairs, as a pair (to about 2^-104 relative)."""
    s, e = two_sum(a[0], b[0])
    return two_sum(s, e + (a[1] + b[1]))


def dd_mul(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """a b of two pairs, as a pair (to about 2^-104 relative; lo * lo dropped)."""
    p, e = two_prod(a[0], b[0])
    return two_sum(p, e + (a[0] * b[1] + a[1] * b[0]))
