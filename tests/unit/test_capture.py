"""Pooled capture: every shortcut gives what pooling the layer's own output gives, and falls back when unsure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench import extract
from workbench.activations.capture import (
    PooledCapture,
    conv_mean_from_input,
    conv_mean_plan,
    hooks_on,
    pool,
    window_counts,
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


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (4, 6, 11, 13)),
        (nn.Conv2d(6, 8, 3), (4, 6, 11, 13)),
        (nn.Conv2d(6, 8, 4, stride=3, dilation=2), (4, 6, 12, 13)),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (3, 6, 7, 7)),
        (nn.Conv1d(3, 5, 4, stride=3, padding=2), (4, 3, 17)),
        (nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 2)), (2, 2, 5, 6, 7)),
    ],
    ids=["2d-strided-dilated-grouped", "2d-valid", "2d-stride3-dilation2", "depthwise-no-bias", "1d", "3d"],
)
def test_conv_mean_from_input_is_the_mean_of_the_output(conv, shape):
    torch.manual_seed(1)
    conv = conv.double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = conv(x)
    plan = conv_mean_plan(conv, tuple(x.shape[2:]), tuple(y.shape[2:]), x.device, torch.float64)
    torch.testing.assert_close(conv_mean_from_input(x, plan), y.mean(tuple(range(2, y.ndim))), rtol=0, atol=1e-13)


def test_window_counts_mark_the_inputs_each_offset_reads():
    # length 5, kernel 3, stride 2, padding 1: outputs 0, 1, 2 read inputs (-1, 0, 1), (1, 2, 3), (3, 4, 5)
    a = window_counts(5, 3, 3, 2, 1, 1)
    expected = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(a, expected)


def test_cnn_shortcuts_agree_with_pooling_every_map():
    net = _cnn().double()
    x = torch.randn(50, 3, 16, 16, dtype=torch.float64)
    direct = _direct(net, x, LAYERS, "mean")
    pooled, sources = _captured(net, x, LAYERS, "mean")
    assert sources == {"conv1": "input", "bn1": "affine", "relu1": "map", "conv2": "map", "bn2": "affine",
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
    assert sources == {"0.0": "input", "0.1": "affine", "0.2": "map", "1.0": "map", "1.1": "global pool"}
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


def test_a_large_conv_input_is_not_used():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 4, 3, padding=1)).eval()  # the input is 4x the output: read the output
    x = torch.randn(3, 16, 8, 8)
    pooled, sources = _captured(net, x, ["0"], "mean")
    assert sources == {"0": "map"}
    torch.testing.assert_close(pooled["0"], _direct(net, x, ["0"], "mean")["0"])


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


def test_a_conv_whose_mean_map_would_be_too_large_is_read(monkeypatch):
    import workbench.activations.capture as capture_module

    monkeypatch.setattr(capture_module, "MAX_MEAN_MAP", 100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1)).eval()  # 1 * 64 * 8 entries > 100
    x = torch.randn(3, 1, 8, 8)
    pooled, sources = _captured(net, x, ["0"], "mean")
    assert sources == {"0": "map"}
    torch.testing.assert_close(pooled["0"], _direct(net, x, ["0"], "mean")["0"])


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
