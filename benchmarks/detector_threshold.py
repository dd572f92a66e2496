"""Figure 9: RetinaFace's score threshold, chosen from misses on labelled faces and false positives on face-free images.

    python -m benchmarks.detector_threshold --faces ../shared/faces [--photos 600] [--free 600] [--out DIR]

Every image is run once through the detector as ``predict`` runs it (bundled RetinaFace, ``max_side`` 640), keeping
every box that scores above :data:`FLOOR`; each threshold is then applied to those boxes. That is exact: greedy NMS
only ever suppresses a box by a better one, so the boxes above ``t`` are the same whether NMS saw the candidates
above ``t`` or above the floor, and the smallest-face filter (``--min-face``, the CLI's default) is per box.

Misses. A seeded sample of the labelled photos (LFW, WIKI and FairFace photos and the UTKFace crops), each holding
its labelled face at the centre, as they are (``portrait``); and each photo once more made harder, in turn
``small`` (shrunk until the face is 48-80 px tall, as in a group photo), ``partial`` (cut so that the border leaves
50-75% of the face, from one side), ``blurred`` (Gaussian, sigma 3-8% of the face's height, out of focus) and
``dark`` (brightness times 0.12-0.3, underexposed). Portraits are easy (their faces score 0.99), while the faces
a threshold decides on are the bystanders: blurred, small, cut or dim. The face's box is the portrait's own
box over the centre scoring 0.9 or more (a photo without one gets no hard copy), moved with the image. A face
is found at ``t`` when a box scoring above ``t``, at least ``--min-face`` px on its longer side, contains its
point: the image centre for a portrait, the centre of the face box's visible part for a hard copy; otherwise it
is a miss. Boxes elsewhere on the portraits are counted apart ("other boxes"): bystanders, or false positives,
which cannot be told apart without labels.

False positives: images that hold no face, from three sources, every box on them above ``t`` counted.

- ``background``: a LFW, WIKI or FairFace photo outside the face sample with every face painted out (filled flat
  with the photo's mean colour): the subject (the box subject rule picks, or the central 40% of the photo
  when there is none) and every other face, which here means any box of OpenCV's Haar cascade (an independent
  detector, at a sensitive setting) or any RetinaFace box scoring 0.9 or more, each grown 1.6x about its centre to
  take in hair, ears and chin. What is left is the photo's own background, clothes, hands and bodies at full
  resolution. RetinaFace's boxes under 0.9 are deliberately not painted: they are the false positives to count.
  Bystanders that neither detector finds (profiles, blurred or cut faces) are left, though: a person looked at every
  box on these images (``false_positives.png`` shows them) and :data:`REVIEW` lists the images that still hold a
  face. Those are left out of the face-free set; any box on an image nobody has reviewed counts as a false
  positive, and the report says how many such images there are.
- ``phase``: a face photo with its Fourier phase randomised (the same random phase added to all three channels),
  which keeps its amplitude spectrum and colours but no face.
- ``tiles``: a face photo cut into tiles of about 24 px, smaller than an eye in these photos, shuffled and each
  turned by a random multiple of 90 degrees: the textures of a face (skin, hair, parts of eyes) without its layout.
  (Tiles of a third of the face hold a nose and an eye, and RetinaFace finds those as faces at 0.99.)

The threshold is chosen by :data:`RULE`. Each part draws from its own seeded generator, so that changing one
(``--free``, say) leaves the others' images as they were.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import bench_home, faces_dir

log = logging.getLogger(__name__)

PROG = "python -m benchmarks.detector_threshold"
FLOOR = 0.1  # boxes kept per image: every threshold swept lies above it
THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95
PHOTO_SHARES = {"lfw": 0.25, "wiki": 0.25, "fairface": 0.25, "utkface": 0.125, "utkface_rest": 0.125}
BACKGROUND_SETS = ("lfw", "wiki", "fairface")  # photos with room around the face; the UTKFace crops have none
HARD = ("small", "partial", "blurred", "dark")
FREE_SHARES = {"background": 0.5, "phase": 0.25, "tiles": 0.25}
GROW = 1.6  # a face box grown this much (about its centre) covers the hair, ears and chin
SURE_FACE = 0.9  # a RetinaFace box at or above this score is taken for a face (painted out; moved with a hard copy)
TILE_PX = 24
REVIEW = Path(__file__).with_name("face_free_review.json")
RULE = (
    "the threshold with the fewest misses plus false positives, each per image of its own set (the miss rate "
    "over every labelled face, portraits and hard copies alike, plus the false positives per face-free image); a "
    "tie goes to the lower threshold"
)

Box = tuple[float, float, float, float, float]  # x, y, w, h, score
Rect = tuple[float, float, float, float]  # x1, y1, x2, y2


@dataclass
class Scanned:
    """One image's boxes above :data:`FLOOR`. ``kind`` is the face set, the hard copy's kind or the face-free
    source; ``target`` is the labelled face's point (None on a face-free image)."""

    name: str
    kind: str
    height: int
    width: int
    boxes: list[Box] = field(default_factory=list)
    target: tuple[float, float] | None = None


# -- the criteria, per image -----------------------------------------------------------------------------
def kept(boxes: Sequence[Box], t: float, min_face: float) -> list[Box]:
    """The boxes ``predict`` would report at threshold ``t``: score above ``t``, longer side at least ``min_face``."""
    return [b for b in boxes if b[4] > t and max(b[2], b[3]) >= min_face]


def contains(box: Sequence[float], point: tuple[float, float]) -> bool:
    x, y, w, h = box[:4]
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def face_found(image: Scanned, t: float, min_face: float) -> bool:
    """The labelled face is found: a kept box contains its point."""
    return image.target is not None and any(contains(b, image.target) for b in kept(image.boxes, t, min_face))


def sweep(
    faces: Sequence[Scanned], free: Sequence[Scanned], min_face: float, thresholds: Sequence[float] = THRESHOLDS
) -> list[dict[str, Any]]:
    """Per threshold: misses by kind, other boxes on the portraits, false positives on the face-free images by source."""
    rows = []
    for t in thresholds:
        miss_by: dict[str, int] = {}
        fp_by: dict[str, int] = {}
        misses = other = fp = fp_images = 0
        for f in faces:
            hit = face_found(f, t, min_face)
            misses += not hit
            miss_by[f.kind] = miss_by.get(f.kind, 0) + (not hit)
            if f.kind in PHOTO_SHARES and f.target is not None:
                other += sum(not contains(b, f.target) for b in kept(f.boxes, t, min_face))
        for f in free:
            n = len(kept(f.boxes, t, min_face))
            fp += n
            fp_images += n > 0
            fp_by[f.kind] = fp_by.get(f.kind, 0) + n
        rows.append(
            {
                "threshold": t,
                "faces": len(faces),
                "misses": misses,
                "miss_rate": misses / max(1, len(faces)),
                "other_boxes": other,
                "free_images": len(free),
                "false_positives": fp,
                "fp_images": fp_images,
                "fp_per_image": fp / max(1, len(free)),
                "misses_by_kind": miss_by,
                "fp_by_source": fp_by,
            }
        )
    return rows


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row :data:`RULE` picks."""
    return min(rows, key=lambda r: (round(r["miss_rate"] + r["fp_per_image"], 9), r["threshold"]))


# -- the images ----------------------------------------------------------------------------------------
def set_files(faces: Path) -> dict[str, list[Path]]:
    """Every photo of each labelled set, sorted (WIKI's sit in train/test and gender subfolders)."""
    return {name: sorted((faces / name).rglob("*.jpg")) for name in PHOTO_SHARES if (faces / name).is_dir()}


def split_counts(total: int, shares: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """``total`` shared out by ``shares`` (rounded down, the remainder to the first), each capped by what is there."""
    counts = {k: math.floor(total * s) for k, s in shares.items() if available.get(k)}
    if counts:
        first = next(iter(counts))
        counts[first] += total - sum(counts.values())
    return {k: min(n, available[k]) for k, n in counts.items()}


def pick(
    files: dict[str, list[Path]], counts: dict[str, int], rng: np.random.Generator, taken: Collection[Path] = ()
) -> list[tuple[str, Path]]:
    """A seeded sample of ``counts[name]`` files of each set, none of them in ``taken``."""
    taken = set(taken)
    out = []
    for name, n in counts.items():
        pool = [f for f in files.get(name, []) if f not in taken]
        out += [(name, pool[i]) for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    return out


def phase_scramble(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with a random phase added to every channel's spectrum; each channel keeps its mean and spread."""
    img = rgb.astype(np.float64)
    # The phase of real noise's spectrum is odd-symmetric, so the scrambled image stays real.
    noise = np.angle(np.fft.fft2(rng.random(img.shape[:2])))
    out = np.empty_like(img)
    for c in range(3):
        spectrum = np.fft.fft2(img[..., c])
        channel = np.real(np.fft.ifft2(np.abs(spectrum) * np.exp(1j * (np.angle(spectrum) + noise))))
        spread = channel.std()
        channel = (channel - channel.mean()) * (img[..., c].std() / spread if spread > 0 else 0.0)
        out[..., c] = channel + img[..., c].mean()
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def shuffle_tiles(rgb: np.ndarray, rng: np.random.Generator, tile_px: int = TILE_PX) -> np.ndarray:
    """The largest centred square of ``rgb`` cut into a grid of tiles of about ``tile_px``, shuffled and each turned."""
    h, w = rgb.shape[:2]
    grid = max(2, min(h, w) // tile_px)
    tile = min(h, w) // grid
    side = tile * grid
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    tiles = [square[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(grid) for c in range(grid)]
    order = rng.permutation(len(tiles))
    turned = [np.rot90(tiles[i], int(rng.integers(4))) for i in order]
    rows = [np.concatenate(turned[r * grid : (r + 1) * grid], axis=1) for r in range(grid)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def grown(box: Sequence[float], factor: float = GROW) -> Rect:
    """``(x1, y1, x2, y2)`` of ``box`` (x, y, w, h, ...) scaled by ``factor`` about its centre."""
    x, y, w, h = box[:4]
    cx, cy = x + w / 2, y + h / 2
    return cx - factor * w / 2, cy - factor * h / 2, cx + factor * w / 2, cy + factor * h / 2


def paint_out(rgb: np.ndarray, rects: Sequence[Rect]) -> np.ndarray:
    """A copy of ``rgb`` with each ``(x1, y1, x2, y2)`` filled flat with the photo's mean colour."""
    out = rgb.copy()
    fill = rgb.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    h, w = rgb.shape[:2]
    for x1, y1, x2, y2 in rects:
        out[max(0, math.floor(y1)) : min(h, math.ceil(y2)), max(0, math.floor(x1)) : min(w, math.ceil(x2))] = fill
    return out


def harder(rgb: np.ndarray, face: Sequence[float], kind: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """A harder copy of a portrait whose face is ``face`` (x, y, w, h), and the point a detection must cover."""
    import cv2

    x, y, w, h = face[:4]
    centre = (x + w / 2, y + h / 2)
    if kind == "small":
        scale = min(1.0, rng.uniform(48, 80) / h)
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), (centre[0] * scale, centre[1] * scale)
    if kind == "partial":
        keep = rng.uniform(0.5, 0.75)
        side = int(rng.integers(4))  # the border comes in from the left, right, top or bottom
        left, top, right, bottom = 0, 0, rgb.shape[1], rgb.shape[0]
        if side == 0:
            left = round(x + (1 - keep) * w)
        elif side == 1:
            right = round(x + keep * w)
        elif side == 2:
            top = round(y + (1 - keep) * h)
        else:
            bottom = round(y + keep * h)
        vx1, vy1 = max(x, left), max(y, top)
        vx2, vy2 = min(x + w, right), min(y + h, bottom)
        return (np.ascontiguousarray(rgb[top:bottom, left:right]), ((vx1 + vx2) / 2 - left, (vy1 + vy2) / 2 - top))
    if kind == "blurred":
        return cv2.GaussianBlur(rgb, (0, 0), rng.uniform(0.03, 0.08) * h), centre
    if kind == "dark":
        return np.round(rgb * rng.uniform(0.12, 0.3)).astype(np.uint8), centre
    raise ValueError(f"unknown kind {kind!r}")


# -- running the detector --------------------------------------------------------------------------------
class Scanner:
    """The bundled RetinaFace as ``predict`` runs it, every box above :data:`FLOOR`; Haar to find faces to paint out."""

    def __init__(self, threads: int = 1) -> None:
        from agegender.faces.detect import HaarDetector, RetinaFace

        self.net = RetinaFace(score_threshold=FLOOR, min_face_px=1, threads=threads)
        # Sensitive: small faces (20 px, 5% of the shorter side) and the alt2 fallback, to spare bystanders.
        self.haar = HaarDetector(min_face=0.05, min_face_px=20)

    def scan(self, rgb: np.ndarray, name: str, kind: str, target: tuple[float, float] | None = None) -> Scanned:
        boxes = [(d.x, d.y, d.w, d.h, d.score) for d in self.net.detect(rgb)]
        return Scanned(name, kind, rgb.shape[0], rgb.shape[1], boxes, target)

    def faces_to_paint(self, rgb: np.ndarray) -> list[Rect]:
        """Grown boxes of the subject and of every face Haar or a sure RetinaFace box finds in a photo."""
        from agegender.faces.framing import subject as choose_subject

        h, w = rgb.shape[:2]
        found = self.net.detect(rgb)
        subject = choose_subject([d for d in found if d.score > THRESHOLDS[0]], h, w)
        rects = [
            grown((subject.x, subject.y, subject.w, subject.h)) if subject is not None else (0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h)
        ]
        rects += [grown((d.x, d.y, d.w, d.h)) for d in found if d.score >= SURE_FACE]
        rects += [grown((b.x, b.y, b.w, b.h)) for b in self.haar.detect(rgb)]
        return rects


@dataclass(frozen=True)
class Item:
    """How to make one image again: ``kind`` from the photo at ``path`` with generator ``seed``."""

    name: str
    kind: str
    source: str
    path: Path
    seed: tuple[int, ...]
    face: tuple[float, float, float, float] | None = None  # a hard copy's face box in the portrait


def make(item: Item, scanner: Scanner) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The pixels of ``item`` and its labelled face's point (None on a face-free image)."""
    from agegender.images import load_image

    rgb = load_image(item.path)
    rng = np.random.default_rng(item.seed)
    if item.kind in PHOTO_SHARES:
        return rgb, (rgb.shape[1] / 2, rgb.shape[0] / 2)
    if item.kind in HARD:
        assert item.face is not None
        return harder(rgb, item.face, item.kind, rng)
    makers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "background": lambda im: paint_out(im, scanner.faces_to_paint(im)),
        "phase": lambda im: phase_scramble(im, rng),
        "tiles": lambda im: shuffle_tiles(im, rng),
    }
    return makers[item.kind](rgb), None


def face_free_items(files: dict[str, list[Path]], n: int, seed: int, taken: Collection[Path]) -> list[Item]:
    """``n`` face-free images by :data:`FREE_SHARES`, from photos outside ``taken``, each from a different photo."""
    counts = split_counts(n, FREE_SHARES, {k: n for k in FREE_SHARES})
    taken = set(taken)
    items = []
    for k, kind in enumerate(FREE_SHARES):
        sets = BACKGROUND_SETS if kind == "background" else tuple(PHOTO_SHARES)
        shares = split_counts(counts[kind], {s: PHOTO_SHARES[s] for s in sets}, {s: len(files.get(s, [])) for s in sets})
        for i, (source, path) in enumerate(pick(files, shares, np.random.default_rng([seed, 2, k]), taken)):
            taken.add(path)
            items.append(Item(f"{kind}:{source}/{path.name}", kind, source, path, (seed, 3, k, i)))
    return items


def measure(
    faces: Path, photos: int, free: int, seed: int, threads: int = 1
) -> tuple[list[Scanned], list[Scanned], dict[str, Item], Scanner]:
    """Scan the portraits, their hard copies and the face-free images; also how to make each one again."""
    from agegender.errors import AgeGenderError

    files = set_files(faces)
    if not files:
        raise AgeGenderError(f"{faces}: none of {', '.join(PHOTO_SHARES)} is there")
    scanner = Scanner(threads)
    sample = pick(
        files, split_counts(photos, PHOTO_SHARES, {k: len(v) for k, v in files.items()}), np.random.default_rng([seed, 1])
    )
    labelled: list[Scanned] = []
    items: dict[str, Item] = {}
    for i, (source, path) in enumerate(sample):
        portrait = Item(f"{source}/{path.name}", source, source, path, (seed, 1, i))
        rgb, point = make(portrait, scanner)
        scanned = scanner.scan(rgb, portrait.name, source, point)
        labelled.append(scanned)
        items[portrait.name] = portrait
        sure = [b for b in scanned.boxes if b[4] >= SURE_FACE and contains(b, scanned.target or (0, 0))]
        if sure:  # the portrait's own face, found for sure, moves with its hard copy
            kind = HARD[i % len(HARD)]
            x, y, w, h, _ = max(sure, key=lambda b: b[4])
            copy = Item(f"{kind}:{portrait.name}", kind, source, path, (seed, 4, i), (x, y, w, h))
            image, point = harder(rgb, (x, y, w, h), kind, np.random.default_rng(copy.seed))
            labelled.append(scanner.scan(image, copy.name, kind, point))
            items[copy.name] = copy
        if (i + 1) % 100 == 0:
            log.info("labelled photos: %d of %d", i + 1, len(sample))
    scanned_free = []
    for k, item in enumerate(face_free_items(files, free, seed, {p for _, p in sample})):
        image, _ = make(item, scanner)
        scanned_free.append(scanner.scan(image, item.name, item.kind))
        items[item.name] = item
        if (k + 1) % 100 == 0:
            log.info("face-free images: %d of %d", k + 1, free)
    return labelled, scanned_free, items, scanner


def reviewed(free: Sequence[Scanned], review: dict[str, Any], min_face: float) -> tuple[list[Scanned], list[str], list[str]]:
    """The face-free images less those the review found a face in; the names left out, and those with a box
    that counts (above the lowest threshold swept, ``min_face`` or more) that nobody reviewed."""
    with_face = set(review.get("holds_a_face", {}))
    looked = with_face | set(review.get("no_face", {}))
    kept_images = [f for f in free if f.name not in with_face]
    unreviewed = [
        f.name for f in kept_images if f.kind == "background" and f.name not in looked and kept(f.boxes, THRESHOLDS[0], min_face)
    ]
    return kept_images, sorted(with_face & {f.name for f in free}), unreviewed


def load_review(path: Path) -> dict[str, Any]:
    """``{"holds_a_face": {name: what}, "no_face": {name: what}}``; an absent file is an empty review."""
    from agegender.errors import AgeGenderError

    if not path.is_file():
        return {}
    try:
        review = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AgeGenderError(f"{path}: not a readable JSON review ({e})") from None
    if not isinstance(review, dict) or not all(isinstance(review.get(k, {}), dict) for k in ("holds_a_face", "no_face")):
        raise AgeGenderError(f"{path}: expected holds_a_face and no_face, each a mapping of image name to a note")
    return review


# -- the report ------------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    rows, chosen = result["rows"], result["chosen"]
    order = [*PHOTO_SHARES, *HARD]
    sets = ", ".join(f"{n:,} {k}" for k, n in sorted(result["face_counts"].items(), key=lambda kv: order.index(kv[0])))
    sources = ", ".join(f"{n} {k}" for k, n in result["free_counts"].items())
    lines = [
        "## 9. RetinaFace's score threshold: misses and false positives",
        "",
        f"Measured with `{result['command']}` ({result['seconds']:.0f} s on {result['machine']}): the bundled "
        f"RetinaFace as `predict` runs it (`max_side` 640, faces under {result['min_face']} px dropped), seed "
        f"{result['seed']}. How the images are made, and why one pass gives the count at every threshold exactly: "
        "the docstring of `benchmarks/detector_threshold.py`.",
        "",
        f"- Misses: {result['faces']:,} labelled faces ({sets}): the photos as they are, and each photo once more "
        "shrunk to a 48-80 px face, cut by the border, blurred or darkened. A miss is a face that no box above the "
        "threshold covers (its centre). *Other boxes* are boxes elsewhere on the portraits: bystanders or false "
        "positives, not told apart.",
        f"- False positives: {result['free']:,} face-free images ({sources}): photos with every face that Haar or "
        "a sure RetinaFace box (0.9+) finds painted out, phase-scrambled photos, and photos cut into shuffled, "
        f"turned 24 px tiles. Every box on them counts. {len(result['left_out'])} painted photos that a person found "
        f"still holding a face (a bystander in profile, blurred or cut by the border) are left out; "
        f"{len(result['unreviewed'])} with boxes were not reviewed (their boxes count).",
        f"- Rule: {RULE}.",
        "",
        "| threshold | misses: portraits / small / partial / blurred / dark | miss rate | other boxes on the portraits "
        "| false positives: background / phase / tiles | false positives per face-free image | face-free images "
        "with one |",
        "|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        mark = "**" if r["threshold"] == chosen["threshold"] else ""
        by = r["misses_by_kind"]
        portraits = sum(by.get(k, 0) for k in PHOTO_SHARES)
        misses = " / ".join(str(v) for v in [portraits, *(by.get(k, 0) for k in HARD)])
        fps = " / ".join(str(r["fp_by_source"].get(k, 0)) for k in FREE_SHARES)
        lines.append(
            f"| {mark}{r['threshold']:.2f}{mark} | {r['misses']} = {misses} | {100 * r['miss_rate']:.2f}% "
            f"| {r['other_boxes']} | {r['false_positives']} = {fps} | {r['fp_per_image']:.4f} "
            f"| {r['fp_images']} |"
        )
    lines += ["", f"Chosen: **{chosen['threshold']:.2f}**."]
    return "\n".join(lines) + "\n"


def review_sheet(items: Sequence[tuple[str, np.ndarray, Box | None]], dest: Path, cell: int = 200, columns: int = 6) -> None:
    """A contact sheet: each image around its box (twice the box's size, else whole), the box in red, a label."""
    from PIL import Image, ImageDraw

    if not items:
        return
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (label, rgb, box) in enumerate(items):
        ox, oy = (k % columns) * cell, (k // columns) * (cell + 14)
        x1 = y1 = 0
        if box is not None:
            x, y, w, h, _ = box
            m = max(w, h)
            x1, y1 = max(0, int(x - m)), max(0, int(y - m))
            rgb = rgb[y1 : max(y1 + 1, int(y + h + m)), x1 : max(x1 + 1, int(x + w + m))]
        im = Image.fromarray(np.ascontiguousarray(rgb))
        scale = cell / max(im.size)
        sheet.paste(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale)))), (ox, oy))
        if box is not None:
            x, y, w, h, _ = box
            draw.rectangle(
                [
                    ox + max(0, (x - x1) * scale),
                    oy + max(0, (y - y1) * scale),
                    ox + min(cell - 1, (x + w - x1) * scale),
                    oy + min(cell - 1, (y + h - y1) * scale),
                ],
                outline="red",
                width=2,
            )
        draw.text((ox + 2, oy + cell), f"{k} {label}"[:34], fill="black")
    sheet.save(dest)


def write_sheets(
    out: Path,
    labelled: Sequence[Scanned],
    free: Sequence[Scanned],
    items: dict[str, Item],
    scanner: Scanner,
    chosen: float,
    min_face: float,
    limit: int = 300,
) -> None:
    """false_positives.png: every box on a face-free image above the lowest threshold swept, best first (the
    background ones first: those are the ones to review). misses.png: the faces missed at the chosen threshold."""
    boxes = [(f.kind != "background", -b[4], f.name, b) for f in free for b in kept(f.boxes, THRESHOLDS[0], min_face)]
    fps = sorted(boxes)[:limit]
    images: dict[str, np.ndarray] = {}

    def pixels(name: str) -> np.ndarray:
        if name not in images:
            images[name] = make(items[name], scanner)[0]
        return images[name]

    review_sheet([(f"{-s:.3f} {name}", pixels(name), b) for _, s, name, b in fps], out / "false_positives.png")
    missed = [f for f in labelled if not face_found(f, chosen, min_face)][:limit]
    review_sheet(
        [(f"{max((b[4] for b in f.boxes), default=0):.3f} {f.name}", pixels(f.name), None) for f in missed], out / "misses.png"
    )


def parser() -> argparse.ArgumentParser:
    from agegender.faces.detect import MIN_FACE_PX

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--faces",
        help="the labelled photos (default: $AGEGENDER_FACES, else ../shared/faces beside the checkout, as the tests find it)",
    )
    p.add_argument(
        "--photos", type=int, default=600, help="labelled photos; each also gives one hard copy (default: %(default)s)"
    )
    p.add_argument("--free", type=int, default=600, help="face-free images for the false positives (default: %(default)s)")
    p.add_argument(
        "--min-face",
        type=int,
        default=MIN_FACE_PX,
        help="boxes shorter than this on their longer side are dropped, as in predict (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default: %(default)s)")
    p.add_argument(
        "--review",
        default=str(REVIEW),
        help="the painted photos a person found holding a face (default: the one beside this script)",
    )
    p.add_argument(
        "--out",
        default=str(bench_home() / "detector-threshold"),
        help="where threshold.md, threshold.json and the review sheets go (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from agegender.errors import AgeGenderError
    from agegender.faces.detect import SCORE_THRESHOLD
    from agegender.files import write_text_atomic

    from .machine import _cpu_name, loadavg

    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        faces = faces_dir(a.faces)
        if faces is None:
            raise AgeGenderError("no labelled photos: pass --faces DIR or set AGEGENDER_FACES")
        if a.photos < 1 or a.free < 1:
            raise AgeGenderError("--photos and --free must be at least 1")
        review = load_review(Path(a.review))
        start = time.perf_counter()
        labelled, all_free, items, scanner = measure(faces, a.photos, a.free, a.seed, a.threads)
        seconds = time.perf_counter() - start
    except AgeGenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    free, left_out, unreviewed = reviewed(all_free, review, a.min_face)
    rows = sweep(labelled, free, a.min_face)
    chosen = choose(rows)
    command = f"{PROG} --faces FACES --photos {a.photos} --free {a.free} --seed {a.seed}"
    result = {
        "command": command,
        "machine": f"{_cpu_name()}, load {' '.join(f'{x:.1f}' for x in loadavg() or [])}",
        "seconds": seconds,
        "seed": a.seed,
        "min_face": a.min_face,
        "floor": FLOOR,
        "rule": RULE,
        "code_default": SCORE_THRESHOLD,
        "faces": len(labelled),
        "free": len(free),
        "face_counts": _counts(labelled),
        "free_counts": _counts(free),
        "left_out": left_out,
        "unreviewed": unreviewed,
        "rows": rows,
        "chosen": chosen,
        "images": [asdict(s) for s in [*labelled, *all_free]],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "threshold.json", json.dumps(result, indent=1))
    write_text_atomic(out / "threshold.md", markdown(result))
    write_sheets(out, labelled, free, items, scanner, chosen["threshold"], a.min_face)
    print(markdown(result))
    if unreviewed:
        print(f"{len(unreviewed)} painted photos with boxes were not reviewed: see false_positives.png and {Path(a.review).name}")
    print(f"written: {out / 'threshold.md'}, threshold.json, false_positives.png, misses.png")
    return 0


def _counts(images: Sequence[Scanned]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in images:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
