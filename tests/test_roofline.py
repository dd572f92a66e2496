"""The roofline benchmark's arithmetic: FLOPs counted from a graph, through QDQ weights too, and a tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from benchmarks.roofline import flops_per_face, markdown, run  # noqa: E402


def _conv_model(path: Path, quantised: bool) -> Path:
    """input (batch, 3, 10, 10) -> 3x3 conv to 8 channels, padded -> flatten -> Gemm to 2."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, 800)).astype(np.float32), "G"),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape"),
    ]
    nodes = []
    if quantised:
        inits += [
            numpy_helper.from_array(rng.integers(-127, 127, (8, 3, 3, 3), dtype=np.int8), "Wq"),
            numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "zero"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W"))
    nodes += [
        helper.make_node("Conv", ["input", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("quantised", [False, True])
def test_flops_are_counted_from_weight_and_output_shapes(tmp_path: Path, quantised: bool) -> None:
    counted = flops_per_face(_conv_model(tmp_path / "m.onnx", quantised))
    assert counted["trunk_flops"] == 2 * (8 * 10 * 10) * (3 * 3 * 3)  # each output sums 27 products
    assert counted["head_flops"] == 2 * 2 * 800


def test_bundled_model_is_counted_and_measured_against_the_matmul_limit() -> None:
    from agegender.weights.zoo import bundled_model

    r = run(bundled_model(), reps=1, seconds=0.05)
    # dlib's ResNet at 150 px is about half a GFLOP; every conv must have been found through its DequantizeLinear.
    assert 0.3e9 < r["trunk_flops"] < 1e9 and r["head_flops"] > 0
    assert set(r["fraction_of"]) >= {"fp32", "int8"} and all(v > 0 for v in r["fraction_of"].values())
    assert "| int8 |" in markdown(r)
