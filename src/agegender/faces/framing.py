"""From a detected face to the pixels a backbone reads, following the backbone's input contract.

``crop`` (VGG-Face): the square around the box, framed like agegender_cleaned. ``chip5`` (dlib's ResNet): the
5-point shape predictor started from the box dlib's own detector would have given, then dlib's similarity-aligned
chip. ``landmarks5``: the chip placed by the detector's own 5 points where it gives them. Training photos go
through the same path (:class:`PhotoFramer`), so train and predict see the same faces.

The crop terms of each detector were measured on the training photos (DECISIONS.md: the crop convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..images import ImageError, fit_square
from .face import Detection, FaceDetector, Framing

if TYPE_CHECKING:
    from ..model.config import Preprocess
    from .align import ShapePredictor

CROP_SCALE = 1.83  # crop side / detected box side (Haar)
CROP_SHIFT_Y = 0.074  # crop centre below the box centre, in box heights (Haar)

# The dlib terms: where dlib's own detector would have put its square (DECISIONS.md: the crop convention).
HAAR = Framing("haar", CROP_SCALE, CROP_SHIFT_Y, 0.893, 0.047)
RETINAFACE = Framing("retinaface", 1.659, 0.069, 0.80, 0.049)
# The whole picture of a face crop that no detector framed (tight, aligned training crops).
WHOLE_IMAGE = Framing("image", 1.0, 0.0, 0.62, 0.05)


def whole_image(height: int, width: int) -> Detection:
    """The whole ``height`` x ``width`` picture taken as one face (a crop in which no detector found one)."""
    return Detection(0.0, 0.0, float(width), float(height), 1.0, WHOLE_IMAGE)


def crop_square(face: Detection) -> tuple[int, int, int]:
    """``(left, top, side)`` in pixels of the square training-style crop around ``face``, in its framing."""
    framing = face.framing
    side = max(1, round(max(face.w, face.h) * framing.crop_scale))
    cx = face.x + face.w / 2
    cy = face.y + face.h / 2 + framing.crop_shift * face.h
    return round(cx - side / 2), round(cy - side / 2), side


def dlib_rect(face: Detection) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of the box dlib's HOG detector would give for ``face``: where the shape
    predictor starts (see :mod:`agegender.faces.align` for dlib's rectangle convention)."""
    framing = face.framing
    side = max(face.w, face.h) * framing.dlib_side
    cx, cy = face.x + face.w / 2, face.y + face.h / 2 + framing.dlib_shift * face.h
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def crop_face(rgb: np.ndarray, face: Detection, size: int) -> np.ndarray:
    """The ``(size, size, 3)`` uint8 crop around ``face`` framed like the training faces; edges replicated outside."""
    from PIL import Image

    left, top, side = crop_square(face)
    h, w = rgb.shape[:2]
    # Clipped indices repeat the edge pixels wherever the square leaves the image.
    rows = np.clip(np.arange(top, top + side), 0, h - 1)
    cols = np.clip(np.arange(left, left + side), 0, w - 1)
    square = np.ascontiguousarray(rgb[np.ix_(rows, cols)])
    # Pillow's bilinear widens its filter when shrinking, as in the training images' decoding.
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))


class ChipAligner:
    """dlib's ``get_face_chip`` for each face, with landmarks from the ported 5-point shape predictor."""

    def __init__(self, size: int = 150, padding: float = 0.25, shape_predictor: ShapePredictor | None = None) -> None:
        from .align import load_shape_predictor

        self.size, self.padding = size, padding
        self.shape_predictor = shape_predictor or load_shape_predictor()

    def chip(self, rgb: np.ndarray, face: Detection) -> np.ndarray:
        from .align import chip_transform, face_chip

        left, top, right, bottom = dlib_rect(face)
        landmarks = self.shape_predictor.predict(rgb, (round(left), round(top), round(right), round(bottom)))
        to_chip = chip_transform(landmarks, self.size, self.padding)
        if np.hypot(*to_chip[0, :2]) < 0.5:  # the face shrinks more than 2x: dlib's blurred pyramid, exactly
            return face_chip(rgb, landmarks, self.size, self.padding)
        # Otherwise OpenCV's bilinear warp through the same transform: 13x faster, within 3 grey levels of dlib's
        # (DECISIONS.md: chips by OpenCV's warp).
        return fast_warp(rgb, to_chip, self.size)


def fast_warp(rgb: np.ndarray, to_chip: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.warpAffine(
        np.ascontiguousarray(rgb),
        to_chip,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )


# RetinaFace's 5 landmarks in dlib's 150 px, padding-0.25 chip (unit coordinates): the median over 400 LFW,
# WIKI and FairFace photos of RetinaFace's points mapped through the chip transform of the shape predictor's.
RETINA_CHIP_TEMPLATE = np.array([[0.311, 0.3005], [0.675, 0.3003], [0.4875, 0.5201], [0.3372, 0.6771], [0.6466, 0.6755]])


def landmark_chip(rgb: np.ndarray, landmarks: np.ndarray, size: int = 150) -> np.ndarray:
    """dlib's chip placed by a similarity fit of RetinaFace's 5 points onto :data:`RETINA_CHIP_TEMPLATE`."""
    from .align import similarity_transform, warp_chip

    to_chip = similarity_transform(np.asarray(landmarks, np.float64), RETINA_CHIP_TEMPLATE * size)
    if np.hypot(*to_chip[0, :2]) < 0.5:  # shrinking more than 2x needs the blurred pyramid
        return warp_chip(rgb, to_chip, size)
    return fast_warp(rgb, to_chip, size)


class FaceFramer:
    """The input pixels for each detected face, in the backbone's framing (``Preprocess.alignment``)."""

    def __init__(self, preprocess: Preprocess, aligner: ChipAligner | None = None) -> None:
        self.pre = preprocess
        self.aligner = aligner
        if preprocess.alignment in ("chip5", "landmarks5") and aligner is None:
            self.aligner = ChipAligner(preprocess.size, preprocess.chip_padding)

    def __call__(self, rgb: np.ndarray, face: Detection) -> np.ndarray:
        if self.pre.alignment == "landmarks5" and face.landmarks is not None:
            return landmark_chip(rgb, face.landmarks, self.pre.size)
        if self.aligner is not None:  # chip5, and landmarks5 for faces without landmarks (Haar, whole images)
            return self.aligner.chip(rgb, face)
        return crop_face(rgb, face, self.pre.size)


class PhotoFramer:
    """A labelled training photo (one subject) -> network input pixels, as ``predict`` would frame its face.

    ``crop`` backbones read training photos as they are (agegender_cleaned is already framed), centre-square
    resized. ``chip5`` backbones detect the subject (:func:`subject`) and align it; a photo in which the detector
    finds nothing is taken as a tight face crop and aligned from the whole picture.
    """

    def __init__(self, preprocess: Preprocess, detector: FaceDetector | None = None, faces: FaceFramer | None = None) -> None:
        self.pre = preprocess
        self.detector = detector
        self.faces = faces or FaceFramer(preprocess)  # shared, so the shape predictor loads once
        self.key = f"{preprocess.alignment}:{getattr(detector, 'name', 'none')}:v2"  # part of the feature-cache key

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.pre.alignment == "crop":
            return fit_square(rgb, self.pre.size)
        h, w = rgb.shape[:2]
        found = self.detector.detect(rgb) if self.detector is not None else []
        face = subject(found, h, w) or whole_image(h, w)
        try:
            return self.faces(rgb, face)
        except ValueError as e:
            raise ImageError(f"cannot align the face ({e})", "corrupt") from None


def subject(faces: Sequence[Detection], height: int, width: int) -> Detection | None:
    """The subject of a one-person photo: large, confident and near the centre; None when there are no faces.

    Ranked by ``area * score * exp(-2 d^2)``, ``d`` the box centre's distance from the image centre in
    half-diagonals: a face in a corner must have 7x the area of a centred one to win (DECISIONS.md: the subject).
    """
    if not faces:
        return None
    half_diagonal = np.hypot(width, height) / 2

    def weight(f: Detection) -> float:
        cx, cy = f.centre
        d = np.hypot(cx - width / 2, cy - height / 2) / half_diagonal
        return float(f.area * f.score * np.exp(-2.0 * d * d))

    return max(faces, key=weight)
