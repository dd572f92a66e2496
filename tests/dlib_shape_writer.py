"""Test-only writer of dlib ``shape_predictor`` files, and small random models to write.

Written from the format description (dlib/serialize.h pack_int, float_details, matrix and std::vector
serialization, shape_predictor.h field order), independently of agegender.weights.dlib_shape, so round trips
test the reader rather than mirror it; dlib itself loading what this writes checks the writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INF_EXPONENT = 32000  # float_details' marker for +infinity


def pack_int(value: int, *, negative_zero: bool = False) -> bytes:
    """dlib's integer: control byte (0x80 = negative, low nibble = byte count), then little-endian bytes."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 or negative_zero else 0)]) + body


def float_parts(value: float) -> tuple[int, int]:
    """float_details of a float32: 24-bit mantissa and exponent, low zero bytes of the mantissa shifted off."""
    value = float(np.float32(value))
    if math.isinf(value):
        return 0, INF_EXPONENT + (value < 0)
    if math.isnan(value):
        return 0, INF_EXPONENT + 2
    fraction, exponent = math.frexp(value)
    mantissa, exponent = int(fraction * (1 << 24)), exponent - 24
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return mantissa, exponent


def pack_float(value: float) -> bytes:
    mantissa, exponent = float_parts(value)
    return pack_int(mantissa) + pack_int(exponent)


@dataclass
class CascadeSpec:
    idx1: np.ndarray  # (T, S)
    idx2: np.ndarray  # (T, S)
    thresh: np.ndarray  # (T, S) float32
    leaves: np.ndarray  # (T, S + 1, parts, 2) float32
    anchor: np.ndarray  # (P,)
    deltas: np.ndarray  # (P, 2) float32


@dataclass
class ModelSpec:
    initial_shape: np.ndarray  # (parts, 2) float32
    cascades: list[CascadeSpec]


def write_model(spec: ModelSpec, *, version: int = 1, old_matrix_format: bool = False) -> bytes:
    """The bytes dlib's ``serialize(shape_predictor)`` would write for ``spec``."""
    out = bytearray()

    def column(values: np.ndarray) -> None:
        values = np.asarray(values, np.float32).reshape(-1)
        sign = 1 if old_matrix_format else -1  # current dlib negates the dimensions
        out.extend(pack_int(sign * len(values)) + pack_int(sign * 1))
        for v in values:
            out.extend(pack_float(v))

    out.extend(pack_int(version))
    column(spec.initial_shape)
    out.extend(pack_int(len(spec.cascades)))
    for c in spec.cascades:
        out.extend(pack_int(len(c.idx1)))
        for t in range(len(c.idx1)):
            out.extend(pack_int(c.idx1.shape[1]))
            for a, b, th in zip(c.idx1[t], c.idx2[t], c.thresh[t]):
                out.extend(pack_int(int(a)) + pack_int(int(b)) + pack_float(th))
            out.extend(pack_int(len(c.leaves[t])))
            for leaf in c.leaves[t]:
                column(leaf)
    out.extend(pack_int(len(spec.cascades)))
    for c in spec.cascades:
        out.extend(pack_int(len(c.anchor)))
        for a in c.anchor:
            out.extend(pack_int(int(a)))
    out.extend(pack_int(len(spec.cascades)))
    for c in spec.cascades:
        out.extend(pack_int(len(c.deltas)))
        for dx, dy in c.deltas:
            out.extend(pack_float(dx) + pack_float(dy))
    return bytes(out)


def random_model(
    rng: np.random.Generator,
    *,
    parts: int = 5,
    cascades: int = 3,
    trees: int = 12,
    depth: int = 3,
    pixels: int = 24,
    leaf_scale: float = 0.01,
) -> ModelSpec:
    """A model whose predictions move around plausibly: shape in the unit box, small feature offsets,
    thresholds in grey-level differences, small leaf updates (some exactly zero, some negative)."""
    splits = (1 << depth) - 1
    f32 = np.float32
    out = []
    for _ in range(cascades):
        leaves = (rng.standard_normal((trees, splits + 1, parts, 2)) * leaf_scale).astype(f32)
        leaves[rng.random(leaves.shape) < 0.05] = 0
        out.append(
            CascadeSpec(
                rng.integers(0, pixels, (trees, splits)),
                rng.integers(0, pixels, (trees, splits)),
                rng.uniform(-60, 60, (trees, splits)).astype(f32),
                leaves,
                rng.integers(0, parts, pixels),
                rng.uniform(-0.3, 0.3, (pixels, 2)).astype(f32),
            )
        )
    return ModelSpec(rng.uniform(0.15, 0.85, (parts, 2)).astype(f32), out)


def tiny_model() -> ModelSpec:
    """A few hundred bytes: 5 parts, 2 cascades of 2 depth-1 trees over 3 feature pixels."""
    return random_model(np.random.default_rng(7), cascades=2, trees=2, depth=1, pixels=3)
