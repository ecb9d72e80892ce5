"""Topology: persistence diagrams, Betti curves, diagram distances and topological class separability."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.analyses import topology as tp
from workbench.plots import topology as plots
from workbench.registry import summarize

_state.in_app_shell()

HELP = {
    "dim": "H0 counts connected components (exact for any number of samples); H1 counts loops (seconds for "
    "1000-2000 samples).",
    "max_points": "Above this many samples, H1 is computed on a farthest-point subsample of this size (H0 always uses "
    "every sample). 500-2000 is a sensible range.",
    "metric": "'euclidean': distances between activation vectors. 'cosine': distances between L2-normalised vectors, "
    "which ignores each sample's scale.",
    "distance": "Bottleneck: the largest shift of the best matching between two diagrams. Wasserstein (order 1): the "
    "summed shifts, sensitive to many small differences.",
    "normalize": "Divide each diagram by its largest finite death before comparing, so layers of different overall "
    "scale are compared by shape only.",
    "probe": "Cross-validated logistic-regression accuracy and ROC-AUC per layer (the slowest reference: about a second "
    "per 512-wide layer).",
}


@st.cache_resource(show_spinner=False, max_entries=32)
def _stored_distances(key: tuple, _a: dict, _b: dict | None, metric: str, dim: int, normalize: bool) -> tp.DiagramDistanceMatrixResult:
    return tp.diagram_distance_matrix(_a, _b, metric=metric, dim=dim, normalize=normalize)


def layer_distances(pers: list[dict], sources: list, settings: dict, **params: object) -> tp.DiagramDistanceMatrixResult:
    """Diagram distances between the layers of the diagrams ``pers`` (one dict per model), computed once per content
    of the activations they came from (``sources``), their persistence ``settings`` and ``params``, and recorded for
    the report's recreate snippet like the other library calls."""
    args = (pers[0], pers[-1] if len(pers) > 1 else None)
    key = (_state.content_key(sources), _state.content_key(settings), _state.content_key(params))
    matrix = _stored_distances(key, *args, **params)
    _state.record_call(tp.diagram_distance_matrix, args, params, matrix, "result")
    return matrix


st.title("Topology")
st.caption(
    "Persistent homology of each layer's point cloud (one point per sample): when connected components merge (H0) and "
    "loops appear and fill (H1) as the distance scale grows. The H0 persistence score S (arXiv 2305.15016) estimates "
    "class separability without labels: lower S means a few long bars and many short ones, i.e. clustered classes."
)
models = _state.current_models()
if not models:
    _state.require_models(1)
dataset = _state.require_dataset()
names = [f"{slot.upper()} ({m.name})" for slot, m in zip(_state.slots(models), models)]

with st.expander("Settings", expanded=False):
    c1, c2, c3 = st.columns(3)
    dim = c1.radio(
        "Homology dimension",
        [0, 1],
        index=1,
        format_func=lambda d: f"H{d}",
        key="topo_dim", persist_state="session",
        horizontal=True,
        help=HELP["dim"],
    )
    max_points = int(
        c2.number_input("Max points for H1", 100, 5000, 1000, 100, key="topo_max_points", persist_state="session", help=HELP["max_points"],
                        disabled=dim == 0)  # H0 always uses every sample
    )
    metric = c3.selectbox("Point metric", ["euclidean", "cosine"], key="topo_metric", persist_state="session", help=HELP["metric"])
    c4, c5, c6 = st.columns(3)
    distance = c4.selectbox("Diagram distance", tp.DIAGRAM_METRICS, key="topo_distance", persist_state="session", help=HELP["distance"])
    normalize = c5.checkbox("Scale-normalised distances", value=True, key="topo_normalize", persist_state="session", help=HELP["normalize"])
    probe = c6.checkbox("Linear-probe references", value=True, key="topo_probe", persist_state="session", help=HELP["probe"])
    pooling = _state.pooling_picker("topo_pooling")

chosen = _state.layer_pickers(models, "topo_layers")

kw = {"max_dim": dim, "max_points": max_points, "metric": metric}
labels = dataset.y if dataset.n_classes is not None else None
pers, seps, sources = [], [], []
with _state.guard():
    for model, slot in zip(models, _state.slots(models)):
        acts = _state.cached_activations(model, dataset, chosen[slot], pooling)
        sources.append(acts)
        with _state.progress_bar(f"Separability of {model.name}") as bar:
            seps.append(_state.cached_call(tp.layer_separability, acts, labels=labels, probe=probe, progress=bar))
        with _state.progress_bar(f"Persistence of {model.name}") as bar:
            layers = seps[-1].layers  # without the layers constant over samples
            per_layer = {}
            for i, layer in enumerate(layers):
                per_layer[layer] = _state.cached_call(tp.persistence, acts[layer], **kw)
                bar(i + 1, len(layers))
        pers.append(per_layer)

for model, sep in zip(models, seps):
    for layer in sep.skipped:
        st.caption(_state.plain(f"Layer {layer} of model {model.name} is constant over samples: no topology to "
                                "compute."))

subsampled = {r.n_points_used for p in pers for r in p.values() if r.subsampled}
if subsampled:
    st.info(
        f"H1 was computed on {', '.join(map(str, sorted(subsampled)))} of {dataset.n_samples} samples chosen by "
        "farthest-point sampling; H0 and the separability score use every sample."
    )

st.subheader("Persistence diagrams")
picked = []
for col, p, model, slot in zip(st.columns(len(models)), pers, models, _state.slots(models)):
    picked.append(_state.kept_choice(col.selectbox, f"Layer of {model.name}", list(p), index=len(p) - 1, key=f"topo_layer_{slot}"))
results = [p[layer] for p, layer in zip(pers, picked)]
titles = [f"{n} · {layer}" for n, layer in zip(names, picked)]
figures = [plots.persistence_diagram(*results, titles=titles)]
st.plotly_chart(figures[-1], width="stretch", key="topo_diagrams")
figures.append(plots.barcode(*results, dim=dim, titles=titles))
st.plotly_chart(figures[-1], width="stretch", key="topo_barcodes")
longest = {title: plots.longest_finite_bar(r, dim) for title, r in zip(titles, results)}
for col, life, n in zip(st.columns(len(results)), longest.values(), names):
    col.metric(f"Longest finite H{dim} bar ({n})", f"{life:.3g}" if life is not None else "none",
               help="Lifetime (death - birth) of the most persistent feature that dies"
               + (" (the one H0 bar of the whole cloud never dies and is left out)." if dim == 0 else "."))

st.subheader("Betti curves across layers")
figures.append(plots.betti_curves(*pers, names=names, dim=dim))
st.plotly_chart(figures[-1], width="stretch", key="topo_betti")
if figures[-1].layout.xaxis.type == "log":
    st.caption("The filtration axis is logarithmic: one point (or a few) joins the rest at many times the distance at "
               "which the others merge, so on a linear axis their fall would crowd against 0.")

st.subheader("Diagram distance between layers")
with _state.guard():
    matrix = layer_distances(pers, sources, kw, metric=distance, dim=dim, normalize=normalize)
figures.append(plots.diagram_distance_heatmap(matrix, name_a=names[0], name_b=names[-1]))
if len(matrix.empty) == len(set(matrix.layers_a) | set(matrix.layers_b)):  # all zeros: say why before the picture
    st.warning(tp.empty_diagrams_note(matrix))
st.plotly_chart(figures[-1], width="stretch", key="topo_distance_matrix")
if distance == "bottleneck":
    st.caption(
        "The bottleneck distance is set by the single worst-matched feature: when one diagram has a long bar that the "
        "other cannot match, the distance is half that bar's lifetime, so a whole row or column can repeat one value. "
        "Wasserstein sums every shift and separates such layers."
    )

st.subheader("Class separability across layers")
if labels is None:
    st.info(f"{_state.plain(dataset.name)} has no class labels: only the unsupervised score S is shown.")
figures.append(plots.separability_curves(*seps, names=names))
st.plotly_chart(figures[-1], width="stretch", key="topo_separability")
meaning = {"thornton_index": "share of samples whose nearest neighbour has their class",
           "probe_accuracy": "5-fold cross-validated logistic regression on the L2-normalised samples S uses",
           "probe_roc_auc": "ROC-AUC of that cross-validated probe",
           "fisher_ratio": "largest per-feature Fisher discriminant ratio",
           "calinski_harabasz": "between- to within-class dispersion, scaled by the counts"}
short = {"thornton_index": "Thornton", "probe_accuracy": "probe acc.", "probe_roc_auc": "probe AUC", "fisher_ratio": "Fisher",
         "calinski_harabasz": "Calinski–H."}  # eight columns fit at 1280 px; each header's tooltip names it in full
st.dataframe(
    plots.separability_rows(*seps, names=names), hide_index=True, width="stretch", key="topo_separability_table",
    column_config={"score S": st.column_config.NumberColumn(format="%.4f", help="H0 persistence score: lower = more separable"),
                   **{plots.REFERENCE_NAMES[k]: st.column_config.NumberColumn(
                       short[k], format="%.4f" if k in plots.BOUNDED else "%.4g",
                       help=f"{plots.REFERENCE_NAMES[k]}: {meaning[k]}") for k in meaning}},
)
references = [f"Thornton = {meaning['thornton_index']}"]
if probe:
    references.append(f"probe = {meaning['probe_accuracy']}")
references += [f"Fisher = {meaning['fisher_ratio']}", f"Calinski–Harabasz = {meaning['calinski_harabasz']}"]
st.caption(
    f"n = {dataset.n_samples} samples of {dataset.name}. S: lower = more separable."
    + (f" References (higher = more separable): {'; '.join(references)}." if labels is not None else "")
)
summary = {f"longest finite H{dim} bar": {k: v if v is not None else "none" for k, v in longest.items()},
           **summarize([matrix, *seps])}
_state.report_button(f"Topology (H{dim})", [*results, matrix, *seps], figures, key="topo_report", pooling=pooling,
                     summary=summary)
