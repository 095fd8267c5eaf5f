"""The numba backend's CPU kernels (moments, zoom_shift, align on NumPy arrays) against
``mmfuse.reference``: dtypes, axes, masks, odd shapes, threads, inputs untouched, dispatch."""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest

pytest.importorskip("numba")

import mmfuse
from mmfuse import reference
from mmfuse.backends import _numba_cpu, available
from mmfuse.testing import assert_close

nb = pytest.importorskip("mmfuse.backends.numba")

DTYPES = [np.float32, np.float64]


def draw(rng, shape, dtype, *, offset=2.0, spread=3.0):
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


def readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def token_mask(rng, batch, tokens):
    mask = rng.random((batch, tokens)) > 0.4
    mask[np.arange(batch), rng.integers(0, tokens, size=batch)] = True  # no empty sample
    return mask


def test_registered_for_numpy():
    for op in ("moments", "zoom_shift", "align"):
        assert "numba" in available(op)
    import array_api_compat.numpy as np_compat

    from mmfuse.backends._conditions import CONDITIONS, CallInfo

    info = CallInfo(np_compat, "cpu", np.dtype("float32"))
    assert CONDITIONS["numpy (CPU kernels)"](info) is None
    assert CONDITIONS["numpy or torch CPU, no gradient (CPU kernels)"](info) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-2, 1, -1, 2])
def test_moments_equal_reference(dtype, axis):
    rng = np.random.default_rng()
    x = readonly(draw(rng, (3, 5, 4, 7), dtype, offset=50.0))
    before = x.copy()
    mean, std = mmfuse.moments(x, axis=axis, eps=1e-5, backend="numba")
    want_mean, want_std = reference.moments(x, axis=axis, eps=1e-5)
    assert mean.dtype == std.dtype == x.dtype
    assert_close(mean, want_mean.astype(dtype), dtype=np.dtype(dtype))
    assert_close(std, want_std.astype(dtype), dtype=np.dtype(dtype))
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.35])
@pytest.mark.parametrize("shape", [(64, 33, 40), (1, 50, 300), (3, 2, 5), (2, 17, 1)])
def test_zoom_shift_equals_reference(dtype, alpha, shape):
    """Many samples (whole rows per task), one sample (channels split), one token, one channel."""
    rng = np.random.default_rng()
    x = readonly(draw(rng, shape, dtype))
    guide = readonly(draw(rng, (shape[0], shape[1] + 3, shape[2]), dtype, offset=-4.0, spread=0.5))
    got = mmfuse.zoom_shift(x, guide, alpha=alpha, backend="numba")
    want = reference.zoom_shift(x, guide, alpha=alpha)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert_close(got, want.astype(dtype), dtype=np.dtype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zoom_shift_masks_exclude_huge_tokens(dtype):
    rng = np.random.default_rng()
    x = draw(rng, (6, 11, 9), dtype)
    guide = draw(rng, (6, 8, 9), dtype, offset=1.0)
    mask, guide_mask = token_mask(rng, 6, 11), token_mask(rng, 6, 8)
    want = reference.zoom_shift(x, guide, alpha=0.6, mask=mask, guide_mask=guide_mask)
    x_huge, g_huge = x.copy(), guide.copy()
    x_huge[~mask] = 1e30 if dtype == np.float32 else 1e300
    g_huge[~guide_mask] = np.nan
    got = mmfuse.zoom_shift(x_huge, g_huge, alpha=0.6, mask=mask, guide_mask=guide_mask, backend="numba")
    # masked tokens are still mapped (the map is per channel), so compare the kept ones
    assert_close(got[mask], want[mask].astype(dtype), dtype=np.dtype(dtype))
    mean, _ = mmfuse.moments(x_huge, mask=mask, backend="numba")
    assert_close(mean, reference.moments(x, mask=mask)[0].astype(dtype), dtype=np.dtype(dtype))


def test_zero_variance_channel_stays_finite():
    x = np.ones((2, 6, 3), dtype=np.float32)
    guide = np.random.default_rng().standard_normal((2, 4, 3)).astype(np.float32)
    got = mmfuse.zoom_shift(x, guide, eps=0.0, backend="numba")
    assert np.isfinite(got).all()
    assert_close(got, reference.zoom_shift(x, guide, eps=0.0).astype(np.float32), dtype=np.dtype("float32"))


def test_non_contiguous_and_half_inputs():
    rng = np.random.default_rng()
    base = draw(rng, (4, 10, 12), np.float64)
    x = base[:, ::2, ::-1]  # strided, negative stride
    guide = draw(rng, (4, 7, 12), np.float64)
    got = mmfuse.zoom_shift(x, guide, backend="numba")
    assert_close(got, reference.zoom_shift(x, guide))
    half = draw(rng, (3, 8, 5), np.float16, offset=0.5, spread=1.0)
    got16 = mmfuse.zoom_shift(half, half[:, ::-1], alpha=0.5, backend="numba")
    assert got16.dtype == np.float16
    assert_close(got16, reference.zoom_shift(half, half[:, ::-1], alpha=0.5).astype(np.float16), dtype=np.dtype("float16"))
    # the maps of align and the statistics of moments come back in float16 too
    for y, want in zip(mmfuse.align([half, 2 * half], alpha=0.5, backend="numba"), reference.align([half, 2 * half], alpha=0.5)):
        assert_close(y, want.astype(np.float16), dtype=np.dtype("float16"))
    for y, want in zip(mmfuse.moments(half, backend="numba"), reference.moments(half)):
        assert_close(y, want.astype(np.float16), dtype=np.dtype("float16"))


@pytest.mark.parametrize("rounds", [0, 1, 3, None])
@pytest.mark.parametrize("schedule,topology", [("gauss-seidel", "consensus"), ("jacobi", "consensus"), ("gauss-seidel", "hub")])
def test_align_equals_reference(rounds, schedule, topology):
    rng = np.random.default_rng()
    xs = [readonly(draw(rng, (5, t, 8), np.float32, offset=m, spread=1.0 + m)) for m, t in enumerate((9, 4, 13))]
    masks = [token_mask(rng, 5, x.shape[1]) for x in xs]
    opts = {"rounds": rounds, "alpha": 0.5, "schedule": schedule, "topology": topology, "hub": 1, "masks": masks}
    if topology != "hub":  # (consensus has no hub: align refuses one)
        del opts["hub"]
    got = mmfuse.align(xs, backend="numba", **opts)
    want = reference.align(xs, **opts)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        assert_close(g, w.astype(np.float32), dtype=np.dtype("float32"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_thread_count(monkeypatch, dtype):
    """Every call run on 1 and on 3 threads (3 > the CI machine's cores): identical results,
    whether tasks are whole samples or (few samples) runs of channels."""
    rng = np.random.default_rng()
    monkeypatch.setattr(_numba_cpu, "PARALLEL_ELEMENTS", 0)
    for shape, gshape in (((3, 40, 70), (3, 21, 70)), ((9, 17, 5), (9, 8, 5))):
        x, guide = draw(rng, shape, dtype, offset=1e4), draw(rng, gshape, dtype)
        mask = token_mask(rng, shape[0], shape[1])
        runs = []
        for threads in (1, 3):
            monkeypatch.setattr(_numba_cpu, "max_workers", lambda t=threads: t)
            runs.append((
                mmfuse.zoom_shift(x, guide, alpha=0.7, mask=mask, backend="numba"),
                *mmfuse.moments(x, mask=mask, backend="numba"),
                *mmfuse.align([x, guide], rounds=2, alpha=0.5, masks=[mask, None], backend="numba"),
            ))  # fmt: skip
        # a task's result depends on its own channels only; the split changes nothing
        for one, many in zip(*runs):
            np.testing.assert_array_equal(one, many)
        assert_close(runs[1][0], reference.zoom_shift(x, guide, alpha=0.7, mask=mask).astype(dtype),
                     dtype=np.dtype(dtype))  # fmt: skip


def test_channel_chunk_splits_only_when_samples_are_few():
    threads = _numba_cpu.max_workers()
    assert _numba_cpu.channel_chunk(2 * threads, 256) == 256
    assert _numba_cpu.channel_chunk(1, 8) == 8
    chunk = _numba_cpu.channel_chunk(1, 256)
    assert 16 <= chunk <= 256 and (threads == 1 or chunk < 256)
    assert _numba_cpu.channel_chunk(1, 256, 1) == 128  # one thread: two tasks
    assert _numba_cpu.channel_chunk(1, 20, 8) == 16  # never below 16 channels a task


def test_auto_runs_the_cpu_kernels_once_numba_is_imported(monkeypatch):
    """numba is imported (this module did it), so "auto" on NumPy arrays takes the kernels."""
    calls = []
    real = _numba_cpu.zoom_shift

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_numba_cpu, "zoom_shift", spy)
    rng = np.random.default_rng()
    x, guide = draw(rng, (2, 5, 3), np.float64), draw(rng, (2, 6, 3), np.float64)
    got = mmfuse.zoom_shift(x, guide)
    assert calls == [1]
    assert_close(got, reference.zoom_shift(x, guide))
    with mmfuse.config_context(backend="array_api"):
        mmfuse.zoom_shift(x, guide)
    assert calls == [1]


def test_refuses_what_it_cannot_take():
    """torch CPU float32/float64 tensors are taken (NumPy views of their memory), for align
    only without gradients (its kernels are forward-only); other torch dtypes are refused."""
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"backend 'numba' cannot take torch arrays .*that need no gradient"):
        mmfuse.align([x, x + 1], backend="numba")
    h = torch.ones(2, 3, 4, dtype=torch.float16)
    with pytest.raises(
        TypeError,
        match=r"needs torch CPU float32/float64 tensors \(CPU kernels\) or NumPy arrays \(CPU kernels\) or CuPy "
        r"arrays or torch CUDA tensors",
    ):
        mmfuse.zoom_shift(h, h, backend="numba")


def test_concurrent_calls_from_threads(monkeypatch):
    """Threads may call the kernels at once, each call on worker threads of its own."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(_numba_cpu, "PARALLEL_ELEMENTS", 0)
    rng = np.random.default_rng()
    cases = [(draw(rng, (4, 30, 20), np.float32), draw(rng, (4, 12, 20), np.float32)) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: mmfuse.zoom_shift(c[0], c[1], alpha=0.5, backend="numba"), cases))
    for (x, guide), y in zip(cases, got):
        assert_close(y, reference.zoom_shift(x, guide, alpha=0.5).astype(np.float32), dtype=np.dtype("float32"))


def test_no_numba_threading_layer_is_started():
    """The kernels are serial loops on mmfuse's own threads: numba's parallel runtime (whose
    OpenMP threads spin, and whose workqueue layer aborts on concurrent launches) never starts,
    large calls from several threads at once included."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, mmfuse\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "rng = np.random.default_rng(0)\n"
        "xs = [rng.standard_normal((4, 300, 256)).astype(np.float32) for _ in range(8)]\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    list(pool.map(lambda x: mmfuse.zoom_shift(x, x[:, ::-1] * 2, backend='numba'), xs))\n"
        "import numba\n"
        "try:\n"
        "    print(numba.threading_layer())\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "Threading layer is not initialized."


def test_kernels_compile_where_numba_finds_no_place_for_its_cache():
    """Without a writable place for numba's on-disk cache (no NUMBA_CACHE_DIR, a read-only
    install and no writable home: numba's locators all decline, emulated by emptying their
    list), numba refuses ``cache=True`` at decoration; the kernels compile uncached instead
    (a review's find: every numba call, "auto" ones included, raised "cannot cache function
    ...: no locator available")."""
    import os
    import subprocess
    import sys

    code = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []\n"
        "import numpy as np, mmfuse\n"
        "from mmfuse import reference\n"
        "from mmfuse.testing import assert_close\n"
        "rng = np.random.default_rng()\n"
        "x, g = rng.standard_normal((3, 7, 5)), 2.0 + rng.standard_normal((3, 4, 5))\n"
        "assert_close(mmfuse.zoom_shift(x, g, backend='numba'), reference.zoom_shift(x, g))\n"
        "xs = [rng.standard_normal((6, d)) for d in (2, 3, 2)]\n"
        "fs = [rng.standard_normal((2, d + 1, 4)) for d in (2, 3, 2)]\n"
        "assert_close(mmfuse.lowrank_interactions(xs, fs, backend='numba')[0], reference.lowrank_interactions(xs, fs)[0])\n"
        "from mmfuse.backends import _numba_cpu, _numba_orders\n"
        "print(_numba_cpu._sample_stats._cache.__class__.__name__, _numba_orders._copy._cache.__class__.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["NullCache", "NullCache"]  # compiled, not cached


def test_cuda_arrays_without_numba_cuda_are_refused_with_the_reason(monkeypatch):
    """With numba but not numba-cuda installed, CUDA inputs get a message naming numba-cuda."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as torch_compat

    from mmfuse.backends import _conditions

    real = _conditions.importlib.util.find_spec
    monkeypatch.setattr(_conditions.importlib.util, "find_spec", lambda n: None if n == "numba_cuda" else real(n))
    info = _conditions.CallInfo(torch_compat, torch.device("cuda", 0), torch.float32)
    reason = _conditions.CONDITIONS["CUDA arrays, no gradient"](info)
    assert reason == "needs CuPy arrays or torch CUDA tensors on a CUDA device, and numba-cuda (pip install 'mmfuse[numba]')"


def test_kernels_keep_a_large_mean_apart_from_the_output(rng):
    """x about 1e8 with unit noise, float64: the output is unit-sized, so the mean's own
    rounding (an ulp of 1e8, 1.5e-8) must not reach it.  The kernels kept the mean as one
    float64 and offset mean + alpha (g - mean): 6e-9 errors (1e7 ulps of the output); they
    now keep the first mean and the second pass's shift apart, as the core does."""
    x = 1e8 + rng.standard_normal((2, 16, 3))
    g = rng.standard_normal((2, 16, 3))
    for alpha in (1.0, 0.7):
        want = mmfuse.zoom_shift(x, g, alpha=alpha, backend="array_api")
        got = mmfuse.zoom_shift(x, g, alpha=alpha, backend="numba")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * np.abs(want).max())
    for kw in ({"rounds": 1, "topology": "hub", "hub": 1}, {"rounds": 3, "alpha": 0.5}):
        for a, b in zip(mmfuse.align([x, g], backend="numba", **kw), mmfuse.align([x, g], backend="array_api", **kw)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-14 * np.abs(b).max())


@pytest.mark.parametrize("order", [">", "<"])
def test_float64_of_either_byte_order_is_computed_in_float64(order, rng):
    """``np.dtype(">f8") == np.float64`` is False: the kernels' input conversion took a
    big-endian float64 array for "not float32/float64" and computed it in float32 (an error of
    2e-3 at a mean of 1e4, where float64 gives 1e-16)."""
    x = 1e4 + rng.standard_normal((2, 6, 3))
    g = 2.0 * rng.standard_normal((2, 5, 3))
    xb, gb = x.astype(f"{order}f8"), g.astype(f"{order}f8")
    y = mmfuse.zoom_shift(xb, gb, backend="numba")
    assert y.dtype == np.float64 and y.dtype.isnative  # native, as NumPy's operations return
    assert_close(y, reference.zoom_shift(x, g), rtol=1e-12, atol=1e-9)
    assert_close(mmfuse.moments(xb, backend="numba")[1], reference.moments(x)[1], rtol=1e-12)
    assert_close(mmfuse.align([xb, gb], backend="numba")[0], reference.align([x, g])[0], rtol=1e-12, atol=1e-9)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 here")
def test_auto_keeps_longdouble_off_the_cpu_kernels(rng):
    """The CPU kernels compute in float64 for 8-byte floats and float32 for the rest: NumPy
    longdouble arrays got float32 statistics under "auto" once numba was imported (std off by
    7e-5 at mean 1e4).  They now run the Array-API core, at their own precision."""
    x = (1e4 + rng.standard_normal((2, 6, 3))).astype(np.longdouble)
    g = rng.standard_normal((2, 5, 3)).astype(np.longdouble)
    for call in (
        lambda **kw: mmfuse.moments(x, **kw)[1],
        lambda **kw: mmfuse.align([x, g], rounds=0, **kw)[0],
        lambda **kw: mmfuse.zoom_shift(x, g, **kw),
    ):
        got, want = call(), call(backend="array_api")
        assert got.dtype == np.longdouble
        np.testing.assert_array_equal(got, want)
    assert "needs float16/float32/float64 NumPy arrays" in str(mmfuse.backends.explain("moments", x))
    with pytest.raises(mmfuse.backends.BackendUnsupported, match=r"got (float128|longdouble)"):
        mmfuse.moments(x, backend="numba")


def test_float32_zoom_of_a_subnormal_spread_stays_finite():
    """The kernels computed the zoom in float64 but stored it in a float32 x's dtype: for a
    lane with a subnormal spread (1e-41) toward a unit guide, the scale (1.4e40) overflowed to
    inf and the outputs came out +-inf and NaN, where the exact ones are of unit size."""
    x = np.array([1e-40, 1.1e-40, 0.9e-40, 1e-40], np.float32).reshape(1, 4, 1)
    g = np.array([-1.0, 1.0, -1.0, 1.0], np.float32).reshape(1, 4, 1)
    want = reference.zoom_shift(x, g, eps=0.0)
    got = mmfuse.zoom_shift(x, g, eps=0.0, backend="numba")
    assert got.dtype == np.float32
    assert_close(got, want)
    assert_close(mmfuse.align([x, g], rounds=1, eps=0.0, backend="numba")[0], reference.align([x, g], rounds=1, eps=0.0)[0])


def test_float32_maps_are_the_float64_values_rounded_once():
    """The CPU kernels map float32 data in float64, x - centre included, and round once:
    within half a float32 ulp (plus the statistics' float64 rounding) of the exact map, tokens
    far from the mean too.  ``x - centre`` rounded in float32 took up to 800 ulps of the small
    outputs near the target mean (a review of the kernels)."""
    rng = np.random.default_rng()
    x = (10.0 * rng.standard_normal((4, 64, 8)) + 3.0).astype(np.float32)
    x[:, ::7] *= 300  # tokens far from the mean
    guide = (2.0 * rng.standard_normal((4, 40, 8))).astype(np.float32)
    for got, want in (
        (mmfuse.zoom_shift(x, guide, alpha=0.7, backend="numba"), reference.zoom_shift(x, guide, alpha=0.7)),
        (mmfuse.align([x, guide], rounds=2, alpha=0.5, backend="numba")[0],
         reference.align([x, guide], rounds=2, alpha=0.5)[0]),
    ):  # fmt: skip
        ulps = np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32))
        assert ulps.max() <= 0.51, ulps.max()


def test_zoom_shift_numba_op_fake_matches_the_kernels_layout():
    """``mmfuse::zoom_shift_numba`` returns a C-contiguous tensor, and its fake says so: the
    fake was ``empty_like(x)``, a transposed x's strides, which ``torch.library.opcheck``
    (and inductor, which trusts fake strides) refused (a review of program capture)."""
    torch = pytest.importorskip("torch")
    import mmfuse.backends.torch.zoom_shift  # noqa: F401  (defines the op)

    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).transpose(1, 2)  # (4, 5, 3), strided
    guide = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).transpose(1, 2)
    args = (x, guide, 0.6, -2, None, None, 1e-5)
    torch.library.opcheck(torch.ops.mmfuse.zoom_shift_numba.default, args)
    assert torch.ops.mmfuse.zoom_shift_numba(*args).is_contiguous()


@pytest.mark.parametrize("shape", [(1, 8, 33), (1, 8, 17), (3, 5, 40)])
def test_channel_chunks_cover_every_channel(shape):
    """One sample with more channels than a chunk (the kernels split its channels among
    threads' tasks): every channel is computed, the last partial chunk included (a mutant
    rounding the task count down left 16 channels uninitialised, and no test saw it)."""
    rng = np.random.default_rng()
    x = 3.0 + rng.standard_normal(shape)
    guide = rng.standard_normal((shape[0], 6, shape[2]))
    assert_close(mmfuse.zoom_shift(x, guide, alpha=0.7, backend="numba"), reference.zoom_shift(x, guide, alpha=0.7))
    got = mmfuse.align([x, guide], rounds=2, alpha=0.5, backend="numba")
    for y, want in zip(got, reference.align([x, guide], rounds=2, alpha=0.5)):
        assert_close(y, want)


def test_constant_lane_has_no_spread():
    """A constant lane whose float64 sum rounds (7 tokens of 3.7): the corrected variance is
    exactly 0 (a mutant dropping the correction's square left 4.4e-16)."""
    x = np.full((1, 7, 2), 3.7)
    mean, std = mmfuse.moments(x, eps=0.0, backend="numba")
    assert np.all(std == 0.0) and np.all(mean == 3.7)


def test_the_registered_numba_op_refuses_non_float_data():
    """torch.ops.mmfuse.zoom_shift_numba, called directly, compiled its kernels for an int32 x
    and returned a truncated int32 result (the public call refuses it; a review's find)."""
    torch = pytest.importorskip("torch")
    import mmfuse.backends.torch  # noqa: F401  (registers the op)

    x = torch.randint(-5, 5, (2, 6, 3), dtype=torch.int32)
    g = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match=r"x and guide must be float32 or float64 tensors of one dtype, got torch.int32 and torch.float32"):
        torch.ops.mmfuse.zoom_shift_numba(x, g, 1.0, -2, None, None, 1e-5)
    with pytest.raises(TypeError, match=r"got torch.float32 and torch.float64"):
        torch.ops.mmfuse.zoom_shift_numba(g, g.double(), 1.0, -2, None, None, 1e-5)


def _lane_calls(x, guide, mask, guide_mask, axis=-2):
    """moments, zoom_shift and align (one and three rounds) of x and guide with the kernels."""
    kw = {"axis": axis, "backend": "numba"}
    return [
        *mmfuse.moments(x, mask=mask, **kw),
        mmfuse.zoom_shift(x, guide, alpha=0.6, mask=mask, guide_mask=guide_mask, **kw),
        mmfuse.zoom_shift(x, guide, eps=0.0, mask=mask, guide_mask=guide_mask, **kw),
        *mmfuse.align([x, guide], rounds=1, masks=[mask, guide_mask], **kw),
        *mmfuse.align([x, guide], rounds=3, alpha=0.5, topology="hub", hub=1, masks=[mask, guide_mask], **kw),
    ]


def _hard_lanes(rng, shape, dtype):
    """Lanes with a large mean (the first mean's rounding matters) and a constant one."""
    x = draw(rng, shape, dtype, offset=1e4 if dtype == np.float32 else 1e8, spread=0.5)
    x[0, :, 0] = 3.7  # no spread: variance exactly 0, scale 1 at eps = 0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_single_channel_lanes_equal_a_channel_of_wider_rows(dtype, masked):
    """(B, T, 1) inputs run the scalar per-channel loops (C' <= SCALAR_CHANNELS; axis=-1
    calls too), (B, T, 7) ones the row loops: the same data as channel 3 of the wider input
    gives the same bits (same operations, same order; the scalar loops made one-channel calls
    4-10x faster, a performance review's measurement)."""
    assert 1 <= _numba_cpu.SCALAR_CHANNELS < 7 <= 16  # (7 channels: one row task per sample)
    rng = np.random.default_rng()
    x, guide = _hard_lanes(rng, (4, 37, 1), dtype), draw(rng, (4, 23, 1), dtype, offset=-4.0)
    wide_x, wide_g = _hard_lanes(rng, (4, 37, 7), dtype), draw(rng, (4, 23, 7), dtype)
    wide_x[..., 3:4], wide_g[..., 3:4] = x, guide
    mask, guide_mask = (token_mask(rng, 4, 37), token_mask(rng, 4, 23)) if masked else (None, None)
    one = _lane_calls(x, guide, mask, guide_mask)
    many = _lane_calls(wide_x, wide_g, mask, guide_mask)
    for a, b in zip(one, many, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b[..., 3:4])
    if not masked:  # the statistics axis last: (B, 1, T) lanes are (B, T, 1) ones
        swap = _lane_calls(x.transpose(0, 2, 1), guide.transpose(0, 2, 1), None, None, axis=-1)
        for a, b in zip(swap, one, strict=True):
            np.testing.assert_array_equal(a, np.swapaxes(b, -1, -2) if b.ndim == 3 else b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 29, 1), (2, 17, 3), (5, 11, 9), (1, 40, 40), (3, 30, 2), (2, 3, 1)])
def test_scalar_lanes_and_row_loops_give_the_same_bits(monkeypatch, dtype, shape):
    """Every task forced through the row loops (SCALAR_CHANNELS = 0), then through the
    scalar per-channel loops (a large SCALAR_CHANNELS), on the same inputs, masked and not,
    one thread and several (channels split among tasks for the single sample): equal.  The
    scalar lanes of 16 tokens or more run four at a time (``_four_lane_stats``) unmasked:
    lane counts leave 0 to 3 lanes after the last group of four, and shorter lanes (11, 3
    tokens) run one by one."""
    rng = np.random.default_rng()
    batch, tokens, chan = shape
    x, guide = _hard_lanes(rng, shape, dtype), draw(rng, (batch, tokens + 5, chan), dtype)
    masks = [(None, None), (token_mask(rng, batch, tokens), token_mask(rng, batch, tokens + 5))]
    runs = []
    for lanes, parallel in ((0, False), (1 << 30, False), (1 << 30, True)):
        monkeypatch.setattr(_numba_cpu, "SCALAR_CHANNELS", lanes)
        monkeypatch.setattr(_numba_cpu, "PARALLEL_ELEMENTS", 0 if parallel else 1 << 62)
        monkeypatch.setattr(_numba_cpu, "max_workers", lambda p=parallel: 3 if p else 1)
        runs.append([y for m, gm in masks for y in _lane_calls(x, guide, m, gm)])
    for rows, scalar, threaded in zip(*runs, strict=True):
        np.testing.assert_array_equal(rows, scalar)
        np.testing.assert_array_equal(scalar, threaded)
    assert_close(runs[0][2], reference.zoom_shift(x, guide, alpha=0.6).astype(dtype), dtype=np.dtype(dtype))


@pytest.mark.parametrize("grad", ["none", "no_grad", "needed"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "negated"])
def test_planned_torch_zoom_shift_equals_the_kernels_on_numpy(grad, layout):
    """A planned ``backend="numba"`` zoom_shift of torch CPU tensors where autograd records
    nothing (no input requires grad, or grad mode is off) runs the kernels on the tensors'
    memory past the op's binding (its plan); it gives the bits of the kernels on NumPy arrays,
    masks of x and the guide included, for strided and negative-bit tensors too, and a call
    needing gradients keeps the op and its backward.  (Compared with the op itself, whose
    forward runs the same function, a dropped mask had passed; and a clone had dropped the
    negative bit: a mutation review's finds.)"""
    torch = pytest.importorskip("torch")
    ops = importlib.import_module("mmfuse.backends.torch.zoom_shift")  # (the package's name is the function)

    rng = np.random.default_rng()
    x = torch.from_numpy(draw(rng, (3, 7, 5), np.float32))
    guide = torch.from_numpy(draw(rng, (3, 6, 5), np.float32, offset=-1.0))
    mask, guide_mask = torch.from_numpy(token_mask(rng, 3, 7)), torch.from_numpy(token_mask(rng, 3, 6))
    want = mmfuse.zoom_shift(x.numpy(), guide.numpy(), alpha=0.6, mask=mask.numpy(), guide_mask=guide_mask.numpy(),
                             backend="numba")  # fmt: skip
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "negated":
        x = torch._neg_view(-x)  # x's values, the negative bit set
    if grad != "none":
        x = x.requires_grad_() if layout != "negated" else torch._neg_view((-x).detach().requires_grad_())
    assert x.is_neg() == (layout == "negated") and x.is_contiguous() == (layout != "transposed")
    options = {"alpha": 0.6, "axis": -2, "mask": mask, "guide_mask": guide_mask, "eps": 1e-5}
    with torch.no_grad() if grad == "no_grad" else contextlib.nullcontext():
        chosen = nb.zoom_shift_cpu.plan(x, guide, **options)
        assert chosen is (ops.zoom_shift_numba if grad == "needed" else ops._zoom_shift_numba_on_host)
        for _ in range(2):  # planned by the first call, run from the plan by the second
            got = mmfuse.zoom_shift(x, guide, alpha=0.6, mask=mask, guide_mask=guide_mask, backend="numba")
            assert got.dtype == torch.float32 and got.is_contiguous() and got.requires_grad == (grad == "needed")
            np.testing.assert_array_equal(got.detach().numpy(), want)
    if grad == "needed":
        got.sum().backward()
        leaf = x if layout != "negated" else x._base
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_planned_numpy_zoom_shift_runs_the_kernels_directly():
    """The plan of a NumPy call is the kernels' function itself (no torch test per call)."""
    rng = np.random.default_rng()
    x, guide = draw(rng, (2, 5, 3), np.float64), draw(rng, (2, 4, 3), np.float64)
    options = {"alpha": 1.0, "axis": -2, "mask": None, "guide_mask": None, "eps": 1e-5}
    assert nb.zoom_shift_cpu.plan(x, guide, **options) is nb.zoom_shift_arrays
    assert_close(mmfuse.zoom_shift(x, guide, backend="numba"), reference.zoom_shift(x, guide))


def test_statistics_of_another_shape_are_broadcast_to_the_lanes():
    """The kernels' per-lane constants: a statistic already of the kept shape is reshaped (the
    common case, no broadcast), one of another broadcastable shape is broadcast first."""
    kept, lanes = [2, 1, 3], (2, 3)
    a = np.arange(6.0).reshape(kept)
    assert np.array_equal(nb._per_lane(a, kept, lanes, np.float64), a.reshape(lanes))
    got = nb._per_lane(np.float32(2.5), kept, lanes, np.float64)
    assert got.dtype == np.float64 and got.flags.c_contiguous and np.array_equal(got, np.full(lanes, 2.5))
    got = nb._per_lane(np.arange(3.0).reshape(1, 1, 3), kept, lanes, np.float64)
    assert np.array_equal(got, np.tile(np.arange(3.0), (2, 1)))


def test_kernels_release_the_gil_and_other_compile_errors_rise(monkeypatch):
    """The CPU kernels are compiled nogil (else the runner's threads take turns), and only
    numba's "cannot cache" refusal is answered by compiling without the cache: another error
    at decoration rises (a mutation review: both untested)."""
    import numba

    from mmfuse.backends import _numba_jit

    for kernel in (_numba_cpu._stats_kernel, _numba_cpu._zoom_shift_kernel, _numba_cpu._apply_kernel):
        assert kernel.targetoptions.get("nogil") is True, kernel

    def njit(**options):
        if options.get("cache"):
            raise RuntimeError("numba internal failure at decoration")
        return numba.njit(**options)

    monkeypatch.setattr(_numba_jit.numba, "njit", njit)
    with pytest.raises(RuntimeError, match="numba internal failure"):
        _numba_jit.cpu_kernel(lambda a: a)
