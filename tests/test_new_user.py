"""What a new user hit (issue 20): layers and masks on torch's ``meta`` device, the reference
backend's refusal there, size checks before allocation, tensor_fusion's batch blocking, hints
in errors and the layers' ``forward`` documentation."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
from mmfuse import nn as mnn  # noqa: E402
from mmfuse.backends import BackendUnsupported  # noqa: E402

META = "meta"
DIMS = (3, 4)
SEQ_DIMS = (4, 4)
LENGTHS = (3, 5)
BATCH = 2


# --------------------------------------------------------------------------- layers on meta

# name -> (constructor taking device/dtype keywords, input shapes, expected output shape)
LAYERS = {
    "TensorFusion": (lambda **fk: mnn.TensorFusion(DIMS, 5, **fk), [(BATCH, d) for d in DIMS], (BATCH, 5)),
    "LowRankFusion": (lambda **fk: mnn.LowRankFusion(DIMS, 5, 2, **fk), [(BATCH, d) for d in DIMS], (BATCH, 5)),
    "CPFusion": (lambda **fk: mnn.CPFusion(DIMS, 5, 2, **fk), [(BATCH, d) for d in DIMS], (BATCH, 5)),
    "WanderAdapter": (
        lambda **fk: mnn.WanderAdapter(SEQ_DIMS, LENGTHS, 2, 2, 3, **fk),
        [(BATCH, t, d) for t, d in zip(LENGTHS, SEQ_DIMS)],
        (BATCH, 2, 4),
    ),
    "ZoomShift": (
        lambda **fk: mnn.ZoomShift(4, 2, **fk),
        [(BATCH, t, 4) for t in LENGTHS],
        (BATCH, 8),
    ),
    "GuidedZoomShift": (
        lambda **fk: mnn.GuidedZoomShift(4, 2, **fk),
        [(BATCH, t, 4) for t in LENGTHS],
        (BATCH, 8),
    ),
}


def _inputs(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return [x.to(device) for x in xs]


def _masks(shapes, device):
    """Padding masks for sequence layers (the last token of every sample padded)."""
    masks = []
    for s in shapes:
        k = torch.ones(s[:2], dtype=torch.bool)
        k[:, -1] = False
        masks.append(k.to(device))
    return masks


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_built_on_meta_runs_and_materialises_like_cpu(name):
    build, shapes, out_shape = LAYERS[name]
    torch.manual_seed(7)
    layer = build(device=META, dtype=torch.float64)
    assert all(p.device.type == META for p in layer.parameters())
    y = layer(_inputs(shapes, META))
    assert y.device.type == META
    assert tuple(y.shape) == out_shape

    # materialise: storage on the CPU, then the layer's own initialisation from a seed
    layer.to_empty(device="cpu")
    torch.manual_seed(11)
    layer.reset_parameters()
    torch.manual_seed(11)
    cpu = build(dtype=torch.float64)
    mine, theirs = layer.state_dict(), cpu.state_dict()
    assert list(mine) == list(theirs)
    for key in mine:
        assert mine[key].device.type == "cpu"
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
    xs = _inputs(shapes, "cpu")
    torch.testing.assert_close(layer(xs), cpu(xs), rtol=0, atol=0)


@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_moved_to_meta_runs(name, no_grad):
    build, shapes, out_shape = LAYERS[name]
    layer = build(dtype=torch.float64).to(META)
    with torch.set_grad_enabled(not no_grad):
        y = layer(_inputs(shapes, META))
    assert y.device.type == META and tuple(y.shape) == out_shape


@pytest.mark.parametrize("name", ["LowRankFusion", "CPFusion"])
def test_fusion_layer_on_meta_takes_present(name):
    build, shapes, out_shape = LAYERS[name]
    present = torch.ones(BATCH, len(DIMS), dtype=torch.bool, device=META)
    y = build(device=META, dtype=torch.float64)(_inputs(shapes, META), present)
    assert tuple(y.shape) == out_shape and y.device.type == META


@pytest.mark.parametrize("name", ["WanderAdapter", "ZoomShift", "GuidedZoomShift"])
def test_sequence_layer_on_meta_takes_masks(name):
    build, shapes, out_shape = LAYERS[name]
    layer = build(device=META, dtype=torch.float64)
    y = layer(_inputs(shapes, META), _masks(shapes, META))
    assert tuple(y.shape) == out_shape and y.device.type == META


# --------------------------------------------------------------------------- masks on meta


def _seq(shape):
    return torch.empty(shape, dtype=torch.float32, device=META)


def test_zoom_shift_takes_a_meta_mask():
    x, guide = _seq((2, 3, 4)), _seq((2, 5, 4))
    mask = torch.ones(2, 3, dtype=torch.bool, device=META)
    y = mmfuse.zoom_shift(x, guide, mask=mask, guide_mask=torch.ones(2, 5, dtype=torch.bool, device=META))
    assert y.device.type == META and tuple(y.shape) == (2, 3, 4)


def test_align_moments_and_fusion_take_meta_masks():
    xs = [_seq((2, 3, 4)), _seq((2, 5, 4))]
    masks = [torch.ones(2, 3, dtype=torch.bool, device=META), None]
    ys = mmfuse.align(xs, masks=masks)
    assert [tuple(y.shape) for y in ys] == [(2, 3, 4), (2, 5, 4)]
    assert all(y.device.type == META for y in ys)
    mean, var = mmfuse.moments(xs[0], mask=masks[0])
    assert tuple(mean.shape) == tuple(var.shape) == (2, 1, 4) and mean.device.type == META
    assert tuple(mmfuse.zoom_shift_fusion(xs, masks=masks).shape) == (2, 8)


def test_fully_masked_sample_still_refused_on_cpu():
    """The meta exemption does not weaken the check where values exist."""
    x, guide = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="masks every token"):
        mmfuse.zoom_shift(x, guide, mask=mask)


# --------------------------------------------------------------------------- reference on meta


def _meta_calls():
    xs = [torch.empty(2, d, device=META) for d in DIMS]
    params = mmfuse.init_lowrank(DIMS, rank=2, out_dim=5, xp=torch, device=META)
    seqs = [_seq((2, 3, 4)), _seq((2, 5, 4))]
    weight = torch.empty(4, 5, 5, device=META)
    return {
        "tensor_fusion": lambda b: mmfuse.tensor_fusion(xs, weight, backend=b),
        "lowrank_fusion": lambda b: mmfuse.lowrank_fusion(xs, **params, backend=b),
        "zoom_shift": lambda b: mmfuse.zoom_shift(seqs[0], seqs[1], backend=b),
        "align": lambda b: mmfuse.align(seqs, backend=b),
        "moments": lambda b: mmfuse.moments(seqs[0], backend=b),
    }


@pytest.mark.parametrize("op", ["tensor_fusion", "lowrank_fusion", "zoom_shift", "align", "moments"])
def test_reference_backend_refuses_meta_tensors(op):
    call = _meta_calls()[op]
    with pytest.raises(BackendUnsupported, match=r"backend 'reference' cannot take .*'meta'.*meta device"):
        call("reference")
    assert call(None) is not None  # "auto" runs on meta


def test_reference_backend_still_runs_on_cpu_tensors():
    xs = [torch.randn(2, d, dtype=torch.float64) for d in DIMS]
    params = mmfuse.init_lowrank(DIMS, rank=2, out_dim=5, xp=torch, dtype=torch.float64, seed=0)
    torch.testing.assert_close(
        mmfuse.lowrank_fusion(xs, **params, backend="reference"), mmfuse.lowrank_fusion(xs, **params)
    )


def _grad_calls(rng):
    xs = [torch.randn(2, d, dtype=torch.float64, requires_grad=True) for d in DIMS]
    params = mmfuse.init_lowrank(DIMS, rank=2, out_dim=5, xp=torch, dtype=torch.float64, seed=rng)
    seqs = [torch.randn(2, t, 4, dtype=torch.float64, requires_grad=True) for t in (3, 5)]
    return {
        "lowrank_fusion": lambda b: mmfuse.lowrank_fusion(xs, **params, backend=b),
        "zoom_shift": lambda b: mmfuse.zoom_shift(seqs[0], seqs[1].detach(), backend=b),
        "align": lambda b: mmfuse.align(seqs, backend=b)[0],
        "moments": lambda b: mmfuse.moments(seqs[0], backend=b)[1],
    }


@pytest.mark.parametrize("op", ["lowrank_fusion", "zoom_shift", "align", "moments"])
def test_reference_backend_refuses_inputs_that_need_gradients(op, rng):
    """The reference computes in NumPy and returns no gradient: forced on tensors that require
    grad it refuses (its result would train nothing through it, silently); under no_grad it
    runs, and a preference for it leaves such a call to "auto", which keeps the gradient."""
    call = _grad_calls(rng)[op]
    with pytest.raises(BackendUnsupported, match=r"backend 'reference' cannot take .*require no gradient"):
        call("reference")
    with torch.no_grad():
        want = call("reference")
    with mmfuse.config_context(prefer="reference"):
        got = call(None)
    assert got.requires_grad and got.grad_fn is not None
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # forward AD's first use
def test_reference_backend_refuses_forward_mode_tangents(rng):
    """Forward-mode AD: the reference dropped the tangent silently (``unpack_dual(y).tangent``
    was None) and failed under ``torch.func`` transforms with "Cannot access data pointer";
    it refuses both by name, and "auto" keeps the tangent."""
    import torch.autograd.forward_ad as fwad

    x = torch.randn(2, 4, 3, dtype=torch.float64)
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.randn_like(x))
        with pytest.raises(BackendUnsupported, match=r"backend 'reference' cannot take .*forward-mode AD"):
            mmfuse.zoom_shift(dual, g, backend="reference")
        assert fwad.unpack_dual(mmfuse.zoom_shift(dual, g)).tangent is not None
    with pytest.raises(BackendUnsupported, match=r"cannot run on traced arrays \(inside a torch.func transform"):
        torch.func.vmap(lambda a: mmfuse.zoom_shift(a, g, backend="reference"))(x[None])


# --------------------------------------------------------------------------- sizes before allocation

HUGE = 10**7  # every array built from it is far beyond any machine's memory


def test_init_lowrank_checks_the_size_before_allocating():
    with pytest.raises(
        ValueError,
        match=r"^init_lowrank: factors\[0\] of shape \(R, d_0 \+ 1, h\) = \(10000000, 10000001, 10000000\) "
        r"would have \d+ elements, over max_elements=134217728; its size comes from rank=10000000, "
        r"dims\[0\]=10000000, out_dim=10000000",
    ):
        mmfuse.init_lowrank([HUGE, 3], rank=HUGE, out_dim=HUGE, seed=0)
    # the limit is the caller's: a small one refuses a small problem, naming the big modality
    with pytest.raises(ValueError, match=r"factors\[1\] .* = \(2, 6, 3\) would have 36 elements, over max_elements=35"):
        mmfuse.init_lowrank([2, 5], rank=2, out_dim=3, max_elements=35)
    p = mmfuse.init_lowrank([2, 5], rank=2, out_dim=3, max_elements=36, seed=0)
    assert [f.shape for f in p["factors"]] == [(2, 3, 3), (2, 6, 3)]
    with pytest.raises(ValueError, match=r"^max_elements must be a positive integer"):
        mmfuse.init_lowrank([2, 5], rank=2, out_dim=3, max_elements=0)


def test_init_wander_checks_the_size_before_allocating():
    with pytest.raises(
        ValueError,
        match=r"^init_wander: down\[0\] weight of shape \(d_0, r\) = \(10000000, 10000000\) would have "
        r"\d+ elements, over max_elements=134217728; its size comes from dims\[0\]=10000000, rank=10000000",
    ):
        mmfuse.init_wander([HUGE], [4], rank=HUGE, feature_rank=1, token_rank=1, out_dim=4, n_out=2)
    with pytest.raises(ValueError, match=r"token\[0\] .* = \(1, 10000000, 10000000\) .* lengths\[0\]=10000000, n_out=10000000"):
        mmfuse.init_wander([4], [HUGE], rank=2, feature_rank=1, token_rank=1, out_dim=4, n_out=HUGE)
    p = mmfuse.init_wander([4], [3], rank=2, feature_rank=1, token_rank=2, out_dim=4, max_elements=12, seed=0)
    assert p["token"][0].shape == (2, 3, 2)
    with pytest.raises(ValueError, match=r"token\[0\] .* would have 12 elements, over max_elements=11"):
        mmfuse.init_wander([4], [3], rank=2, feature_rank=1, token_rank=2, out_dim=4, max_elements=11)


LAYER_SIZE_ERRORS = {
    "LowRankFusion": (
        lambda **kw: mnn.LowRankFusion([HUGE, 3], 4, HUGE, **kw),
        r"^LowRankFusion: factors\[0\] .* rank=10000000, in_dims\[0\]=10000000, out_dim=4",
    ),
    "CPFusion": (
        lambda **kw: mnn.CPFusion([3, HUGE], 4, HUGE, **kw),
        r"^CPFusion: factors\[1\] of shape \(d_1 \+ 1, R\) = \(10000001, 10000000\) .* in_dims\[1\]=10000000, rank=10000000",
    ),
    "TensorFusion": (
        lambda **kw: mnn.TensorFusion([HUGE, HUGE], 4, **kw),
        r"^TensorFusion: weight of shape \(10000001, 10000001, 4\)",
    ),
    "WanderAdapter": (
        lambda **kw: mnn.WanderAdapter([HUGE, HUGE], [3, 5], HUGE, 1, 1, residual="none", **kw),
        r"^WanderAdapter: down_weights\[0\] of shape \(d_0, r\) = \(10000000, 10000000\) .* "
        r"in_dims\[0\]=10000000, rank=10000000",
    ),
    "GuidedZoomShift": (
        lambda **kw: mnn.GuidedZoomShift(HUGE, 2, **kw),
        r"^GuidedZoomShift: weight of shape \(M - 1, 2 C, C\) = \(1, 20000000, 10000000\) .* "
        r"num_modalities=2, channels=10000000",
    ),
}


@pytest.mark.parametrize("device", [None, META])
@pytest.mark.parametrize("name", list(LAYER_SIZE_ERRORS))
def test_layer_constructors_check_sizes_before_allocating(name, device):
    """The same refusal wherever the layer is built (on meta nothing would be allocated yet,
    but materialising it later would)."""
    build, message = LAYER_SIZE_ERRORS[name]
    with pytest.raises(ValueError, match=message):
        build(device=device)


@pytest.mark.parametrize("name", ["LowRankFusion", "CPFusion", "WanderAdapter", "GuidedZoomShift"])
def test_layer_max_elements_is_the_callers(name):
    build, _, _ = LAYERS[name]
    largest = max(p.numel() for p in build().parameters())
    assert build(max_elements=largest).max_elements == largest
    with pytest.raises(ValueError, match=rf"would have {largest} elements, over max_elements={largest - 1}"):
        build(max_elements=largest - 1)
    with pytest.raises(ValueError, match=r"^max_elements must be a positive integer"):
        build(max_elements=True)


def test_wander_layer_resets_under_its_own_max_elements():
    """reset_parameters draws through init_wander with the layer's limit, not the default."""
    build, _, _ = LAYERS["WanderAdapter"]
    layer = build(max_elements=30)  # token_factors[1] (3, 5, 2): 30 elements
    layer.reset_parameters()
    layer.max_elements = 29
    with pytest.raises(ValueError, match=r"^init_wander: token\[1\] .* over max_elements=29"):
        layer.reset_parameters()


def test_loading_weights_over_the_default_limit(monkeypatch):
    """from_lmf / from_cp copy arrays the caller already holds: the default limit does not
    refuse them."""
    monkeypatch.setattr(mnn, "DEFAULT_MAX_ELEMENTS", 4)
    lmf = [torch.randn(2, 4, 3), torch.randn(2, 5, 3)]
    layer = mnn.LowRankFusion.from_lmf(lmf, torch.ones(1, 2), torch.zeros(1, 3))
    assert [tuple(f.shape) for f in layer.factors] == [(2, 4, 3), (2, 5, 3)]
    cp = (None, [torch.randn(4, 2), torch.randn(5, 2), torch.randn(3, 2)])
    assert [tuple(f.shape) for f in mnn.CPFusion.from_cp(cp).factors] == [(4, 2), (5, 2), (3, 2)]


# --------------------------------------------------------------------------- hints in errors


def _np_xs(*dims, batch=2):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, d)) for d in dims]


def test_factors_without_the_constants_row_hint_at_append_one_false():
    xs = _np_xs(3, 2)
    hint = r"without the constant's row: parameters without it take append_one=False"
    factors = [np.ones((2, 3, 4)), np.ones((2, 2, 4))]
    with pytest.raises(ValueError, match=r"factors\[0\] has shape \(2, 3, 4\); expected .*" + hint):
        mmfuse.lowrank_fusion(xs, factors)
    assert mmfuse.lowrank_fusion(xs, factors, append_one=False).shape == (2, 4)
    with pytest.raises(ValueError, match=r"cp factor 0 has shape \(3, 5\); expected .*" + hint):
        mmfuse.cp_fusion(xs, (None, [np.ones((3, 5)), np.ones((2, 5)), np.ones((4, 5))]))
    with pytest.raises(ValueError, match=r"got \(3, 2, 4\); it has d_m entries per input mode, " + hint):
        mmfuse.tensor_fusion(xs, np.ones((3, 2, 4)))
    # and the other way round
    with pytest.raises(ValueError, match=r"as with the constant's row: pass append_one=True \(the default\)"):
        mmfuse.lowrank_fusion(xs, [np.ones((2, 4, 4)), np.ones((2, 3, 4))], append_one=False)


def test_a_mismatch_that_is_not_the_constant_gets_no_such_hint():
    with pytest.raises(ValueError, match=r"expected \(R, d_0 \+ 1, h\) = \(R, 4, h\) for xs\[0\] with d_0 = 3$"):
        mmfuse.lowrank_fusion(_np_xs(3, 2), [np.ones((2, 7, 4)), np.ones((2, 3, 4))])


LAYOUT = r"cp factors are laid out \(rows, R\), TensorLy's layout: \(d_m \+ 1, R\) for modality m"


def test_transposed_cp_factors_are_named_with_the_layout():
    xs = _np_xs(3, 2)
    a0, a1, c = np.ones((4, 2)), np.ones((3, 2)), np.ones((5, 2))
    # the case: one factor transposed
    with pytest.raises(
        ValueError,
        match=r"cp factor 2 has rank 5 \(shape \(2, 5\)\) but cp factor 0 has rank 2 \(shape \(4, 2\)\); "
        r"cp factor 2 looks transposed \(its transpose, of shape \(5, 2\), has rank 2\); " + LAYOUT,
    ):
        mmfuse.cp_fusion(xs, (None, [a0, a1, c.T]))
    # factor 0 transposed: the others' rank is its row count
    with pytest.raises(ValueError, match=r"cp factor 0 looks transposed \(its transpose, of shape \(4, 2\), has rank 2\)"):
        mmfuse.cp_fusion(xs, (None, [a0.T, a1, c]))
    # every factor transposed, ranks differing: they share their row count
    with pytest.raises(ValueError, match=r"the factors look transposed \(they share their row count, 2"):
        mmfuse.cp_fusion(xs, (None, [a0.T, a1.T, c.T]))
    # every factor transposed with one rank: the rows check says so
    with pytest.raises(ValueError, match=r"cp factor 0 has shape \(2, 4\); .*it looks transposed .*" + LAYOUT):
        mmfuse.cp_fusion(_np_xs(3, 3), (None, [a0.T, a0.T, np.ones((2, 4))]))
    assert mmfuse.cp_fusion(xs, (None, [a0, a1, c])).shape == (2, 5)


def test_a_factor_with_wrong_rows_is_not_called_transposed_when_its_transpose_would_not_fit():
    """One factor with wrong rows whose column count happens to be d_m + 1: its transpose has
    another rank than the other factors, yet the message said it "would fit", and the call
    that followed the hint was told to transpose it back (a review's find)."""
    xs = [np.ones((4, 3)), np.ones((4, 2))]
    a0, a1, c = np.ones((6, 4)), np.ones((3, 4)), np.ones((5, 4))
    with pytest.raises(ValueError, match=r"^cp factor 0 has shape \(6, 4\); expected \(d_0 \+ 1, R\) = \(4, R\) for xs\[0\] of shape \(4, 3\)$"):
        mmfuse.cp_fusion(xs, (None, [a0, a1, c]))


def test_a_factor_short_of_a_column_is_not_called_transposed():
    """A modality factor with its modality's rows and the wrong column count: its transpose
    would not fit its rows, yet the rank check called it transposed, and the call that
    followed that advice was refused for its rows (a review's find).  Only the layout is
    named; a factor whose transpose does fit is still called transposed."""
    xs = [np.ones((4, 3)), np.ones((4, 2))]
    w = np.ones(3)
    for short in (np.ones((3, 2)), np.ones((3, 4))):
        with pytest.raises(ValueError) as info:
            mmfuse.cp_fusion(xs, (w, [np.ones((4, 3)), short, np.ones((5, 3))]))
        assert "transposed" not in str(info.value)
        assert re.search(r"^cp factor 1 has rank \d \(shape \(3, \d\)\) but cp factor 0 has rank 3 .*; " + LAYOUT, str(info.value))
    xs = [np.ones((4, 3)), np.ones((4, 4))]
    with pytest.raises(ValueError, match=r"cp factor 1 looks transposed \(its transpose, of shape \(5, 3\), has rank 3\)"):
        mmfuse.cp_interactions(xs, (w, [np.ones((4, 3)), np.ones((3, 5)), np.ones((5, 3))]))


def test_layer_from_cp_says_the_factor_looks_transposed():
    with pytest.raises(ValueError, match=r"cp factor 1 looks transposed .*" + LAYOUT):
        mnn.CPFusion.from_cp((None, [torch.ones(4, 2), torch.ones(2, 3), torch.ones(5, 2)]))


# --------------------------------------------------------------------------- tensor_fusion blocks the batch


def _tfn_problem(batch, dims=(4, 3), out_dim=6, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    weight = rng.standard_normal((*(d + 1 for d in dims), out_dim))
    return xs, weight, rng.standard_normal(out_dim)


def test_tensor_fusion_runs_a_large_batch_in_blocks(monkeypatch):
    """The issue's case, scaled down: the weight (5, 4, 6) fits, the batch's intermediate
    (50, 4, 6) does not; the batch is blocked so that each block's does."""
    from mmfuse._core import fusion as core
    from mmfuse.reference import tensor_fusion as reference

    xs, weight, bias = _tfn_problem(50)
    rows_seen = []
    contract = core._contract
    monkeypatch.setattr(core, "_contract", lambda xp, b, *a: rows_seen.append(b[0].shape[0]) or contract(xp, b, *a))
    got = mmfuse.tensor_fusion(xs, weight, bias, max_elements=120)  # 24 elements per sample
    np.testing.assert_allclose(got, reference(xs, weight, bias), rtol=1e-12, atol=1e-12)
    assert sum(rows_seen) == 50 and max(rows_seen) * 24 <= 120 and len(rows_seen) == 10
    rows_seen.clear()
    mmfuse.tensor_fusion(xs, weight, bias)  # the default limit: one block
    assert rows_seen == [50]


def test_tensor_fusion_blocks_keep_gradients():
    xs, weight, bias = _tfn_problem(9, dims=(2, 3, 2))  # weight (3, 4, 3, 6): 216 elements
    ts = [torch.tensor(a, requires_grad=True) for a in [*xs, weight, bias]]
    blocked = mmfuse.tensor_fusion(ts[:3], ts[3], ts[4], max_elements=216)  # 72 per sample: blocks of 3
    whole = mmfuse.tensor_fusion(ts[:3], ts[3], ts[4])
    torch.testing.assert_close(blocked, whole)
    for a, b in zip(torch.autograd.grad(blocked.sum(), ts), torch.autograd.grad(whole.sum(), ts)):
        torch.testing.assert_close(a, b)


def test_tensor_fusion_refuses_only_what_one_sample_cannot_fit():
    xs, weight, _ = _tfn_problem(3)
    with pytest.raises(ValueError, match=r"weight of shape \(5, 4, 6\) has 120 elements, over max_elements=119"):
        mmfuse.tensor_fusion(xs, weight, max_elements=119)
    assert mmfuse.tensor_fusion(xs, weight, max_elements=120).shape == (3, 6)


def test_tensor_fusion_on_dask_counts_the_largest_batch_chunk():
    """Dask contracts one batch chunk at a time: the largest chunk's intermediate counts, not
    the whole batch's (which refused, as for JAX, batches that Dask fuses within the limit)."""
    da = pytest.importorskip("dask.array")
    xs, weight, _ = _tfn_problem(10)  # one sample's intermediates: (4, 6) and (6,), 24 elements
    lazy = [da.from_array(x, chunks=((3, 6, 1), x.shape[1])) for x in xs]  # largest chunk: 6 rows
    with pytest.raises(
        ValueError,
        match=r"intermediate of shape \(6, 4, 6\) with 144 elements per batch chunk of 6 rows, "
        r"over max_elements=143 \(Dask arrays are contracted one batch chunk at a time\); "
        r"rechunk the batch smaller",
    ):
        mmfuse.tensor_fusion(lazy, da.from_array(weight), max_elements=143)
    # the whole batch's 240 elements are over the limit, every chunk's within it
    got = mmfuse.tensor_fusion(lazy, da.from_array(weight), max_elements=144)
    np.testing.assert_allclose(np.asarray(got.compute()), mmfuse.tensor_fusion(xs, weight), rtol=1e-12)


def test_lowrank_to_tensor_counts_one_weighted_factors_intermediate():
    """With one factor and weights the core builds factors[0] * weights, (R, D, h), which
    the docstring says max_elements refuses; the check was skipped for one factor (a
    review's find).  Without weights it sums the factor itself: no intermediate."""
    rng = np.random.default_rng(11)
    f, w = rng.standard_normal((64, 10, 5)), rng.standard_normal(64)
    with pytest.raises(ValueError, match=r"intermediate of shape \(64, 10, 5\) with 3200 elements, over max_elements=1000"):
        mmfuse.lowrank_to_tensor([f], w, max_elements=1000)
    np.testing.assert_allclose(mmfuse.lowrank_to_tensor([f], max_elements=1000), f.sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(mmfuse.lowrank_to_tensor([f], w), np.tensordot(w, f, axes=1), rtol=1e-12)


def test_lowrank_to_tensor_never_holds_every_rank_term():
    """lowrank_to_tensor summed an (R, D_1 ... D_M, h) product of every rank term: R times
    the result (a review: 272 MiB for a 16 MiB weight at R = 16).  The last modality and the
    rank sum are now one batched product, so the peak is the rank terms over the other
    modalities, (R, D_1 ... D_{M-1}, h), and the result twice (its transpose)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    rank, out_dim, dims = 16, 8, (8, 8, 8, 8)
    factors = [rng.standard_normal((rank, d, out_dim)) for d in dims]
    weights = rng.standard_normal(rank)
    want = np.einsum("r,raj,rbj,rcj,rdj->abcdj", weights, *factors)
    tracemalloc.start()
    try:
        got = mmfuse.lowrank_to_tensor(factors, weights)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    # before: over rank (16) times the result; now (R, 8, 8, 8, h) is 2x it, plus 2 results
    assert peak < 5 * got.nbytes, (peak, got.nbytes)
    assert got.flags.c_contiguous  # (as before: not a view of the product's layout)
    t_got = mmfuse.lowrank_to_tensor([torch.from_numpy(f) for f in factors], torch.from_numpy(weights))
    assert t_got.is_contiguous()
    np.testing.assert_allclose(t_got.numpy(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_tensor_fusion_on_jax_is_one_block_and_still_refuses_the_batch():
    jnp = pytest.importorskip("jax.numpy")
    xs, weight, _ = _tfn_problem(10)
    with pytest.raises(
        ValueError,
        match=r"intermediate of shape \(10, 4, 6\) with 240 elements, over max_elements=200 "
        r"\(JAX arrays are contracted as one block\); fuse a smaller batch",
    ):
        mmfuse.tensor_fusion([jnp.asarray(x) for x in xs], jnp.asarray(weight), max_elements=200)


def test_tensorfusion_layer_takes_a_large_batch_eager_and_compiled():
    torch.manual_seed(3)
    layer = mnn.TensorFusion((3, 4), 5, max_elements=100, dtype=torch.float64)
    xs = [torch.randn(33, 3, dtype=torch.float64), torch.randn(33, 4, dtype=torch.float64)]
    want = mmfuse.tensor_fusion(xs, layer.weight, layer.bias)  # default limit: one block
    torch.testing.assert_close(layer(xs), want)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(xs), want)


# --------------------------------------------------------------------------- documentation

FORWARD_ARGS = {
    "TensorFusion": ("xs",),
    "LowRankFusion": ("xs", "present"),
    "CPFusion": ("xs", "present"),
    "WanderAdapter": ("xs", "masks"),
    "ZoomShift": ("xs", "masks"),
    "GuidedZoomShift": ("xs", "masks"),
}


@pytest.mark.parametrize("name", list(FORWARD_ARGS))
def test_forward_has_its_own_numpydoc(name):
    import inspect
    import pydoc

    cls = getattr(mnn, name)
    doc = cls.forward.__doc__  # the layer's own, not nn.Module's inherited one
    assert doc, f"{name}.forward has no docstring"
    doc = inspect.cleandoc(doc)
    for section in ("Parameters\n----------", "Returns\n-------", "Raises\n------"):
        assert section in doc, (name, section)
    for arg in FORWARD_ARGS[name]:
        assert f"\n{arg} : " in doc, (name, arg)
        assert arg in inspect.signature(cls.forward).parameters
    assert "(B, " in doc and "meta" in doc
    build = LAYERS[name][0]
    rendered = pydoc.render_doc(build().forward, renderer=pydoc.plaintext)
    assert "Parameters" in rendered and "Returns" in rendered


@pytest.mark.parametrize("name", list(FORWARD_ARGS))
def test_class_docstrings_say_layers_can_be_built_on_meta(name):
    doc = getattr(mnn, name).__doc__
    assert '``meta``' in doc
    if name != "ZoomShift":  # parameter-free: nothing to materialise
        assert "to_empty" in doc and "reset_parameters()" in doc


def test_docs_say_layers_can_be_built_on_meta():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in ("getting_started.rst", "api.rst"):
        text = (docs / page).read_text()
        assert 'device="meta"' in text and "to_empty" in text, page


def test_wander_layer_on_meta_draws_nothing(monkeypatch):
    """On meta there are no values to fill: the host-side draw of init_wander is skipped."""
    import mmfuse._sequence

    def refuse(*args, **kwargs):
        raise AssertionError("init_wander called for a layer on meta")

    monkeypatch.setattr(mmfuse._sequence, "init_wander", refuse)
    layer = LAYERS["WanderAdapter"][0](device=META)
    layer.reset_parameters()


@pytest.mark.parametrize("device", ["cuda0", -1, "gpu", 10**30])
def test_a_device_torch_cannot_use_is_refused_by_name(device):
    """Initialisers, loaders, make_inputs and layer constructors passed a bad device to torch,
    whose RuntimeError ("Invalid device string", ...) came out of the first allocation
    (ZoomShift without a dtype ignored it); each names ``device`` in a ValueError."""
    from mmfuse.datasets import load_mfeat
    from mmfuse.nn import LowRankFusion, ZoomShift
    from mmfuse.testing import make_inputs

    calls = [
        lambda: mmfuse.init_lowrank([3], rank=1, out_dim=1, xp=torch, device=device),
        lambda: mmfuse.init_wander([8], [4], rank=2, feature_rank=1, token_rank=1, out_dim=8, xp=torch, device=device),
        lambda: load_mfeat(xp=torch, device=device),
        lambda: make_inputs([3, 2], batch=2, xp=torch, device=device),
        lambda: LowRankFusion([3, 2], 4, 2, device=device),
        lambda: ZoomShift(3, 2, device=device),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"^device={re.escape(repr(device))} is not a device"):
            call()


def test_reference_backend_refuses_jax_tracers_by_name():
    """Under jax.jit / jax.grad the reference met a tracer and failed in JAX's
    TracerArrayConversionError; it refuses traced arrays as it refuses torch's."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, g = jnp.ones((2, 3, 4)), jnp.arange(24.0).reshape(2, 3, 4)
    with pytest.raises(BackendUnsupported, match=r"backend 'reference' cannot take .*traced arrays"):
        jax.jit(lambda a, b: mmfuse.zoom_shift(a, b, backend="reference"))(x, g)
    assert mmfuse.zoom_shift(x, g, backend="reference").shape == (2, 3, 4)


def test_reference_backend_refuses_a_tracer_in_any_argument():
    """Only the first floating array was tested for a tracer: a traced weight, factor, guide,
    later modality, mask or ``present`` (grad with respect to the parameters, data a
    closure's constant) reached the reference and JAX's TracerArrayConversionError (a
    review's find)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng()
    xs = [jnp.asarray(rng.standard_normal((4, d))) for d in (3, 2)]
    factors = [jnp.asarray(rng.standard_normal((2, d + 1, 5))) for d in (3, 2)]
    w = jnp.asarray(rng.standard_normal(2))
    x, g = jnp.asarray(rng.standard_normal((4, 6, 3))), jnp.asarray(rng.standard_normal((4, 5, 3)))
    mask = jnp.asarray(rng.random((4, 6)) < 0.7).at[:, 0].set(True)
    present = jnp.asarray(rng.random((4, 2)) < 0.7)
    ref = {"backend": "reference"}
    calls = [
        (jax.jit, lambda ww: mmfuse.lowrank_fusion(xs, factors, ww, **ref), w),
        (jax.grad, lambda f0: mmfuse.lowrank_fusion(xs, [f0, factors[1]], w, **ref).sum(), factors[0]),
        (jax.jit, lambda k: mmfuse.lowrank_fusion(xs, factors, w, present=k, **ref), present),
        (jax.jit, lambda gg: mmfuse.zoom_shift(x, gg, **ref), g),
        (jax.jit, lambda k: mmfuse.moments(x, mask=k, **ref), mask),
        (jax.jit, lambda gg: mmfuse.align([x, gg], **ref), g),
        (jax.jit, lambda k: mmfuse.align([x, g], masks=[k, None], **ref), mask),
    ]
    for transform, call, arg in calls:
        with pytest.raises(BackendUnsupported, match=r"backend 'reference' cannot take .*traced arrays"):
            transform(call)(arg)


@pytest.mark.parametrize("space", ["torch", "array_api_strict"])
def test_initialisers_take_a_dtype_by_name_in_every_namespace(space):
    """init_lowrank / init_wander refused "float32" on torch and array_api_strict (NumPy, JAX
    and Dask took it, as make_inputs and the loaders do everywhere)."""
    xp = pytest.importorskip(space)
    p = mmfuse.init_lowrank([3], rank=1, out_dim=2, xp=xp, dtype="float64", seed=0)
    w = mmfuse.init_wander([4], [3], rank=2, feature_rank=1, token_rank=1, out_dim=4, xp=xp, dtype="float64", seed=0)
    assert p["bias"].dtype == xp.float64 and w["feature"][0].dtype == xp.float64
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype of the namespace .*got 'asarray'"):
        mmfuse.init_lowrank([3], rank=1, out_dim=2, xp=xp, dtype="asarray")


# --------------------------------------------------------------------------- torch.compile first


@pytest.mark.slow
def test_first_call_under_compile_imports_the_backend_without_recompiles():
    """A compiled function making a process's first mmfuse call on torch tensors imports the
    torch backend inside torch.compile's call.  Dynamo compiled each function the import ran:
    the op bindings, one function called with a new op each time, recompiled up to Dynamo's
    limit with a warning ("hit config.recompile_limit"), then run uncompiled (a review's
    find).  In a fresh interpreter: no such warning, and the eager values."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch, mmfuse
        assert "mmfuse.backends.torch" not in sys.modules
        torch.manual_seed(0)
        xs = [torch.randn(2, t, 3, dtype=torch.float64) for t in (4, 6)]
        f = torch.compile(lambda a, b: mmfuse.align([a, b], rounds=2, alpha=0.4)[0], backend="eager")
        got = f(*xs)
        assert "mmfuse.backends.torch" in sys.modules
        torch.testing.assert_close(got, mmfuse.align(xs, rounds=2, alpha=0.4)[0], rtol=1e-12, atol=0)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert "recompile_limit" not in out.stderr, out.stderr[-3000:]


def test_mmfuse_nn_without_torch_names_the_extra():
    """Without torch, ``mmfuse.nn`` said only "No module named 'torch'", where the other
    optional parts (numba, CuPy, the demo) name the extra to install (a review's find)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import mmfuse\n"
        "try:\n    mmfuse.nn\nexcept ImportError as exc:\n    print(exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("mmfuse.nn needs torch (") and "pip install 'mmfuse[torch]'" in res.stdout


def test_an_inf_in_one_sample_leaves_the_other_samples_low_rank_fusion_bits():
    """The rank sum as a GEMM (narrow outputs) spreads an inf in one sample to NaN in its other
    outputs, so non-finite samples are summed again; the whole block was, which changed its
    other samples' last bits with a neighbour's inf (a review: 255 of 256 rows on NumPy, 16826
    of 16999 in the torch op).  Now only the non-finite samples are redone."""
    import mmfuse

    rng = np.random.default_rng(0)
    p = mmfuse.init_lowrank((3, 4), rank=64, out_dim=8, seed=1)
    xs = [rng.standard_normal((1024, d)) for d in (3, 4)]  # B R h = 2**19: the blocked form
    before = mmfuse.lowrank_fusion(xs, p["factors"], p["weights"], p["bias"])
    xs[0][5, 0] = np.inf
    # (inf - inf in that sample's rank sum: NumPy's "invalid value" warning, as the reference
    # and the whole-batch form give for it)
    with pytest.warns(RuntimeWarning, match="invalid value"):
        after = mmfuse.lowrank_fusion(xs, p["factors"], p["weights"], p["bias"])
    others = np.arange(1024) != 5
    np.testing.assert_array_equal(after[others], before[others])
    assert not np.isfinite(after[5]).all()

    # the torch op keeping its projections (narrow: M R h = 128 <= 512 / 4 input features)
    gen = torch.Generator().manual_seed(2)
    factors = [torch.randn(16, 257, 4, generator=gen, dtype=torch.float64) / 16 for _ in range(2)]
    weights = torch.randn(16, generator=gen, dtype=torch.float64)
    txs = [torch.randn(17000, 256, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t_before = mmfuse.lowrank_fusion(txs, factors, weights).detach()
    with torch.no_grad():
        txs[0][5, 0] = float("inf")
    t_after = mmfuse.lowrank_fusion(txs, factors, weights).detach()
    keep = torch.arange(17000) != 5
    assert torch.equal(t_after[keep], t_before[keep])
    assert not torch.isfinite(t_after[5]).all()
