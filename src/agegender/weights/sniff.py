"""What a weights file really is, from its first bytes, whatever its name says.

:func:`sniff` names the container (Torch7, PyTorch zip or pickle, HDF5, MAT, Caffe protobuf, dlib,
safetensors) and things that are not weights at all (a Git LFS pointer, an HTML error page, an archive
still to unpack), so a mis-named file gets a message that says which ``--input-format`` to use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgeGenderError
from .torch7 import is_ascii_t7

HEAD_BYTES = 1024


@dataclass(frozen=True)
class Sniffed:
    what: str  # a phrase: "a PyTorch zip archive"
    fmt: str | None = None  # the --input-format that reads it, if any
    strong: bool = True  # a magic number, not a guess
    usable: bool = True  # False: not weights at all; refused whatever the format


def read_head(path: Path) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES), path.stat().st_size
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None


def sniff(head: bytes, size: int) -> Sniffed | None:
    """The kind of file ``head`` (its first bytes) starts, or None when nothing is recognised."""
    if head.startswith(b"version https://git-lfs"):
        return Sniffed(
            f"a Git LFS pointer ({size} bytes), not the weights: run `git lfs pull` in its repository, "
            "or download the file itself",
            usable=False,
        )
    if head[:64].lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        return Sniffed("an HTML or XML page (a failed download?), not weights", usable=False)
    if head.startswith(b"\x1f\x8b"):
        return Sniffed("a gzip file (e.g. vgg_face_torch.tar.gz): unpack it first (tar xzf FILE)", usable=False)
    if len(head) > 262 and head[257:262] == b"ustar":
        return Sniffed("a tar archive: unpack it first (tar xf FILE)", usable=False)
    if head.startswith(b"PK\x03\x04"):
        (name_len,) = struct.unpack_from("<H", head, 26) if len(head) >= 30 else (0,)
        first = head[30 : 30 + name_len]
        if first.endswith((b"data.pkl", b"/version", b".format_version", b"byteorder")):
            return Sniffed("a PyTorch zip archive (torch.save)", "pt")
        return Sniffed(f"a ZIP archive (first entry {first.decode('utf-8', 'replace')!r}): unpack it first", usable=False)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Sniffed("a Python pickle (legacy torch.save)", "pt")
    if head.startswith(b"MATLAB 7.3 MAT-file"):
        return Sniffed(
            "a MATLAB v7.3 MAT-file (HDF5 inside), which scipy cannot read: re-save it in MATLAB with "
            "save(FILE, '-struct', 'net', '-v7')",
            usable=False,
        )
    if head.startswith(b"MATLAB 5.0 MAT-file"):
        return Sniffed("a MATLAB 5 MAT-file", "mat")
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return Sniffed("an HDF5 file (Keras .h5)", "h5")
    if len(head) >= 10 and head[8:10] == b'{"' and struct.unpack_from("<Q", head)[0] < size:
        return Sniffed("a safetensors file (converted weights are used as they are: pass it to --weights)", usable=False)
    if b"loss_metric" in head[:32]:
        return Sniffed("a dlib network (.dat)", "dlib")
    if is_ascii_t7(head):
        return Sniffed("a Torch7 file in ASCII format", "t7")
    if head[:4] in (b"\x03\x00\x00\x00", b"\x04\x00\x00\x00") and head[4:8] == b"\x01\x00\x00\x00":
        return Sniffed("a Torch7 file", "t7")  # a table or torch object with object index 1
    if _looks_like_caffe(head, size):
        return Sniffed("a Caffe protobuf (.caffemodel)", "caffe", strong=False)
    return None


def _looks_like_caffe(head: bytes, size: int) -> bool:
    """A NetParameter starts with its name (field 1), layers (2, V1), input (3), input_dim (4) or layer (100)."""
    key, pos = _varint(head, 0)
    if key is None:
        return False
    field, wire = key >> 3, key & 7
    if (field, wire) == (4, 0):
        return True
    if (field, wire) not in ((1, 2), (2, 2), (3, 2), (100, 2), (8, 2)):
        return False
    length, pos = _varint(head, pos)
    if length is None or length > size - pos:
        return False
    if field in (1, 3):  # a net or input name: short printable text
        text = head[pos : pos + length]
        return 0 < length <= 256 and len(text) == length and all(32 <= c < 127 for c in text)
    return True


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        shift += 7
        if data[i] < 0x80:
            return value, i + 1
    return None, pos
