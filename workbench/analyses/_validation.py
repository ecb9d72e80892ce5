"""Input checks shared by all analyses.

Public analysis functions validate once with these helpers and then call cores that trust their
inputs. Every failure is a :class:`~workbench.errors.WorkbenchError` whose message names the
argument and the function.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.errors import (
    ConstantDataError,
    DataError,
    ParameterError,
    UnknownLayerError,
    did_you_mean,
    format_choices,
    non_finite,
)

ArrayLike = Any  # numpy array, torch tensor, or nested sequence of numbers


def as_matrix(
    x: ArrayLike,
    name: str,
    *,
    func: str,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    min_samples: int = 2,
) -> torch.Tensor:
    """Check ``x`` is a finite ``(n_samples, n_features)`` array and return it as a tensor.

    The input is never modified: a new tensor (or a view that is only read) is returned.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        not_an_array(x, name, func=func)
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{func}: '{name}' must be a numeric array of shape (n_samples, n_features); it could not be converted ({exc}).") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(
                f"{func}: '{name}' must be a numeric array of shape (n_samples, n_features). Got dtype {arr.dtype}."
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        hint = " Reshape with x.reshape(len(x), -1) or pool it first." if t.ndim > 2 else " Use x.reshape(-1, 1) for a single feature."
        raise DataError(
            f"{func}: '{name}' must be 2-D (n_samples, n_features). Got shape {tuple(t.shape)}.{hint}"
        )
    if t.shape[0] < min_samples:
        raise DataError(
            f"{func}: '{name}' needs at least {min_samples} sample{'s' if min_samples != 1 else ''}. Got {t.shape[0]}."
        )
    if t.shape[1] < 1:
        raise DataError(f"{func}: '{name}' has no features (shape {tuple(t.shape)}).")
    if t.is_complex():
        raise DataError(f"{func}: '{name}' must be real-valued. Got dtype {t.dtype}.")
    source = t
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if not is_finite(t):
        n_bad = int((~torch.isfinite(source)).sum()) if source.is_floating_point() else 0
        if n_bad:
            raise DataError(
                f"{func}: '{name}' contains {non_finite(n_bad)}; remove or impute them before the analysis."
            )
        n_big = int((~torch.isfinite(t)).sum())
        raise DataError(
            f"{func}: {n_big} value{'s' if n_big != 1 else ''} of '{name}' {'lie' if n_big != 1 else 'lies'} beyond the {str(dtype).removeprefix('torch.')} "
            f"range (|x| > {torch.finfo(dtype).max:.3g}) that this analysis computes in; rescale the data first."
        )
    return t


def is_finite(t: torch.Tensor) -> bool:
    """Whether every value of the floating-point tensor ``t`` is finite, read as one reduction (the largest ``|value|``,
    which a NaN or an infinity makes non-finite) without the ``t``-sized flags of ``torch.isfinite(t).all()``."""
    return t.numel() == 0 or math.isfinite(float(torch.linalg.vector_norm(t, math.inf)))


def _is_dataset(obj: Any) -> bool:
    """A :class:`~workbench.data.Dataset` (recognised by its fields: the data package imports this module)."""
    return all(hasattr(obj, a) for a in ("x", "y", "sha256", "n_samples"))


def not_an_array(x: Any, name: str, *, func: str) -> None:
    """Raise a sentence for the objects that are most often passed where one array belongs."""
    kind = type(x).__name__
    if isinstance(x, Mapping):
        layers = format_choices([str(k) for k in x])
        raise DataError(
            f"{func}: '{name}' must be one (n_samples, n_features) array; got {kind} of {len(x)} "
            f"layer{'s' if len(x) != 1 else ''} ({layers}). Pass one layer, such as {name}[{str(next(iter(x), 'layer'))!r}]."
        )
    if isinstance(x, nn.Module) or hasattr(x, "module") and isinstance(getattr(x, "module", None), nn.Module):
        raise DataError(
            f"{func}: '{name}' must be an (n_samples, n_features) array of activations; got the model itself ({kind}). "
            "Extract activations first: extract(model, dataset, layers)."
        )
    if _is_dataset(x):
        raise DataError(
            f"{func}: '{name}' must be an (n_samples, n_features) array of activations; got a dataset. "
            "Extract activations first (extract(model, dataset, layers)), or pass dataset.x for the raw inputs."
        )


def unit_scale(t: torch.Tensor) -> float:
    """The power of two that brings the largest ``|value|`` of ``t`` into [0.5, 1) (1.0 for an all-zero ``t``),
    at most ``2**1022``.

    Multiplying by a power of two is exact, so scale-free measures give the same bits on data of ordinary
    scale, while products of several values (kernel statistics, squared distances) stay inside the float64
    range for data as large as 1e300 or as small as 1e-300. For subnormal data (largest ``|value|`` below
    ``2**-1022``, about 2.2e-308), whose factor into [0.5, 1) would itself overflow, the factor is capped at
    ``2**1022``: the largest value then lands in [2**-52, 0.5), still far inside the range where squares and
    products of four values are normal, and results divided by it come back at the data's scale, rounded only to
    the resolution of subnormal numbers that the data themselves have."""
    largest = float(t.abs().max()) if t.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 1.0
    # 2**1022 and its inverse 2**-1022 (the smallest normal float64) are both normal, so either can be applied exactly
    return math.ldexp(1.0, min(-math.frexp(largest)[1], 1022))


def check_paired(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y"), *, func: str) -> None:
    """Check two representations describe the same samples (same number of rows)."""
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{func}: '{names[0]}' and '{names[1]}' must have the same number of samples (rows). "
            f"Got {x.shape[0]} and {y.shape[0]}; extract both on the same dataset."
        )


def check_layer_names(acts: Any, names: Any, *, func: str, arg: str | None = None) -> list[str]:
    """The requested layer names, each of which must be a key of ``acts`` (the argument ``arg``), else one
    sentence listing the valid ones."""
    available = [str(k) for k in acts]
    where = f" in '{arg}'" if arg else ""
    for name in names:
        if name not in acts:
            raise UnknownLayerError(
                f"{func}: unknown layer '{name}'{where}.{did_you_mean(str(name), available)} Layers: {format_choices(available)}."
            )
    return list(names)


def check_same_dataset(a: Any, b: Any, *, func: str) -> None:
    """Two sets of activations compared sample by sample must come from the same inputs: when both record
    a content hash of the inputs (as :class:`~workbench.Activations` do), the hashes must agree; labels do
    not matter, so a dataset and its unlabelled array compare. Same row counts alone do not catch a
    shuffled or different dataset of the same size."""
    sha_a, sha_b = getattr(a, "inputs_sha256", ""), getattr(b, "inputs_sha256", "")
    what = "inputs sha256"
    if not (sha_a and sha_b):  # activations made before inputs were hashed apart from labels
        sha_a, sha_b = getattr(a, "dataset_sha256", ""), getattr(b, "dataset_sha256", "")
        what = "sha256"
    if sha_a and sha_b and sha_a != sha_b:
        name_a, name_b = getattr(a, "dataset_name", "") or "?", getattr(b, "dataset_name", "") or "?"
        raise DataError(
            f"{func}: the two activations come from different datasets ('{name_a}', {what} {sha_a[:12]}, and "
            f"'{name_b}', {what} {sha_b[:12]}); sample i of A is compared with sample i of B, so extract both "
            "models on the same dataset."
        )


def check_not_constant(x: torch.Tensor, name: str, *, func: str) -> None:
    """Raise when every feature of ``x`` is constant over samples (every row equals the first: compared exactly, since
    the mean of equal values can differ from them by rounding)."""
    if bool((x == x[:1]).all()):
        raise ConstantDataError(
            f"{func}: '{name}' is constant over samples (zero variance in every feature), so the measure is undefined; "
            "pick another layer or check that the model is not dead on this dataset."
        )


MAX_SEED = 2**32 - 1  # what numpy's and scikit-learn's seeding accept


def check_seed(value: Any, *, func: str) -> int:
    """Check ``value`` is a seed every library the analyses seed accepts (an int in ``[0, 2**32 - 1]``)."""
    return check_int(value, "seed", func=func, low=0, high=MAX_SEED)


def check_int(value: Any, name: str, *, func: str, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """Check ``value`` is an int in ``[low, high]`` and return it; ``why`` (", since ...") explains the bounds."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    rng = f" in {'[' if low is not None else '('}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}" \
          f"{']' if high is not None else ')'}"
    raise ParameterError(f"The '{name}' parameter of {func} must be an int{rng}{why}. Got {value!r}.")


def check_float(value: Any, name: str, *, func: str, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True) -> float:
    """Check ``value`` is a finite real number in the given range and return it as float."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and np.isfinite(value):
        v = float(value)
        above = low is None or (v >= low if low_inclusive else v > low)
        below = high is None or v <= high
        if above and below:
            return v
    # infinities are refused, so an open end is written with a parenthesis: (0.0, inf), not (0.0, inf]
    bracket = "[" if low_inclusive and low is not None else "("
    rng = f" in {bracket}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
    raise ParameterError(f"The '{name}' parameter of {func} must be a number{rng}. Got {value!r}.")


def check_choice(value: Any, name: str, choices: Collection[str], *, func: str) -> str:
    """Check ``value`` is one of ``choices`` and return it."""
    if value in choices:
        return value
    opts = ", ".join(repr(c) for c in choices)
    raise ParameterError(f"The '{name}' parameter of {func} must be one of {opts}. Got {value!r}.")


def as_labels(y: ArrayLike, n_samples: int, *, func: str, name: str = "labels", classes: bool = False) -> np.ndarray:
    """Check ``y`` is a 1-D array of ``n_samples`` labels of one type and return it as numpy. With ``classes``,
    float labels must be finite (a NaN is no class)."""
    if y is None:
        raise DataError(f"{func}: '{name}' are required; use a dataset with labels (or pass labels where the function takes them).")
    if _is_dataset(y):
        raise DataError(f"{func}: '{name}' must be one label per sample; got a dataset. Pass its labels: dataset.y.")
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise DataError(f"{func}: '{name}' must be 1-D with one label per sample. Got shape {arr.shape}.")
    if arr.dtype.kind in "US" and isinstance(y, (list, tuple)) and not all(isinstance(v, str) for v in y):
        kinds = sorted({type(v).__name__ for v in y})  # numpy turned the numbers among them into text
        raise DataError(f"{func}: '{name}' mix value types ({', '.join(kinds)}); give every sample a label of one type "
                        "(all int or all str).")
    if arr.shape[0] != n_samples:
        raise DataError(
            f"{func}: '{name}' has {arr.shape[0]} entries but the activations have {n_samples} samples; they must match."
        )
    if arr.dtype == object:
        kinds = {"str" if isinstance(v, str) else "int" if isinstance(v, (int, np.integer)) else type(v).__name__ for v in arr}
        if len(kinds) > 1 or not kinds <= {"str", "int"}:
            raise DataError(
                f"{func}: '{name}' mix value types ({', '.join(sorted(kinds))}); give every sample a label of one type "
                "(all int or all str)."
            )
        arr = arr.astype(str if kinds == {"str"} else np.int64)
    if classes and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(
            f"{func}: '{name}' contain {non_finite(int((~np.isfinite(arr)).sum()))}, which are no class; "
            "drop those samples or give them a label."
        )
    return arr


def check_bool(value: Any, name: str, *, func: str) -> bool:
    """Check ``value`` is a bool (Python or numpy) and return it."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ParameterError(f"The '{name}' parameter of {func} must be True or False. Got {value!r}.")


def check_progress(progress: Any, *, func: str) -> None:
    """Check ``progress`` is None or a callable ``(done, total)``."""
    if progress is not None and not callable(progress):
        raise ParameterError(
            f"The 'progress' parameter of {func} must be a callable (done, total) or None. Got {progress!r}."
        )
