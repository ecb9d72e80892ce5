"""Retrain the bundled sample models deterministically on the CPU.

    python sample_models/train.py            # all models, under a minute on 2 cores

Writes ``<name>.safetensors`` (weights, with the architecture spec and training facts in the
safetensors metadata), ``snapshots/`` (per-epoch weights of the narrow MLP) and ``manifest.json``
(test accuracy of every model on the digits test split).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from workbench.data import load_dataset
from workbench.models.architectures import build_model

HERE = Path(__file__).resolve().parent

WIDE = {"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "relu"}
NARROW = {"type": "mlp", "sizes": [64, 64, 64, 10], "activation": "relu"}
TANH = {"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "tanh"}
TEXT = {"type": "transformer", "vocab_size": 258, "max_len": 64, "d_model": 32, "n_heads": 2, "n_layers": 2,
        "n_classes": 4}
CNN = {"type": "cnn", "input_shape": [1, 8, 8], "channels": [32, 32], "kernel_size": 3, "batchnorm": True,
       "hidden": 64, "n_classes": 10}

# name -> (spec, seed, epochs, learning rate, description)
MODELS: dict[str, tuple[dict, int, int, float, str]] = {
    "mlp_seed0": (WIDE, 0, 40, 0.05, "digits MLP 64-512-512-10, ReLU, seed 0"),
    "mlp_seed1": (WIDE, 1, 40, 0.05, "digits MLP 64-512-512-10, ReLU, seed 1"),
    "mlp_seed2": (WIDE, 2, 40, 0.05, "digits MLP 64-512-512-10, ReLU, seed 2"),
    "mlp_narrow_seed0": (NARROW, 0, 30, 0.01, "narrow digits MLP 64-64-64-10, ReLU, seed 0"),
    "mlp_narrow_seed1": (NARROW, 1, 30, 0.01, "narrow digits MLP 64-64-64-10, ReLU, seed 1"),
    "mlp_tanh_seed0": (TANH, 0, 40, 0.05, "digits MLP 64-512-512-10, tanh, seed 0"),
    "cnn_seed0": (CNN, 0, 40, 0.1, "digits CNN conv32-conv32-fc64 with BatchNorm, seed 0"),
    "text_transformer_seed0": (TEXT, 0, 80, 0.003, "2-layer byte-level transformer on the bundled topic sentences"),
}
SNAPSHOT_MODEL = "mlp_narrow_seed0"
BATCH_SIZE = 64


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.inference_mode():
        logits = model(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(name: str, spec: dict, seed: int, epochs: int, lr: float, snapshot_dir: Path | None) -> tuple[nn.Module, dict]:
    dataset = "sentences" if spec["type"] == "transformer" else "digits"
    train_set, test_set = load_dataset(dataset, split="train"), load_dataset(dataset, split="test")
    torch.manual_seed(seed)
    model = build_model(spec).train()
    if spec["type"] == "transformer":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(train_set.n_samples / BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    history = []

    def snapshot(epoch: int) -> None:
        loss, acc = evaluate(model, test_set.x, test_set.y)
        history.append({"epoch": epoch, "test_loss": loss, "test_accuracy": acc})
        if snapshot_dir is not None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      snapshot_dir / f"{name}_epoch{epoch:02d}.safetensors",
                      metadata={"architecture": json.dumps(spec), "epoch": str(epoch), "name": f"{name} epoch {epoch}"})
        model.train()

    snapshot(0)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(train_set.n_samples, generator=gen)
        for start in range(0, train_set.n_samples, BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            loss = nn.functional.cross_entropy(model(train_set.x[idx]), train_set.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        snapshot(epoch)
    model.eval()
    train_loss, train_acc = evaluate(model, train_set.x, train_set.y)
    test_loss, test_acc = evaluate(model, test_set.x, test_set.y)
    facts = {"seed": seed, "epochs": epochs, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
             "test_loss": test_loss, "test_accuracy": test_acc, "history": history}
    return model, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="train only these models")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name, (spec, seed, epochs, lr, description) in MODELS.items():
        if args.only and name not in args.only:
            continue
        snap_dir = None
        if name == SNAPSHOT_MODEL:
            snap_dir = args.out / "snapshots"
            snap_dir.mkdir(parents=True, exist_ok=True)
        model, facts = train(name, spec, seed, epochs, lr, snap_dir)
        metadata = {"architecture": json.dumps(spec), "name": name, "description": description,
                    "dataset": "sentences" if spec["type"] == "transformer" else "digits", "test_accuracy": f"{facts['test_accuracy']:.4f}", "seed": str(seed)}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / f"{name}.safetensors", metadata=metadata)
        manifest[name] = {"file": f"{name}.safetensors", "description": description, "architecture": spec,
                          "dataset": metadata["dataset"],
                          **{k: v for k, v in facts.items() if k != "history"}}
        if snap_dir is not None:
            manifest[name]["snapshots"] = facts["history"]
        print(f"{name}: test accuracy {facts['test_accuracy']:.4f}, test loss {facts['test_loss']:.4f}")  # noqa: T201
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
