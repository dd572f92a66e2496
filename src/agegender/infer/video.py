"""Gender and age for every face in the frames of a video file or a camera, through OpenCV's decoder."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import images
from ..errors import AgeGenderError, OptionError

if TYPE_CHECKING:
    from .predict import ImageResult, Predictor

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"})


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frames(source: str | int, every: int = 1, progress: bool = True) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, seconds, RGB uint8)`` for every ``every``-th frame of a video file, or of camera ``source``."""
    import cv2

    from ..progress import Progress

    if every < 1:
        raise OptionError(f"`every` must be at least 1, got {every}", "every")
    name = f"camera {source}" if isinstance(source, int) else source
    if isinstance(source, str) and not Path(source).is_file():
        raise AgeGenderError(f"{source}: no such video file")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        raise AgeGenderError(f"{name}: OpenCV cannot open this video (unsupported codec or not a video)")
    # The frame size the container declares, checked before a frame is decoded: the pixel cap photos get.
    width, height = (int(capture.get(p) or 0) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
    if width * height > images.MAX_PIXELS:
        capture.release()
        raise AgeGenderError(f"{name}: {width}x{height} video frames exceed the {images.MAX_PIXELS:,} pixel limit")
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
    bar = Progress(total, Path(str(name)).name, "frame", enabled=progress)
    index = read = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            read += 1
            bar.update(1)
            if bgr is not None and bgr.shape[0] * bgr.shape[1] > images.MAX_PIXELS:  # a header that lied
                raise AgeGenderError(
                    f"{name}: frame {index} is {bgr.shape[1]}x{bgr.shape[0]}, past the {images.MAX_PIXELS:,} pixel limit"
                )
            if index % every == 0:
                if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.size == 0:
                    log.warning("%s: frame %d is not a colour image; skipped", name, index)
                else:
                    yield index, (index / fps if fps > 0 else float("nan")), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        bar.close()
        capture.release()
    if read == 0:
        raise AgeGenderError(f"{name}: no readable frames (empty, truncated or not a video)")


def predict_video(
    predictor: Predictor, source: str | int, every: int = 1, batch_size: int = 32, progress: bool = True
) -> Iterator[ImageResult]:
    """One :class:`ImageResult` per sampled frame, with ``frame`` and ``time`` set; faces batched across frames."""
    label = f"camera:{source}" if isinstance(source, int) else source
    items = ((f"{label}#{i}", rgb, i, t) for i, t, rgb in frames(source, every, progress))
    yield from predictor.predict_frames(items, batch_size)
