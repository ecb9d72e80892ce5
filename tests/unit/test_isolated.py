"""Trusted full pickles opened in a separate process, and the ``torch.nn`` spec that brings modules back."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from workbench import load_model
from workbench.errors import ArchitectureError, CorruptFileError, UnsafeFileError
from workbench.models.architectures import build_model, describe_module


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(4),
                        nn.GELU(approximate="tanh"), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 6, 1, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(6), nn.Dropout(0.3), nn.Linear(6, 3))
    cnn[2].running_mean.uniform_(-1, 1)
    nested = nn.Sequential(nn.Linear(5, 7), nn.Sequential(nn.Tanh(), nn.Linear(7, 7), nn.LeakyReLU(0.2)),
                           nn.BatchNorm1d(7, affine=False, momentum=None), nn.Linear(7, 2))
    seq = nn.Sequential(nn.Embedding(20, 6, padding_idx=0), nn.Conv1d(3, 3, 2), nn.ELU(alpha=0.5), nn.Flatten())
    return {
        "cnn": (cnn.eval(), torch.randn(4, 64)),
        "nested mlp": (nested.eval(), torch.randn(4, 5)),
        "embedding": (seq.eval(), torch.randint(0, 20, (4, 3))),
    }


@pytest.mark.parametrize("name", list(_zoo()))
def test_described_module_rebuilds_with_the_same_structure_and_function(name):
    module, x = _zoo()[name]
    spec = describe_module(module)
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(module.state_dict())
    assert repr(rebuilt) == repr(module)
    assert [n for n, _ in rebuilt.named_modules()] == [n for n, _ in module.named_modules()]
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), module(x))


def test_describe_infers_the_input_shape_where_it_can():
    assert describe_module(_zoo()["cnn"][0])["input_shape"] == [64]
    assert describe_module(_zoo()["nested mlp"][0])["input_shape"] == [5]
    assert "input_shape" not in describe_module(_zoo()["embedding"][0])


class _Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x).relu()


class _Subclass(nn.Linear):
    pass


def test_modules_with_their_own_code_are_not_described():
    with pytest.raises(ArchitectureError, match=r"'1' \(.*_Own\) is not a stock torch\.nn layer, so its code would be needed"):
        describe_module(nn.Sequential(nn.Linear(2, 2), _Own()))
    with pytest.raises(ArchitectureError, match=r"'0' \(.*_Subclass\) is not a stock torch\.nn layer"):
        describe_module(nn.Sequential(_Subclass(2, 2)))
    with pytest.raises(ArchitectureError, match=r"the model \(.*_Own\) is not a stock torch\.nn layer"):
        describe_module(_Own())


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ({"class": "Module"}, r"Layer class 'Module' at '' is not one a 'torch\.nn' spec may name; allowed: Sequential, "),
        ({"class": "Sequential", "children": [["a", {"class": "Linear", "args": {"in_features": 2}}]]},
         r"^The 'torch\.nn' architecture spec could not be built \(Linear.__init__\(\) missing 1 required positional argument: 'out_features'\); check its sizes and layer arguments\.$"),
        ({"class": "Sequential", "children": {"a": 1}}, r"needs 'children': a list of \[name, node\] pairs"),
        ({"class": "Sequential", "children": [["a", {"class": "ReLU", "args": [1]}]]}, r"The 'args' of 'a' in the 'torch\.nn' spec must be an object"),
    ],
    ids=["not-a-layer", "missing-argument", "children-not-a-list", "args-not-an-object"],
)
def test_bad_torch_nn_specs_are_refused(root, message):
    with pytest.raises(ArchitectureError, match=message):
        build_model({"type": "torch.nn", "root": root})


def test_isolated_trusted_pickle_loads_stock_module():
    module, x = _zoo()["cnn"]
    data = _saved(module)
    with pytest.raises(UnsafeFileError, match=r"the app offers 'I trust this file' when it is started with 'workbench app --trust-uploads'"):
        load_model(data, filename="cnn.pt", isolate=True)
    loaded = load_model(data, filename="cnn.pt", trust_remote_code=True, isolate=True)
    in_process = load_model(data, filename="cnn.pt", trust_remote_code=True)
    assert loaded.source_format == "pickle (trusted, opened in a separate process)"
    assert loaded.architecture["type"] == "torch.nn" and loaded.input_shape == (64,)
    assert loaded.sha256 == in_process.sha256
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), module(x))


@pytest.fixture
def own_code_module(tmp_path, monkeypatch):
    """A module class in an importable file whose unpickling writes the process id to a marker file."""
    marker = tmp_path / "ran-in"
    (tmp_path / "own_code_net.py").write_text(textwrap.dedent(f"""
        import os
        from torch import nn

        class OwnNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 2)

            def forward(self, x):
                return self.fc(x) * 2

            def __setstate__(self, state):
                super().__setstate__(state)
                with open({str(marker)!r}, "w") as f:
                    f.write(str(os.getpid()))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    import own_code_net

    yield own_code_net.OwnNet(), marker
    sys.modules.pop("own_code_net", None)


def test_isolated_module_with_its_own_code_is_refused_and_its_code_ran_elsewhere(own_code_module):
    module, marker = own_code_module
    data = _saved(module)
    with pytest.raises(UnsafeFileError, match=(
            r"^'own\.pt' was unpickled in a separate process, so its code has run, but nothing came back: the model "
            r"\(own_code_net\.OwnNet\) is not a stock torch\.nn layer, so its code would be needed to run it\. Only weights and "
            r"stock torch\.nn layers come back from that process; load it from Python with "
            r"load_model\(path, trust_remote_code=True\)")):
        load_model(data, filename="own.pt", trust_remote_code=True, isolate=True)
    assert marker.exists() and marker.read_text() != str(os.getpid()), "the pickle's code ran in this process"
    loaded = load_model(data, filename="own.pt", trust_remote_code=True)  # from Python, trusted, in this process
    assert marker.read_text() == str(os.getpid())
    torch.testing.assert_close(loaded.module(torch.ones(1, 3)), module(torch.ones(1, 3)))


class _Gadget:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import os; open({str(self.marker)!r}, 'w').write(str(os.getpid()))",))


def test_isolated_malicious_pickle_runs_only_in_the_child(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"fc1.weight": torch.zeros(1), "evil": _Gadget(marker)})
    with pytest.raises(UnsafeFileError, match=r"^'evil\.pt' was unpickled in a separate process, so its code has run, but nothing "
                                              r"came back: it holds a dict, not a state dict of tensors\. Only weights"):
        load_model(data, filename="evil.pt", trust_remote_code=True, isolate=True)
    assert marker.exists() and marker.read_text() != str(os.getpid())


def test_isolated_state_dict_pickle_needs_a_spec_like_any_state_dict():
    module = build_model({"type": "mlp", "sizes": [4, 3, 2]})
    data = _saved({"state_dict": module.state_dict(), "args": argparse.Namespace(lr=0.1)})  # a class: full unpickling
    with pytest.raises(ArchitectureError, match=r"holds weights but no architecture spec"):
        load_model(data, filename="ckpt.pt", trust_remote_code=True, isolate=True)
    loaded = load_model(data, filename="ckpt.pt", trust_remote_code=True, isolate=True,
                        architecture={"type": "mlp", "sizes": [4, 3, 2]})
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded.module(x), module(x))


def test_isolated_pickle_whose_code_is_missing_is_reported():
    data = pickle.dumps(argparse.Namespace(lr=0.1), protocol=0).replace(b"argparse", b"no_such_mod")
    hint = r"the file needs the code that defined the model .* save model.state_dict\(\) with safetensors and give its architecture spec\.$"
    for isolate in (True, False):
        with pytest.raises(CorruptFileError, match=r"could not be unpickled even with trust enabled \(ModuleNotFoundError: No module named.*" + hint):
            load_model(data, filename="gone.pt", trust_remote_code=True, isolate=isolate)


def test_isolated_torchscript_archive_is_refused_without_running_it():
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(2, 2))), buf)
    with pytest.raises(UnsafeFileError, match=r"is a torchscript archive, whose code would run in this process; it is not opened here"):
        load_model(buf.getvalue(), filename="m.pt", trust_remote_code=True, isolate=True)


def test_the_app_opens_trusted_uploads_in_a_separate_process(own_code_module):
    from pages import _state

    module, marker = own_code_module
    stock, _ = _zoo()["nested mlp"]
    loaded = _state.load_uploaded_model(_saved(stock), "stock.pt", None, True)
    assert loaded.source_format == "pickle (trusted, opened in a separate process)"
    with pytest.raises(UnsafeFileError, match=r"was unpickled in a separate process, so its code has run"):
        _state.load_uploaded_model(_saved(module), "own.pt", None, True)
    assert marker.read_text() != str(os.getpid())
