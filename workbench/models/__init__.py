from pathlib import Path

from workbench.models.architectures import ARCHITECTURES, build_model
from workbench.models.loading import LoadedModel, as_loaded_model, eval_mode, load_model, wrap_module

SAMPLE_MODELS = Path(__file__).resolve().parents[2] / "sample_models"  # the bundled checkpoints of a source checkout

__all__ = ["ARCHITECTURES", "SAMPLE_MODELS", "LoadedModel", "as_loaded_model", "build_model", "eval_mode", "load_model",
           "wrap_module"]
