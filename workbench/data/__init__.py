from workbench.data.datasets import (
    BUILTIN_DATASETS,
    Dataset,
    blobs,
    digits,
    digits_train_for,
    label_order_note,
    load_dataset,
    make_dataset,
)
from workbench.data.splits import train_test_split

__all__ = ["BUILTIN_DATASETS", "Dataset", "blobs", "digits", "digits_train_for", "label_order_note", "load_dataset", "make_dataset",
           "train_test_split"]
