"""Run every registered analysis and measure on CUDA and on the CPU; print max differences and speedups.

    python benchmarks/gpu_check.py            # needs a CUDA device; skips analyses whose packages are missing

For each registry entry the same inputs go through ``entry.compute`` with ``device="cuda"`` and
``device="cpu"``; every numeric array of the results is compared (max absolute difference, and
relative to the array's scale), except the embedding's coordinates: a UMAP layout is optimised by
seeded SGD on each device, so its trustworthiness and neighbour preservation are compared instead. Timings are the second of two runs on each device, so CUDA
start-up and kernel compilation are excluded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _arrays(result) -> dict[str, np.ndarray]:
    results = result if isinstance(result, (list, tuple)) else [result]
    out: dict[str, np.ndarray] = {}
    for i, r in enumerate(results):
        if hasattr(r, "arrays"):
            out.update(r.arrays(prefix=f"{i}/"))
    return out


def _timed(fn):
    fn()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-a", default="mlp_seed0")
    parser.add_argument("--model-b", default="mlp_seed1")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return

    from workbench import load_dataset, load_model
    from workbench.registry import ANALYSES, MEASURES, Context

    a = load_model(ROOT / "sample_models" / f"{args.model_a}.safetensors")
    b = load_model(ROOT / "sample_models" / f"{args.model_b}.safetensors")
    data = load_dataset("digits")
    print(f"device: {torch.cuda.get_device_name(0)}; models {a.name}, {b.name}; {data.name}, n = {data.n_samples}")
    print(f"{'analysis':<22} {'cpu s':>8} {'cuda s':>8} {'speedup':>8} {'max |diff|':>12} {'rel diff':>10}")
    for entry in ANALYSES:
        def run(device: str, entry=entry):
            ctx = Context(model_a=a, model_b=b, dataset=data, device=device)
            return entry.compute(ctx, **dict(entry.params))

        try:
            cpu, t_cpu = _timed(lambda: run("cpu"))
            gpu, t_gpu = _timed(lambda: run("cuda"))
        except ImportError as exc:
            print(f"{entry.name:<22} skipped: {exc}")
            continue
        ca, ga = _arrays(cpu), _arrays(gpu)
        if entry.name == "embedding":  # a UMAP layout is optimised by seeded SGD on each device: compare its quality, not its coordinates
            ca = {k: v for k, v in ca.items() if k.endswith(("trustworthiness", "knn_preservation"))}
        diffs = [(float(np.max(np.abs(ca[k].astype(float) - ga[k].astype(float)))) if ca[k].size else 0.0,
                  float(np.max(np.abs(ca[k].astype(float)))) if ca[k].size else 0.0)
                 for k in ca if k in ga and ca[k].shape == ga[k].shape and ca[k].dtype.kind == "f"]
        worst = max((d for d, _ in diffs), default=0.0)
        rel = max((d / s for d, s in diffs if s > 0), default=0.0)
        print(f"{entry.name:<22} {t_cpu:8.3f} {t_gpu:8.3f} {t_cpu / t_gpu:8.2f} {worst:12.3g} {rel:10.3g}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 256))
    y = np.tanh(x @ rng.standard_normal((256, 512)))
    for m in MEASURES:
        cpu, t_cpu = _timed(lambda m=m: m.fn(x, y, device="cpu"))
        gpu, t_gpu = _timed(lambda m=m: m.fn(x, y, device="cuda"))
        print(f"{m.name:<22} {t_cpu:8.3f} {t_gpu:8.3f} {t_cpu / t_gpu:8.2f} {abs(cpu - gpu):12.3g} {abs(cpu - gpu) / max(abs(cpu), 1e-12):10.3g}")


if __name__ == "__main__":
    main()
