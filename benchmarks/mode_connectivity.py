"""Weight matching and 25-point interpolation against the ``rebasin`` package, and scaling with width.

    python benchmarks/mode_connectivity.py [--repeats 5] [--widths 512 1024 2048] [--device cpu]

Both sides run in this process on the same models and data, taking turns; each time is the best of
``--repeats``.

1. Digits MLPs ``mlp_seed0`` / ``mlp_seed1`` (64-512-512-10). Weight matching: ``weight_matching``
   vs rebasin's ``PermutationCoordinateDescent`` (its graph tracing counted, as a user pays it).
   Barrier: the test-loss barrier after each side's permutation, both evaluated by ``interpolate``
   (25 points) so the numbers compare the permutations, not the evaluators. Interpolation:
   ``interpolate`` (25 points, test loss and accuracy, float64) vs rebasin's ``LerpSimple`` with an
   ``eval_fn`` computing the same in float32 (23 inner points + the 2 endpoints).
2. The BatchNorm CNN ``cnn_seed0`` against a copy of itself with shuffled channels (known answer:
   matching recovers the shuffle, barrier 0, same function). Reports whether each side's permuted
   copy still computes the original function.
3. Width scaling: randomly initialised 64-w-w-10 MLP pairs (w in ``--widths``), weight matching only.

Goal: at least as fast as rebasin where it supports the model, and a barrier no worse.
``ratio`` = rebasin seconds / our seconds (> 1: we are faster). Without rebasin installed
(``pip install rebasin``; not a project dependency) the script says so and times our side only.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench import load_dataset, load_model
from workbench.analyses.mode_connectivity import (
    apply_permutation,
    interpolate,
    loss_barrier,
    permutation_spec,
    weight_matching,
)
from workbench.models.architectures import build_model

ROOT = Path(__file__).resolve().parents[1]
N_POINTS = 25

try:
    from rebasin import PermutationCoordinateDescent
    from rebasin.interpolation import LerpSimple

    REBASIN = True
except ImportError:
    REBASIN = False


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def best_times(ours: Callable[[], Any], theirs: Callable[[], Any] | None, repeats: int) -> tuple[float, Any, float | None, Any]:
    """Best-of-``repeats`` times of both sides, taking turns, so the load of a shared machine hits both alike."""
    t_ours, t_theirs, out_ours, out_theirs = float("inf"), None, None, None
    for _ in range(repeats):
        seconds, out_ours = best_time(ours, 1)
        t_ours = min(t_ours, seconds)
        if theirs is not None:
            seconds, out_theirs = best_time(theirs, 1)
            t_theirs = seconds if t_theirs is None else min(t_theirs, seconds)
    return t_ours, out_ours, t_theirs, out_theirs


def rebasin_match(a: nn.Module, b: nn.Module, x: torch.Tensor) -> nn.Module:
    """B permuted by rebasin, on the CPU. rebasin permutes its ``model_b`` in place, and its graph tracer
    (torchview) moves both models to the GPU when there is one: it works on copies."""
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    torch.manual_seed(0)  # rebasin draws its order of permutations from torch's global generator
    PermutationCoordinateDescent(a, b, x[:8], device_a="cpu", device_b="cpu", logging_level=logging.ERROR).rebasin()
    return b.cpu()


def rebasin_interpolation(a: nn.Module, b: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    def eval_fn(model: nn.Module, device: Any) -> float:
        with torch.no_grad():
            logits = model(x)
            _ = float((logits.argmax(1) == y).float().mean())
            return float(nn.functional.cross_entropy(logits, y))

    lerp = LerpSimple(models=[a, b], eval_fn=eval_fn, logging_level="ERROR")
    lerp.interpolate(steps=N_POINTS - 2)
    return [eval_fn(a, None), *lerp.metrics_interpolated, eval_fn(b, None)]


def max_output_change(m1: nn.Module, m2: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((m1(x) - m2(x)).abs().max())


def inner(m1: nn.Module, m2: nn.Module) -> float:
    """The weight-matching objective: summed inner products of the parameters (not BatchNorm statistics)."""
    p2 = dict(m2.named_parameters())
    return sum(float((p.detach().double() * p2[k].detach().double()).sum()) for k, p in m1.named_parameters())


def shuffled(model: nn.Module, seed: int) -> nn.Module:
    spec = permutation_spec(model)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    perms = {p: torch.randperm(state[pairs[0][0]].shape[pairs[0][1]], generator=gen) for p, pairs in spec.perms.items()}
    return apply_permutation(model, perms)


def row(label: str, ours: float, theirs: float | None, unit: str = "s") -> None:
    if theirs is None:
        print(f"  {label:<44} ours {ours:9.3f} {unit}   rebasin        n/a")
    else:
        print(f"  {label:<44} ours {ours:9.3f} {unit}   rebasin {theirs:9.3f} {unit}   ratio {theirs / ours:6.2f}")


def pair_case(title: str, a: nn.Module, b: nn.Module, test: Any, repeats: int, device: str | None) -> None:
    print(f"\n{title}")
    t_ours, wm, t_rb, b_rb = best_times(
        lambda: weight_matching(a, b, device=device), (lambda: rebasin_match(a, b, test.x)) if REBASIN else None, repeats
    )
    b_ours = apply_permutation(b, wm)
    row("weight matching", t_ours, t_rb)
    print(f"    our passes: {wm.n_iterations} ({'converged' if wm.converged else 'max_iter'})")
    objective = f"    objective Σ⟨θ_A, π(θ_B)⟩ over weights: identity {inner(a, b):.4f}, ours {inner(a, b_ours):.4f}"
    print(objective + (f", rebasin {inner(a, b_rb):.4f}" if REBASIN else ""))
    naive = loss_barrier(interpolate(a, b, test, n_points=N_POINTS, device=device)).linear["test"]
    ours_barrier = loss_barrier(interpolate(a, b_ours, test, n_points=N_POINTS, device=device)).linear["test"]
    line = f"    test-loss barrier (above the line, {N_POINTS} points): naive {naive:.4f}, ours {ours_barrier:.4f}"
    if REBASIN:
        rb_barrier = loss_barrier(interpolate(a, b_rb, test, n_points=N_POINTS, device=device)).linear["test"]
        line += f", rebasin {rb_barrier:.4f}"
    print(line)
    change = f"    max |Δ output| of the permuted B vs B: ours {max_output_change(b, b_ours, test.x):.2e}"
    if REBASIN:
        change += f", rebasin {max_output_change(b, b_rb, test.x):.2e}"
    print(change)
    t_int, _, t_rb_int, _ = best_times(
        lambda: interpolate(a, b_ours, test, n_points=N_POINTS, device=device),
        (lambda: rebasin_interpolation(a, b_ours, test.x, test.y)) if REBASIN else None,
        repeats,
    )
    row(f"{N_POINTS}-point interpolation (test loss + accuracy)", t_int, t_rb_int)


def width_case(widths: list[int], repeats: int, device: str | None, x: torch.Tensor) -> None:
    print("\nwidth scaling: randomly initialised 64-w-w-10 MLP pairs, weight matching")
    for width in widths:
        spec = {"type": "mlp", "sizes": [64, width, width, 10], "activation": "relu"}
        torch.manual_seed(width)
        a, b = build_model(spec), build_model(spec)
        t_ours, wm, t_rb, _ = best_times(
            lambda a=a, b=b: weight_matching(a, b, device=device),
            (lambda a=a, b=b: rebasin_match(a, b, x)) if REBASIN else None,
            repeats,
        )
        row(f"width {width} ({wm.n_iterations} passes)", t_ours, t_rb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--device", default=None, help="our side's device (default: auto); rebasin runs on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats} runs")
    if not REBASIN:
        print("rebasin is not installed (pip install rebasin), so only our side is timed.")
    test = load_dataset("digits", split="test")
    mlp_a = load_model(ROOT / "sample_models" / "mlp_seed0.safetensors").module
    mlp_b = load_model(ROOT / "sample_models" / "mlp_seed1.safetensors").module
    pair_case("digits MLPs mlp_seed0 / mlp_seed1 (64-512-512-10)", mlp_a, mlp_b, test, args.repeats, args.device)
    cnn = load_model(ROOT / "sample_models" / "cnn_seed0.safetensors").module
    pair_case(
        "BatchNorm CNN cnn_seed0 / a channel-shuffled copy of it",
        cnn,
        shuffled(cnn, seed=1),
        test,
        args.repeats,
        args.device,
    )
    width_case(args.widths, args.repeats, args.device, test.x)


if __name__ == "__main__":
    main()
