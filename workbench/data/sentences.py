"""The bundled sentences dataset: short sentences about four topics, as byte tokens.

Tokenisation: ``[CLS] + utf-8 bytes`` with token ids ``byte + 1`` (1..256), ``CLS = 257``, padding
``0``, truncated or padded to ``MAX_LEN``. The split is fixed (25 % test, stratified, seed 0).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from workbench.errors import ParameterError

MAX_LEN = 64
CLS = 257
VOCAB_SIZE = 258
TOPICS = ("food", "sports", "technology", "weather")


def tokenize(sentences: list[str], max_len: int = MAX_LEN) -> torch.Tensor:
    """Byte tokens ``(n, max_len)`` int64 with a leading CLS token and zero padding."""
    out = torch.zeros((len(sentences), max_len), dtype=torch.int64)
    for i, s in enumerate(sentences):
        ids = [CLS] + [b + 1 for b in s.encode("utf-8")][: max_len - 1]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@lru_cache(maxsize=1)
def _rows() -> tuple[list[str], np.ndarray]:
    text = resources.files("workbench.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return [s for _, s in rows], np.array([TOPICS.index(label) for label, _ in rows])


def sentences(split: str = "test"):
    """The bundled sentences (480 in all: 360 train, 120 test) with topic labels."""
    from sklearn.model_selection import train_test_split

    from workbench.data.datasets import make_dataset

    if split not in ("train", "test", "all"):
        raise ParameterError(f"The 'split' parameter of sentences must be 'train', 'test' or 'all'. Got {split!r}.")
    texts, labels = _rows()
    idx = np.arange(len(texts))
    if split != "all":
        train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=labels)
        idx = np.sort(train_idx if split == "train" else test_idx)
    chosen = [texts[i] for i in idx]
    return make_dataset(f"sentences ({split})", tokenize(chosen), labels[idx], class_names=TOPICS,
                        description="bundled topic sentences as byte tokens", info={"split": split, "texts": chosen})
