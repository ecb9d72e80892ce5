"""User-facing errors.

Every error the library raises on bad input is a :class:`WorkbenchError` (a ``ValueError``)
whose message is one sentence: what was wrong, what was expected, what was given, and what to do.
The app shows ``str(error)``; it never shows a traceback for these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorkbenchError(ValueError):
    """Base class of all errors caused by user input."""


class UnsupportedFormatError(WorkbenchError):
    """A file whose type the workbench cannot read."""


class CorruptFileError(WorkbenchError):
    """A file of a supported type that is truncated, damaged or inconsistent."""


class UnsafeFileError(WorkbenchError):
    """A file that would run code when loaded, refused without an explicit trust switch."""


class FileTooLargeError(WorkbenchError):
    """An upload or archive member above the configured size limit."""


class ArchitectureError(WorkbenchError):
    """An architecture spec that is invalid or does not match the weights."""


class MissingArchitectureError(ArchitectureError):
    """Weights that come without an architecture spec, where none was given. ``suggested``: the spec the weights'
    shapes suggest (a dict), or None."""

    def __init__(self, message: str, suggested: dict | None = None):
        super().__init__(message)
        self.suggested = suggested


class UnknownLayerError(WorkbenchError):
    """A layer name that the model does not have."""


class DataError(WorkbenchError):
    """A dataset or activation array that cannot be analysed as given."""


class ConstantDataError(DataError):
    """A representation whose every feature is constant over samples (a dead layer, or a token every sample shares),
    on which a measure of how samples differ is undefined."""


class ParameterError(WorkbenchError):
    """A parameter value outside its valid range."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def format_choices(options: Iterable[str], limit: int = 30) -> str:
    """Comma-separated options, shortened with a count when there are many."""
    items = list(options)
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def non_finite(n: int) -> str:
    """``"1 NaN or infinite value"``, ``"3 NaN or infinite values"``: a count of bad values for a message."""
    return f"{n} NaN or infinite value{'s' if n != 1 else ''}"
