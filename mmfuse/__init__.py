"""mmfuse: multimodal fusion operators over the Python Array API.

CP outer-product fusion (TFN, LMF, CP in TensorLy's layout) and, in later modules,
token-level sequence fusion and Zoom-and-Shift alignment, as pure functions whose output stays
in the inputs' namespace, dtype and device.
"""

from ._config import config_context, get_config, set_config
from ._fusion import (
    DEFAULT_MAX_ELEMENTS,
    cp_fusion,
    cp_to_lowrank,
    init_lowrank,
    lowrank_fusion,
    lowrank_to_tensor,
    tensor_fusion,
)

# sequence exports (issue 3)
# align exports (issue 4)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "__version__",
    "config_context",
    "cp_fusion",
    "cp_to_lowrank",
    "get_config",
    "init_lowrank",
    "lowrank_fusion",
    "lowrank_to_tensor",
    "set_config",
    "tensor_fusion",
]
