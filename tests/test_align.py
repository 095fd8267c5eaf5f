"""Zoom-and-Shift alignment: equality with the reference on every namespace, the properties of
mmfuse's formalisation (moment matching, equivariance, contraction, closed-form limit, masks,
zero variance), and the errors."""

from __future__ import annotations

import numpy as np
import pytest

import mmfuse
from mmfuse import reference
from mmfuse._core import align as core
from mmfuse._namespace import array_namespace, is_torch, to_numpy
from mmfuse.testing import assert_close

B, C = 3, 4
TOKENS = (7, 5, 6)


def _data(rng: np.random.Generator, tokens=TOKENS, batch=B, channels=C) -> list[np.ndarray]:
    """Modalities with clearly different per-channel means and spreads."""
    out = []
    for m, t in enumerate(tokens):
        loc = rng.normal(3.0 * m, 1.0, size=(batch, 1, channels))
        scale = rng.uniform(0.3, 3.0, size=(batch, 1, channels))
        out.append(loc + scale * rng.standard_normal((batch, t, channels)))
    return out


def _mask(rng: np.random.Generator, t: int, batch=B) -> np.ndarray:
    m = rng.random((batch, t)) > 0.35
    m[:, 0] = True  # every sample keeps at least one token
    m[:, 1] = True
    return m


def _stats(y: np.ndarray, eps: float = 0.0, mask=None) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = reference.moments(y, mask=mask, eps=eps)
    return mu, np.log(sd)


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("masked", [False, True])
def test_moments_match_reference(xp, dtype, rng, masked):
    x = _data(rng)[0]
    mask = _mask(rng, x.shape[1]) if masked else None
    xa = xp.asarray(x, dtype)
    ma = None if mask is None else xp.asarray(mask)
    mean, std = mmfuse.moments(xa, mask=ma)
    want_mean, want_std = reference.moments(x.astype(dtype), mask=mask)
    assert_close(mean, want_mean, dtype=xp.dtype(dtype))
    assert_close(std, want_std, dtype=xp.dtype(dtype))
    assert mean.shape == (B, 1, C)
    xp.assert_untouched()


def test_moments_channel_axis(xp, dtype, rng):
    """axis=-1: the L = 1 fallback, statistics over channels, only when asked for."""
    x = rng.standard_normal((B, 1, 6))
    mean, std = mmfuse.moments(xp.asarray(x, dtype), axis=-1)
    want_mean, want_std = reference.moments(x, axis=-1)
    assert_close(mean, want_mean)
    assert_close(std, want_std)
    assert mean.shape == (B, 1, 1)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
@pytest.mark.parametrize("masked", [False, True])
def test_zoom_shift_matches_reference(xp, dtype, rng, alpha, masked):
    x, g, _ = _data(rng)
    mask = _mask(rng, x.shape[1]) if masked else None
    gmask = _mask(rng, g.shape[1]) if masked else None
    got = mmfuse.zoom_shift(
        xp.asarray(x, dtype),
        xp.asarray(g, dtype),
        alpha=alpha,
        mask=None if mask is None else xp.asarray(mask),
        guide_mask=None if gmask is None else xp.asarray(gmask),
    )
    want = reference.zoom_shift(x, g, alpha=alpha, mask=mask, guide_mask=gmask)
    assert_close(got, want, dtype=xp.dtype(dtype))
    xp.assert_untouched()


def test_zoom_and_shift_primitives(xp, dtype, rng):
    x = rng.standard_normal((B, 5, C))
    scale = rng.uniform(0.5, 2.0, (B, 1, C))
    center = rng.standard_normal((B, 1, C))
    xa = xp.asarray(x, dtype)
    got = mmfuse.zoom(xa, xp.asarray(scale, dtype), center=xp.asarray(center, dtype))
    assert_close(got, reference.zoom(x, scale, center=center), dtype=xp.dtype(dtype))
    got = mmfuse.shift(xa, xp.asarray(center, dtype))
    assert_close(got, reference.shift(x, center), dtype=xp.dtype(dtype))
    assert_close(mmfuse.zoom(xa, 2.0, center=1.0), reference.zoom(x, 2.0, center=1.0))
    xp.assert_untouched()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_zoom_and_shift_of_a_0d_numpy_array_return_a_0d_array(rng, dtype):
    """NumPy's arithmetic on 0-d arrays gives a scalar; zoom and shift return an array of x's
    shape (0-d), of x's dtype, as their Returns say and the other namespaces give."""
    x, scale, center = (np.asarray(v, dtype=dtype) for v in rng.uniform(0.5, 2.0, 3))
    for got, want in (
        (mmfuse.zoom(x, scale, center=center), reference.zoom(x, scale, center=center)),
        (mmfuse.zoom(x, 2.0, center=1.0), reference.zoom(x, 2.0, center=1.0)),
        (mmfuse.shift(x, center), reference.shift(x, center)),
    ):
        assert type(got) is np.ndarray and got.shape == () and got.dtype == dtype
        assert_close(got, np.asarray(want), dtype=dtype)


@pytest.mark.parametrize("rounds", [0, 1, 3, None])
@pytest.mark.parametrize("schedule", ["gauss-seidel", "jacobi"])
@pytest.mark.parametrize("topology", ["consensus", "hub"])
def test_align_matches_reference(xp, dtype, rng, rounds, schedule, topology):
    xs = _data(rng)
    masks = [_mask(rng, TOKENS[0]), None, _mask(rng, TOKENS[2])]
    opts = {"rounds": rounds, "alpha": 0.6, "schedule": schedule, "topology": topology}
    if topology == "hub":
        opts["hub"] = 1
    got = mmfuse.align(
        [xp.asarray(x, dtype) for x in xs],
        masks=[None if m is None else xp.asarray(m) for m in masks],
        **opts,
    )
    want = reference.align(xs, masks=masks, **opts)
    assert isinstance(got, list) and len(got) == 3
    for m, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype=xp.dtype(dtype), err_msg=f"modality {m}")
    xp.assert_untouched()


@pytest.mark.parametrize("fuse", ["concat", "sum", "mean", None])
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_zoom_shift_fusion_matches_reference(xp, dtype, rng, fuse, pool):
    xs = _data(rng)
    masks = [_mask(rng, TOKENS[0]), None, _mask(rng, TOKENS[2])]
    opts = {"fuse": fuse, "pool": pool, "rounds": 2, "alpha": 0.7}
    got = mmfuse.zoom_shift_fusion(
        [xp.asarray(x, dtype) for x in xs],
        masks=[None if m is None else xp.asarray(m) for m in masks],
        **opts,
    )
    want = reference.zoom_shift_fusion(xs, masks=masks, **opts)
    if fuse is None:
        assert len(got) == 3
        for g, w in zip(got, want):
            assert_close(g, w, dtype=xp.dtype(dtype))
    else:
        assert got.shape == ((B, 3 * C) if fuse == "concat" else (B, C))
        assert_close(got, want, dtype=xp.dtype(dtype))
    xp.assert_untouched()


def test_reference_backend_keeps_namespace(xp, rng):
    x, g, _ = _data(rng)
    got = mmfuse.zoom_shift(xp.asarray(x, "float32"), xp.asarray(g, "float32"), backend="reference")
    assert_close(got, reference.zoom_shift(x, g), dtype=xp.dtype("float32"))
    ys = mmfuse.align([xp.asarray(x), xp.asarray(g)], rounds=None, alpha=0.5, backend="reference")
    want = reference.align([x, g], rounds=None, alpha=0.5)
    for y, w in zip(ys, want):
        assert_close(y, w, dtype=xp.dtype("float64"))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", [False, True])
def test_numpy_blocked_path_matches_generic(rng, monkeypatch, masked, threads):
    """Several cache blocks with a ragged last one, on one thread or split across threads:
    the NumPy fast path equals the plain Array-API core."""
    array_api_strict = pytest.importorskip("array_api_strict")
    monkeypatch.setattr(core, "_PARALLEL_BYTES", 0 if threads else 1 << 62)
    monkeypatch.setattr(core, "_MAX_WORKERS", 3)
    shape = (37, 300, 96)  # about 110 KiB per sample: blocks of 4 samples
    x = (2.0 + rng.standard_normal(shape)).astype(np.float32)
    g = (-1.0 + 3.0 * rng.standard_normal((37, 200, 96))).astype(np.float32)
    mx = _mask(rng, 300, batch=37) if masked else None
    mg = _mask(rng, 200, batch=37) if masked else None
    assert core._rows_per_block(x) < x.shape[0]

    def strict(a):
        return None if a is None else array_api_strict.asarray(a)

    got = mmfuse.zoom_shift(x, g, alpha=0.8, mask=mx, guide_mask=mg)
    want = mmfuse.zoom_shift(strict(x), strict(g), alpha=0.8, mask=strict(mx), guide_mask=strict(mg))
    assert_close(got, to_numpy(want))
    got_a = mmfuse.align([x, g], rounds=None, alpha=0.5, masks=[mx, mg])
    want_a = mmfuse.align([strict(x), strict(g)], rounds=None, alpha=0.5, masks=[strict(mx), strict(mg)])
    for a, b in zip(got_a, want_a):
        assert_close(a, to_numpy(b))
    mean, std = mmfuse.moments(x, mask=mx)
    want_m, want_s = reference.moments(x[:3], mask=None if mx is None else mx[:3])
    assert_close(mean[:3], want_m)
    assert_close(std[:3], want_s)


def test_float16_accumulates_in_float32(rng):
    x, g, _ = _data(rng)
    got = mmfuse.zoom_shift(x.astype(np.float16), g.astype(np.float16), alpha=0.5)
    assert got.dtype == np.float16
    want = reference.zoom_shift(x.astype(np.float16), g.astype(np.float16), alpha=0.5)
    assert_close(got, want)
    mean, std = mmfuse.moments(x.astype(np.float16))
    assert mean.dtype == std.dtype == np.float16


def test_torch_autograd_flows(rng):
    torch = pytest.importorskip("torch")
    x, g, _ = _data(rng)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(g, requires_grad=True)
    y = mmfuse.zoom_shift(tx, tg, alpha=0.5, backend="array_api")
    ys = mmfuse.align([tx, tg], rounds=None, alpha=0.5, backend="array_api")
    (y.square().sum() + sum(v.sum() for v in ys)).backward()
    assert tx.grad is not None and tg.grad is not None
    assert torch.isfinite(tx.grad).all() and torch.isfinite(tg.grad).all()


# --------------------------------------------------------------------------- properties


def test_alpha_one_matches_guide_moments(xp, dtype, rng):
    x, g, _ = _data(rng)
    y = mmfuse.zoom_shift(xp.asarray(x, dtype), xp.asarray(g, dtype), eps=0.0)
    mu, sd = reference.moments(to_numpy(y), eps=0.0)
    mu_g, sd_g = reference.moments(g, eps=0.0)
    assert_close(xp.asarray(mu, dtype), mu_g, atol=0)
    assert_close(xp.asarray(sd, dtype), sd_g, atol=0)
    # with the default eps the spread matches up to O(eps / var)
    y = mmfuse.zoom_shift(x, g)
    assert_close(reference.moments(y, eps=1e-5)[1], reference.moments(g, eps=1e-5)[1], rtol=1e-4)


def test_guide_equivariance_and_input_invariance(rng):
    """alpha = 1: per-channel positive affine changes of the guide carry through to the output;
    those of the input vanish."""
    x, g, _ = _data(rng)
    a = rng.uniform(0.2, 5.0, size=(B, 1, C))
    b = rng.normal(0.0, 10.0, size=(B, 1, C))
    y = mmfuse.zoom_shift(x, g, eps=0.0)
    assert_close(mmfuse.zoom_shift(x, a * g + b, eps=0.0), a * y + b)
    assert_close(mmfuse.zoom_shift(a * x + b, g, eps=0.0), y)


@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_gauss_seidel_contraction(rng, alpha):
    """Two modalities, Gauss-Seidel: the gap in mean and log std shrinks by (1 - alpha)^2."""
    a, b, _ = _data(rng)
    gaps = []
    for rounds in range(4):
        ya, yb = mmfuse.align([a, b], rounds=rounds, alpha=alpha, eps=0.0)
        (ma, la), (mb, lb) = _stats(ya), _stats(yb)
        gaps.append((mb - ma, lb - la))
    for k in range(3):
        for coord in range(2):
            np.testing.assert_allclose(
                gaps[k + 1][coord], (1 - alpha) ** 2 * gaps[k][coord], rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize("alpha", [0.35, 0.8])
def test_two_modality_limit_formula(rng, alpha):
    a, b, _ = _data(rng)
    (ma, la), (mb, lb) = _stats(a), _stats(b)
    ya, yb = mmfuse.align([a, b], rounds=None, alpha=alpha, eps=0.0)
    for y in (ya, yb):
        mu, ls = _stats(y)
        np.testing.assert_allclose(mu, ((1 - alpha) * ma + mb) / (2 - alpha), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ls, ((1 - alpha) * la + lb) / (2 - alpha), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0])
def test_gauss_seidel_limit_weights_are_the_fixed_point(n, alpha):
    """Iterating the round map on scalar statistics converges to sum_j w_j z_j."""
    w = core.limit_weights(n, alpha, "gauss-seidel", "consensus", 0)
    z = np.random.default_rng(n).standard_normal(n)
    want = float(np.dot(w, z))
    for _ in range(5000):
        for i in range(n):
            z[i] += alpha * ((z.sum() - z[i]) / (n - 1) - z[i])
    np.testing.assert_allclose(z, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("schedule", "topology", "n"),
    [
        ("gauss-seidel", "consensus", 2),
        ("gauss-seidel", "consensus", 3),
        ("jacobi", "consensus", 3),
        ("gauss-seidel", "hub", 3),
        ("jacobi", "hub", 3),
    ],
)
def test_closed_form_equals_sixty_rounds(rng, schedule, topology, n):
    xs = _data(rng)[:n]
    opts = {"alpha": 0.6, "schedule": schedule, "topology": topology}
    if topology == "hub":
        opts["hub"] = n - 1
    limit = mmfuse.align(xs, rounds=None, eps=0.0, **opts)
    many = mmfuse.align(xs, rounds=60, eps=0.0, **opts)
    for y, z in zip(limit, many):
        assert_close(y, z, rtol=1e-9)
    # with eps > 0 too: rounds=None is the exact limit of the rounds (tests/test_align_limit.py
    # checks it to 1e-6 of the spread), which 60 rounds at alpha 0.6 have all but reached
    limit = mmfuse.align(xs, rounds=None, **opts)
    many = mmfuse.align(xs, rounds=60, **opts)
    for y, z in zip(limit, many):
        assert_close(y, z, rtol=1e-4)


@pytest.mark.parametrize("rounds", [1, 3, None])
def test_consensus_and_hub_agree_at_two_modalities(xp, rng, rounds):
    """M = 2, alpha = 1, Gauss-Seidel: consensus sends modality 0 to 1, then 1 to itself;
    the hub topology with the guide hub=1 does exactly that (up to O(eps / var) for eps > 0,
    where modality 1 re-measures modality 0's zoomed spread)."""
    a, b, _ = _data(rng)
    xs = [xp.asarray(a), xp.asarray(b)]
    for eps, rtol in ((0.0, None), (1e-5, 1e-4)):
        cons = mmfuse.align(xs, rounds=rounds, topology="consensus", eps=eps)
        hub = mmfuse.align(xs, rounds=rounds, topology="hub", hub=1, eps=eps)
        hub_neg = mmfuse.align(xs, rounds=rounds, topology="hub", hub=-1, eps=eps)
        for c, h, hn in zip(cons, hub, hub_neg):
            assert_close(c, to_numpy(h), rtol=rtol)
            assert_close(hn, to_numpy(h), rtol=0, atol=0)


def test_alpha_one_more_rounds_change_nothing(rng):
    xs = _data(rng)
    for opts in ({"topology": "consensus", "eps": 0.0}, {"topology": "hub", "hub": 0, "eps": 0.0}):
        xs_used = xs[:2] if opts["topology"] == "consensus" else xs
        one = mmfuse.align(xs_used, rounds=1, **opts)
        five = mmfuse.align(xs_used, rounds=5, **opts)
        for y, z in zip(one, five):
            assert_close(z, y)
    # the hub itself is the guide and never moves
    ys = mmfuse.align(xs, rounds=3, alpha=0.5, topology="hub", hub=2)
    assert_close(ys[2], xs[2], rtol=0, atol=0)


def test_masked_tokens_change_nothing(xp, dtype, rng):
    xs = _data(rng)
    masks = [_mask(rng, t) for t in TOKENS]
    poisoned = [np.where(m[:, :, None], x, 1e30) for x, m in zip(xs, masks)]
    mk = [xp.asarray(m) for m in masks]
    clean = mmfuse.align([xp.asarray(x, dtype) for x in xs], rounds=2, alpha=0.5, masks=mk)
    dirty = mmfuse.align([xp.asarray(x, dtype) for x in poisoned], rounds=2, alpha=0.5, masks=mk)
    for c, d, m in zip(clean, dirty, masks):
        np.testing.assert_array_equal(to_numpy(c)[m], to_numpy(d)[m])
    y0 = mmfuse.zoom_shift(xp.asarray(xs[0], dtype), xp.asarray(xs[1], dtype), mask=mk[0], guide_mask=mk[1])
    y1 = mmfuse.zoom_shift(xp.asarray(poisoned[0], dtype), xp.asarray(poisoned[1], dtype), mask=mk[0], guide_mask=mk[1])
    np.testing.assert_array_equal(to_numpy(y0)[masks[0]], to_numpy(y1)[masks[0]])
    f0 = mmfuse.zoom_shift_fusion([xp.asarray(x, dtype) for x in xs], masks=mk, pool="max")
    f1 = mmfuse.zoom_shift_fusion([xp.asarray(x, dtype) for x in poisoned], masks=mk, pool="max")
    np.testing.assert_array_equal(to_numpy(f0), to_numpy(f1))
    xp.assert_untouched()


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_zero_variance_channels_follow_the_reference(xp, dtype, rng, eps):
    """Channels with no spread, at eps > 0 and at eps = 0 (where the zero-spread rule, scale 1,
    decides).  3.7 and -1.3, whose sums over the tokens round: a plain two-pass variance is then
    ~1e-32 rather than 0, and at eps = 0 its sigma zoomed rounding noise by ~1e15 (the reference
    and the numba CPU kernel did, until they took the corrected two-pass form)."""
    x, g, _ = _data(rng)
    x[:, :, 0] = 3.7  # constant channel in the input
    g[:, :, 1] = -1.3  # constant channel in the guide
    xa, ga = xp.asarray(x, dtype), xp.asarray(g, dtype)
    x, g = to_numpy(xa), to_numpy(ga)  # the reference on the values the call sees
    calls = {
        "zoom_shift": (mmfuse.zoom_shift(xa, ga, eps=eps), [reference.zoom_shift(x, g, eps=eps)]),
        "zoom_shift alpha 0.5": (
            mmfuse.zoom_shift(xa, ga, alpha=0.5, eps=eps), [reference.zoom_shift(x, g, alpha=0.5, eps=eps)]
        ),
        "align rounds 3": (
            mmfuse.align([xa, ga], rounds=3, alpha=0.5, eps=eps), reference.align([x, g], rounds=3, alpha=0.5, eps=eps)
        ),
        "align limit": (
            mmfuse.align([xa, ga], rounds=None, alpha=0.5, eps=eps),
            reference.align([x, g], rounds=None, alpha=0.5, eps=eps),
        ),
    }
    for name, (got, want) in calls.items():
        got = got if isinstance(got, list) else [got]
        for y, w in zip(got, want):
            assert np.all(np.isfinite(to_numpy(y))), name
            assert_close(y, w, err_msg=name)
    # alpha = 1 maps a channel with no spread onto the guide's mean
    y = to_numpy(calls["zoom_shift"][0])
    want_mean = np.mean(g[:, :, 0].astype(np.float64), axis=1)
    rtol = 4 * float(np.finfo(np.float32 if "32" in str(dtype) else np.float64).eps)
    np.testing.assert_allclose(y[:, :, 0], np.broadcast_to(want_mean[:, None], y[:, :, 0].shape), rtol=rtol)


def test_rounds_zero_returns_copies(rng):
    xs = _data(rng)
    ys = mmfuse.align(xs, rounds=0)
    for x, y in zip(xs, ys):
        assert y is not x
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- errors


def test_errors_zoom_shift(rng):
    x, g, _ = _data(rng)
    with pytest.raises(ValueError, match=r"channel count mismatch: guide has channel count 5"):
        mmfuse.zoom_shift(x, rng.standard_normal((B, 5, 5)))
    with pytest.raises(ValueError, match=r"batch size mismatch"):
        mmfuse.zoom_shift(x, rng.standard_normal((B + 1, 5, C)))
    for alpha in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
            mmfuse.zoom_shift(x, g, alpha=alpha)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        mmfuse.zoom_shift(x, g, eps=-1e-3)
    mmfuse.zoom_shift(x, g, eps=0)  # eps = 0 is allowed
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(3, 7\)"):
        mmfuse.zoom_shift(x, g, mask=np.ones((B, 6), dtype=bool))
    with pytest.raises(ValueError, match=r"guide_mask must have shape \(B, T\) = \(3, 5\)"):
        mmfuse.zoom_shift(x, g, guide_mask=np.ones((B, 5, 1), dtype=bool))
    empty = np.ones((B, 7), dtype=bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"mask masks every token of a sample \(flat sample index 1\)"):
        mmfuse.zoom_shift(x, g, mask=empty)
    # the oracle, which the public functions' check precedes, says so too (a bare
    # ZeroDivisionError before)
    with pytest.raises(ValueError, match=r"mask masks every token of a lane of sample 1 \(batch index\)"):
        reference.moments(x, mask=empty)
    with pytest.raises(TypeError, match=r"mask must have a boolean dtype"):
        mmfuse.zoom_shift(x, g, mask=np.ones((B, 7)))
    with pytest.raises(ValueError, match=r"axis=-2 is the batch axis"):
        mmfuse.zoom_shift(x[:, 0, :], g[:, 0, :])
    with pytest.raises(ValueError, match=r"single entry along the statistics axis.*pass axis=-1 to take"):
        mmfuse.zoom_shift(x[:, :1, :], g)
    # on the channel axis already: no advice to pass the axis in use
    with pytest.raises(ValueError, match=r"single entry along the statistics axis axis=-1 .*: its variance is 0 .*erase it$"):
        mmfuse.moments(x[:, :, :1], axis=-1)
    with pytest.raises(TypeError, match=r"guide has dtype float64 but x has dtype float32"):
        mmfuse.zoom_shift(x.astype(np.float32), g)
    with pytest.raises(TypeError, match=r"real floating"):
        mmfuse.zoom_shift(x.astype(np.int64), g.astype(np.int64))


def test_an_empty_token_axis_is_refused(xp, rng):
    """A modality with no tokens has no statistics: a clear refusal naming it (it gave NaN
    outputs on the fast paths and ZeroDivisionError in the reference)."""
    x = xp.asarray(rng.standard_normal((2, 5, 4)))
    g = xp.asarray(rng.standard_normal((2, 3, 4)))
    empty = g[:, :0, :]
    calls = [  # (call, the argument its refusal names)
        (lambda b: mmfuse.moments(empty, backend=b), "x"),
        (lambda b: mmfuse.zoom_shift(empty, g, backend=b), "x"),
        (lambda b: mmfuse.zoom_shift(x, empty, backend=b), "guide"),
        (lambda b: mmfuse.align([x, empty], backend=b), r"xs\[1\]"),
        (lambda b: mmfuse.zoom_shift_fusion([x, empty], backend=b), r"xs\[1\]"),
    ]
    for call, label in calls:
        for backend in (None, "reference"):
            with pytest.raises(ValueError, match=rf"{label} has no entries along the statistics axis axis=-2"):
                call(backend)
    if is_torch(array_namespace(x)):
        from mmfuse.nn import GuidedZoomShift, ZoomShift

        for layer in (ZoomShift(4, 2, dtype=x.dtype), GuidedZoomShift(4, 2, dtype=x.dtype)):
            with pytest.raises(ValueError, match=r"xs\[1\] has no tokens \(shape \(2, 0, 4\)\)"):
                layer([x, empty])


def test_errors_align(rng):
    xs = _data(rng)
    with pytest.raises(ValueError, match=r"channel count mismatch: xs\[1\] has channel count 5"):
        mmfuse.align([xs[0], rng.standard_normal((B, 5, 5))])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0"):
        mmfuse.align(xs, alpha=0)
    with pytest.raises(ValueError, match=r"rounds must be a non-negative int or None, got -1"):
        mmfuse.align(xs, rounds=-1)
    with pytest.raises(TypeError, match=r"rounds must be a non-negative int or None"):
        mmfuse.align(xs, rounds=2.5)
    # a huge count is refused up front (10**30 rounds never ended), pointing to the limit
    too_many = r"rounds must be at most 1_000_000 \(each round is a pass over the statistics\), got {}; rounds=None"
    with pytest.raises(ValueError, match=too_many.format("1000001")):
        mmfuse.align(xs, rounds=10**6 + 1)
    with pytest.raises(ValueError, match=too_many.format("an int of 100 bits")):
        mmfuse.align(xs, rounds=10**30)
    with pytest.raises(ValueError, match=too_many.format("1000001")):
        mmfuse.align(xs, rounds=np.int64(10**6 + 1))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        mmfuse.align(xs, eps=-1.0)
    with pytest.raises(ValueError, match=r"schedule must be one of \['gauss-seidel', 'jacobi'\], got 'sor'"):
        mmfuse.align(xs, schedule="sor")
    with pytest.raises(ValueError, match=r"topology must be one of \['consensus', 'hub'\], got 'ring'"):
        mmfuse.align(xs, topology="ring")
    for hub in (3, -4):
        with pytest.raises(ValueError, match=rf"hub={hub} is out of range for 3 modalities"):
            mmfuse.align(xs, topology="hub", hub=hub)
    # consensus has no hub: one given there would be ignored, so it is refused
    for hub in (0, 1):
        with pytest.raises(ValueError, match=rf"hub={hub} applies to topology='hub' only"):
            mmfuse.align(xs, hub=hub)
    with pytest.raises(TypeError, match=r"hub must be an int"):
        mmfuse.align(xs, topology="hub", hub=1.0)
    with pytest.raises(ValueError, match=r"masks\[2\] must have shape \(B, T\) = \(3, 6\)"):
        mmfuse.align(xs, masks=[None, None, np.ones((B, 5), dtype=bool)])
    with pytest.raises(ValueError, match=r"masks must have one entry .* got 2 for 3 modalities"):
        mmfuse.align(xs, masks=[None, None])
    empty = np.ones((B, TOKENS[1]), dtype=bool)
    empty[2] = False
    with pytest.raises(ValueError, match=r"masks\[1\] masks every token of a sample \(flat sample index 2\)"):
        mmfuse.align(xs, masks=[None, empty, None])
    with pytest.raises(ValueError, match=r"xs must hold at least 2 modalities, got 1"):
        mmfuse.align(xs[:1])
    with pytest.raises(ValueError, match=r"Jacobi consensus with M = 2 and alpha = 1 has no limit"):
        mmfuse.align(xs[:2], rounds=None, schedule="jacobi")
    mmfuse.align(xs[:2], rounds=4, schedule="jacobi")  # finite rounds are fine: a swap
    # every other alpha has a limit, the plain average whatever alpha: a tiny one too (alpha
    # under 3e-17 had been refused as that swap: a review's find)
    for n in (2, 3):
        want = mmfuse.align(xs[:n], rounds=None, schedule="jacobi", alpha=0.5)
        for alpha in (1e-17, 5e-324, 1.0 - 2.0**-53):
            got = mmfuse.align(xs[:n], rounds=None, schedule="jacobi", alpha=alpha)
            for y, w in zip(got, want):
                assert_close(y, w)
    with pytest.raises(TypeError, match=r"mixed array namespaces"):
        torch = pytest.importorskip("torch")
        mmfuse.align([xs[0], torch.from_numpy(xs[1])])


def test_errors_fusion_and_primitives(rng):
    xs = _data(rng)
    with pytest.raises(ValueError, match=r"fuse must be one of \['concat', 'sum', 'mean', None\], got 'product'"):
        mmfuse.zoom_shift_fusion(xs, fuse="product")
    with pytest.raises(ValueError, match=r"pool must be one of \['mean', 'max'\], got 'sum'"):
        mmfuse.zoom_shift_fusion(xs, pool="sum")
    with pytest.raises(ValueError, match=r"xs\[1\] must be 3-dimensional"):
        mmfuse.zoom_shift_fusion([xs[0], xs[1][:, 0]])
    with pytest.raises(
        TypeError,
        match=r"zoom_shift_fusion\(\) got an unexpected keyword argument 'round' \(its keywords: fuse, pool, "
        r"rounds, alpha, .*, backend\); did you mean 'rounds'\?",
    ):
        mmfuse.zoom_shift_fusion(xs, round=3)
    with pytest.raises(ValueError, match=r"hub=1 applies to topology='hub' only"):
        mmfuse.zoom_shift_fusion(xs, hub=1)
    with pytest.raises(ValueError, match=r"hub=5 is out of range"):
        mmfuse.zoom_shift_fusion(xs, topology="hub", hub=5)
    with pytest.raises(ValueError, match=r"scale of shape \(3, 1, 5\) does not broadcast"):
        mmfuse.zoom(xs[0], np.ones((B, 1, 5)), center=0.0)
    with pytest.raises(ValueError, match=r"offset of shape \(2, 1, 4\) does not broadcast"):
        mmfuse.shift(xs[0], np.ones((2, 1, C)))


def test_hub_topology_defaults_to_the_first_modality(rng):
    xs = _data(rng)
    for got, want in zip(mmfuse.align(xs, topology="hub"), mmfuse.align(xs, topology="hub", hub=0)):
        assert np.array_equal(got, want)


def test_eps_over_the_statistics_dtypes_largest_is_refused():
    """An eps above float32's largest number, with float32 inputs: var + eps overflowed to inf
    there, and every output was NaN, where numba and the reference (float64) gave finite
    ones, so "auto" answered by what had been imported (a review's find).  Refused now;
    float64 inputs take it."""
    rng = np.random.default_rng()
    a = rng.standard_normal((2, 5, 3)).astype(np.float32)
    b = (3 * rng.standard_normal((2, 4, 3)) + 1).astype(np.float32)
    above = r"eps=1e\+39 is above 3.4e\+38, the largest number of float32, in which the statistics of float32 inputs"
    for call in (lambda e: mmfuse.moments(a, eps=e), lambda e: mmfuse.zoom_shift(a, b, eps=e),
                 lambda e: mmfuse.align([a, b], eps=e), lambda e: mmfuse.zoom_shift_fusion([a, b], eps=e)):  # fmt: skip
        with pytest.raises(ValueError, match=above):
            call(1e39)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert_close(mmfuse.zoom_shift(a64, b64, eps=1e39), reference.zoom_shift(a64, b64, eps=1e39))


@pytest.mark.parametrize("backend", [None, "array_api", "torch"])
def test_align_gradient_at_a_lane_without_spread_is_the_unzoomed_maps(backend, request):
    """The documented convention (``align``'s Notes): a lane with no spread is not zoomed, in
    its values and its derivative, so its slope along x is 1: for rounds=1, alpha = 1, two
    modalities, dL/dx_t = w_t - mean(w) (a review found it disagreeing with ``zoom_shift``'s
    one-step derivative, sigma_g / sqrt(eps) times that, and with finite differences: that is
    the rule, now said).  Lanes with a spread take ``zoom_shift``'s gradient, and the values
    are ``zoom_shift``'s."""
    torch = pytest.importorskip("torch")
    if backend == "torch":  # the custom ops (small calls that autograd records: the core)
        request.getfixturevalue("custom_align_ops")
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    x = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    x[:, :, 0] = 3.0  # one lane per sample without spread
    x.requires_grad_(True)
    g = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64) * 2 + 1
    w = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    y = mmfuse.align([x, g], rounds=1, backend=backend)[0]
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    z = mmfuse.zoom_shift(x, g, backend=backend)
    (zgrad,) = torch.autograd.grad((z * w).sum(), x)
    assert_close(y.detach(), z.detach())
    assert_close(grad[:, :, 0], w[:, :, 0] - w[:, :, 0].mean(dim=1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert_close(grad[:, :, 1], zgrad[:, :, 1], rtol=1e-12, atol=1e-12)


def test_eps_lost_to_underflow_in_the_statistics_dtype_is_refused():
    """An eps below the smallest normal number of the statistics' dtype (float32 for float32
    and 16-bit inputs) would be lost in var + eps or sqrt(eps) there: refused (it gave NaN in
    align, and other outputs than the float64-computing backends in zoom_shift)."""
    a = np.array([[[1.0], [2.0]]], np.float32)
    c = np.full((1, 2, 1), 3.7, np.float32)  # a lane with no spread
    below = r"eps=1e-50 is below 1.18e-38, the smallest normal number of float32, in which the statistics of float32 inputs"
    with pytest.raises(ValueError, match=below):
        mmfuse.align([a, c], rounds=2, alpha=0.3, eps=1e-50)
    with pytest.raises(ValueError, match=below):
        mmfuse.zoom_shift(a, c, eps=1e-50)
    with pytest.raises(ValueError, match=below):
        mmfuse.moments(a, eps=1e-50)
    with pytest.raises(ValueError, match=r"eps=1e-50 is below"):
        mmfuse.zoom_shift_fusion([a, c], eps=1e-50)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"smallest normal number of torch.float32, in which the statistics of torch.bfloat16"):
        mmfuse.moments(torch.from_numpy(a).bfloat16(), eps=1e-40)
    # the layer too, eager and compiled (which skips the functional API's checks)
    layer = mmfuse.nn.ZoomShift(1, 2, eps=1e-50)
    for run in (layer, torch.compile(layer, backend="eager")):
        with pytest.raises(ValueError, match=r"^ZoomShift: eps=1e-50 is below"):
            run([torch.from_numpy(a), torch.from_numpy(c)])
    torch._dynamo.reset()
    # 0, float32's smallest normal, and float64 data with a float64 normal eps are fine
    tiny = float(np.finfo(np.float32).smallest_normal)
    for eps in (0.0, tiny):
        y = mmfuse.align([a, c], rounds=2, alpha=0.3, eps=eps)[0]
        assert np.isfinite(y).all()
    a64, c64 = a.astype(np.float64), c.astype(np.float64)
    got = mmfuse.align([a64, c64], rounds=2, alpha=0.3, eps=1e-300)
    for y, w in zip(got, reference.align([a64, c64], rounds=2, alpha=0.3, eps=1e-300)):
        assert_close(y, w)


def test_moments_backend_keyword_selects_the_implementation():
    from mmfuse.backends import reference as reference_backend
    from mmfuse.backends import register, unregister

    calls = []

    def spy(x, *, axis=-2, mask=None, eps=1e-5):
        calls.append(x.shape)
        return reference_backend.moments(x, axis=axis, mask=mask, eps=eps)

    register("moments", "reference", spy)
    x = np.random.default_rng(3).standard_normal((2, 5, 3))
    try:
        mean, std = mmfuse.moments(x, backend="reference")
    finally:
        unregister("moments", "reference")
    assert calls == [(2, 5, 3)]
    want_mean, want_std = mmfuse.moments(x, backend="array_api")
    assert_close(mean, want_mean)
    assert_close(std, want_std)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mmfuse.moments(x, backend="fast")


def test_zoom_shift_fusion_masks_of_none_leave_any_axis_allowed(rng):
    """masks=[None, None] masks nothing, yet was refused with axis=-1 ("masks are token masks
    and need the default axis=-2"); a real mask still is."""
    xs = [rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)) + 1.0]
    np.testing.assert_array_equal(
        mmfuse.zoom_shift_fusion(xs, masks=[None, None], axis=-1), mmfuse.zoom_shift_fusion(xs, axis=-1)
    )
    with pytest.raises(ValueError, match="need the default axis=-2"):
        mmfuse.zoom_shift_fusion(xs, masks=[np.ones((2, 5), bool), None], axis=-1)


def test_zoom_shift_fusion_default_pooling_keeps_every_modality(rng):
    """Mean pooling after alignment pools the aligned means, which alignment equalises: with
    the other defaults and M = 2 it returned modality 1's token mean twice (modality 0 never
    reached the output), and with rounds=None M copies of one mean.  The default pooling is
    max, which keeps each modality's standardised token profile."""
    xs = [rng.standard_normal((3, 9, 4)), 2.0 + 0.5 * rng.standard_normal((3, 6, 4))]
    mean_pooled = mmfuse.zoom_shift_fusion(xs, pool="mean", fuse=None)
    np.testing.assert_allclose(mean_pooled[0], xs[1].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(mean_pooled[1], xs[1].mean(axis=1), rtol=1e-12)
    limit = mmfuse.zoom_shift_fusion(xs, pool="mean", fuse=None, rounds=None, alpha=0.5)
    np.testing.assert_allclose(limit[0], limit[1], rtol=1e-12)
    pooled = mmfuse.zoom_shift_fusion(xs, fuse=None)
    np.testing.assert_array_equal(pooled[0], np.max(mmfuse.align(xs)[0], axis=1))
    assert not np.allclose(pooled[0], pooled[1])
    # the output depends on modality 0 (under pool="mean" it did not at all): its channels
    # reversed, the fused features change
    again = [xs[0][:, :, ::-1].copy(), xs[1]]
    assert not np.allclose(mmfuse.zoom_shift_fusion(again), mmfuse.zoom_shift_fusion(xs))
    assert mmfuse.zoom_shift_fusion(xs).shape == (3, 8)


@pytest.mark.parametrize(
    "options",
    [{"rounds": 0}, {"rounds": 0, "alpha": 0.3}, {"rounds": 2, "topology": "hub"},
     {"rounds": None, "topology": "hub", "alpha": 0.5}],
)  # fmt: skip
def test_a_modality_left_where_it_is_comes_back_bit_for_bit(options):
    """rounds = 0, and the hub: their outputs are the inputs' copies, -0.0 included.  Their
    identity map x * 1 + 0 turned -0.0 into 0.0 (in the reference's finite rounds too); it
    adds -0.0 now, which is exact for every x (a review of the kernels)."""
    import importlib.util

    rng = np.random.default_rng()
    x = rng.standard_normal((2, 5, 3))
    guide = rng.standard_normal((2, 4, 3))
    x[0, 0, 0] = guide[1, 1, 1] = -0.0
    left = [0] if options.get("topology") == "hub" else [0, 1]  # the hub is modality 0
    runs = {"reference": reference.align([x, guide], **options)}
    backends = ["array_api"] + (["numba"] if importlib.util.find_spec("numba") else [])
    for backend in backends:
        runs[backend] = mmfuse.align([x, guide], backend=backend, **options)
    if importlib.util.find_spec("torch"):
        import torch

        runs["torch"] = [to_numpy(y) for y in mmfuse.align([torch.from_numpy(x), torch.from_numpy(guide)], **options)]
    for name, ys in runs.items():
        for m in left:
            want = (x, guide)[m]
            assert np.array_equal(ys[m], want) and np.array_equal(np.signbit(ys[m]), np.signbit(want)), (name, m)
