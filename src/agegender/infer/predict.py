"""Gender and age for every face in images: detect, frame, classify with a checkpoint or an ONNX export.

The backends that run a model file are in :mod:`agegender.model.runtime`; writing results for the command line
is :mod:`agegender.output`.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import usable_cores
from ..errors import AgeGenderError
from ..faces.detect import default_detector, subject_detector
from ..faces.face import Detection, FaceDetector
from ..faces.framing import FaceFramer, PhotoFramer
from ..images import ImageInput, load_image
from ..labels import ADIENCE_GROUP_NAMES, age_group
from ..model.contract import check_finite_outputs
from ..model.runtime import Backend, Decoded, ModelCallTimeout, load_backend
from ..process import ThreadScope, set_process_threads

__all__ = ["Face", "ImageResult", "Predictor"]

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # the gender of a face whose P(male) is too close to 0.5 for ``min_confidence``


@dataclass
class Face:
    box: Detection | None  # None when the whole image was classified (no detection)
    gender: str  # a label name, or "unknown" below the predictor's min_confidence
    p_male: float
    age: float | None  # None when the model has no age head
    age_group: str | None
    age_low: float | None = None  # the 10th-90th percentile interval of the age distribution (DEX heads)
    age_high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "box": self.box.to_dict() if self.box else None,
            "gender": self.gender,
            "p_male": round(self.p_male, 6),
            "age": None if self.age is None else round(self.age, 2),
            "age_group": self.age_group,
        }
        if self.age_low is not None and self.age_high is not None:
            d.update(age_low=round(self.age_low), age_high=round(self.age_high))
        return d

    def label(self) -> str:
        """Short caption such as ``M 34``."""
        return ("?" if self.gender == UNKNOWN else self.gender[:1].upper()) + ("" if self.age is None else f" {round(self.age)}")


@dataclass
class ImageResult:
    path: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    frame: int | None = None  # video frames only: the frame index and its time in seconds
    time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "faces": [f.to_dict() for f in self.faces], "error": self.error}
        if self.frame is not None:
            d.update(path=self.path.rsplit("#", 1)[0], frame=self.frame, time=self.time)
        return d


# -- prediction ---------------------------------------------------------------------------------

# (name, the call that finds its boxes and crops, frame index, seconds) of one image or video frame
_Job = tuple[str, Callable[[], Any], "int | None", "float | None"]


@dataclass
class _Pending:
    path: str
    boxes: list[Detection | None]
    first: int  # index of this image's first crop in the batch buffer
    error: str | None = None
    frame: int | None = None
    time: float | None = None


class Predictor:
    """Faces -> gender and age. Thread-safe: detectors keep per-thread state, and backends only read their weights."""

    def __init__(
        self,
        backend: Backend,
        detector: FaceDetector | None = None,
        no_detect: bool = False,
        workers: int | None = None,
        min_confidence: float = 0.5,
    ) -> None:
        if not 0.5 <= min_confidence < 1:
            raise AgeGenderError(f"min_confidence must be in [0.5, 1), got {min_confidence}")
        self.backend = backend
        self.meta = backend.meta
        self.size = backend.meta.config.image_size
        self.detector = None if no_detect else (detector or default_detector())
        self.min_confidence = min_confidence
        pre = backend.meta.preprocess.resized(self.size)
        # The backbone's contract decides the framing: crops for VGG-Face, 5-point chips for dlib's ResNet.
        self.face_framer = FaceFramer(pre)
        # A chip model reads 5-point chips, so a given crop (no_detect) is framed as training framed its photos:
        # the subject found in the crop, then aligned. From the whole crop alone the shape predictor misplaces
        # children's points (200 UTKFace crops: gender 0.835 / MAE 8.8 years, against 0.855 / 5.55 this way).
        finder = subject_detector() if no_detect and pre.alignment != "crop" else None
        self.photo_framer = PhotoFramer(pre, finder, faces=self.face_framer)
        self.workers = max(1, workers or usable_cores())

    @classmethod
    def from_path(
        cls,
        model: str | os.PathLike[str] | None = None,
        detector: FaceDetector | None = None,
        device: str = "cpu",
        no_detect: bool = False,
        precision: str = "auto",
        min_confidence: float = 0.5,
        flip: bool = False,
    ) -> Predictor:
        """A predictor over ``model`` (a run directory, checkpoint or ONNX export); None: the bundled model.
        ``flip`` averages each face with its mirror image (twice the model's work per face)."""
        from ..weights.zoo import bundled_model

        path = bundled_model() if model is None else model
        return cls(load_backend(path, device, precision, flip), detector, no_detect, min_confidence=min_confidence)

    @classmethod
    def default(cls, **options: Any) -> Predictor:
        """The bundled model (MODEL_CARD.md) with RetinaFace: ``Predictor.default().predict("photo.jpg")``."""
        return cls.from_path(None, **options)

    def info(self) -> dict[str, Any]:
        cfg = self.meta.config
        path = getattr(self.backend, "path", None)
        return {
            "model": self.meta.extra.get("name") or (None if path is None else os.path.basename(path)),
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "image_size": self.size,
            "age_head": cfg.age_head,
            "genders": list(self.meta.genders),
            "backbone": cfg.backbone,
            "alignment": self.meta.preprocess.alignment,
            "detector": "none" if self.detector is None else getattr(self.detector, "name", "custom"),
            "min_face_px": getattr(self.detector, "min_face_px", None),
            "min_confidence": self.min_confidence,
        }

    def crops(self, rgb: np.ndarray) -> tuple[list[Detection | None], list[np.ndarray]]:
        """The detected faces and their crops at the model's input size (the whole image with ``no_detect``)."""
        if self.detector is None:
            return [None], [self.photo_framer(rgb)]
        faces = self.detector.detect(rgb)
        return list(faces), [self.face_framer(rgb, f) for f in faces]

    def classify(self, crops: np.ndarray | list[np.ndarray], boxes: list[Detection | None] | None = None) -> list[Face]:
        """Faces for a batch of ``(S, S, 3)`` uint8 crops."""
        if len(crops) == 0:
            return []
        out = self.backend.run(np.stack(list(crops)))
        check_finite_outputs(len(crops), out.p_male, out.age)
        boxes = boxes or [None] * len(out)
        return [self._face(out, i, box) for i, box in enumerate(boxes)]

    def _face(self, out: Decoded, i: int, box: Detection | None) -> Face:
        p = float(out.p_male[i])
        sure = max(p, 1.0 - p) >= self.min_confidence
        gender = self.meta.genders[int(p >= 0.5)] if sure else UNKNOWN
        if out.age is None:
            return Face(box, gender, p, None, None)
        years = float(out.age[i])
        low, high = (None if a is None else float(a[i]) for a in (out.age_low, out.age_high))
        return Face(box, gender, p, years, ADIENCE_GROUP_NAMES[age_group(round(years))], low, high)

    def predict(self, image: ImageInput | Image.Image) -> list[Face]:
        """Every face in one image (a path, encoded bytes, an RGB array or a PIL image)."""
        boxes, crops = self.crops(load_image(image))
        return self.classify(crops, boxes)

    def predict_many(self, paths: Iterable[str | os.PathLike[str]], batch_size: int = 32) -> Iterator[ImageResult]:
        """One :class:`ImageResult` per path, in order; faces from several images share a batch.

        A bad image gives a result with ``error`` set and never stops the rest. See :meth:`_pipeline`.
        """
        jobs = ((os.fspath(p), partial(self._prepare, os.fspath(p)), None, None) for p in paths)
        # A queued path costs nothing until a worker decodes it: queue a batch's worth.
        return self._pipeline(jobs, batch_size, ahead=max(2 * self.workers, batch_size))

    def predict_frames(self, items: Iterable[tuple[str, np.ndarray, int, float]], batch_size: int = 32) -> Iterator[ImageResult]:
        """Results for decoded frames ``(name, rgb, frame index, seconds)``, in order, faces batched across frames."""
        jobs = ((name, partial(self.crops, rgb), index, seconds) for name, rgb, index, seconds in items)
        # A queued frame is already decoded (a 4K frame is 25 MB): queue only enough to keep the workers busy.
        return self._pipeline(jobs, batch_size, ahead=2 * self.workers)

    def _pipeline(self, jobs: Iterable[_Job], batch_size: int, ahead: int) -> Iterator[ImageResult]:
        """Results of ``jobs`` in order: each job finds an image's faces, then batches of faces are classified.

        Finding faces (decode, detect, crop) and classifying a batch are tasks of one pool of ``workers``
        threads, each task on one core (:func:`share_cores_for_batches`), so every core is busy until the last
        batch whichever stage is slower (DECISIONS.md: one pool for finding and classifying faces). At most ``ahead`` images are
        queued or being found; found ones wait as crops, so memory stays small.
        """
        if batch_size < 1:
            raise AgeGenderError(f"batch size must be at least 1, got {batch_size}")
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="predict")
        found: collections.deque[tuple[_Job, Future[Any]]] = collections.deque()
        classified: collections.deque[Future[list[ImageResult]]] = collections.deque()
        pending: list[_Pending] = []
        buffer: list[np.ndarray] = []

        def submit_batch() -> None:
            nonlocal pending, buffer
            classified.append(pool.submit(self._classify_pending, pending, buffer, batch_size))
            pending, buffer = [], []

        def take(job: _Job, result: Any) -> None:
            name, _, index, seconds = job
            if isinstance(result, AgeGenderError):
                pending.append(_Pending(name, [], len(buffer), str(result), index, seconds))
            else:
                pending.append(_Pending(name, result[0], len(buffer), None, index, seconds))
                buffer.extend(result[1])
            if len(buffer) >= batch_size:
                submit_batch()

        try:
            for job in jobs:
                found.append((job, pool.submit(job[1])))
                while found and (len(found) >= ahead or found[0][1].done()):
                    done, fut = found.popleft()
                    take(done, fut.result())
                while classified and (len(classified) > 2 or classified[0].done()):
                    yield from classified.popleft().result()
            while found:
                done, fut = found.popleft()
                take(done, fut.result())
            if pending:
                submit_batch()
            while classified:
                yield from classified.popleft().result()
        finally:  # a consumer that stops early leaves no work queued behind it
            pool.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, path: str) -> tuple[list[Detection | None], list[np.ndarray]] | AgeGenderError:
        try:
            return self.crops(load_image(path))
        except AgeGenderError as e:
            return e
        except Exception as e:  # one bad image must not abort a batch; the trace goes to the log
            log.exception("%s: unexpected failure", path)
            return AgeGenderError(f"{path}: {type(e).__name__}: {e}")

    def _classify_pending(self, pending: list[_Pending], buffer: list[np.ndarray], batch_size: int) -> list[ImageResult]:
        boxes = [box for item in pending for box in item.boxes]
        faces: list[Face] = []
        try:
            for start in range(0, len(buffer), batch_size):  # the last image may have overfilled the batch
                faces.extend(self.classify(buffer[start : start + batch_size], boxes[start : start + batch_size]))
        except ModelCallTimeout as e:  # the call was stopped: an error for each image in it, none retried alone
            return [
                ImageResult(item.path, [], item.error or (f"{item.path}: {e}" if item.boxes else None), item.frame, item.time)
                for item in pending
            ]
        except AgeGenderError as e:  # a NaN face: an error for its own image, the others classified alone
            if len(pending) == 1:
                return [ImageResult(pending[0].path, [], f"{pending[0].path}: {e}", pending[0].frame, pending[0].time)]
            return [
                r
                for item in pending
                for r in self._classify_pending(
                    [replace(item, first=0)], buffer[item.first : item.first + len(item.boxes)], batch_size
                )
            ]
        return [
            ImageResult(item.path, faces[item.first : item.first + len(item.boxes)], item.error, item.frame, item.time)
            for item in pending
        ]


def share_cores_for_batches(predictor: Predictor) -> ThreadScope:
    """Size the thread pools for :meth:`Predictor.predict_many` (the CLI does): one thread each.

    Its ``workers`` threads already keep every core busy, one task (find an image's faces, or classify a batch)
    each, and OpenCV's, onnxruntime's and PyTorch's own pools on top of them only oversubscribe the cores: two
    threads per classifier call beside the detectors cost 1.4x the CPU time per image on 2 cores. Without
    detection the classifier is the work, and keeps every core. A thread count set with ``OMP_NUM_THREADS``
    is left alone.

    Returns the process-wide pools' scope from before: ``with share_cores_for_batches(predictor): ...`` puts
    OpenCV's and torch's pools back after the block (the predictor's own sessions keep one thread each).
    """
    if predictor.detector is None:
        return ThreadScope()
    scope = set_process_threads(1, torch=False)  # torch's pool is the backend's: OMP_NUM_THREADS wins there
    set_threads = getattr(predictor.detector, "set_threads", None)
    if set_threads is not None:
        set_threads(1)
    predictor.backend.set_threads(1)
    return scope
