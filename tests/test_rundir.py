"""The run directory's layout, named once, and what it reads back: refused in one line when damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agegender.errors import AgeGenderError
from agegender.files import folder_lock
from agegender.model.meta import resolve_model
from agegender.rundir import ReportDir, RunDir


def test_every_file_of_a_run_has_one_name(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert RunDir(str(tmp_path / "run")) == run and isinstance(run.path, Path)
    names = {
        p.name
        for p in (
            run.config,
            run.splits,
            run.checkpoint,
            run.last,
            run.train_state,
            run.history,
            run.curves,
            run.lock,
            run.report.path,
            run.evaluation("test").path,
        )
    }
    # the names older runs already hold: a run written before this type still reads
    assert names == {
        "config.json",
        "splits.json",
        "model.safetensors",
        "last.safetensors",
        "train_state.pt",
        "history.jsonl",
        "training_curves.png",
        ".lock",
        "report",
        "eval-test",
    }
    assert all(p.parent == run.path for p in (run.config, run.checkpoint, run.lock, run.report.path))
    assert run.report == ReportDir(run.path / "report")
    assert {run.report.json.name, run.report.md.name, run.report.predictions.name} == {
        "report.json",
        "report.md",
        "predictions.csv",
    }
    assert run.default_cache == tmp_path / "cache"  # beside the run, shared by its neighbours
    assert set(run.markers) <= names and set(run.report.markers) == {"report.json", "report.md"}
    with folder_lock(run.path):  # the lock the writers hold is the file the run names
        assert run.lock.is_file()


def test_a_checkpoint_knows_its_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.checkpoint.write_bytes(b"x")
    assert RunDir.holding(run.checkpoint) is None and not run.is_run()  # no config: a loose checkpoint
    run.write_config({"data": ["a", "b"], "seed": 3})
    assert RunDir.holding(run.checkpoint) == run and run.is_run()
    assert run.read_config() == {"data": ["a", "b"], "seed": 3}
    assert resolve_model(run.path) == run.checkpoint


def test_recorded_splits_read_back_or_are_refused(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_splits() is None  # a run from before splits were recorded
    run.write_splits({"train": [tmp_path / "a.jpg"], "val": [], "test": [tmp_path / "caf\udce9.jpg"]})
    assert run.read_splits() == {"train": [str(tmp_path / "a.jpg")], "val": [], "test": [str(tmp_path / "caf\udce9.jpg")]}
    for text in ("{oops", json.dumps(["a"]), json.dumps({"test": "a.jpg"}), json.dumps({"test": [1]})):
        run.splits.write_text(text)
        with pytest.raises(AgeGenderError, match=r"splits\.json: (unreadable|not a run's) splits"):
            run.read_splits()


@pytest.mark.parametrize("text", ["{oops", "[1, 2]", ""])
def test_a_damaged_config_is_one_line(tmp_path: Path, text: str) -> None:
    run = RunDir(tmp_path)
    run.config.write_text(text)
    with pytest.raises(AgeGenderError, match=r"config\.json: (unreadable run config|not a run config)") as e:
        run.read_config()
    assert "\n" not in str(e.value)
