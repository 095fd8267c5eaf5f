"""Public token-level sequence fusion and the Wander adapter (Guo et al., AAAI 2025).

This layer checks arguments (from metadata only), picks the implementation through the backend
registry and calls it.  The maths lives in :mod:`mmfuse._core.sequence` (Array-API core) and
:mod:`mmfuse.reference.sequence` (the NumPy oracle, which builds the weight tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from ._autocast import autocast_device, without_autocast
from ._core import sequence as core
from ._fusion import DEFAULT_MAX_ELEMENTS, Planned, check_allocations
from ._namespace import array_namespace, check_array, from_numpy
from ._plan import PlanCache, call_key, planned_impl
from ._validation import (
    Seed,
    as_sequence,
    check_bool,
    check_floating_dtype,
    check_modalities,
    check_namespace,
    check_ndim,
    check_positive_int,
    check_same_float_dtype,
    check_size_list,
    common_namespace,
    fmt_shape,
    random_generator,
)
from .backends._registry import choose

__all__ = [
    "init_wander",
    "sequence_fusion",
    "wander",
    "wander_parameter_count",
]

#: The two contractions: the true CP one and the released code's rank-summed one.
MODES = ("cp", "collapsed")
#: Named activations of :func:`wander` (a callable is accepted too).
ACTIVATIONS = tuple(core.ACTIVATIONS)
#: Residual choices of :func:`wander`.
RESIDUALS = ("first", "none")
#: ``init="trainable"``: the fused term starts at about this fraction of its natural scale.
TRAINABLE_SCALE = 0.1


def check_mode(mode: Any) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def _check_factors(
    factors: Any,
    name: str,
    n: int,
    layout: str,
    own: Sequence[int],
    own_label: str,
    own_source: Sequence[str],
    *,
    rank_label: str,
    out_label: str,
    same_rank: bool,
) -> tuple[int, int]:
    """Check M factors (R, own_m, out); return (R of factor 0, shared out size)."""
    factors = as_sequence(factors, name)
    if len(factors) != n:
        raise ValueError(
            f"{name} must have one entry per modality: got {len(factors)} factors for "
            f"{n} modalities"
        )
    for m, f in enumerate(factors):
        check_array(f, f"{name}[{m}]")
        check_ndim(f, 3, f"{name}[{m}]", layout.replace("_m", f"_{m}"))
    rank, out = factors[0].shape[0], factors[0].shape[2]
    for m, f in enumerate(factors):
        # an empty rank or output axis is no fusion (the core's blocking divides by them)
        if f.shape[0] == 0 or f.shape[2] == 0:
            raise ValueError(
                f"{name}[{m}] has shape {fmt_shape(f.shape)}; its {rank_label} and {out_label} "
                "must be at least 1"
            )
        if f.shape[1] != own[m]:
            raise ValueError(
                f"{name}[{m}] has shape {fmt_shape(f.shape)}; expected "
                f"{layout.replace('_m', f'_{m}')} with {own_label}_{m} = {own[m]} "
                f"({own_source[m]})"
            )
        if same_rank and f.shape[0] != rank:
            raise ValueError(
                f"{name}[{m}] has rank {rank_label} = {f.shape[0]} (shape {fmt_shape(f.shape)}) "
                f"but {name}[0] has {rank} (shape {fmt_shape(factors[0].shape)}); in mode='cp' "
                "all modalities share the rank index"
            )
        if f.shape[2] != out:
            raise ValueError(
                f"{name}[{m}] has {out_label} = {f.shape[2]} (shape {fmt_shape(f.shape)}) but "
                f"{name}[0] has {out_label} = {out} (shape {fmt_shape(factors[0].shape)}); "
                f"{out_label} must match between modalities"
            )
    return rank, out


def _check_masks(xp: Any, masks: Any, shapes: Sequence[tuple[int, ...]], source: str) -> list[Any] | None:
    """``masks``: None, or one entry per modality, each None or a boolean (B, T_m) array."""
    if masks is None:
        return None
    masks = as_sequence(masks, "masks")
    if len(masks) != len(shapes):
        raise ValueError(
            f"masks must have one entry (or None) per modality: got {len(masks)} for "
            f"{len(shapes)} modalities"
        )
    for m, (mask, shape) in enumerate(zip(masks, shapes)):
        if mask is None:
            continue
        check_array(mask, f"masks[{m}]")
        check_bool(xp, mask, f"masks[{m}]")
        if tuple(mask.shape) != tuple(shape[:2]):
            raise ValueError(
                f"masks[{m}] must have shape (B, T_{m}) = {fmt_shape(shape[:2])} to match "
                f"{source}[{m}] of shape {fmt_shape(shape)}, got {fmt_shape(mask.shape)}"
            )
    return masks


def _check_fusion_args(
    shapes: Sequence[tuple[int, ...]],
    feature_factors: Any,
    token_factors: Any,
    mode: Any,
    *,
    source: str,
    feature_name: str,
    token_name: str,
    rank_source: Sequence[str],
    source_shapes: Sequence[tuple[int, ...]] | None = None,
) -> tuple[list[Any], list[Any], int, int]:
    """Shape checks shared by sequence_fusion and wander; returns factors, D and T_out.
    ``source_shapes``: the shapes of the arrays named ``source`` where they differ from
    ``shapes`` (wander's inputs, before the down-projection)."""
    check_mode(mode)
    n = len(shapes)
    same_rank = mode == "cp"
    _, out_dim = _check_factors(
        feature_factors, feature_name, n, "(R_h, r_m, D)", [s[2] for s in shapes], "r",
        rank_source, rank_label="R_h", out_label="D", same_rank=same_rank,
    )  # fmt: skip
    _, n_out = _check_factors(
        token_factors, token_name, n, "(R_t, T_m, T_out)", [s[1] for s in shapes], "T",
        [f"the token count of {source}[{m}] of shape {fmt_shape(s)}"
         for m, s in enumerate(shapes if source_shapes is None else source_shapes)],
        rank_label="R_t", out_label="T_out", same_rank=same_rank,
    )  # fmt: skip
    return list(feature_factors), list(token_factors), out_dim, n_out


# --------------------------------------------------------------------------- sequence fusion


def sequence_fusion(
    hs: Sequence[Any],
    feature_factors: Sequence[Any],
    token_factors: Sequence[Any],
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
    backend: str | None = None,
) -> Any:
    r"""Token-level sequence fusion (Wander): a CP contraction over tokens and features.

    Parameters
    ----------
    hs : sequence of M arrays, shapes (B, T_m, r_m)
        The (already down-projected) token sequences, sharing the batch size B.  The
        lengths T_m and widths r_m may differ between modalities.
    feature_factors : sequence of M arrays, shapes (R_h, r_m, D)
        The feature factors :math:`\Phi_m`.
    token_factors : sequence of M arrays, shapes (R_t, T_m, T_out)
        The token factors :math:`\Psi_m`.
    mode : {"cp", "collapsed"}, default "cp"
        ``"cp"``: the true CP contraction of :math:`W = W_{feat} \otimes W_{tok}`.
        ``"collapsed"``: what the released Wander code computes (each modality's ranks are
        summed before the product; the ranks then add no expressive power, see Notes).
        In collapsed mode the ranks may differ between modalities.
    masks : sequence of M boolean arrays (B, T_m) or None, optional
        Padding masks, True for a real token and False for padding (the convention of
        Hugging Face's ``attention_mask``; PyTorch's ``key_padding_mask`` is the negation).
        Padded tokens are zeroed before the token contraction; an entry may be None.  A
        sample with every token of one modality padded has that modality's term 0, so its
        whole fused output is 0 (the product over modalities).
    backend : str, optional
        Implementation to run (see :func:`mmfuse.set_config`); default: the configured one.

    Returns
    -------
    array, shape (B, T_out, D)
        In the inputs' namespace, dtype and device.

    Raises
    ------
    ValueError
        Wrong number of factors, a factor whose r_m or T_m does not match ``hs[m]``,
        differing D or T_out between modalities, differing ranks in cp mode, a mask of the
        wrong shape, or an unknown ``mode``.  The message names the argument and modality.
    TypeError
        Non-floating or mixed dtypes, non-boolean masks, arrays from different namespaces.

    Notes
    -----
    Wander [1]_ fuses token sequences with low-rank factors over tokens and features.  What
    follows is mmfuse's reading of the released code (we could not read the paper's method
    section): a weight tensor of order 2M + 2 over the modes
    :math:`(T_1, r_1, \ldots, T_M, r_M, T_{out}, D)`, the outer product of a feature and a
    token tensor, each a CP tensor whose output mode is shared by all ranks
    (:math:`W_{feat}[s_1, \ldots, s_M, k] = \sum_i \prod_m \Phi_m[i, s_m, k]`, likewise
    :math:`W_{tok}`):

    .. math:: W_{feat} = \sum_{i<R_h} \textstyle\bigotimes_m \Phi_m[i], \qquad
              W_{tok} = \sum_{j<R_t} \textstyle\bigotimes_m \Psi_m[j].

    Contracting W with :math:`H_1 \otimes \cdots \otimes H_M` gives (cp mode)

    .. math:: Y = \sum_{i<R_h} \sum_{j<R_t} \prod_m \Psi_m[j]^\top H_m \Phi_m[i],

    the product being elementwise over the (T_out, D) output.  The released code instead
    computes :math:`Y = \prod_m (\sum_j \Psi_m[j])^\top H_m (\sum_i \Phi_m[i])`: the rank sums
    move inside the product (the same erratum as LMF's Eq. 6), so only the sums
    :math:`\sum_i \Phi_m[i]` and :math:`\sum_j \Psi_m[j]` matter and collapsed mode with any
    ranks equals cp mode with :math:`R_h = R_t = 1` and those sums as factors: the ranks add
    parameters but no expressive power.  Naive definition (cp mode), per sample b::

        y = 0
        for i in range(R_h):
            for j in range(R_t):
                term = 1
                for m in range(M): term = term * (Psi[m][j].T @ H[m][b] @ Phi[m][i])
                y[b] += term

    Here W is never built: each modality needs two matmuls over all ranks at once, whose
    order (token factors first or feature factors first) a planner picks from the shapes by
    counting multiply-adds (cached; ``mmfuse._core.sequence.plan``).  Collapsed mode
    sums the ranks first and costs what the released code does, or less; cp mode costs
    about R_h R_t times more in its second contraction and works in blocks of samples and
    token ranks, so that the pairwise terms (b, R_t T_out, R_h D) stay in cache and the
    memory held does not grow with B or the ranks.
    :func:`mmfuse.reference.sequence_fusion` contracts the explicit W.

    References
    ----------
    .. [1] Z. Guo, X. Cheng, Y. Wu, T. Jin, "A Wander Through the Multimodal Landscape:
       Efficient Transfer Learning via Low-rank Sequence Multimodal Adapter", AAAI 2025,
       arXiv:2412.08979.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> hs = [rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 4, 2))]
    >>> phi = [rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 2, 6))]
    >>> psi = [rng.standard_normal((3, 5, 7)), rng.standard_normal((3, 4, 7))]
    >>> mmfuse.sequence_fusion(hs, phi, psi).shape
    (2, 7, 6)

    With one rank each the two modes agree:

    >>> phi1 = [f.sum(axis=0, keepdims=True) for f in phi]
    >>> psi1 = [t.sum(axis=0, keepdims=True) for t in psi]
    >>> y = mmfuse.sequence_fusion(hs, phi, psi, mode="collapsed")
    >>> bool(np.allclose(y, mmfuse.sequence_fusion(hs, phi1, psi1, mode="cp")))
    True
    """
    if (device_type := autocast_device(hs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, sequence_fusion, hs, feature_factors, token_factors, mode=mode, masks=masks,
            backend=backend,
        )  # fmt: skip
    key = call_key(backend, (mode,), hs, feature_factors, token_factors, masks)
    plan = _SEQUENCE_PLANS.plan(key, plan_sequence, hs, feature_factors, token_factors, mode, masks, backend)
    return plan(hs, feature_factors, token_factors, masks=masks)


_SEQUENCE_PLANS = PlanCache()


def plan_sequence(
    hs: Any, feature_factors: Any, token_factors: Any, mode: Any, masks: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`sequence_fusion` call and choose its implementation (its plan)."""
    hs, _ = check_modalities(hs, "hs", ndim=3, layout="(B, T_m, r_m)")
    shapes = [tuple(h.shape) for h in hs]
    feature_factors, token_factors, _, _ = _check_fusion_args(
        shapes, feature_factors, token_factors, mode, source="hs",
        feature_name="feature_factors", token_name="token_factors",
        rank_source=[f"the width of hs[{m}] of shape {fmt_shape(s)}" for m, s in enumerate(shapes)],
    )  # fmt: skip
    named = [
        *((f"hs[{m}]", h) for m, h in enumerate(hs)),
        *((f"feature_factors[{m}]", f) for m, f in enumerate(feature_factors)),
        *((f"token_factors[{m}]", t) for m, t in enumerate(token_factors)),
    ]
    masks_named = [] if masks is None or not isinstance(masks, (list, tuple)) else masks
    xp = common_namespace([*named, *((f"masks[{m}]", k) for m, k in enumerate(masks_named))])
    check_same_float_dtype(xp, named)
    masks = _check_masks(xp, masks, shapes, "hs")
    impl = choose("sequence_fusion", backend, like=hs[0], arrays=(hs, feature_factors, token_factors, masks))
    chosen = planned_impl(impl, (hs, feature_factors, token_factors), {"mode": mode, "masks": masks})
    return partial(chosen, mode=mode)


# --------------------------------------------------------------------------- the adapter


def _check_params(params: Any, xs: list[Any]) -> tuple[list[tuple[Any, Any]], list[int]]:
    """Check ``params["down"]`` against the inputs; return the pairs and the widths r_m."""
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a dict with keys 'down', 'feature' and 'token' (see init_wander), "
            f"got {type(params).__name__}"
        )
    missing = [k for k in ("down", "feature", "token") if k not in params]
    if missing:
        raise ValueError(
            f"params is missing {missing}; it needs 'down', 'feature' and 'token' "
            "(see init_wander)"
        )
    n = len(xs)
    down = as_sequence(params["down"], "params['down']", items="(W, b) pairs")
    if len(down) != n:
        raise ValueError(
            f"params['down'] must have one (W, b) pair per modality: got {len(down)} for "
            f"{n} modalities"
        )
    pairs, widths = [], []
    for m, (x, pair) in enumerate(zip(xs, down)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(
                f"params['down'][{m}] must be a (W, b) pair with W (d_{m}, r) and b (r,) or None, "
                f"got {type(pair).__name__}"
            )
        w, b = pair
        check_array(w, f"params['down'][{m}][0]")
        check_ndim(w, 2, f"params['down'][{m}][0]", f"(d_{m}, r)")
        if w.shape[0] != x.shape[2]:
            raise ValueError(
                f"params['down'][{m}][0] has shape {fmt_shape(w.shape)}; expected (d_{m}, r) "
                f"with d_{m} = {x.shape[2]} (the width of xs[{m}] of shape {fmt_shape(x.shape)})"
            )
        if b is not None:
            check_array(b, f"params['down'][{m}][1]")
            if tuple(b.shape) != (w.shape[1],):
                raise ValueError(
                    f"params['down'][{m}][1] must have shape (r,) = ({w.shape[1]},) to match "
                    f"params['down'][{m}][0] of shape {fmt_shape(w.shape)}, "
                    f"got {fmt_shape(b.shape)}"
                )
        pairs.append((w, b))
        widths.append(int(w.shape[1]))
    return pairs, widths


def check_activation(activation: Any) -> None:
    if callable(activation):
        return
    if not isinstance(activation, str) or activation not in core.ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {list(core.ACTIVATIONS)} or a callable, got {activation!r}"
        )


def wander(
    xs: Sequence[Any],
    params: Mapping[str, Any],
    *,
    mode: str = "cp",
    masks: Sequence[Any] | None = None,
    activation: Any = "gelu",
    residual: str = "first",
    backend: str | None = None,
) -> Any:
    r"""The Wander adapter: down-projection, activation, sequence fusion, residual.

    Parameters
    ----------
    xs : sequence of M arrays, shapes (B, T_m, d_m)
        Token sequences of the M modalities, sharing the batch size B.
    params : dict
        ``{"down": [(W_m (d_m, r), b_m (r,) or None), ...], "feature": [(R_h, r, D), ...],
        "token": [(R_t, T_m, T_out), ...]}``, e.g. from :func:`init_wander`.  The widths r
        may differ between modalities.
    mode : {"cp", "collapsed"}, default "cp"
        The contraction, as in :func:`sequence_fusion`; ``"collapsed"`` is the released code.
    masks : sequence of M boolean arrays (B, T_m) or None, optional
        Padding masks (True: real token), passed to :func:`sequence_fusion`: padded tokens
        are zeroed after the activation, before the token contraction.  The residual is
        not masked.  A sample with every token of one modality padded gets a fused term of
        0: its output is the residual alone.
    activation : {"gelu", "gelu_tanh", "relu", "identity"} or callable, default "gelu"
        Applied after the down-projection.  ``"gelu"`` is the exact erf GELU (the released
        code's ``F.gelu``); ``"gelu_tanh"`` its tanh approximation.  A callable takes and
        returns an array of the inputs' namespace and of the pre-activations' dtype (under
        ``backend="reference"`` it is called on float64 NumPy arrays; float16 / bfloat16
        inputs are computed in float32, so a callable gets float32 pre-activations, except
        one holding floating parameters of one dtype, such as an ``nn.PReLU``, which gets
        them in its parameters' dtype, its result widened back).
    residual : {"first", "none"}, default "first"
        ``"first"`` adds the first T_out tokens of the inputs concatenated along the token
        axis (the released behaviour; needs every d_m = D and T_out <= sum T_m);
        ``"none"`` returns the fused term alone.
    backend : str, optional
        Implementation to run; default: the configured one.

    Returns
    -------
    array, shape (B, T_out, D)

    Raises
    ------
    ValueError
        A key of ``params`` missing, wrong number of down-projections or factors, W_m rows
        not d_m, b_m not of shape (r_m,), a feature factor whose r does not match its
        down-projection, a token factor whose T_m does not match ``xs[m]``, D or T_out
        differing between modalities, ``residual="first"`` with some d_m != D or
        T_out > sum T_m, bad mask shape, unknown mode, activation or residual.
    TypeError
        ``params`` not a mapping, a down entry not a (W, b) pair, non-floating or mixed
        dtypes, non-boolean masks, mixed namespaces.

    Notes
    -----
    With :math:`H_m = \sigma(X_m W_m + b_m)` (B, T_m, r) and the sequence fusion
    :math:`F` of :func:`sequence_fusion`,

    .. math:: Y = F(H_1, \ldots, H_M) + [X_1; \ldots; X_M]_{:, :T_{out}, :},

    where :math:`[\cdot]` concatenates along the token axis.  The released code [1]_ sets
    :math:`T_{out} = r` and D = d; here both are free.  Naive definition::

        hs = [gelu(x @ W + b) for x, (W, b) in zip(xs, params["down"])]
        y = sequence_fusion(hs, params["feature"], params["token"], mode=mode)
        if residual == "first":
            y = y + np.concatenate(xs, axis=1)[:, :T_out]

    References
    ----------
    .. [1] Z. Guo, X. Cheng, Y. Wu, T. Jin, "A Wander Through the Multimodal Landscape:
       Efficient Transfer Learning via Low-rank Sequence Multimodal Adapter", AAAI 2025,
       arXiv:2412.08979.

    Examples
    --------
    >>> import numpy as np
    >>> import mmfuse
    >>> rng = np.random.default_rng(0)
    >>> xs = [rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 5, 8))]
    >>> params = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3,
    ...                             out_dim=8, seed=0)
    >>> y = mmfuse.wander(xs, params)
    >>> y.shape
    (2, 4, 8)

    At initialisation the adapter is close to the identity (its residual):

    >>> float(np.abs(y - xs[0][:, :4]).max()) < 0.05 * float(np.abs(xs[0]).max())
    True
    """
    if (device_type := autocast_device(xs)) is not None:  # (matmul-like: see mmfuse._autocast)
        return without_autocast(
            device_type, wander, xs, params, mode=mode, masks=masks, activation=activation,
            residual=residual, backend=backend,
        )  # fmt: skip
    parts = (params.get("down"), params.get("feature"), params.get("token")) if type(params) is dict else None
    options = (mode, activation_key(activation), residual)
    key = call_key(backend, options, xs, *parts, masks) if parts is not None else None
    plan = _WANDER_PLANS.plan(key, plan_wander, xs, params, mode, masks, activation, residual, backend)
    given = params if parts is not None else _clean_params(params)
    return plan(xs, given, masks=masks, activation=activation)


class _AnyCallable:
    """What a plan's key holds for any callable ``activation`` (:func:`activation_key`): an
    object of its own type, equal to no option a caller can pass."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<any callable activation>"


_CALLABLE_ACTIVATION = _AnyCallable()


def activation_key(activation: Any) -> Any:
    """``activation`` as a plan's key holds it: a name as itself, any callable as one marker.
    A plan is the same for every callable (checked as callable, never inspected), and the
    callable reaches the plan per call: a key or a plan holding it would keep it, and all it
    references (a module, a closure's arrays), alive in the plan cache after its last use,
    and a fresh lambda per call would plan every call."""
    if isinstance(activation, str) or not callable(activation):
        return activation
    return _CALLABLE_ACTIVATION


_WANDER_PLANS = PlanCache()


def _clean_params(params: Any) -> dict[str, Any]:
    """The parameters an unplanned call passes on (a Mapping that is not a dict)."""
    down = [tuple(p) for p in params["down"]]
    return {"down": down, "feature": params["feature"], "token": params["token"]}


def plan_wander(
    xs: Any, params: Any, mode: Any, masks: Any, activation: Any, residual: Any, backend: Any
) -> Callable[..., Any]:
    """Check a :func:`wander` call and choose its implementation (its plan)."""
    xs, batch = check_modalities(xs, "xs", ndim=3, layout="(B, T_m, d_m)")
    pairs, widths = _check_params(params, xs)
    shapes = [(batch, x.shape[1], r) for x, r in zip(xs, widths)]
    feature, token, out_dim, n_out = _check_fusion_args(
        shapes, params["feature"], params["token"], mode, source="xs",
        feature_name="params['feature']", token_name="params['token']",
        rank_source=[f"the width of params['down'][{m}][0] of shape {fmt_shape(w.shape)}"
                     for m, (w, _) in enumerate(pairs)],
        source_shapes=[tuple(x.shape) for x in xs],
    )  # fmt: skip
    check_activation(activation)
    if not isinstance(residual, str) or residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {list(RESIDUALS)}, got {residual!r}")
    if residual == "first":
        for m, x in enumerate(xs):
            if x.shape[2] != out_dim:
                raise ValueError(
                    f"residual='first' needs every d_m = D: xs[{m}] has d_{m} = {x.shape[2]} "
                    f"(shape {fmt_shape(x.shape)}) but the feature factors give D = {out_dim}; "
                    "use residual='none'"
                )
        total = sum(x.shape[1] for x in xs)
        if n_out > total:
            raise ValueError(
                f"residual='first' needs T_out <= sum T_m: T_out = {n_out} but the inputs have "
                f"{total} tokens in all ({' + '.join(str(x.shape[1]) for x in xs)}); "
                "use residual='none'"
            )
    named = [
        *((f"xs[{m}]", x) for m, x in enumerate(xs)),
        *((f"params['down'][{m}][0]", w) for m, (w, _) in enumerate(pairs)),
        *((f"params['down'][{m}][1]", b) for m, (_, b) in enumerate(pairs)),
        *((f"params['feature'][{m}]", f) for m, f in enumerate(feature)),
        *((f"params['token'][{m}]", t) for m, t in enumerate(token)),
    ]
    masks_named = [] if masks is None or not isinstance(masks, (list, tuple)) else masks
    xp = common_namespace([*named, *((f"masks[{m}]", k) for m, k in enumerate(masks_named))])
    check_same_float_dtype(xp, named)
    masks = _check_masks(xp, masks, [tuple(x.shape) for x in xs], "xs")
    impl = choose("wander", backend, like=xs[0], arrays=(xs, pairs, feature, token, masks))
    options = {"mode": mode, "residual": residual}  # (activation: passed per call, activation_key)
    chosen = planned_impl(impl, (xs, params), {**options, "activation": activation, "masks": masks})
    return partial(chosen, **options)


# --------------------------------------------------------------------------- parameters


def _check_sizes(
    dims: Sequence[int], lengths: Sequence[int], **sizes: Any
) -> tuple[list[int], list[int], dict[str, int]]:
    dims = check_size_list("dims", dims)
    lengths = check_size_list("lengths", lengths)
    if not dims:
        raise ValueError("dims must hold at least 1 modality, got 0")
    if len(dims) != len(lengths):
        raise ValueError(
            f"dims and lengths must have one entry per modality: got {len(dims)} dims and "
            f"{len(lengths)} lengths"
        )
    return dims, lengths, {k: check_positive_int(k, v) for k, v in sizes.items()}


def wander_planned(
    dims: Sequence[int],
    lengths: Sequence[int],
    sizes: Mapping[str, int],
    *,
    bias: bool = True,
    layer: bool = False,
) -> list[Planned]:
    """The arrays of Wander adapter parameters (:func:`init_wander`, ``nn.WanderAdapter``,
    whose names ``layer`` selects), for :func:`mmfuse._fusion.check_allocations`."""
    r, r_h, r_t = sizes["rank"], sizes["feature_rank"], sizes["token_rank"]
    d_out, t_out = sizes["out_dim"], sizes["n_out"]
    dims_name = "in_dims" if layer else "dims"
    names = (
        ("down_weights[{m}]", "down_biases[{m}]", "feature_factors[{m}]", "token_factors[{m}]")
        if layer
        else ("down[{m}] weight", "down[{m}] bias", "feature[{m}]", "token[{m}]")
    )
    planned: list[Planned] = []
    for m, (d, t) in enumerate(zip(dims, lengths)):
        weight, bias_name, feature, token = (name.format(m=m) for name in names)
        planned.append((weight, f"(d_{m}, r)", (d, r), f"{dims_name}[{m}]={d}, rank={r}"))
        if bias:
            planned.append((bias_name, "(r,)", (r,), f"rank={r}"))
        feature_from = f"feature_rank={r_h}, rank={r}, out_dim={d_out}"
        planned.append((feature, "(R_h, r, D)", (r_h, r, d_out), feature_from))
        token_from = f"token_rank={r_t}, lengths[{m}]={t}, n_out={t_out}"
        planned.append((token, f"(R_t, T_{m}, T_out)", (r_t, t, t_out), token_from))
    return planned


def wander_parameter_count(
    dims: Sequence[int],
    lengths: Sequence[int],
    *,
    rank: int,
    feature_rank: int,
    token_rank: int,
    out_dim: int,
    n_out: int | None = None,
    mode: str = "cp",
) -> dict[str, int]:
    r"""Parameter counts of a Wander adapter, stored and effective, per mode.

    Parameters
    ----------
    dims, lengths : sequence of int
        Feature sizes d_m and token counts T_m of the M modalities.
    rank, feature_rank, token_rank, out_dim : int
        r, R_h, R_t and D, as in :func:`init_wander`.
    n_out : int, optional
        T_out; default ``rank`` (the released code).
    mode : {"cp", "collapsed"}, default "cp"

    Returns
    -------
    dict of str to int
        ``"down"``: :math:`\sum_m (d_m + 1) r`; ``"feature"``: :math:`M R_h r D`;
        ``"token"``: :math:`R_t T_{out} \sum_m T_m`; ``"total"``: their sum, the stored
        parameters (the same in both modes); ``"effective"``: the parameters the output
        actually depends on, equal to ``"total"`` in cp mode and, in collapsed mode, the
        count with :math:`R_h = R_t = 1` (only the rank sums matter); ``"full_weight"``: the
        elements of the explicit weight tensor W, :math:`r^M D\, T_{out} \prod_m T_m`, that
        the factorisation replaces.

    Raises
    ------
    ValueError
        Non-positive sizes, ``dims`` and ``lengths`` of different lengths, unknown mode.

    Notes
    -----
    "Effective" counts the free coordinates of the parameterisation up to the collapse of
    ranks, not the dimension of the set of reachable weights (CP factors also have scaling
    indeterminacies, which are not subtracted).

    Examples
    --------
    >>> import mmfuse
    >>> c = mmfuse.wander_parameter_count([40, 40, 40], [50, 50, 50], rank=16,
    ...                                   feature_rank=8, token_rank=12, out_dim=40,
    ...                                   mode="collapsed")
    >>> c["total"], c["effective"]
    (46128, 6288)
    """
    check_mode(mode)
    dims, lengths, s = _check_sizes(
        dims, lengths, rank=rank, feature_rank=feature_rank, token_rank=token_rank,
        out_dim=out_dim, n_out=rank if n_out is None else n_out,
    )  # fmt: skip
    r, r_h, r_t, d_out, t_out = s["rank"], s["feature_rank"], s["token_rank"], s["out_dim"], s["n_out"]
    n = len(dims)
    down = sum((d + 1) * r for d in dims)

    def factors(fr: int, tr: int) -> tuple[int, int]:
        return n * fr * r * d_out, tr * t_out * sum(lengths)

    feature, token = factors(r_h, r_t)
    eff = factors(r_h, r_t) if mode == "cp" else factors(1, 1)
    return {
        "down": down,
        "feature": feature,
        "token": token,
        "total": down + feature + token,
        "effective": down + sum(eff),
        "full_weight": r**n * d_out * t_out * math.prod(lengths),
    }


def init_wander(
    dims: Sequence[int],
    lengths: Sequence[int],
    *,
    rank: int,
    feature_rank: int,
    token_rank: int,
    out_dim: int,
    n_out: int | None = None,
    seed: Seed = None,
    xp: Any = None,
    dtype: Any = None,
    device: Any = None,
    init: str = "trainable",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Any]:
    r"""Wander adapter parameters, ready for ``wander(xs, params)``.

    Parameters
    ----------
    dims, lengths : sequence of int
        Feature sizes d_m and token counts T_m of the M modalities.
    rank : int
        r, the width of the down-projections.
    feature_rank, token_rank : int
        R_h and R_t.
    out_dim : int
        D, the output width (equal to the d_m for ``residual="first"``).
    n_out : int, optional
        T_out, the output token count; default ``rank``, as released.
    seed : None, int, sequence of int, SeedSequence, BitGenerator or Generator, optional
        Source of randomness: ``numpy.random.default_rng(seed)``, so anything it takes (a
        ``SeedSequence``, a bit generator) works too; None draws fresh entropy.  The draw is
        the same in every namespace.
    xp : namespace, optional
        Namespace of the returned arrays (default NumPy), e.g. ``torch``.
    dtype, device : optional
        Of the returned arrays (default: the namespace's default floating dtype).
    init : {"trainable", "parity"}, default "trainable"
        The scheme, see Notes.
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS`` (2**27)
        Refuse (ValueError) parameters with an array of more elements than this, before
        anything is allocated, as :func:`mmfuse.tensor_fusion` refuses its weight.

    Returns
    -------
    dict
        ``{"down": [(W_m (d_m, r), b_m (r,)), ...], "feature": [(R_h, r, D), ...],
        "token": [(R_t, T_m, T_out), ...]}``.

    Raises
    ------
    ValueError
        Non-positive sizes (``max_elements`` included), ``dims`` and ``lengths`` of different
        lengths, unknown ``init``, an array over ``max_elements`` (the message names the
        sizes that make it big), or a negative ``seed``.
    TypeError
        ``dims`` or ``lengths`` not a sequence (a set or dict: no modality order), ``dtype``
        not a real floating dtype of ``xp``, ``xp`` not a namespace, or a ``seed`` that is
        not something ``numpy.random.default_rng`` takes (None, an int, a sequence of ints, a
        ``SeedSequence``, a bit generator or a ``Generator``) or is a bool.

    Notes
    -----
    Both schemes draw the down-projections as PyTorch's ``nn.Linear`` default (the released
    code's), :math:`W_m, b_m \sim U(-1/\sqrt{d_m}, 1/\sqrt{d_m})`.

    ``init="parity"`` reproduces the released code: feature factors :math:`\mathcal N(0, 1)`
    and token factors zero.  Then every modality's term :math:`\Psi_m^\top H_m \Phi_m` is
    zero, and since the output is a product of M >= 2 such terms, the gradient of every
    parameter carries at least one zero factor: every adapter parameter gets exactly zero
    gradient, at every step, and the adapter never trains (it stays the identity, its
    residual).  Kept for comparison with the released code.

    ``init="trainable"`` (default) must give every parameter a non-zero gradient while
    starting close to the identity.  Zeroing only one modality's token factor (the LoRA
    trick) would also train, but favours that modality: the output is multilinear in the M
    terms, so at the first step only the zeroed factor gets a gradient (measured, M = 3: 1
    of 12 parameter arrays); from the second step all do, the others' scaled by how far that
    factor has moved (measured with Adam: the per-modality token-factor gradient norms differ
    15-fold at step 1 and 8-fold at step 2, against 1.3-fold for this scheme; training losses
    matched).  Instead every factor is small and random, with the smallness shared evenly,
    which treats the modalities alike and does not depend on their order:
    feature factors :math:`\mathcal N(0, 1 / (R_h r))` (so :math:`\sum_i \Phi_m[i]` keeps the
    scale of :math:`H_m`) and token factors :math:`\mathcal N(0, s^2 / (R_t T_m))` with
    :math:`s = \varepsilon^{1/M}`, :math:`\varepsilon` = ``TRAINABLE_SCALE`` = 0.1.  In
    ``mode="collapsed"`` each modality's term is then about :math:`s` times the scale of
    :math:`H_m`, the fused term about :math:`\varepsilon \prod_m |H_m|`, a percent or less of
    the residual for standardised inputs, and each gradient is about
    :math:`\varepsilon^{(M-1)/M}` of its natural size: non-zero for every parameter from the
    first step, without favouring one modality.  In ``mode="cp"`` the :math:`R_h R_t` rank
    pairs are multiplied across modalities before they are summed, so the fused term starts
    smaller, about :math:`\varepsilon (R_h R_t)^{-(M-1)/2} \prod_m |H_m|` (measured: 0.001
    of :math:`\prod_m |H_m|` at M = 3, R_h = 8, R_t = 12), and the gradients shrink with it;
    still non-zero for every parameter.  (The initialiser does not take the mode.)

    Examples
    --------
    >>> import mmfuse
    >>> p = mmfuse.init_wander([40, 40], [50, 20], rank=16, feature_rank=8, token_rank=12,
    ...                        out_dim=40, seed=0)
    >>> [w.shape for w, b in p["down"]], [f.shape for f in p["feature"]]
    ([(40, 16), (40, 16)], [(8, 16, 40), (8, 16, 40)])
    >>> [t.shape for t in p["token"]]
    [(12, 50, 16), (12, 20, 16)]
    """
    if init not in ("trainable", "parity"):
        raise ValueError(f"init must be 'trainable' or 'parity', got {init!r}")
    dims, lengths, s = _check_sizes(
        dims, lengths, rank=rank, feature_rank=feature_rank, token_rank=token_rank,
        out_dim=out_dim, n_out=rank if n_out is None else n_out,
    )  # fmt: skip
    r, r_h, r_t, d_out, t_out = s["rank"], s["feature_rank"], s["token_rank"], s["out_dim"], s["n_out"]
    max_elements = check_positive_int("max_elements", max_elements)
    check_allocations("init_wander", wander_planned(dims, lengths, s), max_elements)
    space = array_namespace(np.empty(0)) if xp is None else check_namespace(xp)
    dtype = check_floating_dtype(space, dtype, device)  # before drawing: a refusal leaves a Generator alone
    n = len(dims)
    rng = random_generator(seed)
    down = []
    for d in dims:
        bound = 1.0 / math.sqrt(d)
        down.append((rng.uniform(-bound, bound, (d, r)), rng.uniform(-bound, bound, r)))
    if init == "parity":
        feature = [rng.standard_normal((r_h, r, d_out)) for _ in dims]
        token = [np.zeros((r_t, t, t_out)) for t in lengths]
    else:
        shrink = TRAINABLE_SCALE ** (1.0 / n)
        feature = [rng.standard_normal((r_h, r, d_out)) / math.sqrt(r_h * r) for _ in dims]
        token = [rng.standard_normal((r_t, t, t_out)) * (shrink / math.sqrt(r_t * t)) for t in lengths]

    def put(a: np.ndarray) -> Any:
        return from_numpy(a, space, dtype=dtype, device=device)

    return {
        "down": [(put(w), put(b)) for w, b in down],
        "feature": [put(f) for f in feature],
        "token": [put(t) for t in token],
    }
