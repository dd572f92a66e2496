"""predict under bad inputs and failing writes: a video gets the photos' pixel cap, read from its header before any
frame is decoded; one bad video among photos is an error record of its own and never discards their results; and
annotated copies appear all together or not at all."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender import images, output
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.infer.video import frames

cv2 = pytest.importorskip("cv2")

import test_faults  # noqa: E402

model = test_faults.model  # the same tiny checkpoint fixture


@pytest.fixture
def photos(tmp_path: Path) -> list[str]:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"p{i}.png")
    return [str(folder / f"p{i}.png") for i in range(3)]


def _clip(path: Path, n: int = 6, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, size)
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 30 * i, np.uint8))
    writer.release()
    return path


class _CountingCapture:
    """cv2.VideoCapture that counts the frames it decodes."""

    reads = 0
    real = cv2.VideoCapture

    def __init__(self, source: Any) -> None:
        self.capture = self.real(source)

    def read(self) -> Any:
        type(self).reads += 1
        return self.capture.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.capture, name)


# -- video: the pixel cap ------------------------------------------------------------------------------------
def test_video_frames_past_the_pixel_cap_are_refused_before_any_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = _clip(tmp_path / "clip.avi")
    monkeypatch.setattr(cv2, "VideoCapture", _CountingCapture)
    assert len(list(frames(str(clip), progress=False))) == 6 and _CountingCapture.reads == 7  # as many as it has
    _CountingCapture.reads = 0
    monkeypatch.setattr(images, "MAX_PIXELS", 64 * 48 - 1)  # this clip's frames are now "huge"
    with pytest.raises(AgeGenderError, match=r"clip.avi: 64x48 video frames exceed the 3,071 pixel limit"):
        next(frames(str(clip), progress=False))
    assert _CountingCapture.reads == 0


# -- video: one bad input among others -----------------------------------------------------------------------
def _bad_video(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    if kind == "truncated":
        whole = _clip(tmp_path / "whole.avi").read_bytes()
        bad = tmp_path / "cut.avi"
        bad.write_bytes(whole[:200])  # cut inside its header
        return bad, "cut.avi: "
    if kind == "not a video":
        bad = tmp_path / "text.mp4"
        bad.write_bytes(b"not a video at all" * 100)
        return bad, "text.mp4: "
    # Frames past the cap: the photos (48x40) stay under it, the clip's 64x48 frames do not.
    monkeypatch.setattr(images, "MAX_PIXELS", 48 * 40)
    return _clip(tmp_path / "huge.avi"), "huge.avi: 64x48 video frames exceed the 1,920 pixel limit"


@pytest.mark.parametrize("kind", ["truncated", "not a video", "frames past the cap"])
def test_a_bad_video_among_photos_keeps_their_results(
    tmp_path: Path, model: Path, photos: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    bad, message = _bad_video(tmp_path, kind, monkeypatch)
    good = _clip(tmp_path / "good.avi", n=3, size=(40, 32))
    out = tmp_path / "out.jsonl"
    rc = main(
        ["predict", photos[0], str(bad), photos[1], str(good), photos[2], "--model", str(model), "--no-detect", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_path.setdefault(Path(r["path"]).name, []).append(r)
    assert [len(by_path[Path(p).name][0]["faces"]) for p in photos] == [1, 1, 1]
    assert [r["frame"] for r in by_path["good.avi"]] == [0, 1, 2] and all(r["faces"] for r in by_path["good.avi"])
    [failed] = by_path[bad.name]
    assert failed["faces"] == [] and message in failed["error"], failed


def test_a_bad_video_alone_is_the_commands_error(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad, message = _bad_video(tmp_path, "frames past the cap", monkeypatch)
    assert main(["predict", str(bad), "--model", str(model), "--no-detect", "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "o.jsonl").exists()


# -- annotations: all or nothing ------------------------------------------------------------------------------
def _failing_annotations(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """The ``fail_at``-th annotated copy cannot be written: the disk is full by then."""
    real = output.annotate
    count = [0]

    def annotate(rgb: np.ndarray, faces: list[Any]) -> Any:
        image = real(rgb, faces)
        count[0] += 1
        if count[0] == fail_at:

            def full(fp: Any, *_: Any, **__: Any) -> None:
                Path(fp).write_bytes(b"half an image")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            image.save = full
        return image

    monkeypatch.setattr(output, "annotate", annotate)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("existing", [False, True])
def test_annotations_appear_all_together_or_not_at_all(
    tmp_path: Path,
    model: Path,
    photos: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    existing: bool,
) -> None:
    ann = tmp_path / "ann"
    if existing:  # an earlier run's copies, written into again with --force
        ann.mkdir()
        (ann / "old.png").write_bytes(b"earlier")
    before = _tree(ann) if existing else None
    clip = _clip(tmp_path / "clip.avi", n=2)
    argv = [
        "predict",
        *photos,
        str(clip),
        "--model",
        str(model),
        "--no-detect",
        "--annotate",
        str(ann),
        "-o",
        str(tmp_path / "o.jsonl"),
        *(["--force"] if existing else []),
    ]
    _failing_annotations(monkeypatch, fail_at=4)  # the video's first frame, after the three photos
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write (disk full)" in err[0], err
    assert (_tree(ann) if existing else ann.exists()) == (before if existing else False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left beside it
    assert not (tmp_path / "o.jsonl").exists()

    monkeypatch.undo()
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(_tree(ann))
    assert names == sorted(
        ["clip/frame_000000.jpg", "clip/frame_000001.jpg", "p0.png", "p1.png", "p2.png", *(["old.png"] if existing else [])]
    )
