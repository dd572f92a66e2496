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
from ..data.records import Dataset, FaceRecord
from ..data.splits import make_splits
from ..distributed import World
from ..errors import AgeGenderError
from ..faces.framing import photo_framer
from ..files import refuse_overwrite
from ..model.checkpoint import load_checkpoint
from ..model.meta import resolve_model
from ..model.net import AgeGenderNet
from .report import Predictions, build_report, write_report

log = logging.getLogger(__name__)


def collect_predictions(model: AgeGenderNet, batches: Batches, records: Sequence[FaceRecord], idx: np.ndarray
                        ) -> tuple[list[FaceRecord], Predictions]:
    """Predictions for the readable records among ``idx``, and those records."""
    done, p_male, age = predict_batches(model, batches, idx)
    rec = [records[i] for i in done]
    inf, nan = float("inf"), float("nan")
    return rec, Predictions(
        gender_true=np.array([r.gender for r in rec], dtype=int),
        p_male=p_male,
        # An age group's midpoint is not an age: such faces are scored by their interval alone.
        age_true=np.array([nan if r.age is None or r.age_interval else r.age for r in rec], dtype=float),
        age_pred=age,
        race=np.array([r.race or "" for r in rec], dtype=object),
        paths=[str(r.path) for r in rec],
        age_low=np.array([r.age_interval[0] if r.age_interval else nan for r in rec], dtype=float),
        age_high=np.array([(inf if r.age_interval[1] is None else r.age_interval[1]) if r.age_interval else nan
                           for r in rec], dtype=float),
    )


def _source(r: FaceRecord) -> str:
    """The source slice's value: the parsed origin (imdb, wiki, adience, utkface), else the data set's name."""
    return r.dataset if r.source in ("csv", "unknown") and r.dataset else r.source


def data_protocol(dataset: Dataset) -> dict[str, Any]:
    """Which data, named per set when there are several (``--data`` given more than once)."""
    roots = dataset.roots or (dataset.root,)
    return {"data": str(roots[0]) if len(roots) == 1 else [str(r) for r in roots], "kind": dataset.kind}


def precision_note(bf16: bool, cached: bool, device: str | torch.device) -> str:
    """The precision the figures were computed in, for the protocol (bf16 and fp32 differ in the 3rd decimal)."""
    trunk = "bf16" if bf16 and cached else "fp32"
    return f"trunk {trunk}, heads fp32, on {device}"


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
                          sources=np.array([_source(r) for r in done], dtype=object),
                          datasets=np.array([r.dataset for r in done], dtype=object))
    return report, write_report(report, pred, out_dir, history=history)


SUBSETS = ("train", "val", "test", "all")


def evaluate_model(model: str | os.PathLike[str], data: str | Sequence[str] | None = None,
                   subset: str | None = None, out: str | None = None, batch_size: int = 64, workers: int = 2,
                   precision: str | None = None, device: str = "cpu", force: bool = False,
                   progress: bool = True) -> Path:
    """`agegender evaluate`: a run's own test split by default, or any dataset with ``data``.

    ``model`` is a run directory or a checkpoint file; only a run directory knows its own splits. The trunk runs
    once over the faces, as training's feature cache does, at ``precision`` (None: the run's own, else auto), so
    a run's own split gives the numbers its training report gave. The report goes to ``out``, by default
    ``eval-<data set>`` (or ``eval-<subset>``) beside the model; an existing report is replaced only with ``force``.
    """
    from ..data.features import extract_features
    from ..data.records import dataset_name, scan_all
    from ..devices import use_bf16

    ckpt = resolve_model(model)
    run = ckpt.parent if (ckpt.parent / "config.json").is_file() else None
    if data is None and run is None:
        raise AgeGenderError(f"{model}: a checkpoint outside its run directory needs --data (which images to use)")
    if subset is not None and subset not in SUBSETS:
        raise AgeGenderError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    stored = _stored_run_config(run) if run is not None else {}
    given = [data] if isinstance(data, str) else list(data) if data is not None else None
    roots = given or stored.get("data") or ""
    roots = [roots] if isinstance(roots, str) else list(roots)
    subset = subset or ("all" if given else "test")
    name = "+".join(dataset_name(r) for r in roots) + ("" if subset == "all" else f"-{subset}") if given else subset
    out_dir = Path(out) if out else ckpt.parent / f"eval-{name}"
    refuse_overwrite(out_dir, ("report.md", "report.json"), force)
    precision = precision or str(stored.get("precision", "auto"))
    bf16 = use_bf16(precision, device)
    dataset = scan_all(roots)
    own = {} if given else stored  # a run's own data is split as it was in training
    protocol_name = str(own.get("split", "identity"))
    if subset == "all":
        chosen, summary = list(dataset.records), {"all": {"images": len(dataset.records)}}
        leakage: dict[str, Any] = {
            "leaked_identities": None,
            "leakage": "not measured: the whole data set is evaluated, not a held-out split, so faces or people "
                       "the model was trained on may be among them"}
    else:
        splits = make_splits(dataset, protocol_name, int(own.get("seed", 0)), limit=int(own.get("limit", 0)))
        chosen, summary, leakage = splits[subset], splits.summary(), splits.leakage()
    net, meta = load_checkpoint(ckpt, device=device)
    frame = photo_framer(meta.preprocess)
    features = extract_features(net, chosen, meta.preprocess, batch_size=batch_size, workers=workers, bf16=bf16,
                                frame=frame, device=device, progress=progress)
    batches = Batches(chosen, meta.preprocess, batch_size, workers, features, World(device=device), frame=frame)
    protocol = {**data_protocol(dataset), "split": f"{protocol_name}:{subset}", "splits": summary, **leakage,
                "precision": f"{precision_note(bf16, True, device)} (--precision {precision})",
                "skipped": dataset.skipped.to_dict()}
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
