"""The embedding page: two linked views, trustworthiness, selection by index with CSV download, intrinsic dimension."""

from __future__ import annotations

import json

from tests.app.conftest import page_errors, shown
from workbench.plots._style import figure_title


def _open(app, method: str = "pca"):
    at = app.run()
    at.switch_page("pages/embedding.py").run()
    if method != "umap":
        at.selectbox(key="emb_method").set_value(method).run()
    return at


def test_embedding_page_umap_two_models(app):
    at = _open(app, "umap")
    assert not page_errors(at)
    assert at.title[0].value == "Embedding"
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # view A, view B, intrinsic dimension
    spec_a = json.loads(charts[0].proto.spec)
    assert figure_title(spec_a).startswith("mlp_seed0 · ")
    assert "UMAP" in figure_title(spec_a) and "n = 450" in figure_title(spec_a)
    assert figure_title(json.loads(charts[1].proto.spec)).startswith("mlp_seed1 · ")
    assert [t["name"] for t in spec_a["data"]] == [f"class {k}" for k in range(10)]  # one trace per digit class
    assert "sample %{customdata[0]}" in spec_a["data"][0]["hovertemplate"]
    trust = [float(m.value) for m in at.metric]
    assert len(trust) == 2 and min(trust) > 0.85
    assert "Intrinsic dimension" in charts[2].proto.spec


def test_b_follows_the_layer_chosen_for_a_and_the_report_shows_the_page_s_views(app):
    at = _open(app)
    assert at.selectbox(key="emb_layer_a").label == "Layer of mlp_seed0"
    at.selectbox(key="emb_layer_a").set_value("relu1").run()
    assert at.selectbox(key="emb_layer_b").value == "relu1"  # the same layer of both models, not A's relu1 vs B's out
    titles = [figure_title(json.loads(c.proto.spec)) for c in at.get("plotly_chart")[:2]]
    assert titles[0].startswith("mlp_seed0 · relu1") and titles[1].startswith("mlp_seed1 · relu1")
    at.selectbox(key="emb_layer_b").set_value("fc2").run()  # B may still be set apart on purpose
    assert at.selectbox(key="emb_layer_a").value == "relu1" and at.selectbox(key="emb_layer_b").value == "fc2"
    at.selectbox(key="emb_color").set_value("distance moved between the views").run()
    at.button(key="emb_report").click().run()
    shown = [json.loads(c.proto.spec) for c in at.get("plotly_chart")[:2]]
    reported = at.session_state["report_sections"][-1]["figures"][:2]
    for page_fig, report_fig in zip(shown, reported):
        assert figure_title(page_fig) == figure_title(report_fig.to_plotly_json())
        assert [t.get("name") for t in page_fig["data"]] == [t.name for t in report_fig.data]
        assert page_fig["data"][0]["marker"]["colorbar"]["title"]["text"] == "distance moved"
        assert report_fig.data[0].marker.colorbar.title.text == "distance moved"  # coloured as on the page


def test_selection_by_index_highlights_both_views_and_downloads(app):
    at = _open(app)
    assert not page_errors(at)
    assert not at.get("download_button")
    at.text_input(key="emb_select_text").input("0-9, 42").run()
    assert at.session_state["emb_selection"] == [*range(10), 42]
    for chart in at.get("plotly_chart")[:2]:
        selected = sum(len(trace.get("selectedpoints", [])) for trace in json.loads(chart.proto.spec)["data"])
        assert selected == 11
    buttons = at.get("download_button")
    assert len(buttons) == 1 and "11 selected indices" in buttons[0].proto.label
    at.button(key="emb_clear").click().run()
    assert not at.get("download_button") and at.text_input(key="emb_select_text").value == ""
    at.text_input(key="emb_select_text").input("0-9, 42").run()  # the same text again selects again
    assert at.session_state["emb_selection"] == [*range(10), 42]
    at.text_input(key="emb_select_text").input("3, 5-2, abc, 449, 450, 7-9").run()  # 450 samples: 0 to 449
    assert at.session_state["emb_selection"] == [3, 7, 8, 9, 449]
    assert ("Left out: 5-2, abc, 450. Give indices from 0 to 449, single or as ranges from low to high such as 0-9."
            in [shown(c.value) for c in at.caption])
    at.text_input(key="emb_select_text").input("").run()  # emptied: nothing stays selected, and nothing is left out
    assert not at.session_state["emb_selection"] and not any("Left out" in c.value for c in at.caption)


def test_a_box_drawn_again_after_clearing_selects_again(app):
    at = _open(app)
    at.session_state["emb_last_0"] = [1, 2, 3]  # as after a box over samples 1-3 in the first view
    at.session_state["emb_selection"] = [1, 2, 3]
    at.run()
    at.button(key="emb_clear").click().run()
    assert "emb_last_0" not in at.session_state  # so the same box, drawn again, counts as a new selection


def test_two_layers_of_one_model_coloured_by_distance(app):
    at = _open(app)
    at.radio(key="emb_mode").set_value("Two layers of model A").run()
    at.selectbox(key="emb_color").set_value("distance moved between the views").run()
    assert not page_errors(at)
    spec = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert len(spec["data"]) == 1 and spec["data"][0]["marker"]["showscale"]
    assert "label %{customdata[2]}" in spec["data"][0]["hovertemplate"]
    at.radio(key="emb_id_method").set_value("mle").run()
    assert "MLE" in at.get("plotly_chart")[2].proto.spec


def test_report_keeps_each_models_intrinsic_dimensions_in_its_own_layer_order(app, sample_model):
    from workbench.report.build import summary_tables

    app.session_state["model_b"] = sample_model("cnn_seed0")  # shares layer names (fc1, relu1, out) with the MLP
    at = _open(app)
    assert not page_errors(at)
    at.button(key="emb_report").click().run()
    section = at.session_state["report_sections"][0]
    profiles = section["result"][1:]
    assert [list(section["summary"]["intrinsic dimension"][p.model_name]) for p in profiles] == [list(p.layers) for p in profiles]
    table = next(t for t in summary_tables(section["summary"]) if t[0] == "intrinsic dimension")
    assert [row[0] for row in table[2]] == [f"{p.model_name} / {layer}" for p in profiles for layer in p.layers]
