"""HTTP API and web page over a :class:`~agegender.predict.Predictor` (FastAPI, served by uvicorn).

What keeps the service up under hostile clients:

- **Request bodies** larger than ``max_bytes`` get 413 before anything parses them. A body must arrive within
  ``body_timeout`` seconds, with no gap over ``read_timeout``; a client whose Content-Length promises more than
  it sends, or that trickles, gets 408 and the connection is closed.
- **Decoding and prediction** run at most ``slots`` at a time (default: the usable cores), and the pixels their
  headers declare share a budget (``decode_pixels``), so a burst of small-file, huge-image uploads (decompression
  bombs) cannot add up. ``queue`` more uploads wait up to ``queue_wait`` seconds for their turn; an upload beyond
  those, or one that waited too long, gets 503 with a ``Retry-After`` header at once. Its body is never read
  into memory.
- ``serve`` checks ``--port`` and ``--host``, and binds the socket, before the model loads.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations, whose types are imported lazily.

import asyncio
import contextlib
import errno
import io
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..devices import usable_cores
from ..errors import AgeGenderError, OptionError
from ..faces.detect import FaceDetector, default_detector
from ..images import IMAGE_FORMATS, MAX_PIXELS, ImageError, load_image
from .predict import Predictor

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
_STATUS = {"unsupported": 415, "corrupt": 422, "too_large": 413}
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _default_slots() -> int:
    return max(1, usable_cores())


@dataclass(frozen=True)
class ServiceLimits:
    """How much work and waiting the service accepts; see the module docstring."""

    slots: int = field(default_factory=_default_slots)  # uploads decoded and predicted at once
    queue: int | None = None  # uploads waiting for a slot; None: 2 x slots, at least 4
    queue_wait: float = 10.0  # seconds an upload waits for a slot before 503
    decode_pixels: int = 2 * MAX_PIXELS  # declared pixels decoded at once, summed over the slots
    body_timeout: float = 30.0  # seconds for a whole request body
    read_timeout: float = 5.0  # seconds without a byte of the body
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0  # seconds for a request's line and headers, from the connection or the last answer
    connections: int = 1024  # open connections at once; more are closed at once
    per_client: int = 64  # open connections from one address; more are closed at once

    @property
    def waiting(self) -> int:
        return self.queue if self.queue is not None else max(4, 2 * self.slots)

    def check(self) -> None:
        """Raise :class:`AgeGenderError` for a value out of range, naming it."""
        if self.slots < 1:
            raise AgeGenderError(f"slots must be at least 1, got {self.slots}")
        if self.waiting < 0:
            raise AgeGenderError(f"queue must be 0 or more, got {self.queue}")
        if self.decode_pixels < 1:
            raise AgeGenderError(f"decode_pixels must be positive, got {self.decode_pixels}")
        if self.connections < 1 or self.per_client < 1:
            raise AgeGenderError(f"connections and per_client must be at least 1, got {self.connections} and {self.per_client}")
        for name in ("queue_wait", "body_timeout", "read_timeout", "keep_alive", "header_timeout"):
            value = getattr(self, name)
            if not value > 0:  # also refuses NaN
                raise AgeGenderError(f"{name} must be a positive number of seconds, got {value}")


class BodyGuard:
    """ASGI middleware over request bodies: 413 when a request declares or sends more than ``max_bytes``,
    408 when its body is not in within ``body_timeout`` seconds or stalls for ``read_timeout``.

    Both are answered before anything parses the body, with ``Connection: close``.
    """

    def __init__(self, app: Any, max_bytes: int, body_timeout: float = 30.0, read_timeout: float = 5.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.read_timeout = read_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send, 413, self._too_large())
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        state: dict[str, Any] = {"received": 0, "done": False, "reject": None, "answered": False}

        async def guarded_receive() -> dict[str, Any]:
            if state["reject"] is not None:
                return {"type": "http.disconnect"}
            if state["done"]:  # the body is in; what follows is only ever a disconnect
                return await receive()
            wait = min(self.read_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                state["reject"] = (408, f"request body not received within {self._timeouts()}; connection closed")
                # The app sees a client that went away; whatever it answers is replaced by the 408.
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["reject"] = (413, self._too_large())
                    return {"type": "http.disconnect"}
                state["done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["reject"] is not None:
                if not state["answered"]:
                    state["answered"] = True
                    await self._reject(send, *state["reject"])
                return
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if state["reject"] is None:
                raise
        if state["reject"] is not None and not state["answered"]:
            state["answered"] = True
            await self._reject(send, *state["reject"])

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes:,} bytes"

    def _timeouts(self) -> str:
        return f"{self.body_timeout:g} s (or with a {self.read_timeout:g} s pause)"

    @staticmethod
    async def _reject(send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _Busy(Exception):
    """No decode slot within the wait, or the queue is full: answered 503."""


class DecodeLimiter:
    """Admission for decode-and-predict work, in the event loop: ``slots`` at a time whose declared pixels fit
    ``decode_pixels`` together, ``queue`` more waiting at most ``queue_wait`` seconds, the rest turned away.

    An image over the whole pixel budget on its own still runs, alone.
    """

    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self.admitted = 0  # running + waiting
        self.running = 0
        self.queued = 0  # waiting for a slot or for pixels of the budget
        self.pixels = 0  # declared pixels of the running uploads
        self._condition: tuple[asyncio.AbstractEventLoop, asyncio.Condition] | None = None

    def busy(self) -> str:
        return (
            f"busy: {self.admitted} uploads in progress ({self.limits.slots} decoded at a time, "
            f"{self.limits.waiting} waiting); retry in a few seconds"
        )

    @contextlib.contextmanager
    def admission(self) -> Any:
        """Count one upload as running or waiting; ``_Busy`` when the queue is full."""
        if self.admitted >= self.limits.slots + self.limits.waiting:
            raise _Busy(self.busy())
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def _cond(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._condition is None or self._condition[0] is not loop:  # one per event loop (test clients)
            self._condition = (loop, asyncio.Condition())
        return self._condition[1]

    @contextlib.asynccontextmanager
    async def slot(self, pixels: int) -> AsyncIterator[None]:
        """Hold a decode slot and ``pixels`` of the budget; ``_Busy`` after ``queue_wait`` seconds without one."""
        cost = min(max(pixels, 1), self.limits.decode_pixels)
        cond = self._cond()

        def free() -> bool:
            return self.running < self.limits.slots and (self.running == 0 or self.pixels + cost <= self.limits.decode_pixels)

        async with cond:
            self.queued += 1
            try:
                await asyncio.wait_for(cond.wait_for(free), self.limits.queue_wait)
            except TimeoutError:
                raise _Busy(f"busy: no decode slot free within {self.limits.queue_wait:g} s; retry in a few seconds") from None
            finally:
                self.queued -= 1
            self.running += 1
            self.pixels += cost
        try:
            yield
        finally:
            async with cond:
                self.running -= 1
                self.pixels -= cost
                cond.notify_all()


_ERROR_BODY = {
    "content": {
        "application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}
    }
}
# Every status /predict answers besides 200, with the one-line reason in ``detail``: documented so clients
# (and schemathesis) can rely on the schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Not a usable image or request", **_ERROR_BODY},
    408: {"description": "The request body did not arrive in time; the connection is closed", **_ERROR_BODY},
    413: {"description": "The request body or the image is too large", **_ERROR_BODY},
    415: {"description": "Not an image format the service reads", **_ERROR_BODY},
    422: {"description": "A corrupt image, or no file field"},
    503: {"description": "Busy: every decode slot and queue place is taken; retry after Retry-After seconds", **_ERROR_BODY},
}


def _declared_pixels(data: bytes) -> int:
    """Width x height from the image header, without decoding (0 when there is no readable header)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            w, h = image.size
            return int(w) * int(h)
    except Exception:  # not an image, or a header Pillow refuses: load_image gives the reason
        return 0


def create_app(
    predictor: Predictor, max_bytes: int = DEFAULT_MAX_BYTES, model_name: str | None = None, limits: ServiceLimits | None = None
) -> "FastAPI":
    """The API over one loaded ``predictor``: ``GET /`` (the page), ``GET /health``, ``POST /predict`` (multipart
    ``file``) and ``GET /docs`` (the OpenAPI page)."""
    from fastapi import FastAPI, File, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    limits = limits or ServiceLimits()
    limits.check()
    limiter = DecodeLimiter(limits)
    page = resources.files("agegender.infer").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="agegender", docs_url="/docs", redoc_url=None)
    app.state.limiter = limiter  # its counters, for monitoring and for tests that wait on them
    app.add_middleware(BodyGuard, max_bytes=max_bytes, body_timeout=limits.body_timeout, read_timeout=limits.read_timeout)

    def predict_upload(data: bytes, name: str) -> dict[str, Any]:
        rgb = load_image(data, name)
        faces = predictor.predict(rgb)
        return {
            "path": name,
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "faces": [f.to_dict() for f in faces],
            "error": None,
        }

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Any:
        return Response(status_code=204)  # the page carries its icon inline; browsers still ask

    @app.get("/health")
    async def health() -> dict[str, Any]:  # on the event loop: never waits for a thread busy decoding
        info = predictor.info()
        return {
            "status": "ok",
            **info,
            "model": model_name or info.get("model"),
            "max_bytes": max_bytes,
            "slots": limits.slots,
            "queue": limits.waiting,
        }

    @app.post("/predict", responses=ERROR_RESPONSES)
    async def predict(file: UploadFile = File(...)) -> Any:
        name = os.path.basename(file.filename or "upload") or "upload"
        try:
            with limiter.admission():  # before the body is read into memory
                data = await file.read()
                async with limiter.slot(_declared_pixels(data)):
                    # Decoding and inference block; the threadpool keeps the event loop serving other requests.
                    return await run_in_threadpool(predict_upload, data, name)
        except _Busy as e:
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "2"})
        except ImageError as e:
            return JSONResponse({"detail": str(e)}, status_code=_STATUS.get(e.kind, 400))
        except AgeGenderError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        finally:
            await file.close()

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Raise :class:`AgeGenderError` unless ``port`` is 1-65535 and ``host`` is an IP address or a host name."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise OptionError(f"`port` must be between 1 and 65535, got {port}", "port")
    try:
        ipaddress.ip_address(host.strip("[]") if host.startswith("[") else host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise OptionError(f"`host` {host!r} is not an IP address or a host name", "host")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (after :func:`check_address`), or an error saying why it cannot be."""
    check_address(host, port)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise OptionError(f"`host` {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})", "host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = f"cannot listen on {host}:{port} ({e.strerror or e})"
        hint = {
            errno.EADDRINUSE: ("another program uses this port", "port"),
            errno.EACCES: ("ports below 1024 need privileges", "port"),
            errno.EADDRNOTAVAIL: ("this machine has no such address", "host"),
        }.get(e.errno or 0)
        if hint is None:
            raise AgeGenderError(why) from None
        raise OptionError(f"{why}; {hint[0]}: choose another `{hint[1]}`", hint[1]) from None
    return sock


def uvicorn_config(app: Any, limits: ServiceLimits | None = None, log_level: str = "info") -> Any:
    """The uvicorn settings the service runs with: keep-alive, header timeout, connection caps, graceful shutdown.

    uvicorn's own ``limit_concurrency`` is not used: it counts connections that have not sent a request yet, so
    clients holding connections open with slow headers would make it answer 503 to everyone, ``/health``
    included. Connections are bounded by :func:`guarded_protocol` instead (a header timeout, a cap per client
    and in all), and the work they ask for by :class:`DecodeLimiter`.
    """
    import uvicorn

    limits = limits or ServiceLimits()
    return uvicorn.Config(
        app,
        log_level=log_level,
        ws="none",
        lifespan="on",
        server_header=False,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive,
        h11_max_incomplete_event_size=16 * 1024,  # headers of 16 KB at most
        timeout_graceful_shutdown=10,
    )


def service_url(host: str, port: int) -> str:
    """The address to open in a browser: a wildcard host is reached through this machine's name."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}/"


def guarded_protocol(limits: ServiceLimits) -> type:
    """uvicorn's h11 protocol with what it lacks against slow clients (uvicorn 0.55 has no header timeout).

    A connection must deliver each request's line and headers within ``header_timeout`` seconds of opening, or of
    the previous answer; otherwise it is closed. Connections beyond ``per_client`` from one address, or beyond
    ``connections`` in all, are closed as they open, so no client can hold every connection.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client: dict[str, int] = {}

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else "?"
            if len(self.connections) > limits.connections or per_client.get(host, 0) >= limits.per_client:
                log.warning(
                    "closing a connection from %s: too many open (%d from it, %d in all)",
                    host,
                    per_client.get(host, 0),
                    len(self.connections),
                )
                transport.abort()
                return
            self._counted = host
            per_client[host] = per_client.get(host, 0) + 1
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no whole request
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in: the body has its own deadlines (BodyGuard)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers are due in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                per_client[self._counted] -= 1
                if not per_client[self._counted]:
                    del per_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

    return GuardedH11Protocol


def _run(config: Any, sock: socket.socket) -> None:
    import uvicorn

    uvicorn.Server(config).run(sockets=[sock])


def serve(
    model: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    precision: str = "auto",
    device: str = "cpu",
    detector: FaceDetector | None = None,
    limits: ServiceLimits | None = None,
    min_confidence: float = 0.5,
    flip: bool = False,
) -> None:
    """Load ``model`` once (None: the bundled model) and serve the API and page with uvicorn until interrupted.

    ``detector`` finds the faces (None: :func:`~agegender.faces.detect.default_detector`'s).

    Every option, the address included, is checked (and the socket bound) before the model loads.
    """
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise AgeGenderError(f"serve needs {', '.join(missing)}: pip install agegender (its default install has the service)")
    if max_bytes < 1:
        raise OptionError(f"`max_bytes` must be positive, got {max_bytes}", "max_bytes")
    limits = limits or ServiceLimits()
    limits.check()
    sock = listen(host, port)
    try:
        predictor = Predictor.from_path(
            model,
            detector or default_detector(),
            device=device,
            precision=precision,
            min_confidence=min_confidence,
            flip=flip,
        )
        if not _is_loopback(host):
            log.warning("binding %s: the API is reachable from other machines and has no authentication", host)
        name = None if model is None else os.path.basename(os.fspath(model))
        app = create_app(predictor, max_bytes, model_name=name, limits=limits)
        url = service_url(host, sock.getsockname()[1])
        log.info("serving %s (the page), %sdocs (the API), %shealth; Ctrl+C stops", url, url, url)
        _run(uvicorn_config(app, limits), sock)
    finally:
        sock.close()
