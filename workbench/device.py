"""Device choice, dtype policy and seeding.

Computations accept ``device=None`` (auto: cuda, then mps, then cpu). Accumulations that lose
accuracy in float32 (Gram matrices, HSIC, eigen-decompositions) run in float64; on MPS, which has
no float64, they fall back to the CPU.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from workbench.errors import ParameterError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the given one, or cuda > mps > cpu when ``None``."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError(
            f"The 'device' parameter must be 'cpu', 'cuda', 'cuda:N', 'mps' or None. Got {device!r}."
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(
            f"Device {device!r} was requested but CUDA is not available here; use 'cpu', or no device (None, or no --device) to pick the best available."
        )
    return resolved


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's weights are on (its first parameter or buffer; the CPU for a module with neither)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def rows_on(source: torch.Tensor, start: int, stop: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of ``source`` on ``device`` (floating rows cast to ``dtype`` when given), in memory of
    their own: a model whose first operation is in place (``nn.ReLU(inplace=True)``) must not change the
    dataset the rows came from, whose hash keys every cache."""
    rows = source[start:stop].to(device)
    if dtype is not None and rows.is_floating_point():
        rows = rows.to(dtype)
    return own_memory(rows, source)


def own_memory(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it shares memory with ``source`` (a view of it, or ``source`` itself)."""
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


def float64_device(device: torch.device) -> torch.device:
    """The device for float64 work: ``device`` itself, or the CPU where float64 is unsupported (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


_TF32_LOCK = threading.Lock()
_tf32_users = 0
_tf32_saved: tuple[bool, bool] = (False, False)


@contextmanager
def full_float32() -> Iterator[None]:
    """Run float32 convolutions and matrix products in full float32 on CUDA for the duration.

    PyTorch lets cuDNN convolutions use TF32 by default, which rounds their inputs to 10 mantissa
    bits: a conv layer's activations then differ from the CPU's by about 1e-3 relative. Activations
    and losses that are compared across devices are computed without it. The switches are global:
    the first of overlapping users (threads) turns TF32 off and the last one restores the settings.
    """
    global _tf32_users, _tf32_saved
    with _TF32_LOCK:
        if _tf32_users == 0:
            _tf32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        _tf32_users += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32_users -= 1
            if _tf32_users == 0:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _tf32_saved
