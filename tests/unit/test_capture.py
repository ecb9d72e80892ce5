"""Pooled capture: every shortcut gives what pooling the layer's own output gives, and falls back when unsure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench import extract
from workbench.activations.capture import (
    PooledCapture,
    hooks_on,
    pool,
)
from workbench.models import wrap_module


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _direct(module: nn.Module, x: torch.Tensor, layers: list[str], rule: str, channel_first: bool = False) -> dict:
    """Reference: pool each layer's own output, float64 model."""
    out: dict[str, torch.Tensor] = {}
    with hooks_on(module, layers, lambda n, t: out.__setitem__(n, pool(t, rule, channel_first=channel_first))), torch.inference_mode():
        module(x)
    return out


def _captured(module: nn.Module, x: torch.Tensor, layers: list[str], rule: str, channel_first: bool = False):
    with PooledCapture(module, layers, rule, channel_first=channel_first) as capture, torch.inference_mode():
        capture.begin_batch()
        module(x)
        pooled = dict(capture.end_batch())
        sources = dict(capture.sources)
    assert _hook_count(module) == 0, "a hook was left on the module"
    return pooled, sources


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 16, 3, padding=1))
    net.add_module("bn1", nn.BatchNorm2d(16))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(16, 16, 3, stride=2, padding=1))
    net.add_module("bn2", nn.BatchNorm2d(16))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc", nn.Linear(16, 4))
    for bn in (net.bn1, net.bn2):  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
    return net.eval()


LAYERS = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "fc"]


def test_cnn_shortcuts_agree_with_pooling_every_map():
    net = _cnn().double()
    x = torch.randn(50, 3, 16, 16, dtype=torch.float64)
    direct = _direct(net, x, LAYERS, "mean")
    pooled, sources = _captured(net, x, LAYERS, "mean")
    assert sources == {"conv1": "map", "bn1": "affine", "relu1": "map", "conv2": "map", "bn2": "affine",
                       "relu2": "global pool", "pool": "map", "fc": "map"}
    for layer in LAYERS:
        assert pooled[layer].dtype == torch.float32 and pooled[layer].shape == direct[layer].shape
        torch.testing.assert_close(pooled[layer].double(), direct[layer], rtol=1e-6, atol=1e-6, msg=layer)


def test_float32_shortcuts_are_as_close_to_float64_as_direct_pooling():
    net = _cnn()
    x = torch.randn(64, 3, 16, 16)
    exact = _direct(net.double(), x.double(), LAYERS, "mean")
    net.float()
    direct = _direct(net, x, LAYERS, "mean")
    pooled, _ = _captured(net, x, LAYERS, "mean")
    for layer in ("conv1", "bn1", "bn2", "relu2"):
        err_direct = (direct[layer].double() - exact[layer]).abs().max().item()
        err_pooled = (pooled[layer].double() - exact[layer]).abs().max().item()
        assert err_pooled <= max(4 * err_direct, 1e-6), (layer, err_pooled, err_direct)


def test_max_pooling_takes_a_following_global_max_pool():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten()).eval()
    x = torch.randn(9, 2, 20)
    direct = _direct(net, x, ["0", "1"], "max", channel_first=True)
    pooled, sources = _captured(net, x, ["0", "1"], "max", channel_first=True)
    assert sources == {"0": "map", "1": "global pool"}
    for layer in ("0", "1"):
        torch.testing.assert_close(pooled[layer], direct[layer])


def test_nested_sequential_paths():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), nn.ReLU()),
                        nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1))), nn.Flatten())
    x = torch.randn(6, 1, 10, 10)
    layers = ["0.0", "0.1", "0.2", "1.0", "1.1"]
    direct = _direct(net, x, layers, "mean")
    pooled, sources = _captured(net, x, layers, "mean")
    assert sources == {"0.0": "map", "0.1": "affine", "0.2": "map", "1.0": "map", "1.1": "global pool"}
    for layer in layers:
        torch.testing.assert_close(pooled[layer], direct[layer], rtol=1e-5, atol=1e-5)


class _Doubled(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_shortcuts_fall_back_when_the_computation_is_not_the_stock_one():
    torch.manual_seed(0)
    net = nn.Sequential(_Doubled(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.AdaptiveAvgPool2d(1))
    net[1].train()  # batch statistics: not a fixed affine map
    x = torch.randn(7, 1, 8, 8)
    layers = ["0", "1", "2", "3"]
    direct = _direct(net, x, layers, "mean")
    pooled, sources = _captured(net, x, layers, "mean")
    assert sources == {"0": "map", "1": "map", "2": "map", "3": "global pool"}
    for layer in layers:
        torch.testing.assert_close(pooled[layer], direct[layer])


class _DoubledPool(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _replace_forward(module: nn.Module, change) -> nn.Module:
    stock = module.forward
    module.forward = lambda x: change(stock(x))
    return module


@pytest.mark.parametrize("net", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _DoubledPool(1), nn.Flatten()),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _replace_forward(nn.AdaptiveAvgPool2d(1), lambda y: y - 3)),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _replace_forward(nn.BatchNorm2d(4).eval(), lambda y: y * 0 + 5)),
    lambda: _replace_forward(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), lambda y: y),
], ids=["pool-subclass-forward", "pool-instance-forward", "batchnorm-instance-forward", "sequential-instance-forward"])
def test_a_module_whose_forward_is_replaced_takes_no_shortcut(net):
    torch.manual_seed(0)
    net = net().eval()
    x = torch.randn(6, 3, 7, 7)
    layers = ["1", "2"] if isinstance(net[2], nn.BatchNorm2d) else ["1"]
    direct = _direct(net, x, layers, "mean")
    pooled, sources = _captured(net, x, layers, "mean")
    assert set(sources.values()) == {"map"}
    for layer in layers:
        torch.testing.assert_close(pooled[layer], direct[layer])


def test_hooks_of_others_disable_the_shortcuts_they_could_break():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    handles = [net[0].register_forward_hook(lambda _m, _i, out: out + 1),  # changes the conv's output
               net[2].register_forward_hook(lambda _m, _i, out: out * 3)]  # changes the pool's output
    try:
        x = torch.randn(5, 1, 8, 8)
        direct = _direct(net, x, ["0", "1"], "mean")
        with PooledCapture(net, ["0", "1"], "mean", channel_first=False) as capture, torch.inference_mode():
            capture.begin_batch()
            net(x)
            pooled, sources = dict(capture.end_batch()), dict(capture.sources)
    finally:
        for h in handles:
            h.remove()
    assert sources == {"0": "map", "1": "map"}
    torch.testing.assert_close(pooled["0"], direct["0"])
    torch.testing.assert_close(pooled["1"], direct["1"])
    assert _hook_count(net) == 0


def test_a_map_whose_pool_sees_another_tensor_is_pooled_itself():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    handle = net[2].register_forward_pre_hook(lambda _m, args: (args[0] * 2,))  # the pool reads a new tensor
    try:
        x = torch.randn(5, 1, 8, 8)
        direct = _direct(net, x, ["1"], "mean")
        pooled, sources = _captured_keep_hooks(net, x, ["1"])
    finally:
        handle.remove()
    assert sources == {"1": "map"}
    torch.testing.assert_close(pooled["1"], direct["1"])


def _captured_keep_hooks(net: nn.Module, x: torch.Tensor, layers: list[str]):
    with PooledCapture(net, layers, "mean", channel_first=False) as capture, torch.inference_mode():
        capture.begin_batch()
        net(x)
        return dict(capture.end_batch()), dict(capture.sources)


def test_hooks_removed_when_the_forward_pass_raises():
    net = _cnn()
    with pytest.raises(RuntimeError), PooledCapture(net, LAYERS, "mean", channel_first=False) as capture, torch.inference_mode():
        capture.begin_batch()
        net(torch.randn(2, 5, 16, 16))  # wrong channel count
    assert _hook_count(net) == 0


def test_extract_of_the_sample_cnn_matches_direct_pooling(sample_model, digits_test, tmp_path):
    cnn = sample_model("cnn_seed0")
    layers = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "fc1", "out"]
    acts = extract(cnn, digits_test, layers, batch_size=128, cache_dir=tmp_path)
    direct = _direct(cnn.module, digits_test.x, layers, "mean")
    for layer in layers:
        torch.testing.assert_close(acts[layer], direct[layer], rtol=1e-5, atol=1e-5, msg=layer)


def test_extract_with_bare_conv_module(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    model = wrap_module(net, name="tiny-cnn")
    x = torch.randn(40, 64)
    acts = extract(model, x, ["1", "2"], batch_size=16, cache_dir=tmp_path)
    direct = _direct(net, x, ["1", "2"], "mean")
    torch.testing.assert_close(acts["1"], direct["1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acts["2"], direct["2"])
    assert _hook_count(net) == 0


def test_a_sample_that_is_all_padding_pools_to_zeros():
    out = torch.randn(3, 4, 2)
    out[1] = float("inf")  # whatever the model gives for padding is left out
    mask = torch.tensor([[True, True, True, False], [False, False, False, False], [False, True, True, False]])
    for rule in ("mean", "max", "last", "cls"):
        pooled = pool(out, rule, channel_first=False, mask=mask)
        assert torch.equal(pooled[1], torch.zeros(2)), rule
        assert torch.isfinite(pooled).all(), rule
    torch.testing.assert_close(pool(out, "max", channel_first=False, mask=mask)[0], out[0, :3].amax(0))
    torch.testing.assert_close(pool(out, "last", channel_first=False, mask=mask)[[0, 2]], torch.stack([out[0, 2], out[2, 2]]))
    torch.testing.assert_close(pool(out, "cls", channel_first=False, mask=mask)[[0, 2]], out[[0, 2], 0])


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_layout_of_each_layer():
    from workbench.activations.capture import channel_first_layers, channel_first_model

    text_cnn = nn.Sequential(nn.Embedding(30, 8), nn.Dropout(0.1), _Transpose(), nn.Conv1d(8, 16, 3), nn.ReLU(),
                             nn.BatchNorm1d(16), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 2))
    assert channel_first_model(text_cnn)
    layout = channel_first_layers(text_cnn, [str(i) for i in range(9)])
    assert layout == {"0": False, "1": False, "2": True, "3": True, "4": True, "5": True, "6": True, "7": True, "8": True}
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    hybrid = nn.Sequential(nn.Embedding(30, 8), _Transpose(), nn.Conv1d(8, 8, 3, padding=1), _Transpose(), encoder).eval()
    assert not channel_first_model(hybrid)
    assert channel_first_layers(hybrid, ["0", "1", "2", "3", "4"]) == {"0": False, "1": False, "2": True, "3": False, "4": False}
    ids = torch.randint(1, 30, (4, 7))
    with torch.inference_mode():
        conv = hybrid[2](hybrid[0](ids).transpose(1, 2))
        enc = hybrid(ids)
    pooled, _ = _captured(hybrid, ids, ["2", "4"], "mean", channel_first=channel_first_layers(hybrid, ["2", "4"]))
    torch.testing.assert_close(pooled["2"], conv.mean(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled["4"], enc.mean(1))


# ---------------------------------------------------------------------------------------------
# the routes that rely on an nn.Sequential handing one child's output to the next


def _extracted(model: nn.Module, x: torch.Tensor, layers: list[str], tmp_path, **kwargs) -> dict[str, torch.Tensor]:
    kwargs.setdefault("device", "cpu")  # the routes are compared with float64 means of what the CPU kernels output
    acts = extract(model, x, layers, cache_dir=tmp_path, **kwargs)
    return {k: acts[k].double() for k in layers}


def _own_mean(model: nn.Module, x: torch.Tensor, layer: str, batch_size: int | None = None) -> torch.Tensor:
    """The float64 spatial mean of what ``layer`` outputs, batch by batch as extract runs them."""
    got: list[torch.Tensor] = []
    target = dict(model.named_modules())[layer]
    handle = target.register_forward_hook(lambda _m, _i, o: got.append(o.double().mean(tuple(range(2, o.ndim)))))
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size or len(x)):
                model.eval()(x[start:start + (batch_size or len(x))])
    finally:
        handle.remove()
    return torch.cat(got)


class _OwnLoop(nn.Module):
    """Calls the children of a plain nn.Sequential itself, with an in-place ReLU after the conv."""

    def __init__(self, second: nn.Module):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), second)

    def forward(self, x):
        for m in self.body:
            x = m(x)
            if isinstance(m, nn.Conv2d):
                torch.relu_(x)
        return x


class _PoolsACopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        h = self.body[0](x)
        out = self.body[1](h.clone())
        h.relu_()  # after the pool: the conv's output as the layer gave it is the one before this
        return out


def _shifted_batchnorm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
    return bn


@pytest.mark.parametrize(("model", "layers", "checked"), [
    (lambda: _OwnLoop(nn.AdaptiveAvgPool2d(1)), ["body.0"], "body.0"),
    (lambda: _OwnLoop(_shifted_batchnorm(8)), ["body.0", "body.1"], "body.1"),
    (_PoolsACopy, ["body.0"], "body.0"),
])
def test_a_model_that_calls_the_children_itself_gets_the_maps_it_computed(model, layers, checked, tmp_path):
    torch.manual_seed(0)
    net, x = model(), torch.randn(6, 3, 10, 10)
    torch.testing.assert_close(_extracted(net, x, layers, tmp_path)[checked], _own_mean(net, x, checked), rtol=0, atol=1e-6)


def _relu_in_place(_module, args):
    args[0].clamp_(min=0)


@pytest.mark.parametrize(("second", "layers", "checked"), [
    (lambda: _shifted_batchnorm(8), ["0", "1"], "1"),
    (lambda: nn.AdaptiveAvgPool2d(1), ["0"], "0"),
])
@pytest.mark.parametrize("where", ["module", "global"])
def test_a_pre_hook_that_changes_the_input_in_place_turns_the_shortcut_off(second, layers, checked, where, tmp_path):
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Conv2d(3, 8, 3), second()), torch.randn(6, 3, 10, 10)
    handle = (net[1].register_forward_pre_hook(_relu_in_place) if where == "module"
              else torch.nn.modules.module.register_module_forward_pre_hook(
                  lambda m, args: _relu_in_place(m, args) if m is net[1] else None))
    try:
        expected = _own_mean(net, x, checked)
        torch.testing.assert_close(_extracted(net, x, layers, tmp_path)[checked], expected, rtol=0, atol=1e-6)
    finally:
        handle.remove()


@pytest.mark.parametrize("width", [6, 5])
def test_a_batchnorm_over_the_tokens_of_an_embedding_is_read_not_derived(width, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(20, width), nn.BatchNorm1d(6))  # BatchNorm1d's channels are the 6 tokens
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].weight.uniform_(0.5, 2)
    tokens = torch.randint(1, 20, (8, 6))
    got = _extracted(net, tokens, ["0", "1"], tmp_path)["1"]
    torch.testing.assert_close(got, _own_mean(net, tokens, "1"), rtol=0, atol=1e-6)


def test_a_conv_run_under_autocast_is_pooled_from_what_it_output(tmp_path):
    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 64, 3, padding=1)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.c(x)

    torch.manual_seed(0)
    net, x = Autocast(), torch.randn(6, 3, 10, 10)
    with PooledCapture(net, ["c"], "mean", channel_first=False) as capture, torch.inference_mode():
        capture.begin_batch()
        net(x)
        capture.end_batch()
        assert capture.sources == {"c": "map"}  # the bfloat16 output, not the float32 mean of the input
    torch.testing.assert_close(_extracted(net, x, ["c"], tmp_path)["c"], _own_mean(net, x, "c"), rtol=0, atol=1e-6)


def test_conv_weights_that_change_between_batches_are_used_as_they_are(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, padding=1)
    base = conv.weight.detach().clone()

    def doubled_for_odd_batches(module, args):
        with torch.no_grad():
            module.weight.copy_(base * (1 + args[0].shape[0] % 2))

    conv.register_forward_pre_hook(doubled_for_odd_batches)
    net, x = nn.Sequential(conv), torch.randn(5, 3, 10, 10)
    got = _extracted(net, x, ["0"], tmp_path, batch_size=2)["0"]  # batches of 2, 2 and 1
    torch.testing.assert_close(got, _own_mean(net, x, "0", batch_size=2), rtol=0, atol=1e-6)


def test_a_float64_batchnorm_mean_keeps_float64_accuracy():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.fill_(50.0)
        bn.running_var.fill_(1e-4)
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.bias.fill_(50.0)  # conv means near the running mean: the BatchNorm magnifies their last digits 100 times
    net = nn.Sequential(conv, bn).double().eval()
    x = torch.randn(16, 3, 10, 10, dtype=torch.float64)
    pooled, sources = _captured(net, x, ["0", "1"], "mean")
    assert sources["1"] == "affine"
    exact = _direct(net, x, ["1"], "mean")["1"]
    assert (pooled["1"].double() - exact).abs().max() <= 1e-6 * exact.abs().max()  # 1e-4 through float32 means


def test_a_weight_normalised_conv_can_be_extracted_again(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old weight_norm is deprecated, but models still use it
        net = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 3)))
    x = torch.randn(4, 3, 6, 6)
    first = extract(net, x, ["0"], cache_dir=tmp_path)["0"]
    again = extract(net, x, ["0"], cache_dir=tmp_path)["0"]  # its weight was recomputed under inference mode
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first.double(), _own_mean(net, x, "0"), rtol=0, atol=1e-6)
