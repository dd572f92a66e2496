"""Face datasets: labelled records from folder trees, file names or manifests; identity-safe splits; image decoding."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AgeGenderError

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

# Index = label, as in weights.GENDERS ("female", "male").
_GENDER_WORDS = {"f": 0, "female": 0, "woman": 0, "w": 0, "m": 1, "male": 1, "man": 1}
UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
PROTOCOLS: tuple[str, ...] = ("identity", "folders", "seed")

# The Adience age brackets, (low, high) inclusive; None = open-ended.
ADIENCE_GROUPS: tuple[tuple[int, int | None], ...] = (
    (0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, None))
ADIENCE_GROUP_NAMES: tuple[str, ...] = tuple(
    f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in ADIENCE_GROUPS)


def age_group(age: int) -> int:
    """Index into ``ADIENCE_GROUPS`` for an age in years.

    Adience leaves gaps between brackets (3, 7, 14, 21-24, ...). An age in a gap goes to the nearest
    bracket by distance in years; a tie goes to the younger bracket (3 -> 0-2, 35 -> 25-32, 36 -> 38-43).
    """
    def distance(bracket: tuple[int, int | None]) -> int:
        lo, hi = bracket
        return max(lo - age, 0 if hi is None else age - hi, 0)

    # min() keeps the first of equal distances, and the brackets run young to old.
    return min(range(len(ADIENCE_GROUPS)), key=lambda i: distance(ADIENCE_GROUPS[i]))


# ------------------------------------------------------------------------------------------------
# Records and identities
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceRecord:
    """One labelled face image. ``gender`` indexes ``weights.GENDERS`` (0 female, 1 male)."""

    path: Path
    gender: int
    age: int | None
    identity: str  # namespaced by source, e.g. "imdb:nm0000001"; never shared across sources
    group: str = ""  # "aligned" / "valid" in agegender trees, else ""
    race: str | None = None
    source: str = "unknown"  # adience, imdb, wiki, utkface, csv (a manifest) or unknown


# A trailing "-<n>" before the extension marks a duplicate name in the source data.
_DUP = r"(?:-\d+)?\.(?:jpe?g|png)$"
_IDENTITY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("imdb", re.compile(r"^(nm\d+)_rm\d+_\d+-\d+-\d+_\d+" + _DUP, re.I)),
    # WIKI birth dates are sometimes malformed ("1994-11-18.", "1989-08-019"); the id still names the person.
    ("wiki", re.compile(r"^(\d+)_\d{3,4}-[\d.-]+_\d{4}" + _DUP, re.I)),
    ("adience", re.compile(r"^landmark_aligned_face\.(\d+)\..+_o" + _DUP, re.I)),
)


def parse_identity(filename: str | os.PathLike[str]) -> tuple[str, str]:
    """``(source, identity)`` from an IMDB, WIKI or Adience file name, e.g. ``("imdb", "imdb:nm0000001")``.

    Only the last path component is parsed. When no pattern matches, the source is ``"unknown"`` and the
    identity is ``filename`` exactly as given, so every such image is its own person.
    """
    name = Path(filename).name
    for source, pattern in _IDENTITY_PATTERNS:
        m = pattern.match(name)
        if m:
            return source, f"{source}:{m.group(1)}"
    return "unknown", str(filename)


def _identity(path: Path, root: Path) -> tuple[str, str]:
    source, identity = parse_identity(path.name)
    if source == "unknown":  # the relative path keeps equal names in different folders apart
        identity = path.relative_to(root).as_posix()
    return source, identity


@dataclass
class Dataset:
    """Records scanned from one place; ``kind`` says which layout was detected."""

    records: list[FaceRecord]
    kind: str  # "agegender", "utkface", "csv" or "json"
    root: Path  # the folder scanned (a manifest's folder)

    def __len__(self) -> int:
        return len(self.records)


_EXPECTED = ("an agegender_cleaned tree ([combined/]{aligned,valid}/NN_G/*.jpg), UTKFace names "
             "(<age>_<gender>_<race>_*.jpg), labels.csv (path or filename, gender[, age, identity, race]) "
             "or ground_truth.json")
_AGEGENDER_FOLDER = re.compile(r"^(\d{2})_([FM])$")
_UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_(?:([0-4])_)?\d")


def scan(root: str | os.PathLike[str]) -> Dataset:
    """Find labelled faces under ``root`` (a folder, or a ``.csv``/``.json`` manifest), auto-detecting the layout.

    Tried in order: agegender_cleaned tree, ``labels.csv``, ``ground_truth.json``, UTKFace file names.
    """
    root = Path(root)
    if root.is_file():
        return _finish(_scan_manifest(root), root)
    if not root.is_dir():
        raise AgeGenderError(f"{root}: no such file or directory")
    base = next((b for b in (root / "combined", root)
                 if (b / "aligned").is_dir() or (b / "valid").is_dir()), None)
    if base is not None:
        return _finish(Dataset(_scan_agegender(base), "agegender", root), root)
    for manifest in ("labels.csv", "ground_truth.json"):
        if (root / manifest).is_file():
            return _finish(_scan_manifest(root / manifest), root)
    return _finish(Dataset(_scan_utkface(root), "utkface", root), root)


def _finish(ds: Dataset, root: Path) -> Dataset:
    if not ds.records:
        raise AgeGenderError(f"{root}: no labelled face images found; expected {_EXPECTED}")
    counts = collections.Counter(r.gender for r in ds.records)
    log.info("%s: detected %s layout, %d images (%d female, %d male), %d identities", root, ds.kind,
             len(ds.records), counts[0], counts[1], len({r.identity for r in ds.records}))
    return ds


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _scan_agegender(base: Path) -> list[FaceRecord]:
    records = []
    for group in ("aligned", "valid"):
        if not (base / group).is_dir():
            continue
        for folder in sorted(p for p in (base / group).iterdir() if p.is_dir()):
            m = _AGEGENDER_FOLDER.match(folder.name)
            if not m:
                log.warning("%s: not an NN_G label folder; ignored", folder)
                continue
            age, gender = int(m.group(1)), _GENDER_WORDS[m.group(2).lower()]
            for path in _images(folder):
                source, identity = _identity(path, base)
                records.append(FaceRecord(path, gender, age, identity, group, None, source))
    return records


def _scan_utkface(root: Path) -> list[FaceRecord]:
    records, ignored = [], 0
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        m = _UTKFACE_NAME.match(path.name)
        if not m:
            ignored += 1
            continue
        race = UTKFACE_RACES[int(m.group(3))] if m.group(3) else None
        # UTKFace codes gender 0 = male, 1 = female: the reverse of ours.
        records.append(FaceRecord(path, 1 - int(m.group(2)), int(m.group(1)),
                                  f"utkface:{path.relative_to(root).as_posix()}", "", race, "utkface"))
    if records and ignored:
        log.warning("%s: %d images without UTKFace labels in their names ignored", root, ignored)
    return records


def parse_gender(value: str) -> int | None:
    """0 (female) or 1 (male) from M/F/male/female/man/woman, any case; None when unrecognised."""
    return _GENDER_WORDS.get(value.strip().lower())


def parse_age(value: str) -> int | None:
    """Years from ``"29"``, ``"29.0"``, an age group ``"20-29"`` (floor of the midpoint) or ``"70+"`` (its lower
    bound); None for an empty value. Raises ValueError otherwise."""
    value = value.strip()
    if not value:
        return None
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", value)
    if m:
        return (int(m.group(1)) + int(m.group(2))) // 2
    age = float(value[:-1] if value.endswith("+") else value)
    if not 0 <= age < 150:
        raise ValueError(f"age {value!r} out of range")
    return int(age)


def _scan_manifest(path: Path) -> Dataset:
    root = path.parent
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise AgeGenderError(f"{path}: expected a JSON list of objects")
            kind, first_line = "json", 1
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
            kind, first_line = "csv", 2
        else:
            raise AgeGenderError(f"{path}: not a .csv or .json label manifest")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise AgeGenderError(f"{path}: cannot read label manifest ({e})") from None
    records, missing = [], []
    for line, raw in enumerate(rows, first_line):
        row = {str(k).strip().lower(): ("" if v is None else str(v)) for k, v in raw.items()}
        name = row.get("path") or row.get("filename")
        if name is None or "gender" not in row:
            raise AgeGenderError(f"{path}: needs a 'path' or 'filename' column and a 'gender' column "
                                 f"(has {', '.join(row) or 'none'})")
        gender = parse_gender(row["gender"])
        if gender is None:
            raise AgeGenderError(f"{path}:{line}: gender {row['gender']!r} is not M/F/male/female")
        try:
            age = parse_age(row.get("age", ""))
        except ValueError:
            raise AgeGenderError(f"{path}:{line}: age {row['age']!r} is not a number or range") from None
        image = root / name.strip()
        if not image.is_file():
            missing.append(name)
            continue
        source, identity = _identity(image, root) if image.is_relative_to(root) else parse_identity(image)
        if row.get("identity", "").strip():
            # Namespaced like parsed ids, so a listed id and a parsed one for the same person agree.
            identity = f"{source if source != 'unknown' else 'csv'}:{row['identity'].strip()}"
        records.append(FaceRecord(image, gender, age, identity, "", row.get("race", "").strip() or None,
                                  source if source != "unknown" else "csv"))
    if missing:
        log.warning("%s: %d listed images are missing (first: %s)", path, len(missing), ", ".join(missing[:3]))
    return Dataset(records, kind, root)


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Splits(Mapping[str, list[FaceRecord]]):
    """train/val/test record lists; a read-only mapping keyed by split name."""

    train: list[FaceRecord]
    val: list[FaceRecord]
    test: list[FaceRecord]
    protocol: str = ""

    def __getitem__(self, name: str) -> list[FaceRecord]:
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(SPLIT_NAMES)

    def __len__(self) -> int:
        return len(SPLIT_NAMES)

    def summary(self) -> dict[str, dict[str, int]]:
        """Images and distinct identities per split."""
        return {name: {"images": len(recs), "identities": len({r.identity for r in recs})}
                for name, recs in self.items()}

    def leaked_identities(self) -> int:
        """How many identities have images in more than one split."""
        seen = collections.Counter(i for recs in self.values() for i in {r.identity for r in recs})
        return sum(1 for n in seen.values() if n > 1)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise AgeGenderError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def identity_split(records: Sequence[FaceRecord], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 0) -> Splits:
    """Split whole identities into train/val/test, stratified by gender and Adience age group.

    Each identity's stratum is its majority gender and majority age group (ties: the lower value;
    unknown age counts as its own group). Identities are shuffled within each stratum by ``seed``; the
    strata are then laid end to end and each identity goes to the split furthest below its share of
    images so far. That keeps every stratum, even one of two people, close to ``fractions``.
    """
    fractions = _check_fractions(fractions)
    by_identity: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        by_identity[r.identity].append(i)
    strata: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for identity in sorted(by_identity):
        recs = [records[i] for i in by_identity[identity]]
        gender = _majority(r.gender for r in recs)
        group = _majority(-1 if r.age is None else age_group(r.age) for r in recs)
        strata[(gender, group)].append(identity)
    rng = np.random.default_rng(seed)
    counts = [0, 0, 0]
    assigned: list[list[int]] = [[], [], []]
    for key in sorted(strata):
        people = strata[key]
        for j in rng.permutation(len(people)):
            members = by_identity[people[j]]
            total = sum(counts) + len(members)
            split = max(range(3), key=lambda s: fractions[s] * total - counts[s])
            counts[split] += len(members)
            assigned[split].extend(members)
    train, val, test = ([records[i] for i in sorted(idx)] for idx in assigned)
    return Splits(train, val, test, "identity")


def _majority(values: Iterable[int]) -> int:
    counts = collections.Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def folder_split(records: Sequence[FaceRecord], val_fraction: float = 0.15, seed: int = 0) -> Splits:
    """The agegender folders: test = ``valid/``; ``aligned/`` is split into train/val by identity.

    ``valid/`` shares many people with ``aligned/`` in the published data, so ``leaked_identities()``
    is large here by construction.
    """
    aligned = [r for r in records if r.group == "aligned"]
    test = [r for r in records if r.group == "valid"]
    if not test or not aligned:
        raise AgeGenderError("the 'folders' split needs an agegender tree with both aligned/ and valid/ "
                             "folders; use the 'identity' split for other datasets")
    inner = identity_split(aligned, (1 - val_fraction, val_fraction, 0.0), seed)
    return Splits(inner.train, inner.val, test, "folders")


def seed_split(records: Sequence[FaceRecord], seed: int = 0) -> Splits:
    """The seed notebook's protocol: a random 50/25/25 split of the images in each label folder of ``aligned/``.

    Records without groups (manifests, UTKFace) are split per (gender, age) label the same way. People
    leak across splits freely here; this exists to reproduce the original numbers.
    """
    pool = [r for r in records if r.group == "aligned"] or [r for r in records if not r.group]
    if not pool:
        raise AgeGenderError("the 'seed' split needs an aligned/ folder or ungrouped records")
    by_label: dict[tuple[int, int], list[FaceRecord]] = collections.defaultdict(list)
    for r in pool:
        by_label[(r.gender, -1 if r.age is None else r.age)].append(r)
    rng = np.random.default_rng(seed)
    out: tuple[list[FaceRecord], list[FaceRecord], list[FaceRecord]] = ([], [], [])
    for key in sorted(by_label):
        recs = by_label[key]
        order = rng.permutation(len(recs))
        n_train, n_val = len(recs) // 2, len(recs) // 4
        for rank, j in enumerate(order):
            out[0 if rank < n_train else 1 if rank < n_train + n_val else 2].append(recs[j])
    return Splits(*out, protocol="seed")


def make_splits(dataset: Dataset, protocol: str = "identity", seed: int = 0, limit: int = 0) -> Splits:
    """Dispatch on ``protocol``: "identity" (default), "folders" or "seed".

    ``limit > 0`` first keeps a seeded random sample of that many images (for quick runs).
    """
    records = dataset.records
    if 0 < limit < len(records):
        keep = np.random.default_rng(seed).choice(len(records), limit, replace=False)
        records = [records[i] for i in sorted(keep)]
    if protocol == "identity":
        splits = identity_split(records, seed=seed)
    elif protocol == "folders":
        splits = folder_split(records, seed=seed)
    elif protocol == "seed":
        splits = seed_split(records, seed=seed)
    else:
        raise AgeGenderError(f"unknown split protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    log.info("%s split (seed %d): %s; %d identities in more than one split", protocol, seed,
             ", ".join(f"{k} {v['images']} images/{v['identities']} ids" for k, v in splits.summary().items()),
             splits.leaked_identities())
    return splits


# ------------------------------------------------------------------------------------------------
# Image decoding
# ------------------------------------------------------------------------------------------------

MAX_PIXELS = 50_000_000  # header size cap, checked before any pixel is decoded
# Decoders allowed for untrusted files; "JPEG" also opens MPO, the format of many phone cameras' JPEGs.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF", "PPM")


@dataclass
class Skipped:
    """Images that could not be used, with the reason; safe to share between decoding threads."""

    items: list[tuple[Path, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, path: str | os.PathLike[str], reason: str) -> None:
        with self._lock:
            self.items.append((Path(path), reason))

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self, first: int = 10) -> dict[str, Any]:
        """``{"count": n, "first": ["name: reason", ...]}`` for reports."""
        return {"count": len(self.items), "first": [f"{p.name}: {why}" for p, why in self.items[:first]]}


def fit_square(image: Image.Image, size: int | None) -> np.ndarray:
    """RGB uint8 ``(size, size, 3)`` from a PIL image: centre square crop, then an anti-aliased resize.

    Pillow's bilinear filter widens with the shrink factor, so downscaling averages (no aliasing).
    ``size=None`` keeps the image as it is, only converted to RGB.
    """
    from PIL import Image

    image = image.convert("RGB")
    if size is not None:
        w, h = image.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def load_rgb(path: str | os.PathLike[str], size: int | None,
             skipped: Skipped | None = None) -> np.ndarray | None:
    """Decode an image file to RGB uint8 ``(size, size, 3)``, or None (reason logged and added to ``skipped``).

    Any format Pillow reads by content (a PNG named .jpg is fine); EXIF orientation applied; grayscale,
    CMYK, RGBA and palette images converted; files whose header claims more than ``MAX_PIXELS`` refused
    before decoding. Large JPEGs decode at a reduced DCT scale when the target is at most half their size.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{w}x{h} pixels exceeds the {MAX_PIXELS:,} pixel limit")
            if size is not None and image.format in ("JPEG", "MPO") and min(w, h) >= 2 * size:
                image.draft("RGB", (size, size))
            return fit_square(ImageOps.exif_transpose(image), size)
    # Untrusted files make Pillow raise many types (OSError, ValueError, SyntaxError, zlib.error, bomb errors).
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        log.warning("%s: skipped (%s)", path, reason)
        if skipped is not None:
            skipped.add(path, reason)
        return None


def decode_batch(paths: Sequence[str | os.PathLike[str]], size: int, workers: int = 2,
                 skipped: Skipped | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` in order on ``workers`` threads -> (uint8 ``(N, size, size, 3)``, bool ok mask).

    Failed images are left as zeros with ``ok[i] = False``.
    """
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)

    def one(i: int) -> None:
        img = load_rgb(paths[i], size, skipped)
        if img is not None:
            out[i], ok[i] = img, True

    if workers <= 1:
        for i in range(len(paths)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            list(pool.map(one, range(len(paths))))
    return out, ok


def iter_batches(records: Sequence[FaceRecord] | Sequence[str | os.PathLike[str]], size: int,
                 batch_size: int, workers: int = 2, prefetch: int = 2,
                 skipped: Skipped | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(indices, uint8 tensor (n, size, size, 3))`` batches in order, decoding ``prefetch`` batches ahead.

    ``indices`` are positions in ``records``. Undecodable images are left out (so a batch may be short,
    and an all-bad batch is not yielded) and recorded in ``skipped``. Pixels are not normalised here.
    """
    import torch

    paths = [getattr(r, "path", r) for r in records]
    starts = range(0, len(paths), batch_size)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    pending: collections.deque[tuple[int, list[Future[np.ndarray | None]]]] = collections.deque()
    try:
        for start in starts:
            pending.append((start, [pool.submit(load_rgb, p, size, skipped)
                                    for p in paths[start:start + batch_size]]))
            if len(pending) > prefetch:
                yield from _collect(*pending.popleft(), torch)
        while pending:
            yield from _collect(*pending.popleft(), torch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(start: int, futures: list[Future[np.ndarray | None]],
             torch: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    images = [f.result() for f in futures]
    keep = [i for i, img in enumerate(images) if img is not None]
    if keep:
        yield np.asarray(keep, np.int64) + start, torch.from_numpy(np.stack([images[i] for i in keep]))


def augment(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) and a shift of up to ``max_shift`` pixels with edge replication.

    ``batch`` is ``(N, H, W, C)`` of any dtype; the result has the same shape and dtype. All randomness
    comes from ``generator``, so a seeded generator reproduces the same augmentation.
    """
    import torch

    n, h, w = batch.shape[:3]
    flip = torch.rand(n, generator=generator) < 0.5
    shift_y = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator)
    shift_x = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=generator)
    rows = (torch.arange(h) + shift_y).clamp_(0, h - 1)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = (cols + shift_x).clamp_(0, w - 1)
    return batch[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
