"""UMAP with umap-learn's fuzzy graph and spectral start, and the layout optimised in batched torch.

umap-learn (McInnes, Healy & Melville 2018) builds the fuzzy simplicial set from a kNN graph and
starts from its spectral layout; both are used here as they are. Its stochastic gradient descent
then visits the edges one at a time, which a fixed ``random_state`` keeps on a single thread: at
10,000 samples that loop is about 90 % of a seeded run. :func:`optimize_layout` runs the same
objective (attraction along sampled edges with UMAP's ``1 / (1 + a d^2b)`` kernel, five uniform
negative samples per positive one, gradients clipped to ``[-4, 4]`` per coordinate, learning rate
decaying linearly to zero, edges sampled in proportion to their weight by umap-learn's
``epochs_per_sample`` schedule) as one synchronous step per epoch of tensor operations, on any
device, with the same output for the same seed.

Two things differ from the edge-by-edge loop, both measured (``benchmarks/probing_embedding.py``):

* All the forces on a vertex in one epoch are computed from the positions at the start of the
  epoch and summed. At umap-learn's learning rate 1.0 the summed pull of a vertex's many edges
  overshoots (trustworthiness 0.520 against 0.528 on a 10-class mixture of 10,000 samples); the
  step therefore starts at :data:`LEARNING_RATE` = 0.25, which gives 0.543 there and matches the
  edge-by-edge loop on the digits (0.978 against 0.976) and on Gaussian blobs (0.953 against 0.951).
* Negative samples are stratified: each epoch draws one random permutation of the vertices and
  hands them out in turn, so every vertex is used as a negative sample equally often (umap-learn
  draws them independently); the expected repulsion is the same, with less variance.

The fuzzy graph is symmetric and an edge and its reverse share one sampling schedule, so the pull
an edge puts on its tail equals the pull its reverse edge puts on its head: each epoch applies
twice the per-head sums. All sums are segment sums over head-sorted edges (no scatter with atomic
adds), so the result is deterministic on GPUs too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

LEARNING_RATE = 0.25
NEGATIVE_SAMPLE_RATE = 5
SPREAD = 1.0


def fuzzy_graph(knn_indices: np.ndarray, knn_dists: np.ndarray, n_epochs: int, seed: int):
    """umap-learn's fuzzy simplicial set of a kNN graph (each row's first neighbour is the sample itself),
    made exactly symmetric, with the edges too weak to be sampled in ``n_epochs`` dropped (as umap-learn does)."""
    from umap.umap_ import fuzzy_simplicial_set

    n = knn_indices.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        graph, _, _ = fuzzy_simplicial_set(
            np.empty((n, 1), dtype=np.float32),
            knn_indices.shape[1],
            np.random.RandomState(seed),
            "euclidean",
            knn_indices=knn_indices,
            knn_dists=knn_dists.astype(np.float32),
        )
    graph = ((graph + graph.T) * 0.5).tocoo()
    graph.sum_duplicates()
    graph.data[graph.data < graph.data.max() / float(n_epochs)] = 0.0
    graph.eliminate_zeros()
    return graph.tocsr().tocoo()  # row-major: edges sorted by head


def spectral_start(data: np.ndarray, graph, n_components: int, metric: str, seed: int) -> np.ndarray:
    """umap-learn's spectral layout of ``graph``, scaled to a 10-wide box with 1e-4 noise (its default start).

    ``data`` places the connected components relative to each other when the graph has several."""
    from umap.spectral import spectral_layout

    rng = np.random.RandomState(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        coords = spectral_layout(data, graph, n_components, rng, metric=metric)
    coords = coords * (10.0 / max(float(np.abs(coords).max()), np.finfo(np.float64).tiny))
    return coords + rng.normal(scale=1e-4, size=coords.shape)


def kernel_params(min_dist: float) -> tuple[float, float]:
    """umap-learn's ``(a, b)`` of the low-dimensional kernel ``1 / (1 + a d^2b)`` for ``min_dist``."""
    from umap.umap_ import find_ab_params

    a, b = find_ab_params(SPREAD, min_dist)
    return float(a), float(b)


def optimize_layout(
    start: np.ndarray,
    graph,
    *,
    min_dist: float,
    n_epochs: int,
    seed: int,
    learning_rate: float = LEARNING_RATE,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Optimise UMAP's cross-entropy layout of the symmetric fuzzy ``graph`` (COO, rows sorted) from ``start``.

    ``start`` is rescaled to ``[0, 10]`` per axis first, as umap-learn does. Returns float64
    coordinates ``(n_samples, n_components)``. ``progress(epoch, n_epochs)`` is called every few epochs.
    """
    from umap.umap_ import make_epochs_per_sample

    dev = device if device is not None else torch.device("cpu")
    a, b = kernel_params(min_dist)
    span = start.max(0) - start.min(0)
    start = 10.0 * (start - start.min(0)) / np.where(span > 0, span, 1.0)
    y = torch.tensor(start.T, dtype=torch.float32, device=dev).contiguous()  # (n_components, n): one row per axis
    n = y.shape[1]
    head = torch.from_numpy(graph.row.astype(np.int64)).to(dev)
    tail = torch.from_numpy(graph.col.astype(np.int64)).to(dev)
    every = torch.from_numpy(make_epochs_per_sample(graph.data, n_epochs)).to(device=dev, dtype=torch.float64)
    every_negative = every / NEGATIVE_SAMPLE_RATE
    next_sample = every.clone()
    next_negative = every_negative.clone()
    generator = torch.Generator(device=dev).manual_seed(seed)
    step_every = max(1, n_epochs // 100)
    for epoch in range(n_epochs):
        alpha = learning_rate * (1.0 - epoch / n_epochs)
        active = torch.nonzero(next_sample <= epoch).squeeze(1)
        if active.numel():
            h = head[active]
            diff = y[:, h] - y[:, tail[active]]
            d2 = (diff * diff).sum(0).clamp_min_(1e-30)
            d2b = d2.log().mul_(b).exp_()
            coeff = (-2.0 * a * b) * d2b / (d2 * (a * d2b + 1.0))
            pull = (coeff * diff).clamp_(-4.0, 4.0).mul_(2.0 * alpha)
            counts = torch.bincount(h, minlength=n)
            for axis in range(y.shape[0]):
                y[axis] += torch.segment_reduce(pull[axis], "sum", lengths=counts)
            next_sample[active] += every[active]
            negatives = torch.floor((epoch - next_negative[active]) / every_negative[active]).clamp_min_(0.0)
            next_negative[active] += negatives * every_negative[active]
            per_vertex = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, h, negatives).long()
            _repel(y, per_vertex, a, b, alpha, generator)
        if progress is not None and (epoch + 1) % step_every == 0:
            progress(epoch + 1, n_epochs)
    return y.T.double().cpu().numpy()


def _repel(y: torch.Tensor, per_vertex: torch.Tensor, a: float, b: float, alpha: float, generator: torch.Generator) -> None:
    """Push each vertex away from ``per_vertex`` negative samples handed out from one random permutation."""
    n = y.shape[1]
    heads = torch.repeat_interleave(per_vertex)
    total = heads.numel()
    if total == 0:
        return
    order = torch.randperm(n, generator=generator, device=y.device)
    others = y[:, order].repeat(1, total // n + 1)[:, :total]
    diff = y[:, heads] - others
    d2 = (diff * diff).sum(0)
    d2b = d2.clamp_min(1e-30).log_().mul_(b).exp_()
    coeff = (2.0 * b) / ((0.001 + d2) * (a * d2b + 1.0))
    coeff.masked_fill_(d2 <= 0.0, 0.0)  # the vertex itself, or a duplicate of it: no direction to push
    push = (coeff * diff).clamp_(-4.0, 4.0).mul_(alpha)
    for axis in range(y.shape[0]):
        y[axis] += torch.segment_reduce(push[axis], "sum", lengths=per_vertex)
