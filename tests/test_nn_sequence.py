"""mmfuse.nn sequence layers (WanderAdapter, ZoomShift, GuidedZoomShift): equality with the
functional API and the reference, masks, state_dict, torch.compile(fullgraph=True), batch size
1, boundary errors."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
import mmfuse.reference as ref  # noqa: E402
from mmfuse.nn import GuidedZoomShift, WanderAdapter, ZoomShift  # noqa: E402
from mmfuse.testing import assert_close  # noqa: E402

LENGTHS = (5, 4, 6)
D = 6


def _xs(batch, lengths=LENGTHS, dim=D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, t, dim, generator=g, dtype=dtype) for t in lengths]


def _masks(batch, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(batch, t, generator=g) < 0.7 for t in lengths]
    for k in masks:
        k[:, :2] = True
    return masks


def _wander(mode="cp", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return WanderAdapter((D,) * 3, LENGTHS, 3, 2, 2, mode=mode, dtype=dtype, **kw)


def _np_params(layer):
    p = layer.params()
    return {
        "down": [(w.detach().numpy(), None if b is None else b.detach().numpy()) for w, b in p["down"]],
        "feature": [f.detach().numpy() for f in p["feature"]],
        "token": [t.detach().numpy() for t in p["token"]],
    }


# --------------------------------------------------------------------------- WanderAdapter


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_wander_equals_functional_and_reference(batch, mode):
    layer = _wander(mode)
    xs, masks = _xs(batch), _masks(batch)
    out = layer(xs, masks=masks)
    assert out.shape == (batch, 3, D)
    assert_close(out, mmfuse.wander(xs, layer.params(), mode=mode, masks=masks, backend="array_api"), rtol=1e-12)
    want = ref.wander([x.numpy() for x in xs], _np_params(layer), mode=mode, masks=[k.numpy() for k in masks])
    assert_close(out, want, xp=torch, dtype=torch.float64)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize(("mode", "op"), [("cp", "sequence_fusion"), ("collapsed", "wander_collapsed")])
def test_wander_layer_runs_the_custom_op(mode, op, blocked_paths):
    """cp mode: the sequence_fusion op; collapsed mode with the GELU: the fused Wander op."""
    from test_torch_backend import _OpLog

    layer = _wander(mode)
    with _OpLog() as log:
        out = layer(_xs(2))
    assert f"mmfuse.{op}.default" in log.ops
    out.sum().backward()
    with _OpLog() as log, mmfuse.config_context(backend="array_api"):
        layer(_xs(2))
    assert f"mmfuse.{op}.default" not in log.ops


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_wander_backward_with_a_column_major_mask(mode, blocked_paths):
    """A padding mask built as (T, B) and transposed is column-major: the fused collapsed op's
    backward viewed the masked token gradient (which takes the mask's strides) and raised
    "view size is not compatible with input tensor's size and stride"."""
    layer = _wander(mode)
    masks = [k.t().contiguous().t() for k in _masks(3)]  # the same values, column-major
    assert not masks[0].is_contiguous()
    grads = []
    for ks in (masks, [k.contiguous() for k in masks]):
        xs = [x.requires_grad_() for x in _xs(3)]
        layer.zero_grad(set_to_none=True)
        layer(xs, masks=ks).square().sum().backward()
        grads.append([x.grad for x in xs] + [p.grad for p in layer.parameters()])
    for got, want in zip(*grads):
        assert_close(got, want, rtol=1e-13)


def test_wander_parity_init_never_trains_and_options():
    layer = _wander(init="parity")
    xs = _xs(2)
    out = layer(xs)
    torch.testing.assert_close(out, torch.cat(xs, dim=1)[:, :3])  # the residual alone
    out.square().sum().backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in layer.parameters())
    plain = WanderAdapter((4, 3), (5, 2), 2, 1, 1, out_dim=7, n_out=4, residual="none", bias=False,
                          activation="relu", dtype=torch.float64)  # fmt: skip
    assert len(plain.down_biases) == 0
    y = plain(_xs(3, (5, 2), 4)[:1] + _xs(3, (2,), 3))
    assert y.shape == (3, 4, 7)
    want = ref.wander([x.numpy() for x in _xs(3, (5, 2), 4)[:1] + _xs(3, (2,), 3)], _np_params(plain),
                      activation="relu", residual="none")  # fmt: skip
    assert_close(y, want, xp=torch, dtype=torch.float64)


def test_wander_registered_parameters_repr_reset_state_dict():
    layer = _wander()
    for name in ("down_weights", "down_biases", "feature_factors", "token_factors"):
        assert isinstance(getattr(layer, name), torch.nn.ParameterList)
    assert len(list(layer.parameters())) == 12
    assert [tuple(t.shape) for t in layer.token_factors] == [(2, t, 3) for t in LENGTHS]
    assert "in_dims=[6, 6, 6], lengths=[5, 4, 6], rank=3, feature_rank=2, token_rank=2" in repr(layer)
    assert "mode='cp', activation='gelu', residual='first', init='trainable'" in repr(layer)
    # a callable activation reads as one, not as an option string
    assert "activation=<silu>," in repr(_wander(activation=torch.nn.functional.silu))
    assert "activation=<SiLU>," in repr(_wander(activation=torch.nn.SiLU()))
    again = _wander()
    for p, q in zip(layer.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = WanderAdapter((D,) * 3, LENGTHS, 3, 2, 2, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    xs = _xs(2)
    torch.testing.assert_close(fresh(xs), layer(xs), rtol=0, atol=0)
    with torch.no_grad():
        layer.feature_factors[0].zero_()
    layer.reset_parameters()
    assert layer.feature_factors[0].abs().sum() > 0
    f32 = WanderAdapter((D,) * 3, LENGTHS, 3, 2, 2, device="cpu", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in f32.parameters())


def test_wander_errors():
    layer = _wander()
    xs = _xs(2)
    with pytest.raises(ValueError, match=r"WanderAdapter: expected 3 modalities, got 2 input tensors"):
        layer(xs[:2])
    with pytest.raises(ValueError, match=r"WanderAdapter: xs\[1\] must have shape \(B, 4, 6\), got \(2, 5, 6\)"):
        layer([xs[0], xs[0], xs[2]])
    with pytest.raises(TypeError, match=r"WanderAdapter: xs\[0\] has dtype torch.float32 but the layer's"):
        layer([xs[0].float(), xs[1], xs[2]])
    with pytest.raises(ValueError, match=r"xs\[2\] has batch size 1 \(shape \(1, 6, 6\)\) but xs\[0\] has batch size 2"):
        layer([xs[0], xs[1], xs[2][:1]])
    with pytest.raises(ValueError, match=r"masks\[1\] must have shape \(B, T_1\) = \(2, 4\), got \(2, 5\)"):
        layer(xs, masks=[None, torch.ones(2, 5, dtype=torch.bool), None])
    with pytest.raises(TypeError, match=r"masks\[0\] must be a boolean tensor of shape \(B, T_0\), got a tensor of dtype torch.float"):
        layer(xs, masks=[torch.ones(2, 5), None, None])
    with pytest.raises(ValueError, match=r"residual='first' needs every d_m = out_dim = 4"):
        WanderAdapter((4, 3), (5, 2), 2, 1, 1)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        WanderAdapter((4, 4), (5, 2), 2, 1, 1, mode="full")
    with pytest.raises(ValueError, match=r"init must be 'trainable' or 'parity'"):
        WanderAdapter((4, 4), (5, 2), 2, 1, 1, init="zeros")


# --------------------------------------------------------------------------- ZoomShift


ZS_OPTIONS = [
    {},
    {"rounds": 3, "alpha": 0.5, "schedule": "jacobi", "fuse": "mean"},
    {"rounds": None, "alpha": 0.5, "pool": "max", "fuse": None},
    {"topology": "hub", "hub": 2, "alpha": 0.3, "rounds": 2, "fuse": "sum"},
]


@pytest.mark.parametrize("options", ZS_OPTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_zoom_shift_layer_equals_functional_and_reference(options, batch):
    layer = ZoomShift(D, 3, **options)
    xs, masks = _xs(batch), _masks(batch)
    masks[1] = None
    got = layer(xs, masks=masks)
    want = ref.zoom_shift_fusion([x.numpy() for x in xs], masks=[None if k is None else k.numpy() for k in masks],
                                 **options)  # fmt: skip
    if options.get("fuse", "concat") is None:
        for g, w in zip(got, want):
            assert_close(g, w, xp=torch, dtype=torch.float64)
    else:
        assert_close(got, want, xp=torch, dtype=torch.float64)
    assert list(layer.parameters()) == [] and layer.state_dict() == {}
    assert "channels=6, num_modalities=3" in repr(layer)


def test_zoom_shift_layer_errors():
    layer = ZoomShift(D, 3)
    xs = _xs(2)
    with pytest.raises(ValueError, match=r"ZoomShift: expected 3 modalities, got 2 input tensors"):
        layer(xs[:2])
    with pytest.raises(ValueError, match=r"ZoomShift: xs\[1\] must have shape \(B, T, 6\), got \(2, 4, 5\)"):
        layer([xs[0], torch.zeros(2, 4, 5, dtype=torch.float64), xs[2]])
    with pytest.raises(TypeError, match=r"ZoomShift: xs\[2\] has dtype torch.float32"):
        layer([xs[0], xs[1], xs[2].float()])
    with pytest.raises(ValueError, match=r"num_modalities must be at least 2"):
        ZoomShift(D, 1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        ZoomShift(D, 2, alpha=0)
    with pytest.raises(ValueError, match=r"fuse must be one of"):
        ZoomShift(D, 2, fuse="max")
    with pytest.raises(ValueError, match=r"rounds must be at most 1_000_000 .*; rounds=None gives the exact limit"):
        ZoomShift(D, 2, rounds=10**7)


# --------------------------------------------------------------------------- GuidedZoomShift


def _film_reference(layer, xs, masks):
    """y_m = mu_m + (x_m - mu_m) exp(a_m) + b_m with [a; b] = W p + c, p the guide's masked
    mean; pooled as the layer pools."""
    w, c = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    xs = [x.detach().numpy() for x in xs]
    masks = [np.ones(x.shape[:2], bool) if k is None else k.numpy() for x, k in zip(xs, masks)]
    g = layer.guide
    ch = layer.channels
    pooled = []
    k = 0
    for m, (x, mk) in enumerate(zip(xs, masks)):
        y = x.copy()
        if m != g:
            for b in range(x.shape[0]):
                p = xs[g][b][masks[g][b]].mean(axis=0)
                head = w[k] @ p + c[k]
                mu = x[b][mk[b]].mean(axis=0)
                y[b] = mu + (x[b] - mu) * np.exp(head[:ch]) + head[ch:]
            k += 1
        pool = np.max if layer.pool == "max" else np.mean
        pooled.append(np.stack([pool(y[b][mk[b]], axis=0) for b in range(x.shape[0])]))
    return np.concatenate(pooled, axis=-1)


@pytest.mark.parametrize("batch", [1, 3])
def test_guided_zoom_shift_maths_identity_init_and_training(batch):
    torch.manual_seed(0)
    layer = GuidedZoomShift(D, 3, guide=1, dtype=torch.float64)
    xs, masks = _xs(batch), _masks(batch)
    masks[0] = None
    base = ZoomShift(D, 3, rounds=0)(xs, masks=masks)  # rounds=0: pooling and fusion only
    out = layer(xs, masks=masks)
    torch.testing.assert_close(out, base)  # identity at initialisation
    out.square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.bias.normal_(0, 0.3)
    assert_close(layer(xs, masks=masks), _film_reference(layer, xs, masks), xp=torch, dtype=torch.float64)
    seqs = layer.modulate(xs, masks)
    assert seqs[1] is xs[1] and seqs[0].shape == xs[0].shape
    assert tuple(layer.weight.shape) == (2, 2 * D, D)
    assert "channels=6, num_modalities=3, guide=1, fuse='concat', pool='max'" in repr(layer)
    mean_pooled = GuidedZoomShift(D, 3, guide=1, pool="mean", dtype=torch.float64)
    mean_pooled.load_state_dict(layer.state_dict())
    assert_close(mean_pooled(xs, masks=masks), _film_reference(mean_pooled, xs, masks), xp=torch, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = GuidedZoomShift(D, 3, guide=1, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(xs), layer(xs), rtol=0, atol=0)
    layer.reset_parameters()
    assert float(layer.weight.detach().abs().max()) == 0.0


def test_guided_zoom_shift_errors():
    layer = GuidedZoomShift(D, 2)
    xs = _xs(2, (3, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"GuidedZoomShift: expected 2 modalities, got 1 input tensors"):
        layer(xs[:1])
    with pytest.raises(ValueError, match=r"GuidedZoomShift: xs\[0\] must have shape \(B, T, 6\), got \(2, 6\)"):
        layer([xs[0][:, 0], xs[1]])
    with pytest.raises(TypeError, match=r"GuidedZoomShift: xs\[1\] has dtype torch.float64"):
        layer([xs[0], xs[1].double()])
    with pytest.raises(ValueError, match=r"guide=2 is out of range for 2 modalities"):
        GuidedZoomShift(D, 2, guide=2)


def test_guided_zoom_shift_checks_devices_and_replaced_parameters():
    """One device for inputs, masks and parameters (einsum took a CPU tensor beside a meta one
    and returned uninitialised memory), and parameters a user replaced checked like inputs."""
    layer = GuidedZoomShift(D, 2, fuse=None)
    xs = _xs(2, (3, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^GuidedZoomShift: xs\[1\] is on device cpu but xs\[0\] is on meta"):
        layer([xs[0].to("meta"), xs[1]])
    with pytest.raises(ValueError, match=r"^GuidedZoomShift: xs\[1\] is on device meta but xs\[0\] is on cpu"):
        layer([xs[0], xs[1].to("meta")])
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"^GuidedZoomShift: masks\[0\] is on device meta"):
        layer(xs, masks=[mask, None])
    layer.bias = torch.nn.Parameter(torch.zeros(1, 2 * D, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^GuidedZoomShift: parameter bias has dtype torch.float64 but weight has torch.float32; give the layer one dtype"):
        layer(xs)
    layer.bias = torch.nn.Parameter(torch.zeros(2, 2 * D))
    with pytest.raises(ValueError, match=r"^GuidedZoomShift: bias must have shape \(M - 1, 2 C\) = \(1, 12\), got \(2, 12\)"):
        layer(xs)
    # a replaced weight of another dtype is named, not the inputs blamed for differing from it
    # (whose remedy then met the parameters' mixed dtypes), and a bias set to None is named
    # (an AttributeError on None.shape before; both a review's finds)
    layer = GuidedZoomShift(D, 2, fuse=None)
    with pytest.raises(TypeError, match=r"^GuidedZoomShift: parameter bias has dtype torch.float32 but weight has torch.float64"):
        torch.func.functional_call(layer, {"weight": layer.weight.double()}, (xs,))
    layer.bias = None
    with pytest.raises(TypeError, match=r"^GuidedZoomShift: bias must be a tensor of shape \(M - 1, 2 C\) = \(1, 12\), got NoneType"):
        layer(xs)
    layer = GuidedZoomShift(D, 2, fuse=None)
    layer.weight = None  # under autocast too (it read weight.dtype first: an AttributeError)
    for region in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with region, pytest.raises(TypeError, match=r"^GuidedZoomShift: weight must be a tensor of shape"):
            layer(xs)
        with region, pytest.raises(TypeError, match=r"^GuidedZoomShift: weight must be a tensor of shape"):
            layer.modulate(xs)


def test_zoomshift_dtype_messages_give_a_remedy_that_works():
    """Built without a dtype, ZoomShift has none for layer.to to change: mixed inputs are told
    to share one; built with one, layer.to(dtype) is the remedy, and it works."""
    xs = _xs(2, (3, 4), dtype=torch.float32)
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.float64 but xs\[0\] has dtype torch.float32; cast the inputs to one dtype$"):
        ZoomShift(D, 2)([xs[0], xs[1].double()])
    layer = ZoomShift(D, 2, dtype=torch.float32)
    doubles = [x.double() for x in xs]
    with pytest.raises(TypeError, match=r"the layer's dtype is torch.float32; cast the input or the layer \(layer.to\(dtype\)\)$"):
        layer(doubles)
    assert layer.to(torch.float64)(doubles).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_guided_zoom_shift_keeps_low_precision_dtypes(dtype):
    """float16 / bfloat16 in, the same dtype out (every modality, not only the guide): the
    statistics run in float32 and each modulated sequence is rounded once."""
    torch.manual_seed(1)
    layer = GuidedZoomShift(D, 3, guide=1, fuse=None, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.bias.normal_(0, 0.3)
    xs = _xs(2, dtype=torch.float64)
    low = [x.to(dtype) for x in xs]
    layer.to(dtype)
    with torch.no_grad():
        got = layer.modulate(low)
        assert [y.dtype for y in got] == [dtype] * 3
        assert all(isinstance(y, torch.Tensor) and y.dtype == dtype for y in layer(low))
        # the parameters were rounded too: float64 maths on the rounded parameters and inputs
        ref = GuidedZoomShift(D, 3, guide=1, fuse=None, dtype=torch.float64)
        ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        want = ref.modulate([x.double() for x in low])
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * float(b.abs().max()))
    # exactly float32 maths on the rounded parameters and inputs, rounded once: the guide's
    # summary and the heads too, whose rounding exp(log_zoom) amplified (10-45x the error)
    f32 = GuidedZoomShift(D, 3, guide=1, fuse=None, dtype=torch.float32)
    f32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        once = f32.modulate([x.float() for x in low])
    for a, b in zip(got, once):
        assert torch.equal(a, b.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fuse", ["mean", "sum", None])
def test_zoom_shift_fusion_16_bit_is_float32_maths_rounded_once(dtype, fuse):
    """float16 / bfloat16 Zoom-and-Shift fusion: aligned, pooled and fused in float32, rounded
    once, bit for bit (zoom_shift_fusion, the ZoomShift layer eager and compiled, and
    GuidedZoomShift's forward).  Pooling the aligned sequences rounded to 16 bits had cost up
    to hundreds of ulps of a small pooled mean (and sums of pooled features one more rounding)."""
    torch.manual_seed(2)
    low = [x.to(dtype) for x in _xs(7, dtype=torch.float32)]
    masks = _masks(7)
    wide = [x.float() for x in low]

    def rounded(out):  # (fuse=None: the functional API's list, the layers' tuple)
        return [o.to(dtype) for o in out] if isinstance(out, (list, tuple)) else out.to(dtype)

    def same(got, want):
        several = isinstance(got, (list, tuple))
        assert several == isinstance(want, (list, tuple))
        for a, b in zip(got if several else [got], want if several else [want], strict=True):
            assert a.dtype == dtype and torch.equal(a, b)

    # every call on the torch backend, which the compiled layer runs: under "auto" the eager
    # calls take numba's kernels once numba is imported (by an earlier test), equal to the
    # torch op's to rounding, not bit for bit
    with mmfuse.config_context(backend="torch"):
        _fusion_16_bit_cases(dtype, fuse, low, masks, wide, rounded, same)


def _fusion_16_bit_cases(dtype, fuse, low, masks, wide, rounded, same):
    for pool in ("mean", "max"):
        options = {"fuse": fuse, "pool": pool, "rounds": None, "alpha": 0.5}
        want = rounded(mmfuse.zoom_shift_fusion(wide, masks=masks, **options))
        same(mmfuse.zoom_shift_fusion(low, masks=masks, **options), want)
        layer = ZoomShift(D, 3, **options)
        same(layer(low, masks=masks), want)
        torch._dynamo.reset()  # (a new layer per case: Dynamo's recompile limit is per code object)
        compiled = torch.compile(ZoomShift(D, 3, dtype=dtype, **options), fullgraph=True, backend="aot_eager")
        same(compiled(low, masks=masks), want)
        guided = GuidedZoomShift(D, 3, guide=1, fuse=fuse, pool=pool, dtype=dtype)
        with torch.no_grad():
            guided.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
            guided.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        f32 = GuidedZoomShift(D, 3, guide=1, fuse=fuse, pool=pool, dtype=torch.float32)
        f32.load_state_dict({k: v.float() for k, v in guided.state_dict().items()})
        with torch.no_grad():
            same(guided(low, masks=masks), rounded(f32(wide, masks=masks)))


# --------------------------------------------------------------------------- torch.compile


def _compile_layers():
    torch.manual_seed(0)
    return {
        "wander-cp": (WanderAdapter((D,) * 3, LENGTHS, 3, 2, 2), True),
        "wander-collapsed": (WanderAdapter((D,) * 3, LENGTHS, 3, 2, 2, mode="collapsed"), True),
        "zoomshift": (ZoomShift(D, 3, rounds=2, alpha=0.5), True),
        "zoomshift-limit": (ZoomShift(D, 3, rounds=None, alpha=0.5, fuse="mean"), False),
        "guided": (GuidedZoomShift(D, 3, guide=2), True),
    }


@pytest.mark.parametrize("name", list(_compile_layers()))
def test_compile_fullgraph(name):
    layer, with_masks = _compile_layers()[name]
    if isinstance(layer, GuidedZoomShift):
        with torch.no_grad():
            layer.weight.normal_(0, 0.1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xs = [x.requires_grad_() for x in _xs(3, dtype=torch.float32)]
    masks = _masks(3) if with_masks else None
    want = layer(xs, masks=masks)
    got = compiled(xs, masks=masks)
    torch.testing.assert_close(got, want)
    leaves = [*xs, *layer.parameters()]
    gw = torch.autograd.grad(want.square().sum(), leaves)
    gg = torch.autograd.grad(got.square().sum(), leaves)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_zoom_shift_repr_shows_its_dtype():
    """A ZoomShift built with a dtype checks inputs against it, but it has no parameter that
    would show it: its repr said nothing of it."""
    assert "dtype" not in repr(ZoomShift(3, 2))
    assert repr(ZoomShift(3, 2, dtype=torch.float64)).endswith("eps=1e-05, dtype=torch.float64)")


def test_zoom_shift_layers_default_pooling_trains_every_input_and_parameter():
    """Mean pooling after alignment gave modality 0 of ZoomShift (defaults, M = 2) a zero
    gradient, and GuidedZoomShift's log-zoom head (its first C rows) an exactly zero one (the
    token mean of mu + (x - mu) e^a + b is mu + b).  Under the default max pooling both get
    gradients; under pool="mean" they still do not (the documented reason for the default)."""
    xs = [x.requires_grad_(True) for x in _xs(3, lengths=(7, 5))]
    (g0,) = torch.autograd.grad(ZoomShift(D, 2)(xs).sum(), xs[:1])
    assert float(g0.abs().max()) > 1e-3
    (g0,) = torch.autograd.grad(ZoomShift(D, 2, pool="mean")(xs).sum(), xs[:1])
    assert float(g0.abs().max()) < 1e-12
    for pool, trains in (("max", True), ("mean", False)):
        layer = GuidedZoomShift(D, 2, pool=pool, dtype=torch.float64)
        with torch.no_grad():  # away from the zero init, where every head's gradient is generic
            layer.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
        out = layer(xs)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (gw,) = torch.autograd.grad((out * upstream).sum(), [layer.weight])
        zoom_rows = float(gw[:, :D].abs().max())
        assert (zoom_rows > 1e-3) if trains else (zoom_rows < 1e-12), (pool, zoom_rows)
        assert float(gw[:, D:].abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("attr", "m", "shape", "named"),
    [
        ("token_factors", 1, (2, 6, 3), r"WanderAdapter: token_factors\[1\] has shape \(2, 6, 3\)"),
        ("down_biases", 0, (5,), r"WanderAdapter: down_biases\[0\] must have shape .* to match down_weights\[0\]"),
        ("feature_factors", 0, (2, 4, 3), r"WanderAdapter: feature_factors\[0\] has shape .* width of down_weights\[0\]"),
    ],
)
def test_wander_adapter_errors_name_the_layers_parameters(attr, m, shape, named):
    """A parameter of the wrong shape is named as the layer names it (``token_factors[1]``),
    not as the functional ``wander`` does (``params['token'][1]``: a layer user has no
    ``params``; a review's find)."""
    layer = WanderAdapter([6, 6], [4, 5], 3, 2, 2)
    getattr(layer, attr)[m].data = torch.randn(*shape)
    with pytest.raises(ValueError, match=named) as info:
        layer([torch.randn(7, 4, 6), torch.randn(7, 5, 6)])
    assert "params[" not in str(info.value)


def test_guided_zoom_shift_gradients_do_not_depend_on_a_modalitys_mean(rng):
    """A modality of 1e6 + N(0, 1): the log-zoom gradient sum G (x - mu) e^a was taken from x -
    mu with mu rounded to one float64, an ulp of 1e6 on unit deviations (3e5 ulps of the
    gradient against exact arithmetic).  Now x - mu is (x - pivot) - corr, as in the core, so
    the gradients equal those of the same data translated to mean 0 (exactly representable:
    the translation is exact), as the maths says (a review against exact arithmetic)."""
    x0 = torch.tensor(rng.standard_normal((3, 4, 2)))
    far = torch.tensor(1e6 + rng.standard_normal((3, 5, 2)))
    near = far - 1e6  # exact (Sterbenz): the same deviations
    w = torch.tensor(rng.standard_normal((3, 4)))
    layer = GuidedZoomShift(2, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(0.7 * torch.tensor(rng.standard_normal((1, 4, 2))))
        layer.bias.copy_(0.7 * torch.tensor(rng.standard_normal((1, 4))))
    grads = []
    for x1 in (far, near):
        layer.zero_grad()
        (layer([x0, x1]) * w).sum().backward()
        grads.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    for a, b in zip(*grads):
        assert torch.all((a - b).abs() <= 64 * torch.finfo(torch.float64).eps * b.abs().max())


def test_a_callable_activation_is_not_kept_alive_by_the_plans():
    """A plan's key holds one marker for any callable activation, and the callable reaches the
    plan per call: the key and the plan held the callable itself, so a deleted one (and all it
    references: a layer's activation module, a closure's arrays) stayed alive in the plan
    cache, and a fresh lambda per call planned every call (a review of the plan state)."""
    import gc
    import weakref

    from mmfuse import _sequence

    rng = np.random.default_rng()
    params = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=rng)
    xs = [rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 5, 8))]

    class Scaled:
        def __init__(self, k):
            self.k = k

        def __call__(self, h):
            return np.tanh(self.k * h)

    _sequence._WANDER_PLANS.clear()
    outs, refs = [], []
    for k in (0.5, 2.0):
        act = Scaled(k)
        refs.append(weakref.ref(act))
        outs.append(mmfuse.wander(xs, params, activation=act))
        want = ref.wander(xs, params, activation=lambda h, k=k: np.tanh(k * h))
        assert_close(outs[-1], want)  # each call runs its own callable, though one plan serves both
        del act
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert len(_sequence._WANDER_PLANS) == 1
    assert not np.allclose(outs[0], outs[1])

    module = torch.nn.Tanh()
    layer = WanderAdapter([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, activation=module)
    alive = weakref.ref(module)
    y = layer([torch.randn(2, 6, 8), torch.randn(2, 5, 8)])
    assert y.shape == (2, 4, 8)
    del layer, module, y
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("batch", [2, 200])  # the core's path, and the custom ops'
def test_a_callable_activation_with_parameters_is_called_in_their_dtype(batch):
    """16-bit inputs are computed in float32; a callable activation holding floating
    parameters of one dtype (an ``nn.PReLU``) is called on the pre-activations in that dtype,
    its result widened back, and any other callable in float32.  A PReLU of a bfloat16 layer,
    or of a float32 layer under autocast (which casts its weight with the layer's), had failed
    on float32 pre-activations ("prelu: Type promoting not supported"; a review's find), and
    a float32 PReLU given to a bfloat16 layer must keep working, as must a function computing
    in float32 (a review of that fix)."""
    seen = []

    class Recording(torch.nn.PReLU):
        def forward(self, h):
            seen.append(h.dtype)
            return super().forward(h)

    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    xs = [torch.randn(batch, 4, 6, generator=gen), torch.randn(batch, 3, 6, generator=gen)]
    sizes = {"rank": 3, "feature_rank": 2, "token_rank": 2}
    layer = WanderAdapter([6, 6], [4, 3], **sizes, activation=Recording(init=0.3))
    want = layer(xs).detach()
    scale = float(want.abs().max())
    assert set(seen) == {torch.float32}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(xs)
    assert got.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * scale)
    got.float().sum().backward()
    assert layer.activation.weight.grad is not None and layer.activation.weight.grad.dtype == torch.float32

    state = {k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()}
    xs16 = [x.to(torch.bfloat16) for x in xs]
    for act, called_in in (
        (Recording(init=0.3, dtype=torch.bfloat16), torch.bfloat16),  # a bfloat16 module
        (Recording(init=0.3), torch.float32),  # a float32 module in a bfloat16 layer
    ):
        half = WanderAdapter([6, 6], [4, 3], **sizes, activation=act, dtype=torch.bfloat16)
        half.load_state_dict({k: v if k.startswith("activation") else state[k] for k, v in half.state_dict().items()}
                             | {"activation.weight": act.weight.detach()})  # fmt: skip
        seen.clear()
        out = half(xs16)
        assert out.dtype == torch.bfloat16 and set(seen) == {called_in}
        torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05 * scale)

    # a function computing in float32 gets float32 pre-activations (NumPy float16 too)
    half = WanderAdapter([6, 6], [4, 3], **sizes, activation=lambda h: torch.tanh(h.float()), dtype=torch.bfloat16)
    assert half(xs16).dtype == torch.bfloat16
    rng = np.random.default_rng()
    params = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=rng)
    nxs = [rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 5, 8))]
    dtypes = []
    y = mmfuse.wander(
        [x.astype(np.float16) for x in nxs],
        {k: [tuple(a.astype(np.float16) for a in p) if isinstance(p, tuple) else p.astype(np.float16) for p in v]
         for k, v in params.items()},
        activation=lambda h: dtypes.append(h.dtype) or np.tanh(h),
    )  # fmt: skip
    assert y.dtype == np.float16 and set(dtypes) == {np.dtype(np.float32)}
    assert_close(y, ref.wander(nxs, params, activation=np.tanh), dtype=np.float16, rtol=0.02, atol=0.02)


def test_an_activation_module_off_the_layers_dtype_or_device_is_refused_naming_it():
    """An ``nn.Module`` activation is a submodule that the layer does not move: built with
    ``dtype=float64`` or on ``meta`` around a float32 CPU PReLU, the layer had failed in its
    first forward inside ``prelu`` with torch's dtype or device error (a review's find).  Now
    the constructor names the activation; a module in the layer's dtype and device works, as
    does one of any dtype in a 16-bit layer (called in its own dtype), and the layer's
    ``.to()`` still moves it with the rest."""
    sizes = {"rank": 3, "feature_rank": 2, "token_rank": 2}
    for act, options in (
        (torch.nn.PReLU(), {"dtype": torch.float64}),
        (torch.nn.PReLU(), {"device": "meta"}),
        (torch.nn.PReLU(dtype=torch.bfloat16), {}),
    ):
        with pytest.raises(TypeError, match=r"^activation holds weight in torch\.\w+ on cpu, where the layer's parameters are"):
            WanderAdapter([6, 6], [4, 3], **sizes, activation=act, **options)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    xs = [torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)]
    layer = WanderAdapter([6, 6], [4, 3], **sizes, activation=torch.nn.PReLU(dtype=torch.float64), dtype=torch.float64)
    assert layer(xs).dtype == torch.float64
    meta = WanderAdapter([6, 6], [4, 3], **sizes, activation=torch.nn.PReLU(device="meta"), device="meta")
    assert meta([x.to("meta", torch.float32) for x in xs]).device.type == "meta"
    half = WanderAdapter([6, 6], [4, 3], **sizes, activation=torch.nn.PReLU(), dtype=torch.bfloat16)
    assert half([x.to(torch.bfloat16) for x in xs]).dtype == torch.bfloat16
    moved = WanderAdapter([6, 6], [4, 3], **sizes, activation=torch.nn.PReLU()).double()
    assert moved.activation.weight.dtype == torch.float64 and moved(xs).dtype == torch.float64


@pytest.mark.parametrize("name", ["ZoomShift", "GuidedZoomShift"])
@pytest.mark.parametrize("compiled", [False, True])
def test_per_modality_outputs_are_a_tuple_and_fire_backward_hooks(name, compiled, rng):
    """fuse=None returns the M pooled features as a tuple, torch's convention for a module's
    several outputs: a full backward hook never fired on the list it had returned (torch only
    warned; a review's find).  The values are the functional API's."""
    layer = (ZoomShift if name == "ZoomShift" else GuidedZoomShift)(4, 3, fuse=None, dtype=torch.float64)
    xs = [torch.tensor(rng.standard_normal((2, t, 4)), requires_grad=True) for t in (5, 3, 6)]
    calls = []
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(len(grad_out)))
    if compiled:
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dynamo's notes on the layer's graph breaks
            ys = torch.compile(layer, backend="eager")(xs)
    else:
        ys = layer(xs)
    assert type(ys) is tuple and len(ys) == 3
    if name == "ZoomShift":
        want = mmfuse.zoom_shift_fusion([x.detach() for x in xs], fuse=None)
        for y, w in zip(ys, want):
            assert_close(y.detach(), w)
    with warnings.catch_warnings():
        # the layers take their inputs as one list, which torch's hooks do not look into:
        # their grad_input is empty and torch says so
        warnings.filterwarnings("ignore", "Full backward hook is firing when gradients are computed")
        sum((y * y).sum() for y in ys).backward()
    assert calls == [3]
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
