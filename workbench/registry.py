"""The list of analyses. The app's report, the command line and the tests all read this one list.

Each :class:`Analysis` says what it needs (``inputs``: one model, two models, or weights plus a
dataset), how to compute it from a :class:`Context`, how to draw it, and how to summarise it in a
few numbers. :func:`run_analysis` runs one entry and returns a report
:class:`~workbench.report.Section` with the Python that recreates it.

:data:`MEASURES` lists the pairwise representation measures (functions of two activation matrices)
with their declared properties, so that ``tests/unit/test_common.py`` can check each declared
property on each measure.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.activations import Activations, check_layers, extract, layer_info, list_layers
from workbench.data import Dataset
from workbench.errors import ParameterError, UnknownLayerError, did_you_mean, format_choices
from workbench.models import SAMPLE_MODELS, LoadedModel

if TYPE_CHECKING:
    import plotly.graph_objects as go

INPUT_KINDS = ("one_model", "two_models", "weights")
Progress = Callable[[int, int], None]


@dataclass
class Context:
    """What an analysis runs on: model A (and B), a dataset, the layers and how to pool them."""

    model_a: LoadedModel
    dataset: Dataset
    model_b: LoadedModel | None = None
    layers_a: list[str] | None = None
    layers_b: list[str] | None = None
    pooling: str = "mean"
    device: str | None = None
    progress: Progress | None = None
    train_dataset: Dataset | None = None  # set by an analysis that trains or matches on other data than ``dataset``
    compared: tuple[list[str], list[str]] | None = None  # layer pairs an analysis compared, when it picked a subset
    _acts: dict[str, Activations] = field(default_factory=dict, repr=False)

    def models(self) -> list[LoadedModel]:
        return [m for m in (self.model_a, self.model_b) if m is not None]

    def activations(self, which: str = "a") -> Activations:
        """Activations of model ``"a"`` or ``"b"`` on the dataset (extracted once, then cached)."""
        if which not in self._acts:
            model = self.model_a if which == "a" else self.model_b
            if model is None:
                raise ParameterError("This analysis compares two models; choose model B too.")
            layers = self.layers_a if which == "a" else (self.layers_b or self.layers_a)
            try:
                self._acts[which] = extract(model, self.dataset, layers or default_layers(model), pooling=self.pooling,
                                            device=self.device, progress=self.progress)
            except UnknownLayerError as exc:  # say which of the two models lacks the layer
                raise _lacking(exc, model, which, separate=bool(self.layers_b)) from exc
        return self._acts[which]


def _lacking(exc: UnknownLayerError, model: LoadedModel, which: str, *, separate: bool) -> UnknownLayerError:
    """``exc`` naming model ``which`` ("a" or "b"); for model B asked for A's layer names, how to name its own."""
    hint = " Name model B's layers separately (layers_b, --layers-b)." if which == "b" and not separate else ""
    return UnknownLayerError(f"Model {which.upper()} ('{model.name}'): {exc}{hint}")


def check_layers_run(model: LoadedModel, dataset: Dataset, layers: list[str], which: str, *, separate: bool = False) -> None:
    """Raise, before any work, where model ``which`` ("a" or "b") lacks one of ``layers`` or where one gives no
    activations per sample on ``dataset`` (a module its forward pass never calls, or one that outputs a single row for
    the whole batch). ``separate``: model B's layers were named apart from A's (``layers_b``)."""
    try:
        check_layers(model, list(layers))
    except UnknownLayerError as exc:
        raise _lacking(exc, model, which, separate=separate) from None
    shapes = {info.name: info.output_shape for info in layer_info(model, dataset)}
    idle = [layer for layer in layers if shapes.get(layer) is None]
    if idle:
        listed = ", ".join(f"'{layer}'" for layer in idle)
        raise ParameterError(
            f"Model {which.upper()} ('{model.name}'): layer{'s' if len(idle) > 1 else ''} {listed} "
            f"give{'' if len(idle) > 1 else 's'} no activations per sample (not run by the forward pass, or one row for "
            "the whole batch); pick layers that list_layers (or 'workbench layers') shows with an output shape."
        )


SKIP_LAYER_TYPES = frozenset({"Unflatten", "Flatten", "Dropout", "Identity", "ModuleList", "Sequential"})


def default_layers(model: LoadedModel, infos: list | None = None) -> list[str]:
    """Leaf modules that run on a probe batch, without reshapes, dropout or containers (at most 12).

    ``infos`` is the model's :func:`workbench.activations.layer_info`, when already at hand."""
    infos = layer_info(model) if infos is None else infos
    names = [i.name for i in infos if i.output_shape is not None and i.type not in SKIP_LAYER_TYPES
             and not any(o.name.startswith(i.name + ".") for o in infos)]
    return names[:12]


@dataclass(frozen=True)
class Analysis:
    """One analysis as the app, the command line and the report see it."""

    name: str
    title: str
    inputs: str
    compute: Callable[..., Any]
    plot: Callable[[Any], list[go.Figure]]
    summary: Callable[[Any], dict[str, Any]]
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    page: str = ""
    requires: Callable[[Context, dict[str, Any]], None] | None = None  # raises when the models, data or parameters do not suit it
    title_for: Callable[[dict[str, Any]], str] | None = None  # a section's title for its parameters, where they change it
    notes_for: Callable[[Any, Context], str] | None = None  # caveats on a result, for its report section

    def __post_init__(self) -> None:
        if self.inputs not in INPUT_KINDS:
            raise ValueError(f"inputs must be one of {INPUT_KINDS}")


# ---------------------------------------------------------------------------------------------
# entries


def _model_labels(names: list[str]) -> list[str]:
    """One label per model result: its name, or "A: name" and "B: name" when both models have the same name."""
    return names if len(set(names)) == len(names) else [f"{slot}: {n}" for slot, n in zip("AB", names)]


def _activation_stats(ctx: Context, bins: int = 50) -> Any:
    from workbench.analyses.stats import activation_stats, shared_value_ranges

    acts = [ctx.activations(w) for w in ("a", "b")[: len(ctx.models())]]
    ranges = shared_value_ranges(*acts)  # two models' layers on the same bins, as the app shows them
    return [activation_stats(a, bins=bins, value_ranges=ranges) for a in acts]


def _activation_stats_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.activations import layer_histograms

    return [layer_histograms(*results)]


def _activation_stats_summary(results: Any) -> dict[str, Any]:
    from workbench.plots.activations import stats_rows

    labels = _model_labels([r.model for r in results])
    shares = {"dead units", "constant units", "zeros"}  # fractions in [0, 1], as the key says (the app shows percent)
    return {m: {row["layer"]: {f"{k} (fraction)" if k in shares else k: v for k, v in row.items() if k not in ("model", "layer")}
                for row in stats_rows(r)} for m, r in zip(labels, results)}


def _similarity(ctx: Context, measure: str = "linear_cka", chance: bool = True, **options: Any) -> Any:
    """The matrix, and with ``chance`` its chance level (the same measure with B's samples shuffled) to read it against."""
    from workbench.analyses._validation import check_bool
    from workbench.analyses.similarity import chance_level, similarity_matrix

    chance = check_bool(chance, "chance", func="similarity")
    acts_a = ctx.activations("a")  # model A first, so that a layer missing from both is reported for A
    acts_b = ctx.activations("b") if ctx.model_b is not None else None
    result = similarity_matrix(acts_a, acts_b, measure=measure, device=ctx.device, **options)
    if not chance:
        return result
    return [result, chance_level(acts_a, acts_b, measure=measure, device=ctx.device, **options)]


def _similarity_plot(result: Any) -> list[go.Figure]:
    from workbench.plots.similarity import similarity_heatmap

    return [similarity_heatmap(r) for r in (result if isinstance(result, list) else [result])]


def _similarity_summary(result: Any) -> dict[str, Any]:
    if isinstance(result, list):  # the matrix and its chance level
        out = _similarity_summary(result[0])
        values = np.asarray(result[1].values)
        values = values[np.isfinite(values)]
        out["chance level (B's samples shuffled)"] = {"min": float(values.min()), "median": float(np.median(values)),
                                                      "max": float(values.max())}
        return out
    values = np.asarray(result.values)
    higher = next((m.higher_is_closer for m in MEASURES if m.name == result.measure), True)
    from workbench.plots.similarity import measure_label  # as the page names it

    out: dict[str, Any] = {"measure": measure_label(result.measure), "estimator": result.estimator,
                           "closer pairs score": "higher" if higher else "lower"}
    defined = values[np.isfinite(values)]
    diagonal = np.diag(values) if values.shape[0] == values.shape[1] else np.zeros(0)
    if np.isfinite(diagonal).any():
        out["mean over the diagonal (layer i of A vs layer i of B)"] = float(np.nanmean(diagonal))
        if not np.isfinite(diagonal).all():
            out["diagonal pairs n/a"] = int((~np.isfinite(diagonal)).sum())
    if defined.size:
        out["max" if higher else "min"] = float(defined.max() if higher else defined.min())
    if defined.size < values.size:
        out["pairs n/a"] = int(values.size - defined.size)
    return out


def _relative(ctx: Context, n_anchors: int = 64, method: str = "random", k: int = 10, seed: int = 0) -> Any:
    from workbench.analyses.relative import relative_agreement_by_layer

    pairs = None  # layers of the same name in both models
    if ctx.layers_b:  # the layers of A and B were named apart: pair them by position
        acts_a = ctx.activations("a")
        if len(ctx.layers_b) != len(acts_a.layers):
            raise ParameterError(
                f"Relative representations pair model A's layers with model B's by position; got {len(acts_a.layers)} "
                f"layer(s) of A and {len(ctx.layers_b)} of B (layers_b, --layers-b): name as many of each.")
        pairs = list(zip(acts_a.layers, ctx.layers_b, strict=True))
    result = relative_agreement_by_layer(ctx.activations("a"), ctx.activations("b"), layers=pairs, n_anchors=n_anchors,
                                         method=method, k=k, seed=seed, device=ctx.device, progress=ctx.progress)
    ctx.compared = (list(result.layers_a), list(result.layers_b))  # so that the snippet pairs the same layers
    return result


def _relative_plot(result: Any) -> list[go.Figure]:
    from workbench.plots.similarity import layer_agreement_bars

    return [layer_agreement_bars(result)]


def _relative_summary(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (la, lb) in enumerate(zip(result.layers_a, result.layers_b)):
        row = {f"Jaccard@{result.k} (relative)": float(result.jaccard[i]), "MRR (relative)": float(result.mrr[i])}
        if bool(result.absolute_comparable[i]):
            row.update({f"Jaccard@{result.k} (absolute)": float(result.absolute_jaccard[i]),
                        "MRR (absolute)": float(result.absolute_mrr[i])})
        out[la if la == lb else f"{la} vs {lb}"] = row
    return out


def _relative_pair_summary(result: Any) -> dict[str, Any]:
    a = result.agreement
    out = {f"Jaccard@{a.k} (relative)": a.mean_jaccard, "MRR (relative)": a.mrr, "mean cosine (relative)": a.mean_cosine}
    if a.absolute_comparable:
        out.update({f"Jaccard@{a.k} (absolute)": a.absolute_mean_jaccard, "MRR (absolute)": a.absolute_mrr})
    return out


def _mode_connectivity(ctx: Context, n_points: int = 25, top_k: int = 5, seed: int = 0) -> Any:
    from workbench.analyses.mode_connectivity import mode_connectivity
    from workbench.data import digits_train_for

    ctx.train_dataset = digits_train_for(ctx.dataset)
    return mode_connectivity(ctx.model_a, ctx.model_b, ctx.dataset, train_dataset=ctx.train_dataset, n_points=n_points,
                             top_k=top_k, seed=seed, device=ctx.device, progress=ctx.progress)


def _mode_connectivity_plot(result: Any) -> list[go.Figure]:
    from workbench.plots import mode_connectivity as p

    names = {"name_a": result.params.get("model_a", "model A"), "name_b": result.params.get("model_b", "model B")}
    return [p.interpolation_curves(result), p.barrier_table(result), p.layer_alignment_figure(result.layers),
            p.singular_values_figure(result.layers, **names), p.matching_objective(result.weight_matching)]


def _mode_connectivity_notes(result: Any, ctx: Context) -> str:
    """The caveats the Mode connectivity page shows: models near chance on the data, barriers fitted in-sample."""
    from workbench.plots import mode_connectivity as p

    return " ".join(n for n in (p.chance_note(result, ctx.dataset), p.in_sample_note(result)) if n)


def _mode_connectivity_summary(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = _mode_connectivity_table(result)
    datasets = next(iter(result.curves.values())).params.get("datasets", {}) if result.curves else {}
    out.update({f"{split} split": name for split, name in datasets.items()})  # what each split was evaluated on
    return out


def _degeneracy(ctx: Context, output: str = "logits") -> Any:
    from workbench.analyses.degeneracy import degeneracy_summary

    return [degeneracy_summary(m, ctx.dataset, output=output, device=ctx.device, progress=ctx.progress) for m in ctx.models()]


def _degeneracy_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.degeneracy import degeneracy_figure

    return [degeneracy_figure(*results)]


def _degeneracy_summary(results: Any) -> dict[str, Any]:
    """Free parameters per model, with the part whose count the samples do not pin down (an upper bound there)."""
    from workbench.plots.degeneracy import sample_limited_share

    out = {}
    for m, r in zip(_model_labels([r.model for r in results]), results):
        out[m] = {"free": r.total_free, "parameters": r.total_parameters}
        if r.sample_limited:
            out[m]["of which from counts the samples do not pin down (upper bounds)"] = sample_limited_share(r)
            out[m]["matrices whose count the samples do not pin down"] = ", ".join(r.sample_limited)
    return out


def _interaction_basis(ctx: Context, graph_directions: int = 64, seed: int = 0) -> Any:
    from workbench.analyses.degeneracy import default_layers as degeneracy_layers
    from workbench.analyses.degeneracy import interaction_basis

    return [interaction_basis(m, ctx.dataset, degeneracy_layers(m, ctx.dataset), graph_directions=graph_directions,
                              seed=seed, device=ctx.device, progress=ctx.progress) for m in ctx.models()]


def _interaction_basis_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.degeneracy import basis_size_figure, interaction_spectrum_figure

    return [basis_size_figure(*results), interaction_spectrum_figure(*results)]


def _interaction_basis_summary(results: Any) -> dict[str, Any]:
    return {m: {"modularity": r.modularity, "basis_size": {layer: int(r.basis_size[layer]) for layer in r.layers}}
            for m, r in zip(_model_labels([r.model for r in results]), results)}


def _topology(ctx: Context, metric: str = "bottleneck", dim: int = 1, max_points: int = 1000, normalize: bool = True,
              seed: int = 0) -> Any:
    """The Topology page's diagram distances, with its defaults (scale-normalised diagrams, H1 on up to 1000 points)."""
    from workbench.analyses.topology import diagram_distance_matrix

    acts_a = ctx.activations("a")
    acts_b = ctx.activations("b") if ctx.model_b is not None else None
    return diagram_distance_matrix(acts_a, acts_b, metric=metric, dim=dim, max_points=max_points, normalize=normalize,
                                   seed=seed, device=ctx.device, progress=ctx.progress)


def _topology_plot(result: Any) -> list[go.Figure]:
    from workbench.plots.topology import diagram_distance_heatmap

    return [diagram_distance_heatmap(result)]


def _topology_summary(result: Any) -> dict[str, Any]:
    """The diagram distances' range and the layer pairs at its ends; one model's layers against each other are
    compared in distinct pairs (a layer's distance to itself is 0 by definition)."""
    from workbench.analyses.topology import empty_diagrams_note

    d = np.asarray(result.distances, dtype=float)
    a, b = list(result.layers_a), list(result.layers_b)
    # one model's layers against each other: the same rows and columns, and a layer's distance to itself 0
    one = a == b and result.model_a == result.model_b and np.array_equal(d, d.T) and not np.diagonal(d).any()
    pairs = [(i, j) for i in range(len(a)) for j in range(len(b)) if not (one and j <= i)]
    out: dict[str, Any] = {"diagrams": f"H{result.dim}, {result.metric} distance"}
    if pairs:
        values = np.array([d[i, j] for i, j in pairs])

        def pair(k: int) -> str:
            i, j = pairs[k]
            return f"{a[i]} – {b[j]}: {values[k]:.3g}" if one else f"{a[i]} (A) – {b[j]} (B): {values[k]:.3g}"

        out.update({"min_distance": float(values.min()), "max_distance": float(values.max()),
                    "closest layers": pair(int(np.argmin(values))), "farthest layers": pair(int(np.argmax(values)))})
    out["subsampled"] = bool(np.any(result.subsampled))
    if result.empty:
        out[f"empty H{result.dim} diagrams"] = empty_diagrams_note(result)
    for side, skipped in (("A", result.skipped_a), ("B", result.skipped_b)):
        if skipped:
            out[f"left out of {side}, constant over samples"] = ", ".join(skipped)
    return out


def _separability(ctx: Context, normalize: bool = True, probe: bool = True, cv: int = 5, seed: int = 0) -> Any:
    from workbench.analyses.topology import layer_separability

    return [layer_separability(ctx.activations(w), normalize=normalize, probe=probe and ctx.dataset.y is not None, cv=cv,
                               seed=seed, device=ctx.device, progress=ctx.progress)
            for w in ("a", "b")[: len(ctx.models())]]


def _separability_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.topology import separability_curves

    return [separability_curves(*results, names=[r.model_name for r in results])]


def _require_labels(ctx: Context, what: str) -> None:
    if ctx.dataset.y is None:
        raise ParameterError(f"{what} needs labels and dataset '{ctx.dataset.name}' has none; pick a labelled dataset.")


def _continuous(y: Any) -> bool:
    """Whether targets ``y`` are continuous values rather than class labels (floats that are not all whole numbers)."""
    return y.dtype.is_floating_point and not bool((y == y.round()).all())


def _check_folds(ctx: Context, analysis: str, cv: int, off: str) -> None:
    """Refuse class labels with a class rarer than ``cv`` folds, naming the options that fix it (``off``: the
    option that turns the folds off, "" where none does). Continuous targets are left to the analysis."""
    y = ctx.dataset.y
    if y is None or _continuous(y):
        return
    classes, counts = np.unique(y.numpy(), return_counts=True)
    if len(classes) < 2 or counts.min() >= cv:
        return
    fewest, rare = int(counts.min()), classes[int(counts.argmin())].item()
    fixes = [f"lower cv to {fewest} (--param {analysis}.cv={fewest})" if fewest >= 2 else
             "" if off else "drop the classes with a single sample", off, "use more samples of each class"]
    fixes = [f for f in fixes if f]
    raise ParameterError(
        f"The '{analysis}' analysis splits each class into cv={cv} folds, and class {rare!r} of dataset "
        f"'{ctx.dataset.name}' has {fewest} sample{'s' if fewest != 1 else ''}; {', '.join(fixes[:-1])} or {fixes[-1]}."
    )


def _probing_title(params: dict[str, Any]) -> str:
    kind = "Linear" if params["probe"] == "linear" else "MLP"
    return f"{kind} probes per layer" + (", with control task" if params["control"] else "")


def _probing_requires(ctx: Context, params: dict[str, Any]) -> None:
    from workbench.analyses.probing import _check_c, _prepare_targets

    _require_labels(ctx, "Probing")
    _check_c(params["c"], "probe_layers")  # a strength the probes cannot honour, refused before any extraction
    _check_folds(ctx, "probing", params["cv"], "")
    # labels the probes cannot use (one class, a class rarer than the folds), refused before any activation is extracted
    _prepare_targets(None, ctx.dataset.y, ctx.dataset.n_samples, cv=params["cv"], control=False, seed=params["seed"],
                     groups=None, func="probe_layers")


def _mode_connectivity_requires(ctx: Context, _params: dict[str, Any]) -> None:
    from workbench.analyses.mode_connectivity import _check_dataset, _check_runs, _check_same_architecture

    _require_labels(ctx, "Mode connectivity (loss and accuracy along the path)")
    a, b = ctx.models()
    if a.content_sha256 == b.content_sha256:
        raise ParameterError(
            f"Model A ('{a.name}') and model B ('{b.name}') are the same network (weights sha256 {a.sha256[:12]}), so the "
            "path between them is one point and every barrier is 0; pick two trained models, such as two seeds."
        )
    _check_same_architecture(a.module, b.module, "mode_connectivity", (a.name, b.name))
    _check_dataset(ctx.dataset, "dataset", "mode_connectivity")  # class labels, not continuous targets
    _check_runs(a.module, ctx.dataset, "dataset", "mode_connectivity")


def _separability_requires(ctx: Context, params: dict[str, Any]) -> None:
    y = ctx.dataset.y
    if y is not None and _continuous(y):
        raise ParameterError(f"Separability compares classes, and dataset '{ctx.dataset.name}' has continuous targets; "
                             "pick a dataset with class labels.")
    if params["probe"]:  # folds the probe cannot make, refused before any activation is extracted
        _check_folds(ctx, "separability", params["cv"], "turn the probe off (--param separability.probe=false)")


def _embedding_requires(ctx: Context, _params: dict[str, Any]) -> None:
    from workbench.analyses.embedding import EMBED_MIN_SAMPLES

    if ctx.dataset.n_samples < EMBED_MIN_SAMPLES:
        raise ParameterError(
            f"The 'embedding' analysis places samples among their neighbours, and dataset '{ctx.dataset.name}' has "
            f"{ctx.dataset.n_samples} samples; use a dataset of at least {EMBED_MIN_SAMPLES} samples."
        )


def _intrinsic_dimension_requires(ctx: Context, _params: dict[str, Any]) -> None:
    from workbench.analyses.embedding import ID_MIN_SAMPLES

    if ctx.dataset.n_samples < ID_MIN_SAMPLES:
        raise ParameterError(
            f"The 'intrinsic_dimension' analysis estimates dimension from each sample's nearest neighbours, and dataset "
            f"'{ctx.dataset.name}' has {ctx.dataset.n_samples} samples; use a dataset of at least {ID_MIN_SAMPLES} samples."
        )


def _sequential_requires(ctx: Context, _params: dict[str, Any]) -> None:
    from workbench.analyses.degeneracy import _network_check

    for m in ctx.models():
        _network_check(m.module, f"Degeneracy of '{m.name}'")


def _probing(ctx: Context, probe: str = "linear", cv: int = 5, control: bool = True, c: float = 1.0, seed: int = 0) -> Any:
    from workbench.analyses.probing import probe_layers

    return [probe_layers(ctx.activations(w), ctx.dataset.y, probe=probe, cv=cv, control=control, c=c, seed=seed,
                         device=ctx.device, progress=ctx.progress) for w in ("a", "b")[: len(ctx.models())]]


def _probing_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.probing import probe_profile

    return [probe_profile(*results)]


def _probing_summary(results: Any) -> dict[str, Any]:
    from workbench.plots.probing import probe_rows

    labels = _model_labels([r.model_name or f"model {i}" for i, r in enumerate(results)])
    return {m: {row["layer"]: {k: v for k, v in row.items() if k not in ("model", "layer", "features")} for row in probe_rows(r, m)}
            for m, r in zip(labels, results)}


def _embedding(ctx: Context, method: str = "umap", layer: str | None = None, seed: int = 0) -> Any:
    from workbench.analyses.embedding import aligned_embedding

    acts_a = ctx.activations("a")
    layer_a = layer or acts_a.layers[-1]
    if layer_a not in acts_a.layers and layer_a in list_layers(ctx.model_a):
        raise UnknownLayerError(f"Layer '{layer_a}' of model A ('{ctx.model_a.name}') is not among the extracted layers "
                                f"({', '.join(acts_a.layers)}); add it to the layers to extract (--layers, or layers=).")
    names = _model_labels([m.name for m in ctx.models()])
    views = {f"{names[0]} · {layer_a}": acts_a[layer_a]}
    if ctx.model_b is not None:
        acts_b = ctx.activations("b")
        if layer is not None and layer not in acts_b:
            raise UnknownLayerError(
                f"Model B ('{ctx.model_b.name}') has no layer '{layer}' among its extracted layers "
                f"({', '.join(acts_b.layers)}); name a layer both models have, or leave the layer unset to embed "
                "each model's last layer.")
        layer_b = layer if layer is not None else acts_b.layers[-1]
        views[f"{names[1]} · {layer_b}"] = acts_b[layer_b]
    return aligned_embedding(views, method=method, seed=seed, device=ctx.device, progress=ctx.progress)


def _embedding_plot(result: Any, dataset: Dataset | None = None) -> list[go.Figure]:
    """Each view coloured by the dataset's labels (class names where it has them), as the Embedding page colours it."""
    from workbench.plots.embedding import embedding_scatter

    labels = dataset.named_labels() if dataset is not None else None
    kind = "class" if dataset is not None and dataset.n_classes is not None else "target"
    return [embedding_scatter(result, view=v, color=labels, color_name=kind, labels=labels) for v in range(len(result.names))]


def _embedding_summary(result: Any) -> dict[str, Any]:
    return {"trustworthiness": dict(zip(result.names, np.asarray(result.trustworthiness).tolist())),
            "disparity": dict(zip(result.names, np.asarray(result.disparity).tolist()))}


def _intrinsic_dimension(ctx: Context, method: str = "twonn", seed: int = 0) -> Any:
    from workbench.analyses.embedding import layer_intrinsic_dimension

    return [layer_intrinsic_dimension(ctx.activations(w), method=method, seed=seed, device=ctx.device,
                                      progress=ctx.progress) for w in ("a", "b")[: len(ctx.models())]]


def _intrinsic_dimension_plot(results: Any) -> list[go.Figure]:
    from workbench.plots.embedding import intrinsic_dimension_profile

    return [intrinsic_dimension_profile(*results)]


def _intrinsic_dimension_summary(results: Any) -> dict[str, Any]:
    """Model -> layer -> numbers, each model's layers in its own order: a row per model and layer, so that two
    architectures with layers of the same name keep them apart."""
    labels = _model_labels([r.model_name or f"model {i}" for i, r in enumerate(results)])
    return {m: {layer: {"dimension": float(r.dimension[j]), "95% interval low": float(r.ci_low[j]),
                        "95% interval high": float(r.ci_high[j]), "width": int(r.n_features[j])}
                for j, layer in enumerate(r.layers)} for m, r in zip(labels, results)}


def _separability_table(results: Any) -> dict[str, Any]:
    from workbench.plots.topology import REFERENCE_NAMES  # as the page's table names them

    labels = _model_labels([r.model_name or f"model {i}" for i, r in enumerate(results)])
    table: dict[str, Any] = {
        m: {layer: {"score S (lower = more separable)": float(r.scores[j]),
                    **{REFERENCE_NAMES.get(k, k): float(v[j]) for k, v in r.references.items()}}
            for j, layer in enumerate(r.layers)} for m, r in zip(labels, results)}
    for m, r in zip(labels, results):
        for layer in getattr(r, "skipped", ()):
            table[m][layer] = {"score S (lower = more separable)": "n/a: constant over samples"}
    return table


def _mode_connectivity_table(result: Any) -> dict[str, Any]:
    from workbench.plots.mode_connectivity import BARRIER_COLUMNS as COLUMNS  # as the page's table names them
    from workbench.plots.mode_connectivity import method_label

    return {method_label(method): {split: {COLUMNS["linear"]: b.linear[split], COLUMNS["mean"]: b.mean[split],
                                           COLUMNS["accuracy_drop"]: b.accuracy_drop[split]} for split in b.linear}
            for method, b in result.barriers.items()}


def _merge_summary(result: Any) -> dict[str, Any]:
    return {"merged accuracy": result.merged_accuracy, "naive average accuracy": result.naive_accuracy,
            "member accuracy": dict(zip(result.names, np.asarray(result.member_accuracy).tolist())),
            "merged loss": result.merged_loss, "naive average loss": result.naive_loss}


def _stitching_summary(result: Any) -> dict[str, Any]:
    rel = np.asarray(result.relative_accuracy)
    out: dict[str, Any] = {"B on the head of A (relative)": float(rel[1, 0]), "A on the head of B (relative)": float(rel[0, 1]),
                           "chance": result.chance_accuracy, "heads trained on (samples)": result.n_train}
    if result.absolute_accuracy is not None:
        absolute = np.asarray(result.absolute_accuracy)
        out["B on the head of A (absolute)"] = float(absolute[1, 0])
        out["A on the head of B (absolute)"] = float(absolute[0, 1])
    if result.own_accuracy is not None:
        out["own heads (A, B)"] = np.asarray(result.own_accuracy).tolist()
    return out


def _llc_summary(results: Any) -> dict[str, Any]:
    return {m: {"LLC": r.llc, "spread over chains": r.llc_std,
                "drift after burn-in (share of the excess loss)": r.drift, "settled": r.settled}
            for m, r in zip(_model_labels([r.model for r in results]), results)}


def _by_type() -> dict[str, tuple[str, Callable[[Any], dict[str, Any]], bool]]:
    """Result type name -> (label, summary function, whether it takes a list of results)."""
    return {
        "ActivationStatsResult": ("activation statistics", _activation_stats_summary, True),
        "SimilarityMatrixResult": ("similarity", _similarity_summary, False),
        "RelativeLayerAgreementResult": ("relative agreement", _relative_summary, False),
        "RelativeComparisonResult": ("relative agreement", _relative_pair_summary, False),
        "StitchingResult": ("stitching accuracy", _stitching_summary, False),
        "ModeConnectivityResult": ("barriers", _mode_connectivity_table, False),
        "MergeResult": ("merge", _merge_summary, False),
        "DegeneracyResult": ("free parameters", _degeneracy_summary, True),
        "InteractionBasisResult": ("interaction basis", _interaction_basis_summary, True),
        "LLCResult": ("local learning coefficient", _llc_summary, True),
        "DiagramDistanceMatrixResult": ("diagram distances", _topology_summary, False),
        "LayerSeparabilityResult": ("separability", _separability_table, True),
        "ProbingResult": ("probe score", _probing_summary, True),
        "AlignedEmbeddingResult": ("embedding quality", _embedding_summary, False),
        "LayerIntrinsicDimensionResult": ("intrinsic dimension", _intrinsic_dimension_summary, True),
    }


def summarize(result: Any) -> dict[str, Any]:
    """The headline numbers of a result, or of a list of results of several kinds (one entry per kind, in
    order of first appearance), for a report section; kinds without a summary are left out."""
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    table = _by_type()
    groups: dict[str, list[Any]] = {}
    for r in results:
        if type(r).__name__ in table:
            groups.setdefault(type(r).__name__, []).append(r)
    out: dict[str, Any] = {}
    for kind, items in groups.items():
        label, fn, takes_list = table[kind]
        if takes_list:
            out[label] = fn(items)
        else:
            for i, item in enumerate(items):
                out[label if len(items) == 1 else f"{label} {i + 1}"] = fn(item)
    return out


MIN_SAMPLES = 3  # the fewest samples any analysis but the activation statistics is defined on (CKA's centring)

ANALYSES: list[Analysis] = [
    Analysis("activations", "Activation statistics", "one_model", _activation_stats, _activation_stats_plot,
             _activation_stats_summary, {"bins": 50}, "shape, mean/std, dead units and value histograms per layer",
             "pages/activations.py"),
    Analysis("similarity", "Representational similarity (layer x layer)", "two_models", _similarity, _similarity_plot,
             _similarity_summary,
             {"measure": "linear_cka", "debiased": False, "sigma": 0.8, "angular": False, "kind": "svcca",
              "variance": 0.99, "rdm": "correlation", "compare": "spearman", "chance": True},
             "CKA (linear, RBF, debiased), Procrustes, CCA, RSA between every pair of layers", "pages/compare.py"),
    Analysis("relative", "Relative representations: cross-model agreement", "two_models", _relative, _relative_plot,
             _relative_summary, {"n_anchors": 64, "method": "random", "k": 10, "seed": 0},
             "Jaccard@k and MRR of relative vs absolute representations per layer", "pages/relative.py"),
    Analysis("probing", "Probes per layer (linear or MLP), with a control task", "one_model", _probing, _probing_plot,
             _probing_summary, {"probe": "linear", "cv": 5, "control": True, "c": 1.0, "seed": 0},
             "cross-validated probe accuracy, macro-F1, control accuracy and selectivity per layer (Hewitt & Liang)",
             "pages/probing.py", _probing_requires, _probing_title),
    Analysis("embedding", "Embedding of one layer per model in a shared frame", "one_model", _embedding,
             _embedding_plot, _embedding_summary, {"method": "umap", "layer": None, "seed": 0},
             "UMAP / t-SNE / PCA of one layer per model, aligned by orthogonal Procrustes, with trustworthiness",
             "pages/embedding.py", _embedding_requires),
    Analysis("intrinsic_dimension", "Intrinsic dimension per layer", "one_model", _intrinsic_dimension,
             _intrinsic_dimension_plot, _intrinsic_dimension_summary, {"method": "twonn", "seed": 0},
             "TwoNN (Facco et al.) or Levina-Bickel MLE per layer, with a bootstrap interval", "pages/embedding.py",
             _intrinsic_dimension_requires),
    Analysis("mode_connectivity", "Linear mode connectivity (permutation alignment)", "weights", _mode_connectivity,
             _mode_connectivity_plot, _mode_connectivity_summary, {"n_points": 25, "top_k": 5, "seed": 0},
             "loss and accuracy along (1-λ)θA + λθB, naive vs weight/activation matching and REPAIR; per-layer alignment",
             "pages/mode_connectivity.py", _mode_connectivity_requires, notes_for=_mode_connectivity_notes),
    Analysis("degeneracy", "Degeneracy: free parameters per weight matrix", "one_model", _degeneracy, _degeneracy_plot,
             _degeneracy_summary, {"output": "logits"},
             "input-activation rank, Jacobian rank, dead/always-on/synchronised ReLUs -> free parameters (Bushnaq et al.)",
             "pages/degeneracy.py", _sequential_requires),
    Analysis("interaction_basis", "Interaction basis and modularity", "one_model", _interaction_basis,
             _interaction_basis_plot, _interaction_basis_summary, {"graph_directions": 64, "seed": 0},
             "basis size per layer, interaction spectra and Louvain modularity of the interaction graph",
             "pages/degeneracy.py", _sequential_requires),
    Analysis("topology", "Persistent homology: diagram distances between layers", "one_model", _topology,
             _topology_plot, _topology_summary, {"metric": "bottleneck", "dim": 1, "max_points": 1000, "normalize": True, "seed": 0},
             "Vietoris-Rips persistence per layer (exact H0 by MST) and bottleneck/Wasserstein distances between one model's "
             "layers, or between A's and B's",
             "pages/topology.py"),
    Analysis("separability", "Topological class separability across layers", "one_model", _separability,
             _separability_plot, _separability_table, {"normalize": True, "probe": True, "cv": 5, "seed": 0},
             "label-free H0 persistence score (lower = more separable) next to Fisher, Thornton, probe and CH",
             "pages/topology.py", _separability_requires),
]


def get_analysis(name: str) -> Analysis:
    """The registry entry called ``name``."""
    for entry in ANALYSES:
        if entry.name == name:
            return entry
    names = [a.name for a in ANALYSES]
    raise ParameterError(f"Unknown analysis '{name}'.{did_you_mean(name, names)} Analyses: {format_choices(names)}.")


def model_expression(m: LoadedModel | None) -> str:
    """Python that loads ``m`` again (a comment with its hash when it came from an upload)."""
    if m is None:
        return "None"
    arch = f", architecture={m.architecture!r}" if m.source_format == "state dict" and m.architecture else ""  # a Python literal
    if m.source and not m.source.startswith("upload:"):
        path = Path(m.source).resolve()
        if path.parent == SAMPLE_MODELS.resolve():  # bundled: found wherever workbench is checked out
            return f"load_model(SAMPLE_MODELS / {path.name!r}{arch})"
        return f"load_model({str(path)!r}{arch})"  # absolute, so the code runs from any folder (a notebook's)
    name = m.source.removeprefix("upload:") or m.name
    return f"load_model({name!r}{arch})  # the uploaded file, weights sha256 {m.sha256[:16]}"


def dataset_expression(d: Dataset) -> str:
    """Python that loads ``d`` again (a comment with its hash when it came from an upload)."""
    info = d.info
    if d.name.startswith("blobs") and "separation" in info:
        options = ", ".join(f"{k}={info[k]!r}" for k in ("separation", "n_samples", "n_features", "n_classes", "seed") if k in info)
        return f"load_dataset('blobs', {options})"
    if "split" in info:
        return f"load_dataset({d.name.split(' ')[0]!r}, split={info['split']!r})"
    if info.get("path"):  # absolute, so the code runs from any folder
        return f"load_dataset({info['path']!r})  # sha256 {d.sha256[:16]}"
    if info.get("file"):
        return f"load_dataset({info['file']!r})  # the uploaded file, sha256 {d.sha256[:16]}"
    return f"load_dataset(...)  # {d.name}, sha256 {d.sha256[:16]}"


def recreate_snippet(entry: Analysis, ctx: Context, params: dict[str, Any]) -> str:
    """Python that reruns ``entry`` on the same models, dataset, layers and parameters."""
    models = f"model_a = {model_expression(ctx.model_a)}\nmodel_b = {model_expression(ctx.model_b)}\n"
    return (
        "from workbench import load_dataset, load_model\n"
        + ("from workbench.models import SAMPLE_MODELS\n" if "SAMPLE_MODELS" in models else "")
        + "from workbench.registry import run_analysis\n\n"
        + models
        + f"dataset = {dataset_expression(ctx.dataset)}\n"
        f"section = run_analysis(\n    {entry.name!r},\n    model_a=model_a,\n    model_b=model_b,\n    dataset=dataset,\n"
        f"    layers={ctx.layers_a!r},{f' layers_b={ctx.layers_b!r},' if ctx.layers_b else ''} pooling={ctx.pooling!r},\n"
        f"    params={params!r},\n)\n"
    )


def _choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """The values a parameter of an entry may take, where it names one of a few options."""
    from workbench.analyses import degeneracy, embedding, probing, relative, similarity, topology

    return {("similarity", "measure"): similarity.MEASURES, ("similarity", "kind"): similarity.CCA_KINDS,
            ("similarity", "rdm"): similarity.RDM_KINDS, ("similarity", "compare"): similarity.RDM_COMPARISONS,
            ("relative", "method"): relative.ANCHOR_METHODS, ("probing", "probe"): probing.PROBES,
            ("embedding", "method"): embedding.METHODS, ("intrinsic_dimension", "method"): embedding.ID_METHODS,
            ("degeneracy", "output"): degeneracy.OUTPUTS, ("topology", "metric"): topology.DIAGRAM_METRICS}


def check_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of analysis ``name`` with ``params`` applied, checked before any work: each name is the
    entry's, a value that picks an option is one of them, and the others have the type of the default (a whole
    number, a number, true/false, a layer name). Ranges are checked by the analysis itself."""
    entry = get_analysis(name)
    if params is not None and not isinstance(params, Mapping):
        raise ParameterError(f"The 'params' of the '{name}' analysis must be a dict of parameter name -> value; got {type(params).__name__}.")
    merged = {**entry.params, **(params or {})}
    unknown = sorted(set(merged) - set(entry.params))
    if unknown:
        raise ParameterError(f"Unknown parameter(s) {unknown} for the '{name}' analysis; it takes {sorted(entry.params)}.")
    choices = _choices()
    for key, value in (params or {}).items():
        default, allowed = entry.params[key], choices.get((name, key))
        if allowed is not None:
            wanted, ok = f"one of {format_choices(list(allowed))}", isinstance(value, str) and value in allowed
        elif isinstance(default, bool):
            wanted, ok = "true or false", isinstance(value, bool)
        elif isinstance(default, int):
            wanted, ok = "a whole number", isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            wanted, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        elif default is None:
            wanted, ok = "a layer name or null", value is None or isinstance(value, str)
        else:
            continue
        if not ok:
            raise ParameterError(f"The '{key}' parameter of the '{name}' analysis must be {wanted}. Got {value!r}.")
    return merged


def check_analysis(name: str, *, model_a: LoadedModel, dataset: Dataset, model_b: LoadedModel | None = None,
                   params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Raise the error :func:`run_analysis` would raise, before any work, when the models or the dataset do not
    suit analysis ``name`` (a second model missing, fewer than 3 samples, labels missing, of one class or continuous where
    classes are compared, a model that is not one sequence of layers or cannot run on the data, architectures that differ
    where weights are matched) or a parameter is unknown or of the wrong kind
    (:func:`check_params`); return the parameters with ``params`` applied."""
    entry = get_analysis(name)
    merged = check_params(name, params)
    if entry.inputs in ("two_models", "weights") and model_b is None:
        raise ParameterError(f"The '{name}' analysis compares two models; pass model_b (or --model-b).")
    if name != "activations" and dataset.n_samples < MIN_SAMPLES:
        raise ParameterError(f"The '{name}' analysis compares samples, and dataset '{dataset.name}' has "
                             f"{dataset.n_samples}; use a dataset of at least {MIN_SAMPLES} samples.")
    if entry.requires is not None:
        entry.requires(Context(model_a=model_a, model_b=model_b, dataset=dataset), merged)
    return merged


def run_analysis(name: str, *, model_a: LoadedModel, dataset: Dataset, model_b: LoadedModel | None = None,
                 layers: list[str] | None = None, layers_b: list[str] | None = None, pooling: str = "mean",
                 params: dict[str, Any] | None = None, device: str | None = None, progress: Progress | None = None):
    """Run one registered analysis and return a report :class:`~workbench.report.Section` (title, result,
    figures, summary, and the snippet that recreates it).

    ``name``: an entry of :data:`ANALYSES` (``workbench analyze --help`` lists them with their
    parameters). ``model_a``, ``model_b``: loaded models (``model_b`` is required by the two-model
    and weight-space analyses and optional for the others, which then run on both). ``dataset``: the
    samples every model sees. ``layers``, ``layers_b``: the layers to extract from each model
    (default: :func:`default_layers`, the leaf modules that compute, at most 12). ``pooling``: how
    conv maps and token sequences are reduced (see :func:`~workbench.extract`). ``params``: the
    entry's parameters to change (the others keep their defaults). ``device``: where to compute
    (``None``: cuda > mps > cpu). ``progress``: callable ``(done, total)``.
    """
    from workbench.report import Section

    entry = get_analysis(name)
    merged = check_analysis(name, model_a=model_a, model_b=model_b, dataset=dataset, params=params)
    ctx = Context(model_a=model_a, model_b=model_b, dataset=dataset, layers_a=layers, layers_b=layers_b,
                  pooling=pooling, device=device, progress=progress)
    result = entry.compute(ctx, **merged)
    # a plot that colours by the samples' labels takes the dataset too
    figures = entry.plot(result, dataset=ctx.dataset) if "dataset" in inspect.signature(entry.plot).parameters else entry.plot(result)
    if ctx.compared is not None:  # the pairs compared, named apart: the snippet pairs them by position
        ctx.layers_a, ctx.layers_b = ctx.compared
    else:
        if "a" in ctx._acts:  # the layers the defaults gave, so that the snippet asks each model for its own
            ctx.layers_a = ctx._acts["a"].layers
        if "b" in ctx._acts and ctx._acts["b"].layers != ctx.layers_a:
            ctx.layers_b = ctx._acts["b"].layers
    # how the activations it read were extracted (nothing for analyses of weights or gradients alone)
    extraction = {"pooling": ctx.pooling, "layers": {k.upper(): acts.layers for k, acts in sorted(ctx._acts.items())}} if ctx._acts else {}
    title = entry.title_for(merged) if entry.title_for is not None else entry.title
    notes = entry.notes_for(result, ctx) if entry.notes_for is not None else ""
    return Section(title, result, figures, snippet=recreate_snippet(entry, ctx, merged), summary=entry.summary(result),
                   models=ctx.models(), dataset=dataset, train_dataset=ctx.train_dataset, extraction=extraction, notes=notes)


# ---------------------------------------------------------------------------------------------
# pairwise measures and their declared properties


@dataclass(frozen=True)
class Measure:
    """A function of two representations of the same samples, ``fn(x, y, device=None) -> float``.

    ``higher_is_closer``: similarity (1 for identical inputs) or distance (0 for identical inputs).
    ``invariant_to``: transforms of one input that leave the value unchanged: ``rotation``
    (orthogonal map of the features), ``permutation`` (of the features), ``scale`` (isotropic),
    ``translation`` (adding a constant vector), ``linear`` (any invertible linear map).
    ``noise_bound``: independent Gaussian features (n=600, d=5) score below this (similarities) or
    above it (distances); None where that negative control does not apply (two independent Gaussian
    clouds have alike topology, so a diagram distance between them is small by design).
    """

    name: str
    fn: Callable[..., float]
    higher_is_closer: bool
    symmetric: bool
    invariant_to: frozenset[str]
    noise_bound: float | None
    min_samples: int = 3  # two centred samples span one direction: any two layers would look the same
    stochastic: bool = False
    identity_tolerance: float = 1e-6


def _measures() -> list[Measure]:
    from functools import partial

    from workbench.analyses import similarity as s

    rigid = frozenset({"rotation", "permutation", "scale", "translation"})
    return [
        Measure("linear_cka", s.linear_cka, True, True, rigid, 0.1),
        Measure("linear_cka_debiased", partial(s.linear_cka, debiased=True), True, True, rigid, 0.05, min_samples=4),
        Measure("rbf_cka", s.rbf_cka, True, True, rigid, 0.1),
        Measure("rbf_cka_debiased", partial(s.rbf_cka, debiased=True), True, True, rigid, 0.05, min_samples=4),
        Measure("procrustes_distance", s.procrustes_distance, False, True, rigid, 0.9, identity_tolerance=1e-6),
        Measure("procrustes_angular", partial(s.procrustes_distance, angular=True), False, True, rigid, 0.9),
        Measure("svcca", partial(s.cca_similarity, kind="svcca"), True, True,
                frozenset({"rotation", "permutation", "scale", "translation"}), 0.2, min_samples=3),
        Measure("mean_cca", partial(s.cca_similarity, kind="mean"), True, True,
                frozenset({"rotation", "permutation", "scale", "translation", "linear"}), 0.2, min_samples=3),
        Measure("pwcca", partial(s.cca_similarity, kind="pwcca"), True, False,
                frozenset({"permutation", "scale", "translation"}), 0.2, min_samples=3),
        Measure("rsa_correlation_spearman", s.rsa, True, True, frozenset({"permutation", "scale"}), 0.1, min_samples=3),
        Measure("rsa_euclidean_pearson", partial(s.rsa, rdm="euclidean", compare="pearson"), True, True, rigid, 0.1,
                min_samples=3),
        Measure("topological_rsa", topological_rsa_similarity, True, True, rigid, 0.1, min_samples=3),
        Measure("persistence_distance", persistence_bottleneck, False, True,
                frozenset({"rotation", "permutation", "translation"}), None, min_samples=1),
    ]


def topological_rsa_similarity(x: Any, y: Any, *, device: Any = None) -> float:
    """:func:`workbench.analyses.topology.topological_rsa` as a number."""
    from workbench.analyses.topology import topological_rsa

    return topological_rsa(x, y, device=device).similarity


def persistence_bottleneck(x: Any, y: Any, *, device: Any = None) -> float:
    """Bottleneck distance between the H1 diagrams of two representations."""
    from workbench.analyses.topology import persistence_distance

    return persistence_distance(x, y, device=device).distance


MEASURES: list[Measure] = _measures()
