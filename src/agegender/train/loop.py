"""Training: presets, one epoch, validation, self-describing checkpoints, resume. Reads top to bottom."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Batches, Labels
from ..data.features import FeatureSet, cached_features
from ..data.records import FaceRecord, scan_all
from ..data.splits import Splits, make_splits
from ..devices import retain_freed_memory
from ..distributed import World, close_world, init_world
from ..errors import AgeGenderError
from ..faces.framing import photo_framer
from ..files import atomic_path, folder_lock, safe_name, write_text_atomic
from ..model.backbones import DLIB_RESNET, backbone
from ..model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from ..model.config import SEED_PREPROCESS, VGG_FACE_PREPROCESS, ModelConfig, Preprocess
from ..model.decode import decode
from ..model.dlib_resnet import dlib_shape_of
from ..model.meta import RUN_CHECKPOINT
from ..model.net import AgeGenderNet, Outputs
from .config import TrainConfig
from .metrics import mae

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    checkpoint: Path
    report_md: Path
    history: list[dict[str, float]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


# -- building ---------------------------------------------------------------------------------
def load_trunk_weights(path: str) -> tuple[dict[str, torch.Tensor], Preprocess, str | None]:
    """Canonical weights, their preprocessing and source hash; .t7/.pt files are converted in memory."""
    from ..weights.convert import load_canonical, read_weights

    p = Path(path)
    if not p.is_file():
        raise AgeGenderError(f"{p}: no such weights file (get it with `agegender fetch weights`, then "
                             f"`agegender convert .../VGG_FACE.t7 -o vgg_face.safetensors`)")
    if p.suffix == ".safetensors":
        state, meta = load_canonical(p, backbone="vgg-face")
        pre = Preprocess.from_dict(json.loads(meta["preprocess"])) if "preprocess" in meta else VGG_FACE_PREPROCESS
        return state, pre, meta.get("source_sha256")
    from ..files import sha256_file

    return read_weights(p), VGG_FACE_PREPROCESS, sha256_file(p)


def load_dlib_weights(path: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """dlib's ResNet from ``path`` (its .dat or a converted .safetensors), or from the installed package."""
    from ..files import sha256_file
    from ..weights.convert import load_canonical
    from ..weights.dlib_dat import read_dlib_resnet
    from ..weights.locate import packaged_weights

    file = Path(path) if path else packaged_weights(DLIB_RESNET.weights)
    if not file.is_file():
        raise AgeGenderError(f"{file}: no such weights file")
    if file.suffix == ".safetensors":
        state, meta = load_canonical(file, backbone="dlib-resnet")
        return state, meta.get("source_sha256") or sha256_file(file)
    return {k: torch.from_numpy(v) for k, v in read_dlib_resnet(file).items()}, sha256_file(file)


def build_model(cfg: TrainConfig, age_range: tuple[int, int] = (1, 70)) -> tuple[AgeGenderNet, Preprocess, str | None]:
    torch.manual_seed(cfg.seed)
    state, pre, sha = None, VGG_FACE_PREPROCESS, None
    spec = backbone(cfg.backbone)
    widths = cfg.widths if spec.name == "vgg-face" else spec.widths
    image_size = cfg.image_size if spec.name == "vgg-face" else spec.preprocess.size
    descriptor_dim = 128
    if spec.name == "dlib-resnet":
        pre = replace(spec.preprocess, alignment=cfg.alignment) if cfg.alignment else spec.preprocess
        if cfg.init != "scratch":
            state, sha = load_dlib_weights(cfg.weights)
            widths, descriptor_dim = dlib_shape_of(state)
    elif cfg.init != "scratch":
        if not cfg.weights:
            raise AgeGenderError(f"pretrained vgg-face needs --weights (get them with {spec.weights.how_to_get}), "
                                 "or use --init scratch")
        from ..weights.convert import infer_widths

        state, pre, sha = load_trunk_weights(cfg.weights)
        widths = infer_widths(state)
    if cfg.pixels == "seed":
        pre = SEED_PREPROCESS
    mc = ModelConfig(widths=widths, image_size=image_size, backbone=spec.name, feature_layer=cfg.feature_layer,
                     descriptor_dim=descriptor_dim,
                     block_bn=cfg.block_bn and spec.name == "vgg-face", hidden=cfg.hidden,
                     dropout=cfg.dropout, head_bn=cfg.head_bn, feature_bn=cfg.feature_bn, age_head=cfg.age_head,
                     freeze_trunk=not cfg.unfreeze, age_min=age_range[0], age_max=age_range[1])
    model = AgeGenderNet(mc)
    if state is not None:
        model.load_trunk(state)
    return model.to(cfg.device), pre.resized(image_size), sha


# The heads' losses start near 1 (BCE 0.69, smooth L1 on ages scaled to [-1, 1], DEX cross-entropy log(ages) < 5);
# a mean epoch loss beyond this means logits in the thousands: the weights have run off, NaN is a step away.
DIVERGED_LOSS = 1e4
MIN_SPLIT = {"train": 4, "val": 1, "test": 2}  # below these, training or its metrics cannot run


def check_splits(splits: Splits, data: str) -> None:
    """Refuse splits too small to train on or to measure; warn about data that trains but is suspect."""
    sizes = {name: len(splits[name]) for name in MIN_SPLIT}
    for name, least in MIN_SPLIT.items():
        if sizes[name] < least:
            raise AgeGenderError(f"{data}: the {name} split has {sizes[name]} images, at least {least} are needed "
                                 f"(splits {sizes}); add images or use another --split")
    genders = collections.Counter(r.gender for r in splits.train)
    if len(genders) < 2:
        log.warning("%s: every training face has the same gender; the gender head cannot learn", data)
    elif min(genders.values()) < 0.1 * sum(genders.values()):
        log.warning("%s: heavy gender imbalance in training (%s)", data, dict(genders))
    small = [name for name, n in sizes.items() if n < 50]
    if small:
        log.warning("%s: tiny splits (%s); metrics will be noisy", data, ", ".join(f"{n} {sizes[n]}" for n in small))


def age_range(records: Sequence[FaceRecord]) -> tuple[int, int]:
    """The ages the head learns: agegender_cleaned's 1-70, widened to every labelled age in training (UTKFace
    reaches 116). Predictions are clamped to it, so it must cover the data."""
    ages = [r.age for r in records if r.age is not None]
    return min([1, *ages]), max([70, *ages])


def make_optimizer(model: AgeGenderNet, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """Adam over the trainable weights, the trunk's (when it trains) at ``trunk_lr_mult`` of the rate.

    ``fused`` (the default) is the same Adam in one pass over the weights; ``fused=False`` is torch's multi-tensor
    Adam, kept so the benchmark can measure one against the other (BENCHMARKS.md, section 3).
    """
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("trunk.")]
    groups = [{"params": head, "lr": cfg.lr}]
    if trunk:
        groups.append({"params": trunk, "lr": cfg.lr * cfg.trunk_lr_mult})
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay, fused=fused, foreach=None if fused else True)


def train_threads() -> int:
    """Intra-op torch threads for a training epoch: :func:`agegender.devices.torch_threads` (``OMP_NUM_THREADS``
    when set, else this machine's usable cores)."""
    from ..devices import torch_threads

    return torch_threads()


class Step(nn.Module):
    """The trained part of one forward pass, as a module so DistributedDataParallel can wrap it."""

    def __init__(self, model: AgeGenderNet, cached: bool, bf16: bool = False) -> None:
        super().__init__()
        self.model, self.cached, self.bf16 = model, cached, bf16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # bf16 autocast where the hardware has it: the matmuls run in bf16, the weights Adam updates stay fp32.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model.forward_head(x) if self.cached else self.model(x)
        age = None if out.age_logits is None else out.age_logits.float()
        return out.gender_logit.float(), age


def loss_parts(out: Outputs, labels: Labels, idx: np.ndarray, model: AgeGenderNet
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gender loss, age loss or None where the batch has no age or the model no age head)."""
    i = torch.as_tensor(idx)
    gender = labels.gender[i].to(out.gender_logit.device)
    gender_loss = F.binary_cross_entropy_with_logits(out.gender_logit, gender)
    age = labels.age[i].to(out.gender_logit.device)
    known = ~torch.isnan(age)
    if out.age_logits is None or not known.any():
        return gender_loss, None
    mc = model.config
    a, logits = age[known], out.age_logits[known]
    if mc.age_head == "dex":
        target = (a.round().clamp(mc.age_min, mc.age_max) - mc.age_min).long()
        return gender_loss, F.cross_entropy(logits, target)
    mid, half = (mc.age_min + mc.age_max) / 2, (mc.age_max - mc.age_min) / 2
    return gender_loss, F.smooth_l1_loss(logits.squeeze(-1), (a - mid) / half)


def loss_fn(out: Outputs, labels: Labels, idx: np.ndarray, model: AgeGenderNet, cfg: TrainConfig) -> torch.Tensor:
    gender_loss, age_loss = loss_parts(out, labels, idx, model)
    return gender_loss if age_loss is None else gender_loss + cfg.age_weight * age_loss


# -- one epoch, evaluation --------------------------------------------------------------------
def train_one_epoch(model: AgeGenderNet, step: nn.Module, batches: Batches, idx: np.ndarray, labels: Labels,
                    optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int, threads: int | None = None
                    ) -> dict[str, float]:
    """One pass over ``idx`` in a seeded order; under torchrun each rank takes its share of every batch.

    Returns the epoch's mean losses: ``train_loss`` (what the optimizer minimised) and its parts,
    ``train_gender_loss`` and ``train_age_loss`` (the latter over batches with ages).

    The epoch runs on ``threads`` intra-op threads (default: :func:`train_threads`); the caller's count is
    restored afterwards.
    """
    from ..progress import Progress

    retain_freed_memory()  # each step frees and reallocates its gradients: reuse them, do not fault them in
    model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = idx[torch.randperm(len(idx), generator=g).numpy()]
    augment = g if (cfg.trunk_trains and batches.features is None) else None
    # The loss is summed on the device and read once per epoch: a .item() per step waits for every step.
    device = batches.world.device
    total, count = torch.zeros((), device=device), 0
    gender_sum, age_sum, age_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = Progress(len(order), f"epoch {epoch}", "img", enabled=cfg.progress and batches.world.is_main)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or train_threads())
    try:
        for x, chunk, global_size in batches(order, augment, shard=True):
            if global_size < 2 * batches.world.size:
                continue  # BatchNorm cannot train on one sample; every rank skips the same batch
            gender_loss, age_loss = loss_parts(Outputs(*step(x)), labels, chunk, model)
            loss = gender_loss if age_loss is None else gender_loss + cfg.age_weight * age_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(chunk)
            gender_sum += gender_loss.detach() * len(chunk)
            if age_loss is not None:
                age_sum += age_loss.detach() * len(chunk)
                age_count += len(chunk)
            count += len(chunk)
            bar.update(len(chunk))
        out = {"train_loss": float(total) / max(count, 1), "train_gender_loss": float(gender_sum) / max(count, 1)}
        if age_count:
            out["train_age_loss"] = float(age_sum) / age_count
        return out
    finally:
        torch.set_num_threads(before)
        bar.close()


@torch.no_grad()
def validate(model: AgeGenderNet, batches: Batches, idx: np.ndarray, labels: Labels, cfg: TrainConfig
             ) -> dict[str, float]:
    """Accuracy, age MAE and the same two losses that training reports, so each pair can share a panel.

    ``val_loss`` (the gender loss) breaks ties between equally accurate epochs.
    """
    model.eval()
    done, p_male, ages = [], [], []
    gender_sum, age_sum, age_count = 0.0, 0.0, 0
    for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
        out = model.forward_head(x) if batches.cached else model(x)
        out = Outputs(out.gender_logit.float(), None if out.age_logits is None else out.age_logits.float())
        gender_loss, age_loss = loss_parts(out, labels, chunk, model)
        gender_sum += float(gender_loss) * len(chunk)
        if age_loss is not None:
            age_sum, age_count = age_sum + float(age_loss) * len(chunk), age_count + len(chunk)
        done.append(chunk)
        decoded = decode(model.config, out.gender_logit, out.age_logits)  # as predict and the report decode
        p_male.append(decoded[0].cpu().numpy())
        if len(decoded) > 1:
            ages.append(decoded[1].cpu().numpy())
    if not done:
        return {"val_accuracy": math.nan, "val_loss": math.nan}
    idx_done, p = np.concatenate(done).astype(int), np.concatenate(p_male)
    y = labels.gender[idx_done].numpy()
    loss = gender_sum / len(idx_done)
    row = {"val_accuracy": float(np.mean((p >= 0.5) == y)), "val_loss": loss, "val_gender_loss": loss}
    if age_count:
        row["val_age_loss"] = age_sum / age_count
    if ages:
        a, age = labels.age[idx_done].numpy(), np.concatenate(ages)
        known = ~np.isnan(a)
        if known.any():
            row["val_age_mae"] = mae(a[known], age[known])
    return row


# -- the run ----------------------------------------------------------------------------------
def fit(cfg: TrainConfig, resume: bool = False, force: bool = False) -> RunResult:
    """Train, keep the best checkpoint by validation accuracy, then evaluate it on the test split.

    Under ``torchrun`` every rank runs this; features are extracted in shards and gathered, gradients are
    averaged by DistributedDataParallel, and only rank 0 writes files. A finished or started run in ``cfg.out``
    is continued with ``resume`` and replaced only with ``force``.
    """
    from ..files import refuse_overwrite

    out = Path(cfg.out)
    if resume:
        cfg = replace(cfg, **_stored_config(out, cfg))
    elif out.is_dir():
        refuse_overwrite(out, ("config.json", RUN_CHECKPOINT), force, also=" (--resume to continue it)")
    cfg.validate()
    created = not out.exists()
    world = init_world(cfg.device)
    try:
        # One writer per run directory: a second `train` into it would mix its files with ours.
        with folder_lock(out) if world.is_main else contextlib.nullcontext():
            return _fit(cfg, resume, out, world)
    except Exception:
        # A run that failed leaves nothing half-written behind (an interrupted one stays, for --resume).
        if created and world.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        close_world(world)


def _fit(cfg: TrainConfig, resume: bool, out: Path, world: World) -> RunResult:
    dataset = scan_all([cfg.data] if isinstance(cfg.data, str) else list(cfg.data), exclude=cfg.exclude)
    splits = make_splits(dataset, cfg.split, cfg.seed, limit=cfg.limit)
    records = splits.train + splits.val + splits.test
    n_train, n_val = len(splits.train), len(splits.val)
    idx_val = np.arange(n_train, n_train + n_val)
    idx_test = np.arange(n_train + n_val, len(records))
    check_splits(splits, str(dataset.root))
    log.info("data: %s (%s), split %s: %s", dataset.root, dataset.kind, cfg.split, splits.summary())
    model, pre, weights_sha = build_model(replace(cfg, device=world.device), age_range(splits.train))
    if world.is_main:  # only now that data, splits and weights all check out
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(cfg.applicable_dict(), indent=2))
        write_text_atomic(out / "splits.json", json.dumps({k: [str(r.path) for r in v] for k, v in splits.items()}))
    labels = Labels.of(records)
    frame = photo_framer(pre)
    features = None
    if cfg.cache and not cfg.trunk_trains:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "cache"
        features = cached_features(model, records, pre, cache_dir, weights_sha256=weights_sha, bf16=cfg.bf16, frame=frame,
                                   world=world, batch_size=max(cfg.batch_size, 64), workers=cfg.workers,
                                   device=world.device, progress=cfg.progress and world.is_main)
    # The naive --no-cache path stays naive (decode every epoch); a trainable trunk keeps decoded images.
    batches = Batches(records, pre, cfg.batch_size, cfg.workers, features, world, keep_images=cfg.trunk_trains,
                      frame=frame)
    train_idx = np.intersect1d(np.arange(n_train), batches.valid)
    step: nn.Module = Step(model, batches.cached, cfg.bf16)
    if world.active:
        step = nn.parallel.DistributedDataParallel(step)
    optimizer = make_optimizer(model, cfg)
    meta = CheckpointMeta(model.config, pre, weights_sha256=weights_sha,
                          extra={"data": {"root": str(dataset.root), "kind": dataset.kind, "split": cfg.split,
                                          "summary": splits.summary()}, "train": cfg.applicable_dict()})

    history: list[dict[str, float]] = []
    start_epoch, best, stale = 1, (-math.inf, math.inf), 0
    if resume and (out / "train_state.pt").is_file():
        start_epoch, best, history = _restore(out, model, optimizer)
        log.info("resuming at epoch %d", start_epoch)
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_losses = train_one_epoch(model, step, batches, train_idx, labels, optimizer, cfg, epoch)
        train_loss = train_losses["train_loss"]
        if not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS:
            raise AgeGenderError(f"training diverged at epoch {epoch} (loss {train_loss:.4g}), lower --lr "
                                 f"(now {cfg.lr:g})")
        world.sync_buffers(model)
        # Every rank validates on the whole val split, so early-stopping decisions agree without messages.
        row = {"epoch": epoch, **train_losses, **validate(model, batches, idx_val, labels, cfg),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        acc, vloss = row["val_accuracy"], row["val_loss"]
        improved = math.isnan(acc) or acc > best[0] or (acc == best[0] and vloss < best[1])
        if improved:
            best, stale = (acc, vloss), 0
            meta.extra["best_epoch"] = epoch
        else:
            stale += 1
        if world.is_main:
            _save_state(out, model, meta, optimizer, epoch, best, history)
            if improved:  # the checkpoint just written as last.safetensors, not serialised again
                with atomic_path(out / RUN_CHECKPOINT) as tmp:
                    shutil.copyfile(out / "last.safetensors", tmp)
        if cfg.patience and stale >= cfg.patience:
            log.info("early stop: no validation improvement in %d epochs", cfg.patience)
            break

    world.barrier()
    if not world.is_main:
        # Wait for rank 0's calibration and report, so that every rank leaves the process group together: a rank
        # that tore its group down while rank 0 still held it was seen to abort at exit.
        world.barrier()
        return RunResult(out, out / RUN_CHECKPOINT, out / "report" / "report.md", history)
    try:
        return _calibrate_and_report(out, cfg, world, dataset, splits, features, records, batches, labels, idx_val,
                                     idx_test, history)
    finally:
        world.barrier()


def _calibrate_and_report(out: Path, cfg: TrainConfig, world: World, dataset: Any, splits: Splits,
                          features: FeatureSet | None, records: list[FaceRecord], batches: Batches, labels: Labels,
                          idx_val: np.ndarray, idx_test: np.ndarray, history: list[dict[str, float]]) -> RunResult:
    """Rank 0, after the last epoch: the temperature on the validation split, the curves, the test report."""
    from ..model.runtime import load_backend
    from .calibrate import calibrate_checkpoint
    from .evaluate import evaluate_records
    from .report import plot_training_curves

    calibrate_checkpoint(out / RUN_CHECKPOINT, *_gender_logits(out / RUN_CHECKPOINT, batches, idx_val, labels))
    plot_training_curves(history, out / "training_curves.png")
    # The test split goes through predict's own path (framing, full decode, trunk at cfg.precision), as
    # `agegender evaluate` does: the cached training features are rounded differently (autocast, draft decodes),
    # which moved accuracy in the third decimal between the two reports. One more trunk pass, test split only.
    backend = load_backend(out / RUN_CHECKPOINT, world.device, cfg.precision)
    report, report_md = evaluate_records(backend, [records[i] for i in idx_test],
                                         _protocol(dataset, splits, cfg, features, records), out / "report",
                                         history, batch_size=max(cfg.batch_size, 64), workers=cfg.workers,
                                         requested=cfg.precision, device=world.device, progress=cfg.progress)
    return RunResult(out, out / RUN_CHECKPOINT, report_md, history, report)


def _gender_logits(checkpoint: Path, batches: Batches, idx: np.ndarray, labels: Labels) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's fp32 gender logits on ``idx`` (the readable ones) and their 0/1 labels."""
    best, _ = load_checkpoint(checkpoint, device=batches.world.device)
    logits, done = [], []
    with torch.no_grad():
        for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
            out = best.forward_head(x.float()) if batches.cached else best(x)
            logits.append(out.gender_logit.float().cpu().numpy())
            done.append(chunk)
    chosen = np.concatenate(done) if done else np.zeros(0, dtype=int)
    return (np.concatenate(logits) if logits else np.zeros(0)), labels.gender.numpy()[chosen]


def _protocol(dataset: Any, splits: Any, cfg: TrainConfig, features: FeatureSet | None,
              records: Sequence[FaceRecord]) -> dict[str, Any]:
    skipped = [(str(p), why) for p, why in dataset.skipped.items]
    if features is not None:  # the test split's unreadable images are counted by its evaluation
        skipped += [(str(records[int(i)].path), "could not decode") for i in np.flatnonzero(~features.ok.numpy())
                    if i < len(splits.train) + len(splits.val)]
    from .evaluate import data_protocol

    return {**data_protocol(dataset), "split": cfg.split, "seed": cfg.seed,
            "preset": cfg.preset, "init": cfg.init, "backbone": cfg.backbone, "splits": splits.summary(),
            **splits.leakage(),
            "skipped": {"count": len(skipped), "first": [f"{p}: {why}" for p, why in skipped[:10]]}}


def _stored_config(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    path = out / "config.json"
    if not path.is_file():
        raise AgeGenderError(f"{out}: nothing to resume (no config.json); start a run with `agegender train`")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _cannot_resume(out, f"config.json is unreadable ({type(e).__name__})") from None
    if not isinstance(stored, dict):
        raise _cannot_resume(out, "config.json is not a run's config")
    names = {f.name for f in fields(TrainConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items()
              if k in names and k not in ("epochs", "progress", "workers", "device")}
    for k, v in values.items():  # the types this run's own config has, so validate() compares like with like
        now = getattr(cfg, k)
        ok = (v is None or isinstance(v, str | tuple) if now is None or k == "data" else
              isinstance(v, bool) if isinstance(now, bool) else
              isinstance(v, int | float) and not isinstance(v, bool) if isinstance(now, int | float) else
              isinstance(v, type(now)))
        if isinstance(now, int) and not isinstance(now, bool) and isinstance(v, float):
            ok = False
        if not ok:
            raise _cannot_resume(out, f"config.json has {k} = {str(v)[:40]!r}, not a {type(now).__name__}")
    return values


def _cannot_resume(out: Path, why: str) -> AgeGenderError:
    return AgeGenderError(safe_name(f"{out}: cannot resume: {why}; start again with another --out, or delete {out} "
                                    f"and train anew"))


def _save_state(out: Path, model: AgeGenderNet, meta: CheckpointMeta, optimizer: torch.optim.Optimizer,
                epoch: int, best: tuple[float, float], history: list[dict[str, float]]) -> None:
    meta.extra["epoch"] = epoch  # the state below is for these weights: resume checks they belong together
    save_checkpoint(out / "last.safetensors", model, meta)
    state = {"epoch": epoch, "best": list(best), "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
             "model_config": json.dumps({**model.config.to_dict(), "temperature": 1.0}, sort_keys=True)}
    with atomic_path(out / "train_state.pt") as tmp:
        torch.save(state, tmp)
    write_text_atomic(out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _restore(out: Path, model: AgeGenderNet, optimizer: torch.optim.Optimizer
             ) -> tuple[int, tuple[float, float], list[dict[str, float]]]:
    """The epoch to resume at, the best score and the history, with the weights, optimizer and RNG restored.

    Everything is checked before it is used: a damaged, foreign or incomplete state is refused in one line (a
    pickle payload never runs: torch reads the state with ``weights_only``).
    """
    from ..model.checkpoint import read_meta

    state = _read_state(out / "train_state.pt", out)
    last = out / "last.safetensors"
    if not last.is_file():
        raise _cannot_resume(out, "last.safetensors is missing")
    try:
        meta = read_meta(last)
    except AgeGenderError as e:
        raise _cannot_resume(out, f"last.safetensors is damaged ({e})") from None
    # The calibration temperature is fitted after the last epoch, so it never tells two training runs apart.
    this_model = json.dumps({**model.config.to_dict(), "temperature": 1.0}, sort_keys=True)
    if state.get("model_config", this_model) != this_model:
        raise _cannot_resume(out, "train_state.pt is from a run with another model")
    if meta.extra.get("epoch", state["epoch"]) != state["epoch"]:
        raise _cannot_resume(out, f"last.safetensors is from epoch {meta.extra.get('epoch')}, train_state.pt from "
                                  f"epoch {state['epoch']}")
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(last)))
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                moments = optimizer.state.get(p, {})
                if any(isinstance(t, torch.Tensor) and t.dim() and t.shape != p.shape for t in moments.values()):
                    raise ValueError("optimizer moments of another shape than the weights")
        torch.set_rng_state(state["torch_rng"])
    except Exception as e:  # a state that does not fit this model: name it, never a traceback
        raise _cannot_resume(out, f"the saved state does not fit this run's model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return state["epoch"] + 1, (float(state["best"][0]), float(state["best"][1])), state["history"]


def _read_state(path: Path, out: Path) -> dict[str, Any]:
    """train_state.pt, refused unless it is the dict ``_save_state`` writes, every field of the right type."""
    from ..weights.pytorch import check_zip_inflation

    try:
        check_zip_inflation(path)
        state = torch.load(path, weights_only=True)
    except AgeGenderError as e:
        raise _cannot_resume(out, f"train_state.pt is refused ({str(e).split(': ', 1)[-1]})") from None
    except Exception as e:  # truncated, empty, a pickle with code in it, not a torch file at all
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120] if str(e) else ""
        raise _cannot_resume(out, f"train_state.pt is damaged or foreign ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise _cannot_resume(out, f"train_state.pt holds a {type(state).__name__}, not a training state")
    wanted = {"epoch": int, "best": list, "optimizer": dict, "torch_rng": torch.Tensor, "history": str}
    wrong = [k for k, t in wanted.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if wrong:
        raise _cannot_resume(out, f"train_state.pt lacks or has a wrong {', '.join(wrong)}")
    try:
        history = json.loads(state["history"])
    except (ValueError, RecursionError):
        history = None
    best = state["best"]
    if (not isinstance(history, list) or not all(isinstance(r, dict) for r in history) or state["epoch"] < 1
            or len(best) != 2 or not all(isinstance(b, int | float) for b in best)
            or state["torch_rng"].dtype != torch.uint8):
        raise _cannot_resume(out, "train_state.pt has fields of the right names but not a training state's values")
    return {**state, "history": history}
