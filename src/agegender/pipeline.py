"""The one-command runs: `reproduce` (real weights and data) and `demo` (generated weights and data)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .errors import AgeGenderError

log = logging.getLogger(__name__)


def _convert_once(src: Path, out: Path) -> Path:
    from .convert import convert_weights

    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        log.info("using converted weights %s", out)
        return out
    log.info("converting %s -> %s", src, out)
    convert_weights(src, out)
    return out


def _export_all(run: Path, dest: Path) -> dict[str, Any]:
    """Export to every format whose packages are installed; say which were skipped."""
    import importlib.util

    from .export import export

    results: dict[str, Any] = {}
    for fmt, name, needs in (("onnx", "model.onnx", "onnxruntime"), ("keras", "model.keras", "keras"),
                             ("torch", "model.pt2", "torch")):
        if importlib.util.find_spec(needs) is None:
            log.warning("skipping the %s export: %s is not installed (pip install 'agegender[export]')", fmt, needs)
            continue
        results[fmt] = export(run, fmt, dest / name)
    return results


def reproduce(a: argparse.Namespace) -> Path:
    """Fetch (unless paths are given), convert, train with the default preset, evaluate, export."""
    from .fetch import default_cache_dir, fetch
    from .train import TrainConfig, fit
    from .weights import AGEGENDER_CLEANED, VGG_FACE

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir()
    data = Path(a.data) if a.data else fetch(AGEGENDER_CLEANED, cache)
    if a.weights:
        weights = Path(a.weights)
        if weights.suffix != ".safetensors":
            weights = _convert_once(weights, work / "vgg_face.safetensors")
    elif a.init == "scratch":
        weights = None
    else:
        extracted = fetch(VGG_FACE, cache)
        t7 = next(extracted.rglob("VGG_FACE.t7"), None)
        if t7 is None:
            raise AgeGenderError(f"{extracted}: VGG_FACE.t7 not found in the extracted weights archive")
        weights = _convert_once(t7, work / "vgg_face.safetensors")
    a.data, a.weights, a.out = str(data), (str(weights) if weights else None), str(work / "run")
    a.no_cache, a.resume = getattr(a, "no_cache", False), False
    run = fit(TrainConfig.from_args(a))
    exports = _export_all(run.out, work / "export")
    for fmt, r in exports.items():
        log.info("exported %s: %s (max abs diff %.2e)", fmt, r["path"], r["max_abs_diff"])
    return run.report_md


def demo(a: argparse.Namespace) -> Path:
    """The whole pipeline on generated data and weights, in about two minutes. Its numbers mean nothing."""
    from .synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face
    from .train import TrainConfig, fit

    t0 = time.perf_counter()
    work = Path(a.workdir)
    data = work / "data"
    if not (data / "combined").is_dir():
        make_agegender_tree(data, per_folder=3, seed=a.seed)
    weights = work / "vgg_face_synthetic.safetensors"
    save_vgg_face(weights, make_vgg_face_state(seed=a.seed))
    cfg = TrainConfig.from_preset("default", data=str(data), out=str(work / "run"), weights=str(weights),
                                  seed=a.seed, epochs=8, batch_size=64, hidden=(512, 512))
    run = fit(cfg)
    exports = _export_all(run.out, work / "export")
    if "onnx" in exports:
        from .predict import Predictor

        crops = sorted((Path(data) / "combined" / "valid").rglob("*.jpg"))[:8]
        predictor = Predictor.from_path(exports["onnx"]["path"], no_detect=True)
        for path in crops:
            face = predictor.predict(path)[0]
            log.info("%s: %s p_male=%.2f age=%.1f", path.name, face.gender, face.p_male, face.age or float("nan"))
    log.info("demo finished in %.0fs; these numbers come from generated data and mean nothing", time.perf_counter() - t0)
    return run.report_md
