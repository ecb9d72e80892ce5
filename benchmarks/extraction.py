"""Overhead of ``extract`` over a bare forward pass, and peak memory for 100,000 samples.

    python benchmarks/extraction.py [--n 100000] [--batch-size 1024] [--device cpu|cuda]

All sides run in this process on the same data and batches, taking turns: the bare side calls
the model on each batch and drops the output; ``extract`` adds hooks on six layers, pooling, and
streaming to the disk cache; a third side runs the same hooks and pooling and keeps nothing, which
separates the cost of reading the hooked maps from that of the cache; a fourth extracts the layers
the app picks by default. In each round every side runs twice between two bare runs (bare, side, side,
bare), the sides in a new random order; each overhead is given from the best times and as the median over
rounds of the side's two runs against the two bare runs around them (this machine's speed drifts by tens of
percent over seconds, so the paired median is the steadier figure), with a bootstrap 95 % interval of that
median over the rounds. Peak memory is measured in a fresh subprocess
(``VmHWM``) so it counts only the extraction. Goal: overhead <= 10 %, peak RSS < 2 GiB.
On an accelerator (``--device cuda``) every side moves each batch to the device and waits for the
device at the end; ``extract`` also brings the pooled outputs back to the host for the cache, in
chunks of ``--transfer-bytes`` (0: a copy after every batch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["conv1", "relu1", "conv2", "relu2", "fc1", "out"]


def make_data(n: int):
    from workbench import load_dataset
    from workbench.data import make_dataset

    base = load_dataset("digits", split="all")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, base.n_samples, (n,), generator=gen)
    x = base.x[idx] + 0.1 * torch.randn(n, base.x.shape[1], generator=gen)
    return make_dataset(f"digits x{n}", x, base.y[idx])


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, batch_size: int, device: str) -> None:
    """Run one extraction and print its peak RSS as JSON (used for the memory figure)."""
    from workbench import extract, load_model

    model = load_model(ROOT / "sample_models" / "cnn_seed0.safetensors")
    data = make_data(n)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        acts = extract(model, data, LAYERS, batch_size=batch_size, cache_dir=tmp, device=device)
        total = sum(v.numel() * 4 for v in acts.values())
    peak = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, "rss_before_mib": before, "activation_mib": total / 2**20,
                      "input_mib": data.x.numel() * 4 / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=12, help="rounds of all sides")
    parser.add_argument("--device", default="cpu", help="cpu (default) or an accelerator such as cuda")
    parser.add_argument("--transfer-bytes", type=int, default=None,
                        help="on an accelerator, pooled outputs gathered on the device before each copy to the host "
                             "(default: the library's; 0 copies every batch)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transfer_bytes is not None:
        importlib.import_module("workbench.activations.extract").TRANSFER_BYTES = args.transfer_bytes
    if args.child:
        child(args.n, args.batch_size, args.device)
        return

    from workbench import extract, load_model
    from workbench.activations.capture import PooledCapture, hooks_on
    from workbench.activations.extract import _LayerFile
    from workbench.registry import default_layers

    model = load_model(ROOT / "sample_models" / "cnn_seed0.safetensors")
    data = make_data(args.n)
    dev = torch.device(args.device)
    model.module.to(dev)  # extract leaves a model on the device it found it on

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def batches():
        for i in range(0, data.n_samples, args.batch_size):
            yield data.x[i:i + args.batch_size].to(dev)

    all_layers = default_layers(model)  # what the app and `workbench analyze` extract when no layers are named

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for x in batches():
                model.module(x)
        sync()
        return time.perf_counter() - start

    def hooked(layers: list[str]) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            extract(model, data, layers, batch_size=args.batch_size, cache_dir=tmp, device=dev)
            return time.perf_counter() - start

    def pooled_only() -> float:
        """The forward pass with the hooks that ``extract`` uses pooling the same layers, nothing kept:
        the cost of reading the maps."""
        start = time.perf_counter()
        with PooledCapture(model.module, LAYERS, "mean", channel_first=False) as capture, torch.inference_mode():
            for x in batches():
                capture.begin_batch()
                model.module(x)
                capture.end_batch()
        sync()
        return time.perf_counter() - start

    def routes(layers: list[str]) -> dict[str, str]:
        with PooledCapture(model.module, layers, "mean", channel_first=False) as capture, torch.inference_mode():
            capture.begin_batch()
            model.module(data.x[:8].to(dev))
            capture.end_batch()
            return dict(capture.sources)

    def is_map(name: str) -> bool:
        return len(layer_shapes[name]) >= 3

    layer_shapes: dict[str, tuple[int, ...]] = {}
    with hooks_on(model.module, LAYERS, lambda n, t: layer_shapes.__setitem__(n, tuple(t.shape))), torch.inference_mode():
        model.module(data.x[:8].to(dev))
    must_read = [k for k, v in routes(LAYERS).items() if v == "map" and is_map(k)]

    def read_floor() -> float:
        """Hooks that only sum the maps ``extract`` has to read: the least any extraction spends on them."""
        start = time.perf_counter()
        with hooks_on(model.module, must_read, lambda _n, t: t.sum(tuple(range(2, t.ndim)))), torch.inference_mode():
            for x in batches():
                model.module(x)
        sync()
        return time.perf_counter() - start

    sides = {"bare": bare, "pooled": pooled_only, "extract": lambda: hooked(LAYERS), "all": lambda: hooked(all_layers),
             "floor": read_floor}
    for side in sides.values():  # warm-up
        side()
    times: dict[str, list[float]] = {k: [] for k in sides}
    ratio_runs: dict[str, list[float]] = {k: [] for k in sides if k != "bare"}
    order = random.Random(0)
    for _ in range(args.repeats):
        # each side runs twice between two bare runs (bare, side, side, bare), the sides in a new order each round and
        # each sharing its bare runs with its neighbours: a drift of the machine's speed over those four runs, steady or
        # not, then weighs on both halves of the pair alike
        before = sides["bare"]()
        times["bare"].append(before)
        for k in order.sample(list(ratio_runs), len(ratio_runs)):
            pair = (sides[k](), sides[k]())
            after = sides["bare"]()
            times[k].extend(pair)
            times["bare"].append(after)
            ratio_runs[k].append(sum(pair) / (before + after))
            before = after

    def overhead(k: str) -> str:
        best = 100 * (min(times[k]) / min(times["bare"]) - 1)
        ratios = np.array(ratio_runs[k])
        paired = 100 * (np.median(ratios) - 1)
        # how far the paired median could be off: a bootstrap over the rounds (each round's pair resampled as a whole)
        resampled = np.median(np.random.default_rng(0).choice(ratios, size=(2000, len(ratios))), axis=1)
        low, high = 100 * (np.percentile(resampled, [2.5, 97.5]) - 1)
        interval = f", 95 % interval {low:+.1f} to {high:+.1f} %" if len(ratios) >= 5 else ""
        return f"{min(times[k]):8.3f} s   overhead {best:+.1f} % (median of paired runs {paired:+.1f} %{interval})"

    with tempfile.TemporaryDirectory() as tmp:
        acts = extract(model, data, LAYERS, batch_size=args.batch_size, cache_dir=tmp, device=dev)
        start = time.perf_counter()
        extract(model, data, LAYERS, batch_size=args.batch_size, cache_dir=tmp, device=dev)
        t_cached = time.perf_counter() - start
        blocks = {k: v.clone().numpy() for k, v in acts.items()}
        del acts

    def write_floor() -> float:
        """The pooled outputs written batch by batch to a fresh folder as ``extract`` writes them, without the model."""
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            files = {k: _LayerFile(Path(tmp) / f"{k}.npy", *v.shape) for k, v in blocks.items()}
            for i in range(0, data.n_samples, args.batch_size):
                for k, v in blocks.items():
                    files[k].append(v[i:i + args.batch_size])
            for f in files.values():
                f.close()
            return time.perf_counter() - start

    t_write = min(write_floor() for _ in range(args.repeats))
    sources = routes(all_layers)
    out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n), "--batch-size", str(args.batch_size),
                          "--device", args.device, *(["--transfer-bytes", str(args.transfer_bytes)] if args.transfer_bytes is not None else [])],
                         capture_output=True, text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, torch threads {torch.get_num_threads()}"
    print(f"CNN, {args.n} samples, batch {args.batch_size}, {where}, {args.repeats} rounds (bare, side, side, bare)")
    print("how each layer is pooled: " + ", ".join(f"{k} ({v})" for k, v in sources.items()))
    spread = 100 * (statistics.median(times["bare"]) / min(times["bare"]) - 1)
    print(f"bare forward:                {min(times['bare']):8.3f} s   (median run {spread:+.1f} % slower: the noise of this "
          "machine, against which the overheads below are read)")
    print(f"hooks + pooling only:        {overhead('pooled')} (no cache)")
    print(f"extract (6 hooks):           {overhead('extract')} (goal <= 10 %)")
    print(f"extract ({len(all_layers)} default layers): {overhead('all')}")
    write_share = 100 * t_write / min(times["bare"])
    print(f"floor, reading the maps that must be read ({', '.join(must_read)}) and nothing else: {overhead('floor')}")
    print(f"floor, writing the {sum(v.nbytes for v in blocks.values()) / 1e6:.0f} MB of pooled outputs alone: "
          f"{t_write:8.3f} s   = {write_share:.1f} % of the bare forward pass")
    print(f"extract (cache hit):         {t_cached:8.3f} s")
    print(f"peak RSS of a fresh extraction process: {mem['peak_rss_mib']:.0f} MiB "
          f"(input tensor {mem['input_mib']:.0f} MiB, activations on disk {mem['activation_mib']:.0f} MiB; goal < 2048 MiB)")


if __name__ == "__main__":
    main()
