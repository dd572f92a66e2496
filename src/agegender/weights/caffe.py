"""Caffe's ``VGG_FACE.caffemodel``: a protobuf ``NetParameter``, read with a small bounded wire-format reader.

Only the few fields that hold weights are decoded; everything else is skipped by its wire type, and
nothing from the file is ever executed or used to pick code. Fields (caffe.proto):

- ``NetParameter``: ``layers`` 2 (``V1LayerParameter``), ``layer`` 100 (``LayerParameter``);
- ``V1LayerParameter``: name 4, type 5 (enum: CONVOLUTION 4, INNER_PRODUCT 14), blobs 6, and the even older
  ``V0LayerParameter`` at 1 (name 1, type 2 as a string, blobs 50);
- ``LayerParameter``: name 1, type 2 (``"Convolution"``, ``"InnerProduct"``), blobs 7;
- ``BlobProto``: num 1, channels 2, height 3, width 4, data 5 (packed float), shape 7 (``BlobShape``: dim 1,
  packed int64), double_data 8.

Conv blobs are ``(out, in, kh, kw)`` and Caffe feeds BGR, so the weights are canonical as they are; an
InnerProduct fc6 takes Caffe's C,H,W flatten, the canonical order.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AgeGenderError
from ..model.vgg import CONV_NAMES
from .canonical import Params, assign_layers, printable

V1_CONVOLUTION, V1_INNER_PRODUCT = 4, 14
_CONV_TYPES = {"Convolution", "conv", "CONVOLUTION"}
_FC_TYPES = {"InnerProduct", "innerproduct", "INNER_PRODUCT"}
_V1_TYPES = {V1_CONVOLUTION: "Convolution", V1_INNER_PRODUCT: "InnerProduct"}
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass
class CaffeLayer:
    name: str = ""
    type: str = ""
    blobs: list[np.ndarray] = field(default_factory=list)


class _Wire:
    """Protobuf wire format over a byte buffer; every length is checked against its enclosing message."""

    def __init__(self, buf: bytes | mmap.mmap, path: Path) -> None:
        self.buf, self.path = buf, path

    def fail(self, message: str) -> AgeGenderError:
        return AgeGenderError(printable(f"{self.path}: {message}: not a valid Caffe model"))

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        for i in range(pos, min(pos + 10, end)):
            byte = self.buf[i]
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value & 0xFFFFFFFFFFFFFFFF, i + 1
        if end - pos < 10:
            raise self.fail(f"truncated at byte {end} (a varint at byte {pos})")
        raise self.fail(f"a varint of more than 10 bytes at byte {pos}")

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """``(field number, wire type, value or start, end)`` of each field in ``buf[start:end]``."""
        pos = start
        while pos < end:
            at = pos
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if number == 0 or number >= 1 << 29:
                raise self.fail(f"field number {number} at byte {at}")
            if wire == VARINT:
                value, pos = self.varint(pos, end)
                yield number, wire, value, pos
                continue
            if wire == LENGTH:
                n, pos = self.varint(pos, end)
            elif wire in (FIXED64, FIXED32):
                n = 8 if wire == FIXED64 else 4
            else:
                raise self.fail(f"wire type {wire} (field {number}) at byte {at}")
            if n > end - pos:
                raise self.fail(f"truncated at byte {end} (field {number} at byte {at} needs {n} bytes)")
            yield number, wire, pos, pos + n
            pos += n

    def expect(self, wire: int, wanted: int, number: int, what: str) -> None:
        if wire != wanted:
            raise self.fail(f"{what} (field {number}) has wire type {wire}")

    def text(self, start: int, end: int) -> str:
        return bytes(self.buf[start:end]).decode("utf-8", "replace")

    def array(self, start: int, end: int, dtype: str) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        if (end - start) % item:
            raise self.fail(f"packed data at byte {start} is {end - start} bytes, not a multiple of {item}")
        return np.frombuffer(self.buf, dtype, (end - start) // item, start).copy()

    def varints(self, wire: int, value: int, end: int) -> list[int]:
        """A repeated integer field, packed (one LENGTH field) or not (one VARINT)."""
        if wire == VARINT:
            return [value]
        self.expect(wire, LENGTH, 1, "a shape dimension")
        out, pos = [], value
        while pos < end:
            v, pos = self.varint(pos, end)
            out.append(v)
        return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_caffe_layers(path: Path) -> tuple[str, list[CaffeLayer]]:
    """The net's name and its layers (those with weights hold them as numpy arrays), in file order."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise AgeGenderError(f"{path}: empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _read_net(_Wire(mm, path), len(mm))
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_net(w: _Wire, size: int) -> tuple[str, list[CaffeLayer]]:
    name, layers = "", []
    for number, wire, start, end in w.fields(0, size):
        if number == 1:
            w.expect(wire, LENGTH, number, "the net's name")
            name = w.text(start, end)
        elif number == 2:
            w.expect(wire, LENGTH, number, "a V1 layer")
            layers.append(_v1_layer(w, start, end))
        elif number == 100:
            w.expect(wire, LENGTH, number, "a layer")
            layers.append(_layer(w, start, end, name_field=1, type_field=2, blobs_field=7))
    return name, layers


def _layer(w: _Wire, start: int, end: int, name_field: int, type_field: int, blobs_field: int) -> CaffeLayer:
    layer = CaffeLayer()
    for number, wire, s, e in w.fields(start, end):
        if number == name_field:
            w.expect(wire, LENGTH, number, "a layer name")
            layer.name = w.text(s, e)
        elif number == type_field:
            w.expect(wire, LENGTH, number, "a layer type")
            layer.type = w.text(s, e)
        elif number == blobs_field:
            w.expect(wire, LENGTH, number, "a blob")
            layer.blobs.append(_blob(w, s, e))
    return layer


def _v1_layer(w: _Wire, start: int, end: int) -> CaffeLayer:
    layer = CaffeLayer()
    for number, wire, s, e in w.fields(start, end):
        if number == 4:
            w.expect(wire, LENGTH, number, "a layer name")
            layer.name = w.text(s, e)
        elif number == 5:
            w.expect(wire, VARINT, number, "a layer type")
            layer.type = _V1_TYPES.get(s, f"V1 type {s}")
        elif number == 6:
            w.expect(wire, LENGTH, number, "a blob")
            layer.blobs.append(_blob(w, s, e))
        elif number == 1:  # V0LayerParameter, from Caffe's first releases
            w.expect(wire, LENGTH, number, "a V0 layer")
            v0 = _layer(w, s, e, name_field=1, type_field=2, blobs_field=50)
            layer.name, layer.type, layer.blobs = v0.name or layer.name, v0.type, layer.blobs + v0.blobs
    return layer


def _blob(w: _Wire, start: int, end: int) -> np.ndarray:
    legacy = [0, 0, 0, 0]  # num, channels, height, width
    shape: list[int] | None = None
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for number, wire, s, e in w.fields(start, end):
        if number in (1, 2, 3, 4):
            w.expect(wire, VARINT, number, "a blob dimension")
            legacy[number - 1] = _signed(s)
        elif number == 7:
            w.expect(wire, LENGTH, number, "a blob shape")
            shape = []
            for n, wt, s2, e2 in w.fields(s, e):
                if n == 1:
                    shape += [_signed(v) for v in w.varints(wt, s2, e2)]
        elif number == 5:
            floats.append(w.array(s, e, "<f4") if wire == LENGTH else _fixed(w, wire, FIXED32, s, e, "<f4"))
        elif number == 8:
            doubles.append(w.array(s, e, "<f8") if wire == LENGTH else _fixed(w, wire, FIXED64, s, e, "<f8"))
    dims = shape if shape is not None else legacy
    # A dimension beyond the file's size cannot be real (another one must be 0), and numpy refuses it anyway.
    if any(d < 0 or d > len(w.buf) for d in dims) or len(dims) > 8:
        raise w.fail(f"blob at byte {start} has shape {dims}")
    data = np.concatenate(floats) if floats else np.concatenate(doubles) if doubles else np.empty(0, np.float32)
    if floats and doubles:
        raise w.fail(f"blob at byte {start} holds both float and double data")
    if data.size != math.prod(dims):
        raise w.fail(f"blob at byte {start} has shape {tuple(dims)} but {data.size} values")
    return data.reshape(dims)


def _fixed(w: _Wire, wire: int, wanted: int, s: int, e: int, dtype: str) -> np.ndarray:
    w.expect(wire, wanted, 5 if wanted == FIXED32 else 8, "an unpacked blob value")
    return w.array(s, e, dtype)


def read_caffe(path: Path, trust_pickle: bool = False) -> Params:
    """Layers with weights, by type and order: 13 convolutions, then 3 inner products (or 1x1/7x7 convs)."""
    _, layers = read_caffe_layers(path)
    weighted = [layer for layer in layers if layer.blobs]
    if not layers:
        raise AgeGenderError(f"{path}: no layers: not a Caffe model")
    found: list[tuple[str, np.ndarray, np.ndarray]] = []
    for i, layer in enumerate(weighted):
        label = f"{layer.name or '?'} ({layer.type or 'no type'})"
        if layer.type not in _CONV_TYPES | _FC_TYPES:
            raise AgeGenderError(
                f"{path}: layer {label} has weights, but VGG-Face's only weighted layers are convolutions and inner products"
            )
        if len(layer.blobs) != 2:
            raise AgeGenderError(f"{path}: layer {label} has {len(layer.blobs)} blobs, expected a weight and a bias")
        weight, bias = layer.blobs
        if layer.type in _FC_TYPES:
            if i < len(CONV_NAMES):
                raise AgeGenderError(
                    f"{path}: layer {label} is an inner product at position {i + 1}; the first "
                    f"{len(CONV_NAMES)} of VGG-Face's weighted layers are convolutions"
                )
            # V1 blobs are 4-D (1, 1, out, in) for an inner product; newer ones (out, in).
            if weight.ndim == 4 and weight.shape[:2] == (1, 1):
                weight = weight.reshape(weight.shape[2:])
            if weight.ndim != 2:
                raise AgeGenderError(f"{path}: layer {label} weight has shape {weight.shape}, expected (out, in)")
        elif weight.ndim != 4:
            raise AgeGenderError(f"{path}: layer {label} weight has shape {weight.shape}, expected (out, in, kh, kw)")
        found.append((label, weight, bias))
    return assign_layers(path, found)
