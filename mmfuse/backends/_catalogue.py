"""The catalogue of mmfuse's operators: each operator's name and public signature.

A leaf module (it imports nothing from mmfuse): backends and the registry read it, never the
public layer.  A signature is the public function's parameters less ``backend=``, as
``(name, kind)`` pairs, which every implementation of the operator must have exactly (the
registry checks registered functions against it; ``tests/test_dispatch.py`` checks the public
functions).
"""

from __future__ import annotations

from inspect import Parameter
from typing import Any

__all__ = ["OPERATORS", "Signature"]

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
