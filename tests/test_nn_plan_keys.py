"""What a layer's plan depends on, its initial parameters, and its repr (a mutation review of
mmfuse/nn.py: each test here failed on a mutant that every other test passed).

A layer plans a call signature once (``mmfuse.nn._layer_plan``): its configuration, its inputs'
and parameters' metadata.  A signature that left out a parameter, ``present`` or an option
reused a plan made for another call: a parameter changed to another dtype after the first
call, a malformed ``present`` after an unmasked call, another layer's ``max_elements`` or
activation, all passed unchecked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
import mmfuse._core.fusion as core_fusion  # noqa: E402
from mmfuse.nn import CPFusion, LowRankFusion, TensorFusion, WanderAdapter  # noqa: E402


def _gen():
    return torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))


def _flat(g):
    return [torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)]


def _layers_and_a_parameter():
    """(layer, inputs, a parameter's name) for each fusion layer, every parameter named in
    its signature somewhere below."""
    g = _gen()
    seq = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)]
    wander = lambda: WanderAdapter([4, 4], [3, 3], 3, 2, 2, mode="collapsed")  # noqa: E731
    return [
        (LowRankFusion([3, 2], 4, 2), _flat(g), "bias"),
        (LowRankFusion([3, 2], 4, 2), _flat(g), "weights"),
        (LowRankFusion([3, 2], 4, 2), _flat(g), "factors.1"),
        (CPFusion([3, 2], 4, 2), _flat(g), "bias"),
        (CPFusion([3, 2], 4, 2), _flat(g), "factors.2"),
        (TensorFusion([3, 2], 4), _flat(g), "bias"),
        (TensorFusion([3, 2], 4), _flat(g), "weight"),
        (wander(), seq, "down_biases.1"),
        (wander(), seq, "down_weights.0"),
        (wander(), seq, "feature_factors.1"),
        (wander(), seq, "token_factors.0"),
    ]


def test_a_parameter_changed_to_another_dtype_after_a_call_is_refused():
    """The same refusal as on a first call: the parameters are in every plan's key."""
    for layer, xs, name in _layers_and_a_parameter():
        layer(xs)  # planned with every parameter float32
        param = layer.get_parameter(name)
        param.data = param.data.double()
        # (named as the one off the others' dtype, or as the one the others are off)
        with pytest.raises(TypeError, match=rf"^{type(layer).__name__}: parameter \S+ has dtype .*float64"):
            layer(xs)


@pytest.mark.parametrize("make", [LowRankFusion, CPFusion])
def test_a_malformed_present_after_an_unmasked_call_is_refused(make):
    layer, xs = make([3, 2], 4, 2), _flat(_gen())
    layer(xs)
    with pytest.raises(ValueError, match=r"present must have shape \(B, M\) = \(5, 2\), got \(5, 3\)"):
        layer(xs, present=torch.ones(5, 3, dtype=torch.bool))
    layer(xs, present=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"present"):
        layer(xs, present=torch.ones(5, 2))


def test_tensor_fusion_layers_differing_only_in_max_elements_block_by_their_own(monkeypatch):
    seen, blocks = [], core_fusion.tensor_fusion_blocks

    def spy(xp, x, dims, out_dim, max_elements):
        seen.append(max_elements)
        return blocks(xp, x, dims, out_dim, max_elements)

    monkeypatch.setattr(core_fusion, "tensor_fusion_blocks", spy)
    xs = [torch.randn(50, 3), torch.randn(50, 2)]
    wide, narrow = TensorFusion([3, 2], 4), TensorFusion([3, 2], 4, max_elements=100)
    with torch.no_grad():
        narrow.weight.copy_(wide.weight)
    want = wide(xs)
    assert seen == [wide.max_elements]
    got = narrow(xs)
    assert seen == [wide.max_elements, 100]
    torch.testing.assert_close(got, want)


def test_wander_layers_differing_only_in_activation_or_residual_each_run_their_own():
    """A GELU layer's plan (NumPy's stacked GELU on the host) is not a ReLU layer's, nor is a
    layer's with the residual the plan of one without."""
    g = _gen()
    xs = [torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)]
    for activation in ("gelu", "relu", "gelu_tanh", "identity"):
        for residual in ("first", "none"):
            torch.manual_seed(0)
            layer = WanderAdapter([6, 6], [4, 4], 2, 2, 2, mode="collapsed", activation=activation, residual=residual)
            with torch.no_grad():
                got = layer(xs)
                want = mmfuse.wander(xs, layer.params(), mode="collapsed", activation=activation, residual=residual)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{activation}, {residual}")


def test_a_seen_signature_is_not_planned_again(monkeypatch):
    """The second call of a signature runs the plan the first one made (no checks again)."""
    import mmfuse.nn as mnn

    layer, xs = LowRankFusion([3, 2], 4, 2), _flat(_gen())
    mnn._LAYER_PLANS.clear()
    calls = []
    real = mnn._check_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mnn, "_check_inputs", counted)
    first = layer(xs)
    planned = len(calls)
    assert planned > 0
    torch.testing.assert_close(layer(xs), first, rtol=0, atol=0)
    assert len(calls) == planned


# --------------------------------------------------------------------------- initialisation


def _std(t):
    return float(t.detach().double().std())


def test_fusion_layers_initialise_at_their_documented_scales():
    """LMF factors N(0, 1 / D_m) (D_m = d_m + 1), CP input factors N(0, 1 / D_m) and output
    factor N(0, 1 / R), TensorFusion's weight N(0, 1 / prod D_m): within 5% at these sizes."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    dims, out_dim = (63, 31), 64
    low = LowRankFusion(dims, out_dim, 16)
    for f, d in zip(low.factors, dims):
        assert _std(f) * math.sqrt(d + 1) == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(low.weights, torch.full((16,), 1 / 16))
    cp = CPFusion(dims, 64, 256)  # (8192 draws or more per factor: 5% is over 6 standard errors)
    for a, d in zip(cp.factors[:-1], dims):
        assert _std(a) * math.sqrt(d + 1) == pytest.approx(1.0, rel=0.05)
    assert _std(cp.factors[-1]) * math.sqrt(256) == pytest.approx(1.0, rel=0.05)
    tf = TensorFusion((15, 15), 64)
    assert _std(tf.weight) * math.sqrt(16 * 16) == pytest.approx(1.0, rel=0.05)
    for layer in (low, cp, tf):
        assert float(layer.bias.detach().abs().max()) == 0.0


def test_wander_draws_follow_torch_seed():
    """Two adapters built one after the other differ; the same torch seed gives the same one."""
    def build():
        return WanderAdapter([6, 6], [4, 5], 3, 2, 2)

    torch.manual_seed(5)
    a, b = build(), build()
    torch.manual_seed(5)
    again = build()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_repr_says_bias_false_where_there_is_none():
    assert "bias=False" in repr(TensorFusion([3, 2], 4, bias=False))
    assert "bias=False" in repr(LowRankFusion([3, 2], 4, 2, bias=False))
    assert "bias=True" in repr(TensorFusion([3, 2], 4))
