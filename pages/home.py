"""Models & data: what is loaded, the layer tree, where to go next."""

from __future__ import annotations

import json

import streamlit as st

from pages import _choosers, _state
from workbench import LoadedModel
from workbench.activations import tree_order
from workbench.activations.extract import check_inputs
from workbench.errors import WorkbenchError

_state.in_app_shell()

st.title("Representation Workbench")
st.caption("Upload one or two trained checkpoints, see what their layers represent, compare them, export a report.")

_choosers.choosers()
st.divider()
models = _state.current_models()
dataset = st.session_state.get(_state.DATASET)
if not models:
    st.info("Choose model A above: a bundled sample model, or upload a checkpoint.")
    _state.stop()

chosen = [(slot, m) for slot, m in zip("AB", (st.session_state.get(_state.MODEL_A), st.session_state.get(_state.MODEL_B)))
          if m is not None]
if chosen[0][0] == "B":
    st.info("Model A is not chosen: the pages analyse model B alone until it is.")


def _architecture(model) -> str:
    """The spec the weights were loaded into (cut when long), or where the module came from."""
    if model.architecture:
        text = json.dumps(model.architecture)
        return text if len(text) <= 240 else text[:240] + "…"
    return "config.json (transformers)" if model.source_format == "huggingface" else f"the file itself ({model.source_format})"


def _input(model: LoadedModel) -> str:
    if model.source_format == "huggingface" and model.takes_tokens:  # its input_shape is only the probe's length
        most = model.metadata.get("max_positions")
        return "token ids (int64)" + (f", up to {most} per sequence" if most else "")
    return f"{model.input_shape} {str(model.input_dtype).replace('torch.', '')}" if model.input_shape else "unknown"


cols = st.columns(len(chosen))
for col, (slot, model) in zip(cols, chosen):
    with col:
        st.subheader(f"Model {slot}: {model.name}")
        st.metric("Parameters", f"{model.n_parameters:,}")
        meta = {"format": model.source_format, "weights sha256": model.sha256[:16] + "…",
                "architecture": _architecture(model),
                "input": _input(model)}
        if "test_accuracy" in model.metadata:
            trained_on = model.metadata.get("dataset")
            meta[f"test accuracy ({trained_on})" if trained_on else "test accuracy"] = model.metadata["test_accuracy"]
        if model.metadata.get("stored_dtype"):
            rounded = " (rounded)" if "float64" in model.metadata["stored_dtype"] else ""
            meta["weights"] = f"stored as {model.metadata['stored_dtype']}, computed in float32{rounded}"
        if model.metadata.get("description"):
            meta["description"] = model.metadata["description"]
        st.table({"": list(meta), "value": list(meta.values())})
        with _state.guard():
            infos = _state.cached_layer_info(model)
        st.markdown("**Layer tree** (`named_modules()` in forward order, each container above its submodules; "
                    "output shape on a probe batch)")
        st.dataframe(
            [{"layer": "  " * i.depth + i.name, "type": i.type,
              "output shape": str(tuple(i.output_shape)) if i.output_shape is not None else "not run",
              "parameters": i.n_parameters} for i in tree_order(infos)],
            hide_index=True, width="stretch", key=f"layer_tree_{slot}",
            column_config={"parameters": st.column_config.NumberColumn(format="localized")},  # 262,656 as in the total
        )

if dataset is not None:
    st.subheader(f"Dataset: {dataset.name}")
    classes = dataset.n_classes
    if classes:
        present = len(dataset.y.unique())
        labels = f"{present} classes" + (f" (labels {int(dataset.y.min())} to {classes - 1})" if present != classes else "")
    else:
        labels = "no class labels" if dataset.y is None else "continuous targets"
    st.write(f"{dataset.n_samples} sample{'s' if dataset.n_samples != 1 else ''} · input shape {tuple(dataset.x.shape[1:])} · "
             + labels
             + f" · sha256 {dataset.sha256[:12]}")
    if dataset.class_names and classes and list(dataset.class_names) != [str(i) for i in range(len(dataset.class_names))]:
        numbered = ", ".join(f"{i} = {c}" for i, c in enumerate(dataset.class_names[:20]))
        st.caption(_state.plain(f"Classes: {numbered}{', …' if len(dataset.class_names) > 20 else ''}."))
    _state.label_order_caption(dataset)
    for _slot, model in chosen:  # a dataset the models cannot read is said here, not first on an analysis page
        try:
            check_inputs(model, dataset)
        except WorkbenchError as exc:
            st.warning(_state.plain(str(exc)))
st.markdown("Next: **Activation statistics** for a first look, **Similarity (A vs B)** to compare the two models.")
