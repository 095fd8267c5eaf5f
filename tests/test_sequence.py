"""Token-level sequence fusion and the Wander adapter: core vs the explicit-tensor reference."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
from exact_gelu import exact_gelu
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_sequence import naive_sequence_fusion

import mmfuse
from mmfuse import reference
from mmfuse._core import sequence as core
from mmfuse._namespace import to_numpy, tree_map
from mmfuse.testing import assert_close

# --------------------------------------------------------------------------- cases


def _sizes(n: int, seed: int) -> dict:
    """Unequal T_m and r_m (and ranks > 1) with the explicit W of the reference kept small."""
    rng = np.random.default_rng(seed)
    hi = 4 if n <= 3 else (3 if n == 4 else 2)
    while True:
        lengths = [int(v) for v in rng.integers(1, hi + 1, n)]
        widths = [int(v) for v in rng.integers(1, hi + 1, n)]
        if len(set(lengths)) > 1 and len(set(widths)) > 1:
            break
    lengths[0] = max(lengths[0], 2)
    return {
        "lengths": lengths,
        "widths": widths,
        "feature_rank": 2,
        "token_rank": 3 if n <= 4 else 2,
        "n_out": 2,
        "out_dim": 3,
        "batch": 3,
    }


CASES = {n: _sizes(n, seed=100 + n) for n in range(2, 8)}


def _factors(rng, s, *, lengths=None, widths=None):
    lengths = s["lengths"] if lengths is None else lengths
    widths = s["widths"] if widths is None else widths
    feature = [rng.standard_normal((s["feature_rank"], r, s["out_dim"])) for r in widths]
    token = [rng.standard_normal((s["token_rank"], t, s["n_out"])) for t in lengths]
    return feature, token


def _masks(rng, batch, lengths):
    out = []
    for t in lengths:
        m = rng.random((batch, t)) > 0.35
        m[:, 0] = True  # every sample keeps a token
        out.append(m)
    return out


def _put(xp, arrays, dtype):
    return [xp.asarray(a, dtype) for a in arrays]


# --------------------------------------------------------------------------- sequence fusion


@pytest.mark.parametrize("n", sorted(CASES))
@pytest.mark.parametrize("mode", ["cp", "collapsed"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sequence_fusion_matches_reference(xp, dtype, rng, n, mode, masked):
    s = CASES[n]
    hs = [rng.standard_normal((s["batch"], t, r)) for t, r in zip(s["lengths"], s["widths"])]
    feature, token = _factors(rng, s)
    masks = _masks(rng, s["batch"], s["lengths"]) if masked else None
    desired = reference.sequence_fusion(hs, feature, token, mode=mode, masks=masks)
    got = mmfuse.sequence_fusion(
        _put(xp, hs, dtype),
        _put(xp, feature, dtype),
        _put(xp, token, dtype),
        mode=mode,
        masks=None if masks is None else _put(xp, masks, None),
    )
    assert_close(got, desired, xp=xp.xp, dtype=xp.dtype(dtype), err_msg=f"M={n} {mode}")
    assert got.shape == (s["batch"], s["n_out"], s["out_dim"])
    xp.assert_untouched()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    n=st.integers(2, 4),
    mode=st.sampled_from(["cp", "collapsed"]),
    masked=st.booleans(),
)
def test_sequence_fusion_random_shapes(xp, n, mode, masked, data):
    lengths = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n), label="T_m")
    widths = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n), label="r_m")
    r_h, r_t = data.draw(st.integers(1, 3), label="R_h"), data.draw(st.integers(1, 3), label="R_t")
    n_out, out_dim = data.draw(st.integers(1, 4), label="T_out"), data.draw(st.integers(1, 4), label="D")
    batch = data.draw(st.integers(1, 4), label="B")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    hs = [rng.standard_normal((batch, t, r)) for t, r in zip(lengths, widths)]
    feature = [rng.standard_normal((r_h, r, out_dim)) for r in widths]
    token = [rng.standard_normal((r_t, t, n_out)) for t in lengths]
    masks = [rng.random((batch, t)) > 0.5 for t in lengths] if masked else None
    desired = reference.sequence_fusion(hs, feature, token, mode=mode, masks=masks)
    got = mmfuse.sequence_fusion(
        _put(xp, hs, "float64"),
        _put(xp, feature, "float64"),
        _put(xp, token, "float64"),
        mode=mode,
        masks=None if masks is None else _put(xp, masks, None),
    )
    assert_close(got, desired, xp=xp.xp, dtype=xp.dtype("float64"))


def test_collapsed_with_rank_one_equals_cp(xp, dtype, rng):
    s = dict(CASES[3], feature_rank=1, token_rank=1)
    hs = [rng.standard_normal((4, t, r)) for t, r in zip(s["lengths"], s["widths"])]
    feature, token = _factors(rng, s)
    args = (_put(xp, hs, dtype), _put(xp, feature, dtype), _put(xp, token, dtype))
    cp = mmfuse.sequence_fusion(*args, mode="cp")
    collapsed = mmfuse.sequence_fusion(*args, mode="collapsed")
    assert_close(collapsed, to_numpy(cp), xp=xp.xp, dtype=xp.dtype(dtype))


def test_collapsed_ranks_add_no_expressive_power(xp, rng):
    """Collapsed mode with any ranks is cp mode with R_h = R_t = 1 and the rank-summed factors."""
    s = CASES[3]
    hs = [rng.standard_normal((4, t, r)) for t, r in zip(s["lengths"], s["widths"])]
    feature, token = _factors(rng, s)
    collapsed = mmfuse.sequence_fusion(
        _put(xp, hs, "float64"), _put(xp, feature, "float64"), _put(xp, token, "float64"),
        mode="collapsed",
    )  # fmt: skip
    summed_f = [f.sum(axis=0, keepdims=True) for f in feature]
    summed_t = [t.sum(axis=0, keepdims=True) for t in token]
    cp = reference.sequence_fusion(hs, summed_f, summed_t, mode="cp")
    assert_close(collapsed, cp, xp=xp.xp)
    # ... and with R_h, R_t > 1 the cp mode is a different function
    assert not np.allclose(reference.sequence_fusion(hs, feature, token, mode="cp"), cp)


def test_collapsed_accepts_differing_ranks(rng):
    hs = [rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 3))]
    feature = [rng.standard_normal((2, 2, 5)), rng.standard_normal((3, 3, 5))]
    token = [rng.standard_normal((1, 3, 2)), rng.standard_normal((4, 4, 2))]
    got = mmfuse.sequence_fusion(hs, feature, token, mode="collapsed")
    assert_close(got, reference.sequence_fusion(hs, feature, token, mode="collapsed"))
    with pytest.raises(ValueError, match=r"feature_factors\[1\] has rank R_h = 3 .* mode='cp'"):
        mmfuse.sequence_fusion(hs, feature, token)


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_many_batch_blocks_and_both_orders(xp, rng, mode):
    """A batch large enough for several cache blocks; one modality per contraction order."""
    lengths, widths, r_h, r_t, n_out, out_dim, batch = [40, 3], [4, 6], 3, 4, 8, 16, 300
    the_plan = core.plan(mode, tuple(lengths), tuple(widths), r_h, r_t, n_out, out_dim)
    assert the_plan.orders == ("token", "feature")
    hs = [rng.standard_normal((batch, t, r)) for t, r in zip(lengths, widths)]
    feature = [rng.standard_normal((r_h, r, out_dim)) for r in widths]
    token = [rng.standard_normal((r_t, t, n_out)) for t in lengths]
    masks = _masks(rng, batch, lengths)
    desired = naive_sequence_fusion(hs, feature, token, masks, mode)
    got = mmfuse.sequence_fusion(
        _put(xp, hs, "float64"), _put(xp, feature, "float64"), _put(xp, token, "float64"),
        mode=mode, masks=_put(xp, masks, None),
    )  # fmt: skip
    assert_close(got, desired, xp=xp.xp)


def test_cp_blocks_over_batch_and_token_ranks(xp, rng, monkeypatch):
    """Tiny cache budget: blocks of 2 samples x 3 token ranks (of 5), both orders."""
    lengths, widths, r_h, r_t, n_out, out_dim, batch = [6, 2], [2, 5], 2, 5, 3, 4, 7
    per_pair = n_out * r_h * out_dim * 8
    monkeypatch.setattr(core, "CP_BLOCK_BYTES", per_pair * 10)
    core.cp_blocking.cache_clear()
    try:
        assert core.cp_blocking(batch, r_t, n_out, r_h, out_dim, 8) == (2, 5)
        monkeypatch.setattr(core, "CP_BLOCK_BYTES", per_pair * 3)
        core.cp_blocking.cache_clear()
        assert core.cp_blocking(batch, r_t, n_out, r_h, out_dim, 8) == (1, 3)
        assert core.plan("cp", tuple(lengths), tuple(widths), r_h, r_t, n_out, out_dim).orders == (
            "token", "feature")  # fmt: skip
        hs = [rng.standard_normal((batch, t, r)) for t, r in zip(lengths, widths)]
        feature = [rng.standard_normal((r_h, r, out_dim)) for r in widths]
        token = [rng.standard_normal((r_t, t, n_out)) for t in lengths]
        got = mmfuse.sequence_fusion(_put(xp, hs, "float64"), _put(xp, feature, "float64"),
                                     _put(xp, token, "float64"))  # fmt: skip
        assert_close(got, naive_sequence_fusion(hs, feature, token), xp=xp.xp)
    finally:
        core.cp_blocking.cache_clear()


def test_masked_tokens_are_ignored_even_when_nan(rng):
    s = CASES[2]
    hs = [rng.standard_normal((3, t, r)) for t, r in zip(s["lengths"], s["widths"])]
    feature, token = _factors(rng, s)
    masks = _masks(rng, 3, s["lengths"])
    poisoned = [np.where(m[:, :, None], h, np.nan) for h, m in zip(hs, masks)]
    for mode in ("cp", "collapsed"):
        got = mmfuse.sequence_fusion(poisoned, feature, token, mode=mode, masks=masks)
        assert_close(got, reference.sequence_fusion(hs, feature, token, mode=mode, masks=masks))
    # a None entry leaves that modality unmasked
    partial = [masks[0], None]
    got = mmfuse.sequence_fusion(hs, feature, token, masks=partial)
    assert_close(got, reference.sequence_fusion(hs, feature, token, masks=partial))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, 1e308])
def test_wander_padding_of_any_value_is_ignored_silently_by_every_backend(fill, activation):
    """Padded tokens holding NaN or +-inf change nothing and warn nowhere (pytest turns
    warnings into errors): the reference's down-projection had warned on inf padding
    ("invalid value encountered in matmul"), where the other backends were silent (a
    review's find).  The residual is off: it would carry the padding itself."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    lengths = (6, 4)
    xs = [rng.standard_normal((3, t, 4)) for t in lengths]
    masks = [rng.random((3, t)) < 0.7 for t in lengths]
    for m in masks:
        m[:, 0] = True  # every sample keeps a token
    params = mmfuse.init_wander([4, 4], lengths, rank=3, feature_rank=2, token_rank=3, out_dim=4,
                                seed=int(rng.integers(2**31)))  # fmt: skip
    poisoned = [np.where(m[:, :, None], x, fill) for x, m in zip(xs, masks)]
    want = reference.wander(xs, params, masks=masks, residual="none", activation=activation)
    for backend in ("reference", "auto", "array_api"):
        got = mmfuse.wander(poisoned, params, masks=masks, residual="none", activation=activation, backend=backend)
        assert_close(got, want)


def test_reference_weight_tensor():
    """W = W_tok (x) W_feat has order 2M + 2, laid out (T_1, r_1, ..., T_M, r_M, T_out, D)."""
    rng = np.random.default_rng(0)
    feature = [rng.standard_normal((2, r, 3)) for r in (2, 1, 3)]
    token = [rng.standard_normal((2, t, 4)) for t in (3, 2, 1)]
    w = reference.sequence_weight(feature, token)
    assert w.shape == (3, 2, 2, 1, 1, 3, 4, 3)
    idx = (2, 1, 1, 0, 0, 2, 3, 1)  # tau_1, s_1, tau_2, s_2, tau_3, s_3, t, k
    w_tok = sum(math.prod(token[m][j, idx[2 * m], idx[6]] for m in range(3)) for j in range(2))
    w_feat = sum(math.prod(feature[m][i, idx[2 * m + 1], idx[7]] for m in range(3)) for i in range(2))
    assert math.isclose(w[idx], w_tok * w_feat, rel_tol=1e-12)


def test_planner_rule_and_cache():
    core.plan.cache_clear()
    # released CMU-MOSI and Food-101 shapes: T_out < T_m, so token factors first
    mosi = core.plan("collapsed", (50, 50, 50), (16, 16, 16), 8, 12, 16, 40)
    assert mosi.orders == ("token",) * 3
    food = core.plan("cp", (197, 50), (64, 64), 8, 12, 64, 768)
    assert food.orders == ("token", "feature")  # T_out = 64 > 50 for the second
    # the count can beat the rule of thumb: collapsed, T_out = 64 > 50, but token-first
    # costs 64*50*64 + 64*64*768 = 3.35M multiply-adds against 2 * 50*64*768 = 4.92M
    food_collapsed = core.plan("collapsed", (197, 50), (64, 64), 8, 12, 64, 768)
    assert food_collapsed.orders == ("token", "token")
    assert food_collapsed.costs[1] == (3350528, 4915200)
    # T_out > T_m: feature factors first
    assert core.plan("collapsed", (4, 6), (8, 8), 1, 1, 32, 16).orders == ("feature", "feature")
    # the chosen order is never the more expensive one
    for p in (mosi, food, food_collapsed):
        assert all(min(c) == (c[0] if o == "token" else c[1]) for o, c in zip(p.orders, p.costs))
    rng = np.random.default_rng(1)
    hs = [rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 4, 3))]
    feature = [rng.standard_normal((2, 3, 4)) for _ in range(2)]
    token = [rng.standard_normal((2, t, 3)) for t in (5, 4)]
    before = core.plan.cache_info()
    for _ in range(3):  # (the entry function: a planned public call chose its orders once)
        core.sequence_fusion(hs, feature, token)
    after = core.plan.cache_info()
    assert after.misses == before.misses + 1
    assert after.hits == before.hits + 2


def test_backends_agree(rng):
    s = CASES[3]
    hs = [rng.standard_normal((3, t, r)) for t, r in zip(s["lengths"], s["widths"])]
    feature, token = _factors(rng, s)
    assert {"array_api", "reference"} <= set(mmfuse.backends.available("sequence_fusion"))
    assert {"array_api", "reference"} <= set(mmfuse.backends.available("wander"))
    a = mmfuse.sequence_fusion(hs, feature, token, backend="array_api")
    b = mmfuse.sequence_fusion(hs, feature, token, backend="reference")
    assert_close(a, b)


# --------------------------------------------------------------------------- erf and GELU


def test_erf_is_accurate_to_float64_rounding(xp):
    x = np.concatenate([np.linspace(-7, 7, 2801), np.geomspace(1e-12, 7, 400), [0.0, 0.46875]])
    got = to_numpy(core.erf(_compat(xp), xp.asarray(x)))
    want = np.array([math.erf(v) for v in x])
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
    assert rel.max() < 1e-15


def _compat(ns):
    import array_api_compat

    return array_api_compat.array_namespace(ns.asarray(np.zeros(1)))


def test_gelu_is_exact_erf_gelu(xp):
    x = np.concatenate([np.linspace(-37, 8, 1801), -np.geomspace(1e-12, 37, 300)])
    want = exact_gelu(x)
    got = to_numpy(core.gelu(_compat(xp), xp.asarray(x)))
    normal = np.abs(want) > 1e-300
    rel = np.abs(got - want)[normal] / np.abs(want[normal])
    # ~1 ulp over the whole normal range (torch's own F.gelu: 2e-2 already at x = -7)
    assert rel.max() < 2e-15
    x32 = x.astype(np.float32)  # compare with the exact value at the rounded input
    want32 = exact_gelu(x32)
    got32 = to_numpy(core.gelu(_compat(xp), xp.asarray(x32, "float32")))
    keep = np.abs(want32) > 1e-30
    rel32 = np.abs(got32 - want32)[keep] / np.abs(want32[keep])
    err32 = np.abs(got32 - want32)[keep]
    if xp.name.startswith("torch"):  # F.gelu: about one float32 ulp of |x|, absolutely
        assert np.all(err32 < 2.4e-7 * (np.abs(want32[keep]) + np.abs(x32[keep])))
    else:  # computed in float64 and rounded once: within float32's eps (the formulas in
        # float32 had grown like x^2 ulp in the far lower tail)
        assert rel32.max() <= np.finfo(np.float32).eps


# --------------------------------------------------------------------------- the adapter


def _wander_case(rng, n, *, same_dim=True, masked=False, rank=3, lengths=None, batch=3):
    lengths = lengths or [4, 2, 3, 2, 3, 2, 2][:n]
    dims = [5] * n if same_dim else [5, 3, 4, 6, 2, 3, 4][:n]
    xs = [rng.standard_normal((batch, t, d)) for t, d in zip(lengths, dims)]
    params = mmfuse.init_wander(dims, lengths, rank=rank, feature_rank=2, token_rank=2,
                                out_dim=5, seed=rng)  # fmt: skip
    # random everywhere (trainable init is deliberately tiny), so mistakes show up
    params["feature"] = [rng.standard_normal(f.shape) for f in params["feature"]]
    params["token"] = [rng.standard_normal(t.shape) for t in params["token"]]
    masks = _masks(rng, batch, lengths) if masked else None
    return xs, params, masks


def _params_in(xp, params, dtype):
    return {
        "down": [(xp.asarray(w, dtype), xp.asarray(b, dtype)) for w, b in params["down"]],
        "feature": _put(xp, params["feature"], dtype),
        "token": _put(xp, params["token"], dtype),
    }


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("mode", ["cp", "collapsed"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_wander_matches_reference(xp, dtype, rng, n, mode, masked):
    xs, params, masks = _wander_case(rng, n, masked=masked)
    desired = reference.wander(xs, params, mode=mode, masks=masks)
    got = mmfuse.wander(
        _put(xp, xs, dtype), _params_in(xp, params, dtype), mode=mode,
        masks=None if masks is None else _put(xp, masks, None),
    )  # fmt: skip
    assert_close(got, desired, xp=xp.xp, dtype=xp.dtype(dtype))
    xp.assert_untouched()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "identity"])
def test_wander_activations_and_residual_none(xp, rng, activation):
    xs, params, _ = _wander_case(rng, 3, same_dim=False)
    desired = reference.wander(xs, params, activation=activation, residual="none")
    got = mmfuse.wander(_put(xp, xs, "float64"), _params_in(xp, params, "float64"),
                        activation=activation, residual="none")  # fmt: skip
    assert_close(got, desired, xp=xp.xp)


def test_wander_callable_activation_and_no_bias(rng):
    xs, params, _ = _wander_case(rng, 2)
    params["down"] = [(w, None) for w, _ in params["down"]]
    got = mmfuse.wander(xs, params, activation=np.tanh)
    assert_close(got, reference.wander(xs, params, activation=np.tanh))


@pytest.mark.parametrize("route", ["numpy", "reference", "torch core", "torch ops"])
def test_wander_names_an_activation_that_is_not_elementwise(rng, route, monkeypatch):
    """A callable activation's result is checked where it is applied (the core, the torch
    backend's ops for large batches, the reference backend's wrapper): an error naming it,
    not one from the fusion's GEMMs further on (the reference's einsums had raised an
    IndexError or NumPy's "shape-mismatch for sum", and taken another dtype silently; a
    review's find)."""
    xs, params, _ = _wander_case(rng, 2)
    if route in ("numpy", "reference"):
        backend = "reference" if route == "reference" else None
        calls = [lambda act: mmfuse.wander(xs, params, activation=act, backend=backend)]
    else:
        torch = pytest.importorskip("torch")
        if route == "torch ops":  # the custom ops, which small batches skip
            wander_module = importlib.import_module("mmfuse.backends.torch.wander")
            monkeypatch.setattr(wander_module, "WHOLE_BATCH_ROWS", 0)
        txs = [torch.from_numpy(x) for x in xs]
        tparams = tree_map(torch.from_numpy, params)
        calls = [lambda act: mmfuse.wander(txs, tparams, activation=act, backend="torch")]
    for call in calls:
        with pytest.raises(ValueError, match=r"activation must be elementwise: it returned shape \(3, 1, "):
            call(lambda z: z[:, :1])
        with pytest.raises(TypeError, match=r"activation must return an array, got int"):
            call(lambda z: 0)
        # a result in another dtype: NumPy's came back silently in it, torch's failed in a GEMM
        with pytest.raises(TypeError, match=r"activation must keep the pre-activations' dtype: it returned "):
            call(lambda z: z[:, :, :] > 0)
        with pytest.raises(TypeError, match=r"activation must keep the pre-activations' dtype: it returned "):
            call(lambda z: (z * 2).astype("float32") if isinstance(z, np.ndarray) else (z * 2).float())
        # an array of another library, in the same dtype: the message had said "it returned
        # float64 for pre-activations of dtype torch.float64" (a review's find)
        if route.startswith("torch"):
            with pytest.raises(TypeError, match=r"library: it returned numpy\.ndarray for pre-activations of type torch\.Tensor"):
                call(lambda z: z.detach().numpy())


@pytest.mark.parametrize("library", ["jax", "dask", "array_api_strict"])
def test_wander_names_an_activation_returning_numpy_for_arrays_with_numpy_dtypes(rng, library):
    """JAX and Dask arrays have NumPy's dtypes, and the check compared the dtypes' libraries:
    a NumPy result passed, forced JAX's pre-activations to the host (a TracerArrayConversion
    error under jit) and failed in Dask's fusion with an error naming no argument (a
    review's find).  A valid activation of theirs still runs."""
    if library == "jax":
        jnp = pytest.importorskip("jax.numpy")
        put = jnp.asarray
    elif library == "dask":
        da = pytest.importorskip("dask.array")

        def put(a):
            return da.from_array(a, chunks=1)
    else:
        strict = pytest.importorskip("array_api_strict")
        put = strict.asarray
    xs, params, _ = _wander_case(rng, 2)
    args = ([put(x) for x in xs], tree_map(put, params))
    with pytest.raises(TypeError, match=r"library: it returned numpy\.ndarray for pre-activations of type "):
        mmfuse.wander(*args, activation=lambda h: np.tanh(np.asarray(h)))
    xp = mmfuse._namespace.array_namespace(args[0][0])
    got = mmfuse.wander(*args, activation=xp.tanh)
    assert_close(got, reference.wander(xs, params, activation=np.tanh))


def test_wander_takes_jax_activations_under_grad_and_vmap(rng):
    """The device check first compared JAX devices too: a tracer has none (None) and an
    uncommitted result follows committed data, so valid activations under jax.grad and
    jax.vmap were refused (a review of the session's diff)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    xs, params, _ = _wander_case(rng, 2)
    jxs, jparams = [jnp.asarray(x) for x in xs], tree_map(jnp.asarray, params)

    def step(h):
        return jnp.where(h > 0, 1.0, 0.0).astype(h.dtype)

    grads = jax.grad(lambda p: mmfuse.wander(jxs, p, activation=step).sum())(jparams)
    assert grads["down"][0][0].shape == params["down"][0][0].shape
    got = jax.vmap(lambda x0: mmfuse.wander([x0[None], jxs[1][:1]], jparams, activation=jax.nn.relu))(jxs[0])
    assert got.shape == (3, 1, *mmfuse.wander(jxs, jparams, activation=jax.nn.relu).shape[1:])
    for i in range(3):
        one = reference.wander([xs[0][i : i + 1], xs[1][:1]], params, activation="relu")
        assert_close(got[i], one)


@pytest.mark.parametrize("batch", [2, 150])
def test_wander_names_an_activation_moving_its_result(rng, batch):
    """A result on another device failed in the fusion's product ("Tensor on device cpu is
    not on the expected device meta"), naming no argument (a review's find): small batches
    (the core) and large ones (the torch backend's ops)."""
    torch = pytest.importorskip("torch")
    xs, params, _ = _wander_case(rng, 2, batch=batch)
    txs, tparams = [torch.from_numpy(x) for x in xs], tree_map(torch.from_numpy, params)
    for mode in ("cp", "collapsed"):
        with pytest.raises(ValueError, match=r"activation must keep the pre-activations' device: it returned an array on meta for pre-activations on cpu"):
            mmfuse.wander(txs, tparams, mode=mode, activation=lambda h: h.to("meta"))


def test_wander_residual_spans_modalities(rng):
    """T_out larger than T_1: the residual takes tokens from the next modalities too."""
    xs, params, _ = _wander_case(rng, 3, rank=7, lengths=[2, 3, 4])
    assert params["token"][0].shape[-1] == 7
    y = mmfuse.wander(xs, params, mode="collapsed")
    bare = mmfuse.wander(xs, params, mode="collapsed", residual="none")
    np.testing.assert_allclose(y - bare, np.concatenate(xs, axis=1)[:, :7], rtol=0, atol=1e-12)


def test_collapsed_wander_is_the_released_forward():
    """Parity with the released adapter's forward (re-typed here in plain torch)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    dims, lengths, rank = [6, 6, 6], [5, 7, 4], 3
    xs = [torch.from_numpy(rng.standard_normal((2, t, 6))) for t in lengths]
    params = mmfuse.init_wander(dims, lengths, rank=rank, feature_rank=2, token_rank=3,
                                out_dim=6, seed=3, xp=torch, dtype=torch.float64)  # fmt: skip

    def released(x_list):
        original = torch.cat(x_list, dim=1)
        feats = []
        for x, (w, b), f, t in zip(x_list, params["down"], params["feature"], params["token"]):
            h = torch.nn.functional.gelu(x @ w + b)
            tmp = (h @ f.sum(dim=0)).permute(0, 2, 1)  # (B, D, T)
            feats.append(tmp @ t.sum(dim=0))  # (B, D, rank)
        fusion = feats[0]
        for f in feats[1:]:
            fusion = fusion * f
        fusion = fusion.permute(0, 2, 1)
        return fusion + original[:, : fusion.shape[1], :]

    got = mmfuse.wander(xs, params, mode="collapsed")
    assert_close(got, released(xs).detach().numpy(), xp=torch, dtype=torch.float64)


# --------------------------------------------------------------------------- initialisation


def _leaves(torch, params):
    out = {
        "down": [(w.clone().requires_grad_(True), b.clone().requires_grad_(True)) for w, b in params["down"]],
        "feature": [f.clone().requires_grad_(True) for f in params["feature"]],
        "token": [t.clone().requires_grad_(True) for t in params["token"]],
    }
    flat = [a for pair in out["down"] for a in pair] + out["feature"] + out["token"]
    return out, flat


def _grads(torch, n, init, mode):
    rng = np.random.default_rng(n)
    lengths = [int(v) for v in rng.integers(3, 7, n)]
    dims = [6] * n
    params = mmfuse.init_wander(dims, lengths, rank=4, feature_rank=2, token_rank=3, out_dim=6,
                                seed=n, xp=torch, dtype=torch.float64, init=init)  # fmt: skip
    leaves, flat = _leaves(torch, params)
    xs = [torch.from_numpy(rng.standard_normal((3, t, 6))) for t in lengths]
    y = mmfuse.wander(xs, leaves, mode=mode)
    residual = torch.cat(xs, dim=1)[:, : y.shape[1]]
    probe = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    (y * probe).sum().backward()
    return y.detach(), residual, flat


@pytest.mark.parametrize("n", range(2, 8))
@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_trainable_init_gives_every_parameter_a_gradient(n, mode):
    torch = pytest.importorskip("torch")
    y, residual, flat = _grads(torch, n, "trainable", mode)
    for k, p in enumerate(flat):
        assert p.grad is not None
        assert bool(torch.all(p.grad != 0)), f"parameter {k} of shape {tuple(p.shape)} has zero gradients"
    # ... while the adapter starts close to the identity
    rel = float(torch.linalg.vector_norm(y - residual) / torch.linalg.vector_norm(residual))
    assert 0 < rel < 0.05


@pytest.mark.parametrize("n", range(2, 8))
@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_parity_init_has_zero_gradients(n, mode):
    """Documents the released defect: zero token factors freeze the whole adapter."""
    torch = pytest.importorskip("torch")
    y, residual, flat = _grads(torch, n, "parity", mode)
    assert bool(torch.equal(y, residual))
    for p in flat:
        assert p.grad is not None and not bool(torch.any(p.grad != 0))


def test_autograd_gradcheck():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    hs = [torch.from_numpy(rng.standard_normal((2, t, r))).requires_grad_() for t, r in ((3, 2), (2, 3))]
    feature = [torch.from_numpy(rng.standard_normal((2, r, 2))).requires_grad_() for r in (2, 3)]
    token = [torch.from_numpy(rng.standard_normal((2, t, 2))).requires_grad_() for t in (3, 2)]
    masks = [torch.from_numpy(m) for m in _masks(rng, 2, [3, 2])]
    for mode in ("cp", "collapsed"):

        def f(*args, mode=mode):
            return mmfuse.sequence_fusion(list(args[:2]), list(args[2:4]), list(args[4:]), mode=mode, masks=masks)

        assert torch.autograd.gradcheck(f, (*hs, *feature, *token))


def test_init_wander_layout_and_namespaces(xp):
    p = mmfuse.init_wander([4, 6], [5, 3], rank=2, feature_rank=3, token_rank=4, out_dim=7,
                           seed=0, xp=xp.xp, device=xp.device)  # fmt: skip
    assert [(tuple(w.shape), tuple(b.shape)) for w, b in p["down"]] == [((4, 2), (2,)), ((6, 2), (2,))]
    assert [tuple(f.shape) for f in p["feature"]] == [(3, 2, 7), (3, 2, 7)]
    assert [tuple(t.shape) for t in p["token"]] == [(4, 5, 2), (4, 3, 2)]  # n_out defaults to rank
    default = xp.xp.asarray(1.0).dtype
    assert all(f.dtype == default for f in p["feature"])
    ref = mmfuse.init_wander([4, 6], [5, 3], rank=2, feature_rank=3, token_rank=4, out_dim=7, seed=0,
                             dtype=np.float64)  # fmt: skip
    assert_close(p["token"][1], ref["token"][1], rtol=1e-6)  # the same draw in every namespace
    parity = mmfuse.init_wander([4], [5], rank=2, feature_rank=1, token_rank=1, out_dim=4,
                                n_out=6, seed=0, init="parity")  # fmt: skip
    assert parity["token"][0].shape == (1, 5, 6) and not np.any(parity["token"][0])
    bound = 1 / math.sqrt(4)
    assert np.all(np.abs(parity["down"][0][0]) <= bound)


def test_parameter_count():
    kw = {"rank": 4, "feature_rank": 3, "token_rank": 2, "out_dim": 5}
    dims, lengths = [5, 7, 6], [3, 4, 2]
    p = mmfuse.init_wander(dims, lengths, **kw, seed=0)
    stored = sum(a.size for w, b in p["down"] for a in (w, b))
    stored += sum(f.size for f in p["feature"]) + sum(t.size for t in p["token"])
    cp = mmfuse.wander_parameter_count(dims, lengths, **kw)
    assert cp["total"] == cp["effective"] == stored
    col = mmfuse.wander_parameter_count(dims, lengths, **kw, mode="collapsed")
    assert col["total"] == stored
    one = mmfuse.init_wander(dims, lengths, **dict(kw, feature_rank=1, token_rank=1), seed=0)
    assert col["effective"] == sum(
        a.size for part in ("feature", "token") for a in one[part]
    ) + sum(a.size for w, b in one["down"] for a in (w, b))
    w = reference.sequence_weight(p["feature"], p["token"])
    assert cp["full_weight"] == w.size
    assert mmfuse.wander_parameter_count(dims, lengths, **kw, n_out=9)["token"] == 2 * 9 * (3 + 4 + 2)


def test_docstring_examples():
    import mmfuse._sequence as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------- errors


@pytest.fixture
def small(rng):
    hs = [rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 3))]
    feature = [rng.standard_normal((2, 2, 5)), rng.standard_normal((2, 3, 5))]
    token = [rng.standard_normal((3, 3, 2)), rng.standard_normal((3, 4, 2))]
    return hs, feature, token


def test_errors_sequence_fusion(small):
    hs, feature, token = small
    with pytest.raises(ValueError, match=r"feature_factors must have one entry per modality: got 1 factors for 2"):
        mmfuse.sequence_fusion(hs, feature[:1], token)
    with pytest.raises(ValueError, match=r"token_factors must have one entry per modality: got 3 factors for 2"):
        mmfuse.sequence_fusion(hs, feature, [*token, token[0]])
    with pytest.raises(ValueError, match=r"token_factors\[1\] has shape \(3, 3, 2\); expected \(R_t, T_1, T_out\) "
                                         r"with T_1 = 4 \(the token count of hs\[1\] of shape \(2, 4, 3\)\)"):
        mmfuse.sequence_fusion(hs, feature, [token[0], token[0]])
    with pytest.raises(ValueError, match=r"feature_factors\[0\] has shape \(2, 3, 5\); expected \(R_h, r_0, D\) "
                                         r"with r_0 = 2"):
        mmfuse.sequence_fusion(hs, [feature[1], feature[1]], token)
    with pytest.raises(ValueError, match=r"feature_factors\[1\] has D = 4 .* but feature_factors\[0\] has D = 5"):
        mmfuse.sequence_fusion(hs, [feature[0], feature[1][..., :4]], token)
    with pytest.raises(ValueError, match=r"token_factors\[1\] has T_out = 1 .* T_out must match"):
        mmfuse.sequence_fusion(hs, feature, [token[0], token[1][..., :1]])
    with pytest.raises(ValueError, match=r"token_factors\[1\] has rank R_t = 2 .* has 3"):
        mmfuse.sequence_fusion(hs, feature, [token[0], token[1][:2]])
    with pytest.raises(ValueError, match=r"mode must be one of \['cp', 'collapsed'\], got 'tucker'"):
        mmfuse.sequence_fusion(hs, feature, token, mode="tucker")
    with pytest.raises(ValueError, match=r"feature_factors\[0\] must be 3-dimensional with shape \(R_h, r_0, D\)"):
        mmfuse.sequence_fusion(hs, [feature[0][0], feature[1]], token)
    with pytest.raises(ValueError, match=r"hs\[1\] must be 3-dimensional"):
        mmfuse.sequence_fusion([hs[0], hs[1][0]], feature, token)
    with pytest.raises(TypeError, match=r"token_factors\[1\] has dtype float32 but hs\[0\] has dtype float64"):
        mmfuse.sequence_fusion(hs, feature, [token[0], token[1].astype(np.float32)])


def test_errors_masks(small):
    hs, feature, token = small
    good = [np.ones((2, 3), bool), np.ones((2, 4), bool)]
    with pytest.raises(ValueError, match=r"masks\[1\] must have shape \(B, T_1\) = \(2, 4\) to match hs\[1\] "
                                         r"of shape \(2, 4, 3\), got \(2, 3\)"):
        mmfuse.sequence_fusion(hs, feature, token, masks=[good[0], good[0]])
    with pytest.raises(ValueError, match=r"masks must have one entry \(or None\) per modality: got 1 for 2"):
        mmfuse.sequence_fusion(hs, feature, token, masks=good[:1])
    with pytest.raises(TypeError, match=r"masks\[0\] must have a boolean dtype, got float64"):
        mmfuse.sequence_fusion(hs, feature, token, masks=[good[0].astype(float), good[1]])
    with pytest.raises(TypeError, match=r"masks must be a list or tuple"):
        mmfuse.sequence_fusion(hs, feature, token, masks=good[0])


def test_errors_wander(rng):
    xs, params, _ = _wander_case(rng, 2)
    bad = dict(params, feature=[params["feature"][0], params["feature"][1][:, :2]])
    with pytest.raises(ValueError, match=r"params\['feature'\]\[1\] has shape \(2, 2, 5\); expected \(R_h, r_1, D\) "
                                         r"with r_1 = 3 \(the width of params\['down'\]\[1\]\[0\] of shape \(5, 3\)\)"):
        mmfuse.wander(xs, bad)
    with pytest.raises(ValueError, match=r"params\['token'\]\[0\] has shape .* with T_0 = 4 \(the token count of xs\[0\]"):
        mmfuse.wander(xs, dict(params, token=[params["token"][1], params["token"][1]]))
    with pytest.raises(ValueError, match=r"params\['down'\] must have one \(W, b\) pair per modality: got 1 for 2"):
        mmfuse.wander(xs, dict(params, down=params["down"][:1]))
    with pytest.raises(ValueError, match=r"params\['token'\] must have one entry per modality: got 1 factors for 2"):
        mmfuse.wander(xs, dict(params, token=params["token"][:1]))
    with pytest.raises(ValueError, match=r"params\['down'\]\[1\]\[0\] has shape \(5, 3\); expected \(d_1, r\) with d_1 = 4"):
        mmfuse.wander([xs[0], xs[1][..., :4]], params, residual="none")
    with pytest.raises(ValueError, match=r"residual='first' needs every d_m = D: xs\[0\] has d_0 = 5 .* D = 4"):
        mmfuse.wander(xs, dict(params, feature=[f[..., :4] for f in params["feature"]]))
    mmfuse.wander(xs, dict(params, feature=[f[..., :4] for f in params["feature"]]), residual="none")
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'gelu_tanh', 'relu', 'identity'\] "
                                         r"or a callable, got 'swish'"):
        mmfuse.wander(xs, params, activation="swish")
    with pytest.raises(ValueError, match=r"residual must be one of \['first', 'none'\], got 'all'"):
        mmfuse.wander(xs, params, residual="all")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        mmfuse.wander(xs, params, mode="full")
    with pytest.raises(ValueError, match=r"params is missing \['token'\]"):
        mmfuse.wander(xs, {"down": params["down"], "feature": params["feature"]})
    with pytest.raises(TypeError, match=r"params must be a dict"):
        mmfuse.wander(xs, [params["down"], params["feature"], params["token"]])
    with pytest.raises(TypeError, match=r"params\['down'\]\[0\] must be a \(W, b\) pair"):
        mmfuse.wander(xs, dict(params, down=[params["down"][0][0], params["down"][1]]))
    # a generator of pairs: its entries are named as pairs, not as arrays (a review's find)
    with pytest.raises(TypeError, match=r"^params\['down'\] must be a list or tuple of \(W, b\) pairs "
                                        r"\(one per modality\), got generator$"):
        mmfuse.wander(xs, dict(params, down=(pair for pair in params["down"])))
    with pytest.raises(ValueError, match=r"masks\[0\] must have shape \(B, T_0\) = \(3, 4\)"):
        mmfuse.wander(xs, params, masks=[np.ones((3, 2), bool), None])


def test_error_residual_needs_enough_tokens(rng):
    xs, params, _ = _wander_case(rng, 2, rank=7, lengths=[2, 3])
    with pytest.raises(ValueError, match=r"residual='first' needs T_out <= sum T_m: T_out = 7 but the inputs "
                                         r"have 5 tokens in all \(2 \+ 3\); use residual='none'"):
        mmfuse.wander(xs, params)
    assert mmfuse.wander(xs, params, residual="none").shape == (3, 7, 5)


def test_errors_init_and_count():
    kw = {"rank": 2, "feature_rank": 1, "token_rank": 1, "out_dim": 3}
    with pytest.raises(ValueError, match=r"init must be 'trainable' or 'parity', got 'zeros'"):
        mmfuse.init_wander([3], [2], **kw, init="zeros")
    with pytest.raises(ValueError, match=r"dims and lengths must have one entry per modality: got 2 dims and 1"):
        mmfuse.init_wander([3, 3], [2], **kw)
    with pytest.raises(ValueError, match=r"token_rank must be a positive integer, got 0"):
        mmfuse.wander_parameter_count([3], [2], **dict(kw, token_rank=0))
    with pytest.raises(ValueError, match=r"lengths\[1\] must be a positive integer, got -1"):
        mmfuse.wander_parameter_count([3, 3], [2, -1], **kw)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        mmfuse.wander_parameter_count([3], [2], **kw, mode="tt")
