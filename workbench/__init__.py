"""Representation Workbench: load models, extract layer activations, compare representations.

    from workbench import load_dataset, load_model, extract
    data = load_dataset("digits")
    acts = extract(load_model("sample_models/mlp_seed0.safetensors"), data, layers=["fc1", "fc2"])
"""

from workbench.activations import Activations, extract, layer_info, list_layers
from workbench.data import Dataset, load_dataset
from workbench.errors import WorkbenchError
from workbench.models import LoadedModel, load_model

__version__ = "0.1.0"

__all__ = ["Activations", "Dataset", "LoadedModel", "WorkbenchError", "extract", "layer_info", "list_layers",
           "load_dataset", "load_model"]
