"""Property-based: random bytes and random small archives never crash the loaders with anything but WorkbenchError."""

from __future__ import annotations

import io
import json
import zipfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench import load_dataset, load_model
from workbench.errors import WorkbenchError

MODEL_NAMES = st.sampled_from(["m.safetensors", "m.pt", "m.pth", "m.bin", "m.zip", "m.ckpt"])
DATA_NAMES = st.sampled_from(["d.npz", "d.csv", "d.pt"])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _archive(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


ARCHIVES = st.lists(
    st.tuples(st.sampled_from(["config.json", "model.safetensors", "archive/data.pkl", "x/../y", "/abs", "data.pkl",
                               "constants.pkl", "code/m.py", "a.txt"]), st.binary(max_size=200)),
    max_size=4,
).map(_archive)


def _expect_clean(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except WorkbenchError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@SETTINGS
@given(data=st.binary(max_size=512), name=MODEL_NAMES)
def test_random_bytes_model(data, name):
    _expect_clean(load_model, data, filename=name, architecture={"type": "mlp", "sizes": [4, 2]})


@SETTINGS
@given(data=ARCHIVES, name=MODEL_NAMES)
def test_random_archives_model(data, name):
    _expect_clean(load_model, data, filename=name)


@SETTINGS
@given(prefix=st.binary(min_size=8, max_size=8), body=st.binary(max_size=256))
def test_random_safetensors_headers(prefix, body):
    _expect_clean(load_model, prefix + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + body,
                  filename="m.safetensors", architecture={"type": "mlp", "sizes": [4, 2]})


@SETTINGS
@given(data=st.one_of(st.binary(max_size=512), ARCHIVES, st.text(max_size=300).map(str.encode)), name=DATA_NAMES)
def test_random_bytes_dataset(data, name):
    _expect_clean(load_dataset, data, filename=name)


SIZES = st.one_of(st.integers(min_value=-10, max_value=10**40), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none())


@SETTINGS
@given(shape=st.one_of(st.lists(SIZES, max_size=4), SIZES), width=SIZES, pool=st.lists(SIZES, min_size=1, max_size=2))
def test_random_spec_sizes_are_refused_with_one_short_sentence(shape, width, pool):
    from safetensors.torch import save

    specs = [
        {"type": "torch.nn", "input_shape": shape, "root": {"class": "Sequential", "children": [
            ["fc", {"class": "Linear", "args": {"in_features": width, "out_features": 2}}],
            ["pool", {"class": "AdaptiveAvgPool1d", "args": {"output_size": pool}}]]}},
        {"type": "mlp", "sizes": [width, 2]},
        {"type": "resmlp", "in_features": width, "width": 2, "n_blocks": 1, "n_classes": 2},
        {"type": "cnn", "input_shape": shape, "channels": [2], "n_classes": 2},
    ]
    for spec in specs:
        try:
            load_model(save({}, metadata={"architecture": json.dumps(spec)}), filename="m.safetensors")
        except WorkbenchError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 400, str(exc)
