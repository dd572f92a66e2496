"""The head study behind issue 20's table: age-label variants, best-epoch rules and test-time flip, on the bundled
model's frozen features, over several identity split seeds.

    python -m recipes.head_study --faces ../shared/faces --work WORK [--seeds 0 1 2] [--variants base last ...]

Features come through the library's feature cache (``WORK/cache``; the trunk runs once per photo, and once more
on the mirrored chips for the flip rows), so a rerun trains heads only. Each variant trains the bundled recipe's
head (dlib-resnet, landmarks5 chips, hidden 512 512, DEX over the trained age range, Adam at 2e-3, batch 512, 25
epochs) on a seed's train split, keeps an epoch by the variant's rule on its val split, and is scored on its test
split. Prints one JSON line per (seed, variant) and a mean +- sd table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundled_model import SETS

log = logging.getLogger("head_study")


@dataclass(frozen=True)
class Variant:
    interval: bool = False  # an age group puts the DEX mass inside the group, not on its midpoint
    sigma: float = 0.0  # > 0: a Gaussian label distribution around exact ages, in years
    reweight: bool = False  # age bands weighted by 1/sqrt(their count)
    select: str = "acc"  # the best-epoch rule: acc (gender), score (both heads), last
    flip: bool = False  # test-time flip: each face averaged with its mirror image


VARIANTS = {
    "base": Variant(),
    "score": Variant(select="score"),
    "last": Variant(select="last"),
    "interval": Variant(interval=True, select="score"),
    "ldl2": Variant(interval=True, sigma=2.0, select="score"),
    "ldl2_reweight": Variant(interval=True, sigma=2.0, reweight=True, select="score"),
    "interval_reweight": Variant(interval=True, reweight=True, select="score"),
    "flip": Variant(select="score", flip=True),
}


def features(faces: Path, work: Path, flip: bool) -> tuple[Any, Any]:
    """Every shared set as one data set, and its records' trunk features (of the mirrored chips with ``flip``)."""
    from agegender.data.features import cached_features
    from agegender.data.records import scan_all
    from agegender.faces.detect import photo_framer
    from agegender.train.config import TrainConfig
    from agegender.train.loop import build_model

    data = tuple(str(faces / s) for s in SETS)
    dataset = scan_all(list(data))
    records = list(dataset.records)
    cfg = TrainConfig.from_preset(
        "default", data=data, out=str(work / "run"), backbone="dlib-resnet", alignment="landmarks5", cache_dir=str(work / "cache")
    )
    model, pre, sha = build_model(cfg)
    framer = photo_framer(pre)
    frame: Any = framer
    if flip:

        def frame(rgb: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(framer(rgb)[:, ::-1])

        frame.key = f"{framer.key}:mirrored"
    fs = cached_features(model, records, pre, work / "cache", weights_sha256=sha, bf16=cfg.bf16, frame=frame)
    return dataset, fs


def targets(records: list[Any], ages: Any, variant: Variant) -> tuple[Any, Any, Any]:
    """Per record: the DEX target distribution, whether it has an age, and its loss weight."""
    import torch

    n, k = len(records), len(ages)
    dist, known, weight = torch.zeros(n, k), torch.zeros(n, dtype=torch.bool), torch.ones(n)
    for i, r in enumerate(records):
        if r.age is None:
            continue
        known[i] = True
        if variant.interval and r.age_interval is not None:
            lo, hi = r.age_interval
            inside = (ages >= lo) & (ages <= (hi if hi is not None else ages[-1]))
            dist[i, inside] = 1.0 / inside.sum()
        elif variant.sigma > 0:
            w = torch.exp(-0.5 * ((ages - r.age) / variant.sigma) ** 2)
            dist[i] = w / w.sum()
        else:
            dist[i, int(min(max(round(r.age), ages[0]), ages[-1]) - ages[0])] = 1.0
    if variant.reweight:
        band = torch.tensor([min(9, (r.age or 30) // 10) for r in records])
        counts = torch.bincount(band[known], minlength=10).float().clamp(min=1)
        weight = 1 / counts[band].sqrt()
        weight = weight / weight[known].mean()
    return dist, known, weight


def fit_head(x: Any, records: list[Any], train: Any, val: Any, variant: Variant, seed: int, epochs: int = 25) -> Any:
    """The bundled recipe's head on cached features, the epoch kept by ``variant.select``."""
    import torch
    import torch.nn.functional as F

    from agegender.model.config import ModelConfig
    from agegender.model.net import AgeGenderNet
    from agegender.train.loop import epoch_score

    torch.manual_seed(seed)
    lo, hi = 1, max(116, *(r.age or 0 for r in records))
    ages = torch.arange(lo, hi + 1, dtype=torch.float32)
    net = AgeGenderNet(
        ModelConfig(
            backbone="dlib-resnet",
            widths=(32, 64, 128, 256, 256),
            image_size=150,
            feature_layer="pooled",
            hidden=(512, 512),
            dropout=(0.5, 0.5),
            feature_bn=True,
            age_head="dex",
            age_min=lo,
            age_max=hi,
        )
    )
    opt = torch.optim.Adam([p for n, p in net.named_parameters() if not n.startswith("trunk.")], lr=2e-3, weight_decay=1e-4)
    gender = torch.tensor([float(r.gender) for r in records])
    dist, known, weight = targets(records, ages, variant)
    exact = torch.tensor([r.age is not None and r.age_interval is None for r in records])
    true_age = torch.tensor([math.nan if r.age is None else float(r.age) for r in records])
    order_gen = torch.Generator().manual_seed(seed)
    best: tuple[float, ...] | None = None
    state: dict[str, Any] = {}
    for epoch in range(1, epochs + 1):
        net.train()
        order = train[torch.randperm(len(train), generator=order_gen)]
        for start in range(0, len(train), 512):
            chunk = order[start : start + 512]
            if len(chunk) < 2:
                continue
            out = net.forward_head(x[chunk])
            loss = F.binary_cross_entropy_with_logits(out.gender_logit, gender[chunk])
            m = known[chunk]
            if m.any():
                logp = F.log_softmax(out.age_logits[m], -1)
                loss = loss + (-(dist[chunk][m] * logp).sum(-1) * weight[chunk][m]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            out = net.forward_head(x[val])
            acc = float(((torch.sigmoid(out.gender_logit) >= 0.5) == (gender[val] > 0.5)).float().mean())
            vloss = float(F.binary_cross_entropy_with_logits(out.gender_logit, gender[val]))
            age = (F.softmax(out.age_logits, -1) * ages).sum(-1)
            e = exact[val]
            mae = float((age[e] - true_age[val][e]).abs().mean()) if e.any() else 0.0
        rank = {
            "acc": (acc, -vloss),
            "score": (epoch_score({"val_accuracy": acc, "val_age_mae": mae}), -vloss),
            "last": (float(epoch),),
        }[variant.select]
        if best is None or rank > best:
            best, state = rank, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    return net.eval(), ages


def score(net: Any, ages: Any, x: Any, x_flip: Any | None, records: list[Any], test: Any) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out = net.forward_head(x[test])
        logit, probs = out.gender_logit, F.softmax(out.age_logits, -1)
        if x_flip is not None:
            mirrored = net.forward_head(x_flip[test])
            logit, probs = (logit + mirrored.gender_logit) / 2, (probs + F.softmax(mirrored.age_logits, -1)) / 2
    p, age = torch.sigmoid(logit).numpy(), (probs * ages).sum(-1).numpy()
    rs = [records[i] for i in test.tolist()]
    hit = (p >= 0.5) == np.array([r.gender == 1 for r in rs])
    exact = np.array([r.age is not None and r.age_interval is None for r in rs])
    true = np.array([np.nan if r.age is None else r.age for r in rs], dtype=float)
    grouped = np.array([r.age_interval is not None for r in rs])
    inside = np.array(
        [
            r.age_interval is not None and r.age_interval[0] <= a < (r.age_interval[1] or 200) + 1
            for r, a in zip(rs, age, strict=True)
        ]
    )
    return {
        "gender": float(hit.mean()),
        "adults": float(hit[exact & (true >= 18)].mean()),
        "minors": float(hit[exact & (true < 18)].mean()),
        "mae": float(np.abs(age - true)[exact].mean()),
        "bias60": float((age - true)[exact & (true >= 60)].mean()),
        "group": float(inside[grouped].mean()) if grouped.any() else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from agegender.data.splits import make_splits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="the feature cache goes to WORK/cache")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset, fs = features(a.faces, a.work, flip=False)
    records = list(dataset.records)
    flipped = features(a.faces, a.work, flip=True)[1] if any(VARIANTS[v].flip for v in a.variants) else None
    ok = fs.ok & (flipped.ok if flipped is not None else fs.ok)
    row = {str(r.path): i for i, r in enumerate(records)}
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in a.variants}
    for seed in a.seeds:
        splits = make_splits(dataset, "identity", seed)
        idx = {k: torch.tensor([row[str(r.path)] for r in splits[k] if ok[row[str(r.path)]]]) for k in ("train", "val", "test")}
        for name in a.variants:
            v = VARIANTS[name]
            net, ages = fit_head(fs.features, records, idx["train"], idx["val"], v, seed)
            got = score(
                net, ages, fs.features, flipped.features if v.flip and flipped is not None else None, records, idx["test"]
            )
            rows[name].append(got)
            print(json.dumps({"seed": seed, "variant": name, **{k: round(x, 4) for k, x in got.items()}}), flush=True)
    print_table(rows, ("gender", "adults", "minors", "mae", "bias60", "group"))
    return 0


def print_table(rows: dict[str, list[dict[str, float]]], keys: tuple[str, ...]) -> None:
    """One markdown row per variant: each figure's mean ± sd over the seeds."""
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, runs in rows.items():
        cells = [
            f"{statistics.mean(g[k] for g in runs):.4f}"
            + (f" ± {statistics.stdev(g[k] for g in runs):.4f}" if len(runs) > 1 else "")
            for k in keys
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
