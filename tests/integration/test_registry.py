"""Every registered analysis runs through ``run_analysis`` on the sample models and exports cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import registry
from workbench.errors import ParameterError
from workbench.plots._style import figure_title

ROOT = Path(__file__).resolve().parents[2]
SMALL_PARAMS = {"embedding": {"method": "pca"}, "probing": {"cv": 3},"mode_connectivity": {"n_points": 5}, "relative": {"n_anchors": 32}, "interaction_basis": {"graph_directions": 16}}


@pytest.mark.parametrize("entry", registry.ANALYSES, ids=lambda e: e.name)
def test_entry_runs_and_exports(entry, sample_model, digits_test, tmp_path):
    from workbench.report import build_report

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    section = registry.run_analysis(entry.name, model_a=a, model_b=b, dataset=digits_test,
                                    params=SMALL_PARAMS.get(entry.name))
    merged = {**entry.params, **(SMALL_PARAMS.get(entry.name) or {})}
    assert section.title == (entry.title_for(merged) if entry.title_for else entry.title)
    assert section.figures and all(figure_title(f) for f in section.figures)
    assert "run_analysis(" in section.snippet and "mlp_narrow_seed0.safetensors" in section.snippet
    json.dumps(section.record(), allow_nan=False)
    assert section.summary
    if entry.name == "interaction_basis":  # sizes per layer, not the layer names
        for r in section.result:
            sizes = section.summary[r.model]["basis_size"]
            assert sizes == {layer: int(r.basis_size[layer]) for layer in r.layers} and all(type(v) is int for v in sizes.values())
    if entry.name == "mode_connectivity":  # matched on the training split, which the section names
        assert section.train_dataset.name == "digits (train)" and section.record()["train_dataset"]["n_samples"] == 1347
    else:
        assert section.train_dataset is None
    if entry.name == "embedding":  # numbers per view, not an array's printout
        disparity = section.summary["disparity"]
        assert list(disparity) == list(section.result.names) and all(type(v) is float for v in disparity.values())
        for fig in section.figures:  # coloured by class, as the page colours them: one legend entry per digit
            assert sorted(t.name for t in fig.data if t.showlegend is not False) == [f"class {k}" for k in range(10)]
    files = build_report([section], models=[a, b], dataset=digits_test).save(tmp_path)
    with np.load(files["npz"], allow_pickle=False) as arrays:
        assert len(arrays.files) > 0
    assert (ROOT / entry.page).exists(), entry.page


def test_entries_are_unique_and_described():
    names = [e.name for e in registry.ANALYSES]
    assert len(names) == len(set(names))
    for e in registry.ANALYSES:
        assert e.description and e.inputs in registry.INPUT_KINDS


def test_bad_names_and_parameters(sample_model, digits_test):
    a = sample_model("mlp_narrow_seed0")
    with pytest.raises(ParameterError, match=r"Unknown analysis 'simlarity'\. Did you mean 'similarity'\?"):
        registry.run_analysis("simlarity", model_a=a, dataset=digits_test)
    with pytest.raises(ParameterError, match=r"Unknown parameter\(s\) \['colour'\] for the 'similarity' analysis"):
        registry.run_analysis("similarity", model_a=a, model_b=a, dataset=digits_test, params={"colour": 1})
    with pytest.raises(ParameterError, match=r"compares two models; pass model_b"):
        registry.run_analysis("relative", model_a=a, dataset=digits_test)
    from workbench.data import make_dataset

    unlabelled = make_dataset("nolab", digits_test.x)
    for name, what in (("probing", "Probing"), ("mode_connectivity", r"Mode connectivity \(loss and accuracy along the path\)")):
        with pytest.raises(ParameterError, match=rf"^{what} needs labels and dataset 'nolab' has none; pick a labelled dataset\.$"):
            registry.run_analysis(name, model_a=a, model_b=a, dataset=unlabelled)
    with pytest.raises(ParameterError, match=r"The 'params' of the 'similarity' analysis must be a dict of parameter name -> value; got list"):
        registry.run_analysis("similarity", model_a=a, model_b=a, dataset=digits_test, params=[("measure", "rsa")])


@pytest.mark.parametrize(("name", "params", "message"), [
    ("similarity", {"measure": "bogus"}, r"The 'measure' parameter of the 'similarity' analysis must be one of .*linear_cka.*\. Got 'bogus'\.$"),
    ("probing", {"cv": "3"}, r"The 'cv' parameter of the 'probing' analysis must be a whole number\. Got '3'\.$"),
    ("probing", {"control": 1}, r"The 'control' parameter of the 'probing' analysis must be true or false\. Got 1\.$"),
    ("probing", {"c": "big"}, r"The 'c' parameter of the 'probing' analysis must be a number\. Got 'big'\.$"),
    ("embedding", {"layer": 3}, r"The 'layer' parameter of the 'embedding' analysis must be a layer name or null\. Got 3\.$"),
    ("degeneracy", {"output": "logit"}, r"The 'output' parameter of the 'degeneracy' analysis must be one of .*logits.*\. Got 'logit'\.$"),
])
def test_parameter_values_are_checked_before_any_work(name, params, message, sample_model, digits_test):
    a = sample_model("mlp_narrow_seed0")
    with pytest.raises(ParameterError, match=message):
        registry.check_analysis(name, model_a=a, model_b=a, dataset=digits_test, params=params)
    assert registry.check_params(name, {}) == dict(registry.get_analysis(name).params)


def test_check_analysis_refuses_unsuited_models_before_any_work(sample_model, digits_test):
    from workbench.errors import ArchitectureError

    text, mlp, cnn = sample_model("text_transformer_seed0"), sample_model("mlp_narrow_seed0"), sample_model("cnn_seed0")
    for name in ("degeneracy", "interaction_basis"):
        with pytest.raises(ArchitectureError, match=r"^Degeneracy of 'text_transformer_seed0' needs a model built as torch\.nn\.Sequential"):
            registry.check_analysis(name, model_a=mlp, model_b=text, dataset=digits_test)
    with pytest.raises(ArchitectureError, match=r"^mode_connectivity: mlp_narrow_seed0 and cnn_seed0 have different architectures"):
        registry.check_analysis("mode_connectivity", model_a=mlp, model_b=cnn, dataset=digits_test)
    registry.check_analysis("degeneracy", model_a=mlp, model_b=cnn, dataset=digits_test)  # both are sequences of layers
    registry.check_analysis("mode_connectivity", model_a=mlp, model_b=sample_model("mlp_narrow_seed1"), dataset=digits_test)

    from workbench.data import make_dataset
    from workbench.errors import DataError

    one_class = make_dataset("one class", digits_test.x, torch.zeros(digits_test.n_samples, dtype=torch.int64))
    with pytest.raises(DataError, match=r"probe_layers: 'labels' hold one class only \(0\); a probe needs at least two"):
        registry.check_analysis("probing", model_a=mlp, dataset=one_class)
    rare = make_dataset("rare", digits_test.x, (torch.arange(digits_test.n_samples) < 3).long())
    with pytest.raises(ParameterError, match=r"^The 'probing' analysis splits each class into cv=5 folds, and class 1 of "
                                             r"dataset 'rare' has 3 samples; lower cv to 3 \(--param probing.cv=3\) or use"):
        registry.check_analysis("probing", model_a=mlp, dataset=rare)
    single = make_dataset("single", digits_test.x, (torch.arange(digits_test.n_samples) < 1).long())
    with pytest.raises(ParameterError, match=r"class 1 of dataset 'single' has 1 sample; drop the classes with a single "
                                             r"sample or use more samples of each class\.$"):
        registry.check_analysis("probing", model_a=mlp, dataset=single)
    registry.check_analysis("probing", model_a=mlp, dataset=rare, params={"cv": 3})


@pytest.mark.parametrize("name", [e.name for e in registry.ANALYSES if e.inputs == "one_model"])
def test_one_model_entries_run_on_one_model(name, sample_model, digits_test):
    section = registry.run_analysis(name, model_a=sample_model("mlp_narrow_seed0"), dataset=digits_test,
                                    params=SMALL_PARAMS.get(name))
    assert section.figures and section.summary


def test_two_copies_of_one_checkpoint_keep_two_results(sample_model, digits_test):
    a = sample_model("mlp_narrow_seed0")
    for name in ("probing", "embedding"):
        section = registry.run_analysis(name, model_a=a, model_b=a, dataset=digits_test, params=SMALL_PARAMS.get(name))
        keys = list(section.summary if name == "probing" else section.summary["trustworthiness"])
        assert len(keys) == 2 and keys[0].startswith("A: mlp_narrow_seed0") and keys[1].startswith("B: mlp_narrow_seed0")


def test_recreate_snippet_of_uploaded_files_is_valid_python(sample_model_path, digits_test, tmp_path):
    import ast

    from workbench import load_dataset, load_model
    from workbench.models.architectures import build_model

    upload_a = load_model(sample_model_path("mlp_narrow_seed0").read_bytes(), filename="model.safetensors")
    spec = upload_a.architecture
    state = tmp_path / "weights.pt"
    torch.save(build_model(spec).state_dict(), state)
    upload_b = load_model(state.read_bytes(), filename="weights.pt", architecture=spec)
    np.savez(tmp_path / "mine.npz", x=digits_test.x.numpy(), y=digits_test.y.numpy())
    data = load_dataset((tmp_path / "mine.npz").read_bytes(), filename="mine.npz")
    section = registry.run_analysis("similarity", model_a=upload_a, model_b=upload_b, dataset=data)
    ast.parse(section.snippet)  # a comment once swallowed the comma between arguments
    assert "model_a = load_model('model.safetensors')  # the uploaded file, weights sha256" in section.snippet
    assert f"model_b = load_model('weights.pt', architecture={spec!r})" in section.snippet
    assert "dataset = load_dataset('mine.npz')  # the uploaded file, sha256" in section.snippet


def test_recreate_snippet_of_files_on_disk_runs_from_another_folder(sample_model, digits_test, tmp_path, monkeypatch):
    from workbench import load_dataset, load_model

    cnn = sample_model("cnn_seed0")  # its spec holds a boolean: the snippet must write True, not JSON's true
    torch.save(cnn.module.state_dict(), tmp_path / "cnn.pt")
    np.savez(tmp_path / "mine.npz", x=digits_test.x.numpy(), y=digits_test.y.numpy())
    monkeypatch.chdir(tmp_path)
    model = load_model("cnn.pt", architecture=cnn.architecture)
    section = registry.run_analysis("activations", model_a=model, dataset=load_dataset("mine.npz"), layers=["fc1"])
    assert "'batchnorm': True" in section.snippet and str(tmp_path / "mine.npz") in section.snippet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    namespace: dict = {}
    exec(section.snippet, namespace)  # noqa: S102 - the snippet the report shows must run as written
    assert namespace["section"].summary == section.summary


def test_similarity_is_reported_with_its_chance_level(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    section = registry.run_analysis("similarity", model_a=a, model_b=b, dataset=digits_test, layers=["fc1", "out"])
    matrix, shuffled = section.result
    assert shuffled.values.max() < 0.5 < matrix.values.min()  # trained layers far above unrelated samples
    assert "B's samples in a random order" in shuffled.estimator and len(section.figures) == 2
    chance = section.summary["chance level (B's samples shuffled)"]
    assert chance["max"] == pytest.approx(float(shuffled.values.max()))
    alone = registry.run_analysis("similarity", model_a=a, model_b=b, dataset=digits_test, layers=["fc1"],
                                  params={"chance": False})
    assert not isinstance(alone.result, list) and "chance level (B's samples shuffled)" not in alone.summary


def test_recreate_snippet_asks_each_model_for_its_own_default_layers_and_keeps_blobs_options(sample_model, digits_test):
    from workbench import load_dataset

    section = registry.run_analysis("similarity", model_a=sample_model("mlp_narrow_seed0"), model_b=sample_model("cnn_seed0"),
                                    dataset=digits_test, params={"chance": False})
    assert "layers_b=[" in section.snippet
    namespace: dict = {}
    exec(section.snippet, namespace)  # noqa: S102 - the snippet the report shows must run as written
    np.testing.assert_allclose(namespace["section"].result.values, section.result.values)
    blobs = load_dataset("blobs", separation=2.0, n_samples=300, n_classes=3, seed=4)
    expression = registry.dataset_expression(blobs)
    assert expression == "load_dataset('blobs', separation=2.0, n_samples=300, n_features=64, n_classes=3, seed=4)"
    assert eval(expression, {"load_dataset": load_dataset}).sha256 == blobs.sha256  # noqa: S307


def test_intrinsic_dimension_summary_keeps_each_models_layers_in_its_own_order(sample_model, digits_test):
    from workbench.report.build import summary_tables

    mlp, cnn = sample_model("mlp_narrow_seed0"), sample_model("cnn_seed0")  # both have fc1, relu1 and out, at other depths
    section = registry.run_analysis("intrinsic_dimension", model_a=mlp, model_b=cnn, dataset=digits_test)
    result_a, result_b = section.result
    assert {"fc1", "out"} <= set(result_a.layers) & set(result_b.layers) and result_a.layers != result_b.layers
    assert [list(section.summary[m.name]) for m in (mlp, cnn)] == [list(result_a.layers), list(result_b.layers)]
    tables = summary_tables(section.summary)  # the command line's report: a table per model
    assert [(caption, [row[0] for row in rows]) for caption, _, rows in tables] == [
        (r.model_name, list(r.layers)) for r in section.result]
    (caption, columns, rows), = summary_tables(registry.summarize(section.result))  # the app's: a row per model and layer
    assert caption == "intrinsic dimension" and columns[0] == "dimension"
    expected = [(f"{r.model_name} / {layer}", r.dimension[j]) for r in section.result for j, layer in enumerate(r.layers)]
    assert [row[0] for row in rows] == [name for name, _ in expected]
    for row, (_, dimension) in zip(rows, expected):
        assert float(row[1]) == pytest.approx(float(dimension), rel=1e-3)


@pytest.mark.parametrize("model_b", ["mlp_tanh_seed0", "cnn_seed0"])
def test_relative_snippet_compares_the_same_layer_pairs(model_b, sample_model, digits_test):
    section = registry.run_analysis("relative", model_a=sample_model("mlp_seed0"), model_b=sample_model(model_b),
                                    dataset=digits_test, params={"n_anchors": 32})
    namespace: dict = {}
    exec(section.snippet, namespace)  # noqa: S102 - the snippet the report shows must run as written
    again = namespace["section"].result
    assert (again.layers_a, again.layers_b) == (section.result.layers_a, section.result.layers_b)
    np.testing.assert_allclose(again.jaccard, section.result.jaccard)
    assert namespace["section"].summary == section.summary


def test_separability_and_mode_connectivity_key_numbers_are_the_reports_tables(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    sep = registry.run_analysis("separability", model_a=a, dataset=digits_test, layers=["fc1"], params={"cv": 3})
    assert sep.summary == registry.summarize(sep.result)["separability"]  # what the app's report shows
    row = sep.summary["mlp_narrow_seed0"]["fc1"]
    # named as the page's table names them
    assert "score S (lower = more separable)" in row and "Thornton index" in row and "probe accuracy (CV)" in row
    mc = registry.run_analysis("mode_connectivity", model_a=a, model_b=b, dataset=digits_test, params={"n_points": 5})
    naive = mc.summary["naive (as trained)"]["test"]
    assert set(naive) == {"barrier above the line", "barrier above the endpoint mean", "accuracy drop"}
    assert naive["barrier above the line"] == mc.result.barriers["naive"].linear["test"]
    assert sep.extraction == {"pooling": "mean", "layers": {"A": ["fc1"]}} and mc.extraction == {}  # weights alone
    spectra = next(f for f in mc.figures if any("permutation" in (t.name or "") for t in f.data))
    assert {t.name for t in spectra.data} == {"mlp_narrow_seed0", "mlp_narrow_seed1 (the same after its permutation)"}
    assert len(mc.figures) == 5  # the page's figures, the matching objective included, and the barrier table


def test_a_distance_measure_reports_its_closest_pair(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    section = registry.run_analysis("similarity", model_a=a, model_b=b, dataset=digits_test, layers=["fc1", "out"],
                                    params={"measure": "procrustes_distance", "chance": False})
    values = np.asarray(section.result.values)
    assert section.summary["closer pairs score"] == "lower" and "max" not in section.summary
    assert section.summary["min"] == pytest.approx(float(values.min()))


def test_an_embedding_layer_model_b_lacks_is_refused(sample_model, digits_test):
    from workbench.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError, match=r"^Model B \('mlp_tanh_seed0'\) has no layer 'relu1' among its extracted layers "
                                                r"\(.*tanh1.*\); name a layer both models have"):
        registry.run_analysis("embedding", model_a=sample_model("mlp_seed0"), model_b=sample_model("mlp_tanh_seed0"),
                              dataset=digits_test, params={"layer": "relu1", "method": "pca"})
    # a layer of the model that was not extracted is not called unknown
    with pytest.raises(UnknownLayerError, match=r"^Layer 'relu1' of model A \('mlp_seed0'\) is not among the extracted layers "
                                                r"\(fc1, fc2\); add it to the layers to extract \(--layers, or layers=\)\.$"):
        registry.run_analysis("embedding", model_a=sample_model("mlp_seed0"), dataset=digits_test, layers=["fc1", "fc2"],
                              params={"layer": "relu1", "method": "pca"})


def test_topology_sections_name_the_layers_left_out_as_constant(sample_model):
    from workbench import load_dataset

    text, sentences = sample_model("text_transformer_seed0"), load_dataset("sentences")
    layers = ["embed", "layers.0", "norm"]  # 'embed' at the first token is the same for every sentence
    sep = registry.run_analysis("separability", model_a=text, dataset=sentences, layers=layers, pooling="cls",
                                params={"cv": 3})
    table = sep.summary["text_transformer_seed0"]
    assert table["embed"] == {"score S (lower = more separable)": "n/a: constant over samples"}
    assert set(table) == set(layers) and isinstance(table["norm"]["score S (lower = more separable)"], float)
    top = registry.run_analysis("topology", model_a=text, model_b=text, dataset=sentences, layers=layers, pooling="cls",
                                params={"max_points": 60})
    assert top.summary["left out of A, constant over samples"] == "embed"


def test_topology_runs_with_the_page_s_defaults_and_takes_normalize(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    section = registry.run_analysis("topology", model_a=a, model_b=b, dataset=digits_test, layers=["relu1", "out"])
    assert section.result.normalize and section.result.params["max_points"] == 1000  # as the Topology page computes it
    raw = registry.run_analysis("topology", model_a=a, model_b=b, dataset=digits_test, layers=["relu1", "out"],
                                params={"normalize": False})
    assert not raw.result.normalize and raw.result.distances.max() > section.result.distances.max()


def test_a_probing_section_is_titled_by_its_probe_and_control_task(sample_model, digits_test):
    a = sample_model("mlp_narrow_seed0")
    section = registry.run_analysis("probing", model_a=a, dataset=digits_test, layers=["out"],
                                    params={"probe": "linear", "control": False, "cv": 2})
    assert section.title == "Linear probes per layer"
    assert registry.get_analysis("probing").title_for({"probe": "mlp", "control": True}) == "MLP probes per layer, with control task"


def test_named_layers_are_checked_before_any_work(sample_model, digits_test):
    from workbench import load_dataset
    from workbench.errors import UnknownLayerError

    text = sample_model("text_transformer_seed0")
    sentences = load_dataset("sentences")
    registry.check_layers_run(text, sentences, ["norm", "layers.1.linear1"], "a")  # both run: nothing to say
    with pytest.raises(ParameterError, match=r"^Model A \('text_transformer_seed0'\): layer 'layers.0.self_attn.out_proj' "
                                             r"gives no activations per sample \(not run by the forward pass"):
        registry.check_layers_run(text, sentences, ["norm", "layers.0.self_attn.out_proj"], "a")
    mlp = sample_model("mlp_seed1")
    with pytest.raises(UnknownLayerError, match=r"^Model B \('mlp_seed1'\): Unknown layer 'conv1'\..* Name model B's "
                                                r"layers separately \(layers_b, --layers-b\)\.$"):
        registry.check_layers_run(mlp, digits_test, ["conv1"], "b")
    with pytest.raises(UnknownLayerError) as raised:
        registry.check_layers_run(mlp, digits_test, ["conv1"], "b", separate=True)
    assert "separately" not in str(raised.value)
