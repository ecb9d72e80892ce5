"""Datasets: bundled (digits, blobs, sentences) and uploaded tensor files.

A :class:`Dataset` holds inputs ``x`` (a tensor whose first axis is samples), optional labels
``y``, a name and the sha256 of its content, which keys every cache downstream.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import os
import re
import zipfile
from array import array
from collections.abc import Iterator
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
    WorkbenchError,
    format_choices,
    non_finite,
)

BUILTIN_DATASETS = ("digits", "blobs", "sentences")
UPLOAD_FORMATS = (".npz", ".csv", ".pt")
LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
LABEL_KEYS = ("y", "labels", "label", "target", "targets")  # names of the labels in an .npz or .pt file, in any case
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
MAX_DATASET_BYTES = 1 << 30
MAX_CLASSES = 100_000  # class labels are 0 .. MAX_CLASSES - 1: per-class arrays downstream grow with the largest label


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
        """The same dataset restricted to ``indices`` (a 1-D list, array or tensor of sample indices or a boolean mask, or a slice)."""
        if isinstance(indices, tuple):
            indices = list(indices)
        if not isinstance(indices, slice) and _index_ndim(indices) != 1:
            raise DataError(f"Dataset.subset takes a 1-D list, array or slice of sample indices (such as [3, 5] or slice(0, 10)) "
                            f"to select from '{self.name}'; got {_preview(indices)}.")
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


def _index_ndim(indices: object) -> int | None:
    """How many axes ``indices`` has (0 for a single number), or None where it is not array-like."""
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        return indices.ndim
    try:
        return np.ndim(indices)
    except ValueError:  # a ragged list
        return None


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
    if xt.numel() == 0:
        raise DataError(f"Dataset '{name}' has no features (x has shape {tuple(xt.shape)}); give each sample at least one feature.")
    if xt.dtype.is_floating_point:
        n_bad = int((~torch.isfinite(xt)).sum())
        if n_bad:
            raise DataError(f"Dataset '{name}' contains {non_finite(n_bad)}; remove or impute them, then load the data again.")
        xt = xt.to(torch.float32)
        n_big = int((~torch.isfinite(xt)).sum())
        if n_big:
            raise DataError(f"Dataset '{name}' has {n_big} value{'s' if n_big != 1 else ''} beyond the float32 range (|x| > 3.4e+38) "
                            "that models compute in; rescale the data, then load it again.")
    elif xt.dtype == torch.bool:
        xt = xt.to(torch.float32)
    else:
        xt = _as_int64(xt, "x", name)
    xt = own_memory(xt, x_in)
    yt = None
    if y is not None:
        y_in = yt = _to_tensor(y, "y")
        if yt.ndim > 1 and math.prod(yt.shape[1:]) != 1:
            raise DataError(f"The labels 'y' of dataset '{name}' must be 1-D (one class id or target per sample) but have shape "
                            f"{tuple(yt.shape)}; for one-hot labels pass y.argmax(1).")
        yt = yt.reshape(-1)
        if yt.shape[0] != xt.shape[0]:
            raise DataError(
                f"Dataset '{name}' has {xt.shape[0]} samples but {yt.shape[0]} labels; they must match."
            )
        if yt.dtype.is_floating_point:
            if not bool(torch.isfinite(yt).all()):
                raise DataError(f"The labels of dataset '{name}' contain NaN or infinite values.")
            if (bool((yt == yt.round()).all()) and yt.numel() and 0 <= float(yt.min()) and float(yt.max()) < MAX_CLASSES
                    and len(torch.unique(yt)) <= 1000):
                yt = yt.to(torch.int64)
            else:
                yt = yt.to(torch.float32)
                if not bool(torch.isfinite(yt).all()):
                    raise DataError(f"The float targets of dataset '{name}' reach beyond the float32 range (|y| > 3.4e+38); "
                                    "rescale them, then load the data again.")
        else:
            yt = _as_int64(yt, "y", name)
            if yt.numel() and int(yt.min()) < 0:
                raise DataError(f"Class labels of dataset '{name}' must be non-negative integers; got a minimum of {int(yt.min())}.")
            if yt.numel() and int(yt.max()) >= MAX_CLASSES:
                raise DataError(f"Class labels of dataset '{name}' must be below {MAX_CLASSES} (classes are numbered 0, 1, 2, …); "
                                f"got a maximum of {int(yt.max())}. Renumber the classes from 0.")
        yt = own_memory(yt, y_in)
    full, inputs = content_hashes(xt, yt)
    made = Dataset(name=name, x=xt, y=yt, sha256=full, class_names=class_names,
                   description=description, info=dict(info or {}))
    made.__dict__["inputs_sha256"] = inputs  # the cached property's value, from the same pass
    return made


TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)  # inputs and labels make_dataset reads


def _check_tensor_kind(t: torch.Tensor, what: str, key: str) -> None:
    """Refuse a tensor whose values cannot be read as plain numbers, before anything touches its data: ``what``
    names it in the message (``"'x' in 'd.pt'"``), ``key`` is its name in the suggested fix."""
    if t.is_meta:  # a shape without values: copying one out would first allocate all it declares
        raise DataError(f"{what} is a tensor on the meta device, which has a shape {tuple(t.shape)} but no values; "
                        "use a tensor that holds its values (made on the CPU, not with device='meta').")
    if t.is_nested:
        raise DataError(f"{what} is a nested tensor (samples of different shapes); pad the samples to one shape and save "
                        f"a regular tensor, e.g. torch.nested.to_padded_tensor({key}, 0.0).")
    if t.is_quantized:
        raise DataError(f"{what} is a quantized tensor ({str(t.dtype).removeprefix('torch.')}); save its values as floats: "
                        f"{key}.dequantize().")
    if t.layout != torch.strided:
        raise DataError(f"{what} is a {t.layout} tensor; save a dense one: {key}.to_dense().")
    if t.dtype not in TENSOR_DTYPES and not t.dtype.is_complex:
        raise DataError(f"{what} holds {str(t.dtype).removeprefix('torch.')} values, which the workbench does not read; "
                        f"save it as float32 (or int64 token ids): {key}.float().")


def _to_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        _check_tensor_kind(value, f"The dataset's '{what}'", what)
        t = value.detach().cpu()
    else:
        arr = np.asarray(value)
        if arr.dtype.kind == "m":
            raise DataError(f"The dataset's '{what}' holds time spans ({arr.dtype}), not numbers; convert them first, "
                            f"e.g. {what} / np.timedelta64(1, 's') for seconds.")
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(f"The dataset's '{what}' must be numeric; got values of type {arr.dtype}.")
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
            raise DataError(f"The dataset's '{what}' holds {arr.dtype} values (extended precision), which torch cannot hold; "
                            f"save it as float64: {what}.astype('float64').")
        if arr.dtype.kind == "c" and arr.dtype.itemsize > 16:
            arr = arr.astype(np.complex128)  # refused below as complex, like any complex values
        if not arr.dtype.isnative:  # big-endian data from another machine: the same values in this machine's byte order
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype.is_complex and what == "x":
        raise DataError(f"The dataset's 'x' holds complex numbers ({str(t.dtype).removeprefix('torch.')}), which would lose their "
                        "imaginary parts; store the real and imaginary parts as separate features, e.g. "
                        "np.concatenate([x.real, x.imag], axis=-1).")
    if t.dtype.is_complex:
        raise DataError(f"The dataset's '{what}' holds complex numbers ({str(t.dtype).removeprefix('torch.')}), which would lose their "
                        "imaginary parts; give real class ids or targets.")
    return t


def _as_int64(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """Integer values as int64, refusing unsigned 64-bit values that int64 cannot hold (they would wrap to negative numbers)."""
    if t.dtype == torch.uint64:
        n_big = int((t.view(torch.int64) < 0).sum())  # the values at or above 2**63
        if n_big:
            raise DataError(f"The '{what}' of dataset '{name}' has {n_big} uint64 value{'s' if n_big != 1 else ''} at or above 2**63, "
                            "beyond the int64 range used for token ids and labels; renumber them below 2**63.")
    return t.to(torch.int64)


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
MAX_BLOBS_VALUES = MAX_DATASET_BYTES // 4  # float32 values in one blobs dataset (n_samples * n_features)


def _whole_number(option: str, value: Any, low: int, high: int, high_text: str | None = None) -> int:
    """``value`` as an int, or a ParameterError naming the blobs option and its range ``low .. high``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and low <= value <= high:
        return int(value)
    raise ParameterError(f"The '{option}' parameter of blobs must be an integer from {low} to {high_text or f'{high:,}'}. "
                         f"Got {value!r}.")


def blobs(separation: float = 3.0, *, n_samples: int = 1000, n_features: int = 64, n_classes: int = 5,
          seed: int = 0) -> Dataset:
    """Gaussian classes with controllable separation.

    Class centres are ``separation`` times random unit vectors; within-class noise is isotropic
    with unit variance. ``separation=0`` gives fully overlapping classes; 3 or more, well separated.
    """
    if not (isinstance(separation, (int, float, np.integer, np.floating)) and not isinstance(separation, (bool, np.bool_))
            and math.isfinite(separation) and separation >= 0):
        raise ParameterError(f"The 'separation' parameter of blobs must be a number >= 0 and finite. Got {separation!r}.")
    n_samples = _whole_number("n_samples", n_samples, 1, MAX_BLOBS_VALUES)
    n_features = _whole_number("n_features", n_features, 1, MAX_BLOBS_VALUES)
    n_classes = _whole_number("n_classes", n_classes, 1, MAX_CLASSES)
    seed = _whole_number("seed", seed, 0, 2**32 - 1, "2**32 - 1")
    if n_samples < n_classes:
        raise ParameterError(f"blobs with n_samples={n_samples} and n_classes={n_classes} would leave classes without "
                             "samples; ask for at least as many samples as classes.")
    if n_samples * n_features > MAX_BLOBS_VALUES:
        raise ParameterError(f"blobs with n_samples={n_samples} and n_features={n_features} would hold {n_samples * n_features:,} values, "
                             f"above the limit of {MAX_BLOBS_VALUES:,}; ask for fewer samples or features.")
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
    and ``.pt`` with ``weights_only=True`` (a tensor, or a dict of tensors); both take the same names, in
    any case: features ``x``, optional labels ``y`` (or ``labels``, ``label``, ``target``, ``targets``) and
    optional ``class_names`` (strings naming the integer labels ``0 .. len(class_names) - 1``, each once). A
    file of one array (not labels) is its features; any other array is refused, not dropped. Integer
    features are kept as int64 token ids, with a note in ``info["inputs"]`` (models of float features
    need ``x.astype('float32')``). ``.csv`` must be numeric with an optional label column named
    one of ``label, labels, y, target, class`` (in any case; more than one such column is refused) holding
    text, class numbers ``0 .. MAX_CLASSES - 1``, whole numbers some of which are below zero (such as
    -1 / 1: classes numbered in increasing order, named by their numbers) or other finite numbers
    (regression targets). Columns are separated by commas, or by semicolons or tabs where the first line
    has those and no commas (Excel's ``sep=`` first line is honoured; a separator that ends every line is
    ignored); numbers with decimal commas are refused. An unnamed first column (empty header, or pandas'
    ``Unnamed: 0``) of distinct whole numbers is a saved row index: it is dropped and noted in
    ``info["dropped"]``.
    ``split`` (``"train"``, ``"test"`` the default, ``"all"``) applies to digits and sentences; an option
    a source does not take is refused, not ignored.

    A file is untrusted input: ``max_bytes`` bounds the file, what its archive members unpack to and
    what each array declares; anything it cannot read raises a :class:`~workbench.errors.WorkbenchError`.
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise ParameterError(f"load_dataset reads a bundled dataset's name, a path or the bytes of an upload; got "
                             f"{type(source).__name__}. Pass one of {', '.join(BUILTIN_DATASETS)} or a file path; "
                             "for arrays in memory use make_dataset(name, x, y).")
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
        try:
            data, name = path.read_bytes(), path.name
        except OSError as exc:
            raise DataError(f"Cannot read dataset file '{path}' ({exc.strerror}); pass a readable .npz, .csv or .pt file.") from exc
    if len(data) > max_bytes:
        raise FileTooLargeError(f"Dataset file '{name}' is {len(data) / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit.")
    if not data:
        raise DataError(f"Dataset file '{name}' is empty (0 bytes); choose the file that holds the data, or save it again.")
    try:
        made = _read_file(data, name, max_bytes)
        if not isinstance(source, (bytes, bytearray)):
            made.info["path"] = str(Path(source).resolve())  # where code that loads it again finds it
        return made
    except (WorkbenchError, MemoryError):
        raise
    except Exception as exc:  # a crafted file reaches a path no check foresaw: still one sentence, never a traceback
        first = next(iter(str(exc).strip().splitlines()), "")[:200]
        raise CorruptFileError(f"Dataset file '{name}' could not be read ({type(exc).__name__}{': ' + first if first else ''}); "
                               "re-save it as load_dataset describes, then load it again.") from exc


def _read_file(data: bytes, name: str, max_bytes: int) -> Dataset:
    suffix = Path(name).suffix.lower()
    y: Any
    class_names = None
    info: dict[str, Any] = {"file": name}
    if suffix == ".npz":
        x, y, class_names = _read_npz(data, name, max_bytes)
    elif suffix == ".csv":
        x, y, notes = _read_csv(data, name)
        info.update(notes)
    elif suffix == ".pt":
        x, y, class_names = _read_pt(data, name, max_bytes)
    else:
        raise UnsupportedFormatError(
            f"Cannot read dataset file '{name}': supported types are {', '.join(UPLOAD_FORMATS)} (or a bundled name: {', '.join(BUILTIN_DATASETS)})."
        )
    given_names = class_names is not None
    if isinstance(y, list) or (isinstance(y, np.ndarray) and y.dtype.kind in "US"):
        if class_names is not None:
            raise DataError(f"'{name}' has text labels and 'class_names'; give integer labels with 'class_names', or text labels alone.")
        labels = y if isinstance(y, list) else y.astype(str).ravel().tolist()
        stripped = {c: c.strip() for c in set(labels)}
        numeric = suffix == ".csv" and all(_is_number(c) for c in stripped.values())  # whole numbers below zero
        class_names = tuple(sorted(set(stripped.values()), key=float if numeric else None))
        if len(class_names) > MAX_CLASSES:
            raise DataError(f"'{name}' has {len(class_names)} distinct text labels, above the limit of {MAX_CLASSES} classes; "
                            "give labels that name classes, not samples.")
        index = {c: i for i, c in enumerate(class_names)}
        y = np.fromiter((index[stripped[c]] for c in labels), dtype=np.int64, count=len(labels))
        info["labels"] = SIGNED_LABELS_NOTE if numeric else TEXT_LABELS_NOTE
    made = make_dataset(Path(name).stem, x, y, class_names=class_names, description=f"uploaded {suffix} file", info=info)
    if given_names:
        _check_class_names(made, name)
    if not made.x.dtype.is_floating_point:
        made.info["inputs"] = _token_ids_note(x)
    return made


def _token_ids_note(x: Any) -> str:
    """What became of integer inputs, for the dataset's info: they are token ids, which a model of float features refuses."""
    dtype = str(x.dtype).removeprefix("torch.")
    pixels = " / 255 for 8-bit image pixels" if dtype == "uint8" else ""
    return (f"the {dtype} values of x are kept as int64 token ids, for models that take tokens; for a model of float features "
            f"(such as an MLP) save x as floats, e.g. x.astype('float32'){pixels}")


TEXT_LABELS_NOTE = "text, numbered in sorted order"
SIGNED_LABELS_NOTE = "whole numbers below zero among them, numbered in increasing order"
MAX_SIGNED_CLASSES = 1000  # whole-number CSV labels below zero are classes up to this many distinct values, else targets


def label_order_note(dataset: Dataset) -> str | None:
    """For text labels: a sentence saying how they were numbered, for results that compare a model's outputs with them."""
    how = dataset.info.get("labels")
    if how not in (TEXT_LABELS_NOTE, SIGNED_LABELS_NOTE) or not dataset.class_names:
        return None
    shown = ", ".join(f"{c} → {i}" for i, c in enumerate(dataset.class_names[:6]))
    more = ", …" if len(dataset.class_names) > 6 else ""
    return (f"The labels of '{dataset.name}' were {how} ({shown}{more}); accuracies of a model "
            "assume its outputs follow that order. If they do not, give integer labels from 0 in the model's order.")


def _check_unpacked_size(zf: zipfile.ZipFile, name: str, max_bytes: int) -> None:
    """Refuse an archive whose members declare more than ``max_bytes`` once decompressed (a zip bomb): readers
    allocate and fill what a member declares, and zipfile stops each member at its declared size."""
    total = sum(info.file_size for info in zf.infolist())
    if total > max_bytes:
        raise FileTooLargeError(f"'{name}' unpacks to {total / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; "
                                "save fewer or smaller samples.")


def _check_npy_member(zf: zipfile.ZipFile, member: str, name: str, max_bytes: int) -> None:
    """Refuse an .npy member whose header declares more than ``max_bytes`` or more than the member stores: numpy
    allocates the declared array before it reads (and decompresses) the data."""
    info = zf.getinfo(member)
    with zf.open(info) as fp:
        magic = fp.read(8)
        if len(magic) < 8 or not magic.startswith(np.lib.format.MAGIC_PREFIX) or magic[6] not in (1, 2, 3):
            return  # np.load hands back raw bytes or refuses the version itself
        read_header = np.lib.format.read_array_header_1_0 if magic[6] == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fp)
        stored = info.file_size - fp.tell()
    key = member.removesuffix(".npy")
    if dtype.hasobject:  # its bytes are a pickle, not values: the size says nothing, and reading it would unpickle
        raise UnsafeFileError(f"'{name}' stores Python objects in array '{key}' that need unpickling, which can run code; "
                              "save plain numeric arrays with np.savez(path, x=x, y=y).")
    if any(d < 0 for d in shape):
        raise CorruptFileError(f"Array '{key}' in '{name}' declares the negative shape {shape}; re-save it with np.savez.")
    declared = math.prod(shape) * max(dtype.itemsize, 1)
    if declared > max_bytes:
        raise FileTooLargeError(f"Array '{key}' in '{name}' declares shape {shape} of {dtype} ({declared / 2**20:.0f} MiB), above the "
                                f"{max_bytes / 2**20:.0f} MiB limit; save fewer or smaller samples.")
    if declared > stored:
        raise CorruptFileError(f"Array '{key}' in '{name}' declares shape {shape} of {dtype} ({declared} bytes) but stores {stored} "
                               "bytes, so the file is truncated or damaged; re-save it with np.savez.")


def _read_npz(data: bytes, name: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    if not data.startswith(b"PK"):
        raise CorruptFileError(f"'{name}' is not a readable .npz file (not a zip archive); re-save it with np.savez.")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            _check_unpacked_size(f.zip, name, max_bytes)
            members = set(f.zip.namelist())

            def read(key: str) -> np.ndarray:
                _check_npy_member(f.zip, key if key in members else key + ".npy", name, max_bytes)  # np.load's lookup order
                return f[key]

            keys = list(f.keys())
            if not keys:
                raise DataError(f"'{name}' holds no arrays; save features as 'x' (and labels as 'y').")
            xkey, ykey, nkey = _pick_keys(keys, name, "arrays", "np.savez(path, x=x, y=y)")
            x = read(xkey)
            y = None if ykey is None else read(ykey)
            names = None if nkey is None else read(nkey)
    except WorkbenchError:
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
    return x, y, class_names


def _pick_keys(keys: list[Any], name: str, kind: str, how: str) -> tuple[Any, Any, Any]:
    """The keys of the features, labels and class names among the ``keys`` of an .npz or .pt file: ``x``, one of
    :data:`LABEL_KEYS` and ``class_names``, in any case; a file of one array (not labels) is its features. A key that
    is none of these is refused, not dropped: it may hold the labels under a name the workbench does not know."""
    roles: dict[str, list[Any]] = {"features": [], "labels": [], "class names": []}
    unused: list[Any] = []
    for key in keys:
        low = key.lower() if isinstance(key, str) else None
        role = ("features" if low == "x" else "labels" if low in LABEL_KEYS else "class names" if low == "class_names" else None)
        (roles[role] if role else unused).append(key)
    for role, found in roles.items():
        if len(found) > 1:
            raise DataError(f"'{name}' holds {len(found)} {kind} that could be the {role} ({', '.join(repr(k) for k in found)}); "
                            "keep one of them.")
    if len(keys) == 1 and unused:
        return unused[0], None, None
    if not roles["features"]:
        raise DataError(f"'{name}' holds the {kind} {', '.join(str(k) for k in keys)} but none named 'x'; save the features as 'x' "
                        f"(and labels as 'y'): {how}.")
    if unused:
        raise DataError(f"'{name}' holds the {kind} {', '.join(repr(k) for k in unused)}, which load_dataset does not read; save only "
                        f"the features as 'x', the labels as 'y' (or {', '.join(LABEL_KEYS[1:])}, in any case) and 'class_names', "
                        "so that no labels are dropped unseen.")
    return roles["features"][0], next(iter(roles["labels"]), None), next(iter(roles["class names"]), None)


def _check_class_names(dataset: Dataset, name: str) -> None:
    """Refuse class names that do not name the labels one to one, once make_dataset has read them as classes or targets."""
    names = dataset.class_names or ()
    duplicate = next((c for c in names if names.count(c) > 1), None)
    if duplicate is not None:
        raise DataError(f"'class_names' in '{name}' holds {duplicate!r} more than once; give each class its own name.")
    y = dataset.y
    if y is None:
        raise DataError(f"'{name}' has 'class_names' but no labels; save the labels beside them as 'y', or drop 'class_names'.")
    if y.dtype.is_floating_point:
        odd = y[(y != y.round()) | (y < 0) | (y >= MAX_CLASSES)]
        example = float(odd[0] if odd.numel() else y[0])
        raise DataError(f"'{name}' has 'class_names' but its labels are regression targets (such as {example:g}), not class "
                        f"numbers 0 to {len(names) - 1}; give integer class labels with 'class_names', or drop 'class_names'.")
    top = int(y.max()) if y.numel() else -1
    if top >= len(names):
        raise DataError(f"'{name}' has labels up to {top} but {len(names)} class_names; give one name per class "
                        f"(labels 0 to {len(names) - 1}).")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


CSV_SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs"}
_DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+")  # a number written with a decimal comma (1,5) or thousands separator
_INDEX_HEADER = re.compile(r"|Unnamed: 0")  # the name pandas gives the index it writes (none), or reads back
INDEX_COLUMN_NOTE = "the unnamed first column, whose values {} are row numbers (an index such as pandas writes), not features"


def _read_csv(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray | list[str] | None, dict[str, str]]:
    """Features (float64), labels (class numbers, text as a list, or None) and notes for the dataset's info, parsed row by
    row into one flat buffer: rows kept as Python lists would take some 40 times the file's size.

    The separator is Excel's ``sep=`` first line where there is one, else semicolons or tabs where the first line has
    them and no commas (or only decimal commas), else commas."""
    lines = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
    try:
        skipped, first = 0, ""
        for line in lines:  # blank lines before the first row
            if line.strip():
                first = line
                break
            skipped += 1
        hint = re.fullmatch(r'"?sep=(.)"?,?\s*', first)
        if hint:
            separator, head, skipped = hint.group(1), [], skipped + 1
        else:
            separator, head = _csv_separator(first.rstrip("\r\n")), [first]
        reader = csv.reader(itertools.chain(head, lines), delimiter=separator)
        return _csv_table((r for r in reader if r), name, separator)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"'{name}' is not UTF-8 text, so it cannot be read as CSV.") from exc
    except csv.Error as exc:
        raise CorruptFileError(f"Line {reader.line_num + skipped} of '{name}' cannot be read as CSV ({exc}); save the table as plain "
                               "comma-separated numbers, one sample per row.") from exc


def _csv_separator(line: str) -> str:
    """The separator of a CSV file, from its first line: semicolons or tabs where it has no commas but for decimal ones."""
    for sep in (";", "\t"):
        cells = line.split(sep)
        if len(cells) > 1 and ("," not in line or all(_DECIMAL_COMMA.fullmatch(c.strip()) or _is_number(c) for c in cells)):
            return sep
    return ","


def _without_trailing_separator(rows: Iterator[list[str]]) -> Iterator[list[str]]:
    """The rows without the empty last cell that a separator at the end of every line (as Excel writes) leaves; a row with a
    value there is passed on whole, so that the column count check names it."""
    start = list(itertools.islice(rows, 2))
    if not (len(start) == 2 and all(len(r) > 1 and not r[-1].strip() for r in start)):
        yield from itertools.chain(start, rows)
        return
    for row in itertools.chain(start, rows):
        yield row[:-1] if len(row) > 1 and not row[-1].strip() else row


def _csv_table(rows: Iterator[list[str]], name: str, separator: str = ",") -> tuple[np.ndarray, np.ndarray | list[str] | None, dict[str, str]]:
    rows = _without_trailing_separator(rows)
    header = next(rows, None)
    if header is None:
        raise DataError(f"'{name}' has no rows.")
    has_header = not all(_is_number(c) or _DECIMAL_COMMA.fullmatch(c.strip()) for c in header)  # decimal commas are refused below
    first = next(rows, None) if has_header else header
    if first is None:
        raise DataError(f"'{name}' has a header but no data rows.")
    width = len(first)
    if has_header and len(header) != width:
        raise CorruptFileError(f"The header of '{name}' has {len(header)} columns but row 2 has {width}; give the header one name per column.")
    lowered = [h.strip().lower() for h in header] if has_header else []
    candidates = [j for j, h in enumerate(lowered) if h in LABEL_COLUMNS]
    if len(candidates) > 1:
        raise DataError(f"'{name}' has {len(candidates)} columns that could be the labels ({', '.join(repr(header[j]) for j in candidates)}); "
                        "keep one label column and rename or remove the others, which would otherwise be read as features.")
    label_idx = candidates[0] if candidates else None
    features = [j for j in range(width) if j != label_idx]
    if label_idx is not None and not features:
        raise DataError(f"'{name}' has the label column '{header[label_idx]}' but no feature columns; add at least one numeric feature column.")
    values: array[float] = array("d")
    labels: list[str] = []
    seen: dict[str, str] = {}  # one string object per distinct label
    for i, row in enumerate(itertools.chain([first], rows), start=1 + has_header):
        if len(row) != width:
            raise CorruptFileError(f"Row {i} of '{name}' has {len(row)} columns; expected {width} like the first row.")
        for j in features:
            try:
                values.append(float(row[j]))
            except ValueError:
                raise _csv_cell_error(row[j], i, header[j] if has_header else f"column {j + 1}", name, separator) from None
        if label_idx is not None:
            cell = row[label_idx]
            if not cell.strip():
                raise DataError(f"Row {i} of '{name}' has no label in column '{header[label_idx]}'; fill in or drop the rows "
                                "without a label.")
            if _DECIMAL_COMMA.fullmatch(cell.strip()):
                raise _csv_cell_error(cell, i, header[label_idx], name, separator)
            labels.append(seen.setdefault(cell, cell))
    x = np.frombuffer(values, dtype=np.float64).reshape(-1, len(features))
    notes: dict[str, str] = {}
    if has_header and features and features[0] == 0 and _INDEX_HEADER.fullmatch(header[0].strip()):
        index = x[:, 0]
        if len(np.unique(index)) == len(index) and bool((index == np.round(index)).all()):
            if len(features) == 1:
                raise DataError(f"The only feature column of '{name}' is an unnamed column of row numbers, an index such as pandas "
                                "writes; save the table with its feature columns, e.g. df.to_csv(path, index=False).")
            x = np.ascontiguousarray(x[:, 1:])
            shown = ", ".join(f"{v:.0f}" for v in index[:3]) + (", …" if len(index) > 3 else "")
            notes["dropped"] = INDEX_COLUMN_NOTE.format(shown)
    if label_idx is None or not all(_is_number(c) for c in seen):
        return x, (labels or None), notes
    numbers = {cell: float(cell) for cell in seen}
    bad = next((c for c, v in numbers.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise DataError(f"Row {labels.index(bad) + 2} of '{name}' has the label {bad.strip()!r} in column '{header[label_idx]}'; "
                        "labels must be finite numbers (class numbers, or targets for regression) or text.")
    values = np.fromiter((numbers[c] for c in labels), dtype=np.float64, count=len(labels))
    if all(v.is_integer() and 0 <= v < MAX_CLASSES for v in numbers.values()):
        return x, values.astype(np.int64), notes  # class numbers
    distinct = sorted(set(numbers.values()))
    if distinct[0] < 0 and all(v.is_integer() for v in distinct) and len(distinct) <= MAX_SIGNED_CLASSES:  # such as -1 / 1
        return x, [f"{v + 0.0:.0f}" for v in values], notes  # classes, numbered below in numeric order (+ 0.0: no "-0")
    return x, values, notes  # regression targets: make_dataset checks their range


def _csv_cell_error(cell: str, row: int, column: str, name: str, separator: str) -> DataError:
    """The sentence for a CSV cell that is not a number."""
    text = cell.strip()
    if not text:
        return DataError(f"Row {row} of '{name}' has no value in column '{column}'; fill in or drop the rows with missing values.")
    if _DECIMAL_COMMA.fullmatch(text):
        return DataError(f"Row {row} of '{name}' writes the number {text!r} in column '{column}' with a comma in it; save the table "
                         "with plain numbers (decimal points such as 1.5, no thousands separators) and commas between the columns.")
    other = next((s for s in CSV_SEPARATORS if s != separator and s in text), None)
    if other is not None:
        return DataError(f"Column '{column}' of '{name}' holds {text[:40]!r}, which has {CSV_SEPARATORS[other]} in it, but the file is "
                         f"read as separated by {CSV_SEPARATORS[separator]}; save the table with one separator, commas between "
                         "the columns and decimal points in numbers.")
    return DataError(f"Column '{column}' of '{name}' holds text ({cell!r}); CSV features must be numbers. "
                     f"Remove or encode the column, or name the label column one of: {', '.join(LABEL_COLUMNS)}.")


def _read_pt(data: bytes, name: str, max_bytes: int) -> tuple[Any, Any, tuple[str, ...] | None]:
    import pickle

    if data.startswith(b"PK"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                _check_unpacked_size(zf, name, max_bytes)
        except zipfile.BadZipFile as exc:
            raise CorruptFileError(f"'{name}' is damaged or not a file written by torch.save ({exc}); re-save the data with "
                                   "torch.save({'x': x, 'y': y}, path).") from exc
    try:
        from workbench.models.loading import weights_only_load

        obj = weights_only_load(data)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"'{name}' needs full unpickling, which can run code; save plain tensors with torch.save({{'x': x, 'y': y}}, path)."
        ) from exc
    except Exception as exc:  # torch raises many types for damaged archives
        sample = data[:512]
        if sample and all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
            raise CorruptFileError(f"'{name}' is not a file written by torch.save: it looks like a text file; give a CSV "
                                   "table a .csv name, or save the data with torch.save({'x': x, 'y': y}, path).") from exc
        detail = next(iter(str(exc).strip().splitlines()), "").split(". ")[0][:160]
        raise CorruptFileError(f"'{name}' is damaged or not a file written by torch.save ({type(exc).__name__}"
                               f"{': ' + detail if detail else ''}); re-save the data with torch.save({{'x': x, 'y': y}}, path).") from exc
    if isinstance(obj, torch.Tensor):
        return _pt_value(obj, "x", name), None, None
    if not isinstance(obj, dict):
        raise DataError(f"'{name}' must hold a tensor or a dict with 'x' (and optional 'y'); got {type(obj).__name__}.")
    if not obj:
        raise DataError(f"'{name}' holds an empty dict; save the features as 'x' (and labels as 'y'): torch.save({{'x': x, 'y': y}}, path).")
    xkey, ykey, nkey = _pick_keys(list(obj), name, "keys", "torch.save({'x': x, 'y': y}, path)")
    x = _pt_value(obj[xkey], "x", name, xkey)
    y = None if ykey is None or obj[ykey] is None else _pt_value(obj[ykey], "y", name, ykey)
    names = None if nkey is None else obj[nkey]
    if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(c, str) for c in names)):
        raise DataError(f"'{nkey}' in '{name}' must be a list of strings (one name per class); got {type(names).__name__}.")
    return x, y, None if names is None else tuple(names)


def _pt_value(value: Any, role: str, name: str, key: str | None = None) -> Any:
    """``value`` checked before anything materialises it: an expanded tensor (stride 0) or a list that repeats one
    pickled object costs little in the file and up to any size in memory; a meta tensor declares any size and
    stores nothing. ``role`` is "x" or "y"; ``key`` the name the file gives it (``role`` where not given)."""
    key = key or role
    if isinstance(value, torch.Tensor):
        _check_tensor_kind(value, f"'{key}' in '{name}'", key)
        stored = value.untyped_storage().nbytes()
        if value.numel() * value.element_size() > stored:
            raise DataError(f"'{key}' in '{name}' is an expanded view: shape {tuple(value.shape)} with strides {value.stride()} over "
                            f"{stored} stored bytes; save a copy that holds its values: {key}.contiguous().")
        return value
    items = list(value) if isinstance(value, (list, tuple)) else None
    if items is not None and all(isinstance(v, (int, float)) for v in items):
        return np.asarray(items)
    if items is not None and role == "y" and all(isinstance(v, str) for v in items):
        return items
    what = "a tensor or a flat list of labels" if role == "y" else "a tensor"
    raise DataError(f"'{key}' in '{name}' must be {what}; got {type(value).__name__}. Save it with torch.as_tensor({key}).")
