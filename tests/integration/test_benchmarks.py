"""Every benchmark script runs end to end on a small input and prints both sides of its comparisons.

The numbers themselves are not checked here (timings belong to the scripts, not to tests); this keeps
the scripts the README quotes runnable. Reference packages that are not installed are reported as such.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMALL_RUNS = [
    (["extraction.py", "--n", "3000", "--repeats", "1"], ["bare forward:", "extract (6 hooks):", "floor, reading the maps", "floor, writing", "peak RSS"]),
    (["probing_embedding.py", "--n", "1500", "--d", "32", "--skip-umap"], ["probe, 1 layer", "exact kNN graph", "trustworthiness"]),
    (
        ["topology.py", "--sizes", "150", "--h0-size", "1500", "--repeats", "1", "--plain-gudhi-max", "150"],
        ["H0+H1 of 150 points", "H0 of 1500 points", "Goals"],
    ),
    (["mode_connectivity.py", "--repeats", "1", "--widths", "64"], ["weight matching", "25-point interpolation", "width 64"]),
    (["similarity.py", "--n", "300", "--layers", "2", "--min-width", "16", "--max-width", "32"], ["max |diff|"]),
    (["degeneracy.py", "--repeats", "1"], ["interaction_basis"]),
    (["gpu_check.py"], ["CUDA"]),
]


@pytest.mark.parametrize(("args", "expected"), SMALL_RUNS, ids=[run[0][0] for run in SMALL_RUNS])
def test_benchmark_script_runs(args, expected, tmp_path):
    env = {**os.environ, "WORKBENCH_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for text in expected:
        assert text in out.stdout, f"{text!r} missing from the output of {args[0]}:\n{out.stdout[-2000:]}"
