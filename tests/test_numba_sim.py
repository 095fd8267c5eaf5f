"""The numba-cuda kernels under numba's CUDA simulator, against ``mmfuse.reference``.

CI has no GPU, so these tests launch the kernels (through the device drivers
``lowrank_fusion_device`` / ``cp_fusion_device``) on numba device arrays made with
``cuda.to_device`` while ``NUMBA_ENABLE_CUDASIM=1``.  The simulator must be on before
``numba.cuda`` is first imported, so this module sets the variable before importing numba, and
skips itself when another module imported ``numba.cuda`` earlier without it (a plain ``numba``
import is fine: the module has numba re-read its configuration).  (The variable
stays set for the rest of the session: numba reads it once.)

The simulator runs every GPU thread as a Python thread, so shapes are tiny and the tile edge
is small (8, with one case at 4 and one at the production 16) so that several tiles and ragged
edges are exercised without many blocks.

A second test compiles every kernel to PTX in a subprocess without the simulator when NVVM is
installed (``nvidia-cuda-nvcc`` + ``nvidia-cuda-nvrtc``, or a CUDA toolkit found through
``CUDA_HOME``), which type-checks the kernels as the real compiler sees them; it skips otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

if "numba.cuda" not in sys.modules:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:  # e.g. the CPU-kernel tests ran first: re-read the variable
        sys.modules["numba"].core.config.reload_config()

pytest.importorskip("numba")
pytest.importorskip("numba_cuda")

from numba import cuda

import mmfuse
from mmfuse import reference
from mmfuse.backends import available
from mmfuse.testing import assert_close

nb = pytest.importorskip("mmfuse.backends.numba")

if not nb.simulator_enabled():
    pytest.skip(
        "numba.cuda was imported before this module could enable NUMBA_ENABLE_CUDASIM",
        allow_module_level=True,
    )

pytestmark = [
    # The simulator may flag tiny grids; the message is numba's NumbaPerformanceWarning.
    pytest.mark.filterwarnings("ignore:Grid size .* will likely result in GPU under-utilization"),
]


# ----------------------------------------------------------------------------- helpers


def nan_empty(shape, dtype):
    """Workspace allocator that poisons: nothing may rely on fresh memory being zero."""
    return cuda.to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype))


def dev(a, dtype):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a, dtype=dtype))


def host(a):
    return None if a is None else a.copy_to_host()


def draw_case(rng, *, n_mod=None, batch=None):
    n_mod = int(rng.integers(1, 5)) if n_mod is None else n_mod
    batch = int(rng.choice([1, 3, 7, 9])) if batch is None else batch
    dims = [int(d) for d in rng.integers(1, 10, size=n_mod)]
    rank = int(rng.integers(1, 4))
    out_dim = int(rng.integers(1, 8))
    append_one = bool(rng.integers(0, 2))
    return n_mod, batch, dims, rank, out_dim, append_one


def draw_inputs(rng, batch, dims, *, with_present):
    xs = [rng.standard_normal((batch, d)) for d in dims]
    present = None
    if with_present:
        present = rng.random((batch, len(dims))) > 0.35
        for m, x in enumerate(xs):
            x[~present[:, m]] = np.nan  # absent features must never be read
    return xs, present


def run_lowrank(xs, factors, weights, bias, present, append_one, dtype, tile):
    d_xs = [dev(x, dtype) for x in xs]
    d_fs = [dev(f, dtype) for f in factors]
    d_w, d_b, d_p = dev(weights, dtype), dev(bias, dtype), dev(present, np.bool_)
    out = cuda.to_device(np.full((xs[0].shape[0], factors[0].shape[2]), np.nan, dtype=dtype))
    nb.lowrank_fusion_device(
        d_xs, d_fs, d_w, d_b, out, append_one=append_one, present=d_p, empty=nan_empty, tile=tile
    )
    for a, d in [*zip(xs, d_xs), *zip(factors, d_fs), (weights, d_w), (bias, d_b), (present, d_p)]:
        if a is not None:  # inputs are never written
            np.testing.assert_array_equal(host(d), np.asarray(a, dtype=d.dtype))
    return out.copy_to_host()


def run_cp(xs, weights, cp_factors, bias, present, append_one, dtype, tile):
    d_xs = [dev(x, dtype) for x in xs]
    d_fs = [dev(f, dtype) for f in cp_factors]
    d_w, d_b, d_p = dev(weights, dtype), dev(bias, dtype), dev(present, np.bool_)
    out = cuda.to_device(np.full((xs[0].shape[0], cp_factors[-1].shape[0]), np.nan, dtype=dtype))
    nb.cp_fusion_device(
        d_xs, d_w, d_fs, d_b, out, append_one=append_one, present=d_p, empty=nan_empty, tile=tile
    )
    for a, d in [*zip(xs, d_xs), *zip(cp_factors, d_fs), (weights, d_w), (bias, d_b), (present, d_p)]:
        if a is not None:
            np.testing.assert_array_equal(host(d), np.asarray(a, dtype=d.dtype))
    return out.copy_to_host()


def lowrank_params(rng, dims, rank, out_dim, append_one, *, with_weights, with_bias):
    extra = 1 if append_one else 0
    factors = [rng.standard_normal((rank, d + extra, out_dim)) / np.sqrt(d + extra) for d in dims]
    weights = rng.standard_normal(rank) if with_weights else None
    bias = rng.standard_normal(out_dim) if with_bias else None
    return factors, weights, bias


def cp_params(rng, dims, rank, out_dim, append_one, *, with_weights):
    extra = 1 if append_one else 0
    factors = [rng.standard_normal((d + extra, rank)) / np.sqrt(d + extra) for d in dims]
    factors.append(rng.standard_normal((out_dim, rank)))
    weights = rng.standard_normal(rank) if with_weights else None
    return weights, factors


# (seed, M, B, dtype, tile): random sizes from the seed; fixed M / B where given.
CASES = [
    (0, None, None, "float64", 8),
    (1, None, None, "float32", 8),
    (2, None, 1, "float64", 8),
    (3, 8, 3, "float64", 8),
    (4, 8, 1, "float32", 8),
    (5, 2, 9, "float32", 4),
    (6, 3, 5, "float64", 16),
    (7, 1, 7, "float64", 8),
]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("seed", "n_mod", "batch", "dtype", "tile"), CASES)
def test_lowrank_matches_reference(seed, n_mod, batch, dtype, tile):
    rng = np.random.default_rng(seed)
    n_mod, batch, dims, rank, out_dim, append_one = draw_case(rng, n_mod=n_mod, batch=batch)
    if n_mod == 8:  # keep the simulator's block count small
        rank, out_dim = 2, 3
    xs, present = draw_inputs(rng, batch, dims, with_present=seed % 2 == 0)
    factors, weights, bias = lowrank_params(
        rng, dims, rank, out_dim, append_one, with_weights=seed % 3 != 0, with_bias=seed % 4 != 1
    )
    got = run_lowrank(xs, factors, weights, bias, present, append_one, dtype, tile)
    want = reference.lowrank_fusion(xs, factors, weights, bias, append_one=append_one, present=present)
    assert np.all(np.isfinite(got)), "an output element was not written (still NaN)"
    assert_close(got, want, dtype=np.dtype(dtype), err_msg=f"dims={dims} R={rank} h={out_dim}")


@pytest.mark.parametrize(("seed", "n_mod", "batch", "dtype", "tile"), CASES)
def test_cp_matches_reference(seed, n_mod, batch, dtype, tile):
    rng = np.random.default_rng(100 + seed)
    n_mod, batch, dims, rank, out_dim, append_one = draw_case(rng, n_mod=n_mod, batch=batch)
    if n_mod == 8:
        rank = 2
    xs, present = draw_inputs(rng, batch, dims, with_present=seed % 2 == 1)
    weights, factors = cp_params(rng, dims, rank, out_dim, append_one, with_weights=seed % 3 != 1)
    bias = rng.standard_normal(out_dim) if seed % 4 != 2 else None
    got = run_cp(xs, weights, factors, bias, present, append_one, dtype, tile)
    want = reference.cp_fusion(xs, (weights, factors), bias, append_one=append_one, present=present)
    assert np.all(np.isfinite(got)), "an output element was not written (still NaN)"
    assert_close(got, want, dtype=np.dtype(dtype), err_msg=f"dims={dims} R={rank} h={out_dim}")


def test_cp_rank_and_output_span_several_tiles():
    """R and h larger than the tile: the fused kernel's rank loop and output grid are tiled."""
    rng = np.random.default_rng(7)
    dims, rank, out_dim = [5, 3], 11, 10
    xs, _ = draw_inputs(rng, 5, dims, with_present=False)
    weights, factors = cp_params(rng, dims, rank, out_dim, True, with_weights=True)
    bias = rng.standard_normal(out_dim)
    got = run_cp(xs, weights, factors, bias, None, True, "float64", 4)
    assert_close(got, reference.cp_fusion(xs, (weights, factors), bias), dtype=np.dtype("float64"))


def test_lowrank_combine_spans_several_thread_blocks():
    """B h = 300 outputs: more than one combine block of 256 threads, the last one partial (the
    other cases have at most 63 outputs, one block, so a grid rounded down went unseen)."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    dims = [3, 4]
    xs, present = draw_inputs(rng, 30, dims, with_present=True)
    factors, weights, bias = lowrank_params(rng, dims, 2, 10, True, with_weights=True, with_bias=True)
    got = run_lowrank(xs, factors, weights, bias, present, True, "float64", 8)
    assert np.all(np.isfinite(got)), "an output element was not written (still NaN)"
    assert_close(got, reference.lowrank_fusion(xs, factors, weights, bias, present=present), dtype=np.dtype("float64"))


def test_workspace_rows_follow_its_byte_budget():
    """The projection workspace holds WORKSPACE_BYTES: rows = budget / (M width itemsize),
    at least MIN_CHUNK_ROWS, at most 65535 tiles (the grid's y extent), the batch where it
    fits (an itemsize dropped had made it 4-8x the budget, which no value shows)."""
    budget = nb.WORKSPACE_BYTES
    assert nb._chunk_rows(10**7, 2, 64, 8, 16) == budget // (2 * 64 * 8)
    assert nb._chunk_rows(10**7, 3, 48, 4, 16) == budget // (3 * 48 * 4)
    assert nb._chunk_rows(10**7, 8, 10**6, 8, 16) == nb.MIN_CHUNK_ROWS
    assert nb._chunk_rows(10**9, 1, 1, 4, 2) == 65535 * 2
    assert nb._chunk_rows(100, 2, 64, 8, 16) == 100


def test_batch_chunks(monkeypatch):
    """A workspace smaller than the batch: chunks of 3 rows, the last one ragged."""
    monkeypatch.setattr(nb, "WORKSPACE_BYTES", 1)
    monkeypatch.setattr(nb, "MIN_CHUNK_ROWS", 3)
    rng = np.random.default_rng(11)
    dims = [4, 2]
    xs, present = draw_inputs(rng, 7, dims, with_present=True)
    factors, weights, bias = lowrank_params(rng, dims, 2, 3, True, with_weights=True, with_bias=True)
    got = run_lowrank(xs, factors, weights, bias, present, True, "float64", 8)
    want = reference.lowrank_fusion(xs, factors, weights, bias, present=present)
    assert_close(got, want, dtype=np.dtype("float64"))
    cp_w, cp_f = cp_params(rng, dims, 3, 2, True, with_weights=True)
    got = run_cp(xs, cp_w, cp_f, bias[:2], present, True, "float64", 8)
    want = reference.cp_fusion(xs, (cp_w, cp_f), bias[:2], present=present)
    assert_close(got, want, dtype=np.dtype("float64"))


def record_launches(monkeypatch, factory):
    """Record the grid of every launch of the kernels that ``nb.<factory>`` builds (``kernels``
    or ``align_kernels``): a list of (kernel name, grid) that fills as the drivers launch."""
    launches = []

    class Recorded:
        def __init__(self, kern):
            self.kern = kern

        def __getattr__(self, name):
            kernel = getattr(self.kern, name)

            class Launcher:
                def __getitem__(self, config):
                    grid = config[0] if isinstance(config[0], tuple) else (config[0],)
                    launches.append((name, grid))
                    return kernel[config]

            return Launcher()

    real = getattr(nb, factory)
    monkeypatch.setattr(nb, factory, lambda *args, **kw: Recorded(real(*args, **kw)))
    return launches


def test_empty_outputs_and_ranks_launch_no_empty_grid(monkeypatch):
    """h = 0 or R = 0 (legal: the layers take out_dim = 0 and rank = 0): the drivers divided by
    zero threads (h = 0) or launched grids with an extent of 0, which CUDA refuses and the
    simulator hides (a code review's find).  Every launch now has a grid of at least one
    block, and the results are the reference's (the bias, for R = 0)."""
    launches = record_launches(monkeypatch, "kernels")
    rng = np.random.default_rng()
    dims = [3, 2]
    xs, _ = draw_inputs(rng, 5, dims, with_present=False)
    for rank, out_dim in ((2, 0), (0, 3)):
        factors, weights, bias = lowrank_params(rng, dims, rank, out_dim, True, with_weights=True, with_bias=True)
        got = run_lowrank(xs, factors, weights, bias, None, True, "float64", 8)
        assert_close(got, reference.lowrank_fusion(xs, factors, weights, bias), dtype=np.dtype("float64"))
        cp_w, cp_f = cp_params(rng, dims, rank, out_dim, True, with_weights=True)
        got = run_cp(xs, cp_w, cp_f, bias, None, True, "float64", 8)
        assert_close(got, reference.cp_fusion(xs, (cp_w, cp_f), bias), dtype=np.dtype("float64"))
    assert launches and all(min(grid) >= 1 for _, grid in launches), launches


def test_empty_batches_and_channels_launch_no_empty_grid(monkeypatch):
    """B = 0 (the public functions take it) and, for the statistics, C' = 0: nothing to
    launch.  A fusion driver's chunk of 0 rows had looped for ever (range with step 0), and a
    statistics launch of 0 blocks, which CUDA refuses, passed the simulator (a mutation
    review's finds)."""
    launches = record_launches(monkeypatch, "kernels")
    align_launches = record_launches(monkeypatch, "align_kernels")
    rng = np.random.default_rng()
    dims = [3, 2]
    xs = [np.empty((0, d)) for d in dims]
    factors, weights, bias = lowrank_params(rng, dims, 2, 3, True, with_weights=True, with_bias=True)
    assert run_lowrank(xs, factors, weights, bias, None, True, "float64", 8).shape == (0, 3)
    cp_w, cp_f = cp_params(rng, dims, 2, 3, True, with_weights=True)
    assert run_cp(xs, cp_w, cp_f, bias, None, True, "float64", 8).shape == (0, 3)
    for shape in ((0, 5, 3), (2, 5, 0)):
        x = dev(rng.standard_normal(shape), "float64")
        stats = [cuda.to_device(np.empty((shape[0], shape[2]))) for _ in range(2)]
        nb.moments_device(x, None, 1e-5, *stats, empty=nan_empty, channels=4, lanes=2)
        out = cuda.to_device(np.empty(shape))
        guide = dev(rng.standard_normal((shape[0], 4, shape[2])), "float64")
        nb.zoom_shift_device(x, guide, out, alpha=0.5, empty=nan_empty, channels=4, lanes=2)
    assert all(min(grid) >= 1 for _, grid in launches + align_launches), launches + align_launches


def test_repeated_runs_are_bit_identical():
    rng = np.random.default_rng(5)
    dims = [3, 6, 2]
    xs, present = draw_inputs(rng, 5, dims, with_present=True)
    factors, weights, bias = lowrank_params(rng, dims, 3, 4, True, with_weights=True, with_bias=True)
    first = run_lowrank(xs, factors, weights, bias, present, True, "float32", 8)
    second = run_lowrank(xs, factors, weights, bias, present, True, "float32", 8)
    assert first.tobytes() == second.tobytes()
    cp_w, cp_f = cp_params(rng, dims, 3, 4, True, with_weights=True)
    first = run_cp(xs, cp_w, cp_f, bias, present, True, "float32", 8)
    second = run_cp(xs, cp_w, cp_f, bias, present, True, "float32", 8)
    assert first.tobytes() == second.tobytes()


def test_strided_inputs_to_the_kernels():
    """The kernels index through strides: a Fortran-ordered x gives the same result."""
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((5, 4)), rng.standard_normal((5, 3))]
    factors, weights, bias = lowrank_params(rng, [4, 3], 2, 3, True, with_weights=True, with_bias=True)
    d_xs = [cuda.to_device(np.asfortranarray(x)) for x in xs]
    out = cuda.to_device(np.full((5, 3), np.nan))
    nb.lowrank_fusion_device(d_xs, [dev(f, "float64") for f in factors], dev(weights, "float64"),
                             dev(bias, "float64"), out, empty=nan_empty, tile=8)
    assert_close(out.copy_to_host(), reference.lowrank_fusion(xs, factors, weights, bias), dtype=np.dtype("float64"))


def test_driver_rejects_mixed_or_half_dtypes():
    x = cuda.to_device(np.ones((2, 3), dtype=np.float32))
    f = cuda.to_device(np.ones((1, 4, 2), dtype=np.float64))
    out = cuda.to_device(np.zeros((2, 2), dtype=np.float64))
    with pytest.raises(TypeError, match="all arrays must have dtype float64, got float32"):
        nb.lowrank_fusion_device([x], [f], None, None, out)
    with pytest.raises(TypeError, match="numba kernels run in float32 or float64, got float16"):
        nb.kernels(np.float16)
    a, c = cuda.to_device(np.ones((4, 2))), cuda.to_device(np.ones((2, 2)))
    with pytest.raises(TypeError, match="all arrays must have dtype float64, got float32"):
        nb.cp_fusion_device([x], None, [a, c], None, out)
    x3, g3 = cuda.to_device(np.ones((1, 4, 2), np.float32)), cuda.to_device(np.ones((1, 3, 2)))
    with pytest.raises(TypeError, match="x, guide and out must share one dtype, got float32, float64, float32"):
        nb.zoom_shift_device(x3, g3, cuda.to_device(np.zeros((1, 4, 2), np.float32)), channels=2, lanes=2)
    with pytest.raises(TypeError, match="x, guide and out must share one dtype, got float32, float32, float64"):
        nb.zoom_shift_device(x3, x3, cuda.to_device(np.zeros((1, 4, 2))), channels=2, lanes=2)


def test_drivers_refuse_a_block_cuda_cannot_launch():
    """The device drivers' ``tile`` (a tile x tile block) and ``channels`` x ``lanes`` (the
    statistics' block) past CUDA's 1024 threads, or not positive ints, had reached the launch
    and failed with CUDA's "too many resources requested" (a review's find); refused naming
    them.  The largest blocks still build."""
    x = cuda.to_device(np.ones((2, 3), dtype=np.float64))
    f = cuda.to_device(np.ones((1, 4, 2), dtype=np.float64))
    out = cuda.to_device(np.zeros((2, 2), dtype=np.float64))
    for tile in (33, 0, 2.0, True):
        with pytest.raises(ValueError, match=r"^tile \* tile must be positive ints with at most 1024 threads"):
            nb.lowrank_fusion_device([x], [f], None, None, out, tile=tile)
    x3 = cuda.to_device(np.ones((2, 5, 3), dtype=np.float64))
    mean, std = cuda.to_device(np.zeros((2, 3))), cuda.to_device(np.zeros((2, 3)))
    for channels, lanes in ((64, 32), (0, 8), (32, -1)):
        with pytest.raises(ValueError, match=r"^channels \* lanes must be positive ints"):
            nb.moments_device(x3, None, 1e-5, mean, std, channels=channels, lanes=lanes)
    assert nb.kernels(np.float64, np.int64(32)) is not None and nb.align_kernels(np.float64, 32, 32) is not None


# ----------------------------------------------------------------------------- Zoom and Shift


def _align_ref():
    import importlib

    return importlib.import_module("mmfuse.reference.align")


@pytest.mark.parametrize(
    ("seed", "shape", "t_guide", "dtype", "masked", "alpha", "eps"),
    [
        (0, (3, 7, 6), 5, "float64", True, 1.0, 1e-5),
        (1, (1, 9, 5), 4, "float32", False, 0.3, 1e-5),
        (2, (2, 5, 3), 6, "float64", True, 0.7, 0.0),
        (3, (2, 4, 9), 3, "float32", True, 1.0, 1e-3),
    ],
)
def test_moments_and_zoom_shift_match_reference(seed, shape, t_guide, dtype, masked, alpha, eps):
    ref = _align_ref()
    rng = np.random.default_rng(seed)
    batch, tokens, chans = shape
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    guide = -1.0 + 0.5 * rng.standard_normal((batch, t_guide, chans))
    mask = gmask = None
    if masked:
        mask = rng.random((batch, tokens)) > 0.3
        mask[:, 0] = True
        gmask = rng.random((batch, t_guide)) > 0.3
        gmask[:, -1] = True
    dt = np.dtype(dtype)
    # moments: masked tokens hold NaN and must never be read
    xn = x.copy() if mask is None else np.where(mask[..., None], x, np.nan)
    mean = cuda.to_device(np.full((batch, chans), np.nan, dt))
    std = cuda.to_device(np.full((batch, chans), np.nan, dt))
    d_x = dev(xn, dt)
    nb.moments_device(d_x, dev(mask, np.bool_), eps, mean, std, empty=nan_empty, channels=4, lanes=2)
    np.testing.assert_array_equal(host(d_x), xn.astype(dt))
    want_mean, want_std = ref.moments(xn, mask=mask, eps=eps)
    assert_close(mean.copy_to_host(), want_mean[:, 0, :], dtype=dt)
    assert_close(std.copy_to_host(), want_std[:, 0, :], dtype=dt)
    # zoom_shift: every token is mapped (masked ones too), so x must be finite here
    out = cuda.to_device(np.full(shape, np.nan, dt))
    d_x, d_g = dev(x, dt), dev(guide, dt)
    nb.zoom_shift_device(d_x, d_g, out, alpha=alpha, mask=dev(mask, np.bool_), guide_mask=dev(gmask, np.bool_),
                         eps=eps, empty=nan_empty, channels=4, lanes=2)
    np.testing.assert_array_equal(host(d_x), x.astype(dt))
    np.testing.assert_array_equal(host(d_g), guide.astype(dt))
    got = out.copy_to_host()
    assert np.all(np.isfinite(got)), "an output element was not written"
    want = ref.zoom_shift(x, guide, alpha=alpha, mask=mask, guide_mask=gmask, eps=eps)
    assert_close(got, want, dtype=dt)
    out2 = cuda.to_device(np.full(shape, np.nan, dt))
    nb.zoom_shift_device(d_x, d_g, out2, alpha=alpha, mask=dev(mask, np.bool_), guide_mask=dev(gmask, np.bool_),
                         eps=eps, empty=nan_empty, channels=4, lanes=2)
    assert out2.copy_to_host().tobytes() == got.tobytes()


def test_cuda_kernels_keep_a_large_mean_against_a_small_spread():
    """float32 data 1e4 + 1e-2 noise: the statistics about a pivot and the map about it keep
    the spread to float32's resolution (a map folded into x s + t lost 6% of the output's)."""
    ref = _align_ref()
    rng = np.random.default_rng(12)
    big = (1e4 + 1e-2 * rng.standard_normal((3, 33, 5))).astype(np.float32)
    unit = rng.standard_normal((3, 17, 5)).astype(np.float32)
    mean = cuda.to_device(np.full((3, 5), np.nan, np.float32))
    std = cuda.to_device(np.full((3, 5), np.nan, np.float32))
    nb.moments_device(dev(big, np.float32), None, 1e-5, mean, std, empty=nan_empty, channels=4, lanes=2)
    want_mean, want_std = ref.moments(big)
    assert np.all(np.abs(mean.copy_to_host() - want_mean[:, 0, :]) <= 2 * np.spacing(np.float32(1e4)))
    assert_close(std.copy_to_host(), want_std[:, 0, :], rtol=1e-3)
    out = cuda.to_device(np.full(big.shape, np.nan, np.float32))
    nb.zoom_shift_device(dev(big, np.float32), dev(unit, np.float32), out, alpha=1.0, empty=nan_empty,
                         channels=4, lanes=2)
    want = ref.zoom_shift(big, unit)
    err = np.abs(out.copy_to_host() - want).max() / want.std()
    assert err < 1e-3, err


@pytest.mark.parametrize("alpha", [0.5, 0.7])
@pytest.mark.parametrize(("dtype", "mean"), [(np.float32, 1e4), (np.float64, 1e12 / 3)])
def test_zoom_shift_partial_step_where_the_means_cancel(alpha, dtype, mean):
    """Means near m and -m (unit spreads): a partial step's target near 0 within a few ulps
    of the outputs.  The guide's mean rounded to float32 first (its buffer in x's dtype) left
    alpha times half an ulp of 1e4 there (6e-5 of the outputs' size).  In float64 (means
    +-1e12 / 3, whose float64 ulps the float32 case cannot show) a target formed about x's
    pivot instead of its mean was 3e-5 off (a mutation review's find)."""
    rng = np.random.default_rng(13)
    x = (mean + rng.standard_normal((3, 9, 5))).astype(dtype)
    g = (-mean + rng.standard_normal((3, 7, 5))).astype(dtype)
    out = cuda.to_device(np.full(x.shape, np.nan, dtype))
    nb.zoom_shift_device(dev(x, dtype), dev(g, dtype), out, alpha=alpha, empty=nan_empty,
                         channels=4, lanes=2)  # fmt: skip
    ref = _align_ref()
    if dtype == np.float32:
        mx, sx = ref.moments(x)
        mg, sg = ref.moments(g)
        want = (x.astype(np.float64) - mx) * (sg / sx) ** alpha + ((1 - alpha) * mx + alpha * mg)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(out.copy_to_host() - want) <= 4 * ulp + 1e-7)
    else:  # the oracle's own float64 result (exact statistics, the map about x's mean)
        want = ref.zoom_shift(x, g, alpha=alpha)
        assert np.abs(out.copy_to_host() - want).max() <= 16 * np.spacing(np.abs(want).max())


def test_zoom_shift_constant_channel_is_shifted_not_zoomed():
    """eps = 0 and a channel with no spread: scale 1 (no division by zero), as the core does."""
    ref = _align_ref()
    x = np.ones((1, 4, 2))
    x[0, :, 1] = [1.0, 2.0, 3.0, 5.0]
    guide = np.arange(6.0).reshape(1, 3, 2)
    out = cuda.to_device(np.full(x.shape, np.nan))
    nb.zoom_shift_device(dev(x, "float64"), dev(guide, "float64"), out, eps=0.0, empty=nan_empty, channels=2, lanes=2)
    assert_close(out.copy_to_host(), ref.zoom_shift(x, guide, eps=0.0), dtype=np.dtype("float64"))


def test_zoom_shift_constant_channel_whose_sum_rounds():
    """The same rule where the first mean misses the value (7 float64 tokens of 3.7): only a
    corrected variance is exactly 0 (the parity matrix's constant_channel case, for the CUDA
    kernels, which it cannot run without a GPU); the channel lands on the guide's mean."""
    ref = _align_ref()
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 7, 3))
    x[:, :, 0] = 3.7
    guide = 1.0 + 2.0 * rng.standard_normal((2, 5, 3))
    guide[:, :, 1] = -1.3
    out = cuda.to_device(np.full(x.shape, np.nan))
    nb.zoom_shift_device(dev(x, "float64"), dev(guide, "float64"), out, eps=0.0, empty=nan_empty, channels=2, lanes=2)
    got = out.copy_to_host()
    assert_close(got, ref.zoom_shift(x, guide, eps=0.0), dtype=np.dtype("float64"))
    assert_close(got[:, :, 0], np.broadcast_to(guide[:, :, :1].mean(axis=1), (2, 7)), dtype=np.dtype("float64"))


def test_lane_views_cover_other_axes():
    """(B, A, T, C) with axis=-2 and axis=-1 become (B', T, C') views; results match."""
    ref = _align_ref()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    for axis in (-2, -1):
        ax = axis % x.ndim
        x3 = nb._lane_view(x, ax)
        mean = cuda.to_device(np.full((x3.shape[0], x3.shape[2]), np.nan))
        std = cuda.to_device(np.full((x3.shape[0], x3.shape[2]), np.nan))
        nb.moments_device(dev(x3, "float64"), None, 1e-5, mean, std, channels=4, lanes=2)
        kept = list(x.shape)
        kept[ax] = 1
        want_mean, want_std = ref.moments(x, axis=axis)
        assert_close(mean.copy_to_host().reshape(kept), want_mean, dtype=np.dtype("float64"))
        assert_close(std.copy_to_host().reshape(kept), want_std, dtype=np.dtype("float64"))


# ----------------------------------------------------------------------------- host side


@pytest.fixture
def torch_as_cuda(monkeypatch):
    """The drivers' host side (``_Frame``: prepare, empty, finish; the lane and mask views)
    with torch CPU tensors standing for CUDA tensors: numba's ``as_cuda_array`` wraps a
    tensor's own memory in the simulator's device array (no copy, so the kernels' writes land
    in the tensor), the current stream is the default one, and the drivers' blocks are small
    (one Python thread per simulated GPU thread).  Nothing else of the code is replaced."""
    torch = pytest.importorskip("torch")
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class DefaultStream:
        cuda_stream = 0

    class TensorsAsDeviceArrays:
        gpus = cuda.gpus

        def as_cuda_array(self, t, sync=True):
            # what _Frame.prepare promises the kernels: contiguous memory holding the values
            assert t.is_contiguous() and not t.is_neg(), "a tensor reached a kernel unprepared"
            return FakeCUDAArray(t.numpy())

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: DefaultStream())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    frame_init = nb._Frame.__init__

    def init(self, like):
        frame_init(self, like)
        self.cuda = TensorsAsDeviceArrays()

    monkeypatch.setattr(nb._Frame, "__init__", init)
    for driver, small in ((nb.moments_device, {"channels": 4, "lanes": 2}),
                          (nb.zoom_shift_device, {"channels": 4, "lanes": 2}),
                          (nb.lowrank_fusion_device, {"tile": 4}), (nb.cp_fusion_device, {"tile": 4})):  # fmt: skip
        monkeypatch.setattr(driver, "__kwdefaults__", {**driver.__kwdefaults__, **small})
    return torch


@pytest.mark.parametrize(("dtype", "axis"), [("float16", -2), ("float32", -1), ("float64", 1), ("float64", -2)])
def test_host_side_of_the_statistics(torch_as_cuda, dtype, axis):
    """moments_cuda and zoom_shift_cuda on a strided 4-d tensor, statistics over a middle or
    the last axis, masks of x and the guide: the reference's values, in x's dtype (float16
    computed in float32), a tensor back, the inputs untouched."""
    torch = torch_as_cuda
    ref = _align_ref()
    rng = np.random.default_rng()
    dt = getattr(torch, dtype)
    x = torch.tensor(1.0 + 2.0 * rng.standard_normal((2, 3, 8, 5)), dtype=dt).transpose(2, 3)  # (2, 3, 5, 8)
    guide = torch.tensor(-1.0 + rng.standard_normal((2, 3, 5, 8)), dtype=dt)
    ax = axis % 4
    mask = torch.from_numpy(rng.random(x.shape[: ax + 1]) > 0.3)
    mask[..., 0] = True
    guide_mask = torch.from_numpy(rng.random(guide.shape[: ax + 1]) > 0.3)
    guide_mask[..., -1] = True
    before = [t.clone() for t in (x, guide, mask, guide_mask)]
    x64, g64 = x.double().numpy(), guide.double().numpy()
    mean, std = nb.moments_cuda(x, axis=axis, mask=mask)
    for got, want in zip((mean, std), ref.moments(x64, axis=axis, mask=mask.numpy())):
        assert_close(got, want, xp=torch, dtype=dt)
    for alpha in (1.0, 0.5):
        got = nb.zoom_shift_cuda(x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask)
        want = ref.zoom_shift(x64, g64, alpha=alpha, axis=axis, mask=mask.numpy(), guide_mask=guide_mask.numpy())
        assert_close(got, want, xp=torch, dtype=dt)
    assert all(torch.equal(a, b) for a, b in zip((x, guide, mask, guide_mask), before))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_host_side_of_the_fusions(torch_as_cuda, dtype):
    """lowrank_fusion and cp_fusion with strided inputs and absent modalities (``present``):
    the reference's values, in the inputs' dtype, the inputs untouched."""
    torch = torch_as_cuda
    rng = np.random.default_rng()
    dt = getattr(torch, dtype)
    dims, batch = [3, 4], 6
    present = rng.random((batch, 2)) > 0.3
    present[0, 0] = present[1, 1] = False  # each modality absent somewhere
    present[2] = True
    xs = [torch.tensor(rng.standard_normal((d, batch)), dtype=dt).T for d in dims]  # strided
    factors, weights, bias = lowrank_params(rng, dims, 2, 3, True, with_weights=True, with_bias=True)
    cp_w, cp_f = cp_params(rng, dims, 2, 3, True, with_weights=True)
    t = {"factors": [torch.tensor(f, dtype=dt) for f in factors], "weights": torch.tensor(weights, dtype=dt),
         "bias": torch.tensor(bias, dtype=dt), "cp_w": torch.tensor(cp_w, dtype=dt),
         "cp_f": [torch.tensor(f, dtype=dt) for f in cp_f]}  # fmt: skip
    before = [x.clone() for x in xs]
    x64 = [x.double().numpy() for x in xs]
    f64 = {k: [a.double().numpy() for a in v] if isinstance(v, list) else v.double().numpy() for k, v in t.items()}
    got = nb.lowrank_fusion(xs, t["factors"], t["weights"], t["bias"], present=torch.from_numpy(present))
    want = reference.lowrank_fusion(x64, f64["factors"], f64["weights"], f64["bias"], present=present)
    assert_close(got, want, xp=torch, dtype=dt)
    got = nb.cp_fusion(xs, (t["cp_w"], t["cp_f"]), t["bias"], present=torch.from_numpy(present))
    want = reference.cp_fusion(x64, (f64["cp_w"], f64["cp_f"]), f64["bias"], present=present)
    assert_close(got, want, xp=torch, dtype=dt)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))


# ----------------------------------------------------------------------------- registry


def test_registered_and_refuses_host_arrays():
    assert "numba" in available("lowrank_fusion")
    assert "numba" in available("cp_fusion")
    assert "numba" in available("zoom_shift")
    assert "numba" in available("moments")
    xs = [np.ones((2, 3))]
    p = mmfuse.init_lowrank([3], rank=1, out_dim=2, seed=0)
    with pytest.raises(TypeError, match=r"backend 'numba' cannot take numpy arrays .*needs CuPy arrays or torch CUDA tensors on a CUDA device"):
        mmfuse.lowrank_fusion(xs, **p, backend="numba")
    cp = (None, [np.ones((4, 2)), np.ones((3, 2))])
    with pytest.raises(TypeError, match=r"needs CuPy arrays or torch CUDA tensors"):
        mmfuse.cp_fusion(xs, cp, backend="numba")


def test_supports_says_what_it_needs():
    import array_api_compat.numpy as np_compat

    from mmfuse.backends._conditions import CONDITIONS, CallInfo

    cuda_kernels = CONDITIONS["CUDA arrays, no gradient"]
    assert cuda_kernels(CallInfo(np_compat, "cpu", None)) == "needs CuPy arrays or torch CUDA tensors on a CUDA device"
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as torch_compat

    assert "needs CuPy arrays or torch CUDA tensors" in cuda_kernels(CallInfo(torch_compat, torch.device("cpu"), None))
    # Under the simulator even a CUDA tensor is refused, with the reason.
    assert "NUMBA_ENABLE_CUDASIM" in cuda_kernels(CallInfo(torch_compat, torch.device("cuda", 0), None))
    # and the kernels are forward-only: a call that needs gradients takes the core instead
    needs_grad = CallInfo(torch_compat, torch.device("cuda", 0), None, grad=True)
    assert "need no gradient" in cuda_kernels(needs_grad)
    assert CONDITIONS["CUDA arrays needing gradients"](needs_grad) is None
    # and they read the tensors' memory: not inside transforms or forward-mode AD (a dual
    # tensor's tangent was dropped), tracing, dispatch modes, nor for fake tensors or wrapper
    # subclasses, as the CPU kernels (a code review's find; "auto" then takes the torch row)
    for flag in ("traced", "intercepted", "values_hidden"):
        info = CallInfo(torch_compat, torch.device("cuda", 0), None, **{flag: True})
        assert "outside torch.func transforms, forward-mode AD" in cuda_kernels(info), flag


def test_auto_does_not_pick_numba_for_host_arrays():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 2))]
    p = mmfuse.init_lowrank([2], rank=2, out_dim=2, seed=0)
    assert_close(mmfuse.lowrank_fusion(xs, **p), reference.lowrank_fusion(xs, **p))


# ----------------------------------------------------------------------------- real compiler

_COMPILE = textwrap.dedent(
    """
    import sys
    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
        from numba import cuda
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(8, 0))
    except Exception as exc:
        print("NO-NVVM", type(exc).__name__, exc)
        sys.exit(0)
    from numba import cuda, types
    from mmfuse.backends import numba as nb
    for acc in (types.float32, types.float64):
        src = nb.kernel_sources(acc, nb.TILE)
        a1, a2, a3 = (types.Array(acc, n, "A") for n in (1, 2, 3))
        pres = types.Array(types.boolean, 2, "A")
        i64, b1 = types.int64, types.boolean
        sigs = {
            "proj": (a2, a3, pres, i64, b1, a3, i64),
            "lowrank_combine": (a3, a1, b1, a1, b1, i64, a2),
            "cp_combine": (a3, a1, b1, a2, a1, b1, a2),
        }
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(src[name], sig, cc=(9, 0))
            assert "atom" not in ptx, name + " uses atomics"
            print("OK", name, acc)
        src = nb.align_kernel_sources(acc, nb.STAT_CHANNELS, nb.STAT_LANES)
        sig = (a3, pres, b1, types.float64, a2, a2, b1, a2, a2, types.float64, a3)
        ptx, _ = cuda.compile_ptx(src["stats_map"], sig, cc=(9, 0))
        assert "atom" not in ptx, "stats_map uses atomics"
        print("OK", "stats_map", acc)
    """
)


def test_kernels_compile_to_ptx():
    """Type-check the kernels with the real compiler (no GPU needed, NVVM needed)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if "NO-NVVM" in proc.stdout:
        pytest.skip(f"NVVM is not installed: {proc.stdout.strip()}")
    assert proc.stdout.count("OK") == 8, proc.stdout


def test_float32_statistics_accumulate_in_float64():
    """float32 inputs are accumulated and mapped in float64 (``ALIGN_ACCUMULATOR``).  In
    float32 each token lane's running sum drifted over a long axis (the pivot, then the
    variance about it: sigma 7000 float32 ulps off at T = 262144 of 1e5 + N(0, 1)), and the
    map's offset cancelled on constant lanes of 1e8 (a review of the kernels)."""
    ref = _align_ref()
    rng = np.random.default_rng()
    x = (1e5 + rng.standard_normal((1, 4096, 2))).astype(np.float32)
    x[0, :, 1] = 1e5  # a constant lane: mean 1e5, no spread
    mean = cuda.to_device(np.full((1, 2), np.nan, np.float32))
    std = cuda.to_device(np.full((1, 2), np.nan, np.float32))
    nb.moments_device(dev(x, np.float32), None, 0.0, mean, std, empty=nan_empty, channels=2, lanes=8)
    want_mean, want_std = ref.moments(x, eps=0.0)
    # both the exact statistics rounded once to float32 (the reference's are float64)
    assert np.all(np.abs(mean.copy_to_host() - want_mean[:, 0, :]) <= 0.5 * np.spacing(np.float32(1e5)))
    assert np.all(np.abs(std.copy_to_host() - want_std[:, 0, :]) <= np.spacing(np.float32(1.0)))
    assert std.copy_to_host()[0, 1] == 0.0
    # constant lanes of a large value: the map takes the correction off x - pivot before the
    # zoom (folded into the offset, float64 lanes of 3e16 / 7 were 10 ulps off)
    for value, dtype in ((1e8, np.float32), (3e16 / 7, np.float64)):
        big = np.full((1, 50, 2), value, dtype)
        guide = rng.normal(-3.0, 20.0, (1, 40, 2)).astype(dtype)
        out = cuda.to_device(np.full(big.shape, np.nan, dtype))
        nb.zoom_shift_device(dev(big, dtype), dev(guide, dtype), out, empty=nan_empty, channels=2, lanes=8)
        want = ref.zoom_shift(big, guide)
        ulps = np.abs(out.copy_to_host() - want) / np.spacing(np.abs(guide).max().astype(dtype))
        assert ulps.max() <= 1, (dtype, ulps.max())
