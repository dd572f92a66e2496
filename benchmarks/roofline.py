"""The bundled model's trunk against the machine's own matmul limit (issue: speed near the CPU's limit).

    python -m benchmarks.roofline [--model agegender-dlib-v1.onnx] [--reps 7] [--out roofline.json] [--md roofline.md]

- FLOPs per face: every Conv and Gemm/MatMul of the ONNX graph, counted from its weight shape and the output size
  that ONNX shape inference gives at batch 1 (2 FLOPs per multiply-add, as matmul rates are counted);
- the limit: the best median rate of one large matmul on one thread, in float32 (ONNX Runtime ``MatMul``), int8
  (ONNX Runtime ``MatMulInteger``: the kernel a QDQ model's convs run on) and bfloat16 (``torch.mm``, where torch
  is installed and the CPU has bf16 instructions);
- the model: faces per second of the ONNX session on one thread at batch 32, interleaved with the matmuls.
The fraction is the trunk's achieved FLOP/s over the limit of the precision it runs in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .interleave import interleave
from .machine import _cpu_name, loadavg

log = logging.getLogger(__name__)

GEMM = (512, 2304, 256)  # (M, K, N): a 3x3 conv of dlib's widest stage as im2col turns it into a matmul
BATCH = 32


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _weight_shape(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> list[int] | None:
    """A weight's shape, through the DequantizeLinear that a QDQ model puts between an int8 initializer and its op."""
    if name in inits:
        return list(inits[name].dims)
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        return _weight_shape(node.input[0], inits, producers)
    return None


def flops_per_face(path: Path) -> dict[str, float]:
    """FLOPs of one face through the graph: convs (the trunk) and matmuls (the heads), at batch 1."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.dim_value = 1  # a fixed batch, so inference gives every output a concrete size
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.value_info, *model.graph.output)}
    inits = _initializers(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    conv = gemm = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        weight = _weight_shape(node.input[1], inits, producers)
        out = shapes.get(node.output[0])
        if weight is None or not out or not all(out):
            continue
        if node.op_type == "Conv":  # weight (O, I/groups, kh, kw): each output element sums I/groups*kh*kw products
            conv += 2.0 * float(np.prod(out)) * float(np.prod(weight[1:]))
        else:  # each output element sums K products; K is the weight's first axis, or its last under transB
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            gemm += 2.0 * float(np.prod(out)) * float(weight[-1] if trans_b or len(weight) == 1 else weight[-2])
    return {"trunk_flops": conv, "head_flops": gemm, "total_flops": conv + gemm}


def _session(model_bytes: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _matmul_model(kind: str, m: int, k: int, n: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """One matmul node with a constant right-hand side, as an ONNX model, and its input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a: np.ndarray
    if kind == "fp32":
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:  # uint8 activations times int8 weights: what ORT's quantised convs run on
        a = rng.integers(0, 255, (m, k), dtype=np.uint8)
        b = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph(
        [node],
        "matmul",
        [helper.make_tensor_value_info("A", a_type, [m, k])],
        [helper.make_tensor_value_info("Y", y_type, [m, n])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString(), {"A": a}


def _rate(call: Callable[[], Any], work: float, seconds: float) -> float:
    """``work`` units per second of ``call``: as many calls as fill ``seconds`` (at least three), after one."""
    call()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return work * calls / (time.perf_counter() - start)


def _session_rate(sess: Any, feed: dict[str, np.ndarray], work: float, seconds: float) -> Callable[[], float]:
    return lambda: _rate(lambda: sess.run(None, feed), work, seconds)


def measures(model: Path, seconds: float) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
    """The interleaved measures (FLOP/s of each matmul, faces/s of the model) and what they were measured on."""
    m, k, n = GEMM
    flops = 2.0 * m * k * n
    out: dict[str, Callable[[], float]] = {}
    for kind in ("fp32", "int8"):
        body, feed = _matmul_model(kind, m, k, n)
        sess = _session(body)
        out[f"matmul_{kind}"] = _session_rate(sess, feed, flops, seconds)
    notes: dict[str, Any] = {"gemm": {"m": m, "k": k, "n": n}}
    flags = _cpu_flags()
    notes["bf16_hardware"] = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if notes["bf16_hardware"]:
        try:
            import torch
        except ImportError:
            notes["bf16"] = "torch is not installed: bfloat16 not measured"
        else:
            torch.set_num_threads(1)
            a = torch.randn(m, k, dtype=torch.bfloat16)
            b = torch.randn(k, n, dtype=torch.bfloat16)
            out["matmul_bf16"] = lambda: _rate(lambda: torch.mm(a, b), flops, seconds)
    sess = _session(model.read_bytes())
    name = sess.get_inputs()[0].name
    chips = np.random.default_rng(1).uniform(-1, 1, (BATCH, 3, 150, 150)).astype(np.float32)
    out["model"] = _session_rate(sess, {name: chips}, BATCH, seconds)
    return out, notes


def run(model: Path, reps: int, seconds: float) -> dict[str, Any]:
    from agegender.process import ThreadScope

    counted = flops_per_face(model)
    with ThreadScope():  # torch's pool goes to one thread for the bf16 matmul, and back afterwards
        fns, notes = measures(model, seconds)
        spreads = interleave(fns, reps, label="roofline")
    faces = spreads.pop("model")
    achieved = faces["median"] * counted["total_flops"]
    result: dict[str, Any] = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical cores, load {loadavg()}",
        "model": model.name,
        "batch": BATCH,
        "threads": 1,
        **counted,
        **notes,
        "faces_per_second": faces,
        "ms_per_face": 1000.0 / faces["median"],
        "achieved_flops_per_second": achieved,
        "matmul": spreads,
    }
    result["fraction_of"] = {kind.removeprefix("matmul_"): achieved / s["median"] for kind, s in spreads.items()}
    return result


def markdown(r: dict[str, Any]) -> str:
    g = r["gemm"]
    lines = [
        "## 10. The bundled model against the machine's matmul limit",
        "",
        f"Measured with `python -m benchmarks.roofline` on {r['machine']}; one thread, medians of interleaved runs (min-max).",
        "",
        f"- FLOPs per face, counted from the graph (2 per multiply-add): trunk convs "
        f"{r['trunk_flops'] / 1e9:.2f} GFLOP, heads {r['head_flops'] / 1e6:.1f} MFLOP.",
        f"- `{r['model']}` at batch {r['batch']}: {r['faces_per_second']['median']:.0f} faces/s "
        f"({r['faces_per_second']['min']:.0f}-{r['faces_per_second']['max']:.0f}), {r['ms_per_face']:.2f} ms "
        f"per face, so {r['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s.",
        "",
        f"| one-thread matmul ({g['m']}x{g['k']} by {g['k']}x{g['n']}) | GFLOP/s (GOP/s for int8) | min-max "
        f"| the model's rate as a fraction |",
        "|---|---|---|---|",
    ]
    for kind, s in r["matmul"].items():
        name = kind.removeprefix("matmul_")
        lines.append(
            f"| {name} | {s['median'] / 1e9:.1f} | {s['min'] / 1e9:.1f}-{s['max'] / 1e9:.1f} | {r['fraction_of'][name]:.2f} |"
        )
    if "bf16" in r:
        lines.append(f"\n{r['bf16']}.")
    lines += [
        "",
        "The shipped model runs its convs in int8 (QDQ, the first conv in float), so the int8 row is its "
        "limit; the float32 and bfloat16 rows say what the same work would reach in those precisions.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from agegender.weights.zoo import bundled_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an ONNX export (default: the bundled model)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--out", type=Path, help="the figures as JSON")
    ap.add_argument("--md", type=Path, help="also write the BENCHMARKS.md section here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(a.model or bundled_model(), a.reps, a.seconds)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2, default=str))
    if a.md:
        a.md.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
