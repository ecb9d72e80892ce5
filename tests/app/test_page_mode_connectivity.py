"""The mode connectivity page: curves, barrier table, layer analysis, downloads, errors."""

from __future__ import annotations

import copy

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
    assert len(at.get("plotly_chart")) == 4  # curves, layers, spectra, objective
    assert any(b.label.startswith("Download B aligned to A") for b in at.get("download_button"))


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




def test_an_upload_named_digits_gets_no_bundled_train_split(page, digits_test):
    from workbench.data import make_dataset

    mine = make_dataset("digits_mine", digits_test.x[:300], digits_test.y[:300])  # named like it, not the bundled split
    page.session_state["dataset"] = mine
    at = page.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    assert at.checkbox(key="mc_train").disabled and not at.checkbox(key="mc_train").value
    assert set(at.dataframe[0].value["split"]) == {"test"}  # no rows computed on data that is not the user's


def test_batchnorm_reset_is_offered_only_for_a_model_a_with_batchnorm(app, sample_model, digits_test):
    from workbench.models.loading import wrap_module

    cnn = sample_model("cnn_seed0")
    other = copy.deepcopy(cnn.module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    app.session_state["model_a"] = cnn
    app.session_state["model_b"] = wrap_module(other, name="cnn_other", architecture=cnn.architecture)
    app.session_state["dataset"] = digits_test
    app.session_state["mc_points"] = 5
    app.session_state["mc_train"] = False
    app.session_state["mc_methods"] = ["naive", "reset_bn"]
    at = app.run()
    at.switch_page(PAGE).run()
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
