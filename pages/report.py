"""Report: the sections collected with "Add to report", reordered, exported as one zip."""

from __future__ import annotations

import streamlit as st

from pages import _state
from workbench.report import SCHEMA_VERSION, PdfUnavailableError, Section, build_report
from workbench.report.build import find_chromium

_state.in_app_shell()

PAYLOAD = "_report_payload"  # the last zip built, with the sections, title and formats it was built from


def header_models(sections: list[dict]) -> list:
    """Model A, and B where a section analysed it, when the sections analysed no other model: the report's header
    then calls them A and B, as the sidebar does; otherwise none (the header numbers the models the sections name)."""
    a, b = st.session_state.get(_state.MODEL_A), st.session_state.get(_state.MODEL_B)
    used = {m.sha256 for s in sections for m in s.get("model_objects", ()) if m is not None}
    if a is None or a.sha256 not in used or not used <= {a.sha256, getattr(b, "sha256", None)}:
        return []
    return [a, b] if b is not None and b.sha256 in used else [a]


def download_payload(sections: list[dict], title: str, formats: tuple[str, ...]) -> dict:
    """The zip of ``sections`` under ``title`` in ``formats``, built again only when one of them or the models the
    header labels changed (sections are compared by identity: the kept ones stay referenced, and a collected section
    is never edited in place)."""
    kept = st.session_state.get(PAYLOAD)
    models = header_models(sections)
    if (kept is not None and kept["title"] == title and kept["formats"] == formats and len(kept["models"]) == len(models)
            and all(a is b for a, b in zip(kept["models"], models))
            and len(kept["sections"]) == len(sections) and all(a is b for a, b in zip(kept["sections"], sections))):
        return kept
    report = build_report(
        [Section(s["title"], s["result"], s["figures"], snippet=s.get("snippet", ""), models=s.get("model_objects", ()),
                 dataset=s.get("dataset_object"), train_dataset=s.get("train_dataset_object"), summary=s.get("summary", {}),
                 notes=s.get("notes", ""), extraction=s.get("extraction", {}))
         for s in sections],
        title=title, models=models,
    )
    warning = ""
    try:
        data = report.zip_bytes(formats)
    except PdfUnavailableError as exc:
        warning = str(exc)
        data = report.zip_bytes(("html", "json", "npz"))
    kept = {"sections": list(sections), "title": title, "formats": formats, "models": models, "data": data, "warning": warning}
    st.session_state[PAYLOAD] = kept
    return kept


st.title("Report")
sections: list[dict] = st.session_state.setdefault(_state.REPORT, [])
if not sections:
    st.session_state.pop(PAYLOAD, None)
    st.info("No sections yet: open an analysis page and press **Add to report** under its figures.")
    _state.stop()

title = st.text_input("Report title", value="Representation analysis", key="report_title", persist_state="session")
st.caption(f"{len(sections)} section{'s' if len(sections) != 1 else ''}. Reorder with the arrows, remove with ✕.")
for i, section in enumerate(list(sections)):
    cols = st.columns([8, 1, 1, 1])
    train = section.get("train_dataset_object")
    trained = f" (also used: {_state.plain(train.name)})" if train is not None else ""
    cols[0].markdown(f"**{i + 1}. {_state.plain(section['title'])}** · {_state.plain(', '.join(section['models']))} · "
                     f"{_state.plain(section['dataset'])}{trained} · "
                     f"{len(section['figures'])} figure{'s' if len(section['figures']) != 1 else ''}")
    if cols[1].button("↑", key=f"report_up_{i}", disabled=i == 0, help="Move up"):
        sections[i - 1], sections[i] = sections[i], sections[i - 1]
        st.rerun()
    if cols[2].button("↓", key=f"report_down_{i}", disabled=i == len(sections) - 1, help="Move down"):
        sections[i + 1], sections[i] = sections[i], sections[i + 1]
        st.rerun()
    if cols[3].button("✕", key=f"report_remove_{i}", help="Remove from the report"):
        sections.pop(i)
        st.rerun()

with_pdf = st.checkbox("Include a PDF (needs a headless Chromium on the server)", value=False, key="report_pdf", persist_state="session",
                       disabled=find_chromium() is None)
with _state.guard():
    payload = download_payload(sections, title, ("html", "json", "npz", "pdf") if with_pdf else ("html", "json", "npz"))
if payload["warning"]:
    st.warning(_state.plain(payload["warning"]))
st.download_button("Download report (.zip)", data=payload["data"], file_name="workbench-report.zip", mime="application/zip",
                   key="report_download", type="primary")
st.caption("The zip holds report.html (interactive figures, works offline), report.json (numbers, schema "
           f"{SCHEMA_VERSION}), arrays.npz" + (" and report.pdf." if with_pdf else "."))
