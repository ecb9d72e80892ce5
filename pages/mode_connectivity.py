"""Linear mode connectivity: interpolate A → B before and after permutation alignment (merging: pages/merge.py)."""

from __future__ import annotations

import streamlit as st
import torch

from pages import _state
from workbench.analyses import mode_connectivity as mc
from workbench.data import digits_train_for
from workbench.plots import mode_connectivity as plots

_state.in_app_shell()

st.title("Mode connectivity")
st.caption(
    "Are two trained networks linearly connected once B's hidden units are reordered to match A's? "
    "Weight matching (Git Re-Basin), activation matching and REPAIR, with the layer analysis of Ito et al."
)
_state.require_models(1)
dataset = _state.require_dataset()
names = _state.sample_model_names()
session = {m.name: m for m in _state.current_models()}
options = list(dict.fromkeys([*session, *names]))


def load(name: str):
    return session[name] if name in session else _state.load_sample_model(name)


def pick(label: str, slot: str, fallback: str, key: str, choices: list[str], help_text: str):
    current = st.session_state.get(slot)
    default = current.name if current is not None and current.name in choices else fallback
    choice = st.selectbox(
        label, choices, index=choices.index(default) if default in choices else 0, key=key, help=help_text
    )
    return load(choice)


col_a, col_b = st.columns(2)
with col_a, _state.guard():
    model_a = pick("Model A", _state.MODEL_A, _state.DEFAULT_A, "mc_model_a", options,
                   "A model chosen on the Models & data page, or a bundled sample model.")
with col_b, _state.guard():
    matching = [n for n in options if mc.same_architecture(model_a, load(n))]  # only these can be matched to A
    others = [n for n in matching if n != model_a.name]  # never A itself: A against A says nothing
    if others:
        model_b = pick("Model B (permuted to match A)", _state.MODEL_B, others[0], "mc_model_b", others,
                       "Other models of A's architecture: the same modules and parameter shapes.")
    else:  # not A itself: there is nothing to match A to
        st.selectbox("Model B (permuted to match A)", [f"no other model of {model_a.name}'s architecture"], disabled=True,
                     key="mc_model_b_none")
if not others:
    st.info(f"No other model has the architecture of {_state.plain(model_a.name)}: choose or upload one on the Models & data page.")
    _state.stop()
notes = st.container()  # always there, so the Settings expander below keeps its place (and stays open) across reruns
chosen_b = st.session_state.get(_state.MODEL_B)
if chosen_b is not None and chosen_b.name == model_a.name:
    notes.caption(f"The sidebar's model B ({_state.plain(chosen_b.name)}) is the model chosen as A here, so "
               f"{_state.plain(model_b.name)} is used instead.")
elif chosen_b is not None and chosen_b.name not in matching:
    notes.caption(f"The sidebar's model B ({_state.plain(chosen_b.name)}) has another architecture than {_state.plain(model_a.name)}, so it cannot be "
               f"matched to it; {_state.plain(model_b.name)} is used instead.")
elif chosen_b is not None and model_b.name != chosen_b.name:
    notes.caption(f"This page matches {_state.plain(model_b.name)}, chosen above, to A, not the sidebar's model B "
               f"({_state.plain(chosen_b.name)}).")
train_split = digits_train_for(dataset)
digits = train_split is not None
has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model_a.module.modules())
offered = [m for m in mc.CONNECTIVITY_METHODS if m != "reset_bn" or has_bn]
dropped_reset = not has_bn and "reset_bn" in (st.session_state.get("mc_methods") or [])
with st.expander("Settings", expanded=False):
    n_points = st.slider(
        "Points along the path", 5, 51, 25, 2, key="mc_points", persist_state="session", help="λ values in [0, 1]; 25 resolves typical barriers."
    )
    methods = st.multiselect(
        "Alignments",
        offered,
        default=["naive", "weight_matching", "activation_matching", "repair"],
        format_func=plots.method_label,
        key="mc_methods", persist_state="session",
        help="naive: B as trained; repair: weight matching + REPAIR (Jordan et al. 2022); "
        "reset_bn: weight matching + recomputed BatchNorm statistics, offered when A has BatchNorm layers.",
    )
    use_train = st.checkbox(
        "Also evaluate on the digits train split (and take REPAIR/BatchNorm statistics from it)",
        value=digits,
        disabled=not digits,
        key="mc_train", persist_state="session",
        help="Offered when the dataset is the bundled digits test split.",
    )
    top_k = st.slider("Top-k singular directions compared", 1, 20, 5, key="mc_topk", persist_state="session")
    seed = int(st.number_input("Seed (order of the coordinate descent)", 0, 10_000, 0, key="mc_seed", persist_state="session"))
if dropped_reset:
    st.caption(f"The alignment '{plots.method_label('reset_bn')}' is left out: {_state.plain(model_a.name)} has no BatchNorm "
               "layers, so it would give the same result as weight matching.")
if not methods:
    st.info("Pick at least one alignment.")
    _state.stop()

train = train_split if use_train else None
with _state.guard(), _state.progress_bar("Matching and interpolating…") as bar:
    result = _state.cached_call(
        mc.mode_connectivity,
        model_a,
        model_b,
        dataset,
        train_dataset=train,
        methods=methods,
        n_points=n_points,
        top_k=top_k,
        seed=seed,
        progress=bar,
    )

caveat = plots.chance_note(result, dataset)
if caveat:
    st.warning(_state.plain(caveat))
curves = plots.interpolation_curves(result)
st.plotly_chart(curves, width="stretch", key="mc_curves")
st.subheader("Loss barriers")
rows = plots.barrier_rows(result)
definitions = plots.barrier_definitions(next(iter(result.barriers.values()), None))
# short headers under the heading "Loss barriers" (the full names were wider than the page at 1280 px and pushed the
# last column out of sight); each header's tooltip gives the definition
short = {"linear": "above the line", "mean": "above the endpoint mean", "accuracy_drop": "accuracy drop"}
st.dataframe(
    rows,
    hide_index=True,
    width="stretch",
    key="mc_barriers",
    column_order=[c for c in rows[0] if c != "dataset"],  # the split names it, as the curves' legend and the caption do
    column_config={"method": st.column_config.TextColumn(width="medium"),  # the labels name the alignment in full
                   "split": st.column_config.TextColumn(width="small"),
                   **{column: st.column_config.NumberColumn(short[key], format="%.4f", help=definitions.get(column))
                      for key, column in plots.BARRIER_COLUMNS.items()},
                   "at λ (line)": st.column_config.NumberColumn("at λ", format="%.3f", width="small",
                                                                help="λ where the barrier above the line is reached"),
                   "at λ (mean)": st.column_config.NumberColumn("at λ", format="%.3f", width="small",
                                                                help="λ where the barrier above the endpoint mean is reached")},
)
if any(r["at λ (mean)"] in (0.0, 1.0) for r in rows):
    st.caption("Where a barrier above the endpoint mean sits at λ = 0 or 1, the path is highest at an endpoint: that "
               "value is half the gap between the endpoint losses, not a bump between them.")
samples = f"n = {result.n_samples} test samples" + (f" and {train.n_samples} train samples" if train is not None else "")
st.caption(" · ".join(f"**{k}**: {v}" for k, v in definitions.items()) + f". {samples}.")
remedy = ("tick “Also evaluate on the digits train split” in Settings to fit them on the train split" if digits else
          f"{plots.IN_SAMPLE_REMEDY} in Python, or use the bundled digits test split, whose train split this page fits on")
in_sample = plots.in_sample_note(result, remedy)
if in_sample:
    st.caption(_state.plain(in_sample))
_state.label_order_caption(dataset)

st.subheader("Per layer: distance and singular-vector alignment")
layers = plots.layer_alignment_figure(result.layers)
st.plotly_chart(layers, width="stretch", key="mc_layers")
with st.expander("Singular values (unchanged by the permutation) and the matching objective"):
    spectra = plots.singular_values_figure(result.layers, name_a=model_a.name, name_b=model_b.name)
    st.plotly_chart(spectra, width="stretch", key="mc_spectra")
    objective = plots.matching_objective(result.weight_matching)
    st.plotly_chart(objective, width="stretch", key="mc_objective")

if model_b.architecture is not None:
    with _state.guard():
        aligned = mc.apply_permutation(model_b, result.weight_matching)
        data = mc.to_safetensors(
            aligned, architecture=model_b.architecture, name=f"{model_b.name} aligned to {model_a.name}"
        )
    st.download_button(
        "Download B aligned to A (safetensors)",
        data,
        file_name=f"{model_b.name}_aligned.safetensors",
        key="mc_download_b",
        help="The permuted B; it computes the same function as B.",
    )
notes = " ".join(n for n in (caveat, in_sample) if n)
_state.report_button("Mode connectivity", result, [curves, layers, spectra, objective], key="mc_report",
                     models=[model_a, model_b], train_dataset=train, notes=notes)
