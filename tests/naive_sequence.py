"""The naive, term-by-term definition of token-level sequence fusion, for the tests (the core
may not use it): float64-friendly NumPy, never the explicit weight tensor (which has
prod_m T_m r_m entries: out of reach at M = 8, r_m = 64)."""

from __future__ import annotations

import numpy as np


def naive_sequence_fusion(hs, feature, token, masks=None, mode="cp"):
    """Y[b] = sum_{i, j} prod_m Psi_m[j]^T H_m[b] Phi_m[i] with masked tokens zeroed; in
    collapsed mode the ranks are summed first (one i, one j).  NumPy arrays in, NumPy out."""
    if masks is not None:
        hs = [np.where(np.asarray(m)[:, :, None], h, 0.0) for h, m in zip(hs, masks)]
    if mode == "collapsed":
        feature = [f.sum(axis=0, keepdims=True) for f in feature]
        token = [t.sum(axis=0, keepdims=True) for t in token]
    y = 0.0
    for i in range(feature[0].shape[0]):
        for j in range(token[0].shape[0]):
            term = 1.0
            for h, f, t in zip(hs, feature, token):
                term = term * np.einsum("st,bsr,rk->btk", t[j], h, f[i])
            y = y + term
    return y
