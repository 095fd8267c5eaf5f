"""The NumPy reference implementations: literal, float64, the oracle for tests and ``verify``.

Each function has the public signature without ``backend=``, reads like its paper's equations
(loops, explicit outer-product tensors) and imports nothing from the rest of mmfuse.
"""

from .fusion import (
    cp_fusion,
    cp_to_lowrank,
    cp_to_tensor,
    lowrank_fusion,
    lowrank_to_tensor,
    tensor_fusion,
)

# sequence exports (issue 3)
# align exports (issue 4)

__all__ = [
    "cp_fusion",
    "cp_to_lowrank",
    "cp_to_tensor",
    "lowrank_fusion",
    "lowrank_to_tensor",
    "tensor_fusion",
]
