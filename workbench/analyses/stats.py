"""Per-layer activation statistics: shape, mean, std, dead units, value histogram."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from workbench.analyses._result import Result
from workbench.analyses._validation import as_matrix, check_int, unit_scale
from workbench.device import float64_device, resolve_device
from workbench.errors import DataError


@dataclass(frozen=True)
class LayerStats(Result):
    """Statistics of one layer's activations ``(n_samples, n_features)``.

    ``dead_fraction``: fraction of units that are exactly zero on every sample (a dead ReLU).
    ``constant_fraction``: fraction of units with zero variance over samples (dead, saturated
    or always the same value; a std within 1e-12 of the unit's largest ``|value|`` counts as zero, at
    any scale). ``mean`` and ``std`` are over all values, in float64 (in range up to the largest float64).
    ``hist_counts``/``hist_edges``: histogram of all values.
    """

    layer: str
    n_samples: int
    n_features: int
    mean: float
    std: float
    min: float
    max: float
    dead_fraction: float
    constant_fraction: float
    sparsity: float
    hist_counts: np.ndarray
    hist_edges: np.ndarray


@dataclass(frozen=True)
class ActivationStatsResult(Result):
    """Statistics for every layer of one model's activations."""

    layers: list[str]
    stats: dict[str, LayerStats]
    model: str
    dataset: str
    n_samples: int
    estimator: str = "per-unit statistics over samples, float64"
    params: dict = field(default_factory=dict)
    seed: int | None = None
    device: str = "cpu"
    dtype: str = "float64"
    seconds: float = 0.0

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for layer, s in self.stats.items():
            out.update(s.arrays(prefix=f"{prefix}{layer}/"))
        return out


def layer_stats(x: torch.Tensor | np.ndarray, layer: str = "layer", *, bins: int = 50,
                device: str | torch.device | None = None) -> LayerStats:
    """Statistics of one activation matrix ``x: (n_samples, n_features)``; ``bins`` histogram bins (5–500)."""
    func = "layer_stats"
    bins = check_int(bins, "bins", func=func, low=5, high=500)
    dev = float64_device(resolve_device(device))
    t = as_matrix(x, layer, func=func, device=dev, min_samples=1)
    n, d = t.shape
    scale = unit_scale(t)  # a power of two: sums of values near 1e308 stay in range, and the statistics stay exact
    scaled = t * scale
    col_max = t.abs().amax(0)
    # each unit scaled to its own magnitude, so "constant" means no variation relative to its values at any scale
    own = torch.where(col_max > 0, col_max, 1.0)
    col_std = (t / own).std(0, correction=0)
    constant = (t == t[:1]).all(0) | (col_std <= 1e-12)
    lo, hi = float(t.min()), float(t.max())
    if hi == lo:
        hi = lo + 1.0 if lo + 1.0 != lo else lo + abs(lo) * 2.0**-20
        if math.isinf(hi):
            lo, hi = lo - abs(lo) * 2.0**-20, lo
    counts = torch.histc(scaled.cpu(), bins=bins, min=lo * scale, max=hi * scale)  # float64: float32 would overflow past 3.4e38
    return LayerStats(
        layer=layer, n_samples=n, n_features=d, mean=float(scaled.mean()) / scale,
        std=float(scaled.std(correction=0)) / scale, min=float(t.min()), max=float(t.max()),
        dead_fraction=float((col_max == 0).double().mean()),
        constant_fraction=float(constant.double().mean()),
        sparsity=float((t == 0).double().mean()),
        hist_counts=counts.numpy().astype(np.int64), hist_edges=np.linspace(lo * scale, hi * scale, bins + 1) / scale,
    )


def activation_stats(acts: Mapping[str, torch.Tensor], *, bins: int = 50, device: str | torch.device | None = None,
                     model: str | None = None, dataset: str | None = None) -> ActivationStatsResult:
    """:func:`layer_stats` for every layer of an :class:`~workbench.activations.Activations` (or any mapping of
    layer name -> ``(n_samples, n_features)`` array); ``bins`` histogram bins per layer; ``model`` and
    ``dataset`` name them in the result (default: the names the activations carry)."""
    if not isinstance(acts, Mapping):
        raise DataError(
            f"activation_stats takes Activations or a dict of layer name -> (n_samples, n_features) array; got "
            f"{type(acts).__name__}. Extract activations first (extract(model, dataset, layers)), or wrap one array: "
            "{'layer': x}."
        )
    if not acts:
        raise DataError("activation_stats got no layers; pass activations of at least one layer, such as "
                        "extract(model, dataset, ['fc1']).")
    started = time.perf_counter()
    stats = {layer: layer_stats(acts[layer], layer, bins=bins, device=device) for layer in acts}
    n = next(iter(stats.values())).n_samples
    for layer, st in stats.items():
        if st.n_samples != n:
            raise DataError(f"activation_stats: layer '{layer}' has {st.n_samples} samples but the first layer has {n}; "
                            "extract all layers on the same dataset.")
    return ActivationStatsResult(
        layers=list(stats), stats=stats, model=model if model is not None else getattr(acts, "model_name", ""),
        dataset=dataset if dataset is not None else getattr(acts, "dataset_name", ""), n_samples=n,
        params={"bins": bins}, device=str(float64_device(resolve_device(device))), seconds=time.perf_counter() - started,
    )
