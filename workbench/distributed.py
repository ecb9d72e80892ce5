"""Optional scale-out: activation extraction over dataset shards and all-pairs comparisons on Ray.

Install with ``pip install 'representation-workbench[distributed]'``. Both functions give the same
numbers as the single-process path: :func:`extract_sharded` writes the same cache entry that
:func:`~workbench.extract` would (so later calls read it), and :func:`similarity_matrix_sharded`
splits the layer pairs by rows of the matrix. ``engine="local"`` runs the same shards one after the
other in this process (no Ray), which is what the tests compare against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.activations.capture import POOLINGS
from workbench.activations.extract import (
    _as_dataset,
    assemble_cache,
    batch_dependent,
    cache_key,
    check_layers,
    default_cache_dir,
    extract,
)
from workbench.activations.types import Activations
from workbench.analyses._validation import (
    check_choice,
    check_int,
    check_layer_names,
    check_progress,
    check_same_dataset,
)
from workbench.data.datasets import Dataset
from workbench.errors import DataError, ParameterError, UnsupportedFormatError
from workbench.models.loading import LoadedModel, as_loaded_model

ENGINES = ("ray", "local")
Progress = Callable[[int, int], None]


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UnsupportedFormatError(
            "The 'ray' engine needs the optional Ray package: pip install 'representation-workbench[distributed]', "
            "or pass engine='local'."
        ) from exc
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def _shards(n: int, n_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, min(n_shards, n) + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _extract_shard(model: LoadedModel, shard: Dataset, layers: list[str], pooling: str, batch_size: int,
                   device: str | None, root: str) -> Activations:
    return extract(model, shard, layers, pooling=pooling, batch_size=batch_size, device=device, cache_dir=root)


def _run(engine: str, fn: Callable[..., Any], calls: list[tuple], progress: Progress | None) -> list[Any]:
    """``fn(*args)`` for every call, in order, as Ray tasks or in this process; progress per finished call."""
    if engine == "local":
        out = []
        for i, args in enumerate(calls, start=1):
            out.append(fn(*args))
            if progress is not None:
                progress(i, len(calls))
        return out
    ray = _ray()
    remote = ray.remote(fn)
    refs = [remote.remote(*args) for args in calls]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        if progress is not None:
            progress(len(refs) - len(pending), len(refs))
    return ray.get(refs)


def extract_sharded(
    model: LoadedModel | nn.Module,
    dataset: Dataset | torch.Tensor | np.ndarray,
    layers: list[str] | str,
    *,
    n_shards: int = 4,
    engine: str = "ray",
    pooling: str = "mean",
    batch_size: int = 256,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Activations:
    """:func:`~workbench.extract` over ``n_shards`` contiguous row ranges run as parallel tasks.

    Each task extracts one shard into the disk cache; the shards are then concatenated (streamed)
    into the cache entry of the whole dataset, so the result, and every later ``extract`` call with
    the same arguments, equals the single-process extraction. A model whose activations depend on the other samples
    of a batch (a BatchNorm without running statistics) is extracted in one run instead, since shards would batch it
    differently. ``progress(done, total)`` counts shards.
    """
    func = "extract_sharded"
    engine = check_choice(engine, "engine", ENGINES, func=func)
    n_shards = check_int(n_shards, "n_shards", func=func, low=1, high=4096)
    check_progress(progress, func=func)
    if pooling not in POOLINGS:
        raise ParameterError(f"The 'pooling' parameter of {func} must be one of {', '.join(map(repr, POOLINGS))}. Got {pooling!r}.")
    lm = as_loaded_model(model)
    data = _as_dataset(dataset)
    layers = check_layers(lm, layers)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if batch_dependent(lm.module) or (root / cache_key(lm, data, layers, pooling, batch_size) / "meta.json").exists():
        # a model whose activations depend on the batch is extracted in one run, batched as extract batches it
        return extract(lm, data, layers, pooling=pooling, batch_size=batch_size, device=device, cache_dir=root)
    shards = [data.subset(slice(lo, hi), name=f"{data.name}[{lo}:{hi}]") for lo, hi in _shards(data.n_samples, n_shards)]
    calls = [(lm, shard, layers, pooling, batch_size, device, str(root)) for shard in shards]
    parts = _run(engine, _extract_shard, calls, progress)
    assemble_cache(lm, data, layers, pooling, parts, root)
    return extract(lm, data, layers, pooling=pooling, batch_size=batch_size, device=device, cache_dir=root)


def _similarity_rows(rows: dict[str, np.ndarray], columns: dict[str, np.ndarray], same: bool, options: dict[str, Any]):
    from workbench.analyses.similarity import UndefinedPairError, similarity_matrix

    try:
        return similarity_matrix(rows, None if same else columns, **options)
    except UndefinedPairError as exc:  # every CCA pair of these rows is undefined: NaN cells, unless all rows are
        return exc


def _layer_list(acts: Mapping[str, Any], layers: Any, name: str, arg: str, func: str) -> list[str]:
    """The layers to use (all of ``acts`` when None), checked as :func:`similarity_matrix` checks them."""
    if not len(acts):
        raise DataError(f"{func}: '{arg}' holds no layers; pass the activations of at least one layer.")
    if layers is None:
        return list(acts)
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ParameterError(f"The '{name}' parameter of {func} must be a non-empty list of layer names. Got {layers!r}.")
    return check_layer_names(acts, list(layers), func=func, arg=arg)


def similarity_matrix_sharded(
    acts_a: Mapping[str, Any],
    acts_b: Mapping[str, Any] | None = None,
    *,
    n_tasks: int = 4,
    engine: str = "ray",
    progress: Progress | None = None,
    **options: Any,
):
    """:func:`~workbench.analyses.similarity.similarity_matrix` with the rows (layers of A) split over tasks.

    ``options`` are passed to ``similarity_matrix`` unchanged (``measure``, ``debiased``, ...). The
    values equal the single-process matrix; ``estimator`` records the number of tasks.
    """
    func = "similarity_matrix_sharded"
    engine = check_choice(engine, "engine", ENGINES, func=func)
    n_tasks = check_int(n_tasks, "n_tasks", func=func, low=1, high=4096)
    check_progress(progress, func=func)
    if acts_b is not None:
        check_same_dataset(acts_a, acts_b, func=func)
    started = time.perf_counter()
    columns_source = acts_a if acts_b is None else acts_b
    layers_a = _layer_list(acts_a, options.pop("layers_a", None), "layers_a", "acts_a", func)
    layers_b = _layer_list(columns_source, options.pop("layers_b", None), "layers_b", "acts_a" if acts_b is None else "acts_b", func)
    columns = {name: np.asarray(columns_source[name]) for name in layers_b}
    measure, kind = options.get("measure", "linear_cka"), options.get("kind", "svcca")
    symmetric = acts_b is None and layers_a == layers_b and not (measure == "cca_similarity" and kind == "pwcca")
    widths = [np.shape(acts_a[name])[1] for name in layers_a] + ([] if symmetric else [w.shape[1] for w in columns.values()])
    needed_mb = np.shape(acts_a[layers_a[0]])[0] * sum(widths) * 8 / 2**20
    streamed = measure == "linear_cka" and needed_mb > options.get("memory_limit_mb", 4096.0)
    # a streamed matrix reads every layer in each chunk of samples, and its chunk size depends on all the layers: one task
    groups = [list(layers_a)] if streamed else [
        list(g) for g in np.array_split(np.array(layers_a, dtype=object), min(n_tasks, len(layers_a))) if len(g)]
    calls = [({name: np.asarray(acts_a[name]) for name in g}, columns, False, options) for g in groups]
    if engine == "ray":
        ray = _ray()
        shared = ray.put(columns)
        calls = [(rows, shared, False, options) for rows, _, _, _ in calls]
    parts = _run(engine, _similarity_rows, calls, progress)
    return _merge_rows(parts, groups, layers_a, layers_b, acts_a, columns_source, acts_b is None, symmetric, engine, kind,
                       time.perf_counter() - started)


def _merge_rows(parts: list[Any], groups: list[list[str]], layers_a: list[str], layers_b: list[str], acts_a: Mapping[str, Any],
                columns_source: Mapping[str, Any], same: bool, symmetric: bool, engine: str, kind: str, seconds: float):
    """One matrix from the row blocks of the tasks: a block whose CCA pairs are all undefined becomes NaN cells, and the
    undefined pairs are listed as the single-process matrix lists them (one triangle when it is symmetric)."""
    from workbench.analyses.similarity import UndefinedPairError, _undefined_pairs_note

    done = [p for p in parts if not isinstance(p, UndefinedPairError)]
    if not done:
        raise parts[0]
    first = done[0]
    values, undefined = [], []
    for group, part in zip(groups, parts):
        if isinstance(part, UndefinedPairError):
            values.append(np.full((len(group), len(layers_b)), np.nan))
            undefined += [(a, b) for a in group for b in layers_b]
        else:
            values.append(part.values)
            undefined += [tuple(p) for p in part.params.get("undefined_pairs", [])]
    if symmetric:
        undefined = [(a, b) for a, b in undefined if layers_a.index(a) <= layers_a.index(b)]
    n_pairs = len(layers_a) * (len(layers_a) + 1) // 2 if symmetric else len(layers_a) * len(layers_b)
    if len(undefined) == n_pairs:
        raise next(p for p in parts if isinstance(p, UndefinedPairError))
    params = {k: v for k, v in first.params.items() if k != "undefined_pairs"}
    for key in ("ranks_a", "ranks_b"):  # the CCA rank of each layer, recorded by the task that read it
        ranks = {name: r for part in done for name, r in part.params.get(key, {}).items()}
        if ranks:
            params[key] = {name: ranks[name] for name in (layers_a if key == "ranks_a" else layers_b) if name in ranks}
    estimator = first.estimator.split("; n/a (NaN) for ")[0]
    if undefined:
        params["undefined_pairs"] = undefined
        estimator = _undefined_pairs_note(estimator, undefined, n_pairs, first.n_samples, kind)
    return replace(
        first,
        values=np.concatenate(values, axis=0),
        layers_a=tuple(layers_a),
        n_features_a=np.asarray([np.shape(acts_a[name])[1] for name in layers_a], dtype=np.int64),
        model_a=getattr(acts_a, "model_name", "") or "A",
        model_b=getattr(columns_source, "model_name", "") or ("A" if same else "B"),
        params=params,
        estimator=f"{estimator}; rows over {len(parts)} {engine} task(s)",
        seconds=seconds,
    )
