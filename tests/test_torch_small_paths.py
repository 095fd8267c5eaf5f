"""The torch backend's small-problem paths against autograd through the float64 Array-API core:
low-rank fusion as plain operations under autograd (``plain_fusion``, its batch-major and
rank-major forms) next to the rank-major autograd function and the blocked custom op, and the
released Wander configuration under autograd (``_collapsed_adapter``, batches of at most
``WHOLE_BATCH_ROWS``) next to the fused custom op, and CP fusion's plain rank-major form
(``plain_cp_fusion``).  Values, every gradient and a double backward, on random inputs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
from mmfuse.nn import LowRankFusion  # noqa: E402
from mmfuse.testing import assert_close  # noqa: E402

torch_wander = importlib.import_module("mmfuse.backends.torch.wander")


def _grad_fn(y):
    return type(y.grad_fn).__name__


def _lowrank_leaves(rng, batch, dims, rank, out_dim, append_one, with_weights, with_bias):
    extra = int(append_one)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    fs = [rng.standard_normal((rank, d + extra, out_dim)) / np.sqrt(d + extra) for d in dims]
    w = rng.standard_normal(rank) if with_weights else None
    b = rng.standard_normal(out_dim) if with_bias else None

    def leaves(dtype=torch.float64):
        def t(a):
            return None if a is None else torch.tensor(a, dtype=dtype, requires_grad=True)

        return [t(x) for x in xs], [t(f) for f in fs], t(w), t(b)

    return leaves


@pytest.mark.parametrize("path", ["plain", "plain_rank_major", "whole_batch", "blocked"])
@pytest.mark.parametrize("out_dim", [1, 3])
@pytest.mark.parametrize(("batch", "dims", "append_one", "with_weights", "with_bias", "with_present"), [
    (1, (3, 4), True, True, True, False),
    (9, (3, 4, 5), True, True, True, True),
    (7, (5,), False, False, True, True),
    (6, (2, 3), True, False, False, False),
    (5, (4, 2, 3, 2), False, True, False, True),
])  # fmt: skip
def test_lowrank_small_paths_match_autograd_through_the_core(
    rng, monkeypatch, path, out_dim, batch, dims, append_one, with_weights, with_bias, with_present
):
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    if path == "blocked":
        import mmfuse._core.fusion as core_fusion

        monkeypatch.setattr(core_fusion, "WHOLE_BATCH_ELEMENTS", -1)
        monkeypatch.setattr(torch_lowrank, "PLAIN_ELEMENTS", -1)
    elif path == "plain_rank_major":  # the form of batches over STAGED_ROWS on the CPU
        monkeypatch.setattr(torch_lowrank, "STAGED_ROWS", 0)
    elif path == "whole_batch":  # h > 1 with R h over PLAIN_RANK_OUTPUTS (h = 1 stays plain)
        monkeypatch.setattr(torch_lowrank, "PLAIN_RANK_OUTPUTS", 0)
    rank = 3
    leaves = _lowrank_leaves(rng, batch, dims, rank, out_dim, append_one, with_weights, with_bias)
    present = None
    if with_present:
        present = torch.as_tensor(rng.random((batch, len(dims))) < 0.6)
        present[0] = True
    upstream = torch.as_tensor(rng.standard_normal((batch, out_dim)))
    results = []
    for backend in ("torch", "array_api"):
        xs, fs, w, b = leaves()
        if present is not None:
            with torch.no_grad():
                for m, x in enumerate(xs):
                    x[~present[:, m]] = float("nan")  # absent features never leak
        y = mmfuse.lowrank_fusion(xs, fs, w, b, present=present, append_one=append_one, backend=backend)
        if backend == "torch":
            if path == "blocked":
                assert "LowRankFusion" in _grad_fn(y)  # the custom op's node
            elif path == "whole_batch" and out_dim > 1:
                assert _grad_fn(y) == "_LowRankWholeBatchBackward"
            elif path == "plain_rank_major" and with_present:  # masked: plain up to STAGED_ROWS
                assert "LowRank" in _grad_fn(y)
            else:
                assert "LowRank" not in _grad_fn(y)  # plain operations under autograd
            assert y.is_contiguous()
        inputs = [t for t in (*xs, *fs, w, b) if t is not None]
        grads = torch.autograd.grad((y * upstream).sum(), inputs, create_graph=True)
        second = torch.autograd.grad((grads[len(xs)] ** 2).sum() + (grads[0] ** 2).sum(), [xs[0], fs[0]])
        results.append([y.detach(), *[g.detach() for g in grads], *second])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out_dim", [1, 3])
def test_lowrank_takes_plain_operations_up_to_their_own_bound(rng, monkeypatch, out_dim):
    """Batches over WHOLE_BATCH_ROWS run plain_fusion (plain operations under autograd) while
    B R h <= PLAIN_ELEMENTS, staged (with h = 1 batch-major) up to STAGED_ROWS samples and
    rank-major beyond; larger ones the custom op.  Values and gradients against autograd
    through the core on both sides of each bound, values against the float64 reference."""
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    monkeypatch.setattr(torch_lowrank, "PLAIN_ELEMENTS", 40 * 4 * out_dim)
    monkeypatch.setattr(torch_lowrank, "STAGED_ROWS", 38)
    for batch, plain in ((38, True), (39, True), (40, True), (41, False)):
        monkeypatch.setattr(torch_lowrank, "WHOLE_BATCH_ROWS", batch - 10)  # (passed, patched)
        leaves = _lowrank_leaves(rng, batch, (3, 5), 4, out_dim, True, True, True)
        upstream = torch.as_tensor(rng.standard_normal((batch, out_dim)))
        results = []
        for backend in ("torch", "array_api"):
            xs, fs, w, b = leaves()
            y = mmfuse.lowrank_fusion(xs, fs, w, b, backend=backend)
            if backend == "torch":
                assert ("LowRank" not in _grad_fn(y)) == plain, (batch, _grad_fn(y))
                arrays = [[t.detach().numpy() for t in xs], [f.detach().numpy() for f in fs]]
                want = mmfuse.reference.lowrank_fusion(*arrays, w.detach().numpy(), b.detach().numpy())
                assert_close(y.detach().numpy(), want, rtol=1e-12)
            grads = torch.autograd.grad((y * upstream).sum(), [*xs, *fs, w, b])
            results.append([y.detach(), *grads])
        for got, want in zip(*results):
            assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out_dim", [1, 3])
def test_lowrank_plain_forms_are_the_ones_their_rules_name(rng, monkeypatch, out_dim):
    """Up to STAGED_ROWS samples plain_fusion stages the constant (one pad of each x_m; with
    h = 1 batch-major, its rank sum one addmv), beyond it takes the constant's row of F_m as
    addmm's bias (no pad); the forms agree to rounding, so only the operators tell them apart."""
    from test_torch_backend import _OpLog

    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.lowrank"), "STAGED_ROWS", 8)
    results = []
    xs, fs, w, b = _lowrank_leaves(rng, 9, (3, 5), 4, out_dim, True, True, True)()
    for batch in (8, 9):
        with _OpLog() as log:
            y = mmfuse.lowrank_fusion([x[:batch] for x in xs], fs, w, b)
        assert "LowRank" not in _grad_fn(y)
        staged = batch == 8
        assert ("aten.constant_pad_nd.default" in log.ops) == staged, (batch, log.ops)
        assert ("aten.addmm.default" in log.ops) == (not staged), (batch, log.ops)
        assert ("aten.addmv.default" in log.ops) == (staged and out_dim == 1), (batch, log.ops)
        assert "aten.bmm.default" not in log.ops, (batch, log.ops)
        results.append(y.detach()[:8])
    assert_close(results[0], results[1], rtol=1e-13, atol=1e-13)
    if out_dim > 1:  # without autograd, within its bounds, the whole-batch form (bmm)
        with torch.no_grad(), _OpLog() as log:
            y = mmfuse.lowrank_fusion([x[:8] for x in xs], fs, w, b)
        assert "aten.bmm.default" in log.ops, log.ops
        assert_close(y, results[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lowrank_forward_runs_whole_batch_at_few_rows_with_wide_outputs(rng, monkeypatch, call_counts, dtype):
    """Without autograd on the CPU, beyond the core's bound on B R h, the whole-batch form runs
    where B <= ``FORWARD_WHOLE_BATCH_ROWS`` and h > ``FORWARD_WHOLE_BATCH_WIDTH``: the blocked
    op copied every factor as (D, R h) per call, 2.0x the plain expression at B = 16, R 512,
    h 64.  Which form runs on each side of the rule (more rows, h = 8, past its bound on B R
    h, the rule switched off, autograd recording), each against the float64 reference, absent
    features NaN."""
    import mmfuse._core.fusion as core_fusion

    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    rows = torch_lowrank.FORWARD_WHOLE_BATCH_ROWS
    width = torch_lowrank.FORWARD_WHOLE_BATCH_WIDTH
    call_counts(torch_lowrank, "_whole_batch_forward")
    call_counts(torch_lowrank, "_lowrank_eager")
    calls = call_counts.calls
    dims = (5, 3, 7)
    cases = [  # (B, R, h, row bound, autograd, form): every B R h over the core's 2**18
        (16, 512, 64, None, False, "whole"),  # the benchmark's R h
        (rows, 64, 64, None, False, "whole"),
        (rows + 1, 64, 64, None, False, "op"),
        (rows, 512, width, None, False, "op"),  # (R GEMMs of 8 columns: slower than one of R h)
        (rows, 64, 64, -1, False, "op"),  # (blocked_paths' switch of this rule)
        (16, 512, 64, None, True, "plain"),  # a training step keeps its rules: plain_fusion
        (16, 512, 64, "elements", False, "op"),  # past the measured B R h (memory: a diff review)
    ]
    assert torch_lowrank.FORWARD_WHOLE_BATCH_ELEMENTS >= 16 * 512 * 64
    # the rule at its documented bounds (docs/backends.rst): B <= 128, h > 8, B R h <= 2**22
    wide = torch_lowrank.wide_forward
    assert (rows, width, torch_lowrank.FORWARD_WHOLE_BATCH_ELEMENTS) == (128, 8, 1 << 22)
    assert wide(128, 512, 64) and not wide(128, 513, 64) and not wide(129, 8, 64)
    assert wide(1, 4, 9) and not wide(1, 4, 8)
    for batch, rank, out_dim, bound, records, form in cases:
        assert not core_fusion.whole_batch(batch, rank, out_dim)
        if bound == "elements":
            monkeypatch.setattr(torch_lowrank, "FORWARD_WHOLE_BATCH_ELEMENTS", batch * rank * out_dim - 1)
        elif bound is not None:
            monkeypatch.setattr(torch_lowrank, "FORWARD_WHOLE_BATCH_ROWS", bound)
        xs = [rng.standard_normal((batch, d)) for d in dims]
        present = rng.random((batch, len(dims))) < 0.8
        for m, x in enumerate(xs):
            x[~present[:, m]] = np.nan
        p = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng)
        p["bias"] = rng.standard_normal(out_dim)
        args = [
            [torch.tensor(x, dtype=dtype, requires_grad=records) for x in xs],
            [torch.tensor(f, dtype=dtype) for f in p["factors"]],
            torch.tensor(p["weights"], dtype=dtype),
            torch.tensor(p["bias"], dtype=dtype),
        ]
        calls.clear()
        got = mmfuse.lowrank_fusion(*args, present=torch.as_tensor(present))
        want = {"whole": (1, 0), "op": (0, 1), "plain": (0, 0)}[form]
        assert (calls["_whole_batch_forward"], calls["_lowrank_eager"]) == want, (batch, rank, out_dim, bound, records, calls)
        assert got.dtype == dtype and got.is_contiguous() and torch.isfinite(got).all()
        ref_args = [xs, p["factors"], p["weights"], p["bias"]]
        want_y = mmfuse.reference.lowrank_fusion(*ref_args, present=present)
        scale = float(np.max(np.abs(want_y))) + 1.0
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert_close(got.detach().numpy(), want_y, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("staged_rows", [-1, 1 << 30])
def test_lowrank_plain_forms_take_rank_zero(staged_rows, monkeypatch):
    """R = 0 (an empty sum over ranks): the result is the bias broadcast over (B, h), as the
    reference's (addmv over an empty inner dimension had returned its (1,) input)."""
    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.lowrank"), "STAGED_ROWS", staged_rows)
    for out_dim in (1, 3):
        xs = [torch.randn(5, 3, dtype=torch.float64)]
        bias = torch.randn(out_dim, dtype=torch.float64)
        y = mmfuse.lowrank_fusion(xs, [torch.randn(0, 4, out_dim, dtype=torch.float64)], torch.randn(0, dtype=torch.float64), bias)
        assert y.shape == (5, out_dim)
        assert torch.equal(y, bias.expand(5, out_dim))


@pytest.mark.parametrize("form", ["batch_major", "rank_major"])
@pytest.mark.parametrize(("with_weights", "with_bias"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("out_dim", [1, 3])
def test_lowrank_plain_forms_on_an_empty_batch(rng, monkeypatch, form, with_weights, with_bias, out_dim):
    """Every form of plain_fusion takes B = 0: a (0, h) result, zero parameter gradients,
    empty input gradients."""
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    monkeypatch.setattr(torch_lowrank, "STAGED_ROWS", -1 if form == "rank_major" else 1 << 30)
    xs, fs, w, b = _lowrank_leaves(rng, 0, (3, 5), 4, out_dim, True, with_weights, with_bias)()
    y = mmfuse.lowrank_fusion(xs, fs, w, b)
    assert y.shape == (0, out_dim) and "LowRank" not in _grad_fn(y)
    params = [t for t in (*fs, w, b) if t is not None]
    grads = torch.autograd.grad(y.sum() + sum(p.sum() for p in params), [*xs, *params])
    assert [g.shape for g in grads[: len(xs)]] == [(0, 3), (0, 5)]
    for g in grads[len(xs) :]:
        assert torch.equal(g, torch.ones_like(g))  # the parameters' own sums only


@pytest.mark.parametrize("form", ["plain", "plain_rank_major", "whole_batch"])
@pytest.mark.parametrize("out_dim", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_small_paths_in_lower_precisions(rng, monkeypatch, form, out_dim, dtype):
    """float32 and bfloat16 (computed in float32, rounded once) against float64 on the same
    (rounded) inputs; both row forms of plain_fusion, and (h > 1) the whole-batch function."""
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    if form == "plain_rank_major":
        monkeypatch.setattr(torch_lowrank, "STAGED_ROWS", 0)
    elif form == "whole_batch":
        monkeypatch.setattr(torch_lowrank, "PLAIN_RANK_OUTPUTS", 0)
    leaves = _lowrank_leaves(rng, 8, (6, 5, 7), 4, out_dim, True, True, True)
    upstream = torch.as_tensor(rng.standard_normal((8, out_dim))).to(dtype)
    low = leaves(dtype)
    results = []
    for dt in (dtype, torch.float64):
        xs, fs = [[t.detach().to(dt).requires_grad_(True) for t in group] for group in low[:2]]
        w, b = (t.detach().to(dt).requires_grad_(True) for t in low[2:])
        y = mmfuse.lowrank_fusion(xs, fs, w, b)
        assert y.dtype == dt
        grads = torch.autograd.grad((y * upstream.to(dt)).sum(), [*xs, *fs, w, b])
        results.append([y.detach(), *grads])
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bfloat16: its own rounding of each result
    for got, want in zip(*results):
        assert got.dtype == dtype
        assert_close(got.double(), want, rtol=tol, atol=tol * float(want.detach().abs().max()))


@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("out_dim", [1, 3])
@pytest.mark.parametrize(("batch", "dims", "append_one", "with_weights", "with_bias", "with_present"), [
    (1, (3, 4), True, True, True, False),
    (9, (3, 4, 5), True, True, True, True),
    (7, (5,), False, False, True, True),
    (6, (2, 3), True, False, False, False),  # M R > sum d_m: the custom op
    (5, (4, 2, 3, 2), False, True, False, True),
    (0, (3, 4), True, True, True, False),
])  # fmt: skip
def test_cp_plain_form_matches_autograd_through_the_core(
    rng, monkeypatch, staged, out_dim, batch, dims, append_one, with_weights, with_bias, with_present
):
    """CP fusion's plain rank-major form (``plain_cp_fusion``: large eager CPU calls that
    record, here forced at small sizes), staged and with the constant's row as the GEMM's bias,
    against autograd through the float64 core: values, every gradient and a double backward,
    absent modalities' NaN never leaking; without autograd the custom op runs."""
    torch_cp = importlib.import_module("mmfuse.backends.torch.cp")
    monkeypatch.setattr(torch_cp, "whole_batch", lambda *a: False)
    monkeypatch.setattr(torch_cp, "plain_form", lambda *a: True)
    monkeypatch.setattr(torch_cp, "STAGED_ROWS", 1 << 20 if staged else 0)
    rank, extra = 3, int(append_one)
    arrays = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((d + extra, rank)) / np.sqrt(d + extra) for d in dims]
    factors.append(rng.standard_normal((out_dim, rank)))
    weights = rng.standard_normal(rank) if with_weights else None
    bias = rng.standard_normal(out_dim) if with_bias else None
    present = None
    if with_present:
        present = torch.as_tensor(rng.random((batch, len(dims))) < 0.6)
        if batch:
            present[0] = True
    upstream = torch.as_tensor(rng.standard_normal((batch, out_dim)))

    def leaf(a):
        return None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True)

    # the form's own condition: projections no larger than the inputs (M R <= sum d_m)
    plain = len(dims) * rank <= sum(dims)
    calls = []
    plain_cp_fusion = torch_cp.plain_cp_fusion
    monkeypatch.setattr(torch_cp, "plain_cp_fusion", lambda *a: calls.append(1) or plain_cp_fusion(*a))
    results = []
    for backend in ("torch", "array_api"):
        xs, fs, w, b = [leaf(x) for x in arrays], [leaf(f) for f in factors], leaf(weights), leaf(bias)
        if present is not None:
            with torch.no_grad():
                for m, x in enumerate(xs):
                    x[~present[:, m]] = float("nan")  # absent features never leak
        y = mmfuse.cp_fusion(xs, (w, fs), b, present=present, append_one=append_one, backend=backend)
        if backend == "torch":
            assert calls == ([1] if plain else [])
            assert ("CPFusion" in _grad_fn(y)) != plain  # else the custom op's node
            assert y.shape == (batch, out_dim) and y.is_contiguous()
            with torch.no_grad():  # nothing to differentiate: the custom op's forward
                calls.clear()
                mmfuse.cp_fusion(xs, (w, fs), b, present=present, append_one=append_one, backend=backend)
                assert calls == []
        inputs = [t for t in (*xs, *fs, w, b) if t is not None]
        grads = torch.autograd.grad((y * upstream).sum(), inputs, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        second = torch.autograd.grad(
            (grads[len(xs)] ** 2).sum() + (grads[0] ** 2).sum(), [xs[0], fs[0]], allow_unused=True
        )
        second = [torch.zeros_like(t) if g is None else g for t, g in zip([xs[0], fs[0]], second)]
        results.append([y.detach(), *[g.detach() for g in grads], *[g.detach() for g in second]])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("out_dim", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cp_plain_form_in_lower_precisions(rng, monkeypatch, out_dim, dtype):
    """CP's plain form in float32 and the 16-bit dtypes (computed in float32, rounded once)
    against float64 on the same (rounded) inputs, values and gradients, the dtype kept."""
    torch_cp = importlib.import_module("mmfuse.backends.torch.cp")
    monkeypatch.setattr(torch_cp, "whole_batch", lambda *a: False)
    monkeypatch.setattr(torch_cp, "plain_form", lambda *a: True)
    calls = []
    plain_cp_fusion = torch_cp.plain_cp_fusion
    monkeypatch.setattr(torch_cp, "plain_cp_fusion", lambda *a: calls.append(1) or plain_cp_fusion(*a))
    dims, rank = (6, 5, 7), 4
    arrays = [
        *(rng.standard_normal((8, d)) for d in dims),
        *(rng.standard_normal((d + 1, rank)) / np.sqrt(d + 1) for d in dims),
        rng.standard_normal((out_dim, rank)), rng.standard_normal(rank), rng.standard_normal(out_dim),
    ]  # fmt: skip
    upstream = torch.as_tensor(rng.standard_normal((8, out_dim)))
    results = []
    for dt in (dtype, torch.float64):
        # the float64 run on the low-precision inputs' own values
        leaves = [torch.tensor(a).to(dtype).to(dt).requires_grad_(True) for a in arrays]
        xs, fs, (w, b) = leaves[:3], leaves[3:7], leaves[7:]
        y = mmfuse.cp_fusion(xs, (w, fs), b)
        assert y.dtype == dt
        grads = torch.autograd.grad((y * upstream.to(dtype).to(dt)).sum(), leaves)
        results.append([y.detach(), *grads])
    assert calls == [1, 1]
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # 16-bit: its own rounding of each result
    for got, want in zip(*results):
        assert got.dtype == dtype
        assert_close(got.double(), want, rtol=tol, atol=tol * float(want.detach().abs().max()))


@pytest.mark.parametrize("staged", [True, False])
def test_cp_plain_form_keeps_an_inf_in_its_sample(rng, monkeypatch, staged):
    """An inf in one sample's input (and a -inf in another) reaches only those samples, in
    both forms of the projections: where the reference's outputs are not finite (it sums the
    full weight tensor's terms, so it may give NaN where a factored form gives an inf: the
    parity matrix compares finiteness too), and as inf or NaN exactly where the core's
    factored form puts them; the other samples are the reference's to rounding."""
    torch_cp = importlib.import_module("mmfuse.backends.torch.cp")
    monkeypatch.setattr(torch_cp, "STAGED_ROWS", 1 << 20 if staged else 0)
    dims, rank, out_dim, batch = (3, 4, 5), 3, 2, 6
    xs = [rng.standard_normal((batch, d)) for d in dims]
    xs[0][1, 0], xs[0][2, 1] = np.inf, -np.inf
    factors = [rng.standard_normal((d + 1, rank)) for d in dims] + [rng.standard_normal((out_dim, rank))]
    weights, bias = rng.standard_normal(rank), rng.standard_normal(out_dim)
    with np.errstate(invalid="ignore"):
        want = mmfuse.reference.cp_fusion(xs, (weights, factors), bias)
    leaves = [torch.tensor(a, requires_grad=True) for a in (*xs, *factors, weights, bias)]
    got = torch_cp.plain_cp_fusion(leaves[:3], leaves[7], leaves[3:7], leaves[8], True, None).detach().numpy()
    core = mmfuse.cp_fusion(leaves[:3], (leaves[7], leaves[3:7]), leaves[8], backend="array_api").detach().numpy()
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    assert np.array_equal(np.isnan(got), np.isnan(core)) and np.array_equal(np.isinf(got), np.isinf(core))
    assert not np.isfinite(want[1:3]).any() and np.isfinite(want[[0, 3, 4, 5]]).all()
    finite = np.isfinite(want)
    assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cp_plain_form_in_16_bits_is_its_float32_result_rounded_once(rng, dtype, monkeypatch):
    """A 16-bit plain CP fusion is the float32 one of the same values, rounded once: every
    step in float32, the output factor's product with the weights too (it had been formed in
    the 16-bit dtype first)."""
    torch_cp = importlib.import_module("mmfuse.backends.torch.cp")
    dims, rank, out_dim, batch = (6, 5, 7), 8, 3, 64
    arrays = [
        *(rng.standard_normal((batch, d)) for d in dims),
        *(rng.standard_normal((d + 1, rank)) / np.sqrt(d + 1) for d in dims),
        rng.standard_normal((out_dim, rank)), rng.standard_normal(rank), rng.standard_normal(out_dim),
    ]  # fmt: skip
    low = [torch.tensor(a).to(dtype) for a in arrays]
    wide = [t.float() for t in low]
    for rows in (1 << 20, 0):  # staged and with the constant's row as the GEMM's bias
        monkeypatch.setattr(torch_cp, "STAGED_ROWS", rows)
        got = torch_cp.plain_cp_fusion(low[:3], low[7], low[3:7], low[8], True, None)
        want = torch_cp.plain_cp_fusion(wide[:3], wide[7], wide[3:7], wide[8], True, None).to(dtype)
        assert got.dtype == dtype
        assert torch.equal(got, want)


def test_cp_plain_form_runs_where_its_rule_says(rng, monkeypatch):
    """The rule (``plain_form``): PLAIN_ROWS to PLAIN_MAX_ROWS samples, at most PLAIN_OUTPUTS
    outputs, inputs at most PLAIN_WIDTH wide in all; and a CPFusion step there takes the form
    (only while autograd records: without, the custom op's forward), the core below and above
    it."""
    from mmfuse.nn import CPFusion

    torch_cp = importlib.import_module("mmfuse.backends.torch.cp")
    rows, outs, width = torch_cp.PLAIN_ROWS, torch_cp.PLAIN_OUTPUTS, torch_cp.PLAIN_WIDTH
    assert torch_cp.plain_form(rows, outs, width)
    assert torch_cp.plain_form(torch_cp.PLAIN_MAX_ROWS, outs, width)
    assert not torch_cp.plain_form(torch_cp.PLAIN_MAX_ROWS + 1, outs, width)
    assert not torch_cp.plain_form(rows - 1, outs, width)
    assert not torch_cp.plain_form(rows, outs + 1, width)
    assert not torch_cp.plain_form(rows, outs, width + 1)
    calls, op_calls = [], []
    plain_cp_fusion, cp_eager = torch_cp.plain_cp_fusion, torch_cp._cp_eager
    monkeypatch.setattr(torch_cp, "plain_cp_fusion", lambda *a: calls.append(a[0][0].shape[0]) or plain_cp_fusion(*a))
    monkeypatch.setattr(
        torch_cp, "_cp_eager", lambda *a: op_calls.append((a[0][0].shape[0], torch.is_grad_enabled())) or cp_eager(*a)
    )
    dims = (8, 16, 64)
    layer = CPFusion(dims, 1, 4).double()
    batches = (rows, rows // 2, torch_cp.PLAIN_MAX_ROWS + 1)
    for batch in batches:
        xs = [torch.as_tensor(rng.standard_normal((batch, d))) for d in dims]
        y = layer(xs)
        y.sum().backward()
        want = mmfuse.reference.cp_fusion(
            [x.numpy() for x in xs], (layer.weights.detach().numpy(), [f.detach().numpy() for f in layer.factors]),
            layer.bias.detach().numpy(),
        )  # fmt: skip
        assert_close(y.detach(), torch.as_tensor(want), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            layer(xs)
    assert calls == [rows]
    assert op_calls == [(batch, False) for batch in batches]  # (the core, not the op, elsewhere)


@pytest.mark.parametrize("rank", [1, 2, 8, 16])
def test_cp_projections_fold_their_constant_row_only_where_the_rule_says(rng, monkeypatch, rank):
    """The CP op's projections (``project_into`` in its forward, ``affine`` where its backward
    recomputes them) add the constant row over the output's folded view after ``mm`` only for
    2 to ``_ROW_ADD_WIDTH`` columns from ``_ROW_ADD_ROWS`` rows on, else as ``addmm``'s bias: a
    review measured the fold's fixed cost at 1.4-3.3x addmm's time up to 1024 rows (a narrow
    CP fusion's forward at B = 512 up to 2x the plain torch code's).  On both sides of the
    rows bound (each a multiple of the fold) the values against the float64 reference and the
    gradients against autograd through the core; the paths by their operators."""
    from test_torch_backend import _OpLog

    tc = importlib.import_module("mmfuse.backends.torch._common")
    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.cp"), "AUTOGRAD_ON_CPU", False)
    folds = []
    tiled = tc._tiled
    monkeypatch.setattr(tc, "_tiled", lambda row, width: folds.append(width) or tiled(row, width))
    bound = tc._ROW_ADD_ROWS
    dims, out_dim = (3, 5), 2
    for batch in (bound - 64, bound):
        fold = batch >= bound and 2 <= rank <= tc._ROW_ADD_WIDTH
        assert bool(tc._row_add_fold(batch, rank, torch.device("cpu"))) == fold
        xs = [rng.standard_normal((batch, d)) for d in dims]
        factors = [rng.standard_normal((d + 1, rank)) / np.sqrt(d + 1) for d in dims]
        factors.append(rng.standard_normal((out_dim, rank)))
        weights, bias = rng.standard_normal(rank), rng.standard_normal(out_dim)
        want = torch.as_tensor(mmfuse.reference.cp_fusion(xs, (weights, factors), bias))

        def leaves(xs=xs, factors=factors, weights=weights, bias=bias):
            return [torch.tensor(a, requires_grad=True) for a in (*xs, *factors, weights, bias)]

        # the primitives: addmm, or mm and the row over the folded view
        x, mat = leaves()[0].detach(), leaves()[2].detach()
        out = torch.empty((batch, rank), dtype=x.dtype)
        with _OpLog() as log:
            tc.project_into(out, x, mat, True)
            got = tc.affine(x, mat, True)
        gemms = [op.split(".")[1] for op in log.ops if op.split(".")[1] in ("mm", "addmm")]
        assert gemms == ["mm" if fold else "addmm"] * 2, (batch, log.ops)  # (out=, then out of place)
        assert_close(out, got, rtol=1e-13, atol=1e-13)
        assert_close(got, torch.cat([x, torch.ones(batch, 1, dtype=x.dtype)], 1) @ mat, rtol=1e-12, atol=1e-13)
        # a step of the op: the forward's projections, then the backward's recomputed ones
        results = []
        for backend in ("torch", "array_api"):
            t = leaves()
            folds.clear()
            y = mmfuse.cp_fusion(t[:2], (t[5], t[2:5]), t[6], backend=backend)
            if backend == "torch":
                assert "CPFusion" in _grad_fn(y), _grad_fn(y)  # the custom op
                assert_close(y.detach(), want, rtol=1e-11, atol=1e-12)
            grads = torch.autograd.grad((y * y.detach()).sum(), t)
            if backend == "torch":
                assert folds == [64 // rank * rank] * (4 if fold else 0), (batch, folds)
            results.append([y.detach(), *grads])
        for got_t, want_t in zip(*results):
            assert_close(got_t, want_t, rtol=1e-10, atol=1e-12)
        folds.clear()
        with torch.no_grad():  # the op's forward alone
            y = mmfuse.cp_fusion([torch.as_tensor(a) for a in xs], (torch.as_tensor(weights), [
                torch.as_tensor(f) for f in factors]), torch.as_tensor(bias))  # fmt: skip
        assert folds == [64 // rank * rank] * (2 if fold else 0), (batch, folds)
        assert_close(y, want, rtol=1e-11, atol=1e-12)


def test_lowrank_layer_single_output_step_matches_the_core(rng):
    """One training step of the layer with h = 1 (the benchmark's narrow case, smaller):
    parameter gradients equal float64 autograd through the core."""
    layer = LowRankFusion([8, 16, 6], 1, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    xs = [torch.tensor(rng.standard_normal((5, d)), requires_grad=True) for d in (8, 16, 6)]
    y = layer(xs)
    y.sum().backward()
    got = [layer.weights.grad, layer.bias.grad, *(f.grad for f in layer.factors), *(x.grad for x in xs)]
    leaves = [p.detach().clone().requires_grad_(True) for p in (layer.weights, layer.bias, *layer.factors)]
    xs2 = [x.detach().clone().requires_grad_(True) for x in xs]
    want_y = mmfuse.lowrank_fusion(xs2, leaves[2:], leaves[0], leaves[1], backend="array_api")
    want = torch.autograd.grad(want_y.sum(), [*leaves, *xs2])
    assert_close(y.detach(), want_y.detach(), rtol=1e-12)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- Wander


def _wander_leaves(rng, batch, lengths, dim, rank, with_bias, dtype=torch.float64, n_out=None):
    p = mmfuse.init_wander([dim] * len(lengths), list(lengths), rank=rank, feature_rank=2, token_rank=3,
                           out_dim=dim, n_out=n_out, seed=int(rng.integers(1 << 30)))  # fmt: skip
    xs = [rng.standard_normal((batch, t, dim)) for t in lengths]
    # small random token factors everywhere, so that every gradient is nonzero
    toks = [rng.standard_normal(t.shape) * 0.3 for t in p["token"]]

    def leaves():
        def t(a):
            return torch.tensor(a, dtype=dtype, requires_grad=True)

        params = {
            "down": [(t(w), t(b) if with_bias else None) for w, b in p["down"]],
            "feature": [t(f) for f in p["feature"]],
            "token": [t(k) for k in toks],
        }
        return [t(x) for x in xs], params

    return leaves


def _flat_params(params):
    out = [w for w, _ in params["down"]] + [b for _, b in params["down"] if b is not None]
    return out + list(params["feature"]) + list(params["token"])


def _spy_stacked(monkeypatch):
    calls = []
    real = torch_wander.stacked_adapter

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch_wander, "stacked_adapter", spy)
    return calls


@pytest.mark.parametrize("path", ["small", "fused"])
@pytest.mark.parametrize(("batch", "lengths", "residual", "with_bias", "with_masks", "n_out"), [
    (1, (5, 4, 6), "first", True, False, None),
    (3, (5, 4, 6), "first", True, True, None),
    (4, (3, 7), "none", False, True, None),
    (2, (6,), "first", False, False, None),
    # one shape for every modality: stacked (token first; feature first, the residual's
    # tokens from three modalities; two modalities), and with masks the core
    (2, (4, 4, 4), "first", True, False, None),
    (3, (3, 3, 3), "first", False, False, 8),
    (1, (4, 4), "none", True, False, None),
    (2, (4, 4, 4), "first", True, True, None),
    # one sample: the token contraction as a bmm (both orders)
    (1, (3, 3, 3), "first", False, False, 8),
    (1, (5, 5, 5), "first", True, False, None),
])  # fmt: skip
def test_wander_collapsed_paths_match_autograd_through_the_core(
    rng, monkeypatch, path, batch, lengths, residual, with_bias, with_masks, n_out
):
    if path == "fused":
        monkeypatch.setattr(torch_wander, "WHOLE_BATCH_ROWS", -1)
    stacked = _spy_stacked(monkeypatch)
    dim = 4
    leaves = _wander_leaves(rng, batch, lengths, dim, 3, with_bias, n_out=n_out)
    masks = None
    if with_masks:
        masks = [torch.as_tensor(rng.random((batch, t)) < 0.7) for t in lengths]
        for k in masks:
            k[:, 0] = True
    results = []
    for backend in ("torch", "array_api"):
        xs, params = leaves()
        if masks is not None:
            with torch.no_grad():
                for x, k in zip(xs, masks):
                    x[~k] = float("nan")  # padded tokens never leak into the fusion
        y = mmfuse.wander(xs, params, mode="collapsed", masks=masks, residual=residual, backend=backend)
        if backend == "torch":
            assert ("WanderCollapsed" in _grad_fn(y)) == (path == "fused")
            one_shape = len(set(lengths)) == 1 and len(lengths) > 1
            assert len(stacked) == int(path == "small" and one_shape and not with_masks)
        if masks is not None:  # the residual adds the raw (here NaN) padded tokens: compare the rest
            keep = torch.ones_like(y, dtype=torch.bool)
            if residual == "first":
                cat = torch.cat(masks, dim=1)[:, : y.shape[1]]
                keep = cat[:, :, None].expand_as(y)
            y = torch.where(keep, y, torch.zeros((), dtype=y.dtype))
        upstream = torch.as_tensor(np.random.default_rng(7).standard_normal(tuple(y.shape)))
        leaves_list = _flat_params(params)
        if masks is None:
            leaves_list = [*xs, *leaves_list]
        grads = torch.autograd.grad((y * upstream).sum(), leaves_list, create_graph=True)
        second = torch.autograd.grad((grads[-1] ** 2).sum(), [params["down"][0][0]])
        results.append([y.detach(), *[g.detach() for g in grads], *second])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("planned", [True, False])
def test_wander_stacks_without_autograd_only_small_batches(rng, monkeypatch, planned):
    """Modalities of one shape take the stacked adapter while autograd records (any batch up
    to WHOLE_BATCH_ROWS) and, without it on the CPU, below NO_GRAD_STACK_ROWS samples; else
    the core.
    The same values either way; planned calls (the plan cache) and unplanned ones (the plan
    cache cleared before each call) choose alike."""
    from mmfuse import _sequence

    stacked = _spy_stacked(monkeypatch)
    small, large = torch_wander.NO_GRAD_STACK_ROWS - 1, torch_wander.NO_GRAD_STACK_ROWS
    for batch, grad, want_stacked in ((small, False, 1), (large, False, 0), (large, True, 1)):
        xs, params = _wander_leaves(rng, batch, (4, 4, 4), 4, 3, True)()
        stacked.clear()
        for _ in range(2):  # the second call planned (when plans are kept)
            if not planned:
                _sequence._WANDER_PLANS.clear()
            with torch.set_grad_enabled(grad):
                y = mmfuse.wander(xs, params, mode="collapsed")
        assert stacked == [1] * (2 * want_stacked), (batch, grad)
        want = mmfuse.wander(xs, params, mode="collapsed", backend="array_api")
        assert_close(y.detach(), want.detach(), rtol=1e-12)
    # the bound is read per call, as WHOLE_BATCH_ROWS: a planned call follows a raised one
    monkeypatch.setattr(torch_wander, "NO_GRAD_STACK_ROWS", large + 1)
    stacked.clear()
    with torch.no_grad():
        mmfuse.wander(xs, params, mode="collapsed")
    assert stacked == [1]


@pytest.mark.parametrize("lengths", [(5, 4, 6), (4, 4, 4)])
@pytest.mark.parametrize("path", ["small", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wander_collapsed_paths_in_lower_precisions(rng, monkeypatch, path, lengths, dtype):
    """float32 and bfloat16 (computed in float32, rounded once) against float64 on the same
    (rounded) inputs."""
    if path == "fused":
        monkeypatch.setattr(torch_wander, "WHOLE_BATCH_ROWS", -1)
    xs64, p64 = _wander_leaves(rng, 3, lengths, 4, 3, True)()
    low = [x.detach().to(dtype) for x in xs64], {
        "down": [(w.detach().to(dtype), b.detach().to(dtype)) for w, b in p64["down"]],
        "feature": [f.detach().to(dtype) for f in p64["feature"]],
        "token": [t.detach().to(dtype) for t in p64["token"]],
    }
    outs = []
    for dt in (dtype, torch.float64):
        xs = [x.to(dt).requires_grad_(True) for x in low[0]]
        params = {
            "down": [(w.to(dt).requires_grad_(True), b.to(dt).requires_grad_(True)) for w, b in low[1]["down"]],
            "feature": [f.to(dt).requires_grad_(True) for f in low[1]["feature"]],
            "token": [t.to(dt).requires_grad_(True) for t in low[1]["token"]],
        }
        y = mmfuse.wander(xs, params, mode="collapsed")
        assert y.dtype == dt
        grads = torch.autograd.grad((y.float() ** 2).sum(), [*xs, *_flat_params(params)])
        outs.append([y.detach(), *grads])
    # bfloat16: the core (modalities of different shapes) rounds its intermediate results too
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(*outs):
        assert got.dtype == dtype
        assert_close(got.double(), want, rtol=tol, atol=tol * float(want.detach().abs().max()))


def test_wander_stacked_path_takes_strided_inputs(rng, monkeypatch):
    """Inputs that are views with other strides (here transposed) run the stacked path."""
    stacked = _spy_stacked(monkeypatch)
    xs64, params = _wander_leaves(rng, 2, (4, 4, 4), 4, 3, True)()
    strided = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for x in xs64]
    assert not strided[0].is_contiguous()
    y = mmfuse.wander(strided, params, mode="collapsed")
    want = mmfuse.wander([x.detach() for x in strided], params, mode="collapsed", backend="array_api")
    assert stacked == [1]
    assert_close(y.detach(), want.detach(), rtol=1e-12)
    (g,) = torch.autograd.grad(y.sum(), [strided[1]])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_accelerator_bounds_of_the_small_forms(monkeypatch):
    """Off the CPU the small forms run up to element bounds on their largest arrays (2**24:
    B R max(h, d_m), B R with one output; 2**25: the stacked Wander adapter's) instead of the
    CPU's batch bounds; on the CPU nothing changes.  The rules themselves, and the
    paths they give on ``meta`` tensors (off the CPU, nothing computed) on both sides of each
    bound, read per call."""
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    big = torch_lowrank.ACCELERATOR_WHOLE_BATCH_ELEMENTS
    assert big == 1 << 24 and torch_wander.ACCELERATOR_SMALL_ELEMENTS == 1 << 25
    whole, plain = torch_lowrank.whole_batch, torch_lowrank.plain_form
    assert whole(8192, 16, 128, False, 128) and not whole(8193, 16, 128, False, 128)
    # the widest modality bounds the dL/dx partials (R, B, d_m) where d_m > h
    assert whole(8192, 16, 2, False, 128) and not whole(8192, 16, 2, False, 129)
    assert not whole(4096, 16, 128, True, 128)  # the CPU's B <= 256 and B R h <= 2**18
    assert whole(256, 4, 8, True) and not whole(257, 4, 8, True)
    assert plain(big // 4, 4, 1, False) and not plain(big // 4 + 1, 4, 1, False)
    assert not plain(8, 4, 2, False)  # off the CPU only h = 1
    # the CPU's B R h <= 2**20, and within whole_batch only h = 1 or R h <= 64
    assert plain(1 << 18, 4, 1, True) and not plain((1 << 18) + 1, 4, 1, True)
    assert plain(1 << 16, 4, 4, True) and not plain((1 << 16) + 1, 4, 4, True)
    assert plain(256, 4, 16, True) and not plain(256, 4, 17, True)  # R h 64, 68 (whole-batch)
    assert not plain(256, 4, 16, True, records=False) and plain(256, 4, 1, True, records=False)
    # without autograd past the whole-batch bounds: B R h <= 2**16 or R h <= 8
    assert plain(1 << 12, 16, 1, True, records=False) and not plain((1 << 12) + 1, 16, 1, True, records=False)
    assert plain(1 << 17, 8, 1, True, records=False) and plain(1 << 17, 8, 1, True)
    assert plain((1 << 12) + 1, 16, 1, True)  # (while autograd records, up to 2**20)
    assert plain(257, 4, 17, True) and plain(256, 16, 128, True)  # past whole_batch's B, B R h
    # with a present mask at most STAGED_ROWS samples (autograd keeps the masked copies)
    assert plain(1024, 4, 1, True, True) and not plain(1025, 4, 1, True, True) and plain(1025, 4, 1, True)

    def lowrank_path(batch, dims, rank, out_dim):
        xs = [torch.empty(batch, d, device="meta", requires_grad=True) for d in dims]
        fs = [torch.empty(rank, d + 1, out_dim, device="meta", requires_grad=True) for d in dims]
        y = mmfuse.lowrank_fusion(xs, fs)
        assert y.shape == (batch, out_dim) and y.device.type == "meta"
        return _grad_fn(y)

    assert lowrank_path(8192, (32, 32, 128), 16, 128) == "_LowRankWholeBatchBackward"
    assert lowrank_path(8193, (32, 32, 128), 16, 128) == "_LowRankFusionBackward"  # the op
    assert lowrank_path(8192, (32, 256), 16, 4) == "_LowRankFusionBackward"  # d_m 256 > h
    assert "LowRank" not in lowrank_path(big // 4, (8, 16), 4, 1)  # single output: plain operations
    assert lowrank_path(big // 4 + 1, (8, 16), 4, 1) == "_LowRankFusionBackward"
    monkeypatch.setattr(torch_lowrank, "ACCELERATOR_WHOLE_BATCH_ELEMENTS", 8191 * 16 * 128)
    assert lowrank_path(8192, (32, 32, 128), 16, 128) == "_LowRankFusionBackward"

    # Wander off the CPU: the stacked adapter up to its largest arrays' elements (M B T max(d,
    # r, D) and M B T_out max(T, D)), other configurations at the CPU's batch bound
    def wander_args(batch, n_tok, d, rank, out_dim, n_out, device="meta"):
        xs = [torch.empty((batch, n_tok, d), device=device) for _ in range(2)]
        params = {"down": [(torch.empty((d, rank), device=device), None)] * 2,
                  "feature": [torch.empty((2, rank, out_dim), device=device)] * 2,
                  "token": [torch.empty((3, n_tok, n_out), device=device)] * 2}  # fmt: skip
        return xs, params

    xs, params = wander_args(4096, 64, 64, 8, 16, 64)  # M B T d = 2**25: at the bound
    assert torch_wander._stacked_elements(xs, params) == 1 << 25
    assert torch_wander._small_batch(xs, params, True, "collapsed")
    assert not torch_wander._small_batch(xs, params, False, "cp")  # the core's path: B <= 128
    xs, params = wander_args(4096, 64, 8, 8, 16, 65)  # the per-sample Psi copy M B T_out T over it
    assert torch_wander._stacked_elements(xs, params) == 2 * 4096 * 65 * 64
    assert not torch_wander._small_batch(xs, params, True, "collapsed")
    assert torch_wander._small_batch(*wander_args(128, 64, 64, 8, 16, 64), False, "cp")
    xs, params = wander_args(129, 4, 4, 2, 2, 3, device="cpu")
    assert not torch_wander._small_batch(xs, params, True, "collapsed")  # CPU: B <= WHOLE_BATCH_ROWS
    monkeypatch.setattr(torch_wander, "ACCELERATOR_SMALL_ELEMENTS", 10)
    assert not torch_wander._small_batch(*wander_args(129, 4, 4, 2, 2, 3), True, "collapsed")
    # and on the CPU only while the core's kept terms fit (M B R_t R_h T_out D: 2 x 128 x 3 x 2
    # x 64 x 16 in cp mode, 2 x 128 x 64 x 16 collapsed; a diff review)
    xs, params = wander_args(128, 64, 64, 8, 16, 64, device="cpu")
    sequence_module = importlib.import_module("mmfuse.backends.torch.sequence")
    monkeypatch.setattr(sequence_module, "CORE_TERM_ELEMENTS", 2 * 128 * 3 * 2 * 64 * 16)
    assert torch_wander._small_batch(xs, params, False, "cp")
    monkeypatch.setattr(sequence_module, "CORE_TERM_ELEMENTS", 2 * 128 * 3 * 2 * 64 * 16 - 1)
    assert not torch_wander._small_batch(xs, params, False, "cp")
    assert torch_wander._small_batch(xs, params, False, "collapsed")


# --------------------------------------------------------------------------- alignment steps

torch_zoom_shift = importlib.import_module("mmfuse.backends.torch.zoom_shift")
torch_align = importlib.import_module("mmfuse.backends.torch.align")
from test_torch_align_op import _case, _loss  # noqa: E402  (its inputs and loss)


def _align_leaves(rng, n_mod, dtype, masked):
    """``n_mod`` modalities requiring grad, of different means, spreads and token counts, the
    first ``n_mod - 1`` masked or none (``test_torch_align_op``'s cases)."""
    xs, masks = _case(rng, n_mod, batch=int(rng.integers(1, 4)), channels=int(rng.integers(2, 6)),
                      dtype=dtype, masked=masked)  # fmt: skip
    return [x.requires_grad_() for x in xs], masks


def _step_grads(ys, xs, weights):
    """dL/dx of L = sum_k <w_k, y_k> (``test_torch_align_op``'s loss), recorded (for a second
    order)."""
    return torch.autograd.grad(_loss(ys, weights), xs, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_small_alignment_steps_run_the_core_under_autograd(rng, dtype, masked):
    """Small CPU float32 / float64 calls that autograd records run the core's algorithm under
    autograd (``AUTOGRAD_CORE_ELEMENTS``), not the custom ops: the same values and gradients
    as the ops' (called as the torch backend's functions, which the rule never reaches), and
    a second order through autograd's own graph."""
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    options = {"rounds": None, "alpha": 0.6, "schedule": "gauss-seidel", "topology": "consensus", "hub": 0,
               "axis": -2, "eps": 1e-5}  # fmt: skip
    for n_mod in (2, 3):
        xs, masks = _align_leaves(rng, n_mod, dtype, masked)
        ws = [torch.from_numpy(rng.standard_normal(tuple(x.shape))).to(dtype) for x in xs]
        ys = mmfuse.align(xs, masks=masks if masked else None, rounds=None, alpha=0.6)
        assert _grad_fn(ys[0]) != "_AlignBackward"
        ops = torch_align.align(xs, masks=masks if masked else None, **options)
        assert _grad_fn(ops[0]) == "_AlignBackward"
        # and the float64 oracle's values (mmfuse.reference, from the inputs' own numbers)
        oracle = mmfuse.reference.align(
            [x.detach().double().numpy() for x in xs], rounds=None, alpha=0.6,
            masks=[None if k is None else k.numpy() for k in masks] if masked else None,
        )  # fmt: skip
        for y, o, r in zip(ys, ops, oracle):
            assert y.dtype == dtype
            assert_close(y.detach(), o.detach(), rtol=tol, atol=tol)
            assert_close(y.detach().double().numpy(), r, rtol=tol, atol=tol * float(np.abs(r).max()))
        for got, want in zip(_step_grads(ys, xs, ws), _step_grads(ops, xs, ws)):
            assert_close(got.detach(), want.detach(), rtol=tol, atol=tol * float(want.detach().abs().max()))
    x, g = xs[0], xs[1]
    mask, guide_mask = masks[0], masks[1]
    w = torch.from_numpy(rng.standard_normal(tuple(x.shape))).to(dtype)
    # (backend "torch": with numba imported "auto" takes its op, mmfuse::zoom_shift_numba, at
    # every size: measured even with the core)
    y = mmfuse.zoom_shift(x, g, mask=mask, guide_mask=guide_mask, alpha=0.7, backend="torch")
    assert _grad_fn(y) != "_ZoomShiftBackward"
    op = torch_zoom_shift.zoom_shift(x, g, mask=mask, guide_mask=guide_mask, alpha=0.7)
    assert _grad_fn(op) == "_ZoomShiftBackward"
    assert_close(y.detach(), op.detach(), rtol=tol, atol=tol)
    for got, want in zip(_step_grads([y], [x, g], [w]), _step_grads([op], [x, g], [w])):
        assert_close(got.detach(), want.detach(), rtol=tol, atol=tol * float(want.detach().abs().max()))
    if dtype == torch.float64:  # the core's second order (autograd through its own graph)
        torch.autograd.gradgradcheck(lambda a, b: mmfuse.zoom_shift(a, b, alpha=0.7, backend="torch"), (x, g))
        torch.autograd.gradgradcheck(lambda a, b: tuple(mmfuse.align([a, b], rounds=2)), (x, g))


def test_alignment_steps_take_the_ops_beyond_the_bound(rng, monkeypatch, call_counts):
    """The rule's edges: a largest input over ``AUTOGRAD_CORE_ELEMENTS``, ``align``'s rounds'
    graph over ``AUTOGRAD_CORE_ROUND_LANES`` (lanes x modalities x rounds, the limit as 2), a
    16-bit dtype (not measured), and calls autograd does not record (the NumPy path on the
    tensors' memory, as before) keep what ran before; both bounds are inclusive."""
    import mmfuse._align as align_api

    x = torch.from_numpy(rng.standard_normal((2, 5, 3))).float().requires_grad_()
    g = torch.from_numpy(3.0 + rng.standard_normal((2, 6, 3))).float().requires_grad_()
    largest, lanes = g.numel(), 2 * 2 * 3  # lanes: (sample, channel) pairs of both modalities

    def names(x, g, rounds=1):
        align_api._ZOOM_SHIFT_PLANS.clear()
        align_api._ALIGN_PLANS.clear()
        zs = mmfuse.zoom_shift(x, g, backend="torch")
        return _grad_fn(zs), _grad_fn(mmfuse.align([x, g], rounds=rounds, backend="torch")[0])

    try:
        monkeypatch.setattr(torch_zoom_shift, "AUTOGRAD_CORE_ELEMENTS", largest)
        core = names(x, g)
        assert core[0] != "_ZoomShiftBackward" and core[1] != "_AlignBackward"
        monkeypatch.setattr(torch_zoom_shift, "AUTOGRAD_CORE_ELEMENTS", largest - 1)
        assert names(x, g) == ("_ZoomShiftBackward", "_AlignBackward")
        monkeypatch.undo()
        monkeypatch.setattr(torch_align, "AUTOGRAD_CORE_ROUND_LANES", 3 * lanes)
        assert names(x, g, rounds=3)[1] != "_AlignBackward"
        assert names(x, g, rounds=4)[1] == "_AlignBackward"
        assert names(x, g, rounds=None)[1] != "_AlignBackward"  # (as two rounds)
        monkeypatch.setattr(torch_align, "AUTOGRAD_CORE_ROUND_LANES", 2 * lanes - 1)
        assert names(x, g, rounds=None)[1] == "_AlignBackward"
        monkeypatch.undo()
        half = [t.detach().half().requires_grad_() for t in (x, g)]
        assert names(*half) == ("_ZoomShiftBackward", "_AlignBackward")
        # without autograd: the NumPy path on the tensors' memory (the same name, NoneType,
        # as the core's would give: counted instead)
        call_counts(torch_zoom_shift, "_on_numpy")  # (both modules' functions of that name:
        call_counts(torch_align, "_on_numpy")  # one count each per names())
        assert names(x.detach(), g.detach()) == ("NoneType", "NoneType")
        assert call_counts.calls["_on_numpy"] == 2
        with torch.no_grad():
            assert names(x, g) == ("NoneType", "NoneType")
        assert call_counts.calls["_on_numpy"] == 4
    finally:
        align_api._ZOOM_SHIFT_PLANS.clear()
        align_api._ALIGN_PLANS.clear()
