"""The app shell: defaults, sidebar uploads with clear errors, the home and activation pages."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from tests.app.conftest import page_errors, shown
from workbench.models.architectures import build_model


def _upload(at, key: str, name: str, data: bytes):
    at.selectbox(key=f"{key}_choice").set_value("Upload a file…").run()
    at.file_uploader(key=f"{key}_upload").upload(name, data, "application/octet-stream").run()
    return at


def test_home_shows_both_default_models_and_layer_trees(app):
    at = app.run()
    assert not page_errors(at)
    assert at.title[0].value == "Representation Workbench"
    subheaders = [s.value for s in at.subheader]
    assert "Model A: mlp_seed0" in subheaders and "Model B: mlp_seed1" in subheaders
    assert any(s.startswith("Dataset: digits (test)") for s in subheaders)
    trees = list(at.dataframe)
    assert len(trees) == 2
    assert list(trees[0].value["layer"]) == ["fc1", "relu1", "fc2", "relu2", "out"]
    assert at.metric[0].value == "301,066"


def test_activation_statistics_side_by_side(app):
    at = app.run()
    at.switch_page("pages/activations.py").run()
    assert not page_errors(at)
    assert at.title[0].value == "Activation statistics"
    table = at.dataframe[0].value
    assert len(table) == 10  # 5 layers x 2 models
    assert set(table["model"]) == {"mlp_seed0", "mlp_seed1"}
    relu = table[(table["layer"] == "relu1")]
    assert (relu["min"] >= 0).all() and (relu["dead units"] <= 100).all()
    # shares as percentages with one decimal in every row (Streamlit's "percent" gave 0 %, 0.2 % and 50.35 % in one column)
    config = json.loads(at.dataframe[0].proto.columns)
    assert {config[k]["type_config"]["format"] for k in ("dead units", "constant units", "zeros")} == {"%.1f %%"}
    assert config["dead units"]["type_config"]["max_value"] == 100
    assert 20 < relu["zeros"].mean() < 90  # a ReLU layer's zeros in percent, not as a fraction
    assert len(at.get("plotly_chart")) == 1
    assert "relu1 · 512" in at.multiselect(key="act_layers_a").options  # short chips: five fit the picker's width
    hist = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "models on shared bins" in hist["layout"]["title"]["subtitle"]["text"]  # the two seeds' zero spikes compare
    relu1 = [t for t in hist["data"] if t["xaxis"] == "x2"]  # relu1's panel: both models on the same bin centres
    assert len(relu1) == 2 and relu1[0]["x"] == relu1[1]["x"]
    assert any("Statistics are of the pooled values: in a conv map or token sequence each channel is a unit, represented by "
               "its mean over positions" in shown(c.value) for c in at.caption)


def test_single_model_when_b_is_none(app):
    at = app.run()
    at.selectbox(key="model_b_choice").set_value("(none)").run()
    at.switch_page("pages/activations.py").run()
    assert not page_errors(at)
    assert set(at.dataframe[0].value["model"]) == {"mlp_seed0"}


def test_upload_safetensors_checkpoint(app, sample_model_path):
    at = _upload(app.run(), "model_a", "my_model.safetensors", sample_model_path("mlp_narrow_seed0").read_bytes())
    assert not page_errors(at)
    assert "Model A: my_model" in [s.value for s in at.subheader]


def test_two_uploads_with_one_file_name_stay_two_models(app, sample_model_path):
    # results are labelled and keyed by model name: B is renamed rather than silently taken for A
    at = _upload(app.run(), "model_a", "model.safetensors", sample_model_path("mlp_narrow_seed0").read_bytes())
    at = _upload(at, "model_b", "model.safetensors", sample_model_path("mlp_narrow_seed1").read_bytes())
    assert not page_errors(at)
    assert at.session_state["model_a"].name == "model" and at.session_state["model_b"].name == "model (B)"
    subheaders = [s.value for s in at.subheader]
    assert "Model A: model" in subheaders and "Model B: model (B)" in subheaders
    at.switch_page("pages/probing.py").run()
    assert not page_errors(at)
    assert set(at.dataframe[0].value["model"]) == {"model", "model (B)"}


def test_an_empty_slot_a_does_not_relabel_model_b(app):
    at = app.run()
    at.selectbox(key="model_a_choice").set_value("Upload a file…").run()  # nothing uploaded yet
    assert not page_errors(at)
    subheaders = [s.value for s in at.subheader]
    assert "Model B: mlp_seed1" in subheaders and not any(s.startswith("Model A") for s in subheaders)
    assert any("Model A is not chosen" in i.value for i in at.info)


def test_upload_state_dict_needs_spec_then_loads(app):
    module = build_model({"type": "mlp", "sizes": [64, 20, 10]})
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    at = _upload(app.run(), "model_a", "weights.pt", buf.getvalue())
    assert any("holds weights but no architecture spec" in e for e in page_errors(at))
    at.text_area(key="model_a_arch").input('{"type": "mlp", "sizes": [64, 20, 10]}').run()
    assert not page_errors(at)
    assert "Model A: weights" in [s.value for s in at.subheader]


def test_the_spec_the_weights_suggest_is_one_click_away(app):
    module = build_model({"type": "mlp", "sizes": [64, 20, 10], "activation": "relu"})
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    at = _upload(app.run(), "model_a", "weights.pt", buf.getvalue())
    assert any('it looks like {"type": "mlp", "sizes": [64, 20, 10]' in e for e in page_errors(at))
    at.button(key="model_a_use_spec").click().run()
    assert '"sizes": [64, 20, 10]' in at.text_area(key="model_a_arch").value
    assert not page_errors(at)
    assert "Model A: weights" in [s.value for s in at.subheader]


def test_cnn_state_dict_upload_suggests_the_cnn_spec_not_an_mlp(app, sample_model):
    buf = io.BytesIO()
    torch.save(sample_model("cnn_seed0").module.state_dict(), buf)
    at = _upload(app.run(), "model_a", "cnn.pt", buf.getvalue())
    errors = page_errors(at)
    assert any('it looks like {"type": "cnn", "channels": [32, 32]' in e for e in errors)
    assert not any('"type": "mlp", "sizes": [32' in e for e in errors)
    spec = ('{"type": "cnn", "input_shape": [1, 8, 8], "channels": [32, 32], "kernel_size": 3, "batchnorm": true, '
            '"hidden": 64, "n_classes": 10}')
    at.text_area(key="model_a_arch").input(spec).run()
    assert not page_errors(at)
    assert "Model A: cnn" in [s.value for s in at.subheader]


def test_home_names_the_dataset_each_test_accuracy_was_measured_on(app):
    at = app.run()
    at.selectbox(key="model_a_choice").set_value("text_transformer_seed0").run()
    model_a, model_b = ({str(k): str(v) for k, v in t.value.to_numpy()} for t in at.table)
    assert model_a.get("test accuracy (sentences)") == "0.9417" and "test accuracy (digits)" not in model_a
    assert model_b.get("test accuracy (digits)") == "0.9800"


def test_malicious_pickle_upload_shows_error_not_traceback(app, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    at = _upload(app.run(), "model_a", "evil.pt", pickle.dumps({"w": Payload()}))
    errors = page_errors(at)
    assert any("full pickle whose loading can run arbitrary code" in e for e in errors)
    assert not at.exception
    assert not marker.exists()


def test_non_model_file_upload(app):
    at = _upload(app.run(), "model_a", "notes.pt", b"just some text, not a checkpoint")
    assert any("'notes.pt' is not a PyTorch checkpoint: it looks like a text file, not a model" in e for e in page_errors(at))
    assert not at.exception


def test_wrong_file_types_get_the_supported_types(app):
    at = _upload(app.run(), "model_a", "setup.exe", b"MZ\x90\x00" * 20)
    assert any("Cannot load 'setup.exe' as a model: supported types are .safetensors, .pt" in e for e in page_errors(at))
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    at.file_uploader(key="dataset_upload").upload("notes.txt", b"some notes", "text/plain").run()
    assert any("Cannot read dataset file 'notes.txt': supported types are .npz, .csv, .pt" in e for e in page_errors(at))
    assert not at.exception


def test_too_large_upload(app, monkeypatch, sample_model_path):
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", "0")
    at = _upload(app.run(), "model_a", "big.safetensors", sample_model_path("mlp_narrow_seed0").read_bytes())
    assert any("above this server's 0 MiB upload limit" in e for e in page_errors(at))


def test_trust_switch_offered_only_when_the_server_was_started_to_trust_uploads(app, monkeypatch):
    monkeypatch.delenv("WORKBENCH_TRUST_UPLOADS", raising=False)
    at = app.run()
    at.selectbox(key="model_a_choice").set_value("Upload a file…").run()
    assert not [c for c in at.checkbox if c.key == "model_a_trust"]  # a visitor cannot run a file's code on the server
    assert "Opening a pickle runs the code inside it, with this server's rights." not in [c.value for c in at.caption]
    monkeypatch.setenv("WORKBENCH_TRUST_UPLOADS", "1")  # workbench app --trust-uploads
    at.run()
    assert [c for c in at.checkbox if c.key == "model_a_trust"]
    assert "Opening a pickle runs the code inside it, with this server's rights." in [c.value for c in at.caption]  # the risk, under the switch


def test_trusted_whole_module_pickle_loads_through_a_separate_process(app, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TRUST_UPLOADS", "1")
    module = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    buf = io.BytesIO()
    torch.save(module, buf)
    at = _upload(app.run(), "model_a", "whole.pt", buf.getvalue())
    assert any("full pickle whose loading can run arbitrary code" in e for e in page_errors(at))
    at.checkbox(key="model_a_trust").check().run()
    assert not page_errors(at)
    assert "Model A: whole" in [s.value for s in at.subheader]
    formats = [str(v) for t in at.table for v in t.value.to_numpy().ravel()]
    assert "pickle (trusted, opened in a separate process)" in formats


def test_text_labels_show_their_numbering(app):
    rows = "".join(f"{','.join(['0.5'] * 64)},{['zero', 'one'][i % 2]}\n" for i in range(6))
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    header = ",".join(f"f{i}" for i in range(64)) + ",label\n"
    at.file_uploader(key="dataset_upload").upload("words.csv", (header + rows).encode(), "text/csv").run()
    captions = [c.value.replace("\\", "") for c in at.caption]
    assert any("Classes: 0 = one, 1 = zero." in c for c in captions)
    assert any("were text, numbered in sorted order (one → 0, zero → 1)" in c for c in captions)
    assert not page_errors(at)


def test_home_counts_the_classes_present_when_labels_do_not_start_at_0(app):
    buf = io.BytesIO()
    np.savez(buf, x=np.random.rand(30, 64).astype(np.float32), y=np.arange(30) % 3 + 1)  # labels 1, 2, 3
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    at.file_uploader(key="dataset_upload").upload("onebased.npz", buf.getvalue(), "application/octet-stream").run()
    assert any("3 classes (labels 1 to 3)" in m.value for m in at.markdown)
    assert not page_errors(at)


@pytest.mark.parametrize(("arrays", "said"), [
    ({"x": np.random.rand(40, 64).astype(np.float32)}, "no class labels"),
    ({"x": np.random.rand(40, 64).astype(np.float32), "y": np.random.rand(40)}, "continuous targets"),
])
def test_home_describes_a_dataset_without_class_labels(app, arrays, said):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    at.file_uploader(key="dataset_upload").upload("unlabelled.npz", buf.getvalue(), "application/octet-stream").run()
    assert not page_errors(at) and not at.exception
    assert any(f"40 samples · input shape (64,) · {said}" in m.value for m in at.markdown)


def test_uploaded_dataset_with_wrong_features(app):
    buf = io.BytesIO()
    np.savez(buf, x=np.random.rand(30, 5).astype(np.float32), y=np.arange(30) % 3)
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    at.file_uploader(key="dataset_upload").upload("five.npz", buf.getvalue(), "application/octet-stream").run()
    at.switch_page("pages/activations.py").run()
    assert any("has 5 features per sample but model 'mlp_seed0' expects 64" in e for e in page_errors(at))
    assert any("model 'mlp\\_seed0'" in e.value for e in at.error)  # shown as written, not as Markdown
    assert not at.exception


def test_messages_are_shown_as_written_not_as_markdown():
    from pages._state import plain

    assert plain("'__main__' of a_b_c.pt costs $5 *now* [x](y) `z` ~w~ <b>") == (
        "'\\_\\_main\\_\\_' of a\\_b\\_c.pt costs \\$5 \\*now\\* \\[x\\](y) \\`z\\` \\~w\\~ \\<b>"
    )
    assert plain("A plain sentence (with 3.5 %, 'quotes' and a-dash).") == "A plain sentence (with 3.5 %, 'quotes' and a-dash)."


@pytest.mark.parametrize("dataset", ["blobs (synthetic)", "digits (train split)"])
def test_other_builtin_datasets(app, dataset):
    at = app.run()
    at.selectbox(key="dataset_choice").set_value(dataset).run()
    at.switch_page("pages/activations.py").run()
    assert not page_errors(at)
    assert len(at.get("plotly_chart")) == 1


def test_cached_results_carry_the_names_of_the_callers_models(sample_model_path):
    import dataclasses

    from pages._state import cached_call
    from workbench import load_dataset, load_model

    def names(model, dataset):
        return f"{model.name} on {dataset.name}"

    model, data = load_model(sample_model_path("mlp_narrow_seed0")), load_dataset("digits")
    upload = dataclasses.replace(model, name="someone's upload")  # the same weights under another name
    assert cached_call(names, upload, data) == "someone's upload on digits (test)"
    assert cached_call(names, model, data) == "mlp_narrow_seed0 on digits (test)"
    assert cached_call(names, model, dataclasses.replace(data, name="mine")) == "mlp_narrow_seed0 on mine"


@pytest.mark.parametrize("page", ["pages/activations.py", "pages/probing.py"])
def test_a_model_b_that_cannot_run_on_the_data_leaves_model_a_shown(app, sample_model_path, page):
    from workbench import load_model

    app.session_state["model_a"] = load_model(sample_model_path("mlp_narrow_seed0"))
    app.session_state["model_b"] = load_model(sample_model_path("text_transformer_seed0"))  # takes token ids, not digits
    at = app.run()
    at.switch_page(page).run()
    errors = page_errors(at)
    assert len(errors) == 1 and "text_transformer_seed0" in errors[0] and not at.exception
    table = at.dataframe[0].value
    assert set(table["model"]) == {"mlp_narrow_seed0"}


def test_page_settings_are_kept_while_the_user_visits_another_page(app):
    at = app.run()
    at.switch_page("pages/relative.py").run()
    at.checkbox(key="rel_center").check()
    at.selectbox(key="rel_pooling").set_value("max").run()
    at.switch_page("pages/activations.py").run()
    assert at.selectbox(key="act_pooling").value == "mean"  # a setting of another page keeps its own value
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    assert at.checkbox(key="rel_center").value is True
    assert at.selectbox(key="rel_pooling").value == "max"


def test_choices_whose_options_follow_the_models_are_kept_too(app):
    at = app.run()
    at.switch_page("pages/relative.py").run()
    at.selectbox(key="rel_method").set_value("fps")
    at.slider(key="rel_anchors").set_value(32).run()
    at.switch_page("pages/embedding.py").run()
    at.selectbox(key="emb_color").set_value("none").run()
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/embedding.py").run()
    assert at.selectbox(key="emb_color").value == "none"
    at.switch_page("pages/relative.py").run()
    assert not page_errors(at)
    assert at.selectbox(key="rel_method").value == "fps" and at.slider(key="rel_anchors").value == 32


def test_a_loader_failing_unexpectedly_shows_a_sentence_not_a_traceback(app, monkeypatch):
    import workbench as wb

    def failing(*args, **kwargs):
        raise RuntimeError("unexpected failure inside the reader")

    at = app.run()  # the bundled defaults load first
    monkeypatch.setattr(wb, "load_model", failing)
    monkeypatch.setattr(wb, "load_dataset", failing)
    at = _upload(at, "model_a", "odd-model.pt", b"bytes seen by no other test")
    assert any("failed unexpectedly (RuntimeError: unexpected failure inside the reader)" in e for e in page_errors(at))
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    at.file_uploader(key="dataset_upload").upload("odd-data.npz", b"other bytes seen by no other test", "application/octet-stream").run()
    assert sum("unexpected failure inside the reader" in e for e in page_errors(at)) == 2
    assert not at.exception


def test_home_says_when_weights_were_stored_in_float64(app):
    import json

    from safetensors.torch import save

    spec = {"type": "mlp", "sizes": [64, 16, 10], "activation": "relu"}
    data = save({k: v.double() for k, v in build_model(spec).state_dict().items()}, metadata={"architecture": json.dumps(spec)})
    at = _upload(app.run(), "model_a", "f64.safetensors", data)
    assert "stored as float64, computed in float32 (rounded)" in at.table[0].value.to_string()
    assert not at.exception


def test_home_shows_the_spec_a_state_dict_was_loaded_into(app):
    spec = {"type": "mlp", "sizes": [64, 16, 10], "activation": "tanh"}
    buf = io.BytesIO()
    torch.save(build_model(spec).state_dict(), buf)
    at = _upload(app.run(), "model_a", "w.pt", buf.getvalue())
    at.text_area(key="model_a_arch").set_value(json.dumps(spec)).run()
    assert '"activation": "tanh"' in at.table[0].value.to_string()


def test_the_sidebar_names_each_model_by_the_weights_hash_reports_show(app, sample_model):
    at = app.run()
    captions = [shown(c.value) for c in at.sidebar.caption]
    for name in ("mlp_seed0", "mlp_seed1"):
        sha = sample_model(name).sha256[:12]
        assert any(f"{name} · " in c and f"weights sha256 {sha}, as in reports" in c for c in captions), captions
    assert sum("**A**" in c.value for c in at.sidebar.caption) == 1  # written before the page runs and replaced after


def test_home_warns_when_the_dataset_does_not_fit_the_models(app):
    at = app.run()
    at.selectbox(key="dataset_choice").set_value("Upload a file…").run()
    rows = "".join(f"{i},{i + 1},{i + 2},{i % 2}\n" for i in range(10))
    at.file_uploader(key="dataset_upload").upload("narrow.csv", f"a,b,c,label\n{rows}".encode(), "text/csv").run()
    assert not at.exception
    warnings = [shown(w.value) for w in at.warning]
    for name in ("mlp_seed0", "mlp_seed1"):
        assert any(f"has 3 features per sample but model '{name}' expects 64" in w for w in warnings), warnings


def test_the_navigation_is_sent_before_the_library_is_imported():
    # until st.navigation runs, a first visit lists the pages/ folder's files (helper modules included); importing
    # torch and the rest first kept that list up for seconds
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "app.py").read_text())
    navigation = min(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "navigation")
    library = [n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))  # module level: run at once
               and any(name.split(".")[0] in ("pages", "workbench", "torch") for name in
                       ([n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]))]
    assert library and navigation < min(library)
