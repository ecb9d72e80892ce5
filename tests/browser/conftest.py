"""A real Streamlit server and a real headless Chromium driven by playwright."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


def _chromium() -> str | None:
    from workbench.report.build import find_chromium

    return find_chromium()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _app_server(tmp_path_factory) -> Iterator[str]:
    """Start the app on a free local port; yield its base URL once /_stcore/health answers."""
    if _chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    env = dict(os.environ, WORKBENCH_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), TORCH_FORCE_WEIGHTS_ONLY_LOAD="1",
               WORKBENCH_TRUST_UPLOADS="1")  # as 'workbench app --trust-uploads': the trusted-pickle test ticks the switch
    log = open(tmp_path_factory.mktemp("server") / "streamlit.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not start; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The app, shared by the tests of a session."""
    with _app_server(tmp_path_factory) as url:
        yield url


@pytest.fixture
def fresh_server(tmp_path_factory):
    """The app in a server that has answered no request yet."""
    with _app_server(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if _chromium() is None:
        pytest.skip("no Chromium on this machine")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser page on the app, collecting console errors in ``page.console_errors``."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.goto(server)
    pg.wait_for_selector("h1:has-text('Representation Workbench')", timeout=60000)
    pg.get_by_role("combobox", name="Model A").wait_for(timeout=60000)
    wait_idle(pg)
    yield pg
    context.close()


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def wait_idle(pg, timeout: float = 120000) -> None:
    """Wait until Streamlit has finished running the script."""
    pg.wait_for_timeout(300)
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=timeout,
    )
    pg.wait_for_timeout(300)


def choose(pg, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label``."""
    box = pg.get_by_role("combobox", name=label)
    box.click()
    box.fill("")
    pg.get_by_role("option", name=option, exact=True).first.click()
    wait_idle(pg)


def open_page(pg, title: str) -> None:
    pg.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    pg.wait_for_selector(f"h1:has-text('{title.split(' (')[0]}')", timeout=60000)
    wait_idle(pg)
