"""Long jobs are never silent: a bar on a terminal, a log line every few seconds elsewhere; videos annotate frames."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender import progress
from agegender.cli import main
from test_predict import make_checkpoint


def test_progress_logs_a_line_when_not_on_a_terminal(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="agegender.progress"), progress.Progress(3, "features", "img") as bar:
        for _ in range(3):
            bar.update(1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "features: 1/3 img",
        "features: 2/3 img",
        "features: 3/3 img",
    ]


def test_progress_is_quiet_within_the_interval_and_when_disabled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="agegender.progress"):
        with progress.Progress(1000, "x") as bar:  # the default 5 s interval: a fast loop says nothing
            bar.update(1000)
        monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
        with progress.Progress(10, "y", enabled=False) as bar:
            bar.update(10)
    assert caplog.records == []


def test_progress_without_tqdm_falls_back_to_log_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the light install
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with caplog.at_level(logging.INFO, logger="agegender.progress"), progress.Progress(2, "predict") as bar:
        bar.update(2)
    assert caplog.records and caplog.records[0].getMessage().startswith("predict: 2/2 img")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _video(path: Path, frames: int = 12) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 80))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))
    writer.release()
    return path


def test_predict_reports_progress_and_counts_frames(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    video = _video(tmp_path / "clip.avi")
    out, ann = tmp_path / "out.jsonl", tmp_path / "ann"
    args = [
        "predict",
        *(str(tmp_path / f"p{i}.png") for i in range(3)),
        str(video),
        "--model",
        str(model),
        "--no-detect",
        "-o",
        str(out),
        "--annotate",
        str(ann),
    ]
    assert main(args) == 0  # the command logs to stderr, as on a terminal or into a log file
    messages = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if ": " in line]
    assert any(m.startswith("predict: 3/3 img") for m in messages)
    assert any(m.startswith("clip.avi: ") and "frame" in m for m in messages)
    assert any(m.startswith("3 images and 12 frames: 15 faces") for m in messages)
    assert len(out.read_text().splitlines()) == 15
    frames = sorted(p.name for p in (ann / "clip").iterdir())
    assert frames == [f"frame_{i:06d}.jpg" for i in range(12)]
    assert Image.open(ann / "clip" / frames[0]).size == (96, 80)
    assert {p.name for p in ann.iterdir()} == {"clip", "p0.png", "p1.png", "p2.png"}
    # A second run into the same folder must not mix with, or silently replace, the first.
    assert main(args) == 2
    assert main([*args, "--force"]) == 0


@pytest.mark.slow
def test_export_is_quiet_unless_verbose(model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    noise = ("onnx_ir", "onnxscript", "torchvision", "torch.onnx")
    assert main(["export", "--model", str(model), "--format", "onnx", "-o", str(tmp_path / "a.onnx")]) == 0
    err = capfd.readouterr().err
    assert "exporting" in err and "onnxruntime matches PyTorch" in err
    assert not any(n in err for n in noise), err
    assert main(["-v", "export", "--model", str(model), "--format", "onnx", "-o", str(tmp_path / "b.onnx")]) == 0
    assert any(n in capfd.readouterr().err for n in noise)
    import logging as lg

    assert all(lg.getLogger(n).level == lg.NOTSET for n in ("onnxscript", "onnx_ir"))  # levels restored
