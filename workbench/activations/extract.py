"""Activation extraction through forward hooks, with pooling and an on-disk cache.

``extract`` runs the model over the dataset in batches under ``torch.inference_mode()``, captures
the outputs of the requested modules with forward hooks (always removed in ``finally``), pools
conv maps and token sequences to ``(n_samples, n_features)`` by a named rule, and streams each
layer into a ``.npy`` file in a cache folder keyed by the sha256 of the weights and the module tree,
the data, the layers and the pooling rule. Memory is bounded by the batch, not by the dataset; a
second identical call reads the cache.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.activations.capture import (
    POOLINGS,
    PooledCapture,
    channel_first_layers,
    exclusive,
    hooks_on,
    valid_layers,
)
from workbench.activations.types import Activations
from workbench.data.datasets import Dataset, make_dataset
from workbench.device import full_float32, module_device, resolve_device, rows_on
from workbench.errors import DataError, ParameterError, UnknownLayerError, WorkbenchError, did_you_mean, format_choices
from workbench.models.loading import LoadedModel, as_loaded_model, eval_mode

CACHE_FORMAT = 9  # 2: conv-map means may come from a smaller tensor (equal up to float rounding); 3: keyed by weights and
# structure; 4: the structure includes module attributes and non-persistent buffers, token masks follow the pad id;
# 5: and tensors kept as plain module attributes; 6: keyed by the inputs alone, entries record each layer's width;
# 7: shortcut routes only where the container hands maps on unchanged, conv means from the input in float64;
# 8: conv means from the output map; 9: shortcut routes only through modules that run their class's own forward
Progress = Callable[[int, int], None]
DEVICE_MISMATCH = ("same device", "not on the expected device")  # how torch reports tensors on two devices in one op
FORWARD_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, AttributeError, KeyError, AssertionError, NotImplementedError)
TRANSFER_BYTES = 32 * 2**20  # pooled outputs gathered on an accelerator before one copy to the host
WRITE_BUFFER_BYTES = 2**20  # each layer's rows gathered on the host before one write to its cache file
STALE_PARTIAL_SECONDS = 24 * 3600  # a partial cache entry untouched this long belongs to a run that was killed


def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE_DIR``, else ``~/.cache/representation-workbench/activations``."""
    env = os.environ.get("WORKBENCH_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "representation-workbench" / "activations"


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model: its ``named_modules()`` path, type, output shape on a probe batch
    (``None`` when it did not run, or gave no row per sample), parameter count (own parameters only) and nesting depth."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    n_parameters: int
    depth: int


def check_layers(model: LoadedModel | nn.Module, layers: list[str] | str) -> list[str]:
    """Validate layer names against ``named_modules()``; unknown names raise with a suggestion."""
    module = model.module if isinstance(model, LoadedModel) else model
    names = list(valid_layers(module))
    if isinstance(layers, str):
        layers = [layers]
    else:
        try:
            layers = list(layers)
        except TypeError:
            raise ParameterError(f"Layers are given as a layer name or a list of names, not {type(layers).__name__}; "
                                 f"pick from: {format_choices(names)}.") from None
    if not layers:
        raise ParameterError(f"Pick at least one layer. Layers: {format_choices(names)}.")
    for layer in layers:
        if layer not in names:
            raise UnknownLayerError(f"Unknown layer '{layer}'.{did_you_mean(layer, names)} Layers: {format_choices(names)}.")
    if len(set(layers)) != len(layers):
        raise ParameterError(f"Each layer may be asked for once; got duplicates in {layers}.")
    return layers


def example_input(model: LoadedModel, n: int = 2) -> torch.Tensor:
    """A probe batch for a model whose input shape is known."""
    if model.input_shape is None:
        raise DataError(
            f"The input shape of '{model.name}' is unknown (no architecture spec); pass an example batch or a dataset."
        )
    if model.takes_tokens:
        pad = pad_token_id(model)
        return torch.full((n, *model.input_shape), 2 if pad == 1 else 1, dtype=torch.int64)
    return torch.zeros((n, *model.input_shape), dtype=torch.float32)


def pad_token_id(model: LoadedModel) -> int | None:
    """The token id that marks padding: a Hugging Face model's ``config.pad_token_id`` (``None`` when it has
    none, as GPT-2), 0 for the workbench's own token models, ``None`` for models that do not take tokens."""
    if not model.takes_tokens:
        return None
    if model.source_format == "huggingface":
        pad = getattr(getattr(model.module, "config", None), "pad_token_id", None)
        return pad if isinstance(pad, int) and not isinstance(pad, bool) else None
    return 0


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating parameter (else buffer); ``None`` when it has neither."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _forward(model: LoadedModel, batch: torch.Tensor) -> Any:
    """Run ``model`` on ``batch``; a Hugging Face token model gets the attention mask of its own padding id."""
    module = model.module
    if model.source_format == "huggingface":
        if not model.takes_tokens:
            return module(pixel_values=batch)
        # an encoder-decoder (T5, BART) reads the same tokens on its decoder side (teacher forcing on the input)
        extra = {"decoder_input_ids": batch} if getattr(getattr(module, "config", None), "is_encoder_decoder", False) else {}
        pad = pad_token_id(model)
        if pad is not None:
            extra["attention_mask"] = (batch != pad).long()
        return module(input_ids=batch, **extra)
    return module(batch)


def _first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    text = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def layer_info(model: LoadedModel | nn.Module, example: Any = None) -> list[LayerInfo]:
    """Every named module in forward order (modules that did not run last), with output shapes.

    ``example``: a probe batch (tensor, array or :class:`Dataset`; its first two samples are used), needed
    when the model's input shape is unknown (no architecture spec)."""
    lm = as_loaded_model(model)
    if isinstance(example, Dataset):
        example = example.x[:2]
    elif example is not None and not isinstance(example, torch.Tensor):
        try:
            example = torch.as_tensor(np.asarray(example))
            example = example.float() if example.is_floating_point() else example  # float32, as datasets store features
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ParameterError(
                f"The example batch for the layers of '{lm.name}' must be a tensor, an array or a Dataset; got {type(example).__name__}."
            ) from exc
    probe = example if example is not None else example_input(lm)
    modules = valid_layers(lm.module)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, t: torch.Tensor) -> None:
        if t.ndim and t.shape[0] == probe.shape[0]:  # one row per sample (not a table shared by the batch)
            shapes.setdefault(name, tuple(t.shape[1:]))

    with exclusive(lm.module), eval_mode(lm.module), hooks_on(lm.module, list(modules), record), torch.inference_mode():
        x = probe.to(module_device(lm.module))  # where the weights are once no other thread's run is moving them
        dtype = float_dtype(lm.module)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        try:
            _forward(lm, x)
        except FORWARD_ERRORS as exc:
            raise DataError(f"The probe batch of shape {tuple(x.shape)} could not be run through '{lm.name}' "
                            f"({_first_line(exc)}).") from exc
    order = list(shapes) + [n for n in modules if n not in shapes]
    return [
        LayerInfo(
            name=n, type=type(modules[n]).__name__, output_shape=shapes.get(n),
            n_parameters=sum(p.numel() for p in modules[n].parameters(recurse=False)), depth=n.count("."),
        )
        for n in order
    ]


def tree_order(infos: list[LayerInfo]) -> list[LayerInfo]:
    """``infos`` (forward order, as :func:`layer_info` gives them) arranged as a tree: each module right before
    the first of its submodules to run, and a module that did not run right after its parent, so that a
    container (a transformer block, a ``ModuleList``) heads its children instead of following them."""
    pos = {info.name: i for i, info in enumerate(infos) if info.output_shape is not None}
    first: dict[str, float] = {}
    for name, i in pos.items():  # each run module bounds the start of every ancestor's subtree
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            first[prefix] = min(first.get(prefix, math.inf), i)

    def start(name: str) -> float:
        while name not in first and "." in name:
            name = name.rpartition(".")[0]
        return first.get(name, math.inf)

    order = {info.name: i for i, info in enumerate(infos)}
    return sorted(infos, key=lambda info: (start(info.name), info.depth, order[info.name]))


def list_layers(model: LoadedModel | nn.Module, example: Any = None) -> list[str]:
    """Module paths from ``named_modules()`` in the order they run on a probe batch."""
    return [info.name for info in layer_info(model, example)]


def batch_dependent(module: nn.Module) -> bool:
    """Whether a sample's activations depend on the other samples of its batch even in eval mode: a BatchNorm that
    keeps no running statistics normalises each batch by its own."""
    bn = nn.modules.batchnorm._BatchNorm
    return any(isinstance(m, bn) and (not m.track_running_stats or m.running_mean is None) for m in module.modules())


def cache_key(model: LoadedModel, dataset: Dataset, layers: list[str], pooling: str, batch_size: int | None = None) -> str:
    """The cache entry's name: the sha256 of the weights and structure, the inputs (labels do not change activations),
    the layers and the pooling rule, and the batch size for a model whose activations depend on the batch."""
    dataset.check_unchanged()
    fields = {"format": CACHE_FORMAT, "model": model.content_sha256, "data": dataset.inputs_sha256, "layers": layers,
              "pooling": pooling}
    if batch_dependent(model.module):
        fields["batch_size"] = batch_size
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _as_dataset(data: Dataset | torch.Tensor | np.ndarray) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        raise DataError(f"extract takes a Dataset or an array of inputs, not the name or path {str(data)!r}; "
                        f"load it first: extract(model, load_dataset({str(data)!r}), layers).")
    return make_dataset("array", data)


def check_inputs(model: LoadedModel, dataset: Dataset) -> None:
    """Dataset shape and dtype must fit the model's declared input."""
    if dataset.n_samples == 0:
        raise DataError(f"Dataset '{dataset.name}' is empty; it needs at least one sample.")
    if model.input_shape is None:
        return
    sample_shape = tuple(dataset.x.shape[1:])
    if model.takes_tokens != (not dataset.x.dtype.is_floating_point):
        kind = "token ids (integers)" if model.takes_tokens else "float features"
        hint = ("; pick a matching dataset, or save integer pixel or count values as floats "
                "(such as x.astype('float32') / 255 for 8-bit images)" if not model.takes_tokens else "; pick a matching dataset")
        raise DataError(f"Model '{model.name}' takes {kind} but dataset '{dataset.name}' holds "
                        f"{str(dataset.x.dtype).removeprefix('torch.')} values{hint}.")
    if not model.takes_tokens and int(np.prod(sample_shape)) != int(np.prod(model.input_shape)):
        raise DataError(
            f"Dataset '{dataset.name}' has {int(np.prod(sample_shape))} feature{'s' if int(np.prod(sample_shape)) != 1 else ''} "
            f"per sample but model '{model.name}' expects "
            f"{int(np.prod(model.input_shape))}; pick a dataset made for this model."
        )
    if not model.takes_tokens and sample_shape != tuple(model.input_shape):
        how = ("flatten them (x.reshape(len(x), -1))" if len(model.input_shape) == 1 else
               f"reshape them (x.reshape(len(x), {', '.join(map(str, model.input_shape))}))")
        raise DataError(
            f"Dataset '{dataset.name}' holds samples of shape {sample_shape} but model '{model.name}' takes samples of shape "
            f"{tuple(model.input_shape)}; {how} and load the dataset again."
        )


def _cache_root(root: Path) -> Path:
    """``root`` created when missing, with partial entries of runs killed long ago removed."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"The cache folder '{root}' cannot be created ({exc.strerror or type(exc).__name__}); "
                             "pass a cache_dir that is a writable folder.") from exc
    remove_stale_partials(root)
    return root


_OWNER = "owner.json"  # in a partial entry: the host and process writing it


def _claim(partial: Path) -> None:
    """Record in ``partial`` which process on which host writes it, so that others can tell when it was killed."""
    (partial / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _writer_gone(partial: Path) -> bool:
    """Whether the process that wrote ``partial`` ran on this host and has exited (killed before it finished)."""
    try:
        owner = json.loads((partial / _OWNER).read_text())
        if owner.get("host") != socket.gethostname():
            return False
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no owner file, another user's process, ...
        return False
    return False


def remove_stale_partials(root: Path, max_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """Remove the partial entries (``.{key}.partial-*`` folders) in ``root`` that no live run is writing: those
    whose writing process ran on this host and has exited, and those whose folder and files were all last changed
    more than ``max_age`` seconds ago; returns those removed."""
    now = time.time()
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(".") and ".partial-" in p.name and p.is_dir()]
    except OSError:
        return removed
    for folder in candidates:
        try:
            newest = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])
        except OSError:  # removed meanwhile, or unreadable
            continue
        if now - newest > max_age or _writer_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _cached(folder: Path, dataset: Dataset, model: LoadedModel, layers: list[str], pooling: str) -> Activations | None:
    """The complete cache entry in ``folder`` for ``layers`` of ``dataset`` pooled by ``pooling``, or ``None``: an
    entry whose files are missing, truncated or unreadable, or that does not hold what its key stands for, is removed
    (and extracted again), as is a file in the entry's place. The values themselves are not checked: the cache is this
    user's own files."""
    if not folder.is_dir():
        if folder.is_file() or folder.is_symlink():
            folder.unlink(missing_ok=True)
        return None
    try:
        return _read_cache(folder, json.loads((folder / "meta.json").read_text()), dataset, model, layers, pooling)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError):
        shutil.rmtree(folder, ignore_errors=True)
    return None


def _read_cache(folder: Path, meta: dict[str, Any], dataset: Dataset, model: LoadedModel, layers: list[str],
                pooling: str) -> Activations:
    """The entry's layers, memory-mapped; ValueError where the entry is not complete or does not hold ``layers``
    of every sample of ``dataset`` pooled by ``pooling`` (a damaged or hand-edited entry)."""
    n = dataset.n_samples
    widths = meta.get("widths")
    if (not meta.get("complete") or meta.get("pooling") != pooling or meta.get("n_samples") != n
            or meta["files"] != _layer_files(layers) or not isinstance(widths, dict) or list(widths) != list(layers)):
        raise ValueError("the cache entry does not match its key")
    tensors = {}
    for layer, fname in meta["files"].items():
        arr = np.load(folder / fname, mmap_mode="c")
        if arr.ndim != 2 or arr.shape != (n, widths[layer]) or arr.dtype != np.float32:
            raise ValueError(f"layer '{layer}' of the cache entry has shape {arr.shape}")
        tensors[layer] = torch.from_numpy(arr)
    return Activations(tensors, model_name=model.name, model_sha256=model.sha256, dataset_name=dataset.name,
                       dataset_sha256=dataset.sha256, inputs_sha256=dataset.inputs_sha256, pooling=pooling,
                       labels=dataset.y, key=meta["key"])


def _layer_files(layers: list[str]) -> dict[str, str]:
    """The file of each layer in a cache entry."""
    return {layer: f"layer{i:03d}.npy" for i, layer in enumerate(layers)}


def assemble_cache(model: LoadedModel, dataset: Dataset, layers: list[str], pooling: str,
                   parts: list[Activations], root: Path) -> Path:
    """Concatenate activations of consecutive row ranges into the cache entry that :func:`extract` would
    write for the whole dataset (streamed part by part, so memory stays bounded by one part's layer)."""
    key = cache_key(model, dataset, layers, pooling)
    _cache_root(root)
    tmp = root / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    _claim(tmp)
    files = _layer_files(layers)
    try:
        for layer in layers:
            width = int(parts[0][layer].shape[1])
            out = np.lib.format.open_memmap(tmp / files[layer], mode="w+", dtype=np.float32, shape=(dataset.n_samples, width))
            start = 0
            for part in parts:
                block = part[layer].numpy()
                out[start:start + len(block)] = block
                start += len(block)
            if start != dataset.n_samples:
                raise DataError(f"The parts hold {start} samples but dataset '{dataset.name}' has {dataset.n_samples}.")
            del out
        meta = {"complete": True, "key": key, "pooling": pooling, "files": files,
                "widths": {layer: int(parts[0][layer].shape[1]) for layer in layers}, "model": model.name,
                "model_sha256": model.sha256, "dataset": dataset.name, "dataset_sha256": dataset.sha256,
                "n_samples": dataset.n_samples, "seconds": 0.0, "device": "sharded"}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / _OWNER).unlink(missing_ok=True)
        final = root / key
        try:
            tmp.rename(final)
        except OSError:  # the same entry was completed meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def extract(
    model: LoadedModel | nn.Module,
    dataset: Dataset | torch.Tensor | np.ndarray,
    layers: list[str] | str,
    *,
    pooling: str = "mean",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Activations:
    """Pooled activations of ``layers`` for every sample of ``dataset``.

    Returns an :class:`Activations` mapping layer name -> float32 tensor ``(n_samples, n_features)``
    memory-mapped from the cache. ``pooling`` reduces conv maps and token sequences: ``"mean"``,
    ``"max"``, ``"flatten"``, ``"cls"`` (first token), ``"last"`` (last non-padding token).
    ``batch_size`` trades speed for memory (64–4096). ``device=None`` picks cuda, mps, then cpu.
    ``cache_dir=None`` uses :func:`default_cache_dir`. ``progress(done, total)`` is called after
    each batch with the number of samples done. The model runs in eval mode (no dropout, BatchNorm on
    its running statistics); each module's own mode is restored afterwards. Floating batches are cast to
    the dtype of the model's floating weights. Token models mask their padding (``config.pad_token_id``
    for Hugging Face models, none when it is unset; 0 for the workbench's own). Hooked runs of one module
    take turns across threads.
    """
    lm = as_loaded_model(model)
    data = _as_dataset(dataset)
    layers = check_layers(lm, layers)
    if pooling not in POOLINGS:
        raise ParameterError(f"The 'pooling' parameter of extract must be one of {', '.join(map(repr, POOLINGS))}. Got {pooling!r}.")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, (bool, np.bool_)) or batch_size < 1:
        raise ParameterError(f"The 'batch_size' parameter of extract must be a positive int. Got {batch_size!r}.")
    batch_size = int(batch_size)
    check_inputs(lm, data)
    dev = resolve_device(device)
    key = cache_key(lm, data, layers, pooling, batch_size)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ParameterError(f"The 'cache_dir' parameter of extract must be a folder path. Got {type(cache_dir).__name__}.")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _cached(root / key, data, lm, layers, pooling)
    if cached is None:
        return _run_and_cache(lm, data, layers, pooling, batch_size, dev, root, key, progress)
    if progress is not None:
        progress(data.n_samples, data.n_samples)
    return cached


def _libc_fallocate() -> Callable[..., int] | None:
    """Linux's ``fallocate(fd, mode, offset, len)``, or None elsewhere. Not ``os.posix_fallocate``: where the file
    system cannot reserve space (NFS before 4.2), glibc emulates that by writing into every block of the file."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the first ``size`` bytes of the open file ``fd`` on disk (the file grows to that size). Writes into
    reserved space skip the file system's block allocation per page (a third of the cost of writing to ext4), and a
    disk without room for the whole entry fails here, before the model runs, instead of part way through. Where the
    file system or platform cannot reserve space, nothing is done and the writes allocate as they go."""
    if _fallocate is None or size <= 0:
        return
    if _fallocate(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (*_NO_ROOM, errno.EFBIG):
            raise OSError(code, os.strerror(code))


class _LayerFile:
    """One layer's ``.npy`` file written front to back. Blocks smaller than the write buffer (about
    ``WRITE_BUFFER_BYTES``, reused) are gathered in it and written when it fills, so a run of small batches
    costs a few large writes instead of one system call per batch and layer; a block at least that large goes
    out straight from its own memory. The file's full size is reserved on disk first (:func:`_preallocate`). A memory
    map is not used: first-touch page faults on a fresh map cost several times what sequential writes do."""

    def __init__(self, path: Path, n_samples: int, width: int):
        self.path, self.n_samples, self.width, self.rows = path, n_samples, width, 0
        capacity = WRITE_BUFFER_BYTES // (4 * max(width, 1))
        self.buffer = np.empty((capacity, width), dtype=np.float32) if capacity >= 2 else None
        self.filled = 0
        self.handle = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        np.lib.format.write_array_header_1_0(
            self.handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (n_samples, width)})
        try:
            _preallocate(self.handle.fileno(), self.handle.tell() + 4 * n_samples * width)
        except BaseException:
            self.handle.close()
            raise

    def append(self, block: np.ndarray) -> None:
        """Add ``block`` (rows of this layer, in order)."""
        rows = len(block)
        if self.buffer is not None and self.filled + rows > len(self.buffer):
            self.flush()
        if self.buffer is None or rows > len(self.buffer):
            self._write(block)
        else:
            self.buffer[self.filled:self.filled + rows] = block
            self.filled += rows
        self.rows += rows

    def flush(self) -> None:
        """Write the gathered rows."""
        if self.filled:
            self._write(self.buffer[:self.filled])
            self.filled = 0

    def _write(self, block: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(block, dtype=np.float32)).cast("B")
        while view:
            view = view[self.handle.write(view):]

    def close(self) -> None:
        """Write what is gathered and close the file."""
        if not self.handle.closed:
            try:
                self.flush()
            finally:
                self.handle.close()

    def discard(self) -> None:
        """Close the file without writing what is gathered (the entry is abandoned)."""
        self.filled = 0
        self.handle.close()


class _HostStream:
    """The pooled blocks of each batch, on their way to the layer files. On the CPU each batch is written at once.
    From an accelerator, batches are gathered on the device up to ``chunk_bytes`` and brought to the host in one copy
    per chunk (not one per batch or layer), each layer's rows contiguous so that they are written without another
    copy; on CUDA the copy goes to pinned memory without waiting, and the previous chunk is written meanwhile."""

    def __init__(self, writers: dict[str, _LayerFile], layers: list[str], gather: bool, chunk_bytes: int | None = None):
        self.writers, self.layers, self.gather = writers, layers, gather
        self.chunk_bytes = TRANSFER_BYTES if chunk_bytes is None else chunk_bytes
        self.pending: list[list[torch.Tensor]] = []
        self.bytes = 0
        self.in_flight: tuple[torch.Tensor, Any, list[tuple[int, int]]] | None = None  # host copy, its event, (rows, width)

    def add(self, blocks: list[torch.Tensor]) -> None:
        if not self.gather:
            for layer, block in zip(self.layers, blocks, strict=True):
                self.writers[layer].append(block.numpy())
            return
        self.pending.append(blocks)
        self.bytes += sum(b.numel() * b.element_size() for b in blocks)
        if self.bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        """Start bringing the gathered batches to the host, and write the chunk brought before."""
        if not self.pending:
            return
        per_layer = [torch.cat([blocks[i] for blocks in self.pending]) for i in range(len(self.layers))]
        self.pending, self.bytes = [], 0
        flat = torch.cat([t.reshape(-1) for t in per_layer])
        event = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flat.cpu()
        previous, self.in_flight = self.in_flight, (host, event, [tuple(t.shape) for t in per_layer])
        self._write(previous)

    def finish(self) -> None:
        """Write everything gathered so far."""
        self.flush()
        previous, self.in_flight = self.in_flight, None
        self._write(previous)

    def _write(self, chunk: tuple[torch.Tensor, Any, list[tuple[int, int]]] | None) -> None:
        if chunk is None:
            return
        host, event, shapes = chunk
        if event is not None:
            event.synchronize()
        values, start = host.numpy(), 0
        for layer, (rows, width) in zip(self.layers, shapes, strict=True):
            self.writers[layer].append(values[start:start + rows * width].reshape(rows, width))
            start += rows * width


@contextmanager
def _writing(root: Path, entry_bytes: int) -> Iterator[None]:
    """Turn a failed write into the cache into one sentence; a full disk says how much the entry needs."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _NO_ROOM:
            raise ParameterError(
                f"The cache folder '{root}' ran out of space ({reason}) while writing these activations (about "
                f"{entry_bytes / 1e6:.3g} MB); free space there or pass a cache_dir on a disk with room.") from exc
        raise ParameterError(f"The activations could not be written to the cache folder '{root}' ({reason}); "
                             "pass a cache_dir that is a writable folder.") from exc


def _run_and_cache(lm: LoadedModel, data: Dataset, layers: list[str], pooling: str, batch_size: int,
                   dev: torch.device, root: Path, key: str, progress: Progress | None) -> Activations:
    _cache_root(root)
    with exclusive(lm.module):  # hooks see every thread's forward passes: one hooked run of a model or its parts at a time
        cached = _cached(root / key, data, lm, layers, pooling)  # finished by another thread while this one waited
        if cached is not None:
            if progress is not None:
                progress(data.n_samples, data.n_samples)
            return cached
        return _run_locked(lm, data, layers, pooling, batch_size, dev, root, key, progress)


def _run_locked(lm: LoadedModel, data: Dataset, layers: list[str], pooling: str, batch_size: int,
                dev: torch.device, root: Path, key: str, progress: Progress | None) -> Activations:
    tmp = root / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _claim(tmp)
    except OSError as exc:
        raise ParameterError(f"The cache folder '{root}' is not writable ({exc.strerror or type(exc).__name__}); "
                             "pass a cache_dir that is a writable folder.") from exc
    files = _layer_files(layers)
    writers: dict[str, _LayerFile] = {}
    entry_bytes = 0  # the size of the entry's layer files, once the first batch gives each layer's width
    stream = _HostStream(writers, layers, gather=dev.type != "cpu")
    n = data.n_samples
    module = lm.module
    original_device = module_device(module)
    started = time.perf_counter()
    pad = pad_token_id(lm)
    try:
        module.to(dev)
        dtype = float_dtype(module)
        with eval_mode(module), PooledCapture(module, layers, pooling, channel_first=channel_first_layers(module, layers)) as capture, \
                torch.inference_mode(), full_float32():
            # the first batch holds at least 2 samples, so that a layer giving one row per batch (a table the batch
            # shares, such as position embeddings) is told from one giving a row per sample even with batch_size 1
            bounds = [0, *range(max(batch_size, 2), n, batch_size), n] if n > 1 else [0, n]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                batch = rows_on(data.x, start, stop, dev, dtype)
                capture.begin_batch(mask=(batch != pad) if pad is not None else None)
                try:
                    _forward(lm, batch)
                except WorkbenchError:
                    raise
                except FORWARD_ERRORS as exc:
                    if any(sign in str(exc) for sign in DEVICE_MISMATCH):
                        raise DataError(
                            f"Model '{lm.name}' holds tensors that are not on {dev} with its parameters and buffers "
                            f"({_first_line(exc)}); register them as buffers so that they move with the model, or "
                            "extract on the device they are on."
                        ) from exc
                    raise DataError(
                        f"Model '{lm.name}' failed on a batch of dataset '{data.name}' with shape {tuple(batch.shape)} "
                        f"({_first_line(exc)}); check that the dataset is made for this model."
                    ) from exc
                captured = capture.end_batch()
                for layer in layers:
                    if layer not in captured:
                        raise DataError(f"Layer '{layer}' did not run in the forward pass of '{lm.name}', so it has no activations; pick a layer that runs.")
                    out = captured[layer]
                    if out.shape[0] != batch.shape[0]:
                        raise DataError(
                            f"Layer '{layer}' of '{lm.name}' outputs {out.shape[0]} row(s) for a batch of {batch.shape[0]} samples "
                            "(a table shared by all samples, such as position embeddings), so it has no activations per sample; "
                            "pick another layer."
                        )
                    if writers and out.shape[1] != writers[layer].width:
                        raise DataError(
                            f"Layer '{layer}' gave {out.shape[1]} features on the batch at sample {start} but {writers[layer].width} "
                            f"before (with pooling '{pooling}'); use a pooling that gives a fixed width, such as 'mean'."
                        )
                if not writers:  # the widths are known from the first batch: each file is made, and reserved, at full size
                    entry_bytes = 4 * n * sum(int(captured[layer].shape[1]) for layer in layers)
                    with _writing(root, entry_bytes):
                        for layer in layers:
                            writers[layer] = _LayerFile(tmp / files[layer], n, int(captured[layer].shape[1]))
                with _writing(root, entry_bytes):
                    stream.add([captured[layer] for layer in layers])
                if progress is not None:
                    progress(stop, n)
            with _writing(root, entry_bytes):
                stream.finish()
        meta = {"complete": True, "key": key, "pooling": pooling, "files": files,
                "widths": {layer: writers[layer].width for layer in layers}, "model": lm.name,
                "model_sha256": lm.sha256, "dataset": data.name, "dataset_sha256": data.sha256, "n_samples": n,
                "seconds": time.perf_counter() - started, "device": str(dev)}
        with _writing(root, entry_bytes):
            for writer in writers.values():  # no fsync: the page cache holds the data for readers, a crash loses only this entry
                writer.close()
            (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / _OWNER).unlink(missing_ok=True)
        final = root / key
        for _ in range(2):
            try:
                tmp.rename(final)
                break
            except OSError:
                if _cached(final, data, lm, layers, pooling) is not None:  # another process finished the same key first
                    break
                # a damaged entry was in the way: it is removed now, so the rename is tried once more
        return _read_cache(final, json.loads((final / "meta.json").read_text()), data, lm, layers, pooling)
    finally:
        for writer in writers.values():
            writer.discard()
        module.to(original_device)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
