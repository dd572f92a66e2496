"""Data-parallel training under torchrun: process group setup, sharding and gathering. One process is a no-op."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

ShardT = TypeVar("ShardT", np.ndarray, Sequence[Any])


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, idx: ShardT) -> ShardT:
        """This rank's share of a global batch (or index list): every size-th element from rank."""
        return idx[self.rank :: self.size]

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of :meth:`shard` for row tensors: every rank gets all ``n`` rows back in order."""
        if not self.active:
            return local
        import torch.distributed as dist

        per = -(-n // self.size)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r, part in enumerate(parts):
            count = len(range(r, n, self.size))
            out[r :: self.size] = part[:count]
        return out

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics, so evaluation agrees everywhere."""
        if self.active:
            import torch.distributed as dist

            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def init_world(device: str = "cpu") -> World:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    log.info("rank %d of %d on %s", rank, size, device)
    return World(rank, size, device)


def close_world(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
