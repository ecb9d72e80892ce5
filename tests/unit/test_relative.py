"""Relative representations: references, invariances, the bundled MLPs (agreement, stitching), errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests import reference as ref
from workbench.analyses.relative import (
    cross_model_agreement,
    relative_agreement_by_layer,
    relative_comparison,
    relative_representation,
    select_anchors,
    stitch,
)
from workbench.errors import DataError, ParameterError, UnknownLayerError

HIDDEN = ["fc1", "relu1", "fc2", "relu2"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthogonal(d: int, seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------------------------
# anchors and relative coordinates


@pytest.mark.parametrize("center", [False, True])
def test_relative_representation_matches_loop_reference(center):
    x = _rng().normal(size=(30, 5)) + 1.0
    x[4] = 0.0  # no direction: defined as an all-zero relative vector (without centring)
    anchors = np.array([0, 7, 12, 29])
    got = relative_representation(x, anchors, center=center)
    assert got.shape == (30, 4)
    np.testing.assert_allclose(got, ref.relative_reference(x, x[anchors], center=center), atol=1e-12)
    np.testing.assert_allclose(relative_representation(x, x[anchors], center=center), got, atol=1e-12)


def test_relative_representation_invariant_to_angle_preserving_maps():
    x = _rng().normal(size=(40, 6))
    anchors = select_anchors(x, 8, seed=1)
    moved = 2.5 * x @ _orthogonal(6)
    np.testing.assert_allclose(relative_representation(moved, anchors), relative_representation(x, anchors), atol=1e-12)
    shifted = moved + 3.0  # a translation changes cosines unless the anchors' mean is removed
    np.testing.assert_allclose(
        relative_representation(shifted, anchors, center=True),
        relative_representation(x, anchors, center=True),
        atol=1e-12,
    )
    assert not np.allclose(relative_representation(shifted, anchors), relative_representation(x, anchors), atol=1e-3)


@pytest.mark.parametrize("method", ["random", "fps", "kmeans"])
def test_select_anchors_distinct_in_range_and_seeded(method):
    x = _rng().normal(size=(50, 3))
    a = select_anchors(x, 12, method=method, seed=3)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 12 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, select_anchors(x, 12, method=method, seed=3))
    assert select_anchors(x, 50, method=method).shape == (50,)


def test_fps_reaches_the_extremes_and_kmeans_one_anchor_per_cluster():
    line = np.linspace(0.0, 1.0, 101)[:, None]
    assert set(select_anchors(line, 3, method="fps", seed=0).tolist()) >= {0, 100}
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    blobs = np.repeat(centres, 25, axis=0) + 0.1 * _rng().normal(size=(100, 2))
    chosen = select_anchors(blobs, 4, method="kmeans", seed=0)
    assert sorted((chosen // 25).tolist()) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# agreement


def test_agreement_matches_loop_reference():
    a = _rng().normal(size=(50, 6))
    b = a + 0.4 * _rng(1).normal(size=(50, 6))
    result = cross_model_agreement(a, b, k=5)
    jaccard, rr, cosine = ref.retrieval_reference(a, b, 5)
    np.testing.assert_allclose(result.jaccard, jaccard, atol=1e-12)
    np.testing.assert_allclose(result.reciprocal_rank, rr, atol=1e-12)
    np.testing.assert_allclose(result.cosine, cosine, atol=1e-12)
    assert result.mean_jaccard == pytest.approx(jaccard.mean()) and result.mrr == pytest.approx(rr.mean())
    assert result.absolute_jaccard is None and result.absolute_comparable is False


def test_agreement_identical_spaces_is_perfect():
    a = _rng().normal(size=(40, 4))
    result = cross_model_agreement(a, a, k=5)
    assert result.mean_jaccard == pytest.approx(1.0) and result.mrr == pytest.approx(1.0)
    assert result.mean_cosine == pytest.approx(1.0)


def test_rotated_space_agrees_in_relative_but_not_in_absolute_coordinates():
    x = _rng().normal(size=(200, 10))
    y = x @ _orthogonal(10, seed=4)
    result = relative_comparison(x, y, n_anchors=30, k=10, labels=np.arange(200) % 4)
    agreement = result.agreement
    assert agreement.mean_jaccard == pytest.approx(1.0) and agreement.mrr == pytest.approx(1.0)
    assert agreement.absolute_comparable and agreement.absolute_mean_jaccard < 0.3 and agreement.absolute_mrr < 0.3
    assert agreement.classes.tolist() == [0, 1, 2, 3] and agreement.class_jaccard.shape == (4,)
    assert result.relative_a.shape == (200, 30) and result.anchors.shape == (30,)
    json.dumps(result.to_dict())
    arrays = result.arrays()  # the nested agreement is exported with the comparison
    np.testing.assert_array_equal(arrays["agreement/jaccard"], agreement.jaccard)
    assert "relative_a" in arrays and "agreement/class_jaccard" in arrays


def test_absolute_agreement_is_none_when_widths_differ():
    a, b = _rng().normal(size=(30, 4)), _rng(1).normal(size=(30, 6))
    rel_a, rel_b = relative_representation(a, np.arange(5)), relative_representation(b, np.arange(5))
    result = cross_model_agreement(rel_a, rel_b, k=3, anchors=np.arange(5), absolute_a=a, absolute_b=b)
    assert result.absolute_comparable is False and result.absolute_mrr is None


def _chance_mrr(m: int) -> float:
    return sum(1.0 / r for r in range(1, m + 1)) / m  # mean of 1 / rank for a uniformly random rank among m


def test_independent_encoders_agree_at_chance_once_anchors_are_left_out():
    rng = _rng(11)
    x, w = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))  # two unrelated encoders of the same samples
    result = relative_comparison(x, w, n_anchors=64, k=10)
    agreement, m = result.agreement, 600 - 64
    for mrr in (agreement.mrr, agreement.absolute_mrr):
        assert mrr < 2 * _chance_mrr(m)
    for jaccard in (agreement.mean_jaccard, agreement.absolute_mean_jaccard):
        assert jaccard < 10 / m  # about k / (2m) by chance
    assert abs(agreement.mrr - agreement.absolute_mrr) < _chance_mrr(m)
    # with the anchors among the queries, each finds itself through its own column: far above chance
    inflated = cross_model_agreement(result.relative_a, result.relative_b, k=10)
    assert inflated.mrr > 4 * _chance_mrr(600)
    kept = cross_model_agreement(result.relative_a, result.relative_b, k=10, anchors=result.anchors, absolute_a=x,
                                 absolute_b=w)
    assert kept.mrr == pytest.approx(agreement.mrr) and kept.absolute_mrr == pytest.approx(agreement.absolute_mrr)
    np.testing.assert_array_equal(kept.samples, agreement.samples)
    layers = relative_agreement_by_layer({"l": x}, {"l": w}, n_anchors=64, k=10)
    assert layers.mrr[0] == pytest.approx(agreement.mrr) and layers.absolute_mrr[0] == pytest.approx(agreement.absolute_mrr)
    assert layers.jaccard[0] == pytest.approx(agreement.mean_jaccard)


def test_a_rotated_and_scaled_copy_still_agrees_perfectly_without_the_anchors():
    x = _rng().normal(size=(150, 12))
    result = relative_comparison(x, 3.0 * x @ _orthogonal(12, seed=2), n_anchors=40, method="fps", k=10)
    assert result.agreement.mrr == pytest.approx(1.0) and result.agreement.mean_jaccard == pytest.approx(1.0)
    layers = relative_agreement_by_layer({"l": x}, {"l": 3.0 * x @ _orthogonal(12, seed=2)}, n_anchors=40, k=10)
    assert layers.mrr[0] == pytest.approx(1.0) and layers.jaccard[0] == pytest.approx(1.0)


def test_the_anchors_are_left_out_of_the_recorded_samples():
    x = _rng().normal(size=(80, 6))
    labels = np.arange(80) % 4
    result = relative_comparison(x, x @ _orthogonal(6), n_anchors=20, k=5, labels=labels, seed=3)
    agreement = result.agreement
    np.testing.assert_array_equal(agreement.samples, np.setdiff1d(np.arange(80), result.anchors))
    assert agreement.n_samples == result.n_samples == 60 and agreement.jaccard.shape == (60,)
    assert agreement.absolute_reciprocal_rank.shape == (60,) and result.relative_a.shape == (80, 20)
    assert result.params["n_anchors"] == 20 and agreement.params["n_anchors"] == 20
    assert "among the 60 samples that are not anchors (20 left out)" in result.estimator
    counts = np.bincount(labels[agreement.samples])
    np.testing.assert_allclose(agreement.class_jaccard * counts, np.bincount(labels[agreement.samples], agreement.jaccard))
    plain = cross_model_agreement(x, x, k=5)  # no anchors among the samples: every sample is scored
    assert plain.n_samples == 80 and plain.params == {"k": 5, "n_anchors": 0}
    layers = relative_agreement_by_layer({"l1": x, "l2": x[:, :3]}, {"l1": x, "l2": x[:, 3:]}, n_anchors=20, k=5)
    assert layers.n_samples == 60 and layers.n_anchors == 20
    assert "left out of the scores; among the 60 other samples" in layers.estimator


# ---------------------------------------------------------------------------------------------
# bundled digits MLPs


@pytest.fixture(scope="module")
def mlp_activations(sample_model, digits_test, digits_train):
    from workbench import extract

    layers = HIDDEN + ["out"]
    return {
        (name, split): extract(sample_model(name), data, layers)
        for name in ("mlp_seed0", "mlp_seed1")
        for split, data in (("test", digits_test), ("train", digits_train))
    }


def test_relative_jaccard_beats_absolute_on_mlps_from_different_seeds(mlp_activations):
    a, b = mlp_activations[("mlp_seed0", "test")], mlp_activations[("mlp_seed1", "test")]
    result = relative_agreement_by_layer(a, b, layers=HIDDEN, n_anchors=64, k=10, seed=0)
    assert result.layers_a == tuple(HIDDEN) and result.absolute_comparable.all()
    assert result.model_a == "mlp_seed0" and result.n_samples == 450 - 64 and result.params["n_anchors"] == 64
    assert (result.jaccard > result.absolute_jaccard).all()
    assert (result.jaccard > 0.3).all() and (result.absolute_jaccard < 0.1).all()
    assert (result.mrr > result.absolute_mrr).all()


def test_zero_shot_stitching_between_mlps_from_different_seeds(mlp_activations, digits_test, digits_train):
    tr_a, tr_b = mlp_activations[("mlp_seed0", "train")], mlp_activations[("mlp_seed1", "train")]
    te_a, te_b = mlp_activations[("mlp_seed0", "test")], mlp_activations[("mlp_seed1", "test")]
    result = stitch(
        tr_a["relu2"],
        tr_b["relu2"],
        te_a["relu2"],
        te_b["relu2"],
        digits_train.y,
        digits_test.y,
        n_anchors=64,
        epochs=30,
        logits_a=te_a["out"],
        logits_b=te_b["out"],
        seed=0,
    )
    own = result.own_accuracy
    assert own is not None and (own > 0.95).all()
    stitched = [result.relative_accuracy[1, 0], result.relative_accuracy[0, 1]]
    assert min(stitched) > 0.9 and min(stitched) > own.min() - 0.05
    assert np.diag(result.relative_accuracy).min() > 0.9
    assert result.absolute_accuracy is not None
    assert np.diag(result.absolute_accuracy).min() > 0.9  # absolute heads work on their own model...
    assert max(result.absolute_accuracy[1, 0], result.absolute_accuracy[0, 1]) < 0.3  # ...but not across models
    assert result.chance_accuracy == pytest.approx(0.1, abs=0.01)
    assert result.n_samples == 450 and result.n_train == 1347 - 64 and result.anchors.shape == (64,)
    from workbench.plots.similarity import stitching_bars

    fig = stitching_bars(result, name_a="s0", name_b="s1")
    own_lines = [t for t in fig.data if t.name.startswith("own head")]  # in the legend, not written over the bars
    assert [t.name for t in own_lines] == [f"own head of s0: {own[0]:.3f}", f"own head of s1: {own[1]:.3f}"]
    assert not [a for a in fig.layout.annotations if "own head" in (a.text or "")]
    assert own_lines[0].line.dash != own_lines[1].line.dash  # equal accuracies still show two lines
    assert [t.y[0] for t in fig.data if t.name.startswith("chance")] == [result.chance_accuracy]
    assert not [a for a in fig.layout.annotations if "chance" in (a.text or "")]


def test_stitching_is_reproducible_with_a_seed():
    rng = _rng()
    x_tr, x_te = rng.normal(size=(120, 5)), rng.normal(size=(40, 5))
    y_tr, y_te = (x_tr[:, 0] > 0).astype(int), (x_te[:, 0] > 0).astype(int)
    q = _orthogonal(5)
    first = stitch(x_tr, x_tr @ q, x_te, x_te @ q, y_tr, y_te, n_anchors=20, epochs=20, head="mlp", seed=2)
    second = stitch(x_tr, x_tr @ q, x_te, x_te @ q, y_tr, y_te, n_anchors=20, epochs=20, head="mlp", seed=2)
    np.testing.assert_array_equal(first.relative_accuracy, second.relative_accuracy)
    assert first.seed == 2 and first.params["head"] == "mlp" and first.own_accuracy is None
    # a rotated copy is stitched as well as the original
    assert first.relative_accuracy[1, 0] == pytest.approx(first.relative_accuracy[0, 0])


@pytest.mark.parametrize(("width_b", "n_heads"), [(5, 4), (3, 2)])
def test_stitching_reports_progress_per_training_step(width_b, n_heads):
    rng = _rng()
    x_tr, x_te = rng.normal(size=(120, 5)), rng.normal(size=(40, 5))
    y_tr, y_te = (x_tr[:, 0] > 0).astype(int), (x_te[:, 0] > 0).astype(int)
    b_tr, b_te = x_tr[:, :width_b] * 2.0, x_te[:, :width_b] * 2.0  # no absolute heads when the widths differ
    calls = []
    result = stitch(
        x_tr, b_tr, x_te, b_te, y_tr, y_te, n_anchors=20, epochs=7, seed=1, progress=lambda d, t: calls.append((d, t))
    )
    total = n_heads * 7
    assert calls == [(done, total) for done in range(1, total + 1)]
    plain = stitch(x_tr, b_tr, x_te, b_te, y_tr, y_te, n_anchors=20, epochs=7, seed=1)
    np.testing.assert_array_equal(result.relative_accuracy, plain.relative_accuracy)
    with pytest.raises(ParameterError, match=r"The 'progress' parameter of stitch must be a callable \(done, total\)"):
        stitch(x_tr, b_tr, x_te, b_te, y_tr, y_te, progress=3)


def test_stitching_with_sparse_labels_equals_stitching_with_class_indices():
    rng = _rng()
    x_tr, x_te = rng.normal(size=(120, 5)), rng.normal(size=(40, 5))
    y_tr, y_te = (x_tr[:, 0] > 0).astype(int), (x_te[:, 0] > 0).astype(int)
    q = _orthogonal(5)
    dense = stitch(x_tr, x_tr @ q, x_te, x_te @ q, y_tr, y_te, n_anchors=20, epochs=20, seed=1)
    sparse = stitch(x_tr, x_tr @ q, x_te, x_te @ q, 3 + y_tr * 10**8, 3 + y_te * 10**8, n_anchors=20, epochs=20, seed=1)
    np.testing.assert_array_equal(dense.relative_accuracy, sparse.relative_accuracy)  # a two-class head either way
    assert sparse.chance_accuracy == dense.chance_accuracy


def test_nan_labels_are_no_class():
    x = _rng().normal(size=(40, 6))
    labels = np.r_[np.nan, np.zeros(39)]
    with pytest.raises(DataError, match=r"relative_comparison: 'labels' contain 1 NaN or infinite value, which are no class"):
        relative_comparison(x, x, n_anchors=10, labels=labels)


# ---------------------------------------------------------------------------------------------
# errors: one test per message


def test_error_n_anchors_out_of_range():
    with pytest.raises(
        ParameterError, match=r"The 'n_anchors' parameter of select_anchors must be an int in \[1, 10\]. Got 11"
    ):
        select_anchors(np.eye(10), 11)


def test_error_unknown_anchor_method():
    with pytest.raises(
        ParameterError, match=r"The 'method' parameter of select_anchors must be one of 'random', 'fps', 'kmeans'"
    ):
        select_anchors(np.eye(10), 3, method="grid")


def test_error_anchor_indices():
    with pytest.raises(ParameterError, match=r"The 'anchors' indices of relative_representation must lie in \[0, 9\]"):
        relative_representation(np.eye(10), np.array([0, 10]))
    with pytest.raises(ParameterError, match=r"must be a non-empty 1-D array of integer sample indices"):
        relative_representation(np.eye(10), np.array([0.5, 1.0]))


def test_error_anchor_embeddings_of_other_width():
    with pytest.raises(DataError, match=r"'anchors' has 3 features but 'x' has 10"):
        relative_representation(np.eye(10), np.ones((2, 3)))


def test_error_zero_anchor():
    x = _rng().normal(size=(10, 3))
    x[2] = 0.0
    with pytest.raises(DataError, match=r"1 anchors \(positions \[1\]\) have an all-zero embedding"):
        relative_representation(x, np.array([0, 2]))


def test_error_relative_widths_differ():
    with pytest.raises(
        DataError, match=r"'rel_a' has 3 columns and 'rel_b' 4; relative representations must use the same anchors"
    ):
        cross_model_agreement(np.ones((10, 3)), np.ones((10, 4)))


def test_error_k_out_of_range():
    with pytest.raises(
        ParameterError, match=r"The 'k' parameter of cross_model_agreement must be an int in \[1, 9\]. Got 10"
    ):
        cross_model_agreement(np.eye(10), np.eye(10), k=10)


def test_error_only_one_absolute():
    with pytest.raises(
        ParameterError, match=r"Pass both 'absolute_a' and 'absolute_b' to cross_model_agreement, or neither"
    ):
        cross_model_agreement(np.eye(10), np.eye(10), k=2, absolute_a=np.eye(10))


def test_error_labels_wrong_length():
    with pytest.raises(DataError, match=r"'labels' has 3 entries but the activations have 10 samples"):
        cross_model_agreement(np.eye(10), np.eye(10), k=2, labels=[0, 1, 2])


def test_error_no_shared_layers_and_unknown_layer():
    a, b = {"fc1": np.eye(10)}, {"dense": np.eye(10)}
    with pytest.raises(
        DataError, match=r"the two models share no layer names .* pass layers=\[\('layer_of_a', 'layer_of_b'\)"
    ):
        relative_agreement_by_layer(a, b)
    with pytest.raises(UnknownLayerError, match=r"Unknown layer 'dens' in 'acts_b'. Did you mean 'dense'\?"):
        relative_agreement_by_layer(a, b, layers=[("fc1", "dens")])


def test_error_anchors_of_cross_model_agreement():
    with pytest.raises(ParameterError, match=r"The 'anchors' indices of cross_model_agreement must lie in \[0, 9\]"):
        cross_model_agreement(np.eye(10), np.eye(10), k=2, anchors=np.array([0, 10]))
    with pytest.raises(ParameterError, match=r"'anchors' parameter of cross_model_agreement must be a 1-D array of the"):
        cross_model_agreement(np.eye(10), np.eye(10), k=2, anchors=np.array([0.5]))
    with pytest.raises(ParameterError, match=r"The 'anchors' of cross_model_agreement leave 1 of the 10 samples to score"):
        cross_model_agreement(np.eye(10), np.eye(10), k=1, anchors=np.arange(9))
    with pytest.raises(
        ParameterError,
        match=r"The 'k' parameter of cross_model_agreement must be an int in \[1, 6\], since the 7 samples that are not "
        r"among the 3 anchors each retrieve k of the others; lower k or n_anchors. Got 7",
    ):
        cross_model_agreement(np.eye(10), np.eye(10), k=7, anchors=[0, 1, 2])


def test_error_n_anchors_and_k_leave_too_few_samples():
    x = _rng().normal(size=(40, 4))
    with pytest.raises(
        ParameterError,
        match=r"The 'n_anchors' parameter of relative_comparison must be an int in \[1, 38\] for 40 samples, since anchors "
        r"are left out of the agreement scores and 2 other samples must remain; choose fewer anchors. Got 40",
    ):
        relative_comparison(x, x, n_anchors=40, k=1)
    with pytest.raises(
        ParameterError, match=r"The 'k' parameter of relative_comparison must be an int in \[1, 9\], since the 10 samples"
    ):
        relative_comparison(x, x, n_anchors=30, k=10)
    with pytest.raises(DataError, match=r"relative_comparison: the activations have 2 samples, but the agreement scores"):
        relative_comparison(x[:2], x[:2], n_anchors=1, k=1)


def test_error_layers_of_different_lengths_are_refused_before_any_work():
    rng = _rng(11)
    a = {"l1": rng.normal(size=(100, 5)), "l2": rng.normal(size=(30, 5))}
    b = {name: rng.normal(size=v.shape) for name, v in a.items()}
    done = []
    message = (r"relative_agreement_by_layer: acts_a\['l2'\] has 30 samples but acts_a\['l1'\] has 100; every compared "
               r"layer must hold the activations of the same samples")
    for kwargs in ({"n_anchors": 64}, {"n_anchors": 10, "k": 50}):
        with pytest.raises(DataError, match=message):
            relative_agreement_by_layer(a, b, progress=lambda i, total: done.append(i), **kwargs)
    assert done == []
    b["l2"] = b["l2"][:20]
    with pytest.raises(DataError, match=r"acts_b\['l2'\] has 20 samples but acts_a\['l1'\] has 100"):
        relative_agreement_by_layer({"l1": a["l1"], "l2": a["l1"]}, b)


def test_error_n_anchors_and_k_of_relative_agreement_by_layer():
    rng = _rng()
    a = {"l1": rng.normal(size=(100, 5)), "l2": rng.normal(size=(100, 3))}
    done = []
    with pytest.raises(
        ParameterError, match=r"The 'n_anchors' parameter of relative_agreement_by_layer must be an int in \[1, 98\] for "
        r"100 samples.* Got 99",
    ):
        relative_agreement_by_layer(a, a, n_anchors=99, progress=lambda i, total: done.append(i))
    with pytest.raises(
        ParameterError, match=r"The 'k' parameter of relative_agreement_by_layer must be an int in \[1, 89\], since the 90 "
        r"samples that are not among the 10 anchors each retrieve k of the others; lower k or n_anchors. Got 90",
    ):
        relative_agreement_by_layer(a, a, n_anchors=10, k=90, progress=lambda i, total: done.append(i))
    assert done == []
    assert relative_agreement_by_layer(a, a, n_anchors=10, k=89).jaccard.tolist() == pytest.approx([1.0, 1.0])


def test_error_stitch_inputs():
    x = _rng().normal(size=(30, 4))
    y = np.arange(30) % 3
    with pytest.raises(DataError, match=r"stitch: 'train_b' has 4 features but 'test_b' has 2"):
        stitch(x, x, x, x[:, :2], y, y)
    with pytest.raises(
        DataError, match=r"stitch: 'test_labels' must be non-negative integer class labels. Got dtype float64"
    ):
        stitch(x, x, x, x, y, y + 0.5)
    with pytest.raises(ParameterError, match=r"Pass both 'logits_a' and 'logits_b' to stitch, or neither"):
        stitch(x, x, x, x, y, y, logits_a=x)
    with pytest.raises(
        ParameterError, match=r"The 'head' parameter of stitch must be one of 'linear', 'mlp'. Got 'svm'"
    ):
        stitch(x, x, x, x, y, y, head="svm")
    with pytest.raises(ParameterError, match=r"The 'epochs' parameter of stitch must be an int in \[1, 10000\]. Got 0"):
        stitch(x, x, x, x, y, y, epochs=0)


def test_stitch_refuses_training_labels_of_one_class():
    # the QA case returned a relative accuracy of 0.38 from heads that had only ever seen class 0
    rng = _rng()
    x_tr, x_te = rng.normal(size=(100, 6)), rng.normal(size=(40, 6))
    y_te = rng.integers(0, 3, 40)
    q = _orthogonal(6)
    with pytest.raises(DataError, match=r"stitch: 'train_labels' hold one class only \(0\); a head needs at least two "
                                        r"classes to tell apart\."):
        stitch(x_tr, x_tr @ q, x_te, x_te @ q, np.zeros(100, int), y_te, n_anchors=20, epochs=5)
    # two classes, but every sample of the second is an anchor: the heads would learn from one class
    anchors = select_anchors(x_tr, 20, seed=0)
    y_tr = np.zeros(100, int)
    y_tr[anchors[:3]] = 2
    with pytest.raises(DataError, match=r"stitch: the 80 training samples that are not anchors, which the heads learn from, "
                                        r"hold one class only \(0\); a head needs at least two classes to tell apart, so "
                                        r"choose fewer anchors \(n_anchors\) or give more training samples\."):
        stitch(x_tr, x_tr @ q, x_te, x_te @ q, y_tr, y_te, n_anchors=20, epochs=5)
    y_tr[np.setdiff1d(np.arange(100), anchors)[0]] = 2  # one sample of class 2 to learn from is enough
    assert stitch(x_tr, x_tr @ q, x_te, x_te @ q, y_tr, y_te, n_anchors=20, epochs=5).n_train == 80


def test_inputs_not_modified_and_tensors_accepted():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    rel = relative_representation(x, np.array([0, 1, 2]), center=True)
    assert isinstance(rel, np.ndarray) and rel.dtype == np.float64
    assert torch.equal(x, before)


def test_fps_anchors_are_distinct_samples_even_among_duplicate_rows():
    x = np.repeat(_rng().normal(size=(3, 4)), 10, axis=0)  # 30 samples, 3 distinct points
    anchors = select_anchors(x, 5, method="fps")
    assert len(set(anchors.tolist())) == 5
    assert len({tuple(x[i]) for i in anchors.tolist()[:3]}) == 3  # the first three cover the three distinct points


def test_relative_figures_name_the_classes():
    from workbench.analyses.relative import relative_comparison
    from workbench.plots.similarity import class_agreement_bars, relative_scatter

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8))
    labels = np.arange(60) % 3
    detail = relative_comparison(x, x @ rng.standard_normal((8, 8)), n_anchors=10, k=5, labels=labels)
    names = ("cat", "dog", "eel")
    scatter = relative_scatter(detail, class_names=names)
    assert [t.name for t in scatter.data[:3]] == ["class cat", "class dog", "class eel"]
    assert list(class_agreement_bars(detail.agreement, class_names=names).data[0].x) == list(names)
    assert [t.name for t in relative_scatter(detail).data[:3]] == ["class 0", "class 1", "class 2"]


def test_a_sample_tied_with_every_row_does_not_get_the_best_rank():
    from workbench.analyses.relative import _retrieval

    rng = np.random.default_rng(0)
    a, b = torch.from_numpy(rng.normal(size=(40, 5))), torch.from_numpy(rng.normal(size=(40, 5)))
    a[:10] = 0.0  # all-zero rows: cosine 0 with every row of B
    _, reciprocal, _ = _retrieval(a, b, 5)
    np.testing.assert_allclose(reciprocal[:10].numpy(), 1 / (1 + 39 / 2))  # the middle of 40 tied ranks


def test_a_random_encoder_stitches_at_chance(sample_model, digits_train, digits_test):
    from workbench import extract

    model = sample_model("mlp_narrow_seed0")
    tr, te = extract(model, digits_train, ["relu2"])["relu2"], extract(model, digits_test, ["relu2"])["relu2"]
    rng = np.random.default_rng(0)
    noise_tr, noise_te = rng.standard_normal((tr.shape[0], 64)), rng.standard_normal((te.shape[0], 64))
    result = stitch(tr, noise_tr, te, noise_te, digits_train.y, digits_test.y, n_anchors=256, epochs=60)
    assert result.relative_accuracy[0, 0] > 0.9  # A on its own head
    assert result.relative_accuracy[0, 1] < result.chance_accuracy + 0.08  # A on the head of noise: chance


def test_a_relative_comparison_has_key_numbers_for_reports():
    from workbench.registry import summarize

    x = _rng().normal(size=(120, 8))
    result = relative_comparison(x, x @ _orthogonal(8, seed=1), n_anchors=20, k=5)
    numbers = summarize(result)["relative agreement"]
    assert numbers["Jaccard@5 (relative)"] == pytest.approx(1.0) and numbers["MRR (relative)"] == pytest.approx(1.0)
    assert numbers["Jaccard@5 (absolute)"] == result.agreement.absolute_mean_jaccard
