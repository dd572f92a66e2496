"""HTTP API and web page over a :class:`~agegender.predict.Predictor` (FastAPI, served by uvicorn)."""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations, whose types are imported lazily.

import ipaddress
import json
import logging
import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import AgeGenderError
from ..faces.detect import MIN_FACE_PX, FaceDetector, default_detector
from ..images import ImageError, load_image
from .predict import Predictor

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
_STATUS = {"unsupported": 415, "corrupt": 422, "too_large": 413}


class BodyLimit:
    """ASGI middleware: 413 when a request declares or sends more than ``max_bytes``, before anything parses it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send)
            return
        state = {"received": 0, "over": False, "answered": False}

        async def counting_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    # The app sees a client that went away; whatever it answers is replaced by the 413.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["over"]:
                if not state["answered"]:
                    state["answered"] = True
                    await self._reject(send)
                return
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["answered"]:
            await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(predictor: Predictor, max_bytes: int = DEFAULT_MAX_BYTES, model_name: str | None = None) -> "FastAPI":
    """The API over one loaded ``predictor``: ``GET /``, ``GET /health``, ``POST /predict`` (multipart ``file``)."""
    from fastapi import FastAPI, File, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse

    page = resources.files("agegender.infer").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="agegender", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    def predict_upload(data: bytes, name: str) -> dict[str, Any]:
        rgb = load_image(data, name)
        faces = predictor.predict(rgb)
        return {"path": name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                "faces": [f.to_dict() for f in faces], "error": None}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **predictor.info(), "max_bytes": max_bytes}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)) -> Any:
        data = await file.read()
        name = os.path.basename(file.filename or "upload")
        try:
            # Decoding and inference block; the threadpool keeps the event loop serving other requests.
            return await run_in_threadpool(predict_upload, data, name)
        except ImageError as e:
            return JSONResponse({"detail": str(e)}, status_code=_STATUS.get(e.kind, 400))
        except AgeGenderError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000,
          max_bytes: int = DEFAULT_MAX_BYTES, precision: str = "auto", min_face: int = MIN_FACE_PX,
          device: str = "cpu", detector: FaceDetector | None = None) -> None:
    """Load ``model`` once and serve the API and page with uvicorn until interrupted."""
    import uvicorn

    if max_bytes < 1:
        raise AgeGenderError(f"--max-bytes must be positive, got {max_bytes}")
    predictor = Predictor.from_path(model, detector or default_detector(min_face), device=device, precision=precision)
    if not _is_loopback(host):
        log.warning("binding %s: the API is reachable from other machines and has no authentication", host)
    app = create_app(predictor, max_bytes, model_name=os.path.basename(os.fspath(model)))
    uvicorn.run(app, host=host, port=port, log_level="info")
