"""Predictions of a trained model on a split or any dataset, turned into the report."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..data.records import Dataset, FaceRecord, scan_all
from ..data.splits import SPLIT_NAMES, Splits, make_splits
from ..errors import AgeGenderError, OptionError
from ..faces.detect import photo_framer
from ..faces.framing import PhotoFramer
from ..files import refuse_overwrite
from ..images import Skipped, load_rgb
from ..model.meta import resolve_model
from ..model.runtime import Backend, Decoded, load_backend
from ..progress import Progress
from ..rundir import ReportDir, RunDir
from .report import Predictions, build_report, write_report

log = logging.getLogger(__name__)


def _predictions(rec: list[FaceRecord], out: Decoded) -> tuple[list[FaceRecord], Predictions]:
    inf, nan = float("inf"), float("nan")
    return rec, Predictions(
        gender_true=np.array([r.gender for r in rec], dtype=int),
        p_male=out.p_male,
        # An age group's midpoint is not an age: such faces are scored by their interval alone.
        age_true=np.array([nan if r.age is None or r.age_interval else r.age for r in rec], dtype=float),
        age_pred=out.age,
        race=np.array([r.race or "" for r in rec], dtype=object),
        paths=[str(r.path) for r in rec],
        age_low=np.array([r.age_interval[0] if r.age_interval else nan for r in rec], dtype=float),
        age_high=np.array(
            [(inf if r.age_interval[1] is None else r.age_interval[1]) if r.age_interval else nan for r in rec], dtype=float
        ),
    )


def _source(r: FaceRecord) -> str:
    """The source slice's value: the parsed origin (imdb, wiki, adience, utkface), else the data set's name."""
    return r.dataset if r.source in ("csv", "unknown") and r.dataset else r.source


def data_protocol(dataset: Dataset) -> dict[str, Any]:
    """Which data, named per set when there are several (``--data`` given more than once)."""
    roots = dataset.roots or (dataset.root,)
    return {"data": str(roots[0]) if len(roots) == 1 else [str(r) for r in roots], "kind": dataset.kind}


def precision_note(backend: Backend, requested: str, device: str) -> str:
    """The precision the figures were computed in, for the protocol: bf16 and fp32 trunks differ in the third
    decimal of accuracy, so two reports compare only at the same precision."""
    if backend.name == "onnx":
        return "onnx: the export's own (fp32 arithmetic), on cpu"
    return f"{backend.name}: trunk {backend.precision}, heads fp32, on {device} (--precision {requested})"


def evaluate_records(
    backend: Backend,
    records: Sequence[FaceRecord],
    protocol: dict[str, Any],
    out_dir: ReportDir | str | Path,
    history: list[dict[str, float]] | None = None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    requested: str = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """The report on ``records`` through ``backend``, with the per-face predictions it was computed from: the one
    path of ``evaluate`` and of training's own report, so the two give the same numbers for the same faces and
    precision."""
    done, decoded, unread = predict_records(backend, records, batch_size, workers, progress)
    _, pred = _predictions(done, decoded)
    protocol = {**protocol, "precision": precision_note(backend, requested, device)}
    return _report(
        pred, done, unread, protocol, str(getattr(backend, "path", "")), backend.meta.extra.get("best_epoch"), out_dir, history
    )


def _report(
    pred: Predictions,
    done: list[FaceRecord],
    unread: list[FaceRecord],
    protocol: dict[str, Any],
    model: str,
    best_epoch: Any,
    out_dir: ReportDir | str | Path,
    history: list[dict[str, float]] | None = None,
) -> tuple[dict[str, Any], Path]:
    if not done:
        raise AgeGenderError(f"{protocol.get('data')}: no readable images in the evaluation split")
    skipped = protocol.get("skipped", {"count": 0, "first": []})
    protocol = {
        **protocol,
        "skipped": {
            "count": int(skipped["count"]) + len(unread),
            "first": (list(skipped["first"]) + [f"{r.path}: could not decode" for r in unread])[:10],
        },
    }
    report = build_report(
        pred,
        {**protocol, "model": model, "best_epoch": best_epoch},
        sources=np.array([_source(r) for r in done], dtype=object),
        datasets=np.array([r.dataset for r in done], dtype=object),
    )
    return report, write_report(report, pred, out_dir, history=history)


SUBSETS = ("train", "val", "test", "all")


def evaluate_model(
    model: RunDir | str | os.PathLike[str] | None,
    data: str | Sequence[str] | None = None,
    subset: str | None = None,
    out: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    precision: str | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    flip: bool = False,
) -> Path:
    """`agegender evaluate`: a run's own test split by default, or any dataset with ``data`` (one folder or several).

    ``model`` is a run directory, a checkpoint or an ONNX export (None: the bundled model); only a run directory
    knows its own splits (the paths it recorded in training, whatever folders they came from). Faces are framed
    and decoded as ``predict`` frames and decodes them, as the training report does, so a run's own test split
    at its own ``precision`` (None: the run's, else auto) gives the numbers its training report gave; an ONNX
    model needs no torch. The report and the per-face predictions go to ``out``, by default ``eval-<data set>``
    (``eval-<subset>`` for the run's own split) beside the model; an earlier report there is replaced only with
    ``force``.
    """
    from ..data.records import dataset_name

    if model is None:
        from ..weights.zoo import bundled_model

        model = bundled_model()
    ckpt = resolve_model(model.checkpoint if isinstance(model, RunDir) else model)
    run = RunDir.holding(ckpt)
    if data is None and run is None:
        raise OptionError(f"{ckpt}: a checkpoint outside its run directory needs `data` (which images to use)", "data")
    if subset is not None and subset not in SUBSETS:
        raise AgeGenderError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    if batch_size < 1 or workers < 1:
        raise AgeGenderError(f"batch size and workers must be at least 1, got {batch_size} and {workers}")
    stored = run.read_config() if run is not None else {}
    given = [data] if isinstance(data, str) else list(data) if data is not None else None
    roots = given or stored.get("data") or ""
    roots = [roots] if isinstance(roots, str) else list(roots)
    subset = subset or ("all" if given else "test")
    name = "+".join(dataset_name(r) for r in roots) + ("" if subset == "all" else f"-{subset}") if given else subset
    out_dir = ReportDir(Path(out)) if out else RunDir(ckpt.parent).evaluation(name)
    refuse_overwrite(out_dir.path, out_dir.markers, force)  # before the slow part
    precision = precision or str(stored.get("precision", "auto"))
    backend = load_backend(ckpt, device, precision, flip)  # flip: each face averaged with its mirror, as predict's
    dataset = scan_all(roots)
    own = {} if given else stored  # a run's own data is split as it was in training
    protocol_name = str(own.get("split", "identity"))
    if subset == "all":
        chosen, summary = list(dataset.records), {"all": {"images": len(dataset.records)}}
        leakage: dict[str, Any] = {
            "leaked_identities": None,
            "leakage": "not measured: the whole data set is evaluated, not a held-out split, so faces or people "
            "the model was trained on may be among them",
        }
    else:
        # A run's own split is the one it recorded; runs from before splits.json are split again, as trained.
        splits = (_recorded_splits(run, dataset.records, protocol_name) if not given else None) or make_splits(
            dataset, protocol_name, int(own.get("seed", 0)), limit=int(own.get("limit", 0))
        )
        summary, leakage = splits.summary(), splits.leakage()
        chosen = splits[subset]
    protocol = {
        **data_protocol(dataset),
        "split": f"{protocol_name}:{subset}",
        "splits": summary,
        **leakage,
        "skipped": dataset.skipped.to_dict(),
    }
    _, md = evaluate_records(
        backend,
        chosen,
        protocol,
        out_dir,
        batch_size=batch_size,
        workers=workers,
        requested=precision,
        device=device,
        progress=progress,
    )
    return md


def predict_records(
    backend: Backend, records: Sequence[FaceRecord], batch_size: int = 64, workers: int = 2, progress: bool = True
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
    with ThreadPoolExecutor(workers) as pool, Progress(len(records), "evaluate", "img", enabled=progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = list(pool.map(lambda r: load_rgb(r.path, size, skipped, frame), chunk))
            ok = [(r, im) for r, im in zip(chunk, images) if im is not None]
            unread += [r for r, im in zip(chunk, images) if im is None]
            if ok:
                done += [r for r, _ in ok]
                parts.append(backend.run(np.stack([im for _, im in ok])))
            bar.update(len(chunk))
    return done, Decoded.concat(parts), unread


def _recorded_splits(run: RunDir | None, records: Sequence[FaceRecord], protocol: str) -> Splits | None:
    """The splits that training recorded in the run, as records of ``records``; None for runs without them."""
    recorded = None if run is None else run.read_splits()
    if run is None or recorded is None:
        return None
    by_path = {str(r.path): r for r in records}
    chosen = {}
    for name in SPLIT_NAMES:
        paths = recorded.get(name)
        if paths is None:
            raise AgeGenderError(f"{run.splits}: no {name} split recorded")
        missing = [p for p in paths if p not in by_path]
        if missing:
            raise AgeGenderError(f"{run.splits}: {len(missing)} {name} images are no longer in the data (first: {missing[0]})")
        chosen[name] = [by_path[p] for p in paths]
    return Splits(**chosen, protocol=protocol)
