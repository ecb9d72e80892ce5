"""Speed of the degeneracy analyses against straightforward per-sample references, in one process.

    python benchmarks/degeneracy.py [--threads N] [--repeats R]

1. The Jacobian Gram of :func:`gradient_rank` (batched ``vmap(jacrev)``) against a loop of
   ``torch.autograd.functional.jacobian`` over samples, on the bundled MLPs and digits (n = 450).
2. The Jacobian Gram of the interaction basis (pull-back of the next layer's basis directions, batched)
   against a per-sample loop that forms the full Jacobian and then projects it (what a direct
   transcription of the definition does).
3. Louvain on the interaction graph (networkx), for scale.

The authors' reference implementation (``rib``, github.com/ApolloResearch/rib) is not a package on
PyPI; when it is not importable the script says so and compares against the loops above only.
Prints one line per measurement with the time ratio (reference / ours) and the largest difference.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch

from workbench import load_dataset, load_model
from workbench.analyses import degeneracy as dg

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _loop_jacobian_gram(module: torch.nn.Module, x: torch.Tensor, position: int) -> torch.Tensor:
    m = copy.deepcopy(module).double().eval()
    children = list(m.children())
    head, tail = torch.nn.Sequential(*children[: position + 1]), torch.nn.Sequential(*children[position + 1 :])
    with torch.no_grad():
        f = head(x.double())
    gram = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
    for s in range(f.shape[0]):
        j = torch.autograd.functional.jacobian(lambda z: tail(z[None])[0], f[s])
        gram += j.T @ j
    return gram / f.shape[0]


def _loop_basis_gram(
    module: torch.nn.Module, x: torch.Tensor, position: int, nxt: int, c_next: torch.Tensor, with_constant: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: full Jacobian of the next layer's folded coordinates, then projection on its basis."""
    m = copy.deepcopy(module).double().eval()
    children = list(m.children())
    head, tail = torch.nn.Sequential(*children[: position + 1]), torch.nn.Sequential(*children[position + 1 : nxt + 1])
    with torch.no_grad():
        f = head(x.double())
    d = f.shape[1]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    for s in range(f.shape[0]):
        jf = torch.autograd.functional.jacobian(lambda z: tail(z[None])[0], f[s])
        jc = tail(f[s][None])[0].detach() - jf @ f[s]  # Euler: the folded ReLU network is 1-homogeneous
        a = torch.cat([jf, jc[:, None]], dim=1)
        if with_constant:
            a = torch.cat([a, torch.eye(d + 1, dtype=torch.float64)[-1:]], dim=0)
        j = c_next.T @ a
        gram += j.T @ j
    return gram / f.shape[0], f


def _bench_model(name: str, layer: str, data, repeats: int) -> None:
    model = load_model(ROOT / "sample_models" / f"{name}.safetensors")
    position = [n for n, _ in model.module.named_children()].index(layer)
    dg.gradient_rank(model, data, layer)  # warm-up (torch.func imports, allocator)
    ours_t, ours = _best(lambda: dg.gradient_rank(model, data, layer), repeats)
    ref_t, ref = _best(lambda: _loop_jacobian_gram(model.module, data.x, position), 1)
    ev_ref = torch.linalg.eigvalsh(ref).flip(0).clamp_min(0).numpy()
    diff = abs(ours.eigenvalues[layer] - ev_ref).max() / ev_ref[0]
    print(
        f"gradient_rank Jacobian Gram  {name:17s} {layer}: ours {ours_t:7.3f} s, per-sample loop {ref_t:7.3f} s, "
        f"ratio {ref_t / ours_t:6.1f}x, max relative eigenvalue difference {diff:.1e}"
    )

    layers = ["input", "relu1", "relu2"]
    ib_t, ib = _best(lambda: dg.interaction_basis(model, data, layers), repeats)
    children = [n for n, _ in model.module.named_children()]
    c_next = torch.from_numpy(ib.basis["relu2"])
    loop_t, (m_loop, acts) = _best(
        lambda: _loop_basis_gram(model.module, data.x, position, children.index("relu2"), c_next, True), 1
    )
    print(
        f"interaction_basis (3 layers) {name:17s}: ours {ib_t:7.3f} s in all; the per-sample loop takes "
        f"{loop_t:7.3f} s for the relu1 Jacobian Gram alone (ratio ≥ {loop_t / ib_t:5.1f}x); basis sizes "
        f"{ib.basis_size}"
    )
    # the loop's Gram, expressed in basis coordinates, must be the identity
    c = torch.from_numpy(ib.basis["relu1"])
    lam = torch.from_numpy(ib.interaction_eigenvalues["relu1"][: c.shape[1]])
    folded = torch.cat([acts, torch.ones(acts.shape[0], 1, dtype=torch.float64)], dim=1)
    to_folded = (folded.T @ folded / folded.shape[0]) @ c / lam
    eye_err = (to_folded.T @ m_loop @ to_folded - torch.eye(c.shape[1], dtype=torch.float64)).abs().max()
    print(
        f"    loop Jacobian Gram in basis coordinates vs the identity ({c.shape[1]} directions): "
        f"max |error| {float(eye_err):.1e}"
    )
    start = time.perf_counter()
    dg.interaction_basis(model, data, layers, graph_directions=256)
    print(
        f"    interaction_basis with 256 graph directions per layer (Louvain on the larger graph): "
        f"{time.perf_counter() - start:.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("digits", split="test")
    print(f"digits test split, n = {data.n_samples}; torch {torch.__version__}, {args.threads} thread(s), CPU")
    if importlib.util.find_spec("rib") is None:
        print(
            "reference package 'rib' (ApolloResearch) is not installed (it is not on PyPI); comparing with loops only"
        )

    for name, layer in (("mlp_narrow_seed0", "relu1"), ("mlp_seed0", "relu1")):
        _bench_model(name, layer, data, args.repeats)


if __name__ == "__main__":
    main()
