"""Seeded train/test splits of a :class:`~workbench.data.Dataset`."""

from __future__ import annotations

import numpy as np

from workbench.data.datasets import Dataset
from workbench.errors import DataError, ParameterError


def train_test_split(dataset: Dataset, *, test_fraction: float = 0.3, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, test)`` subsets of ``dataset``, seeded, each in the dataset's order.

    With integer labels where every class has at least two samples and both parts can hold one sample
    of each class, the split is stratified (each class keeps its share in both parts, as scikit-learn's
    ``train_test_split(stratify=y)``); otherwise it is a plain random split. The parts are named
    ``"<name> [70%]"`` and ``"<name> [30%]"`` (for ``test_fraction=0.3``).
    """
    from sklearn.model_selection import train_test_split as sk_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ParameterError(f"test_fraction must be a number between 0 and 1 (exclusive). Got {test_fraction!r}.")
    n = dataset.n_samples
    n_test = int(np.ceil(test_fraction * n))
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"Dataset '{dataset.name}' has {n} samples, too few to hold out {test_fraction:.0%} and train on the rest.")
    y = None if dataset.y is None or dataset.y.dtype.is_floating_point else dataset.y.numpy()
    counts = None if y is None else np.unique(y, return_counts=True)[1]
    stratify = y if counts is not None and counts.min() >= 2 and len(counts) <= min(n_test, n - n_test) else None
    fit, held = sk_split(np.arange(n), test_size=n_test, random_state=seed, stratify=stratify)
    pct = round(100 * test_fraction)
    return (dataset.subset(np.sort(fit), f"{dataset.name} [{100 - pct}%]"),
            dataset.subset(np.sort(held), f"{dataset.name} [{pct}%]"))
