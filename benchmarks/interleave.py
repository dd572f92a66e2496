"""Measurements that hold up on a shared machine: compared things run interleaved (A B, B A, A B, ...), each is
reported as its median with min and max, and every run records the 1-minute load average it ran under."""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)


def load1() -> float | None:
    """The 1-minute load average now (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def spread(values: Sequence[float], loads: Sequence[float | None] = ()) -> dict[str, Any]:
    """``values`` as median, min and max, with the runs themselves and the median 1-minute load they ran under."""
    known = [x for x in loads if x is not None]
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "runs": [float(v) for v in values],
        "load": float(statistics.median(known)) if known else None,
        "loads": [None if x is None else round(x, 2) for x in loads],
    }


def interleave(measures: Mapping[str, Callable[[], float]], reps: int, label: str = "") -> dict[str, dict[str, Any]]:
    """Run every measure once per repetition, the order reversed every other repetition (so each neighbour pair
    runs A B, then B A: a load that drifts through the run hits both sides alike); each measure's spread."""
    names = list(measures)
    values: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float | None]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            loads[name].append(load1())
            values[name].append(measures[name]())
            log.info(
                "%srep %d/%d %s: %.4g (load %s)",
                f"{label}: " if label else "",
                rep + 1,
                reps,
                name,
                values[name][-1],
                loads[name][-1],
            )
    return {n: spread(values[n], loads[n]) for n in names}


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-repetition ``a / b`` of two interleaved measures (runs paired by repetition), as a spread; the loads are
    both sides' together."""
    pairs = list(zip(a["runs"], b["runs"], strict=True))
    loads = [x for x in (*a.get("loads", ()), *b.get("loads", ())) if x is not None]
    return spread([x / y for x, y in pairs], loads)
