"""Degeneracy: activation and Jacobian spectra, ReLU patterns, free parameters, the interaction basis."""

from __future__ import annotations

import streamlit as st
import torch

from pages import _state
from workbench.analyses import degeneracy as dg
from workbench.errors import ArchitectureError
from workbench.plots import degeneracy as plots

_state.in_app_shell()

HELP = {
    "rtol": "Eigenvalues below rtol × the largest count as zero, for the ranks and for the truncation of the "
    "interaction basis; 1e-8 keeps directions with 1e-4 of the largest spread.",
    "output": "'logits': degenerate = leaves every logit unchanged. 'loss': leaves every per-sample cross-entropy "
    "unchanged to first order (needs class labels).",
    "directions": "How many leading interaction-basis directions of each layer enter the interaction graph; more "
    "gives a fuller graph and a slower Louvain search.",
    "layers": "'input' and top-level layers of the sequential model; the output is always added to the interaction basis.",
    "free": "Structural first-order count per weight matrix: zero-variance inputs × fan-out + (input rank + 1) × "
    "ignored outputs + synchronised-ReLU mixing + ReLU rescalings + bias shifts of always-on ReLUs.",
    "llc": "Samples the tempered posterior around the trained weights with SGLD (Lau et al. 2023). The number depends "
    "on every setting here: compare models only at equal settings, and check that the traces are flat after burn-in.",
    "modularity": "Newman modularity of the seeded Louvain split of the interaction graph: 0 is no better than "
    "chance, near 1 is separate modules.",
}


def with_progress(label: str, fn, *args, **kwargs):
    """A cached library call with a progress bar."""
    with _state.progress_bar(label) as bar:
        return _state.cached_call(fn, *args, progress=bar, **kwargs)


st.title("Degeneracy")
st.caption(
    "Parameters are degenerate when they can change without changing what the network computes on the data: "
    "directions in which a layer does not vary, directions the rest of the network ignores, and ReLUs that fire "
    "together (Bushnaq et al. 2024). The interaction basis removes the first two; its graph shows the modules."
)
models = _state.current_models()
if not models:
    _state.require_models(1)
dataset = _state.require_dataset()

with st.expander("Settings", expanded=False):
    c1, c2, c3 = st.columns(3)
    rtols = [1e-12, 1e-10, 1e-8, 1e-6, 1e-4]
    rtol = c1.select_slider("Rank tolerance (rtol)", rtols, dg.DEFAULT_RTOL, key="deg_rtol", persist_state="session", help=HELP["rtol"])
    output = c2.radio("Jacobians of", dg.OUTPUTS, key="deg_output", persist_state="session", horizontal=True, help=HELP["output"])
    directions = c3.number_input("Graph directions", 4, 512, 64, 4, key="deg_dirs", persist_state="session", help=HELP["directions"])

chosen, last_layer, usable = {}, {}, []
for col, model, slot in zip(st.columns(len(models)), models, _state.slots(models)):
    with col:
        if not isinstance(model.module, torch.nn.Sequential):
            st.info(f"{_state.plain(model.name)} is not one plain sequence of layers (such as the mlp and cnn architectures), "
                    "which the degeneracy analyses need to split the network after a layer; choose such a model.")
            continue
        try:  # a model this page cannot analyse is named in its column; the other one is still analysed
            options = _state.cached_call(dg.sequential_layers, model)
            default = _state.cached_call(dg.default_layers, model, dataset)
        except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
            _state.show_error(exc)
            continue
        usable.append((model, slot))
        last_layer[slot] = options[-1]
        label = f"Layers of {model.name}"
        chosen[slot] = _state.kept_multiselect(label, options, default, f"deg_layers_{slot}", owner=model.content_sha256,
                                               help=HELP["layers"])
if not usable:
    _state.stop()
if not all(chosen.values()):
    st.info("Pick at least one layer for each model.")
    _state.stop()
models = [model for model, _ in usable]

act_ranks, grad_ranks, relus, summaries, bases, basis_slots = [], [], [], [], [], []
no_relus: list[str] = []
with _state.guard():
    for model, slot in usable:
        layers = chosen[slot]
        acts = _state.cached_call(dg.layer_activations, model, dataset, layers)
        act_ranks.append(_state.cached_call(dg.activation_rank, acts, rtol=rtol))
        name = model.name
        grad_ranks.append(
            with_progress(f"Jacobians of {name}", dg.gradient_rank, model, dataset, layers, output=output, rtol=rtol)
        )
        if any(layer != last_layer[slot] for layer in layers):
            kwargs = {"rtol": rtol, "graph_directions": int(directions)}
            bases.append(
                with_progress(f"Interaction basis of {name}", dg.interaction_basis, model, dataset, layers, **kwargs)
            )
            basis_slots.append(slot.upper())
        summaries.append(
            with_progress(f"Free parameters of {name}", dg.degeneracy_summary, model, dataset, output=output, rtol=rtol)
        )
        try:
            relus.append(_state.cached_call(dg.relu_patterns, model, dataset))
        except ArchitectureError:
            no_relus.append(name)

st.subheader("Spectra")
figures = [plots.spectrum_figure(*act_ranks), plots.spectrum_figure(*grad_ranks)]
st.plotly_chart(figures[0], width="stretch", key="deg_act_spectra")
st.plotly_chart(figures[1], width="stretch", key="deg_grad_spectra")
st.caption(
    f"n = {dataset.n_samples} samples of {dataset.name}. Above the dashed line (rtol) a layer varies, or the output "
    "depends on it; eigenvalues below it are degenerate directions. With fewer samples than units the activation "
    "rank is at most n − 1."
)

if relus or no_relus:
    st.subheader("ReLU firing patterns")
for name in no_relus:
    st.info(f"{_state.plain(name)} has no ReLU layers, so it has no dead, always-on or synchronised ReLUs.")
if relus:
    for col, r in zip(st.columns(len(relus)), relus):
        counts = f"{sum(r.n_dead.values())} / {sum(r.n_always_on.values())} / {sum(r.n_synchronised.values())}"
        col.metric(f"Dead / always-on / synchronised units ({r.model})", counts)
    figures.append(plots.relu_pattern_figure(*relus))
    st.plotly_chart(figures[-1], width="stretch", key="deg_relu")

st.subheader("Free parameters")
for col, s in zip(st.columns(len(summaries)), summaries):
    scope = " in its linear layers" if s.not_counted else ""
    col.metric(f"Free parameters ({s.model}){scope}", f"{s.total_free:,} of {s.total_parameters:,}", help=HELP["free"])
for s, model in zip(summaries, models):
    if s.not_counted:
        st.caption(
            f"{s.model}: only its nn.Linear layers on flat inputs are counted ({s.total_parameters:,} of its "
            f"{model.n_parameters:,} parameters); {', '.join(s.not_counted)} (convolutions, normalisation, linear "
            "layers applied along an axis) are not analysed."
        )
caveats = []  # shown under the counts, and repeated in the report section
for s in summaries:
    if (limited := plots.sample_limited_share(s)) and s.sample_limited:
        caveats.append(f"{s.model}: {limited:,} of its {s.total_free:,} free parameters come from "
                       f"{', '.join(s.sample_limited)}, whose counts these {s.n_samples} samples do not pin down: read the "
                       "total as an upper bound here, and take more samples (such as the train split) to settle it.")
    for module, why in s.caveats.items():
        settle = "; more samples (such as the train split) settle it" if module in s.sample_limited else ""
        caveats.append(f"{s.model}: the count of {module} is {why}{settle}.")
for caveat in caveats:
    st.caption(caveat)
rows = [row for s in summaries for row in plots.summary_rows(s)]
percent = {"free fraction": st.column_config.NumberColumn(format="percent")}
st.dataframe(rows, hide_index=True, width="stretch", key="deg_summary", column_config=percent)
figures.append(plots.degeneracy_figure(*summaries))
st.plotly_chart(figures[-1], width="stretch", key="deg_free")

if bases:
    st.subheader("Interaction basis")
    for col, b in zip(st.columns(len(bases)), bases):
        col.metric(f"Modularity ({b.model})", f"{b.modularity:.3f}", help=HELP["modularity"])
    st.dataframe([row for b in bases for row in plots.basis_rows(b)], hide_index=True, width="stretch", key="deg_basis")
    figures += [plots.basis_size_figure(*bases), plots.interaction_spectrum_figure(*bases)]
    st.plotly_chart(figures[-2], width="stretch", key="deg_basis_size")
    st.plotly_chart(figures[-1], width="stretch", key="deg_lambda")
    c1, c2 = st.columns(2)
    labels = [f"{slot}: {b.model}" for slot, b in zip(basis_slots, bases)]
    which = _state.kept_choice(c1.selectbox, "Graph of model", list(range(len(bases))), format_func=labels.__getitem__,
                               key="deg_graph_model")
    pairs = bases[which].pairs()
    pair = _state.kept_choice(c2.selectbox, "Between layers", list(pairs), format_func=lambda p: f"{p[0]} → {p[1]}", key="deg_pair")
    figures.append(plots.interaction_graph_figure(bases[which], pair))
    st.plotly_chart(figures[-1], width="stretch", key="deg_graph")
else:
    st.info("Pick a layer before the output to build the interaction basis.")

st.subheader("Local learning coefficient (optional)")
llcs = []
if st.toggle("Estimate the LLC by SGLD (hyper-parameter sensitive)", key="deg_llc", persist_state="session", help=HELP["llc"]):
    c1, c2, c3 = st.columns(3)
    step = c1.select_slider("Step size ε", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], 1e-4, key="deg_llc_step", persist_state="session")
    gamma = c2.select_slider("Localization γ", [1.0, 10.0, 100.0, 1000.0], 100.0, key="deg_llc_gamma", persist_state="session")
    steps = c3.number_input("Steps per chain", 50, 5000, 300, 50, key="deg_llc_steps", persist_state="session")
    settings = {"step_size": step, "localization": gamma, "n_steps": int(steps), "n_burnin": int(steps) // 3}
    with _state.guard():
        llcs = [with_progress(f"SGLD for {m.name}", dg.llc_estimate, m, dataset, **settings) for m in models]
    for col, r in zip(st.columns(len(llcs)), llcs):
        col.metric(f"LLC ({r.model})", f"{r.llc:.2f} ± {r.llc_std:.2f}", help=HELP["llc"])
    st.caption(f"Hyper-parameters: {llcs[0].hyperparameters()}. ± is the spread over chains, not the bias.")
    for r in llcs:
        if not r.settled:
            st.warning(_state.plain(
                f"The loss of {r.model}'s chains still moved after burn-in (the second half of the kept steps differs "
                f"from the first by {r.drift:+.0%} ± {r.drift_se:.0%} of the excess loss the estimate is made of), so its LLC has not "
                "settled: try more steps, a larger localization γ or a smaller step size, and compare settled "
                "estimates only."))
    figures.append(plots.llc_trace_figure(*llcs))
    st.plotly_chart(figures[-1], width="stretch", key="deg_llc_trace")

_state.report_button("Degeneracy", act_ranks + grad_ranks + relus + summaries + bases + llcs, figures, key="deg_report",
                     notes=" ".join(caveats))
