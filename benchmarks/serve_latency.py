"""``agegender serve``'s latency on loopback: p50 and p99 at 1, 8 and 32 concurrent clients.

``python benchmarks/serve_latency.py --faces DIR --model M [--n 50] [--requests 100] [--clients 1 8 32]``:
starts the service in a subprocess on a free 127.0.0.1 port, waits for ``/health``, then for each client count
runs that many threads, each on its own keep-alive connection, posting the first ``n`` photos of DIR in turn
until the level has ``requests`` answered uploads or ``--seconds`` passed; then it stops the service. Latency is
from the request's first byte to the response's last, queueing in the service included. Uploads the service
sheds (503: more than its slots and queue at once) are counted apart and left out of the percentiles, since
they return at once; a shed client pauses ``--backoff`` seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("serve_latency")

SUFFIXES = (".jpg", ".jpeg", ".png")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def start_service(model: str, port: int, timeout: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "agegender", "serve", "--model", model, "--host", HOST, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the service exited with {proc.returncode}: "
                f"{(proc.stderr.read() if proc.stderr else b'').decode(errors='replace')[-2000:]}"
            )
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        except OSError:
            time.sleep(0.5)
    stop_service(proc)
    raise SystemExit(f"the service did not answer /health within {timeout:.0f} s")


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def run_level(
    port: int, uploads: list[tuple[bytes, str]], clients: int, requests: int, seconds: float, backoff: float
) -> dict[str, Any]:
    """``clients`` threads posting until ``requests`` uploads succeeded or ``seconds`` passed; a client whose
    upload was shed waits ``backoff`` seconds before the next, so it keeps the pressure on without spinning."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients)
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        start.wait()
        i = index
        while time.monotonic() < deadline:
            with lock:
                if len(latencies) >= requests:
                    break
            body, kind = uploads[i % len(uploads)]
            i += clients
            begin = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:  # the service closed the connection (e.g. its connection cap): a new one
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
                status = -1
            took = time.perf_counter() - begin
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(took)
            if status != 200:
                time.sleep(backoff)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ok = sorted(latencies)

    def pct(q: float) -> float | None:
        return round(1000 * ok[min(len(ok) - 1, round(q * (len(ok) - 1)))], 1) if ok else None

    return {
        "clients": clients,
        "ok": len(ok),
        "statuses": statuses,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(ok), 1) if ok else None,
        "ok_per_s": round(len(ok) / wall, 2),
        "seconds": round(wall, 1),
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", required=True, help="a folder of photos")
    parser.add_argument("--model", required=True, help="a model (.onnx, checkpoint or run directory)")
    parser.add_argument("--n", type=int, default=50, help="distinct photos to upload")
    parser.add_argument("--requests", type=int, default=100, help="successful uploads per concurrency level")
    parser.add_argument("--seconds", type=float, default=60, help="at most this long per level")
    parser.add_argument("--backoff", type=float, default=0.1, help="a shed client's pause before its next upload")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--start-timeout", type=float, default=180)
    parser.add_argument("--json", help="also write the figures here")
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    photos = sorted(p for p in Path(a.faces).rglob("*") if p.suffix.lower() in SUFFIXES)[: a.n]
    if not photos:
        raise SystemExit(f"{a.faces}: no photos")
    uploads = [multipart(p.read_bytes(), p.name) for p in photos]
    port = free_port()
    proc = start_service(a.model, port, a.start_timeout)
    try:
        run_level(port, uploads, 1, a.warmup, a.seconds, a.backoff)  # first requests pay for lazy setup
        levels = []
        for clients in a.clients:
            levels.append(run_level(port, uploads, clients, a.requests, a.seconds, a.backoff))
            log.info("%s", levels[-1])
    finally:
        stop_service(proc)
    text = json.dumps({"model": a.model, "photos": len(photos), "levels": levels}, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
