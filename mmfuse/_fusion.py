"""Public CP outer-product fusions: Tensor Fusion, Low-rank Multimodal Fusion, CP fusion.

This layer checks arguments (from metadata only), picks the implementation through the backend
registry and calls it.  The maths lives in :mod:`mmfuse._core.fusion` (Array-API core) and
:mod:`mmfuse.reference.fusion` (the NumPy oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ._autocast import autocast_device, without_autocast
from ._core import fusion as core
from ._namespace import array_namespace, from_numpy, is_array, is_dask, not_an_array
from ._plan import PlanCache, call_key, planned_impl
from ._validation import (
    Seed,
    as_sequence,
    check_bool_option,
    check_floating_dtype,
    check_known_sizes,
    check_modalities,
    check_namespace,
    check_ndim,
    check_positive_int,
    check_present,
    check_same_float_dtype,
    check_size_list,
    common_namespace,
    fmt_shape,
    random_generator,
)
from .backends._catalogue import cp_pair
from .backends._registry import choose

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "cp_fusion",
    "cp_to_lowrank",
    "init_lowrank",
    "lowrank_fusion",
    "lowrank_to_tensor",
    "tensor_fusion",
]

#: Default ceiling on the elements of TFN's weight and of each intermediate (2**27, i.e.
#: 512 MiB in float32), in ``tensor_fusion`` (whose batch blocks stay within it) and
#: ``lowrank_to_tensor``, and of each parameter array the initialisers and layers allocate.
#: Raise it per call with ``max_elements=``.
DEFAULT_MAX_ELEMENTS = 2**27


def constant_rows(append_one: bool) -> int:
    return 1 if append_one else 0


#: An array that an initialiser or a layer's constructor is about to allocate: its name, its
#: layout, its shape, and the arguments (with their values) that set its size.
Planned = tuple[str, str, tuple[int, ...], str]


def check_allocations(where: str, planned: Sequence[Planned], max_elements: int) -> None:
    """Refuse (ValueError) the largest of ``planned`` when it has more than ``max_elements``
    elements, before anything is allocated.

    :func:`tensor_fusion`'s rule for its weight, applied to parameters: the allocator's own
    error names no argument ("Unable to allocate 728. TiB"), and a size just within the
    machine's memory would take all of it before anything failed.
    """
    name, layout, shape, culprits = max(planned, key=lambda p: math.prod(p[2]))
    size = math.prod(shape)
    if size > max_elements:
        raise ValueError(
            f"{where}: {name} of shape {layout} = {fmt_shape(shape)} would have {size} elements, "
            f"over max_elements={max_elements}; its size comes from {culprits}: lower them, or "
            "raise max_elements"
        )


def lowrank_planned(
    dims: Sequence[int], rank: int, out_dim: int, append_one: bool, dims_name: str = "dims"
) -> list[Planned]:
    """The arrays of low-rank fusion parameters (:func:`init_lowrank`, ``nn.LowRankFusion``)."""
    extra = constant_rows(append_one)
    planned: list[Planned] = [
        (
            f"factors[{m}]",
            f"(R, {mode_label(m, append_one)}, h)",
            (rank, d + extra, out_dim),
            f"rank={rank}, {dims_name}[{m}]={d}, out_dim={out_dim}",
        )
        for m, d in enumerate(dims)
    ]
    vectors: list[Planned] = [
        ("weights", "(R,)", (rank,), f"rank={rank}"),
        ("bias", "(h,)", (out_dim,), f"out_dim={out_dim}"),
    ]
    return [*planned, *vectors]


def mode_label(m: int, append_one: bool) -> str:
    return f"d_{m} + 1" if append_one else f"d_{m}"


def _constant_hint(rows: Sequence[int], dims: Sequence[int], append_one: bool, unit: str = "rows") -> str:
    """A hint for parameters whose ``rows`` (one per modality) would fit feature sizes ``dims``
    under the other ``append_one``: the commonest mistake with the constant's row."""
    rows, dims = tuple(int(r) for r in rows), tuple(int(d) for d in dims)
    if append_one and rows == dims:
        return (
            f"; it has d_m {unit}, without the constant's row: parameters without it take "
            "append_one=False"
        )
    if not append_one and rows == tuple(d + 1 for d in dims):
        return f"; it has d_m + 1 {unit}, as with the constant's row: pass append_one=True (the default)"
    return ""


def check_vector(xp: Any, v: Any, name: str, length: int, label: str) -> None:
    if v is None:
        return
    if not is_array(v):
        raise not_an_array(name, v)
    if tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({label},) = ({length},), got {fmt_shape(v.shape)}")


def named_arrays(prefix: str, arrays: Sequence[Any]) -> list[tuple[str, Any]]:
    return [(f"{prefix}[{m}]", a) for m, a in enumerate(arrays)]


# --------------------------------------------------------------------------- tensor fusion


def check_tensor_fusion(
    xs: Any, weight: Any, bias: Any, append_one: bool, max_elements: int,
    where: str = "tensor_fusion", instead: str = "lowrank_fusion",
) -> list[Any]:  # fmt: skip
    """The checks of a full weight's fusion (:func:`tensor_fusion`, and ``where``'s: the
    interaction terms', whose size messages name ``where`` and its low-rank ``instead``)."""
    xs, _ = check_modalities(xs)
    if not is_array(weight):
        raise not_an_array("weight", weight)
    named = [*named_arrays("xs", xs), ("weight", weight), ("bias", bias)]
    xp = common_namespace(named)
    check_same_float_dtype(xp, named)
    n = len(xs)
    extra = constant_rows(append_one)
    expected = tuple(x.shape[1] + extra for x in xs)
    # d_m numbered as the inputs, from 0 (xs[0] has d_0), as the other fusions' messages
    layout = "(" + ", ".join(mode_label(m, append_one) for m in range(n)) + ", h)"
    if weight.ndim != n + 1 or tuple(weight.shape[:-1]) != expected:
        hint = ""
        if weight.ndim == n + 1:
            dims = [x.shape[1] for x in xs]
            hint = _constant_hint(weight.shape[:-1], dims, append_one, "entries per input mode")
        raise ValueError(
            f"weight must have shape {layout} = {fmt_shape((*expected, 'h'))} for {n} "
            f"modalities with feature sizes {[x.shape[1] for x in xs]}, "
            f"got {fmt_shape(weight.shape)}{hint}"
        )
    out_dim = weight.shape[-1]
    check_vector(xp, bias, "bias", out_dim, "h")
    w_size = int(np.prod(weight.shape))
    if w_size > max_elements:
        raise ValueError(
            f"{where}: weight of shape {fmt_shape(weight.shape)} has {w_size} elements, "
            f"over max_elements={max_elements}; use {instead}, or raise max_elements"
        )
    check_intermediates(where, xp, xs[0], expected, out_dim, max_elements, instead)
    return xs


def check_intermediates(
    where: str, xp: Any, x: Any, dims: tuple[int, ...], out_dim: int, max_elements: int, instead: str
) -> None:
    """Refuse (ValueError) a tensor fusion of inputs like ``x`` whose batch block would leave an
    intermediate over ``max_elements``.

    The core contracts the batch in blocks of :func:`mmfuse._core.fusion.tensor_fusion_rows`
    samples, so ``max_elements`` bounds each block's intermediates and a large batch is no
    reason to refuse (autograd keeps every block's for the backward); only
    one sample's intermediate can be too large (never, once the weight itself fits).  JAX
    arrays are contracted as one block, so there the whole batch's intermediate counts; Dask
    arrays one batch chunk at a time (its products are blockwise over the batch), so there
    the largest chunk's (of ``x``: the chunks the inputs share are no larger).
    The one rule of :func:`tensor_fusion` and of ``nn.TensorFusion``'s compiled path (whose
    batch is symbolic: a per-sample message never formats it).
    """
    one_block = core.tensor_fusion_rows(xp, x, dims, out_dim, max_elements) is None
    rows = x.shape[0] if one_block else 1
    per_chunk = one_block and is_dask(xp)
    if per_chunk:
        sizes = x.chunks[0]
        rows = None if any(math.isnan(n) for n in sizes) else max(sizes, default=0)
    if rows is None:  # a lazy batch of unknown size: its scheduler bounds memory
        return
    for m, size in enumerate(core.intermediate_sizes(rows, dims, out_dim), start=1):
        if not size > max_elements:  # (a NaN size would pass; the boundary refuses those first)
            continue
        if per_chunk:
            raise ValueError(
                f"{where}: contracting modality {m - 1} leaves an intermediate of shape "
                f"{fmt_shape((rows, *dims[m:], out_dim))} with {size} elements per batch chunk "
                f"of {rows} rows, over max_elements={max_elements} (Dask arrays are contracted "
                f"one batch chunk at a time); rechunk the batch smaller, use {instead}, or raise "
                "max_elements"
            )
        if one_block:
            raise ValueError(
                f"{where}: contracting modality {m - 1} leaves an intermediate of shape "
                f"{fmt_shape((rows, *dims[m:], out_dim))} with {size} elements, over "
                f"max_elements={max_elements} (JAX arrays are contracted as one block); "
                f"fuse a smaller batch, use {instead}, or raise max_elements"
            )
        raise ValueError(
            f"{where}: contracting modality {m - 1} leaves an intermediate of shape "
            f"{fmt_shape((*dims[m:], out_dim))} per sample, {size} elements, over "
            f"max_elements={max_elements} even in batch blocks of one sample; use {instead}, "
            "or raise max_elements"
        )


def tensor_fusion(
    xs: Sequence[Any],
    weight: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    backend: str | None = None,
) -> Any:
    r"""Tensor Fusion (TFN): a linear map of the outer product of the modalities.

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
        One array per modality, sharing the batch size B.  Real floating dtype, all the same.
    weight : array, shape (d_1 + 1, ..., d_M + 1, h)
        The fusion weight tensor W (no ``+ 1`` when ``append_one=False``).
    bias : array, shape (h,), optional
        Added to the output.
    append_one : bool, default True
        Append a constant 1 to each modality (last), so that W also holds every lower-order
        interaction, down to the unimodal terms and a constant.
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        Refuse (ValueError) a weight with more elements than this (TFN is exponential in M).
        It also bounds the intermediates: the batch is contracted in blocks whose
        intermediates hold at most this many elements, so a large batch is never refused for
        its size (JAX arrays, contracted as one block, are refused where the whole batch's
        would not fit, Dask arrays, contracted chunk by chunk, where their largest batch
        chunk's would not).  Not the memory of a torch call that autograd records (each
        block's intermediates are kept for the backward) or of one that ``torch.compile``
        traces (one block: the whole batch's).
    backend : str, optional
        Implementation to run (see :func:`mmfuse.set_config`); default: the configured one.

    Returns
    -------
    array, shape (B, h)
        In the inputs' namespace, dtype and device.

    Raises
    ------
    ValueError
        Wrong shapes (the message names the argument and modality) or a size over
        ``max_elements``.
        Also a ``max_elements`` that is not a positive integer.
    TypeError
        Non-floating or mixed dtypes, arrays from different namespaces, a NumPy masked
        array or matrix, or an ``append_one`` that is not a bool.

    Notes
    -----
    With :math:`\hat x_m = [x_m; 1]`, TFN [1]_ forms the order-M tensor
    :math:`Z = \hat x_1 \otimes \cdots \otimes \hat x_M` and returns
    :math:`h = W \cdot Z + b`, contracting all M input modes of W with Z:

    .. math:: h_k = \sum_{i_1, \ldots, i_M} W_{i_1 \ldots i_M k}
              \prod_m (\hat x_m)_{i_m} + b_k .

    The naive definition, per sample::

        z = 1
        for x in xs:
            z = np.multiply.outer(z, np.append(x[b], 1))
        h[b] = np.tensordot(z, W, axes=M) + bias

    This implementation contracts W with one modality at a time (one GEMM, then M - 1
    batched matrix-vector products), so the largest intermediate is ``(rows, D_2 ... D_M h)``
    for a batch block of ``rows <= max_elements / (D_2 ... D_M h)`` samples; where
    ``D_1 <= h`` Z itself, ``(rows, D_1 ... D_M)``, is no larger, and it builds Z and
    contracts it in one GEMM instead (on NumPy only for blocks of at least 2**20 elements,
    where that was measured faster).

    References
    ----------
    .. [1] A. Zadeh, M. Chen, S. Poria, E. Cambria, L.-P. Morency, "Tensor Fusion Network for
       Multimodal Sentiment Analysis", EMNLP 2017.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
    >>> weight = rng.standard_normal((3 + 1, 2 + 1, 5))
    >>> mmfuse.tensor_fusion(xs, weight).shape
    (4, 5)
    """
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, tensor_fusion, xs, weight, bias, append_one=append_one, max_elements=max_elements,
            backend=backend,
        )  # fmt: skip
    key = call_key(backend, (append_one, max_elements), xs, weight, bias)
    plan = _TENSOR_PLANS.plan(key, plan_tensor, xs, weight, bias, append_one, max_elements, backend)
    return plan(xs, weight, bias)


_TENSOR_PLANS = PlanCache()


def plan_tensor(
    xs: Any, weight: Any, bias: Any, append_one: Any, max_elements: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`tensor_fusion` call and choose its implementation (its plan)."""
    append_one = check_bool_option("append_one", append_one)
    max_elements = check_positive_int("max_elements", max_elements)
    xs = check_tensor_fusion(xs, weight, bias, append_one, max_elements)
    impl = choose("tensor_fusion", backend, like=xs[0], arrays=(xs, weight, bias))
    return partial(impl, append_one=append_one, max_elements=max_elements)


# --------------------------------------------------------------------------- low-rank fusion


def check_lowrank_factors(factors: Any, dims: Sequence[int] | None, append_one: bool) -> tuple[int, int]:
    """Check (R, D_m, h) factors (against feature sizes ``dims`` when given); return (R, h)."""
    n = len(dims) if dims is not None else None
    factors = as_sequence(factors, "factors", what="modality")
    if n is not None and len(factors) != n:
        raise ValueError(
            f"factors must have one entry per modality: got {len(factors)} factors for "
            f"{n} modalities"
        )
    for m, f in enumerate(factors):
        if not is_array(f):
            raise not_an_array(f"factors[{m}]", f)
        check_ndim(f, 3, f"factors[{m}]", f"(R, {mode_label(m, append_one)}, h)")
    rank, _, out_dim = factors[0].shape
    for m, f in enumerate(factors):
        if dims is not None and f.shape[1] != dims[m] + constant_rows(append_one):
            raise ValueError(
                f"factors[{m}] has shape {fmt_shape(f.shape)}; expected "
                f"(R, {mode_label(m, append_one)}, h) = (R, {dims[m] + constant_rows(append_one)}, h) "
                f"for xs[{m}] with d_{m} = {dims[m]}{_constant_hint([f.shape[1]], [dims[m]], append_one)}"
            )
        if f.shape[0] != rank:
            raise ValueError(
                f"factors[{m}] has rank {f.shape[0]} (shape {fmt_shape(f.shape)}) but factors[0] "
                f"has rank {rank} (shape {fmt_shape(factors[0].shape)}); all ranks must match"
            )
        if f.shape[2] != out_dim:
            raise ValueError(
                f"factors[{m}] has output size {f.shape[2]} (shape {fmt_shape(f.shape)}) but "
                f"factors[0] has {out_dim} (shape {fmt_shape(factors[0].shape)})"
            )
    return rank, out_dim


def lowrank_fusion(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Low-rank Multimodal Fusion (LMF, Eq. 8 of Liu et al. 2018).

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
        One array per modality, sharing the batch size B.
    factors : sequence of M arrays, shapes (R, d_m + 1, h)
        The modality-specific factors (no ``+ 1`` when ``append_one=False``).
    weights : array, shape (R,), optional
        Rank weights :math:`w_r`; default ones.
    bias : array, shape (h,), optional
        Added to the output.
    append_one : bool, default True
        Append the constant 1 to each modality, last (the papers' convention; LMF's released
        code prepends it, see :meth:`mmfuse.nn.LowRankFusion.from_lmf`).
    present : bool array, shape (B, M), optional
        Missing-modality rule: where ``present[b, m]`` is False, modality m of sample b
        contributes only its constant row, exactly as if its features were zero (NaNs there
        are ignored).  With ``append_one=False`` an absent modality zeroes the product.
    backend : str, optional
        Implementation to run; default: the configured one.

    Returns
    -------
    array, shape (B, h)

    Raises
    ------
    ValueError
        Wrong number of factors, factor rows not d_m + 1, differing ranks or output sizes,
        ``weights`` not of shape (R,) or ``bias`` not (h,), differing batch sizes, bad
        ``present`` shape, no modality.
    TypeError
        Non-floating or mixed dtypes, non-boolean ``present``, mixed namespaces, a NumPy
        masked array or matrix (give missing modalities through ``present``), or an
        ``append_one`` that is not a bool.

    Notes
    -----
    LMF [1]_ factorises the TFN weight as
    :math:`W = \sum_r w_r \bigotimes_m W_m^{(r)}` with the output mode shared (the paper's
    Eq. 4-5 without the rank weights :math:`w_r`, which come from its released code), so the
    fusion is (its Eq. 8, with the weights)

    .. math:: h = \sum_{r=1}^{R} w_r \prod_{m=1}^{M} \left(\hat x_m^\top W_m^{(r)}\right) + b,

    where the product is elementwise over the h outputs.  (The paper's Eq. 6, with the rank
    sum inside the product, is an acknowledged erratum.)  It equals
    ``tensor_fusion(xs, lowrank_to_tensor(factors, weights), bias)``.  Naive form::

        for b, r:
            term = w[r] * ones(h)
            for m: term *= np.append(xs[m][b], 1) @ factors[m][r]
            h[b] += term

    Here every modality's R projections come from a single GEMM with the factor laid out as
    a (d_m + 1, R h) matrix, and the batch is processed in cache-sized blocks.

    References
    ----------
    .. [1] Z. Liu, Y. Shen, V. B. Lakshminarasimhan, P. P. Liang, A. Zadeh, L.-P. Morency,
       "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors", ACL 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((8, 32)), rng.standard_normal((8, 16))]
    >>> params = mmfuse.init_lowrank([32, 16], rank=4, out_dim=10, seed=0)
    >>> mmfuse.lowrank_fusion(xs, **params).shape
    (8, 10)
    >>> full = mmfuse.lowrank_to_tensor(params["factors"], params["weights"])
    >>> bool(np.allclose(mmfuse.lowrank_fusion(xs, **params), mmfuse.tensor_fusion(xs, full)))
    True
    """
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, lowrank_fusion, xs, factors, weights, bias, append_one=append_one, present=present,
            backend=backend,
        )  # fmt: skip
    key = call_key(backend, (append_one,), xs, factors, weights, bias, present)
    plan = _LOWRANK_PLANS.plan(key, plan_lowrank, xs, factors, weights, bias, append_one, present, backend)
    return plan(xs, factors, weights, bias, present=present)


_LOWRANK_PLANS = PlanCache()


def plan_lowrank(
    xs: Any, factors: Any, weights: Any, bias: Any, append_one: Any, present: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`lowrank_fusion` call and choose its implementation (its plan)."""
    append_one = check_bool_option("append_one", append_one)
    xs, batch = check_modalities(xs)
    factors = list(factors) if isinstance(factors, (list, tuple)) else factors
    rank, out_dim = check_lowrank_factors(factors, [x.shape[1] for x in xs], append_one)
    named = [*named_arrays("xs", xs), *named_arrays("factors", factors), ("weights", weights), ("bias", bias)]
    xp = common_namespace([*named, ("present", present)])
    check_same_float_dtype(xp, named)
    check_vector(xp, weights, "weights", rank, "R")
    check_vector(xp, bias, "bias", out_dim, "h")
    if present is not None:
        check_present(xp, present, batch, len(xs))
    impl = choose("lowrank_fusion", backend, like=xs[0], arrays=(xs, factors, weights, bias, present))
    chosen = planned_impl(impl, (xs, factors, weights, bias), {"append_one": append_one, "present": present})
    return partial(chosen, append_one=append_one)


# --------------------------------------------------------------------------- CP fusion


def as_cp(cp: Any, rows: Sequence[int] | None = None) -> tuple[Any, list[Any]]:
    """Normalise a ``tensorly.cp_tensor.CPTensor`` or a ``(weights, factors)`` pair.  ``rows``:
    the modality factors' expected row counts (``d_m + 1``, or ``d_m`` without the constant),
    where the caller knows them: a rank mismatch's hint then calls a factor transposed only
    where its transpose fits its modality."""
    if hasattr(cp, "weights") and hasattr(cp, "factors"):  # CPTensor, without importing TensorLy
        weights, factors = cp.weights, cp.factors
    elif isinstance(cp, (list, tuple)) and len(cp) == 2:
        weights, factors = cp
        listed = isinstance(weights, (list, tuple)) and any(is_array(w) for w in weights)
        alone = is_array(weights) and is_array(factors) and weights.ndim == factors.ndim == 2
        if listed or alone:
            # (factors, weights) swapped, or a two-factor list alone (one modality): as_sequence
            # below had said "cp factors must be a list or tuple", of what was given one
            raise TypeError(
                f"cp must be a (weights, factors) pair, but its first item is a "
                f"{'list or tuple of arrays' if listed else '2-D array'}, where the "
                "weights (a vector of R entries, or None) belong: pass (weights, factors), e.g. "
                "(None, factors), not the factors first or alone"
            )
    else:
        raise TypeError(
            "cp must be a tensorly CPTensor or a (weights, factors) pair, "
            f"got {type(cp).__name__}"
        )
    factors = as_sequence(factors, "cp factors", min_len=2, what="factor")
    for i, f in enumerate(factors):
        if not is_array(f):
            raise not_an_array(f"cp factor {i}", f)
        check_ndim(f, 2, f"cp factor {i}", "(rows, R)")
    rank = factors[0].shape[1]
    for i, f in enumerate(factors):
        if f.shape[1] != rank:
            raise ValueError(
                f"cp factor {i} has rank {f.shape[1]} (shape {fmt_shape(f.shape)}) but cp factor "
                f"0 has rank {rank} (shape {fmt_shape(factors[0].shape)}){_transposed_hint(factors, i, rows)}"
            )
    if weights is not None:
        if not is_array(weights):
            raise TypeError(f"cp weights must be an array or None, got {type(weights).__name__}")
        check_known_sizes([("cp weights", weights)])
        if tuple(weights.shape) != (rank,):
            raise ValueError(f"cp weights must have shape (R,) = ({rank},), got {fmt_shape(weights.shape)}")
    return weights, factors


_CP_LAYOUT = (
    "cp factors are laid out (rows, R), TensorLy's layout: (d_m + 1, R) for modality m "
    "(d_m with append_one=False), then (h, R) for the output"
)


def _transposed_hint(factors: Sequence[Any], i: int, rows: Sequence[int] | None = None) -> str:
    """The expected layout, and which factor looks transposed, for factor ``i`` whose rank
    (columns) differs from factor 0's.  With the modality factors' expected ``rows`` (as
    many as the modality factors), a modality factor is called transposed only where its
    column count is its expected row count: one with the right rows but a column short had
    been told it "looks transposed", and its transpose was then refused for its rows (a
    review's find).  Without them (no inputs to read d_m from), a guess from the shapes."""
    known = rows is not None and len(rows) == len(factors) - 1

    def turned(k: int) -> bool:  # factor k's transpose fits its rows (the output's: unknown)
        return not known or k >= len(factors) - 1 or factors[k].shape[1] == rows[k]  # type: ignore[index]

    f, first = factors[i], factors[0]
    if f.shape[0] == first.shape[1] and turned(i):
        return (
            f"; cp factor {i} looks transposed (its transpose, of shape {fmt_shape(f.shape[::-1])}, "
            f"has rank {first.shape[1]}); {_CP_LAYOUT}"
        )
    if first.shape[0] == f.shape[1] and turned(0):
        return (
            f"; cp factor 0 looks transposed (its transpose, of shape "
            f"{fmt_shape(first.shape[::-1])}, has rank {f.shape[1]}); {_CP_LAYOUT}"
        )
    if f.shape[0] == first.shape[0] and all(turned(k) for k in range(len(factors))):
        return (
            f"; the factors look transposed (they share their row count, {f.shape[0]}, where "
            f"the rank belongs); {_CP_LAYOUT}"
        )
    return f"; {_CP_LAYOUT}"


def check_cp_inputs(
    xs: Any, cp: Any, append_one: bool, present: Any, bias: Any = None
) -> tuple[list[Any], Any, list[Any]]:
    """The checks of a CP fusion's arguments (:func:`cp_fusion`, and
    :func:`mmfuse.cp_interactions` without a bias); returns ``(xs, weights, factors)``."""
    xs, batch = check_modalities(xs)
    extra = constant_rows(append_one)
    weights, factors = as_cp(cp, [x.shape[1] + extra for x in xs])
    n = len(xs)
    if len(factors) != n + 1:
        raise ValueError(
            f"cp has {len(factors)} factors; expected M + 1 = {n + 1} (one per modality, then "
            f"the output factor) for {n} modalities"
        )
    # every factor transposed: each transpose fits its modality, all with one rank.  Only
    # then: the factors share their column count R here (as_cp), so one transposed factor's
    # transpose has another rank than the others (the hint had said it "would fit", and the
    # next call's rank check said to transpose it back; a review's find)
    transposed = all(a.shape[1] == x.shape[1] + extra for x, a in zip(xs, factors)) and (
        len({a.shape[0] for a in factors}) == 1
    )
    for m, (x, a) in enumerate(zip(xs, factors)):
        if a.shape[0] != x.shape[1] + extra:
            hint = _constant_hint([a.shape[0]], [x.shape[1]], append_one)
            if not hint and transposed:
                hint = (
                    f"; it looks transposed (its transpose, of shape {fmt_shape(a.shape[::-1])}, "
                    f"would fit, as would the other factors'); {_CP_LAYOUT}"
                )
            raise ValueError(
                f"cp factor {m} has shape {fmt_shape(a.shape)}; expected "
                f"({mode_label(m, append_one)}, R) = ({x.shape[1] + extra}, R) for xs[{m}] "
                f"of shape {fmt_shape(x.shape)}{hint}"
            )
    named = [*named_arrays("xs", xs), *named_arrays("cp factors", factors), ("cp weights", weights)]
    xp = common_namespace([*named, ("bias", bias), ("present", present)])
    check_same_float_dtype(xp, [*named, ("bias", bias)])
    check_vector(xp, bias, "bias", factors[-1].shape[0], "h")
    if present is not None:
        check_present(xp, present, batch, n)
    return xs, weights, factors


def cp_fusion(
    xs: Sequence[Any],
    cp: Any,
    bias: Any = None,
    *,
    append_one: bool = True,
    present: Any = None,
    backend: str | None = None,
) -> Any:
    r"""TFN whose weight tensor is given as a CP decomposition in TensorLy's layout.

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
    cp : tensorly CPTensor or (weights, factors)
        ``weights`` (R,) or None (ones); ``factors`` = ``[A_1 (d_1 + 1, R), ..., A_M
        (d_M + 1, R), C (h, R)]``, the M + 1 modes of W, exactly what
        ``tensorly.decomposition.parafac`` returns for a TFN weight.  TensorLy itself is not
        needed.
    bias : array, shape (h,), optional
    append_one : bool, default True
    present : bool array, shape (B, M), optional
        Missing-modality rule, as in :func:`lowrank_fusion`.
    backend : str, optional

    Returns
    -------
    array, shape (B, h)

    Raises
    ------
    ValueError
        Wrong number of factors (must be M + 1), factor rows not d_m + 1, differing ranks.
    TypeError
        ``cp`` of the wrong type, non-floating or mixed dtypes, mixed namespaces, a NumPy
        masked array or matrix, or an ``append_one`` that is not a bool.

    Notes
    -----
    With :math:`W = \sum_r w_r\, a_{1r} \otimes \cdots \otimes a_{Mr} \otimes c_r`,

    .. math:: h = C \left(w \odot \prod_m A_m^\top \hat x_m\right) + b .

    Naive form: ``tensor_fusion(xs, tensorly.cp_to_tensor(cp), bias)``.  Convert to LMF's
    layout with :func:`cp_to_lowrank`.

    References
    ----------
    .. [1] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review
       51(3), 2009 (the CP decomposition of the weight).
    .. [2] A. Zadeh, M. Chen, S. Poria, E. Cambria, L.-P. Morency, "Tensor Fusion Network for
       Multimodal Sentiment Analysis", EMNLP 2017 (the fused tensor it factorises).

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
    >>> cp = (np.ones(6), [rng.standard_normal((4, 6)), rng.standard_normal((3, 6)),
    ...                    rng.standard_normal((5, 6))])
    >>> y = mmfuse.cp_fusion(xs, cp)
    >>> bool(np.allclose(y, mmfuse.lowrank_fusion(xs, *mmfuse.cp_to_lowrank(cp))))
    True
    """
    pair = cp_pair(cp)
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, cp_fusion, xs, pair if pair is not None else cp, bias, append_one=append_one,
            present=present, backend=backend,
        )  # fmt: skip
    key = call_key(backend, (append_one,), xs, pair, bias, present) if pair is not None else None
    plan = _CP_PLANS.plan(key, plan_cp, xs, cp, bias, append_one, present, backend)
    return plan(xs, pair if pair is not None else as_cp(cp), bias, present=present)


_CP_PLANS = PlanCache()


def plan_cp(xs: Any, cp: Any, bias: Any, append_one: Any, present: Any, backend: Any) -> Callable[..., Any]:
    """Check a :func:`cp_fusion` call and choose its implementation (its plan)."""
    append_one = check_bool_option("append_one", append_one)
    xs, weights, factors = check_cp_inputs(xs, cp, append_one, present, bias)
    impl = choose("cp_fusion", backend, like=xs[0], arrays=(xs, factors, weights, bias, present))
    return partial(impl, append_one=append_one)


# --------------------------------------------------------------------------- converters


def lowrank_to_tensor(
    factors: Sequence[Any], weights: Any = None, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Any:
    r"""The full TFN weight of a low-rank (LMF-layout) fusion.

    Parameters
    ----------
    factors : sequence of M arrays, shapes (R, D_m, h)
    weights : array, shape (R,), optional
        Default ones.
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        Refuse (ValueError) a full weight, or the (R, D_1 ... D_{M-1}, h) intermediate it is
        built from (the rank terms over all modalities but the last; one factor with weights:
        (R, D_1, h)), with more elements than this, as :func:`tensor_fusion` does: the full
        weight is exponential in M.

    Returns
    -------
    array, shape (D_1, ..., D_M, h)
        In the factors' namespace, dtype and device.

    Raises
    ------
    ValueError
        Differing ranks or output sizes (the message names the factor), a wrong ``weights``
        shape, a size over ``max_elements``, or a ``max_elements`` that is not a positive
        integer.
    TypeError
        Non-array factors, non-floating or mixed dtypes, mixed namespaces, or a NumPy
        masked array or matrix.

    Notes
    -----
    :math:`W_{i_1 \ldots i_M k} = \sum_r w_r \prod_m F_m[r, i_m, k]`: an outer product over the
    input modes, with the output mode shared (not a CP decomposition of the output mode).
    ``lowrank_fusion`` computes the same map without ever building W.

    Examples
    --------
    >>> import mmfuse
    >>> p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=4, seed=1)
    >>> mmfuse.lowrank_to_tensor(p["factors"], p["weights"]).shape
    (4, 3, 4)
    """
    max_elements = check_positive_int("max_elements", max_elements)
    factors = as_sequence(factors, "factors")
    rank, out_dim = check_lowrank_factors(factors, None, True)
    named = [*named_arrays("factors", factors), ("weights", weights)]
    xp = common_namespace(named)
    check_same_float_dtype(xp, named)
    check_vector(xp, weights, "weights", rank, "R")
    dims = tuple(int(f.shape[1]) for f in factors)
    shape = (*dims, out_dim)
    size = math.prod(shape)
    if size > max_elements:
        raise ValueError(
            f"lowrank_to_tensor: the full weight of shape {fmt_shape(shape)} has {size} elements, "
            f"over max_elements={max_elements}; use lowrank_fusion (it never builds the full "
            "weight), or raise max_elements"
        )
    # the core's rank terms over all modalities but the last (one weighted factor too: its
    # product with the weights; a review's find)
    held = core.lowrank_intermediate(rank, dims, out_dim, weights is not None)
    if held is not None and math.prod(held) > max_elements:
        raise ValueError(
            f"lowrank_to_tensor: building the full weight of shape {fmt_shape(shape)} from rank "
            f"{rank} factors holds an intermediate of shape {fmt_shape(held)} with "
            f"{math.prod(held)} elements, over max_elements={max_elements}; use lowrank_fusion "
            "(it never builds the full weight), or raise max_elements"
        )
    return core.lowrank_to_tensor(factors, weights)


def cp_to_lowrank(cp: Any) -> tuple[list[Any], Any]:
    r"""Convert a CP decomposition (TensorLy layout) to LMF's layout, exactly.

    Parameters
    ----------
    cp : tensorly CPTensor or (weights, factors)
        Factors ``[A_1 (D_1, R), ..., A_M (D_M, R), C (h, R)]``.

    Returns
    -------
    factors : list of M arrays, shapes (R, D_m, h)
    weights : array, shape (R,)

    Raises
    ------
    ValueError
        Fewer than 2 factors, factors of differing ranks, or weights of a shape other than
        (R,).
    TypeError
        ``cp`` neither a CPTensor nor a (weights, factors) pair, factors not a list or tuple
        of arrays, or non-floating factors.

    Notes
    -----
    :math:`F_1[r] = a_{1r} c_r^\top` carries the output factor and
    :math:`F_m[r] = a_{mr} \mathbf{1}^\top` for m > 1, so
    ``lowrank_fusion(xs, *cp_to_lowrank(cp)) == cp_fusion(xs, cp)``.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> cp = (np.ones(2), [np.eye(3, 2), np.eye(4, 2), np.eye(5, 2)])
    >>> factors, weights = mmfuse.cp_to_lowrank(cp)
    >>> [f.shape for f in factors], weights.shape
    ([(2, 3, 5), (2, 4, 5)], (2,))
    """
    weights, factors = as_cp(cp)
    named = [*named_arrays("cp factors", factors), ("cp weights", weights)]
    xp = common_namespace(named)
    check_same_float_dtype(xp, named)
    return core.cp_to_lowrank((weights, factors))


def init_lowrank(
    dims: Sequence[int],
    *,
    rank: int,
    out_dim: int,
    append_one: bool = True,
    seed: Seed = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Any]:
    r"""Random low-rank fusion parameters, ready for ``lowrank_fusion(xs, **params)``.

    Parameters
    ----------
    dims : sequence of int
        Feature sizes d_m of the M modalities.
    rank, out_dim : int
        R and h.
    append_one : bool, default True
        Whether factors get the constant's row (d_m + 1 rows).
    seed : None, int, sequence of int, SeedSequence, BitGenerator or Generator, optional
        Source of randomness: ``numpy.random.default_rng(seed)``, so anything it takes (a
        ``SeedSequence``, a bit generator) works too; None draws fresh entropy.  The draw is
        the same in every namespace.
    xp : namespace, optional
        Namespace of the returned arrays (default NumPy), e.g. ``torch`` or ``array_api_strict``.
    dtype, device : optional
        Of the returned arrays (default: the namespace's default floating dtype).
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        Refuse (ValueError) parameters with an array of more elements than this, before
        anything is allocated, as :func:`tensor_fusion` refuses its weight.

    Returns
    -------
    dict
        ``{"factors": [M arrays (R, D_m, h)], "weights": (R,), "bias": (h,)}``.

    Raises
    ------
    ValueError
        ``dims`` empty, or a size (``dims[m]``, ``rank``, ``out_dim``, ``max_elements``) that
        is not a positive integer (floats such as 2.7, strings and bools included), a
        factor over ``max_elements`` (the message names the sizes that make it big), or a
        negative ``seed``.
    TypeError
        ``dims`` not a sequence, ``append_one`` not a bool, ``dtype`` not a real floating
        dtype, or a ``seed`` that is not something ``numpy.random.default_rng`` takes (None,
        an int, a sequence of ints, a ``SeedSequence``, a bit generator or a ``Generator``)
        or is a bool.

    Notes
    -----
    Factors are drawn :math:`\mathcal N(0, 1 / D_m)` so each projection
    :math:`\hat x_m^\top W_m^{(r)}` has about unit variance for standardised inputs;
    weights are :math:`1/R` (the rank terms' mean), so the rank sum stays bounded as R
    grows: its variance is about :math:`1/R`, since the rank terms are independent with
    mean 0 (an output standard deviation of :math:`1/\sqrt R`, where
    :class:`mmfuse.nn.CPFusion`'s initialisation gives about 1); the bias is zero.

    Examples
    --------
    >>> import mmfuse
    >>> p = mmfuse.init_lowrank([5, 7], rank=3, out_dim=2, seed=0)
    >>> [f.shape for f in p["factors"]], p["weights"].shape, p["bias"].shape
    ([(3, 6, 2), (3, 8, 2)], (3,), (2,))
    """
    dims = check_size_list("dims", dims)
    if not dims:
        raise ValueError("dims must hold at least 1 modality, got 0")
    rank = check_positive_int("rank", rank)
    out_dim = check_positive_int("out_dim", out_dim)
    append_one = check_bool_option("append_one", append_one)
    max_elements = check_positive_int("max_elements", max_elements)
    check_allocations("init_lowrank", lowrank_planned(dims, rank, out_dim, append_one), max_elements)
    space = array_namespace(np.empty(0)) if xp is None else check_namespace(xp)
    dtype = check_floating_dtype(space, dtype, device)  # default: float32 for torch
    weights = from_numpy(np.full(rank, 1.0 / rank), space, dtype=dtype, device=device)
    rng = random_generator(seed)
    extra = constant_rows(append_one)
    factors = [rng.standard_normal((rank, d + extra, out_dim)) / np.sqrt(d + extra) for d in dims]
    return {
        "factors": [from_numpy(f, space, dtype=dtype, device=device) for f in factors],
        "weights": weights,
        "bias": from_numpy(np.zeros(out_dim), space, dtype=dtype, device=device),
    }
