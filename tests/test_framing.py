"""From a detected face to pixels: the face record, the crop convention, chips, the framers and subject choice.

Unit tests on synthetic images; the conventions' fit to real photos is in test_detect.py and test_backbones.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agegender.errors import AgeGenderError
from agegender.faces import framing
from agegender.faces.face import Detection, Framing
from agegender.faces.framing import (
    CROP_SCALE,
    CROP_SHIFT_Y,
    HAAR,
    RETINA_CHIP_TEMPLATE,
    RETINAFACE,
    WHOLE_IMAGE,
    FaceFramer,
    PhotoFramer,
    crop_face,
    crop_square,
    dlib_rect,
    landmark_chip,
    subject,
    whole_image,
)
from agegender.images import ImageError
from agegender.model.config import Preprocess


def _face(
    x: float,
    y: float,
    w: float,
    h: float | None = None,
    score: float = 0.99,
    framing_: Framing = RETINAFACE,
    landmarks: np.ndarray | None = None,
) -> Detection:
    return Detection(x, y, w, w if h is None else h, score, framing_, landmarks)


# --- the record ------------------------------------------------------------------------------------------


def test_detection_is_a_frozen_record_of_floats() -> None:
    marks = np.arange(10, dtype=np.float64).reshape(5, 2)
    d = Detection(np.int64(1), 2, 10, np.float32(20), 1, HAAR, marks)
    assert all(type(v) is float for v in (d.x, d.y, d.w, d.h, d.score))
    assert d.centre == (6.0, 12.0) and d.area == 200.0 and d.framing is HAAR
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.x = 5.0  # type: ignore[misc]
    # The record owns read-only float32 points: the caller's array can change without moving them.
    assert d.landmarks is not None and d.landmarks.dtype == np.float32 and not d.landmarks.flags.writeable
    marks[0, 0] = 99
    assert d.landmarks[0, 0] == 0


@pytest.mark.parametrize(
    "w, h, marks", [(0, 10, None), (10, -1, None), (float("nan"), 10, None), (10, 10, np.zeros((68, 2))), (10, 10, np.zeros(10))]
)
def test_detection_refuses_impossible_faces(w: float, h: float, marks: np.ndarray | None) -> None:
    with pytest.raises(AgeGenderError):
        Detection(0, 0, w, h, 1.0, HAAR, marks)


def test_to_dict_writes_whole_pixels_and_tenths_of_landmarks() -> None:
    marks = np.array([[10.04, 20.06], [30, 20], [20, 30], [12, 40], [28, 40]], np.float32)
    d = Detection(9.6, 10.0, 30.4, 40.5, 0.875, RETINAFACE, marks)
    assert d.to_dict() == {
        "x": 10,
        "y": 10,
        "w": 30,
        "h": 40,
        "score": 0.875,
        "landmarks": [[10.0, 20.1], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]],
    }
    assert "landmarks" not in _face(0, 0, 10, framing_=HAAR).to_dict()


# --- geometry --------------------------------------------------------------------------------------------


def test_crop_square_follows_the_haar_convention() -> None:
    left, top, side = crop_square(_face(100, 100, 50, framing_=HAAR))
    assert side == round(50 * CROP_SCALE)
    assert left + side / 2 == pytest.approx(125, abs=1)
    assert top + side / 2 == pytest.approx(125 + CROP_SHIFT_Y * 50, abs=1)


def test_crop_square_reads_each_detectors_framing() -> None:
    """The same box framed as RetinaFace's: the longer side (the height) sets the side, shifted by its height."""
    box = (100, 80, 40, 60)
    left, top, side = crop_square(_face(*box, framing_=RETINAFACE))
    assert side == round(60 * RETINAFACE.crop_scale)
    assert left + side / 2 == pytest.approx(120, abs=1)
    assert top + side / 2 == pytest.approx(110 + RETINAFACE.crop_shift * 60, abs=1)
    assert crop_square(_face(*box, framing_=HAAR)) != (left, top, side)
    assert crop_square(whole_image(60, 80)) == (0, -10, 80)  # a whole picture: the square on its longer side


def test_dlib_rect_is_the_framings_square() -> None:
    face = _face(100, 100, 80, 100, framing_=RETINAFACE)
    left, top, right, bottom = dlib_rect(face)
    assert right - left == pytest.approx(100 * RETINAFACE.dlib_side)
    assert bottom - top == pytest.approx(right - left)
    assert (left + right) / 2 == pytest.approx(140)
    assert (top + bottom) / 2 == pytest.approx(150 + RETINAFACE.dlib_shift * 100)


def test_whole_image_is_the_picture_in_its_own_framing() -> None:
    face = whole_image(30, 40)
    assert (face.x, face.y, face.w, face.h) == (0, 0, 40, 30) and face.framing is WHOLE_IMAGE
    assert face.landmarks is None


# --- pixels ----------------------------------------------------------------------------------------------


def test_crop_face_pads_by_edge_replication() -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, 0] = (255, 0, 0)  # a red left edge
    rgb[0, :] = (0, 255, 0)  # a green top edge (wins the corner)
    crop = crop_face(rgb, _face(0, 10, 20, framing_=HAAR), 64)  # the square reaches well past the left edge
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert (crop[20:40, :5] == (255, 0, 0)).all()
    assert crop_face(rgb, _face(10, 10, 10, framing_=HAAR), 18).shape == (18, 18, 3)


def test_crop_face_matches_a_plain_crop_inside_the_image() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    face = _face(70, 60, 50, framing_=HAAR)
    left, top, side = crop_square(face)
    crop = crop_face(rgb, face, side)  # no resize: exactly the pixels
    assert np.array_equal(crop, rgb[top : top + side, left : left + side])


def _blob(x: float, y: float, sigma: float, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    grey = 255 * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("scale", [0.8, 3.0])  # enlarged (OpenCV's warp) and shrunk more than 2x (the pyramid)
def test_landmark_chip_puts_the_points_on_the_template(scale: float) -> None:
    """Each landmark, drawn alone as a blob, lands where the template puts it in the chip."""
    size, angle = 150, 0.3
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (RETINA_CHIP_TEMPLATE * size - size / 2) @ rot.T + [300, 280]
    for (px, py), (x, y) in zip(points, RETINA_CHIP_TEMPLATE * size):
        chip = landmark_chip(_blob(px, py, 4 * scale, (600, 600)), points, size)
        assert chip.shape == (size, size, 3) and chip.dtype == np.uint8
        weight = chip[..., 0].astype(float)
        rows, cols = np.mgrid[:size, :size]
        cx, cy = (weight * cols).sum() / weight.sum(), (weight * rows).sum() / weight.sum()
        assert abs(cx - x) < 1 and abs(cy - y) < 1, (cx, cy, x, y)


class _Aligner:
    """Stands in for the shape-predictor aligner: records the faces it was given."""

    def __init__(self) -> None:
        self.faces: list[Detection] = []

    def chip(self, rgb: np.ndarray, face: Detection) -> np.ndarray:
        self.faces.append(face)
        return np.full((16, 16, 3), 7, np.uint8)


def _pre(alignment: str) -> Preprocess:
    return Preprocess(size=16, mean_rgb=(0.0, 0.0, 0.0), alignment=alignment)


def test_face_framer_follows_the_backbones_alignment() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    points = np.array([[50, 50], [70, 50], [60, 60], [52, 72], [68, 72]], np.float32)
    marked, plain = _face(40, 35, 40, 50, landmarks=points), _face(40, 35, 40, 50, framing_=HAAR)

    assert np.array_equal(FaceFramer(_pre("crop"))(rgb, plain), crop_face(rgb, plain, 16))
    aligner = _Aligner()
    chips = FaceFramer(_pre("landmarks5"), aligner)  # type: ignore[arg-type]
    assert np.array_equal(chips(rgb, marked), landmark_chip(rgb, points, 16)) and not aligner.faces
    assert (chips(rgb, plain) == 7).all() and aligner.faces == [plain]  # no landmarks: the shape predictor's
    assert (FaceFramer(_pre("chip5"), aligner)(rgb, marked) == 7).all()  # type: ignore[arg-type]
    assert aligner.faces[-1] is marked  # chip5 ignores the detector's points


class _Detector:
    name = "stub"

    def __init__(self, faces: list[Detection]) -> None:
        self.faces = faces

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return self.faces


def test_photo_framer_frames_the_subject_or_the_whole_photo() -> None:
    rgb = np.zeros((200, 200, 3), np.uint8)
    centred, corner = _face(70, 70, 60), _face(0, 0, 70)
    aligner = _Aligner()
    faces = FaceFramer(_pre("chip5"), aligner)  # type: ignore[arg-type]
    photo = PhotoFramer(_pre("chip5"), _Detector([corner, centred]), faces)
    assert photo.key == "chip5:stub:v2"
    assert photo(rgb).shape == (16, 16, 3) and aligner.faces[-1] is centred
    PhotoFramer(_pre("chip5"), _Detector([]), faces)(rgb)
    whole = aligner.faces[-1]
    assert whole.framing is WHOLE_IMAGE and (whole.w, whole.h) == (200, 200)
    PhotoFramer(_pre("chip5"), None, faces)(rgb)
    assert aligner.faces[-1].framing is WHOLE_IMAGE


def test_photo_framer_reads_crop_photos_as_they_are() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    detector = _Detector([_face(0, 0, 10)])
    out = PhotoFramer(_pre("crop"), detector)(rgb)
    assert np.array_equal(out, framing.fit_square(rgb, 16))


def test_photo_framer_says_when_a_face_cannot_be_aligned() -> None:
    class Failing(_Aligner):
        def chip(self, rgb: np.ndarray, face: Detection) -> np.ndarray:
            raise ValueError("transform is singular")

    faces = FaceFramer(_pre("chip5"), Failing())  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="cannot align the face \\(transform is singular\\)") as caught:
        PhotoFramer(_pre("chip5"), None, faces)(np.zeros((20, 20, 3), np.uint8))
    assert caught.value.kind == "corrupt"


# --- the subject -----------------------------------------------------------------------------------------


def test_subject_is_large_confident_and_central() -> None:
    assert subject([], 100, 100) is None
    centred, corner = _face(150, 150, 100), _face(0, 0, 130)
    assert subject([corner, centred], 400, 400) is centred
    assert subject([_face(0, 0, 300), centred], 400, 400).w == 300  # type: ignore[union-attr]  # much larger wins
    assert subject([_face(140, 140, 110, score=0.6), centred], 400, 400) is centred
    # A face centred on the image's corner needs e^2 = 7.4x the area of one centred on the image.
    for ratio, wins in ((7, False), (8, True)):
        side = 100 * ratio**0.5
        far = _face(-side / 2, -side / 2, side)
        assert (subject([far, _face(150, 150, 100)], 400, 400) is far) == wins, ratio


def test_detections_compare_by_value() -> None:
    marks = np.ones((5, 2))
    a, b = _face(1, 2, 3, landmarks=marks), _face(1, 2, 3, landmarks=marks.copy())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != _face(1, 2, 3, landmarks=marks + 0.5) and a != _face(1, 2, 3) and a != _face(1, 2, 4, landmarks=marks)
    assert _face(1, 2, 3, framing_=HAAR) != _face(1, 2, 3, framing_=RETINAFACE) and a != (1, 2, 3)
