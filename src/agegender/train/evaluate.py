"""Predictions of a trained model on a split or any dataset, turned into the report."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.batches import Batches
from ..data.records import FaceRecord, scan
from ..data.splits import make_splits
from ..errors import AgeGenderError
from ..faces.framing import photo_framer
from ..model.checkpoint import load_checkpoint, read_meta
from ..model.meta import resolve_model
from ..model.net import AgeGenderNet
from .report import Predictions, build_report, write_report

log = logging.getLogger(__name__)


def collect_predictions(model: AgeGenderNet, batches: Batches, records: Sequence[FaceRecord], idx: np.ndarray
                        ) -> tuple[list[FaceRecord], Predictions]:
    """Predictions for the readable records among ``idx``, and those records."""
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


def evaluate_split(checkpoint: str | Path, batches: Batches, records: Sequence[FaceRecord], idx: np.ndarray,
                   protocol: dict[str, Any], out_dir: str | Path,
                   history: list[dict[str, float]] | None = None) -> tuple[dict[str, Any], Path]:
    model, meta = load_checkpoint(checkpoint, device=batches.world.device)
    done, pred = collect_predictions(model, batches, records, idx)
    if not done:
        raise AgeGenderError(f"{protocol.get('data')}: no readable images in the evaluation split")
    skipped = protocol.get("skipped", {"count": 0, "first": []})
    unread = [records[i] for i in idx if batches.ok is not None and not batches.ok[i]]
    protocol = {**protocol, "skipped": {"count": int(skipped["count"]) + len(unread),
                                        "first": (list(skipped["first"]) + [f"{r.path}: could not decode"
                                                                            for r in unread])[:10]}}
    report = build_report(pred, {**protocol, "model": str(checkpoint), "best_epoch": meta.extra.get("best_epoch")},
                          sources=np.array([r.source for r in done], dtype=object))
    return report, write_report(report, pred, out_dir, history=history)


SUBSETS = ("train", "val", "test", "all")


def evaluate_model(model: str | os.PathLike[str], data: str | None = None, subset: str | None = None,
                   out: str | None = None, batch_size: int = 64, workers: int = 2) -> Path:
    """`agegender evaluate`: a run's own test split by default, or any dataset with ``data``.

    ``model`` is a run directory or a checkpoint file; only a run directory knows its own splits.
    """
    ckpt = resolve_model(model)
    run = ckpt.parent if (ckpt.parent / "config.json").is_file() else None
    if data is None and run is None:
        raise AgeGenderError(f"{model}: a checkpoint outside its run directory needs --data (which images to use)")
    if subset is not None and subset not in SUBSETS:
        raise AgeGenderError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    stored = _stored_run_config(run) if run is not None and data is None else {}
    meta = read_meta(ckpt)
    dataset = scan(data or stored.get("data", ""))
    protocol_name = str(stored.get("split", "identity"))
    subset = subset or ("all" if data is not None else "test")
    if subset == "all":
        chosen, summary, leaked = list(dataset.records), {"all": {"images": len(dataset.records)}}, 0
    else:
        splits = make_splits(dataset, protocol_name, int(stored.get("seed", 0)), limit=int(stored.get("limit", 0)))
        chosen, summary, leaked = splits[subset], splits.summary(), splits.leaked_identities()
    batches = Batches(chosen, meta.preprocess, batch_size, workers, frame=photo_framer(meta.preprocess))
    out_dir = Path(out) if out else ckpt.parent / f"eval-{subset}"
    protocol = {"data": str(dataset.root), "kind": dataset.kind, "split": f"{protocol_name}:{subset}",
                "splits": summary, "leaked_identities": leaked, "skipped": dataset.skipped.to_dict()}
    _, md = evaluate_split(ckpt, batches, chosen, np.arange(len(chosen)), protocol, out_dir)
    return md


def _stored_run_config(run: Path) -> dict[str, Any]:
    try:
        stored = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AgeGenderError(f"{run / 'config.json'}: unreadable run config ({e})") from None
    if not isinstance(stored, dict):
        raise AgeGenderError(f"{run / 'config.json'}: not a run config")
    return stored


@torch.no_grad()
def predict_batches(model: AgeGenderNet, batches: Batches, idx: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices actually predicted, P(male), predicted age or None)."""
    model.eval()
    done, p_male, ages = [], [], []
    # Cached features are small: score them in large batches rather than the training batch size.
    for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
        out = model.forward_head(x) if batches.cached else model(x)
        done.append(chunk)
        p_male.append(torch.sigmoid(out.gender_logit.float()).cpu().numpy())
        if out.age_logits is not None:
            ages.append(model.expected_age(out.age_logits.float()).cpu().numpy())
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
    return cat(done).astype(int), cat(p_male), (cat(ages) if ages else None)
