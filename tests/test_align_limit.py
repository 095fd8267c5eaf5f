"""``align(rounds=None)`` is the exact limit of the rounds, also with eps > 0.

The rounds re-measure sigma = sqrt(var + eps) every time, so for spreads near sqrt(eps) their
limit is not the eps = 0 closed form (which was off by 0.3-0.5 of the output's spread for
spreads near 0.01, issue 23).  Here the limit is compared with 400 rounds (converged to
rounding for these spreads) for spreads from 1 down to 3e-3, both topologies, both schedules,
M = 2..4, with and without masks; with the NumPy reference (which iterates the recursion on
the statistics until it stops moving); and through torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmfuse
from mmfuse import reference
from mmfuse._namespace import to_numpy
from mmfuse.testing import assert_close

B, C = 3, 5
TOKENS = (9, 6, 7, 8)
SPREADS = [1.0, 1e-1, 1e-2, 3e-3]
# (schedule, topology); Jacobi consensus at M = 2 needs alpha < 1 (at alpha = 1 it swaps)
SCHEMES = [
    ("gauss-seidel", "consensus"),
    ("jacobi", "consensus"),
    ("gauss-seidel", "hub"),
    ("jacobi", "hub"),
]


def _masks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    out = []
    for m in range(n):
        mk = rng.random((B, TOKENS[m])) > 0.4
        mk[:, :2] = True  # at least two tokens per sample: a spread to measure
        out.append(mk)
    return out


def _data(rng: np.random.Generator, n: int, spread: float, masks=None) -> list[np.ndarray]:
    """n modalities whose measured per-channel spreads (over the unmasked tokens) lie in
    [0.5, 1.8] * ``spread``, and whose means differ by a few spreads, on an offset of 5.

    The tokens are standardised over the unmasked ones: a sample that keeps two tokens would
    otherwise often measure a spread several times smaller, where 400 rounds have not yet
    converged (the rounds slow down as the spread falls below sqrt(eps))."""
    out = []
    for m in range(n):
        z = rng.standard_normal((B, TOKENS[m], C))
        mean, sd = reference.moments(z, mask=None if masks is None else masks[m], eps=0.0)
        loc = 5.0 + spread * rng.normal(2.0 * m, 1.0, size=(B, 1, C))
        scale = spread * rng.uniform(0.5, 1.8, size=(B, 1, C))
        out.append(loc + scale * (z - mean) / sd)
    return out


def _assert_within_spread(got: np.ndarray, want: np.ndarray, mask, tol: float) -> None:
    """|got - want| <= tol * (want's spread), per sample and channel, over the unmasked tokens."""
    sd = reference.moments(want, mask=mask, eps=0.0)[1]
    err = np.abs(got - want)
    if mask is not None:
        err = np.where(mask[:, :, None], err, 0.0)
    worst = float(np.max(err / sd))
    assert worst <= tol, f"limit differs from 400 rounds by {worst:.3g} of the spread"


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize(("schedule", "topology"), SCHEMES)
@pytest.mark.parametrize("spread", SPREADS)
def test_limit_equals_400_rounds(rng, spread, schedule, topology, n, masked):
    masks = _masks(rng, n) if masked else None
    xs = _data(rng, n, spread, masks)
    alpha = float(rng.uniform(0.3, 0.9))
    opts = {"alpha": alpha, "schedule": schedule, "topology": topology, "hub": int(rng.integers(n))}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del opts["hub"]
    limit = mmfuse.align(xs, rounds=None, masks=masks, **opts)
    many = mmfuse.align(xs, rounds=400, masks=masks, **opts)
    for m, (y, z) in enumerate(zip(limit, many)):
        _assert_within_spread(y, z, None if masks is None else masks[m], 1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_limit_alpha_one_and_small_alpha(rng, alpha):
    """alpha = 1 (Gauss-Seidel consensus at M = 3: not one-step moment matching when eps > 0)
    and a slow alpha, at a spread where eps matters."""
    xs = _data(rng, 3, 5e-3)
    limit = mmfuse.align(xs, rounds=None, alpha=alpha)
    many = mmfuse.align(xs, rounds=400, alpha=alpha)
    for y, z in zip(limit, many):
        _assert_within_spread(y, z, None, 1e-6)


def test_hub_limit_matches_the_guides_raw_spread(rng):
    """Issue 23's symptom: at spreads near sqrt(eps) the moved modality must end at the
    guide's spread (it ended at std 0.00425 against the guide's 0.00304)."""
    xs = _data(rng, 3, 3e-3)
    ys = mmfuse.align(xs, rounds=None, alpha=0.5, topology="hub", hub=1)
    guide_sd = reference.moments(xs[1], eps=0.0)[1]
    for y in ys:
        assert_close(reference.moments(y, eps=0.0)[1], guide_sd, rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.6, 0.05])
@pytest.mark.parametrize(("schedule", "topology"), SCHEMES[:3])
def test_limit_matches_reference(xp, rng, schedule, topology, alpha):
    """Core (closed-form invariants) against the reference (the recursion in double-double
    arithmetic, run until it settles), on every namespace, with masks and a spread where eps
    matters: within 2e-12 of the spread, about 9 ulps of the outputs (about 5).  (At
    alpha = 0.05 the float64 reference stopped 1e-10 of the spread short.)"""
    masks = _masks(rng, 3)
    xs = _data(rng, 3, 4e-3, masks)
    opts = {"alpha": alpha, "schedule": schedule, "topology": topology, "hub": 2}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del opts["hub"]
    got = mmfuse.align([xp.asarray(x) for x in xs], rounds=None, masks=[xp.asarray(m) for m in masks], **opts)
    want = reference.align(xs, rounds=None, masks=masks, **opts)
    for m, (g, w) in enumerate(zip(got, want)):
        _assert_within_spread(to_numpy(g), w, masks[m], 2e-12)


@pytest.mark.parametrize(("schedule", "topology"), SCHEMES[:3])
def test_torch_gradients_of_the_limit(rng, schedule, topology):
    """Gradients flow through rounds=None and equal those of 400 rounds (float64)."""
    torch = pytest.importorskip("torch")
    xs = _data(rng, 3, 5e-3)
    weights = [torch.tensor(rng.standard_normal(x.shape)) for x in xs]
    opts = {"alpha": 0.7, "schedule": schedule, "topology": topology, "hub": 0}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del opts["hub"]

    def grads(rounds):
        ts = [torch.tensor(x, requires_grad=True) for x in xs]
        ys = mmfuse.align(ts, rounds=rounds, backend="array_api", **opts)
        sum((w * y).sum() for w, y in zip(weights, ys)).backward()
        return [t.grad for t in ts]

    got, want = grads(None), grads(400)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        scale = float(w.abs().max())
        assert scale > 0
        assert float((g - w).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("topology", ["consensus", "hub"])
def test_zero_spread_channel_limit_matches_reference(rng, topology):
    """A constant channel keeps sigma = sqrt(eps) and pulls the others' raw variance to 0: the
    limit collapses them (consensus, or a constant hub); the constant modality is shifted."""
    xs = _data(rng, 3, 1e-2)
    xs[0][:, :, 1] = 2.5  # modality 0 (the hub below) has no spread in channel 1
    xs[2][0, :, 3] = -1.0  # modality 2, sample 0, channel 3 neither
    opts = {"alpha": 0.5, "topology": topology, "hub": 0}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del opts["hub"]
    got = mmfuse.align(xs, rounds=None, **opts)
    want = reference.align(xs, rounds=None, **opts)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * 1e-2)
    assert np.ptp(got[1][:, :, 1], axis=1).max() == 0.0  # collapsed onto the constant channel


def test_newton_solves_the_gauss_seidel_equation(rng):
    """Six Newton steps solve y - (alpha/2) log(1 + e^y) = psi to rounding, far into both tails."""
    from mmfuse._core import align_limit

    psi = np.concatenate([rng.uniform(-60, 60, 200), [-700.0, -30.0, 0.0, 1e-3, 30.0, 700.0]])
    for alpha in (1e-3, 0.3, 0.7, 1.0):
        y = align_limit.solve_gauss_seidel(np, psi, alpha)
        residual = y - alpha / 2 * np.logaddexp(0.0, y) - psi
        assert np.all(np.abs(residual) <= 4e-16 * np.maximum(1.0, np.abs(psi)))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_reference_limit_of_spreads_far_apart(alpha):
    """The reference's iterative limit overflowed to +-inf for spreads 1e-150 and 1e150
    (v s**2 with s**2 = 1e600, and var* / var0), where the limit is finite: +-1e150 at
    alpha = 1, +-1e50 at alpha = 0.5 (the core's closed form gave them)."""
    z = np.array([-1.0, 1.0, -1.0, 1.0])[None, :, None]
    xs = [1e-150 * z, 1e150 * z]
    want = 1e150 if alpha == 1.0 else 1e50
    for backend in ("reference", "array_api"):
        for out in mmfuse.align(xs, rounds=None, alpha=alpha, eps=0.0, backend=backend):
            np.testing.assert_allclose(out, want * z, rtol=1e-12)


def _limit_in_mpmath(xs: list[np.ndarray], alpha: float, schedule: str, topology: str, eps: float) -> list[np.ndarray]:
    """The limit of the rounds by their recursion on (mean, variance), in 40-digit arithmetic,
    per (sample, channel) lane: the outputs mu* + (x - mu0) sqrt(var* / var0)."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 40
    n, a = len(xs), mp.mpf(alpha)
    outs = [np.empty_like(x) for x in xs]
    for b in range(xs[0].shape[0]):
        for k in range(xs[0].shape[2]):
            tokens = [[mp.mpf(float(t)) for t in x[b, :, k]] for x in xs]
            mu0 = [sum(v) / len(v) for v in tokens]
            var0 = [sum((t - m) ** 2 for t in v) / len(v) for v, m in zip(tokens, mu0)]
            mus, vs = list(mu0), list(var0)
            for _ in range(100_000):
                old = list(mus) + list(vs)
                # Jacobi reads the values before the sweep, Gauss-Seidel the latest
                src_mu, src_v = (list(mus), list(vs)) if schedule == "jacobi" else (mus, vs)
                for i in range(n):
                    if topology == "hub" and i == 0:
                        continue
                    others = [0] if topology == "hub" else [j for j in range(n) if j != i]
                    mu_t = sum(src_mu[j] for j in others) / len(others)
                    log_sigma_t = sum(mp.log(src_v[j] + eps) for j in others) / (2 * len(others))
                    scale = mp.exp(a * (log_sigma_t - mp.log(vs[i] + eps) / 2))
                    mus[i] = mus[i] + a * (mu_t - mus[i])
                    vs[i] = vs[i] * scale * scale
                if max(abs(u - v) for u, v in zip(old, list(mus) + list(vs))) < mp.mpf(10) ** -30:
                    break
            for i in range(n):
                s = mp.sqrt(vs[i] / var0[i])
                outs[i][b, :, k] = [float(mus[i] + (t - mu0[i]) * s) for t in tokens[i]]
    return outs


@pytest.mark.parametrize(("schedule", "topology"), [("gauss-seidel", "consensus"), ("jacobi", "hub")])
def test_reference_limit_at_small_alpha_is_exact(rng, schedule, topology):
    """The reference iterated the statistics in float64 until a round moved them by less than
    1e-14: at small alpha (each round removing alpha of the distance) it stopped about
    eps64 / alpha short of the limit, 1e-13 of the outputs' scale at alpha = 0.05 (500 ulps;
    4e-12 at alpha = 1e-3).  In double-double arithmetic, with a stop estimated from the
    contraction, it is within a few ulps of a 40-digit iteration."""
    xs = [rng.standard_normal((1, 5, 2)), 2.0 + 3.0 * rng.standard_normal((1, 4, 2)),
          -1.0 + 0.5 * rng.standard_normal((1, 6, 2))]  # fmt: skip
    want = _limit_in_mpmath(xs, 0.05, schedule, topology, 1e-5)
    got = reference.align(xs, rounds=None, alpha=0.05, schedule=schedule, topology=topology, eps=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=8 * np.finfo(np.float64).eps * np.abs(w).max())


def test_reference_limit_says_when_it_cannot_settle(rng):
    """Spreads far below sqrt(eps) move by about var / eps of the distance per round: the
    reference stopped after a few rounds and returned a limit 0.6 of the outputs' scale off
    (eps = 1e30) without a word.  Now its contraction estimate says within 1000 sweeps that
    200000 would not do, and it refuses; the core's closed form has no such limit."""
    xs = [rng.standard_normal((2, 5, 3)), 2.0 + 3.0 * rng.standard_normal((2, 4, 3))]
    for eps in (1e8, 1e30):
        with pytest.raises(ValueError, match=r"do not converge within 200000 sweeps"):
            reference.align(xs, rounds=None, eps=eps)
    # one spread 1e-140 (its sigma is sqrt(eps)), the other 1e140: the variances' increments
    # once went through log1p(-1) and came back NaN
    far = [1e140 * xs[0], 1e-140 * xs[1]]
    with pytest.raises(ValueError, match=r"do not converge within 200000 sweeps"):
        reference.align(far, rounds=None)


def test_reference_limit_refusal_names_a_small_alpha(rng):
    """At alpha = 1e-7 a round moves the statistics by about alpha of their distance, so the
    reference's iteration would need far more than its sweeps; its refusal had named only
    spreads far below sqrt(eps) as the cause, also at eps = 0 with unit spreads (a review's
    find).  The public closed form computes that limit."""
    xs = [rng.standard_normal((2, 4, 3)), 2.0 + 3.0 * rng.standard_normal((2, 6, 3))]
    with pytest.raises(ValueError, match=r"do not converge within 200000 sweeps: .*with a small alpha"):
        reference.align(xs, rounds=None, alpha=1e-7, eps=0.0)
    ys = mmfuse.align(xs, rounds=None, alpha=1e-7, eps=0.0)
    np.testing.assert_allclose(ys[0].std(axis=1), ys[1].std(axis=1), rtol=1e-9)


@pytest.mark.parametrize("topology", ["consensus"])
def test_reference_limit_refuses_spreads_too_small_to_move(rng, topology):
    """Spreads of 1e-20 and 1e-30 at eps = 1e-5: a round moves their log-variances by about
    var / eps (1e-35, 1e-55 of the distance), below double-double resolution, so the
    reference's iteration saw no motion at its first sweep and returned the inputs' spreads
    as the limit (x's spread 0.2-0.8 of the guide's, where the limit shares one).  It now
    checks that the live modalities of each lane share a variance, and refuses otherwise;
    the public closed form gives the shared spread."""
    for s in (1e-20, 1e-30):
        xs = [s * rng.standard_normal((2, 6, 3)), s * (1.0 + 2.0 * rng.standard_normal((2, 5, 3)))]
        with pytest.raises(ValueError, match=r"do not converge within 200000 sweeps: spreads far below sqrt\(eps\)"):
            reference.align(xs, rounds=None, alpha=0.5, topology=topology)
        ys = mmfuse.align(xs, rounds=None, alpha=0.5, topology=topology)
        np.testing.assert_allclose(ys[0].std(axis=1), ys[1].std(axis=1), rtol=1e-9)
    # spreads 1e-13 apart (relative) stop below resolution too: 1e-13 short of a shared
    # spread, where the public closed form is within 1e-15 (the check's first bound, 2**-40,
    # let that through)
    base = rng.standard_normal((2, 6, 3))
    near = [1e-20 * base, 1e-20 * (1.0 + 1e-13) * base[:, ::-1]]
    with pytest.raises(ValueError, match=r"do not converge within 200000 sweeps"):
        reference.align(near, rounds=None, alpha=0.5, topology=topology)


@pytest.mark.parametrize(("spread", "hub_spread", "eps"), [(1.0, 1e-5, 1e-5), (1e-20, 1e-30, 1e-5), (1e100, 1.0, 0.0), (1e-100, 1e30, 0.0)])
def test_reference_hub_limit_is_the_hubs_statistics(rng, spread, hub_spread, eps):
    """Under the hub topology the hub never moves, so the limit is its statistics: every
    other modality ends ``mu_hub + (x - mu_x) sigma_hub / sigma_x`` (live lanes).  The
    reference iterated toward it and refused hubs with spreads far below sqrt(eps) (too slow
    to move), and the growth log(var* / var0), rounded to one float64, cost 88 ulps of the
    output at spreads of 1e100, in the public closed form too (exp of the logs' difference).
    Both are within a few ulps of the closed form in 60-digit arithmetic now (an
    exact-arithmetic review of the oracle)."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 60
    x = spread * rng.standard_normal((2, 7, 2))
    hub = 2.0 + hub_spread * rng.standard_normal((2, 5, 2))

    def stats(v):
        mean = mp.fsum(v) / len(v)
        return mean, mp.sqrt(mp.fsum((t - mean) ** 2 for t in v) / len(v))

    want = np.empty_like(x)
    for b in range(2):
        for c in range(2):
            (mx, sx), (mh, sh) = stats([mp.mpf(t) for t in x[b, :, c]]), stats([mp.mpf(t) for t in hub[b, :, c]])
            want[b, :, c] = [float(mh + (mp.mpf(t) - mx) * sh / sx) for t in x[b, :, c]]
    scale = np.abs(want).max(axis=1, keepdims=True)
    for got in (reference.align([x, hub], rounds=None, alpha=0.5, topology="hub", hub=1, eps=eps),
                mmfuse.align([x, hub], rounds=None, alpha=0.5, topology="hub", hub=1, eps=eps)):  # fmt: skip
        assert np.all(np.abs(got[0] - want) <= 4 * np.spacing(scale))
        # the hub itself, bit for bit, as the finite rounds return it (the reference's limit
        # mapped its statistics onto themselves: a few ulps off; a review of the options)
        assert np.array_equal(got[1], hub) and got[1] is not hub


def test_reference_align_returns_new_arrays(rng):
    """``rounds=0`` returns copies (the docs' promise), and so does the hub's output: the
    reference returned the input arrays themselves."""
    a, b = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 2))
    for out in (reference.align([a, b], rounds=0), reference.align([a, b], rounds=2, topology="hub")):
        assert not np.shares_memory(out[0], a) and not np.shares_memory(out[1], b)
        np.testing.assert_array_equal(out[0], a)  # (the hub, modality 0, stays where it is)


@pytest.mark.parametrize("topology", ["consensus", "hub"])
def test_reference_limit_of_a_lane_ignores_another_lanes_nan(rng, topology):
    """Lanes are independent: a NaN token in one (sample, channel) leaves every other lane's
    limit as it is without it (a NaN lane's scale once made the stopping test see no motion
    at all, and the means stopped after a sweep or two)."""
    a, b = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3))
    with_nan = a.copy()
    with_nan[0, 1, 2] = np.nan
    clean = reference.align([a, b], rounds=None, alpha=0.5, topology=topology)
    dirty = reference.align([with_nan, b], rounds=None, alpha=0.5, topology=topology)
    for c, d in zip(clean, dirty):
        lane = np.zeros(c.shape, dtype=bool)
        lane[0, :, 2] = True  # the NaN's lane
        np.testing.assert_array_equal(c[~lane], d[~lane])


def test_reference_limit_settles_where_a_lane_has_no_spread_or_a_nan(rng):
    """The stopping test divides each increment by its lane's scale: a channel of zeros (no
    spread, mean 0: a zero-padded feature) gave a scale of 0, and a NaN in one modality's
    lane made that lane's scale NaN for every modality; their increments were then left out
    of the test, and with nothing else moving the means stopped after one sweep (hub)."""
    h = 100.0 + rng.standard_normal((1, 6, 2))
    padded = h.copy()
    padded[0, :, 0] = 0.0
    for eps in (1e-5, 0.0):
        opts = {"rounds": None, "alpha": 0.5, "topology": "hub", "eps": eps}
        for got, want in zip(reference.align([h, padded], **opts), mmfuse.align([h, padded], backend="array_api", **opts)):
            np.testing.assert_allclose(got, want, rtol=1e-14)
    g = rng.standard_normal((1, 6, 2))
    with_nan, shifted = g.copy(), g.copy()
    with_nan[0, 0, 0] = np.nan
    shifted[0, :, 0] += 10.0
    for schedule in ("gauss-seidel", "jacobi"):
        opts = {"rounds": None, "alpha": 0.5, "topology": "hub", "hub": 0, "schedule": schedule}
        got = reference.align([g, with_nan, shifted], **opts)[2]
        want = mmfuse.align([g, with_nan, shifted], backend="array_api", **opts)[2]
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(("scale_a", "scale_b", "opts"), [
    (1e100, 1e-70, {"alpha": 1.0, "eps": 0.0, "topology": "hub", "hub": 1}),
    (1e153, 1e-10, {"alpha": 0.5, "eps": 1e-5}),
])  # fmt: skip
def test_reference_limit_of_variances_1e300_apart(rng, scale_a, scale_b, opts):
    """Variances further apart than the float64 range of exp: a term of the log-variance
    step, log(u + w e^d), took log(0) (e^d underflowed, u = 0 at eps = 0 or underflowed), a
    warning and NaN outputs; it is now summed in log space.  The means settle to an ulp of the
    outputs, which the limit's spreads size (1e-70 here, where the inputs' were 1e100)."""
    a, b = rng.standard_normal((2, 6, 3)), 5.0 + 3.0 * rng.standard_normal((2, 8, 3))
    xs = [scale_a * a, scale_b * b]
    for got, want in zip(reference.align(xs, rounds=None, **opts), mmfuse.align(xs, rounds=None, backend="array_api", **opts)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * np.abs(want).max())


def test_reference_limit_takes_exact_steps_on_far_apart_means(rng):
    """The consensus limit depends on the path (every common value is a fixed point), so a
    rounded step stays in it: means 1e15 moved to about 0 at alpha = 1 were 1.6e-3 off on
    unit-sized outputs (a float64 increment), and a mean 1e121 moved to -1000 in one
    double-double increment lost the -1000 altogether.  A hub whose means sit at 1e15, with
    a modality spread 1e121 at eps = 0, made the stop test see rounding noise as no
    contraction and refuse."""
    xs = [1e15 + rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 7, 3))]
    for got, want in zip(reference.align(xs, rounds=None), mmfuse.align(xs, rounds=None, backend="array_api")):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * np.abs(want).max())
    # a modality without spread: consensus collapses every spread; the means meet at its -1000
    flat = [1e8 + 1e121 * rng.standard_normal((1, 5, 2)), np.full((1, 4, 2), -1000.0)]
    for got in reference.align(flat, rounds=None, eps=1.0):
        np.testing.assert_array_equal(got, -1000.0)
    masks = [rng.random((2, t)) < 0.6 for t in (7, 8)]
    for mk in masks:
        mk[:, :2] = True
    hubbed = [1e15 + 4.5e121 * rng.standard_normal((2, 7, 3)), 1e15 + 7.6 * rng.standard_normal((2, 8, 3))]
    opts = {"rounds": None, "alpha": 0.5, "eps": 0.0, "topology": "hub", "hub": 1, "schedule": "jacobi", "masks": masks}
    for got, want in zip(reference.align(hubbed, **opts), mmfuse.align(hubbed, backend="array_api", **opts)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * np.abs(want).max())


@pytest.mark.parametrize("options", [{"topology": "hub", "hub": 1}, {}, {"schedule": "jacobi", "alpha": 0.5}])
@pytest.mark.parametrize("backend", ["array_api", "torch"])
def test_float32_limit_is_as_accurate_as_a_round(rng, options, backend):
    """The limit's scales are differences of logs of the variances, whose rounding grows with
    |log v|: in float32 they gave 20 ulps of the output at spreads near 1e15 (hub; 16x a
    round's error at the default options, spreads 1e4 and 1).  float32 statistics now take
    their limit in float64: within a few float32 ulps of the float64 reference."""
    if backend == "torch":
        torch = pytest.importorskip("torch")
        conv = torch.from_numpy
    else:
        conv = np.asarray
    for spreads in ((1e15, 3e15), (1e4, 1.0)):
        xs = [(s * rng.standard_normal((16, t, 4))).astype(np.float32) for s, t in zip(spreads, (200, 237))]
        want = reference.align([x.astype(np.float64) for x in xs], rounds=None, **options)
        got = mmfuse.align([conv(x) for x in xs], rounds=None, backend=backend, **options)
        for y, w in zip(got, want):
            y = to_numpy(y, dtype=None)
            assert y.dtype == np.float32
            assert float(np.abs(y - w).max()) <= 4e-7 * float(np.abs(w).max())


def test_limit_with_dead_lanes_equals_many_rounds():
    """Lanes with no spread in the closed-form limit, where a mutation audit found them
    untested: a constant channel in a modality that is not the hub (M = 3, hub 1: the
    others keep the hub's spread, only a dead hub lane collapses them), and, under
    consensus, a modality with one unmasked token per sample (its masked tokens shifted
    with it, as the rounds do)."""
    rng = np.random.default_rng()
    xs = [rng.standard_normal((2, 6, 3)), 2.0 + rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3))]
    xs[0][:, :, 0] = 1.5
    opts = {"alpha": 0.6, "topology": "hub", "hub": 1}
    for y, z in zip(mmfuse.align(xs, rounds=None, **opts), mmfuse.align(xs, rounds=400, **opts)):
        np.testing.assert_allclose(y, z, rtol=1e-10, atol=1e-10)
    masks = [np.zeros((2, 6), bool), None, None]
    masks[0][:, 2] = True  # one real token per sample
    xs[0][:, :, 0] = rng.standard_normal((2, 6))  # (its other channels constant over the one token anyway)
    # the one-token modality, masked tokens too (the others' spreads collapse toward its 0
    # only like 1 / k, which 400 rounds do not reach)
    y = mmfuse.align(xs, rounds=None, alpha=0.6, masks=masks)[0]
    z = mmfuse.align(xs, rounds=400, alpha=0.6, masks=masks)[0]
    np.testing.assert_allclose(y, z, rtol=1e-6, atol=1e-6)


def test_hub_limit_gradients_with_a_dead_hub_lane_are_finite():
    """rounds=None under the hub topology with a constant hub channel: every gradient finite
    (a mutant dropping the guard inside the hub's square root gave NaN, and no test saw it)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    xs = [torch.randn(2, 6, 3, generator=gen, dtype=torch.float64), torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)]
    xs[1][:, :, 0] = 0.75
    xs = [x.requires_grad_() for x in xs]
    ys = mmfuse.align(xs, rounds=None, alpha=0.5, topology="hub", hub=1, backend="torch")
    sum((y * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum() for y in ys).backward()
    assert all(bool(torch.isfinite(x.grad).all()) for x in xs)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_reference_limit_of_a_mean_far_from_the_others(eps):
    """One modality's mean at 1e20: the first sweep pulls it to the others' unit-sized ones, a
    collapse that the reference's stop test had read as a contraction of 1e-20 per sweep; it
    stopped after two sweeps with its consensus means 1e-2 apart.  Now its means agree, and
    equal 500 rounds and the library's closed form."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    xs = [rng.standard_normal((2, 6, 2)) for _ in range(3)]
    xs[0] *= 1e20
    opts = {"topology": "consensus", "schedule": "gauss-seidel", "alpha": 1.0, "eps": eps}
    got = reference.align(xs, rounds=None, **opts)
    means = np.stack([y.mean(axis=1) for y in got])
    np.testing.assert_allclose(means, np.broadcast_to(means[0], means.shape), rtol=1e-13, atol=1e-13)
    for want in (reference.align(xs, rounds=500, **opts), mmfuse.align(xs, rounds=None, backend="array_api", **opts)):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-13 * np.abs(w).max())


def test_consensus_limit_takes_a_non_finite_modality_of_zero_weight():
    """Gauss-Seidel consensus at alpha = 1 gives the first modality's mean weight 0 in the
    limit, yet every round reads it: an infinite token there makes every modality's lane NaN,
    in the limit as in the rounds (a mutation review: skipping zero weights had given finite
    values)."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    xs = [rng.standard_normal((1, 5, 2)) for _ in range(3)]
    xs[0][0, 1, 0] = np.inf
    opts = {"topology": "consensus", "schedule": "gauss-seidel", "alpha": 1.0, "eps": 0.0}
    with np.errstate(invalid="ignore", over="ignore"):
        limit = mmfuse.align(xs, rounds=None, backend="array_api", **opts)
        rounds = mmfuse.align(xs, rounds=50, backend="array_api", **opts)
    for y, r in zip(limit, rounds):
        assert np.all(np.isnan(y[..., 0])) and np.all(np.isnan(r[..., 0]))
        assert np.all(np.isfinite(y[..., 1]))


def test_float32_limit_beside_a_variance_past_float32s_range():
    """Finite float32 data whose variance overflows float32 (spread 1e20): that modality is out
    of float32's range (the docs: compute in float64), but the others keep the float64
    reference's values, its infinite log-variance carrying weight 0 (Gauss-Seidel consensus at
    alpha = 1, eps = 0) rather than making every lane NaN (a mutation review)."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    xs = [rng.standard_normal((2, 6, 3)) for _ in range(3)]
    xs[0] *= 1e20
    opts = {"topology": "consensus", "schedule": "gauss-seidel", "alpha": 1.0, "eps": 0.0}
    with np.errstate(over="ignore", invalid="ignore"):
        got = mmfuse.align([x.astype(np.float32) for x in xs], rounds=None, backend="array_api", **opts)
    want = reference.align([x.astype(np.float32).astype(np.float64) for x in xs], rounds=None, **opts)
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_reference_limit_of_far_apart_means_that_cancel(alpha):
    """Constant modalities at +-1e300 (Jacobi consensus): the common mean is 0, reached by
    halving for thousands of sweeps, each a change of the lanes' scale that restarts the stop
    test's estimate of the contraction; the estimate's own early refusal waits for a full
    window (a first version of the restart refused these as "do not converge")."""
    xs = [np.full((1, 6, 2), 1e300), np.full((1, 5, 2), -1e300)]
    opts = {"topology": "consensus", "schedule": "jacobi", "alpha": alpha, "eps": 1e-5}
    got = reference.align(xs, rounds=None, **opts)
    want = mmfuse.align(xs, rounds=None, backend="array_api", **opts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-300)
