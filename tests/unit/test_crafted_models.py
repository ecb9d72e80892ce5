"""Crafted checkpoints: each is refused with one sentence, before it can allocate memory, hang or leak a traceback."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from workbench import load_model
from workbench.errors import ArchitectureError, CorruptFileError, UnsafeFileError, UnsupportedFormatError
from workbench.models import architectures, loading
from workbench.models.architectures import MAX_PARAMETERS, build_model, count_weights


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.fixture
def builds(monkeypatch):
    """The device each architecture builder runs on: 'meta' counts cost nothing, 'cpu' allocates the weights."""
    seen: list[str] = []
    for kind, builder in list(architectures.ARCHITECTURES.items()):
        def spy(spec, builder=builder):
            seen.append(torch.empty(0).device.type)
            return builder(spec)
        monkeypatch.setitem(architectures.ARCHITECTURES, kind, spy)
    return seen


# ---------------------------------------------------------------------------------------------
# memory bombs: shapes that declare far more than the file holds


@pytest.mark.parametrize("spec", [None, {"type": "mlp", "sizes": [20000, 20000, 10]}])
def test_expanded_tensors_are_refused_before_anything_is_built(spec, builds):
    state = {"fc1.weight": torch.zeros(1).expand(20000, 20000), "fc1.bias": torch.zeros(1).expand(20000),
             "out.weight": torch.zeros(1).expand(10, 20000), "out.bias": torch.zeros(10)}
    data = _pt(state)
    assert len(data) < 4096  # 1.6 GB of declared float32 values
    with pytest.raises(UnsafeFileError, match=r"'bomb\.pt' declares 'fc1\.weight' with shape \(20000, 20000\) \(400,000,000 values\) "
                                              r"but stores only 4 bytes for it \(an expanded or overlapping view\)"):
        load_model(data, filename="bomb.pt", architecture=spec)
    assert builds == []


def test_a_spec_above_the_parameter_cap_is_refused_before_it_is_built(builds):
    spec = {"type": "mlp", "sizes": [10**6, 10**6]}
    assert count_weights(spec) == 10**12 + 10**6
    with pytest.raises(ArchitectureError, match=rf"describes 1,000,001,000,000 weights, more than the {MAX_PARAMETERS:,} a model may have"):
        build_model(spec)
    data = _pt({"out.weight": torch.zeros(2, 2), "out.bias": torch.zeros(2)})
    with pytest.raises(ArchitectureError, match=r"describes 1,000,001,000,000 weights"):
        load_model(data, filename="small.pt", architecture=spec)
    with pytest.raises(ArchitectureError, match=r"describes 1,000,001,000,000 weights"):
        load_model(save({"out.weight": torch.zeros(2, 2)}, metadata={"architecture": json.dumps(spec)}), filename="m.safetensors")
    assert set(builds) == {"meta"}


def test_a_spec_within_the_cap_but_beyond_the_file_is_compared_before_it_is_built(builds):
    spec = {"type": "mlp", "sizes": [10_000, 10_000, 10]}  # 100 M weights: 400 MB if it were built
    with pytest.raises(ArchitectureError, match=r"wrong shape out\.weight \(2, 2\) vs \(10, 10000\)"):
        load_model(_pt({"out.weight": torch.zeros(2, 2)}), filename="small.pt", architecture=spec)
    assert set(builds) == {"meta"}


def test_weights_shaped_to_guess_a_huge_spec_are_never_built(builds):
    state = {"fc1.weight": torch.zeros(10_000, 1), "fc1.bias": torch.zeros(10_000), "out.weight": torch.zeros(10**6, 0)}
    with pytest.raises(ArchitectureError, match=r"holds weights but no architecture spec; pass one"):
        load_model(save(state), filename="guess.safetensors")
    assert "cpu" not in builds


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "resmlp", "in_features": 4, "width": 4, "n_blocks": 10**7, "n_classes": 2}, r"'n_blocks' entry .* must be an int in \[0, 1000\]"),
    ({"type": "transformer", "vocab_size": 9, "max_len": 4, "d_model": 4, "n_heads": 1, "n_layers": 10**6, "n_classes": 2},
     r"'n_layers' entry .* must be an int in \[0, 1000\]"),
    ({"type": "mlp", "sizes": [2] * 5000}, r"lists 5000 layers, more than the 1000 a spec may build"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [[str(i), {"class": "ReLU"}] for i in range(5000)]}},
     r"has more than 1000 nodes"),
    ({"type": "torch.nn", "root": {"class": "Linear", "args": {"in_features": 10**5, "out_features": 10**5, "device": "cpu"}}},
     r"set \['device'\], which a spec may not set"),
])
def test_specs_that_would_hang_or_allocate_are_refused(spec, message):
    with pytest.raises(ArchitectureError, match=message):
        build_model(spec)


def test_the_parameter_cap_leaves_real_models_alone(sample_model_path):
    for name in ("mlp_seed0", "cnn_seed0", "text_transformer_seed0"):
        assert load_model(sample_model_path(name)).n_parameters < MAX_PARAMETERS // 1000


# ---------------------------------------------------------------------------------------------
# Hugging Face folders whose config asks for more than their weights


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _edited(folder, tmp_path, **changes):
    copy = tmp_path / "crafted"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"num_hidden_layers": 1_000_000}, ArchitectureError, r"sets 'num_hidden_layers' to 1,000,000, more than the 1,000 layers a model may have here"),
    ({"num_labels": 10**8}, ArchitectureError, r"sets 'num_labels' to 100,000,000, more than the 22,464"),
    ({"vocab_size": 10**8}, ArchitectureError, r"describes a model of 3,200,019,296 weights \(12,207\.1 MiB\), but the weights transformers reads \(model\.safetensors\) hold only 87\.8 KiB"),
    ({"hidden_size": 65536}, ArchitectureError, r"describes a model of [\d,]+ weights \([\d,.]+ MiB\), but the weights transformers reads \(model\.safetensors\) hold only 87\.8 KiB"),
    ({"architectures": ["AutoTokenizer"]}, ArchitectureError, r"names 'AutoTokenizer' in 'architectures', which is not a transformers model class"),
    ({"architectures": ["logging"]}, ArchitectureError, r"names 'logging' in 'architectures', which is not a transformers model class"),
    ({"architectures": ["PreTrainedModel"]}, ArchitectureError, r"names 'PreTrainedModel' .* not a transformers model class"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, UnsupportedFormatError,
     r"'crafted' holds a quantized model \('quantization_config' in its config\.json\), which is not loaded here"),
])
def test_huggingface_config_that_does_not_fit_its_weights_is_refused(tiny_bert, tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        load_model(_edited(tiny_bert, tmp_path, **changes))


def test_huggingface_config_nested_too_deeply_is_refused(tiny_bert, tmp_path):
    copy = _edited(tiny_bert, tmp_path)
    (copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptFileError, match=r"The config\.json of 'crafted' is not readable JSON \(RecursionError"):
        load_model(copy)


def test_huggingface_zip_keeps_loading(tiny_bert):
    data = _zip([(f"tiny-bert/{f.name}", f.read_bytes()) for f in tiny_bert.iterdir()])
    assert load_model(data, filename="tiny-bert.zip").source_format == "huggingface"


# ---------------------------------------------------------------------------------------------
# zip archives


def test_many_small_members_that_expand_together_are_a_zip_bomb():
    data = _zip([("config.json", b"{}")] + [(f"part{i}.bin", bytes(1 << 20)) for i in range(300)])
    assert len(data) < 400 << 10
    with pytest.raises(UnsafeFileError, match=r"'bomb\.zip' expands \d+x in all \(300 MiB from \d+ KiB\), like a zip bomb; it was not unpacked"):
        load_model(data, filename="bomb.zip")


@pytest.mark.parametrize(("members", "reason"), [
    (["."], r"it has no file name"),
    (["a", "a/b"], r"it is also the name of a folder"),
    (["a/b", "a"], r"it is also the name of a folder"),
    (["x" * 300], r"a part of it is longer than 255 bytes"),
    (["a/" * 600 + "b"], r"it is longer than 1024 bytes"),
    (["abc\0def"], r"it contains a NUL character"),
])
def test_zip_member_names_that_cannot_be_files_are_refused(members, reason):
    named = [(m.replace("\0", "#"), b"x") for m in members]
    data = _zip([("config.json", b"{}"), *named])
    if "\0" in members[0]:
        data = data.replace(b"abc#def", b"abc\0def")  # zipfile cuts names at NUL when writing; patch the stored bytes
    with pytest.raises(UnsafeFileError, match=rf"that cannot be unpacked as a file \({reason}\); it was not unpacked"):
        load_model(data, filename="odd.zip")


# ---------------------------------------------------------------------------------------------
# deep JSON, tensors without values, and anything else


def test_deeply_nested_json_is_refused_with_a_sentence(sample_model_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(CorruptFileError, match=r"'m\.safetensors' has a damaged safetensors header \(RecursionError\)"):
        load_model(_safetensors(('{"__metadata__": {"architecture": ' + deep + "}}").encode()), filename="m.safetensors")
    with pytest.raises(ArchitectureError, match=r"The architecture spec nests JSON too deeply to be read"):
        load_model(save({"w": torch.zeros(1)}, metadata={"architecture": deep}), filename="m.safetensors")
    with pytest.raises(ArchitectureError, match=r"The architecture spec nests JSON too deeply to be read"):
        load_model(sample_model_path("mlp_seed0"), architecture=deep)
    node: dict = {"class": "Identity"}
    for _ in range(5000):
        node = {"class": "Sequential", "children": [["a", node]]}
    with pytest.raises(ArchitectureError, match=r"has containers nested more than 100 deep"):
        load_model(sample_model_path("mlp_seed0"), architecture={"type": "torch.nn", "root": node})


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(("make", "kind"), [
    (lambda: torch.empty(1, 3, device="meta"), "meta-device"),
    (lambda: torch.eye(3)[:1].to_sparse(), r"torch\.sparse_coo"),
    (lambda: torch.zeros(1, 3).to_sparse_csr(), r"torch\.sparse_csr"),
    (lambda: torch.zeros(1, 3, dtype=torch.complex64), r"complex \(torch\.complex64\)"),
])
def test_tensors_without_dense_values_are_refused(make, kind):
    data = _pt({"out.weight": make(), "out.bias": torch.zeros(1)})
    with pytest.raises(CorruptFileError, match=rf"'w\.pt' holds 'out\.weight' as a {kind} tensor, not a dense array of real numbers"):
        load_model(data, filename="w.pt", architecture={"type": "mlp", "sizes": [3, 1]})


def test_any_other_failure_becomes_one_sentence_naming_the_file(tiny_bert, tmp_path, monkeypatch):
    with pytest.raises(CorruptFileError, match=r"could not be loaded"):
        load_model(_edited(tiny_bert, tmp_path, dtype="float8"))
    boom = RuntimeError("boom\nsecond line")
    monkeypatch.setattr(loading, "_load_safetensors", lambda *a: (_ for _ in ()).throw(boom))
    with pytest.raises(CorruptFileError, match=r"^'m\.safetensors' could not be loaded as a model \(RuntimeError: boom\); check") as info:
        load_model(b"x", filename="m.safetensors")
    assert info.value.__cause__ is boom
    refused = UnsafeFileError("refused")
    monkeypatch.setattr(loading, "_load_safetensors", lambda *a: (_ for _ in ()).throw(refused))
    with pytest.raises(UnsafeFileError) as info:
        load_model(b"x", filename="m.safetensors")
    assert info.value is refused
    monkeypatch.setattr(loading, "_load_safetensors", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        load_model(b"x", filename="m.safetensors")


# ---------------------------------------------------------------------------------------------
# Hugging Face folders: only the weight files transformers reads count, and every weight must be loaded


BOMB_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 500000, "hidden_size": 128,
               "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}


@pytest.mark.parametrize(("members", "stored"), [
    ({"model.safetensors": {"unused": torch.zeros(1)}, "padding.safetensors": {"pad": torch.zeros(32 << 20, dtype=torch.bool)}},
     r"0\.0 KiB"),
    ({"model.safetensors": {"unused": torch.zeros(1), "pad": torch.zeros(32 << 20, dtype=torch.bool)}}, r"32\.0 MiB"),
])
def test_a_huggingface_config_is_compared_with_the_bytes_of_the_weights_transformers_reads(members, stored):
    data = _zip([("m/config.json", json.dumps(BOMB_CONFIG).encode())] + [(f"m/{k}", save(v)) for k, v in members.items()])
    assert len(data) < 64 << 10
    with pytest.raises(ArchitectureError, match=rf"^The config\.json of 'm\.zip' describes a model of 64,124,800 weights \(244\.6 MiB\), "
                                                rf"but the weights transformers reads \(model\.safetensors\) hold only {stored}; the config does not fit"):
        load_model(data, filename="m.zip")


def test_huggingface_weights_that_do_not_fill_the_model_are_refused(tiny_bert, tmp_path):
    copy = _edited(tiny_bert, tmp_path)
    save_file({"x": torch.zeros(11552)}, copy / "model.safetensors")
    with pytest.raises(ArchitectureError, match=r"^The weights in 'crafted' do not match the model its config\.json describes: 39 weights of "
                                                r"the model are not in the files \(embeddings\.LayerNorm\.bias, .* \(35 more\)\); "
                                                r"1 stored weights have no place in it \(x\); fix the config"):
        load_model(copy)


def test_huggingface_weights_the_model_has_no_place_for_are_refused(tiny_bert, tmp_path, capfd, caplog):
    from transformers.utils import logging as hf_logging

    copy = _edited(tiny_bert, tmp_path)
    state = load_file(copy / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(3)}, copy / "model.safetensors")
    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    with pytest.raises(ArchitectureError, match=r"do not match the model its config\.json describes: 1 stored weights have no place in it "
                                                r"\(extra\.weight\)"):
        load_model(copy)
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err + caplog.text  # the one sentence above is all the user sees
    assert hf_logging.get_verbosity() == verbosity  # the caller's setting is back


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"num_hidden_layers": -1}, ArchitectureError, r"sets 'num_hidden_layers' to -1, but it must be zero or more; fix the config"),
    ({"hidden_size": -32}, ArchitectureError, r"sets 'hidden_size' to -32, but it must be positive; fix the config"),
    ({"num_attention_heads": 0}, ArchitectureError, r"sets 'num_attention_heads' to 0, but it must be positive; fix the config"),
    ({"vocab_size": "50"}, ArchitectureError, r"sets 'vocab_size' to \"50\", but it must be a whole number; fix the config\.$"),
    ({"vocab_size": 50}, ArchitectureError, r"do not fit its config\.json: 'embeddings\.word_embeddings\.weight' is stored with shape "
                                            r"\(99, 32\) but the config makes \(50, 32\); fix the sizes in the config"),
    ({"model_type": "nosuchmodel"}, UnsupportedFormatError, r"sets 'model_type' to 'nosuchmodel', which the installed transformers "
                                                            r"[\d.]+ does not know; set it to the type that saved the model"),
    ({"architectures": ["GPT2Model"]}, ArchitectureError, r"names 'GPT2Model' in 'architectures', which is built from a GPT2Config, "
                                                          r"but its model_type 'bert' makes a BertConfig; set 'architectures'"),
    ({"auto_map": {"AutoModel": "modeling_x.XModel"}, "model_type": "xmodel"}, UnsafeFileError,
     r"^'crafted' needs its own Python code to be built \(its config\.json has 'auto_map' and model_type 'xmodel'.*\), and that code "
     r"would run when loaded; it was not loaded\. Load it only if you trust it, from Python with load_model\(path, "
     r"trust_remote_code=True\), or save its weights with safetensors"),
])
def test_huggingface_configs_with_bad_values_get_one_sentence(tiny_bert, tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        load_model(_edited(tiny_bert, tmp_path, **changes))


def test_a_zipped_config_without_model_type_names_the_upload_not_a_temporary_folder(tiny_bert):
    config = {k: v for k, v in json.loads((tiny_bert / "config.json").read_text()).items() if k != "model_type"}
    data = _zip([("m/config.json", json.dumps(config).encode()), ("m/model.safetensors", (tiny_bert / "model.safetensors").read_bytes())])
    with pytest.raises(UnsupportedFormatError, match=r"^The config\.json of 'up\.zip' has no 'model_type'") as info:
        load_model(data, filename="up.zip")
    assert "workbench-hf-" not in str(info.value)


@pytest.mark.parametrize(("members", "error", "message"), [
    (["m/config.json"], CorruptFileError, r"^'up\.zip' has no weights file: transformers reads model\.safetensors \(or "
                                          r"model\.safetensors\.index\.json and its shards\), and the folder holds config\.json; save"),
    (["m/config.json", "m/MODEL.SAFETENSORS"], CorruptFileError, r"has no weights file: .* the folder holds MODEL\.SAFETENSORS, config\.json"),
    (["a/config.json", "a/model.safetensors", "b/config.json", "b/model.safetensors"], UnsupportedFormatError,
     r"^'up\.zip' holds more than one model folder with a config\.json \('a' and 'b'\), so which to load is ambiguous"),
    (["config.json", "model.safetensors", "b/config.json"], UnsupportedFormatError,
     r"more than one model folder with a config\.json \('\(top level\)' and 'b'\)"),
    (["m/config.json", "m/model.safetensors", "m/config.json"], UnsafeFileError,
     r"^'up\.zip' holds two members named 'm/config\.json', so which one is the model is ambiguous; it was not unpacked"),
])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_huggingface_zips_without_exactly_one_model_are_refused(tiny_bert, members, error, message):
    files = {"config.json": (tiny_bert / "config.json").read_bytes(), "model.safetensors": (tiny_bert / "model.safetensors").read_bytes(),
             "MODEL.SAFETENSORS": (tiny_bert / "model.safetensors").read_bytes()}
    with pytest.raises(error, match=message):
        load_model(_zip([(m, files[m.rsplit("/", 1)[-1]]) for m in members]), filename="up.zip")


# ---------------------------------------------------------------------------------------------
# specs: input shapes, sizes and layer outputs are bounded before anything is built


def _in_metadata(spec) -> bytes:
    return save({}, metadata={"architecture": json.dumps(spec)})


def _relu_net(shape) -> dict:
    return {"type": "torch.nn", "input_shape": shape, "root": {"class": "Sequential", "children": [["act", {"class": "ReLU"}]]}}


@pytest.mark.parametrize(("shape", "message"), [
    ([10**8], r"\[100000000\], makes one sample of 100,000,000 values, more than the 16,777,216 an input may have here"),
    ([10**12], r"makes one sample of 1,000,000,000,000 values, more than the 16,777,216"),
    ([-5], r"must be a non-empty list of positive ints \(one sample's shape, e\.g\. \[3, 32, 32\]\)\. Got \[-5\]\.$"),
    ([2.7], r"must be a non-empty list of positive ints .* Got \[2\.7\]\.$"),
    ([], r"must be a non-empty list of positive ints .* Got \[\]\.$"),
    (["a"], r"must be a non-empty list of positive ints .* Got \['a'\]\.$"),
    ([True], r"must be a non-empty list of positive ints .* Got \[True\]\.$"),
    ("4", r"must be a non-empty list of positive ints .* Got '4'\.$"),
])
def test_a_spec_input_shape_must_be_a_bounded_list_of_positive_ints(shape, message, builds):
    with pytest.raises(ArchitectureError, match=rf"^The 'input_shape' entry of the 'torch\.nn' spec.*{message}"):
        load_model(_in_metadata(_relu_net(shape)), filename="m.safetensors")
    assert "cpu" not in builds
    assert load_model(_in_metadata(_relu_net([4, 4])), filename="m.safetensors").input_shape == (4, 4)


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "cnn", "input_shape": [1, 2000, 2000], "channels": [16], "hidden": 0, "n_classes": 2, "batchnorm": False},
     r"^Layer 'conv1' of the 'cnn' architecture spec would output 64,000,000 values \(16x2000x2000\) for one input of shape "
     r"\[1, 2000, 2000\], more than the 16,777,216 a layer may output here"),
    ({"type": "torch.nn", "input_shape": [64, 8, 8], "root": {"class": "Sequential", "children": [
        ["pool", {"class": "AdaptiveAvgPool2d", "args": {"output_size": [1000, 1000]}}]]}},
     r"^Layer 'pool' of the 'torch\.nn' architecture spec would output 64,000,000 values"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [
        ["pool", {"class": "AdaptiveAvgPool2d", "args": {"output_size": [10000, 10000]}}]]}},
     r"^The 'output_size' of 'pool' in the 'torch\.nn' spec, \[10000, 10000\], makes 100,000,000 values per channel, more than "
     r"the 16,777,216 a layer may output here"),
])
def test_layers_that_would_output_too_much_for_one_sample_are_refused_before_they_are_built(spec, message, builds):
    with pytest.raises(ArchitectureError, match=message):
        load_model(_in_metadata(spec), filename="m.safetensors")
    assert "cpu" not in builds


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "mlp", "sizes": [10**30, 2]}, r"^The 'sizes' entry of the 'mlp' spec must be a list of at least 2 ints in \[1, 16,777,216\]"),
    ({"type": "resmlp", "in_features": 10**30, "width": 2, "n_blocks": 1, "n_classes": 2},
     r"^The 'in_features' entry of the 'resmlp' spec must be an int in \[1, 16,777,216\]\. Got 10{30}; check the spec\.$"),
    ({"type": "transformer", "vocab_size": 0, "max_len": 4, "d_model": 4, "n_heads": 1, "n_layers": 1, "n_classes": 2},
     r"^The 'vocab_size' entry of the 'transformer' spec must be an int in \[1, 16,777,216\]\. Got 0"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [["fc", {"class": "Linear", "args": {"in_features": 10**30, "out_features": 2}}]]}},
     r"^The 'in_features' argument of 'fc' in the 'torch\.nn' spec is 10{30}, beyond the 16,777,216 any size in a spec may have"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [["a.b", {"class": "ReLU"}]]}},
     r"^The 'torch\.nn' spec node at 'root' has a child named 'a\.b'; a layer name must be non-empty and contain no '\.': rename it\.$"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [["", {"class": "ReLU"}]]}}, r"has a child named ''; a layer name"),
    ({"type": "torch.nn", "root": {"class": "Sequential", "children": [["a", {"class": "ReLU"}], ["a", {"class": "Tanh"}]]}},
     r"^The 'torch\.nn' spec node at 'root' has two children named 'a', so one layer would replace the other"),
])
def test_spec_sizes_and_names_get_one_sentence(spec, message):
    with pytest.raises(ArchitectureError, match=message) as info:
        load_model(_in_metadata(spec), filename="m.safetensors")
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


def test_a_library_error_while_building_keeps_only_its_first_line(monkeypatch):
    def fails(spec):
        raise RuntimeError("bad size\nException raised from empty at aten.cpp:12\nframe #0: c10::Error (libc10.so)")
    monkeypatch.setitem(architectures.ARCHITECTURES, "mlp", fails)
    with pytest.raises(ArchitectureError, match=r"^The 'mlp' architecture spec could not be built \(bad size\); check its sizes and layer arguments\.$"):
        build_model({"type": "mlp", "sizes": [2, 2]})


# ---------------------------------------------------------------------------------------------
# weight values: integers, booleans, NaN and overflow are no weights of a float model


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_integer_and_boolean_weights_are_refused_for_float_layers(dtype):
    data = save({"out.weight": torch.ones(2, 4, dtype=dtype), "out.bias": torch.zeros(2)})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ArchitectureError, match=rf"^'w\.safetensors' stores 'out\.weight' as {name}, but the spec's layer takes "
                                                r"floating-point weights there"):
        load_model(data, filename="w.safetensors", architecture={"type": "mlp", "sizes": [4, 2]})


@pytest.mark.parametrize(("weight", "message"), [
    (torch.full((2, 4), 1e300, dtype=torch.float64), r"holds values in 'out\.weight' too large for float32 \(they would become infinite\)"),
    (torch.full((2, 4), float("nan")), r"holds NaN or infinite values in 'out\.weight'"),
    (torch.full((2, 4), float("-inf"), dtype=torch.float16), r"holds NaN or infinite values in 'out\.weight'"),
])
def test_weights_that_are_not_finite_in_float32_are_refused(weight, message):
    data = save({"out.weight": weight, "out.bias": torch.zeros(2)})
    with pytest.raises(CorruptFileError, match=rf"^'w\.safetensors' {message}"):
        load_model(data, filename="w.safetensors", architecture={"type": "mlp", "sizes": [4, 2]})


def test_a_truncated_safetensors_file_is_described_in_plain_words():
    import torch
    from safetensors.torch import save

    from workbench import load_model
    from workbench.errors import CorruptFileError

    data = save({"w": torch.zeros(100)})
    with pytest.raises(CorruptFileError, match=r"^'m\.safetensors' is a damaged safetensors file \(its tensors do not cover the "
                       r"file exactly: it was cut short or has bytes no tensor uses\); upload an intact copy\.$"):
        load_model(data[:-40], filename="m.safetensors")
