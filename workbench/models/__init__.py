from workbench.models.architectures import ARCHITECTURES, build_model
from workbench.models.loading import LoadedModel, as_loaded_model, eval_mode, load_model, wrap_module

__all__ = ["ARCHITECTURES", "LoadedModel", "as_loaded_model", "build_model", "eval_mode", "load_model", "wrap_module"]
