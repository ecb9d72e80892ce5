"""Command line: ``workbench app | layers | extract | analyze``.

Bad arguments print one line to stderr and exit with code 2: options argparse refuses, a
``ParameterError``, an unknown layer, a model path or ``--data`` that names nothing that exists, an
architecture spec that does not fit its checkpoint, an output that cannot be created, and models or data
that do not suit each other or an analysis (found before any work). Files that cannot be read or written,
and data on which a measure turns out undefined while it runs (any other ``WorkbenchError``), print their
message and exit with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.errors import ParameterError, UnknownLayerError, WorkbenchError

ROOT = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


PATH_OPTIONS = ("--model-a", "--model-b", "--data", "--out")


def _absolute_paths(argv: list[str]) -> list[str]:
    """``argv`` with the files and folders it names made absolute, so that the report's command runs from any folder
    (a built-in dataset name, such as ``digits``, stays as it is)."""
    out, previous = [], ""
    for arg in argv:
        option, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if eq and option in PATH_OPTIONS:
            arg = f"{option}={_absolute(option, value)}"
        elif previous in PATH_OPTIONS:
            arg = _absolute(previous, arg)
        out.append(arg)
        previous = arg if arg.startswith("--") and "=" not in arg else ""
    return out


def _absolute(option: str, value: str) -> str:
    path = Path(value)
    return str(path.absolute()) if option == "--out" or path.exists() else value


def _check_output(path: Path, *, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written (missing folders are created on saving)."""

    if folder and path.exists() and not path.is_dir():
        raise ParameterError(f"--out {path} is a file; the report is written into a folder: give a folder path.")
    if folder and path.is_dir():
        from workbench.report.build import REPORT_FILES

        taken = [name for name in REPORT_FILES if (path / name).is_dir()] + (
            ["figures"] if (path / "figures").exists() and not (path / "figures").is_dir() else [])
        if taken:
            raise ParameterError(f"--out {path} holds {'a folder' if taken[0] != 'figures' else 'a file'} named {taken[0]} "
                                 "where the report writes its own; choose another folder.")
    if not folder and path.is_dir():
        raise ParameterError(f"--out {path} is a folder; give a file name ending in .npz.")
    if not folder and path.is_file():  # overwritten
        if not os.access(path, os.W_OK):
            raise ParameterError(f"--out {path} exists and cannot be overwritten; choose another location.")
        return
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _can_create_in(existing):
        raise ParameterError(f"--out {path} cannot be created: {existing} is not a writable folder; choose another location.")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits do not tell for /proc or a read-only mount)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _model_arg(path: str, flag: str, architecture: str | None = None, architecture_flag: str = "--architecture") -> Any:
    """The model at ``path``: a path that does not exist, or a spec typed on the command line that does not fit the
    checkpoint, is a bad argument."""
    from workbench import load_model
    from workbench.errors import ArchitectureError

    if not os.path.lexists(path):
        where = f"{flag} {path}" if flag.startswith("-") else f"The {flag} path {path}"  # a positional argument has no flag
        raise ParameterError(f"{where}: no such file or folder; give the path of a checkpoint (.safetensors, .pt, "
                             "a Hugging Face folder or .zip).")
    try:
        return load_model(path, architecture=architecture)
    except ArchitectureError as exc:
        if architecture is None:
            raise
        raise ParameterError(f"{architecture_flag}: {exc}") from None


def _data_arg(value: str):
    """The dataset ``--data`` names; a name that is neither a bundled dataset nor an existing file is a bad argument."""
    from workbench import load_dataset
    from workbench.data import BUILTIN_DATASETS
    from workbench.errors import DataError

    name, _, split = value.partition(":")  # a bundled dataset's split (digits:train); a file path keeps its colons
    try:
        if split and name in BUILTIN_DATASETS and not os.path.lexists(value):
            return load_dataset(name, split=split)
        return load_dataset(value)
    except DataError as exc:
        if name not in BUILTIN_DATASETS and not os.path.lexists(value):
            raise ParameterError(str(exc)) from None
        raise


def _check_fits(models: Sequence[Any], data: Any) -> None:
    """Refuse, before any work, a dataset whose samples a model cannot take (tokens for a model of float features,
    another number of features): a bad argument, like an analysis that does not suit the models."""
    from workbench.activations.extract import check_inputs

    for model in models:
        if model is None:
            continue
        try:
            check_inputs(model, data)
        except WorkbenchError as exc:
            raise ParameterError(str(exc)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give a number from 1 to 65535")
    return port


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def cmd_app(args: argparse.Namespace) -> int:
    app = ROOT / "app.py"
    if not app.exists():
        print(f"workbench app: the app needs a source checkout; {app} was not found.", file=sys.stderr)  # noqa: T201
        return 1
    if _port_in_use(args.port):
        raise ParameterError(f"Port {args.port} is in use (another app or server listens on it); pick a free one with --port.")
    env = dict(os.environ, TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
    env.pop("WORKBENCH_TRUST_UPLOADS", None)
    if args.trust_uploads:
        env["WORKBENCH_TRUST_UPLOADS"] = "1"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.address, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    os.chdir(ROOT)
    # the server replaces this process (no child left behind when it is stopped with a signal)
    os.execve(sys.executable, cmd, env)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from workbench import layer_info

    model = _model_arg(args.model, "model", args.architecture)
    print(f"{model.name}: {model.n_parameters:,} parameters, sha256 {model.sha256[:16]}")  # noqa: T201
    infos = layer_info(model)
    name_width = max([2 * i.depth + len(i.name) for i in infos] + [38]) + 2  # columns line up for long paths too
    type_width = max([len(i.type) for i in infos] + [22]) + 2
    for info in infos:
        shape = "not run" if info.output_shape is None else str(tuple(info.output_shape))
        print(f"{'  ' * info.depth}{info.name:<{name_width - 2 * info.depth}}{info.type:<{type_width}}{shape}")  # noqa: T201
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workbench import extract

    _check_output(args.out, folder=False)
    if args.out.suffix not in ("", ".npz"):
        raise ParameterError(f"--out {args.out} is not an .npz file name; give a file name ending in .npz.")
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")  # numpy's own rule
    _check_output(out, folder=False)
    model = _model_arg(args.model, "model", args.architecture)
    data = _data_arg(args.data)
    _check_fits([model], data)
    with tqdm(total=data.n_samples, unit="sample", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        acts = extract(model, data, args.layers, pooling=args.pooling, batch_size=args.batch_size,
                       device=args.device, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out = acts.save_npz(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in acts.items()))  # noqa: T201
    return 0


def build_parser() -> argparse.ArgumentParser:
    from workbench import __version__

    parser = _Parser(prog="workbench", description="Representation Workbench: inspect and compare trained networks.")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("app", help="start the web app", description="Start the Streamlit app on the bundled sample models.")
    p.add_argument("--port", type=_port, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--address", default="localhost",
                   help="address to serve on (default localhost: this machine only; 0.0.0.0 serves every network "
                        "interface, for anyone who can reach the machine)")
    p.add_argument("--trust-uploads", action="store_true",
                   help="offer the 'I trust this file' switch, which opens an uploaded full pickle and so runs its code "
                        "with this server's rights: only on a server no one else can reach (default: full pickles are "
                        "refused)")
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
    p.add_argument("--out", required=True, type=Path, help="output .npz (arrays 'layer/<name>', 'labels' and 'meta', a JSON string naming model, dataset and pooling)")
    p.add_argument("--pooling", default="mean", choices=["mean", "flatten", "max", "cls", "last"],
                   help="how conv maps and token sequences become vectors (default mean)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--architecture", help="architecture spec as JSON, for state dicts without one")
    p.set_defaults(func=cmd_extract)

    from workbench.registry import ANALYSES

    names = ", ".join(a.name for a in ANALYSES)
    params = "\n".join(f"  {a.name}: " + (", ".join(f"{k}={v!r}" for k, v in a.params.items()) or "(none)") for a in ANALYSES)
    p = sub.add_parser("analyze", help="run analyses and write a report", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"Run registered analyses ({names}) and write report.html, report.json and arrays.npz.",
                       epilog=f"parameters of each analysis and their defaults (set with --param ANALYSIS.KEY=VALUE):\n{params}")
    p.add_argument("--model-a", required=True, help="checkpoint of model A")
    p.add_argument("--model-b", help="checkpoint of model B (needed by two-model analyses)")
    p.add_argument("--architecture", help="architecture spec of model A as JSON, for a state dict without one")
    p.add_argument("--architecture-b", help="architecture spec of model B as JSON (default: the spec in its file, else --architecture)")
    p.add_argument("--data", required=True, help="bundled dataset (digits, digits:train, blobs, sentences) or a .npz/.csv/.pt file")
    p.add_argument("--analysis", required=True, help=f"comma-separated analyses: {names}")
    p.add_argument("--layers", nargs="+", help="layers to analyse (default: every leaf layer that runs, reshapes and dropout left out, at most 12)")
    p.add_argument("--layers-b", nargs="+", help="layers of model B, when its layer names differ (default: --layers)")
    p.add_argument("--pooling", default="mean", choices=["mean", "flatten", "max", "cls", "last"], help="pooling rule (default mean)")
    p.add_argument("--param", action="append", default=[], metavar="ANALYSIS.KEY=VALUE",
                   help="analysis parameter, e.g. similarity.measure=rbf_cka (JSON values; repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output folder for the report")
    p.add_argument("--title", default="Representation analysis", help="report title")
    p.add_argument("--pdf", action="store_true", help="also print report.pdf with headless Chromium")
    p.add_argument("--png", action="store_true", help="also draw every figure as figures/*.png (kaleido + Chromium)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=cmd_analyze)
    return parser


def _parse_params(items: list[str], analyses: list[str]) -> dict[str, dict[str, object]]:
    import json


    params: dict[str, dict[str, object]] = {a: {} for a in analyses}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot:
            raise ParameterError(f"--param {item!r} must look like ANALYSIS.KEY=VALUE with ANALYSIS one of {', '.join(analyses)}.")
        if name not in params:
            raise ParameterError(f"--param {item!r} sets a parameter of '{name}', which is not among the analyses run "
                                 f"({', '.join(analyses)}); add it to --analysis or drop the parameter.")
        try:
            params[name][param] = json.loads(raw)
        except json.JSONDecodeError:  # Python's spellings of the JSON constants, else the text itself
            params[name][param] = {"True": True, "False": False, "None": None}.get(raw, raw)
    return params


def _load_model_b(args: argparse.Namespace) -> Any:
    """Model B with --architecture-b, else with the spec its file carries, else (weights alone) with --architecture."""
    from workbench.errors import MissingArchitectureError

    if args.architecture_b is not None or args.architecture is None:
        return _model_arg(args.model_b, "--model-b", args.architecture_b, "--architecture-b")
    try:
        return _model_arg(args.model_b, "--model-b")
    except MissingArchitectureError:
        return _model_arg(args.model_b, "--model-b", args.architecture)


def cmd_analyze(args: argparse.Namespace) -> int:
    import shlex

    from tqdm import tqdm

    from workbench.registry import check_analysis, check_layers_run, get_analysis, run_analysis
    from workbench.report import PdfUnavailableError, StaticImageUnavailableError, build_report

    names = list(dict.fromkeys(n.strip() for n in args.analysis.split(",") if n.strip()))  # each analysis once
    if not names:
        from workbench.registry import ANALYSES

        raise ParameterError(f"--analysis names no analysis; give one or more of {', '.join(a.name for a in ANALYSES)}.")
    entries = [get_analysis(n) for n in names]  # bad arguments (exit code 2) before any work
    params = _parse_params(args.param, names)
    _check_output(args.out, folder=True)
    model_a = _model_arg(args.model_a, "--model-a", args.architecture)
    model_b = _load_model_b(args) if args.model_b else None
    data = _data_arg(args.data)
    _check_fits([model_a, model_b], data)
    if any(entry.inputs != "weights" for entry in entries) and args.layers:  # named layers of the analyses that read them
        check_layers_run(model_a, data, args.layers, "a")
        if model_b is not None:
            check_layers_run(model_b, data, args.layers_b or args.layers, "b", separate=bool(args.layers_b))
    for entry in entries:  # models or data that do not suit an analysis are a bad argument, found before any work
        try:
            check_analysis(entry.name, model_a=model_a, model_b=model_b, dataset=data, params=params[entry.name])
        except WorkbenchError as exc:
            raise ParameterError(_as_param_option(str(exc), entry, params[entry.name])) from None
    sections = []
    with tqdm(total=len(entries), unit="analysis", disable=None) as bar:
        for entry in entries:
            bar.set_description(entry.name)
            try:
                sections.append(run_analysis(entry.name, model_a=model_a, model_b=model_b, dataset=data, layers=args.layers,
                                             layers_b=args.layers_b, pooling=args.pooling, params=params[entry.name],
                                             device=args.device))
            except WorkbenchError as exc:
                raise type(exc)(_as_param_option(str(exc), entry, params[entry.name])) from exc
            bar.update(1)
    command = "workbench analyze " + " ".join(shlex.quote(a) for a in _absolute_paths(sys.argv[2:])) if sys.argv[1:2] == ["analyze"] else ""
    # each section records the pooling and layers it read; the header states them when the sections share them
    report = build_report(sections, title=args.title, models=[model_a, model_b], dataset=data, command=command)
    formats = ("html", "json", "npz") + (("pdf",) if args.pdf else ()) + (("png",) if args.png else ())
    try:
        files = report.save(args.out, formats)
    except (PdfUnavailableError, StaticImageUnavailableError):  # the other formats are written first: say so
        for name in ("report.html", "report.json", "arrays.npz"):
            if (args.out / name).exists():
                print(f"wrote {args.out / name}")  # noqa: T201
        raise
    for f in files.values():
        print(f"wrote {f}")  # noqa: T201
    return 0


def _as_param_option(message: str, entry: Any, given: dict[str, Any]) -> str:
    """``message`` with a library function's parameter named as the option that sets it: "The 'sigma' parameter of
    similarity_matrix" becomes "The 'sigma' parameter (--param similarity.sigma)", with its default where it was not given."""
    import re

    found = re.match(r"The '(\w+)' parameter of (?!the )[\w.]+", message)  # not "of the 'x' analysis": named already
    if found is None or found.group(1) not in entry.params:
        return message
    key = found.group(1)
    default = "" if key in given else f", left at its default {entry.params[key]!r}"
    return f"The '{key}' parameter (--param {entry.name}.{key}{default})" + message[found.end():]


def _check_spec_arguments(args: argparse.Namespace) -> None:
    """Architecture specs typed on the command line must be JSON: a bad one is a bad argument (exit code 2)."""
    import json

    for attr in ("architecture", "architecture_b"):
        text = getattr(args, attr, None)
        if text is None:
            continue
        try:
            json.loads(text)
        except RecursionError:
            flag = "--" + attr.replace("_", "-")
            raise ParameterError(f"{flag} is nested too deeply to be an architecture spec; give a spec such as "
                                 """'{"type": "mlp", "sizes": [64, 10]}'.""") from None
        except json.JSONDecodeError as exc:
            flag = "--" + attr.replace("_", "-")
            raise ParameterError(f"{flag} is not valid JSON ({exc.msg} at position {exc.pos}); give the spec as a JSON "
                                 """object, such as '{"type": "mlp", "sizes": [64, 10]}'.""") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_spec_arguments(args)
        return int(args.func(args) or 0)
    except (ParameterError, UnknownLayerError) as exc:  # a bad argument, like argparse's own
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except WorkbenchError as exc:
        print(f"workbench {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except OSError as exc:  # an output that cannot be written (a read-only or special folder)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"workbench {args.command}: could not write{where}: {exc.strerror or exc}; choose another location.",  # noqa: T201
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
