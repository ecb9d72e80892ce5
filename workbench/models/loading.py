"""Loading checkpoints safely.

Uploads are untrusted. Without a switch the loader reads only formats that cannot run code:
safetensors, state dicts through ``torch.load(..., weights_only=True)``, and Hugging Face model
folders (or zips of one) whose weights are safetensors. Full pickles, TorchScript and
``torch.export`` archives run code when loaded: they are refused unless ``trust_remote_code=True``,
and with ``isolate=True`` as well (the app) a trusted full pickle is opened in a separate process
that hands back only weights and stock layers (:mod:`workbench.models.isolated`).
Zip archives are checked for path traversal and decompression bombs before anything is extracted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import struct
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterator
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
    UnsafeFileError,
    UnsupportedFormatError,
)
from workbench.models.architectures import build_model, input_spec, parse_spec

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".zip")
MAX_MODEL_BYTES = 2 << 30
MAX_ARCHIVE_MEMBERS = 10_000
MAX_COMPRESSION_RATIO = 200
MAX_SAFETENSORS_HEADER = 100 << 20
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
    :attr:`content_sha256` adds the module tree (each module's path, class and settings): the same
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


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the sorted state dict: names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def structure_sha256(module: nn.Module) -> str:
    """sha256 of the module tree: every module's path, class (module and qualified name) and settings
    (``extra_repr``: sizes, strides, ``inplace``, eps...). Two models with equal weights and equal
    structure compute the same outputs unless a custom ``forward`` differs in code of the same name."""
    h = hashlib.sha256()
    for name, m in module.named_modules():
        cls = type(m)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{m.extra_repr()}\n".encode())
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


def _weights_fingerprint(module: nn.Module) -> tuple:
    """Where each parameter and buffer lives and how often it was modified in place: equal fingerprints mean
    unchanged weights (torch bumps a tensor's version on every in-place update)."""
    return tuple((t.data_ptr(), t._version, t.shape, t.dtype) for t in (*module.parameters(), *module.buffers()))


def current_weights_sha256(module: nn.Module) -> str:
    """:func:`weights_sha256` of ``module`` now, recomputed only when its fingerprint changed since the last call."""
    fingerprint = _weights_fingerprint(module)
    cached = _WEIGHT_HASHES.get(module)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    sha = weights_sha256(module)
    _WEIGHT_HASHES[module] = (fingerprint, sha)
    return sha


def wrap_module(module: nn.Module, *, name: str = "model", architecture: dict[str, Any] | None = None,
                source_format: str = "module", metadata: dict[str, str] | None = None) -> LoadedModel:
    """Describe an in-memory module as a :class:`LoadedModel` (puts it in eval mode)."""
    module.eval()
    return _describe(module, name=name, architecture=architecture, source_format=source_format, metadata=metadata)


def _describe(module: nn.Module, *, name: str, architecture: dict[str, Any] | None = None, source_format: str = "module",
              metadata: dict[str, str] | None = None) -> LoadedModel:
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
    """
    loaded = _load(source, architecture, trust_remote_code, isolate, name, filename, max_bytes)
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
                return _load_hf_folder(root, name=display, trust_remote_code=trust_remote_code, isolate=isolate)
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
        raise CorruptFileError(f"'{label}' declares a {header_len}-byte safetensors header, far above any real model's; the file is corrupt or hostile.")
    if 8 + header_len > len(data):
        raise CorruptFileError(f"'{label}' is truncated: its safetensors header needs {header_len} bytes but the file has {len(data) - 8}.")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"'{label}' has a damaged safetensors header ({type(exc).__name__}); upload an intact copy.") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"'{label}' has a damaged safetensors header (not a JSON object).")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _load_safetensors(data: bytes, label: str, name: str, spec: dict[str, Any] | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    metadata = safetensors_metadata(data, label)
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptFileError(f"'{label}' is a damaged safetensors file ({exc}); upload an intact copy.") from exc
    if spec is None and "architecture" in metadata:
        spec = parse_spec(metadata["architecture"])
    return _from_state_dict(state, label, name, spec, "safetensors", metadata)


# ---------------------------------------------------------------------------------------------
# state dicts and pickles


def _load_torch_pickle(data: bytes, label: str, name: str, spec: dict[str, Any] | None, trust: bool,
                       isolate: bool) -> LoadedModel:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc) or _scan_globals(data)
        if reason is None:
            raise CorruptFileError(f"'{label}' is not a readable PyTorch checkpoint (damaged pickle data); upload an intact copy.") from exc
        if not trust:
            raise UnsafeFileError(
                f"'{label}' is a full pickle whose loading can run arbitrary code (it references {reason}); it was not loaded. "
                f"Load it only if you made it yourself (in the app tick 'I trust this file', in Python pass trust_remote_code=True), "
                f"or {CONVERT_HINT}."
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
    return _from_state_dict(state, label, name, spec, "state dict", {})


def _open_isolated(data: bytes, label: str, name: str, spec: dict[str, Any] | None) -> LoadedModel:
    from workbench.models.isolated import ChildFailed, ChildRefused, open_in_subprocess

    try:
        weights = open_in_subprocess(data, label)
    except ChildRefused as exc:
        raise UnsafeFileError(
            f"'{label}' was opened in a separate process, but {str(exc).rstrip('.')}; only weights and stock torch.nn layers come back from it. "
            f"Load it from Python with load_model(path, trust_remote_code=True), or {CONVERT_HINT}."
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
        f"'{label}' holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict() (or a dict with a 'state_dict' entry)."
    )


_COMMON_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _COMMON_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if set(stripped) & expected:
                return stripped
    return state


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a wrapper prefix (``module.``, ``model.``...) that every key shares."""
    for prefix in _COMMON_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _loads_exactly(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """Whether the module ``spec`` builds takes ``state`` with no key missing, extra or of another shape."""
    try:
        build_model(spec).load_state_dict(state, strict=True)
    except (ArchitectureError, RuntimeError):
        return False
    return True


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
    return (f" It looks like {json.dumps(known)} plus \"input_shape\": [{in_channels}, height, width], "
            f"with the height and width of the input images, which the weights do not record.")


def _from_state_dict(state: dict[str, torch.Tensor], label: str, name: str, spec: dict[str, Any] | None,
                     source_format: str, metadata: dict[str, str]) -> LoadedModel:
    if spec is None:
        guess = infer_architecture(state)
        hint = f" It looks like {json.dumps(guess)} (check the activation)." if guess else _cnn_hint(state)
        raise ArchitectureError(
            f"'{label}' holds weights but no architecture spec; pass one (the app's spec box, architecture= in Python, "
            f"--architecture on the command line), e.g. {{\"type\": \"mlp\", \"sizes\": [...], \"activation\": \"relu\"}}.{hint}"
        )
    module = build_model(spec)
    expected = module.state_dict()
    state = _strip_prefix(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shape {', '.join(wrong[:4])} (file vs spec)")
        raise ArchitectureError(
            f"The weights in '{label}' do not match the '{spec['type']}' architecture spec: {'; '.join(parts)}. Check the spec's sizes."
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
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
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO and info.file_size > 1 << 20:
            raise UnsafeFileError(
                f"'{label}' member '{info.filename}' expands {info.file_size // max(info.compress_size, 1)}x, like a zip bomb; it was not unpacked."
            )
    if total > max_bytes:
        raise FileTooLargeError(f"'{label}' would unpack to {total / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; it was not unpacked.")
    return infos


def _classify_zip(data: bytes, label: str, max_bytes: int) -> str:
    names = [i.filename for i in _zip_members(data, label, max_bytes)]
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
    infos = _zip_members(data, label, max_bytes)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        written = 0
        for info in infos:
            if info.is_dir():
                continue
            target = dest / PurePosixPath(info.filename.replace("\\", "/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise FileTooLargeError(f"'{label}' unpacks to more than its declared size and the {max_bytes / 2**20:.0f} MiB limit; it was not unpacked.")
                    out.write(chunk)
    configs = sorted(dest.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise UnsupportedFormatError(f"'{label}' has no config.json, so it is not a Hugging Face model folder.")
    return configs[0].parent


def _load_code_archive(data: bytes, label: str, name: str, kind: str, spec: dict[str, Any] | None, trust: bool,
                       isolate: bool) -> LoadedModel:
    if not trust:
        raise UnsafeFileError(
            f"'{label}' is a {kind} archive, which runs code from the file when loaded; it was not loaded. "
            f"Load it only if you made it yourself (in the app tick 'I trust this file', in Python pass trust_remote_code=True), "
                f"or {CONVERT_HINT}."
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


def _check_weight_indexes(folder: Path) -> None:
    """A sharded checkpoint's index (``*.index.json``) names the files its weights are read from: each must be a
    ``.safetensors`` file inside the folder, or the index would read files elsewhere on the machine, or pickles."""
    for index in folder.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = {str(v) for v in weight_map.values()}
        except (ValueError, AttributeError, RecursionError) as exc:
            raise CorruptFileError(f"'{index.name}' in folder '{folder.name}' is not a readable weight index ({exc}).") from exc
        for shard in sorted(shards):
            inside = PurePosixPath(shard).name == shard and "\\" not in shard and shard not in ("", ".", "..")
            if not (inside and shard.endswith(".safetensors") and (folder / shard).is_file()):
                raise UnsafeFileError(
                    f"'{index.name}' in folder '{folder.name}' reads weights from '{shard}', which is not a .safetensors "
                    "file in the folder; save the model with model.save_pretrained(path, safe_serialization=True)."
                )


def _load_hf_folder(folder: Path, *, name: str, trust_remote_code: bool, isolate: bool = False) -> LoadedModel:
    if not (folder / "config.json").exists():
        raise UnsupportedFormatError(f"Folder '{folder.name}' has no config.json, so it is not a Hugging Face model folder.")
    has_safetensors = any(folder.glob("*.safetensors"))
    if isolate and trust_remote_code and not has_safetensors:
        raise UnsafeFileError(
            f"Folder '{folder.name}' has only pickled weights, which would be unpickled in this process; save the model with "
            "model.save_pretrained(path, safe_serialization=True), or load it from Python with trust_remote_code=True."
        )
    trust_remote_code = trust_remote_code and not isolate  # no repository code in this process
    if not trust_remote_code:
        _check_weight_indexes(folder)
    if not has_safetensors and not trust_remote_code:
        raise UnsafeFileError(
            f"Folder '{folder.name}' has no .safetensors weights, and pickled weights can run code; "
            "save the model with model.save_pretrained(path, safe_serialization=True), or load it from Python with "
            "trust_remote_code=True."
        )
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedFormatError(
            "Hugging Face model folders need the optional 'transformers' package: pip install 'representation-workbench[hf]'."
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        arch_names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, arch_names[0], None) if arch_names else None
        cls = cls if cls is not None else transformers.AutoModel
        hf_logging = transformers.utils.logging
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a loading bar for a small local folder is noise in the CLI and the server log
        try:
            module = cls.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code,
                                         use_safetensors=has_safetensors)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CorruptFileError(f"The Hugging Face model in '{folder.name}' could not be loaded ({_first_line(exc)}).") from exc
    loaded = wrap_module(module, name=name, architecture=None, source_format="huggingface",
                         metadata={"model_type": str(getattr(config, "model_type", ""))})
    seq = int(min(getattr(config, "max_position_embeddings", 16) or 16, 16))
    return dataclasses.replace(loaded, input_shape=(seq,), input_dtype=torch.int64)


