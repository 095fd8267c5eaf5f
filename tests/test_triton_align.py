"""The Triton backend's alignment under Triton's interpreter (``TRITON_INTERPRET=1``):
``align`` (the core's algorithm over Triton primitives) and the analytic autograd of the
``moments`` and ``zoom_shift`` ops.

Values against the float64 reference on data with a large mean against a small spread,
masks with NaN in the masked tokens, B = 1, odd token and channel counts, token axes longer
than one register tile, 2 and 3 modalities, rounds 0, 1, 2 and the closed-form limit,
alpha < 1, every topology and schedule, float16 / bfloat16; gradients against float64
autograd of the torch backend and central differences of the reference; double backward;
bit-identical reruns; ``align`` under ``torch.compile`` (the kernels in the traced graph).
Shapes are tiny: the interpreter runs every program in Python.
Imported as tests/test_triton.py does (interpreted, or the module is skipped).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import triton_interpreted  # noqa: E402
from triton_interpreted import import_interpreted, poisoned_buffers, share_not_rounded_once  # noqa: E402

tb = import_interpreted()

from test_align_numerics import _ZERO_SPREAD_CALLS, zero_spread_reference  # noqa: E402

import mmfuse  # noqa: E402
import mmfuse.reference as ref  # noqa: E402
from mmfuse.backends import available  # noqa: E402
from mmfuse.backends.triton import _align_ops  # noqa: E402
from mmfuse.testing import assert_close  # noqa: E402

F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@contextlib.contextmanager
def _kernels_only():
    """Fail if align falls back to the core: proves the Triton primitives ran."""

    def refuse(*args, **kwargs):
        raise AssertionError("align fell back to the core")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_align_ops, "core_align", refuse)
        yield


def _np(t):
    return None if t is None else t.detach().to(torch.float64).numpy()


def _modalities(rng, batch, tokens, channels, dtype, big=True):
    """Modality m: mean ~ 1e4 (1 + m / 10) against a spread of 0.5 + m (``big``), or means
    of a few units for 16-bit dtypes (which cannot hold a spread of 1 under 1e4); masks
    keep token 0 of every sample."""
    xs, masks = [], []
    for m, t in enumerate(tokens):
        base = 1e4 * (1 + m / 10) if big else 3.0 - 2 * m
        scale = 0.5 + m + rng.random((batch, 1, channels))
        xs.append(torch.tensor(base + scale * rng.standard_normal((batch, t, channels)), dtype=dtype))
        mask = torch.tensor(rng.random((batch, t)) < 0.7)
        mask[:, 0] = True
        masks.append(mask)
    return xs, masks


def _nan_masked(x, mask):
    return torch.where(mask[..., None], x, torch.full_like(x, float("nan")))


def _check_large_mean(got, want):
    """Errors in units of each output's spread over tokens, beyond the few float32 ulps of
    values near 1e4 (as the parity matrix's large-mean case)."""
    g, w = _np(got), np.asarray(want, dtype=np.float64)
    ok = np.isfinite(w)
    assert np.array_equal(np.isfinite(g), ok)
    spread = float(np.mean(np.nanstd(np.where(ok, w, np.nan), axis=-2)))
    limit = 1e-3 * spread + 4 * F32_EPS * np.abs(w)
    err = np.abs(g - w)[ok]
    assert np.all(err <= limit[ok]), float(np.max(err) / spread)


# --------------------------------------------------------------------------- align: values

# (batch, tokens per modality, channels): odd sizes, B = 1, three modalities, a token axis
# longer than one statistics tile (2100 x 9 > 16384 elements: the looping passes)
SHAPES = [
    pytest.param(3, (7, 5), 5, id="M2"),
    pytest.param(1, (3, 6, 2), 3, id="B1-M3"),
    pytest.param(2, (9, 4, 11), 37, id="M3-two-channel-blocks"),
    pytest.param(1, (2100, 5), 9, id="looped"),
]


@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES)
@pytest.mark.parametrize("rounds", [1, 2, None])
@pytest.mark.parametrize("alpha", [1.0, 0.35])
def test_align_values(rng, batch, tokens, channels, rounds, alpha):
    xs, masks = _modalities(rng, batch, tokens, channels, torch.float32)
    if rounds is None and alpha == 1.0 and len(xs) == 2:
        schedule = "gauss-seidel"  # Jacobi has no limit here; the default schedule does
    else:
        schedule = "jacobi" if rounds == 2 else "gauss-seidel"
    poisoned = [_nan_masked(x, m) for x, m in zip(xs, masks)]
    with poisoned_buffers(), _kernels_only():
        ys = mmfuse.align(
            poisoned, rounds=rounds, alpha=alpha, schedule=schedule, masks=masks, backend="triton"
        )
    want = ref.align(
        [_np(x) for x in xs], rounds=rounds, alpha=alpha, schedule=schedule, masks=[m.numpy() for m in masks]
    )
    for y, w, m in zip(ys, want, masks):
        assert y.dtype == torch.float32 and y.shape == tuple(w.shape)
        # masked tokens hold NaN: still mapped (NaN out there), never in the statistics
        assert torch.equal(torch.isnan(y), ~m[..., None].expand_as(y))
        _check_large_mean(y, np.where(m[..., None].numpy(), w, np.nan))


@pytest.mark.parametrize(
    ("topology", "schedule", "hub"),
    [("hub", "gauss-seidel", 1), ("hub", "jacobi", -1), ("consensus", "jacobi", None)],
)
@pytest.mark.parametrize("rounds", [0, 1, None])
def test_align_topologies(rng, topology, schedule, hub, rounds):
    """The hub is copied exactly (its identity map, unfolded); rounds = 0 copies every input."""
    xs, masks = _modalities(rng, 2, (5, 3, 6), 7, torch.float32)
    with poisoned_buffers(), _kernels_only():
        ys = mmfuse.align(
            xs, rounds=rounds, alpha=0.6, topology=topology, schedule=schedule, hub=hub, masks=masks,
            backend="triton",
        )  # fmt: skip
    want = ref.align(
        [_np(x) for x in xs], rounds=rounds, alpha=0.6, topology=topology, schedule=schedule, hub=hub or 0,
        masks=[m.numpy() for m in masks],
    )  # fmt: skip
    for i, (x, y, w) in enumerate(zip(xs, ys, want)):
        if rounds == 0 or (topology == "hub" and i == hub % len(xs)):
            assert torch.equal(y, x)
        _check_large_mean(y, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rounds", [1, None])
def test_align_low_precision(rng, dtype, rounds):
    """Statistics and the map in float32, rounded once to the inputs' dtype: the outputs are
    the exact ones rounded once but for a few in ten thousand (bfloat16 where the interpreter
    rounds its casts as a GPU does: :mod:`triton_interpreted`).  Over 30 seeds 4 of 23040
    were not, at most one of an output's 96, so each output allows two (0.01 had allowed
    none: a seed's single miss on one CPU would fail); truncation misses about half."""
    xs, masks = _modalities(rng, 2, (7, 4, 5), 6, dtype, big=False)
    with _kernels_only():
        ys = mmfuse.align(xs, rounds=rounds, alpha=0.5, masks=masks, backend="triton")
    want = ref.align([_np(x) for x in xs], rounds=rounds, alpha=0.5, masks=[m.numpy() for m in masks])
    for y, w in zip(ys, want):
        assert_close(y, w, xp=torch, dtype=dtype, device="cpu")
        if dtype == torch.float16 or triton_interpreted.BFLOAT16_TO_NEAREST:
            assert share_not_rounded_once(y, w) <= 2 / y.numel()


def test_align_middle_axes(rng):
    """(B, ..., T, C) inputs: the statistics per leading index, as the core's."""
    xs = [torch.tensor(1e4 + rng.standard_normal((2, 3, t, 5)), dtype=torch.float32) for t in (4, 6)]
    with _kernels_only():
        ys = mmfuse.align(xs, alpha=0.5, backend="triton")
    want = ref.align([_np(x) for x in xs], alpha=0.5)
    for y, w in zip(ys, want):
        _check_large_mean(y, w)


def test_align_deterministic(rng):
    xs, masks = _modalities(rng, 3, (9, 6), 13, torch.float32)
    runs = [mmfuse.align(xs, rounds=None, alpha=0.5, masks=masks, backend="triton") for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [{"rounds": 1}, {"rounds": 2, "alpha": 0.5}, {"rounds": None, "alpha": 0.5}])
def test_nan_in_an_unmasked_token_propagates_as_in_the_reference(rng, kwargs):
    """A NaN among a lane's unmasked tokens: that lane's statistics are NaN and reach every
    modality that takes them as a target, as in the reference (the kernels tested "no spread"
    as ``sigma > 0``, the core ``sigma != 0``), for align, zoom_shift and moments."""
    a, b = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 5, 3))
    a[0, 1, 2] = np.nan
    xs = [torch.tensor(v, dtype=torch.float32) for v in (a, b)]
    calls = [
        (lambda x, bk: mmfuse.align(x, eps=1e-5, backend=bk, **kwargs)),
        (lambda x, bk: [mmfuse.zoom_shift(x[1], x[0], alpha=kwargs.get("alpha", 1.0), backend=bk)]),
        (lambda x, bk: list(mmfuse.moments(x[0], backend=bk))),
    ]
    for call in calls:
        got = call(xs, "triton")
        want = call([a, b], "reference")
        for y, w in zip(got, want):
            y = _np(y)
            assert np.array_equal(np.isnan(y), np.isnan(w))
            ok = ~np.isnan(w)
            np.testing.assert_allclose(y[ok], w[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rounds", [1, None])
def test_align_gradients(rng, rounds):
    """With gradients the kernels still run the forward, and the backward is the torch
    backend's mmfuse::align closed form: gradients equal float64 autograd through the core on
    the same (rounded) inputs, masks included.  (Masked tokens hold finite values here: the
    map applies to them too, so NaN there reaches dL/ds as 0 * NaN, in the core as well.)"""
    xs, masks = _modalities(rng, 2, (5, 4, 6), 3, torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    with _kernels_only():
        ys = mmfuse.align(leaves, rounds=rounds, alpha=0.5, masks=masks, backend="triton")
    assert all(type(y.grad_fn).__name__ == "_TritonAlignBackward" for y in ys)
    ups = [torch.tensor(rng.standard_normal(x.shape), dtype=torch.float32) for x in xs]
    grads = torch.autograd.grad(sum((y * u).sum() for y, u in zip(ys, ups)), leaves)
    x64 = [x.double().requires_grad_(True) for x in xs]
    y64 = mmfuse.align(x64, rounds=rounds, alpha=0.5, masks=masks, backend="array_api")
    want = torch.autograd.grad(sum((y * u.double()).sum() for y, u in zip(y64, ups)), x64)
    for g, w in zip(grads, want):
        assert g.dtype == torch.float32
        assert_close(g, w.float(), rtol=1e-3)


def test_align_masks_of_some_modalities(rng):
    """Masks for some modalities, None for others: the given masks count (a mutation review:
    treating a partly None list as no masks gave 1.8e4 off where the padding held 100, and
    passed)."""
    xs, masks = _modalities(rng, 2, (5, 4), 3, torch.float32, big=False)
    xs[0] = torch.where(masks[0][..., None], xs[0], torch.full_like(xs[0], 100.0))
    partial = [masks[0], None]
    with _kernels_only():
        ys = mmfuse.align(xs, alpha=0.5, masks=partial, backend="triton")
    want = ref.align([_np(x) for x in xs], alpha=0.5, masks=[masks[0].numpy(), None])
    for y, w in zip(ys, want):
        assert_close(y, w, xp=torch, dtype=torch.float32, device="cpu")


def test_align_fallbacks(rng):
    """float64 and other statistics axes run the core under autograd: same values."""
    xs, masks = _modalities(rng, 2, (5, 4), 3, torch.float32)
    want = ref.align([_np(x) for x in xs], alpha=0.5, masks=[m.numpy() for m in masks])
    x64 = [x.double() for x in xs]
    for y, w in zip(mmfuse.align(x64, alpha=0.5, masks=masks, backend="triton"), want):
        assert_close(y, w)
    xs = [torch.tensor(1e4 + rng.standard_normal((2, 3, 5)), dtype=torch.float32) for _ in range(2)]
    channel = ref.align([_np(x) for x in xs], alpha=0.5, axis=-1)
    for y, w in zip(mmfuse.align(xs, alpha=0.5, axis=-1, backend="triton"), channel):
        _check_large_mean(y, w)


def test_align_registered():
    assert "triton" in available("align")
    assert mmfuse.backends.triton.align is _align_ops.align


def test_registered_ops_match_direct_calls(rng):
    """torch.ops.mmfuse_triton.align_stats / align_map (what torch.compile sees) give the
    eager path's bits."""
    x = torch.tensor(1e4 + rng.standard_normal((2, 5, 3)), dtype=torch.float32)
    mask = torch.tensor(rng.random((2, 5)) < 0.7)
    mask[:, 0] = True
    stats = _align_ops.TRITON.stats(x, 1, mask)
    pivot, corr, var = torch.ops.mmfuse_triton.align_stats(x, mask)
    assert torch.equal(pivot, stats.pivot) and torch.equal(corr, stats.corr) and torch.equal(var, stats.var)
    s, t = var.sqrt() + 0.5, corr - 1.0
    assert torch.equal(
        torch.ops.mmfuse_triton.align_map(x, pivot, corr, s, t), _align_ops.TRITON.apply(x, 1, pivot, corr, s, t)
    )
    # no correction given: none applied (the pivot was ignored with it; the final review)
    assert torch.equal(
        torch.ops.mmfuse_triton.align_map(x, pivot, None, s, t),
        torch.ops.mmfuse_triton.align_map(x, pivot, torch.zeros_like(corr), s, t),
    )
    st = ref.moments(_np(x), mask=mask.numpy(), eps=0.0)
    assert_close(stats.mean, st[0])
    assert_close(stats.var, st[1] ** 2, rtol=1e-3)


# --------------------------------------------------------------------------- torch.compile


def _traced_kernel(interpreted, launches):
    """``interpreted`` (a kernel built for the interpreter) as a ``JITFunction``, which is what
    ``wrap_triton`` captures into a graph on a GPU build (under the interpreter it returns the
    kernel itself, untraceable: the ops would launch it on fake tensors).  Launching it, as the
    captured graph does, runs the interpreted kernel and records the launch in ``launches``.
    Its cache key is its name: Triton's own key rejects the interpreted helpers it calls."""
    from triton.runtime.jit import JITFunction

    class TracedKernel(JITFunction):
        @property
        def cache_key(self):
            return f"interpreted {self.fn.__qualname__}"

        def run(self, *args, grid, warmup, **kwargs):
            launches.append(self.fn.__name__)
            return interpreted[grid](*args, **kwargs)

    return TracedKernel(interpreted.fn)


def _graph_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rounds", [2, None])
def test_align_compiled(rng, monkeypatch, rounds):
    """Under torch.compile (fullgraph) Triton align is the triton_op mmfuse_triton::align, which
    AOTAutograd decomposes into the statistics and map kernels (one each per modality) and the
    rounds' torch operations: no mmfuse::align (the torch backend's forward) in any graph.  The
    compiled call launches the kernels, gives the eager Triton values and gradients, and the
    float64 reference's values; its backward is the closed form in torch operations."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner

    import mmfuse.backends.triton as triton_backend
    from mmfuse.backends.triton import _align_kernels

    launches = []
    kernels = {}
    for name in ("stats_kernel", "map_kernel"):
        kernels[name] = _traced_kernel(getattr(_align_kernels, name), launches)
        monkeypatch.setattr(_align_kernels, name, kernels[name])

    graphs = {"dynamo": [], "forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    aot = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)

    xs, masks = _modalities(rng, 2, (7, 4, 5), 6, torch.float32)

    def fn(a, b, c):
        return triton_backend.align([a, b, c], rounds=rounds, alpha=0.5, masks=masks)

    torch._dynamo.reset()
    try:
        leaves = [x.clone().requires_grad_(True) for x in xs]
        with _kernels_only():
            ys = torch.compile(fn, fullgraph=True, backend=backend)(*leaves)
        ran = list(launches)
        ups = [torch.tensor(rng.standard_normal(x.shape), dtype=torch.float32) for x in xs]
        grads = torch.autograd.grad(sum((y * u).sum() for y, u in zip(ys, ups)), leaves)
        # the forward graph's kernel launches (the side table is emptied by the reset)
        (forward,) = graphs["forward"]
        wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
        traced = [
            kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            for n in forward.graph.nodes
            if n.op == "call_function" and n.target is wrapper
        ]
        # launch options (num_warps) reach the graph as a one-configuration Autotuner
        traced = [getattr(k, "fn", None) if isinstance(k, Autotuner) else k for k in traced]
    finally:
        torch._dynamo.reset()
    assert sorted(ran) == ["map_kernel"] * 3 + ["stats_kernel"] * 3

    # the graphs: the triton op, then its kernels; never the torch backend's op
    (dynamo,) = graphs["dynamo"]
    assert torch.ops.mmfuse_triton.align in _graph_targets(dynamo)
    assert all(any(k is v for v in kernels.values()) for k in traced)
    assert sorted(k.fn.__name__ for k in traced) == ["map_kernel"] * 3 + ["stats_kernel"] * 3
    (backward,) = graphs["backward"]
    assert wrapper not in _graph_targets(backward)
    for gm in (dynamo, forward, backward):
        names = {str(t) for t in _graph_targets(gm)}
        assert not any(n.startswith("mmfuse.align") for n in names), names
    assert not any(str(t).startswith("mmfuse_triton") for t in _graph_targets(forward))

    # values: the eager Triton align and the float64 reference; gradients: eager's
    eager_leaves = [x.clone().requires_grad_(True) for x in xs]
    with _kernels_only():
        want = fn(*eager_leaves)
    assert all(type(y.grad_fn).__name__ == "_TritonAlignBackward" for y in want)
    want_grads = torch.autograd.grad(sum((y * u).sum() for y, u in zip(want, ups)), eager_leaves)
    ref_ys = ref.align([_np(x) for x in xs], rounds=rounds, alpha=0.5, masks=[m.numpy() for m in masks])
    for y, w, r in zip(ys, want, ref_ys):
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, w.detach())
        _check_large_mean(y, r)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------- autograd of the ops


def _f64_leaf(t):
    return None if t is None else t.detach().to(torch.float64).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "gshape", "alpha"),
    [
        pytest.param((3, 7, 5), (3, 9, 5), 1.0, id="tile"),
        pytest.param((1, 3, 3), (1, 2, 3), 0.4, id="B1"),
        pytest.param((2, 1100, 3), (2, 13, 3), 0.7, id="looped-x"),
    ],
)
def test_zoom_shift_gradients(rng, dtype, shape, gshape, alpha, custom_align_ops):
    big = dtype == torch.float32
    x = torch.tensor((1e4 if big else 3.0) + rng.standard_normal(shape), dtype=dtype).requires_grad_(True)
    guide0 = torch.tensor(2 + 3 * rng.standard_normal(gshape), dtype=dtype)
    mask = torch.tensor(rng.random(shape[:-1]) < 0.7)
    mask[..., 0] = True
    gmask = torch.tensor(rng.random(gshape[:-1]) < 0.7)
    gmask[..., 0] = True
    guide = _nan_masked(guide0, gmask).requires_grad_(True)  # masked guide tokens: never read
    upstream = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    y = mmfuse.zoom_shift(x, guide, alpha=alpha, mask=mask, guide_mask=gmask, backend="triton")
    assert type(y.grad_fn).__name__ == "_TritonZoomShiftBackward"  # the Triton op ran
    gx, gg = torch.autograd.grad((y * upstream).sum(), [x, guide])
    assert gx.dtype == dtype and gg.dtype == dtype
    assert (gg[~gmask] == 0).all()  # NaN padding: exact zeros, no leak
    x64, g64 = _f64_leaf(x), _f64_leaf(guide0)
    y64 = mmfuse.zoom_shift(x64, g64, alpha=alpha, mask=mask, guide_mask=gmask, backend="torch")
    want_x, want_g = torch.autograd.grad((y64 * upstream.double()).sum(), [x64, g64])
    tol = 2e-4 if big else 5e-2
    assert_close(gx, want_x.to(dtype), rtol=tol)
    assert_close(gg, want_g.to(dtype), rtol=tol)
    if big:  # central differences of the float64 reference along a random direction
        v, w = rng.standard_normal(shape), rng.standard_normal(gshape)
        h = 1e-3

        def loss(dx, dg):
            out = ref.zoom_shift(
                _np(x) + dx, _np(guide0) + dg, alpha=alpha, mask=mask.numpy(), guide_mask=gmask.numpy()
            )
            return float(np.sum(out * _np(upstream)))

        for grad, dx, dg, d in ((gx, h * v, 0.0, v), (gg, 0.0, h * w, w)):
            want = (loss(dx, dg) - loss(-dx if np.ndim(dx) else 0.0, -dg if np.ndim(dg) else 0.0)) / (2 * h)
            got = float(np.sum(_np(grad) * np.where(np.isfinite(_np(grad)), d, 0.0)))
            assert abs(got - want) <= 1e-3 * (float(np.sum(np.abs(_np(grad) * d))) + 1e-9), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("shape", "masked"), [((3, 7, 5), True), ((1, 4, 3), False), ((2, 2100, 3), True)])
def test_moments_gradients(rng, dtype, shape, masked):
    big = dtype == torch.float32
    x0 = torch.tensor((1e4 if big else 3.0) + rng.standard_normal(shape), dtype=dtype)
    mask = None
    if masked:
        mask = torch.tensor(rng.random(shape[:-1]) < 0.7)
        mask[..., 0] = True
    x = (x0 if mask is None else _nan_masked(x0, mask)).requires_grad_(True)
    kept = (*shape[:-2], 1, shape[-1])
    up_mean = torch.tensor(rng.standard_normal(kept), dtype=dtype)
    up_std = torch.tensor(rng.standard_normal(kept), dtype=dtype)
    mean, std = mmfuse.moments(x, mask=mask, backend="triton")
    assert type(mean.grad_fn).__name__ == "_TritonMomentsBackward"
    (gx,) = torch.autograd.grad((mean * up_mean).sum() + (std * up_std).sum(), [x], retain_graph=True)
    assert gx.dtype == dtype
    if mask is not None:
        assert (gx[~mask] == 0).all()
    x64 = _f64_leaf(x0)
    m64, s64 = mmfuse.moments(x64, mask=mask, backend="array_api")
    (want,) = torch.autograd.grad((m64 * up_mean.double()).sum() + (s64 * up_std.double()).sum(), [x64])
    assert_close(gx, want.to(dtype), rtol=2e-4 if big else 2e-2)
    # only one output used: the other's gradient is absent, not zero-filled by us
    (g_mean,) = torch.autograd.grad(mean.sum(), [x])
    count = 1.0 * shape[-2] if mask is None else mask.sum(dim=-1, keepdim=True)[..., None].to(dtype)
    want_mean = (torch.ones_like(x0) / count).to(dtype)
    if mask is not None:
        want_mean = torch.where(mask[..., None], want_mean, torch.zeros((), dtype=dtype))
    assert_close(g_mean, want_mean)


def test_batched_backwards_match_the_torch_backend(rng, custom_align_ops):
    """Autograd's batched backward (``is_grads_batched``: vectorized Jacobians) through the
    Triton alignment ops gives the torch backend's gradients; moments' backward had failed
    there (no batching rule for ``broadcast_to``)."""
    x = torch.tensor(rng.standard_normal((3, 6, 5)), dtype=torch.float32, requires_grad=True)
    g = torch.tensor(2.0 + rng.standard_normal((3, 7, 5)), dtype=torch.float32, requires_grad=True)
    calls = {
        "moments": (lambda be: mmfuse.moments(x, backend=be), [x]),
        "zoom_shift": (lambda be: [mmfuse.zoom_shift(x, g, backend=be)], [x, g]),
        "align": (lambda be: mmfuse.align([x, g], backend=be), [x, g]),
    }
    for call, leaves in calls.values():
        shapes = [o.shape for o in call("torch")]
        vs = [torch.tensor(rng.standard_normal((4, *s)), dtype=torch.float32) for s in shapes]
        got, want = (
            torch.autograd.grad(call(be), leaves, vs, is_grads_batched=True) for be in ("triton", "torch")
        )
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # the interpreter's pow at 0
@pytest.mark.parametrize("case", list(_ZERO_SPREAD_CALLS))
def test_gradients_where_a_lane_has_no_spread(rng, case):
    """Triton's own backwards (its moments, zoom_shift and align autograd, float32) where a
    lane has a single unmasked token at eps = 0: finite, and those of finite differences of
    the float64 reference, as test_align_numerics checks the other routes."""
    (x, g, mx, mg), call, weights, want = zero_spread_reference(rng, case)
    tx, tg = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (x, g))
    outs = call(tx, tg, torch.from_numpy(mx), torch.from_numpy(mg), "triton")
    assert all(type(o.grad_fn).__name__.startswith("_Triton") for o in outs), "fell back to the core"
    loss = sum((torch.from_numpy(w).float() * o).sum() for w, o in zip(weights, outs))
    got = torch.autograd.grad(loss, [tx, tg], allow_unused=True)
    for name, a, b in zip(("x", "guide"), got, want):
        a = np.zeros_like(b) if a is None else _np(a)
        assert np.all(np.isfinite(a)), f"{case}: d/d{name} not finite"
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=f"{case}: d/d{name}")


def test_registered_autograd_matches_eager_binding(rng):
    """torch.ops.mmfuse_triton.{moments, zoom_shift} with torch.library's autograd (what
    torch.compile uses) and the eager binding: the same bits."""
    x = torch.tensor(1e4 + rng.standard_normal((2, 5, 3)), dtype=torch.float32).requires_grad_(True)
    g = torch.tensor(rng.standard_normal((2, 6, 3)), dtype=torch.float32).requires_grad_(True)
    mask = torch.tensor(rng.random((2, 5)) < 0.7)
    mask[:, 0] = True
    up = torch.tensor(rng.standard_normal((2, 5, 3)), dtype=torch.float32)
    eager = mmfuse.zoom_shift(x, g, alpha=0.5, mask=mask, backend="triton")
    direct = torch.ops.mmfuse_triton.zoom_shift(x, g, 0.5, mask, None, 1e-5)
    assert torch.equal(eager, direct)
    for a, c in zip(
        torch.autograd.grad((eager * up).sum(), [x, g]), torch.autograd.grad((direct * up).sum(), [x, g])
    ):
        assert torch.equal(a, c)
    em, es = mmfuse.moments(x, mask=mask, backend="triton")
    dm, ds = torch.ops.mmfuse_triton.moments(x, mask, 1e-5)
    assert torch.equal(em, dm) and torch.equal(es, ds)
    ga = torch.autograd.grad((em * up[:, :1]).sum() + (es * up[:, 1:2]).sum(), [x])[0]
    gb = torch.autograd.grad((dm * up[:, :1]).sum() + (ds * up[:, 1:2]).sum(), [x])[0]
    assert torch.equal(ga, gb)


def test_double_backward(rng, custom_align_ops):
    """The backwards are plain torch operations: second derivatives flow, equal to the torch
    backend's (zoom_shift: the same closed form) and the core's autograd (moments)."""
    x0 = torch.tensor(5 + rng.standard_normal((2, 6, 3)), dtype=torch.float32)
    g0 = torch.tensor(rng.standard_normal((2, 4, 3)), dtype=torch.float32)
    up = torch.tensor(rng.standard_normal((2, 6, 3)), dtype=torch.float32)
    results = []
    for backend in ("triton", "torch"):
        x, g = x0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
        y = mmfuse.zoom_shift(x, g, alpha=0.5, backend=backend)
        gx, gg = torch.autograd.grad((y * up).sum(), [x, g], create_graph=True)
        results.append(torch.autograd.grad((gx**2).sum() + (gg**3).sum(), [x, g]))
    for a, c in zip(*results):
        assert_close(a, c, rtol=1e-4)
    results = []
    for backend, dtype in (("triton", torch.float32), ("array_api", torch.float64)):
        x = x0.to(dtype).requires_grad_(True)
        mean, std = mmfuse.moments(x, backend=backend)
        u = up.to(dtype)
        (gx,) = torch.autograd.grad((mean * u[:, :1]).sum() + (std * u[:, 1:2]).sum(), [x], create_graph=True)
        results.append(torch.autograd.grad((gx * up.to(dtype).flip(1)).sum(), [x])[0])
    assert_close(results[0], results[1].float(), rtol=1e-3)


def test_moments_double_backward_where_a_lane_has_no_spread(rng):
    """eps = 0 and a lane with one unmasked token: the Triton moments op's backward took
    sqrt(var + eps), whose infinite derivative at 0 a double backward turned into NaN; it
    takes the core's spread (as the zoom_shift ops) and gives the core's second derivatives."""
    x0 = torch.tensor(rng.standard_normal((2, 5, 3)), dtype=torch.float32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    mask[0, 2] = True
    up = torch.tensor(rng.standard_normal((2, 1, 3)), dtype=torch.float32)
    results = []
    for backend, dtype in (("triton", torch.float32), ("array_api", torch.float64)):
        x = x0.to(dtype).requires_grad_(True)
        mean, std = mmfuse.moments(x, mask=mask, eps=0.0, backend=backend)
        (gx,) = torch.autograd.grad((mean * up.to(dtype)).sum() + (std**2).sum(), [x], create_graph=True)
        results.append(torch.autograd.grad((gx**2).sum(), [x])[0])
    assert bool(torch.isfinite(results[0]).all())
    assert_close(results[0], results[1].float(), rtol=1e-4, atol=1e-5)


def test_gradients_deterministic(rng):
    x = torch.tensor(1e4 + rng.standard_normal((3, 9, 7)), dtype=torch.float32).requires_grad_(True)
    g = torch.tensor(rng.standard_normal((3, 5, 7)), dtype=torch.float32).requires_grad_(True)
    up = torch.tensor(rng.standard_normal((3, 9, 7)), dtype=torch.float32)
    runs = []
    for _ in range(2):
        y = mmfuse.zoom_shift(x, g, alpha=0.3, backend="triton")
        mean, std = mmfuse.moments(x, backend="triton")
        loss = (y * up).sum() + (mean * std).sum()
        runs.append([y, *torch.autograd.grad(loss, [x, g])])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("rounds", [0, 1])
def test_align_reads_a_neg_view_as_its_values(rng, rounds):
    """A ``torch._neg_view`` tensor equals its values; its memory holds their negation, which
    the kernels read raw when the negative bit is not resolved first (rounds=0, an exact copy,
    came back negated)."""
    x = torch.from_numpy(rng.standard_normal((2, 6, 3))).float()
    g = torch.from_numpy(3.0 + rng.standard_normal((2, 5, 3))).float()
    xn = torch._neg_view(-x)
    assert torch.equal(xn, x) and xn.is_neg()
    with _kernels_only():
        got = mmfuse.align([xn, g], rounds=rounds, backend="triton")
        want = mmfuse.align([x, g], rounds=rounds, backend="triton")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_constant_lanes_of_a_large_value_land_on_the_guide_mean(rng):
    """float32 lanes of one large value whose float32 sum rounds: the kernels take the
    statistics' correction off the centred values before the zoom, so the output is the
    guide's mean (folded into the offset, ``target - corr s``, it cancelled against
    ``(x - p) s``: 3% off), in zoom_shift's fused kernel and align's map."""
    x = torch.full((2, 50, 3), 1e8, dtype=torch.float32)
    guide = torch.tensor(rng.normal(-3.0, 20.0, (2, 40, 3)), dtype=torch.float32)
    want = ref.zoom_shift(_np(x), _np(guide))
    for got in (
        mmfuse.zoom_shift(x, guide, backend="triton"),
        mmfuse.align([x, guide], rounds=1, topology="hub", hub=1, backend="triton")[0],
    ):
        ulps = np.abs(_np(got) - want) / np.spacing(np.abs(want).astype(np.float32))
        assert ulps.max() <= 4, ulps.max()


@pytest.mark.parametrize("masked", [False, True])
def test_moments_backward_skips_the_tests_with_the_same_bits(rng, monkeypatch, masked):
    """The Triton moments op's backward at an eps that keeps every spread positive: the same
    gradients (and double-backward ones) without its no-spread guard as with it."""
    import importlib

    core = importlib.import_module("mmfuse._core.align")  # (the home of the backwards' rule)
    x0 = torch.tensor(3.0 + rng.standard_normal((3, 6, 5)))
    x0[:, :, 1] = 2.5  # a channel without spread
    mask = torch.tensor(rng.random((3, 6)) < 0.7) if masked else None
    if mask is not None:
        mask[:, 0] = True
    up = [torch.tensor(rng.standard_normal((3, 1, 5))) for _ in range(2)]

    def grads():
        x = x0.clone().float().requires_grad_()
        mean, std = mmfuse.moments(x, mask=mask, eps=1e-5, backend="triton")
        (gx,) = torch.autograd.grad((mean * up[0]).sum() + (std * up[1]).sum(), [x], create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), [x])
        return gx.detach(), ggx

    fast = grads()
    monkeypatch.setattr(core, "spreads_positive", lambda eps: False)
    tested = grads()
    for a, b in zip(fast, tested):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_moments_backward_at_an_eps_lost_to_underflow(rng):
    """eps = 1e-50 (a direct op call: the public one refuses it) adds 0 to a float32
    variance: a constant channel has spread 0, and the backward's guard keeps its gradient
    finite (without it: a division by 0)."""
    x = torch.tensor(3.0 + rng.standard_normal((2, 6, 4)), dtype=torch.float32)
    x[:, :, 1] = 2.5
    x.requires_grad_()
    mean, std = torch.ops.mmfuse_triton.moments(x, None, 1e-50)
    w = torch.tensor(rng.standard_normal(tuple(std.shape)), dtype=torch.float32)
    (gx,) = torch.autograd.grad((std * w).sum() + mean.sum(), [x])
    assert torch.isfinite(gx).all()
