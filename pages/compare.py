"""Similarity (A vs B): a layer x layer heatmap of one measure; click a cell for a detail panel."""

from __future__ import annotations

import numpy as np
import streamlit as st

from pages import _state
from workbench.analyses.relative import relative_comparison
from workbench.analyses.similarity import (
    CCA_KINDS,
    MEASURES,
    RDM_COMPARISONS,
    RDM_KINDS,
    UndefinedPairError,
    chance_level,
    similarity_matrix,
)
from workbench.errors import WorkbenchError
from workbench.plots.similarity import (
    class_agreement_bars,
    measure_label,
    relative_scatter,
    result_label,
    similarity_heatmap,
)
from workbench.registry import get_analysis, summarize

_state.in_app_shell()

HELP = {
    "measure": "Linear CKA: centred kernel alignment of linear kernels (invariant to rotations and isotropic scaling). "
    "RBF CKA: the same with Gaussian kernels (local structure). Procrustes: distance after the best rotation "
    "(lower is closer). CCA: canonical correlations (SVCCA / PWCCA / mean). RSA: correlation of the two "
    "representational dissimilarity matrices.",
    "debiased": "Song et al.'s unbiased HSIC: near 0 for unrelated layers even when layers are wider than n.",
    "sigma": "Bandwidth as a fraction of the median distance: small values compare local neighbourhoods, large "
    "values approach linear CKA.",
    "angular": "A metric in [0, pi/2] instead of a distance in [0, sqrt 2].",
    "kind": "SVCCA keeps the directions explaining 99% of the variance; PWCCA weights correlations by how much of the "
    "neurons they explain; mean: all canonical correlations.",
    "rdm": "1 - correlation between two samples' activations, or their Euclidean distance.",
    "compare": "Spearman: only the order of the dissimilarities matters.",
    "anchors": "Samples whose cosine similarities define the relative coordinates.",
    "chance": "The same comparison with model B's samples in a random order, so that sample i of A meets another "
    "sample of B: what unrelated representations of these widths score on this many samples (a negative control).",
    "jaccard": "Overlap of the neighbours retrieved in B by a sample of A and by its own copy in B.",
    "mrr": "Mean reciprocal rank of the matching sample of B when queried with a sample of A.",
}

st.title("Similarity (A vs B)")
(model_a,) = _state.require_models(1)
chosen_b = st.session_state.get(_state.MODEL_B)
model_b = chosen_b or model_a
dataset = _state.require_dataset()
if chosen_b is None:
    st.caption("No model B is chosen: model A is compared with itself.")
elif chosen_b is model_a:
    st.caption(_state.plain(f"Model B is the same checkpoint as model A ({model_a.name}, the same weights): "
                            "it is compared with itself."))

pooling = _state.pooling_picker("cmp_pooling")
col_a, col_b = st.columns(2)
with col_a:
    layers_a = _state.layer_picker(model_a, key="cmp_layers_a", label=f"Layers of A ({model_a.name})")
with col_b:
    layers_b = _state.layer_picker(model_b, key="cmp_layers_b", label=f"Layers of B ({model_b.name})")
if not layers_a or not layers_b:
    st.info("Pick at least one layer of each model.")
    _state.stop()

col_m, col_o = st.columns(2)
measure = col_m.selectbox("Measure", MEASURES, format_func=measure_label, key="cmp_measure", persist_state="session", help=HELP["measure"])
options: dict = {}
with col_o:
    if measure in ("linear_cka", "rbf_cka"):
        options["debiased"] = st.checkbox("Debiased (unbiased HSIC)", key="cmp_debiased", persist_state="session", help=HELP["debiased"])
    if measure == "rbf_cka":
        options["sigma"] = st.slider("Bandwidth sigma", 0.1, 4.0, 0.8, 0.1, key="cmp_sigma", persist_state="session", help=HELP["sigma"])
    if measure == "procrustes_distance":
        options["angular"] = st.checkbox(
            "Angular (arccos of the nuclear norm)", key="cmp_angular", persist_state="session", help=HELP["angular"]
        )
    if measure == "cca_similarity":
        options["kind"] = st.selectbox("CCA summary", CCA_KINDS, key="cmp_cca_kind", persist_state="session", help=HELP["kind"])
    if measure == "rsa":
        options["rdm"] = st.selectbox("Dissimilarity", RDM_KINDS, key="cmp_rdm", persist_state="session", help=HELP["rdm"])
        options["compare"] = st.selectbox("RDM comparison", RDM_COMPARISONS, key="cmp_compare", persist_state="session", help=HELP["compare"])

with _state.guard():
    acts_a = _state.cached_activations(model_a, dataset, layers_a, pooling)
    same = model_b is model_a and layers_b == layers_a
    acts_b = acts_a if same else _state.cached_activations(model_b, dataset, layers_b, pooling)
    other = None if same else acts_b
    try:
        with _state.progress_bar("Comparing layers…") as progress:
            result = _state.cached_call(similarity_matrix, acts_a, other, measure=measure, progress=progress, **options)
    except WorkbenchError as exc:
        _state.show_error(exc)
        if isinstance(exc, UndefinedPairError) and options.get("kind") != "svcca":
            st.info("PWCCA and mean CCA need a pair of layers to span fewer dimensions than there are samples, and no pair "
                    "does: choose 'svcca' under CCA summary (it keeps the leading directions only), or narrower layers.")
        _state.stop()

heatmap = similarity_heatmap(result)
event = st.plotly_chart(heatmap, key="cmp_heatmap", on_select="rerun", selection_mode="points", width="stretch")
st.caption(
    f"{_state.plain(result.estimator)}; n = {result.n_samples} samples of {_state.plain(dataset.name)}, pooling '{pooling}'. "
    "Hover a cell for its exact value; click it to open its detail below."
)
if measure == "cca_similarity":
    st.caption("CCA finds the directions of each layer that correlate best, so a layer that keeps many directions (a "
               "wide layer) fits a narrow layer's few closely on a finite sample, and their cell reads near 1 whatever "
               "the two compute; the chance level below shows how high such cells go by construction.")
chance = None
if st.checkbox("Chance level (B's samples shuffled)", value=True, key="cmp_chance", persist_state="session", help=HELP["chance"]):
    try:
        with _state.progress_bar("Comparing with B's samples shuffled…") as progress:
            chance = _state.cached_call(chance_level, acts_a, other, measure=measure, progress=progress, **options)
    except WorkbenchError as exc:
        st.caption(_state.plain(f"No chance level: {exc}"))
    except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
        _state.show_error(exc)
if chance is not None:
    low, high, mid = (float(f(chance.values)) for f in (np.nanmin, np.nanmax, np.nanmedian))  # n/a cells are NaN
    st.caption(
        f"Chance level, the same measure on unrelated samples (B's samples in a random order): {low:.2g} to {high:.2g} "
        f"over the cells (median {mid:.2g}); read each cell against it."
        + (" Biased CKA of unrelated layers stays above 0: tick 'Debiased' for a chance level near 0."
           if measure in ("linear_cka", "rbf_cka") and not options.get("debiased") and high > 0.1 else "")
    )
title = f"{result_label(result)}: {result.model_a} vs {result.model_b}"  # with the variant: debiased, angular, ...
with_chance = [result, chance] if chance is not None else result  # the section reads each cell against chance too
_state.report_button(title, with_chance, [heatmap], key="cmp_report", analysis="similarity",
                     params={"measure": measure, **options, "chance": chance is not None}, layers=layers_a, layers_b=layers_b,
                     pooling=pooling, summary=get_analysis("similarity").summary(with_chance))

# the detail panel follows a click on the heatmap, or the two selectors below
points = list(event.selection.points) if event and event.selection else []
clicked = (points[0].get("y"), points[0].get("x")) if points else None
if clicked and clicked != st.session_state.get("cmp_last_click"):
    st.session_state["cmp_last_click"] = clicked
    st.session_state["cmp_cell_a"], st.session_state["cmp_cell_b"] = clicked
for key, names in (("cmp_cell_a", result.layers_a), ("cmp_cell_b", result.layers_b)):
    if st.session_state.get(key) not in names:
        st.session_state[key] = names[-1]

st.subheader("Detail of one cell")
col_a, col_b, col_n = st.columns(3)
cell_a = col_a.selectbox("Layer of A", result.layers_a, key="cmp_cell_a", persist_state="session")
cell_b = col_b.selectbox("Layer of B", result.layers_b, key="cmp_cell_b", persist_state="session")
n = result.n_samples
top = max(5, min(256, n - 2))  # anchors are left out of the scores: at least 2 other samples remain
n_anchors = _state.kept_slider(col_n.slider, "Anchors", 4, top, min(64, top), key="cmp_anchors", help=HELP["anchors"])
labels = dataset.y if dataset.n_classes else None
with _state.guard():
    x_a, x_b = acts_a[cell_a], acts_b[cell_b]
    detail = _state.cached_call(relative_comparison, x_a, x_b, n_anchors=n_anchors, k=max(1, min(10, n - n_anchors - 1)),
                                  labels=labels)
value = float(result.values[result.layers_a.index(cell_a), result.layers_b.index(cell_b)])
agreement = detail.agreement
gain = None
if agreement.absolute_mean_jaccard is not None:
    gain = f"{agreement.mean_jaccard - agreement.absolute_mean_jaccard:+.3f} vs absolute"
cols = st.columns(3)
cell_chance = None if chance is None else float(chance.values[chance.layers_a.index(cell_a), chance.layers_b.index(cell_b)])
defined = bool(np.isfinite(value))
cols[0].metric(result_label(result), f"{value:.4f}" if defined else "n/a", help=result.estimator,
               delta=None if cell_chance is None or not defined else f"{value - cell_chance:+.3f} vs chance ({cell_chance:.3f})",
               delta_color="normal" if result.higher_is_closer else "inverse")
cols[1].metric(f"Jaccard@{agreement.k} (relative)", f"{agreement.mean_jaccard:.3f}", delta=gain, help=HELP["jaccard"])
cols[2].metric("MRR (relative)", f"{agreement.mrr:.3f}", help=HELP["mrr"])
left, right = st.columns(2)
scatter = relative_scatter(detail, label_a=f"{model_a.name}.{cell_a}", label_b=f"{model_b.name}.{cell_b}",
                           class_names=dataset.class_names)
bars = class_agreement_bars(agreement, class_names=dataset.class_names)
left.plotly_chart(scatter, key="cmp_scatter", width="stretch")
right.plotly_chart(bars, key="cmp_classes", width="stretch")
title = f"Relative representations: {model_a.name}.{cell_a} vs {model_b.name}.{cell_b}"
headline = {result_label(result): value if defined else "n/a",
            **({"chance level": cell_chance} if cell_chance is not None else {})}  # the cell's own value, as shown above
_state.report_button(title, detail, [scatter, bars], key="cmp_detail_report", pooling=pooling,
                     summary={**headline, **summarize(detail)})
