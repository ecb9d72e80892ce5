"""Every registered measure passes every check that applies to it (ids like ``linear_cka-rotation``)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from workbench import registry
from workbench.errors import ParameterError, WorkbenchError

MEASURES = {m.name: m for m in registry.MEASURES}
TRANSFORMS = ("rotation", "permutation", "scale", "translation", "linear")


def _pair(n: int = 120, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x @ rng.standard_normal((d, d + 2))) + 0.3 * rng.standard_normal((n, d + 2))
    return x, y


def _transform(y: np.ndarray, kind: str, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = y.shape[1]
    if kind == "rotation":
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        return y @ q
    if kind == "permutation":
        return y[:, rng.permutation(d)]
    if kind == "scale":
        return 3.7 * y
    if kind == "translation":
        return y + rng.standard_normal(d) * 5
    return y @ (rng.standard_normal((d, d)) + 3 * np.eye(d))


def _cases(check):
    return [pytest.param(m, id=f"{m.name}-{check}") for m in registry.MEASURES]


@pytest.mark.parametrize("measure", _cases("identity"))
def test_identity(measure):
    x, _ = _pair()
    expected = 1.0 if measure.higher_is_closer else 0.0
    assert measure.fn(x, x) == pytest.approx(expected, abs=max(measure.identity_tolerance, 1e-6))


@pytest.mark.parametrize(
    "measure",
    [pytest.param(m, id=f"{m.name}-noise", marks=[] if m.noise_bound is not None else [pytest.mark.xfail(
        reason="independent Gaussian clouds have alike topology: no negative control for diagram distances", strict=False)])
     for m in registry.MEASURES],
)
def test_independent_noise_scores_low(measure):
    assert measure.noise_bound is not None
    rng = np.random.default_rng(3)
    value = measure.fn(rng.standard_normal((600, 5)), rng.standard_normal((600, 5)))
    if measure.higher_is_closer:
        assert value < measure.noise_bound
    else:
        assert value > measure.noise_bound


@pytest.mark.parametrize(
    ("measure", "kind"),
    [pytest.param(m, t, id=f"{m.name}-{t}") for m in registry.MEASURES for t in TRANSFORMS if t in m.invariant_to],
)
def test_declared_invariance(measure, kind):
    x, y = _pair()
    assert measure.fn(x, _transform(y, kind)) == pytest.approx(measure.fn(x, y), abs=1e-6)


@pytest.mark.parametrize("measure", [pytest.param(m, id=f"{m.name}-symmetry") for m in registry.MEASURES if m.symmetric])
def test_symmetry(measure):
    x, y = _pair()
    assert measure.fn(x, y) == pytest.approx(measure.fn(y, x), abs=1e-9)


@pytest.mark.parametrize("measure", _cases("inputs-unchanged"))
def test_inputs_unchanged_and_deterministic(measure):
    x, y = _pair()
    xt = torch.from_numpy(x.copy())
    x0, y0 = x.copy(), y.copy()
    first = measure.fn(xt, y)
    assert np.array_equal(xt.numpy(), x0) and np.array_equal(y, y0)
    assert measure.fn(xt, y) == first


BAD_INPUTS = {
    "nan": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), r"'x' contains 1 NaN or infinite"),
    "1d": (lambda x: x[:, 0], r"'x' must be 2-D"),
    "mismatched-n": (lambda x: x[:-1], r"same number of samples"),
    "too-few-samples": (lambda x: x[:1], r"needs at least"),
    "constant": (lambda x: np.ones_like(x), r"constant over samples|equal|same"),
    "layers-dict": (lambda x: {"fc1": x, "fc2": x},
                    r"'x' must be one \(n_samples, n_features\) array; got dict of 2 layers \(fc1, fc2\). Pass one layer, such as x\['fc1'\]"),
    "model": (lambda x: torch.nn.Linear(8, 3), r"'x' must be an \(n_samples, n_features\) array of activations; got the model itself \(Linear\)"),
}


@pytest.mark.parametrize(
    ("measure", "bad"), [pytest.param(m, b, id=f"{m.name}-{b}") for m in registry.MEASURES for b in BAD_INPUTS]
)
def test_bad_input_names_the_argument(measure, bad):
    x, y = _pair()
    make, message = BAD_INPUTS[bad]
    bad_x = make(x)
    if bad == "too-few-samples":
        bad_x, y = x[: measure.min_samples - 1], y[: measure.min_samples - 1]
    with pytest.raises(WorkbenchError, match=message):
        measure.fn(bad_x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("measure", _cases("cuda"))
def test_cuda_agrees_with_cpu(measure):
    x, y = _pair()
    assert measure.fn(x, y, device="cuda") == pytest.approx(measure.fn(x, y, device="cpu"), abs=1e-9)


def test_every_measure_declares_properties():
    for m in registry.MEASURES:
        assert m.invariant_to, m.name
        assert "device" in inspect.signature(m.fn).parameters, m.name


def test_every_public_similarity_function_is_registered():
    from workbench.analyses import similarity

    public = {name for name, obj in vars(similarity).items()
              if inspect.isfunction(obj) and obj.__module__ == similarity.__name__ and not name.startswith("_")}
    covered = {getattr(m.fn, "func", m.fn).__name__ for m in registry.MEASURES}
    covered |= {"similarity_matrix", "minibatch_cka"}  # layer x layer and streaming forms of the registered measures
    covered |= {"chance_level"}  # similarity_matrix on shuffled samples, the negative control of any measure
    assert public <= covered, f"unregistered: {sorted(public - covered)}"


def test_every_public_analysis_function_is_reachable_from_the_registry():
    """Each public function of an analysis module is a registered measure, called by a registry entry, or a
    documented building block listed here with the entry that uses it."""
    import importlib

    building_blocks = {
        "relative": {"select_anchors", "relative_representation", "cross_model_agreement", "relative_comparison", "stitch"},
        "topology": {"persistence", "diagram_distance", "class_separability", "plateau_index", "separability_trajectory",
                     "topological_rsa", "persistence_distance"},
        "mode_connectivity": {"permutation_spec", "weight_matching", "activation_matching", "apply_permutation",
                              "interpolate", "loss_barrier", "layer_alignment", "merge", "merged_model", "to_safetensors",
                              "same_architecture"},
        "degeneracy": {"activation_rank", "gradient_rank", "relu_patterns", "llc_estimate", "sequential_layers",
                       "default_layers", "layer_activations"},
        "stats": {"layer_stats"},
        "probing": {"moment_probe"},
        "embedding": {"embed", "trustworthiness", "intrinsic_dimension", "warm_up"},
        "knn": {"knn_graph", "clear_knn_cache", "data_hash"},
    }
    source = inspect.getsource(registry)
    for family, blocks in building_blocks.items():
        module = importlib.import_module(f"workbench.analyses.{family}")
        public = {name for name, obj in vars(module).items()
                  if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")}
        called = {name for name in public if f"{name}(" in source or f" {name}\n" in source}
        missing = public - called - blocks
        assert not missing, f"{family}: not registered and not a listed building block: {sorted(missing)}"


def test_activations_of_different_datasets_are_not_compared():
    from workbench.activations import Activations
    from workbench.analyses.relative import relative_agreement_by_layer
    from workbench.analyses.similarity import similarity_matrix
    from workbench.analyses.topology import diagram_distance_matrix
    from workbench.distributed import similarity_matrix_sharded

    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = Activations({"l": x}, model_name="a", dataset_name="digits (test)", dataset_sha256="1" * 64)
    b = Activations({"l": x[torch.randperm(60)]}, model_name="b", dataset_name="digits (shuffled)", dataset_sha256="2" * 64)
    message = (r"the two activations come from different datasets \('digits \(test\)', sha256 111111111111, and "
               r"'digits \(shuffled\)', sha256 222222222222\); sample i of A is compared with sample i of B")
    for call in (lambda: similarity_matrix(a, b), lambda: relative_agreement_by_layer(a, b, n_anchors=8),
                 lambda: diagram_distance_matrix(a, b, dim=0), lambda: similarity_matrix_sharded(a, b, n_tasks=1)):
        with pytest.raises(WorkbenchError, match=message):
            call()
    same = Activations({"l": x}, model_name="c", dataset_name="digits (test)", dataset_sha256="1" * 64)
    assert similarity_matrix(a, same).values[0, 0] == pytest.approx(1.0)  # same data: compared
    assert similarity_matrix(a, {"l": x}).values[0, 0] == pytest.approx(1.0)  # plain tensors carry no hash


def test_activations_of_a_dataset_and_of_its_unlabelled_inputs_are_compared(sample_model, digits_test):
    from workbench import extract
    from workbench.analyses.similarity import similarity_matrix
    from workbench.data import make_dataset

    model = sample_model("mlp_seed0")
    labelled = extract(model, digits_test, ["fc1"])
    bare = extract(sample_model("mlp_seed1"), digits_test.x.numpy(), ["fc1"])  # the same inputs, no labels
    assert labelled.dataset_sha256 != bare.dataset_sha256 and labelled.inputs_sha256 == bare.inputs_sha256
    assert 0.0 < similarity_matrix(labelled, bare).values[0, 0] < 1.0
    relabelled = extract(model, make_dataset("other labels", digits_test.x, (digits_test.y + 1) % 10), ["fc1"])
    assert similarity_matrix(labelled, relabelled).values[0, 0] == pytest.approx(1.0)
    shuffled = extract(model, digits_test.x.flip(0), ["fc1"])
    with pytest.raises(WorkbenchError, match=r"the two activations come from different datasets"):
        similarity_matrix(labelled, shuffled)


def _figure_helpers() -> list:
    import importlib
    import pkgutil

    import workbench.plots as plots

    found = []
    for info in pkgutil.iter_modules(plots.__path__):
        module = importlib.import_module(f"workbench.plots.{info.name}")
        found += [f for f in vars(module).values() if hasattr(f, "result_types") and f.__module__ == module.__name__]
    return found


def test_every_figure_helper_taking_a_result_checks_its_type():
    helpers = _figure_helpers()
    assert len(helpers) >= 30
    for helper in helpers:
        wanted = " or ".join(t.__name__ for t in helper.result_types if t is not type(None))
        with pytest.raises(ParameterError, match=rf"^{helper.__name__} draws (a result|results) of type {wanted}; got dict\. Pass what"):
            helper({"values": [[1.0]]})


def test_a_figure_given_another_result_names_the_functions_that_make_each(sample_model, digits_test):
    from workbench.analyses.embedding import intrinsic_dimension
    from workbench.analyses.mode_connectivity import interpolate
    from workbench.plots.embedding import intrinsic_dimension_profile
    from workbench.plots.mode_connectivity import interpolation_curves
    from workbench.plots.topology import separability_curves

    one_layer = intrinsic_dimension(torch.randn(200, 5, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ParameterError, match=r"^intrinsic_dimension_profile draws results of type LayerIntrinsicDimensionResult; "
                       r"got \w+ \(from intrinsic_dimension\(\)\)\. Pass what layer_intrinsic_dimension\(\) returns\.$"):
        intrinsic_dimension_profile(one_layer)
    with pytest.raises(ParameterError, match=r"Pass what layer_separability\(\) or separability_trajectory\(\) returns\.$"):
        separability_curves(one_layer)
    curve = interpolate(sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1"), digits_test, n_points=3)
    fig = interpolation_curves(curve)  # one method: the plain interpolation
    assert [t.name for t in fig.data][:1] == ["interpolation · test: digits (test)"] and list(fig.data[0].x) == [0.0, 0.5, 1.0]


def test_figure_helpers_still_draw_their_own_results(sample_model, digits_test):
    from workbench import extract
    from workbench.analyses.similarity import similarity_matrix
    from workbench.plots.similarity import similarity_heatmap

    acts = extract(sample_model("mlp_seed0"), digits_test, ["fc1", "out"])
    assert similarity_heatmap(similarity_matrix(acts)).data
    assert similarity_heatmap(result=similarity_matrix(acts)).data


def test_layers_of_two_models_share_an_axis_in_both_forward_orders():
    import plotly.graph_objects as go

    from workbench.plots._style import merged_order, order_layers

    mlp, cnn = ["input", "relu1", "relu2", "out"], ["input", "relu_fc1", "out"]
    assert merged_order(mlp, cnn) == ["input", "relu1", "relu2", "relu_fc1", "out"]
    assert merged_order(cnn, mlp) == ["input", "relu_fc1", "relu1", "relu2", "out"]
    assert merged_order(["a", "b"], ["c", "d"]) == ["a", "b", "c", "d"]
    fig = order_layers(go.Figure([go.Scatter(x=mlp, y=[1, 2, 3, 4]), go.Scatter(x=cnn, y=[1, 2, 3])]), mlp, cnn)
    assert list(fig.layout.xaxis.categoryarray) == merged_order(mlp, cnn) and fig.layout.xaxis.categoryorder == "array"


def test_a_result_repr_rounds_numbers_and_names_nested_results_only():
    import dataclasses

    from workbench.analyses._result import Result

    @dataclasses.dataclass(frozen=True)
    class Inner(Result):
        values: np.ndarray

    @dataclasses.dataclass(frozen=True)
    class Outer(Result):
        seconds: float
        parts: dict

    outer = Outer(seconds=0.024978700006613508, parts={"a": Inner(np.array([1 / 3, 2.0])), "b": Inner(np.zeros(3))})
    assert repr(outer) == "Outer(seconds=0.0249787, parts={'a': Inner(...), 'b': Inner(...)})"
    assert repr(outer.parts["a"]) == "Inner(values=[0.333333, 2])"
