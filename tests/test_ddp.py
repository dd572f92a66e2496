"""torchrun with two CPU processes (gloo) reaches the same result as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face

pytestmark = [pytest.mark.ddp, pytest.mark.slow]  # processes of their own, a minute of training

WIDTHS = (16, 32, 32, 64, 64)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(args: list[str], nproc: int, cwd: Path) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m"]
        if nproc > 1
        else [sys.executable, "-m"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "agegender", "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_training_matches_one_process(tmp_path: Path) -> None:
    make_agegender_tree(tmp_path / "data", per_folder=2, seed=3)
    save_vgg_face(tmp_path / "w.safetensors", make_vgg_face_state(widths=WIDTHS, fc=16, classes=4, seed=1))
    common = [
        "--backbone",
        "vgg-face",
        "--data",
        str(tmp_path / "data"),
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--epochs",
        "5",
        "--batch-size",
        "32",
        "--hidden",
        "32",
        "32",
        "--seed",
        "1",
    ]
    _train([*common, "--out", str(tmp_path / "one" / "run")], 1, tmp_path)
    _train([*common, "--out", str(tmp_path / "two" / "run")], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "run" / "report" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "run" / "report" / "report.json").read_text())
    # Same global batches and averaged gradients; only per-rank BatchNorm statistics differ.
    assert two["gender"]["accuracy"] == pytest.approx(one["gender"]["accuracy"], abs=0.05)
    assert two["age"]["mae"] == pytest.approx(one["age"]["mae"], rel=0.1)
    assert one["gender"]["accuracy"] > 0.75
    # Gathered features are identical to single-process extraction.
    from safetensors.torch import load_file

    c1 = load_file(str(next((tmp_path / "one" / "cache").glob("features-*.safetensors"))))
    c2 = load_file(str(next((tmp_path / "two" / "cache").glob("features-*.safetensors"))))
    assert (c1["features"] - c2["features"]).abs().max() < 1e-4
    assert not list((tmp_path / "two" / "run").glob("*.part"))
