"""Numerics of the Zoom-and-Shift operators: statistics whatever the mean-to-spread ratio and for
float32 spreads up to 1e18 (variance 1e36; beyond about 1.8e19 the variance leaves float32's
range, a documented limit), maps about the pivot, NaN padding under autograd, scalar operands
that keep x's dtype.  Every backend that runs on a CPU is compared with a float64 oracle."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import mmfuse
from mmfuse import reference
from mmfuse._core import align as core
from mmfuse._namespace import to_numpy
from mmfuse.testing import assert_close

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
F32 = "float32"


def _large_mean(rng, shape, mean=1e4, spread=1e-2):
    """Data whose mean dwarfs its spread, per sample and channel (float32)."""
    loc = mean * rng.uniform(0.5, 1.5, size=(shape[0], 1, shape[2]))
    return (loc + spread * rng.standard_normal(shape)).astype(np.float32)


def _wide(rng, shape, scale=1e18):
    """float32 data with a spread of 1e18: the variance (1e36) is representable, and so is the
    sum of squares over the few dozen tokens used here."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _mask(rng, batch, tokens):
    m = rng.random((batch, tokens)) > 0.3
    m[:, :2] = True
    return m


def _oracle_zoom_shift(x, g, *, alpha=1.0, mask=None, guide_mask=None, eps=1e-5):
    """float64, in the centred form (the reference's zoom-then-shift cancels |mu_x| against
    the output, which loses accuracy when the mean dwarfs the spread)."""
    mx, sx = reference.moments(x, mask=mask, eps=eps)
    mg, sg = reference.moments(g, mask=guide_mask, eps=eps)
    return (x.astype(np.float64) - mx) * (sg / sx) ** alpha + ((1 - alpha) * mx + alpha * mg)


def _assert_within_ulps(actual, desired, ulps=8, err_msg=""):
    """|actual - desired| within a few float32 ulps of each desired value (plus 1e-6 of the
    spread over tokens): the outputs' own rounding, which is what the pivot form achieves.
    assert_close's ``rtol * max|desired|`` would hide errors of a few % of the spread when
    the mean is large."""
    a = to_numpy(actual).astype(np.float64)
    d = np.asarray(desired, dtype=np.float64)
    spread = np.abs(d - d.mean(axis=1, keepdims=True)).max()
    allowed = ulps * np.spacing(np.abs(d).astype(np.float32)).astype(np.float64) + 1e-6 * spread
    worst = np.max(np.abs(a - d) - allowed)
    assert worst <= 0, f"{err_msg}: error exceeds {ulps} ulps by {worst:.3e}"


def _numpy_backends():
    """Implementations of moments / zoom_shift / align on NumPy arrays that run on a CPU."""
    out = ["array_api", "reference"]
    if HAVE_NUMBA:
        out.append("numba")
    return out


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("masked", [False, True])
def test_moments_large_mean_small_spread(xp, rng, masked):
    """1e4 + 1e-2 noise in float32: the std to float32 accuracy (a plain two-pass variance
    around a rounded float32 mean was off by 1.6e-2 relative)."""
    x = _large_mean(rng, (3, 64, 5))
    mask = _mask(rng, 3, 64) if masked else None
    mean, std = mmfuse.moments(
        xp.asarray(x, F32), mask=None if mask is None else xp.asarray(mask), eps=0.0, backend="array_api"
    )
    want_mean, want_std = reference.moments(x, mask=mask, eps=0.0)
    assert_close(mean, want_mean, dtype=xp.dtype(F32))
    assert_close(std, want_std, dtype=xp.dtype(F32))
    # the mean as pivot + correction: within an ulp of the exact one (the pivot alone, a
    # rounded float32 sum, was 1.6-2.6 ulps off and passed the tolerance above; a mutation
    # review's find)
    _assert_within_ulps(mean, want_mean, ulps=1)
    xp.assert_untouched()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("data", ["large-mean", "wide"])
@pytest.mark.parametrize("backend", _numpy_backends())
def test_moments_backends_agree_on_hard_float32_data(rng, backend, data, masked):
    """Every CPU backend gives the float64 answer: no backend-dependent results."""
    x = _large_mean(rng, (4, 48, 3)) if data == "large-mean" else _wide(rng, (4, 48, 3))
    mask = _mask(rng, 4, 48) if masked else None
    if masked:  # huge padding must not matter either
        x = np.where(mask[:, :, None], x, np.float32(3e38))
    mean, std = mmfuse.moments(x, mask=mask, eps=0.0, backend=backend)
    want_mean, want_std = reference.moments(x, mask=mask, eps=0.0)
    assert mean.dtype == std.dtype == np.float32
    assert np.all(np.isfinite(std))
    assert_close(mean, want_mean)
    assert_close(std, want_std)


@pytest.mark.parametrize("masked", [False, True])
def test_moments_wide_float32(xp, rng, masked):
    """Spread 1e18 in float32 (variance 1e36) on every namespace."""
    x = _wide(rng, (2, 16, 3))
    mask = _mask(rng, 2, 16) if masked else None
    mean, std = mmfuse.moments(
        xp.asarray(x, F32), mask=None if mask is None else xp.asarray(mask), backend="array_api"
    )
    want_mean, want_std = reference.moments(x, mask=mask)
    assert np.all(np.isfinite(to_numpy(std)))
    assert_close(mean, want_mean, dtype=xp.dtype(F32))
    assert_close(std, want_std, dtype=xp.dtype(F32))


@pytest.mark.parametrize("tokens", [100, 1000])
def test_moments_float32_variance_past_its_range_leaves_no_lane_finite(xp, rng, tokens):
    """Spread 1e20 about 1e27 in float32: the variance (1e40) is past float32's range, so
    every lane's spread is inf or NaN (docs/backends.rst, Range limits), none finite, none
    0.  The generic form's
    "no spread" rule (a variance within the noise of corr * corr) must not take a lane whose
    noise overflowed to inf for one without spread: without its isfinite test one lane in
    four came back 0 (a mutation review's find; 64 lanes here, so that some lane's noise
    overflows whatever the draw).  1000 tokens: torch's generic form (past
    TORCH_VAR_MEAN_ELEMENTS)."""
    x = (1e27 + 1e20 * rng.standard_normal((2, tokens, 32))).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        _, std = mmfuse.moments(xp.asarray(x, F32), eps=0.0, backend="array_api")
    assert not np.isfinite(to_numpy(std)).any(), to_numpy(std)


@pytest.mark.parametrize("threads", [False, True])
def test_numpy_blocks_mixed_scales(rng, monkeypatch, threads):
    """Several cache blocks, some samples of spread 1e18 and most with a large mean and a tiny
    spread: every sample keeps its own accuracy."""
    monkeypatch.setattr(core, "_BLOCK_BYTES", 4096)
    monkeypatch.setattr(core, "_PARALLEL_BYTES", 0 if threads else 1 << 62)
    monkeypatch.setattr(core, "_MAX_WORKERS", 3)
    x = _large_mean(rng, (9, 40, 6))
    x[2] = _wide(rng, (40, 6))
    x[7, :, 1] = _wide(rng, (40,))
    assert core._rows_per_block(x) < x.shape[0]
    g = rng.standard_normal((9, 30, 6)).astype(np.float32)
    mean, std = mmfuse.moments(x, eps=0.0, backend="array_api")
    want_mean, want_std = reference.moments(x, eps=0.0)
    assert_close(mean, want_mean)
    for b in range(9):  # per sample: the ordinary ones are judged on their own (tiny) scale
        assert_close(std[b], want_std[b], err_msg=f"sample {b}")
    y = mmfuse.zoom_shift(x, g, alpha=0.7, backend="array_api")
    want = _oracle_zoom_shift(x, g, alpha=0.7)
    for b in range(9):
        assert_close(y[b], want[b], err_msg=f"sample {b}")


def test_large_numpy_calls_run_during_interpreter_shutdown(tmp_path):
    """Inputs of 8 MiB or more split their blocks across a per-call thread pool, which
    concurrent.futures refuses once the interpreter shuts down: moments / zoom_shift / align
    raised "cannot schedule new futures after interpreter shutdown" from an atexit handler or
    a non-daemon thread still running after the main script.  This thread does the work."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "shutdown.py"
    script.write_text(textwrap.dedent("""
        import atexit, threading, time
        import numpy as np, mmfuse
        rng = np.random.default_rng()
        big = rng.standard_normal((64, 256, 96)) * 3 + 1  # 12.6 MB: the threaded blocks
        guide = rng.standard_normal((64, 100, 96))
        want = [mmfuse.moments(big, backend="array_api")[1],
                mmfuse.align([big, guide], backend="array_api")[0]]
        def check(tag):
            got = [mmfuse.moments(big, backend="array_api")[1],
                   mmfuse.align([big, guide], backend="array_api")[0]]
            print(tag, all(np.array_equal(g, w) for g, w in zip(got, want)), flush=True)
        threading.Thread(target=lambda: (time.sleep(0.5), check("thread"))).start()
        atexit.register(check, "atexit")
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["thread", "True", "atexit", "True"], (res.stdout, res.stderr)


@pytest.mark.parametrize("started", [0, 1])
def test_run_tasks_does_the_work_itself_when_no_thread_can_start(monkeypatch, started):
    """The numba CPU kernels' task runner: Python 3.12 refuses new threads at interpreter
    shutdown (an atexit handler, a non-daemon thread still running after the main one), and
    ``moments`` / ``zoom_shift`` / ``align`` through numba raised "can't create new thread
    at interpreter shutdown" there (a review's find, on 3.12).  With thread starts refused
    (after ``started`` succeeded), every task still runs exactly once and the call returns."""
    import _thread
    import types

    from mmfuse._core import threads

    calls = {"n": 0}

    def start_new_thread(fn, args):
        calls["n"] += 1
        if calls["n"] > started:
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return _thread.start_new_thread(fn, args)

    monkeypatch.setattr(threads, "_thread", types.SimpleNamespace(start_new_thread=start_new_thread))
    seen = np.zeros(37, dtype=np.int64)

    def kernel(out, t0, t1):
        out[t0:t1] += 1

    threads.run_tasks(kernel, 37, 4, seen)
    assert calls["n"] == started + 1
    assert (seen == 1).all()


def test_dask_stays_lazy(rng):
    da = pytest.importorskip("dask.array")
    x = _wide(rng, (4, 16, 3))
    x[1] = _large_mean(rng, (1, 16, 3))[0]
    lazy = da.from_array(x, chunks=(2, 16, 3))
    mean, std = mmfuse.moments(lazy, eps=0.0)
    assert isinstance(std, da.Array)
    want_mean, want_std = reference.moments(x, eps=0.0)
    assert_close(np.asarray(mean.compute()), want_mean)
    for b in range(4):
        assert_close(np.asarray(std[b].compute()), want_std[b])


# --------------------------------------------------------------------------- zoom_shift


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("masked", [False, True])
def test_zoom_shift_large_mean_to_unit_spread(xp, rng, alpha, masked):
    """Zooming 1e4 + 3e-3 noise to unit spread multiplies by 300: a map folded into
    ``x * s + t`` lost |mu| s ulps (several % of the output's spread); about the pivot it
    does not."""
    x = _large_mean(rng, (3, 64, 5), spread=3e-3)
    g = rng.standard_normal((3, 40, 5)).astype(np.float32)
    mask = _mask(rng, 3, 64) if masked else None
    kw = {"alpha": alpha, "eps": 0.0}
    want = _oracle_zoom_shift(x, g, mask=mask, **kw)
    m = None if mask is None else xp.asarray(mask)
    for backend in ("array_api", *(("torch",) if xp.name.startswith("torch") else ())):
        got = mmfuse.zoom_shift(xp.asarray(x, F32), xp.asarray(g, F32), mask=m, backend=backend, **kw)
        assert got.dtype == xp.dtype(F32)
        _assert_within_ulps(got, want, err_msg=backend)
    xp.assert_untouched()


@pytest.mark.parametrize("direction", ["wide-to-unit", "unit-to-wide", "wide-to-wide"])
def test_zoom_shift_wide_float32(xp, rng, direction):
    shape_x, shape_g = (2, 16, 3), (2, 12, 3)
    x = _wide(rng, shape_x) if direction != "unit-to-wide" else rng.standard_normal(shape_x).astype(np.float32)
    g = _wide(rng, shape_g, 1e17) if direction != "wide-to-unit" else rng.standard_normal(shape_g).astype(np.float32)
    want = _oracle_zoom_shift(x, g)
    backends = ("array_api", *(("torch",) if xp.name.startswith("torch") else ()))
    for backend in backends:
        got = mmfuse.zoom_shift(xp.asarray(x, F32), xp.asarray(g, F32), backend=backend)
        assert np.all(np.isfinite(to_numpy(got)))
        assert_close(got, want, dtype=xp.dtype(F32), err_msg=backend)


@pytest.mark.skipif(not HAVE_NUMBA, reason="needs numba")
def test_numba_zoom_shift_large_mean_to_unit_spread(rng):
    """The numba CPU kernel maps about its mean rounded to float32 and folds the rounding
    into the offset (it had lost ulp(mu) * s: 1e-2 of the output here)."""
    x = _large_mean(rng, (3, 64, 5))
    g = rng.standard_normal((3, 40, 5)).astype(np.float32)
    got = mmfuse.zoom_shift(x, g, eps=0.0, backend="numba")
    assert_close(got, _oracle_zoom_shift(x, g, eps=0.0))


@pytest.mark.parametrize("data", ["large-mean", "wide"])
def test_torch_gradients_on_hard_float32_data(rng, data, custom_align_ops):
    """Gradients of the custom op and of the core (autograd) in float32 match float64."""
    torch = pytest.importorskip("torch")
    x = _large_mean(rng, (2, 24, 3)) if data == "large-mean" else _wide(rng, (2, 24, 3))
    g = rng.standard_normal((2, 18, 3)).astype(np.float32)
    up = rng.standard_normal(x.shape)
    mask = _mask(rng, 2, 24)
    for backend in ("torch", "array_api"):
        grads = {}
        for dt in (torch.float32, torch.float64):
            tx = torch.tensor(x, dtype=dt, requires_grad=True)
            tg = torch.tensor(g, dtype=dt, requires_grad=True)
            y = mmfuse.zoom_shift(tx, tg, alpha=0.7, mask=torch.from_numpy(mask), backend=backend)
            (y * torch.tensor(up, dtype=dt)).sum().backward()
            grads[dt] = (tx.grad, tg.grad)
        for a, b in zip(grads[torch.float32], grads[torch.float64]):
            assert torch.isfinite(a).all()
            assert_close(a, b.numpy(), rtol=1e-3, err_msg=backend)


@pytest.mark.parametrize("rounds", [3, None])
def test_torch_align_gradients_of_float32_spreads_apart_use_float64_rounds(rng, rounds, custom_align_ops):
    """float32 modalities of spreads 1e15 and 1e-3, a half step: the rounds' statistics are
    widened to float64 in the op's backward as in its forward (round_statistics), so the
    gradients stay within a few float32 roundings of float64 autograd's.  Without the
    widening the backward's log-spreads lost 1.3e-6 relative at the limit, against 1e-7
    (a mutation review's find)."""
    torch = pytest.importorskip("torch")
    data = [rng.standard_normal((4, 16, 8)) * 1e15, rng.standard_normal((4, 16, 8)) * 1e-3]
    up = [rng.standard_normal(x.shape) for x in data]
    grads = {}
    for dt in (torch.float32, torch.float64):
        leaves = [torch.tensor(x, dtype=dt, requires_grad=True) for x in data]
        ys = mmfuse.align(leaves, rounds=rounds, alpha=0.5, backend="torch")
        loss = sum((y.double() * torch.from_numpy(u)).sum() for y, u in zip(ys, up))
        grads[dt] = torch.autograd.grad(loss, leaves)
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        error = float((a.double() - b).abs().max() / b.abs().max())
        assert error <= 4e-7, error


def test_torch_compiled_backward_large_mean(rng):
    """Under torch.compile the op's backward (the shifted statistics, traced) matches the eager
    backward and float64 on data whose mean dwarfs its spread."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(_large_mean(rng, (2, 16, 3)), requires_grad=True)
    g = torch.tensor(rng.standard_normal((2, 11, 3)).astype(np.float32), requires_grad=True)

    def f(x, g):
        return torch.ops.mmfuse.zoom_shift(x, g, 0.5, -2, None, None, 1e-5)

    up = torch.tensor(rng.standard_normal((2, 16, 3)).astype(np.float32))
    eager = torch.autograd.grad((f(x, g) * up).sum(), (x, g))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad((compiled(x, g) * up).sum(), (x, g))
    x64, g64 = (t.detach().double().requires_grad_() for t in (x, g))
    want = torch.autograd.grad((f(x64, g64) * up.double()).sum(), (x64, g64))
    for a, b, w in zip(got, eager, want):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=1e-5)
        assert_close(a, w.numpy(), rtol=1e-3)


# --------------------------------------------------------------------------- align


@pytest.mark.parametrize("rounds", [2, None])
@pytest.mark.parametrize("backend", _numpy_backends())
def test_align_wide_float32(rng, backend, rounds):
    """A modality with spread 1e18 aligned with an ordinary one: finite and right."""
    xs = [_wide(rng, (2, 16, 3)), rng.standard_normal((2, 12, 3)).astype(np.float32)]
    got = mmfuse.align(xs, rounds=rounds, alpha=0.5, backend=backend)
    want = reference.align(xs, rounds=rounds, alpha=0.5)
    for y, w in zip(got, want):
        assert y.dtype == np.float32 and np.all(np.isfinite(y))
        assert_close(y, w)


@pytest.mark.parametrize("backend", _numpy_backends())
def test_align_rounds_zoom_past_float32_squares(rng, backend):
    """A spread of 1e-3 zoomed to the hub's 1e18: ``s**2`` (1e41) overflows float32 although
    every spread is representable; the rounds track sigma, never ``s**2 var``, so the second
    round is the identity it should be."""
    xs = [_wide(rng, (2, 16, 3)), (1e-3 * rng.standard_normal((2, 12, 3))).astype(np.float32)]
    kw = {"rounds": 2, "alpha": 1.0, "topology": "hub", "hub": 0}
    for y, w in zip(mmfuse.align(xs, backend=backend, **kw), reference.align(xs, **kw)):
        assert_close(y, w)


def test_align_wide_float32_namespaces(xp, rng):
    xs = [_wide(rng, (2, 16, 3)), rng.standard_normal((2, 12, 3)).astype(np.float32)]
    got = mmfuse.align([xp.asarray(x, F32) for x in xs], rounds=3, alpha=0.5, backend="array_api")
    for y, w in zip(got, reference.align(xs, rounds=3, alpha=0.5)):
        assert_close(y, w, dtype=xp.dtype(F32))


def test_align_large_mean_spread_of_the_output(xp, rng):
    """1e4 + 1e-2 noise aligned with unit noise (the outputs share a mean near 5e3 and a
    spread near 0.2): errors within a few float32 ulps of the outputs themselves.  A map
    folded into ``S x + T`` lost ``|S x|`` ulps (about 40 of them here)."""
    xs = [_large_mean(rng, (2, 64, 3)), rng.standard_normal((2, 48, 3)).astype(np.float32)]
    for rounds in (None, 3):
        got = mmfuse.align([xp.asarray(x, F32) for x in xs], rounds=rounds, alpha=0.5, backend="array_api")
        for y, w in zip(got, reference.align(xs, rounds=rounds, alpha=0.5)):
            _assert_within_ulps(y, w, err_msg=f"rounds={rounds}")


_CANCELLING = [  # (means, options): targets near 0 made of means of about 1e4
    ((1e4, -1e4), {"rounds": 1, "alpha": 0.5}),
    ((1e4, -1e4), {"rounds": 3, "alpha": 0.7}),
    ((2e4, -1e4, -1.5e4), {"rounds": None, "alpha": 0.5}),
    ((1e4, -1e4, 0.0), {"rounds": 2, "alpha": 1.0, "schedule": "jacobi"}),
]


def _cancelling(rng, means):
    return [(m + rng.standard_normal((3, 9, 4))).astype(np.float32) for m in means]


@pytest.mark.parametrize(("means", "options"), _CANCELLING)
@pytest.mark.parametrize("backend", ["array_api", "torch", *(["numba"] if HAVE_NUMBA else [])])
def test_align_targets_where_the_means_cancel(rng, backend, means, options):
    """float32 modalities of means near 1e4 and -1e4 (unit spreads) whose targets are near 0:
    the outputs within a few of their own ulps of the float64 oracle.  The rounds took each
    mean rounded to float32 (half an ulp of 1e4, 5e-4), which the target near 0 kept: 1.5e-4
    of the outputs' size at rounds=1, alpha=0.5, 3e6 of their ulps (they now run on float64
    statistics, the mean as pivot + correction)."""
    xs = _cancelling(rng, means)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        got = [y.numpy() for y in mmfuse.align([torch.from_numpy(x) for x in xs], backend="torch", **options)]
    else:
        got = mmfuse.align(xs, backend=backend, **options)
    for m, (y, w) in enumerate(zip(got, reference.align(xs, **options))):
        assert y.dtype == np.float32
        _assert_within_ulps(y, w, ulps=4, err_msg=f"modality {m}")


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("backend", ["array_api", "torch", *(["numba"] if HAVE_NUMBA else [])])
def test_zoom_shift_partial_step_where_the_means_cancel(rng, backend, alpha):
    """A partial step of a mean-1e4 modality toward a mean-(-1e4) guide (target near 0 at
    alpha 0.5): within a few ulps of the outputs.  Both means rounded to float32 first cost
    1.3e-4 of the outputs' size."""
    x, g = _cancelling(rng, (1e4, -1e4))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        y = mmfuse.zoom_shift(torch.from_numpy(x), torch.from_numpy(g), alpha=alpha, backend="torch").numpy()
    else:
        y = mmfuse.zoom_shift(x, g, alpha=alpha, backend=backend)
    assert y.dtype == np.float32
    _assert_within_ulps(y, _oracle_zoom_shift(x, g, alpha=alpha), ulps=4)


@pytest.mark.parametrize("backend", ["array_api", "torch", *(["numba"] if HAVE_NUMBA else [])])
def test_zoom_shift_partial_step_where_float64_means_cancel(rng, backend):
    """float64 means of +-1.4e13 over 4096 tokens (unit spreads), a half step: the target is
    (mu_x + mu_g) / 2, near 0, so each mean's correction to its first estimate (the float64
    sum's rounding, about 0.1 here) must reach it.  The numba kernels' target without the
    correction passed every float32 test and was 0.37 off outputs of size 5 here (a mutation
    review's find)."""
    x = 1e14 / 7 + rng.standard_normal((2, 4096, 8))
    g = -1e14 / 7 + rng.standard_normal((2, 4096, 8))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        y = mmfuse.zoom_shift(torch.from_numpy(x), torch.from_numpy(g), alpha=0.5, backend="torch").numpy()
    else:
        y = mmfuse.zoom_shift(x, g, alpha=0.5, backend=backend)
    assert_close(y, reference.zoom_shift(x, g, alpha=0.5), rtol=1e-9)


@pytest.mark.parametrize("fuse", ["sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_fusion_sums_of_pooled_means_that_cancel(rng, masked, fuse):
    """rounds = 0: float32 pooled means near 1e4 and -1e4 summed to near 0, within a few ulps
    of the float64 oracle (pooled and fused in float64, rounded once; rounded to float32
    first, each pooled mean left half an ulp of 1e4 in the sum: 1.8e6 of its ulps).  NumPy
    (torch keeps float32 pooled means: its float64 sum copies the input, a documented limit)."""
    xs = _cancelling(rng, (1e4, -1e4))
    options = {"rounds": 0, "fuse": fuse, "pool": "mean"}
    if masked:
        options["masks"] = [_mask(rng, 3, 9), _mask(rng, 3, 9)]
    got = mmfuse.zoom_shift_fusion(xs, **options)
    want = reference.zoom_shift_fusion(xs, **options)
    assert got.dtype == np.float32
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 4 * ulp), np.max(np.abs(got - want) / ulp)


def test_guided_zoom_shift_moves_a_large_mean_near_zero(rng):
    """A learned shift that takes a modality of mean -1e4 near 0: the mean and the shift are
    added in float64 and rounded once (the float32 mean added first left a share of half an
    ulp of 1e4 in outputs near 1: 6.6e-4, 2e-4 of their spread)."""
    torch = pytest.importorskip("torch")
    from mmfuse.nn import GuidedZoomShift

    xs = [torch.from_numpy(x) for x in _cancelling(rng, (1e4, -1e4))]
    layer = GuidedZoomShift(4, 2, fuse=None, pool="mean")
    with torch.no_grad():
        layer.bias[0, :4] = 0.3  # the log-zoom head of modality 1 (a zoom of 1 hid the error)
        layer.bias[0, 4:] = 1e4  # its shift head
    wide = GuidedZoomShift(4, 2, fuse=None, pool="mean", dtype=torch.float64)
    wide.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        got = layer.modulate(xs)[1][1].double().numpy()
        want = wide.modulate([x.double() for x in xs])[1][1].numpy()
    _assert_within_ulps(got, want, ulps=4)


@pytest.mark.parametrize("backend", ["array_api", "torch"])
def test_align_means_that_cancel_in_blocks_on_a_long_masked_axis(rng, backend):
    """As above on inputs of several NumPy blocks (1.2 MB each), a token axis over
    F32_TOKENS (float64 sums) and token masks."""
    xs = [(m + rng.standard_normal((48, 100, 64))).astype(np.float32) for m in (1e4, -1e4)]
    masks = [_mask(rng, 48, 100) for _ in xs]
    options = {"rounds": 1, "alpha": 0.5, "masks": masks}
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tensors = {"masks": [torch.from_numpy(k) for k in masks]}
        ys = mmfuse.align([torch.from_numpy(x) for x in xs], backend="torch", **{**options, **tensors})
        got = [y.numpy() for y in ys]
    else:
        got = mmfuse.align(xs, backend=backend, **options)
    for m, (y, w) in enumerate(zip(got, reference.align(xs, **options))):
        _assert_within_ulps(y, w, ulps=4, err_msg=f"modality {m}")


def test_align_targets_where_the_means_cancel_namespaces(xp, rng):
    """As above, on every namespace through the Array-API core (float32 statistics widened
    where the device has float64; without it the means stay float32, a documented limit)."""
    from mmfuse._namespace import device_of, has_float64

    xs = _cancelling(rng, (1e4, -1e4))
    arrays = [xp.asarray(x, F32) for x in xs]
    if not has_float64(xp.xp, device_of(arrays[0])):
        pytest.skip("no float64 on this namespace's device")
    got = mmfuse.align(arrays, rounds=1, alpha=0.5, backend="array_api")
    for y, w in zip(got, reference.align(xs, rounds=1, alpha=0.5)):
        _assert_within_ulps(y, w, ulps=4)


def _align_60_digits(xs, masks, rounds, alpha, eps):
    """Gauss-Seidel consensus rounds of two modalities, each re-measuring the other's mapped
    tokens, in 60-digit arithmetic (mpmath): the maths of ``align`` without float64 rounding."""
    mp = pytest.importorskip("mpmath")
    ctx = mp.mp.clone()
    ctx.dps = 60

    def stats(y, mask):
        out = {}
        for b, c in np.ndindex(y.shape[0], y.shape[2]):
            v = [y[b, t, c] for t in range(y.shape[1]) if mask[b, t]]
            mu = ctx.fsum(v) / len(v)
            var = ctx.fsum((t - mu) ** 2 for t in v) / len(v)
            out[b, c] = (mu, ctx.sqrt(var + eps), var)
        return out

    ys = [np.vectorize(ctx.mpf, otypes=[object])(x) for x in xs]
    for _ in range(rounds):
        for i in (0, 1):
            target, own = stats(ys[1 - i], masks[1 - i]), stats(ys[i], masks[i])
            y = ys[i].copy()
            for (b, c), (mu, sd, var) in own.items():
                # a lane with no spread is not zoomed in the rounds, at any eps (the limit's
                # rule; the zoom of sqrt(eps) toward a wider target compounds without end)
                s = (target[b, c][1] / sd) ** alpha if var > 0 else 1
                y[b, :, c] = mu + (ys[i][b, :, c] - mu) * s + alpha * (target[b, c][0] - mu)
            ys[i] = y
    return [y.astype(np.float64) for y in ys]


@pytest.mark.parametrize("backend", ["array_api", "torch", "reference", *(["numba"] if HAVE_NUMBA else [])])
@pytest.mark.parametrize(("dtype", "rounds"), [("float32", 25), ("float64", 200)])
def test_hub_rounds_leave_a_lane_with_no_spread_unzoomed(backend, dtype, rounds, rng, request):
    """Hub topology, eps > 0: a channel with no spread (a constant, or one unmasked token) was
    zoomed by (sigma_hub / sqrt(eps)) ** alpha every round; the composed scale cancelled the
    map's offset (float64, 40 rounds: 0 where the hub's mean was due) and overflowed (NaN
    values and gradients from 20 rounds in float32).  It is now left unzoomed, as in the limit
    (rounds=None) and at eps = 0: its tokens take the hub's mean, its padding moves with them."""
    hub = (rng.standard_normal((2, 6, 3)) + 5.0).astype(dtype)
    other = rng.standard_normal((2, 5, 3)).astype(dtype)
    other[:, :, 0] = 3.7  # no spread; its float mean misses 3.7 by a few ulps
    mask = np.ones((2, 5), dtype=bool)
    mask[1, 1:] = False  # one token: no spread in every channel of sample 1
    opts = {"topology": "hub", "hub": 0, "alpha": 0.8, "masks": [np.ones((2, 6), dtype=bool), mask]}
    limit = mmfuse.align([hub, other], rounds=None, backend="reference", **opts)[1]
    if backend == "torch":
        torch = pytest.importorskip("torch")
        request.getfixturevalue("custom_align_ops")  # the custom op (small calls: the core)
        leaf = torch.from_numpy(other).requires_grad_()
        got = mmfuse.align([torch.from_numpy(hub), leaf], rounds=rounds, backend="torch",
                           **{**opts, "masks": [torch.from_numpy(m) for m in opts["masks"]]})[1]  # fmt: skip
        got.sum().backward()
        assert torch.isfinite(leaf.grad).all()
        got = got.detach().numpy()
    else:
        got = mmfuse.align([hub, other], rounds=rounds, backend=backend, **opts)[1]
    # the lanes with no spread: every token (padding too) where the limit puts them
    tol = {"rtol": 1e-5 if dtype == "float32" else 1e-12, "atol": 0.0}
    assert_close(got[0, :, 0], limit[0, :, 0], **tol)
    assert_close(got[1], limit[1], **tol)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("backend", [None, "array_api", "torch", *(["numba"] if HAVE_NUMBA else [])])
def test_align_rounds_against_60_digits(rng, backend):
    """Rounds that shrink a spread of 1e15 toward a guide whose sample has one unmasked token
    (spread 0, sigma = sqrt(eps): not zoomed, its masked tokens moved with it): the outputs within
    1e-13 of a 60-digit computation.  The rounds map the statistics exactly (a round is affine
    per channel), so nothing is lost to re-measuring tokens that sit ~1e5 spreads from their
    mean; the float64 reference, which re-measures its materialized arrays as the equations
    read, is off by ~3e-9 on such data (found by fuzzing)."""
    if backend == "torch":
        pytest.importorskip("torch")
    xs = [1e15 * rng.standard_normal((2, 3, 2)), 1e15 * rng.standard_normal((2, 4, 2))]
    xs[0][:, :, 0] = 0.1  # no spread
    masks = [np.ones((2, 3), dtype=bool), np.ones((2, 4), dtype=bool)]
    masks[1][0, 1:] = False  # one token in the guide's first sample
    want = _align_60_digits(xs, masks, rounds=2, alpha=0.3, eps=1e-5)
    if backend == "torch":
        import torch

        got = mmfuse.align([torch.from_numpy(x) for x in xs], rounds=2, alpha=0.3, eps=1e-5,
                           masks=[torch.from_numpy(m) for m in masks], backend="torch")  # fmt: skip
        got = [g.numpy() for g in got]
    else:
        got = mmfuse.align(xs, rounds=2, alpha=0.3, eps=1e-5, masks=masks, backend=backend)
    for y, w in zip(got, want):
        assert np.max(np.abs(y - w)) <= 1e-13 * np.max(np.abs(w))


# --------------------------------------------------------------------------- NaN padding


@pytest.mark.parametrize("fuse", ["concat", "sum", "mean", None])
@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("backend", [None, "array_api"])
def test_fusion_nan_padding_keeps_gradients_finite(rng, fuse, pool, backend):
    """Masked tokens are neither pooled nor returned by zoom_shift_fusion: NaN / inf padding
    gives the values and the gradients of zero padding (it made every gradient NaN)."""
    torch = pytest.importorskip("torch")
    a0 = rng.standard_normal((2, 6, 3))
    b0 = rng.standard_normal((2, 5, 3))
    ma = np.ones((2, 6), dtype=bool)
    ma[:, 4:] = False
    ma[1, 3] = False
    results = []
    for pad in (0.0, np.nan, np.inf):
        a = torch.tensor(np.where(ma[:, :, None], a0, pad), requires_grad=True)
        b = torch.tensor(b0, requires_grad=True)
        y = mmfuse.zoom_shift_fusion(
            [a, b], fuse=fuse, pool=pool, masks=[torch.from_numpy(ma), None], alpha=0.6, backend=backend
        )
        total = sum(t.sum() for t in y) if fuse is None else y.sum()
        total.backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert (a.grad[torch.from_numpy(~ma)] == 0).all()
        results.append((y, a.grad, b.grad))
    for y, ga, gb in results[1:]:
        for got, want in zip(y if fuse is None else [y], results[0][0] if fuse is None else [results[0][0]]):
            assert torch.equal(got, want)
        assert torch.equal(ga, results[0][1]) and torch.equal(gb, results[0][2])


def test_fusion_nan_padding_numpy_values_unchanged(rng):
    xs = [rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 5, 3))]
    ma = np.ones((2, 6), dtype=bool)
    ma[:, 4:] = False
    clean = mmfuse.zoom_shift_fusion(xs, masks=[ma, None])
    dirty = mmfuse.zoom_shift_fusion([np.where(ma[:, :, None], xs[0], np.nan), xs[1]], masks=[ma, None])
    np.testing.assert_array_equal(clean, dirty)


def test_zoom_shift_and_align_transform_masked_tokens(rng):
    """The documented contract (unchanged): zoom_shift and align map every token, masked ones
    included, so NaN padding gives NaN outputs there (finite elsewhere) and finite padding is
    what keeps gradients finite."""
    torch = pytest.importorskip("torch")
    a0 = rng.standard_normal((2, 6, 3))
    g0 = rng.standard_normal((2, 5, 3))
    ma = np.ones((2, 6), dtype=bool)
    ma[:, 4:] = False
    mask = torch.from_numpy(ma)
    for pad in (np.nan, 0.0):
        a = torch.tensor(np.where(ma[:, :, None], a0, pad), requires_grad=True)
        g = torch.tensor(g0, requires_grad=True)
        y = mmfuse.zoom_shift(a, g, mask=mask)
        ya, _ = mmfuse.align([a, g], masks=[mask, None], backend="array_api")
        for out in (y, ya):
            assert torch.isfinite(out[mask]).all()
            assert bool(torch.isnan(out[~mask]).all()) == bool(np.isnan(pad))
        (y[mask].sum() + ya[mask].sum()).backward()
        assert bool(torch.isfinite(g.grad).all()) == (pad == 0.0)


# --------------------------------------------------------------------------- scalar operands


@pytest.mark.parametrize(
    "make", [np.float64, np.float32, np.int64, float, int], ids=["np.float64", "np.float32", "np.int64", "float", "int"]
)
def test_zoom_and_shift_scalars_keep_x_dtype(xp, rng, make):
    for dtype in ("float32", "float16"):
        if dtype == "float16" and xp.name == "array_api_strict":
            continue  # array_api_strict has no float16
        x = xp.asarray(rng.standard_normal((2, 4, 3)), dtype)
        z = mmfuse.zoom(x, make(2), center=make(1))
        s = mmfuse.shift(x, make(3))
        assert z.dtype == x.dtype and s.dtype == x.dtype
        xn = to_numpy(x).astype(np.float64)
        assert_close(z, 1.0 + (xn - 1.0) * 2.0, dtype=x.dtype)
        assert_close(s, xn + 3.0, dtype=x.dtype)


def test_zoom_and_shift_of_float16_are_computed_in_float32(xp):
    """float16 x is zoomed and shifted in float32 and rounded once, as every operator: in
    float16 NumPy's, JAX's and Dask's weak scalars were rounded to it first (scale 1e5 gave
    inf and NaN where the result is finite, torch's opmath gave it), and 2.8 came out an ulp
    low (a review's find)."""
    if xp.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16")
    x16 = np.array([[[1.0], [1.001], [1.002]]], dtype=np.float16)
    x = xp.asarray(x16, "float16")
    exact = (1.0 + (x16.astype(np.float64) - 1.0) * 1e5).astype(np.float16)
    np.testing.assert_array_equal(to_numpy(mmfuse.zoom(x, 1e5, center=1.0)), exact)
    one = xp.asarray(np.ones((1, 1, 1)), "float16")
    z = to_numpy(mmfuse.zoom(one, 3.0, center=0.1))
    assert z.item() == float(np.float16(2.8))  # (0.9 * 3 + 0.1, rounded once)
    # 1 + 2**-11 + 2**-23 rounds up to 1 + 2**-10; the offset rounded to float16 first is
    # 2**-11, and 1 + 2**-11, a tie, rounds to 1
    s = to_numpy(mmfuse.shift(one, 2.0**-11 + 2.0**-23))
    assert s.item() == 1.0 + 2.0**-10


@pytest.mark.parametrize("namespace", ["jax", "jax.jit", "dask"])
def test_zoom_and_shift_of_float16_in_jax_and_dask_are_computed_in_float32(namespace):
    """As above, on JAX (eager, and under jit, where Python floats are weakly typed arrays,
    which had still been rounded to float16 first) and Dask."""
    x16 = np.array([[[1.0], [1.001], [1.002]]], dtype=np.float16)
    exact = (1.0 + (x16.astype(np.float64) - 1.0) * 1e5).astype(np.float16)
    one16 = np.ones((1, 1, 1), np.float16)
    zoom, shift = mmfuse.zoom, mmfuse.shift
    if namespace == "dask":
        da = pytest.importorskip("dask.array")
        x, one = da.from_array(x16), da.from_array(one16)
    else:
        jax = pytest.importorskip("jax")
        x, one = jax.numpy.asarray(x16), jax.numpy.asarray(one16)
        if namespace == "jax.jit":
            zoom = jax.jit(lambda x, s, center: mmfuse.zoom(x, s, center=center))
            shift = jax.jit(mmfuse.shift)
    np.testing.assert_array_equal(np.asarray(zoom(x, 1e5, center=1.0)), exact)
    assert np.asarray(zoom(one, 3.0, center=0.1)).item() == float(np.float16(2.8))
    shifted = np.asarray(shift(one, 2.0**-11 + 2.0**-23))
    assert shifted.dtype == np.float16 and shifted.item() == 1.0 + 2.0**-10


def test_zoom_and_shift_refuse_other_arrays_and_booleans():
    x = np.ones((2, 3, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="dtype float64 but x has dtype float32"):
        mmfuse.zoom(x, np.asarray(2.0), center=0.0)  # a 0-d array is an array: dtypes must match
    with pytest.raises(TypeError, match="dtype float64 but x has dtype float32"):
        mmfuse.shift(x, np.asarray(1.0))
    with pytest.raises(TypeError):
        mmfuse.shift(x, True)
    with pytest.raises(TypeError):
        mmfuse.zoom(x, np.bool_(True), center=0.0)
    assert mmfuse.shift(x, np.asarray(1.0, dtype=np.float32)).dtype == np.float32


def test_zoom_and_shift_name_an_int_beyond_float64_briefly():
    """An int past float64's range is refused by name, with its size rather than its digits
    (10**400 used to fill the message with 401 digits; past 4300 digits Python refuses to
    write them at all)."""
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"^scale is too large for a floating-point number: an int of 1329 bits$"):
        mmfuse.zoom(x, 10**400, center=0.0)
    with pytest.raises(ValueError, match=r"^center is too large for a floating-point number: an int of 16610 bits$"):
        mmfuse.zoom(x, 2.0, center=10**5000)
    g = np.random.default_rng().standard_normal((2, 3, 4))
    for name in ("alpha", "eps"):  # they were an OverflowError naming no argument
        with pytest.raises(ValueError, match=rf"^{name} is too large for a floating-point number: an int of 1329 bits$"):
            mmfuse.zoom_shift(g, g + 1.0, **{name: 10**400})
    with pytest.raises(ValueError, match=r"^offset is too large for a floating-point number: an int of 1027 bits$"):
        mmfuse.shift(x, -(10**309))


# ----------------------------------------------------------------- gradients at zero spread


def _zero_spread_problem(rng):
    """x and a guide (float64) where, at eps = 0, one sample of each has a lane with no spread:
    a single unmasked token (x: sample 0; guide: sample 1).  The operators are smooth there
    (the spread stays 0 under any small change), so their gradients are finite."""
    x = rng.standard_normal((2, 4, 3))
    g = 2.0 + rng.standard_normal((2, 5, 3))
    mx = np.ones((2, 4), dtype=bool)
    mx[0, 1:] = False
    mg = np.ones((2, 5), dtype=bool)
    mg[1, :4] = False
    return x, g, mx, mg


_ZERO_SPREAD_CALLS = {
    "moments": lambda x, g, mx, mg, b: list(mmfuse.moments(x, mask=mx, eps=0.0, backend=b)),
    "zoom_shift": lambda x, g, mx, mg, b: [mmfuse.zoom_shift(x, g, mask=mx, guide_mask=mg, eps=0.0, backend=b)],
    "zoom_shift alpha 0.5": lambda x, g, mx, mg, b: [
        mmfuse.zoom_shift(x, g, alpha=0.5, mask=mx, guide_mask=mg, eps=0.0, backend=b)
    ],
    "align rounds 1": lambda x, g, mx, mg, b: mmfuse.align([x, g], masks=[mx, mg], eps=0.0, backend=b),
    "align rounds 3 alpha 0.5": lambda x, g, mx, mg, b: mmfuse.align(
        [x, g], rounds=3, alpha=0.5, masks=[mx, mg], eps=0.0, backend=b
    ),
    "align limit alpha 0.5": lambda x, g, mx, mg, b: mmfuse.align(
        [x, g], rounds=None, alpha=0.5, masks=[mx, mg], eps=0.0, backend=b
    ),
    # three modalities: the targets' spreads are geometric means, (sigma_1 sigma_2) ** (1/2)
    "align M=3 rounds 2 alpha 0.5": lambda x, g, mx, mg, b: mmfuse.align(
        [x, g, 0.5 * x + 1.0], rounds=2, alpha=0.5, masks=[mx, mg, None], eps=0.0, backend=b
    ),
}


def _finite_differences(loss, arrays, h=1e-6):
    grads = []
    for k, a in enumerate(arrays):
        grad = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            up, down = [b.copy() for b in arrays], [b.copy() for b in arrays]
            up[k][i] += h
            down[k][i] -= h
            grad[i] = (loss(*up) - loss(*down)) / (2 * h)
        grads.append(grad)
    return grads


def zero_spread_reference(rng, case):
    """The zero-spread problem, the case's call, random weights of a loss sum(w * output), and
    the loss's gradients by central differences of the reference (the routes' oracle)."""
    x, g, mx, mg = _zero_spread_problem(rng)
    call = _ZERO_SPREAD_CALLS[case]
    weights = [rng.standard_normal(np.shape(o)) for o in call(x, g, mx, mg, "reference")]

    def loss_reference(x, g):
        return sum(float(np.sum(w * o)) for w, o in zip(weights, call(x, g, mx, mg, "reference")))

    return (x, g, mx, mg), call, weights, _finite_differences(loss_reference, [x, g])


@pytest.mark.parametrize("backend", [None, "torch", "array_api", "torch.func"])
@pytest.mark.parametrize("case", list(_ZERO_SPREAD_CALLS))
def test_gradients_where_a_lane_has_no_spread(rng, case, backend, request):
    """At eps = 0 a lane with a single unmasked token has sigma = 0, where sqrt and
    (sigma_g / sigma_x) ** alpha have infinite derivatives; the spread's own derivative there
    is 0, so the gradients are finite: those of finite differences of the reference (autograd
    through the core gave NaN; the custom ops' closed forms drop those terms)."""
    torch = pytest.importorskip("torch")
    if backend == "torch":  # the custom ops (small calls that autograd records: the core)
        request.getfixturevalue("custom_align_ops")
    (x, g, mx, mg), call, weights, want = zero_spread_reference(rng, case)
    tmx, tmg = torch.from_numpy(mx), torch.from_numpy(mg)

    def loss(tx, tg, b):
        return sum((torch.from_numpy(w) * o).sum() for w, o in zip(weights, call(tx, tg, tmx, tmg, b)))

    if backend == "torch.func":  # the transform makes the torch backend run the core
        got = torch.func.grad(lambda tx, tg: loss(tx, tg, "torch"), argnums=(0, 1))(
            torch.from_numpy(x), torch.from_numpy(g)
        )
    else:
        tx, tg = torch.tensor(x, requires_grad=True), torch.tensor(g, requires_grad=True)
        got = torch.autograd.grad(loss(tx, tg, backend), [tx, tg], allow_unused=True)
    for name, a, b in zip(("x", "guide"), got, want):
        a = np.zeros_like(b) if a is None else a.detach().numpy()
        assert np.all(np.isfinite(a)), f"{case}: d/d{name} not finite"
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{case}: d/d{name}")


@pytest.mark.parametrize("backend", [None, "array_api", "reference", "torch", "numba"])
@pytest.mark.parametrize(
    "kwargs",
    [{"rounds": 1}, {"rounds": 3, "alpha": 0.5}, {"rounds": 2, "schedule": "jacobi", "alpha": 0.5}, {"rounds": 2}],
)
def test_align_propagates_a_nan_in_an_unmasked_token(rng, backend, kwargs):
    """A NaN among a lane's unmasked tokens makes that lane's statistics NaN, and the rounds
    carry it to the modalities that take it as a target, as the reference does: "no spread"
    was tested as ``not sigma > 0``, which took the NaN spread for zero and returned finite
    values computed without it (Gauss-Seidel consensus at alpha = 1)."""
    if backend == "numba":
        pytest.importorskip("numba")
    a, b = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3))
    a[0, 1, 2] = np.nan
    xs = [a, b]
    if backend == "torch":
        torch = pytest.importorskip("torch")
        xs = [torch.tensor(a), torch.tensor(b)]
    ys = [np.asarray(y) for y in mmfuse.align(xs, eps=1e-5, backend=backend, **kwargs)]
    want = mmfuse.align([a, b], eps=1e-5, backend="reference", **kwargs)
    for y, w in zip(ys, want):
        assert np.array_equal(np.isnan(y), np.isnan(w))
        assert np.isnan(y[0, :, 2]).all() and np.isfinite(y[1]).all() and np.isfinite(y[0, :, :2]).all()
    ok = ~np.isnan(want[1])
    np.testing.assert_allclose(ys[1][ok], want[1][ok], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tokens", [6, 16, 40])
@pytest.mark.parametrize("backend", [None, "array_api", "torch", "numba"])
def test_the_reference_takes_a_nan_spread_as_every_implementation_does(rng, backend, tokens):
    """A float64 spread past about 1.3e154 overflows the variance (a documented limit) while
    the mean stays finite: a lane's spread is then infinite or NaN, depending on its rounding.
    The reference tested "no spread" as ``not sigma > 0``, so it shifted a NaN lane without
    zooming it (finite values near 1e200) where every implementation returns NaN by the
    documented rule (only a spread of exactly 0 is none).  Now they agree lane by lane, also
    over 16 and 40 tokens (where numba's kernels had summed in four partial sums for a
    while, and disagreed: a review's find)."""
    if backend == "numba":
        pytest.importorskip("numba")
    x, g = 1e200 * rng.standard_normal((4, tokens, 8)), rng.standard_normal((4, 5, 8))
    x[-1] *= 1e-200  # a last sample of ordinary size: finite everywhere
    args = (x, g)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        args = (torch.tensor(x), torch.tensor(g))
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference.zoom_shift(x, g)
        got = to_numpy(mmfuse.zoom_shift(*args, backend=backend))
    assert np.isnan(want[:-1]).any() and np.isfinite(want[-1]).all()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=1e-12)


def test_the_reference_keeps_a_large_mean_out_of_the_output(rng):
    """x about 1e8 with unit spread: the reference's outputs are unit-sized and right to the
    last bits (its means were one float64 each, good only to an ulp of 1e8: 6e-9 errors), as
    the core's are: the oracle must be exact where the implementations are."""
    x = 1e8 + rng.standard_normal((2, 16, 3))
    g = rng.standard_normal((2, 16, 3))
    calls = [
        lambda b: [mmfuse.zoom_shift(x, g, backend=b)],
        lambda b: [mmfuse.zoom_shift(x, g, alpha=0.6, backend=b)],
        lambda b: mmfuse.align([x, g], rounds=1, topology="hub", hub=1, backend=b),
        lambda b: mmfuse.align([x, g], rounds=None, topology="hub", hub=1, alpha=0.5, eps=0.0, backend=b),
    ]
    for call in calls:
        for got, want in zip(call("reference"), call("array_api")):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-14 * np.abs(want).max())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("namespace", ["numpy", "array_api_strict", "dask"])
def test_float32_statistics_of_a_long_token_axis(namespace, masked):
    """float32 sums over tokens accumulate in float64 where the namespace's sums run one row
    after another (NumPy's blocked path, and NumPy's sums under array_api_strict and in Dask's
    chunks), as the compiled kernels do.  In float32 the pivot of 65536 tokens of
    1e4 + 0.01 N(0, 1) was many spreads off and the spread came out 0 or 1.0 relative off, a
    constant lane of 4096 tokens got a spread of 6e-7 where it has none, and the mean pooling
    of zoom_shift_fusion summed in float32 too."""
    rng = np.random.default_rng()
    x = (1e4 + 1e-2 * rng.standard_normal((2, 65536, 3))).astype(np.float32)
    mask = rng.random((2, 65536)) < 0.8 if masked else None
    constant = np.full((1, 4096, 2), 3.7, np.float32)
    if namespace == "numpy":
        conv = np.asarray
    elif namespace == "array_api_strict":
        conv = pytest.importorskip("array_api_strict").asarray
    else:
        conv = pytest.importorskip("dask.array").asarray
    mean, std = mmfuse.moments(conv(x), eps=0.0, mask=None if mask is None else conv(mask), backend="array_api")
    want_mean, want_std = reference.moments(x, mask=mask, eps=0.0)
    assert_close(mean, want_mean, rtol=2e-7, atol=0, dtype="float32")
    assert_close(std, want_std, rtol=1e-6, atol=0, dtype="float32")
    assert np.all(to_numpy(mmfuse.moments(conv(constant), eps=0.0, backend="array_api")[1]) == 0)
    # constant lanes up to float32's maximum: mean exact, spread 0 (their sum fits float64;
    # from 1e26 on, the float32 pivot's ulp, squared and summed, overflowed into NaN spreads)
    huge = np.array([1e26, 1e30, 3e38], np.float32).reshape(1, 1, 3) * np.ones((2, 1000, 1), np.float32)
    big_mean, big_std = mmfuse.moments(conv(huge), eps=0.0, backend="array_api")
    np.testing.assert_array_equal(to_numpy(big_mean), huge[:, :1])
    np.testing.assert_array_equal(to_numpy(big_std), np.zeros((2, 1, 3)))
    # the pooled means of zoom_shift_fusion (no rounds: the inputs' own token means)
    masks = None if mask is None else [conv(mask), conv(mask)]
    pooled = mmfuse.zoom_shift_fusion(
        [conv(x), conv(x)], rounds=0, masks=masks, fuse=None, pool="mean", backend="array_api"
    )
    assert_close(pooled[0], want_mean[:, 0], rtol=2e-7, atol=0, dtype="float32")


def test_torch_cpu_float32_zoom_shift_of_a_long_token_axis():
    """torch CPU float32 tensors computed through the NumPy statistics (the torch backend's
    host path) get the guide's spread: it was 0.13 where it is 1 for 262144 tokens of
    1e5 + N(0, 1) before the float64 accumulation (here 65536 of 1e4 + 0.01 N(0, 1))."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    x = torch.from_numpy((1e4 + 1e-2 * rng.standard_normal((2, 65536, 3))).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((2, 65536, 3)).astype(np.float32))
    y = mmfuse.zoom_shift(x, g, eps=0.0, backend="torch")
    want = _oracle_zoom_shift(x.numpy(), g.numpy(), eps=0.0)
    assert_close(y, want, rtol=1e-5)


def _rounds_60_digits(xs, rounds, alpha, schedule, topology, hub):
    """Two modalities, ``rounds`` rounds of Zoom-and-Shift on their tokens (eps = 0), in
    60-digit arithmetic: each lane of (B, T, C) inputs as lists of mpf."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 60
    out = [np.empty_like(x) for x in xs]
    for b, c in np.ndindex(xs[0].shape[0], xs[0].shape[2]):
        ys = [[mp.mpf(float(t)) for t in x[b, :, c]] for x in xs]

        def stats(v):
            mu = mp.fsum(v) / len(v)
            return mu, mp.sqrt(mp.fsum((t - mu) ** 2 for t in v) / len(v))

        def step(v, target):
            (mu, s), (mu_t, s_t) = stats(v), target
            return [(t - mu) * (s_t / s) ** mp.mpf(alpha) + mu + mp.mpf(alpha) * (mu_t - mu) for t in v]

        for _ in range(rounds):
            old = list(ys)
            for i in range(2):
                if topology == "hub" and i == hub:
                    continue
                ys[i] = step(ys[i], stats((old if schedule == "jacobi" else ys)[1 - i]))
        for i in range(2):
            out[i][b, :, c] = [float(t) for t in ys[i]]
    return out


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("small spread to a distant hub", {"rounds": 3, "alpha": 0.5, "topology": "hub", "hub": 1}),
        ("unit data swapped through 1e8", {"rounds": 2, "schedule": "jacobi"}),
    ],
)
def test_reference_rounds_keep_their_deviations_exact(rng, case, options):
    """The reference's rounds rounded each round's output to float64 and measured it again:
    a spread of 1e-12 zoomed toward a hub of mean 5 over three rounds at alpha = 1/2 lost
    6700 ulps, and unit data swapped (Jacobi, alpha = 1) through a mean of 1e8 and back lost
    2e7; the core, whose rounds run on the statistics, was within an ulp.  The reference now
    holds each modality as a per-lane level plus its deviations (an exact-arithmetic review
    of the oracle)."""
    if case.startswith("small"):
        xs = [1e-12 * rng.standard_normal((2, 6, 2)), 5.0 + rng.standard_normal((2, 6, 2))]
    else:
        xs = [1e8 + rng.standard_normal((2, 6, 2)), rng.standard_normal((2, 7, 2))]
    want = _rounds_60_digits(xs, options["rounds"], options.get("alpha", 1.0), options.get("schedule", "gauss-seidel"),
                             options.get("topology", "consensus"), options.get("hub", 0))  # fmt: skip
    for name, got in (("reference", reference.align(xs, eps=0.0, **options)), ("core", mmfuse.align(xs, eps=0.0, **options))):
        for y, w in zip(got, want):
            scale = np.abs(w).max(axis=1, keepdims=True)
            assert np.all(np.abs(y - w) <= 8 * np.spacing(scale)), name


@pytest.mark.parametrize("tokens", [3, 50, 64])
@pytest.mark.parametrize(
    ("value", "dtype"), [(1e8, np.float32), (100000008.0, np.float32), (3e16 / 7, np.float64)]
)
def test_constant_lanes_of_a_large_value_land_on_the_guide_mean(tokens, value, dtype):
    """float32 lanes holding one large value, whose float32 sum over the tokens rounds (the
    pivot then misses the value by ulps of it, a correction the map must take off before the
    zoom), and lanes a few ulps around it: the output is the guide's mean (plus the zoomed
    deviations), to the guide statistics' own rounding.  The map
    folded the correction into its offset, ``(x - p) s + (target - corr s)``, and the two
    large terms cancelled: 25000-570000 float32 ulps off (3% of the output) on NumPy and
    torch, exact in the numba kernels' float64 (a review of the kernels); float64 lanes of
    3e16 / 7 the numba kernels' float64 fold took 171 ulps off (the final diff review)."""
    rng = np.random.default_rng()
    few = 2.0**-21 if dtype == np.float32 else 2.0**-50  # a few ulps
    x = np.full((2, tokens, 3), value, dtype)
    x[1] += (value * few * rng.standard_normal((tokens, 3))).astype(dtype)
    guide = rng.normal(-3.0, 20.0, (2, 40, 3)).astype(dtype)
    want = reference.zoom_shift(x, guide)
    # per lane, the output's size: the guide's spread (the guide's own float32 statistics
    # round by a few ulps of it, and its mean may be far smaller), or a zoomed deviation's
    scale = np.maximum(np.abs(guide).max(axis=1, keepdims=True), np.abs(want).max(axis=1, keepdims=True))
    runs = {"array_api": mmfuse.zoom_shift(x, guide, backend="array_api")}
    if HAVE_NUMBA:
        runs["numba"] = mmfuse.zoom_shift(x, guide, backend="numba")  # the fused kernel
        # the statistics and the map kernel (the hub's round at alpha 1 is the same step)
        runs["numba align"] = mmfuse.align([x, guide], topology="hub", hub=1, backend="numba")[0]
    torch = pytest.importorskip("torch")
    for grad in (False, True):
        xt = torch.from_numpy(x.copy()).requires_grad_(grad)
        runs[f"torch grad={grad}"] = to_numpy(mmfuse.zoom_shift(xt, torch.from_numpy(guide)).detach())
    for name, got in runs.items():
        ulps = np.abs(got - want) / np.spacing(scale.astype(dtype))
        # 8: the float32 statistics' own rounding of 40-50 values (over 6000 seeds of the
        # 1e8 / 50-token case: at most 4.6 ulps of this scale; a CI run met 4.7 against the 4
        # this had, of the guide's spread alone); the folded map was 25000 and more
        assert ulps.max() <= 8, (name, ulps.max())


def test_blocked_map_of_large_inputs_takes_the_correction_off():
    """Inputs of several blocks (over 512 KiB) are mapped block by block after their
    statistics (``_apply_numpy``), the correction taken off there too: float32 data
    1e4 + 1e-2 noise aligned to a unit hub keeps the hub's mean (a mutant dropping the
    correction there was 0.055 off, and no test saw it)."""
    rng = np.random.default_rng()
    x = (1e4 + 1e-2 * rng.standard_normal((64, 256, 16))).astype(np.float32)
    hub = rng.standard_normal((64, 256, 16)).astype(np.float32)
    got = mmfuse.align([x, hub], topology="hub", hub=1, backend="array_api")[0]
    want = reference.align([x, hub], topology="hub", hub=1)[0]
    assert np.abs(got - want).max() <= 8 * np.spacing(np.float32(np.abs(want).max()))


def test_masked_max_pool_of_negative_values_ignores_the_padding():
    """pool="max" (the layers' default) over masked tokens of negative data: the padding never
    wins the max (a mutant filling it with 0 instead of -inf survived: the tests' data had
    positive maxima)."""
    rng = np.random.default_rng()
    xs = [rng.normal(-10.0, 1.0, (3, 6, 4)), rng.normal(-10.0, 1.0, (3, 5, 4))]
    masks = [rng.random((3, 6)) < 0.6, rng.random((3, 5)) < 0.6]
    for m in masks:
        m[:, 0] = True
    got = mmfuse.zoom_shift_fusion(xs, masks=masks, pool="max", fuse="concat")
    want = reference.zoom_shift_fusion(xs, masks=masks, pool="max", fuse="concat")
    assert_close(got, want)
    assert np.all(got < -5.0)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("tokens", [65, 129, 200])
def test_float32_statistics_of_a_long_axis_count_every_token(tokens, channels):
    """float32 token axes past F32_TOKENS sum the squared deviations in chunks in float32 and
    the partial last chunk in float64 (``_chunked_square_sum``): every token counts (a
    mutant dropping the last partial chunk's last token survived: no test had T = 64 k + 1).
    The mean, one float64 sum (by einsum where the channels are the inner axis), is the
    exact mean rounded once (within half an ulp of float32, and float64's own error)."""
    rng = np.random.default_rng()
    x = rng.normal(3.0, 2.0, (2, tokens, channels)).astype(np.float32)
    mean, std = mmfuse.moments(x, eps=0.0, backend="array_api")
    want_mean, want_std = reference.moments(x, eps=0.0)
    np.testing.assert_allclose(mean, want_mean, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(std, want_std, rtol=2e-6)
    half_ulp = np.spacing(np.abs(want_mean).astype(np.float32)).astype(np.float64) / 2
    assert np.all(np.abs(mean.astype(np.float64) - want_mean) <= half_ulp * (1 + 1e-9))


# The paths whose float32 sums over a long token axis accumulate in float64: NumPy's blocked
# core, numba's CPU kernels, and the generic form under array-api-strict and Dask
_FLOAT64_SUMMING = ["numpy", "numba", "array_api_strict", "dask"]


def _moments_on(namespace, x, mask):
    """``mmfuse.moments`` of float32 NumPy ``x`` (and ``mask``) over axis 1, eps 0, back as
    NumPy arrays: on NumPy arrays by the core ("numpy") or numba's kernels ("numba"), or as
    array-api-strict or Dask arrays (the generic form)."""
    if namespace in ("numpy", "numba"):
        if namespace == "numba" and not HAVE_NUMBA:
            pytest.skip("numba is not installed")
        return mmfuse.moments(x, mask=mask, eps=0.0, backend="array_api" if namespace == "numpy" else "numba")
    pytest.importorskip("array_api_strict" if namespace == "array_api_strict" else "dask.array")
    if namespace == "array_api_strict":
        import array_api_strict as xps

        got = mmfuse.moments(xps.asarray(x), mask=None if mask is None else xps.asarray(mask), eps=0.0)
        return tuple(np.asarray(a) for a in got)
    import dask.array as da

    batch, tokens = x.shape[:2]
    got = mmfuse.moments(
        da.from_array(x, chunks=(max(1, batch // 2), tokens, x.shape[2])),
        mask=None if mask is None else da.from_array(mask, chunks=(max(1, batch // 2), tokens)), eps=0.0,
    )  # fmt: skip
    return tuple(a.compute() for a in got)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("namespace", _FLOAT64_SUMMING)
def test_float32_mean_of_a_long_axis_is_the_float64_mean_rounded(namespace, masked, rng):
    """The generic form (array-api-strict, Dask) of a float32 axis past F32_TOKENS sums in
    float64 and takes the correction as the float64 mean's difference from its float32
    rounding, as the NumPy path does: the mean within half a float32 ulp of the float64 one
    on data whose signs mix (a float64 sum of the rounded float32 deviations had been
    thousands of ulps off there, the mean being small against the tokens).  numba's kernels,
    whose sums are all float64, give the same answer."""
    x = rng.standard_normal((4, 1000, 3)).astype(np.float32)
    x[:, :, 1] *= 1e4
    mask = _mask(rng, 4, 1000) if masked else None
    want_mean, want_std = reference.moments(x, mask=mask, eps=0.0)
    mean, std = _moments_on(namespace, x, mask)
    assert mean.dtype == std.dtype == np.float32
    half_ulp = np.spacing(np.abs(want_mean).astype(np.float32)).astype(np.float64) / 2
    assert np.all(np.abs(mean.astype(np.float64) - want_mean) <= half_ulp * (1 + 1e-9))
    np.testing.assert_allclose(std, want_std, rtol=2e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("namespace", _FLOAT64_SUMMING)
def test_float32_long_axis_with_an_infinite_token_has_a_nan_mean(namespace, masked):
    """An infinite token on a long float32 axis summed in float64: pivot inf, correction
    inf - inf, so the mean is NaN on every such path and in the reference (a correction that
    dropped the non-finite difference would give inf)."""
    x = np.full((3, 1031, 2), 3.0, np.float32)
    x[0, 5, 0] = np.inf
    x[1, 7, 1] = -np.inf
    mask = np.ones((3, 1031), bool) if masked else None
    with np.errstate(invalid="ignore"):
        mean, _ = _moments_on(namespace, x, mask)
        want, _ = reference.moments(x, mask=mask)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(want))
    assert np.isnan(mean[0, 0, 0]) and np.isnan(mean[1, 0, 1]) and np.all(mean[2] == 3.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 8, 8), (16, 8, 4), (64, 16, 8), (256, 50, 2), (3, 40, 7, 2), (4, 60, 1)])
def test_token_sums_by_einsum_give_the_reductions_bits(monkeypatch, shape, dtype):
    """Blocks of two or more channels per token sum over the tokens by einsum past
    ``_EINSUM_ELEMENTS`` (several times faster with few channels than np.add.reduce, whose
    inner loop then runs over one token's channels): token after token, the reduction's
    order, so the statistics and maps have the same bits either way, masked or not."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
    guide = (rng.standard_normal(shape) * 0.5 - 2.0).astype(dtype)
    mask = rng.random(shape[:2]) < 0.7

    def calls():
        return [
            *mmfuse.moments(x, axis=1, backend="array_api"),
            *mmfuse.moments(x, axis=1, mask=mask, backend="array_api"),
            mmfuse.zoom_shift(x, guide, axis=1, alpha=0.7, backend="array_api"),
        ]

    monkeypatch.setattr(core, "_FOLD_ELEMENTS", 1 << 62)  # (these shapes' unfolded sums)
    monkeypatch.setattr(core, "_EINSUM_ELEMENTS", 1 << 62)
    reduced = calls()
    monkeypatch.setattr(core, "_EINSUM_ELEMENTS", 0)
    for a, b in zip(calls(), reduced, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("channels", [1, 2, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_an_infinite_token_gives_a_nan_mean_on_a_long_float32_axis(channels, masked):
    """A lane with an infinite token has a NaN mean (inf - inf in the shifted form) on every
    path and in the reference; the float32 path over long token axes (float64 sums, folded
    or not) had returned the float64 sum's inf (a review's find)."""
    x = np.full((3, 1031, channels), 3.0, np.float32)
    x[0, 5, 0] = np.inf
    x[1, 7, 0] = -np.inf
    mask = np.ones((3, 1031), bool) if masked else None
    with np.errstate(invalid="ignore"):
        mean, _ = mmfuse.moments(x, mask=mask, backend="array_api")
        want, _ = reference.moments(x, mask=mask)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(want))
    assert np.isnan(mean[0, 0, 0]) and np.isnan(mean[1, 0, 0]) and np.all(mean[2] == 3.0)


def test_fold_slots_divide_the_tokens_within_the_fold_width():
    """A block folds k tokens into a row only where k divides the tokens, k W stays within
    the fold's width, the fold leaves at least _FOLD_ROWS rows, and W is 2 to _FOLD_LANES;
    where such a k exists, it does fold."""
    for tokens in (64, 100, 1000, 4096, 4099, 4097):
        for lanes in range(1, 40):
            k = core._fold_slots(tokens, lanes)
            if k == 0:
                assert lanes < 2 or lanes > core._FOLD_LANES or not any(
                    tokens % j == 0 for j in range(2, min(core._FOLD_WIDTH // lanes, tokens // core._FOLD_ROWS) + 1)
                )
                continue
            assert k >= 2 and tokens % k == 0 and k * lanes <= core._FOLD_WIDTH
            assert tokens // k >= core._FOLD_ROWS
    assert core._fold_slots(4096, 2) == 32 and core._fold_slots(1000, 4) == 10 and core._fold_slots(4099, 2) == 0


FOLDED = [((64, 1000, 2), np.float32, 300.0), ((16, 4096, 8), np.float32, 300.0),
          ((3, 640, 2, 3), np.float32, 300.0), ((32, 512, 2), np.float64, 300.0),
          ((300, 64, 5), np.float64, 300.0), ((256, 4096, 2), np.float32, 300.0),
          ((32, 128, 4), np.float32, 300.0), ((256, 64, 2), np.float32, 300.0),
          ((4, 4160, 2), np.float32, 300.0), ((64, 1000, 2), np.float32, 1e4),
          ((32, 128, 4), np.float32, 1e4), ((32, 512, 2), np.float64, 1e8)]  # fmt: skip


@pytest.mark.parametrize("shape, dtype, offset", FOLDED)
def test_folded_blocks_give_the_statistics_and_maps(monkeypatch, shape, dtype, offset):
    """Few channels over many tokens fold tokens into the rows (``_fold_slots``): the same
    statistics and maps as the unfolded path to a few ulps (another order of the sums; maps
    the same operations per element), both against the reference, for moments, zoom_shift
    toward another guide, a partial step, align; a masked call does not fold (the same bits
    with or without the fold enabled).  (256, 4096, 2) float32 runs as blocks on threads;
    float32 over 64 tokens sums in float64 (T 128), at 64 in float32 (k = 2), and (4, 4160,
    2) leaves a partial chunk of the squares (130 rows); means far above the spread (a
    spread of 2 at 1e4 in float32, 1e8 in float64) need the pivot's correction."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    guide = (rng.standard_normal(shape) * 0.25 - 7.0).astype(dtype)
    mask = _mask(rng, shape[0], shape[1])

    def calls():
        return [
            *mmfuse.moments(x, axis=1, backend="array_api"),
            mmfuse.zoom_shift(x, guide, axis=1, backend="array_api"),
            mmfuse.zoom_shift(x, guide, axis=1, alpha=0.4, backend="array_api"),
            *mmfuse.align([x, guide], axis=1, rounds=1, backend="array_api"),
            *mmfuse.moments(x, axis=1, mask=mask, backend="array_api"),
        ]

    assert core._fold_of(x, 1)  # (the shapes fold)
    folded = calls()
    monkeypatch.setattr(core, "_FOLD_ELEMENTS", 1 << 62)
    plain = calls()
    want = [
        *reference.moments(x, axis=1),
        reference.zoom_shift(x, guide, axis=1),
        reference.zoom_shift(x, guide, axis=1, alpha=0.4),
        *reference.align([x, guide], axis=1, rounds=1),
    ]
    ulp = np.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(folded[:-2], plain[:-2], strict=True)):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=8 * ulp * scale, err_msg=f"call {i}")
        np.testing.assert_allclose(a, want[i], rtol=0, atol=16 * ulp * scale, err_msg=f"call {i}")
    for a, b in zip(folded[-2:], plain[-2:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_strided_block_runs_unfolded():
    """A transposed (not C-contiguous) input takes the unfolded sums (a fold is a view of
    contiguous memory), with the maps folded on their own buffers: right either way."""
    rng = np.random.default_rng()
    x = (rng.standard_normal((2, 1024, 64)) * 3.0 + 5.0).astype(np.float32).transpose(2, 1, 0)  # (64, 1024, 2)
    guide = (rng.standard_normal((64, 900, 2)) - 1.0).astype(np.float32)
    assert not x.flags.c_contiguous and core._fold_slots(1024, 2)
    y = mmfuse.zoom_shift(x, guide, axis=1, backend="array_api")
    mean, std = mmfuse.moments(x, axis=1, backend="array_api")
    assert_close(y, reference.zoom_shift(x, guide, axis=1), dtype=np.dtype(np.float32))
    want_mean, want_std = reference.moments(x, axis=1)
    assert_close(mean, want_mean, dtype=np.dtype(np.float32))
    assert_close(std, want_std, dtype=np.dtype(np.float32))


@pytest.mark.parametrize("backend", ["array_api", "torch", *(["numba"] if HAVE_NUMBA else [])])
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_non_finite_token_reaches_every_consensus_modality(rng, backend, poison):
    """Consensus rounds read every modality: an unmasked NaN (or infinite) token in one lane of
    the first makes that lane NaN in all of them, as the reference's literal rounds say.  At
    alpha = 1 the first modality's tracked mean had been its (finite) target mean, so a later
    modality whose lane has no spread (zoomed by 1) took a finite target; in the limit
    (rounds=None, eps = 0) the first modality's weight is 0 and its mean was skipped.  Lanes
    without the token stay finite and right."""
    xs = [rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 3, 3)) + 2.0, rng.standard_normal((2, 5, 3))]
    xs[0][0, 2, 1] = poison
    xs[1][0, :, 1] = 5.0  # no spread in the poisoned lane
    cases = [({"rounds": r}, 2) for r in (1, 2, None)] + [({"rounds": r, "eps": 0.0}, m) for r in (3, None) for m in (2, 3)]
    for options, n in cases:
        arrays = xs[:n]
        if backend == "torch":
            torch = pytest.importorskip("torch")
            arrays = [torch.from_numpy(x) for x in arrays]
        with np.errstate(invalid="ignore"):  # (NumPy's warning for inf - inf, as the maths has it)
            want = reference.align(xs[:n], **options)
            got = [to_numpy(y) for y in mmfuse.align(arrays, backend=backend, **options)]
        for i, (y, w) in enumerate(zip(got, want)):
            assert np.isnan(w[0, :, 1]).all(), (options, n, i)  # (what the rounds say)
            assert np.array_equal(np.isfinite(y), np.isfinite(w)), (options, n, i)
            finite = np.isfinite(w)
            assert_close(np.where(finite, y, 0.0), np.where(finite, w, 0.0), err_msg=f"{options} {n} {i}")


@pytest.mark.parametrize("backend", _numpy_backends())
def test_a_float32_variance_past_its_range_does_not_poison_the_consensus_limit(rng, backend):
    """Finite float32 data whose variance overflows (spread 1e20) in the modality of weight 0
    (Gauss-Seidel consensus, alpha = 1, eps = 0): its infinite log-variance is no NaN token
    and must not make the limit NaN; the other modalities keep values near the reference's
    (that modality's statistics are past float32's range: docs/backends.rst, Range limits).
    Each backend named: under "auto" the numba kernels' float64 statistics, once numba was
    imported by an earlier test, never overflow, and the core's limit went untested (a
    mutation review's find)."""
    big = (rng.standard_normal((1, 4, 1)) * 1e20).astype(np.float32)
    xs = [big, rng.standard_normal((1, 4, 1)).astype(np.float32), rng.standard_normal((1, 4, 1)).astype(np.float32)]
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference.align(xs, rounds=None, eps=0.0)
        got = mmfuse.align(xs, rounds=None, eps=0.0, backend=backend)
    for y, w in zip(got[1:], want[1:]):
        assert np.isfinite(y).all()
        assert_close(y, w, rtol=1e-2)


def test_run_tasks_raises_a_workers_error_and_waits_for_its_runs():
    """The task runner re-raises an error from any run, whichever thread took it, and
    returns only after every run a thread has taken is done (a mutation review: a swallowed
    error, and a caller returning while a slow thread's runs were still going, passed every
    test)."""
    import threading
    import time

    from mmfuse._core import threads

    def failing(out, t0, t1):
        if t0 <= 36 < t1:
            raise ValueError("task 36")
        out[t0:t1] += 1

    with pytest.raises(ValueError, match="task 36"):
        threads.run_tasks(failing, 37, 4, np.zeros(37, dtype=np.int64))
    main = threading.get_ident()

    def slow_elsewhere(out, t0, t1):  # (the caller's runs take 0.01 s: the other threads take some)
        time.sleep(0.01 if threading.get_ident() == main else 0.2)
        out[t0:t1] += 1

    seen = np.zeros(37, dtype=np.int64)
    threads.run_tasks(slow_elsewhere, 37, 4, seen)
    assert (seen == 1).all()
    if hasattr(os, "sched_getaffinity"):  # (Linux: the cores this process may run on)
        assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_numpy_blocks_of_samples_over_the_block_size(rng, monkeypatch):
    """Samples each larger than a block (more than 512 KiB of tokens and channels): one
    sample a block, not zero (range() with step 0 had raised, untested), and split across
    threads (a pool below the threshold) each block exactly once; an error in a block's
    work comes out of the call."""
    x = (3.0 + rng.standard_normal((3, 1000, 200))).astype(np.float32)  # 800 KB a sample
    guide = rng.standard_normal((3, 900, 200)).astype(np.float32)
    assert core._rows_per_block(x) == 1
    for threads in (False, True):
        monkeypatch.setattr(core, "_PARALLEL_BYTES", 0 if threads else 1 << 62)
        assert_close(mmfuse.zoom_shift(x, guide, backend="array_api"), reference.zoom_shift(x, guide))
    visits = np.zeros(3, dtype=np.int64)

    def work(blocks):
        for blk in blocks:
            visits[blk] += 1  # (separate samples per thread: no race on the counts)

    core._run_blocks(x, work)
    assert (visits == 1).all(), visits

    def failing(blocks):
        if any(blk.start == 2 for blk in blocks):
            raise MemoryError("the last block")

    with pytest.raises(MemoryError, match="the last block"):
        core._run_blocks(x, failing)
