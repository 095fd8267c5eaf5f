"""Both sides of the alignment operators' size and layout branches (issue 19, tiny calls):

- the NumPy primitives: one block on the calling thread (x of at most ``_BLOCK_BYTES``) or
  batch blocks; the sum of squares by a temporary and a reduction (blocks of at most
  ``_SMALL_ELEMENTS`` elements) or by einsum;
- the torch op ``mmfuse::zoom_shift``: its forward on NumPy views of CPU float32 / float64
  tensors with x contiguous (the core's NumPy primitives), else in torch operations (float16,
  strided x);
- the rounds of ``align``, which skip the spread updates that no later step reads.

Each side is compared with the float64 reference on random inputs, with masks, eps = 0 and a
channel with no spread, in float32 and float64.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

import mmfuse
from mmfuse import reference
from mmfuse._core import align as core
from mmfuse.testing import assert_close

HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _inputs(rng, shape, guide_tokens, dtype, *, masked):
    batch, tokens, channels = shape
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    g = (-1.0 + 0.5 * rng.standard_normal((batch, guide_tokens, channels))).astype(dtype)
    x[:, :, 0] = 1.5  # a channel with no spread (its scale is 1)
    mask = guide_mask = None
    if masked:
        mask = rng.random((batch, tokens)) > 0.3
        mask[:, :2] = True
        guide_mask = rng.random((batch, guide_tokens)) > 0.3
        guide_mask[:, :2] = True
        x[~mask] = 1e6  # padding far off: it must not reach the statistics
    return x, g, mask, guide_mask


def _rtol(dtype):
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


# (shape of x, the guide's tokens) on each side of the NumPy branches: one block with a small
# (square-and-reduce) or a larger (einsum) block, and several blocks
ONE_SMALL = ((4, 6, 5), 7)
ONE_EINSUM = ((2, 50, 50), 40)
BLOCKED = ((17, 128, 80), 96)


@pytest.mark.parametrize("case", [ONE_SMALL, ONE_EINSUM, BLOCKED], ids=["one-small", "one-einsum", "blocked"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_numpy_paths_match_the_reference(rng, case, dtype, masked, eps):
    shape, guide_tokens = case
    x, g, mask, guide_mask = _inputs(rng, shape, guide_tokens, dtype, masked=masked)
    one_block = x.nbytes <= core._BLOCK_BYTES
    assert one_block == (case is not BLOCKED)
    if case is BLOCKED:
        assert x.shape[0] > core._rows_per_block(x) > 0
    else:
        assert (x.size <= core._SMALL_ELEMENTS) == (case is ONE_SMALL)
    alpha = float(rng.uniform(0.3, 1.0))
    got = core.zoom_shift_numpy(x, g, alpha=alpha, mask=mask, guide_mask=guide_mask, eps=eps)
    want = reference.zoom_shift(x, g, alpha=alpha, mask=mask, guide_mask=guide_mask, eps=eps)
    assert got.dtype == x.dtype
    assert_close(got, want.astype(x.dtype), rtol=_rtol(dtype))
    mean, std = core.moments_numpy(x, mask=mask, eps=eps)
    mean_r, std_r = reference.moments(x, mask=mask, eps=eps)
    assert_close(mean, mean_r.astype(x.dtype), rtol=_rtol(dtype))
    assert_close(std, std_r.astype(x.dtype), rtol=_rtol(dtype))
    # the generic Array-API primitives agree with the NumPy ones on every side
    assert_close(got, core.zoom_shift(x, g, alpha=alpha, mask=mask, guide_mask=guide_mask, eps=eps), rtol=_rtol(dtype))


@pytest.mark.parametrize("case", [ONE_SMALL, BLOCKED], ids=["one-block", "blocked"])
def test_blocked_square_sums_both_ways(rng, case, monkeypatch):
    """Blocks above and below the square-and-reduce size give the reference's values (the
    threshold moved so that one input takes each way)."""
    shape, guide_tokens = case
    x, g, mask, guide_mask = _inputs(rng, shape, guide_tokens, "float64", masked=True)
    want = reference.zoom_shift(x, g, mask=mask, guide_mask=guide_mask, eps=0.0)
    for small in (0, 1 << 30):
        monkeypatch.setattr(core, "_SMALL_ELEMENTS", small)
        got = core.zoom_shift_numpy(x, g, mask=mask, guide_mask=guide_mask, eps=0.0)
        assert_close(got, want, rtol=1e-10)


LAYOUTS = [
    ("gauss-seidel", "consensus", 0),
    ("jacobi", "consensus", 0),
    ("gauss-seidel", "hub", 1),
    ("jacobi", "hub", -1),
]


@pytest.mark.parametrize("n_mod", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["gs-consensus", "jacobi-consensus", "gs-hub", "jacobi-hub"])
@pytest.mark.parametrize("rounds", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_align_rounds_match_the_reference(rng, n_mod, layout, rounds, dtype):
    """The rounds (the last one skipping the spread updates no later step reads) match the
    reference, which re-measures the data every step, with masks, eps = 0 and a channel of no
    spread in every modality."""
    schedule, topology, hub = layout
    alpha = 1.0 if rng.random() < 0.5 else float(rng.uniform(0.2, 0.9))
    eps = 0.0 if rng.random() < 0.5 else 1e-5
    if schedule == "jacobi" and topology == "consensus" and n_mod == 2 and alpha == 1.0:
        alpha = 0.6  # legal, but every round swaps the two: keep a case that mixes
    xs, masks = [], []
    for m in range(n_mod):
        x, _, mask, _ = _inputs(rng, (3, 6 + 2 * m, 4), 2, dtype, masked=m % 2 == 1)
        xs.append(x)
        masks.append(mask)
    options = {"rounds": rounds, "alpha": alpha, "schedule": schedule, "topology": topology, "hub": hub, "eps": eps}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del options["hub"]
    want = reference.align(xs, masks=masks, **options)
    for backend in ("array_api", "auto"):
        got = mmfuse.align(xs, masks=masks, backend=backend, **options)
        for y, w in zip(got, want):
            assert_close(y, w.astype(dtype), rtol=_rtol(dtype) * (1 + rounds))


torch = pytest.importorskip("torch")
_ops = importlib.import_module("mmfuse.backends.torch.zoom_shift")


def _torch_case(rng, dtype, *, masked, strided=False):
    x, g, mask, guide_mask = _inputs(rng, (4, 6, 5), 7, np.float64, masked=masked)
    tx, tg = torch.from_numpy(x).to(dtype), torch.from_numpy(g).to(dtype)
    if strided:  # x with the same values, not contiguous
        tx = tx.transpose(0, 2).contiguous().transpose(0, 2)
        assert not tx.is_contiguous()
    tm = None if mask is None else torch.from_numpy(mask)
    tgm = None if guide_mask is None else torch.from_numpy(guide_mask)
    return (x, g, mask, guide_mask), (tx, tg, tm, tgm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("strided", [False, True])
def test_torch_op_forward_both_ways(rng, dtype, masked, eps, strided, custom_align_ops):
    """CPU float32 / float64 with x contiguous: the NumPy primitives on the tensors' memory
    (the core's NumPy bits); strided x: torch operations (the generic core's bits); both match
    the reference, and gradients flow through the op either way."""
    (x, g, mask, guide_mask), (tx, tg, tm, tgm) = _torch_case(rng, dtype, masked=masked, strided=strided)
    assert _ops.on_host((tx, tg), (tm, tgm)) == (not strided)
    alpha = float(rng.uniform(0.3, 1.0))
    opts = {"alpha": alpha, "mask": tm, "guide_mask": tgm, "eps": eps}
    got = mmfuse.zoom_shift(tx, tg, backend="torch", **opts)
    assert got.dtype == dtype and got.shape == tx.shape
    want = reference.zoom_shift(x, g, alpha=alpha, mask=mask, guide_mask=guide_mask, eps=eps)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(got, torch.from_numpy(want).to(dtype), rtol=rtol)
    if not strided:  # the NumPy primitives ran: their bits
        same = core.zoom_shift_numpy(tx.numpy(), tg.numpy(), alpha=alpha, mask=mask, guide_mask=guide_mask, eps=eps)
        assert torch.equal(got, torch.from_numpy(same))
    leaf = tx.clone().requires_grad_(True)
    y = mmfuse.zoom_shift(leaf, tg, backend="torch", **opts)
    assert torch.equal(y.detach(), got)
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == tx.shape


@pytest.mark.parametrize("masked", [False, True])
def test_torch_op_float16_runs_in_torch(rng, masked):
    """float16 tensors take the torch operations (statistics in float32, one rounding)."""
    (_, g, mask, guide_mask), (tx, tg, tm, tgm) = _torch_case(rng, torch.float16, masked=masked)
    assert not _ops.on_host((tx, tg), (tm, tgm))
    got = mmfuse.zoom_shift(tx, tg, mask=tm, guide_mask=tgm, backend="torch")
    assert got.dtype == torch.float16
    want = reference.zoom_shift(tx.double().numpy(), g, mask=mask, guide_mask=guide_mask)
    assert_close(got, torch.from_numpy(want).to(torch.float16), rtol=2e-3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("big", [0, 1], ids=["all-one-block", "one-larger"])
def test_align_keeps_centred_values_only_for_small_inputs(rng, dtype, big):
    """Every input within one block: the map reuses the statistics' x - pivot (NumPy: in
    place); one larger input: every map forms it again.  Both match the reference, with
    masks, eps = 0 and channels of no spread."""
    shapes = [(17, 6, 80), (17, 9, 80)]
    if big:
        shapes[1] = BLOCKED[0]
    xs, masks = [], []
    for m, shape in enumerate(shapes):
        x, _, mask, _ = _inputs(rng, shape, 2, dtype, masked=m == 1)
        xs.append(x)
        masks.append(mask)
    assert all(core._one_block(x) for x in xs) == (not big)
    for eps in (1e-5, 0.0):
        want = reference.align(xs, masks=masks, rounds=2, alpha=0.7, eps=eps)
        for backend in ("array_api", "auto", *(("numba",) if HAVE_NUMBA else ())):
            got = mmfuse.align(xs, masks=masks, rounds=2, alpha=0.7, eps=eps, backend=backend)
            for y, w in zip(got, want):
                assert_close(y, w.astype(dtype), rtol=3 * _rtol(dtype))


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("count", [49, 91, 6, 64])
def test_numba_constant_channel_has_no_spread(rng, dtype, count):
    """numba's statistics of a channel of equal values over ``count`` unmasked tokens: its
    mean exactly and variance exactly 0 (49 and 91 are counts where times 1/count is off by an
    ulp), so at eps = 0 the zero-spread rule keeps the scale at 1 and masked padding is
    mapped as the reference maps it."""
    x, g, _, guide_mask = _inputs(rng, (3, count + 5, 5), 8, dtype, masked=True)
    mask = np.zeros(x.shape[:2], dtype=bool)
    mask[:, :count] = True
    x[:, :, 0] = 1.5
    x[:, count:] = 1e6  # padding
    g[:, :, 0] = -2.0  # the guide's channel 0 has no spread either
    mean, std = mmfuse.moments(x, mask=mask, eps=0.0, backend="numba")
    assert np.all(mean[:, 0, 0] == x.dtype.type(1.5)) and np.all(std[:, 0, 0] == 0)
    want = reference.zoom_shift(x, g, mask=mask, guide_mask=guide_mask, eps=0.0)
    got = mmfuse.zoom_shift(x, g, mask=mask, guide_mask=guide_mask, eps=0.0, backend="numba")
    assert_close(got, want.astype(x.dtype), rtol=_rtol(dtype))
    ys = mmfuse.align([x, g], masks=[mask, guide_mask], eps=0.0, rounds=1, backend="numba")
    for y, w in zip(ys, reference.align([x, g], masks=[mask, guide_mask], eps=0.0, rounds=1)):
        assert_close(y, w.astype(x.dtype), rtol=_rtol(dtype))


# An eps from 2**-120 on keeps every spread positive, so the map rules skip their no-spread
# tests there (core.spreads_positive): both routes must give the same bits, and a smaller eps
# (2**-126 on from the public calls, less from a direct call of an op) must take the tests.


def _both_routes(monkeypatch, fn):
    """``fn()`` as it runs, then with every spread taken as possibly 0 (the core's rule, which
    the backends' backwards read through core.live_lanes)."""
    fast = fn()
    monkeypatch.setattr(core, "spreads_positive", lambda eps: False)
    tested = fn()
    monkeypatch.undo()
    return fast, tested


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps", [1e-5, 2.0**-120, 3.0])
def test_positive_spreads_skip_the_tests_with_the_same_bits(rng, monkeypatch, dtype, eps):
    x, g, _, _ = _inputs(rng, (5, 9, 6), 7, dtype, masked=False)
    x[0, :, 1] = np.nan  # a NaN lane stays NaN either way
    x[1, :, 2] = 1e17 * rng.standard_normal(9)  # a spread far from sqrt(eps)
    xs = [x, g, (0.5 * x[:, :4] + 2.0).astype(dtype)]
    assert core.spreads_positive(eps)
    for fn in (
        lambda: core.zoom_shift_numpy(x, g, eps=eps),
        lambda: core.zoom_shift_numpy(x, g, alpha=0.3, eps=eps),
        lambda: core.zoom_shift(x, g, alpha=0.7, eps=eps),
        lambda: core.align_with(core.NUMPY, xs, rounds=3, alpha=0.6, schedule="gauss-seidel",
                                topology="consensus", hub=0, axis=-2, masks=None, eps=eps),
        lambda: core.align_with(core.GENERIC, xs, rounds=2, alpha=1.0, schedule="jacobi",
                                topology="consensus", hub=0, axis=-2, masks=None, eps=eps),
    ):  # fmt: skip
        fast, tested = _both_routes(monkeypatch, fn)
        for a, b in zip(fast if isinstance(fast, list) else [fast], tested if isinstance(tested, list) else [tested]):
            np.testing.assert_array_equal(a, b)


def test_subnormal_scales_flushed_to_zero_leave_outputs_finite(monkeypatch):
    """Where the CPU flushes subnormal results to zero (XLA's default on the CPU;
    torch.set_flush_denormal, which sets it for NumPy on this thread too), a scale between a
    spread near float32's largest and one of sqrt(eps) must not be flushed at an eps that skips
    the tests: at 2**-126 the zoomed spread became sqrt(eps) / 0 and the outputs NaN.  The
    core's own rule pinned (backend "array_api"): "auto" takes numba's kernels once any test
    has imported numba, and the core's rule went untested in a full run (a mutation review);
    the public default call as well."""
    x0 = np.zeros((1, 2, 2), np.float32)
    x0[0, :, 0] = [9.5e18, -9.5e18]  # a spread of 9.5e18, the other channel ordinary
    x0[0, :, 1] = [1.0, 2.0]
    x1 = np.zeros((1, 2, 2), np.float32)  # a guide without spread in channel 0
    x1[0, :, 1] = [0.0, 1.0]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers")
    try:
        for eps in (2.0**-126, 2.0**-124, 2.0**-120, 2.0**-119):
            for backend in ("array_api", None):
                fast, tested = _both_routes(
                    monkeypatch, lambda e=eps, b=backend: mmfuse.align([x0, x1], rounds=3, eps=e, backend=b)
                )
                for a, b in zip(fast, tested):
                    assert np.isfinite(a).all(), (eps, backend)
                    np.testing.assert_array_equal(a, b)
    finally:
        torch.set_flush_denormal(False)


def test_zoomed_spread_of_a_lane_without_spread_is_root_eps_on_every_path():
    """An eps too small to keep every spread positive (the tested route): a lane with
    z = s sigma = 0 keeps sigma = sqrt(eps) and share 0, on NumPy's delegated branch and on
    the other namespaces' (torch here) alike (a mutation review: the generic branch's
    sqrt(eps) turned 0 passed, where only JAX without float64 or a flushing CPU reaches it)."""
    torch = pytest.importorskip("torch")
    from mmfuse._namespace import array_namespace

    eps = 1e-50
    assert not core.spreads_positive(eps)
    sigma, share, s = np.array([0.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.5]), np.array([1.0, 1.0, 0.25])
    want_sigma, want_share = core._zoomed_spread(np, sigma, share, s, eps)
    assert want_sigma[0] == np.sqrt(eps) and want_share[0] == 0.0
    t = [torch.from_numpy(a) for a in (sigma, share, s)]
    got_sigma, got_share = core._zoomed_spread(array_namespace(t[0]), *t, eps)
    np.testing.assert_array_equal(got_sigma.numpy(), want_sigma)
    np.testing.assert_array_equal(got_share.numpy(), want_share)


def test_an_eps_lost_to_underflow_takes_the_no_spread_tests(rng):
    """eps = 1e-50 adds 0 to a float32 variance: a constant lane has spread 0, and the
    tests keep its scale at 1 (the skip would divide by 0: inf, and NaN outputs)."""
    x, g, _, _ = _inputs(rng, (3, 6, 4), 5, "float32", masked=False)  # channel 0 constant
    assert not core.spreads_positive(1e-50)
    y = core.zoom_shift_numpy(x, g, eps=1e-50)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[:, :, 0], np.broadcast_to(g[:, :, :1].mean(axis=1), (3, 6)), rtol=1e-6)
    ys = core.align_with(core.NUMPY, [x, g], rounds=2, alpha=1.0, schedule="gauss-seidel",
                         topology="consensus", hub=0, axis=-2, masks=None, eps=1e-50)  # fmt: skip
    assert all(np.isfinite(y).all() for y in ys)
    # the op's closed-form backward too (a direct call: the public one refuses this eps)
    tx, tg = torch.from_numpy(x).requires_grad_(), torch.from_numpy(g).requires_grad_()
    y = torch.ops.mmfuse.zoom_shift(tx, tg, 1.0, -2, None, None, 1e-50)
    w = torch.from_numpy(rng.standard_normal(y.shape).astype(np.float32))
    gx, gg = torch.autograd.grad((y * w).sum(), [tx, tg])
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_op_backward_skips_the_tests_with_the_same_bits(rng, monkeypatch, alpha, masked):
    """mmfuse::zoom_shift's closed-form backward (and its double backward) at an eps that
    keeps every spread positive: the same gradients without the no-spread guards as with."""
    _, (tx, tg, tm, tgm) = _torch_case(rng, torch.float64, masked=masked)  # (a constant channel)

    def grads():
        x, g = tx.clone().requires_grad_(), tg.clone().requires_grad_()
        y = _ops.zoom_shift(x, g, alpha=alpha, mask=tm, guide_mask=tgm, eps=1e-5)
        w = torch.from_numpy(np.random.default_rng(5).standard_normal(tuple(y.shape)))
        gx, gg = torch.autograd.grad((y * w).sum(), [x, g], create_graph=True)
        ggx, ggg = torch.autograd.grad((gx * gx).sum() + gg.sum(), [x, g])
        return [a.detach() for a in (y, gx, gg, ggx, ggg)]

    fast, tested = _both_routes(monkeypatch, grads)
    for a, b in zip(fast, tested):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
