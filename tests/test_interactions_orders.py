"""The blocked order recursion of LMF and CP interaction terms on NumPy arrays (issue 22's speed
work): NumPy's in-place recursion (:class:`mmfuse._core.interactions.NumPyOrders`, the
"numpy" variants) and the numba kernel (:mod:`mmfuse.backends._numba_interactions`) against
the float64 reference (its literal subset expansion, summed by order) on random problems:
float32 / float64, present masks, B = 0 and 1, M = 1 and 8, batches over several blocks with
and without a short last block, tiled (narrow) and untiled (wide) rows."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import mmfuse.reference as ref
from mmfuse._core import interactions as core
from mmfuse.testing import assert_close

HAS_NUMBA = importlib.util.find_spec("numba") is not None
IMPLS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba absent"))]


def _funcs(impl):
    if impl == "numpy":
        return core.lowrank_interactions_numpy, core.cp_interactions_numpy
    from mmfuse.backends import _numba_interactions as nbi

    return nbi.lowrank_interactions_cpu, nbi.cp_interactions_cpu


def _problem(rng, dims, *, batch, rank, out_dim, cp_rank=None):
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((rank, d + 1, out_dim)) / np.sqrt(d + 1) for d in dims]
    weights = rng.standard_normal(rank)
    cr = rank if cp_rank is None else cp_rank
    cp = (
        rng.standard_normal(cr),
        [rng.standard_normal((d + 1, cr)) / np.sqrt(d + 1) for d in dims]
        + [rng.standard_normal((out_dim, cr))],
    )
    present = rng.random((batch, len(dims))) < 0.7
    return xs, factors, weights, cp, present


def _cast(obj, dtype):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj if obj is None else np.asarray(obj, dtype=dtype)


def _run(impl, kind, prob, dtype, *, present):
    xs, factors, weights, cp, pres = prob
    low, cpf = _funcs(impl)
    pres = pres if present else None
    if kind == "lowrank":
        return low(_cast(xs, dtype), _cast(factors, dtype), _cast(weights, dtype), present=pres)
    return cpf(_cast(xs, dtype), (_cast(cp[0], dtype), _cast(cp[1], dtype)), present=pres)


def _want(kind, prob, *, present):
    xs, factors, weights, cp, pres = prob
    pres = pres if present else None
    if kind == "lowrank":
        return ref.lowrank_interactions(xs, factors, weights, present=pres)
    return ref.cp_interactions(xs, cp, present=pres)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["lowrank", "cp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("dims", "batch", "rank", "out_dim", "cp_rank"),
    [
        ((3,), 37, 2, 3, 2),  # M = 1
        ((4, 2, 5, 1, 3, 2, 2, 3), 29, 3, 4, 3),  # M = 8
        # several blocks (LMF: 1344 rows in float32, 672 in float64; CP: 1024 / 512), the
        # last one short, untiled (LMF: 312 rows, 32 a tile) or tiled (CP: 952 / 440, 8)
        ((5, 3, 4), 3000, 3, 16, 64),
        ((2, 3), 300, 2, 600, 600),  # rows wider than a tile: no tiling
        ((4, 2, 3, 2), 1, 2, 3, 5),  # B = 1
        ((4, 2, 3, 2), 0, 2, 3, 5),  # B = 0
    ],
)
@pytest.mark.parametrize("present", [False, True])
def test_orders_match_reference(impl, kind, dtype, dims, batch, rank, out_dim, cp_rank, present, rng):
    prob = _problem(rng, dims, batch=batch, rank=rank, out_dim=out_dim, cp_rank=cp_rank)
    terms, labels = _run(impl, kind, prob, dtype, present=present)
    want, want_labels = _want(kind, prob, present=present)
    assert labels == want_labels == list(range(len(dims) + 1))
    assert terms.dtype == dtype and terms.shape == (len(dims) + 1, batch, out_dim)
    assert_close(terms, want)


@pytest.mark.parametrize("kind", ["lowrank", "cp"])
def test_order_recursion_equals_subset_sum_large_m(kind, rng):
    """M = 8 with a CP rank other than h: the recursion against the reference's subsets."""
    prob = _problem(rng, (3,) * 8, batch=70, rank=4, out_dim=5, cp_rank=7)
    terms, _ = _run("numpy", kind, prob, np.float64, present=True)
    xs, factors, weights, cp, pres = prob
    if kind == "lowrank":
        subsets, labels = ref.lowrank_interactions(xs, factors, weights, by="subset", present=pres)
    else:
        subsets, labels = ref.cp_interactions(xs, cp, by="subset", present=pres)
    by_order = np.stack([sum(subsets[i] for i, s in enumerate(labels) if len(s) == k) for k in range(9)])
    assert_close(terms, by_order)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba absent")
@pytest.mark.parametrize("kind", ["lowrank", "cp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernel_is_numpy_recursion_to_the_bit(kind, dtype, rng):
    """Same operations in the same order (no fused multiply-add): identical coefficients."""
    prob = _problem(rng, (6, 3, 5, 2, 4), batch=777, rank=3, out_dim=8)
    a, _ = _run("numpy", kind, prob, dtype, present=True)
    b, _ = _run("numba", kind, prob, dtype, present=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba absent")
@pytest.mark.parametrize("kind", ["lowrank", "cp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernel_runs_float32_and_float64_on_tiled_rows(kind, dtype, rng, monkeypatch):
    """Both dtypes reach the compiled recursion, and a block whose rows are a multiple of the
    tile runs on rows of tile x width elements (the constants tiled to match): the NumPy core
    for float32, or rows of one sample, give the same bits (the recursion is the same), so
    only the kernel's calls show the path (a mutation review: the untiled rows were 3x slower
    at B = 20000, M = 6)."""
    from mmfuse.backends import _numba_orders

    seen, compiled = [], _numba_orders.coefficients

    def spy(proj, const, prefix, coef):
        seen.append((proj.shape, proj.dtype, const.shape[-1]))
        return compiled(proj, const, prefix, coef)

    monkeypatch.setattr(_numba_orders, "coefficients", spy)
    prob = _problem(rng, (6, 3, 5), batch=512, rank=3, out_dim=8, cp_rank=8)  # 64-sample tiles
    terms, _ = _run("numba", kind, prob, dtype, present=True)
    assert_close(terms, _want(kind, prob, present=True)[0])
    assert seen and all(d == dtype for _, d, _ in seen)
    rows = {shape[-1] for shape, _, _ in seen}
    assert rows == {const for _, _, const in seen} and min(rows) > 8, seen  # tiles of samples


@pytest.mark.skipif(not HAS_NUMBA, reason="numba absent")
def test_numba_other_calls_and_inputs(rng):
    """By subset, append_one=False and float16 run the NumPy core; read-only and
    non-contiguous inputs are read, never written; NaN in absent samples is never read."""
    from mmfuse.backends import _numba_interactions as nbi

    xs, factors, weights, cp, pres = _problem(rng, (3, 2, 4), batch=50, rank=2, out_dim=3)
    terms, labels = nbi.lowrank_interactions_cpu(xs, factors, weights, by="subset", present=pres)
    want, want_labels = ref.lowrank_interactions(xs, factors, weights, by="subset", present=pres)
    assert labels == want_labels
    assert_close(terms, want)
    cut = [f[:, :-1, :] for f in factors]
    terms, _ = nbi.lowrank_interactions_cpu(xs, cut, weights, append_one=False)
    assert_close(terms, ref.lowrank_interactions(xs, cut, weights, append_one=False)[0])
    half, _ = nbi.cp_interactions_cpu(
        _cast(xs, np.float16), (_cast(cp[0], np.float16), _cast(cp[1], np.float16))
    )
    assert half.dtype == np.float16
    # non-contiguous, read-only, NaN where absent
    wide = [np.repeat(x, 2, axis=1)[:, ::2] for x in xs]
    for x in wide:
        x[~pres[:, 0]] = np.nan if x is wide[0] else x[~pres[:, 0]]
        x.flags.writeable = False
    frozen = [np.array(f) for f in factors]
    for f in frozen:
        f.flags.writeable = False
    terms, _ = nbi.lowrank_interactions_cpu(wide, frozen, weights, present=pres)
    want, _ = ref.lowrank_interactions([np.array(x) for x in wide], factors, weights, present=pres)
    assert_close(terms, want)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba absent")
@pytest.mark.parametrize("kind", ["lowrank", "cp"])
def test_numba_takes_torch_cpu_tensors(kind, rng):
    torch = pytest.importorskip("torch")
    from mmfuse.backends import _numba_interactions as nbi

    xs, factors, weights, cp, pres = _problem(rng, (3, 2, 4), batch=40, rank=2, out_dim=3)
    t = torch.from_numpy
    if kind == "lowrank":
        terms, _ = nbi.lowrank_interactions_cpu(
            [t(x) for x in xs], [t(f) for f in factors], t(weights), present=t(pres)
        )
        want, _ = ref.lowrank_interactions(xs, factors, weights, present=pres)
    else:
        terms, _ = nbi.cp_interactions_cpu([t(x) for x in xs], (None, [t(a) for a in cp[1]]), present=t(pres))
        want, _ = ref.cp_interactions(xs, (None, cp[1]), present=pres)
    assert isinstance(terms, torch.Tensor) and terms.dtype == torch.float64
    assert_close(terms, want)
