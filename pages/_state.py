"""Session state, cached library calls, error display and the layer/pooling/report widgets shared by all pages.

Session keys (set them in ``AppTest.session_state`` before the first run to drive a page in tests;
missing keys get the bundled defaults: mlp_seed0, mlp_seed1, digits test split):

``model_a``, ``model_b``  -- :class:`workbench.LoadedModel` or None
``dataset``               -- :class:`workbench.Dataset`
``report_sections``       -- list of sections collected with "Add to report"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import streamlit as st
import torch

import workbench as wb
from workbench.activations import POOLINGS, layer_info
from workbench.errors import WorkbenchError

MODEL_A = "model_a"
MODEL_B = "model_b"
DATASET = "dataset"
REPORT = "report_sections"
SHELL = "app_shell_ran"  # set by app.py on every run
SUMMARY = "sidebar_summary_writer"  # set by app.py on every run: writes the sidebar summary once

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "sample_models"
DEFAULT_A = "mlp_seed0"
DEFAULT_B = "mlp_seed1"
UPLOAD = "Upload a file…"
NONE = "(none)"
BUILTIN_DATASETS = {"digits (test split)": ("digits", "test"), "digits (train split)": ("digits", "train"),
                    "blobs (synthetic)": ("blobs", None), "sentences (text)": ("sentences", "test")}
log = logging.getLogger("workbench.app")


def in_app_shell() -> None:
    """Make sure this page runs inside app.py's navigation (every page calls it first).

    Until app.py has called ``st.navigation`` once in the server process, Streamlit runs in its
    legacy pages-folder mode: a first request to a deep link such as ``/compare`` runs that page
    file directly, with the folder's file list as navigation and no default models. A session in
    which app.py has not run yet leaves that mode and starts again through app.py.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(PagesManager, "uses_pages_directory", False) and SHELL not in st.session_state:
        PagesManager.uses_pages_directory = False
        st.rerun()


def max_upload_mb() -> int:
    """Upload limit in MiB: ``$WORKBENCH_MAX_UPLOAD_MB`` or 200."""
    return int(os.environ.get("WORKBENCH_MAX_UPLOAD_MB", "200"))


def trust_allowed() -> bool:
    """Whether the app offers the "I trust this file" switch: only when the server was started with
    ``workbench app --trust-uploads`` (``WORKBENCH_TRUST_UPLOADS=1``). A visitor ticking it would run a file's code
    with the server's rights, so whoever starts the server decides, not whoever can reach it."""
    return os.environ.get("WORKBENCH_TRUST_UPLOADS", "").lower() in ("1", "true", "yes")


def sample_model_names() -> list[str]:
    return sorted(p.stem for p in SAMPLE_DIR.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# cached library calls


@st.cache_resource(show_spinner=False, max_entries=32)
def load_sample_model(name: str) -> wb.LoadedModel:
    return wb.load_model(SAMPLE_DIR / f"{name}.safetensors")


@st.cache_resource(show_spinner=False, max_entries=16)
def load_uploaded_model(data: bytes, filename: str, architecture: str | None, trust: bool) -> wb.LoadedModel:
    return wb.load_model(data, filename=filename, architecture=architecture or None, trust_remote_code=trust,
                         isolate=True, max_bytes=max_upload_mb() << 20)


@st.cache_resource(show_spinner=False, max_entries=16)
def load_builtin_dataset(name: str, split: str | None, options: str = "{}") -> wb.Dataset:
    kwargs = json.loads(options)
    return wb.load_dataset(name, split=split, **kwargs) if split else wb.load_dataset(name, **kwargs)


@st.cache_resource(show_spinner=False, max_entries=16)
def load_uploaded_dataset(data: bytes, filename: str) -> wb.Dataset:
    return wb.load_dataset(data, filename=filename, max_bytes=max_upload_mb() << 20)


CALL_LOG = "_call_log"


def start_call_log() -> None:
    """Begin recording this script run's library calls (the report turns them into Python)."""
    st.session_state[CALL_LOG] = {"lines": [], "imports": {}, "names": {}, "keep": [], "count": {}}


def _bind(log: dict[str, Any], obj: Any, prefix: str, line: str) -> str:
    n = log["count"][prefix] = log["count"].get(prefix, 0) + 1
    var = prefix if prefix in ("model_a", "model_b", "model", "dataset") and n == 1 else f"{prefix}_{n}"
    log["lines"].append(f"{var} = {line}")
    log["names"][id(obj)] = var
    log["keep"].append(obj)
    _name_parts(log, obj, var)
    return var


def _name_parts(log: dict[str, Any], obj: Any, var: str) -> None:
    """Name what later calls may take out of ``obj``: an activations' layers, a dataset's ``x`` and ``y``, and the
    datasets, activations and arrays of a tuple (such as the parts of ``train_test_split``)."""
    if isinstance(obj, wb.Activations):
        for layer in obj.layers:
            log["names"][id(obj[layer])] = f"{var}[{layer!r}]"
    if isinstance(obj, wb.Dataset):
        log["names"][id(obj.x)] = f"{var}.x"
        if obj.y is not None:
            log["names"][id(obj.y)] = f"{var}.y"
    if isinstance(obj, tuple):  # only objects of their own: small numbers, strings and None are shared by everyone
        for i, item in enumerate(obj):
            if isinstance(item, (wb.Dataset, wb.Activations, np.ndarray, torch.Tensor)):
                log["names"][id(item)] = f"{var}[{i}]"
                _name_parts(log, item, f"{var}[{i}]")


def _expression(log: dict[str, Any], value: Any) -> str:
    """Python for an argument: a name bound earlier in the log, a literal, or a loaded model/dataset."""
    from workbench.registry import dataset_expression, model_expression

    if id(value) in log["names"]:
        return log["names"][id(value)]
    if isinstance(value, wb.LoadedModel):
        prefix = "model_a" if value is st.session_state.get(MODEL_A) else "model_b" if value is st.session_state.get(MODEL_B) else "model"
        log["imports"]["workbench"] = log["imports"].get("workbench", set()) | {"load_model"}
        expression = model_expression(value)
        if "SAMPLE_MODELS" in expression:  # a bundled model, found wherever workbench is checked out
            log["imports"]["workbench.models"] = log["imports"].get("workbench.models", set()) | {"SAMPLE_MODELS"}
        return _bind(log, value, prefix, expression)
    if isinstance(value, wb.Dataset):
        log["imports"]["workbench"] = log["imports"].get("workbench", set()) | {"load_dataset"}
        return _bind(log, value, "dataset", dataset_expression(value))
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if isinstance(value, (np.integer, np.floating)):
        return repr(value.item())
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_expression(log, v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_expression(log, k)}: {_expression(log, v)}" for k, v in value.items()) + "}"
    return _bind(log, value, "value", f"...  # a {type(value).__name__} built by the page")


def record_call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], result: Any, prefix: str) -> None:
    """Add ``result = fn(*args, **kwargs)`` to this run's log of library calls (the report's recreating snippet),
    for a result the page computed or cached in its own way."""
    log = st.session_state.get(CALL_LOG)
    if log is None:
        return
    parts = [_expression(log, a) for a in args]
    parts += [f"{k}={_expression(log, v)}" for k, v in kwargs.items() if k != "progress"]
    log["imports"][fn.__module__] = log["imports"].get(fn.__module__, set()) | {fn.__name__}
    _bind(log, result, prefix, f"{fn.__name__}({', '.join(parts)})")


def call_log_snippet(results: Any) -> str:
    """The Python that recreates this run's library calls up to now, naming the variable(s) behind ``results``."""
    log = st.session_state.get(CALL_LOG)
    if log is None or not log["lines"]:
        return ""
    imports = "\n".join(f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(log["imports"].items()))
    wanted = results if isinstance(results, (list, tuple)) else [results]
    shown = [log["names"][id(r)] for r in wanted if id(r) in log["names"]]
    tail = f"\n# this section: {', '.join(shown)}" if shown else ""
    return f"{imports}\n\n" + "\n".join(log["lines"]) + tail + "\n"


def cached_activations(model: wb.LoadedModel, dataset: wb.Dataset, layers: list[str], pooling: str = "mean") -> wb.Activations:
    """Activations from the on-disk cache (keyed by content hashes), with a progress bar while they are extracted."""
    bar = st.progress(0.0, text=f"Extracting activations of {model.name}…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Extracting activations of {model.name}: {done}/{total} samples")

    try:
        acts = wb.extract(model, dataset, list(layers), pooling=pooling, progress=progress)
    finally:
        bar.empty()
    record_call(wb.extract, (model, dataset, list(layers)), {"pooling": pooling}, acts, "acts")
    return acts


def content_key(value: Any) -> Any:
    """A hashable description of an argument: content hashes for models, data and arrays. Models, datasets and
    activations add their names, which results carry into titles and legends: a result computed for another
    session's upload of the same weights must not show that upload's name."""
    if isinstance(value, wb.Activations):
        return ("activations", value.key, tuple(value.layers), value.model_name, value.dataset_name)
    if isinstance(value, wb.LoadedModel):
        return ("model", value.content_sha256, value.name)
    if isinstance(value, wb.Dataset):
        return ("dataset", value.sha256, value.name)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return ("array", arr.shape, str(arr.dtype), hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(content_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, content_key(v)) for k, v in value.items()))
    if callable(value):
        return ("callable", getattr(value, "__module__", ""), getattr(value, "__qualname__", repr(value)))
    return repr(value)


RESULT_CACHE_SIZE = 128


@st.cache_resource(show_spinner=False)
def _result_store() -> tuple[OrderedDict, threading.Lock]:
    """One process-wide store of analysis results, shared by all sessions."""
    return OrderedDict(), threading.Lock()


def cached_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a library function once per distinct input content; later calls return the stored result.

    Models, datasets, activations and arrays are keyed by their content hashes, other arguments by
    value. ``progress=`` callables are not part of the key, and may draw Streamlit elements.
    """
    key = (f"{fn.__module__}.{fn.__qualname__}", content_key(args),
           content_key({k: v for k, v in kwargs.items() if k != "progress"}))
    store, lock = _result_store()
    with lock:
        hit = key in store
        if hit:
            store.move_to_end(key)
            value = store[key]
    if not hit:
        value = fn(*args, **kwargs)
        with lock:
            store[key] = value
            while len(store) > RESULT_CACHE_SIZE:
                store.popitem(last=False)
    record_call(fn, args, kwargs, value, "result")
    return value


def logged_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a library function without caching (its inputs have no content key) and record it for the report's
    recreate snippet, as :func:`cached_call` does."""
    value = fn(*args, **kwargs)
    record_call(fn, args, kwargs, value, "result")
    return value


@contextmanager
def progress_bar(text: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback ``(done, total)`` drawing a Streamlit progress bar, removed afterwards."""
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{text} {done}/{total}")

    try:
        yield update
    finally:
        bar.empty()


# ---------------------------------------------------------------------------------------------
# errors and prerequisites


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_~$\[\]<])")  # what formats text inside a sentence


def plain(text: str) -> str:
    """``text`` with Markdown's and LaTeX's special characters escaped, so that Streamlit shows it as written
    (a message naming ``__main__`` or a file ``a_b_c.pt`` would otherwise lose its underscores to bold and italics)."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def show_error(exc: BaseException) -> None:
    """One sentence for the user; a traceback only in the server log."""
    if isinstance(exc, WorkbenchError):
        st.error(plain(str(exc)))
    else:
        log.exception("unexpected error in a page")
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        st.error(plain(f"The computation failed unexpectedly ({type(exc).__name__}: {detail}). "
                       "Try other settings; the server log has the details."))


def label_order_caption(dataset: wb.Dataset) -> None:
    """Under a model's accuracy on ``dataset``: how text labels were numbered (the model may use another order)."""
    note = wb.data.label_order_note(dataset)
    if note is not None:
        st.caption(plain(note))


def write_summary() -> None:
    """Write the sidebar summary of this run, once (app.py sets the writer before the page runs)."""
    writer = st.session_state.pop(SUMMARY, None)
    if writer is not None:
        writer()


def stop() -> NoReturn:  # type: ignore[misc]
    """``st.stop()`` after writing the sidebar summary: once a stop is requested, Streamlit writes no more elements."""
    write_summary()
    st.stop()


@contextmanager
def guard() -> Iterator[None]:
    """Show errors raised inside the block with :func:`show_error` and stop the page."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
        show_error(exc)
        stop()


def for_each_model(models: list[wb.LoadedModel], fn: Callable[[wb.LoadedModel, str], Any]) -> list[tuple[wb.LoadedModel, Any]]:
    """``fn(model, slot)`` for model A (slot "a") and B ("b"); a model that fails shows its error and is left out, so
    that a problem of model B does not hide model A's results. Stops the page when no model succeeds."""
    done = []
    for model, slot in zip(models, slots(models)):
        try:
            done.append((model, fn(model, slot)))
        except Exception as exc:  # noqa: BLE001 - a page never shows a traceback
            show_error(exc)
    if not done:
        stop()
    return done


def require_models(n: int = 1) -> tuple[wb.LoadedModel, ...]:
    """Model A (and B when ``n == 2``), or an info box and a stop when they are not chosen."""
    models = [st.session_state.get(MODEL_A), st.session_state.get(MODEL_B)][:n]
    if any(m is None for m in models):
        what = "a model" if n == 1 else "two models (A and B)"
        st.info(f"Choose {what} on the Models & data page first.")
        stop()
    return tuple(models)


def current_models() -> list[wb.LoadedModel]:
    """The chosen models: A, and B when one is chosen (B alone when A could not be loaded)."""
    return [m for m in (st.session_state.get(MODEL_A), st.session_state.get(MODEL_B)) if m is not None]


def slots(models: list[wb.LoadedModel]) -> str:
    """The sidebar slot of each of ``models`` ("a" or "b"), so that model B analysed alone is still called B."""
    a = st.session_state.get(MODEL_A)
    return "".join("a" if m is a and a is not None else "b" for m in models)


def require_dataset() -> wb.Dataset:
    dataset = st.session_state.get(DATASET)
    if dataset is None:
        st.info("Choose a dataset on the Models & data page first.")
        stop()
    return dataset


def default_layers(model: wb.LoadedModel) -> list[str]:
    """Leaf modules worth looking at (no reshapes, dropout or containers)."""
    from workbench import registry

    return registry.default_layers(model, cached_layer_info(model))


@st.cache_resource(show_spinner=False, max_entries=32)
def _layer_info(sha: str, _model: wb.LoadedModel) -> list:
    return layer_info(_model)


def cached_layer_info(model: wb.LoadedModel) -> list:
    return _layer_info(model.content_sha256, model)


def kept_choice(widget: Any, label: str, options: list, key: str, *, index: int = 0, **kwargs: Any) -> Any:
    """A selectbox or radio (``widget``, such as ``st.selectbox`` or ``column.radio``) whose options can change
    with the models: the last choice is restored when the user comes back from another page and it is still
    among the options, else ``index`` is the default."""
    kept_key = f"_kept_{key}"
    if key not in st.session_state and st.session_state.get(kept_key) in options:
        index = options.index(st.session_state[kept_key])
    value = widget(label, options, index=index, key=key, **kwargs)
    st.session_state[kept_key] = value
    return value


def kept_slider(widget: Any, label: str, low: int, high: int, value: int, key: str, **kwargs: Any) -> int:
    """A slider whose range can change with the data: the last value, clamped to the range, is restored when the
    user comes back from another page."""
    kept = st.session_state.get(f"_kept_{key}")
    if key not in st.session_state and isinstance(kept, int):
        value = min(max(kept, low), high)
    chosen = widget(label, low, high, value, key=key, **kwargs)
    st.session_state[f"_kept_{key}"] = chosen
    return chosen


def _restored(key: str, owner: str, options: list, default: list) -> list:
    """The last choice of the widget ``key`` made for the same ``owner`` (such as a model's content hash), less the
    options gone, when the widget is new on this visit of the page (back from another page); else ``default``."""
    kept = st.session_state.get(f"_kept_{key}")
    if kept is not None and kept[0] == owner and key not in st.session_state:
        return [o for o in kept[1] if o in options] or default
    return default


def kept_multiselect(label: str, options: list, default: list, key: str, *, owner: str, **kwargs: Any) -> list:
    """A multiselect whose options change with the model: the last choice for the same ``owner``, less the options
    gone, is restored when the user comes back from another page."""
    default = _restored(key, owner, options, default)
    chosen = st.multiselect(label, options, default=[d for d in default if d in options], key=key, **kwargs)
    st.session_state[f"_kept_{key}"] = (owner, chosen)
    return chosen


def layer_picker(model: wb.LoadedModel, key: str, *, label: str | None = None, default: list[str] | None = None,
                 multi: bool = True) -> list[str]:
    """Pick layers of ``model`` (names with output shapes); returns the chosen names in forward order. The last choice
    for this model is restored when the user comes back from another page."""
    with guard():
        infos = cached_layer_info(model)
    shapes = {i.name: i.output_shape for i in infos if i.output_shape is not None}
    names = list(shapes)
    label = label or f"Layer{'s' if multi else ''} of {model.name}"
    fmt = lambda n: f"{n} · {'×'.join(map(str, shapes[n]))}"  # noqa: E731  (short: the chosen layers show as chips)
    if multi:
        chosen = kept_multiselect(label, names, default or default_layers(model), key, owner=model.content_sha256,
                                  format_func=fmt, help="Modules from named_modules(), in forward order, with output shapes.")
        return [n for n in names if n in chosen]
    default = _restored(key, model.content_sha256, names, default or [])
    pick = default[0] if default else (default_layers(model) or names)[-1]
    picked = [st.selectbox(label, names, index=names.index(pick) if pick in names else 0, format_func=fmt, key=key)]
    st.session_state[f"_kept_{key}"] = (model.content_sha256, picked)
    return picked


def layer_pickers(models: list[wb.LoadedModel], key: str, *, require: bool = True) -> dict[str, list[str]]:
    """One layer picker per model, side by side, keyed ``"a"``/``"b"``; stops the page until each has a layer
    (``require=False``: the caller does, with :func:`require_layers`, such as after the submit button of a form)."""
    chosen = {}
    for col, model, slot in zip(st.columns(len(models)), models, slots(models)):
        with col:
            chosen[slot] = layer_picker(model, key=f"{key}_{slot}", label=f"Layers of {model.name}")
    if require:
        require_layers(chosen)
    return chosen


def require_layers(chosen: dict[str, list[str]]) -> None:
    """An info box and a stop until each model has a layer picked."""
    if not all(chosen.values()):
        st.info("Pick at least one layer for each model.")
        stop()


def pooling_picker(key: str) -> str:
    return st.selectbox("Pooling of conv maps / token sequences", POOLINGS, key=key, persist_state="session",
                        help="How outputs with spatial or token axes become one vector per sample: mean or max over "
                             "positions, flatten everything, the first (cls) or last token.")


def _extraction(pooling: str | None, layers: list[str] | None, layers_b: list[str] | None) -> dict[str, Any]:
    """How a section's activations were extracted, for the report: the pooling rule and, where known, the layers."""
    if pooling is None:
        return {}
    named = {"A": layers, "B": layers_b} if layers_b else {"A": layers}
    return {"pooling": pooling, **({"layers": named} if layers else {})}


def report_button(title: str, result: Any, figures: list, key: str, *, analysis: str | None = None,
                  params: dict[str, Any] | None = None, layers: list[str] | None = None,
                  layers_b: list[str] | None = None, pooling: str | None = None,
                  models: list[wb.LoadedModel] | None = None, dataset: wb.Dataset | None = None,
                  train_dataset: wb.Dataset | None = None, notes: str = "", summary: dict[str, Any] | None = None) -> None:
    """An "Add to report" button collecting ``(title, result, figures)`` for the Report page, with the
    models it analysed (``models``, else model A and B), the dataset (``dataset``, else the sidebar's) and
    the data it trained or matched on where that was another dataset (``train_dataset``), and ``notes``: a caveat
    the page showed, which the exported section repeats. ``summary``: the key numbers, where the registry's own
    summary of the result's type is not the one the page shows.

    With ``analysis`` (a registry name) and its ``params``, the section also carries the Python
    that recreates it. ``pooling`` (and ``layers``, ``layers_b``): how the activations the result read were
    extracted, which the exported section states; None for results of weights or gradients alone.
    """
    if st.button("Add to report", key=key, help="Collect this result and its figures for the exported report."):
        sections = st.session_state.setdefault(REPORT, [])
        models = current_models() if models is None else list(models)
        dataset = st.session_state.get(DATASET) if dataset is None else dataset
        snippet = call_log_snippet(result)
        if analysis is not None and models and dataset is not None:
            from workbench.registry import Context, get_analysis, recreate_snippet

            entry = get_analysis(analysis)
            ctx = Context(model_a=models[0], model_b=models[1] if len(models) > 1 else None, dataset=dataset,
                          layers_a=layers, layers_b=layers_b, pooling=pooling or "mean")
            snippet = recreate_snippet(entry, ctx, {**entry.params, **(params or {})})
        from workbench.registry import summarize

        sections.append({"title": title, "result": result, "figures": figures, "models": [m.name for m in models],
                         "dataset": dataset.name if dataset is not None else "", "snippet": snippet,
                         "model_objects": models, "dataset_object": dataset, "train_dataset_object": train_dataset, "notes": notes,
                         "summary": summarize(result) if summary is None else summary,
                         "extraction": _extraction(pooling, layers, layers_b)})
        st.toast(f"Added '{title}' to the report ({len(sections)} section{'s' if len(sections) != 1 else ''}).")
