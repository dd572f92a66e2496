"""BENCHMARKS.md from the bench.json document, one function per section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from agegender.train.report import markdown_table

from .findings import accuracy_findings, extraction_findings, head_findings, missed
from .sizes import PEER, TARGETS
from .summary import as_fit_runs, best, extraction_rows, peer_ratio, setting


def fmt_num(x: Any, fmt: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def why(*phases: dict[str, Any]) -> str:
    """Why a phase has no figures: its error, or why it was skipped."""
    return next((x.get("error") or x["skipped"] for x in phases if x.get("error") or x.get("skipped")), "not measured")


def fmt_load(values: Sequence[float] | None) -> str:
    return "n/a" if not values else " ".join(f"{v:.2f}" for v in values)


def _gpu_cell(machine: dict[str, Any]) -> str:
    if machine["device"].startswith("cuda"):
        return "measured above"
    return "no GPU available" if machine["gpu"] == "no GPU available" else "not run (pass --device cuda)"


_HEADLINE = (
    ("extraction_ratio", ".2f"),
    ("train_speedup_vs_naive", ".1f"),
    ("full_run_minutes", ".1f"),
    ("predict_ratio_vs_peer", ".2f"),
    ("peak_rss_gib", ".2f"),
)


def _summary_rows(s: dict[str, Any]) -> list[list[str]]:
    """One row per headline figure: its median (the judged value), min, max and load where the run interleaved
    repetitions of it, its target and whether the median meets it."""
    rows = []
    for key, fmt in _HEADLINE:
        v, goal, sp = s[key], TARGETS.get(key), s.get("spread", {}).get(key)
        bound = {"full_run_minutes": "<=", "peak_rss_gib": "<"}.get(key, ">=")
        if v is None:
            status = "not measured"
        elif goal is None:
            status = "-"
        elif bound != ">=":
            status = "met" if (v <= goal if bound == "<=" else v < goal) else f"missed: {v / goal:.1f}x over"
        else:
            status = "met" if v >= goal else f"missed: {v / goal:.2f} of target"
        rows.append(
            [
                f"`{key}`",
                fmt_num(v, fmt),
                fmt_num(sp["min"], fmt) if sp else "-",
                fmt_num(sp["max"], fmt) if sp else "-",
                fmt_num(sp.get("load"), ".2f") if sp else "-",
                "-" if goal is None else f"{bound} {goal:g}",
                status,
            ]
        )
    return rows


def _header(doc: dict[str, Any]) -> list[str]:
    sz, r = doc["sizes"], doc["raw"]
    shapes = "VGG-Face conv shapes" if sz["widths"] is None else f"the VGG16 layout with tiny widths {sz['widths']}"
    weights = (
        f"Weights: generated (synthetic.make_vgg_face_state) at {shapes}; image size {doc['image_size']}; head {doc['hidden']}. "
        if any("measured" in x for k, x in r.items() if k != "accuracy")
        else ""
    )
    out = [
        f"# Benchmarks ({doc['mode']})",
        "",
        f"Command that wrote this report: `{doc['command']}`",
        "",
        f"Written {doc['date']}; this invocation ran {doc['wall_minutes']:.1f} min. Data: {doc['data']}. {weights}"
        "Figures that are compared with each other are always measured by the same invocation "
        "(`--reuse` keeps or reruns such phases together).",
        "",
    ]
    by_run: dict[tuple[str, str], list[str]] = {}
    for name, x in r.items():
        if "measured" in x:
            by_run.setdefault((x["measured"]["date"], x["measured"]["command"]), []).append(name)
    out += [f"- phases {', '.join(names)}: measured {date} by `{cmd}`" for (date, cmd), names in by_run.items()]
    return out + [""]


def _machine(doc: dict[str, Any]) -> list[str]:
    m, r = doc["machine"], doc["raw"]
    out = ["## Machine", ""]
    out += markdown_table(
        ["item", "value"],
        [
            ["CPU", m["cpu"]],
            ["cores (logical / usable)", f"{m['logical_cores']} / {m['usable_cores']}"],
            [
                "load average (1/5/15 min), start / end of this invocation (each phase's: section 6)",
                f"{fmt_load(m['load_average_start'])} / {fmt_load(m.get('load_average_end'))}",
            ],
            ["torch", f"{m['torch']}, {m['torch_threads']} intra-op threads by default, {m['cpu_capability']} kernels"],
            ["bf16 matrix units (they set every bf16 figure)", m.get("bf16_units", "not recorded")],
            ["onnxruntime / Pillow / Python", f"{m['onnxruntime']} / {m['pillow']} / {m['python']}"],
            ["GPU", m["gpu"]],
            ["device for the torch figures", m["device"]],
        ],
    )
    loads = [m["load_average_start"], m.get("load_average_end")] + [x.get("load_average_start") for x in r.values()]
    busy = [v[0] for v in loads if v and v[0] > m["usable_cores"]]
    if busy:
        out += [
            f"The machine was shared with other work during these measurements (1-minute load average up to "
            f"{max(busy):.1f} on {m['usable_cores']} cores): absolute figures are depressed and noisy, and the "
            "thread-count results reflect that contention. Compared figures come from one invocation, "
            "interleaved where possible.",
            "",
        ]
    return out


def _summary(doc: dict[str, Any]) -> list[str]:
    s = doc["summary"]
    out = ["## Summary", ""] + markdown_table(
        ["figure", "median", "min", "max", "load (1-min)", "target", "status"], _summary_rows(s)
    )
    out += [f"- `{k}` is null: {v}" for k, v in s["reasons"].items()] + ([""] if s["reasons"] else [])
    out += missed(doc) + [""]
    acc = doc["raw"].get("accuracy", {}).get("targets")
    if acc:
        out += [
            f"Real-photo accuracy and speed targets (section 7, judged there): {sum(t['met'] is True for t in acc)} "
            f"of {len(acc)} met, {sum(t['met'] is False for t in acc)} missed.",
            "",
        ]
    return out


def _runs_range(values: Sequence[float] | None, fmt: str = ".1f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}" if values else "-"


def _spread_cells(x: dict[str, Any] | None, fmt: str = ".1f") -> list[str]:
    """median, min-max and load cells of an interleave spread."""
    if not x:
        return ["n/a", "-", "-"]
    return [fmt_num(x["median"], fmt), f"{x['min']:{fmt}}-{x['max']:{fmt}}", fmt_num(x.get("load"), ".2f")]


def _raw_trunk(tp: dict[str, Any], sz: dict[str, Any], gpu: str) -> list[str]:
    out = ["## 1. Raw trunk forward (random input tensors, no decoding)", ""]
    if "grid" not in tp:
        return out + [f"Not measured: {why(tp)}", ""]
    out += [
        f"Batch {tp['batch']}, {sz['raw_batches']} timed batches after one warm-up batch; median (and range) of "
        f"{sz['reps']} repetitions interleaved with figure 2; 1-minute load average at the phase's start "
        f"{fmt_load((tp.get('load_average_start') or [])[:1])}.",
        "",
    ]
    return out + markdown_table(
        ["dtype", "memory format", "torch threads", "images/s (median)", "min-max"],
        [[g["dtype"], g["format"], g["threads"], fmt_num(g["raw"]), _runs_range(g.get("raw_all"))] for g in tp["grid"]]
        + [["GPU", "-", "-", gpu, "-"]],
    )


def _extraction_table(tp: dict[str, Any], ex: dict[str, Any], gpu: str) -> list[list[str]]:
    limit = {d: best(tp, d, "raw")["raw"] for d in ("fp32", "bf16")}
    rows = [
        [
            ("**" if g is as_fit_runs(tp, g["dtype"]) else "")
            + f"features.extract_features, {setting(g)}"
            + (" (as train.fit runs it)**" if g is as_fit_runs(tp, g["dtype"]) else ""),
            fmt_num(g["extract"]),
            _runs_range(g.get("extract_all")),
            fmt_num(g["extract"] / limit[g["dtype"]], ".2f"),
            fmt_num(g["extract"] / g["raw"], ".2f"),
        ]
        for g in extraction_rows(tp)
    ]
    if "images_per_second" in ex:
        dt = "bf16" if ex["bf16"] else "fp32"
        rows.append(
            [
                f"train.fit's feature cache over the full tree ({ex['images']:,} images, "
                f"{ex['wall_seconds'] / 60:.1f} min, load {fmt_load((ex.get('load_average_start') or [])[:1])} "
                f"at its start, {fmt_num(ex.get('load_end'), '.2f')} at its end), {dt}, as train.fit runs it",
                fmt_num(ex["images_per_second"]),
                "one run",
                fmt_num(ex["images_per_second"] / limit[dt], ".2f"),
                "-",
            ]
        )
    rows.append(["GPU", gpu, "-", gpu, gpu])
    return rows


def _extraction_pairs(tp: dict[str, Any]) -> list[str]:
    p = tp.get("pairs")
    if not p:
        return []
    raw = p["raw_setting"]
    out = [
        f"`extraction_ratio` (judged on the median): the raw bf16 trunk at figure 1's fastest raw bf16 setting "
        f"({raw['format']}, {raw['threads']} torch threads) beside extract_features as train.fit runs it (bf16, "
        f"{tp['workers']} decode workers, {tp['default_threads']} torch threads), both at train.fit's extraction "
        f"batch {p['batch']}, {p['images']} tree images per extraction; {len(p['ratio']['runs'])} repetitions "
        "interleaved (A B, B A, ...), each repetition's ratio one sample.",
        "",
    ]
    out += markdown_table(
        ["measure", "median", "min-max", "load (1-min)"],
        [
            ["raw trunk, images/s", *_spread_cells(p["raw"])],
            ["extract_features as train.fit runs it, images/s", *_spread_cells(p["extract"])],
            ["ratio per repetition (`extraction_ratio`)", *_spread_cells(p["ratio"], ".2f")],
        ],
    )
    return out


def _extraction(tp: dict[str, Any], ex: dict[str, Any], gpu: str) -> list[str]:
    out = ["## 2. Feature extraction through the data path (JPEG decode, resize, normalise, trunk)", ""]
    if "grid" not in tp:
        return out + [f"Not measured: {why(tp)}", ""]
    out += _extraction_pairs(tp)
    out += [
        f"The grid: {tp['images']} tree images per measurement, batch {tp['batch']}, {tp['workers']} decode "
        "workers; fractions are of the best raw bf16 figure of figure 1 (the hardware limit) and of the raw "
        "trunk at the same settings. extract_features runs a copy of the trunk in a layout of its own choosing "
        "(oneDNN's blocked bf16 where the CPU has bf16 units, else channels_last), so only those rows are here.",
        "",
    ]
    out += markdown_table(
        ["path", "images/s (median)", "min-max", "fraction of best raw (same dtype)", "fraction of raw (same settings)"],
        _extraction_table(tp, ex, gpu),
    )
    sw = tp["sweep"]
    out += [
        f"Decode workers and prefetch depth ({sw['dtype']}, trunk {sw['format']}, {sw['images']} images; "
        "extract_features' own steps with the prefetch depth exposed; one run each):",
        "",
    ]
    out += markdown_table(
        ["torch threads", "decode workers", "prefetch batches", "images/s"],
        [[x["torch_threads"], x["decode_workers"], x["prefetch"], fmt_num(x["images_per_second"])] for x in sw["rows"]],
    )
    per_image = 1000 / max(g["raw"] for g in tp["grid"])
    out += markdown_table(
        ["decoding a 128x128 JPEG to 64x64, 1 thread", "ms/image", "vs one image of the fastest raw trunk"],
        [
            [label, fmt_num(tp["decode_ms"][k], ".2f"), fmt_num(tp["decode_ms"][k] / per_image, ".1%")]
            for k, label in (("draft", "images.load_rgb (Image.draft DCT scaling)"), ("no_draft", "full decode, then resize"))
        ],
    )
    return out + extraction_findings(tp) + [""]


def _giga(x: dict[str, Any]) -> dict[str, Any]:
    return {**x, **{k: x[k] / 1e9 for k in ("median", "min", "max")}}


def _training_rows(doc: dict[str, Any], gpu: str) -> list[list[str]]:
    s, r, epochs = doc["summary"], doc["raw"], doc["epochs"]
    ex, tr, st = (r.get(k, {}) for k in ("extract", "train", "steps"))
    p, done = st["pairs"], tr.get("epochs_measured", 1)
    setting_ = f"batch {st['batch']}, {'bf16' if st['bf16'] else 'fp32'}, {st['threads']} torch threads"
    rows = [
        [
            "cached epoch, s (train_one_epoch over every train image, then validate)",
            *_spread_cells(p["cached_epoch_seconds"]),
            f"{p['reps']} repetitions interleaved with the naive epoch; {tr['train_images']:,} train + "
            f"{tr['val_images']:,} val images; the library's defaults ({setting_})",
        ],
        [
            "naive epoch, s (`--no-cache`: decode + trunk every epoch)",
            *_spread_cells(p["naive_epoch_seconds"]),
            f"extrapolated from {st['timed_images']} train and as many val images per repetition (a new slice "
            "each time), through the --no-cache path at the same settings",
        ],
        [
            "speedup (`train_speedup_vs_naive`)",
            *_spread_cells(p["speedup"]),
            "naive / cached of each repetition; the median is judged",
        ],
        [
            "train.fit epochs, s (train + validation)",
            *_spread_cells(tr.get("epochs")),
            f"{done} real train.fit epochs at its defaults ({setting_}); the naive median over their median: "
            f"{fmt_num(s.get('train_speedup_fit_epochs'))}x",
        ],
        [
            "train steps, cached / naive, img/s",
            f"{fmt_num(st['cached']['train_images_per_second'])} / {fmt_num(st['naive']['train_images_per_second'])}",
            "-",
            "-",
            "train_one_epoch; medians of the repetitions",
        ],
        [
            "validation, cached / naive, img/s",
            f"{fmt_num(st['cached']['val_images_per_second'])} / {fmt_num(st['naive']['val_images_per_second'])}",
            "-",
            "-",
            "train.loop.validate (cached features in batches of 4096)",
        ],
        [
            "checkpoint writes per epoch, s",
            f"{tr['checkpoint_seconds']:.1f}",
            "one run",
            "-",
            f"{tr['checkpoint_mb']:.0f} MB: model, last, train_state",
        ],
        [
            "full run, min (`full_run_minutes`)",
            *_spread_cells(s.get("spread", {}).get("full_run_minutes")),
            f"extraction {ex.get('wall_seconds', math.nan) / 60:.1f} min measured + train.fit with {done} epochs "
            f"{tr['fit_wall_seconds'] / 60:.1f} min measured + {epochs - done} x (epoch + checkpoint writes) at the "
            "median train.fit epoch (min and max: at its fastest and slowest epoch)",
        ],
        ["GPU", gpu, "-", "-", gpu],
    ]
    if not tr["cache_hit"]:
        rows.append(["warning", "train.fit missed the cache", "-", "-", "its wall time includes a second extraction"])
    return rows


def _head_step(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    peak, variants = h["peak"], h["variants"]
    default = next((v for v in variants if v["default"]), None)
    fastest = max(variants, key=lambda v: v["images_per_second"]["median"])
    out = [
        f"Head step variants: every row and every matmul below interleaved over {h['reps']} repetitions (the "
        f"order reversed every other one), {h['images']} images per measurement after a one-batch warm-up, "
        "through the library's own train_one_epoch and Step on the cached features. FLOP/s: images/s x "
        f"{variants[0]['flops_per_image'] / 1e6:.0f} MFLOP per image (forward and backward matmuls, as "
        "torch.utils.flop_counter counts them); fractions are of the best matmul median of this run "
        f"({peak['flops_per_second'] / 1e9:.1f} GFLOP/s, {peak['name']}; best single run "
        f"{peak['best_run'] / 1e9:.1f}) and of the best matmul median of the row's own dtype.",
        "",
    ]
    rows = [
        [
            ("**" if v["default"] else "")
            + v["name"]
            + (" (the default)**" if v["default"] else "")
            + (" (fastest)" if v is fastest else ""),
            *_spread_cells(v["images_per_second"]),
            fmt_num(v["flops_per_second"] / 1e9),
            fmt_num(v["fraction_of_peak"], ".2f"),
            fmt_num(v["fraction_of_dtype_peak"], ".2f"),
        ]
        for v in variants
    ]
    out += markdown_table(
        [
            "head step (precision, batch, torch threads, Adam)",
            "images/s (median)",
            "min-max",
            "load (1-min)",
            "GFLOP/s",
            "fraction of matmul peak",
            "fraction of same-dtype peak",
        ],
        rows,
    )
    out += markdown_table(
        ["matmul (torch.mm)", "GFLOP/s (median)", "min-max", "load (1-min)"],
        [[g["name"], *_spread_cells(_giga(g["flops_per_second"]))] for g in h["gemm"]],
    )
    return out + head_findings(h, default, fastest) + [""]


def _training(doc: dict[str, Any], gpu: str) -> list[str]:
    tr, st = doc["raw"].get("train", {}), doc["raw"].get("steps", {})
    out = ["## 3. Head training: cached features vs per-epoch trunk recomputation", ""]
    if "epoch_seconds" in tr and "pairs" in st:
        out += markdown_table(["measure", "median", "min-max", "load (1-min)", "how"], _training_rows(doc, gpu))
        return out + _head_step(st.get("head"))
    return out + [f"Not measured: {why(tr, st)}", ""]


def _backends(inf: dict[str, Any], gpu: str) -> list[str]:
    out = ["## 4. Inference backends (normalised input tensors to p_male and age)", ""]
    if "backends" not in inf:
        return out + [f"Not measured: {why(inf)}", ""]
    lo, hi = inf["p_male_range"]
    out += [
        f"The model trained in figure 3 (generated trunk, one epoch of head). Agreement: the share of "
        f"{inf['eval_images']} photos whose gender decision (p_male >= 0.5) matches PyTorch fp32; max |dp|: the "
        f"largest p_male difference. p_male spans {lo:.3f}-{hi:.3f} here, so agreement is only as telling as that "
        f"spread. int8: onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, calibrated on "
        f"{inf['calibration_images']} other photos. ONNX files: fp32 {inf['onnx_mb']['fp32']:.0f} MB, "
        f"int8 {inf['onnx_mb']['int8']:.0f} MB.",
        "",
    ]
    out += markdown_table(
        [
            "backend",
            "batch 1 latency (ms)",
            "batch 32 latency (ms)",
            "batch 32 images/s",
            "agreement vs fp32",
            "max abs dp",
            "gender accuracy (labels)",
        ],
        [
            [
                k,
                fmt_num(x["batch1_latency_ms"]),
                fmt_num(x["batch32_latency_ms"]),
                fmt_num(x["batch32_images_per_second"]),
                fmt_num(x["agreement_vs_fp32"], ".3f"),
                fmt_num(x["max_abs_dp_vs_fp32"], ".2g"),
                fmt_num(x.get("accuracy"), ".3f"),
            ]
            for k, x in inf["backends"].items()
        ]
        + [["GPU (PyTorch)", gpu, gpu, gpu, gpu, gpu, gpu]],
    )
    backends = inf["backends"]
    fp32_acc, int8_acc = (backends.get(k, {}).get("accuracy") for k in ("PyTorch fp32", "ONNX Runtime int8 static QDQ (CPU)"))
    if fp32_acc is not None and int8_acc is not None:
        gap = 100 * (int8_acc - fp32_acc)
        out += [
            f"int8 against the {inf['labelled_images']} photos' gender labels: {100 * int8_acc:.1f}% vs "
            f"{100 * fp32_acc:.1f}% for fp32 ({gap:+.1f} points: "
            f"{'within' if abs(gap) <= 0.5 else 'outside'} the 0.5-point bound). The trunk is generated, not "
            "VGG-Face: rerun with the real weights before trusting int8.",
            "",
        ]
    return out


def _predict_rows(pr: dict[str, Any], peer: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [
            f"agegender Predictor.predict_many, {label}, batch 32",
            x.get("images", "-"),
            fmt_num(x.get("images_per_second")),
            x.get("faces", "-"),
            fmt_num(peer_ratio(x, peer), ".2f") if "error" not in x else x["error"],
        ]
        for label, x in pr.get("models", {}).items()
    ]
    if not rows:
        rows = [["agegender Predictor.predict_many", "-", "n/a", "-", why(pr)]]
    runs = " and ".join(f"{x:.1f}" for x in peer.get("runs_images_per_second", []))
    rows.append(
        [
            f"{PEER} {peer.get('version', '')} (dlib HOG + 5 landmarks, ONNX Runtime; its own venv, one image "
            f"per call{f'; mean of a run before ours and one after: {runs}' if runs else ''})",
            peer.get("images", "-"),
            fmt_num(peer.get("images_per_second")),
            peer.get("faces", "-"),
            "1.00" if "images_per_second" in peer else why(peer),
        ]
    )
    return rows


def _predict(doc: dict[str, Any]) -> list[str]:
    pr, peer = doc["raw"].get("predict", {}), doc["raw"].get("peer", {})
    out = [
        "## 5. `predict` end to end (decode, detect, crop, classify) beside the peer",
        "",
        f"{doc['predict_set']}: the same files for every row, each after a 4-image warm-up, on the CPU. "
        "Ratios are images/s over the peer's.",
        "",
    ]
    out += markdown_table(["tool", "images", "images/s", "faces found", "ratio vs peer"], _predict_rows(pr, peer))
    if "detect_crop_ms" in pr:
        cap = pr["workers"] * 1000 / pr["detect_crop_ms"]
        peer_ms = (
            f"; the peer's whole pipeline takes {1000 / peer['images_per_second']:.1f} ms/image"
            if "images_per_second" in peer
            else ""
        )
        out += [
            f"`predict_ratio_vs_peer` is the first row (what `agegender predict --model model.safetensors` "
            f"runs). Where the time goes: decode + {pr.get('detector', 'face')} detection + crop alone take "
            f"{pr['detect_crop_ms']:.1f} ms/image on one core{peer_ms}. Predictor runs them and the "
            f"classifier's batches as tasks on {pr['workers']} threads, one core each, so finding faces alone "
            f"would cap it at about {cap:.0f} images/s (figure 4 gives the classifier's cost). The peer's "
            "detector, dlib's HOG without upsampling, only finds faces of 80 px and more; the `--min-face 80` "
            "row searches the same sizes.",
            "",
        ]
    return out


def _memory(r: dict[str, Any]) -> list[str]:
    phases = (
        ("feature extraction, full tree (counts for `peak_rss_gib`)", "extract"),
        ("training: train.fit epochs on the cache (counts for `peak_rss_gib`)", "train"),
        ("cached/naive epochs and head-step variants", "steps"),
        ("inference backends", "inference"),
        ("`predict`", "predict"),
        ("figures 1-2 grid and sweep", "throughput"),
        ("figure 7: real-photo accuracy and speed", "accuracy"),
    )
    return ["## 6. Peak memory (VmHWM of each phase's own process)", ""] + markdown_table(
        ["phase", "peak RSS (GiB)", "load average at its start"],
        [
            [label, fmt_num(r.get(k, {}).get("peak_rss_gib"), ".2f"), fmt_load(r.get(k, {}).get("load_average_start"))]
            for label, k in phases
        ],
    )


def _status(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "missed"


def _figure_rows(part: dict[str, Any], keys: Sequence[str]) -> list[list[str]]:
    """One row per figure: ours and the peer's, mean ± sd over the seeds, and each seed's."""
    from .accuracy import FIGURES, fmt_spread

    rows = []
    for key, label, fmt in FIGURES:
        ours, peer = part.get("ours", {}).get(key), part.get("peer", {}).get(key)
        if key not in keys or ours is None:
            continue
        seeds = " / ".join(format(v, fmt) for v in ours["runs"])
        peer_seeds = " / ".join(format(v, fmt) for v in peer["runs"]) if peer else "-"
        rows.append(
            [label, fmt_spread(ours, fmt), fmt_spread(peer, fmt) if peer else part.get("peer_error") or "n/a", seeds, peer_seeds]
        )
    return rows


def _run_rows(a: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, part in (("all sets, test split", a["mixed"]), (f"{a['held_out']['set']} held out", a["held_out"])):
        for x in part["runs"]:
            peer = x.get("peer", {})
            rows.append(
                [
                    name,
                    x["seed"],
                    f"{x['train_images']:,}",
                    f"{x['test_images']:,} ({x['ours']['utkface_images']:,} UTKFace)",
                    f"{x['ours']['no_face']} / {peer.get('no_face', '-')}",
                    f"{x['ours']['unscored']} / {peer.get('unscored', '-')}",
                    f"{x['fit_seconds']:.0f}" + (f" + {x['eval_seconds']:.0f} evaluating" if "eval_seconds" in x else ""),
                    x["features"],
                ]
            )
    return rows


def _speed_rows(sp: dict[str, Any]) -> list[list[str]]:
    d = sp.get("descriptor", {})
    if "ratio" not in d:
        return [["descriptor vs dlib-bin", "-", "n/a", "n/a", d.get("error", "not measured")]]
    rows = [
        [
            f"descriptor: PyTorch port as deployed ({d['torch_dtype']}, {d['torch_threads']} threads) vs "
            "dlib-bin compute_face_descriptor (1 thread), same LFW chips",
            d["images"],
            fmt_num(d["torch_images_per_s"]),
            fmt_num(d["dlib_images_per_s"]),
            fmt_num(d["ratio"], ".1f"),
        ]
    ]
    return rows + [
        [
            f"descriptor: PyTorch port, {k.split('_')[1]}, 1 thread (like for like)",
            d["images"],
            fmt_num(d[f"{k}_images_per_s"]),
            fmt_num(d["dlib_images_per_s"]),
            fmt_num(d[f"{k}_ratio"], ".1f"),
        ]
        for k in ("torch_bf16_1t", "torch_fp32_1t")
        if f"{k}_ratio" in d
    ]


def _accuracy_intro(a: dict[str, Any]) -> list[str]:
    photos = ", ".join(f"{n} {k:,}" for n, k in a["sets"].items())
    sub = (
        f"**Subsampled** (each run trains and tests on a seeded sample of {a['subsample']:,} photos of its sets "
        "together, FairFace held out is scored whole; models trained on so few photos say little, so read the "
        "targets as a check of the machinery). The sets: "
        if a.get("subsample")
        else "Every photo of each folder: "
    )
    bank = a.get("feature_extraction", {}).values()
    extraction = sum(x["seconds"] for x in bank)
    how = (
        "loaded from the feature cache an earlier run left in --work"
        if bank and all(x["from_cache"] for x in bank)
        else "extracted"
    )
    seeds = ", ".join(map(str, a["seeds"]))
    return [
        f"{sub}{photos}. Model: the bundled model's own recipe (`recipes.bundled_model.recipe_configs`: "
        "`agegender train --backbone dlib-resnet --alignment landmarks5`, default preset, split by identity, then "
        "`--tune-levels 2 --start-from` that run: dlib's last two levels fine-tuned with the head), "
        f"trained once per split seed ({seeds}) twice over: on every set together, scored on that seed's test split "
        "(people it never saw; UTKFace has no person ids, so each photo counts as a person), and on every set but "
        f"{a['held_out']['set']}, scored on all of {a['held_out']['set']}. Each figure is the mean ± sd over the seeds "
        "(per seed after it); the targets are judged on the mean. UTKFace is both its folders; adults 18+, minors "
        "under 18; the 60+ bias is the mean of predicted minus true age over the photos aged 60 and over.",
        "",
        f"The peer, {PEER} {a.get('peer_version') or ''} (dlib HOG detector without upsampling, 5 landmarks, ONNX "
        f"nets), predicted every scored photo once ({a['scored_photos']:,} photos, the union of the test splits and "
        f"{a['held_out']['set']}, whose peer figures are thus the same for every seed), photo by photo, beside our "
        "training; where it found several faces, its subject is "
        "the face agegender's own rule would pick (area x centrality). Scoring, the same for both tools: "
        f"{a['no_face_rule']} 'no face' counts photos in which the tool's own detector found none (ours: RetinaFace "
        "as evaluation runs it, 20 px floor). FairFace labels age groups only: its 'age-group hit' is the share of "
        "predicted ages inside the labelled group.",
        "",
        f"Features: each set's were {how} ({extraction / 60:.1f} min) into one bank every run trained from. "
        f"The accuracy part took {a['accuracy_minutes']:.1f} min, the whole phase {a['wall_minutes']:.1f} min "
        f"(1-minute load average at its start: {fmt_load((a.get('load_average_start') or [])[:1])}), with "
        f"OMP_WAIT_POLICY={a['omp_wait_policy']} (benchmarks.phases.PHASE_ENV). predict against the peer is "
        "measured in section 8, on the shipped model.",
        "",
    ]


def _accuracy(a: dict[str, Any]) -> list[str]:
    out = ["## 7. Real labelled photos: issue 20's figures for the bundled recipe, beside the peer", ""]
    if "targets" not in a:
        return out + [f"Not measured: {why(a)}", ""]
    from .accuracy import FIGURES

    out += _accuracy_intro(a)
    out += markdown_table(
        ["target", "measured: ours (peer), mean ± sd", "status"],
        [[t["target"], t["value"], _status(t["met"])] for t in a["targets"]],
    )
    out += accuracy_findings(a)
    head = ["figure", "ours", PEER, "ours by seed", f"{PEER} by seed"]
    mixed, held = a["mixed"], a["held_out"]
    out += [f"Trained on {' + '.join(mixed['trained_on'])}, scored on each seed's test split:", ""]
    out += markdown_table(head, _figure_rows(mixed, [k for k, _, _ in FIGURES]))
    out += [f"Trained on {' + '.join(held['trained_on'])}, scored on every {held['set']} photo:", ""]
    out += markdown_table(head, _figure_rows(held, ("gender", "gender_no_face_wrong", "fairface_group_hit")))
    out += markdown_table(
        [
            "run",
            "seed",
            "train photos",
            "scored photos",
            "no face (ours / peer)",
            "unscored (ours / peer)",
            "seconds",
            "features",
        ],
        _run_rows(a),
    )
    out += ["Speed: the descriptor, interleaved runs (medians), including turning uint8 chips into the network's input.", ""]
    return out + markdown_table(
        ["comparison", "photos", "agegender (images/s)", "dlib-bin (images/s)", "ratio"], _speed_rows(a["speed"])
    )


def render_markdown(doc: dict[str, Any]) -> str:
    """BENCHMARKS.md from the bench.json document."""
    r, gpu = doc["raw"], _gpu_cell(doc["machine"])
    tp, ex = r.get("throughput", {}), r.get("extract", {})
    out = _header(doc) + _machine(doc) + _summary(doc)
    out += _raw_trunk(tp, doc["sizes"], gpu)
    out += _extraction(tp, ex, gpu)
    out += _training(doc, gpu)
    out += _backends(r.get("inference", {}), gpu)
    out += _predict(doc)
    out += _memory(r)
    out += _accuracy(r.get("accuracy", {}))
    return "\n".join(out).rstrip() + "\n"
