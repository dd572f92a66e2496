"""The one-command runs: `reproduce` on local files (no download) and `demo`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agegender.cli import main
from agegender.data.synthetic import make_agegender_tree
from t7_writer import write_vgg_face_t7


@pytest.mark.slow
def test_reproduce_converts_a_t7_trains_evaluates_and_exports(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    make_agegender_tree(tmp_path / "data", per_folder=1, seed=2)
    write_vgg_face_t7(tmp_path / "VGG_FACE.t7", widths=(8, 16, 16, 32, 32), fc=16, classes=4)
    work = tmp_path / "work"
    assert (
        main(
            [
                "reproduce",
                "--backbone",
                "vgg-face",
                "--out",
                str(work),
                "--data",
                str(tmp_path / "data"),
                "--weights",
                str(tmp_path / "VGG_FACE.t7"),
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--hidden",
                "16",
                "16",
            ]
        )
        == 0
    )
    assert f"report: {work / 'run' / 'report' / 'report.md'}" in capsys.readouterr().out
    assert (work / "vgg_face.safetensors").is_file()
    for name in ("model.onnx", "model.keras", "model.pt2"):
        assert (work / "export" / name).is_file(), name
    md = (work / "run" / "report" / "report.md").read_text()
    assert md.rstrip().splitlines()[-1].startswith("| f1 (male)")  # the seed comparison closes the report


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    run = tmp_path / "demo" / "run"
    assert (run / "report" / "report.md").is_file() and (run / "training_curves.png").is_file()
    assert (tmp_path / "demo" / "export" / "model.onnx").is_file()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2  # never over an earlier run silently
    assert main(["demo", "--out", str(tmp_path / "demo"), "--force"]) == 0  # reuses the generated data
