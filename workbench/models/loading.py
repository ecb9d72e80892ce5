"""Loading checkpoints safely.

Uploads are untrusted. Without a switch the loader reads only formats that cannot run code:
safetensors, state dicts through ``torch.load(..., weights_only=True)``, and Hugging Face model
folders (or zips of one) whose weights are safetensors. Full pickles, TorchScript and
``torch.export`` archives run code when loaded: they are refused unless ``trust_remote_code=True``,
and with ``isolate=True`` as well (the app) a trusted full pickle is opened in a separate process
that hands back only weights and stock layers (:mod:`workbench.models.isolated`).
Zip archives are checked for path traversal, odd member names and decompression bombs before anything
is extracted. Declared sizes are never trusted: a state dict's tensors must store every value they declare,
a spec is counted on the meta device before it is built, and a Hugging Face config must fit the bytes of the
weight files transformers reads (model.safetensors or the shards its index names), read from their headers. Loaded
weights are checked too: a float model takes only finite floating-point weights, and a Hugging Face model whose
weights do not fill it (or are left over, or of another shape) is refused rather than completed at random.
Any other failure to read a file is a :class:`CorruptFileError` naming it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import tempfile
import threading
import warnings
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from workbench.errors import (
    ArchitectureError,
    CorruptFileError,
    FileTooLargeError,
    MissingArchitectureError,
    ParameterError,
    UnsafeFileError,
    UnsupportedFormatError,
    WorkbenchError,
)
from workbench.models.architectures import build_model, input_spec, meta_model, parse_spec

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".zip")
MAX_MODEL_BYTES = 2 << 30
MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 200
MIN_BOMB_BYTES = 64 << 20  # below this an archive is unpacked whatever its ratio (pruned weights deflate > 200x)
MAX_SAFETENSORS_HEADER = 100 << 20
MAX_MEMBER_NAME = 255  # bytes in one part of a zip member's path (the file system's limit)
MAX_MEMBER_PATH = 1024  # bytes in a zip member's whole path
MAX_CONFIG_BYTES = 16 << 20  # a Hugging Face config.json (real ones are a few KiB)
MAX_CONFIG_LAYERS = 1_000  # layers a Hugging Face config may ask for (real models have a few hundred at most)
CONVERT_HINT = (
    "convert it to safetensors where it was made: "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors', metadata={'architecture': json.dumps(spec)})"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for analysis.

    ``module`` is in eval mode. :attr:`sha256` hashes the weights (names, dtypes, shapes, bytes of the
    state dict) as they are now, so the same weights give the same hash whatever file they came from,
    and weights changed in place (an optimizer step, an edited bias) give a new hash, and new
    activations from :func:`~workbench.extract`. ``loaded_sha256`` is the hash when the model was loaded.
    :attr:`content_sha256` adds the module tree (each module's path, class, settings and non-persistent buffers): the same
    weights under another architecture (tanh instead of ReLU) compute other activations, so caches
    are keyed by it.
    ``input_shape``/``input_dtype`` describe one sample when known (from the spec).
    """

    module: nn.Module
    name: str
    loaded_sha256: str
    architecture: dict[str, Any] | None
    n_parameters: int
    source_format: str
    input_shape: tuple[int, ...] | None = None
    input_dtype: torch.dtype = torch.float32
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def sha256(self) -> str:
        """sha256 of the current weights; rehashed only after a parameter or buffer changed since the last hash
        (in-place updates such as optimizer steps are seen; writes through ``tensor.data`` bypass torch's
        version counters and are not)."""
        return current_weights_sha256(self.module)

    @property
    def content_sha256(self) -> str:
        """sha256 of the current weights and of the module tree that computes with them (see :func:`structure_sha256`)."""
        return hashlib.sha256(f"{self.sha256}|{structure_sha256(self.module)}|{self.source_format}".encode()).hexdigest()

    @property
    def takes_tokens(self) -> bool:
        return self.input_dtype == torch.int64

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module: ``model(x)`` is ``model.module(x)``."""
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        kind = (self.architecture or {}).get("type", type(self.module).__name__)
        shape = f", input_shape={self.input_shape}" if self.input_shape is not None else ""
        return (f"LoadedModel(name={self.name!r}, architecture={kind!r}, n_parameters={self.n_parameters:,}{shape}, "
                f"source_format={self.source_format!r}, sha256={self.sha256[:12]!r}...)")


def _tensors_sha256(named: Any) -> str:
    """sha256 over ``(name, tensor)`` pairs in the given order: names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in named:
        if tensor.is_meta:  # shape and dtype without values: nothing to read
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|meta".encode())
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the sorted state dict: names, dtypes, shapes and raw bytes."""
    return _tensors_sha256(sorted(module.state_dict().items()))


_MODULE_BOOKKEEPING = frozenset(nn.Module().__dict__) | {
    "_compiled_call_impl",  # torch.compile's wrapper
    "_is_hf_initialized",  # Hugging Face: whether weights were initialised or loaded
    "name_or_path",  # Hugging Face: the folder the weights were read from
}
_SETTING_SCALARS = (bool, int, float, str, type(None))


def _setting(value: Any) -> str | None:
    """A deterministic text for a plain setting (a number, string, None, dtype, function, or a tuple or list of
    these), or None for anything else (tensors, submodules, configs, dicts, sets)."""
    if isinstance(value, _SETTING_SCALARS):
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        items = [_setting(v) for v in value]
        return None if None in items else f"{type(value).__name__}({', '.join(items)})"
    if isinstance(value, functools.partial):
        func = _setting(value.func)
        args = [_setting(v) for v in value.args]
        kwargs = {k: _setting(v) for k, v in sorted(value.keywords.items())}
        if func is None or None in args or None in kwargs.values():
            return None
        return f"partial({func}, {', '.join(args)}, {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    if callable(value) and not isinstance(value, (torch.Tensor, nn.Module)):
        return f"<callable {_callable_text(value)}>"
    return None


def _callable_text(fn: Any) -> str:
    """A function by module and qualified name and, for Python code, a digest of its code and of the values it
    closes over (two lambdas, or two closures of one factory with other settings, differ); a closed-over value
    without a plain text (a tensor, an object) counts by its identity, so such a model is keyed per process."""
    func = getattr(fn, "__func__", fn)  # a bound method: its function
    named = func if hasattr(func, "__qualname__") else type(func)
    text = f"{getattr(named, '__module__', None)}.{named.__qualname__}"
    code = getattr(func, "__code__", None)
    if code is None:
        return text
    parts = [_code_digest(code)]
    cells = [c for c in (getattr(func, "__closure__", None) or ()) if c is not None]
    values = [*(getattr(func, "__defaults__", None) or ()), *(getattr(func, "__kwdefaults__", None) or {}).values()]
    for cell in cells:
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            values.append(None)
    for value in values:
        plain = None if callable(value) else _setting(value)
        if plain is None and callable(value) and not isinstance(value, (torch.Tensor, nn.Module)):
            inner = getattr(value, "__func__", value)
            plain = f"{getattr(inner, '__module__', None)}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"
        parts.append(plain if plain is not None else f"<{type(value).__qualname__} at {id(value):#x}>")
    return f"{text}#{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"


def _code_digest(code: Any) -> str:
    """sha256 of a code object's bytecode, names and constants (nested code objects by their own digest)."""
    consts = [_code_digest(c) if hasattr(c, "co_code") else repr(c) for c in code.co_consts]
    payload = code.co_code.hex() + "|" + repr(code.co_names) + "|" + repr(consts)
    return hashlib.sha256(payload.encode()).hexdigest()


_OWN_HOOKS = "workbench.activations.capture"  # extraction's hooks record outputs and change none


def _hooks_text(hooks: Any) -> str:
    """The forward hooks in ``hooks`` (an ordered dict of a module's, or torch's global ones) that could change outputs."""
    texts = [_callable_text(h) for h in hooks.values()
             if getattr(getattr(h, "__func__", h), "__module__", None) != _OWN_HOOKS]
    return ",".join(texts)


def _settings(module: nn.Module) -> str:
    """``module``'s plain attributes (see :func:`_setting`) by name, without torch's and loaders' bookkeeping
    (hooks, the train/eval flag, where the weights were read from)."""
    registered = set(module._parameters) | set(module._buffers) | set(module._modules)
    parts = []
    for key in sorted(module.__dict__):
        if key in _MODULE_BOOKKEEPING or key in registered:
            continue
        text = _setting(module.__dict__[key])
        if text is not None:
            parts.append(f"{key}={text}")
    return ";".join(parts)


_SCRATCH_HASHES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _scratch_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``module`` and its submodules compute with that are not saved, so the weights hash leaves them
    out: non-persistent buffers, and tensors kept as plain attributes (a causal mask set with ``self.mask = ...``)."""
    found = []
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        found += [(prefix + name, m._buffers[name]) for name in sorted(m._non_persistent_buffers_set)
                  if m._buffers.get(name) is not None]
        found += [(f"{prefix}{name} (attribute)", value) for name, value in sorted(m.__dict__.items())
                  if isinstance(value, torch.Tensor) and name not in m._parameters and name not in m._buffers]
    return found


def scratch_buffers_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors :func:`_scratch_buffers` finds in ``module``,
    recomputed only when one of them changed since the last call."""
    buffers = _scratch_buffers(module)
    try:
        fingerprint: tuple | None = tuple((name, t.data_ptr(), t._version, t.shape, t.dtype) for name, t in buffers)
    except RuntimeError:  # a tensor made under torch.inference_mode (recomputed in a forward pass) counts no changes
        fingerprint = None
    return _remembered(_SCRATCH_HASHES, module, fingerprint, lambda: _tensors_sha256(buffers))


def _remembered(memo: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]], module: nn.Module,
                fingerprint: tuple | None, compute: Callable[[], str]) -> str:
    """The hash ``memo`` holds for ``module`` when its ``fingerprint`` is unchanged, else ``compute()``, remembered;
    always ``compute()`` when there is no fingerprint (tensors whose changes are not counted)."""
    if fingerprint is None:
        memo.pop(module, None)
        return compute()
    cached = memo.get(module)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    sha = compute()
    memo[module] = (fingerprint, sha)
    return sha


def structure_sha256(module: nn.Module) -> str:
    """sha256 of the module tree and what it computes with besides the saved weights: every module's path, class
    (module and qualified name), ``extra_repr`` and plain attributes (flags such as ``norm_first`` or
    ``count_include_pad``, numbers, strings, activation functions by module and qualified name), and the values
    of non-persistent buffers and of tensors kept as plain attributes, and the forward hooks and pre-hooks that could
    change outputs (of each module, and torch's global ones; Python functions by their code and closed-over values,
    see :func:`_callable_text`). The train/eval flag, backward hooks, extraction's own recording hooks and where the
    weights were read from are left out. Two models with equal weights and equal structure compute the same outputs
    unless a custom ``forward`` method differs in code of the same class name."""
    from torch.nn.modules import module as module_impl

    h = hashlib.sha256()
    for name, m in module.named_modules():
        cls = type(m)
        hooks = f"{_hooks_text(m._forward_pre_hooks)}|{_hooks_text(m._forward_hooks)}"
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{m.extra_repr()}|{_settings(m)}|{hooks}\n".encode())
    for attr in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        h.update(f"{attr}|{_hooks_text(getattr(module_impl, attr, {}))}\n".encode())
    h.update(scratch_buffers_sha256(module).encode())
    return h.hexdigest()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration (no dropout, BatchNorm on its running statistics, which stay
    untouched); each submodule's own train/eval flag is restored afterwards, also after an error."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


_WEIGHT_HASHES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _weights_fingerprint(module: nn.Module) -> tuple | None:
    """Where each parameter and buffer lives and how often it was modified in place: equal fingerprints mean
    unchanged weights (torch bumps a tensor's version on every in-place update). None when a tensor was made
    under ``torch.inference_mode``, which counts no changes."""
    try:
        return tuple((t.data_ptr(), t._version, t.shape, t.dtype) for t in (*module.parameters(), *module.buffers()))
    except RuntimeError:
        return None


def current_weights_sha256(module: nn.Module) -> str:
    """:func:`weights_sha256` of ``module`` now, recomputed only when its fingerprint changed since the last call."""
    return _remembered(_WEIGHT_HASHES, module, _weights_fingerprint(module), lambda: weights_sha256(module))


def wrap_module(module: nn.Module, *, name: str = "model", architecture: dict[str, Any] | None = None,
                source_format: str = "module", metadata: dict[str, str] | None = None) -> LoadedModel:
    """Describe an in-memory module as a :class:`LoadedModel` (puts it in eval mode)."""
    module.eval()
    return _describe(module, name=name, architecture=architecture, source_format=source_format, metadata=metadata)


def _describe(module: nn.Module, *, name: str, architecture: dict[str, Any] | None = None, source_format: str = "module",
              metadata: dict[str, str] | None = None) -> LoadedModel:
    empty = next((k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta), None)
    if empty is not None:
        raise ParameterError(f"Model '{name}' has weights on the meta device, which hold shapes but no values ('{empty}'); "
                             "give them values first (module.to_empty(device='cpu'), then load_state_dict).")
    spec = input_spec(architecture)
    return LoadedModel(
        module=module,
        name=name,
        loaded_sha256=current_weights_sha256(module),
        architecture=architecture,
        n_parameters=sum(p.numel() for p in module.parameters()),
        source_format=source_format,
        input_shape=spec[0] if spec else None,
        input_dtype=spec[1] if spec else torch.float32,
        metadata=dict(metadata or {}),
    )


def as_loaded_model(model: LoadedModel | nn.Module) -> LoadedModel:
    """Accept a LoadedModel or a bare nn.Module (described as it is: its train/eval mode is left alone, the
    functions that run it run it in :func:`eval_mode`)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return _describe(model, name=type(model).__name__)
    raise ArchitectureError(f"Expected a LoadedModel or torch.nn.Module; got {type(model).__name__}. Load files with load_model(path).")


def load_model(
    source: str | Path | bytes,
    *,
    architecture: dict[str, Any] | str | None = None,
    trust_remote_code: bool = False,
    isolate: bool = False,
    name: str | None = None,
    filename: str | None = None,
    max_bytes: int = MAX_MODEL_BYTES,
) -> LoadedModel:
    """Load a checkpoint from a path or from uploaded bytes.

    Supported: ``.safetensors`` (architecture spec from ``architecture=`` or the file's metadata key
    ``"architecture"``); a state dict in ``.pt/.pth/.bin/.ckpt`` read with ``weights_only=True``
    (spec required); a Hugging Face model folder or a ``.zip`` of one (config.json and
    model.safetensors, loaded offline with transformers); a full pickled ``nn.Module``,
    TorchScript or ``torch.export`` archive only with ``trust_remote_code=True``, because loading
    those runs code from the file.

    ``isolate=True`` (what the app does) keeps code from the file out of this process: a trusted
    full pickle is opened in a separate process, which hands back only its weights and, for a
    module built from ``nn.Sequential`` and stock ``torch.nn`` layers, a spec that rebuilds it
    (:mod:`workbench.models.isolated`); a module with its own code, a TorchScript or
    ``torch.export`` archive and Hugging Face remote code are then refused with a message.

    ``filename`` names the upload when ``source`` is bytes (its extension selects the reader).
    ``max_bytes`` bounds the file size (and the unpacked size of archives).

    Every failure caused by the file is a :class:`~workbench.WorkbenchError`: an unexpected exception
    while reading it becomes a :class:`CorruptFileError` naming the file (the original is chained).
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise ParameterError(f"load_model reads a path (str or Path) or the bytes of an upload; got {type(source).__name__}. "
                             "Pass the checkpoint's path, such as load_model('model.safetensors').")
    try:
        loaded = _load(source, architecture, trust_remote_code, isolate, name, filename, max_bytes)
    except (WorkbenchError, MemoryError):
        raise
    except Exception as exc:
        label = filename if isinstance(source, (bytes, bytearray)) else Path(str(source)).name
        raise CorruptFileError(f"'{label}' could not be loaded as a model ({type(exc).__name__}: {_first_line(exc)}); "
                               "check that it is an intact checkpoint of a supported type.") from exc
    origin = f"upload:{filename}" if isinstance(source, (bytes, bytearray)) else str(Path(source))
    return dataclasses.replace(loaded, source=origin)


def _load(source: str | Path | bytes, architecture: dict[str, Any] | str | None, trust_remote_code: bool,
          isolate: bool, name: str | None, filename: str | None, max_bytes: int) -> LoadedModel:
    spec = parse_spec(architecture) if architecture is not None else None
    if isinstance(source, (bytes, bytearray)):
        if not filename:
            raise UnsupportedFormatError("Pass filename= with uploaded bytes so the file type is known (e.g. 'model.safetensors').")
        data = bytes(source)
        label = filename
        display = name or Path(filename).stem
    else:
        path = Path(source)
        if path.is_dir():
            return _load_hf_folder(path, name=name or path.name, trust_remote_code=trust_remote_code, isolate=isolate)
        if not path.exists():
            raise UnsupportedFormatError(f"No model file at '{path}'; check the path.")
        size = path.stat().st_size
        if size > max_bytes:
            raise FileTooLargeError(f"Model file '{path.name}' is {size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; raise max_bytes or the server's upload limit.")
        data = path.read_bytes()
        label = path.name
        display = name or path.stem
    if len(data) > max_bytes:
        raise FileTooLargeError(f"Model file '{label}' is {len(data) / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; raise max_bytes or the server's upload limit.")
    if not data:
        raise CorruptFileError(f"Model file '{label}' is empty (0 bytes); upload the checkpoint again.")
    suffix = Path(label).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise UnsupportedFormatError(
            f"Cannot load '{label}' as a model: supported types are {', '.join(MODEL_SUFFIXES)} or a Hugging Face model folder."
        )
    if suffix == ".safetensors":
        return _load_safetensors(data, label, display, spec)
    if data[:4] == b"PK\x03\x04":
        kind = _classify_zip(data, label, max_bytes)
        if kind == "huggingface":
            with tempfile.TemporaryDirectory(prefix="workbench-hf-") as tmp:
                root = _safe_extract(data, label, Path(tmp), max_bytes)
                return _load_hf_folder(root, name=display, trust_remote_code=trust_remote_code, isolate=isolate, label=label)
        if kind in ("torchscript", "torch.export"):
            return _load_code_archive(data, label, display, kind, spec, trust_remote_code, isolate)
        if kind != "torch.save":
            raise UnsupportedFormatError(
                f"'{label}' is a zip archive but neither a torch checkpoint nor a Hugging Face model folder (no config.json found)."
            )
    elif suffix == ".zip":
        raise CorruptFileError(f"'{label}' is not a valid zip archive; re-create it with a zip tool.")
    return _load_torch_pickle(data, label, display, spec, trust_remote_code, isolate)


# ---------------------------------------------------------------------------------------------
# safetensors


def _looks_like(data: bytes) -> str | None:
    """What a file that is not safetensors appears to be, from its first bytes (None when unrecognised)."""
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save writes one): give a torch checkpoint a .pt name"
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old-style torch checkpoint): give it a .pt name"
    if data.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras or h5py), which is not read here: save the weights with safetensors"
    if data.startswith(b"\x93NUMPY"):
        return "a NumPy array (.npy), not a model"
    sample = data[:512]
    if sample and all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return "a text file, not a model"
    return None


def _safetensors_reason(exc: BaseException) -> str:
    """What the safetensors reader found wrong, in plain words."""
    text = str(exc)
    if "not fully covered" in text or "incomplete metadata" in text:
        return "its tensors do not cover the file exactly: it was cut short or has bytes no tensor uses"
    if "InvalidOffset" in text or "out of bounds" in text.lower():
        return "a tensor points outside the file"
    if "TensorInvalidInfo" in text or "shape" in text.lower():
        return "a tensor's shape does not match its bytes"
    return text.splitlines()[0][:160] if text else type(exc).__name__


def safetensors_metadata(data: bytes, label: str) -> dict[str, str]:
    """Parse and check the safetensors header without trusting its declared sizes."""
    if len(data) < 8:
        raise CorruptFileError(f"'{label}' is truncated: a safetensors file starts with an 8-byte header length.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > len(data):
        what = _looks_like(data)
        if what is not None:
            raise UnsupportedFormatError(f"'{label}' is not a safetensors file: it looks like {what}.")
    if header_len > MAX_SAFETENSORS_HEADER:
        raise CorruptFileError(f"'{label}' is not a readable safetensors file: its first 8 bytes declare a header larger than "
                               f"{MAX_SAFETENSORS_HEADER >> 20} MiB, which no model has; upload an intact copy.")
    if 8 + header_len > len(data):
        raise CorruptFileError(f"'{label}' is truncated: its safetensors header ends at byte {8 + header_len} but the file has "
                               f"{len(data)} bytes; upload the whole file.")
    try:
        header = json.loads(data[8:8 + header_len])
        if not isinstance(header, dict):
            raise CorruptFileError(f"'{label}' has a damaged safetensors header (not a JSON object).")
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"'{label}' has a damaged safetensors header ({type(exc).__name__}); upload an intact copy.") from exc


def _load_safetensors(data: bytes, label: str, name: str, spec: dict[str, Any] | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    metadata = safetensors_metadata(data, label)
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptFileError(f"'{label}' is a damaged safetensors file ({_safetensors_reason(exc)}); upload an intact copy.") from exc
    if spec is None and "architecture" in metadata:
        spec = parse_spec(metadata["architecture"])
    # safetensors.torch.save_model keeps one name of tied tensors and records each dropped name -> the kept one
    state.update({k: state[v] for k, v in metadata.items() if k not in state and v in state})
    return _from_state_dict(state, label, name, spec, "safetensors", metadata)


# ---------------------------------------------------------------------------------------------
# state dicts and pickles


def weights_only_load(data: bytes) -> Any:
    """``torch.load(..., weights_only=True)`` of ``data`` on the CPU, without torch's warning about the pickle protocol
    (the file either loads or is refused with one sentence; the warning would print before it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _load_torch_pickle(data: bytes, label: str, name: str, spec: dict[str, Any] | None, trust: bool,
                       isolate: bool) -> LoadedModel:
    try:
        obj = weights_only_load(data)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc) or _scan_globals(data)
        if reason is None:
            raise CorruptFileError(f"'{label}' is not a readable PyTorch checkpoint (damaged pickle data); upload an intact copy.") from exc
        if not trust:
            raise UnsafeFileError(
                f"'{label}' is a full pickle whose loading can run arbitrary code (it references {reason}); it was not loaded. "
                f"Load it only if you made it yourself (in Python pass trust_remote_code=True; the app offers 'I trust this "
                f"file' when it is started with 'workbench app --trust-uploads'), or {CONVERT_HINT}."
            ) from exc
        if isolate:
            return _open_isolated(data, label, name, spec)
        obj = _trusted_torch_load(data, label)
    except Exception as exc:  # torch raises many types for damaged archives
        what = _looks_like(data)
        if what is not None and not what.startswith(("a zip archive", "a Python pickle")):
            raise UnsupportedFormatError(f"'{label}' is not a PyTorch checkpoint: it looks like {what}.") from exc
        raise CorruptFileError(f"'{label}' is not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); upload an intact copy.") from exc
    if isinstance(obj, nn.Module):
        return wrap_module(obj, name=name, architecture=spec, source_format="pickle (trusted)")
    state = find_state_dict(obj, label)
    _check_tensors(state, label)
    return _from_state_dict(state, label, name, spec, "state dict", {})


def _open_isolated(data: bytes, label: str, name: str, spec: dict[str, Any] | None) -> LoadedModel:
    from workbench.models.isolated import ChildFailed, ChildRefused, open_in_subprocess

    try:
        weights = open_in_subprocess(data, label)
    except ChildRefused as exc:
        reason = str(exc)
        if reason.startswith(f"'{label}' "):  # the file named once, at the start
            reason = "it " + reason.removeprefix(f"'{label}' ")
        reason = reason.split(";")[0].rstrip(".")  # what the file held, without the advice for state dicts
        raise UnsafeFileError(
            f"'{label}' was unpickled in a separate process, so its code has run, but nothing came back: {reason}. Only "
            f"weights and stock torch.nn layers come back from that process; load it from Python with "
            f"load_model(path, trust_remote_code=True), or {CONVERT_HINT}."
        ) from None
    except ChildFailed as exc:
        raise CorruptFileError(f"'{label}' could not be unpickled even with trust enabled ({exc}){_missing_code_hint(str(exc))}.") from None
    loaded = _load_safetensors(weights, label, name, spec)
    return dataclasses.replace(loaded, source_format="pickle (trusted, opened in a separate process)")


def _weights_only_reason(exc: BaseException) -> str | None:
    """The Python global a weights-only unpickler refused, or None when the data is simply damaged."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"global[^\n]*?([A-Za-z_][\w]*\.[\w.]+)", text, re.I)
    if match:
        return f"'{match.group(1)}'"
    if re.search(r"global|reduce|build|object|class", text, re.I) and "Unsupported operand" not in text:
        return "objects outside the allowed tensor types"
    return None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "_codecs.encode",
                         "numpy.core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray")


def _scan_globals(data: bytes) -> str | None:
    """Name the first non-tensor global a pickle stream references, without running it.

    Scans the opcodes of a raw pickle (or of ``data.pkl`` inside a torch zip) with ``pickletools``.
    """
    import pickletools

    streams = [data]
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                streams = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, KeyError):
            return None
    for stream in streams:
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = None
                if opcode.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                elif isinstance(arg, str):
                    strings.append(arg)
                if name and not name.startswith(_SAFE_GLOBAL_PREFIXES):
                    return f"'{name}'"
        except (ValueError, EOFError, UnicodeDecodeError, pickle.UnpicklingError):
            continue
    return None


_TRUST_LOCK = threading.Lock()


@contextmanager
def _weights_only_not_forced() -> Iterator[None]:
    """Lift ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (set in the app process) for one explicitly trusted load.

    Every untrusted load passes ``weights_only=True`` itself, so nothing else depends on the variable
    while it is lifted; the lock keeps two trusted loads from restoring it out of order.
    """
    with _TRUST_LOCK:
        saved = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        try:
            yield
        finally:
            if saved is not None:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def unpickle_trusted(data: bytes) -> Any:
    """Fully unpickle a torch checkpoint or a plain pickle. Runs code from the file: trusted data only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except RuntimeError as exc:
        if "magic number" not in str(exc):
            raise
    return pickle.loads(data)  # noqa: S301 (trusted by the caller)


def _trusted_torch_load(data: bytes, label: str) -> Any:
    try:
        with _weights_only_not_forced():
            return unpickle_trusted(data)
    except Exception as exc:
        raise CorruptFileError(f"'{label}' could not be unpickled even with trust enabled ({type(exc).__name__}: {_first_line(exc)})"
                               f"{_missing_code_hint(str(exc))}.") from exc


def _missing_code_hint(text: str) -> str:
    """What to do when a pickle names a class or module that cannot be imported here."""
    if "Can't get attribute" in text or "No module named" in text:
        return ("; the file needs the code that defined the model (a class of the script that saved it, or a module), which "
                "is not importable here: save model.state_dict() with safetensors and give its architecture spec")
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def find_state_dict(obj: Any, label: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "module", "net"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise CorruptFileError(
        f"'{label}' holds {'an' if type(obj).__name__[:1].lower() in 'aeiou' else 'a'} {type(obj).__name__}, not a state dict "
        "of tensors; save model.state_dict() (or a dict with a 'state_dict' entry)."
    )


def _check_tensors(state: dict[str, torch.Tensor], label: str) -> None:
    """Refuse tensors without values of their own (meta, sparse, quantized, nested, complex) and views that declare
    more values than the file stores for them (``expand``: stride 0), before any shape is used to allocate."""
    for key, t in state.items():
        odd = ("nested" if t.is_nested else "meta-device" if t.is_meta else f"{t.device.type}-device" if t.device.type != "cpu"
               else f"{t.layout}" if t.layout != torch.strided else "quantized" if t.is_quantized
               else f"complex ({t.dtype})" if t.dtype.is_complex else None)
        if odd is not None:
            raise CorruptFileError(f"'{label}' holds '{key}' as a {odd} tensor, not a dense array of real numbers; save the "
                                   "weights as dense, unquantized, real-valued CPU tensors.")
        stored = t.untyped_storage().nbytes()
        if t.numel() * t.element_size() > stored:
            raise UnsafeFileError(
                f"'{label}' declares '{key}' with shape {tuple(t.shape)} ({t.numel():,} values) but stores only {stored:,} bytes "
                "for it (an expanded or overlapping view), so its shapes would allocate memory the file does not hold; "
                "save real copies: {k: v.contiguous() for k, v in model.state_dict().items()}."
            )


_COMMON_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    stripped = _unprefixed(state)
    return stripped if set(stripped) & expected else state


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a wrapper prefix (``module.``, ``model.``...) that every key shares."""
    while state:
        prefix = next((p for p in _COMMON_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _meta_state(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict (names, shapes, dtypes) of the module ``spec`` describes, built on the meta device: nothing is
    allocated, so a spec is compared with the weights before it is built for real."""
    return meta_model(spec).state_dict()


def _mismatches(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``state`` missing, unexpected or of the wrong shape for ``expected``, each kind as one phrase."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}")
    if wrong:
        parts.append(f"wrong shape {', '.join(wrong[:4])} (file vs spec)")
    return parts


def _renamed(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds the tensors ``expected`` names, by shape, only under other names."""
    missing = sorted(tuple(v.shape) for k, v in expected.items() if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(tuple(v.shape) for k, v in state.items() if k not in expected)
    return bool(missing) and missing == unexpected


def _loads_exactly(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """Whether the module ``spec`` builds takes ``state`` with no key missing, extra or of another shape."""
    try:
        return not _mismatches(_meta_state(spec), state)
    except ArchitectureError:
        return False


def _numbered(state: dict[str, torch.Tensor], stem: str) -> list[torch.Tensor]:
    """The weights of ``stem1``, ``stem2``... in order."""
    found = sorted((int(m.group(1)), k) for k in state if (m := re.fullmatch(rf"{stem}(\d+)\.weight", k)))
    return [state[k] for _, k in found]


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Guess an ``mlp`` spec from ``fcN.weight ... out.weight`` keys (activation unknown: relu assumed).

    A guess is returned only when the module it builds loads ``state`` exactly; otherwise None
    (convolutional weights, for one: the input's height and width are not in them).
    """
    state = _unprefixed(state)
    fcs = _numbered(state, "fc")
    if not fcs or "out.weight" not in state or any(w.ndim != 2 for w in fcs):
        return None
    sizes = [int(fcs[0].shape[1])] + [int(w.shape[0]) for w in fcs] + [int(state["out.weight"].shape[0])]
    guess: dict[str, Any] = {"type": "mlp", "sizes": sizes, "activation": "relu"}
    if "bn1.running_mean" in state:
        guess["batchnorm"] = True
    return guess if _loads_exactly(guess, state) else None


def _cnn_hint(state: dict[str, torch.Tensor]) -> str:
    """The ``cnn`` spec that loads ``state`` but for the input's height and width, as a hint; "" when none does."""
    state = _unprefixed(state)
    convs = _numbered(state, "conv")
    if not convs or "out.weight" not in state or any(w.ndim != 4 for w in convs):
        return ""
    known: dict[str, Any] = {
        "type": "cnn",
        "channels": [int(w.shape[0]) for w in convs],
        "kernel_size": int(convs[0].shape[-1]),
        "batchnorm": "bn1.weight" in state,
        "hidden": int(state["fc1.weight"].shape[0]) if "fc1.weight" in state else 0,
        "n_classes": int(state["out.weight"].shape[0]),
    }
    in_channels = int(convs[0].shape[1])
    if not _loads_exactly({**known, "input_shape": [in_channels, 1, 1]}, state):
        return ""
    return (f"it looks like {json.dumps(known)} plus \"input_shape\": [{in_channels}, height, width], "
            f"with the height and width of the input images, which the weights do not record")


def _checked_values(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """``state`` in the dtypes of ``expected``; refused where a floating weight is stored as integers or booleans (which
    are no weights of a float model), holds NaN or infinity, or holds values too large for the dtype it is computed in."""
    converted = {}
    for key, value in state.items():
        target = expected[key].dtype
        if target.is_floating_point:
            if not value.is_floating_point():
                raise ArchitectureError(
                    f"'{label}' stores '{key}' as {str(value.dtype).removeprefix('torch.')}, but the spec's layer takes "
                    "floating-point weights there; save the model's own float weights (model.state_dict())."
                )
            if not bool(torch.isfinite(value).all()):
                raise CorruptFileError(
                    f"'{label}' holds NaN or infinite values in '{key}', so the model would compute nothing meaningful; "
                    "save weights from a model that trained without diverging."
                )
            cast = value.to(target)
            if not bool(torch.isfinite(cast).all()):
                raise CorruptFileError(
                    f"'{label}' holds values in '{key}' too large for {str(target).removeprefix('torch.')} (they would become "
                    f"infinite); check the weights, or save them in {str(target).removeprefix('torch.')}'s range."
                )
            converted[key] = cast
        else:
            converted[key] = value.to(target)
    return converted


def _from_state_dict(state: dict[str, torch.Tensor], label: str, name: str, spec: dict[str, Any] | None,
                     source_format: str, metadata: dict[str, str]) -> LoadedModel:
    if spec is None:
        guess = infer_architecture(state)
        where = "(the app's spec box, architecture= in Python, --architecture on the command line)"
        example = (f"it looks like {json.dumps(guess)} (check the activation)" if guess else
                   _cnn_hint(state) or 'such as {"type": "mlp", "sizes": [...], "activation": "relu"}')
        raise MissingArchitectureError(
            f"'{label}' holds weights but no architecture spec; pass one {where}: {example}.", suggested=guess)
    expected = _meta_state(spec)
    state = _strip_prefix(state, set(expected))
    parts = _mismatches(expected, state)
    if parts:
        advice = "Check the spec's sizes."
        if _renamed(expected, state):
            layers = list(dict.fromkeys(k.rpartition(".")[0] for k in expected if "." in k))
            advice = (f"The file holds tensors of the spec's shapes under other names: save them under the spec's names "
                      f"(its layers are {', '.join(layers[:8])}{' …' if len(layers) > 8 else ''}) and load the file again.")
        raise ArchitectureError(
            f"The weights in '{label}' do not match the '{spec['type']}' architecture spec: {'; '.join(parts)}. {advice}"
        )
    stored = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    state = _checked_values(state, expected, label)
    module = build_model(spec)  # as large as the weights in the file, whose shapes it matches
    module.load_state_dict(state)
    if stored and stored != ["float32"]:  # computed in float32 like the rest: say so where the file held other precisions
        metadata = {**metadata, "stored_dtype": ", ".join(stored)}
    return wrap_module(module, name=name, architecture=spec, source_format=source_format, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# zip archives: torch.save checkpoints, TorchScript, torch.export, Hugging Face folders


def _zip_members(data: bytes, label: str, max_bytes: int) -> list[zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptFileError(f"'{label}' is a damaged zip archive ({exc}); re-create it.") from exc
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeFileError(f"'{label}' holds {len(infos)} files, more than the {MAX_ARCHIVE_MEMBERS} allowed; it was not unpacked.")
    total = 0
    for info in infos:
        p = PurePosixPath(info.filename.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", info.filename):
            raise UnsafeFileError(f"'{label}' contains the path '{info.filename}', which points outside the archive; it was not unpacked.")
        total += info.file_size
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO and info.file_size > MIN_BOMB_BYTES:
            raise UnsafeFileError(
                f"'{label}' member '{info.filename}' expands {info.file_size // max(info.compress_size, 1)}x, like a zip bomb; it was not unpacked."
            )
    if total > MIN_BOMB_BYTES and total > MAX_COMPRESSION_RATIO * len(data):
        raise UnsafeFileError(
            f"'{label}' expands {total // len(data)}x in all ({total / 2**20:.0f} MiB from {len(data) / 2**10:.0f} KiB), "
            "like a zip bomb; it was not unpacked."
        )
    if total > max_bytes:
        raise FileTooLargeError(f"'{label}' would unpack to {total / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; it was not unpacked.")
    return infos


def _classify_zip(data: bytes, label: str, max_bytes: int) -> str:
    names = [i.filename.replace("\\", "/") for i in _zip_members(data, label, max_bytes)]
    base = {PurePosixPath(n).name for n in names}
    if "config.json" in base and not any(n.endswith("data.pkl") for n in names):
        return "huggingface"
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") or n.endswith("archive_format") for n in names):
        return "torch.export"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch.save"
    return "unknown"


def _safe_extract(data: bytes, label: str, dest: Path, max_bytes: int) -> Path:
    """Extract after checking members; return the folder holding config.json."""
    files = [(i, PurePosixPath(i.filename.replace("\\", "/"))) for i in _zip_members(data, label, max_bytes) if not i.is_dir()]
    names = sorted(str(p) for _, p in files)
    twice = next((a for a, b in zip(names, names[1:]) if a == b), None)
    if twice is not None:
        raise UnsafeFileError(f"'{label}' holds two members named {twice[:80]!r}, so which one is the model is ambiguous; "
                              "it was not unpacked: zip the model folder again.")
    for info, p in files:
        below = names[min(bisect.bisect_left(names, f"{p}/"), len(names) - 1)]  # the first name that may lie inside p
        odd = ("it contains a NUL character" if "\0" in info.orig_filename else "it has no file name" if not p.parts
               else f"a part of it is longer than {MAX_MEMBER_NAME} bytes" if any(len(part.encode()) > MAX_MEMBER_NAME for part in p.parts)
               else f"it is longer than {MAX_MEMBER_PATH} bytes" if len(str(p).encode()) > MAX_MEMBER_PATH
               else "it is also the name of a folder" if below.startswith(f"{p}/") else None)
        if odd is not None:
            raise UnsafeFileError(f"'{label}' has a member {info.orig_filename[:80]!r} that cannot be unpacked as a file ({odd}); "
                                  "it was not unpacked: zip the model folder again.")
    written = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info, p in files:
                target = dest / p
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise FileTooLargeError(f"'{label}' unpacks to more than its declared size and the {max_bytes / 2**20:.0f} MiB limit; it was not unpacked.")
                        out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
        raise CorruptFileError(f"'{label}' could not be unpacked ({type(exc).__name__}: {_first_line(exc)}); re-create the zip.") from exc
    configs = sorted(dest.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not configs:
        raise UnsupportedFormatError(f"'{label}' has no config.json, so it is not a Hugging Face model folder.")
    if len(configs) > 1:
        first, second = (str(c.parent.relative_to(dest)) if c.parent != dest else "(top level)"
                         for c in configs[:2])
        raise UnsupportedFormatError(f"'{label}' holds more than one model folder with a config.json ('{first}' and '{second}'), "
                                     "so which to load is ambiguous; zip one model folder at a time.")
    return configs[0].parent


def _load_code_archive(data: bytes, label: str, name: str, kind: str, spec: dict[str, Any] | None, trust: bool,
                       isolate: bool) -> LoadedModel:
    if not trust:
        raise UnsafeFileError(
            f"'{label}' is a {kind} archive, which runs code from the file when loaded; it was not loaded. "
            f"Load it only if you made it yourself, from Python with load_model(path, trust_remote_code=True) (the app does "
            f"not open such archives), or {CONVERT_HINT}."
        )
    if isolate:
        raise UnsafeFileError(
            f"'{label}' is a {kind} archive, whose code would run in this process; it is not opened here. "
            f"Load it from Python with load_model(path, trust_remote_code=True), or {CONVERT_HINT}."
        )
    try:
        if kind == "torchscript":
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        else:
            module = torch.export.load(io.BytesIO(data)).module()
    except Exception as exc:
        raise CorruptFileError(f"'{label}' could not be loaded as a {kind} archive ({type(exc).__name__}: {_first_line(exc)}).") from exc
    return wrap_module(module, name=name, architecture=spec, source_format=f"{kind} (trusted)")


def _check_weight_indexes(folder: Path, label: str) -> None:
    """A sharded checkpoint's index (``*.index.json``) names the files its weights are read from: each must be a
    ``.safetensors`` file inside the folder, or the index would read files elsewhere on the machine, or pickles."""
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = {str(v) for v in weight_map.values()}
        except (ValueError, AttributeError, RecursionError) as exc:
            raise CorruptFileError(f"'{index.name}' in '{label}' is not a readable weight index ({exc}).") from exc
        for shard in sorted(shards):
            inside = PurePosixPath(shard).name == shard and "\\" not in shard and shard not in ("", ".", "..")
            if not (inside and shard.endswith(".safetensors") and (folder / shard).is_file()):
                raise UnsafeFileError(
                    f"'{index.name}' in '{label}' reads weights from '{shard}', which is not a .safetensors "
                    "file in the model folder; save the model with model.save_pretrained(path, safe_serialization=True)."
                )


_LAYER_KEYS = re.compile(r"(?:num_|n_)?(?:hidden_|encoder_|decoder_)?layers?")  # num_hidden_layers, n_layer, decoder_layers...


def _read_config(folder: Path, label: str) -> dict[str, Any]:
    """``config.json`` as a dict, read with bounded size and nesting; a quantized model is refused (it needs other libraries)."""
    path = folder / "config.json"
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise FileTooLargeError(f"The config.json of '{label}' is {size / 2**20:.0f} MiB, above the {MAX_CONFIG_BYTES >> 20} MiB "
                                "a model config may have; check the file.")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"The config.json of '{label}' is not readable JSON ({type(exc).__name__}: {_first_line(exc)}); "
                               "save the model again with model.save_pretrained(path).") from exc
    if not isinstance(config, dict):
        raise CorruptFileError(f"The config.json of '{label}' holds a {type(config).__name__}, not a JSON object; save the model again with model.save_pretrained(path).")
    if config.get("quantization_config") is not None:
        raise UnsupportedFormatError(f"'{label}' holds a quantized model ('quantization_config' in its config.json), which is not "
                                     "loaded here; save it unquantized with model.save_pretrained(path, safe_serialization=True).")
    return config


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _weight_files(folder: Path, label: str) -> list[Path] | None:
    """The .safetensors files transformers reads the weights from: ``model.safetensors``, else the shards that
    ``model.safetensors.index.json`` names (checked by :func:`_check_weight_indexes`); None when there are neither.
    Other .safetensors files in the folder are never read, so they are not counted as weights."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({str(v) for v in weight_map.values()})
    except (ValueError, AttributeError, RecursionError) as exc:
        raise CorruptFileError(f"'{index.name}' in '{label}' is not a readable weight index ({exc}).") from exc
    return [folder / shard for shard in shards]


def _safetensors_extent(files: list[Path], label: str) -> tuple[int, int, int]:
    """How many tensors, values and bytes the given .safetensors files hold, read from their headers alone."""
    from safetensors import SafetensorError, safe_open

    n_tensors = n_values = n_bytes = 0
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    values = math.prod(piece.get_shape())
                    n_tensors += 1
                    n_values += values
                    n_bytes += values * _DTYPE_BYTES.get(str(piece.get_dtype()).upper(), 1)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CorruptFileError(f"'{path.name}' in '{label}' is a damaged safetensors file ({_first_line(exc)}); save the model again.") from exc
    return n_tensors, n_values, n_bytes


_SIZE_KEYS = re.compile(r"vocab_size|hidden_size|intermediate_size|embedding_size|image_size|patch_size|num_channels|"
                        r"(?:num_|n_)(?:attention_|key_value_)?heads?|(?:encoder_|decoder_)attention_heads|num_key_value_heads|"
                        r"n_embd|n_positions|n_ctx|d_model|d_ff|d_kv|dim|hidden_dim|max_position_embeddings|"
                        r"(?:encoder_|decoder_)ffn_dim")  # a model of none of these is not built
_COUNT_KEYS = re.compile(r"num_\w+|n_\w+|\w+_size|\w+_dim")  # counts and sizes: never negative


def _check_config_values(config: dict[str, Any], label: str) -> None:
    """Before the config is parsed by transformers: a size that is not a whole number, a size of 0 or less (a width,
    a vocabulary, a head count), or a negative count (of layers: ``-1`` builds none, silently) is refused."""
    stack = [config]
    while stack:
        for key, value in stack.pop().items():
            if isinstance(value, dict):
                stack.append(value)
                continue
            size, count = _SIZE_KEYS.fullmatch(key), _COUNT_KEYS.fullmatch(key) or _LAYER_KEYS.fullmatch(key)
            if size and value is not None and not (isinstance(value, int) and not isinstance(value, bool)) and not (
                    key in ("image_size", "patch_size") and isinstance(value, list)):
                raise ArchitectureError(f"The config.json of '{label}' sets '{key}' to {str(json.dumps(value))[:40]}, but it must be "
                                        "a whole number; fix the config.")
            if isinstance(value, int) and not isinstance(value, bool) and (value <= 0 if size else value < 0 if count else False):
                raise ArchitectureError(f"The config.json of '{label}' sets '{key}' to {value:,}, but it must be "
                                        f"{'positive' if size else 'zero or more'}; fix the config.")


def _check_config_sizes(config: dict[str, Any], label: str, n_tensors: int, n_values: int) -> None:
    """Before the config is parsed by transformers: a layer count (num_hidden_layers, n_layer, ...) above the tensors present
    (every layer has weights) or above ``MAX_CONFIG_LAYERS``, or a label count above the values present, would build (or hang
    building) a model the weights cannot fill."""
    stack = [config]
    while stack:
        for key, value in stack.pop().items():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                limit = MAX_CONFIG_LAYERS if _LAYER_KEYS.fullmatch(key) else n_values if key == "num_labels" else None
                if limit is not None and value > limit:
                    raise ArchitectureError(
                        f"The config.json of '{label}' sets '{key}' to {value:,}, more than the {limit:,} "
                        + ("layers a model may have here" if key != "num_labels" else f"values its weights hold ({n_tensors:,} tensors)")
                        + "; check the config."
                    )


def _check_model_type(transformers: Any, config: dict[str, Any], label: str, trust_remote_code: bool) -> None:
    """A config whose ``model_type`` transformers does not know: remote code (``auto_map``) is refused as code unless
    trusted; anything else is named in one sentence."""
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    if known or trust_remote_code:
        return
    if model_type is None and not config.get("auto_map"):
        raise UnsupportedFormatError(
            f"The config.json of '{label}' has no 'model_type', so transformers cannot tell which model it describes; "
            "add the type that saved the model (e.g. \"model_type\": \"bert\"), or save it again with model.save_pretrained(path)."
        )
    if config.get("auto_map"):
        raise UnsafeFileError(
            f"'{label}' needs its own Python code to be built (its config.json has 'auto_map' and model_type "
            f"{str(model_type)[:40]!r}, which transformers does not ship), and that code would run when loaded; it was not loaded. "
            "Load it only if you trust it, from Python with load_model(path, trust_remote_code=True), "
            "or save its weights with safetensors under an architecture transformers ships."
        )
    raise UnsupportedFormatError(
        f"The config.json of '{label}' sets 'model_type' to {str(model_type)[:40]!r}, which the installed transformers "
        f"{transformers.__version__} does not know; set it to the type that saved the model (e.g. \"bert\"), or upgrade transformers."
    )


def _amount(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes >= 1 << 20 else f"{n_bytes / 2**10:,.1f} KiB"


def _folder_listing(folder: Path) -> str:
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "") if names else "nothing else"


def _check_loading_info(info: dict[str, Any], label: str) -> None:
    """Refuse a load in which transformers left weights of the model unfilled (initialised at random), stored weights
    unused, or a weight of another shape; what transformers itself expects to be absent (tied weights, keys its model
    classes ignore) is not in ``info``."""
    def few(keys: Any) -> str:
        keys = sorted(str(k) for k in keys)
        return ", ".join(keys[:4]) + (f" … ({len(keys) - 4} more)" if len(keys) > 4 else "")

    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, wanted = mismatched[0][:3]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ArchitectureError(
            f"The weights in '{label}' do not fit its config.json: '{key}' is stored with shape {tuple(stored)} but the config "
            f"makes {tuple(wanted)}{more}; fix the sizes in the config (e.g. vocab_size, hidden_size) to those of the weights."
        )
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    if missing or unexpected:
        parts = ([f"{len(missing)} weights of the model are not in the files ({few(missing)})"] if missing else []) + (
            [f"{len(unexpected)} stored weights have no place in it ({few(unexpected)})"] if unexpected else [])
        raise ArchitectureError(
            f"The weights in '{label}' do not match the model its config.json describes: {'; '.join(parts)}; "
            "fix the config (architectures, layer counts) or save the model again with model.save_pretrained(path)."
        )


def _model_class(transformers: Any, config: Any, label: str) -> Any:
    """The transformers model class the config's ``architectures`` names (AutoModel when it names none that transformers has)."""
    arch_names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, str(arch_names[0]), None) if isinstance(arch_names, list) and arch_names else None
    if cls is None:
        return transformers.AutoModel
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and cls is not transformers.PreTrainedModel):
        raise ArchitectureError(f"The config.json of '{label}' names {str(arch_names[0])[:80]!r} in 'architectures', which is not a "
                                "transformers model class; set it to the class that saved the model, e.g. [\"BertModel\"].")
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise ArchitectureError(
            f"The config.json of '{label}' names {cls.__name__!r} in 'architectures', which is built from a {config_class.__name__}, "
            f"but its model_type {getattr(config, 'model_type', '')!r} makes a {type(config).__name__}; set 'architectures' to the "
            "class that saved the model, or 'model_type' to its type."
        )
    return cls


def _load_hf_folder(folder: Path, *, name: str, trust_remote_code: bool, isolate: bool = False, label: str | None = None) -> LoadedModel:
    label = label or folder.name
    if not (folder / "config.json").exists():
        raise UnsupportedFormatError(f"Folder '{label}' has no config.json, so it is not a Hugging Face model folder.")
    if not (trust_remote_code and not isolate):
        _check_weight_indexes(folder, label)
    weight_files = _weight_files(folder, label)
    has_safetensors = weight_files is not None
    if not has_safetensors and not any((folder / n).is_file() for n in _PICKLED_WEIGHTS):
        raise CorruptFileError(
            f"'{label}' has no weights file: transformers reads model.safetensors (or model.safetensors.index.json and "
            f"its shards), and the folder holds {_folder_listing(folder)}; save the model with model.save_pretrained(path)."
        )
    if isolate and trust_remote_code and not has_safetensors:
        raise UnsafeFileError(
            f"Folder '{label}' has only pickled weights, which would be unpickled in this process; save the model with "
            "model.save_pretrained(path, safe_serialization=True), or load it from Python with trust_remote_code=True."
        )
    trust_remote_code = trust_remote_code and not isolate  # no repository code in this process
    if not has_safetensors and not trust_remote_code:
        raise UnsafeFileError(
            f"Folder '{label}' has no .safetensors weights, and pickled weights can run code; "
            "save the model with model.save_pretrained(path, safe_serialization=True), or load it from Python with "
            "trust_remote_code=True."
        )
    config_dict = _read_config(folder, label)
    _check_config_values(config_dict, label)
    stored_bytes = None
    if weight_files is not None:
        n_tensors, n_values, stored_bytes = _safetensors_extent(weight_files, label)
        _check_config_sizes(config_dict, label, n_tensors, n_values)
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedFormatError(
            "Hugging Face model folders need the optional 'transformers' package: pip install 'representation-workbench[hf]'."
        ) from exc
    _check_model_type(transformers, config_dict, label, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        cls = _model_class(transformers, config, label)
        if stored_bytes is not None:  # count what the config builds on the meta device: nothing is allocated
            with torch.device("meta"):
                skeleton = (transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
                            if cls is transformers.AutoModel else cls(config))
            saved = skeleton.state_dict(keep_vars=True)  # parameters and persistent buffers: what a save holds
            unique = {id(t): t for t in saved.values()}.values()
            n_weights = sum(t.numel() for t in unique)
            model_bytes = sum(t.numel() * t.element_size() for t in unique)
            scratch = sum(b.numel() * b.element_size() for n, b in skeleton.named_buffers() if n not in saved)
            if scratch > MAX_MODEL_BYTES:
                raise ArchitectureError(f"The config.json of '{label}' describes {scratch / 2**20:,.0f} MiB of buffers that are "
                                        "computed, not stored, above what a model may have here; check the config.")
            if model_bytes > 2 * stored_bytes + (1 << 20):  # float32 here; weights stored in 16 bits take half
                raise ArchitectureError(
                    f"The config.json of '{label}' describes a model of {n_weights:,} weights ({_amount(model_bytes)}), but "
                    f"the weights transformers reads ({', '.join(p.name for p in weight_files[:3])}"
                    f"{' …' if len(weight_files) > 3 else ''}) hold only {_amount(stored_bytes)}; the config does not fit the "
                    "weights: save the model again with model.save_pretrained(path)."
                )
        hf_logging = transformers.utils.logging
        bar_was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()  # a loading bar for a small local folder is noise in the CLI and the server log
        hf_logging.set_verbosity_error()  # so is transformers' own load report: _check_loading_info says what matters
        try:
            module, info = cls.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code,
                                               use_safetensors=has_safetensors, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar_was_on:
                hf_logging.enable_progress_bar()
        _check_loading_info(info, label)
    except WorkbenchError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ZeroDivisionError) as exc:
        reason = _first_line(exc).replace(str(folder), f"'{label}'")
        raise CorruptFileError(f"The Hugging Face model in '{label}' could not be loaded ({reason}); check its config.json "
                               "and save the model again with model.save_pretrained(path).") from exc
    loaded = wrap_module(module, name=name, architecture=None, source_format="huggingface",
                         metadata={"model_type": str(getattr(config, "model_type", ""))})
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None) or 224
    if isinstance(channels, int) and not getattr(config, "vocab_size", None):  # a vision model: images, not tokens
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        return dataclasses.replace(loaded, input_shape=(channels, size, size), input_dtype=torch.float32)
    positions = getattr(config, "max_position_embeddings", None)
    seq = int(min(positions or 16, 16))  # a probe batch's length, not a limit: the model takes any length up to positions
    metadata = {**loaded.metadata, "max_positions": int(positions)} if isinstance(positions, int) else loaded.metadata
    return dataclasses.replace(loaded, input_shape=(seq,), input_dtype=torch.int64, metadata=metadata)
