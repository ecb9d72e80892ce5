"""Upload payloads built in memory: the bytes a user's ``np.savez`` or ``torch.save`` would write."""

from __future__ import annotations

import io

import numpy as np
import torch


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def pt_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
