"""The benchmark's inputs: the agegender_cleaned-style tree, generated VGG-Face weights, and the real photos."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from agegender.data.synthetic import render_face
from agegender.errors import AgeGenderError

from .sizes import REAL_ALIGNED, REAL_IMAGES, TREE_SIDE

log = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parents[1]


def shared_faces_candidates() -> list[Path]:
    """Where the real photos sit beside a checkout: found the same way the tests find them (tests/conftest.py)."""
    return [REPO.parent / "shared" / "faces", REPO.parent.parent / "shared" / "faces"]


def faces_dir(given: str | None, synthetic: bool = False) -> Path | None:
    """``--faces``, else ``$AGEGENDER_FACES``, else ``../shared/faces`` beside the checkout, else None (synthetic
    faces are used; ``synthetic`` asks for them even when real photos are there)."""
    if synthetic:
        return None
    value = given or os.environ.get("AGEGENDER_FACES")
    if not value:
        return next((c for c in shared_faces_candidates() if c.is_dir()), None)
    path = Path(value)
    if not path.is_dir():
        raise AgeGenderError(f"{path}: faces folder does not exist")
    return path


def default_faces_dir() -> Path:
    """The faces folder for the single-figure scripts: as :func:`faces_dir`, else where it is expected."""
    return faces_dir(None) or shared_faces_candidates()[0]


def bench_home() -> Path:
    """Where benchmark output and work files go by default: the user's agegender cache, never the checkout
    (the work folder reaches ~1 GB, and BENCHMARKS.md in the repository is rewritten only when --out names it)."""
    from agegender.weights.fetch import default_cache_dir

    return default_cache_dir() / "bench"


def labelled_photos(faces: Path) -> list[Any]:
    """FaceRecords of every labelled photo set under ``faces`` (each subfolder scanned on its own)."""
    from agegender.data.records import scan

    records = []
    for sub in sorted(p for p in faces.iterdir() if p.is_dir()):
        try:
            records += scan(sub).records
        except AgeGenderError as e:
            log.info("faces: %s skipped (%s)", sub.name, e)
    return records


def _tree_image(i: int, photos: Sequence[Any], n_aligned: int, seed: int, tmp: Path) -> None:
    """Write the ``i``-th tree image: a jittered (and on odd repeats mirrored) photo crop, or a drawn face."""
    rng = np.random.default_rng((seed, i))
    age = 1 + (i // 2) % 70
    im: Image.Image
    if photos:
        photo, repeat = photos[i % len(photos)], i // len(photos)
        gender = photo.gender
        with Image.open(photo.path) as opened:
            im = ImageOps.exif_transpose(opened).convert("RGB")
        side = 0.85 * min(im.size)
        cx, cy = (s / 2 + rng.uniform(-0.03, 0.03) * side for s in im.size)
        im = im.resize(
            (TREE_SIDE, TREE_SIDE),
            Image.Resampling.BILINEAR,
            reducing_gap=3.0,
            box=(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2),
        )
        if repeat % 2:
            im = ImageOps.mirror(im)
        ident = i % len(photos)
    else:
        gender, ident, repeat = i % 2, i, 0
        im = Image.fromarray(render_face(rng, TREE_SIDE, gender, age))
    folder = tmp / "combined" / ("aligned" if i < n_aligned else "valid") / f"{age:02d}_{'FM'[gender]}"
    folder.mkdir(parents=True, exist_ok=True)
    im.save(folder / f"nm{ident:07d}_rm{repeat:07d}_{2000 - age}-1-1_2000.jpg", "JPEG", quality=90, progressive=True)


def build_tree(dest: Path, n: int, photos: Sequence[Any] = (), seed: int = 0) -> Path:
    """Write an agegender_cleaned-style tree of ``n`` 128x128 progressive JPEGs at ``dest/combined`` (once).

    Photos are centre-cropped with a per-copy jitter and mirrored on odd repeats, so repeats are not
    byte-identical; without photos, ``synthetic.render_face`` draws them. Ages cycle 1-70 and genders come
    from the photo labels (alternate without photos), so every ``NN_G`` folder fills once ``n`` is large.
    IMDB-style names make each source photo one identity, which keeps its repeats in one split.
    """
    if (dest / "combined").is_dir():
        return dest
    n_aligned = round(n * REAL_ALIGNED / REAL_IMAGES)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(lambda i: _tree_image(i, photos, n_aligned, seed, tmp), range(n)))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def bench_weights(path: Path, widths: tuple[int, ...] | None) -> Path:
    """Generated VGG-Face weights at real conv shapes (tiny fc layers: the trunk never uses them)."""
    from agegender.backbones.vgg_face import VGG16_WIDTHS
    from agegender.data.synthetic import make_vgg_face_state, save_vgg_face

    if not path.is_file():
        save_vgg_face(path, make_vgg_face_state(widths or VGG16_WIDTHS, fc=16, classes=16))
    return path


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced through ``items`` (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]
