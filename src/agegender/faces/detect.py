"""Face detectors: RetinaFace by default, OpenCV's Haar cascade as the fallback; each states the framing of its
boxes (:mod:`agegender.faces.framing`), and :func:`default_detector` and :func:`photo_framer` pick one per job."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import usable_cores
from ..errors import AgeGenderError, OptionError
from ..images import as_rgb
from . import retinaface as rf
from .face import Detection, FaceDetector
from .framing import HAAR, RETINAFACE, PhotoFramer

if TYPE_CHECKING:
    from ..model.config import Preprocess

__all__ = [
    "DETECTORS",
    "MIN_FACE_PX",
    "FaceDetector",
    "HaarDetector",
    "RetinaFace",
    "default_detector",
    "photo_framer",
    "subject_detector",
]

MIN_FACE_PX = 40  # faces smaller than this are ignored by default (see HaarDetector)
SUBJECT_MIN_FACE_PX = 20  # the floor when finding a labelled photo's subject: training crops are small
SCORE_THRESHOLD = 0.5  # RetinaFace's default confidence floor, chosen in BENCHMARKS.md figure 9

HAAR_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")


class HaarDetector:
    """OpenCV's bundled frontal-face cascade; falls back to the alt2 cascade when it finds nothing.

    Faces smaller than ``min_face`` of the image's shorter side, or than ``min_face_px`` pixels, are ignored,
    so the image is first shrunk until that size meets the cascade's 24 px window: big photos cost no more
    than small ones, and a 250 px portrait is not searched for 24 px faces (a 40 px face already fills the
    classifier's 64 px crop). The cascade's cost is mostly its smallest windows, so ``min_face_px`` is the
    speed knob (DECISIONS.md: the Haar cascade's settings). Cascades are per thread: OpenCV's
    ``CascadeClassifier`` is not safe to share between threads. Faces come most neighbours first; the score is
    the neighbour count.
    """

    name = "haar"
    framing = HAAR
    window = 24  # the default cascade's training window, in pixels

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 2,
        min_face: float = 0.08,
        min_face_px: int = MIN_FACE_PX,
        fallback: bool = True,
    ) -> None:
        if min_face_px < 8:
            raise AgeGenderError(f"the smallest face must be at least 8 px, got {min_face_px}")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face = min_face
        self.min_face_px = min_face_px
        # Resolved here, in the constructing thread: cv2's lazy submodules break when first imported by threads.
        import cv2

        folder = Path(cv2.data.haarcascades)  # type: ignore[attr-defined]
        self.cascades = [folder / n for n in (HAAR_CASCADES if fallback else HAAR_CASCADES[:1])]
        self._local = threading.local()

    def _classifiers(self) -> list[Any]:
        import cv2

        loaded = getattr(self._local, "classifiers", None)
        if loaded is None:
            loaded = []
            for path in self.cascades:
                classifier = cv2.CascadeClassifier(str(path))
                if classifier.empty():
                    raise AgeGenderError(f"{path}: OpenCV could not load the cascade")
                loaded.append(classifier)
            self._local.classifiers = loaded
        return loaded

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        gray = cv2.cvtColor(as_rgb(rgb), cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        # Scaled so the smallest face wanted fills the window: shrunk, or enlarged for a floor under 24 px.
        scale = self.window / max(self.min_face_px, self.min_face * min(h, w))
        if scale != 1.0:
            gray = cv2.resize(
                gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            )
        gray = cv2.equalizeHist(gray)
        for classifier in self._classifiers():
            boxes, neighbours = classifier.detectMultiScale2(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(self.window, self.window)
            )
            if len(boxes):
                found = [
                    Detection(round(x / scale), round(y / scale), round(bw / scale), round(bh / scale), float(n), self.framing)
                    for (x, y, bw, bh), n in zip(boxes, neighbours)
                ]
                return sorted(found, key=lambda f: (f.score, f.area), reverse=True)
        return []


class RetinaFace:
    """RetinaFace MobileNet-0.25 (the network: :mod:`agegender.faces.retinaface`): faces with 5 landmarks each,
    largest first, in RetinaFace's own framing.

    ``weights`` is ONNX bytes or a path to an ``.onnx`` file; None takes the bundled copy. Faces whose box's
    longer side (the height, a median 1.37x the width; a Haar box side is about 0.9x it) is under
    ``min_face_px`` original pixels are dropped, and of the rest only the ``max_faces`` largest kept: in group
    photos the nearest faces matter most. Boxes are rounded to whole pixels, as the bundled model's figures were
    measured; landmarks keep their sub-pixel positions.

    Images whose long side exceeds ``max_side`` are shrunk to it first, keeping the aspect ratio (None: never);
    nothing is enlarged: 640 keeps the small faces of group photos, 320 is faster for portraits (DECISIONS.md:
    RetinaFace's input cap). No padding: the graph accepts any size, and the priors follow its rounding.

    The onnxruntime session is made on first use, with ``threads`` threads (default: the cores this process may
    use), and may be shared between threads.
    """

    name = "retinaface"
    framing = RETINAFACE

    def __init__(
        self,
        weights: bytes | str | os.PathLike[str] | None = None,
        min_face_px: int = MIN_FACE_PX,
        score_threshold: float = SCORE_THRESHOLD,
        max_faces: int | None = None,
        threads: int | None = None,
        *,
        nms_threshold: float = 0.4,
        max_side: int | None = rf.MAX_SIDE,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        mean_bgr: tuple[float, float, float] = rf.MEAN_BGR,
    ) -> None:
        if min_face_px < 1:
            raise AgeGenderError(f"the smallest face must be at least 1 px, got {min_face_px}")
        if not 0 < score_threshold < 1:
            raise AgeGenderError(f"the score threshold must be in (0, 1), got {score_threshold}")
        if max_faces is not None and max_faces < 1:
            raise OptionError(f"`max_faces` must be at least 1, got {max_faces}", "max_faces")
        if not 0 < nms_threshold <= 1:
            raise AgeGenderError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if max_side is not None and max_side < 32:
            raise AgeGenderError(f"max_side must be at least 32 px, got {max_side}")
        self.weights = weights
        self.min_face_px, self.max_faces = min_face_px, max_faces
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_side, self.mean_bgr = max_side, mean_bgr
        self.threads = threads or usable_cores()
        self.providers = tuple(providers)
        self._session: Any = None
        self._lock = threading.Lock()

    def set_threads(self, threads: int) -> None:
        """Threads for each run; a session made with another count is made again when next used."""
        if threads < 1:
            raise AgeGenderError(f"threads must be at least 1, got {threads}")
        with self._lock:
            if threads != self.threads:
                self.threads, self._session = threads, None

    def session(self) -> Any:
        """The onnxruntime session, made on first call."""
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    self._session = rf.load_session(self.weights, self.threads, self.providers)
                session = self._session
        return session

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image (gray and RGBA accepted), largest first."""
        rgb = as_rgb(rgb)
        boxes, scores, marks = rf.run(self.session(), rgb, self.max_side, self.mean_bgr, self.score_threshold, self.nms_threshold)
        found = []
        for (x1, y1, x2, y2), score, points in zip(boxes.tolist(), scores.tolist(), marks):
            if max(x2 - x1, y2 - y1) >= self.min_face_px:
                found.append((x1, y1, x2 - x1, y2 - y1, score, points))
        found.sort(key=lambda f: f[2] * f[3], reverse=True)
        return [
            Detection(round(x), round(y), round(w), round(h), score, self.framing, points)
            for x, y, w, h, score, points in found[: self.max_faces]
        ]


DETECTORS = ("auto", "retinaface", "haar")


def default_detector(
    min_face_px: int = MIN_FACE_PX,
    score_threshold: float = SCORE_THRESHOLD,
    max_faces: int | None = None,
    threads: int | None = None,
    kind: str = "auto",
) -> FaceDetector:
    """RetinaFace with the bundled weights ("auto" and "retinaface"), or OpenCV's Haar cascade ("haar")."""
    if kind not in DETECTORS:
        raise AgeGenderError(f"unknown detector {kind!r}; choose from {', '.join(DETECTORS)}")
    if kind == "haar":
        return HaarDetector(min_face_px=min_face_px)
    return RetinaFace(rf.find_retinaface_weights(), min_face_px, score_threshold, max_faces, threads)


def subject_detector() -> FaceDetector:
    """The detector that finds a labelled photo's subject, for training, evaluation and ``no_detect`` prediction
    alike: RetinaFace with a 20 px floor, on the calling thread's core."""
    return default_detector(min_face_px=SUBJECT_MIN_FACE_PX, threads=1)


def photo_framer(preprocess: Preprocess) -> PhotoFramer | None:
    """The framer training and evaluation use for ``preprocess``: None keeps the plain centre-square decode."""
    if preprocess.alignment == "crop":
        return None
    return PhotoFramer(preprocess, subject_detector())
