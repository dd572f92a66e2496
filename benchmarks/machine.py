"""The machine the figures come from, its load, and a process's peak memory."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM is per address space, so a parent's pages never count."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak * 1024 / 2**30


def _cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return cpu


def _bf16_units() -> str:
    """The CPU's bf16 matrix units, which set the bf16 figures: AMX tiles, AVX512-BF16 or none."""
    import torch

    def has(name: str) -> bool:
        probe = getattr(torch.cpu, name, None)
        return bool(probe and probe())

    units = [
        label for name, label in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")) if has(name)
    ]
    return " + ".join(units) or "none"


def machine_info(device: str) -> dict[str, Any]:
    import PIL
    import torch

    from agegender.devices import usable_cores

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU available"
    return {
        "cpu": _cpu_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_start": loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_units": _bf16_units(),
        "onnxruntime": ort_version,
        "pillow": PIL.__version__,
        "gpu": gpu,
        "device": device,
        "platform": platform.platform(),
    }
