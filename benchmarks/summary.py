"""The headline figures from the phases' results, and the figure 1-2 grid rows they are read from."""

from __future__ import annotations

import math
from typing import Any

from .sizes import TARGETS


def finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def dtype_rows(tp: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    return [g for g in tp["grid"] if g["dtype"] == dtype]


def as_fit_runs(tp: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The grid row train.fit uses: channels_last trunk (extract_features converts it), default thread count."""
    return next(g for g in dtype_rows(tp, dtype)
                if g["format"] == "channels_last" and g["threads"] == tp["default_threads"])


def extraction_rows(tp: dict[str, Any]) -> list[dict[str, Any]]:
    """Grid rows whose extraction figure means what it says: extract_features converts any trunk to
    channels_last, so the rows given an NCHW trunk measure the channels_last setting again."""
    return [g for g in tp["grid"] if g["format"] == "channels_last"]


def best(tp: dict[str, Any], dtype: str, key: str) -> dict[str, Any]:
    """The grid row of ``dtype`` with the highest ``key`` (``raw`` or ``extract``; extract: channels_last only)."""
    rows = dtype_rows(tp, dtype) if key == "raw" else [g for g in dtype_rows(tp, dtype) if g["format"] == "channels_last"]
    return max(rows, key=lambda g: g[key])


def setting(g: dict[str, Any]) -> str:
    return f"{g['dtype']}, {g['format']}, {g['threads']} torch thread{'s' if g['threads'] > 1 else ''}"


def summarise(r: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The headline figures (None with a reason where a phase could not give one)."""
    tp, ex, tr, st, pr, peer = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps", "predict", "peer"))
    s: dict[str, Any] = {"reasons": {}}
    if "grid" in tp:
        limit = best(tp, "bf16", "raw")["raw"]
        s["extraction_ratio"] = as_fit_runs(tp, "bf16")["extract"] / limit
        s["extraction_ratio_best_settings"] = best(tp, "bf16", "extract")["extract"] / limit
    if "epoch_seconds" in tr and "naive" in st:
        naive = (tr["train_images"] / st["naive"]["train_images_per_second"]
                 + tr["val_images"] / st["naive"]["val_images_per_second"])
        s["naive_epoch_seconds"] = naive
        s["train_speedup_vs_naive"] = naive / tr["epoch_seconds"]
    if "wall_seconds" in ex and "epoch_seconds" in tr:
        s["full_run_minutes"] = (ex["wall_seconds"] + tr["fit_wall_seconds"]
                                 + (epochs - 1) * (tr["epoch_seconds"] + tr["checkpoint_seconds"])) / 60
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
