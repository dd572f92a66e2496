"""Every subcommand, given bad arguments: exit code 2, one line on stderr, no traceback, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.cli import main


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    from agegender.data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face

    data = make_agegender_tree(tmp_path / "data", per_folder=1, ages=range(20, 24), seed=0)
    weights = tmp_path / "w.safetensors"
    save_vgg_face(weights, make_vgg_face_state(widths=(4, 4, 4, 4, 4), seed=0))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "three").mkdir()
    for i, g in enumerate("FMF"):
        (tmp_path / "three" / "labels.csv").open("a").write(("path,gender\n" if i == 0 else "") + f"{i}.jpg,{g}\n")
        from PIL import Image

        Image.new("RGB", (64, 64), (i * 60, 90, 120)).save(tmp_path / "three" / f"{i}.jpg")
    return {"root": tmp_path, "data": data, "weights": weights}


def _cases(w: dict[str, Path]) -> dict[str, list[str]]:
    root, data, weights = w["root"], str(w["data"]), str(w["weights"])
    vgg = ["train", "--backbone", "vgg-face"]
    train = [*vgg, "--data", data, "--weights", weights, "--out", str(root / "run")]
    return {
        "train batch 0": [*train, "--batch-size", "0"],
        "train image size 0": [*train, "--image-size", "0"],
        "train image size 48": [*train, "--image-size", "48"],
        "train epochs 0": [*train, "--epochs", "0"],
        "train out is a file": [*vgg, "--data", data, "--weights", weights, "--out", str(root / "a_file")],
        "train missing data": [*vgg, "--data", str(root / "nope"), "--weights", weights, "--out", str(root / "r")],
        "train missing weights": [*vgg, "--data", data, "--weights", str(root / "nope.t7"), "--out", str(root / "r")],
        "train three images": ["train", "--data", str(root / "three"), "--init", "scratch", "--out", str(root / "r")],
        "train bad backbone": [*train, "--backbone", "resnet"],
        "train not a number": [*train, "--epochs", "many"],
        "evaluate missing model": ["evaluate", "--model", str(root / "nope")],
        "evaluate bad subset": ["evaluate", "--model", str(root / "nope"), "--subset", "dev"],
        "export missing model": ["export", "--model", str(root / "nope"), "--format", "onnx", "-o", str(root / "m.onnx")],
        "predict missing image": ["predict", str(root / "nope.jpg"), "--model", weights],
        "predict nothing": ["predict", "--model", weights],
        "convert missing source": ["convert", str(root / "nope.t7"), "-o", str(root / "c.safetensors")],
        "identify missing image": ["identify", str(root / "nope.jpg"), "--weights", weights, "--names", weights],
        "fetch unknown": ["fetch", "everything"],
        "no command": [],
    }


CASES = list(_cases({"root": Path("/r"), "data": Path("/d"), "weights": Path("/w")}))


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_fail_cleanly(world: dict[str, Path], case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _cases(world)[case]
    before = _tree(world["root"])
    assert main(argv) == 2, case
    lines = capsys.readouterr().err.strip().splitlines()
    # Progress logs may come first (HH:MM:SS LEVEL name: ...); the failure itself is one line.
    err = [line for line in lines if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert len(err) == 1 and err[0].startswith("agegender: error: "), lines
    assert not any("Traceback" in line for line in lines)
    assert _tree(world["root"]) == before, f"{case} left files behind"


def test_argparse_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "agegender", "train", "--epochs", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_hidden_alone_sets_matching_dropout(world: dict[str, Path]) -> None:
    from agegender.train.config import TrainConfig

    cfg = TrainConfig.from_preset("default", data=str(world["data"]), hidden=(64,)).validate()
    assert cfg.dropout == (0.5,)
