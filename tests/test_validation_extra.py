"""Input validation and namespace edge cases: torch bfloat16 on the reference path, NumPy
subclasses that change arithmetic, lowrank_to_tensor's size guard, option types, Dask
parameter chunks, and ``mmfuse verify`` with unknown or unavailable backends."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import mmfuse
import mmfuse.reference as ref
from mmfuse import _cli
from mmfuse._namespace import to_numpy, tree_map
from mmfuse._problems import OPS, make_problem
from mmfuse.testing import assert_close, default_rtol

# --------------------------------------------------------------------------- torch bfloat16


def _leaves(obj):
    return [leaf for o in obj for leaf in _leaves(o)] if isinstance(obj, (list, tuple)) else [obj]


@pytest.mark.parametrize("op", sorted(OPS))
def test_reference_backend_takes_torch_bfloat16(op, rng):
    torch = pytest.importorskip("torch")
    args, kwargs = make_problem(op, seed=rng)

    def to_bf16(a):
        t = torch.from_numpy(np.array(a))
        return t if a.dtype == np.bool_ else t.bfloat16()

    def rounded(a):  # the values the bfloat16 inputs hold, exactly, in float64
        return a if a.dtype == np.bool_ else to_bf16(a).double().numpy()

    b_args, b_kwargs = tree_map(to_bf16, args), tree_map(to_bf16, kwargs)
    got = _leaves(getattr(mmfuse, op)(*b_args, **b_kwargs, backend="reference"))
    want = _leaves(getattr(ref, op)(*tree_map(rounded, args), **tree_map(rounded, kwargs)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if not isinstance(w, np.ndarray):  # the interaction terms' labels (orders or subsets)
            assert g == w
            continue
        assert isinstance(g, torch.Tensor)
        # the float64 reference rounded once to bfloat16
        assert_close(g, w, xp=torch, dtype=torch.bfloat16, device=torch.device("cpu"), rtol=1e-2)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("backend", [None, "torch", "array_api", "reference"])
def test_every_operator_refuses_torch_float8_naming_the_argument(op, backend, rng):
    """float8 passed the real-floating check: the core widened it to float32, the torch
    backend failed in torch ("bmm" not implemented for 'Float8_e4m3fn'), the reference in
    its conversion (a review's find).  Every implementation refuses it now, up front."""
    torch = pytest.importorskip("torch")
    args, kwargs = make_problem(op, seed=rng)

    def to_f8(a):
        t = torch.from_numpy(np.array(a))
        return t if a.dtype == np.bool_ else t.to(torch.float8_e4m3fn)

    with pytest.raises(TypeError, match=r"has dtype torch.float8_e4m3fn, a float of fewer than 16 bits: mmfuse computes in "):
        getattr(mmfuse, op)(*tree_map(to_f8, args), **tree_map(to_f8, kwargs), backend=backend)


def test_jax_float8_and_8_bit_parameters_and_data_are_refused():
    """The same rule for JAX's float8 (the core had widened it), the initialisers' and the
    loaders' ``dtype`` (mfeat's features reach 17572, float8_e4m3fn's largest is 448)."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^dtype is torch.float8_e5m2, a float of fewer than 16 bits"):
        mmfuse.init_lowrank([3, 4], out_dim=5, rank=2, seed=1, xp=torch, dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match=r"^dtype is torch.float8_e4m3fn, a float of fewer than 16 bits"):
        mmfuse.init_wander([4, 4], [3, 3], rank=2, feature_rank=2, token_rank=2, out_dim=4, seed=1,
                           xp=torch, dtype=torch.float8_e4m3fn)  # fmt: skip
    from mmfuse import datasets

    with pytest.raises(TypeError, match=r"^dtype is torch.float8_e4m3fn, a float of fewer than 16 bits"):
        datasets.load_mfeat(xp=torch, dtype=torch.float8_e4m3fn)
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.ones((2, 3, 4), jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^x has dtype float8_e4m3fn, a float of fewer than 16 bits"):
        mmfuse.zoom_shift(x, x)


def test_to_numpy_converts_torch_bfloat16_exactly(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 6))).bfloat16().requires_grad_()
    kept = to_numpy(x, dtype=None)
    assert kept.dtype == np.float32  # NumPy has no bfloat16; float32 holds it exactly
    np.testing.assert_array_equal(kept, x.detach().float().numpy())
    np.testing.assert_array_equal(to_numpy(x), x.detach().double().numpy())
    assert x.dtype == torch.bfloat16 and x.requires_grad  # untouched


def test_assert_close_compares_bfloat16_with_its_tolerance(rng):
    torch = pytest.importorskip("torch")
    assert default_rtol(torch.bfloat16) == 5e-2
    want = rng.uniform(1.0, 2.0, size=(3, 5))
    close = torch.from_numpy(want * (1 + 0.02)).bfloat16()  # ~2% off: within bfloat16's 5e-2
    assert_close(close, want, dtype=torch.bfloat16)
    far = torch.from_numpy(want * 1.3).bfloat16()
    with pytest.raises(AssertionError, match=r"values differ.*rtol=0\.05"):
        assert_close(far, want)


# --------------------------------------------------------------------------- ndarray subclasses


def _lowrank_problem(rng, dims=(4, 3), rank=3, out_dim=2, batch=6):
    xs = [rng.standard_normal((batch, d)) for d in dims]
    p = mmfuse.init_lowrank(list(dims), rank=rank, out_dim=out_dim, seed=rng, dtype=np.float64)
    p["weights"] = rng.standard_normal(rank)
    p["bias"] = rng.standard_normal(out_dim)
    return xs, p


def _masked(a, rng):
    return np.ma.MaskedArray(a, mask=rng.random(a.shape) < 0.3)


@pytest.mark.parametrize("backend", ["array_api", "reference", None])
def test_masked_array_input_is_rejected_naming_the_argument(backend, rng):
    xs, p = _lowrank_problem(rng)
    want = ref.lowrank_fusion(xs, **p)
    # plain and read-only arrays (and harmless subclasses) still go through
    readonly = [x.copy() for x in xs]
    for x in readonly:
        x.setflags(write=False)
    assert_close(mmfuse.lowrank_fusion(readonly, **p, backend=backend), want)
    masked = [xs[0], _masked(xs[1], rng)]
    with pytest.raises(TypeError, match=r"xs\[1\] is a numpy\.ma\.MaskedArray.*present"):
        mmfuse.lowrank_fusion(masked, **p, backend=backend)
    factors = [_masked(p["factors"][0], rng), p["factors"][1]]
    with pytest.raises(TypeError, match=r"factors\[0\] is a numpy\.ma\.MaskedArray"):
        mmfuse.lowrank_fusion(xs, factors, p["weights"], p["bias"], backend=backend)
    x = rng.standard_normal((3, 5, 4))
    with pytest.raises(TypeError, match=r"^x is a numpy\.ma\.MaskedArray.*mask"):
        mmfuse.moments(_masked(x, rng), backend=backend)
    guide = rng.standard_normal((3, 7, 4))
    with pytest.raises(TypeError, match=r"numpy\.ma\.MaskedArray"):
        mmfuse.zoom_shift(x, _masked(guide, rng), backend=backend)


@pytest.mark.parametrize("backend", ["array_api", "reference", None])
def test_a_dask_array_of_masked_chunks_is_rejected_too(backend, rng):
    """Dask arrays whose chunks are masked arrays (``dask.array.ma``) passed the check, and
    the backends then disagreed (auto's mean was neither the masked nor the plain one; a
    review's find).  Refused as a masked array itself, also where a plain Dask array of the
    same shape and chunks planned the signature first."""
    da = pytest.importorskip("dask.array")
    x = rng.standard_normal((6, 5, 3))
    guide = da.from_array(rng.standard_normal((6, 4, 3)), chunks=(3, 4, 3))
    plain = da.from_array(x, chunks=(3, 5, 3))
    masked = da.ma.masked_greater(plain, 1.0)
    mmfuse.moments(plain, backend=backend)  # planned with plain chunks
    mmfuse.zoom_shift(plain, guide, backend=backend)
    with pytest.raises(TypeError, match=r"^x is a Dask array of numpy\.ma\.MaskedArray chunks.*mask"):
        mmfuse.moments(masked, backend=backend)
    with pytest.raises(TypeError, match=r"^guide is a Dask array of numpy\.ma\.MaskedArray chunks"):
        mmfuse.zoom_shift(plain, da.ma.masked_greater(guide, 1.0), backend=backend)
    with pytest.raises(TypeError, match=r"^xs\[1\] is a Dask array of numpy\.ma\.MaskedArray chunks"):
        mmfuse.align([plain, masked], backend=backend)


def test_masked_array_with_no_mask_set_is_still_rejected(rng):
    # even np.ma.asarray(x) (mask all False) switches np.sum(..., out=) to MaskedArray.sum
    x = rng.standard_normal((2, 6, 3))
    with pytest.raises(TypeError, match=r"x is a numpy\.ma\.MaskedArray"):
        mmfuse.moments(np.ma.asarray(x))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_matrix_input_is_rejected(rng):
    xs, p = _lowrank_problem(rng)
    weight = ref.lowrank_to_tensor(p["factors"], p["weights"])
    with pytest.raises(TypeError, match=r"xs\[0\] is a numpy\.matrix"):
        mmfuse.tensor_fusion([np.asmatrix(xs[0]), xs[1]], weight)
    with pytest.raises(TypeError, match=r"xs\[1\] is a numpy\.matrix"):
        mmfuse.lowrank_fusion([xs[0], np.asmatrix(xs[1])], **p)


def test_memmap_inputs_still_work(tmp_path, rng):
    xs, p = _lowrank_problem(rng)
    mapped = []
    for m, x in enumerate(xs):
        mm = np.memmap(tmp_path / f"x{m}.dat", dtype=x.dtype, mode="w+", shape=x.shape)
        mm[...] = x
        mapped.append(mm)
    assert_close(mmfuse.lowrank_fusion(mapped, **p), ref.lowrank_fusion(xs, **p))
    masked = [_masked(xs[0], rng), xs[1]]
    with pytest.raises(TypeError, match=r"MaskedArray"):
        mmfuse.cp_fusion(masked, mmfuse_cp(rng, xs))


def mmfuse_cp(rng, xs, rank=3, out_dim=2):
    return (
        rng.standard_normal(rank),
        [rng.standard_normal((x.shape[1] + 1, rank)) for x in xs] + [rng.standard_normal((out_dim, rank))],
    )


# --------------------------------------------------------------------------- lowrank_to_tensor guard


def test_lowrank_to_tensor_refuses_sizes_over_max_elements(rng):
    # full (5, 4, 2, 3): 120 elements; the rank terms over all but the last modality
    # (8, 5, 4, 3): 480
    factors = [rng.standard_normal((8, d, 3)) for d in (5, 4, 2)]
    weights = rng.standard_normal(8)
    want = ref.lowrank_to_tensor(factors, weights)
    assert_close(mmfuse.lowrank_to_tensor(factors, weights, max_elements=np.int64(480)), want)
    with pytest.raises(
        ValueError,
        match=r"lowrank_to_tensor: building the full weight of shape "
        r"\(5, 4, 2, 3\).*\(8, 5, 4, 3\) with 480 elements, over max_elements=479",
    ):
        mmfuse.lowrank_to_tensor(factors, weights, max_elements=479)
    with pytest.raises(
        ValueError,
        match=r"lowrank_to_tensor: the full weight of shape \(5, 4, 2, 3\) "
        r"has 120 elements, over max_elements=119; use lowrank_fusion",
    ):
        mmfuse.lowrank_to_tensor(factors, weights, max_elements=119)
    for bad in (0, True, 2.0**40, "big"):
        with pytest.raises(ValueError, match=r"max_elements must be a positive integer"):
            mmfuse.lowrank_to_tensor(factors, weights, max_elements=bad)
    # the review's case: ~60 GiB of float64, refused by the default before any allocation
    with pytest.raises(
        ValueError,
        match=r"\(2000, 2000, 2000, 2000, 1\) has 16000000000000 elements, "
        r"over max_elements=134217728",
    ):
        mmfuse.lowrank_to_tensor([np.ones((1, 2000, 1))] * 4)


def test_lowrank_to_tensor_max_elements_is_keyword_only_with_the_default():
    param = inspect.signature(mmfuse.lowrank_to_tensor).parameters["max_elements"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY
    assert param.default == mmfuse.DEFAULT_MAX_ELEMENTS == 2**27
    assert "max_elements" in (mmfuse.lowrank_to_tensor.__doc__ or "")


# --------------------------------------------------------------------------- option types


def test_max_elements_takes_numpy_integers_and_refuses_bools(rng):
    xs, p = _lowrank_problem(rng)
    weight = ref.lowrank_to_tensor(p["factors"], p["weights"])
    want = ref.tensor_fusion(xs, weight, p["bias"])
    for ok in (np.int64(10**9), np.uint32(10**6), 10**9):
        assert_close(mmfuse.tensor_fusion(xs, weight, p["bias"], max_elements=ok), want)
    for bad in (True, False, np.bool_(True), 1e9, "1000", 0, -3):
        with pytest.raises(ValueError, match=r"^max_elements must be a positive integer, got "):
            mmfuse.tensor_fusion(xs, weight, p["bias"], max_elements=bad)


def test_append_one_must_be_a_bool_numpy_bools_included(rng):
    xs, p = _lowrank_problem(rng)
    weight = ref.lowrank_to_tensor(p["factors"], p["weights"])
    cp = mmfuse_cp(rng, xs)
    calls = [
        lambda a: mmfuse.tensor_fusion(xs, weight, append_one=a),
        lambda a: mmfuse.lowrank_fusion(xs, **p, append_one=a),
        lambda a: mmfuse.cp_fusion(xs, cp, append_one=a),
        lambda a: mmfuse.init_lowrank([4, 3], rank=2, out_dim=2, append_one=a),
    ]
    for bad in ("no", "False", 0, 1, None, np.array(True)):
        for call in calls:
            with pytest.raises(TypeError, match=r"^append_one must be a bool \(True or False\), got "):
                call(bad)
    for flag in (np.bool_(True), np.bool_(False)):
        params = mmfuse.init_lowrank([4, 3], rank=2, out_dim=3, seed=rng, append_one=flag)
        assert params["factors"][0].shape == (2, 4 + bool(flag), 3)
        got = mmfuse.lowrank_fusion(xs, **params, append_one=flag)
        assert_close(got, ref.lowrank_fusion(xs, **params, append_one=bool(flag)))
        cp = (
            rng.standard_normal(2),
            [rng.standard_normal((x.shape[1] + bool(flag), 2)) for x in xs] + [rng.standard_normal((3, 2))],
        )
        assert_close(mmfuse.cp_fusion(xs, cp, append_one=flag), ref.cp_fusion(xs, cp, append_one=bool(flag)))


def test_append_one_numpy_bool_reaches_the_torch_ops_as_a_bool(rng):
    torch = pytest.importorskip("torch")
    xs, _ = _lowrank_problem(rng)
    tp = mmfuse.init_lowrank([4, 3], rank=2, out_dim=3, seed=rng, xp=torch, dtype=torch.float64)
    want = ref.lowrank_fusion(xs, **{k: tree_map(lambda t: t.numpy(), v) for k, v in tp.items()})
    txs = [torch.from_numpy(x) for x in xs]
    got = mmfuse.lowrank_fusion(txs, **tp, append_one=np.bool_(True), backend="torch")
    assert_close(got, want, xp=torch, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^append_one must be a bool"):
        mmfuse.lowrank_fusion(txs, **tp, append_one=torch.tensor(True), backend="torch")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": [3, 2.7]}, r"dims\[1\] must be a positive integer, got 2\.7"),
        ({"dims": ["3", 2]}, r"dims\[0\] must be a positive integer, got '3'"),
        ({"dims": [3, True]}, r"dims\[1\] must be a positive integer, got True"),
        # (the scalars' reprs as NumPy writes them: "np.float64(2.0)" from NumPy 2, "2.0" before)
        ({"dims": [3, np.float64(2.0)]}, r"dims\[1\] must be a positive integer, got " + re.escape(repr(np.float64(2.0)))),
        ({"rank": 2.5}, r"rank must be a positive integer, got 2\.5"),
        ({"rank": True}, r"rank must be a positive integer, got True"),
        ({"out_dim": 4.0}, r"out_dim must be a positive integer, got 4\.0"),
        ({"out_dim": np.float32(3.0)}, r"out_dim must be a positive integer, got " + re.escape(repr(np.float32(3.0)))),
    ],
)
def test_init_lowrank_rejects_non_integer_sizes(kwargs, message):
    args = {"dims": [3, 2], "rank": 2, "out_dim": 4, **kwargs}
    with pytest.raises(ValueError, match="^" + message):
        mmfuse.init_lowrank(args.pop("dims"), **args, seed=0)


def test_init_lowrank_takes_numpy_integer_sizes_but_not_a_bare_int(rng):
    p = mmfuse.init_lowrank(np.array([3, 5]), rank=np.int32(2), out_dim=np.int64(4), seed=rng)
    assert [f.shape for f in p["factors"]] == [(2, 4, 4), (2, 6, 4)]
    with pytest.raises(TypeError, match=r"^dims must be a sequence of positive integers .*got int"):
        mmfuse.init_lowrank(3, rank=2, out_dim=4, seed=rng)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, "int16"])
def test_init_lowrank_rejects_non_floating_dtypes(dtype, rng):
    gen = np.random.default_rng(rng.integers(2**32))
    state = gen.bit_generator.state
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype .*got (int|bool)"):
        mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=gen, dtype=dtype)
    assert gen.bit_generator.state == state  # refused before drawing


def test_init_lowrank_rejects_torch_integer_dtype(rng):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype .*got torch\.int64"):
        mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=rng, xp=torch, dtype=torch.int64)
    p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=rng, xp=torch, dtype=torch.bfloat16)
    assert p["weights"].dtype == torch.bfloat16


@pytest.mark.parametrize("init", ["lowrank", "wander"])
def test_initialisers_name_a_dtype_the_namespace_does_not_know(init, rng):
    """A misspelt dtype (NumPy's "data type not understood", torch's "argument 'dtype'"): a
    TypeError naming ``dtype`` and the value, before anything is drawn.  (A dtype's name,
    "float32", is that namespace's dtype in every namespace since the fifteenth session, as
    make_inputs and the loaders take it; it was refused on torch.)"""
    gen = np.random.default_rng(rng.integers(2**32))
    state = gen.bit_generator.state
    calls = {
        "lowrank": lambda **kw: mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=gen, **kw),
        "wander": lambda **kw: mmfuse.init_wander(
            [4, 4], [3, 2], rank=2, feature_rank=2, token_rank=2, out_dim=4, seed=gen, **kw
        ),
    }
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype of the namespace .*got 'floot'"):
        calls[init](dtype="floot")
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype of the namespace .*got 'floot'"):
        calls[init](dtype="floot", xp=torch)
    # a bad device is still the device's own error, not called a dtype's
    with pytest.raises(ValueError, match=r"device='cuda': NumPy arrays live on the CPU only"):
        calls[init](dtype=np.float32, device="cuda")
    assert gen.bit_generator.state == state  # refused before drawing
    # float64 on a device without it is the dtype's refusal, not the device's ("not a device
    # of array_api_strict" before; a review's find), and that device's default is float32
    strict = pytest.importorskip("array_api_strict")
    device = strict.Device("no_float64")
    with pytest.raises(TypeError, match=r"^dtype array_api_strict.float64 is not available on device=.*pass a narrower dtype"):
        calls[init](xp=strict, device=device, dtype=strict.float64)
    with pytest.raises(ValueError, match=r"^device='gpu' is not a device of array_api_strict"):
        calls[init](xp=strict, device="gpu", dtype=strict.float64)
    assert gen.bit_generator.state == state
    params = calls[init](xp=strict, device=device)
    assert params["factors" if init == "lowrank" else "feature"][0].dtype == strict.float32


@pytest.mark.parametrize("maker", ["init_lowrank", "init_wander", "make_inputs", "load_mfeat"])
def test_dask_refuses_a_device_other_than_the_cpu(maker, rng):
    """mmfuse makes Dask arrays of NumPy chunks: ``xp=dask.array`` with device "cuda", a typo
    or 42 was accepted and ignored (CPU arrays came back), where NumPy and array_api_compat's
    Dask refuse it (a review's find).  A ValueError naming the device, before anything is
    drawn; the CPU however spelt, and the devices array_api_compat's Dask namespace lists (its
    DASK_DEVICE too), still make Dask arrays."""
    da = pytest.importorskip("dask.array")
    compat_dask = pytest.importorskip("array_api_compat.dask.array")
    from mmfuse.datasets import load_mfeat
    from mmfuse.testing import make_inputs

    gen = np.random.default_rng(rng.integers(2**32))
    state = gen.bit_generator.state
    calls = {
        "init_lowrank": lambda device: mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=gen, xp=da, device=device),
        "init_wander": lambda device: mmfuse.init_wander(
            [4, 4], [3, 2], rank=2, feature_rank=2, token_rank=2, out_dim=4, seed=gen, xp=da, device=device
        ),
        "make_inputs": lambda device: make_inputs([3, 2], batch=2, seed=gen, xp=da, device=device),
        "load_mfeat": lambda device: load_mfeat(xp=da, device=device),
    }
    for device in ("cuda", "bogus", 42):
        with pytest.raises(ValueError, match=rf"^device={device!r} is not a device of dask\.array: mmfuse makes"):
            calls[maker](device)
    assert gen.bit_generator.state == state
    accepted = [None, "cpu", "CPU", "cpu:0", *compat_dask.__array_namespace_info__().devices()]
    if importlib.util.find_spec("torch") is not None:
        import torch

        accepted.append(torch.device("cpu"))
    for device in accepted:
        made = calls[maker](device)
        arrays = made.views if maker == "load_mfeat" else made if maker == "make_inputs" else made["down" if maker == "init_wander" else "factors"]
        first = arrays[0][0] if maker == "init_wander" else arrays[0]
        assert isinstance(first, da.Array)


# --------------------------------------------------------------------------- Dask parameter chunks


def test_dask_lowrank_fusion_with_parameters_chunked_off_the_batch_axis(rng):
    da = pytest.importorskip("dask.array")
    dims, rank, out_dim, batch = (6, 5, 4), 4, 3, 13
    xs, p = _lowrank_problem(rng, dims=dims, rank=rank, out_dim=out_dim, batch=batch)
    present = rng.random((batch, len(dims))) < 0.7
    want = ref.lowrank_fusion(xs, **p, present=present)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mmfuse.lowrank_fusion(
            [da.from_array(x, chunks=(c, 2)) for x, c in zip(xs, (4, 6, 5))],
            [da.from_array(f, chunks=(1, 2, 1)) for f in p["factors"]],
            da.from_array(p["weights"], chunks=1),
            da.from_array(p["bias"], chunks=1),
            present=da.from_array(present, chunks=(5, 1)),
        )
        assert got.shape == (batch, out_dim)
        assert got.numblocks[1] == 1
        assert_close(got.compute(), want)


# --------------------------------------------------------------------------- mmfuse verify


def test_verify_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        _cli.main(["verify", "--backends", "bogus", "--ops", "moments", "--no-progress"])
    assert info.value.code == 2
    assert "unknown backend 'bogus'; valid backends: array_api, reference, numba, cupy, torch" in str(
        info.value
    )
    assert "valid backends" in capsys.readouterr().err


def test_verify_unknown_backend_exits_2_from_the_command_line():
    res = subprocess.run(
        [sys.executable, "-m", "mmfuse", "verify", "--backends", "array_api", "bogus", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "unknown backend 'bogus'" in res.stderr and "valid backends: array_api" in res.stderr
    assert "passed" not in res.stdout  # nothing was run


def test_verify_says_when_a_named_backend_cannot_run(monkeypatch, capsys):
    from mmfuse.backends import _registry

    # cupy as if not installed, whatever this machine has
    monkeypatch.setitem(_registry._plugin_errors, "cupy", "ImportError: no CuPy in this test")
    monkeypatch.setattr(_registry, "ROWS", tuple(r for r in _registry.ROWS if r.backend != "cupy"))
    monkeypatch.setattr(_registry, "_CHOICES", {})
    code = _cli.main(
        [
            "verify",
            "--ops",
            "moments",
            "--backends",
            "cupy",
            "array_api",
            "--namespaces",
            "numpy",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    # the row says why; the status says the check asked for did not happen (it was 0 before)
    assert code == 1
    assert "nothing was checked for backend cupy" in captured.err
    lines = [line for line in out.splitlines() if line.startswith("moments")]
    assert any("cupy" in line and "skipped" in line and "no CuPy in this test" in line for line in lines)
    assert sum("array_api" in line and " ok " in line for line in lines) == 6  # 2 dtypes, 3 problems


def test_device_mismatch_names_the_devices_plainly():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, generator=g)
    factor = torch.empty(2, 4, 5, device="meta")
    with pytest.raises(ValueError, match=r"^factors\[0\] is on device meta but xs\[0\] is on cpu$"):
        mmfuse.lowrank_fusion([x], [factor])


def test_initialisers_name_a_bad_namespace_seed_or_unordered_sizes():
    """Found by fuzzing invalid inputs: each was NumPy's message or an AttributeError, or (a set
    or dict of sizes) silently reordered modalities."""
    import math

    wander_sizes = {"rank": 4, "feature_rank": 2, "token_rank": 3, "out_dim": 8}
    inits = [
        lambda **kw: mmfuse.init_lowrank(kw.pop("dims", [3, 2]), rank=2, out_dim=3, **kw),
        lambda **kw: mmfuse.init_wander(kw.pop("dims", [8, 8]), [6, 5], **wander_sizes, **kw),
    ]
    for init in inits:
        for xp in ("torch", math):
            with pytest.raises(TypeError, match=r"xp must be an array namespace, the module itself"):
                init(xp=xp)
        for seed, err in (("a", TypeError), (1.5, TypeError), (-1, ValueError)):
            with pytest.raises(err, match=r"seed must be what numpy.random.default_rng takes: None, a non-negative int or a sequence of them"):
                init(seed=seed)
        for dims in ({8, 2}, {8: 1, 2: 1}):
            with pytest.raises(TypeError, match=r"dims must be a sequence of positive integers .* got (set|dict)"):
                init(dims=dims)
        init(dims=np.array([8, 8]), seed=np.int64(3), xp=np)  # NumPy sizes and seeds stay fine
    from mmfuse.datasets import load_mfeat

    with pytest.raises(TypeError, match=r"xp must be an array namespace"):
        load_mfeat(xp="numpy")
    with pytest.raises(TypeError, match=r"seed must be what numpy.random.default_rng takes"):
        load_mfeat(shuffle=True, seed="a")


def test_sparse_torch_tensors_are_refused_by_name():
    """Sparse tensors reached torch's own errors deep inside each operator (NotImplementedError
    for aten::fill_, "reshape is not implemented for sparse tensors", ...), one operator
    accepting them; they are refused at the boundary, after a dense call's plan too."""
    torch = pytest.importorskip("torch")
    p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, xp=torch, seed=0)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    seq = torch.randn(2, 3, 4)
    mmfuse.lowrank_fusion([x, y], **p)  # a plan for dense tensors of these shapes
    mmfuse.zoom_shift(seq, seq + 1)
    calls = [
        ("xs[0]", lambda: mmfuse.lowrank_fusion([x.to_sparse(), y], **p)),
        ("weight", lambda: mmfuse.tensor_fusion([x, y], torch.randn(4, 3, 4).to_sparse())),
        ("mask", lambda: mmfuse.moments(seq, mask=torch.ones(2, 3, dtype=torch.bool).to_sparse())),
        ("x", lambda: mmfuse.zoom_shift(seq.to_sparse(), seq + 1)),
        ("terms", lambda: mmfuse.interaction_shares(torch.randn(2, 3, 4).to_sparse())),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} is a torch.sparse_coo tensor; mmfuse takes dense"):
            call()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
def test_strided_nested_torch_tensors_are_refused_by_name():
    """A nested tensor of strided layout (torch.nested's default) reached torch's "Internal
    error: NestedTensorImpl doesn't support sizes. Please file an issue." from the functions'
    and the layers' first look at its shape (a review's find); it is refused by name."""
    torch = pytest.importorskip("torch")
    from mmfuse.nn import GuidedZoomShift, LowRankFusion, WanderAdapter, ZoomShift

    nt = torch.nested.nested_tensor([torch.randn(5, 3), torch.randn(7, 3)])
    nested_mask = torch.nested.nested_tensor([torch.ones(5, dtype=torch.bool), torch.ones(6, dtype=torch.bool)])
    seq = torch.randn(2, 5, 3)
    mmfuse.zoom_shift(seq, seq + 1)  # a plan for dense tensors of these shapes
    p = mmfuse.init_lowrank([3, 3], rank=2, out_dim=2, xp=torch, seed=0)
    calls = [
        ("x", lambda: mmfuse.moments(nt)),
        ("terms", lambda: mmfuse.interaction_shares(torch.nested.nested_tensor([torch.randn(2, 3)] * 2))),
        ("guide", lambda: mmfuse.zoom_shift(seq, nt)),
        ("xs[1]", lambda: mmfuse.align([seq, nt])),
        ("mask", lambda: mmfuse.moments(seq, mask=nested_mask)),
        ("xs[0]", lambda: mmfuse.lowrank_fusion([nt, nt], **p)),
        ("LowRankFusion: xs[0]", lambda: LowRankFusion([3, 3], 2, 2)([nt, nt])),
        ("ZoomShift: xs[0]", lambda: ZoomShift(3, 2)([nt, seq])),
    ]
    # jagged ones too: the layers read their symbolic token count (AttributeError from the
    # message's shape formatting, or a GuidedZoomShift guide accepted), and the functions'
    # remedy, to_dense(), is refused for them (the diff review's finds)
    jagged = torch.nested.nested_tensor([torch.randn(5, 3), torch.randn(7, 3)], layout=torch.jagged)
    jagged2d = torch.nested.nested_tensor([torch.randn(3), torch.randn(2)], layout=torch.jagged)
    calls += [
        ("x", lambda: mmfuse.moments(jagged)),
        ("WanderAdapter: xs[0]", lambda: WanderAdapter([3, 3], [4, 5], 2, 2, 2)([jagged, seq])),
        ("GuidedZoomShift: xs[1]", lambda: GuidedZoomShift(3, 2)([seq, jagged])),
        # 2-D ones, whose factor checks read the symbolic size first (internal AttributeError)
        ("xs[0]", lambda: mmfuse.lowrank_fusion([jagged2d, seq[:, 0]], **p)),
        ("hs[0]", lambda: mmfuse.sequence_fusion([jagged, seq], [torch.randn(2, 3, 5)] * 2,
                                                 [torch.randn(2, 5, 3), torch.randn(2, 5, 3)])),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=rf"^{re.escape(name)} is a nested tensor; mmfuse takes dense tensors: pad it"):
            call()
    # torch's other refusals of a shape read keep their own words (a traced closure's tensor
    # that requires grad was called a nested tensor)
    layer = LowRankFusion([3, 3], 2, 2)
    held = torch.randn(5, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.trace's deprecation)
        with pytest.raises(RuntimeError, match=r"Cannot insert a Tensor that requires grad as a constant"):
            torch.jit.trace(lambda x: layer([x, held]), (torch.randn(5, 3),))


def test_torch_wrapper_subclasses_are_computed_by_torch_operations():
    """Tensor subclasses that run their operations in Python (``__torch_dispatch__``: TwoTensor,
    MaskedTensor, DTensor) have no values in their own memory: the reference copied it (garbage
    values, returned as a plain tensor), and "auto"'s NumPy path for zoom_shift and align, and
    numba's CPU kernels, called ``numpy()`` on them ("not supported for tensor subclasses"; a
    review's find).  The reference and numba refuse them; "auto" computes through torch's
    operators, each of TwoTensor's halves as the plain tensor gives."""
    torch = pytest.importorskip("torch")
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    from mmfuse.backends import BackendUnsupported

    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    a, g = torch.randn(2, 5, 3, generator=gen), 1 + torch.randn(2, 6, 3, generator=gen)
    t, tg = two_tensor.TwoTensor(a, 2 * a), two_tensor.TwoTensor(g, g.clone())
    for _ in range(2):  # (planned the second time)
        got = mmfuse.zoom_shift(t, tg)
        assert type(got) is two_tensor.TwoTensor
        assert_close(got.a, mmfuse.zoom_shift(a, g))
        assert_close(got.b, mmfuse.zoom_shift(2 * a, g))
        aligned = mmfuse.align([t, tg], rounds=2)
        want = mmfuse.align([a, g], rounds=2)
        assert_close(aligned[1].a, want[1])
        assert_close(mmfuse.moments(t)[1].b, mmfuse.moments(2 * a)[1])
    with pytest.raises(BackendUnsupported, match=r"nor on tensor subclasses that run their operations in Python"):
        mmfuse.moments(t, backend="reference")
    if importlib.util.find_spec("numba") is not None:
        with pytest.raises(BackendUnsupported, match=r"not subclasses that run their operations in Python"):
            mmfuse.zoom_shift(t, tg, backend="numba")


@pytest.mark.parametrize("swapped", [0, 1])
def test_numpy_byte_orders_mix_as_in_numpy(swapped):
    """A big-endian float64 array (">f8", e.g. read from a file) beside native ones is the same
    dtype to NumPy's operations; the checks refused it ("xs[1] has dtype >f8 but xs[0] has dtype
    float64").  Every family now takes it, with the native call's values bit for bit, and
    returns native float64 as NumPy's operations do (the alignment returned ">f8")."""
    rng = np.random.default_rng()
    p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=2, seed=rng)
    wp = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=rng)
    weight = rng.standard_normal((4, 5, 2))
    calls = {
        "lowrank_fusion": (lambda a, b: mmfuse.lowrank_fusion([a, b], **p), [(4, 3), (4, 4)]),
        "tensor_fusion": (lambda a, b: mmfuse.tensor_fusion([a, b], weight), [(4, 3), (4, 4)]),
        "zoom_shift": (lambda a, b: mmfuse.zoom_shift(a, b), [(2, 5, 3), (2, 4, 3)]),
        # masked statistics on NumPy (whichever array comes first): a count with dtype=">f8"
        "zoom_shift masked": (
            lambda a, b: mmfuse.zoom_shift(a, b, mask=np.arange(10).reshape(2, 5) % 3 > 0, backend="array_api"),
            [(2, 5, 3), (2, 4, 3)],
        ),
        "align": (lambda a, b: mmfuse.align([a, b])[1], [(2, 5, 3), (2, 4, 3)]),
        "align limit, first output": (lambda a, b: mmfuse.align([a, b], rounds=None)[0], [(2, 5, 3), (2, 4, 3)]),
        "moments": (lambda a, b: mmfuse.moments(a if swapped == 0 else b)[1], [(2, 5, 3), (2, 4, 3)]),
        "wander": (lambda a, b: mmfuse.wander([a, b], wp), [(2, 6, 8), (2, 5, 8)]),
        # masked pooling asked NumPy's sum for dtype=">f8", which it refuses
        "zoom_shift_fusion": (
            lambda a, b: mmfuse.zoom_shift_fusion([a, b], masks=[np.ones((2, 5), bool), np.arange(8).reshape(2, 4) % 3 > 0]),
            [(2, 5, 3), (2, 4, 3)],
        ),
    }
    for name, (call, shapes) in calls.items():
        args = [rng.standard_normal(s) for s in shapes]
        want = call(*args)
        args[swapped] = args[swapped].astype(">f8")
        got = call(*args)
        # native float64, as NumPy's own operations return (the alignment gave ">f8")
        assert got.dtype == np.float64 and got.dtype.isnative, (name, got.dtype)
        np.testing.assert_array_equal(got, want, err_msg=name)
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype >f4 but xs\[0\] has dtype float64"):
        mmfuse.lowrank_fusion([rng.standard_normal((4, 3)), rng.standard_normal((4, 4)).astype(">f4")], **p)


@pytest.mark.parametrize("swapped", [0, 1])
def test_big_endian_float16_gives_native_outputs(swapped):
    """float16 computes in float32 and is rounded back once; that rounding took the first
    array's dtype as it came, so a big-endian float16 (">f2") first gave a ">f2" result
    (``torch.from_numpy`` refuses it) where ">f8" and ">f4" gave native ones, and every
    backend but the reference did so (a review's find).  Native float16 now, the native call's
    values bit for bit."""
    rng = np.random.default_rng()

    def half(tree):
        if isinstance(tree, dict):
            return {k: half(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(half(v) for v in tree)
        return tree if tree is None else tree.astype(np.float16)

    p = half(mmfuse.init_lowrank([3, 4], rank=2, out_dim=2, seed=rng))
    cp = half((rng.standard_normal(2), [rng.standard_normal((n, 2)) for n in (4, 5, 2)]))
    wp = half(mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=rng))
    weight = rng.standard_normal((4, 5, 2)).astype(np.float16)
    pairs, seqs = [(4, 3), (4, 4)], [(2, 6, 8), (2, 5, 8)]
    calls = {
        "lowrank_fusion": (lambda a, b: mmfuse.lowrank_fusion([a, b], **p), pairs),
        "cp_fusion": (lambda a, b: mmfuse.cp_fusion([a, b], cp), pairs),
        "tensor_fusion": (lambda a, b: mmfuse.tensor_fusion([a, b], weight), pairs),
        "lowrank_interactions": (lambda a, b: mmfuse.lowrank_interactions([a, b], p["factors"])[0], pairs),
        "cp_interactions": (lambda a, b: mmfuse.cp_interactions([a, b], cp)[0], pairs),
        "tensor_interactions": (lambda a, b: mmfuse.tensor_interactions([a, b], weight)[0], pairs),
        "interaction_shares": (lambda a, b: mmfuse.interaction_shares(np.stack([a, b])), [(4, 3), (4, 3)]),
        "sequence_fusion": (lambda a, b: mmfuse.sequence_fusion([a, b], wp["feature"], wp["token"]), [(2, 6, 4), (2, 5, 4)]),
        "wander": (lambda a, b: mmfuse.wander([a, b], wp), seqs),
        "zoom_shift_fusion": (lambda a, b: mmfuse.zoom_shift_fusion([a, b]), [(2, 5, 3), (2, 4, 3)]),
        "align": (lambda a, b: mmfuse.align([a, b])[swapped], [(2, 5, 3), (2, 4, 3)]),
    }
    for name, (call, shapes) in calls.items():
        args = [rng.standard_normal(s).astype(np.float16) for s in shapes]
        want = call(*args)
        args[swapped] = args[swapped].astype(">f2")
        got = call(*args)
        assert got.dtype == np.float16 and got.dtype.isnative, (name, got.dtype)
        np.testing.assert_array_equal(got, want, err_msg=name)
    big = [f.astype(">f2") for f in p["factors"]]
    got = mmfuse.lowrank_to_tensor(big, p["weights"])
    assert got.dtype.isnative and np.array_equal(got, mmfuse.lowrank_to_tensor(p["factors"], p["weights"]))


@pytest.mark.parametrize("backend", [None, "array_api"])
def test_a_big_endian_memmap_gives_native_alignment_outputs(tmp_path, backend):
    """A big-endian file read as np.memmap (an ndarray subclass): the byte-order conversion
    tested for ndarray itself, so the alignment's buffers followed the file's ">f4", and
    align returned one ">f4" and one "<f4" modality (a review's find)."""
    rng = np.random.default_rng()
    x = (1 + rng.standard_normal((4, 30, 3))).astype(">f4")
    g = (2 + rng.standard_normal((4, 20, 3))).astype(">f4")
    x.tofile(tmp_path / "x.bin")
    xm = np.memmap(tmp_path / "x.bin", dtype=">f4", mode="r", shape=x.shape)
    native = np.dtype("float32")
    outs = {
        "align": mmfuse.align([xm, g], rounds=None, alpha=0.5, backend=backend),
        "zoom_shift": [mmfuse.zoom_shift(xm, g, backend=backend)],
        "moments": list(mmfuse.moments(xm, backend=backend)),
    }
    for name, got in outs.items():
        assert [o.dtype for o in got] == [native] * len(got), name
        want = {"align": lambda: mmfuse.align([x.astype(native), g.astype(native)], rounds=None, alpha=0.5, backend=backend),
                "zoom_shift": lambda: [mmfuse.zoom_shift(x.astype(native), g.astype(native), backend=backend)],
                "moments": lambda: list(mmfuse.moments(x.astype(native), backend=backend))}[name]()  # fmt: skip
        for o, w in zip(got, want):
            np.testing.assert_array_equal(o, w, err_msg=name)
    del xm


@pytest.mark.parametrize("op", ["moments", "zoom_shift", "align"])
def test_big_endian_alignment_inputs_take_the_cache_blocked_numpy_path(op):
    """">f4" data is copied to native order and then runs where native float32 does: the
    cache-blocked NumPy path (its choice tested "float32" and sent it to the generic one, at
    three times that copy's memory; a review's find)."""
    from mmfuse.backends import lookup

    native = np.ones((2, 3, 4), np.float32)
    assert lookup(op, "array_api", like=native.astype(">f4")) is lookup(op, "array_api", like=native)
    assert lookup(op, "array_api", like=native.astype(">f8")) is lookup(op, "array_api", like=native.astype(np.float64))


def test_reference_backend_returns_native_byte_order():
    """backend="reference" on ">f8" / ">f4" inputs: native results, as every other backend
    (the fusions' results came back in the input's big-endian dtype)."""
    rng = np.random.default_rng()
    p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=2, seed=rng)
    wp = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=rng)
    for order in (">f8", ">f4"):
        xs = [rng.standard_normal((4, 3)).astype(order), rng.standard_normal((4, 4)).astype(order)]
        seqs = [rng.standard_normal((2, 6, 8)).astype(order), rng.standard_normal((2, 5, 8)).astype(order)]
        native = np.dtype(order).newbyteorder("=")
        params = {k: [v.astype(native) for v in vs] if isinstance(vs, list) else vs.astype(native)
                  for k, vs in p.items()}  # fmt: skip
        wparams = {"down": [(w.astype(native), b.astype(native)) for w, b in wp["down"]],
                   "feature": [f.astype(native) for f in wp["feature"]],
                   "token": [t.astype(native) for t in wp["token"]]}  # fmt: skip
        for name, out in (
            ("lowrank_fusion", mmfuse.lowrank_fusion(xs, **params, backend="reference")),
            ("wander", mmfuse.wander(seqs, wparams, backend="reference")),
            ("moments", mmfuse.moments(seqs[0], backend="reference")[0]),
        ):
            assert out.dtype == native and out.dtype.isnative, (name, order, out.dtype)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_matrix_refusals_say_why_everywhere():
    """Every entry point refuses numpy.matrix naming it (some said only "must be an array,
    got matrix")."""
    x = np.random.default_rng().standard_normal((2, 5))
    wp = mmfuse.init_wander([5, 5], [2, 2], rank=2, feature_rank=1, token_rank=1, out_dim=5, seed=0)
    wp["down"][0] = (np.asmatrix(wp["down"][0][0]), wp["down"][0][1])
    seq = np.random.default_rng().standard_normal((2, 2, 5))
    calls = {
        "x": lambda: mmfuse.moments(np.asmatrix(x)),
        "x ": lambda: mmfuse.shift(np.asmatrix(x), 1.0),
        "scale": lambda: mmfuse.zoom(seq, np.asmatrix(x), center=0.0),
        r"params\['down'\]\[0\]\[0\]": lambda: mmfuse.wander([seq, seq], wp),
        r"xs\[0\]": lambda: mmfuse.align([np.asmatrix(x), seq]),
        "guide": lambda: mmfuse.zoom_shift(seq, np.asmatrix(x)),
        r"masks\[0\]": lambda: mmfuse.align([seq, seq], masks=[np.asmatrix(np.ones((2, 2), bool)), None]),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name.strip()} is a numpy\.matrix"):
            call()


@pytest.mark.parametrize("op, name", [("zoom", "scale"), ("shift", "offset")])
@pytest.mark.parametrize("value", [True, 1j])
def test_zoom_and_shift_name_what_an_operand_may_be(op, name, value):
    """A bool or complex scalar is refused, and the message says what is accepted: an array
    or a real scalar (it said "must be an array", though real scalars are taken)."""
    x = np.random.default_rng().standard_normal((2, 5, 3))
    kwargs = {"center": 0.0} if op == "zoom" else {}
    with pytest.raises(TypeError, match=rf"^{name} must be an array or a real scalar, got {type(value).__name__}$"):
        getattr(mmfuse, op)(x, value, **kwargs)


def test_mask_shape_message_counts_the_axis_from_the_front():
    """For axis=-1 the mask's shape is x.shape itself; the message wrote x.shape[:axis + 1],
    which reads as () for axis = -1, next to the shape it meant."""
    x = np.random.default_rng().standard_normal((3, 7, 4))
    with pytest.raises(ValueError, match=r"mask must have shape x\.shape\[:3\] = \(3, 7, 4\) for x"):
        mmfuse.moments(x, axis=-1, mask=np.ones((3, 7), dtype=bool))


def test_a_numpy_array_of_a_dtype_numpy_does_not_know_is_refused_by_name():
    """ml_dtypes' bfloat16 in a NumPy array: np.isdtype raised its own TypeError ("dtype
    argument must be a NumPy dtype"), naming no argument (a review's find); now the check's
    message, as for a Dask array of the same data.  explain() reads past such an array."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng().standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype, got bfloat16$"):
        mmfuse.moments(x)
    from mmfuse.backends import explain

    assert explain("moments", x, np.ones((2, 3, 4))).chosen is not None


def test_init_dtype_numpy_does_not_know_is_refused_by_name():
    """init_lowrank / init_wander with ml_dtypes' bfloat16 gave np.isdtype's own TypeError,
    naming no argument (the session's final review); now the dtype check's message."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype"):
        mmfuse.init_lowrank([3, 4], rank=2, out_dim=5, dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"^dtype must be a real floating dtype"):
        mmfuse.init_wander([4, 4], [3, 5], rank=2, feature_rank=2, token_rank=2, out_dim=4, dtype=ml_dtypes.bfloat16)


def test_a_float32_variance_past_its_range_is_never_taken_for_no_spread():
    """float32 statistics past a spread of about 1.8e19 are inf where they are computed in
    float32 (the docs say so; paths summing in float64, numba's kernels, give the spread).
    The generic path's noise rule compared inf <= inf (corr * corr overflowed too) and zeroed
    such a variance, so a lane with a spread of 1e29 was taken as constant (the session's
    final review).  Never 0 now: inf, or the reference's spread."""
    strict = pytest.importorskip("array_api_strict")
    x = (1e30 + 1e29 * np.random.default_rng().standard_normal((1, 100, 4))).astype(np.float32)
    want = mmfuse.reference.moments(x, eps=0.0)[1]
    with np.errstate(over="ignore"):  # (NumPy says a float32 square overflows, where it does)
        for got in (mmfuse.moments(x, eps=0.0)[1], mmfuse.moments(strict.asarray(x), eps=0.0)[1]):
            got = np.asarray(got, dtype=np.float64)
            assert np.all(np.isinf(got) | np.isclose(got, want, rtol=1e-5)), (got, want)


def test_the_references_refuse_complex_values():
    """The references took complex arrays as their real parts, with only a ComplexWarning (the
    public functions refuse them; a review's find): a TypeError now, in every family."""
    from mmfuse import reference

    rng = np.random.default_rng()
    z = rng.standard_normal((2, 5, 3)) + 1j
    p = mmfuse.init_lowrank([3, 4], rank=2, out_dim=2, seed=rng)
    wp = mmfuse.init_wander([3, 3], [5, 5], rank=2, feature_rank=1, token_rank=1, out_dim=3, seed=rng)
    calls = {
        "zoom_shift": lambda: reference.zoom_shift(z, z.real),
        "lowrank_fusion": lambda: reference.lowrank_fusion([z[:, 0], rng.standard_normal((2, 4))], p["factors"]),
        "lowrank_interactions": lambda: reference.lowrank_interactions([z[:, 0], z[:, 0, :3].real], p["factors"][:1] * 2),
        "wander": lambda: reference.wander([z, z.real], wp),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"^the references take real arrays, got complex128$"):
            call()
            pytest.fail(f"{name} took complex values")
