"""The mode connectivity page: curves, barrier table, layer analysis, downloads, errors."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import plotly.io
import pytest
import torch

from tests.app.conftest import page_errors, shown

PAGE = "pages/mode_connectivity.py"
RESET_BN = "weight matching + BatchNorm reset"


@pytest.fixture
def page(app, sample_model, digits_test):
    """The page on the narrow MLP pair (fast), with 5 points per curve."""
    app.session_state["model_a"] = sample_model("mlp_narrow_seed0")
    app.session_state["model_b"] = sample_model("mlp_narrow_seed1")
    app.session_state["dataset"] = digits_test
    app.session_state["mc_points"] = 5
    return app


def _open(app, model_a, model_b, dataset, methods: list[str]):
    """The page on ``model_a`` and ``model_b`` with 5 points per curve, the test split only and ``methods``."""
    app.session_state["model_a"] = model_a
    app.session_state["model_b"] = model_b
    app.session_state["dataset"] = dataset
    app.session_state["mc_points"] = 5
    app.session_state["mc_train"] = False
    app.session_state["mc_methods"] = methods
    at = app.run()
    at.switch_page(PAGE).run()
    return at


def test_defaults_pick_two_seeds_and_show_curves_barriers_and_layers(app):
    app.session_state["mc_points"] = 5
    at = app.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    assert at.title[0].value == "Mode connectivity"
    assert at.selectbox(key="mc_model_a").value == "mlp_seed0"
    assert at.selectbox(key="mc_model_b").value == "mlp_seed1"
    table = at.dataframe[0].value
    assert len(table) == 8  # 4 alignments x (test, train)
    test_rows = table[table["split"] == "test"].set_index("method")
    naive = test_rows.loc["naive (as trained)", "barrier above the line"]
    matched = test_rows.loc["weight matching", "barrier above the line"]
    assert naive > 0.1 and matched * 5 < naive
    caption = next(c.value for c in at.caption if "max over λ" in c.value)
    assert "**barrier above the line**" in caption and "**accuracy drop**" in caption  # the table's column names
    assert "n = 450 test samples and 1347 train samples" in caption
    # short headers, so that all seven columns fit at 1280 px; each header's tooltip holds the definition
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["barrier above the line"]["label"] == "above the line"
    assert config["barrier above the line"]["help"].startswith("max over λ of L(λ) − ((1−λ)·L_A + λ·L_B)")
    assert config["at λ (mean)"]["label"] == "at λ" and "endpoint mean" in config["at λ (mean)"]["help"]
    assert len(at.get("plotly_chart")) == 4  # curves, layers, spectra, objective
    assert any(b.label.startswith("Download B aligned to A") for b in at.get("download_button"))
    assert not any("not the sidebar's model B" in c.value for c in at.caption)
    at.selectbox(key="mc_model_b").set_value("mlp_seed2").run()  # another B than the sidebar's
    assert "This page matches mlp\\_seed2, chosen above, to A, not the sidebar's model B (mlp\\_seed1)." in [
        c.value for c in at.caption]
    at.button(key="mc_report").click().run()
    snippet = at.session_state["report_sections"][0]["snippet"]  # the page's B under a name of its own
    assert "model = load_model(SAMPLE_MODELS / 'mlp_seed2.safetensors')" in snippet and "model_1" not in snippet


def test_model_b_offers_only_models_of_a_s_architecture(page, sample_model):
    page.session_state["model_b"] = sample_model("cnn_seed0")  # cannot be matched to A: not offered
    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    options = at.selectbox(key="mc_model_b").options
    assert "mlp_narrow_seed1" in options and "cnn_seed0" not in options and "mlp_seed0" not in options
    assert at.selectbox(key="mc_model_b").value == "mlp_narrow_seed1"
    assert any("The sidebar's model B (cnn_seed0) has another architecture than mlp_narrow_seed0" in shown(c.value)
               and "mlp_narrow_seed1 is used instead" in shown(c.value) for c in at.caption)
    at.selectbox(key="mc_model_a").set_value("cnn_seed0").run()
    none = at.selectbox(key="mc_model_b_none")  # B does not show A itself
    assert none.disabled and none.options == ["no other model of cnn_seed0's architecture"]
    assert any("No other model has the architecture of cnn_seed0" in shown(i.value) for i in at.info)
    assert not at.dataframe and not at.get("plotly_chart")  # A against itself is not computed


def test_settings_keep_their_state_across_a_model_a_that_stops_the_page(page):
    at = page.run()
    at.switch_page(PAGE).run()
    at.checkbox(key="mc_train").uncheck().run()
    assert set(at.dataframe[0].value["split"]) == {"test"}
    at.selectbox(key="mc_model_a").set_value("cnn_seed0").run()  # no other CNN: the page stops before its settings
    at.selectbox(key="mc_model_a").set_value("mlp_narrow_seed0").run()
    assert not page_errors(at)
    assert not at.checkbox(key="mc_train").value  # as the user left it, and as the results below were computed
    assert set(at.dataframe[0].value["split"]) == {"test"}
    at.button(key="mc_report").click().run()
    assert at.session_state["report_sections"][0]["train_dataset_object"] is None


def test_each_alignment_keeps_its_colour_whichever_are_shown(page):
    from workbench.plots.mode_connectivity import method_color

    at = page.run()
    at.switch_page(PAGE).run()
    colours = {t.name.split(" · ")[0]: t.line.color for t in _chart(at, "mc_curves").data}
    at.multiselect(key="mc_methods").unselect("naive").run()
    fewer = {t.name.split(" · ")[0]: t.line.color for t in _chart(at, "mc_curves").data}
    assert "naive (as trained)" not in fewer and fewer == {k: v for k, v in colours.items() if k in fewer}
    assert len(set(colours.values())) == len(colours) == 4
    assert colours["weight matching"] == method_color("weight_matching")


def test_singular_value_axes_label_each_tick_by_its_value(page):
    at = page.run()
    at.switch_page(PAGE).run()
    spectra = _chart(at, "mc_spectra")  # the narrow MLP's matrices have at most 64 singular values
    assert list(spectra.layout.xaxis.tickvals) == [1, 2, 5, 10, 20, 50]
    assert list(spectra.layout.xaxis.ticktext) == ["1", "2", "5", "10", "20", "50"]  # not "2" and "5" again for 20, 50


def _chart(at, key: str):
    return plotly.io.from_json(next(c for c in at.get("plotly_chart") if key in c.proto.id).proto.spec)


def test_the_report_section_has_every_figure_the_page_shows_in_order(page):
    from workbench.plots._style import figure_title

    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    spectra = _chart(at, "mc_spectra")  # the models' names, as in the other figures
    assert {t.name for t in spectra.data} == {"mlp_narrow_seed0", "mlp_narrow_seed1 (the same after its permutation)"}
    at.button(key="mc_report").click().run()
    shown_titles = [figure_title(plotly.io.from_json(c.proto.spec)) for c in at.get("plotly_chart")]
    assert len(shown_titles) == 4 and any(t.startswith("Weight matching objective") for t in shown_titles)
    assert [figure_title(f) for f in at.session_state["report_sections"][0]["figures"]] == shown_titles


def test_barriers_fitted_on_the_evaluation_samples_are_called_in_sample(page):
    page.session_state["mc_train"] = False
    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    note = next(shown(c.value) for c in at.caption if "in-sample" in c.value)
    assert "The barriers of activation matching, weight matching + REPAIR are in-sample" in note
    assert "fitted on the same 450 samples they are evaluated on, so they are optimistic" in note
    assert "tick “Also evaluate on the digits train split” in Settings" in note
    at.button(key="mc_report").click().run()
    assert note in at.session_state["report_sections"][0]["notes"]
    at.checkbox(key="mc_train").check().run()  # fitted on the train split: out of sample
    assert not page_errors(at)
    assert not any("in-sample" in c.value for c in at.caption)


def test_choosing_the_sidebar_s_b_as_a_never_compares_a_model_with_itself(app, sample_model, digits_test):
    from workbench.models.loading import wrap_module

    cnn = sample_model("cnn_seed0")
    copy_ = copy.deepcopy(cnn.module)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    mine = wrap_module(torch.nn.Sequential(torch.nn.Linear(64, 7), torch.nn.ReLU(), torch.nn.Linear(7, 10)), name="my_mlp")
    at = _open(app, mine, wrap_module(copy_, name="cnn_copy", architecture=cnn.architecture), digits_test, ["naive"])
    assert not page_errors(at)
    assert any("No other model has the architecture of my_mlp" in shown(i.value) for i in at.info)
    at.selectbox(key="mc_model_a").set_value("cnn_copy").run()
    assert not page_errors(at)
    b = at.selectbox(key="mc_model_b")
    assert b.value == "cnn_seed0" and "cnn_copy" not in b.options  # the sidebar's B is A here: not offered
    assert any("The sidebar's model B (cnn_copy) is the model chosen as A here" in shown(c.value)
               and "cnn_seed0 is used instead" in shown(c.value) for c in at.caption)
    layers = _chart(at, "mc_layers")
    before = next(t for t in layers.data if t.name == "before matching" and t.xaxis in (None, "x"))
    distances = np.frombuffer(base64.b64decode(before.y["bdata"]), dtype=before.y["dtype"]) if isinstance(before.y, dict) \
        else np.asarray(before.y, dtype=float)
    assert distances.min() > 0.1  # distances between two different models, not an empty chart
    assert at.dataframe[0].value["barrier above the endpoint mean"].iloc[0] > 1e-6  # two endpoint losses, not one


def test_identical_models_show_zero_barriers_on_an_axis_that_does_not_magnify_rounding(app, sample_model, digits_test):
    from workbench.models.loading import wrap_module

    a = sample_model("mlp_narrow_seed0")
    twin = wrap_module(copy.deepcopy(a.module), name="mlp_twin", architecture=a.architecture)
    at = _open(app, a, twin, digits_test, ["naive", "weight_matching"])
    assert not page_errors(at)
    assert at.selectbox(key="mc_model_b").value == "mlp_twin"
    assert not any("in-sample" in c.value for c in at.caption)  # weights alone: nothing fitted on the samples
    table = at.dataframe[0].value
    for column in ("barrier above the line", "barrier above the endpoint mean", "accuracy drop"):
        assert (table[column] == 0).all(), (column, list(table[column]))
    low, high = _chart(at, "mc_curves").layout.yaxis.range
    assert high - low >= 1e-3  # not 4e-8: float noise between identical curves stays invisible


def test_rounding_noise_reads_as_zero_and_barriers_show_four_significant_digits(sample_model, digits_test):
    from dataclasses import replace

    from workbench.analyses.mode_connectivity import mode_connectivity
    from workbench.plots.mode_connectivity import barrier_rows, barrier_table, interpolation_curves

    a = sample_model("mlp_narrow_seed0")
    result = mode_connectivity(a, a, digits_test, n_points=5, methods=["naive"])
    noisy = replace(result.barriers["naive"], linear={"test": 1.7e-17}, mean={"test": 0.123456789},
                    accuracy_drop={"test": -2e-17})
    curve = replace(result.curves["naive"], loss={"test": 0.15289014 + np.array([0, 4e-8, 2e-8, 1e-8, 0])})
    result = replace(result, barriers={"naive": noisy}, curves={"naive": curve})
    row = barrier_rows(result)[0]
    assert row["barrier above the line"] == 0 and row["accuracy drop"] == 0  # not 0.000000000000000017
    assert row["barrier above the endpoint mean"] == 0.1235
    assert "-0.0000" not in str(barrier_table(result).data[0].cells.values)
    low, high = interpolation_curves(result).layout.yaxis.range
    assert high - low >= 1e-3 and low < 0.15289014 < high  # ticks not 0.15289014–0.15289018


def _labels(axis: dict) -> list[str]:
    low, high = axis["range"]
    ticks = np.arange(np.ceil((low - axis["tick0"]) / axis["dtick"]), np.floor((high - axis["tick0"]) / axis["dtick"]) + 1)
    return [format(axis["tick0"] + k * axis["dtick"], axis["tickformat"]) for k in ticks]


@pytest.mark.parametrize("low, high", [(0.96, 0.98), (0.978, 0.979), (0.1, 0.95), (0.97, 0.97)])
def test_accuracy_axis_labels_are_distinct(low, high):
    from workbench.analyses.mode_connectivity import InterpolationResult
    from workbench.plots.mode_connectivity import interpolation_curves

    lambdas = np.linspace(0, 1, 5)
    curve = InterpolationResult(lambdas=lambdas, loss={"test": np.full(5, 0.15)},
                                accuracy={"test": np.array([high, (low + high) / 2, low, low, high])}, repair="none",
                                estimator="interpolation", n_samples=450, params={}, seed=None, device="cpu",
                                dtype="float32", seconds=0.0)
    axis = interpolation_curves(curve).layout.yaxis2.to_plotly_json()
    labels = _labels(axis)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels  # not "98%, 98%, 97%, 97%, 96%, 96%"
    assert axis["range"][0] <= low and axis["range"][1] >= high




def test_an_upload_named_digits_gets_no_bundled_train_split(page, digits_test):
    from workbench.data import make_dataset

    mine = make_dataset("digits_mine", digits_test.x[:300], digits_test.y[:300])  # named like it, not the bundled split
    page.session_state["dataset"] = mine
    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    assert at.checkbox(key="mc_train").disabled and not at.checkbox(key="mc_train").value
    assert set(at.dataframe[0].value["split"]) == {"test"}  # no rows computed on data that is not the user's
    note = next(shown(c.value) for c in at.caption if "in-sample" in c.value)
    assert "fitted on the same 300 samples they are evaluated on" in note and "evaluate on held-out data" in note


def test_batchnorm_reset_is_offered_only_for_a_model_a_with_batchnorm(app, sample_model, digits_test):
    from workbench.models.loading import wrap_module

    cnn = sample_model("cnn_seed0")
    other = copy.deepcopy(cnn.module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    at = _open(app, cnn, wrap_module(other, name="cnn_other", architecture=cnn.architecture), digits_test, ["naive", "reset_bn"])
    assert not page_errors(at)
    assert RESET_BN in at.multiselect(key="mc_methods").options
    assert set(at.dataframe[0].value["method"]) == {"naive (as trained)", RESET_BN}

    at.selectbox(key="mc_model_a").set_value("mlp_narrow_seed0").run()
    assert not page_errors(at)
    assert RESET_BN not in at.multiselect(key="mc_methods").options
    assert at.multiselect(key="mc_methods").value == ["naive"]
    assert any(f"'{RESET_BN}' is left out: mlp_narrow_seed0 has no BatchNorm layers" in shown(c.value)
               for c in at.caption)
    assert set(at.dataframe[0].value["method"]) == {"naive (as trained)"}

    at.selectbox(key="mc_model_a").set_value("cnn_seed0").run()
    assert not page_errors(at)
    assert RESET_BN in at.multiselect(key="mc_methods").options
    assert not any("is left out" in c.value for c in at.caption)


def test_models_near_chance_on_the_dataset_are_flagged(page):
    from workbench import load_dataset

    page.session_state["dataset"] = load_dataset("blobs")  # 64 features like the digits, but other labels
    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    assert any("near or below chance (20%)" in shown(w.value) and "Choose the dataset the models were trained for" in w.value
               for w in at.warning)
    at.button(key="mc_report").click().run()
    notes = at.session_state["report_sections"][0]["notes"]  # the exported section repeats the caveat
    assert "near or below chance (20%)" in notes and "the barriers below say little" in notes
    page.session_state["dataset"] = None
