"""Legitimate checkpoints load with exactly the weights they were saved with.

Hugging Face models of several families (folders, zips made by zipfile and shutil, sharded saves), state dicts of
every bundled spec in every precision and common wrapper, tied, shared, strided and flat-buffer tensors, ``torch.nn``
specs, BatchNorm buffers and pruned (mostly zero) weights.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file, save_model
from torch import nn

from workbench import load_model
from workbench.activations import layer_info
from workbench.models.architectures import build_model, describe_module, input_spec

SPECS = {
    "mlp": {"type": "mlp", "sizes": [8, 16, 16, 4], "activation": "relu"},
    "mlp_bn": {"type": "mlp", "sizes": [8, 16, 4], "activation": "tanh", "batchnorm": True},
    "cnn": {"type": "cnn", "input_shape": [1, 8, 8], "channels": [4, 4], "kernel_size": 3, "batchnorm": True, "hidden": 8,
            "n_classes": 3},
    "resmlp": {"type": "resmlp", "in_features": 8, "width": 16, "n_blocks": 2, "n_classes": 3},
    "transformer": {"type": "transformer", "vocab_size": 100, "max_len": 12, "d_model": 16, "n_heads": 2, "n_layers": 2,
                    "n_classes": 3},
}
TRUSTED_ISOLATED = {"isolate": True, "trust_remote_code": True}  # what the app passes


def _trained(spec: dict) -> nn.Module:
    """A module of ``spec`` whose every weight and buffer differs from a fresh build (BatchNorm statistics, a counter of
    batches, a non-zero position table)."""
    torch.manual_seed(0)
    module = build_model(spec)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
        for name, p in module.named_parameters():
            if name == "pos":
                p.normal_()
    return module.eval()


def _inputs(spec: dict, n: int = 3) -> torch.Tensor:
    shape, dtype = input_spec(spec)
    g = torch.Generator().manual_seed(1)
    if dtype == torch.int64:
        return torch.randint(1, spec["vocab_size"], (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


def _pt(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _assert_same_weights(module: nn.Module, reference: dict[str, torch.Tensor], *, as_float32: bool = False) -> None:
    """Same names, shapes and values; with ``as_float32`` floating tensors are compared after the loader's cast."""
    got = module.state_dict()
    assert set(got) == set(reference)
    for key, ref in reference.items():
        if as_float32 and ref.is_floating_point():
            ref = ref.float()
        assert got[key].dtype == ref.dtype, key
        assert torch.equal(got[key], ref), key


def _assert_loads(sources: list[tuple[str | Path | bytes, dict]], reference: dict[str, torch.Tensor], *,
                  as_float32: bool = False, module: nn.Module | None = None, spec: dict | None = None):
    """Each ``(source, kwargs)`` loads with the reference weights (and, given ``module``, computes its outputs)."""
    loaded = None
    for source, kwargs in sources:
        loaded = load_model(source, **kwargs)
        _assert_same_weights(loaded.module, reference, as_float32=as_float32)
        if module is not None:
            x = _inputs(spec or loaded.architecture)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), module(x))
    return loaded


# ---------------------------------------------------------------------------------------------
# state dicts of the bundled specs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", list(SPECS))
def test_bundled_spec_state_dicts_load_in_every_precision(tmp_path, kind, dtype):
    spec = SPECS[kind]
    module = _trained(spec)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    st = tmp_path / "w.safetensors"
    save_file(state, st, metadata={"architecture": json.dumps(spec)})
    pt = tmp_path / "w.pt"
    torch.save(state, pt)
    sources = [(st, {}), (st.read_bytes(), {"filename": "w.safetensors", **TRUSTED_ISOLATED}),
               (pt, {"architecture": spec}), (pt.read_bytes(), {"filename": "w.pt", "architecture": spec, **TRUSTED_ISOLATED})]
    if dtype == torch.float32:
        for suffix in (".pth", ".bin", ".ckpt"):
            torch.save(state, tmp_path / f"w{suffix}")
            sources.append((tmp_path / f"w{suffix}", {"architecture": spec}))
        sources.append((_pt(state, _use_new_zipfile_serialization=False), {"filename": "legacy.pt", "architecture": spec}))
    loaded = _assert_loads(sources, state, as_float32=True, module=module if dtype == torch.float32 else None, spec=spec)
    assert loaded.metadata.get("stored_dtype") == (None if dtype == torch.float32 else str(dtype).removeprefix("torch."))


WRAPPERS = {
    "state_dict, module.": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "lr": 0.1},
    "model, module.": lambda sd: {"model": OrderedDict((f"module.{k}", v) for k, v in sd.items()),
                                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 2, "loss": 0.5,
                                    "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                                                             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}},
    "lightning, model.": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1, "global_step": 10,
                                     "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.001, "hidden": [16]},
                                     "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": []},
    "_orig_mod.": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "net": lambda sd: {"net": {f"net.{k}": v for k, v in sd.items()}},
    "model and ema": lambda sd: {"model": sd, "ema": {k: v.clone() for k, v in sd.items()}},
    "module._orig_mod.": pytest.param(lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS.values()), ids=list(WRAPPERS))
@pytest.mark.parametrize("kind", ["mlp_bn", "transformer"])
def test_wrapped_checkpoints_load(kind, wrap):
    spec = SPECS[kind]
    module = _trained(spec)
    data = _pt(wrap(module.state_dict()))
    _assert_loads([(data, {"filename": "ckpt.pt", "architecture": spec}),
                   (data, {"filename": "ckpt.ckpt", "architecture": spec, **TRUSTED_ISOLATED})],
                  module.state_dict(), module=module, spec=spec)


# ---------------------------------------------------------------------------------------------
# tied, shared, strided and flat-buffer tensors


def _tied_lm() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    lm = nn.Sequential(OrderedDict([("embed", nn.Embedding(100, 16)), ("norm", nn.LayerNorm(16)),
                                    ("head", nn.Linear(16, 100, bias=False))]))
    lm.head.weight = lm.embed.weight
    return lm.eval(), describe_module(lm)


def _shared_blocks() -> tuple[nn.Module, dict]:
    module = _trained(SPECS["resmlp"])
    module.blocks[1].fc1.weight = module.blocks[0].fc1.weight
    module.blocks[1].fc2.weight = module.blocks[0].fc2.weight
    return module, SPECS["resmlp"]


def _flat_buffer() -> tuple[nn.Module, dict]:
    """Every parameter a view into one flat buffer (as flat-parameter optimizers and FSDP keep them)."""
    module = _trained(SPECS["mlp"])
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    offset = 0
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(flat[offset:offset + p.numel()].view_as(p)))
            offset += p.numel()
    return module, SPECS["mlp"]


def _transposed() -> tuple[nn.Module, dict]:
    """Weights stored as transposed (non-contiguous) views."""
    module = _trained(SPECS["mlp"])
    module.load_state_dict({k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in module.state_dict().items()}, assign=True)
    assert not module.fc1.weight.is_contiguous()
    return module, SPECS["mlp"]


def _slice_of_larger() -> tuple[nn.Module, dict]:
    """A weight that is a slice of a larger tensor (as a split fused projection is)."""
    module = _trained(SPECS["mlp"])
    fused = torch.cat([torch.randn(16, 8), module.fc1.weight.detach(), torch.randn(16, 8)])
    module.fc1.weight = nn.Parameter(fused[16:32])
    return module, SPECS["mlp"]


def _torch_save(module: nn.Module, spec: dict) -> tuple[bytes, str]:
    return _pt(module.state_dict()), "w.pt"


def _safetensors_save(module: nn.Module, spec: dict) -> tuple[bytes, str]:
    return save(dict(module.state_dict()), metadata={"architecture": json.dumps(spec)}), "w.safetensors"


def _safetensors_save_model(**kwargs):
    def write(module: nn.Module, spec: dict) -> tuple[bytes, str]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.safetensors"
            save_model(module, str(path), metadata={"architecture": json.dumps(spec)}, **kwargs)
            return path.read_bytes(), "w.safetensors"
    return write


TENSOR_LAYOUTS = {
    "tied embedding, torch.save": (_tied_lm, _torch_save),
    "shared blocks, torch.save": (_shared_blocks, _torch_save),
    "flat buffer views, torch.save": (_flat_buffer, _torch_save),
    "flat buffer views, safetensors": (_flat_buffer, _safetensors_save),
    "transposed views, torch.save": (_transposed, _torch_save),
    "transposed views, save_model force_contiguous": (_transposed, _safetensors_save_model(force_contiguous=True)),
    "slice of a larger tensor, torch.save": (_slice_of_larger, _torch_save),
    "tied embedding, safetensors save_model": pytest.param(_tied_lm, _safetensors_save_model()),
    "shared blocks, safetensors save_model": pytest.param(_shared_blocks, _safetensors_save_model()),
}


@pytest.mark.parametrize(("make", "write"), list(TENSOR_LAYOUTS.values()), ids=list(TENSOR_LAYOUTS))
def test_tied_shared_strided_and_flat_tensors_load(make, write):
    module, spec = make()
    data, filename = write(module, spec)
    kwargs = {"filename": filename} if filename.endswith(".safetensors") else {"filename": filename, "architecture": spec}
    x = _inputs(spec) if input_spec(spec) else torch.randint(0, 100, (3, 5))
    loaded = _assert_loads([(data, kwargs), (data, {**kwargs, **TRUSTED_ISOLATED})], module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))


# ---------------------------------------------------------------------------------------------
# torch.nn specs, BatchNorm buffers, pruned weights


def _conv_stack() -> nn.Sequential:
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.GroupNorm(2, 4), nn.GELU(), nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(4, 8), nn.LayerNorm(8), nn.SiLU(), nn.Linear(8, 3),
    )
    with torch.no_grad():
        seq[2].running_mean.uniform_(-1, 1)
        seq[2].num_batches_tracked.fill_(5)
    return seq.eval()


def _nested() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("features", nn.Sequential(nn.Linear(8, 16), nn.Tanh())),
                                      ("head", nn.Sequential(nn.Linear(16, 3)))])).eval()


SEQUENTIALS = {
    "conv stack": _conv_stack,
    "nested": _nested,
    "Unflatten given a list": pytest.param(lambda: nn.Sequential(nn.Unflatten(1, [2, 4]), nn.Flatten(), nn.Linear(8, 2))),
}


@pytest.mark.parametrize("make", list(SEQUENTIALS.values()), ids=list(SEQUENTIALS))
def test_torch_nn_sequential_specs_load(tmp_path, make):
    module = make()
    spec = describe_module(module)
    st = tmp_path / "seq.safetensors"
    save_file(dict(module.state_dict()), st, metadata={"architecture": json.dumps(spec)})
    _assert_loads([(st, {}), (_pt(module.state_dict()), {"filename": "seq.pt", "architecture": spec})],
                  module.state_dict(), module=module, spec=spec)


def test_a_trusted_pickled_sequential_opens_in_a_separate_process_with_its_weights():
    module = _conv_stack()
    loaded = load_model(_pt(module), filename="seq.pt", **TRUSTED_ISOLATED)
    _assert_same_weights(loaded.module, module.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))


def test_counting_a_spec_on_the_meta_device_does_not_import_the_compiler():
    code = ("import sys; from workbench.models.architectures import count_weights; "
            f"count_weights({json.dumps(SPECS['transformer'])}); print('torch._dynamo' in sys.modules)")
    import workbench

    env = {**os.environ, "PYTHONPATH": str(Path(workbench.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-500:]


BATCHNORM = {
    "with num_batches_tracked": lambda sd: sd,
    "without num_batches_tracked": lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("edit", list(BATCHNORM.values()), ids=list(BATCHNORM))
def test_batchnorm_statistics_load(edit):
    spec = SPECS["cnn"]
    module = _trained(spec)
    stored = edit(module.state_dict())
    loaded = load_model(_pt(stored), filename="bn.pt", architecture=spec)
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in stored.items())
    x = _inputs(spec)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))  # eval mode: the running statistics, not the batch's


def _pruned(state: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: v.masked_fill(torch.rand(v.shape, generator=g) < sparsity, 0.0) if v.ndim == 2 else v for k, v in state.items()}


@pytest.mark.parametrize("sparsity", [0.9, 0.99, 0.999])
def test_pruned_spec_weights_load(sparsity):
    spec = {"type": "mlp", "sizes": [512, 1024, 10], "activation": "relu"}
    state = _pruned(build_model(spec).state_dict(), sparsity)
    _assert_loads([(_pt(state), {"filename": "pruned.pt", "architecture": spec}),
                   (save(state, metadata={"architecture": json.dumps(spec)}), {"filename": "pruned.safetensors"})], state)


# ---------------------------------------------------------------------------------------------
# Hugging Face models


def _text(vocab: int = 100) -> dict:
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seq2seq() -> dict:
    inputs = _text()
    return {**inputs, "decoder_input_ids": inputs["input_ids"][:, :4]}


def _pixels() -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


BERT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
ALBERT = {**BERT, "embedding_size": 16}
VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_CAUSAL = {"vocab_size": 100, "num_layers": 2, "num_heads": 2, "hidden_size": 32}

HF_FAMILIES = {
    "bert": ("BertModel", "BertConfig", BERT, _text, {}),
    "bert sequence classification": ("BertForSequenceClassification", "BertConfig",
                                     {**BERT, "num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"},
                                      "label2id": {"neg": 0, "neu": 1, "pos": 2}}, _text, {}),
    "bert sharded": ("BertModel", "BertConfig", BERT, _text, {"max_shard_size": "20KB"}),
    "bert float16": ("BertModel", "BertConfig", {**BERT, "torch_dtype": "float16"}, _text, {}),
    "gpt2 tied lm head": ("GPT2LMHeadModel", "GPT2Config", {"vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2}, _text, {}),
    "distilbert": ("DistilBertModel", "DistilBertConfig", {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 2,
                                                         "hidden_dim": 64, "max_position_embeddings": 64}, _text, {}),
    "albert shared layers": ("AlbertModel", "AlbertConfig", {**ALBERT, "num_hidden_layers": 12}, _text, {}),
    "vit image classification": ("ViTForImageClassification", "ViTConfig", {**VIT, "num_labels": 5}, _pixels, {}),
    "resnet batchnorm": ("ResNetModel", "ResNetConfig", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                                        "layer_type": "basic"}, _pixels, {}),
    "t5": ("T5ForConditionalGeneration", "T5Config", {"vocab_size": 100, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
                                                     "num_decoder_layers": 2, "num_heads": 2}, _seq2seq, {}),
    "bart": ("BartForConditionalGeneration", "BartConfig", {"vocab_size": 100, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                                                           "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                                           "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                                                           "max_position_embeddings": 64}, _seq2seq, {}),
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}, _text, {}),
    "gpt-neo context 256": ("GPTNeoForCausalLM", "GPTNeoConfig", {**TINY_CAUSAL, "attention_types": [[["global", "local"], 1]],
                                                                 "max_position_embeddings": 256}, _text, {}),
    "gpt-neo context 2048": pytest.param("GPTNeoForCausalLM", "GPTNeoConfig", {**TINY_CAUSAL, "attention_types": [[["global", "local"], 1]],
                                                                              "max_position_embeddings": 2048}, _text, {}),
    "gpt-bigcode context 2048": pytest.param("GPTBigCodeForCausalLM", "GPTBigCodeConfig", {"vocab_size": 100, "n_embd": 32, "n_layer": 2,
                                                                                          "n_head": 2, "n_positions": 2048}, _text, {}),
    "albert 48 shared layers": pytest.param("AlbertModel", "AlbertConfig", {**ALBERT, "num_hidden_layers": 48}, _text, {}),
}


def _zips(folder: Path) -> dict[str, Path]:
    """The folder zipped as people do it: zipfile deflated under the folder's name, stored flat, shutil.make_archive."""
    deflated, stored = folder.parent / f"{folder.name}-deflated.zip", folder.parent / f"{folder.name}-stored.zip"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zd, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zs:
        for f in sorted(folder.iterdir()):
            zd.write(f, f"{folder.name}/{f.name}")
            zs.write(f, f.name)
    archive = Path(shutil.make_archive(str(folder.parent / f"{folder.name}-archive"), "zip", root_dir=folder.parent, base_dir=folder.name))
    return {"deflated": deflated, "stored": stored, "make_archive": archive}


def _hf_reference(transformers, cls: str, config_cls: str, config: dict) -> nn.Module:
    config = dict(config)
    dtype = getattr(torch, config.pop("torch_dtype", "float32"))
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).to(dtype).eval()


def _assert_same_outputs(loaded: nn.Module, reference: nn.Module, inputs: dict) -> None:
    dtype = next(reference.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        a, b = loaded(**inputs), reference(**inputs)
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize(("cls", "config_cls", "config", "inputs", "save_kwargs"), list(HF_FAMILIES.values()), ids=list(HF_FAMILIES))
def test_huggingface_models_load_from_folders_and_zips(tmp_path, cls, config_cls, config, inputs, save_kwargs):
    transformers = pytest.importorskip("transformers")
    reference = _hf_reference(transformers, cls, config_cls, config)
    folder = tmp_path / "model"
    reference.save_pretrained(folder, **save_kwargs)
    if save_kwargs.get("max_shard_size"):
        assert (folder / "model.safetensors.index.json").exists()
    sources = [(folder, {}), (folder, TRUSTED_ISOLATED)]
    for name, archive in _zips(folder).items():
        sources += [(archive, {}), (archive.read_bytes(), {"filename": f"{name}.zip", **TRUSTED_ISOLATED})]
    for source, kwargs in sources:
        loaded = load_model(source, **kwargs)
        assert loaded.source_format == "huggingface"
        _assert_same_weights(loaded.module, reference.state_dict())
    _assert_same_outputs(loaded.module, reference, inputs())
    vision = "pixel_values" in inputs()
    assert loaded.takes_tokens != vision and (not vision or loaded.input_shape[0] == 3)
    positions = getattr(reference.config, "max_position_embeddings", None)
    assert loaded.metadata.get("max_positions") == (positions if not vision and isinstance(positions, int) else None)
    assert [i for i in layer_info(loaded) if i.output_shape is not None]  # the workbench's own probe batch runs


def _hub_snapshot(folder: Path, reference: nn.Module) -> Path:
    """A Hub download that holds both formats: model.safetensors and sharded pytorch_model.bin with its index."""
    state = reference.state_dict()
    keys = list(state)
    shards = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin" for i, k in enumerate(keys)}
    for shard in sorted(set(shards.values())):
        torch.save({k: state[k] for k, s in shards.items() if s == shard}, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return folder


def _trainer_checkpoint(folder: Path, reference: nn.Module) -> Path:
    """A transformers Trainer checkpoint-N folder: pickled optimizer and trainer state beside the safetensors."""
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    torch.save({"lr": 1e-3}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500, "log_history": [{"loss": 0.5}]}))
    (folder / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(100)))
    return folder


def _symlinked(folder: Path, reference: nn.Module) -> Path:
    """The Hub cache layout: a snapshot folder of symlinks into a blobs folder."""
    blobs, snapshot = folder.parent / "blobs", folder.parent / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for f in folder.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    return snapshot


def _zipped(prefix: str, extra: list[tuple[str, bytes]] = (), sep: str = "/"):
    def make(folder: Path, reference: nn.Module) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.iterdir()):
                zf.writestr(zipfile.ZipInfo(f"{prefix}{sep}{f.name}" if prefix else f.name), f.read_bytes())
            for name, data in extra:
                zf.writestr(name, data)
        return buf.getvalue()
    return make


def _config_edit(**changes):
    def make(folder: Path, reference: nn.Module) -> Path:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder
    return make


def _pruned_zip(sparsity: float, shard: str | None):
    def make(folder: Path, reference: nn.Module) -> bytes:
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim == 2:
                    p.masked_fill_(torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < sparsity, 0.0)
        shutil.rmtree(folder)
        reference.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        return Path(shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)).read_bytes()
    return make


BIG_BERT = {**BERT, "vocab_size": 2000, "hidden_size": 128, "intermediate_size": 512}  # 2.6 MiB of weights
HF_LAYOUTS = {
    "Trainer checkpoint folder": (BERT, _trainer_checkpoint),
    "Hub cache snapshot of symlinks": (BERT, _symlinked),
    "macOS Finder zip": (BERT, _zipped("tiny", [("__MACOSX/tiny/._config.json", b"\x00\x05\x16\x07" + bytes(80)),
                                                ("tiny/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(100))])),
    "zip of a run folder": (BERT, _zipped("run1/final", [("run1/runs/events.out.tfevents.1", os.urandom(2000))])),
    "zip of a 99%-pruned model": (BIG_BERT, _pruned_zip(0.99, None)),
    "Hub snapshot with a .bin index too": pytest.param(BERT, _hub_snapshot),
    "Windows zip with backslashes": pytest.param(BERT, _zipped("tiny", sep="\\")),
    "config with quantization_config null": pytest.param(BERT, _config_edit(quantization_config=None)),
    "zip of a 99.9%-pruned model": pytest.param(BIG_BERT, _pruned_zip(0.999, None)),
    "zip of a 99.9%-pruned sharded model": pytest.param(BIG_BERT, _pruned_zip(0.999, "400KB")),
}


@pytest.mark.parametrize(("config", "layout"), list(HF_LAYOUTS.values()), ids=list(HF_LAYOUTS))
def test_huggingface_folder_layouts_load(tmp_path, config, layout):
    transformers = pytest.importorskip("transformers")
    reference = _hf_reference(transformers, "BertModel", "BertConfig", config)
    folder = tmp_path / "tiny"
    reference.save_pretrained(folder)
    source = layout(folder, reference)
    loaded = load_model(source, filename="tiny.zip") if isinstance(source, bytes) else load_model(source)
    _assert_same_weights(loaded.module, reference.state_dict())
    _assert_same_outputs(loaded.module, reference, _text())
