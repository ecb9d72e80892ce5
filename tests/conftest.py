"""Shared fixtures: bundled sample models, the digits dataset, an isolated activation cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = ROOT / "sample_models"

torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))


@pytest.fixture(scope="session")
def _cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("activation-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes activations to a session-wide temporary cache, never to ~/.cache."""
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(_cache_root))
    return _cache_root


@pytest.fixture(scope="session")
def sample_model_path() -> Callable[[str], Path]:
    """``sample_model_path("mlp_seed0")`` -> path of a bundled checkpoint."""

    def get(name: str) -> Path:
        path = SAMPLE_MODELS / f"{name}.safetensors"
        if not path.exists():
            path = SAMPLE_MODELS / "snapshots" / f"{name}.safetensors"
        assert path.exists(), f"no bundled model {name}"
        return path

    return get


@pytest.fixture(scope="session")
def sample_model(sample_model_path: Callable[[str], Path]):
    """``sample_model("mlp_seed0")`` -> LoadedModel (loaded once per session and name)."""
    from workbench import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(sample_model_path(name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def digits_test():
    from workbench import load_dataset

    return load_dataset("digits", split="test")


@pytest.fixture(scope="session")
def digits_train():
    from workbench import load_dataset

    return load_dataset("digits", split="train")
