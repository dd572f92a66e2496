"""A small, bounded reader for Torch7's serialization (what Lua ``torch.save`` writes), binary or ASCII.

Bounded means: every size the file declares is checked against the bytes that remain before anything is
allocated, and a tensor may only view elements its storage really holds, so a small file can never make
the reader (or a later copy of its tensors) allocate more than a small multiple of the file's size.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from ..errors import AgeGenderError

log = logging.getLogger(__name__)

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5
MAX_DIMS = 64
MAX_BYTES = 1 << 40  # no storage or string in a model file comes near 1 TiB; larger means corrupt
_ELEMENTS = {"Byte": "u1", "Char": "i1", "Short": "<i2", "Int": "<i4", "Float": "<f4", "Double": "<f8"}
# cutorch's classes serialize their data exactly like the CPU ones (copied to the host first).
_CUDA = {
    "Cuda": "Float",
    "CudaDouble": "Double",
    "CudaByte": "Byte",
    "CudaChar": "Char",
    "CudaShort": "Short",
    "CudaInt": "Int",
    "CudaLong": "Long",
}
_ASCII_HEAD = re.compile(rb"[0-5][ \t\r\n]")  # an ASCII file starts with its first type tag as text
_ASCII_CHUNK = 1 << 20
_INT_TOKEN = re.compile(rb"[+-]?[0-9]{1,20}")
_FLOAT_TOKEN = re.compile(
    rb"[+-]?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?|inf|nan|infinity)", re.IGNORECASE
)


@dataclass
class T7Object:
    """A Torch class instance other than a tensor or storage, e.g. an ``nn`` module and its fields."""

    class_name: str
    fields: dict[Any, Any] = field(default_factory=dict)


def is_ascii_t7(head: bytes) -> bool:
    """Whether the first bytes of a file look like ``torch.save(f, x, 'ascii')`` output."""
    return _ASCII_HEAD.match(head) is not None


def read_t7(path: str | os.PathLike[str], *, long_size: int = 8) -> Any:
    """Read one Torch7 object from ``path`` as plain Python.

    Tables become dicts (lists when their keys are exactly 1..n), numbers become ints when integral,
    tensors and storages become numpy arrays (tensors are views into their storage), other Torch
    classes become :class:`T7Object`. ``long_size`` is 8 for binary files written on Linux/macOS, 4 on
    Windows; ASCII files (``torch.save(f, x, 'ascii')``) are recognised by their first bytes.
    """
    if long_size not in (4, 8):
        raise ValueError("long_size must be 4 or 8")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(2)
            f.seek(0)
            if is_ascii_t7(head):
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    ascii_reader = _AsciiReader(mm, path, size)
                    obj = ascii_reader.read()
                    rest = len(mm[ascii_reader.pos : ascii_reader.pos + 4096].strip())  # trailing newlines are fine
            else:
                reader = _BinaryReader(f, path, size, long_size)
                obj = reader.read()
                rest = reader.size - reader.pos
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None
    if rest:
        log.warning("%s: ignoring bytes after the first object", path)
    return obj


class _Reader:
    """The object structure, shared by the binary and the ASCII encodings; subclasses read primitives."""

    pair_bytes = 8  # two 4-byte tags

    def __init__(self, path: Path, size: int, long_dtype: np.dtype) -> None:
        self.path, self.size, self.pos = path, size, 0
        self.memo: dict[int, Any] = {}
        self.storage_ids: set[int] = set()  # memo entries that are storages (tensors must point at one)
        self.tensors = {f"torch.{k}Tensor": np.dtype(v) for k, v in _ELEMENTS.items()}
        self.tensors["torch.LongTensor"] = long_dtype
        for cuda, cpu in _CUDA.items():
            self.tensors[f"torch.{cuda}Tensor"] = self.tensors[f"torch.{cpu}Tensor"]
        self.storages = {k.replace("Tensor", "Storage"): v for k, v in self.tensors.items()}

    # -- primitives, per encoding ---------------------------------------------------------------
    def int32(self, what: str) -> int:
        raise NotImplementedError

    def longs(self, n: int, what: str) -> list[int]:
        raise NotImplementedError

    def number(self) -> float:
        raise NotImplementedError

    def chars(self, n: int, what: str, at: int) -> bytes:
        raise NotImplementedError

    def storage_data(self, n: int, dtype: np.dtype, at: int) -> np.ndarray:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------
    def fail(self, message: str) -> NoReturn:
        # Class names and keys come from the file: escape whatever would break the one-line message.
        text = f"{self.path}: {message}"
        raise AgeGenderError(text if text.isprintable() else repr(text)[1:-1])

    def need(self, n: int, what: str, at: int) -> None:
        if n < 0 or n > MAX_BYTES:
            self.fail(f"absurd size for {what} at byte {at} ({n} bytes): not a valid Torch7 file")
        if n > self.size - self.pos:
            self.fail(f"truncated at byte {self.size} ({what} at byte {at} needs {n} more bytes)")

    def read(self) -> Any:
        try:
            return self.obj()
        except RecursionError:
            self.fail("objects nested too deeply (corrupt file?)")

    def string(self, what: str = "string") -> str:
        at = self.pos
        n = self.int32(f"{what} length")
        return self.chars(n, what, at).decode("utf-8", "surrogateescape")

    def obj(self) -> Any:
        at = self.pos
        tag = self.int32("type tag")
        if tag == NIL:
            return None
        if tag == NUMBER:
            x = self.number()
            return int(x) if x.is_integer() else x
        if tag == STRING:
            return self.string()
        if tag == BOOLEAN:
            return self.int32("boolean") == 1
        if tag in (TABLE, TORCH):
            index = self.int32("object index")
            if index in self.memo:
                return self.memo[index]
            return self.table(index) if tag == TABLE else self.torch_object(index, at)
        self.fail(f"unknown type tag {tag} at byte {at}: not a Torch7 file, or one with Lua functions")

    def table(self, index: int) -> dict[Any, Any] | list[Any]:
        table: dict[Any, Any] = {}
        self.memo[index] = table  # registered first: a table may contain itself
        at = self.pos
        n = self.int32("table size")
        self.need(self.pair_bytes * n, "table", at)  # the least a key and a value can take
        for _ in range(n):
            key_at = self.pos
            key = self.obj()
            if isinstance(key, (dict, list, T7Object, np.ndarray)):
                self.fail(f"table key at byte {key_at} is a {type(key).__name__}, which this reader does not support")
            table[key] = self.obj()
        if n and all(type(k) is int for k in table) and set(table) == set(range(1, n + 1)):
            items = [table[i] for i in range(1, n + 1)]
            self.memo[index] = items
            return items
        return table

    def torch_object(self, index: int, at: int) -> Any:
        version = self.string("class version")
        class_name = self.string("class name") if version.startswith("V ") else version  # pre-versioning files
        if class_name in self.storages:
            obj = self.storage(self.storages[class_name])
            self.storage_ids.add(id(obj))
        elif class_name in self.tensors:
            obj = self.tensor(class_name, self.tensors[class_name], at)
        elif class_name.startswith("torch.") and class_name.endswith(("Tensor", "Storage")):
            self.fail(f"unsupported tensor class {class_name} at byte {at}")
        else:
            obj = T7Object(class_name)  # type: ignore[assignment]
            self.memo[index] = obj  # before the fields, which may refer back to the object
            fields = self.obj()
            if isinstance(fields, list):
                fields = dict(enumerate(fields, 1))
            if not isinstance(fields, dict):
                self.fail(f"{class_name} at byte {at} has no table of fields")
            obj.fields = fields  # type: ignore[attr-defined]
        self.memo[index] = obj
        return obj

    def storage(self, dtype: np.dtype) -> np.ndarray:
        at = self.pos
        (n,) = self.longs(1, "storage size")
        if n < 0 or n * dtype.itemsize > MAX_BYTES:
            self.fail(f"absurd size for storage data at byte {at} ({n} elements): not a valid Torch7 file")
        return self.storage_data(n, dtype, at)

    def tensor(self, class_name: str, dtype: np.dtype, at: int) -> np.ndarray:
        ndim = self.int32("tensor dimension count")
        if not 0 <= ndim <= MAX_DIMS:
            self.fail(f"absurd dimension count {ndim} for {class_name} at byte {at}")
        size = self.longs(ndim, "tensor sizes") if ndim else []
        stride = self.longs(ndim, "tensor strides") if ndim else []
        (offset,) = self.longs(1, "tensor offset")
        offset -= 1  # stored 1-based
        if min(size, default=0) < 0 or min(stride, default=0) < 0 or offset < 0:
            self.fail(f"{class_name} at byte {at} has a negative size, stride or offset")
        elements = math.prod(size) if ndim else 0
        if math.prod(max(n, 1) for n in size) * dtype.itemsize > MAX_BYTES or max(stride, default=0) > MAX_BYTES:
            self.fail(f"absurd size {size} or stride {stride} for {class_name} at byte {at}")
        storage = self.obj()
        if storage is None or ndim == 0:
            if elements:
                self.fail(f"{class_name} at byte {at} has size {size} but no storage")
            return np.empty(size if ndim else (0,), dtype)
        if id(storage) not in self.storage_ids or storage.dtype != dtype:
            self.fail(f"{class_name} at byte {at} does not point at a storage of its type")
        if not elements:
            return np.empty(size, dtype)
        # Checked before any view is made: the view's extent must lie inside the storage, and it may not
        # hold more elements than the storage does (zero or overlapping strides): a copy of such a view
        # would allocate far more than the file holds.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            self.fail(f"{class_name} at byte {at} reaches element {last} of a storage of {storage.size}")
        if elements > storage.size - offset:
            self.fail(
                f"{class_name} at byte {at} has size {size} with strides {stride}: {elements} elements "
                f"over a storage of {storage.size} (zero or overlapping strides), not a weight tensor"
            )
        return np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * dtype.itemsize for s in stride])


class _BinaryReader(_Reader):
    def __init__(self, f: BinaryIO, path: Path, size: int, long_size: int) -> None:
        super().__init__(path, size, np.dtype(f"<i{long_size}"))
        self.f = f
        self.long_fmt = "q" if long_size == 8 else "i"
        self.long_size = long_size

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what, self.pos)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while we read it
            self.fail(f"truncated at byte {self.pos + len(data)}")
        self.pos += n
        return data

    def int32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def longs(self, n: int, what: str) -> list[int]:
        return list(struct.unpack(f"<{n}{self.long_fmt}", self.take(n * self.long_size, what)))

    def number(self) -> float:
        return struct.unpack("<d", self.take(8, "number"))[0]

    def chars(self, n: int, what: str, at: int) -> bytes:
        self.need(n, what, at)
        return self.take(n, what)

    def storage_data(self, n: int, dtype: np.dtype, at: int) -> np.ndarray:
        self.need(n * dtype.itemsize, "storage data", at)
        # Read straight into the array that we return: the weights are in memory once, never copied.
        data = np.empty(n, dtype)
        got = self.f.readinto(memoryview(data.view(np.uint8)))  # type: ignore[attr-defined,arg-type]
        if got != data.nbytes:
            self.fail(f"truncated at byte {self.pos + (got or 0)}")
        self.pos += data.nbytes
        return data


class _AsciiReader(_Reader):
    """``torch.save(f, x, 'ascii')``: numbers as text (``%d``, ``%.17g``, ``%.9g``), each write call's
    values separated by spaces and ended by a newline; strings and byte/char storages as raw bytes."""

    pair_bytes = 4  # two one-digit tags, each with its newline

    def __init__(self, mm: mmap.mmap, path: Path, size: int) -> None:
        super().__init__(path, size, np.dtype("<i8"))
        self.mm = mm

    def _newline(self) -> None:  # the read side of auto-spacing: one optional newline after each call
        if self.pos < self.size and self.mm[self.pos] == 0x0A:
            self.pos += 1

    def _token(self, what: str, pattern: re.Pattern[bytes]) -> bytes:
        mm, pos = self.mm, self.pos
        while pos < self.size and mm[pos] in b" \t\r\n\v\f":
            pos += 1
        at = pos
        end = pos
        while end < self.size and end - at <= 64 and mm[end] not in b" \t\r\n\v\f":
            end += 1
        token = mm[at:end]
        if not token:
            self.fail(f"truncated at byte {self.size} ({what} at byte {self.pos})")
        if pattern.fullmatch(token) is None:
            self.fail(f"{what} at byte {at} is {token[:20]!r}, not a number: not a valid Torch7 ASCII file")
        self.pos = end
        return token

    def _ints(self, n: int, what: str, lo: int, hi: int) -> list[int]:
        if n < 0:
            self.fail(f"absurd count {n} for {what} at byte {self.pos}")
        values = [int(self._token(what, _INT_TOKEN)) for _ in range(n)]
        if any(not lo <= v <= hi for v in values):
            self.fail(f"{what} at byte {self.pos} out of range: not a valid Torch7 ASCII file")
        if n:
            self._newline()
        return values

    def int32(self, what: str) -> int:
        return self._ints(1, what, -(1 << 31), (1 << 31) - 1)[0]

    def longs(self, n: int, what: str) -> list[int]:
        return self._ints(n, what, -(1 << 63), (1 << 63) - 1)

    def number(self) -> float:
        value = float(self._token("number", _FLOAT_TOKEN))
        self._newline()
        return value

    def chars(self, n: int, what: str, at: int) -> bytes:
        self.need(n, what, at)
        data = self.mm[self.pos : self.pos + n]
        self.pos += n
        if n:
            self._newline()
        return bytes(data)

    def storage_data(self, n: int, dtype: np.dtype, at: int) -> np.ndarray:
        if dtype.itemsize == 1:  # Byte and Char storages are raw bytes even in ASCII files
            return np.frombuffer(self.chars(n, "storage data", at), dtype).copy()
        self.need(2 * n - 1 if n else 0, "storage data", at)  # a digit and a separator per number, at least
        data = np.empty(n, dtype)
        done = 0
        while done < n:
            start = self.pos
            end = min(self.size, start + _ASCII_CHUNK)
            chunk = self.mm[start:end]
            if end < self.size:  # cut at the last separator, so no number is split between chunks
                cut = max(chunk.rfind(c) for c in (b" ", b"\n", b"\t", b"\r"))
                if cut <= 0:
                    self.fail(f"storage data at byte {start} has no separators: not a valid Torch7 ASCII file")
                chunk = chunk[:cut]
            want = n - done
            parts = chunk.split(None, want)
            consumed = len(chunk)
            if len(parts) > want:
                consumed -= len(parts.pop())
            if not parts:
                if end >= self.size:
                    self.fail(f"truncated at byte {self.size} (storage data at byte {at} needs {want} more numbers)")
                self.pos = start + consumed
                continue
            data[done : done + len(parts)] = self._parse(parts, dtype, start)
            done += len(parts)
            self.pos = start + consumed
        self._newline()
        return data

    def _parse(self, parts: list[bytes], dtype: np.dtype, at: int) -> np.ndarray:
        pattern = _FLOAT_TOKEN if dtype.kind == "f" else _INT_TOKEN
        for token in (parts[0], parts[-1]):  # cheap spot check; numpy's conversion checks the rest
            if pattern.fullmatch(token) is None:
                self.fail(f"storage data near byte {at} holds {token[:20]!r}: not a valid Torch7 ASCII file")
        try:
            return np.array(parts).astype(np.float64 if dtype.kind == "f" else np.int64).astype(dtype)
        except (ValueError, OverflowError):
            self.fail(f"storage data near byte {at} holds a malformed number: not a valid Torch7 ASCII file")
