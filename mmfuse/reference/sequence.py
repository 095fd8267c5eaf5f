"""Reference token-level sequence fusion and Wander adapter: NumPy, float64, the explicit tensor.

Wander (Guo et al., AAAI 2025) fuses M token sequences ``H_m`` (B, T_m, r_m) with one weight
tensor ``W`` of order 2M + 2, the outer product of a *feature* tensor and a *token* tensor,

    W_feat[s_1, ..., s_M, k] = sum_i prod_m Phi_m[i, s_m, k]        (r_1, ..., r_M, D)
    W_tok[tau_1, ..., tau_M, t] = sum_j prod_m Psi_m[j, tau_m, t]    (T_1, ..., T_M, T_out)
    W = W_tok (x) W_feat,

each a CP tensor whose output mode is shared by all ranks.  The fused output of sample b is the
full contraction of W with ``Z = H_1[b] (x) ... (x) H_M[b]``:

    Y[b, t, k] = sum_{tau, s} W_tok[tau_1..tau_M, t] W_feat[s_1..s_M, k] prod_m H_m[b, tau_m, s_m].

This module builds W explicitly (``sequence_weight``) and contracts it sample by sample.  It is
exponential in M on purpose: the oracle for small sizes, never a fast path.  Inputs are assumed
valid (the public layer checks them); it imports nothing from the rest of mmfuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._exact import two_prod
from ._inputs import f64

__all__ = [
    "feature_weight",
    "gelu",
    "sequence_fusion",
    "sequence_weight",
    "token_weight",
    "wander",
]


def _shared_last_mode(factors: list[np.ndarray]) -> np.ndarray:
    """sum_r prod_m F_m[r, i_m, k] as a dense (n_1, ..., n_M, K) tensor (the last mode shared)."""
    rank, _, last = factors[0].shape
    full = np.zeros((*(f.shape[1] for f in factors), last))
    for k in range(last):
        for r in range(rank):
            block = np.ones(())  # order 0; each outer product adds one mode
            for f in factors:
                block = np.multiply.outer(block, f[r, :, k])
            full[..., k] += block
    return full


def _collapse(factors: list[np.ndarray]) -> list[np.ndarray]:
    """The released code's factors: each modality's ranks summed, kept as a rank-1 stack."""
    return [f.sum(axis=0, keepdims=True) for f in factors]


def feature_weight(feature_factors: Sequence[Any], *, mode: str = "cp") -> np.ndarray:
    """W_feat[s_1, ..., s_M, k] = sum_i prod_m Phi_m[i, s_m, k], shape (r_1, ..., r_M, D)."""
    factors = [f64(f) for f in feature_factors]
    return _shared_last_mode(_collapse(factors) if mode == "collapsed" else factors)


def token_weight(token_factors: Sequence[Any], *, mode: str = "cp") -> np.ndarray:
    """W_tok[tau_1, ..., tau_M, t] = sum_j prod_m Psi_m[j, tau_m, t], shape (T_1, ..., T_M, T_out)."""
    factors = [f64(f) for f in token_factors]
    return _shared_last_mode(_collapse(factors) if mode == "collapsed" else factors)


def sequence_weight(
    feature_factors: Sequence[Any], token_factors: Sequence[Any], *, mode: str = "cp"
) -> np.ndarray:
    """The explicit order-(2M + 2) weight W = W_tok (x) W_feat.

    Modes are laid out ``(T_1, r_1, T_2, r_2, ..., T_M, r_M, T_out, D)`` so that W contracts
    with ``Z = H_1[b] (x) ... (x) H_M[b]`` over its first 2M modes.  With
    ``mode="collapsed"`` each modality's ranks are summed first (the released Wander code),
    which is the same tensor with R_h = R_t = 1.
    """
    n = len(feature_factors)
    w_feat = feature_weight(feature_factors, mode=mode)  # (r_1, ..., r_M, D)
    w_tok = token_weight(token_factors, mode=mode)  # (T_1, ..., T_M, T_out)
    full = np.multiply.outer(w_tok, w_feat)  # (T_1..T_M, T_out, r_1..r_M, D)
    order = [a for m in range(n) for a in (m, n + 1 + m)] + [n, 2 * n + 1]
    return np.transpose(full, order)


def _masked(hs: list[np.ndarray], masks: Any) -> list[np.ndarray]:
    """Zero the padded tokens (``masks[m][b, t]`` False) of each modality."""
    if masks is None:
        return hs
    out = []
    for h, mask in zip(hs, masks):
        h = h.copy()
        if mask is not None:
            h[~np.asarray(mask, dtype=bool)] = 0.0
        out.append(h)
    return out


def sequence_fusion(
    hs: Sequence[Any],
    feature_factors: Sequence[Any],
    token_factors: Sequence[Any],
    *,
    mode: str = "cp",
    masks: Any = None,
) -> np.ndarray:
    """Y[b] = W . (H_1[b] (x) ... (x) H_M[b]), contracting the explicit tensor W.

    ``mode="cp"`` uses W as given by the factors; ``mode="collapsed"`` sums each modality's
    ranks first (the released Wander code).  Padded tokens are zeroed before the contraction.
    """
    hs = _masked([f64(h) for h in hs], masks)
    w = sequence_weight(feature_factors, token_factors, mode=mode)
    n_modes = 2 * len(hs)
    out = np.zeros((hs[0].shape[0], *w.shape[-2:]))
    for b in range(hs[0].shape[0]):
        z = np.ones(())
        for h in hs:
            z = np.multiply.outer(z, h[b])  # adds the modes (T_m, r_m)
        out[b] = np.tensordot(z, w, axes=n_modes)
    return out


# 1 / sqrt(2) as a pair: the float64 nearest it, and the rest (to about 1e-33)
_RSQRT2 = 0.7071067811865476
_RSQRT2_LO = -4.833646656726457e-17


def gelu(x: Any) -> np.ndarray:
    """Exact GELU, x Phi(x) = x erfc(-x / sqrt 2) / 2, elementwise with ``math.erfc``.

    erfc's argument t = -x / sqrt 2 is formed as a pair u + delta (u its float64 value,
    delta the rest, ``mmfuse.reference._exact``), and erfc(t) = erfc(u) - delta (2 / sqrt pi) exp(-u^2)
    to first order: erfc of the rounded u alone is off by about 2 u^2 times u's rounding in
    the lower tail, up to 1600 ulps at x = -37 (against 40-digit mpmath; now within 3 ulps
    down to x = -37.5).  Below, erfc is subnormal and its own rounding (2^-1074 absolute),
    times x / 2, leaves up to about 20 ulps (or units of 2^-1074 once x Phi is subnormal too).
    """
    x = f64(x)
    u, lo = two_prod(x, -_RSQRT2)  # -x (1 / sqrt 2) = u + lo + (-x) _RSQRT2_LO
    erfc = np.vectorize(math.erfc, otypes=[np.float64])(u)
    with np.errstate(invalid="ignore", over="ignore"):  # u * u of a huge u: exp(-inf) = 0
        # delta zero where x is not finite (inf * exp(-inf) would be NaN)
        delta = np.where(np.isfinite(x), lo - x * _RSQRT2_LO, 0.0)
        erfc_t = erfc - delta * (2.0 / math.sqrt(math.pi)) * np.exp(-u * u)
        # x / 2 first: erfc_t is subnormal from x ~ -37.5, where halving it would lose a bit
        # (x = -inf: -inf * 0, NaN, as 0 * inf in the definition)
        return (x * 0.5) * erfc_t


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh z), z = sqrt(2 / pi) (x + 0.044715 x^3), written as the same function
    x sigmoid(2 z), with e = exp(-2 |z|): 1 + tanh z cancels for negative x."""
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    e = np.exp(-2.0 * np.abs(z))
    return x * np.where(z >= 0, 1.0, e) / (1.0 + e)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "identity": lambda x: x,
}


def wander(
    xs: Sequence[Any],
    params: dict[str, Any],
    *,
    mode: str = "cp",
    masks: Any = None,
    activation: Any = "gelu",
    residual: str = "first",
) -> np.ndarray:
    """The Wander adapter: down-project, activate, fuse (explicit W), add the residual.

    ``residual="first"`` adds the first T_out tokens of the inputs concatenated along the
    token axis (the released code); a callable ``activation`` is called on float64 NumPy.
    """
    xs = [f64(x) for x in xs]
    act = _ACTIVATIONS[activation] if isinstance(activation, str) else activation
    hs = []
    for x, (w, b) in zip(xs, params["down"]):
        # padded tokens may hold anything (NaN, inf), which the masks then drop: no warnings
        # of theirs, as no other backend gives (inf padding warned in the matmul)
        with np.errstate(invalid="ignore", over="ignore"):
            h = x @ f64(w)  # (B, T_m, d_m) @ (d_m, r_m)
            if b is not None:
                h = h + f64(b)
            hs.append(f64(act(h)))  # (the tanh GELU's cube overflows on padding of 1e308)
    y = sequence_fusion(hs, params["feature"], params["token"], mode=mode, masks=masks)
    if residual == "first":
        tokens = np.concatenate(xs, axis=1)  # (B, T_1 + ... + T_M, D)
        y = y + tokens[:, : y.shape[1], :]
    return y
