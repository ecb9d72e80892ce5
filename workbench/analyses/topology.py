"""Topology of layer representations: persistent homology and topological class separability.

``persistence``
    Vietoris–Rips persistence diagrams of a point cloud (one row per sample). Distances are computed
    once in float64 with torch; H0 is the minimum spanning tree of the distance graph (Prim's
    algorithm in torch, exact for any number of points); H1 and H2 come from gudhi's Ripser-based
    engine, with exact edge collapses when the dense engine would need too much memory, on at most
    ``max_points`` points chosen by farthest-point sampling. For H0 + H1, Ripser first runs only up
    to a certified bound on the births of 1-cycles (edges without a witness, see
    ``_h1_birth_bound``); when no 1-cycle is alive there, that is the whole diagram, at a fraction
    of the cost (on a noisy torus of 1,000 points in 64-D, 0.23 s instead of 0.53 s).
``diagram_distance`` / ``persistence_distance`` / ``diagram_distance_matrix``
    Bottleneck or Wasserstein distance between diagrams (gudhi), for two layers or all layer pairs.
``class_separability`` / ``layer_separability`` / ``separability_trajectory``
    The unsupervised H0 persistence score of Ghalyan, Gourgoulias et al. (arXiv 2305.15016,
    "Estimating class separability of text embeddings with persistent homology"), next to labelled
    references (Fisher's discriminant ratio, Thornton's separability index, cross-validated linear
    probe accuracy and ROC-AUC, Calinski–Harabasz index), for one representation, across the layers
    of a model, or across training checkpoints with a plateau rule (a label-free stopping criterion).
``topological_rsa``
    Geo-topological representational similarity (Lin & Kriegeskorte, "The Topology and Geometry of
    Neural Representations"): rank-normalised, thresholded RDMs compared by correlation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.analyses._distances import average_ranks, squared_distances
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    ArrayLike,
    as_labels,
    as_matrix,
    check_choice,
    check_float,
    check_int,
    check_layer_names,
    check_not_constant,
    check_paired,
    check_same_dataset,
    check_seed,
    unit_scale,
)
from workbench.device import float64_device, resolve_device
from workbench.errors import ConstantDataError, DataError, ParameterError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

METRICS = ("euclidean", "cosine", "precomputed")
DIAGRAM_METRICS = ("bottleneck", "wasserstein")
RSA_METRICS = ("euclidean", "cosine", "correlation")
MAX_DIM = 2
HOMOLOGY_FIELD = 2
GRID_SIZE = 100
# Peak memory of gudhi's dense Ripser per edge below the enclosing radius, H0 + H1, measured on
# 64-D point clouds of 500-2000 points (noisy tori, Gaussian noise): 70-420 bytes. Rounded up.
RIPSER_BYTES_PER_EDGE = 512
BIRTH_BOUND_NEIGHBOURS = 8  # witness candidates per point: its nearest neighbours ...
BIRTH_BOUND_LANDMARKS = 32  # ... and a farthest-point set shared by all points
TRUNCATE_MIN_POINTS = 256  # below this the full computation takes milliseconds
# A computation truncated at a scale costs about 1.6 times the full one's share of edges below that scale; it pays
# when it succeeds (no 1-cycle alive there) and is wasted otherwise. On a noisy torus in 64-D the bound on births
# sits at 0.53 of the enclosing radius, above every death (0.48), with 20 % of the edges below it; on a Gaussian
# cloud in 50-D it sits at 0.81, and 1-cycles there live on to 0.82 of the enclosing radius.
TRUNCATE_BELOW = 0.75  # of the enclosing radius
TRUNCATE_MAX_EDGES = 0.35  # of all pairs
TRUNCATE_GROWTH = 1.2  # next scale when a 1-cycle is still alive at the last one ...
TRUNCATE_TRIES = 2  # ... and how many scales to try before the full computation
MAX_COLLAPSE_ROUNDS = 32
STORED_RDM_MAX_SAMPLES = 1000

_thread_lock = threading.Lock()
_thread_depth = 0
_saved_threads = 0
_blas_controller: Any = None


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class PersistenceResult(RecordedResult):
    """Vietoris–Rips persistence of one point cloud.

    ``diagrams[k]``: ``(n_bars, 2)`` float64 array of (birth, death) for homology dimension ``k``
    (0 … ``max_dim``), sorted by decreasing lifetime; a bar that never dies has death ``inf``
    (H0 always has exactly one); bars of zero length (from duplicate samples) are left out, as in
    Ripser. Filtration values are ``metric`` distances (the Rips edge-length scale). All H0 bars are born at 0
    and die at the edge lengths of a minimum spanning tree of the samples.
    ``betti_grid``: ``(grid_size,)`` filtration values from 0 to the largest finite death;
    ``betti_curves``: ``(max_dim + 1, grid_size)`` number of bars alive (birth <= t < death) at each.
    ``total_persistence[k]``: sum of the finite lifetimes (death - birth) in dimension ``k``.
    ``persistence_entropy[k]``: Shannon entropy (nats) of the finite lifetimes normalised to sum to
    1, in ``[0, log(n_bars)]``; 0 when there is at most one finite bar. High entropy = many bars of
    similar length (noise); low = a few dominant features.
    ``n_points``: rows of the input; H0 always uses all of them. ``n_points_used``: the points the
    higher dimensions were computed on (``< n_points`` when subsampled); ``subsample_indices`` are
    their row numbers (farthest-point order), or None when no subsampling happened.
    ``threshold``: the scale up to which the diagrams of dimensions >= 1 are complete (the enclosing
    radius, beyond which the complex is a cone and nothing changes), or the longest spanning-tree
    edge for H0 alone. ``engine``: ``"mst"`` (H0 only), ``"ripser"`` (dense),
    ``"ripser-truncated"`` (dense, H0 + H1, computed only up to a certified bound on H1 births once
    no 1-cycle outlives it: the same diagrams, a fraction of the work) or ``"collapse+ripser"``
    (edge-collapsed sparse graph).
    """

    diagrams: dict[int, np.ndarray]
    betti_grid: np.ndarray
    betti_curves: np.ndarray
    total_persistence: np.ndarray
    persistence_entropy: np.ndarray
    max_dim: int
    metric: str
    n_points: int
    n_points_used: int
    subsample_indices: np.ndarray | None
    threshold: float
    engine: str

    @property
    def subsampled(self) -> bool:
        """True when dimensions >= 1 were computed on a farthest-point subsample."""
        return self.n_points_used < self.n_points

    def diagram(self, dim: int) -> np.ndarray:
        """The ``(n_bars, 2)`` diagram of homology dimension ``dim``."""
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise ParameterError(f"A homology dimension is an int in 0..{self.max_dim}; got {dim!r}.")
        if dim not in self.diagrams:
            raise ParameterError(
                f"This persistence result has dimensions 0..{self.max_dim}; dimension {dim!r} was not computed. "
                f"Recompute with max_dim={dim} or pick a dimension in 0..{self.max_dim}."
            )
        return self.diagrams[dim]

    def betti_steps(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """The Betti-``dim`` curve exactly, as a step function: ``(t, beta)`` with ``beta[i]`` bars alive
        (birth <= t < death) from ``t[i]`` up to ``t[i + 1]``. ``t`` holds 0, every birth and finite death of the
        dimension, and the end of :attr:`betti_grid` (the largest death of any dimension), so curves of all
        dimensions span the same range; unlike :attr:`betti_curves` it does not depend on the grid's step."""
        dgm = self.diagram(dim)
        births, deaths = np.sort(dgm[:, 0]), np.sort(dgm[:, 1])
        finite = deaths[np.isfinite(deaths)]
        end = max(float(self.betti_grid[-1]), float(finite[-1]) if finite.size else 0.0)
        t = np.unique(np.concatenate([[0.0], births, finite, [end]]))
        beta = np.searchsorted(births, t, side="right") - np.searchsorted(deaths, t, side="right")
        return t, beta


@dataclass(frozen=True)
class DiagramDistanceResult(RecordedResult):
    """Distance between the dimension-``dim`` diagrams of two persistence results.

    ``distance`` >= 0, 0 for identical diagrams; ``inf`` when the numbers of never-dying bars differ.
    Bottleneck: the largest shift (L-infinity in the birth/death plane) of the best matching, where
    unmatched bars go to the diagonal. Wasserstein of ``order`` q: (sum of shifts^q)^(1/q).
    With ``normalize=True`` each diagram was divided by its largest finite death first.
    """

    distance: float
    metric: str
    dim: int
    order: float
    normalize: bool
    n_bars: tuple[int, int]


@dataclass(frozen=True)
class DiagramDistanceMatrixResult(RecordedResult):
    """Diagram distances between every layer of A (rows) and every layer of B (columns).

    ``distances``: ``(len(layers_a), len(layers_b))``, lower is closer. ``subsampled``: names of the
    layers whose dimensions >= 1 were computed on a farthest-point subsample, in layer order (A, then B).
    ``model_a``, ``model_b``: the models the activations came from, where they say ("" otherwise).
    ``skipped_a``, ``skipped_b``: layers left out of the rows / columns because they are constant over samples
    (no topology to compute), in layer order. ``empty``: the layers whose dimension-``dim`` diagram has no bar (A's,
    then B's; a layer of both models named once): a distance to such a diagram is half the other diagram's longest
    bar, and between two of them 0, which says nothing about their likeness (few samples rarely form 1-cycles).
    """

    distances: np.ndarray
    layers_a: list[str]
    layers_b: list[str]
    metric: str
    dim: int
    order: float
    normalize: bool
    subsampled: list[str]
    model_a: str = ""
    model_b: str = ""
    skipped_a: list[str] = field(default_factory=list)
    skipped_b: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeparabilityResult(RecordedResult):
    """Topological class separability of one representation, with labelled references.

    ``score``: the persistence score S in ``(0, 1]``, the mean of the finite H0 persistence times
    (edge lengths of the Euclidean minimum spanning tree) divided by the largest one. **Lower means
    more separable**: well-separated classes leave a few long bars (the gaps between classes) and
    many short ones. ``normalized_times``: those ``n - 1`` normalised times, sorted decreasing.
    The labelled references are None when no labels were given (the probe ones also when
    ``probe=False``); each is **higher-is-more-separable**:
    ``fisher_ratio`` (>= 0), ``thornton_index`` (in [0, 1]), ``probe_accuracy`` (in [0, 1]),
    ``probe_roc_auc`` (in [0, 1]), ``calinski_harabasz`` (>= 0).
    """

    score: float
    normalized_times: np.ndarray
    fisher_ratio: float | None
    thornton_index: float | None
    probe_accuracy: float | None
    probe_roc_auc: float | None
    calinski_harabasz: float | None
    n_classes: int | None
    normalize: bool

    def references(self) -> dict[str, float]:
        """The labelled references that were computed, by name."""
        names = ("fisher_ratio", "thornton_index", "probe_accuracy", "probe_roc_auc", "calinski_harabasz")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


@dataclass(frozen=True)
class LayerSeparabilityResult(RecordedResult):
    """Separability across the layers of one model (or any named representations).

    ``scores``: ``(n_layers,)`` persistence score per layer (lower = more separable).
    ``references``: name -> ``(n_layers,)`` labelled reference per layer (higher = more separable);
    empty without labels. ``per_layer``: the full :class:`SeparabilityResult` of each layer.
    ``skipped``: layers left out because they are constant over samples (no topology to compute), in
    layer order; ``layers`` are the others.
    """

    layers: list[str]
    scores: np.ndarray
    references: dict[str, np.ndarray]
    per_layer: dict[str, SeparabilityResult]
    model_name: str
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeparabilityTrajectoryResult(RecordedResult):
    """The persistence score of one layer over a sequence of checkpoints, with a stopping rule.

    ``scores``: ``(n_checkpoints,)`` (lower = more separable). ``references``: name ->
    ``(n_checkpoints,)`` labelled references (higher = more separable), empty without labels.
    ``plateau_index``: the checkpoint where the score stopped improving (see :func:`plateau_index`);
    ``stop_index = plateau_index + patience``: the checkpoint at which a run monitoring the score
    would have stopped (the first moment the plateau is visible without labels). Both None when the
    score had not plateaued by the last checkpoint. ``reference_plateaus``: the same rule applied to
    each labelled reference (name -> checkpoint index or None), for comparison; None also for a
    reference that is infinite at some checkpoint (the Fisher ratio once a feature is constant within
    every class).
    """

    checkpoints: list[str]
    layer: str
    scores: np.ndarray
    references: dict[str, np.ndarray]
    plateau_index: int | None
    stop_index: int | None
    reference_plateaus: dict[str, int | None]
    patience: int
    tolerance: float


@dataclass(frozen=True)
class TopologicalRSAResult(RecordedResult):
    """Geo-topological RSA between two representations of the same samples.

    ``similarity`` in ``[-1, 1]``: Pearson correlation between the two representational
    geo-topological matrices (RGTMs) over all sample pairs; 1 for identical topology-geometry.
    ``rgtm_x``, ``rgtm_y``: ``(n, n)`` float32 RGTMs in [0, 1] (kept when n <= 1000, else None).
    """

    similarity: float
    rgtm_x: np.ndarray | None
    rgtm_y: np.ndarray | None
    lower: float
    upper: float
    metric: str


# ---------------------------------------------------------------------------------------------
# distances and spanning trees (cores: inputs are trusted float64 tensors)


@contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """Run many small CPU operations (torch, and BLAS under numpy / scikit-learn) on one thread.

    Prim's and farthest-point sampling's per-step ops and the probe's small solves are too small to
    gain from threads; on a busy machine the thread hand-offs made them 10-100x slower. The torch
    setting is restored afterwards (nesting- and thread-safe through a counter).
    """
    global _thread_depth, _saved_threads, _blas_controller
    if device.type != "cpu":
        yield
        return
    with _thread_lock:
        if _blas_controller is None:
            import scipy.linalg  # noqa: F401 - load scipy's and scikit-learn's thread pools before scanning them
            import sklearn.linear_model  # noqa: F401
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()  # scanning the loaded libraries takes milliseconds: once
        if _thread_depth == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _thread_depth += 1
    try:
        with _blas_controller.limit(limits=1):
            yield
    finally:
        with _thread_lock:
            _thread_depth -= 1
            if _thread_depth == 0:
                torch.set_num_threads(_saved_threads)


def _points(x: torch.Tensor, unit: bool, func: str, name: str = "x") -> torch.Tensor:
    """Centred (and, for ``unit``, L2-normalised) float64 points; the input is not modified."""
    if unit:
        x = x * unit_scale(x)  # the directions do not depend on it; the norms stay in range
        norms = torch.linalg.vector_norm(x, dim=1)
        n_zero = int((norms == 0).sum())
        if n_zero:
            raise DataError(
                f"{func}: '{name}' has {n_zero} all-zero rows, whose direction (cosine metric / L2 normalisation) "
                "is undefined; drop those samples or use the Euclidean metric (normalize=False)."
            )
        x = x / norms[:, None]
    return x - x.mean(0, keepdim=True)


def _distance_matrix(p: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(n, n)``, exactly symmetric, with an exact zero diagonal.

    From :func:`squared_distances`: duplicate samples are exactly 0 apart (else each pair of them would
    add an H0 bar of ~1e-8) and the distances inside tight clusters keep their digits."""
    d = squared_distances(p).sqrt_()
    sym = d.T.contiguous()  # a blocked transpose copy: twice as fast as adding the strided view
    sym.add_(d).mul_(0.5)
    sym.fill_diagonal_(0.0)
    return sym


def _mst_from_matrix(d: torch.Tensor) -> np.ndarray:
    """Edge lengths of a minimum spanning tree of a dense distance matrix (Prim), unsorted."""
    n = d.shape[0]
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    key = d[0].clone()
    penalty = torch.zeros(n, dtype=d.dtype, device=d.device)
    penalty[0] = inf
    key[0] = inf
    weights = torch.empty(max(n - 1, 0), dtype=d.dtype, device=d.device)
    with _single_threaded(d.device):
        for step in range(n - 1):
            j = torch.argmin(key)
            weights[step] = key[j]
            penalty[j] = inf
            key[j] = inf
            torch.minimum(key, d[j] + penalty, out=key)
    return weights.cpu().numpy()


def _mst_from_points(p: torch.Tensor) -> np.ndarray:
    """Edge lengths of a Euclidean minimum spanning tree of ``p`` (Prim), unsorted.

    Never forms the distance matrix: each step computes the distances from the newest tree vertex to
    the remaining ones with one matrix-vector product over a compacted copy of the points (memory
    O(n * d)). The chosen edges' lengths are then recomputed from coordinate differences.
    """
    n = p.shape[0]
    dev = p.device
    work = p.clone()
    sq = (work * work).sum(1)
    ids = torch.arange(n, device=dev)
    key = torch.full((n,), float("inf"), dtype=p.dtype, device=dev)  # min over tree j of |x_j|^2 - 2 x_i.x_j
    nearest = torch.zeros(n, dtype=torch.long, device=dev)
    child = torch.empty(max(n - 1, 0), dtype=torch.long, device=dev)
    parent = torch.empty(max(n - 1, 0), dtype=torch.long, device=dev)
    j, m = 0, n
    # Not single-threaded: the matrix-vector product over the remaining points is large enough to gain from
    # threads (1.4 s -> 0.9 s for 10,000 points in 64-D on two cores); the other per-step ops are below
    # torch's parallel grain size and stay on one thread anyway.
    for step in range(n - 1):
        xj, sqj, idj = work[j].clone(), sq[j].clone(), ids[j].clone()
        m -= 1
        if j != m:  # move the last remaining point into the slot of the one just added
            work[j], sq[j], key[j], nearest[j], ids[j] = work[m], sq[m], key[m], nearest[m], ids[m]
        cand = torch.addmv(sqj.expand(m), work[:m], xj, alpha=-2.0)
        k = key[:m]
        better = cand < k
        torch.where(better, cand, k, out=k)
        nearest[:m].masked_fill_(better, idj)
        j = int(torch.argmin(k + sq[:m]))
        child[step] = ids[j]
        parent[step] = nearest[j]
    return torch.linalg.vector_norm(p[child] - p[parent], dim=1).cpu().numpy()


def _farthest_points(p: torch.Tensor | None, d: torch.Tensor | None, m: int, seed: int) -> torch.Tensor:
    """Greedy farthest-point sample of ``m`` indices, from points ``p`` or a distance matrix ``d``.

    The first index is drawn with ``seed``; each next one maximises the distance to those chosen.
    """
    n = p.shape[0] if p is not None else d.shape[0]
    dev = p.device if p is not None else d.device
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(m, dtype=torch.long, device=dev)
    chosen[0] = first
    if p is not None:
        sq = (p * p).sum(1)

        def dist2(i: torch.Tensor) -> torch.Tensor:
            return torch.addmv(sq + sq[i], p, p[i], alpha=-2.0)
    else:

        def dist2(i: torch.Tensor) -> torch.Tensor:
            return d[i]

    gaps = torch.empty(m, dtype=p.dtype if p is not None else d.dtype, device=dev)
    gaps[0] = float("inf")
    with _single_threaded(dev):
        nearest = dist2(chosen[0]).clone()
        for step in range(1, m):
            nxt = torch.argmax(nearest)
            chosen[step] = nxt
            gaps[step] = nearest[nxt]
            torch.minimum(nearest, dist2(nxt), out=nearest)
    # with fewer than m distinct points, later picks coincide with chosen ones (gap 0 up to the rounding of
    # the squared distances |a|^2 + |b|^2 - 2 a.b): drop them
    tol = 0.0 if p is None else 64 * torch.finfo(p.dtype).eps * 2 * float(sq.max())
    distinct = int((gaps > tol).sum())
    return chosen[:distinct]


def _available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux /proc/meminfo, else sysconf, else 4 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _rips_diagrams(
    d: np.ndarray, max_dim: int, collapse: bool, memory_limit: int
) -> tuple[dict[int, np.ndarray], float, str]:
    """Diagrams of dimensions 0..max_dim of the Rips filtration of distance matrix ``d`` (gudhi).

    Dense Ripser when its estimated memory fits ``memory_limit`` (and for H1 only); otherwise, when
    ``collapse``, the graph of edges up to the enclosing radius is reduced by edge collapses
    (exact: the flag filtration keeps its persistence) until stable, and Ripser runs on it. Dense
    H0 + H1 first tries scales from :func:`_h1_birth_bound` up, and keeps the first run in which
    no 1-cycle is still alive.
    """

    n = d.shape[0]
    threshold = float(d.max(1).min())  # enclosing radius
    dims = list(range(max_dim + 1))
    use_collapse = collapse and max_dim >= 2
    if collapse and not use_collapse and RIPSER_BYTES_PER_EDGE * n * (n - 1) // 2 > memory_limit:
        n_edges = int((np.count_nonzero(d <= threshold) - n) // 2)
        use_collapse = RIPSER_BYTES_PER_EDGE * n_edges + d.nbytes > memory_limit
        if use_collapse:
            log.info(
                "Rips on %d points: %d edges, estimated %.0f MiB above the %.0f MiB limit; using edge collapse",
                n,
                n_edges,
                RIPSER_BYTES_PER_EDGE * n_edges / 2**20,
                memory_limit / 2**20,
            )
    if not use_collapse:
        if max_dim == 1 and n >= TRUNCATE_MIN_POINTS:
            scale = _h1_birth_bound(torch.from_numpy(d))
            for _ in range(TRUNCATE_TRIES):
                if scale >= TRUNCATE_BELOW * threshold or np.count_nonzero(d <= scale) > TRUNCATE_MAX_EDGES * d.size:
                    break
                diagrams = _ripser(d, dims, "full distance matrix", scale)
                if np.isinf(diagrams[0][:, 1]).sum() == 1 and not np.isinf(diagrams[1][:, 1]).any():
                    return diagrams, threshold, "ripser-truncated"
                log.info("Rips on %d points: a 1-cycle outlives scale %.4g (births end before it)", n, scale)
                scale *= TRUNCATE_GROWTH
        return _ripser(d, dims, "full distance matrix"), threshold, "ripser"
    from gudhi.flag_filtration.edge_collapse import reduce_graph
    from scipy.sparse import coo_matrix

    rows, cols = np.nonzero(np.triu(d <= threshold, k=1))
    graph = coo_matrix((d[rows, cols], (rows, cols)), shape=(n, n))
    del rows, cols
    for _ in range(MAX_COLLAPSE_ROUNDS):
        reduced = reduce_graph(graph, 1)
        stable = reduced.nnz == graph.nnz
        graph = reduced
        if stable:
            break
    return _ripser(graph, dims, "distance coo_matrix"), threshold, "collapse+ripser"


def _ripser(data: Any, dims: list[int], input_type: str, max_edge_length: float = np.inf) -> dict[int, np.ndarray]:
    """gudhi's Ripser on a full distance matrix or a sparse edge graph, up to ``max_edge_length``."""
    from gudhi.sklearn.rips_persistence import RipsPersistence

    rips = RipsPersistence(
        homology_dimensions=dims,
        threshold=max_edge_length,
        input_type=input_type,
        num_collapses=0,
        homology_coeff_field=HOMOLOGY_FIELD,
    )
    out = rips.fit_transform([data])[0]
    return {k: np.asarray(out[k], dtype=np.float64).reshape(-1, 2) for k in dims}


def _h1_birth_bound(d: torch.Tensor) -> float:
    """An upper bound on the birth of every 1-cycle of the Rips filtration of the distance matrix ``d``.

    An edge ``uv`` with a witness ``w`` (``max(d_uw, d_vw) < d_uv``) enters together with the
    triangle ``uvw`` whose other two edges are already in: an elementary expansion, which changes no
    homology, and the other simplices entering at that value can only fill 1-cycles. So 1-cycles
    are born only at edges without a witness (the relative neighbourhood graph), and the longest
    edge for which no witness turns up among either end's nearest neighbours and a farthest-point
    set of landmarks bounds every H1 birth. Persistence computed up to this bound is the whole H1
    diagram when no 1-cycle is still alive there. Witnesses are tested in float32 with a relative
    margin that covers the rounding, so an edge counts as witnessed only when it is in float64.
    """
    n = d.shape[0]
    d32 = d.float()
    margin = 1.0 - 64 * float(torch.finfo(torch.float32).eps)
    near = d32.topk(min(BIRTH_BOUND_NEIGHBOURS + 1, n), largest=False).indices[:, 1:]
    landmarks = _farthest_points(None, d, min(BIRTH_BOUND_LANDMARKS, n), seed=0)
    from_landmarks = d32[landmarks]  # (landmarks, n)
    block = max(1, (1 << 24) // (max(near.shape[1], len(landmarks)) * n))  # (rows, candidates, n) blocks under 64 MiB
    unwitnessed = torch.empty(n, n, dtype=torch.bool)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows = torch.arange(lo, hi)[:, None]
        # best witness of each pair (rows, n) among the row's neighbours, then among the landmarks
        best = torch.maximum(d32[rows, near[lo:hi]][:, :, None], d32[near[lo:hi]]).amin(1)
        best = torch.minimum(best, torch.maximum(d32[rows, landmarks][:, :, None], from_landmarks[None]).amin(1))
        unwitnessed[lo:hi] = ~(best < d32[lo:hi] * margin)
    unwitnessed &= unwitnessed.T.clone()  # a witness found from either end will do
    unwitnessed.fill_diagonal_(False)
    return float(d[unwitnessed].max()) if bool(unwitnessed.any()) else 0.0


def _h0_diagram(lengths: np.ndarray) -> np.ndarray:
    """H0 diagram from MST edge lengths: births 0, deaths = the positive lengths, plus one infinite bar.

    Zero-length edges (duplicate samples) make no bar, as in Ripser's output.
    """
    deaths = np.concatenate([np.sort(lengths[lengths > 0])[::-1], [np.inf]])
    return np.stack([np.zeros_like(deaths), deaths], axis=1)


def _sorted_by_lifetime(dgm: np.ndarray) -> np.ndarray:
    if len(dgm) == 0:
        return dgm.reshape(0, 2)
    life = dgm[:, 1] - dgm[:, 0]
    order = np.lexsort((dgm[:, 0], -life))
    return np.ascontiguousarray(dgm[order])


def _summaries(
    diagrams: dict[int, np.ndarray], grid_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Betti curves on a common grid, total persistence and persistence entropy per dimension."""
    finite = [dg[np.isfinite(dg[:, 1])] for dg in diagrams.values()]
    top = max((float(f[:, 1].max()) for f in finite if len(f)), default=0.0)
    if top == 0.0:
        top = max((float(dg[:, 0].max()) for dg in diagrams.values() if len(dg)), default=0.0) or 1.0
    grid = np.linspace(0.0, top, grid_size)
    curves = np.zeros((len(diagrams), grid_size))
    total = np.zeros(len(diagrams))
    entropy = np.zeros(len(diagrams))
    for k, dg in diagrams.items():
        if len(dg):
            alive = (dg[:, :1] <= grid[None, :]) & (grid[None, :] < dg[:, 1:])
            curves[k] = alive.sum(0)
        f = dg[np.isfinite(dg[:, 1])]
        life = f[:, 1] - f[:, 0]
        total[k] = life.sum()
        if len(life) > 1 and total[k] > 0:
            q = life[life > 0] / total[k]
            entropy[k] = float(-(q * np.log(q)).sum())
    return grid, curves, total, entropy


def _check_distance_matrix(d: torch.Tensor, func: str) -> None:
    if d.shape[0] != d.shape[1]:
        raise DataError(
            f"{func}: with metric='precomputed', 'x' must be a square (n, n) distance matrix. Got shape {tuple(d.shape)}."
        )
    if bool((d < 0).any()):
        raise DataError(f"{func}: the precomputed distance matrix 'x' has negative entries; distances must be >= 0.")
    if float(d.diagonal().abs().max()) != 0.0:
        raise DataError(
            f"{func}: the precomputed distance matrix 'x' must have a zero diagonal (distance of a sample to itself)."
        )
    scale = float(d.abs().max()) or 1.0
    if float((d - d.T).abs().max()) > 1e-9 * scale:
        raise DataError(
            f"{func}: the precomputed distance matrix 'x' is not symmetric; pass (d + d.T) / 2 if that is intended."
        )


# ---------------------------------------------------------------------------------------------
# persistence


def _persistence_core(
    p: torch.Tensor | None,
    d_full: torch.Tensor | None,
    max_dim: int,
    max_points: int,
    seed: int,
    collapse: bool,
    memory_limit: int,
    report: Progress,
    stages: int,
) -> tuple[dict[int, np.ndarray], float, str, torch.Tensor | None]:
    """Diagrams from centred points ``p`` or a distance matrix ``d_full`` (exactly one is given).

    The data are multiplied by a power of two that brings them near 1 and the diagrams divided by it
    (both exact), so squared distances stay inside the float64 range for data of any scale."""
    scale = unit_scale(p if p is not None else d_full)
    p = p * scale if p is not None else None
    d_full = d_full * scale if d_full is not None else None
    if max_dim == 0:
        lengths = _mst_from_matrix(d_full) if d_full is not None else _mst_from_points(p)
        report(2, stages)
        return {0: _h0_diagram(lengths / scale)}, float(lengths.max()) / scale if len(lengths) else 0.0, "mst", None
    n = d_full.shape[0] if d_full is not None else p.shape[0]
    subsample, lengths = None, None
    if n > max_points:
        subsample = _farthest_points(p, d_full, max_points, seed)
        lengths = _mst_from_matrix(d_full) if d_full is not None else _mst_from_points(p)
        d_sub = d_full[subsample][:, subsample] if d_full is not None else _distance_matrix(p[subsample])
    else:
        d_sub = d_full if d_full is not None else _distance_matrix(p)
    report(2, stages)
    diagrams, threshold, engine = _rips_diagrams(
        np.ascontiguousarray(d_sub.cpu().numpy()), max_dim, collapse, memory_limit
    )
    diagrams = {k: v / scale for k, v in diagrams.items()}
    if lengths is not None:  # H0 of every sample, not only the subsample
        diagrams[0] = _h0_diagram(lengths / scale)
    report(3, stages)
    return diagrams, threshold / scale, engine, subsample


def persistence(
    x: ArrayLike,
    *,
    max_dim: int = 1,
    max_points: int = 1000,
    metric: str = "euclidean",
    seed: int = 0,
    collapse: bool = True,
    memory_limit_mb: float | None = None,
    grid_size: int = GRID_SIZE,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> PersistenceResult:
    """Vietoris–Rips persistent homology of a representation.

    The Rips complex at scale t joins every set of samples whose pairwise distances are all <= t;
    persistence records, for each dimension k, the scale at which each k-dimensional feature
    (H0: connected component, H1: loop, H2: cavity) appears (birth) and disappears (death).

    ``x``: ``(n_samples, n_features)`` activations, or an ``(n, n)`` distance matrix with
    ``metric="precomputed"``. Not modified.
    ``max_dim``: highest homology dimension, 0-2. H0 alone is exact and fast for any n: a minimum
    spanning tree by Prim's algorithm in torch (10,000 points in about a second, memory O(n * d));
    when the Rips engine runs on all samples its H0 is used, which is the same tree. H1 costs
    seconds for 1000-2000 points; H2 grows much faster.
    ``max_points``: when ``n_samples`` exceeds it, dimensions >= 1 are computed on ``max_points``
    samples chosen by farthest-point sampling (a 2r-net that keeps the cloud's shape; recorded in
    ``subsample_indices``). H0 always uses every sample. 500-2000 is a sensible range.
    ``metric``: ``"euclidean"``; ``"cosine"``: Euclidean distance between L2-normalised rows,
    sqrt(2 - 2 cos), a metric that ignores scale; or ``"precomputed"``.
    ``seed``: picks the first farthest-point sample (the only randomness).
    ``collapse``: when the dense engine's estimated memory (about 512 bytes per edge below the
    enclosing radius) exceeds ``memory_limit_mb``, reduce the complex by exact edge collapses first
    (several times slower, a fraction of the memory); always used for ``max_dim=2``. With False the
    dense engine always runs.
    ``memory_limit_mb``: memory budget for the dense engine; None = half the memory available now.
    ``grid_size``: number of filtration values for the Betti curves. ``device``: where distances and
    the spanning tree are computed (None = auto); the Rips engine runs on the CPU.
    ``progress(done, total)``: called after each of the stages (distances, H0, higher dimensions).

    Returns a :class:`PersistenceResult` (diagrams, Betti curves, total persistence, entropy).
    """
    func = "persistence"
    t0 = time.perf_counter()
    max_dim = check_int(max_dim, "max_dim", func=func, low=0, high=MAX_DIM)
    max_points = check_int(max_points, "max_points", func=func, low=3)
    metric = check_choice(metric, "metric", METRICS, func=func)
    seed = check_seed(seed, func=func)
    grid_size = check_int(grid_size, "grid_size", func=func, low=2, high=100_000)
    if not isinstance(collapse, bool):
        raise ParameterError(f"The 'collapse' parameter of {func} must be True or False. Got {collapse!r}.")
    if memory_limit_mb is None:
        memory_limit = _available_memory() // 2
    else:
        memory_limit = int(
            check_float(memory_limit_mb, "memory_limit_mb", func=func, low=0.0, low_inclusive=False) * 2**20
        )
    dev = float64_device(resolve_device(device))
    t = as_matrix(x, "x", func=func, device=dev, min_samples=2)
    n = t.shape[0]
    stages = 2 if max_dim == 0 else 3
    report = progress or (lambda done, total: None)
    if metric == "precomputed":
        _check_distance_matrix(t, func)
        p, d_full = None, t
    else:
        check_not_constant(t, "x", func=func)
        p, d_full = _points(t, metric == "cosine", func), None
    report(1, stages)
    diagrams, threshold, engine, subsample = _persistence_core(
        p, d_full, max_dim, max_points, seed, collapse, memory_limit, report, stages
    )
    used = n if subsample is None else len(subsample)
    diagrams = {k: _sorted_by_lifetime(v) for k, v in diagrams.items()}
    grid, curves, total, entropy = _summaries(diagrams, grid_size)
    subsample_np = None if subsample is None else subsample.cpu().numpy()
    label = {
        "mst": "H0 by minimum spanning tree (Prim, torch)",
        "ripser": "Vietoris-Rips persistence, gudhi Ripser (dense)",
        "ripser-truncated": "Vietoris-Rips persistence, gudhi Ripser up to a certified bound on H1 births (exact)",
        "collapse+ripser": "Vietoris-Rips persistence, edge collapse + gudhi Ripser (sparse)",
    }[engine] + f", {metric} distance"
    if subsample is not None:
        label += f"; H0 of all {n} points (minimum spanning tree), H≥1 on {len(subsample)} of {n} points (farthest-point sampling)"
    return PersistenceResult(
        diagrams=diagrams,
        betti_grid=grid,
        betti_curves=curves,
        total_persistence=total,
        persistence_entropy=entropy,
        max_dim=max_dim,
        metric=metric,
        n_points=n,
        n_points_used=used,
        subsample_indices=subsample_np,
        threshold=threshold,
        engine=engine,
        estimator=label,
        n_samples=n,
        params={
            "max_dim": max_dim,
            "max_points": max_points,
            "metric": metric,
            "collapse": collapse,
            "memory_limit_mb": memory_limit_mb,
            "grid_size": grid_size,
            "homology_field": HOMOLOGY_FIELD,
        },
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# diagram distances


def _as_diagram(value: Any, dim: int, name: str, func: str) -> np.ndarray:
    if isinstance(value, PersistenceResult):
        return value.diagram(dim)
    try:
        arr = (
            np.asarray(value, dtype=np.float64)
            if not isinstance(value, torch.Tensor)
            else value.detach().cpu().double().numpy()
        )
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{func}: '{name}' must be a PersistenceResult or an (n, 2) array of (birth, death) pairs. Got {type(value).__name__}."
        ) from exc
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(
            f"{func}: '{name}' must be a PersistenceResult or an (n_bars, 2) array of (birth, death). Got shape {arr.shape}."
        )
    if np.isnan(arr).any() or np.isinf(arr[:, 0]).any():
        raise DataError(f"{func}: diagram '{name}' has NaN values or infinite births; only deaths may be infinite.")
    if (arr[:, 1] < arr[:, 0]).any():
        raise DataError(f"{func}: diagram '{name}' has bars that die before they are born (death < birth).")
    return arr


def empty_diagrams_note(result: DiagramDistanceMatrixResult) -> str:
    """One sentence on the layers of ``result`` whose diagrams have no bar ("" when every diagram has one)."""
    if not result.empty:
        return ""
    layers = list(dict.fromkeys([*result.layers_a, *result.layers_b]))
    if len(result.empty) == len(layers):
        return (f"No layer has an H{result.dim} bar on these {result.n_samples} samples, so every distance is 0 and says "
                f"nothing; use more samples{' or H0' if result.dim > 0 else ''}.")
    verb = "has" if len(result.empty) == 1 else "have"
    return (f"{', '.join(result.empty)} {verb} no H{result.dim} bar: a distance to an empty diagram is half the other "
            "diagram's longest bar.")


def _scaled(dgm: np.ndarray) -> np.ndarray:
    finite = dgm[np.isfinite(dgm[:, 1]), 1]
    top = float(finite.max()) if len(finite) else 0.0
    return dgm / top if top > 0 else dgm


def _diagram_distance_core(a: np.ndarray, b: np.ndarray, metric: str, order: float) -> float:
    """Bottleneck or Wasserstein distance of the diagrams ``a`` and ``b`` (gudhi), in their units.

    Both distances scale with the diagrams, so both are multiplied by one power of two (exact) that brings their
    largest finite value near 1 and the distance is divided by it: gudhi's bottleneck returns 0 for diagrams of
    subnormal values (below about 2.2e-308), and its Wasserstein search never ends when the ``order``-th powers of
    the shifts overflow or underflow (order 2 on values near 1e300 or 1e-200)."""
    if a.shape == b.shape and np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]):
        return 0.0  # identical multisets of bars (gudhi's near-exact bottleneck returns ~1e-308 here)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    scale = unit_scale(torch.from_numpy(finite))
    a, b = a * scale, b * scale
    if metric == "bottleneck":
        from gudhi import bottleneck_distance

        return float(bottleneck_distance(a, b)) / scale
    from gudhi.hera import wasserstein_distance

    return float(wasserstein_distance(a, b, order=order, internal_p=float("inf"), delta=1e-6)) / scale


def _check_diagram_params(metric: str, dim: int, order: float, normalize: bool, func: str) -> tuple[str, int, float]:
    metric = check_choice(metric, "metric", DIAGRAM_METRICS, func=func)
    dim = check_int(dim, "dim", func=func, low=0, high=MAX_DIM)
    order = check_float(order, "order", func=func, low=1.0)
    if not isinstance(normalize, bool):
        raise ParameterError(f"The 'normalize' parameter of {func} must be True or False. Got {normalize!r}.")
    return metric, dim, order


def diagram_distance(
    a: PersistenceResult | ArrayLike,
    b: PersistenceResult | ArrayLike,
    *,
    metric: str = "bottleneck",
    dim: int = 1,
    order: float = 1.0,
    normalize: bool = False,
) -> DiagramDistanceResult:
    """Bottleneck or Wasserstein distance between two persistence diagrams (gudhi).

    ``a``, ``b``: :class:`PersistenceResult` (their dimension-``dim`` diagrams are compared) or
    ``(n_bars, 2)`` arrays of (birth, death), deaths possibly ``inf``.
    ``metric``: ``"bottleneck"`` (the largest shift of the best matching; stable: at most the largest
    change of any pairwise distance) or ``"wasserstein"`` (the q-th root of the summed q-th powers
    of the shifts, with ``order`` q >= 1; sensitive to many small differences). Shifts are measured
    in the L-infinity norm of the (birth, death) plane; unmatched bars go to the diagonal.
    ``normalize``: divide each diagram by its largest finite death first, so that layers of
    different overall scale are compared by shape only (the distance is then scale-invariant).

    Returns a :class:`DiagramDistanceResult`; 0 for identical diagrams, symmetric in ``a`` and ``b``.
    """
    func = "diagram_distance"
    t0 = time.perf_counter()
    metric, dim, order = _check_diagram_params(metric, dim, order, normalize, func)
    da, db = _as_diagram(a, dim, "a", func), _as_diagram(b, dim, "b", func)
    if normalize:
        da, db = _scaled(da), _scaled(db)
    value = _diagram_distance_core(da, db, metric, order)
    n = max(getattr(a, "n_samples", len(da)), getattr(b, "n_samples", len(db)))
    label = f"{metric} distance between H{dim} diagrams (gudhi)" + (
        f", order {order:g}" if metric == "wasserstein" else ""
    )
    return DiagramDistanceResult(
        distance=value,
        metric=metric,
        dim=dim,
        order=order,
        normalize=normalize,
        n_bars=(len(da), len(db)),
        estimator=label + (", scale-normalised" if normalize else ""),
        n_samples=int(n),
        params={"metric": metric, "dim": dim, "order": order, "normalize": normalize},
        seed=None,
        device="cpu",
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


def persistence_distance(
    x: ArrayLike,
    y: ArrayLike,
    *,
    metric: str = "bottleneck",
    dim: int = 1,
    order: float = 1.0,
    normalize: bool = False,
    max_points: int = 1000,
    point_metric: str = "euclidean",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> DiagramDistanceResult:
    """Diagram distance between the persistence of two representations of the same samples.

    ``x``: ``(n_samples, n_features_x)``, ``y``: ``(n_samples, n_features_y)``. Computes
    :func:`persistence` of each (up to dimension ``dim``, same ``max_points``, ``point_metric`` and
    ``seed``) and then :func:`diagram_distance`. 0 for identical representations; invariant to
    rotations, translations and feature permutations of either (and to scale with ``normalize``).
    ``progress(done, total)``: counts the stages of both persistence computations, then the comparison.
    """
    func = "persistence_distance"
    metric, dim, order = _check_diagram_params(metric, dim, order, normalize, func)
    tx = as_matrix(x, "x", func=func, device=torch.device("cpu"))
    ty = as_matrix(y, "y", func=func, device=torch.device("cpu"))
    check_paired(tx, ty, func=func)
    report = progress or (lambda done, total: None)
    stages = 2 if dim == 0 else 3  # as counted by persistence
    total = 2 * stages + 1
    kw = {"max_dim": max(dim, 0), "max_points": max_points, "metric": point_metric, "seed": seed, "device": device}
    pa = persistence(tx, **kw, progress=lambda done, _: report(done, total))
    pb = persistence(ty, **kw, progress=lambda done, _: report(stages + done, total))
    res = diagram_distance(pa, pb, metric=metric, dim=dim, order=order, normalize=normalize)
    report(total, total)
    return DiagramDistanceResult(
        distance=res.distance,
        metric=metric,
        dim=dim,
        order=order,
        normalize=normalize,
        n_bars=res.n_bars,
        estimator=f"{res.estimator}; {pa.estimator}",
        n_samples=pa.n_samples,
        params={**res.params, "max_points": max_points, "point_metric": point_metric},
        seed=seed,
        device=pa.device,
        dtype="float64",
        seconds=pa.seconds + pb.seconds + res.seconds,
    )


def _of_model(acts: Any) -> str:
    """`` of model <name>`` for Activations that name their model, else ``""``."""
    model = str(getattr(acts, "model_name", "") or "")
    return f" of model {model}" if model else ""


def _constant_layers_error(layers: Sequence[str], acts: Any, func: str) -> ConstantDataError:
    """The error for ``layers`` of ``acts`` that are constant over samples, naming them and the model."""
    what = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(layers)}"
    return ConstantDataError(
        f"{func}: {what}{_of_model(acts)} {'is' if len(layers) == 1 else 'are'} constant over samples (zero variance "
        "in every feature), so there is no topology to compute; pick another layer or another pooling, or check that "
        "the model is not dead on this dataset."
    )


@contextmanager
def _naming_layer(layer: str, acts: Any, func: str) -> Iterator[None]:
    """Re-raise a data error from the block with the layer and the model it came from named."""
    try:
        yield
    except ConstantDataError as exc:
        raise _constant_layers_error([layer], acts, func) from exc
    except DataError as exc:
        raise type(exc)(f"{func}: layer {layer}{_of_model(acts)}: {exc}") from exc


def _layer_persistence(
    acts: Any, layers: Sequence[str], name: str, func: str, **kwargs: Any
) -> tuple[dict[str, PersistenceResult], list[str]]:
    """Persistence per layer of Activations, or the given layer name -> PersistenceResult entries, and the layers
    left out because they are constant over samples."""
    if not isinstance(acts, Mapping) or not acts:
        raise DataError(
            f"{func}: '{name}' must be Activations (layer name -> (n_samples, n_features)) or a dict of layer name -> "
            f"PersistenceResult. Got {type(acts).__name__}."
        )
    out, skipped = {}, []
    for layer in check_layer_names(acts, layers, func=func, arg=name):
        value = acts[layer]
        try:
            with _naming_layer(layer, acts, func):
                out[layer] = value if isinstance(value, PersistenceResult) else persistence(value, **kwargs)
        except ConstantDataError:
            skipped.append(layer)
    return out, skipped


def _shared_setting(pa: Mapping[str, Any], pb: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value of persistence setting ``key`` that every diagram compared was computed with (a list of the values
    when they differ; ``default`` for results that do not record it)."""
    values = list(dict.fromkeys(v.params.get(key, default) for v in (*pa.values(), *pb.values())))
    return values[0] if len(values) == 1 else values


def diagram_distance_matrix(
    a: Any,
    b: Any = None,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    metric: str = "bottleneck",
    dim: int = 1,
    order: float = 1.0,
    normalize: bool = False,
    max_points: int = 1000,
    point_metric: str = "euclidean",
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> DiagramDistanceMatrixResult:
    """Diagram distances between every layer of model A and every layer of model B.

    ``a``, ``b``: :class:`~workbench.Activations` of two models on the same samples, or dicts of
    layer name -> :class:`PersistenceResult` already computed. ``b=None`` compares A's layers with
    each other (a symmetric matrix with a zero diagonal). ``layers_a``/``layers_b``: subsets, in
    order (default: all). Persistence of each layer is computed once (up to dimension ``dim``, with
    ``max_points``, ``point_metric`` and ``seed`` as in :func:`persistence`), then every pair is
    compared as in :func:`diagram_distance`. A layer constant over samples has no topology: it is left
    out and recorded in ``skipped_a`` / ``skipped_b`` (an error when every layer of a model is).
    ``progress(done, total)`` counts layers and pairs.
    """
    func = "diagram_distance_matrix"
    if b is not None:
        check_same_dataset(a, b, func=func)
    t0 = time.perf_counter()
    metric, dim, order = _check_diagram_params(metric, dim, order, normalize, func)
    report = progress or (lambda done, total: None)
    source_b = a if b is None else b
    if not isinstance(a, Mapping) or not isinstance(source_b, Mapping):
        bad = a if not isinstance(a, Mapping) else b
        raise DataError(
            f"{func}: 'a' and 'b' must be Activations or dicts of layer name -> PersistenceResult. Got {type(bad).__name__}."
        )
    names_a = list(a) if layers_a is None else list(layers_a)
    names_b = list(source_b) if layers_b is None else list(layers_b)
    if not names_a or not names_b:
        raise ParameterError(f"{func}: 'layers_a' and 'layers_b' must each name at least one layer.")
    kw = {"max_dim": dim, "max_points": max_points, "metric": point_metric, "seed": seed, "device": device}
    todo_b = [n for n in names_b if b is not None or n not in names_a]
    total = len(names_a) + len(todo_b) + len(names_a) * len(names_b)
    pa, skipped_a = _layer_persistence(a, names_a, "a", func, **kw)
    if not pa:
        raise _constant_layers_error(skipped_a, a, func)
    report(len(names_a), total)
    new_b, skipped_b = _layer_persistence(source_b, todo_b, "b" if b is not None else "a", func, **kw)
    pb = {**({} if b is not None else pa), **new_b}
    if b is None:
        skipped_b = [n for n in names_b if n in skipped_a or n in skipped_b]
    done = len(names_a) + len(todo_b)
    names_a, names_b = [n for n in names_a if n in pa], [n for n in names_b if n in pb]
    if not names_b:
        raise _constant_layers_error(skipped_b, source_b, func)
    total = done + len(names_a) * len(names_b)
    report(done, total)
    diag = {k: (_scaled(v.diagram(dim)) if normalize else v.diagram(dim)) for k, v in pa.items()}
    diag_b = {k: (_scaled(v.diagram(dim)) if normalize else v.diagram(dim)) for k, v in pb.items()}
    out = np.zeros((len(names_a), len(names_b)))
    for i, la in enumerate(names_a):
        for j, lb in enumerate(names_b):
            same = b is None and la == lb
            out[i, j] = 0.0 if same else _diagram_distance_core(diag[la], diag_b[lb], metric, order)
            done += 1
            report(done, total)
    subsampled = list(dict.fromkeys([k for k, v in pa.items() if v.subsampled] + [k for k, v in pb.items() if v.subsampled]))
    empty = list(dict.fromkeys([k for k in names_a if not len(diag[k])] + [k for k in names_b if not len(diag_b[k])]))
    first = next(iter(pa.values()))
    label = f"{metric} distance between H{dim} diagrams (gudhi)" + (
        f", order {order:g}" if metric == "wasserstein" else ""
    )
    if normalize:
        label += ", scale-normalised"
    return DiagramDistanceMatrixResult(
        distances=out,
        layers_a=names_a,
        layers_b=names_b,
        metric=metric,
        dim=dim,
        order=order,
        normalize=normalize,
        subsampled=subsampled,
        model_a=str(getattr(a, "model_name", "") or ""),
        model_b=str(getattr(source_b, "model_name", "") or ""),
        skipped_a=skipped_a,
        skipped_b=skipped_b,
        empty=empty,
        estimator=f"{label}; {first.estimator}",
        n_samples=first.n_samples,
        params={
            "metric": metric,
            "dim": dim,
            "order": order,
            "normalize": normalize,
            # as the diagrams were computed (given diagrams carry their own settings, not this call's defaults)
            "max_points": _shared_setting(pa, pb, "max_points", max_points),
            "point_metric": _shared_setting(pa, pb, "metric", point_metric),
        },
        seed=first.seed if all(v.seed == first.seed for v in (*pa.values(), *pb.values())) else None,
        device=first.device,
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# class separability


def _fisher_ratio(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Maximum over features of the multi-class Fisher discriminant ratio (Ho & Basu's F1).

    Per feature: sum_c n_c (mu_c - mu)^2 / sum_c sum_{i in c} (x_i - mu_c)^2; the largest over
    features. A feature constant within every class but not across them separates the classes on
    its own: ``inf``. Features constant everywhere (dead units) count as 0.
    """
    counts = torch.bincount(y, minlength=n_classes).to(x.dtype)
    sums = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    means = sums / counts.clamp_min(1)[:, None]
    mu = x.mean(0)
    between = (counts[:, None] * (means - mu) ** 2).sum(0)
    within = ((x - means[y]) ** 2).sum(0)
    tiny = 1e-12 * max(float((between + within).max()), 1e-300)  # rounding level of the scatter sums
    if bool(((within <= tiny) & (between > tiny)).any()):
        return float("inf")
    ratio = torch.where(within > tiny, between / within.clamp_min(tiny), torch.zeros_like(within))
    return float(ratio.max())


def _thornton_index(x: torch.Tensor, y: torch.Tensor, block: int = 2048) -> float:
    """Fraction of samples whose nearest other sample (Euclidean, ties to the lower index) shares its label."""
    p = x - x.mean(0, keepdim=True)
    n = p.shape[0]
    hits = 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = squared_distances(p, start, stop)  # exact for near-duplicates, whose order decides the nearest
        d2[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")
        hits += int((y[d2.argmin(1)] == y[start:stop]).sum())
    return hits / n


def _probe(
    x: np.ndarray, y: np.ndarray, cv: int, seed: int, fold_done: Callable[[int], None] | None = None
) -> tuple[float, float]:
    """Cross-validated linear probe: pooled accuracy and one-vs-rest macro ROC-AUC.

    Out-of-fold class probabilities as ``cross_val_predict`` gives them (every training fold holds
    every class, as ``_check_cv`` ensures), one fold at a time so that ``fold_done(i)`` can follow."""
    import warnings

    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    classes = np.unique(y)
    proba = np.empty((len(y), len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i, (train, test) in enumerate(folds.split(x, y)):
            proba[test] = clone(model).fit(x[train], y[train]).predict_proba(x[test])
            if fold_done is not None:
                fold_done(i + 1)
    accuracy = float((classes[proba.argmax(1)] == y).mean())
    auc = (
        roc_auc_score(y, proba[:, 1])
        if len(classes) == 2
        else roc_auc_score(y, proba, multi_class="ovr", labels=classes)
    )
    return accuracy, float(auc)


def _persistence_score(x: torch.Tensor, normalize: bool, func: str, name: str = "x") -> np.ndarray:
    """Normalised finite H0 persistence times (MST edge lengths / the largest), sorted decreasing; zero-length
    bars (repeated samples) are dropped as :func:`persistence` drops them, so copies do not lower the score."""
    if normalize and x.shape[1] == 1:
        raise ParameterError(
            f"{func}: '{name}' has one feature, which L2 normalisation maps to -1 or +1 (two points, no H0 structure "
            "left); pass normalize=False."
        )
    p = _points(x, normalize, func, name)
    lengths = np.sort(_mst_from_points(p))[::-1]
    lengths = lengths[lengths > 0]
    top = float(lengths[0]) if len(lengths) else 0.0
    if not top > 0:
        raise DataError(
            f"{func}: all samples of '{name}' coincide{' after L2 normalisation' if normalize else ''}, so no H0 "
            "persistence times are positive; pick another layer or pass normalize=False."
        )
    return lengths / top


def _check_cv(cv: int, y: np.ndarray, func: str) -> None:
    counts = np.bincount(y)
    if counts.min() < cv:
        raise DataError(
            f"{func}: the smallest class has {int(counts.min())} sample{'s' if int(counts.min()) != 1 else ''} but the "
            f"linear probe's cv={cv} folds need at least {cv} per class; lower cv, pass probe=False, or use more samples."
        )


def class_separability(
    x: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    normalize: bool = True,
    probe: bool = True,
    cv: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SeparabilityResult:
    """Unsupervised topological class separability (arXiv 2305.15016) with labelled references.

    The score, following the paper: optionally L2-normalise each sample (``normalize``; the paper
    found normalised embeddings give better-defined components), build the Vietoris–Rips
    filtration, keep H0 only: its finite persistence times are the edge lengths of the Euclidean
    minimum spanning tree (the infinite bar is dropped). Divide them by the largest one and take
    the mean: ``S = mean(p_i / max_j p_j)`` over the positive times (a repeated sample's zero-length bar is
    dropped, as in :func:`persistence`), in ``(0, 1]``. **Lower S means more separable**:
    clustered data have only a few large persistence times (the gaps between clusters) and many
    small ones. The paper's exact reduction to S(p) is not public in its abstract; this mean of the
    normalised times is the reduction used here, checked to fall as classes separate (synthetic
    blobs), from input to last hidden layer of the digits MLP, and over training epochs.
    Keep ``normalize=True`` unless the norms carry the structure: without it the single longest edge
    sets the scale, so one far outlier drives S towards 0, and S need not fall as classes separate
    (three overlapping Gaussian classes in 8-D: 0.51 at no separation, 0.57 at some, before it falls).

    Labelled references (with ``labels``), all on the raw (not normalised) representation and all
    **higher = more separable**: ``fisher_ratio``, the maximum over features of the multi-class
    Fisher discriminant ratio (between-class over within-class scatter; Ho & Basu's F1; ``inf`` when
    one feature alone separates the classes);
    ``thornton_index``, the fraction of samples whose nearest neighbour shares their label;
    ``probe_accuracy`` and ``probe_roc_auc``, a standardised logistic-regression probe (L2, C=1,
    lbfgs, at most 1000 iterations) scored by stratified ``cv``-fold cross-validation with folds
    drawn by ``seed`` (pooled accuracy; one-vs-rest macro ROC-AUC), skipped
    with ``probe=False`` (it is the slowest part: seconds for 512 features); and
    ``calinski_harabasz``, the Calinski–Harabasz index of the labelled classes.

    ``x``: ``(n_samples, n_features)``. ``labels``: ``(n_samples,)`` integer classes, or None for
    the score alone. ``seed``: fold assignment of the probe. ``device``: where distances run.
    ``progress(done, total)``: called after the score, after the labelled references and after each
    fold of the probe.
    """
    func = "class_separability"
    t0 = time.perf_counter()
    if not isinstance(normalize, bool):
        raise ParameterError(f"The 'normalize' parameter of {func} must be True or False. Got {normalize!r}.")
    if not isinstance(probe, bool):
        raise ParameterError(f"The 'probe' parameter of {func} must be True or False. Got {probe!r}.")
    seed = check_seed(seed, func=func)
    cv = check_int(cv, "cv", func=func, low=2, high=50)
    dev = float64_device(resolve_device(device))
    t = as_matrix(x, "x", func=func, device=dev, min_samples=3)
    check_not_constant(t, "x", func=func)
    y_idx = None if labels is None else _class_indices(labels, t.shape[0], func)
    if y_idx is not None and probe:
        _check_cv(cv, y_idx, func)
    with _single_threaded(dev):
        return _class_separability_core(
            t, y_idx, normalize, probe, cv, seed, dev, func, t0, progress or (lambda done, total: None)
        )


def _class_indices(labels: ArrayLike, n: int, func: str) -> np.ndarray:
    """Labels as class indices 0..k-1 (sorted label order), checked to describe 2..n-1 classes."""
    y = as_labels(labels, n, func=func)
    if y.dtype.kind not in "iub":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{func}: 'labels' must be integer class labels. Got dtype {y.dtype}.")
    _, y_idx = np.unique(y, return_inverse=True)
    n_classes = int(y_idx.max()) + 1
    if n_classes < 2 or n_classes >= n:
        raise DataError(
            f"{func}: 'labels' must name between 2 and n_samples - 1 classes to measure separability. Got {n_classes} "
            f"classes for {n} samples."
        )
    return y_idx.reshape(-1)


def _class_separability_core(
    t: torch.Tensor,
    y_idx: np.ndarray | None,
    normalize: bool,
    probe: bool,
    cv: int,
    seed: int,
    dev: torch.device,
    func: str,
    t0: float,
    report: Progress,
) -> SeparabilityResult:
    total = 1 if y_idx is None else 2 + (cv if probe else 0)
    t = t * unit_scale(t)  # every measure below is scale-free; a power of two keeps their squares in range
    times = _persistence_score(t, normalize, func)
    report(1, total)
    refs: dict[str, float | None] = dict.fromkeys(
        ("fisher_ratio", "thornton_index", "probe_accuracy", "probe_roc_auc", "calinski_harabasz")
    )
    n_classes = None
    if y_idx is not None:
        from sklearn.metrics import calinski_harabasz_score

        n_classes = int(y_idx.max()) + 1
        yt = torch.from_numpy(y_idx).to(dev)
        refs["fisher_ratio"] = _fisher_ratio(t, yt, n_classes)
        refs["thornton_index"] = _thornton_index(t, yt)
        xn = t.cpu().numpy()
        refs["calinski_harabasz"] = float(calinski_harabasz_score(xn, y_idx))
        report(2, total)
        if probe:
            refs["probe_accuracy"], refs["probe_roc_auc"] = _probe(
                xn, y_idx, cv, seed, lambda fold: report(2 + fold, total)
            )
    label = "H0 persistence score S = mean of MST edge lengths / the largest (arXiv 2305.15016)"
    label += ", L2-normalised samples" if normalize else ", raw samples"
    return SeparabilityResult(
        score=float(times.mean()),
        normalized_times=times,
        n_classes=n_classes,
        normalize=normalize,
        estimator=label,
        n_samples=int(t.shape[0]),
        params={"normalize": normalize, "probe": probe, "cv": cv, "labelled": y_idx is not None},
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - t0,
        **refs,
    )


def _stack_references(results: Sequence[SeparabilityResult]) -> dict[str, np.ndarray]:
    names = [k for k in results[0].references()] if results else []
    return {k: np.array([r.references()[k] for r in results], dtype=np.float64) for k in names}


def layer_separability(
    acts: Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
    labels: ArrayLike | None = None,
    normalize: bool = True,
    probe: bool = True,
    cv: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> LayerSeparabilityResult:
    """:func:`class_separability` of every layer, to see where classes separate through depth.

    ``acts``: :class:`~workbench.Activations` (or a dict layer name -> ``(n_samples, n_features)``).
    ``labels``: per-sample classes; default: ``acts.labels`` when the activations carry them.
    ``layers``: which layers, in order (default: all). A layer constant over samples has no topology:
    it is left out and recorded in ``skipped`` (an error when every layer is). Other parameters as in
    :func:`class_separability`. ``progress(done, total)`` counts layers.
    """
    func = "layer_separability"
    t0 = time.perf_counter()
    if not isinstance(acts, Mapping) or not acts:
        raise DataError(
            f"{func}: 'acts' must be Activations or a dict of layer name -> (n_samples, n_features). Got {type(acts).__name__}."
        )
    names = list(acts) if layers is None else check_layer_names(acts, layers, func=func)
    if not names:
        raise ParameterError(f"The 'layers' parameter of {func} must name at least one layer.")
    if labels is None:
        labels = getattr(acts, "labels", None)
    report = progress or (lambda done, total: None)
    per_layer: dict[str, SeparabilityResult] = {}
    skipped = []
    for i, layer in enumerate(names):
        try:
            with _naming_layer(layer, acts, func):
                per_layer[layer] = class_separability(
                    acts[layer], labels, normalize=normalize, probe=probe, cv=cv, seed=seed, device=device
                )
        except ConstantDataError:
            skipped.append(layer)
        report(i + 1, len(names))
    if not per_layer:
        raise _constant_layers_error(skipped, acts, func)
    results = list(per_layer.values())
    first = results[0]
    return LayerSeparabilityResult(
        layers=list(per_layer),
        scores=np.array([r.score for r in results]),
        references=_stack_references(results),
        per_layer=per_layer,
        model_name=str(getattr(acts, "model_name", "")),
        skipped=skipped,
        estimator=first.estimator,
        n_samples=first.n_samples,
        params=dict(first.params),
        seed=seed,
        device=first.device,
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


def plateau_index(
    values: ArrayLike, *, patience: int = 3, tolerance: float = 0.05, higher_is_better: bool = True
) -> int | None:
    """The checkpoint at which a monitored quantity stopped improving, or None.

    With ``v`` oriented so that higher is better and ``best_t = max(v_0..v_t)``, the plateau starts
    at the first checkpoint ``t`` that improved on the start (``best_t > v_0``) and after which the
    next ``patience`` checkpoints add at most ``tolerance`` times the improvement gained so far:
    ``best_{t+patience} - best_t <= tolerance * (best_t - v_0)``. The rule only looks ``patience``
    checkpoints ahead, so a run monitoring the quantity learns of the plateau at ``t + patience``.
    None when no checkpoint qualifies (still improving, or never improved).

    ``patience``: 1-50 checkpoints (larger waits out noisier curves). ``tolerance``: in [0, 1); 0.05
    stops once the next ``patience`` epochs bring less than 5% of the gain so far.
    """
    func = "plateau_index"
    patience = check_int(patience, "patience", func=func, low=1, high=50)
    tolerance = check_float(tolerance, "tolerance", func=func, low=0.0, high=0.999)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise DataError(f"{func}: 'values' contains NaN or infinite entries; pass one finite value per checkpoint.")
    if not higher_is_better:
        v = -v
    best = np.maximum.accumulate(v)
    for t in range(len(v) - patience):
        gain = best[t] - v[0]
        if gain > 0 and best[t + patience] - best[t] <= tolerance * gain:
            return t
    return None


def _checkpoint_name(item: Any, index: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).stem
    return str(getattr(item, "name", f"checkpoint {index}"))


def separability_trajectory(
    checkpoints: Sequence[Any],
    dataset: Any,
    layer: str,
    *,
    normalize: bool = True,
    labelled: bool = True,
    probe: bool = True,
    patience: int = 3,
    tolerance: float = 0.05,
    pooling: str = "mean",
    batch_size: int = 256,
    cv: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SeparabilityTrajectoryResult:
    """The persistence score of one layer across training checkpoints, as a label-free stopping rule.

    The paper's use case: track :func:`class_separability`'s score S of a layer after each epoch
    and stop training when it stops improving, without labels. ``checkpoints``: in training order,
    each a :class:`~workbench.LoadedModel`, an ``nn.Module`` or a path :func:`~workbench.load_model`
    reads; loaded and extracted one at a time. ``dataset``: a :class:`~workbench.Dataset` (its labels
    feed the references when ``labelled``). ``layer``: module name, e.g. ``"relu2"``.
    ``patience``/``tolerance``: the plateau rule of :func:`plateau_index`, applied to S (lower is
    better) and, for comparison, to each labelled reference. ``pooling``/``batch_size``: as in
    :func:`~workbench.extract`. Other parameters as in :func:`class_separability`.
    ``progress(done, total)`` counts checkpoints.
    """
    from workbench import extract, load_model
    from workbench.models.loading import LoadedModel

    func = "separability_trajectory"
    t0 = time.perf_counter()
    if isinstance(checkpoints, (str, Path)) or not isinstance(checkpoints, Sequence):
        raise ParameterError(
            f"The 'checkpoints' parameter of {func} must be a list of models or paths in training order. Got {type(checkpoints).__name__}."
        )
    if len(checkpoints) < 2:
        raise ParameterError(
            f"The 'checkpoints' parameter of {func} needs at least 2 checkpoints to follow a trajectory. Got {len(checkpoints)}."
        )
    patience = check_int(patience, "patience", func=func, low=1, high=50)
    tolerance = check_float(tolerance, "tolerance", func=func, low=0.0, high=0.999)
    if not isinstance(layer, str):
        raise ParameterError(f"The 'layer' parameter of {func} must be a layer name (str). Got {layer!r}.")
    labels = getattr(dataset, "y", None) if labelled else None
    report = progress or (lambda done, total: None)
    results, names = [], []
    for i, item in enumerate(checkpoints):
        model = load_model(item) if isinstance(item, (str, Path)) else item
        if not isinstance(model, (LoadedModel, torch.nn.Module)):
            raise ParameterError(
                f"{func}: checkpoint {i} must be a LoadedModel, an nn.Module or a path. Got {type(item).__name__}."
            )
        acts = extract(model, dataset, [layer], pooling=pooling, batch_size=batch_size, device=device)
        with _naming_layer(layer, acts, func):
            results.append(
                class_separability(
                    acts[layer], labels, normalize=normalize, probe=probe, cv=cv, seed=seed, device=device
                )
            )
        names.append(_checkpoint_name(model if not isinstance(item, (str, Path)) else item, i))
        report(i + 1, len(checkpoints))
    scores = np.array([r.score for r in results])
    refs = _stack_references(results)
    start = plateau_index(scores, patience=patience, tolerance=tolerance, higher_is_better=False)
    # a reference that is infinite at some checkpoint (the Fisher ratio of a feature constant within each class)
    # has no gain to measure a plateau against
    ref_plateaus = {k: plateau_index(v, patience=patience, tolerance=tolerance) if np.isfinite(v).all() else None
                    for k, v in refs.items()}
    return SeparabilityTrajectoryResult(
        checkpoints=names,
        layer=layer,
        scores=scores,
        references=refs,
        plateau_index=start,
        stop_index=None if start is None else start + patience,
        reference_plateaus=ref_plateaus,
        patience=patience,
        tolerance=tolerance,
        estimator=f"{results[0].estimator}; plateau rule: patience {patience}, tolerance {tolerance:g}",
        n_samples=results[0].n_samples,
        params={**results[0].params, "patience": patience, "tolerance": tolerance, "pooling": pooling},
        seed=seed,
        device=results[0].device,
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# geo-topological RSA


def _rdm_vector(t: torch.Tensor, metric: str, func: str, name: str) -> torch.Tensor:
    """Upper-triangle dissimilarities (float64) of the rows of ``t``, in units of a power of two near the
    data's largest value (the geo-topological transform only ranks them)."""
    t = t * unit_scale(t)
    if metric == "correlation":
        c = t - t.mean(1, keepdim=True)
        norms = torch.linalg.vector_norm(c, dim=1)
        if bool((norms == 0).any()):
            raise DataError(
                f"{func}: '{name}' has {int((norms == 0).sum())} sample{'s' if int((norms == 0).sum()) != 1 else ''} whose features are all equal, so their correlation "
                "distance is undefined; use metric='euclidean'."
            )
        c = c / norms[:, None]
        d = squared_distances(c).mul_(0.5)  # 1 - cos of unit vectors, exact for (near-)identical patterns
    else:
        p = _points(t, metric == "cosine", func, name)
        d = _distance_matrix(p)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1, device=d.device)
    return d[iu[0], iu[1]]


def _rgtm(v: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Rank-normalise to [0, 1], then 0 below ``lower``, 1 above ``upper``, linear in between.

    Dissimilarities equal up to rounding share their average rank (see :func:`average_ranks`)."""
    m = v.numel()
    q = (average_ranks(v) - 1.0) / max(m - 1, 1)
    return ((q - lower) / (upper - lower)).clamp_(0.0, 1.0)


def topological_rsa(
    x: ArrayLike,
    y: ArrayLike,
    *,
    lower: float = 0.2,
    upper: float = 0.8,
    metric: str = "euclidean",
    device: str | torch.device | None = None,
) -> TopologicalRSAResult:
    """Geo-topological RSA (Lin & Kriegeskorte, "The Topology and Geometry of Neural Representations").

    For each representation: the representational dissimilarity matrix (RDM) of all sample pairs,
    rank-normalised to [0, 1] (average ranks for ties), then passed through the geo-topological
    transform: 0 below the ``lower`` quantile (these pairs count as "connected", whatever their exact
    distance), 1 above the ``upper`` quantile ("disconnected"), linear in between (geometry kept).
    The two resulting RGTMs are compared by Pearson correlation over all pairs.
    ``lower=0, upper=1`` gives rank (Spearman-like) RSA; ``lower = upper - tiny`` a purely
    topological comparison of neighbourhood graphs. Invariant to rotation, translation, isotropic
    scaling and any monotone change of the dissimilarities of either representation.

    ``x``: ``(n_samples, n_features_x)``, ``y``: ``(n_samples, n_features_y)``, the same samples in the
    same order. ``metric``: ``"euclidean"``, ``"cosine"`` (between L2-normalised samples) or
    ``"correlation"`` (1 - Pearson correlation between sample patterns). ``device``: None = auto.
    Returns a :class:`TopologicalRSAResult`; similarity in [-1, 1], 1 for a representation with itself.
    """
    func = "topological_rsa"
    t0 = time.perf_counter()
    lower = check_float(lower, "lower", func=func, low=0.0, high=1.0)
    upper = check_float(upper, "upper", func=func, low=0.0, high=1.0)
    if not upper > lower:
        raise ParameterError(
            f"The 'upper' parameter of {func} must be greater than 'lower' ({lower:g}). Got {upper!r}."
        )
    metric = check_choice(metric, "metric", RSA_METRICS, func=func)
    dev = float64_device(resolve_device(device))
    tx = as_matrix(x, "x", func=func, device=dev, min_samples=3)
    ty = as_matrix(y, "y", func=func, device=dev, min_samples=3)
    check_paired(tx, ty, func=func)
    check_not_constant(tx, "x", func=func)
    check_not_constant(ty, "y", func=func)
    with _single_threaded(dev):
        gx = _rgtm(_rdm_vector(tx, metric, func, "x"), lower, upper)
        gy = _rgtm(_rdm_vector(ty, metric, func, "y"), lower, upper)
    cx, cy = gx - gx.mean(), gy - gy.mean()
    nx, ny = float(torch.linalg.vector_norm(cx)), float(torch.linalg.vector_norm(cy))
    for norm, name in ((nx, "x"), (ny, "y")):
        if norm == 0.0:
            raise DataError(
                f"{func}: the geo-topological matrix of '{name}' is constant (all sample pairs tie), so the correlation is "
                "undefined; widen the band between 'lower' and 'upper' or check the representation."
            )
    sim = float((cx * cy).sum()) / (nx * ny)
    n = int(tx.shape[0])
    keep = n <= STORED_RDM_MAX_SAMPLES

    def square(g: torch.Tensor) -> np.ndarray:
        out = torch.zeros(n, n, dtype=torch.float32)
        iu = torch.triu_indices(n, n, offset=1)
        out[iu[0], iu[1]] = g.cpu().float()
        return (out + out.T).numpy()

    return TopologicalRSAResult(
        similarity=max(-1.0, min(1.0, sim)),
        rgtm_x=square(gx) if keep else None,
        rgtm_y=square(gy) if keep else None,
        lower=lower,
        upper=upper,
        metric=metric,
        estimator=f"geo-topological RSA: rank-normalised {metric} RDMs, transform [{lower:g}, {upper:g}], Pearson r",
        n_samples=n,
        params={"lower": lower, "upper": upper, "metric": metric},
        seed=None,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - t0,
    )


__all__ = [
    "DiagramDistanceMatrixResult",
    "DiagramDistanceResult",
    "LayerSeparabilityResult",
    "PersistenceResult",
    "SeparabilityResult",
    "SeparabilityTrajectoryResult",
    "TopologicalRSAResult",
    "class_separability",
    "diagram_distance",
    "diagram_distance_matrix",
    "layer_separability",
    "persistence",
    "persistence_distance",
    "plateau_index",
    "separability_trajectory",
    "topological_rsa",
]
