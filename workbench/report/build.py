"""Analysis reports: one self-contained HTML file, the numbers as JSON, the arrays as NPZ, optionally PDF.

The HTML embeds plotly.js once and every figure as a ``div``, so it opens offline with interactive
figures. ``report.json`` (schema version ``SCHEMA_VERSION``) holds the header and, per section,
the result's fields; ``arrays.npz`` holds every numeric array, readable with ``allow_pickle=False``. An array
of more than ``INLINE_MAX`` entries appears in ``report.json`` as ``{"npz": key, "shape": [...], "dtype": ...}``,
with ``key`` its name in ``arrays.npz``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from workbench.errors import ParameterError, WorkbenchError

PNG_WIDTH = 1200  # pixels of a static figure without a width of its own: the width the HTML report gives it
SCHEMA_VERSION = "1.2"  # 1.1: header and sections record "extraction" (pooling, layers); 1.2: large arrays by their npz key
INLINE_MAX = 1024  # report.json writes out numeric arrays up to this many entries; larger ones are in arrays.npz only
FORMATS = ("html", "json", "npz", "pdf", "png")
PACKAGES = ("representation-workbench", "torch", "numpy", "scipy", "scikit-learn", "umap-learn", "gudhi", "plotly",
            "safetensors", "streamlit")


REPORT_FILES = ("report.html", "report.json", "arrays.npz", "report.pdf")  # what Report.save writes into its folder, with figures/


class PdfUnavailableError(WorkbenchError):
    """No headless browser to print the PDF with."""


class StaticImageUnavailableError(WorkbenchError):
    """No kaleido (or no browser for it) to draw figures as PNG."""


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if 9999.5 <= abs(value) < 1e15:  # whole digits rather than 1.235e+04 (from what .4g would round up to 1e+04)
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def params_text(params: Any) -> str:
    """A result's parameters as one line: ``name = value`` pairs, floats to 4 significant digits, nested mappings
    (such as a range per layer) in braces."""
    if not isinstance(params, Mapping):
        return _format_value(params)

    def value(v: Any) -> str:
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return _format_value(v)

    return ", ".join(f"{k} = {value(v)}" for k, v in params.items())


def summary_rows(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A section's headline numbers as (name, value) rows: nested names joined by " / ", floats to 4 significant digits
    (whole digits with thousands separators from 10,000)."""
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        name = f"{prefix} / {key}" if prefix else str(key)
        if isinstance(value, Mapping):
            rows += summary_rows(value, name)
        else:
            rows.append((name, _format_value(value)))
    return rows


def _leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, str(k)))]
    return [(path, value)]


def summary_tables(summary: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """A section's headline numbers as tables ``(caption, column names, rows)``: a group whose numbers sit two or
    more levels down (model / layer / statistic, method / split / barrier) becomes a table with a row per path and a
    column per statistic; single numbers and one-level groups stay (name, value) rows of a first table."""
    plain: list[list[str]] = []
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    for key, value in summary.items():
        leaves = _leaves(value) if isinstance(value, Mapping) else []
        if not leaves or len({len(path) for path, _ in leaves}) != 1 or len(leaves[0][0]) < 2:
            plain += [[name, text] for name, text in summary_rows({key: value})]
            continue
        columns = list(dict.fromkeys(path[-1] for path, _ in leaves))
        records: dict[tuple[str, ...], dict[str, str]] = {}
        for path, leaf in leaves:
            records.setdefault(path[:-1], {})[path[-1]] = _format_value(leaf)
        rows = [[" / ".join(rec), *(cells.get(c, "") for c in columns)] for rec, cells in records.items()]
        tables.append((str(key), columns, rows))
    return ([("", [], plain)] if plain else []) + tables


@dataclass
class Section:
    """One analysis in a report: its title, result, figures and the code that recreates it."""

    title: str
    result: Any
    figures: list[go.Figure] = field(default_factory=list)
    snippet: str = ""
    notes: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    models: Sequence[Any] = ()  # the models this section analysed (LoadedModel or anything with name/sha256)
    dataset: Any = None  # the dataset it ran on
    train_dataset: Any = None  # the data it trained, matched or fitted statistics on, where that was another dataset
    extraction: dict[str, Any] = field(default_factory=dict)  # pooling and layers of the activations it read, when known

    def record(self, *, inline_max: int | None = None, npz_prefix: str = "") -> dict[str, Any]:
        """The section as JSON-safe data. ``inline_max``: numeric arrays of more entries than this are referred to by
        their key in :meth:`arrays` after ``npz_prefix`` (see :meth:`Result.to_dict`) instead of written out."""
        from workbench.analyses._result import _jsonable

        def result_dict(prefix: str, r: Any) -> Any:
            if not hasattr(r, "to_dict"):
                return _jsonable(r)
            return r.to_dict(inline_max=inline_max, npz_prefix=npz_prefix + prefix) if hasattr(r, "arrays") else r.to_dict()

        return {
            "title": self.title,
            "models": [_describe(m) for m in self.models if m is not None],
            "dataset": _describe_dataset(self.dataset),
            "train_dataset": _describe_dataset(self.train_dataset),
            "extraction": _jsonable(dict(self.extraction)),
            "summary": _jsonable(self.summary),
            "results": [result_dict(prefix, r) for prefix, r in self._results()],
            "snippet": self.snippet,
            "notes": self.notes,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, r in self._results():
            if hasattr(r, "arrays"):
                out.update(r.arrays(prefix=prefix))
        return out

    def _results(self) -> list[tuple[str, Any]]:
        """Each result with the prefix of its arrays' keys: ``"i/"`` when the section holds several, else none."""
        results = self.result if isinstance(self.result, (list, tuple)) else [self.result]
        return [(f"{i}/" if len(results) > 1 else "", r) for i, r in enumerate(results)]


def _section_prefix(i: int) -> str:
    """The prefix of the keys in ``arrays.npz`` of the section at index ``i``, numbered from 1 as the report counts them."""
    return f"section{i + 1:02d}/"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return found


def _describe(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    return {"name": getattr(model, "name", str(model)), "sha256": getattr(model, "sha256", ""),
            "content_sha256": getattr(model, "content_sha256", ""),
            "n_parameters": getattr(model, "n_parameters", None), "format": getattr(model, "source_format", "")}


def _describe_dataset(dataset: Any) -> dict[str, Any]:
    if dataset is None:
        return {}
    return {"name": getattr(dataset, "name", str(dataset)), "n_samples": getattr(dataset, "n_samples", None),
            "sha256": getattr(dataset, "sha256", "")}


def _roles(model: dict[str, Any], sections: list[Section]) -> str:
    """Which sections call ``model`` A and which B ("A in sections 1-3; B in section 4; member in section 5"): a report's
    sections may each compare another pair, and name the models by their place in the pair."""
    key = str(model.get("content_sha256") or model.get("sha256") or model.get("name"))
    places: dict[str, list[int]] = {}
    for number, section in enumerate(sections, start=1):
        for i, m in enumerate(section.models):
            d = _describe(m)
            if m is not None and str(d.get("content_sha256") or d.get("sha256") or d.get("name")) == key:
                # A and B name the two places of a compared pair; the models of a section of more (a merge's
                # members) are members, none of them B
                places.setdefault("AB"[i] + " " if len(section.models) <= 2 else "member ", []).append(number)
    return "; ".join(f"{role}in section{'s' if len(numbers) > 1 else ''} {_ranges(sorted(set(numbers)))}"
                     for role, numbers in places.items())


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` as "1–3, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _distinct(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Descriptions in first-seen order, one per model (weights and structure) or dataset hash; the same model
    under several names keeps every name ("upload (also mlp_seed0)"), so that each name a section shows is in the
    header. The same weights under two architectures are two models."""
    seen: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for d in items:
        first, names = seen.setdefault(str(d.get("content_sha256") or d.get("sha256") or d.get("name")), (dict(d), []))
        if d.get("name") and d["name"] not in names:
            names.append(d["name"])
    out = []
    for first, names in seen.values():
        if len(names) > 1:
            first["name"] = f"{names[0]} (also {', '.join(names[1:])})"
        out.append(first)
    return out


def _extraction_text(extraction: Mapping[str, Any]) -> str:
    """``{"pooling": "mean", "layers": {"A": ["fc1"]}}`` as "pooling 'mean' · layers of A: fc1", for the page."""
    parts = [f"pooling '{extraction['pooling']}'"] if extraction.get("pooling") else []
    layers = extraction.get("layers")
    if isinstance(layers, Mapping):
        parts += [f"layers of {k}: {_format_value(v)}" for k, v in layers.items() if v]
    elif layers:
        parts.append(f"layers: {_format_value(layers)}")
    parts += [f"{k}: {_format_value(v)}" for k, v in extraction.items() if k not in ("pooling", "layers")]
    return " · ".join(parts)


def _device_name(device: str | None = None) -> str:
    """``device`` (default: the best available) with the hardware behind it."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        except (RuntimeError, AssertionError, ValueError):  # a device this machine does not have (a report made elsewhere)
            return device
    if device == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device


def _devices_used(sections: Sequence[Section]) -> str:
    """The devices the sections' results record they ran on, else the best available one."""
    used: list[str] = []
    for s in sections:
        for r in s.result if isinstance(s.result, (list, tuple)) else [s.result]:
            device = getattr(r, "device", None)
            if isinstance(device, str) and device and device not in used:
                used.append(device)
    return ", ".join(_device_name(d) for d in used) if used else _device_name()


@dataclass
class Report:
    """A titled collection of sections with a header saying what was analysed and how."""

    title: str
    sections: list[Section]
    header: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe data (``report.json``): arrays of more than ``INLINE_MAX`` entries are referred to by
        their key in :meth:`arrays` (``arrays.npz``)."""
        return {"schema_version": SCHEMA_VERSION, "header": self.header,
                "sections": [s.record(inline_max=INLINE_MAX, npz_prefix=_section_prefix(i)) for i, s in enumerate(self.sections)]}

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, section in enumerate(self.sections):
            for key, arr in section.arrays().items():
                out[_section_prefix(i) + key] = np.asarray(arr)
        return out

    def to_html(self, *, for_print: bool = False) -> str:
        """The report as one self-contained HTML page: header, and per section its models and data, estimator
        lines, key numbers, interactive figures (one embedded copy of plotly.js) and the code that recreates it.

        ``for_print``: the page to print (the PDF): every ``<details>`` block (each section's code, the header as JSON)
        is open, where the interactive page keeps them collapsed."""
        from jinja2 import Environment, PackageLoader
        from plotly.offline import get_plotlyjs

        env = Environment(loader=PackageLoader("workbench.report", "templates"), autoescape=True)  # every name and title is text
        sections = []
        for i, s in enumerate(self.sections):
            figs = [f.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{i}-{j}",
                              config={"displaylogo": False, "responsive": True}) for j, f in enumerate(s.figures)]
            record = s.record(inline_max=0)  # the page shows no arrays: none is written out
            params: list[dict[str, Any]] = []
            for r in record["results"]:  # one line per distinct estimator (two models' results usually share one)
                line = {k: r.get(k) for k in ("estimator", "n_samples", "params", "seed", "device", "dtype")
                        if isinstance(r, dict) and k in r}
                if line.get("params"):
                    line["params"] = params_text(line["params"])
                if line not in params:
                    params.append(line)
            sections.append({"index": i, "title": s.title, "figures": figs, "params": params, "snippet": s.snippet,
                             "notes": s.notes, "models": record["models"], "dataset": record["dataset"],
                             "train_dataset": record["train_dataset"], "extraction": _extraction_text(record["extraction"]),
                             "summary": summary_tables(record["summary"])})
        return env.get_template("report.html.j2").render(
            title=self.title, header=self.header, sections=sections, plotlyjs=get_plotlyjs(),
            header_json=json.dumps(self.header, indent=2), extraction=_extraction_text(self.header.get("extraction") or {}),
            for_print=for_print,
        )

    def save(self, path: str | Path, formats: Sequence[str] = ("html", "json", "npz")) -> dict[str, Path]:
        """Write the report into folder ``path``: ``report.html``, ``report.json``, ``arrays.npz``, ``report.pdf``
        and ``figures/*.png``. Files of these names left in the folder by an earlier report are removed
        first, so the folder never mixes two reports; other files are left alone.

        ``"pdf"`` needs a headless Chromium (playwright, or a ``chromium`` binary on the PATH); without
        one it raises :class:`PdfUnavailableError` after the other formats are written. ``"png"`` also
        needs kaleido (:class:`StaticImageUnavailableError` otherwise).
        """
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ParameterError(f"Unknown report format(s) {unknown}; choose from {', '.join(FORMATS)}.")
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ParameterError(f"'{folder}' is a file; a report is saved into a folder: give a folder path.")
        try:
            return self._save(folder, formats)
        except OSError as exc:
            raise ParameterError(f"The report could not be written into '{folder}' ({exc.strerror or type(exc).__name__}"
                                 f"{f': {exc.filename}' if exc.filename else ''}); give a folder you can write to.") from exc

    def _save(self, folder: Path, formats: tuple[str, ...]) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [folder / f for f in REPORT_FILES] + sorted((folder / "figures").glob("section*-fig*.png")):
            old.unlink(missing_ok=True)
        written: dict[str, Path] = {}
        if "html" in formats or "pdf" in formats:
            written["html"] = folder / "report.html"
            written["html"].write_text(self.to_html(), encoding="utf-8")
        if "json" in formats:
            written["json"] = folder / "report.json"
            written["json"].write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        if "npz" in formats:
            written["npz"] = folder / "arrays.npz"
            np.savez_compressed(written["npz"], **self.arrays())
        if "png" in formats:
            written.update(self.save_png(folder / "figures"))
        if "pdf" in formats:
            with tempfile.TemporaryDirectory() as tmp:  # the page to print: code and header JSON shown, not collapsed
                printed = Path(tmp) / "report.html"
                printed.write_text(self.to_html(for_print=True), encoding="utf-8")
                written["pdf"] = html_to_pdf(printed, folder / "report.pdf")
        return written

    def save_png(self, folder: Path, *, scale: float = 2.0) -> dict[str, Path]:
        """Every figure as a static PNG (``sectionNN-figM.png``) through kaleido and a headless Chromium."""
        try:
            import kaleido  # noqa: F401
        except ImportError as exc:
            raise StaticImageUnavailableError(
                "PNG export needs the 'kaleido' package: pip install 'representation-workbench[report]' "
                "(and a Chromium, e.g. 'apt-get install chromium'); the HTML report keeps the figures interactive."
            ) from exc
        if find_chromium() is None:
            raise StaticImageUnavailableError(
                "PNG export needs a headless Chromium and none was found; install one (e.g. 'apt-get install chromium')."
            )
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for i, section in enumerate(self.sections):
            for j, fig in enumerate(section.figures):
                path = folder / f"section{i + 1:02d}-fig{j + 1}.png"  # numbered from 1, as the report counts sections
                # as wide as the report shows it (kaleido's default 700 px cut long titles and wrapped table rows out of view)
                path.write_bytes(fig.to_image(format="png", width=fig.layout.width or PNG_WIDTH, scale=scale))
                written[f"png/{path.name}"] = path
        return written

    def zip_bytes(self, formats: Sequence[str] = ("html", "json", "npz")) -> bytes:
        """The saved files in one zip archive (for a download button)."""
        with tempfile.TemporaryDirectory() as tmp:
            files = self.save(tmp, formats)
            buf = tempfile.SpooledTemporaryFile()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in files.values():
                    zf.write(f, f.relative_to(tmp))
            buf.seek(0)
            return buf.read()


def build_report(results: Sequence[Section | tuple[str, Any, list[go.Figure]]], *, title: str = "Representation analysis",
                 models: Sequence[Any] = (), dataset: Any = None, command: str = "",
                 extraction: Mapping[str, Any] | None = None) -> Report:
    """Assemble a report from sections (``Section`` or ``(title, result, figures)`` tuples). A section
    without a ``summary`` gets the key numbers of its result (:func:`workbench.registry.summarize`).

    The header records the models (names and weight hashes), the dataset (name, n, hash), the date,
    package versions, the device and, when given, the command that recreates the whole report.
    ``models`` are labelled A and B in the header; without them, the header lists every model the
    sections name (numbered). ``header["dataset"]`` is ``dataset`` or the one all sections ran on;
    ``header["datasets"]`` lists every dataset the report used, the sections' training data included.

    ``extraction``: how the layer activations were extracted, ``{"pooling": "mean", "layers": {"A": [...], "B":
    [...]}}`` (pooling: how conv maps and token sequences become one vector per sample, see
    :func:`~workbench.extract`); ``header["extraction"]`` is ``extraction``, else the one setting that every section
    recording one (``Section.extraction``) shares, else ``{}`` (each section says its own).
    """
    if isinstance(results, Section) or (isinstance(results, tuple) and results and isinstance(results[0], str)) \
            or not isinstance(results, Sequence):
        results = [results]  # one section on its own
    for s in results:
        if not (isinstance(s, Section) or (isinstance(s, (tuple, list)) and 2 <= len(s) <= 3 and isinstance(s[0], str))):
            raise ParameterError(
                f"Each report section is a Section or a (title, result, figures) tuple; got {type(s).__name__}. "
                "Wrap a result with its title: build_report([('CKA', result, [figure])])."
            )
    sections = [s if isinstance(s, Section) else Section(*s) for s in results]
    if not sections:
        raise ParameterError("A report needs at least one analysis section, such as build_report([('CKA', result, [figure])]).")
    for s in sections:
        figures = s.figures if isinstance(s.figures, (list, tuple)) else [s.figures]
        wrong = next((f for f in figures if not isinstance(f, go.Figure)), None)
        if wrong is not None:
            raise ParameterError(
                f"Section '{s.title}' holds a {type(wrong).__name__} among its figures; give plotly figures, such as the "
                "workbench.plots functions return."
            )
        s.figures = list(figures)
        if not s.summary:  # a section made by hand gets the key numbers the registry's sections carry
            from workbench.registry import summarize

            s.summary = summarize(s.result)
    from workbench.analyses._result import _jsonable

    described = [_describe(m) for m in models if m is not None]
    if described:
        labels = ["A", "B"] if len(described) <= 2 else [str(i + 1) for i in range(len(described))]
    else:
        described = _distinct([_describe(m) for s in sections for m in s.models if m is not None])
        labels = [str(i + 1) for i in range(len(described))]
        described = [{**d, "roles": _roles(d, sections)} for d in described]  # the A or B each section calls it
    data = _describe_dataset(dataset)
    used = _distinct([d for d in [data] + [_describe_dataset(x) for s in sections for x in (s.dataset, s.train_dataset)] if d])
    if not data:
        shared = _distinct([d for s in sections if (d := _describe_dataset(s.dataset))])
        data = shared[0] if len(shared) == 1 else {}
    if extraction is not None and not isinstance(extraction, Mapping):
        raise ParameterError(f"The 'extraction' of build_report is a dict such as {{'pooling': 'mean'}}; got {type(extraction).__name__}.")
    if extraction is None:
        settings = [s.extraction for s in sections if s.extraction]
        extraction = settings[0] if settings and all(x == settings[0] for x in settings) else {}
    header = {
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": [{**d, "label": label} for d, label in zip(described, labels)],
        "dataset": data,
        "datasets": used,
        "versions": _versions(),
        "device": _devices_used(sections),
        "platform": f"{platform.system()} {platform.release()} / Python {sys.version.split()[0]}",
        "extraction": _jsonable(dict(extraction)),
        "command": command,
    }
    return Report(title=title, sections=sections, header=header)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def html_to_pdf(html_path: Path, pdf_path: Path) -> Path:
    """Print an HTML file to PDF with headless Chromium (through playwright when installed). A report prints
    :meth:`Report.to_html` ``(for_print=True)``, whose ``<details>`` are open; through playwright any page's are."""
    chromium = find_chromium()
    if chromium is None:
        raise PdfUnavailableError(
            "PDF export needs a headless Chromium and none was found; install one (e.g. 'apt-get install chromium') "
            "or use the HTML report, which prints to PDF from any browser."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000",
               f"--print-to-pdf={pdf_path}", "--no-pdf-header-footer", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return pdf_path
    def render() -> None:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page()
                page.goto(html_path.resolve().as_uri(), wait_until="load")
                page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")  # print what they hide
                page.wait_for_timeout(500)
                page.pdf(path=str(pdf_path), format="A4", print_background=True)
            finally:
                browser.close()

    # playwright's sync API refuses to run in a thread with an asyncio loop (a notebook, a server): use a fresh one
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(render).result()
    return pdf_path
