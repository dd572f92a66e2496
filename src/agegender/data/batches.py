"""Decoded image batches and training mini-batches (cached trunk features or images)."""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..distributed import World
from ..errors import OptionError
from ..images import Framer, Skipped, load_rgb
from ..model.config import Preprocess
from .records import FaceRecord


def decode_batch(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    workers: int = 2,
    frame: Framer | None = None,
    skipped: Skipped | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` in order on ``workers`` threads -> (uint8 ``(N, size, size, 3)``, bool ok mask).

    Failed images are left as zeros with ``ok[i] = False``.
    """
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)

    def one(i: int) -> None:
        img = load_rgb(paths[i], size, skipped, frame)
        if img is not None:
            out[i], ok[i] = img, True

    if workers <= 1:
        for i in range(len(paths)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            list(pool.map(one, range(len(paths))))
    return out, ok


def iter_batches(
    records: Sequence[FaceRecord] | Sequence[str | os.PathLike[str]],
    size: int,
    batch_size: int,
    workers: int = 2,
    prefetch: int = 2,
    skipped: Skipped | None = None,
    frame: Framer | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(indices, uint8 tensor (n, size, size, 3))`` batches in order, decoding ``prefetch`` batches ahead.

    ``indices`` are positions in ``records``. Undecodable images are left out (so a batch may be short,
    and an all-bad batch is not yielded) and recorded in ``skipped``. Pixels are not normalised here.
    """
    import torch

    paths = [r.path if isinstance(r, FaceRecord) else r for r in records]
    starts = range(0, len(paths), batch_size)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    pending: collections.deque[tuple[int, list[Future[np.ndarray | None]]]] = collections.deque()
    try:
        for start in starts:
            pending.append((start, [pool.submit(load_rgb, p, size, skipped, frame) for p in paths[start : start + batch_size]]))
            if len(pending) > prefetch:
                yield from _collect(*pending.popleft(), torch)
        while pending:
            yield from _collect(*pending.popleft(), torch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(start: int, futures: list[Future[np.ndarray | None]], torch: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    images = [f.result() for f in futures]
    keep = [i for i, img in enumerate(images) if img is not None]
    if keep:
        yield np.asarray(keep, np.int64) + start, torch.from_numpy(np.stack([img for img in images if img is not None]))


def augment_images(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and a shift of up to ``max_shift`` pixels with edge replication.

    ``batch`` is ``(N, H, W, C)`` of any dtype; the result has the same shape and dtype. All randomness
    comes from ``generator``, so a seeded generator reproduces the same augmentation.
    """
    import torch

    n, h, w = batch.shape[:3]
    flip = torch.rand(n, generator=generator) < 0.5
    shift_y = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator)
    shift_x = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator)
    rows = (torch.arange(h) + shift_y).clamp_(0, h - 1)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = (cols + shift_x).clamp_(0, w - 1)
    return batch[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclass
class FeatureSet:
    """Trunk features of some records, in their order: what a cached run trains on."""

    features: torch.Tensor  # (N, D) float32, rows of unreadable images are zero
    ok: torch.Tensor  # (N,) bool, False where the image could not be decoded
    seconds: float = 0.0
    cached: bool = False
    # Rows of (image, mirror image): their features (N, 2, D), or their activations in front of the trunk's tuned
    # levels (N, 2, C, H, W) float16. A convolution is not mirror-symmetric, so a flipped face's are computed.
    mirrored: bool = False

    @property
    def images_per_second(self) -> float:
        return float(self.ok.sum()) / self.seconds if self.seconds else float("nan")


@dataclass
class Labels:
    gender: torch.Tensor  # (N,) float 0/1
    age: torch.Tensor  # (N,) float, NaN where unknown

    @classmethod
    def of(cls, records: Sequence[FaceRecord]) -> Labels:
        return cls(
            torch.tensor([r.gender for r in records], dtype=torch.float32),
            torch.tensor([math.nan if r.age is None else r.age for r in records], dtype=torch.float32),
        )


# Decoded uint8 images are kept in memory up to this size, so end-to-end epochs decode nothing.
IMAGE_MEMORY_BYTES = 2 << 30


class Batches:
    """Mini-batches of either cached trunk features or images (decoded once when they fit in memory)."""

    def __init__(
        self,
        records: Sequence[FaceRecord],
        preprocess: Preprocess,
        batch_size: int,
        workers: int = 2,
        features: FeatureSet | None = None,
        world: World = World(),
        keep_images: bool = False,
        frame: Framer | None = None,
    ) -> None:
        if batch_size < 1 or workers < 1:  # options reach here from several commands: one line, not a range() error
            raise OptionError(
                f"`batch_size` and `workers` must be at least 1, got {batch_size} and {workers}", "batch_size", "workers"
            )
        self.frame = frame
        self.records, self.pre, self.features, self.world = records, preprocess, features, world
        self.batch_size, self.workers, size = batch_size, workers, preprocess.size
        self.images: torch.Tensor | None = None
        # Which records decoded; None until known (decoded batch by batch, unreadable ones dropped there).
        self.ok: np.ndarray | None = None
        if features is not None:
            self.ok = features.ok.numpy()
        elif keep_images and len(records) * size**2 * 3 <= IMAGE_MEMORY_BYTES:
            images, self.ok = decode_batch([r.path for r in records], size, workers, frame)
            self.images = torch.from_numpy(images)

    @property
    def valid(self) -> np.ndarray:
        """Indices of the records known to decode (all of them until decoding says otherwise)."""
        return np.arange(len(self.records)) if self.ok is None else np.flatnonzero(self.ok)

    @property
    def cached(self) -> bool:
        return self.features is not None

    def _cached(self, chunk: np.ndarray, augment: torch.Generator | None) -> torch.Tensor:
        """Cached rows of ``chunk``; of mirrored rows the image's, or with ``augment`` the mirror image's half of
        the time."""
        assert self.features is not None
        x = self.features.features[torch.as_tensor(chunk)]
        if not self.features.mirrored:
            return x
        side = torch.zeros(len(chunk), dtype=torch.long)
        if augment is not None:
            side = torch.randint(0, 2, (len(chunk),), generator=augment)
        return x[torch.arange(len(chunk)), side].float()

    def __call__(
        self, idx: np.ndarray, augment: torch.Generator | None = None, shard: bool = False, batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, np.ndarray, int]]:
        """Yield (input, record indices, global batch size); ``shard`` gives each rank its share of a batch."""
        bs, device = batch_size or self.batch_size, self.world.device
        for start in range(0, len(idx), bs):
            full = idx[start : start + bs]
            chunk = self.world.shard(full) if shard else full
            if self.ok is not None:
                chunk = chunk[self.ok[chunk]]
            if self.features is not None:
                if len(chunk):
                    yield self._cached(chunk, augment).to(device), chunk, len(full)
                continue
            if self.images is not None:
                x = self.images[torch.as_tensor(chunk)]
            else:
                images, ok = decode_batch([self.records[i].path for i in chunk], self.pre.size, self.workers, self.frame)
                chunk, x = chunk[ok], torch.from_numpy(images[ok])
            if not len(chunk):
                continue
            if augment is not None:
                x = augment_images(x, augment)
            yield self.pre.normalize(x).to(device), chunk, len(full)
