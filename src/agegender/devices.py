"""The machine a network runs on: precision and cores. Torch-free at import, so ONNX inference can use it."""

from __future__ import annotations

import os
import sys

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str) -> bool:
    """Whether ``device`` does bf16 matrix maths in hardware (CPU: AVX512-BF16 or AMX; CUDA: Ampere or later)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return kind == "cpu" and any(probe is not None and probe() for probe in probes)


def use_bf16(precision: str, device: str) -> bool:
    """``precision`` resolved for ``device``: auto means bf16 exactly where the hardware has bf16 units."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_threads() -> int:
    """Intra-op threads for a torch compute loop on this machine: ``OMP_NUM_THREADS`` when it is set (the user's
    choice, or torchrun's one thread per rank), else every core this process may use (its affinity mask).

    The machine's load is deliberately not an input. Measured on 2 cores with OMP_WAIT_POLICY=PASSIVE (issue 13):
    at 1-minute load ~1.5 the bf16 batch-512 head step ran 1415 img/s on 2 threads against 876 on 1; at load ~4.5
    the two were level (766 vs 796, within the runs' spread), so fewer threads under load gains nothing measurable,
    while the thread count changes float reduction order, so a load-dependent count would make a seeded run's
    results depend on what else the machine was doing.
    """
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return usable_cores()


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Keep memory that the process frees for its own reuse instead of handing it back to the kernel (glibc).

    Training frees and allocates the same ~150 MB of gradients and bf16 weight casts on every head step.
    glibc returns blocks above its mmap threshold to the kernel at once, and the next step faults every page in
    again (DECISIONS.md: freed memory kept for reuse). Blocks under ``limit`` then come from the heap,
    and the heap keeps up to ``limit`` of free memory. Process-wide; returns whether it took effect (False
    where the C library is not glibc).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))
