"""Prose read off a run's own figures: what figures 1-2 found, and for each missed target why and what would
close it."""

from __future__ import annotations

import math
from typing import Any

from .sizes import TARGETS
from .summary import as_fit_runs, best, dtype_rows, extraction_rows, peer_ratio, setting


def extraction_findings(tp: dict[str, Any]) -> list[str]:
    fit_bf16, best_raw, best_ext = as_fit_runs(tp, "bf16"), best(tp, "bf16", "raw"), best(tp, "bf16", "extract")
    rows = tp["sweep"]["rows"]
    top = max(rows, key=lambda x: x["images_per_second"])
    same = {g["format"]: g for g in dtype_rows(tp, "bf16") if g["threads"] == tp["default_threads"]}
    few = {g["threads"]: g for g in dtype_rows(tp, "bf16") if g["format"] == "channels_last"}
    lines = [
        "Findings:", "",
        f"- Memory format: at {tp['default_threads']} threads the raw bf16 trunk runs "
        f"{same['channels_last']['raw'] / same['nchw']['raw']:.2f}x as fast in channels_last as in NCHW "
        "(oneDNN's bf16 kernels want NHWC). Converting the trunk (`model.to(memory_format=torch.channels_last)`) "
        "is enough; inputs can stay NCHW.",
        "- Torch threads: in channels_last bf16, " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {g['raw']:.1f} img/s"
                                                          for t, g in sorted(few.items())) + " raw.",
        f"- bf16 autocast vs fp32 (fastest raw of each): {best_raw['raw'] / best(tp, 'fp32', 'raw')['raw']:.2f}x.",
        f"- Through extract_features the best setting was {setting(best_ext)}: {best_ext['extract']:.1f} img/s, "
        f"{best_ext['extract'] / best_raw['raw']:.2f} of the best raw bf16 ({setting(best_raw)}); as train.fit runs "
        f"it today ({setting(fit_bf16)}): {fit_bf16['extract']:.1f} img/s.",
        f"- Data path overhead at equal settings: extraction reaches "
        f"{min(g['extract'] / g['raw'] for g in extraction_rows(tp)):.2f}"
        f"-{max(g['extract'] / g['raw'] for g in extraction_rows(tp)):.2f} of the raw trunk.",
        f"- Decoding costs {tp['decode_ms']['draft']:.2f} ms/image with Image.draft and {tp['decode_ms']['no_draft']:.2f} "
        f"without. Best decode setting: {top['decode_workers']} workers, prefetch {top['prefetch']}, "
        f"{top['torch_threads']} torch threads ({top['images_per_second']:.1f} img/s; the sweep's range "
        f"{min(x['images_per_second'] for x in rows):.1f}-{top['images_per_second']:.1f}).",
    ]
    return lines


def _missed_extraction(doc: dict[str, Any], ratio: float) -> str:
    tp = doc["raw"]["throughput"]
    fit_bf16, best_raw, best_ext = as_fit_runs(tp, "bf16"), best(tp, "bf16", "raw"), best(tp, "bf16", "extract")
    decode_ms, trunk_ms = tp["decode_ms"]["draft"], 1000 / best_raw["raw"]
    load = tp.get("load_average_start") or [math.nan]
    return (
        f"- **extraction_ratio {ratio:.2f}, target 0.90.** Why: as train.fit runs it ({setting(fit_bf16)}) "
        f"extraction reaches {fit_bf16['extract'] / fit_bf16['raw']:.2f} of the raw trunk at the same settings. "
        f"Decoding takes {decode_ms:.2f} ms of a core per image against the trunk's {trunk_ms:.2f} ms on "
        f"{doc['machine']['usable_cores']} cores, so the decode workers take cores from the trunk, and other "
        f"work on the machine (load average {load[0]:.1f} when figures 1-2 began) takes more; the best setting measured "
        f"{best_ext['extract'] / best_raw['raw']:.2f} ({setting(best_ext)}). Close it: cores to spare for "
        f"decoding, or the trunk on a GPU, where decoding overlaps the GPU's work.")


def _missed_speedup(doc: dict[str, Any], speed: float) -> str:
    st = doc["raw"]["steps"]
    cached, naive = st["cached"]["train_images_per_second"], st["naive"]["train_images_per_second"]
    head_ms, trunk_ms = 1000 / cached, 1000 / naive - 1000 / cached
    name, fastest = max(st["variants"].items(), key=lambda kv: kv[1]["train_images_per_second"])
    best_ms = 1000 / fastest["train_images_per_second"]
    return (
        f"- **train_speedup_vs_naive {speed:.1f}x, target 15x.** Why: a cached step is not cheap: the head "
        f"({doc['hidden']} fc stack, Adam over all its weights) costs {head_ms:.1f} ms/image, against "
        f"{trunk_ms:.1f} ms/image of decode + fp32 trunk that the cache saves. Close it: make the head step cheaper; "
        f"'{name}' measured {fastest['train_images_per_second']:.1f} img/s vs {cached:.1f}, a step speedup of about "
        f"{(trunk_ms + best_ms) / best_ms:.0f}x.")


def _missed_minutes(doc: dict[str, Any], minutes: float) -> str:
    r, epochs = doc["raw"], doc["epochs"]
    tp, ex, tr, st = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps"))
    best_ext = best(tp, "bf16" if ex["bf16"] else "fp32", "extract")["extract"]
    best_step = max(x["train_images_per_second"] for x in st["variants"].values())
    ext_fix = ex["images"] / best_ext / 60
    epoch_fix = (tr["train_images"] / best_step + tr["val_images"] / st["cached"]["val_images_per_second"]
                 + tr["checkpoint_seconds"]) / 60
    return (
        f"- **full_run_minutes {minutes:.0f}, target 30.** Why: extraction {ex['wall_seconds'] / 60:.1f} min + "
        f"{epochs} epochs x {(tr['epoch_seconds'] + tr['checkpoint_seconds']) / 60:.1f} min on this CPU. Close it: "
        f"the best extraction settings ({ext_fix:.1f} min at the measured rate) and the faster head step "
        f"({epoch_fix:.1f} min/epoch) give about {ext_fix + epochs * epoch_fix:.0f} min here; a GPU does the rest.")


def _missed_predict(pr: dict[str, Any], peer: dict[str, Any], pred: float) -> str:
    peer_ms = 1000 / peer["images_per_second"] if peer.get("images_per_second") else float("nan")
    same_floor = next((x for label, x in pr.get("models", {}).items()
                       if "--min-face 80" in label and "images_per_second" in x), None)
    floor = (f" At the peer's 80 px floor (`--min-face 80`) agegender runs {same_floor['images_per_second']:.1f} "
             f"images/s, {peer_ratio(same_floor, peer):.2f}x the peer." if same_floor and peer_ms == peer_ms else "")
    return (
        f"- **predict_ratio_vs_peer {pred:.2f}, target >= 1.** Why: decode + Haar detection + crop take "
        f"{pr['detect_crop_ms']:.1f} ms/image of one core against {peer_ms:.1f} ms/image for the peer's whole "
        f"pipeline, whose dlib HOG detector skips faces under 80 px, while the default searches down to 40 px "
        f"(4x the pixels to scan).{floor} Close it: `--min-face` trades small faces for speed; a faster "
        f"detector with the same reach (OpenCV's SSD through DnnDetector, with its model files) would keep both.")


def missed(doc: dict[str, Any]) -> list[str]:
    """Per missed target: by how much, why, and what would close it (from this run's own figures)."""
    s, r = doc["summary"], doc["raw"]
    tp, ex, tr, st = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps"))
    lines = []
    ratio = s["extraction_ratio"]
    if ratio is not None and ratio < TARGETS["extraction_ratio"]:
        lines.append(_missed_extraction(doc, ratio))
    speed = s["train_speedup_vs_naive"]
    if speed is not None and speed < TARGETS["train_speedup_vs_naive"] and "variants" in st:
        lines.append(_missed_speedup(doc, speed))
    minutes = s["full_run_minutes"]
    if minutes is not None and minutes >= TARGETS["full_run_minutes"] and "variants" in st and "grid" in tp:
        lines.append(_missed_minutes(doc, minutes))
    pred, pr, peer = s["predict_ratio_vs_peer"], r.get("predict", {}), r.get("peer", {})
    if pred is not None and pred < TARGETS["predict_ratio_vs_peer"] and "detect_crop_ms" in pr:
        lines.append(_missed_predict(pr, peer, pred))
    peak = s["peak_rss_gib"]
    if peak is not None and peak >= TARGETS["peak_rss_gib"]:
        lines.append(f"- **peak_rss_gib {peak:.2f}, target < 4** (extraction {ex['peak_rss_gib']:.2f}, "
                     f"training {tr['peak_rss_gib']:.2f}).")
    return ["Missed targets:", ""] + lines if lines else ["Every target in the table above with a measured figure is met."]
