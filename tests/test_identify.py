"""identify(): top identities from converted weights, checked against the NumPy Torch7 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.infer.identify import identify
from agegender.weights.convert import convert_weights
from t7_writer import torch7_forward, vgg_face_model, vgg_face_params, write_t7

CLASSES = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("identify")
    params = vgg_face_params((4, 8, 8, 16, 16), fc=32, classes=CLASSES, seed=7)
    params["fc8.weight"] *= 0.02  # keep image-scale logits out of softmax saturation
    model = vgg_face_model(params)
    write_t7(root / "VGG_FACE.t7", model)
    convert_weights(root / "VGG_FACE.t7", root / "vgg_face.safetensors")
    (root / "names.txt").write_text("".join(f"Person_{i}\n" for i in range(CLASSES)))
    rgb = np.random.default_rng(0).integers(0, 256, (60, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "face.png")
    # The reference sees the same pixels: PIL's resize to the input size, then the published preprocessing.
    resized = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR))
    ref = torch7_forward(model, VGG_FACE_PREPROCESS.normalize_numpy(resized))
    return {"root": root, "ref": ref}


@pytest.mark.parametrize("weights", ["vgg_face.safetensors", "VGG_FACE.t7"])
def test_top_k_matches_reference(files: dict[str, object], weights: str) -> None:
    root, ref = files["root"], files["ref"]
    assert isinstance(root, Path) and isinstance(ref, np.ndarray)
    assert ref.max() < 0.99
    top = identify(root / "face.png", root / weights, root / "names.txt", top=3)
    expected = np.argsort(-ref)[:3]
    assert [i for i, _, _ in top] == list(expected)
    assert top[0][0] == int(np.argmax(ref))
    assert [name for _, name, _ in top] == [f"Person_{i}" for i in expected]
    np.testing.assert_allclose([p for _, _, p in top], ref[expected], atol=1e-5)


def test_cli(files: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    root, ref = files["root"], files["ref"]
    assert isinstance(root, Path) and isinstance(ref, np.ndarray)
    rc = main(
        [
            "identify",
            str(root / "face.png"),
            "--weights",
            str(root / "vgg_face.safetensors"),
            "--names",
            str(root / "names.txt"),
            "--top",
            "3",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    best = int(np.argmax(ref))
    assert rc == 0 and len(lines) == 3
    assert lines[0].startswith(f"1. Person_{best} (class {best + 1}, p=")


def test_wrong_names_length(files: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = files["root"]
    assert isinstance(root, Path)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"P{i}\n" for i in range(CLASSES + 1)))
    rc = main(["identify", str(root / "face.png"), "--weights", str(root / "vgg_face.safetensors"), "--names", str(names)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"{names}: {CLASSES + 1} names, but the weights have {CLASSES} identities" in err


def test_bad_image(files: dict[str, object], tmp_path: Path) -> None:
    root = files["root"]
    assert isinstance(root, Path)
    bad = tmp_path / "face.jpg"
    bad.write_bytes(b"not an image")
    for image in (bad, tmp_path / "missing.png"):
        with pytest.raises(AgeGenderError, match=str(image)):
            identify(image, root / "vgg_face.safetensors", root / "names.txt")
