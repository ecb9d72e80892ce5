"""The probing page: two sample models, profile and confusion figures, the table, no-label and error paths."""

from __future__ import annotations

import json

import numpy as np

from tests.app.conftest import count_calls, page_errors
from workbench.plots._style import figure_title


def _train(at):
    """Submit the probe settings form (its edits apply together)."""
    at.button(key="probe_train").click().run()


def _open_on_out(app):
    """The probing page on model A alone, probing its output layer."""
    at = app.run()
    at.selectbox(key="model_b_choice").set_value("(none)").run()
    at.switch_page("pages/probing.py").run()
    at.multiselect(key="probe_layers_a").set_value(["out"])
    _train(at)
    return at


def _open(app):
    at = app.run()
    at.switch_page("pages/probing.py").run()
    return at


def test_probing_page_with_two_models(app):
    at = _open(app)
    assert not page_errors(at)
    assert at.title[0].value == "Probing"
    table = at.dataframe[0].value
    assert set(table["model"]) == {"mlp_seed0", "mlp_seed1"}
    assert list(table["layer"][:5]) == ["fc1", "relu1", "fc2", "relu2", "out"]
    assert (table["accuracy"] > 0.85).all()  # trained digits models: every layer decodes the digit
    assert (table["selectivity"] > 0.7).all()  # the control task stays near chance
    assert (table["control"] < 0.25).all()
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # accuracy profile and confusion matrix
    profile = charts[0].proto.spec
    assert "control task" in profile and "n = 450" in profile
    assert figure_title(json.loads(charts[1].proto.spec)).startswith("Held-out confusion, mlp_seed0 · out")
    assert any("chance = 0.1" in c.value for c in at.caption)


def test_confusion_layer_choice_and_single_model(app):
    at = app.run()
    at.selectbox(key="model_b_choice").set_value("(none)").run()
    at.switch_page("pages/probing.py").run()
    at.multiselect(key="probe_layers_a").set_value(["fc1", "relu2"])
    _train(at)
    assert not page_errors(at)
    assert list(at.dataframe[0].value["layer"]) == ["fc1", "relu2"]
    at.selectbox(key="probe_confusion_layer").set_value((0, "fc1")).run()
    assert figure_title(json.loads(at.get("plotly_chart")[1].proto.spec)).startswith("Held-out confusion, mlp_seed0 · fc1")
    at.checkbox(key="probe_control").uncheck()
    _train(at)
    table = at.dataframe[0].value
    assert "selectivity" not in table.columns and len(at.get("plotly_chart")) == 2


def test_probing_page_without_labels_says_what_to_do(app):
    from workbench.data.datasets import make_dataset

    at = app.run()
    at.session_state["dataset"] = make_dataset(
        "unlabelled", np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    )
    at.switch_page("pages/probing.py").run()
    assert not page_errors(at)
    assert any("Probing needs labels" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_probing_page_shows_a_clear_error_for_too_many_folds(app):
    from workbench import load_dataset

    small = load_dataset("digits", split="test").subset(np.arange(60))  # about 6 samples per class
    at = app.run()
    at.session_state["dataset"] = small
    at.switch_page("pages/probing.py").run()
    at.number_input(key="probe_cv").set_value(10)
    _train(at)
    errors = page_errors(at)
    assert any("folds need at least 10 per class; lower cv" in e for e in errors)
    assert not at.exception


def test_c_is_for_the_linear_probe_and_changing_it_with_the_mlp_probe_recomputes_nothing(app, monkeypatch):
    import workbench.analyses.probing as probing

    calls = count_calls(probing, "probe_layers", monkeypatch)
    at = _open_on_out(app)
    at.checkbox(key="probe_control").uncheck()
    _train(at)
    at.selectbox(key="probe_kind").set_value("mlp")
    _train(at)
    assert not page_errors(at)
    c_input = at.number_input(key="probe_c")  # editable with either probe: a form applies edits only when submitted
    assert not c_input.proto.disabled and c_input.label == "C (linear probe)" and "The MLP probe ignores it" in c_input.proto.help
    table = at.dataframe[0].value
    fits = len([c for c in calls if c["probe"] == "mlp"])
    at.number_input(key="probe_c").set_value(100.0)
    _train(at)
    assert not page_errors(at)
    assert len([c for c in calls if c["probe"] == "mlp"]) == fits  # the stored MLP result is reused: C does not enter it
    assert at.dataframe[0].value.equals(table)


def test_probe_settings_apply_together_when_submitted(app, monkeypatch):
    import workbench.analyses.probing as probing

    calls = count_calls(probing, "probe_layers", monkeypatch)
    at = _open_on_out(app)
    trained = len(calls)
    at.number_input(key="probe_cv").set_value(3).run()
    at.selectbox(key="probe_pooling").set_value("max").run()  # the pooling and layers are settings of the form too
    assert len(calls) == trained and "selectivity" in at.dataframe[0].value.columns  # an edit alone trains nothing
    at.number_input(key="probe_cv").set_value(3)
    at.checkbox(key="probe_control").uncheck()
    _train(at)
    assert not page_errors(at)
    assert len(calls) == trained + 1 and calls[-1]["cv"] == 3 and calls[-1]["control"] is False  # both edits, one training
    assert "selectivity" not in at.dataframe[0].value.columns
