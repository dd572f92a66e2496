"""The one-command runs: `reproduce` (real weights and data) and `demo` (generated weights and data)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AgeGenderError
from .rundir import RunDir

if TYPE_CHECKING:
    from .train.config import TrainConfig

log = logging.getLogger(__name__)


def _convert_once(src: Path, out: Path) -> Path:
    from .weights.convert import convert_weights

    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        log.info("using converted weights %s", out)
        return out
    log.info("converting %s -> %s", src, out)
    convert_weights(src, out)
    return out


def _export_all(run: RunDir, dest: Path) -> dict[str, Any]:
    """Export to every format whose packages are installed; say which were skipped."""
    import importlib.util

    from .infer.exporters import export

    results: dict[str, Any] = {}
    for fmt, name, needs in (
        ("onnx", "model.onnx", "onnxruntime"),
        ("keras", "model.keras", "keras"),
        ("torch", "model.pt2", "torch"),
    ):
        if importlib.util.find_spec(needs) is None:
            log.warning("skipping the %s export: %s is not installed (pip install 'agegender[export]')", fmt, needs)
            continue
        results[fmt] = export(run.checkpoint, fmt, dest / name)
    return results


def reproduce(cfg: TrainConfig, work: Path, force: bool = False) -> Path:
    """Fetch what ``cfg`` does not name (data, weights), convert, train, evaluate, then export every format.

    The run goes to ``work/run`` (whatever ``cfg.out`` says), the exports to ``work/export``. ``cfg.data`` empty
    means agegender_cleaned from `agegender fetch data`; ``cfg.weights`` None means the backbone's pretrained
    file where the zoo finds it, else its download (VGG-Face's, from `agegender fetch weights`). A published
    weights file is converted once into ``work``.
    """
    from .backbones import backbone
    from .files import refuse_overwrite
    from .train.loop import fit
    from .weights.fetch import default_cache_dir, fetch
    from .weights.locate import finds_itself
    from .weights.pretrained import pretrained_entry
    from .weights.zoo import AGEGENDER_CLEANED

    run = RunDir(work / "run")
    refuse_overwrite(run.path, run.markers, force)  # before any download
    cache = default_cache_dir()
    spec = backbone(cfg.backbone)
    entry = pretrained_entry(spec)
    converted = work / f"{spec.name.replace('-', '_')}.safetensors"
    data: str | tuple[str, ...] = cfg.data if cfg.data else str(fetch(AGEGENDER_CLEANED, cache))
    weights: Path | None = None
    if cfg.weights:
        weights = Path(cfg.weights)
        if weights.suffix != ".safetensors":
            weights = _convert_once(weights, converted)
    elif cfg.init != "scratch" and entry.urls and not finds_itself(entry):
        extracted = fetch(entry, cache)
        published = Path(entry.extracted).name
        found = next(extracted.rglob(published), None)
        if found is None:
            raise AgeGenderError(f"{extracted}: {published} not found in the extracted weights archive")
        weights = _convert_once(found, converted)
    fit(replace(cfg, data=data, weights=str(weights) if weights else None, out=str(run.path)), force=force)
    exports = _export_all(run, work / "export")
    for fmt, r in exports.items():
        log.info("exported %s: %s (max abs diff %.2e)", fmt, r["path"], r["max_abs_diff"])
    return run.report.md


def demo(work: Path, seed: int = 0, force: bool = False) -> Path:
    """The whole pipeline on generated data and weights, in about two minutes. Its numbers mean nothing."""
    from .backbones.vgg_face import VGG_FACE
    from .data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face
    from .files import refuse_overwrite
    from .train.config import TrainConfig
    from .train.loop import fit

    run = RunDir(work / "run")
    refuse_overwrite(run.path, run.markers, force)
    t0 = time.perf_counter()
    data = work / "data"
    if not (data / "combined").is_dir():
        make_agegender_tree(data, per_folder=3, seed=seed)
    weights = work / "vgg_face_synthetic.safetensors"
    save_vgg_face(weights, make_vgg_face_state(seed=seed))
    cfg = TrainConfig.from_preset(
        "default",
        data=str(data),
        out=str(run.path),
        backbone=VGG_FACE.name,
        weights=str(weights),
        seed=seed,
        epochs=8,
        batch_size=64,
        hidden=(512, 512),
    )
    fit(cfg, force=force)
    exports = _export_all(run, work / "export")
    if "onnx" in exports:
        from .infer.predict import Predictor

        crops = sorted((Path(data) / "combined" / "valid").rglob("*.jpg"))[:8]
        predictor = Predictor.from_path(exports["onnx"]["path"], no_detect=True)
        for path in crops:
            face = predictor.predict(path)[0]
            log.info("%s: %s p_male=%.2f age=%.1f", path.name, face.gender, face.p_male, face.age or float("nan"))
    log.info("demo finished in %.0fs; these numbers come from generated data and mean nothing", time.perf_counter() - t0)
    return run.report.md
