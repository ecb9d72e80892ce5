"""Embedding: two views of the same samples side by side, linked selection, intrinsic dimension per layer."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.analyses.embedding import ID_METHODS, METHODS, aligned_embedding, layer_intrinsic_dimension
from workbench.plots.embedding import METHOD_NAMES, embedding_scatter, intrinsic_dimension_profile

_state.in_app_shell()

SELECTION = "emb_selection"


def clear_selection() -> None:
    """Forget the selected samples and the typed indices (before the widgets are drawn again)."""
    st.session_state[SELECTION] = []
    st.session_state["emb_select_text"] = ""
    for key in ("emb_typed_last", "emb_typed_ignored", "emb_last_0", "emb_last_1"):  # the same box drawn again selects again
        st.session_state.pop(key, None)


SELECT_MODES = ("points", "box", "lasso")

st.title("Embedding")
st.caption(
    "UMAP, t-SNE or PCA of two layers, or of the same layer of two models, in a shared frame: the second view "
    "starts from the first's layout and is rotated onto it, so a sample sits in about the same place in both. "
    "Select points (box or lasso) in either panel to highlight the same samples in the other."
)
models = _state.current_models()
if not models:
    _state.require_models(1)
dataset = _state.require_dataset()

HELP = {
    "method": "umap keeps neighbourhoods and clusters; tsne likewise, slower; pca is linear, keeps global distances.",
    "seed": "Seeds UMAP's and t-SNE's optimisation; the same seed gives the same picture.",
    "neighbors": "Size of the neighbourhood UMAP preserves: larger keeps more global structure.",
    "color": "Class label, or how far each sample moved from view 1 to view 2 (in units of the view's radius).",
    "trust": "1 = neighbours in the picture are neighbours in the layer; about 0.5 for a random picture.",
    "id": "twonn: Facco et al. 2017, from the two nearest neighbours; mle: Levina & Bickel 2005, 20 neighbours.",
}
c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Method", METHODS, key="emb_method", persist_state="session", help=HELP["method"],
                      format_func=lambda m: METHOD_NAMES.get(m, m))
seed = int(c2.number_input("Seed", min_value=0, max_value=2**32 - 1, value=0, step=1, key="emb_seed", persist_state="session",
                           help=HELP["seed"], disabled=method == "pca"))  # PCA is deterministic
n_neighbors = int(c3.slider("UMAP neighbours", 5, 50, 15, key="emb_neighbors", persist_state="session", help=HELP["neighbors"],
                            disabled=method != "umap"))
alone = f"Two layers of model {_state.slots(models)[0].upper()}"  # B when B is analysed alone
modes = ["Model A vs model B", alone] if len(models) == 2 else [alone]
mode = _state.kept_choice(c4.radio, "Compare", modes, key="emb_mode")
pooling = _state.pooling_picker("emb_pooling")

left, right = st.columns(2)
if mode == modes[0] and len(models) == 2:
    with left:
        layer_a = _state.layer_picker(models[0], key="emb_layer_a", multi=False)[0]
    if st.session_state.get("_emb_followed") not in (None, layer_a):  # A's layer changed: B takes it where it has one
        if any(i.name == layer_a and i.output_shape is not None for i in _state.cached_layer_info(models[1])):
            st.session_state["emb_layer_b"] = layer_a
    st.session_state["_emb_followed"] = layer_a
    with right:
        layer_b = _state.layer_picker(models[1], key="emb_layer_b", multi=False, default=[layer_a],
                                      label=f"Layer of {models[1].name} (follows A's)")[0]
    sources = [(models[0], layer_a), (models[1], layer_b)]
else:
    first = _state.default_layers(models[0])[:1]
    with left:
        layer_a = _state.layer_picker(models[0], key="emb_layer_i", multi=False, label="First layer", default=first)[0]
    with right:
        layer_b = _state.layer_picker(models[0], key="emb_layer_j", multi=False, label="Second layer")[0]
    sources = [(models[0], layer_a), (models[0], layer_b)]

with _state.guard():
    views = {}
    for model, layer in sources:
        views[f"{model.name} · {layer}"] = _state.cached_activations(model, dataset, [layer], pooling)[layer]
    with _state.progress_bar(f"Computing the {method.upper()} views…") as progress:
        umap_only = {"n_neighbors": n_neighbors} if method == "umap" else {}
        result = _state.cached_call(aligned_embedding, views, method=method, seed=seed, progress=progress, **umap_only)

labels = dataset.named_labels()  # class names in legends where the dataset has them
color_options = (["label"] if labels is not None else []) + ["distance moved between the views", "none"]
color_by = _state.kept_choice(st.selectbox, "Colour by", color_options, key="emb_color", help=HELP["color"])
kind = "class" if dataset.n_classes is not None else "target"  # as the other pages name a sample's label
color, color_name = {"label": (labels, kind), "none": (None, kind)}.get(
    color_by, (result.displacement[1], "distance moved")
)
with st.expander("Select samples by index"):
    typed = st.text_input(
        "Indices, e.g. 0-9, 42", key="emb_select_text", persist_state="session", help="Ranges and single indices, comma-separated."
    )
    if typed != st.session_state.get("emb_typed_last", ""):  # emptied: the typed selection is cleared too
        st.session_state["emb_typed_last"] = typed
        picked: set[int] = set()
        ignored = []
        for part in filter(None, typed.replace(" ", "").split(",")):
            low, _, high = part.partition("-")
            if low.isdigit() and (not high or high.isdigit()) and int(low) <= int(high or low) < result.n_samples:
                picked.update(range(int(low), int(high or low) + 1))
            else:
                ignored.append(part)
        st.session_state[SELECTION] = sorted(picked)
        st.session_state["emb_typed_ignored"] = ignored
    if ignored := st.session_state.get("emb_typed_ignored"):
        st.caption(_state.plain(f"Left out: {', '.join(ignored)}. Give indices from 0 to {result.n_samples - 1}, single or "
                                "as ranges from low to high such as 0-9."))

selection = st.session_state.get(SELECTION) or None
events = []
for i, col in enumerate(st.columns(2)):
    fig = embedding_scatter(result, view=i, color=color, color_name=color_name, labels=labels, selected=selection)
    with col:
        events.append(
            st.plotly_chart(fig, key=f"emb_chart_{i}", on_select="rerun", selection_mode=SELECT_MODES, width="stretch")
        )
        st.metric("Trustworthiness (k = 10)", f"{result.trustworthiness[i]:.3f}", help=HELP["trust"])
for i, event in enumerate(events):
    points = event.selection.points if event is not None and hasattr(event, "selection") else []
    chosen = sorted({int(p["customdata"][0]) for p in points if p.get("customdata")})
    if chosen and chosen != st.session_state.get(f"emb_last_{i}"):
        st.session_state[f"emb_last_{i}"] = chosen
        st.session_state[SELECTION] = chosen
        st.rerun()
st.caption(
    f"n = {result.n_samples} samples of {dataset.name}; {result.estimator}; "
    f"disparity between the views {result.disparity[1]:.3f} (mean squared distance between a sample's two places, "
    "each view scaled to unit radius and rotated onto the first: 0 = identical, at most 2)."
)

if selection:
    rows = ["index,label"] + [f"{i},{labels[i] if labels is not None else ''}" for i in selection]
    s1, s2 = st.columns([3, 1])
    label = f"Download the {len(selection)} selected indices (CSV)"
    csv = "\n".join(rows) + "\n"
    s1.download_button(label, csv, file_name="selected_samples.csv", mime="text/csv", key="emb_download")
    s2.button("Clear selection", key="emb_clear", on_click=clear_selection)

st.subheader("Intrinsic dimension across layers")
id_method = st.radio("Estimator", ID_METHODS, horizontal=True, key="emb_id_method", persist_state="session", help=HELP["id"])
profiles = []
with _state.guard():
    for model in models:
        layers = _state.default_layers(model)
        acts = _state.cached_activations(model, dataset, layers, pooling)
        profiles.append(_state.cached_call(layer_intrinsic_dimension, acts, method=id_method))
dims = intrinsic_dimension_profile(*profiles, names=[m.name for m in models])
st.plotly_chart(dims, width="stretch", key="emb_id_chart")
views_fig = [embedding_scatter(result, view=i, color=color, color_name=color_name, labels=labels, selected=selection)
             for i in range(2)]  # as the page shows them
_state.report_button(f"Embedding ({METHOD_NAMES.get(method, method)})", [result, *profiles], [*views_fig, dims],
                     key="emb_report", pooling=pooling)
