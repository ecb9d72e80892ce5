"""Figures for linear mode connectivity: interpolation curves, barriers, layer alignment, merging."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.analyses.mode_connectivity import (
    BarrierResult,
    InterpolationResult,
    LayerAlignmentResult,
    MergeResult,
    ModeConnectivityResult,
    WeightMatchingResult,
)
from workbench.data.datasets import Dataset
from workbench.plots._style import MODEL_COLORS, grouped_bar_panels, nice_step, takes_results, titled

METHOD_LABELS = {
    "naive": "naive (as trained)",
    "weight_matching": "weight matching",
    "activation_matching": "activation matching",
    "repair": "weight matching + REPAIR",
    "reset_bn": "weight matching + BatchNorm reset",
}
_SPLIT_DASH = {"test": "solid", "train": "dash"}
_BEFORE, _AFTER = "#9e9e9e", "#1f77b4"


def method_color(method: str, i: int = 0) -> str:
    """The colour of an alignment method: fixed per method, so figures with different selections read alike; a method
    outside :data:`METHOD_LABELS` takes the ``i``-th of the remaining colours."""
    if method in METHOD_LABELS:
        return MODEL_COLORS[list(METHOD_LABELS).index(method) % len(MODEL_COLORS)]
    return MODEL_COLORS[(len(METHOD_LABELS) + i) % len(MODEL_COLORS)]


def method_label(method: str) -> str:
    """Readable name of an alignment method."""
    return METHOD_LABELS.get(method, method)


def split_label(params: dict, split: str) -> str:
    """``split`` with the name of the dataset it was evaluated on, where the result records it."""
    name = params.get("datasets", {}).get(split, "")
    return f"{split}: {name}" if name else split


@takes_results
def interpolation_curves(result: ModeConnectivityResult | InterpolationResult) -> go.Figure:
    """Loss (left) and accuracy (right) along ``(1−λ)θ_A + λθ_B``: one colour per method, test solid, train dashed
    (one method for the result of :func:`~workbench.analyses.mode_connectivity.interpolate`)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cross-entropy loss", "accuracy"), horizontal_spacing=0.1)
    if isinstance(result, InterpolationResult):
        curves, (a, b) = {"interpolation": result}, ("A", "B")
    else:
        curves, a, b = result.curves, result.params.get("model_a", "A"), result.params.get("model_b", "B")
    for i, (method, curve) in enumerate(curves.items()):
        color = method_color(method, i)
        for split in curve.loss:
            name = f"{method_label(method)} · {split_label(curve.params, split)}"
            for col, values, fmt in ((1, curve.loss[split], ".4f"), (2, curve.accuracy[split], ".2%")):
                fig.add_trace(
                    go.Scatter(
                        x=curve.lambdas,
                        y=values,
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line={"color": color, "dash": _SPLIT_DASH.get(split, "dot")},
                        marker={"size": 4},
                        hovertemplate=f"{name}<br>λ = %{{x:.3f}}<br>%{{y:{fmt}}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="λ (0 = model A, 1 = model B)")
    losses = [v for c in curves.values() for v in c.loss.values()]
    accuracies = [v for c in curves.values() for v in c.accuracy.values()]
    fig.update_yaxes(title_text="loss (nats)", row=1, col=1, **_loss_axis(losses))
    fig.update_yaxes(title_text="accuracy", row=1, col=2, **_accuracy_axis(accuracies))
    fig.update_layout(height=430, legend={"orientation": "h", "y": -0.25})
    n_train = next(iter(curves.values())).params.get("n_train", 0) if curves else 0
    estimator = "(1−λ)θ_A + λθ_B, mean cross-entropy" + (f"; train curves on {n_train} samples" if n_train else "")
    fig.update_layout(margin={"t": 100})
    return titled(fig, f"Linear interpolation {a} → {b}", estimator=estimator, n=result.n_samples)


LOSS_MIN_SPAN = 1e-3  # nats; also at least 1% of the loss: a flatter loss axis would magnify float rounding
ACCURACY_MIN_SPAN = 0.01


def _finite_range(arrays: list) -> tuple[float, float] | None:
    values = np.concatenate([np.ravel(np.asarray(a, dtype=float)) for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else None


def _loss_axis(arrays: list) -> dict:
    """A fixed range of at least :data:`LOSS_MIN_SPAN` (and 1% of the loss) where the curves are flatter than that,
    so that rounding noise between identical models does not fill the axis; autorange otherwise."""
    bounds = _finite_range(arrays)
    if bounds is None:
        return {}
    lo, hi = bounds
    span = max(LOSS_MIN_SPAN, 0.01 * max(abs(lo), abs(hi)))
    if hi - lo >= span:
        return {}
    mid = (lo + hi) / 2
    return {"range": [mid - span / 2, mid + span / 2], "autorange": False}


def _accuracy_axis(arrays: list) -> dict:
    """Range, tick spacing and a percent format with as many decimals as the spacing needs, so that no two
    tick labels read the same (``.0%`` would label ticks 0.5% apart "98%, 98%, 97%, …")."""
    bounds = _finite_range(arrays)
    if bounds is None:
        return {"tickformat": ".0%"}
    lo, hi = bounds
    pad = max(hi - lo, ACCURACY_MIN_SPAN) * 0.05
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    if hi - lo < ACCURACY_MIN_SPAN:  # flat curves: widen to the minimum span inside [0, 1]
        mid = min(max((lo + hi) / 2, ACCURACY_MIN_SPAN / 2), 1 - ACCURACY_MIN_SPAN / 2)
        lo, hi = mid - ACCURACY_MIN_SPAN / 2, mid + ACCURACY_MIN_SPAN / 2
    step = nice_step(hi - lo)
    decimals = max(0, int(-np.floor(np.log10(step * 100) + 1e-9)))
    return {"range": [lo, hi], "autorange": False, "tick0": 0, "dtick": step, "tickformat": f".{decimals}%"}


def display_value(value: float, scale: float = 1.0) -> float:
    """``value`` to 4 significant digits, and 0 where it is below 1e-9 of ``scale`` (rounding noise: the barrier
    of identical models comes out as ±1e-17, not 0)."""
    value = float(value)
    if not np.isfinite(value):
        return value
    if abs(value) <= 1e-9 * max(abs(float(scale)), 1e-12):
        return 0.0
    return float(f"{value:.4g}") + 0.0


BARRIER_COLUMNS = {"linear": "barrier above the line", "mean": "barrier above the endpoint mean",
                   "accuracy_drop": "accuracy drop"}


@takes_results
def barrier_definitions(barrier: BarrierResult | None) -> dict[str, str]:
    """Each barrier definition under the name of its column in :func:`barrier_rows`."""
    if barrier is None:
        return {}
    return {BARRIER_COLUMNS.get(k, k): v for k, v in barrier.definitions.items()}


FITTED_METHODS = ("activation_matching", "repair", "reset_bn")  # alignments fitted on data, not on weights alone


@takes_results
def in_sample_methods(result: ModeConnectivityResult) -> list[str]:
    """The methods of ``result`` whose matching or statistics (activation matching, REPAIR, BatchNorm reset) were
    fitted on the samples their curves are evaluated on (no train split was given), so their barriers are in-sample."""
    return [m for m, curve in result.curves.items()
            if m in FITTED_METHODS and "train" not in curve.params.get("datasets", {})]


IN_SAMPLE_REMEDY = "evaluate on held-out data: pass training data as train_dataset= to mode_connectivity"


@takes_results
def in_sample_note(result: ModeConnectivityResult, remedy: str = IN_SAMPLE_REMEDY) -> str:
    """A sentence on the barriers of ``result`` that are in-sample (:func:`in_sample_methods`), ending in ``remedy``;
    "" when there are none."""
    fitted = [method_label(m) for m in in_sample_methods(result)]
    if not fitted:
        return ""
    return (f"The barriers of {', '.join(fitted)} are in-sample: the matching and statistics they use were fitted on "
            f"the same {result.n_samples} samples they are evaluated on, so they are optimistic. To avoid it, {remedy}.")


@takes_results
def chance_note(result: ModeConnectivityResult, dataset: Dataset) -> str:
    """A sentence when either model scores near or below chance on ``dataset`` (its labels are not what the models
    predict, so the barriers say little); "" otherwise."""
    naive = next(iter(result.curves.values())).accuracy["test"]
    chance = 1 / dataset.n_classes if dataset.n_classes else 0.0
    if min(naive[0], naive[-1]) > 1.5 * chance:
        return ""
    name_a, name_b = result.params.get("model_a", "model A"), result.params.get("model_b", "model B")
    return (f"{name_a} and {name_b} score {naive[0]:.0%} and {naive[-1]:.0%} on {dataset.name}, near or below chance "
            f"({chance:.0%}): the dataset's labels are not what the models predict, so the barriers below say little. "
            "Choose the dataset the models were trained for.")


@takes_results
def barrier_rows(result: ModeConnectivityResult) -> list[dict[str, object]]:
    """One table row per method and split with both barrier definitions."""
    rows = []
    for method, barrier in result.barriers.items():
        curve = result.curves.get(method)
        for split in barrier.linear:
            losses = np.asarray(curve.loss[split], dtype=float) if curve is not None and split in curve.loss else []
            finite = np.abs(losses[np.isfinite(losses)]) if len(losses) else []
            scale = float(np.max(finite)) if len(finite) else 1.0  # the loss scale of the curve
            rows.append(
                {
                    "method": method_label(method),
                    "split": split,
                    "dataset": barrier.params.get("datasets", {}).get(split, ""),
                    BARRIER_COLUMNS["linear"]: display_value(barrier.linear[split], scale),
                    "at λ (line)": barrier.lambda_linear[split],
                    BARRIER_COLUMNS["mean"]: display_value(barrier.mean[split], scale),
                    "at λ (mean)": barrier.lambda_mean[split],
                    BARRIER_COLUMNS["accuracy_drop"]: display_value(barrier.accuracy_drop[split]),
                }
            )
    return rows


@takes_results
def barrier_table(result: ModeConnectivityResult) -> go.Figure:
    """The barrier table as a figure (for the exported report), with the definitions in the caption."""
    rows = barrier_rows(result)
    headers = list(rows[0]) if rows else []
    cells = [[f"{r[h]:.4f}" if isinstance(r[h], float) else r[h] for r in rows] for h in headers]
    widths = [2.2 if h == "method" else 1.4 if h == "dataset" else 0.8 if h == "split" else 1.1 for h in headers]
    fig = go.Figure(go.Table(columnwidth=widths, header={"values": headers, "align": "left"},
                             cells={"values": cells, "align": "left"}))
    defs = _definitions(next(iter(result.barriers.values())) if result.barriers else None)
    fig.update_layout(  # a row per method and split, two lines where a label wraps: every row shows in a static export
        height=240 + 40 * max(len(rows), 1),
        annotations=[
            {
                "text": defs,
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0,
                "y": 0,
                "xanchor": "left",
                "yanchor": "top",
                "align": "left",
                "font": {"size": 10},
            }
        ],
    )
    fig.update_layout(margin={"t": 80, "b": 70})
    return titled(fig, "Loss barriers", estimator="barrier of the interpolation curve", n=result.n_samples)


def _definitions(barrier: BarrierResult | None) -> str:
    return "<br>".join(f"{k}: {v}" for k, v in barrier_definitions(barrier).items())


@takes_results
def layer_alignment_figure(result: LayerAlignmentResult) -> go.Figure:
    """Per layer: distance ‖θ_A − θ_B‖ (left) and top-k singular-vector alignment (right), before and after matching."""
    used = sorted(set(result.n_components.values())) or [result.top_k]
    k = (f"top-{result.top_k}" if used == [result.top_k]
         else f"top-k (k = {used[0]}{f'–{used[-1]}' if len(used) > 1 else ''}: at most each layer's rank)")
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("distance ‖θ_A − θ_B‖ (lower = closer)", f"{k} singular-vector alignment (higher = closer)"),
    )
    grouped_bar_panels(fig, list(result.layers), (("before matching", _BEFORE), ("after matching", _AFTER)),
                       ((result.distance_before, result.distance_after), (result.alignment_before, result.alignment_after)))
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(height=380)
    fig.update_layout(margin={"t": 100})
    return titled(fig, "Per-layer distance and alignment", estimator=result.estimator, n=None)


@takes_results
def singular_values_figure(result: LayerAlignmentResult, max_cols: int = 3, *, name_a: str = "model A",
                           name_b: str = "model B") -> go.Figure:
    """Singular values of each weight matrix of A and B (and the change under B's permutation, in the hover),
    one panel per layer; ``name_a`` and ``name_b`` name the models in the legend."""
    layers = list(result.layers)
    cols = max(1, min(max_cols, len(layers)))
    rows = max(1, (len(layers) + cols - 1) // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[
            f"{layer} (|Δσ| ≤ {change:.0e})" for layer, change in zip(layers, result.singular_value_change)
        ],
    )
    for j, layer in enumerate(layers):
        for name, values, color in (
            (name_a, result.singular_values_a[layer], MODEL_COLORS[0]),
            (f"{name_b} (the same after its permutation)", result.singular_values_b[layer], MODEL_COLORS[1]),
        ):
            fig.add_trace(
                go.Scatter(
                    x=np.arange(1, len(values) + 1),
                    y=values,
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=j == 0,
                    line={"color": color},
                    hovertemplate=f"{layer} · {name}<br>σ_%{{x}} = %{{y:.4g}}<extra></extra>",
                ),
                row=j // cols + 1,
                col=j % cols + 1,
            )
    longest = max((len(v) for v in result.singular_values_a.values()), default=1)
    ticks = [m * 10**e for e in range(len(str(longest))) for m in (1, 2, 5) if m * 10**e <= longest]
    fig.update_xaxes(title_text="index i", type="log", tickvals=ticks, ticktext=[str(t) for t in ticks])  # 20, not "2"
    fig.update_yaxes(type="log", exponentformat="power", minorloglabels="none")  # digits 2..9 of each decade would crowd
    fig.update_yaxes(title_text="σ_i", col=1)  # one title per row: a title between panels runs into the one on its left
    fig.update_layout(height=300 * rows)
    fig.update_layout(margin={"t": 100})
    return titled(
        fig,
        "Singular values of each weight matrix (a permutation leaves them unchanged)",
        estimator="SVD of W reshaped to (out, in·k·k), float64; |Δσ|: largest change between B and permuted B",
        n=None,
    )


@takes_results
def matching_objective(result: WeightMatchingResult) -> go.Figure:
    """The weight-matching objective ``Σ⟨θ_A, π(θ_B)⟩`` after each coordinate-descent pass."""
    fig = go.Figure(
        go.Scatter(
            x=np.arange(len(result.objective)),
            y=result.objective,
            mode="lines+markers",
            hovertemplate="pass %{x}<br>objective %{y:.6g}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="pass (0 = identity)", dtick=1)  # whole passes
    fig.update_yaxes(title_text="Σ ⟨θ_A, π(θ_B)⟩")
    fig.update_layout(height=320)
    state = "converged" if result.converged else "stopped at max_iter"
    return titled(
        fig, f"Weight matching objective ({result.n_iterations} passes, {state})", estimator=result.estimator, n=None
    )


@takes_results
def merge_figure(result: MergeResult) -> go.Figure:
    """Accuracy (left) and loss (right) of each member, the naive average and the aligned merge."""
    names = list(result.names) + ["naive average", f"merged ({result.method.replace('_', ' ')})"]
    colors = [_BEFORE] * len(result.names) + ["#d62728", "#2ca02c"]
    acc = list(result.member_accuracy) + [result.naive_accuracy, result.merged_accuracy]
    loss = list(result.member_loss) + [result.naive_loss, result.merged_loss]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "cross-entropy loss"), horizontal_spacing=0.12)
    fig.add_trace(
        go.Bar(
            x=names,
            y=acc,
            marker_color=colors,
            showlegend=False,
            hovertemplate="%{x}<br>accuracy %{y:.2%}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=names, y=loss, marker_color=colors, showlegend=False, hovertemplate="%{x}<br>loss %{y:.4f}<extra></extra>"
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(tickformat=".0%", range=[0, 1], title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="cross-entropy loss", row=1, col=2)
    fig.update_layout(height=380)
    bn = ", BatchNorm statistics reset" if result.reset_bn else ""
    fig.update_layout(margin={"t": 100})
    return titled(fig, f"Merging {len(result.names)} models", estimator=result.estimator + bn, n=result.n_samples)
