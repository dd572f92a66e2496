"""A detected face: the one record every detector returns and every framer, writer and service reads, and the
protocol of what finds faces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import AgeGenderError


@dataclass(frozen=True)
class Framing:
    """How one detector's boxes map onto the two framings the backbones read, as measured on real photos.

    ``crop_scale`` and ``crop_shift`` give the training-style square (side = scale x the box's longer side,
    centre ``crop_shift`` box heights below the box centre). ``dlib_side`` and ``dlib_shift`` give the square
    box dlib's HOG detector would have found, which its shape predictor was trained to start from. The measured
    values are in :mod:`agegender.faces.framing`.
    """

    name: str
    crop_scale: float
    crop_shift: float
    dlib_side: float
    dlib_shift: float


@dataclass(frozen=True, eq=False)
class Detection:
    """A face in pixel coordinates of the image it was found in: top-left ``(x, y)``, size ``(w, h)``.

    ``score`` is detector-specific. ``framing`` is the convention of the detector that drew the box, which the
    crop and chip code follow. ``landmarks``, when the detector gives them, is a read-only ``(5, 2)`` float32
    array of ``(x, y)``: image-left eye, image-right eye, nose, image-left and image-right mouth corners. Boxes
    are not clipped to the image: a face cut by the border keeps its full extent, which centres its crop.
    Records compare by value (the dataclass's own ``==`` cannot compare arrays).
    """

    x: float
    y: float
    w: float
    h: float
    score: float
    framing: Framing
    landmarks: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h", "score"):  # whole pixels or numpy scalars become plain floats
            object.__setattr__(self, name, float(getattr(self, name)))
        if not (self.w > 0 and self.h > 0):  # also refuses NaN
            raise AgeGenderError(f"a face box needs a positive size, got {self.w} x {self.h}")
        if self.landmarks is not None:
            marks = np.array(self.landmarks, dtype=np.float32)  # a copy: the record owns its points
            if marks.shape != (5, 2):
                raise AgeGenderError(f"face landmarks must be 5 (x, y) points, got shape {marks.shape}")
            marks.setflags(write=False)
            object.__setattr__(self, "landmarks", marks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Detection):
            return NotImplemented
        mine, theirs = self.landmarks, other.landmarks
        same_marks = mine is theirs or (mine is not None and theirs is not None and np.array_equal(mine, theirs))
        return same_marks and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[float, float, float, float, float, Framing]:
        return self.x, self.y, self.w, self.h, self.score, self.framing

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    @property
    def area(self) -> float:
        return self.w * self.h

    def to_dict(self) -> dict[str, Any]:
        """The box as ``predict`` and ``serve`` write it: whole pixels, the score, landmarks to 0.1 px."""
        d: dict[str, Any] = {"x": round(self.x), "y": round(self.y), "w": round(self.w), "h": round(self.h), "score": self.score}
        if self.landmarks is not None:
            d["landmarks"] = [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks]
        return d


class FaceDetector(Protocol):
    """What finds faces (the detectors are in :mod:`agegender.faces.detect`)."""

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an ``(H, W, 3)`` uint8 RGB image, in the detector's order."""
        ...
