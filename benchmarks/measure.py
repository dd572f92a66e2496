"""Small torch helpers shared by the measuring phases (torch is imported on first use)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it (no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, bf16: bool) -> Any:
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def set_memory_format(model: Any, channels_last: bool) -> None:
    import torch

    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
