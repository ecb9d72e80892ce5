"""Topology family: persistence diagrams, diagram distances, topological separability, tRSA.

Known answers (circle, two clusters, exact MST = gudhi H0), invariances, the separability claims
of arXiv 2305.15016 on synthetic blobs, the digits MLP and its training snapshots, and the error
messages of bad input.
"""

from __future__ import annotations

import json
import math

import gudhi
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from workbench.analyses.topology import (
    DiagramDistanceMatrixResult,
    PersistenceResult,
    SeparabilityResult,
    _h1_birth_bound,
    class_separability,
    diagram_distance,
    diagram_distance_matrix,
    empty_diagrams_note,
    layer_separability,
    persistence,
    persistence_distance,
    plateau_index,
    separability_trajectory,
    topological_rsa,
)
from workbench.data.datasets import blobs
from workbench.errors import ConstantDataError, DataError, ParameterError, UnknownLayerError
from workbench.plots._style import figure_title


def circle(n: int, *, noise: float = 0.0, dim: int = 2, seed: int = 0, even: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta = np.arange(n) * 2 * np.pi / n if even else rng.uniform(0, 2 * np.pi, n)
    pts = np.stack([np.cos(theta), np.sin(theta)], 1)
    if dim > 2:
        basis, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
        pts = pts @ basis.T
    return pts + noise * rng.standard_normal(pts.shape)


def lifetimes(dgm: np.ndarray) -> np.ndarray:
    return dgm[:, 1] - dgm[:, 0]


def distance_matrix(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x)
    d = torch.cdist(t, t)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return d.numpy()


# ---------------------------------------------------------------------------------------------
# persistence: known answers


def test_evenly_spaced_circle_has_one_h1_bar_with_closed_form_birth_and_death():
    n = 60
    res = persistence(circle(n, even=True))
    h1 = res.diagram(1)
    assert len(h1) == 1
    # born when neighbours join (chord of one step), dies when the chord of n/3 steps fills it
    assert h1[0, 0] == pytest.approx(2 * math.sin(math.pi / n), rel=1e-9)
    assert h1[0, 1] == pytest.approx(math.sqrt(3), rel=1e-9)
    assert res.betti_curves[1][np.searchsorted(res.betti_grid, 1.0)] == 1
    assert res.betti_curves[0][0] == n
    assert not res.subsampled and res.subsample_indices is None


def test_noisy_circle_has_exactly_one_long_h1_bar():
    res = persistence(circle(150, noise=0.02, dim=5, seed=1))
    life = lifetimes(res.diagram(1))
    assert (life > 0.5).sum() == 1
    assert life[0] > 1.2 and life[1] < 0.15


def test_two_far_clusters_give_one_long_finite_h0_bar():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((40, 3)), rng.standard_normal((40, 3)) + [60.0, 0, 0]])
    h0 = persistence(x, max_dim=0).diagram(0)
    assert np.isinf(h0[:, 1]).sum() == 1
    finite = np.sort(h0[np.isfinite(h0[:, 1]), 1])[::-1]
    assert len(finite) == 79
    assert finite[0] > 50 and finite[1] < 5
    assert np.all(h0[:, 0] == 0)


def test_subsampled_noisy_circle_keeps_the_dominant_h1_bar_and_full_h0():
    x = circle(2000, noise=0.05, dim=8, seed=2)
    res = persistence(x, max_points=500, seed=3)
    assert res.subsampled and res.n_points_used == 500 and res.n_points == 2000
    assert len(np.unique(res.subsample_indices)) == 500
    assert len(res.diagram(0)) == 2000  # H0 uses every point
    life = lifetimes(res.diagram(1))
    assert life[0] > 1.2 and life[0] > 5 * life[1]
    assert "500 of 2000" in res.estimator


def test_mst_h0_equals_gudhi_h0_exactly():
    rng = np.random.default_rng(0)
    for n, dim in [(30, 2), (80, 5), (150, 16)]:
        x = rng.standard_normal((n, dim))
        d = distance_matrix(x)
        ours = np.sort(persistence(d, metric="precomputed", max_dim=0).diagram(0)[:, 1])
        st = gudhi.RipsComplex(distance_matrix=d).create_simplex_tree(max_dimension=1)
        st.compute_persistence()
        ref = np.sort(st.persistence_intervals_in_dimension(0)[:, 1])
        assert np.array_equal(ours, ref)
        # from points (Prim without a distance matrix): the same up to float rounding of the distances
        from_points = np.sort(persistence(x, max_dim=0).diagram(0)[:, 1])
        np.testing.assert_allclose(from_points[:-1], ref[:-1], rtol=1e-12)


def test_h1_matches_gudhi_rips_complex():
    x = circle(70, noise=0.1, dim=3, seed=4)
    d = distance_matrix(x)
    ours = persistence(d, metric="precomputed")
    st = gudhi.RipsComplex(distance_matrix=d).create_simplex_tree(max_dimension=2)
    st.compute_persistence(homology_coeff_field=2)
    for k in (0, 1):
        ref = st.persistence_intervals_in_dimension(k)
        assert gudhi.bottleneck_distance(ours.diagram(k), ref) == pytest.approx(0.0, abs=1e-12)


def test_collapse_path_gives_the_same_diagrams_as_the_dense_path():
    x = circle(120, noise=0.15, dim=6, seed=5)
    dense = persistence(x)
    collapsed = persistence(x, memory_limit_mb=1e-6)
    assert dense.engine == "ripser" and collapsed.engine == "collapse+ripser"
    for k in (0, 1):
        assert np.array_equal(dense.diagram(k), collapsed.diagram(k))


def _full_rips(d: np.ndarray) -> list[np.ndarray]:
    from gudhi.sklearn.rips_persistence import RipsPersistence

    return RipsPersistence([0, 1], input_type="full distance matrix", num_collapses=0, homology_coeff_field=2).fit_transform([d])[0]


def _cloud(case: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    if case == "noisy torus in 20-D":
        a, b = rng.uniform(0, 2 * np.pi, (2, 400))
        torus = np.stack([(2 + np.cos(b)) * np.cos(a), (2 + np.cos(b)) * np.sin(a), np.sin(b)], 1)
        return torus @ np.linalg.qr(rng.standard_normal((20, 3)))[0].T + 0.1 * rng.standard_normal((400, 20))
    if case == "blobs":
        return rng.normal(size=(5, 8))[np.arange(300) % 5] * 4 + rng.normal(size=(300, 8))
    if case == "integer grid (many equal distances)":
        g = np.arange(17.0)
        return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    if case == "duplicated points":
        base = rng.normal(size=(150, 5))
        return np.concatenate([base, base[:150]])
    return circle(300, noise=0.01, seed=3)  # a clean circle: its one long 1-cycle dies far beyond the last birth


@pytest.mark.parametrize(
    ("case", "engine"),
    [
        ("noisy torus in 20-D", "ripser-truncated"),
        ("blobs", None),
        ("integer grid (many equal distances)", None),
        ("duplicated points", None),
        ("clean circle", "ripser"),
    ],
)
def test_truncated_persistence_equals_the_full_computation(case, engine):
    d = distance_matrix(_cloud(case))
    ours = persistence(d, metric="precomputed", max_dim=1, max_points=len(d))
    if engine is not None:
        assert ours.engine == engine
    reference = _full_rips(d)
    for k in (0, 1):
        assert np.array_equal(np.sort(ours.diagram(k), axis=0), np.sort(np.asarray(reference[k]).reshape(-1, 2), axis=0))


@pytest.mark.parametrize("seed", range(6))
def test_h1_birth_bound_bounds_every_birth_and_every_unwitnessed_edge(seed):
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(30, 70)), int(rng.integers(2, 12))
    x = np.round(rng.normal(size=(n, dim)), 1 if seed % 2 else 6)  # odd seeds: coarse values, many ties
    d = distance_matrix(x)
    bound = _h1_birth_bound(torch.from_numpy(d))
    h1 = np.asarray(_full_rips(d)[1]).reshape(-1, 2)
    assert len(h1) == 0 or h1[:, 0].max() <= bound
    # brute force: every edge longer than the bound has a strict witness
    witnessed = (np.maximum(d[:, None, :], d[None, :, :]) < d[:, :, None]).any(axis=2)  # [u, v]: some w beats d_uv
    assert np.all(witnessed[d > bound])


def test_h2_of_a_sphere():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((60, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = persistence(x, max_dim=2)
    assert res.engine == "collapse+ripser"
    h2 = res.diagram(2)
    assert len(h2) == 1  # one cavity, filled once the tetrahedra span the sphere
    assert 0.9 < h2[0, 0] < 1.4 and h2[0, 1] > 1.6


def test_summaries_have_closed_forms():
    # three points on a line, unit spacing: H0 finite bars [0, 1], [0, 1]
    res = persistence(np.array([[0.0], [1.0], [2.0]]), max_dim=0, grid_size=5)
    assert res.total_persistence[0] == pytest.approx(2.0)
    assert res.persistence_entropy[0] == pytest.approx(math.log(2))
    np.testing.assert_allclose(res.betti_grid, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(res.betti_curves[0], [3, 3, 3, 3, 1])


def test_persistence_is_invariant_to_rotation_translation_and_feature_permutation():
    rng = np.random.default_rng(7)
    x = circle(80, noise=0.1, dim=4, seed=7)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    y = (x @ q + 5.0)[:, rng.permutation(4)]
    a, b = persistence(x), persistence(y)
    for k in (0, 1):
        assert diagram_distance(a, b, dim=k).distance < 1e-9


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1e300])
def test_diagrams_scale_with_data_at_the_ends_of_the_float64_range(scale):
    # squared distances of 1e200 overflowed (a NaN threshold and no bars); 1e-200 collapsed to one point
    x = circle(80, noise=0.1, dim=3, seed=3)
    a, b = persistence(x), persistence(x * scale)
    assert b.threshold / scale == pytest.approx(a.threshold, rel=1e-12)
    for k in (0, 1):
        np.testing.assert_allclose(b.diagram(k) / scale, a.diagram(k), rtol=1e-12)
    assert persistence(x * scale, metric="cosine").diagram(1) == pytest.approx(persistence(x, metric="cosine").diagram(1))
    labels = np.repeat([0, 1], 40)
    s, t = class_separability(x, labels, cv=2), class_separability(x * scale, labels, cv=2)
    assert (t.score, t.fisher_ratio, t.thornton_index) == pytest.approx((s.score, s.fisher_ratio, s.thornton_index), rel=1e-9)
    assert topological_rsa(x * scale, x).similarity == pytest.approx(1.0)


def test_cosine_metric_ignores_sample_scale():
    x = circle(60, noise=0.05, dim=3, seed=8) + 3.0
    scales = np.random.default_rng(8).uniform(0.5, 4.0, (60, 1))
    a, b = persistence(x, metric="cosine"), persistence(x * scales, metric="cosine")
    assert diagram_distance(a, b, dim=1).distance < 1e-9


def test_same_seed_same_subsample_and_inputs_unchanged():
    x = circle(400, noise=0.05, dim=3, seed=9)
    before = x.copy()
    a = persistence(x, max_points=100, seed=1)
    b = persistence(x, max_points=100, seed=1)
    np.testing.assert_array_equal(a.subsample_indices, b.subsample_indices)
    np.testing.assert_array_equal(a.diagram(1), b.diagram(1))
    np.testing.assert_array_equal(x, before)
    assert a.seed == 1


def test_duplicated_points_subsample_each_point_once():
    x = np.repeat(circle(20, even=True), 10, axis=0)
    res = persistence(x, max_points=50)
    assert res.n_points_used == 20
    assert len(res.diagram(1)) == 1


def test_duplicate_samples_add_no_h0_bar():
    # The copies are 0 apart; a matrix-product expansion made them ~1e-8 apart, and each such pair an H0 bar.
    x = circle(60, noise=0.05, dim=10, seed=0)
    x = np.concatenate([x, x[:10]])
    res = persistence(x, max_dim=1)
    assert len(res.diagram(0)) == 60
    np.testing.assert_allclose(res.diagram(0), persistence(x, max_dim=0).diagram(0), rtol=1e-12)


def test_h0_deaths_of_tight_far_apart_clusters_are_exact():
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(1)
    x = 100.0 * rng.standard_normal((4, 5))[np.arange(80) % 4] + 1e-3 * rng.standard_normal((80, 5))
    deaths = np.sort(minimum_spanning_tree(squareform(pdist(x))).data)[::-1]  # from coordinate differences
    h0 = persistence(x, max_dim=1).diagram(0)
    assert np.isinf(h0[0, 1])
    np.testing.assert_allclose(h0[1:, 1], deaths, rtol=1e-9)


def test_result_is_json_safe_and_progress_is_reported():
    calls = []
    res = persistence(circle(50, noise=0.05), progress=lambda done, total: calls.append((done, total)))
    assert isinstance(res, PersistenceResult)
    assert calls[-1] == (3, 3)
    out = json.loads(json.dumps(res.to_dict()))
    assert out["diagrams"]["0"][0][1] == "inf"
    assert "betti_curves" in res.arrays()


# ---------------------------------------------------------------------------------------------
# diagram distances


def test_bottleneck_to_itself_is_zero_and_symmetric():
    a = persistence(circle(80, noise=0.1, seed=10))
    b = persistence(circle(80, noise=0.3, seed=11))
    for metric in ("bottleneck", "wasserstein"):
        assert diagram_distance(a, a, metric=metric).distance == 0.0
        ab = diagram_distance(a, b, metric=metric).distance
        ba = diagram_distance(b, a, metric=metric).distance
        assert ab > 0.01
        assert ab == pytest.approx(ba, rel=1e-9)


def test_bottleneck_and_wasserstein_closed_forms():
    a = np.array([[0.0, 1.0], [0.0, 3.0]])
    b = np.array([[0.0, 1.0]])
    # the unmatched bar [0, 3] goes to the diagonal at L-inf cost 1.5
    assert diagram_distance(a, b).distance == pytest.approx(1.5)
    assert diagram_distance(a, b, metric="wasserstein").distance == pytest.approx(1.5, rel=1e-5)
    c = np.array([[0.0, 2.0], [0.0, 4.0]])
    assert diagram_distance(a, c, metric="wasserstein", order=1).distance == pytest.approx(2.0, rel=1e-5)
    assert diagram_distance(a, c, metric="wasserstein", order=2).distance == pytest.approx(math.sqrt(2), rel=1e-5)
    assert diagram_distance(a, c * 10, normalize=True).distance == pytest.approx(
        diagram_distance(a / 3, c / 4).distance
    )


def test_persistence_distance_of_a_representation_with_itself_is_zero():
    x = circle(60, noise=0.1, dim=3, seed=12)
    assert persistence_distance(x, x).distance == 0.0
    assert persistence_distance(x, x * 7.0, normalize=True).distance < 1e-9
    assert persistence_distance(x, np.random.default_rng(0).standard_normal((60, 3))).distance > 0.1


@pytest.mark.parametrize(("dim", "stages"), [(0, 2), (1, 3)])
def test_persistence_distance_reports_progress(dim, stages):
    x = circle(60, noise=0.1, dim=3, seed=12)
    calls = []
    res = persistence_distance(x, x * 2.0, dim=dim, progress=lambda done, total: calls.append((done, total)))
    total = 2 * stages + 1  # the stages of both persistence computations, then the comparison
    assert [done for done, _ in calls] == list(range(1, total + 1))
    assert {t for _, t in calls} == {total}
    assert res.distance == persistence_distance(x, x * 2.0, dim=dim).distance


def test_distance_matrix_over_layers():
    acts_a = {"l1": circle(60, noise=0.05, seed=13), "l2": circle(60, noise=0.4, seed=14)}
    acts_b = {"m1": circle(60, noise=0.05, seed=13) * 2, "m2": np.random.default_rng(1).standard_normal((60, 2))}
    calls = []
    res = diagram_distance_matrix(acts_a, acts_b, progress=lambda d, t: calls.append((d, t)))
    assert isinstance(res, DiagramDistanceMatrixResult)
    assert res.distances.shape == (2, 2) and res.layers_a == ["l1", "l2"] and res.layers_b == ["m1", "m2"]
    assert calls[-1][0] == calls[-1][1] == 8
    self_res = diagram_distance_matrix(acts_a)
    assert self_res.distances[0, 0] == 0.0
    assert self_res.distances[0, 1] == self_res.distances[1, 0] > 0
    given = {k: persistence(v) for k, v in acts_a.items()}
    np.testing.assert_allclose(diagram_distance_matrix(given).distances, self_res.distances)


def test_distance_key_numbers_name_the_closest_and_farthest_layer_pairs():
    from workbench.registry import summarize

    acts_a = {"l1": circle(60, noise=0.05, seed=13), "l2": circle(60, noise=0.4, seed=14), "l3": 3 * circle(60, seed=15)}
    own = diagram_distance_matrix(acts_a)
    d = own.distances
    numbers = summarize(own)["diagram distances"]
    # one model against itself: distinct pairs only (each layer's 0 to itself would always be the minimum)
    off = {("l1", "l2"): d[0, 1], ("l1", "l3"): d[0, 2], ("l2", "l3"): d[1, 2]}
    closest, farthest = min(off, key=off.get), max(off, key=off.get)
    assert numbers["min_distance"] == off[closest] > 0 and numbers["max_distance"] == off[farthest]
    assert numbers["closest layers"] == f"{closest[0]} – {closest[1]}: {off[closest]:.3g}"
    assert numbers["farthest layers"] == f"{farthest[0]} – {farthest[1]}: {off[farthest]:.3g}"
    acts_b = {"m1": circle(60, noise=0.05, seed=13) * 2, "m2": np.random.default_rng(1).standard_normal((60, 2))}
    two = diagram_distance_matrix(acts_a, acts_b)
    i, j = np.unravel_index(np.argmin(two.distances), two.distances.shape)
    numbers = summarize(two)["diagram distances"]
    assert numbers["min_distance"] == two.distances.min()
    assert numbers["closest layers"] == f"{two.layers_a[i]} (A) – {two.layers_b[j]} (B): {two.distances[i, j]:.3g}"


def _with_a_constant_layer(model_name: str = "text_seed0"):
    from workbench.activations.types import Activations

    rng = np.random.default_rng(3)
    layers = {"embed": np.ones((60, 4)), "l1": circle(60, noise=0.05, seed=18), "l2": rng.standard_normal((60, 3))}
    return Activations({k: torch.from_numpy(v) for k, v in layers.items()}, model_name=model_name)


def test_layer_functions_leave_out_a_layer_constant_over_samples_and_record_it():
    acts = _with_a_constant_layer()
    sep = layer_separability(acts, labels=np.arange(60) % 3, cv=3)
    assert sep.layers == ["l1", "l2"] and sep.skipped == ["embed"] and list(sep.per_layer) == ["l1", "l2"]
    assert len(sep.scores) == 2 and json.loads(json.dumps(sep.to_dict()))["skipped"] == ["embed"]
    own = diagram_distance_matrix(acts, dim=0)
    assert own.layers_a == own.layers_b == ["l1", "l2"] and own.skipped_a == own.skipped_b == ["embed"]
    assert own.distances.shape == (2, 2) and own.distances[0, 1] > 0
    calls = []
    pair = diagram_distance_matrix(acts, _with_a_constant_layer("other"), dim=0, layers_a=["l1", "l2"],
                                   progress=lambda d, t: calls.append((d, t)))
    assert pair.layers_b == ["l1", "l2"] and pair.skipped_a == [] and pair.skipped_b == ["embed"]
    assert calls[-1] == (2 + 3 + 4, 2 + 3 + 4)  # persistence of 2 + 3 layers, then 2 x 2 pairs


@pytest.mark.parametrize("call", [
    lambda acts: layer_separability(acts, layers=["embed"]),
    lambda acts: diagram_distance_matrix(acts, layers_a=["embed"]),
    lambda acts: diagram_distance_matrix(acts, layers_a=["l1"], layers_b=["embed"]),
])
def test_a_call_on_only_constant_layers_names_the_layer_and_the_model(call):
    with pytest.raises(ConstantDataError, match="layer embed of model text_seed0 is constant over samples .* no topology"):
        call(_with_a_constant_layer())


def test_a_data_error_of_one_layer_names_the_layer_and_the_model():
    from workbench.activations.types import Activations

    half_zero = np.zeros((60, 3))
    half_zero[:30] = np.random.default_rng(4).random((30, 3)) + 0.1
    acts = Activations({"l1": torch.from_numpy(circle(60, seed=19)), "relu": torch.from_numpy(half_zero)},
                       model_name="text_seed0")
    with pytest.raises(DataError, match="layer_separability: layer relu of model text_seed0: .* 30 all-zero rows"):
        layer_separability(acts)


# ---------------------------------------------------------------------------------------------
# class separability


def test_score_tracks_fisher_and_thornton_on_blobs():
    rows = []
    for separation in (0, 2, 4, 6, 8, 10, 12):
        for seed in range(3):
            data = blobs(separation, n_samples=250, n_features=64, n_classes=5, seed=seed)
            res = class_separability(data.x, data.y, probe=False)
            rows.append((res.score, res.fisher_ratio, res.thornton_index))
    score, fisher, thornton = map(np.array, zip(*rows))
    # lower score = more separable, so the correlation with higher-is-separable references is negative
    assert spearmanr(score, fisher)[0] <= -0.8
    assert spearmanr(score, thornton)[0] <= -0.8
    assert score[:3].mean() > score[-3:].mean() + 0.2


def test_normalised_score_falls_with_separation_and_ignores_a_far_outlier():
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.standard_normal((8, 3)))[0].T
    y = np.repeat(np.arange(3), 100)

    def score(separation: float, seed: int, outlier: bool = False, normalize: bool = True) -> float:
        x = np.random.default_rng(seed).standard_normal((300, 8)) + separation * directions[y]
        if outlier:
            x[0] = 30 * np.eye(8)[0]
        return class_separability(x, y, normalize=normalize, probe=False).score

    means = [np.mean([score(s, seed) for seed in range(3)]) for s in (0, 1, 3, 6, 20)]
    assert np.all(np.diff(means) < 0)  # the raw score rises from 0 to 3 here: one long edge sets its scale
    assert score(0, 0, outlier=True) == pytest.approx(score(0, 0), abs=0.01)
    assert score(0, 0, outlier=True, normalize=False) < 0.2 * score(0, 0, normalize=False)  # as the docstring warns


@pytest.mark.parametrize(
    ("labelled", "probe", "expected"),
    [(False, True, [(1, 1)]), (True, False, [(1, 2), (2, 2)]), (True, True, [(i, 5) for i in range(1, 6)])],
)
def test_class_separability_reports_progress(labelled, probe, expected):
    data = blobs(8.0, n_samples=120, n_features=16, n_classes=4, seed=0)
    labels = data.y if labelled else None
    calls = []
    res = class_separability(
        data.x, labels, probe=probe, cv=3, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == expected  # score, labelled references, then each fold of the probe
    plain = class_separability(data.x, labels, probe=probe, cv=3)
    assert res.references() == plain.references() and res.score == plain.score


def test_separability_result_fields_and_references():
    data = blobs(8.0, n_samples=200, n_features=16, n_classes=4, seed=0)
    res = class_separability(data.x, data.y, cv=3)
    assert isinstance(res, SeparabilityResult)
    assert 0 < res.score <= 1 and res.n_classes == 4
    assert res.thornton_index == 1.0 and res.probe_accuracy == 1.0 and res.probe_roc_auc == 1.0
    assert res.fisher_ratio > 1 and res.calinski_harabasz > 10
    assert len(res.normalized_times) == 199 and res.normalized_times[0] == 1.0
    unlabelled = class_separability(data.x)
    assert unlabelled.references() == {} and unlabelled.score == res.score
    json.dumps(res.to_dict())


def test_thornton_index_finds_near_duplicate_neighbours_far_from_the_centre():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    centres = 1e5 + 1e-3 * rng.normal(size=(20, 4))  # twins 1e-6 apart, next to other pairs 1e-3 apart
    x = np.vstack([centres, centres + 1e-6 * rng.normal(size=(20, 4)), -1e5 + rng.normal(size=(4, 4))])
    y = np.concatenate([np.arange(20) % 2, np.arange(20) % 2, [0, 1, 0, 1]])
    d = cdist(x, x)  # from the differences
    np.fill_diagonal(d, np.inf)
    expected = float(np.mean(y[d.argmin(1)] == y))
    assert expected > 0.9 and class_separability(x, y, probe=False).thornton_index == expected  # 0.84 from |a|^2 + |b|^2 - 2ab


def test_fisher_and_thornton_closed_forms():
    # feature 0: class means 0.5 and 4.5 around 2.5: between = 4 * 2^2 = 16, within = 4 * 0.5^2 = 1
    x = np.array([[0.0, 5.0], [1.0, 5.0], [4.0, 5.0], [5.0, 5.0]])
    res = class_separability(x, [0, 0, 1, 1], probe=False)
    assert res.fisher_ratio == pytest.approx(16.0)
    assert res.thornton_index == 1.0
    assert class_separability(x, [0, 1, 0, 1], probe=False).thornton_index == 0.0
    assert class_separability(x + [[0, 0], [0, 0], [0, 1], [0, 1]], [0, 0, 1, 1], probe=False).fisher_ratio == math.inf


def test_score_is_invariant_to_rotation_and_scale():
    data = blobs(4.0, n_samples=120, n_features=8, n_classes=3, seed=1)
    x = data.x.numpy().astype(np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((8, 8)))
    a = class_separability(x, normalize=False).score
    b = class_separability(3.0 * x @ q, normalize=False).score
    assert a == pytest.approx(b, rel=1e-9)
    assert class_separability(x).score == pytest.approx(class_separability(x * 5).score, rel=1e-12)


def test_repeated_samples_leave_the_score_as_it_is():
    data = blobs(3.0, n_samples=180, n_features=5, n_classes=3, seed=4)
    x, y = data.x.numpy(), data.y.numpy()
    once = class_separability(x, y, probe=False)
    twice = class_separability(np.repeat(x, 2, axis=0), np.repeat(y, 2), probe=False)
    assert twice.score == pytest.approx(once.score, rel=1e-12)  # zero-length bars are dropped, as persistence() drops them
    assert len(twice.normalized_times) == len(once.normalized_times) == 179
    with pytest.raises(ParameterError, match=r"class_separability: 'x' has one feature, which L2 normalisation maps to -1 or "
                                             r"\+1 \(two points, no H0 structure left\); pass normalize=False\."):
        class_separability(x[:, :1], y)
    assert 0 < class_separability(x[:, :1], y, normalize=False, probe=False).score <= 1


@pytest.mark.parametrize("call", [
    lambda x, y, seed: persistence(x, max_points=10, seed=seed),
    lambda x, y, seed: class_separability(x, y, seed=seed),
    lambda x, y, seed: layer_separability({"a": x}, labels=y, seed=seed),
    lambda x, y, seed: persistence_distance(x, x, max_points=10, seed=seed),
])
def test_seeds_beyond_what_the_libraries_take_get_a_sentence(call):
    data = blobs(3.0, n_samples=30, n_features=4, n_classes=2, seed=0)
    with pytest.raises(ParameterError, match=r"The 'seed' parameter of \w+ must be an int in \[0, 4294967295\]"):
        call(data.x.numpy(), data.y.numpy(), 2**40)


def test_score_moves_towards_separable_through_the_digits_mlp(sample_model, digits_test):
    from workbench import extract

    model = sample_model("mlp_seed0")
    acts = extract(model, digits_test, ["fc1", "relu1", "fc2", "relu2"])
    res = layer_separability({"input": digits_test.x, **acts}, labels=digits_test.y, probe=False)
    assert res.layers == ["input", "fc1", "relu1", "fc2", "relu2"]
    assert res.scores[-1] < res.scores[0] - 0.05
    assert res.references["fisher_ratio"][-1] > res.references["fisher_ratio"][0]


def test_trajectory_over_snapshots_tracks_probe_accuracy_and_stops_at_its_plateau(sample_model_path, digits_test):
    paths = [sample_model_path(f"mlp_narrow_seed0_epoch{e:02d}") for e in range(31)]
    calls = []
    res = separability_trajectory(paths, digits_test, "relu2", progress=lambda d, t: calls.append(d))
    assert calls[-1] == 31 and len(res.scores) == 31
    accuracy = res.references["probe_accuracy"]
    assert spearmanr(res.scores, accuracy)[0] <= -0.7
    probe_plateau = plateau_index(accuracy, patience=res.patience, tolerance=res.tolerance)
    assert probe_plateau == res.reference_plateaus["probe_accuracy"]
    assert res.stop_index is not None and probe_plateau is not None
    assert abs(res.stop_index - probe_plateau) <= 2
    assert res.checkpoints[0] == "mlp_narrow_seed0_epoch00"


def test_trajectory_with_an_infinite_fisher_ratio_has_no_plateau_for_it():
    from workbench.data import make_dataset

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = np.c_[rng.standard_normal((90, 4)), y].astype(np.float32)  # the last feature is constant within each class
    data = make_dataset("with labels as a feature", torch.from_numpy(x), torch.from_numpy(y))
    checkpoints = []
    for scale in (0.2, 0.6, 1.0, 1.0, 1.0, 1.0):
        layer = torch.nn.Linear(5, 5)
        with torch.no_grad():
            layer.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, scale])))
            layer.bias.zero_()
        checkpoints.append(torch.nn.Sequential(layer))
    res = separability_trajectory(checkpoints, data, "0", probe=False)
    assert np.isinf(res.references["fisher_ratio"]).all()
    assert res.reference_plateaus["fisher_ratio"] is None
    assert np.isfinite(res.references["thornton_index"]).all() and "thornton_index" in res.reference_plateaus


def test_plateau_rule_on_known_curves():
    t = np.arange(30)
    saturating = 1 - np.exp(-t / 3)
    # gain over the next 3 steps <= 5% of the gain so far first holds at t = 8
    assert plateau_index(saturating) == 8
    assert plateau_index(-saturating, higher_is_better=False) == 8
    assert plateau_index(t.astype(float)) is None
    assert plateau_index(np.ones(10)) is None
    assert plateau_index(saturating, patience=2, tolerance=0.2) < 8


# ---------------------------------------------------------------------------------------------
# geo-topological RSA


def test_trsa_of_a_representation_with_itself_is_one_and_invariant():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((80, 6))
    assert topological_rsa(x, x).similarity == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert topological_rsa(x, 4.0 * x @ q + 1.0).similarity == pytest.approx(1.0, abs=1e-9)
    assert abs(topological_rsa(x, rng.standard_normal((80, 6))).similarity) < 0.15
    res = topological_rsa(x, x**3)
    assert res.similarity == pytest.approx(topological_rsa(x**3, x).similarity, abs=1e-12)
    assert res.rgtm_x.shape == (80, 80) and res.rgtm_x.min() == 0.0 and res.rgtm_x.max() == 1.0


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "correlation"])
def test_trsa_of_tied_distances_is_exactly_scale_invariant(metric):
    # Binary samples: many pairs share one distance, which rounding noise must not put in an order.
    x = np.random.default_rng(5).integers(0, 2, (40, 6)).astype(float)
    assert topological_rsa(x, x * 3.3, lower=0.0, upper=1.0, metric=metric).similarity == pytest.approx(1.0, abs=1e-12)
    assert topological_rsa(x, x * 3.3, metric=metric).similarity == pytest.approx(1.0, abs=1e-12)


def test_trsa_transform_thresholds():
    x = np.arange(6, dtype=float).reshape(-1, 1)
    res = topological_rsa(x, x, lower=0.0, upper=1.0)
    # 15 pairs; distances 1..5 with counts 5,4,3,2,1: average ranks 2,6.5,10,12.5,14 of 0..14
    np.testing.assert_allclose(res.rgtm_x[0, 1:], np.array([2.0, 6.5, 10.0, 12.5, 14.0]) / 14)
    tight = topological_rsa(x, x, lower=0.4, upper=0.6)
    assert tight.rgtm_x[0, 1] == 0.0 and tight.rgtm_x[0, 5] == 1.0


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: persistence(np.array([[0.0, np.nan], [1.0, 2.0]])), DataError, "'x' contains 1 NaN"),
        (lambda: persistence(np.ones(5)), DataError, "must be 2-D"),
        (lambda: persistence(np.ones((5, 2))), DataError, "constant over samples"),
        (lambda: persistence(np.eye(4), max_dim=3), ParameterError, "'max_dim' parameter of persistence"),
        (lambda: persistence(np.eye(4), metric="manhattan"), ParameterError, "'metric' parameter of persistence"),
        (lambda: persistence(np.eye(4), max_points=2), ParameterError, "'max_points'"),
        (lambda: persistence(np.eye(4), memory_limit_mb=0), ParameterError, "'memory_limit_mb'"),
        (lambda: persistence(np.eye(4), collapse="yes"), ParameterError, "'collapse'"),
        (lambda: persistence(np.ones((3, 4)), metric="precomputed"), DataError, "square"),
        (lambda: persistence(np.ones((3, 3)), metric="precomputed"), DataError, "zero diagonal"),
        (lambda: persistence(np.triu(np.ones((3, 3)), 1), metric="precomputed"), DataError, "not symmetric"),
        (lambda: persistence(np.array([[0.0, 0], [1, 1], [2, 0]]), metric="cosine"), DataError, "all-zero rows"),
        (lambda: persistence(np.eye(4), max_dim=0).diagram(1), ParameterError, "dimension 1 was not computed"),
        (lambda: diagram_distance(np.ones((3, 3)), np.ones((2, 2))), DataError, r"\(n_bars, 2\)"),
        (lambda: diagram_distance(np.array([[2.0, 1.0]]), np.ones((1, 2))), DataError, "die before"),
        (lambda: diagram_distance(np.ones((1, 2)), np.ones((1, 2)), metric="l2"), ParameterError, "'metric'"),
        (lambda: diagram_distance(np.ones((1, 2)), np.ones((1, 2)), order=0.5), ParameterError, "'order'"),
        (lambda: diagram_distance_matrix({"a": np.eye(4)}, layers_a=["b"]), UnknownLayerError, "unknown layer 'b'"),
        (lambda: diagram_distance_matrix([np.eye(4)]), DataError, "must be Activations"),
        (lambda: persistence_distance(np.eye(4), np.eye(5)), DataError, "same number of samples"),
        (lambda: class_separability(np.eye(5), [0, 1]), DataError, "'labels' has 2 entries"),
        (lambda: class_separability(np.eye(6), [0, 0, 0, 0, 0, 0]), DataError, "between 2 and n_samples - 1"),
        (lambda: class_separability(np.eye(6), [0.5] * 6), DataError, "integer class labels"),
        (lambda: class_separability(np.eye(6), [0, 0, 0, 1, 1, 1], cv=5), DataError, "smallest class has 3"),
        (lambda: class_separability(np.eye(6), cv=1), ParameterError, "'cv' parameter"),
        (lambda: class_separability(np.eye(6), normalize=1), ParameterError, "'normalize'"),
        (lambda: layer_separability({}), DataError, "'acts' must be Activations"),
        (lambda: plateau_index([1.0, np.nan, 2.0]), DataError, "NaN or infinite"),
        (lambda: plateau_index([1.0, 2.0], patience=0), ParameterError, "'patience'"),
        (lambda: separability_trajectory(["a"], None, "fc1"), ParameterError, "at least 2 checkpoints"),
        (lambda: separability_trajectory([1, 2], None, "fc1"), ParameterError, "checkpoint 0 must be"),
        (lambda: topological_rsa(np.eye(4), np.eye(5)), DataError, "same number of samples"),
        (lambda: topological_rsa(np.eye(4), np.eye(4), lower=0.8, upper=0.2), ParameterError, "greater than 'lower'"),
        (lambda: topological_rsa(np.eye(4), np.eye(4), metric="cityblock"), ParameterError, "'metric'"),
        (
            lambda: topological_rsa(np.ones((4, 3)) * [[1], [2], [3], [4]], np.eye(4), metric="correlation"),
            DataError,
            "correlation distance is undefined",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    x = circle(300, noise=0.05, dim=6, seed=15)
    a, b = persistence(x, device="cpu", max_points=150), persistence(x, device="cuda", max_points=150)
    np.testing.assert_array_equal(a.subsample_indices, b.subsample_indices)
    for k in (0, 1):
        assert diagram_distance(a, b, dim=k).distance < 1e-9
    data = blobs(5.0, n_samples=200, n_features=16, n_classes=4, seed=0)
    sa = class_separability(data.x, data.y, device="cpu", probe=False)
    sb = class_separability(data.x, data.y, device="cuda", probe=False)
    assert sa.score == pytest.approx(sb.score, rel=1e-12)
    assert sa.fisher_ratio == pytest.approx(sb.fisher_ratio, rel=1e-9) and sa.thornton_index == sb.thornton_index
    ta = topological_rsa(data.x, data.x**2, device="cpu").similarity
    assert ta == pytest.approx(topological_rsa(data.x, data.x**2, device="cuda").similarity, abs=1e-12)


def test_every_figure_records_the_estimator_and_n():
    from workbench.plots import topology as plots

    a = persistence(circle(60, noise=0.05, seed=16))
    b = persistence(circle(300, noise=0.05, seed=17), max_points=100)
    data = blobs(5.0, n_samples=90, n_features=8, n_classes=3, seed=2)
    layers = layer_separability({"raw": data.x, "squared": data.x**2}, labels=data.y, cv=3)
    figures = [
        plots.persistence_diagram(a, b, titles=["A", "B"]),
        plots.barcode(a, b, dim=0, max_bars=20),
        plots.betti_curves({"l1": a, "l2": b}, names=["A"]),
        plots.diagram_distance_heatmap(diagram_distance_matrix({"l1": a, "l2": b})),
        plots.separability_curves(layers, layers, names=["A", "B"]),
        plots.persistence_times_box(layers),
        plots.trsa_matrices(topological_rsa(data.x, data.x**2)),
    ]
    for fig in figures:
        title = figure_title(fig)
        assert "n = " in title and ("persistence" in title.lower() or "RSA" in title or "score" in title)
    assert "H≥1 on 100 of 300" in figures[0].layout.annotations[1].text
    assert "20 longest of 300" in figures[1].layout.annotations[1].text
    assert len([a for a in figures[4].layout.annotations if "labelled references" in a.text]) == 2
    panels = [a for a in figures[4].layout.annotations if a.yanchor == "bottom"]  # panel titles start at the left edge,
    assert len(panels) == 3 and all(a.x == 0 and a.xanchor == "left" for a in panels)  # not centred past it
    groups = {(t.legendgroup, t.legendgrouptitle.text) for t in figures[4].data if t.legendgrouptitle.text}
    assert groups == {("model 0", "A"), ("model 1", "B")}  # legend: the measures under each model's name
    assert {t.legendgroup for t in figures[4].data} == {"model 0", "model 1"}
    names = [t.name for t in figures[4].data if t.legendgroup == "model 0"]
    assert names[0] == "score S" and "probe accuracy (CV)" in names
    unlabelled = plots.separability_curves(layer_separability({"raw": data.x, "squared": data.x**2}))
    assert not [a for a in unlabelled.layout.annotations if "labelled references" in a.text]  # no empty panels
    assert list(unlabelled.layout.xaxis.categoryarray) == ["raw", "squared"]
    rows = plots.separability_rows(layers, names=["A"])
    assert [r["layer"] for r in rows] == ["raw", "squared"] and rows[0]["score S"] == layers.per_layer["raw"].score
    assert rows[0]["Fisher ratio (max feature)"] == layers.per_layer["raw"].references()["fisher_ratio"]
    assert "fisher_ratio" not in rows[0]


def test_the_distance_heatmap_names_the_models_the_activations_came_from():
    from workbench.activations.types import Activations
    from workbench.plots import topology as plots

    rng = np.random.default_rng(0)
    a = Activations({"l1": torch.from_numpy(rng.standard_normal((40, 3)))}, model_name="seed0")
    b = Activations({"l1": torch.from_numpy(rng.standard_normal((40, 3)))}, model_name="seed1")
    result = diagram_distance_matrix(a, b, dim=0)
    assert (result.model_a, result.model_b) == ("seed0", "seed1")
    fig = plots.diagram_distance_heatmap(result)
    assert (fig.layout.yaxis.title.text, fig.layout.xaxis.title.text) == ("layer of seed0", "layer of seed1")
    named = plots.diagram_distance_heatmap(result, name_a="first", name_b="second")
    assert named.layout.yaxis.title.text == "layer of first"
    plain = plots.diagram_distance_heatmap(diagram_distance_matrix({"l1": persistence(rng.standard_normal((30, 2)))}, dim=0))
    assert plain.layout.yaxis.title.text == "layer of A"  # persistence results name no model


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_persistence_and_its_figures_name_the_point_metric(metric):
    from workbench.plots import topology as plots

    a = persistence(circle(60, noise=0.05, seed=20) + 3.0, metric=metric)
    h0 = persistence(circle(60, noise=0.05, seed=20) + 3.0, metric=metric, max_dim=0)
    assert f"{metric} distance" in a.estimator and f"{metric} distance" in h0.estimator
    assert f"{metric} distance" in diagram_distance_matrix({"l1": a, "l2": h0}, dim=0).estimator
    diagram = plots.persistence_diagram(a)
    bars = plots.barcode(a, dim=0)
    betti = plots.betti_curves({"l1": a, "l2": h0}, dim=0)
    raw = plots.betti_curves({"l1": a, "l2": h0}, dim=0, normalize_scale=False)
    assert all(f"{metric} distance" in figure_title(fig) for fig in (diagram, bars, betti))
    assert (diagram.layout.xaxis.title.text, diagram.layout.yaxis.title.text) == (f"birth ({metric} distance)",
                                                                                  f"death ({metric} distance)")
    assert bars.layout.xaxis.title.text == f"filtration value ({metric} distance)"
    # (on a log axis, " (log scale)" follows, where the last merge is far beyond the others: with cosine distances here)
    assert betti.layout.xaxis.title.text.startswith(f"{metric} distance / largest H0 death")
    assert raw.layout.xaxis.title.text == f"filtration value ({metric} distance)"


def test_betti_curves_are_scaled_by_the_largest_death_of_the_dimension_shown():
    from workbench.plots import topology as plots

    cloud = circle(80, noise=0.05, seed=3)
    outlier = np.vstack([cloud, [[40.0, 40.0]]])  # one far point: a long H0 bar, the same loop
    plain, far = persistence(cloud), persistence(outlier)
    fig = plots.betti_curves({"c": plain}, {"c": far}, names=["plain", "outlier"], dim=1)
    # where each H1 curve drops to 0 for the last time: the last death, which is the largest H1 death (1 on the axis)
    ends = [float(np.asarray(t.x)[np.flatnonzero(np.asarray(t.y) > 0)[-1] + 1]) for t in fig.data]
    # the loop's curve spans the whole axis in both panels, exactly (steps, not samples of the result's grid); scaled
    # by the largest death of any dimension, the outlier's H0 bar squeezed it below 0.1
    np.testing.assert_allclose(ends, [1.0, 1.0], rtol=1e-12)
    assert float(np.max(np.asarray(far.betti_grid)[np.asarray(far.betti_curves[1]) > 0])) / far.betti_grid[-1] < 0.1
    assert fig.layout.xaxis.title.text.endswith("/ largest H1 death")


def test_betti_0_curves_with_an_outlier_are_drawn_on_a_log_axis_so_the_fall_is_not_crowded_against_0():
    from workbench.plots import topology as plots

    cloud = circle(80, noise=0.05, seed=3)
    far = persistence(np.vstack([cloud, [[40.0, 40.0]]]))  # the last merge is ~40 times the others
    fig = plots.betti_curves({"c": far}, names=["outlier"], dim=0)
    axis = fig.layout.xaxis
    assert axis.type == "log" and axis.title.text.endswith("/ largest H0 death (log scale)")
    x, beta, t = (np.asarray(v, dtype=float) for v in (fig.data[0].x, fig.data[0].y, fig.data[0].customdata))
    assert beta[0] == 81 and t[0] == 0.0 and 10 ** axis.range[0] < x[0] < x[1]  # starts left of the first step
    halved = np.log10(x[np.argmax(beta <= 40)])  # where half the components have merged
    assert (halved - axis.range[0]) / (axis.range[1] - axis.range[0]) > 0.25  # on a linear axis it was below 0.05
    assert x[np.argmax(beta <= 40)] < 0.05
    np.testing.assert_array_equal(x[1:], t[1:])  # only the start at 0 is moved; hover gives the true values
    plain = plots.betti_curves({"c": persistence(cloud)}, names=["plain"], dim=1)  # no outlier: a linear axis
    assert plain.layout.xaxis.type is None and list(plain.layout.xaxis.range) == [0, 1.02]


def test_a_bar_that_never_dies_ends_at_the_infinity_tick_of_the_barcode():
    from workbench.plots import topology as plots

    a, b = persistence(circle(40, noise=0.05, seed=1)), persistence(3 * circle(40, noise=0.05, seed=2))
    h0 = plots.barcode(a, b, dim=0)
    for axis in (h0.layout.xaxis, h0.layout.xaxis2):
        assert axis.ticktext[-1] == "∞" and axis.tickvals[-1] > max(_finite_deaths(a) + _finite_deaths(b))
        assert "∞" not in axis.ticktext[:-1]
    longest = np.asarray(h0.data[0].x, dtype=float)[:2]  # the first bar drawn is the never-dying one
    assert longest[1] == h0.layout.xaxis.tickvals[-1]
    h1 = plots.barcode(a, b, dim=1)  # no H1 bar is endless: plain numbers
    assert h1.layout.xaxis.ticktext is None


def _finite_deaths(r):
    deaths = np.concatenate([dg[:, 1] for dg in r.diagrams.values()])
    return list(deaths[np.isfinite(deaths)])


def test_betti_steps_are_the_exact_betti_curve():
    cloud = circle(60, noise=0.05, seed=4)
    res = persistence(cloud)
    for dim in (0, 1):
        t, beta = res.betti_steps(dim)
        assert t[0] == 0.0 and t[-1] == res.betti_grid[-1] and np.all(np.diff(t) > 0)
        dgm = res.diagram(dim)
        # at every grid value the steps give what the grid-sampled curve counts
        at = beta[np.searchsorted(t, res.betti_grid, side="right") - 1]
        np.testing.assert_array_equal(at, res.betti_curves[dim])
        # and just before and at each finite death, the count drops by the bars dying there
        for death in np.unique(dgm[np.isfinite(dgm[:, 1]), 1])[:5]:
            i = np.searchsorted(t, death)
            assert beta[i - 1] - beta[i] >= (dgm[:, 1] == death).sum() - (dgm[:, 0] == death).sum()
    t0, beta0 = res.betti_steps(0)
    assert beta0[0] == 60 and beta0[-1] == 1  # every point at 0, one component at the end
    for bad in (-1, "0", 0.0, True):
        with pytest.raises(ParameterError, match=r"A homology dimension is an int in 0\.\.1; got "):
            res.betti_steps(bad)
    with pytest.raises(ParameterError, match=r"dimension 2 was not computed\. Recompute with max_dim=2"):
        res.diagram(2)


TEXT_LAYERS = ["embed", "layers.0.norm1", "layers.0.linear1", "layers.0.linear2", "layers.0.norm2", "layers.1.norm1",
               "layers.1.linear1", "layers.1.linear2", "layers.1.norm2", "norm", "out"]


@pytest.mark.parametrize("dim", [0, 1])
def test_betti_legend_of_one_model_with_eleven_long_layer_names_shows_every_entry(dim):
    from workbench.plots import topology as plots

    group = {name: persistence(circle(30, noise=0.1, seed=i)) for i, name in enumerate(TEXT_LAYERS)}
    fig = plots.betti_curves(group, names=["A (text_transformer_seed0)"], dim=dim)
    entries = [t for t in fig.data if t.showlegend is not False]
    groups = len({t.legendgroup for t in entries})
    gap = fig.layout.legend.tracegroupgap if fig.layout.legend.tracegroupgap is not None else 10  # plotly's default
    plot = fig.layout.height - fig.layout.margin.t - 80  # plotly's bottom margin
    assert [t.name for t in entries] == TEXT_LAYERS
    assert plot >= 19 * len(entries) + gap * (groups - 1)  # in Chromium: 19 px a row, and the gap between groups


# ---------------------------------------------------------------------------------------------
# data at the ends of the float64 range


def test_subnormal_data_give_the_diagrams_and_scores_of_the_data_at_ordinary_scale():
    # unit_scale asked for 2**1029 to bring 1e-310 near 1: every call raised OverflowError (math range error)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 30)), rng.standard_normal((200, 30))
    labels = np.arange(200) % 3
    tiny = 1e-310
    a, b = persistence(x), persistence(x * tiny)
    for dim in (0, 1):
        assert b.diagram(dim).shape == a.diagram(dim).shape
        np.testing.assert_allclose(b.diagram(dim) / tiny, a.diagram(dim), rtol=1e-12, atol=1e-12)
    for metric, order in (("bottleneck", 1.0), ("wasserstein", 1.0), ("wasserstein", 2.0)):
        expected = persistence_distance(x, y, metric=metric, order=order).distance
        got = persistence_distance(x * tiny, y * tiny, metric=metric, order=order).distance  # bottleneck: 0
        assert got / tiny == pytest.approx(expected, rel=1e-10), (metric, order)
    assert class_separability(x * tiny, labels).score == pytest.approx(class_separability(x, labels).score, rel=1e-12)
    assert topological_rsa(x * tiny, y).similarity == pytest.approx(topological_rsa(x, y).similarity, abs=1e-12)


@pytest.mark.parametrize("scale", [1e300, 1e-200, 1e-310])
def test_diagram_distances_scale_with_the_diagrams(scale):
    # gudhi's bottleneck gave 0 for subnormal diagrams; its order-2 Wasserstein never returned at 1e300 or 1e-200
    a = np.array([[0.1, 0.5], [0.2, 0.9], [0.0, np.inf]])
    b = np.array([[0.15, 0.55], [0.3, 0.6], [0.0, np.inf]])
    for metric, order in (("bottleneck", 1.0), ("wasserstein", 1.0), ("wasserstein", 2.0)):
        expected = diagram_distance(a, b, metric=metric, order=order).distance
        got = diagram_distance(a * scale, b * scale, metric=metric, order=order).distance
        assert got / scale == pytest.approx(expected, rel=1e-12), (metric, order)


def test_a_matrix_of_given_diagrams_records_the_settings_they_were_computed_with():
    from workbench.analyses.topology import persistence

    rng = np.random.default_rng(0)
    diagrams = {name: persistence(rng.normal(size=(40, 3)), metric="cosine", max_points=30, seed=3) for name in ("a", "b")}
    result = diagram_distance_matrix(diagrams, dim=0)
    # not this call's defaults (euclidean, 1000 points, seed 0): rerunning from the recorded settings gives the same matrix
    assert result.params["point_metric"] == "cosine" and result.params["max_points"] == 30 and result.seed == 3


def test_empty_diagrams_are_listed_and_explained():
    t = torch.linspace(0, 2 * math.pi, 61)[:-1]
    circle, line = torch.stack([t.cos(), t.sin()], 1), torch.stack([t, 0 * t], 1)
    r = diagram_distance_matrix({"circle": circle, "line": line}, None, dim=1)
    assert r.empty == ["line"]  # a line has no loop; the circle has one
    # the distance to an empty diagram is half the other's longest (scale-normalised) bar
    bar = r.distances[0, 1]
    assert bar > 0.4 and r.distances[1, 0] == bar
    assert empty_diagrams_note(r) == "line has no H1 bar: a distance to an empty diagram is half the other diagram's longest bar."
    few = diagram_distance_matrix({"a": circle[::20], "b": line[::20]}, None, dim=1)  # 3 points each: no loops at all
    assert few.empty == ["a", "b"] and not few.distances.any()
    assert empty_diagrams_note(few).startswith("No layer has an H1 bar on these 3 samples, so every distance is 0")
    assert empty_diagrams_note(diagram_distance_matrix({"a": circle, "b": circle * 2}, None, dim=1)) == ""
    from workbench.registry import summarize

    assert summarize(few)["diagram distances"]["empty H1 diagrams"] == empty_diagrams_note(few)
