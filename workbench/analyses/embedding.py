"""Low-dimensional views of a layer (UMAP, PCA, t-SNE), their quality, and intrinsic dimension.

* :func:`embed` maps ``(n_samples, n_features)`` activations to 2 or 3 coordinates and scores the
  map: trustworthiness (Venna & Kaski 2001, as in ``sklearn.manifold.trustworthiness``) and kNN
  preservation, both at ``k = 10``.
* :func:`aligned_embedding` embeds several layers (or the same layer of several models) and rotates
  every view onto the first (orthogonal Procrustes) so a sample sits in about the same place in
  every panel.
* :func:`intrinsic_dimension` estimates the dimension of the manifold the samples lie on (TwoNN,
  Facco et al. 2017; Levina & Bickel 2005 MLE); :func:`layer_intrinsic_dimension` does it per layer.

Every method starts from the exact kNN graph of :mod:`workbench.analyses.knn`, computed once per
(data, metric) and reused: UMAP builds its fuzzy graph from it (umap-learn's
``fuzzy_simplicial_set``, so no approximate search runs), t-SNE takes it as a sparse distance
graph, and the quality scores and the dimension estimators read it directly.

UMAP's layout is optimised in batched torch on the selected device
(:mod:`workbench.analyses.umap_layout`; on two cores about 2.5 times faster than umap-learn's
seeded single-threaded loop, and at least as trustworthy in ``benchmarks/probing_embedding.py``).
umap-learn's graph and spectral start compile numba kernels on first use in a process (about 15 s
on two cores); :func:`warm_up` runs the same code path on a tiny input so a long-lived server can
pay that cost in the background at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.analyses import umap_layout
from workbench.analyses._distances import squared_distances
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    as_matrix,
    check_choice,
    check_float,
    check_int,
    check_layer_names,
    check_not_constant,
    check_seed,
    unit_scale,
)
from workbench.analyses.knn import METRICS, _check_cosine_rows, _is_float32, data_hash, knn_graph
from workbench.device import float64_device, resolve_device
from workbench.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

METHODS = ("umap", "pca", "tsne")
ID_METHODS = ("twonn", "mle")
EMBED_MIN_SAMPLES = 4  # the fewest an embedding and its neighbourhood scores are defined on
ID_MIN_SAMPLES = 20  # fewer nearest-neighbour distance ratios than this give no usable estimate
QUALITY_K = 10
UMAP_REFINE_FRACTION = 0.25  # of the learning rate, when UMAP starts from given coordinates
UMAP_SMALL_DATA = 10_000  # umap-learn optimises 500 epochs up to this many samples, 200 above
TWONN_DISCARD_FRACTION = 0.1
TWONN_MAX_TIED_FRACTION = 0.5  # above this share of r2 == r1 the fit is degenerate (a 2-D grid gave dimension 0)
TWONN_TIE_RTOL = 1e-9  # r2 / r1 - 1 below this is a tie: evenly spaced points differ only by rounding (about 1e-15)
N_BOOTSTRAP = 200
TSNE_SINGLE_THREAD_BELOW = 5000

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class EmbeddingResult(RecordedResult):
    """Coordinates of every sample in a low-dimensional view, and how faithful the view is.

    ``coordinates``: ``(n_samples, n_components)`` float64.
    ``trustworthiness``: in ``[0, 1]`` (1 = no sample among a point's ``quality_k`` nearest
    neighbours in the view is far from it in the original space; about 0.5 for a random view).
    ``knn_preservation``: in ``[0, 1]``, mean fraction of each sample's ``quality_k`` nearest
    neighbours in the original space that are also among its ``quality_k`` nearest in the view.
    ``explained_variance_ratio``: ``(n_components,)`` for PCA, else None.
    """

    coordinates: np.ndarray
    method: str
    trustworthiness: float
    knn_preservation: float
    quality_k: int
    explained_variance_ratio: np.ndarray | None


@dataclass(frozen=True)
class AlignedEmbeddingResult(RecordedResult):
    """Several views of the same samples rotated into the frame of the first.

    ``coordinates``: ``(n_views, n_samples, n_components)``; each view is centred, scaled to unit
    root-mean-square radius and rotated (orthogonal Procrustes, reflections allowed) onto view 0.
    ``names``: one label per view. ``trustworthiness`` and ``knn_preservation``: ``(n_views,)``
    quality of each view (alignment does not change them). ``displacement``: ``(n_views, n_samples)``
    distance of each sample from its place in view 0, in units of the RMS radius (0 for view 0).
    ``disparity``: ``(n_views,)`` mean squared displacement, in ``[0, 2]`` (0 = identical views; the best
    rotation keeps it at most 2): ``2 (1 - sum(s) / n)`` with ``s`` the singular values of the two unit-RMS views'
    cross product, not ``scipy.spatial.procrustes``'s ``1 - (sum(s) / n)**2``, which agrees with it to first order
    for alike views and reaches 1 where this reaches 2. Views after the first that UMAP or t-SNE embeds start from
    view 0's layout, so their disparities run lower than for views embedded independently.
    """

    coordinates: np.ndarray
    names: tuple[str, ...]
    method: str
    trustworthiness: np.ndarray
    knn_preservation: np.ndarray
    displacement: np.ndarray
    disparity: np.ndarray
    quality_k: int


@dataclass(frozen=True)
class IntrinsicDimensionResult(RecordedResult):
    """Intrinsic dimension of one point cloud.

    ``dimension``: the estimate (> 0; about ``d`` for samples spread over a ``d``-dimensional
    manifold, at most about the number of features). ``ci_low``/``ci_high``: 95% bootstrap interval
    over samples. ``local``: ``(n_distinct,)`` per-sample statistic of the distinct samples (each row's
    first occurrence, in input order): the ratio
    ``r2 / r1`` of second to first neighbour distance (TwoNN) or the local MLE dimension (MLE).
    ``n_discarded``: copies of a sample left out (each repeated row counts once).
    """

    dimension: float
    ci_low: float
    ci_high: float
    local: np.ndarray
    method: str
    k: int
    n_discarded: int


@dataclass(frozen=True)
class LayerIntrinsicDimensionResult(RecordedResult):
    """Intrinsic dimension of each layer of one model.

    ``layers``: layer names in order. ``dimension``, ``ci_low``, ``ci_high``: ``(n_layers,)``.
    ``n_features``: ``(n_layers,)`` width of each layer, the ambient dimension.
    """

    layers: tuple[str, ...]
    dimension: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n_features: np.ndarray
    method: str
    k: int
    model_name: str


# ---------------------------------------------------------------------------------------------
# embeddings


def embed(
    x: Any,
    *,
    method: str = "umap",
    n_components: int = 2,
    seed: int = 0,
    metric: str = "euclidean",
    n_neighbors: int | None = None,
    min_dist: float | None = None,
    n_epochs: int | None = None,
    perplexity: float | None = None,
    init: Any = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> EmbeddingResult:
    """Embed the rows of ``x`` in ``n_components`` dimensions and score the view.

    Parameters
    ----------
    x : (n_samples, n_features) array
        One layer's activations (or any samples in rows). Not modified.
    method : "umap", "pca" or "tsne"
        UMAP (umap-learn's fuzzy graph of the exact kNN graph, layout optimised in torch) keeps
        local neighbourhoods and separates clusters; PCA is linear, deterministic and keeps global
        distances; t-SNE (scikit-learn, Barnes-Hut) keeps local neighbourhoods, slower than UMAP.
    n_components : int
        Output dimensions, 2 or 3 for plotting (PCA: up to ``min(n_samples, n_features)``).
    seed : int
        Seeds UMAP's and t-SNE's optimisation; the same seed gives the same coordinates.
    metric : "euclidean" or "cosine"
        Distance in the original space (UMAP, t-SNE and the quality scores).
    n_neighbors : int, UMAP only
        Size of the neighbourhood UMAP preserves, in ``[2, n_samples - 1]``; default 15, or
        ``n_samples - 1`` when there are fewer samples. Larger values
        keep more global structure, smaller ones more local detail.
    min_dist : float, UMAP only
        How tightly UMAP packs neighbours, in ``[0, 1]``; default 0.1.
    n_epochs : int, UMAP only
        Optimisation epochs, in ``[10, 2000]``; default umap-learn's: 500 up to 10,000 samples, 200
        above. Fewer epochs are proportionally faster but less faithful.
    perplexity : float, t-SNE only
        Effective number of neighbours, in ``[2, (n_samples - 1) / 3]``; default 30, or the upper end
        of that range when there are fewer than 91 samples.
    init : (n_samples, n_components) array or None, UMAP and t-SNE only
        Starting coordinates (for example another view's, to keep the arrangement of clusters);
        default: UMAP's spectral layout, or the PCA scores for t-SNE. From given coordinates UMAP
        starts with a quarter of its usual step size, so it refines that layout rather than
        rearranging it.
    device : str, torch.device or None
        Where the kNN graph, PCA, UMAP's layout and the quality scores are computed; ``None`` picks
        cuda > mps > cpu. t-SNE optimises on the CPU.
    progress : callable (done, total) or None
        Called as the work advances (UMAP: per epoch).

    Returns
    -------
    EmbeddingResult with ``coordinates`` ``(n_samples, n_components)``, ``trustworthiness`` and
    ``knn_preservation`` at ``k = 10`` (fewer when there are at most 21 samples). The data are multiplied by a
    power of two that brings them near 1 first (exact), so data of any scale in the float64 range embed as at
    ordinary scale; PCA's coordinates are divided by it again, so they are the scores of ``x`` as given.
    """
    func = "embed"
    method = check_choice(method, "method", METHODS, func=func)
    metric = check_choice(metric, "metric", METRICS, func=func)
    seed = check_seed(seed, func=func)
    t = as_matrix(x, "x", func=func, dtype=torch.float32 if _is_float32(x) else torch.float64, min_samples=EMBED_MIN_SAMPLES)
    n, d = t.shape
    _check_method_params(
        method, n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs, perplexity=perplexity, init=init
    )
    high = min(3, n - 1) if method != "pca" else min(n, d)
    n_components = check_int(n_components, "n_components", func=func, low=1, high=high)
    start_coords = None
    if init is not None:
        start_coords = as_matrix(init, "init", func=func, dtype=torch.float64, min_samples=n).numpy()
        if start_coords.shape != (n, n_components):
            raise DataError(
                f"{func}: 'init' must have shape (n_samples, n_components) = {(n, n_components)}. Got {start_coords.shape}."
            )
    check_not_constant(t, "x", func=func)
    _check_cosine_rows(t, metric, func=func)
    # Every method and score below depends only on the data's shape, not its scale (PCA's scores scale with it and
    # are divided back below): multiplying by a power of two, exactly, brings the largest |value| near 1, so that
    # squared distances and the covariance stay inside the float64 range for data as large as 1e300 or as small
    # as 1e-300, and UMAP's and t-SNE's bandwidth searches (which start at 1) find their neighbourhoods.
    scale = unit_scale(t)
    t = _times(t, scale)
    dev = resolve_device(device)
    start = time.perf_counter()
    report = _Stages(progress)
    params: dict[str, Any] = {
        "method": method,
        "n_components": n_components,
        "metric": metric,
        "init": "given" if init is not None else "default",
    }
    explained = None
    if method == "umap":
        n_neighbors = check_int(min(15, n - 1) if n_neighbors is None else n_neighbors, "n_neighbors", func=func, low=2,
                                high=n - 1)
        min_dist = check_float(0.1 if min_dist is None else min_dist, "min_dist", func=func, low=0.0, high=1.0)
        default_epochs = 500 if n <= UMAP_SMALL_DATA else 200
        n_epochs = check_int(default_epochs if n_epochs is None else n_epochs, "n_epochs", func=func, low=10, high=2000)
        params.update(n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs)
        coords = _umap(t, n_components, n_neighbors, min_dist, n_epochs, metric, seed, dev, report, start_coords)
        estimator = f"UMAP (exact {n_neighbors}-NN fuzzy graph, {n_epochs} epochs of batched torch SGD)"
    elif method == "tsne":
        highest = max(2.0, (n - 1) / 3.0)
        perplexity = check_float(min(30.0, highest) if perplexity is None else perplexity, "perplexity", func=func,
                                 low=2.0, high=highest)
        params.update(perplexity=perplexity)
        coords = _tsne(t, n_components, perplexity, metric, seed, dev, report, start_coords)
        estimator = "t-SNE (scikit-learn Barnes-Hut, exact kNN graph)"
    else:
        coords, explained = _pca(t, n_components, dev)
        estimator = "PCA (float64 eigendecomposition of the covariance)"
    report.stage("quality", 0.9)
    k = min(QUALITY_K, (n - 2) // 2)
    trust, preserved = _quality(t, coords, k, metric, dev)
    if method == "pca":
        with np.errstate(over="ignore"):  # refused below
            coords = coords / scale  # the scores of the data as given (exact: a power of two)
        if not np.isfinite(coords).all():
            raise DataError(
                f"{func}: the PCA coordinates of 'x' exceed the float64 range (about 1.8e308); rescale the data first "
                "(for example divide it by its largest absolute value)."
            )
    report.done()
    return EmbeddingResult(
        coordinates=coords,
        method=method,
        trustworthiness=trust,
        knn_preservation=preserved,
        quality_k=k,
        explained_variance_ratio=explained,
        estimator=estimator,
        n_samples=n,
        params=params,
        seed=None if method == "pca" else seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def aligned_embedding(
    xs: Sequence[Any] | Mapping[str, Any],
    *,
    method: str = "umap",
    n_components: int = 2,
    seed: int = 0,
    metric: str = "euclidean",
    n_neighbors: int | None = None,
    min_dist: float | None = None,
    n_epochs: int | None = None,
    perplexity: float | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> AlignedEmbeddingResult:
    """Embed several views of the same samples and rotate each onto the first.

    Each view (a layer of one model, or the same layer of two models) is embedded with
    :func:`embed`, centred and scaled to unit RMS radius, then rotated and possibly reflected onto
    view 0 (orthogonal Procrustes), so the same sample sits in about the same place and colours
    can be compared across panels. Rotation, reflection and scale carry no meaning in UMAP, t-SNE or
    PCA coordinates, so nothing is lost. UMAP and t-SNE views after the first start from view 0's
    layout (``init``), so clusters present in both keep their arrangement instead of landing
    wherever the optimisation happens to put them; each view still follows its own neighbour graph.
    A view equal to an earlier one (a model compared with itself) gets that view's layout: disparity 0.

    Parameters
    ----------
    xs : sequence of (n_samples, n_features_i) arrays, or a mapping name -> array
        One or more views with the same samples in the same order (features may differ).
    method, n_components, seed, metric, n_neighbors, min_dist, n_epochs, perplexity, device
        As in :func:`embed`, the same for every view.
    progress : callable (done, total) or None
        Called as the views are embedded.

    Returns
    -------
    AlignedEmbeddingResult with ``coordinates`` ``(n_views, n_samples, n_components)``.
    """
    func = "aligned_embedding"
    if isinstance(xs, Mapping):
        names = tuple(str(name) for name in xs)
        views = list(xs.values())
    elif isinstance(xs, Sequence) and not isinstance(xs, (str, bytes)):
        views = list(xs)
        names = tuple(f"view {i}" for i in range(len(views)))
    else:
        raise DataError(f"{func}: 'xs' must be a list of arrays or a mapping name -> array. Got {type(xs).__name__}.")
    if len(views) < 1:
        raise DataError(f"{func}: 'xs' needs at least one view (a layer's activations). Got none.")
    sizes = [int(np.shape(v)[0]) if np.ndim(v) >= 1 else 0 for v in views]
    if len(set(sizes)) != 1:
        raise DataError(
            f"{func}: every view must have the same samples (rows). Got {sizes}; extract all of them on the same dataset."
        )
    start = time.perf_counter()
    n_views = len(views)
    results: list[EmbeddingResult] = []
    seen: dict[str, int] = {}  # content hash of a view -> the first view with that content
    same_as: dict[int, int] = {}
    for i, view in enumerate(views):
        sub = None if progress is None else _sub_progress(progress, i, n_views)
        key = _content_key(view)
        if key is not None and key in seen:  # the same representation gets the same layout, not a second optimisation from the first
            same_as[i] = seen[key]
            results.append(results[seen[key]])
            if sub is not None:
                sub(1, 1)
            continue
        if key is not None:
            seen[key] = i
        init = results[0].coordinates if i > 0 and method in ("umap", "tsne") else None
        try:
            results.append(
                embed(
                    view,
                    method=method,
                    n_components=n_components,
                    seed=seed,
                    metric=metric,
                    n_neighbors=n_neighbors,
                    min_dist=min_dist,
                    n_epochs=n_epochs,
                    perplexity=perplexity,
                    init=init,
                    device=device,
                    progress=sub,
                )
            )
        except DataError as exc:
            raise DataError(f"{func}: view '{names[i]}': {exc}") from exc
    coords = np.stack([_normalise(r.coordinates) for r in results])
    reference = coords[0]
    for i in range(1, n_views):
        coords[i] = coords[same_as[i]] if i in same_as else coords[i] @ _procrustes_rotation(coords[i], reference)
    displacement = np.linalg.norm(coords - reference[None], axis=2)
    return AlignedEmbeddingResult(
        coordinates=coords,
        names=names,
        method=results[0].method,
        trustworthiness=np.array([r.trustworthiness for r in results]),
        knn_preservation=np.array([r.knn_preservation for r in results]),
        displacement=displacement,
        disparity=(displacement**2).mean(axis=1),
        quality_k=results[0].quality_k,
        estimator=f"{results[0].estimator}, each view aligned to the first by orthogonal Procrustes",
        n_samples=sizes[0],
        params={**results[0].params, "names": list(names)},
        seed=results[0].seed,
        device=results[0].device,
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def trustworthiness(
    x: Any, embedding: Any, *, k: int = QUALITY_K, metric: str = "euclidean", device: str | torch.device | None = None
) -> float:
    """Trustworthiness of a view: are a sample's neighbours in the view also near it in ``x``?

    ``T(k) = 1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in U_k(i)} (r(i, j) - k)``, where ``U_k(i)`` are
    the ``k`` nearest neighbours of ``i`` in the view that are not among its ``k`` nearest in ``x``,
    and ``r(i, j)`` is the rank of ``j`` by distance from ``i`` in ``x`` (Venna & Kaski 2001). Equals
    ``sklearn.manifold.trustworthiness`` (Euclidean view) without its ``(n, n)`` memory where no two distances
    from a sample tie. A tie gives each of its members the best rank (one more than the samples strictly closer),
    where scikit-learn ranks them in index order, so with tied distances (binary features, repeated or all-zero
    samples) this score is the higher of the two (0.715 against 0.649 on 300 binary samples).
    In ``[0, 1]``; 1 for a perfect view. It depends only on neighbour ranks, so multiplying ``x`` or ``embedding``
    by any factor leaves it unchanged, anywhere in the float64 range.

    Parameters
    ----------
    x : (n_samples, n_features) array
        The original samples.
    embedding : (n_samples, n_components) array
        Their coordinates in the view.
    k : int
        Neighbourhood size, in ``[1, n_samples / 2 - 1]``.
    metric : "euclidean" or "cosine"
        Distance in ``x`` (the view is always Euclidean).
    device : str, torch.device or None
        Where the distances are computed.
    """
    func = "trustworthiness"
    metric = check_choice(metric, "metric", METRICS, func=func)
    t = as_matrix(x, "x", func=func, dtype=torch.float32 if _is_float32(x) else torch.float64, min_samples=4)
    e = as_matrix(embedding, "embedding", func=func, dtype=torch.float64, min_samples=4)
    if e.shape[0] != t.shape[0]:
        raise DataError(
            f"{func}: 'x' and 'embedding' must have the same number of samples (rows). Got {t.shape[0]} and {e.shape[0]}."
        )
    n = t.shape[0]
    k = check_int(k, "k", func=func, low=1, high=(n - 2) // 2)
    _check_cosine_rows(t, metric, func=func)
    # Only neighbour ranks matter: both inputs are multiplied by a power of two (exact, in float64) that brings
    # their largest |value| near 1, so that squared distances neither overflow nor underflow at any scale.
    low = knn_graph(e * unit_scale(e), k).indices
    return _trustworthiness(t, low, k, metric, resolve_device(device))


def warm_up(progress: Progress | None = None) -> float:
    """Compile the numba kernels of umap-learn's graph code by running :func:`embed` on a tiny input.

    Runs the same code path as ``embed(method="umap")`` (exact kNN, fuzzy graph, spectral
    initialisation, layout), so a later call in this process starts at once. Takes about 15 s on
    two cores the first time (numba compilation) and well under a second afterwards; meant for a
    background thread when a long-lived server starts. Returns the seconds it took.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 4.0
    x = (centres[np.arange(120) % 3] + rng.standard_normal((120, 8))).astype(np.float32)
    embed(x, method="umap", n_neighbors=10, n_epochs=10, seed=0, device="cpu", progress=progress)
    seconds = time.perf_counter() - start
    logger.info("umap-learn warm-up took %.1f s", seconds)
    return seconds


# ---------------------------------------------------------------------------------------------
# intrinsic dimension


def intrinsic_dimension(
    x: Any,
    *,
    method: str = "twonn",
    k: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> IntrinsicDimensionResult:
    """Intrinsic dimension of the manifold the rows of ``x`` lie on, from nearest-neighbour distances.

    ``method="twonn"`` (Facco et al. 2017): with ``r1, r2`` the distances to a sample's first and
    second neighbour, ``mu = r2 / r1`` follows a Pareto law ``F(mu) = 1 - mu^-d``; ``d`` is the slope of
    ``-log(1 - F_empirical)`` against ``log mu`` through the origin, fitted after discarding the 10%
    largest ``mu``. Needs only the two nearest neighbours, so it is little affected by curvature and
    density changes.

    ``method="mle"`` (Levina & Bickel 2005): the local estimate at a sample is
    ``m(x) = [1/(k-1) sum_{j<k} log(T_k(x) / T_j(x))]^-1`` with ``T_j`` the distance to the ``j``-th
    neighbour; the global estimate pools them as the inverse of the mean of ``1 / m(x)``
    (MacKay & Ghahramani's correction, less biased than the plain mean).

    Repeated samples (equal rows) are counted once: a copy would put a neighbour at distance zero, and a
    distinct sample next to a duplicated pair would see its two nearest neighbours at one distance
    (``r2 / r1 = 1``), both of which bias the estimate; ``n_discarded`` counts the copies left out.

    Both estimators depend only on ratios of distances, so the estimate does not change when ``x`` is multiplied by
    a factor, from subnormal values to values near the float64 limit (float32 data likewise). Where a ratio is
    undefined (distinct samples whose distance rounds to 0 next to the data's largest values) a
    :class:`~workbench.errors.DataError` says so; the result is never NaN.

    Parameters
    ----------
    x : (n_samples, n_features) array
        Samples in rows; at least 20. Not modified.
    method : "twonn" or "mle"
    k : int, MLE only
        Neighbours per sample, in ``[3, n_samples - 1]``; default 20. Smaller ``k`` is more local
        (less bias from curvature, more variance).
    seed : int
        Seeds the bootstrap of the 95% interval.
    device : str, torch.device or None
        Where the kNN graph is computed.

    Returns
    -------
    IntrinsicDimensionResult with ``dimension``, ``ci_low``, ``ci_high``.
    """
    func = "intrinsic_dimension"
    method = check_choice(method, "method", ID_METHODS, func=func)
    seed = check_seed(seed, func=func)
    t = as_matrix(x, "x", func=func, dtype=torch.float32 if _is_float32(x) else torch.float64, min_samples=ID_MIN_SAMPLES)
    n = t.shape[0]
    if method == "twonn":
        if k is not None:
            raise ParameterError(
                "The 'k' parameter of intrinsic_dimension applies to method='mle' only; TwoNN always uses 2 neighbours."
            )
        k = 2
    else:
        k = check_int(20 if k is None else k, "k", func=func, low=3, high=n - 1)
    check_not_constant(t, "x", func=func)
    dev = resolve_device(device)
    start = time.perf_counter()
    _, copy_of = torch.unique(t, dim=0, return_inverse=True)
    first = torch.full((int(copy_of.max()) + 1,), n, dtype=torch.int64).scatter_reduce_(
        0, copy_of, torch.arange(n), reduce="amin")
    distinct = t[first.sort().values]  # each row's first occurrence, in the input's order
    n_discarded = n - distinct.shape[0]
    if distinct.shape[0] < max(10, k + 1):
        raise DataError(
            f"{func}: only {distinct.shape[0]} of the {n} samples are distinct; at least {max(10, k + 1)} distinct samples "
            "are needed (the rest are copies)."
        )
    # TwoNN and the MLE depend only on ratios of distances: the float64 data are multiplied by a power of two
    # (exact) that brings their largest |value| near 1, so that the kNN graph's squared distances neither overflow
    # nor underflow however large or small the data are.
    scaled = distinct.to(torch.float64)
    dist = knn_graph(scaled * unit_scale(scaled), k, device=dev).distances
    n_zero = int((dist[:, 0] == 0).sum())
    if n_zero:
        raise DataError(
            f"{func}: {n_zero} samples differ from their nearest neighbour by less than float64 can resolve next to the "
            "data's largest values (their distance rounds to 0), so the distance ratios are undefined; drop the "
            "near-duplicate samples, or rescale features of very different magnitudes."
        )
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, dist.shape[0], size=(N_BOOTSTRAP, dist.shape[0]))
    if method == "twonn":
        local = dist[:, 1] / dist[:, 0]
        n_tied = int((local <= 1.0 + TWONN_TIE_RTOL).sum())
        if n_tied > TWONN_MAX_TIED_FRACTION * len(local):
            raise DataError(
                f"{func}: {n_tied} of {len(local)} samples have their two nearest neighbours at the same distance "
                "(quantised or lattice data), where TwoNN's ratio r2/r1 carries no information; add noise below the "
                "data's resolution, then estimate again."
            )
        dimension = float(_twonn_fit(local[None, :])[0])
        spread = _twonn_fit(local[boot])
        estimator = f"TwoNN (Facco et al. 2017), linear fit discarding the top {TWONN_DISCARD_FRACTION:.0%} of r2/r1"
    else:
        logs = np.log(dist[:, -1:] / dist[:, :-1])  # (n, k-1): log T_k / T_j
        inverse = logs.mean(axis=1)  # 1 / m(x)
        local = 1.0 / np.maximum(inverse, np.finfo(float).tiny)
        dimension = float(1.0 / inverse.mean())
        spread = 1.0 / inverse[boot].mean(axis=1)
        estimator = f"MLE (Levina & Bickel 2005, k={k}), MacKay-Ghahramani pooling"
    low, high = np.percentile(spread, [2.5, 97.5])
    if not np.isfinite([dimension, low, high]).all():
        raise DataError(
            f"{func}: the {method} estimate came out {dimension} (interval {low} to {high}), which is undefined; check "
            "the data for near-duplicate samples or features of very different magnitudes."
        )
    return IntrinsicDimensionResult(
        dimension=dimension,
        ci_low=float(low),
        ci_high=float(high),
        local=local,
        method=method,
        k=k,
        n_discarded=n_discarded,
        estimator=estimator,
        n_samples=n,
        params={"method": method, "k": k, "n_bootstrap": N_BOOTSTRAP},
        seed=seed,
        device=str(dev),
        dtype="float64",  # the kNN distances are float64 (float32 inputs are widened)
        seconds=time.perf_counter() - start,
    )


def layer_intrinsic_dimension(
    acts: Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
    method: str = "twonn",
    k: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LayerIntrinsicDimensionResult:
    """:func:`intrinsic_dimension` of each layer of one model.

    Parameters
    ----------
    acts : Activations or mapping layer name -> (n_samples, n_features) array
    layers : names to use, in order; default all layers of ``acts``.
    method, k, seed, device : as in :func:`intrinsic_dimension`.
    progress : callable (done, total) or None, called after each layer.
    """
    func = "layer_intrinsic_dimension"
    if not isinstance(acts, Mapping):
        raise DataError(
            f"{func}: 'acts' must be Activations or a mapping layer name -> array. Got {type(acts).__name__}."
        )
    names = list(acts) if layers is None else check_layer_names(acts, layers, func=func)
    if not names:
        raise DataError(f"{func}: no layers to analyse; pass at least one layer name.")
    start = time.perf_counter()
    out = []
    for i, name in enumerate(names):
        layer = acts[name]
        try:
            out.append(intrinsic_dimension(layer, method=method, k=k, seed=seed, device=device))
        except DataError as exc:
            raise DataError(f"{func}: layer '{name}': {exc}") from exc
        if progress is not None:
            progress(i + 1, len(names))
    return LayerIntrinsicDimensionResult(
        layers=tuple(names),
        dimension=np.array([r.dimension for r in out]),
        ci_low=np.array([r.ci_low for r in out]),
        ci_high=np.array([r.ci_high for r in out]),
        n_features=np.array([int(np.shape(acts[name])[1]) for name in names]),
        method=out[0].method,
        k=out[0].k,
        model_name=str(getattr(acts, "model_name", "")),
        estimator=out[0].estimator,
        n_samples=out[0].n_samples,
        params=dict(out[0].params),
        seed=seed,
        device=out[0].device,
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# cores


class _Stages:
    """Maps the stages of an embedding onto one (done, total) progress scale of 1000 steps."""

    TOTAL = 1000

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.last = -1

    def stage(self, name: str, fraction: float) -> None:
        self.report(fraction)

    def report(self, fraction: float) -> None:
        if self.progress is None:
            return
        step = int(round(min(max(fraction, 0.0), 1.0) * self.TOTAL))
        if step > self.last:
            self.last = step
            self.progress(step, self.TOTAL)

    def done(self) -> None:
        self.report(1.0)


def _times(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` multiplied by the power of two ``scale``, exactly: computed in float64, where every such factor (up to
    2**1022) is representable, and returned in ``t``'s dtype, or in float64 where a float32 value far below the
    largest would fall out of float32's normal range (a row ``2**149`` times smaller than the largest would become 0)."""
    if scale == 1.0:
        return t
    wide = t.to(torch.float64) * scale
    if t.dtype == torch.float64:
        return wide
    narrow = wide.to(t.dtype)
    return narrow if torch.equal(narrow.to(torch.float64), wide) else wide


def _umap(
    t: torch.Tensor,
    n_components: int,
    n_neighbors: int,
    min_dist: float,
    n_epochs: int,
    metric: str,
    seed: int,
    dev: torch.device,
    report: _Stages,
    init: np.ndarray | None,
) -> np.ndarray:
    graph = knn_graph(
        t,
        n_neighbors - 1,
        metric=metric,
        device=dev,
        progress=None if report.progress is None else lambda a, b: report.report(0.15 * a / b),
    )
    report.stage("graph", 0.2)
    knn_idx, knn_dist = graph.with_self(n_neighbors - 1)
    fuzzy = umap_layout.fuzzy_graph(knn_idx, knn_dist, n_epochs, seed)
    if init is None:
        init = umap_layout.spectral_start(t.cpu().numpy(), fuzzy, n_components, metric, seed)
        rate = umap_layout.LEARNING_RATE
    else:
        rate = umap_layout.LEARNING_RATE * UMAP_REFINE_FRACTION
    coords = umap_layout.optimize_layout(
        init,
        fuzzy,
        min_dist=min_dist,
        n_epochs=n_epochs,
        seed=seed,
        learning_rate=rate,
        device=dev,
        progress=None if report.progress is None else lambda done, total: report.report(0.2 + 0.7 * done / total),
    )
    if not np.isfinite(coords).all():
        raise DataError("embed: UMAP produced non-finite coordinates; the data may have too many duplicate samples.")
    return coords


def _tsne(
    t: torch.Tensor,
    n_components: int,
    perplexity: float,
    metric: str,
    seed: int,
    dev: torch.device,
    report: _Stages,
    init: np.ndarray | None,
) -> np.ndarray:
    import scipy.sparse
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = t.shape[0]
    k = min(n - 1, int(3.0 * perplexity + 1))
    graph = knn_graph(
        t,
        k,
        metric=metric,
        device=dev,
        progress=None if report.progress is None else lambda a, b: report.report(0.2 * a / b),
    )
    report.stage("graph", 0.2)
    # scikit-learn expects each sample's own entry (an explicit zero) in a precomputed graph.
    idx, dist = graph.with_self()
    sparse = scipy.sparse.csr_matrix((dist.ravel(), idx.ravel(), np.arange(0, n * (k + 1) + 1, k + 1)), shape=(n, n))
    if init is None:
        init, _ = _pca(t, n_components, dev)
    init = init / max(float(np.std(init[:, 0])), np.finfo(float).tiny) * 1e-4  # scikit-learn's PCA init scale
    tsne = TSNE(
        n_components=n_components,
        perplexity=perplexity,
        metric="precomputed",
        init=init.astype(np.float32),
        random_state=seed,
        method="barnes_hut",
    )
    # Below a few thousand samples the Barnes-Hut gradient is faster on one thread than the cost of
    # waking OpenMP threads every iteration (which, on a busy machine, can be 20 times slower).
    with threadpool_limits(limits=1 if n <= TSNE_SINGLE_THREAD_BELOW else None, user_api="openmp"):
        coords = np.asarray(tsne.fit_transform(sparse), dtype=np.float64)
    report.stage("layout", 0.9)
    return coords


def _pca(t: torch.Tensor, n_components: int, dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the leading principal axes, each oriented so its largest-magnitude loading is positive."""
    from workbench.device import float64_device

    x = t.to(device=float64_device(dev), dtype=torch.float64)
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    if d <= n:
        evals, evecs = torch.linalg.eigh(x.T @ x)
        evals, evecs = evals.flip(0), evecs.flip(1)
        axes = evecs[:, :n_components]
    else:
        evals, u = torch.linalg.eigh(x @ x.T)
        evals, u = evals.flip(0), u.flip(1)
        axes = x.T @ u[:, :n_components]
        axes = axes / axes.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    evals = evals.clamp_min(0.0)
    top = axes.abs().argmax(dim=0)
    signs = torch.sign(axes[top, torch.arange(axes.shape[1])])
    signs[signs == 0] = 1.0
    axes = axes * signs
    scores = (x @ axes).cpu().numpy()
    total = float(evals.sum())
    ratio = (evals[:n_components] / total).cpu().numpy() if total > 0 else np.zeros(n_components)
    return scores, ratio


def _quality(t: torch.Tensor, coords: np.ndarray, k: int, metric: str, dev: torch.device) -> tuple[float, float]:
    """Trustworthiness and kNN preservation of ``coords`` as a view of ``t``, at ``k`` neighbours."""
    high = knn_graph(t, k, metric=metric, device=dev).indices
    low = knn_graph(coords, k, device=dev).indices
    preserved = float((high[:, :, None] == low[:, None, :]).any(axis=2).mean())
    return _trustworthiness(t, low, k, metric, dev), preserved


def _trustworthiness(t: torch.Tensor, low: np.ndarray, k: int, metric: str, dev: torch.device) -> float:
    """Venna & Kaski trustworthiness from the view's neighbour lists ``low`` (n, k), ranks taken in ``t``.

    The rank of ``j`` from ``i`` is one more than the number of other samples strictly closer to ``i``;
    squared distances come from :func:`squared_distances` in float64, one block of rows at a time, so
    neighbours inside tight clusters far from the centre are ranked as exactly as the kNN graph ranks them.
    """
    n = t.shape[0]
    dev = float64_device(dev)
    x = t.to(device=dev, dtype=torch.float64)
    x = x * unit_scale(x)  # exact, and ranks alike: squared distances stay in range at any scale of the data
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
    else:
        x = x - x.mean(0, keepdim=True)
    low_t = torch.tensor(low, dtype=torch.int64, device=dev)
    block = max(1, min(n, (1 << 23) // n))  # a block of distances stays under 64 MiB
    penalty = 0
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows = torch.arange(hi - lo, device=dev)
        part = squared_distances(x, lo, hi)
        part[rows, rows + lo] = float("inf")
        target = part.gather(1, low_t[lo:hi])
        # one neighbour column at a time: a contiguous int32 count is several times faster than one (rows, n, k) mask
        ranks = torch.stack([(part < target[:, j : j + 1]).sum(1, dtype=torch.int32) for j in range(k)], 1) + 1
        penalty += int((ranks - k).clamp_min(0).sum(dtype=torch.int64))
    return 1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))


def _twonn_fit(mu: np.ndarray) -> np.ndarray:
    """Facco et al.'s slope for each row of ``mu`` (n_sets, n): fit through the origin, top 10% discarded."""
    n = mu.shape[1]
    keep = max(2, int(np.floor(n * (1.0 - TWONN_DISCARD_FRACTION))))
    x = np.log(np.sort(mu, axis=1)[:, :keep])
    y = -np.log(1.0 - np.arange(1, keep + 1) / n)
    return (x * y[None, :]).sum(axis=1) / np.maximum((x * x).sum(axis=1), np.finfo(float).tiny)


def _normalise(coords: np.ndarray) -> np.ndarray:
    """``coords`` centred and scaled to unit root-mean-square radius (0 if every row is the same). The coordinates
    are first brought near 1 by a power of two (exact), so that the squared radii of PCA coordinates of data as
    large as 1e300 or as small as 1e-300 neither overflow nor underflow."""
    coords = coords * unit_scale(torch.from_numpy(np.ascontiguousarray(coords)))
    centred = coords - coords.mean(axis=0, keepdims=True)
    rms = float(np.sqrt((centred**2).sum(axis=1).mean()))
    return centred / rms if rms > 0 else centred


def _procrustes_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal matrix ``R`` minimising ``|source R - target|`` (reflections allowed)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return u @ vt


def _content_key(view: Any) -> str | None:
    """Content hash of a view, ``None`` for input that :func:`embed` will refuse with its own message."""
    try:
        return data_hash(view if isinstance(view, torch.Tensor) else torch.as_tensor(np.asarray(view)))
    except (TypeError, ValueError, RuntimeError):
        return None


def _sub_progress(progress: Progress, index: int, count: int) -> Progress:
    def report(done: int, total: int) -> None:
        progress(index * total + done, count * total)

    return report


_METHOD_PARAMS = {"umap": ("n_neighbors", "min_dist", "n_epochs", "init"), "tsne": ("perplexity", "init"), "pca": ()}


def _check_method_params(method: str, **given: Any) -> None:
    for name, value in given.items():
        if value is not None and name not in _METHOD_PARAMS[method]:
            owners = " or ".join(f"method={m!r}" for m, names in _METHOD_PARAMS.items() if name in names)
            raise ParameterError(
                f"The '{name}' parameter of embed applies to {owners} only, not method={method!r}; leave it as None."
            )
