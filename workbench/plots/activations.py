"""Figures for per-layer activation statistics."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analyses.stats import ActivationStatsResult
from workbench.plots._style import MODEL_COLORS, titled


def stats_rows(result: ActivationStatsResult) -> list[dict[str, object]]:
    """One table row per layer."""
    return [
        {"model": result.model, "layer": s.layer, "features": s.n_features, "mean": s.mean, "std": s.std,
         "min": s.min, "max": s.max, "dead units": s.dead_fraction, "constant units": s.constant_fraction,
         "zeros": s.sparsity}
        for s in result.stats.values()
    ]


def layer_histograms(*results: ActivationStatsResult, max_cols: int = 3) -> go.Figure:
    """A histogram of activation values per layer; one colour per model, overlaid where layer names match."""
    layers: list[str] = []
    for r in results:
        layers += [layer for layer in r.layers if layer not in layers]
    cols = min(max_cols, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers)
    for i, r in enumerate(results):
        for j, layer in enumerate(layers):
            if layer not in r.stats:
                continue
            s = r.stats[layer]
            centres = (s.hist_edges[:-1] + s.hist_edges[1:]) / 2
            fig.add_trace(
                go.Bar(x=centres, y=s.hist_counts, name=r.model, legendgroup=r.model, showlegend=j == 0,
                       marker_color=MODEL_COLORS[i % len(MODEL_COLORS)], opacity=0.6,
                       hovertemplate=f"{r.model} · {layer}<br>value %{{x:.3g}}<br>count %{{y}}<extra></extra>"),
                row=j // cols + 1, col=j % cols + 1,
            )
    fig.update_layout(barmode="overlay", height=260 * rows, bargap=0)
    n = results[0].n_samples if results else None
    return titled(fig, "Activation values per layer", estimator="histogram of all units × samples", n=n)
