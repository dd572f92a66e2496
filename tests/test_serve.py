"""The HTTP API: health, the page, predictions, size caps, bad uploads and concurrent requests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.infer.predict import Predictor
from test_predict import make_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from agegender.infer import serve as serve_module
from agegender.infer.serve import create_app

MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.safetensors")


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Predictor.from_path(checkpoint), MAX_BYTES, model_name="tiny.safetensors")) as c:
        yield c


@pytest.fixture(scope="module")
def crop_client(checkpoint: Path) -> Iterator[tuple[TestClient, Predictor]]:
    predictor = Predictor.from_path(checkpoint, no_detect=True)
    with TestClient(create_app(predictor, MAX_BYTES)) as c:
        yield c, predictor


def _png(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(client: TestClient, data: bytes, name: str = "face.png", mime: str = "image/png") -> object:
    return client.post("/predict", files={"file": (name, data, mime)})


def test_health_and_page(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny.safetensors"
    assert health["backend"] == "torch" and health["detector"] in ("haar", "retinaface")
    assert health["max_bytes"] == MAX_BYTES and health["slots"] >= 1 and health["queue"] >= 4
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "/predict" not in page.text.split("fetch(")[0]


def test_favicon_and_docs(client: TestClient) -> None:
    icon = client.get("/favicon.ico")
    assert icon.status_code == 204 and icon.content == b""  # no 404 in the browser's console
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health"} <= set(schema["paths"]) and "/favicon.ico" not in schema["paths"]
    health = client.get("/health").json()
    assert {"backbone", "detector", "precision"} <= set(health)  # the page's model line reads these


def test_predict_a_real_photo(client: TestClient, shared_faces: Path) -> None:
    photo = min((shared_faces / "lfw").glob("*.jpg"))
    r = _post(client, photo.read_bytes(), photo.name, "image/jpeg")
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == photo.name and (body["width"], body["height"]) == (250, 250) and body["error"] is None
    assert len(body["faces"]) >= 1
    face = body["faces"][0]
    assert set(face) == {"box", "gender", "p_male", "age", "age_group", "age_low", "age_high"} and face["box"]["w"] > 50


def test_predict_matches_the_predictor(crop_client: tuple[TestClient, Predictor]) -> None:
    client, predictor = crop_client
    body = _post(client, _png(1)).json()
    (expected,) = predictor.predict(_png(1))
    assert (body["width"], body["height"]) == (64, 48)
    assert body["faces"] == [expected.to_dict()]


def test_size_cap_by_header_and_by_counting(client: TestClient) -> None:
    big = b"\x00" * (MAX_BYTES + 1)
    r = _post(client, big, "big.png")
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting can catch it
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(10):
            yield b"\x00" * (MAX_BYTES // 4)

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


@pytest.mark.parametrize(
    ("data", "name", "status", "message"),
    [
        (b"just some text\n", "notes.txt", 415, "not an image"),
        (b"", "empty.jpg", 415, "empty file"),
        (_png(2)[:200], "cut.png", 422, "corrupt or truncated"),
    ],
)
def test_bad_uploads_are_clear_4xx(client: TestClient, data: bytes, name: str, status: int, message: str) -> None:
    r = _post(client, data, name)
    assert r.status_code == status
    assert r.json()["detail"].startswith(f"{name}: ") and message in r.json()["detail"]


def test_corrupt_jpeg(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    r = _post(client, buf.getvalue()[:300], "bad.jpg", "image/jpeg")
    assert r.status_code == 422 and "bad.jpg: corrupt or truncated" in r.json()["detail"]


def test_missing_file_field(client: TestClient) -> None:
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 422 and "detail" in r.json()


def test_concurrent_requests_get_their_own_results(crop_client: tuple[TestClient, Predictor]) -> None:
    client, predictor = crop_client
    images = [_png(seed, (40 + seed, 56)) for seed in range(12)]
    expected = [predictor.predict(img)[0].to_dict() for img in images]
    with ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda img: _post(client, img).json(), images))
    assert [b["faces"] for b in bodies] == [[e] for e in expected]
    assert [b["height"] for b in bodies] == [40 + seed for seed in range(12)]
    assert len({b["faces"][0]["p_male"] for b in bodies}) > 1  # distinct inputs, distinct answers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_warns_off_loopback(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []
    monkeypatch.setattr(serve_module, "_run", lambda config, sock: calls.append(sock.getsockname()))
    port = _free_port()
    with caplog.at_level(logging.WARNING, logger="agegender"):
        serve_module.serve(checkpoint, host="127.0.0.1", port=port)
        assert not [r for r in caplog.records if "other machines" in r.getMessage()]
        serve_module.serve(checkpoint, host="0.0.0.0", port=port)
    assert "0.0.0.0" in caplog.text and "other machines" in caplog.text
    assert calls == [("127.0.0.1", port), ("0.0.0.0", port)]


def test_serve_command_prints_its_address(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agegender.cli import main

    monkeypatch.setattr(serve_module, "_run", lambda config, sock: None)
    port = _free_port()
    assert main(["serve", "--model", str(checkpoint), "--port", str(port)]) == 0
    err = capsys.readouterr().err
    assert f"serving http://127.0.0.1:{port}/ (the page), http://127.0.0.1:{port}/docs (the API)" in err
    assert serve_module.service_url("::1", 8000) == "http://[::1]:8000/"
    assert serve_module.service_url("0.0.0.0", 80).startswith("http://") and "0.0.0.0" not in serve_module.service_url(
        "0.0.0.0", 80
    )
