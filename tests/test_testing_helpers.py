"""mmfuse.testing (assert_close, default_rtol, make_inputs) and the loaders' device/dtype checks."""

from __future__ import annotations

import numpy as np
import pytest

from mmfuse.datasets import load_basic_motions, load_mfeat
from mmfuse.testing import assert_close, default_rtol, make_inputs


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh seed each run: the properties hold for any values


def test_non_finite_entries_must_match_exactly():
    rng = _rng()
    x = rng.standard_normal((4, 5))
    i, j = int(rng.integers(4)), int(rng.integers(5))
    for mine, theirs in [(np.nan, np.inf), (np.inf, -np.inf), (-np.inf, np.nan), (np.inf, np.nan)]:
        a, d = x.copy(), x.copy()
        a[i, j], d[i, j] = mine, theirs
        with pytest.raises(AssertionError, match=rf"non-finite.*index \({i}, {j}\)"):
            assert_close(a, d)
    assert_close(np.array([np.nan]), np.array([np.nan]))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([np.nan]), np.array([np.inf]))
    # matching non-finite entries pass, and the finite ones are still compared
    a = x.copy()
    a[i, j] = -np.inf
    assert_close(a, a.copy())
    b = a.copy()
    b[(i + 1) % 4, j] += 1.0
    with pytest.raises(AssertionError, match="values differ"):
        assert_close(b, a)


def test_complex_refused_and_integers_exact():
    rng = _rng()
    re, im = rng.standard_normal(3), rng.standard_normal(3)
    with pytest.raises(TypeError, match="complex"):
        assert_close(np.array([1 + 1j]), np.array([1 - 5j]))
    with pytest.raises(TypeError, match="complex"):
        assert_close(re.astype(np.float64), re + 1j * im)
    assert_close(np.array([10000]), np.array([10000]))
    with pytest.raises(AssertionError, match="differ"):
        assert_close(np.array([10000]), np.array([10001]))
    n = rng.integers(10**6, 10**9, size=7)
    k = int(rng.integers(7))
    m = n.copy()
    m[k] += 1
    with pytest.raises(AssertionError, match=rf"index \({k},\)"):
        assert_close(m, n)
    with pytest.raises(AssertionError, match="differ"):  # beyond float64's 2**53
        assert_close(np.array([2**60 + 1]), np.array([2**60]))
    flags = rng.random(6) < 0.5
    with pytest.raises(AssertionError, match="differ"):
        assert_close(~flags, flags)
    assert_close(m, n, rtol=1e-6)  # the caller's tolerances still apply
    # past 2**53, in exact arithmetic also against a float desired or with tolerances given
    big = 2**60
    with pytest.raises(AssertionError, match="exact comparison"):
        assert_close(np.array([big + 1]), np.array([float(big)]))
    with pytest.raises(AssertionError, match="exact comparison"):
        assert_close(np.array([big + 1]), np.array([big]), atol=0.5)
    with pytest.raises(AssertionError, match="exact comparison"):
        assert_close(np.array([big + 1]), np.array([big]), rtol=1e-30)
    assert_close(np.array([big + 1, 7]), np.array([big, 7]), atol=1)
    assert_close(np.array([big]), np.array([float(big)]))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([big, 1]), np.array([float(big), np.nan]))
    # and a float actual against such a desired (it went through float64, where big + 1 is
    # big: it passed at rtol 0; a review's find)
    with pytest.raises(AssertionError, match=r"exact comparison.*\|actual - desired\| = 1,"):
        assert_close(np.array([float(big)]), np.array([big + 1]), rtol=0)
    with pytest.raises(AssertionError, match="exact comparison"):
        assert_close(np.array([float(big)]), np.array([big + 1]), rtol=0, atol=0)
    assert_close(np.array([float(big), 7.0]), np.array([big, 7]), rtol=0)
    with pytest.raises(AssertionError, match=r"non-finite values differ \(in actual only\)"):
        assert_close(np.array([float(big), np.inf]), np.array([big, 1]))


def test_default_rtol_normalises_dtype_spellings():
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    for spelling in (np.float64, np.dtype("float64"), "float64", "torch.float64", torch.float64, xps.float64):
        assert default_rtol(spelling) == 1e-10, spelling
    for spelling in (np.float16, np.dtype("float16"), "float16", torch.float16, torch.half):
        assert default_rtol(spelling) == 2e-2, spelling
    for spelling in (np.float32, np.dtype("float32"), "float32", torch.float32, xps.float32):
        assert default_rtol(spelling) == 2e-4, spelling
    assert default_rtol(torch.bfloat16) == default_rtol("bfloat16") == 5e-2
    assert default_rtol(np.int64) == default_rtol(torch.int32) == default_rtol(np.bool_) == 0.0
    # long double: float64's tolerance (it had the float32 fallback, and a 5e-5 error passed)
    assert default_rtol(np.longdouble) == default_rtol(np.dtype(np.longdouble).name) == 1e-10
    d = _rng().standard_normal(8).astype(np.longdouble)
    with pytest.raises(AssertionError):
        assert_close(d * (1 + 5e-5), d)
    # complex: float32's; dtypes without a tolerance of their own are refused (8-bit floats,
    # object, string, date and void dtypes had got float32's silently; a review's find)
    assert default_rtol(np.complex128) == default_rtol(torch.complex64) == 2e-4
    for bad in (torch.float8_e4m3fn, np.dtype("O"), "object", "str", np.datetime64, "V8"):
        with pytest.raises(TypeError, match="no default tolerance for dtype"):
            default_rtol(bad)
    # a float8 tensor converts exactly (torch's own conversion refused it), and compares with
    # a tolerance given
    eight = torch.tensor([1.0, -2.5, 448.0]).to(torch.float8_e4m3fn)
    assert_close(eight, np.array([1.0, -2.5, 448.0]), rtol=0)
    with pytest.raises(TypeError, match=r"no default tolerance for dtype torch\.float8_e4m3fn"):
        assert_close(eight, np.array([1.0, -2.5, 448.0]))


def test_device_dtype_normalised_and_tolerances_checked():
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    x = _rng().standard_normal((3, 2))
    t = torch.asarray(x, dtype=torch.float32)
    for dev in ("cpu", torch.device("cpu")):
        assert_close(t, x, device=dev, dtype="float32", xp=torch)
    for dt in ("float32", np.float32, torch.float32):
        assert_close(t, x, dtype=dt)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(t, x, dtype="float64")
    with pytest.raises(AssertionError, match="device"):
        assert_close(t, x, device="meta")
    s = xps.asarray(x)
    assert_close(s, x, device="cpu", dtype="float64")
    assert_close(s, x, device=s.device, dtype=xps.float64)
    with pytest.raises(AssertionError, match="device"):
        assert_close(s, x, device=xps.Device("device1"))
    assert_close(x, x, device="cpu", dtype=np.float64)
    for kw in ({"rtol": -1e-3}, {"atol": -1e-9}, {"rtol": float("nan")}):
        with pytest.raises(ValueError, match=r"rtol|atol"):
            assert_close(x, x, **kw)


def test_dtype_spellings_of_numpy_and_python_get_their_tolerance():
    """Python's float and NumPy's string spellings are float64 (default_rtol gave them the
    float32 tolerance, 2e-4: a check 2e6 times looser than asked, silently)."""
    for spelling in (float, "f8", "float", "double", "float64", np.float64, np.dtype("<f8")):
        assert default_rtol(spelling) == 1e-10, spelling
    assert default_rtol("f4") == default_rtol("torch.float32") == 2e-4
    assert default_rtol(int) == default_rtol("i4") == 0.0
    x = np.linspace(0.5, 1.5, 5)
    for spelling in (float, "f8", "float"):
        assert_close(x, x, dtype=spelling)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x, x, dtype="f4")
    for bad in ("0.1", True):
        with pytest.raises(TypeError, match=r"^rtol must be a real number"):
            assert_close(x, x, rtol=bad)


def test_make_inputs_and_loaders_on_a_device_without_64_bit_types():
    """A device without float64 takes float32 inputs (asked for, or by default), and one without
    any 64-bit type int32 labels, as JAX without x64 does."""
    xs = pytest.importorskip("array_api_strict")
    no_f64 = xs.Device("no_float64")
    for dtype in ("float32", None):
        (x,) = make_inputs([3], batch=2, seed=1, xp=xs, device=no_f64, dtype=dtype)
        assert x.dtype == xs.float32 and x.device == no_f64
    assert make_inputs([3], batch=2, seed=1, xp=xs)[0].dtype == xs.float64
    with pytest.raises(TypeError, match="float64 is not available on device"):  # (not "not a device")
        make_inputs([3], batch=2, seed=1, xp=xs, device=no_f64, dtype="float64")
    no_x64 = xs.Device("no_x64")
    data = load_basic_motions(xp=xs, device=no_x64)
    assert data.views[0].dtype == xs.float32 and data.target.dtype == xs.int32
    want = load_basic_motions()
    assert_close(data.target, want.target)  # (read off the device by the helper)
    assert load_basic_motions(xp=xs).target.dtype == xs.int64


def test_make_inputs_checks_arguments():
    seed = int(_rng().integers(2**31))
    with pytest.raises(ValueError, match="tokens"):
        make_inputs([3, 4], batch=2, tokens=[5], seed=seed)
    with pytest.raises(ValueError, match="cuda"):
        make_inputs([3], batch=2, xp=np, device="cuda", seed=seed)
    with pytest.raises(ValueError, match="cuda"):
        make_inputs([3], batch=2, device="cuda", seed=seed)
    for dt in ("int64", np.int32, "bool"):
        with pytest.raises(TypeError, match="dtype"):
            make_inputs([3, 4], batch=2, dtype=dt, seed=seed)
    xs = make_inputs([3, 4], batch=2, tokens=[5, 6], dtype="float32", seed=seed)
    assert [x.shape for x in xs] == [(2, 5, 3), (2, 6, 4)] and all(x.dtype == np.float32 for x in xs)
    assert all(np.all(x != 0) for x in xs)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="dtype"):
        make_inputs([3], batch=2, xp=torch, dtype="int64", seed=seed)
    (t,) = make_inputs([3], batch=2, xp=torch, dtype="float32", device="cpu", seed=seed)
    assert t.dtype == torch.float32 and t.device.type == "cpu"


def test_make_inputs_names_bad_sizes_seed_and_namespace():
    """Sizes as the initialisers check them (a set has no modality order), the seed and the
    namespace named, rather than NumPy's messages or a silently reordered draw."""
    seed = int(_rng().integers(2**31))
    with pytest.raises(TypeError, match=r"^dims must be a sequence .*got set"):
        make_inputs({3, 4}, batch=2, seed=seed)
    with pytest.raises(TypeError, match=r"^tokens must be a sequence .*got dict"):
        make_inputs([3, 4], batch=2, tokens={5: 1, 6: 1}, seed=seed)
    with pytest.raises(ValueError, match=r"^dims\[1\] must be a positive integer, got 2\.5"):
        make_inputs([3, 2.5], batch=2, seed=seed)
    with pytest.raises(ValueError, match=r"^batch must be a non-negative integer, got -1"):
        make_inputs([3], batch=-1, seed=seed)
    with pytest.raises(TypeError, match=r"^seed must be .*got 'abc'"):
        make_inputs([3], batch=2, seed="abc")
    with pytest.raises(TypeError, match=r"^xp must be an array namespace"):
        make_inputs([3], batch=2, xp="numpy", seed=seed)
    assert [x.shape for x in make_inputs(np.array([3, 4]), batch=0, seed=seed)] == [(0, 3), (0, 4)]


@pytest.mark.parametrize("load", [load_mfeat, load_basic_motions])
def test_loaders_check_device_and_dtype(load):
    with pytest.raises(ValueError, match="cuda"):
        load(xp=np, device="cuda")
    assert load(xp=np, device="cpu").views[0].dtype == np.float64
    torch = pytest.importorskip("torch")
    for bad in (np.float32, "Tensor", np.dtype("float32")):
        with pytest.raises(TypeError, match="dtype"):
            load(xp=torch, dtype=bad)
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="dtype"):
        load(xp=xps, dtype=np.float32)
    assert load(xp=torch, dtype="float16").views[0].dtype == torch.float16


def test_assert_close_names_a_namespace_given_by_name():
    with pytest.raises(TypeError, match=r"^xp must be an array namespace.*got 'numpy'"):
        assert_close(np.ones(3), np.ones(3), xp="numpy")


def test_make_inputs_refuses_arrays_over_max_elements_before_drawing():
    """batch=10**12 raised NumPy's MemoryError ("Unable to allocate 21.8 TiB"), a huge d_m its
    "Maximum allowed dimension exceeded", naming nothing; the initialisers' rule applies."""
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match=r"^make_inputs: xs\[0\] of shape \(B, d_0\) = \(1000000000000, 3\) would have"):
        make_inputs([3], batch=10**12, seed=rng)
    with pytest.raises(ValueError, match=r"xs\[1\] of shape \(B, T_1, d_1\) = \(2, 5, 4\) would have 40 elements, over max_elements=39"):
        make_inputs([3, 4], batch=2, tokens=[2, 5], max_elements=39)
    assert rng.bit_generator.state == state
    assert [x.shape for x in make_inputs([3, 4], batch=2, tokens=[2, 5], max_elements=40)] == [(2, 2, 3), (2, 5, 4)]


def test_torch_aliases_by_name_and_unknown_dtypes():
    """"torch.double" got the float32 tolerance (a float64 check a million times looser),
    "torch.half" too (a float16 check 100 times tighter), and "bogus" or None passed silently
    with it; assert_close(dtype="torch.double") refused a float64 tensor."""
    torch = pytest.importorskip("torch")
    assert default_rtol("torch.double") == default_rtol(torch.double) == 1e-10
    assert default_rtol("torch.half") == default_rtol(torch.half) == 2e-2
    assert default_rtol("torch.float") == default_rtol(torch.float) == 2e-4  # torch's float is float32
    assert default_rtol("float") == 1e-10  # NumPy's (and Python's) float is float64
    assert default_rtol("torch.long") == 0.0
    for bad in ("bogus", "torch.bogus", None):
        with pytest.raises(TypeError, match="dtype"):
            default_rtol(bad)
    x = torch.asarray(_rng().standard_normal(4), dtype=torch.float64)
    assert_close(x, x.numpy(), dtype="torch.double")
    with pytest.raises(TypeError, match="names no dtype"):
        assert_close(x, x.numpy(), dtype="bogus")
    # torch's names NumPy lacks are its dtypes too (they had been said to name no dtype)
    assert default_rtol("torch.complex32") == default_rtol("torch.chalf") == default_rtol(torch.complex32)
    with pytest.raises(TypeError, match="no default tolerance"):
        default_rtol("torch.float8_e4m3fn")


def test_long_doubles_are_compared_as_long_doubles():
    """Through float64, long doubles past its range were inf (or 0) on both sides and a
    factor of 2 passed at rtol 1e-10 (a review's find); the message prints them in full."""
    if np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp:
        pytest.skip("long double is float64 here")
    big, tiny = np.longdouble("1e400"), np.longdouble("1e-400")
    with pytest.raises(AssertionError, match=r"max \|actual - desired\| = 1\.000e\+400"):
        assert_close(np.array([big]), np.array([2 * big]))
    with pytest.raises(AssertionError, match="differ"):
        assert_close(np.array([tiny]), np.array([3 * tiny]))
    assert_close(np.array([big, tiny]), np.array([big, tiny]) * (1 + np.longdouble(2.0**-60)))


def test_the_cpu_by_any_name_in_every_namespace():
    """``device="cpu"`` means the CPU everywhere: JAX (whose asarray wanted a Device) and
    array_api_strict (whose CPU is "CPU_DEVICE") refused it in make_inputs and the loaders;
    torch's "cpu:0" failed assert_close against a tensor on "cpu"; the loaders without xp
    refused torch.device("cpu")."""
    import mmfuse.datasets as ds

    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    x = make_inputs([3], batch=2, xp=xps, device="cpu", seed=1)[0]
    assert_close(x, make_inputs([3], batch=2, seed=1)[0], device="cpu")
    t = make_inputs([3], batch=2, xp=torch, device="cpu:0", seed=1)[0]
    for dev in ("cpu:0", torch.device("cpu", 0), "cpu"):
        assert_close(t, np.asarray(t), device=dev)
    assert isinstance(make_inputs([3], batch=2, device=torch.device("cpu"))[0], np.ndarray)
    assert ds.load_basic_motions(device=torch.device("cpu")).n_samples == 80
    jax = pytest.importorskip("jax")
    y = ds.load_basic_motions(xp=jax.numpy, device="cpu", dtype="float32").views[0]
    assert {d.platform for d in y.devices()} == {"cpu"}


def test_jax_float64_without_x64_is_refused_by_name():
    """Asking for float64 under JAX's default 32-bit mode gave float32 arrays and one warning
    per array; it names the mode now, in the loaders, make_inputs and the initialisers (which
    returned float32 parameters for dtype=float64)."""
    import mmfuse
    import mmfuse.datasets as ds

    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        for call in (lambda: ds.load_mfeat(xp=jax.numpy, dtype="float64"),
                     lambda: make_inputs([3], batch=2, xp=jax.numpy, dtype=jax.numpy.float64),
                     lambda: mmfuse.init_lowrank([3], rank=2, out_dim=2, seed=0, xp=jax.numpy, dtype=jax.numpy.float64),
                     lambda: mmfuse.init_wander([4], [3], rank=2, feature_rank=1, token_rank=1, out_dim=4,
                                                seed=0, xp=jax.numpy, dtype="float64")):  # fmt: skip
            with pytest.raises(TypeError, match="float64 needs JAX's 64-bit mode"):
                call()
        assert make_inputs([3], batch=2, xp=jax.numpy)[0].dtype == jax.numpy.float32
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_loaders_check_the_seed_without_shuffling():
    import mmfuse.datasets as ds

    with pytest.raises(TypeError, match="seed"):
        ds.load_mfeat(seed="a")
    assert ds.load_mfeat(seed=3).n_samples == 2000


@pytest.mark.parametrize("version", ["2022.12", "2023.12"])
def test_strict_arrays_off_the_cpu_device_are_read(version):
    """At the 2022.12 standard array_api_strict refuses NumPy's DLPack request and copies through
    ``__array__``, from its CPU device only: assert_close and backend="reference" failed on
    an array of another of its devices."""
    strict = pytest.importorskip("array_api_strict")
    import mmfuse

    x = _rng().standard_normal((2, 5, 3)) + 3.0
    with strict.ArrayAPIStrictFlags(api_version=version):
        a = strict.asarray(x, device=strict.Device("device1"))
        assert_close(a, x)
        mean, _ = mmfuse.moments(a, backend="reference")
        assert mean.device == a.device
        assert_close(mean, x.mean(axis=1, keepdims=True))
        # device="cpu" means its CPU device: at 2022.12 (no __array_namespace_info__) the
        # initialisers refused it ("'cpu' is not a device of array_api_strict")
        p = mmfuse.init_lowrank([3], rank=2, out_dim=2, seed=0, xp=strict, device="cpu")
        assert p["factors"][0].device == strict.Device("CPU_DEVICE")


def test_tensors_with_the_negative_bit_are_read_with_their_sign():
    """DLPack exports a ``torch._neg_view`` tensor's raw memory without its negative bit:
    ``backend="reference"`` computed on the negated values and ``assert_close`` failed equal
    tensors (and passed opposite ones)."""
    torch = pytest.importorskip("torch")
    import mmfuse

    x = torch.asarray(_rng().standard_normal((2, 5, 3)) + 3.0)
    n = torch._neg_view(-x)
    assert n.is_neg() and torch.equal(n, x)
    assert_close(n, x)
    with pytest.raises(AssertionError, match="differ"):
        assert_close(n, -x)
    for got, want in zip(mmfuse.moments(n, backend="reference"), mmfuse.moments(x, backend="reference")):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bfloat16_of_jax_and_ml_dtypes_is_compared_at_its_tolerance():
    """assert_close refused JAX's bfloat16 (and NumPy's through ml_dtypes: NumPy kind "V") as
    "numeric arrays only", where torch's was compared at bfloat16's 5e-2."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng()
    want = rng.standard_normal(6)
    arrays = [want.astype(ml_dtypes.bfloat16)]
    jax = pytest.importorskip("jax")
    arrays.append(jax.numpy.asarray(want, dtype=jax.numpy.bfloat16))
    for got in arrays:
        assert_close(got, want, dtype="bfloat16")
        with pytest.raises(AssertionError, match="values differ"):
            assert_close(got, want + 0.2 * np.abs(want).max())


def test_meta_tensors_are_refused_by_name():
    """A torch meta tensor (shapes, no values) raised torch's bare NotImplementedError."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^assert_close compares values; actual is a tensor on the 'meta' device"):
        assert_close(torch.ones(3, device="meta"), np.ones(3))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("layout", ["strided", "jagged"])
def test_nested_tensors_are_refused_by_name(layout):
    """A nested tensor raised torch's "Internal error: NestedTensorImpl doesn't support sizes"
    (strided) or ".numpy() is not supported for tensor subclasses" (jagged; a review's find)."""
    torch = pytest.importorskip("torch")
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=getattr(torch, layout))
    with pytest.raises(TypeError, match=r"^assert_close compares dense arrays; actual is a nested tensor"):
        assert_close(nested, np.ones(2))
    with pytest.raises(TypeError, match=r"^assert_close compares dense arrays; desired is a nested tensor"):
        assert_close(np.ones(2), nested)


def test_a_bool_seed_is_refused_everywhere():
    """NumPy's default_rng takes True as the seed 1: the loaders, make_inputs and the
    initialisers accepted seed=True (a flag passed in the seed's place) silently."""
    import mmfuse

    calls = [
        lambda: load_mfeat(seed=True),
        lambda: make_inputs([3], batch=2, seed=True),
        lambda: mmfuse.init_lowrank([3], rank=2, out_dim=2, seed=np.bool_(False)),
        lambda: mmfuse.init_wander([4], [3], rank=2, feature_rank=2, token_rank=2, out_dim=4, seed=True),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"^seed must be what numpy.random.default_rng takes: None, a non-negative int or a sequence of them, a SeedSequence, a BitGenerator or a Generator \(not a bool, which NumPy would take as the seed 1\), got"):
            call()


def test_make_inputs_draws_no_zero_in_16_bits_and_takes_torchs_dtype_names():
    """float16 rounds draws under 3e-8 to 0 (about one in 4e7): such a draw takes float16's
    smallest subnormal with its sign, as the docstring's "never zeros" promises; other draws
    are the float64 draw rounded, and float32 / float64 draws are unchanged.  And torch's own
    spelling of its dtypes (``str(torch.float32)``) is a dtype name, as in the tolerances
    (a review's finds)."""
    from mmfuse import testing

    a = np.array([1e-9, -2e-8, 2.0**-25, 0.5, -1.25e-7])
    got = testing._nonzero(a.copy(), np.float16).astype(np.float16)
    tiny = np.float16(2.0**-24)
    np.testing.assert_array_equal(got, np.array([tiny, -tiny, tiny, 0.5, -1.25e-7], np.float16))
    assert (got != 0).all()
    for dtype in (None, np.float64, np.float32):
        np.testing.assert_array_equal(testing._nonzero(a.copy(), dtype), a)
    (x,) = make_inputs([1024], batch=70000, seed=0, dtype="float16")  # (had 1 zero)
    assert x.dtype == np.float16 and (x != 0).all()
    (w,) = make_inputs([1024], batch=70000, seed=0)
    np.testing.assert_array_equal(x[w.astype(np.float16) != 0], w.astype(np.float16)[w.astype(np.float16) != 0])
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        (t,) = make_inputs([3], batch=2, xp=torch, dtype=str(dtype))
        assert t.dtype == dtype
    with pytest.raises(TypeError, match=r"dtype 'numpy.float32' is not a dtype of the namespace torch"):
        make_inputs([3], batch=2, xp=torch, dtype="numpy.float32")
    with pytest.raises(AssertionError, match=r"dtype float32 != float64$"):
        assert_close(torch.ones(2), np.ones(2), dtype=np.float64)


def test_assert_close_refuses_what_its_rules_refuse():
    """Each rule of assert_close at work on its own (a mutation review found each could be
    dropped or loosened with every test still passing): a NaN against a finite value either
    way, a shape that only broadcasts (floats and exact integers), another namespace than
    ``xp``, the tolerance at its bound atol + rtol |desired| with atol = rtol max|desired|,
    exact comparisons past float64, a tensor off the CPU for ``device="cpu"``, and
    ``err_msg`` in the message."""
    rng = _rng()
    x = 1.0 + rng.random(3)
    for a, d in ((np.array([np.nan, 2.0]), np.array([1.0, 2.0])), (np.array([1.0, 2.0]), np.array([np.nan, 2.0]))):
        with pytest.raises(AssertionError, match="non-finite"):
            assert_close(a, d)
    for a, d in ((np.ones((2, 3)), np.ones(3)), (np.ones((2, 3), dtype=np.int64), np.ones(3, dtype=np.int64))):
        with pytest.raises(AssertionError, match=r"shape \(2, 3\) != \(3,\)"):
            assert_close(a, d)
    rtol = default_rtol(np.float64)
    scale = float(np.max(np.abs(x)))
    bound = rtol * scale + rtol * np.abs(x)  # per entry
    assert_close(x + 0.9 * bound, x)
    with pytest.raises(AssertionError):
        assert_close(x + 1.1 * bound, x)
    with pytest.raises(AssertionError, match="exact"):
        assert_close(np.array([2**60 + 1]), np.array([0]), rtol=0, atol=2**60)
    with pytest.raises(AssertionError, match=r"^CTX"):
        assert_close(np.ones(2), np.zeros(2), err_msg="CTX")
    torch = pytest.importorskip("torch")
    with pytest.raises(AssertionError, match="namespace numpy != torch"):
        assert_close(np.ones(2), np.ones(2), xp=torch)
    with pytest.raises(AssertionError, match="device"):
        assert_close(torch.ones(2, device="meta"), np.ones(2), device="cpu")
