"""Crafted dataset uploads: bombs, expanded tensors, oversized fields and labels each give one sentence."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from tests.payloads import npz_bytes, pt_bytes
from workbench import load_dataset
from workbench.data import datasets, make_dataset
from workbench.errors import CorruptFileError, DataError, FileTooLargeError


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz_member(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()




# ------------------------------------------------------------------------------------------------
# .npz: declared sizes are checked before numpy allocates or decompresses


@pytest.mark.parametrize("member", ["x.npy", "x"])  # np.load reads a member with or without the suffix
def test_npz_member_declaring_1e13_elements_is_refused_before_allocation(member):
    data = _zip({member: _npy_header((10**13,)) + bytes(64)})
    with pytest.raises(FileTooLargeError, match=r"Array 'x' in 'bomb\.npz' declares shape \(10000000000000,\) of float64 "
                                                r"\(\d+ MiB\), above the 1024 MiB limit; save fewer or smaller samples\."):
        load_dataset(data, filename="bomb.npz")


def test_compressed_npz_that_unpacks_beyond_the_limit_is_refused():
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((1000, 1000)))  # 8 MB of zeros in a few kB
    assert len(buf.getvalue()) < 1 << 20
    with pytest.raises(FileTooLargeError, match=r"'zeros\.npz' unpacks to 8 MiB, above the 1 MiB limit"):
        load_dataset(buf.getvalue(), filename="zeros.npz", max_bytes=1 << 20)
    assert load_dataset(buf.getvalue(), filename="zeros.npz", max_bytes=16 << 20).x.shape == (1000, 1000)


def test_npz_labels_declaring_more_than_they_store_are_refused():
    data = _zip({"x.npy": _npz_member(np.ones((4, 2))), "y.npy": _npy_header((10**6,), "<i8") + bytes(32)})
    with pytest.raises(CorruptFileError, match=r"Array 'y' in 'short\.npz' declares shape \(1000000,\) of int64 \(8000000 bytes\) "
                                               r"but stores 32 bytes, so the file is truncated or damaged"):
        load_dataset(data, filename="short.npz")


def test_npz_with_a_negative_shape_or_empty_items_is_refused():
    with pytest.raises(CorruptFileError, match=r"declares the negative shape \(-1, -1\)"):
        load_dataset(_zip({"x.npy": _npy_header((-1, -1)) + bytes(8)}), filename="neg.npz")
    with pytest.raises(CorruptFileError, match=r"Array 'y' in 'v\.npz' declares shape \(1000000,\) of \|V0 \(1000000 bytes\) but stores 0"):
        load_dataset(_zip({"x.npy": _npz_member(np.ones((2, 2))), "y.npy": _npy_header((10**6,), "|V0")}), filename="v.npz")


def test_npz_with_deeply_nested_json_text_loads_it_as_text_without_parsing():
    nested = "[" * 100_000 + "]" * 100_000
    data = npz_bytes(x=np.ones((2, 2)), y=np.array([0, 1]), class_names=np.array([nested, "b"]))
    assert load_dataset(data, filename="deep.npz").class_names == (nested, "b")
    with pytest.raises(DataError, match=r"^'deep\.npz' holds the arrays 'meta', which load_dataset does not read"):  # named, not parsed
        load_dataset(npz_bytes(x=np.ones((2, 2)), meta=np.array(nested)), filename="deep.npz")


def test_npz_labels_with_a_huge_class_number_are_refused():
    with pytest.raises(DataError, match=r"Class labels of dataset 'big' must be below 100000 \(classes are numbered 0, 1, 2, …\); "
                                        r"got a maximum of 1000000000\. Renumber the classes from 0\."):
        load_dataset(npz_bytes(x=np.ones((2, 2)), y=np.array([0, 10**9])), filename="big.npz")


# ------------------------------------------------------------------------------------------------
# .pt: archive sizes are checked before torch.load, tensors before anything materialises them


def test_deflated_pt_that_unpacks_beyond_the_limit_is_refused():
    src = zipfile.ZipFile(io.BytesIO(pt_bytes({"x": torch.zeros(1000, 1000)})))
    data = _zip({info.filename: src.read(info) for info in src.infolist()}, zipfile.ZIP_DEFLATED)
    assert len(data) < 1 << 20
    with pytest.raises(FileTooLargeError, match=r"'zeros\.pt' unpacks to 4 MiB, above the 1 MiB limit"):
        load_dataset(data, filename="zeros.pt", max_bytes=1 << 20)


@pytest.mark.parametrize("shape", [(100_000, 10_000), (3, 5)])
def test_expanded_pt_tensor_is_refused_before_it_is_materialised(shape):
    data = pt_bytes({"x": torch.zeros(1, shape[1]).expand(*shape)})
    with pytest.raises(DataError, match=rf"'x' in 'wide\.pt' is an expanded view: shape \({shape[0]}, {shape[1]}\) with strides "
                                        r"\(0, 1\) over \d+ stored bytes; save a copy that holds its values: x\.contiguous\(\)\."):
        load_dataset(data, filename="wide.pt")


def test_pt_lists_must_be_flat_so_repeated_objects_cannot_expand():
    row = [0.0] * 1000
    with pytest.raises(DataError, match=r"'x' in 'rep\.pt' must be a tensor; got list\. Save it with torch\.as_tensor\(x\)\."):
        load_dataset(pt_bytes({"x": [row] * 1000}), filename="rep.pt")
    with pytest.raises(DataError, match=r"'y' in 'rep\.pt' must be a tensor or a flat list of labels; got list"):
        load_dataset(pt_bytes({"x": torch.ones(2, 2), "y": [["a" * 10**6]] * 2}), filename="rep.pt")
    with pytest.raises(DataError, match=r"'x' in 'sp\.pt' is a torch\.sparse_coo tensor; save a dense one: x\.to_dense\(\)\."):
        load_dataset(pt_bytes({"x": torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), [], (10**9, 10**9), check_invariants=True)}), filename="sp.pt")
    data = load_dataset(pt_bytes({"x": torch.ones(3, 2), "y": ["b", "a", "b"]}), filename="ok.pt")
    assert data.class_names == ("a", "b") and data.y.tolist() == [1, 0, 1]
    assert load_dataset(pt_bytes({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]}), filename="ok.pt").n_classes == 2


# ------------------------------------------------------------------------------------------------
# .csv


def test_csv_field_beyond_the_csv_module_limit_gives_a_sentence():
    data = b"a,b\n1," + b"1" * 200_000 + b"\n"
    with pytest.raises(CorruptFileError, match=r"Line 2 of 'long\.csv' cannot be read as CSV \(field larger than field limit \(131072\)\); "
                                               r"save the table as plain comma-separated numbers"):
        load_dataset(data, filename="long.csv")
    with pytest.raises(CorruptFileError, match=r"^Line 3 of 'long\.csv' cannot be read as CSV"):  # Excel's sep= line counts
        load_dataset(b"sep=,\n" + data, filename="long.csv")


@pytest.mark.parametrize("data", [b"label\n1\n2\n", b"label\ncat\ndog\n"])
def test_csv_with_only_a_label_column_is_refused(data):
    with pytest.raises(DataError, match=r"'only\.csv' has the label column 'label' but no feature columns; add at least one numeric"):
        load_dataset(data, filename="only.csv")


@pytest.mark.parametrize("label", ["nan", "inf", "-inf"])
def test_csv_numeric_labels_must_be_finite(label):
    data = f"a,label\n1,0\n2,{label}\n3,1\n".encode()
    with pytest.raises(DataError, match=rf"Row 3 of 'lab\.csv' has the label '{label}' in column 'label'; labels must be finite numbers"):
        load_dataset(data, filename="lab.csv")


def test_csv_numbers_that_are_not_class_numbers_are_regression_targets_within_float32():
    for label in ("2.5", "-1.5", "100000", "1e18"):
        y = load_dataset(f"a,label\n1,0\n2,{label}\n3,1\n".encode(), filename="lab.csv").y
        assert y.dtype == torch.float32 and y.tolist() == [0.0, float(np.float32(label)), 1.0]
    with pytest.raises(DataError, match=r"The float targets of dataset 'lab' reach beyond the float32 range \(\|y\| > 3\.4e\+38\)"):
        load_dataset(b"a,label\n1,0\n2,1e300\n3,1\n", filename="lab.csv")


def test_csv_whole_numbers_below_zero_are_classes_in_increasing_order():
    from workbench.data import label_order_note

    data = load_dataset(b"a,label\n1,1\n2,-1\n3,1\n4,-1.0\n5,-0\n", filename="pm.csv")
    assert data.y.dtype == torch.int64 and data.y.tolist() == [2, 0, 2, 0, 1] and data.class_names == ("-1", "0", "1")
    assert label_order_note(data).startswith("The labels of 'pm' were whole numbers below zero among them, numbered in "
                                             "increasing order (-1 → 0, 0 → 1, 1 → 2)")
    many = "a,label\n" + "".join(f"{i},{i - 1000}\n" for i in range(datasets.MAX_SIGNED_CLASSES + 1))
    y = load_dataset(many.encode(), filename="t.csv").y  # more distinct values than classes: regression targets
    assert y.dtype == torch.float32 and y[0] == -1000


def test_csv_class_numbers_load_as_integers():
    data = load_dataset(b"a,label\n1,0\n2,2.0\n3, 99999\n", filename="lab.csv")
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 2, 99999]


def test_csv_with_too_many_distinct_text_labels_is_refused(monkeypatch):
    monkeypatch.setattr(datasets, "MAX_CLASSES", 3)
    with pytest.raises(DataError, match=r"'t\.csv' has 4 distinct text labels, above the limit of 3 classes; give labels that name classes"):
        load_dataset(b"a,label\n1,p\n2,q\n3,r\n4,s\n", filename="t.csv")


def test_csv_header_wider_than_its_rows_is_refused():
    with pytest.raises(CorruptFileError, match=r"The header of 'h\.csv' has 3 columns but row 2 has 2; give the header one name per column"):
        load_dataset(b"a,b,label\n1,2\n", filename="h.csv")


def test_csv_that_stops_being_utf8_later_is_refused():
    with pytest.raises(CorruptFileError, match=r"'bin\.csv' is not UTF-8 text, so it cannot be read as CSV"):
        load_dataset(b"a,b\n" + b"1,2\n" * 10_000 + b"\xff,3\n", filename="bin.csv")


# ------------------------------------------------------------------------------------------------
# make_dataset and the load_dataset boundary


def test_make_dataset_refuses_arrays_without_features_and_unbounded_labels():
    with pytest.raises(DataError, match=r"Dataset 'e' has no features \(x has shape \(3, 0\)\); give each sample at least one feature"):
        make_dataset("e", np.ones((3, 0)))
    with pytest.raises(DataError, match=r"The labels of dataset 'inf' contain NaN or infinite values"):
        make_dataset("inf", np.ones((2, 2)), np.array([0.0, np.inf]))
    with pytest.raises(DataError, match=r"The float targets of dataset 'far' reach beyond the float32 range"):
        make_dataset("far", np.ones((2, 2)), np.array([0.5, 1e300]))
    assert make_dataset("years", np.ones((2, 2)), np.array([2e5, 3e5])).y.dtype == torch.float32  # whole but no class numbers


def test_unforeseen_reader_failures_become_one_sentence_naming_the_file():
    data = bytearray(_zip({"x.npy": _npz_member(np.ones((2, 2)))}))
    data[8:10] = (99).to_bytes(2, "little")  # the compression method, in the local header and the central directory
    central = data.rindex(b"PK\x01\x02")
    data[central + 10:central + 12] = (99).to_bytes(2, "little")
    with pytest.raises(CorruptFileError, match=r"^Dataset file 'm\.npz' could not be read \(NotImplementedError: That compression "
                                               r"method is not supported\); re-save it as load_dataset describes") as info:
        load_dataset(bytes(data), filename="m.npz")
    assert isinstance(info.value.__cause__, NotImplementedError)


@pytest.mark.parametrize("raised", [RecursionError("maximum recursion depth exceeded\nwhile parsing"), MemoryError(), DataError("kept.")])
def test_the_boundary_wraps_other_exceptions_only(monkeypatch, raised):
    def fail(data, name):
        raise raised

    monkeypatch.setattr(datasets, "_read_csv", fail)
    expected = CorruptFileError if isinstance(raised, RecursionError) else type(raised)
    with pytest.raises(expected) as info:
        load_dataset(b"1,2\n", filename="d.csv")
    if expected is CorruptFileError:
        assert str(info.value) == ("Dataset file 'd.csv' could not be read (RecursionError: maximum recursion depth exceeded); "
                                   "re-save it as load_dataset describes, then load it again.")
        assert info.value.__cause__ is raised
    else:
        assert info.value is raised


def test_a_directory_path_gives_a_sentence(tmp_path):
    folder = tmp_path / "d.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=r"Cannot read dataset file '.*d\.csv' \(Is a directory\); pass a readable"):
        load_dataset(folder)


# ------------------------------------------------------------------------------------------------
# values torch or numpy cannot hold as they are: read where they mean the same numbers, else one sentence


def test_big_endian_npz_arrays_are_read_in_native_byte_order():
    x = np.arange(6, dtype=">f4").reshape(3, 2)
    data = load_dataset(npz_bytes(x=x, y=np.array([2, 0, 1], dtype=">i8")), filename="be.npz")
    assert data.x.tolist() == [[0, 1], [2, 3], [4, 5]] and data.y.tolist() == [2, 0, 1]
    assert data.sha256 == load_dataset(npz_bytes(x=x.astype("<f4"), y=np.array([2, 0, 1])), filename="be.npz").sha256


@pytest.mark.parametrize("x, message", [
    (np.ones((2, 2)).astype("timedelta64[s]"), r"^The dataset's 'x' holds time spans \(timedelta64\[s\]\), not numbers; convert them "
                                               r"first, e\.g\. x / np\.timedelta64\(1, 's'\) for seconds\.$"),
    pytest.param(np.ones((2, 2), dtype=np.longdouble), r"^The dataset's 'x' holds float\d+ values \(extended precision\), which torch "
                                                       r"cannot hold; save it as float64: x\.astype\('float64'\)\.$",
                 marks=pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 on this platform")),
])
def test_npz_arrays_torch_cannot_hold_get_a_sentence(x, message):
    with pytest.raises(DataError, match=message):
        load_dataset(npz_bytes(x=x), filename="odd.npz")


def test_pt_meta_tensor_is_refused_before_anything_is_allocated():
    data = pt_bytes({"x": torch.empty(10**6, 10**6, device="meta")})  # 4 TB if copied out
    with pytest.raises(DataError, match=r"^'x' in 'm\.pt' is a tensor on the meta device, which has a shape \(1000000, 1000000\) but no "
                                        r"values; use a tensor that holds its values \(made on the CPU, not with device='meta'\)\.$"):
        load_dataset(data, filename="m.pt")
    with pytest.raises(DataError, match=r"^The dataset's 'x' is a tensor on the meta device"):
        make_dataset("m", torch.empty(10**6, 10**6, device="meta"))


@pytest.mark.parametrize("make, message", [
    (lambda: torch.ones(2, 2).to(torch.float8_e4m3fn),
     r"^'x' in 'o\.pt' holds float8_e4m3fn values, which the workbench does not read; save it as float32 \(or int64 token ids\): x\.float\(\)\.$"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
     r"^'x' in 'o\.pt' is a nested tensor \(samples of different shapes\); pad the samples to one shape and save a regular tensor, "
     r"e\.g\. torch\.nested\.to_padded_tensor\(x, 0\.0\)\.$"),
    (lambda: torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.quint8),
     r"^'x' in 'o\.pt' is a quantized tensor \(quint8\); save its values as floats: x\.dequantize\(\)\.$"),
    (lambda: torch.ones(2, 2).to_sparse(), r"^'x' in 'o\.pt' is a torch\.sparse_coo tensor; save a dense one: x\.to_dense\(\)\.$"),
])
def test_pt_tensors_that_are_not_plain_numbers_are_refused_by_kind(make, message):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        data = pt_bytes({"x": make(), "y": torch.tensor([0, 1])})
    with pytest.raises(DataError, match=message):
        load_dataset(data, filename="o.pt")


def test_damaged_pt_says_so_with_torch_s_reason():
    data = bytearray(pt_bytes({"x": torch.ones(2, 2)}))
    member = data.rindex(b"PK\x03\x04", 0, data.index(b".format_version"))
    data[member:member + 4] = bytes(4)  # a member's local header, which the zip's directory still lists
    with pytest.raises(CorruptFileError, match=r"^'bad\.pt' is damaged or not a file written by torch\.save \(RuntimeError: "
                                               r"PytorchStreamReader failed reading file \.format_version: .+\); re-save the data with "
                                               r"torch\.save\(\{'x': x, 'y': y\}, path\)\.$"):
        load_dataset(bytes(data), filename="bad.pt")
    with pytest.raises(CorruptFileError, match=r"^'text\.pt' is not a file written by torch\.save: it looks like a text file"):
        load_dataset(b"hello, these are not tensors", filename="text.pt")
    data = bytearray(pt_bytes({"x": torch.ones(2, 2)}))
    data[-300:-200] = bytes(100)  # the zip's central directory
    with pytest.raises(CorruptFileError, match=r"^'bad\.pt' is damaged or not a file written by torch\.save \(Bad magic number"):
        load_dataset(bytes(data), filename="bad.pt")


def test_a_text_file_named_pt_is_called_a_text_file():
    from workbench import load_dataset
    from workbench.errors import CorruptFileError

    with pytest.raises(CorruptFileError, match=r"^'notmodel\.pt' is not a file written by torch\.save: it looks like a text file; "
                       r"give a CSV table a \.csv name, or save the data with torch\.save"):
        load_dataset(b"a,b\n1,2\n", filename="notmodel.pt")
