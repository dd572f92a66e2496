"""ONNX models that would read other files or run for ever, generated here: a model file never reads another file
(external data is refused before onnxruntime opens a session), and one session call has a time limit, past which
its batch's images get an error record and the run goes on."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.errors import AgeGenderError
from agegender.infer.predict import Predictor
from agegender.model import runtime
from agegender.model.config import ModelConfig
from agegender.model.meta import CheckpointMeta
from agegender.model.onnx_file import check_self_contained

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

SIZE = 32
# Turns of the slow model's Loop: about 15 s a call at a few microseconds a turn. Finite, so that a broken time
# limit fails the test instead of hanging it.
SLOW_TRIPS = 5_000_000


def _save(
    path: Path, nodes: list[Any], initializers: Sequence[Any] = (), functions: Sequence[Any] = (), sparse: Sequence[Any] = ()
) -> Path:
    """A graph ending in p_male = sigmoid(mean of the input + ``z``), ``z`` made by ``nodes``, with the metadata and
    the input and output the contract asks for."""
    nodes = [
        *nodes,
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Add", ["mean", "z"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["p_male"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("p_male", TensorProto.FLOAT, ["batch"])],
        list(initializers),
        sparse_initializer=list(sparse),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)], functions=list(functions)
    )
    model.ir_version = 8
    meta = CheckpointMeta(
        ModelConfig(widths=(8, 8, 8, 8, 8), image_size=SIZE, hidden=(16,), dropout=(0.0,), age_head="none"),
        VGG_FACE_PREPROCESS.resized(SIZE),
    )
    helper.set_model_props(model, {"agegender": meta.to_json()})
    onnx.save(model, str(path))
    return path


def _zero(name: str = "z") -> Any:
    return helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])


def _external(name: str, location: str) -> Any:
    """A float tensor whose 4 bytes are to be read from ``location``."""
    t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _loop(trips: int, body_tensor: Any) -> Any:
    """``z`` = 0 * (1 added ``trips`` times): a Loop whose body holds ``body_tensor`` as its constant one."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["x", "one"], ["x_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]),
        ],
        [body_tensor],
    )
    return [
        helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [trips])),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("Constant", [], ["x0"], value=_zero("x00")),
        helper.make_node("Loop", ["trips", "go", "x0"], ["xf"], body=body),
        helper.make_node("Constant", [], ["nought"], value=_zero("n")),
        helper.make_node("Mul", ["xf", "nought"], ["z"]),
    ]


def _images(tmp_path: Path, n: int = 3) -> list[str]:
    paths = []
    for i in range(n):
        Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(tmp_path / f"p{i}.png")
        paths.append(str(tmp_path / f"p{i}.png"))
    return paths


# -- external data -------------------------------------------------------------------------------------------
def _model_with_external(tmp_path: Path, where: str, location: str) -> Path:
    path = tmp_path / f"{where.replace(' ', '_')}.onnx"
    ext = _external("one" if where == "loop body" else "z", location)
    if where == "initializer":
        return _save(path, [], [ext])
    if where == "constant node":
        return _save(path, [helper.make_node("Constant", [], ["z"], value=ext)])
    if where == "loop body":
        return _save(path, _loop(1, ext))
    if where == "function":
        ext.name = "k"
        fn = helper.make_function(
            "local",
            "Zero",
            ["a"],
            ["b"],
            [helper.make_node("Constant", [], ["k"], value=ext), helper.make_node("Mul", ["a", "k"], ["b"])],
            [helper.make_opsetid("", 13)],
        )
        return _save(path, [helper.make_node("Zero", ["w"], ["z"], domain="local")], [_zero("w")], functions=[fn])
    if where == "sparse initializer":
        values = _external("z_values", location)
        indices = helper.make_tensor("z_indices", TensorProto.INT64, [1], [0])
        return _save(path, [], sparse=[helper.make_sparse_tensor(values, indices, [1])])
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["initializer", "constant node", "loop body", "function", "sparse initializer"])
def test_onnx_with_external_data_is_refused_before_a_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00\x00\x80\x3f")  # 1.0f: a model that read it would run
    model = _model_with_external(tmp_path, where, str(secret))
    import onnxruntime

    def never(*_: object, **__: object) -> None:
        raise AssertionError("a session was created for a model with external data")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(AgeGenderError) as e:
        Predictor.from_path(model, no_detect=True)
    assert "keeps 1 tensor(s) in external data files; refused" in str(e.value) and str(model) in str(e.value)


def test_the_external_data_check_reads_every_tensor_position(tmp_path: Path) -> None:
    """The same models without the external tensor pass the check and run: it refuses what it should only."""
    inline = [
        _save(tmp_path / "a.onnx", [], [_zero()]),
        _save(tmp_path / "b.onnx", [helper.make_node("Constant", [], ["z"], value=_zero())]),
        _save(tmp_path / "c.onnx", _loop(3, _zero("one"))),
    ]
    for model in inline:
        check_self_contained(model)
        results = list(Predictor.from_path(model, no_detect=True).predict_many(_images(tmp_path, 2)))
        assert [r.error for r in results] == [None, None]
    bundled = Path(runtime.__file__).parents[1] / "bundled"
    for model in sorted(bundled.glob("*.onnx")):
        check_self_contained(model)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"\x0a\xff\xff\xff\xff\x0f", "malformed protobuf"), (b"\x0b\x00", "malformed protobuf")],
)
def test_a_file_that_is_not_a_protobuf_is_one_line(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(AgeGenderError, match=rf"bad.onnx: not a loadable ONNX model \({reason}\)"):
        check_self_contained(path)


# -- a time limit on one call ----------------------------------------------------------------------------------
def test_a_call_past_its_time_limit_is_stopped_and_is_an_error_for_its_batch(tmp_path: Path) -> None:
    slow = _save(tmp_path / "slow.onnx", _loop(SLOW_TRIPS, _zero("one")))
    predictor = Predictor.from_path(slow, no_detect=True)
    assert isinstance(predictor.backend, runtime.OnnxBackend)
    predictor.backend.call_timeout = 0.3
    start = time.perf_counter()
    results = list(predictor.predict_many(_images(tmp_path), batch_size=2))
    took = time.perf_counter() - start
    assert [Path(r.path).name for r in results] == ["p0.png", "p1.png", "p2.png"]
    for r in results:
        assert r.faces == [] and r.error and "took longer than 0.3 s on one batch" in r.error and r.path in r.error
    assert took < 5, took  # two stopped batches, never retried image by image
    with pytest.raises(runtime.ModelCallTimeout, match="slow.onnx: the model took longer than 0.3 s"):
        predictor.predict(_images(tmp_path, 1)[0])


def test_predict_command_with_a_slow_model_gives_error_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runtime, "CALL_TIMEOUT_S", 0.2)
    slow = _save(tmp_path / "slow.onnx", _loop(SLOW_TRIPS, _zero("one")))
    rc = main(["predict", *_images(tmp_path), "--model", str(slow), "--no-detect", "-o", str(tmp_path / "o.jsonl")])
    err = capfd.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rc == 1 and len(records) == 3 and all("took longer than 0.2 s" in r["error"] for r in records), err  # 1: all failed
    assert "Traceback" not in err and "onnxruntime" not in err, err  # onnxruntime's own log stays quiet


def test_a_detector_model_with_external_data_is_refused(tmp_path: Path) -> None:
    from agegender.faces.detect import RetinaFace

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00\x00\x80\x3f")
    model = _model_with_external(tmp_path, "initializer", str(secret))
    with pytest.raises(AgeGenderError, match="keeps 1 tensor"):
        RetinaFace(model.read_bytes()).detect(np.zeros((64, 64, 3), np.uint8))
