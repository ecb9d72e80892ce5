"""Figures for degeneracy results: spectra, ReLU patterns, free parameters, the interaction basis and graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.analyses.degeneracy import (
    DegeneracyResult,
    InteractionBasisResult,
    LLCResult,
    RankResult,
    ReluPatternResult,
)
from workbench.errors import ParameterError, UnknownLayerError, did_you_mean, format_choices
from workbench.plots._style import MODEL_COLORS, order_layers, takes_results, titled

ZERO_FLOOR = 1e-16  # exact zeros are drawn here on log axes
COMMUNITY_COLORS = qualitative.Plotly + qualitative.D3 + qualitative.Set3


def _label(result: object, i: int) -> str:
    return str(getattr(result, "model", "") or f"model {'AB'[i] if i < 2 else i + 1}")


def _union(lists: list[tuple[str, ...]]) -> list[str]:
    out: list[str] = []
    for layers in lists:
        out += [layer for layer in layers if layer not in out]
    return out


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return (n + cols - 1) // cols, cols


def _log_spectrum(values: np.ndarray) -> np.ndarray:
    top = float(values.max()) if values.size else 0.0
    rel = values / top if top > 0 else np.zeros_like(values)
    return np.maximum(rel, ZERO_FLOOR)


def _spectrum_grid(
    results: Sequence[Any],
    spectra: Callable[[Any], dict[str, np.ndarray]],
    detail: Callable[[Any, str], str],
    symbol: str,
    max_cols: int,
) -> go.Figure:
    """One log-scale panel per layer of relative eigenvalues, one line per result, the dashed line at rtol."""
    layers = _union([r.layers for r in results])
    rows, cols = _grid(len(layers), max_cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=layers)
    for i, r in enumerate(results):
        name = _label(r, i)
        for j, layer in enumerate(layers):
            if layer not in spectra(r):
                continue
            ev = spectra(r)[layer]
            fig.add_trace(
                go.Scatter(
                    x=np.arange(1, ev.size + 1),
                    y=_log_spectrum(ev),
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=j == 0,
                    # later models thinner and dotted: equal spectra (two seeds of one model) would hide the first
                    line={"color": MODEL_COLORS[i % len(MODEL_COLORS)], "width": 3.5 if i == 0 else 2,
                          "dash": "solid" if i == 0 else "dot"},
                    hovertemplate=f"{name} · {layer}<br>{symbol}#%{{x}}: %{{y:.3g}} of the largest<br>"
                    f"{detail(r, layer)}<extra></extra>",
                ),
                row=j // cols + 1,
                col=j % cols + 1,
            )
    for j in range(len(layers)):
        fig.add_hline(y=results[0].rtol, line_dash="dash", line_color="grey", row=j // cols + 1, col=j % cols + 1)
    fig.update_yaxes(type="log", exponentformat="power", nticks=6)  # 16 decades: every decade labelled would crowd
    fig.update_yaxes(title_text=f"{symbol.strip() or 'eigenvalue'} / largest", col=1)
    fig.update_layout(height=120 + 300 * rows)
    return fig


@takes_results
def spectrum_figure(*results: RankResult, max_cols: int = 3) -> go.Figure:
    """Eigenvalue spectra per layer on a log scale, relative to the largest, one colour per model.

    Takes the results of :func:`~workbench.analyses.degeneracy.activation_rank` or
    :func:`~workbench.analyses.degeneracy.gradient_rank` (of one or two models). The dashed line is
    the rank tolerance ``rtol``; eigenvalues below it count as zero. Exact zeros are drawn at 1e-16.
    """
    if not results:
        raise ParameterError("spectrum_figure needs at least one RankResult.")
    fig = _spectrum_grid(
        results,
        lambda r: r.eigenvalues,
        lambda r, layer: f"rank {r.rank[layer]} of {r.width[layer]}, effective rank {r.effective_rank[layer]:.1f}",
        "",
        max_cols,
    )
    fig.update_xaxes(title_text="eigenvalue index", row=_grid(len(_union([r.layers for r in results])), max_cols)[0])
    what = "Activation covariance spectra" if results[0].quantity == "activation" else "Jacobian Gram spectra"
    if results[0].output:
        what += f" (∂{results[0].output})"
    return titled(fig, what, estimator=f"{results[0].estimator}; rtol = {results[0].rtol:g}", n=results[0].n_samples)


@takes_results
def relu_pattern_figure(*results: ReluPatternResult) -> go.Figure:
    """Dead, always-on and synchronised ReLU units per layer, as a fraction of the layer's units (counts on the bars)."""
    if not results:
        raise ParameterError("relu_pattern_figure needs at least one ReluPatternResult.")
    kinds = (("dead", "n_dead"), ("always on", "n_always_on"), ("synchronised", "n_synchronised"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[k for k, _ in kinds], shared_yaxes=True)
    top = 0.0
    for i, r in enumerate(results):
        name = _label(r, i)
        for c, (kind, attr) in enumerate(kinds):
            counts = getattr(r, attr)
            fractions = [counts[layer] / r.width[layer] for layer in r.layers]
            top = max(top, *fractions)
            fig.add_trace(
                go.Bar(
                    x=list(r.layers),
                    y=fractions,
                    name=name,
                    legendgroup=name,
                    showlegend=c == 0,
                    marker_color=MODEL_COLORS[i % len(MODEL_COLORS)],
                    text=[str(counts[layer]) for layer in r.layers],
                    textposition="outside",
                    cliponaxis=False,
                    customdata=[[counts[layer], r.width[layer], r.n_groups[layer]] for layer in r.layers],
                    hovertemplate=f"{name} · %{{x}}<br>{kind}: %{{customdata[0]}} of %{{customdata[1]}} units"
                    + ("<br>in %{customdata[2]} groups" if attr == "n_synchronised" else "")
                    + "<extra></extra>",
                ),
                row=1,
                col=c + 1,
            )
    fig.update_yaxes(tickformat=".0%", range=[0, max(0.05, min(1.0, 1.2 * top))])
    fig.update_yaxes(title_text="fraction of units (count on bar)", col=1)
    fig.update_layout(barmode="group", height=340)
    order_layers(fig, *(r.layers for r in results), labels=[_label(r, i) for i, r in enumerate(results)], merge=False)
    return titled(fig, "ReLU firing patterns", estimator=results[0].estimator, n=results[0].n_samples)


@takes_results
def degeneracy_figure(*results: DegeneracyResult) -> go.Figure:
    """Free parameters of each weight matrix by source, as a fraction of its parameters (stacked bars)."""
    if not results:
        raise ParameterError("degeneracy_figure needs at least one DegeneracyResult.")
    sources = (
        ("zero-variance inputs", "free_from_activations", "#4c78a8"),
        ("ignored outputs", "free_from_gradients", "#f58518"),
        ("synchronised ReLUs", "free_from_synchronised", "#54a24b"),
        ("unit rescaling", "free_from_rescaling", "#b279a2"),
        ("always-on bias shifts", "free_from_bias_shift", "#e45756"),
        ("linear maps in a row", "free_from_composition", "#72b7b2"),
    )
    fig = make_subplots(
        rows=1, cols=len(results), subplot_titles=[_label(r, i) for i, r in enumerate(results)], shared_yaxes=True
    )
    for i, r in enumerate(results):
        for label, attr, colour in sources:
            values = getattr(r, attr)
            fig.add_trace(
                go.Bar(
                    x=list(r.modules),
                    y=[values[m] / r.n_parameters[m] for m in r.modules],
                    name=label,
                    legendgroup=label,
                    showlegend=i == 0,
                    marker_color=colour,
                    customdata=[[values[m], r.n_parameters[m], r.free_total[m]] for m in r.modules],
                    hovertemplate=f"%{{x}} · {label}: %{{customdata[0]:,}} of %{{customdata[1]:,}} parameters"
                    "<br>total free (capped): %{customdata[2]:,}<extra></extra>",
                ),
                row=1,
                col=i + 1,
            )
    fig.update_yaxes(tickformat=".0%", title_text="free / parameters", col=1)
    fig.update_layout(barmode="stack", height=380)
    totals = "; ".join(f"{_label(r, i)}: {r.total_free:,} of {r.total_parameters:,}" for i, r in enumerate(results))
    estimator = f"{results[0].estimator}, Jacobians of the {results[0].output}, rtol = {results[0].rtol:g}"
    return titled(fig, f"Free parameters per weight matrix ({totals})", estimator=estimator, n=results[0].n_samples)


@takes_results
def basis_size_figure(*results: InteractionBasisResult) -> go.Figure:
    """Interaction-basis size per layer (solid) against the layer's width, + 1 for the bias coordinate (dashed)."""
    if not results:
        raise ParameterError("basis_size_figure needs at least one InteractionBasisResult.")
    fig = go.Figure()
    for i, r in enumerate(results):
        name = _label(r, i)
        colour = MODEL_COLORS[i % len(MODEL_COLORS)]
        layers = list(r.layers)
        folded = [r.width[layer] + (layer != r.layers[-1]) for layer in layers]
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[r.basis_size[layer] for layer in layers],
                mode="lines+markers",
                name=f"{name}: basis size",
                line={"color": colour},
                hovertemplate=f"{name} · %{{x}}<br>basis size %{{y}}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=folded,
                mode="lines+markers",
                name=f"{name}: width (+1 bias)",
                line={"color": colour, "dash": "dash"},
                marker={"symbol": "line-ew-open", "size": 14},
                hovertemplate=f"{name} · %{{x}}<br>width + bias %{{y}}<extra></extra>",
            )
        )
    fig.update_layout(yaxis_title="directions", yaxis_rangemode="tozero", height=380)
    order_layers(fig, *(r.layers for r in results), labels=[_label(r, i) for i, r in enumerate(results)], merge=False)
    return titled(fig, "Interaction basis size vs layer width", estimator=results[0].estimator, n=results[0].n_samples)


@takes_results
def interaction_spectrum_figure(*results: InteractionBasisResult, max_cols: int = 3) -> go.Figure:
    """The interaction eigenvalues Λ per layer on a log scale, relative to the largest; the dashed line is rtol."""
    if not results:
        raise ParameterError("interaction_spectrum_figure needs at least one InteractionBasisResult.")
    fig = _spectrum_grid(
        results, lambda r: r.interaction_eigenvalues, lambda r, layer: f"basis size {r.basis_size[layer]}", "Λ ", max_cols
    )
    title = "Interaction eigenvalues Λ (activation variance in the basis)"
    return titled(fig, title, estimator=results[0].estimator, n=results[0].n_samples)


@takes_results
def interaction_graph_figure(
    result: InteractionBasisResult, pair: tuple[str, str] | None = None, *, max_edges: int = 400
) -> go.Figure:
    """The interaction graph between two adjacent layers' basis directions, coloured by Louvain community.

    Nodes are the basis directions in the graph (the leading ``graph_directions`` of each layer), in
    two columns, sorted by community and then by ``Λ``. The ``max_edges`` strongest edges are drawn,
    with width growing with the edge strength ``E_ij``. ``pair``: ``(layer_a, layer_b)``, adjacent in
    ``result.layers``; None for the first pair.
    """
    pairs = result.pairs()
    if pair is None:
        pair = pairs[0]
    if tuple(pair) not in pairs:
        options = [f"{a}->{b}" for a, b in pairs]
        key = f"{pair[0]}->{pair[1]}" if len(pair) == 2 else str(pair)
        raise UnknownLayerError(
            f"interaction_graph_figure: {key!r} is not a pair of adjacent layers of this result.{did_you_mean(key, options)} "
            f"Pairs: {format_choices(options)}."
        )
    a, b = pair
    edges = result.edges[f"{a}->{b}"]
    k = result.graph_directions
    na, nb = min(result.basis_size[a], k), min(result.basis_size[b], k)
    sub = edges[:nb, :na]
    ya = _positions(result.communities[a][:na])
    yb = _positions(result.communities[b][:nb])
    fig = go.Figure()
    if sub.size and sub.max() > 0:
        flat = np.argsort(sub, axis=None)[::-1][:max_edges]
        weights = sub.flat[flat] / sub.max()
        bins = ((0.4, 1.01, 3.0, "40–100 %"), (0.1, 0.4, 1.5, "10–40 %"), (0.0, 0.1, 0.5, "under 10 %"))
        for lo, hi, width, share in bins:
            sel = flat[(weights >= lo) & (weights < hi)]
            xs: list[float | None] = []
            ys: list[float | None] = []
            for idx in sel:
                i, j = divmod(int(idx), na)
                xs += [0.0, 1.0, None]
                ys += [float(ya[j]), float(yb[i]), None]
            if xs:
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines",
                        line={"width": width, "color": "rgba(90,90,90,0.45)"},
                        hoverinfo="skip",
                        name=f"edge E_ij {share} of the strongest",
                        legendgroup="edges",
                        legendgrouptitle_text=None if fig.data else f"edges (the {len(flat)} strongest)",
                    )
                )
    shown: set[int] = set()
    for x, layer, ys_, n_ in ((0.0, a, ya, na), (1.0, b, yb, nb)):
        comm = result.communities[layer][:n_]
        lam = result.interaction_eigenvalues[layer][:n_]
        fig.add_trace(
            go.Scatter(
                x=np.full(n_, x),
                y=ys_,
                mode="markers",
                name=layer,
                showlegend=False,
                marker={
                    "size": 9,
                    "color": [COMMUNITY_COLORS[c % len(COMMUNITY_COLORS)] if c >= 0 else "#cccccc" for c in comm],
                    "line": {"width": 0.5, "color": "#333"},
                },
                text=[f"module {c + 1}" if c >= 0 else "in no module" for c in comm],  # numbered as the basis table does
                customdata=np.stack([np.arange(n_), lam], axis=1) if n_ else None,
                hovertemplate=f"{layer} direction %{{customdata[0]:.0f}}<br>%{{text}}<br>Λ %{{customdata[1]:.3g}}<extra></extra>",
            )
        )
        shown.update(int(c) for c in comm)
    for c in sorted(shown):  # a legend entry per module drawn, in the colour of its nodes
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=f"module {c + 1}" if c >= 0 else "in no module",
            marker={"size": 9, "color": COMMUNITY_COLORS[c % len(COMMUNITY_COLORS)] if c >= 0 else "#cccccc",
                    "line": {"width": 0.5, "color": "#333"}},
            legendgroup="modules", legendgrouptitle_text="node colour: Louvain module" if c == min(shown) else None,
        ))
    fig.update_xaxes(tickvals=[0, 1], ticktext=[a, b], range=[-0.3, 1.3], showgrid=False, zeroline=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=max(400, 9 * max(na, nb, 1)))
    q = result.pair_modularity[f"{a}->{b}"]
    return titled(
        fig,
        f"Interaction graph of {result.model}, {a} → {b} (modularity of the pair {q:.3f}, of all layers {result.modularity:.3f})",
        estimator=result.estimator,
        n=result.n_samples,
    )


def _positions(communities: np.ndarray) -> np.ndarray:
    """Vertical node positions in [0, 1]: sorted by community, then by index (Λ order)."""
    n = communities.size
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((np.arange(n), communities))
    pos = np.empty(n)
    pos[order] = np.linspace(1.0, 0.0, n) if n > 1 else np.array([0.5])
    return pos


def _count_kind(result: DegeneracyResult, module: str) -> str:
    """How far a module's count holds: exact, a lower bound (symmetries it can miss), or not pinned down by the samples
    (more directions free on these samples than the population has, see ``sample_limited``)."""
    kinds = [kind for kind, names in (("lower bound", result.lower_bound), ("limited by the samples", result.sample_limited))
             if module in names]
    return "; ".join(kinds) or "exact"


def sample_limited_share(result: DegeneracyResult) -> int:
    """The free parameters of ``result.total_free`` that come from modules whose count the samples do not pin down."""
    return int(sum(result.free_total[m] for m in result.sample_limited))


@takes_results
def summary_rows(result: DegeneracyResult) -> list[dict[str, object]]:
    """One table row per weight matrix of a :class:`DegeneracyResult`."""
    return [
        {
            "model": result.model,
            "matrix": m,
            "shape": f"{result.fan_out[m]} × {result.fan_in[m]}",
            "parameters": result.n_parameters[m],
            "input rank": result.input_rank[m],
            "gradient rank": result.gradient_rank[m],
            "dead units": result.dead_units[m],
            "always-on units": result.always_on_units[m],
            "synchronised groups": len(result.synchronised_group_sizes[m]),
            "free": result.free_total[m],
            "free fraction": result.free_fraction[m],
            "count": _count_kind(result, m),
        }
        for m in result.modules
    ]


@takes_results
def basis_rows(result: InteractionBasisResult) -> list[dict[str, object]]:
    """One table row per node layer of an :class:`InteractionBasisResult`: its width, basis size, how many
    of its directions are in the interaction graph and how they split over the graph's modules (the Louvain
    communities span layers, so each layer lists how many of its directions each module holds, as ``module:
    count`` in module order, leaving out the modules that hold none of them)."""
    n_modules = max((int(c.max()) + 1 for c in result.communities.values() if c.size), default=0)
    rows = []
    for layer in result.layers:
        labels = result.communities[layer]
        counts = np.bincount(labels[labels >= 0], minlength=n_modules)
        rows.append({
            "model": result.model,
            "layer": layer,
            "width": result.width[layer],
            "basis size": result.basis_size[layer],
            "in graph": int((labels >= 0).sum()),
            "directions per module": " · ".join(f"{k + 1}: {int(c)}" for k, c in enumerate(counts) if c) or "none",
        })
    return rows


@takes_results
def llc_trace_figure(*results: LLCResult) -> go.Figure:
    """SGLD minibatch losses per chain (one colour per model), with the burn-in shaded and the estimate and its
    hyper-parameters in the title: the LLC is only meaningful with them, and where the trace is flat after burn-in."""
    if not results:
        raise ParameterError("llc_trace_figure needs at least one LLCResult.")
    fig = go.Figure()
    for i, r in enumerate(results):
        name = _label(r, i)
        colour = MODEL_COLORS[i % len(MODEL_COLORS)]
        for c in range(r.n_chains):
            fig.add_trace(
                go.Scatter(
                    y=r.loss_trace[c],
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=c == 0,
                    line={"color": colour, "width": 1},
                    opacity=0.7,
                    hovertemplate=f"{name} · chain {c}<br>step %{{x}}: loss %{{y:.4g}}<extra></extra>",
                )
            )
        fig.add_hline(y=r.loss_init, line_dash="dot", line_color=colour)
    fig.add_vrect(x0=0, x1=results[0].n_burnin, fillcolor="grey", opacity=0.12, line_width=0)
    fig.update_layout(xaxis_title="SGLD step (shaded: burn-in)", yaxis_title="minibatch cross-entropy", height=360)
    values = "; ".join(f"{_label(r, i)}: {r.llc:.2f} ± {r.llc_std:.2f}" for i, r in enumerate(results))
    return titled(
        fig,
        f"Local learning coefficient {values}",
        estimator=f"{results[0].estimator}; {results[0].hyperparameters()}",
        n=results[0].n_samples,
    )
