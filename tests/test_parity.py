"""The parity matrix: every registered implementation of every operator, against the reference.

Driven by the registry (``mmfuse.backends.implementations``), not by a hand-kept list: an
implementation is covered the moment its row is in the table (or it is ``register``-ed).
Each one is called directly (not through dispatch) on hard data, in the first namespace its
condition accepts on this machine (NumPy, torch CPU, Dask; torch CUDA and CuPy where present,
e.g. under ``tox -e gpu``); one that accepts none of them here (CUDA kernels on a CPU machine)
is skipped with the reason.  Cases: random data, a large mean against a small spread (1e4 +
1e-2 noise, float32; alignment), channels with no spread at eps = 0 (alignment), NaN padding under masks and absent modalities, +inf and -inf in an input, B = 0 and
B = 1, non-contiguous and read-only inputs, float16 / bfloat16 where the condition accepts
them, M = 1 and M = 8; and for torch implementations the gradients, against float64 autograd
through the generic core.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mmfuse import reference
from mmfuse._namespace import array_namespace, device_of, has_float64, to_numpy, tree_map
from mmfuse._problems import make_problem
from mmfuse.backends import implementations
from mmfuse.backends._catalogue import OPERATORS
from mmfuse.backends._conditions import CallInfo
from mmfuse.testing import assert_close

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_DASK = importlib.util.find_spec("dask") is not None

FUSION = ("tensor_fusion", "lowrank_fusion", "cp_fusion")
INTERACTIONS = ("tensor_interactions", "lowrank_interactions", "cp_interactions")
# each interaction operator explains the fusion it is named after: the same problems, no bias
EXPLAINS = dict(zip(INTERACTIONS, FUSION))
SEQUENCE = ("sequence_fusion", "wander")
ALIGNMENT = ("moments", "zoom_shift", "align")


# --------------------------------------------------------------------------- namespaces


def _namespaces() -> list[tuple[str, Callable[[np.ndarray], Any]]]:
    """(name, NumPy array -> that namespace's array) for what this machine has."""
    out: list[tuple[str, Callable[[np.ndarray], Any]]] = [("numpy", lambda a: a)]
    if HAS_TORCH:
        import torch

        out.append(("torch", torch.from_numpy))
        if torch.cuda.is_available():
            out.append(("torch-cuda", lambda a: torch.from_numpy(a).cuda()))
    if HAS_DASK:
        import dask.array as da

        out.append(("dask", lambda a: da.from_array(a, chunks=max(1, a.shape[0] // 2) if a.ndim else ())))
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount():
                out.append(("cupy", cupy.asarray))
        except Exception:  # no usable device
            pass
    return out


def _info(conv: Callable[[np.ndarray], Any], dtype: str, **flags: bool) -> CallInfo:
    a = conv(np.ones((1,), dtype=dtype))
    return CallInfo(array_namespace(a), device_of(a), a.dtype, **flags)


def _namespace_for(impl: Any, dtype: str) -> tuple[str, Callable[[np.ndarray], Any]] | None:
    """The first namespace whose arrays of ``dtype`` the implementation's condition accepts
    (in any autograd state: the registry's flags say when it is chosen, not what it computes)."""
    for name, conv in _namespaces():
        if dtype == "bfloat16" and not name.startswith("torch"):
            continue
        for flags in ({}, {"grad": True}, {"traced": True}):
            np_dtype = "float32" if dtype == "bfloat16" else dtype
            info = _info(conv, np_dtype, **flags)
            if dtype == "bfloat16":
                import torch

                info = CallInfo(info.xp, info.device, torch.bfloat16, **flags)
            if impl.refusal(info) is None:
                return name, conv
    return None


def _to(obj: Any, name: str, conv: Callable[[np.ndarray], Any], dtype: str) -> Any:
    def one(a: Any) -> Any:
        if a.dtype == np.bool_:
            return conv(a)
        if dtype == "bfloat16":
            import torch

            return conv(a.astype(np.float32)).to(torch.bfloat16)
        return conv(np.asarray(a, dtype=dtype))

    return tree_map(one, obj)


# --------------------------------------------------------------------------- cases


def _nan_in_masked(args: tuple[Any, ...], kwargs: dict[str, Any], op: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Poison what the masks hide: absent modalities' rows, padded tokens."""
    if op in ("lowrank_fusion", "cp_fusion"):
        xs = [x.copy() for x in args[0]]
        present = kwargs.get("present")
        if present is None:
            present = np.random.default_rng(5).random((xs[0].shape[0], len(xs))) < 0.7
        present = present.copy()
        present[0, :] = True  # one complete sample
        for m, x in enumerate(xs):
            x[~present[:, m]] = np.nan
        return (xs, *args[1:]), {**kwargs, "present": present}
    if op in SEQUENCE:
        xs = [x.copy() for x in args[0]]
        masks = kwargs.get("masks") or [np.random.default_rng(6).random(x.shape[:2]) < 0.8 for x in xs]
        for x, k in zip(xs, masks):
            k[:, 0] = True  # every sample keeps a token
            x[~k] = np.nan
        return (xs, *args[1:]), {**kwargs, "masks": masks}
    if op in ALIGNMENT:
        inputs = [args[0]] if op == "moments" else (list(args[0]) if op == "align" else [args[0], args[1]])
        inputs = [x.copy() for x in inputs]
        masks = [np.random.default_rng(7 + i).random(x.shape[:2]) < 0.75 for i, x in enumerate(inputs)]
        for x, k in zip(inputs, masks):
            k[:, :2] = True
            x[~k] = np.nan
        if op == "moments":
            return (inputs[0],), {**kwargs, "mask": masks[0]}
        if op == "zoom_shift":
            return (inputs[0], inputs[1]), {**kwargs, "mask": masks[0], "guide_mask": masks[1]}
        return (inputs,), {**kwargs, "masks": masks}
    return args, kwargs  # tensor_fusion has no mask


def _inf_input(args: tuple[Any, ...], kwargs: dict[str, Any], op: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One +inf and one -inf in the first batched input (samples 1 and 2), seen by every
    mask: the reference's inf and NaN must come out where it puts them, and no other sample,
    nor any finite output of those samples, may change (an inf meeting a zero in a blocked
    rank sum made a whole sample NaN)."""
    first = args[0][0] if op in FUSION + SEQUENCE + ("align",) else args[0]
    poisoned = first.copy()
    poisoned[(1, *([0] * (poisoned.ndim - 1)))] = np.inf
    poisoned[(2, *([1] * (poisoned.ndim - 1)))] = -np.inf
    if op in FUSION + SEQUENCE + ("align",):
        return ([poisoned, *args[0][1:]], *args[1:]), kwargs
    return (poisoned, *args[1:]), kwargs


def _batch(args: tuple[Any, ...], kwargs: dict[str, Any], op: str, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first ``n`` samples of every batched array (the batch is axis 0 of xs / x / guide /
    present / masks)."""

    def cut(a: Any) -> Any:
        return a[:n]

    if op in FUSION + SEQUENCE:
        args = ([cut(x) for x in args[0]], *args[1:])
    elif op == "align":
        args = ([cut(x) for x in args[0]],)
    else:
        args = tuple(cut(a) for a in args)
    kwargs = {k: (tree_map(cut, v) if k in ("present", "masks", "mask", "guide_mask") else v) for k, v in kwargs.items()}
    return args, kwargs


def _modalities(op: str, m: int, rng: np.random.Generator) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A problem with ``m`` modalities (None where the op has no modalities or refuses m)."""
    batch = 5
    if op in ("lowrank_fusion", "cp_fusion", "tensor_fusion"):
        dims = [2 + (k % 2) for k in range(m)] if op == "tensor_fusion" else [3 + k % 3 for k in range(m)]
        xs = [rng.standard_normal((batch, d)) for d in dims]
        if op == "tensor_fusion":
            weight = rng.standard_normal((*(d + 1 for d in dims), 2)) / np.sqrt(np.prod([d + 1 for d in dims]))
            return (xs, weight, rng.standard_normal(2)), {}
        if op == "lowrank_fusion":
            factors = [rng.standard_normal((3, d + 1, 4)) / np.sqrt(d + 1) * 1.3 for d in dims]
            return (xs, factors, rng.standard_normal(3), rng.standard_normal(4)), {"present": None}
        factors = [rng.standard_normal((d + 1, 3)) / np.sqrt(d + 1) * 1.3 for d in dims] + [rng.standard_normal((4, 3))]
        return (xs, (rng.standard_normal(3), factors), rng.standard_normal(4)), {}
    if op == "sequence_fusion":
        hs = [rng.standard_normal((batch, 3 + k % 2, 2)) for k in range(m)]
        feature = [rng.standard_normal((2, 2, 3)) for _ in range(m)]
        token = [rng.standard_normal((2, h.shape[1], 2)) / 2 for h in hs]
        return (hs, feature, token), {"mode": "cp", "masks": None}
    if op == "wander":
        from mmfuse import init_wander

        lengths = [3 + k % 2 for k in range(m)]
        xs = [rng.standard_normal((batch, t, 3)) for t in lengths]
        params = init_wander([3] * m, lengths, rank=2, feature_rank=2, token_rank=2, out_dim=3, seed=rng)
        params["token"] = [t + 0.3 * rng.standard_normal(t.shape) for t in params["token"]]
        return (xs, params), {"mode": "collapsed" if m == 8 else "cp"}
    if op == "align" and m >= 2:
        xs = [rng.standard_normal((batch, 4 + k % 3, 3)) * (1 + k) + k for k in range(m)]
        return (xs,), {"rounds": 2, "alpha": 0.5}
    return None


def _large_mean(
    op: str, rng: np.random.Generator, tokens: int = 9, batch: int = 4
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """float32 data of mean 1e4 and spread 1e-2 (``tokens`` of them; ``long_axis``: 65536,
    where float32 sums taken one row after another lost the pivot and gave a spread of 0)."""
    if op not in ALIGNMENT:
        return None
    big = (1e4 + 1e-2 * rng.standard_normal((batch, tokens, 3))).astype(np.float32)
    unit = rng.standard_normal((batch, 7, 3)).astype(np.float32)
    if op == "moments":
        return (big,), {}
    if op == "zoom_shift":
        return (big, unit), {"alpha": 1.0}
    return ([big, unit],), {"rounds": None, "alpha": 0.5}


def _cancelling_means(op: str, rng: np.random.Generator) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """float32 modalities of means near 1e4 and -1e4 (unit spreads) whose targets are near 0:
    a partial step and the rounds combine means, and float32 means rounded first left half an
    ulp of 1e4 there (1.5e-4 of the outputs' size)."""
    if op not in ("zoom_shift", "align"):
        return None
    far = (1e4 + rng.standard_normal((3, 9, 4))).astype(np.float32)
    back = (-1e4 + rng.standard_normal((3, 7, 4))).astype(np.float32)
    if op == "zoom_shift":
        return (far, back), {"alpha": 0.5}
    return ([far, back],), {"rounds": 1, "alpha": 0.5}


def _large_constant(op: str, rng: np.random.Generator) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """float32 lanes of one large value whose float32 sum over the tokens rounds (100000008:
    the pivot then misses it by ulps, a correction the map must take off before the zoom of
    about 1 / sqrt(eps)), one sample a few ulps around it, aligned to a unit guide.  A map
    folding the correction into its offset (target - corr s) came out 25000 ulps off."""
    if op not in ALIGNMENT:
        return None
    big = np.full((2, 50, 3), 100000008.0, dtype=np.float32)
    big[1] += (48.0 * rng.standard_normal((50, 3))).astype(np.float32)  # a few of its ulps
    unit = (0.5 + 2.0 * rng.standard_normal((2, 7, 3))).astype(np.float32)
    if op == "moments":
        return (big,), {}
    if op == "zoom_shift":
        return (big, unit), {"alpha": 1.0}
    return ([big, unit],), {"rounds": 1, "topology": "hub", "hub": 1}


def _mixed_signs(op: str, rng: np.random.Generator) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """float32 statistics of a long token axis (1000 tokens) of data whose signs mix, so the
    mean is small beside the tokens (one channel scaled by 1e4): where the sums are float64
    the mean is the float64 mean rounded once; the generic form had summed the rounded
    float32 deviations and been thousands of ulps off."""
    if op != "moments":
        return None
    x = rng.standard_normal((2, 1000, 3)).astype(np.float32)
    x[..., 1] *= 1e4
    return (x,), {}


def _float64_sums(impl: Any, name: str) -> bool:
    """Whether ``impl`` on namespace ``name`` sums float32 over a long token axis in float64
    (NumPy's core and its sums under Dask, the reference, numba's CPU kernels); torch, JAX,
    CuPy and the GPU kernels sum float32 in float32, a documented limit."""
    return impl.backend == "reference" or name in ("numpy", "dask") or (impl.backend == "numba" and name == "torch")


def _constant_channel(args: tuple[Any, ...], kwargs: dict[str, Any], op: str) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A channel with no spread in the first input (and another in the second) at eps = 0, where
    the zero-spread rule (scale 1) decides the output.  3.7 and -1.3, not 2.5: their sums over
    the tokens round, so the first mean misses the value and only a corrected variance is 0."""
    if op not in ALIGNMENT:
        return None
    inputs = list(args[0]) if op == "align" else list(args)
    inputs = [x.copy() for x in inputs]
    inputs[0][..., 0] = 3.7
    if len(inputs) > 1:
        inputs[1][..., 1] = -1.3
    args = (inputs,) if op == "align" else tuple(inputs)
    return args, {**kwargs, "eps": 0.0}


CASES = (
    "random",
    "large_mean",
    "long_axis",
    "large_constant",
    "mixed_signs_long_axis",
    "cancelling_means",
    "constant_channel",
    "nan_padding",
    "inf_input",
    "batch_0",
    "batch_1",
    "non_contiguous",
    "read_only",
    "float16",
    "bfloat16",
    "modalities_1",
    "modalities_8",
)


# The float32 cases of hard data: each maker gives (args, kwargs), or None where it does not
# apply to the operator.
_FLOAT32_HARD_DATA = {
    "large_mean": _large_mean,
    "long_axis": lambda op, rng: _large_mean(op, rng, tokens=65536, batch=2),
    "cancelling_means": _cancelling_means,
    "large_constant": _large_constant,
    "mixed_signs_long_axis": _mixed_signs,
}


def _case(op: str, case: str, seed: int) -> tuple[tuple[Any, ...], dict[str, Any], str] | None:
    """(args, kwargs, dtype) in NumPy for ``case`` (None: the case does not apply to ``op``)."""
    if op in EXPLAINS:  # the fusion's case, without the bias, terms by order or by subset
        made = _case(EXPLAINS[op], case, seed)
        if made is None:
            return None
        args, kwargs, dtype = made
        args = args[:2] if op == "cp_interactions" else args[:3 if op == "lowrank_interactions" else 2]
        by = "subset" if case in ("random", "nan_padding", "modalities_1") else "order"
        return args, {**kwargs, "by": by}, dtype
    rng = np.random.default_rng(seed)
    args, kwargs = make_problem(op, seed=rng)
    dtype = "float64"
    if case in _FLOAT32_HARD_DATA:
        made = _FLOAT32_HARD_DATA[case](op, rng)
        if made is None:
            return None
        args, kwargs = made
        dtype = "float32"
    elif case == "constant_channel":
        made = _constant_channel(args, kwargs, op)
        if made is None:
            return None
        args, kwargs = made
    elif case == "nan_padding":
        if op == "tensor_fusion":
            return None
        args, kwargs = _nan_in_masked(args, kwargs, op)
    elif case == "inf_input":
        args, kwargs = _inf_input(args, kwargs, op)
    elif case in ("batch_0", "batch_1"):
        args, kwargs = _batch(args, kwargs, op, int(case[-1]))
    elif case in ("float16", "bfloat16"):
        dtype = case
    elif case.startswith("modalities_"):
        made = _modalities(op, int(case.split("_")[1]), rng)
        if made is None:
            return None
        args, kwargs = made
    if op == "tensor_fusion":
        kwargs = {**kwargs, "max_elements": 2**27}
    return args, kwargs, dtype


def _layout(obj: Any, name: str, case: str) -> Any:
    """Non-contiguous views or read-only arrays of the same values."""

    def one(a: Any) -> Any:
        if case == "read_only" and isinstance(a, np.ndarray):
            a = a.copy()
            a.flags.writeable = False
            return a
        if case == "non_contiguous" and getattr(a, "ndim", 0) >= 2:
            if isinstance(a, np.ndarray):
                return np.asfortranarray(a)
            if name.startswith("torch"):
                return a.transpose(0, 1).contiguous().transpose(0, 1)
        return a

    return tree_map(one, obj)


# --------------------------------------------------------------------------- the matrix


def _matrix() -> list[Any]:
    params = []
    for op in OPERATORS:
        for impl in implementations(op):
            for case in CASES:
                ident = f"{op}-{impl.backend}-{impl.variant}-{case}".replace(" ", "_")
                params.append(pytest.param(op, impl, case, id=ident))
    return params


def _tolerance(dtype: str, case: str) -> dict[str, float]:
    if dtype in ("float16", "bfloat16"):
        return {"rtol": 3e-2 if dtype == "bfloat16" else 5e-3, "atol": 5e-2}
    if dtype == "float32":
        return {"rtol": 2e-4, "atol": 0.0}
    return {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize(("op", "impl", "case"), _matrix())
def test_implementation_matches_reference(op: str, impl: Any, case: str) -> None:
    made = _case(op, case, seed=abs(hash((op, case))) % 2**32)
    if made is None:
        pytest.skip(f"{case} does not apply to {op}")
    args, kwargs, dtype = made
    found = _namespace_for(impl, dtype)
    if found is None:
        pytest.skip(f"{impl.backend} / {impl.variant} takes no {dtype} arrays this machine has")
    name, conv = found
    if case in ("read_only",) and name != "numpy":
        pytest.skip("read-only arrays are a NumPy notion")
    # infinite inputs: NumPy warns of the inf - inf and 0 * inf it meets (the reference too)
    quiet = {"invalid": "ignore", "over": "ignore"} if case == "inf_input" else {}
    with np.errstate(**quiet):
        want = getattr(reference, op)(*args, **kwargs)
        call_args = _layout(_to(args, name, conv, dtype), name, case)
        call_kwargs = _layout(_to(kwargs, name, conv, dtype), name, case)
        got = impl.func(*call_args, **call_kwargs)
        if name == "dask":  # on this thread, under the errstate (NumPy 1.x's matmul warns of inf)
            got = tree_map(lambda a: a.compute(scheduler="synchronous"), got)
    if op in INTERACTIONS:  # (terms, labels): the labels must agree exactly
        assert got[1] == want[1]
        got, want = got[0], want[0]
    got_np = tree_map(lambda a: to_numpy(a), got)
    want_np = tree_map(lambda a: np.asarray(a, dtype=np.float64), want)
    if case in ("large_mean", "long_axis"):
        # Errors in units of each output's spread across tokens, beyond what float32 can hold
        # of values near 1e4 (a few ulps): a map folded into x s + t misses by ~6% of it.
        for g, w in zip(_leaves(got_np), _leaves(want_np)):
            spread = float(np.mean(np.std(w, axis=-2))) if w.shape[-2] > 1 else 1e-2
            limit = 1e-3 * spread + 4 * np.finfo(np.float32).eps * np.abs(w)
            assert np.all(np.abs(g - w) <= limit), (op, impl.variant, float(np.max(np.abs(g - w)) / spread))
        return
    if case == "cancelling_means":
        # within a few float32 ulps of each output (plus 1e-6 of the largest: outputs near 0),
        # where a device has float64 (without it the means stay float32, a documented limit)
        if not has_float64(array_namespace(_leaves(got)[0]), device_of(_leaves(got)[0])):
            pytest.skip("no float64 on this namespace's device: float32 means")
        for g, w in zip(_leaves(got_np), _leaves(want_np)):
            ulp = np.spacing(np.abs(w).astype(np.float32)).astype(np.float64)
            limit = 4 * ulp + 1e-6 * float(np.max(np.abs(w)))
            assert np.all(np.abs(g - w) <= limit), (op, impl.variant, float(np.max(np.abs(g - w) / ulp)))
        return
    if case == "mixed_signs_long_axis":
        # the mean within half a float32 ulp of the float64 one where the sums are float64
        # (the float32 sums elsewhere: the std, and the mean to float32's tolerance)
        (mean, std), (want_mean, want_std) = _leaves(got_np), _leaves(want_np)
        assert_close(std, want_std, rtol=2e-6, atol=0.0)
        if not _float64_sums(impl, name):
            assert_close(mean, want_mean, rtol=0.0, atol=4 * np.finfo(np.float32).eps * float(np.max(np.abs(args[0]))))
            return
        half_ulp = np.spacing(np.abs(want_mean).astype(np.float32)).astype(np.float64) / 2
        assert np.all(np.abs(mean - want_mean) <= half_ulp * (1 + 1e-9)), (impl.variant, name)
        return
    if case == "large_constant":
        # in float32 ulps of each output's largest value (the guide's scale, or the
        # statistics' own): the exact map of the rounded inputs, rounded, and the guide's
        # float32 statistics
        for g, w in zip(_leaves(got_np), _leaves(want_np)):
            limit = 16 * np.finfo(np.float32).eps * float(np.max(np.abs(w)))
            assert np.all(np.abs(g - w) <= limit), (op, impl.variant, float(np.max(np.abs(g - w)) / limit) * 16)
        return
    tol = _tolerance(dtype, case)
    for g, w in zip(_leaves(got_np), _leaves(want_np)):
        if case == "inf_input":
            # Which outputs are infinite is the maths' (the output is affine in the poisoned
            # entry); whether one is +-inf or NaN is the order of the sums' terms (ranks of
            # both signs give inf - inf, and the reference's explicit tensor sums more of
            # them than a factored form): only finiteness is compared there
            assert np.array_equal(np.isfinite(g), np.isfinite(w)), (op, impl.variant, np.argwhere(np.isfinite(g) != np.isfinite(w))[:4])
            g, w = np.where(np.isfinite(w), g, 0.0), np.where(np.isfinite(w), w, 0.0)
        assert_close(g, w, **tol)


def _leaves(obj: Any) -> list[Any]:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


# --------------------------------------------------------------------------- gradients


def _grad_matrix() -> list[Any]:
    params = []
    for op in OPERATORS:
        if op == "moments":
            continue  # no torch-specific implementation beyond the core's autograd
        for impl in implementations(op):
            if impl.backend in ("torch", "triton"):
                params.append(pytest.param(op, impl, id=f"{op}-{impl.backend}-{impl.variant}".replace(" ", "_")))
    return params


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize(("op", "impl"), _grad_matrix())
def test_torch_gradients_match_the_core(op: str, impl: Any) -> None:
    """dL/d(every floating input) of the implementation equals float64 autograd through the
    generic Array-API core (itself checked against the reference above), NaN padding included."""
    import torch

    from mmfuse.backends._table import ROWS

    core_target = next(r.target for r in ROWS if r.op == op and r.backend == "array_api" and r.variant == "generic")
    module, attr = core_target.split(":")
    core = getattr(importlib.import_module(module), attr)
    made = _case(op, "nan_padding", seed=11) or _case(op, "random", seed=11)  # TFN has no mask
    assert made is not None
    args, kwargs, _ = made
    found = _namespace_for(impl, "float64")
    if found is None:
        pytest.skip("no namespace on this machine")
    leaves: list[list[Any]] = [[], []]

    def build(k: int) -> tuple[Any, Any]:
        def one(a: Any) -> Any:
            t = torch.from_numpy(np.array(a))
            if t.is_floating_point():
                t.requires_grad_(True)
                leaves[k].append(t)
            return t

        return tree_map(one, args), tree_map(one, kwargs)

    rng = np.random.default_rng(3)
    outs = []
    for k, fn in enumerate((impl.func, core)):
        a, kw = build(k)
        out = fn(*a, **kw)
        outs.append(out[0] if op in INTERACTIONS else out)  # the terms, not their labels
    ups = [torch.from_numpy(rng.standard_normal(tuple(o.shape))) for o in _leaves(outs[0])]

    def loss(out: Any) -> Any:
        total = 0
        for o, u in zip(_leaves(out), ups):
            total = total + torch.nansum(o * u)
        return total

    got = torch.autograd.grad(loss(outs[0]), leaves[0], allow_unused=True)
    want = torch.autograd.grad(loss(outs[1]), leaves[1], allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not torch.any(g != 0)
            continue
        assert g is not None
        assert_close(torch.nan_to_num(g, nan=7.0), torch.nan_to_num(w, nan=7.0), rtol=1e-9, atol=1e-10)

