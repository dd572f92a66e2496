"""The web page in a real browser: upload a photo, see boxes and labels (headless Chromium via Playwright)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.infer.predict import Predictor
from conftest import faces_dir
from test_predict import make_checkpoint

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Predictor, Path]]:
    """uvicorn on a free loopback port in a thread, with a photo to upload and the predictor behind it."""
    uvicorn = pytest.importorskip("uvicorn")
    from agegender.infer.serve import create_app

    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    shared = faces_dir()
    if shared is not None and (shared / "lfw").is_dir():
        photo = min((shared / "lfw").glob("*.jpg"))
        predictor = Predictor.from_path(checkpoint)
    else:  # no real faces here: classify a generated picture as a whole
        photo = tmp_path / "generated.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(photo)
        predictor = Predictor.from_path(checkpoint, no_detect=True)
    config = uvicorn.Config(create_app(predictor), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", predictor, photo
    srv.should_exit = True
    thread.join(10)


def test_upload_shows_boxes_and_labels(server: tuple[str, Predictor, Path], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    url, predictor, photo = server
    expected = [face.label() for face in predictor.predict(photo)]
    assert expected, "the test photo should have a face"

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.get_by_label("Choose a photo").set_input_files(str(photo))
            page.wait_for_selector("#results li", timeout=30_000)
            labels = page.locator(".box span").all_inner_texts()
            items = page.locator("#results li").all_inner_texts()
            page.screenshot(path=str(tmp_path / "page.png"))
            assert page.locator("#error").inner_text() == ""
            # A non-image shows the server's message in the alert.
            page.get_by_label("Choose a photo").set_input_files(
                files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
            error_text = page.locator("#error").inner_text()
        finally:
            browser.close()
    assert labels == expected
    assert len(items) == len(expected) and items[0].startswith("Face 1: ")
    assert "notes.txt: not an image" in error_text
    assert not errors
