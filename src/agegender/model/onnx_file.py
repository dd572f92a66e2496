"""An ONNX file must hold every tensor itself: one that points at external data is refused before a session opens.

ONNX lets a tensor keep its bytes in another file (``data_location: EXTERNAL`` with a ``location`` path), which
onnxruntime reads when the session is created. A model from elsewhere could so make predict or serve read any file
the process can (a secret becomes "weights", a FIFO hangs the load). Our exports never use external data.

The check walks the protobuf wire format itself, guided by the few ONNX messages that can hold a tensor, so it needs
neither the ``onnx`` package (not in the light install) nor more memory than a map of the file: tensor bytes are
skipped, never copied. Torch-free.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ..errors import AgeGenderError
from ..files import safe_name

# For each message that can lead to a tensor: field number -> the message it holds (onnx.proto3 numbering).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _SPARSE, _TRAINING, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, graphs ...
    _FUNCTION: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_DEPTH = 64  # subgraphs within subgraphs; real models nest a few levels


class _Malformed(Exception):
    pass


def _varint(buf: memoryview | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview | mmap.mmap, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """``(field number, wire type, value or start, end)`` of each field of the message in ``buf[start:end]``."""
    out, pos = [], start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            out.append((number, wire, value, pos))
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed
            out.append((number, wire, pos, pos + length))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # groups are not used by ONNX
            raise _Malformed
    if pos != end:
        raise _Malformed
    return out


def external_tensors(buf: memoryview | mmap.mmap) -> int:
    """How many tensors in the serialised ModelProto ``buf`` keep their data in another file."""
    found = 0
    stack = [(_MODEL, 0, len(buf), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Malformed
        fields = _fields(buf, start, end)
        if kind == _TENSOR:
            found += any(
                (number == _TENSOR_DATA_LOCATION and wire == 0 and a == _EXTERNAL)
                or (number == _TENSOR_EXTERNAL_DATA and wire == 2)
                for number, wire, a, _ in fields
            )
            continue
        stack.extend(
            (_CHILDREN[kind][number], a, b, depth + 1) for number, wire, a, b in fields if wire == 2 and number in _CHILDREN[kind]
        )
    return found


def check_self_contained(model: str | os.PathLike[str] | bytes, name: str | None = None, malformed: bool = True) -> None:
    """Refuse the ONNX model ``model`` (a file, or its bytes called ``name``) if any tensor in it points at data in
    another file, or, with ``malformed``, if it is not a well-formed protobuf at all (onnxruntime would refuse it
    anyway, in its own words: without ``malformed`` the caller leaves that to it)."""
    if isinstance(model, bytes):
        _check(memoryview(model), safe_name(name or "ONNX model bytes"), malformed)
        return
    path = Path(model)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise AgeGenderError(f"{safe_name(path)}: not a loadable ONNX model (empty file)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _check(buf, safe_name(path), malformed)
    except OSError as e:
        from ..files import os_reason

        raise AgeGenderError(os_reason(path, e, "cannot read")) from None


def _check(buf: memoryview | mmap.mmap, name: str, malformed: bool) -> None:
    try:
        external = external_tensors(buf)
    except _Malformed:
        if malformed:
            raise AgeGenderError(f"{name}: not a loadable ONNX model (malformed protobuf)") from None
        return
    if external:
        raise AgeGenderError(
            f"{name}: ONNX model keeps {external} tensor(s) in external data files; refused, a "
            f"model file must hold all its weights (re-export it as one file)"
        )
