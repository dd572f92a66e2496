"""Exports to ONNX, Keras and torch.export: parity with PyTorch, dynamic batch, metadata, bad inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agegender import cli
from agegender.backbones import BACKBONES
from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.errors import AgeGenderError
from agegender.infer import export as ex
from agegender.infer import exporters
from agegender.model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from agegender.model.config import ModelConfig
from agegender.model.dlib_resnet import Affine
from agegender.model.net import AgeGenderNet
from agegender.model.runtime import load_backend

TINY = {"widths": (4, 8, 8, 16, 16), "hidden": (32, 32)}
# No BatchNorm in the head: random noise hardly moves the globally pooled features of an untrained ResNet, so
# statistics taken from it would divide by a near-zero spread and amplify float32 rounding a thousandfold,
# as the statistics of a model trained on faces do not.
TINY_DLIB = {"widths": (4, 6, 8, 10, 10), "descriptor_dim": 8, "hidden": (32, 32), "head_bn": False}
EXTRA = {"data": {"train": 120, "val": 30, "source": "synthetic"}, "metrics": {"gender_accuracy": 0.5, "age_mae": 9.0}}


def make_run(
    root: Path,
    age_head: str = "dex",
    block_bn: bool = False,
    image_size: int = 64,
    feature_bn: bool = False,
    backbone: str = "vgg-face",
    feature_layer: str = "",
) -> Path:
    """An untrained tiny model whose BatchNorms hold realistic, non-identity running statistics.

    dlib-resnet models take the backbone's own input size and preprocessing from the registry, tiny widths,
    and affine layers that are not the identity.
    """
    torch.manual_seed(0)
    if backbone == "vgg-face":
        cfg = ModelConfig(**TINY, image_size=image_size, age_head=age_head, block_bn=block_bn, feature_bn=feature_bn)
        preprocess = VGG_FACE_PREPROCESS.resized(image_size)
    else:
        spec = BACKBONES[backbone]
        cfg = ModelConfig(
            **TINY_DLIB,
            backbone=backbone,
            feature_layer=feature_layer,
            image_size=spec.preprocess.size,
            age_head=age_head,
            feature_bn=feature_bn,
        )
        preprocess = spec.preprocess
    meta = CheckpointMeta(cfg, preprocess, weights_sha256="ab" * 32, extra=EXTRA)
    net = AgeGenderNet(cfg)
    for m in net.modules():  # He init keeps activations at VGG-like scale through 13 convs (the default shrinks them)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (backbone == "vgg-face" or isinstance(m, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, Affine):  # the residual sums would compound He init's growth through dlib's 14 blocks
            with torch.no_grad():
                m.scale.uniform_(0.5, 1.5)
                m.shift.normal_(0.0, 0.2)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0  # one batch sets the running stats outright
    for m in net.modules():  # AgeGenderNet.train keeps a frozen trunk in eval; the trunk BNs need stats too
        m.training = True
    with torch.no_grad():
        net(ex.verification_batch(meta, n=16, seed=99) if backbone == "vgg-face" else varied_batch(meta, 16, seed=99))
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    net.eval()
    run = root / f"run_{age_head}_{int(block_bn)}" if backbone == "vgg-face" else root / f"run_{feature_layer}_{age_head}"
    save_checkpoint(run / "model.safetensors", net, meta)
    return run


def varied_batch(meta: CheckpointMeta, n: int, seed: int) -> torch.Tensor:
    """Noise images of varied brightness, contrast and colour, normalised.

    Globally pooled features of plain noise hardly differ from image to image, so BatchNorm statistics taken
    from them would divide by a near-zero spread, and float32 rounding would be amplified as it never is in a
    model trained on faces. These spread the features the way different photos do.
    """
    rng = np.random.default_rng(seed)
    size = meta.config.image_size
    contrast = rng.uniform(0.1, 1.0, (n, 1, 1, 3))
    base = rng.uniform(0, 255 * (1 - contrast))
    rgb = base + contrast * rng.integers(0, 256, (n, size, size, 3))
    return torch.from_numpy(meta.preprocess.normalize_numpy(rgb.round().astype(np.uint8)))


def torch_reference(run: Path, x: torch.Tensor) -> list[np.ndarray]:
    net, _ = load_checkpoint(run / "model.safetensors")
    with torch.no_grad():
        return [t.numpy() for t in ex.InferenceModel(net)(x)]


def reference_outputs(run: Path, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
    """The PyTorch reference for the outputs ``names``, by name (formats carry different subsets)."""
    config = load_checkpoint(run / "model.safetensors")[1].config
    by_name = dict(zip(ex.output_names(config), torch_reference(run, x)))
    return [by_name[n] for n in names]


def inputs(run: Path, n: int, seed: int = 1) -> torch.Tensor:
    _, meta = load_checkpoint(run / "model.safetensors")
    return ex.verification_batch(meta, n=n, seed=seed)


def assert_parity(expected: list[np.ndarray], got: list[np.ndarray], tol: float) -> None:
    """Probabilities within ``tol`` absolute; age in years within ``tol`` relative (float32's own noise scales)."""
    assert [e.shape for e in expected] == [np.asarray(g).shape for g in got]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(np.asarray(g), e, rtol=tol, atol=tol)


def assert_result_parity(result: dict, run: Path, tol: float, x: torch.Tensor | None = None) -> None:
    """The reported per-output diffs meet the same bar, judged against an independent reference."""
    if x is None:
        x = ex.verification_batch(load_checkpoint(run / "model.safetensors")[1])
    config = load_checkpoint(run / "model.safetensors")[1].config
    reference = dict(zip(ex.output_names(config), torch_reference(run, x)))
    assert set(result["diffs"]) <= set(result["outputs"]) <= set(reference)
    for name, diff in result["diffs"].items():
        assert 0 <= diff <= tol * max(1.0, float(np.abs(reference[name]).max())), (name, diff)
    assert result["max_abs_diff"] == max(result["diffs"].values())


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


HEADS = [("dex", True), ("regression", False), ("none", True)]
# Keras's torch backend converts tensors with a numpy-2-deprecated call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize(("age_head", "block_bn"), HEADS)
@pytest.mark.slow
def test_onnx_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], age_head: str, block_bn: bool) -> None:
    import onnx
    import onnxruntime as ort

    run = make_run(tmp_path, age_head, block_bn)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--model", str(run), "--format", "onnx", "-o", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout carries only the result JSON
    names = ex.output_names(ModelConfig(**TINY, age_head=age_head))
    assert result["format"] == "onnx" and result["path"] == str(out) and result["outputs"] == names
    assert_result_parity(result, run, 1e-4)
    assert result["opset"] == ex.ONNX_OPSET and result["seconds"] > 0
    assert result["age"] == (None if age_head == "none" else age_head)
    assert ("note" in result) == (age_head == "none")
    assert files_in(tmp_path) == {run.name, "model.onnx"}

    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["opset"] == str(ex.ONNX_OPSET)
    assert any(o.version == ex.ONNX_OPSET for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    doc = json.loads(props["agegender"])
    assert doc["export"]["outputs"] == names and doc["extra"] == EXTRA
    assert doc["export"]["age"] == (None if age_head == "none" else {"head": age_head, "unit": "years", "min": 1, "max": 70})
    assert load_backend(out).meta == load_checkpoint(run / "model.safetensors")[1]  # the one ONNX metadata reader

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == names
    for n in (1, 5):
        x = inputs(run, n)
        got = session.run(None, {"input": x.numpy()})
        assert_parity(torch_reference(run, x), got, 1e-4)
        assert got[0].shape == (n,) and np.all((got[0] >= 0) & (got[0] <= 1))
    if age_head == "dex":
        out = dict(zip(names, got))
        assert np.allclose(out["age_probs"].sum(1), 1, atol=1e-5) and np.all((out["age"] >= 1) & (out["age"] <= 70))
        # the 80% interval holds the expected age, within the rounding to whole years
        assert np.all(out["age_low"] <= out["age"] + 1) and np.all(out["age"] - 1 <= out["age_high"])
        assert np.all(out["age_low"] <= out["age_high"])
    assert np.std(got[0]) > 0  # the model is not saturated, so parity means something


@pytest.mark.slow
def test_onnx_torchscript_exporter(tmp_path: Path) -> None:
    import onnxruntime as ort

    run = make_run(tmp_path, "dex", block_bn=True)
    net, meta = load_checkpoint(run / "model.safetensors")
    result = ex.export_onnx(net, meta, tmp_path / "ts.onnx", exporter="torchscript")
    assert result["exporter"] == "torchscript"
    assert_result_parity(result, run, 1e-4)
    x = inputs(run, 5)
    got = ort.InferenceSession(str(tmp_path / "ts.onnx")).run(None, {"input": x.numpy()})
    assert_parity(torch_reference(run, x), got, 1e-4)


@pytest.fixture(scope="module")
def keras_dex(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("keras_dex")
    run = make_run(root, "dex", block_bn=True)
    return run, root / "model.keras", exporters.export(run, "keras", root / "model.keras")


def check_keras_export(run: Path, out: Path, result: dict, age_head: str) -> None:
    assert result["format"] == "keras"
    assert_result_parity(result, run, 1e-4)
    assert files_in(out.parent) == {run.name, "model.keras", "model.keras.json"}
    side = json.loads((out.parent / "model.keras.json").read_text())
    assert CheckpointMeta.from_json(json.dumps(side)) == load_checkpoint(run / "model.safetensors")[1]
    assert side["export"]["input"]["layout"] == "NCHW"
    assert (side["export"]["age"] is None) == (age_head == "none")

    keras = ex._import_keras()
    model = keras.saving.load_model(str(out))
    assert list(model.output_names) == result["outputs"]
    size = load_checkpoint(run / "model.safetensors")[1].config.image_size
    assert tuple(model.inputs[0].shape) == (None, 3, size, size)  # VGG at 64: 2x2 trunk maps, the flatten order matters
    for n in (1, 5):
        x = inputs(run, n)
        reference = dict(zip(ex.output_names(load_checkpoint(run / "model.safetensors")[1].config), torch_reference(run, x)))
        assert_parity([reference[n] for n in result["outputs"]], ex._keras_outputs(model, x.numpy()), 1e-4)


def test_keras_export_dex(keras_dex: tuple[Path, Path, dict]) -> None:
    check_keras_export(*keras_dex, "dex")


@pytest.mark.parametrize(("age_head", "block_bn", "feature_bn"), [("regression", False, True), ("none", True, False)])
@pytest.mark.slow
def test_keras_export(tmp_path: Path, age_head: str, block_bn: bool, feature_bn: bool) -> None:
    run = make_run(tmp_path, age_head, block_bn, feature_bn=feature_bn)
    check_keras_export(run, tmp_path / "model.keras", exporters.export(run, "keras", tmp_path / "model.keras"), age_head)


@pytest.mark.tf
@pytest.mark.slow
def test_keras_export_runs_in_tensorflow(keras_dex: tuple[Path, Path, dict]) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    run, out, _ = keras_dex
    x = inputs(run, 5)
    got = ex.check_keras_in_tensorflow(out, x)
    assert list(got) == ["p_male", "age", "age_probs"]
    reference = dict(zip(ex.output_names(load_checkpoint(run / "model.safetensors")[1].config), torch_reference(run, x)))
    assert_parity([reference[n] for n in got], list(got.values()), 1e-4)


@pytest.mark.parametrize(("age_head", "block_bn"), [("dex", True), ("none", False)])
@pytest.mark.slow
def test_torch_export(tmp_path: Path, age_head: str, block_bn: bool) -> None:
    run = make_run(tmp_path, age_head, block_bn)
    out = tmp_path / "model.pt2"
    x_verify = inputs(run, 3, seed=7)  # the caller's own verification batch
    result = exporters.export(run, "torch", out, verify_inputs=x_verify)
    assert_result_parity(result, run, 1e-5, x_verify)
    assert files_in(tmp_path) == {run.name, "model.pt2", "model.pt2.json"}
    extra = {"agegender.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["agegender.json"]) == json.loads((tmp_path / "model.pt2.json").read_text())
    for n in (1, 5):
        x = inputs(run, n)
        with torch.no_grad():
            got = [t.numpy() for t in program.module()(x)]
        assert_parity(torch_reference(run, x), got, 1e-5)


def test_verification_inputs_must_match_the_model(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(AgeGenderError, match="float32"):
        exporters.export(run, "torch", tmp_path / "m.pt2", verify_inputs=torch.zeros(2, 3, 32, 32))
    assert files_in(tmp_path) == {run.name}


@pytest.mark.parametrize("fmt", ["onnx", "keras"])
@pytest.mark.slow
def test_failed_parity_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    run = make_run(tmp_path)
    for name in ("ONNX_TOLERANCE", "KERAS_TOLERANCE", "TORCH_TOLERANCE"):
        monkeypatch.setattr(ex, name, -1.0)  # no difference can pass
    with pytest.raises(AgeGenderError, match="differs from PyTorch"):
        exporters.export(run, fmt, tmp_path / f"m{ex.SUFFIXES[fmt]}")
    assert files_in(tmp_path) == {run.name}


def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    run = make_run(tmp_path)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    junk = tmp_path / "junk_run"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"not a checkpoint at all")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = tmp_path / "out" / "m.onnx"
    return {
        "missing run": (tmp_path / "nope", out, "no trained model here"),
        "run without checkpoint": (empty, out, "a run directory without model.safetensors"),
        "not a checkpoint": (junk, out, "not a safetensors checkpoint"),
        "checkpoint file directly": (junk / "model.safetensors", out, "not a safetensors checkpoint"),
        "unwritable output": (run, blocker / "m.onnx", "cannot write here"),
        "wrong suffix": (run, tmp_path / "out" / "m.keras", "must be named"),
        "output is a directory": (run, tmp_path / "dir.onnx", "is a directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing run",
        "run without checkpoint",
        "not a checkpoint",
        "checkpoint file directly",
        "unwritable output",
        "wrong suffix",
        "output is a directory",
    ],
)
def test_cli_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    (tmp_path / "dir.onnx").mkdir()
    run, out, message = _bad_cases(tmp_path)[case]
    before = {p for p in tmp_path.rglob("*")}
    assert cli.main(["export", "--model", str(run), "--format", "onnx", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    # one line for the error; a progress line may stand before it when the failure comes at write time
    assert err.splitlines()[-1].startswith("agegender: error: ") and message in err.splitlines()[-1], err
    assert "Traceback" not in err and len(err.splitlines()) <= 2
    assert {p for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("bias", [20.0, -20.0])
def test_report_predict_and_onnx_clamp_ages_alike(tmp_path: Path, bias: float) -> None:
    """A regression head pushed far outside its trained range: the evaluation report's per-face predictions,
    predict on the checkpoint and predict on the ONNX export all give the range's end, as decode() does."""
    from agegender.data.synthetic import make_utkface_folder
    from agegender.infer.predict import Predictor
    from agegender.rundir import ReportDir
    from agegender.train.evaluate import evaluate_model
    from agegender.train.report import Predictions

    run = make_run(tmp_path, "regression")
    net, meta = load_checkpoint(run / "model.safetensors")
    with torch.no_grad():
        net.age.bias.fill_(bias)  # type: ignore[union-attr]
    save_checkpoint(run / "model.safetensors", net, meta)
    exporters.export(run, "onnx", tmp_path / "m.onnx")
    photos = make_utkface_folder(tmp_path / "utk", n=6, seed=2)
    report = ReportDir(tmp_path / "eval")
    evaluate_model(
        run / "model.safetensors", data=str(photos), subset="all", out=str(report.path), precision="fp32", progress=False
    )
    reported = Predictions.load_csv(report.predictions)
    end = meta.config.age_max if bias > 0 else meta.config.age_min
    assert reported.age_pred is not None and reported.age_pred.tolist() == [end] * 6
    for model in (run, tmp_path / "m.onnx"):
        predictor = Predictor.from_path(model, no_detect=True, precision="fp32")
        faces = [predictor.predict(p)[0] for p in reported.paths]
        assert [f.age for f in faces] == [end] * 6, model
        np.testing.assert_allclose([f.p_male for f in faces], reported.p_male, atol=1e-4, err_msg=str(model))


def test_onnx_metadata_reader_rejects_other_files(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"hello")
    with pytest.raises(AgeGenderError, match="bad.onnx"):
        load_backend(bad)
    with pytest.raises(AgeGenderError, match="missing.onnx: no trained model here"):
        load_backend(tmp_path / "missing.onnx")
    # A valid graph that agegender did not export.
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("p_male", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["p_male"])], "plain", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "plain.onnx"))
    with pytest.raises(AgeGenderError, match="plain.onnx: ONNX model without agegender metadata"):
        load_backend(tmp_path / "plain.onnx")


@pytest.mark.slow
def test_real_faces_onnx_parity(tmp_path: Path, shared_faces: Path) -> None:
    from PIL import Image

    size = 64
    photos = sorted((shared_faces / "wiki" / "test").rglob("*.jpg"))[:8]
    assert len(photos) == 8
    rgb = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in photos])
    x = torch.from_numpy(VGG_FACE_PREPROCESS.resized(size).normalize_numpy(rgb))
    run = make_run(tmp_path, "dex", block_bn=True, image_size=size)
    result = exporters.export(run, "onnx", tmp_path / "faces.onnx", verify_inputs=x)
    assert_result_parity(result, run, 1e-4, x)
    assert result["diffs"]["p_male"] <= 1e-4 and result["diffs"]["age_probs"] <= 1e-4
