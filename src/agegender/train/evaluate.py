"""Predictions of a trained model on a split or any dataset, turned into the report."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.records import FaceRecord, scan, scan_all
from ..data.splits import make_splits
from ..errors import AgeGenderError
from ..faces.framing import PhotoFramer, photo_framer
from ..images import Skipped, load_rgb
from ..model.meta import resolve_model
from ..model.runtime import Backend, Decoded, load_backend
from .report import Predictions, build_report, write_report

if TYPE_CHECKING:
    from ..data.batches import Batches
    from ..model.net import AgeGenderNet

log = logging.getLogger(__name__)


def collect_predictions(model: AgeGenderNet, batches: Batches, records: Sequence[FaceRecord], idx: np.ndarray
                        ) -> tuple[list[FaceRecord], Predictions]:
    """Predictions for the readable records among ``idx``, and those records."""
    done, out = predict_batches(model, batches, idx)
    return _predictions([records[i] for i in done], out)


def _predictions(rec: list[FaceRecord], out: Decoded) -> tuple[list[FaceRecord], Predictions]:
    return rec, Predictions(
        gender_true=np.array([r.gender for r in rec], dtype=int),
        p_male=out.p_male,
        age_true=np.array([np.nan if r.age is None else r.age for r in rec], dtype=float),
        age_pred=out.age,
        race=np.array([r.race or "" for r in rec], dtype=object),
        paths=[str(r.path) for r in rec],
    )


def evaluate_split(checkpoint: str | Path, batches: Batches, records: Sequence[FaceRecord], idx: np.ndarray,
                   protocol: dict[str, Any], out_dir: str | Path,
                   history: list[dict[str, float]] | None = None) -> tuple[dict[str, Any], Path]:
    from ..model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint, device=batches.world.device)
    done, pred = collect_predictions(model, batches, records, idx)
    unread = [records[i] for i in idx if batches.ok is not None and not batches.ok[i]]
    return _report(pred, done, unread, protocol, str(checkpoint), meta.extra.get("best_epoch"), out_dir, history)


def _report(pred: Predictions, done: list[FaceRecord], unread: list[FaceRecord], protocol: dict[str, Any],
            model: str, best_epoch: Any, out_dir: str | Path, history: list[dict[str, float]] | None = None
            ) -> tuple[dict[str, Any], Path]:
    if not done:
        raise AgeGenderError(f"{protocol.get('data')}: no readable images in the evaluation split")
    skipped = protocol.get("skipped", {"count": 0, "first": []})
    protocol = {**protocol, "skipped": {"count": int(skipped["count"]) + len(unread),
                                        "first": (list(skipped["first"]) + [f"{r.path}: could not decode"
                                                                            for r in unread])[:10]}}
    report = build_report(pred, {**protocol, "model": model, "best_epoch": best_epoch},
                          sources=np.array([r.source for r in done], dtype=object))
    return report, write_report(report, pred, out_dir, history=history)


SUBSETS = ("train", "val", "test", "all")


def evaluate_model(model: str | os.PathLike[str] | None, data: str | None = None, subset: str | None = None,
                   out: str | None = None, batch_size: int = 64, workers: int = 2, precision: str = "auto",
                   device: str = "cpu") -> Path:
    """`agegender evaluate`: a run's own test split by default, or any dataset with ``data``.

    ``model`` is a run directory, a checkpoint or an ONNX export (None: the bundled model); only a run directory
    knows its own splits. Faces are framed and decoded as ``predict`` frames and decodes them; an ONNX model
    needs no torch.
    """
    if model is None:
        from ..weights.zoo import bundled_model

        model = bundled_model()
    ckpt = resolve_model(model)
    run = ckpt.parent if (ckpt.parent / "config.json").is_file() else None
    if data is None and run is None:
        raise AgeGenderError(f"{model}: a checkpoint outside its run directory needs --data (which images to use)")
    if subset is not None and subset not in SUBSETS:
        raise AgeGenderError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    if batch_size < 1 or workers < 1:
        raise AgeGenderError(f"batch size and workers must be at least 1, got {batch_size} and {workers}")
    stored = _stored_run_config(run) if run is not None and data is None else {}
    backend = load_backend(ckpt, device, precision)
    sources = data or stored.get("data", "")
    dataset = scan_all(sources) if isinstance(sources, list) else scan(sources)
    protocol_name = str(stored.get("split", "identity"))
    subset = subset or ("all" if data is not None else "test")
    if subset == "all":
        chosen, summary, leaked = list(dataset.records), {"all": {"images": len(dataset.records)}}, 0
    else:
        splits = make_splits(dataset, protocol_name, int(stored.get("seed", 0)), limit=int(stored.get("limit", 0)))
        summary, leaked = splits.summary(), splits.leaked_identities()
        chosen = _recorded_split(run, subset, dataset.records) or splits[subset]
    out_dir = Path(out) if out else ckpt.parent / f"eval-{subset}"
    done, decoded, unread = predict_records(backend, chosen, batch_size, workers)
    _, pred = _predictions(done, decoded)
    protocol = {"data": str(dataset.root), "kind": dataset.kind, "split": f"{protocol_name}:{subset}",
                "splits": summary, "leaked_identities": leaked, "skipped": dataset.skipped.to_dict(),
                "precision": backend.precision}
    _, md = _report(pred, done, unread, protocol, str(ckpt), backend.meta.extra.get("best_epoch"), out_dir)
    return md


def predict_records(backend: Backend, records: Sequence[FaceRecord], batch_size: int = 64, workers: int = 2
                    ) -> tuple[list[FaceRecord], Decoded, list[FaceRecord]]:
    """The records whose image decoded, their decoded outputs, and the records that could not be read.

    Each photo is framed as training framed it (the subject's 5-point chip, or the centre square), then run
    through the backend in batches: the same decode as ``predict``.
    """
    pre = backend.meta.preprocess.resized(backend.meta.config.image_size)
    # Full decodes (no JPEG draft, as predict decodes), so the report scores exactly what predict returns.
    frame, size, skipped = photo_framer(pre) or PhotoFramer(pre), pre.size, Skipped()
    done: list[FaceRecord] = []
    unread: list[FaceRecord] = []
    parts: list[Decoded] = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = list(pool.map(lambda r: load_rgb(r.path, size, skipped, frame), chunk))
            ok = [(r, im) for r, im in zip(chunk, images) if im is not None]
            unread += [r for r, im in zip(chunk, images) if im is None]
            if ok:
                done += [r for r, _ in ok]
                parts.append(backend.run(np.stack([im for _, im in ok])))
    return done, Decoded.concat(parts), unread


def _recorded_split(run: Path | None, subset: str, records: Sequence[FaceRecord]) -> list[FaceRecord] | None:
    """The ``subset`` records that training wrote to ``splits.json``, or None for runs without one."""
    path = None if run is None else run / "splits.json"
    if path is None or not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())[subset]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AgeGenderError(f"{path}: unreadable splits ({type(e).__name__})") from None
    by_path = {str(r.path): r for r in records}
    missing = [p for p in recorded if p not in by_path]
    if missing:
        raise AgeGenderError(f"{path}: {len(missing)} {subset} images are no longer in the data (first: {missing[0]})")
    return [by_path[p] for p in recorded]


def _stored_run_config(run: Path) -> dict[str, Any]:
    try:
        stored = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AgeGenderError(f"{run / 'config.json'}: unreadable run config ({e})") from None
    if not isinstance(stored, dict):
        raise AgeGenderError(f"{run / 'config.json'}: not a run config")
    return stored


def predict_batches(model: AgeGenderNet, batches: Batches, idx: np.ndarray) -> tuple[np.ndarray, Decoded]:
    """(indices actually predicted, their decoded outputs), through the same decode as ``predict``."""
    import torch

    from ..model.decode import decode, output_names

    model.eval()
    done, rows = [], []
    # Cached features are small: score them in large batches rather than the training batch size.
    with torch.no_grad():
        for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
            out = model.forward_head(x) if batches.cached else model(x)
            done.append(chunk)
            logits = None if out.age_logits is None else out.age_logits.float()
            rows.append([t.float().cpu().numpy() for t in decode(model.config, out.gender_logit.float(), logits)])
    names = output_names(model.config)
    if not rows:
        return np.zeros(0, dtype=int), Decoded(np.zeros(0))
    return np.concatenate(done).astype(int), Decoded.of(names, [np.concatenate(c) for c in zip(*rows)])
