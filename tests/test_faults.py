"""Faults and hostile paths: no input is ever an output, writes that fail (disk full, a file size limit, a read-only
or forbidden directory, a name too long) give one line and leave no temp file, names print safely, and inputs that
are not regular files are named as such."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.files import atomic_path, check_outputs, regular_file, safe_name, write_text_atomic
from agegender.model.checkpoint import CheckpointMeta, save_checkpoint
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    config = ModelConfig(widths=(8, 8, 8, 8, 8), image_size=64, hidden=(16,), dropout=(0.0,))
    save_checkpoint(path, AgeGenderNet(config).eval(), CheckpointMeta(config, VGG_FACE_PREPROCESS.resized(64)))
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"p{i}.jpg")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str], *contains: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("agegender: error:") == 1 and err.splitlines()[-1].startswith("agegender: error:"), err
    assert "Traceback" not in err and "internal error" not in err, err
    for text in contains:
        assert text in err, err
    return err


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.part")], list(folder.rglob("*"))


# -- no input is ever an output -----------------------------------------------------------------------
def test_annotating_into_the_input_folder_is_refused(capsys: pytest.CaptureFixture[str], model: Path, photos: Path) -> None:
    before = _digest(photos)
    _one_line(
        capsys,
        ["predict", str(photos), "--model", str(model), "--no-detect", "--annotate", str(photos)],
        "holds the input",
        "choose another folder",
    )
    link = photos.parent / "same"
    link.symlink_to(photos)
    _one_line(
        capsys,
        ["predict", str(photos / "p1.jpg"), "--model", str(model), "--no-detect", "--annotate", str(link)],
        "holds the input",
    )
    assert _digest(photos) == before


def test_annotating_into_a_new_subfolder_works(capsys: pytest.CaptureFixture[str], model: Path, photos: Path) -> None:
    before = _digest(photos)
    out = photos / "annotated"
    assert (
        main(
            [
                "predict",
                str(photos),
                "--model",
                str(model),
                "--no-detect",
                "--annotate",
                str(out),
                "-o",
                str(photos.parent / "out.jsonl"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert {k: v for k, v in _digest(photos).items() if k in before} == before


@pytest.mark.parametrize("kind", ["same name", "symlink", "hard link", "the model"])
def test_output_that_is_an_input_is_refused(capsys: pytest.CaptureFixture[str], model: Path, photos: Path, kind: str) -> None:
    photo = photos / "p0.jpg"
    target = {
        "same name": photo,
        "symlink": photos.parent / "link.jpg",
        "hard link": photos.parent / "hard.jpg",
        "the model": model,
    }[kind]
    if kind == "symlink":
        target.symlink_to(photo)
    elif kind == "hard link":
        os.link(photo, target)
    before = _digest(photos) | {"model": hashlib.sha256(model.read_bytes()).hexdigest()}
    _one_line(
        capsys,
        ["predict", str(photo), "--model", str(model), "--no-detect", "-o", str(target)],
        "is the input",
        "choose another output",
    )
    assert _digest(photos) | {"model": hashlib.sha256(model.read_bytes()).hexdigest()} == before


def test_directory_shaped_outputs_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path) -> None:
    src = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, src)
    _one_line(capsys, ["convert", str(src), "-o", str(tmp_path / "newdir") + "/"], "is a directory")
    assert not (tmp_path / "newdir").exists()
    _one_line(capsys, ["export", "--model", str(model), "--format", "onnx", "-o", str(tmp_path) + "/"], "is a directory")
    _one_line(capsys, ["convert", str(src), "-o", str(src)], "is the input")


def test_check_outputs_on_its_own(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("x")
    check_outputs([a], file=tmp_path / "b.txt", folder=tmp_path / "new")  # nothing to overwrite
    with pytest.raises(AgeGenderError, match="exists and is not a directory"):
        check_outputs([a], folder=a)
    with pytest.raises(AgeGenderError, match="holds the input"):
        check_outputs([tmp_path], folder=tmp_path)  # a folder given as the input itself


# -- failed writes: one line, no temp file --------------------------------------------------------------
def _limited(script: str, limit: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE)."""
    prologue = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
    return subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


@pytest.mark.slow
def test_convert_past_the_file_size_limit(tmp_path: Path) -> None:
    from agegender.data.synthetic import make_vgg_face_state

    src = tmp_path / "vgg.pt"
    torch.save(make_vgg_face_state((4, 8, 8, 16, 16), 32, 10, seed=0), src)
    run = _limited(
        f"""
        import sys
        from agegender.cli import main
        sys.exit(main(["convert", {str(src)!r}, "-o", {str(tmp_path / "out" / "vgg.safetensors")!r}]))
    """,
        20_000,
        tmp_path,
    )
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("agegender: error:") and "vgg.safetensors: cannot write (file too large" in last
    assert "Traceback" not in run.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_predict_output_past_the_file_size_limit(tmp_path: Path, model: Path, photos: Path) -> None:
    run = _limited(
        f"""
        import sys
        from agegender.cli import main
        sys.exit(main(["predict", {str(photos)!r}, "--model", {str(model)!r}, "--no-detect",
                       "-o", {str(tmp_path / "preds.jsonl")!r}, "--annotate", {str(tmp_path / "ann")!r}]))
    """,
        300,
        tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert "cannot write (file too large" in run.stderr.strip().splitlines()[-1], run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "preds.jsonl").exists()
    _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"), (errno.EDQUOT, "disk quota exceeded")],
)
def test_write_errors_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str) -> None:
    def full(self: Path, data: bytes) -> int:
        Path.write_text(self, "half")  # something was written before the disk filled
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(AgeGenderError, match=rf"out.json: cannot write \({reason}\)"):
        write_text_atomic(tmp_path / "out.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_libraries_that_lose_the_errno_still_say_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AgeGenderError, match=r"cannot write \(disk full\)"), atomic_path(tmp_path / "m.safetensors"):
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    monkeypatch.setattr(os, "statvfs", lambda _: type("S", (), {"f_bavail": 0})())
    with (
        pytest.raises(AgeGenderError, match=r"train_state.pt: cannot write \(disk full\)"),
        atomic_path(tmp_path / "train_state.pt"),
    ):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(ValueError, match="unrelated"), atomic_path(tmp_path / "x"):
        raise ValueError("unrelated")  # other errors stay what they are
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("code", "reason"), [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_unwritable_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model: Path,
    photos: Path,
    code: int,
    reason: str,
) -> None:
    import tempfile

    def refuse(*_: object, **__: object) -> None:  # chmod does not stop root, so the OS answer is simulated
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _one_line(
        capsys,
        ["predict", str(photos), "--model", str(model), "--no-detect", "-o", str(tmp_path / "o.jsonl")],
        "o.jsonl: cannot write here",
        reason,
    )


def test_a_name_too_long_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, photos: Path) -> None:
    out = tmp_path / ("x" * 300 + ".jsonl")
    _one_line(
        capsys,
        ["predict", str(photos), "--model", str(model), "--no-detect", "-o", str(out)],
        "cannot write",
        "file name too long",
    )
    _no_temp_files(tmp_path)


def test_an_unreadable_model_says_permission_denied(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, model: Path, photos: Path
) -> None:
    import builtins

    import agegender.model.meta as meta_module

    real_open = builtins.open

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if str(file) == str(model):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(meta_module, "open", guarded, raising=False)
    _one_line(
        capsys,
        ["predict", str(photos), "--model", str(model), "--no-detect"],
        "tiny.safetensors: cannot read (permission denied)",
    )


# -- names and kinds of files -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["two\nlines.jpg", "red\x1b[31mtext\x1b[0m.jpg", "bad\udcffbyte.jpg", "tab\there.jpg"])
def test_names_print_on_one_safe_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, name: str) -> None:
    shown = safe_name(name)
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown
    shown.encode("utf-8")  # a surrogate would fail here
    err = _one_line(capsys, ["predict", str(tmp_path / name), "--model", str(model), "--no-detect"], shown)
    assert "\x1b" not in err and err.count("\n") == 1


def test_an_undecodable_file_name_is_predicted(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / os.fsdecode(b"caf\xe9.png"))
    out = tmp_path / "out.csv"
    assert main(["predict", str(folder), "--model", str(model), "--no-detect", "-o", str(out), "--output-format", "csv"]) == 0, (
        capsys.readouterr().err
    )
    assert b"caf\xe9.png" in out.read_bytes()  # the name's own bytes, as the file system has them


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_inputs_that_are_not_regular_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "pipe.jpg"
        os.mkfifo(path)
        expected = "not a regular file (a FIFO)"
    elif kind == "device":
        path, expected = Path("/dev/zero"), "not a regular file (a character device)"
        if not path.exists():
            pytest.skip("no /dev/zero")
    else:
        path, expected = tmp_path, "not a regular file (a directory)"
    if kind != "directory":
        _one_line(capsys, ["predict", str(path), "--model", str(model), "--no-detect"], expected)
    with pytest.raises(AgeGenderError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        regular_file(path)


def test_fetch_past_the_file_size_limit_leaves_no_part(tmp_path: Path) -> None:
    mirror, dest = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    (mirror / "vgg_face_torch.tar.gz").write_bytes(os.urandom(400_000))
    run = _limited(
        f"""
        import sys
        from agegender.cli import main
        sys.exit(main(["fetch", "weights", "--dest", {str(dest)!r}, "--url", {mirror.as_uri() + "/"!r},
                       "--no-extract", "--quiet"]))
    """,
        100_000,
        tmp_path,
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "cannot write (file too large" in last and "partial download was removed" in last, run.stderr
    assert [p.name for p in dest.rglob("*") if p.is_file()] == []
