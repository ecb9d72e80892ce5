"""Figures for embeddings (scatter with linked selection) and intrinsic dimension profiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from workbench.analyses.embedding import AlignedEmbeddingResult, EmbeddingResult, LayerIntrinsicDimensionResult
from workbench.errors import ParameterError
from workbench.plots._style import CATEGORY_COLORS, MODEL_COLORS, category_color, order_layers, takes_results, titled

WEBGL_ABOVE = 5000


@takes_results
def embedding_scatter(
    result: EmbeddingResult | AlignedEmbeddingResult,
    *,
    view: int = 0,
    color: Any = None,
    color_name: str = "label",
    categorical: bool | None = None,
    labels: Any = None,
    selected: Any = None,
    title: str | None = None,
) -> go.Figure:
    """Scatter of one view's coordinates; hover shows the sample index, its label and its colour value.

    ``color``: ``(n_samples,)`` labels (one trace and legend entry per class) or scalars (one trace
    with a colour bar); ``categorical`` forces the choice (default: integer, bool and string values
    with at most 20 distinct values are categories). ``selected``: sample indices to highlight; the
    others are faded (plotly's ``selectedpoints``). ``labels``: ``(n_samples,)`` shown on hover next to
    the colour value (default: the colour value only). Every point carries
    ``customdata = [index, value, label]``, so a box or lasso selection returns sample indices.
    3-D views are drawn with ``Scatter3d``. Every axis spans :func:`shared_range`, the same for all views of
    an aligned result and for x and y, so the panels of two views read as one frame (a sample's position in
    one panel is comparable with its position in the other) at equal aspect.
    """
    coords, name, trust, k = _view(result, view)
    frame = shared_range(result)
    n = coords.shape[0]
    for what, given in (("color", color), ("labels", labels)):
        if given is not None and np.shape(given) != (n,):
            raise ParameterError(
                f"embedding_scatter: '{what}' must give one value per sample, shape ({n},); got shape {np.shape(given)}."
            )
    if selected is not None and len(selected) and not (0 <= np.min(selected) and np.max(selected) < n):
        raise ParameterError(f"embedding_scatter: 'selected' must hold sample indices in [0, {n - 1}].")
    values = np.zeros(n) if color is None else np.asarray(color)
    if categorical is None:
        categorical = color is None or (
            values.dtype.kind in "biuUSO" and len(np.unique(values)) <= len(CATEGORY_COLORS)
        )
    names = None if labels is None else np.asarray(labels)
    chosen = None if selected is None else np.zeros(n, dtype=bool)
    if chosen is not None:
        chosen[np.asarray(selected, dtype=np.int64)] = True
    fig = go.Figure()
    index = np.arange(n)
    if categorical:
        for j, value in enumerate(np.unique(values)):
            rows = index[values == value]
            label = color_name if color is None else f"{color_name} {value}"
            fig.add_trace(
                _trace(coords, rows, values, names, j, label, color_name, chosen, show_legend=color is not None)
            )
    else:
        fig.add_trace(
            _trace(coords, index, values.astype(float), names, None, color_name, color_name, chosen, show_legend=False)
        )
    method = METHOD_NAMES.get(result.method, result.method)
    # a later view of an aligned result is rotated onto the first: its axes are the first view's, not its own components
    frame_of = f" (frame of {result.names[0]})" if isinstance(result, AlignedEmbeddingResult) and view > 0 else ""
    if coords.shape[1] < 3:
        fig.update_layout(
            xaxis_title=f"{method} 1{frame_of}",
            yaxis_title=f"{method} 2{frame_of}" if coords.shape[1] > 1 else "",
            dragmode="lasso",
            legend={"itemsizing": "constant"},
        )
        fig.update_xaxes(range=frame)
        fig.update_yaxes(range=frame, scaleanchor="x", scaleratio=1)
    else:
        fig.update_layout(scene={"xaxis": {"range": frame}, "yaxis": {"range": frame}, "zaxis": {"range": frame},
                                 "aspectmode": "cube"})
    heading = title or name or f"{result.method.upper()} view"
    return titled(fig, heading, estimator=f"{result.estimator}; trustworthiness@{k} {trust:.3f}", n=n)


@takes_results
def intrinsic_dimension_profile(
    *results: LayerIntrinsicDimensionResult, names: Sequence[str] | None = None
) -> go.Figure:
    """Intrinsic dimension per layer with its 95% interval, one line per model; the layer names are slanted, so
    long ones stay apart."""
    fig = go.Figure()
    for i, result in enumerate(results):
        name = names[i] if names is not None else (result.model_name or f"model {i + 1}")
        fig.add_trace(
            go.Scatter(
                x=list(result.layers),
                y=result.dimension,
                mode="lines+markers",
                name=str(name),
                line={"color": MODEL_COLORS[i % len(MODEL_COLORS)]},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": result.ci_high - result.dimension,
                    "arrayminus": result.dimension - result.ci_low,
                    "visible": True,
                },
                customdata=np.stack([result.ci_low, result.ci_high, result.n_features], axis=1),
                hovertemplate=f"{name} · %{{x}}<br>dimension %{{y:.2f}} [%{{customdata[0]:.2f}}, %{{customdata[1]:.2f}}]"
                "<br>%{customdata[2]} features<extra></extra>",
            )
        )
    fig.update_layout(xaxis_title="layer", yaxis_title="intrinsic dimension", yaxis_rangemode="tozero")
    fig.update_xaxes(tickangle=-45, automargin=True)  # long layer names side by side would run together
    labels = [str(names[i]) if names is not None else (r.model_name or f"model {i + 1}") for i, r in enumerate(results)]
    order_layers(fig, *(r.layers for r in results), labels=labels, merge=False)
    if not results:
        return titled(fig, "Intrinsic dimension across layers")
    return titled(fig, "Intrinsic dimension across layers", estimator=results[0].estimator, n=results[0].n_samples)


def shared_range(result: EmbeddingResult | AlignedEmbeddingResult, pad: float = 0.05) -> list[float]:
    """One axis range covering every coordinate of every view (all components), widened by ``pad`` of its span
    on each side: the range of each axis of each view's scatter."""
    coords = np.asarray(result.coordinates, dtype=np.float64)
    finite = coords[np.isfinite(coords)]
    if not finite.size:
        return [-1.0, 1.0]
    low, high = float(finite.min()), float(finite.max())
    margin = pad * (high - low) if high > low else 1.0
    return [low - margin, high + margin]


METHOD_NAMES = {"umap": "UMAP", "pca": "PCA", "tsne": "t-SNE"}


def _view(result: EmbeddingResult | AlignedEmbeddingResult, view: int) -> tuple[np.ndarray, str, float, int]:
    if isinstance(result, AlignedEmbeddingResult):
        if not (isinstance(view, (int, np.integer)) and 0 <= view < len(result.names)):
            raise ParameterError(f"embedding_scatter: 'view' must be 0 to {len(result.names) - 1} (the views {list(result.names)}); got {view!r}.")
        return (result.coordinates[view], result.names[view], float(result.trustworthiness[view]), result.quality_k)
    return result.coordinates, "", result.trustworthiness, result.quality_k


def _trace(
    coords: np.ndarray,
    rows: np.ndarray,
    values: np.ndarray,
    names: np.ndarray | None,
    category: int | None,
    label: str,
    color_name: str,
    chosen: np.ndarray | None,
    *,
    show_legend: bool,
) -> go.Scatter | go.Scattergl | go.Scatter3d:
    shown = values[rows] if names is None else names[rows]
    customdata = np.stack([rows.astype(object), values[rows].astype(object), shown.astype(object)], axis=1)
    value = "%{customdata[1]:.3g}" if values.dtype.kind == "f" else "%{customdata[1]}"
    hover = f"sample %{{customdata[0]}}<br>{color_name} {value}"
    if names is not None:
        hover += "<br>label %{customdata[2]}"
    hover += "<extra></extra>"
    if category is None:
        marker: dict[str, Any] = {
            "color": values[rows],
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": color_name},
            "size": 5,
        }
    else:
        marker = {"color": category_color(category), "size": 5}
    common: dict[str, Any] = {
        "mode": "markers",
        "name": label,
        "customdata": customdata,
        "hovertemplate": hover,
        "showlegend": show_legend,
        "marker": marker,
    }
    if coords.shape[1] >= 3:
        return go.Scatter3d(x=coords[rows, 0], y=coords[rows, 1], z=coords[rows, 2], **common)
    y = coords[rows, 1] if coords.shape[1] > 1 else np.zeros(len(rows))
    if chosen is not None:
        common["selectedpoints"] = np.nonzero(chosen[rows])[0].tolist()
        common["selected"] = {"marker": {"opacity": 1.0}}
        common["unselected"] = {"marker": {"opacity": 0.12}}
    kind = go.Scattergl if len(coords) > WEBGL_ABOVE else go.Scatter
    return kind(x=coords[rows, 0], y=y, **common)
