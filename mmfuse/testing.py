"""Helpers for testing mmfuse and code built on it: ``assert_close`` and random inputs."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._namespace import array_namespace, device_of, is_array, is_host_device, namespace_name, to_numpy
from ._validation import Seed

__all__ = ["assert_close", "default_rtol", "make_inputs"]

# Relative tolerances per dtype.  The ops chain M products and sums of up to a few thousand
# terms, so float32 is allowed a few hundred ulps; float64 results are compared tightly.
# Integer and boolean results are exact.
_RTOL = {"float64": 1e-10, "float32": 2e-4, "float16": 2e-2, "bfloat16": 5e-2}
# NumPy's long double (float128 on x86-64 Linux, float96 on 32-bit x86): at least float64's
# precision, so float64's tolerance (the float32 fallback had let 5e-5 errors pass)
_RTOL.update(float128=_RTOL["float64"], float96=_RTOL["float64"])
_EXACT = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


# torch's own aliases, where they differ from NumPy's reading of the same word ("float" is
# float32 in torch, float64 in NumPy)
_TORCH_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "cfloat": "complex64",
                  "cdouble": "complex128", "long": "int64", "int": "int32", "short": "int16"}  # fmt: skip


def _dtype_key(dtype: Any) -> str:
    """One name for a dtype however it is spelled: ``"float32"``, ``"torch.float32"``,
    ``np.float32``, ``np.dtype("float32")``, ``torch.float32``, ``jnp.float32``,
    ``array_api_strict.float32`` all give ``"float32"``; NumPy's own spellings too (``float``,
    ``"f8"``, ``"double"``, ``"float"`` give ``"float64"``), and torch's aliases with their
    prefix (``"torch.double"``: float64, ``"torch.half"``: float16, ``"torch.float"``:
    float32).

    Raises
    ------
    TypeError
        For anything that names no dtype (``None``, ``"bogus"``), which would otherwise get
        some tolerance silently.
    """
    if isinstance(dtype, str):
        prefix, _, name = dtype.rpartition(".")
        if prefix == "torch" and name in _TORCH_ALIASES:
            return _TORCH_ALIASES[name]
        torch = sys.modules.get("torch") if prefix == "torch" else None
        if torch is not None and isinstance(getattr(torch, name, None), torch.dtype):
            # torch's own names NumPy lacks ("torch.chalf", "torch.float8_e4m3fn"): as the dtype
            # object (they had been said to name no dtype; a review's find)
            return _dtype_key(getattr(torch, name))
        if name == "bfloat16":  # not a NumPy dtype
            return name
        try:  # NumPy's spellings ("f8", "double"), also after another namespace's prefix
            return str(np.dtype(name).name)
        except TypeError:
            raise TypeError(f"dtype {dtype!r} names no dtype") from None
    torch_dtype = getattr(sys.modules.get("torch"), "dtype", None)  # (see half_imported)
    if torch_dtype is not None and isinstance(dtype, torch_dtype):
        return str(dtype).rsplit(".", 1)[-1]
    if dtype in (float, int, bool, complex):  # Python's types, as NumPy reads them
        return str(np.dtype(dtype).name)
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and hasattr(dtype, "dtype")):
        try:  # NumPy / CuPy / Dask dtypes and scalar types, JAX scalar types, ml_dtypes
            return str(np.dtype(dtype).name)
        except TypeError:
            pass
    # array_api_strict's DType prints as "array_api_strict.float32"
    name = str(dtype).rsplit(".", 1)[-1]
    if dtype is None or (name not in _RTOL and name not in _EXACT and not name.startswith("complex")):
        raise TypeError(f"dtype must be a dtype or its name, got {dtype!r}")
    return name


def default_rtol(dtype: Any) -> float:
    """The relative tolerance used for results of ``dtype``.

    ``dtype`` may be a dtype of any namespace (NumPy, torch, JAX, array_api_strict, ...), a
    NumPy scalar type such as ``np.float32``, or a name (``"float32"``, ``"torch.float32"``).
    Integer and boolean dtypes get 0 (exact), NumPy's long double float64's tolerance, complex
    dtypes the float32 tolerance; a TypeError for what names no dtype, or one without a
    tolerance here (8-bit floats, which mmfuse does not compute in; object, string, date
    and void dtypes: these had got float32's silently).
    """
    key = _dtype_key(dtype)
    if key in _EXACT:
        return 0.0
    if key in _RTOL:
        return _RTOL[key]
    if key.startswith("complex"):
        return _RTOL["float32"]
    raise TypeError(
        f"no default tolerance for dtype {dtype!r}: mmfuse.testing has them for floating dtypes "
        "of 16 bits or more, complex, integer and boolean ones; pass rtol"
    )


def _check_tolerance(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not float(value) >= 0.0:  # also refuses NaN
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _host(x: Any, label: str) -> np.ndarray:
    """``x`` as a NumPy array in its own dtype; complex and non-numeric data refused."""
    if getattr(getattr(x, "device", None), "type", None) == "meta":  # torch: shapes, no values
        raise TypeError(
            f"assert_close compares values; {label} is a tensor on the 'meta' device, which holds none"
        )
    if getattr(x, "is_nested", False) is True:  # torch's internal error or a subclass's otherwise
        raise TypeError(
            f"assert_close compares dense arrays; {label} is a nested tensor: compare its padded "
            "form (torch.nested.to_padded_tensor(t, 0.0)) or its components"
        )
    a = to_numpy(x, dtype=None)
    if a.dtype.kind == "c":
        raise TypeError(f"assert_close compares real-valued arrays only; {label} has complex dtype {a.dtype}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"assert_close compares numeric arrays only; {label} has dtype {a.dtype}")
    return a


def _same_device(actual: Any, want: Any) -> bool:
    """``actual``'s device matches ``want``, compared in a normalised form.

    torch: ``str(torch.device(...))``, where a device without an index (``"cuda"``) matches
    any index of that type.  Other namespaces: their own device objects, ``"cpu"`` also
    matching the namespace's CPU device (NumPy's ``"cpu"``, array_api_strict's
    ``CPU_DEVICE``, a JAX CPU device).
    """
    got = device_of(actual)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (see half_imported)
    if tensor is not None and isinstance(actual, tensor):
        torch = sys.modules["torch"]
        if not isinstance(want, (str, torch.device)):
            return False
        try:
            want_t = torch.device(want)
        except RuntimeError:
            return False
        if is_host_device(got) and is_host_device(want_t):  # torch's CPU is one device: "cpu", "cpu:0"
            return True
        return str(got) == str(want_t) or (want_t.index is None and got.type == want_t.type)
    try:
        if got == want:
            return True
    except Exception:
        pass
    return is_host_device(want) and is_host_device(got)


def _where(shape: tuple[int, ...], flat: int) -> str:
    return str(tuple(int(i) for i in np.unravel_index(flat, shape))) if shape else "()"


def assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    err_msg: str = "",
) -> None:
    """Assert ``actual`` matches ``desired`` in namespace, dtype, shape, device and values.

    Parameters
    ----------
    actual : array
        The result under test (real-valued: complex arrays are refused).
    desired : array
        The expected values (any namespace; typically the float64 NumPy reference).
    rtol : float, optional
        Relative tolerance; default from ``actual``'s dtype (see :func:`default_rtol`): 0
        for integer and boolean results, which are compared exactly.
    atol : float, optional
        Absolute tolerance; default ``rtol * max|desired|`` (over the finite entries), so
        that entries that cancel to near zero are judged on the scale of the whole result.
    xp, dtype, device : optional
        When given, ``actual`` must live in namespace ``xp``, have dtype ``dtype`` (any
        spelling: a dtype of any namespace or its name) and sit on ``device`` (for torch,
        compared as ``str(torch.device(device))``; ``"cpu"`` also names the CPU device of
        other namespaces).
    err_msg : str, optional
        Put at the start of the AssertionError's message (as in NumPy's ``assert_allclose``).

    Raises
    ------
    AssertionError
        With the first mismatching property, or the worst element and the tolerances.
    TypeError
        If an array is complex or not numeric, or ``rtol`` or ``atol`` is not a real number
        (a string, a bool).
    ValueError
        If ``rtol`` or ``atol`` is negative or NaN.

    Notes
    -----
    Non-finite entries must match exactly: NaN where ``desired`` has NaN, and an infinity
    of the same sign where ``desired`` has one.

    Examples
    --------
    >>> import numpy as np
    >>> from mmfuse.testing import assert_close
    >>> assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), dtype=np.float32)
    """
    prefix = f"{err_msg}: " if err_msg else ""
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    if not is_array(actual):
        raise AssertionError(f"{prefix}expected an array, got {type(actual).__name__}")
    got_xp = array_namespace(actual)
    if xp is not None:
        from ._validation import check_namespace

        check_namespace(xp)
    if xp is not None and namespace_name(got_xp) != namespace_name(array_namespace(xp.asarray(0.0))):
        raise AssertionError(f"{prefix}namespace {namespace_name(got_xp)} != {namespace_name(xp)}")
    if dtype is not None and _dtype_key(actual.dtype) != _dtype_key(dtype):
        raise AssertionError(f"{prefix}dtype {_dtype_key(actual.dtype)} != {_dtype_key(dtype)}")
    if device is not None and not _same_device(actual, device):
        raise AssertionError(f"{prefix}device {device_of(actual)!r} != {device!r}")
    a = _host(actual, "actual")
    d = _host(desired, "desired")
    if a.shape != d.shape:
        raise AssertionError(f"{prefix}shape {a.shape} != {d.shape}")
    if rtol is None:
        rtol = default_rtol(actual.dtype)
    if a.dtype.kind in "biu" and d.dtype.kind in "biu" and rtol == 0 and not atol:
        # exact integer comparison, without a detour through float64 (which rounds > 2**53)
        bad = np.flatnonzero(a != d)
        if bad.size:
            i = int(bad[0])
            raise AssertionError(
                f"{prefix}values differ at {bad.size} of {a.size} entries (exact comparison); "
                f"first at index {_where(a.shape, i)}: actual {a.flat[i]} != desired {d.flat[i]}"
            )
        return
    if a.dtype.kind in "biuf" and d.dtype.kind in "biuf" and (_past_float64(a) or _past_float64(d)):
        # an integer past 2**53 on either side (a float actual against such a desired had
        # gone through float64, and 2**60 passed for 2**60 + 1 at rtol 0; a review's find)
        _assert_close_exactly(a, d, rtol, atol, prefix)
        return
    # long double compared as long double: through float64 values past its range were inf (or
    # 0) on both sides and passed (1e400 for 2e400; a review's find)
    work = np.longdouble if any(v.dtype.kind == "f" and v.dtype.itemsize > 8 for v in (a, d)) else np.float64
    a = a.astype(work)
    d = d.astype(work)
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        bad = np.flatnonzero(test(a) != test(d))
        if bad.size:
            i = int(bad[0])
            raise AssertionError(
                f"{prefix}non-finite values differ ({name} in one array only) at {bad.size} "
                f"entries; first at index {_where(a.shape, i)}: actual {a.flat[i]!r} != "
                f"desired {d.flat[i]!r}"
            )
    finite = np.isfinite(d)
    scale = np.max(np.abs(d[finite])) if finite.any() else work(0.0)  # (work's scalar: no overflow)
    if atol is None:
        atol = rtol * scale
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(a - d), 0.0)
        allowed = atol + rtol * np.abs(np.where(finite, d, 0.0))
    if err.size and np.any(err > allowed):
        i = int(np.argmax(err - allowed))
        raise AssertionError(
            f"{prefix}values differ: max |actual - desired| = {_e(err.max())} "
            f"(worst excess at index {_where(a.shape, i)}: {_e(err.flat[i])} > "
            f"{_e(allowed.flat[i])}); rtol={rtol:g}, atol={_e(atol)}, max|desired|={_e(scale)}"
        )


def _e(v: Any) -> str:
    """``f"{v:.3e}"``, for long doubles too (a format spec goes through float64)."""
    return np.format_float_scientific(v, precision=3, unique=False)


def _past_float64(a: np.ndarray) -> bool:
    """Whether integer array ``a`` holds a value float64 cannot (beyond 2**53 in magnitude)."""
    return a.dtype.kind in "iu" and a.size > 0 and (int(a.max()) > 2**53 or int(a.min()) < -(2**53))


def _assert_close_exactly(a: np.ndarray, d: np.ndarray, rtol: float, atol: float | None, prefix: str) -> None:
    """:func:`assert_close`'s test for arrays one of which holds integers past 2**53, in
    exact rational arithmetic (float64 would round them: 2**60 + 1 passed for 2**60 at rtol
    0).  The other may be float (each float is an exact rational); its non-finite entries
    mismatch."""
    from fractions import Fraction

    for label, arr in (("actual", a), ("desired", d)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise AssertionError(
                f"{prefix}non-finite values differ (in {label} only) at index {_where(a.shape, i)}: "
                f"actual {a.flat[i]!r} != desired {d.flat[i]!r}"
            )

    def rationals(arr: np.ndarray) -> list[Fraction]:
        return [Fraction(int(v) if arr.dtype.kind in "biu" else float(v)) for v in arr.flat]

    exact, want = rationals(a), rationals(d)
    scale = max((abs(w) for w in want), default=Fraction(0))
    bound = Fraction(rtol) * scale if atol is None else Fraction(atol)
    for i, (x, w) in enumerate(zip(exact, want)):
        if abs(x - w) > bound + Fraction(rtol) * abs(w):
            raise AssertionError(
                f"{prefix}values differ (exact comparison) at index {_where(a.shape, i)}: actual "
                f"{a.flat[i]} != desired {d.flat[i]}; |actual - desired| = {abs(x - w)}, "
                f"rtol={rtol:g}, atol={float(bound):.3e}"
            )


# The smallest subnormal number of each dtype whose rounding can turn a standard-normal draw
# into 0 (float64's, 5e-324, cannot): a draw below it in magnitude takes it, with its sign
_SMALLEST_SUBNORMAL = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}


def _nonzero(a: np.ndarray, dtype: Any) -> np.ndarray:
    """The float64 draw ``a`` with every entry that would round to 0 in ``dtype`` (None:
    float64) at that dtype's smallest subnormal, sign kept: ``make_inputs`` promises no zeros,
    and about one float16 draw in 4e7 rounded to one (a review's find)."""
    floor = None if dtype is None else _SMALLEST_SUBNORMAL.get(_dtype_key(dtype))
    if floor is None:
        return a
    small = np.abs(a) < floor
    if small.any():
        a[small] = np.copysign(floor, a[small])
    return a


def make_inputs(
    dims: Sequence[int],
    *,
    batch: int,
    seed: Seed = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    tokens: Sequence[int] | None = None,
    max_elements: int | None = None,
) -> list[Any]:
    """Random standard-normal modality inputs, (B, d_m) or (B, T_m, d_m) with ``tokens``.

    Drawn in float64 from ``seed``, then cast, so every namespace sees the same values; never
    zeros (a draw that would round to 0 in a 16-bit dtype, under 3e-8 for float16, takes that
    dtype's smallest subnormal number with its sign).

    Parameters
    ----------
    dims : sequence of int
        Feature size ``d_m`` of each modality.
    batch : int
        Batch size ``B``.
    seed : None, int, sequence of int, SeedSequence, BitGenerator or Generator, optional
        Seed of the draw.
    xp : array namespace, optional
        Namespace of the returned arrays; NumPy when None.  Dask arrays come in one chunk
        (``rechunk`` them for tests of chunked paths).
    dtype : dtype or str, optional
        A real floating dtype of ``xp`` (or its name); float64 when None (float32 where the
        namespace has no float64 on ``device``: JAX without its 64-bit mode, where float64
        is refused since JAX would truncate it, torch's MPS, array-api-strict's
        "no_float64" device).
    device : optional
        Device of the returned arrays in ``xp``; NumPy arrays only live on the CPU.
    tokens : sequence of int, optional
        Sequence length ``T_m`` of each modality, one per entry of ``dims``.
    max_elements : int, optional
        Largest array allowed, in elements (default ``mmfuse.DEFAULT_MAX_ELEMENTS``, as the
        initialisers): a larger one is refused before anything is drawn.

    Raises
    ------
    ValueError
        If ``tokens`` and ``dims`` differ in length, a size is not a positive integer
        (``batch``: a non-negative one), an array would be over ``max_elements``,
        ``device`` is not a device of ``xp``, or ``seed`` is a negative int.
    TypeError
        If ``dtype`` is not a real floating dtype (a cast to it would not keep the values),
        ``dims`` or ``tokens`` is not a sequence (a set or dict: no modality order), ``xp``
        is not a namespace, or ``seed`` is not a seed.

    Examples
    --------
    >>> from mmfuse.testing import make_inputs
    >>> [x.shape for x in make_inputs([3, 5], batch=2, seed=0)]
    [(2, 3), (2, 5)]
    """
    from ._fusion import DEFAULT_MAX_ELEMENTS, check_allocations
    from ._namespace import from_numpy
    from ._validation import (
        check_device,
        check_namespace,
        check_positive_int,
        check_size_list,
        random_generator,
    )
    from .datasets import resolve_dtype

    dims = check_size_list("dims", dims)
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, numbers.Integral) or batch < 0:
        raise ValueError(f"batch must be a non-negative integer, got {batch!r}")
    if xp is not None:
        check_namespace(xp)
    if tokens is not None:
        tokens = check_size_list("tokens", tokens)
    if tokens is not None and len(tokens) != len(dims):
        raise ValueError(f"tokens has {len(tokens)} entries but dims has {len(dims)}: give one per modality")
    limit = DEFAULT_MAX_ELEMENTS if max_elements is None else check_positive_int("max_elements", max_elements)
    planned = [
        (f"xs[{m}]", f"(B, d_{m})" if tokens is None else f"(B, T_{m}, d_{m})",
         (batch, d) if tokens is None else (batch, tokens[m], d),
         f"batch={batch}, dims[{m}]={d}" + ("" if tokens is None else f", tokens[{m}]={tokens[m]}"))
        for m, d in enumerate(dims)
    ]  # fmt: skip
    if planned:
        check_allocations("make_inputs", planned, limit)
    cast = None if dtype is None and xp is None else resolve_dtype(xp, dtype, device)
    # before drawing from a caller's Generator; in the arrays' dtype (a device without float64
    # takes float32 inputs)
    check_device(np if xp is None else xp, device, cast)
    rng = random_generator(seed)
    shapes = [(batch, d) for d in dims] if tokens is None else [(batch, t, d) for t, d in zip(tokens, dims)]
    arrays = [_nonzero(rng.standard_normal(s), cast) for s in shapes]
    if xp is None:
        return [a if cast is None else a.astype(cast) for a in arrays]
    return [from_numpy(a, xp, dtype=cast, device=device) for a in arrays]
