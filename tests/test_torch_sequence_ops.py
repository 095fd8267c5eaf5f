"""The torch backend's sequence_fusion, wander and zoom_shift custom ops: values and gradients
against the Array-API core and the reference, opcheck, gradcheck / gradgradcheck, dispatch under
"auto", and what the backward saves."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
import mmfuse.reference as ref  # noqa: E402
from mmfuse.backends import implementations, lookup  # noqa: E402
from mmfuse.testing import assert_close  # noqa: E402

tb = pytest.importorskip("mmfuse.backends.torch")
tbs = pytest.importorskip("mmfuse.backends.torch.sequence")
tbz = pytest.importorskip("mmfuse.backends.torch.zoom_shift")
from test_torch_backend import _OpLog, assert_bindings_agree  # noqa: E402


@pytest.fixture(autouse=True)
def _op_at_every_size(monkeypatch):
    """These tests check the custom ops on small inputs: CPU batches of at most
    ``CORE_ROWS`` samples otherwise run the core (test_sequence_fusion_small_batches_run_the_core)."""
    monkeypatch.setattr(tbs, "CORE_ROWS", -1)


def _leaf(a, dtype=torch.float64):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True)


def _np(t):
    return None if t is None else t.detach().numpy()


@st.composite
def seq_problems(draw):
    n = draw(st.integers(1, 3))
    return {
        "lengths": draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)),
        "widths": draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)),
        "batch": draw(st.integers(1, 4)),
        "r_h": draw(st.integers(1, 3)),
        "r_t": draw(st.integers(1, 3)),
        "n_out": draw(st.integers(1, 3)),
        "out_dim": draw(st.integers(1, 3)),
        "mode": draw(st.sampled_from(["cp", "collapsed"])),
        "with_masks": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _seq_inputs(p):
    rng = np.random.default_rng(p["seed"])
    hs = [_leaf(rng.standard_normal((p["batch"], t, r))) for t, r in zip(p["lengths"], p["widths"])]
    feats = [_leaf(rng.standard_normal((p["r_h"], r, p["out_dim"]))) for r in p["widths"]]
    toks = [_leaf(rng.standard_normal((p["r_t"], t, p["n_out"]))) for t in p["lengths"]]
    masks = None
    if p["with_masks"]:
        masks = [torch.tensor(rng.random((p["batch"], t)) < 0.6) for t in p["lengths"]]
        masks[-1] = None  # an entry may be None
    upstream = torch.tensor(rng.standard_normal((p["batch"], p["n_out"], p["out_dim"])))
    return hs, feats, toks, masks, upstream


def _grads(out, leaves, upstream):
    return torch.autograd.grad((out * upstream).sum(), leaves, retain_graph=True)


def _fd_check(f_ref, arr, grad_value, upstream, index, eps=1e-6):
    """Central difference of the float64 reference along one entry of ``arr``."""
    vals = []
    for s in (1, -1):
        a = arr.copy()
        a[index] += s * eps
        vals.append(f_ref(a))
    fd = float(((vals[0] - vals[1]) / (2 * eps) * upstream).sum())
    assert abs(fd - grad_value) <= 1e-6 * max(1.0, abs(fd)), (fd, grad_value)


# --------------------------------------------------------------------------- sequence_fusion


@settings(max_examples=25, deadline=None)
@given(p=seq_problems())
def test_sequence_op_matches_core_and_reference(p):
    hs, feats, toks, masks, upstream = _seq_inputs(p)
    kw = {"mode": p["mode"], "masks": masks}
    got = mmfuse.sequence_fusion(hs, feats, toks, **kw, backend="torch")
    core = mmfuse.sequence_fusion(hs, feats, toks, **kw, backend="array_api")
    np_masks = None if masks is None else [_np(k) for k in masks]

    def reference(h0):
        return ref.sequence_fusion([h0, *(_np(h) for h in hs[1:])], [_np(f) for f in feats],
                                   [_np(t) for t in toks], mode=p["mode"], masks=np_masks)  # fmt: skip

    assert_close(got, reference(_np(hs[0])), xp=torch, dtype=torch.float64)
    assert_close(got, core)
    leaves = [*hs, *feats, *toks]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)
    g0 = _grads(got, [hs[0]], upstream)[0]
    _fd_check(reference, _np(hs[0]), float(g0[0, 0, 0]), upstream.numpy(), (0, 0, 0))


def test_sequence_many_blocks_matches_core(monkeypatch):
    """Several batch blocks and token-rank chunks (ragged) through forward and backward."""
    from mmfuse._core import sequence as seq_core

    monkeypatch.setattr(seq_core, "CP_BLOCK_BYTES", 2 * 3 * 4 * 2 * 8)  # 2 (sample, j) pairs
    seq_core.cp_blocking.cache_clear()
    try:
        p = {"lengths": [4, 3, 5], "widths": [2, 3, 2], "batch": 5, "r_h": 4, "r_t": 3,
             "n_out": 3, "out_dim": 2, "mode": "cp", "with_masks": True, "seed": 1}  # fmt: skip
        hs, feats, toks, masks, upstream = _seq_inputs(p)
        assert seq_core.cp_blocking(5, 3, 3, 4, 2, 8) == (1, 2)
        got = mmfuse.sequence_fusion(hs, feats, toks, masks=masks, backend="torch")
        core = mmfuse.sequence_fusion(hs, feats, toks, masks=masks, backend="array_api")
        assert_close(got, core)
        leaves = [*hs, *feats, *toks]
        for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
            assert_close(g, c, rtol=1e-10)
    finally:
        seq_core.cp_blocking.cache_clear()


@pytest.mark.parametrize(("lengths", "n_out", "order"), [((6, 5, 7), 2, "token"), ((2, 3, 2), 5, "feature")])
@pytest.mark.parametrize("needs_mask", [(True,) * 9, (True, False, True, False, True, True, True, True, False)])
def test_collapsed_backward_equals_autograd_through_the_core(monkeypatch, lengths, n_out, order, needs_mask):
    """The collapsed-mode backward (one routine: blocked without a graph, whole-batch and out of
    place with one) gives autograd's gradients through the core in both contraction orders,
    over several batch blocks, with masks and partial needs."""
    from mmfuse._core import sequence as seq_core

    monkeypatch.setattr(seq_core, "CP_BLOCK_BYTES", 2 * n_out * 3 * 8)  # 2 samples per block
    seq_core.cp_blocking.cache_clear()
    try:
        seed = int(np.random.default_rng().integers(1 << 30))
        p = {"lengths": list(lengths), "widths": [2, 3, 4], "batch": 5, "r_h": 2, "r_t": 3, "n_out": n_out,
             "out_dim": 3, "mode": "collapsed", "with_masks": True, "seed": seed}  # fmt: skip
        hs, feats, toks, masks, upstream = _seq_inputs(p)
        hs, feats, toks = ([t.detach() for t in ts] for ts in (hs, feats, toks))
        assert tbs._seq_plan(hs, feats, toks, "collapsed").orders == (order,) * 3
        assert seq_core.cp_blocking(5, 1, n_out, 1, 3, 8)[0] == 2
        needs = list(needs_mask)
        leaves = [t.clone().requires_grad_(True) for t in (*hs, *feats, *toks)]
        y = seq_core.sequence_fusion(leaves[:3], leaves[3:6], leaves[6:], mode="collapsed", masks=masks)
        want = torch.autograd.grad(y, [t for t, n in zip(leaves, needs) if n], upstream)
        with torch.no_grad():
            blocked = tbs.collapsed_grads(upstream, hs, feats, toks, masks, needs)
        with torch.enable_grad():
            whole = tbs.collapsed_grads(upstream, hs, feats, toks, masks, needs)
        for got in (blocked, whole):
            assert [g is not None for g in got] == needs
            for g, w in zip([g for g in got if g is not None], want):
                assert_close(g, w, rtol=1e-12)
    finally:
        seq_core.cp_blocking.cache_clear()


def test_collapsed_backward_runs_its_own_routine(monkeypatch):
    calls = []
    real = tbs.collapsed_grads
    monkeypatch.setattr(tbs, "collapsed_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = {"lengths": [4, 3], "widths": [2, 3], "batch": 3, "r_h": 2, "r_t": 2, "n_out": 2,
         "out_dim": 3, "mode": "collapsed", "with_masks": False, "seed": 3}  # fmt: skip
    hs, feats, toks, _, upstream = _seq_inputs(p)
    got = mmfuse.sequence_fusion(hs, feats, toks, mode="collapsed", backend="torch")
    core = mmfuse.sequence_fusion(hs, feats, toks, mode="collapsed", backend="array_api")
    leaves = [*hs, *feats, *toks]
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)
    assert calls == [1]


def test_sequence_only_needed_gradients_and_low_precision():
    p = {"lengths": [4, 3], "widths": [2, 3], "batch": 3, "r_h": 2, "r_t": 2, "n_out": 2,
         "out_dim": 3, "mode": "cp", "with_masks": False, "seed": 2}  # fmt: skip
    hs, feats, toks, _, upstream = _seq_inputs(p)
    frozen = [h.detach() for h in hs]
    part = [toks[0], toks[1].detach()]
    got = mmfuse.sequence_fusion(frozen, feats, part, backend="torch")
    core = mmfuse.sequence_fusion(frozen, feats, part, backend="array_api")
    for g, c in zip(_grads(got, [*feats, toks[0]], upstream), _grads(core, [*feats, toks[0]], upstream)):
        assert_close(g, c, rtol=1e-10)
    cast = [t.detach().bfloat16().requires_grad_() for t in (*hs, *feats, *toks)]
    low = mmfuse.sequence_fusion(cast[:2], cast[2:4], cast[4:], backend="torch")
    assert low.dtype == torch.bfloat16
    assert_close(low.double(), mmfuse.sequence_fusion(hs, feats, toks, backend="array_api"), rtol=5e-2)
    grads = torch.autograd.grad((low * upstream.bfloat16()).sum(), cast)
    assert [g.dtype for g in grads] == [torch.bfloat16] * len(cast)


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_sequence_opcheck_gradcheck(mode):
    # (T_out != D: a fake giving (B, D, T_out) must show)
    p = {"lengths": [3, 2], "widths": [2, 1], "batch": 2, "r_h": 2, "r_t": 2, "n_out": 2,
         "out_dim": 3, "mode": mode, "with_masks": True, "seed": 3}  # fmt: skip
    hs, feats, toks, masks, upstream = _seq_inputs(p)
    masks[0][:, 0] = True
    op_masks = [masks[0], None]
    torch.library.opcheck(torch.ops.mmfuse.sequence_fusion.default, (hs, feats, toks, mode, op_masks))
    # activations of other strides (a permuted view): the backward's gradients take theirs
    strided = [h.detach().transpose(1, 2).contiguous().transpose(1, 2) for h in hs]
    assert not strided[0].is_contiguous()
    for activations in ([h.detach() for h in hs], strided):
        torch.library.opcheck(
            torch.ops.mmfuse.sequence_fusion_backward.default,
            (upstream, activations, [f.detach() for f in feats], [t.detach() for t in toks],
             mode, op_masks, [True, False, True, True, False, True]),
        )  # fmt: skip

    def f(*a):
        return torch.ops.mmfuse.sequence_fusion(list(a[:2]), list(a[2:4]), list(a[4:]), mode, op_masks)

    args = (*hs, *feats, *toks)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_sequence_backward_saves_only_the_inputs():
    """No per-modality (B, R_t T_out, R_h D) term is kept for backward (the core keeps them)."""
    p = {"lengths": [6, 5], "widths": [3, 3], "batch": 4, "r_h": 3, "r_t": 4, "n_out": 5,
         "out_dim": 6, "mode": "cp", "with_masks": True, "seed": 4}  # fmt: skip
    hs, feats, toks, masks, _ = _seq_inputs(p)
    inputs = {t.data_ptr() for t in (*hs, *feats, *toks, *(k for k in masks if k is not None))}
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mmfuse.sequence_fusion(hs, feats, toks, masks=masks, backend="torch")
    assert saved and all(ptr in inputs for ptr, _ in saved), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mmfuse.sequence_fusion(hs, feats, toks, masks=masks, backend="array_api")
    assert any(shape == (4, 4 * 5, 3 * 6) for _, shape in saved)


def test_double_backward_path_equals_fast_path():
    p = {"lengths": [3, 4], "widths": [2, 2], "batch": 3, "r_h": 2, "r_t": 3, "n_out": 2,
         "out_dim": 2, "mode": "cp", "with_masks": True, "seed": 5}  # fmt: skip
    hs, feats, toks, masks, upstream = _seq_inputs(p)
    out = mmfuse.sequence_fusion(hs, feats, toks, masks=masks, backend="torch")
    leaves = [*hs, *feats, *toks]
    fast = torch.autograd.grad((out * upstream).sum(), leaves, retain_graph=True)
    slow = torch.autograd.grad((out * upstream).sum(), leaves, create_graph=True)
    for a, b in zip(fast, slow):
        assert_close(a, b.detach(), rtol=1e-12)


# --------------------------------------------------------------------------- wander


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_wander_torch_matches_core_and_reference(mode, activation):
    rng = np.random.default_rng(6)
    xs = [_leaf(rng.standard_normal((3, t, 5))) for t in (4, 6, 3)]
    params = mmfuse.init_wander([5, 5, 5], [4, 6, 3], rank=3, feature_rank=2, token_rank=2,
                                out_dim=5, seed=1, xp=torch, dtype=torch.float64)  # fmt: skip
    leaves = [*xs]
    for w, b in params["down"]:
        leaves += [w.requires_grad_(), b.requires_grad_()]
    leaves += [f.requires_grad_() for f in params["feature"]] + [t.requires_grad_() for t in params["token"]]
    masks = [torch.tensor(rng.random((3, t)) < 0.7) for t in (4, 6, 3)]
    kw = {"mode": mode, "masks": masks, "activation": activation}
    got = mmfuse.wander(xs, params, **kw, backend="torch")
    core = mmfuse.wander(xs, params, **kw, backend="array_api")
    np_params = {"down": [(_np(w), _np(b)) for w, b in params["down"]],
                 "feature": [_np(f) for f in params["feature"]], "token": [_np(t) for t in params["token"]]}  # fmt: skip
    want = ref.wander([_np(x) for x in xs], np_params, mode=mode, masks=[_np(k) for k in masks],
                      activation=activation)  # fmt: skip
    assert_close(got, want, xp=torch, dtype=torch.float64)
    assert_close(got, core, rtol=1e-12)
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


def _wander_setup(lengths, n_out, seed, dtype=torch.float64, with_bias=True):
    """Leaves of a collapsed GELU Wander problem (the fused op's configuration)."""
    rng = np.random.default_rng(seed)
    d = 5
    xs = [torch.tensor(rng.standard_normal((3, t, d)), dtype=dtype) for t in lengths]
    params = mmfuse.init_wander([d] * len(lengths), list(lengths), rank=3, feature_rank=2, token_rank=2,
                                out_dim=d, n_out=n_out, seed=seed, xp=torch, dtype=dtype)  # fmt: skip
    down = [(w, b if with_bias else None) for w, b in params["down"]]
    params = {"down": down, "feature": list(params["feature"]), "token": list(params["token"])}
    leaves = [*xs, *(t for w, b in down for t in (w, b) if t is not None), *params["feature"], *params["token"]]
    for t in leaves:
        t.requires_grad_()
    masks = [torch.tensor(rng.random((3, t)) < 0.7) for t in lengths]
    masks[1] = None
    return xs, params, leaves, masks, rng


@pytest.mark.parametrize(("lengths", "n_out"), [((4, 6, 3), 3), ((2, 3, 4), 4), ((3, 2), 5)])
@pytest.mark.parametrize("residual", ["first", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_collapsed_wander_matches_core_and_reference(lengths, n_out, residual, with_bias, blocked_paths):
    """The fused op (collapsed mode, GELU): values and all gradients against the core and the
    reference; residuals spanning modalities (T_0 < T_out), both contraction orders (T_out
    below and above T_m), absent biases, masks."""
    seed = int(np.random.default_rng().integers(1 << 30))
    xs, params, leaves, masks, rng = _wander_setup(lengths, n_out, seed, with_bias=with_bias)
    kw = {"mode": "collapsed", "masks": masks, "residual": residual}
    with _OpLog() as log:
        got = mmfuse.wander(xs, params, **kw, backend="torch")
    assert "mmfuse.wander_collapsed.default" in log.ops
    core = mmfuse.wander(xs, params, **kw, backend="array_api")
    np_params = {"down": [(_np(w), _np(b)) for w, b in params["down"]],
                 "feature": [_np(f) for f in params["feature"]], "token": [_np(t) for t in params["token"]]}  # fmt: skip
    want = ref.wander([_np(x) for x in xs], np_params, mode="collapsed",
                      masks=[_np(k) for k in masks], residual=residual)  # fmt: skip
    assert_close(got, want, xp=torch, dtype=torch.float64)
    assert_close(got, core, rtol=1e-12)
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize(("mode", "activation"), [("collapsed", "gelu"), ("collapsed", "relu"), ("cp", "gelu")])
def test_wander_ops_keep_nan_padding_out_of_the_gradients(mode, activation, blocked_paths):
    """NaN in padded tokens never reaches a gradient of the custom ops' paths (the fused
    collapsed GELU op, and the down-projection before the sequence op otherwise): padding is
    zeroed before the down-projection, whose dL/dW would else take 0 * NaN (a mutation
    review: unmasked, dL/dW_0 was NaN and every test passed)."""
    seed = int(np.random.default_rng().integers(1 << 30))
    xs, params, leaves, masks, rng = _wander_setup((4, 6, 3), 3, seed)
    masks[0][:, 0] = True
    masks[0][:, -1] = False
    with torch.no_grad():
        xs[0][~masks[0]] = float("nan")
    kw = {"mode": mode, "masks": masks, "activation": activation, "residual": "none"}
    with _OpLog() as log:
        got = mmfuse.wander(xs, params, **kw, backend="torch")
    fused = "mmfuse.wander_collapsed.default" in log.ops
    assert fused == (mode == "collapsed" and activation == "gelu")
    assert fused or "mmfuse.sequence_fusion.default" in log.ops
    core = mmfuse.wander(xs, params, **kw, backend="array_api")
    assert torch.isfinite(got).all()
    assert_close(got, core, rtol=1e-12)
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for leaf, g, c in zip(leaves, _grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        if leaf is xs[0]:
            continue  # (the padded tokens' own gradient: 0 on both, but NaN * 0 is not 0)
        assert torch.isfinite(g).all()
        assert_close(g, c, rtol=1e-10)


@pytest.mark.parametrize(("lengths", "n_out"), [((0, 5), 3), ((2, 0, 5), 4)])
def test_fused_collapsed_wander_residual_skips_a_modality_without_tokens(lengths, n_out, blocked_paths):
    """A modality with no tokens before the residual's T_out are taken: the fused op's residual
    stopped at it, leaving out the later modalities' tokens and their gradients, where the
    core, the reference and small batches skip it (a review's find).  One rule now, the core's
    :func:`mmfuse._core.sequence.residual_spans`."""
    seed = int(np.random.default_rng().integers(1 << 30))
    xs, params, _, _, rng = _wander_setup([max(t, 1) for t in lengths], n_out, seed)
    # (init_wander refuses T_m = 0, which the functional calls take: inputs and token factors cut)
    xs = [x.detach()[:, :t].clone().requires_grad_() for x, t in zip(xs, lengths)]
    params["token"] = [f.detach()[:, :t].clone().requires_grad_() for f, t in zip(params["token"], lengths)]
    leaves = [*xs, *(t for w, b in params["down"] for t in (w, b)), *params["feature"], *params["token"]]
    with _OpLog() as log:
        got = mmfuse.wander(xs, params, mode="collapsed", backend="torch")
    assert "mmfuse.wander_collapsed.default" in log.ops
    core = mmfuse.wander(xs, params, mode="collapsed", backend="array_api")
    np_params = {"down": [(_np(w), _np(b)) for w, b in params["down"]],
                 "feature": [_np(f) for f in params["feature"]], "token": [_np(t) for t in params["token"]]}  # fmt: skip
    assert_close(got, ref.wander([_np(x) for x in xs], np_params, mode="collapsed"), xp=torch, dtype=torch.float64)
    assert_close(got, core, rtol=1e-12)
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


def test_fused_collapsed_wander_partial_gradients_and_low_precision():
    xs, params, _, masks, rng = _wander_setup((4, 5), 3, 7)
    frozen = [xs[0].detach(), xs[1]]  # no gradient for x_0 (the residual's modality)
    down = [(params["down"][0][0].detach(), params["down"][0][1]), params["down"][1]]
    part = {"down": down, "feature": [params["feature"][0].detach(), params["feature"][1]], "token": params["token"]}
    want_leaves = [xs[1], down[0][1], *down[1], params["feature"][1], *params["token"]]
    got = mmfuse.wander(frozen, part, mode="collapsed", masks=masks, backend="torch")
    core = mmfuse.wander(frozen, part, mode="collapsed", masks=masks, backend="array_api")
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for g, c in zip(_grads(got, want_leaves, upstream), _grads(core, want_leaves, upstream)):
        assert_close(g, c, rtol=1e-10)
    cast = [x.detach().bfloat16().requires_grad_() for x in xs]
    low_params = {k: [tuple(t.detach().bfloat16() for t in wb) for wb in v] if k == "down"
                  else [t.detach().bfloat16() for t in v] for k, v in params.items()}  # fmt: skip
    low = mmfuse.wander(cast, low_params, mode="collapsed", backend="torch")
    assert low.dtype == torch.bfloat16
    assert_close(low.double(), mmfuse.wander(xs, params, mode="collapsed", backend="array_api"), rtol=5e-2)
    grads = torch.autograd.grad(low.float().square().sum(), cast)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 2


def test_fused_collapsed_wander_opcheck_gradcheck_and_saved(blocked_paths):
    xs, params, leaves, masks, _ = _wander_setup((3, 4), 2, 5)
    down = params["down"]
    args = ([x.detach() for x in xs], [w.detach() for w, _ in down], [b.detach() for _, b in down],
            [f.detach() for f in params["feature"]], [t.detach() for t in params["token"]], masks, True)  # fmt: skip
    torch.library.opcheck(torch.ops.mmfuse.wander_collapsed.default, args)

    def wander(*leaf):
        x0, x1, w0, b0, w1, b1, f0, f1, t0, t1 = leaf
        p = {"down": [(w0, b0), (w1, b1)], "feature": [f0, f1], "token": [t0, t1]}
        return mmfuse.wander([x0, x1], p, mode="collapsed", masks=masks, backend="torch")

    def op(*leaf):  # the op with its registered autograd (torch.compile's path)
        x0, x1, w0, b0, w1, b1, f0, f1, t0, t1 = leaf
        return torch.ops.mmfuse.wander_collapsed([x0, x1], [w0, w1], [b0, b1], [f0, f1], [t0, t1], masks, True)[0]

    batch, (t0, t1), rank, n_out, d = 3, (3, 4), 3, 2, 5
    orders = tbs._seq_plan(xs, params["feature"], params["token"], "collapsed").orders
    firsts = [batch * (n_out * rank if o == "token" else t * d) for o, t in zip(orders, (t0, t1))]
    inputs = {t.data_ptr() for t in leaves} | {k.data_ptr() for k in masks if k is not None}
    saved: list = []
    for f, node in ((wander, "_WanderCollapsedBackward"), (op, "GeneratedBackwardFor_mmfuse_wander_collapsed")):
        assert torch.autograd.gradcheck(f, tuple(leaves))
        assert torch.autograd.gradgradcheck(f, tuple(leaves))
        # saved for backward: the inputs and one flat by-product (pre-activations, first
        # contractions, terms), nothing else
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = f(*leaves)
        extra = [t for t in saved if t.data_ptr() not in inputs]
        assert [tuple(t.shape) for t in extra] == [(batch * (t0 + t1) * rank + sum(firsts) + 2 * batch * n_out * d,)]
        assert type(out.grad_fn).__name__.startswith(node)
        assert_close(op(*leaves), wander(*leaves), rtol=0)


# --------------------------------------------------------------------------- zoom_shift


@st.composite
def zs_problems(draw):
    return {
        "batch": draw(st.integers(1, 3)),
        "t_x": draw(st.integers(2, 6)),
        "t_g": draw(st.integers(2, 6)),
        "channels": draw(st.integers(1, 3)),
        "alpha": draw(st.sampled_from([1.0, 0.5, 0.25])),
        "eps": draw(st.sampled_from([1e-5, 0.0, 0.3])),
        "with_masks": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _zs_inputs(p):
    rng = np.random.default_rng(p["seed"])
    x = _leaf(rng.standard_normal((p["batch"], p["t_x"], p["channels"])))
    g = _leaf(3 + 2 * rng.standard_normal((p["batch"], p["t_g"], p["channels"])))
    mask = guide_mask = None
    if p["with_masks"]:
        mask = torch.tensor(rng.random((p["batch"], p["t_x"])) < 0.6)
        mask[:, :2] = True  # at least two tokens count: a spread to zoom
        guide_mask = torch.tensor(rng.random((p["batch"], p["t_g"])) < 0.6)
        guide_mask[:, -2:] = True
    return x, g, mask, guide_mask, torch.tensor(rng.standard_normal(tuple(x.shape)))


@settings(max_examples=30, deadline=None)
@given(p=zs_problems())
def test_zoom_shift_op_matches_core_and_reference(p):
    x, g, mask, guide_mask, upstream = _zs_inputs(p)
    kw = {"alpha": p["alpha"], "mask": mask, "guide_mask": guide_mask, "eps": p["eps"]}
    # the op: the torch backend's function itself (the public call runs small CPU calls that
    # autograd records as the core under autograd; tests/conftest.py, custom_align_ops)
    got = importlib.import_module("mmfuse.backends.torch.zoom_shift").zoom_shift(x, g, **kw)
    core = mmfuse.zoom_shift(x, g, **kw, backend="array_api")
    np_kw = {**kw, "mask": _np(mask), "guide_mask": _np(guide_mask)}

    def reference(x0):
        return ref.zoom_shift(x0, _np(g), **np_kw)

    assert_close(got, reference(_np(x)), xp=torch, dtype=torch.float64)
    assert_close(got, core, rtol=1e-12)
    for a, b in zip(_grads(got, [x, g], upstream), _grads(core, [x, g], upstream)):
        # some gradients are zero in exact arithmetic (e.g. the guide's at alpha = 1 with a
        # sum-free upstream): judge those on the inputs' O(1) scale, not on their own
        assert_close(a, b, rtol=1e-9, atol=1e-12)
    gx = _grads(got, [x], upstream)[0]
    _fd_check(reference, _np(x), float(gx[0, 1, 0]), upstream.numpy(), (0, 1, 0))


def test_zoom_shift_channel_axis_and_low_precision(custom_align_ops):
    rng = np.random.default_rng(7)
    x = _leaf(rng.standard_normal((3, 1, 6)))
    g = _leaf(rng.standard_normal((3, 1, 4)))
    got = mmfuse.zoom_shift(x, g, axis=-1, alpha=0.5, backend="torch")
    core = mmfuse.zoom_shift(x, g, axis=-1, alpha=0.5, backend="array_api")
    assert_close(got, core, rtol=1e-12)
    up = torch.randn(3, 1, 6, dtype=torch.float64)
    for a, b in zip(_grads(got, [x, g], up), _grads(core, [x, g], up)):
        assert_close(a, b, rtol=1e-9)
    xh, gh = x.detach().bfloat16().requires_grad_(), g.detach().bfloat16().requires_grad_()
    low = mmfuse.zoom_shift(xh, gh, axis=-1, backend="torch")
    assert low.dtype == torch.bfloat16
    assert_close(low.double(), mmfuse.zoom_shift(x, g, axis=-1, backend="array_api"), rtol=5e-2)
    assert torch.autograd.grad(low.sum(), xh)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_zoom_shift_opcheck_gradcheck(alpha):
    p = {"batch": 2, "t_x": 4, "t_g": 3, "channels": 2, "alpha": alpha, "eps": 1e-5,
         "with_masks": True, "seed": 8}  # fmt: skip
    x, g, mask, guide_mask, _ = _zs_inputs(p)
    torch.library.opcheck(torch.ops.mmfuse.zoom_shift.default, (x, g, alpha, -2, mask, guide_mask, 1e-5))
    permuted = x.detach().transpose(1, 2).contiguous().transpose(1, 2)  # the output takes x's strides
    torch.library.opcheck(torch.ops.mmfuse.zoom_shift.default, (permuted, g.detach(), alpha, -2, mask, guide_mask, 1e-5))

    def f(x, g):
        return torch.ops.mmfuse.zoom_shift(x, g, alpha, -2, mask, guide_mask, 1e-5)

    assert torch.autograd.gradcheck(f, (x, g))
    assert torch.autograd.gradgradcheck(f, (x, g))


def test_zoom_shift_backward_saves_only_the_inputs(custom_align_ops):
    x, g, mask, guide_mask, _ = _zs_inputs({"batch": 2, "t_x": 5, "t_g": 4, "channels": 3, "alpha": 0.5,
                                            "eps": 1e-5, "with_masks": True, "seed": 9})  # fmt: skip
    inputs = {t.data_ptr() for t in (x, g, mask, guide_mask)}
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mmfuse.zoom_shift(x, g, alpha=0.5, mask=mask, guide_mask=guide_mask, backend="torch")
    assert saved and all(ptr in inputs for ptr in saved)


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("op", ["sequence_fusion", "wander", "zoom_shift"])
def test_auto_runs_the_custom_op(op, blocked_paths):
    rng = np.random.default_rng(10)
    if op == "zoom_shift":
        x, g = _leaf(rng.standard_normal((2, 4, 3))), _leaf(rng.standard_normal((2, 5, 3)))

        def call(**kw):
            return mmfuse.zoom_shift(x, g, alpha=0.5, **kw)

        like, custom = x, "mmfuse.zoom_shift.default"
    elif op == "sequence_fusion":
        p = {"lengths": [3, 2], "widths": [2, 2], "batch": 2, "r_h": 2, "r_t": 2, "n_out": 2,
             "out_dim": 2, "mode": "cp", "with_masks": True, "seed": 11}  # fmt: skip
        hs, feats, toks, masks, _ = _seq_inputs(p)

        def call(**kw):
            return mmfuse.sequence_fusion(hs, feats, toks, masks=masks, **kw)

        like, custom = hs[0], "mmfuse.sequence_fusion.default"
    else:
        xs = [_leaf(rng.standard_normal((2, t, 4))) for t in (3, 5)]
        params = mmfuse.init_wander([4, 4], [3, 5], rank=2, feature_rank=2, token_rank=2, out_dim=4,
                                    seed=0, xp=torch, dtype=torch.float64)  # fmt: skip

        def call(**kw):
            return mmfuse.wander(xs, params, **kw)

        like, custom = xs[0], "mmfuse.sequence_fusion.default"
    expected = tb.__dict__[op]
    if op == "zoom_shift" and "numba" in sys.modules:
        # on CPU tensors, once numba is imported: its kernels inside mmfuse::zoom_shift_numba
        # (tests/test_align_auto_cpu.py); under a dispatch mode (below) the torch op still runs
        from mmfuse.backends.numba import zoom_shift_cpu as expected
    assert lookup(op, "auto", like=like) is expected
    top = {i.backend: i.priority for i in reversed(implementations(op))}  # each backend's highest
    assert top["torch"] > top["array_api"]
    with mmfuse.config_context(backend="auto"), _OpLog() as log:
        out = call()
    assert custom in log.ops
    with _OpLog() as log:
        call(backend="array_api")
    assert custom not in log.ops
    if op != "wander":  # the backward runs the analytic formula, not autograd through the core
        node = {"sequence_fusion": "_SequenceFusionBackward", "zoom_shift": "_ZoomShiftBackward"}[op]
        assert type(out.grad_fn).__name__ == node  # the eager binding (backends._torch_eager)


@pytest.mark.parametrize(("op", "mode"), [("sequence_fusion", "cp"), ("sequence_fusion", "collapsed"),
                                       ("zoom_shift", None)])  # fmt: skip
def test_registered_autograd_equals_the_eager_binding(op, mode, monkeypatch, custom_align_ops):
    """The op with its registered autograd (torch.compile's path) and the eager
    autograd.Function binding give the same values and gradients, double backward included."""
    if op == "sequence_fusion":
        p = {"lengths": [3, 4], "widths": [2, 3], "batch": 3, "r_h": 2, "r_t": 2, "n_out": 2,
             "out_dim": 3, "mode": mode, "with_masks": True, "seed": 17}  # fmt: skip
        hs, feats, toks, masks, upstream = _seq_inputs(p)
        leaves = [*hs, *feats, *toks]

        def call():
            return mmfuse.sequence_fusion(hs, feats, toks, mode=mode, masks=masks, backend="torch")
    else:
        p = {"batch": 2, "t_x": 5, "t_g": 4, "channels": 3, "with_masks": True, "seed": 18}
        x, g, mask, guide_mask, upstream = _zs_inputs(p)
        leaves = [x, g]

        def call():
            return mmfuse.zoom_shift(x, g, alpha=0.5, mask=mask, guide_mask=guide_mask, backend="torch")

    eager = call()
    node = {"sequence_fusion": "_SequenceFusionBackward", "zoom_shift": "_ZoomShiftBackward"}[op]
    assert type(eager.grad_fn).__name__ == node
    module, binding = {"sequence_fusion": (tbs, "sequence_op_eager"), "zoom_shift": (tbz, "_zoom_shift_eager")}[op]
    monkeypatch.setattr(module, binding, getattr(torch.ops.mmfuse, op))
    registered = call()
    assert type(registered.grad_fn).__name__.startswith("GeneratedBackwardFor_mmfuse_" + op)
    assert_bindings_agree(eager, registered, leaves, upstream, leaves[0], leaves[-1])


def test_torch_backend_refuses_numpy():
    with pytest.raises(TypeError, match=r"backend 'torch' cannot take numpy arrays .* needs torch tensors"):
        mmfuse.zoom_shift(np.ones((2, 3, 1)), np.ones((2, 3, 1)), backend="torch")


def test_float64_gelu_gradient_of_a_nan_is_nan():
    """The float64 GELU's autograd path read x clamped to each formula's side, and clamp's
    derivative is 0 at NaN: a NaN pre-activation got a zero gradient, so a NaN sample vanished
    from the parameters' gradients (a review's find).  NaN now, as the fused op's backward and
    torch's own GELU give; finite inputs on both sides of the cut as before."""
    from mmfuse._core.sequence import gelu_torch
    from mmfuse.backends.torch.wander import _gelu_backward

    v = torch.tensor([math.nan, 1.0, -3.0, -math.sqrt(2.0)], dtype=torch.float64)
    x = v.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gelu_torch(x).sum(), x)
    assert torch.isnan(grad[0]) and torch.isfinite(grad[1:]).all()
    torch.testing.assert_close(grad, _gelu_backward(torch.ones_like(v), v), rtol=1e-15, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["fused op", "autograd"])
def test_wander_gelu_derivative_is_accurate_in_the_lower_tail(path):
    """The GELU derivative Phi(x) + x phi(x) (float64) against 50-digit arithmetic, as the
    fused Wander op's backward forms it and as autograd forms it from the core's forward (the
    smaller calls, torch.func): phi from exp of the rounded x * x lost about x^2 / 2 ulps in
    the lower tail (474 at x = -35), and autograd's derivative of erfc of the rounded
    argument up to 490 on [-37.5, -20] (two reviews against exact arithmetic); each is within
    a few ulps of |Phi| + |x phi|."""
    mpmath = pytest.importorskip("mpmath")
    from mmfuse._core.sequence import gelu_torch
    from mmfuse.backends.torch.wander import _gelu_backward

    mp = mpmath.mp.clone()
    mp.dps = 50
    x = np.concatenate([np.linspace(-38.0, -1.0, 371), np.linspace(-1.0, 8.0, 91)])
    parts = []
    for v in x:
        v = mp.mpf(v)
        phi = mp.exp(-v * v / 2) / mp.sqrt(2 * mp.pi)
        parts.append((float(mp.ncdf(v) + v * phi), float(mp.ncdf(v) + abs(v) * phi)))
    exact, size = (np.array(p) for p in zip(*parts))
    if path == "fused op":
        got = _gelu_backward(torch.ones(len(x), dtype=torch.float64), torch.tensor(x)).numpy()
    else:
        t = torch.tensor(x, requires_grad=True)
        (grad,) = torch.autograd.grad(gelu_torch(t).sum(), t)
        got = grad.numpy()
    err, normal = np.abs(got - exact), np.abs(exact) >= np.finfo(np.float64).tiny
    assert np.all(err[normal] <= 32 * np.spacing(size[normal]))
    # derivatives below the normal range (x < -37.6, where the Gaussian factor is subnormal
    # itself): to a few dozen units of 2**-1074, which autograd's chain through the split
    # Gaussian factor takes twice the fused formula's (39 against at most 32; the values
    # are 1e-313 and less)
    units = 32 if path == "fused op" else 64
    assert np.all(err[~normal] <= units * np.spacing(0.0))


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_sequence_fusion_small_batches_run_the_core(monkeypatch, mode):
    """On the CPU, batches of at most ``CORE_ROWS`` samples run the Array-API core (under
    autograd when it records), whose training step took 0.40-0.85x the custom op's (the op
    1.4-2.2x the plain code's; a review's measurement); one sample more runs the op.  Values
    and gradients of both against the reference's and each other's, masks included."""
    monkeypatch.undo()  # (this module's pin of the bound)
    bound = 6
    monkeypatch.setattr(tbs, "CORE_ROWS", bound)
    p = {"lengths": [3, 4], "widths": [2, 3], "batch": bound + 1, "r_h": 2, "r_t": 2, "n_out": 2,
         "out_dim": 3, "mode": mode, "with_masks": True, "seed": 23}  # fmt: skip
    all_hs, feats, toks, all_masks, upstream = _seq_inputs(p)
    results = []
    for batch, node in ((bound, None), (bound + 1, "_SequenceFusionBackward")):
        hs = [h[:batch] for h in all_hs]
        masks = [None if k is None else k[:batch] for k in all_masks]
        with _OpLog() as log:
            out = mmfuse.sequence_fusion(hs, feats, toks, mode=mode, masks=masks, backend="torch")
        assert ("mmfuse.sequence_fusion.default" in log.ops) == (node is not None), (batch, log.ops)
        if node is not None:
            assert type(out.grad_fn).__name__ == node
        want = ref.sequence_fusion([_np(h) for h in hs], [_np(f) for f in feats], [_np(t) for t in toks],
                                   mode=mode, masks=None if masks is None else [_np(k) for k in masks])  # fmt: skip
        assert_close(out.detach().numpy(), want, rtol=1e-12, atol=1e-12)
        results.append([out[:bound].detach(), *_grads(out[:bound], [*feats, *toks], upstream[:bound])])
        with torch.no_grad(), _OpLog() as log:
            mmfuse.sequence_fusion(hs, feats, toks, mode=mode, masks=masks, backend="torch")
        assert ("mmfuse.sequence_fusion.default" in log.ops) == (node is not None), (batch, log.ops)
    # the first bound rows' gradients of the parameters: the core's and the op's agree
    # (the op's call has one sample more, whose rows are cut from the loss)
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and within the rows, only while the terms the core keeps fit CORE_TERM_ELEMENTS (M B R_t
    # R_h T_out D, ranks 1 in collapsed mode: a diff review measured 10x the op's memory past it)
    hs = [h[:bound] for h in all_hs]
    terms = len(hs) * bound * (1 if mode == "collapsed" else 2 * 2) * 2 * 3
    for limit, runs_op in ((terms, False), (terms - 1, True)):
        monkeypatch.setattr(tbs, "CORE_TERM_ELEMENTS", limit)
        with _OpLog() as log:
            out = mmfuse.sequence_fusion(hs, feats, toks, mode=mode, backend="torch")
        assert ("mmfuse.sequence_fusion.default" in log.ops) == runs_op, (limit, log.ops)


def test_the_cores_term_bound_counts_rank_products():
    """The kept terms of cp mode are M B R_t R_h T_out D (a mutation review: a bound counting
    R_t + R_h passed, since the only case had R_h = R_t = 2; at R_h = R_t = 16 it let the core
    keep six times its documented bound)."""
    feats = [torch.empty(3, 2, 4)] * 2  # R_h 3, D 4
    toks = [torch.empty(5, 6, 7)] * 2  # R_t 5, T_out 7
    terms = 2 * 10 * 3 * 5 * 7 * 4  # M B R_h R_t T_out D at B = 10
    for mode, kept in (("cp", terms), ("collapsed", terms // 15)):
        for limit, fits in ((kept, True), (kept - 1, False)):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tbs, "CORE_TERM_ELEMENTS", limit)
                assert tbs.core_terms_fit(10, feats, toks, mode) is fits, (mode, limit)


@pytest.mark.parametrize("trained", ["biases", "weights"])
def test_fused_collapsed_wander_gradients_of_the_down_projection_alone(trained, blocked_paths):
    """Frozen inputs, factors and all but the down-projections' biases (BitFit) or weights:
    the fused op's backward still forms dL/dH for them (a mutation review: without it the
    bias-only call failed with an invalid gradient shape, untested)."""
    xs, params, _, masks, rng = _wander_setup((4, 5), 3, 11)
    frozen = {"down": [(w if trained == "weights" else w.detach(), b if trained == "biases" else b.detach())
                       for w, b in params["down"]],
              "feature": [f.detach() for f in params["feature"]], "token": [t.detach() for t in params["token"]]}  # fmt: skip
    leaves = [wb[0 if trained == "weights" else 1] for wb in frozen["down"]]
    xs = [x.detach() for x in xs]
    got = mmfuse.wander(xs, frozen, mode="collapsed", masks=masks, backend="torch")
    assert "WanderCollapsed" in type(got.grad_fn).__name__
    core = mmfuse.wander(xs, frozen, mode="collapsed", masks=masks, backend="array_api")
    upstream = torch.tensor(rng.standard_normal(tuple(got.shape)))
    for g, c in zip(_grads(got, leaves, upstream), _grads(core, leaves, upstream)):
        assert_close(g, c, rtol=1e-10)


def test_fused_collapsed_wander_batched_gradients(blocked_paths):
    """Batched vector-Jacobian products (``is_grads_batched``, vmap over the backward)
    through the fused op equal one product per row (a mutation review: the backward's
    in-place path under vmap failed, untested)."""
    xs, params, _, masks, rng = _wander_setup((4, 5), 3, 12)
    got = mmfuse.wander(xs, params, mode="collapsed", masks=masks, backend="torch")
    assert "WanderCollapsed" in type(got.grad_fn).__name__
    ups = torch.tensor(rng.standard_normal((3, *got.shape)))
    weight = params["down"][1][0]
    batched = torch.autograd.grad(got, weight, ups, retain_graph=True, is_grads_batched=True)[0]
    for row, up in zip(batched, ups):
        assert_close(row, torch.autograd.grad(got, weight, up, retain_graph=True)[0], rtol=1e-12)
