"""Figures and table rows for probing results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from workbench.analyses.probing import ProbingResult
from workbench.errors import ParameterError, UnknownLayerError, did_you_mean, format_choices
from workbench.plots._style import MODEL_COLORS, class_name, order_layers, takes_results, titled

METRIC_NAMES = {"accuracy": "accuracy", "r2": "R²"}


@takes_results
def probe_profile(*results: ProbingResult, names: Sequence[str] | None = None) -> go.Figure:
    """Held-out score per layer (solid, ± std over folds) and control-task score (dashed), one colour per model.

    A dotted line marks chance (the majority-class rate; 0 for R²). ``names`` label the models
    (default: each result's ``model_name``). Models with different layers each get a stretch of the x axis,
    its ticks naming the layers and its middle tick the model; the legend sits to the right, clear of them.
    """
    fig = go.Figure()
    labels = _names(results, names)
    for i, (result, name) in enumerate(zip(results, labels)):
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        layers = list(result.layers)
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=result.score,
                mode="lines+markers",
                name=f"{name}: {METRIC_NAMES[result.metric]}",
                line={"color": color},
                error_y={"type": "data", "array": result.score_std, "visible": True},
                customdata=np.stack([result.score_std, result.train_score], axis=1),
                hovertemplate=f"{name} · %{{x}}<br>held-out %{{y:.3f}} ± %{{customdata[0]:.3f}}"
                "<br>training %{customdata[1]:.3f}<extra></extra>",
            )
        )
        if (
            result.control_score is not None
            and result.selectivity is not None
            and result.control_train_score is not None
        ):
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=result.control_score,
                    mode="lines+markers",
                    name=f"{name}: control task",
                    line={"color": color, "dash": "dash"},
                    marker={"symbol": "x"},
                    customdata=np.stack([result.selectivity, result.control_train_score], axis=1),
                    hovertemplate=f"{name} · %{{x}}<br>control %{{y:.3f}}<br>selectivity %{{customdata[0]:.3f}}"
                    "<br>control, training rows %{customdata[1]:.3f}<extra></extra>",
                )
            )
    order_layers(fig, *(r.layers for r in results), labels=labels, merge=False)
    if results:
        fig.add_hline(
            y=results[0].chance,
            line_dash="dot",
            line_color="grey",
            annotation_text="chance" if results[0].metric == "accuracy" else "predicting the mean",
        )
        metric = METRIC_NAMES[results[0].metric]
        fig.update_layout(
            xaxis_title="layer",
            yaxis_title=f"held-out {metric}",
            hovermode="closest",
        )
        if results[0].metric == "accuracy":
            fig.update_yaxes(range=[0, 1.02])
        return titled(fig, f"Probe {metric} across layers", estimator=results[0].estimator, n=results[0].n_samples)
    return titled(fig, "Probe scores across layers")


@takes_results
def probe_confusion(result: ProbingResult, layer: str, *, class_names: Sequence[str] | None = None) -> go.Figure:
    """Held-out confusion of one layer's probe: rows true class, columns predicted, coloured by row fraction.

    ``class_names`` name integer class labels by position (a dataset's ``class_names``). Raises
    :class:`~workbench.errors.ParameterError` for regression results, which have no classes, and
    :class:`~workbench.errors.UnknownLayerError` for a layer the result does not hold.
    """
    if result.confusion is None or result.classes is None:
        raise ParameterError("probe_confusion needs a classification result; regression probes have no confusion matrix.")
    if layer not in result.layers:
        raise UnknownLayerError(
            f"probe_confusion: the probing result has no layer '{layer}'.{did_you_mean(str(layer), result.layers)} "
            f"Layers: {format_choices(result.layers)}."
        )
    index = list(result.layers).index(layer)
    counts = result.confusion[index]
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    names = [class_name(c, class_names) for c in result.classes]
    fig = go.Figure(
        go.Heatmap(
            z=fractions,
            x=names,
            y=names,
            customdata=counts,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "fraction<br>of true class"},
            hovertemplate="true %{y} → predicted %{x}<br>%{customdata} samples (%{z:.1%})<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title="predicted class",
        yaxis_title="true class",
        yaxis_autorange="reversed",
        xaxis_type="category",
        yaxis_type="category",
    )
    where = f"{result.model_name} · {layer}" if result.model_name else f"layer {layer}"
    return titled(fig, f"Held-out confusion, {where}", estimator=result.estimator, n=result.n_samples)


@takes_results
def probe_rows(result: ProbingResult, name: str | None = None) -> list[dict[str, object]]:
    """One table row per layer: score ± std, training score, macro-F1, control score (held-out and on the training
    rows, where a probe that memorises random labels scores high) and selectivity."""
    model = name or result.model_name
    rows = []
    for i, layer in enumerate(result.layers):
        row: dict[str, object] = {
            "model": model,
            "layer": layer,
            "features": int(result.n_features[i]),
            result.metric: float(result.score[i]),
            "std": float(result.score_std[i]),
            "training": float(result.train_score[i]),
        }
        if result.macro_f1 is not None:
            row["macro-F1"] = float(result.macro_f1[i])
        if result.control_score is not None and result.selectivity is not None:
            row["control"] = float(result.control_score[i])
            if result.control_train_score is not None:
                row["control, training"] = float(result.control_train_score[i])
            row["selectivity"] = float(result.selectivity[i])
        rows.append(row)
    return rows




def _names(results: Sequence[ProbingResult], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        return [str(n) for n in names]
    return [r.model_name or f"model {i + 1}" for i, r in enumerate(results)]
