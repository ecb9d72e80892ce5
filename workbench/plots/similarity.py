"""Figures for representational similarity and relative representations.

Each builder takes a Result and returns a plotly figure; the title's second line carries the estimator
and the number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analyses.relative import (
    RelativeAgreementResult,
    RelativeComparisonResult,
    RelativeLayerAgreementResult,
    StitchingResult,
)
from workbench.analyses.similarity import SimilarityMatrixResult
from workbench.plots._style import MODEL_COLORS, category_color, class_name, grouped_bar_panels, takes_results, titled

_MEASURE_LABELS = {
    "linear_cka": "linear CKA",
    "rbf_cka": "RBF CKA",
    "procrustes_distance": "Procrustes distance",
    "cca_similarity": "CCA similarity",
    "rsa": "RSA",
}
_RELATIVE_COLOR = MODEL_COLORS[2]
_ABSOLUTE_COLOR = "#7f7f7f"


def measure_label(measure: str) -> str:
    """Readable name of a ``similarity_matrix`` measure."""
    return _MEASURE_LABELS.get(measure, measure)


def result_label(result: SimilarityMatrixResult) -> str:
    """The measure of ``result`` with the variant it was computed with, as figures and report sections name it:
    "debiased linear CKA", "angular Procrustes distance", "CCA similarity (PWCCA)", "RSA (correlation RDM, Spearman)"."""
    params, label = result.params, measure_label(result.measure)
    if result.measure in ("linear_cka", "rbf_cka") and params.get("debiased"):
        return f"debiased {label}"
    if result.measure == "procrustes_distance" and params.get("angular"):
        return f"angular {label}"
    if result.measure == "cca_similarity" and params.get("kind"):
        return f"{label} ({_CCA_KINDS.get(params['kind'], params['kind'])})"
    if result.measure == "rsa" and params.get("rdm"):
        compare = f", {str(params['compare']).capitalize()}" if params.get("compare") else ""
        return f"{label} ({params['rdm']} RDM{compare})"
    return label


_CCA_KINDS = {"svcca": "SVCCA", "pwcca": "PWCCA", "mean": "mean CCA"}


def colour_range(result: SimilarityMatrixResult) -> tuple[float | None, float | None]:
    """The colour scale of a similarity heatmap.

    Similarities (CKA biased or debiased, CCA, RSA) are bounded above by 1, so they share the fixed scale
    ``[min(0, smallest value), 1]``: a cell's colour means the same value in every heatmap, whatever the
    variant (debiased CKA can be slightly negative, RSA down to -1). Distances have no common upper bound
    that the data come near, so they span the data range (``(None, None)``: plotly's own).
    """
    if not result.higher_is_closer:
        return None, None
    values = np.asarray(result.values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    return min(0.0, low), 1.0


@takes_results
def similarity_heatmap(result: SimilarityMatrixResult, *, annotate: bool | None = None) -> go.Figure:
    """Layer x layer heatmap of ``result.values``: rows are model A's layers (top to bottom), columns B's.

    Hovering a cell shows the exact value. Every cell also carries an invisible marker, so that a click
    selects it (``st.plotly_chart(..., on_select="rerun")`` reports the point's ``x``/``y`` layer names).
    ``annotate`` writes the values into the cells (default: when the grid has at most 12 x 12 cells); an
    undefined cell (NaN) has no colour and reads "n/a", in the cell and on hover.
    """
    values = np.asarray(result.values)
    label = result_label(result)
    annotate = values.size <= 144 if annotate is None else annotate
    zmin, zmax = colour_range(result)
    direction = "higher is closer" if result.higher_is_closer else "lower is closer"
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            z=values,
            x=list(result.layers_b),
            y=list(result.layers_a),
            zmin=zmin,
            zmax=zmax,
            colorscale="Viridis" if result.higher_is_closer else "Viridis_r",
            colorbar={"title": {"text": f"{label}<br>({direction})"}},
            texttemplate="%{z:.2f}" if annotate else None,
            hoverinfo="skip",
        )
    )
    rows, cols = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
    undefined = ~np.isfinite(values)
    if undefined.any():  # written in the cell, so that a blank does not read as a figure that failed to draw
        fig.add_trace(
            go.Scatter(
                x=[result.layers_b[j] for j in cols[undefined]],
                y=[result.layers_a[i] for i in rows[undefined]],
                text=["n/a"] * int(undefined.sum()),
                mode="text",
                textfont={"color": "#888888", "size": 11 if annotate else 9},
                hoverinfo="skip",
                showlegend=False,
                name="undefined",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[result.layers_b[j] for j in cols.ravel()],
            y=[result.layers_a[i] for i in rows.ravel()],
            customdata=np.where(np.isfinite(values), values, None).ravel(),
            text=[f"{v:.6f}" if np.isfinite(v) else "n/a" for v in values.ravel()],
            mode="markers",
            marker={"symbol": "square", "size": 28, "opacity": 0.0, "color": "#000000"},
            hovertemplate=f"A ({result.model_a}): %{{y}}<br>B ({result.model_b}): %{{x}}<br>{label} = %{{text}}<extra></extra>",
            showlegend=False,
            name="cells",
        )
    )
    fig.update_xaxes(title_text=f"layers of B ({result.model_b})", type="category", tickangle=-45)
    fig.update_yaxes(title_text=f"layers of A ({result.model_a})", type="category", autorange="reversed")
    fig.update_layout(height=max(360, 46 * values.shape[0] + 180), clickmode="event+select")
    return titled(
        fig,
        f"{label}: {result.model_a} vs {result.model_b} ({direction})",
        estimator=result.estimator,
        n=result.n_samples,
    )


@takes_results
def relative_scatter(
    result: RelativeComparisonResult, *, label_a: str = "A", label_b: str = "B", max_points: int = 6000,
    class_names: Sequence[str] | None = None,
) -> go.Figure:
    """Each (sample, anchor) pair as a point: its cosine to the anchor in A (x) against in B (y).

    Points on the diagonal mean the two models place the sample identically relative to the anchors.
    Coloured by the sample's class when labels are known (named by ``class_names``, a dataset's). At
    most ``max_points`` points are drawn (every k-th pair, in sample order). The samples are those the
    agreement scores (not the anchors, whose cosine of 1 to themselves would sit at the top corner).
    """
    scored = np.asarray(result.agreement.samples)
    ra = np.asarray(result.relative_a)[scored]
    rb = np.asarray(result.relative_b)[scored]
    stride = max(1, int(np.ceil(ra.size / max_points)))
    xs = ra.ravel()[::stride]
    ys = rb.ravel()[::stride]
    fig = go.Figure()
    if result.labels is not None:
        sample_labels = np.repeat(np.asarray(result.labels)[scored], ra.shape[1])[::stride]
        for i, cls in enumerate(np.unique(sample_labels)):
            mask = sample_labels == cls
            fig.add_trace(
                go.Scattergl(
                    x=xs[mask],
                    y=ys[mask],
                    mode="markers",
                    name=f"class {class_name(cls, class_names)}",
                    marker={"size": 3, "opacity": 0.5, "color": category_color(i)},
                    hovertemplate=f"class {class_name(cls, class_names)}<br>A %{{x:.3f}}<br>B %{{y:.3f}}<extra></extra>",
                )
            )
    else:
        fig.add_trace(go.Scattergl(x=xs, y=ys, mode="markers", name="pairs", marker={"size": 3, "opacity": 0.5}))
    low = float(min(xs.min(), ys.min()))
    fig.add_trace(
        go.Scatter(
            x=[low, 1.0], y=[low, 1.0], mode="lines", name="A = B", line={"color": "black", "dash": "dash", "width": 1}
        )
    )
    fig.update_xaxes(title_text=f"cosine to anchor in A ({label_a})")
    fig.update_yaxes(title_text=f"cosine to anchor in B ({label_b})")
    fig.update_layout(height=480)
    agreement = result.agreement
    return titled(  # the headline numbers open the subtitle, which wraps: a half-width chart cut them off the title
        fig,
        "Relative coordinates, A vs B",
        estimator=f"Jaccard@{agreement.k} {agreement.mean_jaccard:.3f}, MRR {agreement.mrr:.3f} · {result.estimator}",
        n=result.n_samples,
    )


@takes_results
def class_agreement_bars(result: RelativeAgreementResult, *, class_names: Sequence[str] | None = None) -> go.Figure:
    """Mean Jaccard@k per class, relative vs absolute representations (needs labels); ``class_names`` name the classes."""
    fig = go.Figure()
    if result.classes is None or result.class_jaccard is None:
        fig.add_annotation(text="No class labels: per-class agreement needs a labelled dataset.", showarrow=False)
        return titled(fig, "Agreement per class", estimator=result.estimator, n=result.n_samples)
    names = [class_name(c, class_names) for c in result.classes]
    fig.add_trace(
        go.Bar(
            x=names,
            y=result.class_jaccard,
            name="relative",
            marker_color=_RELATIVE_COLOR,
            hovertemplate="class %{x}<br>relative Jaccard %{y:.3f}<extra></extra>",
        )
    )
    if result.absolute_class_jaccard is not None:
        fig.add_trace(
            go.Bar(
                x=names,
                y=result.absolute_class_jaccard,
                name="absolute",
                marker_color=_ABSOLUTE_COLOR,
                hovertemplate="class %{x}<br>absolute Jaccard %{y:.3f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="class", type="category")
    fig.update_yaxes(title_text=f"mean Jaccard@{result.k}", range=[0, 1])
    fig.update_layout(barmode="group", height=380)
    return titled(fig, "Cross-model agreement per class", estimator=result.estimator, n=result.n_samples)


@takes_results
def layer_agreement_bars(result: RelativeLayerAgreementResult) -> go.Figure:
    """Jaccard@k and MRR per layer pair, relative next to absolute (absolute missing where widths differ)."""
    names = [a if a == b else f"{a} / {b}" for a, b in zip(result.layers_a, result.layers_b)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"Jaccard@{result.k}", "MRR"), horizontal_spacing=0.08)
    grouped_bar_panels(fig, names, (("relative", _RELATIVE_COLOR), ("absolute", _ABSOLUTE_COLOR)),
                       ((result.jaccard, result.absolute_jaccard), (result.mrr, result.absolute_mrr)))
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(type="category")
    fig.update_layout(height=400)
    return titled(
        fig,
        f"Cross-model retrieval per layer: {result.model_a} vs {result.model_b}",
        estimator=result.estimator,
        n=result.n_samples,
    )


@takes_results
def stitching_bars(result: StitchingResult, *, name_a: str = "A", name_b: str = "B") -> go.Figure:
    """Test accuracy of each encoder -> head combination, relative vs absolute, with own heads and chance.

    The own heads' accuracies and chance are horizontal lines across the whole plot, named in the legend."""
    combos = [(0, 0), (1, 0), (1, 1), (0, 1)]
    names = (name_a, name_b)
    labels = [f"{names[e]} → head of {names[h]}" + (" (stitched)" if e != h else "") for e, h in combos]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=labels,
            y=[result.relative_accuracy[e, h] for e, h in combos],
            name="relative head",
            marker_color=_RELATIVE_COLOR,
            hovertemplate="%{x}<br>accuracy %{y:.3f}<extra></extra>",
        )
    )
    if result.absolute_accuracy is not None:
        fig.add_trace(
            go.Bar(
                x=labels,
                y=[result.absolute_accuracy[e, h] for e, h in combos],
                name="absolute head",
                marker_color=_ABSOLUTE_COLOR,
                hovertemplate="%{x}<br>accuracy %{y:.3f}<extra></extra>",
            )
        )
    if result.own_accuracy is not None:
        for i, acc in enumerate(result.own_accuracy):  # lines across the bars, named in the legend (text would cover the bars)
            fig.add_trace(
                go.Scatter(
                    x=[0, 1], y=[float(acc)] * 2, xaxis="x2", mode="lines", name=f"own head of {names[i]}: {acc:.3f}",
                    line={"color": MODEL_COLORS[i], "dash": ("dot", "dashdot")[i % 2], "width": 1.5},  # equal lines stay visible
                    hovertemplate=f"own head of {names[i]}: {acc:.3f}<extra></extra>",
                )
            )
    chance = float(result.chance_accuracy)
    fig.add_trace(go.Scatter(  # in the legend, like the own heads: a label on the plot sat under the first bar
        x=[0, 1], y=[chance] * 2, xaxis="x2", mode="lines", name=f"chance: {chance:.3f}",
        line={"color": "black", "dash": "dash", "width": 1}, hovertemplate=f"chance: {chance:.3f}<extra></extra>",
    ))
    fig.update_yaxes(title_text="test accuracy", range=[0, 1.05])
    # the reference lines run on a hidden axis over the whole plot width, from the first bar group's left edge
    # to the last one's right edge
    fig.update_layout(barmode="group", height=420,
                      xaxis2={"overlaying": "x", "range": [0, 1], "visible": False, "fixedrange": True})
    return titled(fig, "Zero-shot stitching", estimator=result.estimator, n=result.n_samples)

