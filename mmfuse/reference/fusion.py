"""Reference TFN, LMF and CP fusion: NumPy, float64, written like the papers' equations.

Loops over samples and ranks, explicit outer-product tensors.  Slow on purpose: this is the
oracle every other implementation is tested against, and the code the docs show beside the
maths.  Inputs are assumed valid (the public layer checks them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._inputs import f64

__all__ = ["cp_fusion", "cp_to_lowrank", "lowrank_fusion", "lowrank_to_tensor", "tensor_fusion"]


def hat(x: np.ndarray, append_one: bool) -> np.ndarray:
    """hat x = [x; 1]: the constant is appended LAST, as in the TFN and LMF papers."""
    return np.append(x, 1.0) if append_one else x


def _present(present: Any, b: int, m: int) -> bool:
    return True if present is None else bool(present[b, m])


def tensor_fusion(
    xs: Sequence[Any],
    weight: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    max_elements: int | None = None,
) -> np.ndarray:
    """h = W . Z + b with Z = hat x_1 (x) ... (x) hat x_M built explicitly per sample.

    ``max_elements`` is accepted for signature parity and ignored: the reference is for
    sizes small enough to build Z.
    """
    xs = [f64(x) for x in xs]
    w = f64(weight)
    n_modes = len(xs)
    out = np.zeros((xs[0].shape[0], w.shape[-1]))
    for b in range(xs[0].shape[0]):
        z = np.ones(())  # an order-0 tensor; each outer product adds one mode
        for x in xs:
            z = np.multiply.outer(z, hat(x[b], append_one))
        out[b] = np.tensordot(z, w, axes=n_modes)  # sum over all input modes
    if bias is not None:
        out += f64(bias)
    return out


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> np.ndarray:
    """LMF: h = sum_r w_r prod_m (hat x_m . factors[m][r]) + b (the paper's Eq. 8, with the
    rank weights w_r of its released code).

    An absent modality (``present[b, m]`` False) enters as hat x_m = [0, ..., 0, 1].
    """
    xs = [f64(x) for x in xs]
    factors = [f64(f) for f in factors]
    rank, _, out_dim = factors[0].shape
    w = np.ones(rank) if weights is None else f64(weights)
    out = np.zeros((xs[0].shape[0], out_dim))
    for b in range(xs[0].shape[0]):
        for r in range(rank):
            term = np.full(out_dim, w[r])
            for m, (x, f) in enumerate(zip(xs, factors)):
                feats = x[b] if _present(present, b, m) else np.zeros_like(x[b])
                term = term * (hat(feats, append_one) @ f[r])
            out[b] += term
    if bias is not None:
        out += f64(bias)
    return out


def lowrank_to_tensor(
    factors: Sequence[Any], weights: Any = None, *, max_elements: int | None = None
) -> np.ndarray:
    """W[i_1, ..., i_M, k] = sum_r w_r prod_m factors[m][r, i_m, k].

    ``max_elements`` is accepted for signature parity and ignored (as in
    :func:`tensor_fusion`).
    """
    factors = [f64(f) for f in factors]
    rank, _, out_dim = factors[0].shape
    w = np.ones(rank) if weights is None else f64(weights)
    dims = tuple(f.shape[1] for f in factors)
    full = np.zeros((*dims, out_dim))
    for k in range(out_dim):
        for r in range(rank):
            block = np.full((), w[r])
            for f in factors:
                block = np.multiply.outer(block, f[r, :, k])
            full[..., k] += block
    return full


def cp_to_tensor(cp: tuple[Any, Sequence[Any]]) -> np.ndarray:
    """The full tensor of a CP decomposition: sum_r w_r a_1r (x) ... (x) a_Mr (x) c_r."""
    weights, factors = cp
    factors = [f64(f) for f in factors]
    rank = factors[0].shape[1]
    w = np.ones(rank) if weights is None else f64(weights)
    full = np.zeros(tuple(f.shape[0] for f in factors))
    for r in range(rank):
        block = np.full((), w[r])
        for f in factors:
            block = np.multiply.outer(block, f[:, r])
        full += block
    return full


def cp_fusion(
    xs: Sequence[Any],
    cp: tuple[Any, Sequence[Any]],
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
) -> np.ndarray:
    """TFN with the weight tensor W rebuilt in full from its CP decomposition (TensorLy layout).

    An absent modality's features are replaced by zeros before fusion.
    """
    xs = [f64(x).copy() for x in xs]
    if present is not None:
        for m, x in enumerate(xs):
            x[~np.asarray(present, dtype=bool)[:, m]] = 0.0
    return tensor_fusion(xs, cp_to_tensor(cp), bias, append_one=append_one)


def cp_to_lowrank(cp: tuple[Any, Sequence[Any]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Exact CP -> LMF conversion: F_1[r] = a_1r c_r^T and F_m[r] = a_mr 1^T for m > 1."""
    weights, factors = cp
    factors = [f64(f) for f in factors]
    out_factor = factors[-1]
    rank = out_factor.shape[1]
    lowrank = []
    for m, a in enumerate(factors[:-1]):
        f = np.zeros((rank, a.shape[0], out_factor.shape[0]))
        for r in range(rank):
            partner = out_factor[:, r] if m == 0 else np.ones(out_factor.shape[0])
            f[r] = np.outer(a[:, r], partner)
        lowrank.append(f)
    w = np.ones(rank) if weights is None else f64(weights)
    return lowrank, w
