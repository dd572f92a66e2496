"""Frozen-trunk features computed once and cached on disk, keyed by everything that changes them."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..distributed import World
from ..files import atomic_path
from ..images import Framer
from ..model.config import Preprocess
from ..model.net import AgeGenderNet, feature_extractor
from .batches import FeatureSet, iter_batches
from .records import FaceRecord

log = logging.getLogger(__name__)


# Trunk features for ``records``, in their order, from somewhere other than the run's own cache; None where the
# source lacks some (the run then extracts them itself). ``fit(features=...)`` takes one.
FeatureSource = Callable[[Sequence[FaceRecord]], "FeatureSet | None"]


class FeatureBank:
    """Features extracted earlier, by image path: a :data:`FeatureSource` that hands a run the rows it knows.

    Whoever fills it vouches that the features come from the run's own trunk, preprocessing, framing and
    precision (a benchmark extracts each data set once, then trains on several mixes of them).
    """

    def __init__(self) -> None:
        self.rows: dict[str, tuple[torch.Tensor, bool]] = {}

    def add(self, records: Sequence[FaceRecord], features: FeatureSet) -> None:
        self.rows.update({str(r.path): (features.features[i], bool(features.ok[i])) for i, r in enumerate(records)})

    def __call__(self, records: Sequence[FaceRecord]) -> FeatureSet | None:
        rows = [self.rows.get(str(r.path)) for r in records]
        if not rows or any(row is None for row in rows):
            return None
        known = [row for row in rows if row is not None]
        return FeatureSet(torch.stack([f for f, _ in known]), torch.tensor([ok for _, ok in known]), cached=True)


def _trunk_key(
    model: AgeGenderNet,
    preprocess: Preprocess,
    weights_sha256: str | None,
    bf16: bool,
    frame: Framer | None,
    tuned: int = 0,
    mirror: bool = False,
) -> hashlib._Hash:
    h = hashlib.sha256()
    cfg = model.config
    what = {
        "backbone": cfg.backbone,
        "layer": cfg.feature_layer,
        "widths": cfg.widths,
        "block_bn": cfg.block_bn,
        "size": cfg.image_size,
        "pre": preprocess.to_dict(),
        "bf16": bf16,
        "weights": weights_sha256,
        "frame": getattr(frame, "key", None),
    }
    # Keys of older caches stay as they were: the new fields only where they are set.
    what |= {"tuned": tuned} if tuned else {"mirror": True} if mirror else {}
    h.update(json.dumps(what).encode())
    # The trunk's own bytes, so --init scratch or a different seed never reuses another trunk's cache.
    for name, t in sorted(model.trunk.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h


def _file_id(record: FaceRecord) -> str:
    """A record's file as the cache knows it: its path, size and modification time."""
    try:
        st = os.stat(record.path)
        return f"{record.path}\0{st.st_size}\0{st.st_mtime_ns}"
    except OSError:
        return f"{record.path}\0missing"


def cache_key(
    model: AgeGenderNet,
    preprocess: Preprocess,
    records: Sequence[FaceRecord],
    weights_sha256: str | None,
    bf16: bool,
    frame: Framer | None = None,
    tuned: int = 0,
    mirror: bool = False,
) -> str:
    """Hash of the trunk weights, its config, the preprocessing, the dtype, the tuned levels and the file list (with
    sizes/mtimes)."""
    h = _trunk_key(model, preprocess, weights_sha256, bf16, frame, tuned, mirror)
    for r in records:
        h.update(f"{_file_id(r)}\n".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def extract_features(
    model: AgeGenderNet,
    records: Sequence[FaceRecord],
    preprocess: Preprocess,
    *,
    batch_size: int = 128,
    workers: int = 2,
    prefetch: int = 2,
    bf16: bool = False,
    frame: Framer | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tuned: int = 0,
    mirror: bool = False,
) -> FeatureSet:
    """Run the trunk once over every record; decoding of later batches overlaps the trunk's compute.

    With ``tuned`` levels, the rows are the activations in front of them, of the image and of its mirror image
    (:attr:`FeatureSet.mirrored`); with ``mirror``, the features of both.
    """
    from ..progress import Progress

    # a copy of the trunk, in its fastest inference form
    features = _lower_extractor(model, tuned, bf16, device) if tuned else feature_extractor(model, bf16, device)
    if tuned or mirror:
        features = _both_sides(features)
    n = len(records)
    out = torch.zeros(n, *row_shape(model, tuned, mirror), dtype=torch.float16 if tuned else torch.float32)
    ok = torch.zeros(n, dtype=torch.bool)
    start = time.perf_counter()
    # A bar on a terminal; a line every few seconds in a log file, which stays readable.
    bar = Progress(n, "features", "img", enabled=progress)
    for idx, images in iter_batches(records, model.config.image_size, batch_size, workers, prefetch=prefetch, frame=frame):
        f = features(preprocess.normalize(images, torch.channels_last))
        index = torch.as_tensor(idx, dtype=torch.long)
        out[index] = f.to(out.dtype).cpu()
        ok[index] = True
        bar.update(len(idx))
    bar.close()
    return FeatureSet(out, ok, time.perf_counter() - start, mirrored=bool(tuned) or mirror)


def row_shape(model: AgeGenderNet, tuned: int = 0, mirror: bool = False) -> tuple[int, ...]:
    """The shape of one cached row: the trunk's features (of the image and its mirror image with ``mirror``), or
    (2, C, H, W) activations in front of ``tuned`` levels."""
    if not tuned:
        return (2, model.config.feature_dim) if mirror else (model.config.feature_dim,)
    size = model.config.image_size
    with torch.device("meta"):  # shapes only: nothing is computed or allocated
        lower = copy.deepcopy(model.trunk).to("meta").lower(torch.zeros(1, 3, size, size), tuned)
    return (2, *lower.shape[1:])


def _both_sides(features: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``features`` of a batch and of its mirror image, stacked on a new second axis."""

    def both(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([features(x).float(), features(x.flip(3)).float()], 1)

    return both


def _lower_extractor(
    model: AgeGenderNet, tuned: int, bf16: bool, device: str | torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of the trunk up to its last ``tuned`` levels: ``(N, C, H, W)`` activations of a normalised batch."""
    device = torch.device(device)
    trunk = copy.deepcopy(model.trunk).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @torch.no_grad()
    def lower(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, torch.float32, memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            return trunk.lower(x, tuned)

    return lower


def cached_features(
    model: AgeGenderNet,
    records: Sequence[FaceRecord],
    preprocess: Preprocess,
    cache_dir: str | os.PathLike[str],
    *,
    weights_sha256: str | None = None,
    bf16: bool = False,
    world: World = World(),
    tuned: int = 0,
    mirror: bool = False,
    **kwargs: object,
) -> FeatureSet:
    """Load features from ``cache_dir`` or compute and store them (atomically) under their key.

    Under torchrun each rank extracts every ``world.size``-th record and all ranks gather the result. With
    ``tuned`` levels the rows are the mirrored activations in front of them (:func:`extract_features`).
    """
    from safetensors.torch import load_file, save_file

    frame = kwargs.get("frame")
    key = cache_key(model, preprocess, records, weights_sha256, bf16, frame, tuned, mirror)  # type: ignore[arg-type]
    trunk = _trunk_key(model, preprocess, weights_sha256, bf16, frame, tuned, mirror).hexdigest()[:32]  # type: ignore[arg-type]
    path = Path(cache_dir) / f"features-{key}.safetensors"
    shape = row_shape(model, tuned, mirror)
    mirrored = bool(tuned) or mirror
    if path.is_file():
        t = load_file(str(path))
        if t["features"].shape == (len(records), *shape):
            log.info("feature cache hit: %s", path)
            return FeatureSet(t["features"], t["ok"].bool(), cached=True, mirrored=mirrored)
        log.warning("ignoring feature cache with unexpected shape: %s", path)
    ids = [_file_id(r) for r in records]
    known = _cached_rows(Path(cache_dir), trunk, set(ids))
    missing = [i for i, file in enumerate(ids) if file not in known]
    if missing:
        if known:
            log.info(
                "feature cache: %d of %d images known from earlier runs; extracting the other %d",
                len(records) - len(missing),
                len(records),
                len(missing),
            )
        todo = [records[i] for i in missing]
        fs = extract_features(model, world.shard(todo), preprocess, bf16=bf16, tuned=tuned, mirror=mirror, **kwargs)  # type: ignore[arg-type]
        log.info("extracted %d features in %.1fs (%.1f img/s)", int(fs.ok.sum()), fs.seconds, fs.images_per_second)
        if world.active:
            fs = FeatureSet(
                world.gather_rows(fs.features, len(todo)), world.gather_rows(fs.ok.to(torch.uint8), len(todo)).bool(), fs.seconds
            )
        known.update({ids[i]: (fs.features[j], bool(fs.ok[j])) for j, i in enumerate(missing)})
        seconds, cached = fs.seconds, False
    else:
        log.info("feature cache: every image known from earlier runs")
        seconds, cached = 0.0, True
    out = FeatureSet(
        torch.stack([known[f][0] for f in ids]) if ids else torch.zeros(0, *shape),
        torch.tensor([known[f][1] for f in ids], dtype=torch.bool),
        seconds,
        cached,
        mirrored=mirrored,
    )
    if world.is_main:
        with atomic_path(path) as tmp:
            save_file(
                {"features": out.features, "ok": out.ok.to(torch.uint8)},
                str(tmp),
                metadata={"trunk": trunk, "files": json.dumps(ids)},
            )
    return out


def _cached_rows(cache_dir: Path, trunk: str, wanted: set[str]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Feature rows of ``wanted`` files that earlier runs of the same trunk stored in ``cache_dir``.

    Each cache file lists its files (path, size, mtime) in its metadata, so a run over other sets, or a subset,
    reuses every row already computed and extracts only the rest.
    """
    from safetensors import safe_open

    rows: dict[str, tuple[torch.Tensor, bool]] = {}
    for path in sorted(cache_dir.glob("features-*.safetensors")) if cache_dir.is_dir() else []:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("trunk") != trunk:
                    continue
                files = json.loads(meta.get("files", "[]"))
                take = [i for i, file in enumerate(files) if file in wanted and file not in rows]
                if not take:
                    continue
                features, ok = f.get_tensor("features"), f.get_tensor("ok").bool()
        except Exception as e:  # a damaged cache file is skipped, never trusted
            log.warning("feature cache: ignoring %s (%s)", path, type(e).__name__)
            continue
        if features.shape[0] != len(files) or ok.shape[0] != len(files):
            continue
        rows.update({files[i]: (features[i], bool(ok[i])) for i in take})
        if len(rows) == len(wanted):
            break
    return rows
