"""Plans (mmfuse._plan): a seen call signature skips checks and dispatch, and nothing else
changes: the same errors, the same answers, the policy and the autograd state respected;
the whole-batch and blocked forms of low-rank fusion agree with the reference."""

from __future__ import annotations

import cProfile
import pstats

import numpy as np
import pytest

import mmfuse
import mmfuse.reference as ref
from mmfuse import _align, _interactions, _plan
from mmfuse.backends import BackendUnsupported, register, unregister
from mmfuse.testing import assert_close


def _lowrank_case(rng, batch=4, dims=(3, 4, 5), rank=2, out_dim=3, dtype=np.float64):
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d in dims]
    p = mmfuse.init_lowrank(list(dims), rank=rank, out_dim=out_dim, seed=int(rng.integers(1 << 30)), dtype=dtype)
    bias = rng.standard_normal(out_dim).astype(dtype)
    return xs, p["factors"], p["weights"], bias


def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


def test_signatures_of_different_arrangements_differ(rng):
    """The flat signature (_plan._append_keys) tells apart what a nested one would: the same
    arrays grouped, ordered, typed or shaped otherwise, None in other places, another
    namespace's array of the same shape and dtype."""
    torch = pytest.importorskip("torch")
    a, b = rng.standard_normal((2, 3)), rng.standard_normal(3)
    arrangements = [
        ([a, b],), ((a, b),), (a, b), (b, a), ([a], b), (a, [b]), ([a, b], None), (None, [a, b]),
        ([[a], b],), ([a, [b]],), ([a, b, None],), ([],), ([a, a], b), (a.astype(np.float32), b),
        (a.T.copy(), b), (torch.from_numpy(a), b), ([torch.from_numpy(a), b],), (a[None], b),
    ]
    keys = [_plan.call_key(None, (), *args) for args in arrangements]
    assert None not in keys
    assert len(set(keys)) == len(keys)
    # and the same arrangement of other arrays with the same metadata gives the same key
    again = [_plan.call_key(None, (), *args) for args in (([a.copy(), b.copy()],), (a + 1.0, b * 2.0))]
    assert again == [keys[0], keys[2]]


def test_dask_calls_of_other_chunks_are_planned_apart(rng):
    """Dask's tensor_fusion refuses by its largest batch chunk (max_elements), so the chunks
    are part of a Dask array's signature: a plan made for fine chunks let coarse chunks of
    the same shape through, where a fresh process refuses them (a review's find)."""
    da = pytest.importorskip("dask.array")
    x1, x2, w = rng.standard_normal((8, 3)), rng.standard_normal((8, 2)), rng.standard_normal((4, 3, 5))

    def call(rows):
        xs = [da.from_array(x1, chunks=(rows, 3)), da.from_array(x2, chunks=(rows, 2))]
        return mmfuse.tensor_fusion(xs, da.from_array(w), max_elements=60)

    with pytest.raises(ValueError, match="max_elements=60"):
        call(8)
    assert_close(call(1).compute(), ref.tensor_fusion([x1, x2], w), rtol=1e-12)
    with pytest.raises(ValueError, match="max_elements=60"):
        call(8)


def test_dask_masked_chunks_after_plain_ones_are_refused_by_name(rng):
    """A Dask array's chunk type is in its signature: masked chunks of a shape planned with
    plain ones get the unplanned call's refusal, naming x (without it the refusal came from
    a later layer, as "argument 0"; a mutation review's find)."""
    da = pytest.importorskip("dask.array")
    x = rng.standard_normal((3, 6, 2))
    mmfuse.moments(da.from_array(x))
    masked = da.from_array(np.ma.masked_array(x, x > 1), asarray=False)
    with pytest.raises(TypeError, match=r"^x is a Dask array of numpy\.ma\.MaskedArray chunks"):
        mmfuse.moments(masked)


def test_a_bad_call_after_a_good_one_raises_what_an_unplanned_call_raises(rng):
    xs, factors, weights, bias = _lowrank_case(rng)
    mmfuse.lowrank_fusion(xs, factors, weights, bias)  # planned
    bad_calls = [
        lambda: mmfuse.lowrank_fusion(xs, factors, weights, bias, append_one=1),  # 1 == True, not a bool
        lambda: mmfuse.lowrank_fusion(xs, factors[:2], weights, bias),
        lambda: mmfuse.lowrank_fusion([xs[0], xs[1][:3], xs[2]], factors, weights, bias),
        lambda: mmfuse.lowrank_fusion([x.astype(np.float32) for x in xs], factors, weights, bias),
        lambda: mmfuse.lowrank_fusion(xs, factors, weights[:1], bias),
        lambda: mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="nope"),
        lambda: mmfuse.lowrank_fusion(np.stack([xs[0], xs[0]]), factors, weights, bias),
    ]
    planned = [_error(call) for call in bad_calls]
    mmfuse.lowrank_fusion(xs, factors, weights, bias)
    for cache in (mmfuse._fusion._LOWRANK_PLANS,):
        cache.clear()
    assert planned == [_error(call) for call in bad_calls]
    # and none of them was remembered: each still raises after the good call is planned again
    assert planned == [_error(call) for call in bad_calls]


def test_masks_values_are_checked_on_every_planned_call(rng):
    """Each operator planned with good masks first, then called with the same signature and
    a sample with every token masked: every planned call checks the values (only
    zoom_shift's x mask had been planned before its bad call; a mutation review's find)."""
    x, g = rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 5, 2))
    mask, guide_mask = np.ones((3, 6), dtype=bool), np.ones((3, 5), dtype=bool)
    mmfuse.zoom_shift(x, g, mask=mask, guide_mask=guide_mask)
    mmfuse.align([x, x], masks=[mask, None], rounds=1)
    mmfuse.moments(x, mask=mask)
    guide_mask[1] = False  # same signatures, a sample with every token masked
    with pytest.raises(ValueError, match="guide_mask masks every token of a sample"):
        mmfuse.zoom_shift(x, g, mask=mask, guide_mask=guide_mask)
    guide_mask[1] = True
    mask[1] = False
    with pytest.raises(ValueError, match="masks every token of a sample"):
        mmfuse.zoom_shift(x, g, mask=mask, guide_mask=guide_mask)
    with pytest.raises(ValueError, match="masks every token of a sample"):
        mmfuse.align([x, x], masks=[mask, None], rounds=1)
    with pytest.raises(ValueError, match="masks every token of a sample"):
        mmfuse.moments(x, mask=mask)


def test_zoom_shift_fusion_after_a_planned_call_raises_what_an_unplanned_call_raises(rng):
    """zoom_shift_fusion is planned (the eager ZoomShift layer's path): after a good call, calls
    of other options, keywords, shapes and masks raise the unplanned call's error, none of
    them is kept, and the masks' values are still checked per call."""
    xs = [rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 5, 2))]
    masks = [np.ones((3, 6), dtype=bool), None]
    good = {"fuse": "sum", "pool": "mean", "rounds": 2, "alpha": 0.5, "masks": masks}
    want = mmfuse.zoom_shift_fusion(xs, **good)
    bad_calls = [
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "fuse": "max"}),
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "pool": "sum"}),
        lambda: mmfuse.zoom_shift_fusion(xs, **good, ronuds=2),
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "alpha": 2.0}),
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "axis": -1}),
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "backend": "nope"}),
        lambda: mmfuse.zoom_shift_fusion([xs[0], xs[1][:2]], **good),
        lambda: mmfuse.zoom_shift_fusion([xs[0][:, :1], xs[1]], **good),
        lambda: mmfuse.zoom_shift_fusion([x[..., 0] for x in xs], **good),
        lambda: mmfuse.zoom_shift_fusion(xs, **{**good, "masks": [masks[0][:, :5], None]}),
    ]
    planned = [_error(call) for call in bad_calls]
    mmfuse._align._FUSION_PLANS.clear()
    mmfuse._align._ALIGN_PLANS.clear()
    assert planned == [_error(call) for call in bad_calls]
    assert planned == [_error(call) for call in bad_calls]  # and none of them was kept
    assert len(mmfuse._align._FUSION_PLANS) == 0
    assert_close(mmfuse.zoom_shift_fusion(xs, **good), want, rtol=0)
    assert len(mmfuse._align._FUSION_PLANS) == 1
    emptied = [masks[0].copy(), None]
    emptied[0][1] = False  # the same signature, a sample with every token masked
    with pytest.raises(ValueError, match=r"masks\[0\] masks every token of a sample"):
        mmfuse.zoom_shift_fusion(xs, **{**good, "masks": emptied})
    # the planned call gives the unplanned answer, which follows the formula
    aligned = ref.align(xs, rounds=2, alpha=0.5, masks=masks)
    kept = [masks[0], np.ones((3, 5), dtype=bool)]
    pooled = [np.where(k[..., None], y, 0.0).sum(1) / k.sum(1)[:, None] for y, k in zip(aligned, kept)]
    assert_close(want, pooled[0] + pooled[1], rtol=1e-12)


def test_a_planned_zoom_shift_fusion_makes_few_python_calls(rng):
    """A seen signature runs its plan: the key, a lookup, align's plan and the pooling
    (issue 19; counted, not timed).  Unplanned, the call made over 500."""
    xs = [rng.standard_normal((4, 6, 5)), rng.standard_normal((4, 7, 5))]
    mmfuse.zoom_shift_fusion(xs)
    prof = cProfile.Profile()
    prof.enable()
    mmfuse.zoom_shift_fusion(xs)
    prof.disable()
    python_calls = sum(
        n for (file, _, _), (_, n, *_) in pstats.Stats(prof).stats.items() if file != "~"  # type: ignore[attr-defined]
    )
    assert python_calls <= 150, python_calls


def _interaction_calls(rng):
    """The three interaction functions on one small problem, as (name, good call, bad calls)."""
    xs, factors, weights, _ = _lowrank_case(rng)
    weight = rng.standard_normal((4, 5, 6, 3))
    cp = (rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 6, 3)])
    present = np.array([[True, False, True]] * 4)
    short = [xs[0], xs[1][:3], xs[2]]
    return [
        ("tensor", lambda **k: mmfuse.tensor_interactions(xs, weight, **k), [
            lambda: mmfuse.tensor_interactions(xs, weight, by="pairs"),
            lambda: mmfuse.tensor_interactions(xs, weight, append_one=1),
            lambda: mmfuse.tensor_interactions(xs, weight[..., :1, :]),
            lambda: mmfuse.tensor_interactions(short, weight),
            lambda: mmfuse.tensor_interactions(xs, weight, by="subset", max_elements=10),
            lambda: mmfuse.tensor_interactions(xs, weight, backend="nope"),
        ]),
        ("lowrank", lambda **k: mmfuse.lowrank_interactions(xs, factors, weights, present=present, **k), [
            lambda: mmfuse.lowrank_interactions(xs, factors, weights[:1], present=present),
            lambda: mmfuse.lowrank_interactions(xs, factors, weights, present=present[:, :2]),
            lambda: mmfuse.lowrank_interactions(xs, factors[:2], weights, present=present),
            lambda: mmfuse.lowrank_interactions(xs, factors, weights, present=present, max_elements=0),
            lambda: mmfuse.lowrank_interactions([x.astype(np.float32) for x in xs], factors, weights),
        ]),
        ("cp", lambda **k: mmfuse.cp_interactions(xs, cp, present=present, **k), [
            lambda: mmfuse.cp_interactions(xs, (cp[0][:1], cp[1]), present=present),
            lambda: mmfuse.cp_interactions(xs, (cp[0], cp[1][:3]), present=present),
            lambda: mmfuse.cp_interactions(xs, cp, present=present.astype(np.int8)),
            lambda: mmfuse.cp_interactions(xs, cp[1], present=present),
            lambda: mmfuse.cp_interactions(short, cp, by="subset"),
        ]),
    ]


def test_interaction_terms_after_a_planned_call_raise_what_an_unplanned_call_raises(rng):
    """The interaction functions are planned: after a good call, each bad call of a nearby
    signature raises the unplanned call's error, none of them is kept, and the planned good
    call gives the unplanned answer bit for bit."""
    for name, good, bad_calls in _interaction_calls(rng):
        for by in ("order", "subset"):
            want = good(by=by)
            assert_close(good(by=by)[0], want[0], rtol=0)
        planned = [_error(call) for call in bad_calls]
        for cache in (_interactions._TENSOR_PLANS, _interactions._LOWRANK_PLANS, _interactions._CP_PLANS):
            cache.clear()
        assert planned == [_error(call) for call in bad_calls], name
        assert planned == [_error(call) for call in bad_calls], name  # and none was kept
        kept = len(_interactions._TENSOR_PLANS) + len(_interactions._LOWRANK_PLANS) + len(_interactions._CP_PLANS)
        assert kept == 0, name


def test_cp_interactions_planned_for_a_cp_tensor_and_a_pair_subclass(rng):
    """TensorLy's CPTensor and a (weights, factors) tuple of a tuple subclass (which as_cp
    takes and the signature does not describe: run unplanned) give the pair's terms."""
    tl = pytest.importorskip("tensorly")
    xs, _, _, _ = _lowrank_case(rng)
    weights, factors = rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 6, 3)]

    class Pair(tuple):
        pass

    want, orders = mmfuse.cp_interactions(xs, (weights, factors))
    for cp in (tl.cp_tensor.CPTensor((weights, factors)), Pair((weights, factors))):
        for _ in range(2):  # the first call plans (or not), the second runs the plan
            got, got_orders = mmfuse.cp_interactions(xs, cp)
            assert_close(got, want, rtol=0)
            assert got_orders == orders


def test_a_planned_interaction_call_makes_few_python_calls(rng):
    """A seen signature runs its plan: the key, a lookup and the implementation (issue 19;
    counted, not timed).  Unplanned, the low-rank call made about 360 Python calls."""
    xs, factors, weights, _ = _lowrank_case(rng)
    mmfuse.lowrank_interactions(xs, factors, weights)
    prof = cProfile.Profile()
    prof.enable()
    mmfuse.lowrank_interactions(xs, factors, weights)
    prof.disable()
    python_calls = sum(
        n for (file, _, _), (_, n, *_) in pstats.Stats(prof).stats.items() if file != "~"  # type: ignore[attr-defined]
    )
    assert python_calls <= 120, python_calls


# ---- zoom_shift_fusion's and the interaction terms' plans: every option apart (a mutation review)


def _clear_fusion_and_interaction_plans():
    for cache in (_align._FUSION_PLANS, _align._ALIGN_PLANS, _interactions._TENSOR_PLANS,
                  _interactions._LOWRANK_PLANS, _interactions._CP_PLANS):
        cache.clear()


# pairs of valid keyword sets with the same names, differing in one value
_ZS_VARIANTS = [
    ({"rounds": 1, "alpha": 0.5}, {"rounds": 3, "alpha": 0.5}),
    ({"rounds": 2, "alpha": 0.5}, {"rounds": None, "alpha": 0.5}),
    ({"alpha": 0.5, "rounds": 3, "schedule": "jacobi"}, {"alpha": 0.5, "rounds": 3, "schedule": "gauss-seidel"}),
    ({"topology": "consensus"}, {"topology": "hub"}),
    ({"topology": "hub", "hub": 0}, {"topology": "hub", "hub": 1}),
    ({"axis": -1, "fuse": "sum"}, {"axis": -2, "fuse": "sum"}),
    ({"eps": 1e-5}, {"eps": 1.0}),
    ({"fuse": "sum"}, {"fuse": "mean"}),
    ({"pool": "max"}, {"pool": "mean"}),
]


def test_zoom_shift_fusion_plans_keep_backends_apart(rng):
    """backend= enters the key (through the dispatch policy): a planned call under one backend
    does not pass a call naming an unknown one."""
    xs = [rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 5, 4))]
    mmfuse.zoom_shift_fusion(xs, backend="reference")
    with pytest.raises(ValueError, match="nope"):
        mmfuse.zoom_shift_fusion(xs, backend="nope")


@pytest.mark.parametrize("first, second", _ZS_VARIANTS)
def test_zoom_shift_fusion_plans_keep_each_option_apart(rng, first, second):
    xs = [rng.standard_normal((3, 6, 4)), 3.0 + 2.0 * rng.standard_normal((3, 6, 4))]  # one T: axis=-1 too
    _clear_fusion_and_interaction_plans()
    want = mmfuse.zoom_shift_fusion(xs, **second)  # unplanned
    _clear_fusion_and_interaction_plans()
    mmfuse.zoom_shift_fusion(xs, **first)  # planned
    got = mmfuse.zoom_shift_fusion(xs, **second)
    assert_close(got, want, rtol=0)
    assert not np.allclose(got, mmfuse.zoom_shift_fusion(xs, **first))  # the variants differ


@pytest.mark.parametrize("typo", [{"round": 5}, {"mask": None}, {"bakend": "numpy"}])
def test_zoom_shift_fusion_refuses_an_unknown_keyword_after_a_planned_call(rng, typo):
    """An unknown keyword replacing a known one given as None: same count, same known values."""
    xs = [rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 5, 2))]
    known = {"round": "rounds", "mask": "masks", "bakend": "backend"}[next(iter(typo))]
    mmfuse.zoom_shift_fusion(xs, alpha=0.5, **{known: None})
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        mmfuse.zoom_shift_fusion(xs, alpha=0.5, **typo)


def test_planned_zoom_shift_fusion_masks_padding_and_every_mask_value(rng):
    """On a planned (second) call: masked NaN padding stays out of the values and the
    gradients (torch), float16 is computed in float32, and the last modality's mask values
    are checked too."""
    torch = pytest.importorskip("torch")
    xs = [torch.randn(3, 6, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)]
    masks = [torch.ones(3, 6, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)]
    masks[0][:, -1] = False
    masks[1][:, -2:] = False
    for _ in range(2):  # unplanned, then planned
        padded = [x.clone() for x in xs]
        padded[0][:, -1] = float("nan")
        padded[1][:, -2:] = float("nan")
        padded = [p.requires_grad_() for p in padded]
        out = mmfuse.zoom_shift_fusion(padded, masks=masks, pool="mean", alpha=0.5, rounds=2)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in padded)
    half = [x.to(torch.float16) for x in xs]
    want = mmfuse.zoom_shift_fusion(half)
    assert_close(mmfuse.zoom_shift_fusion(half), want, rtol=0)
    mmfuse.zoom_shift_fusion(xs, masks=masks, pool="mean", alpha=0.5, rounds=2)  # planned
    emptied = [masks[0], masks[1].clone()]
    emptied[1][0] = False
    with pytest.raises(ValueError, match=r"masks\[1\] masks every token"):
        mmfuse.zoom_shift_fusion(xs, masks=emptied, pool="mean", alpha=0.5, rounds=2)


def test_interaction_plans_keep_each_option_and_array_apart(rng):
    """Two valid calls of one signature but for one option or optional array: the second
    gives its unplanned answer (by, append_one, weights, present)."""
    xs, factors, weights, _ = _lowrank_case(rng)
    weight = rng.standard_normal((4, 5, 6, 3))
    cp = (rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 6, 3)])
    present = np.array([[True, False, True]] * 4)
    cases = [
        (lambda **k: mmfuse.tensor_interactions(xs, weight, **k), {"by": "order"}, {"by": "subset"}),
        (lambda **k: mmfuse.tensor_interactions(xs, weight[:-1, :-1, :-1], **k),
         {"append_one": False, "by": "subset"}, {"append_one": False, "by": "order"}),
        (lambda **k: mmfuse.lowrank_interactions(xs, factors, **k), {"by": "order"}, {"by": "subset"}),
        (lambda **k: mmfuse.lowrank_interactions(xs, factors, **k), {"present": None}, {"present": present}),
        (lambda **k: mmfuse.lowrank_interactions(xs, factors, **k), {"weights": None}, {"weights": weights}),
        (lambda **k: mmfuse.cp_interactions(xs, cp, **k), {"by": "order"}, {"by": "subset"}),
        (lambda **k: mmfuse.cp_interactions(xs, cp, **k), {"present": None}, {"present": present}),
        (lambda **k: mmfuse.cp_interactions(xs, (None, cp[1]), **k), {}, {}),
    ]
    for call, first, second in cases:
        _clear_fusion_and_interaction_plans()
        want, labels = call(**second)
        _clear_fusion_and_interaction_plans()
        call(**first)
        got, got_labels = call(**second)
        assert got_labels == labels
        assert_close(got, want, rtol=0)


def test_cp_interactions_refuses_a_bad_pair_subclass_after_a_good_one(rng):
    """A tuple subclass is run unplanned (its signature is not formed): a second one of other
    shapes is checked, not run on the first one's plan."""
    xs, _, _, _ = _lowrank_case(rng)

    class Pair(tuple):
        pass

    good = Pair((rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 6, 3)]))
    bad = Pair((rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 7, 3)]))
    mmfuse.cp_interactions(xs, good)
    mmfuse.cp_interactions(xs, good)
    with pytest.raises(ValueError, match="cp factor 2 has shape"):
        mmfuse.cp_interactions(xs, bad)


def test_interaction_terms_refuse_bad_options_after_a_planned_call(rng):
    """append_one=1 and a small max_elements after a good call of each kind; a cp argument
    that is no pair (a 3-tuple, an object with weights but no factors)."""
    from types import SimpleNamespace

    xs, factors, weights, _ = _lowrank_case(rng)
    cp = (rng.standard_normal(2), [rng.standard_normal((d, 2)) for d in (4, 5, 6, 3)])
    calls = [
        lambda **k: mmfuse.lowrank_interactions(xs, factors, weights, by="subset", **k),
        lambda **k: mmfuse.cp_interactions(xs, cp, by="subset", **k),
    ]
    for call in calls:
        call()
        with pytest.raises(TypeError, match="append_one"):
            call(append_one=1)
        with pytest.raises(ValueError, match="max_elements"):
            call(max_elements=10)
    mmfuse.cp_interactions(xs, cp)
    with pytest.raises(TypeError, match="cp must be"):
        mmfuse.cp_interactions(xs, (*cp, None))
    with pytest.raises(TypeError, match="cp must be"):
        mmfuse.cp_interactions(xs, SimpleNamespace(weights=cp[0]))


def test_a_planned_zoom_shift_fusion_reuses_its_align_plan(monkeypatch, rng):
    """A seen signature runs the align plan its first run made (no new dispatch), and that
    plan was made on the work dtype's arrays: float16 torch CPU tensors take the torch
    backend's float32 NumPy host path, as float32 inputs do (the backend named: under "auto"
    numba's kernels take these calls once a test has imported numba)."""
    torch = pytest.importorskip("torch")
    import importlib

    torch_align = importlib.import_module("mmfuse.backends.torch.align")

    made, host = [], []
    plan_align, on_host = _align._plan_align, torch_align._align_on_host
    monkeypatch.setattr(_align, "_plan_align", lambda *a, **k: made.append(1) or plan_align(*a, **k))
    monkeypatch.setattr(torch_align, "_align_on_host", lambda *a, **k: host.append(1) or on_host(*a, **k))
    _clear_fusion_and_interaction_plans()
    xs = [torch.randn(4, 6, 3).half(), torch.randn(4, 5, 3).half()]
    mmfuse.zoom_shift_fusion(xs, backend="torch")
    mmfuse.zoom_shift_fusion(xs, backend="torch")
    assert len(made) == 1
    assert len(host) == 2


def test_a_zoom_shift_fusion_whose_run_fails_is_not_kept(monkeypatch, rng):
    xs = [rng.standard_normal((3, 6, 2)), rng.standard_normal((3, 5, 2))]
    _clear_fusion_and_interaction_plans()

    def fail(*args, **kwargs):
        raise RuntimeError("pooling failed")

    monkeypatch.setattr(_align.core, "zoom_shift_fusion", fail)
    with pytest.raises(RuntimeError):
        mmfuse.zoom_shift_fusion(xs)
    assert len(_align._FUSION_PLANS) == 0


def test_the_plan_caches_stay_bounded(monkeypatch):
    """A program making new shapes (a growing batch) starts the plans over at MAX_PLANS
    rather than keeping every signature (untested before; a mutation review's find)."""
    monkeypatch.setattr(_plan, "MAX_PLANS", 8)
    cache = mmfuse._align._MOMENTS_PLANS
    cache.clear()
    for batch in range(1, 30):
        mmfuse.moments(np.ones((batch, 4, 2)))
        assert 1 <= len(cache) <= 8


def test_float16_numpy_alignment_takes_the_generic_rows():
    """NumPy's cache-blocked alignment takes float32 / float64; float16 goes to the generic
    rows, which compute in float32 and round once (the blocked ones in float16 had been 3
    ulps off the reference; a mutation review's find)."""
    from mmfuse.backends import explain

    x = np.ones((4, 20, 3), dtype=np.float16)
    for op, arrays in (("moments", (x,)), ("zoom_shift", (x, x)), ("align", ([x, x],))):
        assert explain(op, *arrays, backend="array_api").chosen.variant == "generic", op


def test_planned_calls_follow_the_configured_backend(rng):
    xs, factors, weights, bias = _lowrank_case(rng)
    want = ref.lowrank_fusion(xs, factors, weights, bias)
    assert_close(mmfuse.lowrank_fusion(xs, factors, weights, bias), want)  # planned under "auto"
    with mmfuse.config_context(backend="cupy"), pytest.raises(BackendUnsupported, match="cupy"):
        mmfuse.lowrank_fusion(xs, factors, weights, bias)  # NumPy arrays: CuPy refuses
    assert_close(mmfuse.lowrank_fusion(xs, factors, weights, bias), want)


def test_planned_calls_follow_registrations(rng):
    xs, factors, weights, bias = _lowrank_case(rng)
    mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api")
    calls = []

    def mine(xs, factors, weights=None, bias=None, *, append_one=True, present=None):
        calls.append(len(xs))
        return ref.lowrank_fusion(xs, factors, weights, bias, append_one=append_one, present=present)

    register("lowrank_fusion", "array_api", mine)
    try:
        mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api")
        assert calls == [3]
    finally:
        unregister("lowrank_fusion", "array_api")
    mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api")
    assert calls == [3]


def test_a_planned_numpy_call_makes_few_python_calls(rng):
    """The hot path is the key, a dict lookup and the kernel (issue 19): counted, not timed."""
    xs, factors, weights, bias = _lowrank_case(rng)
    mmfuse.lowrank_fusion(xs, factors, weights, bias)
    prof = cProfile.Profile()
    prof.enable()
    mmfuse.lowrank_fusion(xs, factors, weights, bias)
    prof.disable()
    python_calls = sum(
        n for (file, _, _), (_, n, *_) in pstats.Stats(prof).stats.items() if file != "~"  # type: ignore[attr-defined]
    )
    assert python_calls <= 60, python_calls  # an unplanned call makes about 200


def test_unhashable_or_array_options_run_unplanned(rng):
    xs, factors, _, _ = _lowrank_case(rng)
    cache = _plan.PlanCache()
    unhashable = _plan.call_key(None, ([1],), xs)  # formed, but the cache cannot hold it
    assert cache.get(unhashable) is None
    made = []
    assert cache.plan(unhashable, lambda: made.append(1) or "plan") == "plan"
    assert cache.plan(unhashable, lambda: made.append(1) or "plan") == "plan"
    assert made == [1, 1] and len(cache) == 0  # planned afresh each time, nothing kept
    assert _plan.call_key(None, (True,), xs, factors) is not None
    assert _plan.call_key(None, (True,), xs, "not an array") is None

class _UnhashableDevice:
    """Like CuPy's ``cupy.cuda.Device``: equality by id, no hash."""

    def __init__(self, ident):
        self.id = ident

    def __eq__(self, other):
        return isinstance(other, _UnhashableDevice) and other.id == self.id

    __hash__ = None

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


def test_arrays_on_unhashable_devices_are_planned_and_dispatched(rng, monkeypatch):
    """CuPy arrays' devices have no hash: the plan keys and the registry's choices hold a
    stand-in (every CuPy call raised "unhashable type: 'cupy.cuda.device.Device'" in the
    registry, found on the H200)."""
    from mmfuse.backends import _conditions, _registry

    class Duck:  # an array of another namespace, as the plan key sees it
        def __init__(self, device):
            self.shape, self.dtype, self.device = (2, 3), np.dtype(np.float32), device

    keys = [_plan.call_key(None, (True,), [Duck(_UnhashableDevice(i))]) for i in (0, 0, 1)]
    assert hash(keys[0]) == hash(keys[1]) and keys[0] == keys[1] and keys[0] != keys[2]
    cache = _plan.PlanCache()
    cache.remember(keys[0], "plan")
    assert cache.get(keys[1]) == "plan" and cache.get(keys[2]) is None

    # the registry: a NumPy call whose device has no hash is chosen once and remembered
    monkeypatch.setattr(_conditions, "device_of", lambda x: _UnhashableDevice(0))
    _registry._CHOICES.clear()
    xs, factors, weights, bias = _lowrank_case(rng)
    from mmfuse.backends import lookup

    first = lookup("lowrank_fusion", "array_api", like=xs[0], arrays=(xs,))
    assert lookup("lowrank_fusion", "array_api", like=xs[0], arrays=(xs,)) is first
    assert any(isinstance(k[3], tuple) and k[3][0] is _UnhashableDevice for k in _registry._CHOICES)
    assert_close(mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api"),
                 ref.lowrank_fusion(xs, factors, weights, bias))  # fmt: skip


def test_a_choice_made_during_a_registration_is_not_kept(rng):
    """A thread choosing an implementation while another registers one: the choice it made
    among the old registrations was stored after register() cleared the choices, and every
    later call ran it (a fresh process ran the new one)."""
    import threading

    x = rng.standard_normal((2, 5, 3))
    inside, resume = threading.Event(), threading.Event()

    def old(x, *, axis, mask, eps):
        return "old"

    def new(x, *, axis, mask, eps):
        return "new"

    def slow_supports(xp, device):  # holds the first thread inside its choice
        if threading.current_thread().name == "chooser":
            inside.set()
            resume.wait(5)
        return None

    register("moments", "cupy", old, supports=slow_supports, priority=50)
    try:
        thread = threading.Thread(target=mmfuse.moments, args=(x,), name="chooser")
        thread.start()
        assert inside.wait(5)
        register("moments", "triton", new, priority=100)
        resume.set()
        thread.join()
        assert mmfuse.moments(x) == "new"
    finally:
        resume.set()
        unregister("moments", "triton")
        unregister("moments", "cupy")



@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize(("batch", "dims", "with_present", "with_weights"), [
    (0, (3, 4), False, True), (1, (5,), True, False), (7, (3, 4, 5), True, True), (33, (2, 3, 4, 5, 6, 7, 8, 9), False, True),
])  # fmt: skip
def test_whole_batch_and_blocked_numpy_match_the_reference(rng, monkeypatch, blocked, batch, dims, with_present, with_weights):
    if blocked:
        import mmfuse._core.fusion as core_fusion

        monkeypatch.setattr(core_fusion, "WHOLE_BATCH_ELEMENTS", -1)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        xs, factors, weights, bias = _lowrank_case(rng, batch, dims, 3, 2, dtype)
        weights = weights if with_weights else None
        present = rng.random((batch, len(dims))) < 0.7 if with_present else None
        if present is not None:
            for m, x in enumerate(xs):
                x[~present[:, m]] = np.nan  # absent features never leak
        got = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present)
        want = ref.lowrank_fusion(xs, factors, weights, bias, present=present)
        assert got.dtype == dtype
        assert_close(got, want, rtol=tol, atol=tol)


def test_a_planned_numpy_lowrank_call_reads_the_size_bound_per_call(rng, monkeypatch):
    """The NumPy plan (``_plan_lowrank_numpy``) fixes the whole-batch form's namespace, not its
    size rule: a bound changed after the plan holds for the planned signature too, as the
    torch plans' bounds do."""
    import mmfuse._core.fusion as core_fusion

    xs, factors, weights, bias = _lowrank_case(rng)
    want = ref.lowrank_fusion(xs, factors, weights, bias)
    assert_close(mmfuse.lowrank_fusion(xs, factors, weights, bias), want)  # planned, whole-batch
    whole = []
    monkeypatch.setattr(core_fusion, "lowrank_whole_batch", lambda *a: whole.append(a) or want)
    mmfuse.lowrank_fusion(xs, factors, weights, bias)
    assert len(whole) == 1  # the plan runs the whole-batch form through its module
    monkeypatch.setattr(core_fusion, "WHOLE_BATCH_ELEMENTS", -1)
    assert_close(mmfuse.lowrank_fusion(xs, factors, weights, bias), want)  # now blocked
    assert len(whole) == 1
    # float16 keeps the function itself (float32 work, one rounding): its plan is the same
    # function, whatever the bound
    monkeypatch.undo()
    half = [x.astype(np.float16) for x in xs], [f.astype(np.float16) for f in factors]
    got = mmfuse.lowrank_fusion(*half, weights.astype(np.float16), bias.astype(np.float16))
    assert got.dtype == np.float16
    want16 = ref.lowrank_fusion(*half, weights.astype(np.float16), bias.astype(np.float16))
    assert_close(got, want16)


@pytest.mark.parametrize("mode", ["collapsed", "cp"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_planned_numpy_wander_and_sequence_fusion_give_the_unplanned_bits(rng, mode, dtype, monkeypatch):
    """The core's NumPy plans (``_plan_wander``, ``_plan_sequence_fusion``) run the same
    steps as the entry functions with the orders chosen once: the same bits, calls one and
    two (made and planned), modalities of both contraction orders; cp mode reads its cache
    budget per call (a budget changed after the plan blocks the planned call too); masked and
    float16 calls keep the entry functions."""
    import mmfuse._core.sequence as core

    lengths, dims, n_out = (40, 3, 5), (6, 4, 6), 8
    params = mmfuse.init_wander(list(dims), list(lengths), rank=4, feature_rank=2, token_rank=3,
                                out_dim=6, n_out=n_out, seed=int(rng.integers(1 << 30)), dtype=dtype)  # fmt: skip
    xs = [rng.standard_normal((5, t, d)).astype(dtype) for t, d in zip(lengths, dims)]
    hs = [rng.standard_normal((5, t, 4)).astype(dtype) for t in lengths]
    feature, token = params["feature"], params["token"]
    assert len(set(core.plan(mode, lengths, (4,) * 3, 2, 3, n_out, 6).orders)) == 2
    want_wander = core.wander(xs, params, mode=mode, masks=None, activation="gelu", residual="none")
    want_fusion = core.sequence_fusion(hs, feature, token, mode=mode)
    planned_wander = core._plan_wander(xs, params, mode=mode, masks=None, activation="gelu", residual="none")
    planned_fusion = core._plan_sequence_fusion(hs, feature, token, mode=mode, masks=None)
    assert planned_wander is not core.wander and planned_fusion is not core.sequence_fusion
    for _ in range(2):
        got = mmfuse.wander(xs, params, mode=mode, residual="none")
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want_wander)
        np.testing.assert_array_equal(mmfuse.sequence_fusion(hs, feature, token, mode=mode), want_fusion)
    with monkeypatch.context() as patch:  # planned calls: not through the entry functions
        for name in ("wander_with", "sequence_fusion"):
            patch.setattr(core, name, lambda *a, **k: pytest.fail("the entry function ran"))
        np.testing.assert_array_equal(mmfuse.wander(xs, params, mode=mode, residual="none"), want_wander)
        np.testing.assert_array_equal(mmfuse.sequence_fusion(hs, feature, token, mode=mode), want_fusion)
    if mode == "cp":
        blocks = []
        fuse_cp = core.fuse_cp
        monkeypatch.setattr(core, "fuse_cp", lambda *a: blocks.append(a[-1]) or fuse_cp(*a))
        monkeypatch.setattr(core, "CP_BLOCK_BYTES", 3 * 2 * 6 * np.dtype(dtype).itemsize)
        core.cp_blocking.cache_clear()
        try:
            got = mmfuse.sequence_fusion(hs, feature, token, mode=mode)
        finally:
            core.cp_blocking.cache_clear()
        assert blocks == [(1, 1)]
        assert_close(got, want_fusion)
    masks = [np.ones((5, t), dtype=bool) for t in lengths]
    assert core._plan_wander(xs, params, mode=mode, masks=masks, activation="gelu", residual="none") is core.wander
    half = [h.astype(np.float16) for h in hs]
    assert core._plan_sequence_fusion(half, feature, token, mode=mode, masks=None) is core.sequence_fusion


def test_the_configured_policy_is_read_afresh_after_every_change():
    """``backend_policy`` remembers the last options state's policy by identity: every
    set_config and config_context makes a new state, each thread its own."""
    import threading

    from mmfuse._config import backend_policy

    assert backend_policy(None) == ("auto", None)
    with mmfuse.config_context(backend="reference"):
        assert backend_policy(None) == ("reference", None)
        with mmfuse.config_context(backend="auto", prefer="numba"):
            assert backend_policy(None) == ("auto", "numba")
        assert backend_policy(None) == ("reference", None)
    assert backend_policy(None) == ("auto", None)
    seen = []

    def other():
        seen.append(backend_policy(None))
        mmfuse.set_config(backend="array_api")
        seen.append(backend_policy(None))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [("auto", None), ("array_api", None)]
    assert backend_policy(None) == ("auto", None)
    assert backend_policy("torch") == ("torch", None)


torch = pytest.importorskip("torch")
import mmfuse.nn  # noqa: E402


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize(("batch", "dims", "with_present", "with_weights"), [
    (1, (3, 4), False, True), (6, (5,), True, False), (9, (3, 4, 5), True, True),
])  # fmt: skip
def test_torch_whole_batch_and_blocked_gradients_match_the_reference(rng, monkeypatch, blocked, batch, dims, with_present, with_weights):
    """Values, gradients and a double backward of the torch paths (whole-batch autograd
    function, blocked custom op) against autograd through the float64 core."""
    import importlib

    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    if blocked:
        import mmfuse._core.fusion as core_fusion

        monkeypatch.setattr(core_fusion, "WHOLE_BATCH_ELEMENTS", -1)
        monkeypatch.setattr(torch_lowrank, "PLAIN_ELEMENTS", -1)
    else:  # (R h = 6: the plain form's, unless its bound on R h is lowered)
        monkeypatch.setattr(torch_lowrank, "PLAIN_RANK_OUTPUTS", 0)
    xs_np, fs_np, w_np, b_np = _lowrank_case(rng, batch, dims, 3, 2)
    present = torch.as_tensor(rng.random((batch, len(dims))) < 0.7) if with_present else None

    def leaves():
        xs = [torch.tensor(x, requires_grad=True) for x in xs_np]
        fs = [torch.tensor(f, requires_grad=True) for f in fs_np]
        w = torch.tensor(w_np, requires_grad=True) if with_weights else None
        return xs, fs, w, torch.tensor(b_np, requires_grad=True)

    upstream = torch.as_tensor(rng.standard_normal((batch, 2)))
    results = []
    for backend in ("torch", "array_api"):
        xs, fs, w, b = leaves()
        y = mmfuse.lowrank_fusion(xs, fs, w, b, present=present, backend=backend)
        inputs = [*xs, *fs, b] + ([w] if w is not None else [])
        grads = torch.autograd.grad((y * upstream).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(grads[0].square().sum(), fs[0])[0]
        results.append([y.detach(), *[g.detach() for g in grads], second])
    xs, fs, w, b = leaves()
    y = mmfuse.lowrank_fusion(xs, fs, w, b, present=present, backend="torch")
    assert type(y.grad_fn).__name__ == ("_LowRankFusionBackward" if blocked else "_LowRankWholeBatchBackward")
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_planned_torch_calls_follow_grad_mode(rng):
    xs_np, fs_np, w_np, b_np = _lowrank_case(rng)
    xs = [torch.tensor(x) for x in xs_np]
    fs = [torch.tensor(f, requires_grad=True) for f in fs_np]
    with torch.no_grad():
        assert mmfuse.lowrank_fusion(xs, fs, torch.tensor(w_np), torch.tensor(b_np)).grad_fn is None
    y = mmfuse.lowrank_fusion(xs, fs, torch.tensor(w_np), torch.tensor(b_np))
    y.sum().backward()
    assert fs[0].grad is not None


def test_a_tensor_seen_first_while_another_thread_files_its_type_keeps_requires_grad(monkeypatch):
    """The type table was read twice (a miss, then "not in"): another thread filing the type
    in between made the tensor's key a generic array's, without requires_grad, so that a
    tensor needing grad met a no-grad plan (a review's find, forced here: the table's first
    read misses while the type is filed)."""

    class FiledMeanwhile(dict):
        def get(self, key, default=None):
            found = dict.get(self, key, default)
            if found is None:
                self[key] = True  # another thread's entry, filed after this read
            return found

    monkeypatch.setattr(_plan, "_TORCH_TYPES", FiledMeanwhile())
    keys = []
    for grad in (False, True):
        _plan._TORCH_TYPES.clear()
        keys.append(_plan.call_key(None, (), torch.ones(5, 3, requires_grad=grad)))
    assert keys[0] != keys[1]
    x = torch.randn(4, 6, 5, requires_grad=True)
    _plan._TORCH_TYPES.clear()
    y = mmfuse.zoom_shift(x, torch.randn(4, 7, 5))
    assert y.requires_grad


def test_a_layer_checks_a_new_signature_after_a_planned_one():
    layer = mmfuse.nn.LowRankFusion([3, 4], 2, 2)
    layer([torch.randn(5, 3), torch.randn(5, 4)])
    with pytest.raises(TypeError, match=r"LowRankFusion: xs\[1\] has dtype torch.float64"):
        layer([torch.randn(5, 3), torch.randn(5, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"LowRankFusion: xs\[0\] must have shape"):
        layer([torch.randn(5, 2), torch.randn(5, 4)])
    layer.double()  # the parameters' dtype is part of the signature
    assert layer([torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)]).dtype == torch.float64
    with pytest.raises(TypeError, match=r"LowRankFusion: xs\[0\] has dtype torch.float32"):
        layer([torch.randn(5, 3), torch.randn(5, 4)])


class _ReadRefused(dict):
    """A plan dict that fails any lookup: what a compiled call must never do."""

    def get(self, *args, **kwargs):
        raise AssertionError("a plan cache was read under torch.compile")

    __getitem__ = get
    __contains__ = get


def test_compiled_calls_never_read_the_plan_caches(rng, monkeypatch):
    """Under torch.compile calls are not planned, and their None keys never reach a cache's dict:
    Dynamo would guard on every entry (tracing took 24x as long after 1000 eager calls of other
    shapes, benchmarks/compile_plans.py).  The eager call first fills the caches as usual."""
    import warnings

    import mmfuse._align as public_align
    import mmfuse._fusion as public_fusion

    x, g = torch.from_numpy(rng.standard_normal((3, 6, 4))), torch.from_numpy(rng.standard_normal((3, 5, 4)))
    xs, factors, weights, bias = (tree for tree in _lowrank_case(rng))
    xs, factors = [torch.from_numpy(a) for a in xs], [torch.from_numpy(f) for f in factors]
    weights, bias = torch.from_numpy(weights), torch.from_numpy(bias)

    def calls(x, g, *xs):
        ys = mmfuse.align([x, g], rounds=1)
        return ys[0].sum() + mmfuse.zoom_shift(x, g).sum() + mmfuse.lowrank_fusion(list(xs), factors, weights, bias).sum()

    want = calls(x, g, *xs)
    assert len(public_align._ALIGN_PLANS) and len(public_fusion._LOWRANK_PLANS)  # planned eagerly
    for cache in (public_align._ALIGN_PLANS, public_align._ZOOM_SHIFT_PLANS, public_fusion._LOWRANK_PLANS):
        monkeypatch.setattr(cache, "_plans", _ReadRefused())
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dynamo's notes on the public functions' graph breaks
            got = torch.compile(calls, backend="eager")(x, g, *xs)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["zoom_shift", "align"])
def test_compiled_calls_after_a_policy_change_and_under_a_preference(rng, op):
    """A compiled zoom_shift or align recompiled after a configuration change, or first traced
    under prefer="reference", failed in Dynamo: a graph break inside the call's planning ran
    the planning eagerly, where nothing said "compiling", and its choice (the NumPy path,
    the reference) was then traced on fake tensors (a review's find).  The frames a compiled
    call runs eagerly now count as intercepted, and the reference refuses intercepted calls;
    the compiled values are the eager ones throughout, and a forced reference says why not."""
    import warnings

    x = torch.from_numpy(rng.standard_normal((3, 6, 4)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((3, 5, 4)).astype(np.float32))

    def call(x, g):
        return mmfuse.zoom_shift(x, g) if op == "zoom_shift" else mmfuse.align([x, g])[0]

    want = call(x, g)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dynamo's notes on the public functions' graph breaks
            compiled = torch.compile(call, backend="eager")
            assert_close(compiled(x, g), want)
            with mmfuse.config_context(backend="array_api"):
                assert_close(compiled(x, g), want, rtol=1e-6)
            assert_close(compiled(x, g), want)  # (recompiled: the policy changed back)
            with mmfuse.config_context(prefer="reference"):
                assert_close(compiled(x, g), want, rtol=1e-6)
            torch._dynamo.reset()
            forced = torch.compile(lambda x, g: mmfuse.zoom_shift(x, g, backend="reference"), backend="eager")
            with pytest.raises(BackendUnsupported, match=r"cannot run on fake tensors, nor while torch\.compile"):
                forced(x, g)
    finally:
        torch._dynamo.reset()
    # a counting dispatch mode sees real values: the reference runs there, eagerly (the first
    # version of that refusal took every dispatch mode; the session's final review)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        got = mmfuse.zoom_shift(x, g, backend="reference")
    assert_close(got, mmfuse.zoom_shift(x, g, backend="reference"))
    # ... but make_fx records, and a copy of the values is no operator: the graph would keep
    # them as constants; and fake tensors have no values, also once their mode has exited
    # (the reference ran in both, the second giving uninitialised memory; the final review)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with pytest.raises(BackendUnsupported, match=r"cannot run on fake tensors, nor while"):
        make_fx(lambda a, b: mmfuse.zoom_shift(a, b, backend="reference"), tracing_mode="real")(x, g)
    mode = FakeTensorMode()
    fx, fg = mode.from_tensor(x), mode.from_tensor(g)
    with pytest.raises(BackendUnsupported, match=r"cannot run on fake tensors, nor while"):
        mmfuse.zoom_shift(fx, fg, backend="reference")


def test_masked_alignment_on_fake_tensors_and_under_non_strict_export():
    """A fake mask has no values, as a meta one has none: the all-masked check read them
    (DataDependentOutputException under FakeTensorMode; GuardOnDataDependentSymNode in a
    non-strict torch.export), where the same calls without a mask, and the layers, ran (a
    review's find).  Such masks skip the check now, as meta ones do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    x, g = torch.randn(4, 6, 3, generator=gen), torch.randn(4, 7, 3, generator=gen)
    m = torch.rand(4, 6, generator=gen) > 0.3
    m[:, 0] = True
    with FakeTensorMode() as mode:
        fx, fg, fm = mode.from_tensor(x), mode.from_tensor(g), mode.from_tensor(m)
        assert tuple(mmfuse.zoom_shift(fx, fg, mask=fm).shape) == (4, 6, 3)
        assert tuple(mmfuse.moments(fx, mask=fm)[1].shape) == (4, 1, 3)
        assert [tuple(y.shape) for y in mmfuse.align([fx, fg], masks=[fm, None])] == [(4, 6, 3), (4, 7, 3)]

    class Aligned(torch.nn.Module):
        def forward(self, x, g, m):
            return mmfuse.zoom_shift(x, g, mask=m)

    exported = torch.export.export(Aligned(), (x, g, m), strict=False)
    assert_close(exported.module()(x, g, m), mmfuse.zoom_shift(x, g, mask=m), rtol=1e-6)


def test_calls_inside_torch_func_transforms_of_plain_and_wrapped_tensors():
    """Inside vmap / grad, a call on plain tensors (constants, captured leaves) ran the custom
    op's autograd.Function or the CPU kernels, which fail there ("must override the
    setup_context staticmethod"; batched tensors have no data pointer), and its plan then
    served the transformed tensors of the same shape; now every call inside a transform takes
    the transform-safe rows and none is planned."""
    c, g = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)

    def shifted(x):
        mmfuse.zoom_shift(c, g)
        return mmfuse.zoom_shift(x, g)

    xb = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    got = torch.func.vmap(shifted)(xb)
    for i in range(2):
        assert_close(got[i], mmfuse.zoom_shift(xb[i], g), rtol=1e-12)
    p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=5, seed=0, xp=torch, dtype=torch.float64)
    leaf = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)

    def loss(x):
        mmfuse.lowrank_fusion([leaf, y], **p)
        mmfuse.align([leaf[:, None, :].expand(4, 2, 3), x[:, None, :].expand(4, 3, 3) * y[:, :1, None]], rounds=1)
        return mmfuse.lowrank_fusion([x, y], **p).sum()

    x = torch.randn(4, 3, dtype=torch.float64)
    got = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(mmfuse.lowrank_fusion([xr, y], **p).sum(), [xr])
    assert_close(got, want, rtol=1e-12)


def test_a_signature_planned_outside_a_transform_is_not_used_inside_one():
    """The per-sample shape planned on plain tensors first, then the same shape inside
    vmap: the transform's call is not planned (the plan's NumPy path would read batched
    tensors' memory: "Cannot access data pointer"; a mutation review's find)."""
    x, g = torch.randn(2, 4, 6, 3, dtype=torch.float64), torch.randn(2, 4, 5, 3, dtype=torch.float64)
    mmfuse.zoom_shift(x[0], g[0])
    mmfuse.align([x[0], g[0]], rounds=1)
    got = torch.func.vmap(lambda a, b: mmfuse.zoom_shift(a, b))(x, g)
    aligned = torch.func.vmap(lambda a, b: mmfuse.align([a, b], rounds=1)[0])(x, g)
    for i in range(2):
        assert_close(got[i], ref.zoom_shift(x[i].numpy(), g[i].numpy()), rtol=1e-12)
        assert_close(aligned[i], ref.align([x[i].numpy(), g[i].numpy()], rounds=1)[0], rtol=1e-12)


# torch's forward-AD decompositions are TorchScript, which warns on first use (torch >= 2.11)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_signature_planned_without_forward_ad_is_not_used_with_it():
    """A plain call planned first, then the same signature with a dual tensor: the tangent
    is that of an unplanned call (the forward-AD level in the key; without it the plan's
    NumPy path dropped the tangent silently; a mutation review's find)."""
    import torch.autograd.forward_ad as fwad

    x, g = torch.randn(3, 6, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    t = torch.randn_like(x)
    mmfuse.zoom_shift(x, g)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(mmfuse.zoom_shift(fwad.make_dual(x, t), g)).tangent
        want = fwad.unpack_dual(mmfuse.zoom_shift(fwad.make_dual(x, t), g, backend="array_api")).tangent
    assert tangent is not None
    assert_close(tangent, want, rtol=1e-10)


def test_a_plan_made_while_another_thread_moved_forward_ad_is_not_kept(rng, monkeypatch):
    """torch's forward-AD level is per process: another thread entering dual_level between a
    call's key (level on) and its choice (level off), or the reverse, made a plan under the
    other state.  Simulated by a choice that leaves or enters a level: the plan runs once and
    is not kept, and the next dual call of the signature gets its tangent (a concurrency
    review's find: filed under the key, the plan had dropped the tangents of later dual
    calls)."""
    import torch.autograd.forward_ad as fwad

    x, g = torch.randn(3, 6, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    t = torch.randn_like(x)
    choose = mmfuse._align.choose
    with fwad.dual_level():  # the level a plain call of this signature could not see is key
        want = fwad.unpack_dual(mmfuse.zoom_shift(fwad.make_dual(x, t), g, backend="array_api")).tangent
    mmfuse._align._ZOOM_SHIFT_PLANS.clear()

    def choose_after_the_level_closed(*args, **kwargs):  # "another thread" leaves the level
        fwad.exit_dual_level(level=0)
        return choose(*args, **kwargs)

    monkeypatch.setattr(mmfuse._align, "choose", choose_after_the_level_closed)
    fwad.enter_dual_level()  # the key sees a level (the plain call's choice does not)
    mmfuse.zoom_shift(x, g)
    monkeypatch.setattr(mmfuse._align, "choose", choose)
    assert len(mmfuse._align._ZOOM_SHIFT_PLANS) == 0
    with fwad.dual_level():
        tangent = fwad.unpack_dual(mmfuse.zoom_shift(fwad.make_dual(x, t), g)).tangent
    assert tangent is not None
    assert_close(tangent, want, rtol=1e-10)
    # and the unit: a key formed under one level, remembered under another, is not kept
    cache = _plan.PlanCache()
    key = _plan.call_key(None, (), [x])
    with fwad.dual_level():
        assert cache.remember(key, "plan") == "plan"
        inside = _plan.call_key(None, (), [x])
    assert len(cache) == 0
    cache.remember(inside, "plan")
    assert len(cache) == 0
    cache.remember(key, "plan")
    assert len(cache) == 1


def test_a_signature_planned_on_the_cpu_is_not_used_on_meta():
    """The same shapes and dtypes on the CPU, then on the meta device: the device is in the
    key, so the meta call is planned apart and gives meta outputs (the CPU plan's NumPy path
    cannot read them; a mutation review's find)."""
    x, g = torch.randn(3, 6, 2), torch.randn(3, 5, 2)
    mmfuse.zoom_shift(x, g)
    mmfuse.align([x, g], rounds=1)
    y = mmfuse.zoom_shift(x.to("meta"), g.to("meta"))
    assert y.device.type == "meta" and y.shape == x.shape
    assert all(a.device.type == "meta" for a in mmfuse.align([x.to("meta"), g.to("meta")], rounds=1))


def test_a_planned_torch_call_checks_what_its_signature_does_not_fix(rng):
    """The torch backend plans its own calls (``planned_impl``): the NumPy path on the
    tensors' memory is chosen once per signature, and the layout, which a signature does not
    hold, is still checked per call: a tensor with the negative bit (``numpy()`` refuses it)
    or strided, of a planned signature, gets the values of a fresh copy."""
    x, g = torch.tensor(rng.standard_normal((3, 5, 4))), torch.tensor(3.0 + rng.standard_normal((3, 6, 4)))
    mmfuse.zoom_shift(x, g)
    mmfuse.align([x, g], rounds=1)
    for odd in (torch._neg_view(x), x.transpose(0, 1).contiguous().transpose(0, 1)):
        assert not odd.is_contiguous() or odd.is_neg()
        plain = odd.clone().contiguous().resolve_neg()
        assert_close(mmfuse.zoom_shift(odd, g), ref.zoom_shift(plain.numpy(), g.numpy()), rtol=1e-12)
        for got, want in zip(mmfuse.align([odd, g], rounds=1), ref.align([plain.numpy(), g.numpy()], rounds=1)):
            assert_close(got, want, rtol=1e-12)


def test_a_planned_torch_call_records_autograd_when_its_signature_does(rng):
    """The same tensors planned without autograd (grad mode off) and then with it: the second
    signature's plan differentiates (the NumPy path alone would not)."""
    x = torch.tensor(rng.standard_normal((3, 5, 4)), requires_grad=True)
    g = torch.tensor(rng.standard_normal((3, 6, 4)))
    with torch.no_grad():
        assert mmfuse.zoom_shift(x, g).grad_fn is None
        assert all(y.grad_fn is None for y in mmfuse.align([x, g], rounds=1))
    mmfuse.zoom_shift(x, g).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    x.grad = None
    sum(y.sum() for y in mmfuse.align([x, g], rounds=1)).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("batch", [2, 200])
def test_planned_wander_calls_take_the_path_of_an_unplanned_one(rng, batch):
    """The torch backend's ``wander`` plans its path (stacked, core, custom ops by batch size
    and shapes) once per signature; planned and unplanned calls give the same values and
    gradients, stackable or not."""
    import importlib

    backend = importlib.import_module("mmfuse.backends.torch.wander")
    for lengths in ([4, 4], [4, 3]):
        p = mmfuse.init_wander([5, 5], lengths, rank=3, feature_rank=2, token_rank=2, out_dim=5,
                               seed=int(rng.integers(1 << 30)))  # fmt: skip
        params = {k: [tuple(torch.tensor(a) for a in v) if isinstance(v, tuple) else torch.tensor(v)
                      for v in p[k]] for k in p}  # fmt: skip
        xs = [torch.tensor(rng.standard_normal((batch, t, 5)), requires_grad=True) for t in lengths]
        for _ in range(2):  # planned on the first call, run from the plan on the second
            got = mmfuse.wander(xs, params, mode="collapsed")
            (gx,) = torch.autograd.grad(got.sum(), [xs[0]])
            want = backend.wander(xs, params, mode="collapsed")
            (wx,) = torch.autograd.grad(want.sum(), [xs[0]])
            assert_close(got, want, rtol=1e-12)
            assert_close(gx, wx, rtol=1e-12)


def test_the_per_type_caches_stay_bounded():
    """The types seen by the plan keys and by array_namespace are remembered, but not without
    bound: classes made on the fly (a subclass per call) piled up and were kept alive for
    good (a review of the plan state)."""
    from mmfuse import _namespace, _plan

    x = np.random.default_rng().standard_normal((2, 4, 3))
    for k in range(600):
        kind = type(f"Sub{k}", (np.ndarray,), {})
        mmfuse.moments(x.view(kind))
    assert len(_plan._TORCH_TYPES) <= 256
    assert len(_namespace._BY_TYPE) <= 256
