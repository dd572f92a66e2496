"""A small, bounded reader for Torch7's binary serialization (what Lua ``torch.save`` writes)."""

from __future__ import annotations

import logging
import math
import os
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


@dataclass
class T7Object:
    """A Torch class instance other than a tensor or storage, e.g. an ``nn`` module and its fields."""

    class_name: str
    fields: dict[Any, Any] = field(default_factory=dict)


def read_t7(path: str | os.PathLike[str], *, long_size: int = 8) -> Any:
    """Read one Torch7 object from ``path`` as plain Python.

    Tables become dicts (lists when their keys are exactly 1..n), numbers become ints when integral,
    tensors and storages become numpy arrays (tensors are views into their storage), other Torch
    classes become :class:`T7Object`. ``long_size`` is 8 for files written on Linux/macOS, 4 on Windows.
    """
    if long_size not in (4, 8):
        raise ValueError("long_size must be 4 or 8")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            reader = _Reader(f, path, os.fstat(f.fileno()).st_size, long_size)
            try:
                obj = reader.obj()
            except RecursionError:
                raise AgeGenderError(f"{path}: objects nested too deeply (corrupt file?)") from None
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None
    if reader.pos != reader.size:
        log.warning("%s: ignoring %d bytes after the first object", path, reader.size - reader.pos)
    return obj


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int, long_size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0
        self.long_fmt = "q" if long_size == 8 else "i"
        self.long_size = long_size
        self.memo: dict[int, Any] = {}
        self.storage_ids: set[int] = set()  # memo entries that are storages (tensors must point at one)
        self.tensors = {f"torch.{k}Tensor": np.dtype(v) for k, v in _ELEMENTS.items()}
        self.tensors["torch.LongTensor"] = np.dtype(f"<i{long_size}")
        self.storages = {k.replace("Tensor", "Storage"): v for k, v in self.tensors.items()}

    def fail(self, message: str) -> NoReturn:
        raise AgeGenderError(f"{self.path}: {message}")

    def need(self, n: int, what: str, at: int) -> None:
        if n < 0 or n > MAX_BYTES:
            self.fail(f"absurd size for {what} at byte {at} ({n} bytes): not a valid Torch7 file")
        if n > self.size - self.pos:
            self.fail(f"truncated at byte {self.size} ({what} at byte {at} needs {n} more bytes)")

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

    def string(self, what: str = "string") -> str:
        at = self.pos
        n = self.int32(f"{what} length")
        self.need(n, what, at)
        return self.take(n, what).decode("utf-8", "surrogateescape")

    def obj(self) -> Any:
        at = self.pos
        tag = self.int32("type tag")
        if tag == NIL:
            return None
        if tag == NUMBER:
            x = struct.unpack("<d", self.take(8, "number"))[0]
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
        self.fail(f"unknown type tag {tag} at byte {at}: not a Torch7 binary file, or one with Lua functions")

    def table(self, index: int) -> dict[Any, Any] | list[Any]:
        table: dict[Any, Any] = {}
        self.memo[index] = table  # registered first: a table may contain itself
        at = self.pos
        n = self.int32("table size")
        self.need(8 * n, "table", at)  # each key and value takes at least a 4-byte tag
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
        self.need(n * dtype.itemsize, "storage data", at)
        # Read straight into the array that we return: the weights are in memory once, never copied.
        data = np.empty(n, dtype)
        got = self.f.readinto(memoryview(data.view(np.uint8)))  # type: ignore[attr-defined,arg-type]
        if got != data.nbytes:
            self.fail(f"truncated at byte {self.pos + (got or 0)}")
        self.pos += data.nbytes
        return data

    def tensor(self, class_name: str, dtype: np.dtype, at: int) -> np.ndarray:
        ndim = self.int32("tensor dimension count")
        if not 0 <= ndim <= MAX_DIMS:
            self.fail(f"absurd dimension count {ndim} for {class_name} at byte {at}")
        size = self.longs(ndim, "tensor sizes")
        stride = self.longs(ndim, "tensor strides")
        (offset,) = self.longs(1, "tensor offset")
        offset -= 1  # stored 1-based
        storage = self.obj()
        if min(size, default=0) < 0 or min(stride, default=0) < 0 or offset < 0:
            self.fail(f"{class_name} at byte {at} has a negative size, stride or offset")
        if math.prod(max(n, 1) for n in size) * dtype.itemsize > MAX_BYTES or max(stride, default=0) > MAX_BYTES:
            self.fail(f"absurd size {size} or stride {stride} for {class_name} at byte {at}")
        if storage is None or ndim == 0:
            if ndim and all(size):
                self.fail(f"{class_name} at byte {at} has size {size} but no storage")
            return np.empty(size if ndim else (0,), dtype)
        if id(storage) not in self.storage_ids or storage.dtype != dtype:
            self.fail(f"{class_name} at byte {at} does not point at a storage of its type")
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.size:
                self.fail(f"{class_name} at byte {at} reaches element {last} of a storage of {storage.size}")
        return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=[s * dtype.itemsize for s in stride])
