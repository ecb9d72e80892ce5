"""The model merging page: MergeMany against the naive average, its download, too few members."""

from __future__ import annotations

from tests.app.conftest import page_errors, shown

PAGE = "pages/merge.py"


def test_merge_waits_for_its_toggle(app):
    at = app.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    assert at.title[0].value == "Model merging"
    assert not at.get("metric")


def test_members_are_offered_by_architecture(app, digits_test, sample_model_path):
    import dataclasses

    from workbench import load_model

    app.session_state["dataset"] = digits_test
    for slot, name in (("model_a", "cnn_seed0"), ("model_b", "mlp_narrow_seed0")):  # two CNNs, three narrow MLPs
        app.session_state[slot] = dataclasses.replace(load_model(sample_model_path(name)), name=f"my_{name}")
    at = app.run()
    at.switch_page(PAGE).run()
    assert not page_errors(at)
    arch = at.selectbox(key="mc_merge_arch")
    # the narrow MLPs with the upload, and the MLPs, chosen first (a CNN on its own is too few)
    assert arch.options == ["that of my_mlp_narrow_seed0 (loaded), mlp_narrow_seed0, mlp_narrow_seed1",
                            "that of mlp_seed0, mlp_seed1, mlp_seed2"] and arch.value == 1
    assert at.multiselect(key="mc_merge_models").options == ["mlp_seed0", "mlp_seed1", "mlp_seed2"]  # no CNN, no text model
    arch.set_value(0).run()
    members = at.multiselect(key="mc_merge_models")
    assert members.options == ["my_mlp_narrow_seed0 (loaded)", "mlp_narrow_seed0", "mlp_narrow_seed1"]
    assert members.value == members.options  # the chosen architecture's own members, not the other's
    assert not page_errors(at) and not at.warning  # (no warning about a default set beside the session state either)
    at.switch_page("pages/home.py").run()
    at.switch_page(PAGE).run()  # back from another page: the choices are as the user left them
    assert at.selectbox(key="mc_merge_arch").value == 0 and at.multiselect(key="mc_merge_models").value == members.options


def test_merge_panel_beats_the_naive_average(app, digits_test):
    app.session_state["dataset"] = digits_test
    at = app.run()
    at.switch_page(PAGE).run()
    assert at.multiselect(key="mc_merge_models").value == ["mlp_seed0", "mlp_seed1", "mlp_seed2"]
    at.slider(key="mc_merge_rounds").set_value(1)
    at.toggle(key="mc_merge_run").set_value(True).run()
    assert not page_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    merged = float(metrics["Merged accuracy"].rstrip("%"))
    naive = float(metrics["Naive average accuracy"].rstrip("%"))
    assert merged > 90 > naive
    delta = at.metric[0].proto.delta  # a difference of two percentages: percentage points, not a relative change
    assert delta == f"{merged - naive:+.1f} points vs naive average"
    assert any(b.label.startswith("Download the merged model") for b in at.get("download_button"))
    at.button(key="mc_merge_report").click().run()
    section = at.session_state["report_sections"][0]
    assert section["models"] == ["mlp_seed0", "mlp_seed1", "mlp_seed2"]  # the members, not models A and B
    assert section["train_dataset_object"] is None  # weight matching of models without BatchNorm reads no data
    assert not any("in-sample" in c.value for c in at.caption) and not section["notes"]
    at.radio(key="mc_merge_method").set_value("activation_matching").run()
    at.button(key="mc_merge_report").click().run()
    assert at.session_state["report_sections"][-1]["train_dataset_object"].name == "digits (train)"  # matched on it


def test_activation_matching_on_the_evaluation_samples_is_called_in_sample(app, digits_test):
    app.session_state["dataset"] = digits_test
    app.session_state["merge_train"] = False
    at = app.run()
    at.switch_page(PAGE).run()
    at.radio(key="mc_merge_method").set_value("activation_matching")
    at.toggle(key="mc_merge_run").set_value(True).run()
    assert not page_errors(at)
    note = next(shown(c.value) for c in at.caption if "in-sample" in c.value)
    assert "The merged accuracy is in-sample: the activation matching of the merge was fitted on the same 450 samples" in note
    assert "“Match activations and recompute BatchNorm statistics on the digits train split” in Settings" in note
    at.button(key="mc_merge_report").click().run()
    assert note in at.session_state["report_sections"][0]["notes"]


def test_too_few_members_asks_for_three(app, digits_test):
    app.session_state["dataset"] = digits_test
    at = app.run()
    at.switch_page(PAGE).run()
    at.multiselect(key="mc_merge_models").set_value(["mlp_seed0", "mlp_seed1"]).run()
    assert "Pick at least 3 models to merge." in [i.value for i in at.info]


def test_models_loaded_in_the_sidebar_can_be_merged(app, digits_test, sample_model_path):
    import dataclasses

    from workbench import load_model

    uploaded = dataclasses.replace(load_model(sample_model_path("mlp_seed2")), name="my_upload")
    app.session_state["dataset"] = digits_test
    app.session_state["model_a"] = uploaded
    at = app.run()
    at.switch_page(PAGE).run()
    members = at.multiselect(key="mc_merge_models")
    assert "my_upload (loaded)" in members.options and "mlp_seed1 (loaded)" not in members.options  # bundled B listed once
    members.set_value(["my_upload (loaded)", "mlp_seed0", "mlp_seed1"]).run()
    at.slider(key="mc_merge_rounds").set_value(1)
    at.toggle(key="mc_merge_run").set_value(True).run()
    assert not page_errors(at)
    assert float({m.label: m.value for m in at.metric}["Merged accuracy"].rstrip("%")) > 90
