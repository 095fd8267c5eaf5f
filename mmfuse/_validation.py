"""Shape, dtype and namespace checks shared by every public function.

Every check works from metadata only (``shape``, ``dtype``, namespace, device), never from
values, so it is safe on lazy arrays (Dask, traced JAX).  Messages name the argument, the
modality index where there is one, and the expected and actual shapes or dtypes.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeAlias

import numpy as np

from ._namespace import (
    array_namespace,
    dask_devices,
    from_numpy,
    is_array,
    is_dask,
    is_host_device,
    is_jax,
    is_numpy,
    is_torch,
    namespace_name,
    native_dtype,
    not_an_array,
    pinned_device,
    real_floating,
)

__all__ = [
    "Seed",
    "as_sequence",
    "check_bool",
    "check_bool_option",
    "check_float",
    "check_ndim",
    "check_positive_int",
    "check_same_float_dtype",
    "check_wide_float",
    "common_namespace",
    "fmt_shape",
    "narrow_float",
]


def fmt_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_sequence(
    obj: Any, name: str, *, min_len: int = 1, what: str = "modality", items: str = "arrays"
) -> list[Any]:
    """``obj`` as a list, insisting it is a list or tuple (an array is not a sequence here) of
    ``items`` (the message's word for its entries)."""
    if is_array(obj) or not isinstance(obj, (list, tuple)):
        raise TypeError(
            f"{name} must be a list or tuple of {items} (one per {what}), got {type(obj).__name__}"
        )
    if len(obj) < min_len:
        plural = {"modality": "modalities"}.get(what, what + "s") if min_len > 1 else what
        raise ValueError(f"{name} must hold at least {min_len} {plural}, got {len(obj)}")
    return list(obj)


def nested_tensor_error(name: str) -> TypeError:
    """The refusal of a torch nested tensor (strided, whose sizes raise torch's "Internal
    error: NestedTensorImpl doesn't support sizes", or jagged, whose ``to_dense()`` is
    refused)."""
    return TypeError(
        f"{name} is a nested tensor; mmfuse takes dense tensors: pad it "
        "(torch.nested.to_padded_tensor(t, 0.0)), marking the padding with a mask where the "
        "operation takes one"
    )


def check_known_sizes(named: Sequence[tuple[str, Any]]) -> None:
    """ValueError naming the first array with a size of unknown value: Dask's NaN, for chunks of
    unknown size (e.g. after boolean indexing).  Every operator checks sizes against each
    other (batch sizes, masks, factors), which NaN cannot answer (``nan != nan``), and Dask
    cannot align such chunks across arrays either."""
    for n, a in named:
        # a nested torch tensor first: a strided one's sizes raise torch's internal error, a
        # jagged one's symbolic size reaches the checks (torch's other refusals of a shape
        # read, a traced closure's tensor, keep their own words)
        if type(a) is not np.ndarray and getattr(a, "is_nested", False) is True:
            raise nested_tensor_error(n)
        shape = getattr(a, "shape", ())
        for k, size in enumerate(shape):
            if type(size) is float and size != size:
                raise ValueError(
                    f"{n} has a size of unknown value along axis {k} (shape {fmt_shape(shape)}): "
                    "Dask chunks of unknown size, e.g. after boolean indexing; call its "
                    ".compute_chunk_sizes() first"
                )


def common_namespace(named: Sequence[tuple[str, Any]]) -> Any:
    """The namespace of all non-``None`` arrays in ``named``; TypeError on any mix.

    Also checks that they share one device, and that their sizes are known
    (:func:`check_known_sizes`).
    """
    live = [(n, a) for n, a in named if a is not None]
    check_known_sizes(live)
    xp = array_namespace(*(a for _, a in live), names=tuple(n for n, _ in live))
    if is_torch(xp):
        strided = sys.modules["torch"].strided
        for n, a in live:  # (nested ones, jagged too, were refused by check_known_sizes)
            if a.layout != strided:  # sparse / mkldnn: torch's own errors deep inside otherwise
                raise TypeError(
                    f"{n} is a {a.layout} tensor; mmfuse takes dense (strided) tensors: pass "
                    f"{n}.to_dense()"
                )
    # Traced JAX values report no device, and an uncommitted JAX array (one made without a
    # device: mmfuse's own init_* by default) follows the committed ones, as in JAX's own
    # operations (it was refused beside data committed to another device; a review's find):
    # only the devices arrays are pinned to are compared.
    pinned = [(n, d) for n, a in live if (d := pinned_device(a)) is not None]
    for n, d in pinned[1:]:
        if d != pinned[0][1]:
            raise ValueError(f"{n} is on device {d} but {pinned[0][0]} is on {pinned[0][1]}")
    return xp


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int >= 1; ValueError naming ``name`` otherwise.

    Any integral number passes (``int``, ``numpy.int64``, anything registered as
    :class:`numbers.Integral`); bools, floats (even ``3.0``) and strings do not.  The same
    rule and message as the sequence layer's size checks (``init_wander``).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_size_list(name: str, values: Any) -> list[int]:
    """``values`` (one size per modality) as a list of Python ints >= 1; TypeError if it is
    not a sequence (a set or a dict included: they have no modality order, or keys for
    sizes), ValueError naming ``name[m]`` for a bad entry (as check_positive_int)."""
    unordered = isinstance(values, (AbstractSet, Mapping))
    if isinstance(values, str) or unordered or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{name} must be a sequence of positive integers (one per modality), got {type(values).__name__}"
        )
    return [check_positive_int(f"{name}[{m}]", v) for m, v in enumerate(values)]


def check_namespace(xp: Any) -> Any:
    """``xp`` when it is an array namespace (a module with ``asarray``: numpy, torch, cupy,
    array_api_compat's, ...); TypeError naming ``xp`` otherwise (its name as a string too)."""
    if isinstance(xp, str) or not callable(getattr(xp, "asarray", None)):
        raise TypeError(
            "xp must be an array namespace, the module itself (e.g. numpy or torch, not its name), "
            f"got {xp!r}"
        )
    return xp


#: What a ``seed`` argument takes: whatever ``numpy.random.default_rng`` takes (a bool refused
#: at run time).  The hints had said ``int | Generator | None``, which refused a SeedSequence,
#: a bit generator or a NumPy integer that the docstrings promise (an API review's find).
Seed: TypeAlias = (
    "int | np.integer[Any] | Sequence[int] | np.random.SeedSequence | np.random.BitGenerator"
    " | np.random.Generator | None"
)


def random_generator(seed: Any) -> np.random.Generator:
    """``numpy.random.default_rng(seed)``, its refusal of a bad seed naming ``seed``; a bool
    refused too (NumPy takes True as the seed 1: a flag passed in the seed's place)."""
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{_SEEDS} (not a bool, which NumPy would take as the seed 1), got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{_SEEDS}, got {seed!r} ({err})") from None


# (all that default_rng takes: the message had named three kinds, and for a sequence with a
# negative entry suggested that sequences were not taken at all; a review's find)
_SEEDS = (
    "seed must be what numpy.random.default_rng takes: None, a non-negative int or a sequence "
    "of them, a SeedSequence, a BitGenerator or a Generator"
)


def check_jax_width(space: Any, dtype: Any) -> None:
    """TypeError for a dtype JAX would silently truncate (float64 while its 64-bit mode is off:
    arrays come back float32): the loaders', ``make_inputs``' and the initialisers' rule."""
    if not is_jax(space):
        return
    import jax

    try:
        wide = np.dtype(dtype)
    except TypeError:  # not a dtype at all: the caller's own check says so
        return
    if jax.dtypes.canonicalize_dtype(wide) != wide:
        raise TypeError(
            f"dtype {np.dtype(dtype).name} needs JAX's 64-bit mode, which is off "
            "(jax.config.update('jax_enable_x64', True)); or ask for float32"
        )


def check_floating_dtype(space: Any, dtype: Any, device: Any) -> Any:
    """``dtype`` for parameters drawn by an initialiser (None: the namespace's default floating
    dtype); TypeError unless it is a real floating dtype of ``space``, and ValueError naming
    ``device`` unless ``space`` can hold arrays there, both found on a one-element array
    before anything is drawn (so a refused call leaves a passed Generator untouched)."""
    if dtype is None:
        dtype = _default_floating_dtype(space, device)
    else:
        if isinstance(dtype, str) and not is_numpy(space) and dtype.isidentifier():
            # a dtype's name ("float32"): NumPy takes it, torch and array_api_strict do not; the
            # namespace's dtype of that name, as make_inputs and the loaders resolve it
            named = getattr(space, dtype, None)
            if named is not None and not callable(named) and not dtype.startswith("_"):
                dtype = named
        check_jax_width(space, dtype)  # before JAX truncates it (with a warning) in the probe
        try:  # the dtype alone first, so that the namespace's refusal is about the dtype
            from_numpy(np.ones(1), space, dtype=dtype)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"dtype must be a real floating dtype of the namespace (e.g. its float32 or float64), "
                f"got {dtype!r} ({err})"
            ) from None
    probe = check_device(space, device)  # the device alone: a refusal names it
    if device is not None and not is_numpy(space):
        try:  # then the dtype there: a refusal names the dtype (float64 on a device without it)
            probe = from_numpy(np.ones(1), space, dtype=dtype, device=device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise TypeError(
                f"dtype {dtype!r} is not available on device={device!r} of {namespace_name(space)}: "
                f"pass a narrower dtype ({err})"
            ) from None
    else:
        probe = check_device(space, device, dtype)
    xp = array_namespace(probe)
    if not real_floating(xp, probe.dtype):
        raise TypeError(
            f"dtype must be a real floating dtype (e.g. float32 or float64), got {probe.dtype}; "
            "the fusions take floating parameters only"
        )
    check_wide_float(xp, probe.dtype, f"dtype is {probe.dtype}")
    return dtype


def _default_floating_dtype(space: Any, device: Any) -> Any:
    """The namespace's default real floating dtype on ``device``: the standard's inspection
    API where the namespace has one and a device is given (array-api-strict's "no_float64"
    device defaults to float32), else what a Python float becomes."""
    info = getattr(space, "__array_namespace_info__", None)
    if info is not None and device is not None:
        try:
            return info().default_dtypes(device=device)["real floating"]
        except Exception:  # a device it cannot answer for: check_device names it next
            pass
    return space.asarray(1.0).dtype


def check_device(space: Any, device: Any, dtype: Any = None) -> Any:
    """A one-element array of namespace ``space`` on ``device`` (of ``dtype``); ValueError
    naming ``device`` where the namespace cannot hold arrays there (torch's RuntimeError for
    "cuda0", a negative index, CUDA on a CPU build; NumPy's host-only rule)."""
    # without a dtype, a float32 probe: every device has it (float64 not: MPS, the "no_float64"
    # device of array-api-strict, which a float64 probe had called no device)
    one = np.ones(1, dtype=np.float32 if dtype is None else np.float64)
    if is_numpy(space):
        return from_numpy(one, space, dtype=dtype, device=device)  # its own ValueError
    if is_dask(space) and device is not None and not _dask_device(device):
        # (from_numpy makes Dask arrays of NumPy chunks and takes no device: "cuda", a typo or
        # 42 had been accepted and ignored, where NumPy and array_api_compat's Dask refuse it;
        # a review's find)
        raise ValueError(
            f"device={device!r} is not a device of {namespace_name(space)}: mmfuse makes Dask "
            f"arrays of NumPy chunks, on the CPU (pass None or 'cpu')"
        )
    try:
        return from_numpy(one, space, dtype=dtype, device=device)
    except (RuntimeError, TypeError, ValueError, OverflowError, AssertionError) as err:  # the namespace's own
        raise ValueError(f"device={device!r} is not a device of {namespace_name(space)}: {err}") from None


def _dask_device(device: Any) -> bool:
    """Whether Dask arrays of NumPy chunks may be asked for on ``device``: the CPU however
    spelt, or a device array_api_compat's Dask namespace lists (its ``DASK_DEVICE`` too, which
    its own ``asarray`` takes; a diff review's find)."""
    return is_host_device(device) or any(device is d or device == d for d in dask_devices())


def check_bool_option(name: str, value: Any) -> bool:
    """``value`` as a Python bool: ``True``/``False`` or a NumPy bool; TypeError otherwise.

    Options like ``append_one`` are not truth-tested, so that ``"no"`` or ``0`` is an error
    rather than silently meaning True or False.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return bool(value)


def check_float(xp: Any, x: Any, name: str) -> None:
    if not real_floating(xp, x.dtype):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    check_wide_float(xp, x.dtype, f"{name} has dtype {x.dtype}")


def check_wide_float(xp: Any, dtype: Any, subject: str) -> None:
    """Refuse a real floating ``dtype`` of ``xp`` narrower than 16 bits (:func:`narrow_float`,
    with ``subject`` saying whose dtype it is): the one home of the rule for the functions'
    inputs, the initialisers' and loaders' ``dtype`` and the layers."""
    if xp.finfo(dtype).bits < 16:
        raise narrow_float(subject)


def narrow_float(subject: str) -> TypeError:
    """The error for a float of fewer than 16 bits (torch's and JAX's float8 and float4
    types; ``subject`` says whose dtype, and which): storage formats with almost no operators
    (torch's CPU matmul, sum and GELU refuse them), which some paths had widened and others
    failed on with the library's own error (a review's find)."""
    return TypeError(
        f"{subject}, a float of fewer than 16 bits: mmfuse computes in float16, bfloat16, "
        "float32 and float64; use one of them"
    )


def check_bool(xp: Any, x: Any, name: str) -> None:
    if x.dtype != xp.bool:
        raise TypeError(f"{name} must have a boolean dtype, got {x.dtype}")


def check_same_float_dtype(xp: Any, named: Sequence[tuple[str, Any]]) -> Any:
    """Every array is real floating and all share the first one's dtype; returns that dtype."""
    live = [(n, a) for n, a in named if a is not None]
    for n, a in live:
        check_float(xp, a, n)
    first_name, first = live[0]
    want = native_dtype(first.dtype)  # byte orders mix, as in NumPy's own operations
    for n, a in live[1:]:
        if native_dtype(a.dtype) != want:
            raise TypeError(
                f"{n} has dtype {a.dtype} but {first_name} has dtype {first.dtype}; "
                "cast all floating inputs to one dtype"
            )
    return first.dtype


def check_ndim(x: Any, ndim: int, name: str, layout: str) -> None:
    """``x`` has ``ndim`` axes (``layout`` names them) of known sizes: the first check of a
    parameter array, before its sizes are compared with anything (Dask's NaN sizes would
    give self-contradicting messages, "rank nan but rank nan")."""
    check_known_sizes([(name, x)])
    if x.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-dimensional with shape {layout}, got shape {fmt_shape(x.shape)}"
        )


def check_modalities(
    xs: Any, name: str = "xs", *, ndim: int = 2, layout: str = "(B, d_m)"
) -> tuple[list[Any], int]:
    """Check a sequence of per-modality arrays sharing the leading batch size.

    Returns the arrays as a list and the batch size.
    """
    xs = as_sequence(xs, name)
    for m, x in enumerate(xs):
        if not is_array(x):
            raise not_an_array(f"{name}[{m}]", x)
        check_ndim(x, ndim, f"{name}[{m}]", layout)
    check_known_sizes([(f"{name}[{m}]", x) for m, x in enumerate(xs)])
    batch = xs[0].shape[0]
    for m, x in enumerate(xs[1:], start=1):
        if x.shape[0] != batch:
            raise ValueError(
                f"{name}[{m}] has batch size {x.shape[0]} (shape {fmt_shape(x.shape)}) but "
                f"{name}[0] has batch size {batch} (shape {fmt_shape(xs[0].shape)}); "
                "all modalities must share the batch axis"
            )
    return xs, batch


def check_present(xp: Any, present: Any, batch: int, n_modalities: int) -> None:
    """``present`` is a boolean (B, M) array saying which modality each sample has."""
    if not is_array(present):
        raise TypeError(f"present must be a boolean array, got {type(present).__name__}")
    check_bool(xp, present, "present")
    if tuple(present.shape) != (batch, n_modalities):
        raise ValueError(
            f"present must have shape (B, M) = {fmt_shape((batch, n_modalities))}, "
            f"got {fmt_shape(present.shape)}"
        )
