"""Public exact interaction terms of the outer-product fusions (TFN, LMF, CP) and their shares.

With the constant appended, a fused output minus its bias is exactly the sum of one term per
subset of the modalities (the constant, each unimodal term, each pair, ..., the M-way term).
This layer checks arguments from metadata only (reusing the fusions' own checks from
:mod:`mmfuse._fusion`) and picks the implementation through the backend registry, once per
call signature (:mod:`mmfuse._plan`), then calls it.
The maths lives in :mod:`mmfuse._core.interactions` (Array-API core) and
:mod:`mmfuse.reference.interactions` (the NumPy oracle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ._autocast import autocast_device, without_autocast
from ._core import interactions as core
from ._fusion import (
    DEFAULT_MAX_ELEMENTS,
    as_cp,
    check_cp_inputs,
    check_lowrank_factors,
    check_tensor_fusion,
    check_vector,
    named_arrays,
)
from ._namespace import is_array, not_an_array
from ._plan import PlanCache, call_key
from ._validation import (
    check_bool_option,
    check_float,
    check_modalities,
    check_ndim,
    check_positive_int,
    check_present,
    check_same_float_dtype,
    common_namespace,
    fmt_shape,
)
from .backends._catalogue import CALL_SIZES, cp_pair
from .backends._registry import choose

__all__ = ["cp_interactions", "interaction_shares", "lowrank_interactions", "tensor_interactions"]

_BY = ("order", "subset")
_KINDS = ("variance", "norm")


def _check_by(by: Any) -> str:
    if not isinstance(by, str) or by not in _BY:
        raise ValueError(f"by must be 'order' or 'subset', got {by!r}")
    return by


def _check_subset_size(func: str, n: int, batch: int, out_dim: int, max_elements: int) -> None:
    """``by="subset"`` returns 2^M terms of (B, h): refuse more than ``max_elements``."""
    size = 2**n * batch * out_dim
    if size > max_elements:
        raise ValueError(
            f"{func}: by='subset' returns 2**M = {2**n} terms of shape (B, h) = "
            f"{fmt_shape((batch, out_dim))} for M = {n} modalities, {size} elements, over "
            f"max_elements={max_elements}; use by='order' (M + 1 = {n + 1} terms), fuse a "
            "smaller batch, or raise max_elements"
        )


def _options(by: Any, append_one: Any, max_elements: Any) -> tuple[str, bool, int]:
    return (
        _check_by(by),
        check_bool_option("append_one", append_one),
        check_positive_int("max_elements", max_elements),
    )


# --------------------------------------------------------------------------- TFN


def tensor_interactions(
    xs: Sequence[Any],
    weight: Any,
    *,
    by: str = "order",
    append_one: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    backend: str | None = None,
) -> tuple[Any, list[Any]]:
    r"""The exact interaction terms of a Tensor Fusion (TFN): by order or by modality subset.

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
        One array per modality, sharing the batch size B.  Real floating dtype, all the same.
    weight : array, shape (d_1 + 1, ..., d_M + 1, h)
        The fusion weight W of :func:`mmfuse.tensor_fusion` (no ``+ 1`` when
        ``append_one=False``).
    by : {"order", "subset"}, default "order"
        ``"order"``: M + 1 terms, the orders k = 0..M (each the sum of the subset terms of
        size k).  ``"subset"``: 2^M terms, one per subset of the modalities.
    append_one : bool, default True
        As in :func:`mmfuse.tensor_fusion`.  Without the constant every term but the M-way
        one is zero.
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        Refuse a weight or a contraction intermediate over this size, as
        :func:`mmfuse.tensor_fusion` does, and, with ``by="subset"``, a result of more than
        this many elements (2^M B h).  By order, up to M + 1 partial contractions of one
        mode's intermediate size are alive at once (one per order reached so far).
    backend : str, optional
        Implementation to run (see :func:`mmfuse.set_config`); default: the configured one.

    Returns
    -------
    terms : array, shape (K, B, h)
        In the inputs' namespace, dtype and device (with gradients on torch).  They sum to
        ``tensor_fusion(xs, weight)`` (no bias: the bias is part of no term).
    labels : list
        The K parts: the ints 0..M (``by="order"``) or the subsets as sorted tuples of
        modality indices, by size then lexicographically, the empty tuple first
        (``by="subset"``).

    Raises
    ------
    ValueError
        Wrong shapes (the message names the argument and modality), an unknown ``by``, a
        size over ``max_elements`` or a ``max_elements`` that is not a positive integer.
    TypeError
        Non-floating or mixed dtypes, arrays from different namespaces, or an
        ``append_one`` that is not a bool.

    Notes
    -----
    Write :math:`\hat x_m = u_m + e_m` with :math:`u_m = [x_m; 0]` and
    :math:`e_m = [0; 1]`.  The outer product is multilinear, so

    .. math:: h - b = W \cdot \bigotimes_m (u_m + e_m)
              = \sum_{S \subseteq \{1..M\}} T_S, \qquad
              T_S = W \cdot \Big(\bigotimes_m v_m\Big),\ v_m = u_m\ (m \in S),\ e_m\ (m \notin S).

    :math:`T_S` is the sub-block of W whose modes in S range over the features and whose
    other modes sit at the constant's index, contracted with the features of S [1]_.  The
    naive definition, per sample and subset::

        z = 1
        for m, x in enumerate(xs):
            u, e = np.append(x[b], 0), np.eye(len(x[b]) + 1)[-1]
            z = np.multiply.outer(z, u if m in S else e)
        T[S][b] = np.tensordot(z, W, axes=M)

    Here W is contracted one mode at a time, each mode either with the features or at the
    constant's index; by order, the partial contractions are grouped by how many feature
    modes they hold (O(M^2) contractions), so no subset is enumerated.

    References
    ----------
    .. [1] A. Zadeh, M. Chen, S. Poria, E. Cambria, L.-P. Morency, "Tensor Fusion Network for
       Multimodal Sentiment Analysis", EMNLP 2017 (section 3).

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
    >>> weight = rng.standard_normal((3 + 1, 2 + 1, 5))
    >>> terms, labels = mmfuse.tensor_interactions(xs, weight, by="subset")
    >>> terms.shape, labels
    ((4, 4, 5), [(), (0,), (1,), (0, 1)])
    >>> bool(np.allclose(terms.sum(axis=0), mmfuse.tensor_fusion(xs, weight)))
    True
    """
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, tensor_interactions, xs, weight, by=by, append_one=append_one,
            max_elements=max_elements, backend=backend,
        )  # fmt: skip
    key = call_key(backend, (by, append_one, max_elements), xs, weight)
    make = _plan_tensor_interactions
    plan = _TENSOR_PLANS.plan(key, make, xs, weight, by, append_one, max_elements, backend)
    return plan(list(xs), weight)


_TENSOR_PLANS = PlanCache()


def _plan_tensor_interactions(
    xs: Any, weight: Any, by: Any, append_one: Any, max_elements: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`tensor_interactions` call and choose its implementation (its plan)."""
    by, append_one, max_elements = _options(by, append_one, max_elements)
    # the same limits as tensor_fusion, under this function's name, suggesting its low-rank
    # counterpart (lowrank_fusion was suggested; a review's find)
    xs = check_tensor_fusion(
        xs, weight, None, append_one, max_elements, "tensor_interactions", "lowrank_interactions"
    )
    if by == "subset":
        _check_subset_size("tensor_interactions", len(xs), xs[0].shape[0], weight.shape[-1], max_elements)
    impl = choose("tensor_interactions", backend, like=xs[0], arrays=(xs, weight))
    return partial(impl, by=by, append_one=append_one, max_elements=max_elements)


# --------------------------------------------------------------------------- LMF


def lowrank_interactions(
    xs: Sequence[Any],
    factors: Sequence[Any],
    weights: Any = None,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    backend: str | None = None,
) -> tuple[Any, list[Any]]:
    r"""The exact interaction terms of a Low-rank Multimodal Fusion (LMF).

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
    factors : sequence of M arrays, shapes (R, d_m + 1, h)
        As in :func:`mmfuse.lowrank_fusion`.
    weights : array, shape (R,), optional
        Rank weights; default ones.
    by : {"order", "subset"}, default "order"
        M + 1 terms by order, or 2^M terms by modality subset.
    present : bool array, shape (B, M), optional
        As in :func:`mmfuse.lowrank_fusion`: an absent modality contributes only through its
        constant, so every term of a subset holding it is zero for that sample.
    append_one : bool, default True
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        With ``by="subset"``, refuse a result of more than this many elements (2^M B h).
    backend : str, optional

    Returns
    -------
    terms : array, shape (K, B, h)
        They sum to ``lowrank_fusion(xs, factors, weights, present=present)`` (no bias).
    labels : list
        The orders 0..M, or the subsets as sorted tuples (by size, then lexicographically).

    Raises
    ------
    ValueError
        Wrong number of factors, factor rows not d_m + 1, differing ranks or output sizes,
        differing batch sizes, bad ``present`` or ``weights`` shape, an unknown ``by``, a
        result over ``max_elements``.
    TypeError
        Non-floating or mixed dtypes, non-boolean ``present``, mixed namespaces, or an
        ``append_one`` that is not a bool.

    Notes
    -----
    With :math:`P_m^{(r)} = x_m^\top F_m[r, :d_m]` (the features' projection) and
    :math:`c_m^{(r)} = F_m[r, d_m]` (the constant's row), each an h-vector,

    .. math:: T_S = \sum_r w_r \prod_{m \in S} P_m^{(r)} \prod_{m \notin S} c_m^{(r)},

    and the terms of order k are the coefficients of :math:`t^k` in
    :math:`\sum_r w_r \prod_m (c_m^{(r)} + t P_m^{(r)})` (elementwise over the outputs),
    built one modality at a time in O(M^2) products per rank [1]_.  The naive definition::

        for S, b, r:
            term = w[r] * ones(h)
            for m: term *= (xs[m][b] @ F[m][r, :-1]) if m in S else F[m][r, -1]
            T[S][b] += term
        T_order[k] = sum(T[S] for S with len(S) == k)

    By subset, the kept projections are multiplied along a depth-first walk over the
    modalities (2^(M+1) products).

    References
    ----------
    .. [1] Z. Liu, Y. Shen, V. B. Lakshminarasimhan, P. P. Liang, A. Zadeh, L.-P. Morency,
       "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors", ACL 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((8, 32)), rng.standard_normal((8, 16)), rng.standard_normal((8, 4))]
    >>> p = mmfuse.init_lowrank([32, 16, 4], rank=4, out_dim=10, seed=0)
    >>> terms, orders = mmfuse.lowrank_interactions(xs, p["factors"], p["weights"])
    >>> terms.shape, orders
    ((4, 8, 10), [0, 1, 2, 3])
    >>> y = mmfuse.lowrank_fusion(xs, **p)
    >>> bool(np.allclose(terms.sum(axis=0) + p["bias"], y))
    True
    """
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, lowrank_interactions, xs, factors, weights, by=by, present=present,
            append_one=append_one, max_elements=max_elements, backend=backend,
        )  # fmt: skip
    key = call_key(backend, (by, append_one, max_elements), xs, factors, weights, present)
    plan = _LOWRANK_PLANS.plan(
        key, _plan_lowrank_interactions, xs, factors, weights, by, present, append_one, max_elements, backend
    )
    return plan(list(xs), list(factors) if isinstance(factors, tuple) else factors, weights, present=present)


_LOWRANK_PLANS = PlanCache()


def _plan_lowrank_interactions(
    xs: Any, factors: Any, weights: Any, by: Any, present: Any, append_one: Any, max_elements: Any,
    backend: Any,
) -> Callable[..., Any]:  # fmt: skip
    """Check a :func:`lowrank_interactions` call and choose its implementation (its plan)."""
    by, append_one, max_elements = _options(by, append_one, max_elements)
    xs, batch = check_modalities(xs)
    factors = list(factors) if isinstance(factors, (list, tuple)) else factors
    rank, out_dim = check_lowrank_factors(factors, [x.shape[1] for x in xs], append_one)
    named = [*named_arrays("xs", xs), *named_arrays("factors", factors), ("weights", weights)]
    xp = common_namespace([*named, ("present", present)])
    check_same_float_dtype(xp, named)
    check_vector(xp, weights, "weights", rank, "R")
    if present is not None:
        check_present(xp, present, batch, len(xs))
    if by == "subset":
        _check_subset_size("lowrank_interactions", len(xs), batch, out_dim, max_elements)
    recursion = core.runs_recursion(by, append_one)
    size = CALL_SIZES["lowrank_interactions"](xs, factors) if recursion else 0
    arrays = (xs, factors, weights, present)
    impl = choose("lowrank_interactions", backend, like=xs[0], arrays=arrays, size=size)
    return partial(impl, by=by, append_one=append_one, max_elements=max_elements)


# --------------------------------------------------------------------------- CP


def cp_interactions(
    xs: Sequence[Any],
    cp: Any,
    *,
    by: str = "order",
    present: Any = None,
    append_one: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    backend: str | None = None,
) -> tuple[Any, list[Any]]:
    r"""The exact interaction terms of a CP fusion (TFN weight as a CP decomposition).

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, d_m)
    cp : tensorly CPTensor or (weights, factors)
        As in :func:`mmfuse.cp_fusion`: ``weights`` (R,) or None, ``factors`` =
        ``[A_1 (d_1 + 1, R), ..., A_M (d_M + 1, R), C (h, R)]``.
    by : {"order", "subset"}, default "order"
    present : bool array, shape (B, M), optional
        As in :func:`mmfuse.cp_fusion`.
    append_one : bool, default True
    max_elements : int, default ``DEFAULT_MAX_ELEMENTS`` (2**27)
        With ``by="subset"``, refuse a result of more than this many elements (2^M B h).
    backend : str, optional

    Returns
    -------
    terms : array, shape (K, B, h)
        They sum to ``cp_fusion(xs, cp, present=present)`` (no bias).
    labels : list
        The orders 0..M, or the subsets as sorted tuples (by size, then lexicographically).

    Raises
    ------
    ValueError
        Wrong number of factors (must be M + 1), factor rows not d_m + 1, differing ranks, bad
        ``present`` shape, an unknown ``by``, a result over ``max_elements``.
    TypeError
        ``cp`` of the wrong type, non-floating or mixed dtypes, mixed namespaces, or an
        ``append_one`` that is not a bool.

    Notes
    -----
    With :math:`p_m = A_m[:d_m]^\top x_m` and :math:`c_m = A_m[d_m]` (R-vectors),

    .. math:: T_S = C \Big(w \odot \prod_{m \in S} p_m \odot \prod_{m \notin S} c_m\Big),

    which is TFN's :math:`T_S` for the weight ``tensorly.cp_to_tensor(cp)``.  By order, the
    coefficients of :math:`t^k` in :math:`\prod_m (c_m + t\,p_m)` (O(M^2) products of
    R-vectors), then one product with C per order.  The naive definition::

        W = tensorly.cp_to_tensor(cp)
        for S, b:
            z = 1
            for m: z = np.multiply.outer(z, np.append(xs[m][b], 0) if m in S else e_m)
            T[S][b] = np.tensordot(z, W, axes=M)

    References
    ----------
    .. [1] T. G. Kolda, B. W. Bader, "Tensor Decompositions and Applications", SIAM Review
       51(3), 2009.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
    >>> cp = (np.ones(6), [rng.standard_normal((4, 6)), rng.standard_normal((3, 6)),
    ...                    rng.standard_normal((5, 6))])
    >>> terms, orders = mmfuse.cp_interactions(xs, cp)
    >>> orders
    [0, 1, 2]
    >>> bool(np.allclose(terms.sum(axis=0), mmfuse.cp_fusion(xs, cp)))
    True
    """
    pair = cp_pair(cp)
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, cp_interactions, xs, pair if pair is not None else cp, by=by, present=present,
            append_one=append_one, max_elements=max_elements, backend=backend,
        )  # fmt: skip
    options = (by, append_one, max_elements)
    # (an argument that is no pair, unplanned: its checks say what is wrong)
    key = call_key(backend, options, xs, pair, present) if pair is not None else None
    plan = _CP_PLANS.plan(key, _plan_cp_interactions, xs, cp, by, present, append_one, max_elements, backend)
    weights, factors = pair if pair is not None else as_cp(cp)
    return plan(list(xs), (weights, list(factors)), present=present)


_CP_PLANS = PlanCache()


def _plan_cp_interactions(
    xs: Any, cp: Any, by: Any, present: Any, append_one: Any, max_elements: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`cp_interactions` call and choose its implementation (its plan)."""
    by, append_one, max_elements = _options(by, append_one, max_elements)
    xs, weights, factors = check_cp_inputs(xs, cp, append_one, present)
    if by == "subset":
        _check_subset_size("cp_interactions", len(xs), xs[0].shape[0], factors[-1].shape[0], max_elements)
    recursion = core.runs_recursion(by, append_one)
    size = CALL_SIZES["cp_interactions"](xs, (weights, factors)) if recursion else 0
    impl = choose("cp_interactions", backend, like=xs[0], arrays=(xs, factors, weights, present), size=size)
    return partial(impl, by=by, append_one=append_one, max_elements=max_elements)


# --------------------------------------------------------------------------- shares


def interaction_shares(terms: Any, *, kind: str = "variance") -> Any:
    r"""The share of a batch's fused output carried by each interaction term.

    Parameters
    ----------
    terms : array, shape (K, B, h)
        The terms of :func:`tensor_interactions`, :func:`lowrank_interactions` or
        :func:`cp_interactions` (by order or by subset), for one batch.
    kind : {"variance", "norm"}, default "variance"
        ``"variance"``: the fraction of the output's variance over the batch (summed over
        the h outputs) that each term carries.  ``"norm"``: the fraction of the output's
        squared norm (no centring; the constant term then gets its share too).

    Returns
    -------
    array, shape (K,)
        In the terms' namespace and dtype.  The shares sum to 1 (to rounding).  NaN where the
        output has zero variance (``"variance"``) or is zero (``"norm"``), and for an empty batch.
        The shares are those of the terms as given: identical samples whose terms came out
        different in their last bits (a GEMM may round a row differently by its place in the
        batch, at the edges of its blocks and tiles) give a variance of rounding noise and
        shares of noise, not NaN; compare the output's spread with its size before reading
        them.  The shares do not depend on the terms' scale: the terms, and then their
        deviations from their means, are scaled by powers of two (exact) before any square,
        which neither overflows nor underflows.  A deviation that is subnormal once the
        largest term is scaled to 1 (below 2**-1022 of it in float64, 2**-126 in float32)
        keeps only the bits it has left there.  Where the platform flushes subnormal numbers
        to zero (JAX on the CPU), terms that are subnormal themselves (below about 1.2e-38 in
        float32, 2.2e-308 in float64) are zero before any scaling: their shares are lost, or
        NaN where every term is.

    Raises
    ------
    ValueError
        ``terms`` not 3-D, or an unknown ``kind``.
    TypeError
        ``terms`` not a real floating array.

    Notes
    -----
    With :math:`y = \sum_k T_k` (the output minus its bias) and :math:`\bar{\cdot}` the mean
    over the batch, the variance share is the covariance decomposition

    .. math:: s_k = \frac{\sum_{b,j} (T_{k,bj} - \bar T_{k,j})(y_{bj} - \bar y_j)}
                         {\sum_{b,j} (y_{bj} - \bar y_j)^2},
              \qquad \sum_k s_k = 1,

    and the norm share is :math:`\langle T_k, y\rangle / \langle y, y\rangle`.  A share is
    the term's own variance plus its covariance with all the other terms, so it can be
    negative when a term cancels others, or exceed 1.  The
    constant term (order 0, subset ``()``) has no variance, so its variance share is 0.
    The naive definition::

        y = terms.sum(axis=0)
        yc = y - y.mean(axis=0)
        for k:
            tc = terms[k] - terms[k].mean(axis=0)
            s[k] = (tc * yc).sum() / (yc * yc).sum()

    References
    ----------
    .. [1] H. Rabitz, O. F. Alis, "General foundations of high-dimensional model
       representations", J. Math. Chem. 25, 1999 (the covariance decomposition of variance
       over the terms of an additive expansion).

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((64, 3)), rng.standard_normal((64, 2))]
    >>> p = mmfuse.init_lowrank([3, 2], rank=4, out_dim=5, seed=0)
    >>> terms, orders = mmfuse.lowrank_interactions(xs, p["factors"], p["weights"])
    >>> shares = mmfuse.interaction_shares(terms)
    >>> shares.shape, bool(abs(shares[0]) < 1e-12), bool(np.isclose(shares.sum(), 1.0))
    ((3,), True, True)
    """
    if not is_array(terms):
        raise not_an_array("terms", terms)
    # (the checks every operator's arrays pass: sparse, mkldnn and nested torch tensors named,
    # which reached torch's own errors here; a review's find)
    xp = common_namespace([("terms", terms)])
    check_float(xp, terms, "terms")
    check_ndim(terms, 3, "terms", "(K, B, h)")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(f"kind must be 'variance' or 'norm', got {kind!r}")
    return core.interaction_shares(terms, kind=kind)
