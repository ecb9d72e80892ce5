"""The command line, run as a user would in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MLP0 = str(ROOT / "sample_models" / "mlp_seed0.safetensors")
MLP1 = str(ROOT / "sample_models" / "mlp_seed1.safetensors")


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "WORKBENCH_CACHE_DIR": str(cache), "HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


@pytest.mark.parametrize("command", [[], ["app"], ["layers"], ["extract"], ["analyze"]])
def test_help(command, tmp_path):
    out = run(*command, "--help", cache=tmp_path)
    assert out.returncode == 0
    assert "usage: workbench" in out.stdout


def test_layers(tmp_path):
    out = run("layers", str(ROOT / "sample_models" / "cnn_seed0.safetensors"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "conv1" in out.stdout and "(32, 8, 8)" in out.stdout and "12,458 parameters" in out.stdout


def test_extract_writes_npz(tmp_path):
    target = tmp_path / "acts.npz"
    out = run("extract", MLP0, "--data", "digits:train", "--layers", "fc1", "relu2", "--out", str(target), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    with np.load(target, allow_pickle=False) as f:
        assert f["layer/fc1"].shape == (1347, 512) and f["labels"].shape == (1347,)
        meta = json.loads(str(f["meta"]))
    assert meta["model"] == "mlp_seed0" and meta["dataset"] == "digits (train)" and meta["pooling"] == "mean"
    assert meta["layers"] == ["fc1", "relu2"] and len(meta["dataset_sha256"]) == 64


def test_analyze_writes_report(tmp_path):
    out_dir = tmp_path / "report"
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "activations,similarity,activations",
              "--param", "similarity.measure=procrustes_distance", "--layers", "fc1", "relu1", "out", "--pooling", "max",
              "--out", str(out_dir), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads((out_dir / "report.json").read_text())
    assert [s["title"] for s in doc["sections"]] == ["Activation statistics", "Representational similarity (layer x layer)"]
    assert doc["sections"][1]["results"][0]["measure"] == "procrustes_distance"
    assert [m["name"] for m in doc["sections"][1]["models"]] == ["mlp_seed0", "mlp_seed1"]
    assert doc["sections"][1]["dataset"]["name"] == "digits (test)"
    assert "workbench analyze --model-a" in doc["header"]["command"]
    assert doc["header"]["extraction"] == {"pooling": "max", "layers": {"A": ["fc1", "relu1", "out"], "B": ["fc1", "relu1", "out"]}}
    html = (out_dir / "report.html").read_text()
    assert "Plotly.newPlot" in html and "run_analysis(" in html
    assert "pooling &#39;max&#39; · layers of A: fc1, relu1, out · layers of B: fc1, relu1, out" in html


def test_the_header_names_the_default_layers_each_model_gave(tmp_path):
    cnn = str(ROOT / "sample_models" / "cnn_seed0.safetensors")
    out = run("analyze", "--model-a", MLP0, "--model-b", cnn, "--data", "digits", "--analysis", "activations",
              "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    layers = doc["header"]["extraction"]["layers"]
    assert doc["header"]["extraction"]["pooling"] == "mean" and layers["A"] == ["fc1", "relu1", "fc2", "relu2", "out"]
    results = doc["sections"][0]["results"]  # the layers each model's statistics were computed on
    assert layers["B"][0] == "conv1" and [list(r["stats"]) for r in results] == [layers["A"], layers["B"]]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "simlarity", "--out", "x"], 2,
         "Unknown analysis 'simlarity'. Did you mean 'similarity'?"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "similarity", "--param", "bad", "--out", "x"], 2,
         "must look like ANALYSIS.KEY=VALUE"),
        (["extract", MLP0, "--data", "digits"], 2, "the following arguments are required: --layers, --out"),
        (["extract", MLP0, "--data", "digits", "--layers", "fc9", "--out", "x.npz"], 2, "Unknown layer 'fc9'"),
        (["extract", MLP0, "--data", "mnist", "--layers", "fc1", "--out", "x.npz"], 2,
         "error: No dataset named 'mnist': it is neither a bundled dataset (digits, blobs, sentences) nor an existing file."),
        (["analyze", "--model-a", MLP0, "--data", "nodata", "--analysis", "activations", "--out", "x"], 2,
         "error: No dataset named 'nodata': it is neither a bundled dataset"),
        (["analyze", "--model-a", MLP0, "--data", "sentences", "--analysis", "activations,probing", "--out", "x"], 2,
         "error: Model 'mlp_seed0' takes float features but dataset 'sentences (test)' holds int64 values; pick a matching dataset"),
        (["analyze", "--model-a", MLP0, "--model-b", str(ROOT / "sample_models" / "text_transformer_seed0.safetensors"),
          "--data", "digits", "--analysis", "activations", "--out", "x"], 2,
         "error: Model 'text_transformer_seed0' takes token ids (integers) but dataset 'digits (test)' holds float32 values"),
        (["extract", MLP0, "--data", "sentences", "--layers", "fc1", "--out", "x.npz"], 2,
         "error: Model 'mlp_seed0' takes float features but dataset 'sentences (test)' holds int64 values"),
        (["extract", MLP0, "--data", "digits", "--layers", "fc1", "--out", "acts.txt"], 2,
         "error: --out acts.txt is not an .npz file name; give a file name ending in .npz."),
        (["extract", MLP0, "--data", "README.md", "--layers", "fc1", "--out", "x.npz"], 1,
         "Cannot read dataset file 'README.md'"),
        (["layers", "README.md"], 1, "Cannot load 'README.md' as a model"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "similarity", "--out", "x"], 2,
         "compares two models; pass model_b"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["layers", MLP0, "--architecture", "{bad json"], 2,
         "--architecture is not valid JSON (Expecting property name enclosed in double quotes at position 1); give the spec"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "activations", "--param", "probing.cv=3",
          "--out", "x"], 2, "sets a parameter of 'probing', which is not among the analyses run (activations)"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", " ", "--out", "x"], 2,
         "--analysis names no analysis; give one or more of activations, similarity"),
        (["layers", "nofile.safetensors"], 2,
         "error: The model path nofile.safetensors: no such file or folder; give the path of a checkpoint"),
        (["extract", "nofile.safetensors", "--data", "digits", "--layers", "fc1", "--out", "x.npz"], 2,
         "error: The model path nofile.safetensors: no such file or folder; give the path of a checkpoint"),
        (["analyze", "--model-a", MLP0, "--model-b", "nofile.pt", "--data", "digits", "--analysis", "similarity", "--out", "x"],
         2, "error: --model-b nofile.pt: no such file or folder"),
        (["layers", MLP0, "--architecture", '{"type": "foo"}'], 2,
         "error: --architecture: Unknown architecture type 'foo'; supported types: mlp, cnn"),
        (["layers", MLP0, "--architecture", '{"type": "mlp", "sizes": [64, -3, 10]}'], 2,
         "error: --architecture: The 'sizes' entry of the 'mlp' spec must be a list of at least 2 ints"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "activations", "--out", "/proc/report"], 2,
         "error: --out /proc/report cannot be created: /proc is not a writable folder; choose another location."),
        (["analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "similarity", "--param",
          "similarity.measure=rbf_cka", "--param", "similarity.sigma=1e-300", "--out", "x"], 2,
         "error: The 'sigma' parameter (--param similarity.sigma) must be a number in [0.01, 100.0]"),
        (["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "probing", "--param", "probing.c=1e-300",
          "--out", "x"], 2, "error: The 'c' parameter (--param probing.c) must be a number in [1e-06, 1e+08]"),
    ],
)
def test_bad_arguments_one_line(args, code, message, tmp_path):
    out = run(*args, cache=tmp_path)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2


def test_a_pdf_that_cannot_be_printed_still_lists_the_files_written(tmp_path, monkeypatch, capsys):
    from workbench import cli
    from workbench.report import PdfUnavailableError
    from workbench.report import build as report_build

    def no_browser(*_args, **_kwargs):
        raise PdfUnavailableError("PDF export needs a headless Chromium; install one.")

    monkeypatch.setattr(report_build, "html_to_pdf", no_browser)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.main(["analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "activations", "--layers", "fc1",
                     "--pdf", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 1 and "PDF export needs a headless Chromium" in err
    assert f"wrote {tmp_path / 'r' / 'report.html'}" in out and f"wrote {tmp_path / 'r' / 'arrays.npz'}" in out


def test_extract_output_paths(tmp_path):
    target = tmp_path / "new" / "folder" / "acts"  # no suffix: numpy adds .npz, and the message says so
    out = run("extract", MLP0, "--data", "digits", "--layers", "fc1", "--out", str(target), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "new" / "folder" / "acts.npz").exists() and f"wrote {target}.npz: fc1 (450, 512)" in out.stdout
    out = run("extract", MLP0, "--data", "digits", "--layers", "fc1", "--out", str(tmp_path), cache=tmp_path)
    assert out.returncode == 2 and "is a folder; give a file name ending in .npz" in out.stderr
    assert "Traceback" not in out.stderr


def test_analyze_reads_state_dicts_with_their_architecture(tmp_path):
    import torch
    from safetensors.torch import load_file

    spec = '{"type": "mlp", "sizes": [64, 64, 64, 10], "activation": "relu"}'
    for i, seed in enumerate((0, 1)):
        state = load_file(str(ROOT / "sample_models" / f"mlp_narrow_seed{seed}.safetensors"))
        torch.save(state, tmp_path / f"sd{i}.pt")
    out = run("analyze", "--model-a", str(tmp_path / "sd0.pt"), "--model-b", str(tmp_path / "sd1.pt"), "--architecture", spec,
              "--data", "digits", "--analysis", "activations", "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [m["name"] for m in doc["header"]["models"]] == ["sd0", "sd1"]
    wide = str(ROOT / "sample_models" / "mlp_seed0.safetensors")  # B of another width carries its own spec, which wins
    out = run("analyze", "--model-a", str(tmp_path / "sd0.pt"), "--model-b", wide, "--architecture", spec,
              "--data", "digits", "--analysis", "activations", "--out", str(tmp_path / "r2"), cache=tmp_path)
    assert out.returncode == 0, out.stderr


def test_analyze_refuses_a_file_as_its_folder_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = run("analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "activations", "--out", str(afile), cache=tmp_path)
    assert out.returncode == 2 and "is a file; the report is written into a folder" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "activations").exists()
    taken = tmp_path / "taken"
    (taken / "report.json").mkdir(parents=True)  # a folder where the report writes a file: refused before the analyses run
    out = run("analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "activations", "--out", str(taken), cache=tmp_path)
    assert out.returncode == 2 and f"--out {taken} holds a folder named report.json where the report writes its own; " \
                                   "choose another folder." in out.stderr


def test_analyze_names_the_model_that_lacks_a_layer_and_takes_layers_of_b(tmp_path):
    cnn = str(ROOT / "sample_models" / "cnn_seed0.safetensors")
    args = ["analyze", "--model-a", MLP0, "--model-b", cnn, "--data", "digits", "--analysis", "similarity"]
    out = run(*args, "--layers", "fc2", "--out", str(tmp_path / "r1"), cache=tmp_path)
    assert out.returncode == 2 and "Model B ('cnn_seed0'): Unknown layer 'fc2'" in out.stderr
    assert "--layers-b" in out.stderr and "Traceback" not in out.stderr
    out = run(*args, "--layers", "fc2", "--layers-b", "conv1", "relu2", "--out", str(tmp_path / "r2"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r2" / "report.json").read_text())["sections"][0]["results"][0]
    assert result["layers_a"] == ["fc2"] and result["layers_b"] == ["conv1", "relu2"]


def test_analyze_help_lists_each_analysis_parameters(tmp_path):
    out = run("analyze", "--help", cache=tmp_path)
    assert "similarity: measure='linear_cka', debiased=False" in out.stdout
    assert "probing: probe='linear', cv=5" in out.stdout


def test_app_command_serves_the_app(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "WORKBENCH_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path), "WORKBENCH_WARM_UP": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "app", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        body = b""
        while time.time() < deadline and body != b"ok":
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    body = r.read().strip()
            except OSError:
                time.sleep(0.5)
        assert body == b"ok"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    deadline = time.time() + 20  # stopping the command stops the server: none is left serving the port
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
        except OSError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the server outlived the 'workbench app' process that started it")


def test_a_refused_pickle_prints_one_line_without_torch_s_warning(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": complex(1, 2)}, protocol=4))  # not torch.load's protocol 2: torch would warn
    out = run("layers", str(path), cache=tmp_path)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "UserWarning" not in out.stderr, out.stderr
    assert out.stderr.startswith("workbench layers: 'evil.pt' is a full pickle whose loading can run arbitrary code")


def test_data_of_the_right_size_but_another_shape_is_refused_before_any_work(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "x3d.npz"
    np.savez(data, x=rng.random((50, 8, 8)).astype("float32"), y=np.arange(50) % 10)  # 64 values per sample, as 8 x 8
    out = run("extract", "sample_models/mlp_seed0.safetensors", "--data", str(data), "--layers", "fc1",
              "--out", str(tmp_path / "acts.npz"), cache=tmp_path)
    assert out.returncode == 2, out.stderr
    assert ("Dataset 'x3d' holds samples of shape (8, 8) but model 'mlp_seed0' takes samples of shape (64,); flatten them "
            "(x.reshape(len(x), -1)) and load the dataset again.") in out.stderr
    assert not (tmp_path / "acts.npz").exists()


@pytest.mark.parametrize("extra, address, trusted", [([], "localhost", False),
                                                    (["--address", "0.0.0.0", "--trust-uploads"], "0.0.0.0", True)])
def test_app_serves_this_machine_and_refuses_pickles_unless_told_otherwise(monkeypatch, extra, address, trusted):
    from workbench import cli

    calls = []
    monkeypatch.setenv("WORKBENCH_TRUST_UPLOADS", "1")  # left over in the shell: only the flag turns the switch on
    monkeypatch.setattr(cli.os, "execve", lambda path, cmd, env: calls.append((path, cmd, env)))
    monkeypatch.setattr(cli.os, "chdir", lambda path: None)
    monkeypatch.setattr(cli, "_port_in_use", lambda port: False)
    assert cli.main(["app", "--port", "8765", *extra]) == 0
    path, cmd, env = calls[0]
    assert path == sys.executable and cmd[:4] == [sys.executable, "-m", "streamlit", "run"]  # the server replaces the process
    assert cmd[cmd.index("--server.address") + 1] == address
    assert (env.get("WORKBENCH_TRUST_UPLOADS") == "1") == trusted
    assert env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


def test_app_refuses_a_port_out_of_range_or_in_use(tmp_path):
    import socket

    out = run("app", "--port", "99999", cache=tmp_path)
    assert out.returncode == 2 and "'99999' is not a port; give a number from 1 to 65535" in out.stderr
    assert "Traceback" not in out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run("app", "--port", str(port), cache=tmp_path)
    assert out.returncode == 2 and f"Port {port} is in use" in out.stderr and "pick a free one with --port" in out.stderr


def test_analyze_refuses_an_analysis_the_model_does_not_suit_before_any_work(tmp_path):
    text = str(ROOT / "sample_models" / "text_transformer_seed0.safetensors")
    out = run("analyze", "--model-a", text, "--data", "sentences", "--analysis", "activations,degeneracy",
              "--out", str(tmp_path / "report"), cache=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "error: Degeneracy of 'text_transformer_seed0' needs a model built as torch.nn.Sequential" in out.stderr
    assert not (tmp_path / "report").exists() and not any(tmp_path.glob("*/meta.json"))  # nothing extracted or written


def test_a_spec_nested_too_deeply_is_a_bad_argument(tmp_path):
    out = run("layers", MLP0, "--architecture", "[" * 3000 + "]" * 3000, cache=tmp_path)
    assert out.returncode == 2 and "--architecture is nested too deeply to be an architecture spec" in out.stderr


def test_extract_overwrites_its_own_output(tmp_path):
    target = tmp_path / "acts.npz"
    for layer in ("fc1", "relu2"):  # the same command twice, then another layer into the same file
        out = run("extract", MLP0, "--data", "digits", "--layers", layer, "--out", str(target), cache=tmp_path)
        assert out.returncode == 0, out.stderr
    with np.load(target) as saved:
        assert [k for k in saved.files if k.startswith("layer/")] == ["layer/relu2"]


def test_an_output_that_cannot_be_written_is_one_sentence(tmp_path):
    out = run("extract", MLP0, "--data", "digits", "--layers", "fc1", "--out", "/proc/acts.npz", cache=tmp_path)
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr
    assert "/proc" in out.stderr and "choose another location" in out.stderr


def test_python_spellings_of_booleans_and_the_version(tmp_path):
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "similarity",
              "--layers", "fc1", "--param", "similarity.debiased=True", "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r" / "report.json").read_text())["sections"][0]["results"][0]
    assert result["params"]["debiased"] is True
    out = run("--version", cache=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("workbench ")


def test_relative_pairs_the_layers_of_a_and_b_by_position(tmp_path):
    args = ["analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "relative"]
    out = run(*args, "--layers", "fc1", "relu2", "--layers-b", "relu2", "fc1", "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r" / "report.json").read_text())["sections"][0]["results"][0]
    assert result["layers_a"] == ["fc1", "relu2"] and result["layers_b"] == ["relu2", "fc1"]
    out = run(*args, "--layers", "fc1", "relu2", "--layers-b", "fc1", "--out", str(tmp_path / "r2"), cache=tmp_path)
    assert out.returncode == 2 and "pair model A's layers with model B's by position; got 2 layer(s) of A and 1 of B" in out.stderr


def test_a_bad_parameter_value_stops_analyze_before_any_work(tmp_path):
    out = run("analyze", "--model-a", "sample_models/mlp_narrow_seed0.safetensors", "--model-b",
              "sample_models/mlp_narrow_seed1.safetensors", "--data", "digits:test", "--analysis", "probing,similarity",
              "--param", "similarity.measure=bogus", "--out", str(tmp_path / "r"), cache=tmp_path / "cache")
    assert out.returncode == 2
    assert "The 'measure' parameter of the 'similarity' analysis must be one of" in out.stderr and "Got 'bogus'." in out.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("meta.json"))  # nothing was extracted
    assert not (tmp_path / "r").exists()


def test_data_files_whose_path_holds_a_colon_are_read_as_files(tmp_path):
    from workbench.cli import _data_arg
    from workbench.errors import ParameterError

    folder = tmp_path / "run:2"  # a timestamped or drive-letter path: not a bundled dataset's split
    folder.mkdir()
    x = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    np.savez(folder / "data:v1.npz", x=x, y=np.arange(20) % 3)
    data = _data_arg(str(folder / "data:v1.npz"))
    assert data.n_samples == 20 and np.allclose(data.x.numpy(), x)
    assert _data_arg("digits:train").n_samples > _data_arg("digits").n_samples  # the split of a bundled dataset
    with pytest.raises(ParameterError, match="neither a bundled dataset"):
        _data_arg(str(folder / "missing:v1.npz"))


@pytest.mark.parametrize(
    ("analysis", "n", "y", "message"),
    [
        ("similarity", 2, "classes", "The 'similarity' analysis compares samples, and dataset 'few' has 2; use a dataset of at least 3"),
        ("mode_connectivity", 30, "float", "mode_connectivity: dataset 'few' (dataset) has continuous targets, but loss and "
                                           "accuracy need integer class labels."),
        ("separability", 30, "float", "Separability compares classes, and dataset 'few' has continuous targets; pick a dataset"),
        ("separability", 30, "rare", "The 'separability' analysis splits each class into cv=5 folds, and class 1 of dataset "
                                     "'few' has 3 samples; lower cv to 3 (--param separability.cv=3), turn the probe off "
                                     "(--param separability.probe=false) or use more samples of each class."),
        ("probing", 30, "rare", "The 'probing' analysis splits each class into cv=5 folds, and class 1 of dataset 'few' has 3 "
                                "samples; lower cv to 3 (--param probing.cv=3) or use more samples of each class."),
        ("intrinsic_dimension", 12, "classes", "The 'intrinsic_dimension' analysis estimates dimension from each sample's "
                                               "nearest neighbours, and dataset 'few' has 12 samples; use a dataset of at least 20"),
        ("embedding", 3, "classes", "The 'embedding' analysis places samples among their neighbours, and dataset 'few' has "
                                    "3 samples; use a dataset of at least 4 samples."),
    ],
    ids=["too-few-samples", "continuous-targets-for-losses", "continuous-targets-for-classes", "a-class-rarer-than-the-separability-folds",
         "a-class-rarer-than-the-probing-folds", "too-few-samples-for-intrinsic-dimension", "too-few-samples-for-an-embedding"],
)
def test_data_that_does_not_suit_an_analysis_is_a_bad_argument_before_any_work(analysis, n, y, message, tmp_path):
    rng = np.random.default_rng(0)
    labels = {"float": rng.random(n), "classes": np.arange(n) % 2, "rare": (np.arange(n) < 3).astype(int)}[y]
    np.savez(tmp_path / "few.npz", x=rng.random((n, 64), dtype=np.float32), y=labels)
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", str(tmp_path / "few.npz"), "--analysis",
              f"activations,{analysis}", "--out", str(tmp_path / "report"), cache=tmp_path)
    assert out.returncode == 2 and f"workbench analyze: error: {message}" in out.stderr, out.stderr
    assert not (tmp_path / "report").exists()  # refused before the activation statistics ran



def test_the_report_command_names_files_by_absolute_paths(tmp_path, monkeypatch):
    from workbench.cli import _absolute_paths

    monkeypatch.chdir(ROOT)
    argv = ["--model-a", "sample_models/mlp_seed0.safetensors", "--model-b=sample_models/mlp_seed1.safetensors",
            "--data", "digits", "--analysis", "activations", "--out", "rel/out"]
    assert _absolute_paths(argv) == ["--model-a", str(ROOT / "sample_models" / "mlp_seed0.safetensors"),
                                     f"--model-b={ROOT / 'sample_models' / 'mlp_seed1.safetensors'}", "--data", "digits",
                                     "--analysis", "activations", "--out", str(ROOT / "rel" / "out")]


def test_a_parameter_left_at_its_default_is_named_as_its_option(tmp_path):
    data = tmp_path / "few.npz"  # 3 samples with continuous targets: at most 3 folds, where probing asks for 5 by default
    np.savez(data, x=np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32), y=np.array([0.1, 0.5, 0.9]))
    out = run("analyze", "--model-a", MLP0, "--data", str(data), "--analysis", "probing", "--out", str(tmp_path / "r"),
              cache=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "The 'cv' parameter (--param probing.cv, left at its default 5) must be an int in [2, 3]. Got 5." in out.stderr, out.stderr


def test_named_layers_that_give_no_activations_are_refused_before_any_work(tmp_path):
    text = str(ROOT / "sample_models" / "text_transformer_seed0.safetensors")
    # MultiheadAttention applies its out_proj's weights itself: the module is never called
    out = run("analyze", "--model-a", text, "--data", "sentences", "--analysis", "activations", "--layers", "norm",
              "layers.0.self_attn.out_proj", "--out", str(tmp_path / "report"), cache=tmp_path)
    assert out.returncode == 2, out.stderr
    assert ("workbench analyze: error: Model A ('text_transformer_seed0'): layer 'layers.0.self_attn.out_proj' gives no "
            "activations per sample (not run by the forward pass, or one row for the whole batch); pick layers that "
            "list_layers (or 'workbench layers') shows with an output shape.") in out.stderr
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "activations,similarity",
              "--layers", "fc1", "--layers-b", "fc9", "--out", str(tmp_path / "report"), cache=tmp_path)
    assert out.returncode == 2 and "error: Model B ('mlp_seed1'): Unknown layer 'fc9'. Did you mean 'fc2'?" in out.stderr, out.stderr
    assert not (tmp_path / "report").exists()


def test_a_mode_connectivity_report_carries_the_caveats_the_page_shows(tmp_path):
    from workbench import load_dataset

    digits = load_dataset("digits")
    np.savez(tmp_path / "mine.npz", x=digits.x[:60].numpy(), y=digits.y[:60].numpy())  # no train split to fit on
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", str(tmp_path / "mine.npz"), "--analysis",
              "mode_connectivity", "--param", "mode_connectivity.n_points=5", "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    notes = json.loads((tmp_path / "r" / "report.json").read_text())["sections"][0]["notes"]
    assert notes.startswith("The barriers of activation matching, weight matching + REPAIR are in-sample: the matching and "
                            "statistics they use were fitted on the same 60 samples they are evaluated on, so they are "
                            "optimistic. To avoid it, evaluate on held-out data: pass training data as train_dataset=")
    assert "in-sample" in (tmp_path / "r" / "report.html").read_text()
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP1, "--data", "digits", "--analysis", "mode_connectivity",
              "--param", "mode_connectivity.n_points=5", "--out", str(tmp_path / "d"), cache=tmp_path)
    assert json.loads((tmp_path / "d" / "report.json").read_text())["sections"][0]["notes"] == ""  # fitted on the train split


def test_topology_of_one_model_compares_its_layers_with_each_other(tmp_path):
    out = run("analyze", "--model-a", MLP0, "--data", "digits", "--analysis", "topology", "--layers", "relu1", "relu2", "out",
              "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    section = json.loads((tmp_path / "r" / "report.json").read_text())["sections"][0]
    distances = section["summary"]
    assert distances["closest layers"].count(" – ") == 1 and "(A)" not in distances["closest layers"]  # distinct pairs of A
    assert "model_b = None" in section["snippet"]


def test_mode_connectivity_of_a_model_with_itself_is_refused_before_any_work(tmp_path):
    out = run("analyze", "--model-a", MLP0, "--model-b", MLP0, "--data", "digits", "--analysis", "mode_connectivity",
              "--out", str(tmp_path / "r"), cache=tmp_path)
    assert out.returncode == 2 and ("error: Model A ('mlp_seed0') and model B ('mlp_seed0') are the same network (weights "
                                    "sha256 a074982042bd), so the path between them is one point and every barrier is 0; "
                                    "pick two trained models, such as two seeds.") in out.stderr, out.stderr
