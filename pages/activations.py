"""Activation statistics per layer, for one model or two side by side."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.analyses.stats import activation_stats, shared_value_ranges
from workbench.plots.activations import layer_histograms, stats_rows

_state.in_app_shell()

st.title("Activation statistics")
models = _state.current_models()
if not models:
    _state.require_models(1)
dataset = _state.require_dataset()

pooling = _state.pooling_picker("act_pooling")
chosen = _state.layer_pickers(models, "act_layers")


def activations(model, slot):
    return _state.cached_activations(model, dataset, chosen[slot], pooling)


extracted = _state.for_each_model(models, activations)
ranges = None
if len(extracted) > 1:  # two models' histograms of a layer on the same bins
    ranges = shared_value_ranges(*(acts for _, acts in extracted))
    _state.record_call(shared_value_ranges, tuple(acts for _, acts in extracted), {}, ranges, "ranges")


def statistics(model, _slot):
    acts = next(a for m, a in extracted if m is model)
    return _state.cached_call(activation_stats, acts, value_ranges=ranges, model=model.name, dataset=dataset.name)


results = [r for _, r in _state.for_each_model([m for m, _ in extracted], statistics)]

SHARES = ("dead units", "constant units", "zeros")  # fractions, shown as percentages with one decimal in every row
rows = [{**row, **{k: 100 * row[k] for k in SHARES}} for r in results for row in stats_rows(r)]
st.dataframe(
    rows, hide_index=True, width="stretch", key="act_table",
    column_config={**{col: st.column_config.NumberColumn(format="%.4g") for col in ("mean", "std (all values)", "min", "max")},
                   "dead units": st.column_config.ProgressColumn("dead units", min_value=0.0, max_value=100.0, format="%.1f %%"),
                   "constant units": st.column_config.NumberColumn(format="%.1f %%"),
                   "zeros": st.column_config.NumberColumn(format="%.1f %%")},
)
unit = ("each channel at each position (token) is a unit" if pooling == "flatten" else
        "each channel is a unit, represented by " + {"mean": "its mean over positions", "max": "its maximum over positions",
                                                   "cls": "its first token", "last": "its last token"}[pooling]
        + ", so a ReLU channel that is zero at some positions but not all is neither zero nor dead there")
st.caption(f"n = {dataset.n_samples} samples of {_state.plain(dataset.name)}; pooling '{pooling}'. Statistics are of the pooled "
           f"values: in a conv map or token sequence {unit} (the Degeneracy page counts each channel at each position). "
           "A dead unit is zero on every sample; a constant unit has zero variance over the dataset.")
fig = layer_histograms(*results)
st.plotly_chart(fig, width="stretch", key="act_hist")
_state.report_button("Activation statistics", results, [fig], key="act_report", pooling=pooling)
