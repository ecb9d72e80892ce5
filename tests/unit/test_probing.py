"""Probing: known answers, scikit-learn on the same folds, control tasks, moment probe, errors, plots."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch

from workbench.analyses import probing
from workbench.analyses.probing import ProbingResult, moment_probe, probe_layers
from workbench.errors import DataError, ParameterError
from workbench.plots._style import figure_title
from workbench.plots.probing import probe_confusion, probe_profile, probe_rows


def _blobs(n: int = 240, d: int = 16, n_classes: int = 4, separation: float = 8.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % n_classes
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


@pytest.fixture(scope="module")
def digits_arrays():
    from workbench import load_dataset

    data = load_dataset("digits", split="test")
    return data.x.numpy(), data.y.numpy()


# ---------------------------------------------------------------------------------------------
# known answers


def test_separable_classes_are_decoded_and_selective():
    x, y = _blobs()
    result = probe_layers({"x": x}, y, seed=0)
    assert result.metric == "accuracy"
    assert result.score[0] > 0.97
    assert result.control_score[0] < 0.45  # held-out control labels are independent of the sample: chance
    assert result.selectivity[0] > 0.5
    assert result.chance == pytest.approx(0.25)
    assert result.macro_f1[0] > 0.97


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    y = rng.integers(0, 3, size=300)
    result = probe_layers({"noise": x}, y, seed=0)
    assert abs(result.score[0] - 1 / 3) < 0.1
    assert abs(result.selectivity[0]) < 0.15


def test_linear_probe_matches_sklearn_logistic_regression_on_the_same_folds(digits_arrays):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = digits_arrays
    result = probe_layers({"pixels": x}, y, control=False, seed=3)
    accuracies, f1s = [], []
    for fold in range(5):
        test = result.folds == fold
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[~test], y[~test])
        predicted = model.predict(x[test])
        accuracies.append(np.mean(predicted == y[test]))
        f1s.append(f1_score(y[test], predicted, average="macro"))
    assert np.abs(result.fold_scores[0] - accuracies).max() <= 0.02
    assert abs(result.score[0] - np.mean(accuracies)) <= 0.01
    assert abs(result.macro_f1[0] - np.mean(f1s)) <= 0.02
    assert np.bincount(result.folds).min() >= 89  # stratified, 450 / 5


@pytest.mark.parametrize("c", [1.0, 0.01])
def test_binary_linear_probe_has_sklearns_penalty(c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 6))
    y = (x[:, 0] + 0.5 * rng.normal(size=240) > 0.8).astype(int)
    result = probe_layers({"a": x}, y, cv=3, c=c, control=False)
    held_out, train = [], []
    for fold in range(3):
        test = result.folds == fold
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, tol=1e-12, max_iter=10_000)).fit(x[~test], y[~test])
        held_out.append(np.mean(model.predict(x[test]) == y[test]))
        train.append(np.mean(model.predict(x[~test]) == y[~test]))
    # a softmax over two classes penalised with c is scikit-learn's binomial problem with 2c: 0.9375 on fold 0 at c = 1
    assert result.fold_scores[0].tolist() == held_out
    assert result.train_score[0] == pytest.approx(np.mean(train), abs=1e-12)


def test_macro_f1_and_confusion_agree_with_sklearn_definitions():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    y_true = torch.from_numpy(rng.integers(0, 4, size=(3, 50)))
    y_pred = torch.from_numpy(np.where(rng.random((3, 50)) < 0.6, y_true.numpy(), rng.integers(0, 4, size=(3, 50))))
    rows = torch.ones((3, 50), dtype=torch.bool)
    confusion = probing._confusion(y_true, y_pred, rows, 4)
    from sklearn.metrics import confusion_matrix

    for f in range(3):
        assert np.array_equal(confusion[f].numpy(), confusion_matrix(y_true[f], y_pred[f], labels=range(4)))
    expected = [f1_score(y_true[f], y_pred[f], average="macro") for f in range(3)]
    assert np.allclose(probing._macro_f1(confusion), expected)


def test_confusion_counts_every_held_out_prediction_once(digits_arrays):
    x, y = digits_arrays
    result = probe_layers({"pixels": x}, y, control=False)
    confusion = result.confusion[0]
    assert confusion.shape == (10, 10) and confusion.sum() == len(y)
    assert np.array_equal(confusion.sum(axis=1), np.bincount(y))
    pooled = np.trace(confusion) / len(y)
    weighted = np.sum(result.fold_scores[0] * np.bincount(result.folds)) / len(y)
    assert pooled == pytest.approx(weighted)


def test_ridge_probe_matches_sklearn_and_gives_r2():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 12))
    target = x @ rng.normal(size=12) + 0.3 * rng.normal(size=200)
    result = probe_layers({"x": x}, target, seed=0)
    assert result.metric == "r2" and result.macro_f1 is None and result.confusion is None and result.chance == 0.0
    expected = [
        r2_score(
            target[result.folds == f],
            make_pipeline(StandardScaler(), Ridge(alpha=1.0))
            .fit(x[result.folds != f], target[result.folds != f])
            .predict(x[result.folds == f]),
        )
        for f in range(5)
    ]
    assert np.allclose(result.fold_scores[0], expected, atol=1e-5)
    assert result.score[0] > 0.9
    assert result.control_score[0] < 0.1


def test_regression_folds_keep_two_test_samples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    target = x @ np.array([1.0, 2.0, 3.0]) + 0.01 * rng.normal(size=30)
    assert probe_layers({"x": x}, target, cv=15, control=False).score[0] > 0.95  # every test fold has two samples
    with pytest.raises(ParameterError, match=r"probe_layers: cv=16 folds of 30 samples leave test folds of one sample, "
                                             r"where R\^2 is undefined; use cv <= 15\."):
        probe_layers({"x": x}, target, cv=16, control=False)


def test_control_task_with_repeated_types_follows_hewitt_and_liang():
    # Features identify the sample's type (as a word embedding identifies the word); the control label is a
    # random function of the type, so a probe can learn it on held-out samples of seen types.
    rng = np.random.default_rng(5)
    n_types, per_type = 12, 20
    types = np.repeat(np.arange(n_types), per_type)
    codes = rng.normal(size=(n_types, 24)) * 3.0
    x = (codes[types] + 0.3 * rng.normal(size=(len(types), 24))).astype(np.float32)
    y = types % 3  # the property: a function of the type, too
    result = probe_layers({"x": x}, y, groups=types, seed=0)
    assert result.score[0] > 0.95
    assert result.control_score[0] > 0.9  # the probe also memorises the control task: low selectivity
    assert result.selectivity[0] < 0.1
    assert result.params["control_types"] == "groups"
    without = probe_layers({"x": x}, y, seed=0)
    assert without.control_score[0] < 0.6


def test_mlp_probe_reads_a_nonlinear_code_the_linear_probe_misses():
    rng = np.random.default_rng(6)
    signs = rng.choice([-1.0, 1.0], size=(160, 2))
    x = np.concatenate([signs + 0.2 * rng.normal(size=(160, 2)), 0.2 * rng.normal(size=(160, 2))], axis=1)
    y = (signs[:, 0] * signs[:, 1] > 0).astype(int)  # XOR of the two signs
    linear = probe_layers({"x": x}, y, control=False)
    mlp = probe_layers({"x": x}, y, probe="mlp", control=False)
    assert linear.score[0] < 0.7
    assert mlp.score[0] > 0.9
    assert "MLP probe" in mlp.estimator


def test_mlp_probe_regression():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(150, 3))
    target = np.sin(2 * x[:, 0]) + x[:, 1] ** 2
    result = probe_layers({"x": x}, target, probe="mlp", control=False)
    assert result.metric == "r2" and result.score[0] > 0.6


def test_fold_standardisation_uses_training_rows_only():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 5)) * [1, 2, 3, 4, 5] + 10
    x[:8, 4] = 100.0  # held out in fold 0 only: must not move fold 0's statistics
    folds = np.arange(40) // 8
    train = torch.from_numpy(folds[None, :] != np.arange(5)[:, None])
    centred, mean, scale = probing._fold_standardisation(torch.from_numpy(x), train, torch.device("cpu"))
    centre = x.mean(0)
    for f in range(5):
        rows = folds != f
        assert np.allclose(mean[f].numpy() + centre, x[rows].mean(0))
        assert np.allclose(1.0 / scale[f].numpy(), x[rows].std(0))


def test_feature_constant_on_training_rows_gets_zero_weight():
    x, y = _blobs(n=100, d=4)
    spike = np.zeros((100, 1), dtype=np.float32)
    spike[0] = 1e6  # constant (zero) on the training rows of the fold that holds out sample 0
    result = probe_layers({"x": np.concatenate([x, spike], axis=1)}, y, control=False)
    plain = probe_layers({"x": x}, y, control=False)
    fold = result.folds[0]
    assert np.isfinite(result.score).all()
    assert result.fold_scores[0, fold] == pytest.approx(plain.fold_scores[0, fold])


def test_a_large_offset_does_not_quantise_the_features():
    # Features near 1e4 that vary by 1e-3 keep only ~3 digits in float32: centring must come first.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.standard_normal(120) > 0).astype(int)
    plain = probe_layers({"l": x * 1e-3}, y, cv=4, control=False)
    offset = probe_layers({"l": x * 1e-3 + 1e4}, y, cv=4, control=False)
    np.testing.assert_array_equal(offset.fold_scores, plain.fold_scores)
    assert offset.score[0] == pytest.approx(104 / 120)  # scikit-learn on the same folds
    tokens = rng.standard_normal((120, 3, 6))
    plain = moment_probe({"s": tokens * 1e-3}, y, rank=2, cv=4, control=False)
    offset = moment_probe({"s": tokens * 1e-3 + 1e4}, y, rank=2, cv=4, control=False)
    np.testing.assert_array_equal(offset.fold_scores, plain.fold_scores)


def test_tiny_activations_are_probed_as_at_normal_scale():
    # values near or below float32's smallest numbers (1.2e-38 normal, 1.4e-45 subnormal) made L-BFGS overflow or
    # underflowed to 0 (majority-class accuracy); each feature is scaled by a power of two in float64 first
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8))
    y = rng.integers(0, 3, 120)
    separable = np.c_[y, x]
    for layer in (separable, x):
        plain = probe_layers({"a": layer}, y)
        for factor in (1e-38, 1e-40, 1e-46, 1e-300, 1e-320):  # the last below float64's normal numbers too
            tiny = probe_layers({"a": layer * factor}, y)
            np.testing.assert_array_equal(tiny.fold_scores, plain.fold_scores)
            np.testing.assert_array_equal(tiny.control_score, plain.control_score)
    assert probe_layers({"a": separable * 1e-46}, y).score[0] == 1.0
    assert probe_layers({"a": (separable * 1e-40).astype(np.float32)}, y).score[0] == 1.0  # float32 subnormals
    mixed = separable.copy()
    mixed[:, 0] *= 1e-60  # one feature far below the others: standardised like them
    assert probe_layers({"a": mixed}, y).score[0] == 1.0
    tokens = rng.standard_normal((120, 3, 6))
    plain = moment_probe({"s": tokens}, y, rank=2, cv=4, control=False)
    tiny = moment_probe({"s": tokens * 1e-40}, y, rank=2, cv=4, control=False)  # token variances near 1e-80
    np.testing.assert_array_equal(tiny.fold_scores, plain.fold_scores)
    # the scaling is by powers of two: exact, so a layer scaled by one gives the same bits
    centred = probing._centred_float32(torch.from_numpy(x), "x", "probe_layers")
    assert torch.equal(probing._centred_float32(torch.from_numpy(x * 2.0**-140), "x", "probe_layers"), centred)
    largest = centred.abs().amax(0)
    assert bool(((largest >= 0.5) & (largest <= 1.0)).all())


def test_copies_of_a_sample_are_held_out_in_one_fold():
    # 40 distinct samples, 3 copies each, random labels: a probe tested on copies of its training samples read the
    # labels it memorised (accuracy near 1); with the copies held out together it sits at chance
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((40, 60))
    sample = np.repeat(np.arange(40), 3)
    x, y = distinct[sample], (np.arange(40) % 2)[sample]
    result = probe_layers({"a": x, "b": torch.from_numpy(x * 2)}, y, seed=1)
    for s in range(40):
        assert len(set(result.folds[sample == s])) == 1  # every copy in its original's fold
    assert result.score.max() < 0.75
    assert result.params["copies"] == 80
    assert "5-fold stratified group CV (the 80 of the 120 samples that copy another are held out in its fold)" in result.estimator
    # rows equal in one layer but not in another come from different inputs: no copies
    other = x.copy()
    other[::3] += 1.0
    distinct_inputs = probe_layers({"a": x, "b": other}, y, control=False)
    assert distinct_inputs.params["copies"] == 40 and "group CV" in distinct_inputs.estimator
    none = probe_layers({"a": x[::3]}, y[::3], control=False)
    assert none.params["copies"] == 0 and "group" not in none.estimator
    # the regression folds keep copies together too
    target = distinct[:, 0][sample] + 0.1 * distinct[:, 1][sample]
    regression = probe_layers({"a": x}, target, control=False)
    assert regression.params["copies"] == 80 and "5-fold group CV" in regression.estimator
    for s in range(40):
        assert len(set(regression.folds[sample == s])) == 1
    with pytest.raises(ParameterError, match=r"probe_layers: cv=25 folds of 40 distinct samples \(the 80 copies among the 120 "
                                             r"are held out with their original\) leave test folds of one distinct sample, "
                                             r"where R\^2 is undefined; use cv <= 20\."):
        probe_layers({"a": x}, target, cv=25, control=False)


def test_copies_share_their_control_label():
    y = np.arange(30) % 3
    group = np.repeat(np.arange(10), 3)
    targets = probing._prepare_targets(None, y, 30, cv=3, control=True, seed=0, groups=None, func="probe_layers",
                                       copies=lambda: group)
    for g in range(10):
        assert len(set(targets.control[group == g])) == 1
    assert targets.copies == 20
    plain = probing._prepare_targets(None, y, 30, cv=3, control=True, seed=0, groups=None, func="probe_layers")
    without = probing._prepare_targets(None, y, 30, cv=3, control=True, seed=0, groups=None, func="probe_layers",
                                       copies=lambda: np.arange(30))
    np.testing.assert_array_equal(without.control, plain.control)  # distinct samples: the control task as before
    np.testing.assert_array_equal(without.folds, plain.folds)


def test_moment_probe_finds_copies_of_token_sequences_up_to_padding():
    rng = np.random.default_rng(0)
    tokens = np.repeat(rng.standard_normal((20, 4, 3)), 2, axis=0)
    mask = np.ones((40, 4), bool)
    mask[::2, 3] = False
    tokens[::2, 3] = 7.0  # padding of one copy differs from the other's real token: not a copy
    y = np.repeat(np.arange(20) % 2, 2)
    assert moment_probe({"s": tokens}, y, mask=mask, rank=2, cv=4, control=False).params["copies"] == 0
    mask[1::2, 3] = False  # now both copies pad the last token, whatever it holds
    result = moment_probe({"s": tokens}, y, mask=mask, rank=2, cv=4, control=False)
    assert result.params["copies"] == 20
    assert all(result.folds[2 * s] == result.folds[2 * s + 1] for s in range(20))


def test_copies_that_leave_a_class_rarer_than_the_folds_are_refused():
    # the QA case: 5 distinct samples, 20 copies each, scored 1.0 with no spread
    rng = np.random.default_rng(0)
    sample = np.repeat(np.arange(5), 20)
    x, y = rng.standard_normal((5, 10))[sample], np.array([0, 1, 0, 1, 0])[sample]
    with pytest.raises(DataError, match=r"probe_layers: class 1 has 2 distinct samples \(40 with their copies\) but cv=5 folds "
                                        r"need at least 5 per class, since the copies of a sample are held out in one fold "
                                        r"so that no probe is tested on a copy of a training sample; lower cv to 2"):
        probe_layers({"a": x, "b": x}, y)
    y = np.array([0, 1, 0, 0, 0])[sample]
    with pytest.raises(DataError, match=r"class 1 has 1 distinct sample \(20 with their copies\) but cv=2 folds need at least "
                                        r"2 per class.*drop the samples of classes with a single distinct sample"):
        probe_layers({"a": x}, y, cv=2)


def test_same_seed_same_result_and_seed_recorded():
    x, y = _blobs(n=120)
    a = probe_layers({"x": x}, y, seed=11)
    b = probe_layers({"x": x}, y, seed=11)
    c = probe_layers({"x": x}, y, seed=12)
    assert np.array_equal(a.fold_scores, b.fold_scores) and np.array_equal(a.folds, b.folds)
    assert not np.array_equal(a.folds, c.folds)
    assert a.seed == 11


def test_control_flag_does_not_change_the_task_score():
    x, y = _blobs(n=160, separation=2.0)
    with_control = probe_layers({"x": x}, y, control=True)
    without = probe_layers({"x": x}, y, control=False)
    assert np.array_equal(with_control.fold_scores, without.fold_scores)
    assert without.control_score is None and without.selectivity is None


def test_several_layers_progress_and_inputs_unchanged():
    x, y = _blobs(n=120)
    layers = {"a": x, "b": torch.from_numpy(np.maximum(x, 0)), "c": x[:, :3]}
    before = {k: np.asarray(v, dtype=np.float32).copy() for k, v in layers.items()}
    calls = []
    result = probe_layers(layers, y, progress=lambda done, total: calls.append((done, total)))
    assert result.layers == ("a", "b", "c") and result.score.shape == (3,) and result.fold_scores.shape == (3, 5)
    assert list(result.n_features) == [16, 16, 3]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert all(np.array_equal(np.asarray(layers[k], dtype=np.float32), before[k]) for k in layers)
    only = probe_layers(layers, y, layers=["c"])
    assert only.layers == ("c",)


def test_string_labels_and_single_array_input():
    x, y = _blobs(n=120, n_classes=3)
    names = np.array(["cat", "dog", "eel"])[y]
    result = probe_layers(x, names, control=False)
    assert result.layers == ("x",) and list(result.classes) == ["cat", "dog", "eel"]
    assert result.score[0] > 0.95


def test_result_is_json_safe():
    x, y = _blobs(n=100)
    result = probe_layers({"x": x}, y)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["result_type"] == "ProbingResult" and data["metric"] == "accuracy"
    assert "score" in result.arrays() and "confusion" in result.arrays()


def test_activations_from_a_sample_model(sample_model, digits_test):
    from workbench import extract

    acts = extract(sample_model("mlp_narrow_seed0"), digits_test, ["relu1", "out"])
    result = probe_layers(acts, cv=3)  # labels come from the dataset
    assert isinstance(result, ProbingResult)
    assert result.model_name == acts.model_name
    assert (result.score > 0.85).all()
    assert (result.selectivity > 0.7).all()


# ---------------------------------------------------------------------------------------------
# moment probe


def test_moment_probe_on_pooled_activations_is_the_linear_probe():
    x, y = _blobs(n=150, separation=2.5)
    linear = probe_layers({"x": x}, y, seed=4)
    moment = moment_probe({"x": x}, y, seed=4)
    assert np.array_equal(moment.fold_scores, linear.fold_scores)
    assert np.array_equal(moment.control_score, linear.control_score)
    assert moment.probe == "moment" and moment.params["token_layers"] == 0


def test_moment_probe_reads_token_variance_that_the_mean_hides():
    rng = np.random.default_rng(10)
    n, n_tokens, d = 160, 12, 6
    y = np.arange(n) % 2
    spread = np.where(y == 1, 2.0, 0.5)[:, None, None]
    tokens = (rng.normal(size=(n, n_tokens, d)) * spread).astype(np.float32)
    tokens -= tokens.mean(axis=1, keepdims=True)  # identical first moments
    mean_only = probe_layers({"seq": tokens.mean(axis=1)}, y, control=False)
    moment = moment_probe({"seq": tokens}, y, control=False, rank=4)
    assert mean_only.score[0] < 0.7
    assert moment.score[0] > 0.95
    assert moment.n_features[0] == 2 * d + 4 * 5 // 2
    narrow = moment_probe({"seq": tokens[:, :, :3]}, y, control=False, rank=8)  # the sketch has at most d directions
    assert narrow.n_features[0] == 2 * 3 + 3 * 4 // 2 and narrow.params["rank_used"] == {"seq": 3}
    assert "rank-3 token covariance" in narrow.estimator and narrow.params["rank"] == 8


def test_moment_probe_ignores_masked_padding():
    rng = np.random.default_rng(11)
    n, d = 100, 5
    y = np.arange(n) % 2
    tokens = rng.normal(size=(n, 6, d)) * np.where(y == 1, 2.0, 0.5)[:, None, None]
    padded = np.concatenate([tokens, np.full((n, 3, d), 1e3)], axis=1)
    mask = np.concatenate([np.ones((n, 6), bool), np.zeros((n, 3), bool)], axis=1)
    a = moment_probe({"seq": tokens}, y, control=False)
    b = moment_probe({"seq": padded}, y, mask=mask, control=False)
    assert np.allclose(a.fold_scores, b.fold_scores)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_labels():
    with pytest.raises(DataError, match="'labels' are required"):
        probe_layers({"x": np.ones((20, 3))}, None)


def test_one_class_only():
    x, _ = _blobs(n=40)
    with pytest.raises(DataError, match="hold one class only"):
        probe_layers({"x": x}, np.zeros(40, dtype=int))


def test_fewer_samples_per_class_than_folds():
    x, y = _blobs(n=40)
    y = y.copy()
    y[:3] = 9  # class 9 has 3 samples
    with pytest.raises(DataError, match="class 9 has 3 samples but cv=5 folds need at least 5 per class; lower cv"):
        probe_layers({"x": x}, y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe": "svm"}, "'probe' parameter of probe_layers must be one of 'linear', 'mlp'"),
        ({"cv": 1}, "'cv' parameter of probe_layers must be an int in \\[2, 40\\]"),
        ({"c": 0.0}, r"'c' parameter of probe_layers must be a number in \[1e-06, 1e\+08\], the range the float32 "
                     r"probes can honour"),
        ({"control": "yes"}, "'control' parameter of probe_layers must be True or False"),
    ],
)
def test_bad_parameters(kwargs, message):
    x, y = _blobs(n=40)
    with pytest.raises(ParameterError, match=message):
        probe_layers({"x": x}, y, **kwargs)


def test_c_is_limited_to_what_the_float32_probes_can_honour():
    # c=1e-45 overflowed float32 inside L-BFGS (RuntimeError) while 1e-30 returned a result
    x, y = _blobs(n=40)
    for c in (1e-45, 1e-300, 1e-30, 1e-7, 1e9, 1e300):
        with pytest.raises(ParameterError, match=r"The 'c' parameter of probe_layers must be a number in \[1e-06, 1e\+08\], the "
                                                 r"range the float32 probes can honour \(below it .* above it .*\)\. Got "):
            probe_layers({"x": x}, y, c=c)
    with pytest.raises(ParameterError, match=r"The 'c' parameter of moment_probe must be a number in \[1e-06, 1e\+08\]"):
        moment_probe({"x": x}, y, c=1e-45)
    for c in probing.C_RANGE:
        assert probe_layers({"x": x}, y, c=c, control=False).params["c"] == c
    from workbench.registry import get_analysis

    low, high = probing.C_RANGE
    assert low <= get_analysis("probing").params["c"] <= high  # the app's and the CLI's default (its widget: 1e-4 to 1e4)


def test_bad_activations_and_labels():
    x, y = _blobs(n=40)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="probe_layers: 'x' contains 1 NaN or infinite value"):
        probe_layers({"x": bad}, y)
    big = x.astype(np.float64)
    big[3, 2] = 1e300  # finite, but not in float32, which the probes compute in
    with pytest.raises(DataError, match=r"probe_layers: 1 value of 'x' lies beyond the float32 range \(\|x\| > 3.4e\+38\)"):
        probe_layers({"x": big}, y)
    with pytest.raises(DataError, match="'labels' has 39 entries but the activations have 40 samples"):
        probe_layers({"x": x}, y[:-1])
    with pytest.raises(DataError, match="the float target in 'labels' is constant"):
        probe_layers({"x": x}, np.full(40, 2.5))
    with pytest.raises(DataError, match="layer 'b' has 20 samples but the first layer has 40"):
        probe_layers({"a": x, "b": x[:20]}, y)


def test_every_layer_is_checked_before_any_is_probed():
    x, y = _blobs(n=40)
    calls = []
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="probe_layers: 'c' contains 1 NaN or infinite value"):
        probe_layers({"a": x, "b": x, "c": bad}, y, progress=lambda done, total: calls.append(done))
    big = x.astype(np.float64)
    big[3, 2] = 1e300
    with pytest.raises(DataError, match=r"probe_layers: 1 value of 'c' lies beyond the float32 range \(\|x\| > 3.4e\+38\)"):
        probe_layers({"a": x, "c": big}, y, progress=lambda done, total: calls.append(done))
    tokens = np.repeat(x[:, None, :], 3, axis=1)
    tokens[5, 1, 0] = np.inf
    with pytest.raises(DataError, match="moment_probe: layer 's' contains NaN or infinite values"):
        moment_probe({"a": x, "s": tokens}, y, progress=lambda done, total: calls.append(done))
    with pytest.raises(DataError, match="moment_probe: 'mask' must have shape"):
        moment_probe({"a": x, "s": np.repeat(x[:, None, :], 2, axis=1)}, y, mask=np.ones((40, 3), bool),
                     progress=lambda done, total: calls.append(done))
    assert calls == []  # no probe was trained


def test_layers_are_centred_one_at_a_time_as_they_are_probed(monkeypatch):
    # every layer's centred float32 copy was made before the first probe: 1 GB next to 12 layers of 2048 x 10,000
    x, y = _blobs(n=120)
    made, held = [], []
    centred = probing._centred_float32

    def tracked(*args, **kwargs):
        held.append(sum(ref() is not None for ref in made))  # earlier layers' copies still alive
        out = centred(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    layers = {"a": x, "b": torch.from_numpy(x.astype(np.float64) + 1e4), "c": x[:, :3].tolist()}
    expected = probe_layers(layers, y, cv=3)
    monkeypatch.setattr(probing, "_centred_float32", tracked)
    result = probe_layers(layers, y, cv=3)
    assert held == [0, 0, 0]
    np.testing.assert_array_equal(result.fold_scores, expected.fold_scores)
    assert list(result.n_features) == [16, 16, 3]
    tokens = np.repeat(x[:, None, :], 4, axis=1) + np.random.default_rng(0).normal(size=(120, 4, 16))
    made.clear(), held.clear()
    moment = moment_probe({"a": x, "s": tokens, "t": tokens[:, :, :5]}, y, rank=3, cv=3, control=False)
    assert held == [0, 0, 0] and list(moment.n_features) == [16, 2 * 16 + 6, 2 * 5 + 6]


def test_layer_statistics_are_the_same_bits_in_blocks_and_in_place(monkeypatch):
    # the moments are taken a block of samples at a time, a float64 layer is centred a block of rows at a time, and the
    # folds' statistics overwrite the layer's float32 copy with its centred values: the same numbers as whole arrays
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy((rng.standard_normal((37, 6, 5)) * 3 + 50).astype(np.float32))
    mask = rng.random((37, 6)) > 0.3
    mask[:, 0] = True
    whole = probing._moment_features(tokens, mask, 4, 3, "moment_probe", "t")
    for values in (1, 6 * 5 * 4):  # one sample at a time, four
        monkeypatch.setattr(probing, "_MOMENT_BLOCK_VALUES", values)
        assert torch.equal(probing._moment_features(tokens, mask, 4, 3, "moment_probe", "t"), whole)
    x = torch.from_numpy(rng.standard_normal((50, 7)) + 1e4)
    x[:, 2] = 3.0
    in_place = probing._centred_float32(x.clone(), "x", "probe_layers", in_place=True)
    monkeypatch.setattr(probing, "_BLOCK_VALUES", 7 * 3)  # three rows at a time
    assert torch.equal(probing._centred_float32(x, "x", "probe_layers"), in_place) and not in_place[:, 2].any()
    train = torch.from_numpy(np.arange(50)[None, :] % 5 != np.arange(5)[:, None])
    copy = in_place.clone()
    centred, _, _ = probing._fold_standardisation(copy, train, torch.device("cpu"))
    expected = (in_place.double() - in_place.double().mean(0, keepdim=True)).float()
    assert centred is copy and torch.equal(centred, expected)


def test_labels_of_mixed_types_and_nan_groups_are_refused():
    x = np.random.default_rng(0).normal(size=(40, 3))
    with pytest.raises(DataError, match=r"probe_layers: 'labels' mix value types \(int, str\); give every sample a label of one type"):
        probe_layers({"x": x}, [1] * 20 + ["a"] * 20, cv=2)
    groups = np.r_[np.nan, np.arange(39.0)]
    with pytest.raises(DataError, match=r"probe_layers: 'groups' contain 1 NaN or infinite value"):
        probe_layers({"x": x}, np.arange(40) % 2, cv=2, groups=groups)


def test_moment_probe_errors():
    with pytest.raises(DataError, match="samples have no real token in 'mask'"):
        moment_probe({"s": np.ones((10, 3, 2))}, np.arange(10) % 2, mask=np.zeros((10, 3), bool), cv=2)
    with pytest.raises(DataError, match="'mask' must have shape"):
        moment_probe({"s": np.ones((10, 3, 2))}, np.arange(10) % 2, mask=np.ones((10, 4), bool), cv=2)
    with pytest.raises(ParameterError, match="'rank' parameter of moment_probe must be an int in \\[0, 64\\]"):
        moment_probe({"s": np.ones((10, 3, 2))}, np.arange(10) % 2, rank=-1)
    with pytest.raises(DataError, match=r"moment_probe: 'mask' must be True/False \(or 1/0\) per token, marking real tokens "
                                        r"and padding; it holds other values\."):
        moment_probe({"s": np.ones((10, 3, 2))}, np.arange(10) % 2, mask=np.full((10, 3), 0.5), cv=2)


# ---------------------------------------------------------------------------------------------
# plots


def test_probe_figures_and_rows():
    x, y = _blobs(n=100)
    a = probe_layers({"l1": x, "l2": x[:, :4]}, y)
    b = probe_layers({"l1": x[:, :8], "l2": x[:, :2]}, y, control=False)
    fig = probe_profile(a, b, names=["A", "B"])
    assert len(fig.data) == 3  # A: score + control, B: score
    assert "n = 100" in figure_title(fig) and "logistic regression" in figure_title(fig)
    assert list(fig.data[0].x) == ["l1", "l2"]
    heat = probe_confusion(a, "l2")
    assert np.asarray(heat.data[0].z).shape == (4, 4)
    assert "layer l2" in figure_title(heat)
    rows = probe_rows(a, "A")
    assert rows[0]["control, training"] == a.control_train_score[0]  # what the probe memorises of random labels
    assert [r["layer"] for r in rows] == ["l1", "l2"] and {"accuracy", "control", "selectivity", "macro-F1"} <= set(
        rows[0]
    )
    regression = probe_layers({"x": x}, x[:, 0].astype(np.float64) * 2.0, control=False)
    with pytest.raises(ValueError, match="needs a classification result"):
        probe_confusion(regression, "x")
    from workbench.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError, match=r"probe_confusion: the probing result has no layer 'l3'.* Layers: l1, l2\."):
        probe_confusion(a, "l3")


def test_a_model_or_a_dataset_in_place_of_arrays_is_named():
    from workbench.data.datasets import make_dataset

    x, y = _blobs(n=40)
    data = make_dataset("blobs", x, y)
    with pytest.raises(DataError, match=r"probe_layers: 'labels' must be one label per sample; got a dataset. Pass its labels: dataset.y"):
        probe_layers({"x": x}, data)
    with pytest.raises(DataError, match=r"probe_layers: 'acts' must be an \(n_samples, n_features\) array of activations; got a dataset"):
        probe_layers(data, y)


def test_probing_result_converts_to_one_row_per_layer():
    x, y = _blobs(n=60)
    result = probe_layers({"x": x, "half": x[:, :2]}, y, cv=3)
    frame = result.to_frame()
    assert list(frame.index) == ["x", "half"] and frame.index.name == "layer"
    np.testing.assert_array_equal(frame["accuracy"].to_numpy(), result.score)
    assert {"n_features", "accuracy_std", "train_accuracy"} <= set(frame.columns)
    assert "score=" in repr(result) and len(repr(result)) < 2000  # arrays by shape, not printed in full


def test_whole_number_float_labels_warn_that_they_are_probed_as_a_regression_target():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4))
    labels = (x[:, 0] > 0).astype(np.float64)  # 0./1. class labels stored as floats
    with pytest.warns(UserWarning, match=r"the labels are floats with 2 whole-number values, so they are probed as a "
                                         r"regression target \(R\^2\); pass them as integers"):
        result = probe_layers({"x": x}, labels, control=False, cv=3)
    assert result.metric == "r2"
    assert probe_layers({"x": x}, labels.astype(int), control=False, cv=3).metric == "accuracy"


def test_layers_of_two_architectures_in_another_order_get_an_axis_stretch_each():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    feats = {name: rng.normal(size=(90, 4)) + y[:, None] for name in ("fc1", "relu1", "out")}
    cnn = probe_layers({k: feats[k] for k in ("relu1", "fc1", "out")}, y, cv=3, control=False)
    mlp = probe_layers({k: feats[k] for k in ("fc1", "relu1", "out")}, y, cv=3, control=False)
    fig = probe_profile(cnn, mlp, names=["cnn", "mlp"])
    assert list(fig.data[1].x) == ["mlp · fc1", "mlp · relu1", "mlp · out"]  # in the MLP's own order
    assert list(fig.layout.xaxis.categoryarray) == ["cnn · relu1", "cnn · fc1", "cnn · out", "mlp · fc1", "mlp · relu1", "mlp · out"]
    same = probe_profile(mlp, mlp, names=["a", "b"])  # orders agree: one shared axis
    assert list(same.data[0].x) == ["fc1", "relu1", "out"] and list(same.layout.xaxis.categoryarray) == ["fc1", "relu1", "out"]


def test_each_probe_records_the_regularisation_it_was_fitted_with():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.normal(size=(60, 3)) + y[:, None]
    assert probe_layers({"l": x}, y, cv=3, control=False, c=0.5).params["c"] == 0.5
    mlp = probe_layers({"l": x}, y, cv=3, control=False, probe="mlp")
    assert "c" not in mlp.params and mlp.params["weight_decay"] == probing.MLP_WEIGHT_DECAY


@pytest.mark.parametrize("labels", [np.arange(300) % 2, np.linspace(0.0, 1.0, 300)], ids=["classes", "float target"])
def test_a_dead_layer_is_refused_as_constant_not_as_copies(labels):
    from workbench.errors import ConstantDataError

    with pytest.raises(ConstantDataError, match=r"probe_layers: every probed layer is constant over samples \(all 300 "
                                                 r"samples give the same activations\), so a probe can only guess"):
        probe_layers({"dead": np.ones((300, 4))}, labels)
