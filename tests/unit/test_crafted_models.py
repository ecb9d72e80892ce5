"""Crafted checkpoints: each is refused with one sentence, before it can allocate memory, hang or leak a traceback."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save

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
    ({"vocab_size": 10**8}, ArchitectureError, r"describes a model of 3,200,019,296 weights, but its \.safetensors files hold only 22,464"),
    ({"hidden_size": 65536}, ArchitectureError, r"describes a model of [\d,]+ weights, but its \.safetensors files hold only 22,464"),
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
