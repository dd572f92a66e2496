"""dlib's binary serialization, read within the bytes a file really has.

dlib writes integers as a control byte (0x80 = negative, low 4 bits = byte count) followed by that many
little-endian bytes; floats as an integer mantissa and an integer exponent; strings as a length and bytes;
bools as ASCII ``'0'``/``'1'``; and DNN tensors as version 2, four dimensions, then raw float32 data.
Every declared size is checked against what remains before anything is allocated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import AgeGenderError

# float_details' exponents for values that are not finite (dlib/float_details.h: is_inf, is_ninf, is_nan);
# dlib reads every exponent above them as NaN too.
_INF, _NINF, _NAN = 32000, 32001, 32002


class DlibStream:
    """A cursor over the bytes of one dlib-serialized file; every read names the file and offset on failure."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = memoryview(data)
        self.name = name
        self.pos = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DlibStream:
        path = Path(path)
        try:
            return cls(path.read_bytes(), str(path))
        except OSError as e:
            raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def error(self, what: str) -> AgeGenderError:
        return AgeGenderError(f"{self.name}: {what} at byte {self.pos}")

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise self.error(f"truncated: {n} bytes declared, {self.remaining} remain")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read_int(self, max_bytes: int = 8) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        # dlib never writes a zero-length integer (zero is one 0x00 byte) and refuses to read one.
        if control & 0x70 or size == 0 or size > max_bytes:
            raise self.error(f"not a dlib integer (control byte 0x{control:02x})")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def read_float(self) -> float:
        if self.remaining and self.data[self.pos] & 0x70:
            raise self.error("a float in dlib's pre-2013 text format, which is not supported")
        mantissa = self.read_int(8)
        exponent = self.read_int(2)
        if exponent == _INF:
            return math.inf
        if exponent == _NINF:
            return -math.inf
        if exponent >= _NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # C's ldexp, which dlib uses, saturates to infinity instead
            return math.copysign(math.inf, mantissa)

    def read_bool(self) -> bool:
        c = bytes(self.take(1))
        if c not in (b"0", b"1"):
            raise self.error(f"not a dlib bool ({c!r})")
        return c == b"1"

    def read_str(self, max_len: int = 1 << 16) -> str:
        n = self.read_int()
        if n > max_len:
            raise self.error(f"string of {n} bytes is implausible")
        try:
            return bytes(self.take(n)).decode("ascii")
        except UnicodeDecodeError:
            raise self.error("string is not ASCII") from None

    def expect_str(self, *allowed: str) -> str:
        start = self.pos
        s = self.read_str()
        if s not in allowed:
            self.pos = start
            raise self.error(f"expected {' or '.join(repr(a) for a in allowed)}, found {s!r}")
        return s

    def expect_int(self, value: int, what: str) -> None:
        got = self.read_int()
        if got != value:
            raise self.error(f"{what} is {got}, expected {value}")

    def float32(self, count: int) -> np.ndarray:
        """``count`` raw little-endian float32 values, copied out of the file buffer."""
        if count < 0 or count * 4 > self.remaining:
            raise self.error(f"truncated: {count} float32 values declared, {self.remaining} bytes remain")
        return np.frombuffer(self.take(count * 4), dtype="<f4").astype(np.float32)

    def tensor(self) -> np.ndarray:
        """A ``dlib::tensor`` (version 2): shape ``(n, k, nr, nc)`` and raw float32 data."""
        self.expect_int(2, "tensor version")
        shape = tuple(self.read_int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.error(f"negative tensor shape {shape}")
        # An empty tensor costs no bytes whatever its other sizes, but numpy refuses absurd ones.
        if 0 in shape and math.prod(d for d in shape if d) > 1 << 32:
            raise self.error(f"implausible empty tensor shape {shape}")
        return self.float32(math.prod(shape)).reshape(shape)

    def end(self) -> None:
        if self.remaining:
            raise self.error(f"{self.remaining} unexpected trailing bytes")
