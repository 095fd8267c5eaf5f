"""An empty batch (B = 0) works everywhere a batch of one does, as it does for NumPy's and
torch's own operations: every op returns an empty result of the reference's shape and the
input's dtype, gradients of parameters are zeros, and the layers run forward and backward.

(Before, blocked loops found no block: a zero step, an empty list to concatenate, a max over
nothing, or a reshape with an undetermined -1.)"""

from __future__ import annotations

import numpy as np
import pytest

import mmfuse
import mmfuse.reference as ref
from mmfuse._namespace import block_slices, from_numpy, to_numpy

BACKENDS = [None, "array_api", "reference"]
DIMS = (3, 4)
LENGTHS = (5, 6)


def _problems(rng, batch):
    """(name, call(asarray, backend), reference result) for every public op at ``batch``."""
    xs = [rng.standard_normal((batch, d)) for d in DIMS]
    factors = [rng.standard_normal((2, d + 1, 5)) for d in DIMS]
    weights, bias = rng.standard_normal(2), rng.standard_normal(5)
    single = [rng.standard_normal((2, d + 1, 1)) for d in DIMS]  # h = 1: the torch backend's own path
    bias1 = rng.standard_normal(1)
    present = rng.random((batch, len(DIMS))) < 0.5
    weight = rng.standard_normal((DIMS[0] + 1, DIMS[1] + 1, 5))
    cp = (
        rng.standard_normal(2),
        [rng.standard_normal((d + 1, 2)) for d in DIMS] + [rng.standard_normal((5, 2))],
    )
    hs = [rng.standard_normal((batch, t, 4)) for t in LENGTHS]
    feats = [rng.standard_normal((2, 4, 3)) for _ in hs]
    toks = [rng.standard_normal((2, t, 3)) for t in LENGTHS]
    masks = [rng.random((batch, t)) < 0.7 for t in LENGTHS]
    seqs = [rng.standard_normal((batch, t, 6)) for t in LENGTHS]
    params = mmfuse.init_wander((6, 6), LENGTHS, rank=3, feature_rank=2, token_rank=2, out_dim=6, seed=1)

    def conv_params(a):
        return {"down": [(a(w), a(b)) for w, b in params["down"]], "feature": [a(f) for f in params["feature"]],
                "token": [a(t) for t in params["token"]]}  # fmt: skip

    def many(a, arrays):
        return [a(x) for x in arrays]

    return [
        ("lowrank_fusion", lambda a, be: mmfuse.lowrank_fusion(many(a, xs), many(a, factors), a(weights), a(bias),
                                                                present=a(present), backend=be),
         ref.lowrank_fusion(xs, factors, weights, bias, present=present)),
        ("lowrank_fusion h=1", lambda a, be: mmfuse.lowrank_fusion(many(a, xs), many(a, single), a(weights),
                                                                    a(bias1), backend=be),
         ref.lowrank_fusion(xs, single, weights, bias1)),
        ("tensor_fusion", lambda a, be: mmfuse.tensor_fusion(many(a, xs), a(weight), a(bias), backend=be),
         ref.tensor_fusion(xs, weight, bias)),
        ("cp_fusion", lambda a, be: mmfuse.cp_fusion(many(a, xs), (a(cp[0]), many(a, cp[1])), a(bias), backend=be),
         ref.cp_fusion(xs, cp, bias)),
        ("sequence_fusion cp", lambda a, be: mmfuse.sequence_fusion(many(a, hs), many(a, feats), many(a, toks),
                                                                     masks=many(a, masks), backend=be),
         ref.sequence_fusion(hs, feats, toks, masks=masks)),
        ("sequence_fusion collapsed", lambda a, be: mmfuse.sequence_fusion(many(a, hs), many(a, feats), many(a, toks),
                                                                            mode="collapsed", backend=be),
         ref.sequence_fusion(hs, feats, toks, mode="collapsed")),
        ("wander cp", lambda a, be: mmfuse.wander(many(a, seqs), conv_params(a), backend=be),
         ref.wander(seqs, params)),
        ("wander collapsed", lambda a, be: mmfuse.wander(many(a, seqs), conv_params(a), mode="collapsed", backend=be),
         ref.wander(seqs, params, mode="collapsed")),
        ("zoom_shift", lambda a, be: mmfuse.zoom_shift(a(seqs[0]), a(seqs[1]), mask=a(masks[0]), backend=be),
         ref.zoom_shift(seqs[0], seqs[1], mask=masks[0])),
        ("moments", lambda a, be: mmfuse.moments(a(seqs[0]), backend=be)[1], ref.moments(seqs[0])[1]),
        ("align", lambda a, be: mmfuse.align(many(a, seqs), backend=be)[1], ref.align(seqs)[1]),
        ("zoom_shift_fusion", lambda a, be: mmfuse.zoom_shift_fusion(many(a, seqs)), ref.zoom_shift_fusion(seqs)),
    ]  # fmt: skip


def test_block_slices_cover_the_batch_and_give_an_empty_batch_one_block():
    assert block_slices(0, 7) == [slice(0, 0)]
    assert block_slices(5, 7) == [slice(0, 5)]
    assert block_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_takes_an_empty_batch(xp, dtype, backend, rng):
    def asarray(a):
        return xp.asarray(a, dtype)

    for name, call, want in _problems(rng, 0):
        if backend is not None and name == "zoom_shift_fusion":
            continue  # it has no backend argument: the default only
        got = call(asarray, backend)
        assert got.shape == want.shape, name
        assert got.dtype == xp.dtype(dtype), name
        assert to_numpy(got, dtype=None).size == 0, name
    xp.assert_untouched()


def test_the_empty_batch_problems_are_the_ones_that_work_at_batch_one(rng):
    """The same calls at B = 1 agree with the reference: the B = 0 test exercises real calls."""
    for name, call, want in _problems(rng, 1):
        np.testing.assert_allclose(
            to_numpy(call(np.asarray, None)), want, rtol=1e-10, atol=1e-12, err_msg=name
        )


def test_numba_cpu_kernels_take_an_empty_batch(rng):
    pytest.importorskip("numba")
    checked = 0
    for name, call, want in _problems(rng, 0):
        if name in ("moments", "zoom_shift", "align"):  # the ops with CPU kernels
            got = call(np.asarray, "numba")
            assert got.shape == want.shape and got.dtype == np.float64, name
            checked += 1
    assert checked == 3


torch = pytest.importorskip("torch")


def _leaves(arrays):
    return [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]


def test_torch_custom_ops_backward_on_an_empty_batch(rng):
    """Through the torch backend's custom ops (auto on torch tensors): parameter gradients are
    zeros, input gradients empty."""
    xs = _leaves(rng.standard_normal((0, d)) for d in DIMS)
    factors = _leaves(rng.standard_normal((2, d + 1, 5)) for d in DIMS)
    weights, bias = _leaves([rng.standard_normal(2), rng.standard_normal(5)])
    cp_w = _leaves([rng.standard_normal(2)])[0]
    cp_f = _leaves([rng.standard_normal((d + 1, 2)) for d in DIMS] + [rng.standard_normal((5, 2))])
    hs = _leaves(rng.standard_normal((0, t, 4)) for t in LENGTHS)
    feats = _leaves(rng.standard_normal((2, 4, 3)) for _ in hs)
    toks = _leaves(rng.standard_normal((2, t, 3)) for t in LENGTHS)
    outs = [
        mmfuse.lowrank_fusion(xs, factors, weights, bias),
        mmfuse.cp_fusion(xs, (cp_w, cp_f), bias),
        mmfuse.sequence_fusion(hs, feats, toks),
        mmfuse.sequence_fusion(hs, feats, toks, mode="collapsed"),
        mmfuse.zoom_shift(hs[0], hs[1][..., :4, :]),
    ]
    sum(y.sum() for y in outs).backward()
    for p in (*factors, weights, bias, cp_w, *cp_f, *feats, *toks):
        assert p.grad is not None and p.grad.shape == p.shape
        assert torch.count_nonzero(p.grad) == 0
    for x in (*xs, *hs):
        assert x.grad is not None and x.grad.shape == x.shape


def test_layers_run_forward_and_backward_on_an_empty_batch():
    from mmfuse.nn import CPFusion, GuidedZoomShift, LowRankFusion, TensorFusion, WanderAdapter, ZoomShift

    torch.manual_seed(0)
    flat = [torch.randn(0, d, dtype=torch.float64, requires_grad=True) for d in DIMS]
    seqs = [torch.randn(0, t, 6, dtype=torch.float64, requires_grad=True) for t in LENGTHS]
    # modalities of one shape: the torch backend's stacked collapsed adapter
    same = [torch.randn(0, LENGTHS[0], 6, dtype=torch.float64, requires_grad=True) for _ in LENGTHS]
    cases = [
        (LowRankFusion(DIMS, 5, 2, dtype=torch.float64), flat, (0, 5)),
        (CPFusion(DIMS, 5, 2, dtype=torch.float64), flat, (0, 5)),
        (TensorFusion(DIMS, 5, dtype=torch.float64), flat, (0, 5)),
        (WanderAdapter((6, 6), LENGTHS, 3, 2, 2, mode="collapsed", dtype=torch.float64), seqs, (0, 3, 6)),
        (WanderAdapter((6, 6), LENGTHS, 3, 2, 2, mode="cp", dtype=torch.float64), seqs, (0, 3, 6)),
        (WanderAdapter((6, 6), (LENGTHS[0],) * 2, 3, 2, 2, mode="collapsed", dtype=torch.float64), same, (0, 3, 6)),
        (ZoomShift(6, 2, dtype=torch.float64), seqs, (0, 12)),
        (GuidedZoomShift(6, 2, dtype=torch.float64), seqs, (0, 12)),
    ]
    for layer, inputs, shape in cases:
        out = layer(inputs)
        assert out.shape == shape, type(layer).__name__
        out.sum().backward()
        for p in layer.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, type(layer).__name__


def test_empty_numpy_results_become_dask_arrays():
    """Dask's automatic chunking divided by zero on an empty (256, 0, 2) array (the reference
    backend's interaction terms by subset of an empty batch, M = 8)."""
    da = pytest.importorskip("dask.array")
    for shape in ((256, 0, 2), (1024, 0, 2), (0, 3), (2, 0)):
        for dtype in (np.float32, np.float64):
            got = from_numpy(np.zeros(shape, dtype), da, dtype=dtype)
            assert isinstance(got, da.Array) and got.shape == shape and got.dtype == dtype
            assert got.compute().shape == shape


@pytest.mark.parametrize("batch", [0, 3])
def test_dask_with_chunked_token_axes(batch, rng):
    """Dask arrays chunked along the token axis: wander crashed on an empty batch (Dask's own
    reshape of an empty (B, T, d) array to (B T, d)), and rechunked a full one's batch;
    ``zoom_shift_fusion(pool="max")`` of an empty batch computed shape (1, 0) where its lazy
    shape said (0, C) (Dask's max over axis 1 of an empty array).  Lazy and computed shapes
    now agree with NumPy's, values too, and the batch chunks are the inputs'."""
    da = pytest.importorskip("dask.array")
    seqs = [rng.standard_normal((batch, t, 6)) for t in LENGTHS]
    masks = [rng.random((batch, t)) < 0.7 for t in LENGTHS]
    for k in masks:
        k[:, 0] = True
    params = mmfuse.init_wander((6, 6), LENGTHS, rank=3, feature_rank=2, token_rank=2, out_dim=6,
                                seed=int(rng.integers(1 << 30)))  # fmt: skip
    lazy = {"down": [(da.from_array(w), da.from_array(b)) for w, b in params["down"]],
            "feature": [da.from_array(f) for f in params["feature"]],
            "token": [da.from_array(t) for t in params["token"]]}  # fmt: skip

    def chunked(arrays):
        return [da.from_array(a, chunks=(2, 2, *a.shape[2:])) for a in arrays]

    cases = [(f"wander {mode}", lambda mode=mode: mmfuse.wander(chunked(seqs), lazy, mode=mode),
              mmfuse.wander(seqs, params, mode=mode)) for mode in ("cp", "collapsed")]
    cases += [(f"zoom_shift_fusion {pool} masks={m is not None}",
               lambda pool=pool, m=m: mmfuse.zoom_shift_fusion(chunked(seqs), pool=pool,
                                                               masks=None if m is None else chunked(m)),
               mmfuse.zoom_shift_fusion(seqs, pool=pool, masks=m))
              for pool in ("mean", "max") for m in (None, masks)]  # fmt: skip
    for name, call, want in cases:
        got = call()
        assert got.shape == want.shape, name
        if name.startswith("wander"):
            assert got.chunks[0] == ((2, 1) if batch else (0,)), name
        computed = got.compute()
        assert computed.shape == want.shape, name
        np.testing.assert_allclose(computed, want, rtol=1e-12, atol=1e-12, err_msg=name)
