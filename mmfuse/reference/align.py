"""Reference Zoom-and-Shift alignment: NumPy, float64, the plain loops of the definition.

mmfuse's own formalisation (the papers give no equations): statistics per sample and channel
over the token axis, population variance, eps inside the square root, masked tokens excluded;
zoom(X; G, a) = mu_X + (X - mu_X) (sigma_G / sigma_X)^a and shift(X; G, a) = X + a (mu_G - mu_X).
Rounds re-measure the arrays every time.  The limit (``rounds=None``) runs the same rounds on
the statistics alone (each round maps the data affinely, so it maps mean and raw variance
exactly: mu <- mu + a (mu_t - mu), var <- var (sigma_t / sigma)^(2 a), sigma = sqrt(var + eps)),
in double-double arithmetic, until they settle, then applies one affine map per modality.
Slow on purpose: this is the oracle every other implementation is tested against (the core
jumps to the limit through invariants of the rounds instead).  Inputs are assumed valid (the
public layer checks them).

Each mean is kept as the two-pass algorithm's first mean and correction, and a deviation
x - mean formed as (x - m0) - corr, so that a mean large against the spread never costs an
output its last bits (one float64 mean is good to an ulp of itself: at x about 1e8 with unit
spread that was 6e-9 on unit outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._exact import dd_add, dd_mul, two_prod, two_sum
from ._inputs import f64

__all__ = ["align", "moments", "shift", "zoom", "zoom_shift", "zoom_shift_fusion"]


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
    x = f64(x)
    xl, ml = _lanes(x, axis, mask)
    first, shift, var = (np.zeros(xl.shape[:2]) for _ in range(3))
    for b in range(xl.shape[0]):
        for k in range(xl.shape[1]):
            v = xl[b, k][ml[b, k]]  # the unmasked tokens of sample b, channel k
            n = len(v)
            if n == 0:  # (the public functions refuse such a mask before any arithmetic)
                raise ValueError(
                    f"mask masks every token of a lane of sample {b} (batch index): its statistics "
                    "are undefined"
                )
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
    return f64(center) + (f64(x) - f64(center)) * f64(scale)


def shift(x: Any, offset: Any) -> np.ndarray:
    """x + offset."""
    return f64(x) + f64(offset)


def _zoom_shift_parts(
    level: np.ndarray,
    x: np.ndarray,
    mu_t: np.ndarray,
    sigma_t: np.ndarray,
    alpha: float,
    axis: int,
    mask: Any,
    eps: float,
    in_rounds: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Zoom then shift the array ``level + x`` (``level`` one value per lane, unrounded)
    toward target statistics (mu_t, sigma_t), as the pair (offset, deviations) of the result,
    whose sum is the result: y = mu_y + (y - mu_y) s + alpha (mu_t - mu_y), with y - mu_y as
    (x - m0) - corr and mu_y = level + (m0 + corr).  The same maths, summed so that a large
    mean's ulps never reach the deviations.

    A channel with no spread has nothing to zoom: sigma 0 (at eps = 0), and within
    :func:`align`'s rounds (``in_rounds``) variance 0 at any eps, as in their limit: round
    after round, the zoom of a spread of sqrt(eps) toward a wider target compounds without
    end (its unmasked tokens sit at their mean whatever the scale; its padding would not).
    "No spread" is a spread of exactly 0: a NaN spread (a NaN token, or a variance past
    float64's range) gives a NaN scale, as in every implementation.
    """
    mu0, corr, var = _two_pass(x, axis, mask)
    mu_x, sigma_x = level + (mu0 + corr), np.sqrt(var + eps)
    scale = np.ones_like(sigma_x)
    for idx in np.ndindex(sigma_x.shape):
        if not (sigma_x[idx] == 0 or (in_rounds and var[idx] == 0)):
            scale[idx] = (sigma_t[idx] / sigma_x[idx]) ** alpha
    return (1.0 - alpha) * mu_x + alpha * mu_t, ((f64(x) - mu0) - corr) * scale


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
    mu_g, sigma_g = moments(f64(guide), axis=axis, mask=guide_mask, eps=eps)
    x = f64(x)
    offset, dev = _zoom_shift_parts(np.zeros(_kept_shape(x, axis)), x, mu_g, sigma_g, alpha, axis, mask, eps)
    return dev + offset


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
    xs: Sequence[Any],
    *,
    rounds: int | None = 1,
    alpha: float = 1.0,
    schedule: str = "gauss-seidel",
    topology: str = "consensus",
    hub: int | None = None,
    axis: int = -2,
    masks: Sequence[Any] | None = None,
    eps: float = 1e-5,
) -> list[np.ndarray]:
    """Alternating Zoom-and-Shift rounds, each re-measuring the arrays; or their limit.
    ``hub``: the guide of topology="hub" (None: 0); other topologies have none (the oracle
    ignores it there, where :func:`mmfuse.align` refuses it)."""
    ys = [np.array(x, dtype=np.float64) for x in xs]  # copies: rounds = 0 and the hub return new arrays
    n = len(ys)
    hub = 0 if hub is None else hub % n
    masks = list(masks) if masks is not None else [None] * n
    if rounds == 0 or alpha == 0:  # nothing moves (alpha = 0: any number of rounds, the limit)
        return ys
    if rounds is None:
        return _limit(ys, alpha, schedule, topology, hub, axis, masks, eps)
    # Each modality is held as the unrounded sum of a per-lane level and its deviations,
    # y = level + dev (level 0 at first), and every round measures and maps that sum.  A
    # round's output rounded to float64 and measured again lost the deviations' low bits to a
    # large mean (Jacobi swapping unit data through a mean of 1e8: 1e7 ulps; a spread of
    # 1e-12 zoomed toward a distant hub over three rounds: 6700 ulps)
    # (-0.0: a modality left where it is, the hub, comes back as dev + (-0.0), exactly its
    # input, -0.0 included, where + 0.0 turned -0.0 into 0.0)
    levels = [np.full(_kept_shape(y, axis), -0.0) for y in ys]
    for _ in range(rounds):
        # Jacobi reads the previous round; Gauss-Seidel the latest values
        previous = (list(levels), list(ys))
        for i in range(n):
            if topology == "hub" and i == hub:
                continue  # the hub is the guide and stays where it is
            lv, dv = previous if schedule == "jacobi" else (levels, ys)
            stats = [_moments_of(level, y, axis, m, eps) for level, y, m in zip(lv, dv, masks)]
            mu_t, sigma_t = _target(i, [s[0] for s in stats], [s[1] for s in stats], topology, hub)
            moved = _zoom_shift_parts(levels[i], ys[i], mu_t, sigma_t, alpha, axis, masks[i], eps, True)
            levels[i], ys[i] = moved
    return [dev + level for level, dev in zip(levels, ys)]


def _moments_of(level: np.ndarray, dev: np.ndarray, axis: int, mask: Any, eps: float) -> tuple[Any, Any]:
    """:func:`moments` of the unrounded sum ``level + dev`` (``level`` one value per lane)."""
    mu0, corr, var = _two_pass(dev, axis, mask)
    return level + (mu0 + corr), np.sqrt(var + eps)


def _limit(
    ys: list[np.ndarray],
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    axis: int,
    masks: Sequence[Any],
    eps: float,
) -> list[np.ndarray]:
    """Run the rounds on the statistics until they settle; then one map each.

    A round maps every (sample, channel) of x affinely, so it maps the statistics exactly:
    mu <- mu + a (mu_t - mu), and log var <- log var + 2 a (log sigma_t - log sigma); the
    means and the variances move independently.  After the rounds converge each modality is
    ``mu* + (x - mu0) sqrt(var* / var0)``.  The variances are iterated first: the means settle
    to an ulp of the outputs, whose size the limit's spreads give.

    Under the hub topology the limit is the hub's statistics, set directly (the hub never
    moves). Otherwise both iterations run in double-double arithmetic (a value as hi + lo): a
    float64 iteration adds a rounding of the state every round while a step of alpha removes
    only alpha of the distance, so it settles about eps64 / alpha from the limit (4e-12
    relative at alpha = 1e-3, on the old reference). A log-variance's step is computed from
    differences of the pairs, which vanish at the limit; a mean's step, (1 - a) mu + a mu_t,
    is exact to double-double precision, since the consensus limit keeps every step's rounding
    (:func:`_mean_step`).
    """
    n = len(ys)
    parts = [_two_pass(y, axis, m) for y, m in zip(ys, masks)]
    var0 = [var for _, _, var in parts]
    # A (sample, channel) with no spread keeps var = 0 and sigma = sqrt(eps) in every round; it
    # pulls the others' variance to 0 (consensus, or a hub with no spread), slowly (like 1/k),
    # so set that limit at once: with every variance 0 there, the rounds leave it alone.
    dead = [v == 0 for v in var0]
    collapse = dead[hub] if topology == "hub" else np.logical_or.reduce(dead)
    sources = _sources(n, schedule, topology, hub)
    jacobi = schedule == "jacobi"
    live = [~collapse & ~d for d in dead]
    logs = [_log_dd(np.where(lv, v, 1.0)) for lv, v in zip(live, var0)]  # log var0, double-double
    if topology == "hub":
        # the hub never moves: every live lane's limit is the hub's variance, and every mean's
        # the hub's (the iteration reached it too slowly where spreads are far below sqrt(eps))
        log_hi, log_lo = [logs[hub][0]] * n, [logs[hub][1]] * n
    else:
        log_hi, log_lo = _iterate(logs, sources, _spread_step(alpha, eps, live), lambda hi: 1.0, jacobi)
        _check_shared(log_hi, log_lo, live)
    # the growth log(var* / var0) as a (hi, lo) pair of the pairs' difference; S = sqrt(var* /
    # var0) = exp(growth / 2) (1 + lo / 2): a growth rounded to one float64 first carried an
    # ulp of |growth| into S (88 ulps at spreads of 1e100).  Collapsed: var* = 0; no spread: S = 1
    growth = [dd_add((h, e), (-h0, -e0)) for h, e, (h0, e0) in zip(log_hi, log_lo, logs)]
    scales = [
        np.where(lv, np.exp(0.5 * g) * (1.0 + 0.5 * gl), np.where(d, 1.0, 0.0))
        for lv, (g, gl), d in zip(live, growth, dead)
    ]
    # a mean has settled when it moves by far less than an ulp of an output, about the mean
    # plus the limit's spread (not the inputs' means or spreads: x about 1e8, or spread 1e100,
    # moved to a unit-sized guide ends unit-sized)
    spreads = [np.sqrt(v) * sc for v, sc in zip(var0, scales)]
    means = [two_sum(first, corr) for first, corr, _ in parts]
    if topology == "hub":
        mu_hi, mu_lo = [means[hub][0]] * n, [means[hub][1]] * n
    else:
        mu_hi, mu_lo = _iterate(
            means, sources, _mean_step(alpha),
            lambda hi: _lane_scale([np.abs(h) + sd for h, sd in zip(hi, spreads)]), jacobi,
        )  # fmt: skip
    out = []
    for i in range(n):
        if topology == "hub" and i == hub:  # it never moves: its copy (its statistics mapped
            out.append(ys[i])  # onto themselves lost a few ulps to rounding)
            continue
        first, corr, _ = parts[i]
        # x - mu0 as in _zoom_shift_parts; the limit's low part added before its high part
        out.append((((f64(ys[i]) - first) - corr) * scales[i] + mu_lo[i]) + mu_hi[i])
    return out


def _sources(n: int, schedule: str, topology: str, hub: int) -> list[tuple[int, list[int]]]:
    """The round's updates in order: (modality, the modalities its target is taken from)."""
    if topology == "hub":
        return [(i, [hub]) for i in range(n) if i != hub]
    return [(i, [j for j in range(n) if j != i]) for i in range(n)]


def _mean_step(alpha: float) -> Any:
    """A mean's new value (1 - a) mu + a mu_t, mu_t the others' average, as a (hi, lo) pair to
    double-double precision.  Exact steps matter here: the consensus limit depends on the
    path (every common value is a fixed point), so a rounded step stays in the limit; in this
    form a = 1 takes the target exactly (mu + (mu_t - mu) lost -1000 next to 1e121)."""
    keep = two_sum(1.0, -alpha)  # 1 - a, exact as a pair

    def step(i: int, others: list[int], hi: Sequence[Any], lo: Sequence[Any]) -> tuple[Any, Any]:
        total: tuple[Any, Any] = (0.0, 0.0)
        for j in others:
            total = dd_add(total, (hi[j], lo[j]))
        n = float(len(others))
        q = total[0] / n  # the average, as a pair: q + (total - q n) / n
        t, te = two_prod(q, n)
        target = two_sum(q, (((total[0] - t) - te) + total[1]) / n)
        return dd_add(dd_mul(keep, (hi[i], lo[i])), dd_mul((alpha, 0.0), target))

    return step


def _log_dd(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(v) for v > 0 as (hi, lo), good to about an ulp of 1 rather than of log(v) (whose
    own rounding, up to 700 ulps of 1, would move the limit): lo = log(v exp(-hi)), the
    product within a few ulps of 1."""
    hi = np.log(v)
    with np.errstate(over="ignore", invalid="ignore"):
        lo = np.log(v * np.exp(-hi))
    return two_sum(hi, np.where(np.isfinite(lo), lo, 0.0))


def _spread_step(alpha: float, eps: float, live: list[np.ndarray]) -> Any:
    """A log-variance's new value, log var + 2 a (log sigma_t - log sigma), sigma_t the others'
    geometric mean, for log var as (hi, lo) pairs (unmoved where not ``live``).

    log sigma_j - log sigma_i = log1p(w expm1(log var_j - log var_i)) / 2 with
    w = var_i / (var_i + eps): accurate relative to the difference itself, so the increments
    vanish at the limit instead of settling at rounding noise."""

    def share(h: Any) -> tuple[Any, Any]:
        """(w, 1 - w) with w = var / (var + eps), for log var = h: each as a quotient, so each
        is accurate where it is near 0."""
        if eps == 0:
            return 1.0, 0.0
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + eps * np.exp(-h)), 1.0 / (1.0 + np.exp(h) / eps)

    def step(i: int, others: list[int], hi: Sequence[Any], lo: Sequence[Any]) -> Any:
        w, u = share(hi[i])
        with np.errstate(divide="ignore"):  # log 0 = -inf: a term that vanishes
            log_w, log_u = np.log(w), np.log(u)
        total: Any = 0.0
        for j in others:
            d = (hi[j] - hi[i]) + (lo[j] - lo[i])  # log var_j - log var_i
            # log((var_j + eps) / (var_i + eps)) = log1p(w expm1(d)) = log(u + w e^d): the
            # first, accurate near d = 0, while its argument stays above -1/2 and expm1 does
            # not overflow; else the second, a sum of two positive terms taken in log space
            # (e^d and u underflow long before their logs do), as d + log(w + u e^-d) for d > 700
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # unused branches
                near = w * np.expm1(np.minimum(d, 700.0))
                low = np.logaddexp(log_u, log_w + d)
                high = d + np.logaddexp(log_w, log_u - d)
                total = total + np.where(d > 700.0, high, np.where(near >= -0.5, np.log1p(near), low))
        delta = np.where(live[i], alpha * (total / len(others)), 0.0)  # 2 a (1/2) mean
        return dd_add((hi[i], lo[i]), (delta, 0.0))

    return step


# The iteration stops where its distance to the limit, estimated from the last moves and their
# contraction, is below this fraction of each lane's scale (far below an ulp)
_SETTLED = 2.0**-62
_NOISE = 2.0**-100  # moves this small (relative) are the double-double arithmetic's own
_SWEEPS = 200_000
_WINDOW = 50


def _lane_scale(sizes: Sequence[Any]) -> Any:
    """Each lane's largest finite entry among ``sizes`` (one array per modality), 1 where none
    is finite and positive: a modality's NaN leaves the others' scale as it is."""
    with np.errstate(invalid="ignore"):
        s = np.fmax.reduce(sizes)  # fmax: NaN loses to a number
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)


def _largest(r: Any) -> float:
    """The largest finite entry of ``r`` (0 if none): lanes of non-finite inputs, whose
    increments are NaN or inf, never stop or hold up the others'."""
    return float(np.max(np.where(np.isfinite(r), r, 0.0), initial=0.0))


def _iterate(
    state: list[tuple[Any, Any]], sources: list[tuple[int, list[int]]], step: Any, scale: Any, jacobi: bool
) -> tuple[list[Any], list[Any]]:
    """Sweeps of ``step`` (a value's new (hi, lo) pair from the current ones) on double-double
    values, in the order of ``sources`` (Gauss-Seidel: each update reads the latest values;
    Jacobi: the previous sweep's), until they settle: until the largest move relative to its
    lane's scale (``scale(hi)``, finite and positive per lane) is 0 or double-double rounding,
    or it contracts and the distance left, move q / (1 - q) for the contraction q per sweep
    over the last :data:`_WINDOW` sweeps (those since a lane's scale last changed twofold), is
    below :data:`_SETTLED`.  Moves that are not
    finite (non-finite inputs) are left out of that test.  Returns the (hi, lo) lists."""
    hi, lo = [h for h, _ in state], [e for _, e in state]
    # moves relative to a scale held fixed (their contraction) and to the current one (the
    # stop: a mean moving from 1e8 to a unit-sized guide must settle to an ulp of 1)
    fixed = scale(hi)
    recent: list[float] = []  # the last sweeps' largest moves on the fixed scale
    for sweep in range(_SWEEPS):
        moved, moved_now = 0.0, 0.0
        read = (list(hi), list(lo)) if jacobi else (hi, lo)
        now = scale(hi)
        # A lane whose scale has changed more than twofold (a mean of 1e20 that the first
        # sweep pulled to the others' unit-sized ones) starts the contraction's estimate
        # afresh on the new scale: measured on the old one, that first collapse read as a
        # contraction of 1e-20 per sweep, and the iteration stopped after two sweeps with its
        # consensus means 1e-2 apart (a mutation review's find).
        if np.any((now > 2.0 * fixed) | (now < 0.5 * fixed)):
            fixed, recent = now, []
        for i, others in sources:
            new_hi, new_lo = step(i, others, *read)
            with np.errstate(invalid="ignore", over="ignore"):
                size = np.abs((new_hi - hi[i]) + (new_lo - lo[i]))  # how far it moved
            hi[i], lo[i] = new_hi, new_lo
            with np.errstate(invalid="ignore", over="ignore"):
                moved = max(moved, _largest(size / fixed))
                moved_now = max(moved_now, _largest(size / now))
        if moved == 0.0 or moved_now <= _NOISE:  # still, or moving by double-double rounding
            return hi, lo
        recent = [*recent[-(_WINDOW - 1) :], moved]
        # the contraction per sweep over the window (a single sweep's ratio wobbles where
        # modes mix or the increments reach their rounding)
        q = (moved / recent[0]) ** (1.0 / (len(recent) - 1)) if len(recent) > 1 else 1.0
        if q < 1.0:
            left = moved_now * q / (1.0 - q)  # the distance to the limit, contracting by q
            if left <= _SETTLED:
                return hi, lo
        # a steady contraction that needs more sweeps than are left (spreads far below
        # sqrt(eps), or any at a small alpha, barely move per round), or none: say so now
        # rather than at the end
        # (only on a full window: one restarted on a new scale a few sweeps ago says little,
        # and far-apart means that cancel, +-1e300 at alpha 0.1, restart it every few sweeps
        # for thousands of sweeps on their way to 0)
        if (
            sweep >= 1000
            and len(recent) == _WINDOW
            and (q >= 1.0 or sweep + math.log(_SETTLED / left) / math.log(q) > _SWEEPS)
        ):
            break
    raise _unsettled()


def _unsettled() -> ValueError:
    return ValueError(
        f"the rounds do not converge within {_SWEEPS} sweeps: spreads far below sqrt(eps) move by "
        "about var / eps of their distance per round, and with a small alpha all statistics move "
        "by about alpha of theirs, too slowly for the reference's iteration (and Jacobi consensus "
        "with M = 2 and alpha = 1 has no limit)"
    )


# Live log-variances of a lane further apart than this after the iteration: not at the limit
_SHARED = 2.0**-50  # (settled lanes are within about 2**-62)


def _check_shared(log_hi: Sequence[Any], log_lo: Sequence[Any], live: Sequence[Any]) -> None:
    """Refuse a variance iteration that stopped away from its limit. At the limit every live
    modality of a (sample, channel) has one variance (each sigma equals its target, the
    others' geometric mean; consensus only: the hub's limit is set directly). The iteration
    also stops where a sweep's moves are below double-double resolution, which spreads far
    below sqrt(eps) reach at once: a round moves their log-variances by about var / eps (1e-55
    for spreads of 1e-30 at eps = 1e-5), and the inputs' spreads came back as the limit."""
    # each pair's difference from the (hi, lo) pairs, as the steps take it (hi + lo rounded to
    # float64 would add an ulp of log var, 2**-49 at |log var| ~ 10)
    gap: Any = 0.0
    for i in range(len(log_hi)):
        for j in range(i + 1, len(log_hi)):
            with np.errstate(invalid="ignore"):
                d = np.abs((log_hi[j] - log_hi[i]) + (log_lo[j] - log_lo[i]))
            gap = np.maximum(gap, np.where(live[i] & live[j] & np.isfinite(d), d, 0.0))
    if np.any(gap > _SHARED):
        raise _unsettled()


def zoom_shift_fusion(
    xs: Sequence[Any],
    *,
    fuse: str | None = "concat",
    pool: str = "max",
    **align_options: Any,
) -> Any:
    """Align, pool each sample's unmasked tokens (max or mean), then concat / sum / mean."""
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
