"""The measuring phases, each run in its own interpreter so its peak memory and thread settings are its own;
which phases share state; and the earlier results ``--reuse`` keeps."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agegender.errors import AgeGenderError
from agegender.files import write_text_atomic

from .accuracy import phase_accuracy
from .extraction import phase_throughput
from .inference import phase_inference, phase_predict
from .machine import loadavg, peak_rss_gib
from .training import phase_extract, phase_steps, phase_train

log = logging.getLogger(__name__)

# Phases that share state are run (or reused) together: the feature cache ties extract, train and steps; the
# trained checkpoint ties inference and predict to train; predict and the peer are compared, so they run as one.
# accuracy (figure 7) trains its own models on the real photos and runs its own peer comparisons.
GROUPS = (("throughput",), ("extract", "train", "steps"), ("inference",), ("peer", "predict"), ("accuracy",))
AFTER_TRAIN = frozenset({"inference", "predict"})  # phases that read the train phase's checkpoint
PHASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "throughput": phase_throughput,
    "extract": phase_extract,
    "train": phase_train,
    "steps": phase_steps,
    "inference": phase_inference,
    "predict": phase_predict,
    "accuracy": phase_accuracy,
}
# Environment a phase's interpreter starts with (a value already set by the user wins). OpenMP threads that spin at
# barriers lose most of their speed on shared cores; the agegender CLI sets PASSIVE before torch loads, and figure
# 7 times the product as the CLI runs it; so do figures 1-3 (extraction and training as `agegender train` runs them).
_PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
PHASE_ENV: dict[str, dict[str, str]] = {name: _PASSIVE for name in ("accuracy", "throughput", "extract", "train", "steps")}
# The folder holding the benchmarks package, so phase interpreters import it from wherever they start.
_ROOT = Path(__file__).resolve().parents[1]


def previous_run(path: Path, mode: str) -> dict[str, Any]:
    """Phase results of an earlier run in the same mode (``--reuse``), each keyed by phase, plus its date."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AgeGenderError(f"{path}: cannot reuse it ({e})") from None
    if doc.get("mode") != mode:
        log.warning("%s is a %s run, not %s: nothing reused", path, doc.get("mode"), mode)
        return {}
    return doc["raw"]


def _child_env(phase: str = "") -> dict[str, str]:
    env = {**PHASE_ENV.get(phase, {}), **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_phase(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; returns its result plus ``peak_rss_gib``, or ``{"error": ...}``."""
    log.info("phase %s ...", name)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agegender-bench-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(ctx))
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--phase", name, "--spec", str(spec), "--result", str(result)],
            check=False,
            stdout=subprocess.DEVNULL,
            env=_child_env(name),
        )
        if proc.returncode != 0 or not result.is_file():
            log.error("phase %s failed (exit %d)", name, proc.returncode)
            return {"error": f"phase {name} exited with status {proc.returncode} (its log is above)"}
        out = json.loads(result.read_text())
    log.info("phase %s done in %.0f s", name, time.perf_counter() - start)
    return out


def child(phase: str, spec: str, result: str) -> int:
    """The phase interpreter's side of :func:`run_phase`: run ``phase`` on the spec, write its result."""
    ctx = json.loads(Path(spec).read_text())
    load = loadavg()
    out = PHASES[phase](ctx)
    out["load_average_start"] = load
    out["peak_rss_gib"] = peak_rss_gib()
    write_text_atomic(result, json.dumps(out))
    return 0
