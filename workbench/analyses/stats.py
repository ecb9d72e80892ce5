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
from workbench.errors import DataError, ParameterError


@dataclass(frozen=True)
class LayerStats(Result):
    """Statistics of one layer's activations ``(n_samples, n_features)``.

    ``dead_fraction``: fraction of units that are exactly zero on every sample (a dead ReLU).
    ``constant_fraction``: fraction of units with zero variance over samples (dead, saturated
    or always the same value; a std within 1e-12 of the unit's largest ``|value|`` counts as zero, at
    any scale). ``mean`` and ``std`` are over all values, in float64 (in range up to the largest float64).
    ``hist_counts``/``hist_edges``: histogram of all values, on equal bins from ``min`` to ``max`` (or over a
    given range, such as one shared with another model's layer, so that the heights compare bin for bin).
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


def _check_range(value_range: object, layer: str, func: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        lo, hi = math.nan, math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ParameterError(f"{func}: the histogram range of layer '{layer}' must be two finite numbers (low, high) with "
                             f"low < high; got {value_range!r}.")
    return lo, hi


def layer_stats(x: torch.Tensor | np.ndarray, layer: str = "layer", *, bins: int = 50,
                value_range: tuple[float, float] | None = None, device: str | torch.device | None = None) -> LayerStats:
    """Statistics of one activation matrix ``x: (n_samples, n_features)``; ``bins`` histogram bins (5–500) from the
    smallest value to the largest, or over ``value_range`` ``(low, high)``, which must hold every value."""
    func = "layer_stats"
    bins = check_int(bins, "bins", func=func, low=5, high=500)
    if value_range is not None:
        value_range = _check_range(value_range, layer, func)
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
    if value_range is not None:
        if lo < value_range[0] or hi > value_range[1]:
            raise ParameterError(
                f"{func}: layer '{layer}' has values from {lo:.6g} to {hi:.6g}, outside the histogram range "
                f"({value_range[0]:.6g}, {value_range[1]:.6g}), which would leave them out; widen the range to hold them.")
        lo, hi = value_range
    elif hi == lo:
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


def shared_value_ranges(*acts: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """The ``(low, high)`` range holding every value of each layer that all of ``acts`` have with the same width
    (two seeds of one architecture): histograms of those layers on these ranges share their bins, so that a
    spike (a ReLU's zeros) has the same height for the same share of values in each model. Layers with
    non-finite or all-equal values are left out (each keeps its own bins)."""
    for i, a in enumerate(acts):
        if not isinstance(a, Mapping):
            raise DataError(f"shared_value_ranges takes one Activations (or dict of layer name -> (n_samples, n_features) "
                            f"array) per model; argument {i + 1} is a {type(a).__name__}. Pass extract(...) results.")
    if len(acts) < 2:
        return {}
    ranges: dict[str, tuple[float, float]] = {}
    first, *others = acts
    for layer in first:
        tensors = [torch.as_tensor(np.asarray(a[layer])) if not isinstance(a[layer], torch.Tensor) else a[layer]
                   for a in acts if layer in a]
        if len(tensors) != len(acts) or any(t.ndim != 2 or t.shape[1] != tensors[0].shape[1] or not t.numel() for t in tensors):
            continue
        lo, hi = min(float(t.min()) for t in tensors), max(float(t.max()) for t in tensors)
        if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            ranges[layer] = (lo, hi)
    return ranges


def activation_stats(acts: Mapping[str, torch.Tensor], *, bins: int = 50,
                     value_ranges: Mapping[str, tuple[float, float]] | None = None,
                     device: str | torch.device | None = None, model: str | None = None,
                     dataset: str | None = None) -> ActivationStatsResult:
    """:func:`layer_stats` for every layer of an :class:`~workbench.activations.Activations` (or any mapping of
    layer name -> ``(n_samples, n_features)`` array); ``bins`` histogram bins per layer, over ``value_ranges[layer]``
    where given (:func:`shared_value_ranges` of two models gives both the same bins); ``model`` and ``dataset`` name
    them in the result (default: the names the activations carry)."""
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
    if value_ranges is not None and not isinstance(value_ranges, Mapping):
        raise ParameterError(f"activation_stats: 'value_ranges' maps layer names to (low, high); got {type(value_ranges).__name__}.")
    ranges = dict(value_ranges or {})
    unknown = [k for k in ranges if k not in acts]
    if unknown:
        raise ParameterError(f"activation_stats: 'value_ranges' names layer(s) {unknown} that the activations do not hold; "
                             f"they hold {list(acts)}.")
    stats = {layer: layer_stats(acts[layer], layer, bins=bins, value_range=ranges.get(layer), device=device) for layer in acts}
    n = next(iter(stats.values())).n_samples
    for layer, st in stats.items():
        if st.n_samples != n:
            raise DataError(f"activation_stats: layer '{layer}' has {st.n_samples} samples but the first layer has {n}; "
                            "extract all layers on the same dataset.")
    return ActivationStatsResult(
        layers=list(stats), stats=stats, model=model if model is not None else getattr(acts, "model_name", ""),
        dataset=dataset if dataset is not None else getattr(acts, "dataset_name", ""), n_samples=n,
        params={"bins": bins, **({"value_ranges": ranges} if ranges else {})}, device=str(float64_device(resolve_device(device))), seconds=time.perf_counter() - started,
    )
