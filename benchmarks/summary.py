"""The headline figures from the phases' results, and the figure 1-2 grid rows they are read from."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .sizes import TARGETS


def finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def dtype_rows(tp: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    return [g for g in tp["grid"] if g["dtype"] == dtype]


def as_fit_runs(tp: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The grid row train.fit uses: the trunk layout extract_features picks for ``dtype``, default thread count."""
    return next(g for g in extraction_rows(tp) if g["dtype"] == dtype and g["threads"] == tp["default_threads"])


def extraction_rows(tp: dict[str, Any]) -> list[dict[str, Any]]:
    """Grid rows with an extraction figure: extract_features runs a copy of the trunk in a layout of its own
    choosing (model.net.inference_layout), so only the rows in that layout measure what they say."""
    return [g for g in tp["grid"] if g.get("extract") is not None]


def best(tp: dict[str, Any], dtype: str, key: str) -> dict[str, Any]:
    """The grid row of ``dtype`` with the highest ``key`` (``raw`` or ``extract``)."""
    rows = dtype_rows(tp, dtype) if key == "raw" else [g for g in extraction_rows(tp) if g["dtype"] == dtype]
    return max(rows, key=lambda g: g[key])


def setting(g: dict[str, Any]) -> str:
    return f"{g['dtype']}, {g['format']}, {g['threads']} torch thread{'s' if g['threads'] > 1 else ''}"


def _load_of(*phases: dict[str, Any]) -> float | None:
    """The median 1-minute load average recorded at the start and end of ``phases``."""
    loads = [x for ph in phases for x in ((ph.get("load_average_start") or [None])[0], ph.get("load_end")) if x is not None]
    return float(statistics.median(loads)) if loads else None


def summarise(r: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The headline figures (None with a reason where a phase could not give one). Each target is judged on the
    median of interleaved repetitions; ``spread`` holds its min, max and load where the run measured them."""
    tp, ex, tr, st, pr, peer = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps", "predict", "peer"))
    s: dict[str, Any] = {"reasons": {}, "spread": {}}
    if "grid" in tp:
        limit = best(tp, "bf16", "raw")["raw"]
        s["extraction_ratio_grid"] = as_fit_runs(tp, "bf16")["extract"] / limit
        s["extraction_ratio_best_settings"] = best(tp, "bf16", "extract")["extract"] / limit
        s["extraction_ratio"] = s["extraction_ratio_grid"]
        if "pairs" in tp:  # raw vs extraction as train.fit runs it, interleaved: the median of the pair ratios
            s["extraction_ratio"] = tp["pairs"]["ratio"]["median"]
            s["spread"]["extraction_ratio"] = tp["pairs"]["ratio"]
    if "pairs" in st:  # cached vs naive epochs, interleaved: the median of the pair ratios
        p = st["pairs"]
        s["naive_epoch_seconds"] = p["naive_epoch_seconds"]["median"]
        s["cached_epoch_seconds"] = p["cached_epoch_seconds"]["median"]
        s["train_speedup_vs_naive"] = p["speedup"]["median"]
        s["spread"]["train_speedup_vs_naive"] = p["speedup"]
        if "epoch_seconds" in tr:
            s["train_speedup_fit_epochs"] = s["naive_epoch_seconds"] / tr["epoch_seconds"]
    elif "epoch_seconds" in tr and "naive" in st:  # a run from before the interleaved pairs
        naive = (
            tr["train_images"] / st["naive"]["train_images_per_second"] + tr["val_images"] / st["naive"]["val_images_per_second"]
        )
        s["naive_epoch_seconds"] = naive
        s["train_speedup_vs_naive"] = naive / tr["epoch_seconds"]
    if "wall_seconds" in ex and "epoch_seconds" in tr:
        rest = epochs - tr.get("epochs_measured", 1)  # epochs beyond those train.fit ran, at the measured rate

        def minutes(epoch: float) -> float:
            return (ex["wall_seconds"] + tr["fit_wall_seconds"] + rest * (epoch + tr["checkpoint_seconds"])) / 60

        s["full_run_minutes"] = minutes(tr["epoch_seconds"])
        if "epochs" in tr:
            e = tr["epochs"]
            s["spread"]["full_run_minutes"] = {
                "median": minutes(e["median"]),
                "min": minutes(e["min"]),
                "max": minutes(e["max"]),
                "load": _load_of(ex, tr),
            }
    if "images_per_second" in pr and "images_per_second" in peer:
        s["predict_ratio_vs_peer"] = pr["images_per_second"] / peer["images_per_second"]
    else:
        s["reasons"]["predict_ratio_vs_peer"] = peer.get("error") or pr.get("error") or "not measured"
    if "peak_rss_gib" in ex and "peak_rss_gib" in tr:
        s["peak_rss_gib"] = max(ex["peak_rss_gib"], tr["peak_rss_gib"])
    for key in (*TARGETS, "extraction_ratio_best_settings"):
        s[key] = finite(s.get(key))
        if s[key] is None and key not in s["reasons"]:
            s["reasons"][key] = next((x["error"] for x in (tp, ex, tr, st) if "error" in x), "not measured")
    return s


def peer_ratio(x: dict[str, Any], peer: dict[str, Any]) -> float | None:
    """``x``'s images/s over the peer's (None when the peer has no figure)."""
    return x["images_per_second"] / peer["images_per_second"] if "images_per_second" in peer else None
