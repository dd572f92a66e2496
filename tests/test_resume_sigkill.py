"""`train --resume` after SIGKILL: the same files, bit for bit, as a run never interrupted.

A run is killed (SIGKILL, which runs no cleanup) at a different point each time (mid-epoch, between the files of an
epoch's state, inside an atomic write, after calibration), then resumed, until it finishes. The kill points are
named places in the code (agegender.killpoints), so each kill lands where it is meant to, never by timing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from agegender.data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face
from agegender.killpoints import ENV
from agegender.train.loop import epoch_score

pytestmark = pytest.mark.slow

# A run that improves, then stalls: with --patience 2 it stops early, so the early-stopping counter must survive
# the kills too (a resume that forgot it trained on past the stop).
TRAIN = [
    "--backbone",
    "vgg-face",
    "--epochs",
    "8",
    "--batch-size",
    "32",
    "--hidden",
    "32",
    "32",
    "--lr",
    "0.1",
    "--patience",
    "2",
]

# Where each process of the chain dies, in order; each resumes the run the previous one left. One more kill, after
# an epoch that did not improve (chosen from the uninterrupted run's history), goes between the last two.
KILLS = [
    "train:step@3",  # mid-epoch 1: no epoch committed yet
    "replace:train_state.pt@2",  # epoch 2's weights written, its state not yet renamed into place: resume drops
    # the weights and redoes epoch 2, and removes the temp file the dead writer left
    "state:committed@1",  # epoch 2 committed, last.safetensors (and model.safetensors if it improved) not yet in
    # place: resume finishes them
    "train:calibrated@1",  # after the last epoch and calibration, before the report
]
FIRST_EPOCH_OF_THE_FOURTH_RUN = 3


def _stale_epoch(history: list[dict[str, Any]]) -> int | None:
    """The first epoch from the fourth run's on after which the early-stopping counter is not 0 and the run goes
    on: a kill there loses the counter unless the state keeps it."""
    best, stale = (-math.inf, math.inf), 0
    for row in history[:-1]:
        score = (epoch_score(row), row["val_loss"])  # the loop's own rule for the best epoch
        if math.isnan(score[0]) or score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            best, stale = score, 0
        else:
            stale += 1
        if stale and row["epoch"] >= FIRST_EPOCH_OF_THE_FOURTH_RUN:
            return int(row["epoch"])
    return None


def _train(world: dict[str, Path], out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [
        "train",
        "--data",
        str(world["data"]),
        "--out",
        str(out),
        "--weights",
        str(world["weights"]),
        "--cache-dir",
        str(world["root"] / "cache"),
        *TRAIN,
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill:
        env[ENV] = kill
    script = f"import sys\nfrom agegender.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def _history(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # wall time is the one difference


def _state(out: Path) -> dict[str, Any]:
    state = torch.load(out / "train_state.pt", weights_only=True)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(state.pop("history"))]
    return {**state, "history": history}


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.agegender-*.part"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    make_agegender_tree(root / "data", per_folder=2, seed=3)
    save_vgg_face(root / "w.safetensors", make_vgg_face_state(widths=(16, 32, 32, 64, 64), fc=16, classes=4, seed=1))
    return {"data": root / "data", "weights": root / "w.safetensors", "root": root}


def test_resume_after_sigkill_at_every_stage_is_bit_identical(world: dict[str, Path], tmp_path: Path) -> None:
    # Both runs write to the same path in turn, so even the metadata that names the run's folder can be compared.
    out = tmp_path / "run"
    whole = _train(world, out)
    assert whole.returncode == 0, whole.stderr
    shutil.move(out, tmp_path / "whole")
    whole_dir = tmp_path / "whole"
    history = _history(whole_dir)
    stale = _stale_epoch(history)
    assert len(history) < 8 and stale, "the run never stalled, or did not stop early: the counter goes untested"
    kills = [*KILLS[:3], f"state:committed@{stale - FIRST_EPOCH_OF_THE_FOURTH_RUN + 1}", KILLS[3]]

    for i, kill in enumerate(kills):
        run = _train(world, out, *(["--resume"] if i else []), kill=kill)
        assert run.returncode == -signal.SIGKILL, f"{kill}: not killed there (rc {run.returncode}): {run.stderr}"
        if kill.startswith("replace:train_state.pt"):  # the dead writer's temp file is there ...
            assert [p.name.startswith(".train_state.pt.") for p in _temp_files(out)] == [True], _temp_files(out)
        if kill.startswith("state:committed"):  # the committed epoch's weights wait beside last.safetensors
            assert (out / ".last.pending.safetensors").exists()
        if kill == kills[3]:
            assert _state(out)["stale"] >= 1
    done = _train(world, out, "--resume")
    assert done.returncode == 0, done.stderr
    assert _temp_files(out) == []  # ... and the next run that wrote there removed it

    assert _history(out) == _history(whole_dir)
    for name in ("model.safetensors", "last.safetensors"):
        a, b = load_file(str(whole_dir / name)), load_file(str(out / name))
        _same(a, b, name)
        # The metadata too: the best epoch, the calibration temperature, the config.
        assert (whole_dir / name).read_bytes() == (out / name).read_bytes(), name
    _same(_state(whole_dir), _state(out), "train_state")
    for name in ("config.json", "splits.json", "report/report.json"):
        assert (whole_dir / name).read_text() == (out / name).read_text(), name
    assert not (out / ".last.pending.safetensors").exists()


def test_temp_files_of_dead_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    from agegender.files import atomic_dir, write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # reaped: no process has this pid now (pids are not reused this soon)
    folder = tmp_path / "out"
    folder.mkdir()
    left = [folder / f".model.safetensors.x1y2z3.agegender-{pid}.part", folder / f".report.abc.agegender-{pid}.part"]
    left[0].write_bytes(b"half a checkpoint")
    left[1].mkdir()
    (left[1] / "page.png").write_bytes(b"x")
    alive = folder / f".other.q.agegender-{os.getppid()}.part"  # a live writer's (pytest's parent): kept
    mine = folder / f".mine.q.agegender-{os.getpid()}.part"  # this process's own: kept
    foreign = folder / ".notes.txt.part"  # not ours at all: kept
    for p in (alive, mine, foreign):
        p.write_bytes(b"x")
    write_text_atomic(folder / "a.json", "{}")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["a.json", alive.name, mine.name, foreign.name])
    # A folder is cleaned once per process: a later dead writer's files wait for the next process.
    late = folder / f".b.json.k.agegender-{pid}.part"
    late.write_bytes(b"x")
    with atomic_dir(folder / "sub") as tmp:
        assert tmp.name.startswith(".sub.") and tmp.name.endswith(f".agegender-{os.getpid()}.part")
    assert late.exists()
