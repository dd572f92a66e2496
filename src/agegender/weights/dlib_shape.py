"""dlib ``shape_predictor`` files (an ensemble of regression trees, Kazemi & Sullivan 2014), read into NumPy.

Every field of the file is a dlib integer (a control byte: 0x80 = negative, low 4 bits = byte count, then
that many little-endian bytes), and a float is two of them: a mantissa and a power-of-two exponent. Layout::

    int      version                       always 1
    matrix   initial_shape                 rows, cols (both negated by current dlib), then x0 y0 x1 y1 ... as floats;
                                           the mean shape in unit-box coordinates
    vector   cascades of
      vector   trees of
        vector   splits                    idx1, idx2 (feature-pixel indices), thresh (float); breadth first,
                                           node i's children are 2i+1 (taken when p[idx1] - p[idx2] > thresh), 2i+2
        vector   leaf values               one matrix (2*parts x 1) per leaf: the shape update
    vector   per cascade: anchor_idx       the landmark each feature pixel hangs off
    vector   per cascade: deltas           each feature pixel's (dx, dy) offset from it, in mean-shape coordinates

Because the whole file is one run of integers, it is tokenised once (vectorised) and the structure is then read
in whole trees at a time; a 9 MB model loads in a fraction of a second instead of millions of Python calls.
Trees within a cascade must share one depth (dlib's trainer always writes them so).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import AgeGenderError
from .dlib_serial import DlibStream

# float_details' exponent markers for infinities and NaN; anything larger also decodes as NaN.
_SPECIAL_EXPONENT = 32000
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)  # mask for a k-byte integer


@dataclass(frozen=True, eq=False)
class Cascade:
    """One cascade level: ``T`` complete binary trees of ``S`` splits and ``S + 1`` leaves each."""

    split_idx1: np.ndarray  # (T, S) intp: feature pixel on the left of the comparison
    split_idx2: np.ndarray  # (T, S) intp
    thresholds: np.ndarray  # (T, S) float32
    leaf_values: np.ndarray  # (T, S + 1, parts, 2) float32: shape update in unit-box coordinates
    anchor_idx: np.ndarray  # (P,) intp: landmark each of the P feature pixels is attached to
    deltas: np.ndarray  # (P, 2) float32: offset from that landmark, in mean-shape coordinates

    @property
    def depth(self) -> int:
        return int(self.split_idx1.shape[1] + 1).bit_length() - 1


@dataclass(frozen=True, eq=False)
class ShapePredictorModel:
    initial_shape: np.ndarray  # (parts, 2) float32, unit-box coordinates
    cascades: tuple[Cascade, ...]

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])


def read_shape_predictor(path: str | os.PathLike[str]) -> ShapePredictorModel:
    """Parse a dlib ``shape_predictor`` file; any malformed, truncated or unsupported input raises AgeGenderError."""
    stream = DlibStream.open(path)
    ints = _Ints(bytes(stream.data), stream.name)
    version = ints.signed("shape_predictor version", 4)
    if version != 1:
        raise ints.error(f"shape_predictor version is {version}, expected 1", ints.i - 1)
    initial = ints.float_column("initial shape")
    if initial.size == 0 or initial.size % 2:
        raise ints.error(f"initial shape has {initial.size} values, expected a positive even count", ints.i - 1)
    parts = initial.size // 2

    n_cascades = ints.count("cascades", 1)
    forests = [ints.forest(c, parts) for c in range(n_cascades)]
    anchors = ints.per_cascade("anchor_idx", n_cascades, lambda c: ints.anchor_list(c, parts))
    deltas = ints.per_cascade("deltas", n_cascades, lambda c: ints.delta_list(c, len(anchors[c])))
    ints.end()

    cascades = []
    for c, ((idx1, idx2, thresh, leaves), anchor, delta) in enumerate(zip(forests, anchors, deltas)):
        worst = max(int(idx1.max(initial=0)), int(idx2.max(initial=0)))
        if idx1.size and worst >= len(anchor):
            raise AgeGenderError(f"{ints.name}: cascade {c} splits on feature pixel {worst}, but it has only {len(anchor)}")
        cascades.append(Cascade(*(_frozen(a) for a in (idx1, idx2, thresh, leaves, anchor, delta))))
    return ShapePredictorModel(_frozen(initial.reshape(parts, 2)), tuple(cascades))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _token_starts(buf: np.ndarray) -> np.ndarray:
    """Byte offsets of the chain of dlib integers that starts at offset 0, up to and including the first token
    that is not a valid integer or runs past the end (the caller reports that one).

    The chain is inherently sequential (each control byte says where the next one starts), so a Python loop
    would take millions of steps. Instead a table of "bytes spanned by the next 16 tokens" is built for every
    offset by four vectorised doublings, the loop takes 16 tokens per step, and the tokens in between are
    filled in vectorised afterwards.
    """
    n = len(buf)
    reach = 16 * 9  # 16 tokens of at most 9 bytes, so a uint8 table suffices
    pad = np.zeros(n + reach + 1, np.uint8)
    pad[:n] = buf
    step = pad & 0x0F
    step[step > 8] = 0  # invalid sizes: any step will do, the chain is cut there below
    step += 1
    index = np.arange(len(pad), dtype=np.int64 if len(pad) >= 2**31 else np.int32)
    target = np.empty_like(index)
    jump, ahead = step.copy(), np.empty_like(step)
    for _ in range(4):
        np.add(index, jump, out=target)
        np.take(jump, target, mode="clip", out=ahead)  # type: ignore[call-overload]
        jump += ahead
    jump16 = jump.tobytes()  # bytes indexing is several times faster than NumPy scalar indexing
    heads = []
    pos = 0
    while pos < n:
        heads.append(pos)
        pos += jump16[pos]
    columns = [np.array(heads, dtype=np.int64)]
    for _ in range(15):
        columns.append(columns[-1] + step[columns[-1]])
    starts = np.stack(columns, axis=1).reshape(-1)
    starts = starts[starts < n]  # positions only grow along the chain, so this keeps a prefix
    ctrl = buf[starts]
    size = (ctrl & 0x0F).astype(np.int64)
    bad = ((ctrl & 0x70) != 0) | (size == 0) | (size > 8) | (starts + 1 + size > n)
    return starts[: int(np.argmax(bad)) + 1] if bad.any() else starts


class _Ints:
    """A cursor over the file's integer tokens, reading scalars one at a time and trees in vectorised blocks."""

    def __init__(self, data: bytes, name: str) -> None:
        self.name = name
        self.nbytes = len(data)
        buf = np.frombuffer(data, np.uint8)
        starts = _token_starts(buf)
        ctrl = buf[starts]
        sizes = (ctrl & 0x0F).astype(np.int64)
        self.stop: str | None = None  # why the token run ends before the file does
        self.stop_at = self.nbytes  # byte where the run ends
        if len(starts):
            last, last_size = int(starts[-1]), int(sizes[-1])
            if ctrl[-1] & 0x70 or not 1 <= last_size <= 8:
                self.stop = f"not a dlib integer (control byte 0x{int(ctrl[-1]):02x})"
            elif last + 1 + last_size > self.nbytes:
                self.stop = f"truncated: integer needs {last_size} bytes, {self.nbytes - last - 1} remain"
            if self.stop:
                self.stop_at = last
                starts, ctrl, sizes = starts[:-1], ctrl[:-1], sizes[:-1]
        # Read 8 little-endian bytes after each control byte through an overlapping-window view, then mask.
        padded = np.zeros(self.nbytes + 9, np.uint8)
        padded[: self.nbytes] = buf
        windows = np.ndarray((self.nbytes + 1,), "<u8", padded, strides=(1,))
        mag = windows[starts + 1] & _LOW_BYTES[sizes]
        self.starts, self.sizes, self.neg = starts, sizes, (ctrl & 0x80) != 0
        self.huge = mag >= np.uint64(1 << 62)  # no legitimate field comes near; keeps int64 arithmetic safe
        small = np.where(self.huge, np.uint64(0), mag).astype(np.int64)
        self.value = np.where(self.neg, -small, small)
        self.n = len(starts)
        self.i = 0

    def byte(self, token: int) -> int:
        """Where a token starts; one past the last token is where the run of integers ends."""
        return int(self.starts[token]) if token < self.n else self.stop_at

    def error(self, what: str, token: int) -> AgeGenderError:
        return AgeGenderError(f"{self.name}: {what} at byte {self.byte(token)}")

    def need(self, count: int, what: str) -> None:
        if self.i + count > self.n:
            raise self.error(f"{self.stop or 'truncated'} in {what}", self.n)

    def _check(self, idx: np.ndarray, what: str, max_bytes: int, signed: bool) -> None:
        """Reject tokens that dlib would refuse for a field of this type (or that we cannot represent)."""
        bad = (self.sizes[idx] > max_bytes) | self.huge[idx]
        if not signed:
            bad |= self.neg[idx]
        if bad.any():
            tok = int(np.asarray(idx).reshape(-1)[np.argmax(bad.reshape(-1))])
            kind = "signed" if signed else "unsigned"
            raise self.error(f"{what} is not a valid {kind} integer of at most {max_bytes} bytes", tok)

    def _scalar(self, what: str, max_bytes: int, signed: bool) -> int:
        self.need(1, what)
        self._check(np.array([self.i]), what, max_bytes, signed)
        self.i += 1
        return int(self.value[self.i - 1])

    def signed(self, what: str, max_bytes: int = 8) -> int:
        return self._scalar(what, max_bytes, True)

    def unsigned(self, what: str) -> int:
        return self._scalar(what, 8, False)

    def count(self, what: str, tokens_each: int) -> int:
        """A std::vector length, checked against what the file can still hold (every token is >= 2 bytes)."""
        n = self.unsigned(f"number of {what}")
        left = self.nbytes - self.byte(self.i)
        if n * tokens_each * 2 > left:
            raise self.error(f"truncated: {n} {what} declared, {left} bytes remain", self.i - 1)
        return n

    def floats(self, idx: np.ndarray, what: str) -> np.ndarray:
        """Decode the floats whose mantissa tokens are at ``idx`` (exponents follow each), exactly as float32."""
        self._check(idx, f"{what} mantissa", 8, True)
        self._check(idx + 1, f"{what} exponent", 2, True)
        exponent = self.value[idx + 1]
        bad = (exponent >= _SPECIAL_EXPONENT) | (exponent < -(1 << 15))
        with np.errstate(over="ignore", invalid="ignore"):
            # dlib rounds the mantissa to float first, then scales: match it bit for bit.
            out = np.ldexp(self.value[idx].astype(np.float32), np.clip(exponent, -400, 400).astype(np.int32))
        bad |= ~np.isfinite(out)
        if bad.any():
            tok = int(np.asarray(idx).reshape(-1)[np.argmax(bad.reshape(-1))])
            raise self.error(f"{what} is not a finite number", tok)
        return out.astype(np.float32)

    def float_column(self, what: str) -> np.ndarray:
        """A ``matrix<float,0,1>``: rows and cols (negated in the current format), then the values."""
        nr, nc = self._dims(what)
        if nc != 1:
            raise self.error(f"{what} has {nc} columns, expected 1", self.i - 1)
        self.need(2 * nr, what)
        out = self.floats(self.i + 2 * np.arange(nr), what)
        self.i += 2 * nr
        return out

    def _dims(self, what: str) -> tuple[int, int]:
        nr = self.signed(f"{what} rows")
        nc = self.signed(f"{what} columns")
        if nr < 0 or nc < 0:
            nr, nc = -nr, -nc
        if nr < 0 or nc < 0:
            raise self.error(f"{what} has a negative size", self.i - 1)
        left = self.nbytes - self.byte(self.i)
        if nr * nc * 4 > left:
            raise self.error(f"truncated: {what} declares {nr}x{nc} values, {left} bytes remain", self.i - 1)
        return nr, nc

    def forest(self, c: int, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One cascade's trees, read as a (trees, tokens-per-tree) block once the first tree fixes the layout."""
        what = f"cascade {c}"
        n_trees = self.count(f"trees in {what}", 2)
        if n_trees == 0:  # dlib accepts a cascade that changes nothing
            empty = np.zeros((0, 0), np.intp)
            return empty, empty, np.zeros((0, 0), np.float32), np.zeros((0, 1, parts, 2), np.float32)
        first = self.i
        n_splits = self.unsigned(f"{what} split count")
        self.need(4 * n_splits + 1, f"{what} tree 0")
        self.i = first + 1 + 4 * n_splits
        n_leaves = self.unsigned(f"{what} leaf count")
        if n_leaves != n_splits + 1 or n_leaves & (n_leaves - 1):
            raise self.error(
                f"{what} tree 0 has {n_splits} splits and {n_leaves} leaves, expected a complete binary tree", self.i - 1
            )
        self.i = first
        rows = 2 * parts
        per_leaf = 2 + 2 * rows
        per_tree = 2 + 4 * n_splits + n_leaves * per_leaf
        self.need(n_trees * per_tree, what)
        tok = first + np.arange(n_trees * per_tree).reshape(n_trees, per_tree)

        self._expect(tok[:, 0], n_splits, f"{what} split count (trees must share one depth)")
        leaf_count_col = 1 + 4 * n_splits
        self._expect(tok[:, leaf_count_col], n_leaves, f"{what} leaf count (trees must share one depth)")
        split = tok[:, 1:leaf_count_col].reshape(n_trees, n_splits, 4)
        self._check(split[..., :2], f"{what} split feature index", 8, False)
        idx1 = self.value[split[..., 0]].astype(np.intp)
        idx2 = self.value[split[..., 1]].astype(np.intp)
        thresh = self.floats(split[..., 2], f"{what} split threshold")

        leaf = tok[:, leaf_count_col + 1 :].reshape(n_trees, n_leaves, per_leaf)
        self._check(leaf[..., :2], f"{what} leaf size", 8, True)
        nr, nc = self.value[leaf[..., 0]], self.value[leaf[..., 1]]
        flip = (nr < 0) | (nc < 0)
        nr, nc = np.where(flip, -nr, nr), np.where(flip, -nc, nc)
        bad = (nr != rows) | (nc != 1)
        if bad.any():
            t = np.argwhere(bad)[0]
            raise self.error(f"{what} leaf is {nr[tuple(t)]}x{nc[tuple(t)]}, expected {rows}x1", int(leaf[t[0], t[1], 0]))
        values = self.floats(leaf[..., 2::2], f"{what} leaf value")
        self.i = first + n_trees * per_tree
        return idx1, idx2, thresh, values.reshape(n_trees, n_leaves, parts, 2)

    def _expect(self, idx: np.ndarray, value: int, what: str) -> None:
        bad = (self.value[idx] != value) | self.neg[idx] | self.huge[idx]
        if bad.any():
            tok = int(idx[np.argmax(bad)])
            raise self.error(f"{what} is {int(self.value[tok])}, expected {value}", tok)

    def per_cascade(self, what: str, n_cascades: int, read: Callable[[int], np.ndarray]) -> list[np.ndarray]:
        n = self.count(what, 1)
        if n != n_cascades:
            raise self.error(f"{what} has {n} entries for {n_cascades} cascades", self.i - 1)
        return [read(c) for c in range(n)]

    def anchor_list(self, c: int, parts: int) -> np.ndarray:
        what = f"cascade {c} anchor_idx"
        n = self.count(what, 1)
        self.need(n, what)
        idx = self.i + np.arange(n)
        self._check(idx, what, 8, False)
        out = self.value[idx].astype(np.intp)
        if n and out.max() >= parts:
            raise self.error(f"{what} names landmark {int(out.max())} of {parts}", int(idx[np.argmax(out)]))
        self.i += n
        return out

    def delta_list(self, c: int, n_pixels: int) -> np.ndarray:
        what = f"cascade {c} deltas"
        n = self.count(what, 4)
        if n != n_pixels:
            raise self.error(f"{what} has {n} entries for {n_pixels} anchors", self.i - 1)
        self.need(4 * n, what)
        out = self.floats(self.i + 2 * np.arange(2 * n), what).reshape(n, 2)
        self.i += 4 * n
        return out

    def end(self) -> None:
        at = self.byte(self.i)
        if at < self.nbytes:
            raise AgeGenderError(f"{self.name}: {self.nbytes - at} unexpected trailing bytes at byte {at}")
