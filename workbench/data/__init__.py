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

__all__ = ["BUILTIN_DATASETS", "Dataset", "blobs", "digits", "digits_train_for", "label_order_note", "load_dataset", "make_dataset"]
