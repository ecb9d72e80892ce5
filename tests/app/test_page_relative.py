"""The relative-representations page: agreement per layer, relative vs absolute, zero-shot stitching."""

from __future__ import annotations

import json

from tests.app.conftest import page_errors, shown
from tests.app.test_page_compare import _array
from workbench.plots._style import figure_title


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_relative_beats_absolute_per_layer(app):
    at = app.run()
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    assert at.title[0].value == "Relative representations"
    table = at.dataframe[0].value
    assert list(table["layer of A"]) == ["fc1", "relu1", "fc2", "relu2", "out"]
    hidden = table[table["layer of A"] != "out"]
    assert (hidden["Jaccard relative"] > hidden["Jaccard absolute"]).all()
    assert (hidden["MRR relative"] > hidden["MRR absolute"]).all()
    metrics = _metrics(at)
    assert float(metrics["Best relative Jaccard@10"]) > 0.5 and float(metrics["Absolute Jaccard@10 there"]) < 0.1
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    title = figure_title(json.loads(charts[0].proto.spec))
    assert "64 random anchors" in title and "n = 386" in title  # the 450 test samples less the 64 anchors


def test_zero_shot_stitching(app):
    at = app.run()
    at.switch_page("pages/relative.py").run()
    at.multiselect(key="rel_layers").set_value(["relu2", "out"]).run()
    at.slider(key="rel_epochs").set_value(40)
    at.toggle(key="rel_stitch").set_value(True).run()
    assert not page_errors(at)
    metrics = _metrics(at)
    assert float(metrics["B → head of A (stitched)"]) > 0.9
    assert float(metrics["Absolute stitching"]) < 0.3
    assert metrics["A's own output layer"] == "0.973"
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    spec = json.loads(charts[1].proto.spec)
    assert (
        figure_title(spec).startswith("Zero-shot stitching")
        and "n = 450" in figure_title(spec)
    )
    bars = _array(spec["data"][0]["y"])
    assert (bars > 0.9).all()  # relative heads, own and stitched
    assert any("Heads trained on 1283 samples of digits (train) (its 1347 samples less the 64 anchors" in c.value for c in at.caption)
    at.button(key="rel_stitch_report").click().run()
    section = at.session_state["report_sections"][0]  # the report names the data the heads were trained on
    assert section["dataset_object"].name == "digits (test)" and section["train_dataset_object"].name == "digits (train)"


def test_needs_two_models(app):
    app.session_state["model_b"] = None
    at = app.run()
    at.switch_page("pages/relative.py").run()
    assert any("Choose two models (A and B)" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_models_of_different_widths_have_no_absolute_values(app, sample_model_path):
    from workbench import load_model

    app.session_state["model_b"] = load_model(sample_model_path("mlp_narrow_seed0"))
    at = app.run()
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    table = at.dataframe[0].value
    hidden = table[table["layer of A"] != "out"]
    assert hidden["Jaccard absolute"].isna().all() and (hidden["Jaccard relative"] > 0).all()
    assert not table[table["layer of A"] == "out"]["Jaccard absolute"].isna().any()  # both heads have 10 outputs
    assert any("n/a where the two layers have different widths" in c.value for c in at.caption)


def test_layers_of_two_architectures_are_paired_by_the_user_not_by_name(app, sample_model):
    app.session_state["model_a"] = sample_model("cnn_seed0")  # its fc1 is the last hidden layer, the MLP's the first
    at = app.run()
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    assert "rel_layers" not in [m.key for m in at.multiselect]
    default_a, default_b = at.multiselect(key="rel_layers_a").value, at.multiselect(key="rel_layers_b").value
    assert len(default_a) == len(default_b) == 5 and default_a[-1] == default_b[-1] == "out"  # computed on arrival
    assert len(at.dataframe[0].value) == 5
    at.multiselect(key="rel_layers_a").set_value(["relu2", "relu_fc1"])
    at.multiselect(key="rel_layers_b").set_value(["relu1", "relu2"]).run()
    assert not page_errors(at)
    table = at.dataframe[0].value
    assert list(zip(table["layer of A"], table["layer of B"])) == [("relu2", "relu1"), ("relu_fc1", "relu2")]


def test_stitching_on_a_dataset_without_a_train_split_trains_on_a_stratified_70_percent(app):
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("blobs (synthetic)").run()
    at.switch_page("pages/relative.py").run()
    at.multiselect(key="rel_layers").set_value(["relu2"]).run()
    at.slider(key="rel_epochs").set_value(20)
    at.toggle(key="rel_stitch").set_value(True).run()
    assert not page_errors(at)
    assert any("Heads trained on 636 samples of blobs" in shown(c.value) and "[70%] (its 700 samples less the 64 anchors" in shown(c.value)
               and "tested on 300 of" in shown(c.value) for c in at.caption)
    at.button(key="rel_stitch_report").click().run()
    section = at.session_state["report_sections"][0]  # tested on the 30 %, trained on the 70 %
    assert (section["dataset_object"].n_samples, section["train_dataset_object"].n_samples) == (300, 700)
    assert section["dataset"] == section["dataset_object"].name
