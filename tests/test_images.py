"""The one image decoder on real files of every depth and mode: 16-bit scaled (not white), palette, alpha, CMYK,
grayscale; conversion in bands equal to a whole-image conversion; folder scans take every decodable suffix."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.images import IMAGE_FORMATS, IMAGE_SUFFIXES, ImageError, load_image, load_rgb, to_rgb

# A 16-bit ramp over the whole range: 8-bit clipping makes it almost all 255, scaling keeps the ramp.
RAMP16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).round().astype(np.uint16)
RAMP8 = np.rint(RAMP16 / 257.0).astype(np.uint8)


def _png(width: int, height: int, depth: int, colour_type: int, rows: np.ndarray) -> bytes:
    """A PNG written byte by byte (Pillow cannot write 48- or 64-bit colour PNGs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _saved(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _assert_gray_ramp(rgb: np.ndarray, expected: np.ndarray = RAMP8, tol: int = 1) -> None:
    assert rgb.dtype == np.uint8 and rgb.shape == (*expected.shape, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= tol
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155  # a ramp, not a white sheet


SIXTEEN_BIT_GRAY = {
    "png I;16 (Pillow)": lambda: _saved(Image.fromarray(RAMP16), "PNG"),
    "png 16-bit gray (by hand)": lambda: _png(64, 48, 16, 0, RAMP16.astype(">u2")),
    "png 16-bit gray + alpha": lambda: _png(64, 48, 16, 4, np.stack([RAMP16, np.full_like(RAMP16, 65535)], -1).astype(">u2")),
    "tiff I;16": lambda: _saved(Image.fromarray(RAMP16), "TIFF"),
    "tiff I;16B": lambda: _saved(Image.frombytes("I;16B", (64, 48), RAMP16.astype(">u2").tobytes()), "TIFF"),
    "pgm 16-bit": lambda: b"P5\n64 48\n65535\n" + RAMP16.astype(">u2").tobytes(),
}


@pytest.mark.parametrize("kind", sorted(SIXTEEN_BIT_GRAY))
def test_16_bit_grayscale_is_scaled_not_white(tmp_path: Path, kind: str) -> None:
    data = SIXTEEN_BIT_GRAY[kind]()
    path = tmp_path / "x.img"
    path.write_bytes(data)
    for source in (data, path, Image.open(io.BytesIO(data))):
        _assert_gray_ramp(load_image(source))


def test_16_bit_dark_image_stays_dark() -> None:
    dark = (RAMP16 // 64).astype(np.uint16)  # 0..1023 of 65535: nearly black, whatever the container
    for data in (_saved(Image.fromarray(dark), "PNG"), b"P5\n64 48\n65535\n" + dark.astype(">u2").tobytes()):
        assert load_image(data).max() <= 4


def test_48_and_64_bit_colour_png() -> None:
    rgb16 = np.stack([RAMP16, RAMP16[::-1], np.full_like(RAMP16, 32768)], -1)
    for colour_type, planes in ((2, rgb16), (6, np.concatenate([rgb16, np.full_like(RAMP16, 65535)[..., None]], -1))):
        out = load_image(_png(64, 48, 16, colour_type, planes.astype(">u2")))
        expected = np.rint(rgb16 / 257.0)
        assert out.shape == (48, 64, 3) and np.abs(out - expected).max() <= 1
        assert out.max() == 255 and out.min() == 0


def test_32_bit_and_float_images_use_their_own_range() -> None:
    ints = RAMP16.astype(np.int32) * 16  # 0..1048560, beyond 16 bits
    out = load_image(_saved(Image.fromarray(ints), "TIFF"))
    assert out.max() == 255 and np.abs(out[..., 0].astype(int) - np.rint(ints * 255.0 / ints.max())).max() <= 1
    unit = (RAMP16 / 65535.0).astype(np.float32)  # floats in 0..1
    _assert_gray_ramp(load_image(_saved(Image.fromarray(unit), "TIFF")))


def test_exif_orientation_on_a_16_bit_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _saved(Image.fromarray(RAMP16), "TIFF", exif=exif)
    out = load_image(data)
    assert out.shape == (64, 48, 3)
    _assert_gray_ramp(np.rot90(out, 1), RAMP8)


RED = (200, 30, 30)


def _transparent_palette() -> Image.Image:
    image = Image.new("RGB", (40, 30), RED).convert("P")
    image.info["transparency"] = 255  # an unused entry: the colours stay
    return image


MODES = {
    "palette": (lambda: Image.new("RGB", (40, 30), RED).convert("P"), RED),
    "palette + transparency": (_transparent_palette, RED),
    "rgba": (lambda: Image.new("RGBA", (40, 30), (*RED, 10)), RED),
    "la": (lambda: Image.new("LA", (40, 30), (90, 0)), (90, 90, 90)),
    "gray": (lambda: Image.new("L", (40, 30), 90), (90, 90, 90)),
    "bilevel": (lambda: Image.new("1", (40, 30), 1), (255, 255, 255)),
    "cmyk": (lambda: Image.new("RGB", (40, 30), RED).convert("CMYK"), RED),
}


def _files() -> list[tuple[str, str, bytes]]:
    """Every (mode, format) pair Pillow can write, as encoded bytes."""
    out = []
    for kind, (make, _) in MODES.items():
        for fmt in ("PNG", "TIFF", "GIF", "JPEG", "WEBP", "BMP", "PPM"):
            try:
                out.append((kind, fmt, _saved(make(), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))))
            except (OSError, ValueError, KeyError):
                continue
    return out


@pytest.mark.parametrize(("kind", "fmt", "data"), _files(), ids=lambda v: v if isinstance(v, str) else "")
def test_modes_and_formats(kind: str, fmt: str, data: bytes) -> None:
    out = load_image(data)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    tol = 40 if fmt == "GIF" else 12  # GIF requantises RGB to a palette
    expected = MODES[kind][1]
    assert np.abs(out.reshape(-1, 3).mean(0) - expected).max() < tol, (kind, fmt, out.reshape(-1, 3).mean(0))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_banded_conversion_equals_a_whole_image_conversion(mode: str) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (1100, 1000, 3), dtype=np.uint8))  # > one band of rows
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (1100, 1000), dtype=np.uint16))
        expected = np.repeat(np.rint(np.asarray(image) / 257.0).astype(np.uint8)[..., None], 3, 2)
    else:
        image = rgb.convert(mode)
        expected = np.asarray(image.convert("RGB"))
    out = to_rgb(image)
    assert out.shape == (1100, 1000, 3) and np.array_equal(out, expected)
    assert image.mode == mode  # the caller's image is left as it was


def test_unconvertible_mode_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="cannot convert a La image"):
        load_image(Image.new("La", (4, 4)))


def test_every_suffix_is_a_decodable_format(tmp_path: Path) -> None:
    fmt_of = {
        ".gif": "GIF",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".ppm": "PPM",
        ".pgm": "PPM",
        ".pbm": "PPM",
        ".pnm": "PPM",
        ".bmp": "BMP",
        ".webp": "WEBP",
        ".png": "PNG",
    }
    for suffix in sorted(IMAGE_SUFFIXES):
        fmt = fmt_of.get(suffix, "JPEG")
        assert fmt in IMAGE_FORMATS
        mode = {".pgm": "L", ".pbm": "1"}.get(suffix, "RGB")
        path = tmp_path / f"x{suffix}"
        Image.new(mode, (24, 24), 255 if mode != "RGB" else RED).save(path, fmt)
        assert load_rgb(path, 16) is not None, suffix
