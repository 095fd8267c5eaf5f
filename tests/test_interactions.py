"""Exact interaction terms of TFN, LMF and CP (issue 22): exactness on every namespace, the
order recursion against the subset sum, the terms against independent computations (the TFN
weight's sub-blocks, TensorLy's ``cp_to_tensor``), gradients, ``present=`` and the refusals."""

from __future__ import annotations

import importlib.util
import itertools
import warnings

import numpy as np
import pytest

import mmfuse
import mmfuse.reference as ref
from mmfuse.testing import assert_close

KINDS = ("tensor", "lowrank", "cp")


def _problem(rng, n, *, batch=3, rank=2, out_dim=2, append_one=True, dims=None):
    dims = list(rng.integers(1, 3, n)) if dims is None else list(dims)
    extra = int(append_one)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((rank, d + extra, out_dim)) for d in dims]
    weights = rng.standard_normal(rank)
    weight = ref.lowrank_to_tensor(factors, weights) + rng.standard_normal(
        (*[d + extra for d in dims], out_dim)
    )  # generic (full rank)
    cp = (rng.standard_normal(rank), [rng.standard_normal((d + extra, rank)) for d in dims]
          + [rng.standard_normal((out_dim, rank))])
    present = rng.random((batch, n)) < 0.6
    return {"xs": xs, "factors": factors, "weights": weights, "weight": weight, "cp": cp, "present": present}


def _call(kind, p, conv, *, by="order", present=False, append_one=True, backend=None):
    """(interaction terms, labels, fused output without bias) of ``kind`` with arrays made by
    ``conv`` (NumPy -> the namespace under test)."""
    xs = [conv(x) for x in p["xs"]]
    opts = {"append_one": append_one, "backend": backend}
    if kind == "tensor":
        w = conv(p["weight"])
        terms, labels = mmfuse.tensor_interactions(xs, w, by=by, **opts)
        return terms, labels, mmfuse.tensor_fusion(xs, w, **opts)
    pres = None if not present else conv(p["present"])
    if kind == "lowrank":
        f, w = [conv(f) for f in p["factors"]], conv(p["weights"])
        terms, labels = mmfuse.lowrank_interactions(xs, f, w, by=by, present=pres, **opts)
        return terms, labels, mmfuse.lowrank_fusion(xs, f, w, present=pres, **opts)
    cp = (conv(p["cp"][0]), [conv(a) for a in p["cp"][1]])
    terms, labels = mmfuse.cp_interactions(xs, cp, by=by, present=pres, **opts)
    return terms, labels, mmfuse.cp_fusion(xs, cp, present=pres, **opts)


def _reference(kind, p, *, by="order", present=False, append_one=True):
    pres = p["present"] if present else None
    if kind == "tensor":
        return ref.tensor_interactions(p["xs"], p["weight"], by=by, append_one=append_one)
    if kind == "lowrank":
        return ref.lowrank_interactions(
            p["xs"], p["factors"], p["weights"], by=by, present=pres, append_one=append_one
        )
    return ref.cp_interactions(p["xs"], p["cp"], by=by, present=pres, append_one=append_one)


def _sum0(xp, terms):
    return xp.xp.sum(terms, axis=0)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("kind", KINDS)
def test_terms_sum_to_output_and_match_reference(xp, kind, n, rng):
    p = _problem(rng, n)
    present = kind != "tensor"
    by = "subset" if n <= 3 else "order"
    terms, labels, fused = _call(kind, p, xp.asarray, by=by, present=present)
    want, want_labels = _reference(kind, p, by=by, present=present)
    assert labels == want_labels
    assert tuple(terms.shape) == (len(labels), 3, 2)
    assert_close(terms, want, xp=xp.xp, dtype=xp.dtype("float64"))
    assert_close(_sum0(xp, terms), fused, xp=xp.xp, dtype=xp.dtype("float64"))
    xp.assert_untouched()


@pytest.mark.parametrize("kind", KINDS)
def test_float32_kept_and_append_one_false(xp, kind, rng):
    p = _problem(rng, 3, append_one=False)
    conv = lambda a: xp.asarray(a, "float32")  # noqa: E731
    for by in ("order", "subset"):
        terms, _, fused = _call(kind, p, conv, by=by, present=kind != "tensor", append_one=False)
        want, _ = _reference(kind, p, by=by, present=kind != "tensor", append_one=False)
        assert_close(terms, want, xp=xp.xp, dtype=xp.dtype("float32"))
        assert_close(_sum0(xp, terms), fused, dtype=xp.dtype("float32"))
        # without the constant, only the M-way term is left
        assert not np.any(np.asarray(want[:-1]))
    xp.assert_untouched()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_and_labels(kind, rng):
    p = _problem(rng, 3)
    got, labels, _ = _call(kind, p, np.asarray, by="subset", backend="reference")
    core, core_labels, _ = _call(kind, p, np.asarray, by="subset", backend="array_api")
    assert labels == core_labels == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert_close(core, got)
    _, orders, _ = _call(kind, p, np.asarray, by="order")
    assert orders == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [1, 4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_order_recursion_equals_subset_sum(kind, n, rng):
    p = _problem(rng, n)
    present = kind != "tensor"
    orders, _, _ = _call(kind, p, np.asarray, by="order", present=present)
    subsets, labels, _ = _call(kind, p, np.asarray, by="subset", present=present)
    summed = np.zeros_like(orders)
    for s, term in zip(labels, subsets):
        summed[len(s)] += term
    assert_close(orders, summed)


@pytest.mark.parametrize("by", ["order", "subset"])
def test_tfn_terms_equal_lmf_terms_for_lmf_weight(by, rng):
    p = _problem(rng, 4, rank=3, out_dim=3)
    full = mmfuse.lowrank_to_tensor(p["factors"], p["weights"])
    tfn, tfn_labels = mmfuse.tensor_interactions(p["xs"], full, by=by)
    lmf, lmf_labels = mmfuse.lowrank_interactions(p["xs"], p["factors"], p["weights"], by=by)
    assert tfn_labels == lmf_labels
    assert_close(tfn, lmf)


# --------------------------------------------------------------------------- independent


def _sub_block_terms(xs, weight):
    """T_S from W's sub-block: modes in S over the features, the others at the constant's index,
    contracted with the features mode by mode (np.tensordot), per subset."""
    n = len(xs)
    out = {}
    for k in range(n + 1):
        for s in itertools.combinations(range(n), k):
            index = tuple(slice(0, x.shape[1]) if m in s else x.shape[1] for m, x in enumerate(xs))
            block = weight[index]  # axes: the modes of S in order, then h
            per_sample = []
            for b in range(xs[0].shape[0]):
                t = block
                for m in s:
                    t = np.tensordot(xs[m][b], t, axes=(0, 0))
                per_sample.append(t)
            out[s] = np.stack(per_sample)
    return out


def test_tfn_terms_are_weight_sub_blocks(rng):
    p = _problem(rng, 4, dims=(2, 1, 3, 2))
    terms, labels = mmfuse.tensor_interactions(p["xs"], p["weight"], by="subset")
    blocks = _sub_block_terms(p["xs"], p["weight"])
    assert set(labels) == set(blocks)
    for s, term in zip(labels, terms):
        assert_close(term, blocks[s])


def test_cp_terms_are_sub_blocks_of_tensorly_cp_to_tensor(rng):
    tl = pytest.importorskip("tensorly")
    p = _problem(rng, 3, dims=(2, 3, 1), rank=4, out_dim=3)
    full = tl.cp_to_tensor(tl.cp_tensor.CPTensor(p["cp"]))
    terms, labels = mmfuse.cp_interactions(p["xs"], tl.cp_tensor.CPTensor(p["cp"]), by="subset")
    blocks = _sub_block_terms(p["xs"], np.asarray(full))
    for s, term in zip(labels, terms):
        assert_close(term, blocks[s])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("by", ["order", "subset"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_gradients_match_central_differences_of_reference(kind, by, rng):
    """<grad of sum(terms * U), V> (torch autograd) equals the central difference of the
    float64 reference, for the inputs and the parameters together."""
    torch = pytest.importorskip("torch")
    p = _problem(rng, 3, rank=2, out_dim=2)
    names = {"tensor": ["weight"], "lowrank": ["factors", "weights"], "cp": ["cp"]}[kind]
    arrays = list(p["xs"])
    for name in names:
        value = p[name]
        arrays += [value[0], *value[1]] if name == "cp" else (value if isinstance(value, list) else [value])

    def rebuild(flat, make):
        q = dict(p)
        q["xs"] = [make(a) for a in flat[:3]]
        rest = [make(a) for a in flat[3:]]
        if kind == "tensor":
            q["weight"] = rest[0]
        elif kind == "lowrank":
            q["factors"], q["weights"] = rest[:3], rest[3]
        else:
            q["cp"] = (rest[0], rest[1:])
        return q

    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    def as_torch(a):
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))

    terms, _, _ = _call(kind, rebuild(leaves, as_torch), as_torch, by=by, present=kind != "tensor")
    upstream = rng.standard_normal(tuple(terms.shape))
    grads = torch.autograd.grad((terms * torch.from_numpy(upstream)).sum(), leaves)
    directions = [rng.standard_normal(a.shape) for a in arrays]
    analytic = sum(float(np.sum(g.numpy() * v)) for g, v in zip(grads, directions))
    eps = 1e-6

    def loss(sign):
        q = rebuild([a + sign * eps * v for a, v in zip(arrays, directions)], np.asarray)
        return float(np.sum(_reference(kind, q, by=by, present=kind != "tensor")[0] * upstream))

    numeric = (loss(1) - loss(-1)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


# --------------------------------------------------------------------------- present


@pytest.mark.parametrize("kind", ["lowrank", "cp"])
def test_present_absent_modality_only_through_its_constant(kind, rng):
    p = _problem(rng, 3, batch=6)
    p["present"][0] = [True, False, True]
    p["present"][1] = [False, False, False]
    with_nan = dict(p)
    with_nan["xs"] = [x.copy() for x in p["xs"]]
    for m, x in enumerate(with_nan["xs"]):
        x[~p["present"][:, m]] = np.nan  # ignored where absent
    terms, labels, _ = _call(kind, with_nan, np.asarray, by="subset", present=True)
    zeroed = dict(p)
    zeroed["xs"] = [np.where(p["present"][:, m : m + 1], x, 0.0) for m, x in enumerate(p["xs"])]
    want, _, _ = _call(kind, zeroed, np.asarray, by="subset")
    assert_close(terms, want)
    for s, term in zip(labels, terms):
        absent_rows = ~np.all(p["present"][:, list(s)], axis=1) if s else np.zeros(6, bool)
        assert not np.any(term[absent_rows]), s
    # sample 1 has nothing present: its output is the constant alone
    assert_close(terms[1:, 1], np.zeros_like(terms[1:, 1]))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_reference_terms_take_the_weights_slices_as_the_definition_reads(rng):
    """The reference formed each term as dot products with u = [x; 0] and e = [0; 1], whose
    zeros times a NaN or inf entry made NaN of terms that do not involve it (a NaN in a
    constant's row spread into every term; an infinite feature's terms summed to NaN where
    tensor_fusion gives inf; a review's find).  It takes the slices, as the implementations:
    the same non-finite pattern, and the same values elsewhere."""
    xs = [rng.standard_normal((2, 2)), rng.standard_normal((2, 3))]
    factors = [rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 2))]
    factors[0][1, -1, 0] = np.nan  # in modality 0's constant row, rank 1
    weight = rng.standard_normal((3, 4, 2))
    weight[-1, 0, 1] = np.nan  # the constant of modality 0 with modality 1's first feature
    inf_xs = [xs[0].copy(), xs[1]]
    inf_xs[0][0, 0] = np.inf
    calls = [
        lambda b: mmfuse.lowrank_interactions(xs, factors, by="subset", backend=b)[0],
        lambda b: mmfuse.tensor_interactions(xs, weight, by="subset", backend=b)[0],
        lambda b: mmfuse.tensor_interactions(inf_xs, np.abs(weight[..., :1]) + 1, by="subset", backend=b)[0],
    ]
    for call in calls:
        want = call("array_api")
        assert np.isfinite(want).any() and not np.isfinite(want).all()
        assert_close(call("reference"), want)  # (NaN and inf where the implementation has them)
    terms = calls[2]("reference")
    assert_close(terms.sum(axis=0), ref.tensor_fusion(inf_xs, np.abs(weight[..., :1]) + 1))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("by", ["subset", "order"])
@pytest.mark.parametrize("kind", KINDS)
def test_without_the_constant_the_lower_terms_are_zero_next_to_a_non_finite_feature(kind, by, rng):
    """Without the constant every term but the M-way one is zero (the documented rule, and the
    implementations': no term at all).  The reference formed them as 0 times a projection, so
    a sample with a NaN or inf feature had NaN in the terms of the subsets holding it (a
    review's find); they are 0 there too.  The M-way term is non-finite on both paths (inf or
    NaN: the reference rebuilds CP's full weight, the implementation does not) and the same
    elsewhere."""
    p = _problem(rng, 3, batch=4, rank=2, out_dim=3, append_one=False)
    p["xs"] = [x.copy() for x in p["xs"]]
    p["xs"][1][0, 0] = np.nan
    p["xs"][2][2, -1] = np.inf
    got, labels, _ = _call(kind, p, np.asarray, by=by, append_one=False, backend="reference")
    want, _, _ = _call(kind, p, np.asarray, by=by, append_one=False, backend="array_api")
    top = len(labels) - 1  # the M-way term: the full subset, or order M
    for terms in (got, want):
        assert np.all(terms[:top] == 0), "a lower term is not exactly zero"
        assert not np.isfinite(terms[top, 0]).all() and not np.isfinite(terms[top, 2]).all()
    assert_close(got[:, [1, 3]], want[:, [1, 3]])  # the finite samples
    # the same rule on every other backend that computes the terms (the whole-change reread:
    # the oracle's fix is checked against each implementation, not the core alone)
    others = []
    if importlib.util.find_spec("numba") is not None and kind != "tensor":  # (no TFN row)
        others.append((np.asarray, "numba"))
    if importlib.util.find_spec("torch") is not None:
        import torch

        others.append((torch.from_numpy, "torch"))
    for conv, backend in others:
        xs = [conv(x) for x in p["xs"]]
        opts = {"by": by, "append_one": False, "backend": backend}
        if kind == "tensor":
            terms = mmfuse.tensor_interactions(xs, conv(p["weight"]), **opts)[0]
        elif kind == "lowrank":
            terms = mmfuse.lowrank_interactions(xs, [conv(f) for f in p["factors"]], conv(p["weights"]), **opts)[0]
        else:
            terms = mmfuse.cp_interactions(xs, (conv(p["cp"][0]), [conv(a) for a in p["cp"][1]]), **opts)[0]
        terms = np.asarray(terms)
        assert np.all(terms[:top] == 0), backend
        assert not np.isfinite(terms[top, 0]).all() and not np.isfinite(terms[top, 2]).all(), backend
        assert_close(terms[:, [1, 3]], got[:, [1, 3]])


# --------------------------------------------------------------------------- refusals


def test_subset_refuses_over_max_elements(rng):
    p = _problem(rng, 4, batch=5, out_dim=3, dims=(1, 1, 1, 1))
    msg = (
        r"lowrank_interactions: by='subset' returns 2\*\*M = 16 terms of shape \(B, h\) = \(5, 3\) "
        r"for M = 4 modalities, 240 elements, over max_elements=200; use by='order'"
    )
    with pytest.raises(ValueError, match=msg):
        mmfuse.lowrank_interactions(p["xs"], p["factors"], by="subset", max_elements=200)
    with pytest.raises(ValueError, match=r"cp_interactions: by='subset' returns 2\*\*M = 16 terms"):
        mmfuse.cp_interactions(p["xs"], p["cp"], by="subset", max_elements=200)
    with pytest.raises(ValueError, match=r"tensor_interactions: by='subset' returns 2\*\*M = 16 terms"):
        mmfuse.tensor_interactions(p["xs"], p["weight"], by="subset", max_elements=200)
    terms, _ = mmfuse.lowrank_interactions(p["xs"], p["factors"], by="order", max_elements=200)
    assert terms.shape == (5, 5, 3)
    # the low-rank counterpart suggested, not lowrank_fusion (a review's find)
    with pytest.raises(
        ValueError,
        match=r"tensor_interactions: weight of shape .* over max_elements=10; use lowrank_interactions, or",
    ):
        mmfuse.tensor_interactions(p["xs"], p["weight"], max_elements=10)
    # and an intermediate over the bound (Dask: a batch chunk is contracted whole), named as
    # tensor_interactions' with its own suggestion (a final reread found it untested)
    da = pytest.importorskip("dask.array")
    xs = [da.from_array(rng.standard_normal((400, 3))) for _ in range(2)]
    with pytest.raises(
        ValueError,
        match=r"^tensor_interactions: contracting modality 0 leaves an intermediate of shape \(400, 4, 3\).*"
        r"use lowrank_interactions, or raise max_elements",
    ):
        mmfuse.tensor_interactions(xs, da.from_array(rng.standard_normal((4, 4, 3))), max_elements=2000)


@pytest.mark.parametrize("by", ["order", "subset"])
def test_tfn_terms_contract_the_batch_in_blocks_under_max_elements(by, rng):
    """tensor_interactions honours max_elements as tensor_fusion does: the batch in blocks so
    that no intermediate exceeds it.  It contracted the whole batch at once (4.1 million
    float64 elements beyond its result at B = 4000 under max_elements=20000); values are
    those of one block, and of the reference."""
    import tracemalloc

    # by="subset" refuses a result over the limit itself (8 terms of (700, 4)): a larger one,
    # still under the whole batch's first intermediate (100 800 elements)
    dims, h, limit = (5, 5, 5), 4, 2_000 if by == "order" else 30_000
    weight = rng.standard_normal((6, 6, 6, h)) / 15
    xs = [rng.standard_normal((700, d)) for d in dims]
    want, labels = mmfuse.tensor_interactions(xs, weight, by=by)  # one block (default limit)
    tracemalloc.start()
    got, got_labels = mmfuse.tensor_interactions(xs, weight, by=by, max_elements=limit)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got_labels == labels
    assert_close(got, want)
    assert_close(got[:, :3], ref.tensor_interactions([x[:3] for x in xs], weight, by=by)[0])
    # blocks: a few intermediates of at most `limit` elements beside the terms and their parts
    # (one sample's first intermediate is 6 * 6 * 4 = 144; the whole batch's was 100 800)
    assert peak <= 8 * (2 * got.size + 5 * limit), peak
    torch = pytest.importorskip("torch")
    leaves = [torch.from_numpy(x).requires_grad_() for x in xs]
    terms, _ = mmfuse.tensor_interactions(leaves, torch.from_numpy(weight), by=by, max_elements=limit)
    assert_close(terms.detach(), want)
    terms.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_lowrank_subsets_hold_the_walks_path_not_every_product(rng):
    """By subset, each of the 2^M rank products (rows, R h) is reduced to (rows, h) as the walk
    makes it: all 2^M were held until the end of a block (M = 8, R h = 65536: 68 times the
    result's memory, past max_elements while the result was under it)."""
    import tracemalloc

    dims, rank, out_dim, batch = [1] * 8, 64, 32, 16
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((rank, d + 1, out_dim)) / 2 for d in dims]
    tracemalloc.start()
    got, labels = mmfuse.lowrank_interactions(xs, factors, by="subset")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the walk's path (9 products of 16 x 2048) and the terms with their stack: about 3 MiB;
    # every product at once was 2^8 x 16 x 2048 float64 elements, 64 MiB
    assert peak <= 8 * got.nbytes + 9 * batch * rank * out_dim * 8, peak
    want, want_labels = ref.lowrank_interactions([x[:3] for x in xs], factors, by="subset")
    assert labels == want_labels
    assert_close(got[:, :3], want)


def test_argument_errors(rng):
    p = _problem(rng, 2, dims=(2, 3))
    with pytest.raises(ValueError, match=r"by must be 'order' or 'subset', got 'orders'"):
        mmfuse.lowrank_interactions(p["xs"], p["factors"], by="orders")
    with pytest.raises(ValueError, match=r"factors\[0\] has shape \(2, 3, 2\); expected \(R, d_0 \+ 1, h\) = \(R, 4, h\)"):
        mmfuse.lowrank_interactions(p["xs"][::-1], p["factors"])
    with pytest.raises(ValueError, match=r"cp has 2 factors; expected M \+ 1 = 3"):
        mmfuse.cp_interactions(p["xs"], (None, p["cp"][1][1:]))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        mmfuse.tensor_interactions(p["xs"][:1], p["weight"])
    with pytest.raises(ValueError, match=r"present must have shape \(B, M\) = \(3, 2\), got \(3, 1\)"):
        mmfuse.cp_interactions(p["xs"], p["cp"], present=p["present"][:, :1])
    with pytest.raises(TypeError, match="append_one must be a bool"):
        mmfuse.tensor_interactions(p["xs"], p["weight"], append_one=1)
    with pytest.raises(ValueError, match=r"terms must be 3-dimensional with shape \(K, B, h\), got shape \(3, 2\)"):
        mmfuse.interaction_shares(p["xs"][0][:, :2])
    with pytest.raises(ValueError, match="kind must be 'variance' or 'norm', got 'var'"):
        mmfuse.interaction_shares(np.ones((2, 3, 1)), kind="var")


# --------------------------------------------------------------------------- shares


@pytest.mark.parametrize("kind", ["variance", "norm"])
def test_shares_match_reference_and_sum_to_one(xp, kind, rng):
    p = _problem(rng, 3, batch=16)
    terms, _, _ = _call("lowrank", p, xp.asarray, by="subset")
    shares = mmfuse.interaction_shares(terms, kind=kind)
    want = ref.interaction_shares(ref.lowrank_interactions(p["xs"], p["factors"], p["weights"], by="subset")[0],
                                  kind=kind)
    assert_close(shares, want, xp=xp.xp, dtype=xp.dtype("float64"))
    assert abs(float(np.sum(want)) - 1.0) < 1e-12
    if kind == "variance":
        assert abs(float(want[0])) < 1e-12  # the constant has no variance


@pytest.mark.parametrize("kind", ["variance", "norm"])
def test_shares_of_float16_terms_are_computed_in_float32(kind, rng):
    """Terms of ordinary size (|T| ~ 40, a sum of squares far over float16's 65504): the
    shares in float16, rounded from float32 sums (all-NaN before: inf / inf)."""
    terms = 10.0 * rng.standard_normal((3, 100, 10))
    want = ref.interaction_shares(terms.astype(np.float16).astype(np.float64), kind=kind)
    got = mmfuse.interaction_shares(terms.astype(np.float16), kind=kind)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=2e-3)
    torch = pytest.importorskip("torch")
    t = torch.tensor(terms, dtype=torch.float16, requires_grad=True)
    shares = mmfuse.interaction_shares(t, kind=kind)
    assert shares.dtype == torch.float16
    np.testing.assert_allclose(shares.detach().double().numpy(), want, rtol=2e-3, atol=2e-3)
    (grad,) = torch.autograd.grad(shares[1], [t])
    assert grad.dtype == torch.float16 and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend", [None, "array_api", "numba", "torch"])
@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_float16_terms_are_computed_in_float32(namespace, backend, rng):
    """The fusion's own float16 case (a projection 300 * 300 over 65504, the fused output 90):
    the terms were [0, inf, nan] on every backend while the fusion gave 90; they are computed
    in float32 and rounded once, as the fusions, and on random inputs they are the float64
    reference's rounding (to float16's resolution of the output)."""
    torch = pytest.importorskip("torch") if namespace == "torch" or backend == "torch" else None
    if backend == "numba":
        pytest.importorskip("numba")
    if namespace == "numpy" and backend == "torch":
        pytest.skip("the torch backend takes torch tensors")
    if namespace == "torch" and backend == "numba":
        pytest.skip("numba's rows take torch float32 / float64 tensors only")
    if namespace == "numpy":
        half = lambda a: np.asarray(a).astype(np.float16)  # noqa: E731
    else:
        half = lambda a: torch.tensor(np.asarray(a), dtype=torch.float16)  # noqa: E731
    xs = [half([[300.0]]), half([[0.0]])]
    f0, f1 = np.zeros((1, 2, 1)), np.zeros((1, 2, 1))
    f0[0, 0, 0], f1[0, 1, 0] = 300.0, 1e-3
    cp = (half(np.ones(1)), [half([[300.0], [0.0]]), half([[0.0], [1e-3]]), half(np.ones((1, 1)))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        low, _ = mmfuse.lowrank_interactions(xs, [half(f0), half(f1)], half(np.ones(1)), backend=backend)
        cpt, _ = mmfuse.cp_interactions(xs, cp, backend=backend)
    for terms in (low, cpt):
        assert str(terms.dtype).endswith("float16")
        got = np.asarray(terms, dtype=np.float64).ravel()
        assert got[0] == 0 and got[2] == 0 and abs(got[1] - 90.0) < 0.1
    p = _problem(rng, 3, batch=5, rank=3, out_dim=4)
    for kind in KINDS:
        if backend == "numba" and kind == "tensor":
            continue  # no numba row for TFN's terms
        p16 = dict(p)
        rounded = {
            "xs": [x.astype(np.float16).astype(np.float64) for x in p["xs"]],
            "factors": [f.astype(np.float16).astype(np.float64) for f in p["factors"]],
            "weights": p["weights"].astype(np.float16).astype(np.float64),
            "weight": p["weight"].astype(np.float16).astype(np.float64),
            "cp": (p["cp"][0].astype(np.float16).astype(np.float64),
                   [a.astype(np.float16).astype(np.float64) for a in p["cp"][1]]),
            "present": p["present"],
        }  # fmt: skip
        p16.update(rounded)
        xs16 = [half(x) for x in p16["xs"]]
        if kind == "tensor":
            terms, _ = mmfuse.tensor_interactions(xs16, half(p16["weight"]), backend=backend)
        elif kind == "lowrank":
            factors = [half(f) for f in p16["factors"]]
            terms, _ = mmfuse.lowrank_interactions(xs16, factors, half(p16["weights"]), backend=backend)
        else:
            cp16 = (half(p16["cp"][0]), [half(a) for a in p16["cp"][1]])
            terms, _ = mmfuse.cp_interactions(xs16, cp16, backend=backend)
        want, _ = _reference(kind, p16)
        got = np.asarray(terms, dtype=np.float64)
        # one rounding to float16 of the float32 result: within float16's ulp of each value
        # (plus float32's error, relative to the output's scale)
        tol = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64) + 1e-5 * np.abs(want).max()
        assert np.all(np.abs(got - want) <= tol), kind


@pytest.mark.parametrize(("dtype", "scale"), [("float32", 2e18), ("float32", 1e-25), ("float64", 1e155), ("float64", 1e-170)])
def test_shares_do_not_depend_on_the_terms_scale(xp, dtype, scale, rng):
    """The shares are scale-free; their sums of squares overflowed (float32 terms of 1e18:
    NaN or silently zero shares) or underflowed (1e-25: all NaN).  Both the core and the
    reference rescale the terms by a power of two first."""
    terms = rng.standard_normal((4, 50, 3)) + rng.standard_normal((1, 50, 3))
    want = ref.interaction_shares(terms)
    scaled = (terms * scale).astype(dtype)
    np.testing.assert_allclose(ref.interaction_shares(scaled), ref.interaction_shares(scaled.astype(np.float64) / scale), rtol=1e-12, atol=1e-12)
    got = np.asarray(mmfuse.interaction_shares(xp.asarray(scaled, dtype)))
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("small", [1e-10, 1e-17])
def test_variance_shares_of_small_terms_beside_a_large_constant(xp, small, rng):
    """A constant order-0 term of 1 beside varying terms of 1e-10: y = sum_k T_k absorbed the
    small terms before its centring (shares off by 8e-8), and at 1e-17 gave NaN, where the
    exact shares are 0 for the constant and the small terms' own.  Each term is centred
    before the sum, in the core and in the reference (a review's find)."""
    varying = small * rng.standard_normal((2, 16, 3))
    terms = np.concatenate([np.ones((1, 16, 3)), varying])
    y = varying.sum(axis=0) - varying.sum(axis=0).mean(axis=0)
    exact = np.array([0.0] + [float(((v - v.mean(axis=0)) * y).sum() / (y * y).sum()) for v in varying])
    np.testing.assert_allclose(ref.interaction_shares(terms), exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(mmfuse.interaction_shares(xp.asarray(terms))), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dtype", "large", "small"), [("float32", 1e12, 1e-12), ("float64", 1e150, 1e-150)])
def test_variance_shares_of_deviations_far_below_a_constant_term(xp, dtype, large, small, rng):
    """The terms were scaled by the largest before their centring only: beside a constant
    term 1e24 (float32) or 1e300 (float64) times larger, the varying terms' deviations
    underflowed when squared, and every share was NaN (a review's find).  The deviations are
    scaled again: the constant's share is 0 and the others those of the varying terms alone,
    in the core and in the reference.  (Deviations that the first scaling makes subnormal,
    past 2**-1022 times the largest term in float64, keep only their remaining bits.)"""
    varying = rng.standard_normal((2, 16, 3))
    y = varying.sum(axis=0) - varying.sum(axis=0).mean(axis=0)
    exact = np.array([0.0] + [float(((v - v.mean(axis=0)) * y).sum() / (y * y).sum()) for v in varying])
    terms = np.concatenate([np.full((1, 16, 3), large), small * varying]).astype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(ref.interaction_shares(terms), exact, rtol=tol, atol=tol)
    got = np.asarray(mmfuse.interaction_shares(xp.asarray(terms, dtype)))
    np.testing.assert_allclose(got, exact, rtol=tol, atol=tol)
    if importlib.util.find_spec("dask") is not None:  # (Dask's own maximum: dask_max)
        import dask.array as da

        lazy = mmfuse.interaction_shares(da.from_array(terms, chunks=(1, 5, 3)))
        np.testing.assert_allclose(np.asarray(lazy.compute()), exact, rtol=tol, atol=tol)


def test_shares_of_no_terms_and_of_long_doubles(xp):
    """K = 0 gives no shares (the rescaling's max over nothing raised NumPy's and torch's own
    errors); a long double input is rescaled within its own exponents (within float64's,
    terms of 1e3000 and 1e-3000 gave NaN: a review's find)."""
    got = mmfuse.interaction_shares(xp.asarray(np.zeros((0, 4, 5))))
    assert tuple(got.shape) == (0,)
    terms = np.random.default_rng().standard_normal((3, 4, 5))
    want = ref.interaction_shares(terms)
    scales = ["1", "1e3000", "1e-3000"] if np.finfo(np.longdouble).maxexp > 1024 else ["1"]
    for scale in scales:
        got = mmfuse.interaction_shares(terms.astype(np.longdouble) * np.longdouble(scale))
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-12, err_msg=scale)


@pytest.mark.parametrize("kind", ["variance", "norm"])
def test_shares_of_an_empty_batch_are_nan_in_the_reference_too(kind):
    """B = 0: NaN shares from the core and from the reference (whose batch means had warned
    "Mean of empty slice", an error under this suite's filters; a review's find)."""
    terms = np.random.default_rng().standard_normal((3, 0, 2))
    for got in (ref.interaction_shares(terms, kind=kind), mmfuse.interaction_shares(terms, kind=kind)):
        assert got.shape == (3,) and np.all(np.isnan(got))


def test_shares_name_a_masked_array_terms():
    with pytest.raises(TypeError, match=r"^terms is a numpy.ma.MaskedArray"):
        mmfuse.interaction_shares(np.ma.masked_array(np.ones((2, 3, 1))))


def test_shares_nan_when_output_constant():
    terms = np.ones((3, 4, 2))
    shares = mmfuse.interaction_shares(terms)
    assert shares.shape == (3,) and np.all(np.isnan(shares))


# --------------------------------------------------------------------------- dask and jax


@pytest.mark.parametrize("kind", KINDS)
def test_dask_lazy_and_equal(kind, rng):
    da = pytest.importorskip("dask.array")
    p = _problem(rng, 3, batch=11)

    def conv(a):
        a = np.asarray(a)
        if a.ndim >= 1 and a.shape[0] == 11:
            return da.from_array(a, chunks=(4, *a.shape[1:]))
        return da.from_array(a, chunks=a.shape)

    terms, _, _ = _call(kind, p, conv, by="order", present=kind != "tensor")
    assert isinstance(terms, da.Array)
    assert_close(terms.compute(), _reference(kind, p, present=kind != "tensor")[0])


@pytest.mark.parametrize("kind", KINDS)
def test_dask_empty_batch_chunk_and_parameters_in_several_chunks(kind, rng):
    """A batch chunk with no samples (what boolean filtering and ``compute_chunk_sizes()``
    leave): Dask's own max, in interaction_shares' scaling, failed on compute.  Parameters in
    several chunks: tensor_interactions split the terms' chunks by its weight's (a
    PerformanceWarning, an error under filterwarnings=error), where tensor_fusion took the
    weight in one chunk."""
    da = pytest.importorskip("dask.array")
    p = _problem(rng, 3, batch=11)

    def conv(a):
        a = np.asarray(a)
        if a.ndim >= 1 and a.shape[0] == 11:
            return da.from_array(a, chunks=((5, 0, 6), *a.shape[1:]))
        return da.from_array(a, chunks=2)

    terms, _, _ = _call(kind, p, conv, by="order", present=kind != "tensor")
    want = _reference(kind, p, present=kind != "tensor")[0]
    assert terms.chunks[1] == (5, 0, 6)
    assert_close(terms.compute(), want)
    for how in ("variance", "norm"):
        assert_close(mmfuse.interaction_shares(terms, kind=how).compute(), ref.interaction_shares(want, kind=how))


@pytest.mark.parametrize("kind", KINDS)
def test_jax_eager_and_jit(kind, rng):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    p = _problem(rng, 3)
    want = _reference(kind, p, by="subset", present=kind != "tensor")[0]

    def run(xs):
        q = dict(p)
        q["xs"] = xs
        return _call(kind, q, jnp.asarray, by="subset", present=kind != "tensor")[0]

    xs = [jnp.asarray(x) for x in p["xs"]]
    assert_close(run(xs), want)
    assert_close(jax.jit(run)(xs), want)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("kind", ["lowrank", "cp"])
def test_numpy_order_path_over_several_blocks(kind, rank, rng, monkeypatch):
    """The NumPy fast path of LMF and CP by order (reused buffers), with blocks made small:
    one tile of the constants' rows a block (LMF: 256 rows), the last one short (untiled)."""
    from mmfuse._core import interactions as core

    monkeypatch.setattr(core, "_ORDER_ARRAY_BYTES", 64)
    p = _problem(rng, 3, batch=600, rank=rank, out_dim=2)
    terms, _, fused = _call(kind, p, np.asarray, present=True)
    assert_close(terms, _reference(kind, p, present=True)[0])
    assert_close(terms.sum(axis=0), fused)
    f32 = lambda a: a if a.dtype == bool else np.asarray(a, np.float32)  # noqa: E731
    terms32, _, _ = _call(kind, p, f32, present=True)
    assert terms32.dtype == np.float32


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_single_batch(xp, kind, batch, rng):
    p = _problem(rng, 3, batch=batch)
    for by in ("order", "subset"):
        terms, labels, fused = _call(kind, p, xp.asarray, by=by, present=kind != "tensor")
        assert tuple(terms.shape) == (len(labels), batch, 2)
        assert_close(_sum0(xp, terms), fused, xp=xp.xp)
    shares = mmfuse.interaction_shares(terms)
    assert tuple(shares.shape) == (len(labels),)
    if batch == 0:
        assert np.all(np.isnan(np.asarray(shares)))


@pytest.mark.parametrize("size", ["rank 0", "h 0"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_rank_or_no_output_matches_the_reference(xp, kind, size, rng):
    """R = 0 (an empty rank sum: zero terms) and h = 0 (empty terms): the reference's answer
    on every path (the NumPy order recursion divided by the empty slabs' widths)."""
    if kind == "tensor" and size == "rank 0":
        pytest.skip("TFN has no rank")
    p = _problem(rng, 3, **({"rank": 0} if size == "rank 0" else {"out_dim": 0}))
    for by in ("order", "subset"):
        want, _, _ = _call(kind, p, np.asarray, by=by, backend="reference")
        for backend in (None, "array_api"):
            got, _, _ = _call(kind, p, xp.asarray, by=by, backend=backend)
            assert tuple(got.shape) == want.shape
            assert_close(got, want, xp=xp.xp)


# --------------------------------------------------------------------------- mmfuse.nn


@pytest.mark.parametrize("layer_kind", ["lowrank", "cp", "tensor"])
def test_nn_layer_interactions_sum_to_forward_and_carry_gradients(layer_kind):
    torch = pytest.importorskip("torch")
    from mmfuse import nn as mnn

    torch.manual_seed(0)
    dims = [3, 2, 2]
    if layer_kind == "lowrank":
        layer = mnn.LowRankFusion(dims, out_dim=4, rank=3, dtype=torch.float64)
    elif layer_kind == "cp":
        layer = mnn.CPFusion(dims, out_dim=4, rank=3, dtype=torch.float64)
    else:
        layer = mnn.TensorFusion(dims, out_dim=4, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    xs = [torch.randn(6, d, dtype=torch.float64, requires_grad=True) for d in dims]
    opts = {}
    if layer_kind != "tensor":
        opts["present"] = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) < 0.7
    for by in ("order", "subset"):
        terms, labels = layer.interactions(xs, by=by, **opts)
        assert tuple(terms.shape) == (len(labels), 6, 4)
        assert_close(terms.sum(0) + layer.bias, layer(xs, **opts))
    terms[-1].sum().backward()  # gradients reach the inputs and the parameters
    assert xs[0].grad is not None and all(p.grad is not None for p in layer.parameters() if p is not layer.bias)
    with pytest.raises(ValueError, match=r"xs\[1\] must have shape \(B, 2\), got \(6, 5\)"):
        layer.interactions([xs[0], torch.randn(6, 5, dtype=torch.float64), xs[2]])


@pytest.mark.parametrize("layer_kind", ["lowrank", "cp", "tensor"])
def test_nn_layer_interactions_refuse_by_the_layers_own_max_elements(layer_kind):
    """A layer's ``interactions(by="subset")`` is refused over the layer's ``max_elements``,
    not the default: LowRankFusion's and CPFusion's had ignored theirs (a review's find)."""
    torch = pytest.importorskip("torch")
    from mmfuse import nn as mnn

    dims = [1, 1, 1, 1]
    kinds = {"lowrank": mnn.LowRankFusion, "cp": mnn.CPFusion, "tensor": mnn.TensorFusion}
    rank = {} if layer_kind == "tensor" else {"rank": 2}
    xs = [torch.randn(5, 1, dtype=torch.float64) for _ in dims]
    small = kinds[layer_kind](dims, out_dim=3, max_elements=200, dtype=torch.float64, **rank)
    with pytest.raises(ValueError, match=r"240 elements, over max_elements=200"):
        small.interactions(xs, by="subset")
    terms, labels = small.interactions(xs, by="order")  # M + 1 terms: 75 elements
    assert tuple(terms.shape) == (5, 5, 3) and labels == [0, 1, 2, 3, 4]


def test_variance_shares_of_a_term_whose_spread_is_ulps_of_its_mean(xp, rng):
    """A term of 1e12 + 1e-3 N(0, 1), its spread about 8 ulps of its mean: centred by one
    rounded mean it lost most of its deviations (the share off in its fifth digit, gradients
    by 1e7 ulps).  The corrected two-pass centring, in the core and in the reference, agrees
    with the shares in exact rational arithmetic of the same float64 data."""
    from fractions import Fraction

    terms = np.stack([1e12 + 1e-3 * rng.standard_normal((16, 2)), rng.standard_normal((16, 2))])
    exact = [[[Fraction(v) for v in row] for row in term] for term in terms]
    centred = []
    for term in exact:
        means = [sum(row[j] for row in term) / len(term) for j in range(2)]
        centred.append([[row[j] - means[j] for j in range(2)] for row in term])
    y = [[sum(t[b][j] for t in centred) for j in range(2)] for b in range(16)]
    den = sum(v * v for row in y for v in row)
    want = np.array([float(sum(t[b][j] * y[b][j] for b in range(16) for j in range(2)) / den) for t in centred])
    np.testing.assert_allclose(ref.interaction_shares(terms), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(mmfuse.interaction_shares(xp.asarray(terms))), want, rtol=1e-12, atol=1e-15)


def test_shares_of_subnormal_float32_terms_are_those_of_the_scaled_terms():
    """interaction_shares scales the terms before squaring, so float32 terms of about 1e-42
    (subnormal) have the shares of the same terms at unit size (a mutant dropping the scale's
    clamp gave NaN shares, and no test saw it)."""
    rng = np.random.default_rng()
    terms = rng.standard_normal((3, 6, 2)).astype(np.float32)
    tiny = (terms.astype(np.float64) * 1e-42).astype(np.float32)
    want = mmfuse.interaction_shares(tiny.astype(np.float64) * 1e42)
    np.testing.assert_allclose(mmfuse.interaction_shares(tiny), want, atol=1e-3)


@pytest.mark.parametrize("by", ["order", "subset"])
def test_dask_output_width_zero_gives_empty_terms(by, rng):
    """h = 0 on Dask: the core's reshapes split an empty axis, which Dask's reshape refuses
    (NotImplementedError in lowrank_interactions, tensor_interactions and tensor_fusion,
    where NumPy, torch, JAX and cp_interactions give empty results; a review's find)."""
    da = pytest.importorskip("dask.array")
    xs = [rng.standard_normal((5, 2)), rng.standard_normal((5, 3))]
    lazy = [da.from_array(x, chunks=(3, -1)) for x in xs]
    factors = [rng.standard_normal((2, 3, 0)), rng.standard_normal((2, 4, 0))]
    weight = rng.standard_normal((3, 4, 0))
    calls = {
        "lowrank_interactions": lambda a, f, w: mmfuse.lowrank_interactions(a, f, by=by)[0],
        "tensor_interactions": lambda a, f, w: mmfuse.tensor_interactions(a, w, by=by)[0],
        "tensor_fusion": lambda a, f, w: mmfuse.tensor_fusion(a, w),
    }
    for name, call in calls.items():
        want = call(xs, factors, weight)
        got = call(lazy, [da.from_array(f) for f in factors], da.from_array(weight))
        assert isinstance(got, da.Array), name
        assert got.compute().shape == want.shape and want.shape[-1] == 0, name


@pytest.mark.parametrize("kind", ["lowrank", "cp"])
@pytest.mark.parametrize(("by", "append_one"), [("subset", True), ("order", False)])
@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_generic_path_over_several_batch_blocks(kind, by, append_one, namespace, rng, monkeypatch):
    """Calls the order recursion does not serve (by subset, or without the constant) run the
    generic driver block by block: every block's rows are written, the ragged last one too
    (a dropped last block had left uninitialised rows that one unrelated test caught by
    chance; a mutation review)."""
    from mmfuse._core import interactions as core

    monkeypatch.setattr(core, "_BLOCK_BYTES", 1 << 10)  # blocks of 16 rows: 100 = 6 x 16 + 4
    p = _problem(rng, 3, batch=100, rank=3, out_dim=4, append_one=append_one)
    conv = (lambda a: a) if namespace == "numpy" else pytest.importorskip("torch").from_numpy
    assert len(core._blocks(np, p["xs"][0], 64)) > 2
    xs = [conv(x) for x in p["xs"]]
    if kind == "lowrank":
        got, labels = mmfuse.lowrank_interactions(xs, [conv(f) for f in p["factors"]], conv(p["weights"]),
                                                  by=by, append_one=append_one)  # fmt: skip
        want, want_labels = ref.lowrank_interactions(p["xs"], p["factors"], p["weights"], by=by, append_one=append_one)
    else:
        cp = (conv(p["cp"][0]), [conv(a) for a in p["cp"][1]])
        got, labels = mmfuse.cp_interactions(xs, cp, by=by, append_one=append_one)
        want, want_labels = ref.cp_interactions(p["xs"], p["cp"], by=by, append_one=append_one)
    assert labels == want_labels
    assert_close(got, want)


@pytest.mark.parametrize("kind", ["lowrank", "cp"])
def test_numpy_order_recursion_runs_on_tiled_rows(kind, rng, monkeypatch):
    """A block whose rows are a multiple of the tile runs on rows of tile x width elements
    with the constants tiled to match (the same bits as rows of one sample, 1.4x the time at
    B = 20000, M = 4: only the constants' reads show the path; a mutation review)."""
    from mmfuse._core import interactions as core

    read = []

    class Recorded(core.NumPyOrders):
        def __init__(self, const, prefix, tile, rows):
            super().__init__(const, prefix, tile, rows)
            read.append(tile)

            class Reads(dict):
                def __getitem__(self, t):
                    read.append(("const", t))
                    return super().__getitem__(t)

            self.const = Reads(self.const)

    monkeypatch.setattr(core, "NumPyOrders", Recorded)
    p = _problem(rng, 3, batch=512, rank=2, out_dim=8)
    if kind == "lowrank":
        got, _ = mmfuse.lowrank_interactions(p["xs"], p["factors"], p["weights"], backend="array_api")
        want, _ = ref.lowrank_interactions(p["xs"], p["factors"], p["weights"])
    else:
        cp = (p["cp"][0], [*p["cp"][1][:-1], rng.standard_normal((8, 2))])
        got, _ = mmfuse.cp_interactions(p["xs"], cp, backend="array_api")
        want, _ = ref.cp_interactions(p["xs"], cp)
    assert_close(got, want)
    tile = read[0]
    assert tile > 1 and ("const", tile) in read and ("const", 1) not in read, read
