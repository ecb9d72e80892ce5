"""Datasets: bundled (digits, blobs, sentences) and uploaded tensor files.

A :class:`Dataset` holds inputs ``x`` (a tensor whose first axis is samples), optional labels
``y``, a name and the sha256 of its content, which keys every cache downstream.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.device import own_memory
from workbench.errors import (
    CorruptFileError,
    DataError,
    FileTooLargeError,
    ParameterError,
    UnsafeFileError,
    UnsupportedFormatError,
    format_choices,
)

BUILTIN_DATASETS = ("digits", "blobs", "sentences")
UPLOAD_FORMATS = (".npz", ".csv", ".pt")
LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
MAX_DATASET_BYTES = 1 << 30


@dataclass(frozen=True)
class Dataset:
    """Inputs and optional labels.

    ``x``: ``(n_samples, ...)`` float32 features or int64 token ids. ``y``: ``(n_samples,)`` int64
    class labels, float targets, or None. ``sha256`` hashes ``x`` and ``y``.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None
    sha256: str
    class_names: tuple[str, ...] | None = None
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_versions", _versions(self.x, self.y))

    def __setstate__(self, state: dict[str, Any]) -> None:  # a copy's tensors count their changes from zero
        self.__dict__.update(state)
        object.__setattr__(self, "_versions", _versions(self.x, self.y))

    def check_unchanged(self) -> None:
        """Raise where ``x`` or ``y`` was changed in place after the dataset was made: :attr:`sha256` would no
        longer describe the content, and caches keyed by it would hand back results of the old content."""
        if _versions(self.x, self.y) != self._versions:
            raise DataError(f"Dataset '{self.name}' was changed in place after it was made, so its sha256 no longer "
                            "describes it; build a new dataset from the changed arrays with make_dataset(name, x, y).")

    def __repr__(self) -> str:
        labels = "no labels" if self.y is None else (
            f"{self.n_classes} classes" if self.n_classes is not None else "float targets")
        return (f"Dataset({self.name!r}, x {tuple(self.x.shape)} {str(self.x.dtype).removeprefix('torch.')}, {labels}, "
                f"sha256 {self.sha256[:12]})")

    @cached_property
    def inputs_sha256(self) -> str:
        """sha256 of the inputs alone: the same for a dataset and its unlabelled copy (activations depend only on ``x``).
        :func:`make_dataset` computes it with :attr:`sha256` in one pass over ``x``."""
        return content_hashes(self.x, self.y)[1]

    def named_labels(self) -> np.ndarray | None:
        """The labels as class names where the dataset names its classes (for legends and tables), else as stored."""
        if self.y is None:
            return None
        y = self.y.numpy()
        if self.class_names and y.dtype.kind in "iu" and y.size and 0 <= y.min() and y.max() < len(self.class_names):
            return np.asarray(self.class_names, dtype=object)[y]
        return y

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x.shape[1:]))

    @property
    def n_classes(self) -> int | None:
        if self.y is None or self.y.dtype.is_floating_point:
            return None
        return int(self.y.max()) + 1

    def subset(self, indices: np.ndarray | torch.Tensor | slice, name: str | None = None) -> Dataset:
        """The same dataset restricted to ``indices``."""
        try:
            x = self.x[indices]
            y = None if self.y is None else self.y[indices]
        except (IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"Dataset '{self.name}' has {self.n_samples} samples; the indices {_preview(indices)} do not select "
                            f"from it ({str(exc).splitlines()[0]}).") from exc
        return make_dataset(name or f"{self.name}[subset]", x, y, class_names=self.class_names, description=self.description,
                            info={k: v for k, v in self.info.items() if k == "labels"})


def _versions(*tensors: torch.Tensor | None) -> tuple[int | None, ...]:
    """How often each tensor was changed in place (torch counts it; ``None`` where a tensor keeps no count)."""
    out = []
    for t in tensors:
        try:
            out.append(None if t is None else t._version)
        except RuntimeError:  # a tensor made under torch.inference_mode keeps no version counter
            out.append(None)
    return tuple(out)


def _preview(indices: object) -> str:
    text = repr(indices)
    return text if len(text) <= 60 else text[:57] + "..."


def _hash_update(h: Any, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"<none>")
        return
    arr = t.detach().cpu().contiguous().numpy()
    h.update(f"{arr.dtype}|{arr.shape}|".encode())
    h.update(memoryview(arr).cast("B"))


def content_hash(*tensors: torch.Tensor | None) -> str:
    """sha256 over dtype, shape and bytes of each tensor (None contributes a marker)."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_update(h, t)
    return h.hexdigest()


def content_hashes(x: torch.Tensor, y: torch.Tensor | None) -> tuple[str, str]:
    """``(content_hash(x, y), content_hash(x, None))`` with one pass over ``x``."""
    h = hashlib.sha256()
    _hash_update(h, x)
    inputs = h.copy()
    _hash_update(h, y)
    _hash_update(inputs, None)
    return h.hexdigest(), inputs.hexdigest()


def make_dataset(name: str, x: Any, y: Any = None, *, class_names: tuple[str, ...] | None = None,
                 description: str = "", info: dict[str, Any] | None = None) -> Dataset:
    """Validate arrays and build a :class:`Dataset` (float inputs -> float32, integer labels -> int64).

    The dataset holds its own copy where ``x`` or ``y`` would otherwise share memory with the caller's
    arrays: its hash keys every cache, so a later edit of those arrays must not change its content."""
    x_in = xt = _to_tensor(x, "x")
    if xt.ndim < 2:
        xt = xt.reshape(-1, 1) if xt.ndim == 1 else xt
    if xt.shape[0] == 0:
        raise DataError(f"Dataset '{name}' is empty (0 samples); provide at least one sample.")
    if xt.dtype.is_floating_point:
        n_bad = int((~torch.isfinite(xt)).sum())
        if n_bad:
            raise DataError(f"Dataset '{name}' contains {n_bad} NaN or infinite values; remove or impute them, then load the data again.")
        xt = xt.to(torch.float32)
        n_big = int((~torch.isfinite(xt)).sum())
        if n_big:
            raise DataError(f"Dataset '{name}' has {n_big} value{'s' if n_big != 1 else ''} beyond the float32 range (|x| > 3.4e+38) "
                            "that models compute in; rescale the data, then load it again.")
    elif xt.dtype == torch.bool:
        xt = xt.to(torch.float32)
    else:
        xt = xt.to(torch.int64)
    xt = own_memory(xt, x_in)
    yt = None
    if y is not None:
        y_in = yt = _to_tensor(y, "y")
        yt = yt.reshape(-1)
        if yt.shape[0] != xt.shape[0]:
            raise DataError(
                f"Dataset '{name}' has {xt.shape[0]} samples but {yt.shape[0]} labels; they must match."
            )
        if yt.dtype.is_floating_point:
            if bool((yt == yt.round()).all()) and yt.numel() and float(yt.min()) >= 0 and len(torch.unique(yt)) <= 1000:
                yt = yt.to(torch.int64)
            elif not bool(torch.isfinite(yt).all()):
                raise DataError(f"The labels of dataset '{name}' contain NaN or infinite values.")
            else:
                yt = yt.to(torch.float32)
        else:
            yt = yt.to(torch.int64)
            if yt.numel() and int(yt.min()) < 0:
                raise DataError(f"Class labels of dataset '{name}' must be non-negative integers; got a minimum of {int(yt.min())}.")
        yt = own_memory(yt, y_in)
    full, inputs = content_hashes(xt, yt)
    made = Dataset(name=name, x=xt, y=yt, sha256=full, class_names=class_names,
                   description=description, info=dict(info or {}))
    made.__dict__["inputs_sha256"] = inputs  # the cached property's value, from the same pass
    return made


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"The dataset's '{what}' must be numeric; got values of type {arr.dtype}.")
    return torch.from_numpy(np.ascontiguousarray(arr))


# ---------------------------------------------------------------------------------------------
# bundled datasets


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float64), digits.target, test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED, stratify=digits.target,
    )
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), y_train, ((x_test - mean) / std).astype(np.float32), y_test


def digits(split: str = "test") -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 64 features), standardised with the train split's
    mean and std; a fixed stratified split: 1347 train, 450 test (``random_state=0``)."""
    if split not in ("train", "test", "all"):
        raise ParameterError(f"The 'split' parameter of digits must be 'train', 'test' or 'all'. Got {split!r}.")
    x_train, y_train, x_test, y_test = _digits_arrays()
    if split == "train":
        x, y = x_train, y_train
    elif split == "test":
        x, y = x_test, y_test
    else:
        x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    return make_dataset(f"digits ({split})", x, y, class_names=tuple(str(i) for i in range(10)),
                        description="scikit-learn 8x8 digits, standardised", info={"split": split})


def digits_train_for(dataset: Dataset) -> Dataset | None:
    """The bundled digits train split when ``dataset`` is the bundled test split (by content: a file named
    'digits…' is not), else None: the split analyses add for statistics and a second evaluation."""
    return digits("train") if dataset.sha256 == digits("test").sha256 else None


BLOBS_OPTIONS = ("separation", "n_samples", "n_features", "n_classes", "seed")


def blobs(separation: float = 3.0, *, n_samples: int = 1000, n_features: int = 64, n_classes: int = 5,
          seed: int = 0) -> Dataset:
    """Gaussian classes with controllable separation.

    Class centres are ``separation`` times random unit vectors; within-class noise is isotropic
    with unit variance. ``separation=0`` gives fully overlapping classes; 3 or more, well separated.
    """
    if not (isinstance(separation, (int, float)) and separation >= 0):
        raise ParameterError(f"The 'separation' parameter of blobs must be a number >= 0. Got {separation!r}.")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n_samples) % n_classes
    x = centres[y] + rng.standard_normal((n_samples, n_features))
    return make_dataset(f"blobs (sep={separation:g}, seed={seed})", x.astype(np.float32), y,
                        class_names=tuple(f"class {i}" for i in range(n_classes)),
                        description="isotropic Gaussian classes", info={"separation": separation, "seed": seed, "n_samples": n_samples,
                              "n_features": n_features, "n_classes": n_classes})


def load_dataset(source: str | Path | bytes, *, split: str | None = None, filename: str | None = None,
                 max_bytes: int = MAX_DATASET_BYTES, **options: Any) -> Dataset:
    """Load a bundled dataset by name, or an uploaded tensor file.

    ``source``: ``"digits"``, ``"blobs"`` (options: ``separation``, ``n_samples``, ``n_features``,
    ``n_classes``, ``seed``), ``"sentences"``, a path to ``.npz`` / ``.csv`` / ``.pt``, or the bytes
    of such a file (then ``filename`` gives its type). ``.npz`` is read with ``allow_pickle=False``
    (arrays ``x`` and optional ``y``); ``.csv`` must be numeric with an optional label column named
    one of ``label, labels, y, target, class``; ``.pt`` is read with ``weights_only=True`` (a tensor,
    or a dict with ``x`` and optional ``y``). ``split`` (``"train"``, ``"test"`` the default, ``"all"``)
    applies to digits and sentences; an option a source does not take is refused, not ignored.
    """
    builtin = isinstance(source, str) and source in BUILTIN_DATASETS
    label = repr(source) if builtin else "a dataset file"
    if split is not None and (not builtin or source == "blobs"):
        raise ParameterError(f"split={split!r} applies to the bundled digits and sentences only; {label} has no splits "
                             "(blobs takes seed= for another sample).")
    allowed = BLOBS_OPTIONS if source == "blobs" else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes {format_choices(allowed)}" if allowed else "takes no options"
        raise ParameterError(f"load_dataset({label}) does not take {', '.join(unknown)}; it {takes}.")
    if builtin:
        if source == "digits":
            return digits(split or "test")
        if source == "blobs":
            return blobs(**options)
        from workbench.data.sentences import sentences

        return sentences(split or "test")
    if isinstance(source, (bytes, bytearray)):
        if filename is None:
            raise ParameterError("Pass filename= with the uploaded bytes so the file type is known (e.g. 'data.npz').")
        data, name = bytes(source), filename
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"No dataset named {str(source)!r}: it is neither a bundled dataset ({format_choices(BUILTIN_DATASETS)}) nor an existing file."
            )
        if path.stat().st_size > max_bytes:
            raise FileTooLargeError(f"Dataset file '{path.name}' is {path.stat().st_size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit.")
        data, name = path.read_bytes(), path.name
    if len(data) > max_bytes:
        raise FileTooLargeError(f"Dataset file '{name}' is {len(data) / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit.")
    if not data:
        raise DataError(f"Dataset file '{name}' is empty (0 bytes).")
    suffix = Path(name).suffix.lower()
    stem = Path(name).stem
    class_names = None
    if suffix == ".npz":
        x, y, class_names = _read_npz(data, name)
    elif suffix == ".csv":
        x, y = _read_csv(data, name)
    elif suffix == ".pt":
        x, y = _read_pt(data, name)
    else:
        raise UnsupportedFormatError(
            f"Cannot read dataset file '{name}': supported types are {', '.join(UPLOAD_FORMATS)} (or a bundled name: {', '.join(BUILTIN_DATASETS)})."
        )
    info: dict[str, Any] = {"file": name}
    if y is not None and np.asarray(y).dtype.kind in "US":
        if class_names is not None:
            raise DataError(f"'{name}' has text labels and 'class_names'; give integer labels with 'class_names', or text labels alone.")
        names, y = np.unique(np.char.strip(np.asarray(y).astype(str)), return_inverse=True)
        class_names = tuple(str(c) for c in names)
        info["labels"] = TEXT_LABELS_NOTE
    return make_dataset(stem, x, y, class_names=class_names, description=f"uploaded {suffix} file", info=info)


TEXT_LABELS_NOTE = "text, numbered in sorted order"


def label_order_note(dataset: Dataset) -> str | None:
    """For text labels: a sentence saying how they were numbered, for results that compare a model's outputs with them."""
    if dataset.info.get("labels") != TEXT_LABELS_NOTE or not dataset.class_names:
        return None
    shown = ", ".join(f"{c} → {i}" for i, c in enumerate(dataset.class_names[:6]))
    more = ", …" if len(dataset.class_names) > 6 else ""
    return (f"The labels of '{dataset.name}' were text, numbered in sorted order ({shown}{more}); accuracies of a model "
            "assume its outputs follow that order. If they do not, give integer labels in the model's order.")


def _read_npz(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    if not data.startswith(b"PK"):
        raise CorruptFileError(f"'{name}' is not a readable .npz file (not a zip archive); re-save it with np.savez.")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            keys = list(f.keys())
            if not keys:
                raise DataError(f"'{name}' holds no arrays; save features as 'x' (and labels as 'y').")
            xkey = "x" if "x" in keys else ("X" if "X" in keys else (keys[0] if len(keys) == 1 else None))
            if xkey is None:
                raise DataError(f"'{name}' holds the arrays {', '.join(keys)} but none named 'x'; save the features as 'x' "
                                "(and labels as 'y'): np.savez(path, x=x, y=y).")
            x = f[xkey]
            y = f["y"] if "y" in keys else (f["labels"] if "labels" in keys else None)
            names = f["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UnsafeFileError(
                f"'{name}' stores Python objects that need unpickling, which can run code; save plain numeric arrays with np.savez(path, x=x, y=y)."
            ) from exc
        raise CorruptFileError(f"'{name}' is not a readable .npz file ({exc}); re-save it with np.savez.") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise CorruptFileError(f"'{name}' is not a readable .npz file ({exc}); re-save it with np.savez.") from exc
    class_names = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"'class_names' in '{name}' must be a 1-D array of strings; got shape {names.shape} of {names.dtype}.")
        class_names = tuple(str(c) for c in names)
        if y is not None and np.asarray(y).dtype.kind in "iu" and np.asarray(y).size and int(np.max(y)) >= len(class_names):
            raise DataError(f"'{name}' has labels up to {int(np.max(y))} but {len(class_names)} class_names; give one name per class.")
    return x, y, class_names


def _read_csv(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"'{name}' is not UTF-8 text, so it cannot be read as CSV.") from exc
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        raise DataError(f"'{name}' has no rows.")
    header = rows[0]

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    has_header = not all(numeric(c) for c in header)
    body = rows[1:] if has_header else rows
    if not body:
        raise DataError(f"'{name}' has a header but no data rows.")
    width = len(body[0])
    for i, r in enumerate(body):
        if len(r) != width:
            raise CorruptFileError(f"Row {i + 1 + has_header} of '{name}' has {len(r)} columns; expected {width} like the first row.")
    label_idx = None
    if has_header:
        lowered = [h.strip().lower() for h in header]
        label_idx = next((lowered.index(c) for c in LABEL_COLUMNS if c in lowered), None)
    columns = list(zip(*body))
    feature_cols = [j for j in range(width) if j != label_idx]
    for j in feature_cols:
        col_name = header[j] if has_header else f"column {j + 1}"
        empty = next((i for i, c in enumerate(columns[j]) if not c.strip()), None)
        if empty is not None:
            raise DataError(
                f"Row {empty + 1 + has_header} of '{name}' has no value in column '{col_name}'; fill in or drop the rows "
                "with missing values."
            )
        bad = next((c for c in columns[j] if not numeric(c)), None)
        if bad is not None:
            raise DataError(
                f"Column '{col_name}' of '{name}' holds text ({bad!r}); CSV features must be numbers. "
                f"Remove or encode the column, or name the label column one of: {', '.join(LABEL_COLUMNS)}."
            )
    x = np.array([[float(r[j]) for j in feature_cols] for r in body], dtype=np.float64)
    y = None
    if label_idx is not None:
        raw = columns[label_idx]
        empty = next((i for i, c in enumerate(raw) if not c.strip()), None)
        if empty is not None:
            raise DataError(
                f"Row {empty + 2} of '{name}' has no label in column '{header[label_idx]}'; fill in or drop the rows "
                "without a label."
            )
        y = np.array([float(c) for c in raw]) if all(numeric(c) for c in raw) else np.array(raw)
    return x, y


def _read_pt(data: bytes, name: str) -> tuple[Any, Any]:
    import pickle

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"'{name}' needs full unpickling, which can run code; save plain tensors with torch.save({{'x': x, 'y': y}}, path)."
        ) from exc
    except Exception as exc:  # torch raises many types for damaged archives
        raise CorruptFileError(f"'{name}' is not a readable torch file ({type(exc).__name__}); re-save it with torch.save.") from exc
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, dict) and "x" in obj:
        return obj["x"], obj.get("y")
    raise DataError(f"'{name}' must hold a tensor or a dict with 'x' (and optional 'y'); got {type(obj).__name__}.")
