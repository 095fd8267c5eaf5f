"""Every functional op on Dask (lazy, chunked along the batch) and JAX (eager, jit, grad).

Each case says which arrays are batched (chunked along axis 0 on Dask; differentiated under
``jax.grad``) and how to call the op given converters for batched and parameter arrays.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mmfuse
import mmfuse.reference as ref
from mmfuse.testing import assert_close

CHUNK = 7  # batch rows per Dask chunk: odd, so chunks are uneven


def _fusion_problem(rng, dims=(3, 4, 2), rank=3, out_dim=5, batch=23):
    xs = [rng.standard_normal((batch, d)) for d in dims]
    p = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng)
    p["weights"] = rng.standard_normal(rank)
    p["bias"] = rng.standard_normal(out_dim)
    return xs, p


def case_tensor_fusion(rng):
    xs, p = _fusion_problem(rng)
    weight = ref.lowrank_to_tensor(p["factors"], p["weights"]) + 0.1
    want = ref.tensor_fusion(xs, weight, p["bias"])

    def call(batched, P):
        return mmfuse.tensor_fusion(batched, P(weight), P(p["bias"]))

    return xs, call, lambda b: ref.tensor_fusion(b, weight, p["bias"]), want


def case_lowrank_fusion(rng):
    xs, p = _fusion_problem(rng)
    present = rng.random((xs[0].shape[0], len(xs))) < 0.7
    want = ref.lowrank_fusion(xs, **p, present=present)

    def call(batched, P):
        return mmfuse.lowrank_fusion(
            batched,
            [P(f) for f in p["factors"]],
            P(p["weights"]),
            P(p["bias"]),
            present=P(present, batch=True),
        )

    return xs, call, lambda b: ref.lowrank_fusion(b, **p, present=present), want


def case_cp_fusion(rng):
    xs, p = _fusion_problem(rng)
    cp = (
        p["weights"],
        [rng.standard_normal((x.shape[1] + 1, 3)) for x in xs] + [rng.standard_normal((5, 3))],
    )
    want = ref.cp_fusion(xs, cp, p["bias"])

    def call(batched, P):
        return mmfuse.cp_fusion(batched, (P(cp[0]), [P(f) for f in cp[1]]), P(p["bias"]))

    return xs, call, lambda b: ref.cp_fusion(b, cp, p["bias"]), want


def _sequence_problem(rng, batch=9):
    lengths, ranks = (4, 6, 5), (3, 2, 4)
    hs = [rng.standard_normal((batch, t, r)) for t, r in zip(lengths, ranks)]
    feature = [rng.standard_normal((2, r, 5)) for r in ranks]
    token = [rng.standard_normal((3, t, 3)) for t in lengths]
    masks = [rng.random((batch, t)) < 0.8 for t in lengths]
    return hs, feature, token, masks


def case_sequence_fusion(rng):
    hs, feature, token, masks = _sequence_problem(rng)
    n = len(hs)

    def call(batched, P):
        return mmfuse.sequence_fusion(
            batched[:n],
            [P(f) for f in feature],
            [P(t) for t in token],
            masks=[P(m, batch=True) for m in masks],
        )

    def reference(b):
        return ref.sequence_fusion(b[:n], feature, token, masks=masks)

    return hs, call, reference, reference(hs)


def case_sequence_fusion_collapsed(rng):
    hs, feature, token, _ = _sequence_problem(rng)

    def call(batched, P):
        return mmfuse.sequence_fusion(
            batched, [P(f) for f in feature], [P(t) for t in token], mode="collapsed"
        )

    def reference(b):
        return ref.sequence_fusion(b, feature, token, mode="collapsed")

    return hs, call, reference, reference(hs)


def case_wander(rng):
    lengths, dim = (4, 6, 5), 5
    xs = [rng.standard_normal((9, t, dim)) for t in lengths]
    params = mmfuse.init_wander(
        [dim] * 3, lengths, rank=3, feature_rank=2, token_rank=2, out_dim=dim, seed=rng
    )

    def convert(P):
        return {
            "down": [(P(w), P(b)) for w, b in params["down"]],
            "feature": [P(f) for f in params["feature"]],
            "token": [P(t) for t in params["token"]],
        }

    def call(batched, P):
        return mmfuse.wander(batched, convert(P))

    def reference(b):
        return ref.wander(b, params)

    return xs, call, reference, reference(xs)


def _stat_inputs(rng, tokens=(6, 4, 5), batch=9, channels=3):
    return [
        rng.standard_normal((batch, t, channels)) * rng.uniform(0.5, 3, channels)
        + rng.standard_normal(channels)
        for t in tokens
    ]


def case_moments(rng):
    (x,) = _stat_inputs(rng, tokens=(6,))
    mask = rng.random((9, 6)) < 0.8
    mask[:, 0] = True

    def call(batched, P):
        mean, std = mmfuse.moments(batched[0], mask=P(mask, batch=True))
        return mean + 10 * std  # one array carrying both outputs

    def reference(b):
        mean, std = ref.moments(b[0], mask=mask)
        return mean + 10 * std

    return [x], call, reference, reference([x])


def case_zoom_shift(rng):
    x, guide = _stat_inputs(rng, tokens=(6, 4))

    def call(batched, P):
        return mmfuse.zoom_shift(batched[0], batched[1], alpha=0.7)

    def reference(b):
        return ref.zoom_shift(b[0], b[1], alpha=0.7)

    return [x, guide], call, reference, reference([x, guide])


def _joined(out):
    """The aligned modalities as one array (concatenated along tokens), in their namespace."""
    from array_api_compat import array_namespace

    return array_namespace(out[0]).concat(out, axis=1)


def case_align(rng):
    xs = _stat_inputs(rng)

    def call(batched, P):
        return _joined(mmfuse.align(batched, rounds=3, alpha=0.6))

    def reference(b):
        return np.concatenate(ref.align(b, rounds=3, alpha=0.6), axis=1)

    return xs, call, reference, reference(xs)


def case_align_limit(rng):
    xs = _stat_inputs(rng, tokens=(6, 6, 6))

    def call(batched, P):
        return _joined(mmfuse.align(batched, rounds=None, alpha=0.5, topology="hub", hub=1))

    def reference(b):
        return np.concatenate(ref.align(b, rounds=None, alpha=0.5, topology="hub", hub=1), axis=1)

    return xs, call, reference, reference(xs)


def case_zoom_shift_fusion(rng):
    xs = _stat_inputs(rng)

    def call(batched, P):
        return mmfuse.zoom_shift_fusion(batched, fuse="concat", alpha=0.5, rounds=2)

    def reference(b):
        return ref.zoom_shift_fusion(b, fuse="concat", alpha=0.5, rounds=2)

    return xs, call, reference, reference(xs)


CASES = {
    "tensor_fusion": case_tensor_fusion,
    "lowrank_fusion": case_lowrank_fusion,
    "cp_fusion": case_cp_fusion,
    "sequence_fusion": case_sequence_fusion,
    "sequence_fusion_collapsed": case_sequence_fusion_collapsed,
    "wander": case_wander,
    "moments": case_moments,
    "zoom_shift": case_zoom_shift,
    "align": case_align,
    "align_limit": case_align_limit,
    "zoom_shift_fusion": case_zoom_shift_fusion,
}


# --------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def dask_array():
    return pytest.importorskip("dask.array")


def _dask_converters(da):
    def batch(a):
        return da.from_array(np.asarray(a), chunks=(CHUNK, *np.shape(a)[1:]))

    def param(a, batch=False):
        if batch:
            return da.from_array(np.asarray(a), chunks=(CHUNK, *np.shape(a)[1:]))
        return da.from_array(np.asarray(a), chunks=np.shape(a))

    return batch, param


class _ComputeCounter:
    """Counts tasks Dask executes (graph construction must execute none)."""

    def __init__(self):
        from dask.callbacks import Callback

        counter = self

        class _CB(Callback):
            def _pretask(self, key, dask, state):
                counter.tasks += 1

        self.tasks = 0
        self.callback = _CB()


@pytest.mark.parametrize("op", CASES)
def test_dask_lazy_chunked_and_equal(dask_array, op, rng):
    da = dask_array
    xs, call, _, want = CASES[op](rng)
    batch, param = _dask_converters(da)
    counter = _ComputeCounter()
    with counter.callback:
        out = call([batch(x) for x in xs], param)
    assert counter.tasks == 0, "building the graph computed something"
    assert isinstance(out, da.Array)
    assert out.chunks[0] == batch(xs[0]).chunks[0], "result must be chunked like the inputs"
    assert_close(out.compute(), want)


@pytest.mark.parametrize("op", CASES)
def test_dask_float32_results_declare_float32(dask_array, op, rng):
    """A lazy result's dtype is what it computes to: a float32 call declares float32 before
    computing (the per-chunk paths pass the dtype to Dask themselves, where a float64 there
    went unnoticed by every float64 test; a mutation review's find)."""
    da = dask_array
    xs, call, _, want = CASES[op](rng)
    batch, param = _dask_converters(da)

    def narrow(a):
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype == np.float64 else a

    out = call([batch(narrow(x)) for x in xs], lambda a, **kw: param(narrow(a), **kw))
    assert out.dtype == np.float32
    got = out.compute()
    assert got.dtype == np.float32
    assert_close(got, want)


@pytest.mark.parametrize("op", CASES)
def test_dask_batch_chunk_with_no_samples(dask_array, op, rng):
    """A batch chunk with no samples, as boolean filtering and ``compute_chunk_sizes()`` leave:
    Dask's own max failed on compute there ("could not broadcast input array from shape (1,0)"),
    in zoom_shift_fusion's max pooling (its B = 0 special case covered a whole empty batch)."""
    da = dask_array
    xs, call, _, want = CASES[op](rng)
    _, param = _dask_converters(da)
    cut = xs[0].shape[0] // 2

    def batch(a):
        return da.from_array(np.asarray(a), chunks=((cut, 0, a.shape[0] - cut), *np.shape(a)[1:]))

    out = call([batch(x) for x in xs], param)
    assert_close(out.compute(), want)


def test_dask_max_over_a_token_chunk_of_size_zero(dask_array):
    """A chunk empty along the reduced axis gives max's identity, -inf, not Dask's error nor 0:
    max pooling over all-negative tokens chunked (3, 0, 2), and interaction_shares (the
    largest |term|) of terms with an empty chunk, give NumPy's values (a mutation review)."""
    da = dask_array
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    seqs = [-np.abs(rng.standard_normal((2, 5, 3))) - 1.0 for _ in range(2)]
    lazy = [da.from_array(x, chunks=((1, 1), (3, 0, 2), (3,))) for x in seqs]
    want = mmfuse.zoom_shift_fusion(seqs, pool="max", rounds=0)
    assert np.all(want < -1.0)
    assert_close(mmfuse.zoom_shift_fusion(lazy, pool="max", rounds=0).compute(), want)
    terms = rng.standard_normal((3, 5, 4))
    chunked = da.from_array(terms, chunks=((3,), (2, 0, 3), (4,)))
    assert_close(mmfuse.interaction_shares(chunked).compute(), mmfuse.interaction_shares(terms))


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_dask_sequence_parameters_in_several_chunks(dask_array, mode, rng):
    """Feature and token factors (and down-projections) in several chunks: the output's
    batch chunks fragmented to one sample each (many more tasks, a PerformanceWarning) and an
    empty batch failed in Dask's reshape.  The parameters are taken in one chunk each now."""
    da = dask_array
    feat = [rng.standard_normal(s) for s in ((2, 3, 5), (2, 2, 5))]
    tok = [rng.standard_normal(s) for s in ((3, 4, 3), (3, 6, 3))]
    hs = [rng.standard_normal(s) for s in ((9, 4, 3), (9, 6, 2))]
    dfeat = [da.from_array(f, chunks=(1, 1, 5)) for f in feat]
    dtok = [da.from_array(t, chunks=(1, 2, 3)) for t in tok]
    dhs = [da.from_array(h, chunks=(3, -1, -1)) for h in hs]
    y = mmfuse.sequence_fusion(dhs, dfeat, dtok, mode=mode)
    assert y.chunks == ((3, 3, 3), (3,), (5,))
    assert_close(y, ref.sequence_fusion(hs, feat, tok, mode=mode))
    # the graph grows by the parameters' chunks (their pieces, joined once), not by their
    # combinations: collapsed mode's contractions over chunked ranks had given 216 tasks
    # against 76 (a mutation review)
    whole = mmfuse.sequence_fusion(dhs, [da.from_array(f) for f in feat], [da.from_array(t) for t in tok], mode=mode)
    pieces = sum(a.npartitions for a in dfeat + dtok)
    assert len(y.__dask_graph__()) <= len(whole.__dask_graph__()) + pieces
    # inputs chunked along their tokens and widths: one task per batch chunk still, without
    # Dask's "Increasing number of chunks" (an error under warnings-as-errors)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine = mmfuse.sequence_fusion([da.from_array(h, chunks=(3, 1, 1)) for h in hs], dfeat, dtok, mode=mode)
    assert fine.chunks == y.chunks
    assert_close(fine, ref.sequence_fusion(hs, feat, tok, mode=mode))
    empty = mmfuse.sequence_fusion([da.zeros((0, 4, 3)), da.zeros((0, 6, 2))], dfeat, dtok, mode=mode)
    assert empty.compute().shape == (0, 3, 5)
    # wander: the down-projections chunked too
    p = mmfuse.init_wander([5, 5], [4, 6], rank=3, feature_rank=2, token_rank=3, out_dim=5, seed=rng)
    xs = [rng.standard_normal((9, t, 5)) for t in (4, 6)]
    dp = {
        "down": [tuple(da.from_array(a, chunks=2) for a in pair) for pair in p["down"]],
        "feature": [da.from_array(f, chunks=1) for f in p["feature"]],
        "token": [da.from_array(t, chunks=1) for t in p["token"]],
    }
    dxs = [da.from_array(x, chunks=(3, -1, -1)) for x in xs]
    w = mmfuse.wander(dxs, dp, mode=mode)
    assert w.chunks == ((3, 3, 3), (3,), (5,))
    assert_close(w, ref.wander(xs, p, mode=mode))
    whole = mmfuse.wander(dxs, {k: [tuple(map(da.from_array, a)) if k == "down" else da.from_array(a) for a in v]
                                for k, v in p.items()}, mode=mode)  # fmt: skip
    pieces = sum(a.npartitions for v in dp.values() for entry in v for a in (entry if isinstance(entry, tuple) else [entry]))
    assert len(w.__dask_graph__()) <= len(whole.__dask_graph__()) + pieces


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_dask_empty_batch_with_chunked_tokens(dask_array, mode, rng):
    """An empty batch whose token or width axis is in several chunks: the fusion's (B T, r)
    reshape failed in Dask's rechunking ("reduce() of empty iterable"); the broadcast matmul
    keeps the chunks."""
    da = dask_array
    feat = [da.from_array(rng.standard_normal((2, 2, 4)))] * 2
    tok = [da.from_array(rng.standard_normal((3, 3, 2)))] * 2
    h = da.zeros((0, 3, 2), chunks=(1, 3, 1))
    assert mmfuse.sequence_fusion([h, h], feat, tok, mode=mode).compute().shape == (0, 2, 4)
    p = mmfuse.init_wander([4, 4], [3, 3], rank=2, feature_rank=2, token_rank=2, out_dim=4, seed=rng)
    dp = {
        "down": [tuple(da.from_array(a) for a in pair) for pair in p["down"]],
        "feature": [da.from_array(f) for f in p["feature"]],
        "token": [da.from_array(t) for t in p["token"]],
    }
    x = da.zeros((0, 3, 4), chunks=(1, 2, 2))
    assert mmfuse.wander([x, x], dp, mode=mode).compute().shape == (0, 2, 4)


@pytest.mark.parametrize(("schedule", "topology"), [("gauss-seidel", "consensus"), ("jacobi", "hub")])
def test_dask_align_rounds_run_per_chunk(dask_array, schedule, topology, rng):
    """The rounds act on the statistics alone and run per chunk: the graph does not grow
    with them.  Written in Dask's calls they added about 86 tasks a round, and computing one
    output alone failed with RecursionError from about 28 rounds.  Modalities chunked
    differently along the batch, masks, float16 (float32 statistics): NumPy's values (to
    float16's tolerance: under "auto" NumPy's call may take numba's kernels)."""
    da = dask_array
    xs = [(rng.standard_normal((11, t, 4)) * 2 + 1).astype(np.float16) for t in (5, 3, 6)]
    masks = [rng.random((11, t)) < 0.7 for t in (5, 3, 6)]
    for m in masks:
        m[:, 0] = True
    kw = {"alpha": 0.6, "schedule": schedule, "topology": topology, "hub": 2, "masks": masks}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del kw["hub"]
    dxs = [da.from_array(x, chunks=(c, -1, 2)) for x, c in zip(xs, (4, 3, 11))]
    dmasks = [da.from_array(m, chunks=(5, -1)) for m in masks]
    few = mmfuse.align(dxs, rounds=2, **{**kw, "masks": dmasks})
    many = mmfuse.align(dxs, rounds=60, **{**kw, "masks": dmasks})
    assert len(many[0].__dask_graph__()) == len(few[0].__dask_graph__())
    want = mmfuse.align(xs, rounds=60, **kw)
    for got, w in zip(many, want):
        assert got.dtype == w.dtype
        assert_close(got.compute(), w)


@pytest.mark.parametrize("op", CASES)
def test_dask_chunks_of_unknown_size_are_refused_by_name(dask_array, op, rng):
    """Boolean indexing leaves chunks of unknown (NaN) size; sizes are checked against each
    other, which NaN cannot answer ("batch size nan but nan" before): a ValueError naming the
    argument and the remedy, and the same call runs once the sizes are computed."""
    da = dask_array
    xs, call, _, want = CASES[op](rng)
    batch, param = _dask_converters(da)
    keep = da.from_array(np.ones(xs[0].shape[0], dtype=bool), chunks=CHUNK)
    unknown = [batch(x)[keep] for x in xs]
    assert np.isnan(unknown[0].shape[0])
    with pytest.raises(
        ValueError, match=r"has a size of unknown value along axis 0 \(shape \(nan, .*call its \.compute_chunk_sizes\(\)"
    ):
        call(unknown, param)
    known = [u.compute_chunk_sizes() for u in unknown]
    assert_close(call(known, param).compute(), want)


def test_dask_parameters_of_unknown_size_are_refused_by_name(dask_array, rng):
    """Parameters with chunks of unknown size met their shape checks first: "factors[0] has
    rank nan ... but factors[0] has rank nan", "cp weights must have shape (R,) = (2,), got
    (nan,)"; each is refused as an input is, by name, with the remedy."""
    da = dask_array

    def unknown(a):
        return da.from_array(a, chunks=1)[da.from_array(np.ones(a.shape[0], bool), chunks=1)]

    xs = [da.from_array(rng.standard_normal((5, 3)))]
    calls = [
        ("factors[0]", lambda: mmfuse.lowrank_fusion(xs, [unknown(rng.standard_normal((2, 4, 6)))])),
        ("cp weights", lambda: mmfuse.cp_fusion(xs, (unknown(np.ones(2)), [da.ones((4, 2)), da.ones((6, 2))]))),
        ("feature_factors[0]", lambda: mmfuse.sequence_fusion(
            [da.ones((5, 4, 3))], [unknown(np.ones((2, 3, 5)))], [da.ones((2, 4, 2))])),
    ]  # fmt: skip
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^{re.escape(name)} has a size of unknown value along axis 0"):
            call()


# --------------------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def jax_x64():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    yield jax


def _jax_param(jnp):
    def param(a, batch=False):
        return jnp.asarray(np.asarray(a))

    return param


@pytest.mark.parametrize("op", CASES)
def test_jax_eager_and_jit(jax_x64, op, rng):
    jax = jax_x64
    jnp = jax.numpy
    xs, call, _, want = CASES[op](rng)
    P = _jax_param(jnp)
    jxs = [jnp.asarray(x) for x in xs]
    eager = call(jxs, P)
    assert isinstance(eager, jax.Array) and eager.dtype == jnp.float64
    assert_close(eager, want)
    jitted = jax.jit(lambda b: call(b, P))(jxs)
    assert_close(jitted, want)


@pytest.mark.parametrize("op", CASES)
def test_jax_grad_matches_reference_directional_derivative(jax_x64, op, rng):
    """<grad of sum(out * U), V> equals the central difference of the float64 reference."""
    jax = jax_x64
    jnp = jax.numpy
    xs, call, reference, want = CASES[op](rng)
    P = _jax_param(jnp)
    upstream = rng.standard_normal(want.shape)
    grads = jax.grad(lambda b: jnp.sum(call(b, P) * upstream))([jnp.asarray(x) for x in xs])
    directions = [rng.standard_normal(x.shape) for x in xs]
    analytic = sum(float(np.sum(np.asarray(g) * v)) for g, v in zip(grads, directions))
    eps = 1e-6

    def loss(sign):
        return float(np.sum(reference([x + sign * eps * v for x, v in zip(xs, directions)]) * upstream))

    numeric = (loss(1) - loss(-1)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


@pytest.mark.parametrize(("schedule", "topology"), [("gauss-seidel", "consensus"), ("jacobi", "hub")])
def test_jax_jit_align_program_does_not_grow_with_rounds(jax_x64, schedule, topology, rng):
    """Under ``jit`` the middle rounds are one loop: unrolled, compiling 50 rounds took 26 s
    (the program grew with every round).  Values and gradients as NumPy's and the reference's;
    eager ``grad`` keeps the unrolled rounds (a loop would be compiled on every call)."""
    jax = jax_x64
    jnp = jax.numpy
    xs = [rng.standard_normal((5, t, 3)) * 2 + 1 for t in (4, 6, 3)]
    kw = {"alpha": 0.7, "schedule": schedule, "topology": topology, "hub": 1}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del kw["hub"]

    def program(rounds):
        return jax.make_jaxpr(lambda b: mmfuse.align(b, rounds=rounds, **kw))([jnp.asarray(x) for x in xs])

    assert len(program(60).eqns) == len(program(5).eqns)
    got = jax.jit(lambda b: mmfuse.align(b, rounds=60, **kw))([jnp.asarray(x) for x in xs])
    for g, w in zip(got, mmfuse.align(xs, rounds=60, **kw)):
        assert_close(g, w)
    upstream = [rng.standard_normal(x.shape) for x in xs]

    def loss(b):
        return sum(jnp.sum(o * u) for o, u in zip(mmfuse.align(b, rounds=7, **kw), upstream))

    staged = jax.jit(jax.grad(loss))([jnp.asarray(x) for x in xs])
    eager = jax.grad(loss)([jnp.asarray(x) for x in xs])
    for a, b in zip(staged, eager):
        assert_close(a, b)
    directions = [rng.standard_normal(x.shape) for x in xs]
    analytic = sum(float(np.sum(np.asarray(g) * v)) for g, v in zip(staged, directions))

    def ref_loss(sign):
        moved = [x + sign * 1e-6 * v for x, v in zip(xs, directions)]
        return float(sum(np.sum(o * u) for o, u in zip(ref.align(moved, rounds=7, **kw), upstream)))

    numeric = (ref_loss(1) - ref_loss(-1)) / 2e-6
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_jax_eager_vmap_of_align_compiles_once(jax_x64, rng):
    """Eager ``vmap`` of ``align`` with more than two rounds took the staged loop (its batch
    tracers carry no value), whose body, a new closure each call, was compiled again on every
    call (2 compiles, 300 ms, against 16 ms; a review's find).  Eager transforms' tracers wrap
    concrete arrays: the rounds run as Python steps there; under ``jit(vmap)`` as one loop."""
    import logging

    jax = jax_x64
    jnp = jax.numpy
    a = jnp.asarray(rng.standard_normal((3, 2, 6, 4)))
    b = jnp.asarray(rng.standard_normal((3, 2, 5, 4)))

    def aligned(x, y):
        return mmfuse.align([x, y], rounds=6, alpha=0.5)

    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            compiles.append(record.getMessage())

    handler, logger = Count(level=logging.WARNING), logging.getLogger("jax")
    jax.vmap(aligned)(a, b)  # (the first call compiles each operation once)
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(handler)
    try:
        got = jax.vmap(aligned)(a, b)
    finally:
        logger.removeHandler(handler)
        jax.config.update("jax_log_compiles", False)
    assert not [m for m in compiles if "ompil" in m], compiles
    staged = jax.jit(jax.vmap(aligned))(a, b)
    for i in range(3):
        want = ref.align([np.asarray(a[i]), np.asarray(b[i])], rounds=6, alpha=0.5)
        for g, s, w in zip(got, staged, want):
            assert_close(g[i], w)
            assert_close(s[i], w)


@pytest.mark.parametrize("rounds", [1, None])
def test_jax_jit_keeps_a_constant_lane_without_spread(jax_x64, rounds, rng):
    """A channel constant over the tokens has no spread; under jax.jit XLA fused the
    variance's d * d - corr * corr into an FMA, which left 1e-49 where the eager call has 0,
    and align's gradient on that lane took the spread branch: 1e12 where eager gave 0.8 (a
    review's find).  jit and eager now agree, values and gradients."""
    jax = jax_x64
    jnp = jax.numpy
    x = rng.standard_normal((3, 5, 3))
    x[:, :, 1] = 0.3
    g = 1.0 + 2.0 * rng.standard_normal((3, 4, 3))
    weights = [rng.standard_normal((3, 5, 3)), rng.standard_normal((3, 4, 3))]

    def loss(a, b):
        ys = mmfuse.align([a, b], rounds=rounds, alpha=0.5)
        return sum(jnp.sum(y * w) for y, w in zip(ys, weights))

    eager = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(g))
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(g))
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-9, atol=1e-12)
    _, sigma = jax.jit(lambda a: mmfuse.moments(a, eps=0.0))(jnp.asarray(x))
    assert np.all(np.asarray(sigma)[:, 0, 1] == 0.0)


def test_a_refusal_of_traced_jax_arrays_names_no_device(jax_x64, rng):
    """A JAX tracer has no device: the refusal said "jax.numpy arrays on device None" (a
    review's find); it names the arrays and the reason."""
    jax, jnp = jax_x64, jax_x64.numpy
    x = jnp.asarray(rng.standard_normal((2, 4, 3)))
    with pytest.raises(mmfuse.backends.BackendUnsupported, match=r"^backend 'reference' cannot take jax\.numpy arrays for moments: ") as exc:
        jax.jit(lambda a: mmfuse.moments(a, backend="reference")[0])(x)
    assert "device None" not in str(exc.value)


def test_mixed_namespace_messages_name_jax_and_dask(rng):
    """JAX arrays are named jax.numpy (they were called "numpy", beside real NumPy arrays)."""
    jnp = pytest.importorskip("jax.numpy")
    da = pytest.importorskip("dask.array")
    x = rng.standard_normal((2, 3, 2))
    with pytest.raises(TypeError, match=r"mixed array namespaces: x is jax\.numpy but guide is numpy;"):
        mmfuse.zoom_shift(jnp.asarray(x), x)
    with pytest.raises(TypeError, match=r"mixed array namespaces: x is dask\.array but guide is jax\.numpy;"):
        mmfuse.zoom_shift(da.from_array(x), jnp.asarray(x))


def test_jax_weakly_typed_scale_and_offset_take_xs_dtype(jax_x64, rng):
    """Under jax.jit a Python float arrives as a weakly typed float64 0-d array; like the float
    it stands for it takes x's dtype (it was refused: "offset has dtype float64 but x has
    float32").  A strongly typed float64 array is still refused."""
    jax, jnp = jax_x64, jax_x64.numpy
    x = jnp.asarray(rng.standard_normal((2, 3, 4)), dtype=jnp.float32)
    shifted = jax.jit(lambda x, s: mmfuse.shift(x, s))(x, 0.5)
    zoomed = jax.jit(lambda x, s, c: mmfuse.zoom(x, s, center=c))(x, 2.0, 0.25)
    assert shifted.dtype == zoomed.dtype == jnp.float32
    assert_close(shifted, mmfuse.shift(x, 0.5))
    assert_close(zoomed, mmfuse.zoom(x, 2.0, center=0.25))
    with pytest.raises(TypeError, match=r"offset has dtype float64 but x has dtype float32"):
        mmfuse.shift(x, jnp.asarray(0.5, dtype=jnp.float64))


def test_dask_array_module_as_xp_for_initialisers_loaders_and_helpers(dask_array):
    """xp=dask.array (the module users import) builds Dask arrays, as array_api_compat's
    wrapper of it does (dask.array's own asarray takes no device argument)."""
    from mmfuse.datasets import load_mfeat
    from mmfuse.testing import make_inputs

    da = dask_array
    p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=5, xp=da, seed=0)
    assert all(isinstance(a, da.Array) for a in (*p["factors"], p["weights"], p["bias"]))
    assert_close(
        p["factors"][1].compute(), mmfuse.init_lowrank([3, 4], rank=2, out_dim=5, seed=0)["factors"][1]
    )
    (x,) = make_inputs([3], batch=2, xp=da, seed=1)
    assert isinstance(x, da.Array) and x.shape == (2, 3)
    views = load_mfeat(xp=da).views
    assert isinstance(views[0], da.Array) and views[0].dtype == np.float64
    # a dtype too, by name or NumPy's (the loaders and make_inputs asked dask.array, which
    # has no finfo, for it: AttributeError; and refused "float16", which the initialisers take)
    from mmfuse.datasets import load_basic_motions

    for dtype in ("float32", np.float32, "float16"):
        want = np.dtype(dtype)
        (x,) = make_inputs([3], batch=2, xp=da, dtype=dtype, seed=1)
        assert isinstance(x, da.Array) and x.dtype == want
        for data in (load_mfeat(xp=da, dtype=dtype), load_basic_motions(xp=da, dtype=dtype)):
            assert isinstance(data.views[0], da.Array) and data.views[0].dtype == want


def test_jax_lowrank_with_an_empty_rank_or_output():
    """R = 0 or h = 0 on JAX arrays: the rank sum reshaped with -1, undetermined for an
    empty block (ZeroDivisionError in JAX); now the (B, h) result as on NumPy."""
    jnp = pytest.importorskip("jax.numpy")
    x = np.ones((2, 3))
    for factor in (np.ones((2, 4, 0)), np.ones((0, 4, 3))):
        want = mmfuse.lowrank_fusion([x, x], [factor, factor])
        got = mmfuse.lowrank_fusion([jnp.asarray(x)] * 2, [jnp.asarray(factor)] * 2)
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)


def test_jax_jit_takes_a_python_int_scale_and_offset():
    """A Python int through jax.jit is a weakly typed int32: refused as "scale must have a
    real floating dtype" where the eager call (and a float) worked."""
    jax = pytest.importorskip("jax")
    x = jax.numpy.arange(24.0, dtype=jax.numpy.float32).reshape(2, 3, 4)
    zoomed = jax.jit(lambda a, s: mmfuse.zoom(a, s, center=0.0))(x, 2)
    shifted = jax.jit(lambda a, s: mmfuse.shift(a, s))(x, 2)
    assert zoomed.dtype == shifted.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(zoomed), np.asarray(mmfuse.zoom(x, 2, center=0.0)))
    np.testing.assert_array_equal(np.asarray(shifted), np.asarray(x) + 2)


def test_shares_on_array_api_strict_before_2023_12():
    """interaction_shares' rescaling must not use clip (from the 2023.12 standard on)."""
    xs = pytest.importorskip("array_api_strict")
    terms = np.random.default_rng().standard_normal((3, 4, 5))
    previous = xs.get_array_api_strict_flags()["api_version"]
    xs.set_array_api_strict_flags(api_version="2022.12")
    try:
        got = mmfuse.interaction_shares(xs.asarray(terms))
    finally:
        xs.set_array_api_strict_flags(api_version=previous)
    np.testing.assert_allclose(np.asarray(got), mmfuse.reference.interaction_shares(terms), rtol=1e-12)


def test_jax_arrays_sharded_over_several_devices():
    """Data parallelism in JAX: a batch sharded over two (host) devices with replicated
    parameters was refused ("factors[0] is on device NamedSharding(... P()) but xs[0] is on
    NamedSharding(... P('b',))"), and masks sharded as their inputs crashed inside JAX (a
    constant created with the inputs' (B, ...) sharding).  A sharded array has no single
    device: constants stay uncommitted, and the results are the NumPy ones.  (A subprocess:
    the device count is fixed when JAX starts.)"""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np, jax, mmfuse
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        jax.config.update("jax_enable_x64", True)
        mesh = Mesh(np.array(jax.devices()), ("b",))
        batch, repl = NamedSharding(mesh, P("b")), NamedSharding(mesh, P())
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((4, d)) for d in (3, 2)]
        fs = [rng.standard_normal((2, d + 1, 5)) for d in (3, 2)]
        x, g = rng.standard_normal((6, 5, 3)), 1.0 + rng.standard_normal((6, 4, 3))
        m = rng.random((6, 5)) < 0.8
        m[:, 0] = True
        on = jax.device_put
        got = {
            "lowrank": mmfuse.lowrank_fusion([on(a, batch) for a in xs], [on(f, repl) for f in fs]),
            "moments": mmfuse.moments(on(x, batch), mask=on(m, batch))[1],
            "zoom_shift": mmfuse.zoom_shift(on(x, batch), on(g, batch), mask=on(m, repl)),
            "align": mmfuse.align([on(x, batch), on(g, batch)], masks=[on(m, batch), None])[0],
        }
        want = {
            "lowrank": mmfuse.lowrank_fusion(xs, fs),
            "moments": mmfuse.moments(x, mask=m)[1],
            "zoom_shift": mmfuse.zoom_shift(x, g, mask=m),
            "align": mmfuse.align([x, g], masks=[m, None])[0],
        }
        print(len(jax.devices()), max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in got))
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    devices, error = res.stdout.split()
    assert devices == "2" and float(error) < 1e-12, res.stdout


def test_jax_uncommitted_parameters_follow_data_committed_to_another_device():
    """Data committed to cpu:1 with mmfuse's own init_* parameters (uncommitted, on cpu:0):
    refused eagerly ("factors[0] is on device cpu:0 but xs[0] is on cpu:1") where JAX's own
    operations and the same call under jit take them, uncommitted arrays following committed
    ones (a review's find).  Arrays committed to two devices are still refused."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, mmfuse
        jax.config.update("jax_enable_x64", True)
        d0, d1 = jax.devices()
        rng = np.random.default_rng()
        xs = [rng.standard_normal((4, d)) for d in (3, 2)]
        p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=5, seed=0, xp=jnp)
        got = mmfuse.lowrank_fusion([jax.device_put(x, d1) for x in xs], **p)
        want = mmfuse.lowrank_fusion(xs, [np.asarray(f) for f in p["factors"]], np.asarray(p["weights"]),
                                     np.asarray(p["bias"]))
        print(got.devices() == {d1}, float(np.abs(np.asarray(got) - want).max()))
        try:  # the same signature but committed to cpu:0: a plan made for the uncommitted
            # parameters must not pass them (it had: JAX's own error from inside the call)
            pinned = {k: jax.device_put(v, d0) for k, v in p.items()}
            mmfuse.lowrank_fusion([jax.device_put(x, d1) for x in xs], **pinned)
        except ValueError as exc:
            print("refused:", exc)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = res.stdout.strip().splitlines()
    same_device, error = first.split()
    assert same_device == "True" and float(error) < 1e-12, res.stdout
    assert second.startswith("refused: factors[0] is on device") and " but xs[0] is on " in second, second


_UNCOMMITTED_DATA = """
import numpy as np, jax, jax.numpy as jnp, mmfuse
jax.config.update("jax_enable_x64", True)
d2 = jax.devices()[2]
on = lambda a: jax.device_put(a, d2)
rng = np.random.default_rng()
xs = [rng.standard_normal((4, d)) for d in (3, 2)]
w, fs = rng.standard_normal((4, 3, 5)), [rng.standard_normal((2, d + 1, 5)) for d in (3, 2)]
present = np.array([[True, True], [True, False], [False, True], [True, True]])
x, g, m = rng.standard_normal((4, 5, 3)), 1.0 + rng.standard_normal((4, 6, 3)), rng.random((4, 5)) < 0.8
m[:, 0] = True
wp = mmfuse.init_wander([3, 3], [5, 6], rank=2, feature_rank=2, token_rank=2, out_dim=3, seed=1)
free = lambda a: jnp.asarray(a)  # uncommitted: no device given
calls = {  # data (free: uncommitted), parameters or masks (put: committed to cpu:2)
    "tensor_fusion": lambda free, put, b: mmfuse.tensor_fusion([free(a) for a in xs], put(w), backend=b),
    "lowrank_fusion": lambda free, put, b: mmfuse.lowrank_fusion([free(a) for a in xs], [put(f) for f in fs],
                                                                 present=put(present), backend=b),
    "moments": lambda free, put, b: mmfuse.moments(free(x), mask=put(m), backend=b)[0],
    "zoom_shift": lambda free, put, b: mmfuse.zoom_shift(free(x), free(g), mask=put(m), backend=b),
    "align": lambda free, put, b: mmfuse.align([free(x), free(g)], masks=[put(m), None], backend=b)[1],
    "wander": lambda free, put, b: mmfuse.wander([free(x), free(g)], jax.tree_util.tree_map(put, wp),
                                                 masks=[put(m), None], backend=b),
}
for name, call in calls.items():
    want = np.asarray(call(np.asarray, np.asarray, "reference"))
    for backend in (None, "reference"):
        got = call(free, on, backend)
        print(name, backend, got.devices() == {d2}, float(np.abs(np.asarray(got) - want).max()) < 1e-12)
        free_all = call(free, free, backend)  # every input uncommitted: so is the result, as in JAX
        print(name, backend, free_all.committed is False)
"""


def test_jax_uncommitted_data_follows_parameters_committed_to_another_device():
    """Data made without a device beside parameters or masks committed to another one: the
    constants made for the data (the appended 1, masks' fill values, statistics' zeros) were
    committed to the data's default device, and JAX refused the call ("incompatible devices");
    an all-uncommitted call returned a result committed to device 0, and the reference
    backend committed its result there too (a review's find).  Results follow the committed
    inputs now, and stay uncommitted where every input is."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", _UNCOMMITTED_DATA], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(rows) == 24 and all(row[2:] in (["True", "True"], ["True"]) for row in rows), res.stdout


def test_a_traced_alpha_or_eps_is_refused_with_the_remedy():
    """alpha and eps steer Python (rules, limits): traced by jax.jit they are refused, and the
    message says what to pass instead (it said only "got DynamicJaxprTracer")."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, g = jnp.ones((2, 3, 2)), 2.0 * jnp.ones((2, 4, 2))
    for name in ("alpha", "eps"):
        with pytest.raises(TypeError, match=rf"{name} must be a real number, got DynamicJaxprTracer; .*static_argnames"):
            jax.jit(lambda x, g, v, name=name: mmfuse.zoom_shift(x, g, **{name: v}))(x, g, 0.5)
    fixed = jax.jit(lambda x, g, a: mmfuse.zoom_shift(x, g, alpha=a), static_argnames="a")
    assert fixed(x, g, a=0.5).shape == (2, 3, 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dask_gelu_is_one_task_per_chunk_and_numpys_values(dtype, rng):
    """The exact GELU on Dask maps each chunk through its own namespace's GELU: one task per
    chunk (the formulas' elementwise Dask operations made about 200 per chunk) and NumPy's
    values, bit for bit."""
    da = pytest.importorskip("dask.array")
    from mmfuse._core.sequence import gelu
    from mmfuse._namespace import array_namespace

    x = (4.0 * rng.standard_normal((12, 5, 3))).astype(dtype)
    lazy = da.from_array(x, chunks=(4, 5, 3))
    y = gelu(array_namespace(lazy), lazy)
    assert y.dtype == x.dtype  # declared before computing
    assert len(dict(y.__dask_graph__())) == 2 * lazy.npartitions  # the chunks and their GELUs
    got = y.compute()
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, gelu(np, x))


def test_dask_cp_sequence_fusion_holds_a_few_chunks_not_the_batch(dask_array):
    """cp mode on Dask runs one task per batch chunk (NumPy's blocked fusion on the chunk).  As
    a graph of Dask's own operations every chunk's first contractions were scheduled before
    any product, so all were held at once (a review: 302 MiB at B = 1024 in chunks of 64,
    against 15 MiB for NumPy's whole batch; 139 MiB for this test's masked case).  Masks of
    other batch chunks and a modality without one give NumPy's values."""
    import tracemalloc

    da = dask_array
    rng = np.random.default_rng(20261206)
    lengths, batch, width, r_h, r_t, out_dim, n_out = (50, 40, 30), 1024, 16, 4, 4, 64, 32
    hs = [rng.standard_normal((batch, t, width)).astype(np.float32) for t in lengths]
    feature = [(0.2 * rng.standard_normal((r_h, width, out_dim))).astype(np.float32) for _ in lengths]
    token = [(0.2 * rng.standard_normal((r_t, t, n_out))).astype(np.float32) for t in lengths]
    masks = [np.arange(t) < rng.integers(1, t + 1, (batch, 1)) for t in lengths]
    masks[1] = None
    want = mmfuse.sequence_fusion(hs, feature, token, mode="cp", masks=masks)
    lazy = mmfuse.sequence_fusion(
        [da.from_array(h, chunks=(64, -1, -1)) for h in hs],
        [da.from_array(f) for f in feature],
        [da.from_array(t) for t in token],
        mode="cp",
        masks=[None if k is None else da.from_array(k, chunks=(48, -1)) for k in masks],
    )
    tracemalloc.start()
    try:
        got = lazy.compute(scheduler="synchronous")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert got.dtype == np.float32
    # the output (8 MiB) and its chunks, and a chunk's work: 18 MiB measured, 139 before
    assert peak < 4 * got.nbytes, (peak, got.nbytes)


@pytest.mark.parametrize("chunks", [(0, 1), (0, 0, 1), (1, 0, 3), (0, 5), (0, 0)])
def test_dask_batch_chunks_of_size_zero_in_the_per_chunk_paths(dask_array, chunks):
    """Dask's blockwise handed an empty batch chunk's task a one-row chunk's block (broadcast, as
    if of size 1): batch chunks (0, 1) gave 2 rows of a 1-row result, (0, 0, 1) 3, and (0, 0)
    a missing dependency at compute (a fuzzing review's find).  The per-chunk paths (cp-mode sequence fusion, low-rank fusion) drop such
    chunks first; a mask chunked otherwise too."""
    da = dask_array
    rng = np.random.default_rng(7)
    batch = sum(chunks)
    hs = [rng.standard_normal((batch, t, 3)) for t in (4, 2)]
    feature = [rng.standard_normal((2, 3, 5)) for _ in hs]
    token = [rng.standard_normal((2, t, 3)) for t in (4, 2)]
    masks = [np.arange(4) < rng.integers(1, 5, (batch, 1)), None]
    want = mmfuse.sequence_fusion(hs, feature, token, mode="cp", masks=masks)
    got = mmfuse.sequence_fusion(
        [da.from_array(h, chunks=(chunks, -1, -1)) for h in hs],
        [da.from_array(f) for f in feature],
        [da.from_array(t) for t in token],
        mode="cp",
        masks=[da.from_array(masks[0], chunks=(chunks[::-1], -1)), None],
    ).compute()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    xs = [rng.standard_normal((batch, d)) for d in (3, 4)]
    p = mmfuse.init_lowrank((3, 4), rank=4, out_dim=2, seed=1)
    lazy = mmfuse.lowrank_fusion(
        [da.from_array(x, chunks=(chunks, -1)) for x in xs],
        [da.from_array(f) for f in p["factors"]], da.from_array(p["weights"]), da.from_array(p["bias"]),
    )  # fmt: skip
    np.testing.assert_allclose(lazy.compute(), mmfuse.lowrank_fusion(xs, **p), rtol=1e-12, atol=1e-12)


def test_dask_reference_results_are_one_chunk_whatever_dasks_chunk_size(dask_array):
    """backend="reference" on Dask returns one chunk, as the backends guide says; the results
    were converted by Dask's asarray, which chunks by "array.chunk-size" (a review's find)."""
    import dask

    da = dask_array
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((40, t, 3)) for t in (6, 2)]
    with dask.config.set({"array.chunk-size": "1KiB"}):
        out = mmfuse.align([da.from_array(x, chunks=16) for x in xs], backend="reference")
        assert [y.numblocks for y in out] == [(1, 1, 1), (1, 1, 1)]
        for y, want in zip(out, ref.align(xs)):
            assert_close(y.compute(), want)
        params = mmfuse.init_lowrank([300, 300], rank=4, out_dim=8, xp=da, seed=0)
        assert params["factors"][0].numblocks == (1, 1, 1)


def test_jax_eager_masks_hiding_a_sample_are_refused_as_numpys(jax_x64):
    """An eager JAX mask that hides every token of a sample is refused with NumPy's message
    (every JAX array had been taken for a traced one, and gave NaN statistics silently); under
    jit and vmap its values cannot be read, and the call runs (a review of the plan state)."""
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng().standard_normal((2, 4, 3))
    hiding = np.array([[True, False, True, True], [False] * 4])
    with pytest.raises(ValueError, match=r"^mask masks every token of a sample \(flat sample index 1\)"):
        mmfuse.moments(x, mask=hiding)
    with pytest.raises(ValueError, match=r"^mask masks every token of a sample \(flat sample index 1\)"):
        mmfuse.moments(jnp.asarray(x), mask=jnp.asarray(hiding))
    keep = hiding.copy()
    keep[1, 0] = True
    got = jax.jit(lambda a, m: mmfuse.moments(a, mask=m)[0])(jnp.asarray(x), jnp.asarray(keep))
    assert_close(np.asarray(got), ref.moments(x, mask=keep)[0])
    # a concrete mask the traced function closes over: its test is staged there, not a value
    # (a first version of this fix raised TracerBoolConversionError; the final diff review)
    captured = jnp.asarray(keep)
    for fn in (lambda a: mmfuse.moments(a, mask=captured)[0],
               lambda a: mmfuse.zoom_shift(a, a, mask=captured, guide_mask=captured),
               lambda a: mmfuse.align([a, a], masks=[captured, captured])[0]):  # fmt: skip
        assert np.all(np.isfinite(np.asarray(jax.jit(fn)(jnp.asarray(x)))))


def test_lazy_results_pickle_with_the_standard_pickle(rng):
    """lowrank_fusion, align and zoom_shift_fusion built their Dask tasks from closures, which
    only Dask's cloudpickle takes: their lazy results could not go through a multiprocessing
    queue, joblib or pickle.dump (a review's find).  Round-tripped, they compute the same."""
    import pickle

    da = pytest.importorskip("dask.array")
    xs = [rng.standard_normal((6, d)) for d in (3, 4)]
    p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=5, seed=rng)
    present = rng.random((6, 2)) < 0.7
    seqs = [rng.standard_normal((6, t, 3)) for t in (5, 4)]
    lazy_xs = [da.from_array(x, chunks=(4, -1)) for x in xs]
    lazy_seqs = [da.from_array(s, chunks=(4, -1, -1)) for s in seqs]
    results = {
        "lowrank_fusion": mmfuse.lowrank_fusion(
            lazy_xs, [da.from_array(f) for f in p["factors"]], da.from_array(p["weights"]),
            da.from_array(p["bias"]), present=da.from_array(present, chunks=(4, -1)),
        ),
        "align": mmfuse.align(lazy_seqs, rounds=2, alpha=0.5)[0],
        "align limit": mmfuse.align(lazy_seqs, rounds=None, alpha=0.5)[1],
        "zoom_shift_fusion": mmfuse.zoom_shift_fusion(lazy_seqs),
    }
    for name, lazy in results.items():
        again = pickle.loads(pickle.dumps(lazy))
        np.testing.assert_array_equal(np.asarray(again.compute()), np.asarray(lazy.compute()), err_msg=name)


def test_dask_parameters_in_many_chunks_keep_the_outputs_one_chunk_wide(dask_array):
    """Parameters chunked finely (even one element a chunk) are taken in one chunk by every
    fusion and interaction function, as lowrank_fusion's are: tensor_fusion, cp_fusion and
    the rank-R interaction terms had split the output along h, grown the graph by the chunk
    count, and warned ("Increasing number of chunks", an error under warnings-as-errors;
    a review's find)."""
    import warnings

    da = dask_array
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    xs_np = [rng.standard_normal((40, d)) for d in (3, 4, 2)]
    xs = [da.from_array(x, chunks=(4, -1)) for x in xs_np]
    weight = rng.standard_normal((4, 5, 3, 5))
    cp = (rng.random(3), [rng.standard_normal((d, 3)) for d in (4, 5, 3, 5)])
    low = mmfuse.init_lowrank([3, 4, 2], rank=3, out_dim=5, seed=int(rng.integers(2**31)))
    bias = rng.standard_normal(5)

    def fine(a):
        return da.from_array(a, chunks=1)

    calls = [
        (mmfuse.tensor_fusion, (weight, bias), (fine(weight), fine(bias))),
        (
            mmfuse.lowrank_fusion,
            (low["factors"], low["weights"], bias),
            ([fine(f) for f in low["factors"]], fine(low["weights"]), fine(bias)),
        ),
        (lambda xs, w: mmfuse.tensor_interactions(xs, w)[0], (weight,), (fine(weight),)),
        (mmfuse.cp_fusion, (cp, bias), ((fine(cp[0]), [fine(a) for a in cp[1]]), fine(bias))),
        (lambda xs, cp: mmfuse.cp_interactions(xs, cp)[0], (cp,), ((fine(cp[0]), [fine(a) for a in cp[1]]),)),
        (
            lambda xs, f, w: mmfuse.lowrank_interactions(xs, f, w)[0],
            (low["factors"], low["weights"]),
            ([fine(f) for f in low["factors"]], fine(low["weights"])),
        ),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for func, args_np, args_da in calls:
            got = func(xs, *args_da)
            assert got.numblocks[-1] == 1 and got.numblocks[-2] == 10
            assert_close(got.compute(), func(xs_np, *args_np))


def test_uncommitted_jax_arrays_keep_their_device_for_checks_and_registrations():
    """Constants made for a JAX array without a device stay uncommitted, but the array's device
    is still its device where it is asked: a registration's ``supports(xp, device)`` and
    ``assert_close(device=...)`` got None for it while this session's first fix of the
    constants stood (a diff review's find)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from mmfuse import backends
    from mmfuse.testing import assert_close

    x = jnp.asarray(np.ones(3, np.float32))
    assert_close(x, x, device="cpu")
    assert_close(x, x, device=jax.devices()[0])
    seen = []

    def supports(xp, device):
        seen.append(device)
        return None

    def mine(xs, factors, weights=None, bias=None, *, append_one=True, present=None):
        return mmfuse.lowrank_fusion(xs, factors, weights, bias, append_one=append_one, present=present,
                                     backend="reference")  # fmt: skip

    p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=5, seed=0, xp=jnp)
    backends.register("lowrank_fusion", "array_api", mine, supports=supports, priority=10)
    try:
        got = mmfuse.lowrank_fusion([jnp.ones((4, 3)), jnp.ones((4, 2))], **p)
    finally:
        backends.unregister("lowrank_fusion", "array_api")
    assert seen and seen[0] == jax.devices()[0] and got.shape == (4, 5)
