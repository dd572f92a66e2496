"""Figures 1 and 2: the raw trunk on random tensors beside feature extraction through the data path (a grid of
settings, then the headline pair interleaved), the decode workers / prefetch sweep, and the cost of decoding one
image."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .interleave import interleave, ratio
from .measure import autocast, median, set_memory_format, sync
from .report import fmt_num
from .training import fit_records, train_config

log = logging.getLogger(__name__)

Setting = tuple[str, str, int]  # dtype, memory format, torch threads


def raw_trunk(model: Any, batch: int, batches: int, bf16: bool, device: str, layout: str = "") -> float:
    """Trunk images/s on random input tensors (no decoding), one warm-up batch excluded. ``layout`` "onednn":
    the trunk as extract_features runs it in bf16 (model.net.feature_extractor); else forward_features in the
    model's memory format, under autocast when ``bf16``."""
    import torch

    from agegender.model.net import feature_extractor

    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    forward = feature_extractor(model, bf16, device) if layout == "onednn" else model.forward_features
    with torch.no_grad(), autocast(device, bf16 and layout != "onednn"):
        forward(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            forward(x)
        sync(device)
    return batch * batches / (time.perf_counter() - start)


def extract_loop(
    model: Any, records: Sequence[Any], pre: Any, batch: int, workers: int, prefetch: int, bf16: bool, device: str
) -> float:
    """extract_features' own steps (iter_batches -> normalize -> trunk), with the prefetch depth exposed."""
    import torch

    from agegender.data.batches import iter_batches
    from agegender.model.net import feature_extractor

    forward = feature_extractor(model, bf16, device)
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        for idx, images in iter_batches(records, model.config.image_size, batch, workers, prefetch):
            forward(pre.normalize(images, torch.channels_last)).float().cpu()
            n += len(idx)
    return n / (time.perf_counter() - start)


def decode_ms(paths: Sequence[Path], size: int, draft: bool) -> float:
    """Single-thread milliseconds per image to a ``size`` square: load_rgb (with draft) or the same without draft."""
    from agegender.images import fit_square, load_image, load_rgb

    best = math.inf
    for _ in range(2):  # the better of two passes: the first may still be reading from disk
        start = time.perf_counter()
        for p in paths:
            if draft:
                load_rgb(p, size)
            else:
                fit_square(load_image(p), size)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(paths)


def _grid(
    model: Any, pre: Any, sample: Sequence[Any], s: dict[str, Any], workers: int, device: str, threads: int
) -> list[dict[str, Any]]:
    """Raw trunk and extract_features per dtype, memory format and torch thread count, interleaved over reps."""
    import torch

    from agegender.data.features import extract_features
    from agegender.model.net import inference_layout

    counts = dict.fromkeys((threads, max(1, threads - 1)))
    configs: list[Setting] = [(d, f, t) for f in ("nchw", "channels_last") for d in ("fp32", "bf16") for t in counts]
    if inference_layout(model, True, device) == "onednn":
        configs += [("bf16", "onednn", t) for t in counts]
    extracts = {d: inference_layout(model, d == "bf16", device) for d in ("fp32", "bf16")}  # extract_features' own
    raw: dict[Setting, list[float]] = {c: [] for c in configs}
    ext: dict[Setting, list[float]] = {c: [] for c in configs}
    for rep in range(s["reps"]):
        for c in configs:
            dtype, fmt, t = c
            torch.set_num_threads(t)
            set_memory_format(model, fmt == "channels_last")
            bf16 = dtype == "bf16"
            raw[c].append(raw_trunk(model, s["batch"], s["raw_batches"], bf16, device, fmt))
            if fmt == extracts[dtype]:  # the layout extract_features runs this dtype in, whatever it gets
                fs = extract_features(
                    model, sample, pre, batch_size=s["batch"], workers=workers, bf16=bf16, device=device, progress=False
                )
                ext[c].append(fs.images_per_second)
            log.info(
                "rep %d %s %s %d threads: raw %.1f img/s, extract_features %s img/s",
                rep + 1,
                dtype,
                fmt,
                t,
                raw[c][-1],
                fmt_num(ext[c][-1] if ext[c] else None),
            )
    return [
        {
            "dtype": d,
            "format": f,
            "threads": t,
            "raw": median(raw[(d, f, t)]),
            "extract": median(ext[(d, f, t)]) if ext[(d, f, t)] else None,
            "raw_all": raw[(d, f, t)],
            "extract_all": ext[(d, f, t)],
        }
        for d, f, t in configs
    ]


def _sweep(
    model: Any, pre: Any, records: Sequence[Any], batch: int, workers: int, bf16: bool, device: str, threads: int
) -> list[dict[str, Any]]:
    """Extraction images/s over torch threads x decode workers, then the prefetch depth at the best of those."""
    import torch

    rows: list[dict[str, Any]] = []

    def measure(t: int, w: int, prefetch: int) -> None:
        torch.set_num_threads(t)
        rate = extract_loop(model, records, pre, batch, w, prefetch, bf16, device)
        rows.append({"torch_threads": t, "decode_workers": w, "prefetch": prefetch, "images_per_second": rate})
        log.info("sweep threads=%d workers=%d prefetch=%d: %.1f img/s", t, w, prefetch, rate)

    for t in dict.fromkeys((threads, max(1, threads - 1))):
        for w in dict.fromkeys((workers, 1, 2 * workers)):
            measure(t, w, 2)
    top = max(rows, key=lambda r: r["images_per_second"])
    for prefetch in (0, 4):
        measure(top["torch_threads"], top["decode_workers"], prefetch)
    torch.set_num_threads(threads)
    return rows


def _pairs(
    model: Any,
    pre: Any,
    sample: Sequence[Any],
    best: dict[str, Any],
    batch: int,
    s: dict[str, Any],
    workers: int,
    device: str,
    threads: int,
) -> dict[str, Any]:
    """The headline comparison, interleaved ``pairs`` times (A B, B A, ...): the raw bf16 trunk at the grid's
    fastest raw setting beside extract_features as train.fit runs it (bf16, its batch, its decode workers, the
    default thread count), both at train.fit's extraction batch; each repetition's ratio is one sample."""
    import torch

    from agegender.data.features import extract_features

    def raw() -> float:
        torch.set_num_threads(best["threads"])
        set_memory_format(model, best["format"] == "channels_last")
        return raw_trunk(model, batch, s["raw_batches"], True, device, best["format"])

    def extract() -> float:
        torch.set_num_threads(threads)
        return extract_features(
            model, sample, pre, batch_size=batch, workers=workers, bf16=True, device=device, progress=False
        ).images_per_second

    res = interleave({"raw": raw, "extract": extract}, s["pairs"], "raw vs extraction")
    torch.set_num_threads(threads)
    return {
        "batch": batch,
        "images": len(sample),
        "raw_setting": {k: best[k] for k in ("dtype", "format", "threads")},
        "raw": res["raw"],
        "extract": res["extract"],
        "ratio": ratio(res["extract"], res["raw"]),
    }


def phase_throughput(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figures 1 and 2: raw trunk vs extract_features per dtype, memory format and torch thread count,
    interleaved over repetitions; then the decode workers / prefetch sweep and the decode cost."""
    import numpy as np
    import torch

    from agegender.train.loop import build_model

    s, device = ctx["sizes"], ctx["device"]
    cfg = train_config(ctx)
    model, pre, _ = build_model(cfg)
    model.eval()
    records, _, _ = fit_records(cfg)
    rng = np.random.default_rng(0)
    sample = [records[i] for i in rng.choice(len(records), min(s["extract_images"], len(records)), replace=False)]
    threads = torch.get_num_threads()
    grid = _grid(model, pre, sample, s, cfg.workers, device, threads)
    out: dict[str, Any] = {
        "grid": grid,
        "images": len(sample),
        "batch": s["batch"],
        "workers": cfg.workers,
        "default_threads": threads,
    }

    # The headline pair: train.fit extracts at max(batch_size, 64) (features.cached_features' caller).
    batch = max(cfg.batch_size, 64)
    pair_sample = [
        records[i] for i in rng.choice(len(records), min(max(s["extract_images"], 3 * batch), len(records)), replace=False)
    ]
    best_bf16 = max((g for g in grid if g["dtype"] == "bf16"), key=lambda g: g["raw"])
    out["pairs"] = _pairs(model, pre, pair_sample, best_bf16, batch, s, cfg.workers, device, threads)
    log.info(
        "raw vs extraction: ratio %.2f (median of %d; min %.2f, max %.2f)",
        out["pairs"]["ratio"]["median"],
        s["pairs"],
        out["pairs"]["ratio"]["min"],
        out["pairs"]["ratio"]["max"],
    )

    # The sweep keeps the fastest raw configuration's dtype and format and moves the data-path knobs.
    best = max(grid, key=lambda g: g["raw"])
    set_memory_format(model, best["format"] == "channels_last")
    sweep_records = sample[: s["sweep_images"]]
    rows = _sweep(model, pre, sweep_records, s["batch"], cfg.workers, best["dtype"] == "bf16", device, threads)
    paths = [r.path for r in sweep_records]
    out["sweep"] = {"dtype": best["dtype"], "format": best["format"], "images": len(sweep_records), "rows": rows}
    out["decode_ms"] = {
        "draft": decode_ms(paths, model.config.image_size, True),
        "no_draft": decode_ms(paths, model.config.image_size, False),
    }
    return out
