"""Predictions of a trained model on a split or any dataset, turned into the report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import RUN_CHECKPOINT, load_checkpoint, read_meta
from .data import FaceRecord, make_splits, scan
from .errors import AgeGenderError
from .report import Predictions, build_report, write_report

log = logging.getLogger(__name__)


def collect_predictions(model: Any, batches: Any, records: Sequence[FaceRecord], idx: np.ndarray
                        ) -> tuple[list[FaceRecord], Predictions]:
    """Predictions for the readable records among ``idx``, and those records."""
    from .train import predict_batches

    done, p_male, age = predict_batches(model, batches, idx)
    rec = [records[i] for i in done]
    return rec, Predictions(
        gender_true=np.array([r.gender for r in rec], dtype=int),
        p_male=p_male,
        age_true=np.array([np.nan if r.age is None else r.age for r in rec], dtype=float),
        age_pred=age,
        race=np.array([r.race or "" for r in rec], dtype=object),
        paths=[str(r.path) for r in rec],
    )


def evaluate_split(checkpoint: str | Path, batches: Any, records: Sequence[FaceRecord], idx: np.ndarray,
                   protocol: dict[str, Any], out_dir: str | Path,
                   history: list[dict[str, float]] | None = None) -> tuple[dict[str, Any], Path]:
    model, meta = load_checkpoint(checkpoint, device=batches.world.device)
    done, pred = collect_predictions(model, batches, records, idx)
    if not done:
        raise AgeGenderError(f"{protocol.get('data')}: no readable images in the evaluation split")
    report = build_report(pred, {**protocol, "model": str(checkpoint), "best_epoch": meta.extra.get("best_epoch")},
                          sources=np.array([r.source for r in done], dtype=object))
    return report, write_report(report, pred, out_dir, history=history)


def evaluate_command(run: str | None, model: str | None, data: str | None, split: str | None,
                     out: str | None, batch_size: int = 64, workers: int = 2) -> Path:
    """`agegender evaluate`: a run's own test split by default, or any dataset with --data."""
    from .train import Batches, TrainConfig

    ckpt = Path(run) / RUN_CHECKPOINT if run else Path(model or "")
    if not ckpt.is_file():
        raise AgeGenderError(f"{ckpt}: no trained model here (train one with `agegender train`)")
    if data is None and not run:
        raise AgeGenderError("--model needs --data (which images to evaluate on)")
    stored = json.loads((Path(run) / "config.json").read_text()) if run else {}
    meta = read_meta(ckpt)
    cfg = TrainConfig(data=data or stored.get("data", ""), batch_size=batch_size, workers=workers,
                      image_size=meta.config.image_size, cache=False)
    dataset = scan(cfg.data)
    protocol_name = stored.get("split", "identity")
    if data is not None and split is None:
        split = "all"
    split = split or "test"
    if split == "all":
        chosen, summary, leaked = list(dataset.records), {"all": {"images": len(dataset.records)}}, 0
    else:
        splits = make_splits(dataset, protocol_name, int(stored.get("seed", 0)), limit=int(stored.get("limit", 0)))
        chosen, summary, leaked = getattr(splits, split), splits.summary(), splits.leaked_identities()
    batches = Batches(chosen, meta.preprocess, cfg, None)
    out_dir = Path(out) if out else ckpt.parent / f"eval-{split}"
    protocol = {"data": str(dataset.root), "kind": dataset.kind, "split": f"{protocol_name}:{split}",
                "splits": summary, "leaked_identities": leaked,
                "skipped": {"count": len(getattr(dataset, "skipped", [])), "first": []}}
    _, md = evaluate_split(ckpt, batches, chosen, np.arange(len(chosen)), protocol, out_dir)
    return md
