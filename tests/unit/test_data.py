"""Datasets: bundled sets, uploads, and clear errors for bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tests.payloads import npz_bytes, pt_bytes
from workbench import load_dataset
from workbench.data import make_dataset
from workbench.errors import (
    CorruptFileError,
    DataError,
    FileTooLargeError,
    ParameterError,
    UnsafeFileError,
    UnsupportedFormatError,
)


def test_digits_split_is_fixed_and_standardised():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert train.x.shape == (1347, 64) and test.x.shape == (450, 64)
    assert train.n_classes == test.n_classes == 10
    assert float(train.x.mean(0).abs().max()) < 1e-5
    assert test.sha256 == load_dataset("digits").sha256
    assert load_dataset("digits", split="all").n_samples == 1797
    with pytest.raises(ParameterError, match=r"'split' parameter of digits must be 'train', 'test' or 'all'\. Got 'val'"):
        load_dataset("digits", split="val")


def test_blobs_separation_controls_distance():
    near, far = load_dataset("blobs", separation=0.0), load_dataset("blobs", separation=6.0)
    assert near.x.shape == (1000, 64) and near.n_classes == 5

    def centre_spread(d):
        centres = torch.stack([d.x[d.y == c].mean(0) for c in range(5)])
        return float(torch.cdist(centres, centres).max())

    assert centre_spread(far) > 5 > 1 > centre_spread(near)
    assert load_dataset("blobs", seed=1).sha256 != load_dataset("blobs", seed=2).sha256
    with pytest.raises(ParameterError, match=r"'separation' parameter of blobs must be a number >= 0"):
        load_dataset("blobs", separation=-1)


def test_npz_upload_roundtrip():
    buf = io.BytesIO()
    np.savez(buf, x=np.random.rand(20, 4).astype(np.float32), y=np.arange(20) % 2)
    data = load_dataset(buf.getvalue(), filename="mine.npz")
    assert data.name == "mine" and data.x.shape == (20, 4) and data.n_classes == 2


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize("arrays", [{"x": np.array([{"a": 1}, None], dtype=object)},
                                    {"x": np.zeros((50, 4), np.float32), "y": np.array([_Evil()] * 50, dtype=object)}])
def test_npz_with_pickled_objects_refused(arrays, capsys):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    # labels as objects were called truncated (their pickle is smaller than 50 object pointers)
    with pytest.raises(UnsafeFileError, match=r"stores Python objects (in array '[xy]' )?that need unpickling, which can run code"):
        load_dataset(buf.getvalue(), filename="evil.npz")
    assert "unpickled" not in capsys.readouterr().out


def test_csv_upload_with_label_column():
    text = "a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n"
    data = load_dataset(text.encode(), filename="table.csv")
    assert data.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert data.y.tolist() == [0, 1, 0]


def test_text_labels_are_numbered_in_sorted_order_with_their_names_kept():
    from workbench.data import label_order_note

    text = "a,b,label\n" + "".join(f"{i},{2 * i}, {['zero', 'one', 'two'][i % 3]}\n" for i in range(9))
    data = load_dataset(text.encode(), filename="table.csv")
    assert data.class_names == ("one", "two", "zero") and data.y.tolist() == [2, 0, 1] * 3  # spaces stripped
    note = label_order_note(data)
    assert note.startswith("The labels of 'table' were text, numbered in sorted order (one → 0, two → 1, zero → 2)")
    assert label_order_note(data.subset(slice(0, 4))) is not None  # kept by subsets
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((4, 2)), y=np.array(["b", "a", "b", "c"]))
    data = load_dataset(buf.getvalue(), filename="s.npz")
    assert data.class_names == ("a", "b", "c") and data.y.tolist() == [1, 0, 1, 2]
    assert label_order_note(load_dataset("digits")) is None  # integer labels are the model's own order


def test_named_labels_are_the_class_names_where_there_are_some():
    text = "a,label\n1,cat\n2,dog\n3,cat\n"
    assert load_dataset(text.encode(), filename="t.csv").named_labels().tolist() == ["cat", "dog", "cat"]
    assert make_dataset("plain", np.ones((3, 2)), np.array([2, 0, 1])).named_labels().tolist() == [2, 0, 1]
    assert make_dataset("none", np.ones((3, 2))).named_labels() is None


def test_npz_class_names_name_integer_labels():
    from workbench.data import label_order_note

    buf = io.BytesIO()
    np.savez(buf, x=np.ones((3, 2)), y=np.array([2, 0, 1]), class_names=np.array(["zero", "one", "two"]))
    data = load_dataset(buf.getvalue(), filename="n.npz")
    assert data.class_names == ("zero", "one", "two") and data.y.tolist() == [2, 0, 1] and label_order_note(data) is None
    for extra, message in [({"class_names": np.array(["a", "b"])}, r"has labels up to 2 but 2 class_names; give one name per class"),
                           ({"class_names": np.arange(3)}, r"'class_names' in 'n.npz' must be a 1-D array of strings"),
                           ({"y": np.array(["a", "b", "c"]), "class_names": np.array(["a", "b", "c"])},
                            r"has text labels and 'class_names'; give integer labels with 'class_names'")]:
        buf = io.BytesIO()
        np.savez(buf, **{"x": np.ones((3, 2)), "y": np.array([2, 0, 1]), **extra})
        with pytest.raises(DataError, match=message):
            load_dataset(buf.getvalue(), filename="n.npz")


def test_csv_with_text_feature_column():
    with pytest.raises(DataError, match=r"Column 'b' of 'table\.csv' holds text \('x'\); CSV features must be numbers"):
        load_dataset(b"a,b\n1,x\n2,y\n", filename="table.csv")


def test_csv_missing_value_is_named_with_its_row():
    with pytest.raises(DataError, match=r"Row 3 of 'gaps\.csv' has no value in column 'b'; fill in or drop the rows"):
        load_dataset(b"a,b\n1,2\n3, \n5,6\n", filename="gaps.csv")
    with pytest.raises(DataError, match=r"Row 2 of 'gaps\.csv' has no value in column 'column 1'"):
        load_dataset(b"1,2\n,4\n", filename="gaps.csv")
    with pytest.raises(DataError, match=r"Row 3 of 'gaps\.csv' has no label in column 'label'; fill in or drop"):
        load_dataset(b"a,label\n1,cat\n2,\n", filename="gaps.csv")


def test_csv_ragged_rows():
    with pytest.raises(CorruptFileError, match=r"Row 3 of 'r\.csv' has 1 columns; expected 2"):
        load_dataset(b"a,b\n1,2\n3\n", filename="r.csv")


def test_pt_upload_weights_only():
    buf = io.BytesIO()
    torch.save({"x": torch.randn(6, 3), "y": torch.tensor([0, 1, 2, 0, 1, 2])}, buf)
    data = load_dataset(buf.getvalue(), filename="t.pt")
    assert data.x.shape == (6, 3) and data.n_classes == 3


def test_pt_upload_with_code_refused(tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    buf = io.BytesIO()
    torch.save({"x": Payload()}, buf)
    with pytest.raises(UnsafeFileError, match=r"needs full unpickling, which can run code"):
        load_dataset(buf.getvalue(), filename="evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), None, r"contains 1 NaN or infinite value; remove"),
        (np.array([[np.nan, np.nan], [0.0, -np.inf]]), None, r"contains 3 NaN or infinite values; remove"),
        (np.array([[1.0, np.inf]]), None, r"contains 1 NaN or infinite value"),
        (np.array([[1.0, 1e300], [-1e39, 0.0]]), None, r"has 2 values beyond the float32 range \(\|x\| > 3.4e\+38\) that models compute in"),
        (np.zeros((0, 3)), None, r"is empty \(0 samples\)"),
        (np.zeros((4, 3)), np.arange(3), r"has 4 samples but 3 labels; they must match"),
        (np.array([["a", "b"]]), None, r"must be numeric"),
    ],
)
def test_bad_arrays(x, y, message):
    with pytest.raises(DataError, match=message):
        make_dataset("bad", x, y)


def test_unknown_name_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match=r"No dataset named 'mnist': it is neither a bundled dataset \(digits, blobs, sentences\)"):
        load_dataset("mnist")
    with pytest.raises(UnsupportedFormatError, match=r"supported types are \.npz, \.csv, \.pt"):
        load_dataset(b"hello", filename="data.xlsx")
    with pytest.raises(DataError, match=r"is empty \(0 bytes\); choose the file that holds the data, or save it again\."):
        load_dataset(b"", filename="data.csv")
    with pytest.raises(FileTooLargeError, match=r"above the 0 MiB limit"):
        load_dataset(b"1,2\n" * 1000, filename="data.csv", max_bytes=100)
    with pytest.raises(CorruptFileError, match=r"not a readable \.npz file"):
        load_dataset(b"garbage", filename="data.npz")
    for wrong in (5, None, np.zeros((3, 2))):  # not a name, path or bytes (arrays go through make_dataset)
        with pytest.raises(ParameterError, match=r"load_dataset reads a bundled dataset's name, a path or the bytes of an "
                                                 r"upload; got (int|NoneType|ndarray)\. .*use make_dataset\(name, x, y\)"):
            load_dataset(wrong)


def test_repr_is_a_summary_not_the_tensors():
    from workbench import load_dataset

    text = repr(load_dataset("digits"))
    assert text.startswith("Dataset('digits (test)', x (450, 64) float32, 10 classes, sha256 ") and len(text) < 120


def test_inputs_hash_ignores_labels_and_is_made_with_the_dataset_hash():
    from workbench.data.datasets import content_hash

    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    labelled = make_dataset("a", x, torch.arange(20) % 2)
    assert "inputs_sha256" in labelled.__dict__  # computed in the same pass as sha256, not again per extraction
    assert labelled.sha256 == content_hash(labelled.x, labelled.y)
    assert labelled.inputs_sha256 == content_hash(labelled.x, None) == make_dataset("b", x).sha256
    assert labelled.inputs_sha256 != make_dataset("c", x.flip(0)).inputs_sha256


def test_the_digits_train_split_goes_with_the_bundled_test_split_only():
    from workbench.data import digits_train_for

    test = load_dataset("digits")
    assert digits_train_for(test).sha256 == load_dataset("digits", split="train").sha256
    assert digits_train_for(make_dataset("renamed", test.x, test.y)) is not None  # the same content under another name
    assert digits_train_for(make_dataset("digits_mine", test.x[:300], test.y[:300])) is None  # named like it, not it
    assert digits_train_for(load_dataset("digits", split="train")) is None


def test_a_dataset_keeps_its_content_when_the_caller_edits_the_arrays_it_was_made_from():
    x, y = np.random.default_rng(0).normal(size=(10, 3)), np.arange(10)
    t = torch.rand(10, 3)
    a, b = make_dataset("array", x, y), make_dataset("tensor", t)
    want_a, want_b = a.x.clone(), b.x.clone()
    x *= 2
    y[:] = 0
    t.mul_(0)
    torch.testing.assert_close(a.x, want_a)
    torch.testing.assert_close(b.x, want_b)
    assert a.y.tolist() == list(range(10))
    a.check_unchanged()
    b.check_unchanged()


def test_editing_a_loaded_bundled_dataset_does_not_change_the_next_load():
    first = load_dataset("digits", split="train")
    want = first.x.clone()
    first.x.mul_(0)
    torch.testing.assert_close(load_dataset("digits", split="train").x, want)


def test_copies_of_a_dataset_are_unchanged_copies():
    import copy
    import pickle

    d = load_dataset("blobs")
    copy.deepcopy(d).check_unchanged()
    pickle.loads(pickle.dumps(d)).check_unchanged()


def test_options_a_source_does_not_take_are_refused_not_ignored():
    with pytest.raises(ParameterError, match=r"split='train' applies to the bundled digits and sentences only; 'blobs' has no splits"):
        load_dataset("blobs", split="train")
    with pytest.raises(ParameterError, match=r"load_dataset\('digits'\) does not take separation; it takes no options\."):
        load_dataset("digits", separation=3)
    with pytest.raises(ParameterError, match=r"load_dataset\('blobs'\) does not take sep; it takes separation, n_samples"):
        load_dataset("blobs", sep=3)
    assert load_dataset("sentences", split="train").n_samples == 360


def test_npz_without_x_among_several_arrays_is_refused():
    buf = io.BytesIO()
    np.savez(buf, data=np.zeros((4, 3)), other=np.ones(4))
    with pytest.raises(DataError, match=r"'d.npz' holds the arrays data, other but none named 'x'; save the features as 'x'"):
        load_dataset(buf.getvalue(), filename="d.npz")
    one = io.BytesIO()
    np.savez(one, features=np.zeros((4, 3)))
    assert load_dataset(one.getvalue(), filename="one.npz").n_features == 3  # a single array is the features


def test_train_test_split_is_stratified_seeded_and_named():
    from workbench.data import train_test_split

    data = load_dataset("blobs", n_samples=1000, n_classes=5)
    train, test = train_test_split(data, test_fraction=0.3, seed=0)
    assert (train.n_samples, test.n_samples) == (700, 300) and (train.name, test.name) == (f"{data.name} [70%]", f"{data.name} [30%]")
    assert torch.bincount(test.y).tolist() == [60] * 5  # each class keeps its share
    assert torch.equal(train_test_split(data, seed=0)[1].x, test.x) and not torch.equal(train_test_split(data, seed=1)[1].x, test.x)
    rows = {tuple(r) for r in torch.cat([train.x, test.x]).tolist()}
    assert len(rows) == data.n_samples  # disjoint, and together the whole dataset
    one_of_a_kind = make_dataset("odd", torch.randn(10, 2), torch.tensor([0] * 9 + [1]))
    assert train_test_split(one_of_a_kind)[1].n_samples == 3  # a class with one sample: a plain random split
    with pytest.raises(ParameterError, match="test_fraction must be a number between 0 and 1"):
        train_test_split(data, test_fraction=1.0)
    with pytest.raises(DataError, match="has 1 samples, too few to hold out 30%"):
        train_test_split(make_dataset("one", torch.randn(1, 2)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_classes": 0}, r"The 'n_classes' parameter of blobs must be an integer from 1 to 100,000\. Got 0\."),
        ({"n_samples": 10.5}, r"The 'n_samples' parameter of blobs must be an integer from 1 to [\d,]+\. Got 10\.5\."),
        ({"n_samples": -1}, r"The 'n_samples' parameter of blobs must be an integer from 1 to [\d,]+\. Got -1\."),
        ({"n_features": True}, r"The 'n_features' parameter of blobs must be an integer from 1 to [\d,]+\. Got True\."),
        ({"seed": -1}, r"The 'seed' parameter of blobs must be an integer from 0 to 2\*\*32 - 1\. Got -1\."),
        ({"seed": 2**32}, r"The 'seed' parameter of blobs must be an integer from 0 to 2\*\*32 - 1\. Got 4294967296\."),
        ({"seed": "a"}, r"The 'seed' parameter of blobs must be an integer from 0 to 2\*\*32 - 1\. Got 'a'\."),
        ({"separation": float("inf")}, r"The 'separation' parameter of blobs must be a number >= 0 and finite\. Got inf\."),
        ({"n_samples": 10**6, "n_features": 10**4}, r"blobs with n_samples=1000000 and n_features=10000 would hold 10,000,000,000 values, "
                                                     r"above the limit of [\d,]+; ask for fewer samples or features\."),
        ({"n_samples": 3, "n_classes": 5}, r"^blobs with n_samples=3 and n_classes=5 would leave classes without samples; "
                                           r"ask for at least as many samples as classes\.$"),
    ],
)
def test_blobs_options_out_of_range_are_refused_with_their_range(options, message):
    with pytest.raises(ParameterError, match=message):
        load_dataset("blobs", **options)


def test_blobs_accepts_the_ends_of_its_ranges():
    data = load_dataset("blobs", n_samples=3, n_features=1, n_classes=1, seed=np.int64(2**32 - 1))
    assert data.x.shape == (3, 1) and data.n_classes == 1


@pytest.mark.parametrize("index", [3, np.int64(3), torch.tensor(3), np.array([[1, 2]]), None])
def test_subset_with_a_single_index_asks_for_a_list(index):
    data = load_dataset("digits")
    with pytest.raises(DataError, match=r"Dataset.subset takes a 1-D list, array or slice of sample indices \(such as \[3, 5\] "
                                        r"or slice\(0, 10\)\) to select from 'digits \(test\)'; got "):
        data.subset(index)


def test_subset_takes_lists_tuples_masks_and_slices():
    data = load_dataset("digits")
    assert data.subset([1, 2]).n_samples == data.subset((1, 2)).n_samples == 2
    torch.testing.assert_close(data.subset((1, 2)).x, data.x[[1, 2]])
    assert data.subset(np.arange(data.n_samples) < 5).n_samples == data.subset(slice(0, 5)).n_samples == 5


def test_one_hot_labels_are_refused_with_the_fix():
    y = np.eye(2)[[0, 1, 0, 1, 1]]
    with pytest.raises(DataError, match=r"The labels 'y' of dataset 'onehot' must be 1-D \(one class id or target per sample\) but have "
                                        r"shape \(5, 2\); for one-hot labels pass y\.argmax\(1\)\."):
        load_dataset(npz_bytes(x=np.random.rand(5, 3), y=y), filename="onehot.npz")
    column = load_dataset(npz_bytes(x=np.random.rand(5, 3), y=np.arange(5)[:, None]), filename="column.npz")
    assert column.y.tolist() == [0, 1, 2, 3, 4]


def test_complex_inputs_are_refused_not_truncated_to_token_ids():
    x = np.random.rand(5, 3).astype(np.complex64)
    message = (r"The dataset's 'x' holds complex numbers \(complex64\), which would lose their imaginary parts; store the real and "
               r"imaginary parts as separate features, e\.g\. np\.concatenate\(\[x\.real, x\.imag\], axis=-1\)\.")
    with pytest.raises(DataError, match=message):
        load_dataset(npz_bytes(x=x), filename="complex.npz")
    buf = io.BytesIO()
    torch.save({"x": torch.from_numpy(x)}, buf)
    with pytest.raises(DataError, match=message):
        load_dataset(buf.getvalue(), filename="complex.pt")
    with pytest.raises(DataError, match=r"The dataset's 'y' holds complex numbers \(complex128\), which would lose their imaginary "
                                        r"parts; give real class ids or targets\."):
        make_dataset("c", np.zeros((2, 3)), np.array([1 + 1j, 2]))


def test_uint64_values_beyond_int64_are_refused_not_wrapped():
    x = np.array([[1, 2], [2**63, 2**64 - 1]], dtype=np.uint64)
    with pytest.raises(DataError, match=r"The 'x' of dataset 'big' has 2 uint64 values at or above 2\*\*63, beyond the int64 range "
                                        r"used for token ids and labels; renumber them below 2\*\*63\."):
        load_dataset(npz_bytes(x=x), filename="big.npz")
    with pytest.raises(DataError, match=r"The 'y' of dataset 'big' has 1 uint64 value at or above 2\*\*63"):
        make_dataset("big", np.zeros((2, 3)), np.array([0, 2**63], dtype=np.uint64))
    fits = load_dataset(npz_bytes(x=np.array([[1], [2**63 - 1]], dtype=np.uint64)), filename="fits.npz")
    assert fits.x.dtype == torch.int64 and fits.x[1, 0] == 2**63 - 1




@pytest.mark.parametrize("text", [b",a,b\n0,1,2\n1,3,4\n2,5,6\n", b"Unnamed: 0,a,b\n2,1,2\n0,3,4\n1,5,6\n", b'"",a,b\n"1",1,2\n"2",3,4\n"3",5,6\n'])
def test_csv_unnamed_index_column_is_dropped_with_a_note(text):
    data = load_dataset(text, filename="d.csv")  # pandas' to_csv with its index, read back and saved again, or R's write.csv
    assert data.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert "unnamed first column" in data.info["dropped"] and "row numbers" in data.info["dropped"]
    kept = load_dataset(b",a\n0.5,1\n2,3\n", filename="d.csv")  # an unnamed column of measurements stays a feature
    assert kept.x.tolist() == [[0.5, 1], [2, 3]] and "dropped" not in kept.info
    with pytest.raises(DataError, match=r"The only feature column of 'd\.csv' is an unnamed column of row numbers, an index such as "
                                        r"pandas writes; save the table with its feature columns, e\.g\. df\.to_csv\(path, index=False\)\."):
        load_dataset(b",label\n0,1\n1,0\n", filename="d.csv")


@pytest.mark.parametrize("header, found", [("y,Label,a", "'y', 'Label'"), ("label,label,a", "'label', 'label'"),
                                           ("a,class,target", "'class', 'target'")])
def test_csv_with_several_label_columns_is_refused_not_read_as_features(header, found):
    with pytest.raises(DataError, match=rf"^'d\.csv' has 2 columns that could be the labels \({found}\); keep one label column and "
                                        r"rename or remove the others, which would otherwise be read as features\.$"):
        load_dataset(f"{header}\n0,1,2\n1,0,3\n".encode(), filename="d.csv")


@pytest.mark.parametrize("text", [b"a;b;label\n1;2;0\n3;4;1\n", b"a\tb\tlabel\n1\t2\t0\n3\t4\t1\n", b"sep=;\na;b;label\n1;2;0\n3;4;1\n",
                                  b"sep=,\na,b,label\n1,2,0\n3,4,1\n", b"a,b,label,\n1,2,0,\n3,4,1,\n", b"a;b;label;\r\n1;2;0;\r\n3;4;1;\r\n"])
def test_csv_separated_by_semicolons_or_tabs_or_saved_by_excel_is_read(text):
    data = load_dataset(text, filename="d.csv")
    assert data.x.tolist() == [[1, 2], [3, 4]] and data.y.tolist() == [0, 1]
    assert load_dataset(b"1,2,\n3,4,\n", filename="d.csv").x.tolist() == [[1, 2], [3, 4]]  # no header, a comma after each row


def test_csv_dialect_mistakes_get_a_sentence():
    with pytest.raises(DataError, match=r"^Row 2 of 'd\.csv' writes the number '1,5' in column 'a' with a comma in it; save the table with "
                                        r"plain numbers \(decimal points such as 1\.5, no thousands separators\) and commas between the columns\.$"):
        load_dataset(b"a;b\n1,5;2,5\n3,5;4,5\n", filename="d.csv")
    with pytest.raises(DataError, match=r"^Row 1 of 'd\.csv' writes the number '1,5' in column 'column 1' with a comma in it"):
        load_dataset(b"1,5;2,5\n3,5;4,5\n", filename="d.csv")
    with pytest.raises(DataError, match=r"^Row 3 of 'd\.csv' writes the number '0,5' in column 'label' with a comma in it"):
        load_dataset(b"a;label\n1;1\n2;0,5\n", filename="d.csv")  # not the text label '0,5'
    with pytest.raises(DataError, match=r"^Column 'b' of 'd\.csv' holds '2;3', which has semicolons in it, but the file is read as "
                                        r"separated by commas; save the table with one separator"):
        load_dataset(b"a,b\n1,2;3\n", filename="d.csv")
    with pytest.raises(CorruptFileError, match=r"^Row 3 of 'd\.csv' has 3 columns; expected 2 like the first row\.$"):
        load_dataset(b"a,b,\n1,2,\n3,4,5\n", filename="d.csv")  # a value after what looked like Excel's trailing separator


@pytest.mark.parametrize("arrays", [{"x": np.ones((2, 2)), "Y": np.array([0, 1])}, {"X": np.ones((2, 2)), "target": np.array([0, 1])},
                                    {"x": np.ones((2, 2)), "Labels": np.array([0, 1])}, {"x": np.ones((2, 2)), "targets": np.array([0, 1])},
                                    {"x": np.ones((2, 2)), "label": np.array([0, 1]), "Class_Names": np.array(["a", "b"])}])
def test_npz_and_pt_take_the_same_names_for_features_labels_and_class_names(arrays):
    for data, filename in [(npz_bytes(**arrays), "d.npz"), (pt_bytes({k: torch.as_tensor(v) if v.dtype.kind != "U" else v.tolist()
                                                              for k, v in arrays.items()}), "d.pt")]:
        loaded = load_dataset(data, filename=filename)
        assert loaded.x.shape == (2, 2) and loaded.y.tolist() == [0, 1], filename
        assert loaded.class_names == (("a", "b") if "Class_Names" in arrays else None), filename


@pytest.mark.parametrize("filename", ["d.npz", "d.pt"])
def test_upload_arrays_that_would_be_dropped_are_refused(filename):
    def save(**arrays):
        return npz_bytes(**arrays) if filename == "d.npz" else pt_bytes({k: torch.as_tensor(v) for k, v in arrays.items()})

    kind = "arrays" if filename == "d.npz" else "keys"
    with pytest.raises(DataError, match=rf"^'d\.(npz|pt)' holds the {kind} 'classes', 'weights', which load_dataset does not read; save only "
                                        r"the features as 'x', the labels as 'y' \(or labels, label, target, targets, in any case\) and "
                                        r"'class_names', so that no labels are dropped unseen\.$"):
        load_dataset(save(x=np.ones((2, 2)), classes=np.array([0, 1]), weights=np.ones(2)), filename=filename)
    with pytest.raises(DataError, match=rf"holds 2 {kind} that could be the labels \('y', 'labels'\); keep one of them\.$"):
        load_dataset(save(x=np.ones((2, 2)), y=np.array([0, 1]), labels=np.array([0, 1])), filename=filename)
    with pytest.raises(DataError, match=rf"holds 2 {kind} that could be the features \('x', 'X'\); keep one of them\.$"):
        load_dataset(save(x=np.ones((2, 2)), X=np.ones((2, 2))), filename=filename)
    with pytest.raises(DataError, match=rf"holds the {kind} y but none named 'x'; save the features as 'x'"):
        load_dataset(save(y=np.array([0, 1])), filename=filename)  # labels alone are not features


def test_pt_class_names_are_read_and_must_be_strings():
    data = load_dataset(pt_bytes({"x": torch.ones(3, 2), "y": torch.tensor([2, 0, 1]), "class_names": ("a", "b", "c")}), filename="n.pt")
    assert data.class_names == ("a", "b", "c") and data.named_labels().tolist() == ["c", "a", "b"]
    with pytest.raises(DataError, match=r"^'class_names' in 'n\.pt' must be a list of strings \(one name per class\); got Tensor\.$"):
        load_dataset(pt_bytes({"x": torch.ones(3, 2), "y": torch.tensor([2, 0, 1]), "class_names": torch.arange(3)}), filename="n.pt")


@pytest.mark.parametrize("y, names, message", [
    (np.array([0.0, 1.0, 5.0]), ["a", "b", "c"], r"^'n\.(npz|pt)' has labels up to 5 but 3 class_names; give one name per class "
                                                 r"\(labels 0 to 2\)\.$"),
    (np.array([0, 1, 0]), ["a", "a"], r"^'class_names' in 'n\.(npz|pt)' holds 'a' more than once; give each class its own name\.$"),
    (np.array([0.5, 1.25, 0.0]), ["a", "b"], r"^'n\.(npz|pt)' has 'class_names' but its labels are regression targets \(such as 0\.5\), "
                                             r"not class numbers 0 to 1; give integer class labels with 'class_names', or drop"),
    (None, ["a", "b"], r"^'n\.(npz|pt)' has 'class_names' but no labels; save the labels beside them as 'y', or drop 'class_names'\.$"),
])
def test_class_names_are_checked_against_the_labels_as_read(y, names, message):
    arrays = {"x": np.ones((3, 2))} | ({} if y is None else {"y": y})
    with pytest.raises(DataError, match=message):
        load_dataset(npz_bytes(**arrays, class_names=np.array(names)), filename="n.npz")
    with pytest.raises(DataError, match=message):
        load_dataset(pt_bytes({k: torch.as_tensor(v) for k, v in arrays.items()} | {"class_names": names}), filename="n.pt")
    ok = load_dataset(npz_bytes(x=np.ones((3, 2)), y=np.array([0.0, 1.0, 1.0]), class_names=np.array(["a", "b", "unused"])), filename="n.npz")
    assert ok.y.tolist() == [0, 1, 1] and ok.class_names == ("a", "b", "unused")  # names for classes a sample lacks are fine


def test_integer_inputs_are_token_ids_with_a_note_saying_how_to_get_floats():
    data = load_dataset(npz_bytes(x=np.full((2, 4), 255, dtype=np.uint8)), filename="img.npz")
    assert data.x.dtype == torch.int64 and data.x.tolist() == [[255] * 4] * 2  # the documented rule: integers are token ids
    assert data.info["inputs"] == ("the uint8 values of x are kept as int64 token ids, for models that take tokens; for a model of float "
                                   "features (such as an MLP) save x as floats, e.g. x.astype('float32') / 255 for 8-bit image pixels")
    assert "x.astype('float32')" in load_dataset(pt_bytes(torch.ones(2, 3, dtype=torch.int32)), filename="t.pt").info["inputs"]
    assert "inputs" not in load_dataset(npz_bytes(x=np.ones((2, 2), dtype=np.float32)), filename="f.npz").info
