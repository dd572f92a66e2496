"""Resuming from damaged, foreign or incomplete run directories; one writer per run; divergence; option limits.

Every damaged state gives one line that says how to start again, never a traceback, and leaves the run as it was.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from agegender.cli import main
from agegender.data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face
from agegender.errors import AgeGenderError
from agegender.files import folder_lock
from agegender.model.checkpoint import load_checkpoint
from agegender.rundir import RunDir
from agegender.train import loop
from agegender.train.config import TrainConfig
from agegender.train.loop import _restore, fit, make_optimizer

TINY = (16, 32, 32, 64, 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    make_agegender_tree(root / "data", per_folder=2, seed=3)
    save_vgg_face(root / "w.safetensors", make_vgg_face_state(widths=TINY, fc=16, classes=4, seed=1))
    return {"data": root / "data", "weights": root / "w.safetensors", "root": root}


def config(world: dict[str, Path], out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(world["data"]),
        out=str(out),
        backbone="vgg-face",
        weights=str(world["weights"]),
        epochs=1,
        batch_size=32,
        hidden=(32, 32),
        progress=False,
        cache_dir=str(world["root"] / "cache"),
    )
    return TrainConfig.from_preset("default", **{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(world: dict[str, Path]) -> dict[str, Path]:
    """A finished one-epoch run, and one of another shape (a foreign state's source)."""
    fit(config(world, world["root"] / "run"))
    fit(config(world, world["root"] / "other", hidden=(24,)))
    return {"run": world["root"] / "run", "other": world["root"] / "other"}


def _copy(runs: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["run"], out)
    return out


def _resume(out: Path) -> None:
    """What `train --resume` does once the model and optimizer are built: restore them from ``out``."""
    model, _ = load_checkpoint(out / "model.safetensors")
    cfg = TrainConfig(**{**json.loads((out / "config.json").read_text()), "progress": False})  # type: ignore[arg-type]
    model.train()
    _restore(RunDir(out), model, make_optimizer(model, cfg))


def _state(out: Path) -> dict[str, object]:
    return torch.load(out / "train_state.pt", weights_only=True)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {os.environ.get('RESUME_MARKER', '/nonexistent/marker')}",)


def _damage(out: Path, runs: dict[str, Path], how: str) -> None:
    state_file = out / "train_state.pt"
    data = state_file.read_bytes()
    if how == "truncated":
        state_file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        state_file.write_bytes(b"")
    elif how == "garbage":
        state_file.write_bytes(os.urandom(4096))
    elif how == "pickle payload":
        state_file.write_bytes(pickle.dumps({"epoch": 1, "x": Payload()}))
    elif how == "zip pickle payload":
        torch.save({"epoch": 1, "x": Payload()}, state_file)
    elif how == "a list":
        torch.save([1, 2, 3], state_file)
    elif how in ("no optimizer", "epoch as text", "best of one", "history not json", "rng of floats"):
        state = _state(out)
        if how == "no optimizer":
            del state["optimizer"]
        elif how == "epoch as text":
            state["epoch"] = "1"
        elif how == "best of one":
            state["best"] = [0.5]
        elif how == "history not json":
            state["history"] = "{oops"
        else:
            state["torch_rng"] = torch.zeros(10)
        torch.save(state, state_file)
    elif how == "foreign":
        shutil.copy(runs["other"] / "train_state.pt", state_file)
    elif how == "foreign, old format":
        state = torch.load(runs["other"] / "train_state.pt", weights_only=True)
        del state["model_config"]  # written before the model was recorded: the optimizer's shapes tell
        torch.save(state, state_file)
    elif how == "other epoch":
        state = _state(out)
        state["epoch"] = 7
        torch.save(state, state_file)
    elif how == "no last":
        (out / "last.safetensors").unlink()
    elif how == "damaged last":
        (out / "last.safetensors").write_bytes(b"\x00" * 100)
    elif how == "zip bomb":
        with zipfile.ZipFile(state_file, "w", zipfile.ZIP_DEFLATED) as z, z.open("s/data/0", "w") as bomb:
            for _ in range(64):
                bomb.write(bytes(1 << 20))
    else:
        raise AssertionError(how)


DAMAGES = {
    "truncated": "damaged or foreign",
    "empty": "damaged or foreign",
    "garbage": "damaged or foreign",
    "pickle payload": "damaged or foreign",
    "zip pickle payload": "damaged or foreign",
    "a list": "holds a list",
    "no optimizer": "lacks or has a wrong optimizer",
    "epoch as text": "lacks or has a wrong epoch",
    "best of one": "not a training state's values",
    "history not json": "not a training state's values",
    "rng of floats": "not a training state's values",
    "foreign": "from a run with another model",
    "foreign, old format": "does not fit this run's model",
    "other epoch": "last.safetensors is from epoch 1, train_state.pt from epoch 7",
    "no last": "last.safetensors is missing",
    "damaged last": "last.safetensors is damaged",
    "zip bomb": "compression bomb",
}


@pytest.mark.parametrize("how", list(DAMAGES))
@pytest.mark.slow
def test_a_damaged_state_gives_one_line(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("RESUME_MARKER", str(marker))
    out = _copy(runs, tmp_path)
    _damage(out, runs, how)
    with pytest.raises(AgeGenderError) as e:
        _resume(out)
    message = str(e.value)
    assert DAMAGES[how] in message and "cannot resume" in message and "start again with another out," in message
    assert "\n" not in message
    assert not marker.exists()  # the payload never ran


@pytest.mark.slow
def test_an_intact_state_restores(runs: dict[str, Path], tmp_path: Path) -> None:
    _resume(_copy(runs, tmp_path))


@pytest.mark.parametrize(
    ("how", "text"),
    [
        ("truncated", "damaged or foreign"),
        ("config", "config.json is unreadable"),
        ("config types", "config.json has batch_size = 'many'"),
    ],
)
@pytest.mark.slow
def test_train_resume_command_gives_one_line_and_keeps_the_run(
    world: dict[str, Path], runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, text: str
) -> None:
    out = _copy(runs, tmp_path)
    if how == "truncated":
        _damage(out, runs, how)
    elif how == "config":
        (out / "config.json").write_text("{not json")
    else:
        stored = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**stored, "batch_size": "many"}))
    before = sorted(p.name for p in out.iterdir())
    rc = main(
        [
            "train",
            "--data",
            str(world["data"]),
            "--out",
            str(out),
            "--resume",
            "--epochs",
            "2",
            "--weights",
            str(world["weights"]),
            "--cache-dir",
            str(world["root"] / "cache"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("agegender: error:") and text in err.splitlines()[-1], err
    assert sorted(p.name for p in out.iterdir()) == before


# -- one writer per run ------------------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_holders_pid(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with folder_lock(out):
        with pytest.raises(AgeGenderError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            fit(config(world, out))
    assert out.is_dir()  # the holder's directory is never removed by the refused writer


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom agegender.files import folder_lock\n"
            f"with folder_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(AgeGenderError, match=rf"pid {holder.pid}\)"), folder_lock(out):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # the stale record is still there
    with folder_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


# -- divergence and option limits -------------------------------------------------------------------
def test_training_that_diverges_says_so(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "wild"
    start = time.perf_counter()
    with pytest.raises(AgeGenderError, match=r"training diverged at epoch 1 \(loss .*\), lower lr \(now 1e\+06\)"):
        fit(config(world, out, lr=1e6))
    assert not out.exists()  # a new run that failed leaves nothing behind
    assert time.perf_counter() - start < 120


@pytest.mark.slow
def test_nan_loss_stops_at_its_epoch(
    world: dict[str, Path], runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(runs, tmp_path)
    real = loop.train_one_epoch

    def nan_at_two(*args: object, **kwargs: object) -> dict[str, float]:
        losses = real(*args, **kwargs)  # type: ignore[arg-type]
        return {**losses, "train_loss": float("nan")}

    monkeypatch.setattr(loop, "train_one_epoch", nan_at_two)
    with pytest.raises(AgeGenderError, match="training diverged at epoch 2 \\(loss nan\\)"):
        fit(config(world, out, epochs=3), resume=True)
    assert _state(out)["epoch"] == 1  # the last good epoch stays resumable


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--batch-size", "0"], "batch size and workers must be at least 1, got 0 and 2"),
        (["--workers", "0"], "batch size and workers must be at least 1, got 64 and 0"),
    ],
)
@pytest.mark.slow
def test_evaluate_option_limits(runs: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], text: str) -> None:
    rc = main(["evaluate", "--model", str(runs["run"]), *argv, "--out", str(runs["run"].parent / "eval-limits")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and text in err.splitlines()[-1], err


def test_a_head_that_cannot_fit_memory_is_refused_up_front(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            "--data",
            str(world["data"]),
            "--out",
            str(tmp_path / "huge"),
            "--weights",
            str(world["weights"]),
            "--hidden",
            "2000000",
            "2000000",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "needs at least" in err and "GiB to train, more than this machine's" in err, err
    assert not (tmp_path / "huge").exists()


@pytest.mark.slow
def test_train_past_the_file_size_limit_is_one_line_and_leaves_nothing(world: dict[str, Path], tmp_path: Path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    script = (
        f"import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        f"from agegender.cli import main\n"
        f"sys.exit(main(['train', '--backbone', 'vgg-face', '--data', {str(world['data'])!r}, "
        f"'--out', {str(out)!r}, '--weights', "
        f"{str(world['weights'])!r}, '--epochs', '1', '--batch-size', '32', '--hidden', '32', "
        f"'--cache-dir', {str(cache)!r}]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert last.startswith("agegender: error:") and "cannot write (file too large" in last, run.stderr
    assert not out.exists() and not list(tmp_path.rglob("*.part"))
