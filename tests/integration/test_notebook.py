"""The quickstart notebook runs top to bottom (its code cells, in order, from the examples folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_notebook_runs(monkeypatch):
    monkeypatch.chdir(EXAMPLES)
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    namespace: dict = {}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code_cells) >= 5
    for cell in code_cells:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert result.values.shape == (5, 5)
    assert np.all(result.values <= 1 + 1e-9)
    assert result.values[4, 4] > 0.9  # the output layers of two accurate digits models agree
    assert sorted(p.name for p in namespace["out"].values()) == ["arrays.npz", "report.html", "report.json"]
