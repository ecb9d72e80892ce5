"""Relative representations (Moschella et al., ICLR 2023) and zero-shot model stitching.

A sample's *relative representation* is the vector of its cosine similarities to a fixed set of anchor
samples, computed within one model's latent space. Two models trained from different seeds usually
differ by (nearly) an angle-preserving map of their latent spaces; cosines to the same anchor samples
are unchanged by such a map, so the relative representations of the two models live in one shared,
comparable space even when their absolute coordinates do not.

* :func:`select_anchors` picks anchor samples (random, farthest-point or k-means medoids).
* :func:`relative_representation` maps ``(n_samples, n_features)`` to ``(n_samples, n_anchors)``.
* :func:`cross_model_agreement` measures how interchangeable two spaces are (Jaccard@k of retrieved
  neighbours, MRR of the matching sample, cosine), for relative and absolute coordinates, over the
  samples that are not anchors (an anchor's cosine of 1 to itself would retrieve it in any space).
* :func:`relative_comparison` and :func:`relative_agreement_by_layer` bundle these for one layer pair
  or for every layer of two models.
* :func:`stitch` trains a classification head on one model's relative space and applies it, unchanged,
  to another model's relative representations (zero-shot stitching).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.activations.types import Activations
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    ArrayLike,
    as_labels,
    as_matrix,
    check_bool,
    check_choice,
    check_int,
    check_paired,
    check_same_dataset,
    check_seed,
)
from workbench.device import float64_device, resolve_device
from workbench.errors import DataError, ParameterError, UnknownLayerError, did_you_mean, format_choices

ANCHOR_METHODS = ("random", "fps", "kmeans")
HEADS = ("linear", "mlp")
_BLOCK = 1024  # rows of the n x n similarity matrices held at once
_KMEANS_ITERATIONS = 100
_HEAD_LR = 0.03

Progress = Callable[[int, int], Any]


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RelativeAgreementResult(RecordedResult):
    """How well space A can stand in for space B, for relative and (optionally) absolute coordinates.

    ``samples``: the indices of the scored samples, every sample that is not an anchor; they are the
    queries and the retrieval candidates, for relative and absolute coordinates alike, and
    ``n_samples`` counts them. Per-sample arrays have shape ``(n_samples,)``, in the order of
    ``samples``: ``jaccard`` (Jaccard@k of the neighbours retrieved in B by ``a_i`` and by ``b_i``),
    ``reciprocal_rank`` (1 / rank of ``b_i`` among the scored samples of B when queried with ``a_i``),
    ``cosine`` (between ``a_i`` and ``b_i``). ``mean_jaccard``, ``mrr``, ``mean_cosine`` average them.
    The ``absolute_*`` fields hold the same for the absolute representations, or None when they were
    not given or their widths differ (``absolute_comparable`` False). ``classes`` / ``class_jaccard`` /
    ``absolute_class_jaccard`` give the mean Jaccard per class of the scored samples when labels were
    given.
    """

    k: int
    samples: np.ndarray
    jaccard: np.ndarray
    reciprocal_rank: np.ndarray
    cosine: np.ndarray
    mean_jaccard: float
    mrr: float
    mean_cosine: float
    absolute_comparable: bool
    absolute_jaccard: np.ndarray | None
    absolute_reciprocal_rank: np.ndarray | None
    absolute_cosine: np.ndarray | None
    absolute_mean_jaccard: float | None
    absolute_mrr: float | None
    absolute_mean_cosine: float | None
    classes: np.ndarray | None
    class_jaccard: np.ndarray | None
    absolute_class_jaccard: np.ndarray | None


@dataclass(frozen=True)
class RelativeComparisonResult(RecordedResult):
    """Relative representations of one layer of model A and one of model B, and their agreement.

    ``anchors``: ``(n_anchors,)`` sample indices, chosen in A's space and used in both.
    ``relative_a`` / ``relative_b``: ``(n_total, n_anchors)`` cosines of every sample, anchors included,
    to the anchors. ``labels``: ``(n_total,)`` class labels or None. ``agreement``: the
    :class:`RelativeAgreementResult` over the ``n_samples = n_total - n_anchors`` samples that are not
    anchors.
    """

    anchors: np.ndarray
    relative_a: np.ndarray
    relative_b: np.ndarray
    labels: np.ndarray | None
    agreement: RelativeAgreementResult


@dataclass(frozen=True)
class RelativeLayerAgreementResult(RecordedResult):
    """Cross-model agreement for each compared layer pair ``(layers_a[i], layers_b[i])``.

    Arrays have shape ``(n_pairs,)``. ``jaccard`` / ``mrr`` / ``cosine`` are for relative
    representations; ``absolute_*`` for the raw activations, NaN where the two widths differ (flagged by
    ``absolute_comparable``), since absolute coordinates of different widths cannot be compared. Both
    are scored over the same ``n_samples`` samples of each layer pair, those that are not its anchors.
    """

    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    jaccard: np.ndarray
    mrr: np.ndarray
    cosine: np.ndarray
    absolute_jaccard: np.ndarray
    absolute_mrr: np.ndarray
    absolute_cosine: np.ndarray
    absolute_comparable: np.ndarray
    k: int
    n_anchors: int
    model_a: str
    model_b: str


@dataclass(frozen=True)
class StitchingResult(RecordedResult):
    """Accuracy of classification heads applied to their own and to the other model's representations.

    ``relative_accuracy[e, h]``: test accuracy of the head trained on model ``h``'s relative space
    (0 = A, 1 = B) applied to model ``e``'s relative representations; the off-diagonal entries are the
    zero-shot stitched accuracies. ``absolute_accuracy``: the same with heads on the raw activations
    (None when the widths differ). ``own_accuracy``: each model's own output layer, shape ``(2,)``
    (None when no logits were given). ``chance_accuracy``: frequency of the most common test class.
    ``anchors``: indices of the anchor samples within the training samples; ``n_train``: the training
    samples the heads learned from (the others, or all when every training sample is an anchor).
    """

    relative_accuracy: np.ndarray
    absolute_accuracy: np.ndarray | None
    own_accuracy: np.ndarray | None
    chance_accuracy: float
    anchors: np.ndarray
    n_train: int
    head: str


# ---------------------------------------------------------------------------------------------
# anchors and relative coordinates


def _compute_device(device: str | torch.device | None) -> torch.device:
    return float64_device(resolve_device(device))



def _select_anchors(x: torch.Tensor, n_anchors: int, method: str, seed: int) -> torch.Tensor:
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return torch.randperm(n, generator=generator)[:n_anchors].to(x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    if method == "fps":
        chosen = torch.empty(n_anchors, dtype=torch.long, device=x.device)
        chosen[0] = first
        nearest = torch.linalg.vector_norm(x - x[first], dim=1)
        nearest[first] = -1.0  # a chosen sample is never chosen again, also where duplicate rows leave ties at 0
        for i in range(1, n_anchors):
            nxt = int(torch.argmax(nearest))
            chosen[i] = nxt
            nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[nxt], dim=1))
            nearest[chosen[: i + 1]] = -1.0
        return chosen
    # k-means (k-means++ initialisation, Lloyd iterations), then the sample nearest each centroid
    centroids = x[first : first + 1].clone()
    nearest_sq = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, n_anchors):
        total = float(nearest_sq.sum())
        if total > 0:
            probs = (nearest_sq / total).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        else:
            nxt = int(torch.randint(n, (1,), generator=generator))
        centroids = torch.cat([centroids, x[nxt : nxt + 1]])
        nearest_sq = torch.minimum(nearest_sq, ((x - x[nxt]) ** 2).sum(1))
    assignment = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(_KMEANS_ITERATIONS):
        new_assignment = torch.cdist(x, centroids).argmin(1)
        if bool((new_assignment == assignment).all()):
            break
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=n_anchors).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    distances = torch.cdist(centroids, x)
    chosen = torch.empty(n_anchors, dtype=torch.long, device=x.device)
    for j in range(n_anchors):  # one distinct medoid per centroid
        idx = int(torch.argmin(distances[j]))
        chosen[j] = idx
        distances[:, idx] = math.inf
    return chosen


def select_anchors(
    x: ArrayLike,
    n_anchors: int,
    *,
    method: str = "random",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Choose ``n_anchors`` distinct samples of ``x`` to serve as anchors.

    * ``"random"``: uniformly at random (as in Moschella et al.); depends only on ``n_samples`` and
      ``seed``, so every layer and model gets the same anchors.
    * ``"fps"``: farthest-point sampling in Euclidean distance from a random first sample; spreads the
      anchors over the data, including outliers.
    * ``"kmeans"``: k-means with ``n_anchors`` clusters (k-means++ start, up to 100 Lloyd iterations),
      then the sample nearest each centroid; anchors follow the density of the data.

    Args:
        x: ``(n_samples, n_features)`` representation used to place the anchors (ignored by ``"random"``
            apart from its length).
        n_anchors: number of anchors, in [1, n_samples]. Tens to a few hundred; more anchors give a
            richer but wider relative space.
        method: ``"random"``, ``"fps"`` or ``"kmeans"``.
        seed: seed of the random choices; recorded by the functions that call this one.
        device: where to compute (``None``: cuda > mps > cpu).

    Returns:
        ``(n_anchors,)`` int64 numpy array of sample indices, distinct, in the order chosen.
    """
    func = "select_anchors"
    method = check_choice(method, "method", ANCHOR_METHODS, func=func)
    seed = check_seed(seed, func=func)
    xt = as_matrix(x, "x", func=func, device=_compute_device(device), min_samples=1)
    n_anchors = check_int(n_anchors, "n_anchors", func=func, low=1, high=int(xt.shape[0]))
    return _select_anchors(xt, n_anchors, method, seed).cpu().numpy().astype(np.int64)


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; all-zero rows stay zero (their cosine with anything is defined as 0)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _relative(x: torch.Tensor, anchors: torch.Tensor, center: bool, func: str) -> torch.Tensor:
    if center:
        mean = anchors.mean(0, keepdim=True)
        x = x - mean
        anchors = anchors - mean
    zero = torch.linalg.vector_norm(anchors, dim=1) == 0
    if bool(zero.any()):
        which = torch.nonzero(zero).flatten()[:5].tolist()
        raise DataError(
            f"{func}: {int(zero.sum())} anchors (positions {which}) have an all-zero {'centred ' if center else ''}embedding, "
            "so cosines to them are undefined; choose other anchors (another seed or method)."
        )
    return _normalise_rows(x) @ _normalise_rows(anchors).T


def _anchor_matrix(x: torch.Tensor, anchors: ArrayLike, func: str) -> torch.Tensor:
    """Anchor embeddings from indices into ``x`` (1-D integers) or given as ``(n_anchors, n_features)``."""
    arr = anchors.detach().cpu().numpy() if isinstance(anchors, torch.Tensor) else np.asarray(anchors)
    if arr.ndim == 1:
        if not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
            raise ParameterError(
                f"The 'anchors' parameter of {func} must be a non-empty 1-D array of integer sample indices or a "
                f"2-D array (n_anchors, n_features) of anchor embeddings. Got a 1-D array of dtype {arr.dtype} and size {arr.size}."
            )
        n = x.shape[0]
        if int(arr.min()) < 0 or int(arr.max()) >= n:
            raise ParameterError(
                f"The 'anchors' indices of {func} must lie in [0, {n - 1}] (x has {n} samples). "
                f"Got values from {int(arr.min())} to {int(arr.max())}."
            )
        return x[torch.as_tensor(arr, dtype=torch.long, device=x.device)]
    a = as_matrix(arr, "anchors", func=func, device=x.device, min_samples=1)
    if a.shape[1] != x.shape[1]:
        raise DataError(
            f"{func}: 'anchors' has {a.shape[1]} features but 'x' has {x.shape[1]}; anchor embeddings must come from "
            "the same layer as x."
        )
    return a


def relative_representation(
    x: ArrayLike,
    anchors: ArrayLike,
    *,
    center: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Cosine similarity of every sample to every anchor (Moschella et al. 2023).

    ``r(x_i)_j = <x_i, a_j> / (||x_i|| ||a_j||)``, in [-1, 1]. Unchanged by any rotation, reflection or
    isotropic scaling of the latent space. With ``center=True`` the mean of the anchors' embeddings is
    subtracted from samples and anchors first (the centring option of the reference implementation),
    which also removes translations and spreads out the cosines of non-negative (ReLU) activations.

    A sample whose (centred) embedding is all zeros has no direction: its relative vector is defined as
    all zeros. An all-zero anchor raises DataError.

    Args:
        x: ``(n_samples, n_features)`` activations of one layer.
        anchors: 1-D integer indices into ``x`` (e.g. from :func:`select_anchors`), or the anchors'
            embeddings ``(n_anchors, n_features)`` from the same layer.
        center: subtract the anchors' mean before taking cosines.
        device: where to compute (``None``: cuda > mps > cpu); float64.

    Returns:
        ``(n_samples, n_anchors)`` float64 numpy array.
    """
    func = "relative_representation"
    center = check_bool(center, "center", func=func)
    xt = as_matrix(x, "x", func=func, device=_compute_device(device), min_samples=1)
    return _relative(xt, _anchor_matrix(xt, anchors, func), center, func).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# agreement between two spaces


def _retrieval(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample Jaccard@k, reciprocal rank and cosine of A queried against B (cosine similarity). Rows tied
    with a sample's own row share the middle rank (an all-zero row, tied with every row, ranks like a random guess)."""
    an, bn = _normalise_rows(a), _normalise_rows(b)
    n = a.shape[0]
    jaccard = torch.empty(n, dtype=a.dtype, device=a.device)
    reciprocal = torch.empty(n, dtype=a.dtype, device=a.device)
    for s in range(0, n, _BLOCK):
        e = min(n, s + _BLOCK)
        s_ab = an[s:e] @ bn.T
        s_bb = bn[s:e] @ bn.T
        top_ab = s_ab.topk(k, dim=1).indices
        top_bb = s_bb.topk(k, dim=1).indices
        inter = (top_ab[:, :, None] == top_bb[:, None, :]).sum((1, 2)).to(a.dtype)
        jaccard[s:e] = inter / (2 * k - inter)
        own = s_ab[torch.arange(e - s, device=a.device), torch.arange(s, e, device=a.device)]
        above = (s_ab > own[:, None]).sum(1).to(a.dtype)
        tied = (s_ab == own[:, None]).sum(1).to(a.dtype) - 1.0  # other rows exactly as close as the sample's own
        reciprocal[s:e] = 1.0 / (1.0 + above + tied / 2.0)  # a tie takes the middle rank, not the best
    cosine = (an * bn).sum(1)
    return jaccard, reciprocal, cosine


def _class_means(values: torch.Tensor, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    v = values.cpu().numpy()
    return np.array([v[labels == c].mean() for c in classes])


def _non_anchors(n: int, anchors: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices of the samples that are not anchors, in order: the queries and retrieval candidates of the
    agreement scores (anchor ``j`` has cosine 1 in column ``j`` of the relative representation in every
    space, so as a query it would retrieve itself whether or not the two spaces agree)."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[anchors] = False
    return torch.nonzero(keep).flatten()


def _check_n_anchors(n_anchors: Any, n: int, func: str) -> int:
    """``n_anchors`` in [1, n - 2]: the agreement scores need 2 samples that are not anchors."""
    if n < 3:
        raise DataError(
            f"{func}: the activations have {n} samples, but the agreement scores need at least 3 (an anchor and 2 other "
            "samples, which are scored); use more samples."
        )
    return check_int(n_anchors, "n_anchors", func=func, low=1, high=n - 2,
                     why=f" for {n} samples, since anchors are left out of the agreement scores and 2 other samples must "
                     "remain; choose fewer anchors")


def _check_k(k: Any, n_scored: int, n_anchors: int, func: str) -> int:
    """``k`` in [1, n_scored - 1]: each scored sample retrieves k of the other scored samples."""
    why = (f", since the {n_scored} samples that are not among the {n_anchors} anchors each retrieve k of the others; "
           "lower k or n_anchors") if n_anchors else ""
    return check_int(k, "k", func=func, low=1, high=n_scored - 1, why=why)


def _anchor_indices(anchors: ArrayLike, n: int, func: str, device: torch.device) -> torch.Tensor:
    """Distinct anchor indices in [0, n - 1] from a 1-D integer array."""
    arr = anchors.detach().cpu().numpy() if isinstance(anchors, torch.Tensor) else np.asarray(anchors)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ParameterError(
            f"The 'anchors' parameter of {func} must be a 1-D array of the integer indices of the samples that are anchors "
            f"(e.g. from select_anchors). Got an array of shape {arr.shape} and dtype {arr.dtype}."
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
        raise ParameterError(
            f"The 'anchors' indices of {func} must lie in [0, {n - 1}] (rel_a has {n} samples). "
            f"Got values from {int(arr.min())} to {int(arr.max())}."
        )
    return torch.as_tensor(np.unique(arr.astype(np.int64)), dtype=torch.long, device=device)


def _agreement(
    ra: torch.Tensor,
    rb: torch.Tensor,
    k: int,
    aa: torch.Tensor | None,
    ab: torch.Tensor | None,
    labels: np.ndarray | None,
    scored: torch.Tensor,
    params: dict[str, Any],
    seed: int | None,
    dev: torch.device,
    start: float,
) -> RelativeAgreementResult:
    """Agreement over the rows ``scored`` (the samples that are not anchors), relative and absolute alike."""
    n_anchors = int(ra.shape[0]) - int(scored.shape[0])
    ra, rb = ra[scored], rb[scored]
    jac, rr, cos = _retrieval(ra, rb, k)
    a_jac = a_rr = a_cos = None
    comparable = False
    if aa is not None and ab is not None and aa.shape[1] == ab.shape[1]:
        comparable = True
        a_jac, a_rr, a_cos = _retrieval(aa[scored], ab[scored], k)
    samples = scored.cpu().numpy().astype(np.int64)
    classes = class_j = abs_class_j = None
    if labels is not None:
        labels = labels[samples]
        classes = np.unique(labels)
        class_j = _class_means(jac, labels, classes)
        abs_class_j = _class_means(a_jac, labels, classes) if a_jac is not None else None

    def np_or_none(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.cpu().numpy()

    def mean_or_none(t: torch.Tensor | None) -> float | None:
        return None if t is None else float(t.mean())

    among = f" among the {samples.size} samples that are not anchors ({n_anchors} left out)" if n_anchors else ""
    return RelativeAgreementResult(
        k=k,
        samples=samples,
        jaccard=jac.cpu().numpy(),
        reciprocal_rank=rr.cpu().numpy(),
        cosine=cos.cpu().numpy(),
        mean_jaccard=float(jac.mean()),
        mrr=float(rr.mean()),
        mean_cosine=float(cos.mean()),
        absolute_comparable=comparable,
        absolute_jaccard=np_or_none(a_jac),
        absolute_reciprocal_rank=np_or_none(a_rr),
        absolute_cosine=np_or_none(a_cos),
        absolute_mean_jaccard=mean_or_none(a_jac),
        absolute_mrr=mean_or_none(a_rr),
        absolute_mean_cosine=mean_or_none(a_cos),
        classes=classes,
        class_jaccard=class_j,
        absolute_class_jaccard=abs_class_j,
        estimator=f"cross-space retrieval by cosine (Moschella et al. 2023){among}: Jaccard@{k}, MRR, mean cosine",
        n_samples=int(samples.size),
        params=params,
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def cross_model_agreement(
    rel_a: ArrayLike,
    rel_b: ArrayLike,
    *,
    k: int = 10,
    anchors: ArrayLike | None = None,
    absolute_a: ArrayLike | None = None,
    absolute_b: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    device: str | torch.device | None = None,
) -> RelativeAgreementResult:
    """How interchangeable two representations of the same samples are, as retrieval across spaces.

    Following Moschella et al. (2023, Table 1), sample ``i`` of space A is used as a query into space B
    (cosine similarity against every scored ``b_j``):

    * Jaccard@k: overlap (intersection over union) of the top-k samples retrieved by ``a_i`` and the
      top-k retrieved by ``b_i`` itself (both lists include the query's own sample). In [0, 1].
    * MRR: mean of ``1 / rank`` of ``b_i`` among the scored samples of B when queried with ``a_i``
      (rank 1 = best; ``1 + #{j: cos(a_i, b_j) > cos(a_i, b_i)} + #{j != i: cos(a_i, b_j) = cos(a_i, b_i)} / 2``, exact ties counted half; not truncated at k). In (0, 1].
    * mean cosine between ``a_i`` and ``b_i``. In [-1, 1].

    The samples given in ``anchors`` are left out, as queries and as candidates: anchor ``j`` has cosine
    1 in column ``j`` of the relative representation in every space, so it would retrieve itself even
    between unrelated models. The scored samples are the others; with ``m`` of them and unrelated
    spaces the MRR is about ``H_m / m`` (``H_m`` the m-th harmonic number) and Jaccard@k about
    ``k / (2m - k)``.

    All three need A and B in the same coordinates: relative representations over the same anchors
    are; absolute activations of two independently trained models are not, which is the point of the
    comparison. Pass ``absolute_a`` / ``absolute_b`` to get the same numbers for the raw activations,
    over the same scored samples, when their widths match (else the ``absolute_*`` fields are None).

    Args:
        rel_a: ``(n_samples, n_anchors)`` relative representation in model A.
        rel_b: ``(n_samples, n_anchors)`` relative representation in model B over the same anchors.
        k: neighbourhood size for Jaccard@k, in [1, m - 1] for the ``m`` samples that are not anchors;
            10 as in the paper.
        anchors: indices of the rows that are anchors (e.g. those given to
            :func:`relative_representation`), left out of the scores; None when the anchors are not
            among these samples (e.g. training samples while these are test samples).
        absolute_a: optional ``(n_samples, n_features_a)`` activations of A.
        absolute_b: optional ``(n_samples, n_features_b)`` activations of B.
        labels: optional ``(n_samples,)`` class labels, for the mean Jaccard per class.
        device: where to compute (``None``: cuda > mps > cpu); float64.

    Returns:
        A :class:`RelativeAgreementResult`.
    """
    func = "cross_model_agreement"
    start = time.perf_counter()
    dev = _compute_device(device)
    ra = as_matrix(rel_a, "rel_a", func=func, device=dev)
    rb = as_matrix(rel_b, "rel_b", func=func, device=dev)
    check_paired(ra, rb, ("rel_a", "rel_b"), func=func)
    if ra.shape[1] != rb.shape[1]:
        raise DataError(
            f"{func}: 'rel_a' has {ra.shape[1]} columns and 'rel_b' {rb.shape[1]}; relative representations must use "
            "the same anchors (one column per anchor)."
        )
    n = int(ra.shape[0])
    left_out = torch.empty(0, dtype=torch.long, device=dev)
    if anchors is not None:
        left_out = _anchor_indices(anchors, n, func, dev)
    n_anchors = int(left_out.shape[0])
    if n - n_anchors < 2:
        raise ParameterError(
            f"The 'anchors' of {func} leave {n - n_anchors} of the {n} samples to score, but the agreement scores need 2; "
            "pass fewer anchors or more samples."
        )
    k = _check_k(k, n - n_anchors, n_anchors, func)
    if (absolute_a is None) != (absolute_b is None):
        raise ParameterError(f"Pass both 'absolute_a' and 'absolute_b' to {func}, or neither.")
    aa = ab = None
    if absolute_a is not None:
        aa = as_matrix(absolute_a, "absolute_a", func=func, device=dev)
        ab = as_matrix(absolute_b, "absolute_b", func=func, device=dev)
        check_paired(ra, aa, ("rel_a", "absolute_a"), func=func)
        check_paired(ra, ab, ("rel_a", "absolute_b"), func=func)
    lab = None if labels is None else as_labels(labels, n, func=func, classes=True)
    scored = _non_anchors(n, left_out, dev)
    return _agreement(ra, rb, k, aa, ab, lab, scored, {"k": k, "n_anchors": n_anchors}, None, dev, start)


def relative_comparison(
    x_a: ArrayLike,
    x_b: ArrayLike,
    *,
    n_anchors: int = 64,
    method: str = "random",
    center: bool = False,
    k: int = 10,
    labels: ArrayLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> RelativeComparisonResult:
    """Relative representations of one layer of model A and one of model B, and how well they agree.

    Anchors are chosen among the samples with :func:`select_anchors` on ``x_a`` and the same samples
    serve as anchors in both models; then :func:`relative_representation` in each space and
    :func:`cross_model_agreement` with the absolute activations as the baseline. The anchors are left
    out of the agreement scores (as queries and as candidates, relative and absolute alike), so they
    are computed over the ``n_samples - n_anchors`` other samples, which the result's ``n_samples``
    counts.

    Args:
        x_a: ``(n_samples, n_features_a)`` activations of a layer of model A.
        x_b: ``(n_samples, n_features_b)`` activations of a layer of model B on the same samples.
        n_anchors: number of anchors, in [1, n_samples - 2].
        method: anchor choice, ``"random"``, ``"fps"`` or ``"kmeans"``.
        center: subtract the anchors' mean in each space before taking cosines.
        k: neighbourhood size for Jaccard@k, in [1, n_samples - n_anchors - 1].
        labels: optional ``(n_samples,)`` class labels (per-class agreement, colours in plots).
        seed: seed of the anchor choice.
        device: where to compute (``None``: cuda > mps > cpu); float64.

    Returns:
        A :class:`RelativeComparisonResult`.
    """
    func = "relative_comparison"
    start = time.perf_counter()
    method = check_choice(method, "method", ANCHOR_METHODS, func=func)
    center = check_bool(center, "center", func=func)
    seed = check_seed(seed, func=func)
    dev = _compute_device(device)
    xa = as_matrix(x_a, "x_a", func=func, device=dev)
    xb = as_matrix(x_b, "x_b", func=func, device=dev)
    check_paired(xa, xb, ("x_a", "x_b"), func=func)
    n = int(xa.shape[0])
    n_anchors = _check_n_anchors(n_anchors, n, func)
    k = _check_k(k, n - n_anchors, n_anchors, func)
    lab = None if labels is None else as_labels(labels, n, func=func, classes=True)
    anchors = _select_anchors(xa, n_anchors, method, seed)
    ra = _relative(xa, xa[anchors], center, func)
    rb = _relative(xb, xb[anchors], center, func)
    params = {"n_anchors": n_anchors, "method": method, "center": center, "k": k}
    agreement = _agreement(ra, rb, k, xa, xb, lab, _non_anchors(n, anchors, dev), params, seed, dev, start)
    return RelativeComparisonResult(
        anchors=anchors.cpu().numpy().astype(np.int64),
        relative_a=ra.cpu().numpy(),
        relative_b=rb.cpu().numpy(),
        labels=lab,
        agreement=agreement,
        estimator=f"relative representation, cosine to {n_anchors} {method} anchors{' (centred)' if center else ''}; "
        + agreement.estimator,
        n_samples=agreement.n_samples,
        params=params,
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


def _layer_pairs(
    acts_a: Mapping[str, ArrayLike], acts_b: Mapping[str, ArrayLike], layers: Sequence[Any] | None, func: str
) -> list[tuple[str, str]]:
    for arg, acts in (("acts_a", acts_a), ("acts_b", acts_b)):
        if not isinstance(acts, Mapping) or len(acts) == 0:
            raise DataError(
                f"{func}: '{arg}' must be Activations or a non-empty dict of layer name -> (n_samples, n_features) array."
            )
    if layers is None:
        pairs = [(name, name) for name in acts_a if name in acts_b]
        if not pairs:
            raise DataError(
                f"{func}: the two models share no layer names (A: {format_choices(acts_a)}; B: {format_choices(acts_b)}); "
                "pass layers=[('layer_of_a', 'layer_of_b'), ...]."
            )
        return pairs
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ParameterError(
            f"The 'layers' parameter of {func} must be a non-empty list of layer names or (layer_a, layer_b) pairs. Got {layers!r}."
        )
    pairs = [tuple(item) if isinstance(item, (tuple, list)) else (item, item) for item in layers]
    for pair in pairs:
        if len(pair) != 2:
            raise ParameterError(
                f"Each entry of 'layers' in {func} must be a name or a (layer_a, layer_b) pair. Got {pair!r}."
            )
        for name, acts, arg in ((pair[0], acts_a, "acts_a"), (pair[1], acts_b, "acts_b")):
            if name not in acts:
                raise UnknownLayerError(
                    f"Unknown layer '{name}' in '{arg}'.{did_you_mean(str(name), list(acts))} Layers: {format_choices(acts)}."
                )
    return [(str(a), str(b)) for a, b in pairs]


def _n_rows(x: ArrayLike, name: str, func: str) -> int:
    """The number of samples (rows) of a layer's activations, read from its shape without copying it."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        return int(as_matrix(x, name, func=func, min_samples=0).shape[0])  # raises for what is not a matrix
    return int(shape[0])


def _common_rows(
    acts_a: Mapping[str, ArrayLike], acts_b: Mapping[str, ArrayLike], pairs: list[tuple[str, str]], func: str
) -> int:
    """The number of samples, which every compared layer of both models must have (one dataset's activations)."""
    first = f"acts_a['{pairs[0][0]}']"
    n = _n_rows(acts_a[pairs[0][0]], first, func)
    for la, lb in pairs:
        for name, x in ((f"acts_a['{la}']", acts_a[la]), (f"acts_b['{lb}']", acts_b[lb])):
            rows = _n_rows(x, name, func)
            if rows != n:
                raise DataError(
                    f"{func}: {name} has {rows} samples but {first} has {n}; every compared layer must hold the "
                    "activations of the same samples, so extract all layers of both models on one dataset."
                )
    return n


def relative_agreement_by_layer(
    acts_a: Activations | Mapping[str, ArrayLike],
    acts_b: Activations | Mapping[str, ArrayLike],
    *,
    layers: Sequence[str | tuple[str, str]] | None = None,
    n_anchors: int = 64,
    method: str = "random",
    center: bool = False,
    k: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> RelativeLayerAgreementResult:
    """Jaccard@k, MRR and cosine between model A and model B, layer by layer, relative vs absolute.

    For each layer pair the anchors are chosen in A's layer (``"random"``: the same samples for every
    layer) and used in both models; see :func:`cross_model_agreement` for the definitions. The anchors
    are left out of the scores (as queries and as candidates, relative and absolute alike), so every
    layer pair is scored over its ``n_samples - n_anchors`` other samples, which the result's
    ``n_samples`` counts. Every compared layer must hold the activations of the same samples.

    Args:
        acts_a: Activations (or dict of layer -> array) of model A.
        acts_b: Activations of model B on the same samples.
        layers: layer names present in both, or ``(layer_of_a, layer_of_b)`` pairs; default: every
            layer name the two share, in A's order.
        n_anchors: number of anchors, in [1, n_samples - 2].
        method: anchor choice, ``"random"``, ``"fps"`` or ``"kmeans"``.
        center: subtract the anchors' mean before taking cosines.
        k: neighbourhood size for Jaccard@k, in [1, n_samples - n_anchors - 1].
        seed: seed of the anchor choice.
        device: where to compute (``None``: cuda > mps > cpu); float64.
        progress: optional callable ``(layer_pairs_done, total)``.

    Returns:
        A :class:`RelativeLayerAgreementResult`.
    """
    func = "relative_agreement_by_layer"
    check_same_dataset(acts_a, acts_b, func=func)
    start = time.perf_counter()
    method = check_choice(method, "method", ANCHOR_METHODS, func=func)
    center = check_bool(center, "center", func=func)
    seed = check_seed(seed, func=func)
    if progress is not None and not callable(progress):
        raise ParameterError(
            f"The 'progress' parameter of {func} must be a callable (done, total) or None. Got {progress!r}."
        )
    pairs = _layer_pairs(acts_a, acts_b, layers, func)
    n = _common_rows(acts_a, acts_b, pairs, func)
    n_anchors = _check_n_anchors(n_anchors, n, func)
    k = _check_k(k, n - n_anchors, n_anchors, func)
    dev = _compute_device(device)
    rows = []
    for i, (la, lb) in enumerate(pairs):
        xa = as_matrix(acts_a[la], f"acts_a['{la}']", func=func, device=dev)
        xb = as_matrix(acts_b[lb], f"acts_b['{lb}']", func=func, device=dev)
        check_paired(xa, xb, (f"acts_a['{la}']", f"acts_b['{lb}']"), func=func)
        anchors = _select_anchors(xa, n_anchors, method, seed)
        scored = _non_anchors(n, anchors, dev)
        ra = _relative(xa, xa[anchors], center, func)[scored]
        rb = _relative(xb, xb[anchors], center, func)[scored]
        jac, rr, cos = _retrieval(ra, rb, k)
        row = [float(jac.mean()), float(rr.mean()), float(cos.mean())]
        if xa.shape[1] == xb.shape[1]:
            a_jac, a_rr, a_cos = _retrieval(xa[scored], xb[scored], k)
            row += [float(a_jac.mean()), float(a_rr.mean()), float(a_cos.mean()), 1.0]
        else:
            row += [math.nan, math.nan, math.nan, 0.0]
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(pairs))
    table = np.asarray(rows)

    def name(acts: Any, default: str) -> str:
        return (acts.model_name if isinstance(acts, Activations) else "") or default

    return RelativeLayerAgreementResult(
        layers_a=tuple(a for a, _ in pairs),
        layers_b=tuple(b for _, b in pairs),
        jaccard=table[:, 0],
        mrr=table[:, 1],
        cosine=table[:, 2],
        absolute_jaccard=table[:, 3],
        absolute_mrr=table[:, 4],
        absolute_cosine=table[:, 5],
        absolute_comparable=table[:, 6].astype(bool),
        k=k,
        n_anchors=n_anchors,
        model_a=name(acts_a, "A"),
        model_b=name(acts_b, "B"),
        estimator=f"cross-space retrieval by cosine (Moschella et al. 2023), relative: {n_anchors} {method} anchors"
        f"{' (centred)' if center else ''}, left out of the scores; among the {n - n_anchors} other samples: "
        f"Jaccard@{k}, MRR, mean cosine",
        n_samples=n - n_anchors,
        params={"n_anchors": n_anchors, "method": method, "center": center, "k": k},
        seed=seed,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# zero-shot stitching


def _train_head(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    head: str,
    epochs: int,
    seed: int,
    epoch_done: Callable[[int], Any] | None = None,
) -> nn.Module:
    """A LayerNorm + linear (or one-hidden-layer MLP) classifier, full-batch Adam, seeded init.

    ``epoch_done(i)`` is called after the i-th training step (1-based)."""
    width = x.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        if head == "linear":
            layers.append(nn.Linear(width, n_classes))
        else:
            layers += [nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, n_classes)]
        model = nn.Sequential(*layers).to(device=x.device, dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=_HEAD_LR, weight_decay=1e-4)
    xf = x.to(torch.float32)
    with torch.enable_grad():
        for epoch in range(epochs):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xf), y)
            loss.backward()
            optimiser.step()
            if epoch_done is not None:
                epoch_done(epoch + 1)
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x.to(torch.float32)).argmax(1) == y).to(torch.float64).mean())


def stitch(
    train_a: ArrayLike,
    train_b: ArrayLike,
    test_a: ArrayLike,
    test_b: ArrayLike,
    train_labels: ArrayLike,
    test_labels: ArrayLike,
    *,
    n_anchors: int = 64,
    method: str = "random",
    center: bool = False,
    head: str = "linear",
    epochs: int = 100,
    logits_a: ArrayLike | None = None,
    logits_b: ArrayLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> StitchingResult:
    """Zero-shot stitching through relative representations (Moschella et al. 2023, Sec. 5).

    Anchors are ``n_anchors`` training samples (chosen in A's space), the same samples in both models.
    A classification head is trained on each model's relative representation of the other training samples
    (an anchor's own column would tell its class in any space: a random encoder then stitches above chance)
    and then applied, without any further training, to the other model's relative representation of
    the test samples: the encoder of one model is stitched to the head of the other. The same is done
    with heads on the raw activations ("absolute stitching", possible only when the widths match),
    which fails for independently trained models because their coordinates do not correspond.

    Heads are LayerNorm followed by a linear layer (``head="linear"``) or a 128-unit ReLU MLP
    (``head="mlp"``), trained with full-batch Adam (learning rate 0.03, weight decay 1e-4) from a
    seeded initialisation.

    Args:
        train_a: ``(n_train, n_features_a)`` activations of model A's chosen layer (e.g. the last hidden
            layer) on the training samples.
        train_b: ``(n_train, n_features_b)`` activations of model B on the same training samples.
        test_a: ``(n_test, n_features_a)`` activations of model A on the test samples.
        test_b: ``(n_test, n_features_b)`` activations of model B on the same test samples.
        train_labels: ``(n_train,)`` integer class labels.
        test_labels: ``(n_test,)`` integer class labels.
        n_anchors: number of anchors, in [1, n_train].
        method: anchor choice, ``"random"``, ``"fps"`` or ``"kmeans"``.
        center: subtract the anchors' mean before taking cosines.
        head: ``"linear"`` or ``"mlp"``.
        epochs: full-batch training steps, in [1, 10000]; 60-300 suffice for a few thousand samples.
        logits_a: optional ``(n_test, n_classes)`` outputs of model A's own head on the test samples.
        logits_b: optional ``(n_test, n_classes)`` outputs of model B's own head (pass both or neither).
        seed: seed of the anchor choice and the heads' initialisation.
        device: where to compute (``None``: cuda > mps > cpu).
        progress: optional callable ``(epochs_done, total)``, called after every training step of
            every head; ``total`` is ``epochs`` times the number of heads (4, or 2 without absolute
            stitching).

    Returns:
        A :class:`StitchingResult`.
    """
    func = "stitch"
    start = time.perf_counter()
    method = check_choice(method, "method", ANCHOR_METHODS, func=func)
    head = check_choice(head, "head", HEADS, func=func)
    center = check_bool(center, "center", func=func)
    epochs = check_int(epochs, "epochs", func=func, low=1, high=10_000)
    seed = check_seed(seed, func=func)
    if (logits_a is None) != (logits_b is None):
        raise ParameterError(f"Pass both 'logits_a' and 'logits_b' to {func}, or neither.")
    if progress is not None and not callable(progress):
        raise ParameterError(
            f"The 'progress' parameter of {func} must be a callable (done, total) or None. Got {progress!r}."
        )
    dev = _compute_device(device)
    tr_a = as_matrix(train_a, "train_a", func=func, device=dev)
    tr_b = as_matrix(train_b, "train_b", func=func, device=dev)
    te_a = as_matrix(test_a, "test_a", func=func, device=dev, min_samples=1)
    te_b = as_matrix(test_b, "test_b", func=func, device=dev, min_samples=1)
    check_paired(tr_a, tr_b, ("train_a", "train_b"), func=func)
    check_paired(te_a, te_b, ("test_a", "test_b"), func=func)
    for tr, te, name in ((tr_a, te_a, "a"), (tr_b, te_b, "b")):
        if tr.shape[1] != te.shape[1]:
            raise DataError(
                f"{func}: 'train_{name}' has {tr.shape[1]} features but 'test_{name}' has {te.shape[1]}; both must come "
                "from the same layer of the same model."
            )
    y_tr_np = as_labels(train_labels, int(tr_a.shape[0]), func=func, name="train_labels")
    y_te_np = as_labels(test_labels, int(te_a.shape[0]), func=func, name="test_labels")
    for arr, name in ((y_tr_np, "train_labels"), (y_te_np, "test_labels")):
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and int(arr.min()) < 0):
            raise DataError(f"{func}: '{name}' must be non-negative integer class labels. Got dtype {arr.dtype}.")
    trained_on = np.unique(y_tr_np)
    if trained_on.size < 2:
        raise DataError(
            f"{func}: 'train_labels' hold one class only ({trained_on[0].item()!r}); a head needs at least two classes "
            "to tell apart."
        )
    # the heads learn class indices 0..k-1 of the labels present (labels such as 3 and 7, or 1e8, cost nothing);
    # the models' own heads are scored against the labels as given
    classes = np.unique(np.concatenate([y_tr_np, y_te_np]))
    n_classes = int(classes.size)
    y_tr = torch.as_tensor(np.searchsorted(classes, y_tr_np), dtype=torch.long, device=dev)
    y_te = torch.as_tensor(np.searchsorted(classes, y_te_np), dtype=torch.long, device=dev)
    y_te_given = torch.as_tensor(y_te_np, dtype=torch.long, device=dev)
    n_anchors = check_int(n_anchors, "n_anchors", func=func, low=1, high=int(tr_a.shape[0]))

    anchors = _select_anchors(tr_a, n_anchors, method, seed)
    # the heads learn from the training rows that are not anchors: an anchor's relative representation has a
    # cosine of 1 in its own column in any space, so a head trained on it would learn "column j -> class of
    # anchor j", which even a random encoder reproduces
    fit = torch.ones(tr_a.shape[0], dtype=torch.bool, device=dev)
    fit[anchors] = False
    fit = fit if bool(fit.any()) else ~fit
    fit_classes = torch.unique(y_tr[fit])
    if fit_classes.numel() < 2:  # every other class is among the anchors
        raise DataError(
            f"{func}: the {int(fit.sum())} training samples that are not anchors, which the heads learn from, hold one "
            f"class only ({classes[int(fit_classes[0])].item()!r}); a head needs at least two classes to tell apart, so "
            "choose fewer anchors (n_anchors) or give more training samples."
        )
    rel_train = [_relative(tr_a[fit], tr_a[anchors], center, func), _relative(tr_b[fit], tr_b[anchors], center, func)]
    rel_test = [_relative(te_a, tr_a[anchors], center, func), _relative(te_b, tr_b[anchors], center, func)]

    total = (4 if tr_a.shape[1] == tr_b.shape[1] else 2) * epochs
    trained: list[nn.Module] = []

    def epoch_done(offset: int) -> Callable[[int], Any] | None:
        return None if progress is None else lambda epoch: progress(offset + epoch, total)

    def cross(train: list[torch.Tensor], test: list[torch.Tensor]) -> np.ndarray:
        heads = []
        for t in train:
            heads.append(_train_head(t, y_tr[fit], n_classes, head, epochs, seed, epoch_done(len(trained) * epochs)))
            trained.append(heads[-1])
        return np.array([[_accuracy(h, test[e], y_te) for h in heads] for e in range(2)])

    relative_acc = cross(rel_train, rel_test)
    absolute_acc = cross([tr_a[fit], tr_b[fit]], [te_a, te_b]) if tr_a.shape[1] == tr_b.shape[1] else None
    own = None
    if logits_a is not None:
        own_list = []
        for logits, name in ((logits_a, "logits_a"), (logits_b, "logits_b")):
            lt = as_matrix(logits, name, func=func, device=dev, min_samples=1)
            check_paired(te_a, lt, ("test_a", name), func=func)
            own_list.append(float((lt.argmax(1) == y_te_given).to(torch.float64).mean()))
        own = np.asarray(own_list)
    chance = float(np.unique(y_te_np, return_counts=True)[1].max() / y_te_np.size)
    return StitchingResult(
        relative_accuracy=relative_acc,
        absolute_accuracy=absolute_acc,
        own_accuracy=own,
        chance_accuracy=chance,
        anchors=anchors.cpu().numpy().astype(np.int64),
        n_train=int(fit.sum()),
        head=head,
        estimator=f"test accuracy of {head} heads (LayerNorm + {'linear' if head == 'linear' else 'MLP'}, {epochs} full-batch "
        f"Adam steps) on relative representations ({n_anchors} {method} training anchors{', centred' if center else ''})",
        n_samples=int(te_a.shape[0]),
        params={"n_anchors": n_anchors, "method": method, "center": center, "head": head, "epochs": epochs},
        seed=seed,
        device=str(dev),
        dtype="float32 heads, float64 relative representations",
        seconds=time.perf_counter() - start,
    )
