"""MatConvNet ``.mat`` copies of VGG-Face: SimpleNN (``layers``), DagNN (``params`` + ``layers``), or flat structs.

Filters are ``(H, W, in, out)``, biases ``(out, 1)``; fc6-fc8 are 7x7 and 1x1 convolutions; the input is RGB,
so conv1_1 is flipped to the canonical BGR. Before scipy reads anything, :func:`scan_mat` walks the file's
element tree and checks every declared size against the bytes that hold it (and caps decompression), so a
small file cannot make scipy allocate a huge array.
"""

from __future__ import annotations

import math
import mmap
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AgeGenderError, one_line
from ..model.vgg import CONV_NAMES
from .canonical import LAYERS, Params, assign_layers, flip_to_bgr

MI_MATRIX, MI_COMPRESSED = 14, 15
_ITEM = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}  # mi type -> bytes
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_NUMERIC = set(range(6, 16))  # mxDOUBLE ... mxUINT64
MAX_DEPTH = 32
INFLATE_RATIO, INFLATE_SLACK = 16, 16 << 20  # decompressed bytes allowed per compressed byte, and a floor


class _Scan:
    def __init__(self, path: Path, order: str) -> None:
        self.path, self.order = path, order

    def fail(self, message: str) -> AgeGenderError:
        return AgeGenderError(f"{self.path}: {message}: not a readable MATLAB file")

    def tag(self, buf: Any, pos: int, end: int) -> tuple[int, int, int, int]:
        """``(type, nbytes, data start, next element)``; small elements pack both into 4 bytes."""
        if end - pos < 8:
            raise self.fail(f"truncated at byte {end} (an element tag at byte {pos})")
        first, second = struct.unpack_from(f"{self.order}II", buf, pos)
        if first >> 16:
            n = first >> 16
            if n > 4:
                raise self.fail(f"a small element of {n} bytes at byte {pos}")
            return first & 0xFFFF, n, pos + 4, pos + 8
        start = pos + 8
        if second > end - start:
            raise self.fail(f"truncated at byte {end} (an element at byte {pos} declares {second} bytes)")
        padded = start + second if first == MI_COMPRESSED else start + (second + 7) // 8 * 8
        return first, second, start, min(padded, end)

    def elements(self, buf: Any, pos: int, end: int, depth: int, budget: list[int]) -> None:
        while pos < end:
            kind, n, start, pos = self.tag(buf, pos, end)
            if kind == MI_MATRIX:
                self.matrix(buf, start, start + n, depth)
            elif kind == MI_COMPRESSED:
                self.elements(*self.inflate(buf, start, start + n, budget), depth, budget)

    def inflate(self, buf: Any, start: int, end: int, budget: list[int]) -> tuple[bytes, int, int]:
        d = zlib.decompressobj()
        try:
            data = d.decompress(memoryview(buf)[start:end], budget[0] + 1)
        except zlib.error as e:
            raise self.fail(f"corrupt compressed element at byte {start} ({e})") from None
        if len(data) > budget[0]:
            raise self.fail(f"a compressed element at byte {start} inflates to more than {INFLATE_RATIO}x the file")
        budget[0] -= len(data)
        return data, 0, len(data)

    def matrix(self, buf: Any, pos: int, end: int, depth: int) -> None:
        if pos == end:
            return  # an empty array
        if depth > MAX_DEPTH:
            raise self.fail("arrays nested too deeply")
        kind, n, start, pos = self.tag(buf, pos, end)
        if kind != 6 or n != 8:
            raise self.fail(f"an array at byte {start} has no array flags")
        (flags,) = struct.unpack_from(f"{self.order}I", buf, start)
        cls, is_complex = flags & 0xFF, bool(flags & 0x800)
        kind, n, start, pos = self.tag(buf, pos, end)
        if kind != 5 or n % 4 or n < 8:
            raise self.fail(f"an array at byte {start} has no dimensions")
        dims = struct.unpack_from(f"{self.order}{n // 4}i", buf, start)
        if min(dims) < 0:
            raise self.fail(f"an array at byte {start} has dimensions {dims}")
        count = math.prod(dims)
        kind, n, start, pos = self.tag(buf, pos, end)  # the array name
        if cls in _NUMERIC or cls == _CHAR:
            for _ in range(2 if is_complex else 1):
                kind, n, start, pos = self.tag(buf, pos, end)
                item = _ITEM.get(kind)
                if item is None or (n != count * item if cls in _NUMERIC else n < count):
                    raise self.fail(f"an array at byte {start} of {count} elements holds {n} bytes of type {kind}")
        elif cls in (_CELL, _STRUCT, _OBJECT):
            fields = 1
            if cls == _OBJECT:
                kind, n, start, pos = self.tag(buf, pos, end)  # the class name
            if cls != _CELL:
                kind, n, start, pos = self.tag(buf, pos, end)
                (name_len,) = struct.unpack_from(f"{self.order}i", buf, start) if n >= 4 else (0,)
                kind, n, start, pos = self.tag(buf, pos, end)
                if name_len <= 0 or n % name_len:
                    raise self.fail(f"a struct at byte {start} has malformed field names")
                fields = n // name_len
            if count * fields * 8 > end - pos:  # every member is at least an 8-byte tag
                raise self.fail(f"an array at byte {pos} declares {count * fields} members in {end - pos} bytes")
            for _ in range(count * fields):
                kind, n, start, pos = self.tag(buf, pos, end)
                if kind != MI_MATRIX:
                    raise self.fail(f"a member at byte {start} is not an array")
                self.matrix(buf, start, start + n, depth + 1)
        # sparse arrays come back as scipy.sparse (no dense allocation); function handles and opaque
        # objects hold nothing scipy expands


def scan_mat(path: Path) -> None:
    """Refuse a MAT-5 file whose declared sizes exceed the bytes behind them, before scipy allocates."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 128:
            raise AgeGenderError(f"{path}: {size} bytes, shorter than a MAT-file header: not a readable MATLAB file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:10] != b"MATLAB 5.0":
                return  # not MAT-5 (v4 or something else): scipy's own checks apply
            endian = mm[126:128]
            if endian not in (b"IM", b"MI"):
                raise AgeGenderError(f"{path}: MAT-file header has endian mark {endian!r}: not a readable MATLAB file")
            scan = _Scan(path, "<" if endian == b"IM" else ">")
            try:
                scan.elements(mm, 128, size, 0, [INFLATE_RATIO * size + INFLATE_SLACK])
            except RecursionError:
                raise scan.fail("arrays nested too deeply") from None


def read_mat(path: Path, trust_pickle: bool = False) -> Params:
    """MatConvNet: conv W (H, W, in, out), b (out, 1); fc6-fc8 stored as 7x7 and 1x1 convolutions.

    Layouts: DagNN (``params`` with ``conv1_1f``/``conv1_1b`` ..., and ``layers`` of type ``dagnn.Conv`` naming
    them; tested first, since a DagNN file has a ``layers`` too), SimpleNN (``layers`` cell array of type
    ``conv``, top level or under ``net``; W/b in ``weights`` or the older ``filters``/``biases``), or one
    top-level struct per layer with fields ``W`` and ``b``.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise AgeGenderError(f"{path}: reading .mat needs scipy (pip install 'agegender[convert]')") from None
    scan_mat(path)
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except NotImplementedError:  # scipy's message for v7.3 files
        raise AgeGenderError(f"{path}: MATLAB v7.3 files are not supported; re-save with save(..., '-v7')") from None
    except Exception as e:  # scipy raises ValueError, TypeError, ... for non-MATLAB bytes
        raise AgeGenderError(f"{path}: not a readable MATLAB file ({one_line(e, with_type=True)})") from None
    root: Any = mat.get("net", mat)
    get = root.get if isinstance(root, dict) else lambda k: getattr(root, k, None)
    layers, dag_params = get("layers"), get("params")
    if dag_params is not None:
        found = _dagnn(path, dag_params, layers)
    elif layers is not None:
        found = _simplenn(path, layers)
    else:
        found = [(n, getattr(mat[n], "W", None), getattr(mat[n], "b", None)) for n in LAYERS if n in mat]
    out: list[tuple[str, Any, Any]] = []
    for i, (name, w, b) in enumerate(found):
        if not isinstance(w, np.ndarray) or not isinstance(b, np.ndarray) or w.dtype.kind != "f":
            raise AgeGenderError(f"{path}: {name} lacks numeric W and b arrays")
        if w.ndim == 2 and i >= len(CONV_NAMES):
            w = w[None, None]  # squeeze_me turned the 1x1 conv (1, 1, in, out) into (in, out)
        if w.ndim != 4:
            raise AgeGenderError(f"{path}: {name} W has shape {w.shape}, expected (H, W, in, out)")
        out.append((name, w.transpose(3, 2, 0, 1), b))  # (H, W, in, out) -> (out, in, H, W)
    params = assign_layers(path, out)
    flip_to_bgr(params)  # MatConvNet feeds RGB; canonical conv1_1 takes BGR like VGG_FACE.t7
    return params


def _dagnn(path: Path, dag_params: Any, layers: Any) -> list[tuple[str, Any, Any]]:
    values = {getattr(p, "name", None): getattr(p, "value", None) for p in np.atleast_1d(dag_params)}
    found = []
    for layer in np.atleast_1d(layers) if layers is not None else []:
        if getattr(layer, "type", None) != "dagnn.Conv":
            continue
        names = [str(n) for n in np.atleast_1d(getattr(layer, "params", []))]
        if len(names) != 2 or not all(n in values for n in names):
            raise AgeGenderError(
                f"{path}: DagNN layer {getattr(layer, 'name', '?')} names params {names}, expected a filter and a bias in params"
            )
        found.append((str(getattr(layer, "name", names[0])), values[names[0]], values[names[1]]))
    if not found:  # params without a usable layer list: MatConvNet's names, conv1_1f / conv1_1b
        found = [(n, values[f"{n}f"], values.get(f"{n}b")) for n in LAYERS if f"{n}f" in values]
    return found


def _simplenn(path: Path, layers: Any) -> list[tuple[str, Any, Any]]:
    found = []
    for layer in np.atleast_1d(layers):
        if getattr(layer, "type", "conv") != "conv":
            continue
        wb = getattr(layer, "weights", None)
        if wb is None:
            wb = (getattr(layer, "filters", None), getattr(layer, "biases", None))
        if wb is None or len(wb) == 0:
            continue
        if len(wb) != 2:
            raise AgeGenderError(
                f"{path}: conv layer {getattr(layer, 'name', '?')} has {len(wb)} weight arrays, expected a filter and a bias"
            )
        found.append((str(getattr(layer, "name", "?")), wb[0], wb[1]))
    return found
