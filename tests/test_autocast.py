"""The functional fusions under ``torch.autocast`` (mmfuse/_autocast.py): matmul-like, so their
floating inputs are cast once to the region's dtype and the fusion runs with autocast off.

Before, the output's dtype depended on the path a call's size took (bfloat16 for the small
forms of plain operators, float32 for the custom operators' buffers), and the custom ops'
backward was not the derivative of their partly autocast forward."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402


def _leaf(rng, shape, scale=1.0):
    return torch.tensor(scale * rng.standard_normal(shape), dtype=torch.float32, requires_grad=True)


def _cases(rng, batch):
    xs = [_leaf(rng, (batch, 3)), _leaf(rng, (batch, 4))]
    factors = [_leaf(rng, (2, 4, 3), 0.5), _leaf(rng, (2, 5, 3), 0.5)]
    weight = _leaf(rng, (4, 5, 3), 0.5)
    # rank 8: projections wider than the inputs, so that large batches take the custom op
    cp = (_leaf(rng, (8,)), [_leaf(rng, (4, 8), 0.5), _leaf(rng, (5, 8), 0.5), _leaf(rng, (3, 8), 0.5)])
    seq_batch = max(1, batch // 10)
    hs = [_leaf(rng, (seq_batch, 5, 3)), _leaf(rng, (seq_batch, 6, 3))]
    feature, token = [_leaf(rng, (2, 3, 4)), _leaf(rng, (2, 3, 4))], [_leaf(rng, (2, 5, 3)), _leaf(rng, (2, 6, 3))]
    wx = [_leaf(rng, (seq_batch, 6, 4)), _leaf(rng, (seq_batch, 5, 4))]
    p = mmfuse.init_wander([4, 4], [6, 5], rank=3, feature_rank=2, token_rank=2, out_dim=4, seed=1, xp=torch)
    params = {
        "down": [(w.requires_grad_(True), b.requires_grad_(True)) for w, b in p["down"]],
        "feature": [f.requires_grad_(True) for f in p["feature"]],
        "token": [(t + 0.1).detach().requires_grad_(True) for t in p["token"]],
    }
    return {
        "tensor_fusion": (lambda a: mmfuse.tensor_fusion(a[0], a[1]), (xs, weight)),
        "lowrank_fusion": (lambda a: mmfuse.lowrank_fusion(a[0], a[1]), (xs, factors)),
        # tensors given by keyword are cast as the positional ones (a mutation review)
        "lowrank_fusion, weights and bias by keyword": (
            lambda a: mmfuse.lowrank_fusion(a[0], a[1], weights=a[2], bias=a[3]),
            (xs, factors, _leaf(rng, (2,)), _leaf(rng, (3,))),
        ),
        "cp_fusion": (lambda a: mmfuse.cp_fusion(a[0], a[1]), (xs, cp)),
        "tensor_interactions": (lambda a: mmfuse.tensor_interactions(a[0], a[1])[0], (xs, weight)),
        "lowrank_interactions": (lambda a: mmfuse.lowrank_interactions(a[0], a[1])[0], (xs, factors)),
        "cp_interactions": (lambda a: mmfuse.cp_interactions(a[0], a[1])[0], (xs, cp)),
        "sequence_fusion": (lambda a: mmfuse.sequence_fusion(*a), (hs, feature, token)),
        "wander": (lambda a: mmfuse.wander(a[0], a[1], mode="collapsed"), (wx, params)),
        # parameters in another mapping than a dict (cast as well: they were not)
        "wander, OrderedDict": (lambda a: mmfuse.wander(a[0], OrderedDict(a[1]), mode="collapsed"), (wx, params)),
    }


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    return [leaf for item in tree for leaf in _leaves(item)]


def _bf16(tree):
    if isinstance(tree, torch.Tensor):
        return tree.to(torch.bfloat16)
    if isinstance(tree, dict):
        return {k: _bf16(v) for k, v in tree.items()}
    return type(tree)(_bf16(v) for v in tree)


@pytest.mark.parametrize("batch", [5, 3000])  # the small forms, and the custom ops (see the test)
def test_fusions_under_autocast_are_the_fusion_of_the_cast_inputs(batch, monkeypatch):
    rng = np.random.default_rng(batch)
    if batch > 5:  # low-rank fusion's plain form runs up to B R h <= 2**20: the op here
        import importlib

        monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.lowrank"), "PLAIN_ELEMENTS", -1)
    for name, (call, args) in _cases(rng, batch).items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(args)
        want = call(_bf16(args))  # outside the region: the inputs cast by hand
        assert out.dtype == torch.bfloat16, name
        assert torch.equal(out, want), name
        if batch > 5 and "interactions" not in name and name != "tensor_fusion":  # (no custom op)
            assert "Backward0" not in type(out.grad_fn).__name__, (name, type(out.grad_fn).__name__)
        leaves = _leaves(args)
        upstream = torch.tensor(rng.standard_normal(out.shape), dtype=torch.bfloat16)
        got = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
        expected = torch.autograd.grad((call(_bf16(args)) * upstream).sum(), leaves, allow_unused=True)
        for g, e, leaf in zip(got, expected, leaves):
            assert (g is None) == (e is None), name
            if g is not None:
                assert g.dtype == leaf.dtype == torch.float32, name
                assert torch.equal(g, e), name


def test_float64_and_the_alignment_operators_are_not_cast():
    """autocast never casts float64 (torch's rule); the alignment operators are
    normalisations, which autocast runs in float32: both keep their dtype.  A call mixing
    float64 with float32 is refused naming the dtypes given, not the region's."""
    rng = np.random.default_rng(0)
    xs = [torch.tensor(rng.standard_normal((5, d))) for d in (3, 4)]
    factors = [torch.tensor(rng.standard_normal((2, d + 1, 3))) for d in (3, 4)]
    x, g = torch.randn(2, 6, 3), torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mmfuse.lowrank_fusion(xs, factors).dtype == torch.float64
        assert mmfuse.zoom_shift(x, g).dtype == torch.float32
        assert mmfuse.align([x, g])[0].dtype == torch.float32
        with pytest.raises(TypeError, match=r"factors\[0\] has dtype torch.float32 but xs\[0\] has dtype torch.float64"):
            mmfuse.lowrank_fusion(xs, [f.float() for f in factors])


def test_floating_masks_under_autocast_are_refused_with_the_given_dtype():
    """Masks are boolean by contract: the region's cast had turned a float32 ``present`` or
    ``masks`` entry into bfloat16 before its check, whose message then named a dtype the
    caller never passed (a review's find).  Masks are left as given."""
    rng = np.random.default_rng()
    xs = [torch.tensor(rng.standard_normal((4, d)), dtype=torch.float32) for d in (3, 4)]
    p = mmfuse.init_lowrank([3, 4], rank=3, out_dim=5, seed=rng, xp=torch)
    wp = mmfuse.init_wander([3, 3], [5, 6], rank=2, feature_rank=2, token_rank=2, out_dim=3, seed=rng, xp=torch)
    seqs = [torch.randn(4, 5, 3), torch.randn(4, 6, 3)]
    present = torch.ones(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"^present must have a boolean dtype, got torch.float32$"):
            mmfuse.lowrank_fusion(xs, **p, present=present)
        with pytest.raises(TypeError, match=r"masks\[0\] must have a boolean dtype, got torch.float32"):
            mmfuse.wander(seqs, wp, masks=[torch.ones(4, 5), None])
        assert mmfuse.lowrank_fusion(xs, **p, present=present > 0).dtype == torch.bfloat16
