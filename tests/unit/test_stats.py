"""Per-layer activation statistics against hand-computed values, and the histogram figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.analyses.stats import activation_stats, layer_stats
from workbench.errors import DataError, ParameterError
from workbench.plots.activations import layer_histograms


def _three_units(n: int = 200, seed: int = 0) -> np.ndarray:
    """Unit 0 dead (always 0), unit 1 constant 3.0, unit 2 standard normal."""
    rng = np.random.default_rng(seed)
    return np.stack([np.zeros(n), np.full(n, 3.0), rng.standard_normal(n)], axis=1)


def test_layer_stats_match_hand_computed_values():
    x = _three_units()
    s = layer_stats(torch.from_numpy(x), "fc1", bins=20)
    assert (s.n_samples, s.n_features) == (200, 3)
    assert s.mean == pytest.approx(x.mean(), abs=1e-12) and s.std == pytest.approx(x.std(), abs=1e-12)
    assert (s.min, s.max) == (x.min(), x.max())
    assert s.dead_fraction == pytest.approx(1 / 3)  # only the all-zero unit
    assert s.constant_fraction == pytest.approx(2 / 3)  # the dead and the constant unit
    assert s.sparsity == pytest.approx((x == 0).mean())
    counts, edges = np.histogram(x, bins=20, range=(x.min(), x.max()))
    np.testing.assert_allclose(s.hist_edges, edges)
    assert s.hist_counts.sum() == x.size
    assert np.abs(s.hist_counts - counts).sum() <= 2  # float32 binning may move a value at a bin edge


def test_a_constant_layer_has_one_occupied_bin_and_no_dead_units():
    s = layer_stats(torch.full((10, 4), 2.5), "out", bins=5)
    assert s.constant_fraction == 1.0 and s.dead_fraction == 0.0 and s.std == 0.0
    assert s.hist_counts.sum() == 40 and np.count_nonzero(s.hist_counts) == 1


def test_bad_input_gets_a_clear_message():
    with pytest.raises(DataError, match=r"'fc1' contains 1 NaN or infinite value; remove or impute them"):
        layer_stats(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]), "fc1")
    with pytest.raises(ParameterError, match=r"The 'bins' parameter of layer_stats must be an int in \[5, 500\]. Got 2."):
        layer_stats(torch.zeros(3, 2), "fc1", bins=2)
    with pytest.raises(DataError, match=r"activation_stats takes Activations or a dict of layer name -> \(n_samples, n_features\) "
                                        r"array; got Tensor. Extract activations first"):
        activation_stats(torch.zeros(3, 2))
    with pytest.raises(DataError, match=r"activation_stats got no layers; pass activations of at least one layer"):
        activation_stats({})
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"^activation_stats: layer 'b' has 40 samples but the first layer has 50; extract all "
                                        r"layers on the same dataset\.$"):
        activation_stats({"a": rng.standard_normal((50, 10)), "b": rng.standard_normal((40, 10))})


def test_histograms_are_densities_so_models_on_different_bins_compare():
    narrow = {"fc1": torch.from_numpy(np.random.default_rng(0).normal(0, 1, (500, 8)))}
    wide = {"fc1": torch.from_numpy(np.random.default_rng(1).normal(0, 10, (500, 8)))}
    a = activation_stats(narrow, model="A")
    b = activation_stats(wide, model="B")
    fig = layer_histograms(a, b)
    assert [t.name for t in fig.data] == ["A", "B"]
    for trace, result in zip(fig.data, (a, b), strict=True):
        widths = np.diff(result.stats["fc1"].hist_edges)
        assert float(np.sum(np.asarray(trace.y)[:-1] * widths)) == pytest.approx(1.0)  # area 1 whatever the bin width
        np.testing.assert_array_equal(trace.x, result.stats["fc1"].hist_edges)  # steps from edge to edge: bins drawn whole
        data = np.asarray(trace.customdata)  # each bin's range and count on hover; the last point closes the last bin
        np.testing.assert_array_equal(data[:-1, 2], result.stats["fc1"].hist_counts)
        np.testing.assert_array_equal(data[:-1, :2], np.column_stack([trace.x[:-1], trace.x[1:]]))
    # the wide model's peak density is about ten times lower, as its spread is ten times larger
    assert max(fig.data[0].y) / max(fig.data[1].y) == pytest.approx(10, rel=0.3)
    assert fig.layout.xaxis.title.text == "activation value" and fig.layout.yaxis.title.text == "density"
    assert fig.layout.yaxis.range[1] == pytest.approx(1.08 * max(fig.data[0].y))  # room above the highest bin


def test_values_beyond_float32_are_counted():
    s = layer_stats(np.array([[3e38, -3e38], [1.0, 2.0]]), "wide", bins=5)
    assert s.hist_counts.sum() == 4  # a float32 histogram would overflow and count nothing
    assert layer_stats(np.full((4, 2), 1e300) * np.arange(1, 5)[:, None], "huge").hist_counts.sum() == 8


def test_histograms_of_two_architectures_are_not_overlaid_by_layer_name():
    from workbench.analyses.stats import activation_stats
    from workbench.plots.activations import layer_histograms

    rng = np.random.default_rng(0)
    cnn = activation_stats({"relu1": rng.normal(size=(50, 4)), "fc1": rng.normal(size=(50, 3))}, model="cnn")
    mlp = activation_stats({"fc1": rng.normal(size=(50, 8)), "relu1": rng.normal(size=(50, 8))}, model="mlp")
    fig = layer_histograms(cnn, mlp)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["cnn · relu1", "cnn · fc1", "mlp · fc1", "mlp · relu1"]
    assert [t.name for t in fig.data if t.showlegend] == ["cnn", "mlp"]  # each model in the legend once
    twin = activation_stats({"fc1": rng.normal(size=(50, 8)), "relu1": rng.normal(size=(50, 8))}, model="mlp2")
    same = layer_histograms(mlp, twin)
    assert [a.text for a in same.layout.annotations] == ["fc1", "relu1"] and len(same.data) == 4


def test_histograms_share_a_panel_only_between_models_of_one_architecture():
    rng = np.random.default_rng(0)

    def stats(model, widths):
        return activation_stats({layer: rng.normal(size=(30, d)) for layer, d in widths.items()}, model=model)

    # a CNN's fc1 (64 units) and a tanh MLP's fc1 (512) come in the same order, yet are not the same layer
    cnn = stats("cnn", {"conv1": 32, "fc1": 64, "relu_fc1": 64, "out": 10})
    tanh = stats("tanh", {"fc1": 512, "tanh1": 512, "out": 10})
    fig = layer_histograms(cnn, tanh)
    assert [a.text for a in fig.layout.annotations] == ["cnn · conv1", "cnn · fc1", "cnn · relu_fc1", "cnn · out",
                                                        "tanh · fc1", "tanh · tanh1", "tanh · out"]
    assert len({t.xaxis for t in fig.data}) == len(fig.data) == 7  # one model per panel
    narrow = stats("narrow", {"fc1": 64, "tanh1": 64, "out": 10})  # the same names, other widths
    assert len(layer_histograms(tanh, narrow).layout.annotations) == 6
    fewer = stats("fewer", {"fc1": 512, "out": 10})  # fewer layers of the same architecture picked: shared ones overlaid
    picked = layer_histograms(tanh, fewer)
    assert [a.text for a in picked.layout.annotations] == ["fc1", "tanh1", "out"] and len(picked.data) == 5
    twin = stats("tanh seed 1", {"fc1": 512, "tanh1": 512, "out": 10})
    same = layer_histograms(tanh, twin)
    assert [a.text for a in same.layout.annotations] == ["fc1", "tanh1", "out"]
    assert [(t.name, t.xaxis) for t in same.data] == [("tanh", "x"), ("tanh seed 1", "x"), ("tanh", "x2"),
                                                      ("tanh seed 1", "x2"), ("tanh", "x3"), ("tanh seed 1", "x3")]


def test_constant_units_are_judged_relative_to_their_own_scale():
    # an absolute threshold (std <= 1e-12 (1 + max|x|)) called every unit of data at 1e-13 constant
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    for scale in (1e-13, 1e-300, 1.0, 1e300):
        assert layer_stats(x * scale).constant_fraction == 0.0, scale
    tiny = np.c_[x[:, :2] * 1e-13, np.full(100, 3e-13), np.zeros(100), np.full(100, 1e12)]
    s = layer_stats(tiny)
    assert s.constant_fraction == pytest.approx(3 / 5) and s.dead_fraction == pytest.approx(1 / 5)
    assert s.std == pytest.approx(tiny.std()) and s.mean == pytest.approx(tiny.mean())


def test_mean_and_std_near_the_float64_limit_do_not_overflow():
    # the sum of the values overflowed: mean and std were nan
    x = np.c_[np.full(10, 1.7e308), np.full(10, -1.7e308)]
    s = layer_stats(x, bins=10)
    assert s.mean == 0.0 and s.std == pytest.approx(1.7e308) and (s.min, s.max) == (-1.7e308, 1.7e308)
    assert s.constant_fraction == 1.0 and s.hist_counts[0] == s.hist_counts[-1] == 10
    assert s.hist_edges[0] == -1.7e308 and s.hist_edges[-1] == 1.7e308 and np.isfinite(s.hist_edges).all()
    np.testing.assert_allclose(s.hist_edges / 1e308, np.linspace(-1.7, 1.7, 11), atol=1e-12)
    big = np.random.default_rng(0).normal(size=(50, 3)) * 1e307
    s = layer_stats(big)
    assert s.mean == pytest.approx((big / 1e307).mean() * 1e307) and s.std == pytest.approx((big / 1e307).std() * 1e307)
    assert layer_stats(np.full((4, 2), 1.7e308)).hist_counts.sum() == 8  # a constant layer at the limit


def test_subnormal_layers_give_the_statistics_of_the_layer_at_ordinary_scale():
    # unit_scale asked for 2**1029 to bring 1e-310 near 1: math.ldexp raised OverflowError (math range error)
    from workbench.analyses._validation import unit_scale

    x = np.random.default_rng(0).standard_normal((200, 30))
    tiny = x * 1e-310
    assert unit_scale(torch.from_numpy(tiny)) == 2.0**1022  # capped: 2**1029 is beyond float64
    def scale_of(value: float) -> float:
        return unit_scale(torch.tensor([value], dtype=torch.float64))

    assert scale_of(2.0**-1022) == 2.0**1021 and scale_of(2.0**-1023) == 2.0**1022  # largest into [0.5, 1)
    assert scale_of(2.0**-1024) == scale_of(5e-324) == 2.0**1022
    assert scale_of(3.0) == 0.25 and scale_of(1.7e308) == 2.0**-1024 and scale_of(0.0) == 1.0
    reference, s = layer_stats(x), layer_stats(tiny)
    assert s.mean / 1e-310 == pytest.approx(reference.mean, abs=1e-12)
    assert s.std / 1e-310 == pytest.approx(reference.std, rel=1e-12)
    assert (s.min, s.max) == (tiny.min(), tiny.max())
    assert np.array_equal(s.hist_counts, reference.hist_counts)
    np.testing.assert_allclose(s.hist_edges / 1e-310, reference.hist_edges, rtol=0, atol=1e-12)
    assert s.constant_fraction == 0.0 and s.dead_fraction == 0.0


def test_shared_bins_give_equal_zero_spikes_for_equal_shares_of_zeros():
    # two ReLU layers with the same share of zeros (40 %) but different largest values: on their own bins the zero spike
    # of the narrow one is drawn about five times taller; on shared bins the spikes are equally tall
    rng = np.random.default_rng(0)

    def relu(scale):
        x = 1 + np.abs(rng.normal(0, scale, (500, 10)))  # above the first bin, which holds the zeros alone
        x[:200] = 0
        return {"relu1": x, "out": rng.normal(size=(500, 3))}

    a, b = relu(1.0), relu(5.0)
    own = layer_histograms(activation_stats(a, model="A"), activation_stats(b, model="B"))
    assert own.data[0].y[0] / own.data[1].y[0] > 4
    assert "each model on its own bins" in own.layout.title.subtitle.text

    from workbench.analyses.stats import shared_value_ranges

    ranges = shared_value_ranges(a, b)
    assert ranges["relu1"] == (0.0, max(a["relu1"].max(), b["relu1"].max()))
    sa, sb = activation_stats(a, value_ranges=ranges, model="A"), activation_stats(b, value_ranges=ranges, model="B")
    np.testing.assert_array_equal(sa.stats["relu1"].hist_edges, sb.stats["relu1"].hist_edges)
    shared = layer_histograms(sa, sb)
    assert shared.data[0].y[0] == pytest.approx(shared.data[1].y[0], rel=1e-12)  # 2,000 zeros of 5,000 values in each
    assert "models on shared bins" in shared.layout.title.subtitle.text
    assert sa.params["value_ranges"] == ranges
    assert (sa.stats["relu1"].min, sa.stats["relu1"].max) == (a["relu1"].min(), a["relu1"].max())  # its own extremes


def test_shared_ranges_cover_only_layers_all_models_have_at_one_width():
    from workbench.analyses.stats import shared_value_ranges

    rng = np.random.default_rng(0)
    a = {"fc1": rng.normal(size=(20, 4)), "only_a": rng.normal(size=(20, 2)), "out": np.ones((20, 3))}
    b = {"fc1": rng.normal(size=(20, 8)), "out": np.ones((20, 3))}
    assert shared_value_ranges(a, b) == {}  # fc1 of another width; out has one value everywhere
    for bad in (a["fc1"], None):
        with pytest.raises(DataError, match=r"^shared_value_ranges takes one Activations \(or dict of layer name -> "
                                            r"\(n_samples, n_features\) array\) per model; argument 2 is a (ndarray|NoneType)\."):
            shared_value_ranges(a, bad)
    assert shared_value_ranges(a) == {}
    c = {"fc1": 3 * rng.normal(size=(20, 4))}
    lo, hi = shared_value_ranges(a, c)["fc1"]
    assert (lo, hi) == (min(a["fc1"].min(), c["fc1"].min()), max(a["fc1"].max(), c["fc1"].max()))


def test_a_histogram_range_that_would_leave_values_out_is_refused():
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(ParameterError, match=r"^layer_stats: layer 'fc1' has values from 0 to 3, outside the histogram range "
                                             r"\(0, 2\), which would leave them out; widen the range to hold them\.$"):
        activation_stats({"fc1": x}, value_ranges={"fc1": (0.0, 2.0)})
    with pytest.raises(ParameterError, match=r"^layer_stats: the histogram range of layer 'fc1' must be two finite numbers "
                                             r"\(low, high\) with low < high; got \(3, 1\)\.$"):
        activation_stats({"fc1": x}, value_ranges={"fc1": (3, 1)})
    with pytest.raises(ParameterError, match=r"^activation_stats: 'value_ranges' names layer\(s\) \['fc2'\] that the "
                                             r"activations do not hold; they hold \['fc1'\]\.$"):
        activation_stats({"fc1": x}, value_ranges={"fc2": (0, 3)})
    s = layer_stats(x, "fc1", bins=6, value_range=(-3, 3))
    np.testing.assert_allclose(s.hist_edges, np.linspace(-3, 3, 7))
    assert s.hist_counts.tolist() == [0, 0, 0, 1, 1, 2]
