"""Representation Workbench: the Streamlit entry point (``streamlit run app.py`` or ``workbench app``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")

import streamlit as st  # noqa: E402

# (file, title, icon, section)
PAGES = [
    ("pages/home.py", "Models & data", ":material/home:", "Start"),
    ("pages/activations.py", "Activation statistics", ":material/bar_chart:", "Start"),
    ("pages/compare.py", "Similarity (A vs B)", ":material/compare:", "Compare"),
    ("pages/relative.py", "Relative representations", ":material/hub:", "Compare"),
    ("pages/probing.py", "Probing", ":material/target:", "Analyse"),
    ("pages/embedding.py", "Embedding", ":material/scatter_plot:", "Analyse"),
    ("pages/topology.py", "Topology", ":material/bubble_chart:", "Analyse"),
    ("pages/degeneracy.py", "Degeneracy", ":material/grain:", "Analyse"),
    ("pages/mode_connectivity.py", "Mode connectivity", ":material/timeline:", "Weights"),
    ("pages/merge.py", "Model merging", ":material/merge:", "Weights"),
    ("pages/report.py", "Report", ":material/description:", "Export"),
]


@st.cache_resource(show_spinner=False)
def _warm_up_umap() -> threading.Thread:
    """Compile umap-learn's numba code once per server, in the background, so the embedding page does not wait."""
    from workbench.analyses.embedding import warm_up

    thread = threading.Thread(target=warm_up, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


# a local icon: a Material icon name would make the browser fetch the favicon from Google's font servers
ICON = Path(__file__).resolve().parent / "assets" / "icon.png"
st.set_page_config(page_title="Representation Workbench", page_icon=str(ICON), layout="wide")
sections: dict[str, list] = {}
for file, title, icon, section in PAGES:
    sections.setdefault(section, []).append(st.Page(file, title=title, icon=icon, default=file == "pages/home.py"))
navigation = st.navigation(sections)
# the library (torch and the rest) is imported once the navigation is sent: until then a first visit lists the pages/
# folder's files, helper modules included
from pages import _choosers, _state  # noqa: E402

st.session_state[_state.SHELL] = True
_choosers.ensure_defaults()
_state.start_call_log()
st.session_state[_state.SUMMARY] = _choosers.sidebar()
if os.environ.get("WORKBENCH_WARM_UP", "1") == "1":
    _warm_up_umap()
try:
    navigation.run()
finally:  # the summary shows what the page chose on this run (pages that stop early write it in _state.stop())
    _state.write_summary()
