"""Linear mode connectivity: permutation specs, weight/activation matching, interpolation, barriers, merging."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from workbench import load_model
from workbench.analyses.mode_connectivity import (
    BarrierResult,
    InterpolationResult,
    MergeResult,
    ModeConnectivityResult,
    PermutationSpec,
    _check_runs,
    activation_matching,
    apply_permutation,
    interpolate,
    layer_alignment,
    loss_barrier,
    merge,
    merged_model,
    mode_connectivity,
    permutation_spec,
    to_safetensors,
    weight_matching,
)
from workbench.data import make_dataset
from workbench.errors import ArchitectureError, DataError, ParameterError
from workbench.models.architectures import build_model
from workbench.plots._style import figure_title

RESMLP = {"type": "resmlp", "in_features": 64, "width": 24, "n_blocks": 2, "n_classes": 10, "activation": "relu"}


def random_permutations(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    spec = permutation_spec(model)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {
        p: torch.randperm(state[pairs[0][0]].shape[pairs[0][1]], generator=gen).numpy()
        for p, pairs in spec.perms.items()
    }


def outputs64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resmlp() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(RESMLP)
    with torch.no_grad():  # non-trivial biases so that a wrong permutation of them would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def wide_pair(sample_model):
    a, b = sample_model("mlp_seed0"), sample_model("mlp_seed1")
    return a, b, weight_matching(a, b)


@pytest.fixture(scope="module")
def wide_curves(wide_pair, digits_test):
    a, b, wm = wide_pair
    naive = interpolate(a, b, digits_test, n_points=13)
    matched = interpolate(a, apply_permutation(b, wm), digits_test, n_points=13)
    return naive, matched


# ---------------------------------------------------------------------------------------------
# permutation specs


def test_spec_of_cnn_permutes_batchnorm_weights_and_running_statistics(sample_model):
    spec = permutation_spec(sample_model("cnn_seed0"))
    assert spec.axes["conv1.weight"] == ("P_conv1", None, None, None)
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert spec.axes[key] == ("P_conv1",)
    assert spec.axes["bn1.num_batches_tracked"] == ()
    assert spec.axes["conv2.weight"] == ("P_conv2", "P_conv1", None, None)
    assert spec.axes["fc1.weight"] == ("P_fc1", "P_conv2")  # through pool and flatten
    assert spec.axes["out.weight"] == (None, "P_fc1") and spec.axes["out.bias"] == (None,)


def test_spec_of_residual_net_shares_one_permutation_across_the_stream(resmlp):
    spec = permutation_spec(resmlp)
    stream = spec.axes["inp.weight"][0]
    assert spec.axes["blocks.0.fc2.weight"][0] == stream == spec.axes["blocks.1.fc2.weight"][0]
    assert spec.axes["blocks.0.fc1.weight"][1] == stream == spec.axes["out.weight"][1]
    assert spec.axes["blocks.0.fc1.weight"][0] != spec.axes["blocks.1.fc1.weight"][0] != stream
    assert len(spec.perm_names) == 3


# ---------------------------------------------------------------------------------------------
# apply_permutation keeps the function


@pytest.mark.parametrize("name", ["mlp", "cnn", "resmlp"])
def test_random_permutation_computes_the_same_function(name, sample_model, resmlp, digits_test):
    model = {"mlp": sample_model("mlp_seed0").module, "cnn": sample_model("cnn_seed0").module, "resmlp": resmlp}[name]
    before = state_copy(model)
    perms = random_permutations(model, seed=1)
    permuted = apply_permutation(model, perms)
    assert not torch.equal(
        permuted.state_dict()[permutation_spec(model).perms[next(iter(perms))][0][0]],
        model.state_dict()[permutation_spec(model).perms[next(iter(perms))][0][0]],
    )
    diff = (outputs64(model, digits_test.x) - outputs64(permuted, digits_test.x)).abs().max()
    assert float(diff) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_batchnorm_running_statistics_are_permuted_with_their_channels(sample_model):
    cnn = sample_model("cnn_seed0").module
    perms = random_permutations(cnn, seed=2)
    permuted = apply_permutation(cnn, perms).state_dict()
    idx = torch.from_numpy(perms["P_conv1"])
    for key in ("bn1.running_mean", "bn1.running_var", "bn1.weight"):
        assert torch.equal(permuted[key], cnn.state_dict()[key][idx])


def test_hand_written_spec_permutes_only_what_it_names(sample_model, digits_test):
    mlp = sample_model("mlp_narrow_seed0").module
    spec = PermutationSpec({"fc1.weight": ("P1", None), "fc1.bias": ("P1",), "fc2.weight": (None, "P1")})
    perm = np.random.default_rng(0).permutation(64)
    permuted = apply_permutation(mlp, {"P1": perm}, spec=spec)
    assert float((outputs64(mlp, digits_test.x) - outputs64(permuted, digits_test.x)).abs().max()) < 1e-5
    assert torch.equal(permuted.state_dict()["fc2.bias"], mlp.state_dict()["fc2.bias"])
    result = weight_matching(mlp, permuted, spec=spec)
    assert list(result.permutations) == ["P1"]
    np.testing.assert_array_equal(result.permutations["P1"], np.argsort(perm))
    pair = mode_connectivity(mlp, permuted, digits_test, methods=["weight_matching"], n_points=3, spec=spec)
    assert list(pair.weight_matching.permutations) == ["P1"] and pair.layers.distance_after.max() < 1e-12
    merged = merge([mlp, permuted], digits_test, spec=spec, max_rounds=1)
    assert list(merged.permutations[0]) == ["P1"]
    assert merged.merged_accuracy == pytest.approx(merged.member_accuracy[0], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# matching recovers a known permutation


@pytest.mark.parametrize("name", ["mlp_narrow", "cnn", "resmlp"])
def test_matching_a_permuted_copy_recovers_the_permutation_and_no_barrier(name, sample_model, resmlp, digits_test):
    model = {
        "mlp_narrow": sample_model("mlp_narrow_seed0").module,
        "cnn": sample_model("cnn_seed0").module,
        "resmlp": resmlp,
    }[name]
    perms = random_permutations(model, seed=3)
    copy_b = apply_permutation(model, perms)
    result = weight_matching(model, copy_b, seed=5)
    for p, perm in perms.items():  # unit i of the aligned copy is unit perm^-1[i] of the shuffled one
        np.testing.assert_array_equal(result.permutations[p], np.argsort(perm))
    assert result.converged and np.all(np.diff(result.objective) >= -1e-9)
    curve = interpolate(model, apply_permutation(copy_b, result), digits_test, n_points=5)
    barrier = loss_barrier(curve)
    assert abs(barrier.linear["test"]) < 1e-6 and abs(barrier.mean["test"]) < 1e-6
    layers = layer_alignment(model, copy_b, result, top_k=3)  # aligned copy = model: distance 0, directions equal
    assert np.all(layers.distance_after < 1e-12) and np.all(layers.distance_before > 0.1)
    np.testing.assert_allclose(layers.alignment_after, 1.0, atol=1e-8)
    found = activation_matching(model, copy_b, digits_test)
    for p, perm in perms.items():
        np.testing.assert_array_equal(found.permutations[p], np.argsort(perm))
        assert found.correlation_after[p] == pytest.approx(1.0, abs=1e-6)  # constant (dead) units are left out
        assert found.correlation_before[p] < 0.5


class StreamNet(nn.Module):
    """A residual stream read and written by one layer: ``fc.weight`` carries the stream permutation on both axes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc(torch.relu(h))
        return self.out(h)


@pytest.mark.parametrize("seed", range(5))
def test_weight_matching_of_a_stream_to_stream_weight_never_decreases_and_converges(seed):
    torch.manual_seed(seed)
    a, b = StreamNet(), StreamNet()
    assert permutation_spec(a).axes["fc.weight"] == ("P_inp", "P_inp")  # the objective is quadratic in P_inp
    result = weight_matching(a, b, seed=seed, max_iter=50)
    assert np.all(np.diff(result.objective) >= -1e-12), result.objective
    assert result.converged and result.n_iterations < 50
    assert result.objective[-1] == pytest.approx(result.objective.max(), abs=1e-12)  # the best one visited is kept
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed)).numpy()
    found = weight_matching(a, apply_permutation(a, {"P_inp": perm}), seed=seed)
    np.testing.assert_array_equal(found.permutations["P_inp"], np.argsort(perm))
    assert found.converged


def test_progress_of_each_step_ends_at_its_total(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    calls: list[tuple[int, int]] = []
    result = weight_matching(a, b, max_iter=100, progress=lambda d, t: calls.append((d, t)))
    assert result.converged and result.n_iterations < 100
    assert calls[-1] == (100, 100) and len(calls) == result.n_iterations
    assert all(d <= t for d, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    others: dict[str, list[tuple[int, int]]] = {"interpolate": [], "activation_matching": []}
    interpolate(a, b, digits_test, n_points=3, progress=lambda d, t: others["interpolate"].append((d, t)))
    activation_matching(
        a, b, digits_test, batch_size=200, progress=lambda d, t: others["activation_matching"].append((d, t))
    )
    for seen in others.values():
        assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)


# ---------------------------------------------------------------------------------------------
# the bundled digits MLPs


def test_naive_barrier_is_large_and_weight_matching_shrinks_it_fivefold(wide_curves):
    naive, matched = (loss_barrier(c) for c in wide_curves)
    assert naive.linear["test"] > 0.1
    assert matched.linear["test"] * 5 < naive.linear["test"]
    assert matched.mean["test"] * 5 < naive.mean["test"]
    # endpoints are the models themselves (digits test losses recorded in sample_models/manifest.json)
    assert wide_curves[0].loss["test"][0] == pytest.approx(0.11059, abs=1e-4)
    assert wide_curves[0].loss["test"][-1] == pytest.approx(0.09752, abs=1e-4)


def test_singular_values_unchanged_while_top_singular_vectors_align(wide_pair):
    a, b, wm = wide_pair
    result = layer_alignment(a, b, wm, top_k=5)
    assert result.layers == ("fc1", "fc2", "out")
    assert np.all(result.singular_value_change < 1e-5)
    for layer in result.layers:
        assert np.all(np.diff(result.singular_values_b[layer]) <= 1e-12)  # descending
    assert np.all(result.alignment_after > result.alignment_before)
    assert np.all(result.distance_after < result.distance_before)
    assert np.all((result.alignment_after >= 0) & (result.alignment_after <= 1))


def test_layer_alignment_records_the_components_each_layer_used(sample_model):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    wm = weight_matching(a, b)
    many = layer_alignment(a, b, wm, top_k=1000)  # fc1, fc2: 64 × 64; out: 10 × 64
    assert many.top_k == 1000 and many.n_components == {"fc1": 64, "fc2": 64, "out": 10}
    assert many.params["n_components"] == many.n_components
    for layer, k in many.n_components.items():
        assert many.component_alignment_after[layer].shape == (k,)
    assert "top-1000 singular" not in many.estimator and "clipped to each layer's rank" in many.estimator
    assert "10-64 components" in many.estimator
    few = layer_alignment(a, b, wm, top_k=3)
    assert few.n_components == {"fc1": 3, "fc2": 3, "out": 3}
    assert "top-3 singular-vector alignment" in few.estimator and "clipped" not in few.estimator
    json.dumps(many.to_dict())
    from workbench.plots.mode_connectivity import layer_alignment_figure

    titles = [a.text for a in layer_alignment_figure(many).layout.annotations]
    assert "top-k (k = 10–64: at most each layer's rank) singular-vector alignment (higher = closer)" in titles
    assert "top-3 singular-vector alignment (higher = closer)" in [a.text for a in layer_alignment_figure(few).layout.annotations]


def test_wider_pair_has_a_lower_matched_barrier_than_the_narrow_pair(sample_model, wide_curves, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    narrow = loss_barrier(interpolate(a, apply_permutation(b, weight_matching(a, b)), digits_test, n_points=13))
    wide = loss_barrier(wide_curves[1])
    assert wide.linear["test"] < narrow.linear["test"]
    assert wide.mean["test"] < narrow.mean["test"]


def test_repair_lowers_the_barrier_of_the_unaligned_pair(sample_model, wide_curves, digits_test):
    a, b = sample_model("mlp_seed0"), sample_model("mlp_seed1")
    repaired = interpolate(a, b, digits_test, n_points=3, repair="repair")
    plain = wide_curves[0]
    assert repaired.loss["test"][1] < 0.5 * plain.loss["test"][6]  # midpoint: variance collapse corrected
    np.testing.assert_allclose(repaired.loss["test"][[0, -1]], plain.loss["test"][[0, -1]], atol=1e-4)


def test_reset_bn_recomputes_statistics_and_helps_the_batchnorm_cnn(sample_model, digits_test):
    cnn = sample_model("cnn_seed0")
    shuffled = apply_permutation(cnn, random_permutations(cnn.module, seed=4))  # same function, unaligned weights
    plain = interpolate(cnn, shuffled, digits_test, n_points=3)
    reset = interpolate(cnn, shuffled, digits_test, n_points=3, repair="reset_bn")
    assert reset.loss["test"][1] < plain.loss["test"][1]
    # at λ = 0 the statistics are those of the evaluation data, so the loss moves only slightly
    assert abs(reset.loss["test"][0] - plain.loss["test"][0]) < 0.05
    assert reset.repair == "reset_bn" and "BatchNorm" in reset.estimator


# ---------------------------------------------------------------------------------------------
# barrier definitions on known curves


def curve(loss: list[float], accuracy: list[float] | None = None) -> InterpolationResult:
    n = len(loss)
    acc = np.ones(n) if accuracy is None else np.asarray(accuracy)
    return InterpolationResult(
        lambdas=np.linspace(0, 1, n),
        loss={"test": np.asarray(loss)},
        accuracy={"test": acc},
        repair="none",
        estimator="synthetic",
        n_samples=10,
        params={},
        seed=0,
        device="cpu",
        dtype="float64",
        seconds=0.0,
    )


def test_barrier_definitions_on_known_curves():
    bump = loss_barrier(curve([1.0, 3.0, 2.0], [0.9, 0.5, 0.7]))
    assert bump.linear["test"] == pytest.approx(1.5) and bump.mean["test"] == pytest.approx(1.5)
    assert bump.lambda_linear["test"] == 0.5 and bump.accuracy_drop["test"] == pytest.approx(0.3)
    ramp = loss_barrier(curve([1.0, 2.0, 3.0]))  # on the line: no barrier, but above the endpoint mean at λ = 1
    assert ramp.linear["test"] == pytest.approx(0.0) and ramp.mean["test"] == pytest.approx(1.0)
    assert ramp.lambda_mean["test"] == 1.0
    assert set(bump.definitions) == {"linear", "mean", "accuracy_drop"}
    acc = 0.9777777777777777  # 440 of 450: (1 - λ) a + λ a differs from a by rounding at most λ
    flat = loss_barrier(curve([0.1] * 11, [acc] * 11))
    assert flat.linear["test"] == 0.0 and flat.accuracy_drop["test"] == 0.0  # exactly: a report shows no 1.1e-16


def test_a_curve_below_its_chord_has_no_negative_barrier():
    lambdas = np.linspace(0, 1, 5)
    chord = 1.0 + 0.032 * lambdas
    below = dataclasses.replace(curve([0.0] * 5), loss={"test": chord - 0.2 * np.sin(np.pi * lambdas)})
    barrier = loss_barrier(below)
    assert barrier.linear["test"] == 0.0 and barrier.lambda_linear["test"] in (0.0, 1.0)  # reached at an endpoint
    assert barrier.mean["test"] == pytest.approx(0.016, abs=1e-12)  # half the gap, at the worse endpoint
    assert barrier.lambda_mean["test"] == 1.0
    for doc in (loss_barrier.__doc__, BarrierResult.__doc__):  # the documented range is the computed one
        assert "½|L_A − L_B|" in doc and "negative" not in doc


# ---------------------------------------------------------------------------------------------
# merging and export


def test_merge_of_three_wide_mlps_beats_the_naive_average(sample_model, digits_test):
    models = [sample_model(f"mlp_seed{i}") for i in range(3)]
    progress = []
    result = merge(models, digits_test, max_rounds=1, progress=lambda d, t: progress.append((d, t)))
    assert isinstance(result, MergeResult) and result.names == ("mlp_seed0", "mlp_seed1", "mlp_seed2")
    assert result.naive_accuracy < 0.9 < result.merged_accuracy
    assert result.merged_loss < result.naive_loss
    np.testing.assert_allclose(result.member_accuracy, [0.97333, 0.98, 0.98222], atol=1e-4)
    assert np.all(np.diff(result.objective) > 0) and progress[-1][0] == progress[-1][1]
    rebuilt = merged_model(models, result)
    with torch.no_grad():
        acc = float((rebuilt(digits_test.x).argmax(1) == digits_test.y).float().mean())
    assert acc == pytest.approx(result.merged_accuracy, abs=1e-6)


def test_activation_matching_merge_of_narrow_models(sample_model, digits_test):
    models = [
        sample_model("mlp_narrow_seed0"),
        sample_model("mlp_narrow_seed1"),
        sample_model("mlp_narrow_seed0_epoch20"),
    ]
    result = merge(models, digits_test, method="activation_matching")
    assert result.merged_accuracy > result.naive_accuracy and result.n_rounds == 1
    assert all(np.array_equal(p, np.arange(len(p))) for p in result.permutations[0].values())


def test_exported_permuted_model_round_trips_through_safetensors(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    permuted = apply_permutation(b, weight_matching(a, b))
    data = to_safetensors(permuted, architecture=b.architecture, name="B aligned to A")
    rebuilt = build_model(json.loads(_metadata(data)["architecture"]))
    rebuilt.load_state_dict(load_safetensors(data))
    assert _metadata(data)["name"] == "B aligned to A"
    with torch.no_grad():
        assert torch.equal(rebuilt(digits_test.x), permuted(digits_test.x))
    loaded = load_model(data, filename="aligned.safetensors")
    assert loaded.architecture == b.architecture


def test_exported_merged_model_round_trips(sample_model, digits_test):
    models = [sample_model(f"mlp_narrow_seed{i}") for i in range(2)]
    result = merge(models, digits_test, max_rounds=1)
    merged = merged_model(models, result)
    rebuilt = build_model(models[0].architecture)
    data = to_safetensors(merged, architecture=models[0].architecture)
    rebuilt.load_state_dict(load_safetensors(data))
    with torch.no_grad():
        assert torch.equal(rebuilt(digits_test.x), merged(digits_test.x))
    loaded = load_model(to_safetensors(merged, name="merged"), filename="merged.safetensors")  # spec from the module
    assert loaded.architecture["type"] == "torch.nn"
    with torch.no_grad():
        assert torch.equal(loaded.module(digits_test.x), merged(digits_test.x))


def test_merged_model_reports_progress_over_the_statistics_batches(sample_model, digits_test):
    cnn = sample_model("cnn_seed0")
    models = [cnn, apply_permutation(cnn, random_permutations(cnn.module, seed=6))]
    calls: list[tuple[int, int]] = []
    merged = merged_model(models, stats_dataset=digits_test, batch_size=100, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]  # the average, then 5 batches of 450 samples
    quiet = merged_model(models, stats_dataset=digits_test, batch_size=100)
    for k, v in quiet.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v)
    calls = []
    merged_model(models, progress=lambda d, t: calls.append((d, t)))  # no statistics to recompute
    assert calls == [(1, 1)]
    with pytest.raises(ParameterError, match=r"'progress' parameter of merged_model must be a callable"):
        merged_model(models, progress=5)


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len])["__metadata__"]


# ---------------------------------------------------------------------------------------------
# the full pair analysis, results and reproducibility


def test_mode_connectivity_of_the_narrow_pair(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    before_a, before_b = state_copy(a.module), state_copy(b.module)
    calls = []
    result = mode_connectivity(a, b, digits_test, n_points=5, progress=lambda d, t: calls.append((d, t)))
    assert isinstance(result, ModeConnectivityResult)
    assert list(result.curves) == ["naive", "weight_matching", "activation_matching", "repair"]
    assert result.barriers["weight_matching"].linear["test"] < result.barriers["naive"].linear["test"]
    assert calls[-1] == (2 + 4 * 5, 2 + 4 * 5) and all(d <= t for d, t in calls)
    json.dumps(result.to_dict())
    arrays = result.arrays()
    assert "curves/naive/loss/test" in arrays and "layers/distance_after" in arrays
    assert "weight_matching/permutations/" + next(iter(result.weight_matching.permutations)) in arrays
    assert all(torch.equal(before_a[k], v) for k, v in a.module.state_dict().items())
    assert all(torch.equal(before_b[k], v) for k, v in b.module.state_dict().items())
    again = mode_connectivity(a, b, digits_test, n_points=5, methods=["weight_matching"])
    for p, perm in result.weight_matching.permutations.items():
        np.testing.assert_array_equal(again.weight_matching.permutations[p], perm)


def test_plots_carry_estimator_and_n(sample_model, digits_test):
    from workbench.plots import mode_connectivity as plots

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    result = mode_connectivity(a, b, digits_test, n_points=3, methods=["naive", "weight_matching"])
    fig = plots.interpolation_curves(result)
    assert len(fig.data) == 4 and f"n = {digits_test.n_samples}" in figure_title(fig)
    table = plots.barrier_table(result)
    assert "above the line" in str(table.data[0].header.values) and "max over λ" in table.layout.annotations[0].text
    rows = plots.barrier_rows(result)
    assert len(rows) == 2  # each barrier next to the λ where it is reached
    inside = table.layout.height - table.layout.margin.t - table.layout.margin.b
    assert inside >= 80 + 36 * len(rows)  # room for every row in a static export (a PDF or PNG does not scroll)
    barrier = result.barriers[next(iter(result.barriers))]
    assert rows[0]["at λ (line)"] == barrier.lambda_linear["test"] and rows[0]["at λ (mean)"] == barrier.lambda_mean["test"]
    assert "Ito" in figure_title(plots.layer_alignment_figure(result.layers))
    assert len(plots.singular_values_figure(result.layers).data) == 6
    objective = plots.matching_objective(result.weight_matching)
    assert "passes" in figure_title(objective) and objective.layout.xaxis.dtick == 1  # whole passes, no 0.5 ticks
    merged = merge([a, b], digits_test, max_rounds=1)
    merged_fig = plots.merge_figure(merged)
    assert f"n = {digits_test.n_samples}" in figure_title(merged_fig)
    assert [a.title.text for a in merged_fig.select_yaxes()] == ["accuracy", "cross-entropy loss"]


def test_singular_values_name_the_models_and_title_the_left_axes_only(sample_model):
    from workbench.plots.mode_connectivity import singular_values_figure

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    layers = layer_alignment(a, b, weight_matching(a, b))
    fig = singular_values_figure(layers, max_cols=2, name_a="mlp_narrow_seed0", name_b="mlp_narrow_seed1")
    assert {t.name for t in fig.data} == {"mlp_narrow_seed0", "mlp_narrow_seed1 (the same after its permutation)"}
    assert len(layers.layers) > 2  # two rows of panels
    assert [axis.title.text for axis in fig.select_yaxes(col=1)] == ["σ_i", "σ_i"]
    assert not [axis.title.text for axis in fig.select_yaxes(col=2) if axis.title.text]  # none between panels
    assert {t.name for t in singular_values_figure(layers).data} == {"model A", "model B (the same after its permutation)"}
    assert all(axis.minorloglabels == "none" for axis in fig.select_yaxes())  # no digits crowding each decade


def test_in_sample_methods_are_those_fitted_on_the_evaluation_samples(sample_model, digits_test, digits_train):
    from workbench.plots.mode_connectivity import in_sample_methods

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    methods = ["naive", "weight_matching", "activation_matching", "repair"]
    alone = mode_connectivity(a, b, digits_test, methods=methods, n_points=3)
    assert in_sample_methods(alone) == ["activation_matching", "repair"]  # weights alone: never in-sample
    held_out = mode_connectivity(a, b, digits_test, train_dataset=digits_train, methods=methods, n_points=3)
    assert in_sample_methods(held_out) == []


# ---------------------------------------------------------------------------------------------
# clear errors


def test_different_architectures_name_the_parameter(sample_model):
    with pytest.raises(
        ArchitectureError, match=r"parameter 'fc1.weight' has shape \(512, 64\) in model_a but \(64, 64\) in model_b"
    ):
        weight_matching(sample_model("mlp_seed0"), sample_model("mlp_narrow_seed0"))
    with pytest.raises(ArchitectureError, match=r"module 'relu1' \(ReLU\) in model_a is 'tanh1' \(Tanh\) in model_b"):
        interpolate(sample_model("mlp_seed0"), sample_model("mlp_tanh_seed0"), None)
    with pytest.raises(ArchitectureError, match=r"'mlp_seed0' \(models\[0\]\) and 'cnn_seed0' \(models\[1\]\) have different architectures"):
        merge([sample_model("mlp_seed0"), sample_model("cnn_seed0")], None)
    with pytest.raises(ArchitectureError, match=r"^mode_connectivity: model_a and model_b have different architectures"):
        mode_connectivity(sample_model("mlp_seed0"), sample_model("cnn_seed0"), None)  # named by the function called


def test_attention_is_named_as_unsupported():
    transformer = build_model(
        {
            "type": "transformer",
            "vocab_size": 50,
            "max_len": 8,
            "d_model": 16,
            "n_heads": 2,
            "n_layers": 1,
            "n_classes": 3,
        }
    )
    with pytest.raises(ArchitectureError, match=r"unsupported module 'layers.0' \(TransformerEncoderLayer\).*spec="):
        permutation_spec(transformer)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.attn(h, h, h)[0]

    with pytest.raises(ArchitectureError, match=r"unsupported module 'attn' \(MultiheadAttention\)"):
        weight_matching(Attn(), Attn())


def test_untraceable_operation_is_named():
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([self.a(x), self.b(x)], dim=1))

    with pytest.raises(ArchitectureError, match=r"operation 'cat' \(graph node 'cat'\).*PermutationSpec"):
        permutation_spec(Concat())


def test_bad_permutations_and_specs(sample_model):
    mlp = sample_model("mlp_narrow_seed0")
    with pytest.raises(ParameterError, match=r"permutation 'P_fc1' must be a reordering of 0..63"):
        apply_permutation(mlp, {"P_fc1": np.zeros(64, dtype=int)})
    with pytest.raises(
        ParameterError,
        match=r"unknown permutation 'P_fc3'. Did you mean 'P_fc\d'\? Permutations of this model: P_fc1, P_fc2",
    ):
        apply_permutation(mlp, {"P_fc3": np.arange(64)})
    with pytest.raises(
        ArchitectureError, match=r"the permutation spec names 'fc9.weight', which the model does not have"
    ):
        apply_permutation(mlp, {}, spec=PermutationSpec({"fc9.weight": ("P", None)}))
    with pytest.raises(ArchitectureError, match=r"permutation 'P' of the spec acts on axes of sizes 64 and 10"):
        weight_matching(mlp, mlp, spec=PermutationSpec({"fc2.weight": ("P", None), "out.weight": ("P", None)}))
    with pytest.raises(ParameterError, match=r"'spec' parameter of apply_permutation must be a PermutationSpec"):
        apply_permutation(mlp, {}, spec={"fc1.weight": ("P", None)})


def test_bad_parameters_and_data(sample_model, digits_test):
    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    with pytest.raises(
        ParameterError, match=r"'n_points' parameter of interpolate must be an int in \[3, 201\]. Got 2"
    ):
        interpolate(a, b, digits_test, n_points=2)
    with pytest.raises(ParameterError, match=r"'repair' parameter of interpolate must be one of 'reset_bn', 'repair'"):
        interpolate(a, b, digits_test, repair="bn")
    with pytest.raises(ParameterError, match=r"'max_iter' parameter of weight_matching must be an int in \[1, 10000\]"):
        weight_matching(a, b, max_iter=0)
    with pytest.raises(ParameterError, match=r"'model_b' must be a loaded model .* Got str"):
        weight_matching(a, "mlp_seed1")
    unlabelled = make_dataset("no labels", digits_test.x)
    with pytest.raises(DataError, match=r"interpolate: dataset 'no labels' \(dataset\) has no labels"):
        interpolate(a, b, unlabelled)
    with pytest.raises(DataError, match=r"outputs shape \(450, 10\) but the labels need"):
        interpolate(a, b, make_dataset("20 classes", digits_test.x, np.arange(450) % 20))
    with pytest.raises(ParameterError, match=r"'models' parameter of merge needs at least 2 models. Got 1"):
        merge([a], digits_test)
    with pytest.raises(ParameterError, match=r"'method' parameter of merge must be one of"):
        merge([a, b], digits_test, method="average")
    with pytest.raises(ParameterError, match=r"'methods' parameter of mode_connectivity must be one of"):
        mode_connectivity(a, b, digits_test, methods=["naive", "magic"])
    broken = copy.deepcopy(b.module)
    with torch.no_grad():
        broken.fc1.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"parameter 'fc1.weight' of model_b contains NaN"):
        weight_matching(a, broken)
    class Custom(torch.nn.Module):  # no spec, and not made of stock layers only
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ArchitectureError, match=r"architecture spec is unknown.*pass architecture="):
        to_safetensors(Custom())
    with pytest.raises(ParameterError, match=r"'curve' parameter of loss_barrier must be an InterpolationResult"):
        loss_barrier({"test": [1.0, 2.0]})


# ---------------------------------------------------------------------------------------------
# device agreement


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(sample_model, digits_test):
    a, b = sample_model("mlp_seed0"), sample_model("mlp_seed1")
    cpu, gpu = weight_matching(a, b, device="cpu"), weight_matching(a, b, device="cuda")
    for p, perm in cpu.permutations.items():
        np.testing.assert_array_equal(gpu.permutations[p], perm)
    permuted = apply_permutation(b, cpu)
    c_cpu = interpolate(a, permuted, digits_test, n_points=5, repair="repair", device="cpu")
    c_gpu = interpolate(a, permuted, digits_test, n_points=5, repair="repair", device="cuda")
    np.testing.assert_allclose(c_gpu.loss["test"], c_cpu.loss["test"], atol=1e-6)


def test_same_architecture(sample_model):
    from workbench.analyses.mode_connectivity import same_architecture

    a, b = sample_model("mlp_seed0"), sample_model("mlp_seed1")
    assert same_architecture(a, b) and same_architecture(a.module, b.module)
    assert not same_architecture(a, sample_model("mlp_narrow_seed0"))  # same modules, other shapes
    assert not same_architecture(a, sample_model("cnn_seed0"))  # other modules


def test_a_dataset_of_the_wrong_width_is_named(sample_model):
    from workbench import load_dataset
    from workbench.analyses.mode_connectivity import activation_matching, interpolate, merge, mode_connectivity
    from workbench.data import make_dataset

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    wrong = make_dataset("w", torch.randn(20, 10), torch.arange(20) % 10)
    with pytest.raises(DataError, match=r"mode_connectivity: the model could not run on dataset 'w' \(dataset, inputs of shape \(10,\): .*\); use a dataset made"):
        mode_connectivity(a, b, wrong, n_points=3)
    digits = load_dataset("digits")
    with pytest.raises(DataError, match=r"mode_connectivity: the model could not run on dataset 'w' \(train_dataset, "):
        mode_connectivity(a, b, digits, train_dataset=wrong, n_points=3)
    with pytest.raises(DataError, match=r"activation_matching: the model could not run on dataset 'w' \(dataset, "):
        activation_matching(a, b, wrong)
    with pytest.raises(DataError, match=r"^interpolate: the model could not run on dataset 'w' \(dataset, inputs of shape \(10,\)"):
        interpolate(a, b, wrong, n_points=3)
    with pytest.raises(DataError, match=r"^interpolate: the model could not run on dataset 'w' \(train_dataset, "):
        interpolate(a, b, digits, train_dataset=wrong, n_points=3)
    tokens = r"dataset 'sentences \(test\)' \(dataset\) holds integer token ids, but the model takes float features; use a dataset"
    with pytest.raises(DataError, match=rf"^interpolate: {tokens}"):
        interpolate(a, b, load_dataset("sentences"), n_points=3)
    with pytest.raises(DataError, match=r"^merge: the model could not run on dataset 'w' \(dataset, inputs of shape \(10,\)"):
        merge([a, b, sample_model("mlp_narrow_seed0")], wrong)  # was torch's own RuntimeError
    with pytest.raises(DataError, match=rf"^merge: {tokens}"):
        merge([a, b, sample_model("mlp_narrow_seed0")], load_dataset("sentences"))


def test_activation_matching_refuses_data_on_which_no_unit_varies(sample_model):
    from workbench.analyses.mode_connectivity import activation_matching
    from workbench.data import make_dataset

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    zeros = make_dataset("zeros", torch.zeros(60, 64), torch.arange(60) % 10)  # every unit outputs its bias
    with pytest.raises(DataError, match=r"activation_matching: no unit of model A and unit of model B both vary on these "
                                        r"samples where permutation 'P_\w+' acts, so their correlations are undefined"):
        activation_matching(a, b, zeros)  # any matching of the units would be arbitrary


def test_a_model_in_training_mode_is_checked_without_changing_it(sample_model, digits_test):
    model = copy.deepcopy(sample_model("cnn_seed0").module).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _check_runs(model, digits_test, "A", "mode_connectivity")
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=f"{k} changed")


def test_each_split_names_the_dataset_it_was_evaluated_on(sample_model, digits_test, digits_train):
    from workbench.plots.mode_connectivity import barrier_rows, interpolation_curves

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    result = mode_connectivity(a, b, digits_train, methods=["naive"], n_points=3)
    assert result.curves["naive"].params["datasets"] == {"test": "digits (train)"}
    assert barrier_rows(result)[0]["dataset"] == "digits (train)"
    assert [t.name for t in interpolation_curves(result).data][0] == "naive (as trained) · test: digits (train)"
