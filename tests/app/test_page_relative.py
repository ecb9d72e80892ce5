"""The relative-representations page: agreement per layer, relative vs absolute, zero-shot stitching."""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pandas as pd

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
    at.switch_page("pages/activations.py").run()
    at.switch_page("pages/relative.py").run()  # the choice is kept across pages
    assert at.multiselect(key="rel_layers").value == ["relu2", "out"]
    at.slider(key="rel_epochs").set_value(40)
    at.toggle(key="rel_stitch").set_value(True).run()
    assert not page_errors(at)
    metrics = _metrics(at)
    assert float(metrics["B → head of A (stitched)"]) > 0.9
    assert float(metrics["Absolute stitching"]) < 0.3
    below = [c.value for c in at.caption if c.value.startswith("Absolute stitching scores below chance")]
    assert float(metrics["Absolute stitching"]) < 0.102 and len(below) == 1  # digits (test): the largest class is 46 of 450
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
    assert section["title"] == "Zero-shot stitching" and section["models"] == ["mlp_seed0", "mlp_seed1"]  # models named once


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
    assert (hidden["Jaccard absolute"] == "n/a").all() and (hidden["Jaccard relative"] > 0).all()
    assert float(table[table["layer of A"] == "out"]["Jaccard absolute"].iloc[0]) >= 0  # both heads have 10 outputs
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


def test_undefined_absolute_values_read_n_a_not_none(app, sample_model):
    app.session_state["model_b"] = sample_model("cnn_seed0")  # other widths than the MLP's, but for the outputs
    at = app.run()
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    table = at.dataframe[0].value
    assert not table.isna().any().any()  # the table would show an empty cell as "None"
    assert "None" not in table.astype(str).to_numpy() and "nan" not in table.astype(str).to_numpy()
    hidden = table[table["layer of A"] != "out"]
    assert len(hidden) == 4 and (hidden[["Jaccard absolute", "MRR absolute"]] == "n/a").all().all()
    out = table[table["layer of A"] == "out"]
    assert re.fullmatch(r"\d\.\d{3}", out["Jaccard absolute"].iloc[0]) and re.fullmatch(r"\d\.\d{3}", out["MRR absolute"].iloc[0])
    assert table["Jaccard relative"].dtype.kind == "f"  # defined everywhere: still numbers


def test_stitching_snippet_recreates_the_split_of_an_uploaded_dataset(app, sample_model, tmp_path, monkeypatch):
    from workbench import load_dataset

    whole = load_dataset("digits", split="all")
    frame = pd.DataFrame(whole.x[:300].numpy(), columns=[f"p{i}" for i in range(64)]).assign(label=whole.y[:300].numpy())
    (tmp_path / "mydigits.csv").write_text(frame.to_csv(index=False))
    app.session_state["dataset"] = load_dataset((tmp_path / "mydigits.csv").read_bytes(), filename="mydigits.csv")
    app.session_state["model_b"] = sample_model("cnn_seed0")
    at = app.run()
    at.switch_page("pages/relative.py").run()
    at.slider(key="rel_epochs").set_value(20)
    at.toggle(key="rel_stitch").set_value(True).run()
    assert not page_errors(at)
    at.button(key="rel_stitch_report").click().run()
    section = at.session_state["report_sections"][0]
    snippet = section["snippet"]
    ast.parse(snippet)
    assert "(...)" not in snippet and "..." not in snippet
    assert "dataset = load_dataset('mydigits.csv')" in snippet
    assert "= train_test_split(dataset, test_fraction=0.3, seed=0)" in snippet
    assert "from workbench.data.splits import train_test_split" in snippet
    name = re.search(r"# this section: (\w+)", snippet).group(1)
    monkeypatch.chdir(tmp_path)  # where the uploaded file is
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the snippet the report shows must run as written
    again, shown_result = namespace[name], section["result"]
    assert again.n_train == shown_result.n_train
    np.testing.assert_allclose(again.relative_accuracy, shown_result.relative_accuracy, atol=1e-6)
