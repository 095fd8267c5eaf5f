"""The NumPy reference implementations: literal, float64, the oracle for tests and ``verify``.

Each function has the public signature without ``backend=``, reads like its paper's equations
(loops, explicit outer-product tensors) and imports nothing from the rest of mmfuse.
"""

from .align import align, moments, shift, zoom, zoom_shift, zoom_shift_fusion
from .fusion import (
    cp_fusion,
    cp_to_lowrank,
    cp_to_tensor,
    lowrank_fusion,
    lowrank_to_tensor,
    tensor_fusion,
)
from .interactions import (
    cp_interactions,
    interaction_shares,
    lowrank_interactions,
    subset_labels,
    tensor_interactions,
)
from .sequence import (
    feature_weight,
    gelu,
    sequence_fusion,
    sequence_weight,
    token_weight,
    wander,
)

__all__ = [
    "align",
    "cp_fusion",
    "cp_interactions",
    "cp_to_lowrank",
    "cp_to_tensor",
    "feature_weight",
    "gelu",
    "interaction_shares",
    "lowrank_fusion",
    "lowrank_interactions",
    "lowrank_to_tensor",
    "moments",
    "sequence_fusion",
    "sequence_weight",
    "shift",
    "subset_labels",
    "tensor_fusion",
    "tensor_interactions",
    "token_weight",
    "wander",
    "zoom",
    "zoom_shift",
    "zoom_shift_fusion",
]
