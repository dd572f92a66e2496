"""Labelled face records from folder trees, file names or manifests, with the identity of each person."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import AgeGenderError
from ..files import safe_name
from ..images import IMAGE_SUFFIXES, Skipped
from ..labels import _GENDER_WORDS, UTKFACE_RACES, parse_age, parse_age_interval, parse_gender

log = logging.getLogger(__name__)


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
    # False where ``identity`` is only the file's own name (UTKFace, a manifest without ids): such faces cannot
    # be checked for one person in two splits.
    person_id: bool = True
    age_interval: tuple[int, int | None] | None = None  # an age-group label ("20-29", "70+"); ``age`` is its midpoint
    dataset: str = ""  # the data set it was read from, named after its folder


# A trailing "-<n>" before the extension marks a duplicate name in the source data; any image suffix.
_DUP = r"(?:-\d+)?(?:" + "|".join(re.escape(s) for s in sorted(IMAGE_SUFFIXES)) + r")$"
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
    skipped: Skipped = field(default_factory=Skipped)  # files seen but not usable, with the reason
    roots: tuple[Path, ...] = ()  # every folder scanned, when there were several

    def __len__(self) -> int:
        return len(self.records)


_EXPECTED = (
    "an agegender_cleaned tree ([combined/]{aligned,valid}/NN_G/*.jpg), UTKFace names "
    "(<age>_<gender>_<race>_*.jpg), labels.csv (path or filename, gender[, age, identity, race]) "
    "or ground_truth.json"
)
_AGEGENDER_FOLDER = re.compile(r"^(\d{2})_([FM])$")
_UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_(?:([0-4])_)?\d")


def scan(root: str | os.PathLike[str]) -> Dataset:
    """Find labelled faces under ``root`` (a folder, or a ``.csv``/``.json`` manifest), auto-detecting the layout.

    Tried in order: agegender_cleaned tree, ``labels.csv``, ``ground_truth.json``, UTKFace file names.
    Each record's ``dataset`` is the folder's name (a manifest's folder).
    """
    root = Path(root)
    return drop_duplicate_files(_named(_scan(root), dataset_name(root)))


def dataset_name(root: str | os.PathLike[str]) -> str:
    """What a report calls the data under ``root``: its folder's name (a manifest's folder)."""
    path = Path(root).resolve()
    return (path.parent if path.is_file() else path).name or str(root)


def _named(ds: Dataset, name: str) -> Dataset:
    ds.records = [replace(r, dataset=name) for r in ds.records]
    return ds


def _scan(root: Path) -> Dataset:
    if root.is_file():
        return _finish(_scan_manifest(root), root)
    if not root.is_dir():
        raise AgeGenderError(f"{root}: no such file or directory")
    base = next((b for b in (root / "combined", root) if (b / "aligned").is_dir() or (b / "valid").is_dir()), None)
    if base is not None:
        skipped = Skipped()
        return _finish(Dataset(_scan_agegender(base, skipped), "agegender", root, skipped), root)
    for manifest in ("labels.csv", "ground_truth.json"):
        if (root / manifest).is_file():
            return _finish(_scan_manifest(root / manifest), root)
    skipped = Skipped()
    return _finish(Dataset(_scan_utkface(root, skipped), "utkface", root, skipped), root)


def scan_all(roots: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None) -> Dataset:
    """One dataset from several labelled folders (``--data`` given more than once).

    Identities stay apart across folders: a name that only identifies a person within its own folder
    (``unknown`` and manifest sources) is prefixed with the folder's index. ``exclude`` names a list of files
    to leave out (:func:`read_exclusions`).
    """
    excluded = read_exclusions(exclude) if exclude else None
    if len(roots) == 1:
        return _excluded(scan(roots[0]), excluded)
    parts = [_excluded(_named(_scan(Path(r)), dataset_name(r)), excluded) for r in roots]
    plain = [dataset_name(r) for r in roots]
    # Two folders of one name (a/train, b/train) stay two data sets.
    names = [f"{n} ({plain[: i + 1].count(n)})" if plain.count(n) > 1 else n for i, n in enumerate(plain)]
    global_ids = {source for source, _ in _IDENTITY_PATTERNS}
    records = [
        replace(r, dataset=names[i], identity=r.identity if r.source in global_ids else f"{i}/{r.identity}")
        for i, ds in enumerate(parts)
        for r in ds.records
    ]
    skipped = Skipped([item for ds in parts for item in ds.skipped.items])
    return drop_duplicate_files(
        # Each set named with its layout ("utkface: csv, fairface: json"): a report of several sets says which is which.
        Dataset(
            records,
            ", ".join(f"{name}: {ds.kind}" for name, ds in zip(names, parts, strict=True)),
            parts[0].root,
            skipped,
            tuple(ds.root for ds in parts),
        )
    )


def drop_duplicate_files(ds: Dataset) -> Dataset:
    """One record per image file, by content: the same file by any name (a link, another spelling, a folder given
    twice) and copies with identical bytes, in one folder or across several, are one face.

    The first record is kept when the copies' labels agree (the others go to ``skipped``); when they contradict each
    other, no copy can be trusted and all are left out, each reported. Only files of a size shared with another are
    read, so a data set without copies costs one ``stat`` per file.
    """
    groups = _same_content([r.path for r in ds.records])
    if not groups:
        return ds
    dropped: set[int] = set()
    conflicts = 0
    for group in groups:
        first = ds.records[group[0]]
        if all(_agree(first, ds.records[i]) for i in group[1:]):
            for i in group[1:]:
                dropped.add(i)
                ds.skipped.add(ds.records[i].path, f"the same image as {safe_name(first.path)}")
            continue
        conflicts += 1
        for i in group:
            dropped.add(i)
            other = ds.records[group[1] if i == group[0] else group[0]].path
            ds.skipped.add(ds.records[i].path, f"the same image as {safe_name(other)}, with other labels")
    log.warning(
        "%s: %d images are copies of others (identical bytes): counted once%s",
        ds.root,
        sum(len(g) - 1 for g in groups),
        f"; {conflicts} with contradicting labels, left out" if conflicts else "",
    )
    ds.records = [r for i, r in enumerate(ds.records) if i not in dropped]
    if not ds.records:
        raise AgeGenderError(f"{ds.root}: no labelled face images left once copies with contradicting labels are left out")
    return ds


def _agree(a: FaceRecord, b: FaceRecord) -> bool:
    """Whether two labels of one image can both be true: the same gender, and ages that fit (an unknown age fits
    any, an exact age fits an age group that holds it)."""
    if a.gender != b.gender:
        return False
    if a.age is None or b.age is None or a.age == b.age:
        return True
    for group, exact in ((a.age_interval, b), (b.age_interval, a)):
        if group is not None and exact.age_interval is None and exact.age is not None:
            low, high = group
            return low <= exact.age and (high is None or exact.age <= high)
    return False


def _same_content(paths: Sequence[Path]) -> list[list[int]]:
    """Index groups (in order, two or more each) of ``paths`` that are one file or hold identical bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from ..files import sha256_file

    by_size: dict[int, list[int]] = collections.defaultdict(list)
    for i, path in enumerate(paths):
        try:
            by_size[path.stat().st_size].append(i)
        except OSError:
            continue  # unreadable: the decoder reports it later
    candidates = [i for group in by_size.values() if len(group) > 1 for i in group]

    def digest(i: int) -> str | None:
        try:
            return sha256_file(paths[i], chunk=1 << 16)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dedupe") as pool:  # the reads wait on the disk
        digests = list(pool.map(digest, candidates)) if candidates else []
    by_digest: dict[str, list[int]] = collections.defaultdict(list)
    for i, d in zip(candidates, digests):
        if d is not None:
            by_digest[d].append(i)
    return sorted((sorted(g) for g in by_digest.values() if len(g) > 1), key=lambda g: g[0])


def read_exclusions(path: str | os.PathLike[str]) -> frozenset[str]:
    """The files an exclusion list names, one a line, each relative to its data folder and optionally led by the
    data set's name (``utkface/1_0_0_x.jpg`` or ``1_0_0_x.jpg``); ``#`` starts a comment. Labels known to be wrong
    are left out this way without editing the data."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AgeGenderError(f"{path}: cannot read the exclusion list ({type(e).__name__})") from None
    return frozenset(line.split("#", 1)[0].strip().replace("\\", "/") for line in text.splitlines()) - {""}


def _excluded(ds: Dataset, names: frozenset[str] | None) -> Dataset:
    if not names:
        return ds
    root = ds.root if ds.root.is_dir() else ds.root.parent

    def listed(r: FaceRecord) -> bool:
        rel = r.path.relative_to(root).as_posix() if r.path.is_relative_to(root) else r.path.name
        return rel in names or f"{r.dataset}/{rel}" in names

    kept = [r for r in ds.records if not listed(r)]
    if len(kept) < len(ds.records):
        log.info("%s: %d images left out by the exclusion list", ds.root, len(ds.records) - len(kept))
        ds.records = kept
    return ds


def _finish(ds: Dataset, root: Path) -> Dataset:
    if ds.skipped:
        reasons = collections.Counter(why for _, why in ds.skipped.items)
        log.warning(
            "%s: %d files skipped (%s); first: %s",
            root,
            len(ds.skipped),
            ", ".join(f"{n} {why}" for why, n in reasons.most_common()),
            ", ".join(p.name for p, _ in ds.skipped.items[:3]),
        )
    if not ds.records:
        raise AgeGenderError(f"{root}: no labelled face images found; expected {_EXPECTED}")
    counts = collections.Counter(r.gender for r in ds.records)
    ids = {r.identity for r in ds.records if r.person_id}
    log.info(
        "%s: detected %s layout, %d images (%d female, %d male), %s",
        root,
        ds.kind,
        len(ds.records),
        counts[0],
        counts[1],
        f"{len(ids)} identities" if ids else "no person ids",
    )
    return ds


_NOT_AN_IMAGE = "not an image format the decoder reads"


def _images(root: Path, recursive: bool, skipped: Skipped) -> list[Path]:
    """The files under ``root`` whose suffix the decoder reads; every other file goes to ``skipped``.

    Hidden files and folders (.DS_Store, ._x.jpg, .git) are not the user's data and are left out silently.
    """
    images = []
    for p in sorted(root.rglob("*") if recursive else root.iterdir()):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            skipped.add(p, _NOT_AN_IMAGE)
    return images


def _scan_agegender(base: Path, skipped: Skipped) -> list[FaceRecord]:
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
            for path in _images(folder, False, skipped):
                source, identity = _identity(path, base)
                records.append(FaceRecord(path, gender, age, identity, group, None, source, person_id=source != "unknown"))
    return records


def _scan_utkface(root: Path, skipped: Skipped) -> list[FaceRecord]:
    records, unlabelled = [], []
    for path in _images(root, True, skipped):
        m = _UTKFACE_NAME.match(path.name)
        if not m:
            unlabelled.append(path)
            continue
        race = UTKFACE_RACES[int(m.group(3))] if m.group(3) else None
        # UTKFace codes gender 0 = male, 1 = female: the reverse of ours.
        records.append(
            FaceRecord(
                path,
                1 - int(m.group(2)),
                int(m.group(1)),
                f"utkface:{path.relative_to(root).as_posix()}",
                "",
                race,
                "utkface",
                person_id=False,
            )
        )
    if records:  # in a folder of plain photos, nothing was meant to be labelled: _finish says what was expected
        for path in unlabelled:
            skipped.add(path, "no UTKFace labels (<age>_<gender>_...) in the name")
    return records


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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, csv.Error) as e:  # JSONDecodeError is a ValueError
        raise AgeGenderError(f"{path}: cannot read label manifest ({type(e).__name__}: {e})") from None
    records: list[FaceRecord] = []
    skipped = Skipped()
    seen: dict[tuple[int, int], tuple[int, int]] = {}  # a file's identity -> (line, index in records)
    conflicts: set[int] = set()
    for line, raw in enumerate(rows, first_line):
        row = {str(k).strip().lower(): ("" if v is None else str(v)) for k, v in raw.items()}
        name = row.get("path") or row.get("filename")
        if name is None or "gender" not in row:
            raise AgeGenderError(
                f"{path}: needs a 'path' or 'filename' column and a 'gender' column (has {', '.join(row) or 'none'})"
            )
        gender = parse_gender(row["gender"])
        if gender is None:
            raise AgeGenderError(f"{path}:{line}: gender {row['gender']!r} is not M/F/male/female")
        try:
            age, interval = parse_age(row.get("age", "")), parse_age_interval(row.get("age", ""))
        except ValueError as e:
            raise AgeGenderError(f"{path}:{line}: age {row['age']!r}: {e}") from None
        image = root / name.strip()
        folder = os.path.abspath(root)  # by the names as written: links the user put in the folder are theirs
        if os.path.commonpath([folder, os.path.abspath(image)]) != folder:
            raise AgeGenderError(
                safe_name(f"{path}:{line}: {name.strip()} is outside {root}; a manifest may only list files in its own folder")
            )
        if not _is_file(image):  # a listed file of any suffix is tried: the decoder goes by content
            skipped.add(image, f"listed on line {line} of {path.name} but missing")
            continue
        key = _file_key(image)
        if key in seen:  # the same file under another spelling (./a.jpg, sub/../a.jpg, a link): one face, once
            first_line, index = seen[key]
            earlier = records[index]
            if (earlier.gender, earlier.age) != (gender, age):
                conflicts.add(index)
                skipped.add(image, f"lines {first_line} and {line} of {path.name} give it different labels")
            else:
                skipped.add(image, f"listed again on line {line} of {path.name} (line {first_line})")
            continue
        seen[key] = (line, len(records))
        source, identity = _identity(image, root) if image.is_relative_to(root) else parse_identity(image)
        listed = bool(row.get("identity", "").strip())
        if listed:
            # Namespaced like parsed ids, so a listed id and a parsed one for the same person agree.
            identity = f"{source if source != 'unknown' else 'csv'}:{row['identity'].strip()}"
        records.append(
            FaceRecord(
                image,
                gender,
                age,
                identity,
                "",
                row.get("race", "").strip() or None,
                source if source != "unknown" else "csv",
                person_id=listed or source != "unknown",
                age_interval=interval,
            )
        )
    if conflicts:  # neither label can be trusted: the face is left out, and the warning counts it
        log.warning("%s: %d files listed more than once with different labels; left out", path, len(conflicts))
        records = [r for i, r in enumerate(records) if i not in conflicts]
    return Dataset(records, kind, root, skipped)


def _file_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, or with a NUL byte
        return False
