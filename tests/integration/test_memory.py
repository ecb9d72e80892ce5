"""Memory stays bounded: a fresh process extracting 20,000 samples through the CNN, and probing many layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_extraction_peak_memory_is_bounded(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "extraction.py"), "--child", "--n", "20000", "--batch-size", "512"],
        capture_output=True, text=True, check=True, timeout=600, env={"WORKBENCH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    # torch alone takes a few hundred MiB; the activations (16 MiB here) stream to disk.
    assert mem["peak_rss_mib"] < 1200, mem
    assert mem["peak_rss_mib"] - mem["rss_before_mib"] < 300, mem


_PROBE_SCRIPT = """
import ctypes, json, sys
import torch
from workbench.analyses.probing import moment_probe, probe_layers
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
n, d, layers, dtype, tokens = json.loads(sys.argv[1])  # tokens > 0: (n, tokens, d) layers for moment_probe
g = torch.Generator().manual_seed(0)
shape = (n, tokens, d) if tokens else (n, d)
acts = {f"l{i}": torch.randn(shape, generator=g).to(getattr(torch, dtype)) + 3.0 for i in range(layers)}
y = torch.randint(0, 2, (n,), generator=g).numpy()
options = {"cv": 2, "control": False, "device": "cpu"}  # the host's memory only: no CUDA context
probe = moment_probe if tokens else probe_layers
probe({"w": acts["l0"][:200, ..., :8]}, y[:200], **options)  # imports, thread pools
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
probe(acts, y, **options)
print(json.dumps({"peak": status("VmHWM") - base}))
"""


def _probe_peak(n: int, d: int, layers: int, dtype: str = "float32", tokens: int = 0) -> int:
    """Peak resident memory of one probe_layers call (moment_probe on ``(n, tokens, d)`` layers when ``tokens``) above
    the process's memory before it (fresh process)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident memory")
    out = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, json.dumps([n, d, layers, dtype, tokens])], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_probing_prepares_one_layer_at_a_time():
    # probe_layers centred float32 copies of all layers before probing the first: 16 layers of 4000 x 1024 peaked at
    # ~500 MiB above the activations (~110 MiB with one layer's copy at a time, whatever the number of layers)
    n, d, layers = 4000, 1024, 16
    peak = _probe_peak(n, d, layers)
    assert peak < layers * n * d * 4, f"{peak / 2**20:.0f} MiB"  # less than the copies of all layers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probing_holds_one_float64_work_array_per_layer(dtype):
    # each layer was centred in float64 twice (for its float32 copy, then again for the folds' statistics, next to that
    # copy and a second float32 one), with |x|, a flag per value and a mixed-dtype subtraction's two float64 arrays on
    # the side: one 4000 x 3000 layer peaked at 4.8 (float32 input) and 4.3 (float64 input) times its float32 size
    # (218 and 195 MiB); now the float32 copy and one float64 work array, 3.0 and 3.1 times (138 and 142 MiB). The
    # layer is above glibc's largest mmap threshold (32 MiB), so freed arrays are returned, not kept in the heap.
    n, d = 4000, 3000
    peak = _probe_peak(n, d, 1, dtype)
    assert peak < 3.5 * n * d * 4, f"{peak / 2**20:.0f} MiB, {peak / (n * d * 4):.2f} x the layer in float32"


def test_moment_probe_takes_moments_a_block_of_samples_at_a_time():
    # the moments were taken on a float64 copy of the whole (n, tokens, features) layer with four temporaries of its
    # size: one 1000 x 64 x 256 layer (62.5 MiB in float32) peaked at 422 MiB; 44 MiB in blocks of samples
    n, tokens, d = 1000, 64, 256
    peak = _probe_peak(n, d, 1, tokens=tokens)
    assert peak < n * tokens * d * 4, f"{peak / 2**20:.0f} MiB"  # less than the layer itself
