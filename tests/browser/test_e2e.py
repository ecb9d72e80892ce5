"""End-to-end: a user uploads checkpoints and looks at the pages in a real browser."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from tests.browser.conftest import ARTIFACTS, ROOT, choose, open_page, shot, wait_idle

pytestmark = pytest.mark.browser


def _upload_model(pg, path: Path) -> None:
    choose(pg, "Model A", "Upload a file…")
    pg.locator("[data-testid='stFileUploader'] input[type='file']").first.set_input_files(str(path))
    wait_idle(pg)


def test_upload_and_inspect(page, tmp_path):
    shot(page, "01-open")
    src = ROOT / "sample_models" / "mlp_seed2.safetensors"
    upload = tmp_path / "uploaded_mlp.safetensors"
    upload.write_bytes(src.read_bytes())
    _upload_model(page, upload)
    page.wait_for_selector("h3:has-text('Model A: uploaded_mlp')", timeout=60000)
    shot(page, "02-uploaded")
    open_page(page, "Activation statistics")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60000)
    shot(page, "03-activations")
    assert page.locator(".js-plotly-plot").count() >= 1
    assert not page.locator("[data-testid='stException']").count()


def test_malicious_and_non_model_uploads_show_clear_errors(page, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    _upload_model(page, evil)
    alert = page.locator("[data-testid='stAlertContentError']").first
    alert.wait_for(timeout=30000)
    assert "full pickle whose loading can run arbitrary code" in alert.inner_text()
    assert not page.locator("[data-testid='stException']").count()
    assert not marker.exists()
    shot(page, "08-malicious-upload")
    notes = tmp_path / "notes.bin"
    notes.write_bytes(b"these are my notes, not a model")
    page.locator("[data-testid='stFileUploader'] input[type='file']").first.set_input_files(str(notes))
    wait_idle(page)
    text = " ".join(page.locator("[data-testid='stAlertContentError']").all_inner_texts())
    assert "'notes.bin' is not a PyTorch checkpoint: it looks like a text file" in text
    assert not page.locator("[data-testid='stException']").count()
    ARTIFACTS.mkdir(exist_ok=True)


def test_trusted_full_pickle_opens_in_a_separate_process(page, tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)  # the whole module: a full pickle
    _upload_model(page, path)
    alert = page.locator("[data-testid='stAlertContentError']").first
    alert.wait_for(timeout=30000)
    assert "the app offers 'I trust this file' when it is started with 'workbench app --trust-uploads'" in alert.inner_text()
    page.get_by_text("I trust this file", exact=False).first.click()
    wait_idle(page)
    page.wait_for_selector("h3:has-text('Model A: whole_model')", timeout=60000)
    # the summary, written after the page has run, shows the model this run loaded
    page.locator("[data-testid='stSidebar']").get_by_text("whole_model", exact=False).first.wait_for(timeout=30000)
    assert not page.locator("[data-testid='stAlertContentError']").count()
    assert not page.locator("[data-testid='stException']").count()
    shot(page, "09-trusted-pickle")
    page.get_by_text("I trust this file", exact=False).first.click()  # leave the switch off for the next test
    wait_idle(page)


def _add_to_report(pg, index: int = 0) -> None:
    pg.get_by_role("button", name="Add to report").nth(index).click()
    wait_idle(pg)


def test_compare_embed_report_download_and_open_offline(page, tmp_path, browser):
    src = ROOT / "sample_models" / "mlp_seed0.safetensors"
    upload = tmp_path / "my_mlp.safetensors"
    upload.write_bytes(src.read_bytes())
    _upload_model(page, upload)
    choose(page, "Model B", "mlp_seed2")
    page.wait_for_selector("h3:has-text('Model B: mlp_seed2')", timeout=60000)
    shot(page, "04-two-models")

    open_page(page, "Similarity (A vs B)")
    heatmap = page.locator(".js-plotly-plot").first
    heatmap.locator(".heatmaplayer, .hm").first.wait_for(timeout=60000)
    assert "my_mlp" in (heatmap.text_content() or "")
    shot(page, "05-similarity")
    if os.environ.get("WORKBENCH_UPDATE_SCREENSHOT") == "1":  # keeps the README's picture current
        page.screenshot(path=str(ROOT / "docs" / "screenshot.png"))
    _add_to_report(page)

    if page.locator("[data-testid='stSidebarNav'] a").filter(has_text="Embedding").count():
        open_page(page, "Embedding")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => p.querySelector('.scatterlayer .trace')).length >= 2",
            timeout=300000,
        )
        assert page.locator(".js-plotly-plot").count() >= 2
        shot(page, "06-embedding")
        _add_to_report(page)

    open_page(page, "Report")
    shot(page, "07-report")
    with page.expect_download(timeout=120000) as info:
        page.get_by_role("button", name="Download report (.zip)").click()
    archive = tmp_path / "report.zip"
    info.value.save_as(archive)
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "report")
        names = set(zf.namelist())
    assert {"report.html", "report.json", "arrays.npz"} <= names

    context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
    offline = context.new_page()
    errors: list[str] = []
    offline.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    offline.on("pageerror", lambda e: errors.append(str(e)))
    offline.goto((tmp_path / "report" / "report.html").as_uri())
    offline.wait_for_selector(".js-plotly-plot .main-svg", timeout=30000)
    n_figures = offline.locator(".js-plotly-plot").count()
    offline.screenshot(path=str(ARTIFACTS / "09-offline-report.png"))
    context.close()
    assert n_figures >= 1
    assert not errors, errors


def test_a_deep_link_as_the_first_request_opens_the_page_inside_the_app(fresh_server, browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = context.new_page()
    try:
        pg.goto(f"{fresh_server}/compare")
        pg.wait_for_selector("h1:has-text('Similarity')", timeout=60000)
        wait_idle(pg)
        nav = pg.locator("[data-testid='stSidebarNav']")
        nav.get_by_text("Models & data").wait_for(timeout=30000)
        assert not nav.get_by_text("choosers").count() and not nav.get_by_text("state", exact=True).count()
        pg.wait_for_selector(".js-plotly-plot .main-svg", timeout=60000)  # the default models are loaded
        assert not pg.locator("[data-testid='stException']").count()
    finally:
        context.close()



def test_the_sidebar_summary_shows_on_a_page_that_stops_early(page):
    # Relative representations stops after its first section while stitching is off; the summary is written first
    open_page(page, "Relative representations")
    sidebar = page.locator("[data-testid='stSidebar']")
    sidebar.get_by_text("mlp_seed0", exact=False).first.wait_for(timeout=30000)
    assert "Data" in sidebar.inner_text() and "sha256" in sidebar.inner_text()


def test_the_app_requests_nothing_outside_its_server(browser, server):
    from urllib.parse import urlparse

    context = browser.new_context(viewport={"width": 1300, "height": 900})
    pg = context.new_page()
    outside: list[str] = []
    host = urlparse(server).hostname
    pg.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in (host, None) and not r.url.startswith("data:") else None)
    pg.goto(server)
    pg.wait_for_selector("h1:has-text('Representation Workbench')", timeout=60000)
    wait_idle(pg)
    open_page(pg, "Similarity (A vs B)")
    context.close()
    assert not outside, outside  # e.g. a favicon from a font server: the app must work without internet
