"""A contact sheet: thumbnails in a grid, each with a short caption, written as one JPEG."""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import write_bytes_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    path: Path  # the image shown
    caption: tuple[str, ...]  # one short line each, under the thumbnail


def write_contact_sheet(
    tiles: Sequence[Tile],
    dest: str | os.PathLike[str],
    *,
    load: Callable[[Path], np.ndarray | None],
    thumb: int = 128,
    columns: int = 8,
    title: str = "",
) -> Path:
    """Draw ``tiles`` ``columns`` to a row, each ``thumb`` pixels square over its caption, and write ``dest``.

    ``load`` gives a tile's uint8 RGB pixels (the face as the model read it), or None for an unreadable file,
    which is drawn as a grey square so the grid keeps its order.
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    line = 13
    lines = max((len(t.caption) for t in tiles), default=0)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    head = line + 6 if title else 0
    cell_w, cell_h = thumb + 4, thumb + 4 + lines * line
    sheet = Image.new("RGB", (columns * cell_w, max(1, head + rows * cell_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * cell_w + 2, head + (i // columns) * cell_h + 2
        pixels = load(tile.path)
        if pixels is None:
            image = Image.new("RGB", (thumb, thumb), (160, 160, 160))
        else:
            image = Image.fromarray(pixels).convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR)
        sheet.paste(image, (x, y))
        for j, text in enumerate(tile.caption):
            draw.text((x, y + thumb + 1 + j * line), _fit(draw, text, font, thumb), fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=90)
    write_bytes_atomic(dest, buf.getvalue())
    return Path(dest)


def _fit(draw: object, text: str, font: object, width: int) -> str:
    """``text``, cut with an ellipsis from the left (file names differ at their ends) to fit ``width`` pixels."""
    measure = draw.textlength  # type: ignore[attr-defined]
    if measure(text, font=font) <= width:
        return text
    while text and measure("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text
