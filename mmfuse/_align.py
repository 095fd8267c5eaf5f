"""Public Zoom-and-Shift alignment: moments, zoom, shift, zoom_shift, align, zoom_shift_fusion.

The Zoom-and-Shift papers describe the idea (alternately shift and zoom each modality's
features toward the others until they share one feature space) but publish no usable equations
or code.  The formalisation here is mmfuse's own (see ``docs/theory/zoom_shift.rst`` and the Notes
of each function).  This layer checks arguments (from metadata; the one value check is that no
sample has every token masked), picks the implementation through the backend registry and calls
it.  The maths lives in :mod:`mmfuse._core.align` (Array-API core) and
:mod:`mmfuse.reference.align` (the NumPy oracle).
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from ._core import align as core
from ._namespace import (
    array_namespace,
    check_array,
    in_native_order,
    in_work_dtype,
    is_array,
    is_jax,
    is_torch,
    low_precision,
    mask_tokens,
    not_an_array,
    work_dtype,
)
from ._plan import PlanCache, call_key, planned_impl
from ._validation import (
    as_sequence,
    check_bool,
    check_same_float_dtype,
    common_namespace,
    fmt_shape,
)
from .backends._registry import choose

__all__ = ["align", "moments", "shift", "zoom", "zoom_shift", "zoom_shift_fusion"]

SCHEDULES = ("gauss-seidel", "jacobi")
TOPOLOGIES = ("consensus", "hub")
FUSE_MODES = ("concat", "sum", "mean", None)
POOL_MODES = ("mean", "max")



# --------------------------------------------------------------------------- checks


# Why one entry along the statistics axis is refused (whatever eps: "its spread is only
# sqrt(eps)" read oddly at eps = 0, a new user's report)
SINGLE_ENTRY = "its variance is 0 (a single entry is its own mean), so alignment would erase it"


def _check_axis(x: Any, axis: Any, name: str) -> int:
    """Normalise ``axis`` for ``x``; refuse the batch axis and an empty or single-entry axis."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    axis = int(axis)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have a batch axis and a statistics axis (at least 2 dimensions, "
            f"e.g. (B, T, C)), got shape {fmt_shape(x.shape)}"
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"axis={axis} is out of range for {name} with shape {fmt_shape(x.shape)} "
            f"({x.ndim} dimensions)"
        )
    ax = axis % x.ndim
    if ax == 0:
        raise ValueError(
            f"axis={axis} is the batch axis of {name} with shape {fmt_shape(x.shape)}: "
            "statistics are per sample and never reduce over the batch; pass (B, T, C) inputs "
            "(tokens on axis -2), or axis=-1 to take statistics over channels"
        )
    if x.shape[ax] == 0:
        raise ValueError(
            f"{name} has no entries along the statistics axis axis={axis} (shape "
            f"{fmt_shape(x.shape)}): its statistics are undefined; every sample needs at least "
            "one token"
        )
    if x.shape[ax] == 1:
        # the channel axis as the way out, unless it is the axis already in use
        instead = (
            "; for L = 1 inputs pass axis=-1 to take statistics over channels instead"
            if ax != x.ndim - 1
            else ""
        )
        raise ValueError(
            f"{name} has a single entry along the statistics axis axis={axis} (shape "
            f"{fmt_shape(x.shape)}): {SINGLE_ENTRY}"
            f"{instead}"
        )
    return ax


def _real_float(value: Any, name: str) -> float:
    """``float(value)``; an int beyond float64's range (2**1024) is refused by name with its
    size rather than its digits (10**400 would fill a message with 401 of them)."""
    try:
        return float(value)
    except OverflowError:
        size = f"an int of {int(value).bit_length()} bits"
        raise ValueError(f"{name} is too large for a floating-point number: {size}") from None


def _not_a_real(name: str, value: Any) -> TypeError:
    """The refusal of a non-number option; for an array (a tensor, a JAX value traced by
    ``jax.jit``) with the remedy: these options steer the computation's Python."""
    hint = ""
    if hasattr(value, "shape"):
        hint = (
            f"; {name} decides the computation's Python (rules, limits), so it cannot be an "
            f"array: pass a Python float (float({name}) outside a trace; under jax.jit a static "
            "argument, static_argnames, or a closed-over constant)"
        )
    return TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise _not_a_real("eps", eps)
    value = _real_float(eps, "eps")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (0 is allowed), got {eps!r}")
    return value


def check_eps_dtype(xp: Any, eps: float, dtype: Any) -> None:
    """``eps`` is 0 or a normal number of the dtype the statistics are computed in (float32
    for float32, float16 and bfloat16 inputs): a smaller one is lost to underflow there (an
    eps of 1e-50 adds 0 to a float32 variance, and sqrt(1e-100) is 0), while the rules that
    keep a lane with no spread finite follow eps's Python value (NaN outputs), and backends
    that compute in float64 would keep it (different outputs).  Nor above that dtype's
    largest number: ``var + eps`` overflowed to inf there (every output NaN), where the numba
    kernels and the reference, in float64, gave finite ones (a review's find).  An eps just
    below it still overflows ``var + eps`` for large enough spreads, as large spreads alone
    do: the range limits of docs/backends.rst, not refused here."""
    if eps == 0:
        return
    work = work_dtype(xp, dtype)
    info = xp.finfo(work)
    tiny, big = float(info.smallest_normal), float(info.max)
    if eps > big:
        raise ValueError(
            f"eps={eps!r} is above {big:.3g}, the largest number of {_dtype_name(work)}, in which "
            f"the statistics of {_dtype_name(dtype)} inputs are computed: var + eps would overflow"
        )
    if eps < tiny:
        raise ValueError(
            f"eps={eps!r} is below {tiny:.3g}, the smallest normal number of {_dtype_name(work)}, in "
            f"which the statistics of {_dtype_name(dtype)} inputs are computed: it would be lost to "
            f"underflow; use eps=0 or eps >= {tiny:.3g}"
        )


def _dtype_name(dtype: Any) -> str:
    """A dtype as a message names it: "float32" also for a scalar type (NumPy's and JAX's
    ``xp.float32`` are classes), "torch.float32" for torch's."""
    return dtype.__name__ if isinstance(dtype, type) else str(dtype)


def check_hub(hub: Any, topology: str, n: int) -> int:
    """The hub modality's index in [0, n) for ``topology="hub"`` (``None``: 0, negative
    indices from the end), 0 for another topology, which has no hub: ``hub`` given with it is
    refused rather than silently ignored."""
    if hub is None:
        return 0
    if isinstance(hub, bool) or not isinstance(hub, numbers.Integral):
        raise TypeError(f"hub must be an int (a modality index), got {type(hub).__name__}")
    if topology != "hub":
        raise ValueError(
            f"hub={hub} applies to topology='hub' only: with topology={topology!r} every modality "
            "moves toward the others' statistics (leave hub out, or set topology='hub')"
        )
    if not -n <= int(hub) < n:
        raise ValueError(f"hub={hub} is out of range for {n} modalities (valid: 0 to {n - 1})")
    return int(hub) % n


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise _not_a_real("alpha", alpha)
    value = _real_float(alpha, "alpha")
    if not 0.0 < value <= 1.0:  # also False for NaN
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return value


def check_mask(xp: Any, mask: Any, x: Any, axis: int, name: str, x_name: str) -> None:
    """``mask``: boolean, shape ``x.shape[:axis + 1]``, no sample with every token masked."""
    if mask is None:
        return
    check_array(mask, name)
    check_bool(xp, mask, name)
    want = tuple(x.shape[: axis + 1])
    if tuple(mask.shape) != want:
        # the slice with axis counted from the front (x.shape[:axis + 1] reads as () for -1)
        layout = "(B, T)" if axis == x.ndim - 2 == 1 else f"x.shape[:{axis + 1}]"
        raise ValueError(
            f"{name} must have shape {layout} = {fmt_shape(want)} for {x_name} of shape "
            f"{fmt_shape(x.shape)} (axis={axis - x.ndim}), got {fmt_shape(mask.shape)}"
        )
    check_mask_values(xp, mask, axis, name)


def check_mask_values(xp: Any, mask: Any, axis: int, name: str) -> None:
    """The one check of values: no sample of ``mask`` has every token masked (skipped for
    lazy and meta arrays).  Planned calls (:mod:`mmfuse._plan`) still run it every time."""
    if mask is None:
        return
    if core.is_eager(xp, mask):
        empty = xp.logical_not(xp.any(mask, axis=axis))
        found = xp.any(empty)
        if is_jax(xp) and isinstance(found, sys.modules["jax"].core.Tracer):
            return  # a concrete mask inside a jit trace: its test is staged, not a value
        if bool(found):
            flat = xp.reshape(empty, (-1,))
            first = int(xp.argmax(xp.astype(flat, xp.int32)))
            raise ValueError(
                f"{name} masks every token of a sample (flat sample index {first}): its "
                "statistics are undefined; every sample needs at least one unmasked token"
            )


def _axis_label(x: Any, k: int) -> str:
    if k == 0:
        return "batch size"
    if k == x.ndim - 1:
        return "channel count"
    return f"size along axis {k}"


def _check_compatible(x: Any, other: Any, axis: int, name: str, other_name: str) -> None:
    """``other`` matches ``x`` on every axis but the statistics axis."""
    if other.ndim != x.ndim:
        raise ValueError(
            f"{other_name} has {other.ndim} dimensions (shape {fmt_shape(other.shape)}) but "
            f"{name} has {x.ndim} (shape {fmt_shape(x.shape)})"
        )
    for k in range(x.ndim):
        if k != axis and other.shape[k] != x.shape[k]:
            label = _axis_label(x, k)
            raise ValueError(
                f"{label} mismatch: {other_name} has {label} {other.shape[k]} (shape "
                f"{fmt_shape(other.shape)}) but {name} has {x.shape[k]} (shape "
                f"{fmt_shape(x.shape)}); they must agree on every axis but the statistics "
                f"axis (axis={axis - x.ndim})"
            )


# Each round is a pass of Python over the (B, 1, C) statistics, 15-30 us at small sizes: a
# million rounds take about half a minute, 10**30 never end.  Far fewer rounds already reach
# the limit to rounding, which rounds=None computes exactly.
MAX_ROUNDS = 10**6


def check_rounds(rounds: Any) -> int | None:
    if rounds is None:
        return None
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):
        raise TypeError(f"rounds must be a non-negative int or None, got {type(rounds).__name__}")
    count = int(rounds)
    if count < 0:
        raise ValueError(f"rounds must be a non-negative int or None, got {rounds}")
    if count > MAX_ROUNDS:
        shown = count if count < 10**12 else f"an int of {count.bit_length()} bits"
        raise ValueError(
            f"rounds must be at most {MAX_ROUNDS:_} (each round is a pass over the statistics), "
            f"got {shown}; rounds=None gives the exact limit of the rounds"
        )
    return count


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> None:
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _as_modalities(xs: Any) -> list[Any]:
    xs = as_sequence(xs, "xs", min_len=0)
    if len(xs) < 2:
        raise ValueError(f"xs must hold at least 2 modalities, got {len(xs)}")
    for m, x in enumerate(xs):
        check_array(x, f"xs[{m}]")
    return xs


def _check_align(
    xs: Any,
    rounds: Any,
    alpha: Any,
    schedule: Any,
    topology: Any,
    hub: Any,
    axis: Any,
    masks: Any,
    eps: Any,
) -> tuple[list[Any], list[Any] | None, int | None, float, int, float]:
    xs = _as_modalities(xs)
    rounds = check_rounds(rounds)
    alpha = check_alpha(alpha)
    eps = check_eps(eps)
    check_choice(schedule, "schedule", SCHEDULES)
    check_choice(topology, "topology", TOPOLOGIES)
    n = len(xs)
    hub = check_hub(hub, topology, n)
    named = [(f"xs[{m}]", x) for m, x in enumerate(xs)]
    if masks is not None:
        masks = as_sequence(masks, "masks", min_len=0)
        if len(masks) != n:
            raise ValueError(
                f"masks must have one entry (an array or None) per modality: got {len(masks)} "
                f"for {n} modalities"
            )
    xp = common_namespace([*named, *((f"masks[{m}]", k) for m, k in enumerate(masks or []))])
    check_eps_dtype(xp, eps, check_same_float_dtype(xp, named))
    ax = _check_axis(xs[0], axis, "xs[0]")
    for m, x in enumerate(xs[1:], start=1):
        _check_compatible(xs[0], x, ax, "xs[0]", f"xs[{m}]")
        _check_axis(x, axis, f"xs[{m}]")
    if masks is not None:
        for m, (x, k) in enumerate(zip(xs, masks)):
            check_mask(xp, k, x, ax, f"masks[{m}]", f"xs[{m}]")
        if all(k is None for k in masks):
            masks = None
    if (
        rounds is None
        and core.limit_weights(n, alpha, schedule, topology, hub) is None
    ):
        raise ValueError(
            "rounds=None: Jacobi consensus with M = 2 and alpha = 1 has no limit (the two "
            "modalities swap statistics every round); use schedule='gauss-seidel', "
            "alpha < 1, or a finite number of rounds"
        )
    return xs, masks, rounds, alpha, hub, eps


# --------------------------------------------------------------------------- moments


def moments(
    x: Any, *, axis: int = -2, mask: Any = None, eps: float = 1e-5, backend: str | None = None
) -> tuple[Any, Any]:
    r"""Per-sample, per-channel mean and standard deviation over the token axis.

    Parameters
    ----------
    x : array, shape (B, ..., T, C)
        Real floating features; axis 0 is the batch and is never reduced.
    axis : int, default -2
        The statistics axis (tokens).  ``axis=-1`` takes statistics over channels instead,
        the fallback for single-token (L = 1) inputs; it is used only when asked for.
    mask : bool array, shape ``x.shape[:axis + 1]`` with axis counted from the front (``(B, T)``
        by default, ``x.shape`` for ``axis=-1``), optional
        True for tokens that count; masked tokens are excluded from both statistics.
    eps : float, default 1e-5
        Added to the variance inside the square root; 0 is allowed.
    backend : str, optional
        Implementation to run (see :func:`mmfuse.set_config`); default: the configured one.

    Returns
    -------
    mean, std : arrays, the shape of x with ``axis`` kept as 1
        In x's namespace, dtype and device.  Computed in at least float32 (float16 and
        bfloat16 accumulate in float32).

    Raises
    ------
    ValueError
        ``axis`` is the batch axis or has a single entry, negative ``eps`` or one below the
        smallest normal number of the statistics' dtype (float32 for 32- and 16-bit
        inputs) or above its largest, a mask of the wrong shape or one that masks every
        token of a sample.  That last check reads the mask's values, so Dask masks, traced JAX masks (under
        ``jax.jit`` or ``jax.vmap``) and torch masks on the ``meta`` device, fake (under
        ``FakeTensorMode`` or a non-strict ``torch.export``: shapes without values) or seen by a
        ``torch.func`` transform (``vmap``: values that cannot steer Python) skip it:
        a sample with every token masked then gets NaN statistics instead of an error.
    TypeError
        Non-floating x, an ``axis`` that is not an int, non-boolean mask, mixed namespaces.

    Notes
    -----
    mmfuse's formalisation (the papers give none): with :math:`m_t` the mask and
    :math:`n = \sum_t m_t`,

    .. math:: \mu = \frac{1}{n} \sum_t m_t x_t, \qquad
              \sigma = \sqrt{\frac{1}{n} \sum_t m_t (x_t - \mu)^2 + \varepsilon}

    (population variance, eps inside the root).  Naive definition, per sample b and channel c::

        v = x[b, :, c][mask[b]]
        mean[b, 0, c] = v.sum() / len(v)
        var = ((v - mean[b, 0, c]) ** 2).sum() / len(v)
        std[b, 0, c] = np.sqrt(var + eps)

    Numerics: every backend accumulates in at least float32: in float64 the numba CPU
    kernels, the reference, and on NumPy (and NumPy's sums under array_api_strict and Dask)
    token axes over 64 long (the NumPy path sums the tokens in float64, and the squared
    deviations in float32 chunks of 64 tokens, added in float64; there, and under
    array_api_strict and Dask, :math:`\mu - p` below is the float64 mean's difference from
    the pivot, its float32 rounding, so the mean is the float64 mean rounded once); torch,
    JAX, CuPy and the Triton kernels sum float32 in float32, as trees.  (NumPy sums a
    non-contiguous axis one row after another: in float32 a long token axis lost its
    pivot.)  The Array-API core and
    the torch custom op use the shifted two-pass algorithm: with :math:`p` the plain mean (a
    pivot) and :math:`d_t = x_t - p`,

    .. math:: \mu = p + \frac{1}{n} \sum_t m_t d_t, \qquad
              \mathrm{var} = \frac{1}{n} \sum_t m_t d_t^2 - (\mu - p)^2,

    exact for any :math:`p` and accurate whatever the ratio of mean to spread (the rounded
    float32 mean of data 1e4 + 1e-2 noise is off by a tenth of the spread; a plain two-pass
    variance would carry the square of that).  Limits, from the variance's range (squares of the
    spread): float32 statistics overflow (inf or NaN) when the spread exceeds about 1.8e19 (over
    n tokens, from about 1.8e19 / sqrt(n), where the sum of squares does), float64's about
    1.3e154 (likewise from about 1.3e154 / sqrt(n)); and spreads below about 1e-19 (float32) or
    1e-154 (float64) underflow, losing precision down to a spread of 0 (the lane then counts as
    having none: shifted, not zoomed).  Where float32 sums in float32 (torch, JAX, CuPy, Triton,
    short NumPy axes) the deviations are taken from a rounded first mean, so the magnitude
    counts too: float32 statistics of values above about 1e26 overflow even with no spread (the
    mean's rounding, an ulp of the values, squared), and a sum of tokens near float32's maximum
    overflows (float64 accumulation has neither limit for float32 data).  float64 data whose
    token sum passes float64's maximum (``|x| T`` over about 1.8e308: 1000 tokens of 2e305) gets
    NaN statistics on every backend, with no spread too.  float16 / bfloat16 compute in
    float32.  Compute in float64 for such data.  On NumPy the batch is walked in cache-sized
    blocks, so x is read from memory once.

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> x = np.array([[[1.0, 10.0], [3.0, 30.0]]])       # (B, T, C) = (1, 2, 2)
    >>> mean, std = mmfuse.moments(x, eps=0.0)
    >>> mean, std
    (array([[[ 2., 20.]]]), array([[[ 1., 10.]]]))
    >>> mmfuse.moments(x, mask=np.array([[True, False]]), eps=0.0)[0]
    array([[[ 1., 10.]]])
    """
    key = call_key(backend, (axis, eps), x, mask)
    plan = _MOMENTS_PLANS.get(key)
    if plan is None:
        plan = _MOMENTS_PLANS.remember(key, _plan_moments(x, axis, mask, eps, backend))
    elif mask is not None:
        check_mask_values(array_namespace(mask), mask, plan.keywords["axis"] % x.ndim, "mask")
    return plan(x, mask=mask)


_MOMENTS_PLANS = PlanCache()


def _plan_moments(x: Any, axis: Any, mask: Any, eps: Any, backend: Any) -> Any:
    """Check a :func:`moments` call and choose its implementation (its plan)."""
    check_array(x, "x")
    xp = common_namespace([("x", x), ("mask", mask)])
    dtype = check_same_float_dtype(xp, [("x", x)])
    eps = check_eps(eps)
    check_eps_dtype(xp, eps, dtype)
    ax = _check_axis(x, axis, "x")
    check_mask(xp, mask, x, ax, "mask", "x")
    impl = choose("moments", backend, like=x, arrays=(x, mask))
    return partial(in_native_order(impl, (x,)), axis=axis, eps=eps)


# --------------------------------------------------------------------------- primitives


def _check_operand(xp: Any, x: Any, v: Any, name: str) -> Any:
    """``v`` is a real scalar or an array of x's namespace and dtype broadcasting to x.

    Returns ``v``, with real scalars (Python or NumPy) as Python floats: NumPy 2 scalars are
    not weakly typed, so ``np.float64(2.0)`` would promote a float32 x to float64.
    """
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return _real_float(v, name)
    if isinstance(v, np.matrix):
        raise not_an_array(name, v)
    if not is_array(v):  # (a bool or complex scalar too: not a real number here)
        raise TypeError(f"{name} must be an array or a real scalar, got {type(v).__name__}")
    common_namespace([("x", x), (name, v)])
    if getattr(v, "weak_type", False) is True and xp.isdtype(v.dtype, ("real floating", "integral")):
        # JAX: a weakly typed array (a Python float or int under jax.jit, jnp.asarray(0.5))
        # takes the dtype x computes in, like the Python number it stands for (which an eager
        # call takes): x's own, float32 for 16-bit x (rounded to float16 first, a scale of 1e5
        # had given inf under jit where the eager call is finite; a review's find)
        v = xp.astype(v, work_dtype(xp, x.dtype))
    else:
        check_same_float_dtype(xp, [("x", x), (name, v)])
    shape = tuple(x.shape)
    vs = tuple(v.shape)
    ok = len(vs) <= len(shape) and all(
        a in (1, b) for a, b in zip(vs[::-1], shape[::-1])
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {fmt_shape(vs)} does not broadcast to x's shape "
            f"{fmt_shape(shape)} (e.g. statistics of shape (B, 1, C) for x of shape (B, T, C))"
        )
    return v


def zoom(x: Any, scale: Any, *, center: Any) -> Any:
    r"""Zoom x about ``center`` by ``scale``: ``center + (x - center) * scale``.

    Parameters
    ----------
    x : array
        Real floating features, e.g. (B, T, C).
    scale : array or real scalar
        Broadcasts to x's shape, e.g. a (B, 1, C) ratio of standard deviations.  Real scalars
        (Python or NumPy, e.g. ``np.float64(2.0)``) are taken as Python floats, so they never
        change the result's dtype; an array, 0-d included, must have x's dtype (a weakly
        typed JAX array, such as a Python float passed through ``jax.jit``, takes the dtype
        x computes in: x's own, float32 for float16 / bfloat16 x).
    center : array or real scalar
        The fixed point of the zoom, e.g. x's own (B, 1, C) mean; scalars as for ``scale``.

    Returns
    -------
    array, x's shape
        In x's namespace and dtype (float16 and bfloat16 computed in float32, rounded once).

    Raises
    ------
    ValueError
        ``scale`` or ``center`` does not broadcast to x's shape.
    TypeError
        Non-floating x, an array operand (a 0-d one included) of another dtype or namespace,
        a boolean operand.

    Notes
    -----
    One of mmfuse's two primitives of Zoom-and-Shift (our formalisation).  Zooming about x's
    own mean keeps the mean and multiplies the standard deviation by ``|scale|`` (the raw one:
    :func:`moments`' spread, ``sqrt(var + eps)``, moves by that only up to eps), so it commutes with
    :func:`shift`.  Naive definition::

        y = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            y[idx] = center[idx] + (x[idx] - center[idx]) * scale[idx]  # broadcast indices

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> mmfuse.zoom(np.array([1.0, 2.0, 3.0]), 2.0, center=2.0)
    array([0., 2., 4.])
    """
    check_array(x, "x")
    xp = common_namespace([("x", x)])
    check_same_float_dtype(xp, [("x", x)])
    scale = _check_operand(xp, x, scale, "scale")
    center = _check_operand(xp, x, center, "center")
    if low_precision(xp, x.dtype):
        # float16 / bfloat16 in float32, rounded once, as every operator: in x's dtype NumPy's
        # and JAX's weak scalars are first rounded to it (scale = 1e5 became inf, where the
        # result is finite, and torch's opmath gave it: a review's find)
        return _as_array(x, in_work_dtype(core.zoom, xp, x.dtype, x, scale, center=center))
    return _as_array(x, core.zoom(x, scale, center=center))


def _as_array(x: Any, out: Any) -> Any:
    """``out``, a 0-d NumPy array where x is one: NumPy's arithmetic on 0-d arrays gives a
    scalar (np.float64), and :func:`zoom` and :func:`shift` return an array of x's shape, as
    in every other namespace (a review's find)."""
    return np.asarray(out) if type(x) is np.ndarray and x.ndim == 0 else out


def shift(x: Any, offset: Any) -> Any:
    r"""Shift x by ``offset``: ``x + offset``.

    Parameters
    ----------
    x : array
        Real floating features, e.g. (B, T, C).
    offset : array or real scalar
        Broadcasts to x's shape, e.g. a (B, 1, C) step toward a guide's mean.  Real scalars
        (Python or NumPy) are taken as Python floats, so they never change the result's
        dtype; an array, 0-d included, must have x's dtype (a weakly typed JAX array, such
        as a Python float passed through ``jax.jit``, takes the dtype x computes in, as for
        :func:`zoom`).

    Returns
    -------
    array, x's shape
        In x's namespace and dtype (float16 and bfloat16 computed in float32, rounded once).

    Raises
    ------
    ValueError
        ``offset`` does not broadcast to x's shape.
    TypeError
        Non-floating x, an array operand (a 0-d one included) of another dtype or namespace,
        a boolean operand.

    Notes
    -----
    The other primitive of Zoom-and-Shift (our formalisation): it moves the mean and leaves
    the spread alone.  Naive definition::

        y = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            y[idx] = x[idx] + offset[idx]  # broadcast indices

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> mmfuse.shift(np.array([[[1.0], [3.0]]]), np.array([[[10.0]]]))[:, :, 0]
    array([[11., 13.]])
    """
    check_array(x, "x")
    xp = common_namespace([("x", x)])
    check_same_float_dtype(xp, [("x", x)])
    offset = _check_operand(xp, x, offset, "offset")
    if low_precision(xp, x.dtype):  # (as zoom: in float32, rounded once)
        return _as_array(x, in_work_dtype(core.shift, xp, x.dtype, x, offset))
    return _as_array(x, core.shift(x, offset))


# --------------------------------------------------------------------------- zoom_shift


def zoom_shift(
    x: Any,
    guide: Any,
    *,
    alpha: float = 1.0,
    axis: int = -2,
    mask: Any = None,
    guide_mask: Any = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> Any:
    r"""Zoom and shift x toward the per-channel statistics of ``guide``.

    Parameters
    ----------
    x : array, shape (B, T, C)
        Features to move (any ``(B, ..., T, C)``; the statistics axis is ``axis``).
    guide : array, shape (B, T_g, C)
        Features whose statistics x moves toward.  Token counts may differ; every other axis
        (batch, channels) must match.
    alpha : float in (0, 1], default 1.0
        Step size: 1 matches the guide's mean and spread exactly (moment matching, AdaIN);
        smaller values move part of the way, in (mean, log std).
    axis : int, default -2
        The statistics axis (tokens); ``axis=-1`` for channel statistics (L = 1 fallback).
    mask, guide_mask : bool arrays, shapes (B, T) and (B, T_g), optional
        (``x.shape[:axis + 1]`` and ``guide.shape[:axis + 1]`` with axis counted from the
        front, as for :func:`moments`: the full shapes for ``axis=-1``.)
        True for tokens that count in x's and the guide's statistics.  The map is applied to
        every token of x, masked ones included; they just never influence it.  So padding
        must be finite (zeros, not NaN) for the output there, and for any gradient, to be
        finite: under autograd a NaN token's ``0 * NaN`` reaches the statistics' gradients.
        :func:`zoom_shift_fusion`, which never returns masked tokens, zeroes them itself.
    eps : float, default 1e-5
        Added to each variance inside the square root; 0 is allowed.
    backend : str, optional
        Implementation to run (see :func:`mmfuse.set_config`); default: the configured one.

    Returns
    -------
    array, x's shape
        In x's namespace, dtype and device.

    Raises
    ------
    ValueError
        Channel (or batch) mismatch, ``alpha`` outside (0, 1], negative ``eps`` or one below
        the smallest normal number of the statistics' dtype (float32 for 32- and 16-bit
        inputs) or above its largest, masks of the wrong shape or masking every token of a
        sample, ``axis`` on the batch, out of range, empty or with a single entry (T = 1:
        nothing to align; ``axis=-1`` takes statistics over channels instead), inputs of
        fewer than 2 dimensions.  The all-masked
        check reads the masks' values, so Dask masks, traced JAX masks (under ``jax.jit`` or
        ``jax.vmap``) and torch masks on the ``meta`` device, fake or seen by a ``torch.func``
        transform skip it (such a sample gets NaN statistics, and a NaN output).
    TypeError
        Non-floating or mixed dtypes, an ``axis`` that is not an int, non-boolean masks,
        mixed namespaces.

    Notes
    -----
    mmfuse's formalisation of one Zoom-and-Shift step [1]_ [2]_ (the papers give the idea, not
    equations).  With :func:`moments` :math:`(\mu_x, \sigma_x)` of x and
    :math:`(\mu_g, \sigma_g)` of the guide,

    .. math:: \mathrm{zoom}(x) = \mu_x + (x - \mu_x) \odot (\sigma_g / \sigma_x)^\alpha,
              \qquad
              \mathrm{shift}(x) = x + \alpha (\mu_g - \mu_x),

    and the result is the two composed (they commute: the zoom is about x's own mean).  The
    output's mean is :math:`\mu_x + \alpha(\mu_g - \mu_x)` and its log spread moves by the same
    fraction alpha toward the guide's (exactly at ``eps = 0``; with ``eps > 0`` up to
    :math:`O(\varepsilon / v_x + \varepsilon / v_g)` in the raw variances :math:`v` below: a
    guide with spread near :math:`\sqrt\varepsilon` or below is missed by a good part of it).  At
    alpha = 1 with ``eps = 0`` the output has exactly the guide's mean and std; with
    ``eps > 0`` its variance is :math:`\sigma_g^2 (1 - \varepsilon / \sigma_x^2)` in the
    spreads :func:`moments` gives (:math:`\sigma^2 = v + \varepsilon` of the raw variance
    :math:`v`), i.e. :math:`v_x (v_g + \varepsilon) / (v_x + \varepsilon)`: the guide's raw
    variance up to :math:`O(\varepsilon / v_x + \varepsilon / v_g)` of it (x's spread near
    :math:`\sqrt\varepsilon` keeps about half of it; a guide's near it gets about twice).  A
    channel of x with
    zero spread (possible only with ``eps = 0``) is shifted, not zoomed; gradients take
    the zero spread's own derivative as 0 (exact for a lane with one unmasked token, the
    subgradient 0 for equal values).  Statistics past their dtype's range (see
    :func:`moments`: float32 spreads above about 1.8e19) are infinite or NaN: an infinite
    spread zooms its lane by 0, so every token takes the target mean, as the plain
    ``(x - mu) / sigma * sigma_g + mu_g`` does, and a NaN one gives NaN.  The numba kernels
    accumulate float32 in float64, so they meet float64's limits instead.  Naive definition::

        mu_x, s_x = moments(x, mask=mask, eps=eps)
        mu_g, s_g = moments(guide, mask=guide_mask, eps=eps)
        y = zoom(x, (s_g / s_x) ** alpha, center=mu_x)
        y = shift(y, alpha * (mu_g - mu_x))

    Here it is one affine map ``x * s + t``; on NumPy each cache-sized batch block of x is
    reduced and mapped while in cache, so x is read from memory once.  The torch backend's op
    runs that NumPy code on the memory of CPU float32 / float64 tensors (faster there than
    torch's own operators at every size measured) and torch operations elsewhere.

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 50, 3))
    >>> guide = 5.0 + 3.0 * rng.standard_normal((2, 80, 3))
    >>> y = mmfuse.zoom_shift(x, guide, eps=0.0)
    >>> mu, sd = mmfuse.moments(y, eps=0.0)
    >>> mu_g, sd_g = mmfuse.moments(guide, eps=0.0)
    >>> bool(np.allclose(mu, mu_g) and np.allclose(sd, sd_g))
    True
    """
    key = call_key(backend, (alpha, axis, eps), x, guide, mask, guide_mask)
    plan = _ZOOM_SHIFT_PLANS.get(key)
    if plan is None:
        plan = _plan_zoom_shift(x, guide, alpha, axis, mask, guide_mask, eps, backend)
        _ZOOM_SHIFT_PLANS.remember(key, plan)
    elif mask is not None or guide_mask is not None:
        ax = plan.keywords["axis"] % x.ndim
        check_mask_values(array_namespace(x), mask, ax, "mask")
        check_mask_values(array_namespace(x), guide_mask, ax, "guide_mask")
    return plan(x, guide, mask=mask, guide_mask=guide_mask)


_ZOOM_SHIFT_PLANS = PlanCache()


def _plan_zoom_shift(
    x: Any, guide: Any, alpha: Any, axis: Any, mask: Any, guide_mask: Any, eps: Any, backend: Any
) -> Any:
    """Check a :func:`zoom_shift` call and choose its implementation (its plan)."""
    check_array(x, "x")
    check_array(guide, "guide")
    named = [("x", x), ("guide", guide)]
    xp = common_namespace([*named, ("mask", mask), ("guide_mask", guide_mask)])
    dtype = check_same_float_dtype(xp, named)
    alpha = check_alpha(alpha)
    eps = check_eps(eps)
    check_eps_dtype(xp, eps, dtype)
    ax = _check_axis(x, axis, "x")
    _check_compatible(x, guide, ax, "x", "guide")
    _check_axis(guide, axis, "guide")
    check_mask(xp, mask, x, ax, "mask", "x")
    check_mask(xp, guide_mask, guide, ax, "guide_mask", "guide")
    impl = choose("zoom_shift", backend, like=x, arrays=(x, guide, mask, guide_mask))
    impl = in_native_order(impl, (x, guide))
    options = {"alpha": alpha, "axis": axis, "eps": eps}
    impl = planned_impl(impl, (x, guide), {**options, "mask": mask, "guide_mask": guide_mask})
    return partial(impl, **options)


# --------------------------------------------------------------------------- align


def align(
    xs: Sequence[Any],
    *,
    rounds: int | None = 1,
    alpha: float = 1.0,
    schedule: str = "gauss-seidel",
    topology: str = "consensus",
    hub: int | None = None,
    axis: int = -2,
    masks: Sequence[Any] | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> list[Any]:
    r"""Align M modalities by alternating rounds of Zoom-and-Shift, or their limit.

    Parameters
    ----------
    xs : sequence of M >= 2 arrays, shapes (B, T_m, C)
        Token counts may differ; batch and channel counts must match.
    rounds : int in [0, 10**6] or None, default 1
        Number of rounds; ``None`` returns the exact limit of the iteration.  0 returns
        copies of the inputs (made as the identity map, ``x * 1 + (-0)``: JAX on CPU
        flushes subnormal values to 0 in that arithmetic, as in all of its own).
    alpha : float in (0, 1], default 1.0
        Step of each :func:`zoom_shift` (1: moment matching).
    schedule : {"gauss-seidel", "jacobi"}, default "gauss-seidel"
        Gauss-Seidel updates the modalities in index order, each using the others' latest
        values; Jacobi moves all of them from the previous round's values.
    topology : {"consensus", "hub"}, default "consensus"
        "consensus": each modality moves toward the others' pooled statistics (arithmetic
        mean of their means, geometric mean of their stds).  "hub": every modality moves
        toward modality ``hub``, which stays fixed (the guide).
    hub : int, optional
        The guide modality for ``topology="hub"`` (default 0; negative indices count from
        the end).  Refused with ``topology="consensus"``, which has no hub.
    axis : int, default -2
        Statistics axis (tokens); ``axis=-1`` for channel statistics (L = 1 fallback).
    masks : sequence of M bool arrays (or None), shapes (B, T_m), optional
        (``xs[m].shape[:axis + 1]`` with axis counted from the front, as for
        :func:`moments`: the full shapes for ``axis=-1``.)
        True for tokens that count in each modality's statistics.  Every token is mapped,
        masked ones included, so padding must be finite (zeros, not NaN) for the outputs
        there, and for any gradient, to be finite (see :func:`zoom_shift`).
    eps : float, default 1e-5
        Added to each variance inside the square root; 0 is allowed.
    backend : str, optional
        Implementation to run; default: the configured one.

    Returns
    -------
    list of M arrays
        The aligned modalities, shapes, namespace, dtype and device as the inputs.

    Raises
    ------
    ValueError
        Fewer than 2 modalities, channel or batch mismatch, ``alpha`` outside (0, 1], negative
        ``rounds`` or ``eps``, ``eps`` below the smallest normal number of the statistics'
        dtype (float32 for 32- and 16-bit inputs) or above its largest, unknown ``schedule`` or ``topology``,
        ``hub`` out of range or given with ``topology="consensus"``, masks of the wrong shape
        or masking every token of a sample, and ``rounds=None`` for Jacobi consensus with
        M = 2 and alpha = 1 (no limit: the two swap every round), ``axis`` on the batch, out
        of range, empty or with a single entry in any modality (T = 1: nothing to align;
        ``axis=-1`` takes statistics over channels instead), inputs of fewer than 2
        dimensions.  The all-masked check reads
        the masks' values, so Dask masks, traced JAX masks (under ``jax.jit`` or ``jax.vmap``)
        and torch masks on the ``meta`` device, fake or seen by a ``torch.func`` transform skip
        it (such a sample gets NaN statistics, and NaN outputs).
    TypeError
        Non-floating or mixed dtypes, non-integer ``rounds``, ``hub`` or ``axis``, mixed
        namespaces.

    Notes
    -----
    mmfuse's formalisation of "alternately shift and zoom until the modalities share one
    feature space" [1]_ [2]_.  One round updates every modality i (except the hub in "hub")
    with ``zoom_shift(x_i, target_i, alpha)``, where the target statistics are the others'
    pooled ones ("consensus") or the hub's.  Naive definition (Gauss-Seidel, consensus)::

        for r in range(rounds):
            for i in range(M):
                mu_t = mean([mu(x[j]) for j != i]); s_t = gmean([std(x[j]) for j != i])
                x[i] = zoom_shift_to(x[i], mu_t, s_t, alpha)   # re-measuring x[i] itself

    **The rounds are linear in (mean, log std).**  A step maps the statistics
    :math:`z_i = (\mu_i, \log \sigma_i)` of modality i to
    :math:`z_i + \alpha (\bar z_{-i} - z_i)` (exactly when eps = 0; with eps > 0 the measured
    :math:`\sigma = \sqrt{\mathrm{var} + \varepsilon}` is re-taken each round, as the
    definition does), so a round is :math:`z \mapsto A z` for an M x M row-stochastic matrix
    A, the same for both coordinates, per sample and channel.  For M = 2 under Gauss-Seidel,
    :math:`a' = (1 - \alpha) a + \alpha b` then :math:`b' = (1 - \alpha) b + \alpha a'`, so
    the gap :math:`b - a` shrinks by :math:`(1 - \alpha)^2` per round, the quantity
    :math:`(1 - \alpha) a + b` is invariant, and both converge to

    .. math:: z^\ast = \frac{(1 - \alpha) a_0 + b_0}{2 - \alpha}.

    In general :math:`A^k \to \mathbf 1 w^\top`: Jacobi consensus has
    :math:`A = (1 - \alpha) I + \alpha (J - I)/(M - 1)`, doubly stochastic with eigenvalues 1
    and :math:`1 - \alpha M/(M - 1)`, so it converges to the plain average (w = 1/M) unless
    M = 2 and alpha = 1, where it swaps the two modalities forever; Gauss-Seidel consensus
    converges to a weighted average: one checks that a sweep leaves
    :math:`\sum_j ((M - 1)(1 - \alpha) + \alpha j)\, z_j` invariant (for M = 2,
    :math:`(1 - \alpha) a + b`), so :math:`w_j \propto (M - 1)(1 - \alpha) + \alpha j`: later
    modalities weigh more, all of them equally as alpha -> 0; the hub converges to the hub
    (w = e_hub).  For eps = 0 the limit is :math:`\mu^\ast + (x_i - \mu_i)\,
    \sigma^\ast / \sigma_i` with :math:`\mu^\ast = \sum_j w_j \mu_j` and
    :math:`\sigma^\ast = \prod_j \sigma_j^{w_j}`: one affine map per modality.  With
    eps > 0 every round re-measures :math:`\sigma = \sqrt{\mathrm{var} + \varepsilon}`,
    which the linear map in (mu, log sigma) does not see (for spreads near 0.01 the eps = 0
    form missed the rounds' limit by a third of the spread); ``rounds=None`` returns the
    exact limit of the rounds as they run, from invariants of the recursion on the
    statistics (``mmfuse._core.align_limit``), still one affine map per modality; the
    eps = 0 form is its value at eps = 0.

    With ``alpha = 1`` one round already matches moments: for the hub topology and for two
    modalities under Gauss-Seidel further rounds change nothing (legal, but wasted; exactly
    so for eps = 0 in exact arithmetic, up to the O(eps / var) of re-measuring otherwise, and
    in floating point up to an ulp of re-rounding per round: see the range limits of
    ``docs/backends.rst``).
    Consensus with M >= 3 keeps mixing after the first round even at alpha = 1 (the later
    modalities see updated targets), and Jacobi with M = 2 swaps the two every round.

    A channel of a modality with no spread (a constant, or one unmasked token) is not zoomed
    in any round, at any eps, as in the limit: its tokens take their target mean, its masked
    tokens move with them.  (The naive definition would zoom it by
    :math:`(\sigma_t / \sqrt{\varepsilon})^\alpha` every round at eps > 0, without end
    under the hub topology: its spread stays sqrt(eps) while the hub's does not move.  That
    changes nothing for its unmasked tokens, which sit at their mean, but blew up its padding
    and, in floating point, the map itself.)  ``zoom_shift``, one step, keeps the formula.
    Gradients follow the rule too: such a lane's slope along x is 1 (for ``rounds=1``,
    alpha = 1 and a target fixed by the others, dL/dx_t = w_t minus the mean of w over the
    lane's unmasked tokens, for upstream w), where the naive definition's is
    :math:`(\sigma_t / \sqrt{\varepsilon})^\alpha` per round, compounding (a few hundred
    for one round at eps = 1e-5 and unit spreads).  So at a constant lane ``align``'s
    gradient differs from ``zoom_shift``'s and from finite differences of its own outputs
    (a perturbed lane has a spread, and is zoomed).

    Every round is affine in the data, so the implementation measures each modality once,
    runs the rounds on the (B, 1, C) statistics (tracking the variance exactly) and applies
    one composed affine map per modality: two reads of each input and one write, whatever
    ``rounds`` is.

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((2, 40, 3))
    >>> b = 4.0 + 2.0 * rng.standard_normal((2, 60, 3))
    >>> ya, yb = mmfuse.align([a, b], rounds=None, alpha=0.5, eps=0.0)
    >>> bool(np.allclose(mmfuse.moments(ya, eps=0.0)[0], mmfuse.moments(yb, eps=0.0)[0]))
    True
    >>> za, zb = mmfuse.align([a, b], rounds=60, alpha=0.5, eps=0.0)
    >>> bool(np.allclose(za, ya) and np.allclose(zb, yb))
    True
    """
    key = call_key(backend, (rounds, alpha, schedule, topology, hub, axis, eps), xs, masks)
    plan = _ALIGN_PLANS.get(key)
    if plan is None:
        checked = _check_align(xs, rounds, alpha, schedule, topology, hub, axis, masks, eps)
        plan = _ALIGN_PLANS.remember(key, _plan_align(*checked, schedule, topology, axis, backend))
    elif masks is not None:
        _check_masks_values(xs, masks, plan.keywords["axis"])
    return list(plan(list(xs), masks=_mask_list(masks)))


def _check_masks_values(xs: Sequence[Any], masks: Sequence[Any], axis: int) -> None:
    """The one check of values (:func:`check_mask_values`) on each modality's mask, which a
    planned call of :func:`align` or :func:`zoom_shift_fusion` still runs."""
    xp = array_namespace(xs[0])
    for m, (x, k) in enumerate(zip(xs, masks)):
        check_mask_values(xp, k, axis % x.ndim, f"masks[{m}]")


def _mask_list(masks: Any) -> list[Any] | None:
    """``masks`` as a plan takes them: a list, or None where none masks anything."""
    return None if masks is None or all(k is None for k in masks) else list(masks)


_ALIGN_PLANS = PlanCache()


def _plan_align(
    xs: list[Any], masks: Any, rounds: Any, alpha: float, hub: int, eps: float,
    schedule: str, topology: str, axis: int, backend: str | None,
) -> Any:  # fmt: skip
    """The implementation of :func:`align` for checked arguments, with its options bound."""
    impl = in_native_order(choose("align", backend, like=xs[0], arrays=(xs, masks)), xs)
    options = {"rounds": rounds, "alpha": alpha, "schedule": schedule, "topology": topology, "hub": hub,
               "axis": axis, "eps": eps}  # fmt: skip
    return partial(planned_impl(impl, (xs,), {**options, "masks": masks}), **options)


# --------------------------------------------------------------------------- fusion


def zoom_shift_fusion(
    xs: Sequence[Any],
    *,
    fuse: str | None = "concat",
    pool: str = "max",
    **align_options: Any,
) -> Any:
    r"""Align M token sequences with :func:`align`, pool over tokens, then fuse.

    Parameters
    ----------
    xs : sequence of M >= 2 arrays, shapes (B, T_m, C)
        One token sequence per modality; batch and channel counts must match.
    fuse : {"concat", "sum", "mean", None}, default "concat"
        How to combine the M pooled (B, C) features: concatenation (B, M C), sum or mean
        (B, C); ``None`` returns the list of aligned pooled features.
    pool : {"max", "mean"}, default "max"
        Pooling over the token axis (axis 1); masked tokens are excluded.  ``"mean"`` pools
        what alignment equalises: see Notes.
    **align_options
        Keywords of :func:`align`: ``rounds``, ``alpha``, ``schedule``, ``topology``, ``hub``,
        ``axis``, ``masks``, ``eps``, ``backend``.  ``masks`` (B, T_m) also mask the pooling;
        they are token masks, so they need the default ``axis=-2``.  Masked tokens are
        neither pooled nor returned, so any padding (NaN or inf included) is harmless: on
        autograd namespaces (torch, JAX) they are zeroed before alignment, so gradients stay
        finite too; the values are the same either way.

    Returns
    -------
    array, shape (B, M C) or (B, C); or a list of M (B, C) arrays for ``fuse=None``
        In the inputs' namespace, dtype and device.

    Raises
    ------
    ValueError
        Inputs not 3-dimensional, unknown ``fuse`` or ``pool``, masks with ``axis`` other
        than -2, and everything :func:`align` refuses (Dask masks, traced JAX masks and torch
        masks on the ``meta`` device, fake or seen by a ``torch.func`` transform skip its
        all-masked-sample check: such a sample pools to
        NaN, and max-pools to -inf in the modality whose tokens are all masked).
    TypeError
        An unknown keyword, and everything :func:`align` refuses.

    Notes
    -----
    Fusion after alignment (mmfuse's formalisation of [1]_): once the modalities share one
    per-channel mean and spread, pooled features are comparable and can be combined by simple
    symmetric operators.  Naive definition::

        ys = align(xs, **align_options)
        pooled = [y[b][mask[b]].max(axis=0) for each sample b, for y, mask in zip(ys, masks)]
        out = np.concatenate(pooled, axis=-1)   # or sum(pooled), or sum(pooled) / M

    **Why max pooling by default.**  An aligned modality is
    :math:`y_m = \mu^*_m + \sigma^*_m \odot z_m`, with :math:`z_m` its standardised tokens and
    :math:`(\mu^*_m, \sigma^*_m)` the (B, 1, C) statistics alignment gave it.  Its token mean is
    :math:`\mu^*_m`: the zoom never reaches a mean-pooled feature, and where alignment has made
    the means equal every modality mean-pools to the same vector.  That is the case in the
    limit (``rounds=None``, any ``alpha``), and after one round with ``alpha=1`` for two
    modalities under Gauss-Seidel or for the hub topology.  With the defaults (``alpha=1``,
    one Gauss-Seidel round, consensus) and M = 2, ``pool="mean"`` returns modality 1's token
    mean twice, and modality 0 reaches neither the output nor, in a network, its gradient.
    With ``rounds=None`` it returns M copies of one weighted mean of the modalities' means.
    Max pooling keeps what alignment leaves to each modality, its standardised token
    profile: :math:`\mu^*_m + \sigma^*_m \odot \max_t z_m(t)`.  ``pool="mean"`` stays
    available (it was the default until 2026-12-04), for partial alignment (``alpha < 1``
    with a finite number of rounds, which mixes the means invertibly) or for comparison.

    References
    ----------
    .. [1] J. Qin, "Zoom and Shift are All You Need", arXiv:2406.08866, 2024.
    .. [2] J. Qin et al., "Alternative Telescopic Displacement: An Efficient Multimodal
       Alignment Method", arXiv:2306.16950, 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((4, 10, 8)), rng.standard_normal((4, 6, 8))]
    >>> mmfuse.zoom_shift_fusion(xs).shape
    (4, 16)
    >>> mmfuse.zoom_shift_fusion(xs, fuse="mean", rounds=None, alpha=0.5).shape
    (4, 8)
    """
    masks = align_options.get("masks")
    # the keywords' names, then the options in a fixed order: a call with an unknown keyword
    # (the first such call raises) never meets a plan, even where the known keyword it takes
    # the place of was given as None (``get``'s answer for a missing one too; a review's find)
    options = (fuse, pool, tuple(align_options), *map(align_options.get, _FUSION_OPTIONS))
    key = call_key(align_options.get("backend"), options, xs, masks)
    plan = _FUSION_PLANS.get(key)
    if plan is None:
        checked, plan = _plan_zoom_shift_fusion(xs, fuse, pool, align_options)
        out = plan(*checked)  # (remembered only once it ran: its align plan is made there)
        _FUSION_PLANS.remember(key, plan)
        return out
    if masks is not None:
        _check_masks_values(xs, masks, -2)  # (token masks: the only axis masks are given with)
    return plan(list(xs), _mask_list(masks))


_FUSION_PLANS = PlanCache()
_FUSION_OPTIONS = ("rounds", "alpha", "schedule", "topology", "hub", "axis", "eps")


def _plan_zoom_shift_fusion(
    xs: Any, fuse: Any, pool: Any, align_options: dict[str, Any]
) -> tuple[tuple[list[Any], list[Any] | None], Any]:
    """The checks of :func:`zoom_shift_fusion`, then its plan: ``run(xs, masks)`` for inputs
    of this signature (their mask values checked by the caller), with the checked inputs."""
    check_choice(fuse, "fuse", FUSE_MODES)
    check_choice(pool, "pool", POOL_MODES)
    seq = _as_modalities(xs)
    for m, x in enumerate(seq):
        if x.ndim != 3:
            raise ValueError(
                f"xs[{m}] must be 3-dimensional with shape (B, T_m, C), got shape "
                f"{fmt_shape(x.shape)}"
            )
    _check_align_keywords(align_options)
    bound = _ALIGN_SIGNATURE.bind(seq, **align_options)
    bound.apply_defaults()
    opts = bound.arguments
    masks, axis = opts["masks"], opts["axis"]
    # (a list of Nones masks nothing: no reason to refuse another axis)
    masked = masks is not None and not (isinstance(masks, (list, tuple)) and all(k is None for k in masks))
    if masked and not isinstance(axis, bool) and axis in (-1, 2):
        raise ValueError(
            "zoom_shift_fusion: masks are token masks (B, T_m) and need the default axis=-2; "
            f"got axis={axis}"
        )
    schedule, topology, backend = opts["schedule"], opts["topology"], opts["backend"]
    seq, masks, rounds, alpha, hub, eps = _check_align(
        seq, opts["rounds"], opts["alpha"], schedule, topology, opts["hub"], axis, masks, opts["eps"]
    )
    xp = array_namespace(seq[0])
    # Masked tokens are mapped but never pooled: zeroed, NaN or inf padding cannot reach
    # the gradients through 0 * NaN (values are unchanged: they never enter statistics).
    zero_padding = masks is not None and _has_autograd(xp)
    # float16 / bfloat16: aligned, pooled and fused in float32, rounded once (pooling the
    # aligned sequences rounded to 16 bits cost hundreds of ulps of a small pooled mean)
    widened = low_precision(xp, seq[0].dtype)
    aligner: list[Any] = []  # align's plan, made by the first run (on the work dtype's arrays)

    def align_pool_fuse(seq: list[Any], masks: list[Any] | None) -> Any:
        if not aligner:
            plan = _plan_align(seq, masks, rounds, alpha, hub, eps, schedule, topology, axis, backend)
            aligner.append(plan)
        aligned = list(aligner[0](seq, masks=masks))
        return core.zoom_shift_fusion(aligned, fuse_how=fuse, pool_how=pool, masks=masks)

    def run(seq: list[Any], masks: list[Any] | None) -> Any:
        if zero_padding:
            seq = [mask_tokens(xp, x, k) for x, k in zip(seq, masks)]  # type: ignore[arg-type]
        if widened:
            return in_work_dtype(align_pool_fuse, xp, seq[0].dtype, seq, masks)
        return align_pool_fuse(seq, masks)

    return (seq, masks), run


def _has_autograd(xp: Any) -> bool:
    """Namespaces whose arrays may carry gradients (torch, JAX)."""
    return bool(is_torch(xp) or is_jax(xp))


_ALIGN_SIGNATURE = inspect.signature(align)
_ALIGN_KEYWORDS = tuple(name for name in _ALIGN_SIGNATURE.parameters if name != "xs")


def _check_align_keywords(options: dict[str, Any]) -> None:
    """Every keyword beyond ``fuse`` and ``pool`` is one of :func:`align`'s (a misspelt one
    is named with the accepted ones and the closest, not reported from inside ``inspect``)."""
    for name in options:
        if name not in _ALIGN_KEYWORDS:
            accepted = ("fuse", "pool", *_ALIGN_KEYWORDS)
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"zoom_shift_fusion() got an unexpected keyword argument {name!r} (its keywords: "
                f"{', '.join(accepted)}){hint}"
            )
