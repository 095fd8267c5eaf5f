"""Reference Zoom-and-Shift alignment: NumPy, float64, the plain loops of the definition.

mmfuse's own formalisation (the papers give no equations): statistics per sample and channel
over the token axis, population variance, eps inside the square root, masked tokens excluded;
zoom(X; G, a) = mu_X + (X - mu_X) (sigma_G / sigma_X)^a and shift(X; G, a) = X + a (mu_G - mu_X).
Rounds re-measure the arrays every time.  The limit (``rounds=None``) runs the same rounds on
the statistics alone (each round maps the data affinely, so it maps mean and raw variance
exactly: mu <- mu + a (mu_t - mu), var <- var (sigma_t / sigma)^(2 a), sigma = sqrt(var + eps))
until they stop moving, then applies one affine map per modality.  Slow on purpose: this is
the oracle every other implementation is tested against (the core jumps to the limit through
invariants of the rounds instead).  Inputs are assumed valid (the public layer checks them).

Each mean is kept as the two-pass algorithm's first mean and correction, and a deviation
x - mean formed as (x - m0) - corr, so that a mean large against the spread never costs an
output its last bits (one float64 mean is good to an ulp of itself: at x about 1e8 with unit
spread that was 6e-9 on unit outputs).
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
    """mean = sum over unmasked tokens / n;  std = sqrt(sum (x - mean)^2 / n + eps).

    Computed as the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): a first mean
    m0 = sum x / n, deviations d = x - m0, then mean = m0 + sum d / n and
    var = sum d^2 / n - (sum d / n)^2.  The correction gives back what rounding took from m0:
    for a channel with no spread d is the same for every token, so var is exactly 0 (the
    plain two-pass form left ~1e-32 there whenever sum x / n missed the value, e.g. 7 tokens
    of 3.7 in float64, and at eps = 0 that tiny sigma turned the zoom into noise).
    """
    mu0, corr, var = _two_pass(x, axis, mask)
    return mu0 + corr, np.sqrt(var + eps)


def _two_pass(x: Any, axis: int, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m0, corr, var) of :func:`moments`' algorithm, in x's shape with ``axis`` kept as 1.
    The mean is m0 + corr; kept as the two, a deviation x - mean is (x - m0) - corr, to the
    last bit even where the mean is large against the spread (as one float64 the mean is
    only good to an ulp of itself: 1.5e-8 at 1e8, on unit-sized deviations)."""
    x = _f64(x)
    xl, ml = _lanes(x, axis, mask)
    first, shift, var = (np.zeros(xl.shape[:2]) for _ in range(3))
    for b in range(xl.shape[0]):
        for k in range(xl.shape[1]):
            v = xl[b, k][ml[b, k]]  # the unmasked tokens of sample b, channel k
            n = len(v)
            mu0 = sum(v) / n
            d = [t - mu0 for t in v]
            corr = sum(d) / n
            vk = sum(e * e for e in d) / n - corr * corr
            if vk < 0:  # rounding can go below 0; NaN stays
                vk = 0.0
            first[b, k], shift[b, k], var[b, k] = mu0, corr, vk
    return tuple(_from_lanes(a, x, axis) for a in (first, shift, var))  # type: ignore[return-value]


def zoom(x: Any, scale: Any, *, center: Any) -> np.ndarray:
    """center + (x - center) * scale."""
    return _f64(center) + (_f64(x) - _f64(center)) * _f64(scale)


def shift(x: Any, offset: Any) -> np.ndarray:
    """x + offset."""
    return _f64(x) + _f64(offset)


def _zoom_shift_to(
    x: np.ndarray,
    mu_t: np.ndarray,
    sigma_t: np.ndarray,
    alpha: float,
    axis: int,
    mask: Any,
    eps: float,
    in_rounds: bool = False,
) -> np.ndarray:
    """Zoom then shift x toward target statistics (mu_t, sigma_t).

    A channel with no spread has nothing to zoom: sigma 0 (at eps = 0), and within
    :func:`align`'s rounds (``in_rounds``) variance 0 at any eps, as in their limit: round
    after round, the zoom of a spread of sqrt(eps) toward a wider target compounds without
    end (its unmasked tokens sit at their mean whatever the scale; its padding would not).
    """
    mu0, corr, var = _two_pass(x, axis, mask)
    mu_x, sigma_x = mu0 + corr, np.sqrt(var + eps)
    scale = np.ones_like(sigma_x)
    for idx in np.ndindex(sigma_x.shape):
        if sigma_x[idx] > 0 and not (in_rounds and var[idx] == 0):
            scale[idx] = (sigma_t[idx] / sigma_x[idx]) ** alpha
    # zoom then shift, y = mu_x + (x - mu_x) s + alpha (mu_t - mu_x), with x - mu_x as
    # (x - m0) - corr and the means combined first: the same maths, summed so that a large
    # mean's ulps never reach a small output
    return ((_f64(x) - mu0) - corr) * scale + ((1.0 - alpha) * mu_x + alpha * mu_t)


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
    for j in others:  # the product of the roots: the roots' product would overflow first
        sigma_t = sigma_t * sigmas[j] ** (1.0 / len(others))
    return mu_t, sigma_t


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
            ys[i] = _zoom_shift_to(ys[i], mu_t, sigma_t, alpha, axis, masks[i], eps, in_rounds=True)
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
    """Run the rounds on (mean, raw variance) until they stop moving; then one map each.

    A round maps every (sample, channel) of x affinely, so it maps the statistics exactly;
    after the rounds converge each modality is ``mu* + (x - mu0) sqrt(var* / var0)``.
    """
    n = len(ys)
    parts = [_two_pass(y, axis, m) for y, m in zip(ys, masks)]
    mu0 = [first + corr for first, corr, _ in parts]
    var0 = [var for _, _, var in parts]
    mus, vs = list(mu0), list(var0)
    # A (sample, channel) with no spread keeps var = 0 and sigma = sqrt(eps) in every round; it
    # pulls the others' variance to 0 (consensus, or a hub with no spread), slowly (like 1/k),
    # so set that limit at once: with every variance 0 there, the rounds leave it alone.
    dead = [v == 0 for v in vs]
    collapse = dead[hub] if topology == "hub" else np.logical_or.reduce(dead)
    vs = [np.where(collapse, 0.0, v) for v in vs]
    for _ in range(200_000):
        old_mus, old_vs = list(mus), list(vs)
        for i in range(n):
            if topology == "hub" and i == hub:
                continue
            src_mu, src_v = (old_mus, old_vs) if schedule == "jacobi" else (mus, vs)
            sigmas = [np.sqrt(v + eps) for v in src_v]
            mu_t, sigma_t = _target(i, src_mu, sigmas, topology, hub)
            sigma_i = np.sqrt(vs[i] + eps)
            live = sigma_i > 0  # a channel with no spread has nothing to zoom
            scale = np.where(live, (sigma_t / np.where(live, sigma_i, 1.0)) ** alpha, 1.0)
            mus[i] = (1.0 - alpha) * mus[i] + alpha * mu_t  # mu + a (mu_t - mu), exact at a = 1
            vs[i] = vs[i] * scale * scale  # (v s) s: s**2 alone overflows first
        # stop when no statistic moves by more than ~50 ulps: rounding keeps the last ulps
        # moving, and the stopping point is within tol / (1 - contraction) of the limit
        still = any(
            np.any(np.abs(m - om) > 1e-14 * (np.abs(m) + np.sqrt(v))) or np.any(np.abs(v - ov) > 1e-14 * v)
            for m, om, v, ov in zip(mus, old_mus, vs, old_vs)
        )
        if not still:
            break
    else:
        raise ValueError(
            "the rounds did not converge in 200000 sweeps (Jacobi consensus with M = 2 and alpha = 1 "
            "has no limit; spreads far below sqrt(eps) converge too slowly for the reference)"
        )
    out = []
    for i in range(n):
        # S = sqrt(var* / var0); a modality with no spread keeps S = 1 (its deviations are 0)
        s = np.where(var0[i] > 0, np.sqrt(vs[i]) / np.sqrt(np.where(var0[i] > 0, var0[i], 1.0)), 1.0)
        first, corr, _ = parts[i]
        out.append(((_f64(ys[i]) - first) - corr) * s + mus[i])  # x - mu0 as in _zoom_shift_to
    return out


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
