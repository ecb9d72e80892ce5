"""Probes: how much of a label can a simple model read off each layer?

:func:`probe_layers` trains one probe per layer with k-fold cross-validation and reports held-out
accuracy (classification) or R^2 (regression), macro-F1, a confusion matrix, and, with
``control=True``, the same probe's score on a control task (Hewitt & Liang 2019) and the
selectivity ``score - control score``.

All folds of a layer (and their control tasks) are trained together: for the linear probe the
standardisation of each fold is folded into its weights, so every fold's logits come from one
matrix product ``x @ W`` of shape ``(n_samples, n_folds * n_classes)``, and one full-batch L-BFGS
minimises the sum of the folds' (independent) objectives. Features are standardised with the
mean and standard deviation of each fold's training rows only, so nothing leaks from held-out rows, and samples
whose activations are exactly equal in every probed layer (copies of one input) are held out in one fold.
Each layer is centred in float64 before the probes' float32 work, so a large offset costs no digits, and each feature
is scaled by a power of two, so that features far below (or near) the float32 range keep their digits too.
Every layer is checked before any probe trains, but copied and centred only when its turn comes,
so the copies take one layer's memory on top of the activations, not all layers'.

:func:`moment_probe` is the moment probe of Tao et al. (ICCV 2023, "Tuning Pre-trained Model via
Moment Probing") for activations with a token axis: a linear probe on the first moment (mean
token) and second moments (per-feature token variance and a rank-``r`` token covariance). For
pooled activations (no token axis) it is exactly the linear probe.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.analyses._result import RecordedResult
from workbench.analyses._validation import (
    as_labels,
    as_matrix,
    check_choice,
    check_int,
    check_layer_names,
    check_seed,
    is_finite,
)
from workbench.device import float64_device, resolve_device
from workbench.errors import ConstantDataError, DataError, ParameterError, non_finite

logger = logging.getLogger(__name__)

PROBES = ("linear", "mlp")
LBFGS_MAX_ITER = 1000
LBFGS_TOLERANCE = 1e-4
MLP_HIDDEN = 128
MLP_EPOCHS = 100
MLP_BATCH = 200
MLP_LEARNING_RATE = 1e-3
MLP_WEIGHT_DECAY = 1e-4
MOMENT_RANK = 8
C_RANGE = (1e-6, 1e8)  # the inverse L2 strengths the float32 probes can honour (see _check_c)
_BLOCK_VALUES = 2**17  # float64 values in a block of rows worked on at a time (1 MiB)
_MOMENT_BLOCK_VALUES = 2**19  # token values of the block of samples whose moments are taken at a time (4 MiB in float64)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ProbingResult(RecordedResult):
    """Cross-validated probe scores per layer.

    ``metric`` is ``"accuracy"`` (integer or string labels; in ``[0, 1]``) or ``"r2"`` (float
    targets; at most 1, 0 for predicting the mean, negative when worse). Arrays are per layer, in
    the order of ``layers``:

    ``score``, ``score_std``: mean and (population) standard deviation over folds of the held-out
    score; ``fold_scores``: ``(n_layers, cv)``; ``train_score``: mean score on the training rows.
    ``macro_f1``: held-out macro-averaged F1, mean over folds (classification, else None).
    ``control_score``, ``control_train_score``: the same probe on the control task; ``selectivity``:
    ``score - control_score`` (None without a control).
    ``confusion``: ``(n_layers, n_classes, n_classes)`` counts of held-out predictions, rows true class,
    columns predicted, summed over folds; ``classes``: the label of each row (classification, else None).
    ``chance``: accuracy of always predicting the most frequent class (0 for R^2).
    ``folds``: ``(n_samples,)`` the fold in which each sample was held out.
    """

    layers: tuple[str, ...]
    probe: str
    metric: str
    score: np.ndarray
    score_std: np.ndarray
    fold_scores: np.ndarray
    train_score: np.ndarray
    macro_f1: np.ndarray | None
    control_score: np.ndarray | None
    control_train_score: np.ndarray | None
    selectivity: np.ndarray | None
    confusion: np.ndarray | None
    classes: np.ndarray | None
    chance: float
    folds: np.ndarray
    n_features: np.ndarray
    model_name: str

    def to_frame(self) -> Any:
        """One row per layer (``pandas.DataFrame`` indexed by layer): width, held-out score and its spread,
        train score, and macro F1, control score and selectivity where they were computed."""
        import pandas as pd

        columns: dict[str, Any] = {"n_features": self.n_features, self.metric: self.score, f"{self.metric}_std": self.score_std,
                                   f"train_{self.metric}": self.train_score}
        for name in ("macro_f1", "control_score", "selectivity"):
            if getattr(self, name) is not None:
                columns[name] = getattr(self, name)
        return pd.DataFrame(columns, index=pd.Index(self.layers, name="layer"))


def probe_layers(
    acts: Mapping[str, Any] | Any,
    labels: Any = None,
    *,
    probe: str = "linear",
    cv: int = 5,
    control: bool = True,
    seed: int = 0,
    c: float = 1.0,
    groups: Any = None,
    layers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> ProbingResult:
    """Cross-validated probe accuracy (or R^2) of each layer, with a control task.

    Classification (integer, boolean or string labels): multinomial logistic regression
    (``probe="linear"``) or a one-hidden-layer ReLU network (``probe="mlp"``), scored by held-out
    accuracy and macro-F1 over stratified folds. Regression (float targets): ridge regression or the
    same network with squared loss, scored by held-out R^2 over plain folds.

    Samples whose activations are exactly equal in every probed layer (copies of one input, as far as the
    probes can tell) are held out together, in one fold (scikit-learn's ``StratifiedGroupKFold``), so that no
    probe is tested on a copy of a sample it trained on; ``params["copies"]`` counts the samples that copy an
    earlier one (0 when all are distinct, and the folds are then plain stratified ones).

    The linear probe minimises, per fold, ``mean cross-entropy + |W|^2 / (2 c n_train)`` over features
    standardised with the fold's training rows: scikit-learn's ``LogisticRegression(C=c)`` on
    ``StandardScaler`` output (intercept not penalised). The ridge probe minimises
    ``sum of squared errors + |w|^2 / c``, i.e. ``Ridge(alpha=1 / c)``.

    Control task (Hewitt & Liang 2019): each sample's label is replaced by a fixed random function of
    its identity (of its ``groups`` entry when given, e.g. a word type or a source image shared by
    augmented copies), drawn from the empirical label distribution with ``seed``. A probe that scores
    high on the task but not on the control reads the label from the representation rather than
    memorising; ``selectivity = score - control_score``. Without ``groups`` every sample is its own
    type (copies of a sample share their original's), so the held-out control score sits at chance and
    ``control_train_score`` shows how much the probe can memorise.

    Parameters
    ----------
    acts : Activations, mapping layer name -> (n_samples, n_features) array, or one such array
        Representations to probe. Not modified.
    labels : (n_samples,) array or None
        Class labels or float targets; ``None`` uses ``acts.labels``.
    probe : "linear" or "mlp"
        The linear probe measures linearly decodable information; the MLP (128 hidden units, Adam,
        100 epochs) also finds non-linear codes but memorises more.
    cv : int
        Number of folds, in ``[2, n_samples]``; every class needs at least ``cv`` distinct samples (for float
        targets at most half the distinct samples, so that every test fold has two to take R^2 over).
    control : bool
        Also train on the control task and report the selectivity.
    seed : int
        Seeds the fold assignment, the control labels and the MLP's initialisation and batches.
    c : float
        Inverse L2 strength of the linear probe, in ``[1e-6, 1e8]`` (scikit-learn's ``C``); larger fits harder.
        The default 1.0 is scikit-learn's. The probes compute in float32 (about 7 significant digits): below the
        range the penalty so outweighs the data that the fits stop converging and the weights vanish below the
        rounding of the logits, above it the penalty vanishes below the rounding of the loss. For ``probe="mlp"``
        the weight decay is fixed at 1e-4.
    groups : (n_samples,) array or None
        Sample types for the control task (see above).
    layers : sequence of str or None
        Layers to probe, in order; default all of ``acts``.
    device : str, torch.device or None
        Where the probes train; ``None`` picks cuda > mps > cpu.
    progress : callable (done, total) or None
        Called after each layer.

    Returns
    -------
    ProbingResult with per-layer arrays ``score``, ``score_std``, ``macro_f1``, ``control_score``,
    ``selectivity`` and the confusion matrices.
    """
    func = "probe_layers"
    probe = check_choice(probe, "probe", PROBES, func=func)
    return _probe(
        _pooled_layers(acts, layers, func),
        acts,
        labels,
        probe=probe,
        cv=cv,
        control=control,
        seed=seed,
        c=c,
        groups=groups,
        device=device,
        progress=progress,
        func=func,
        estimator_prefix="",
    )


def moment_probe(
    acts: Mapping[str, Any] | Any,
    labels: Any = None,
    *,
    rank: int = MOMENT_RANK,
    mask: Any = None,
    cv: int = 5,
    control: bool = True,
    seed: int = 0,
    c: float = 1.0,
    groups: Any = None,
    layers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> ProbingResult:
    """Moment probe: a linear probe on first- and second-order token statistics of each layer.

    For token activations ``h`` of shape ``(n_samples, n_tokens, n_features)`` the probe reads, per
    sample, the mean token ``mu`` (first moment), the per-feature token variance (diagonal of the
    second moment) and the ``rank x rank`` token covariance after projecting the centred tokens on
    ``rank`` fixed random orthonormal directions (a low-rank view of the off-diagonal second moment),
    and fits the linear probe of :func:`probe_layers` on their concatenation. This follows Tao et
    al. (ICCV 2023), who add second-order token statistics to the usual linear probe on the mean
    or class token; here the second-order part is the diagonal plus a random low-rank sketch instead
    of their learned cross-covariance module, so the probe stays linear and convex.

    For pooled activations ``(n_samples, n_features)`` there is no token axis and no second moment:
    the result equals ``probe_layers(..., probe="linear")`` with the same arguments.

    Token activations come from ``extract(..., pooling="flatten")`` reshaped to
    ``(n_samples, n_tokens, n_features)``, or from any other source.

    Parameters
    ----------
    acts : mapping layer name -> (n_samples, n_tokens, n_features) or (n_samples, n_features) array, or one array
    labels, cv, control, seed, c, groups, layers, device, progress : as in :func:`probe_layers`.
    rank : int
        Directions of the low-rank covariance sketch, in ``[0, 64]``; adds ``r (r + 1) / 2`` features with
        ``r = min(rank, n_features)`` (recorded per layer in ``params["rank_used"]``).
    mask : (n_samples, n_tokens) array of bool or None
        True for real tokens, False for padding; default all tokens. Every sample needs one real token.
    """
    func = "moment_probe"
    rank = check_int(rank, "rank", func=func, low=0, high=64)
    if isinstance(acts, Mapping):
        names = list(acts) if layers is None else check_layer_names(acts, layers, func=func)
        raw = {name: acts[name] for name in names}
    else:
        raw = {"x": acts}
    if not raw:
        raise DataError(f"{func}: no layers to probe; pass at least one layer.")
    prepared: list[_Layer] = []
    ranks: dict[str, int] = {}  # the sketch's rank per token layer: at most the layer's width
    for index, (name, value) in enumerate(raw.items()):
        t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if t.ndim == 3:
            prepared.append(_token_layer(t, mask, rank, seed + index, func, name))
            ranks[name] = min(rank, int(t.shape[2]))
        else:
            prepared.append(_pooled_layer(t, name, name, func))
    used = sorted(set(ranks.values()))
    shown = f"rank-{used[0]}" if len(used) == 1 else f"rank-{used[0]} to {used[-1]}" if used else ""
    prefix = (
        f"moment probe (mean + diagonal + {shown} token covariance), "
        if ranks
        else "moment probe on pooled activations (first moment only), "
    )
    return _probe(
        prepared,
        acts,
        labels,
        probe="linear",
        cv=cv,
        control=control,
        seed=seed,
        c=c,
        groups=groups,
        device=device,
        progress=progress,
        func=func,
        estimator_prefix=prefix,
        extra_params={"rank": rank, "token_layers": len(ranks), "rank_used": ranks},
    )


# ---------------------------------------------------------------------------------------------
# shared driver


@dataclass(frozen=True)
class _Layer:
    """A layer to probe, checked but not yet converted: ``prepare()`` makes its centred float32 matrix
    ``(n_samples, n_features)`` when the layer's turn comes, so that one layer's copy is held at a time
    (12 layers of 2048 features and 10,000 samples would otherwise hold 1 GB of copies next to the
    activations)."""

    name: str
    n_samples: int
    n_features: int
    prepare: Callable[[], torch.Tensor]
    # the float64 rows at these sample indices, as the probe sees them, a block at a time (see _copy_groups)
    rows: Callable[[np.ndarray], Iterator[np.ndarray]]


def _pooled_layers(acts: Any, layers: Sequence[str] | None, func: str) -> list[_Layer]:
    if isinstance(acts, Mapping):
        names = list(acts) if layers is None else check_layer_names(acts, layers, func=func)
        if not names:
            raise DataError(f"{func}: no layers to probe; pass at least one layer name.")
        return [_pooled_layer(acts[name], name, name, func) for name in names]
    return [_pooled_layer(acts, "x", "acts", func)]


def _pooled_layer(value: Any, name: str, label: str, func: str) -> _Layer:
    """``value`` checked now (a finite 2-D array within the float32 range: in float32, which copies nothing
    for float32 activations) and centred by :func:`_centred_float32` when it is probed."""
    n, d = as_matrix(value, label, func=func, dtype=torch.float32, min_samples=2).shape

    # as_matrix converts (copies) whatever is not float64 already; a copy is centred in place
    copied = isinstance(value, (torch.Tensor, np.ndarray)) and value.dtype not in (torch.float64, np.float64)

    def prepare() -> torch.Tensor:
        return _centred_float32(as_matrix(value, label, func=func, min_samples=2), label, func, in_place=copied)

    def rows(index: np.ndarray) -> Iterator[np.ndarray]:
        source = value.detach() if isinstance(value, torch.Tensor) else np.asarray(value)
        return _row_blocks(source, index, int(d))

    return _Layer(name, int(n), int(d), prepare, rows)


def _row_blocks(source: torch.Tensor | np.ndarray, index: np.ndarray, width: int,
                mask: torch.Tensor | None = None) -> Iterator[np.ndarray]:
    """The rows ``source[index]`` in float64, flattened to ``(rows, values)``, a block of rows at a time (no copy of the
    whole layer), with -0.0 made 0.0 so that rows compare by value. ``mask`` ``(n_samples, n_tokens)``: token rows
    ``(n_samples, n_tokens, n_features)`` with their padding zeroed and the mask appended, as the moment probe sees them."""
    step = max(1, _BLOCK_VALUES // max(1, width))
    for lo in range(0, len(index), step):
        part = index[lo : lo + step]
        if isinstance(source, torch.Tensor):
            block = source[torch.from_numpy(part).to(source.device)].to("cpu", torch.float64)
        else:
            block = torch.from_numpy(np.asarray(source[part], dtype=np.float64))
        if mask is not None:
            block = torch.cat([(block * mask[part][:, :, None]).reshape(len(part), -1), mask[part]], dim=1)
        yield block.reshape(len(part), -1).add_(0.0).numpy()


def _copy_groups(layers: Sequence[_Layer]) -> np.ndarray:
    """The copy group of each sample ``(n_samples,)``: samples whose rows are exactly equal in every probed layer (copies
    of one input, as far as the probes can tell) share a group. Groups are numbered in the order of their first sample,
    so without copies the groups are ``arange(n_samples)``.

    A 64-bit hash of every row's float64 bits, taken with array operations over all layers, finds the samples that may
    have a copy (equal rows hash alike, so none is missed); only those are compared by a 128-bit BLAKE2 digest of their
    values, a block of rows at a time, and a layer after the first looks only at the samples that still have a copy."""
    n = layers[0].n_samples
    hashes = np.zeros(n, dtype=np.uint64)
    for layer in layers:
        done = 0
        for block in layer.rows(np.arange(n)):
            rows = slice(done, done + len(block))
            with np.errstate(over="ignore"):  # modulo 2**64
                hashes[rows] = hashes[rows] * _HASH_MIX[0] + _row_hashes(block)
            done += len(block)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    if not candidates.size:
        return np.arange(n, dtype=np.int64)
    first = np.arange(n, dtype=np.int64)  # the first sample of each sample's group so far: a sample alone is its own
    first[candidates] = candidates[0]  # the samples that may have a copy start in one group, split layer by layer
    for layer in layers:
        seen: dict[tuple[int, bytes], int] = {}
        found = np.empty(len(candidates), dtype=np.int64)
        i = 0
        for block in layer.rows(candidates):
            for row in block:
                key = (int(first[candidates[i]]), hashlib.blake2b(row.tobytes(), digest_size=16).digest())
                found[i] = seen.setdefault(key, int(candidates[i]))
                i += 1
        first[candidates] = found
        candidates = candidates[np.bincount(first, minlength=n)[first[candidates]] > 1]
        if not candidates.size:
            break
    return np.unique(first, return_inverse=True)[1].astype(np.int64)


_HASH_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _row_hashes(block: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of the float64 ``block`` ``(rows, values)``: every value's bits mixed (a splitmix64
    finaliser, so that values differing in a few high bits do not cancel), weighted by its position and summed,
    modulo 2**64. Equal rows give equal hashes."""
    with np.errstate(over="ignore"):
        z = block.view(np.uint64) * _HASH_MIX[1]
        z ^= z >> np.uint64(31)
        z *= _HASH_MIX[2]
        z ^= z >> np.uint64(29)
        weights = np.arange(1, 2 * block.shape[1], 2, dtype=np.uint64) * _HASH_MIX[0]  # odd: no position drops out
        return (z * weights).sum(axis=1, dtype=np.uint64)


def _centred_float32(x: torch.Tensor, name: str, func: str, in_place: bool = False) -> torch.Tensor:
    """``x`` minus its column means, each column then multiplied by the power of two that brings its largest ``|value|``
    into [0.5, 1), computed in float64 and only then rounded to the probes' float32.

    Every probe standardises its features, so neither step changes a result; done after the rounding, the centring
    would keep only the few float32 digits left below a large offset (features near 1e4 that vary by 1e-3 would be
    quantised to steps of 1e-3), and without the scaling features below float32's smallest numbers (1e-38, 1e-45)
    would lose their digits or become 0, and tiny spreads would make the standardised weights overflow. Multiplying by
    a power of two is exact, so features of ordinary scale are probed as they would be unscaled. Exactly constant
    columns become exactly 0.
    ``in_place``: centre ``x`` itself (a float64 copy the caller owns), the same numbers without a second array."""
    limit = torch.finfo(torch.float32).max
    # the largest |value| is read without an |x| temporary; values are counted only when one is out of range
    n_big = int((x.abs() > limit).sum()) if float(torch.linalg.vector_norm(x, math.inf)) > limit else 0
    if n_big:
        raise DataError(
            f"{func}: {n_big} value{'s' if n_big != 1 else ''} of '{name}' {'lie' if n_big != 1 else 'lies'} beyond the "
            f"float32 range (|x| > {limit:.3g}) that the probes compute in; rescale the data first."
        )
    low, high = torch.aminmax(x, dim=0)
    constant = low == high  # every value equal to the first (x is finite), without an |x|-sized flag per value
    x64 = x.to(torch.float64)
    mean = x64.mean(0, keepdim=True)
    # rounding is monotonic, so the largest |x - mean| of a column is that of its largest or smallest value
    spread = torch.maximum(high.to(torch.float64) - mean[0], mean[0] - low.to(torch.float64))
    first, second = _power_of_two_scales(spread)
    if in_place:
        out = x64.sub_(mean).mul_(first).mul_(second).to(torch.float32)
    else:  # a block of rows at a time: no centred float64 copy of the whole layer
        out = torch.empty_like(x64, dtype=torch.float32)  # laid out as x64 - mean would be
        step = max(1, _BLOCK_VALUES // x.shape[1])
        for lo in range(0, x.shape[0], step):
            out[lo : lo + step] = (x64[lo : lo + step] - mean).mul_(first).mul_(second)
    out[:, constant] = 0.0
    return out


def _power_of_two_scales(largest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 powers of two per entry of ``largest`` (``>= 0``) whose product brings it into [0.5, 1) (1 and 1 for
    0): what :func:`~workbench.analyses._validation.unit_scale` gives a whole tensor, per column, and split in two factors
    (applied one after the other) so that columns below float64's normal range (2**-1022), which need more than
    2**1023, are scaled too."""
    _, exponent = torch.frexp(largest)  # largest = mantissa * 2**exponent, mantissa in [0.5, 1); 0 for 0
    wanted = -exponent.to(torch.float64)
    half = torch.floor(wanted / 2)
    return torch.pow(2.0, half), torch.pow(2.0, wanted - half)


def _check_c(c: Any, func: str) -> float:
    """Check the inverse L2 strength ``c`` lies in :data:`C_RANGE` and return it as float."""
    low, high = C_RANGE
    if isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_)) and low <= c <= high:
        return float(c)
    raise ParameterError(
        f"The 'c' parameter of {func} must be a number in [{low:g}, {high:g}], the range the float32 probes can honour "
        f"(below it the L2 penalty so outweighs the data that the fits stop converging and the weights vanish below the "
        f"rounding of the float32 logits; above it the penalty itself vanishes below float32 rounding). "
        f"Got {c!r}."
    )


@dataclass(frozen=True)
class _Targets:
    regression: bool
    y: np.ndarray  # class index (int64) or standardised-free float target
    control: np.ndarray | None
    classes: np.ndarray | None
    folds: np.ndarray
    chance: float
    copies: int = 0  # samples that repeat an earlier sample, held out in its fold


def _prepare_targets(
    acts: Any, labels: Any, n: int, *, cv: int, control: bool, seed: int, groups: Any, func: str,
    copies: Callable[[], np.ndarray] | None = None,
) -> _Targets:
    """The checked targets, folds and control task. ``copies``: called once the labels are checked, the copy group of
    each sample (:func:`_copy_groups`); the copies of a sample are held out in one fold and share one control label.
    Without it every sample is distinct."""
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    if labels is None:
        labels = getattr(acts, "labels", None)
        if labels is None:
            raise DataError(
                f"{func}: 'labels' are required: pass labels=... or extract the activations from a dataset with labels."
            )
    arr = as_labels(labels, n, func=func)
    regression = arr.dtype.kind == "f"
    if arr.dtype.kind not in "biufUSO":
        raise DataError(
            f"{func}: 'labels' must be class labels (int, bool, str) or float targets. Got dtype {arr.dtype}."
        )
    if regression:
        if not np.isfinite(arr).all():
            raise DataError(
                f"{func}: 'labels' contain {non_finite(int((~np.isfinite(arr)).sum()))}; remove those samples."
            )
        if float(arr.max() - arr.min()) == 0.0:
            raise DataError(
                f"{func}: the float target in 'labels' is constant ({arr[0]:g}), so R^2 is undefined; pass a target that varies."
            )
        values = np.unique(arr)
        if len(values) <= 20 and np.array_equal(values, np.round(values)):
            warnings.warn(
                f"{func}: the labels are floats with {len(values)} whole-number values, so they are probed as a regression "
                "target (R^2); pass them as integers (labels.astype(int)) to probe them as classes.",
                UserWarning, stacklevel=3,
            )
        y = arr.astype(np.float64)
        classes = None
        cv = check_int(cv, "cv", func=func, low=2, high=n)
        if cv > n // 2:
            raise ParameterError(
                f"{func}: cv={cv} folds of {n} samples leave test folds of one sample, where R^2 is undefined; "
                f"use cv <= {n // 2}."
            )
        group, n_distinct = _distinct(copies, n, func)
        if cv > n_distinct // 2:
            fix = f"use cv <= {n_distinct // 2}" if n_distinct >= 4 else "probe at least 4 distinct samples"
            raise ParameterError(
                f"{func}: cv={cv} folds of {n_distinct} distinct samples (the {n - n_distinct} copies among the {n} are "
                f"held out with their original) leave test folds of one distinct sample, where R^2 is undefined; {fix}."
            )
        # the distinct samples are split into folds (as KFold splits samples), and copies follow their original
        fold_of = np.empty(n_distinct, dtype=np.int64)
        for f, (_, test) in enumerate(KFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n_distinct))):
            fold_of[test] = f
        folds = fold_of[group]
        chance = 0.0
    else:
        classes, inverse = np.unique(arr, return_inverse=True)
        y = inverse.astype(np.int64)
        if len(classes) < 2:
            raise DataError(
                f"{func}: 'labels' hold one class only ({classes[0].item()!r}); a probe needs at least two classes to tell apart."
            )
        counts = np.bincount(y, minlength=len(classes))
        cv = check_int(cv, "cv", func=func, low=2, high=n)
        if counts.min() < cv:
            rare = classes[int(counts.argmin())].item()
            fewest = int(counts.min())
            fix = (f"lower cv to {fewest} or drop classes that rare" if fewest >= 2 else
                   "drop the samples of classes with a single sample (a class needs at least 2: one to train, one to test)")
            raise DataError(
                f"{func}: class {rare!r} has {fewest} sample{'s' if fewest != 1 else ''} but cv={cv} folds need at least "
                f"{cv} per class; {fix}."
            )
        group, n_distinct = _distinct(copies, n, func)
        folds = np.empty(n, dtype=np.int64)
        if n_distinct == n:
            splits = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n), y)
        else:
            # a class's distinct samples (copy groups that hold it) must fill every fold, as its samples must without copies
            distinct = np.bincount(np.unique(np.stack([group, y]), axis=1)[1], minlength=len(classes))
            if distinct.min() < cv:
                rare = classes[int(distinct.argmin())].item()
                fewest = int(distinct.min())
                fix = (f"lower cv to {fewest} or drop classes that rare" if fewest >= 2 else
                       "drop the samples of classes with a single distinct sample (a class needs at least 2: one to "
                       "train, one to test)")
                raise DataError(
                    f"{func}: class {rare!r} has {fewest} distinct sample{'s' if fewest != 1 else ''} "
                    f"({int(counts[int(distinct.argmin())])} with their copies) but cv={cv} folds need at least {cv} per "
                    f"class, since the copies of a sample are held out in one fold so that no probe is tested on a copy "
                    f"of a training sample; {fix}."
                )
            splits = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(n), y, group)
        for f, (_, test) in enumerate(splits):
            folds[test] = f
        chance = float(counts.max() / n)
    control_y = None
    if control:
        if groups is None:
            types = group  # every distinct sample is its own type, and its copies share it
        else:
            _, types = np.unique(as_labels(groups, n, func=func, name="groups", classes=True), return_inverse=True)
        rng = np.random.default_rng([seed, 1])
        draw = rng.integers(0, n, size=int(types.max()) + 1)  # each type takes the label of a random sample
        control_y = y[draw][types]
    return _Targets(regression=regression, y=y, control=control_y, classes=classes, folds=folds, chance=chance,
                    copies=n - n_distinct)


def _distinct(copies: Callable[[], np.ndarray] | None, n: int, func: str) -> tuple[np.ndarray, int]:
    """The copy group of each sample and the number of groups (distinct samples); every sample one copy of one (every
    probed layer constant) is refused as a dead representation."""
    group = np.arange(n) if copies is None else copies()
    n_distinct = int(group.max()) + 1
    if n_distinct == 1 and n > 1:
        raise ConstantDataError(
            f"{func}: every probed layer is constant over samples (all {n} samples give the same activations), so a probe "
            "can only guess; pick a layer that varies, or check that the model is not dead on this dataset."
        )
    return group, n_distinct


def _probe(
    layers: list[_Layer],
    acts: Any,
    labels: Any,
    *,
    probe: str,
    cv: int,
    control: bool,
    seed: int,
    c: float,
    groups: Any,
    device: str | torch.device | None,
    progress: Progress | None,
    func: str,
    estimator_prefix: str,
    extra_params: dict[str, Any] | None = None,
) -> ProbingResult:
    seed = check_seed(seed, func=func)
    c = _check_c(c, func)
    if not isinstance(control, (bool, np.bool_)):
        raise ParameterError(f"The 'control' parameter of {func} must be True or False. Got {control!r}.")
    n = layers[0].n_samples
    for layer in layers:
        if layer.n_samples != n:
            raise DataError(
                f"{func}: layer '{layer.name}' has {layer.n_samples} samples but the first layer has {n}; extract all layers "
                "on the same dataset."
            )
    targets = _prepare_targets(acts, labels, n, cv=cv, control=bool(control), seed=seed, groups=groups, func=func,
                               copies=lambda: _copy_groups(layers))
    cv = int(targets.folds.max()) + 1
    dev = resolve_device(device)
    start = time.perf_counter()
    per_layer = []
    for i, layer in enumerate(layers):
        per_layer.append(_probe_one(layer.prepare(), targets, probe, c, seed, dev))  # the matrix is dropped on return
        if progress is not None:
            progress(i + 1, len(layers))

    def stack(key: str) -> np.ndarray | None:
        values = [layer[key] for layer in per_layer]
        return None if values[0] is None else np.stack(values)

    fold_scores = np.stack([layer["fold_scores"] for layer in per_layer])
    control_scores = stack("control_fold_scores")
    score = fold_scores.mean(axis=1)
    control_score = None if control_scores is None else control_scores.mean(axis=1)
    metric = "r2" if targets.regression else "accuracy"
    if probe == "linear":
        model = (
            f"ridge regression (alpha = 1/C = {1 / c:g})"
            if targets.regression
            else f"multinomial logistic regression (L2, C={c:g}, L-BFGS)"
        )
    else:
        model = f"MLP probe ({MLP_HIDDEN} ReLU units, Adam, {MLP_EPOCHS} epochs)"
    copies = (
        f" (the {targets.copies} of the {n} samples that copy another are held out in its fold)" if targets.copies else ""
    )
    estimator = (
        f"{estimator_prefix}{model}, {cv}-fold {'stratified ' if not targets.regression else ''}"
        f"{'group ' if targets.copies else ''}CV{copies}, held-out {metric}"
    )
    params: dict[str, Any] = {
        "probe": probe,
        "cv": cv,
        "control": bool(control),
        **({"c": c} if probe == "linear" else {"weight_decay": MLP_WEIGHT_DECAY}),  # what the probe was fitted with
        "control_types": "groups" if groups is not None else "samples",
        "copies": targets.copies,  # samples equal in every probed layer to an earlier one: held out together with it
        **(extra_params or {}),
    }
    return ProbingResult(
        layers=tuple(layer.name for layer in layers),
        probe=probe if not estimator_prefix else "moment",
        metric=metric,
        score=score,
        score_std=fold_scores.std(axis=1),
        fold_scores=fold_scores,
        train_score=np.array([layer["train_score"] for layer in per_layer]),
        macro_f1=None if targets.regression else stack("macro_f1"),
        control_score=control_score,
        control_train_score=stack("control_train_score"),
        selectivity=None if control_score is None else score - control_score,
        confusion=None if targets.regression else stack("confusion"),
        classes=None if targets.classes is None else np.asarray(targets.classes),
        chance=targets.chance,
        folds=targets.folds,
        n_features=np.array([layer.n_features for layer in layers]),
        model_name=str(getattr(acts, "model_name", "")),
        estimator=estimator,
        n_samples=n,
        params=params,
        seed=seed,
        device=str(dev),
        dtype="float32",
        seconds=time.perf_counter() - start,
    )


def _probe_one(
    x: torch.Tensor, targets: _Targets, probe: str, c: float, seed: int, dev: torch.device
) -> dict[str, Any]:
    """Train every fold (and control fold) of one layer together and score them. ``x`` is the layer's prepared float32
    copy (:attr:`_Layer.prepare`), which this centres in place."""
    folds = torch.from_numpy(targets.folds)
    n_folds = int(folds.max()) + 1
    test = folds[None, :] == torch.arange(n_folds)[:, None]  # (F, n)
    train = ~test
    tasks = [targets.y] + ([targets.control] if targets.control is not None else [])
    train_p = train.repeat(len(tasks), 1)  # problem p = task * F + fold
    xd, mean, scale = _fold_standardisation(x, train, dev)
    mean, scale = mean.repeat(len(tasks), 1), scale.repeat(len(tasks), 1)
    if targets.regression:
        y = torch.from_numpy(np.stack(tasks)).to(torch.float64)  # (tasks, n)
        y_p = y.repeat_interleave(n_folds, dim=0)  # (P, n)
        if probe == "linear":
            pred = _fit_ridge(xd, train_p, y_p, mean, scale, c, dev)
        else:
            pred = _fit_mlp(xd, train_p.to(dev), y_p.to(dev, torch.float32), mean, scale, None, seed, dev).double()
        pred = pred.cpu()
        scores = _r2(pred, y_p, ~train_p)
        train_scores = _r2(pred, y_p, train_p)
        out = {
            "fold_scores": scores[:n_folds].numpy(),
            "train_score": float(train_scores[:n_folds].mean()),
            "macro_f1": None,
            "confusion": None,
        }
    else:
        n_classes = int(targets.y.max()) + 1  # class indices 0 .. C-1, every class present
        y = torch.from_numpy(np.stack(tasks))
        y_p = y.repeat_interleave(n_folds, dim=0)  # (P, n)
        if probe == "linear":
            # The task and its control are fitted in separate runs so the task's fit (and score) does
            # not depend on whether a control is asked for.
            logits = torch.cat(
                [
                    _fit_logistic(
                        xd,
                        train.to(dev),
                        y_p[t * n_folds : (t + 1) * n_folds].to(dev),
                        mean[:n_folds],
                        scale[:n_folds],
                        n_classes,
                        c,
                    )
                    for t in range(len(tasks))
                ],
                dim=1,
            )
        else:
            logits = _fit_mlp(xd, train_p.to(dev), y_p.to(dev), mean, scale, n_classes, seed, dev)
        pred = logits.argmax(-1).T.cpu()  # (P, n)
        correct = (pred == y_p).double()
        test_p = ~train_p
        scores = (correct * test_p).sum(1) / test_p.sum(1)
        train_scores = (correct * train_p).sum(1) / train_p.sum(1)
        confusion = _confusion(y_p[:n_folds], pred[:n_folds], test, n_classes)  # (F, C, C)
        out = {
            "fold_scores": scores[:n_folds].numpy(),
            "train_score": float(train_scores[:n_folds].mean()),
            "macro_f1": float(_macro_f1(confusion).mean()),
            "confusion": confusion.sum(0).numpy(),
        }
    if len(tasks) == 2:
        out["control_fold_scores"] = scores[n_folds:].numpy()
        out["control_train_score"] = float(train_scores[n_folds:].mean())
    else:
        out["control_fold_scores"] = None
        out["control_train_score"] = None
    return out


def _fold_standardisation(
    x: torch.Tensor, train: torch.Tensor, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` centred on its overall mean (float32 on ``dev``), and per fold the training mean of that
    centred ``x`` ``(F, d)`` and the inverse training standard deviation (0 for features constant in the fold).

    Centring first keeps the folded standardisation ``x @ (s * W) - (mean * s) @ W`` free of
    cancellation in float32: the fold means of centred features are small. ``x`` is the caller's own float32 copy
    (see :func:`_centred_float32`): when it is on ``dev`` it is overwritten with the centred values and returned, so
    that one layer's float32 copy and one float64 work array are held at a time.
    """
    dev64 = float64_device(dev)
    low, high = torch.aminmax(x, dim=0)  # no |x| temporary
    magnitude = torch.maximum(high, low.neg()).to(dev64, torch.float64)  # rounding noise of the variance is relative to these
    xc = x.to(dev64, torch.float64, copy=True)
    centre = xc.mean(0, keepdim=True)
    xc -= centre
    w = train.to(dev64, torch.float64)
    count = w.sum(1, keepdim=True)
    mean = (w @ xc) / count
    var = (w @ xc.square_()) / count - mean**2
    # Where the one-pass variance lost most of its digits (a feature nearly constant in the fold's
    # training rows but not overall), recompute it from the deviations, so exact zeros stay zero.
    lost = var <= 1e-6 * mean**2
    for f in torch.nonzero(lost.any(1)).flatten().tolist():
        cols = torch.nonzero(lost[f]).flatten()
        deviations = x[:, cols.to(x.device)].to(dev64, torch.float64) - centre[0, cols] - mean[f, cols]
        var[f, cols] = (w[f] @ deviations**2) / count[f]
    std = var.clamp_min(0.0).sqrt()
    # A feature whose spread over the fold's training rows is rounding noise is constant there: its
    # weight is fixed at zero (scikit-learn's StandardScaler leaves it unscaled, with the same effect
    # on training rows).
    scale = torch.where(std > 1e-10 * magnitude, 1.0 / std.clamp_min(1e-300), torch.zeros_like(std))
    # The centred values once more, now that the squares are done with: x - centre in float64 (in the squares' array),
    # rounded to float32.
    xc = xc.copy_(x).sub_(centre)  # not torch.sub(x, centre, out=xc): with mixed dtypes it makes two |x|-sized arrays
    centred = x.copy_(xc) if x.device == dev and x.dtype == torch.float32 else xc.to(dev, torch.float32)
    del xc
    return centred, mean.to(dev), scale.to(dev)


def _fit_logistic(
    x: torch.Tensor,
    train: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    n_classes: int,
    c: float,
) -> torch.Tensor:
    """Logits ``(n, P, C)`` of P multinomial logistic regressions, one per row of ``train``/``y``, fitted jointly.

    Problem ``p`` minimises ``mean_{train rows} cross-entropy + |W_p|^2 / (2 c n_train_p)`` on features
    ``(x - mean_p) * scale_p``; the objectives are independent, so minimising their sum with one
    L-BFGS reaches every problem's optimum. Runs in float32; if the line search stalls before every
    gradient entry is below the tolerance, the fit continues in float64 from where it stopped.
    With two classes only ``w_1 - w_0`` reaches the logits and the optimum splits it evenly, so the
    penalty is taken with ``c / 2``: ``|w_1 - w_0|^2 / (2 c n_train)``, scikit-learn's binomial
    problem, whose one weight vector is ``w_1 - w_0``.
    """
    n, d = x.shape
    n_problems = train.shape[0]
    if n_classes == 2:
        c = c / 2
    weight = torch.zeros((n_problems, d, n_classes), device=x.device)
    bias = torch.zeros((n_problems, n_classes), device=x.device)
    for dtype in (torch.float32, torch.float64):
        weight, bias, gradient = _lbfgs_logistic(
            x.to(dtype), train, y, mean.to(dtype), scale.to(dtype), c, weight.to(dtype), bias.to(dtype)
        )
        if gradient <= LBFGS_TOLERANCE:
            break
        logger.debug("logistic probe: float32 L-BFGS stalled at gradient %.3g; continuing in float64", gradient)
    return _logistic_logits(x.to(weight.dtype), weight, bias, mean.to(weight.dtype), scale.to(weight.dtype)).float()


def _logistic_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Logits ``(n, P, C)``: the standardisation of each problem folded into its weights, one matrix product."""
    n, d = x.shape
    n_problems, _, n_classes = weight.shape
    w_eff = weight * scale[:, :, None]
    b_eff = bias - torch.einsum("pd,pdc->pc", mean * scale, weight)
    z = x @ w_eff.permute(1, 0, 2).reshape(d, n_problems * n_classes)
    return z.view(n, n_problems, n_classes) + b_eff


def _lbfgs_logistic(
    x: torch.Tensor,
    train: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    c: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One L-BFGS run from ``(weight, bias)``; returns the end point and its largest gradient entry.

    The loss and its gradient are written out (softmax minus one-hot, two matrix products) rather
    than taken by autograd: fewer passes over the ``(P * C, n)`` logits.
    """
    n, d = x.shape
    n_problems, _, n_classes = weight.shape
    count = train.sum(1).to(x.dtype)  # (P,)
    sample_weight = (train.to(x.dtype) / count[:, None]).unsqueeze(1)  # (P, 1, n): 1 / n_train on training rows
    penalty = (1.0 / (c * count))[:, None, None]  # gradient of |W|^2 / (2 c n_train)
    shift = mean * scale
    target = y.unsqueeze(1).contiguous()  # (P, 1, n)
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=LBFGS_MAX_ITER,
        tolerance_grad=LBFGS_TOLERANCE,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        # Logits laid out (P, C, n): the softmax reduces over C with n contiguous, which vectorises.
        with torch.no_grad():
            w_eff = (weight * scale[:, :, None]).permute(0, 2, 1).reshape(n_problems * n_classes, d)
            b_eff = bias - torch.einsum("pd,pdc->pc", shift, weight)
            z = torch.addmm(b_eff.reshape(-1, 1), w_eff, x.T).view(n_problems, n_classes, n)
            z -= z.amax(1, keepdim=True)
            picked = z.gather(1, target)
            z.exp_()
            total = z.sum(1, keepdim=True)
            loss = ((total.log_() - picked) * sample_weight).sum() + 0.5 * (penalty * weight * weight).sum()
            z.div_(total.exp_()).mul_(sample_weight)  # weighted softmax
            z.scatter_add_(1, target, -sample_weight)  # minus the one-hot target: d loss / d logits
            grad_bias = z.sum(2)  # (P, C)
            grad_eff = (z.view(n_problems * n_classes, n) @ x).view(n_problems, n_classes, d).transpose(1, 2)
            grad = grad_eff * scale[:, :, None] - shift[:, :, None] * grad_bias[:, None, :] + penalty * weight
            weight.grad = grad.contiguous()
            bias.grad = grad_bias.contiguous()
        return loss

    optimiser.step(closure)
    closure()
    grads = [p.grad for p in (weight, bias) if p.grad is not None]
    gradient = max(float(g.abs().max()) for g in grads)
    return weight.detach(), bias.detach(), gradient


def _fit_ridge(
    x: torch.Tensor,
    train: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    c: float,
    dev: torch.device,
) -> torch.Tensor:
    """Predictions ``(P, n)`` of P ridge regressions on standardised features, solved in float64."""
    dev64 = float64_device(dev)
    x64 = x.to(dev64, torch.float64)
    w = train.to(dev64, torch.float64)
    y = y.to(dev64)
    mean, scale = mean.to(dev64), scale.to(dev64)
    count = w.sum(1)
    y_mean = (w * y).sum(1) / count
    preds = []
    eye = torch.eye(x64.shape[1], dtype=torch.float64, device=dev64)
    for p in range(w.shape[0]):
        xs = (x64 - mean[p]) * scale[p]
        xw = xs * w[p][:, None]
        gram = xw.T @ xs + eye / c
        rhs = xw.T @ (y[p] - y_mean[p])
        coef = torch.linalg.solve(gram, rhs)
        preds.append(xs @ coef + y_mean[p])
    return torch.stack(preds)


def _fit_mlp(
    x: torch.Tensor,
    train: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    n_classes: int | None,
    seed: int,
    dev: torch.device,
) -> torch.Tensor:
    """Outputs of P one-hidden-layer ReLU probes trained together with Adam on minibatches.

    Classification (``n_classes`` given): logits ``(n, P, C)``. Regression: predictions ``(P, n)``,
    trained on each problem's standardised target.
    """
    n, d = x.shape
    n_problems = train.shape[0]
    hidden = MLP_HIDDEN
    out_dim = n_classes if n_classes is not None else 1
    gen = torch.Generator().manual_seed(seed)
    bound1, bound2 = 1.0 / math.sqrt(d), 1.0 / math.sqrt(hidden)
    w1 = ((torch.rand((n_problems, d, hidden), generator=gen) * 2 - 1) * bound1).to(x.device).requires_grad_()
    b1 = ((torch.rand((n_problems, hidden), generator=gen) * 2 - 1) * bound1).to(x.device).requires_grad_()
    w2 = ((torch.rand((n_problems, hidden, out_dim), generator=gen) * 2 - 1) * bound2).to(x.device).requires_grad_()
    b2 = torch.zeros((n_problems, out_dim), device=x.device, requires_grad=True)
    scale32, shift32 = scale.float(), (mean * scale).float()
    w_train = train.float()
    if n_classes is None:
        count = w_train.sum(1)
        y_mean = (w_train * y).sum(1) / count
        y_std = (((y - y_mean[:, None]) ** 2 * w_train).sum(1) / count).sqrt().clamp_min(1e-12)
        target = ((y - y_mean[:, None]) / y_std[:, None]).T  # (n, P)
    else:
        target = y.T  # (n, P)

    def forward(rows: torch.Tensor) -> torch.Tensor:
        w_eff = w1 * scale32[:, :, None]
        b_eff = b1 - torch.einsum("pd,pdh->ph", shift32, w1)
        h = torch.relu(
            (x[rows] @ w_eff.permute(1, 0, 2).reshape(d, n_problems * hidden)).view(-1, n_problems, hidden) + b_eff
        )
        return torch.einsum("nph,pho->npo", h, w2) + b2  # (rows, P, out)

    optimiser = torch.optim.Adam([w1, b1, w2, b2], lr=MLP_LEARNING_RATE)
    batch = min(MLP_BATCH, n)
    for _ in range(MLP_EPOCHS):
        order = torch.randperm(n, generator=gen).to(x.device)
        for lo in range(0, n, batch):
            rows = order[lo : lo + batch]
            out = forward(rows)
            if n_classes is None:
                per = (out.squeeze(-1) - target[rows]) ** 2 / 2.0
            else:
                per = torch.logsumexp(out, -1) - out.gather(-1, target[rows].unsqueeze(-1)).squeeze(-1)
            weights = w_train[:, rows].T  # (rows, P)
            loss = ((per * weights).sum(0) / weights.sum(0).clamp_min(1.0)).sum()
            loss = loss + MLP_WEIGHT_DECAY / 2.0 * ((w1 * w1).sum() + (w2 * w2).sum())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        out = torch.cat([forward(torch.arange(lo, min(n, lo + 4096), device=x.device)) for lo in range(0, n, 4096)])
    if n_classes is None:
        return (out.squeeze(-1) * y_std + y_mean).T
    return out


def _r2(pred: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R^2 of each problem over the selected rows (scikit-learn's ``r2_score``; 0 for a constant target)."""
    w = rows.double()
    count = w.sum(1)
    y_mean = (w * y).sum(1) / count
    ss_res = (w * (y - pred) ** 2).sum(1)
    ss_tot = (w * (y - y_mean[:, None]) ** 2).sum(1)
    return torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot.clamp_min(1e-300), torch.zeros_like(ss_tot))


def _confusion(y: torch.Tensor, pred: torch.Tensor, rows: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Held-out confusion counts ``(F, C, C)`` (rows true, columns predicted) of each fold."""
    n_folds = y.shape[0]
    fold = torch.arange(n_folds)[:, None].expand_as(y)
    code = (fold * n_classes + y) * n_classes + pred
    counts = torch.bincount(code[rows], minlength=n_folds * n_classes * n_classes)
    return counts.view(n_folds, n_classes, n_classes)


def _macro_f1(confusion: torch.Tensor) -> np.ndarray:
    """Macro-F1 of each fold over the classes present in its true or predicted labels (0 for an empty class)."""
    c = confusion.double()
    tp = c.diagonal(dim1=1, dim2=2)
    true = c.sum(2)
    predicted = c.sum(1)
    denom = true + predicted
    f1 = torch.where(denom > 0, 2.0 * tp / denom.clamp_min(1.0), torch.zeros_like(tp))
    present = denom > 0
    return ((f1 * present).sum(1) / present.sum(1).clamp_min(1)).numpy()


def _token_layer(t: torch.Tensor, mask: Any, rank: int, seed: int, func: str, name: str) -> _Layer:
    """Token activations ``t`` ``(n_samples, n_tokens, n_features)`` checked now (with ``mask``) and reduced to
    their moment features by :func:`_moment_features` when they are probed."""
    _token_mask(t, mask, func, name)
    n, n_tokens, d = t.shape
    r = min(rank, d)

    def prepare() -> torch.Tensor:
        return _moment_features(t, mask, rank, seed, func, name)

    def rows(index: np.ndarray) -> Iterator[np.ndarray]:
        return _row_blocks(t, index, int(n_tokens * d), None if mask is None else _token_mask(t, mask, func, name))

    return _Layer(name, int(n), 2 * int(d) + r * (r + 1) // 2, prepare, rows)


def _token_mask(t: torch.Tensor, mask: Any, func: str, name: str) -> torch.Tensor:
    """The float64 ``(n_samples, n_tokens)`` mask of real tokens, after checking the layer ``t`` and ``mask``."""
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise DataError(f"{func}: layer '{name}' must hold real numbers. Got dtype {t.dtype}.")
    n, n_tokens, d = t.shape
    if n < 2 or n_tokens < 1 or d < 1:
        raise DataError(
            f"{func}: layer '{name}' must have shape (n_samples >= 2, n_tokens >= 1, n_features >= 1). Got {tuple(t.shape)}."
        )
    if t.is_floating_point() and not is_finite(t):
        raise DataError(f"{func}: layer '{name}' contains NaN or infinite values; remove or impute them first.")
    if mask is None:
        return torch.ones((n, n_tokens), dtype=torch.float64)
    m_arr = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    if tuple(m_arr.shape) != (n, n_tokens):
        raise DataError(
            f"{func}: 'mask' must have shape (n_samples, n_tokens) = {(n, n_tokens)}. Got {tuple(m_arr.shape)}."
        )
    if not (m_arr.dtype == torch.bool or bool(((m_arr == 0) | (m_arr == 1)).all())):
        raise DataError(f"{func}: 'mask' must be True/False (or 1/0) per token, marking real tokens and padding; "
                        "it holds other values.")
    m = m_arr.to(torch.float64)
    count = m.sum(1)
    if bool((count <= 0).any()):
        raise DataError(
            f"{func}: {int((count <= 0).sum())} samples have no real token in 'mask'; each needs at least one."
        )
    return m


def _moment_features(t: torch.Tensor, mask: Any, rank: int, seed: int, func: str, name: str) -> torch.Tensor:
    """Per-sample [mean token, per-feature token variance, rank x rank projected token covariance], computed for a block
    of samples at a time (each sample's features are its own), so that float64 work arrays of a block, not of the whole
    ``(n_samples, n_tokens, n_features)`` layer, are held next to it."""
    m = _token_mask(t, mask, func, name)
    n, n_tokens, d = t.shape
    count = m.sum(1)
    r = min(rank, d)
    directions = None
    if r > 0:
        gen = torch.Generator().manual_seed(seed)
        directions, _ = torch.linalg.qr(torch.randn((d, r), generator=gen, dtype=torch.float64))
    rows, cols = torch.triu_indices(r, r)
    features = torch.empty((n, 2 * d + len(rows)), dtype=torch.float64)
    step = max(1, _MOMENT_BLOCK_VALUES // (n_tokens * d))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        x = t[lo:hi].to(torch.float64)
        weights = m[lo:hi, :, None]
        count_b = count[lo:hi, None]
        mu = (weights * x).sum(1) / count_b
        centred = (x - mu[:, None, :]) * weights
        del x
        features[lo:hi, :d] = mu
        features[lo:hi, d : 2 * d] = (centred * centred).sum(1) / count_b
        if directions is not None:
            z = centred @ directions  # (samples, T, r)
            cov = torch.einsum("ntr,nts->nrs", z, z) / count_b[:, :, None]
            features[lo:hi, 2 * d :] = cov[:, rows, cols]
    return _centred_float32(features, name, func, in_place=True)
