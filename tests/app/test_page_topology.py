"""The topology page: diagrams and barcodes side by side, Betti curves, layer distances, separability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.app.conftest import count_calls, page_errors
from workbench import load_dataset, load_model
from workbench.data.datasets import make_dataset
from workbench.plots._style import figure_title

PAGE = "pages/topology.py"


@pytest.fixture(scope="module")
def narrow(sample_model_path):
    return load_model(sample_model_path("mlp_narrow_seed0")), load_model(sample_model_path("mlp_narrow_seed1"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="test")


def _title(chart) -> str:
    return figure_title(json.loads(chart.proto.spec))


def _open(app, model_a, model_b=None, dataset=None):
    app.session_state["model_a"] = model_a
    app.session_state["model_b"] = model_b
    app.session_state["dataset"] = dataset
    app.run()
    return app.switch_page(PAGE).run()


def test_two_models_side_by_side(app, narrow, digits):
    at = _open(app, *narrow, dataset=digits)
    assert not page_errors(at)
    assert at.title[0].value == "Topology"
    assert [s.value for s in at.subheader] == [
        "Persistence diagrams",
        "Betti curves across layers",
        "Diagram distance between layers",
        "Class separability across layers",
    ]
    charts = at.get("plotly_chart")
    assert len(charts) == 5
    assert all("n = 450" in _title(c) for c in charts)
    assert _title(charts[0]).startswith("Persistence diagrams")
    assert _title(charts[3]).startswith("H1 bottleneck distance between layers")
    assert any("half that bar's lifetime" in c.value for c in at.caption)  # why bottleneck rows can repeat a value
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Longest finite H1 bar (A (mlp_narrow_seed0))"]) > 0
    table = at.dataframe[0].value
    assert len(table) == 10 and set(table["model"]) == {"A (mlp_narrow_seed0)", "B (mlp_narrow_seed1)"}
    relu2 = table[(table["model"] == "A (mlp_narrow_seed0)") & (table["layer"] == "relu2")]
    assert float(relu2["probe accuracy (CV)"].iloc[0]) > 0.9
    config = json.loads(at.dataframe[0].proto.columns)  # short headers (eight columns at 1280 px), full names as tooltips
    assert config["Calinski–Harabasz"]["label"] == "Calinski–H." and config["Calinski–Harabasz"]["help"].startswith(
        "Calinski–Harabasz: between- to within-class dispersion")
    assert config["Thornton index"]["type_config"]["format"] == "%.4f" and config["Fisher ratio (max feature)"]["type_config"]["format"] == "%.4g"
    references = next(c.value for c in at.caption if "References (higher = more separable)" in c.value)
    assert "L2-normalised samples S uses" in references and "Calinski–Harabasz = between- to within-class" in references
    # no subsampling at 450 samples, so no note
    assert not [i.value for i in at.info if "farthest-point" in i.value]
    at.button(key="topo_report").click().run()
    snippet = at.session_state["report_sections"][-1]["snippet"]
    assert "= diagram_distance_matrix({" in snippet and "metric='bottleneck'" in snippet  # the heatmap is recreated too
    assert at.session_state["report_sections"][-1]["title"] == "Topology (H1)"  # sections of H0 and H1 told apart
    distances = at.session_state["report_sections"][-1]["summary"]["diagram distances"]
    assert distances["diagrams"] == "H1, bottleneck distance"  # the key numbers say what they measure
    assert distances["farthest layers"].endswith(f": {distances['max_distance']:.3g}") and " (B)" in distances["farthest layers"]
    summary = at.session_state["report_sections"][-1]["summary"]
    longest = summary["longest finite H1 bar"]  # the numbers the page shows above the Betti curves, by model and layer
    assert list(longest) == ["A (mlp_narrow_seed0) · out", "B (mlp_narrow_seed1) · out"]
    assert f"{longest['A (mlp_narrow_seed0) · out']:.3g}" == metrics["Longest finite H1 bar (A (mlp_narrow_seed0))"]


def test_subsampling_note_and_h0_only(app, narrow, digits):
    at = _open(app, narrow[0], dataset=digits)
    at.number_input(key="topo_max_points").set_value(200).run()
    assert not page_errors(at)
    notes = [i.value for i in at.info if "farthest-point" in i.value]
    assert notes == [
        "H1 was computed on 200 of 450 samples chosen by farthest-point sampling; H0 and the separability score use "
        "every sample."
    ]
    at.radio(key="topo_dim").set_value(0).run()
    assert not page_errors(at)
    assert not [i.value for i in at.info if "farthest-point" in i.value]
    assert _title(at.get("plotly_chart")[1]).startswith("H0 barcodes")
    assert at.metric[0].label == "Longest finite H0 bar (A (mlp_narrow_seed0))"
    assert float(at.metric[0].value) > 0  # the one bar that never dies is left out
    assert at.number_input(key="topo_max_points").disabled  # H0 uses every sample: the H1 subsample size does nothing
    betti = json.loads(at.get("plotly_chart")[2].proto.spec)
    assert figure_title(betti).startswith("Betti-0 curves")
    assert betti["layout"]["xaxis"]["type"] == "log"  # digits' last merges are ~10x the median one in every layer
    assert any(c.value.startswith("The filtration axis is logarithmic") for c in at.caption)


def test_unlabelled_data_shows_only_the_score(app, narrow):
    rng = np.random.default_rng(0)
    data = make_dataset("unlabelled", rng.standard_normal((120, 64)).astype(np.float32))
    at = _open(app, narrow[0], dataset=data)
    assert not page_errors(at)
    assert "unlabelled has no class labels: only the unsupervised score S is shown." in [i.value for i in at.info]
    assert list(at.dataframe[0].value.columns) == ["model", "layer", "score S"]


def test_diagrams_without_a_bar_are_named_and_an_all_zero_matrix_is_explained(app, narrow):
    data = make_dataset("three", np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32))
    at = _open(app, narrow[0], dataset=data)  # three points form no loop: every H1 diagram is empty
    assert not page_errors(at)
    note = "No layer has an H1 bar on these 3 samples, so every distance is 0 and says nothing; use more samples or H0."
    assert note in [w.value for w in at.warning]
    matrix = next(c for c in at.get("plotly_chart") if _title(c).startswith("H1 bottleneck distance between layers"))
    assert note in _title(matrix)


def test_model_b_analysed_alone_is_called_b(app):
    app.session_state["model_a"] = None  # model A could not be loaded
    at = app.switch_page("pages/embedding.py").run()
    assert not page_errors(at)
    assert at.radio(key="emb_mode").options == ["Two layers of model B"]
    at.switch_page("pages/topology.py").run()
    assert not page_errors(at)
    texts = [m.label for m in at.metric] + [json.dumps(json.loads(c.proto.spec)["layout"]) for c in at.get("plotly_chart")]
    assert any("B (mlp_seed1)" in t for t in texts) and not any("A (mlp_seed1)" in t for t in texts)


def test_changing_the_displayed_layer_reuses_the_layer_distances(app, narrow, digits, monkeypatch):
    from workbench.analyses import topology as tp

    calls = count_calls(tp, "diagram_distance_matrix", monkeypatch)
    at = _open(app, narrow[0], dataset=digits)
    at.selectbox(key="topo_distance").set_value("wasserstein").run()
    assert not page_errors(at)
    assert calls and calls[-1]["metric"] == "wasserstein"
    heatmap = at.get("plotly_chart")[3].proto.spec
    done = len(calls)
    layers = at.selectbox(key="topo_layer_a").options
    at.selectbox(key="topo_layer_a").set_value(layers[0]).run()
    assert not page_errors(at)
    assert len(calls) == done  # only the diagrams shown changed
    assert at.get("plotly_chart")[3].proto.spec == heatmap
    at.button(key="topo_report").click().run()
    snippet = at.session_state["report_sections"][-1]["snippet"]
    assert "= diagram_distance_matrix({" in snippet and "metric='wasserstein'" in snippet  # still recreated
    assert len(calls) == done


def test_caption_names_the_probe_reference_only_while_it_is_computed(app, narrow, digits):
    at = _open(app, narrow[0], dataset=digits)
    caption = next(c.value for c in at.caption if c.value.startswith("n = 450"))
    assert "probe = 5-fold cross-validated logistic regression" in caption and "Thornton" in caption
    at.checkbox(key="topo_probe").uncheck().run()
    assert not page_errors(at)
    assert not any(c.startswith("probe") for c in at.dataframe[0].value.columns)
    caption = next(c.value for c in at.caption if c.value.startswith("n = 450"))
    assert "probe" not in caption
    assert "Thornton = share of samples whose nearest neighbour has their class" in caption and "Fisher" in caption


def test_a_layer_constant_over_samples_is_left_out_with_a_caption_that_names_it(app, sample_model):
    from tests.app.conftest import shown

    at = _open(app, sample_model("text_transformer_seed0"), dataset=load_dataset("sentences"))
    at.selectbox(key="topo_pooling").set_value("cls").run()  # every sentence starts with one token: 'embed' is constant
    assert not page_errors(at)
    assert "Layer embed of model text_transformer_seed0 is constant over samples: no topology to compute." in [
        shown(c.value) for c in at.caption
    ]
    assert len(at.get("plotly_chart")) == 5
    layers = at.selectbox(key="topo_layer_a").options
    assert len(layers) == 10 and "embed" not in layers
    assert "embed" not in set(at.dataframe[0].value["layer"])
    at.selectbox(key="topo_metric").set_value("cosine").run()
    assert not page_errors(at)
    barcode = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert "cosine distance" in figure_title(barcode)
    assert barcode["layout"]["xaxis"]["title"]["text"] == "filtration value (cosine distance)"
