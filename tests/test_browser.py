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

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


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


def _drop(page: object, path: Path) -> None:
    """Drop ``path`` on the page's drop zone, as a file dragged from the desktop arrives."""
    import base64

    page.evaluate(  # type: ignore[attr-defined]
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/jpeg" }));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )


DONE = (
    "[...document.querySelectorAll('.photo .status')].length === {n} && "
    "[...document.querySelectorAll('.photo')].every((s) => !s.querySelector('.status').textContent"
    ".startsWith('Analys'))"
)


@pytest.mark.slow
def test_page_numbers_boxes_lists_faces_and_takes_several_photos(server: tuple[str, Predictor, Path], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = _chromium()
    url, predictor, photo = server
    faces = predictor.predict(photo)
    assert faces, "the test photo should have a face"
    second = (
        photo.parent / sorted(p.name for p in photo.parent.glob("*" + photo.suffix))[1] if photo.parent.name == "lfw" else photo
    )
    info = predictor.info()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1400})
            errors: list[str] = []
            failed: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(url)
            page.wait_for_function("!document.getElementById('model').textContent.startsWith('Loading')")
            model_line = page.locator("#model").inner_text()

            page.get_by_label("Choose photos").set_input_files([str(photo), str(second)])
            page.wait_for_function(DONE.format(n=2), timeout=60_000)
            first = page.locator(".photo").nth(0)
            labels = first.locator(".box span").all_inner_texts()
            items = first.locator(".faces li").all_inner_texts()
            names = page.locator(".photo h2").all_inner_texts()
            page.screenshot(path=str(tmp_path / "two-photos.png"), full_page=True)
            assert page.locator(".photo .error").all_inner_texts() == ["", ""]

            # A file the server cannot read: its message, and no broken picture.
            page.get_by_label("Choose photos").set_input_files(
                files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
            )
            page.wait_for_function("document.querySelector('.photo .error')?.textContent.length > 0", timeout=30_000)
            error_text = page.locator(".photo .error").inner_text()
            stage_hidden = page.locator(".photo .stage").is_hidden()
            img_src = page.locator(".photo img").get_attribute("src")
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

            _drop(page, photo)
            page.wait_for_function(DONE.format(n=1), timeout=60_000)
            dropped = page.locator(".photo .box span").all_inner_texts()
            page.screenshot(path=str(tmp_path / "dropped.png"), full_page=True)
            icon = page.request.get(url + "favicon.ico").status
        finally:
            browser.close()

    assert all(str(info[k]) in model_line for k in ("backbone", "detector", "precision")), model_line
    assert names == [photo.name, second.name]
    # Each box carries the number of its line in the list, so the two can be matched.
    assert labels == [f"{i} {face.label()}" for i, face in enumerate(faces, 1)]
    assert len(items) == len(faces)
    for i, (item, face) in enumerate(zip(items, faces), 1):
        assert item.startswith(f"{i}. {face.gender}, {round(100 * max(face.p_male, 1 - face.p_male))}% sure")
        if face.age_low is not None:  # the model's age interval, when its head gives one
            assert f"likely {round(face.age_low)}–{round(face.age_high)}" in item
    assert "notes.txt: not an image" in error_text and stage_hidden and img_src is None
    assert dropped == labels
    assert icon == 204
    assert not errors and not [f for f in failed if "notes" not in f and "predict" not in f], failed
