"""Reports: HTML with one copy of plotly.js, JSON and NPZ that round-trip the results."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import numpy as np
import pytest
import torch

from workbench import extract
from workbench.analyses.stats import activation_stats
from workbench.errors import ParameterError
from workbench.plots.activations import layer_histograms
from workbench.report import SCHEMA_VERSION, Section, build_report
from workbench.report.build import find_chromium


@pytest.fixture(scope="module")
def stats_report(sample_model, digits_test):
    model = sample_model("mlp_seed0")
    result = activation_stats(extract(model, digits_test, ["fc1", "relu1"]))
    section = Section("Activation statistics", result, [layer_histograms(result)], snippet="activation_stats(acts)")
    other = Section("Second section", result, [layer_histograms(result)])
    return build_report([section, other], title="Test report", models=[model], dataset=digits_test), result


def test_html_has_sections_and_one_plotlyjs(stats_report, tmp_path):
    report, _ = stats_report
    files = report.save(tmp_path, formats=("html",))
    text = files["html"].read_text()
    assert text.count("Activation statistics") >= 2 and "Second section" in text
    assert text.count("plotly.js v") == 1 or text.count("/** @license") <= 2
    assert text.count('<script type="text/javascript">/**') == 1
    assert text.count("Plotly.newPlot") == 2
    assert "mlp_seed0" in text and report.header["models"][0]["sha256"][:16] in text
    assert "digits (test)" in text and "torch" in text


def test_names_and_titles_are_text_not_markup(sample_model, digits_test):
    import dataclasses

    model = dataclasses.replace(sample_model("mlp_seed0"), name="a<i>b")
    result = activation_stats(extract(model, digits_test, ["fc1"]))
    evil = 'A & B <script>document.title="PWNED"</script>'
    text = build_report([Section(evil, result, [layer_histograms(result)], snippet="x = 1 < 2", notes="<u>note</u>",
                                 models=[model], dataset=digits_test)], title=evil).to_html()
    assert "<script>document.title" not in text and "<i>b" not in text and "<u>note" not in text
    assert "<title>A &amp; B &lt;script&gt;document.title=&#34;PWNED&#34;&lt;/script&gt;</title>" in text
    assert "a&lt;i&gt;b" in text and "x = 1 &lt; 2" in text
    assert text.count("Plotly.newPlot") == 1  # the figures stay live


def test_the_header_names_the_devices_the_results_ran_on(stats_report):
    import dataclasses

    report, result = stats_report
    assert report.header["device"].startswith("cuda (" if torch.cuda.is_available() else "cpu (")  # the default device
    elsewhere = dataclasses.replace(result, device="cuda:1")  # as recorded by a run on another device
    on_cpu = dataclasses.replace(result, device="cpu")
    header = build_report([Section("On a GPU", elsewhere), Section("On the CPU", on_cpu)]).header
    assert header["device"].startswith("cuda:1") and ", cpu (" in header["device"]


def test_sections_show_their_key_numbers(sample_model, digits_test, tmp_path):
    from workbench.analyses.mode_connectivity import mode_connectivity
    from workbench.registry import summarize
    from workbench.report.build import summary_rows

    a, b = sample_model("mlp_narrow_seed0"), sample_model("mlp_narrow_seed1")
    result = mode_connectivity(a, b, digits_test, n_points=5, methods=("naive", "weight_matching"))
    assert result.dtype == result.curves["naive"].dtype == "float32"  # the paths' forward passes, as the report line says
    summary = summarize([result, activation_stats(extract(a, digits_test, ["fc1"]))])
    assert list(summary) == ["barriers", "activation statistics"]
    naive = result.barriers["naive"]
    assert summary["barriers"]["naive (as trained)"]["test"]["barrier above the line"] == naive.linear["test"]
    rows = dict(summary_rows(summary))
    assert rows["barriers / naive (as trained) / test / barrier above the line"] == f"{naive.linear['test']:.4g}"
    text = build_report([Section("Mode connectivity", result, summary=summary)], title="t").save(tmp_path, ("html",))["html"].read_text()
    assert "Key numbers: barriers" in text and "<th>accuracy drop</th>" in text  # method / split rows, a column per number
    assert "<td>weight matching / test</td>" in text and f"<td>{naive.linear['test']:.4g}</td>" in text
    by_hand = build_report([("Mode connectivity", result, [])], title="t")  # a bare tuple gets the same key numbers
    assert by_hand.sections[0].summary == summarize(result) and "Key numbers: barriers" in by_hand.to_html()
    from workbench.report.build import summary_tables

    tables = summary_tables({"n": 3, "per layer": {"m": {"fc1": {"mean": 0.5, "dead": 2}, "fc2": {"mean": 1.0}}}})
    assert tables[0] == ("", [], [["n", "3"]])
    assert tables[1] == ("per layer", ["mean", "dead"], [["m / fc1", "0.5", "2"], ["m / fc2", "1", ""]])
    assert summarize([object()]) == {}  # kinds without a summary are left out
    stats = activation_stats(extract(a, digits_test, ["fc1"]))
    twice = build_report([Section("Twice", [stats, stats])], title="t").to_html()
    assert twice.count("<b>Estimator:</b>") == 1  # results sharing an estimator give one line


def test_json_and_npz_round_trip(stats_report, tmp_path):
    report, result = stats_report
    files = report.save(tmp_path, formats=("json", "npz"))
    doc = json.loads(files["json"].read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    first = doc["sections"][0]["results"][0]
    assert first["result_type"] == "ActivationStatsResult"
    assert first["stats"]["fc1"]["mean"] == pytest.approx(result.stats["fc1"].mean)
    assert doc["header"]["dataset"]["n_samples"] == 450
    with np.load(files["npz"], allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["section01/fc1/hist_counts"], result.stats["fc1"].hist_counts)
        np.testing.assert_allclose(arrays["section02/relu1/hist_edges"], result.stats["relu1"].hist_edges)


def test_large_arrays_are_in_the_npz_and_the_json_names_them(stats_report, digits_test, tmp_path):
    from workbench.analyses.embedding import embed
    from workbench.report.build import INLINE_MAX

    _, stats = stats_report
    pca = embed(digits_test.x.numpy(), method="pca", n_components=3)  # 450 x 3 coordinates: in the npz only
    big = {k: v for k, v in pca.arrays().items() if v.size > INLINE_MAX}
    small = {k: v for k, v in pca.arrays().items() if v.size <= INLINE_MAX}
    assert big and small
    report = build_report([Section("Stats", stats), Section("Both", [stats, pca])], title="t")
    files = report.save(tmp_path, formats=("json", "npz"))
    doc = json.loads(files["json"].read_text())
    refs = []

    def find(value):
        if isinstance(value, dict) and set(value) == {"npz", "shape", "dtype"}:
            refs.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                find(v)
        elif isinstance(value, list):
            for v in value:
                find(v)

    find(doc)
    assert sorted(r["npz"] for r in refs) == sorted(f"section02/1/{k}" for k in big)
    with np.load(files["npz"], allow_pickle=False) as arrays:
        for ref in refs:
            assert list(arrays[ref["npz"]].shape) == ref["shape"] and str(arrays[ref["npz"]].dtype) == ref["dtype"]
    field, array = next(iter(small.items()))
    assert np.allclose(doc["sections"][1]["results"][1][field], array)  # small arrays stay in the JSON
    assert not any(isinstance(v, dict) and "npz" in v for v in pca.to_dict().values())  # a result alone writes all out
    assert len(files["json"].read_text()) < 200_000


def test_sections_record_their_models_and_the_header_lists_them_all(sample_model, digits_test, tmp_path):
    from workbench import load_dataset

    a, b, c = (sample_model(n) for n in ("mlp_seed0", "mlp_seed1", "mlp_seed2"))
    result = activation_stats(extract(a, digits_test, ["fc1"]))
    sections = [Section("First", result, models=[a, b], dataset=digits_test),
                Section("Merge", result, models=[a, b, c], dataset=digits_test)]
    doc = build_report(sections).to_dict()
    assert [m["name"] for m in doc["sections"][1]["models"]] == ["mlp_seed0", "mlp_seed1", "mlp_seed2"]
    assert doc["sections"][0]["dataset"]["sha256"] == digits_test.sha256
    header = doc["header"]
    assert [(m["label"], m["name"]) for m in header["models"]] == [("1", "mlp_seed0"), ("2", "mlp_seed1"), ("3", "mlp_seed2")]
    assert header["dataset"]["name"] == digits_test.name  # shared by all sections
    text = build_report(sections).save(tmp_path, formats=("html",))["html"].read_text()
    assert "<b>Models:</b> mlp_seed0 (sha256 " in text and "Model 3" in text
    # the sections each call their pair A and B: the header says which model that was where; the three models of a
    # merge are its members, none of them A or B
    assert [m["roles"] for m in header["models"]] == ["A in section 1; member in section 2",
                                                      "B in section 1; member in section 2", "member in section 2"]
    assert "<td>mlp_seed2 (member in section 2)</td>" in text
    four = build_report([*sections, Section("Other pair", result, models=[c, a]), Section("Again", result, models=[c, a])])
    assert [m["roles"] for m in four.header["models"]] == ["A in section 1; member in section 2; B in sections 3, 4",
                                                           "B in section 1; member in section 2",
                                                           "member in section 2; A in sections 3, 4"]
    from workbench.report.build import _ranges

    assert _ranges([1, 2, 3, 5, 7, 8]) == "1–3, 5, 7, 8"

    train = load_dataset("digits", split="train")
    mixed = build_report([sections[0], Section("Other data", result, models=[a], dataset=train)]).to_dict()
    assert mixed["header"]["dataset"] == {}  # no single dataset: each section says its own
    assert mixed["sections"][1]["dataset"]["name"] == train.name
    assert [d["name"] for d in mixed["header"]["datasets"]] == [digits_test.name, train.name]  # but the header lists both
    matched = build_report([Section("Matched", result, models=[a, b], dataset=digits_test, train_dataset=train)])
    doc = matched.to_dict()
    assert doc["header"]["dataset"]["name"] == digits_test.name and doc["sections"][0]["train_dataset"]["n_samples"] == 1347
    assert [d["sha256"] for d in doc["header"]["datasets"]] == [digits_test.sha256, train.sha256]
    text = matched.to_html()
    assert f"<b>Dataset 2</b></td><td>{train.name}</td>" in text
    assert (f"<b>Data:</b> {digits_test.name} (n = 450) · <b>Also used</b> (training, matching or statistics): {train.name} "
            "(n = 1347)") in text
    assert build_report(sections).to_dict()["sections"][0]["train_dataset"] == {}
    explicit = build_report(sections, models=[a, b]).to_dict()["header"]
    assert [m["label"] for m in explicit["models"]] == ["A", "B"]
    import dataclasses

    upload = dataclasses.replace(a, name="upA")  # the same weights under another name
    both = build_report([Section("Up", result, models=[upload, b]), sections[1]]).to_dict()["header"]
    assert [m["name"] for m in both["models"]] == ["upA (also mlp_seed0)", "mlp_seed1", "mlp_seed2"]


def test_zip_bytes_and_errors(stats_report):
    report, _ = stats_report
    with zipfile.ZipFile(BytesIO(report.zip_bytes())) as zf:
        assert sorted(zf.namelist()) == ["arrays.npz", "report.html", "report.json"]
    with pytest.raises(ParameterError, match=r"Unknown report format\(s\) \['docx'\]"):
        report.save("unused", formats=("docx",))
    with pytest.raises(ParameterError, match=r"A report needs at least one analysis section"):
        build_report([])
    result = report.sections[0].result
    with pytest.raises(ParameterError, match=r"Each report section is a Section or a \(title, result, figures\) tuple; "
                                             r"got ActivationStatsResult. Wrap a result with its title"):
        build_report([result])
    assert len(build_report(("Statistics", result)).sections) == 1  # one section on its own
    with pytest.raises(ParameterError, match=r"Section 'S' holds a str among its figures; give plotly figures"):
        build_report([Section("S", result, ["not a figure"])])
    with zipfile.ZipFile(BytesIO(report.zip_bytes("html"))) as zf:  # one format as a plain string
        assert zf.namelist() == ["report.html"]


def test_saving_into_a_file_path_says_to_give_a_folder(stats_report, tmp_path):
    report, _ = stats_report
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ParameterError, match=r"'.*afile' is a file; a report is saved into a folder: give a folder path\."):
        report.save(afile)


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine")
def test_html_renders_in_chromium_without_console_errors(stats_report, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    report, _ = stats_report
    files = report.save(tmp_path, formats=("html", "pdf"))
    assert files["pdf"].read_bytes()[:4] == b"%PDF"
    errors = []

    def render() -> int:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=find_chromium(),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(files["html"].resolve().as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20000)
            count = page.locator(".js-plotly-plot").count()
            browser.close()
            return count

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:  # a thread without an asyncio loop, as playwright's sync API needs
        n_plots = pool.submit(render).result()
    assert n_plots == 2
    assert not errors


def test_pdf_without_browser_says_how_to_install_one(stats_report, tmp_path, monkeypatch):
    from workbench.report import PdfUnavailableError, build

    monkeypatch.setattr(build, "find_chromium", lambda: None)
    report, _ = stats_report
    with pytest.raises(PdfUnavailableError, match=r"needs a headless Chromium and none was found; install one"):
        report.save(tmp_path, formats=("html", "json", "npz", "pdf"))
    assert (tmp_path / "report.html").exists()  # the other formats never depend on the browser


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine")
def test_figures_as_static_png(stats_report, tmp_path):
    pytest.importorskip("kaleido")
    report, _ = stats_report
    files = report.save(tmp_path, formats=("png",))
    pngs = sorted(p for k, p in files.items() if k.startswith("png/"))
    assert [p.name for p in pngs] == ["section01-fig1.png", "section02-fig1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    width = int.from_bytes(pngs[0].read_bytes()[16:20], "big")  # the IHDR chunk: as wide as the report shows it, at scale 2
    assert width == 2 * 1200


def test_png_without_kaleido_says_what_to_install(stats_report, tmp_path, monkeypatch):
    import builtins

    from workbench.report import StaticImageUnavailableError

    real_import = builtins.__import__

    def no_kaleido(name, *args, **kwargs):
        if name == "kaleido":
            raise ImportError("no kaleido")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kaleido)
    report, _ = stats_report
    with pytest.raises(StaticImageUnavailableError, match=r"PNG export needs the 'kaleido' package"):
        report.save(tmp_path, formats=("png",))


def test_saving_into_a_folder_removes_the_files_of_an_earlier_report(tmp_path):
    report = build_report([Section("numbers", {"value": 1.0}, [])], title="second")
    (tmp_path / "figures").mkdir()
    for old in ("report.pdf", "arrays.npz", "figures/section01-fig1.png", "notes.txt"):
        (tmp_path / old).write_text("from before")
    written = report.save(tmp_path, ("html", "json"))
    assert set(written) == {"html", "json"}
    assert not (tmp_path / "report.pdf").exists() and not (tmp_path / "arrays.npz").exists()
    assert not (tmp_path / "figures" / "section01-fig1.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "from before"  # not a report file


def test_the_printed_page_opens_the_code_and_wraps_long_lines(stats_report, tmp_path, monkeypatch):
    from workbench.report import build

    report, _ = stats_report
    screen = report.to_html()
    assert screen.count("<details>") == 2 and "<details open" not in screen  # the interactive page stays collapsed
    printed = report.to_html(for_print=True)
    assert printed.count("<details") == printed.count("<details open>") == 2
    assert "@media print" in printed and "white-space: pre-wrap; overflow-wrap: anywhere" in printed
    given = []  # what save() hands the printer: the page with its details open, not report.html

    def fake_printer(html_path, pdf_path):
        given.append(html_path.read_text(encoding="utf-8"))
        pdf_path.write_bytes(b"%PDF")
        return pdf_path

    monkeypatch.setattr(build, "html_to_pdf", fake_printer)
    files = report.save(tmp_path, formats=("html", "pdf"))
    assert given and given[0].count("<details open>") == 2 and "activation_stats(acts)" in given[0]
    assert "<details open" not in files["html"].read_text()


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine")
def test_printed_code_and_command_fit_the_page_in_chromium(stats_report, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    report, _ = stats_report
    command = "workbench analyze --model-a " + "/very/long/folder" * 20 + "/mlp_seed0.safetensors --data digits --pdf"
    page_html = tmp_path / "print.html"
    page_html.write_text(build_report(report.sections, title="t", command=command).to_html(for_print=True), encoding="utf-8")

    def measure() -> list[dict]:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=find_chromium(),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 700, "height": 900})  # about an A4 page's printable width
            page.emulate_media(media="print")
            page.goto(page_html.resolve().as_uri())
            found = page.evaluate("""() => [...document.querySelectorAll('pre')].map(e => ({
                text: e.innerText, visible: e.offsetHeight > 0, overflow: e.scrollWidth - e.clientWidth}))""")
            browser.close()
            return found

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:  # a thread without an asyncio loop, as playwright's sync API needs
        blocks = pool.submit(measure).result()
    assert blocks[0]["text"].replace("\n", "") == command  # the command in full, wrapped rather than cut off
    assert any("activation_stats(acts)" in b["text"] for b in blocks)  # a section's code
    assert any('"schema' in b["text"] or '"command"' in b["text"] for b in blocks)  # the header as JSON
    assert all(b["visible"] and b["overflow"] <= 1 for b in blocks), blocks


def test_the_header_states_the_pooling_and_layers(stats_report):
    report, _ = stats_report
    assert report.header["extraction"] == {}  # not given, and no section records one
    sections = report.sections
    setting = {"pooling": "max", "layers": {"A": ["fc1", "relu1"]}}
    made = build_report(sections, title="t", extraction=setting)
    assert made.to_dict()["header"]["extraction"] == setting
    text = made.to_html()
    assert "<td><b>Activations</b></td><td colspan=\"3\">pooling &#39;max&#39; · layers of A: fc1, relu1</td>" in text
    import dataclasses

    cls = dataclasses.replace(sections[0], extraction={"pooling": "cls"})
    last = dataclasses.replace(sections[1], extraction={"pooling": "last"})
    shared = build_report([cls, dataclasses.replace(sections[1], extraction={"pooling": "cls"})], title="t")
    assert shared.header["extraction"] == {"pooling": "cls"}  # the one setting every section records
    mixed = build_report([cls, last], title="t")
    assert mixed.header["extraction"] == {}  # each section says its own
    assert [s["extraction"] for s in mixed.to_dict()["sections"]] == [{"pooling": "cls"}, {"pooling": "last"}]
    text = mixed.to_html()
    assert "<b>Activations:</b> pooling &#39;cls&#39;" in text and "<b>Activations:</b> pooling &#39;last&#39;" in text
    with pytest.raises(ParameterError, match=r"The 'extraction' of build_report is a dict such as \{'pooling': 'mean'\}; got str"):
        build_report(sections, extraction="mean")


def test_large_numbers_read_as_whole_digits():
    from workbench.report.build import summary_rows

    rows = dict(summary_rows({"a": 12345.678, "b": 0.123456, "c": 1e20, "d": -25000.0, "e": 9999.5}))
    assert rows == {"a": "12,346", "b": "0.1235", "c": "1e+20", "d": "-25,000", "e": "10,000"}


def test_a_section_gives_its_parameters_as_name_value_pairs(tmp_path):
    from workbench.report.build import params_text

    assert params_text({"bins": 50, "value_ranges": {"fc1": [-13.450837135314941, 15.166512489318848]}}) == \
        "bins = 50, value_ranges = {fc1: [-13.45, 15.17]}"
    rng = np.random.default_rng(0)
    acts = {"fc1": rng.normal(size=(30, 4))}
    result = activation_stats(acts, value_ranges={"fc1": (-10.0, 10.0)})
    files = build_report([("Statistics", result, [layer_histograms(result)])]).save(tmp_path, formats=("html",))
    assert "<b>parameters:</b> bins = 50, value_ranges = {fc1: [-10, 10]}" in files["html"].read_text()


def test_a_report_folder_that_cannot_be_written_gets_one_sentence(stats_report, tmp_path):
    report, _ = stats_report
    (tmp_path / "report.json").mkdir()
    with pytest.raises(ParameterError, match=rf"^The report could not be written into '{tmp_path}' \(Is a directory: "
                                             rf"{tmp_path}/report.json\); give a folder you can write to\.$"):
        report.save(tmp_path, formats=("json",))
    with pytest.raises(ParameterError, match=r"^The report could not be written into '/proc/qa' \("):
        report.save("/proc/qa", formats=("json",))
