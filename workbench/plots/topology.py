"""Figures for the topology family: diagrams, barcodes, Betti curves, distance matrices, separability."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from workbench.analyses.topology import (
    DiagramDistanceMatrixResult,
    LayerSeparabilityResult,
    PersistenceResult,
    SeparabilityTrajectoryResult,
    TopologicalRSAResult,
    empty_diagrams_note,
)
from workbench.plots._style import MODEL_COLORS, nice_step, order_layers, takes_results, titled

DIM_COLORS = ("#1f77b4", "#d62728", "#2ca02c")
REFERENCE_NAMES = {
    "thornton_index": "Thornton index",
    "probe_accuracy": "probe accuracy (CV)",
    "probe_roc_auc": "probe ROC-AUC (CV)",
    "fisher_ratio": "Fisher ratio (max feature)",
    "calinski_harabasz": "Calinski–Harabasz",
}

BOUNDED = ("thornton_index", "probe_accuracy", "probe_roc_auc")
UNBOUNDED = ("fisher_ratio", "calinski_harabasz")
REFERENCE_COLORS = {
    "thornton_index": "#2ca02c",
    "probe_accuracy": "#9467bd",
    "probe_roc_auc": "#8c564b",
    "fisher_ratio": "#ff7f0e",
    "calinski_harabasz": "#17becf",
}


def _top(results: Sequence[PersistenceResult]) -> float:
    finite = [dg[np.isfinite(dg[:, 1])] for r in results for dg in r.diagrams.values()]
    top = max((float(f[:, 1].max()) for f in finite if len(f)), default=1.0)
    return top if top > 0 else 1.0


def _infinity_ticks(top: float) -> tuple[float, dict[str, Any]]:
    """Where a never-dying bar ends on an axis whose largest finite value is ``top``, and that axis's ticks: round
    numbers up to ``top`` and ∞ at the end, half a step clear of the last number."""
    inf_at = top * 1.08
    step = nice_step(top)
    finite = [float(t) for t in np.arange(0.0, inf_at - step / 2, step)]
    return inf_at, {"tickmode": "array", "tickvals": [*finite, inf_at], "ticktext": [f"{t:.6g}" for t in finite] + ["∞"]}


def _subsample_note(r: PersistenceResult) -> str:
    return f" (H≥1 on {r.n_points_used} of {r.n_points})" if r.subsampled else ""


@takes_results
def persistence_diagram(*results: PersistenceResult, titles: Sequence[str] | None = None) -> go.Figure:
    """Persistence diagrams side by side: (birth, death) per bar, one colour per dimension.

    Bars that never die are drawn on a dashed line above the largest finite death, which the death axis labels
    ∞ in place of a number (so no automatic tick label lands on the ∞).
    """
    titles = list(titles) if titles is not None else [f"result {i + 1}" for i in range(len(results))]
    fig = make_subplots(
        rows=1, cols=len(results), subplot_titles=[t + _subsample_note(r) for t, r in zip(titles, results)]
    )
    top = _top(results)
    inf_y, ticks = _infinity_ticks(top)
    for c, (r, name) in enumerate(zip(results, titles), start=1):
        fig.add_trace(
            go.Scatter(
                x=[0, inf_y],
                y=[0, inf_y],
                mode="lines",
                line={"color": "#999", "width": 1},
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=c,
        )
        fig.add_trace(
            go.Scatter(
                x=[0, inf_y],
                y=[inf_y, inf_y],
                mode="lines",
                line={"color": "#999", "dash": "dash", "width": 1},
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=c,
        )
        for k, dg in r.diagrams.items():
            death = np.where(np.isfinite(dg[:, 1]), dg[:, 1], inf_y)
            text = np.where(np.isfinite(dg[:, 1]), "", " (never dies)")
            fig.add_trace(
                go.Scatter(
                    x=dg[:, 0],
                    y=death,
                    mode="markers",
                    name=f"H{k}",
                    legendgroup=f"H{k}",
                    showlegend=c == 1,
                    marker={"color": DIM_COLORS[k % len(DIM_COLORS)], "size": 6, "opacity": 0.7},
                    text=text,
                    hovertemplate=f"{name} · H{k}<br>birth %{{x:.4g}}<br>death %{{y:.4g}}%{{text}}<extra></extra>",
                ),
                row=1,
                col=c,
            )
        fig.update_xaxes(title_text=f"birth ({r.metric} distance)", range=[-0.02 * inf_y, inf_y * 1.02], row=1, col=c)
        fig.update_yaxes(title_text=f"death ({r.metric} distance)", range=[-0.02 * inf_y, inf_y * 1.05],
                         **ticks, row=1, col=c)
    fig.update_layout(height=420)
    return titled(
        fig,
        "Persistence diagrams",
        estimator=results[0].estimator if results else None,
        n=results[0].n_samples if results else None,
    )


@takes_results
def barcode(
    *results: PersistenceResult, dim: int = 1, titles: Sequence[str] | None = None, max_bars: int = 100
) -> go.Figure:
    """Barcodes of dimension ``dim`` side by side: one horizontal bar per feature, longest at the top.

    Shows the ``max_bars`` longest bars of each result (the subplot title says how many were left out).
    """
    titles = list(titles) if titles is not None else [f"result {i + 1}" for i in range(len(results))]
    sub = []
    for t, r in zip(titles, results):
        n_bars = len(r.diagram(dim))
        sub.append(t + _subsample_note(r) + (f", {max_bars} longest of {n_bars}" if n_bars > max_bars else ""))
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=sub)
    inf_x, ticks = _infinity_ticks(_top(results))
    endless = any(np.isinf(r.diagram(dim)[:max_bars, 1]).any() for r in results)  # bars that never die end at ∞
    for c, r in enumerate(results, start=1):
        dg = r.diagram(dim)[:max_bars]
        death = np.where(np.isfinite(dg[:, 1]), dg[:, 1], inf_x)
        y = np.arange(len(dg))[::-1]
        xs = np.stack([dg[:, 0], death, np.full(len(dg), np.nan)], 1).ravel()
        ys = np.stack([y, y, np.full(len(dg), np.nan)], 1).ravel()
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": DIM_COLORS[dim % len(DIM_COLORS)], "width": 3},
                name=f"H{dim}",
                showlegend=c == 1,
                hoverinfo="x",
            ),
            row=1,
            col=c,
        )
        fig.update_xaxes(title_text=f"filtration value ({r.metric} distance)", row=1, col=c,
                         **({"range": [-0.02 * inf_x, inf_x * 1.02], **ticks} if endless else {}))
        fig.update_yaxes(showticklabels=False, row=1, col=c)
    fig.update_layout(height=380)
    return titled(
        fig,
        f"H{dim} barcodes",
        estimator=results[0].estimator if results else None,
        n=results[0].n_samples if results else None,
    )


def longest_finite_bar(r: PersistenceResult, dim: int) -> float | None:
    """The lifetime (death - birth) of the most persistent bar of dimension ``dim`` that dies; None when no bar dies
    (H0's one bar of the whole cloud never dies and is not counted)."""
    bars = np.asarray(r.diagram(dim), dtype=float)
    lives = (bars[:, 1] - bars[:, 0])[np.isfinite(bars[:, 1])] if len(bars) else np.zeros(0)
    return float(lives.max()) if lives.size else None


def _finite_deaths(r: PersistenceResult, dim: int) -> np.ndarray:
    deaths = np.asarray(r.diagram(dim), dtype=float)[:, 1] if dim in r.diagrams else np.zeros(0)
    return deaths[np.isfinite(deaths)]


def _largest_death(r: PersistenceResult, dim: int) -> float:
    """The largest finite death of dimension ``dim`` in ``r`` (the end of its Betti grid when it has none)."""
    finite = _finite_deaths(r, dim)
    return float(finite.max()) if finite.size else float(r.betti_grid[-1])


LOG_SPREAD = 5.0  # a largest H0 death this many times the median one puts the Betti-0 axis on a log scale


def _spread(r: PersistenceResult, dim: int) -> float:
    """The largest finite death of dimension ``dim`` over the median one (1 when there are none)."""
    finite = _finite_deaths(r, dim)
    positive = finite[finite > 0]
    return float(positive.max() / np.median(positive)) if positive.size else 1.0


def betti_curves(
    *groups: Mapping[str, PersistenceResult],
    names: Sequence[str] | None = None,
    dim: int = 1,
    normalize_scale: bool = True,
) -> go.Figure:
    """Betti-``dim`` curves of every layer, one panel per model (``groups``: layer -> result).

    Each curve is coloured by its layer's depth in its model (dark = first layer, light = last). Models with
    the same layers share one legend entry per layer, which shows or hides that layer in every panel; other
    models list their own layers in the legend under the model's name, so each panel's curves are named by
    that model's layers. The figure grows with the legend, so every entry is visible. With
    ``normalize_scale`` each layer's filtration axis is divided by its largest finite death in dimension ``dim``, so
    layers of different overall scale share the axis [0, 1] (one long bar of another dimension, such as an outlier's
    H0 bar, does not squeeze the curves shown). Betti-0 curves go on a logarithmic axis where a layer's largest H0
    death is more than ``LOG_SPREAD`` times its median one (an outlier that joins the rest last), so that the merging
    of the other points is not crowded against 0; each curve then starts just left of the first step.
    """
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(groups))]
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=names, shared_yaxes=True)
    shared = all(list(g) == list(groups[0]) for g in groups)
    curves = []
    for group in groups:
        for r in group.values():
            t, beta = r.betti_steps(dim)
            scale = _largest_death(r, dim) if normalize_scale else 0.0
            t = t / scale if scale > 0 else t
            curves.append((t, t, beta))  # drawn at, hover value, Betti number
    log = normalize_scale and dim == 0 and any(_spread(r, dim) > LOG_SPREAD for g in groups for r in g.values())
    if log:  # t = 0 has no place on a log axis: curves start a little left of the first step of any of them
        low = min((float(t[t > 0].min()) for t, _, _ in curves if (t > 0).any()), default=1e-3) / 1.5
        curves = [(np.where(t > 0, t, low), t, beta) for t, _, beta in curves]
    first = None
    k = 0
    for c, (group, name) in enumerate(zip(groups, names), start=1):
        colors = _depth_colors(len(group))
        for i, (layer, r) in enumerate(group.items()):
            first = first or r
            x, t, beta = curves[k]
            k += 1
            legend = (
                {"legendgroup": layer, "showlegend": c == 1}
                if shared
                else {"legendgroup": f"model {c}", "legendgrouptitle_text": name if i == 0 else None}
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=beta,
                    customdata=t,
                    mode="lines",
                    name=layer,
                    line={"color": colors[i], "shape": "hv"},
                    hovertemplate=f"{name} · {layer}<br>t %{{customdata:.3g}}<br>β{dim} %{{y}}<extra></extra>",
                    **legend,
                ),
                row=1,
                col=c,
            )
        metric = " / ".join(dict.fromkeys(r.metric for r in group.values()))
        # kept short: two panels' titles at 1280 px would otherwise run into each other
        label = f"{metric} distance / largest H{dim} death" if normalize_scale else f"filtration value ({metric} distance)"
        if log:
            axis = {"type": "log", "range": [math.log10(low) - 0.05, math.log10(1.05)]}
            label += " (log scale)"
        else:
            axis = {"range": [0, 1.02]} if normalize_scale else {}
        fig.update_xaxes(title_text=label, row=1, col=c, **axis)
    fig.update_yaxes(title_text=f"Betti number β{dim}", row=1, col=1)
    gap = 0 if shared else LEGEND_GROUP_GAP  # shared: one legend group per layer, listed without gaps
    fig.update_layout(height=380, legend={"groupclick": "toggleitem", "tracegroupgap": gap})
    titled(
        fig,
        f"Betti-{dim} curves across layers",
        estimator=first.estimator if first else None,
        n=first.n_samples if first else None,
    )
    entries = len(groups[0]) if shared and groups else sum(len(g) + 1 for g in groups)  # + 1: the model's name
    legend_height = LEGEND_ROW * entries + gap * (len(groups) - 1)
    fig.update_layout(height=max(fig.layout.height, fig.layout.margin.t + PLOT_BOTTOM + legend_height))
    return fig


LEGEND_ROW = 20  # pixels per legend entry
LEGEND_GROUP_GAP = 12  # pixels between legend groups
PLOT_BOTTOM = 80  # plotly's bottom margin (the x axis title sits in it)


def _depth_colors(n: int) -> list[str]:
    """``n`` colours from dark to light along Viridis (stopping short of its palest yellow), one per layer."""
    return sample_colorscale("Viridis", [0.9 * i / max(n - 1, 1) for i in range(n)])


@takes_results
def diagram_distance_heatmap(result: DiagramDistanceMatrixResult, *, name_a: str | None = None,
                             name_b: str | None = None) -> go.Figure:
    """Heatmap of diagram distances: rows are layers of A, columns layers of B (lower = closer). ``name_a``,
    ``name_b``: the models' names on the axes (default: the result's, else "A" and "B")."""
    name_a = name_a or result.model_a or "A"
    name_b = name_b or result.model_b or "B"
    fig = go.Figure(
        go.Heatmap(
            z=result.distances,
            x=result.layers_b,
            y=result.layers_a,
            colorscale="Viridis_r",
            colorbar={"title": result.metric},
            text=np.round(result.distances, 4),
            texttemplate="%{text}",
            hovertemplate=f"{name_a} %{{y}} · {name_b} %{{x}}<br>{result.metric} %{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text=f"layer of {name_b}")
    fig.update_yaxes(title_text=f"layer of {name_a}", autorange="reversed")
    fig.update_layout(height=max(300, 60 * len(result.layers_a) + 120))
    note = empty_diagrams_note(result)
    return titled(fig, f"H{result.dim} {result.metric} distance between layers",
                  estimator=result.estimator + (f"<br>{note}" if note else ""), n=result.n_samples)


@takes_results
def separability_curves(
    *results: LayerSeparabilityResult | SeparabilityTrajectoryResult, names: Sequence[str] | None = None
) -> go.Figure:
    """The persistence score and the labelled references along layers (or checkpoints), on one figure.

    Three aligned panels: the score S (axis reversed, so up is more separable, as its axis title says), the
    references in [0, 1] (Thornton, probe accuracy, ROC-AUC), and the unbounded ones (Fisher,
    Calinski–Harabasz, log axis), :data:`SEPARABILITY_GAP` pixels apart so that a panel's lowest tick label
    stays clear of the next panel's title. One colour per measure, one line style per model. For
    trajectories, dotted vertical lines mark where the score plateaued and where a run monitoring it would
    have stopped.
    """
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(results))]
    labelled = any(r.references for r in results)  # without labels there are no reference panels to draw
    fig = make_subplots(
        rows=3 if labelled else 1,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=SEPARABILITY_GAP / SEPARABILITY_PLOT,
        row_heights=[0.4, 0.3, 0.3] if labelled else None,
        subplot_titles=[
            "unsupervised H0 persistence score S (lower = more separable)",
            "labelled references in [0, 1]",
            "labelled references, unbounded (log)",
        ][: 3 if labelled else 1],
    )
    dashes = ("solid", "dash", "dot", "dashdot")
    for i, (r, name) in enumerate(zip(results, names)):
        xs = list(r.layers) if isinstance(r, LayerSeparabilityResult) else list(r.checkpoints)
        dash = dashes[i % len(dashes)]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=r.scores,
                mode="lines+markers",
                name="score S",
                legendgroup=f"model {i}",
                legendgrouptitle_text=name,
                line={"color": "#111", "dash": dash},
                hovertemplate=f"{name} · %{{x}}<br>S %{{y:.4f}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        for key, values in r.references.items():
            row = 2 if key in BOUNDED else 3
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=values,
                    mode="lines+markers",
                    name=REFERENCE_NAMES.get(key, key),
                    legendgroup=f"model {i}",
                    line={"color": REFERENCE_COLORS.get(key, MODEL_COLORS[0]), "dash": dash},
                    hovertemplate=f"{name} · %{{x}}<br>{REFERENCE_NAMES.get(key, key)} %{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=1,
            )
        if isinstance(r, SeparabilityTrajectoryResult):
            for idx, what in ((r.plateau_index, "score plateau"), (r.stop_index, "label-free stop")):
                if idx is not None:
                    fig.add_vline(
                        x=idx,
                        line={"dash": "dot", "color": "#555"},
                        annotation_text=f"{name}: {what}",
                        annotation_position="top left",
                    )
    fig.for_each_annotation(lambda a: a.update(x=0, xanchor="left"), selector={"xref": "paper", "yanchor": "bottom"})
    fig.update_yaxes(autorange="reversed", title_text="S, axis reversed<br>(up = more separable)", row=1, col=1)
    if labelled:
        fig.update_yaxes(range=[0, 1.02], title_text="reference<br>(up = more separable)", row=2, col=1)
        fig.update_yaxes(type="log", minorloglabels="complete", title_text="reference, log<br>(up = more separable)",
                         row=3, col=1)
    fig.update_layout(height=380, legend={"groupclick": "toggleitem", "tracegroupgap": 12})
    if results and all(isinstance(r, LayerSeparabilityResult) for r in results):
        order_layers(fig, *(r.layers for r in results), labels=names, merge=False)
    first = results[0] if results else None
    what = "checkpoints" if isinstance(first, SeparabilityTrajectoryResult) else "layers"
    titled(
        fig,
        f"Class separability across {what}",
        estimator=first.estimator if first else None,
        n=first.n_samples if first else None,
    )
    if labelled:  # the height is set once the top margin is known, so the gaps come out at their size in pixels
        fig.update_layout(height=SEPARABILITY_PLOT + fig.layout.margin.t + PLOT_BOTTOM)
    return fig


SEPARABILITY_PLOT = 560  # pixels of the three separability panels and the gaps between them
SEPARABILITY_GAP = 60  # pixels between two panels: the upper panel's lowest tick label, then the lower panel's title


@takes_results
def separability_rows(*results: LayerSeparabilityResult, names: Sequence[str] | None = None) -> list[dict[str, object]]:
    """One table row per model and layer: the score S and each labelled reference, under readable names."""
    labels = list(names) if names is not None else [r.model_name or f"model {i + 1}" for i, r in enumerate(results)]
    return [
        {"model": name, "layer": layer, "score S": r.per_layer[layer].score,
         **{REFERENCE_NAMES.get(k, k): v for k, v in r.per_layer[layer].references().items()}}
        for name, r in zip(labels, results)
        for layer in r.layers
    ]


@takes_results
def persistence_times_box(*results: LayerSeparabilityResult, names: Sequence[str] | None = None) -> go.Figure:
    """Box plots of the normalised H0 persistence times per layer (the paper's Figure 1 view).

    Few large times and many small ones mean clustered data; S is the mean of each box's values.
    """
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(results))]
    fig = go.Figure()
    for i, (r, name) in enumerate(zip(results, names)):
        for layer in r.layers:
            fig.add_trace(
                go.Box(
                    y=r.per_layer[layer].normalized_times,
                    x=[layer] * len(r.per_layer[layer].normalized_times),
                    name=name,
                    legendgroup=name,
                    showlegend=layer == r.layers[0],
                    boxpoints=False,
                    marker_color=MODEL_COLORS[i % len(MODEL_COLORS)],
                ),
            )
    fig.update_layout(boxmode="group", height=380)
    fig.update_yaxes(title_text="H0 persistence time / largest", range=[0, 1.02])
    return titled(
        fig,
        "Normalised H0 persistence times per layer",
        estimator=results[0].estimator if results else None,
        n=results[0].n_samples if results else None,
    )


@takes_results
def trsa_matrices(result: TopologicalRSAResult, *, names: Sequence[str] = ("x", "y")) -> go.Figure:
    """The two representational geo-topological matrices side by side (0 = connected, 1 = far)."""
    if result.rgtm_x is None or result.rgtm_y is None:
        fig = go.Figure()
        fig.add_annotation(
            text=f"matrices are kept up to 1000 samples; this result has {result.n_samples}",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
    else:
        fig = make_subplots(rows=1, cols=2, subplot_titles=list(names))
        for c, m in enumerate((result.rgtm_x, result.rgtm_y), start=1):
            fig.add_trace(go.Heatmap(z=m, colorscale="Greys", zmin=0, zmax=1, showscale=c == 2), row=1, col=c)
            fig.update_yaxes(autorange="reversed", row=1, col=c)
        fig.update_layout(height=420)
    return titled(
        fig,
        f"Geo-topological matrices (tRSA r = {result.similarity:.3f})",
        estimator=result.estimator,
        n=result.n_samples,
    )
