"""Prose read off a run's own figures: what figures 1-2 found, and for each missed target why and what would
close it."""

from __future__ import annotations

import math
from typing import Any

from .accuracy import compared
from .sizes import ACCURACY_TARGETS as TARGETS_7
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
def _peer_leads(ours: dict[str, Any], peer: dict[str, Any], least: int = 30) -> str:
    """The two slices (of ``least`` photos or more) where the peer's gender accuracy leads ours most."""
    gaps = [
        (d["accuracy"] - peer["slices"][key][v]["accuracy"], key, v, d)
        for key, groups in ours.get("slices", {}).items()
        for v, d in groups.items()
        if d["n"] >= least and v in peer.get("slices", {}).get(key, {})
    ]
    behind = sorted(g for g in gaps if g[0] < 0)[:2]
    if not behind:
        return f"The peer leads on no slice of {least} photos or more."
    return (
        "The peer leads most on "
        + " and ".join(
            f"{'age' if key == 'group' else key} {v} ({d['accuracy']:.3f} vs {d['accuracy'] - gap:.3f}, {d['n']} photos)"
            for gap, key, v, d in behind
        )
        + "."
    )


def _missed_gender(label: str, x: dict[str, Any]) -> str:
    ours, peer = x["ours"], x["peer"]
    gap = ours["accuracy"] - peer["accuracy"]
    (a, b), (c, d) = ours["accuracy_ci95"], peer["accuracy_ci95"]
    overlap = "overlap" if a <= d and c <= b else "do not overlap"
    return (
        f"- **{label}: gender {ours['accuracy']:.3f} vs the peer's {peer['accuracy']:.3f}** ({gap:+.3f}, "
        f"{round(-gap * ours['images']) if gap < 0 else 0} of {ours['images']:,} photos; 95% CIs {a:.3f}-{b:.3f} and "
        f"{c:.3f}-{d:.3f} {overlap}); no face = wrong: {ours['accuracy_no_face_wrong']:.3f} vs "
        f"{peer['accuracy_no_face_wrong']:.3f}. {_peer_leads(ours, peer)}"
    )


def _by_age(groups: dict[str, Any], adult: bool) -> tuple[float, int]:
    from .accuracy import group_range

    chosen = [d for v, d in groups.items() if (r := group_range(v)) is not None and (r[0] >= 20) == adult]
    n = sum(d["n"] for d in chosen)
    return (sum(d["accuracy"] * d["n"] for d in chosen) / n if n else math.nan), n


def _missed_fairface(x: dict[str, Any]) -> str:
    ours, peer = x["ours"], x.get("peer", {})
    groups = ours.get("slices", {}).get("group", {})
    (kids, n_kids), (adults, n_adults) = _by_age(groups, False), _by_age(groups, True)
    peer_groups = peer.get("slices", {}).get("group", {})
    peer_part = (
        f" (the peer: {_by_age(peer_groups, False)[0]:.3f} and {_by_age(peer_groups, True)[0]:.3f})" if peer_groups else ""
    )
    return (
        f"- **FairFace gender {ours['accuracy']:.3f}, target {TARGETS_7['fairface_gender']:.2f}** (trained on "
        f"{' + '.join(x['trained_on'])}). Where it falls short: FairFace is balanced over its age groups, and on "
        f"the {n_kids} photos under 20 ours reaches {kids:.3f}, on the {n_adults} aged 20 and over "
        f"{adults:.3f}{peer_part}."
    )


def _missed_photo_predict(name: str, x: dict[str, Any]) -> str:
    s = x["split_ms"]
    per_face = s["align"] + s["classify"]
    total = s["decode"] + s["detect"] + s["faces_per_photo"] * per_face
    return (
        f"- **predict on {name}: {x['ratio']:.2f}x the peer, target {TARGETS_7['predict_ratio_vs_peer']:.0f}x** "
        f"({x['ours_images_per_second']:.1f} vs {x['peer_images_per_second']:.1f} images/s). Where our time goes, "
        f"step by step on one thread over {s['photos']} of the photos: decode {s['decode']:.1f} ms and RetinaFace "
        f"{s['detect']:.1f} ms per photo, then per face alignment {s['align']:.1f} ms and descriptor + heads "
        f"{s['classify']:.1f} ms (batch 32), {s['faces_per_photo']:.2f} faces per photo: detection is "
        f"{s['detect'] / total:.0%} of {total:.1f} ms. The peer's whole pipeline takes "
        f"{1000 / x['peer_images_per_second']:.1f} ms per photo, and its detector found {x['peer_faces']} faces "
        f"where ours found {x['ours_faces']} (ours classifies every face of 40 px and more)."
    )


def accuracy_findings(a: dict[str, Any]) -> list[str]:
    """Per missed figure-7 target: by how much and where, from this run's own slices and timings."""
    runs = {key: (label, x) for key, label, x in compared(a)}
    lines = []
    for t in a.get("targets", []):
        if t["met"] is not False:
            continue
        kind, _, name = t["key"].partition(":")
        if kind == "gender":
            lines.append(_missed_gender(*runs[name]))
        elif kind == "fairface_gender":
            lines.append(_missed_fairface(a["cross"]["fairface"]))
        elif kind == "predict" and "split_ms" in a["speed"]["predict"].get(name, {}):
            lines.append(_missed_photo_predict(name, a["speed"]["predict"][name]))
        else:
            lines.append(f"- **{t['target']}: {t['value']}.**")
    return ["Missed targets:", "", *lines, ""] if lines else ["Every figure-7 target with a measured figure is met.", ""]
