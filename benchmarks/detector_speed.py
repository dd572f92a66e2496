"""Face detectors side by side on real photos: how often each finds a face, a centred face, and how fast.

    python benchmarks/detector_speed.py [--faces DIR] [--lfw 1000] [--plain-haar]

Every detector runs on every image in turn, in an order that rotates from image to image, so that a busy
machine or a warm cache slows them alike. Times are per image, decoded already, on one thread: the
onnxruntime session has one intra-op thread and OpenCV's pool is set to one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

Box = tuple[float, float, float, float]  # x, y, w, h in pixels
Detect = Callable[[np.ndarray], list[Box]]

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


def centred(boxes: Sequence[Box], height: int, width: int, tolerance: float = 0.12) -> bool:
    """A box of plausible size centred near the image centre, where these datasets put the face.

    The test in tests/test_detect.py, so that the numbers compare with the Haar ones measured there.
    """
    return any(
        abs(x + w / 2 - width / 2) < tolerance * width
        and abs(y + h / 2 - height / 2) < tolerance * height
        and 0.2 < w / width < 0.8
        for x, y, w, h in boxes
    )


def measure(images: Sequence[np.ndarray], detectors: Mapping[str, Detect]) -> dict[str, dict[str, float]]:
    """Per detector: ``hit_rate`` (a face found), ``centred_rate`` (see :func:`centred`), ``ms`` (median per image).

    ``images`` are ``(H, W, 3)`` uint8 RGB. The first image is run once untimed per detector, to warm it up.
    """
    names = list(detectors)
    if not images or not names:
        return {}
    for name in names:
        detectors[name](images[0])
    hits = {n: 0 for n in names}
    central = {n: 0 for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for k, image in enumerate(images):
        h, w = image.shape[:2]
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            boxes = detectors[name](image)
            times[name].append(time.perf_counter() - start)
            hits[name] += bool(boxes)
            central[name] += centred(boxes, h, w)
    n = len(images)
    return {
        name: {
            "hit_rate": hits[name] / n,
            "centred_rate": central[name] / n,
            "ms": 1000 * statistics.median(times[name]),
            "images": n,
        }
        for name in names
    }


def haar_detector(scale_factor: float = 1.1, min_neighbors: int = 2, min_size: int = 40, shrink: bool = True) -> Detect:
    """OpenCV's frontal-face cascade on the equalised grey image, as the project's HaarDetector runs it.

    With ``shrink`` the image is first scaled so that ``min_size`` meets the cascade's 24 px window, which finds
    the same faces as ``minSize=min_size`` at full size for a fraction of the cost (the project's way; its
    alt2 fallback cascade is left out). Without, the cascade scans the full-size image.
    """
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load {HAAR_CASCADE}")
    window = 24  # the cascade's training window

    def detect(rgb: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = window / min_size if shrink else 1.0
        if scale != 1.0:
            h, w = gray.shape
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        found = cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(round(min_size * scale),) * 2
        )
        return [tuple(float(v) / scale for v in box) for box in found]

    return detect


def retinaface_detector(**kwargs: object) -> Detect:
    """Every box (no size floor) of a one-thread :class:`RetinaFace` made with ``kwargs``."""
    from agegender.faces.detect import RetinaFace

    detector = RetinaFace(min_face_px=1, threads=1, **kwargs)  # type: ignore[arg-type]

    def detect(rgb: np.ndarray) -> list[Box]:
        return [(d.x, d.y, d.w, d.h) for d in detector.detect(rgb)]

    return detect


def load(files: Sequence[Path]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def default_faces_dir() -> Path:
    """$AGEGENDER_FACES, else ../shared/faces beside the checkout, found as tests/conftest.py and
    benchmarks/inputs.py find it (this script also runs on its own, outside the package)."""
    env = os.environ.get("AGEGENDER_FACES")
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared" / "faces", repo.parent.parent / "shared" / "faces"]
    return Path(env) if env else next((c for c in candidates if c.is_dir()), candidates[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=default_faces_dir(), help="the shared faces folder")
    parser.add_argument("--lfw", type=int, default=1000, help="LFW photos to use (the first N by name)")
    parser.add_argument("--plain-haar", action="store_true", help="also run the cascade on the full-size image")
    args = parser.parse_args(argv)
    if not args.faces.is_dir():
        print(f"{args.faces}: no such folder (set AGEGENDER_FACES)", file=sys.stderr)
        return 1
    from agegender.process import set_process_threads

    set_process_threads(1, torch=False)  # for this process's life: one core per detector call, as predict runs them
    detectors = {
        "Haar (1.1, 2, 40 px, shrunk)": haar_detector(),
        "RetinaFace (max_side 640)": retinaface_detector(),
        "RetinaFace (max_side 320)": retinaface_detector(max_side=320),
    }
    if args.plain_haar:
        detectors["Haar (1.1, 2, 40 px, full size)"] = haar_detector(shrink=False)
    sets = {
        "FairFace": sorted((args.faces / "fairface").glob("*.jpg")),
        "WIKI": sorted((args.faces / "wiki").rglob("*.jpg")),
        "LFW": sorted((args.faces / "lfw").glob("*.jpg"))[: args.lfw],
    }
    print("| set | images | detector | a face | a centred face | ms / image |")
    print("|---|---:|---|---:|---:|---:|")
    for set_name, files in sets.items():
        if not files:
            continue
        for name, row in measure(load(files), detectors).items():
            print(
                f"| {set_name} | {row['images']} | {name} | {100 * row['hit_rate']:.1f}% "
                f"| {100 * row['centred_rate']:.1f}% | {row['ms']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
