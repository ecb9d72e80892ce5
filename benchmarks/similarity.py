"""Layer x layer linear CKA: ``similarity_matrix`` vs the ``torch-cka`` package vs a naive n x n Gram loop.

    python benchmarks/similarity.py [--n 10000] [--layers 8] [--device cuda]
                                    [--torch-cka-pairs K] [--naive-pairs K] [--reference-pairs K]

Data: two synthetic "models" of ``--layers`` ReLU layers each, widths evenly spaced from 512 to 2048,
on ``--n`` samples (float32, a shared 64-d latent plus noise, so the CKA values are neither 0 nor 1).
All methods run in this process on the same tensors and device, and compute the same estimator, the
debiased linear CKA of Kornblith et al. on the full data (torch-cka gets one batch of all ``n`` samples,
which makes its minibatch HSIC the full-data unbiased HSIC):

* ``similarity_matrix(acts_a, acts_b, measure="linear_cka", debiased=True)`` (also timed biased);
* ``torch_cka.CKA(...).compare(loader)`` (``pip install torch-cka``; skipped with a note when missing);
* a naive float64 implementation that forms both ``n x n`` Gram matrices for every pair.

Every result is compared with a float64 numpy reference (the ``n x n`` Gram formula from
``tests/reference.py``). Peak memory is the growth of the device allocator's peak (CUDA) or of the
process RSS (CPU, sampled every 2 ms after returning freed heap pages to the OS) during each call. The slow sides are cubic (torch-cka) or
quadratic (naive, reference) in ``n``: with ``--torch-cka-pairs K`` / ``--naive-pairs K`` /
``--reference-pairs K`` only the first K layer pairs run, and the full time is extrapolated
linearly (marked "extrapolated"). Goal: >= 20x faster than torch-cka, within 1e-6 of the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import cka_from_grams, gram_linear  # noqa: E402
from workbench.analyses.similarity import similarity_matrix  # noqa: E402
from workbench.device import resolve_device  # noqa: E402


def make_layers(
    n: int, widths: list[int], seed: int, latent: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, width in enumerate(widths):
        proj = torch.randn(latent.shape[1], width, generator=gen) / 8.0
        noise = torch.randn(n, width, generator=gen)
        layers[f"layer{i}"] = torch.relu(latent @ proj + 0.5 * noise).to(device)
    return layers


# ---------------------------------------------------------------------------------------------
# measurement


@dataclass
class Peak:
    bytes: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the RSS baseline of the next call is honest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield peak
        torch.cuda.synchronize()
        peak.bytes = torch.cuda.max_memory_allocated() - base
        return
    _release_freed_memory()
    base = _rss()
    top = [base]

    def sample() -> None:
        while not peak._stop.wait(0.002):
            top[0] = max(top[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        peak._stop.set()
        thread.join()
        peak.bytes = max(top[0], _rss()) - base


def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[np.ndarray, float, float]:
    with peak_memory(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        values = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return values, seconds, peak.bytes


# ---------------------------------------------------------------------------------------------
# the other implementations


def naive_gram_cka(xs_a: list[torch.Tensor], xs_b: list[torch.Tensor], pairs: list[tuple[int, int]]) -> np.ndarray:
    """Debiased linear CKA, forming both n x n float64 Gram matrices for every pair (no reuse)."""
    out = np.full((len(xs_a), len(xs_b)), np.nan)

    def unbiased(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        n = kx.shape[0]
        rx, ry = kx.sum(1), ky.sum(1)
        return (kx * ky).sum() + rx.sum() * ry.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rx @ ry

    for i, j in pairs:
        x, y = xs_a[i].double(), xs_b[j].double()
        kx, ky = x @ x.T, y @ y.T
        kx.fill_diagonal_(0.0)
        ky.fill_diagonal_(0.0)
        out[i, j] = float(unbiased(kx, ky) / torch.sqrt(unbiased(kx, kx) * unbiased(ky, ky)))
        del kx, ky
    return out


class _Lookup(nn.Module):
    """A 'layer' whose output for a batch of sample indices is the stored activation rows."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


class _Bank(nn.Module):
    def __init__(self, tables: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(_Lookup(t) for t in tables)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer(idx)
        return idx


def torch_cka_values(
    xs_a: list[torch.Tensor], xs_b: list[torch.Tensor], n_a: int, n_b: int, device: torch.device
) -> np.ndarray:
    """torch-cka on the first n_a layers of A and n_b layers of B, one batch of all samples."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    n = xs_a[0].shape[0]
    loader = DataLoader(TensorDataset(torch.arange(n, device=device)), batch_size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(
            _Bank(xs_a[:n_a]),
            _Bank(xs_b[:n_b]),
            model1_name="A",
            model2_name="B",
            model1_layers=[f"layers.{i}" for i in range(n_a)],
            model2_layers=[f"layers.{j}" for j in range(n_b)],
            device=str(device),
        )
        cka.compare(loader, loader)
    out = np.full((len(xs_a), len(xs_b)), np.nan)
    out[:n_a, :n_b] = cka.export()["CKA"].cpu().numpy()
    return out


def reference_values(
    xs_a: list[torch.Tensor], xs_b: list[torch.Tensor], pairs: list[tuple[int, int]], debiased: bool
) -> np.ndarray:
    """float64 numpy Gram formula; each Gram of A is formed once per row of pairs (memory: two n x n Grams)."""
    out = np.full((len(xs_a), len(xs_b)), np.nan)
    for i in sorted({i for i, _ in pairs}):
        kx = gram_linear(xs_a[i].cpu().numpy())
        for j in [j for a, j in pairs if a == i]:
            out[i, j] = cka_from_grams(kx, gram_linear(xs_b[j].cpu().numpy()), debiased=debiased)
    return out


# ---------------------------------------------------------------------------------------------


def first_pairs(n_layers: int, k: int | None) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n_layers) for j in range(n_layers)]
    return pairs if k is None else pairs[:k]


def max_diff(values: np.ndarray, reference: np.ndarray) -> float:
    mask = np.isfinite(values) & np.isfinite(reference)
    return float(np.abs(values[mask] - reference[mask]).max()) if mask.any() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="number of samples")
    parser.add_argument("--layers", type=int, default=8, help="layers per model")
    parser.add_argument("--min-width", type=int, default=512)
    parser.add_argument("--max-width", type=int, default=2048)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda > mps > cpu)")
    parser.add_argument("--torch-cka-pairs", type=int, default=None, help="time only the first K pairs and extrapolate")
    parser.add_argument("--naive-pairs", type=int, default=None, help="time only the first K pairs and extrapolate")
    parser.add_argument("--reference-pairs", type=int, default=None, help="check only the first K pairs")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    widths = [int(w) for w in np.linspace(args.min_width, args.max_width, args.layers).round()]
    latent = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(0))
    acts_a = make_layers(args.n, widths, 1, latent, device)
    acts_b = make_layers(args.n, widths, 2, latent, device)
    xs_a, xs_b = list(acts_a.values()), list(acts_b.values())
    total_pairs = args.layers**2
    gib = sum(x.numel() * 4 for x in xs_a + xs_b) / 2**30
    print(
        f"# linear CKA, {args.layers} x {args.layers} layers of widths {widths[0]}-{widths[-1]}, n = {args.n}, "
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"activations {gib:.2f} GiB float32, torch {torch.__version__}"
    )

    # warm up kernels and allocator on a small slice
    small = {k: v[:256] for k, v in list(acts_a.items())[:2]}
    similarity_matrix(small, small, measure="linear_cka", debiased=True, device=device)

    rows: list[tuple[str, float, float, np.ndarray, str]] = []
    ours, t_ours, m_ours = timed(
        lambda: similarity_matrix(acts_a, acts_b, measure="linear_cka", debiased=True, device=device).values, device
    )
    rows.append(("similarity_matrix, debiased", t_ours, m_ours, ours, ""))
    ours_biased, t_b, m_b = timed(
        lambda: similarity_matrix(acts_a, acts_b, measure="linear_cka", device=device).values, device
    )

    if not args.skip_naive:
        pairs = first_pairs(args.layers, args.naive_pairs)
        values, t, m = timed(lambda: naive_gram_cka(xs_a, xs_b, pairs), device)
        scale = total_pairs / len(pairs)
        rows.append(("naive n x n Gram, float64", t * scale, m, values, "extrapolated" if scale > 1 else ""))

    try:
        import torch_cka  # noqa: F401

        has_torch_cka = True
    except ImportError as exc:
        has_torch_cka = False
        print(f"# torch-cka is not installed ({exc}); `pip install torch-cka` to include it. Other results follow.")
    if has_torch_cka:
        k = args.torch_cka_pairs
        n_a, n_b = (args.layers, args.layers) if k is None else (1, min(k, args.layers))
        values, t, m = timed(lambda: torch_cka_values(xs_a, xs_b, n_a, n_b, device), device)
        scale = total_pairs / (n_a * n_b)
        rows.append(("torch-cka 0.21, one full batch", t * scale, m, values, "extrapolated" if scale > 1 else ""))

    ref_pairs = first_pairs(args.layers, args.reference_pairs)
    start = time.perf_counter()
    reference = reference_values(xs_a, xs_b, ref_pairs, debiased=True)
    reference_biased = reference_values(xs_a, xs_b, ref_pairs[: max(1, len(ref_pairs) // 8)], debiased=False)
    t_ref = time.perf_counter() - start
    print(
        f"# float64 numpy Gram reference on {len(ref_pairs)} of {total_pairs} pairs (+{max(1, len(ref_pairs) // 8)} biased): "
        f"{t_ref:.1f} s"
    )

    print(f"{'method':38s} {'seconds':>10s} {'ours faster by':>15s} {'max |diff| vs ref':>18s} {'peak memory':>12s}")
    for name, seconds, mem, values, note in rows:
        ratio = seconds / t_ours
        print(
            f"{name:38s} {seconds:10.3f} {ratio:14.1f}x {max_diff(values, reference):18.2e} {mem / 2**20:9.0f} MiB"
            f"{'  (' + note + ')' if note else ''}"
        )
    print(
        f"{'similarity_matrix, biased':38s} {t_b:10.3f} {'':>15s} {max_diff(ours_biased, reference_biased):18.2e} "
        f"{m_b / 2**20:9.0f} MiB"
    )
    naive_row = next((r for r in rows if r[0].startswith("naive")), None)
    if naive_row is not None:
        print(
            f"# max |diff| similarity_matrix vs naive float64 Gram on its {int(np.isfinite(naive_row[3]).sum())} pairs: "
            f"{max_diff(ours, naive_row[3]):.2e}"
        )
    torch_row = next((r for r in rows if r[0].startswith("torch-cka")), None)
    exact = max(max_diff(ours, reference), max_diff(ours_biased, reference_biased)) <= 1e-6
    print(
        f"# goal exact to 1e-6: {'met' if exact else 'NOT met'}"
        + (
            f"; goal >= 20x faster than torch-cka: {'met' if torch_row[1] / t_ours >= 20 else 'NOT met'} "
            f"({torch_row[1] / t_ours:.1f}x)"
            if torch_row
            else "; torch-cka not measured"
        )
    )


if __name__ == "__main__":
    main()
