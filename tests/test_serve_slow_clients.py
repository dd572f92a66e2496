"""The service against clients that hold connections: slow or unfinished headers, many connections from one
address; and the OpenAPI schema documents every status the service answers."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
import httpx

from agegender.infer.serve import ERROR_RESPONSES, ServiceLimits, create_app
from test_predict import make_checkpoint
from test_serve_limits import LiveServer as ServerThread
from test_serve_limits import _wait_until

HEADER_TIMEOUT = 1.5


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(buf, "PNG")
    return buf.getvalue()


class LiveServer(ServerThread):
    """The live server of the limits tests, with raw sockets for clients that misbehave."""

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def open_connections(self) -> int:
        """The connections uvicorn holds open now (its own count)."""
        return len(self.server.server_state.connections)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from agegender.infer.predict import Predictor

    return Predictor.from_path(make_checkpoint(tmp_path_factory.mktemp("slow") / "tiny.safetensors"), no_detect=True)


@pytest.fixture(scope="module")
def live(predictor: Any) -> Iterator[LiveServer]:
    # slots=1, queue=1: uvicorn's limit_concurrency, had it been kept, would have been 64 connections.
    limits = ServiceLimits(slots=1, queue=1, header_timeout=HEADER_TIMEOUT, keep_alive=5, per_client=48)
    with LiveServer(create_app(predictor, 200_000, limits=limits), limits) as srv:
        yield srv


def _closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``sock`` (reading whatever it sends), or None if it stays open."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - t0 < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_slow_header_clients_do_not_hold_the_service(live: LiveServer) -> None:
    slow = []
    for i in range(30):  # every one stops in the middle of its headers
        sock = live.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + str(i).encode())
        slow.append(sock)
    try:
        _wait_until(lambda: live.open_connections() >= len(slow))  # the server holds every one of them
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=5) as client:
            t0 = time.monotonic()
            health = client.get("/health")
            health_s = time.monotonic() - t0
            t0 = time.monotonic()
            upload = client.post("/predict", files={"file": ("a.png", _png(), "image/png")})
            upload_s = time.monotonic() - t0
        assert health.status_code == 200 and upload.status_code == 200, (health.text, upload.text)
        assert health_s < 1.0 and upload_s < 1.0, (health_s, upload_s)
        # ... and every slow client is dropped at the header timeout.
        closed = [_closed_within(sock, HEADER_TIMEOUT + 5) for sock in slow]
        assert all(c is not None for c in closed), closed
    finally:
        for sock in slow:
            sock.close()


def test_a_silent_connection_is_closed_at_the_header_timeout(live: LiveServer) -> None:
    with live.connect() as sock:
        took = _closed_within(sock, HEADER_TIMEOUT + 5)
    assert took is not None and HEADER_TIMEOUT - 0.2 < took < HEADER_TIMEOUT + 4


def test_headers_trickled_a_byte_at_a_time_are_cut_off(live: LiveServer) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with live.connect() as sock:
        t0 = time.monotonic()
        sent = 0
        try:
            for byte in head:  # a byte every 0.1 s: always active, never done within the timeout
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
                if time.monotonic() - t0 > HEADER_TIMEOUT + 5:
                    break
        except OSError:  # the server closed the connection
            pass
        took = _closed_within(sock, 5)
    assert took is not None and sent < len(head) and time.monotonic() - t0 < HEADER_TIMEOUT + 6


def test_the_next_request_on_a_kept_alive_connection_has_a_header_deadline_too(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # then nothing more: keep-alive no longer counts it idle
        took = _closed_within(sock, HEADER_TIMEOUT + 5)
    assert took is not None and took < HEADER_TIMEOUT + 4


def test_one_address_cannot_take_every_connection(predictor: Any) -> None:
    limits = ServiceLimits(header_timeout=30, per_client=5)
    with LiveServer(create_app(predictor, 200_000, limits=limits), limits) as srv:
        held = [srv.connect() for _ in range(5)]
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            extra = srv.connect()
            assert _closed_within(extra, 3) is not None  # the sixth from this address is closed at once
            extra.close()
        finally:
            for sock in held:
                sock.close()
        _wait_until(lambda: srv.open_connections() == 0)
        r = httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)  # the slots are free again
        assert r.status_code == 200


def test_openapi_documents_every_status_predict_answers(predictor: Any) -> None:
    from fastapi.testclient import TestClient

    limits = ServiceLimits(slots=1, queue=0, queue_wait=0.01)
    app = create_app(predictor, 2_000, limits=limits)
    documented = {int(code) for code in app.openapi()["paths"]["/predict"]["post"]["responses"]}
    assert documented >= {200, *ERROR_RESPONSES}
    client = TestClient(app)
    seen = {
        client.post("/predict", files={"file": ("a.png", _png((20, 20)), "image/png")}).status_code,
        client.post("/predict", files={"file": ("a.txt", b"text", "text/plain")}).status_code,  # 415
        client.post("/predict", files={"file": ("a.png", _png((20, 20))[:60], "image/png")}).status_code,  # 422
        client.post("/predict", files={"file": ("big.png", b"\0" * 5000, "image/png")}).status_code,  # 413
        client.post("/predict", data={"other": "x"}).status_code,  # 422: no file field
    }
    assert seen <= documented, seen - documented
    assert {200, 413, 415, 422} <= seen


def test_schemathesis_finds_no_undocumented_status(predictor: Any) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(predictor, 200_000))
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in GenerationMode))

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=cases)
        def run(case: Any) -> None:
            try:
                case.call_and_validate(checks=[status_code_conformance, content_type_conformance])
            except Exception as e:  # collected, so one run reports every operation's failures
                failures.append(f"{case.method} {case.path}: {str(e)[:200]}")

        run()
    assert not failures, failures[:3]
