from workbench.data.datasets import (
    BUILTIN_DATASETS,
    Dataset,
    blobs,
    digits,
    label_order_note,
    load_dataset,
    make_dataset,
)

__all__ = ["BUILTIN_DATASETS", "Dataset", "blobs", "digits", "label_order_note", "load_dataset", "make_dataset"]
