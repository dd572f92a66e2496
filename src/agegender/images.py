"""The one image decoder: every path that opens an image (train, evaluate, predict, identify, serve) uses it.

Untrusted files are refused before any pixel is decoded when their header claims more than ``MAX_PIXELS``;
EXIF orientation is applied; grayscale, 16-bit, palette, alpha and CMYK images all become uint8 RGB. Arrays
handed in are checked by :func:`as_rgb`; :func:`expand_paths` finds the image files a command names.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .errors import AgeGenderError, InputError
from .files import regular_file

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | bytes | np.ndarray  # or a PIL image

MAX_PIXELS = 50_000_000  # header size cap, checked before any pixel is decoded
# Decoders allowed for untrusted files; "JPEG" also opens MPO, the format of many phone cameras' JPEGs.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF", "PPM")
# What folder scans pick up: every suffix of the formats above.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)


class ImageError(InputError):
    """An input that cannot be used as an image; ``kind`` is ``unsupported``, ``corrupt`` or ``too_large``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


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


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose 32-bit "I" images hold 16-bit samples (Pillow widens 16-bit PNG and PGM/PPM data to "I").
_SIXTEEN_BIT_FORMATS = ("PNG", "PPM")
_BAND_PIXELS = 1 << 20  # pixels converted at a time, so a large image never needs a second full-size copy


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from a PIL image of any mode.

    16-bit samples are scaled by 255/65535 (not clipped to white); 32-bit integer and float images are scaled
    from 0 to their own maximum (floats up to 1.0 count as 0-1). Palette (with or without transparency),
    grayscale, alpha and CMYK images are converted; alpha is dropped, keeping the colours the camera recorded.
    The conversion runs in bands of rows, so peak memory is the decoded image plus the result, whatever the mode.
    """
    top = _sample_range(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # a transparent palette entry is only defined through RGBA
    w, h = image.size
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, _BAND_PIXELS // max(w, 1))
    try:
        for y in range(0, h, rows):
            band = image if h <= rows else image.crop((0, y, w, min(h, y + rows)))
            if top is not None:
                a = np.asarray(band, dtype=np.float32)
                out[y : y + rows] = np.clip(np.rint(a * np.float32(255.0 / top)), 0, 255).astype(np.uint8)[..., None]
            else:
                out[y : y + rows] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"), dtype=np.uint8)
    except ValueError as e:  # Pillow has no conversion for a few rare modes
        raise ImageError(f"cannot convert a {image.mode} image to RGB ({e})", "unsupported") from None
    return out


def _sample_range(image: Image.Image) -> float | None:
    """The sample value that maps to 255 for single-channel images wider than 8 bits, else None."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return 65535.0
    if image.mode not in ("I", "F"):
        return None
    if image.mode == "I" and getattr(image, "format", None) in _SIXTEEN_BIT_FORMATS:
        return 65535.0
    hi = float(cast(float, image.getextrema()[1]))  # single-band images give (min, max)
    if image.mode == "F":
        return max(hi, 1.0)
    if hi <= 255:
        return 255.0
    return 65535.0 if hi <= 65535 else hi


def load_image(source: ImageInput | Image.Image, name: str | None = None, draft: int | None = None) -> np.ndarray:
    """Full-size RGB uint8 ``(H, W, 3)`` from a path, encoded bytes, an array or a PIL image.

    ``draft`` lets a large JPEG decode at a reduced DCT scale, at least ``draft`` pixels on its shorter side.
    Raises :class:`ImageError` naming ``name`` or the path.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return as_rgb(source, name or "array")
    if isinstance(source, Image.Image):
        if source.getexif().get(0x0112, 1) in (0, 1):  # upright: convert it as it is (to_rgb never changes it)
            return to_rgb(source)
        return to_rgb(ImageOps.exif_transpose(source))  # a copy: the caller's image is left as it was
    name = name or (os.fspath(source) if not isinstance(source, bytes) else "upload")
    empty = not source if isinstance(source, bytes) else os.path.isfile(source) and os.path.getsize(source) == 0
    if empty:
        raise ImageError(f"{name}: empty file", "unsupported")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as image:
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name}: {w}x{h} pixels exceeds the {MAX_PIXELS:,} pixel limit", "too_large")
            if draft is not None and image.format in ("JPEG", "MPO") and min(w, h) >= 2 * draft:
                image.draft("RGB", (draft, draft))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no second full-size copy
            try:
                return to_rgb(image)
            except ImageError as e:
                raise ImageError(f"{name}: {e}", e.kind) from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", "unsupported") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image", "unsupported") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})", "unsupported") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: exceeds the {MAX_PIXELS:,} pixel limit (a decompression bomb?)", "too_large") from None
    except AgeGenderError:
        raise
    # Corrupt data makes Pillow raise many types (OSError, ValueError, SyntaxError, zlib.error, MemoryError).
    except Exception as e:
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})", "corrupt") from None


def expand_paths(specs: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively for images, globs expanded; duplicates dropped."""
    out: dict[str, None] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            # Videos inside folders are left to be named one by one: a folder scan means photos.
            if not found:
                raise AgeGenderError(f"{p}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.is_file():
            found = [str(p)]
        elif glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not found:
                raise AgeGenderError(f"{spec}: no files match")
        else:
            regular_file(spec, "file or folder")  # a FIFO or a device is named as such, not as missing
            raise AgeGenderError(f"{spec}: no such file or folder")
        out.update(dict.fromkeys(found))
    return list(out)


def as_rgb(image: Any, name: str = "image", keep_gray: bool = False) -> np.ndarray:
    """``image`` as a contiguous ``(H, W, 3)`` uint8 RGB array: grey ``(H, W)`` or ``(H, W, 1)`` replicated (kept
    ``(H, W)`` with ``keep_gray``, for dlib's grey paths), an alpha channel dropped. The one check of every image
    array a caller hands in; :class:`ImageError` naming ``name`` otherwise."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected an image as a numpy array, got {type(image).__name__}", "unsupported")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: expected uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}", "unsupported")
    if image.size == 0:
        raise ImageError(f"{name}: empty image of shape {image.shape}", "unsupported")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.ascontiguousarray(image) if keep_gray else np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def fit_square(rgb: np.ndarray, size: int | None) -> np.ndarray:
    """RGB uint8 ``(size, size, 3)``: centre square crop, then an anti-aliased resize (``None`` keeps the image).

    Pillow's bilinear filter widens with the shrink factor, so downscaling averages (no aliasing).
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    if size is None or (w, h) == (size, size):
        return rgb
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    image = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


Framer = Callable[[np.ndarray], np.ndarray]  # a decoded RGB image -> the network's input pixels, or ImageError


def load_rgb(
    path: str | os.PathLike[str], size: int | None, skipped: Skipped | None = None, frame: Framer | None = None
) -> np.ndarray | None:
    """``load_image`` then ``frame`` (default: ``fit_square`` to ``size``), or None for an unusable file (the reason
    logged and added to ``skipped``)."""
    try:
        if frame is not None:
            return frame(load_image(path))
        return fit_square(load_image(path, draft=size), size)
    except ImageError as e:
        log.warning("skipped: %s", e)
        if skipped is not None:
            skipped.add(path, str(e).removeprefix(f"{os.fspath(path)}: "))
        return None
