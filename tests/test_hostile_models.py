"""Hostile model files, generated here: broken metadata, configs that lie about the weights, ONNX graphs that break
the contract or give NaN. Each is refused in one line before anything is built, or, at run time, becomes an
error record for its own image while the others are classified."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.infer.predict import Predictor
from agegender.model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet

SIZE = 64
CONFIG = dict(widths=(8, 8, 8, 8, 8), image_size=SIZE, hidden=(16,), dropout=(0.0,))


def _meta(age_head: str = "none") -> CheckpointMeta:
    return CheckpointMeta(ModelConfig(**CONFIG, age_head=age_head), VGG_FACE_PREPROCESS.resized(SIZE))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    meta = _meta("dex")
    save_checkpoint(path, AgeGenderNet(meta.config).eval(), meta)
    return path


def _with_metadata(src: Path, dest: Path, text: str) -> Path:
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dest), metadata={"agegender": text})
    return dest


def _doc(checkpoint: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        return json.loads(f.metadata()["agegender"])


def _set(doc: dict[str, Any], where: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = where.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target[last] = value
    return doc


# where, value, what the one line says
BROKEN = [
    ("config", [1, 2], "config is list"),
    ("config", None, "config is null"),
    ("config.widths", 8, "config.widths is int 8"),
    ("config.widths", [8, 8, "x", 8, 8], "config.widths is str"),
    ("config.hidden", None, "config.hidden is null"),
    ("config.hidden", [30000], "config.hidden is 30000, outside the sane range"),
    ("config.image_size", "64", "config.image_size is str"),
    ("config.image_size", 64.5, "config.image_size is float"),
    ("config.image_size", 1 << 20, "config.image_size is 1048576, outside"),
    ("config.age_max", 10**9, "config.age_max is 1000000000, outside"),
    ("config.head_bn", 1, "config.head_bn is int 1, expected true or false"),
    ("config.dropout", [float("nan")], "config.dropout is nan, expected a finite number"),
    ("config.backbone", ["vgg-face"], "config.backbone is list"),
    ("config.backbone", "resnet-9000", "unknown backbone"),
    ("config.widths", [8, 8, 8], "widths needs 5 positive stage widths"),
    ("preprocess", "crop", "preprocess is str"),
    ("preprocess.mean_rgb", [1, 2], "mean_rgb needs 3 numbers"),
    ("preprocess.size", None, "preprocess.size is null"),
    ("preprocess.channel_order", "XYZ", "channel_order must be RGB or BGR"),
    ("genders", ["female"], "genders is list"),
    ("genders", {"0": "f"}, "genders is dict"),
    ("extra", [], "extra is list"),
    ("weights_sha256", 5, "weights_sha256 is int"),
]


@pytest.mark.parametrize(("where", "value", "message"), BROKEN, ids=[f"{w}={v!r}"[:40] for w, v, _ in BROKEN])
def test_broken_metadata_is_refused_in_one_line(tmp_path: Path, checkpoint: Path, where: str, value: Any, message: str) -> None:
    bad = _with_metadata(checkpoint, tmp_path / "bad.safetensors", json.dumps(_set(_doc(checkpoint), where, value)))
    with pytest.raises(AgeGenderError) as e:
        load_checkpoint(bad)
    assert message in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "17", '"text"', "[" * 100_000, "{not json"])
def test_metadata_that_is_not_an_object_is_refused(tmp_path: Path, checkpoint: Path, text: str) -> None:
    bad = _with_metadata(checkpoint, tmp_path / "bad.safetensors", text)
    with pytest.raises(AgeGenderError, match="bad.safetensors: "):
        load_checkpoint(bad)


def test_cli_gives_one_line_for_broken_metadata(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _with_metadata(checkpoint, tmp_path / "bad.safetensors", json.dumps(_set(_doc(checkpoint), "config", [])))
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--model", str(bad), "--no-detect"]) == 2
    err = capsys.readouterr().err
    assert err.count("agegender: error:") == 1 and "Traceback" not in err and "config is list" in err


def test_a_wide_head_is_refused_before_anything_is_allocated(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agegender.model.checkpoint as ckpt_module

    # 16000 x 16000 floats: a 1 GB layer, declared by a 100 KB file.
    doc = _set(_set(_doc(checkpoint), "config.hidden", [16000, 16000]), "config.dropout", [0.0, 0.0])
    bad = _with_metadata(checkpoint, tmp_path / "wide.safetensors", json.dumps(doc))
    built: list[str] = []
    real = ckpt_module.AgeGenderNet

    def spy(config: ModelConfig) -> AgeGenderNet:
        built.append(torch.empty(0).device.type)  # the device the network's tensors would land on
        return real(config)

    monkeypatch.setattr(ckpt_module, "AgeGenderNet", spy)
    with pytest.raises(
        AgeGenderError,
        match=r"weights do not match the stored config \(fc.0.weight is \(16, 32\), "
        r"the config needs \(16000, 32\)",
    ):
        load_checkpoint(bad)
    assert built == ["meta"]  # only the shape check's network, on the device that allocates nothing


def test_missing_and_extra_tensors_are_named(tmp_path: Path, checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint))
    state.pop("gender.bias")
    state["planted"] = torch.zeros(2)
    bad = tmp_path / "odd.safetensors"
    save_file(state, str(bad), metadata={"agegender": json.dumps(_doc(checkpoint))})
    with pytest.raises(AgeGenderError, match="gender.bias is missing and 1 more"):
        load_checkpoint(bad)


# -- ONNX models that break the contract -----------------------------------------------------------
def _onnx(
    path: Path,
    *,
    input_name: str = "input",
    size: int = SIZE,
    meta_doc: dict[str, Any] | None = None,
    body: str = "sigmoid",
    p_shape: list[Any] | None = None,
) -> Path:
    """A tiny ONNX graph: P(male) from the input's mean, through ``body``:

    ``sigmoid``: a probability; ``log``: sigmoid(log(mean)), NaN for dark images (a negative mean after the VGG
    mean is subtracted), finite for bright ones; ``raw``: the mean itself, far outside [0, 1].
    """
    import onnx
    from onnx import TensorProto, helper

    keep = int(p_shape is not None and len(p_shape) == 4)  # a (N, 1, 1, 1) P(male), declared as such
    nodes = [helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2, 3], keepdims=keep)]
    last = "mean"
    if body == "log":
        nodes.append(helper.make_node("Log", ["mean"], ["logged"]))
        last = "logged"
    if body in ("sigmoid", "log"):
        nodes.append(helper.make_node("Sigmoid", [last], ["p_male"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["p_male"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("p_male", TensorProto.FLOAT, p_shape or ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    doc = meta_doc if meta_doc is not None else json.loads(_meta().to_json())
    helper.set_model_props(model, {"agegender": json.dumps(doc)})
    onnx.save(model, str(path))
    return path


def _images(tmp_path: Path) -> list[str]:
    paths = []
    for name, value in (("bright1", 250), ("dark", 0), ("bright2", 240)):
        Image.new("RGB", (48, 48), (value,) * 3).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    return paths


def test_a_good_tiny_onnx_runs(tmp_path: Path) -> None:
    predictor = Predictor.from_path(_onnx(tmp_path / "ok.onnx"), no_detect=True)
    results = list(predictor.predict_many(_images(tmp_path)))
    assert [r.error for r in results] == [None] * 3 and all(len(r.faces) == 1 for r in results)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_name": "pixels"}, "inputs are ['pixels'], expected one named 'input'"),
        ({"size": 32}, "has shape ['batch', 3, 32, 32], but its metadata says [batch, 3, 64, 64]"),
        ({"p_shape": ["batch", 1, 1, 1]}, "output p_male is tensor(float) ['batch', 1, 1, 1], expected a float tensor of rank 1"),
    ],
)
def test_onnx_breaking_the_contract_is_refused_at_load(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(AgeGenderError) as e:
        Predictor.from_path(_onnx(tmp_path / "bad.onnx", **options), no_detect=True)
    assert message in str(e.value)


def test_onnx_metadata_lying_about_the_image_size_allocates_nothing(tmp_path: Path) -> None:
    doc = json.loads(_meta().to_json())
    lying = _onnx(tmp_path / "lying.onnx", meta_doc=_set(doc, "config.image_size", 40000))
    assert lying.stat().st_size < 4000
    with pytest.raises(AgeGenderError, match="config.image_size is 40000, outside the sane range"):
        Predictor.from_path(lying, no_detect=True)
    plausible = _onnx(tmp_path / "plausible.onnx", meta_doc=_set(_set(doc, "config.image_size", 1024), "preprocess.size", 1024))
    with pytest.raises(AgeGenderError, match=r"but its metadata says \[batch, 3, 1024, 1024\]"):
        Predictor.from_path(plausible, no_detect=True)


def test_onnx_needs_the_age_output_its_metadata_promises(tmp_path: Path) -> None:
    doc = json.loads(_meta("regression").to_json())
    with pytest.raises(AgeGenderError, match="has no age output"):
        Predictor.from_path(_onnx(tmp_path / "noage.onnx", meta_doc=doc), no_detect=True)


@pytest.mark.parametrize("body", ["log", "raw"])
def test_nan_or_out_of_range_output_is_an_error_for_that_image_only(tmp_path: Path, body: str) -> None:
    predictor = Predictor.from_path(_onnx(tmp_path / "nan.onnx", body=body), no_detect=True)
    paths = _images(tmp_path)
    results = {Path(r.path).stem: r for r in predictor.predict_many(paths, batch_size=8)}
    bad = {"dark"} if body == "log" else {"bright1", "dark", "bright2"}
    for name, r in results.items():
        if name in bad:
            assert r.faces == [] and r.error and "not a finite probability" in r.error and name in r.error
        else:
            assert r.error is None and 0 <= r.faces[0].p_male <= 1
    with pytest.raises(AgeGenderError, match="not a finite probability"):
        predictor.predict(paths[1])  # one image: the error is the call's


def test_predict_command_writes_valid_json_for_nan_faces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _onnx(tmp_path / "nan.onnx", body="log")
    rc = main(["predict", *_images(tmp_path), "--model", str(model), "--no-detect"])
    out = capsys.readouterr().out

    def no_constants(name: str) -> None:
        raise AssertionError(f"JSON holds {name}")

    records = [json.loads(line, parse_constant=no_constants) for line in out.splitlines()]
    assert rc == 0 and len(records) == 3
    assert [bool(r["error"]) for r in records] == [False, True, False]


def test_nan_weights_in_a_checkpoint_give_error_records(tmp_path: Path, checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint))
    state["gender.bias"][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata={"agegender": json.dumps(_doc(checkpoint))})
    results = list(Predictor.from_path(bad, no_detect=True).predict_many(_images(tmp_path)))
    assert len(results) == 3
    assert all(r.faces == [] and r.error and "not a finite probability" in r.error for r in results)
