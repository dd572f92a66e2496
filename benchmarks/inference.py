"""Figure 4 (inference backends on normalised tensors) and figure 5, our side (`predict` end to end)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .measure import autocast, median, set_memory_format

log = logging.getLogger(__name__)

Runner = Callable[[Any], Any]  # normalised (N, 3, S, S) float32 numpy -> p_male numpy


def photo_batch(paths: Sequence[str], pre: Any, size: int) -> tuple[Any, list[str]]:
    """Normalised photos and the paths that decoded."""
    from agegender.data.batches import decode_batch

    images, ok = decode_batch(paths, size)
    return pre.normalize_numpy(images[ok]), [p for p, good in zip(paths, ok) if good]


def quantize_int8(fp32_onnx: Path, int8_onnx: Path, calib: Any) -> None:
    """Static QDQ with per-channel int8 weights, calibrated on ``calib``.

    Dynamic quantisation turns convs into ConvInteger, which onnxruntime's CPU provider runs far slower than
    fp32. Percentile calibration ignores activation outliers: gender agreement with fp32 0.965 -> 0.984 on 256
    LFW photos (MinMax and Entropy: 0.965).
    """
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from agegender.infer.export import INPUT_NAME

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calib, max(1, len(calib) // 8)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(
        str(fp32_onnx),
        str(int8_onnx),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
    )


def _backends(net: Any, checkpoint: Path, device: str, fp32_onnx: Path, int8_onnx: Path) -> dict[str, Runner]:
    """Every backend of figure 4, each as a function from normalised input to p_male."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from agegender.infer.export import INPUT_NAME, InferenceModel
    from agegender.model.runtime import TorchBackend

    model = InferenceModel(net.to(device))
    # Autocast re-casts every fp32 weight on every call; predict's backend keeps a bf16 copy of the trunk.
    predict_backend = TorchBackend(checkpoint, device, "bf16")

    def torch_runner(bf16: bool, channels_last: bool) -> Runner:
        def run(x: np.ndarray) -> np.ndarray:
            set_memory_format(model, channels_last)
            with torch.no_grad(), autocast(device, bf16):
                p = model(torch.from_numpy(x).to(device))[0]
            return p.float().cpu().numpy()

        return run

    def bf16_trunk(x: np.ndarray) -> np.ndarray:
        return predict_backend.run_normalized(torch.from_numpy(x)).p_male

    def ort_runner(path: Path) -> Runner:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(["p_male"], {INPUT_NAME: x})[0]

    return {
        "PyTorch fp32": torch_runner(False, False),
        "PyTorch bf16 autocast": torch_runner(True, False),
        "PyTorch bf16 autocast, channels_last": torch_runner(True, True),
        "PyTorch bf16 trunk weights, channels_last, fp32 head (predict --precision bf16)": bf16_trunk,
        "ONNX Runtime fp32 (CPU)": ort_runner(fp32_onnx),
        "ONNX Runtime int8 static QDQ (CPU)": ort_runner(int8_onnx),
    }


def _backend_row(run: Runner, x32: Any, x_eval: Any, reference: Any, male: Any, reps: int) -> dict[str, Any]:
    """Latency and throughput at batch 1 and 32 (one untimed call first), then agreement with fp32."""
    import numpy as np

    row: dict[str, Any] = {}
    for batch in (1, 32):
        x = x32[:batch]
        run(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        row[f"batch{batch}_latency_ms"] = 1000 * median(times)
        row[f"batch{batch}_images_per_second"] = batch * len(times) / sum(times)
    p = run(x_eval)
    row["agreement_vs_fp32"] = float(np.mean((p >= 0.5) == (reference >= 0.5)))
    row["max_abs_dp_vs_fp32"] = float(np.max(np.abs(p - reference)))
    if (male >= 0).any():
        row["accuracy"] = float(np.mean((p >= 0.5)[male >= 0] == male[male >= 0]))
    return row


def phase_inference(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 4: latency and throughput at batch 1 and 32 for PyTorch fp32/bf16, ONNX Runtime fp32 and int8."""
    import numpy as np

    from agegender.infer.export import export_onnx
    from agegender.model.checkpoint import load_checkpoint

    s, work = ctx["sizes"], Path(ctx["work"])
    for noisy in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs every rewrite pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    net, meta = load_checkpoint(ctx["checkpoint"])
    size = meta.config.image_size
    photos = ctx["photos"]
    calib, _ = photo_batch(photos[1::2][: s["quant_images"]], meta.preprocess, size)
    x_eval, eval_paths = photo_batch(photos[0::2][: s["quant_images"]], meta.preprocess, size)
    # Accuracy against the photos' own gender labels, where they have them.
    male = np.array([ctx["photo_genders"].get(p, -1) for p in eval_paths])
    fp32_onnx, int8_onnx = work / "bench-fp32.onnx", work / "bench-int8.onnx"
    export_onnx(net, meta, fp32_onnx)
    quantize_int8(fp32_onnx, int8_onnx, calib)

    backends = _backends(net, Path(ctx["checkpoint"]), ctx["device"], fp32_onnx, int8_onnx)
    reference = backends["PyTorch fp32"](x_eval)
    x32 = np.resize(x_eval, (32, *x_eval.shape[1:]))
    rows = {}
    for name, run in backends.items():
        rows[name] = _backend_row(run, x32, x_eval, reference, male, s["infer_reps"])
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in rows[name].items()))
    return {
        "backends": rows,
        "eval_images": len(x_eval),
        "labelled_images": int((male >= 0).sum()),
        "calibration_images": len(calib),
        "onnx_mb": {"fp32": fp32_onnx.stat().st_size / 1e6, "int8": int8_onnx.stat().st_size / 1e6},
        "p_male_range": [float(reference.min()), float(reference.max())],
    }


def _predict_label(model: Path, backend_precision: str, precision: str, detector: str, min_face: int, default_px: int) -> str:
    label = (
        f"checkpoint, PyTorch {backend_precision} (--precision {precision}{', the default' if precision == 'auto' else ''})"
        if model.suffix == ".safetensors"
        else f"{'ONNX int8' if 'int8' in model.name else 'ONNX fp32'} export"
    )
    return label + f", {detector}, --min-face {min_face}{' (the default)' if min_face == default_px else ''}"


def _predict_row(predictor: Any, paths: Sequence[str]) -> dict[str, Any]:
    """`Predictor.predict_many` over ``paths`` at batch 32, after a 4-image warm-up."""
    list(predictor.predict_many(paths[:4], batch_size=32))  # warm-up
    start = time.perf_counter()
    results = list(predictor.predict_many(paths, batch_size=32))
    seconds = time.perf_counter() - start
    return {
        "images": len(results),
        "seconds": seconds,
        "images_per_second": len(results) / seconds,
        "faces": sum(len(r.faces) for r in results),
        "errors": sum(r.error is not None for r in results),
    }


def phase_predict(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 5, our side: `Predictor.predict_many` (decode + detect + crop + classify) over the photo subset,
    with the checkpoint and with figure 4's ONNX exports; plus decode + detect + crop alone, to split the time."""
    from agegender.faces.detect import MIN_FACE_PX, default_detector
    from agegender.images import load_image
    from agegender.infer.predict import Predictor, share_cores_for_batches

    paths, work = ctx["predict_paths"], Path(ctx["work"])
    # (model, --precision, --min-face): the first is what `agegender predict --model model.safetensors` runs;
    # the last searches only faces the peer's detector can find (dlib's HOG window is 80 px).
    ckpt, default_px = Path(ctx["checkpoint"]), MIN_FACE_PX
    variants = [
        (ckpt, "auto", default_px, "auto"),
        (ckpt, "fp32", default_px, "auto"),
        (work / "bench-fp32.onnx", "auto", default_px, "auto"),
        (work / "bench-int8.onnx", "auto", default_px, "auto"),
        (ckpt, "auto", 80, "auto"),
        (ckpt, "auto", default_px, "haar"),
    ]
    rows: dict[str, Any] = {}
    for model, precision, min_face, detector in variants:
        if not model.is_file():
            rows[model.name] = {"error": f"{model.name} missing (figure 4 writes it)"}
            continue
        # The default detector (RetinaFace when installed), as `agegender predict` runs; one Haar row beside it.
        found = default_detector(min_face_px=min_face, kind=detector)
        predictor = Predictor.from_path(model, found, precision=precision)
        share_cores_for_batches(predictor)  # as `agegender predict` does
        name = getattr(found, "name", "custom")
        shown = f"{name} (the default detector)" if detector == "auto" else f"--detector {detector}"
        label = _predict_label(model, predictor.backend.precision, precision, shown, min_face, default_px)
        rows[label] = _predict_row(predictor, paths)
        log.info("predict with %s: %.1f img/s", label, rows[label]["images_per_second"])
    # The per-image cost of decode + detect + crop on one core (OpenCV's pool is down to one thread by now).
    predictor, sample = Predictor.from_path(ckpt, default_detector()), paths[:100]
    start = time.perf_counter()
    for p in sample:
        predictor.crops(load_image(p))
    detect_ms = 1000 * (time.perf_counter() - start) / len(sample)
    headline = next(iter(rows.values()))
    return {
        **headline,
        "models": rows,
        "detect_crop_ms": detect_ms,
        "workers": predictor.workers,
        "detector": getattr(predictor.detector, "name", "custom"),
    }
