"""Relative representations: cross-model agreement per layer (relative vs absolute) and zero-shot stitching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from pages import _state
from workbench.analyses.relative import ANCHOR_METHODS, HEADS, relative_agreement_by_layer, stitch
from workbench.data import digits_train_for, train_test_split
from workbench.plots.similarity import layer_agreement_bars, stitching_bars

_state.in_app_shell()

HELP = {
    "layers": "Layers of the two models (one architecture); each is compared with its namesake.",
    "anchors": "Number of anchor samples: the width of the relative representation.",
    "method": "random (as in the paper), farthest-point sampling, or k-means medoids in A's space.",
    "k": "Neighbourhood size of the retrieval overlap (Jaccard@k).",
    "center": "Subtract the anchors' mean embedding before taking cosines (spreads out ReLU activations).",
    "head": "LayerNorm + linear layer, or a small MLP.",
    "epochs": "Full-batch Adam steps per head.",
}

st.title("Relative representations")
st.caption(
    "Each sample becomes its vector of cosine similarities to a set of anchor samples (Moschella et al., ICLR 2023). "
    "Models trained from different seeds differ by near-isometries, which these coordinates ignore."
)
model_a, model_b = _state.require_models(2)
dataset = _state.require_dataset()
n = dataset.n_samples

pooling = _state.pooling_picker("rel_pooling")
layers_a, layers_b = _state.default_layers(model_a), _state.default_layers(model_b)
shared = layers_a if layers_a == layers_b else []  # one architecture: a name is the same layer in both
if shared:
    layers = _state.kept_multiselect("Layers (in both models)", shared, shared, "rel_layers", owner=repr(shared),
                                     help=HELP["layers"])
    pairs = [(name, name) for name in layers]
else:
    depth = min(len(layers_a), len(layers_b))  # by default the last layers of each, as many in both, paired in order
    col_a, col_b = st.columns(2)
    with col_a:
        picked_a = _state.layer_picker(model_a, key="rel_layers_a", label=f"Layers of A ({model_a.name})",
                                       default=layers_a[-depth:] if depth else None)
    with col_b:
        picked_b = _state.layer_picker(model_b, key="rel_layers_b", label=f"Layers of B ({model_b.name})",
                                       default=layers_b[-depth:] if depth else None)
    if len(picked_a) != len(picked_b):
        st.info("The models have different architectures, so a layer name need not mean the same layer in both: pick "
                "the same number of layers in each; they are paired in order.")
        _state.stop()
    pairs = list(zip(picked_a, picked_b))
if not pairs:
    st.info("Pick at least one layer.")
    _state.stop()

cols = st.columns(4)
top = max(5, min(512, n - 2))  # anchors are left out of the scores: at least 2 other samples remain
n_anchors = _state.kept_slider(cols[0].slider, "Anchors", 4, top, min(64, top), key="rel_anchors", help=HELP["anchors"])
method = cols[1].selectbox("Anchor choice", ANCHOR_METHODS, key="rel_method", persist_state="session", help=HELP["method"])
top_k = max(2, min(50, n - n_anchors - 1))  # each scored sample retrieves k of the others
k = _state.kept_slider(cols[2].slider, "k", 1, top_k, min(10, top_k), key="rel_k", help=HELP["k"])
seed = int(
    cols[3].number_input("Seed", min_value=0, value=0, step=1, key="rel_seed", persist_state="session",
                         help="Seed of the anchor choice.")
)
center = st.checkbox("Centre on the anchors' mean", key="rel_center", persist_state="session", help=HELP["center"])

with _state.guard():
    acts_a = _state.cached_activations(model_a, dataset, list(dict.fromkeys(a for a, _ in pairs)), pooling)
    acts_b = _state.cached_activations(model_b, dataset, list(dict.fromkeys(b for _, b in pairs)), pooling)
    options = {"layers": pairs, "n_anchors": n_anchors, "method": method, "center": center, "k": k, "seed": seed}
    with _state.progress_bar("Comparing layers…") as progress:
        result = _state.cached_call(relative_agreement_by_layer, acts_a, acts_b, progress=progress, **options)

best = int(np.argmax(result.jaccard))
absolute = result.absolute_jaccard[best]
cols = st.columns(3)
cols[0].metric(f"Best relative Jaccard@{k}", f"{result.jaccard[best]:.3f}", help=f"layer {result.layers_a[best]}")
cols[1].metric(f"Absolute Jaccard@{k} there", "n/a (widths differ)" if np.isnan(absolute) else f"{absolute:.3f}")
cols[2].metric("Relative MRR there", f"{result.mrr[best]:.3f}")
fig = layer_agreement_bars(result)
st.plotly_chart(fig, key="rel_layers_chart", width="stretch")

def column(values) -> list:
    """Numbers, or text reading "n/a" where some are undefined: the table shows an empty value as "None"."""
    numbers = [None if v is None or np.isnan(v) else float(v) for v in values]
    return numbers if None not in numbers else ["n/a" if v is None else f"{v:.3f}" for v in numbers]


table = {"layer of A": list(result.layers_a), "layer of B": list(result.layers_b), "Jaccard relative": column(result.jaccard)}
table.update({"Jaccard absolute": column(result.absolute_jaccard), "MRR relative": column(result.mrr)})
table.update({"MRR absolute": column(result.absolute_mrr), "cosine relative": column(result.cosine)})
frame = pd.DataFrame(table)
number_format = {name: st.column_config.NumberColumn(format="%.3f") for name in frame.columns[2:] if frame[name].dtype.kind == "f"}
st.dataframe(frame, hide_index=True, width="stretch", column_config=number_format, key="rel_table")
st.caption(
    f"{result.estimator}; n = {result.n_samples} samples of {dataset.name}. "
    "Absolute values are n/a where the two layers have different widths."
)
_state.report_button("Relative representations per layer", result, [fig], key="rel_report", pooling=pooling)

st.subheader("Zero-shot stitching")
st.caption(
    "A head is trained on one model's relative representation of the training samples and applied unchanged "
    "to the other model's: the encoder of one model with the head of the other."
)
if not dataset.n_classes:
    st.info("Stitching needs a dataset with class labels.")
    _state.stop()
cols = st.columns(3)
pair_names = [a if a == b else f"{a} / {b}" for a, b in pairs]
chosen = cols[0].selectbox(
    "Layer (usually the last hidden one)", pair_names, index=max(0, len(pairs) - 2), key="rel_sl"
)
layer_pair = pairs[pair_names.index(chosen)]
head = cols[1].selectbox("Head", HEADS, key="rel_head", persist_state="session", help=HELP["head"])
epochs = cols[2].slider("Training steps", 20, 500, 100, 10, key="rel_epochs", persist_state="session", help=HELP["epochs"])
if not st.toggle("Run zero-shot stitching", key="rel_stitch", persist_state="session"):
    _state.stop()


def splits(data):
    """The digits train split for training when the digits test split is shown, else a seeded 70/30 split,
    stratified by class where the labels allow."""
    train = digits_train_for(data)
    return (train, data) if train is not None else _state.logged_call(train_test_split, data, test_fraction=0.3, seed=0)


def output_layer(model):
    names = [i.name for i in _state.cached_layer_info(model) if i.output_shape is not None]
    return names[-1] if names else None


with _state.guard():
    train, test = splits(dataset)
    (la, lb), out_a, out_b = layer_pair, output_layer(model_a), output_layer(model_b)
    tr_a = _state.cached_activations(model_a, train, [la], pooling)
    tr_b = _state.cached_activations(model_b, train, [lb], pooling)
    te_a = _state.cached_activations(model_a, test, list(dict.fromkeys([la, out_a])), pooling)
    te_b = _state.cached_activations(model_b, test, list(dict.fromkeys([lb, out_b])), pooling)
    logits = [te[out] if te[out].shape[1] == test.n_classes else None for te, out in ((te_a, out_a), (te_b, out_b))]
    logits = logits if all(lg is not None for lg in logits) else [None, None]
    options = {"n_anchors": min(n_anchors, train.n_samples), "method": method, "center": center, "head": head}
    options.update({"epochs": epochs, "logits_a": logits[0], "logits_b": logits[1], "seed": seed})
    with _state.progress_bar("Training the stitching heads…") as progress:
        stitched = _state.cached_call(stitch, tr_a[la], tr_b[lb], te_a[la], te_b[lb], train.y, test.y, progress=progress,
                                      **options)
absolute_acc = stitched.absolute_accuracy
cols = st.columns(3)
cols[0].metric("B → head of A (stitched)", f"{stitched.relative_accuracy[1, 0]:.3f}")
cols[1].metric("Absolute stitching", "n/a (widths differ)" if absolute_acc is None else f"{absolute_acc[1, 0]:.3f}",
               help="A's head reading B's raw activations, unit i of B as unit i of A: the baseline the relative space "
               "is compared with.")
cols[2].metric("A's own output layer", "n/a" if stitched.own_accuracy is None else f"{stitched.own_accuracy[0]:.3f}",
               help="The accuracy of model A's own classifier on these samples, for reference; the bars show the heads "
               "trained on the relative spaces.")
if absolute_acc is not None and absolute_acc[1, 0] < stitched.chance_accuracy:
    st.caption(f"Absolute stitching scores below chance ({absolute_acc[1, 0]:.3f} < {stitched.chance_accuracy:.3f}): B's units "
               "come in another order and scale than A's, so A's head maps B's classes consistently onto other classes, "
               "not at random. The relative space, which compares each sample with the same anchors in both models, removes "
               "that mismatch.")
_state.label_order_caption(test)
fig = stitching_bars(stitched, name_a=model_a.name, name_b=model_b.name)
st.plotly_chart(fig, key="rel_stitch_chart", width="stretch")
held = train.n_samples - stitched.n_train
st.caption(f"Heads trained on {stitched.n_train} samples of {_state.plain(train.name)}"
           + (f" (its {train.n_samples} samples less the {held} anchors, whose own columns would give their class away)" if held else "")
           + f", tested on {test.n_samples} of {_state.plain(test.name)}.")
_state.report_button("Zero-shot stitching", stitched, [fig], key="rel_stitch_report",
                    dataset=test, train_dataset=train, pooling=pooling)
