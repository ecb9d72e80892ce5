from workbench.activations.capture import POOLINGS, pool
from workbench.activations.extract import (
    LayerInfo,
    check_layers,
    default_cache_dir,
    extract,
    layer_info,
    list_layers,
    tree_order,
)
from workbench.activations.types import Activations

__all__ = ["POOLINGS", "Activations", "LayerInfo", "check_layers", "default_cache_dir", "extract", "layer_info", "list_layers", "pool",
           "tree_order"]
