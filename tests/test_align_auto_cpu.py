"""numba's CPU kernels under "auto" (issue 19): large NumPy arrays and torch CPU tensors reach
them, small calls never import numba, values equal the reference, gradients through
``mmfuse::zoom_shift_numba`` equal float64 autograd of the core.

The threshold is :data:`mmfuse.backends._table.AUTO_IMPORT_ELEMENTS` (2**20 elements of the
first input); "large" inputs here have exactly that many, "small" ones far fewer.  Values are
checked against the reference on a slice of channels (every statistic is per sample and
channel, so a slice of the result is the result of the slice) to keep the float64 loops quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")

import mmfuse
from mmfuse import reference
from mmfuse.backends import explain
from mmfuse.backends._conditions import CONDITIONS, CallInfo
from mmfuse.backends._table import AUTO_IMPORT_ELEMENTS
from mmfuse.testing import assert_close

LARGE = (2, 1024, 512)  # AUTO_IMPORT_ELEMENTS elements
KEEP = 24  # channels compared with the reference
DTYPES = [np.float32, np.float64]


def _draw(rng, shape, dtype):
    """A mean that dwarfs the spread (1e4 + noise): what the pivot-centred maths is for."""
    return (1e4 + rng.uniform(0.5, 3.0) * rng.standard_normal(shape)).astype(dtype)


def _guide(rng, shape, dtype):
    return (rng.uniform(-3, 3) + rng.uniform(0.5, 2.0) * rng.standard_normal(shape)).astype(dtype)


def _mask(rng, batch, tokens):
    mask = rng.random((batch, tokens)) > 0.3
    mask[:, rng.integers(0, tokens)] = True  # no sample without tokens
    return mask


def _close_to_reference(got, want, dtype):
    """float32 results within a few ulps of values near 1e4 plus 1e-3 of the spread (a map
    folded into x s + t would miss by about 6% of it); float64 tightly."""
    got = np.asarray(got, dtype=np.float64)
    if dtype == np.float64:
        assert_close(got, want, rtol=1e-9, atol=1e-9)
        return
    spread = float(np.mean(np.std(want, axis=-2))) if want.shape[-2] > 1 else 1.0
    limit = 1e-3 * spread + 4 * np.finfo(np.float32).eps * np.abs(want)
    assert np.all(np.abs(got - want) <= limit), float(np.max(np.abs(got - want)) / spread)


def test_large_is_the_threshold():
    assert np.prod(LARGE) == AUTO_IMPORT_ELEMENTS


# --------------------------------------------------------------------------- NumPy


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_numpy_takes_the_kernels_and_equals_the_reference(dtype, rng):
    x, g = _draw(rng, LARGE, dtype), _guide(rng, (2, 700, 512), dtype)
    mx, mg = _mask(rng, 2, 1024), _mask(rng, 2, 700)
    for op, args in (("moments", (x,)), ("zoom_shift", (x, g)), ("align", (x, g))):
        found = explain(op, *args)
        assert (found.chosen.backend, found.chosen.variant) == ("numba", "CPU kernels"), str(found)
    xs, gs = x[..., :KEEP], g[..., :KEEP]

    mean, std = mmfuse.moments(x, mask=mx)
    want_mean, want_std = reference.moments(xs, mask=mx)
    assert mean.dtype == std.dtype == dtype
    _close_to_reference(mean[..., :KEEP], want_mean, dtype)
    assert_close(std[..., :KEEP].astype(np.float64), want_std, rtol=1e-4 if dtype == np.float32 else 1e-9)

    y = mmfuse.zoom_shift(x, g, alpha=0.7, mask=mx, guide_mask=mg)
    assert y.dtype == dtype and y.shape == x.shape
    _close_to_reference(y[..., :KEEP], reference.zoom_shift(xs, gs, alpha=0.7, mask=mx, guide_mask=mg), dtype)

    ya, yb = mmfuse.align([x, g], rounds=1, alpha=0.5, masks=[mx, mg])
    wa, wb = reference.align([xs, gs], rounds=1, alpha=0.5, masks=[mx, mg])
    _close_to_reference(ya[..., :KEEP], wa, dtype)
    _close_to_reference(yb[..., :KEEP], wb, dtype)


def test_numpy_below_the_threshold_in_a_fresh_process():
    """Small calls under "auto" run the NumPy core and never import numba; the first call of
    at least AUTO_IMPORT_ELEMENTS elements imports it and runs the kernels (the cached choice
    for the smaller call's signature does not stand in for it); afterwards, numba being
    imported, "auto" takes the kernels at every size."""
    out = _run(
        """
        import sys
        import numpy as np
        import mmfuse
        from mmfuse.backends import explain, lookup
        from mmfuse.backends._table import AUTO_IMPORT_ELEMENTS as N

        rng = np.random.default_rng(20261203)
        small = (1e4 + rng.standard_normal((4, 64, 32))).astype(np.float32)
        g = rng.standard_normal((4, 80, 32)).astype(np.float32)
        below = (1e4 + rng.standard_normal((3, 275, 1271))).astype(np.float32)  # N - 1 elements
        assert below.size == N - 1
        mmfuse.moments(small); mmfuse.zoom_shift(small, g); mmfuse.align([small, g], rounds=2, alpha=0.5)
        mmfuse.zoom_shift(below, below[:, :100]); mmfuse.align([below, below])
        print(explain("zoom_shift", below, below).chosen.variant)
        first = lookup("zoom_shift", like=small)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "numba"))
        big = (1e4 + rng.standard_normal((2, 1024, 512))).astype(np.float32)
        assert lookup("zoom_shift", like=big) is not first
        print(explain("zoom_shift", big, big).chosen.variant, "numba" in sys.modules)
        y = mmfuse.zoom_shift(big, big[:, ::-1])
        print("numba" in sys.modules, y.dtype)
        print(explain("zoom_shift", small, g).chosen.variant)
        """
    )
    assert out.splitlines() == [
        "numpy, cache-blocked",
        "[]",
        "CPU kernels False",  # choosing does not import numba; the kernels' first run does
        "True float32",
        "CPU kernels",
    ]


# --------------------------------------------------------------------------- torch


def test_small_torch_calls_do_not_import_numba():
    out = _run(
        """
        import sys
        import torch
        import mmfuse
        from mmfuse.backends import explain

        x = 1e4 + torch.randn(4, 64, 32, dtype=torch.float64)
        g = torch.randn(4, 50, 32, dtype=torch.float64)
        mmfuse.moments(x); mmfuse.align([x, g]); y = mmfuse.zoom_shift(x, g)
        xr = x.clone().requires_grad_()
        mmfuse.zoom_shift(xr, g).sum().backward(); mmfuse.align([xr, g])[0].sum().backward()
        print([explain(op, x, g).chosen.variant for op in ("moments", "zoom_shift", "align")])
        print(sorted(m for m in sys.modules if m.split(".")[0] == "numba"))
        big = torch.randn(2, 1024, 512)
        print(explain("zoom_shift", big, big).chosen.variant)
        mmfuse.moments(big)
        print("numba" in sys.modules)
        """
    )
    assert out.splitlines() == [
        "['autograd', 'custom op', 'custom op']",
        "[]",
        "CPU kernels in a torch op",
        "True",
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_torch_cpu_takes_the_kernels_and_equals_the_reference(dtype, rng):
    torch = pytest.importorskip("torch")
    xn, gn = _draw(rng, LARGE, dtype), _guide(rng, (2, 700, 512), dtype)
    mx, mg = _mask(rng, 2, 1024), _mask(rng, 2, 700)
    x, g = torch.from_numpy(xn), torch.from_numpy(gn)
    tm, tgm = torch.from_numpy(mx), torch.from_numpy(mg)
    chosen = {op: explain(op, *args).chosen for op, args in (("moments", (x,)), ("zoom_shift", (x, g)), ("align", (x, g)))}
    assert {op: (c.backend, c.variant) for op, c in chosen.items()} == {
        "moments": ("numba", "CPU kernels"),
        "zoom_shift": ("numba", "CPU kernels in a torch op"),
        "align": ("numba", "CPU kernels"),
    }
    xs, gs = xn[..., :KEEP], gn[..., :KEEP]

    mean, std = mmfuse.moments(x, mask=tm)
    assert isinstance(mean, torch.Tensor) and mean.dtype == std.dtype == x.dtype
    want_mean, want_std = reference.moments(xs, mask=mx)
    _close_to_reference(mean[..., :KEEP].numpy(), want_mean, dtype)
    assert_close(std[..., :KEEP].double().numpy(), want_std, rtol=1e-4 if dtype == np.float32 else 1e-9)

    y = mmfuse.zoom_shift(x, g, alpha=0.7, mask=tm, guide_mask=tgm)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.shape == x.shape
    want = reference.zoom_shift(xs, gs, alpha=0.7, mask=mx, guide_mask=mg)
    _close_to_reference(y[..., :KEEP].numpy(), want, dtype)

    ya, yb = mmfuse.align([x, g], rounds=1, alpha=0.5, masks=[tm, tgm])
    wa, wb = reference.align([xs, gs], rounds=1, alpha=0.5, masks=[mx, mg])
    _close_to_reference(ya[..., :KEEP].numpy(), wa, dtype)
    _close_to_reference(yb[..., :KEEP].numpy(), wb, dtype)
    # the inputs are read through views, never written
    np.testing.assert_array_equal(x.numpy(), xn)


def test_torch_views_are_zero_copy_and_outputs_own_their_memory():
    torch = pytest.importorskip("torch")
    from mmfuse.backends.numba import numpy_view

    x = torch.randn(3, 7, 5)
    view = numpy_view(x)
    assert view.ctypes.data == x.data_ptr()
    y = mmfuse.zoom_shift(x, x.flip(1), backend="numba")
    assert y.data_ptr() != x.data_ptr()
    a, b = mmfuse.align([x, x * 2], backend="numba")
    assert len({a.data_ptr(), b.data_ptr(), x.data_ptr()}) == 3


def test_torch_gradients_keep_autograd():
    """With gradients: zoom_shift runs the kernels inside mmfuse::zoom_shift_numba (its
    analytic backward), moments the torch backend's autograd row, align its custom op."""
    torch = pytest.importorskip("torch")
    x = torch.randn(*LARGE, requires_grad=True)
    g = torch.randn(2, 700, 512)
    assert explain("zoom_shift", x, g).chosen.variant == "CPU kernels in a torch op"
    assert (explain("moments", x).chosen.backend, explain("align", x, g).chosen.backend) == ("torch", "torch")
    y = mmfuse.zoom_shift(x, g)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_ZoomShiftNumbaBackward"
    with torch.no_grad():
        assert explain("align", x, g).chosen.backend == "numba"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("size", ["small", "large"])
def test_zoom_shift_gradients_equal_float64_autograd_of_the_core(dtype, masked, size, rng):
    """dL/dx and dL/dguide through mmfuse::zoom_shift_numba ("auto" on large tensors,
    backend="numba" on small ones) equal float64 autograd through the Array-API core on the
    same (rounded) inputs: the float32 inputs near 1e4 are off their float64 draws by up to
    half an ulp (4.9e-4), a thousandth of the smallest spread, which a 1e-3 tolerance cannot
    also absorb (a fresh draw failed CI by 1%)."""
    torch = pytest.importorskip("torch")
    shape, gshape = (LARGE, (2, 700, 512)) if size == "large" else ((3, 9, 4), (3, 7, 4))
    xn, gn = _draw(rng, shape, np.float64), _guide(rng, gshape, np.float64)
    mx = torch.from_numpy(_mask(rng, shape[0], shape[1])) if masked else None
    mg = torch.from_numpy(_mask(rng, gshape[0], gshape[1])) if masked else None
    up = torch.from_numpy(rng.standard_normal(shape))
    alpha = float(rng.uniform(0.3, 1.0))
    tdt = getattr(torch, dtype)

    x = torch.tensor(xn, dtype=tdt, requires_grad=True)
    g = torch.tensor(gn, dtype=tdt, requires_grad=True)
    backend = None if size == "large" else "numba"
    y = mmfuse.zoom_shift(x, g, alpha=alpha, mask=mx, guide_mask=mg, backend=backend)
    assert type(y.grad_fn).__name__ == "_ZoomShiftNumbaBackward"
    got = torch.autograd.grad((y.double() * up).sum(), (x, g))

    x64 = x.detach().double().requires_grad_(True)
    g64 = g.detach().double().requires_grad_(True)
    y64 = mmfuse.zoom_shift(x64, g64, alpha=alpha, mask=mx, guide_mask=mg, backend="array_api")
    want = torch.autograd.grad((y64 * up).sum(), (x64, g64))
    rtol = 1e-3 if dtype == "float32" else 1e-8
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        scale = float(w.abs().max())
        assert float((a.double() - w).abs().max()) <= rtol * scale
    assert_close(y.detach().double().numpy(), y64.detach().numpy(), rtol=1e-4 if dtype == "float32" else 1e-10)


def test_registered_autograd_of_the_op_matches_the_eager_binding(rng):
    """torch.ops.mmfuse.zoom_shift_numba with torch.library's autograd (what torch.compile
    would use) and the eager binding give the same values and gradients; double backward
    works (the backward is plain torch)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(_draw(rng, (2, 11, 3), np.float64), requires_grad=True)
    g = torch.tensor(_guide(rng, (2, 8, 3), np.float64), requires_grad=True)
    up = torch.from_numpy(rng.standard_normal((2, 11, 3)))
    direct = torch.ops.mmfuse.zoom_shift_numba(x, g, 0.6, -2, None, None, 1e-5)
    bound = mmfuse.zoom_shift(x, g, alpha=0.6, backend="numba")
    assert_close(direct.detach(), bound.detach().numpy(), rtol=0, atol=0)
    for a, b in zip(
        torch.autograd.grad((direct * up).sum(), (x, g)), torch.autograd.grad((bound * up).sum(), (x, g))
    ):
        assert_close(a, b.numpy(), rtol=1e-12, atol=1e-12)
    again = mmfuse.zoom_shift(x, g, alpha=0.6, backend="numba")
    (gx,) = torch.autograd.grad((again * up).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(gx.square().sum(), g)
    assert torch.isfinite(gg).all()


def test_the_op_refuses_masks_its_kernels_would_read_outside(rng):
    """torch.ops.mmfuse.zoom_shift_numba took masks of any shape and dtype, which its kernels
    index as (B', T) booleans unchecked: a (1, T) mask read past its end (NaN outputs), a
    (B, T - 2) one gave wrong values silently, a float one was cast (a review's find).  The
    public call refuses them; the op itself now does too, naming the argument."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(_draw(rng, (4, 6, 3), np.float64))
    g = torch.tensor(_guide(rng, (4, 5, 3), np.float64))
    ok = torch.ones(4, 6, dtype=torch.bool)
    bad = {
        "mask": [torch.ones(1, 6, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool), ok.double()],
        "guide_mask": [torch.ones(4, 6, dtype=torch.bool)],
    }
    for name, masks in bad.items():
        for m in masks:
            args = (m, None) if name == "mask" else (None, m)
            with pytest.raises(ValueError, match=rf"^mmfuse::zoom_shift_numba: {name} must be a bool tensor"):
                torch.ops.mmfuse.zoom_shift_numba(x, g, 1.0, -2, *args, 1e-5)
    got = torch.ops.mmfuse.zoom_shift_numba(x, g, 1.0, -2, ok, None, 1e-5)
    assert_close(got, reference.zoom_shift(x.numpy(), g.numpy(), mask=ok.numpy()))


def test_transforms_and_compile_keep_their_rows():
    """Under torch.func transforms, forward-mode AD and torch.compile the kernels are refused
    (they would read traced tensors' memory): the rows that ran there before still do."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tc

    base = CallInfo(tc, torch.device("cpu"), torch.float32, size=AUTO_IMPORT_ELEMENTS)
    for name in ("torch CPU (CPU kernels)", "numpy or torch CPU, no gradient (CPU kernels)"):
        cond = CONDITIONS[name]
        assert cond(base) is None
        for flags in ({"traced": True}, {"intercepted": True}):
            info = CallInfo(tc, torch.device("cpu"), torch.float32, size=AUTO_IMPORT_ELEMENTS, **flags)
            assert "outside torch.func transforms" in cond(info)
        for device, dtype in (("meta", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16)):
            info = CallInfo(tc, torch.device(device), dtype, size=AUTO_IMPORT_ELEMENTS)
            assert "torch CPU float32/float64 tensors" in cond(info)

    x = torch.randn(*LARGE)
    g = torch.randn(2, 700, 512)
    y = torch.func.vmap(lambda a, b: mmfuse.zoom_shift(a, b), in_dims=(0, 0))(x[:, None], g[:, None])
    want = mmfuse.zoom_shift(x, g, backend="array_api")
    assert_close(y[:, 0], want.numpy(), rtol=1e-4, atol=1e-4)
    found = []
    torch.func.grad(lambda a: (found.append(explain("zoom_shift", a, g).chosen.variant), a.sum())[1])(x)
    assert found == ["autograd (transforms)"]


def test_dispatch_modes_keep_the_torch_rows():
    """Under a TorchDispatchMode (a logging mode, FakeTensorMode) the kernels, which read the
    tensors' memory behind torch's back, are refused: the mode sees mmfuse::zoom_shift, and fake
    tensors get fake results."""
    torch = pytest.importorskip("torch")
    from test_torch_backend import _OpLog as Log
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, g = torch.randn(2, 1025, 512), torch.randn(2, 701, 512)  # shapes no other test calls
    assert explain("zoom_shift", x, g).chosen.variant == "CPU kernels in a torch op"
    with Log() as log:
        assert explain("zoom_shift", x, g).chosen.variant == "custom op"
        assert explain("moments", x).chosen.variant == "autograd"
        mmfuse.zoom_shift(x, g)
    assert "mmfuse.zoom_shift.default" in log.ops
    with FakeTensorMode() as mode:
        fx, fg = mode.from_tensor(x), mode.from_tensor(g)
        y = mmfuse.zoom_shift(fx, fg)
        mean, _ = mmfuse.moments(fx)
        a, _ = mmfuse.align([fx, fg])
    assert y.shape == x.shape and mean.shape == (2, 1, 512) and a.shape == x.shape


# --------------------------------------------------------------------------- helpers


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MMFUSE_BACKEND", "MMFUSE_PREFER")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()
