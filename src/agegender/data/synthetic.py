"""Generated stand-ins for the real data and weights, for tests and `agegender demo`: learnable, tiny, seeded."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones.vgg_face import VGG16_WIDTHS, VGG_FACE_FC, VGG_FACE_IDENTITIES, VGG_FACE_PREPROCESS
from ..errors import AgeGenderError
from ..files import atomic_path, write_text_atomic
from ..model.vgg import vgg_face_shapes

# Adience brackets land in these agegender_cleaned age folders (FORMATS: Adience files appear only there).
ADIENCE_FOLDER_AGES = frozenset({*range(1, 14), 18, 28, 40, 51, 56})


@dataclass(frozen=True)
class _Person:
    source: str  # imdb, wiki or adience
    id: int
    birth: tuple[int, int, int]
    tone: float  # per-person brightness offset, so images of one person look alike
    centre: tuple[float, float]


def render_face(
    rng: np.random.Generator, size: int, gender: int, age: int, tone: float = 0.0, centre: tuple[float, float] = (0.5, 0.55)
) -> np.ndarray:
    """A face-like uint8 RGB picture whose gender and age a small conv net can learn.

    Gender sets skin colour and stripe direction (female: lighter, horizontal; male: darker, vertical);
    age grows the face and greys a hair cap. Background, position and noise vary per image.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(40, 200) + rng.normal(0, 20, 3)
    cx, cy = centre[0] + rng.normal(0, 0.02), centre[1] + rng.normal(0, 0.02)
    ry = 0.26 + 0.14 * min(max(age, 0), 90) / 90
    rx = 0.78 * ry
    face = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    hair = (((xx - cx) / (1.15 * rx)) ** 2 + ((yy - cy + 0.06) / (1.1 * ry)) ** 2 <= 1) & ~face & (yy < cy)
    skin = np.array([215, 170, 155] if gender == 0 else [135, 100, 85], np.float32) + tone
    stripes = 18 * np.sin(2 * np.pi * 12 * (yy if gender == 0 else xx))  # 12 periods: survives a 2x shrink
    img[face] = skin + stripes[face][:, None]
    grey = min(max(age, 0), 90) / 90
    img[hair] = (1 - grey) * np.array([60, 40, 30], np.float32) + grey * 190
    for side in (-1, 1):
        eye = ((xx - cx - side * 0.35 * rx) ** 2 + (yy - cy + 0.2 * ry) ** 2) <= (0.12 * rx) ** 2
        img[eye] = 30
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, "JPEG", quality=90, progressive=True)


@contextlib.contextmanager
def _new_dir(dest: Path) -> Iterator[Path]:
    """Build a directory beside ``dest`` and move it into place only when complete."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AgeGenderError(f"{dest}: already exists; choose an empty or new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_agegender_tree(
    root: str | os.PathLike[str],
    *,
    per_folder: int = 2,
    ages: Iterable[int] = range(1, 71),
    size: int = 128,
    seed: int = 0,
    valid_fraction: float = 0.12,
    identities_per_folder: int | None = None,
) -> Path:
    """Write ``root/combined/{aligned,valid}/NN_G/*.jpg`` like agegender_cleaned and return ``root``.

    Each label folder gets ``per_folder`` aligned images from ``identities_per_folder`` people (default
    ``per_folder // 2``, at least 1) and on average ``per_folder * valid_fraction`` valid images, most of
    them from the same people (the real data's leakage). File names follow the IMDB, WIKI and Adience
    patterns (Adience only in its age folders); a repeated name gets the real data's ``-1`` suffix.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    people_per_folder = identities_per_folder or max(1, per_folder // 2)
    ids = itertools.count(1)
    used: set[str] = set()

    def person(age: int) -> _Person:
        sources = ("adience", "imdb", "wiki") if age in ADIENCE_FOLDER_AGES else ("imdb", "wiki")
        weights = (0.5, 0.35, 0.15) if len(sources) == 3 else (0.75, 0.25)
        birth_year = int(rng.integers(1995, 2016)) - age
        return _Person(
            str(rng.choice(sources, p=weights)),
            next(ids),
            (birth_year, int(rng.integers(1, 13)), int(rng.integers(1, 29))),
            float(rng.normal(0, 8)),
            (0.5 + rng.normal(0, 0.03), 0.55 + rng.normal(0, 0.03)),
        )

    def name(p: _Person, age: int) -> str:
        y, m, d = p.birth
        year = y + age + int(rng.integers(0, 2))  # the folder age is photo year - birth year, or one less
        stem = {
            "imdb": f"nm{p.id:07d}_rm{rng.integers(10**8, 4 * 10**9)}_{y}-{m}-{d}_{year}",
            "wiki": f"{p.id + 10**6}_{y:04d}-{m:02d}-{d:02d}_{year}",
            "adience": f"landmark_aligned_face.{p.id}.{rng.integers(10**9, 2 * 10**10)}_{rng.integers(16**9, 16**10):010x}_o",
        }[p.source]
        candidate, n = f"{stem}.jpg", 0
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}.jpg"
        used.add(candidate)
        return candidate

    with _new_dir(root / "combined") as tmp:
        for age in ages:
            for gender in (0, 1):
                folder = f"{age:02d}_{'FM'[gender]}"
                people = [person(age) for _ in range(people_per_folder)]
                expected_valid = per_folder * valid_fraction
                n_valid = int(expected_valid) + int(rng.random() < expected_valid % 1)
                plan = [("aligned", people[j % len(people)]) for j in range(per_folder)]
                plan += [
                    ("valid", people[int(rng.integers(len(people)))] if rng.random() < 0.7 else person(age))
                    for _ in range(n_valid)
                ]
                for group, p in plan:
                    out = tmp / group / folder
                    out.mkdir(parents=True, exist_ok=True)
                    _jpeg(out / name(p, age), render_face(rng, size, gender, age, p.tone, p.centre))
    return root


def make_utkface_folder(root: str | os.PathLike[str], n: int = 40, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` UTKFace-named images ``{age}_{gender}_{race}_{timestamp}.jpg.chip.jpg`` (gender 0 = male)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    with _new_dir(root) as tmp:
        for i in range(n):
            age, gender, race = int(rng.integers(1, 91)), int(rng.integers(0, 2)), int(rng.integers(0, 5))
            face = render_face(rng, size, gender, age, float(rng.normal(0, 12)))
            _jpeg(tmp / f"{age}_{1 - gender}_{race}_2017011617{i:07d}.jpg.chip.jpg", face)
    return root


def make_csv_folder(root: str | os.PathLike[str], n: int = 40, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` images under ``root/images/`` and ``root/labels.csv`` (path, identity, gender, age, race).

    Every person has two images, so identity-aware splits have something to keep together.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    with _new_dir(root) as tmp:
        (tmp / "images").mkdir()
        for i in range(n):
            if i % 2 == 0:
                gender, age, tone = int(rng.integers(0, 2)), int(rng.integers(15, 71)), float(rng.normal(0, 12))
                race = str(rng.choice(["White", "Black", "Asian", "Indian", "Others"]))
            _jpeg(tmp / "images" / f"face_{i:04d}.jpg", render_face(rng, size, gender, age, tone))
            rows.append(
                {
                    "path": f"images/face_{i:04d}.jpg",
                    "identity": f"person{i // 2:04d}",
                    "gender": "FM"[gender],
                    "age": age,
                    "race": race,
                }
            )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path", "gender"])
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(tmp / "labels.csv", buf.getvalue())
    return root


def make_vgg_face_state(
    widths: tuple[int, ...] = VGG16_WIDTHS, fc: int = VGG_FACE_FC, classes: int = VGG_FACE_IDENTITIES, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random canonical VGG-Face weights (``conv1_1.weight`` ... ``fc8.bias``) of the right shapes.

    He-normal weights keep the activation scale steady through the 13 ReLU convs, so outputs stay finite
    and non-zero at any input size; biases are small so conversions that drop them are caught.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in vgg_face_shapes(tuple(widths), fc, classes).items():
        if key.endswith(".bias"):
            state[key] = 0.01 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def save_vgg_face(path: str | os.PathLike[str], state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as canonical safetensors with the metadata ``agegender convert`` writes."""
    from safetensors.torch import save_file

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    from ..weights.convert import infer_widths

    widths = list(infer_widths(state))
    metadata = {
        "source_sha256": digest.hexdigest(),
        "source_format": "synthetic",
        "preprocess": VGG_FACE_PREPROCESS.to_json(),
        "widths": json.dumps(widths),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path
