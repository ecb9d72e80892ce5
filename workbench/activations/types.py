"""The ``Activations`` container: layer name -> ``(n_samples, n_features)`` float32 tensor."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from workbench.errors import DataError, ParameterError, UnknownLayerError, WorkbenchError, did_you_mean, format_choices


class Activations(Mapping[str, torch.Tensor]):
    """Pooled activations of one model on one dataset, in the order the layers were asked for.

    Behaves as a read-only mapping from layer name to a float32 tensor ``(n_samples, n_features)``
    (possibly memory-mapped from the on-disk cache). Records which model, dataset and pooling rule
    produced it so results can say what they were computed from.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        model_name: str = "",
        model_sha256: str = "",
        dataset_name: str = "",
        dataset_sha256: str = "",
        inputs_sha256: str = "",
        pooling: str = "mean",
        labels: torch.Tensor | None = None,
        key: str = "",
    ):
        if not tensors:
            raise DataError("Activations need at least one layer; pass one or more layer names.")
        sizes = {name: int(t.shape[0]) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"All layers must have the same number of samples; got {sizes}.")
        self._tensors = dict(tensors)
        self.model_name = model_name
        self.model_sha256 = model_sha256
        self.dataset_name = dataset_name
        self.dataset_sha256 = dataset_sha256
        self.inputs_sha256 = inputs_sha256
        self.pooling = pooling
        self.labels = labels
        self.key = key

    def __getitem__(self, layer: str) -> torch.Tensor:
        try:
            return self._tensors[layer]
        except KeyError:
            raise UnknownLayerError(
                f"Unknown layer '{layer}'.{did_you_mean(layer, self._tensors)} Layers: {format_choices(self._tensors)}."
            ) from None

    def __contains__(self, layer: object) -> bool:
        return layer in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"Activations(model={self.model_name!r}, dataset={self.dataset_name!r}, pooling={self.pooling!r}, {{{shapes}}})"

    @property
    def layers(self) -> list[str]:
        return list(self._tensors)

    @property
    def n_samples(self) -> int:
        return int(next(iter(self._tensors.values())).shape[0])

    def save_npz(self, path: str | Path) -> Path:
        """Write every layer (and labels, when known) to an ``.npz`` readable with ``allow_pickle=False``, with
        ``meta``: a JSON string naming the model, the dataset (names and sha256, and the sha256 of the inputs alone
        that the same-data checks compare) and the pooling rule. :meth:`load_npz` reads it back.

        ``.npz`` is appended to a name without it (as numpy does) and a missing parent folder is created;
        returns the path written."""
        path = Path(path)
        if not path.name.endswith(".npz"):
            path = path.with_name(path.name + ".npz")
        arrays = {f"layer/{k}": v.detach().cpu().numpy() for k, v in self._tensors.items()}
        if self.labels is not None:
            arrays["labels"] = self.labels.detach().cpu().numpy()
        meta = {"model": self.model_name, "model_sha256": self.model_sha256, "dataset": self.dataset_name,
                "dataset_sha256": self.dataset_sha256, "inputs_sha256": self.inputs_sha256, "pooling": self.pooling,
                "layers": list(self._tensors), "key": self.key}
        arrays["meta"] = np.array(json.dumps(meta))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
        except OSError as exc:
            raise ParameterError(f"The activations cannot be written to '{path}' ({exc.strerror or type(exc).__name__}); "
                                 "choose another location.") from exc
        return path

    @classmethod
    def load_npz(cls, path: str | Path) -> Activations:
        """Activations written by :meth:`save_npz` (or ``workbench extract``), with the model, dataset and hashes
        they record, so that analyses can again refuse activations of different datasets."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                files = set(f.files)
                if "meta" not in files:
                    raise DataError(f"'{path.name}' holds no 'meta' entry, so it was not written by save_npz or "
                                    "'workbench extract'; extract the activations again.")
                meta = json.loads(str(f["meta"]))
                layers = meta.get("layers") if isinstance(meta, dict) else None
                if not isinstance(layers, list) or not layers or any(f"layer/{k}" not in files for k in layers):
                    raise DataError(f"The meta entry of '{path.name}' does not list the layers the file holds; "
                                    "extract the activations again.")
                tensors = {k: torch.from_numpy(np.asarray(f[f"layer/{k}"], dtype=np.float32)) for k in layers}
                labels = torch.from_numpy(f["labels"]) if "labels" in files else None
        except WorkbenchError:
            raise
        except FileNotFoundError:
            raise DataError(f"No activations file at '{path}'; check the path.") from None
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:  # not a zip, a damaged member, pickled objects, bad JSON
            raise DataError(f"'{path.name}' is not a readable .npz of activations ({type(exc).__name__}); "
                            "extract the activations again.") from None
        if any(t.ndim != 2 for t in tensors.values()):
            raise DataError(f"The layers in '{path.name}' must be 2-D (samples, features); extract the activations again.")
        return cls(tensors, model_name=str(meta.get("model", "")), model_sha256=str(meta.get("model_sha256", "")),
                   dataset_name=str(meta.get("dataset", "")), dataset_sha256=str(meta.get("dataset_sha256", "")),
                   inputs_sha256=str(meta.get("inputs_sha256", "")), pooling=str(meta.get("pooling", "mean")),
                   labels=labels, key=str(meta.get("key", "")))
