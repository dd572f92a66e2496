"""Face detection (RetinaFace by default, OpenCV Haar cascades as the fallback, or the res10 SSD) and the crop
convention shared with training.

The training set's WIKI/IMDB crops are 128x128 squares with margin around the face. The convention was
measured with :class:`HaarDetector` on 1,108 WIKI crops made the IMDB-WIKI way (the largest box per image;
a face was found in 1,063): the image side is a median 1.82x the box side (IQR 1.72-1.95), and the image
centre lies 0.074 box heights below the box centre (IQR 0.051-0.096). The detector's former, finer settings
(scale 1.05, 4 neighbours) gave the same: 1.83x and 0.074. Horizontally it lies 0.034
box widths right (median), but that is head pose, not framing: on mirrored images it is -0.030 and its mean
is 0.005, so the crop is centred horizontally. Hence :data:`CROP_SCALE` and :data:`CROP_SHIFT_Y`.

RetinaFace boxes are narrower and taller than Haar's (median 0.81x as wide and 1.12x as tall on 285 WIKI and
LFW photos, same centre). Re-derived on all 1,108 WIKI crops, the image side is a median 1.659x the RetinaFace
box height (IQR 1.566-1.748) and the image centre lies 0.069 box heights below the box centre (IQR
0.046-0.088), which :data:`RETINA_CROP_SCALE` and :data:`RETINA_CROP_SHIFT_Y` carry.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import AgeGenderError, OptionError
from ..images import ImageError

log = logging.getLogger(__name__)

MIN_FACE_PX = 40  # faces smaller than this are ignored by default (see HaarDetector)
CROP_SCALE = 1.83  # crop side / detected box side
CROP_SHIFT_Y = 0.074  # crop centre below the box centre, in box heights


@dataclass(frozen=True)
class Framing:
    """How one detector's boxes map onto the two framings the backbones read, as measured on real photos.

    ``crop_scale`` and ``crop_shift`` give the training-style square (side = scale x the box's longer side,
    centre ``crop_shift`` box heights below the box centre). ``dlib_side`` and ``dlib_shift`` give the square
    box dlib's HOG detector would have found, which its shape predictor was trained to start from.
    """

    crop_scale: float
    crop_shift: float
    dlib_side: float
    dlib_shift: float


# RetinaFace vs dlib's HOG boxes, 623 LFW/WIKI/FairFace photos where each found one face: dlib's square is a
# median 0.80 RetinaFace box heights (IQR 0.76-0.86) with its centre 0.049 heights lower (IQR 0.018-0.079).
# Haar's side is a median 1/1.116 of RetinaFace's height with the same centre, which gives Haar's dlib terms.
# "image" is the whole picture of a face crop that no detector framed (tight, aligned training crops).
FRAMINGS: dict[str, Framing] = {
    "haar": Framing(CROP_SCALE, CROP_SHIFT_Y, 0.893, 0.047),
    "dnn": Framing(CROP_SCALE, CROP_SHIFT_Y, 0.893, 0.047),
    "retinaface": Framing(1.659, 0.069, 0.80, 0.049),
    "image": Framing(1.0, 0.0, 0.62, 0.05),
}

HAAR_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")


@dataclass
class Box:
    """A face in pixel coordinates of the image it was found in; ``score`` is detector-specific.

    ``landmarks`` are RetinaFace's 5 points (image-left eye, image-right eye, nose, image-left and image-right
    mouth corners) when the detector gives them. ``detector`` names the box's convention in :data:`FRAMINGS`.
    """

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    landmarks: tuple[tuple[float, float], ...] | None = None
    detector: str = field(default="haar", compare=False)  # whose box this is: its key in FRAMINGS

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "score": self.score}
        if self.landmarks is not None:
            d["landmarks"] = [[round(x, 1), round(y, 1)] for x, y in self.landmarks]
        return d


class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image, best first."""
        ...


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}", "unsupported")
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


class HaarDetector:
    """OpenCV's bundled frontal-face cascade; falls back to the alt2 cascade when it finds nothing.

    Faces smaller than ``min_face`` of the image's shorter side, or than ``min_face_px`` pixels, are ignored,
    so the image is first shrunk until that size meets the cascade's 24 px window: big photos cost no more
    than small ones, and a 250 px portrait is not searched for 24 px faces (a 40 px face already fills the
    classifier's 64 px crop). The cascade's cost is mostly its smallest windows, so ``min_face_px`` is the
    speed knob: on LFW, 40 px with the coarser ``scale_factor`` 1.1 and ``min_neighbors`` 2 (a coarser pyramid
    gives each face fewer neighbouring hits) made detection 5x faster than the former 1.05/4 with no floor in
    pixels, finding a face in 99.7% of LFW photos (before: 99.7%), 87.0% of FairFace (87.4%) and 97.5% of
    WIKI (98.2%), and all 6 faces in 2x3 group collages; equalising the histogram first adds 2 points on
    FairFace. Cascades are per thread: OpenCV's ``CascadeClassifier`` is not safe to share between threads.
    """

    name = "haar"
    window = 24  # the default cascade's training window, in pixels

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 2, min_face: float = 0.08,
                 min_face_px: int = MIN_FACE_PX, fallback: bool = True) -> None:
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

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        gray = _gray(rgb)
        h, w = gray.shape
        # Scaled so the smallest face wanted fills the window: shrunk, or enlarged for a floor under 24 px.
        scale = self.window / max(self.min_face_px, self.min_face * min(h, w))
        if scale != 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)),
                              interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        gray = cv2.equalizeHist(gray)
        for classifier in self._classifiers():
            boxes, neighbours = classifier.detectMultiScale2(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(self.window, self.window))
            if len(boxes):
                found = [Box(round(x / scale), round(y / scale), round(bw / scale), round(bh / scale), float(n))
                         for (x, y, bw, bh), n in zip(boxes, neighbours)]
                return sorted(found, key=lambda b: (b.score, b.w * b.h), reverse=True)
        return []


class DnnDetector:
    """OpenCV's res10 300x300 SSD face detector from user-supplied ``deploy.prototxt`` and ``.caffemodel`` files."""

    name = "dnn"

    def __init__(self, prototxt: str | Path, caffemodel: str | Path, threshold: float = 0.5) -> None:
        import cv2

        for path in (prototxt, caffemodel):
            if not Path(path).is_file():
                raise AgeGenderError(f"{path}: no such detector file")
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
        except cv2.error as e:
            raise AgeGenderError(f"{caffemodel}: OpenCV cannot read the detector ({str(e).strip().splitlines()[-1]})") from None
        self.threshold = threshold
        self._lock = threading.Lock()  # a cv2.dnn.Net keeps per-forward state

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        h, w = _gray(rgb).shape
        # The network was trained on 300x300 BGR input minus this mean.
        blob = cv2.dnn.blobFromImage(cv2.resize(rgb[..., ::-1], (300, 300)), 1.0, (300, 300), (104.0, 177.0, 123.0))
        with self._lock:
            self.net.setInput(blob)
            out = self.net.forward()  # (1, 1, N, 7): image id, label, score, x1, y1, x2, y2 (relative)
        boxes = []
        for _, _, score, x1, y1, x2, y2 in out.reshape(-1, 7):
            if score < self.threshold:
                continue
            x1, x2 = (np.clip([x1, x2], 0, 1) * w).round().astype(int)
            y1, y2 = (np.clip([y1, y2], 0, 1) * h).round().astype(int)
            if x2 > x1 and y2 > y1:
                boxes.append(Box(int(x1), int(y1), int(x2 - x1), int(y2 - y1), float(score), detector="dnn"))
        return sorted(boxes, key=lambda b: b.score, reverse=True)


def crop_box(box: Box) -> tuple[int, int, int]:
    """``(left, top, side)`` of the square training-style crop around a detected ``box``."""
    framing = FRAMINGS[box.detector]
    side = max(1, round(max(box.w, box.h) * framing.crop_scale))
    cx = box.x + box.w / 2
    cy = box.y + box.h / 2 + framing.crop_shift * box.h
    return round(cx - side / 2), round(cy - side / 2), side


def dlib_box(box: Box) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of the box dlib's HOG detector would give for ``box``'s face."""
    framing = FRAMINGS[box.detector]
    side = max(box.w, box.h) * framing.dlib_side
    cx, cy = box.x + box.w / 2, box.y + box.h / 2 + framing.dlib_shift * box.h
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def crop_face(rgb: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 crop around ``box`` framed like the training faces; edges replicated outside."""
    from PIL import Image

    left, top, side = crop_box(box)
    h, w = rgb.shape[:2]
    # Clipped indices repeat the edge pixels wherever the square leaves the image.
    rows = np.clip(np.arange(top, top + side), 0, h - 1)
    cols = np.clip(np.arange(left, left + side), 0, w - 1)
    square = np.ascontiguousarray(rgb[np.ix_(rows, cols)])
    # Pillow's bilinear widens its filter when shrinking, as in the training images' decoding.
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


class RetinaFace:
    """RetinaFace MobileNet-0.25 (see :mod:`agegender.faces.retinaface`) as a :class:`FaceDetector`: boxes with
    5 landmarks and RetinaFace's own crop convention, faces under ``min_face_px`` dropped, at most ``max_faces``."""

    name = "retinaface"

    def __init__(self, weights: bytes, min_face_px: int = MIN_FACE_PX, score_threshold: float = 0.5,
                 max_faces: int | None = None, threads: int | None = None) -> None:
        from .retinaface import RetinaFaceDetector

        if min_face_px < 1:
            raise AgeGenderError(f"the smallest face must be at least 1 px, got {min_face_px}")
        if not 0 < score_threshold < 1:
            raise AgeGenderError(f"the score threshold must be in (0, 1), got {score_threshold}")
        if max_faces is not None and max_faces < 1:
            raise OptionError(f"`max_faces` must be at least 1, got {max_faces}", "max_faces")
        self.min_face_px, self.max_faces = min_face_px, max_faces
        self.net = RetinaFaceDetector(weights, score_threshold=score_threshold, min_face=min_face_px,
                                      intra_op_num_threads=threads)

    def set_threads(self, threads: int) -> None:
        self.net.set_threads(threads)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        found = self.net.detect(rgb)
        # Largest first: in group photos the nearest faces matter most when --max-faces cuts the list.
        found = sorted(found, key=lambda d: d.area, reverse=True)[: self.max_faces]
        return [Box(round(d.x), round(d.y), round(d.w), round(d.h), float(d.score),
                    tuple((float(x), float(y)) for x, y in d.landmarks), "retinaface")
                for d in found]




DETECTORS = ("auto", "retinaface", "haar")


def default_detector(min_face_px: int = MIN_FACE_PX, score_threshold: float = 0.5, max_faces: int | None = None,
                     threads: int | None = None, kind: str = "auto") -> FaceDetector:
    """RetinaFace with the bundled weights ("auto" and "retinaface"), or OpenCV's Haar cascade ("haar")."""
    from .retinaface import find_retinaface_weights

    if kind not in DETECTORS:
        raise AgeGenderError(f"unknown detector {kind!r}; choose from {', '.join(DETECTORS)}")
    if kind == "haar":
        return HaarDetector(min_face_px=min_face_px)
    return RetinaFace(find_retinaface_weights(), min_face_px, score_threshold, max_faces, threads)
