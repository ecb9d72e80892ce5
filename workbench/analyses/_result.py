"""Common behaviour of analysis results.

Each analysis returns a frozen dataclass deriving from :class:`Result`. Results hold numpy arrays
on the CPU and record how they were made (``estimator``, ``n_samples``, ``params``, ``seed``,
``device``, ``dtype``, ``seconds``). ``to_dict()`` is JSON-safe; ``arrays()`` returns the numeric
arrays for an ``.npz`` export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def _jsonable(value: Any, refs: dict[int, str] | None = None) -> Any:
    """``value`` as JSON-safe data. ``refs`` maps ``id(array)`` to a name: each of those arrays becomes a reference
    ``{"npz": name, "shape": [...], "dtype": ...}`` instead of being written out."""
    if refs and isinstance(value, np.ndarray) and id(value) in refs:
        return {"npz": refs[id(value)], "shape": list(value.shape), "dtype": str(value.dtype)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), refs) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
        return value.tolist()
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, refs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, refs) for v in value]
    if hasattr(value, "tolist"):  # torch tensors
        return _jsonable(np.asarray(value.tolist()))
    return value


_REPR_ITEMS = 12  # items of a long list or dict shown by repr
_REPR_ARRAY = 8  # arrays up to this size are shown in full by repr


def _short(value: Any) -> str:
    """A one-line description of a field for ``repr``: arrays by shape and dtype, long containers cut."""
    if isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "tolist")):
        shape = tuple(value.shape)
        if int(np.prod(shape)) <= _REPR_ARRAY:
            return _short(np.asarray(value).tolist())
        return f"<array {shape} {str(value.dtype).removeprefix('torch.')}>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # nested results: their own repr shows them
        return f"{type(value).__name__}(...)"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        items = [f"{k!r}: {_short(v)}" for k, v in list(value.items())[:_REPR_ITEMS]]
        more = f", ... ({len(value)} entries)" if len(value) > _REPR_ITEMS else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(value, (list, tuple)):
        items = [_short(v) for v in value[:_REPR_ITEMS]]
        more = f", ... ({len(value)} items)" if len(value) > _REPR_ITEMS else ""
        body = ", ".join(items) + more
        return f"[{body}]" if isinstance(value, list) else f"({body}{',' if len(value) == 1 else ''})"
    return repr(value)


class Result:
    """Mixin for frozen result dataclasses: JSON export and array export.

    ``repr`` is one line per result that shows arrays by shape and dtype (``to_dict()`` and
    ``arrays()`` give the numbers)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__repr__ = Result.__repr__  # type: ignore[method-assign]  # in the class itself, so @dataclass keeps it

    def __repr__(self) -> str:
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()  # type: ignore[arg-type]
        body = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in fields if f.repr)
        return f"{type(self).__name__}({body})"

    def to_dict(self, *, inline_max: int | None = None, npz_prefix: str = "") -> dict[str, Any]:
        """A JSON-safe dict of every field (arrays as nested lists, non-finite floats as strings).

        ``inline_max``: numeric arrays of more entries than this are not written out but referred to as
        ``{"npz": key, "shape": [...], "dtype": ...}``, with ``key`` the name :meth:`arrays` gives them after
        ``npz_prefix`` (how a report's ``report.json`` points into its ``arrays.npz``)."""
        refs = None
        if inline_max is not None:
            refs = {id(arr): key for key, arr in self.arrays(prefix=npz_prefix).items() if arr.size > inline_max}
        out = _jsonable(self, refs)
        out["result_type"] = type(self).__name__
        return out

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Every numeric numpy array field, also inside dicts, lists and nested results, keyed
        ``prefix + field[/key or index][/nested field]``."""
        found: dict[str, np.ndarray] = {}

        def visit(key: str, value: Any) -> None:
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                found[key] = value
            elif isinstance(value, Result):
                found.update(value.arrays(prefix=f"{key}/"))
            elif isinstance(value, dict):
                for k, v in value.items():
                    visit(f"{key}/{k}", v)
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    visit(f"{key}/{i}", v)

        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            visit(prefix + f.name, getattr(self, f.name))
        return found


@dataclass(frozen=True, kw_only=True)
class RecordedResult(Result):
    """A result that records how it was computed (keyword-only fields shared by the analyses).

    ``estimator``: what was computed, in words (e.g. "linear CKA, debiased HSIC"); ``n_samples``;
    ``params``: the parameters that change the number; ``seed`` (None when nothing is random);
    ``device`` and ``dtype`` of the computation; ``seconds`` it took.
    """

    estimator: str
    n_samples: int
    params: dict[str, Any]
    seed: int | None
    device: str
    dtype: str
    seconds: float
