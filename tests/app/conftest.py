"""App tests run the real pages with Streamlit's AppTest; umap warm-up is off so runs stay short."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _app_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_WARM_UP", "0")
    monkeypatch.chdir(ROOT)


@pytest.fixture
def app():
    """A fresh ``AppTest`` of app.py (not yet run)."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def shown(markdown: str) -> str:
    """The text a user reads for Markdown whose special characters were escaped (``mlp\\_seed0`` reads ``mlp_seed0``)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def page_errors(at) -> list[str]:
    """Text of every st.error and st.exception element, as displayed."""
    return [shown(e.value) for e in at.error] + [str(e.value) for e in at.exception]


os.environ.setdefault("WORKBENCH_WARM_UP", "0")


def count_calls(module, name: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every call of ``module.name`` from now on (the function still runs)."""
    import functools

    calls: list[dict] = []
    original = getattr(module, name)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
