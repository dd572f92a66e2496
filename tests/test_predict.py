"""Prediction: decoding, both backends, batching across images, the predict command and its errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.images import ImageError, expand_paths, load_image
from agegender.infer.predict import Predictor
from agegender.labels import ADIENCE_GROUP_NAMES, age_group
from agegender.model.checkpoint import CheckpointMeta, save_checkpoint
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet

SIZE = 64


def make_checkpoint(path: Path, age_head: str = "dex", seed: int = 0) -> Path:
    """An untrained tiny-width model: its numbers mean nothing, but every code path runs."""
    torch.manual_seed(seed)
    config = ModelConfig(widths=(8, 8, 8, 8, 8), image_size=SIZE, hidden=(16,), dropout=(0.0,), age_head=age_head)
    net = AgeGenderNet(config).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so batch composition would matter if misused
        bn = net.fc[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    save_checkpoint(path, net, CheckpointMeta(config, VGG_FACE_PREPROCESS.resized(SIZE)))
    return path


def make_onnx(checkpoint: Path, path: Path) -> Path:
    from agegender.infer.export import export_onnx
    from agegender.model.checkpoint import load_checkpoint

    net, meta = load_checkpoint(checkpoint)
    export_onnx(net, meta, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    ckpt = make_checkpoint(d / "tiny.safetensors")
    return {"checkpoint": ckpt, "onnx": make_onnx(ckpt, d / "tiny.onnx")}


def _noise(seed: int, shape: tuple[int, int] = (90, 120)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _save(rgb: np.ndarray, path: Path) -> Path:
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def photo_folder(shared_faces: Path, tmp_path: Path) -> Path:
    """Real photos (one in a subfolder), a faceless image, a corrupt JPEG, an empty file and a text file."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for f in sorted((shared_faces / "lfw").glob("*.jpg"))[:4]:
        shutil.copy(f, folder)
    shutil.copy(min((shared_faces / "fairface").glob("*.jpg")), folder / "more")
    _save(np.full((100, 100, 3), 200, np.uint8), folder / "blank.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _predict(paths: list[str], model: Path, *options: str) -> int:
    return main(["predict", *paths, "--model", str(model), "--batch-size", "4", *options])


# -- decoding -----------------------------------------------------------------------------------


def test_load_image_sources_agree(tmp_path: Path) -> None:
    rgb = _noise(1)
    path = _save(rgb, tmp_path / "a.png")
    assert np.array_equal(load_image(path), rgb)
    assert np.array_equal(load_image(path.read_bytes()), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    assert load_image(rgb[..., 0]).shape == (90, 120, 3)  # grayscale arrays become RGB


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.fromarray(_noise(2, (40, 60)))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (60, 40, 3)


@pytest.mark.parametrize(
    ("content", "kind", "message"),
    [
        (b"", "unsupported", "empty file"),
        (b"hello, not an image", "unsupported", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "unsupported", "not an image"),
    ],
)
def test_load_image_rejects_bad_bytes(content: bytes, kind: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        load_image(content, "x.jpg")
    assert info.value.kind == kind and str(info.value).startswith("x.jpg: ")


def test_load_image_rejects_truncated_and_huge(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(3, (200, 200))).save(buf, "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2], "half.jpg")
    assert info.value.kind == "corrupt"
    Image.new("1", (8000, 8000)).save(tmp_path / "bomb.png")  # 64 MP that compress to a few KB
    with pytest.raises(ImageError, match="bomb.png: 8000x8000 pixels exceeds") as info:
        load_image(tmp_path / "bomb.png")
    assert info.value.kind == "too_large"
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


# -- backends and batching ----------------------------------------------------------------------


def test_backends_agree(models: dict[str, Path]) -> None:
    crops = np.stack([_noise(s, (SIZE, SIZE)) for s in range(6)])
    fp32 = Predictor.from_path(models["checkpoint"], precision="fp32")
    assert fp32.info()["precision"] == "fp32"
    torch_faces = fp32.classify(crops)
    onnx_faces = Predictor.from_path(models["onnx"]).classify(crops)
    assert len(torch_faces) == len(onnx_faces) == 6
    for a, b in zip(torch_faces, onnx_faces):
        assert abs(a.p_male - b.p_male) < 1e-4
        assert abs(a.age - b.age) < 1e-3
        assert a.gender == b.gender
    assert np.ptp([f.p_male for f in torch_faces]) > 0  # the model does look at its input


def test_bf16_trunk_stays_close_to_fp32(models: dict[str, Path]) -> None:
    crops = np.stack([_noise(s, (SIZE, SIZE)) for s in range(6)])
    bf16 = Predictor.from_path(models["checkpoint"], precision="bf16")
    assert bf16.info()["precision"] == "bf16"
    assert bf16.backend.model.trunk.conv1_1.weight.dtype == torch.bfloat16
    assert bf16.backend.model.fc[0].weight.dtype == torch.float32  # the head stays fp32
    got = bf16.classify(crops)
    want = Predictor.from_path(models["checkpoint"], precision="fp32").classify(crops)
    p_got, p_want = np.array([f.p_male for f in got]), np.array([f.p_male for f in want])
    assert 0 < np.abs(p_got - p_want).max() < 0.02  # rounded, but only just
    assert max(abs(a.age - b.age) for a, b in zip(got, want)) < 1.0
    with pytest.raises(AgeGenderError, match="precision must be one of"):
        Predictor.from_path(models["checkpoint"], precision="fp16")


def test_onnx_backend_calls_no_torch(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor.from_path(models["onnx"], no_detect=True)

    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("torch called in the ONNX path")

    for name in ("from_numpy", "as_tensor", "tensor", "stack", "sigmoid", "softmax"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)
    assert len(predictor.predict(_noise(4))) == 1


def test_faces_and_age_groups(models: dict[str, Path], tmp_path: Path) -> None:
    faces = Predictor.from_path(models["checkpoint"], no_detect=True).predict(_noise(5))
    (face,) = faces
    assert face.box is None and face.gender in ("female", "male")
    assert face.gender == ("male" if face.p_male >= 0.5 else "female")
    assert 1 <= face.age <= 70 and face.age_group == ADIENCE_GROUP_NAMES[age_group(round(face.age))]
    no_age = Predictor.from_path(make_checkpoint(tmp_path / "g.safetensors", age_head="none"), no_detect=True)
    (face,) = no_age.predict(_noise(5))
    assert face.age is None and face.age_group is None and face.label() in ("M", "F")


@pytest.mark.slow
def test_batching_across_images_matches_one_by_one(models: dict[str, Path], photo_folder: Path) -> None:
    paths = expand_paths([str(photo_folder)])
    predictor = Predictor.from_path(models["checkpoint"])
    batched = list(predictor.predict_many(paths, batch_size=3))
    single = list(predictor.predict_many(paths, batch_size=1))
    assert [r.path for r in batched] == [r.path for r in single] == paths
    for a, b in zip(batched, single):
        assert a.error == b.error and len(a.faces) == len(b.faces)
        one = [] if a.error else predictor.predict(a.path)
        for fa, fb, fo in zip(a.faces, b.faces, one):
            assert fa.box == fb.box == fo.box
            assert abs(fa.p_male - fb.p_male) < 1e-5 and abs(fa.p_male - fo.p_male) < 1e-5


def test_pipeline_keeps_order_raises_classifier_errors_and_stops_cleanly(models: dict[str, Path], tmp_path: Path) -> None:
    import threading

    paths = [str(_save(_noise(s), tmp_path / f"{s}.png")) for s in range(12)]
    predictor = Predictor.from_path(models["checkpoint"], no_detect=True)
    predictor.workers = 3
    results = list(predictor.predict_many(paths, batch_size=2))
    assert [r.path for r in results] == paths and all(len(r.faces) == 1 for r in results)

    stream = predictor.predict_many(paths, batch_size=2)
    assert next(stream).path == paths[0]
    stream.close()  # a consumer that stops early leaves no pool thread behind
    assert not [t for t in threading.enumerate() if t.name.startswith("predict")]

    def broken(crops: np.ndarray) -> tuple[np.ndarray, None]:
        raise RuntimeError("classifier failed")

    predictor.backend.run = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="classifier failed"):
        list(predictor.predict_many(paths, batch_size=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("predict")]


# -- the predict command ------------------------------------------------------------------------


def test_predict_folder_end_to_end(models: dict[str, Path], photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "preds.jsonl"
    assert _predict([str(photo_folder)], models["onnx"], "-o", str(out), "--annotate", str(tmp_path / "ann")) == 0
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    images = {"blank.png", "corrupt.jpg", "empty.jpg", *(p.name for p in photo_folder.rglob("*.jpg"))}
    assert set(records) == images  # one record per image, the text file skipped
    assert records["blank.png"]["faces"] == [] and records["blank.png"]["error"] is None
    assert "corrupt.jpg: " in records["corrupt.jpg"]["error"] and "empty file" in records["empty.jpg"]["error"]
    real = [r for name, r in records.items() if name not in ("blank.png", "corrupt.jpg", "empty.jpg")]
    assert sum(bool(r["faces"]) for r in real) >= len(real) - 1
    for r in real:
        for face in r["faces"]:
            assert set(face) == {"box", "gender", "p_male", "age", "age_group", "age_low", "age_high"}
            # RetinaFace adds its 5 landmarks; Haar (the fallback) gives boxes only.
            assert set(face["box"]) - {"landmarks"} == {"x", "y", "w", "h", "score"} and 0 <= face["p_male"] <= 1
            assert len(face["box"].get("landmarks", [[0, 0]] * 5)) == 5
    annotated = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert len(annotated) == len(images) - 2 and "blank.png" in annotated  # not the two broken files
    assert Image.open(tmp_path / "ann" / annotated[0]).size == Image.open(next(photo_folder.rglob(annotated[0]))).size


def test_predict_csv_and_globs(models: dict[str, Path], photo_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _predict(
            [str(photo_folder / "*.png"), str(photo_folder / "blank.png")],
            models["checkpoint"],
            "--output-format",
            "csv",
            "--no-detect",
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["path"].endswith("blank.png")  # deduplicated
    assert rows[0]["face"] == "0" and rows[0]["x"] == "" and rows[0]["gender"] in ("female", "male")


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("agegender: error: ")
    return err[-1]


def test_predict_command_errors(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _save(_noise(6), tmp_path / "a.png")
    model = str(models["checkpoint"])
    assert "nope.safetensors: no trained model here" in _cli_error(
        ["predict", str(img), "--model", str(tmp_path / "nope.safetensors")], capsys
    )
    (tmp_path / "model.txt").write_text("hi")
    assert "model.txt: not a model file" in _cli_error(["predict", str(img), "--model", str(tmp_path / "model.txt")], capsys)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    assert "bad.safetensors: not a safetensors checkpoint" in _cli_error(
        ["predict", str(img), "--model", str(tmp_path / "bad.safetensors")], capsys
    )
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    assert "bad.onnx: not a loadable ONNX model" in _cli_error(
        ["predict", str(img), "--model", str(tmp_path / "bad.onnx")], capsys
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    assert "empty: folder has no images" in _cli_error(["predict", str(tmp_path / "empty"), "--model", model], capsys)
    assert "no files match" in _cli_error(["predict", str(tmp_path / "*.gif"), "--model", model], capsys)
    assert "missing.jpg: no such file or folder" in _cli_error(
        ["predict", str(tmp_path / "missing.jpg"), "--model", model], capsys
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write here" in _cli_error(["predict", str(img), "--model", model, "-o", str(blocker / "o.jsonl")], capsys)
    assert not list(tmp_path.glob("**/*.part"))


def test_bad_images_do_not_stop_the_batch(models: dict[str, Path], tmp_path: Path) -> None:
    good = [_save(_noise(s), tmp_path / f"g{s}.png") for s in range(3)]
    Image.new("1", (8000, 8000)).save(tmp_path / "huge.png")
    paths = [good[0], tmp_path / "huge.png", tmp_path / "gone.jpg", good[1], good[2]]
    results = list(Predictor.from_path(models["checkpoint"], no_detect=True).predict_many(paths, batch_size=2))
    assert [r.error is None for r in results] == [True, False, False, True, True]
    assert "pixel limit" in results[1].error and "no such file" in results[2].error
    assert all(len(r.faces) == 1 for r in results if r.error is None)
    with pytest.raises(AgeGenderError, match="batch size"):
        next(Predictor.from_path(models["checkpoint"]).predict_many(paths, batch_size=0))


def test_batch_thread_pools(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    from agegender.faces.detect import RetinaFace
    from agegender.infer.predict import share_cores_for_batches

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        share_cores_for_batches(Predictor.from_path(models["checkpoint"], no_detect=True))
        assert (torch.get_num_threads(), cv2.getNumThreads()) == before  # no detection: the classifier keeps all
        predictor = Predictor.from_path(models["checkpoint"])
        share_cores_for_batches(predictor)
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1  # a task per core: no pools on top
        if isinstance(predictor.detector, RetinaFace):
            assert predictor.detector.threads == 1
        torch.set_num_threads(before[0])
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        share_cores_for_batches(Predictor.from_path(models["checkpoint"]))
        assert torch.get_num_threads() == before[0]  # the user's setting wins
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_onnx_predict_never_imports_torch(models: dict[str, Path]) -> None:
    """ONNX serving needs no torch: a fresh interpreter predicts and torch stays unloaded."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np; from agegender.infer.predict import Predictor; "
        f"faces = Predictor.from_path({str(models['onnx'])!r}, no_detect=True).predict("
        "np.zeros((64, 64, 3), np.uint8)); "
        f"Predictor.from_path({str(models['onnx'])!r}).predict(np.zeros((99, 99, 3), np.uint8)); "
        "assert len(faces) == 1, faces; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
