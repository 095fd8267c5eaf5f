"""mmfuse: multimodal fusion operators over the Python Array API.

CP outer-product fusion (TFN, LMF, CP in TensorLy's layout) with its interaction terms by
modality subset, token-level sequence fusion and the Wander adapter, and Zoom-and-Shift
alignment, as pure functions whose output stays in the inputs' namespace, dtype and device.
"""

from ._align import align, moments, shift, zoom, zoom_shift, zoom_shift_fusion
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
from ._interactions import cp_interactions, interaction_shares, lowrank_interactions, tensor_interactions
from ._sequence import init_wander, sequence_fusion, wander, wander_parameter_count

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "__version__",
    "align",
    "config_context",
    "cp_fusion",
    "cp_interactions",
    "cp_to_lowrank",
    "get_config",
    "init_lowrank",
    "init_wander",
    "interaction_shares",
    "lowrank_fusion",
    "lowrank_interactions",
    "lowrank_to_tensor",
    "moments",
    "sequence_fusion",
    "set_config",
    "shift",
    "tensor_fusion",
    "tensor_interactions",
    "wander",
    "wander_parameter_count",
    "zoom",
    "zoom_shift",
    "zoom_shift_fusion",
]

# Subpackages by attribute (``mmfuse.reference.lowrank_fusion(...)`` after ``import mmfuse``),
# imported on first access, so that ``import mmfuse`` stays light: ``mmfuse.nn`` imports torch
_SUBMODULES = frozenset({"backends", "datasets", "nn", "reference", "testing"})


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
