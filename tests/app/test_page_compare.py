"""The two-model comparison page: heatmap, measure options, the detail panel, errors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.app.conftest import page_errors, shown
from workbench.plots._style import figure_title

LAYERS = ["fc1", "relu1", "fc2", "relu2", "out"]


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or the typed-array form {"dtype", "bdata", "shape"}."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(s) for s in str(shape).split(",")]) if shape else flat
    return np.asarray(value)


def _titles(at) -> list[str]:
    return [figure_title(json.loads(chart.proto.spec)) for chart in at.get("plotly_chart")]


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture
def compare(app):
    at = app.run()
    return at.switch_page("pages/compare.py").run()


def test_heatmap_and_detail_panel_for_two_models(compare, sample_model, digits_test):
    from workbench import extract
    from workbench.analyses.similarity import similarity_matrix

    at = compare
    assert not page_errors(at)
    assert at.title[0].value == "Similarity (A vs B)"
    titles = _titles(at)
    assert len(titles) == 3  # heatmap, relative scatter, per-class bars
    assert titles[0].startswith("linear CKA: mlp_seed0 vs mlp_seed1") and "n = 450" in titles[0]
    assert all("n = 386" in t for t in titles[1:])  # the relative figures score the 450 samples less the 64 anchors
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert heatmap["data"][0]["x"] == LAYERS and heatmap["data"][0]["y"] == LAYERS
    expected = similarity_matrix(
        extract(sample_model("mlp_seed0"), digits_test, LAYERS), extract(sample_model("mlp_seed1"), digits_test, LAYERS)
    ).values
    np.testing.assert_allclose(_array(heatmap["data"][0]["z"]), expected, atol=1e-9)
    assert _metrics(at)["linear CKA"] == f"{expected[-1, -1]:.4f}"  # detail of the last cell by default
    at.selectbox(key="cmp_cell_a").set_value("fc1")
    at.selectbox(key="cmp_cell_b").set_value("fc1").run()
    metrics = _metrics(at)
    assert metrics["linear CKA"] == f"{expected[0, 0]:.4f}"
    assert float(metrics["Jaccard@10 (relative)"]) > 0.5


def test_every_cell_is_read_against_the_chance_level_of_shuffled_samples(compare):
    import re

    from workbench.analyses.similarity import chance_level

    at = compare
    caption = next(c.value for c in at.caption if c.value.startswith("Chance level"))
    low, high = (float(v) for v in re.search(r"random order\): ([-\d.]+) to ([-\d.]+)", caption).groups())
    assert 0.0 <= low <= high < 0.2  # unrelated samples score far below the matching layers (0.92-0.98)
    acts = at.session_state  # the page's chance level is the library's on the same activations
    from workbench import extract

    a = extract(acts["model_a"], acts["dataset"], list(at.multiselect(key="cmp_layers_a").value))
    b = extract(acts["model_b"], acts["dataset"], list(at.multiselect(key="cmp_layers_b").value))
    expected = chance_level(a, b)
    assert f"{expected.values.min():.2g} to {expected.values.max():.2g}" in caption
    delta = at.metric[0].proto.delta
    assert delta.endswith(f"vs chance ({expected.values[-1, -1]:.3f})")
    at.button(key="cmp_report").click().run()
    section = at.session_state["report_sections"][0]  # the exported section reads the cells against chance too
    assert section["result"][1].values.max() == pytest.approx(expected.values.max())
    assert section["summary"]["chance level (B's samples shuffled)"]["max"] == pytest.approx(float(expected.values.max()))
    assert "'chance': True" in section["snippet"]
    at.button(key="cmp_detail_report").click().run()  # the cell detail's section carries the cell's own value and chance
    detail = at.session_state["report_sections"][-1]["summary"]
    assert detail["linear CKA"] == pytest.approx(float(section["result"][0].values[-1, -1]))
    assert detail["chance level"] == pytest.approx(float(expected.values[-1, -1]))
    assert any(k != "linear CKA" and k != "chance level" for k in detail)  # and the relative-representation numbers
    at.checkbox(key="cmp_debiased").check().run()
    assert not page_errors(at)
    caption = next(c.value for c in at.caption if c.value.startswith("Chance level"))
    assert "tick 'Debiased'" not in caption
    at.checkbox(key="cmp_chance").uncheck().run()
    assert not any(c.value.startswith("Chance level") for c in at.caption) and not at.metric[0].proto.delta


def test_measure_options_change_the_heatmap(compare):
    at = compare
    at.selectbox(key="cmp_measure").set_value("rbf_cka").run()
    at.slider(key="cmp_sigma").set_value(0.5).run()
    assert not page_errors(at)
    assert "RBF CKA (sigma = 0.5 x median distance), biased HSIC" in _titles(at)[0]
    at.selectbox(key="cmp_measure").set_value("procrustes_distance").run()
    at.checkbox(key="cmp_angular").check().run()
    title = _titles(at)[0]
    assert title.startswith("angular Procrustes distance") and "lower is closer" in title


def test_the_same_model_chosen_as_a_and_b_is_said_to_be_b(app):
    at = app.run()
    at.selectbox(key="model_b_choice").set_value("mlp_seed0").run()
    assert "Model B is the same checkpoint as model A (mlp\\_seed0): comparisons show a model with itself." in [
        c.value for c in at.caption]
    at.switch_page("pages/compare.py").run()
    assert not page_errors(at)
    captions = [c.value for c in at.caption]
    assert "Model B is the same checkpoint as model A (mlp\\_seed0, the same weights): it is compared with itself." in captions
    assert not any("No model B is chosen" in c for c in captions)


def test_model_with_itself_has_unit_diagonal(app):
    app.session_state["model_b"] = None
    at = app.run()
    at.switch_page("pages/compare.py").run()
    assert not page_errors(at)
    assert any("compared with itself" in c.value for c in at.caption)
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    np.testing.assert_allclose(np.diag(_array(heatmap["data"][0]["z"])), 1.0, atol=1e-9)
    at.selectbox(key="cmp_cell_a").set_value("relu1")
    at.selectbox(key="cmp_cell_b").set_value("relu1").run()
    metrics = _metrics(at)
    assert metrics["linear CKA"] == "1.0000" and metrics["Jaccard@10 (relative)"] == "1.000"


def test_cca_of_pairs_wider_than_the_samples_is_marked_n_a_and_the_rest_is_shown(compare):
    at = compare
    at.selectbox(key="cmp_measure").set_value("cca_similarity").run()
    at.selectbox(key="cmp_cca_kind").set_value("mean").run()
    assert not page_errors(at) and not at.exception
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    z = _array(heatmap["data"][0]["z"])
    rows = heatmap["data"][0]["y"]
    assert np.isnan(z[rows.index("relu1")]).all()  # 512 ReLU units span all 449 dimensions the samples leave
    out = rows.index("out")
    assert np.isfinite(z[out, heatmap["data"][0]["x"].index("out")]) and np.isfinite(z[out]).sum() >= 2
    assert any("n/a (NaN) for" in c.value and "use the SVCCA summary (kind='svcca') for them" in shown(c.value) for c in at.caption)
    at.selectbox(key="cmp_cell_a").set_value("relu1")
    at.selectbox(key="cmp_cell_b").set_value("relu1").run()
    assert _metrics(at)["CCA similarity (mean CCA)"] == "n/a"


def test_pwcca_when_no_pair_is_defined_points_to_svcca(compare):
    at = compare
    at.multiselect(key="cmp_layers_a").set_value(["relu1"])
    at.multiselect(key="cmp_layers_b").set_value(["relu1"]).run()
    at.selectbox(key="cmp_measure").set_value("cca_similarity").run()
    at.selectbox(key="cmp_cca_kind").set_value("pwcca").run()
    errors = page_errors(at)
    assert len(errors) == 1 and "some canonical correlations are 1 whatever the data" in errors[0]
    assert any("choose 'svcca' under CCA summary" in i.value for i in at.info) and not at.exception
    at.selectbox(key="cmp_cca_kind").set_value("svcca").run()
    assert not page_errors(at) and at.get("plotly_chart")
    assert any("a wide layer) fits a narrow layer's few closely" in c.value for c in at.caption)  # why such cells read 1
    at.button(key="cmp_report").click().run()
    assert at.session_state["report_sections"][0]["title"].startswith("CCA similarity (SVCCA): ")  # names its summary


def test_the_heatmap_and_report_section_name_the_variant_of_the_measure(compare):
    import plotly.io

    at = compare
    at.selectbox(key="cmp_measure").set_value("procrustes_distance").run()
    at.checkbox(key="cmp_angular").check().run()
    heatmap = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)
    assert heatmap.data[0].colorbar.title.text.startswith("angular Procrustes distance<br>")
    at.button(key="cmp_report").click().run()
    assert at.session_state["report_sections"][-1]["title"].startswith("angular Procrustes distance: ")
    at.selectbox(key="cmp_measure").set_value("linear_cka").run()
    at.checkbox(key="cmp_debiased").check().run()
    at.button(key="cmp_report").click().run()
    assert at.session_state["report_sections"][-1]["title"].startswith("debiased linear CKA: ")


def test_layers_and_the_detail_cell_are_kept_while_the_user_visits_another_page(compare):
    at = compare
    at.multiselect(key="cmp_layers_a").set_value(["relu1", "relu2"]).run()
    at.selectbox(key="cmp_cell_a").set_value("relu2")
    at.selectbox(key="cmp_cell_b").set_value("relu1").run()
    at.switch_page("pages/activations.py").run()
    at.switch_page("pages/compare.py").run()
    assert list(at.multiselect(key="cmp_layers_a").value) == ["relu1", "relu2"]
    assert (at.selectbox(key="cmp_cell_a").value, at.selectbox(key="cmp_cell_b").value) == ("relu2", "relu1")
    assert not at.exception


def test_a_layer_constant_over_samples_is_n_a_and_the_others_are_compared(app, sample_model):
    from workbench import load_dataset

    app.session_state["model_a"] = sample_model("text_transformer_seed0")
    app.session_state["model_b"] = None
    app.session_state["dataset"] = load_dataset("sentences")
    at = app.run()
    at.switch_page("pages/compare.py").run()
    at.selectbox(key="cmp_pooling").set_value("cls").run()  # every sentence starts with the same token: 'embed' is constant
    assert not page_errors(at) and not at.exception
    heatmap = json.loads(at.get("plotly_chart")[0].proto.spec)
    z, rows = _array(heatmap["data"][0]["z"]), heatmap["data"][0]["y"]
    assert np.isnan(z[rows.index("embed")]).all() and np.isfinite(np.delete(z, rows.index("embed"), 0)).any()
    assert any("n/a (NaN) for the layers constant over samples" in shown(c.value) and "embed of model A (text_transformer_seed0)"
               in shown(c.value) for c in at.caption)
