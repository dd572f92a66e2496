"""Training: presets, one epoch, validation, self-describing checkpoints, resume. Reads top to bottom."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
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

from ..backbones import LEGACY_BACKBONE, backbone
from ..data.batches import Batches, FeatureSet, Labels
from ..data.features import FeatureSource, cached_features
from ..data.records import Dataset, FaceRecord, scan_all
from ..data.splits import Splits, make_splits
from ..devices import retain_freed_memory
from ..distributed import World, close_world, init_world
from ..errors import AgeGenderError, OptionError, one_line
from ..faces.detect import photo_framer
from ..files import atomic_path, folder_lock, safe_name
from ..killpoints import kill_point
from ..model.age_head import age_head
from ..model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from ..model.config import FITTED_AFTER_TRAINING, ModelConfig, Preprocess
from ..model.decode import decode
from ..model.net import AgeGenderNet, Outputs
from ..process import set_process_threads
from ..rundir import RunDir
from .config import TrainConfig
from .metrics import mae

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run: RunDir
    history: list[dict[str, float]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # empty on the ranks that did not evaluate
    features_cached: bool | None = None  # every trunk feature came from the cache (None: no cache used)

    @property
    def out(self) -> Path:
        return self.run.path

    @property
    def checkpoint(self) -> Path:
        return self.run.checkpoint

    @property
    def report_md(self) -> Path:
        return self.run.report.md


# -- building ---------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, age_range: tuple[int, int] = (1, 70)) -> tuple[AgeGenderNet, Preprocess, str | None]:
    """The network a run trains, its input contract and its trunk weights' sha256 (None from scratch)."""
    from ..weights.pretrained import load_pretrained

    torch.manual_seed(cfg.seed)
    spec = backbone(cfg.backbone)
    shape = spec.training_shape({"widths": cfg.widths, "image_size": cfg.image_size, "block_bn": cfg.block_bn})
    pretrained = None if cfg.init == "scratch" else load_pretrained(spec, cfg.weights)
    if pretrained is not None:
        shape.update(pretrained.shape)
    pre = spec.input_contract(pretrained.preprocess if pretrained else None, cfg.alignment, cfg.pixels)
    mc = ModelConfig(
        backbone=spec.name,
        feature_layer=cfg.feature_layer,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        head_bn=cfg.head_bn,
        feature_bn=cfg.feature_bn,
        age_head=cfg.age_head,
        freeze_trunk=not cfg.unfreeze,
        age_min=age_range[0],
        age_max=age_range[1],
        **shape,
    )
    model = AgeGenderNet(mc)
    if pretrained is not None:
        model.load_trunk(pretrained.state)
    return model.to(cfg.device), pre.resized(mc.image_size), pretrained.sha256 if pretrained else None


# The heads' losses start near 1 (BCE 0.69, smooth L1 on ages scaled to [-1, 1], DEX cross-entropy log(ages) < 5);
# a mean epoch loss beyond this means logits in the thousands: the weights have run off, NaN is a step away.
DIVERGED_LOSS = 1e4
MIN_SPLIT = {"train": 4, "val": 1, "test": 2}  # below these, training or its metrics cannot run


def check_splits(splits: Splits, data: str) -> None:
    """Refuse splits too small to train on or to measure; warn about data that trains but is suspect."""
    sizes = {name: len(splits[name]) for name in MIN_SPLIT}
    for name, least in MIN_SPLIT.items():
        if sizes[name] < least:
            raise OptionError(
                f"{data}: the {name} split has {sizes[name]} images, at least {least} are needed "
                f"(splits {sizes}); add images or use another `split`",
                "split",
            )
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

    def __init__(self, model: AgeGenderNet, cached: bool, bf16: bool = False, tuned: int = 0) -> None:
        super().__init__()
        self.model, self.cached, self.bf16, self.tuned = model, cached, bf16, tuned

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # bf16 autocast where the hardware has it: the matmuls run in bf16, the weights Adam updates stay fp32.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model.forward_from(x, self.tuned) if self.cached else self.model(x)
        age = None if out.age_logits is None else out.age_logits.float()
        return out.gender_logit.float(), age


def loss_parts(out: Outputs, labels: Labels, idx: np.ndarray, model: AgeGenderNet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gender loss, age loss or None where the batch has no age or the model no age head); the age head sets its
    own targets (:mod:`agegender.model.age_head`), as it decodes its outputs."""
    i = torch.as_tensor(idx)
    gender = labels.gender[i].to(out.gender_logit.device)
    gender_loss = F.binary_cross_entropy_with_logits(out.gender_logit, gender)
    age = labels.age[i].to(out.gender_logit.device)
    known = ~torch.isnan(age)
    head = age_head(model.config)
    if out.age_logits is None or head is None or not known.any():
        return gender_loss, None
    return gender_loss, head.loss(out.age_logits[known], age[known])


def loss_fn(out: Outputs, labels: Labels, idx: np.ndarray, model: AgeGenderNet, cfg: TrainConfig) -> torch.Tensor:
    gender_loss, age_loss = loss_parts(out, labels, idx, model)
    return gender_loss if age_loss is None else gender_loss + cfg.age_weight * age_loss


# -- one epoch, evaluation --------------------------------------------------------------------
def train_one_epoch(
    model: AgeGenderNet,
    step: nn.Module,
    batches: Batches,
    idx: np.ndarray,
    labels: Labels,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    threads: int | None = None,
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
    # Images are flipped and shifted when the trunk trains on them; mirrored activations are drawn half the time.
    mirrored = batches.features is not None and batches.features.mirrored
    augment = g if (cfg.trunk_trains and batches.features is None) or mirrored else None
    # The loss is summed on the device and read once per epoch: a .item() per step waits for every step.
    device = batches.world.device
    total, count = torch.zeros((), device=device), 0
    gender_sum, age_sum, age_count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = Progress(len(order), f"epoch {epoch}", "img", enabled=cfg.progress and batches.world.is_main)
    pools = set_process_threads(threads or train_threads(), opencv=False)
    try:
        for x, chunk, global_size in batches(order, augment, shard=True):
            if global_size < 2 * batches.world.size:
                continue  # BatchNorm cannot train on one sample; every rank skips the same batch
            gender_loss, age_loss = loss_parts(Outputs(*step(x)), labels, chunk, model)
            loss = gender_loss if age_loss is None else gender_loss + cfg.age_weight * age_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            kill_point("train:step")
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
        pools.restore()
        bar.close()


@torch.no_grad()
def validate(model: AgeGenderNet, batches: Batches, idx: np.ndarray, labels: Labels, cfg: TrainConfig) -> dict[str, float]:
    """Accuracy, age MAE and the same two losses that training reports, so each pair can share a panel.

    ``val_loss`` (the gender loss) breaks ties between equally accurate epochs.
    """
    model.eval()
    done, p_male, ages = [], [], []
    gender_sum, age_sum, age_count = 0.0, 0.0, 0
    for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
        out = model.forward_from(x, cfg.tune_levels) if batches.cached else model(x)
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


def epoch_score(row: dict[str, float]) -> float:
    """How good an epoch's validation is, higher better, covering both heads: minus the gender error in points
    plus the age MAE in years (a gender point weighs as much as a year). On gender alone an epoch whose age head
    had not converged was once kept (MAE 8.1 against 4.8 for the same run's other seeds)."""
    return -(100.0 * (1.0 - row["val_accuracy"]) + row.get("val_age_mae", 0.0))


# -- the run ----------------------------------------------------------------------------------
def fit(cfg: TrainConfig, resume: bool = False, force: bool = False, *, features: FeatureSource | None = None) -> RunResult:
    """Train, keep the best checkpoint by both heads' validation errors (:func:`epoch_score`), then evaluate it on
    the test split.

    The run directory is ``cfg.out`` (its files: :class:`~agegender.rundir.RunDir`). Under ``torchrun`` every
    rank runs this; features are extracted in shards and gathered, gradients are averaged by
    DistributedDataParallel, and only rank 0 writes files. A finished or started run there is continued with
    ``resume`` and replaced only with ``force``. ``features`` hands a frozen trunk's features in (a
    :class:`~agegender.data.features.FeatureBank`) instead of the feature cache; images it lacks are extracted.
    """
    from ..files import refuse_overwrite

    run = RunDir(Path(cfg.out))
    if resume:
        cfg = replace(cfg, **_stored_config(run, cfg))
    elif run.path.is_dir():
        refuse_overwrite(run.path, run.markers, force, also=" (`resume` to continue it)")
    cfg.validate()
    if features is not None and (cfg.trunk_trains or cfg.tune_levels):
        raise AgeGenderError("features were given, but this run trains its trunk: they would be stale after one step")
    created = not run.path.exists()
    world = init_world(cfg.device)
    try:
        # One writer per run directory: a second `train` into it would mix its files with ours.
        with folder_lock(run.path) if world.is_main else contextlib.nullcontext():
            return _fit(cfg, resume, run, world, features)
    except Exception:
        # A run that failed leaves nothing half-written behind (an interrupted one stays, for --resume).
        if created and world.is_main:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    finally:
        close_world(world)


def fit_splits(cfg: TrainConfig) -> tuple[Dataset, Splits]:
    """The data ``cfg`` names and its splits, as ``fit`` trains on them (records in order: train, val, test)."""
    dataset = scan_all([cfg.data] if isinstance(cfg.data, str) else list(cfg.data), exclude=cfg.exclude)
    return dataset, make_splits(dataset, cfg.split, cfg.seed, limit=cfg.limit)


def _fit(cfg: TrainConfig, resume: bool, run: RunDir, world: World, source: FeatureSource | None) -> RunResult:
    dataset, splits = fit_splits(cfg)
    records = splits.train + splits.val + splits.test
    n_train, n_val = len(splits.train), len(splits.val)
    idx_val = np.arange(n_train, n_train + n_val)
    idx_test = np.arange(n_train + n_val, len(records))
    check_splits(splits, str(dataset.root))
    log.info("data: %s (%s), split %s: %s", dataset.root, dataset.kind, cfg.split, splits.summary())
    model, pre, weights_sha = build_model(replace(cfg, device=world.device), age_range(splits.train))
    started = _start_from(model, pre, cfg.start_from) if cfg.start_from and not resume else None
    if cfg.tune_levels:
        model.tune_trunk(cfg.tune_levels)
    _seed_other_generators(cfg.seed)
    if world.is_main:  # only now that data, splits and weights all check out
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg.applicable_dict())
        run.write_splits({k: [r.path for r in v] for k, v in splits.items()})
    labels = Labels.of(records)
    frame = photo_framer(pre)
    features = None
    if source is not None and cfg.mirror:
        log.info("`mirror`: the given features have no mirror images; using the feature cache")
    elif source is not None:
        features = _given_features(source, records, model)
    if features is None and cfg.cache and not cfg.trunk_trains:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.default_cache
        features = cached_features(
            model,
            records,
            pre,
            cache_dir,
            weights_sha256=weights_sha,
            bf16=cfg.bf16,
            frame=frame,
            world=world,
            batch_size=max(cfg.batch_size, 64),
            workers=cfg.workers,
            device=world.device,
            progress=cfg.progress and world.is_main,
            tuned=cfg.tune_levels,
            mirror=cfg.mirror,
        )
    # The naive --no-cache path stays naive (decode every epoch); a trainable trunk keeps decoded images.
    batches = Batches(records, pre, cfg.batch_size, cfg.workers, features, world, keep_images=cfg.trunk_trains, frame=frame)
    train_idx = np.intersect1d(np.arange(n_train), batches.valid)
    step: nn.Module = Step(model, batches.cached, cfg.bf16, cfg.tune_levels)
    if world.active:
        step = nn.parallel.DistributedDataParallel(step)
    optimizer = make_optimizer(model, cfg)
    meta = CheckpointMeta(
        model.config,
        pre,
        weights_sha256=weights_sha,
        extra={
            "data": {"root": str(dataset.root), "kind": dataset.kind, "split": cfg.split, "summary": splits.summary()},
            "train": cfg.applicable_dict(),
            **({"start_from_sha256": started} if started else {}),
        },
    )

    standing = RunState()
    if resume and run.train_state.is_file():
        if world.is_main:
            _finish_commit(run, model)
        world.barrier()  # every rank reads the files once rank 0 has brought them up to the committed state
        standing = _restore(run, model, optimizer)
        if standing.best_epoch:  # states written before it was recorded lack it
            meta.extra["best_epoch"] = standing.best_epoch
        log.info("resuming at epoch %d", standing.epoch + 1)
    history, best, stale = standing.history, standing.best, standing.stale
    for epoch in range(standing.epoch + 1, cfg.epochs + 1):
        if cfg.patience and stale >= cfg.patience:  # a resumed run that had already stopped early
            break
        t0 = time.perf_counter()
        train_losses = train_one_epoch(model, step, batches, train_idx, labels, optimizer, cfg, epoch)
        train_loss = train_losses["train_loss"]
        if not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS:
            raise OptionError(f"training diverged at epoch {epoch} (loss {train_loss:.4g}), lower `lr` (now {cfg.lr:g})", "lr")
        world.sync_buffers(model)
        # Every rank validates on the whole val split, so early-stopping decisions agree without messages.
        row = {
            "epoch": epoch,
            **train_losses,
            **validate(model, batches, idx_val, labels, cfg),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        score, vloss = epoch_score(row), row["val_loss"]
        improved = math.isnan(score) or score > best[0] or (score == best[0] and vloss < best[1])
        if improved:
            best, stale = (score, vloss), 0
            meta.extra["best_epoch"] = epoch
        else:
            stale += 1
        if world.is_main:
            _save_state(run, model, meta, optimizer, RunState(epoch, best, meta.extra.get("best_epoch", 0), stale, history))
        if cfg.patience and stale >= cfg.patience:
            log.info("early stop: no validation improvement in %d epochs", cfg.patience)
            break

    world.barrier()
    if not world.is_main:
        # Wait for rank 0's calibration and report, so that every rank leaves the process group together: a rank
        # that tore its group down while rank 0 still held it was seen to abort at exit.
        world.barrier()
        return RunResult(run, history, features_cached=None if features is None else features.cached)
    try:
        return _calibrate_and_report(run, cfg, world, dataset, splits, features, records, batches, idx_val, idx_test, history)
    finally:
        world.barrier()


def _start_from(model: AgeGenderNet, pre: Preprocess, path: str) -> str:
    """Load a trained model file's weights into ``model`` (the run's own, the same network on the same input);
    returns the file's sha256, which the run's checkpoint records."""
    from safetensors.torch import load_file

    from ..files import sha256_file
    from ..model.checkpoint import check_stored_shapes, read_meta

    try:
        meta = read_meta(path)
        check_stored_shapes(path, meta)
    except AgeGenderError as e:
        raise OptionError(f"`start_from` {e}", "start_from") from None
    ours, theirs = model.config.trained_part(), meta.config.to_dict()
    differ = [k for k in ours if k != "freeze_trunk" and ours[k] != theirs.get(k)]
    if differ:
        k = differ[0]
        raise OptionError(
            f"{path}: `start_from` is a model of another {k} ({theirs.get(k)!r}, this run's is {ours[k]!r}); "
            "start from a run on the same data and options",
            "start_from",
        )
    if meta.preprocess.to_dict() != pre.to_dict():
        raise OptionError(f"{path}: `start_from` reads its faces differently from this run (its input contract)", "start_from")
    model.load_state_dict(load_file(path, device=str(next(model.parameters()).device)))
    return sha256_file(path)


def _given_features(source: FeatureSource, records: list[FaceRecord], model: AgeGenderNet) -> FeatureSet | None:
    """The caller's features for ``records``, checked against the run's trunk; None where it lacks some."""
    given = source(records)
    if given is None:
        log.info("the given features lack some of this run's images; using the feature cache")
        return None
    want = (len(records), model.config.feature_dim)
    if tuple(given.features.shape) != want or tuple(given.ok.shape) != want[:1]:
        raise AgeGenderError(
            f"the given features have shape {tuple(given.features.shape)}, this run needs {want} "
            f"(one row per image, the trunk's {want[1]} features)"
        )
    return FeatureSet(given.features.float(), given.ok.bool(), given.seconds, cached=True)


def _calibrate_and_report(
    run: RunDir,
    cfg: TrainConfig,
    world: World,
    dataset: Any,
    splits: Splits,
    features: FeatureSet | None,
    records: list[FaceRecord],
    batches: Batches,
    idx_val: np.ndarray,
    idx_test: np.ndarray,
    history: list[dict[str, float]],
) -> RunResult:
    """Rank 0, after the last epoch: the temperature and the age stretch on the validation split, the curves, the
    test report."""
    from ..model.runtime import load_backend
    from .calibrate import calibrate_checkpoint
    from .evaluate import evaluate_records
    from .report import plot_training_curves

    calibrate_checkpoint(run.checkpoint, *_validation_outputs(run.checkpoint, batches, idx_val, records, cfg.tune_levels))
    kill_point("train:calibrated")
    plot_training_curves(history, run.curves)
    # The test split goes through predict's own path (framing, full decode, trunk at cfg.precision), as
    # `agegender evaluate` does: the cached training features are rounded differently (autocast, draft decodes),
    # which moved accuracy in the third decimal between the two reports. One more trunk pass, test split only.
    backend = load_backend(run.checkpoint, world.device, cfg.precision)
    report, _ = evaluate_records(
        backend,
        [records[i] for i in idx_test],
        _protocol(dataset, splits, cfg, features, records),
        run.report,
        history,
        batch_size=max(cfg.batch_size, 64),
        workers=cfg.workers,
        requested=cfg.precision,
        device=world.device,
        progress=cfg.progress,
    )
    return RunResult(run, history, report, None if features is None else features.cached)


def _validation_outputs(
    checkpoint: Path, batches: Batches, idx: np.ndarray, records: Sequence[FaceRecord], tuned: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The checkpoint's fp32 gender logits on ``idx`` (the readable ones) and their 0/1 labels; and, with an age
    head, its unstretched ages of the faces with an exact labelled age (not an age group) and those ages."""
    best, _ = load_checkpoint(checkpoint, device=batches.world.device)
    head = age_head(best.config)
    logits, ages, done = [], [], []
    with torch.no_grad():
        for x, chunk, _ in batches(idx, batch_size=4096 if batches.cached else None):
            out = best.forward_from(x.float(), tuned) if batches.cached else best(x)
            logits.append(out.gender_logit.float().cpu().numpy())
            if head is not None and out.age_logits is not None:
                ages.append(head.decode(out.age_logits.float())[0].cpu().numpy())
            done.append(chunk)
    chosen = np.concatenate(done) if done else np.zeros(0, dtype=int)
    gender = np.array([records[i].gender for i in chosen], dtype=np.float64)
    if not ages:
        return (np.concatenate(logits) if logits else np.zeros(0)), gender, None, None
    exact = np.array([records[i].age is not None and records[i].age_interval is None for i in chosen], dtype=bool)
    true_ages = np.array([records[i].age for i in chosen[exact]], dtype=np.float64)
    return np.concatenate(logits), gender, np.concatenate(ages)[exact], true_ages


def _protocol(
    dataset: Any, splits: Any, cfg: TrainConfig, features: FeatureSet | None, records: Sequence[FaceRecord]
) -> dict[str, Any]:
    skipped = [(str(p), why) for p, why in dataset.skipped.items]
    if features is not None:  # the test split's unreadable images are counted by its evaluation
        skipped += [
            (str(records[int(i)].path), "could not decode")
            for i in np.flatnonzero(~features.ok.numpy())
            if i < len(splits.train) + len(splits.val)
        ]
    from .evaluate import data_protocol

    return {
        **data_protocol(dataset),
        "split": cfg.split,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "init": cfg.init,
        "backbone": cfg.backbone,
        "splits": splits.summary(),
        **splits.leakage(),
        "skipped": {"count": len(skipped), "first": [f"{p}: {why}" for p, why in skipped[:10]]},
    }


def _stored_config(run: RunDir, cfg: TrainConfig) -> dict[str, Any]:
    out = run.path
    if not run.config.is_file():
        raise AgeGenderError(f"{out}: nothing to resume (no {run.config.name}); start a run with `agegender train`")
    try:
        stored = json.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _cannot_resume(out, f"{run.config.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(stored, dict):
        raise _cannot_resume(out, f"{run.config.name} is not a run's config")
    stored.setdefault("backbone", LEGACY_BACKBONE)  # a run from before there was a choice: VGG-Face's
    names = {f.name for f in fields(TrainConfig)}
    values = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in stored.items()
        if k in names and k not in ("epochs", "progress", "workers", "device")
    }
    for k, v in values.items():  # the types this run's own config has, so validate() compares like with like
        now = getattr(cfg, k)
        ok = (
            v is None or isinstance(v, str | tuple)
            if now is None or k == "data"
            else isinstance(v, bool)
            if isinstance(now, bool)
            else isinstance(v, int | float) and not isinstance(v, bool)
            if isinstance(now, int | float)
            else isinstance(v, type(now))
        )
        if isinstance(now, int) and not isinstance(now, bool) and isinstance(v, float):
            ok = False
        if not ok:
            raise _cannot_resume(out, f"{run.config.name} has {k} = {str(v)[:40]!r}, not a {type(now).__name__}")
    return values


def _cannot_resume(out: Path, why: str) -> AgeGenderError:
    return OptionError(
        safe_name(f"{out}: cannot resume: {why}; start again with another `out`, or delete {out} and train anew"), "out"
    )


# The resume state of a run directory. train_state.pt is the commit point: an epoch is done once it is written.
# It is written after the epoch's weights, which wait beside it under ``RunDir.pending`` until then, so a process killed at
# any moment (SIGKILL runs no cleanup) leaves either the previous epoch's state or this one's, whole:
#   1. the weights -> run.pending        killed after: an uncommitted epoch, removed on resume
#   2. train_state.pt (the commit)       killed after: resume moves run.pending to last.safetensors itself
#   3. run.pending -> last.safetensors
#   4. last -> model.safetensors when the epoch is the best; history.jsonl (both redone on resume from the state)
# Each file is written through atomic_path, so none is ever half there.


CRITERION = "epoch_score"  # what the state's ``best`` was scored by


@dataclass
class RunState:
    """Where a run stands after ``epoch``: everything early stopping and the best-checkpoint choice depend on."""

    epoch: int = 0
    best: tuple[float, float] = (-math.inf, math.inf)  # (epoch_score, val loss) of the best epoch
    best_epoch: int = 0
    stale: int = 0  # epochs since the best one: the early-stopping counter
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    """The random generators an epoch may draw from besides torch's own (saved as ``torch_rng``), as tensors and
    plain values that ``torch.load`` with ``weights_only`` reads back. The batch order and augmentations need
    none: their generator is seeded from (seed, epoch) afresh each epoch."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(torch_rng: torch.Tensor, state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(torch_rng)
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["mt"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_other_generators(seed: int) -> None:
    """Seed numpy's and Python's global generators as build_model seeds torch's, so that the state saved with
    each epoch (and restored on resume) is a function of the seed, like everything else the run writes."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)


def _save_state(
    run: RunDir, model: AgeGenderNet, meta: CheckpointMeta, optimizer: torch.optim.Optimizer, progress: RunState
) -> None:
    """Commit ``progress.epoch``: the steps of the comment above, in that order."""
    meta.extra["epoch"] = progress.epoch  # the state below is for these weights: resume checks they belong together
    save_checkpoint(run.pending, model, meta)
    kill_point("state:weights")
    state = {
        "epoch": progress.epoch,
        "best": list(progress.best),
        "criterion": CRITERION,
        "best_epoch": progress.best_epoch,
        "stale": progress.stale,
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "torch_rng": torch.get_rng_state(),
        "history": json.dumps(progress.history),
        "model_config": json.dumps(model.config.trained_part(), sort_keys=True),
    }
    with atomic_path(run.train_state) as tmp:
        torch.save(state, tmp)
    kill_point("state:committed")
    _settle(run, progress)


def _settle(run: RunDir, progress: RunState) -> None:
    """Bring the files derived from the committed state up to it: steps 3 and 4, each redone only if not yet done.

    Run after every commit, and on resume, where it finishes what a killed process left undone. Nothing is copied
    from weights of another epoch than the state's: a damaged run stays as it was, for ``_restore`` to name.
    """
    from ..model.checkpoint import read_meta

    def epoch_of(path: Path) -> int | None:
        try:
            return read_meta(path).extra.get("epoch") if path.is_file() else None
        except AgeGenderError:
            return None

    if epoch_of(run.pending) == progress.epoch and epoch_of(run.last) != progress.epoch:
        os.replace(run.pending, run.last)
        kill_point("state:last")
    elif (run.pending).exists():  # an epoch that never committed
        (run.pending).unlink()
    if epoch_of(run.last) != progress.epoch:
        return
    if progress.best_epoch == progress.epoch and epoch_of(run.checkpoint) != progress.epoch:
        with atomic_path(run.checkpoint) as tmp:  # the checkpoint just written, not serialised again
            shutil.copyfile(run.last, tmp)
        kill_point("state:best")
    run.write_history(progress.history)


def _finish_commit(run: RunDir, model: AgeGenderNet) -> None:
    """Finish what a process killed between an epoch's commit and its last steps left undone (:func:`_settle`).

    Run by one process (rank 0) before any reads the run's files; never raises: a state it cannot use is left as
    it is, for :func:`_restore` to name.
    """
    try:
        _settle(run, _committed(run, model)[1])
    except (OSError, AgeGenderError):
        pass


def _committed(run: RunDir, model: AgeGenderNet) -> tuple[dict[str, Any], RunState]:
    """The committed state of ``run`` (checked: one of this run's model) and where it says the run stands."""
    out = run.path
    state = _read_state(run.train_state, out)
    # What calibration fits after the last epoch never tells two training runs apart; states written before a
    # field was fitted still hold its default.
    this_model = model.config.trained_part()
    stored = json.loads(state.get("model_config", "{}")) or this_model
    if {k: v for k, v in stored.items() if k not in FITTED_AFTER_TRAINING} != this_model:
        raise _cannot_resume(out, "train_state.pt is from a run with another model")
    best = (float(state["best"][0]), float(state["best"][1]))
    if state.get("criterion") != CRITERION:
        best = _rescored_best(state["history"], state["epoch"])
    return state, RunState(state["epoch"], best, state.get("best_epoch", 0), state.get("stale", 0), state["history"])


def _rescored_best(history: list[dict[str, Any]], epoch: int) -> tuple[float, float]:
    """A state from before :func:`epoch_score` kept the epoch of best validation accuracy: that epoch's
    ``best``, scored the way later epochs will be compared with it."""
    number = (int, float)
    rows = [
        r
        for r in history
        if isinstance(r.get("epoch"), int)
        and r["epoch"] <= epoch
        and isinstance(r.get("val_accuracy"), number)
        and isinstance(r.get("val_loss"), number)
        and isinstance(r.get("val_age_mae", 0.0), number)
    ]
    kept = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]), default=None)
    return (-math.inf, math.inf) if kept is None else (epoch_score(kept), float(kept["val_loss"]))


def _restore(run: RunDir, model: AgeGenderNet, optimizer: torch.optim.Optimizer) -> RunState:
    """Where ``run`` stands, with the weights, optimizer and random generators restored.

    Everything is checked before it is used: a damaged, foreign or incomplete state is refused in one line (a
    pickle payload never runs: torch reads the state with ``weights_only``).
    """
    from ..model.checkpoint import read_meta

    out, last = run.path, run.last
    state, progress = _committed(run, model)
    if not last.is_file():
        raise _cannot_resume(out, f"{last.name} is missing")
    try:
        meta = read_meta(last)
    except AgeGenderError as e:
        raise _cannot_resume(out, f"last.safetensors is damaged ({e})") from None
    if meta.extra.get("epoch", state["epoch"]) != state["epoch"]:
        raise _cannot_resume(
            out, f"last.safetensors is from epoch {meta.extra.get('epoch')}, train_state.pt from epoch {state['epoch']}"
        )
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(last)))
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                moments = optimizer.state.get(p, {})
                if any(isinstance(t, torch.Tensor) and t.dim() and t.shape != p.shape for t in moments.values()):
                    raise ValueError("optimizer moments of another shape than the weights")
        _set_rng_state(state["torch_rng"], state.get("rng", {}))
    except Exception as e:  # a state that does not fit this model: name it, never a traceback
        raise _cannot_resume(out, f"the saved state does not fit this run's model ({one_line(e, 120, with_type=True)})") from None
    return progress


def _read_state(path: Path, out: Path) -> dict[str, Any]:
    """train_state.pt, refused unless it is the dict ``_save_state`` writes, every field of the right type."""
    from ..weights.pytorch import check_zip_inflation

    try:
        check_zip_inflation(path)
        state = torch.load(path, weights_only=True)
    except AgeGenderError as e:
        raise _cannot_resume(out, f"train_state.pt is refused ({str(e).split(': ', 1)[-1]})") from None
    except Exception as e:  # truncated, empty, a pickle with code in it, not a torch file at all
        reason = one_line(str(e).split("WeightsUnpickler error:")[-1], 120)
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
    counters = [state.get(k, 0) for k in ("best_epoch", "stale")]
    if (
        not isinstance(history, list)
        or not all(isinstance(r, dict) for r in history)
        or state["epoch"] < 1
        or len(best) != 2
        or not all(isinstance(b, int | float) for b in best)
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= state["epoch"] for c in counters)
        or state["torch_rng"].dtype != torch.uint8
        or not _rng_fields_ok(state.get("rng", {}))
    ):
        raise _cannot_resume(out, "train_state.pt has fields of the right names but not a training state's values")
    return {**state, "history": history}


def _rng_fields_ok(rng: Any) -> bool:
    """The random generators' states have the types :func:`_rng_state` writes (their values are checked by the
    generators themselves, inside ``_restore``'s one-line error)."""
    if not isinstance(rng, dict):
        return False
    n, p = rng.get("numpy"), rng.get("python")
    numpy_ok = n is None or (
        isinstance(n, dict)
        and isinstance(n.get("keys"), torch.Tensor)
        and all(isinstance(n.get(k), t) for k, t in (("kind", str), ("pos", int), ("has_gauss", int), ("gauss", float)))
    )
    python_ok = p is None or (
        isinstance(p, dict)
        and isinstance(p.get("mt"), torch.Tensor)
        and isinstance(p.get("version"), int)
        and isinstance(p.get("gauss"), float | None)
    )
    return numpy_ok and python_ok
