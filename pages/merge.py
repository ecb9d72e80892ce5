"""Merge several models: align them to a common basis (MergeMany) and average their weights."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.analyses import mode_connectivity as mc
from workbench.data import digits_train_for
from workbench.plots import mode_connectivity as plots

_state.in_app_shell()

st.title("Model merging")
dataset = _state.require_dataset()
names = _state.sample_model_names()
train_split = digits_train_for(dataset)
digits = train_split is not None
st.caption(
    "Align the members to a common basis (MergeMany: each is weight-matched to the average of the others) "
    "and average the weights; compare with each member and with the plain average."
)
with st.expander("Settings", expanded=False):
    use_train = st.checkbox(
        "Match activations and recompute BatchNorm statistics on the digits train split",
        value=digits,
        disabled=not digits,
        key="merge_train", persist_state="session",
        help="Offered when the dataset is the bundled digits test split.",
    )
    seed = int(st.number_input("Seed (order of members and permutations)", 0, 10_000, 0, key="merge_seed", persist_state="session"))
train = train_split if use_train else None
loaded = {  # the sidebar's models that are not bundled ones (uploads, models set from Python)
    f"{m.name} (loaded)": m for m in _state.current_models()
    if m.name not in names or m.sha256 != _state.load_sample_model(m.name).sha256
}


def model_of(label: str):
    return loaded[label] if label in loaded else _state.load_sample_model(label)


groups: list[list[str]] = []  # the candidates by architecture: only models of one architecture can be merged
for label in [*loaded, *names]:
    group = next((g for g in groups if mc.same_architecture(model_of(g[0]), model_of(label))), None)
    if group is None:
        groups.append([label])
    else:
        group.append(label)
groups = [g for g in groups if len(g) >= 3]
if not groups:
    st.info("Merging needs at least 3 models of one architecture; load more on the Models & data page.")
    _state.stop()
arch = st.session_state.get("mc_merge_arch")
if not isinstance(arch, int) or not 0 <= arch < len(groups):  # first visit, or fewer groups than before: the bundled MLPs
    st.session_state["mc_merge_arch"] = next((i for i, g in enumerate(groups) if "mlp_seed0" in g), 0)
which = st.selectbox("Architecture", range(len(groups)), key="mc_merge_arch", persist_state="session",
                     format_func=lambda i: f"that of {', '.join(groups[i][:4])}{' …' if len(groups[i]) > 4 else ''}",
                     help="Groups of at least 3 models with the same modules and parameter shapes.")
options = groups[which]
kept = [m for m in st.session_state.get("mc_merge_models") or [] if m in options]
if "mc_merge_models" not in st.session_state or kept != st.session_state["mc_merge_models"]:
    # first visit, or another architecture: its own members (set here, not as a default, so that the two never disagree)
    st.session_state["mc_merge_models"] = kept or [n for n in ("mlp_seed0", "mlp_seed1", "mlp_seed2") if n in options] or options[:3]
members = st.multiselect(
    "Members",
    options,
    key="mc_merge_models", persist_state="session",
    help="At least 3 models of the chosen architecture: the bundled ones, and models loaded in the sidebar.",
)
merge_method = st.radio(
    "Alignment",
    list(mc.MERGE_METHODS),
    format_func=lambda m: m.replace("_", " "),
    horizontal=True,
    key="mc_merge_method", persist_state="session",
)
rounds = st.slider(
    "Rounds at most", 1, 10, 3, key="mc_merge_rounds", persist_state="session", help="MergeMany rounds; each visits every member."
)
if len(members) < 3:
    st.info("Pick at least 3 models to merge.")
    _state.stop()
if not st.toggle("Compute the merge", key="mc_merge_run", persist_state="session", help="Weight matching of each member; seconds per round."):
    _state.stop()
with _state.guard():
    models = [loaded[n] if n in loaded else _state.load_sample_model(n) for n in members]
    with _state.progress_bar("Merging…") as bar:
        merged = _state.cached_call(
            mc.merge,
            models,
            dataset,
            method=merge_method,
            train_dataset=train,
            max_rounds=rounds,
            seed=seed,
            progress=bar,
        )
cols = st.columns(3)
cols[0].metric(
    "Merged accuracy",
    f"{merged.merged_accuracy:.1%}",
    f"{100 * (merged.merged_accuracy - merged.naive_accuracy):+.1f} points vs naive average",
)
cols[1].metric("Naive average accuracy", f"{merged.naive_accuracy:.1%}")
cols[2].metric("Best member accuracy", f"{merged.member_accuracy.max():.1%}")
fitted = [what for what, used in (("activation matching", merged.method == "activation_matching"),
                                  ("BatchNorm statistics", merged.reset_bn)) if used]
in_sample = ""
if train is None and fitted:
    remedy = ("tick “Match activations and recompute BatchNorm statistics on the digits train split” in Settings"
              if digits else "evaluate on held-out data: pass training data as train_dataset= to merge in Python, "
              "or use the bundled digits test split, whose train split this page fits on")
    subject = "The merged and naive-average accuracies are" if merged.reset_bn else "The merged accuracy is"
    were = "were" if len(fitted) > 1 else "was"
    in_sample = (f"{subject} in-sample: the {' and '.join(fitted)} of the merge {were} fitted on the same "
                 f"{merged.n_samples} samples they are evaluated on, so they are optimistic. To avoid it, {remedy}.")
    st.caption(_state.plain(in_sample))
_state.label_order_caption(dataset)
merge_fig = plots.merge_figure(merged)
st.plotly_chart(merge_fig, width="stretch", key="mc_merge_fig")
if models[0].architecture is not None:
    with _state.guard():
        blob = mc.to_safetensors(
            mc.merged_model(models, merged, stats_dataset=train if train is not None else dataset),
            architecture=models[0].architecture,
            name=f"merge of {', '.join(members)}",
        )
    st.download_button(
        "Download the merged model (safetensors)", blob, file_name="merged.safetensors", key="mc_download_merged"
    )
# the train split is used where it matched activations or set BatchNorm statistics; weight matching of models without
# BatchNorm reads the weights alone
used_train = train if merge_method != "weight_matching" or merged.reset_bn else None
_state.report_button("Model merging", merged, [merge_fig], key="mc_merge_report", models=models, train_dataset=used_train,
                     notes=in_sample)
