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
    assert "is not a readable PyTorch checkpoint" in text
    assert not page.locator("[data-testid='stException']").count()
    ARTIFACTS.mkdir(exist_ok=True)
