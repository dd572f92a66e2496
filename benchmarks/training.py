"""Figures 3 and 6: one real `train.fit` epoch on the feature cache, and train steps cached vs naive."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .measure import sync

log = logging.getLogger(__name__)


def train_config(ctx: dict[str, Any], **overrides: Any) -> Any:
    """The default preset on the benchmark tree and weights; the trunk in bf16 when figure 1 found it faster."""
    from agegender.train.config import TrainConfig

    return TrainConfig.from_preset("default", data=ctx["tree"], weights=ctx["weights"], out=ctx["run_dir"],
                                   cache_dir=ctx["cache_dir"], precision="bf16" if ctx.get("extract_bf16") else "fp32",
                                   hidden=tuple(ctx["sizes"]["hidden"]), device=ctx["device"], progress=False,
                                   **overrides)


def fit_records(cfg: Any) -> tuple[list[Any], int, int]:
    """The records in the order ``train.fit`` uses (train + val + test), and the train and val counts."""
    from agegender.data.records import scan
    from agegender.data.splits import make_splits

    splits = make_splits(scan(cfg.data), cfg.split, cfg.seed, limit=cfg.limit)
    return splits.train + splits.val + splits.test, len(splits.train), len(splits.val)


def cached_features(model: Any, records: Any, pre: Any, sha: str | None, cfg: Any) -> Any:
    """The feature cache exactly as `train.fit` builds (or finds) it."""
    from agegender.data.features import cached_features as cached

    return cached(model, records, pre, cfg.cache_dir, weights_sha256=sha, bf16=cfg.bf16,
                  batch_size=max(cfg.batch_size, 64), workers=cfg.workers, device=cfg.device, progress=False)


def phase_extract(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 2 (full tree) and 6: the feature cache exactly as `train.fit` builds it, from empty."""
    from agegender.train.loop import build_model

    cfg = train_config(ctx)
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    model, pre, sha = build_model(cfg)
    records, _, _ = fit_records(cfg)
    start = time.perf_counter()
    fs = cached_features(model, records, pre, sha, cfg)
    return {"images": int(fs.ok.sum()), "seconds": fs.seconds, "wall_seconds": time.perf_counter() - start,
            "images_per_second": fs.images_per_second, "bf16": cfg.bf16}


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
    """Figures 3 and 6: one real `train.fit` epoch on the cache the extract phase left."""
    from agegender.data.features import cache_key
    from agegender.train.loop import build_model, fit

    cfg = train_config(ctx, epochs=1)
    shutil.rmtree(cfg.out, ignore_errors=True)
    model, pre, sha = build_model(cfg)
    records, n_train, n_val = fit_records(cfg)
    key = cache_key(model, pre, records, sha, cfg.bf16)
    cache_hit = (Path(cfg.cache_dir) / f"features-{key}.safetensors").is_file()
    del model
    start = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - start
    # fit writes these three files after every epoch; copying them once prices that per-epoch cost.
    written = [result.out / name for name in ("model.safetensors", "last.safetensors", "train_state.pt")]
    checkpoint_s = _checkpoint_seconds(written, result.out)
    return {"cache_hit": cache_hit, "epoch_seconds": result.history[0]["seconds"], "fit_wall_seconds": wall,
            "checkpoint_seconds": checkpoint_s, "checkpoint_mb": sum(f.stat().st_size for f in written) / 1e6,
            "train_images": n_train, "val_images": n_val, "history": result.history,
            "checkpoint": str(result.checkpoint)}


def _time_path(model: Any, batches: Any, labels: Any, cfg: Any, n_train: int, n_val: int, n: int) -> dict[str, float]:
    """Train-step and validation images/s through one Batches path, after a one-batch warm-up."""
    import numpy as np

    from agegender.train.evaluate import predict_batches
    from agegender.train.loop import Step, make_optimizer, train_one_epoch

    bs = cfg.batch_size
    train_idx, val_idx = np.arange(n_train), np.arange(n_train, n_train + n_val)
    opt, step = make_optimizer(model, cfg), Step(model, batches.cached)
    train_one_epoch(model, step, batches, train_idx[:bs], labels, opt, cfg, 0)  # warm-up
    sync(cfg.device)
    t0 = time.perf_counter()
    timed = train_idx[bs:bs + n] if n_train >= bs + n else train_idx[:n]
    train_one_epoch(model, step, batches, timed, labels, opt, cfg, 1)
    sync(cfg.device)
    t1 = time.perf_counter()
    m = min(n, n_val)
    predict_batches(model, batches, val_idx[:m])
    t2 = time.perf_counter()
    return {"train_images_per_second": n / (t1 - t0), "val_images_per_second": m / (t2 - t1) if m else math.nan}


def _head_step_rate(model: Any, x_all: Any, labels: Any, cfg: Any, batch: int, n: int) -> float:
    """Cached head steps per second with a fused Adam at ``batch``, built here rather than by train_one_epoch."""
    import numpy as np
    import torch

    from agegender.train.loop import loss_fn

    opt = torch.optim.Adam(list(model.trainable_parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    model.train()
    count, t0 = 0, 0.0
    for i in range(max(2, n // batch + 1)):  # step 0 is a warm-up
        chunk = np.arange(i * batch, (i + 1) * batch) % len(x_all)
        if i == 1:
            sync(cfg.device)
            t0 = time.perf_counter()
        loss = loss_fn(model.forward_head(x_all[chunk].to(cfg.device)), labels, chunk, model, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count += len(chunk) if i else 0
    sync(cfg.device)
    return count / (time.perf_counter() - t0)


def _head_variants(model: Any, features: Any, labels: Any, cfg: Any, n_train: int, n: int) -> dict[str, Any]:
    """What a faster head step would give: the same step with a fused Adam, and with 4x the batch."""
    import torch

    bs = cfg.batch_size
    x_all = features.features[torch.arange(n_train)]
    variants = {}
    threads = torch.get_num_threads()
    settings = [("fused Adam", bs, threads), ("fused Adam, batch 4x", 4 * bs, threads)]
    if threads > 1:
        settings.append((f"fused Adam, batch 4x, {threads - 1} torch thread{'s' if threads > 2 else ''}", 4 * bs,
                         threads - 1))
    for label, batch, t in settings:
        torch.set_num_threads(t)
        variants[label] = {"batch": batch, "threads": t,
                           "train_images_per_second": _head_step_rate(model, x_all, labels, cfg, batch, n)}
        log.info("head step, %s: %.1f img/s", label, variants[label]["train_images_per_second"])
    torch.set_num_threads(threads)
    return variants


def phase_steps(ctx: dict[str, Any]) -> dict[str, Any]:
    """Figure 3: train steps and validation on the cache vs the --no-cache path, on the same number of batches."""
    from agegender.data.batches import Batches, Labels
    from agegender.distributed import World
    from agegender.train.loop import build_model

    s = ctx["sizes"]
    cfg = train_config(ctx)
    model, pre, sha = build_model(cfg)
    records, n_train, n_val = fit_records(cfg)
    labels = Labels.of(records)
    features = cached_features(model, records, pre, sha, cfg)
    world = World(device=cfg.device)
    # The naive path is what `--no-cache` trains on: no features, images decoded batch by batch.
    paths = {"cached": Batches(records, pre, cfg.batch_size, cfg.workers, features, world),
             "naive": Batches(records, pre, cfg.batch_size, cfg.workers, None, world)}
    n = min(s["step_batches"] * cfg.batch_size, n_train)
    out: dict[str, Any] = {"batch": cfg.batch_size, "train_images": n_train, "val_images": n_val, "timed_images": n,
                           "cache_hit": features.cached}
    for name, batches in paths.items():
        out[name] = _time_path(model, batches, labels, cfg, n_train, n_val, n)
        log.info("%s: train %.1f img/s, validation %.1f img/s", name, *out[name].values())
    out["variants"] = _head_variants(model, features, labels, cfg, n_train, n)
    return out
