"""The Report page: empty state, collected sections, reorder, remove, download."""

from __future__ import annotations

import io
import json
import zipfile

from tests.app.conftest import page_errors


def test_empty_report_explains_what_to_do(app):
    at = app.run()
    at.switch_page("pages/report.py").run()
    assert not page_errors(at)
    assert "Add to report" in at.info[0].value


def test_collect_reorder_remove_download(app):
    at = app.run()
    at.switch_page("pages/activations.py").run()
    at.button(key="act_report").click().run()
    at.switch_page("pages/activations.py").run()
    at.multiselect(key="act_layers_a").set_value(["fc1"]).run()
    at.button(key="act_report").click().run()
    sections = at.session_state["report_sections"]
    assert len(sections) == 2
    at.switch_page("pages/report.py").run()
    assert not page_errors(at)
    assert "1. Activation statistics" in at.markdown[0].value
    first = sections[0]
    at.button(key="report_down_0").click().run()
    assert at.session_state["report_sections"][1] is first
    at.button(key="report_remove_0").click().run()
    assert len(at.session_state["report_sections"]) == 1
    download = at.get("download_button")[0]
    assert download.proto.label == "Download report (.zip)"


def test_report_zip_contents(app):
    from workbench.report import Section, build_report

    at = app.run()
    at.switch_page("pages/activations.py").run()
    at.button(key="act_report").click().run()
    section = at.session_state["report_sections"][0]
    report = build_report([Section(section["title"], section["result"], section["figures"])], title="t")
    with zipfile.ZipFile(io.BytesIO(report.zip_bytes())) as zf:
        doc = json.loads(zf.read("report.json"))
    assert doc["sections"][0]["results"][0]["model"] == "mlp_seed0"
    assert doc["sections"][0]["results"][1]["model"] == "mlp_seed1"
    summary = section["summary"]["activation statistics"]  # the page's table travels with the section
    results = section["result"]
    assert {m: set(layers) for m, layers in summary.items()} == {r.model: set(r.stats) for r in results}
    first = results[0].stats[next(iter(results[0].stats))]
    assert summary[results[0].model][first.layer]["dead units (fraction)"] == first.dead_fraction


def test_sections_from_pages_carry_the_code_that_recreates_them(app, tmp_path, monkeypatch):
    at = app.run()
    at.switch_page("pages/compare.py").run()
    at.button(key="cmp_report").click().run()
    snippet = at.session_state["report_sections"][0]["snippet"]
    assert "run_analysis(\n    'similarity'" in snippet
    # a bundled model is named by where workbench keeps them, not by this server's path: the code runs on any machine
    assert "from workbench.models import SAMPLE_MODELS\n" in snippet
    assert "model_a = load_model(SAMPLE_MODELS / 'mlp_seed0.safetensors')" in snippet and "/sample_models/" not in snippet
    assert "'measure': 'linear_cka'" in snippet
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)  # as from a notebook in another folder
    exec(snippet, namespace)  # noqa: S102 - the snippet reruns the same analysis
    section = namespace["section"]
    import numpy as np

    page_matrix, page_chance = at.session_state["report_sections"][0]["result"]  # the matrix and its chance level
    np.testing.assert_allclose(section.result[0].values, page_matrix.values, atol=1e-12)
    np.testing.assert_allclose(section.result[1].values, page_chance.values, atol=1e-12)  # the same shuffle


def _run_snippet(snippet: str) -> dict:
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the snippet reruns the page's library calls
    return namespace


def test_page_sections_recreate_their_library_calls(app):
    import numpy as np

    at = app.run()
    at.switch_page("pages/probing.py").run()
    at.button(key="probe_report").click().run()
    section = at.session_state["report_sections"][0]
    snippet = section["snippet"]
    assert "from workbench.analyses.probing import probe_layers" in snippet
    assert "acts_1 = extract(model_a, dataset, ['fc1', 'relu1', 'fc2', 'relu2', 'out'], pooling='mean')" in snippet
    names = snippet.rsplit("# this section: ", 1)[1].strip().split(", ")
    namespace = _run_snippet(snippet)
    for name, original in zip(names, section["result"]):
        np.testing.assert_allclose(namespace[name].score, original.score)

    at.switch_page("pages/activations.py").run()
    at.button(key="act_report").click().run()
    section = at.session_state["report_sections"][1]
    namespace = _run_snippet(section["snippet"])
    first = section["snippet"].rsplit("# this section: ", 1)[1].split(", ")[0].strip()
    assert namespace[first].stats["fc1"].mean == section["result"][0].stats["fc1"].mean
    # the shared histogram ranges come from the call that made them, not from a copy of their digits
    import re

    made = re.search(r"\n(ranges_\d+) = shared_value_ranges\(acts_\d+, acts_\d+\)\n", section["snippet"])
    assert made and f"value_ranges={made.group(1)}," in section["snippet"]
    np.testing.assert_array_equal(namespace[first].stats["fc1"].hist_edges, section["result"][0].stats["fc1"].hist_edges)


def test_the_zip_is_built_again_only_when_its_inputs_change(app, monkeypatch):
    import workbench.report as report_module

    built = []
    original = report_module.build_report

    def counted(*args, **kwargs):
        report = original(*args, **kwargs)
        built.append(report)
        return report

    monkeypatch.setattr(report_module, "build_report", counted)
    at = app.run()
    at.switch_page("pages/activations.py").run()
    at.button(key="act_report").click().run()
    at.multiselect(key="act_layers_a").set_value(["fc1"]).run()
    at.button(key="act_report").click().run()
    at.switch_page("pages/report.py").run()
    assert not page_errors(at)
    assert len(built) == 1
    at.run()  # a rerun that changes none of the inputs
    at.switch_page("pages/activations.py").run()
    at.switch_page("pages/report.py").run()  # back from another page
    assert not page_errors(at)
    assert len(built) == 1
    assert at.get("download_button")[0].proto.label == "Download report (.zip)"

    at.text_input(key="report_title").input("Seeds compared").run()
    assert len(built) == 2 and built[-1].title == "Seeds compared"
    first = at.session_state["report_sections"][0]
    at.button(key="report_down_0").click().run()
    assert len(built) == 3 and built[-1].sections[1].title == first["title"]
    with zipfile.ZipFile(io.BytesIO(at.session_state["_report_payload"]["data"])) as zf:
        doc = json.loads(zf.read("report.json"))
        assert sorted(zf.namelist()) == ["arrays.npz", "report.html", "report.json"]
    assert doc["header"]["title"] == "Seeds compared" and len(doc["sections"]) == 2
    assert [(m["label"], m["name"]) for m in doc["header"]["models"]] == [("A", "mlp_seed0"), ("B", "mlp_seed1")]  # as the sidebar
    assert doc["header"]["extraction"] == {"pooling": "mean"}  # the activations page's pooling, shared by both sections
    assert all(section["extraction"] == {"pooling": "mean"} for section in doc["sections"])
    at.button(key="report_remove_1").click().run()
    assert len(built) == 4 and len(built[-1].sections) == 1
    at.run()
    assert len(built) == 4
    assert not page_errors(at)
