"""Embeddings, kNN graphs, trustworthiness and intrinsic dimension: references, known answers, errors, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.analyses import knn as knn_module
from workbench.analyses.embedding import (
    AlignedEmbeddingResult,
    EmbeddingResult,
    aligned_embedding,
    embed,
    intrinsic_dimension,
    layer_intrinsic_dimension,
    trustworthiness,
    warm_up,
)
from workbench.analyses.knn import clear_knn_cache, knn_graph
from workbench.errors import DataError, ParameterError
from workbench.plots._style import figure_title
from workbench.plots.embedding import embedding_scatter, intrinsic_dimension_profile


def _blobs(n: int = 300, d: int = 20, n_classes: int = 5, separation: float = 12.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % n_classes
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _torus_in_50d(n: int, seed: int = 0) -> np.ndarray:
    """A flat 3-torus (a 3-D manifold) embedded isometrically in R^6, rotated into R^50."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, size=(n, 3))
    torus = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    basis, _ = np.linalg.qr(rng.normal(size=(50, 6)))
    return torus @ basis.T


@pytest.fixture(scope="module")
def umap_ready() -> float:
    """Compile umap-learn's kernels once for this module (the same path the app warms up)."""
    return warm_up()


# ---------------------------------------------------------------------------------------------
# kNN graph


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knn_graph_matches_sklearn_brute_force(metric, dtype):
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(0).normal(size=(400, 30)).astype(dtype)
    graph = knn_graph(x, 7, metric=metric)
    distances, indices = (
        NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(x.astype(np.float64)).kneighbors()
    )
    assert np.array_equal(graph.indices, indices)
    assert np.allclose(graph.distances, distances, atol=1e-5 if dtype == np.float32 else 1e-10)
    assert graph.indices.shape == (400, 7) and graph.distances.dtype == np.float64
    assert (np.diff(graph.distances, axis=1) >= 0).all()


def test_knn_graph_is_exact_where_distances_concentrate():
    # Duplicated high-dimensional Gaussians: every pairwise distance is nearly the same, so the float32
    # candidate list cannot be trusted and rows are searched again in float64.
    rng = np.random.default_rng(1)
    x = np.repeat(rng.normal(size=(60, 800)), 4, axis=0).astype(np.float32)
    graph = knn_graph(x, 6)
    diff = x[:, None, :].astype(np.float64) - x[None, :, :]
    full = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(full, np.inf)
    expected = np.sort(full, axis=1)[:, :6]
    assert np.allclose(graph.distances, expected, atol=1e-4)
    assert (graph.distances[:, :3] == 0).all()  # the three copies come first, ties broken by index
    assert (np.diff(graph.indices[:, :3], axis=1) > 0).all()


@pytest.mark.parametrize(("n", "d", "offset", "noise"), [(2000, 32, 100.0, 0.1), (500, 8, 1000.0, 0.01)])
def test_cosine_knn_graph_is_exact_for_nearly_parallel_float32_rows(n, d, offset, noise):
    # Every row points almost the same way, so the cosine distances (1e-6 and 1e-10) sit far below
    # float32 resolution of the unit rows; the float32 values themselves are taken exactly.
    clear_knn_cache()
    z = (np.random.default_rng(1).standard_normal((n, d)) * noise + offset).astype(np.float32)
    graph = knn_graph(z, 10, metric="cosine")
    zz = z.astype(np.float64)
    zz /= np.abs(zz).max(axis=1, keepdims=True)
    unit = zz / np.linalg.norm(zz, axis=1, keepdims=True)
    full = np.empty((n, n))
    for lo in range(0, n, 250):
        diff = unit[lo : lo + 250, None, :] - unit[None, :, :]
        full[lo : lo + 250] = (diff * diff).sum(-1) / 2.0  # 1 - cos, without the cancellation of 1 - a.b
    np.fill_diagonal(full, np.inf)
    expected_idx = np.argsort(full, axis=1, kind="stable")[:, :10]
    expected = np.take_along_axis(full, expected_idx, axis=1)
    assert np.array_equal(graph.indices, expected_idx)
    assert np.allclose(graph.distances, expected, rtol=1e-12, atol=0.0)
    gram = 1.0 - unit @ unit.T
    np.fill_diagonal(gram, np.inf)
    gram_idx = np.argsort(gram, axis=1, kind="stable")[:, :10]
    assert all(set(a) == set(b) for a, b in zip(graph.indices, gram_idx, strict=True))


def test_knn_graph_cache_reuses_and_truncates():
    clear_knn_cache()
    x = np.random.default_rng(2).normal(size=(200, 5))
    big = knn_graph(x, 12)
    small = knn_graph(x.copy(), 4)  # same content, new array
    assert np.array_equal(small.indices, big.indices[:, :4])
    assert small.sha256 == big.sha256 and small.k == 4
    calls = []
    knn_graph(x, 10, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]
    idx, dist = big.with_self(5)
    assert idx.shape == (200, 6) and (idx[:, 0] == np.arange(200)).all() and (dist[:, 0] == 0).all()


def test_cached_knn_graph_cannot_be_edited_by_a_caller():
    clear_knn_cache()
    x = _torus_in_50d(300, seed=3)
    before_id = intrinsic_dimension(x, method="mle").dimension
    before_quality = embed(x, method="pca").knn_preservation
    graph = knn_graph(x, 20)
    with pytest.raises(ValueError, match="read-only"):
        graph.indices[:] = 0
    with pytest.raises(ValueError, match="read-only"):
        graph.distances[:, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        knn_graph(x, 5).indices[:] = 0  # a truncated view of the cached graph
    assert intrinsic_dimension(x, method="mle").dimension == before_id
    assert embed(x, method="pca").knn_preservation == before_quality


def test_knn_graph_errors():
    x = np.random.default_rng(3).normal(size=(10, 3))
    with pytest.raises(ParameterError, match="'k' parameter of knn_graph must be an int in \\[1, 9\\]"):
        knn_graph(x, 10)
    with pytest.raises(ParameterError, match="'metric' parameter of knn_graph must be one of"):
        knn_graph(x, 2, metric="manhattan")
    zero = x.copy()
    zero[4] = 0.0
    with pytest.raises(DataError, match="cosine distance is undefined for all-zero rows and 'x' has 1"):
        knn_graph(zero, 2, metric="cosine")
    with pytest.raises(DataError, match="^embed: the cosine distance is undefined for all-zero rows and 'x' has 1"):
        embed(zero, method="pca", metric="cosine")  # named by the function the user called
    with pytest.raises(DataError, match="^trustworthiness: the cosine distance is undefined for all-zero rows"):
        trustworthiness(zero, zero[:, :2], k=2, metric="cosine")
    tiny = x * 1e-200  # rows whose squared norms underflow: still their directions
    assert np.array_equal(knn_graph(tiny, 2, metric="cosine").indices, knn_graph(x, 2, metric="cosine").indices)


# ---------------------------------------------------------------------------------------------
# quality scores


@pytest.mark.parametrize("k", [3, 10])
def test_trustworthiness_equals_sklearn(k):
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    rng = np.random.default_rng(4)
    x = rng.normal(size=(150, 12))
    view = x[:, :2] + 0.5 * rng.normal(size=(150, 2))
    assert trustworthiness(x, view, k=k) == pytest.approx(sk_trustworthiness(x, view, n_neighbors=k), abs=1e-12)


def test_trustworthiness_extremes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 2))
    assert trustworthiness(x, x * 3.0 + 1.0) == pytest.approx(1.0)
    assert abs(trustworthiness(x, rng.normal(size=(200, 2))) - 0.5) < 0.08


def test_trustworthiness_of_tight_clusters_far_from_the_centre_is_exact():
    # Neighbour distances of 1e-3 next to norms of 100: a float32 expansion ranked rounding noise (0.94).
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    rng = np.random.default_rng(6)
    x = 100.0 * rng.normal(size=(5, 8))[np.arange(100) % 5] + 1e-3 * rng.normal(size=(100, 8))
    assert trustworthiness(x, x, k=5) == 1.0
    assert sk_trustworthiness(x, x, n_neighbors=5) == 1.0


# ---------------------------------------------------------------------------------------------
# embeddings


def test_pca_matches_sklearn_up_to_sign_and_is_deterministic():
    from sklearn.decomposition import PCA

    x, _ = _blobs(n=120, d=8)
    result = embed(x, method="pca", n_components=3)
    reference = PCA(n_components=3).fit(x.astype(np.float64))
    expected = reference.transform(x.astype(np.float64))
    assert np.allclose(np.abs(result.coordinates), np.abs(expected), atol=1e-4)
    assert np.allclose(result.explained_variance_ratio, reference.explained_variance_ratio_, atol=1e-6)
    assert result.seed is None and result.method == "pca"
    again = embed(x.copy(), method="pca", n_components=3)
    assert np.array_equal(again.coordinates, result.coordinates)
    wide = embed(np.random.default_rng(6).normal(size=(20, 50)), method="pca")  # more features than samples
    assert wide.coordinates.shape == (20, 2) and wide.explained_variance_ratio[0] >= wide.explained_variance_ratio[1]


def test_pca_of_a_plane_is_perfectly_trustworthy():
    rng = np.random.default_rng(7)
    plane = rng.normal(size=(150, 2)) @ rng.normal(size=(2, 10))
    result = embed(plane, method="pca")
    assert result.trustworthiness == pytest.approx(1.0) and result.knn_preservation == pytest.approx(1.0)
    assert result.explained_variance_ratio.sum() == pytest.approx(1.0)


def test_umap_of_separated_blobs_is_trustworthy_and_reproducible(umap_ready):
    x, _ = _blobs()
    calls = []
    first = embed(x, method="umap", seed=0, progress=lambda done, total: calls.append((done, total)))
    second = embed(x, method="umap", seed=0)
    assert isinstance(first, EmbeddingResult) and first.coordinates.shape == (300, 2)
    assert first.trustworthiness > 0.9
    assert first.knn_preservation > 0.3
    assert np.array_equal(first.coordinates, second.coordinates)
    assert first.seed == 0 and first.params["n_neighbors"] == 15 and first.params["n_epochs"] == 500
    assert "UMAP" in first.estimator
    assert calls[-1] == (1000, 1000) and all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) > 3  # epochs reported, not only the start and the end


def test_umap_layout_epoch_equals_the_edge_by_edge_update_with_both_ends_moved(monkeypatch):
    """One synchronous epoch of the torch layout (twice the per-head sums of a symmetric graph) equals
    moving both ends of every sampled edge, as umap-learn does, when all forces use the epoch-start positions."""
    from umap.umap_ import make_epochs_per_sample

    from workbench.analyses import umap_layout

    x, _ = _blobs(n=60, d=5, n_classes=3)
    idx, dist = knn_graph(x, 7).with_self(7)
    graph = umap_layout.fuzzy_graph(idx, dist, 10, seed=0)
    dense = graph.toarray()
    assert np.array_equal(dense, dense.T) and np.all(np.diff(graph.row) >= 0)
    start = np.random.default_rng(0).uniform(0, 10, size=(60, 2))
    start = 10 * (start - start.min(0)) / np.ptp(start, 0)  # already in the box the layout rescales its start to
    monkeypatch.setattr(umap_layout, "_repel", lambda *args: None)
    # epoch 0 samples nothing; epoch 1 samples the edges whose epochs_per_sample is 1 (the strongest ones)
    ours = umap_layout.optimize_layout(start, graph, min_dist=0.1, n_epochs=2, seed=0, learning_rate=0.3)
    a, b = umap_layout.kernel_params(0.1)
    y = start.astype(np.float32).astype(np.float64)
    expected = y.copy()
    every = make_epochs_per_sample(graph.data, 2)
    for head, tail, e in zip(graph.row, graph.col, every):
        if e <= 1:
            diff = y[head] - y[tail]
            d2 = float(diff @ diff)
            grad = np.clip(-2 * a * b * d2 ** (b - 1) / (a * d2**b + 1) * diff, -4, 4) * 0.3 * 0.5
            expected[head] += grad
            expected[tail] -= grad
    assert (every <= 1).sum() > 10
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_umap_layout_matches_umap_learns_optimiser_in_quality(umap_ready):
    """The batched layout keeps neighbourhoods as well as umap-learn's edge-by-edge SGD on the same graph and start."""
    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import make_epochs_per_sample

    from workbench.analyses import umap_layout

    x, y = _blobs(n=600, d=30, n_classes=6, separation=6.0)
    idx, dist = knn_graph(x, 14).with_self(14)
    graph = umap_layout.fuzzy_graph(idx, dist, 200, seed=0)
    start = umap_layout.spectral_start(x, graph, 2, "euclidean", seed=0)
    a, b = umap_layout.kernel_params(0.1)
    scaled = (10 * (start - start.min(0)) / np.ptp(start, 0)).astype(np.float32)
    reference = optimize_layout_euclidean(
        scaled.copy(), scaled.copy(), graph.row, graph.col, 200, 600, make_epochs_per_sample(graph.data, 200), a, b,
        np.array([1, 2, 3], dtype=np.int64), 1.0, 1.0, 5, parallel=False, move_other=True,
    )
    ours = umap_layout.optimize_layout(start, graph, min_dist=0.1, n_epochs=200, seed=0)
    assert trustworthiness(x, ours, k=10) >= trustworthiness(x, reference, k=10) - 0.01
    # the clusters come apart: each sample's nearest layout neighbours share its class
    neighbours = knn_graph(ours, 10).indices
    assert (y[neighbours] == y[:, None]).mean() > 0.95


def test_umap_places_disconnected_groups_and_embeds_in_3d(umap_ready):
    x, _ = _blobs(n=200, d=8, n_classes=2, separation=200.0)
    result = embed(x, method="umap", n_neighbors=5, n_components=3, seed=3)
    assert result.coordinates.shape == (200, 3) and np.isfinite(result.coordinates).all()
    assert result.trustworthiness > 0.85
    other = embed(x, method="umap", n_neighbors=5, n_components=3, seed=4)
    assert not np.array_equal(result.coordinates, other.coordinates)


def test_tsne_of_separated_blobs():
    x, _ = _blobs(n=120, d=10)
    result = embed(x, method="tsne", perplexity=10.0, seed=1)
    assert result.coordinates.shape == (120, 2)
    assert result.trustworthiness > 0.9


def test_aligned_pca_views_of_a_rotated_copy_coincide():
    x, y = _blobs(n=150, d=10)
    rotation, _ = np.linalg.qr(np.random.default_rng(8).normal(size=(10, 10)))
    result = aligned_embedding({"A": x, "B": x @ rotation.astype(np.float32)}, method="pca")
    assert isinstance(result, AlignedEmbeddingResult)
    assert result.names == ("A", "B") and result.coordinates.shape == (2, 150, 2)
    assert result.disparity[1] < 1e-6 and result.displacement[1].max() < 1e-3
    assert np.allclose(np.sqrt((result.coordinates[0] ** 2).sum(1).mean()), 1.0)


def test_aligned_umap_views_share_a_frame(umap_ready):
    x, y = _blobs()
    rotation, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(20, 20)))
    result = aligned_embedding([x, (x @ rotation).astype(np.float32)], method="umap", seed=0)
    assert result.names == ("view 0", "view 1")
    assert (result.trustworthiness > 0.9).all()
    # The same neighbourhoods: every cluster of view 1 lies nearest to the same cluster's place in view 0.
    centroids = np.stack([[view[y == c].mean(0) for c in range(5)] for view in result.coordinates])
    nearest = np.linalg.norm(centroids[1][:, None, :] - centroids[0][None, :, :], axis=2).argmin(axis=1)
    assert list(nearest) == list(range(5))
    assert result.disparity[1] < 0.5 and result.displacement[0].max() == 0.0


def test_defaults_fit_a_small_dataset(umap_ready):
    # 12 samples: the defaults n_neighbors=15 and perplexity=30 are out of range, and the user set neither
    x, _ = _blobs(n=12, d=5)
    assert embed(x, method="umap", n_epochs=20).params["n_neighbors"] == 11
    assert embed(x, method="tsne").params["perplexity"] == pytest.approx(11 / 3)
    with pytest.raises(ParameterError, match="'n_neighbors' parameter of embed must be an int in \\[2, 11\\]. Got 15"):
        embed(x, method="umap", n_neighbors=15)  # an explicit value is never changed


def test_embedding_errors():
    x, _ = _blobs(n=40, d=5)
    with pytest.raises(ParameterError, match="'method' parameter of embed must be one of 'umap', 'pca', 'tsne'"):
        embed(x, method="mds")
    with pytest.raises(
        ParameterError, match="'perplexity' parameter of embed applies to method='tsne' only, not method='umap'"
    ):
        embed(x, method="umap", perplexity=5.0)
    with pytest.raises(ParameterError, match="'n_neighbors' parameter of embed must be an int in \\[2, 39\\]"):
        embed(x, method="umap", n_neighbors=40)
    with pytest.raises(ParameterError, match="'n_components' parameter of embed must be an int in \\[1, 5\\]"):
        embed(x, method="pca", n_components=6)
    with pytest.raises(DataError, match="embed: 'x' is constant over samples"):
        embed(np.ones((30, 4)), method="pca")
    with pytest.raises(DataError, match="aligned_embedding: view 'view 0': embed: 'x' is constant over samples"):
        aligned_embedding([np.full((60, 10), 0.3)] * 2, method="pca")  # its mean differs from 0.3 by rounding
    with pytest.raises(DataError, match="embed: 'x' must be 2-D"):
        embed(np.ones(30), method="pca")
    with pytest.raises(DataError, match="'xs' needs at least one view"):
        aligned_embedding([], method="pca")
    single = aligned_embedding([x], method="pca")  # one model: its own frame, nothing to align
    assert single.coordinates.shape == (1, 40, 2) and single.disparity.tolist() == [0.0]
    with pytest.raises(DataError, match="every view must have the same samples \\(rows\\). Got \\[40, 30\\]"):
        aligned_embedding([x, x[:30]], method="pca")
    with pytest.raises(DataError, match="trustworthiness: 'x' and 'embedding' must have the same number of samples"):
        trustworthiness(x, x[:30, :2])


def test_embedding_result_is_json_safe():
    x, _ = _blobs(n=60, d=5)
    data = json.loads(json.dumps(embed(x, method="pca").to_dict()))
    assert data["result_type"] == "EmbeddingResult" and len(data["coordinates"]) == 60


# ---------------------------------------------------------------------------------------------
# intrinsic dimension


@pytest.mark.parametrize("method", ["twonn", "mle"])
def test_intrinsic_dimension_of_a_3d_manifold_in_50d(method):
    result = intrinsic_dimension(_torus_in_50d(1500), method=method)
    assert 2.5 <= result.dimension <= 3.5
    assert result.ci_low <= result.dimension <= result.ci_high
    assert result.ci_high - result.ci_low < 0.5


@pytest.mark.parametrize("dim", [2, 5])
def test_intrinsic_dimension_of_uniform_cubes(dim):
    x = np.random.default_rng(dim).uniform(size=(1500, dim))
    assert abs(intrinsic_dimension(x).dimension - dim) < 0.15 * dim + 0.2
    assert abs(intrinsic_dimension(x, method="mle").dimension - dim) < 0.15 * dim + 0.2


def test_twonn_and_mle_follow_their_formulas():
    x = _torus_in_50d(300, seed=3)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    ordered = np.sort(dist, axis=1)
    # TwoNN (Facco et al. 2017): slope through the origin of -log(1 - F) on log(mu), top 10% of mu dropped
    mu = np.sort(ordered[:, 1] / ordered[:, 0])
    keep = int(np.floor(0.9 * len(mu)))
    xs = np.log(mu[:keep])
    ys = -np.log(1 - np.arange(1, keep + 1) / len(mu))
    assert intrinsic_dimension(x).dimension == pytest.approx((xs @ ys) / (xs @ xs), rel=1e-9)
    # Levina-Bickel local estimates with k = 8, pooled as the inverse of the mean inverse
    k = 8
    inverse = [np.mean([np.log(ordered[i, k - 1] / ordered[i, j]) for j in range(k - 1)]) for i in range(len(x))]
    result = intrinsic_dimension(x, method="mle", k=k)
    assert result.dimension == pytest.approx(1.0 / np.mean(inverse), rel=1e-9)
    assert np.allclose(result.local, 1.0 / np.array(inverse))


def test_intrinsic_dimension_skips_duplicates_and_per_layer():
    x = _torus_in_50d(400)
    doubled = np.concatenate([x, x[:50]])
    result = intrinsic_dimension(doubled)
    assert result.n_discarded == 50 and result.local.shape == (400,)  # each copy counted once, nothing biased
    assert result.dimension == intrinsic_dimension(x).dimension
    for method in ("twonn", "mle"):  # a distinct sample next to a duplicated pair no longer sees r2 = r1
        cube = np.random.default_rng(1).random((1000, 4))
        plain = intrinsic_dimension(cube, method=method).dimension
        assert intrinsic_dimension(np.concatenate([cube, cube[:500]]), method=method).dimension == pytest.approx(plain, rel=1e-12)
    assert intrinsic_dimension(x.astype(np.float32)).dtype == "float64"  # distances in float64 from float32 inputs
    layers = {"torus": x, "plane": np.random.default_rng(0).normal(size=(400, 2)) @ np.ones((2, 30))}
    calls = []
    profile = layer_intrinsic_dimension(layers, method="mle", progress=lambda d, t: calls.append((d, t)))
    assert profile.layers == ("torus", "plane") and list(profile.n_features) == [50, 30]
    assert 2.4 < profile.dimension[0] < 3.6 and profile.dimension[1] < 1.3  # the "plane" is a line
    assert calls == [(1, 2), (2, 2)]
    fig = intrinsic_dimension_profile(profile, names=["A"])
    assert list(fig.data[0].x) == ["torus", "plane"] and "n = 400" in figure_title(fig)


def test_intrinsic_dimension_profile_slants_long_layer_names_so_they_stay_apart():
    names = ["embed", "layers.0.norm1", "layers.0.linear1", "layers.0.linear2", "layers.0.norm2", "layers.1.norm1",
             "layers.1.linear1", "layers.1.linear2", "layers.1.norm2", "norm", "out"]
    rng = np.random.default_rng(0)
    text = layer_intrinsic_dimension({name: rng.normal(size=(60, 6)) for name in names})
    mlp = layer_intrinsic_dimension({name: rng.normal(size=(60, 6)) for name in ["fc1", "relu1", "out"]})
    for fig in (intrinsic_dimension_profile(text, names=["text"]), intrinsic_dimension_profile(mlp, text)):
        assert fig.layout.xaxis.tickangle not in (None, 0) and fig.layout.xaxis.automargin  # level, they run together
        assert list(fig.layout.xaxis.ticktext or fig.layout.xaxis.categoryarray)[-len(names):] == names


def test_intrinsic_dimension_errors():
    with pytest.raises(ParameterError, match="'k' parameter of intrinsic_dimension applies to method='mle' only"):
        intrinsic_dimension(_torus_in_50d(100), k=5)
    with pytest.raises(DataError, match="intrinsic_dimension: 'x' needs at least 20 samples. Got 10"):
        intrinsic_dimension(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(DataError, match="at least 10 distinct samples are needed"):
        intrinsic_dimension(np.repeat(np.random.default_rng(0).normal(size=(5, 3)), 6, axis=0))
    with pytest.raises(DataError, match="layer 'b': intrinsic_dimension: 'x' is constant over samples"):
        layer_intrinsic_dimension({"a": _torus_in_50d(100), "b": np.zeros((100, 4))})
    with pytest.raises(ParameterError, match="'method' parameter of intrinsic_dimension must be one of 'twonn', 'mle'"):
        intrinsic_dimension(_torus_in_50d(100), method="pca")
    grid = np.stack(np.meshgrid(np.arange(15), np.arange(15)), -1).reshape(-1, 2).astype(float)  # every r2 == r1
    with pytest.raises(DataError, match="225 of 225 samples have their two nearest neighbours at the same distance"):
        intrinsic_dimension(grid)  # the fit gave dimension 0 with a 95% interval [0, 0]
    with pytest.raises(DataError, match="198 of 200 samples have their two nearest neighbours at the same distance"):
        intrinsic_dimension(np.linspace(0, 1, 200)[:, None])  # equal spacings up to rounding (the ends have one neighbour): a fit would give 9e13
    assert intrinsic_dimension(grid, method="mle").dimension == pytest.approx(2, abs=0.6)


# ---------------------------------------------------------------------------------------------
# plots


def test_a_rotated_view_names_its_axes_by_the_frame_it_was_rotated_into():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    result = aligned_embedding({"A · out": x, "B · out": x + 0.1 * rng.normal(size=x.shape)}, method="pca")
    first, second = (embedding_scatter(result, view=v).layout for v in (0, 1))
    assert (first.xaxis.title.text, first.yaxis.title.text) == ("PCA 1", "PCA 2")
    assert (second.xaxis.title.text, second.yaxis.title.text) == ("PCA 1 (frame of A · out)", "PCA 2 (frame of A · out)")


def test_embedding_scatter_carries_indices_labels_and_selection():
    x, y = _blobs(n=60, d=5, n_classes=3)
    result = embed(x, method="pca")
    fig = embedding_scatter(result, color=y, selected=[0, 4, 5])
    assert len(fig.data) == 3  # one trace per class
    first = fig.data[0]
    assert [int(c[0]) for c in first.customdata] == list(range(0, 60, 3))
    assert "sample %{customdata[0]}" in first.hovertemplate
    assert list(first.selectedpoints) == [0]  # sample 0 is the first point of class 0
    assert list(fig.data[1].selectedpoints) == [1] and list(fig.data[2].selectedpoints) == [1]  # samples 4 and 5
    assert "trustworthiness@10" in figure_title(fig) and "n = 60" in figure_title(fig)
    scalar = embedding_scatter(result, color=np.linspace(0, 1, 60), color_name="norm")
    assert len(scalar.data) == 1 and scalar.data[0].marker.showscale
    aligned = aligned_embedding({"A": x, "B": x[:, ::-1].copy()}, method="pca")
    fig_b = embedding_scatter(aligned, view=1, color=y)
    assert figure_title(fig_b).startswith("B")
    from workbench.errors import ParameterError

    for kwargs, message in [({"color": y[:10]}, r"'color' must give one value per sample, shape \(60,\); got shape \(10,\)"),
                            ({"labels": y[:, None]}, r"'labels' must give one value per sample"),
                            ({"selected": [3, 60]}, r"'selected' must hold sample indices in \[0, 59\]"),
                            ({"view": 2}, r"'view' must be 0 to 1 \(the views \['A', 'B'\]\); got 2")]:
        with pytest.raises(ParameterError, match=message):
            embedding_scatter(aligned, **kwargs)


def test_inputs_are_not_modified():
    x, _ = _blobs(n=80, d=6)
    tensor = torch.from_numpy(x.copy())
    before = tensor.clone()
    embed(tensor, method="pca")
    intrinsic_dimension(tensor)
    knn_module.knn_graph(tensor, 5)
    assert torch.equal(tensor, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_umap_is_reproducible_and_as_trustworthy_as_on_cpu(umap_ready):
    x, _ = _blobs(n=2000, d=30, n_classes=8, separation=6.0)
    first = embed(x, method="umap", seed=0, device="cuda")
    second = embed(x, method="umap", seed=0, device="cuda")
    on_cpu = embed(x, method="umap", seed=0, device="cpu")
    assert np.array_equal(first.coordinates, second.coordinates)  # segment sums: no atomic adds, no run-to-run noise
    assert first.device.startswith("cuda")
    assert first.trustworthiness == pytest.approx(on_cpu.trustworthiness, abs=0.01)
    assert trustworthiness(x, first.coordinates, k=10, device="cuda") == pytest.approx(first.trustworthiness, abs=1e-9)


@pytest.mark.parametrize("method", ["umap", "pca"])
def test_a_view_equal_to_an_earlier_one_gets_the_same_layout(method):
    x = np.random.default_rng(0).normal(size=(80, 6))
    result = aligned_embedding({"A": x, "B": x.copy(), "C": x[:, ::-1].copy()}, method=method, seed=0)
    np.testing.assert_array_equal(result.coordinates[1], result.coordinates[0])
    assert result.disparity[1] == 0.0 and result.trustworthiness[1] == result.trustworthiness[0]


def test_disparity_is_twice_one_minus_the_procrustes_fit_and_at_most_two():
    from scipy.spatial import procrustes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6))
    for noisy in (x + 0.5 * rng.standard_normal(x.shape), rng.standard_normal(x.shape)):
        result = aligned_embedding({"a": x, "b": noisy}, method="pca")
        _, _, scipy_disparity = procrustes(result.coordinates[0], result.coordinates[1])
        fit = np.sqrt(1 - scipy_disparity)  # sum of the singular values / n of the unit-RMS views
        assert result.disparity[1] == pytest.approx(2 * (1 - fit), rel=1e-9)
        assert 0 <= result.disparity[1] <= 2


def test_trustworthiness_gives_tied_neighbours_their_best_rank():
    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    rng = np.random.default_rng(7)
    continuous = rng.standard_normal((200, 8))
    view = continuous[:, :2]
    assert trustworthiness(continuous, view, k=10) == pytest.approx(sklearn_trustworthiness(continuous, view, n_neighbors=10), abs=1e-12)
    binary = (rng.random((300, 12)) < 0.3).astype(float)  # many tied distances
    view = binary[:, :2] + 0.1 * rng.standard_normal((300, 2))
    ours, theirs = trustworthiness(binary, view, k=10), sklearn_trustworthiness(binary, view, n_neighbors=10)
    assert ours > theirs + 0.03  # scikit-learn ranks the members of a tie in index order


# ---------------------------------------------------------------------------------------------
# scale invariance at the ends of the float ranges


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knn_graph_is_exact_at_any_scale(dtype):
    # the float32 candidate products overflowed beyond ~1e18 (float64 input) and underflowed below ~1e-19
    x = np.random.default_rng(0).standard_normal((200, 30))
    reference = knn_graph(x.astype(dtype), 5)
    for scale in (1e20, 1e-25, 1e-30) + ((1e300, 1e-300) if dtype == np.float64 else ()):
        graph = knn_graph((x * scale).astype(dtype), 5)
        assert np.array_equal(graph.indices, reference.indices), scale
        np.testing.assert_allclose(graph.distances / scale, reference.distances, rtol=1e-6 if dtype == np.float32 else 1e-13)
    with pytest.raises(DataError, match="knn_graph: some nearest-neighbour distances exceed the float64 range"):
        knn_graph(np.array([[1.7e308], [-1.7e308]]), 1)


@pytest.mark.parametrize("method", ["twonn", "mle"])
def test_intrinsic_dimension_is_scale_invariant(method):
    # float64 x 1e20 (and float32 x 1e-30, 1e-25, 1e19) gave NaN with a NaN interval; float64 x 1e19 gave 7.31 (TwoNN)
    x = np.random.default_rng(0).standard_normal((120, 8))
    reference = intrinsic_dimension(x, method=method)
    cases = [(s, np.float64, 1e-12) for s in (1e20, 1e19, 1e300, 1e-300, 1e-310)]
    cases += [(s, np.float32, 1e-5) for s in (1e-30, 1e-25, 1e19)]
    for scale, dtype, rel in cases:
        result = intrinsic_dimension((x * scale).astype(dtype), method=method)
        assert result.dimension == pytest.approx(reference.dimension, rel=rel), (scale, dtype)
        assert result.ci_low == pytest.approx(reference.ci_low, rel=rel) and result.ci_high == pytest.approx(
            reference.ci_high, rel=rel)
        assert np.isfinite(result.local).all()


def test_intrinsic_dimension_refuses_distances_that_round_to_zero():
    # two distinct rows 1e-170 apart next to values of 1: their squared distance underflows to 0 (r2 / r1 = inf)
    x = np.random.default_rng(0).standard_normal((60, 4))
    x[0, 3] = 0.0
    x[1] = x[0]
    x[1, 3] = 1e-170
    with pytest.raises(DataError, match="2 samples differ from their nearest neighbour by less than float64 can resolve"):
        intrinsic_dimension(x)


def test_trustworthiness_is_scale_invariant():
    # the view x 1e20 gave 0.55 (float32 candidate products overflowed); x x 1e160 and x 1e-310 gave 1.0
    x = np.random.default_rng(0).standard_normal((200, 30))
    view = x[:, :2]
    reference = trustworthiness(x, view)
    assert 0.55 < reference < 0.7
    for sx, sv in ((1.0, 1e20), (1e160, 1.0), (1e-310, 1.0), (1.0, 1e-310), (1e300, 1e-300)):
        assert trustworthiness(x * sx, view * sv) == reference, (sx, sv)
    assert trustworthiness(x * 1e160, view, metric="cosine") == trustworthiness(x, view, metric="cosine")


def test_pca_of_huge_and_tiny_data_gives_the_scaled_coordinates():
    # x 1e300: the covariance overflowed and eigh raised torch's _LinAlgError (LAPACK printed a DLASCL error)
    x = np.random.default_rng(0).standard_normal((120, 8))
    reference = embed(x, method="pca")
    for scale in (1e300, 1e-300, 1e-310):
        result = embed(x * scale, method="pca")
        np.testing.assert_allclose(result.coordinates / scale, reference.coordinates, rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.explained_variance_ratio, reference.explained_variance_ratio, rtol=1e-12)
        assert result.trustworthiness == reference.trustworthiness
        assert result.knn_preservation == reference.knn_preservation
    with pytest.raises(DataError, match="embed: the PCA coordinates of 'x' exceed the float64 range"):
        embed(np.array([[1.0, 1.0], [-1.0, -1.0], [0.1, -0.1], [-0.1, 0.1]]) * 1.7e308, method="pca")  # scores of 2.4e308


@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_umap_and_tsne_of_huge_and_tiny_data(method, umap_ready):
    # x 1e300: t-SNE raised _LinAlgError; UMAP scored its view 1.0 from overflowed distances (and x 1e-300 too)
    x = np.random.default_rng(0).standard_normal((120, 8))
    kw = {"n_epochs": 100} if method == "umap" else {}
    reference = embed(x, method=method, **kw)
    exact = embed(x * 2.0**900, method=method, **kw)  # a power of two: the same computation, bit for bit
    assert np.array_equal(exact.coordinates, reference.coordinates)
    assert exact.trustworthiness == reference.trustworthiness
    for scale in (1e300, 1e-300):
        result = embed(x * scale, method=method, **kw)
        assert np.isfinite(result.coordinates).all()
        assert result.trustworthiness == pytest.approx(reference.trustworthiness, abs=0.05), scale


def test_aligned_pca_views_of_huge_and_tiny_data_align_as_at_ordinary_scale():
    # the unit-RMS scaling squared the coordinates: inf at 1e300 (the view became all zeros), 0 at 1e-300 (left as is)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 8))
    y = x[:, :4] @ rng.standard_normal((4, 6)) + rng.standard_normal((120, 6))
    reference = aligned_embedding([x, y], method="pca")
    for scale in (1e300, 1e-300, 1e-310):
        result = aligned_embedding([x * scale, y], method="pca")
        np.testing.assert_allclose(result.coordinates, reference.coordinates, rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.disparity, reference.disparity, rtol=1e-12, atol=1e-15)
