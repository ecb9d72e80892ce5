"""Probing: how well a simple probe reads the labels from each layer, against a control task."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.analyses.probing import PROBES, probe_layers
from workbench.plots.probing import probe_confusion, probe_profile, probe_rows

_state.in_app_shell()

st.title("Probing")
st.caption(
    "A probe is a small classifier trained on one layer's activations to predict the labels; its held-out "
    "accuracy says how much of the label the layer makes (linearly) readable. The control task (Hewitt & Liang "
    "2019) gives each sample a random label: selectivity = accuracy - control accuracy. With one random label per "
    "sample the held-out control sits at chance by construction, so selectivity is accuracy above chance; the "
    "control's training score shows how much random labelling the probe can memorise (high: the probe is too "
    "expressive for these samples)."
)
models = _state.current_models()
if not models:
    _state.require_models(1)
dataset = _state.require_dataset()
if dataset.y is None:
    st.info("Probing needs labels: choose a dataset with labels on the Models & data page (an uploaded file with 'y').")
    _state.stop()

settings = st.form("probe_settings", border=False)  # edits apply together: each change would train every probe again
settings.caption("Changes apply when you press **Train probes**.")
c1, c2, c3, c4 = settings.columns(4)
probe = c1.selectbox(
    "Probe",
    PROBES,
    key="probe_kind", persist_state="session",
    help="linear: multinomial logistic regression (ridge for float targets), what is linearly decodable; "
    "mlp: one hidden layer of 128 ReLU units, also non-linear codes; it memorises more, and trains for minutes where "
    "the linear probe takes seconds (every layer, fold and control task is a network of its own).",
)
cv = int(
    c2.number_input(
        "Folds",
        min_value=2,
        max_value=10,
        value=5,
        step=1,
        key="probe_cv", persist_state="session",
        help="k-fold cross-validation; every class needs at least this many samples.",
    )
)
c = float(
    c3.number_input(
        "C (linear probe)",
        min_value=1e-4,
        max_value=1e4,
        value=1.0,
        format="%g",
        key="probe_c", persist_state="session",
        help="The inverse L2 strength (scikit-learn's C) of the linear probe: larger fits the training folds harder. "
        "The MLP probe ignores it; its weight decay is fixed at 1e-4.",
    )
)
linear_only = {"c": c} if probe == "linear" else {}
control = c4.checkbox(
    "Control task",
    value=True,
    key="probe_control", persist_state="session",
    help="Also train on random labels (a fixed random function of the sample) and report selectivity.",
)
with settings:
    pooling = _state.pooling_picker("probe_pooling")
    chosen = _state.layer_pickers(models, "probe_layers", require=False)
settings.form_submit_button("Train probes", key="probe_train", type="primary",
                            help="Apply the settings above; the probes train again only where a setting changed.")
_state.require_layers(chosen)



def probes(model, slot):
    acts = _state.cached_activations(model, dataset, chosen[slot], pooling)
    with _state.progress_bar(f"Training {probe} probes on {model.name}…") as progress:
        return _state.cached_call(probe_layers, acts, probe=probe, cv=cv, control=control, progress=progress,
                                  **linear_only)


done = _state.for_each_model(models, probes)
results = [r for _, r in done]
names = [m.name for m, _ in done]
profile = probe_profile(*results, names=names)
st.plotly_chart(profile, width="stretch", key="probe_profile")
metric = results[0].metric
st.dataframe(
    [row for r, name in zip(results, names) for row in probe_rows(r, name)],
    hide_index=True,
    width="stretch",
    key="probe_table",
    column_config={
        col: st.column_config.NumberColumn(format="%.3f")
        for col in (metric, "std", "training", "macro-F1", "control", "control, training", "selectivity")
    },
)
st.caption(
    f"n = {dataset.n_samples} samples of {dataset.name}; {results[0].estimator}; chance = {results[0].chance:.3f}. "
    "'training' is the score on the folds' training rows; a large gap to held-out means the probe memorises."
)

figures = [profile]
if results[0].confusion is not None:
    options = [(i, layer) for i, r in enumerate(results) for layer in r.layers]
    pick = _state.kept_choice(
        st.selectbox,
        "Confusion matrix of",
        options,
        index=len(results[0].layers) - 1,
        key="probe_confusion_layer",
        format_func=lambda o: f"{names[o[0]]} · {o[1]}",
    )
    confusion = probe_confusion(results[pick[0]], pick[1], class_names=dataset.class_names)
    st.plotly_chart(confusion, width="stretch", key="probe_confusion")
    figures.append(confusion)
_state.report_button(f"Probing ({probe} probe)", results, figures, key="probe_report", pooling=pooling)
