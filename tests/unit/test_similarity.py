"""Representational similarity: known answers, float64 references, invariances, sample models, errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from tests import reference as ref
from workbench.analyses import similarity as sim
from workbench.analyses.similarity import (
    MEASURES,
    cca_similarity,
    chance_level,
    linear_cka,
    minibatch_cka,
    procrustes_distance,
    rbf_cka,
    rsa,
    similarity_matrix,
)
from workbench.errors import DataError, ParameterError, UnknownLayerError
from workbench.plots._style import figure_title

PAIR_FUNCTIONS = {
    "linear_cka": linear_cka,
    "rbf_cka": rbf_cka,
    "procrustes_distance": procrustes_distance,
    "cca_similarity": cca_similarity,
    "rsa": rsa,
}
HIDDEN = ["fc1", "relu1", "fc2", "relu2", "out"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthogonal(d: int, seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _related(n: int, dx: int, dy: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x and a noisy nonlinear function of it, float32 like real activations."""
    rng = _rng(seed)
    x = rng.normal(size=(n, dx))
    y = np.tanh(x @ rng.normal(size=(dx, dy)) / math.sqrt(dx)) + 0.5 * rng.normal(size=(n, dy))
    return x.astype(np.float32), y.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# known answers


@pytest.mark.parametrize("shape", [(60, 10), (30, 80)], ids=["d<n", "d>n"])
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_of_x_with_itself_is_one(shape, debiased):
    x = _rng().normal(size=shape)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(200, 12), (40, 100)], ids=["feature-form", "gram-form"])
def test_linear_cka_invariant_to_rotation_isotropic_scaling_and_translation(shape):
    x = _rng().normal(size=shape)
    y = 3.7 * x @ _orthogonal(shape[1]) + 5.0
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(1.0, abs=1e-6)


def test_rbf_cka_invariant_to_rotation_and_isotropic_scaling():
    x = _rng().normal(size=(80, 6))
    y = 0.3 * x @ _orthogonal(6) - 2.0
    assert rbf_cka(x, y) == pytest.approx(1.0, abs=1e-6)
    assert rbf_cka(x, y, sigma=0.2, debiased=True) == pytest.approx(1.0, abs=1e-6)


def test_rbf_cka_of_a_tight_cluster_far_from_the_centre_is_rotation_invariant():
    # within-cluster distances (~1e-3) are what the median bandwidth sees; |x|^2 + |y|^2 - 2 x.y loses them (0.94)
    rng = _rng()
    x = np.vstack([1e5 + 1e-3 * rng.normal(size=(45, 6)), -1e5 + 1e-3 * rng.normal(size=(5, 6))])
    assert rbf_cka(x, x @ _orthogonal(6)) == pytest.approx(1.0, abs=1e-9)


def test_linear_invariant_to_rotation_but_rbf_not_to_non_isotropic_scaling():
    x = _rng().normal(size=(150, 5))
    scales = np.array([10.0, 1.0, 1.0, 0.1, 0.1])
    assert linear_cka(x, x @ _orthogonal(5)) == pytest.approx(1.0, abs=1e-6)
    assert rbf_cka(x, x * scales) < 0.9
    assert linear_cka(x, x * scales) < 0.9  # linear CKA is not invariant to it either


def test_debiased_cka_is_near_zero_for_independent_features_but_biased_is_not():
    rng = _rng(3)
    x, y = rng.normal(size=(3000, 10)), rng.normal(size=(3000, 10))  # n >> d
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    x, y = rng.normal(size=(80, 400)), rng.normal(size=(80, 400))  # d large relative to n
    assert linear_cka(x, y) > 0.5
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_procrustes_zero_for_rotated_copy_and_in_range():
    x, y = _related(90, 7, 5)
    assert procrustes_distance(x, 2.0 * x @ _orthogonal(7) + 1.0) == pytest.approx(0.0, abs=1e-6)
    assert procrustes_distance(x, x, angular=True) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < procrustes_distance(x, y) <= math.sqrt(2)
    assert 0.0 < procrustes_distance(x, y, angular=True) <= math.pi / 2


def test_cca_invariant_to_invertible_linear_maps():
    x = _rng().normal(size=(120, 6))
    mixed = x @ (_rng(1).normal(size=(6, 6)) + 3 * np.eye(6)) + 4.0
    for kind in ("mean", "pwcca", "svcca"):
        assert cca_similarity(x, mixed, kind=kind) == pytest.approx(1.0, abs=1e-6), kind


def test_cca_ignores_float32_rounding_directions():
    # two float32 linear maps of one 10-D input: each spans 10 directions plus rounding noise at ~1e-7 of the
    # largest singular value, which a float64 rank cut-off counted as 40 more dimensions (mean CCA 0.6)
    rng = _rng()
    x = rng.normal(size=(200, 10))
    a = (x @ rng.normal(size=(10, 50))).astype(np.float32)
    b = (x @ rng.normal(size=(10, 50)) + 1.0).astype(np.float32)
    for kind in ("mean", "pwcca"):
        assert cca_similarity(a, b, kind=kind) == pytest.approx(1.0, abs=1e-9), kind
        assert cca_similarity(torch.from_numpy(a), torch.from_numpy(b), kind=kind) == pytest.approx(1.0, abs=1e-9), kind
        matrix = similarity_matrix({"a": a}, {"b": b}, measure="cca_similarity", kind=kind).values
        assert matrix[0, 0] == pytest.approx(1.0, abs=1e-9), kind
    # float32 activations cast to float64 (a common step) still carry float32's noise: the same answer, not 449 dimensions
    for kind in ("mean", "pwcca"):
        assert cca_similarity(a.astype(np.float64), b.astype(np.float64), kind=kind) == pytest.approx(1.0, abs=1e-9), kind
        assert cca_similarity(torch.from_numpy(a).double(), torch.from_numpy(b).double(), kind=kind) == pytest.approx(1.0, abs=1e-9)
    assert sim._input_eps(a.astype(np.float64)) == np.finfo(np.float32).eps
    assert sim._input_eps(x @ rng.normal(size=(10, 50))) == np.finfo(np.float64).eps  # float64 values keep their precision


def test_rsa_invariances():
    x = _rng().normal(size=(50, 8))
    assert rsa(x, 2.0 * x @ _orthogonal(8) + 1.0, rdm="euclidean") == pytest.approx(1.0, abs=1e-9)
    per_sample = 3.0 * x * _rng(1).uniform(0.5, 2.0, size=(50, 1)) + _rng(2).normal(size=(50, 1))
    assert rsa(x, per_sample, rdm="correlation", compare="pearson") == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e160, 1e300])
def test_every_measure_is_scale_free_at_the_ends_of_the_float64_range(scale):
    # kernel statistics multiply four values; without rescaling 1e160 overflowed (RBF CKA 0, debiased CKA -1,
    # Procrustes 1.414) and 1e-200 underflowed to a "constant layer"
    x, y = (v.astype(np.float64) for v in _related(60, 5, 7))
    cases = {
        "linear": lambda a, b: linear_cka(a, b),
        "debiased": lambda a, b: linear_cka(a, b, debiased=True),
        "rbf": lambda a, b: rbf_cka(a, b),
        "procrustes": lambda a, b: procrustes_distance(a, b),
        "pwcca": lambda a, b: cca_similarity(a, b, kind="pwcca"),
        "rsa euclidean": lambda a, b: rsa(a, b, rdm="euclidean"),
        "rsa correlation": lambda a, b: rsa(a, b),
        "minibatch": lambda a, b: minibatch_cka([(a[i:i + 20], b[i:i + 20]) for i in range(0, 60, 20)]).value,
        "streamed": lambda a, b: similarity_matrix({"a": a, "b": b}, measure="linear_cka",
                                                   memory_limit_mb=0.01).values[0, 1],
    }
    for name, f in cases.items():
        assert f(x * scale, y) == pytest.approx(f(x, y), rel=1e-9, abs=1e-12), name


# ---------------------------------------------------------------------------------------------
# float64 references


@pytest.mark.parametrize(
    "n,dx,dy", [(50, 200, 30), (60, 10, 12), (40, 100, 150), (5000, 64, 100)], ids=["d>n", "d<n", "both>n", "n=5000"]
)
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_gram_reference(n, dx, dy, debiased):
    x, y = _related(n, dx, dy)
    expected = (
        ref.cka_reference_large(x, y, debiased=debiased) if n > 500 else ref.cka_reference(x, y, debiased=debiased)
    )
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(expected, abs=1e-6)
    if n <= 500:  # the n^3 literal formula agrees with the O(n^2) one used for n = 5000
        assert ref.cka_reference_large(x, y, debiased=debiased) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("n,dx,dy", [(45, 90, 20), (70, 8, 12)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("sigma", [0.4, 0.8])
def test_rbf_cka_matches_kornblith_reference(n, dx, dy, debiased, sigma):
    x, y = _related(n, dx, dy)
    expected = ref.cka_reference(x, y, kernel="rbf", sigma=sigma, debiased=debiased)
    assert rbf_cka(x, y, sigma=sigma, debiased=debiased) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n,dx,dy", [(40, 100, 7), (80, 6, 9)])
@pytest.mark.parametrize("angular", [False, True])
def test_procrustes_matches_svd_reference(n, dx, dy, angular):
    x, y = _related(n, dx, dy)
    assert procrustes_distance(x, y, angular=angular) == pytest.approx(
        ref.procrustes_reference(x, y, angular=angular), abs=1e-6
    )


def test_cca_matches_textbook_reference():
    x, y = _related(150, 9, 6)
    assert cca_similarity(x, y, kind="mean") == pytest.approx(
        ref.canonical_correlations_reference(x, y).mean(), abs=1e-6
    )
    assert cca_similarity(x, y, kind="pwcca") == pytest.approx(ref.pwcca_reference(x, y), abs=1e-6)
    assert cca_similarity(y, x, kind="pwcca") == pytest.approx(ref.pwcca_reference(y, x), abs=1e-6)
    # with every direction kept, SVCCA is the mean canonical correlation
    assert cca_similarity(x, y, kind="svcca", variance=1.0) == pytest.approx(
        cca_similarity(x, y, kind="mean"), abs=1e-9
    )


@pytest.mark.parametrize("rdm", ["correlation", "euclidean"])
@pytest.mark.parametrize("compare", ["spearman", "pearson"])
def test_rsa_matches_scipy_reference(rdm, compare):
    x, y = _related(40, 12, 5)
    y[:4] = y[0]  # duplicate samples give tied dissimilarities: average ranks like scipy
    assert rsa(x, y, rdm=rdm, compare=compare) == pytest.approx(
        ref.rsa_reference(x, y, rdm=rdm, compare=compare), abs=1e-6
    )


@pytest.mark.parametrize("rdm", ["correlation", "euclidean"])
def test_rsa_of_tied_distances_is_exactly_scale_invariant(rdm):
    # Binary samples: many pairs share one distance. A matrix-product expansion left rounding noise in
    # those ties that Spearman read as an order (0.988 for the Euclidean RDM, 0.999 for correlation).
    x = np.random.default_rng(5).integers(0, 2, (40, 6)).astype(float)
    assert rsa(x, x * 3.3, rdm=rdm) == pytest.approx(1.0, abs=1e-12)
    assert rsa(x, x * 3.3, rdm=rdm, compare="pearson") == pytest.approx(1.0, abs=1e-12)


def test_rsa_ranks_give_equal_distances_one_rank():
    x = np.random.default_rng(5).integers(0, 2, (40, 6)).astype(float)
    upper = np.triu_indices(40, 1)
    distinct = len(np.unique(np.round((1.0 - np.corrcoef(x))[upper], 9)))  # 33
    ranks = sim._rsa_prep(torch.from_numpy(x), "x", "rsa", "correlation", "spearman").numpy()
    assert len(np.unique(ranks)) == distinct
    distinct = len(np.unique(np.round(np.linalg.norm(x[:, None] - x[None], axis=-1)[upper], 9)))
    ranks = sim._rsa_prep(torch.from_numpy(x), "x", "rsa", "euclidean", "spearman").numpy()
    assert len(np.unique(ranks)) == distinct


# ---------------------------------------------------------------------------------------------
# streaming


def test_minibatch_cka_agrees_with_full_debiased_cka_within_sampling_noise():
    x, y = _related(3000, 20, 30, seed=4)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 3000, 256)]  # last batch has 184 samples
    result = minibatch_cka(batches)
    assert result.n_samples == 3000 and result.batch_sizes.sum() == 3000 and result.n_batches == len(batches)
    assert result.value == pytest.approx(linear_cka(x, y, debiased=True), abs=0.02)
    assert result.value == pytest.approx(ref.minibatch_cka_reference(batches), abs=1e-9)


def test_minibatch_cka_uses_every_batch_including_a_short_last_one():
    rng = _rng(5)
    x = rng.normal(size=(130, 6))
    y = rng.normal(size=(130, 6))
    y[120:] = x[120:] @ _orthogonal(6)  # only the last, short batch is related
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 130, 40)]  # 40, 40, 40, 10
    with_last = minibatch_cka(iter(batches)).value  # a generator: no len()
    without_last = minibatch_cka(batches[:-1]).value
    assert with_last == pytest.approx(ref.minibatch_cka_reference(batches), abs=1e-9)
    assert with_last - without_last > 0.02


def test_minibatch_cka_merges_batches_below_four_samples():
    x, y = _related(50, 5, 5)
    batches = [(x[:2], y[:2]), (x[2:24], y[2:24]), (x[24:48], y[24:48]), (x[48:], y[48:])]  # 2, 22, 24, 2
    calls = []
    result = minibatch_cka(batches, progress=lambda done, total: calls.append((done, total)))
    assert result.batch_sizes.tolist() == [24, 26] and result.n_samples == 50 and result.n_batches == 4
    merged = [(x[:24], y[:24]), (x[24:], y[24:])]
    assert result.value == pytest.approx(ref.minibatch_cka_reference(merged), abs=1e-9)
    assert calls[-1] == (4, 4)


# ---------------------------------------------------------------------------------------------
# all layer pairs


def _random_layers(n: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    base = rng.normal(size=(n, 8))
    return {
        "narrow": base.astype(np.float32),
        "wide": np.tanh(base @ rng.normal(size=(8, 20))).astype(np.float32),
        "noise": rng.normal(size=(n, 5)).astype(np.float32),
    }


@pytest.mark.parametrize("measure", MEASURES)
def test_matrix_entries_equal_single_pair_functions(measure):
    a, b = _random_layers(seed=0), _random_layers(seed=1)
    options = {"kind": "mean"} if measure == "cca_similarity" else {}
    result = similarity_matrix(a, b, measure=measure, **options)
    assert result.values.shape == (3, 3)
    assert result.layers_a == ("narrow", "wide", "noise") and result.n_samples == 60
    for i, la in enumerate(result.layers_a):
        for j, lb in enumerate(result.layers_b):
            assert result.values[i, j] == pytest.approx(PAIR_FUNCTIONS[measure](a[la], b[lb], **options), abs=1e-12)


def test_matrix_of_a_model_with_itself_is_symmetric_with_unit_diagonal():
    acts = _random_layers()
    for measure in MEASURES:
        values = similarity_matrix(acts, measure=measure).values
        diagonal = 0.0 if measure == "procrustes_distance" else 1.0
        np.testing.assert_allclose(np.diag(values), diagonal, atol=1e-6, err_msg=measure)
        np.testing.assert_allclose(values, values.T, atol=1e-12, err_msg=measure)


def test_matrix_gram_and_feature_forms_agree(monkeypatch):
    a, b = _random_layers(n=30, seed=0), _random_layers(n=30, seed=2)
    gram = similarity_matrix(a, b, debiased=True)  # n = 30 < widths: Gram form
    monkeypatch.setattr(sim, "_GRAM_BYTES_LIMIT", 0)  # forces the feature-space form
    features = similarity_matrix(a, b, debiased=True)
    np.testing.assert_allclose(gram.values, features.values, atol=1e-10)


def test_matrix_layer_selection_progress_and_metadata():
    acts = _random_layers()
    calls = []
    result = similarity_matrix(
        acts,
        acts,
        layers_a=["wide"],
        layers_b=["noise", "narrow"],
        measure="rbf_cka",
        sigma=0.5,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert result.layers_a == ("wide",) and result.layers_b == ("noise", "narrow")
    assert result.n_features_a.tolist() == [20] and result.n_features_b.tolist() == [5, 8]
    assert calls[-1] == (5, 5)  # 1 + 2 layers prepared, 2 pairs
    assert result.params == {"sigma": 0.5, "debiased": False} and "RBF CKA" in result.estimator
    assert result.higher_is_closer and result.dtype == "float64" and result.model_a == "A"
    json.dumps(result.to_dict())


def test_constant_features_change_nothing_and_inputs_are_not_modified():
    x, y = _related(40, 6, 9)
    x_const = np.concatenate([x, np.full((40, 2), 0.1, dtype=np.float32)], axis=1)
    before = x_const.copy()
    for measure, fn in PAIR_FUNCTIONS.items():
        options = {"kind": "mean"} if measure == "cca_similarity" else {}
        if measure == "rsa":
            options = {"rdm": "euclidean"}
        assert fn(x_const, y, **options) == pytest.approx(fn(x, y, **options), abs=1e-9), measure
    np.testing.assert_array_equal(x_const, before)


# ---------------------------------------------------------------------------------------------
# sample models


@pytest.fixture(scope="module")
def narrow_activations(sample_model, digits_test):
    """mlp_narrow_seed0 and a copy with the hidden units of fc1/relu1 permuted (the same function)."""
    from workbench import extract

    model = sample_model("mlp_narrow_seed0")
    original = extract(model, digits_test, HIDDEN)
    permuted_module = copy.deepcopy(model.module)
    perm = torch.from_numpy(_rng(7).permutation(64))
    with torch.no_grad():
        permuted_module.fc1.weight.copy_(permuted_module.fc1.weight[perm])
        permuted_module.fc1.bias.copy_(permuted_module.fc1.bias[perm])
        permuted_module.fc2.weight.copy_(permuted_module.fc2.weight[:, perm])
    permuted = extract(permuted_module, digits_test, HIDDEN)
    return original, permuted, perm


def test_permuting_neurons_of_a_sample_model_changes_no_similarity(narrow_activations):
    original, permuted, perm = narrow_activations
    np.testing.assert_array_equal(permuted["fc1"].numpy(), original["fc1"].numpy()[:, perm.numpy()])
    np.testing.assert_allclose(permuted["out"].numpy(), original["out"].numpy(), atol=1e-5)
    for measure in MEASURES:
        options = {"kind": "mean"} if measure == "cca_similarity" else {}
        self_values = similarity_matrix(original, measure=measure, **options).values
        cross_values = similarity_matrix(original, permuted, measure=measure, **options).values
        np.testing.assert_allclose(cross_values, self_values, atol=1e-6, err_msg=measure)
        np.testing.assert_allclose(np.diag(self_values), 0.0 if measure == "procrustes_distance" else 1.0, atol=1e-6)


def test_sample_models_from_different_seeds_are_similar_but_not_identical(sample_model, digits_test):
    from workbench import extract

    a = extract(sample_model("mlp_narrow_seed0"), digits_test, HIDDEN)
    b = extract(sample_model("mlp_narrow_seed1"), digits_test, HIDDEN)
    result = similarity_matrix(a, b)
    assert result.model_a == "mlp_narrow_seed0" and result.model_b == "mlp_narrow_seed1"
    diagonal = np.diag(result.values)
    assert (diagonal > 0.7).all() and (diagonal < 0.999).all()
    # corresponding layers are closer than the input-side layer is to the logits
    assert result.values[0, 0] > result.values[0, 4]


# ---------------------------------------------------------------------------------------------
# errors: one test per message


def test_error_nan_input():
    x = _rng().normal(size=(10, 3))
    x[2, 1] = np.nan
    with pytest.raises(DataError, match=r"linear_cka: 'x' contains 1 NaN or infinite value"):
        linear_cka(x, x)


def test_error_mismatched_samples():
    with pytest.raises(DataError, match=r"'x' and 'y' must have the same number of samples \(rows\). Got 10 and 9"):
        rbf_cka(np.ones((10, 2)), np.ones((9, 2)))


def test_error_one_dimensional_input():
    with pytest.raises(DataError, match=r"procrustes_distance: 'x' must be 2-D \(n_samples, n_features\)"):
        procrustes_distance(np.arange(10.0), np.ones((10, 2)))


@pytest.mark.parametrize("measure", MEASURES)
def test_error_constant_layer(measure):
    x = _rng().normal(size=(12, 3))
    with pytest.raises(DataError, match=r"'y' is constant over samples \(zero variance in every feature\)"):
        PAIR_FUNCTIONS[measure](x, np.zeros((12, 4)))


def test_error_debiased_needs_four_samples():
    with pytest.raises(DataError, match=r"linear_cka with debiased=True needs at least 4 samples .* Got 3"):
        linear_cka(np.eye(3), np.eye(3), debiased=True)


def test_error_debiased_self_hsic_not_positive():
    with pytest.raises(DataError, match=r"the debiased HSIC of 'x' with itself is not positive"):
        linear_cka(np.eye(4), _rng().normal(size=(4, 2)), debiased=True)


def test_error_too_few_samples():
    with pytest.raises(DataError, match=r"rsa: 'x' needs at least 3 samples. Got 2"):
        rsa(np.ones((2, 3)), np.ones((2, 3)))


def test_error_bad_sigma():
    with pytest.raises(
        ParameterError, match=r"The 'sigma' parameter of rbf_cka must be a number in \[0.01, 100.0\]. Got 0"
    ):
        rbf_cka(np.eye(5), np.eye(5), sigma=0)
    for extreme in (1e-300, 1e300):  # the kernel would be the identity or all ones, whatever the data
        with pytest.raises(ParameterError, match=r"The 'sigma' parameter of rbf_cka must be a number in \[0.01, 100.0\]"):
            rbf_cka(np.eye(5), np.eye(5), sigma=extreme)


def test_ranges_with_an_open_end_are_written_as_open():
    from workbench.analyses._validation import check_float, check_int

    with pytest.raises(ParameterError, match=r"^The 'order' parameter of f must be a number in \[1\.0, inf\)\. Got inf\.$"):
        check_float(float("inf"), "order", func="f", low=1.0)  # infinity is refused, so the range does not include it
    with pytest.raises(ParameterError, match=r"must be a number in \(0\.0, inf\)\. Got -1\.$"):
        check_float(-1, "c", func="f", low=0.0, low_inclusive=False)
    with pytest.raises(ParameterError, match=r"must be a number in \(-inf, 2\]\. Got 3\.$"):
        check_float(3, "x", func="f", high=2)
    with pytest.raises(ParameterError, match=r"must be an int in \[1, inf\)\. Got 0\.$"):
        check_int(0, "k", func="f", low=1)


def test_error_bad_bool_flag():
    with pytest.raises(
        ParameterError, match=r"The 'debiased' parameter of linear_cka must be True or False. Got 'yes'"
    ):
        linear_cka(np.eye(5), np.eye(5), debiased="yes")


def test_error_rbf_zero_median_distance():
    x = np.zeros((10, 2))
    x[0, 0] = 1.0
    with pytest.raises(DataError, match=r"the median pairwise distance of 'x' is zero"):
        rbf_cka(x, _rng().normal(size=(10, 2)))


def test_error_cca_more_dimensions_than_samples():
    x, y = _rng().normal(size=(20, 12)), _rng(1).normal(size=(20, 10))
    with pytest.raises(DataError, match=r"'x' and 'y' span 12 \+ 10 dimensions but 20 samples leave only 19"):
        cca_similarity(x, y, kind="mean")


def test_cca_counts_repeated_samples_once():
    x, y = np.repeat(_rng().normal(size=(10, 6)), 5, 0), np.repeat(_rng(1).normal(size=(10, 6)), 5, 0)  # unrelated
    with pytest.raises(DataError, match=r"span 6 \+ 6 dimensions but 10 distinct samples \(of 50; the rest repeat them\) "
                                        r"leave only 9"):
        cca_similarity(x, y, kind="mean")  # three canonical correlations are 1 whatever the data (mean 0.70)
    x5, y5 = np.repeat(_rng().normal(size=(20, 3)), 3, 0), np.repeat(_rng(1).normal(size=(20, 3)), 3, 0)
    assert cca_similarity(x5, y5, kind="mean") == pytest.approx(cca_similarity(x5[::3], y5[::3], kind="mean"), abs=1e-10)
    shuffled = np.random.default_rng(2).permutation(60)  # repeats in x alone make distinct (x, y) pairs: defined
    assert np.isfinite(cca_similarity(x5, y5[shuffled], kind="mean"))


def test_error_cca_bad_kind_and_variance():
    with pytest.raises(
        ParameterError, match=r"The 'kind' parameter of cca_similarity must be one of 'svcca', 'pwcca', 'mean'"
    ):
        cca_similarity(np.eye(5), np.eye(5), kind="cka")
    with pytest.raises(
        ParameterError, match=r"The 'variance' parameter of cca_similarity must be a number in \(0.0, 1.0\]"
    ):
        cca_similarity(np.eye(5), np.eye(5), variance=1.5)


def test_error_rsa_sample_without_direction():
    x = _rng().normal(size=(10, 4))
    x[3] = 0.0
    with pytest.raises(DataError, match=r"rsa: 'x' has 1 sample whose features are all equal .* use rdm='euclidean'"):
        rsa(x, _rng(1).normal(size=(10, 4)))


def test_error_rsa_constant_rdm():
    with pytest.raises(DataError, match=r"every pairwise dissimilarity of 'x' is the same"):
        rsa(np.eye(6), _rng().normal(size=(6, 3)), rdm="euclidean")


def test_error_rsa_bad_choices():
    with pytest.raises(
        ParameterError, match=r"The 'rdm' parameter of rsa must be one of 'correlation', 'euclidean'. Got 'cosine'"
    ):
        rsa(np.eye(5), np.eye(5), rdm="cosine")
    with pytest.raises(ParameterError, match=r"The 'compare' parameter of rsa must be one of 'spearman', 'pearson'"):
        rsa(np.eye(5), np.eye(5), compare="kendall")


def test_error_non_numeric_input():
    with pytest.raises(DataError, match=r"linear_cka: 'y' must be a numeric array"):
        linear_cka(np.eye(3), np.array([["a", "b"]] * 3))


def test_error_matrix_unknown_measure():
    with pytest.raises(
        ParameterError, match=r"The 'measure' parameter of similarity_matrix must be one of 'linear_cka'"
    ):
        similarity_matrix(_random_layers(), measure="cka")


def test_error_matrix_unknown_layer():
    with pytest.raises(
        UnknownLayerError, match=r"Unknown layer 'wida' in 'acts_b'. Did you mean 'wide'\? Layers: narrow, wide, noise"
    ):
        similarity_matrix(_random_layers(), _random_layers(), layers_b=["wida"])


def test_error_matrix_bad_inputs():
    with pytest.raises(DataError, match=r"'acts_a' must be Activations or a dict of layer name"):
        similarity_matrix(np.eye(4))
    with pytest.raises(DataError, match=r"'acts_b' holds no layers"):
        similarity_matrix(_random_layers(), {})
    with pytest.raises(
        ParameterError, match=r"The 'layers' selection of similarity_matrix for 'acts_a' must be a non-empty list"
    ):
        similarity_matrix(_random_layers(), layers_a="wide")


def test_error_matrix_layers_of_different_sample_counts():
    with pytest.raises(
        DataError, match=r"'acts_a\['narrow'\]' and 'acts_b\['x'\]' must have the same number of samples"
    ):
        similarity_matrix(_random_layers(), {"x": np.ones((5, 2))})


@pytest.mark.parametrize("measure", list(sim.MEASURES))
def test_a_constant_layer_is_n_a_in_the_matrix_and_the_others_are_computed(measure):
    from workbench.errors import ConstantDataError

    layers = _random_layers()
    acts = {**layers, "dead": np.zeros((60, 4), dtype=np.float32)}
    other = {"first token": np.ones((60, 3)), **{f"{k}2": v[::-1].copy() for k, v in layers.items()}}
    result = similarity_matrix(acts, other, measure=measure)
    alive = similarity_matrix(layers, {f"{k}2": v[::-1].copy() for k, v in layers.items()}, measure=measure)
    assert np.isnan(result.values[-1]).all() and np.isnan(result.values[:, 0]).all()
    np.testing.assert_allclose(result.values[:-1, 1:], alive.values, rtol=1e-12, atol=1e-12)
    assert result.params["constant_layers"] == {"A": ["dead"], "B": ["first token"]}
    assert result.estimator.endswith("n/a (NaN) for the layers constant over samples, where the measure is undefined: "
                                     "dead of model A; first token of model B")
    itself = similarity_matrix(acts, measure=measure)  # A with itself: one side
    assert itself.params["constant_layers"] == {"A": ["dead"]} and np.isfinite(itself.values[:-1, :-1]).all()
    with pytest.raises(ConstantDataError, match=r"similarity_matrix: 'acts_a\['dead'\]' is constant over samples"):
        similarity_matrix({"dead": acts["dead"]}, other, measure=measure)  # nothing of A left to compare


def test_error_matrix_gram_memory_limit(monkeypatch):
    monkeypatch.setattr(sim, "_GRAM_ONLY_BYTES_LIMIT", 1000)
    with pytest.raises(DataError, match=r"rbf_cka on 60 samples and 3 layers needs 0.0 GiB of n x n matrices"):
        similarity_matrix(_random_layers(), measure="rbf_cka")


def test_error_progress_not_callable():
    with pytest.raises(ParameterError, match=r"The 'progress' parameter of similarity_matrix must be a callable"):
        similarity_matrix(_random_layers(), progress=5)


def test_error_minibatch_inputs():
    x = _rng().normal(size=(20, 3))
    with pytest.raises(DataError, match=r"minibatch_cka: no batches were given"):
        minibatch_cka([])
    with pytest.raises(ParameterError, match=r"The 'batches' parameter of minibatch_cka must be an iterable"):
        minibatch_cka(5)
    with pytest.raises(
        DataError, match=r"minibatch_cka: batch 0 must be a pair \(x_batch, y_batch\). Got tuple of length 3"
    ):
        minibatch_cka([(x, x, x)])
    with pytest.raises(DataError, match=r"minibatch_cka: batch 1 has widths \(2, 3\) but the first batch had \(3, 3\)"):
        minibatch_cka([(x[:10], x[:10]), (x[10:, :2], x[10:])])
    with pytest.raises(DataError, match=r"minibatch_cka needs at least 4 samples in total .* Got 3"):
        minibatch_cka([(x[:3], x[:3])])
    with pytest.raises(DataError, match=r"the accumulated debiased HSIC of 'y' with itself is not positive"):
        minibatch_cka([(x[:10], np.ones((10, 2))), (x[10:], np.ones((10, 2)))])


# ---------------------------------------------------------------------------------------------
# plots and device


@pytest.mark.parametrize(("measure", "options", "label"), [
    ("linear_cka", {}, "linear CKA"),
    ("linear_cka", {"debiased": True}, "debiased linear CKA"),
    ("rbf_cka", {"debiased": True}, "debiased RBF CKA"),
    ("procrustes_distance", {"angular": True}, "angular Procrustes distance"),
    ("cca_similarity", {"kind": "mean"}, "CCA similarity (mean CCA)"),
    ("rsa", {"rdm": "euclidean", "compare": "pearson"}, "RSA (euclidean RDM, Pearson)"),
])
def test_figures_name_the_variant_of_the_measure(measure, options, label):
    from workbench.plots.similarity import result_label, similarity_heatmap

    x = np.random.default_rng(0).normal(size=(40, 3))
    result = similarity_matrix({"a": x, "b": x[:, ::-1] + 1}, None, measure=measure, **options)
    assert result_label(result) == label
    assert similarity_heatmap(result).data[0].colorbar.title.text.startswith(f"{label}<br>")


def test_heatmap_records_estimator_and_n_and_hover_values():
    from workbench.plots.similarity import similarity_heatmap

    result = similarity_matrix(_random_layers(), measure="procrustes_distance", angular=True)
    fig = similarity_heatmap(result)
    title = figure_title(fig)
    assert "angular Procrustes distance" in title and "n = 60" in title and "lower is closer" in title
    cells = fig.data[1]
    assert len(cells.x) == 9 and np.allclose(np.asarray(cells.customdata), result.values.ravel())
    assert "%{text}" in cells.hovertemplate and list(cells.text) == [f"{v:.6f}" for v in result.values.ravel()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    a, b = _random_layers(seed=0), _random_layers(seed=1)
    for measure in MEASURES:
        options = {"kind": "mean"} if measure == "cca_similarity" else {}
        cpu = similarity_matrix(a, b, measure=measure, device="cpu", **options).values
        gpu = similarity_matrix(a, b, measure=measure, device="cuda", **options)
        assert gpu.device.startswith("cuda")
        np.testing.assert_allclose(gpu.values, cpu, atol=1e-9, err_msg=measure)


def test_similarity_matrix_streams_exactly_when_layers_exceed_the_memory_limit():
    rng = np.random.default_rng(0)
    n = 3001
    x = rng.standard_normal((n, 40)) + 1e4  # a large offset: the accumulated sums must not cancel
    y = np.tanh((x - 1e4) @ rng.standard_normal((40, 60))) + 0.5 * rng.standard_normal((n, 60))
    z = rng.standard_normal((n, 700))
    z[:, :5] = 3.0  # constant features
    w = np.c_[3 * x[:, :10] + 7, rng.standard_normal((n, 3))]
    acts = {"x": x, "y": y, "z": z, "w": w}
    for debiased in (False, True):
        full = similarity_matrix(acts, measure="linear_cka", debiased=debiased)
        calls = []
        streamed = similarity_matrix(acts, measure="linear_cka", debiased=debiased, memory_limit_mb=15,
                                     progress=lambda done, total, calls=calls: calls.append((done, total)))
        assert streamed.params["streamed"] and streamed.params["exact"] and streamed.params["debiased"] == debiased
        assert "exact" in streamed.estimator and "above the 15 MiB limit" in streamed.estimator
        assert len(streamed.params["chunk_sizes"]) > 1 and sum(streamed.params["chunk_sizes"]) == n  # every sample
        assert calls[-1][0] == calls[-1][1] == len(streamed.params["chunk_sizes"])
        np.testing.assert_allclose(streamed.values, full.values, rtol=0, atol=1e-12)
        a_vs_b = similarity_matrix({"x": x, "y": y}, {"z": z, "w": w}, measure="linear_cka", debiased=debiased)
        streamed = similarity_matrix({"x": x, "y": y}, {"z": z, "w": w}, measure="linear_cka", debiased=debiased,
                                     memory_limit_mb=15)
        assert streamed.params["exact"] and streamed.values.shape == (2, 2)
        np.testing.assert_allclose(streamed.values, a_vs_b.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("limit_mb", [10, 0.3], ids=["exact stream", "minibatch stream"])
def test_streamed_similarity_marks_constant_layers_as_in_memory(limit_mb):
    rng = np.random.default_rng(0)
    n = 3001
    x = rng.standard_normal((n, 40))
    y = np.tanh(x @ rng.standard_normal((40, 60))) + 0.1 * rng.standard_normal((n, 60))
    acts = {"x": x, "dead": np.ones((n, 600)), "y": y}
    full = similarity_matrix(acts, measure="linear_cka", debiased=True)
    streamed = similarity_matrix(acts, measure="linear_cka", debiased=True, memory_limit_mb=limit_mb)
    assert streamed.params["streamed"] and streamed.params["exact"] == (limit_mb == 10)
    assert streamed.params["constant_layers"] == full.params["constant_layers"] == {"A": ["dead"]}
    assert "n/a (NaN) for the layers constant over samples, where the measure is undefined: dead of model A" in streamed.estimator
    assert np.isnan(streamed.values[1]).all() and np.isnan(streamed.values[:, 1]).all()
    np.testing.assert_allclose(streamed.values[np.ix_([0, 2], [0, 2])], full.values[np.ix_([0, 2], [0, 2])],
                               rtol=0, atol=1e-12 if limit_mb == 10 else 0.05)
    two_sided = similarity_matrix({"x": x}, {"y": y, "dead": np.ones((n, 600))}, debiased=True, memory_limit_mb=limit_mb)
    assert two_sided.params["constant_layers"] == {"B": ["dead"]} and np.isnan(two_sided.values[0, 1])
    with pytest.raises(DataError, match=r"^similarity_matrix: 'acts_b\['dead'\]' is constant over samples .* pick another layer"):
        similarity_matrix({"x": x}, {"dead": np.ones((n, 600))}, debiased=True, memory_limit_mb=limit_mb)


def test_similarity_matrix_falls_back_to_the_minibatch_estimate_when_cross_products_do_not_fit(monkeypatch):
    from workbench.analyses.similarity import _chunk_bounds

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3001, 40))
    y = np.tanh(x @ rng.standard_normal((40, 60))) + 0.5 * rng.standard_normal((3001, 60))
    z = rng.standard_normal((3001, 700))
    acts = {"x": x, "y": y, "z": z}
    full = similarity_matrix(acts, measure="linear_cka", debiased=True)
    made = []
    workspace = sim._workspace
    monkeypatch.setattr(sim, "_workspace", lambda *args: made.append(args) or workspace(*args))
    streamed = similarity_matrix(acts, measure="linear_cka", debiased=True, memory_limit_mb=5)
    assert len(made) == 1  # the chunks and the pairs' cross products reuse one workspace
    assert not streamed.params["exact"] and streamed.params["debiased"]
    assert "minibatch unbiased HSIC" in streamed.estimator and "above the 5 MiB limit" in streamed.estimator
    assert "do not fit" in streamed.estimator
    # the accumulated cross products (4.88 MiB) and, after the stream, the centred product of the 700-wide layer with itself
    with pytest.raises(DataError, match=r"streaming biased linear CKA exactly needs 8.62 MiB of feature cross products; "
                                        r"raise memory_limit_mb to that, .* or pass debiased=True"):
        similarity_matrix(acts, measure="linear_cka", memory_limit_mb=5)
    assert streamed.params["streamed"] and sum(streamed.params["chunk_sizes"]) == 3001  # every sample is used
    np.testing.assert_allclose(streamed.values, full.values, atol=0.02)
    assert abs(streamed.values[0, 2]) < 0.05 and streamed.values[0, 1] > 0.5
    assert _chunk_bounds(10, 4) == [(0, 4), (4, 10)]  # a last chunk of 2 joins the one before
    assert _chunk_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]


def test_streamed_similarity_of_cached_activations(sample_model, digits_test):
    from workbench import extract

    acts = extract(sample_model("cnn_seed0"), digits_test, ["conv1", "conv2", "out"])
    streamed = similarity_matrix(acts, measure="linear_cka", memory_limit_mb=0.1)  # memory-mapped, read in chunks
    full = similarity_matrix(acts, measure="linear_cka")
    assert streamed.params["streamed"] and streamed.params["exact"] and len(streamed.params["chunk_sizes"]) > 2
    np.testing.assert_allclose(streamed.values, full.values, rtol=0, atol=1e-12)


def test_two_samples_are_too_few_to_compare():
    # two centred samples span one direction, so any two layers would score CKA 1 and Procrustes 0
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 5)), rng.normal(size=(2, 3))
    for measure in ("linear_cka", "rbf_cka", "procrustes_distance"):
        with pytest.raises(DataError, match=r"similarity_matrix: 'acts_a\['l'\]' needs at least 3 samples\. Got 2\."):
            similarity_matrix({"l": x}, {"l": y}, measure=measure)
    with pytest.raises(DataError, match=r"linear_cka: 'x' needs at least 3 samples"):
        linear_cka(x, y)


def test_result_prints_on_one_short_line_and_converts_to_pandas():
    x, y = _related(500, 30, 40)
    result = similarity_matrix({"x": x, "y": y, "z": y[:, :5]})
    text = repr(result)
    assert text.startswith("SimilarityMatrixResult(estimator='linear CKA, biased HSIC', n_samples=500")
    assert "values=<array (3, 3) float64>" in text and "layers_a=('x', 'y', 'z')" in text and len(text) < 600
    frame = result.to_frame()
    assert list(frame.index) == ["x", "y", "z"] and list(frame.columns) == ["x", "y", "z"]
    np.testing.assert_array_equal(frame.to_numpy(), result.values)
    assert frame.index.name == "A" and frame.columns.name == "A"  # the model names (A for a plain dict)


def test_chance_level_is_the_measure_on_shuffled_samples():
    from workbench.analyses.similarity import chance_level

    rng = np.random.default_rng(0)
    x = rng.standard_normal((450, 512))
    y = x @ rng.standard_normal((512, 512)) + 0.1 * rng.standard_normal((450, 512))  # closely related to x
    related = similarity_matrix({"x": x}, {"y": y}).values[0, 0]
    chance = chance_level({"x": x}, {"y": y})
    assert related > chance.values[0, 0] + 0.3
    z = rng.standard_normal((450, 512))
    null = math.sqrt(512 * 512 / ((450 + 512) * (450 + 512)))  # biased CKA of unrelated isotropic features
    assert chance_level({"x": x}, {"z": z}).values[0, 0] == pytest.approx(null, abs=0.02)
    assert chance.model_b == "B (samples shuffled)" and "random order (seed 0)" in chance.estimator
    assert abs(chance_level({"x": x}, {"y": y}, debiased=True).values[0, 0]) < 0.02
    assert chance_level({"x": x}, {"y": y}, seed=1).values[0, 0] != chance.values[0, 0]
    itself = chance_level({"x": x, "x2": x[:, :10]})  # A against itself, shuffled: a full, non-symmetric matrix
    assert itself.values.shape == (2, 2) and itself.values[0, 0] < 0.6
    with pytest.raises(ParameterError, match=r"'seed' parameter of chance_level must be an int in \[0, 4294967295\]"):
        chance_level({"x": x}, seed=-1)


def test_matrix_marks_cca_pairs_wider_than_the_samples_n_a_and_keeps_the_others():
    rng = _rng()
    wide, narrow = rng.normal(size=(30, 25)), rng.normal(size=(30, 3))
    acts = {"wide": wide, "narrow": narrow}
    for kind in ("mean", "pwcca"):
        result = similarity_matrix(acts, measure="cca_similarity", kind=kind)
        assert np.isnan(result.values[0, 0]) and result.params["undefined_pairs"] == [("wide", "wide")]
        assert result.values[1, 1] == pytest.approx(1.0)
        assert result.values[0, 1] == pytest.approx(cca_similarity(wide, narrow, kind=kind))
        assert f"n/a (NaN) for 1 of {3 if kind == 'mean' else 4} pairs" in result.estimator  # PWCCA is not symmetric and "use the SVCCA summary (kind='svcca') for them" in result.estimator
    with pytest.raises(DataError, match=r"'acts_a\['wide'\]' and 'acts_a\['wide'\]' span 25 \+ 25 dimensions but 30 samples"):
        similarity_matrix({"wide": wide}, measure="cca_similarity", kind="mean")


# ---------------------------------------------------------------------------------------------
# numerical edge cases: float32 ranks, extreme values, ties, chance level


def _small_feature_pair() -> tuple[np.ndarray, np.ndarray]:
    """x's only link to y is a feature at 1e-4 of the others' scale."""
    rng = np.random.default_rng(8)
    s = rng.normal(size=2000)
    x = np.c_[s * 1e-4, rng.normal(size=(2000, 4))]
    y = np.c_[s + 0.1 * rng.normal(size=2000), rng.normal(size=(2000, 4))]
    return x, y


def test_cca_keeps_a_small_scale_feature_of_float32_input():
    # float32 rounding is relative to each value: the rank cut-off on the raw spectrum (2.4e-4 of the largest
    # singular value) dropped the 1e-4 feature that carries all of the link (mean CCA 0.0397 instead of 0.2233)
    x, y = _small_feature_pair()
    expected = ref.canonical_correlations_reference(x, y).mean()
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert cca_similarity(x, y, kind="mean") == pytest.approx(expected, abs=1e-9)
    assert cca_similarity(x32, y32, kind="mean") == pytest.approx(expected, abs=1e-6)
    assert cca_similarity(x32, y32, kind="pwcca") == pytest.approx(ref.pwcca_reference(x, y), abs=1e-6)
    result = similarity_matrix({"x": x32}, {"y": y32}, measure="cca_similarity", kind="mean")
    assert result.values[0, 0] == pytest.approx(expected, abs=1e-6)
    assert result.params["ranks_a"] == {"x": 5} and result.params["ranks_b"] == {"y": 5}
    # still invariant to invertible linear maps and translation, small feature included
    mixed = x @ (np.random.default_rng(1).normal(size=(5, 5)) + 3 * np.eye(5)) + 5.0
    assert cca_similarity(mixed, y, kind="mean") == pytest.approx(expected, abs=1e-9)
    # SVCCA keeps the top directions of the centred data: the 1e-4 feature explains none of its variance
    svcca = similarity_matrix({"x": x32, "y": y32}, measure="cca_similarity", variance=0.99)
    assert svcca.params["ranks_a"] == {"x": 4, "y": 5}
    # a feature whose variation is within the float32 rounding of its values (1e4 +- 1e-4) is no direction
    z = np.c_[1e4 + 1e-4 * np.random.default_rng(2).normal(size=2000), y[:, :3]].astype(np.float32)
    assert similarity_matrix({"z": z}, measure="cca_similarity", kind="mean").params["ranks_a"] == {"z": 3}


def _huge_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = 1e306 * (3 + rng.random((100, 4)))
    return x, rng.normal(size=(100, 4)) + x / 1e306


def test_data_near_the_float64_limit_gives_the_value_of_the_rescaled_data():
    # the column means were taken before rescaling and overflowed; the clamp then turned NaN into -1.0 or 0.0
    x, y = _huge_pair()
    cases = {
        "linear": lambda a, b: linear_cka(a, b),
        "debiased": lambda a, b: linear_cka(a, b, debiased=True),
        "rbf": lambda a, b: rbf_cka(a, b),
        "rbf debiased": lambda a, b: rbf_cka(a, b, debiased=True),
        "procrustes": lambda a, b: procrustes_distance(a, b),
        "svcca": lambda a, b: cca_similarity(a, b),
        "mean cca": lambda a, b: cca_similarity(a, b, kind="mean"),
        "rsa euclidean": lambda a, b: rsa(a, b, rdm="euclidean"),
        "rsa correlation": lambda a, b: rsa(a, b),
        "streamed": lambda a, b: similarity_matrix({"a": a, "b": b}, memory_limit_mb=0.01).values[0, 1],
        "streamed debiased": lambda a, b: similarity_matrix({"a": a}, {"b": b}, debiased=True,
                                                            memory_limit_mb=0.01).values[0, 0],
        "minibatch": lambda a, b: minibatch_cka([(a[:50], b[:50]), (a[50:], b[50:])]).value,
    }
    for name, f in cases.items():
        assert f(x, y) == pytest.approx(f(x / 1e306, y), rel=1e-9, abs=1e-12), name
    assert rbf_cka(x / 1e306, y) == pytest.approx(ref.cka_reference(x / 1e306, y, kernel="rbf", sigma=0.8), abs=1e-9)
    assert linear_cka(x, y, debiased=True) == pytest.approx(ref.cka_reference(x / 1e306, y, debiased=True), abs=1e-9)
    # opposite signs at the largest float64: differences and the exact streamed sums must not overflow
    rng = np.random.default_rng(1)
    edge = np.c_[1.7e308 * np.sign(rng.normal(size=100)), rng.normal(size=100)]
    for debiased in (False, True):
        streamed = similarity_matrix({"e": edge, "y": y}, debiased=debiased, memory_limit_mb=0.004)
        assert streamed.params["exact"]
        expected = ref.cka_reference(edge / 1e308, y, debiased=debiased)
        assert streamed.values[0, 1] == pytest.approx(expected, abs=1e-9)
        assert linear_cka(edge, y, debiased=debiased) == pytest.approx(expected, abs=1e-9)


def test_chunks_of_very_different_scales_add_up():
    # minibatch and streamed sums were kept at the first chunk's scale: a chunk 1e80 larger overflowed (-1.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    x[20:] *= 1e80
    value = minibatch_cka([(x[:20], y[:20]), (x[20:], y[20:])]).value
    assert value == pytest.approx(ref.minibatch_cka_reference([(x[:20] / 1e80, y[:20]), (x[20:] / 1e80, y[20:])]),
                                  abs=1e-12)
    assert minibatch_cka([(x[20:], y[20:]), (x[:20], y[:20])]).value == pytest.approx(value, abs=1e-12)
    a = rng.normal(size=(400, 5))
    b = np.tanh(a @ rng.normal(size=(5, 6))) + 0.3 * rng.normal(size=(400, 6))
    a[200:] *= 1e150
    for debiased in (False, True):
        streamed = similarity_matrix({"a": a, "b": b}, debiased=debiased, memory_limit_mb=0.02)
        assert streamed.params["exact"] and len(streamed.params["chunk_sizes"]) > 2
        expected = ref.cka_reference(a / 1e150, b, debiased=debiased)
        assert streamed.values[0, 1] == pytest.approx(expected, abs=1e-12)
        assert linear_cka(a, b, debiased=debiased) == pytest.approx(expected, abs=1e-12)
    estimate = similarity_matrix({"a": a}, {"b": b}, debiased=True, memory_limit_mb=0.001)
    assert not estimate.params["exact"] and np.isfinite(estimate.values).all()


def test_an_undefined_intermediate_raises_instead_of_reading_as_a_value():
    with pytest.raises(DataError, match=r"linear_cka: an intermediate result came out nan \(it overflowed or is 0/0\), "
                                        r"so the measure is undefined for this data; check the layers"):
        sim._bounded(float("nan"), -1.0, 1.0, "linear_cka")
    with pytest.raises(DataError, match=r"linear_cka: the HSIC of 'x' with itself came out inf .* rescale it\.$"):
        sim._check_self_hsic(float("inf"), float("inf"), 10, "x", "linear_cka")
    assert sim._bounded(1.0 + 1e-15, -1.0, 1.0, "f") == 1.0


def test_spearman_rsa_keeps_distances_of_very_different_sizes_apart():
    # ties were values within 1e-9 of the largest distance, chained from neighbour to neighbour: one sample
    # 1e6 times further out tied distances 1e-3 apart (0.3148 instead of scipy's 0.4868)
    from scipy.spatial.distance import pdist
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 10))
    y = x + rng.normal(size=(300, 10))
    x[0] *= 1e6
    y[0] *= 1e6
    assert rsa(x, y, rdm="euclidean") == pytest.approx(spearmanr(pdist(x), pdist(y))[0], abs=1e-6)
    y[1:5] = y[1]  # exact duplicates still tie, next to the far sample
    assert rsa(x, y, rdm="euclidean") == pytest.approx(spearmanr(pdist(x), pdist(y))[0], abs=1e-6)
    from workbench.analyses._distances import average_ranks

    v = np.r_[np.zeros(3), 1.0, 1.0 + 1e-13, 2.0, 2.0, 1e6, 1e6 * (1 + 1e-13), 1e6 + 1e-3, -5.0, -5.0 * (1 + 1e-13)]
    expected = rankdata(np.r_[np.zeros(3), 1.0, 1.0, 2.0, 2.0, 1e6, 1e6, 1e6 + 1e-3, -5.0, -5.0])
    np.testing.assert_array_equal(average_ranks(torch.from_numpy(v)).numpy(), expected)
    # a run of values 4e-10 apart spans 4e-8: groups stay within the tolerance of their first value
    ranks = average_ranks(torch.from_numpy(1.0 + 4e-10 * np.arange(100))).numpy()
    assert len(np.unique(ranks)) == 34 and ranks[0] == ranks[2] == 2.0 and ranks[3] == 5.0


def test_chance_level_checks_its_inputs_before_shuffling():
    from workbench.analyses.similarity import chance_level

    rng = np.random.default_rng(0)
    a = torch.randn(20, 3, requires_grad=True)
    order = np.random.default_rng(0).permutation(20)
    expected = similarity_matrix({"a": a}, {"a": a.detach()[order]}).values
    np.testing.assert_array_equal(chance_level({"a": a}).values, expected)
    with pytest.raises(DataError, match=r"chance_level: 'acts_a\['a'\]' and 'acts_b\['q'\]' must have the same number "
                                        r"of samples \(rows\). Got 20 and 15"):
        chance_level({"a": np.ones((20, 3))}, {"p": rng.normal(size=(20, 3)), "q": rng.normal(size=(15, 3))})
    with pytest.raises(DataError, match=r"chance_level: 'acts_b\['p'\]' must be 2-D \(n_samples, n_features\)"):
        chance_level({"a": rng.normal(size=(20, 3))}, {"p": rng.normal(size=20)})
    with pytest.raises(ParameterError, match=r"The 'measure' parameter of chance_level must be one of"):
        chance_level({"a": rng.normal(size=(20, 3))}, measure="cka")
    with pytest.raises(ParameterError, match=r"chance_level: the options are passed on to similarity_matrix, which does "
                                             r"not take them"):
        chance_level({"a": rng.normal(size=(20, 3))}, bins=3)


def test_streamed_chance_level_reads_the_shuffled_rows_a_chunk_at_a_time(monkeypatch, tmp_path):
    from workbench.analyses.similarity import chance_level

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3001, 40))
    path = tmp_path / "y.npy"
    np.save(path, np.tanh(x @ rng.normal(size=(40, 60))).astype(np.float32))
    y = torch.from_numpy(np.load(path, mmap_mode="c"))  # as cached Activations hold it
    in_memory = chance_level({"x": x}, {"y": y}, debiased=True)

    def whole(self):
        raise AssertionError("the shuffled layer was loaded whole")

    monkeypatch.setattr(sim._ShuffledRows, "whole", whole)
    streamed = chance_level({"x": x}, {"y": y}, debiased=True, memory_limit_mb=1)
    assert streamed.params["streamed"] and streamed.params["exact"] and len(streamed.params["chunk_sizes"]) > 1
    np.testing.assert_allclose(streamed.values, in_memory.values, rtol=0, atol=1e-12)


def test_messages_for_one_feature_correlation_rdms_and_small_memory_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"rsa: the correlation RDM needs at least 2 features per sample .* but 'x' has 1; "
                                        r"use rdm='euclidean'\.$"):
        rsa(rng.normal(size=(10, 1)), rng.normal(size=(10, 3)))
    result = similarity_matrix({"x": rng.normal(size=(2000, 20)), "y": rng.normal(size=(2000, 30))}, debiased=True,
                               memory_limit_mb=0.03)
    assert not result.params["exact"] and "the exact cross products (0.0191 MiB) do not fit" in result.estimator


# ---------------------------------------------------------------------------------------------
# memory: what is kept per layer, and the estimates that choose the path or refuse

_PEAK_SCRIPT = """
import ctypes, json, sys
import numpy as np, torch
from workbench.analyses import similarity as sim
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
measure, n, d, layers, options = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
latent = torch.randn(n, 16, generator=g)
widths = d if isinstance(d, list) else [d] * layers  # one width, or each layer's
acts = {f"l{i}": torch.relu(latent @ torch.randn(16, w, generator=g) + 0.5 * torch.randn(n, w, generator=g))
        for i, w in enumerate(widths)}
sim.similarity_matrix({k: v[:300] for k, v in acts.items()}, measure=measure, **options)  # thread pools, BLAS buffers
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
result = sim.similarity_matrix(acts, measure=measure, **options)
print(json.dumps({"peak": status("VmHWM") - base, "streamed": bool(result.params.get("streamed", False)),
                  "exact": bool(result.params.get("exact", False))}))
"""


def _peak_bytes(measure: str, n: int, d: int | list[int], layers: int, **options) -> dict:
    """Peak resident memory of one similarity_matrix call above the process's memory before it (fresh process);
    ``d``: the width of every layer, or a list of the layers' widths."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident memory")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps([measure, n, d, layers, options])],
                          cwd=root, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("compare", ["spearman", "pearson"])
def test_rsa_peak_memory_stays_within_its_estimate(compare):
    # the RDMs were built through an n x n matrix and a boolean mask, and ranked with ~10 temporaries of
    # n (n - 1) / 2 values: 873 MiB at n = 3000 for 4 layers, where the estimate (n (n - 1) / 2 * 8 B per layer)
    # was 137 MiB
    n, d, layers = 3000, 64, 3
    estimate = sim._gram_only_bytes("rsa", compare, n, [d] * layers, torch.device("cpu"))
    kept = layers * 8 * (n * (n - 1) // 2)
    assert kept < estimate < 3 * kept
    assert _peak_bytes("rsa", n, d, layers, compare=compare)["peak"] <= 1.5 * estimate


def test_rsa_and_rbf_guards_count_what_they_hold(monkeypatch):
    acts = _random_layers()
    needed = sim._gram_only_bytes("rsa", "spearman", 60, [w.shape[1] for w in acts.values()], torch.device("cpu"))
    monkeypatch.setattr(sim, "_GRAM_ONLY_BYTES_LIMIT", needed)
    similarity_matrix(acts, measure="rsa")
    monkeypatch.setattr(sim, "_GRAM_ONLY_BYTES_LIMIT", needed - 1)
    with pytest.raises(DataError, match=r"similarity_matrix: rsa on 60 samples and 3 layers needs .* GiB .* above the"):
        similarity_matrix(acts, measure="rsa")
    # 12 layers of 10,000 samples: 12 ranked vectors of 381 MiB each, and the work space of one ranking
    big = sim._gram_only_bytes("rsa", "spearman", 10_000, [2048] * 12, torch.device("cpu"))
    assert 12 * 8 * 49_995_000 < big < 16 * 8 * 49_995_000
    assert sim._gram_only_bytes("rbf_cka", "spearman", 100, [5] * 2, torch.device("cpu")) >= 4 * 8 * 100 * 100


def test_condensed_distances_are_the_triangle_of_the_matrix_bit_for_bit(monkeypatch):
    from workbench.analyses import _distances

    rng = _rng(0)
    x = torch.from_numpy(np.vstack([rng.normal(size=(37, 5)), np.repeat(rng.normal(size=(1, 5)), 3, 0)]) + 100.0)
    one_block = _distances.squared_distances(x)
    monkeypatch.setattr(_distances, "_BLOCK_BYTES", 8 * 40 * 7)  # blocks of 7 rows
    full = _distances.squared_distances(x)
    triangle = full[torch.ones_like(full, dtype=torch.bool).triu(1)]
    assert torch.equal(_distances.condensed_distances(x), triangle)
    assert torch.equal(_distances.condensed_distances(x, squared=False), triangle.sqrt())
    # other blocks may round differently (a BLAS kernel's order of sums can depend on the block's rows), never by more
    torch.testing.assert_close(full, one_block, rtol=1e-12, atol=1e-9)


def test_average_ranks_across_chunks_keeps_ties_and_splits(monkeypatch):
    from scipy.stats import rankdata

    from workbench.analyses import _distances

    rng = _rng(5)
    run = 1.0 + 4e-10 * np.arange(100)  # one chained run, split into groups within tolerance of their first value
    v = np.r_[rng.integers(0, 20, size=300).astype(float), run, -run, rng.normal(size=50), 0.0, 0.0]
    v = v[rng.permutation(v.size)]
    expected = _distances.average_ranks(torch.from_numpy(v.copy())).numpy()
    exact = rankdata(np.where(np.abs(np.abs(v) - 1.0) < 1e-6, np.round(v, 7), v))  # stand-in check of integer ties
    np.testing.assert_array_equal(expected[np.abs(np.abs(v) - 1.0) > 1e-6], exact[np.abs(np.abs(v) - 1.0) > 1e-6])
    for chunk in (1, 7, 64):  # groups, and runs to split, that cross chunk boundaries
        monkeypatch.setattr(_distances, "_CHUNK", chunk)
        buffer = torch.from_numpy(v.copy())
        assert _distances.average_ranks(buffer, out=buffer) is buffer
        np.testing.assert_array_equal(buffer.numpy(), expected)
    ranks_of_run = _distances.average_ranks(torch.from_numpy(run)).numpy()
    assert len(np.unique(ranks_of_run)) == 34 and ranks_of_run[0] == 2.0


def test_linear_cka_in_memory_peak_stays_within_its_estimate_and_the_limit():
    # every layer's centred float64 copy was kept next to the transient copies of centring, uncounted: 12 layers of
    # 2048 x 10,000 needed 4,193 MiB for an estimate of 1,875 MiB, and the in-memory path went past memory_limit_mb
    n, d, layers = 5000, 1024, 3  # layers above glibc's largest mmap threshold (32 MiB): freed memory is returned
    estimate = sim._linear_cka_bytes(n, [d] * layers, [d] * layers, True, False, True)
    assert layers * 8 * n * d < estimate < 1.5 * layers * 8 * n * d
    in_memory = _peak_bytes("linear_cka", n, d, layers, memory_limit_mb=estimate / 2**20)
    assert not in_memory["streamed"] and in_memory["peak"] <= 1.3 * estimate
    streamed = _peak_bytes("linear_cka", n, d, layers, memory_limit_mb=estimate / 2**20 - 1, debiased=True)
    assert streamed["streamed"]


def test_exact_streamed_linear_cka_peak_stays_within_the_limit():
    # every chunk was converted, scaled and concatenated into new arrays; the allocator keeps freed blocks under
    # 32 MiB, and these piled up: 4 layers of 256 x 20,000 peaked at 147-170 MiB under a 100 MiB limit (~52 MiB now)
    n, d, layers, limit_mb = 20_000, 256, 4, 100
    assert sim._linear_cka_bytes(n, [d] * layers, [d] * layers, True, False, True) > limit_mb * 2**20
    streamed = _peak_bytes("linear_cka", n, d, layers, memory_limit_mb=limit_mb)
    assert streamed["streamed"] and streamed["exact"]
    assert streamed["peak"] <= limit_mb * 2**20, f"{streamed['peak'] / 2**20:.0f} MiB"


def test_minibatch_streamed_linear_cka_peak_stays_within_the_limit():
    # the minibatch fallback sized its chunks by their rows alone, and made each layer's centred chunk (twice) and each
    # pair's d_a x d_b cross product (30 MiB for the 2000-wide layer with itself) anew: widths 300/40/700/1500/2000 of
    # 2000 samples peaked at 126 MiB under a 60 MiB limit (52 MiB now)
    widths, limit_mb = [300, 40, 700, 1500, 2000], 60
    assert sim._streamed_matrix_bytes(widths, widths, True) > limit_mb * 2**20  # the exact stream does not fit
    streamed = _peak_bytes("linear_cka", 2000, widths, len(widths), memory_limit_mb=limit_mb, debiased=True)
    assert streamed["streamed"] and not streamed["exact"]
    assert streamed["peak"] <= limit_mb * 2**20, f"{streamed['peak'] / 2**20:.0f} MiB"


def test_exact_stream_reads_chunks_into_one_workspace_and_checks_each_chunk(monkeypatch):
    rng = _rng(3)
    x = rng.normal(size=(600, 30)).astype(np.float32)
    acts = {"x": x, "y": torch.from_numpy(np.tanh(x @ rng.normal(size=(30, 50)))), "i": rng.integers(0, 4, (600, 3))}
    made = []
    workspace = sim._workspace
    monkeypatch.setattr(sim, "_workspace", lambda *args: made.append(args) or workspace(*args))
    streamed = similarity_matrix(acts, debiased=True, memory_limit_mb=0.2)
    assert streamed.params["exact"] and len(streamed.params["chunk_sizes"]) > 2 and len(made) == 1
    np.testing.assert_allclose(streamed.values, similarity_matrix(acts, debiased=True).values, rtol=0, atol=1e-12)
    flat, views = sim._workspace([(3, 5), (7,), (2, 2)], 100, torch.device("cpu"))
    assert flat.numel() == 100 and [v.shape for v in views] == [(3, 5), (7,), (2, 2)]
    assert [v.data_ptr() - flat.data_ptr() for v in views] == [0, 128, 192]  # 64-byte steps, as torch aligns
    bad = x.copy()
    bad[450, 3] = np.nan  # in a later chunk
    with pytest.raises(DataError, match=r"similarity_matrix: 'acts_a\['x'\]' contains 1 NaN or infinite value"):
        similarity_matrix({"x": bad, "y": acts["y"]}, memory_limit_mb=0.2)


def test_linear_cka_centres_its_own_copies_in_place_and_leaves_inputs_unchanged():
    n = 500
    assert sim._linear_cka_bytes(n, [500], [500], True, True, False) == sim._linear_cka_bytes(
        n, [500], [500], True, True, True) + 8 * n * 500  # Gram form: a float64 input is centred into a new array
    rng = _rng(1)
    x64 = rng.normal(size=(n, 40)) + 3.0
    inputs = {"a": x64, "b": torch.from_numpy(x64 @ rng.normal(size=(40, 60))), "c": x64.astype(np.float32),
              "d": torch.from_numpy(x64[:, :7].copy()).float()}
    copies = {k: np.array(np.asarray(v), copy=True) for k, v in inputs.items()}
    values = similarity_matrix(inputs, measure="linear_cka").values
    for k, v in inputs.items():
        np.testing.assert_array_equal(np.asarray(v), copies[k])
    np.testing.assert_allclose(values[0], [linear_cka(x64, np.asarray(v)) for v in inputs.values()], atol=1e-12)
    assert sim._converted(x64.astype(np.float32), torch.device("cpu")) and not sim._converted(x64, torch.device("cpu"))


def test_cca_keeps_the_centred_data_only_for_pwcca_and_no_view_of_a_larger_basis():
    rng = _rng(2)
    x = (rng.normal(size=(200, 10)) @ rng.normal(size=(10, 50))).astype(np.float32)  # rank 10 of 50
    xt = torch.from_numpy(x).double()
    for kind in ("svcca", "mean", "pwcca"):
        prep = sim._cca_prep(xt, "x", "cca_similarity", kind, 0.99, sim._input_eps(x))
        assert (prep.centred is not None) == (kind == "pwcca"), kind
        assert prep.basis.untyped_storage().nbytes() == 8 * prep.basis.numel(), kind  # not all 50 columns of u
    y = rng.normal(size=(200, 6))
    for kind in ("svcca", "mean", "pwcca"):
        matrix = similarity_matrix({"x": x}, {"y": y}, measure="cca_similarity", kind=kind).values
        assert matrix[0, 0] == pytest.approx(cca_similarity(x, y, kind=kind), abs=1e-12), kind


@pytest.mark.parametrize("measure, option, value, uses", [
    ("linear_cka", "sigma", 0.2, "'rbf_cka'"),
    ("procrustes_distance", "debiased", True, "'linear_cka' or 'rbf_cka'"),
    ("rsa", "kind", "pwcca", "'cca_similarity'"),
    ("cca_similarity", "rdm", "euclidean", "'rsa'"),
])
def test_an_option_the_measure_does_not_use_is_refused(measure, option, value, uses):
    x = {"a": _rng().normal(size=(30, 4))}
    # it was ignored: a "debiased" Procrustes distance looked computed as asked
    with pytest.raises(ParameterError, match=rf"^similarity_matrix: '{option}' applies to measure {uses} only, so measure "
                                             rf"'{measure}' would ignore {option}={value!r}; leave it out"):
        similarity_matrix(x, x, measure=measure, **{option: value})
    with pytest.raises(ParameterError, match=rf"^chance_level: '{option}' applies to measure"):
        chance_level(x, x, measure=measure, **{option: value})


def test_variance_with_a_cca_summary_that_keeps_every_direction_is_refused():
    rng = _rng()
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 4))
    for call in (lambda: cca_similarity(x, y, kind="pwcca", variance=0.9),
                 lambda: similarity_matrix({"a": x}, {"b": y}, measure="cca_similarity", kind="mean", variance=0.9)):
        with pytest.raises(ParameterError, match=r"'variance' applies to kind 'svcca' only \(the other summaries keep every "
                                                 r"direction\), so kind '(pwcca|mean)' would ignore variance=0.9; leave it out, "
                                                 r"or choose kind='svcca'\.$"):
            call()
    assert cca_similarity(x, y, kind="pwcca") == cca_similarity(x, y, kind="pwcca", variance=0.99)
