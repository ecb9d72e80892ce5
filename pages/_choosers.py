"""The model and dataset choosers (on the "Models & data" page) and the sidebar summary on every page."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import streamlit as st

from pages._state import (
    BUILTIN_DATASETS,
    DATASET,
    DEFAULT_A,
    DEFAULT_B,
    MODEL_A,
    MODEL_B,
    NONE,
    UPLOAD,
    load_builtin_dataset,
    load_sample_model,
    load_uploaded_dataset,
    load_uploaded_model,
    max_upload_mb,
    plain,
    sample_model_names,
    show_error,
    trust_allowed,
)
from workbench.errors import FileTooLargeError, MissingArchitectureError


def _check_size(name: str, data: bytes) -> None:
    if len(data) > max_upload_mb() << 20:
        raise FileTooLargeError(f"'{name}' is {len(data) / 2**20:.0f} MiB, above this server's {max_upload_mb()} MiB upload limit.")


def _model_chooser(slot: str, label: str, default: str, *, optional: bool) -> None:
    names = sample_model_names()
    options = ([NONE] if optional else []) + names + [UPLOAD]
    current = st.session_state.get(slot)
    kept = None
    if slot in st.session_state:  # set by code (a notebook, a test) or by an earlier run
        if current is None:
            default = NONE if optional else default
        elif current.name in names and current.sha256 == load_sample_model(current.name).sha256:
            default = current.name
        else:
            kept = f"{current.name} (loaded)"
            options.insert(0, kept)
            default = kept
    index = options.index(default) if default in options else 0
    choice = st.selectbox(label, options, index=index, key=f"{slot}_choice",
                                  help="A bundled sample model, or your own checkpoint.")
    if choice == kept:
        return
    if choice == NONE:
        st.session_state[slot] = None
        return
    if choice != UPLOAD:
        try:
            st.session_state[slot] = load_sample_model(choice)
        except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
            show_error(exc)
        return
    upload = st.file_uploader(
        f"Checkpoint for {label.split(' (')[0]}", key=f"{slot}_upload",  # any file: a wrong type gets the loader's sentence
        help="safetensors (spec in metadata), a state dict (.pt/.pth/.bin) with an architecture spec, or a zipped Hugging Face folder.",
    )
    arch = st.text_area("Architecture spec (JSON), for state dicts without one", key=f"{slot}_arch",
                                placeholder='{"type": "mlp", "sizes": [64, 512, 512, 10], "activation": "relu"}')
    trust = False
    if trust_allowed():
        trust = st.checkbox(
            "I trust this file", key=f"{slot}_trust", value=False,
            help="Only for a full pickle (a whole nn.Module saved with torch.save): opening it runs the code inside it on "
                 "this server with the server's rights. The separate process it is opened in keeps it out of the app, not "
                 "off the machine; only its weights and stock torch.nn layers come back.",
        )
        st.caption("Opening a pickle runs the code inside it, with this server's rights.")  # the risk in full, not cut off as a long label is
    if upload is None:
        st.session_state[slot] = None
        return
    data = upload.getvalue()
    try:
        _check_size(upload.name, data)
        st.session_state[slot] = load_uploaded_model(data, upload.name, arch.strip() or None, trust)
    except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
        st.session_state[slot] = None
        show_error(exc)
        suggested = getattr(exc, "suggested", None)  # the spec the weights' shapes suggest
        if isinstance(exc, MissingArchitectureError) and suggested:
            st.button("Use the suggested spec", key=f"{slot}_use_spec", on_click=_fill_spec, args=(slot, suggested),
                      help="Puts the spec the weights' shapes suggest in the box above; check its activation.")


def _fill_spec(slot: str, spec: dict) -> None:
    st.session_state[f"{slot}_arch"] = json.dumps(spec)


def _dataset_chooser() -> None:
    options = list(BUILTIN_DATASETS) + [UPLOAD]
    current = st.session_state.get(DATASET)
    kept = None
    index = 0
    if current is not None:
        builtin = next((label for label, (name, split) in BUILTIN_DATASETS.items()
                        if current.name.startswith(name) and current.info.get("split") == split), None)
        if current.name.startswith("blobs"):
            builtin = "blobs (synthetic)"
        if builtin is None:
            kept = f"{current.name} (loaded)"
            options.insert(0, kept)
        index = options.index(builtin) if builtin else 0
    choice = st.selectbox("Dataset", options, index=index, key="dataset_choice",
                          help="A bundled dataset, or your own arrays.")
    if choice == kept:
        return
    try:
        if choice == UPLOAD:
            upload = st.file_uploader("Dataset file (.npz, .csv, .pt)", key="dataset_upload",
                                      help="Arrays 'x' and optional labels 'y'; CSV with an optional 'label' column.")
            if upload is None:
                st.session_state[DATASET] = None
                return
            data = upload.getvalue()
            _check_size(upload.name, data)
            st.session_state[DATASET] = load_uploaded_dataset(data, upload.name)
            return
        name, split = BUILTIN_DATASETS[choice]
        options_json = "{}"
        if name == "blobs":
            start = float(current.info.get("separation", 3.0)) if current is not None and current.name.startswith("blobs") else 3.0
            sep = st.slider("Class separation", 0.0, 8.0, start, 0.5, key="blobs_separation",
                            help="Distance of the class centres in units of the within-class standard deviation.")
            options_json = json.dumps({"separation": sep})
        st.session_state[DATASET] = load_builtin_dataset(name, split, options_json)
    except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
        st.session_state[DATASET] = None
        show_error(exc)


def choosers() -> None:
    """Model A, optional model B and the dataset, side by side; the choice is kept in session state."""
    col_a, col_b, col_d = st.columns(3)
    with col_a:
        _model_chooser(MODEL_A, "Model A", DEFAULT_A, optional=False)
    with col_b:
        _model_chooser(MODEL_B, "Model B (optional, to compare)", DEFAULT_B, optional=True)
    a, b = st.session_state.get(MODEL_A), st.session_state.get(MODEL_B)
    if a is not None and b is not None and a.name == b.name and a is not b:
        # pages label and key results by model name: two files called model.safetensors must not merge into one
        st.session_state[MODEL_B] = dataclasses.replace(b, name=f"{b.name} (B)")
    if a is not None and a is b:  # the same file, or the same bundled model, chosen twice
        st.caption(plain(f"Model B is the same checkpoint as model A ({a.name}): comparisons show a model with itself."))
    with col_d:
        _dataset_chooser()


def ensure_defaults() -> None:
    """Load the bundled default models and dataset the first time a session opens any page."""
    try:
        if MODEL_A not in st.session_state:
            st.session_state[MODEL_A] = load_sample_model(DEFAULT_A)
        if MODEL_B not in st.session_state:
            st.session_state[MODEL_B] = load_sample_model(DEFAULT_B)
        if DATASET not in st.session_state:
            st.session_state[DATASET] = load_builtin_dataset("digits", "test")
    except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
        show_error(exc)


def sidebar() -> Callable[[], None]:
    """What is loaded, on every page, with a link to change it. Returns the function that writes the
    summary: call it after the page has run, so a model chosen on this run is already in it."""
    st.sidebar.header("Models and data")
    slot = st.sidebar.empty()
    _sidebar_summary(slot.container())  # what was loaded before this run, shown while the page computes
    st.sidebar.page_link("pages/home.py", label="Change models or data", icon=":material/swap_horiz:")
    return lambda: _sidebar_summary(slot.container())


def _sidebar_summary(box: Any) -> None:
    for slot, label in ((MODEL_A, "A"), (MODEL_B, "B")):
        m = st.session_state.get(slot)
        if m is not None:
            box.caption(f"**{label}**: {m.name} · {m.n_parameters:,} parameters · weights sha256 {m.sha256[:12]}, as in reports")
    d = st.session_state.get(DATASET)
    if d is not None:
        box.caption(f"**Data**: {d.name} · {d.n_samples} samples")
