"""Activation extraction: hooks, pooling, cache, progress, and clear errors."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from workbench import extract, layer_info, list_layers, load_model
from workbench.activations import pool
from workbench.activations.capture import hooks_on
from workbench.data import make_dataset
from workbench.errors import DataError, ParameterError, UnknownLayerError
from workbench.models import wrap_module
from workbench.models.architectures import build_model


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    module = build_model({"type": "mlp", "sizes": [64, 32, 16, 10]})
    yield wrap_module(module, name="tiny", architecture={"type": "mlp", "sizes": [64, 32, 16, 10]})
    assert _hook_count(module) == 0, "a hook was left on the module"


def test_matches_manual_forward(mlp, digits_test):
    acts = extract(mlp, digits_test, ["fc1", "relu2", "out"], batch_size=100)
    m = mlp.module
    with torch.inference_mode():
        h1 = m.fc1(digits_test.x)
        expected_relu2 = torch.relu(m.fc2(torch.relu(h1)))
        out = m(digits_test.x)
    torch.testing.assert_close(acts["fc1"], h1)
    torch.testing.assert_close(acts["relu2"], expected_relu2)
    torch.testing.assert_close(acts["out"], out)
    assert acts.layers == ["fc1", "relu2", "out"]
    assert acts.n_samples == 450 and acts["fc1"].dtype == torch.float32
    assert acts.model_sha256 == mlp.sha256 and acts.dataset_sha256 == digits_test.sha256
    assert torch.equal(acts.labels, digits_test.y)


def test_batch_size_does_not_change_values(mlp, digits_test, tmp_path):
    a = extract(mlp, digits_test, ["fc2"], batch_size=7, cache_dir=tmp_path / "a")
    b = extract(mlp, digits_test, ["fc2"], batch_size=450, cache_dir=tmp_path / "b")
    torch.testing.assert_close(a["fc2"], b["fc2"])


def test_second_call_reads_cache(mlp, digits_test, tmp_path, monkeypatch):
    calls = []
    linear_forward = nn.Linear.forward

    def counted(self, x):  # a class-level wrapper: a hook would be part of the model's key
        if self is mlp.module.fc1:
            calls.append(1)
        return linear_forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    first = extract(mlp, digits_test, ["fc1"], batch_size=150, cache_dir=tmp_path)
    n_first = len(calls)
    second = extract(mlp, digits_test, ["fc1"], batch_size=150, cache_dir=tmp_path)
    monkeypatch.undo()
    assert n_first == 3 and len(calls) == 3, "the cached call ran the model again"
    torch.testing.assert_close(first["fc1"], second["fc1"])
    assert first.key == second.key
    assert len(list(tmp_path.iterdir())) == 1
    other_pooling = extract(mlp, digits_test, ["fc1"], pooling="max", cache_dir=tmp_path)
    assert other_pooling.key != first.key


def _damage(entry: Path, how: str) -> None:
    if how == "a file in its place":
        shutil.rmtree(entry)
        entry.write_text("x")
        return
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    files = meta["files"]
    if how == "swapped files":
        meta["files"] = dict(zip(files, reversed(list(files.values()))))
    elif how == "a layer dropped":
        meta["files"] = dict(list(files.items())[:1])
    elif how == "fewer rows":
        for name in files.values():
            np.save(entry / name, np.zeros((100, 5), np.float32))
    elif how == "other pooling":
        meta["pooling"] = "max"
    elif how == "an empty file":
        os.truncate(entry / next(iter(files.values())), 0)
    elif how == "meta.json deleted":
        meta_path.unlink()
        return
    elif how == "meta.json a list":
        meta = []
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["swapped files", "a layer dropped", "fewer rows", "other pooling", "an empty file",
                                 "meta.json deleted", "meta.json a list", "a file in its place"])
def test_a_damaged_cache_entry_is_extracted_again(mlp, digits_test, tmp_path, how):
    first = extract(mlp, digits_test, ["fc1", "out"], cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    want = {k: v.clone() for k, v in first.items()}
    del first
    _damage(entry, how)
    for _ in range(2):  # the entry is rebuilt, then read
        again = extract(mlp, digits_test, ["fc1", "out"], cache_dir=tmp_path)
        assert again.layers == ["fc1", "out"] and again.pooling == "mean"
        for layer, values in want.items():
            torch.testing.assert_close(again[layer], values)


def test_a_model_normalised_by_each_batch_is_cached_per_batch_size(tmp_path):
    from workbench.activations.extract import batch_dependent

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    x = torch.randn(16, 3, 6, 6)
    assert batch_dependent(net) and not batch_dependent(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    by_4 = extract(net, x, ["1"], batch_size=4, cache_dir=tmp_path)["1"].clone()
    by_16 = extract(net, x, ["1"], batch_size=16, cache_dir=tmp_path)["1"]
    with torch.inference_mode():
        expected = {b: torch.cat([net[:2](x[i:i + b]).mean((2, 3)) for i in range(0, 16, b)]) for b in (4, 16)}
    torch.testing.assert_close(by_4, expected[4])
    torch.testing.assert_close(by_16, expected[16])  # not the batch-4 entry
    assert (by_4 - by_16).abs().max() > 0.05


def test_activations_are_keyed_by_the_inputs_so_new_labels_reuse_them(mlp, digits_test, tmp_path):
    from workbench.data import make_dataset

    relabelled = make_dataset("relabelled", digits_test.x, (digits_test.y + 1) % 10)
    first = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)
    calls = []
    second = extract(mlp, relabelled, ["fc1"], cache_dir=tmp_path, progress=lambda d, t: calls.append(d))
    assert calls == [digits_test.n_samples]  # read from the cache: one call, at the end
    torch.testing.assert_close(second["fc1"], first["fc1"])
    assert torch.equal(second.labels, relabelled.y) and second.dataset_name == "relabelled"
    assert second.dataset_sha256 == relabelled.sha256 != first.dataset_sha256


def test_cached_arrays_are_read_only_on_disk(mlp, digits_test, tmp_path):
    acts = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)
    acts["fc1"][0, 0] = 1e6  # copy-on-write map: the file keeps its values
    again = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)
    assert float(again["fc1"][0, 0]) != 1e6


def test_progress_reports_every_batch(mlp, digits_test, tmp_path):
    seen = []
    extract(mlp, digits_test, ["out"], batch_size=200, progress=lambda d, t: seen.append((d, t)), cache_dir=tmp_path)
    assert seen == [(200, 450), (400, 450), (450, 450)]


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_removed_when_forward_raises(digits_test, tmp_path):
    module = nn.Sequential()
    module.add_module("fc1", nn.Linear(64, 8))
    module.add_module("boom", Boom())
    model = wrap_module(module, name="broken")
    with pytest.raises(DataError, match=r"Model 'broken' failed on a batch of dataset 'digits \(test\)'.*boom"):
        extract(model, digits_test, ["fc1"], cache_dir=tmp_path)
    assert _hook_count(module) == 0
    assert not any(tmp_path.iterdir()), "a partial cache entry was left behind"


def test_hooks_removed_after_nested_use(mlp, digits_test, tmp_path):
    inner = []

    def progress(done, total):
        if not inner:
            inner.append(extract(mlp, digits_test, ["fc2"], cache_dir=tmp_path / "inner"))

    outer = extract(mlp, digits_test, ["fc1"], batch_size=100, progress=progress, cache_dir=tmp_path / "outer")
    assert outer.layers == ["fc1"] and inner[0].layers == ["fc2"]
    assert _hook_count(mlp.module) == 0


def test_unknown_layer_suggests_and_lists(mlp, digits_test):
    with pytest.raises(UnknownLayerError, match=r"Unknown layer 'fc3'\. Did you mean 'fc[12]'\? Layers: fc1, relu1, fc2, relu2, out\."):
        extract(mlp, digits_test, ["fc3"])
    acts = extract(mlp, digits_test, ["fc1"])
    with pytest.raises(UnknownLayerError, match=r"Unknown layer 'fc'\..*Layers: fc1\."):
        acts["fc"]


def test_bad_parameters(mlp, digits_test):
    with pytest.raises(ParameterError, match=r"'pooling' parameter of extract must be one of 'mean', 'flatten'"):
        extract(mlp, digits_test, ["fc1"], pooling="median")
    with pytest.raises(ParameterError, match=r"'batch_size' parameter of extract must be a positive int\. Got 0"):
        extract(mlp, digits_test, ["fc1"], batch_size=0)
    with pytest.raises(ParameterError, match=r"Pick at least one layer"):
        extract(mlp, digits_test, [])
    with pytest.raises(ParameterError, match=r"Device 'cuda' was requested but CUDA is not available|cuda"):
        if torch.cuda.is_available():
            raise ParameterError("cuda")
        extract(mlp, digits_test, ["fc1"], device="cuda")


def test_a_dataset_name_instead_of_a_dataset(mlp):
    with pytest.raises(DataError, match=r"extract takes a Dataset or an array of inputs, not the name or path 'digits'; "
                                        r"load it first: extract\(model, load_dataset\('digits'\), layers\)"):
        extract(mlp, "digits", ["fc1"])


def test_dataset_feature_mismatch(mlp):
    data = make_dataset("wide", torch.zeros(5, 30))
    with pytest.raises(DataError, match=r"Dataset 'wide' has 30 features per sample but model 'tiny' expects 64"):
        extract(mlp, data, ["fc1"])


def test_cnn_pooling_rules(sample_model, digits_test):
    cnn = sample_model("cnn_seed0")
    assert list_layers(cnn)[:4] == ["unflatten", "conv1", "bn1", "relu1"]
    mean = extract(cnn, digits_test, ["relu1"], pooling="mean")["relu1"]
    flat = extract(cnn, digits_test, ["relu1"], pooling="flatten")["relu1"]
    mx = extract(cnn, digits_test, ["relu1"], pooling="max")["relu1"]
    assert mean.shape == (450, 32) and flat.shape == (450, 32 * 8 * 8) and mx.shape == (450, 32)
    maps = flat.reshape(450, 32, 64)
    torch.testing.assert_close(mean, maps.mean(-1))
    torch.testing.assert_close(mx, maps.amax(-1))
    with pytest.raises(ParameterError, match=r"Pooling 'cls' applies to token sequences; layer 'relu1' outputs conv maps "
                                             r"of shape \(32, 8, 8\) per sample\. Use 'mean', 'max' or 'flatten'\."):
        extract(cnn, digits_test, ["relu1"], pooling="cls")


def test_sequence_pooling_with_padding_mask():
    out = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(pool(out, "cls", channel_first=False), out[:, 0])
    torch.testing.assert_close(pool(out, "last", channel_first=False, mask=mask), torch.stack([out[0, 1], out[1, 3]]))
    torch.testing.assert_close(pool(out, "mean", channel_first=False, mask=mask), torch.stack([out[0, :2].mean(0), out[1].mean(0)]))
    torch.testing.assert_close(pool(out, "max", channel_first=False, mask=mask), torch.stack([out[0, 1], out[1, 3]]))
    assert pool(out, "flatten", channel_first=False).shape == (2, 12)


class _InPlaceTokens(nn.Module):
    """Token model that changes its embedding output in place after the embedding's hook ran."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, x):
        h = self.emb(x)
        h.mul_(0).add_(5.0)
        return h.mean(1)


@pytest.mark.parametrize("pooling", ["mean", "flatten", "cls", "last", "max"])
def test_outputs_changed_in_place_later_are_captured_as_the_layer_gave_them(pooling, tmp_path):
    # nn.ReLU(inplace=True) after a linear or conv layer rewrites its output after the hook ran
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).eval()
    x = torch.randn(50, 4)
    with torch.no_grad():
        want = mlp[0](x)
    assert want.min() < 0
    got = extract(mlp, x, ["0"], pooling=pooling, cache_dir=tmp_path / "mlp")["0"]
    torch.testing.assert_close(got, want)

    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    xc = torch.randn(20, 1, 6, 6)
    with torch.no_grad():
        want = pool(cnn[0](xc), pooling, channel_first=True) if pooling not in ("cls", "last") else None
    if want is not None:
        torch.testing.assert_close(extract(cnn, xc, ["0"], pooling=pooling, cache_dir=tmp_path / "cnn")["0"], want)

    tokens = _InPlaceTokens().eval()
    ids = torch.randint(1, 7, (30, 6))
    with torch.no_grad():
        want = pool(tokens.emb(ids), pooling, channel_first=False, mask=ids != 0)
    torch.testing.assert_close(extract(tokens, ids, ["emb"], pooling=pooling, cache_dir=tmp_path / "tok")["emb"], want)


def test_layer_info_in_forward_order(sample_model):
    infos = layer_info(sample_model("mlp_seed0"))
    assert [i.name for i in infos] == ["fc1", "relu1", "fc2", "relu2", "out"]
    assert infos[0].output_shape == (512,) and infos[0].n_parameters == 64 * 512 + 512
    assert infos[-1].output_shape == (10,)


def test_layers_of_a_bare_module_from_a_dataset_an_array_or_a_list(digits_test):
    module = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    for example in (digits_test, digits_test.x.numpy().astype(np.float64), [[0.0] * 64] * 2, torch.zeros(2, 64)):
        assert list_layers(module, example) == ["0", "1", "2"]
    with pytest.raises(ParameterError, match=r"example batch for the layers of 'Sequential' must be a tensor, an array or a Dataset; got object"):
        list_layers(module, object())


def test_module_device_is_where_the_weights_are():
    from workbench.device import module_device

    assert module_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert module_device(nn.BatchNorm1d(2, affine=False).to("meta")) == torch.device("meta")  # buffers only
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_accepts_bare_module_and_arrays(digits_test):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 5), nn.Tanh())
    acts = extract(module, digits_test.x.numpy(), ["1"])
    assert acts["1"].shape == (450, 5)
    assert float(acts["1"].abs().max()) <= 1.0


def test_sample_models_are_accurate(sample_model, digits_test):
    import json
    from pathlib import Path

    manifest = json.loads((Path(__file__).resolve().parents[2] / "sample_models" / "manifest.json").read_text())
    for name, entry in manifest.items():
        model = sample_model(name)
        if entry.get("architecture", {}).get("type") == "transformer":
            continue
        logits = extract(model, digits_test, ["out"])["out"]
        accuracy = float((logits.argmax(1) == digits_test.y).float().mean())
        assert accuracy >= 0.95, name
        assert abs(accuracy - entry["test_accuracy"]) < 1e-6, name
        assert np.isclose(float(model.metadata["test_accuracy"]), accuracy, atol=1e-4)


def test_text_model_token_pooling(sample_model):
    from workbench import load_dataset

    model = sample_model("text_transformer_seed0")
    data = load_dataset("sentences")
    assert model.takes_tokens
    cls = extract(model, data, ["norm", "out"], pooling="cls")
    assert cls["norm"].shape == (120, 32)
    with torch.inference_mode():
        logits = model.module(data.x)
    torch.testing.assert_close(cls["out"], logits)
    accuracy = float((logits.argmax(1) == data.y).float().mean())
    assert accuracy >= 0.9
    mean = extract(model, data, ["norm"], pooling="mean")["norm"]
    assert not torch.allclose(mean, cls["norm"])


def test_text_model_rejects_float_features(sample_model, digits_test):
    with pytest.raises(DataError, match=r"^Model 'text_transformer_seed0' takes token ids \(integers\) but dataset 'digits \(test\)' "
                       r"holds float32 values; pick a matching dataset\.$"):
        extract(sample_model("text_transformer_seed0"), digits_test, ["norm"])


def test_a_float_model_given_integer_pixels_says_to_save_them_as_floats(sample_model, digits_test):
    from workbench.data import make_dataset

    pixels = make_dataset("img", (digits_test.x.abs() * 40).to(torch.uint8))
    with pytest.raises(DataError, match=r"^Model 'mlp_seed0' takes float features but dataset 'img' holds \w+ values; pick a "
                       r"matching dataset, or save integer pixel or count values as floats \(such as x\.astype\('float32'\) / 255 "
                       r"for 8-bit images\)\.$"):
        extract(sample_model("mlp_seed0"), pixels, ["fc1"])


def test_layer_whose_width_changes_between_batches_is_refused(tmp_path):
    class BatchWide(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(len(x), len(x))  # as many features as the batch has samples

    module = nn.Sequential()
    module.add_module("wide", BatchWide())
    with pytest.raises(DataError, match=r"Layer 'wide' gave 2 features on the batch at sample 4 but 4 before.*fixed width"):
        extract(wrap_module(module), torch.ones(6, 3), ["wide"], batch_size=4, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written is left in the cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_agrees_with_cpu(sample_model, sample_model_path, digits_test, tmp_path):
    cnn = sample_model("cnn_seed0")
    layers = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "fc1"]  # every pooling route: input, affine, map, global pool
    on_gpu = extract(cnn, digits_test, layers, device="cuda", cache_dir=tmp_path / "gpu")
    on_cpu = extract(cnn, digits_test, layers, device="cpu", cache_dir=tmp_path / "cpu")
    for layer in layers:
        torch.testing.assert_close(on_gpu[layer], on_cpu[layer], atol=1e-4, rtol=1e-4)
    assert next(cnn.module.parameters()).device.type == "cpu"  # the model goes back where it was
    moved = load_model(sample_model_path("cnn_seed0"))
    moved.module.to("cuda")  # a model the user put on the GPU is probed and extracted there, and stays there
    assert [i.name for i in layer_info(moved)] == [i.name for i in layer_info(cnn)]
    again = extract(moved, digits_test, layers, cache_dir=tmp_path / "moved")
    torch.testing.assert_close(again["conv2"], on_gpu["conv2"], atol=1e-5, rtol=1e-5)
    assert next(moved.module.parameters()).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_gathers_batches_on_the_device_in_order(sample_model, digits_test, tmp_path, monkeypatch):
    extract_module = importlib.import_module("workbench.activations.extract")  # the package's attribute is the function

    cnn = sample_model("cnn_seed0")
    layers = ["conv1", "relu2", "fc1", "out"]
    on_cpu = extract(cnn, digits_test, layers, batch_size=32, device="cpu", cache_dir=tmp_path / "cpu")
    monkeypatch.setattr(extract_module, "TRANSFER_BYTES", 3 * 32 * 4 * 100)  # a copy to the host every few batches
    on_gpu = extract(cnn, digits_test, layers, batch_size=32, device="cuda", cache_dir=tmp_path / "gpu")
    for layer in layers:
        torch.testing.assert_close(on_gpu[layer], on_cpu[layer], atol=1e-4, rtol=1e-4)


def test_gathered_blocks_reach_each_layer_file_in_order(tmp_path):
    from workbench.activations.extract import _HostStream, _LayerFile

    gen = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(23, 3, generator=gen), "b": torch.randn(23, 5, generator=gen)}
    writers = {k: _LayerFile(tmp_path / f"{k}.npy", 23, v.shape[1]) for k, v in full.items()}
    stream = _HostStream(writers, ["a", "b"], gather=True, chunk_bytes=4 * 8 * 10)  # a flush every third batch or so
    for start in range(0, 23, 4):
        stream.add([full["a"][start:start + 4], full["b"][start:start + 4]])
    written_before_the_end = writers["a"].rows
    stream.finish()
    for writer in writers.values():
        writer.close()
    assert 0 < written_before_the_end < 23  # chunks go out before the end, so device memory stays bounded
    for k, v in full.items():
        assert writers[k].rows == 23
        np.testing.assert_array_equal(np.load(tmp_path / f"{k}.npy"), v.numpy())


@pytest.mark.parametrize("widths", [(3, 5), (70_000,)])
def test_layer_files_gather_small_blocks_and_write_large_ones_in_order(tmp_path, monkeypatch, widths):
    extract_module = importlib.import_module("workbench.activations.extract")
    from workbench.activations.extract import _LayerFile

    monkeypatch.setattr(extract_module, "WRITE_BUFFER_BYTES", 4 * 5 * 10)  # ten rows of width 5, a few of width 3
    gen = torch.Generator().manual_seed(0)
    for width in widths:
        full = torch.randn(60, width, generator=gen).numpy()
        writer = _LayerFile(tmp_path / f"w{width}.npy", 60, width)
        writes = []
        monkeypatch.setattr(writer, "_write", lambda block, w=writer, log=writes: (log.append(len(block)), _LayerFile._write(w, block)))
        start = 0
        for rows in (1, 2, 4, 1, 17, 3, 3, 9, 20):  # small blocks gathered, blocks larger than the buffer written straight
            writer.append(full[start:start + rows])
            start += rows
        writer.close()
        np.testing.assert_array_equal(np.load(tmp_path / f"w{width}.npy"), full)
        assert writer.rows == 60
        if writer.buffer is not None:
            assert len(writes) < 9 and sum(writes) == 60  # fewer writes than blocks
        else:
            assert writes == [1, 2, 4, 1, 17, 3, 3, 9, 20]  # a row wider than the buffer: each block as it comes


def test_a_full_disk_says_how_much_the_entry_needs(mlp, digits_test, tmp_path, monkeypatch):
    import errno

    from workbench.activations.extract import _LayerFile

    def full(self, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_LayerFile, "_write", full)
    with pytest.raises(ParameterError, match=rf"^The cache folder '{tmp_path}' ran out of space \(No space left on device\) "
                       r"while writing these activations \(about 0.0864 MB\); free space there or pass a cache_dir on a disk "
                       r"with room\.$"):
        extract(mlp, digits_test, ["fc1", "fc2"], cache_dir=tmp_path)  # 450 samples x (32 + 16) float32
    assert not any(tmp_path.iterdir()), "a partial cache entry was left behind"

    def broken(self, block):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_LayerFile, "_write", broken)
    with pytest.raises(ParameterError, match=rf"^The activations could not be written to the cache folder '{tmp_path}' "
                       r"\(Input/output error\); pass a cache_dir that is a writable folder\.$"):
        extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)


def test_a_dataset_of_one_feature_per_sample_is_named_in_the_singular(mlp):
    with pytest.raises(DataError, match=r"Dataset 'one' has 1 feature per sample but model 'tiny' expects 64"):
        extract(mlp, make_dataset("one", torch.zeros(10, 1)), ["fc1"])


def _fake_fallocate(code):
    import ctypes

    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(code)
        return -1

    return fallocate


def test_a_disk_without_room_for_the_entry_fails_before_the_run_goes_on(mlp, digits_test, tmp_path, monkeypatch):
    import errno

    extract_module = importlib.import_module("workbench.activations.extract")
    monkeypatch.setattr(extract_module, "_fallocate", _fake_fallocate(errno.ENOSPC))
    batches = []
    with pytest.raises(ParameterError, match=rf"^The cache folder '{tmp_path}' ran out of space \(No space left on device\) "
                       r"while writing these activations \(about 0.0864 MB\); free space there or pass a cache_dir on a disk "
                       r"with room\.$"):
        extract(mlp, digits_test, ["fc1", "fc2"], batch_size=64, cache_dir=tmp_path, progress=lambda d, t: batches.append(d))
    assert batches == [], "the run went on past the first batch"
    assert not any(tmp_path.iterdir()), "a partial cache entry was left behind"


def test_a_file_system_that_cannot_reserve_space_is_written_as_it_goes(mlp, digits_test, tmp_path, monkeypatch):
    import errno

    extract_module = importlib.import_module("workbench.activations.extract")
    expected = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path / "a")["fc1"]
    monkeypatch.setattr(extract_module, "_fallocate", _fake_fallocate(errno.EOPNOTSUPP))
    got = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path / "b")["fc1"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(importlib.import_module("workbench.activations.extract")._fallocate is None,
                    reason="space is reserved on Linux only")
def test_layer_files_reserve_their_full_size_before_the_rows_come(tmp_path):
    from workbench.activations.extract import _LayerFile

    rows = np.arange(40 * 7, dtype=np.float32).reshape(40, 7)
    writer = _LayerFile(tmp_path / "w.npy", 40, 7)
    header = writer.handle.tell()
    assert (tmp_path / "w.npy").stat().st_size == header + rows.nbytes  # reserved, not yet written
    for start in range(0, 40, 16):
        writer.append(rows[start:start + 16])
    writer.close()
    assert (tmp_path / "w.npy").stat().st_size == header + rows.nbytes
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), rows)


def test_full_float32_turns_tf32_off_and_restores_it_after_nested_use():
    from workbench.device import full_float32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_float32():
            with full_float32():
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32  # the outer user still needs it off
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class _PositionTable(nn.Module):
    """A layer whose output is one table shared by every sample (like position embeddings)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(5, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x + self.pos(torch.arange(5, device=x.device)).sum(0))


def test_a_layer_without_a_row_per_sample_is_refused_and_leaves_no_cache(tmp_path):
    from workbench.registry import default_layers

    model = wrap_module(_PositionTable(), name="table")
    data = make_dataset("d", torch.randn(16, 3))
    with pytest.raises(DataError, match=r"Layer 'pos' of 'table' outputs 5 row\(s\) for a batch of 8 samples .* pick another layer"):
        extract(model, data, ["pos", "fc"], batch_size=8, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is kept
    assert extract(model, data, ["fc"], batch_size=8, cache_dir=tmp_path)["fc"].shape == (16, 2)
    info = {i.name: i.output_shape for i in layer_info(model, torch.zeros(2, 3))}
    assert info == {"fc": (2,), "pos": None}
    assert default_layers(model, layer_info(model, torch.zeros(2, 3))) == ["fc"]
    with pytest.raises(DataError, match=r"Layer 'pos' of 'table' outputs 5 row\(s\) for a batch of 2 samples"):
        extract(model, data, ["pos"], batch_size=1, cache_dir=tmp_path)  # one sample per batch would hide it
    calls = []
    one = extract(model, data, ["fc"], batch_size=1, cache_dir=tmp_path / "one", progress=lambda d, t: calls.append(d))
    assert torch.allclose(one["fc"], extract(model, data, ["fc"], batch_size=8, cache_dir=tmp_path)["fc"])
    assert calls == list(range(2, 17))  # the first batch holds two samples, then one at a time


def test_weights_changed_in_place_give_new_activations(sample_model_path, digits_test, tmp_path):
    model = load_model(sample_model_path("mlp_narrow_seed0"))
    loaded = model.sha256
    before = extract(model, digits_test, ["fc1"], cache_dir=tmp_path)["fc1"].clone()
    assert model.sha256 == loaded  # reading the hash again does not rehash unchanged weights into another value
    with torch.no_grad():
        model.module.fc1.bias += 1.0  # an in-place edit, as an optimizer step makes
    assert model.sha256 != loaded and model.loaded_sha256 == loaded
    after = extract(model, digits_test, ["fc1"], cache_dir=tmp_path)
    torch.testing.assert_close(after["fc1"], before + 1.0)  # not the cached activations of the old weights
    assert after.model_sha256 == model.sha256
    opt = torch.optim.SGD(model.module.parameters(), lr=0.1)
    model.module(digits_test.x).sum().backward()
    opt.step()
    assert extract(model, digits_test, ["fc1"], cache_dir=tmp_path).model_sha256 not in (loaded, after.model_sha256)
    with torch.no_grad():
        model.module.fc1.bias -= 1.0
    reloaded = load_model(sample_model_path("mlp_narrow_seed0"))
    assert model.sha256 != reloaded.sha256  # the optimizer step is still in


def test_same_weights_under_another_architecture_are_not_served_from_the_cache(sample_model_path, digits_test, tmp_path):
    relu = load_model(sample_model_path("mlp_seed0"))
    spec = {**relu.architecture, "activation": "tanh"}
    tanh = load_model(sample_model_path("mlp_seed0"), architecture=spec)
    assert relu.sha256 == tanh.sha256 and relu.content_sha256 != tanh.content_sha256
    a = extract(relu, digits_test, ["fc2"], cache_dir=tmp_path)["fc2"]
    b = extract(tanh, digits_test, ["fc2"], cache_dir=tmp_path)["fc2"]
    with torch.inference_mode():
        want = tanh.module[:3](digits_test.x)
    torch.testing.assert_close(b, want)
    assert (a - b).abs().max() > 1
    before = tanh.content_sha256
    assert isinstance(tanh.module[1], nn.Tanh)
    tanh.module[1] = nn.ReLU()  # a module swapped in place
    assert tanh.content_sha256 != before


def test_a_model_in_training_mode_is_run_in_eval_mode_and_left_as_it_was(digits_test, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    net.train()
    net[4].eval()  # a submodule's own mode is kept too
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    got = extract(net, digits_test, ["2", "3"], cache_dir=tmp_path)
    assert net.training and net[1].training and not net[4].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, stats[k], msg=f"{k} changed")
    with torch.inference_mode():
        net.eval()
        want = net[2](net[1](net[0](digits_test.x)))
    torch.testing.assert_close(got["2"], want)
    torch.testing.assert_close(got["3"], want)  # no dropout
    layer_info(nn.Sequential(nn.Linear(64, 4), nn.BatchNorm1d(4)).train(), digits_test)  # a probe batch of 2 in eval mode


def test_a_model_whose_first_operation_is_in_place_leaves_the_dataset_alone(tmp_path):
    data = make_dataset("signed", torch.randn(40, 6))
    before = data.x.clone()
    net = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 3))
    extract(net, data, ["1"], cache_dir=tmp_path, batch_size=16)
    torch.testing.assert_close(data.x, before)
    data.check_unchanged()


def test_a_dataset_changed_in_place_after_it_was_made_is_refused(mlp, digits_test, tmp_path):
    data = make_dataset("mine", digits_test.x.clone(), digits_test.y)
    extract(mlp, data, ["fc1"], cache_dir=tmp_path)
    data.x.mul_(2)
    with pytest.raises(DataError, match=r"Dataset 'mine' was changed in place after it was made, so its sha256 no longer describes it; "
                                        r"build a new dataset from the changed arrays with make_dataset\(name, x, y\)\."):
        extract(mlp, data, ["fc1"], cache_dir=tmp_path)


def test_tree_order_puts_containers_above_their_submodules(sample_model):
    from workbench.activations import layer_info, tree_order

    infos = layer_info(sample_model("text_transformer_seed0"))
    names = [i.name for i in tree_order(infos)]
    assert sorted(names) == sorted(i.name for i in infos)
    assert names[:5] == ["embed", "layers", "layers.0", "layers.0.self_attn", "layers.0.self_attn.out_proj"]
    assert names.index("layers.0.norm2") < names.index("layers.1") < names.index("layers.1.self_attn") < names.index("norm")
    flat = layer_info(sample_model("mlp_narrow_seed0"))
    assert tree_order(flat) == flat  # a model without containers keeps its forward order


class _Slow(nn.Module):
    """Identity that sleeps, so that the forward passes of two threads interleave."""

    def forward(self, x):
        time.sleep(0.005)
        return x


def _extract_at_once(jobs: dict, tmp_path: Path) -> None:
    """Run ``extract(model, x, layers)`` for every job in its own thread, all starting together on one cache
    folder, and check each against the same job run alone."""
    want = {k: extract(m, x, layers, batch_size=5, cache_dir=tmp_path / f"alone-{k}") for k, (m, x, layers) in jobs.items()}
    got, failures = {}, []
    barrier = threading.Barrier(len(jobs))

    def run(k: str) -> None:
        m, x, layers = jobs[k]
        try:
            barrier.wait()
            got[k] = extract(m, x, layers, batch_size=5, cache_dir=tmp_path / "shared")
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for k, (m, _x, layers) in jobs.items():
        for layer in layers:
            torch.testing.assert_close(got[k][layer], want[k][layer], msg=f"{k} {layer}")
        assert _hook_count(m) == 0


def test_two_threads_on_one_model_each_get_the_activations_of_their_own_data(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), _Slow(), nn.ReLU(), nn.Linear(6, 3))
    _extract_at_once({"a": (module, torch.randn(40, 4), ["0", "3"]), "b": (module, torch.randn(40, 4) + 3, ["0", "3"])}, tmp_path)


def test_a_thread_extracting_from_a_part_of_a_model_waits_for_one_extracting_from_the_whole(tmp_path):
    torch.manual_seed(0)
    part = nn.Sequential(nn.Linear(6, 5), _Slow(), nn.Linear(5, 3))
    whole = nn.Sequential(nn.Linear(4, 6), _Slow(), part)
    _extract_at_once({"whole": (whole, torch.randn(30, 4), ["0", "2.0"]), "part": (part, torch.randn(30, 6) + 2, ["0", "2"])},
                     tmp_path)


def test_a_copy_taken_during_another_threads_extraction_has_none_of_its_hooks(tmp_path):
    from workbench.activations.capture import private_copy

    module = nn.Sequential(nn.Linear(4, 6), _Slow(), nn.ReLU(), nn.Linear(6, 3))
    running = threading.Event()
    worker = threading.Thread(target=extract, args=(module, torch.randn(60, 4), ["0", "3"]),
                              kwargs={"batch_size": 5, "cache_dir": tmp_path, "progress": lambda done, total: running.set()})
    worker.start()
    assert running.wait(10)
    copy = private_copy(module)  # waits for the extraction to finish
    worker.join()
    assert _hook_count(copy) == 0


def _hf_tokens_model(tmp_path, kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "roberta":
        config = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=40, pad_token_id=1)
        reference = transformers.RobertaModel(config)
    else:
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=40)
        reference = transformers.GPT2Model(config)
    folder = tmp_path / kind
    reference.eval().save_pretrained(folder)
    return load_model(folder)


@pytest.mark.parametrize(("kind", "pad", "layer"), [("roberta", 1, "encoder.layer.0"), ("gpt2", None, "h.0")])
def test_hugging_face_token_models_pad_with_their_own_pad_token(tmp_path, kind, pad, layer):
    model = _hf_tokens_model(tmp_path, kind)
    assert model.module.config.pad_token_id == pad
    torch.manual_seed(1)
    tokens = torch.randint(2, 50, (6, 10))
    tokens[:, 0] = 0  # RoBERTa's <s>, GPT-2's "!": a token like any other
    if pad is not None:
        tokens[1, 6:] = pad
        tokens[3, 2:] = pad
    mask = tokens != pad if pad is not None else None
    outs = {}
    with hooks_on(model.module, [layer], outs.__setitem__), torch.inference_mode():
        model.module(input_ids=tokens, **({"attention_mask": mask.long()} if mask is not None else {}))
    for pooling in ("mean", "max", "last"):
        got = extract(model, tokens, [layer], pooling=pooling, batch_size=4, cache_dir=tmp_path / "cache")[layer]
        torch.testing.assert_close(got, pool(outs[layer], pooling, channel_first=False, mask=mask), msg=pooling)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_float_dtype_is_fed_batches_of_its_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 2)).to(dtype)
    for name, net, x, layers in (("mlp", mlp, torch.randn(30, 4), ["0", "1", "2"]),
                                 ("cnn", cnn, torch.randn(12, 1, 8, 8), ["0", "1", "3"])):
        got = extract(net, x, layers, batch_size=8, cache_dir=tmp_path / name)
        outs = {}
        with hooks_on(net, layers, outs.__setitem__), torch.inference_mode():
            net(x.to(dtype))
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
        for layer in layers:
            assert got[layer].dtype == torch.float32
            torch.testing.assert_close(got[layer], pool(outs[layer], "mean", channel_first=True).float(), msg=f"{name} {layer}", **tol)
    assert [i.output_shape for i in layer_info(mlp, torch.randn(2, 4))] == [(4,), (4,), (2,)]


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_text_cnn_conv_outputs_are_pooled_over_their_length(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(30, 8), _Transpose(), nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(16, 2))
    ids = torch.randint(1, 30, (5, 12))
    acts = extract(net, ids, ["0", "1", "2", "3"], cache_dir=tmp_path)
    assert [tuple(acts[k].shape) for k in "0123"] == [(5, 8), (5, 8), (5, 16), (5, 16)]
    with torch.inference_mode():
        emb = net[0](ids)
        conv = net[2](emb.transpose(1, 2))
    torch.testing.assert_close(acts["0"], emb.mean(1))
    torch.testing.assert_close(acts["1"], emb.mean(1))
    torch.testing.assert_close(acts["2"], conv.mean(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acts["3"], conv.relu().mean(2))
    assert extract(net, ids, ["3"], pooling="max", cache_dir=tmp_path)["3"].shape == (5, 16)


def test_failures_of_the_forward_pass_of_any_kind_are_data_errors(tmp_path):
    class Fails(nn.Module):
        def __init__(self, exc):
            super().__init__()
            self.exc, self.fc = exc, nn.Linear(3, 3)

        def forward(self, x):
            raise self.exc

    for exc, text in ((KeyError("hidden"), r"KeyError: 'hidden'"), (AssertionError(), r"AssertionError"),
                      (AttributeError("no attr"), r"AttributeError: no attr"), (NotImplementedError(), r"NotImplementedError")):
        model = wrap_module(Fails(exc), name="fails")
        with pytest.raises(DataError, match=rf"Model 'fails' failed on a batch of dataset 'array' with shape \(4, 3\) \({text}\); "
                                            r"check that the dataset is made for this model\."):
            extract(model, torch.zeros(4, 3), ["fc"], cache_dir=tmp_path)
        with pytest.raises(DataError, match=rf"The probe batch of shape \(2, 3\) could not be run through 'fails' \({text}\)\."):
            layer_info(model, torch.zeros(2, 3))


def test_bad_layers_cache_folders_and_batch_sizes(mlp, digits_test, tmp_path):
    for layers in (3, None):
        with pytest.raises(ParameterError, match=rf"Layers are given as a layer name or a list of names, not {type(layers).__name__}; "
                                                 r"pick from: fc1, relu1, fc2, relu2, out\."):
            extract(mlp, digits_test, layers)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "below"):
        with pytest.raises(ParameterError, match=rf"The cache folder '{bad}' cannot be created \(.+\); pass a cache_dir that is a writable folder\."):
            extract(mlp, digits_test, ["fc1"], cache_dir=bad)
    acts = extract(mlp, digits_test, ["fc1"], batch_size=np.int64(100), cache_dir=tmp_path / "ok")
    assert acts["fc1"].shape == (450, 32)


def test_a_layer_that_outputs_a_scalar_per_batch_is_refused(tmp_path):
    class Total(nn.Module):
        def forward(self, x):
            return x.sum()

    net = nn.Sequential(nn.Linear(3, 2), Total())
    for pooling in ("mean", "flatten"):
        with pytest.raises(DataError, match=r"Layer '1' outputs one scalar per batch, so it has no activations per sample; pick another layer\."):
            extract(net, torch.ones(4, 3), ["0", "1"], pooling=pooling, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_save_npz_returns_the_file_it_wrote_and_makes_its_folder(mlp, digits_test, tmp_path):
    acts = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path / "cache")
    out = acts.save_npz(tmp_path / "new" / "deeper" / "out")
    assert out == tmp_path / "new" / "deeper" / "out.npz" and out.is_file()
    with np.load(out, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["layer/fc1"], acts["fc1"].numpy())
    assert acts.save_npz(str(tmp_path / "b.npz")) == tmp_path / "b.npz"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ParameterError, match=r"The activations cannot be written to '.*afile/out\.npz' \(.+\); choose another location\."):
        acts.save_npz(tmp_path / "afile" / "out")


def test_load_npz_restores_what_save_npz_wrote_and_the_same_data_check(mlp, digits_test, tmp_path):
    import zipfile

    from workbench import Activations
    from workbench.analyses.similarity import similarity_matrix
    from workbench.data import make_dataset

    acts = extract(mlp, digits_test, ["fc1", "out"], cache_dir=tmp_path / "cache")
    back = Activations.load_npz(acts.save_npz(tmp_path / "a.npz"))
    assert back.layers == ["fc1", "out"] and repr(back).endswith("{'fc1': (450, 32), 'out': (450, 10)})")
    for attr in ("model_name", "model_sha256", "dataset_name", "dataset_sha256", "inputs_sha256", "pooling", "key"):
        assert getattr(back, attr) == getattr(acts, attr), attr
    torch.testing.assert_close(back["fc1"], acts["fc1"])
    torch.testing.assert_close(back.labels, acts.labels)
    shuffled = make_dataset("shuffled", digits_test.x.flip(0), digits_test.y.flip(0))
    other = Activations.load_npz(extract(mlp, shuffled, ["fc1"], cache_dir=tmp_path / "cache").save_npz(tmp_path / "b.npz"))
    with pytest.raises(DataError, match=r"the two activations come from different datasets"):
        similarity_matrix(back, other)
    np.savez(tmp_path / "plain.npz", x=np.ones((3, 2)))
    with pytest.raises(DataError, match=r"^'plain\.npz' holds no 'meta' entry, so it was not written by save_npz or 'workbench extract'; extract the activations again\.$"):
        Activations.load_npz(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"^'text\.npz' is not a readable \.npz of activations \(\w+\); extract the activations again\.$"):
        Activations.load_npz(tmp_path / "text.npz")
    with pytest.raises(DataError, match=r"^No activations file at '.*missing\.npz'; check the path\.$"):
        Activations.load_npz(tmp_path / "missing.npz")
    with zipfile.ZipFile(tmp_path / "a.npz") as zf, zipfile.ZipFile(tmp_path / "c.npz", "w") as out:
        for name in zf.namelist():
            if name != "layer/out.npy":
                out.writestr(name, zf.read(name))
    with pytest.raises(DataError, match=r"^The meta entry of 'c\.npz' does not list the layers the file holds"):
        Activations.load_npz(tmp_path / "c.npz")


def test_partial_cache_entries_of_killed_runs_are_removed_when_old(mlp, digits_test, tmp_path):
    import os

    old = tmp_path / ".abc.partial-1234abcd"
    fresh = tmp_path / ".def.partial-5678abcd"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "layer000.npy").write_bytes(b"x")
    day_ago = time.time() - 2 * 24 * 3600
    for p in (old / "layer000.npy", old):
        os.utime(p, (day_ago, day_ago))
    os.utime(fresh, (day_ago, day_ago))  # its file is still being written
    extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)
    assert not old.exists() and fresh.exists()


def test_the_partial_entry_of_a_killed_run_is_removed_at_once(mlp, digits_test, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    killed, live, elsewhere = (tmp_path / f".{k}.partial-1234abcd" for k in ("a", "b", "c"))
    owners = {killed: (socket.gethostname(), int(dead.stdout)), live: (socket.gethostname(), os.getpid()),
              elsewhere: ("another-host", int(dead.stdout))}
    for folder, (host, pid) in owners.items():
        folder.mkdir()
        (folder / "owner.json").write_text(json.dumps({"host": host, "pid": pid}))
    acts = extract(mlp, digits_test, ["fc1"], cache_dir=tmp_path)
    assert not killed.exists() and live.exists() and elsewhere.exists()
    entry = tmp_path / acts.key
    assert sorted(f.name for f in entry.iterdir()) == ["layer000.npy", "meta.json"]  # the owner record is not kept


def test_a_model_in_training_mode_takes_the_batchnorm_shortcut(monkeypatch, tmp_path):
    import importlib

    from workbench.activations.capture import PooledCapture

    extract_module = importlib.import_module("workbench.activations.extract")  # the module, not the function it exports

    seen = []

    class Spy(PooledCapture):
        def end_batch(self):
            pooled = super().end_batch()
            seen.append(dict(self.sources))
            return pooled

    monkeypatch.setattr(extract_module, "PooledCapture", Spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()).train()
    x = torch.randn(6, 1, 8, 8)
    got = extract(net, x, ["0", "1"], cache_dir=tmp_path)
    assert seen and seen[0]["1"] == "affine"
    assert net.training
    with torch.inference_mode():
        net.eval()
        want = net[1](net[0](x)).mean((2, 3))
    torch.testing.assert_close(got["1"], want, rtol=1e-5, atol=1e-6)
