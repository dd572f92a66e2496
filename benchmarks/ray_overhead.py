"""Ray against the plain path on one machine (the overhead ratio), and 1 against 2 Ray workers (the scaling).

``python benchmarks/ray_overhead.py --faces DIR --model M [--n 200] [--small 10] [--reps 3]``: the first ``n``
photos of DIR, each measure run once per repetition, interleaved (the order reversed every other repetition, so
a load that drifts hits both sides alike); medians, with the 1-minute load each ran under. A local Ray is
started once and its start is reported apart: a cluster is started once for many jobs. Both paths build their
predictors inside the measured time, as a command would, so a job's fixed cost (Ray's: starting and loading
the actors, some seconds) weighs on ``n`` photos; runs on ``small`` photos measure it, and the marginal ratio
``(ray(n) - ray(small)) / (plain(n) - plain(small))`` is the overhead of a job large enough for it not to
matter. Needs the ``ray`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("ray_overhead")

SUFFIXES = (".jpg", ".jpeg", ".png")


def sample(faces: Path, n: int) -> list[str]:
    photos = sorted(str(p) for p in faces.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not photos:
        raise SystemExit(f"{faces}: no photos")
    return photos[:n]


def plain(model: str, paths: list[str]) -> float:
    """The single-machine path as ``agegender predict`` runs it: one predictor, a thread per core."""
    from agegender.infer.predict import Predictor, share_cores_for_batches

    begin = time.perf_counter()
    predictor = Predictor.from_path(model)
    share_cores_for_batches(predictor)
    n = sum(1 for _ in predictor.predict_many(paths))
    assert n == len(paths)
    return time.perf_counter() - begin


def on_ray(model: str, paths: list[str], workers: int, scratch: Path) -> float:
    from agegender.infer.ray_predict import predict_on_ray

    out = scratch / f"ray{workers}"
    shutil.rmtree(out, ignore_errors=True)
    begin = time.perf_counter()
    summary = predict_on_ray(paths, out, model, workers=workers)
    seconds = time.perf_counter() - begin
    assert summary.images == len(paths), summary
    return seconds


def interleave(measures: dict[str, Callable[[], float]], reps: int) -> dict[str, list[tuple[float, float]]]:
    """Each measure's (seconds, 1-minute load) per repetition, in A B C, C B A, ... order."""
    names = list(measures)
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            load = os.getloadavg()[0]
            runs[name].append((measures[name](), load))
            log.info("rep %d/%d %s: %.2f s (load %.2f)", rep + 1, reps, name, runs[name][-1][0], load)
    return runs


def report(runs: dict[str, list[tuple[float, float]]], n: int) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        return round(float(statistics.median(values)), 3)

    def paired(a: str, b: str) -> dict[str, Any]:
        ratios = [x[0] / y[0] for x, y in zip(runs[a], runs[b], strict=True)]
        return {"median": median(ratios), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}

    out: dict[str, Any] = {
        name: {"seconds": median([s for s, _ in r]), "runs": [round(s, 2) for s, _ in r], "load": median([x for _, x in r])}
        for name, r in runs.items()
    }
    for name in ("plain", "ray", "ray1"):
        out[name]["images_per_s"] = round(n / out[name]["seconds"], 2)
    out["overhead_ray_vs_plain"] = paired("ray", "plain")
    out["speedup_2_vs_1_workers"] = paired("ray1", "ray")
    if "ray_small" in runs:
        marginal = [
            (r[0] - rs[0]) / (p[0] - ps[0])
            for r, rs, p, ps in zip(runs["ray"], runs["ray_small"], runs["plain"], runs["plain_small"], strict=True)
        ]
        out["marginal_overhead_ray_vs_plain"] = {
            "median": median(marginal),
            "min": round(min(marginal), 3),
            "max": round(max(marginal), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", required=True, help="a folder of photos")
    parser.add_argument("--model", required=True, help="a model (.onnx, checkpoint or run directory)")
    parser.add_argument("--n", type=int, default=200, help="photos to predict per run")
    parser.add_argument("--small", type=int, default=10, help="photos of the fixed-cost runs (0: none)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=None, help="the local Ray's CPUs (default: every usable core)")
    parser.add_argument("--json", help="also write the figures here")
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    from agegender.devices import usable_cores
    from agegender.infer.ray_predict import start_ray

    paths = sample(Path(a.faces), a.n)
    cores = a.cpus or usable_cores()
    begin = time.perf_counter()
    start_ray(None, cores)
    ray_start = time.perf_counter() - begin
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            measures = {
                "plain": lambda: plain(a.model, paths),
                "ray": lambda: on_ray(a.model, paths, cores, scratch),
                "ray1": lambda: on_ray(a.model, paths, 1, scratch),
            }
            if a.small:
                measures |= {
                    "plain_small": lambda: plain(a.model, paths[: a.small]),
                    "ray_small": lambda: on_ray(a.model, paths[: a.small], cores, scratch),
                }
            runs = interleave(measures, a.reps)
    finally:
        ray.shutdown()
    figures = {
        "photos": len(paths),
        "cores": cores,
        "ray_start_s": round(ray_start, 2),
        "model": a.model,
        **report(runs, len(paths)),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
