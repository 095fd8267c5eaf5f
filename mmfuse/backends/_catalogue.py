"""The catalogue of mmfuse's operators: each operator's name and public signature.

A leaf module (it imports nothing from mmfuse): backends and the registry read it, never the
public layer.  A signature is the public function's parameters less ``backend=``, as
``(name, kind)`` pairs, which every implementation of the operator must have exactly (the
registry checks registered functions against it; ``tests/test_dispatch.py`` checks the public
functions).
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import Parameter
from typing import Any

__all__ = ["CALL_SIZES", "OPERATORS", "Signature", "cp_pair"]

Signature = tuple[tuple[str, Any], ...]  # (name, inspect.Parameter kind)

_POS = Parameter.POSITIONAL_OR_KEYWORD
_KW = Parameter.KEYWORD_ONLY


def _sig(positional: str, keywords: str = "") -> Signature:
    return tuple((n, _POS) for n in positional.split()) + tuple((n, _KW) for n in keywords.split())


#: operator name -> public signature (without ``backend``)
OPERATORS: dict[str, Signature] = {
    "tensor_fusion": _sig("xs weight bias", "append_one max_elements"),
    "lowrank_fusion": _sig("xs factors weights bias", "append_one present"),
    "cp_fusion": _sig("xs cp bias", "append_one present"),
    "sequence_fusion": _sig("hs feature_factors token_factors", "mode masks"),
    "wander": _sig("xs params", "mode masks activation residual"),
    "moments": _sig("x", "axis mask eps"),
    "zoom_shift": _sig("x guide", "alpha axis mask guide_mask eps"),
    "align": _sig("xs", "rounds alpha schedule topology hub axis masks eps"),
    "tensor_interactions": _sig("xs weight", "by append_one max_elements"),
    "lowrank_interactions": _sig("xs factors weights", "by present append_one max_elements"),
    "cp_interactions": _sig("xs cp", "by present append_one max_elements"),
}


def _recursion_products(xs: Any, width: int) -> int:
    """M^2 B width for the M arrays ``xs`` (B, d_m); 0 for an unknown (Dask) batch size."""
    if not isinstance(xs, (list, tuple)):  # (explain's arrays may be any of the call's)
        raise TypeError("xs: not the call's list of arrays")
    n, batch = len(xs), xs[0].shape[0]
    return n * n * batch * width if isinstance(batch, int) else 0


def _lowrank_interactions_size(xs: Any, factors: Any, *rest: Any) -> int:
    r, _, h = factors[0].shape  # (R, d_m + 1, h)
    return _recursion_products(xs, r * h)


def _cp_interactions_size(xs: Any, cp: Any, *rest: Any) -> int:
    return _recursion_products(xs, cp[1][-1].shape[1])  # cp = (weights, factors), C (h, R)


#: operator -> the size "auto" weighs its call by (the rows' ``import_at``), from the public
#: call's leading arguments, for the operators whose first array's element count does not
#: measure their work: the interaction terms, by their order recursion's products, M^2 B (R h)
#: for LMF and M^2 B R for CP, which is what a compiled recursion saves on.  The public
#: functions pass it to ``choose`` (``lookup``'s twin for a call about to run), and ``explain``
#: computes it from the arrays it is given.  Only calls that run the recursion
#: (:func:`mmfuse._core.interactions.runs_recursion`) are weighed so; the others pass 0.
CALL_SIZES: dict[str, Callable[..., int]] = {
    "lowrank_interactions": _lowrank_interactions_size,
    "cp_interactions": _cp_interactions_size,
}


def cp_pair(cp: Any) -> tuple[Any, Any] | None:
    """The ``cp`` argument's (weights, factors) without checks (a TensorLy ``CPTensor``'s or
    a pair's), or None."""
    if type(cp) is tuple or type(cp) is list:
        return (cp[0], cp[1]) if len(cp) == 2 else None
    if hasattr(cp, "weights") and hasattr(cp, "factors"):
        return (cp.weights, cp.factors)
    return None
