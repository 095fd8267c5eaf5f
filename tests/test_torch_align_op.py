"""The torch backend's ``mmfuse::align`` custom op (mmfuse/backends/torch/align.py): the core's
values, gradients equal to float64 autograd through the Array-API core (first and second
order), gradcheck / gradgradcheck, a backward that saves only the inputs, the eager binding
against the registered autograd, dispatch under "auto", and ``torch.compile``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mmfuse  # noqa: E402
from mmfuse.backends import explain  # noqa: E402
from mmfuse.backends.torch import align as op_align  # noqa: E402

# the public functions' calls below test the op at every size (small CPU ones with gradients
# otherwise run the core under autograd: tests/test_torch_small_paths.py)
pytestmark = pytest.mark.usefixtures("custom_align_ops")

# (schedule, topology, hub): every combination the public function offers
LAYOUTS = [("gauss-seidel", "consensus", None), ("jacobi", "consensus", None), ("gauss-seidel", "hub", -1)]


def _case(rng, n_mod, batch=2, channels=3, dtype=torch.float64, masked=True, pad=0.0):
    """Inputs with different means, spreads and token counts; masks on all modalities but
    the last (masked tokens padded with ``pad``)."""
    xs, masks = [], []
    for k in range(n_mod):
        tokens = int(rng.integers(4, 8))
        x = rng.uniform(-2, 2) + rng.uniform(0.3, 3) * rng.standard_normal((batch, tokens, channels))
        mask = None
        if masked and k < n_mod - 1:
            m = rng.random((batch, tokens)) < 0.7
            m[:, :2] = True
            x = np.where(m[..., None], x, pad)
            mask = torch.from_numpy(m)
        xs.append(torch.tensor(x, dtype=dtype))
        masks.append(mask)
    return xs, masks


def _options(rng, rounds, layout, n_mod, alpha=None):
    schedule, topology, hub = layout
    if alpha is None:
        alpha = float(rng.uniform(0.3, 0.9))
    return {"rounds": rounds, "alpha": alpha, "schedule": schedule, "topology": topology, "hub": hub}


def _loss(ys, ups):
    return sum((y * u).sum() for y, u in zip(ys, ups))


def _grads(xs, masks, ups, backend, create_graph=False, **options):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    ys = mmfuse.align(leaves, masks=masks, backend=backend, **options)
    grads = torch.autograd.grad(_loss(ys, ups), leaves, create_graph=create_graph)
    return leaves, ys, grads


def _core_values(xs, masks, **options):
    """The core's values over the primitives the op's forward runs for these tensors: the
    NumPy primitives on their memory for CPU float32 / float64 (torch/align.py's docstring),
    the generic ones in torch operations otherwise."""
    if all(x.dtype in (torch.float32, torch.float64) for x in xs):
        ys = mmfuse.align(
            [x.numpy() for x in xs], masks=[None if k is None else k.numpy() for k in masks],
            backend="array_api", **options,
        )  # fmt: skip
        return [torch.from_numpy(y) for y in ys]
    return mmfuse.align(xs, masks=masks, backend="array_api", **options)


def _close(got, want, rtol):
    if want.numel() == 0:
        assert got.shape == want.shape
        return
    scale = max(1.0, float(want.abs().max()))
    assert float((got.double() - want.double()).abs().max()) <= rtol * scale


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["gs-consensus", "jacobi-consensus", "gs-hub"])
@pytest.mark.parametrize("rounds", [0, 1, 2, None])
def test_values_and_gradients_equal_the_core(rng, n_mod, layout, rounds):
    """Values: the core's bits (float32 and float64, NaN padding included; the torch core's
    to rounding); dL/dx: float64 autograd through the core, to rounding."""
    for alpha in (1.0, None):
        options = _options(rng, rounds, layout, n_mod, alpha)
        if rounds is None and layout[0] == "jacobi" and n_mod == 2 and options["alpha"] == 1.0:
            continue  # no limit (the public function refuses it)
        for dtype in (torch.float32, torch.float64):
            xs, masks = _case(rng, n_mod, dtype=dtype, pad=np.nan)
            want = _core_values(xs, masks, **options)
            generic = mmfuse.align(xs, masks=masks, backend="array_api", **options)
            for y, w in zip(generic, want):  # the two cores agree to rounding (NaN padding too)
                tol = 1e-5 if dtype == torch.float32 else 1e-13
                torch.testing.assert_close(y, w, rtol=tol, atol=tol, equal_nan=True)
            for needs in (False, True):
                leaves = [x.clone().requires_grad_(needs) for x in xs]
                got = mmfuse.align(leaves, masks=masks, backend="torch", **options)
                if needs:
                    assert type(got[0].grad_fn).__name__ == "_AlignBackward"
                for y, w in zip(got, want):
                    assert y.dtype == dtype and y.shape == w.shape
                    torch.testing.assert_close(y.detach(), w, rtol=0, atol=0, equal_nan=True)
        # gradients, float64, finite padding
        xs, masks = _case(rng, n_mod, batch=int(rng.integers(1, 3)))
        ups = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
        _, _, got = _grads(xs, masks, ups, "torch", **options)
        _, _, want = _grads(xs, masks, ups, "array_api", **options)
        for g, w in zip(got, want):
            _close(g, w, 1e-12)


def test_nan_padding_gives_the_cores_gradients(rng):
    """NaN in masked tokens: the core's autograd makes the gradients NaN except the direct
    term on masked tokens (the map reaches them, the statistics do not); the op matches that
    pattern and its finite values."""
    xs, masks = _case(rng, 3, pad=np.nan)
    ups = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
    _, _, got = _grads(xs, masks, ups, "torch", rounds=2, alpha=0.7)
    _, _, want = _grads(xs, masks, ups, "array_api", rounds=2, alpha=0.7)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isfinite(got[0][~masks[0]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_gradients_follow_float64(rng, dtype):
    xs, masks = _case(rng, 3)
    ups = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
    options = {"rounds": None, "alpha": 0.6}
    _, _, want = _grads(xs, masks, ups, "array_api", **options)
    low = [x.to(dtype) for x in xs]
    leaves = [x.clone().requires_grad_() for x in low]
    ys = mmfuse.align(leaves, masks=masks, backend="torch", **options)
    assert all(y.dtype == dtype for y in ys)
    torch.testing.assert_close(
        ys[1].detach(), mmfuse.align(low, masks=masks, backend="array_api", **options)[1]
    )
    got = torch.autograd.grad(_loss(ys, [u.to(dtype) for u in ups]), leaves)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        _close(g, w, tol)


def test_partial_needs_and_unused_outputs(rng):
    """Only some inputs need gradients, only some outputs are used, channel statistics."""
    xs = [torch.from_numpy(rng.uniform(-1, 1) + rng.standard_normal((2, 6, 4))) for _ in range(3)]
    for axis in (-2, -1):
        a = xs[0].clone().requires_grad_()
        ys = mmfuse.align([a, xs[1], xs[2]], rounds=2, alpha=0.5, axis=axis, backend="torch")
        (got,) = torch.autograd.grad(ys[2].sin().sum(), a)
        b = xs[0].clone().requires_grad_()
        ws = mmfuse.align([b, xs[1], xs[2]], rounds=2, alpha=0.5, axis=axis, backend="array_api")
        (want,) = torch.autograd.grad(ws[2].sin().sum(), b)
        _close(got, want, 1e-12)


def test_empty_batch(rng):
    xs = [
        torch.zeros((0, 5, 3), dtype=torch.float64, requires_grad=True),
        torch.ones((0, 4, 3), dtype=torch.float64),
    ]
    ys = mmfuse.align(xs, rounds=None, alpha=0.5, backend="torch")
    assert [tuple(y.shape) for y in ys] == [(0, 5, 3), (0, 4, 3)]
    (g,) = torch.autograd.grad(sum(y.sum() for y in ys), xs[0])
    assert g.shape == (0, 5, 3)


# --------------------------------------------------------------------------- higher order


@pytest.mark.parametrize(
    "options",
    [
        {"rounds": 1, "alpha": 1.0},
        {"rounds": 2, "alpha": 0.6, "schedule": "jacobi"},
        {"rounds": None, "alpha": 0.5},  # Gauss-Seidel consensus limit: the Newton solve
        {"rounds": None, "alpha": 0.5, "schedule": "jacobi"},
        {"rounds": 3, "alpha": 0.4, "topology": "hub", "hub": 1},
    ],
    ids=["gs1", "jacobi2", "gs-limit", "jacobi-limit", "hub3"],
)
def test_gradcheck_and_gradgradcheck(rng, options):
    for n_mod in (2, 3):
        xs, masks = _case(rng, n_mod, batch=1, channels=2)
        leaves = tuple(x.requires_grad_() for x in xs)

        def f(*a, masks=masks):
            return tuple(op_align(list(a), masks=masks, **options))

        assert torch.autograd.gradcheck(f, leaves)
        assert torch.autograd.gradgradcheck(f, leaves)


def test_double_backward_equals_the_cores_autograd(rng):
    xs, masks = _case(rng, 3)
    ups = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
    vs = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
    for options in (
        {"rounds": 2, "alpha": 0.7},
        {"rounds": None, "alpha": 0.5},
        {"rounds": 1, "topology": "hub"},
    ):
        second = {}
        for backend in ("torch", "array_api"):
            leaves, _, grads = _grads(xs, masks, ups, backend, create_graph=True, **options)
            second[backend] = torch.autograd.grad(_loss(grads, vs), leaves)
        for g, w in zip(second["torch"], second["array_api"]):
            _close(g, w, 1e-10)


# --------------------------------------------------------------------------- memory


def _saved_bytes(fn, inputs):
    """Bytes of tensors autograd saves for backward, beyond the inputs' own storage."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(extra), out


def test_backward_saves_only_the_inputs(rng):
    xs, masks = _case(rng, 3, batch=8, channels=16, dtype=torch.float32)
    leaves = [x.requires_grad_() for x in xs]
    inputs = leaves + [m for m in masks if m is not None]
    x_bytes = sum(x.numel() * x.element_size() for x in xs)
    for options in ({"rounds": 2, "alpha": 0.6}, {"rounds": None, "alpha": 0.6}):
        op_bytes, ys = _saved_bytes(
            lambda o=options: mmfuse.align(leaves, masks=masks, backend="torch", **o), inputs
        )
        core_bytes, _ = _saved_bytes(
            lambda o=options: mmfuse.align(leaves, masks=masks, backend="array_api", **o), inputs
        )
        assert op_bytes == 0
        assert core_bytes >= 2 * x_bytes  # the core keeps several x-sized arrays per modality
        saved = ys[0].grad_fn.saved_tensors
        ptrs = {t.data_ptr() for t in inputs}
        assert len(saved) == 3 + 2 and {s.data_ptr() for s in saved} == ptrs


# --------------------------------------------------------------------------- bindings, dispatch


def test_eager_binding_equals_the_registered_autograd(rng):
    xs, masks = _case(rng, 3)
    ups = [torch.from_numpy(rng.standard_normal(tuple(x.shape))) for x in xs]
    leaves = [x.requires_grad_() for x in xs]
    for rounds, schedule, topology in (
        (2, "gauss-seidel", "consensus"),
        (None, "jacobi", "consensus"),
        (1, "gauss-seidel", "hub"),
    ):
        bound = op_align(
            leaves, rounds=rounds, alpha=0.6, schedule=schedule, topology=topology, hub=2, masks=masks
        )
        direct = torch.ops.mmfuse.align(leaves, rounds, 0.6, schedule, topology, 2, -2, masks, 1e-5)
        assert type(bound[0].grad_fn).__name__ == "_AlignBackward"
        assert type(direct[0].grad_fn).__name__.startswith("GeneratedBackwardFor_mmfuse_align")
        for a, b in zip(bound, direct):
            assert torch.equal(a, b)
        ga = torch.autograd.grad(_loss(bound, ups), leaves, create_graph=True)
        gb = torch.autograd.grad(_loss(direct, ups), leaves, create_graph=True)
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
        # second order through both
        ha = torch.autograd.grad(sum(g.square().sum() for g in ga), leaves)
        hb = torch.autograd.grad(sum(g.square().sum() for g in gb), leaves)
        for a, b in zip(ha, hb):
            assert torch.equal(a, b)


def test_auto_dispatch(rng):
    xs, masks = _case(rng, 2, dtype=torch.float32)
    leaf = xs[0].clone().requires_grad_()
    chosen = explain("align", leaf, xs[1]).chosen
    assert (chosen.backend, chosen.variant) == ("torch", "custom op")
    ys = mmfuse.align([leaf, xs[1]], masks=masks)
    assert type(ys[0].grad_fn).__name__ == "_AlignBackward"
    # under torch.func transforms the core's autograd row (the op has no batching rule)
    found = []

    def total(a):
        found.append(explain("align", a, xs[1]).chosen.variant)
        return sum(y.sum() for y in mmfuse.align([a, xs[1]], alpha=0.5))

    g = torch.func.grad(total)(xs[0])
    assert found == ["autograd (transforms)"]
    (want,) = torch.autograd.grad(total(leaf), leaf)
    torch.testing.assert_close(g, want)
    # without gradients numba's CPU kernels keep torch CPU tensors once numba is imported
    pytest.importorskip("numba")
    assert explain("align", *xs).chosen.backend == "numba"
    assert explain("align", leaf, xs[1]).chosen.variant == "custom op"


def test_torch_compile(rng):
    """Dynamo sees the registered op (fullgraph: the backend function, and the ZoomShift layer,
    which calls it under torch.compile), and mmfuse.align under torch.compile gives the eager
    values and gradients."""
    from mmfuse.nn import ZoomShift

    xs, masks = _case(rng, 3, dtype=torch.float32)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def direct(a, b, c):
        return op_align([a, b, c], rounds=None, alpha=0.5, masks=masks)

    layer = ZoomShift(3, 3, fuse=None, rounds=2, alpha=0.5)

    def pooled(a, b, c):
        return layer([a, b, c], masks=masks)

    def public(a, b, c):
        return mmfuse.align([a, b, c], rounds=2, alpha=0.5, masks=masks)

    def loss(ys):  # a fixed, non-uniform weighting of every output
        return sum((y * torch.arange(y.numel()).reshape(y.shape).cos()).sum() for y in ys)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's notes on the public layer's graph breaks
        for fn, full, backend in ((direct, True, record), (pooled, True, record), (public, False, "eager")):
            torch._dynamo.reset()
            found = len(graphs)
            leaves = [x.clone().requires_grad_() for x in xs]
            got = torch.compile(fn, fullgraph=full, backend=backend)(*leaves)
            g_got = torch.autograd.grad(loss(got), leaves)
            want = fn(*leaves)
            g_want = torch.autograd.grad(loss(want), leaves)
            for a, b in zip((*got, *g_got), (*want, *g_want)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            if backend is record:
                targets = {n.target for gm in graphs[found:] for n in gm.graph.nodes}
                assert targets & {torch.ops.mmfuse.align, torch.ops.mmfuse.align.default}, fn.__name__


@pytest.mark.parametrize("which", ["x", "guide"])
def test_zoom_shift_double_backward_where_a_lane_has_no_spread(rng, which):
    """eps = 0 and a lane with one unmasked token (no spread), in x or in the guide: the
    zoom_shift op's backward took sqrt(var + eps), whose infinite derivative at 0 a double
    backward (a gradient penalty) turned into NaN; it takes the core's spread, as the core's
    autograd does, and gives its second derivatives."""
    x0 = torch.tensor(rng.standard_normal((2, 4, 3)))
    g0 = torch.tensor(rng.standard_normal((2, 5, 3)))
    lone = torch.ones(2, 4 if which == "x" else 5, dtype=torch.bool)
    lone[0] = False
    lone[0, 1] = True
    kwargs = {"mask": lone} if which == "x" else {"guide_mask": lone}
    grads = []
    for backend in ("torch", "array_api"):
        x, g = x0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
        y = mmfuse.zoom_shift(x, g, eps=0.0, alpha=0.7, backend=backend, **kwargs)
        first = torch.autograd.grad(y.pow(2).sum(), [x, g], create_graph=True)
        grads.append(torch.autograd.grad(sum(f.pow(2).sum() for f in first), [x, g]))
    for got, want in zip(*grads):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize(("value", "dtype"), [(7654321.0, torch.float32), (1e15 / 7, torch.float64)])
def test_gradients_of_a_constant_lane_of_a_large_value(value, dtype, alpha):
    """zoom_shift and align's closed-form backwards on a lane constant over its real tokens
    (zero padding masked out): x - mean is formed as (x - pivot) - corr before it is summed
    or scaled, exactly 0 there.  With the correction folded in (- corr S0, + k_var corr) the
    gradient was 9% off in float32 at 7654321 and 2% in float64 at 1e15 / 7, where dL/dvar is
    about 1 / eps (a review of the gradients).  Exact: float64 autograd through the core on
    the lane shifted to 0 (gradients do not change under a shift of a lane; its pivot is then
    exact)."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    n, pad = 64, 16
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, n - pad :] = False
    x = torch.randn(1, n, 2, generator=gen, dtype=dtype)
    x[0, :, 0] = torch.where(mask[0], torch.tensor(value, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    guide = torch.randn(1, n, 2, generator=gen, dtype=dtype)
    upstream = torch.randn(1, n, 2, generator=gen, dtype=dtype)
    shifted = x.double().clone()
    shifted[0, :, 0] -= float(x[0, 0, 0])

    def zoom(a, backend):
        return mmfuse.zoom_shift(a, guide.to(a.dtype), alpha=alpha, mask=mask, guide_mask=mask, backend=backend)

    def align(a, backend):
        return mmfuse.align([a, guide.to(a.dtype)], rounds=1, alpha=alpha, masks=[mask, mask], backend=backend)[0]

    for op in (zoom, align):
        exact_in = shifted.clone().requires_grad_()
        op(exact_in, "array_api").backward(upstream.double())
        got_in = x.clone().requires_grad_()
        op(got_in, "torch").backward(upstream)
        want = exact_in.grad
        err = (got_in.grad.double() - want).abs().max() / (want.abs().max() * torch.finfo(dtype).eps)
        assert err <= 4, (op.__name__, float(err))


def test_guide_gradient_of_a_guide_with_a_large_mean():
    """dL/dguide of the closed-form backward on a guide of mean 1e8 and spread 1e-3: the
    guide's correction is taken off its centred values (a mutant dropping it, an ulp of
    the mean times the zoom, survived the tests).  Against autograd through the core."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    x = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    guide = 1e8 + 1e-3 * torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    grads = []
    for backend in ("torch", "array_api"):
        g = guide.clone().requires_grad_()
        mmfuse.zoom_shift(x, g, alpha=0.7, backend=backend).backward(upstream)
        grads.append(g.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9 * float(grads[1].abs().max()))


@pytest.mark.parametrize("rounds", [1, 2])
def test_align_gradients_of_a_modality_with_a_large_mean(rounds):
    """The align op's closed-form backward on a modality of mean 1e8 and spread 1e-3: each
    pass takes the correction off the centred values (dropped in either pass, dL/dx was 1e-7
    to 3e-6 off; the constant-lane tests cannot show it, their correction being exactly 0; a
    mutation review).  Against autograd through the core, both modalities' gradients."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    x = 1e8 + 1e-3 * torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    ups = [torch.randn(2, t, 3, generator=gen, dtype=torch.float64) for t in (6, 7)]
    grads = []
    for backend in ("torch", "array_api"):
        leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        out = mmfuse.align(leaves, rounds=rounds, alpha=0.7, backend=backend)
        grads.append(torch.autograd.grad(sum((o * u).sum() for o, u in zip(out, ups)), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("grad", [False, True])
def test_statistics_take_var_mean_on_small_cpu_tensors_only(monkeypatch, call_counts, grad):
    """The core's torch statistics (moments under autograd, the ops' recomputing backwards)
    use torch's var_mean up to ``TORCH_VAR_MEAN_ELEMENTS`` CPU elements and the generic sums
    beyond, where var_mean was 1.5-7.5x slower (a training-step review: moments' step 2.65 ->
    0.84 ms at (512, 8, 16)).  Both sides of the bound against the float64 reference, values
    and the moments' gradient against autograd of the plain formula."""
    from mmfuse._core import align as core_align

    bound = core_align.TORCH_VAR_MEAN_ELEMENTS
    call_counts(torch, "var_mean")
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    for shape, uses in (((2, 8, bound // 16), True), ((2, 8, bound // 16 + 1), False)):
        x = (3.0 + torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_(grad)
        call_counts.calls.clear()
        stats = core_align._stats(x, 1)
        assert (call_counts.calls["var_mean"] == 1) == uses, (shape, call_counts.calls)
        want_mean, want_std = mmfuse.reference.moments(x.detach().numpy(), eps=0.0)
        torch.testing.assert_close(stats.mean, torch.from_numpy(want_mean), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(stats.var.sqrt(), torch.from_numpy(want_std), rtol=1e-12, atol=1e-13)
        if grad:
            upstream = torch.randn(*stats.var.shape, generator=gen, dtype=torch.float64)
            (got,) = torch.autograd.grad((stats.var * upstream).sum() + stats.mean.sum(), x)
            xx = x.detach().clone().requires_grad_()
            mean = xx.mean(dim=1, keepdim=True)
            var = ((xx - mean) ** 2).mean(dim=1, keepdim=True)
            (want,) = torch.autograd.grad((var * upstream).sum() + mean.sum(), xx)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
