"""The service under hostile clients: address checks, body timeouts, the decode queue, and 50 concurrent bombs."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender.cli import main
from agegender.errors import AgeGenderError
from test_predict import make_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
import httpx
import uvicorn
from fastapi.testclient import TestClient

from agegender.infer import serve as serve_module
from agegender.infer.serve import ServiceLimits, check_address, create_app, uvicorn_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("limits") / "tiny.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(size: tuple[int, int], colour: tuple[int, int, int] = (120, 80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# --port and --host, checked before the model loads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("127.0.0.1", 99999, "port must be between 1 and 65535, got 99999"),  # Python's names: port, not --port
        ("127.0.0.1", 0, "port must be between 1 and 65535, got 0"),
        ("127.0.0.1", -1, "port must be between 1 and 65535, got -1"),
        ("not a host!", 8000, "host 'not a host!' is not an IP address or a host name"),
        ("", 8000, "host '' is not an IP address or a host name"),
        ("a..b", 8000, "is not an IP address or a host name"),
        ("-x.example", 8000, "is not an IP address or a host name"),
        ("x" * 64 + ".example", 8000, "is not an IP address or a host name"),
        ("999.1.1.1", 8000, "cannot resolve"),
        ("no-such-host.invalid", 8000, "cannot resolve"),
    ],
)
def test_bad_addresses_are_one_line_errors_before_loading(tmp_path: Path, host: str, port: int, message: str) -> None:
    with pytest.raises(AgeGenderError) as e:
        serve_module.serve(tmp_path / "no-model.safetensors", host=host, port=port)  # the model is never opened
    assert message in str(e.value) and "\n" not in str(e.value) and "--" not in str(e.value)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("127.0.0.1", 1),
        ("127.0.0.1", 65535),
        ("::1", 80),
        ("[::1]", 80),
        ("localhost", 8000),
        ("my-host.example.org.", 8000),
        ("0.0.0.0", 8000),
    ],
)
def test_good_addresses_pass_the_check(host: str, port: int) -> None:
    check_address(host, port)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AgeGenderError, match=f"cannot listen on 127.0.0.1:{port} .*choose another port$"):
            serve_module.serve(tmp_path / "no-model.safetensors", port=port)


def test_cli_port_out_of_range_exits_2(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(checkpoint), "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "agegender: error: --port must be between 1 and 65535, got 99999"
    assert "Traceback" not in err


def test_limits_are_checked(checkpoint: Path) -> None:
    for bad in (
        ServiceLimits(slots=0),
        ServiceLimits(queue=-1),
        ServiceLimits(body_timeout=0),
        ServiceLimits(read_timeout=float("nan")),
        ServiceLimits(decode_pixels=0),
    ):
        with pytest.raises(AgeGenderError, match="must be"):
            serve_module.serve(checkpoint, port=_free_port(), limits=bad)


# ---------------------------------------------------------------------------------------------
# body timeouts and keep-alive, on a real uvicorn over loopback
# ---------------------------------------------------------------------------------------------


class LiveServer:
    def __init__(self, app: Any, limits: ServiceLimits) -> None:
        self.port = _free_port()
        config = uvicorn_config(app, limits, log_level="warning")
        config.host, config.port = "127.0.0.1", self.port
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _read_all(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t0, data = time.monotonic(), b""
    sock.settimeout(limit)
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - t0


@pytest.fixture(scope="module")
def live(checkpoint: Path) -> Iterator[LiveServer]:
    from agegender.infer.predict import Predictor

    limits = ServiceLimits(body_timeout=1.5, read_timeout=0.5, keep_alive=1)
    with LiveServer(create_app(Predictor.from_path(checkpoint, no_detect=True), 200_000, limits=limits), limits) as srv:
        yield srv


def _request_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_body_shorter_than_its_content_length_gets_408(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(_request_head(1000) + b"--b\r\n")
        data, took = _read_all(sock, 5)
    assert data.startswith(b"HTTP/1.1 408 ") and b"connection: close" in data.lower()
    assert b"request body not received within" in data
    assert 0.4 < took < 4.0  # read_timeout 0.5 s; generous above for a loaded machine


def test_trickling_body_gets_408_at_the_deadline(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(_request_head(1000) + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n')
        t0, answered = time.monotonic(), b""
        sock.settimeout(0.2)
        while time.monotonic() - t0 < 8 and not answered:
            try:
                sock.sendall(b"x")  # one byte every 0.2 s: never a 0.5 s pause
                answered = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - t0
    assert answered.startswith(b"HTTP/1.1 408 ")
    assert 1.3 < took < 5.0  # body_timeout 1.5 s


def test_idle_keep_alive_connection_is_closed(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = _read_all(sock, 5)
    assert data.startswith(b"HTTP/1.1 200 ") and 0.8 < took < 4.0  # keep_alive 1 s


def test_a_normal_upload_still_works(live: LiveServer) -> None:
    r = httpx.post(f"http://127.0.0.1:{live.port}/predict", files={"file": ("a.png", _png((40, 30)), "image/png")})
    assert r.status_code == 200 and r.json()["width"] == 40


# ---------------------------------------------------------------------------------------------
# the decode queue: slots, a pixel budget, 503 beyond the queue
# ---------------------------------------------------------------------------------------------


class SlowPredictor:
    """Stands in for a Predictor: each predict waits for ``release``, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.peak = self.calls = 0

    def info(self) -> dict[str, Any]:
        return {}

    def predict(self, rgb: np.ndarray) -> list[Any]:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        return []


def _post_async(client: TestClient, pool: ThreadPoolExecutor, data: bytes) -> Any:
    return pool.submit(client.post, "/predict", files={"file": ("a.png", data, "image/png")})


def _wait_until(condition: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_beyond_the_queue_gets_503_at_once_and_a_queued_upload_waits_bounded() -> None:
    predictor = SlowPredictor()
    limits = ServiceLimits(slots=1, queue=1, queue_wait=2.0)
    app = create_app(predictor, limits=limits)  # type: ignore[arg-type]
    with TestClient(app) as client, ThreadPoolExecutor(4) as pool:
        running = _post_async(client, pool, _png((20, 20)))
        _wait_until(lambda: predictor.running == 1)
        queued = _post_async(client, pool, _png((20, 20)))
        _wait_until(lambda: app.state.limiter.queued == 1)  # the second upload waits for the slot
        t0 = time.monotonic()
        refused = client.post("/predict", files={"file": ("b.png", _png((20, 20)), "image/png")})
        assert time.monotonic() - t0 < 1.0  # at once, not after the 2 s wait
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["detail"].startswith("busy: 2 uploads in progress")
        timed_out = queued.result(5)
        assert timed_out.status_code == 503 and "no decode slot free within 2 s" in timed_out.json()["detail"]
        predictor.release.set()
        assert running.result(5).status_code == 200
        assert client.post("/predict", files={"file": ("c.png", _png((20, 20)), "image/png")}).status_code == 200
        assert client.get("/health").status_code == 200
    assert predictor.calls == 2


def test_declared_pixels_share_a_budget() -> None:
    predictor = SlowPredictor()
    limits = ServiceLimits(slots=4, queue=4, decode_pixels=1000, queue_wait=5)
    app = create_app(predictor, limits=limits)  # type: ignore[arg-type]
    with TestClient(app) as client, ThreadPoolExecutor(4) as pool:
        big = [_post_async(client, pool, _png((30, 30))) for _ in range(2)]  # 900 px each: one at a time
        _wait_until(lambda: predictor.running == 1)
        small = _post_async(client, pool, _png((10, 10)))  # 100 px fits beside one 900 px upload
        _wait_until(lambda: predictor.running == 2 and app.state.limiter.queued == 1)
        assert predictor.running == 2 and app.state.limiter.running == 2  # the second 900 px one still waits
        predictor.release.set()
        assert [f.result(10).status_code for f in [*big, small]] == [200, 200, 200]
    assert predictor.peak == 2 and predictor.calls == 3


# ---------------------------------------------------------------------------------------------
# 50 concurrent decompression bombs: bounded memory, no 500, a bounded run
# ---------------------------------------------------------------------------------------------

# Eight decode slots whatever the machine: the pixel budget, not the core count, must bound the memory.
SERVER = """
import sys
from agegender.infer.serve import ServiceLimits, serve
serve(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), limits=ServiceLimits(slots=8, queue_wait=5))
"""


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to read the server's peak memory")
@pytest.mark.slow
def test_fifty_concurrent_bombs_stay_under_2_gb(checkpoint: Path, tmp_path: Path) -> None:
    # 7000 x 7000 = 49M pixels, under MAX_PIXELS, in a ~160 kB PNG: ~150 MB decoded, seconds of work each.
    bomb = _png((7000, 7000))
    assert len(bomb) < 300_000
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "server.log"  # a file, not a pipe: an unread pipe could fill and stall the server
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(checkpoint), str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    t0 = time.monotonic()
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() - t0 < 60, "server did not start"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        idle, started = _peak_rss(proc.pid), time.monotonic() - t0

        def upload(i: int) -> int:
            try:
                return httpx.post(base + "/predict", files={"file": (f"bomb{i}.png", bomb, "image/png")}, timeout=60).status_code
            except httpx.TransportError as e:
                return -1 if "timed out" not in str(e) else -2

        t1 = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(upload, range(50)))
        took = time.monotonic() - t1
        peak = _peak_rss(proc.pid)
        assert httpx.get(base + "/health", timeout=5).status_code == 200  # still serving
    finally:
        t2 = time.monotonic()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        stopped = time.monotonic() - t2
    print(
        f"\n50 bombs: peak RSS {peak / 2**20:.0f} MiB (idle {idle / 2**20:.0f} MiB), {took:.1f} s "
        f"(start {started:.1f} s, stop {stopped:.1f} s), "
        f"statuses {sorted(set(statuses))}: " + ", ".join(f"{s}x{statuses.count(s)}" for s in sorted(set(statuses)))
    )
    assert all(200 <= s < 500 or s == 503 for s in statuses), statuses
    assert statuses.count(200) >= 1
    assert peak < 2 * 2**30
    assert took < 60
