"""Opening a trusted full pickle in a separate process.

A full pickle runs code when it is loaded. With ``load_model(..., trust_remote_code=True,
isolate=True)`` (what the app does) that code runs in a child process, never in the caller's:
the child unpickles the file and hands back only data, a safetensors file with the weights and,
for a module built from ``nn.Sequential`` and stock ``torch.nn`` layers, a ``torch.nn``
architecture spec (see :func:`workbench.models.architectures.describe_module`). A module with its
own code cannot come back that way and is refused with a message; from Python, load it with
``trust_remote_code=True`` alone.

The child is ``python -m workbench.models.isolated SRC OUT LABEL``: exit status 0 with ``OUT`` written,
:data:`REFUSED` with the reason as the last line of stderr, anything else a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REFUSED = 3
TIMEOUT_S = 300


class ChildRefused(Exception):
    """The child opened the file but what it holds cannot come back as weights and a spec."""


class ChildFailed(Exception):
    """The child could not open the file (or did not finish)."""


def open_in_subprocess(data: bytes, label: str, timeout: float = TIMEOUT_S) -> bytes:
    """Unpickle ``data`` in a child process; return the safetensors bytes it wrote.

    Raises :class:`ChildRefused` or :class:`ChildFailed` with the child's one-line reason."""
    with tempfile.TemporaryDirectory(prefix="workbench-trusted-") as tmp:
        src, out = Path(tmp) / "checkpoint", Path(tmp) / "weights.safetensors"
        src.write_bytes(data)
        env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"}
        package_root = str(Path(__file__).resolve().parents[2])  # the child imports this workbench, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.run([sys.executable, "-m", "workbench.models.isolated", str(src), str(out), label],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"it did not finish within {timeout:.0f} s") from None
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1].removeprefix("workbench: ") if lines else f"exit status {proc.returncode}"
        if proc.returncode == REFUSED:
            raise ChildRefused(reason)
        if proc.returncode != 0 or not out.exists():
            raise ChildFailed(reason[:300])
        return out.read_bytes()


def _child(src: str, out: str, label: str) -> int:
    from safetensors.torch import save_file
    from torch import nn

    from workbench.errors import WorkbenchError
    from workbench.models.architectures import describe_module
    from workbench.models.loading import find_state_dict, unpickle_trusted

    obj = unpickle_trusted(Path(src).read_bytes())
    metadata: dict[str, str] = {}
    if isinstance(obj, nn.Module):
        try:
            spec = describe_module(obj)
        except WorkbenchError as exc:
            print(f"workbench: {str(exc).rstrip('.')}", file=sys.stderr)
            return REFUSED
        state = obj.state_dict()
        metadata = {"architecture": json.dumps(spec), "pickled_class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    else:
        try:
            state = find_state_dict(obj, label)
        except WorkbenchError as exc:
            print(f"workbench: {exc}", file=sys.stderr)
            return REFUSED
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, out, metadata=metadata)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m workbench.models.isolated SRC OUT LABEL", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(_child(*sys.argv[1:]))
    except Exception as exc:  # the parent shows the reason; the traceback stays in the child
        print(f"workbench: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}", file=sys.stderr)
        sys.exit(1)
