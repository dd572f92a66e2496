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
        "Findings:",
        "",
        f"- Memory format: at {tp['default_threads']} threads the raw bf16 trunk runs "
        f"{same['channels_last']['raw'] / same['nchw']['raw']:.2f}x as fast in channels_last as in NCHW "
        "(oneDNN's bf16 kernels want NHWC). Converting the trunk (`model.to(memory_format=torch.channels_last)`) "
        "is enough; inputs can stay NCHW.",
        "- Torch threads: in channels_last bf16, "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {g['raw']:.1f} img/s" for t, g in sorted(few.items()))
        + " raw.",
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


def _spread_text(x: dict[str, Any], fmt: str = ".2f") -> str:
    load = f", load {x['load']:.1f}" if x.get("load") is not None else ""
    return f"min {x['min']:{fmt}}, max {x['max']:{fmt}} over {len(x['runs'])} interleaved repetitions{load}"


def _missed_extraction(doc: dict[str, Any], ratio: float) -> str:
    tp = doc["raw"]["throughput"]
    fit_bf16, best_raw, best_ext = as_fit_runs(tp, "bf16"), best(tp, "bf16", "raw"), best(tp, "bf16", "extract")
    cores = doc["machine"]["usable_cores"]
    decode_ms, trunk_core_ms = tp["decode_ms"]["draft"], 1000 * cores / best_raw["raw"]
    pairs = f" ({_spread_text(tp['pairs']['ratio'])})" if "pairs" in tp else ""
    return (
        f"- **extraction_ratio {ratio:.2f}{pairs}, target {TARGETS['extraction_ratio']:.2f}.** Why: decoding "
        f"takes {decode_ms:.2f} ms of one core per image and the fastest raw trunk {trunk_core_ms:.2f} core-ms "
        f"({cores} cores), so on cores the trunk already fills, decoding alone caps the ratio near "
        f"{trunk_core_ms / (trunk_core_ms + decode_ms):.2f}; the rest is the decode threads preempting the trunk's "
        f"OpenMP threads (each parallel region waits for its slowest thread) and other work on the machine. In the "
        f"grid: as train.fit runs it ({setting(fit_bf16)}) {fit_bf16['extract'] / fit_bf16['raw']:.2f} of the raw "
        f"trunk at the same settings; the best setting {best_ext['extract'] / best_raw['raw']:.2f} "
        f"({setting(best_ext)}). Close it: cores to spare for decoding, or the trunk on a GPU."
    )


def _needed_step(st: dict[str, Any], tr: dict[str, Any], target: float) -> float:
    """Cached train images/s an epoch needs for ``target`` x the naive epoch (validation at its measured rate)."""
    budget = st["pairs"]["naive_epoch_seconds"]["median"] / target - tr["val_images"] / st["cached"]["val_images_per_second"]
    return tr["train_images"] / budget if budget > 0 else math.inf


def _missed_speedup(doc: dict[str, Any], speed: float) -> str:
    r = doc["raw"]
    st, tr = r["steps"], r["train"]
    goal = TARGETS["train_speedup_vs_naive"]
    cached, naive = st["cached"]["train_images_per_second"], st["naive"]["train_images_per_second"]
    h = st["head"]
    flops, peak = h["variants"][0]["flops_per_image"], h["peak"]["flops_per_second"]
    need = _needed_step(st, tr, goal)
    share = need * flops / peak
    close = (
        "more than the machine's matmuls reach, so no setting of this head step closes it: it takes fewer FLOPs "
        "per image (a smaller head) or faster matmuls (AMX, a GPU)"
        if share > 1
        else "within the matmul peak: a quieter machine (these figures are at the load shown) or a leaner step "
        "(dropout masks, weight casts and Adam are the rest of its time)"
    )
    return (
        f"- **train_speedup_vs_naive {speed:.1f}x ({_spread_text(st['pairs']['speedup'], '.1f')}), target "
        f"{goal:g}x.** Why: the cached epoch is the head step's: {flops / 1e6:.0f} MFLOP per image ({doc['hidden']} "
        f"fc stack, Adam over all its weights) at {cached:.0f} img/s, {1000 / cached:.2f} ms/image, while the naive "
        f"path (decode + the trunk, at the same settings) takes {1000 / naive:.1f} ms/image. {goal:g}x needs the "
        f"train steps at {need:.0f} img/s, {need * flops / 1e9:.0f} GFLOP/s: {share:.2f} of the best matmul median "
        f"this run measured ({peak / 1e9:.0f} GFLOP/s), {close}."
    )


def _missed_minutes(doc: dict[str, Any], minutes: float) -> str:
    r, epochs, s = doc["raw"], doc["epochs"], doc["summary"]
    tp, ex, tr, st = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps"))
    goal = TARGETS["full_run_minutes"]
    h = st["head"]
    flops, peak = h["variants"][0]["flops_per_image"], h["peak"]["flops_per_second"]
    raw_best = best(tp, "bf16" if ex["bf16"] else "fp32", "raw")["raw"]
    floor_ext = ex["images"] / raw_best / 60
    floor_head = epochs * tr["train_images"] * flops / peak / 60
    sp = s.get("spread", {}).get("full_run_minutes")
    rng = f" (min {sp['min']:.1f}, max {sp['max']:.1f} at the fastest and slowest measured epoch)" if sp else ""
    start = (ex.get("load_average_start") or [None])[0]
    loads = f", load {start:.1f} to {ex['load_end']:.1f}" if start is not None and ex.get("load_end") is not None else ""
    quieter = ""
    if "pairs" in tp and "pairs" in st:  # the same run's interleaved medians, measured at lower load here
        ext_pairs = ex["images"] / tp["pairs"]["extract"]["median"] / 60
        epoch_pairs = epochs * (st["pairs"]["cached_epoch_seconds"]["median"] + tr["checkpoint_seconds"]) / 60
        quieter = (
            f" At the interleaved medians of figures 2 and 3 instead (extraction "
            f"{tp['pairs']['extract']['median']:.0f} img/s at load {tp['pairs']['extract']['load']:.1f}, "
            f"cached epoch {st['pairs']['cached_epoch_seconds']['median']:.1f} s at load "
            f"{st['pairs']['cached_epoch_seconds']['load']:.1f}): {ext_pairs:.1f} + {epoch_pairs:.1f} = "
            f"{ext_pairs + epoch_pairs:.1f} min."
        )
    floor = floor_ext + floor_head
    verdict = (
        "above the target before any overhead: not reachable with this head on this CPU"
        if floor > goal
        else f"leaving {goal - floor:.1f} min of the {goal:g} for all of that"
    )
    return (
        f"- **full_run_minutes {minutes:.1f}{rng}, target <= {goal:g}.** Why: extraction "
        f"{ex['wall_seconds'] / 60:.1f} min ({ex['images_per_second']:.0f} img/s{loads}) + {epochs} epochs x "
        f"{(tr['epoch_seconds'] + tr['checkpoint_seconds']) / 60:.2f} min (train.fit epoch + checkpoint writes).{quieter} "
        f"The floor on this machine: extraction at the fastest raw trunk rate {floor_ext:.1f} min, and the {epochs} "
        f"epochs' head steps at this run's best matmul median {floor_head:.1f} min: {floor:.1f} min "
        f"before any overhead (dropout masks, weight casts, Adam, validation, checkpoints), {verdict}."
    )


def head_findings(h: dict[str, Any], default: dict[str, Any] | None, fastest: dict[str, Any]) -> list[str]:
    """What the interleaved head-step variants say: the fastest against the default, and each factor alone."""
    vs = h["variants"]

    def rate(**kw: Any) -> float | None:
        v = next((v for v in vs if all(v[k] == x for k, x in kw.items())), None)
        return v["images_per_second"]["median"] if v else None

    f = fastest["images_per_second"]
    lines = [
        "Head-step findings:",
        "",
        f"- Fastest measured: {fastest['name']}, {f['median']:.0f} img/s (range {f['min']:.0f}-{f['max']:.0f}).",
    ]
    if default is None:
        return lines
    d = default["images_per_second"]
    overlap = "overlap" if d["max"] >= f["min"] else "do not overlap"
    base = {k: default[k] for k in ("precision", "batch", "threads")}
    lines.append(
        f"- The library's default ({default['name']}): {d['median']:.0f} img/s (range {d['min']:.0f}-"
        f"{d['max']:.0f}), {d['median'] / f['median']:.2f} of the fastest median; the two ranges {overlap}. "
        f"It runs at {default['fraction_of_peak']:.2f} of this run's matmul peak "
        f"({default['fraction_of_dtype_peak']:.2f} of the {default['precision']} peak)."
    )
    batches = sorted({v["batch"] for v in vs})
    by_batch = ", ".join(
        f"{b}: {rate(precision=base['precision'], batch=b, threads=base['threads'], adam='fused'):.0f}" for b in batches
    )
    lines.append(f"- Batch ({base['precision']}, {base['threads']} threads, fused Adam), img/s: {by_batch}.")
    threads = sorted({v["threads"] for v in vs})
    by_threads = ", ".join(
        f"{t}: {rate(precision=base['precision'], batch=base['batch'], threads=t, adam='fused'):.0f}" for t in threads
    )
    lines.append(f"- Torch threads ({base['precision']}, batch {base['batch']}), img/s: {by_threads}.")
    fp32, bf16 = (rate(precision=p, batch=base["batch"], threads=base["threads"], adam="fused") for p in ("fp32", "bf16"))
    foreach = rate(**base, adam="foreach")
    if fp32 and bf16:
        lines.append(f"- bf16 autocast vs fp32 (batch {base['batch']}, {base['threads']} threads): {bf16 / fp32:.2f}x.")
    if foreach:
        lines.append(f"- Fused Adam vs torch's multi-tensor Adam at the defaults: {d['median'] / foreach:.2f}x.")
    return lines


def _missed_predict(pr: dict[str, Any], peer: dict[str, Any], pred: float) -> str:
    peer_ms = 1000 / peer["images_per_second"] if peer.get("images_per_second") else float("nan")
    same_floor = next(
        (x for label, x in pr.get("models", {}).items() if "--min-face 80" in label and "images_per_second" in x), None
    )
    floor = (
        f" At the peer's 80 px floor (`--min-face 80`) agegender runs {same_floor['images_per_second']:.1f} "
        f"images/s, {peer_ratio(same_floor, peer):.2f}x the peer."
        if same_floor and peer_ms == peer_ms
        else ""
    )
    return (
        f"- **predict_ratio_vs_peer {pred:.2f}, target >= {TARGETS['predict_ratio_vs_peer']:g}.** Why: decode + "
        f"{pr.get('detector', 'face')} detection + crop take {pr['detect_crop_ms']:.1f} ms/image of one core "
        f"against {peer_ms:.1f} ms/image for the peer's whole pipeline, whose dlib HOG detector skips faces under "
        f"80 px, while the default searches down to 40 px and classifies every face it finds.{floor} Close it: "
        "`--min-face` trades small faces for speed, and an int8 ONNX export (figure 4) cuts the classifier's cost."
    )


def missed(doc: dict[str, Any]) -> list[str]:
    """Per missed target: by how much, why, and what would close it (from this run's own figures)."""
    s, r = doc["summary"], doc["raw"]
    tp, ex, tr, st = (r.get(k, {}) for k in ("throughput", "extract", "train", "steps"))
    lines = []
    ratio = s["extraction_ratio"]
    if ratio is not None and ratio < TARGETS["extraction_ratio"]:
        lines.append(_missed_extraction(doc, ratio))
    speed = s["train_speedup_vs_naive"]
    if speed is not None and speed < TARGETS["train_speedup_vs_naive"] and "head" in st and "epoch_seconds" in tr:
        lines.append(_missed_speedup(doc, speed))
    minutes = s["full_run_minutes"]
    if minutes is not None and minutes > TARGETS["full_run_minutes"] and "head" in st and "grid" in tp:
        lines.append(_missed_minutes(doc, minutes))
    pred, pr, peer = s["predict_ratio_vs_peer"], r.get("predict", {}), r.get("peer", {})
    if pred is not None and pred < TARGETS["predict_ratio_vs_peer"] and "detect_crop_ms" in pr:
        lines.append(_missed_predict(pr, peer, pred))
    peak = s["peak_rss_gib"]
    if peak is not None and peak >= TARGETS["peak_rss_gib"]:
        lines.append(
            f"- **peak_rss_gib {peak:.2f}, target < 4** (extraction {ex['peak_rss_gib']:.2f}, training {tr['peak_rss_gib']:.2f})."
        )
    return ["Missed targets:", ""] + lines if lines else ["Every target in the table above with a measured figure is met."]


# -- figure 7 -----------------------------------------------------------------------------------
def accuracy_findings(a: dict[str, Any]) -> list[str]:
    """Per missed figure-7 target: its figure seed by seed (the target is judged on their mean)."""
    lines = []
    for t in a.get("targets", []):
        if t["met"] is not False:
            continue
        part, figure = (a.get("held_out", {}), "gender") if t["key"] == "fairface_gender" else (a.get("mixed", {}), t["key"])
        runs = part.get("ours", {}).get(figure, {}).get("runs", [])
        seeds = (
            f" Seed by seed ({', '.join(map(str, a.get('seeds', [])))}): {', '.join(f'{v:.3f}' for v in runs)}." if runs else ""
        )
        lines.append(f"- **{t['target']}: {t['value']}.**{seeds}")
    return ["Missed targets:", "", *lines, ""] if lines else ["Every figure-7 target with a measured figure is met.", ""]
