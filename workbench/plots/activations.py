"""Figures for per-layer activation statistics."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analyses.stats import ActivationStatsResult
from workbench.plots._style import MODEL_COLORS, keeps_order, merged_order, takes_results, titled


@takes_results
def stats_rows(result: ActivationStatsResult) -> list[dict[str, object]]:
    """One table row per layer."""
    return [
        {"model": result.model, "layer": s.layer, "features": s.n_features, "mean": s.mean, "std (all values)": s.std,
         "min": s.min, "max": s.max, "dead units": s.dead_fraction, "constant units": s.constant_fraction,
         "zeros": s.sparsity}
        for s in result.stats.values()
    ]


def _translucent(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[k:k + 2], 16) for k in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


@takes_results
def layer_histograms(*results: ActivationStatsResult, max_cols: int = 3) -> go.Figure:
    """A histogram of activation values per layer, drawn as an outlined step curve with a light fill, one
    colour per model, overlaid where the layers correspond (so a second model never hides the first). Heights
    are densities (count / (total x bin width)), comparable across models on their own bins; on shared bins
    (:func:`~workbench.analyses.stats.shared_value_ranges`) a spike such as a ReLU's zeros also has the same height for
    the same share of values, which on bins of different widths it has not.

    Layers correspond when the models list the layers they share in the same order and each shared name has
    one width (``n_features``) in every model: two seeds of one architecture, also with different layers picked.
    Otherwise each model's layer gets its own panel, titled "<model> · <layer>": a CNN's ``fc1`` (64 units)
    and an MLP's ``fc1`` (512) share a name, not a place in the network."""
    union = merged_order(*(r.layers for r in results))
    widths: dict[str, set[int]] = {}
    for r in results:
        for layer in r.layers:
            widths.setdefault(layer, set()).add(r.stats[layer].n_features)
    if all(keeps_order(union, r.layers) for r in results) and all(len(w) == 1 for w in widths.values()):
        panels = [(layer, [(i, layer) for i, r in enumerate(results) if layer in r.stats]) for layer in union]
    else:
        panels = [(f"{r.model} · {layer}", [(i, layer)]) for i, r in enumerate(results) for layer in r.layers]
    layers = [title for title, _ in panels]
    cols = min(max_cols, len(layers))
    rows = (len(layers) + cols - 1) // cols
    # an x axis title between two rows: a panel is the lowest of its column above an empty slot of the last row
    titled_gap = rows > 1 and len(layers) % cols != 0
    spacing, plot_height = row_spacing(rows, axis_title_between=titled_gap)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers, vertical_spacing=spacing)
    in_legend: set[int] = set()
    top: dict[int, float] = {}  # the highest density of each panel
    for j, (_, members) in enumerate(panels):
        for i, layer in members:
            r = results[i]
            colour = MODEL_COLORS[i % len(MODEL_COLORS)]
            s = r.stats[layer]
            edges = np.asarray(s.hist_edges, dtype=np.float64)
            counts = np.asarray(s.hist_counts, dtype=np.float64)
            density = counts / max(counts.sum(), 1.0) / np.maximum(np.diff(edges), np.finfo(np.float64).tiny)
            # steps from each bin's left edge to its right one, so the first and last bins (a ReLU's zeros) are drawn
            # whole; the last point closes the last bin
            per_bin = np.column_stack([edges[:-1], edges[1:], counts])
            fig.add_trace(
                go.Scatter(x=edges, y=np.append(density, density[-1]), customdata=np.vstack([per_bin, per_bin[-1:]]),
                           name=r.model, legendgroup=r.model,
                           showlegend=i not in in_legend,  # each model once, at its first panel
                           mode="lines", line={"color": colour, "width": 1.5, "shape": "hv"}, fill="tozeroy",
                           fillcolor=_translucent(colour, 0.25),
                           hovertemplate=f"{r.model} · {layer}<br>values %{{customdata[0]:.3g}} to %{{customdata[1]:.3g}}<br>"
                                         "density %{y:.3g} (count %{customdata[2]:,d})<extra></extra>"),
                row=j // cols + 1, col=j % cols + 1,
            )
            top[j] = max(top.get(j, 0.0), float(density.max(initial=0.0)))
            in_legend.add(i)
    for j in range(len(layers)):
        row, col = j // cols + 1, j % cols + 1
        if j + cols >= len(layers):  # the lowest panel of its column
            fig.update_xaxes(title_text="activation value", row=row, col=col)
        if col == 1:
            fig.update_yaxes(title_text="density", row=row, col=col)
        if top.get(j, 0.0) > 0:  # room above the highest bin, so a spike does not touch the panel's top
            fig.update_yaxes(range=[0, 1.08 * top[j]], row=row, col=col)
    n = results[0].n_samples if results else None
    fig.update_layout(margin={"b": BOTTOM_MARGIN})
    overlaid = [[results[i].stats[layer].hist_edges for i, layer in members] for _, members in panels if len(members) > 1]
    shared = [all(np.array_equal(e, edges[0]) for e in edges) for edges in overlaid]
    bins = ("" if not overlaid else ", models on shared bins" if all(shared) else
            ", each model on its own bins" if not any(shared) else ", models on shared bins where the ranges were shared")
    titled(fig, "Activation values per layer", estimator=f"density of all units × samples{bins}", n=n)
    # the height is set once the top margin is known, so the gaps between rows come out at their size in pixels
    fig.update_layout(height=plot_height + fig.layout.margin.t + BOTTOM_MARGIN)
    return fig


PANEL_HEIGHT = 200  # pixels of one histogram panel
ROW_GAP = 56  # pixels between rows: the upper panel's tick labels, then the lower panel's title
AXIS_TITLE_GAP = 22  # pixels more where an x axis title sits between two rows
BOTTOM_MARGIN = 70  # pixels below the plot area: the lowest tick labels and the x axis title


def row_spacing(rows: int, *, axis_title_between: bool = False) -> tuple[float, int]:
    """``make_subplots``' ``vertical_spacing`` (a fraction of the plot area's height) and the plot area's height
    in pixels for ``rows`` rows of :data:`PANEL_HEIGHT` pixels: the gap stays :data:`ROW_GAP` pixels (plus
    :data:`AXIS_TITLE_GAP` with ``axis_title_between``) however many rows there are."""
    gap = ROW_GAP + (AXIS_TITLE_GAP if axis_title_between else 0)
    height = rows * PANEL_HEIGHT + (rows - 1) * gap
    return (gap / height if rows > 1 else 0.0), height
