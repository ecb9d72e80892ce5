"""Command line: ``workbench app | layers | extract | analyze``.

Bad arguments print one line to stderr and exit with code 2; errors in the input files
(a ``WorkbenchError``) print their message and exit with code 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _data_arg(value: str):
    from workbench import load_dataset

    name, _, split = value.partition(":")
    return load_dataset(name, split=split) if split else load_dataset(value)


def cmd_app(args: argparse.Namespace) -> int:
    app = ROOT / "app.py"
    if not app.exists():
        print(f"workbench app: the app needs a source checkout; {app} was not found.", file=sys.stderr)  # noqa: T201
        return 1
    env = dict(os.environ, TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
    if args.no_trust:
        env["WORKBENCH_NO_TRUST"] = "1"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def cmd_layers(args: argparse.Namespace) -> int:
    from workbench import layer_info, load_model

    model = load_model(args.model, architecture=args.architecture)
    print(f"{model.name}: {model.n_parameters:,} parameters, sha256 {model.sha256[:16]}")  # noqa: T201
    for info in layer_info(model):
        shape = "not run" if info.output_shape is None else str(tuple(info.output_shape))
        print(f"{'  ' * info.depth}{info.name:<{40 - 2 * info.depth}} {info.type:<24} {shape}")  # noqa: T201
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workbench import extract, load_model

    model = load_model(args.model, architecture=args.architecture)
    data = _data_arg(args.data)
    with tqdm(total=data.n_samples, unit="sample", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        acts = extract(model, data, args.layers, pooling=args.pooling, batch_size=args.batch_size,
                       device=args.device, progress=progress)
    out = acts.save_npz(args.out)
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in acts.items()))  # noqa: T201
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Representation Workbench: inspect and compare trained networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("app", help="start the web app", description="Start the Streamlit app on the bundled sample models.")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--no-trust", action="store_true",
                   help="never offer the 'I trust this file' switch: full pickles are refused outright")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("layers", help="print the layer tree of a model with output shapes",
                       description="Print named_modules() in forward order with output shapes on a probe batch.")
    p.add_argument("model", help="checkpoint: .safetensors, state dict .pt/.pth/.bin with --architecture, HF folder or .zip")
    p.add_argument("--architecture", help="architecture spec as JSON, for state dicts without one")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("extract", help="extract pooled layer activations to an .npz file",
                       description="Run a model over a dataset and save each layer's pooled activations.")
    p.add_argument("model", help="checkpoint file or folder")
    p.add_argument("--data", required=True, help="bundled dataset (digits, digits:train, blobs, sentences) or a .npz/.csv/.pt file")
    p.add_argument("--layers", nargs="+", required=True, help="layer names (see `workbench layers MODEL`)")
    p.add_argument("--out", required=True, type=Path, help="output .npz (arrays 'layer/<name>' and 'labels')")
    p.add_argument("--pooling", default="mean", choices=["mean", "flatten", "max", "cls", "last"],
                   help="how conv maps and token sequences become vectors (default mean)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--architecture", help="architecture spec as JSON, for state dicts without one")
    p.set_defaults(func=cmd_extract)

    try:
        from workbench.report.cli import add_report_commands
    except ImportError:
        pass
    else:
        add_report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
