"""Representational similarity between layers: CKA, Procrustes, CCA and RSA.

Every measure compares two representations of the *same* samples, ``x: (n_samples, n_features_x)``
and ``y: (n_samples, n_features_y)``. Widths may differ and may exceed ``n_samples``. Inputs are numpy
arrays or torch tensors of any real dtype; they are copied to float64 on the compute device (``device=None``:
cuda > mps > cpu; float64 work on MPS runs on the CPU) and never modified. Single-pair functions return a
Python float; :func:`similarity_matrix` compares every layer of one model with every layer of another
(or of itself) and returns a :class:`SimilarityMatrixResult`.

Measures and their direction (``*_distance`` is lower-is-closer, everything else higher-is-closer), with
their ranges and the changes of ``y`` they ignore (every one also ignores a permutation of the units):

* ``linear_cka``, ``rbf_cka``: [0, 1] ([-1, 1] debiased); orthogonal maps, isotropic scaling, translation.
* ``procrustes_distance``: [0, sqrt 2] ([0, pi/2] angular); orthogonal maps, isotropic scaling, translation.
* ``cca_similarity``: [0, 1]; ``kind="mean"``: any invertible linear map and translation; ``"svcca"``:
  orthogonal maps, isotropic scaling, translation; ``"pwcca"``: sign flips, isotropic scaling, translation.
* ``rsa``: [-1, 1]; ``rdm="euclidean"``: orthogonal maps, isotropic scaling, translation;
  ``rdm="correlation"``: a per-sample offset and scale (not rotations).

Defined values and errors, the same for every measure:

* A feature that is constant over samples is allowed. Centring removes it, so it contributes nothing
  (CKA, Procrustes, Euclidean RSA), or it is dropped as a rank-deficient direction (CCA).
* A representation whose every feature is constant over samples (an all-zero or dead layer, or the first
  token of sequences that all start with the same one) raises :class:`~workbench.errors.ConstantDataError`:
  every measure here is 0/0 on it. In :func:`similarity_matrix` its row or column is NaN instead, the
  others computed (``params["constant_layers"]`` names them, also when linear CKA is streamed because the
  layers exceed its memory limit), unless no layer of one side is left.
* NaN or infinite values, a different number of samples in ``x`` and ``y``, and fewer samples than a
  measure needs raise :class:`~workbench.errors.DataError`. No function returns NaN, except for the
  cells of :func:`similarity_matrix` named above and those where CCA of a pair of layers is undefined
  (listed in ``params["undefined_pairs"]``; a single pair raises :class:`UndefinedPairError`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.activations.types import Activations
from workbench.analyses._distances import _BLOCK_BYTES, average_ranks, condensed_distances, squared_distances
from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    ArrayLike,
    as_matrix,
    check_bool,
    check_choice,
    check_float,
    check_paired,
    check_progress,
    check_same_dataset,
    check_seed,
    unit_scale,
)
from workbench.device import float64_device, resolve_device
from workbench.errors import (
    ConstantDataError,
    DataError,
    ParameterError,
    UnknownLayerError,
    did_you_mean,
    format_choices,
)

MEASURES = ("linear_cka", "rbf_cka", "procrustes_distance", "cca_similarity", "rsa")
CCA_KINDS = ("svcca", "pwcca", "mean")
RDM_KINDS = ("correlation", "euclidean")
RDM_COMPARISONS = ("spearman", "pearson")

# Above this many bytes of stored n x n matrices, linear CKA uses the feature-space form and the
# Gram-only measures (RBF CKA, RSA) refuse with a message that says how much memory they would need.
_GRAM_BYTES_LIMIT = 2 * 2**30
_GRAM_ONLY_BYTES_LIMIT = 8 * 2**30

Progress = Callable[[int, int], Any]


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class SimilarityMatrixResult(RecordedResult):
    """A measure evaluated on every pair (layer of model A, layer of model B).

    ``values[i, j]`` compares ``layers_a[i]`` with ``layers_b[j]``; shape ``(n_layers_a, n_layers_b)``.
    ``higher_is_closer`` is False for distances. ``n_features_a`` / ``n_features_b`` are the layer widths.
    CCA of two layers that together span more dimensions than the samples allow is undefined: those
    cells are NaN and listed in ``params["undefined_pairs"]`` (the ``estimator`` says why). For CCA,
    ``params["ranks_a"]`` and ``params["ranks_b"]`` give the number of directions each layer keeps (layer
    name -> rank above the rounding level of its precision, or SVCCA's cut).
    """

    values: np.ndarray
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    n_features_a: np.ndarray
    n_features_b: np.ndarray
    measure: str
    higher_is_closer: bool
    model_a: str
    model_b: str

    def to_frame(self) -> Any:
        """The values as a ``pandas.DataFrame``: rows are model A's layers, columns model B's."""
        import pandas as pd

        return pd.DataFrame(self.values, index=pd.Index(self.layers_a, name=self.model_a),
                            columns=pd.Index(self.layers_b, name=self.model_b))


@dataclass(frozen=True)
class MinibatchCKAResult(RecordedResult):
    """Linear CKA accumulated over minibatches.

    ``value`` is in [-1, 1] (near 0 for independent representations). ``batch_sizes`` lists the sample
    count of every chunk that entered the estimate (batches of fewer than 4 samples are merged into a
    neighbour), so ``batch_sizes.sum() == n_samples``: every sample is used.
    """

    value: float
    n_batches: int
    batch_sizes: np.ndarray


# ---------------------------------------------------------------------------------------------
# shared helpers


def _compute_device(device: str | torch.device | None) -> torch.device:
    return float64_device(resolve_device(device))




def _centre(
    x: torch.Tensor, name: str | None = None, func: str = "", scale: float | None = None, in_place: bool = False
) -> torch.Tensor:
    """Column-centred copy of ``x`` times a power of two, so that every measure built on it is computed in range
    whatever the data's scale; all of them are scale-free. ``x`` is multiplied by ``scale`` before the mean is
    taken (a sum of values near 1e308 overflows); without ``scale``, by :func:`unit_scale` of ``x``, and the
    centred data again by its own :func:`unit_scale`. Columns that are exactly constant become exactly 0
    (rounding in the mean would otherwise leave ~1e-17 noise that a normalised measure can blow up). With
    ``name`` given, raise when every column is constant (an all-zero or dead layer). ``in_place``: centre ``x``
    itself (a copy the caller owns), the same numbers without a second ``(n, d)`` array."""
    low, high = torch.aminmax(x, dim=0)
    constant = low == high  # every value equal to the first (x is finite), without an (n, d) flag per value
    if in_place:
        x.mul_(unit_scale(x) if scale is None else scale)
        xc = x.sub_(x.mean(0, keepdim=True))
    else:
        x = x * (unit_scale(x) if scale is None else scale)
        xc = x - x.mean(0, keepdim=True)
    if bool(constant.any()):
        if name is not None and bool(constant.all()):
            raise ConstantDataError(_constant_message(func, name))
        xc[:, constant] = 0.0
    return xc.mul_(unit_scale(xc)) if scale is None else xc


def _constant_message(func: str, name: str) -> str:
    return (f"{func}: '{name}' is constant over samples (zero variance in every feature), so the measure is undefined; "
            "pick another layer or check that the model is not dead on this dataset.")


def _constant_layers_note(estimator: str, params: dict[str, Any], dead: dict[str, list[str]], acts_a: Any, acts_b: Any) -> str:
    """Record in ``params["constant_layers"]`` the layers of each side (``dead``: "A"/"B" -> names) that are constant
    over samples, and return ``estimator`` with a note that their rows or columns are n/a."""
    params["constant_layers"] = {side: names for side, names in dead.items() if names}

    def owner(side: str) -> str:
        name = _model_name(acts_a if side == "A" or acts_b is None else acts_b, "")
        return f"model {side}" + (f" ({name})" if name else "")

    listed = "; ".join(f"{', '.join(names)} of {owner(side)}" for side, names in params["constant_layers"].items())
    return f"{estimator}; n/a (NaN) for the layers constant over samples, where the measure is undefined: {listed}"


def _bounded(value: float, low: float, high: float, func: str) -> float:
    """``value`` clipped to ``[low, high]`` (rounding can step just outside the range); NaN or infinity raises,
    as a clipped NaN would read as a valid value."""
    if not math.isfinite(value):
        raise DataError(
            f"{func}: an intermediate result came out {value} (it overflowed or is 0/0), so the measure is undefined "
            "for this data; check the layers for extreme values or rescale them before comparing."
        )
    return min(high, max(low, value))


def _rescale_factor(rows: torch.Tensor, scale: float | None) -> tuple[float, float]:
    """The power of two a streamed chunk ``rows`` is multiplied by, and the factor (<= 1) that brings sums
    accumulated at the previous ``scale`` to it: chunks are scaled alike, by the largest chunk seen so far,
    so that they add up and none of them overflows."""
    own = unit_scale(torch.linalg.vector_norm(rows, math.inf))  # the largest |value|, without an |rows| temporary
    if scale is None or own >= scale:
        return (own if scale is None else scale), 1.0
    return own, own / scale


def _read_chunk(rows: Any, out: torch.Tensor, label: str, func: str) -> None:
    """Copy the rows ``rows`` of a layer into ``out`` (float64, their shape), with the checks of :func:`as_matrix` but
    without its float64 copy and temporaries: the dtype is checked on the first row, and rows that hold NaN or an
    infinity are passed to :func:`as_matrix` for its message."""
    as_matrix(rows[:1], label, func=func, min_samples=1)
    out.copy_(rows.detach() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows)))
    if not math.isfinite(float(torch.linalg.vector_norm(out, math.inf))):  # NaN propagates through the maximum
        as_matrix(rows, label, func=func, min_samples=1)
        raise RuntimeError(f"as_matrix accepted the non-finite rows of '{label}'")  # internal invariant, not user input


def _workspace(
    shapes: Sequence[tuple[int, ...]], at_least: int, dev: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One float64 allocation of at least ``at_least`` elements, and float64 tensors of the given ``shapes`` that are
    views of it, side by side. Each starts on a multiple of 64 bytes, as torch aligns its own allocations."""
    starts, end = [], 0
    for shape in shapes:
        starts.append(end)
        end += -(-math.prod(shape) // 8) * 8
    flat = torch.empty(max(end, at_least), dtype=torch.float64, device=dev)
    return flat, [flat[start : start + math.prod(shape)].view(shape) for start, shape in zip(starts, shapes)]


def _unbiased_scale(n: int) -> float:
    """Factor that turns the scale-free debiased HSIC below into Song et al.'s estimator."""
    return 1.0 / (n * (n - 3))


# ---------------------------------------------------------------------------------------------
# HSIC / CKA cores
#
# A kernel is summarised once per layer by ``_KernelStats``: either centred features X (linear kernel,
# K = X X^T never formed) or a centred Gram matrix K. Centring the Gram (K -> HKH) changes neither the
# biased HSIC <HKH, HLH> nor Song et al.'s unbiased estimator, which for a centred K reduces to
#     <K, L> - n/(n-2) diag(K).diag(L) + tr(K) tr(L) / ((n-1)(n-2))        (times 1 / (n(n-3)))
# (Kornblith et al. 2019, appendix). Every pair then needs only <K, L>.


@dataclass(frozen=True)
class _KernelStats:
    features: torch.Tensor | None  # (n, d) centred features, linear kernel
    gram: torch.Tensor | None  # (n, n) centred Gram matrix
    diag: torch.Tensor  # (n,) diagonal of the centred Gram
    trace: float
    self_hsic: float  # scale-free HSIC(K, K), biased or debiased


def _inner(a: _KernelStats, b: _KernelStats) -> float:
    """<K_a, K_b> (Frobenius) from features or Gram matrices."""
    if a.features is not None and b.features is not None:
        return float(torch.linalg.matrix_norm(a.features.T @ b.features) ** 2)
    if a.gram is not None and b.gram is not None:
        return float(torch.vdot(a.gram.reshape(-1), b.gram.reshape(-1)))
    raise RuntimeError("kernel statistics of different forms")  # internal invariant, not user input


def _debiased_hsic(inner: float, diag_dot: float, trace_a: float, trace_b: float, n: int) -> float:
    """Song et al.'s unbiased HSIC times ``n (n - 3)``, from ``<K, L>``, ``diag(K).diag(L)`` and the traces of the centred Grams."""
    return inner - n / (n - 2) * diag_dot + trace_a * trace_b / ((n - 1) * (n - 2))


def _hsic_from_inner(inner: float, a: _KernelStats, b: _KernelStats, debiased: bool, n: int) -> float:
    if not debiased:
        return inner
    return _debiased_hsic(inner, float(torch.dot(a.diag, b.diag)), a.trace, b.trace, n)


def _check_self_hsic(self_inner: float, self_hsic: float, n: int, name: str, func: str) -> None:
    """Refuse a layer whose HSIC with itself is zero: constant, or (debiased) too few samples for its spread."""
    if not (math.isfinite(self_inner) and math.isfinite(self_hsic)):
        raise DataError(
            f"{func}: the HSIC of '{name}' with itself came out {self_inner if not math.isfinite(self_inner) else self_hsic} "
            "(it overflowed or is 0/0), so CKA is undefined for this data; check the layer for extreme values or rescale it."
        )
    if self_inner <= 0.0:
        raise ConstantDataError(_constant_message(func, name))
    if self_hsic <= 1e-12 * self_inner:  # zero up to rounding: the ratio below would amplify noise
        raise DataError(
            f"{func}: the debiased HSIC of '{name}' with itself is not positive ({self_hsic * _unbiased_scale(n):.3g}) "
            f"with {n} samples, so debiased CKA is undefined; use more samples or debiased=False."
        )


def _kernel_stats(
    features: torch.Tensor | None, gram: torch.Tensor | None, debiased: bool, name: str, func: str
) -> _KernelStats:
    if features is not None:
        n, d = features.shape
        diag = (features * features).sum(1)
        small = features.T @ features if d <= n else features @ features.T
        self_inner = float(torch.linalg.matrix_norm(small) ** 2)
    elif gram is not None:
        n = gram.shape[0]
        diag = gram.diagonal().clone()
        self_inner = float(torch.vdot(gram.reshape(-1), gram.reshape(-1)))
    else:
        raise RuntimeError("kernel statistics need features or a Gram matrix")  # internal invariant
    stats = _KernelStats(features, gram, diag, float(diag.sum()), 0.0)
    self_hsic = _hsic_from_inner(self_inner, stats, stats, debiased, n)
    _check_self_hsic(self_inner, self_hsic, n, name, func)
    return _KernelStats(features, gram, diag, stats.trace, self_hsic)


def _cka_from_stats(a: _KernelStats, b: _KernelStats, debiased: bool, n: int, func: str) -> float:
    hsic = _hsic_from_inner(_inner(a, b), a, b, debiased, n)
    value = hsic / math.sqrt(a.self_hsic * b.self_hsic)
    return _bounded(value, -1.0 if debiased else 0.0, 1.0, func)


def _use_gram_form(n: int, widths_a: Sequence[int], widths_b: Sequence[int]) -> bool:
    """Whether the n x n Gram form is cheaper than the feature-space form (and fits the memory limit)."""
    if (len(widths_a) + len(widths_b)) * n * n * 8 > _GRAM_BYTES_LIMIT:
        return False
    feature_cost = n * sum(widths_a) * sum(widths_b)
    gram_cost = n * n * (sum(widths_a) + sum(widths_b)) + len(widths_a) * len(widths_b) * n * n
    return gram_cost < feature_cost


def _converted(rows: Any, dev: torch.device) -> bool:
    """Whether :func:`as_matrix` returns a new float64 copy of ``rows`` on ``dev`` (one the caller may overwrite)
    rather than ``rows``' own memory: it converts whatever is not already float64 on that device."""
    if isinstance(rows, torch.Tensor):
        return rows.dtype != torch.float64 or rows.device != dev
    return isinstance(rows, np.ndarray) and rows.dtype != np.float64


def _linear_cka_bytes(
    n: int, widths_a: Sequence[int], widths_b: Sequence[int], symmetric: bool, gram_form: bool, copied: bool
) -> int:
    """Peak memory of in-memory linear CKA over the layer pairs: each layer's kept statistics (its centred
    features, or its n x n Gram), and on top of them the largest transient: preparing one layer (a flag per
    value; a second (n, d) array unless ``copied``, i.e. every layer's float64 copy is new and centred in
    place; in the feature form the squared values for the Gram's diagonal and the d x d product; in the Gram
    form the centred features next to their Gram) or one pair's d_a x d_b cross product."""
    widths = list(widths_a) + ([] if symmetric else list(widths_b))
    kept = sum(8 * n * (n if gram_form else w) + 8 * n for w in widths)
    extra = 0 if copied else 1
    if gram_form:
        prep = max(n * w * (8 * (1 + extra) + 1) for w in widths)
        return kept + prep
    prep = max(max(n * w * (8 * extra + 1), 8 * n * w + 8 * min(n, w) ** 2) for w in widths)
    return kept + max(prep, 8 * max(widths_a) * max(widths_b))


def _gram_only_bytes(measure: str, compare: str, n: int, widths: Sequence[int], dev: torch.device) -> int:
    """Peak memory of RBF CKA or RSA over ``len(widths)`` layers: what every layer keeps (its centred n x n Gram,
    or its n (n - 1) / 2 dissimilarities), and on top of it the transient peak of preparing one layer."""
    features = 8 * n * max(widths)  # the float64 copy of one layer
    if measure == "rbf_cka":
        kept = 8 * n * n
        # the squared distances (turned into the Gram in place), the selection of their median, the centring
        transient = features + 3 * kept
    else:
        kept = 8 * (n * (n - 1) // 2)
        distances = features + 2 * _BLOCK_BYTES + kept  # the centred copy, one block of rows, the result
        sort = 1.5 * kept if dev.type == "cpu" else 3.0 * kept  # sorted values, int32 (CPU) order, the sort's space
        ranking = kept + sort + kept / 8 + 2**26 if compare == "spearman" else kept
        transient = features + max(distances, ranking)
    return int((len(widths) - 1) * kept + transient)


def _linear_stats(
    x: torch.Tensor, name: str, func: str, debiased: bool, gram_form: bool, owned: bool = False
) -> _KernelStats:
    """Kernel statistics of the linear kernel of ``x``; ``owned``: ``x`` is a copy that may be centred in place."""
    xc = _centre(x, name, func, in_place=owned)
    if gram_form:
        return _kernel_stats(None, xc @ xc.T, debiased, name, func)
    return _kernel_stats(xc, None, debiased, name, func)


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    row = k.mean(0, keepdim=True)
    return k - row - row.T + row.mean()


def _median(values: torch.Tensor) -> float:
    """numpy's median (mean of the two middle values for an even count), by selection, not sorting."""
    flat = values.reshape(-1)
    m = flat.numel()
    upper = float(torch.kthvalue(flat, m // 2 + 1).values)
    if m % 2:
        return upper
    return 0.5 * (upper + float(torch.kthvalue(flat, m // 2).values))


SIGMA_RANGE = (0.01, 100.0)  # the RBF bandwidth, a fraction of the median distance: outside it the kernel is the identity
# (every sample far from every other) or all ones to within rounding, whatever the data


def _rbf_stats(x: torch.Tensor, name: str, func: str, sigma: float, debiased: bool) -> _KernelStats:
    xc = _centre(x, name, func)
    sq = squared_distances(xc)  # exact within tight clusters and for duplicates, where the expansion loses digits
    median_sq = _median(sq)
    if median_sq <= 0.0:
        raise DataError(
            f"{func}: the median pairwise distance of '{name}' is zero (more than half of the sample pairs coincide), "
            "so the RBF bandwidth is zero; remove duplicate samples or use linear_cka."
        )
    gram = torch.exp_(sq.mul_(-1.0 / (2.0 * sigma * sigma * median_sq)))
    return _kernel_stats(None, _centre_gram(gram), debiased, name, func)


def _check_debiased_n(n: int, func: str) -> None:
    if n < 4:
        raise DataError(
            f"{func} with debiased=True needs at least 4 samples (the unbiased HSIC estimator divides by n - 3). "
            f"Got {n}; use more samples or debiased=False."
        )


def _pair_inputs(
    x: ArrayLike, y: ArrayLike, func: str, device: str | torch.device | None, min_samples: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    dev = _compute_device(device)
    xt = as_matrix(x, "x", func=func, device=dev, min_samples=min_samples)
    yt = as_matrix(y, "y", func=func, device=dev, min_samples=min_samples)
    check_paired(xt, yt, func=func)
    return xt, yt, dev


def linear_cka(
    x: ArrayLike, y: ArrayLike, *, debiased: bool = False, device: str | torch.device | None = None
) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) between two representations of the same samples.

    ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc, Yc`` the column-centred
    data: the normalised HSIC of the linear kernels. Computed in the feature space (``d_x x d_y``
    products) or with the ``n x n`` Gram matrices, whichever is cheaper; both give the same number.

    Range [0, 1]; 1 when ``y`` is an orthogonal transform, isotropic scaling or translation of ``x``.
    The plain (biased) estimator is inflated when the widths are large relative to ``n_samples``:
    independent random features score well above 0. ``debiased=True`` uses the unbiased HSIC estimator
    of Song et al. (2012), as in Kornblith et al.: near 0 for independent features, range [-1, 1], and
    needs at least 4 samples.

    Args:
        x: ``(n_samples, n_features_x)`` activations of one layer.
        y: ``(n_samples, n_features_y)`` activations of another layer on the same samples, in the same order.
        debiased: use the unbiased HSIC estimator; prefer it when widths are comparable to or larger
            than the number of samples.
        device: where to compute (``None``: cuda > mps > cpu); accumulation is always float64.

    Returns:
        The CKA value as a Python float.
    """
    func = "linear_cka"
    debiased = check_bool(debiased, "debiased", func=func)
    xt, yt, _ = _pair_inputs(x, y, func, device)
    n = xt.shape[0]
    if debiased:
        _check_debiased_n(n, func)
    gram_form = _use_gram_form(n, [xt.shape[1]], [yt.shape[1]])
    a = _linear_stats(xt, "x", func, debiased, gram_form)
    b = _linear_stats(yt, "y", func, debiased, gram_form)
    return _cka_from_stats(a, b, debiased, n, func)


def rbf_cka(
    x: ArrayLike,
    y: ArrayLike,
    *,
    sigma: float = 0.8,
    debiased: bool = False,
    device: str | torch.device | None = None,
) -> float:
    """CKA with Gaussian (RBF) kernels (Kornblith et al. 2019).

    ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2 m))`` where ``m`` is the median squared Euclidean distance
    over all ``n^2`` ordered sample pairs (the diagonal included, as in Kornblith et al.'s code), so
    ``sigma`` is the bandwidth as a fraction of the median pairwise distance. Then
    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Range [0, 1] (debiased: [-1, 1]). Invariant to orthogonal transforms, translation and isotropic
    scaling (the bandwidth follows the median), but not to scaling features by different factors.
    Needs ``n x n`` memory per representation.

    Args:
        x: ``(n_samples, n_features_x)`` activations.
        y: ``(n_samples, n_features_y)`` activations of the same samples.
        sigma: bandwidth as a fraction of the median distance, in [0.01, 100]. Small values (0.2) compare local
            neighbourhoods; large values (>= 2) approach linear CKA. Kornblith et al. report 0.2-0.8.
        debiased: use the unbiased HSIC estimator of Song et al. (2012); needs at least 4 samples.
        device: where to compute (``None``: cuda > mps > cpu); float64 throughout.

    Returns:
        The RBF CKA value as a Python float.
    """
    func = "rbf_cka"
    sigma = check_float(sigma, "sigma", func=func, low=SIGMA_RANGE[0], high=SIGMA_RANGE[1])
    debiased = check_bool(debiased, "debiased", func=func)
    xt, yt, _ = _pair_inputs(x, y, func, device)
    n = xt.shape[0]
    if debiased:
        _check_debiased_n(n, func)
    a = _rbf_stats(xt, "x", func, sigma, debiased)
    b = _rbf_stats(yt, "y", func, sigma, debiased)
    return _cka_from_stats(a, b, debiased, n, func)


# ---------------------------------------------------------------------------------------------
# streaming (minibatch) CKA


def _unbiased_hsic_triplet(x: torch.Tensor, y: torch.Tensor, scales: tuple[float, float]) -> tuple[float, float, float]:
    """Song et al.'s unbiased HSIC of (x, y), (x, x), (y, y) for one chunk (linear kernels), with x and y
    multiplied by ``scales`` (the powers of two the sums over chunks are kept at, so the chunks add up)."""
    n = x.shape[0]
    gram_form = _use_gram_form(n, [x.shape[1]], [y.shape[1]])
    stats = []
    for t, scale in zip((x, y), scales):
        tc = _centre(t, scale=scale)
        if gram_form:
            g = tc @ tc.T
            diag = g.diagonal().clone()
            stats.append(_KernelStats(None, g, diag, float(diag.sum()), 0.0))
        else:
            diag = (tc * tc).sum(1)
            stats.append(_KernelStats(tc, None, diag, float(diag.sum()), 0.0))
    a, b = stats
    scale = _unbiased_scale(n)
    return (
        scale * _hsic_from_inner(_inner(a, b), a, b, True, n),
        scale * _hsic_from_inner(_inner(a, a), a, a, True, n),
        scale * _hsic_from_inner(_inner(b, b), b, b, True, n),
    )


def minibatch_cka(
    batches: Iterable[tuple[ArrayLike, ArrayLike]],
    *,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> MinibatchCKAResult:
    """Linear CKA accumulated over minibatches, for data that does not fit in memory (Nguyen et al. 2021).

    For each chunk ``i`` of ``n_i`` samples the unbiased HSIC estimator of Song et al. (2012) gives
    ``h_xy(i)``, ``h_xx(i)`` and ``h_yy(i)``; the result is
    ``sum_i n_i h_xy(i) / sqrt(sum_i n_i h_xx(i) * sum_i n_i h_yy(i))``. Each chunk's estimate is unbiased,
    so the weighted means are unbiased for the population HSIC and the value agrees with full-data
    debiased :func:`linear_cka` within sampling noise (it is not identical: pairs of samples in
    different batches are not compared). Range [-1, 1], near 0 for independent representations.

    Every batch is used, including a short last one. The estimator needs 4 samples per chunk, so a
    batch with fewer than 4 samples is merged into its neighbour (the previous batch, or the next when
    it is first).

    Args:
        batches: iterable of ``(x_batch, y_batch)`` pairs, ``x_batch: (batch_size, n_features_x)`` and
            ``y_batch: (batch_size, n_features_y)`` describing the same samples; widths must stay the same
            across batches. Batch sizes may vary. Larger batches give less noisy estimates.
        device: where to compute (``None``: cuda > mps > cpu); float64 accumulation.
        progress: optional callable ``(batches_done, total)``; ``total`` is ``len(batches)`` when the
            iterable has a length, else 0.

    Returns:
        A :class:`MinibatchCKAResult`.
    """
    func = "minibatch_cka"
    check_progress(progress, func=func)
    start = time.perf_counter()
    dev = _compute_device(device)
    total = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    sums = np.zeros(3)
    sizes: list[int] = []
    widths: tuple[int, int] | None = None
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    scales: list[float | None] = [None, None]  # the largest chunk's so far: the sums are rescaled when it grows

    def flush(xb: torch.Tensor, yb: torch.Tensor) -> None:
        scales[0], fx = _rescale_factor(xb, scales[0])
        scales[1], fy = _rescale_factor(yb, scales[1])
        sums[:] *= (fx * fx * fy * fy, fx**4, fy**4)  # HSIC is of degree 2 in each kernel's features
        sums[:] += xb.shape[0] * np.asarray(_unbiased_hsic_triplet(xb, yb, (scales[0], scales[1])))
        sizes.append(int(xb.shape[0]))

    n_batches = 0
    try:
        iterator = iter(batches)
    except TypeError:
        raise ParameterError(
            f"The 'batches' parameter of {func} must be an iterable of (x_batch, y_batch) pairs. Got {type(batches).__name__}."
        ) from None
    for item in iterator:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(
                f"{func}: batch {n_batches} must be a pair (x_batch, y_batch). Got {type(item).__name__}"
                f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}."
            )
        xb = as_matrix(item[0], f"x (batch {n_batches})", func=func, device=dev, min_samples=1)
        yb = as_matrix(item[1], f"y (batch {n_batches})", func=func, device=dev, min_samples=1)
        check_paired(xb, yb, (f"x (batch {n_batches})", f"y (batch {n_batches})"), func=func)
        if widths is None:
            widths = (xb.shape[1], yb.shape[1])
        elif (xb.shape[1], yb.shape[1]) != widths:
            raise DataError(
                f"{func}: batch {n_batches} has widths ({xb.shape[1]}, {yb.shape[1]}) but the first batch had {widths}; "
                "every batch must come from the same two layers."
            )
        n_batches += 1
        if pending is None:
            pending = (xb, yb)
        elif xb.shape[0] < 4 or pending[0].shape[0] < 4:
            pending = (torch.cat([pending[0], xb]), torch.cat([pending[1], yb]))
        else:
            flush(*pending)
            pending = (xb, yb)
        if progress is not None:
            progress(n_batches, total)
    if pending is None:
        raise DataError(f"{func}: no batches were given; pass an iterable of (x_batch, y_batch) pairs.")
    n_samples = sum(sizes) + int(pending[0].shape[0])
    if pending[0].shape[0] < 4:
        raise DataError(
            f"{func} needs at least 4 samples in total (the unbiased HSIC estimator divides by n - 3). Got {n_samples}."
        )
    flush(*pending)
    s_xy, s_xx, s_yy = sums.tolist()
    for s, name in ((s_xx, "x"), (s_yy, "y")):
        if s <= 0.0:
            raise DataError(
                f"{func}: the accumulated debiased HSIC of '{name}' with itself is not positive ({s:.3g}), so CKA is "
                "undefined; the layer may be constant, or the batches too small: use larger batches."
            )
    value = _bounded(s_xy / math.sqrt(s_xx * s_yy), -1.0, 1.0, func)
    return MinibatchCKAResult(
        value=value,
        n_batches=n_batches,
        batch_sizes=np.asarray(sizes, dtype=np.int64),
        estimator="linear CKA, minibatch unbiased HSIC (Nguyen et al. 2021), batches weighted by size",
        n_samples=n_samples,
        params={},
        seed=None,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Procrustes


def _procrustes_prep(x: torch.Tensor, name: str, func: str) -> torch.Tensor:
    """Centred, unit-Frobenius-norm data with at most n columns and the same Gram matrix."""
    xc = _centre(x, name, func)
    xc = xc / torch.linalg.matrix_norm(xc)
    n, d = xc.shape
    if d > n:  # X = R^T Q^T with Q orthonormal: R^T keeps every inner product between samples
        xc = torch.linalg.qr(xc.T, mode="r").R.T
    return xc


def _procrustes_from_prep(a: torch.Tensor, b: torch.Tensor, angular: bool, func: str) -> float:
    nuclear = _bounded(float(torch.linalg.svdvals(a.T @ b).sum()), 0.0, 1.0, func)
    if angular:
        return math.acos(nuclear)
    return math.sqrt(max(0.0, 2.0 - 2.0 * nuclear))


def procrustes_distance(
    x: ArrayLike, y: ArrayLike, *, angular: bool = False, device: str | torch.device | None = None
) -> float:
    """Orthogonal Procrustes distance between two representations of the same samples.

    Convention: both are centred (column means removed) and scaled to unit Frobenius norm; the narrower
    one is zero-padded to the wider width. Then
    ``d(X, Y) = min_Q ||X - Y Q||_F = sqrt(2 - 2 ||X^T Y||_*)`` over orthogonal ``Q``, where ``||.||_*``
    is the nuclear norm (sum of singular values). Range [0, sqrt(2)]; 0 when ``y`` is a rotation,
    reflection, isotropic scaling or translation of ``x``.

    The angular variant (``angular=True``, Williams et al. 2021) is ``arccos(||X^T Y||_*)``, in
    [0, pi/2]; it is a metric on the shapes of representations. Both take a square root (or arccos) of
    ``1 - ||X^T Y||_*``, so identical shapes give values of about 1e-8, the float64 rounding floor.

    Args:
        x: ``(n_samples, n_features_x)`` activations.
        y: ``(n_samples, n_features_y)`` activations of the same samples.
        angular: return the angle instead of the Euclidean distance.
        device: where to compute (``None``: cuda > mps > cpu); float64 throughout.

    Returns:
        The distance as a Python float (lower is closer).
    """
    func = "procrustes_distance"
    angular = check_bool(angular, "angular", func=func)
    xt, yt, _ = _pair_inputs(x, y, func, device)
    return _procrustes_from_prep(_procrustes_prep(xt, "x", func), _procrustes_prep(yt, "y", func), angular, func)


# ---------------------------------------------------------------------------------------------
# CCA


@dataclass(frozen=True)
class _CCABasis:
    basis: torch.Tensor  # (n, r) orthonormal basis of the kept subspace of the centred data
    centred: torch.Tensor | None  # (n, d) centred data (neurons as columns), for PWCCA weights; None otherwise
    copies: torch.Tensor | None = None  # (n,) which distinct row each sample is; None when every row is distinct


def _distinct_samples(a: _CCABasis, b: _CCABasis) -> int:
    """How many samples differ in one of the two layers: repeated samples span no dimension of their own."""
    n = a.basis.shape[0]
    if a.copies is None or b.copies is None:
        return n
    return int(torch.unique(a.copies * (int(b.copies.max()) + 1) + b.copies).numel())


def _input_eps(x: ArrayLike) -> float:
    """Machine epsilon of the precision ``x`` was computed in (float32 activations carry float32 rounding
    noise even after the float64 copy); float64's for float64, integer and other input. A float64 array whose every
    value is a float32 number (float32 activations cast to float64, a common step) counts as float32: its rounding
    noise is float32's, and float64's epsilon would count that noise as directions of its own."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point and dtype.itemsize < 8:
            return torch.finfo(dtype).eps
        if dtype == torch.float64 and x.numel() and bool((x.float().double() == x).all()):
            return torch.finfo(torch.float32).eps
        return torch.finfo(torch.float64).eps
    if dtype is not None and np.issubdtype(dtype, np.floating) and np.dtype(dtype).itemsize < 8:
        return float(np.finfo(dtype).eps)
    if dtype == np.float64:
        try:
            values = np.asarray(x, dtype=np.float64)
            with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf there, and is not a float32 number
                as_float32 = values.astype(np.float32)
            if values.size and np.array_equal(as_float32, values):
                return float(np.finfo(np.float32).eps)
        except (ValueError, TypeError):  # not an array of numbers: its own checks name the problem
            pass
    return float(np.finfo(np.float64).eps)


def _cca_prep(x: torch.Tensor, name: str, func: str, kind: str, variance: float, eps: float) -> _CCABasis:
    """The kept subspace of the centred ``x``: the directions above the rounding level of the input's precision
    ``eps`` (below it, CCA would weigh rounding noise like signal), then for SVCCA the top singular directions
    within it that explain ``variance`` of the variance.

    Rounding is relative to each stored value, so the rank is decided with every centred feature scaled to
    unit norm (the canonical correlations ignore each feature's scale): a feature of small scale keeps its
    directions however large the others are. A feature whose variation is within the rounding of its own
    values (``||x_j - mean|| <= eps sqrt(n) max|x_j|``) carries none and is left out of that decision."""
    scale = unit_scale(x)
    xc = _centre(x, name, func, scale=scale)
    n, d = xc.shape
    peak = xc.abs().amax(0)
    unit = xc / torch.where(peak > 0, peak, 1.0)  # entries in [-1, 1]: the norms below neither overflow nor underflow
    norms = torch.linalg.vector_norm(unit, dim=0)
    signal = peak * norms > eps * math.sqrt(n) * (x.abs().amax(0) * scale)
    unit = torch.where(signal, unit / torch.where(norms > 0, norms, 1.0), 0.0)
    if not bool(signal.any()):
        raise DataError(
            f"{func}: every feature of '{name}' varies only within the rounding of its values, so CCA is undefined; "
            "pick another layer or check that the model is not dead on this dataset."
        )
    u, s, _ = torch.linalg.svd(unit, full_matrices=False)
    rank = int((s > float(s.max()) * max(n, d) * eps).sum())
    basis = u[:, :rank]
    if kind == "svcca":
        p, s, _ = torch.linalg.svd(basis.T @ xc, full_matrices=False)  # the centred data's directions within it
        energy = torch.cumsum(s**2, 0)
        energy = energy / energy[-1]
        rank = min(
            rank, int(torch.searchsorted(energy, torch.tensor(variance, dtype=energy.dtype, device=energy.device))) + 1
        )
        basis = basis @ p[:, :rank]
    elif rank < u.shape[1]:
        basis = basis.clone()  # not a view that keeps all of u
    _, copies = torch.unique(x, dim=0, return_inverse=True)
    return _CCABasis(basis, xc if kind == "pwcca" else None, copies if int(copies.max()) + 1 < n else None)


class UndefinedPairError(DataError):
    """CCA of two layers that together span more dimensions than the samples leave after centring."""


def _undefined_pairs_note(estimator: str, pairs: Sequence[tuple[str, str]], n_pairs: int, n: int, kind: str) -> str:
    """``estimator`` with the sentence that names the undefined (NaN) CCA cells of a matrix."""
    return (f"{estimator}; n/a (NaN) for {len(pairs)} of {n_pairs} pairs of layers that together span more dimensions "
            f"than the {n} samples leave after centring (n - 1 for n distinct samples), where some canonical correlations are 1 "
            f"whatever the data (first: "
            f"{pairs[0][0]} and {pairs[0][1]}); " + ("keep less variance for them" if kind == "svcca" else "use the SVCCA summary (kind='svcca') for them"))


def _cca_from_prep(a: _CCABasis, b: _CCABasis, kind: str, names: tuple[str, str], func: str) -> float:
    n = _distinct_samples(a, b)
    ra, rb = a.basis.shape[1], b.basis.shape[1]
    if ra + rb > n - 1:
        what = f"{n} samples" if n == a.basis.shape[0] else f"{n} distinct samples (of {a.basis.shape[0]}; the rest repeat them)"
        raise UndefinedPairError(
            f"{func}: '{names[0]}' and '{names[1]}' span {ra} + {rb} dimensions but {what} leave only {n - 1} after "
            "centring, so some canonical correlations are 1 whatever the data; "
            + ("keep less variance (a lower 'variance'), " if kind == "svcca" else "use the SVCCA summary (kind='svcca'), ")
            + "narrower layers, or more samples."
        )
    p, rho, qh = torch.linalg.svd(a.basis.T @ b.basis, full_matrices=False)
    _bounded(float(rho.sum()), 0.0, math.inf, func)
    rho = rho.clamp(0.0, 1.0)
    if kind != "pwcca":
        return float(rho.mean())
    # Morcos et al. 2018: weight each canonical correlation by how much of the neurons of the side with
    # fewer dimensions its canonical variate accounts for.
    if ra <= rb:
        variates, neurons = a.basis @ p, a.centred
    else:
        variates, neurons = b.basis @ qh.T, b.centred
    if neurons is None:
        raise RuntimeError("PWCCA needs the centred data")  # internal invariant, not user input
    weights = (variates.T @ neurons).abs().sum(1)
    weights = weights / weights.sum()
    return float((weights * rho).sum())


def cca_similarity(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kind: str = "svcca",
    variance: float = 0.99,
    device: str | torch.device | None = None,
) -> float:
    """Canonical correlation similarity: SVCCA, PWCCA or the mean canonical correlation.

    The canonical correlations ``rho_1 >= rho_2 >= ... >= 0`` are the cosines of the principal angles
    between the column spaces of the centred ``x`` and ``y`` (invariant to any invertible linear map
    of either). The summaries:

    * ``"svcca"`` (Raghu et al. 2017): keep the top singular directions of each representation that
      explain ``variance`` of its variance, then average the canonical correlations.
    * ``"pwcca"`` (Morcos et al. 2018): weighted mean of the canonical correlations, each weighted by how
      much of the neurons of the representation with fewer dimensions its canonical variate accounts for
      (``sum_j |<h_i, x_j>|``). Not symmetric when both sides have the same rank (``x`` gives the weights).
    * ``"mean"``: plain mean of all canonical correlations, ``rho_bar`` (Raghu et al.'s mean CCA; not Yanai's
      generalised coefficient ``sum rho_i^2 / sqrt(r_x r_y)``, Kornblith et al.'s ``R^2_CCA``, which weighs large
      correlations more).

    Range [0, 1]. CCA needs more samples than dimensions: when the kept dimensions of ``x`` and ``y``
    together exceed ``n_samples - 1``, some correlations are 1 for any data and a DataError is raised.

    Args:
        x: ``(n_samples, n_features_x)`` activations.
        y: ``(n_samples, n_features_y)`` activations of the same samples.
        kind: ``"svcca"``, ``"pwcca"`` or ``"mean"``.
        variance: for ``"svcca"``, the fraction of variance the kept directions explain, in (0, 1];
            0.99 as in Raghu et al. Lower values compare only the dominant directions.
        device: where to compute (``None``: cuda > mps > cpu); float64 throughout.

    Returns:
        The similarity as a Python float.
    """
    func = "cca_similarity"
    kind = check_choice(kind, "kind", CCA_KINDS, func=func)
    variance = check_float(variance, "variance", func=func, low=0.0, high=1.0, low_inclusive=False)
    _check_variance_applies(kind, variance, func)
    xt, yt, _ = _pair_inputs(x, y, func, device, min_samples=3)
    a = _cca_prep(xt, "x", func, kind, variance, _input_eps(x))
    b = _cca_prep(yt, "y", func, kind, variance, _input_eps(y))
    return _cca_from_prep(a, b, kind, ("x", "y"), func)


# ---------------------------------------------------------------------------------------------
# RSA


def _rsa_prep(x: torch.Tensor, name: str, func: str, rdm: str, compare: str) -> torch.Tensor:
    """The upper triangle of the RDM, ranked for Spearman, centred and scaled to unit norm.

    Both RDMs come from :func:`squared_distances` (the correlation distance of unit-norm, row-centred
    patterns is half their squared Euclidean distance), so identical samples are exactly 0 apart, and
    the ranking treats distances equal up to rounding as ties: Spearman RSA is then exactly invariant to
    the changes listed in the module docstring, also when distances tie (binary or quantised data)."""
    if rdm == "correlation":
        if bool((x == x[:1]).all()):
            _centre(x[:2], name, func)  # raises: every feature is constant over samples
        if x.shape[1] < 2:
            raise DataError(
                f"{func}: the correlation RDM needs at least 2 features per sample (a correlation across one feature is "
                f"0/0), but '{name}' has {x.shape[1]}; use rdm='euclidean'."
            )
        z = x * unit_scale(x)
        z.sub_(z.mean(1, keepdim=True))
        norms = torch.linalg.vector_norm(z, dim=1)
        flat = int((norms == 0).sum())
        if flat:
            raise DataError(
                f"{func}: '{name}' has {flat} sample{'s' if flat != 1 else ''} whose features are all equal (e.g. an all-zero activation vector), "
                "so their correlation distance is undefined; use rdm='euclidean'."
            )
        v = condensed_distances(z.div_(norms[:, None])).mul_(0.5)
    else:
        z = _centre(x, name, func)  # scaled into range whatever the data's scale (RSA is scale-free)
        v = condensed_distances(z, squared=False)  # centred: small norms, so few pairs need recomputing
    del z
    if compare == "spearman":
        v = average_ranks(v, out=v)
    v.sub_(v.mean())
    norm = float(torch.linalg.vector_norm(v))
    if norm == 0.0:
        raise DataError(
            f"{func}: every pairwise dissimilarity of '{name}' is the same, so its correlation with another RDM is "
            "undefined; use rdm='euclidean' or another layer."
        )
    return v.div_(norm)


def rsa(
    x: ArrayLike,
    y: ArrayLike,
    *,
    rdm: str = "correlation",
    compare: str = "spearman",
    device: str | torch.device | None = None,
) -> float:
    """Representational similarity analysis (Kriegeskorte et al. 2008).

    Each representation gives a representational dissimilarity matrix (RDM) over the samples:
    ``rdm="correlation"``: ``1 - Pearson correlation`` between the feature vectors of two samples;
    ``rdm="euclidean"``: their Euclidean distance. The score is the correlation (``compare="spearman"``,
    rank-based, or ``"pearson"``) between the upper triangles of the two RDMs.

    Range [-1, 1]; 1 when the RDMs agree (in order, for Spearman). Needs ``n_samples^2 / 2`` memory.

    Args:
        x: ``(n_samples, n_features_x)`` activations (correlation RDM: at least 2 features).
        y: ``(n_samples, n_features_y)`` activations of the same samples.
        rdm: ``"correlation"`` (insensitive to a sample's overall offset and scale) or ``"euclidean"``.
        compare: ``"spearman"`` (only the order of dissimilarities matters) or ``"pearson"``.
        device: where to compute (``None``: cuda > mps > cpu); float64 throughout.

    Returns:
        The RSA correlation as a Python float.
    """
    func = "rsa"
    rdm = check_choice(rdm, "rdm", RDM_KINDS, func=func)
    compare = check_choice(compare, "compare", RDM_COMPARISONS, func=func)
    xt, yt, _ = _pair_inputs(x, y, func, device, min_samples=3)
    a = _rsa_prep(xt, "x", func, rdm, compare)
    b = _rsa_prep(yt, "y", func, rdm, compare)
    return _bounded(float(torch.dot(a, b)), -1.0, 1.0, func)


# ---------------------------------------------------------------------------------------------
# all layer pairs


@dataclass(frozen=True)
class _MeasureSpec:
    params: dict[str, Any]
    estimator: str
    higher_is_closer: bool
    min_samples: int


def _measure_spec(
    measure: str, debiased: bool, sigma: float, angular: bool, kind: str, variance: float, rdm: str, compare: str
) -> _MeasureSpec:
    bias = "debiased HSIC (Song et al. 2012)" if debiased else "biased HSIC"
    if measure == "linear_cka":
        return _MeasureSpec({"debiased": debiased}, f"linear CKA, {bias}", True, 4 if debiased else 3)
    if measure == "rbf_cka":
        return _MeasureSpec(
            {"sigma": sigma, "debiased": debiased},
            f"RBF CKA (sigma = {sigma:g} x median distance), {bias}",
            True,
            4 if debiased else 3,
        )
    if measure == "procrustes_distance":
        label = "angular Procrustes distance (arccos of nuclear norm)" if angular else "orthogonal Procrustes distance"
        return _MeasureSpec({"angular": angular}, f"{label}, centred, unit Frobenius norm", False, 3)
    if measure == "cca_similarity":
        labels = {
            "svcca": f"SVCCA ({variance:g} of variance kept), mean canonical correlation",
            "pwcca": "PWCCA (Morcos et al. 2018), projection-weighted canonical correlation",
            "mean": "mean canonical correlation",
        }
        params: dict[str, Any] = {"kind": kind}
        if kind == "svcca":
            params["variance"] = variance
        return _MeasureSpec(params, labels[kind], True, 3)
    return _MeasureSpec(
        {"rdm": rdm, "compare": compare}, f"RSA, {rdm}-distance RDM, {compare.capitalize()} correlation", True, 3
    )


def _layer_tensors(
    acts: Mapping[str, ArrayLike], layers: Sequence[str] | None, arg: str, func: str
) -> list[tuple[str, ArrayLike]]:
    if not isinstance(acts, Mapping):
        raise DataError(
            f"{func}: '{arg}' must be Activations or a dict of layer name -> (n_samples, n_features) array. "
            f"Got {type(acts).__name__}."
        )
    if len(acts) == 0:
        raise DataError(f"{func}: '{arg}' holds no layers; extract at least one layer.")
    available = list(acts)
    if layers is None:
        names = available
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ParameterError(
                f"The 'layers' selection of {func} for '{arg}' must be a non-empty list of layer names or None. Got {layers!r}."
            )
        names = list(layers)
        for name in names:
            if name not in acts:
                raise UnknownLayerError(
                    f"Unknown layer '{name}' in '{arg}'.{did_you_mean(str(name), available)} Layers: {format_choices(available)}."
                )
    return [(name, acts[name]) for name in names]


def _model_name(acts: Any, default: str) -> str:
    name = getattr(acts, "model_name", "") if isinstance(acts, Activations) else ""
    return name or default


def _chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges covering all ``n`` samples; a last range shorter than 4 is merged into the one before."""
    bounds = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 4:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _stream_layout(
    raw_a: list[tuple[str, ArrayLike]], raw_b: list[tuple[str, ArrayLike]], symmetric: bool, names_a: list[str],
    names_b: list[str],
) -> tuple[list[tuple[str, ArrayLike]], list[str], int, int, list[int]]:
    """The layers a streamed matrix reads (A's, then B's unless B is A), their labels, the sample count, the number
    of A's layers and the positions of B's layers among them."""
    layers = raw_a if symmetric else raw_a + raw_b
    labels = names_a if symmetric else names_a + names_b
    idx_b = list(range(len(raw_a))) if symmetric else list(range(len(raw_a), len(layers)))
    return layers, labels, int(np.shape(layers[0][1])[0]), len(raw_a), idx_b


def _minibatch_stream_bytes(widths: Sequence[int]) -> tuple[int, int]:
    """Memory of :func:`_streaming_linear_cka` over layers of these widths: what it holds whatever the chunk size (one
    pair's cross product, at most the widest layer's with itself, and the alignment of the workspace), and what each
    row of a chunk adds (every layer's centred features, one layer's squares, and two copies of one layer's rows as
    they are read: a layer read in a shuffled order is gathered, then put back in order)."""
    widest = max(widths)
    return 8 * widest * widest + 64 * (len(widths) + 2), 8 * (sum(widths) + 3 * widest)


def _streaming_linear_cka(
    raw_a: list[tuple[str, ArrayLike]],
    raw_b: list[tuple[str, ArrayLike]],
    symmetric: bool,
    dev: torch.device,
    chunk: int,
    names_a: list[str],
    names_b: list[str],
    func: str,
    progress: Progress | None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Minibatch linear CKA of every layer pair in one pass over row chunks (Nguyen et al. 2021), the chunk sizes, and
    the layers (indices into A's layers, then B's) that are constant over all samples, whose pairs are NaN.

    Per chunk, each layer is centred once; every pair's unbiased HSIC is accumulated weighted by the
    chunk size, as in :func:`minibatch_cka`. Its memory is :func:`_minibatch_stream_bytes`.
    """
    layers, labels, n, n_a, idx_b = _stream_layout(raw_a, raw_b, symmetric, names_a, names_b)
    widths = [int(np.shape(t)[1]) for _, t in layers]
    cross = np.zeros((n_a, len(idx_b)))
    self_terms = np.zeros(len(layers))
    bounds = _chunk_bounds(n, chunk)
    scales: list[float | None] = [None] * len(layers)  # one power of two per layer, the same for all its chunks so far
    first_rows: list[torch.Tensor | None] = [None] * len(layers)  # each layer's first sample, as read
    varies = [False] * len(layers)  # whether a sample so far differs from it (chunks are centred on their own)
    # One workspace, made once (as in _exact_streaming_linear_cka): every layer's centred chunk, each contiguous and
    # 64-byte aligned as a tensor of its own would be (the products below are those of separate tensors, bit for bit),
    # one layer's squares, and one pair's d_a x d_b cross product. Nothing of a chunk's or a pair's size is allocated
    # per chunk or per pair.
    most = max(hi - lo for lo, hi in bounds)
    widest = max(widths)
    _, views = _workspace([(most * w,) for w in widths] + [(most * widest,), (widest * widest,)], 0, dev)
    features, squares, product = views[: len(layers)], views[-2], views[-1]

    def chunk_hsic(a: _KernelStats, b: _KernelStats, m: int) -> float:
        """Song et al.'s unbiased HSIC of one chunk of ``m`` samples, times ``m`` (the chunk's weight); the cross
        product ``a^T b`` whose squared norm is ``<K_a, K_b>`` is written into the workspace."""
        if a.features is None or b.features is None:
            raise RuntimeError("streamed kernel statistics without features")  # internal invariant, not user input
        cross_product = product[: a.features.shape[1] * b.features.shape[1]].view(a.features.shape[1], -1)
        inner = float(torch.linalg.matrix_norm(torch.mm(a.features.T, b.features, out=cross_product)) ** 2)
        return m * _unbiased_scale(m) * _hsic_from_inner(inner, a, b, True, m)

    for step, (lo, hi) in enumerate(bounds, start=1):
        m = hi - lo
        stats = []
        factors = np.ones(len(layers))
        for i, ((_, t), label) in enumerate(zip(layers, labels)):
            xc = features[i][: m * widths[i]].view(m, widths[i])
            _read_chunk(t[lo:hi], xc, label, func)
            if first_rows[i] is None:
                first_rows[i] = xc[:1].clone()
            varies[i] = varies[i] or bool((xc != first_rows[i]).any())
            scales[i], factors[i] = _rescale_factor(xc, scales[i])
            _centre(xc, scale=scales[i], in_place=True)
            diag = torch.mul(xc, xc, out=squares[: xc.numel()].view(xc.shape)).sum(1)
            stats.append(_KernelStats(xc, None, diag, float(diag.sum()), 0.0))
        squared = factors * factors  # HSIC is of degree 2 in each kernel's features
        self_terms *= squared * squared
        cross *= np.outer(squared[:n_a], squared[idx_b])
        for i, st in enumerate(stats):
            self_terms[i] += chunk_hsic(st, st, m)
        for i in range(n_a):
            for j, jb in enumerate(idx_b):
                cross[i, j] += chunk_hsic(stats[i], stats[jb], m)
        del stats
        if progress is not None:
            progress(step, len(bounds))
    constant = [i for i, v in enumerate(varies) if not v]
    for i, total in enumerate(self_terms):
        if total <= 0.0 and varies[i]:
            raise DataError(
                f"{func}: the accumulated debiased HSIC of '{labels[i]}' with itself is not positive ({total:.3g}), so CKA "
                "is undefined; use larger batches (a higher memory_limit_mb) or more samples."
            )
    self_terms[constant] = np.nan
    with np.errstate(invalid="ignore"):
        values = cross / np.sqrt(np.outer(self_terms[:n_a], self_terms[idx_b]))
    rows, cols = np.isnan(self_terms[:n_a]), np.isnan(self_terms[idx_b])
    defined = values[~rows][:, ~cols]
    if not np.isfinite(defined).all():
        _bounded(float(defined[~np.isfinite(defined)][0]), -1.0, 1.0, func)
    return np.clip(values, -1.0, 1.0), [hi - lo for lo, hi in bounds], constant


def _streamed_matrix_bytes(widths_a: Sequence[int], widths_b: Sequence[int], symmetric: bool) -> int:
    """Memory of the cross products that :func:`_exact_streaming_linear_cka` accumulates."""
    selfs = 0 if symmetric else sum(w * w for w in list(widths_a) + list(widths_b))
    return 8 * (sum(widths_a) * sum(widths_b) + selfs)


def _exact_streaming_linear_cka(
    raw_a: list[tuple[str, ArrayLike]],
    raw_b: list[tuple[str, ArrayLike]],
    symmetric: bool,
    debiased: bool,
    dev: torch.device,
    chunk: int,
    names_a: list[str],
    names_b: list[str],
    func: str,
    progress: Progress | None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Linear CKA (biased or debiased) of every layer pair from sums over row chunks: the same value as in memory; the
    chunk sizes; and the layers (indices into A's layers, then B's) constant over samples, whose pairs are NaN.

    CKA is unchanged by shifting a layer's features by a constant vector and scaling them by a number,
    so each layer is shifted by its first sample (exactly constant features become exactly 0, and the
    sums below do not cancel catastrophically) and scaled by a power of two, before the shift (so that
    it cannot overflow): the :func:`unit_scale` of the largest chunk so far, the sums of earlier chunks
    being rescaled to it when a later chunk is larger. Per chunk the shifted
    features ``Z`` add ``Z_a^T Z_b``, their column sums ``s``, and with the squared row norms ``q`` of
    each layer ``q^T Z`` and ``q^T q``. At the end, with ``zbar = s / n``, the centred cross product is
    ``Z_a^T Z_b - n zbar_a zbar_b^T`` (its squared Frobenius norm is ``<K_a, K_b>``), and
    ``||z_i - zbar||^2 = q_i - 2 z_i.zbar + |zbar|^2`` expands ``diag(K_a).diag(K_b)`` and the traces
    the unbiased estimator needs into the same sums.
    """
    layers, labels, n, n_a, idx_b = _stream_layout(raw_a, raw_b, symmetric, names_a, names_b)
    edges = np.cumsum([0] + [int(np.shape(t)[1]) for _, t in layers])
    cols = [slice(int(start), int(stop)) for start, stop in zip(edges[:-1], edges[1:])]
    shifts: list[torch.Tensor] = []
    scales: list[float | None] = [None] * len(layers)
    cross = selfs = q_z = q_q = col_sums = None
    bounds = _chunk_bounds(n, chunk)
    # One workspace, made once, holds the chunk being added (the shifted features of all layers side by side, one
    # layer's squares, the squared row norms) and after the stream one pair's centred cross product: nothing of a
    # chunk's or a pair's size is allocated after it, so blocks that the allocator keeps back once they are freed
    # (those under 32 MiB) cannot pile up on top of the memory limit.
    most = max(hi - lo for lo, hi in bounds)
    widest = max(c.stop - c.start for c in cols)
    workspace, (z_buffer, squares, q_buffer) = _workspace(
        [(most, int(edges[-1])), (most * widest,), (most, len(layers))], widest * widest, dev
    )
    for step, (lo, hi) in enumerate(bounds, start=1):
        z_all, q = z_buffer[: hi - lo], q_buffer[: hi - lo]
        factors = [1.0] * len(layers)
        for i, ((_, t), label) in enumerate(zip(layers, labels)):
            block = z_all[:, cols[i]]
            _read_chunk(t[lo:hi], block, label, func)
            scales[i], factors[i] = _rescale_factor(block, scales[i])
            if len(shifts) == i:
                shifts.append(block[:1].clone())
            block.mul_(scales[i]).sub_(shifts[i] * scales[i])
            q[:, i] = torch.mul(block, block, out=squares[: block.numel()].view(block.shape)).sum(1)
        if cross is not None and min(factors) < 1.0:  # a larger chunk: bring the earlier sums to its scale
            per_col = torch.cat([torch.full((c.stop - c.start,), f, dtype=cross.dtype, device=dev)
                                 for c, f in zip(cols, factors)])
            per_layer = torch.tensor(factors, dtype=cross.dtype, device=dev).square_()
            # in place, row factors then column factors: no d_a x d_b temporary (powers of two, so exact)
            cross.mul_(per_col[: cols[n_a - 1].stop, None]).mul_(per_col if symmetric else per_col[cols[n_a].start :])
            if selfs is not None:
                for acc, f in zip(selfs, factors):
                    acc *= f * f
            q_z *= torch.outer(per_layer, per_col)
            q_q *= torch.outer(per_layer, per_layer)
            col_sums *= per_col
        z_a = z_all[:, : cols[n_a - 1].stop]
        z_b = z_a if symmetric else z_all[:, cols[n_a].start :]
        if cross is None:
            cross = torch.zeros(z_a.shape[1], z_b.shape[1], dtype=z_all.dtype, device=dev)
            selfs = None if symmetric else [torch.zeros(c.stop - c.start, c.stop - c.start, dtype=z_all.dtype, device=dev)
                                            for c in cols]
            q_z = torch.zeros(len(layers), z_all.shape[1], dtype=z_all.dtype, device=dev)
            q_q = torch.zeros(len(layers), len(layers), dtype=z_all.dtype, device=dev)
            col_sums = torch.zeros(z_all.shape[1], dtype=z_all.dtype, device=dev)
        cross.addmm_(z_a.T, z_b)
        if selfs is not None:
            for acc, c in zip(selfs, cols):
                acc.addmm_(z_all[:, c].T, z_all[:, c])
        q_z.addmm_(q.T, z_all)
        q_q.addmm_(q.T, q)
        col_sums += z_all.sum(0)
        del z_all, z_a, z_b, q
        if progress is not None:
            progress(step, len(bounds))
    del z_buffer, squares, q_buffer

    zbar = [col_sums[c] / n for c in cols]
    offset_b = 0 if symmetric else cols[n_a].start

    def product(i: int, j: int) -> torch.Tensor:
        """Z_i^T Z_j (uncentred) for layer i of A (or any layer, i == j) and layer j."""
        if selfs is not None and i == j:
            return selfs[i]
        cj = cols[j]
        return cross[cols[i], cj.start - offset_b : cj.stop - offset_b]

    def terms(i: int, j: int) -> tuple[float, float]:
        """<K_i, K_j> and diag(K_i).diag(K_j) of the centred linear kernels."""
        s_ij = product(i, j)
        centred = torch.outer(zbar[i], zbar[j], out=workspace[: s_ij.numel()].view(s_ij.shape)).mul_(n)
        inner = float(torch.linalg.matrix_norm(torch.sub(s_ij, centred, out=centred)) ** 2)
        if not debiased:
            return inner, 0.0
        r_i, r_j = float(zbar[i] @ zbar[i]), float(zbar[j] @ zbar[j])
        sum_q_i, sum_q_j = float(product(i, i).trace()), float(product(j, j).trace())
        qi_uj = float(q_z[i, cols[j]] @ zbar[j])  # sum_k q_ik (z_jk . zbar_j)
        ui_qj = float(q_z[j, cols[i]] @ zbar[i])
        ui_uj = float(zbar[i] @ s_ij @ zbar[j])
        sum_u_i, sum_u_j = n * r_i, n * r_j
        diag_dot = (float(q_q[i, j]) - 2 * qi_uj + r_j * sum_q_i - 2 * ui_qj + 4 * ui_uj - 2 * r_j * sum_u_i
                    + r_i * sum_q_j - 2 * r_i * sum_u_j + n * r_i * r_j)
        return inner, diag_dot

    def trace(i: int) -> float:
        return float(product(i, i).trace()) - n * float(zbar[i] @ zbar[i])

    self_hsic: list[float] = []
    constant = []
    for i, label in enumerate(labels):
        inner, diag_dot = terms(i, i)
        value = _debiased_hsic(inner, diag_dot, trace(i), trace(i), n) if debiased else inner
        try:
            _check_self_hsic(inner, value, n, label, func)
        except ConstantDataError:  # shifted by its first sample, a constant layer is exactly 0
            constant.append(i)
            value = math.nan
        self_hsic.append(value)
    values = np.empty((n_a, len(idx_b)))
    for i in range(n_a):
        for col, j in enumerate(idx_b):
            if symmetric and col < i:
                values[i, col] = values[col, i]
                continue
            if math.isnan(self_hsic[i]) or math.isnan(self_hsic[j]):
                values[i, col] = np.nan
                continue
            inner, diag_dot = terms(i, j)
            hsic = _debiased_hsic(inner, diag_dot, trace(i), trace(j), n) if debiased else inner
            values[i, col] = _bounded(hsic / math.sqrt(self_hsic[i] * self_hsic[j]), -1.0 if debiased else 0.0, 1.0, func)
    return values, [hi - lo for lo, hi in bounds], constant


def similarity_matrix(
    acts_a: Activations | Mapping[str, ArrayLike],
    acts_b: Activations | Mapping[str, ArrayLike] | None = None,
    *,
    measure: str = "linear_cka",
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    debiased: bool = False,
    sigma: float = 0.8,
    angular: bool = False,
    kind: str = "svcca",
    variance: float = 0.99,
    rdm: str = "correlation",
    compare: str = "spearman",
    memory_limit_mb: float = 4096.0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> SimilarityMatrixResult:
    """Compare every layer of model A with every layer of model B (or of A itself).

    The per-layer work (centring, Gram matrices, bases, RDMs) is done once per layer, so the cost is one
    pass per layer plus one cheap step per pair, not a pass over the data for every pair. Linear CKA uses
    the feature-space form when it is cheaper than ``n x n`` Gram matrices (large ``n``) and the Gram
    form otherwise. When ``acts_b`` is omitted or is ``acts_a`` with the same layers, only one triangle
    is computed (the symmetric measures give a symmetric matrix with 1, or 0 for distances up to the rounding
    floor of :func:`procrustes_distance`, about 1e-7, on the diagonal).

    Args:
        acts_a: :class:`~workbench.activations.types.Activations` of model A, or a dict of layer name ->
            ``(n_samples, n_features)`` array.
        acts_b: the same for model B, on the same samples in the same order; ``None`` compares A with itself.
        measure: ``"linear_cka"``, ``"rbf_cka"``, ``"procrustes_distance"`` (lower is closer),
            ``"cca_similarity"`` or ``"rsa"``; see the single-pair functions of the same names.
        layers_a: layers of A to use, in order (default: all, in stored order).
        layers_b: layers of B to use (default: all).
        debiased: CKA measures only: use the unbiased HSIC estimator (needs 4 samples).
        sigma: ``rbf_cka`` only: bandwidth as a fraction of the median pairwise distance.
        angular: ``procrustes_distance`` only: return the angle ``arccos(||X^T Y||_*)``.
        kind: ``cca_similarity`` only: ``"svcca"``, ``"pwcca"`` or ``"mean"``.
        variance: ``cca_similarity`` with ``kind="svcca"`` only: variance fraction kept.
        rdm: ``rsa`` only: ``"correlation"`` or ``"euclidean"``.
        compare: ``rsa`` only: ``"spearman"`` or ``"pearson"``.
        memory_limit_mb: linear CKA only: when the layers' float64 copies would need more than this,
            the activations are streamed in chunks of samples (a memory-mapped :class:`Activations` is
            never loaded whole) and every pair's CKA, biased or debiased as asked, is computed exactly
            from feature cross products accumulated in one pass (the same value as in memory, to
            rounding). When those ``d_a x d_b`` products do not fit in the limit either, debiased CKA
            falls back to the minibatch estimate of :func:`minibatch_cka` (the result's ``estimator``
            and ``params["exact"]`` say so) and biased CKA raises, naming the limit it needs. Other
            measures need all samples at once.
        device: where to compute (``None``: cuda > mps > cpu); float64 throughout.
        progress: optional callable ``(steps_done, total_steps)`` over layers prepared and pairs compared.

    Returns:
        A :class:`SimilarityMatrixResult` with ``values`` of shape ``(n_layers_a, n_layers_b)``.
    """
    return _similarity_matrix(
        acts_a,
        acts_b,
        func="similarity_matrix",
        measure=measure,
        layers_a=layers_a,
        layers_b=layers_b,
        debiased=debiased,
        sigma=sigma,
        angular=angular,
        kind=kind,
        variance=variance,
        rdm=rdm,
        compare=compare,
        memory_limit_mb=memory_limit_mb,
        device=device,
        progress=progress,
    )


_OPTION_MEASURES = {"debiased": ("linear_cka", "rbf_cka"), "sigma": ("rbf_cka",), "angular": ("procrustes_distance",),
                    "kind": ("cca_similarity",), "variance": ("cca_similarity",), "rdm": ("rsa",), "compare": ("rsa",)}


def _check_variance_applies(kind: str, variance: float, func: str) -> None:
    """Refuse a ``variance`` away from its default with a CCA summary other than SVCCA, which keeps every direction."""
    default = inspect.signature(cca_similarity).parameters["variance"].default
    if kind != "svcca" and variance != default:
        raise ParameterError(f"{func}: 'variance' applies to kind 'svcca' only (the other summaries keep every direction), so "
                             f"kind {kind!r} would ignore variance={variance!r}; leave it out, or choose kind='svcca'.")


def _check_options_apply(measure: str, func: str, **options: Any) -> None:
    """Refuse an option set away from its default for a measure that does not use it (it would be silently ignored,
    and the result would look as if it had been computed with it)."""
    defaults = inspect.signature(similarity_matrix).parameters
    for name, value in options.items():
        if measure not in _OPTION_MEASURES[name] and value != defaults[name].default:
            uses = " or ".join(repr(m) for m in _OPTION_MEASURES[name])
            raise ParameterError(f"{func}: '{name}' applies to measure {uses} only, so measure {measure!r} would ignore "
                                 f"{name}={value!r}; leave it out, or choose measure={_OPTION_MEASURES[name][0]!r}.")


def _similarity_matrix(
    acts_a: Activations | Mapping[str, ArrayLike],
    acts_b: Activations | Mapping[str, ArrayLike] | None,
    *,
    func: str,
    measure: str,
    layers_a: Sequence[str] | None,
    layers_b: Sequence[str] | None,
    debiased: bool,
    sigma: float,
    angular: bool,
    kind: str,
    variance: float,
    rdm: str,
    compare: str,
    memory_limit_mb: float,
    device: str | torch.device | None,
    progress: Progress | None,
) -> SimilarityMatrixResult:
    """:func:`similarity_matrix`, its messages naming ``func``."""
    if acts_b is not None:
        check_same_dataset(acts_a, acts_b, func=func)
    start = time.perf_counter()
    measure = check_choice(measure, "measure", MEASURES, func=func)
    debiased = check_bool(debiased, "debiased", func=func)
    angular = check_bool(angular, "angular", func=func)
    sigma = check_float(sigma, "sigma", func=func, low=SIGMA_RANGE[0], high=SIGMA_RANGE[1])
    kind = check_choice(kind, "kind", CCA_KINDS, func=func)
    variance = check_float(variance, "variance", func=func, low=0.0, high=1.0, low_inclusive=False)
    rdm = check_choice(rdm, "rdm", RDM_KINDS, func=func)
    compare = check_choice(compare, "compare", RDM_COMPARISONS, func=func)
    check_progress(progress, func=func)
    _check_options_apply(measure, func, debiased=debiased, sigma=sigma, angular=angular, kind=kind, variance=variance,
                         rdm=rdm, compare=compare)
    if measure == "cca_similarity":
        _check_variance_applies(kind, variance, func)
    spec = _measure_spec(measure, debiased, sigma, angular, kind, variance, rdm, compare)

    same_model = acts_b is None or acts_b is acts_a
    raw_a = _layer_tensors(acts_a, layers_a, "acts_a", func)
    raw_b = _layer_tensors(acts_a if acts_b is None else acts_b, layers_b, "acts_b", func)
    symmetric = (
        same_model
        and [n for n, _ in raw_a] == [n for n, _ in raw_b]
        and not (measure == "cca_similarity" and kind == "pwcca")
    )
    dev = _compute_device(device)

    names_a = [f"acts_a['{name}']" for name, _ in raw_a]
    names_b = names_a if symmetric else [f"acts_b['{name}']" for name, _ in raw_b]
    items = list(zip(raw_a, names_a)) + ([] if symmetric else list(zip(raw_b, names_b)))
    # Shapes first (no copies), so that each layer can then be converted, prepared and dropped in turn.
    shapes = []
    for (_, t), label in items:
        shape = tuple(t.shape) if hasattr(t, "shape") else ()
        if len(shape) != 2:
            as_matrix(_rows(t), label, func=func, device=dev, min_samples=spec.min_samples)  # raises the precise error
            shape = tuple(np.shape(t))
        shapes.append((int(shape[0]), int(shape[1])))
    n = shapes[0][0]
    for (rows, _), (_, label) in zip(shapes, items):
        if rows != n:
            raise DataError(
                f"{func}: '{names_a[0]}' and '{label}' must have the same number of samples (rows). "
                f"Got {n} and {rows}; extract both on the same dataset."
            )
    widths_a = [w for _, w in shapes[: len(raw_a)]]
    widths_b = widths_a if symmetric else [w for _, w in shapes[len(raw_a) :]]
    if debiased and measure in ("linear_cka", "rbf_cka"):
        _check_debiased_n(n, func)
    n_prep = len(items)
    n_pairs = len(raw_a) * (len(raw_a) + 1) // 2 if symmetric else len(raw_a) * len(raw_b)
    total = n_prep + n_pairs
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if measure in ("rbf_cka", "rsa"):
        needed = _gram_only_bytes(measure, compare, n, [w for _, w in shapes], dev)
        if needed > _GRAM_ONLY_BYTES_LIMIT:
            raise DataError(
                f"{func}: {measure} on {n} samples and {n_prep} layers needs {needed / 2**30:.1f} GiB of n x n matrices, "
                f"above the {_GRAM_ONLY_BYTES_LIMIT / 2**30:.0f} GiB limit; use a random subset of the samples or linear_cka."
            )

    memory_limit_mb = check_float(memory_limit_mb, "memory_limit_mb", func=func, low=0.0, low_inclusive=False)
    gram_form = measure == "linear_cka" and _use_gram_form(n, widths_a, widths_b)
    copied = all(_converted(t, dev) for _, t in raw_a + raw_b)
    needed_mb = _linear_cka_bytes(n, widths_a, widths_b, symmetric, gram_form, copied) / 2**20
    if measure == "linear_cka" and needed_mb > memory_limit_mb:
        limit = memory_limit_mb * 2**20
        accumulated = _streamed_matrix_bytes(widths_a, widths_b, symmetric)
        # 3 float64 copies of a chunk's row: the exact stream's workspace takes two at most (the row, one layer's
        # squares), which leaves room for the buffers of the matrix products
        row_bytes = 8 * max(sum(w for _, w in shapes), 1) * 3
        pair_bytes = 8 * max(w for _, w in shapes) ** 2  # a pair's centred cross product, formed after the stream
        exact = accumulated + max(16 * row_bytes, pair_bytes) <= limit
        if not exact and not debiased:
            streamed_mb = (accumulated + max(16 * row_bytes, pair_bytes)) / 2**20
            raise_to = "that" if streamed_mb <= needed_mb else f"{needed_mb:.3g} (in memory)"
            raise DataError(
                f"{func}: the layers need {needed_mb:.3g} MiB in float64, above memory_limit_mb={memory_limit_mb:g}, and "
                f"streaming biased linear CKA exactly needs {streamed_mb:.3g} MiB of feature "
                f"cross products; raise memory_limit_mb to {raise_to}, compare fewer layers at a time, or pass debiased=True "
                "for the minibatch estimate of debiased CKA."
            )
        if exact:
            chunk = max(16, min(n, int((limit - accumulated) / row_bytes)))
        else:  # the minibatch stream's chunk fits next to its pair product, counting what each of its rows holds
            fixed, per_row = _minibatch_stream_bytes([w for _, w in shapes])
            chunk = max(64, min(n, int((limit - fixed) / per_row)))
        why = f"the layers need {needed_mb:.3g} MiB in float64, above the {memory_limit_mb:g} MiB limit"
        if exact:
            values, sizes, constant_idx = _exact_streaming_linear_cka(raw_a, raw_b, symmetric, debiased, dev, chunk,
                                                                      names_a, names_b, func, progress)
            estimator = (f"{spec.estimator}, exact, from cross products accumulated over {len(sizes)} chunks of "
                         f"<= {max(sizes)} samples: {why}")
        else:
            values, sizes, constant_idx = _streaming_linear_cka(raw_a, raw_b, symmetric, dev, chunk, names_a, names_b, func,
                                                                progress)
            estimator = (f"linear CKA, minibatch unbiased HSIC (Nguyen et al. 2021) streamed in {len(sizes)} chunks of "
                         f"<= {max(sizes)} samples, an estimate of debiased CKA: {why}, and the exact cross products "
                         f"({accumulated / 2**20:.3g} MiB) do not fit in it")
        params = {"debiased": debiased if exact else True, "streamed": True, "exact": exact,
                  "chunk_sizes": [int(c) for c in sizes], "memory_limit_mb": memory_limit_mb}
        names = [name for name, _ in raw_a] + ([] if symmetric else [name for name, _ in raw_b])
        dead_a = [names[i] for i in constant_idx if i < len(raw_a)]
        dead_b = [] if symmetric else [names[i] for i in constant_idx if i >= len(raw_a)]
        if len(dead_a) == len(raw_a) or (not symmetric and len(dead_b) == len(raw_b)):
            labels = names_a + ([] if symmetric else names_b)
            raise ConstantDataError(_constant_message(func, labels[constant_idx[0 if len(dead_a) == len(raw_a) else len(dead_a)]]))
        if dead_a or dead_b:
            estimator = _constant_layers_note(estimator, params, {"A": dead_a, "B": dead_b}, acts_a, acts_b)
        return SimilarityMatrixResult(
            values=values, layers_a=tuple(name for name, _ in raw_a), layers_b=tuple(name for name, _ in raw_b),
            n_features_a=np.asarray(widths_a, dtype=np.int64), n_features_b=np.asarray(widths_b, dtype=np.int64),
            measure=measure, higher_is_closer=True, model_a=_model_name(acts_a, "A"),
            model_b=_model_name(acts_a, "A") if acts_b is None else _model_name(acts_b, "B"),
            estimator=estimator, n_samples=n, params=params,
            seed=None, device=str(dev), dtype="float64", seconds=time.perf_counter() - start,
        )

    def prepare(x: torch.Tensor, name: str, eps: float, owned: bool) -> Any:
        if measure == "linear_cka":
            return _linear_stats(x, name, func, debiased, gram_form, owned)
        if measure == "rbf_cka":
            return _rbf_stats(x, name, func, sigma, debiased)
        if measure == "procrustes_distance":
            return _procrustes_prep(x, name, func)
        if measure == "cca_similarity":
            return _cca_prep(x, name, func, kind, variance, eps)
        return _rsa_prep(x, name, func, rdm, compare)

    def pair(a: Any, b: Any, name_a: str, name_b: str) -> float:
        if measure in ("linear_cka", "rbf_cka"):
            return _cka_from_stats(a, b, debiased, n, func)
        if measure == "procrustes_distance":
            return _procrustes_from_prep(a, b, angular, func)
        if measure == "cca_similarity":
            return _cca_from_prep(a, b, kind, (name_a, name_b), func)
        return _bounded(float(torch.dot(a, b)), -1.0, 1.0, func)

    prepared: list[Any] = []
    constant: list[ConstantDataError] = []  # layers with no variation: their rows or columns are n/a, not the matrix
    for (_, t), label in items:
        rows = _rows(t)
        x = as_matrix(rows, label, func=func, device=dev, min_samples=spec.min_samples)
        owned = _converted(rows, dev)
        del rows
        try:
            prepared.append(prepare(x, label, _input_eps(t), owned))
        except ConstantDataError as exc:
            prepared.append(None)
            constant.append(exc)
        del x
        step()
    prepared_a = prepared[: len(raw_a)]
    prepared_b = prepared_a if symmetric else prepared[len(raw_a) :]
    if all(p is None for p in prepared_a) or all(p is None for p in prepared_b):
        raise constant[0]  # nothing left to compare on one side

    values = np.empty((len(prepared_a), len(prepared_b)))
    undefined: list[tuple[int, int, UndefinedPairError]] = []  # CCA pairs spanning more dimensions than the samples allow
    for i, a in enumerate(prepared_a):
        for j, b in enumerate(prepared_b):
            if symmetric and j < i:
                values[i, j] = values[j, i]
                continue
            if a is None or b is None:
                values[i, j] = np.nan
                step()
                continue
            try:
                values[i, j] = pair(a, b, names_a[i], names_b[j])
            except UndefinedPairError as exc:
                values[i, j] = np.nan
                undefined.append((i, j, exc))
            step()
    estimator, params = spec.estimator, dict(spec.params)
    if measure == "cca_similarity":  # the directions each layer keeps (its rank above rounding, or SVCCA's cut)
        params["ranks_a"] = {name: int(p.basis.shape[1]) for (name, _), p in zip(raw_a, prepared_a) if p is not None}
        params["ranks_b"] = {name: int(p.basis.shape[1]) for (name, _), p in zip(raw_b, prepared_b) if p is not None}
    if constant:
        dead = {"A": [name for (name, _), p in zip(raw_a, prepared_a) if p is None],
                "B": [] if symmetric else [name for (name, _), p in zip(raw_b, prepared_b) if p is None]}
        estimator = _constant_layers_note(estimator, params, dead, acts_a, acts_b)
    if undefined:
        if len(undefined) == n_pairs:
            raise undefined[0][2]
        params["undefined_pairs"] = [(raw_a[i][0], raw_b[j][0]) for i, j, _ in undefined]  # one triangle when symmetric
        estimator = _undefined_pairs_note(estimator, params["undefined_pairs"], n_pairs, n, kind)

    return SimilarityMatrixResult(
        values=values,
        layers_a=tuple(name for name, _ in raw_a),
        layers_b=tuple(name for name, _ in raw_b),
        n_features_a=np.asarray(widths_a, dtype=np.int64),
        n_features_b=np.asarray(widths_b, dtype=np.int64),
        measure=measure,
        higher_is_closer=spec.higher_is_closer,
        model_a=_model_name(acts_a, "A"),
        model_b=_model_name(acts_a, "A") if acts_b is None else _model_name(acts_b, "B"),
        estimator=estimator,
        n_samples=n,
        params=params,
        seed=None,
        device=str(dev),
        dtype="float64",
        seconds=time.perf_counter() - start,
    )


class _ShuffledRows:
    """The rows of a 2-D array or tensor in the order ``order``, gathered only when read: whole for a measure
    that needs every sample at once, a range at a time when :func:`similarity_matrix` streams (so a
    memory-mapped layer is never loaded whole)."""

    def __init__(self, source: Any, order: np.ndarray):
        self.source = source.detach() if isinstance(source, torch.Tensor) else source
        self.order = order
        self.shape = tuple(source.shape)
        self.dtype = source.dtype

    def __getitem__(self, rows: slice) -> Any:
        wanted = self.order[rows]
        ascending = np.argsort(wanted, kind="stable")  # read the source in storage order, then reorder
        if isinstance(self.source, torch.Tensor):
            picked = self.source[torch.from_numpy(wanted[ascending]).to(self.source.device)]
            return picked[torch.from_numpy(np.argsort(ascending)).to(picked.device)]
        return np.asarray(self.source[wanted[ascending]])[np.argsort(ascending)]

    def whole(self) -> Any:
        return self[:]


def _rows(t: Any) -> Any:
    """A layer as :func:`as_matrix` reads it: the gathered rows of a :class:`_ShuffledRows`, else ``t``."""
    return t.whole() if isinstance(t, _ShuffledRows) else t


def _shuffled(t: Any, order: np.ndarray) -> Any:
    """``t`` with its rows in the order ``order``; a layer that is not a 2-D array with one row per index is
    passed on as it is, for :func:`similarity_matrix` to say what is wrong with it."""
    if not hasattr(t, "shape"):
        try:
            t = np.asarray(t)
        except (TypeError, ValueError):
            return t
    shape = tuple(t.shape)
    if len(shape) != 2 or shape[0] != len(order) or not hasattr(t, "__getitem__"):
        return t
    return _ShuffledRows(t, order)


def chance_level(
    acts_a: Activations | Mapping[str, ArrayLike],
    acts_b: Activations | Mapping[str, ArrayLike] | None = None,
    *,
    layers_b: Sequence[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> SimilarityMatrixResult:
    """What unrelated samples score: :func:`similarity_matrix` with model B's samples in a random order.

    Sample ``i`` of A is then compared with another sample of B, so every cell is the measure's value
    for two representations that share nothing sample by sample, at the same widths and ``n``: the
    negative control to read a heatmap against (biased CKA of wide layers and SVCCA with many kept
    directions sit far above 0 on unrelated data). ``acts_b=None`` shuffles A against itself.
    ``seed`` fixes the permutation; ``layers_b`` and ``options`` are passed on (``layers_a``,
    ``measure``, ``debiased``, ...). The layers are checked as :func:`similarity_matrix` checks them, and
    B's rows are gathered in the shuffled order only as they are read (a streamed, memory-mapped layer is
    never loaded whole).
    """
    func = "chance_level"
    seed = check_seed(seed, func=func)
    if acts_b is not None:
        check_same_dataset(acts_a, acts_b, func=func)
    try:
        call = inspect.signature(similarity_matrix).bind(acts_a, acts_b, layers_b=layers_b, **options)
    except TypeError as exc:
        raise ParameterError(
            f"{func}: the options are passed on to similarity_matrix, which does not take them ({exc}); "
            "pass only similarity_matrix's keyword arguments (measure, layers_a, debiased, ...)."
        ) from None
    call.apply_defaults()
    source = acts_a if acts_b is None else acts_b
    raw_a = _layer_tensors(acts_a, call.arguments["layers_a"], "acts_a", func)
    raw_b = _layer_tensors(source, layers_b, "acts_b", func)
    try:
        n = int(np.shape(raw_a[0][1])[0])
    except (TypeError, ValueError, IndexError):
        n = 0  # not an array: similarity_matrix says what is wrong with it
    order = np.random.default_rng(seed).permutation(n)
    call.arguments["acts_b"] = {name: _shuffled(t, order) for name, t in raw_b}
    call.arguments["layers_b"] = None
    result = _similarity_matrix(**call.arguments, func=func)
    return dataclasses.replace(
        result, model_b=f"{_model_name(source, 'A' if acts_b is None else 'B')} (samples shuffled)",
        estimator=f"{result.estimator}; chance level: B's samples in a random order (seed {seed})", seed=seed,
    )
