"""Figure layout: legends that name each panel's own layers, one axis stretch per architecture, tick labels and
legends clear of each other, subtitles clear of the plot area, reference lines across the whole plot."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from workbench.analyses.degeneracy import interaction_basis
from workbench.analyses.embedding import aligned_embedding, layer_intrinsic_dimension
from workbench.analyses.probing import probe_layers
from workbench.analyses.relative import stitch
from workbench.analyses.similarity import similarity_matrix
from workbench.analyses.stats import activation_stats
from workbench.analyses.topology import layer_separability, persistence
from workbench.data import make_dataset
from workbench.plots._style import figure_title, order_layers, title_margin, titled
from workbench.plots.activations import layer_histograms
from workbench.plots.degeneracy import basis_size_figure
from workbench.plots.embedding import embedding_scatter, intrinsic_dimension_profile
from workbench.plots.probing import probe_profile
from workbench.plots.similarity import similarity_heatmap, stitching_bars
from workbench.plots.topology import betti_curves, persistence_diagram, separability_curves

MLP = ["fc1", "relu1", "fc2", "relu2", "out"]
TANH = ["fc1", "tanh1", "fc2", "tanh2", "out"]
CNN = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "fc1", "relu_fc1", "out"]
TEXT = ["embed", "layers.0.self_attn", "layers.0.norm1", "layers.0.linear1", "layers.0.linear2", "layers.0.norm2",
        "layers.0", "layers.1.self_attn", "layers.1.norm1", "layers.1", "norm"]
SUBTITLE_TOP = 48  # measured in Chromium: the subtitle's first line starts 48 px below the figure's top edge
SUBTITLE_LINE = 15.4  # measured line height of plotly's 12 px subtitle


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def _layers(names, rng, n=60, d=6):
    y = np.arange(n) % 3
    return {name: rng.normal(size=(n, d)) + y[:, None] * (k + 1) for k, name in enumerate(names)}, y


def _persistence(names, rng):
    feats, _ = _layers(names, rng, n=30, d=3)
    return {name: persistence(x, max_dim=1) for name, x in feats.items()}


def _legend_entries(fig: go.Figure) -> list[go.Scatter]:
    return [t for t in fig.data if t.showlegend is not False]


def _plot_height(fig: go.Figure) -> float:
    return fig.layout.height - fig.layout.margin.t - (fig.layout.margin.b if fig.layout.margin.b is not None else 80)


# Betti curves


def test_betti_legend_names_each_panels_own_layers_under_its_model(rng):
    mlp, cnn = _persistence(MLP, rng), _persistence(CNN, rng)
    fig = betti_curves(mlp, cnn, names=["A (mlp_seed0)", "B (cnn_seed0)"])
    second = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in second] == CNN  # the CNN panel's curves carry the CNN's layer names...
    assert [t.name for t in _legend_entries(fig)] == MLP + CNN  # ...and the legend lists them
    groups = {t.legendgroup for t in fig.data if t.xaxis == "x"}, {t.legendgroup for t in second}
    assert len(groups[0]) == len(groups[1]) == 1 and groups[0] != groups[1]  # one legend group per model
    assert [t.legendgrouptitle.text for t in fig.data if t.legendgrouptitle.text] == ["A (mlp_seed0)", "B (cnn_seed0)"]
    assert all("B (cnn_seed0) · " in t.hovertemplate for t in second)
    assert len({t.line.color for t in second}) == len(CNN)  # no colour repeats within a panel


@pytest.mark.parametrize("layers", [CNN, TEXT])
def test_betti_figure_grows_so_the_whole_legend_shows(rng, layers):
    fig = betti_curves(_persistence(MLP, rng), _persistence(layers, rng), names=["A", "B"])
    rows = len(MLP) + len(layers) + 2  # entries and the two model names
    assert _plot_height(fig) >= 19 * rows + 12  # plotly's legend rows are about 19 px, plus the gap between groups


def test_betti_models_with_the_same_layers_share_one_legend_entry_per_layer(rng):
    fig = betti_curves(_persistence(MLP, rng), _persistence(MLP, rng), names=["seed 0", "seed 1"])
    assert [t.name for t in _legend_entries(fig)] == MLP
    assert [t.legendgroup for t in fig.data] == MLP + MLP  # one click shows or hides a layer in both panels


# profiles of two models on one x axis


def _stretches(fig: go.Figure, trace: go.Scatter) -> list[int]:
    order = list(fig.layout.xaxis.categoryarray)
    return [order.index(x) for x in trace.x]


def test_models_with_other_layer_names_get_an_axis_stretch_each_in_every_profile(rng):
    a, y = _layers(MLP, rng)
    b, _ = _layers(TANH, rng)
    ida, idb = layer_intrinsic_dimension(a), layer_intrinsic_dimension(b)
    fig = intrinsic_dimension_profile(ida, idb, names=["mlp", "tanh"])
    assert list(fig.layout.xaxis.categoryarray) == [f"mlp · {n}" for n in MLP] + [f"tanh · {n}" for n in TANH]
    assert _stretches(fig, fig.data[0]) == [0, 1, 2, 3, 4] and _stretches(fig, fig.data[1]) == [5, 6, 7, 8, 9]
    assert list(fig.layout.xaxis.ticktext) == MLP + TANH  # the ticks read the layer names
    assert [a.text for a in fig.layout.annotations if a.yanchor == "bottom"] == ["<b>mlp</b>", "<b>tanh</b>"]
    assert [s.x0 for s in fig.layout.shapes] == [4.5]  # a dotted line between the stretches
    assert "%{x}" in fig.data[0].hovertemplate and "mlp · %{x}" not in fig.data[0].hovertemplate
    probes = probe_profile(probe_layers(a, y, cv=3, control=False), probe_layers(b, y, cv=3, control=False),
                           names=["mlp", "tanh"])
    assert list(probes.layout.xaxis.categoryarray) == list(fig.layout.xaxis.categoryarray)


def test_identical_layer_lists_share_the_axis(rng):
    a, _ = _layers(MLP, rng)
    b, _ = _layers(MLP, rng)
    fig = intrinsic_dimension_profile(layer_intrinsic_dimension(a), layer_intrinsic_dimension(b), names=["s0", "s1"])
    assert list(fig.layout.xaxis.categoryarray) == MLP and list(fig.data[1].x) == MLP
    assert not fig.layout.shapes and not fig.layout.annotations


def _relu_net(names: list[str], sizes: list[int], seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for k, name in enumerate(names):
        modules[name] = nn.Linear(sizes[k // 2], sizes[k // 2 + 1]) if k % 2 == 0 else nn.ReLU()
    model = nn.Sequential(modules)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def test_basis_size_of_two_architectures_draws_each_line_on_its_own_stretch():
    data = make_dataset("synthetic", torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3)
    deep = _relu_net(["fc1", "relu1", "fc2", "relu2", "out"], [4, 5, 5, 3], 0)
    shallow = _relu_net(["fc1", "relu_fc1", "out"], [4, 6, 3], 1)
    results = [interaction_basis(m, data, layers) for m, layers in ((deep, ["input", "relu1", "relu2"]),
                                                                    (shallow, ["input", "relu_fc1"]))]
    fig = basis_size_figure(*results)
    order = list(fig.layout.xaxis.categoryarray)
    first = {order.index(x) for t in fig.data[:2] for x in t.x}
    second = {order.index(x) for t in fig.data[2:] for x in t.x}
    assert max(first) < min(second)  # the second line never crosses the first one's layers
    assert len(order) == len(results[0].layers) + len(results[1].layers)


def test_grouped_bars_on_stretches_are_overlaid():
    fig = go.Figure([go.Bar(x=["a", "b"], y=[1, 2]), go.Bar(x=["c"], y=[3])]).update_layout(barmode="group")
    order_layers(fig, ["a", "b"], ["c"], labels=["m1", "m2"], merge=False)
    assert fig.layout.barmode == "overlay" and list(fig.data[1].x) == ["m2 · c"]


# probing: tick labels and legend


def test_probe_ticks_of_two_architectures_are_layer_names_and_the_legend_is_clear_of_them(rng):
    a, y = _layers(MLP, rng)
    b, _ = _layers(CNN, rng)
    fig = probe_profile(probe_layers(a, y, cv=3, control=True), probe_layers(b, y, cv=3, control=True),
                        names=["mlp_seed0", "cnn_seed0"])
    assert list(fig.layout.xaxis.ticktext) == MLP + CNN  # short: no "mlp_seed0 · " on every tick
    assert fig.layout.xaxis.automargin is True
    labels = [a.text for a in fig.layout.annotations if a.yanchor == "bottom" and a.yref == "y domain"]
    assert labels == ["<b>mlp_seed0</b>", "<b>cnn_seed0</b>"]  # the model named once, above its stretch
    legend = fig.layout.legend
    assert legend.orientation != "h" and (legend.y is None or legend.y >= 0)  # not in the tick labels' row


# subtitles


@pytest.mark.parametrize("n_lines", [1, 2, 4, 6])
def test_the_top_margin_holds_every_subtitle_line(n_lines):
    from workbench.plots._style import SUBTITLE_WIDTH

    per_line = (SUBTITLE_WIDTH + 1) // len("word ")
    estimator = " ".join(["word"] * (per_line * n_lines - 2))  # wraps to n_lines full lines
    fig = titled(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), "Title", estimator=estimator)
    lines = fig.layout.title.subtitle.text.split("<br>")
    assert len(lines) == n_lines
    assert all(line.endswith(" ") for line in lines[:-1])  # text read from the figure keeps the words apart
    assert figure_title(fig) == f"Title · {estimator}"
    assert fig.layout.title.yanchor == "top" and fig.layout.title.y == 1  # the title does not move down
    assert fig.layout.margin.t >= SUBTITLE_TOP + SUBTITLE_LINE * n_lines + 8  # 8 px clear of the plot area


def test_the_pwcca_note_stays_above_the_heatmap(rng):
    a = {"a1": rng.normal(size=(30, 20)), "a2": rng.normal(size=(30, 25))}
    b = {"b1": rng.normal(size=(30, 20)), "b2": rng.normal(size=(30, 4))}
    result = similarity_matrix(a, b, measure="cca_similarity", kind="pwcca")
    fig = similarity_heatmap(result)
    lines = fig.layout.title.subtitle.text.split("<br>")
    assert len(lines) >= 3  # the note on the undefined cells
    assert fig.layout.margin.t >= SUBTITLE_TOP + SUBTITLE_LINE * len(lines) + 8
    # the heatmap keeps the room it has under a two-line subtitle: the figure grows by the extra lines
    assert _plot_height(fig) >= max(360, 46 * 2 + 180) - title_margin(2) - 80
    undefined = [t for t in fig.data if t.name == "undefined"]  # the blank cells say why they are blank
    nan_cells = {(result.layers_a[i], result.layers_b[j]) for i, j in zip(*np.nonzero(np.isnan(result.values)))}
    assert nan_cells and len(undefined) == 1 and set(undefined[0].text) == {"n/a"}
    assert set(zip(undefined[0].y, undefined[0].x)) == nan_cells


def test_subplot_titles_and_model_names_above_the_plot_get_their_rows():
    fig = go.Figure(go.Scatter(x=["a", "b", "c"], y=[1, 2, 3]))
    fig.add_annotation(text="panel", x=0.5, y=1.0, xref="paper", yref="paper", yanchor="bottom", showarrow=False)
    fig.add_annotation(text="model", x=1, y=1.0, xref="x", yref="y domain", yanchor="bottom", yshift=22,
                       showarrow=False)
    titled(fig, "Title", estimator="one line")
    assert fig.layout.margin.t >= SUBTITLE_TOP + SUBTITLE_LINE + 8 + 20 + 22


# stitching


def test_stitching_reference_lines_span_the_whole_x_range(rng):
    x_tr, x_te = rng.normal(size=(120, 5)), rng.normal(size=(40, 5))
    y_tr, y_te = (x_tr[:, 0] > 0).astype(int), (x_te[:, 0] > 0).astype(int)
    result = stitch(x_tr, x_tr * 2, x_te, x_te * 2, y_tr, y_te, n_anchors=20, epochs=5,
                    logits_a=np.stack([-x_te[:, 0], x_te[:, 0]], 1), logits_b=np.stack([-x_te[:, 0], x_te[:, 0]], 1))
    fig = stitching_bars(result, name_a="s0", name_b="s1")
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.name.split(":")[0] for t in lines][-1] == "chance" and len(lines) >= 1
    for t in lines:
        assert t.xaxis == "x2" and list(t.x) == [0, 1]
    axis = fig.layout.xaxis2
    assert axis.overlaying == "x" and list(axis.range) == [0, 1] and axis.visible is False
    assert all(t.xaxis in (None, "x") for t in fig.data if t.type == "bar")


# similarity heatmap colour scale


def _heatmap(fig: go.Figure) -> go.Heatmap:
    return next(t for t in fig.data if t.type == "heatmap")


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_heatmaps_share_a_fixed_colour_scale_whatever_the_variant(rng, debiased):
    y = np.arange(40) % 4
    a = {f"a{k}": rng.normal(size=(40, 30)) + y[:, None] * k / 3 for k in range(3)}
    b = {f"b{k}": rng.normal(size=(40, 30)) + y[:, None] * k / 3 for k in range(3)}
    result = similarity_matrix(a, b, measure="linear_cka", debiased=debiased)
    values = np.asarray(result.values)
    assert values.max() < 0.95  # no cell reaches 1: a data-range scale would stretch to the largest cell
    heatmap = _heatmap(similarity_heatmap(result))
    assert heatmap.zmax == 1.0
    assert heatmap.zmin == min(0.0, float(values.min()))  # 0, or below it where debiased CKA is negative
    assert "higher is closer" in heatmap.colorbar.title.text


def test_debiased_cka_below_zero_stays_on_the_scale():
    rng = np.random.default_rng(0)
    a = {"a1": rng.normal(size=(12, 40)), "a2": rng.normal(size=(12, 40))}
    b = {"b": rng.normal(size=(12, 40))}
    result = similarity_matrix(a, b, measure="linear_cka", debiased=True)
    assert float(np.asarray(result.values).min()) < 0  # independent features: debiased CKA about 0, here below
    heatmap = _heatmap(similarity_heatmap(result))
    assert heatmap.zmin == float(np.asarray(result.values).min()) and heatmap.zmax == 1.0


def test_rsa_heatmap_uses_the_fixed_scale_and_distances_their_data_range(rng):
    a = {f"a{k}": rng.normal(size=(30, 6)) for k in range(2)}
    b = {f"b{k}": rng.normal(size=(30, 6)) for k in range(2)}
    rsa = _heatmap(similarity_heatmap(similarity_matrix(a, b, measure="rsa")))
    assert rsa.zmax == 1.0 and rsa.zmin <= 0.0
    distance = _heatmap(similarity_heatmap(similarity_matrix(a, b, measure="procrustes_distance")))
    assert distance.zmin is None and distance.zmax is None  # the data range
    assert "lower is closer" in distance.colorbar.title.text
    assert distance.colorscale[0][1] != rsa.colorscale[0][1]  # reversed: the closest pairs bright in both


# embedding panels in one frame


def test_the_views_of_an_aligned_embedding_share_their_axis_ranges(rng):
    x = rng.normal(size=(80, 6))
    wide = x + (np.arange(80) == 0)[:, None] * 25  # one far sample in view B
    result = aligned_embedding({"A": x, "B": wide}, method="pca")
    coords = np.asarray(result.coordinates)
    spans = [np.ptp(coords[v, :, :2]) for v in range(2)]
    assert max(spans) > 1.5 * min(spans)  # the views' own extents differ
    figs = [embedding_scatter(result, view=v) for v in range(2)]
    ranges = [(list(f.layout.xaxis.range), list(f.layout.yaxis.range)) for f in figs]
    assert ranges[0] == ranges[1]  # the same frame in both panels
    x_range, y_range = ranges[0]
    assert x_range == y_range  # and the same scale on both axes...
    assert figs[0].layout.yaxis.scaleanchor == "x" and figs[0].layout.yaxis.scaleratio == 1  # ...at equal aspect
    assert x_range[0] < coords[:, :, :2].min() and coords[:, :, :2].max() < x_range[1]  # every sample shows


def test_three_dimensional_views_share_a_cube(rng):
    x = rng.normal(size=(50, 5))
    result = aligned_embedding({"A": x, "B": x * 3 + rng.normal(size=(50, 5))}, method="pca", n_components=3)
    scenes = [embedding_scatter(result, view=v).layout.scene for v in range(2)]
    for scene in scenes:
        assert list(scene.xaxis.range) == list(scene.yaxis.range) == list(scene.zaxis.range)
        assert scene.aspectmode == "cube"
    assert list(scenes[0].xaxis.range) == list(scenes[1].xaxis.range)


# activation histograms

TICK_LABELS = 18  # pixels of a row of 12 px tick labels below a panel
AXIS_TITLE = 20  # pixels of a 14 px x axis title below the tick labels
PANEL_TITLE = 22  # pixels of a 16 px subplot title above a panel


def _histograms(n_layers: int) -> go.Figure:
    g = torch.Generator().manual_seed(0)
    acts = {f"layers.{k}.linear": torch.randn(40, 4, generator=g) for k in range(n_layers)}
    return layer_histograms(activation_stats(acts, model="m"))


@pytest.mark.parametrize("n_layers", [6, 7, 12, 20])
def test_histogram_rows_sit_close_and_their_titles_fit_between_them(n_layers):
    fig = _histograms(n_layers)
    rows = (n_layers + 2) // 3
    plot = _plot_height(fig)
    tops = sorted({fig.layout[k].domain[1] for k in fig.layout if k.startswith("yaxis")}, reverse=True)
    bottoms = sorted({fig.layout[k].domain[0] for k in fig.layout if k.startswith("yaxis")}, reverse=True)
    assert len(tops) == rows
    axis_title_between = n_layers % 3 != 0  # the lowest panel of a column above an empty slot has its x title
    for r in range(rows - 1):
        gap = (bottoms[r] - tops[r + 1]) * plot
        needed = TICK_LABELS + PANEL_TITLE + (AXIS_TITLE if axis_title_between else 0)
        assert needed + 8 <= gap <= needed + 40  # the title fits, and no wide empty band
    titles = [a for a in fig.layout.annotations if a.text.startswith("layers.")]
    for a in titles:  # each subplot title sits on its panel's top edge, below the tick labels of the row above
        assert a.yanchor == "bottom" and any(abs(a.y - t) < 1e-9 for t in tops)
        above = [b for b in bottoms if b > a.y + 1e-9]
        if above:
            assert (min(above) - a.y) * plot >= TICK_LABELS + PANEL_TITLE
    assert (fig.layout.margin.b if fig.layout.margin.b is not None else 80) >= TICK_LABELS + AXIS_TITLE + 20
    for top, bottom in zip(tops, bottoms):  # every panel keeps its height, however many rows
        assert 160 <= (top - bottom) * plot <= 240


# topology: separability panels, the persistence diagram's infinity


def test_every_separability_panel_names_its_axis_and_the_reversed_one_says_so(rng):
    feats, y = _layers(["l1", "l2", "l3"], rng)
    fig = separability_curves(layer_separability(feats, labels=y, probe=False), names=["A"])
    axes = [fig.layout[k] for k in ("yaxis", "yaxis2", "yaxis3")]
    assert all(axis.title.text for axis in axes)
    assert axes[0].autorange == "reversed" and "axis reversed" in axes[0].title.text
    plot = _plot_height(fig)
    for upper, lower in zip(axes, axes[1:]):  # the upper panel's lowest tick label (half below), then the title
        assert (upper.domain[0] - lower.domain[1]) * plot >= TICK_LABELS / 2 + PANEL_TITLE + 8
    unlabelled = separability_curves(layer_separability(feats))
    assert "axis reversed" in unlabelled.layout.yaxis.title.text


def test_the_persistence_diagram_labels_infinity_once_per_panel_clear_of_the_numbers(rng):
    a = persistence(rng.normal(size=(40, 3)), max_dim=1)
    b = persistence(rng.normal(size=(40, 3)) * 3.5, max_dim=1)
    fig = persistence_diagram(a, b)
    assert not [x for x in fig.layout.annotations if "∞" in x.text]  # an annotation there is drawn over the axis's own tick label
    plot = _plot_height(fig)
    never_dies = {t.yaxis: max(t.y) for t in fig.data if t.name == "H0"}
    for key in ("yaxis", "yaxis2"):
        axis = fig.layout[key]
        assert axis.tickmode == "array" and list(axis.ticktext or ()).count("∞") == 1
        infinite = axis.tickvals[list(axis.ticktext).index("∞")]
        assert infinite == pytest.approx(never_dies["y" + key[len("yaxis"):]])
        below = max(v for v in axis.tickvals if v < infinite)
        assert (infinite - below) / (axis.range[1] - axis.range[0]) * plot >= TICK_LABELS


def test_a_wrapped_subtitle_keeps_an_equation_on_one_line():
    from workbench.plots._style import SUBTITLE_WIDTH, _wrap

    words = "held-out probe accuracy ·"
    filler = "x" * (SUBTITLE_WIDTH - len(words) - 3)  # "n" ends the first line's room: "= 450" would have gone below
    lines = _wrap(f"{filler} {words} n = 450 and λ = 0.5")
    assert any(line.endswith("n = 450 and λ = 0.5") or "n = 450" in line for line in lines)
    assert not any(line.rstrip().endswith(" n") or line.startswith("= ") for line in lines)
    assert " ".join(lines) == f"{filler} {words} n = 450 and λ = 0.5"
