"""Everything CP in mmfuse against TensorLy as an independent oracle (DESIGN.md, section 3).

The oracle never calls mmfuse: it rebuilds the full TFN weight with ``tensorly.cp_to_tensor``
(weights None -> ones, as TensorLy does), appends the constant 1 to each modality (last) when
``append_one=True``, zeroes an absent modality's features (so it contributes only its
constant; with ``append_one=False`` it zeroes the product), and contracts the full tensor with
every modality's vector by ``einsum``.  An interaction term T_S is the contraction of the full
tensor's sub-block where the modes in S keep their feature rows and the others take their
constant row (the last index of each mode).

Covered: ``cp_fusion`` (NumPy float64/float32, torch CPU values and gradients),
``cp_interactions`` by order and by subset, ``mmfuse.nn.CPFusion`` (forward, ``interactions``
and ``from_cp``), and ``cp_to_lowrank`` through ``lowrank_fusion`` and ``lowrank_to_tensor``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import mmfuse
from mmfuse.testing import assert_close

tl = pytest.importorskip("tensorly")

DIMS = (3, 1, 4)  # d_m of the first M modalities (a single-feature modality among them)
RANK, OUT = 4, 3
MODALITIES = [1, 2, 3]
BATCHES = [1, 7]
TIGHT = 1e-12  # float64 against the float64 oracle


# --------------------------------------------------------------------------- the oracle


def _tl_full(weights, factors):
    """The full weight tensor (D_1, ..., D_M, h) from TensorLy, in float64."""
    full = tl.cp_to_tensor((weights, list(factors)))
    return np.asarray(tl.to_numpy(full), dtype=np.float64)


def _contract(full, vecs, batch):
    """sum_{i_1..i_M} full[i_1, ..., i_M, :] * prod_m vecs[m][b, i_m], for every sample b."""
    n = len(vecs)
    if n == 0:
        return np.broadcast_to(full, (batch, full.shape[-1])).copy()
    operands = [full, [*range(n), n]]
    for m, v in enumerate(vecs):
        operands += [v, [n + 1, m]]
    return np.einsum(*operands, [n + 1, n])


def _features(xs, present):
    """The modalities' features in float64, zeroed where ``present`` says absent."""
    out = []
    for m, x in enumerate(xs):
        x = np.array(x, dtype=np.float64)
        if present is not None:
            x[~np.asarray(present)[:, m]] = 0.0
        out.append(x)
    return out


def oracle_fusion(xs, weights, factors, bias=None, *, append_one=True, present=None):
    full = _tl_full(weights, factors)
    feats = _features(xs, present)
    hats = [np.concatenate([x, np.ones((x.shape[0], 1))], axis=1) if append_one else x for x in feats]
    y = _contract(full, hats, feats[0].shape[0])
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def _subsets(n):
    """The subsets of range(n) as sorted tuples, by size then lexicographically."""
    return [s for k in range(n + 1) for s in itertools.combinations(range(n), k)]


def oracle_subset_terms(xs, weights, factors, *, append_one=True, present=None):
    full = _tl_full(weights, factors)
    feats = _features(xs, present)
    n, batch = len(feats), feats[0].shape[0]
    terms = []
    for s in _subsets(n):
        if not append_one:  # no constant: hat x = x, only the full subset survives
            terms.append(_contract(full, feats, batch) if len(s) == n else np.zeros((batch, full.shape[-1])))
            continue
        # modes in s: their feature rows (all but the last); the others: their constant row
        block = full[tuple(slice(0, x.shape[1]) if m in s else -1 for m, x in enumerate(feats))]
        terms.append(_contract(block, [feats[m] for m in s], batch))
    return np.stack(terms), _subsets(n)


def oracle_order_terms(xs, weights, factors, *, append_one=True, present=None):
    by_subset, subsets = oracle_subset_terms(xs, weights, factors, append_one=append_one, present=present)
    n = len(xs)
    terms = np.zeros((n + 1, *by_subset.shape[1:]))
    for s, t in zip(subsets, by_subset):
        terms[len(s)] += t
    return terms, list(range(n + 1))


# --------------------------------------------------------------------------- random problems


def _problem(rng, n, batch, *, append_one=True, weighted=True, rank=RANK, out=OUT):
    dims = DIMS[:n]
    extra = int(append_one)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((d + extra, rank)) for d in dims] + [rng.standard_normal((out, rank))]
    weights = rng.standard_normal(rank) if weighted else None
    bias = rng.standard_normal(out) if weighted else None
    return xs, weights, factors, bias


def _present(rng, batch, n):
    """A random (B, M) mask with at least one absent entry, and one present where B M > 1."""
    present = rng.random((batch, n)) < 0.5
    present[0, 0] = False
    if batch * n > 1:
        present[-1, -1] = True
    return present


def _cast(a, dtype):
    return None if a is None else np.asarray(a, dtype=dtype)


def _cast_problem(xs, weights, factors, bias, dtype):
    return [_cast(x, dtype) for x in xs], _cast(weights, dtype), [_cast(f, dtype) for f in factors], _cast(bias, dtype)


# --------------------------------------------------------------------------- cp_fusion, NumPy


@pytest.mark.parametrize("backend", ["auto", "array_api", "reference"])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_numpy_float64(rng, n, batch, weighted, append_one, backend):
    xs, weights, factors, bias = _problem(rng, n, batch, append_one=append_one, weighted=weighted)
    got = mmfuse.cp_fusion(xs, (weights, factors), bias, append_one=append_one, backend=backend)
    want = oracle_fusion(xs, weights, factors, bias, append_one=append_one)
    assert_close(got, want, rtol=TIGHT, xp=np, dtype=np.float64)


@pytest.mark.parametrize("backend", ["auto", "array_api", "reference"])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_numpy_present(rng, n, batch, append_one, backend):
    xs, weights, factors, bias = _problem(rng, n, batch, append_one=append_one)
    present = _present(rng, batch, n)
    got = mmfuse.cp_fusion(xs, (weights, factors), bias, append_one=append_one, present=present, backend=backend)
    want = oracle_fusion(xs, weights, factors, bias, append_one=append_one, present=present)
    assert_close(got, want, rtol=TIGHT, xp=np, dtype=np.float64)


@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_ignores_nan_features_of_absent_modalities(rng, n):
    """``present`` is documented as in ``lowrank_fusion``: NaNs where a modality is absent are
    ignored (the modality contributes only its constant)."""
    xs, weights, factors, bias = _problem(rng, n, 7)
    present = _present(rng, 7, n)
    poisoned = [np.where(present[:, [m]], x, np.nan) for m, x in enumerate(xs)]
    got = mmfuse.cp_fusion(poisoned, (weights, factors), bias, present=present)
    assert_close(got, oracle_fusion(xs, weights, factors, bias, present=present), rtol=TIGHT)


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_numpy_float32(rng, n, append_one, with_present):
    xs, weights, factors, bias = _problem(rng, n, 7, append_one=append_one)
    present = _present(rng, 7, n) if with_present else None
    xs32, w32, f32, b32 = _cast_problem(xs, weights, factors, bias, "float32")
    got = mmfuse.cp_fusion(xs32, (w32, f32), b32, append_one=append_one, present=present)
    want = oracle_fusion(xs32, w32, f32, b32, append_one=append_one, present=present)
    assert_close(got, want, xp=np, dtype=np.float32)  # the float32 default tolerance


@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_accepts_a_tensorly_cptensor(rng, n, weighted):
    xs, weights, factors, bias = _problem(rng, n, 7, weighted=weighted)
    cp = tl.cp_tensor.CPTensor((weights, factors))
    got = mmfuse.cp_fusion(xs, cp, bias)
    assert_close(got, oracle_fusion(xs, weights, factors, bias), rtol=TIGHT)


# --------------------------------------------------------------------------- cp_fusion, torch


@pytest.mark.parametrize("backend", ["auto", "torch", "array_api"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_torch_values(rng, n, batch, weighted, append_one, with_present, dtype, backend):
    torch = pytest.importorskip("torch")
    xs, weights, factors, bias = _problem(rng, n, batch, append_one=append_one, weighted=weighted)
    present = _present(rng, batch, n) if with_present else None
    xs, weights, factors, bias = _cast_problem(xs, weights, factors, bias, dtype)

    def t(a):
        return None if a is None else torch.from_numpy(np.array(a))

    got = mmfuse.cp_fusion([t(x) for x in xs], (t(weights), [t(f) for f in factors]), t(bias),
                           append_one=append_one, present=t(present), backend=backend)
    want = oracle_fusion(xs, weights, factors, bias, append_one=append_one, present=present)
    assert_close(got, want, rtol=TIGHT if dtype == "float64" else None, xp=torch,
                 dtype=getattr(torch, dtype), device="cpu")


def _torch_oracle_fusion(torch, xs, weights, factors, bias, *, append_one, present):
    """The same oracle in torch float64 (TensorLy's PyTorch backend), for autograd."""
    with tl.backend_context("pytorch"):
        full = tl.cp_to_tensor((weights, list(factors)))
    n, batch = len(xs), xs[0].shape[0]
    hats = []
    for m, x in enumerate(xs):
        if present is not None:
            x = x * present[:, m : m + 1].to(x.dtype)
        hats.append(torch.cat([x, torch.ones(batch, 1, dtype=x.dtype)], dim=1) if append_one else x)
    operands = [full, [*range(n), n]]
    for m, h in enumerate(hats):
        operands += [h, [n + 1, m]]
    y = torch.einsum(*operands, [n + 1, n])
    return y if bias is None else y + bias


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_fusion_torch_gradients_match_autograd_of_the_full_tensor(rng, n, weighted, append_one, with_present):
    torch = pytest.importorskip("torch")
    xs, weights, factors, bias = _problem(rng, n, 7, append_one=append_one, weighted=weighted)
    present = torch.from_numpy(_present(rng, 7, n)) if with_present else None
    upstream = torch.from_numpy(rng.standard_normal((7, OUT)))
    arrays = [*xs, *factors] + ([weights, bias] if weighted else [])

    def leaves():
        return [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]

    def unpack(ls):
        w, b = (ls[-2], ls[-1]) if weighted else (None, None)
        return ls[:n], w, ls[n : 2 * n + 1], b

    mine = leaves()
    x, w, f, b = unpack(mine)
    got = mmfuse.cp_fusion(x, (w, f), b, append_one=append_one, present=present)
    got_grads = torch.autograd.grad((got * upstream).sum(), mine)

    theirs = leaves()
    x, w, f, b = unpack(theirs)
    want = _torch_oracle_fusion(torch, x, w, f, b, append_one=append_one, present=present)
    want_grads = torch.autograd.grad((want * upstream).sum(), theirs)

    assert_close(got, want.detach(), rtol=TIGHT)
    for i, (g, h) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, h, rtol=TIGHT, err_msg=f"gradient of leaf {i}")


# --------------------------------------------------------------------------- cp_interactions


@pytest.mark.parametrize("torch_inputs", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("by", ["order", "subset"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_interactions_against_tensorly_sub_blocks(rng, n, batch, by, append_one, with_present, torch_inputs):
    xs, weights, factors, _ = _problem(rng, n, batch, append_one=append_one)
    present = _present(rng, batch, n) if with_present else None
    conv = np.asarray
    if torch_inputs:
        torch = pytest.importorskip("torch")
        conv = torch.from_numpy
    terms, labels = mmfuse.cp_interactions(
        [conv(x) for x in xs], (conv(weights), [conv(f) for f in factors]), by=by,
        present=None if present is None else conv(present), append_one=append_one,
    )
    oracle = oracle_order_terms if by == "order" else oracle_subset_terms
    want, want_labels = oracle(xs, weights, factors, append_one=append_one, present=present)
    assert [tuple(s) if by == "subset" else int(s) for s in labels] == want_labels
    # each term is judged on the scale of all of them (a term may cancel to near zero)
    assert_close(terms, want, rtol=TIGHT)
    total = oracle_fusion(xs, weights, factors, append_one=append_one, present=present)
    assert_close(np.asarray(want).sum(axis=0), total, rtol=TIGHT)  # (the oracle's own check)


@pytest.mark.parametrize("by", ["order", "subset"])
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_interactions_weights_none_and_float32(rng, n, by):
    xs, _, factors, _ = _problem(rng, n, 7, weighted=False)
    present = _present(rng, 7, n)
    xs32, f32 = [_cast(x, np.float32) for x in xs], [_cast(f, np.float32) for f in factors]
    terms, _ = mmfuse.cp_interactions(xs32, tl.cp_tensor.CPTensor((None, f32)), by=by, present=present)
    oracle = oracle_order_terms if by == "order" else oracle_subset_terms
    want, _ = oracle(xs32, None, f32, present=present)
    assert_close(terms, want, dtype=np.float32)


# --------------------------------------------------------------------------- mmfuse.nn.CPFusion


def _randomise(torch, layer, rng):
    """Every parameter of ``layer`` random (the bias too, which starts at zero)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))


def _params(layer):
    weights = layer.weights.detach().double().numpy()
    factors = [f.detach().double().numpy() for f in layer.factors]
    bias = None if layer.bias is None else layer.bias.detach().double().numpy()
    return weights, factors, bias


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cpfusion_layer_forward_and_interactions(rng, n, batch, append_one, with_present, dtype):
    torch = pytest.importorskip("torch")
    from mmfuse.nn import CPFusion

    tdtype = getattr(torch, dtype)
    layer = CPFusion(DIMS[:n], OUT, RANK, append_one=append_one, dtype=tdtype)
    _randomise(torch, layer, rng)
    weights, factors, bias = _params(layer)
    assert [f.shape for f in factors] == [(d + int(append_one), RANK) for d in DIMS[:n]] + [(OUT, RANK)]
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d in DIMS[:n]]
    present = _present(rng, batch, n) if with_present else None
    txs = [torch.from_numpy(x) for x in xs]
    tpresent = None if present is None else torch.from_numpy(present)
    rtol = TIGHT if dtype == "float64" else None
    with torch.no_grad():
        got = layer(txs, present=tpresent)
        assert_close(got, oracle_fusion(xs, weights, factors, bias, append_one=append_one, present=present),
                     rtol=rtol, xp=torch, dtype=tdtype)
        terms, _ = layer.interactions(txs, by="subset", present=tpresent)
    want, _ = oracle_subset_terms(xs, weights, factors, append_one=append_one, present=present)
    assert_close(terms, want, rtol=rtol, dtype=tdtype)


@pytest.mark.parametrize("container", ["tuple", "CPTensor"])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("n", MODALITIES)
def test_cpfusion_from_cp_against_tensorly(rng, n, weighted, append_one, container):
    torch = pytest.importorskip("torch")
    from mmfuse.nn import CPFusion

    xs, weights, factors, bias = _problem(rng, n, 7, append_one=append_one, weighted=weighted)
    cp = (weights, factors) if container == "tuple" else tl.cp_tensor.CPTensor((weights, factors))
    layer = CPFusion.from_cp(cp, None if bias is None else torch.from_numpy(bias), append_one=append_one,
                             dtype=torch.float64)
    present = _present(rng, 7, n)
    with torch.no_grad():
        got = layer([torch.from_numpy(x) for x in xs], present=torch.from_numpy(present))
    # judged against the arrays given to from_cp, not the layer's copies of them
    want = oracle_fusion(xs, weights, factors, bias, append_one=append_one, present=present)
    assert_close(got, want, rtol=TIGHT, dtype=torch.float64)


# --------------------------------------------------------------------------- cp_to_lowrank


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights=None", "weights"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_to_lowrank_fuses_like_tensorly(rng, n, batch, weighted, append_one, with_present):
    xs, weights, factors, bias = _problem(rng, n, batch, append_one=append_one, weighted=weighted)
    present = _present(rng, batch, n) if with_present else None
    low_factors, low_weights = mmfuse.cp_to_lowrank((weights, factors))
    extra = int(append_one)
    assert [tuple(f.shape) for f in low_factors] == [(RANK, d + extra, OUT) for d in DIMS[:n]]
    assert tuple(low_weights.shape) == (RANK,)
    got = mmfuse.lowrank_fusion(xs, low_factors, low_weights, bias, append_one=append_one, present=present)
    want = oracle_fusion(xs, weights, factors, bias, append_one=append_one, present=present)
    assert_close(got, want, rtol=TIGHT)
    # and the converted factors rebuild TensorLy's full tensor
    assert_close(mmfuse.lowrank_to_tensor(low_factors, low_weights), _tl_full(weights, factors), rtol=TIGHT)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", MODALITIES)
def test_cp_to_lowrank_on_torch(rng, n, dtype):
    torch = pytest.importorskip("torch")
    xs, weights, factors, bias = _problem(rng, n, 7)
    xs, weights, factors, bias = _cast_problem(xs, weights, factors, bias, dtype)
    present = _present(rng, 7, n)
    low_factors, low_weights = mmfuse.cp_to_lowrank(
        tl.cp_tensor.CPTensor((torch.from_numpy(weights), [torch.from_numpy(f) for f in factors]))
    )
    got = mmfuse.lowrank_fusion([torch.from_numpy(x) for x in xs], low_factors, low_weights, torch.from_numpy(bias),
                                present=torch.from_numpy(present))
    want = oracle_fusion(xs, weights, factors, bias, present=present)
    assert_close(got, want, rtol=TIGHT if dtype == "float64" else None, xp=torch, dtype=getattr(torch, dtype))
