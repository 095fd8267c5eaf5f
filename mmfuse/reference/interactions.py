r"""Reference interaction terms of TFN, LMF and CP fusion: NumPy, float64, subsets expanded.

With :math:`\hat x_m = u_m + e_m`, :math:`u_m = [x_m; 0]` (the features) and
:math:`e_m = [0; 1]` (the constant), the outer product :math:`\bigotimes_m \hat x_m` is the sum
over the subsets S of the modalities of :math:`\bigotimes_m v_m` with :math:`v_m = u_m` for
m in S and :math:`v_m = e_m` otherwise.  Every function here builds each of those 2^M outer
products (or, for the factorised weights, each per-rank product) per sample, and groups them
by order by summing the subsets of that size.  Slow on purpose: the oracle.  Inputs are
assumed valid (the public layer checks them).

A factor :math:`e_m` selects the constant's entries of the weight and :math:`u_m` contracts its
feature entries with x_m: each term is formed from those slices, as the definition reads
(:math:`P_m = x_m^\top F_m[:d_m]`, :math:`c_m = F_m[d_m]`), not as dot products with the zero
entries of :math:`u_m` and :math:`e_m`, whose ``0 * nan`` and ``0 * inf`` made NaN of terms
that do not involve a non-finite entry (a NaN in a constant's row spread into every term, and
an infinite feature's terms no longer summed to ``tensor_fusion``; a review's find).
Without the constant (``append_one=False``, e_m = 0) a term with some e_m is zero by its
definition, whatever the other factors hold: it is left at 0, not formed as 0 times a
projection that may be NaN or inf (as the implementations, which carry it as no term).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._inputs import f64
from .fusion import cp_to_tensor

__all__ = [
    "cp_interactions",
    "interaction_shares",
    "lowrank_interactions",
    "subset_labels",
    "tensor_interactions",
]


def subset_labels(n_modalities: int) -> list[tuple[int, ...]]:
    """The 2^M subsets of ``range(M)`` as sorted tuples: by size, then lexicographically."""
    return [s for k in range(n_modalities + 1) for s in itertools.combinations(range(n_modalities), k)]


def _contract(w: np.ndarray, x: np.ndarray | None, in_subset: bool) -> np.ndarray:
    """``v . w`` over w's first axis for v = u = [x; 0] (``in_subset``) or e = [0; 1]: x
    contracted with w's feature rows (zeros for an absent modality, x None), or w's constant
    row; without the constant (``append_one=False``, u = x) x contracted with every row (e = 0
    is never contracted: the callers skip its terms, :func:`_vanishes`)."""
    if in_subset:
        return np.zeros(w.shape[1:]) if x is None else np.tensordot(x, w[: x.shape[0]], axes=1)
    return w[-1]


def _vanishes(subset: tuple[int, ...], n_modalities: int, append_one: bool) -> bool:
    """Whether the term of ``subset`` is zero by definition: without the constant, some
    modality outside the subset contributes e_m = 0."""
    return not append_one and len(subset) < n_modalities


def _features(xs: list[np.ndarray], present: Any, b: int) -> list[np.ndarray | None]:
    """Sample b's features; None for an absent modality (its u_m vanishes)."""
    if present is None:
        return [x[b] for x in xs]
    return [x[b] if bool(present[b, m]) else None for m, x in enumerate(xs)]


def _by(subset_terms: np.ndarray, n_modalities: int, by: str) -> tuple[np.ndarray, list[Any]]:
    """(2^M, B, h) subset terms -> the result for ``by``: as they are, or summed per order."""
    labels = subset_labels(n_modalities)
    if by == "subset":
        return subset_terms, list(labels)
    orders = np.zeros((n_modalities + 1, *subset_terms.shape[1:]))
    for s, term in zip(labels, subset_terms):
        orders[len(s)] += term
    return orders, list(range(n_modalities + 1))


def tensor_interactions(
    xs: Sequence[Any],
    weight: Any,
    *,
    by: str = "order",
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """T_S = W . (v_1 (x) ... (x) v_M), v_m = u_m for m in S and e_m otherwise, built per sample.

    ``max_elements`` is accepted for signature parity and ignored.
    """
    xs = [f64(x) for x in xs]
    w = f64(weight)
    n = len(xs)
    labels = subset_labels(n)
    terms = np.zeros((len(labels), xs[0].shape[0], w.shape[-1]))
    for b in range(xs[0].shape[0]):
        feats = _features(xs, None, b)
        for i, s in enumerate(labels):
            if _vanishes(s, n, append_one):
                continue
            z = w  # contracted one modality's axis at a time, the first remaining axis each
            for m, x in enumerate(feats):
                z = _contract(z, x, m in s)
            terms[i, b] = z
    return _by(terms, n, by)


def lowrank_interactions(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """T_S = sum_r w_r prod_{m in S} (u_m . F_m[r]) prod_{m not in S} (e_m . F_m[r]).

    (e_m . F_m[r] is the constant's row of the factor; u_m . F_m[r] the features' projection.)
    An absent modality (``present[b, m]`` False) has u_m = 0.  ``max_elements`` is ignored.
    """
    xs = [f64(x) for x in xs]
    factors = [f64(f) for f in factors]
    rank, _, out_dim = factors[0].shape
    w = np.ones(rank) if weights is None else f64(weights)
    n = len(xs)
    labels = subset_labels(n)
    terms = np.zeros((len(labels), xs[0].shape[0], out_dim))
    for b in range(xs[0].shape[0]):
        feats = _features(xs, present, b)
        for i, s in enumerate(labels):
            if _vanishes(s, n, append_one):
                continue
            for r in range(rank):
                term = np.full(out_dim, w[r])
                for m, (x, f) in enumerate(zip(feats, factors)):
                    term = term * _contract(f[r], x, m in s)
                terms[i, b] += term
    return _by(terms, n, by)


def cp_interactions(
    xs: Sequence[Any],
    cp: tuple[Any, Sequence[Any]],
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """TFN's terms for the full weight rebuilt from the CP decomposition (TensorLy layout).

    An absent modality's features are replaced by zeros.  ``max_elements`` is ignored.
    """
    xs = [f64(x).copy() for x in xs]
    if present is not None:
        for m, x in enumerate(xs):
            x[~np.asarray(present, dtype=bool)[:, m]] = 0.0
    return tensor_interactions(xs, cp_to_tensor(cp), by=by, append_one=append_one)


def _largest_about_one(t: np.ndarray) -> np.ndarray:
    """Scale-free: ``t`` times the power of two that brings its largest magnitude to about 1
    (exact), unscaled where that is 0 or not finite."""
    big = float(np.max(np.abs(t))) if t.size else 0.0
    return np.ldexp(t, -np.frexp(big)[1]) if math.isfinite(big) and big > 0 else t


def interaction_shares(terms: Any, *, kind: str = "variance") -> np.ndarray:
    """Share of each part: sum_j cov_b(T_k[:, j], y[:, j]) / sum_j var_b(y[:, j]), y = sum_k T_k.

    ``kind="norm"``: <T_k, y> / <y, y> over all samples and outputs (no centring).  NaN when
    the denominator is zero.
    """
    t = _largest_about_one(f64(terms))
    if t.shape[1] == 0:  # no sample: no share (and no mean of an empty batch to warn about)
        return np.full(t.shape[0], np.nan)
    if kind == "variance":  # each term centred first (then y is centred too), so that a
        # large constant term cannot absorb small ones; corrected two-pass (a second mean of
        # the deviations), exact where a spread is a few ulps of its mean; the deviations
        # scaled again (beside a constant term 1e300 times their size they underflowed)
        d = t - t.mean(axis=1, keepdims=True)
        t = _largest_about_one(d - d.mean(axis=1, keepdims=True))
    y = t.sum(axis=0)
    num = np.array([float(np.sum(tk * y)) for tk in t])
    den = float(np.sum(y * y))
    return num / den if den != 0 else np.full(t.shape[0], np.nan)
