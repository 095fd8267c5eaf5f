"""Sequence fusion edge cases found by review: float16 on the Array-API core (GELU's rational
pieces and the product of terms overflowed float16), a permuted h in the collapsed custom
op's backward, and factors with an empty rank or output axis."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from exact_gelu import exact_gelu

import mmfuse
from mmfuse._core.sequence import gelu
from mmfuse._namespace import array_namespace


def _gelu_exact(x):
    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64).ravel()])


@pytest.mark.parametrize("namespace", ["numpy", "jax"])
def test_float16_gelu_on_the_core_is_float16_rounding_of_the_exact_value(namespace):
    """NumPy's GELU widens float16 itself; other namespaces (JAX here) through the core's own
    widening, without which the rational pieces overflowed (370 NaN of 2001 points on
    [-10, 10]; a mutation review)."""
    rng = np.random.default_rng(2026_11_23)
    x = np.concatenate([np.linspace(-10, 10, 2001), rng.uniform(-8, 8, 500)]).astype(np.float16)
    given = x if namespace == "numpy" else pytest.importorskip("jax.numpy").asarray(x)
    got = np.asarray(gelu(array_namespace(given), given))
    assert got.dtype == np.float16
    want = _gelu_exact(x)
    # computed in float32 and rounded once: within one float16 ulp of the exact value
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - want) <= ulp + 1e-12)


def test_float16_sequence_fusion_does_not_overflow_in_the_intermediates():
    """300 * 300 * 1e-3 = 90 fits float16; the product of the first two terms does not."""
    rng = np.random.default_rng(7)
    hs = [np.full((2, 3, 2), v, np.float16) + rng.uniform(0, 1e-2, (2, 3, 2)).astype(np.float16)
          for v in (300.0, 300.0, 1e-3)]  # fmt: skip
    feature = [rng.uniform(0.2, 0.4, (2, 2, 3)).astype(np.float16) for _ in hs]
    token = [rng.uniform(0.2, 0.4, (2, 3, 4)).astype(np.float16) for _ in hs]
    for mode in ("cp", "collapsed"):
        got = mmfuse.sequence_fusion(hs, feature, token, mode=mode, backend="array_api")
        want = mmfuse.sequence_fusion(
            [h.astype(np.float64) for h in hs], [f.astype(np.float64) for f in feature],
            [t.astype(np.float64) for t in token], mode=mode, backend="reference",
        )  # fmt: skip
        assert got.dtype == np.float16 and np.all(np.isfinite(got)), mode
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3)


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("backend", [None, "array_api", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_wander_is_computed_in_float32(namespace, backend, dtype):
    """A pre-activation of 256 * 256 (over float16's 65504) scaled back by its feature factor:
    the adapter's output is 53.8.  The down-projection and the activation ran in float16 on
    the core and on the torch backend's unfused path (inf, for some modes and activations
    only); now the whole adapter runs in float32 and rounds once, on every path."""
    if namespace == "numpy" and (backend == "torch" or dtype == "bfloat16"):
        pytest.skip("NumPy has no bfloat16; the torch backend takes torch tensors")
    if namespace == "numpy":
        conv = lambda a: np.asarray(a, dtype=np.float16)  # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        conv = lambda a: torch.tensor(np.asarray(a), dtype=getattr(torch, dtype))  # noqa: E731
    xs = [np.array([[[256.0]]]), np.array([[[1.0]]])]
    params = {
        "down": [(np.array([[256.0]]), np.array([0.0])), (np.array([[1.0]]), np.array([0.0]))],
        "feature": [np.full((1, 1, 1), 2.0**-10), np.ones((1, 1, 1))],
        "token": [np.ones((1, 1, 1)), np.ones((1, 1, 1))],
    }
    half = {"down": [(conv(w), conv(b)) for w, b in params["down"]],
            "feature": [conv(a) for a in params["feature"]], "token": [conv(a) for a in params["token"]]}  # fmt: skip
    for mode in ("collapsed", "cp"):
        for activation in ("gelu", "relu", "gelu_tanh"):
            want = float(mmfuse.wander(xs, params, mode=mode, activation=activation, residual="none",
                                       backend="reference")[0, 0, 0])  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no overflow warning either
                y = mmfuse.wander([conv(x) for x in xs], half, mode=mode, activation=activation,
                                  residual="none", backend=backend)  # fmt: skip
            assert str(y.dtype).endswith(dtype)
            got = float(y[0, 0, 0])
            assert abs(got - want) <= 0.01 * abs(want), (mode, activation, got, want)


def test_collapsed_backward_takes_a_permuted_h():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, T=4, r=3)
    f = [torch.randn(1, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)]  # T_out > T: feature first
    upstream = torch.randn(2, 5, 2, generator=g, dtype=torch.float64)
    grads = []
    for backend in ("torch", "array_api"):
        y = mmfuse.sequence_fusion([h], f, t, mode="collapsed", backend=backend)
        grads.append(torch.autograd.grad(y, [h, *f, *t], upstream))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("feature_shape", "token_shape", "match"),
    [
        ((1, 2, 4), (0, 3, 5), r"token_factors\[0\] has shape \(0, 3, 5\); its R_t and T_out must be at least 1"),
        ((1, 2, 4), (1, 3, 0), r"token_factors\[0\] has shape \(1, 3, 0\)"),
        ((0, 2, 4), (1, 3, 5), r"feature_factors\[0\] has shape \(0, 2, 4\); its R_h and D must be at least 1"),
        ((1, 2, 0), (1, 3, 5), r"feature_factors\[0\] has shape \(1, 2, 0\)"),
    ],
)
def test_factors_with_an_empty_rank_or_output_axis_are_refused(feature_shape, token_shape, match):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=match):
        mmfuse.sequence_fusion([rng.standard_normal((2, 3, 2))], [rng.standard_normal(feature_shape)],
                               [rng.standard_normal(token_shape)])  # fmt: skip


def test_wander_errors_quote_the_inputs_shapes():
    """Not the down-projected (B, T_m, r) shapes, which the caller never sees."""
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 6, 5))]
    p = mmfuse.init_wander([5, 5], [4, 6], rank=2, feature_rank=1, token_rank=1, out_dim=5, seed=4)
    bad = {**p, "token": [rng.standard_normal((1, 7, 2)), p["token"][1]]}
    with pytest.raises(ValueError, match=r"T_0 = 4 \(the token count of xs\[0\] of shape \(3, 4, 5\)\)"):
        mmfuse.wander(xs, bad)
    with pytest.raises(ValueError, match=r"masks\[0\] must have shape \(B, T_0\) = \(3, 4\) to match xs\[0\] of shape \(3, 4, 5\)"):
        mmfuse.wander(xs, p, masks=[np.ones((3, 5), bool), None])


@pytest.mark.parametrize("mode", ["collapsed", "cp"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("backend", ["torch", "array_api"])
@pytest.mark.parametrize("paths", ["small", "blocked"])
def test_wander_nan_padding_gives_the_gradients_of_zero_padding(mode, activation, backend, paths, request):
    """Padded tokens are zeroed before the down-projection: NaN padding used to reach dL/dW
    (and, through the fused op's GELU derivative, dL/db) as 0 * NaN.  "blocked": the paths of
    large batches (the torch backend's custom ops, ``mmfuse::wander_collapsed`` for the
    collapsed GELU adapter), whose own masking of dL/dW no small-batch call reached (a
    mutation review's find)."""
    torch = pytest.importorskip("torch")
    if paths == "blocked":
        request.getfixturevalue("blocked_paths")
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, t, 4, generator=g, dtype=torch.float64) for t in (5, 3)]
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.rand(2, 3, generator=g) > 0.4]
    masks[1][:, 0] = True
    masks[1][:, 2] = False  # padding in every sample (the draw alone had left none)
    p = mmfuse.init_wander([4, 4], [5, 3], rank=3, feature_rank=2, token_rank=2, out_dim=4, seed=6,
                           xp=torch, dtype=torch.float64)  # fmt: skip
    upstream = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    results = []
    for pad in (0.0, float("nan")):
        padded = [x.clone() for x in xs]
        padded[1][~masks[1]] = pad
        leaves = [t.clone().requires_grad_() for w, b in p["down"] for t in (w, b)]
        params = {"down": [(leaves[0], leaves[1]), (leaves[2], leaves[3])], "feature": p["feature"], "token": p["token"]}
        y = mmfuse.wander(padded, params, mode=mode, masks=masks, activation=activation, backend=backend)
        results.append((y, torch.autograd.grad(y, leaves, upstream)))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_core_relu_keeps_nan_like_the_reference():
    x = np.array([-1.0, np.nan, 2.0])
    from mmfuse._core.sequence import ACTIVATIONS

    got = ACTIVATIONS["relu"](array_namespace(x), x)
    np.testing.assert_array_equal(got, np.maximum(x, 0.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": np.int64}, TypeError, "dtype must be a real floating dtype"),
        ({"dtype": bool}, TypeError, "dtype must be a real floating dtype"),
        ({"dims": 3}, TypeError, "dims must be a sequence of positive integers"),
        ({"lengths": "45"}, TypeError, "lengths must be a sequence of positive integers"),
        ({"dims": [4, 2.5]}, ValueError, r"dims\[1\] must be a positive integer, got 2.5"),
    ],
)
def test_init_wander_checks_its_arguments_like_init_lowrank(kwargs, error, match):
    args = {"dims": [4, 4], "lengths": [4, 5], "rank": 2, "feature_rank": 1, "token_rank": 1, "out_dim": 4}
    rng = np.random.default_rng(9)
    state = rng.bit_generator.state
    with pytest.raises(error, match=match):
        mmfuse.init_wander(**{**args, **kwargs}, seed=rng)
    assert rng.bit_generator.state == state  # refused before drawing


@pytest.mark.parametrize("with_scipy", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_gelu_paths_are_exact(with_scipy, dtype, monkeypatch):
    """NumPy's GELU with SciPy's erfc (when the process has imported scipy.special) and with
    the Cody approximations (when it has not): both the exact erf GELU to about one ulp of
    the dtype, float64 through the far lower tail (the argument's rounding corrected)."""
    import sys

    if with_scipy:
        pytest.importorskip("scipy.special")
    else:
        monkeypatch.delitem(sys.modules, "scipy.special", raising=False)
    x = np.concatenate([np.linspace(-37, 8, 901), -np.geomspace(1e-12, 37, 150)]).astype(dtype)
    want = exact_gelu(x)
    got = gelu(array_namespace(x), x)
    assert got.dtype == dtype
    tiny = np.finfo(dtype).tiny
    keep = np.abs(want) > tiny
    rel = np.abs(got.astype(np.float64) - want)[keep] / np.abs(want[keep])
    eps = np.finfo(dtype).eps
    if dtype == np.float64:
        assert rel.max() < 2e-15
    else:  # both computed in float64 and rounded once (the Cody path in float32 had grown
        # like x^2 ulp in the far lower tail, up to 6 ulps)
        assert rel.max() <= eps


def test_numpy_scipy_gelu_is_elementwise_across_blocks_and_exact_near_zero():
    """SciPy's GELU path runs block by block and takes the lower-tail formula only on the
    elements below its threshold: every element gets the bits it gets alone, whatever its
    neighbours and block (tails in some blocks, none in others, the non-finite values); and
    on [-1, 0], where erfc of the rounded argument replaced the tail formula, within 4 float64
    ulps of 40-digit mpmath (the tail formula's error there was 4-5)."""
    special = pytest.importorskip("scipy.special")
    from mmfuse._core.sequence import _GELU_BLOCK, _SCIPY_TAIL_X, _gelu_scipy

    rng = np.random.default_rng()
    x = 3.0 * rng.standard_normal(2 * _GELU_BLOCK + 77)
    x[_GELU_BLOCK : 2 * _GELU_BLOCK] = np.abs(x[_GELU_BLOCK : 2 * _GELU_BLOCK])  # no tail here
    x[[5, -3, -2, -1]] = [-np.inf, np.inf, np.nan, _SCIPY_TAIL_X]
    with np.errstate(invalid="ignore"):  # x = -inf: 0 * inf, NaN as the reference gives
        got = _gelu_scipy(special, x)
        picks = np.concatenate([rng.choice(x.shape[0], 300, replace=False), [5, x.shape[0] - 1]])
        alone = np.concatenate([_gelu_scipy(special, x[i : i + 1]) for i in picks])
    np.testing.assert_array_equal(got[picks], alone)
    assert np.isnan(got[5]) and got[-3] == np.inf and np.isnan(got[-2])
    near = np.concatenate([rng.uniform(-1.0, 0.0, 400), [-1.0, -0.5, -1e-300]])
    want = exact_gelu(near)
    ulps = np.abs(_gelu_scipy(special, near) - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 4, (near[np.argmax(ulps)], ulps.max())


@pytest.mark.parametrize("dtype", [np.longdouble, np.dtype(">f8")])
def test_numpy_scipy_gelu_of_other_64_bit_floats_is_the_float64_one(dtype):
    """Long double and big-endian float64 inputs are computed in float64 with the lower-tail
    formula too (not as a narrower dtype without it: 2e-13 relative off at x = -30), in
    their own dtype."""
    pytest.importorskip("scipy.special")
    from mmfuse._core.sequence import _gelu_numpy

    x = np.concatenate([np.linspace(-37.0, -1.01, 300), np.random.default_rng().standard_normal(50)])
    got = _gelu_numpy(x.astype(dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.astype(np.float64), _gelu_numpy(x))


def test_reference_gelu_is_exact_through_the_lower_tail():
    """The oracle's GELU within a few ulps of 40-digit mpmath from x = -37 to 8 (drawn afresh
    each run): erfc's argument -x / sqrt 2 carries its own rounding.  erfc of the rounded
    argument alone was up to 1600 ulps off at x = -37 (about 2 u^2 times u's rounding)."""
    rng = np.random.default_rng()
    x = np.concatenate([rng.uniform(-37, 8, 600), -rng.uniform(20, 37.5, 200)])
    want = exact_gelu(x)
    got = mmfuse.reference.gelu(x)
    ulps = np.abs(got - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 4, (x[np.argmax(ulps)], ulps.max())


@pytest.mark.parametrize("batch", [3, 700])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_numpy_activation_of_all_modalities_at_once_is_per_modality_bits(activation, batch, monkeypatch):
    """NumPy's Wander applies the GELU to all modalities' pre-activations in one call up to
    _ONE_CALL_ELEMENTS elements in all, one call per modality beyond; the same bits, in the
    same shapes, either way (widths and lengths differing)."""
    from mmfuse._core.sequence import _ONE_CALL_ELEMENTS, ACTIVATIONS, _activate

    rng = np.random.default_rng()
    hs = [3.0 * rng.standard_normal((batch, t, r)) for t, r in ((5, 4), (2, 7), (6, 1))]
    xp = array_namespace(hs[0])
    fn, calls = ACTIVATIONS[activation], []
    monkeypatch.setitem(ACTIVATIONS, activation, lambda xp, h: calls.append(h.size) or fn(xp, h))
    got = _activate(xp, activation, hs)
    total = sum(h.size for h in hs)
    assert calls == ([total] if total <= _ONE_CALL_ELEMENTS else [h.size for h in hs])
    for h, g in zip(hs, got):
        want = fn(xp, h)
        assert g.shape == h.shape and g.dtype == h.dtype
        np.testing.assert_array_equal(g, want)


def _gelu_on_path(path, x, monkeypatch):
    """The GELU of float64 NumPy ``x`` by one implementation: "cody" (NumPy with SciPy's
    module hidden), "scipy", "generic" (the Array-API form), "reference" (the oracle),
    "torch" and "torch grad" (a
    float64 tensor without and with autograd recording); as a NumPy array."""
    import sys

    from mmfuse._core import sequence as seq

    if path == "cody":
        monkeypatch.delitem(sys.modules, "scipy.special", raising=False)
        return gelu(array_namespace(x), x)
    if path == "scipy":
        pytest.importorskip("scipy.special")
        return gelu(array_namespace(x), x)
    if path == "generic":
        return seq._gelu_generic(array_namespace(x), x)
    if path == "reference":
        return mmfuse.reference.gelu(x)
    torch = pytest.importorskip("torch")
    t = torch.tensor(x, requires_grad=path == "torch grad")
    return gelu(array_namespace(t), t).detach().numpy()


@pytest.mark.parametrize("path", ["cody", "scipy", "generic", "reference", "torch", "torch grad"])
def test_gelu_far_lower_tail_where_phi_alone_is_subnormal(path, monkeypatch):
    """x in (-37.615, -37.5): x Phi(x) is a normal float64 but Phi(x) is not (further down both
    are subnormal, x Phi(x) still above 0 to x ~ -38.6).  The NumPy paths
    returned -0 there (Phi zeroed from |x / sqrt 2| >= 26.543) or a constant -4.2e-307 for
    every x below -37.5 (the Gaussian factor clamped, never zeroed); the lower tail now
    multiplies by x first, and from x ~ -38.6 on the result underflows to -0."""
    x = np.array([-37.0, -37.54, -37.6, -37.61, -37.9, -38.2, -38.5, -38.7, -40.0, -1e10])
    want = exact_gelu(x, digits=50)
    got = _gelu_on_path(path, x, monkeypatch)
    normal = np.abs(want) >= np.finfo(np.float64).tiny
    assert normal[:4].all() and not normal[4:].any()
    np.testing.assert_allclose(got[normal], want[normal], rtol=4e-15, atol=0)
    # subnormal results: right to their absolute resolution (a few units of 2**-1074)
    assert np.all(np.abs(got[~normal] - want[~normal]) <= 8 * 5e-324 + 1e-16 * np.abs(want[~normal]))


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_torch_ops_backward_with_a_modality_of_width_zero(mode, blocked_paths):
    """A modality of width r_m = 0 (its features contribute the empty sum) passes the checks;
    the torch ops' backward failed reshaping it (``reshape(-1, 0)``).  Its gradients now match
    the core's under autograd, zero-size ones included, for sequence_fusion and wander."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(5)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    hs, feature, token = [draw(2, 3, 0), draw(2, 4, 3)], [draw(1, 0, 5), draw(1, 3, 5)], [draw(1, 3, 6), draw(1, 4, 6)]
    args = [t.requires_grad_() for t in (*hs, *feature, *token)]
    copies = [t.detach().clone().requires_grad_() for t in args]
    upstream = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    results = []
    for backend, ts in (("torch", args), ("array_api", copies)):
        y = mmfuse.sequence_fusion(ts[:2], ts[2:4], ts[4:], mode=mode, backend=backend)
        results.append((y, torch.autograd.grad(y, ts, upstream, allow_unused=True)))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y0, y1)
    for a, b in zip(g0, g1):
        if b is not None:  # (allow_unused: the core's graph may not reach a zero-size leaf)
            torch.testing.assert_close(a, b)
    # wander: a down-projection of width 0 (the custom ops, as every batch here)
    xs = [draw(2, 3, 5), draw(2, 4, 5)]
    params = {
        "down": [(draw(5, 0), None), (draw(5, 3), None)],
        "feature": [a.detach().clone().requires_grad_() for a in args[2:4]],
        "token": [a.detach() for a in args[4:]],
    }
    y = mmfuse.wander(xs, params, mode=mode, backend="torch", residual="none")
    grads = torch.autograd.grad(y, params["feature"], torch.ones_like(y))
    assert grads[0].shape == (1, 0, 5) and torch.isfinite(grads[1]).all()


@pytest.mark.parametrize("path", ["cody", "scipy", "generic", "torch", "torch grad"])
def test_gelu_of_huge_positive_inputs_is_the_input(path, monkeypatch):
    """x Phi(x) = x for x beyond half the float64 range: the NumPy path with SciPy and torch's
    no-grad path multiplied x by erfc ~ 2 before halving, and overflowed to inf."""
    x = np.array([1e308, 1.7e308, 9e307, 3.0])
    want = x * np.array([1.0, 1.0, 1.0, 0.5 * math.erfc(-3.0 / math.sqrt(2.0))])
    got = _gelu_on_path(path, x, monkeypatch)
    np.testing.assert_allclose(got, want, rtol=4e-16, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 50, 16), (1, 7, 5), (2, 200, 64)])
def test_torch_gelu_on_small_cpu_tensors_takes_the_transposed_view(dtype, shape):
    """Small contiguous CPU tensors reach ATen's GELU kernels as a transposed view (oneDNN's
    fixed cost avoided; ``aten_gelu_view``): the values, the gradient (autograd's and the
    Wander op's own backward) and the layouts are those of the exact GELU."""
    torch = pytest.importorskip("torch")
    from mmfuse._core.sequence import aten_gelu_view, gelu_torch
    from mmfuse.backends.torch.wander import _gelu_backward

    gen = torch.Generator().manual_seed(2026_12_04)
    dt = getattr(torch, dtype)
    x = (3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dt).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dt)
    assert aten_gelu_view(x) == (math.prod(shape) < 1 << 14)
    y = gelu_torch(x)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double()
    cdf = 0.5 * torch.special.erfc(-x64 / math.sqrt(2.0))
    want = x64 * cdf
    want_dx = g.double() * (cdf + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2.0 * math.pi))
    # a few ulps of |x| (the kernels compute in float32; bfloat16 rounds once at the end)
    ulp = 2.0**-23 if dtype == "float32" else 2.0**-8
    assert y.dtype == dt and y.is_contiguous() and dx.is_contiguous()
    assert torch.all((y.double() - want).abs() <= 4 * ulp * (x64.abs() + want.abs()))
    scale = (g.double().abs() * (1 + x64.abs()))
    assert torch.all((dx.double() - want_dx).abs() <= 8 * ulp * scale)
    own = _gelu_backward(g, x.detach())
    assert own.is_contiguous() and torch.equal(own, dx)


def test_aten_gelu_view_rules():
    torch = pytest.importorskip("torch")
    from mmfuse._core.sequence import aten_gelu_view

    assert aten_gelu_view(torch.ones(4, 5))
    assert not aten_gelu_view(torch.ones(20))  # no transposed view of one axis
    assert not aten_gelu_view(torch.ones(20, 1))  # its view would count as contiguous
    assert not aten_gelu_view(torch.ones(5, 4).mT)  # already ATen's own kernel
    assert not aten_gelu_view(torch.ones(128, 128))  # oneDNN's is faster from 16384 elements
    assert not aten_gelu_view(torch.ones(4, 5, device="meta"))


def test_torch_gelu_under_dynamic_compile_does_not_guard_on_the_size():
    """Under ``torch.compile`` the GELU takes no size rule (``aten_gelu_view`` tests compiling
    first): a size test on a symbolic shape would guard the graph on it, a recompile where a
    growing batch crosses it."""
    torch = pytest.importorskip("torch")
    from mmfuse._core.sequence import gelu_torch

    torch._dynamo.reset()
    compiled = torch.compile(gelu_torch, dynamic=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 40, 3):  # 1600, 32000 and 2400 elements: across the 16384 rule
            x = torch.randn(batch, 50, 16)
            torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x))
    torch._dynamo.reset()


def test_gelu_tanh_is_accurate_in_its_lower_tail():
    """``activation="gelu_tanh"``, 0.5 x (1 + tanh z), against 50-digit arithmetic: 1 + tanh z
    cancelled for negative x (2e6 float64 ulps at x = -5, 0 for -3.1e-21 at x = -8, in the
    reference as in the core); computed as x sigmoid(2 z), the error is z's rounding, under
    4 + 8 |z| ulps (a review of the oracle)."""
    from mmfuse._core.sequence import ACTIVATIONS
    from mmfuse.reference.sequence import _ACTIVATIONS as REF_ACTIVATIONS

    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 50
    x = np.concatenate([np.linspace(-12.0, 6.0, 721), np.random.default_rng().uniform(-12.0, 6.0, 200)])

    def exact_at(v):  # 0.5 v (1 + tanh z) = v / (1 + e^(-2 z)) exactly: no cancellation at 50 digits
        z = mp.sqrt(2 / mp.pi) * (mp.mpf(v) + mp.mpf("0.044715") * mp.mpf(v) ** 3)
        return float(mp.mpf(v) / (1 + mp.exp(-2 * z)))

    exact = np.array([exact_at(v) for v in x])
    z = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
    bound = (4.0 + 8.0 * np.abs(z)) * np.spacing(np.abs(exact))
    candidates = {"reference": REF_ACTIVATIONS["gelu_tanh"](x), "numpy": ACTIVATIONS["gelu_tanh"](np, x)}
    try:  # the generic form (namespaces other than NumPy and torch)
        import array_api_strict as xps

        candidates["array_api_strict"] = np.asarray(ACTIVATIONS["gelu_tanh"](xps, xps.asarray(x)))
    except ImportError:
        pass
    torch = pytest.importorskip("torch")
    candidates["torch"] = ACTIVATIONS["gelu_tanh"](torch, torch.tensor(x)).numpy()
    for name, got in candidates.items():
        err = np.abs(got - exact)
        assert np.all(err <= bound), (name, x[np.argmax(err / bound)])


def test_gelu_tanh_keeps_its_smallest_normal_values():
    """Where e^(-2 z) overflows (x below about -21.16 in float64, -10.06 in float32) the value
    x sigmoid(2 z) is still a normal number down to about -21.2 and -10.9 (a subnormal one in
    float32 below -10.1): NumPy's quotient
    x / (1 + e^(-2 z)) gave 0 there (a review's find); now every namespace but torch (whose
    sigmoid flushes them, see ``_gelu_tanh``) takes the reference's form."""
    from mmfuse._core.sequence import ACTIVATIONS
    from mmfuse.reference.sequence import _ACTIVATIONS as REF_ACTIVATIONS

    rng = np.random.default_rng()
    x64 = rng.uniform(-21.2, -21.16, 64)
    x32 = rng.uniform(-10.6, -10.06, 64).astype(np.float32)  # values above 1e-43
    want64 = REF_ACTIVATIONS["gelu_tanh"](x64)
    want32 = REF_ACTIVATIONS["gelu_tanh"](x32.astype(np.float64))
    assert np.all(want64 < 0) and np.all(want32.astype(np.float32) < 0)
    namespaces = [np]
    try:
        import array_api_strict as xps

        namespaces.append(xps)
    except ImportError:
        pass
    for xp in namespaces:
        got64 = np.asarray(ACTIVATIONS["gelu_tanh"](xp, xp.asarray(x64)))
        got32 = np.asarray(ACTIVATIONS["gelu_tanh"](xp, xp.asarray(x32)))
        assert got32.dtype == np.float32
        # z's rounding (a few |z| ulps: |z| < 400 here); in float32 (computed in float32)
        # also e's and x e's subnormal steps, a few of them (1e-44 absolute)
        np.testing.assert_allclose(got64, want64, rtol=4000 * np.finfo(np.float64).eps, atol=0)
        np.testing.assert_allclose(got32, want32, rtol=1e-3, atol=16 * np.finfo(np.float32).smallest_subnormal)
        assert np.all(got32 < 0)  # (the quotient gave 0 for all)


def test_relu_derivative_at_zero_is_torchs():
    """The ReLU's derivative at exactly 0 is 0, as torch.relu's (the core's where(x < 0, ...)
    took the identity branch there: 1); values and NaN unchanged."""
    torch = pytest.importorskip("torch")
    from mmfuse._core.sequence import ACTIVATIONS

    x = torch.tensor([-1.0, 0.0, 2.0, float("nan")], dtype=torch.float64, requires_grad=True)
    y = ACTIVATIONS["relu"](torch, x)
    (got,) = torch.autograd.grad(y.sum(), [x])
    plain = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.relu(plain).sum(), [plain])
    torch.testing.assert_close(y, torch.relu(x.detach()), equal_nan=True)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_torch_float64_gelu_derivative_at_the_range_ends():
    """The float64 torch GELU's derivative was NaN below x ~ -1.27e308 (erfcx's own derivative
    overflowed there, times a Gaussian factor of 0), where x Phi(x)'s derivative is 0; through
    wander, a bias of -1.5e308 gave a NaN gradient on torch and 0 on JAX (a review's find).
    At x = +-inf and NaN the gradient stays NaN, as JAX's (and torch's before)."""
    torch = pytest.importorskip("torch")
    from mmfuse._core.sequence import gelu_torch

    x = torch.tensor([-1.7e308, -1.3e308, -1e308, -50.0, 50.0, 1.7e308, math.inf, -math.inf, math.nan],
                     dtype=torch.float64, requires_grad=True)  # fmt: skip
    out = gelu_torch(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    y = out.detach()
    assert y[:4].tolist() == [0.0] * 4 and y[4:7].tolist() == [50.0, 1.7e308, math.inf]
    assert grad[:6].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in grad[6:].tolist()) and all(math.isnan(v) for v in y[7:].tolist())
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:  # the same derivatives from JAX's autodiff of the core's formulas
        xp = array_namespace(jax.numpy.zeros(1))
        want = jax.vmap(jax.grad(lambda v: gelu(xp, v)))(jax.numpy.asarray(x.detach().numpy()))
    finally:
        jax.config.update("jax_enable_x64", previous)
    np.testing.assert_array_equal(np.asarray(want), grad.numpy())
