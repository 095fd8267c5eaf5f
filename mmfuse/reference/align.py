"""Reference Zoom-and-Shift alignment: NumPy, float64, the plain loops of the definition.

mmfuse's own formalisation (the papers give no equations): statistics per sample and channel
over the token axis, population variance, eps inside the square root, masked tokens excluded;
zoom(X; G, a) = mu_X + (X - mu_X) (sigma_G / sigma_X)^a and shift(X; G, a) = X + a (mu_G - mu_X).
Rounds re-measure the arrays every time; the limit (``rounds=None``) iterates the round map on
(mean, log std) until it stops moving.  Slow on purpose: this is the oracle every other
implementation is tested against.  Inputs are assumed valid (the public layer checks them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["align", "moments", "shift", "zoom", "zoom_shift", "zoom_shift_fusion"]


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _lanes(x: np.ndarray, axis: int, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """x and its (broadcast) mask as (B, K, L): the statistics axis last, other axes in K."""
    axis = axis % x.ndim
    if mask is None:
        full = np.ones(x.shape, dtype=bool)
    else:
        m = np.asarray(mask, dtype=bool)
        full = np.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x.shape)
    xl = np.moveaxis(x, axis, -1)
    ml = np.moveaxis(full, axis, -1)
    b, length = x.shape[0], x.shape[axis]
    lanes = math.prod(n for i, n in enumerate(x.shape) if i not in (0, axis))  # not -1: B may be 0
    return xl.reshape(b, lanes, length), ml.reshape(b, lanes, length)


def _kept_shape(x: np.ndarray, axis: int) -> tuple[int, ...]:
    shape = list(x.shape)
    shape[axis % x.ndim] = 1
    return tuple(shape)


def _from_lanes(v: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """(B, K) per-lane values back to x's shape with ``axis`` kept as 1."""
    axis = axis % x.ndim
    moved = list(np.moveaxis(np.empty(_kept_shape(x, axis)), axis, -1).shape)
    return np.moveaxis(v.reshape(moved), -1, axis)


def moments(x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """mean = sum over unmasked tokens / n;  std = sqrt(sum (x - mean)^2 / n + eps)."""
    x = _f64(x)
    xl, ml = _lanes(x, axis, mask)
    mean = np.zeros(xl.shape[:2])
    std = np.zeros(xl.shape[:2])
    for b in range(xl.shape[0]):
        for k in range(xl.shape[1]):
            v = xl[b, k][ml[b, k]]  # the unmasked tokens of sample b, channel k
            n = len(v)
            mu = sum(v) / n
            var = sum((t - mu) ** 2 for t in v) / n
            mean[b, k] = mu
            std[b, k] = np.sqrt(var + eps)
    return _from_lanes(mean, x, axis), _from_lanes(std, x, axis)


def zoom(x: Any, scale: Any, *, center: Any) -> np.ndarray:
    """center + (x - center) * scale."""
    return _f64(center) + (_f64(x) - _f64(center)) * _f64(scale)


def shift(x: Any, offset: Any) -> np.ndarray:
    """x + offset."""
    return _f64(x) + _f64(offset)


def _zoom_shift_to(
    x: np.ndarray, mu_t: np.ndarray, sigma_t: np.ndarray, alpha: float, axis: int, mask: Any, eps: float
) -> np.ndarray:
    """Zoom then shift x toward target statistics (mu_t, sigma_t)."""
    mu_x, sigma_x = moments(x, axis=axis, mask=mask, eps=eps)
    scale = np.ones_like(sigma_x)
    for idx in np.ndindex(sigma_x.shape):
        if sigma_x[idx] > 0:  # a channel with no spread has nothing to zoom
            scale[idx] = (sigma_t[idx] / sigma_x[idx]) ** alpha
    zoomed = zoom(x, scale, center=mu_x)
    return shift(zoomed, alpha * (mu_t - mu_x))


def zoom_shift(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """mu_x + (x - mu_x) (sigma_g / sigma_x)^alpha + alpha (mu_g - mu_x)."""
    mu_g, sigma_g = moments(_f64(guide), axis=axis, mask=guide_mask, eps=eps)
    return _zoom_shift_to(_f64(x), mu_g, sigma_g, alpha, axis, mask, eps)


def _target(
    i: int, mus: list[np.ndarray], sigmas: list[np.ndarray], topology: str, hub: int
) -> tuple[np.ndarray, np.ndarray]:
    """Consensus: arithmetic mean of the others' means, geometric mean of their stds."""
    if topology == "hub":
        return mus[hub], sigmas[hub]
    others = [j for j in range(len(mus)) if j != i]
    mu_t: Any = sum(mus[j] for j in others) / len(others)
    sigma_t = np.ones_like(sigmas[i])
    for j in others:
        sigma_t = sigma_t * sigmas[j]
    return mu_t, sigma_t ** (1.0 / len(others))


def align(
    xs: list[Any],
    *,
    rounds: int | None = 1,
    alpha: float = 1.0,
    schedule: str = "gauss-seidel",
    topology: str = "consensus",
    hub: int = 0,
    axis: int = -2,
    masks: list[Any] | None = None,
    eps: float = 1e-5,
) -> list[np.ndarray]:
    """Alternating Zoom-and-Shift rounds, each re-measuring the arrays; or their limit."""
    ys = [_f64(x) for x in xs]
    n = len(ys)
    hub = hub % n
    masks = list(masks) if masks is not None else [None] * n
    if rounds is None:
        return _limit(ys, alpha, schedule, topology, hub, axis, masks, eps)
    for _ in range(rounds):
        previous = list(ys)  # Jacobi reads the previous round; Gauss-Seidel the latest values
        for i in range(n):
            if topology == "hub" and i == hub:
                continue  # the hub is the guide and stays where it is
            source = previous if schedule == "jacobi" else ys
            stats = [moments(y, axis=axis, mask=m, eps=eps) for y, m in zip(source, masks)]
            mu_t, sigma_t = _target(i, [s[0] for s in stats], [s[1] for s in stats], topology, hub)
            ys[i] = _zoom_shift_to(ys[i], mu_t, sigma_t, alpha, axis, masks[i], eps)
    return ys


def _limit(
    ys: list[np.ndarray],
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: list[Any],
    eps: float,
) -> list[np.ndarray]:
    """Run the round map on (mean, log std) until it stops moving; then one affine map each."""
    n = len(ys)
    stats = [moments(y, axis=axis, mask=m, eps=eps) for y, m in zip(ys, masks)]
    mu0 = [s[0] for s in stats]
    log0 = [np.log(s[1]) for s in stats]
    mus, logs = list(mu0), list(log0)
    for _ in range(100_000):
        old_mus, old_logs = list(mus), list(logs)
        for i in range(n):
            if topology == "hub" and i == hub:
                continue
            src_mu, src_log = (old_mus, old_logs) if schedule == "jacobi" else (mus, logs)
            mu_t: Any
            log_t: Any
            if topology == "hub":
                mu_t, log_t = src_mu[hub], src_log[hub]
            else:
                others = [j for j in range(n) if j != i]
                mu_t = sum(src_mu[j] for j in others) / len(others)
                log_t = sum(src_log[j] for j in others) / len(others)
            mus[i] = mus[i] + alpha * (mu_t - mus[i])
            logs[i] = logs[i] + alpha * (log_t - logs[i])
        moved = max(
            max(float(np.max(np.abs(a - b))) for a, b in zip(mus, old_mus)),
            max(float(np.max(np.abs(a - b))) for a, b in zip(logs, old_logs)),
        )
        scale = max(1.0, *(float(np.max(np.abs(a))) for a in mus + logs))
        if moved <= 1e-14 * scale:
            break
    else:
        raise ValueError("the iteration has no limit (Jacobi consensus, M = 2, alpha = 1)")
    return [
        mus[i] + (ys[i] - mu0[i]) * np.exp(logs[i] - log0[i])  # mu* + (x - mu) sigma* / sigma
        for i in range(n)
    ]


def zoom_shift_fusion(
    xs: list[Any],
    *,
    fuse: str | None = "concat",
    pool: str = "mean",
    **align_options: Any,
) -> Any:
    """Align, pool each sample's unmasked tokens (mean or max), then concat / sum / mean."""
    ys = align(xs, **align_options)
    masks = align_options.get("masks") or [None] * len(ys)
    pooled = []
    for y, m in zip(ys, masks):
        p = np.zeros((y.shape[0], y.shape[2]))
        for b in range(y.shape[0]):
            tokens = y[b] if m is None else y[b][np.asarray(m, dtype=bool)[b]]
            p[b] = tokens.mean(axis=0) if pool == "mean" else tokens.max(axis=0)
        pooled.append(p)
    if fuse is None:
        return pooled
    if fuse == "concat":
        return np.concatenate(pooled, axis=-1)
    total = sum(pooled)
    return total if fuse == "sum" else total / len(pooled)
