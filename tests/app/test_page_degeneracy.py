"""The degeneracy page: spectra, ReLU patterns, free parameters and the interaction graph for one or two models."""

from __future__ import annotations

import json

import pytest

from tests.app.conftest import page_errors, shown
from workbench import load_dataset, load_model
from workbench.data.datasets import make_dataset
from workbench.models.architectures import build_model
from workbench.models.loading import wrap_module
from workbench.plots._style import figure_title

PAGE = "pages/degeneracy.py"


@pytest.fixture(scope="module")
def narrow(sample_model_path):
    return load_model(sample_model_path("mlp_narrow_seed0")), load_model(sample_model_path("mlp_narrow_seed1"))


def _title(chart) -> str:
    return figure_title(json.loads(chart.proto.spec))


def _open(app, model_a, model_b=None, dataset=None):
    app.session_state["model_a"] = model_a
    app.session_state["model_b"] = model_b
    app.session_state["dataset"] = dataset if dataset is not None else load_dataset("digits", split="test")
    app.run()
    return app.switch_page(PAGE).run()


def test_two_models_side_by_side(app, narrow):
    at = _open(app, *narrow)
    assert not page_errors(at)
    assert at.title[0].value == "Degeneracy"
    assert [s.value for s in at.subheader] == [
        "Spectra",
        "ReLU firing patterns",
        "Free parameters",
        "Interaction basis",
        "Local learning coefficient (optional)",
    ]
    metrics = {m.label: m.value for m in at.metric}
    # 5 constant pixels in the digits test split: 5 x 64 free weights of fc1, plus one rescaling per live unit
    assert metrics["Free parameters (mlp_narrow_seed0)"] == "448 of 8,970"
    assert metrics["Dead / always-on / synchronised units (mlp_narrow_seed0)"] == "0 / 0 / 0"
    assert 0.3 <= float(metrics["Modularity (mlp_narrow_seed0)"]) <= 0.9
    assert 0.3 <= float(metrics["Modularity (mlp_narrow_seed1)"]) <= 0.9
    charts = at.get("plotly_chart")
    assert len(charts) == 7
    assert all("n = 450" in _title(c) for c in charts)
    basis = at.dataframe[1].value  # after the free-parameter table
    assert list(basis["layer"][:4]) == ["input", "relu1", "relu2", "out"]
    assert list(basis["basis size"][2:4]) == [10, 10]  # the last hidden layer only feeds 10 logits
    summary = at.dataframe[0].value
    assert set(summary["model"]) == {"mlp_narrow_seed0", "mlp_narrow_seed1"} and len(summary) == 6
    bounds = set(summary.loc[summary["count"] != "exact", "model"])
    captions = " ".join(shown(c.value) for c in at.caption)
    for model in ("mlp_narrow_seed0", "mlp_narrow_seed1"):
        assert (f"{model}: the count of " in captions) == (model in bounds)


def test_single_model_graph_pair_and_loss_gradients(app, narrow):
    at = _open(app, narrow[0])
    assert not page_errors(at)
    assert [m.label for m in at.metric if m.label.startswith("Free")] == ["Free parameters (mlp_narrow_seed0)"]
    at.selectbox(key="deg_pair").set_value(("relu1", "relu2")).run()
    assert not page_errors(at)
    assert _title(at.get("plotly_chart")[-1]).startswith("Interaction graph of mlp_narrow_seed0, relu1 → relu2")
    at.radio(key="deg_output").set_value("loss").run()
    assert not page_errors(at)
    assert _title(at.get("plotly_chart")[1]).startswith("Jacobian Gram spectra (∂loss)")


def test_only_the_output_layer_skips_the_interaction_basis(app, narrow):
    at = _open(app, narrow[0])
    at.multiselect(key="deg_layers_a").set_value(["out"]).run()
    assert not page_errors(at)
    assert "Pick a layer before the output to build the interaction basis." in [i.value for i in at.info]
    assert "Interaction basis" not in [s.value for s in at.subheader]
    at.switch_page("pages/activations.py").run()
    at.switch_page("pages/degeneracy.py").run()  # the choice is kept across pages, as the other pages' layer pickers
    assert at.multiselect(key="deg_layers_a").value == ["out"]


def test_a_model_that_is_not_sequential_shows_the_reason(app):
    spec = {"type": "resmlp", "in_features": 64, "width": 16, "n_blocks": 1, "n_classes": 10}
    model = wrap_module(build_model(spec), name="resmlp", architecture=spec)
    at = _open(app, model)
    infos = [shown(i.value) for i in at.info]
    assert not page_errors(at) and any("resmlp is not one plain sequence of layers" in i for i in infos)
    assert not at.get("plotly_chart")


def test_a_model_b_that_is_not_sequential_leaves_model_a_analysed(app, narrow):
    spec = {"type": "resmlp", "in_features": 64, "width": 16, "n_blocks": 1, "n_classes": 10}
    at = _open(app, narrow[0], wrap_module(build_model(spec), name="resmlp", architecture=spec))
    assert not page_errors(at) and any("resmlp is not one plain sequence of layers" in shown(i.value) for i in at.info)
    assert at.get("plotly_chart") and not at.exception
    assert [m.label for m in at.metric if m.label.startswith("Free parameters")] == ["Free parameters (mlp_narrow_seed0)"]


def test_llc_is_shown_with_its_hyperparameters(app, narrow):
    at = _open(app, narrow[0])
    assert not [m for m in at.metric if m.label.startswith("LLC")]  # off by default: it takes a while
    at.session_state["deg_llc_steps"] = 60  # a short run; the settings shown are what is checked
    at.toggle(key="deg_llc").set_value(True).run()
    assert not page_errors(at)
    value = next(m.value for m in at.metric if m.label == "LLC (mlp_narrow_seed0)")
    assert 1.0 < float(value.split(" ± ")[0]) < 100.0
    captions = [c.value for c in at.caption]
    assert any(
        "Hyper-parameters: step size 0.0001, localization γ 100, nβ 73.66, 4 chains × 60 steps (20 burn-in)" in c
        for c in captions
    )
    assert _title(at.get("plotly_chart")[-1]).startswith("Local learning coefficient mlp_narrow_seed0")


def test_a_cnn_beside_an_mlp_says_what_is_counted_and_keeps_each_layer_order(app, narrow, sample_model_path):
    cnn = load_model(sample_model_path("cnn_seed0"))
    at = _open(app, narrow[0], cnn)
    assert not page_errors(at) and not at.exception
    labels = [m.label for m in at.metric if m.label.startswith("Free parameters")]
    assert labels == ["Free parameters (mlp_narrow_seed0)", "Free parameters (cnn_seed0) in its linear layers"]
    caption = next(
        c.value for c in at.caption if c.value.startswith("cnn_seed0: only its nn.Linear layers on flat inputs")
    )
    assert f"of its {cnn.n_parameters:,} parameters" in caption and "conv1, bn1, conv2, bn2" in caption
    size = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "Interaction basis size" in _title(c))
    order = size["layout"]["xaxis"]["categoryarray"]
    assert order.index("cnn_seed0 · relu_fc1") < order.index("cnn_seed0 · out")  # each model in its own stretch
    assert order.index("mlp_narrow_seed0 · relu2") < order.index("mlp_narrow_seed0 · out") < order.index("cnn_seed0 · input")


def test_matrices_whose_count_the_samples_do_not_pin_down_are_named(app, narrow):
    digits = load_dataset("digits", split="test")
    at = _open(app, narrow[0], dataset=make_dataset("digits, 40 samples", digits.x[:40], digits.y[:40]))
    assert not page_errors(at)
    captions = {c.value.split(" is ", 1)[0]: c.value for c in at.caption if "the count of" in c.value}
    assert list(captions) == [f"mlp_narrow_seed0: the count of {m}" for m in ("fc1", "fc2", "out")]  # each says its own reasons
    # 40 samples: every input rank stops at 39, and fc1's (39 + 1) x 64 used directions exceed 40 x 10 Jacobian rows
    assert "the samples give 400 Jacobian rows, fewer than the 2,560 directions counted as used" in captions[
        "mlp_narrow_seed0: the count of fc1"]
    assert "its input rank 39 reached the most 40 samples allow, below its fan-in 64" in captions[
        "mlp_narrow_seed0: the count of out"]
    assert all(c.endswith("; more samples (such as the train split) settle it.") for c in captions.values())
    # 64 units with more firing patterns than 40 samples can tell apart: their slopes over the samples are dependent
    assert "is a lower bound: the firing patterns of its groups of units over these samples add up to one another's" in captions[
        "mlp_narrow_seed0: the count of fc2"]
    assert "lower bound" not in captions["mlp_narrow_seed0: the count of out"]
    counts = dict(zip(at.dataframe[0].value["matrix"], at.dataframe[0].value["count"]))  # the table agrees: none is exact
    assert counts == {"fc1": "lower bound; limited by the samples", "fc2": "lower bound; limited by the samples",
                      "out": "limited by the samples"}
    total = next(shown(c.value) for c in at.caption if "free parameters come from" in c.value)
    free = next(m.value for m in at.metric if m.label.startswith("Free parameters")).split(" of ")[0]
    assert total.startswith(f"mlp_narrow_seed0: {free} of its {free} free parameters come from fc1, fc2, out, whose counts "
                            "these 40 samples do not pin down: read the total as an upper bound here")
    at.button(key="deg_report").click().run()
    section = at.session_state["report_sections"][-1]  # the exported section repeats the caveats the page shows
    assert total in section["notes"] and all(c in section["notes"] for c in captions.values())
    numbers = section["summary"]["free parameters"]["mlp_narrow_seed0"]
    assert numbers["matrices whose count the samples do not pin down"] == "fc1, fc2, out"
    assert f"{numbers['of which from counts the samples do not pin down (upper bounds)']:,}" == free


def test_a_model_that_is_not_one_sequence_of_layers_gets_a_plain_sentence(app, sample_model):
    at = _open(app, sample_model("text_transformer_seed0"), dataset=load_dataset("sentences"))
    assert not at.exception
    assert any("text_transformer_seed0 is not one plain sequence of layers (such as the mlp and cnn architectures)"
               in shown(i.value) for i in at.info)
