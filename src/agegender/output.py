"""What ``agegender predict`` writes: JSON Lines or CSV records, annotated copies of images and video frames.

Library code the command line calls (it parses nothing); the records are :meth:`ImageResult.to_dict`'s.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .errors import AgeGenderError, OptionError
from .files import atomic_path, staged_dir
from .images import load_image
from .infer.predict import Face, ImageResult, Predictor

if TYPE_CHECKING:
    from PIL import Image

CSV_FIELDS = (
    "path",
    "face",
    "x",
    "y",
    "w",
    "h",
    "score",
    "gender",
    "p_male",
    "age",
    "age_group",
    "age_low",
    "age_high",
    "error",
    "frame",
    "time",
)


def _csv_rows(result: ImageResult) -> Iterator[dict[str, Any]]:
    head = result.to_dict()
    where = {"path": head["path"], "frame": head.get("frame", ""), "time": head.get("time", "")}
    if not result.faces:
        yield {**where, "error": result.error or ""}
    for i, face in enumerate(result.faces):
        d = face.to_dict()
        box = d.pop("box") or {}
        box.pop("landmarks", None)  # one row per face has no room for 10 coordinates; JSON Lines has them
        yield {**where, "face": i, **box, **{k: "" if v is None else v for k, v in d.items()}, "error": ""}


class _Writer:
    def __init__(self, stream: IO[str], fmt: str) -> None:
        self.stream = stream
        self.csv = csv.DictWriter(stream, CSV_FIELDS, restval="") if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, result: ImageResult) -> None:
        if self.csv:
            self.csv.writerows(_csv_rows(result))
        else:
            self.stream.write(json.dumps(result.to_dict()) + "\n")


def annotate(rgb: np.ndarray, faces: list[Face]) -> Image.Image:
    """A copy of the image with each face's box and ``M 34``-style label drawn on it."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 200))
    font = ImageFont.load_default(size=max(12, round(min(image.size) / 25)))
    for face in faces:
        box = face.box.to_dict() if face.box else {"x": 0, "y": 0, "w": image.width, "h": image.height}
        x, y, w, h = box["x"], box["y"], box["w"], box["h"]
        colour = (40, 120, 255) if face.gender == "male" else (230, 50, 110)
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=line)
        _, _, right, bottom = draw.textbbox((0, 0), face.label(), font=font)
        height = bottom + 4
        top = y - height if y >= height else y  # above the box when there is room
        draw.rectangle((x, top, x + right + 4, top + height), fill=colour)
        draw.text((x + 2, top + 2), face.label(), fill=(255, 255, 255), font=font)
    return image


def _annotated_name(path: str, used: set[str]) -> str:
    p = Path(path)
    suffix = p.suffix.lower() if p.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    name, n = f"{p.stem}{suffix}", 1
    while name in used:
        name, n = f"{p.stem}-{n}{suffix}", n + 1
    used.add(name)
    return name


def _write_annotation(result: ImageResult, folder: Path, used: set[str]) -> None:
    if result.error:
        return
    dest = folder / _annotated_name(result.path, used)
    image = annotate(load_image(result.path), result.faces)
    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG" if dest.suffix == ".png" else "JPEG", quality=92)


def _video_results(
    predictor: Predictor,
    path: str,
    every: int,
    batch_size: int,
    folder: Path | None,
    used: set[str],
    progress: bool,
    alone: bool = True,
) -> Iterator[ImageResult]:
    """A video's frame results; with ``folder``, each sampled frame annotated into ``folder/<video name>/``.

    A video that cannot be read (or whose frames are past the pixel cap) raises when it is ``alone``, the only
    input; among others it ends with an error record of its own, and theirs are kept."""
    from .infer.video import frames

    kept: dict[int, np.ndarray] = {}  # frames waiting for their result; the pipeline holds only a few at once
    sub = None if folder is None else folder / _annotated_name(path, used).rsplit(".", 1)[0]
    failed: list[AgeGenderError] = []

    def items() -> Iterator[tuple[str, np.ndarray, int, float]]:
        try:
            for i, t, rgb in frames(path, every, progress):
                if sub is not None:
                    kept[i] = rgb
                yield f"{path}#{i}", rgb, i, t
        except AgeGenderError as e:  # the frames read so far keep their results; the video gets an error record
            failed.append(e)

    for result in predictor.predict_frames(items(), batch_size):
        rgb = kept.pop(result.frame, None) if result.frame is not None else None
        if sub is not None and rgb is not None:
            with atomic_path(sub / f"frame_{result.frame:06d}.jpg") as tmp:
                annotate(rgb, result.faces).save(tmp, format="JPEG", quality=92)
        yield result
    if failed and alone:
        raise failed[0]
    if failed:
        yield ImageResult(path, [], str(failed[0]))


def predict_files(
    predictor: Predictor,
    paths: list[str],
    output: str | None = None,
    output_format: str = "jsonl",
    batch_size: int = 32,
    annotate: str | None = None,
    every: int = 1,
    progress: bool = True,
) -> collections.Counter[str]:
    """``agegender predict``: JSON Lines or CSV to ``output`` (stdout when None), one record per image (CSV: one
    row per face); annotated copies into the folder ``annotate`` (a video's sampled frames into a subfolder named
    after it). Video files give one record per ``every``-th frame.
    Returns counts: ``faces``; ``images`` and ``frames`` read; ``with faces``, ``no face`` and ``errors`` among them."""
    from .infer.video import is_video
    from .progress import Progress

    if every < 1:
        raise OptionError(f"`every` must be at least 1, got {every}", "every")
    if output_format not in ("jsonl", "csv"):
        raise AgeGenderError(f"unknown output format {output_format!r}; choose jsonl or csv")
    counts: collections.Counter[str] = collections.Counter()
    used: set[str] = set()

    def run(stream: IO[str], folder: Path | None) -> None:
        writer = _Writer(stream, output_format)
        images = [p for p in paths if not is_video(p)]
        streams = [predictor.predict_many(images, batch_size)] if images else []
        streams += [
            _video_results(predictor, p, every, batch_size, folder, used, progress, len(paths) == 1) for p in paths if is_video(p)
        ]
        with Progress(len(images), "predict", "img", enabled=progress and bool(images)) as bar:
            for results in streams:
                for result in results:
                    writer.write(result)
                    counts["faces"] += len(result.faces)
                    counts["errors" if result.error else "no face" if not result.faces else "with faces"] += 1
                    counts["images" if result.frame is None else "frames"] += 1
                    if result.frame is None:
                        bar.update(1)
                        if folder is not None:
                            _write_annotation(result, folder, used)

    # All or nothing: annotations appear only once every one of them and the output are written.
    # ``folder``: a temporary folder beside ``annotate``, whose files are moved there at the end.
    with staged_dir(annotate) if annotate else contextlib.nullcontext() as folder:
        if output:
            with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                run(f, folder)
        else:
            run(sys.stdout, folder)
    return counts
