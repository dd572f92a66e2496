"""Figures 3 and 6: real `train.fit` epochs on the feature cache; cached vs naive epochs, interleaved; the head
step's variants (precision, batch, threads, Adam) interleaved with the matmul peak they are held against."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .interleave import interleave, load1, ratio, spread
from .measure import sync

log = logging.getLogger(__name__)


def train_config(ctx: dict[str, Any], **overrides: Any) -> Any:
    """The default preset on the benchmark tree and weights; the trunk in bf16 when figure 1 found it faster (the
    library's own "auto" where figure 1 did not run)."""
    from agegender.train.config import TrainConfig

    precision = {True: "bf16", False: "fp32"}.get(ctx.get("extract_bf16"), "auto")
    return TrainConfig.from_preset(
        "default",
        data=ctx["tree"],
        backbone="vgg-face",
        weights=ctx["weights"],
        out=ctx["run_dir"],
        cache_dir=ctx["cache_dir"],
        precision=precision,
        hidden=tuple(ctx["sizes"]["hidden"]),
        device=ctx["device"],
        progress=False,
        **overrides,
    )


def fit_records(cfg: Any) -> tuple[list[Any], int, int]:
    """The records in the order ``train.fit`` uses (train + val + test), and the train and val counts."""
    from agegender.train.loop import fit_splits

    _, splits = fit_splits(cfg)
    return splits.train + splits.val + splits.test, len(splits.train), len(splits.val)


def cached_features(model: Any, records: Any, pre: Any, sha: str | None, cfg: Any) -> Any:
    """The feature cache exactly as `train.fit` builds (or finds) it."""
    from agegender.data.features import cached_features as cached

    return cached(
        model,
        records,
        pre,
        cfg.cache_dir,
        weights_sha256=sha,
        bf16=cfg.bf16,
        batch_size=max(cfg.batch_size, 64),
        workers=cfg.workers,
        device=cfg.device,
        progress=False,
    )


def phase_extract(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 2 (full tree) and 6: the feature cache exactly as `train.fit` builds it, from empty."""
    from agegender.train.loop import build_model

    cfg = train_config(ctx)
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    model, pre, sha = build_model(cfg)
    records, _, _ = fit_records(cfg)
    start = time.perf_counter()
    fs = cached_features(model, records, pre, sha, cfg)
    return {
        "images": int(fs.ok.sum()),
        "seconds": fs.seconds,
        "wall_seconds": time.perf_counter() - start,
        "images_per_second": fs.images_per_second,
        "bf16": cfg.bf16,
        "load_end": load1(),
    }


def _checkpoint_seconds(written: list[Path], folder: Path) -> float:
    """Seconds to copy and fsync ``written`` once: fit writes these files after every epoch."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t0 = time.perf_counter()
        for f in written:
            shutil.copyfile(f, Path(tmp) / f.name)
            with open(Path(tmp) / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
        return time.perf_counter() - t0


def phase_train(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figures 3 and 6: real `train.fit` epochs (``fit_epochs`` of them, at the library's defaults) on the cache
    the extract phase left."""
    from agegender.train.loop import fit, train_threads

    cfg = train_config(ctx, epochs=ctx["sizes"]["fit_epochs"])
    shutil.rmtree(cfg.out, ignore_errors=True)
    _, n_train, n_val = fit_records(cfg)
    load = load1()
    start = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - start
    # fit writes these three files after every epoch; copying them once prices that per-epoch cost.
    written = [result.run.checkpoint, result.run.last, result.run.train_state]
    checkpoint_s = _checkpoint_seconds(written, result.out)
    epochs = spread([row["seconds"] for row in result.history], [load, load1()])
    return {
        "cache_hit": bool(result.features_cached),
        "epoch_seconds": epochs["median"],
        "epochs": epochs,
        "epochs_measured": len(result.history),
        "fit_wall_seconds": wall,
        "checkpoint_seconds": checkpoint_s,
        "checkpoint_mb": sum(f.stat().st_size for f in written) / 1e6,
        "train_images": n_train,
        "val_images": n_val,
        "history": result.history,
        "batch": cfg.batch_size,
        "bf16": cfg.bf16,
        "threads": train_threads(),
        "checkpoint": str(result.checkpoint),
    }


# -- cached vs naive epochs, interleaved ------------------------------------------------------
def _epoch_pairs(
    model: Any, paths: dict[str, Any], labels: Any, cfg: Any, train_idx: Any, val_idx: Any, n: int, reps: int
) -> dict[str, Any]:
    """A cached epoch exactly as train.fit runs it (every train image, then validation), and beside it the
    --no-cache epoch extrapolated from ``n`` train and ``n`` validation images through the naive path: A B, B A,
    ... ``reps`` times. Each repetition's naive/cached ratio is one speedup sample."""
    import numpy as np

    from agegender.train.loop import Step, make_optimizer, train_one_epoch, validate

    opt = make_optimizer(model, cfg)
    steps = {name: Step(model, b.cached, cfg.bf16) for name, b in paths.items()}
    for name, b in paths.items():  # warm-up: one batch on each path
        train_one_epoch(model, steps[name], b, train_idx[: cfg.batch_size], labels, opt, cfg, 0)
    parts: dict[str, dict[str, list[float]]] = {k: {"train": [], "val": []} for k in paths}
    calls = {"cached": 0, "naive": 0}

    def timed(name: str, train: Any, val: Any) -> tuple[float, float]:
        calls[name] += 1
        t0 = time.perf_counter()
        train_one_epoch(model, steps[name], paths[name], train, labels, opt, cfg, calls[name])
        sync(cfg.device)
        t1 = time.perf_counter()
        validate(model, paths[name], val, labels, cfg)
        t2 = time.perf_counter()
        parts[name]["train"].append(len(train) / (t1 - t0))
        parts[name]["val"].append(len(val) / (t2 - t1) if len(val) else float("nan"))
        return t1 - t0, t2 - t1

    def cached() -> float:
        return sum(timed("cached", train_idx, val_idx))

    def naive() -> float:
        # A different slice of images each repetition, so no repetition is helped by the one before.
        k = calls["naive"]
        train = train_idx[(k * n + np.arange(n)) % len(train_idx)]
        val = val_idx[(k * n + np.arange(min(n, len(val_idx)))) % max(len(val_idx), 1)]
        t_train, t_val = timed("naive", train, val)
        return len(train_idx) * t_train / len(train) + (len(val_idx) * t_val / len(val) if len(val) else 0.0)

    res = interleave({"cached": cached, "naive": naive}, reps, "epoch pair")
    rates = {k: {f"{part}_images_per_second": float(np.median(v)) for part, v in p.items()} for k, p in parts.items()}
    return {
        "reps": reps,
        "cached_epoch_seconds": res["cached"],
        "naive_epoch_seconds": res["naive"],
        "speedup": ratio(res["naive"], res["cached"]),
        "rates": rates,
        "rates_all": {k: p for k, p in parts.items()},
    }


# -- head-step variants and the matmul peak, interleaved --------------------------------------
def _head_rate(
    model: Any, batches: Any, labels: Any, cfg: Any, train_idx: Any, bf16: bool, threads: int, opt: Any, images: int
) -> float:
    """Cached head steps/s through the library's own train_one_epoch and Step (one warm-up batch first)."""
    import numpy as np

    from agegender.train.loop import Step, train_one_epoch

    bs = batches.batch_size
    step = Step(model, True, bf16)
    idx = np.resize(train_idx, -(-images // bs) * bs)  # whole batches only (a short one would be timed apart)
    train_one_epoch(model, step, batches, idx[:bs], labels, opt, cfg, 0, threads=threads)
    sync(cfg.device)
    t0 = time.perf_counter()
    train_one_epoch(model, step, batches, idx, labels, opt, cfg, 1, threads=threads)
    sync(cfg.device)
    return len(idx) / (time.perf_counter() - t0)


def _step_flops(model: Any, features: Any, labels: Any, cfg: Any, batch: int) -> float:
    """Floating-point operations of one head train step per image (forward and backward; matmuls, as torch's
    FlopCounterMode counts them), at ``batch``."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from agegender.model.net import Outputs
    from agegender.train.loop import Step, loss_fn

    idx = np.arange(batch) % len(features)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(Outputs(*Step(model, True, False)(features[torch.as_tensor(idx)].to(cfg.device))), labels, idx, model, cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def _gemm_rate(m: int, k: int, n: int, dtype: str, threads: int, device: str, seconds: float = 0.3) -> float:
    """FLOP/s of torch.mm at (m x k) @ (k x n): as many calls as fill ``seconds`` (at least two), after one."""
    import torch

    from agegender.process import set_process_threads

    with set_process_threads(threads, opencv=False):
        kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(m, k, device=device).to(kind), torch.randn(k, n, device=device).to(kind)
        c = torch.mm(a, b)
        sync(device)
        count, t0 = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - t0 < seconds:
            torch.mm(a, b, out=c)
            sync(device)
            count += 1
        return 2 * m * k * n * count / (time.perf_counter() - t0)


def _largest_layer(model: Any) -> tuple[int, int]:
    """(in, out) of the head's largest Linear layer: the shapes the head's matmuls run at."""
    from torch import nn

    return max(
        ((m.in_features, m.out_features) for m in model.fc.modules() if isinstance(m, nn.Linear)), key=lambda io: io[0] * io[1]
    )


def _head_variants(
    model: Any, records: Any, pre: Any, features: Any, labels: Any, cfg: Any, train_idx: Any, s: dict[str, Any]
) -> dict[str, Any]:
    """Head-step images/s for every precision x batch x thread count (fused Adam), and torch's multi-tensor Adam
    at the defaults; interleaved over ``head_reps`` repetitions with fp32 and bf16 matmuls at the head's shapes
    and at a large square size, which give the machine's matmul peak in the same run."""
    from dataclasses import replace
    from functools import partial

    from agegender.data.batches import Batches
    from agegender.distributed import World
    from agegender.train.loop import make_optimizer, train_threads

    default = {"precision": "bf16" if cfg.bf16 else "fp32", "batch": cfg.batch_size, "threads": train_threads(), "adam": "fused"}
    thread_counts = list(dict.fromkeys((1, 2, default["threads"])))
    sizes = list(dict.fromkeys((*s["head_batches"], cfg.batch_size)))
    variants = [
        {"precision": p, "batch": b, "threads": t, "adam": "fused"}
        for p in ("fp32", "bf16")
        for b in sizes
        for t in thread_counts
    ]
    variants.append({**default, "adam": "foreach"})
    opts = {"fused": make_optimizer(model, cfg), "foreach": make_optimizer(model, cfg, fused=False)}
    world = World(device=cfg.device)
    paths = {b: Batches(records, pre, b, cfg.workers, features, world) for b in sizes}
    flops = {b: _step_flops(model, features.features, labels, cfg, b) for b in sizes}
    measures = {}
    for v in variants:
        v["name"] = (
            f"{v['precision']}, batch {v['batch']}, {v['threads']} thread{'s' if v['threads'] > 1 else ''}, {v['adam']} Adam"
        )
        v["default"] = all(v[k] == default[k] for k in default)
        measures[v["name"]] = partial(
            _head_rate,
            model,
            paths[v["batch"]],
            labels,
            replace(cfg, batch_size=v["batch"]),
            train_idx,
            v["precision"] == "bf16",
            v["threads"],
            opts[v["adam"]],
            s["head_images"],
        )
    k, n = _largest_layer(model)
    square = min(2048, max(512, 2 * n))
    shapes = {
        f"head forward ({cfg.batch_size} x {k}) @ ({k} x {n})": (cfg.batch_size, k, n),
        f"head weight gradient ({k} x {cfg.batch_size}) @ ({cfg.batch_size} x {n})": (k, cfg.batch_size, n),
        f"square {square}": (square, square, square),
    }
    gemms = [
        {"shape": label, "mkn": mkn, "dtype": d, "threads": t}
        for label, mkn in shapes.items()
        for d in ("fp32", "bf16")
        for t in thread_counts
    ]
    for g in gemms:
        g["name"] = f"matmul {g['dtype']}, {g['shape']}, {g['threads']} thread{'s' if g['threads'] > 1 else ''}"
        m, kk, nn = g["mkn"]
        measures[g["name"]] = partial(_gemm_rate, m, kk, nn, g["dtype"], g["threads"], cfg.device)
    res = interleave(measures, s["head_reps"], "head step")
    for g in gemms:
        g["flops_per_second"] = res[g["name"]]
    peak = max(gemms, key=lambda g: g["flops_per_second"]["median"])
    dtype_peak = {d: max(g["flops_per_second"]["median"] for g in gemms if g["dtype"] == d) for d in ("fp32", "bf16")}
    for v in variants:
        v["images_per_second"] = res[v["name"]]
        v["flops_per_image"] = flops[v["batch"]]
        v["flops_per_second"] = v["images_per_second"]["median"] * v["flops_per_image"]
        v["fraction_of_peak"] = v["flops_per_second"] / peak["flops_per_second"]["median"]
        v["fraction_of_dtype_peak"] = v["flops_per_second"] / dtype_peak[v["precision"]]
    return {
        "variants": variants,
        "gemm": gemms,
        "default": default,
        "reps": s["head_reps"],
        "images": s["head_images"],
        "peak": {
            "name": peak["name"],
            "flops_per_second": peak["flops_per_second"]["median"],
            "best_run": max(max(g["flops_per_second"]["runs"]) for g in gemms),
            "by_dtype": dtype_peak,
        },
    }


def phase_steps(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 3: cached vs naive epochs interleaved, then the head step's variants against the matmul peak."""
    import numpy as np

    from agegender.data.batches import Batches, Labels
    from agegender.distributed import World
    from agegender.train.loop import build_model, train_threads

    s = ctx["sizes"]
    cfg = train_config(ctx)
    model, pre, sha = build_model(cfg)
    records, n_train, n_val = fit_records(cfg)
    labels = Labels.of(records)
    features = cached_features(model, records, pre, sha, cfg)
    world = World(device=cfg.device)
    # The naive path is what `--no-cache` trains on: no features, images decoded batch by batch.
    paths = {
        "cached": Batches(records, pre, cfg.batch_size, cfg.workers, features, world),
        "naive": Batches(records, pre, cfg.batch_size, cfg.workers, None, world),
    }
    train_idx = np.intersect1d(np.arange(n_train), paths["cached"].valid)
    val_idx = np.arange(n_train, n_train + n_val)
    # About step_batches x 128 naive images a side, in whole batches of the default size.
    n = min(max(1, round(s["step_batches"] * 128 / cfg.batch_size)) * cfg.batch_size, len(train_idx))
    pairs = _epoch_pairs(model, paths, labels, cfg, train_idx, val_idx, n, s["epoch_pairs"])
    log.info(
        "epoch pairs: cached %.1f s, naive %.1f s, speedup %.1fx (median of %d)",
        pairs["cached_epoch_seconds"]["median"],
        pairs["naive_epoch_seconds"]["median"],
        pairs["speedup"]["median"],
        s["epoch_pairs"],
    )
    out: dict[str, Any] = {
        "batch": cfg.batch_size,
        "bf16": cfg.bf16,
        "threads": train_threads(),
        "train_images": n_train,
        "val_images": n_val,
        "timed_images": n,
        "cache_hit": features.cached,
        "pairs": pairs,
        **pairs["rates"],
    }
    out["head"] = _head_variants(model, records, pre, features, labels, cfg, train_idx, s)
    return out
