"""Degeneracy: activation and gradient ranks, ReLU patterns, free-parameter counts, the interaction basis.

Known answers: hand-made networks with constant inputs, dead, always-on and duplicated units; closed
forms for linear networks and the softmax cross-entropy; the free-parameter count against the null
space of the full parameter Jacobian; the interaction basis's defining identities checked with
Jacobians computed independently (autograd on the original model plus Euler's theorem for the
bias coordinate); invariance under permutations of hidden units; pinned numbers on the bundled MLPs.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from workbench.analyses.degeneracy import (
    DegeneracyResult,
    InteractionBasisResult,
    RankResult,
    ReluPatternResult,
    activation_rank,
    default_layers,
    degeneracy_summary,
    gradient_rank,
    interaction_basis,
    layer_activations,
    llc_estimate,
    relu_patterns,
    sequential_layers,
)
from workbench.data.datasets import blobs, make_dataset
from workbench.errors import ArchitectureError, DataError, ParameterError, UnknownLayerError, WorkbenchError
from workbench.models.architectures import build_model
from workbench.plots import degeneracy as plots
from workbench.plots._style import figure_title


def _mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    """A ReLU MLP ``fc1, relu1, ..., out`` with standard-normal weights and biases."""
    g = torch.Generator().manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
        layers[f"fc{i}"] = nn.Linear(a, b)
        layers[f"relu{i}"] = nn.ReLU()
    layers["out"] = nn.Linear(sizes[-2], sizes[-1])
    model = nn.Sequential(layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _data(n: int, d: int, seed: int = 0, constant: dict[int, float] | None = None, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    for j, v in (constant or {}).items():
        x[:, j] = v
    return make_dataset("synthetic", x, torch.arange(n) % classes)


def _param_null_dim(
    model: nn.Module, x: torch.Tensor, rtol: float = 1e-8, only: type | None = None, labels: torch.Tensor | None = None
) -> int:
    """Dimension of the null space of d(all logits on all samples)/d(all parameters), computed directly;
    with ``only``, of the parameters of the modules of that type (the others held fixed); with ``labels``, of
    d(per-sample cross-entropy)/d(parameters)."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    kept = {
        f"{name}.{k}"
        for name, mod in m.named_modules()
        if only is None or isinstance(mod, only)
        for k, _ in mod.named_parameters(recurse=False)
    }
    own = {k: v for k, v in params.items() if k in kept}

    def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(m, {**params, **p}, (x.double(),))
        return logits.reshape(-1) if labels is None else nn.functional.cross_entropy(logits, labels, reduction="none")

    jac = torch.func.jacrev(outputs)(own)
    j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in own], dim=1)
    s = torch.linalg.svdvals(j)
    return j.shape[1] - int((s**2 > rtol * s[0] ** 2).sum())


def _matrix_null_dim(model: nn.Module, x: torch.Tensor, module: str, rtol: float = 1e-8) -> int:
    """Dimension of the null space of d(all logits on all samples)/d(the parameters of one module), directly."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    own = {k: v for k, v in params.items() if k.startswith(module + ".")}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(m, {**params, **p}, (x.double(),)).reshape(-1))(own)
    j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in own], dim=1)
    s = torch.linalg.svdvals(j)
    return j.shape[1] - int((s**2 > rtol * s[0] ** 2).sum())


# ---------------------------------------------------------------------------------------------
# activation and gradient ranks: closed forms


def test_activation_rank_matches_a_constructed_spectrum():
    rng = np.random.default_rng(0)
    n, d = 200, 6
    z, _ = np.linalg.qr(rng.standard_normal((n, 4)) - 0)
    z -= z.mean(0)
    z, _ = np.linalg.qr(z)  # orthonormal, centred columns (the centring keeps them orthogonal to 1)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sv = np.array([3.0, 2.0, 1.0, 0.5])
    x = np.sqrt(n) * z @ np.diag(sv) @ q[:4] + 7.0  # covariance eigenvalues sv**2, two exact zeros
    r = activation_rank({"h": x})
    assert isinstance(r, RankResult) and r.quantity == "activation"
    np.testing.assert_allclose(r.eigenvalues["h"][:4], sv**2, rtol=1e-10)
    assert np.all(r.eigenvalues["h"][4:] < 1e-12)
    assert r.rank["h"] == 4 and r.width["h"] == d
    p = sv**2 / (sv**2).sum()
    assert r.effective_rank["h"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)


def test_effective_rank_of_a_flat_spectrum_is_the_rank_and_zero_for_a_constant_layer():
    x = np.kron(np.eye(5), np.ones((10, 1)))  # 5 equally varying indicator features
    x = np.hstack([x, np.zeros((50, 1))])
    r = activation_rank(x)
    assert r.layers == ("x",)
    # the 5 indicators sum to 1, so the centred covariance has rank 4 with equal eigenvalues
    assert r.rank["x"] == 4 and r.effective_rank["x"] == pytest.approx(4.0, rel=1e-10)
    dead = activation_rank({"dead": np.zeros((20, 3))})
    assert dead.rank["dead"] == 0 and dead.effective_rank["dead"] == 0.0


def test_gradient_rank_of_a_linear_network_is_the_rank_of_its_weights():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 4), fc2=nn.Linear(4, 5)))
    with torch.no_grad():
        model.fc1.weight[3] = model.fc1.weight[0] + model.fc1.weight[1]  # rank 3
    data = _data(30, 6)
    r = gradient_rank(model, data, ["input", "fc1"])
    w = (model.fc2.weight @ model.fc1.weight).detach().double()
    expected = torch.linalg.eigvalsh(w.T @ w).flip(0).numpy()
    np.testing.assert_allclose(r.eigenvalues["input"], np.clip(expected, 0, None), atol=1e-10)
    assert r.rank == {"input": 3, "fc1": 4}
    assert r.output == "logits" and r.width == {"input": 6, "fc1": 4}


def test_loss_gradients_at_the_logits_have_rank_classes_minus_one():
    model = _mlp([5, 8, 4], seed=1)
    data = _data(60, 5, classes=4)
    r = gradient_rank(model, data, "out", output="loss")
    with torch.no_grad():
        logits = model(data.x).double()
    g = torch.softmax(logits, 1) - nn.functional.one_hot(data.y, 4).double()  # d CE / d logits
    expected = torch.linalg.eigvalsh(g.T @ g / 60).flip(0).clamp_min(0).numpy()
    np.testing.assert_allclose(r.eigenvalues["out"], expected, atol=1e-12)
    assert r.rank["out"] == 3  # each gradient sums to zero over the classes


def test_rtol_must_be_below_one_and_the_effective_rank_does_not_depend_on_it(constant_and_dead):
    model, data = constant_and_dead
    calls = {
        "activation_rank": lambda rtol: activation_rank({"input": data.x}, rtol=rtol),
        "gradient_rank": lambda rtol: gradient_rank(model, data, "relu1", rtol=rtol),
        "degeneracy_summary": lambda rtol: degeneracy_summary(model, data, rtol=rtol),
        "interaction_basis": lambda rtol: interaction_basis(model, data, ["relu1"], rtol=rtol),
    }
    for func, call in calls.items():
        with pytest.raises(
            ParameterError, match=f"'rtol' parameter of {func} must be a number in \\(0.0, 1.0\\). Got 1.0."
        ):
            call(1.0)
    # covariance eigenvalues 1, 0.4, 0.4, 0.4: at rtol = 0.5 the rank is 1, the effective rank still ~3.7
    rng = np.random.default_rng(1)
    z, _ = np.linalg.qr(rng.standard_normal((100, 4)) - 0)
    z -= z.mean(0)
    z, _ = np.linalg.qr(z)
    x = np.sqrt(100) * z @ np.diag(np.sqrt([1.0, 0.4, 0.4, 0.4]))
    strict, loose = activation_rank(x), activation_rank(x, rtol=0.5)
    p = np.array([1.0, 0.4, 0.4, 0.4]) / 2.2
    assert strict.rank["x"] == 4 and loose.rank["x"] == 1
    assert loose.effective_rank["x"] == strict.effective_rank["x"]
    assert loose.effective_rank["x"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)  # 3.70


def test_in_place_relus_give_the_results_of_the_same_network_without_them():
    plain = _mlp([4, 6, 5, 3], seed=2)
    twin = copy.deepcopy(plain)
    twin.relu1.inplace = twin.relu2.inplace = True
    data = _data(50, 4, seed=3)
    a, b = layer_activations(plain, data, ["fc1", "relu1"]), layer_activations(twin, data, ["fc1", "relu1"])
    assert float(a["fc1"].min()) < 0  # pre-activations, not the ReLU's output written over them
    for layer in ("fc1", "relu1"):
        torch.testing.assert_close(b[layer], a[layer], rtol=0, atol=0)
    ga, gb = gradient_rank(plain, data, ["fc1", "relu2"]), gradient_rank(twin, data, ["fc1", "relu2"])
    for layer in ("fc1", "relu2"):
        np.testing.assert_array_equal(gb.eigenvalues[layer], ga.eigenvalues[layer])
    sa, sb = degeneracy_summary(plain, data), degeneracy_summary(twin, data)
    assert sb.free_total == sa.free_total and sb.gradient_rank == sa.gradient_rank
    ia, ib = interaction_basis(plain, data, ["relu1", "relu2"]), interaction_basis(twin, data, ["relu1", "relu2"])
    for layer in ia.layers:
        np.testing.assert_array_equal(ib.basis[layer], ia.basis[layer])
    settings = {"n_chains": 1, "n_steps": 10, "n_burnin": 2}
    assert llc_estimate(twin, data, **settings).llc == llc_estimate(plain, data, **settings).llc
    assert twin.relu1.inplace and twin.relu2.inplace  # the model passed in is left as it was


# ---------------------------------------------------------------------------------------------
# hand-made networks with known degeneracies


@pytest.fixture(scope="module")
def constant_and_dead():
    """4 inputs (input 2 constant), 3 hidden units (unit 1 dead), output = identity on the hidden units."""
    model = _mlp([4, 3, 3], seed=0)
    with torch.no_grad():
        model.fc1.bias.copy_(torch.tensor([1.0, -100.0, 0.5]))
        model.out.weight.copy_(torch.eye(3))
    return model, _data(60, 4, seed=1, constant={2: 0.7})


def test_constant_input_gives_zero_eigenvalues_and_free_parameters(constant_and_dead):
    model, data = constant_and_dead
    spec = activation_rank({"input": data.x})
    assert int((spec.eigenvalues["input"] <= spec.threshold["input"]).sum()) == 1
    s = degeneracy_summary(model, data)
    assert isinstance(s, DegeneracyResult) and s.modules == ("fc1", "out")
    assert s.zero_variance_inputs["fc1"] == 1 and s.input_rank["fc1"] == 3
    assert s.free_from_activations["fc1"] == 1 * 3  # zero-variance directions x fan-out
    np.testing.assert_allclose(s.input_spectrum["fc1"], spec.eigenvalues["input"], atol=1e-12)


def test_dead_unit_frees_its_fan_in_and_fan_out(constant_and_dead):
    model, data = constant_and_dead
    s = degeneracy_summary(model, data)
    assert s.dead_units["fc1"] == 1 and s.gradient_rank["fc1"] == 2
    assert s.free_from_gradients["fc1"] == (s.input_rank["fc1"] + 1) * 1  # its fan-in and bias
    assert s.zero_variance_inputs["out"] == 1 and s.free_from_activations["out"] == 3  # its fan-out
    assert s.free_from_rescaling["fc1"] == 2  # the two units that fire
    assert s.free_total == {"fc1": 3 + 4 + 2, "out": 3}
    assert s.total_parameters == 15 + 12 and s.total_free == 12


def test_layers_whose_input_rank_is_capped_by_the_sample_count_are_named():
    model = _mlp([4, 20, 3])
    few, many = degeneracy_summary(model, _data(8, 4)), degeneracy_summary(model, _data(200, 4))
    assert few.input_rank["out"] == 7  # 20 inputs, 8 centred samples: rank <= 7
    # fc1: (4 + 1) x 20 directions reach the logits structurally, but 8 samples x 3 logits give 24 Jacobian rows
    assert few.gradient_rank["fc1"] == 20 and few.sample_limited == ("fc1", "out")
    assert many.sample_limited == () and many.total_free < few.total_free
    assert few.caveats["out"] == ("not pinned down by the samples: its input rank 7 reached the most 8 samples allow, below "
                                  "its fan-in 20, so the count includes directions the samples never explored")
    assert few.caveats["fc1"].endswith("not pinned down by the samples: the samples give 24 Jacobian rows, fewer than the 100 "
                                       "directions counted as used, so more directions are free on them than counted")


def test_the_count_is_structural_and_matrices_with_too_few_jacobian_rows_are_named():
    """Layer '0' has (10 + 1) x 40 = 440 weights that reach the logits structurally; 100 samples x 2 logits give
    200 Jacobian rows, so on these samples 240 directions of '0' alone leave the logits unchanged."""
    torch.manual_seed(0)
    x = torch.randn(100, 10)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 2)).eval()
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(100) % 2))
    assert s.input_rank == {"0": 10, "2": 40} and s.gradient_rank == {"0": 40, "2": 2}
    assert s.free_from_activations["0"] + s.free_from_gradients["0"] == 0 and s.free_total == {"0": 40, "2": 0}
    assert _matrix_null_dim(model, x, "0") == 440 - 200
    assert s.sample_limited == ("0",)
    loss = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(100) % 2), output="loss")
    assert loss.gradient_rank == {"0": 40, "2": 1} and loss.sample_limited == ("0",)  # 440 > 100 rows; 41 <= 100
    torch.manual_seed(0)
    x = torch.randn(1000, 10)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 2)).eval()
    many = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(1000) % 2))
    assert many.sample_limited == () and many.free_total == {"0": 40, "2": 0}
    assert _matrix_null_dim(model, x, "0") == 0 and _param_null_dim(model, x) == many.total_free == 40


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_free_parameter_count_equals_the_null_space_of_the_parameter_jacobian(seed):
    """On a network whose live units fire often, the count is exact; checked by an independent SVD."""
    model = _mlp([4, 3, 3], seed=seed)
    with torch.no_grad():
        model.fc1.bias.copy_(torch.tensor([1.0, -100.0, 0.5]))
        model.out.weight.copy_(torch.eye(3))
    data = _data(60, 4, seed=1, constant={2: 0.7})
    assert degeneracy_summary(model, data).total_free == _param_null_dim(model, data.x)


def test_duplicated_neurons_form_one_synchronised_group():
    model = _mlp([4, 6, 3], seed=3)
    with torch.no_grad():
        for j in (2, 4):
            model.fc1.weight[j] = model.fc1.weight[0]
            model.fc1.bias[j] = model.fc1.bias[0]
    data = _data(60, 4, seed=2)
    p = relu_patterns(model, data)
    assert isinstance(p, ReluPatternResult) and p.layers == ("relu1",)
    assert p.n_groups["relu1"] == 1 and p.n_synchronised["relu1"] == 3
    np.testing.assert_array_equal(p.groups("relu1")[0], [0, 2, 4])
    assert (p.group_id["relu1"][[1, 3, 5]] == -1).all()
    s = degeneracy_summary(model, data)
    np.testing.assert_array_equal(s.synchronised_group_sizes["fc1"], [3])
    # the copies compute one function: mixing them only moves each row along it, which the three rescalings do
    assert s.free_from_synchronised["fc1"] == 0 and s.free_from_rescaling["fc1"] == 6
    assert s.zero_variance_inputs["out"] == 2  # two copies are linearly dependent on the first
    assert s.total_free == _param_null_dim(model, data.x) == 12  # 18 when each copy counted k - 1 mixings


def test_always_on_and_dead_units_are_counted():
    model = _mlp([4, 5, 2], seed=4)
    with torch.no_grad():
        model.fc1.bias.copy_(torch.tensor([100.0, 200.0, -300.0, 0.0, 0.1]))
    data = _data(80, 4, seed=5)
    p = relu_patterns(model, data, ["relu1"])
    assert p.n_always_on["relu1"] == 2 and p.n_dead["relu1"] == 1
    np.testing.assert_array_equal(p.always_on["relu1"], [True, True, False, False, False])
    np.testing.assert_array_equal(p.firing_rate["relu1"][:3], [1.0, 1.0, 0.0])
    s = degeneracy_summary(model, data)
    assert s.always_on_units["fc1"] == 2 and s.free_from_synchronised["fc1"] == 2 * 2 - 2


@pytest.mark.parametrize(("k", "expected"), [(1, 9), (2, 12), (3, 17)])
def test_always_on_units_add_their_bias_shifts(k, expected):
    """k always-on units: k**2 - k mixings, k rescalings and k bias shifts into the next layer's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].bias[:k] = 5.0
    x = torch.randn(1500, 6)
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(1500) % 3))
    assert s.always_on_units["0"] == k and s.free_from_bias_shift == {"0": k, "2": 0}
    assert s.free_total == {"0": expected, "2": 0} == {"0": _param_null_dim(model, x), "2": 0}


def test_bias_shifts_pass_dropout_and_flatten_and_need_a_bias_to_move_into():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)
    ).eval()
    with torch.no_grad():
        model[0].bias[:2] = 5.0
        model[4].bias[:1] = 8.0
    x = torch.randn(1500, 6)
    data = make_dataset("synthetic", x, torch.arange(1500) % 3)
    s = degeneracy_summary(model, data)
    assert s.always_on_units == {"0": 2, "4": 3, "6": 0} and s.dead_units == {"0": 0, "4": 2, "6": 0}
    assert s.free_from_bias_shift == {"0": 2, "4": 3, "6": 0}
    assert s.total_free == _param_null_dim(model, x) == 48
    no_bias = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()
    with torch.no_grad():
        no_bias[0].bias[:2] = 5.0
    s = degeneracy_summary(no_bias, data)
    assert s.always_on_units["0"] == 2 and s.free_from_bias_shift["0"] == 0
    assert s.total_free == _param_null_dim(no_bias, x)


def test_a_unit_without_fan_out_is_not_rescaled_twice():
    """Unit 0 of fc1 reaches no logit: its fan-in and bias are free (5 directions), its rescaling is one of them."""
    model = _mlp([4, 5, 3])
    with torch.no_grad():
        model.out.weight[:, 0] = 0.0
    data = _data(60, 4)
    s = degeneracy_summary(model, data)
    assert s.gradient_rank["fc1"] == 4 and s.dead_units["fc1"] == 0
    assert s.free_from_gradients["fc1"] == 5 and s.free_from_rescaling["fc1"] == 4
    assert s.free_total == {"fc1": 9, "out": 0} and s.total_free == _param_null_dim(model, data.x) == 9


@pytest.mark.parametrize("ignored", [False, True])
def test_mixing_a_synchronised_group_counts_only_the_units_that_reach_the_output(ignored):
    """Three fc1 units fire on the samples where x0 > 0 (non-parallel fan-in rows): 3 * 2 mixing directions; with
    unit 0's fan-out zeroed, its row changes are already free through the gradients and 2 * 2 are left."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    x[:, 0] = torch.sign(x[:, 0]) * (1 + x[:, 0].abs())
    data = make_dataset("synchronised", x, torch.arange(200) % 3)
    model = _mlp([4, 6, 3], seed=3)
    with torch.no_grad():
        model.fc1.weight[:3] = torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [1.0, 0, 0, 0.1]])
        model.fc1.bias[:3] = 0.0
        if ignored:
            model.out.weight[:, 0] = 0.0
    s = degeneracy_summary(model, data)
    assert s.synchronised_group_sizes["fc1"].tolist() == [3]
    assert s.free_from_synchronised["fc1"] == (4 if ignored else 6)
    assert s.total_free == _param_null_dim(model, data.x) == (14 if ignored else 12)


def test_a_relu_after_the_last_linear_layer_frees_no_rescaling_or_mixing():
    """Scaling an output unit's fan-in changes the output: nothing after the ReLU undoes it."""
    model = _mlp([4, 6, 3], seed=2)
    model.add_module("relu_out", nn.ReLU())
    with torch.no_grad():
        model.out.bias.fill_(20.0)  # the output units fire on every sample (one synchronised group)
    data = _data(80, 4)
    s = degeneracy_summary(model, data)
    assert s.always_on_units["out"] == 3
    assert s.free_from_rescaling["out"] == 0 and s.free_from_synchronised["out"] == 0 and s.free_from_bias_shift["out"] == 0
    assert s.total_free == _param_null_dim(model, data.x)


def test_linear_layers_applied_along_an_axis_are_not_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (4, 16)), nn.Linear(16, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10))
    data = make_dataset("synthetic", torch.randn(200, 64), torch.arange(200) % 10)
    s = degeneracy_summary(model.eval(), data)
    assert s.modules == ("4",) and s.not_counted == ("1",)
    assert s.free_total == {"4": 0} and s.total_parameters == 330 and s.free_fraction == {"4": 0.0}
    along = nn.Sequential(nn.Unflatten(1, (4, 16)), nn.Linear(16, 3), nn.Flatten())
    with pytest.raises(ArchitectureError, match="every nn.Linear layer of the model \\(1\\) is applied along an axis"):
        degeneracy_summary(along, data)


def test_free_count_never_exceeds_the_parameters():
    model = _mlp([4, 5, 3], seed=6)
    with torch.no_grad():
        model.fc1.bias.fill_(-1000.0)  # every unit dead: the output is the constant out.bias
    s = degeneracy_summary(model, _data(40, 4))
    assert s.free_total["fc1"] == s.n_parameters["fc1"] == 25
    assert s.free_total["out"] == 15  # all weights, not the bias
    assert s.total_free == _param_null_dim(model, _data(40, 4).x)


def _homogeneous_and_linear_models() -> dict[str, nn.Sequential]:
    torch.manual_seed(0)
    bias_free = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 5), nn.Linear(5, 3, bias=False))
    return {
        "relu": nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)),
        "leaky-relu": nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)),
        "leaky-relu-negative-slope": nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(-0.5), nn.Linear(6, 3)),
        "prelu": nn.Sequential(nn.Linear(4, 6), nn.PReLU(6, init=0.3), nn.Linear(6, 3)),
        "identity": nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)),
        "linear-linear-relu": nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
        "relu-linear-linear": nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Linear(5, 3)),
        "dropout-chain": nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Linear(6, 5), nn.Linear(5, 3)),
        "narrow-middle": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 3)),
        "bias-free-ends": bias_free,
    }


@pytest.mark.parametrize("name", list(_homogeneous_and_linear_models()))
def test_homogeneous_activations_and_linear_compositions_count_the_whole_null_space(name):
    """Positively homogeneous units rescale (and mix when synchronised) and a Linear read unchanged by the next
    one has the invertible maps of its output space; the count equals the null dimension of the full Jacobian."""
    model = _homogeneous_and_linear_models()[name].eval()
    x = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(600) % 3))
    assert s.total_free == _param_null_dim(model, x, only=nn.Linear) and s.lower_bound == ()


def test_composition_count_comes_from_the_ranks():
    """Linear(4, 6) then Linear(6, 3): of the 36 maps G of the 6-dim hidden space, only gradient rank 3 times
    (input rank 4 + 1) = 15 change the first matrix outside its own null space."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)).eval()
    x = torch.randn(600, 4)
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(600) % 3))
    assert s.gradient_rank == {"0": 3, "2": 3} and s.input_rank == {"0": 4, "2": 4}
    assert s.free_from_composition == {"0": 15, "2": 0} and s.free_total == {"0": 15 + 15, "2": 6}
    assert s.total_free == _param_null_dim(model, x) == 36


def test_leaky_relu_units_that_never_fire_act_linearly_and_are_not_dead():
    """Two units always above 0 and two always below: one linear group of four with their bias shifts. Next to
    units whose slope changes, they leave two more directions free than counted: the module is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 6)).eval()
    with torch.no_grad():
        model[0].bias[:2] = 20.0
        model[0].bias[2:4] = -20.0
    x = torch.randn(800, 4)
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(800) % 6))
    assert s.dead_units["0"] == 0 and s.always_on_units["0"] == 4
    assert s.free_from_synchronised["0"] == 4 * 3 and s.free_from_bias_shift["0"] == 4
    assert s.total_free == 8 + 12 + 4 < _param_null_dim(model, x) and s.lower_bound == ("0",)
    with torch.no_grad():
        model[0].bias[4:] = 20.0  # every unit linear on the data
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(800) % 6))
    assert s.always_on_units["0"] == 8 and s.lower_bound == ()


def test_activations_with_symmetries_the_count_misses_are_named():
    """ReLU6 units below 6 on every sample can be rescaled, but ReLU6 is not homogeneous: the count is a lower bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU6(), nn.Linear(6, 3)).eval()
    x = torch.randn(600, 4)
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(600) % 3))
    assert s.lower_bound == ("0",) and s.total_free == 0 < _param_null_dim(model, x) == 6
    twice = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.ReLU(), nn.Linear(6, 3)).eval()
    assert s.caveats == {"0": "a lower bound: its activation ReLU6 is piecewise linear but not positively homogeneous: "
                               "units that stay on one linear piece have rescalings and mixings of their own"}
    both = degeneracy_summary(twice, make_dataset("synthetic", x, torch.arange(600) % 3))
    assert both.lower_bound == ("0",)
    assert both.caveats == {"0": "a lower bound: its activation ReLU is followed by another piecewise-linear one, ReLU"}
    from workbench.plots.degeneracy import degeneracy_figure, summary_rows

    assert [row["count"] for row in summary_rows(s)] == ["lower bound", "exact"]
    chained = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)).eval()
    fig = degeneracy_figure(degeneracy_summary(chained, make_dataset("synthetic", x, torch.arange(600) % 3)))
    composed = next(t for t in fig.data if t.name == "linear maps in a row")
    assert composed.customdata[0][0] == 15  # gradient rank 3 x (input rank 4 of the next matrix + 1)


# ---------------------------------------------------------------------------------------------
# groups of units larger than the ranks around them


def test_four_always_on_units_after_a_narrow_layer_are_counted_once():
    """Four always-on units of Linear(4, 6) read by 3 logits: their gradients span 3 directions and their inputs with
    the constant 4 + 1, so their moves add 3 x 5 = 15 directions (4 rescalings, 3 bias shifts, 8 mixings), not
    4 x 3 mixings + 4 rescalings + 3 shifts = 19. With the 5 directions the logits ignore and the two other units'
    rescalings: 22, the null space (26 when the groups' moves overlapped the rank terms)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].bias[:4] = 5.0
    x = torch.randn(1500, 4)
    s = degeneracy_summary(model, make_dataset("synthetic", x, torch.arange(1500) % 3))
    assert s.always_on_units["0"] == 4 and s.gradient_rank["0"] == 5 and s.free_from_gradients["0"] == 5
    assert s.free_from_rescaling["0"] == 6 and s.free_from_bias_shift["0"] == 3 and s.free_from_synchronised["0"] == 8
    assert s.free_total == {"0": 22, "2": 0} and s.total_free == _param_null_dim(model, x) and s.lower_bound == ()


@pytest.mark.parametrize(("biased", "expected"), [(False, {"fc1": 18, "out": 8}), (True, {"fc1": 20, "out": 6})])
def test_a_synchronised_group_larger_than_the_ranks_around_it(biased, expected):
    """Five units fire where x0 > 0 on two inputs, next to a dead unit, read by 2 logits: the group's gradients span 2
    directions and its inputs 2 (3 with biases), so mixing and rescaling it add 2 x 2 (2 x 3) directions, not 5 x 5."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    x[:, 0] = torch.sign(x[:, 0]) * (1 + x[:, 0].abs())  # no sample near x0 = 0
    model = _mlp([2, 8, 2], seed=1)
    with torch.no_grad():
        model.fc1.weight[:5] = torch.tensor([[1.0, 0.1], [1.5, -0.1], [2.0, 0.05], [0.5, 0.2], [1.2, -0.2]])
        model.fc1.bias[:5] = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.05]) if biased else 0.0
        model.fc1.bias[5] = -100.0
    data = make_dataset("synchronised", x, torch.arange(300) % 2)
    s = degeneracy_summary(model, data)
    assert s.synchronised_group_sizes["fc1"].tolist() == [5] and s.dead_units["fc1"] == 1
    assert s.input_rank["fc1"] == 2 and s.gradient_rank["fc1"] == 4 and s.free_from_gradients["fc1"] == 12
    # the group's 2 x 2 (2 x 3) directions and the two other units' rescalings
    moved = s.free_from_synchronised["fc1"] + s.free_from_rescaling["fc1"] + s.free_from_bias_shift["fc1"]
    assert moved == (8 if biased else 6) and s.free_from_bias_shift["fc1"] == 0
    assert s.free_total == expected and s.total_free == _param_null_dim(model, x) == 26 and s.lower_bound == ()


def test_units_that_fire_on_complementary_sets_make_the_count_a_lower_bound():
    """Two units fire where x0 > 0, one where x0 < 0, next to three always-on units: the firing sets add up to all
    samples, so units of different groups can stand in for each other. The count stays below the null space."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    x[:, 0] = torch.sign(x[:, 0]) * (1 + x[:, 0].abs())
    model = _mlp([3, 8, 2], seed=2)
    with torch.no_grad():
        model.fc1.weight[:3] = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [-1.0, 0.1, 0.1]])
        model.fc1.bias[:3] = 0.0
        model.fc1.bias[3:6] = 20.0
    s = degeneracy_summary(model, make_dataset("complementary", x, torch.arange(300) % 2))
    assert s.synchronised_group_sizes["fc1"].tolist() == [2] and s.always_on_units["fc1"] == 3
    assert s.lower_bound == ("fc1",) and s.total_free == 23 < _param_null_dim(model, x) == 24


def _structured_mlp(seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """Linear(2-4, 3-8), ReLU or LeakyReLU, Linear(., 1-3), on 240 samples whose first two inputs have no value near
    0. Each hidden unit is at random free, always on, dead, or firing exactly where x0 > 0 or where x1 > 0
    (synchronised groups, often larger than the ranks around them); either layer may lack a bias. Float64."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
    d, c, n, m = pick(2, 4), pick(1, 3), 240, pick(3, 8)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, :2] = torch.sign(x[:, :2]) * (1 + x[:, :2].abs())
    kind = torch.randint(0, 5, (m,), generator=g)  # 0 free, 1 always on, 2 dead, 3 fires where x0 > 0, 4 where x1 > 0
    first = nn.Linear(d, m, bias=pick(0, 4) > 0).double()
    if first.bias is None:
        kind[(kind == 1) | (kind == 2)] = 3
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) * 0.5
    b[kind == 1], b[kind == 2] = 30.0, -30.0
    for axis, cut in enumerate((kind == 3, kind == 4)):
        w[cut] *= 0.1 / d
        w[cut, axis] = 1 + torch.rand(int(cut.sum()), generator=g, dtype=torch.float64)
        b[cut] = 0.0
    last = nn.Linear(m, c, bias=pick(0, 3) > 0).double()
    with torch.no_grad():
        first.weight.copy_(w)
        if first.bias is not None:
            first.bias.copy_(b)
        last.weight.copy_(torch.randn(c, m, generator=g, dtype=torch.float64))
    act = nn.LeakyReLU(0.2) if pick(0, 3) == 0 else nn.ReLU()
    labels = torch.arange(n) % c if c > 1 else torch.zeros(n, dtype=torch.int64)
    return nn.Sequential(first, act, last).eval(), x, labels


def _every_pattern_spans_the_inputs(model: nn.Sequential, x: torch.Tensor) -> bool:
    """Whether the samples of each firing pattern of the hidden layer span the inputs (with the constant): the count
    is structural and misses the directions that patterns seen on too few samples leave free."""
    with torch.no_grad():
        z = model[0](x)
    xt = torch.cat([x, torch.ones_like(x[:, :1])], 1) if model[0].bias is not None else x
    _, pattern = torch.unique(z > 0, dim=0, return_inverse=True)
    full = int(torch.linalg.matrix_rank(xt))
    return all(int(torch.linalg.matrix_rank(xt[pattern == p])) == full for p in range(int(pattern.max()) + 1))


# seeds whose every firing pattern is seen on samples spanning the inputs (0, 10, 12 and 16 have a pattern on a few
# samples, which frees directions on these samples that the structural count does not claim)
SWEEP_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 14, 15, 17, 18, 19)


def test_the_count_matches_the_null_space_on_random_structured_networks():
    """Random always-on, dead and synchronised groups (often larger than the ranks around them), ReLU or LeakyReLU,
    with and without biases: the count equals the null space of the Jacobian of the logits (and of the per-sample
    losses) unless the module is named in ``lower_bound``, and never exceeds it."""
    exact = 0
    for seed in SWEEP_SEEDS:
        model, x, y = _structured_mlp(seed)
        assert _every_pattern_spans_the_inputs(model, x), seed
        data = make_dataset("structured", x, y)
        for labels in (None, y) if model[-1].out_features > 1 else (None,):
            s = degeneracy_summary(model, data, output="logits" if labels is None else "loss")
            # float64: the null directions' singular values lie near 1e-16 of the largest; a few small nonzero ones
            # lie between 1e-6 and 1e-4, so the default rtol (1e-8 on their squares) would count them as null too
            true = _param_null_dim(model, x, rtol=1e-12, labels=labels)
            assert s.total_free <= true, (seed, labels is None)
            assert s.total_free == true or s.lower_bound, (seed, labels is None, s.total_free, true)
            exact += s.total_free == true and not s.lower_bound
    assert exact >= len(SWEEP_SEEDS)  # most of the comparisons are exact, not lower bounds


# ---------------------------------------------------------------------------------------------
# the interaction basis


def _folded_jacobians(model: nn.Module, acts: dict, layer_pos: int, next_pos: int, c_next: torch.Tensor, last: int):
    """Jacobians of the next layer's basis coordinates w.r.t. (f, 1), by autograd on the original children;
    the bias coordinate's column by Euler's theorem (the folded ReLU network is 1-homogeneous)."""
    m = copy.deepcopy(model).double().eval()
    tail = nn.Sequential(*list(m.children())[layer_pos + 1 : next_pos + 1])
    f = acts[layer_pos]
    n, d = f.shape[0], f[0].numel()
    jf = torch.autograd.functional.jacobian(lambda z: tail(z).sum(0), f, vectorize=True)
    jf = jf.reshape(-1, n, d).permute(1, 0, 2)  # (n, out, d): sample s only depends on f_s
    out = tail(f).detach().reshape(n, -1)
    jc = out - torch.einsum("sod,sd->so", jf, f.reshape(n, d))
    a = torch.cat([jf, jc[:, :, None]], dim=2)
    if next_pos != last:
        row = torch.zeros(n, 1, d + 1, dtype=torch.float64)
        row[:, 0, d] = 1.0
        a = torch.cat([a, row], dim=1)
    return c_next.T @ a


def _check_basis_identities(model, data, result: InteractionBasisResult, positions: dict[str, int]):
    m = copy.deepcopy(model).double().eval()
    x = data.x.double()
    acts, h = {-1: x}, x
    with torch.no_grad():
        for i, child in enumerate(m.children()):
            h = child(h)
            acts[i] = h
    last = len(list(m.children())) - 1
    n = x.shape[0]
    for layer, nxt in result.pairs():
        f = acts[positions[layer]].reshape(n, -1)
        f_folded = torch.cat([f, torch.ones(n, 1, dtype=torch.float64)], dim=1)
        c = torch.from_numpy(result.basis[layer])
        lam = torch.from_numpy(result.interaction_eigenvalues[layer][: c.shape[1]])
        gram = f_folded.T @ f_folded / n
        # activation Gram in the basis is diag(Λ)
        in_basis = c.T @ gram @ c
        np.testing.assert_allclose(in_basis.numpy(), np.diag(lam.numpy()), atol=1e-9 * float(lam.max()))
        np.testing.assert_allclose(result.activations[layer], (f_folded @ c).numpy(), atol=1e-9)
        # Jacobian Gram of the next layer's basis coordinates w.r.t. the basis coordinates is the identity
        j = _folded_jacobians(model, acts, positions[layer], positions[nxt], torch.from_numpy(result.basis[nxt]), last)
        to_folded = gram @ c / lam  # f' = to_folded · f̂ on the kept directions
        jh = j @ to_folded
        m_hat = torch.einsum("sij,sik->jk", jh, jh) / n
        np.testing.assert_allclose(m_hat.numpy(), np.eye(c.shape[1]), atol=1e-7)
        edges = ((jh * (f_folded @ c)[:, None, :]) ** 2).mean(0)
        np.testing.assert_allclose(result.edges[f"{layer}->{nxt}"], edges.numpy(), rtol=1e-7, atol=1e-12)


@pytest.fixture(scope="module")
def narrow(sample_model, digits_test):
    model = sample_model("mlp_narrow_seed0")
    return model, interaction_basis(model, digits_test, ["input", "relu1", "relu2"])


def test_interaction_basis_diagonalises_activations_and_whitens_jacobians(narrow, digits_test):
    model, result = narrow
    assert result.layers == ("input", "relu1", "relu2", "out")
    _check_basis_identities(model.module, digits_test, result, {"input": -1, "relu1": 1, "relu2": 3, "out": 4})
    out = result.basis["out"]
    np.testing.assert_allclose(out.T @ out, np.eye(10), atol=1e-10)  # the output layer is only rotated


def test_interaction_basis_on_the_bundled_mlp_pinned(narrow, digits_test, sample_model):
    _, r = narrow
    # measured on digits (test split, n = 450): basis sizes input 60, relu1 63, relu2 10, out 10;
    # modularity of the Louvain split 0.59
    assert 55 <= r.basis_size["input"] <= 65 and r.width["input"] == 64
    assert 55 <= r.basis_size["relu1"] <= 65
    assert r.basis_size["relu2"] in (10, 11)  # the last hidden layer only feeds 10 logits
    assert r.basis_size["out"] == 10
    assert 0.3 <= r.modularity <= 0.9 and all(0.2 <= q <= 0.95 for q in r.pair_modularity.values())
    assert set(r.pair_modularity) == {"input->relu1", "relu1->relu2", "relu2->out"}
    assert all(r.edges[k].shape == (r.basis_size[b], r.basis_size[a]) for k, (a, b) in zip(r.edges, r.pairs()))
    assert r.activations["relu1"].shape == (450, r.basis_size["relu1"])
    # dead units and ranks of the wide MLP: 0 dead in relu1, 1 in relu2; 5 constant pixels in the test split
    wide = sample_model("mlp_seed0")
    p = relu_patterns(wide, digits_test)
    assert p.n_dead["relu1"] <= 3 and p.n_dead["relu2"] <= 5 and p.n_always_on["relu1"] <= 5
    s = degeneracy_summary(wide, digits_test)
    assert s.zero_variance_inputs["fc1"] == 5 and s.free_from_activations["fc1"] == 5 * 512
    assert s.input_rank["fc2"] == 449  # 450 samples < 512 units: the sample size bounds the rank
    assert 0.05 <= s.total_free / s.total_parameters <= 0.2


def test_interaction_basis_through_a_wide_layer_from_a_narrow_one():
    """The next basis (up to 13 directions) is larger than the input (3 + 1): the forward-mode Jacobian path."""
    model = _mlp([3, 12, 12, 4], seed=8)
    data = _data(80, 3, seed=4)
    result = interaction_basis(model, data, ["input", "relu1", "relu2"])
    assert result.basis_size["relu1"] > result.width["input"] + 1
    _check_basis_identities(model, data, result, {"input": -1, "relu1": 1, "relu2": 3, "out": 4})


def test_interaction_basis_on_a_cnn_with_batchnorm():
    model = build_model({"type": "cnn", "input_shape": [1, 4, 4], "channels": [3], "hidden": 6, "n_classes": 3})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(3, generator=g))
        model.bn1.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        model.bn1.weight.copy_(torch.randn(3, generator=g))
    data = _data(40, 16, seed=3)
    result = interaction_basis(model, data, ["relu1", "relu_fc1"])
    assert result.width == {"relu1": 48, "relu_fc1": 6, "out": 3}
    names = [n for n, _ in model.named_children()]
    _check_basis_identities(model, data, result, {k: names.index(k) for k in result.layers})
    # gradients through BatchNorm agree with autograd on the original module
    r = gradient_rank(model, data, "relu1")
    m = copy.deepcopy(model).double()
    tail = m[names.index("relu1") + 1 :]
    with torch.no_grad():
        f = m[: names.index("relu1") + 1](data.x.double())
    j = torch.autograd.functional.jacobian(lambda z: tail(z).sum(0), f).reshape(3, 40, 48).permute(1, 0, 2)
    gram = torch.einsum("soi,soj->ij", j, j) / 40
    np.testing.assert_allclose(r.eigenvalues["relu1"], torch.linalg.eigvalsh(gram).flip(0).clamp_min(0), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# invariance under permutations of hidden units


def _permuted(model: nn.Module, seed: int) -> nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fc, nxt in (("fc1", "fc2"), ("fc2", "out")):
            perm = torch.randperm(getattr(m, fc).out_features, generator=g)
            getattr(m, fc).weight.copy_(getattr(m, fc).weight[perm])
            getattr(m, fc).bias.copy_(getattr(m, fc).bias[perm])
            getattr(m, nxt).weight.copy_(getattr(m, nxt).weight[:, perm])
    return m


def test_permuting_hidden_units_changes_no_reported_number(sample_model, digits_test, narrow):
    model, ib = narrow
    perm = _permuted(model.module, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(perm(digits_test.x), model.module(digits_test.x), rtol=1e-5, atol=1e-5)
    layers = ["input", "relu1", "relu2"]
    for fn in (
        lambda m: gradient_rank(m, digits_test, layers),
        lambda m: gradient_rank(m, digits_test, layers, output="loss"),
    ):
        a, b = fn(model), fn(perm)
        assert a.rank == b.rank
        for layer in layers:
            np.testing.assert_allclose(a.eigenvalues[layer], b.eigenvalues[layer], rtol=1e-6, atol=1e-12)
    pa, pb = relu_patterns(model, digits_test), relu_patterns(perm, digits_test)
    for attr in ("n_dead", "n_always_on", "n_synchronised", "n_groups"):
        assert getattr(pa, attr) == getattr(pb, attr)
    for layer in pa.layers:
        np.testing.assert_allclose(np.sort(pa.firing_rate[layer]), np.sort(pb.firing_rate[layer]))
    sa, sb = degeneracy_summary(model, digits_test), degeneracy_summary(perm, digits_test)
    for attr in (
        "input_rank",
        "gradient_rank",
        "free_from_activations",
        "free_from_gradients",
        "free_from_synchronised",
        "free_from_rescaling",
        "free_total",
    ):
        assert getattr(sa, attr) == getattr(sb, attr), attr
    ib_perm = interaction_basis(perm, digits_test, layers)
    assert ib.basis_size == ib_perm.basis_size
    for layer in ib.layers:
        np.testing.assert_allclose(
            ib.interaction_eigenvalues[layer],
            ib_perm.interaction_eigenvalues[layer],
            rtol=1e-6,
            atol=1e-9 * ib.interaction_eigenvalues[layer][0],
        )
        np.testing.assert_allclose(ib.gram_eigenvalues[layer], ib_perm.gram_eigenvalues[layer], rtol=1e-6, atol=1e-10)
    # the basis itself is invariant: the transformed activations of the leading directions agree
    for layer in ("relu1", "relu2"):
        np.testing.assert_allclose(ib.activations[layer][:, :8], ib_perm.activations[layer][:, :8], atol=1e-5)
    assert ib.modularity == pytest.approx(ib_perm.modularity, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the local learning coefficient (SGLD)


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> nn.Module:
    """Softmax regression trained to its minimum (LBFGS, float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], n_classes)).double()
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.double()), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model.float()


@pytest.fixture
def one_thread():
    """SGLD on a 15-parameter model is thousands of tiny steps: one thread avoids the threads' hand-off per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_llc_of_softmax_regression_is_half_its_identifiable_parameters(one_thread):
    """Regular model: (d + 1)(C - 1) / 2 = 5 for d = 4 features and C = 3 classes (the softmax ignores a common
    shift of the logits); with 2 features constant at 0 their weights are free and the coefficient drops to 3."""
    data = blobs(1.0, n_samples=1000, n_features=4, n_classes=3, seed=0)
    settings = {
        "step_size": 1e-3,
        "localization": 1.0,
        "n_chains": 4,
        "n_steps": 500,
        "n_burnin": 150,
        "batch_size": 1000,
    }
    regular = llc_estimate(_fit_softmax(data.x, data.y, 3), data, **settings)
    x = data.x.clone()
    x[:, 2:] = 0.0
    zeroed = make_dataset("blobs, 2 features zeroed", x, data.y)
    degenerate = llc_estimate(_fit_softmax(zeroed.x, zeroed.y, 3), zeroed, **settings)
    assert 4.0 <= regular.llc <= 6.0, regular.llc
    assert 2.2 <= degenerate.llc <= 3.8, degenerate.llc
    assert regular.llc > degenerate.llc + 1.0
    assert regular.n_parameters == 15 and regular.n_beta == pytest.approx(1000 / np.log(1000))
    assert regular.loss_trace.shape == (4, 500) and regular.llc_per_chain.shape == (4,)
    assert "step size 0.001, localization γ 1" in regular.hyperparameters()
    again = llc_estimate(_fit_softmax(data.x, data.y, 3), data, **settings)
    assert again.llc == regular.llc  # same seed, same chains
    assert regular.settled and degenerate.settled  # flat after burn-in, within the chains' noise
    early = llc_estimate(_fit_softmax(data.x, data.y, 3), data, **{**settings, "n_steps": 40, "n_burnin": 0})
    assert early.drift > 0.3 and early.drift > 2 * early.drift_se and not early.settled  # still climbing from L(w*)
    fig = plots.llc_trace_figure(regular, degenerate)
    assert "hyper-parameter sensitive" in figure_title(fig) and "nβ" in figure_title(fig)


def test_llc_errors(constant_and_dead, one_thread):
    model, data = constant_and_dead
    with pytest.raises(
        ParameterError, match="'step_size' parameter of llc_estimate must be a number in \\(0.0, 1.0\\]"
    ):
        llc_estimate(model, data, step_size=0.0)
    with pytest.raises(ParameterError, match="'n_burnin' parameter of llc_estimate must be an int in \\[0, 19\\]"):
        llc_estimate(model, data, n_steps=20, n_burnin=20)
    with pytest.raises(ParameterError, match="the SGLD chains diverged .* use a smaller step_size"):
        llc_estimate(model, data, step_size=0.5, localization=1e6, n_steps=100, n_burnin=0)  # |1 - εγ/2| > 1
    wrong = make_dataset("other classes", data.x, torch.tensor([12, 7] * (data.n_samples // 2) + [7] * (data.n_samples % 2)))
    for call in (lambda: degeneracy_summary(model, wrong, output="loss"),
                 lambda: llc_estimate(model, wrong, n_chains=1, n_steps=10, n_burnin=1)):
        with pytest.raises(DataError, match=r"the labels run from 7 to 12 but the model has \d+ outputs \(classes 0 to"):
            call()
    with pytest.raises(DataError, match="'labels' are required"):
        llc_estimate(model, make_dataset("nolabels", data.x))


def test_llc_error_paths_say_what_to_do(constant_and_dead, sample_model, digits_test, one_thread):
    model, data = constant_and_dead
    short = {"n_chains": 1, "n_steps": 10, "n_burnin": 0}
    wide = make_dataset("wide", torch.randn(data.n_samples, 5), data.y)
    for call in (
        lambda: llc_estimate(model, wide, **short),
        lambda: gradient_rank(model, wide, "relu1", output="loss"),
        lambda: degeneracy_summary(model, wide, output="loss"),
    ):
        with pytest.raises(
            DataError, match="could not run on the dataset .*; check that the dataset matches the model's input"
        ):
            call()
    with pytest.raises(DataError, match="labels are float32. Use a dataset with class labels.$"):
        llc_estimate(model, make_dataset("regression", data.x, data.x[:, 0]), **short)
    with pytest.raises(
        ParameterError,
        match="the SGLD chains diverged \\(a chain's estimate .* exceeds the 8970 parameters.*\\) with step_size=1 "
        "and localization=0; use a smaller step_size or a larger localization.",
    ):
        llc_estimate(copy.deepcopy(sample_model("mlp_narrow_seed0").module).double(), digits_test, step_size=1.0,
                     localization=0.0, **short)  # float64 chains: the loss stays finite while the estimate runs away


# ---------------------------------------------------------------------------------------------
# bookkeeping: inputs unchanged, seeds, progress, export, figures


def test_inputs_are_unchanged_and_results_export(constant_and_dead):
    model, data = constant_and_dead
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_before = data.x.clone()
    calls: list[tuple[int, int]] = []
    s = degeneracy_summary(model, data, device="cpu", progress=lambda done, total: calls.append((done, total)))
    ib = interaction_basis(model, data, ["input", "relu1"], device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert model.training
    model.eval()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(data.x, x_before, rtol=0, atol=0)
    assert calls and calls[-1][0] == calls[-1][1]
    for result in (s, ib):
        json.dumps(result.to_dict())
        assert result.arrays()
    assert s.device == "cpu" and ib.seed == 0 and ib.n_samples == 60


@pytest.mark.parametrize("func", ["relu_patterns", "layer_activations"])
def test_forward_passes_report_progress_per_batch(constant_and_dead, func):
    model, data = constant_and_dead  # 60 samples: batches of 25, 25 and 10
    calls: list[tuple[int, int]] = []
    record = lambda done, total: calls.append((done, total))  # noqa: E731
    if func == "relu_patterns":
        relu_patterns(model, data, batch_size=25, progress=record)
    else:
        layer_activations(model, data, ["input", "relu1"], batch_size=25, progress=record)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_same_seed_same_communities(narrow, digits_test):
    model, ib = narrow
    again = interaction_basis(model, digits_test, ["input", "relu1", "relu2"], seed=0)
    for layer in ib.layers:
        np.testing.assert_array_equal(ib.communities[layer], again.communities[layer])
    assert again.modularity == ib.modularity


def test_figures_carry_estimator_and_n(narrow, digits_test, constant_and_dead):
    model, ib = narrow
    hand, data = constant_and_dead
    figs = [
        plots.spectrum_figure(activation_rank({"input": data.x}), activation_rank({"input": data.x + 1})),
        plots.spectrum_figure(gradient_rank(hand, data, ["input", "relu1"])),
        plots.relu_pattern_figure(relu_patterns(hand, data)),
        plots.degeneracy_figure(degeneracy_summary(hand, data)),
        plots.basis_size_figure(ib, ib),
        plots.interaction_spectrum_figure(ib),
        plots.interaction_graph_figure(ib, ("relu1", "relu2"), max_edges=50),
    ]
    for fig in figs:
        title = figure_title(fig)
        assert "n = " in title and len(fig.data) > 0
    assert "n = 60" in figure_title(figs[0]) and "covariance" in figure_title(figs[0])
    graph = figs[-1]
    nodes = [tr for tr in graph.data if tr.mode == "markers" and tr.name in ("relu1", "relu2")]
    colours = {c for tr in nodes for c in tr.marker.color}
    assert len(colours) >= 2  # the module split is coloured
    # the legend says what the colours and widths mean: one entry per module drawn, in its nodes' colour, numbered as the
    # basis table numbers them (and as the hover says), and the edge strengths
    legend = {tr.name: tr.marker.color for tr in graph.data if tr.legendgroup == "modules"}
    modules = {int(c) for layer in ("relu1", "relu2") for c in ib.communities[layer][:ib.graph_directions] if c >= 0}
    assert list(legend) == [f"module {c + 1}" for c in sorted(modules)]
    for tr in nodes:
        for colour, label in zip(tr.marker.color, tr.text):
            assert legend[label] == colour
    edges = [tr.name for tr in graph.data if tr.legendgroup == "edges"]
    assert edges and all(name.startswith("edge E_ij ") and name.endswith(" of the strongest") for name in edges)
    assert sum(len([x for x in tr.x if x is not None]) // 2 for tr in graph.data if tr.mode == "lines") <= 50


def test_spectrum_panels_are_tall_enough_and_a_second_model_never_hides_the_first(constant_and_dead):
    _, data = constant_and_dead
    acts = {name: data.x * (k + 1) for k, name in enumerate(["a", "b", "c", "d"])}
    fig = plots.spectrum_figure(activation_rank(acts), activation_rank(acts))  # equal spectra: the lines coincide
    plot = fig.layout.height - fig.layout.margin.t - (fig.layout.margin.b if fig.layout.margin.b is not None else 80)
    domain = fig.layout.yaxis.domain
    assert plot * (domain[1] - domain[0]) >= 170  # pixels per panel for 16 decades of ticks
    first, second = ([t for t in fig.data if t.name == name] for name in dict.fromkeys(t.name for t in fig.data))
    assert first[0].line.width > second[0].line.width and second[0].line.dash == "dot"


def test_layer_names_defaults_and_flattened_activations(sample_model, digits_test):
    mlp, cnn = sample_model("mlp_narrow_seed0"), sample_model("cnn_seed0")
    assert sequential_layers(mlp) == ["input", "fc1", "relu1", "fc2", "relu2", "out"]
    assert default_layers(mlp, digits_test) == ["input", "relu1", "relu2"]
    assert default_layers(cnn, digits_test) == ["input", "relu_fc1"]  # conv ReLUs have 2048 features
    assert default_layers(cnn, digits_test, max_width=4096) == ["input", "relu1", "relu2", "relu_fc1"]
    acts = layer_activations(cnn, digits_test, ["relu2", "input"])
    assert acts.layers == ["input", "relu2"] and acts["relu2"].shape == (450, 32 * 8 * 8)
    assert acts.pooling == "flatten" and acts.model_name == "cnn_seed0" and len(acts.key) == 64
    assert acts.key != layer_activations(mlp, digits_test, ["input", "relu2"]).key
    torch.testing.assert_close(acts["input"], digits_test.x)
    r = activation_rank(layer_activations(cnn, digits_test, "input"))
    assert r.model == "cnn_seed0" and r.rank["input"] == 59  # 5 pixels are constant in the test split


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem(constant_and_dead, digits_test):
    model, data = constant_and_dead
    resmlp = build_model({"type": "resmlp", "in_features": 4, "width": 8, "n_blocks": 1, "n_classes": 3})
    with pytest.raises(ArchitectureError, match="torch.nn.Sequential .* got ResMLP"):
        degeneracy_summary(resmlp, data)
    with pytest.raises(UnknownLayerError, match="unknown layer 'relu3'. Did you mean 'relu1'"):
        gradient_rank(model, data, ["relu3"])
    with pytest.raises(ParameterError, match="layer 'fc1' is a Linear, not a ReLU; pick ReLU layers: relu1"):
        relu_patterns(model, data, ["fc1"])
    with pytest.raises(ParameterError, match="'output' parameter of gradient_rank must be one of 'logits', 'loss'"):
        gradient_rank(model, data, "relu1", output="probabilities")
    with pytest.raises(
        ParameterError, match="'rtol' parameter of interaction_basis must be a number in \\(0.0, 1.0\\)"
    ):
        interaction_basis(model, data, ["relu1"], rtol=0)
    with pytest.raises(ParameterError, match="'graph_directions' parameter of interaction_basis must be an int"):
        interaction_basis(model, data, ["relu1"], graph_directions=0)
    with pytest.raises(ParameterError, match="needs at least one layer before the output 'out'"):
        interaction_basis(model, data, ["out"])
    with pytest.raises(ParameterError, match="needs a model .* Got str"):
        relu_patterns("mlp.safetensors", data)
    with pytest.raises(DataError, match="needs a Dataset .* Got Tensor"):
        relu_patterns(model, data.x)
    with pytest.raises(DataError, match="could not run on the dataset at layer 'fc1'"):
        relu_patterns(model, digits_test)
    with pytest.raises(DataError, match="the loss needs integer class labels"):
        gradient_rank(model, make_dataset("reg", data.x, data.x[:, 0]), "relu1", output="loss")
    with pytest.raises(DataError, match="'labels' are required"):
        degeneracy_summary(model, make_dataset("nolabels", data.x), output="loss")
    with pytest.raises(DataError, match="token ids"):
        relu_patterns(model, make_dataset("tokens", torch.ones(5, 4, dtype=torch.int64)))
    with pytest.raises(DataError, match="'h' contains 1 NaN"):
        activation_rank({"h": np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]])})
    with pytest.raises(ArchitectureError, match="has no nn.ReLU layers"):
        relu_patterns(nn.Sequential(OrderedDict(fc=nn.Linear(4, 3))), data)
    silent = _mlp([4, 3, 3])
    with torch.no_grad():
        silent.out.weight.zero_()
        silent.out.bias.zero_()  # the logits are 0 whatever the input
    with pytest.raises(DataError, match="the output does not depend on layer 'relu1' on this dataset"):
        interaction_basis(silent, data, ["relu1"])


def test_graph_figure_rejects_a_pair_that_is_not_adjacent(narrow):
    _, ib = narrow
    with pytest.raises(UnknownLayerError, match="'input->relu2' is not a pair of adjacent layers.*Pairs: input->relu1"):
        plots.interaction_graph_figure(ib, ("input", "relu2"))
    assert issubclass(UnknownLayerError, WorkbenchError)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(narrow, digits_test):
    model, ib = narrow
    gpu = interaction_basis(model, digits_test, ["input", "relu1", "relu2"], device="cuda")
    assert gpu.basis_size == ib.basis_size and gpu.device.startswith("cuda")
    for layer in ib.layers:
        np.testing.assert_allclose(
            gpu.interaction_eigenvalues[layer],
            ib.interaction_eigenvalues[layer],
            rtol=1e-6,
            atol=1e-9 * ib.interaction_eigenvalues[layer][0],
        )
    s_cpu, s_gpu = degeneracy_summary(model, digits_test), degeneracy_summary(model, digits_test, device="cuda")
    assert s_cpu.free_total == s_gpu.free_total


def test_basis_rows_split_each_layer_over_the_modules(narrow):
    from workbench.plots import degeneracy as plots

    _, result = narrow
    rows = plots.basis_rows(result)
    assert [r["layer"] for r in rows] == list(result.layers)
    n_modules = 1 + max(int(c.max()) for c in result.communities.values())
    for row in rows:
        if row["directions per module"] == "none":
            assert row["in graph"] == 0
            continue
        listed = dict(part.split(": ") for part in row["directions per module"].split(" · "))
        counts = [int(listed.get(str(k + 1), 0)) for k in range(n_modules)]  # modules holding none are left out
        assert "0" not in listed.values() and sum(counts) == row["in graph"] <= row["basis size"]
        labels = result.communities[row["layer"]]
        assert counts == np.bincount(labels[labels >= 0], minlength=n_modules).tolist()


@pytest.mark.parametrize("name", ["default_layers", "degeneracy_summary", "gradient_rank", "layer_activations"])
def test_a_dataset_made_for_another_model_gets_the_extraction_sentence(sample_model, name):
    import workbench.analyses.degeneracy as dg

    data = make_dataset("wrongfeat", torch.randn(20, 50), torch.arange(20) % 3)
    args = {"default_layers": (), "degeneracy_summary": (), "gradient_rank": (["relu1"],), "layer_activations": (["relu1"],)}[name]
    with pytest.raises(DataError, match=r"^Dataset 'wrongfeat' has 50 features per sample but model 'mlp_seed0' expects 64; "
                       r"pick a dataset made for this model\.$"):
        getattr(dg, name)(sample_model("mlp_seed0"), data, *args)


def test_llc_chains_run_in_the_models_precision_and_agree_with_float64(sample_model, digits_test):
    """float32 chains are several times faster for convolutions on a CPU; the Langevin noise dwarfs their rounding."""
    settings = {"n_chains": 2, "n_steps": 40, "n_burnin": 10}
    single = llc_estimate(sample_model("mlp_narrow_seed0"), digits_test, **settings)
    double = llc_estimate(copy.deepcopy(sample_model("mlp_narrow_seed0").module).double(), digits_test, **settings)
    assert single.params["dtype"] == single.dtype == "float32" and double.dtype == "float64"
    assert single.llc == pytest.approx(double.llc, rel=1e-4)
