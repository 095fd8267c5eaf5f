"""The torch backend's custom ops: values and gradients against the core and the reference,
opcheck, gradcheck / gradgradcheck, dispatch under "auto", and what the backward saves."""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
import mmfuse.reference as ref  # noqa: E402
from mmfuse._namespace import array_namespace  # noqa: E402
from mmfuse.backends import (  # noqa: E402
    _conditions,
    available,
    implementations,
    lookup,
)
from mmfuse.testing import assert_close  # noqa: E402

tb = pytest.importorskip("mmfuse.backends.torch")
tbl = pytest.importorskip("mmfuse.backends.torch.lowrank")
tbc = pytest.importorskip("mmfuse.backends.torch._common")

# lowrank_fusion keeps its projections for small problems (_keeps_projections) and recomputes
# them otherwise; the small problems of these tests run both ways.
PATHS = ["chosen", "recompute"]


@contextlib.contextmanager
def _lowrank_path(path):
    """Context: ``"recompute"`` forces the custom op's memory-lean path whatever the sizes
    (small batches otherwise run whole-batch, without the op)."""
    if path != "recompute":
        yield
        return
    with mock.patch.object(tbl, "_keeps_projections", lambda xs, factors: False), \
            mock.patch.object(tbl, "whole_batch", lambda *a: False), \
            mock.patch.object(tbl, "plain_form", lambda *a: False):  # fmt: skip
        yield


@contextlib.contextmanager
def _cp_path(path):
    """Context: ``"op"`` holds torch's cp_fusion on its custom op at any size (small batches,
    and large CPU ones with gradients, otherwise run the core under autograd); ``"chosen"``
    leaves the choice to the rules."""
    if path != "op":
        yield
        return
    tcp = importlib.import_module("mmfuse.backends.torch.cp")  # (the package's attribute is the function)
    with mock.patch.object(tcp, "whole_batch", lambda *a: False), mock.patch.object(tcp, "AUTOGRAD_ON_CPU", False):
        yield


@st.composite
def problems(draw, max_modalities=4, max_rank=5):
    n = draw(st.integers(1, max_modalities))
    return {
        "dims": draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)),
        "batch": draw(st.integers(1, 5)),
        "rank": draw(st.integers(1, max_rank)),
        "out_dim": draw(st.integers(1, 3)),
        "append_one": draw(st.booleans()),
        "with_present": draw(st.booleans()),
        "with_weights": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _leaf(a, dtype=torch.float64):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True)


def _lowrank_inputs(p):
    rng = np.random.default_rng(p["seed"])
    extra = int(p["append_one"])
    xs = [_leaf(rng.standard_normal((p["batch"], d))) for d in p["dims"]]
    factors = [_leaf(rng.standard_normal((p["rank"], d + extra, p["out_dim"]))) for d in p["dims"]]
    weights = _leaf(rng.standard_normal(p["rank"])) if p["with_weights"] else None
    bias = _leaf(rng.standard_normal(p["out_dim"]))
    present = torch.tensor(rng.random((p["batch"], len(p["dims"]))) < 0.6) if p["with_present"] else None
    upstream = torch.tensor(rng.standard_normal((p["batch"], p["out_dim"])))
    return xs, factors, weights, bias, present, upstream


def _cp_inputs(p):
    rng = np.random.default_rng(p["seed"])
    extra = int(p["append_one"])
    xs = [_leaf(rng.standard_normal((p["batch"], d))) for d in p["dims"]]
    factors = [_leaf(rng.standard_normal((d + extra, p["rank"]))) for d in p["dims"]]
    factors.append(_leaf(rng.standard_normal((p["out_dim"], p["rank"]))))
    weights = _leaf(rng.standard_normal(p["rank"])) if p["with_weights"] else None
    bias = _leaf(rng.standard_normal(p["out_dim"]))
    present = torch.tensor(rng.random((p["batch"], len(p["dims"]))) < 0.6) if p["with_present"] else None
    upstream = torch.tensor(rng.standard_normal((p["batch"], p["out_dim"])))
    return xs, (weights, factors), bias, present, upstream


def _grads(out, leaves, upstream):
    return torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True, retain_graph=True)


def _np(t):
    return None if t is None else t.detach().numpy()


# --------------------------------------------------------------------------- values + gradients


@settings(max_examples=30, deadline=None)
@given(p=problems())
@pytest.mark.parametrize("path", PATHS)
def test_lowrank_op_matches_core_and_reference(path, p):
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    kw = {"append_one": p["append_one"], "present": present}
    with _lowrank_path(path):
        got = mmfuse.lowrank_fusion(xs, factors, weights, bias, **kw, backend="torch")
    if path == "recompute":
        assert type(got.grad_fn).__name__ == "_LowRankFusionBackward"
    core = mmfuse.lowrank_fusion(xs, factors, weights, bias, **kw, backend="array_api")
    want = ref.lowrank_fusion(
        [_np(x) for x in xs], [_np(f) for f in factors], _np(weights), _np(bias),
        append_one=p["append_one"], present=None if present is None else present.numpy(),
    )
    assert_close(got, want, xp=torch, dtype=torch.float64)
    assert_close(got, core)
    leaves = [*xs, *factors, *([weights] if weights is not None else []), bias]
    with _lowrank_path(path):
        grads = _grads(got, leaves, upstream)
    for g, c in zip(grads, _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)
    # the reference gradient, by central differences of the float64 reference on one input
    x0 = _np(xs[0])
    eps = 1e-6
    i = (0, 0)
    bumped = []
    for s in (1, -1):
        xb = x0.copy()
        xb[i] += s * eps
        bumped.append(ref.lowrank_fusion(
            [xb, *(_np(x) for x in xs[1:])], [_np(f) for f in factors], _np(weights), _np(bias),
            append_one=p["append_one"], present=None if present is None else present.numpy(),
        ))
    fd = float(((bumped[0] - bumped[1]) / (2 * eps) * upstream.numpy()).sum())
    with _lowrank_path(path):
        g0 = float(_grads(got, [xs[0]], upstream)[0][i])
    assert abs(fd - g0) <= 1e-6 * max(1.0, abs(fd))


@settings(max_examples=30, deadline=None)
@given(p=problems())
@pytest.mark.parametrize("path", ["chosen", "op"])
def test_cp_op_matches_core_and_reference(path, p):
    xs, cp, bias, present, upstream = _cp_inputs(p)
    kw = {"append_one": p["append_one"], "present": present}
    with _cp_path(path):
        got = mmfuse.cp_fusion(xs, cp, bias, **kw, backend="torch")
    if path == "op":
        assert type(got.grad_fn).__name__ == "_CPFusionBackward"
    core = mmfuse.cp_fusion(xs, cp, bias, **kw, backend="array_api")
    want = ref.cp_fusion(
        [_np(x) for x in xs], (_np(cp[0]), [_np(f) for f in cp[1]]), _np(bias),
        append_one=p["append_one"], present=None if present is None else present.numpy(),
    )
    assert_close(got, want, xp=torch, dtype=torch.float64)
    assert_close(got, core)
    leaves = [*xs, *cp[1], *([cp[0]] if cp[0] is not None else []), bias]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


def test_lowrank_many_blocks_matches_core(monkeypatch):
    """Force several batch blocks (and a ragged last one) through forward and backward."""
    from mmfuse._core import fusion as core_fusion

    monkeypatch.setattr(core_fusion, "block_rows", lambda batch, *args: min(batch, 256))
    p = {"dims": [3, 2, 4], "batch": 700, "rank": 2, "out_dim": 3, "append_one": True,
         "with_present": True, "with_weights": True, "seed": 1}
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    got = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="torch")
    core = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="array_api")
    assert_close(got, core)
    leaves = [*xs, *factors, weights, bias]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_low_precision_accumulates_in_float32(dtype, path):
    p = {"dims": [5, 3], "batch": 7, "rank": 3, "out_dim": 2, "append_one": True,
         "with_present": False, "with_weights": True, "seed": 2}
    xs, factors, weights, bias, _, upstream = _lowrank_inputs(p)
    cast = [t.detach().to(dtype).requires_grad_() for t in (*xs, *factors, weights, bias)]
    with _lowrank_path(path):
        got = mmfuse.lowrank_fusion(cast[:2], cast[2:4], cast[4], cast[5], backend="torch")
        grads = torch.autograd.grad((got * upstream.to(dtype)).sum(), cast)
    assert got.dtype == dtype
    want = mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api")
    rtol = 2e-4 if dtype == torch.float32 else 5e-2
    assert_close(got.double(), want, rtol=rtol)
    assert [g.dtype for g in grads] == [dtype] * len(cast)


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_absent_modality_is_ignored(path):
    p = {"dims": [2, 3], "batch": 4, "rank": 2, "out_dim": 2, "append_one": True,
         "with_present": False, "with_weights": True, "seed": 3}
    xs, factors, weights, bias, _, upstream = _lowrank_inputs(p)
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    nan_x1 = xs[1].detach().clone()
    nan_x1[1] = float("nan")
    nan_x1 = nan_x1.requires_grad_()
    with _lowrank_path(path):
        got = mmfuse.lowrank_fusion([xs[0], nan_x1], factors, weights, bias, present=present, backend="torch")
        g = torch.autograd.grad((got * upstream).sum(), nan_x1)[0]
    want = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="array_api")
    assert_close(got, want)
    assert torch.isfinite(g).all() and (g[1] == 0).all()


# --------------------------------------------------------------------------- torch.library checks


def _small(append_one, with_present, seed=0, n=3):
    p = {"dims": [2, 3, 1][:n], "batch": 3, "rank": 2, "out_dim": 2, "append_one": append_one,
         "with_present": with_present, "with_weights": True, "seed": seed}
    return p


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("append_one", "with_present"), [(True, True), (False, False)])
def test_opcheck(append_one, with_present, path):
    p = _small(append_one, with_present)
    xs, factors, weights, bias, present, _ = _lowrank_inputs(p)
    with _lowrank_path(path):
        for w, b in ((weights, bias), (None, None)):
            torch.library.opcheck(torch.ops.mmfuse.lowrank_fusion.default, (xs, factors, w, b, append_one, present))
    xs, (w, fs), bias, present, _ = _cp_inputs(p)
    torch.library.opcheck(torch.ops.mmfuse.cp_fusion.default, (xs, w, fs, bias, append_one, present))
    needs = [True] * (2 * len(xs) + 2)
    g = torch.randn(3, 2, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.mmfuse.lowrank_fusion_backward.default,
        (g, [x.detach() for x in xs], [f.detach() for f in factors], weights.detach(), append_one, present, needs),
    )


def test_fakes_give_the_real_strides_of_permuted_inputs():
    """The fakes promised other strides than the real outputs for permuted inputs: the
    zoom_shift op's output (its fake was empty_like(x), addcmul's layout follows its
    broadcast operands) and the low-rank backward's dL/dx (the real one empty_like(x), its
    fake contiguous).  Eager and aot_eager ran; inductor asserted (review finds)."""
    import itertools

    rng = torch.Generator().manual_seed(5)
    g = torch.randn(3, 6, 4, dtype=torch.float64, generator=rng)
    for perm in itertools.permutations(range(3)):
        base = torch.randn(*[(3, 5, 4)[p] for p in perm], dtype=torch.float64, generator=rng)
        x = base.permute(*[perm.index(i) for i in range(3)])
        for dtype in (torch.float64, torch.bfloat16):
            torch.library.opcheck(torch.ops.mmfuse.zoom_shift.default, (x.to(dtype), g.to(dtype), 0.7, -2, None, None, 1e-5))
    xs = [torch.randn(d, 5, dtype=torch.float64, generator=rng).t() for d in (4, 5, 6)]
    factors = [torch.randn(2, d + 1, 3, dtype=torch.float64, generator=rng) for d in (4, 5, 6)]
    w = torch.randn(2, dtype=torch.float64, generator=rng)
    grad = torch.randn(5, 3, dtype=torch.float64, generator=rng)
    needs = [True] * (2 * len(xs) + 2)
    torch.library.opcheck(torch.ops.mmfuse.lowrank_fusion_backward.default, (grad, xs, factors, w, True, None, needs))


@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("with_present", [False, True])
def test_gradcheck_gradgradcheck(append_one, with_present):
    p = _small(append_one, with_present, seed=4)
    xs, factors, weights, bias, present, _ = _lowrank_inputs(p)
    n = len(xs)

    def lowrank(*a):
        return torch.ops.mmfuse.lowrank_fusion(list(a[:n]), list(a[n : 2 * n]), a[2 * n], a[2 * n + 1], append_one, present)[0]

    args = (*xs, *factors, weights, bias)
    for path in PATHS:
        with _lowrank_path(path):
            assert torch.autograd.gradcheck(lowrank, args)
            assert torch.autograd.gradgradcheck(lowrank, args)

    xs, (w, fs), bias, present, _ = _cp_inputs(p)

    def cp(*a):
        return torch.ops.mmfuse.cp_fusion(list(a[:n]), a[n], list(a[n + 1 : 2 * n + 2]), a[2 * n + 2], append_one, present)

    args = (*xs, w, *fs, bias)
    assert torch.autograd.gradcheck(cp, args)
    assert torch.autograd.gradgradcheck(cp, args)


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_path_equals_fast_path(path):
    """The differentiable backward (create_graph) and the blocked op give the same gradients."""
    p = _small(True, True, seed=5)
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    leaves = [*xs, *factors, weights, bias]
    with _lowrank_path(path):
        out = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="torch")
        fast = torch.autograd.grad((out * upstream).sum(), leaves, retain_graph=True)
        slow = torch.autograd.grad((out * upstream).sum(), leaves, create_graph=True)
    for a, b in zip(fast, slow):
        assert_close(a, b.detach(), rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_only_needed_gradients_are_computed(path):
    p = _small(True, False, seed=6)
    xs, factors, weights, _, _, upstream = _lowrank_inputs(p)
    frozen = [x.detach() for x in xs]
    with _lowrank_path(path):
        out = mmfuse.lowrank_fusion(frozen, factors, weights, None, backend="torch")
        grads = torch.autograd.grad((out * upstream).sum(), factors)
    core = mmfuse.lowrank_fusion(frozen, factors, weights, None, backend="array_api")
    for g, c in zip(grads, torch.autograd.grad((core * upstream).sum(), factors)):
        assert_close(g, c, rtol=1e-10)


# --------------------------------------------------------------------------- memory: what is saved


def _saved_for_backward(xs, factors, params, backend):
    """(data_ptr, shape) of every tensor autograd saves for one lowrank_fusion call."""
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mmfuse.lowrank_fusion(xs, factors, params["weights"], params["bias"], backend=backend)
    return saved


def _lowrank_leaves(batch, dims, rank, out_dim):
    """float32 leaves of a low-rank fusion and the data pointers of its inputs."""
    xs = [torch.randn(batch, d, requires_grad=True) for d in dims]
    params = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=0, xp=torch)
    factors = [f.requires_grad_() for f in params["factors"]]
    return xs, factors, params, {t.data_ptr() for t in (*xs, *factors, params["weights"])}


def test_backward_saves_only_the_inputs(blocked_paths):
    """No (B, R h) projection is saved for backward: every saved tensor is an input."""
    batch, dims, rank, out_dim = 64, (5, 6, 7), 4, 8
    xs, factors, params, inputs = _lowrank_leaves(batch, dims, rank, out_dim)
    saved = _saved_for_backward(xs, factors, params, "torch")
    assert saved, "nothing saved?"
    assert all(ptr in inputs for ptr, _ in saved), saved
    # the Array-API core, by contrast, saves per-modality projections
    saved = _saved_for_backward(xs, factors, params, "array_api")
    assert any(shape == (batch, rank * out_dim) for _, shape in saved)


def test_narrow_fusion_keeps_only_its_small_projections(blocked_paths):
    """Narrow fusions (4 M R h <= sum d_m) keep their (M, B, R h) projections, a quarter of the
    inputs' size at most, instead of recomputing them; nothing else is saved."""
    batch, dims, rank, out_dim = 64, (8, 16, 64), 4, 1
    xs, factors, params, inputs = _lowrank_leaves(batch, dims, rank, out_dim)
    saved = _saved_for_backward(xs, factors, params, "torch")
    extra = [shape for ptr, shape in saved if ptr not in inputs]
    assert extra == [(len(dims), batch, rank * out_dim)]


def test_wide_fusion_saves_only_inputs_at_any_batch(blocked_paths):
    """Wide fusions save only their inputs, whatever the batch: the rule reads no batch size
    (small batches once kept their projections too, and the op's output shape then depended
    on B, which broke dynamic-batch torch.export)."""
    dims, rank, out_dim = (5, 6, 7), 4, 8
    for batch in (1, 7, 8):
        xs, factors, params, inputs = _lowrank_leaves(batch, dims, rank, out_dim)
        extra = [shape for ptr, shape in _saved_for_backward(xs, factors, params, "torch") if ptr not in inputs]
        assert extra == []


def test_lowrank_layer_exports_and_compiles_with_a_dynamic_batch():
    """torch.export with a dynamic batch failed (a guard 257 <= B from the whole-batch bound
    tested on the symbolic batch, or an internal error from the kept projections' shape rule
    on B), and torch.compile(dynamic=True) recompiled as the batch crossed those rules."""
    from mmfuse.nn import LowRankFusion

    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    layer = LowRankFusion((3, 4), 5, 2, dtype=torch.float64)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = layer

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.f([a, b])

    batch = torch.export.Dim("B", min=2, max=4096)
    example = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64))
    exported = torch.export.export(Wrap(), example, dynamic_shapes=({0: batch}, {0: batch}))
    compiled = torch.compile(layer, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (8, 20, 300, 3):
            xs = [torch.randn(rows, 3, dtype=torch.float64), torch.randn(rows, 4, dtype=torch.float64)]
            want = layer(xs)
            assert_close(exported.module()(*xs), want, rtol=1e-12)
            assert_close(compiled(xs), want, rtol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize(("dims", "batch"), [([90, 100, 110], 4), ([100], 5)])
def test_small_batch_kept_projections_match_core(with_present, with_weights, dims, batch, blocked_paths):
    """Kept projections (a narrow fusion) with h above the rank-sum GEMM's width: the
    (weighted) strided rank sum, several modalities and one."""
    rank, out_dim = 2, tbl._RANK_SUM_GEMM_WIDTH + 3
    p = {"dims": dims, "batch": batch, "rank": rank, "out_dim": out_dim, "append_one": True,
         "with_present": with_present, "with_weights": with_weights, "seed": int(np.random.default_rng().integers(1 << 30))}  # fmt: skip
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    assert tbl._keeps_projections(xs, factors)
    got = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="torch")
    core = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="array_api")
    want = ref.lowrank_fusion([_np(x) for x in xs], [_np(f) for f in factors], _np(weights), _np(bias),
                              present=None if present is None else present.numpy())  # fmt: skip
    assert_close(got, want, xp=torch, dtype=torch.float64)
    leaves = [t for t in (*xs, *factors, weights, bias) if t is not None]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("with_present", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize(("dims", "rank", "out_dim"), [([9, 17, 30], 2, 1), ([9, 17, 30], 2, 2), ([40], 3, 2)])
def test_narrow_fusion_with_kept_projections_matches_core(
    monkeypatch, append_one, with_present, with_weights, dims, rank, out_dim
):
    """Values and gradients of the kept-projection path (whole batch at once; rank sums as
    GEMMs, h = 1 and h > 1; one modality; the factor gradients' chunked GEMM with a ragged
    remainder)."""
    monkeypatch.setattr(tbc, "_GRAM_CHUNK_ROWS", 16)  # 150 rows: 9 chunks of 16 and 6 left over
    p = {"dims": dims, "batch": 150, "rank": rank, "out_dim": out_dim, "append_one": append_one,
         "with_present": with_present, "with_weights": with_weights, "seed": int(np.random.default_rng().integers(1 << 30))}  # fmt: skip
    assert tbl._keeps_projections([torch.empty(1, d) for d in dims], [torch.empty(rank, 1, out_dim)])
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    got = mmfuse.lowrank_fusion(xs, factors, weights, bias, append_one=append_one, present=present, backend="torch")
    core = mmfuse.lowrank_fusion(xs, factors, weights, bias, append_one=append_one, present=present, backend="array_api")
    want = ref.lowrank_fusion(
        [_np(x) for x in xs], [_np(f) for f in factors], _np(weights), _np(bias),
        append_one=append_one, present=None if present is None else present.numpy(),
    )
    assert_close(got, want, xp=torch, dtype=torch.float64)
    assert_close(got, core, rtol=1e-12)
    leaves = [t for t in (*xs, *factors, weights, bias) if t is not None]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize("saved_hooks", ["checkpoint", "save_on_cpu_counted"])
@pytest.mark.parametrize("op", ["lowrank kept", "lowrank", "cp"])
def test_fusion_ops_unpack_their_saved_tensors_once(op, saved_hooks, rng):
    """The low-rank op's backward read ``ctx.saved_tensors`` twice where it kept its
    projections (the inputs, then the kept tensor again): non-reentrant activation
    checkpointing refused it (``CheckpointError``: a tensor unpacked twice), and every
    saved-tensor hook ran twice (a review's find).  Each saved tensor is unpacked once, and
    the gradients are those of the step without hooks."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    dims = (8, 16, 64)
    xs = [torch.randn(6, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    width = 1 if op == "lowrank kept" else 9  # kept: 4 M R h <= sum d_m
    fs = [torch.randn(2, d + 1, width, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    w = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert tbl._keeps_projections(xs, fs) == (op == "lowrank kept")
    if op == "cp":
        out_factor = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
        cp_fs = [f[:, :, 0].T.detach().requires_grad_() for f in fs]
        leaves = [*xs, w, *cp_fs, out_factor]

        def run(*a):
            return torch.ops.mmfuse.cp_fusion(list(a[:3]), a[3], list(a[4:]), None, True, None)
    else:
        leaves = [*xs, *fs, w]

        def run(*a):
            return torch.ops.mmfuse.lowrank_fusion(list(a[:3]), list(a[3:6]), a[6], None, True, None)[0]

    upstream = torch.randn(run(*leaves).shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(run(*leaves), leaves, upstream)
    if saved_hooks == "checkpoint":
        got = torch.autograd.grad(checkpoint(run, *leaves, use_reentrant=False), leaves, upstream)
    else:
        unpacked = []

        def unpack(t):
            unpacked.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            out = run(*leaves)
        got = torch.autograd.grad(out, leaves, upstream)
        n_saved = 3 + 3 + 1 + (op == "lowrank kept") if op != "cp" else 3 + 4 + 1
        assert len(unpacked) == n_saved
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_of_kept_projections_wider_than_the_rank(dtype):
    """The fake's kept projections are (M, B, R h) in the accumulation dtype (float32 for
    16-bit inputs): with h = 1 a fake of (M, B, R) passed too (a mutation review)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    xs = [torch.randn(5, d, generator=g, dtype=torch.float64).to(dtype) for d in (8, 16, 64)]
    fs = [torch.randn(2, d + 1, 2, generator=g, dtype=torch.float64).to(dtype) for d in (8, 16, 64)]
    assert tbl._keeps_projections(xs, fs)
    _, kept = torch.ops.mmfuse.lowrank_fusion(xs, fs, None, None, True, None)
    assert tuple(kept.shape) == (3, 5, 4)
    torch.library.opcheck(torch.ops.mmfuse.lowrank_fusion.default, (xs, fs, None, None, True, None))


def test_kept_projections_spread_a_non_finite_value_as_the_core_does():
    """The kept path's rank sums are GEMMs, which mix an inf into its sample's other outputs
    (inf * 0): such a sample is summed again without them.  An inf input with rank weights of
    both signs gives NaN, as the core does; an output that overflows leaves its sample's
    finite outputs finite (a mutation review: the redo without the weights, or none, passed)."""
    ones = [torch.ones(3, d, dtype=torch.float64) for d in (8, 16, 64)]
    fs = [torch.full((2, d + 1, 2), 0.1, dtype=torch.float64) for d in (8, 16, 64)]
    assert tbl._keeps_projections(ones, fs)
    xs = [x.clone() for x in ones]
    xs[0][1, 0] = float("inf")
    w = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    got, _ = torch.ops.mmfuse.lowrank_fusion(xs, fs, w, None, True, None)
    core = mmfuse.lowrank_fusion(xs, fs, w, None, backend="array_api")
    assert torch.isnan(core[1]).all()
    assert_close(got, core)
    xs = [x.clone() for x in ones]
    overflow = [f.clone() for f in fs]
    for m in (0, 1):  # sample 1's output 0 overflows; output 1 reads neither huge input
        xs[m][1, 0] = 1e300
        overflow[m][:, 0, 1] = 0.0
    got, _ = torch.ops.mmfuse.lowrank_fusion(xs, overflow, None, None, True, None)
    core = mmfuse.lowrank_fusion(xs, overflow, None, None, backend="array_api")
    assert torch.isinf(core[1, 0]) and torch.isfinite(core[1, 1])
    assert_close(got, core)


def test_batched_gradients_through_the_op():
    """is_grads_batched (vmap over the upstream gradient) through the custom op itself: its
    blocked backward runs the whole-batch formulas under the transform (out= kernels have no
    batching rule)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    xs = [torch.randn(4, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (3, 4)]
    fs = [torch.randn(2, d + 1, 3, generator=g, dtype=torch.float64, requires_grad=True) for d in (3, 4)]
    y = torch.ops.mmfuse.lowrank_fusion(xs, fs, None, None, True, None)[0]
    upstream = torch.randn(2, *y.shape, generator=g, dtype=torch.float64)
    leaves = [*xs, *fs]
    batched = torch.autograd.grad(y, leaves, upstream, is_grads_batched=True, retain_graph=True)
    for k, v in enumerate(upstream):
        for b, looped in zip(batched, torch.autograd.grad(y, leaves, v, retain_graph=True)):
            torch.testing.assert_close(b[k], looped)


def test_wide_factor_gradients_accumulate_over_batch_blocks(monkeypatch):
    """R h above the narrow width (projections not kept): dL/dF sums every batch block's
    X^T G into one accumulator (a block that overwrote it was 2869 off)."""
    import mmfuse.backends.torch.lowrank as tl

    monkeypatch.setattr(tl, "BLOCK_BYTES", 1 << 12)
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    xs = [torch.randn(3000, 32, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fs = [torch.randn(4, 33, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert not tbl._keeps_projections(xs, fs)
    got = torch.autograd.grad(torch.ops.mmfuse.lowrank_fusion(xs, fs, None, None, True, None)[0].sum(), fs)
    want = torch.autograd.grad(mmfuse.lowrank_fusion(xs, fs, backend="array_api").sum(), fs)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10)


def test_narrow_opcheck_and_gradcheck():
    p = {"dims": [4, 5, 6], "batch": 5, "rank": 1, "out_dim": 1, "append_one": True,
         "with_present": True, "with_weights": True, "seed": 11}  # fmt: skip
    xs, factors, weights, bias, present, _ = _lowrank_inputs(p)
    assert tbl._keeps_projections(xs, factors)
    torch.library.opcheck(torch.ops.mmfuse.lowrank_fusion.default, (xs, factors, weights, bias, True, present))
    n = len(xs)

    def lowrank(*a):
        return mmfuse.lowrank_fusion(list(a[:n]), list(a[n : 2 * n]), a[2 * n], a[2 * n + 1], present=present, backend="torch")

    args = (*xs, *factors, weights, bias)
    assert torch.autograd.gradcheck(lowrank, args)
    assert torch.autograd.gradgradcheck(lowrank, args)


# --------------------------------------------------------------------------- dispatch


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("dims", "rank", "takes_op"), [((8, 16, 64), 16, False), ((8, 16, 64), 4, False), ((3, 5), 8, True),
                                                   ((4, 8), 6, False)])  # (M R = sum d_m: the rule's bound)
def test_large_cpu_cp_fusion_runs_the_core_where_its_projections_are_no_larger(dims, rank, takes_op):
    """A CP fusion above the whole-batch size on the CPU runs as the core under autograd where
    its projections (M R per sample, which autograd keeps) are no more than its inputs
    (sum d_m): measured faster than the custom op there at the same memory; else the op, and
    the op too where autograd records nothing (no_grad, no input requiring grad)."""
    p = {"dims": list(dims), "batch": 1000, "rank": rank, "out_dim": 3, "append_one": True,
         "with_present": False, "with_weights": True, "seed": int(np.random.default_rng().integers(1 << 30))}  # fmt: skip
    xs, cp, bias, _present, upstream = _cp_inputs(p)
    with _OpLog() as log:
        out = mmfuse.cp_fusion(xs, cp, bias, backend="torch")
    assert ("mmfuse.cp_fusion.default" in log.ops) == takes_op
    core = mmfuse.cp_fusion(xs, cp, bias, backend="array_api")
    assert_close(out, core, rtol=1e-12)
    leaves = [*xs, *cp[1], cp[0], bias]
    for g, c in zip(_grads(out, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)
    # without autograd recording, the op (its forward into its own buffers: faster, leaner)
    with torch.no_grad(), _OpLog() as log:
        mmfuse.cp_fusion(xs, cp, bias, backend="torch")
    assert "mmfuse.cp_fusion.default" in log.ops
    plain = [x.detach() for x in xs], (cp[0].detach(), [f.detach() for f in cp[1]])
    with _OpLog() as log:
        assert_close(mmfuse.cp_fusion(*plain, bias.detach(), backend="torch"), core, rtol=1e-12)
    assert "mmfuse.cp_fusion.default" in log.ops


@pytest.mark.parametrize("op", ["lowrank_fusion", "cp_fusion"])
def test_auto_runs_the_custom_op(op, blocked_paths):
    p = _small(True, False, seed=7)
    if op == "lowrank_fusion":
        xs, factors, weights, bias, _, _ = _lowrank_inputs(p)

        def call(**kw):
            return mmfuse.lowrank_fusion(xs, factors, weights, bias, **kw)
    else:
        xs, cp, bias, _, _ = _cp_inputs(p)

        def call(**kw):
            return mmfuse.cp_fusion(xs, cp, bias, **kw)

    assert lookup(op, "auto", like=xs[0]) is tb.__dict__[op]
    with mmfuse.config_context(backend="auto"), _OpLog() as log:
        out = call()
    assert f"mmfuse.{op}.default" in log.ops
    assert not any(o.startswith("aten.mm") or o.startswith("aten.addmm") for o in log.ops), log.ops
    with _OpLog() as log:
        call(backend="array_api")
    assert f"mmfuse.{op}.default" not in log.ops
    # and the backward ran the analytic formula, not autograd through the core
    # eager calls bind the op through an autograd.Function (mmfuse.backends._torch_eager)
    node = {"lowrank_fusion": "_LowRankFusionBackward", "cp_fusion": "_CPFusionBackward"}[op]
    assert type(out.grad_fn).__name__ == node
    if op == "lowrank_fusion":
        with _OpLog() as log:
            out.sum().backward()
        assert "mmfuse.lowrank_fusion_backward.default" in log.ops


def assert_bindings_agree(eager, registered, leaves, upstream, first, second):
    """The eager binding's output and the registered autograd's agree exactly in value and
    gradient, and in a double backward (d/d second of |dL/d first|^2)."""
    assert torch.equal(eager, registered)
    for a, b in zip(_grads(eager, leaves, upstream), _grads(registered, leaves, upstream)):
        assert torch.equal(a, b)
    ge = torch.autograd.grad((eager * upstream).sum(), first, create_graph=True)[0]
    gr = torch.autograd.grad((registered * upstream).sum(), first, create_graph=True)[0]
    assert_close(torch.autograd.grad(ge.square().sum(), second)[0],
                 torch.autograd.grad(gr.square().sum(), second)[0], rtol=1e-12)  # fmt: skip


def test_lowrank_registered_autograd_equals_the_eager_binding(blocked_paths):
    """torch.ops.mmfuse.lowrank_fusion with its registered autograd (torch.compile's path) and
    the eager autograd.Function give the same values and gradients, double backward included."""
    p = _small(True, True, seed=9)
    xs, factors, weights, bias, present, upstream = _lowrank_inputs(p)
    leaves = [*xs, *factors, weights, bias] if weights is not None else [*xs, *factors, bias]
    eager = mmfuse.lowrank_fusion(xs, factors, weights, bias, present=present, backend="torch")
    op, _ = torch.ops.mmfuse.lowrank_fusion(xs, factors, weights, bias, True, present)
    assert type(op.grad_fn).__name__.startswith("GeneratedBackwardFor_mmfuse_lowrank_fusion")
    assert_bindings_agree(eager, op, leaves, upstream, xs[0], factors[0])


def test_cp_registered_autograd_equals_the_eager_binding(blocked_paths):
    """The same for torch.ops.mmfuse.cp_fusion (masks, weights and bias present)."""
    p = _small(True, True, seed=10)
    xs, (weights, factors), bias, present, upstream = _cp_inputs(p)
    leaves = [*xs, *factors, bias] + ([weights] if weights is not None else [])
    eager = mmfuse.cp_fusion(xs, (weights, factors), bias, present=present, backend="torch")
    op = torch.ops.mmfuse.cp_fusion(xs, weights, factors, bias, True, present)
    assert type(op.grad_fn).__name__.startswith("GeneratedBackwardFor_mmfuse_cp_fusion")
    assert_bindings_agree(eager, op, leaves, upstream, xs[0], factors[0])


def test_torch_backend_registered_and_refuses_numpy():
    for op in ("lowrank_fusion", "cp_fusion"):
        assert "torch" in available(op)
        top = {i.backend: i.priority for i in reversed(implementations(op))}  # each backend's highest
        assert top["torch"] > top["array_api"]
    p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
    with pytest.raises(TypeError, match=r"backend 'torch' cannot take numpy arrays .* needs torch tensors"):
        mmfuse.lowrank_fusion([np.ones((2, 3))], **p, backend="torch")


def test_auto_on_torch_cuda_tensors_prefers_the_custom_ops_to_numba(monkeypatch):
    """numba's forward-only CUDA kernels also take torch CUDA tensors; "auto" must still pick
    the torch custom ops there (they carry the backward), whatever the plugins' load order.
    No GPU needed: the device is faked and numba-cuda is made to look present."""
    pytest.importorskip("mmfuse.backends.numba")
    monkeypatch.setattr(_conditions, "_numba_cuda_usable", lambda: None)
    info = _conditions.CallInfo(array_namespace(torch.ones(1)), torch.device("cuda"), torch.float32)
    table = {op: implementations(op) for op in available()}
    shared = [
        op for op, impls in table.items()
        if any(i.backend == "torch" for i in impls) and any(i.variant == "CUDA kernels" for i in impls)
    ]  # fmt: skip
    assert {"lowrank_fusion", "cp_fusion", "zoom_shift", "moments"} <= set(shared)
    for op in shared:
        numba_cuda = [i for i in table[op] if i.backend == "numba" and i.variant == "CUDA kernels"]
        assert numba_cuda[0].refusal(info) is None, op  # it could take them
        # the static table orders by priority (ties: table order), never by load order
        first = next(i for i in table[op] if i.backend != "reference" and i.refusal(info) is None)
        # the custom ops carry the backward; without one (moments) numba's kernels run
        want = ("torch", "custom op") if op != "moments" else ("numba", "CUDA kernels")
        assert (first.backend, first.variant) == want, op


def test_auto_on_numpy_still_runs_the_core():
    p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
    out = mmfuse.lowrank_fusion([np.ones((2, 3))], **p)
    assert isinstance(out, np.ndarray)


def test_import_mmfuse_does_not_import_torch_backend():
    import subprocess
    import sys

    code = "import sys, mmfuse, numpy as np; p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0); " \
           "mmfuse.lowrank_fusion([np.ones((2, 3))], **p); print('torch' in sys.modules, 'mmfuse.backends.torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False False"


@pytest.mark.parametrize(("rows", "width", "dim"), [(4096, 4, 64), (40000 + 37, 3, 9), (5000, 9, 7), (3000, 8, 5)])
def test_gram_equals_the_plain_product(rows, width, dim):
    """_gram's chunked batched GEMM (narrow widths, long batches; a ragged remainder) and its
    plain fallback both give g^T x."""
    g = torch.Generator().manual_seed(rows + width)
    a = torch.randn(rows, width, generator=g, dtype=torch.float64)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    assert_close(tbc.gram(a, x), a.t() @ x, rtol=1e-12)
    a32, x32 = a.float(), x.float()
    assert_close(tbc.gram(a32, x32), a.t() @ x, xp=torch, dtype=torch.float32)


@pytest.mark.parametrize(("rows", "width"), [(65536, 4), (1024, 1), (1000, 4), (4096, 16), (512, 64), (96, 7)])
def test_column_sums_equal_the_plain_sum(rows, width):
    """column_sums' folded view (narrow widths, rows a multiple of the fold) and its plain
    fallback (rows not a multiple, wide, strided) both give the column sums."""
    g = torch.Generator().manual_seed(rows * 100 + width)
    a = torch.randn(rows, width, generator=g, dtype=torch.float64) + 3.0
    assert_close(tbc.column_sums(a), a.sum(dim=0), rtol=1e-12)
    assert_close(tbc.column_sums(a.t().contiguous().t()), a.sum(dim=0), rtol=1e-12)  # strided
    assert_close(tbc.column_sums(a.float()), a.sum(dim=0), xp=torch, dtype=torch.float32)


@pytest.mark.parametrize(
    ("rows", "dim", "width"),
    [(16384, 8, 4), (16400, 6, 8), (4096, 8, 4), (1000, 16, 4), (960, 5, 3), (640, 7, 8), (300, 9, 16), (64, 3, 1)],
)
@pytest.mark.parametrize("append_one", [True, False])
def test_project_into_is_the_affine_projection(rows, dim, width, append_one):
    """project_into: the constant row added over the output's folded view after the GEMM
    (2 to 8 columns, at least 16384 rows, a multiple of the fold: tests/test_torch_small_paths
    pins that rule), else addmm's bias; into a slice of a larger buffer too (a kept
    projection's row)."""
    g = torch.Generator().manual_seed(rows * 1000 + dim * 10 + width)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    mat = torch.randn(dim + append_one, width, generator=g, dtype=torch.float64)
    want = (torch.cat([x, torch.ones(rows, 1, dtype=x.dtype)], 1) if append_one else x) @ mat
    for dtype, tol in ((torch.float64, {"rtol": 1e-12}), (torch.float32, {"xp": torch, "dtype": torch.float32})):
        kept = torch.full((2, rows, width), float("nan"), dtype=dtype)
        tbc.project_into(kept[1], x.to(dtype), mat.to(dtype), append_one)
        assert_close(kept[1], want, **tol)
        assert torch.isnan(kept[0]).all()


def test_column_sums_under_dynamic_compile_do_not_guard_on_the_row_count():
    """With symbolic shapes column_sums takes the plain sum: its fold's ``n % k`` test
    guarded the graph on the row count's remainder, a recompile per remainder (the CP op's
    backward is traced by torch.compile)."""
    compiled = torch.compile(tbc.column_sums, dynamic=True, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (1024, 1000, 3000):
            a = torch.randn(rows, 4, dtype=torch.float64)
            assert_close(compiled(a), a.sum(dim=0), rtol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize(("batch", "out_dim"), [(1024, 1), (1024, 2), (1000, 1), (5000, 1), (4096, 16)])
def test_cp_op_of_a_long_batch_matches_core(with_weights, batch, out_dim, blocked_paths):
    """The CP op's backward takes its column sums (weights, constant rows, bias) folded at
    1024 rows (a multiple of the fold) and plainly at 1000; its factor gradients through
    gram's chunked product from 4096 rows (5000: a ragged last chunk), the output factor's
    with g first (h <= R) or the projections first (h = 16 > R)."""
    p = {"dims": [8, 16, 64], "batch": batch, "rank": 4, "out_dim": out_dim, "append_one": True,
         "with_present": False, "with_weights": with_weights, "seed": int(np.random.default_rng().integers(1 << 30))}  # fmt: skip
    xs, cp, bias, _present, upstream = _cp_inputs(p)
    got = mmfuse.cp_fusion(xs, cp, bias, backend="torch")
    assert type(got.grad_fn).__name__ == "_CPFusionBackward"
    core = mmfuse.cp_fusion(xs, cp, bias, backend="array_api")
    assert_close(got, core)
    want = ref.cp_fusion([_np(x) for x in xs], (_np(cp[0]), [_np(f) for f in cp[1]]), _np(bias))
    assert_close(got, want, xp=torch, dtype=torch.float64)
    leaves = [*xs, *cp[1], *([cp[0]] if cp[0] is not None else []), bias]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize("rank", [4, 16])
def test_cp_op_double_backward_of_a_long_batch_matches_core(rank, blocked_paths):
    """The CP op's differentiable backward at 4096 rows: its recomputed projections (R = 4: the
    constant row over the folded view; R = 16: addmm) and gram's chunked factor gradients,
    differentiated again, against autograd through the core (float64)."""
    gen = torch.Generator().manual_seed(2026_12_04 + rank)
    dims = (8, 16, 64)
    base = [torch.randn(4096, d, generator=gen, dtype=torch.float64) for d in dims]
    base += [torch.randn(d + 1, rank, generator=gen, dtype=torch.float64) / (d + 1) ** 0.5 for d in dims]
    base += [torch.randn(3, rank, generator=gen, dtype=torch.float64), torch.randn(rank, generator=gen, dtype=torch.float64)]
    results = []
    for backend in ("torch", "array_api"):
        leaves = [t.clone().requires_grad_() for t in base]
        xs, fs, w = leaves[:3], leaves[3:7], leaves[7]
        y = mmfuse.cp_fusion(xs, (w, fs), backend=backend)
        grads = torch.autograd.grad((y * y).sum(), leaves, create_graph=True)
        total = sum((g * g).sum() for g in grads)
        results.append(torch.autograd.grad(total, leaves[3:]))
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-10)


@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("out_dim", [2, 20])
def test_cp_op_gradients_are_contiguous(append_one, out_dim, blocked_paths):
    """The CP op's gradients come back in their inputs' (contiguous) layout from
    ``autograd.grad`` too (where no parameter's layout is copied into): gram's transposed
    products were handed out as views (found by review)."""
    gen = torch.Generator().manual_seed(2026_12_04 + out_dim)
    xs = [torch.randn(300, d, generator=gen, requires_grad=True) for d in (8, 16)]
    extra = int(append_one)
    fs = [torch.randn(d + extra, 4, generator=gen, requires_grad=True) for d in (8, 16)]
    fs.append(torch.randn(out_dim, 4, generator=gen, requires_grad=True))
    w = torch.randn(4, generator=gen, requires_grad=True)
    y = mmfuse.cp_fusion(xs, (w, fs), append_one=append_one, backend="torch")
    grads = torch.autograd.grad(y.sum(), [*xs, *fs, w])
    assert all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("out_dim", [1, 2])
def test_narrow_fusion_of_a_long_batch_matches_core(with_weights, out_dim):
    """The kept-projection backward at a batch the column sums fold (1024 rows), h = 1 (the
    weights' gradient as a product and column sums) and h = 2 (as a GEMV)."""
    p = {"dims": [8, 16, 64], "batch": 1024, "rank": 4, "out_dim": out_dim, "append_one": True,
         "with_present": False, "with_weights": with_weights, "seed": int(np.random.default_rng().integers(1 << 30))}  # fmt: skip
    xs, factors, weights, bias, _present, upstream = _lowrank_inputs(p)
    got = mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="torch")
    core = mmfuse.lowrank_fusion(xs, factors, weights, bias, backend="array_api")
    assert_close(got, core, rtol=1e-12)
    leaves = [t for t in (*xs, *factors, weights, bias) if t is not None]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize(("rank", "out_dim"), [(2, 3), (4, 1), (3, 4), (16, 8)])
def test_flat_factor_layouts_hold_the_same_matrix(rank, out_dim):
    """Narrow projections (R h <= 8) are stored transposed for MKL, wide ones row-major; the
    (D, R h) matrix is the same either way, and the rank scaling applies to its columns."""
    g = torch.Generator().manual_seed(rank * 10 + out_dim)
    f = torch.randn(rank, 5, out_dim, generator=g, dtype=torch.float64)
    scale = torch.randn(rank, generator=g, dtype=torch.float64)
    want = torch.cat([f[r] for r in range(rank)], dim=1)  # (D, R h), rank-major columns
    got = tbc.flat_factor(f)
    assert got.shape == (5, rank * out_dim)
    assert torch.equal(got, want)
    assert torch.equal(tbc.flat_factor(f, scale), want * scale.repeat_interleave(out_dim))
    narrow = rank * out_dim <= tbc.NARROW_WIDTH
    assert got.is_contiguous() != narrow and got.t().is_contiguous() == narrow


def test_eager_calls_run_the_implementations_without_the_dispatcher():
    """In eager mode the custom ops' implementations run directly (mmfuse.backends._torch_eager):
    gradients through the bound autograd.Functions, no graph at all without gradients (values
    equal to the registered op's bit for bit), and torch._dynamo, which a custom op's first
    dispatch imports (2-3 s), is never imported.  A fresh process, so nothing imported it
    before; batches above the whole-batch rules so that the ops run."""
    from test_align_auto_cpu import _run

    out = _run(
        """
        import sys
        import torch
        import mmfuse

        import importlib

        torch.manual_seed(0)
        B = 300  # above the whole-batch rules (low-rank and CP 256 rows, Wander 128)
        # and low-rank fusion's plain form off (it runs up to B R h <= 2**20)
        importlib.import_module("mmfuse.backends.torch.lowrank").PLAIN_ELEMENTS = -1
        # and zoom_shift's op at every size (small steps run the core under autograd)
        importlib.import_module("mmfuse.backends.torch.zoom_shift").AUTOGRAD_CORE_ELEMENTS = -1
        xs = [torch.randn(B, d, dtype=torch.float64) for d in (3, 4)]
        p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=3, seed=1, xp=torch, dtype=torch.float64)
        fs = [f.clone().requires_grad_() for f in p["factors"]]
        cp = (None, [torch.randn(d + 1, 5, dtype=torch.float64, requires_grad=True) for d in (3, 4)]
              + [torch.randn(3, 5, dtype=torch.float64, requires_grad=True)])
        x = (10 + torch.randn(6, 9, 5, dtype=torch.float64)).requires_grad_()
        g = torch.randn(6, 7, 5, dtype=torch.float64)
        seq = [torch.randn(B, t, 4, dtype=torch.float64) for t in (3, 5)]
        w = mmfuse.init_wander([4, 4], [3, 5], rank=3, feature_rank=2, token_rank=2, out_dim=4,
                               seed=2, xp=torch, dtype=torch.float64)
        w = {k: [tuple(a.clone().requires_grad_() for a in v) if isinstance(v, tuple) else
                 v.clone().requires_grad_() for v in vs] for k, vs in w.items()}
        calls = {
            "lowrank": lambda: mmfuse.lowrank_fusion(xs, fs),
            "cp": lambda: mmfuse.cp_fusion(xs, cp),
            "zoom_shift": lambda: mmfuse.zoom_shift(x, g),
            "wander": lambda: mmfuse.wander(seq, w, mode="collapsed"),
        }
        for name, call in calls.items():
            y = call()
            y.sum().backward()
            with torch.no_grad():
                z = call()
            print(name, type(y.grad_fn).__name__, z.grad_fn is None, bool(torch.equal(y.detach(), z)))
        print("torch._dynamo" in sys.modules)
        ops = torch.ops.mmfuse
        print(bool(torch.equal(calls["zoom_shift"]().detach(), ops.zoom_shift(x, g, 1.0, -2, None, None, 1e-5))))
        """
    )
    assert out.splitlines() == [
        "lowrank _LowRankFusionBackward True True",
        "cp _CPFusionBackward True True",
        "zoom_shift _ZoomShiftBackward True True",
        "wander _WanderCollapsedBackward True True",
        "False",
        "True",
    ]


def _batched_grad_cases(rng):
    """(name, function of the leaves, leaves) for the custom ops' eager backwards."""
    leaf = lambda *shape: torch.tensor(rng.standard_normal(shape), dtype=torch.float64, requires_grad=True)  # noqa: E731
    lr = [leaf(300, 2), leaf(300, 3), leaf(2, 3, 3), leaf(2, 4, 3), leaf(2)]
    hs = [leaf(3, 6, 4), leaf(3, 5, 4)]
    feats, toks = [leaf(2, 4, 5), leaf(2, 4, 5)], [leaf(3, 6, 4), leaf(3, 5, 4)]
    wx = [leaf(200, 6, 5), leaf(200, 5, 5)]
    down = [(leaf(5, 4), leaf(4)), (leaf(5, 4), leaf(4))]
    wf, wt = [leaf(2, 4, 5), leaf(2, 4, 5)], [leaf(3, 6, 4), leaf(3, 5, 4)]
    params = {"down": down, "feature": wf, "token": wt}
    wleaves = [*wx, *(t for pair in down for t in pair), *wf, *wt]
    return {
        "lowrank_fusion": (lambda: mmfuse.lowrank_fusion(lr[:2], lr[2:4], lr[4]), lr),
        "sequence_fusion cp": (lambda: mmfuse.sequence_fusion(hs, feats, toks, mode="cp"), [*hs, *feats, *toks]),
        "sequence_fusion collapsed": (
            lambda: mmfuse.sequence_fusion(hs, feats, toks, mode="collapsed"), [*hs, *feats, *toks]
        ),
        "wander cp": (lambda: mmfuse.wander(wx, params, mode="cp"), wleaves),
        "wander collapsed": (lambda: mmfuse.wander(wx, params, mode="collapsed"), wleaves),
    }


@pytest.mark.parametrize(
    "case", ["lowrank_fusion", "sequence_fusion cp", "sequence_fusion collapsed", "wander cp", "wander collapsed"]
)
def test_batched_gradients_equal_looped_ones(case):
    """A backward run under autograd's vmap (``is_grads_batched``, vectorized Jacobians,
    gradcheck's batched-gradient check) failed in the custom ops' eager backwards (in-place
    buffers and einsums without a batching rule); it now takes the differentiable formulas."""
    fn, leaves = _batched_grad_cases(np.random.default_rng(int(np.random.default_rng().integers(1 << 30))))[case]
    y = fn()
    vs = torch.randn(3, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, leaves, vs, is_grads_batched=True, retain_graph=True)
    looped = [torch.autograd.grad(y, leaves, v, retain_graph=True) for v in vs]
    for got, each in zip(batched, zip(*looped)):
        assert_close(got, torch.stack(each), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cp_op_bias_gradient_of_16_bit_tensors_is_summed_in_float32(dtype):
    """The CP op's dL/db is the upstream gradient's column sums in float32, rounded once, as
    the low-rank op's: summed in the 16-bit dtype (over a folded view, its partial sums
    rounded) it gave 128 where 96 is due, and NaN for a loss-scaled gradient (a review of the
    fusion ops).  M R > sum d_m, so the custom op runs."""
    batch, dims, rank, out_dim = 4096, (2, 2), 4, 2
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    xs = [torch.randn(batch, d, generator=gen).to(dtype) for d in dims]
    factors = [torch.randn(d + 1, rank, generator=gen).to(dtype) for d in dims]
    factors.append(torch.randn(out_dim, rank, generator=gen).to(dtype))
    weights = torch.randn(rank, generator=gen).to(dtype)
    bias = torch.zeros(out_dim, dtype=dtype, requires_grad=True)
    for big, extra in ((100.0625, 0.0), (30000.0, 8.0)):  # a cancelling, and a loss-scaled, upstream
        g = torch.full((batch, out_dim), big)
        g[1::2] = -100.0 if big < 1000 else -big
        g[0] += extra
        g = g.to(dtype)
        out = mmfuse.cp_fusion(xs, (weights, factors), bias, backend="torch")
        (got,) = torch.autograd.grad(out, [bias], g)
        want = g.double().sum(0).to(dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_cp_fusion_backward_keeps_feature_sizes_dynamic():
    """torch.compile(dynamic=True) of the cp_fusion op, forward and backward: one graph for
    new batch and feature sizes.  The backward's projection read the constant row at index
    d = x.shape[1], which fixed each modality's feature size (a recompile per size; a
    review of the custom ops)."""
    from torch._dynamo.utils import counters

    import mmfuse.backends.torch  # noqa: F401  (defines torch.ops.mmfuse)

    def fused(x0, x1, w, a0, a1, c, b):
        return torch.ops.mmfuse.cp_fusion([x0, x1], w, [a0, a1, c], b, True, None)

    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))

    def draw(batch, d0, d1):
        shapes = [(batch, d0), (batch, d1), (3,), (d0 + 1, 3), (d1 + 1, 3), (4, 3), (4,)]
        return [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fused, backend="aot_eager", dynamic=True, fullgraph=True)
    try:
        for sizes in ((11, 5, 8), (13, 5, 8), (11, 7, 12)):
            args = draw(*sizes)
            got = torch.autograd.grad(compiled(*args).sum(), args)
            want = torch.autograd.grad(fused(*args).sum(), args)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
