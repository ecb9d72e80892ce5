"""Scale-out on Ray gives the same numbers as the single-process path."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from torch import nn

from workbench import extract
from workbench.analyses.similarity import similarity_matrix
from workbench.distributed import extract_sharded, similarity_matrix_sharded
from workbench.errors import DataError, ParameterError, UnsupportedFormatError

LAYERS = ["fc1", "relu1", "relu2", "out"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_model_normalised_by_each_batch_is_extracted_in_one_run(tmp_path):
    from workbench.models import wrap_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False))
    model, x = wrap_module(net, name="batch-normed"), torch.randn(30, 5)
    sharded = extract_sharded(model, x, ["1"], n_shards=3, engine="local", batch_size=8, cache_dir=tmp_path / "a")
    single = extract(model, x, ["1"], batch_size=8, cache_dir=tmp_path / "b")
    assert torch.equal(sharded["1"], single["1"])  # shards of 10 would have been normalised as batches 8 + 2


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sharded_extraction_equals_extract(engine, request, sample_model, digits_test, tmp_path):
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    model = sample_model("mlp_narrow_seed0")
    steps = []
    sharded = extract_sharded(model, digits_test, LAYERS, n_shards=3, engine=engine, cache_dir=tmp_path / "sharded",
                              progress=lambda d, t: steps.append((d, t)))
    single = extract(model, digits_test, LAYERS, cache_dir=tmp_path / "single")
    assert steps[-1] == (3, 3)
    assert sharded.key == single.key
    for layer in LAYERS:
        assert torch.equal(sharded[layer], single[layer])
    steps.clear()
    again = extract(model, digits_test, LAYERS, cache_dir=tmp_path / "sharded", progress=lambda d, t: steps.append((d, t)))
    assert steps == [(digits_test.n_samples,) * 2]  # one call at the end: read, not run
    assert torch.equal(again["out"], single["out"])  # the merged entry is the cache of extract


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sharded_similarity_equals_single_process(engine, request, sample_model, digits_test):
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    a = extract(sample_model("mlp_narrow_seed0"), digits_test, LAYERS)
    b = extract(sample_model("mlp_narrow_seed1"), digits_test, LAYERS)
    for measure in ("linear_cka", "procrustes_distance"):
        single = similarity_matrix(a, b, measure=measure)
        sharded = similarity_matrix_sharded(a, b, measure=measure, n_tasks=3, engine=engine)
        np.testing.assert_allclose(sharded.values, single.values, atol=1e-12)
        assert sharded.layers_a == single.layers_a and sharded.layers_b == single.layers_b
        assert f"rows over 3 {engine} task(s)" in sharded.estimator
    self_single = similarity_matrix(a, measure="linear_cka")
    self_sharded = similarity_matrix_sharded(a, measure="linear_cka", n_tasks=2, engine=engine)
    np.testing.assert_allclose(self_sharded.values, self_single.values, atol=1e-12)


def test_bad_engine_and_missing_ray(sample_model, digits_test, monkeypatch):
    model = sample_model("mlp_narrow_seed0")
    with pytest.raises(ParameterError, match=r"The 'engine' parameter of extract_sharded must be one of 'ray', 'local'"):
        extract_sharded(model, digits_test, LAYERS, engine="dask")
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UnsupportedFormatError, match=r"needs the optional Ray package: pip install 'representation-workbench\[distributed\]'"):
        similarity_matrix_sharded({"x": np.eye(5)}, engine="ray")


def test_sharded_similarity_checks_its_arguments_like_the_single_process_one():
    from workbench.errors import DataError, UnknownLayerError

    acts = {"a": np.random.default_rng(0).normal(size=(20, 3)), "b": np.random.default_rng(1).normal(size=(20, 4))}
    with pytest.raises(ParameterError, match=r"The 'layers_a' parameter of similarity_matrix_sharded must be a non-empty list"):
        similarity_matrix_sharded(acts, layers_a="a", engine="local")
    with pytest.raises(ParameterError, match=r"must be a non-empty list of layer names\. Got \[\]"):
        similarity_matrix_sharded(acts, layers_a=[], engine="local")
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'nope' in 'acts_a'\. Layers: a, b\."):
        similarity_matrix_sharded(acts, layers_a=["nope"], engine="local")
    with pytest.raises(DataError, match=r"'acts_a' holds no layers"):
        similarity_matrix_sharded({}, engine="local")


def test_sharded_cca_with_undefined_pairs_equals_single_process():
    rng = np.random.default_rng(0)
    acts = {"wide1": rng.normal(size=(20, 30)), "narrow": rng.normal(size=(20, 3)), "wide2": rng.normal(size=(20, 30))}
    options = {"measure": "cca_similarity", "kind": "mean"}
    for other in (None, {k: v + 0.1 * rng.normal(size=v.shape) for k, v in acts.items()}):
        single = similarity_matrix(acts, other, **options)
        sharded = similarity_matrix_sharded(acts, other, n_tasks=3, engine="local", **options)  # wide rows: all undefined
        np.testing.assert_allclose(sharded.values, single.values, atol=1e-12)
        assert sharded.params["undefined_pairs"] == [tuple(p) for p in single.params["undefined_pairs"]]
        assert sharded.estimator.startswith(single.estimator) and f"for {5 if other is None else 8} of" in sharded.estimator
    small = {name: rng.normal(size=(40, 3 + i)) for i, name in enumerate(("a", "b", "c"))}  # every pair defined
    single = similarity_matrix(small, **options)
    sharded = similarity_matrix_sharded(small, n_tasks=3, engine="local", **options)
    assert sharded.params["ranks_a"] == single.params["ranks_a"] == {"a": 3, "b": 4, "c": 5}  # from every task
    assert sharded.params["ranks_b"] == single.params["ranks_b"]
    with pytest.raises(DataError, match="span 19 \\+ 19 dimensions but 20 samples leave only 19 after centring"):
        similarity_matrix_sharded({"wide1": acts["wide1"], "wide2": acts["wide2"]}, n_tasks=2, engine="local", **options)


def test_sharded_minibatch_cka_runs_as_one_task_like_the_single_process_stream(sample_model, digits_test):
    a = extract(sample_model("mlp_narrow_seed0"), digits_test, LAYERS)
    options = {"measure": "linear_cka", "debiased": True, "memory_limit_mb": 0.05}
    single = similarity_matrix(a, **options)
    sharded = similarity_matrix_sharded(a, n_tasks=3, engine="local", **options)
    assert single.params["streamed"] and sharded.params["streamed"]
    np.testing.assert_allclose(sharded.values, single.values, atol=1e-12)
    assert "rows over 1 local task(s)" in sharded.estimator
