"""Exact k-nearest-neighbour graphs, computed once per (data, metric) and shared.

UMAP (its fuzzy graph), t-SNE, trustworthiness, kNN preservation and the intrinsic-dimension
estimators all start from the same graph, so :func:`knn_graph` caches it in memory keyed by the
sha256 of the array's content, the metric and ``k``; a later request for the same data with a
smaller ``k`` is answered by slicing the cached graph.

The graph is exact. Candidates come from one float32 matrix product per block of rows
(``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``), ``k + margin`` per row; their distances are then
recomputed from the differences (of the input's values in its precision, summed in float64; for
``metric="cosine"`` of the float64 unit rows) and re-sorted. A row
whose float32 candidate list might have missed a true neighbour (its rounding-error bound overlaps
the margin) is recomputed against every sample, so the result equals a brute-force search at the
input's precision, up to ties (broken by the lower index).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import as_matrix, check_choice, check_int, unit_scale
from workbench.device import float64_device, resolve_device
from workbench.errors import DataError

METRICS = ("euclidean", "cosine")
CACHE_ENTRIES = 16
_BLOCK_BYTES = 1 << 27  # distance block of at most 128 MiB
_FLOAT32_EPS = float(np.finfo(np.float32).eps)

_cache: OrderedDict[tuple[str, str], KnnGraph] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class KnnGraph(RecordedResult):
    """The ``k`` nearest neighbours of every sample, the sample itself excluded.

    ``indices``: ``(n_samples, k)`` int64, nearest first (ties broken by the lower index).
    ``distances``: ``(n_samples, k)`` float64, non-decreasing along each row; Euclidean distance,
    or cosine distance ``1 - cos`` in ``[0, 2]`` for ``metric="cosine"``.
    ``sha256``: hash of the data the graph was built from (the cache key).

    The graph is shared through the cache, so ``indices`` and ``distances`` are read-only (an edit
    raises ``ValueError``); copy them (``graph.indices.copy()``) to change them.
    """

    indices: np.ndarray
    distances: np.ndarray
    metric: str
    k: int
    sha256: str

    def with_self(self, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, distances)`` with each sample prepended as its own neighbour at distance 0.

        This is the layout umap-learn's ``fuzzy_simplicial_set`` expects for ``n_neighbors = k + 1``.
        ``k`` (default: all) keeps the first ``k`` true neighbours.
        """
        k = self.k if k is None else k
        own = np.arange(self.n_samples, dtype=np.int64)[:, None]
        idx = np.concatenate([own, self.indices[:, :k]], axis=1)
        dist = np.concatenate([np.zeros((self.n_samples, 1)), self.distances[:, :k]], axis=1)
        return idx, dist

    def truncate(self, k: int) -> KnnGraph:
        """The same graph keeping only the ``k`` nearest neighbours of each sample."""
        if k == self.k:
            return self
        return KnnGraph(
            indices=_read_only(self.indices[:, :k]),
            distances=_read_only(self.distances[:, :k]),
            metric=self.metric,
            k=k,
            sha256=self.sha256,
            estimator=self.estimator,
            n_samples=self.n_samples,
            params={**self.params, "k": k},
            seed=None,
            device=self.device,
            dtype=self.dtype,
            seconds=self.seconds,
        )


def data_hash(x: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of ``x`` (the key of the kNN cache)."""
    arr = x.detach().cpu().contiguous().numpy()
    h = hashlib.sha256(f"{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def clear_knn_cache() -> None:
    """Forget every cached kNN graph."""
    with _cache_lock:
        _cache.clear()


def _check_cosine_rows(t: torch.Tensor, metric: str, *, func: str, name: str = "x") -> None:
    """Refuse all-zero rows of ``t`` under the cosine metric, whose direction is undefined."""
    if metric != "cosine":
        return
    n_zero = int((t == 0).all(dim=1).sum())
    if n_zero:
        raise DataError(
            f"{func}: the cosine distance is undefined for all-zero rows and '{name}' has {n_zero}; "
            "use metric='euclidean' or drop those samples."
        )


def knn_graph(
    x: Any,
    k: int = 15,
    *,
    metric: str = "euclidean",
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KnnGraph:
    """Exact ``k`` nearest neighbours of every row of ``x`` (itself excluded), cached by content.

    Parameters
    ----------
    x : (n_samples, n_features) array
        Samples in rows. Not modified.
    k : int
        Neighbours per sample, in ``[1, n_samples - 1]``. UMAP uses ``n_neighbors - 1``,
        trustworthiness 10, the MLE intrinsic dimension 20.
    metric : "euclidean" or "cosine"
        Euclidean distance, or cosine distance ``1 - cos(a, b)`` (rows must be non-zero).
    device : str, torch.device or None
        Where the matrix products run; ``None`` picks cuda, then mps, then cpu.
    progress : callable (done, total) or None
        Called after each block of rows.

    Returns
    -------
    KnnGraph with ``indices`` and ``distances`` of shape ``(n_samples, k)``. The data are multiplied by a power of
    two that brings them near 1 before the search (exact), so the neighbours are the same at any scale and the
    distances scale with the data; a distance beyond the float64 range raises a DataError.
    """
    func = "knn_graph"
    metric = check_choice(metric, "metric", METRICS, func=func)
    t = as_matrix(x, "x", func=func, dtype=torch.float32 if _is_float32(x) else torch.float64, min_samples=2)
    n = t.shape[0]
    k = check_int(k, "k", func=func, low=1, high=n - 1)
    _check_cosine_rows(t, metric, func=func)
    key = (data_hash(t), metric)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached.k >= k:
            _cache.move_to_end(key)
            if progress is not None:
                progress(1, 1)
            return cached.truncate(k)
    dev = resolve_device(device)
    start = time.perf_counter()
    indices, distances = _exact_knn(t, k, metric, dev, progress)
    if not np.isfinite(distances).all():
        raise DataError(
            f"{func}: some nearest-neighbour distances exceed the float64 range (about 1.8e308), so they cannot be "
            "returned; rescale the data first (for example divide it by its largest absolute value)."
        )
    graph = KnnGraph(
        indices=_read_only(indices),
        distances=_read_only(distances),
        metric=metric,
        k=k,
        sha256=key[0],
        estimator=f"exact kNN ({metric}), float32 GEMM candidates re-ranked from differences",
        n_samples=n,
        params={"k": k, "metric": metric},
        seed=None,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )
    with _cache_lock:
        _cache[key] = graph
        _cache.move_to_end(key)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return graph


def _read_only(a: np.ndarray) -> np.ndarray:
    """``a`` marked read-only: cached graphs are handed to every caller, so one caller's edit would
    change every later result computed from the same data."""
    a.setflags(write=False)
    return a


def _is_float32(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return getattr(x, "dtype", None) in (np.float32, np.float16)


def _exact_knn(
    t: torch.Tensor, k: int, metric: str, dev: torch.device, progress: Callable[[int, int], None] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Core of :func:`knn_graph`; ``t`` is a validated CPU matrix (float32 or float64)."""
    n = t.shape[0]
    x64 = t.to(device=float64_device(dev), dtype=torch.float64)
    scale = 1.0
    if metric == "cosine":
        x64 = x64 / x64.abs().amax(dim=1, keepdim=True)  # no zero rows (knn_graph checked); scaled first, so
        x64 = x64 / x64.norm(dim=1, keepdim=True)  # that the norms of tiny rows do not underflow to zero
    else:
        # Multiplying by a power of two is exact (float32 values stay float32 values) and ranks neighbours
        # alike; it brings the largest |value| near 1, so the float32 squares and products below neither
        # overflow (data beyond about 1e18) nor underflow (below about 1e-19), and the distances are
        # divided by it at the end. Distances do not change under translation; centring (after scaling,
        # so that the sum cannot overflow) shrinks the norms, and with them the float32 rounding error
        # of the expansion.
        scale = unit_scale(x64)
        x64 = x64 * scale
        x64 = x64 - x64.mean(0, keepdim=True)
    # Exact distances are taken from the input's values (float32 or float64), accumulated in float64,
    # on a device with float64 support; the matrix products run on ``dev`` in float32. Euclidean
    # differences of centred rows are taken in the input's precision. Cosine rows stay in float64:
    # rounding the unit rows to float32 would move nearly parallel rows by about their own distance.
    work = x64 if metric == "cosine" else x64.to(dtype=t.dtype)
    x32 = work.to(device=dev, dtype=torch.float32)
    sq32 = (x32 * x32).sum(1)
    n_cand = min(n - 1, k + max(4, k // 4))
    block = max(1, min(n, _BLOCK_BYTES // (4 * n)))
    out_idx = torch.empty((n, k), dtype=torch.int64)
    out_dist = torch.empty((n, k), dtype=torch.float64)
    n_blocks = (n + block - 1) // block
    # Rounding bound of the float32 expansion |a|^2 + |b|^2 - 2 a.b (a few ulps of its largest term,
    # grown with the square root of the dot product's length).
    bound_all = (8.0 * _FLOAT32_EPS * (x32.shape[1] ** 0.5)) * (sq32.max() + sq32).to(work.device, torch.float64)
    if metric == "cosine":
        # The float32 copies of the unit rows are each within eps/2 of the float64 rows, which moves a
        # squared distance (at most 4) by at most 2 * 2 * eps + eps^2.
        bound_all = bound_all + 5.0 * _FLOAT32_EPS
    x64g: torch.Tensor | None = None
    for b, lo in enumerate(range(0, n, block)):
        hi = min(n, lo + block)
        rows = torch.arange(lo, hi, device=work.device)
        cand, exact, last = _neighbours(work, x32, sq32, rows, n_cand)
        # A neighbour outside the candidates has an approximate squared distance of at least the
        # last candidate's, so its exact one is at least that minus the rounding bound. Rows where
        # that does not rule out a missed neighbour (distances concentrated within the bound) are
        # searched again with float64 products, whose rounding is far below any distance gap.
        unsafe = exact[:, k - 1] > last - bound_all[lo:hi]
        if n_cand < n - 1 and bool(unsafe.any()):
            if x64g is None:
                x64g = x64.to(float64_device(dev))
            redo = torch.nonzero(unsafe).flatten()
            step = max(1, _BLOCK_BYTES // (8 * n))
            for a in range(0, redo.numel(), step):
                sel = redo[a : a + step]
                cand[sel], exact[sel], _ = _neighbours(work, x64g, (x64g * x64g).sum(1), rows[sel], n_cand)
        out_idx[lo:hi] = cand[:, :k].cpu()
        out_dist[lo:hi] = exact[:, :k].clamp_min(0.0).cpu()
        if progress is not None:
            progress(b + 1, n_blocks)
    if metric == "euclidean":
        out_dist = out_dist.sqrt_().div_(scale)
    else:
        out_dist = out_dist / 2.0  # |a - b|^2 = 2 - 2 cos for unit rows
    return out_idx.numpy(), out_dist.numpy()


def _neighbours(
    work: torch.Tensor, xg: torch.Tensor, sqg: torch.Tensor, rows: torch.Tensor, n_cand: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of ``rows`` from the products of ``xg`` (float32 or float64), re-ranked from differences.

    Returns candidate indices ``(r, n_cand)`` sorted by (exact squared distance, index), their exact
    squared distances, and the approximate squared distance of the last candidate ``(r,)``.
    """
    r = rows.to(xg.device)
    # |b|^2 - 2 a.b orders each row like the squared distance (|a|^2 is constant along a row).
    part = torch.addmm(sqg[None, :], xg[r], xg.T, beta=1.0, alpha=-2.0)
    part[torch.arange(r.numel(), device=xg.device), r] = float("inf")
    approx, cand = torch.topk(part, n_cand, dim=1, largest=False, sorted=True)
    last = (approx[:, -1] + sqg[r]).to(work.device, torch.float64)
    cand = cand.to(work.device)
    exact = _candidate_distances(work, rows, cand)
    cand, order = cand.sort(dim=1)
    exact = exact.gather(1, order)
    exact, order = exact.sort(dim=1, stable=True)
    return cand.gather(1, order), exact, last


def _candidate_distances(work: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared distances (as float64) from ``rows`` to their candidates, from the differences."""
    n_rows, n_cand = cand.shape
    step = max(1, _BLOCK_BYTES // (work.element_size() * n_cand * work.shape[1]))
    out = torch.empty((n_rows, n_cand), dtype=torch.float64, device=work.device)
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        diff = work[cand[a:b]] - work[rows[a:b], None, :]
        out[a:b] = (diff * diff).sum(-1, dtype=torch.float64)
    return out
