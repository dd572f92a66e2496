"""The one image decoder: every path that opens an image (train, evaluate, predict, identify, serve) uses it.

Untrusted files are refused before any pixel is decoded when their header claims more than ``MAX_PIXELS``;
EXIF orientation is applied; grayscale, 16-bit, palette, alpha and CMYK images all become uint8 RGB.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import AgeGenderError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | bytes | np.ndarray  # or a PIL image

MAX_PIXELS = 50_000_000  # header size cap, checked before any pixel is decoded
# Decoders allowed for untrusted files; "JPEG" also opens MPO, the format of many phone cameras' JPEGs.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF", "PPM")
# What folder scans pick up: every suffix of the formats above.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".bmp", ".webp", ".gif", ".tif",
                            ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})


class ImageError(AgeGenderError):
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


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from a PIL image of any mode; 16- and 32-bit data are scaled, not clipped to white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        # 16-bit files use 0-65535; 32-bit integer and float data have no fixed range, so use their own.
        top = 65535.0 if image.mode.startswith("I;16") or (a.max(initial=0) > 255 and a.max() <= 65535) else 255.0
        if image.mode == "F" or a.max(initial=0) > 65535:
            top = max(float(a.max(initial=0)), 1.0)
        gray = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # a transparent palette entry is only defined through RGBA
    # Alpha is dropped, keeping the colours the camera recorded (transparency is rare in face photos).
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(source: ImageInput | Image.Image, name: str | None = None, draft: int | None = None) -> np.ndarray:
    """Full-size RGB uint8 ``(H, W, 3)`` from a path, encoded bytes, an array or a PIL image.

    ``draft`` lets a large JPEG decode at a reduced DCT scale, at least ``draft`` pixels on its shorter side.
    Raises :class:`ImageError` naming ``name`` or the path.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _as_rgb(source, name or "array")
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
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
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", "unsupported") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image", "unsupported") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
                         "unsupported") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: exceeds the {MAX_PIXELS:,} pixel limit (a decompression bomb?)", "too_large") from None
    except AgeGenderError:
        raise
    # Corrupt data makes Pillow raise many types (OSError, ValueError, SyntaxError, zlib.error, MemoryError).
    except Exception as e:
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})", "corrupt") from None


def _as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected uint8 (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}",
                         "unsupported")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


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


def load_rgb(path: str | os.PathLike[str], size: int | None, skipped: Skipped | None = None) -> np.ndarray | None:
    """``load_image`` then ``fit_square``, or None for an unusable file (reason logged and added to ``skipped``)."""
    try:
        return fit_square(load_image(path, draft=size), size)
    except ImageError as e:
        log.warning("skipped: %s", e)
        if skipped is not None:
            skipped.add(path, str(e).removeprefix(f"{os.fspath(path)}: "))
        return None
