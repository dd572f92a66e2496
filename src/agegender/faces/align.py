"""Five-point face landmarks and aligned face chips, reproducing dlib's ``shape_predictor`` and
``get_face_chip`` in NumPy, so alignment needs no dlib at run time.

Coordinates are dlib's: a point ``(x, y)`` has integer values at pixel centres, so pixel ``img[r, c]`` sits at
``(c, r)``.

Box convention (``dlib.rectangle``): ``box = (left, top, right, bottom)`` where ``right`` and ``bottom`` are
INCLUSIVE pixel indices: the box covers columns ``left..right`` and rows ``top..bottom``, so its width in dlib's
terms is ``right - left + 1``. The predictor maps the box's unit square onto pixel centres, ``(0, 0)`` to
``(left, top)`` and ``(1, 1)`` to ``(right, bottom)``. A detector box given as ``x, y, w, h`` (covering pixels
``x .. x+w-1``) is therefore ``(x, y, x + w - 1, y + h - 1)``. dlib boxes are integers; floats are accepted and
used as they are (use integers for exact parity with dlib).

The five landmarks of dlib's model, in order: 0, 1 = outer and inner corner of the eye on the image's right
(the subject's left eye), 2, 3 = outer and inner corner of the other eye, 4 = base of the nose.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..images import as_rgb
from ..weights.dlib_shape import ShapePredictorModel, read_shape_predictor

MODEL_FILE = "shape_predictor_5_face_landmarks.dat"

# dlib's 5-point chip template (unit chip coordinates, landmark order as above); data, needed for parity.
FACE_CHIP_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
FACE_CHIP_TEMPLATE.flags.writeable = False

Rect = Sequence[float]  # a dlib rectangle: left, top, right, bottom (inclusive); see the module doc


def find_shape_predictor_model() -> Path:
    """dlib's 5-point model, bundled with this package (sha256-checked on first use)."""
    from ..weights.locate import find
    from ..weights.zoo import SHAPE_PREDICTOR_5

    return find(SHAPE_PREDICTOR_5)


def load_shape_predictor(path: str | os.PathLike[str] | None = None) -> ShapePredictor:
    """A predictor from ``path``, or from the bundled model when None."""
    if path is None:
        path = find_shape_predictor_model()
    return ShapePredictor(read_shape_predictor(path))


# --------------------------------------------------------------------------------------------- landmarks


@dataclass(frozen=True, eq=False)
class _Level:
    """One cascade, flattened so that all its splits are evaluated at once."""

    idx1: np.ndarray  # (T*S,) feature pixel indices
    idx2: np.ndarray
    thresh: np.ndarray  # (T*S,) float32
    leaves: np.ndarray  # (T*L, 2*parts) float32
    leaf_base: np.ndarray  # (T,) first leaf row of each tree
    n_trees: int
    n_splits: int
    leaf_of: np.ndarray | None  # split outcomes packed little-endian -> leaf; None if trees are too deep
    anchor: np.ndarray  # (P,)
    delta: np.ndarray  # (2, P) float32: dx row, dy row


_MAX_TABLE_SPLITS = 15  # depth-4 trees (dlib's default): a 32 KiB table; deeper trees walk level by level
_POWERS_OF_TWO = 2.0 ** np.arange(_MAX_TABLE_SPLITS, dtype=np.float32)


def _leaf_table(n_splits: int) -> np.ndarray:
    """For every combination of split outcomes (bit s set = split s goes left), the leaf a tree walk reaches.

    Evaluating every split and looking the leaf up replaces a per-depth gather loop; a tree only visits
    depth-many splits, but computing all of them is cheaper than the dependent steps."""
    codes = np.arange(1 << n_splits)
    node = np.zeros_like(codes)
    while True:
        walking = node < n_splits
        if not walking.any():
            return (node - n_splits).astype(np.uint8 if n_splits < 256 else np.intp)
        left = (codes >> np.minimum(node, n_splits - 1)) & 1
        node = np.where(walking, 2 * node + 2 - left, node)


class ShapePredictor:
    """dlib's ``shape_predictor`` (ensemble of regression trees) over NumPy; see the module doc for conventions."""

    def __init__(self, model: ShapePredictorModel) -> None:
        self.model = model
        mean = model.initial_shape.astype(np.float64)
        centred = mean - mean.mean(axis=0)
        self._mean_centred = centred.tolist()
        self._mean_var = float((centred * centred).sum() / len(mean))
        tables: dict[int, np.ndarray] = {}
        self._levels = []
        for c in model.cascades:
            n_trees, n_splits = c.split_idx1.shape
            if n_splits <= _MAX_TABLE_SPLITS and n_splits not in tables:
                tables[n_splits] = _leaf_table(n_splits)
            n_leaves = n_splits + 1
            self._levels.append(
                _Level(
                    c.split_idx1.reshape(-1),
                    c.split_idx2.reshape(-1),
                    c.thresholds.reshape(-1),
                    c.leaf_values.reshape(n_trees * n_leaves, 2 * model.num_parts),
                    np.arange(n_trees) * n_leaves,
                    n_trees,
                    n_splits,
                    tables.get(n_splits),
                    c.anchor_idx,
                    np.ascontiguousarray(c.deltas.T),
                )
            )

    @property
    def num_parts(self) -> int:
        return self.model.num_parts

    def predict(self, image: np.ndarray, box: Rect, *, subpixel: bool = False) -> np.ndarray:
        """Landmarks ``(parts, 2)`` (x, y) for the face in ``box`` (dlib rectangle convention, see module doc).

        ``image`` is uint8 RGB ``(H, W, 3)`` or grey ``(H, W)``. Like dlib, points are rounded to whole pixels;
        ``subpixel=True`` returns the unrounded positions instead.
        """
        image = as_rgb(image, keep_gray=True)
        left, top, right, bottom = _as_rect(box)
        height, width = image.shape[:2]
        pixels = image.reshape(height * width, -1)  # a view for contiguous images
        # The unit-box -> image map; dlib builds it by a 3-point fit, which is exactly this scale and offset.
        scale = np.array([[right - left], [bottom - top]])
        origin = np.array([[left], [top]])
        shape = self.model.initial_shape.reshape(-1).copy()  # float32 x0 y0 x1 y1 ..., unit-box coordinates
        for lv in self._levels:
            m = self._tform_from_mean(shape)
            anchored = shape.reshape(-1, 2).T[:, lv.anchor]
            # Feature pixels ride on their anchor landmark: float32 arithmetic, in dlib's order.
            xy = m[:, :1] * lv.delta[0] + m[:, 1:] * lv.delta[1] + anchored
            # Round like dlib (floor(v + 0.5)); the clip only keeps a runaway shape from a broken model castable.
            pix = np.floor(np.clip(xy * scale + origin, -2.0, 2.0**40) + 0.5).astype(np.intp)
            wrapped = pix.view(np.uintp)  # negatives wrap around to huge
            inside = (wrapped[0] < width) & (wrapped[1] < height)
            found = pixels[np.where(inside, pix[1] * width + pix[0], 0)]
            grey = found[:, 0] if found.shape[1] == 1 else found.sum(axis=1, dtype=np.uint16) // 3
            values = np.where(inside, grey, 0).astype(np.float32)  # dlib reads 0 outside the image

            goes_left = values[lv.idx1] - values[lv.idx2] > lv.thresh
            leaf = self._leaves(lv, goes_left)
            updates = np.empty((lv.n_trees + 1, shape.size), np.float32)
            updates[0] = shape
            np.take(lv.leaves, lv.leaf_base + leaf, axis=0, out=updates[1:])
            # dlib adds the trees' updates one after another in float32. NumPy sums along a non-contiguous
            # axis row by row (pairwise summation is only used along the contiguous one): the same order.
            shape = np.add.reduce(updates, axis=0)
        points = shape.reshape(-1, 2).astype(np.float64) * scale.T + origin.T
        return points if subpixel else np.floor(points + 0.5)

    @staticmethod
    def _leaves(lv: _Level, goes_left: np.ndarray) -> np.ndarray:
        bits = goes_left.reshape(lv.n_trees, lv.n_splits)
        if lv.n_splits == 0:
            return np.zeros(lv.n_trees, np.intp)
        if lv.leaf_of is not None:
            # Pack each tree's outcomes into an integer: a float32 mat-vec is exact here (sums < 2**24) and
            # several times faster than np.packbits or an integer dot.
            code = bits.astype(np.float32) @ _POWERS_OF_TWO[: lv.n_splits]
            return lv.leaf_of[code.astype(np.intp)]
        node = np.zeros(lv.n_trees, np.intp)
        rows = np.arange(lv.n_trees)
        while node[0] < lv.n_splits:  # complete trees: every walk has the same length
            node = 2 * node + 2 - bits[rows, node]
        return node - lv.n_splits

    def _tform_from_mean(self, shape: np.ndarray) -> np.ndarray:
        """Linear part (float32, 2x2) of the least-squares similarity from the mean shape to ``shape``, as dlib
        finds it (Umeyama). Five points: plain floats beat NumPy's per-call overhead here."""
        xs, ys = shape[0::2].tolist(), shape[1::2].tolist()
        n = len(xs)
        if n == 1:
            return np.eye(2, dtype=np.float32)
        mx, my = sum(xs) / n, sum(ys) / n
        c00 = c01 = c10 = c11 = 0.0
        for (sx, sy), x, y in zip(self._mean_centred, xs, ys):
            dx, dy = x - mx, y - my
            c00 += dx * sx
            c01 += dx * sy
            c10 += dy * sx
            c11 += dy * sy
        if self._mean_var == 0:
            return np.eye(2, dtype=np.float32)
        a = (c00 + c11) / n / self._mean_var
        b = (c10 - c01) / n / self._mean_var
        return np.array([[a, -b], [b, a]], np.float32)


# --------------------------------------------------------------------------------------------- transforms


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation; no reflection) that maps ``src`` points onto
    ``dst`` with least squared error (Umeyama 1991). Apply it as ``pts @ M[:, :2].T + M[:, 2]``."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(src) != len(dst) or len(src) < 2:
        raise InputError(f"similarity_transform needs two matching sets of >= 2 points, got {len(src)}, {len(dst)}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c = src - src_mean
    linear = _similarity_linear(src_c, dst - dst_mean, float((src_c**2).sum() / len(src)))
    return np.hstack([linear, (dst_mean - linear @ src_mean)[:, None]])


def _similarity_linear(src_c: np.ndarray, dst_c: np.ndarray, src_var: float) -> np.ndarray:
    # In 2-D the best rotation-and-scale is [[a, -b], [b, a]] in closed form; it equals Umeyama's c*R (the SVD
    # and its reflection fix-up pick the same matrix), without an SVD per call.
    if src_var == 0:  # all source points coincide: dlib falls back to no rotation or scaling
        return np.eye(2)
    cov = dst_c.T @ src_c / len(src_c)  # cov[i, j] = mean(dst_i * src_j)
    a = (cov[0, 0] + cov[1, 1]) / src_var
    b = (cov[1, 0] - cov[0, 1]) / src_var
    return np.array([[a, -b], [b, a]])


@dataclass(frozen=True)
class _Chip:
    """dlib's chip_details: a (possibly fractional) rectangle in the image, rotated by ``angle`` about its centre,
    sampled onto ``size`` x ``size`` pixels whose corner pixel centres land on the rectangle's corners."""

    left: float
    top: float
    right: float
    bottom: float
    angle: float
    size: int

    def to_image(self) -> np.ndarray:
        """2x3 chip -> image affine map."""
        k = (self.right - self.left) / (self.size - 1)
        cos, sin = math.cos(self.angle) * k, math.sin(self.angle) * k
        centre = np.array([self.left + self.right, self.top + self.bottom]) / 2
        linear = np.array([[cos, -sin], [sin, cos]])
        return np.hstack([linear, (centre - linear @ np.full(2, (self.size - 1) / 2))[:, None]])


def _face_chip_details(landmarks: np.ndarray, size: int, padding: float) -> _Chip:
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise InputError(f"face chips need the 5 landmarks of the 5-point model, got shape {landmarks.shape}")
    if size < 2 or padding < 0:
        raise InputError(f"face chip size must be >= 2 and padding >= 0, got {size}, {padding}")
    padding = float(np.float32(padding))  # dlib's Python binding takes padding as a C float
    template = (padding + FACE_CHIP_TEMPLATE) / (2 * padding + 1) * size
    to_image = similarity_transform(template, landmarks)
    px, py = to_image[0, 0], to_image[1, 0]
    scale = math.sqrt(px * px + py * py)
    centre = to_image[:, :2] @ np.full(2, size / 2.0) + to_image[:, 2]
    # The chip is a size*scale box centred there; as a dlib rectangle that spans size*scale - 1 between
    # its corner pixel centres, so the chip's own scale is (size*scale - 1)/(size - 1), not scale.
    half = (size * scale - 1) / 2
    return _Chip(centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half, math.atan2(py, px), size)


def chip_transform(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The 2x3 image -> chip similarity that :func:`face_chip` applies for these 5 landmarks (dlib's
    ``get_face_chip_details``); map points with ``pts @ M[:, :2].T + M[:, 2]``."""
    return _invert_affine(_face_chip_details(landmarks, size, padding).to_image())


def face_chip(image: np.ndarray, landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The aligned face as a uint8 ``(size, size, 3)`` (or ``(size, size)`` for grey) array, equivalent to
    ``dlib.get_face_chip(image, shape, size, padding)`` for the 5-point model's landmarks."""
    return _extract(as_rgb(image, keep_gray=True), _face_chip_details(landmarks, size, padding))


def warp_chip(image: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """Sample a ``size`` x ``size`` chip through a 2x3 image -> chip similarity (e.g. one built with
    :func:`similarity_transform` from other landmarks to a template), the way dlib extracts chips: bilinear,
    black outside the image, and from a blurred image pyramid when the chip shrinks the face more than 2x."""
    transform = np.asarray(transform, np.float64)
    if transform.shape != (2, 3) or size < 2:
        raise InputError(f"warp_chip needs a 2x3 transform and size >= 2, got {transform.shape}, {size}")
    to_image = _invert_affine(transform)
    (a, b), (c, d) = to_image[:, :2]
    k = math.sqrt(a * a + c * c)
    if not k or abs(a - d) > 1e-6 * k or abs(b + c) > 1e-6 * k:
        raise InputError("warp_chip needs a similarity transform (rotation, uniform scale, shift), without shear or reflection")
    centre = to_image[:, :2] @ np.full(2, (size - 1) / 2) + to_image[:, 2]
    half = (size - 1) * k / 2
    chip = _Chip(centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half, math.atan2(c, a), size)
    return _extract(as_rgb(image, keep_gray=True), chip)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    try:
        linear = np.linalg.inv(m[:, :2])
    except np.linalg.LinAlgError:
        raise InputError("transform is singular") from None
    return np.hstack([linear, (-linear @ m[:, 2])[:, None]])


# --------------------------------------------------------------------------------------------- chip sampling

_Rect = tuple[float, float, float, float]  # dlib drectangle: left, top, right, bottom (inclusive)


def _area(r: _Rect) -> float:
    left, top, right, bottom = r
    return 0.0 if top > bottom or left > right else (right - left + 1) * (bottom - top + 1)


def _rect_down(r: _Rect) -> _Rect:
    # dlib's pyramid_down<2> coordinate map, p/2 - (1.25, 0.75), applied to both corners.
    left, top, right, bottom = r
    x0, y0, x1, y1 = left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _lround(x: float) -> int:
    """C's lround: halves away from zero (Python's round() would go to even)."""
    whole = math.trunc(x)
    return whole + (int(math.copysign(1, x)) if abs(x - whole) >= 0.5 else 0)


def _rotated_corners(r: _Rect, angle: float) -> np.ndarray:
    """tl, tr, bl, br of ``r`` rotated about its centre (dlib's rotate_point)."""
    left, top, right, bottom = r
    cx, cy = (left + right) / 2, (top + bottom) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    out = []
    for x, y in ((left, top), (right, top), (left, bottom), (right, bottom)):
        dx, dy = x - cx, y - cy
        out.append((cos * dx - sin * dy + cx, sin * dx + cos * dy + cy))
    return np.array(out)


def _extract(image: np.ndarray, chip: _Chip) -> np.ndarray:
    """dlib's extract_image_chip for one chip, step for step (the order decides which pyramid level is used)."""
    size = chip.size
    rect = (chip.left, chip.top, chip.right, chip.bottom)
    if chip.angle == 0 and chip.bottom - chip.top + 1 == size and chip.right - chip.left + 1 == size:
        return _copy_rect(image, rect)
    target = size * size

    # Bilinear sampling degrades into nearest-neighbour when shrinking a lot, so dlib samples from an image
    # pyramid (5x5 Gaussian, drop every other pixel), halving until one more halving would leave the face
    # rectangle smaller than the chip. It crops first, with a margin that grows with the number of halvings.
    grow, down = 2.0, _rect_down(rect)
    while _area(down) > target:
        down = _rect_down(down)
        grow = grow * 2 + 2
    corners = _rotated_corners(rect, chip.angle)
    height, width = image.shape[:2]
    near = (
        max(corners[:, 0].min() - grow, 0.0),
        max(corners[:, 1].min() - grow, 0.0),
        min(corners[:, 0].max() + grow, width - 1.0),
        min(corners[:, 1].max() + grow, height - 1.0),
    )
    crop_l, crop_t, crop_r, crop_b = (_lround(v) for v in near)
    if crop_t > crop_b or crop_l > crop_r:  # the face is entirely off the image
        crop_l, crop_t, crop_r, crop_b = 0, 0, -1, -1
    source = image[crop_t : crop_b + 1, crop_l : crop_r + 1]

    level_rect = (rect[0] - crop_l, rect[1] - crop_t, rect[2] - crop_l, rect[3] - crop_t)
    level = -1
    while _area(_rect_down(level_rect)) > target:
        level += 1
        level_rect = _rect_down(level_rect)
    for _ in range(level + 1):
        source = _pyramid_down(source)

    # The chip's corner pixels land on the level rectangle's rotated corners.
    tl, tr, bl = _rotated_corners(level_rect, chip.angle)[:3]
    ax, ay = (tr - tl) / (size - 1), (bl - tl) / (size - 1)
    c = np.arange(size, dtype=np.float64)
    x = ax[0] * c[None, :] + ay[0] * c[:, None] + tl[0]
    y = ax[1] * c[None, :] + ay[1] * c[:, None] + tl[1]
    return _bilinear(source, x, y)


def _bilinear(source: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's interpolate_bilinear: needs all four neighbours inside (else black), and truncates the result."""
    height, width = source.shape[:2]
    if not source.size:
        return np.zeros(x.shape + source.shape[2:], np.uint8)
    left, top = np.floor(x), np.floor(y)
    inside = (left >= 0) & (top >= 0) & (left + 1 < width) & (top + 1 < height)
    c0 = np.where(inside, left, 0).astype(np.intp)
    r0 = np.where(inside, top, 0).astype(np.intp)
    fx, fy = x - left, y - top
    if source.ndim == 3:
        fx, fy, inside = fx[..., None], fy[..., None], inside[..., None]
    # Gather first, convert after: the source may be a whole photo.
    tl, tr = source[r0, c0].astype(np.float64), source[r0, c0 + 1].astype(np.float64)
    bl, br = source[r0 + 1, c0].astype(np.float64), source[r0 + 1, c0 + 1].astype(np.float64)
    value = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    return np.where(inside, value, 0).astype(np.uint8)


_BINOMIAL_5 = np.array([1, 4, 6, 4, 1], np.float32)


def _pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2>: the separable [1 4 6 4 1]^2 filter, keeping the pixels centred at (2r+2, 2c+2),
    divided by 256 and truncated.

    dlib sums in integers; OpenCV's float filter gives the same sums exactly (all below 2**24) and is several
    times faster than NumPy slicing on big crops. Only interior pixels are kept, so its border mode is moot."""
    import cv2  # a project dependency, but slow to import and only needed for large faces

    height, width = image.shape[:2]
    if height <= 8 or width <= 8:
        return image[:0, :0]
    rows, cols = (height - 3) // 2, (width - 3) // 2
    sums = cv2.sepFilter2D(image, cv2.CV_32F, _BINOMIAL_5, _BINOMIAL_5, borderType=cv2.BORDER_REPLICATE)
    return (sums[2 : 2 * rows + 2 : 2, 2 : 2 * cols + 2 : 2] * np.float32(1 / 256)).astype(np.uint8)


def _copy_rect(image: np.ndarray, rect: _Rect) -> np.ndarray:
    """dlib's unscaled chip: a plain copy of the rounded rectangle (whose size may then differ from the chip's
    by a pixel, as in dlib), black where it leaves the image."""
    left, top, right, bottom = (_lround(v) for v in rect)
    out = np.zeros((bottom - top + 1, right - left + 1) + image.shape[2:], np.uint8)
    height, width = image.shape[:2]
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(bottom + 1, height), min(right + 1, width)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = image[r0:r1, c0:c1]
    return out


# --------------------------------------------------------------------------------------------- input checks


def _as_rect(rect: Rect) -> tuple[float, float, float, float]:
    values = np.asarray(rect, np.float64).reshape(-1)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise InputError(f"box must be four finite numbers (left, top, right, bottom), got {rect!r}")
    left, top, right, bottom = (float(v) for v in values)
    return left, top, right, bottom
