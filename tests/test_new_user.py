"""What a new user hit (issue 20): layers and masks on torch's ``meta`` device, the reference
backend's refusal there, size checks before allocation, tensor_fusion's batch blocking, hints
in errors and the layers' ``forward`` documentation."""

from __future__ import annotations

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
