"""Model loading: every supported format, clear errors for bad files, and hostile files refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

from workbench import extract, load_model
from workbench.errors import (
    ArchitectureError,
    CorruptFileError,
    DataError,
    FileTooLargeError,
    ParameterError,
    UnsafeFileError,
    UnsupportedFormatError,
    WorkbenchError,
)
from workbench.models.architectures import build_model

MLP = {"type": "mlp", "sizes": [64, 32, 10], "activation": "relu"}


def _state_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_safetensors_with_embedded_spec(sample_model_path):
    model = load_model(sample_model_path("mlp_seed0"))
    assert model.name == "mlp_seed0"
    assert model.architecture == {"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "relu"}
    assert model.n_parameters == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert not model.module.training
    assert len(model.sha256) == 64
    assert model.source_format == "safetensors"


def test_same_weights_same_hash_across_formats(sample_model):
    model = sample_model("mlp_seed0")
    from_pt = load_model(_state_bytes(model.module.state_dict()), filename="w.pt", architecture=model.architecture)
    from_st = load_model(save(dict(model.module.state_dict())), filename="w.safetensors", architecture=json.dumps(model.architecture))
    assert from_pt.sha256 == from_st.sha256 == model.sha256
    other = sample_model("mlp_seed1")
    assert other.sha256 != model.sha256


def test_state_dict_in_checkpoint_dict_and_prefixes():
    module = build_model(MLP)
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}
    loaded = load_model(_state_bytes(nested), filename="ckpt.pth", architecture=MLP)
    x = torch.randn(4, 64)
    torch.testing.assert_close(loaded.module(x), module.eval()(x))


def test_state_dict_without_spec_suggests_one():
    data = _state_bytes(build_model(MLP).state_dict())
    with pytest.raises(ArchitectureError, match=r"no architecture spec; pass one.*\"sizes\": \[64, 32, 10\]"):
        load_model(data, filename="w.pt")


def _suggested_spec(data: bytes, filename: str) -> dict | None:
    with pytest.raises(ArchitectureError, match=r"no architecture spec") as info:
        load_model(data, filename=filename)
    text = str(info.value)
    if "it looks like {" not in text:
        return None
    return json.loads(text.split("it looks like ", 1)[1].split(" (check the activation)", 1)[0])


def test_suggested_mlp_spec_loads_the_weights(sample_model):
    model = sample_model("mlp_seed0")
    data = _state_bytes(model.module.state_dict())
    spec = _suggested_spec(data, "mlp.pt")
    assert spec == {"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "relu"}
    assert load_model(data, filename="mlp.pt", architecture=spec).sha256 == model.sha256
    bn_state = build_model({"type": "mlp", "sizes": [8, 4, 3], "batchnorm": True}).state_dict()
    data = _state_bytes({f"module.{k}": v for k, v in bn_state.items()})
    spec = _suggested_spec(data, "bn.pt")
    assert spec == {"type": "mlp", "sizes": [8, 4, 3], "activation": "relu", "batchnorm": True}
    load_model(data, filename="bn.pt", architecture=spec)


def test_cnn_state_dict_is_never_offered_an_mlp_spec(sample_model):
    data = _state_bytes(sample_model("cnn_seed0").module.state_dict())
    with pytest.raises(ArchitectureError) as info:
        load_model(data, filename="cnn.pt")
    text = str(info.value)
    assert '"sizes": [32, 64, 10]' not in text and '"type": "mlp"' not in text  # no MLP example beside the CNN it names
    assert ('pass one (the app\'s spec box, architecture= in Python, --architecture on the command line): it looks like {"type": "cnn", "channels": [32, 32], "kernel_size": 3, "batchnorm": true, "hidden": 64, '
            '"n_classes": 10} plus "input_shape": [1, height, width]') in text
    spec = {"type": "cnn", "channels": [32, 32], "kernel_size": 3, "batchnorm": True, "hidden": 64, "n_classes": 10,
            "input_shape": [1, 8, 8]}
    assert load_model(data, filename="cnn.pt", architecture=spec).sha256 == sample_model("cnn_seed0").sha256


@pytest.mark.parametrize("spec, message", [
    ({"type": "mlp", "sizes": [64, 512, 512, 10], "activaton": "tanh"},
     r"^The 'mlp' architecture spec has an unknown entry 'activaton', which would be ignored\. Did you mean 'activation'\? "
     r"Its entries are: activation, batchnorm, sizes, type\.$"),
    ({"type": "mlp", "sizes": [64, 512, 512, 10], "extra": {"a": 1}},
     r"^The 'mlp' architecture spec has an unknown entry 'extra', which would be ignored\. Its entries are: "),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [["0", {"class": "Linear", "arg": {"in_features": 4}}]]}},
     r"^The 'torch.nn' spec node at '0' has an unknown entry 'arg', which would be ignored\. Did you mean 'args'\? A layer node "
     r"has 'args' and 'class'\.$"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [
        ["0", {"class": "Embedding", "args": {"num_embeddings": 4, "embedding_dim": 4, "max_norm": 0.001}}]]}},
     r"^The Embedding at '0' in the 'torch.nn' spec sets 'max_norm', which rescales its weights in place on every forward "
     r"pass, so analysing the model would change it; remove 'max_norm'"),
])
def test_a_spec_entry_that_would_be_ignored_or_change_the_weights_is_refused(sample_model_path, spec, message):
    # a misspelled entry was ignored: the tanh model's weights loaded into ReLU layers without a word
    with pytest.raises(ArchitectureError, match=message):
        load_model(sample_model_path("mlp_tanh_seed0"), architecture=spec)


def test_a_torch_nn_spec_whose_layers_do_not_fit_its_input_shape_is_refused_when_loaded():
    spec = {"type": "torch.nn", "input_shape": [5], "root": {"class": "Sequential", "children": [
        ["0", {"class": "Linear", "args": {"in_features": 4, "out_features": 4}}]]}}
    with pytest.raises(ArchitectureError, match=r"^The layers of the 'torch\.nn' spec do not fit its input_shape \[5\] \(.+\); "
                                              r"check the input_shape or the layer sizes\.$"):
        build_model(spec)


def test_a_torch_nn_spec_that_starts_with_an_embedding_takes_token_ids(tmp_path):
    spec = {"type": "torch.nn", "input_shape": [3], "root": {"class": "Sequential", "children": [
        ["0", {"class": "Embedding", "args": {"num_embeddings": 4, "embedding_dim": 2}}], ["1", {"class": "Flatten"}]]}}
    weights = {"0.weight": torch.randn(4, 2)}
    model = load_model(save(weights, metadata={"architecture": json.dumps(spec)}), filename="emb.safetensors")
    assert model.takes_tokens and model.input_shape == (3,)
    acts = extract(model, torch.tensor([[0, 1, 2], [3, 2, 1]]), ["1"], cache_dir=tmp_path)
    torch.testing.assert_close(acts["1"], torch.cat([weights["0.weight"][[0, 1, 2]].reshape(1, -1),
                                                     weights["0.weight"][[3, 2, 1]].reshape(1, -1)]))


def test_weights_no_spec_loads_get_no_suggestion():
    state = dict(build_model(MLP).state_dict())
    state["extra.weight"] = torch.zeros(3, 3, 3, 3)
    assert _suggested_spec(_state_bytes(state), "odd.pt") is None


def test_wrong_shapes_and_keys_are_named():
    state = build_model({"type": "mlp", "sizes": [64, 16, 10]}).state_dict()
    with pytest.raises(ArchitectureError, match=r"wrong shape fc1\.weight \(16, 64\) vs \(32, 64\)"):
        load_model(_state_bytes(state), filename="w.pt", architecture=MLP)
    state = dict(build_model(MLP).state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["out.bias"]
    with pytest.raises(ArchitectureError, match=r"missing out\.bias; unexpected extra\.weight\. Check the spec's sizes\."):
        load_model(_state_bytes(state), filename="w.pt", architecture=MLP)


def test_a_bare_linear_layer_is_told_that_only_its_key_names_differ():
    state = nn.Linear(64, 10).state_dict()  # keys 'weight' and 'bias', the shapes of a one-layer mlp's 'out'
    with pytest.raises(ArchitectureError, match=r"missing out\.weight, out\.bias; unexpected weight, bias\. The file holds "
                                                r"tensors of the spec's shapes under other names: save them under the spec's "
                                                r"names \(its layers are out\) and load the file again\."):
        load_model(_state_bytes(state), filename="x.pt", architecture={"type": "mlp", "sizes": [64, 10]})


def test_unknown_architecture_type():
    with pytest.raises(ArchitectureError, match=r"Unknown architecture type 'vit'; supported types: mlp, cnn"):
        load_model(_state_bytes({}), filename="w.pt", architecture={"type": "vit"})
    with pytest.raises(ArchitectureError, match=r"not valid JSON"):
        load_model(b"x", filename="w.safetensors", architecture="{not json")


@pytest.mark.parametrize("name", ["notes.txt", "image.png", "model.onnx", "weights"])
def test_wrong_extension_lists_supported_types(name):
    with pytest.raises(UnsupportedFormatError, match=r"supported types are \.safetensors, \.pt, \.pth, \.bin"):
        load_model(b"some bytes", filename=name)


@pytest.mark.parametrize("source", [5, None, [1, 2]])
def test_a_source_that_is_not_a_path_or_bytes_is_named(source):
    with pytest.raises(ParameterError, match=r"load_model reads a path \(str or Path\) or the bytes of an upload; got "
                                             r"(int|NoneType|list)\. Pass the checkpoint's path"):
        load_model(source)


def test_empty_file():
    with pytest.raises(CorruptFileError, match=r"is empty \(0 bytes\)"):
        load_model(b"", filename="model.safetensors")


def test_missing_path(tmp_path):
    with pytest.raises(UnsupportedFormatError, match=r"No model file at"):
        load_model(tmp_path / "nope.safetensors")


def test_too_large(sample_model_path):
    with pytest.raises(FileTooLargeError, match=r"above the 0 MiB limit"):
        load_model(sample_model_path("mlp_narrow_seed0"), max_bytes=1000)


def test_truncated_safetensors(sample_model_path):
    data = sample_model_path("mlp_narrow_seed0").read_bytes()
    with pytest.raises(CorruptFileError, match=r"damaged safetensors file|is truncated"):
        load_model(data[: len(data) // 2], filename="m.safetensors")
    with pytest.raises(CorruptFileError, match=r"is truncated: a safetensors file starts with an 8-byte header length"):
        load_model(data[:5], filename="m.safetensors")
    header_end = 8 + int.from_bytes(data[:8], "little")  # both counts include the 8-byte length before the header
    with pytest.raises(CorruptFileError, match=rf"^'m.safetensors' is truncated: its safetensors header ends at byte {header_end} "
                                               r"but the file has 50 bytes; upload the whole file\.$"):
        load_model(data[:50], filename="m.safetensors")


def test_bit_flipped_safetensors_header(sample_model_path):
    data = bytearray(sample_model_path("mlp_narrow_seed0").read_bytes())
    data[8] ^= 0xFF  # the opening brace of the JSON header
    with pytest.raises(CorruptFileError, match=r"damaged safetensors header"):
        load_model(bytes(data), filename="m.safetensors")


@pytest.mark.parametrize(("content", "message"), [
    (b"weights,bias\n0.1,0.2\n" * 20, r"'m.safetensors' is not a safetensors file: it looks like a text file, not a model"),
    (b"PK\x03\x04" + bytes(200), r"it looks like a zip archive \(torch.save writes one\): give a torch checkpoint a .pt name"),
    (b"\x80\x02}q\x00." + bytes(50), r"it looks like a Python pickle .*: give it a .pt name"),
    (b"\x89HDF\r\n\x1a\n" + bytes(100), r"it looks like an HDF5 file .*save the weights with safetensors"),
])
def test_another_format_named_safetensors_says_what_it_is(content, message):
    with pytest.raises(UnsupportedFormatError, match=message):
        load_model(content, filename="m.safetensors")


def test_huge_declared_safetensors_header():
    data = struct.pack("<Q", 1 << 40) + b"{}"
    with pytest.raises(CorruptFileError, match=r"its first 8 bytes declare a header larger than 100 MiB, which no model has; upload an intact copy"):
        load_model(data, filename="m.safetensors")


class _Payload:
    """Unpickling this calls ``fn(*args)``: the classic malicious-pickle gadget."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    import builtins
    import subprocess

    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "subprocess": _Payload(subprocess.call, (["touch", str(marker)],)),
        "builtins.exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
    }


@pytest.mark.parametrize("gadget", ["os.system", "subprocess", "builtins.exec"])
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_never_runs(tmp_path, gadget, container):
    marker = tmp_path / "pwned"
    payload = {"fc1.weight": torch.zeros(1), "evil": _payloads(marker)[gadget]}
    data = _state_bytes(payload) if container == "torch.save" else pickle.dumps(payload)
    with pytest.raises(UnsafeFileError, match=r"full pickle whose loading can run arbitrary code.*convert it to safetensors"):
        load_model(data, filename="model.pt", architecture=MLP)
    assert not marker.exists()


def test_trusted_full_pickle_loads_module():
    module = build_model(MLP)
    data = _state_bytes(module)  # a whole nn.Module, which needs full unpickling
    with pytest.raises(UnsafeFileError, match=r"in Python pass trust_remote_code=True; the app offers 'I trust this file' when "
                                              r"it is started with 'workbench app --trust-uploads'\), or convert"):
        load_model(data, filename="model.pt")
    loaded = load_model(data, filename="model.pt", trust_remote_code=True)
    assert loaded.source_format == "pickle (trusted)"
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded.module(x), module.eval()(x))


def test_torchscript_archive_refused_unless_trusted():
    module = build_model(MLP)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    with pytest.raises(UnsafeFileError, match=r"is a torchscript archive, which runs code from the file"):
        load_model(buf.getvalue(), filename="model.pt")
    loaded = load_model(buf.getvalue(), filename="model.pt", trust_remote_code=True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(loaded.module(x), module(x))


def test_torch_export_archive_refused_unless_trusted():
    module = build_model(MLP)
    program = torch.export.export(module, (torch.randn(2, 64),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    with pytest.raises(UnsafeFileError, match=r"is a torch\.export archive, which runs code from the file"):
        load_model(buf.getvalue(), filename="model.pt2.zip")
    with pytest.raises(UnsafeFileError, match=r"torch\.export archive"):
        load_model(buf.getvalue(), filename="model.pt")


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/workbench-evil.txt", "model/../../evil.txt"])
def test_zip_path_traversal_refused(tmp_path, member):
    data = _zip({"config.json": b"{}", member: b"x"})
    with pytest.raises(UnsafeFileError, match=r"points outside the archive; it was not unpacked"):
        load_model(data, filename="model.zip")
    assert not Path("/tmp/workbench-evil.txt").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def test_zip_bomb_refused():
    data = _zip({"config.json": b"{}", "model.safetensors": b"\0" * (64 << 20)})
    assert len(data) < 1 << 20
    with pytest.raises(UnsafeFileError, match=r"like a zip bomb; it was not unpacked"):
        load_model(data, filename="model.zip")
    low_entropy = bytes(48 + (b & 1) for b in os.urandom(3 << 20))  # compresses about 8x: not a bomb
    big = _zip({"config.json": b"{}", "model.safetensors": low_entropy})
    assert len(big) < 1 << 20
    with pytest.raises(FileTooLargeError, match=r"would unpack to 3 MiB, above the 1 MiB limit"):
        load_model(big, filename="model.zip", max_bytes=1 << 20)


def test_zip_without_model():
    with pytest.raises(UnsupportedFormatError, match=r"neither a torch checkpoint nor a Hugging Face model folder"):
        load_model(_zip({"readme.txt": b"hello"}), filename="stuff.zip")
    with pytest.raises(CorruptFileError, match=r"not a valid zip archive"):
        load_model(b"not a zip at all", filename="stuff.zip")


def test_garbage_pt_file():
    with pytest.raises(CorruptFileError, match=r"not a readable PyTorch checkpoint"):
        load_model(b"\x00\x01garbage" * 10, filename="model.pt")


def test_non_tensor_checkpoint():
    with pytest.raises(CorruptFileError, match=r"not a state dict of tensors"):
        load_model(_state_bytes({"lr": 0.1, "epochs": [1, 2]}), filename="model.pt", architecture=MLP)


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_huggingface_folder_and_zip(tiny_hf_folder):
    from workbench import extract, list_layers
    from workbench.data import make_dataset

    folder, reference = tiny_hf_folder
    loaded = load_model(folder)
    assert loaded.source_format == "huggingface"
    assert loaded.takes_tokens
    layers = list_layers(loaded)
    assert "encoder.layer.0" in layers and "encoder.layer.1.output" in layers
    tokens = torch.randint(1, 99, (5, 12))
    data = make_dataset("tokens", tokens)
    acts = extract(loaded, data, ["encoder.layer.1"], pooling="cls")
    with torch.inference_mode():
        expected = reference(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state[:, 0]
    torch.testing.assert_close(acts["encoder.layer.1"], expected, atol=1e-5, rtol=1e-5)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"tiny-bert/{f.name}")
    zipped = load_model(buf.getvalue(), filename="tiny-bert.zip")
    assert zipped.sha256 == loaded.sha256


def test_huggingface_loading_prints_no_progress_bar_and_leaves_the_setting(tiny_hf_folder, capsys):
    from transformers.utils import logging as hf_logging

    folder, _ = tiny_hf_folder
    hf_logging.enable_progress_bar()
    load_model(folder)
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back


def test_huggingface_folder_with_pickled_weights_refused(tiny_hf_folder, tmp_path):
    folder, model = tiny_hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"has no \.safetensors weights, and pickled weights can run code"):
        load_model(tmp_path)


@pytest.mark.parametrize("shard", ["/etc/model.safetensors", "../outside.safetensors", "pytorch_model.bin", "missing.safetensors"])
def test_a_weight_index_that_reads_outside_the_folder_or_pickles_is_refused(tiny_hf_folder, tmp_path, shard):
    import json as _json
    import shutil

    folder, _ = tiny_hf_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(UnsafeFileError, match=rf"'model\.safetensors\.index\.json' in 'copy' reads weights from "
                                              rf"'{re.escape(shard)}', which is not a \.safetensors file in the model folder"):
        load_model(copy)
    zipped = io.BytesIO()  # an upload: named as uploaded, not by the temporary folder it is unpacked in
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in copy.iterdir():
            zf.write(f, f.name)
    with pytest.raises(UnsafeFileError, match=r"'model\.safetensors\.index\.json' in 'hf_index\.zip' reads weights from "):
        load_model(zipped.getvalue(), filename="hf_index.zip")


def test_every_error_is_a_value_error():
    assert issubclass(WorkbenchError, ValueError)
    for cls in (ArchitectureError, CorruptFileError, FileTooLargeError, UnsafeFileError, UnsupportedFormatError):
        assert issubclass(cls, WorkbenchError)


def test_safetensors_spec_argument_overrides_missing_metadata(tmp_path):
    module = build_model(MLP)
    path = tmp_path / "plain.safetensors"
    save_file(dict(module.state_dict()), path)
    with pytest.raises(ArchitectureError, match=r"no architecture spec"):
        load_model(path)
    loaded = load_model(path, architecture=MLP)
    assert isinstance(loaded.module, nn.Module)


def test_trusted_pickle_loads_in_an_app_process_that_forces_weights_only(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    module = build_model(MLP)
    data = _state_bytes(module)
    with pytest.raises(UnsafeFileError, match=r"full pickle"):
        load_model(data, filename="model.pt")
    loaded = load_model(data, filename="model.pt", trust_remote_code=True)
    assert loaded.n_parameters == sum(p.numel() for p in module.parameters())
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


def test_loaded_model_runs_when_called_and_prints_a_summary(sample_model):
    model = sample_model("mlp_narrow_seed0")
    x = torch.zeros(3, 64)
    assert torch.equal(model(x), model.module(x))
    assert repr(model) == (f"LoadedModel(name='mlp_narrow_seed0', architecture='mlp', n_parameters={model.n_parameters:,}, "
                           f"input_shape=(64,), source_format='safetensors', sha256='{model.sha256[:12]}'...)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.float32])
def test_weights_stored_in_another_precision_are_computed_in_float32_and_say_so(dtype):
    spec = {"type": "mlp", "sizes": [4, 3, 2], "activation": "relu"}
    state = {k: v.to(dtype) for k, v in build_model(spec).state_dict().items()}
    loaded = load_model(save(state, metadata={"architecture": json.dumps(spec)}), filename="w.safetensors")
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert torch.equal(loaded.module.state_dict()["fc1.weight"], state["fc1.weight"].float())
    assert loaded.metadata.get("stored_dtype") == (None if dtype == torch.float32 else str(dtype).removeprefix("torch."))


class _Shift(nn.Module):
    """Adds a non-persistent buffer: computed state that a state dict does not hold."""

    def __init__(self, value: float):
        super().__init__()
        self.register_buffer("shift", torch.full((4,), float(value)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def _encoder(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, **kwargs)


SETTING_PAIRS = {
    "count_include_pad": (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=True),
                          lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), (1, 6, 6)),
    "divisor_override": (lambda: nn.AvgPool2d(2), lambda: nn.AvgPool2d(2, divisor_override=2), (1, 6, 6)),
    "norm_first": (lambda: _encoder(norm_first=False), lambda: _encoder(norm_first=True), (3, 8)),
    "activation function": (lambda: _encoder(activation="relu"), lambda: _encoder(activation="gelu"), (3, 8)),
    "align_corners": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                      lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), (1, 4, 4)),
    "non-persistent buffer": (lambda: _Shift(0), lambda: _Shift(5), (4,)),
}


@pytest.mark.parametrize(("make_a", "make_b", "shape"), list(SETTING_PAIRS.values()), ids=list(SETTING_PAIRS))
def test_same_weights_with_other_settings_are_not_served_from_the_cache(make_a, make_b, shape, tmp_path):
    from workbench import extract
    from workbench.data import make_dataset
    from workbench.models import wrap_module

    a = wrap_module(nn.Sequential(make_a(), nn.Flatten()), name="a")
    b = wrap_module(nn.Sequential(make_b(), nn.Flatten()), name="b")
    b.module.load_state_dict(a.module.state_dict())
    assert a.sha256 == b.sha256 and a.content_sha256 != b.content_sha256
    torch.manual_seed(1)
    data = make_dataset("inputs", torch.randn(6, *shape))
    first = extract(a, data, ["1"], pooling="flatten", cache_dir=tmp_path, device="cpu")["1"]
    second = extract(b, data, ["1"], pooling="flatten", cache_dir=tmp_path, device="cpu")["1"]  # as ``want`` is computed
    with torch.inference_mode():
        want = b.module(data.x)
    torch.testing.assert_close(second, want)
    assert (first - second).abs().max() > 1e-3


def test_the_structure_hash_ignores_mode_and_backward_hooks_and_follows_settings_and_scratch_buffers():
    from workbench.models.loading import structure_sha256

    module = nn.Sequential(_encoder(), _Shift(0))
    before = structure_sha256(module)
    module.train()
    module[1].register_full_backward_hook(lambda *args: None)
    assert structure_sha256(module) == before
    handle = module[0].register_forward_hook(lambda *args: None)  # a forward hook may change the output
    assert structure_sha256(module) != before
    handle.remove()
    assert structure_sha256(module) == before
    module[0].norm_first = True
    assert structure_sha256(module) != before
    module[0].norm_first = False
    assert structure_sha256(module) == before
    with torch.no_grad():
        module[1].shift += 1  # an in-place edit of a non-persistent buffer
    assert structure_sha256(module) != before


class _Masked(nn.Module):
    """Keeps its mask as a plain attribute, not a buffer: the weights hash never sees it."""

    def __init__(self, keep: int):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.mask = (torch.arange(4) < keep).float()

    def forward(self, x):
        return self.linear(x) * self.mask


def test_tensors_kept_as_plain_attributes_key_the_cache(tmp_path):
    from workbench import extract
    from workbench.data import make_dataset
    from workbench.models.loading import structure_sha256

    torch.manual_seed(0)
    module = nn.Sequential(_Masked(keep=2))
    before = structure_sha256(module)
    data = make_dataset("four", torch.randn(16, 4))
    first = extract(module, data, ["0"], cache_dir=tmp_path, device="cpu")["0"]  # where the mask is
    module[0].mask[2] = 1.0  # an in-place edit: same object, new values
    assert structure_sha256(module) != before
    second = extract(module, data, ["0"], cache_dir=tmp_path, device="cpu")["0"]
    with torch.inference_mode():
        torch.testing.assert_close(second, module(data.x))
    assert (first[:, 2] == 0).all() and (second[:, 2] != 0).all()


class _Stranded(nn.Module):
    """Keeps a tensor on a device of its own as a plain attribute: moving the module leaves it behind."""

    def __init__(self, device: str):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = torch.ones(4, device=device)

    def forward(self, x):
        return self.linear(x) * self.scale


def test_tensors_the_model_leaves_on_another_device_are_named_with_the_fix(tmp_path):
    from workbench import extract

    x = torch.randn(8, 4)
    with pytest.raises(DataError, match=r"^Model 'Sequential' holds tensors that are not on cpu with its parameters and "
                                        r"buffers \(RuntimeError: .*meta.*\); register them as buffers so that they move "
                                        r"with the model, or extract on the device they are on\.$"):
        extract(nn.Sequential(_Stranded("meta")), x, ["0"], cache_dir=tmp_path, device="cpu")
    if torch.cuda.is_available():  # the common case: a CPU tensor left behind when the model moves to the GPU
        with pytest.raises(DataError, match=r"holds tensors that are not on cuda"):
            extract(nn.Sequential(_Stranded("cpu")), x, ["0"], cache_dir=tmp_path, device="cuda")


def test_a_module_whose_weights_are_on_the_meta_device_is_refused():
    from workbench import extract
    from workbench.models import wrap_module

    module = nn.Sequential(nn.Linear(4, 4, device="meta"))
    message = (r"^Model '(model|Sequential)' has weights on the meta device, which hold shapes but no values \('0\.weight'\); "
               r"give them values first \(module\.to_empty\(device='cpu'\), then load_state_dict\)\.$")
    with pytest.raises(ParameterError, match=message):
        wrap_module(module)
    with pytest.raises(ParameterError, match=message):
        extract(module, torch.randn(3, 4), ["0"])


def test_hooks_and_replaced_forwards_key_the_cache_by_their_code(tmp_path):
    from torch.nn.modules.module import register_module_forward_hook

    from workbench import extract
    from workbench.activations.capture import PooledCapture
    from workbench.data import make_dataset
    from workbench.models.loading import structure_sha256

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    data = make_dataset("x", torch.randn(32, 4))
    plain = extract(model(), data, ["2"], cache_dir=tmp_path)["2"]
    hooked = model()
    hooked[0].register_forward_hook(lambda _m, _i, out: out * 10)
    pre = model()
    pre[0].register_forward_pre_hook(lambda _m, inp: (inp[0] * 0,))
    clamped, absolute = model(), model()
    clamped[1].forward = lambda t: t.clamp(min=0)
    absolute[1].forward = lambda t: t.abs()
    for m in (hooked, pre, clamped, absolute):
        got = extract(m, data, ["2"], cache_dir=tmp_path)["2"]
        with torch.inference_mode():
            torch.testing.assert_close(got, m(data.x))
    assert not torch.allclose(extract(absolute, data, ["2"], cache_dir=tmp_path)["2"], plain)

    def scaled(factor: float):
        return lambda _m, _i, out: out * factor

    one, two = model(), model()
    one[0].register_forward_hook(scaled(1.0))
    two[0].register_forward_hook(scaled(2.0))
    assert structure_sha256(one) != structure_sha256(two)  # one factory, other settings
    again = model()
    again[0].register_forward_hook(scaled(1.0))
    assert structure_sha256(again) == structure_sha256(one)
    base = model()
    before = structure_sha256(base)
    with PooledCapture(base, ["0", "2"], "mean", channel_first=False):  # extraction's own hooks change nothing
        assert structure_sha256(base) == before
    handle = register_module_forward_hook(lambda _m, _i, out: out)
    try:
        assert structure_sha256(base) != before
    finally:
        handle.remove()


def test_two_loads_of_a_checkpoint_have_the_same_content_hash(sample_model_path):
    for name in ("mlp_seed0", "cnn_seed0", "text_transformer_seed0"):
        first, second = load_model(sample_model_path(name)), load_model(sample_model_path(name))
        assert first.module is not second.module
        assert first.content_sha256 == second.content_sha256


def test_the_content_hash_of_the_sample_models_is_the_same_in_a_fresh_process():
    import subprocess
    import sys

    from workbench.models.loading import structure_sha256

    root = Path(__file__).resolve().parents[2] / "sample_models"
    paths = sorted(str(p) for p in root.glob("*.safetensors"))
    script = ("import json, sys\nfrom workbench import load_model\n"
              "print(json.dumps({p: load_model(p).content_sha256 for p in sys.argv[1:]}))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env, check=True, timeout=300)
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {p: load_model(p).content_sha256 for p in paths}
    assert len({structure_sha256(load_model(p).module) for p in paths}) > 1


def test_huggingface_copies_in_other_folders_have_the_same_content_hash(tiny_hf_folder, tmp_path):
    import shutil

    folder, _ = tiny_hf_folder
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"tiny-bert/{f.name}")
    hashes = {load_model(folder).content_sha256, load_model(copy).content_sha256,
              load_model(buf.getvalue(), filename="tiny-bert.zip").content_sha256}
    assert len(hashes) == 1


def test_loading_the_sample_cnn_runs_nothing_on_the_meta_device(sample_model_path):
    """A forward pass on the meta device imports sympy (about a second and 75 MB): the cnn spec's sizes are checked
    from the spec instead."""
    import subprocess
    import sys

    script = ("import sys\nfrom workbench import load_model\nload_model(sys.argv[1])\n"
              "print('sympy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(sample_model_path("cnn_seed0"))], capture_output=True,
                          text=True, check=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False"
