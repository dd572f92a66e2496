"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a named state dict.

dlib serializes a network by recursion: each wrapper writes its version and then its subnetwork, and a
layer's own body (its details and a trailer of flags and cached tensors) only after the subnetwork has
returned. So a file holds the loss, then every wrapper's version from the output inwards, then the input
layer, then every layer body from the input outwards. Tag and skip wrappers have a version and no body.

Nothing here trusts the file: the architecture is laid out first, every version string, flag and shape is
checked against it, and every problem (truncation, corruption, another network) becomes one
:class:`AgeGenderError` line naming the file. Channel widths may differ from the released model's (tests use
tiny ones); the topology, kernel sizes, strides and paddings may not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..backbones.dlib_resnet import INPUT_SIZE, LEVEL_BLOCKS
from ..errors import AgeGenderError
from .dlib_serial import DlibStream

# A residual level's first block downsamples, except the first level's (LEVEL_BLOCKS: blocks per level).

# Versions each wrapper (add_layer) may have: the one over the input layer also carries the input layer.
_ADD_LAYER_VERSIONS = (1, 2)
_INPUT_ADD_LAYER_VERSIONS = (2, 3)


@dataclass(frozen=True)
class _Layer:
    """One node of dlib's network, as it appears in the file."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc, or the body-less tag / skip
    name: str  # for messages, and the canonical prefix of a con's, affine's or fc's parameters
    level: int = -1  # residual level (0-based) of a con; the stem has the first level's width
    kernel: int = 0  # con and pool window; 0 = the whole input (avg_pool_everything)
    stride: int = 1
    tag: int = 0  # tag / skip / add_prev: which tag they set or refer to

    @property
    def has_body(self) -> bool:
        return self.kind not in ("tag", "skip")


def _architecture() -> Iterator[_Layer]:
    """dlib_face_recognition_resnet_model_v1, input to output (examples/dnn_face_recognition_ex.cpp)."""
    yield _Layer("con", "conv1", level=0, kernel=7, stride=2)
    yield _Layer("affine", "conv1_affine")
    yield _Layer("relu", "conv1_relu")
    yield _Layer("max_pool", "max_pool", kernel=3, stride=2)
    for level, blocks in enumerate(LEVEL_BLOCKS):
        for b in range(blocks):
            down = level > 0 and b == 0
            name = f"level{level + 1}.{b}"
            yield _Layer("tag", f"{name}.tag1", tag=1)  # the block's input
            yield _Layer("con", f"{name}.conv1", level, kernel=3, stride=2 if down else 1)
            yield _Layer("affine", f"{name}.affine1")
            yield _Layer("relu", f"{name}.relu1")
            yield _Layer("con", f"{name}.conv2", level, kernel=3, stride=1)
            yield _Layer("affine", f"{name}.affine2")
            if down:  # keep the block's output as tag2, rewind to the input and pool it
                yield _Layer("tag", f"{name}.tag2", tag=2)
                yield _Layer("skip", f"{name}.skip1", tag=1)
                yield _Layer("avg_pool", f"{name}.pool", kernel=2, stride=2)
            yield _Layer("add_prev", f"{name}.add", tag=2 if down else 1)
            yield _Layer("relu", f"{name}.relu2")
    yield _Layer("avg_pool", "global_pool", kernel=0, stride=1)  # avg_pool_everything
    yield _Layer("fc", "fc")


ARCHITECTURE: tuple[_Layer, ...] = tuple(_architecture())


@dataclass(frozen=True)
class DlibResNetFile:
    """What a ``.dat`` file holds: weights with canonical names and the constants around them."""

    state: dict[str, np.ndarray]  # PyTorch layouts: conv (out, in, kh, kw), fc (out, in)
    widths: tuple[int, ...]  # channels of each residual level; the stem has widths[0]
    descriptor_dim: int
    input_mean_rgb: tuple[float, float, float]
    input_size: int
    loss_margin: float
    loss_distance_threshold: float
    layer_versions: tuple[str, ...]  # the distinct layer version strings, e.g. ("con_4", "affine_", ...)

    @property
    def parameter_count(self) -> int:
        return sum(int(v.size) for v in self.state.values())


class _Reader:
    """Reads the layer bodies in file order while tracking the shape flowing through the network."""

    def __init__(self, s: DlibStream) -> None:
        self.s = s
        self.state: dict[str, np.ndarray] = {}
        self.versions: set[str] = set()
        self.widths: list[int] = []
        self.channels = 3
        self.size = INPUT_SIZE
        self.tags: dict[int, tuple[int, int]] = {}  # channels and size where each tag was set

    def fail(self, layer: _Layer, what: str) -> AgeGenderError:
        return self.s.error(f"{layer.name}: {what}")

    def version(self, layer: _Layer, *allowed: str) -> str:
        start = self.s.pos
        v = self.s.read_str()
        if v not in allowed:
            self.s.pos = start
            raise self.fail(layer, f"layer version {v!r}, expected {' or '.join(map(repr, allowed))}")
        self.versions.add(v)
        return v

    def ints(self, n: int) -> tuple[int, ...]:
        return tuple(self.s.read_int() for _ in range(n))

    def alias(self) -> tuple[int, ...]:
        """A ``dlib::alias_tensor``: only a shape, naming a window of the layer's params."""
        self.s.expect_int(1, "alias_tensor version")
        return self.ints(4)

    def expect(self, layer: _Layer, what: str, got: object, want: object) -> None:
        if got != want:
            raise self.fail(layer, f"{what} is {got}, expected {want}")

    def layer(self, layer: _Layer) -> None:
        getattr(self, f"_{layer.kind}")(layer)

    def _con(self, layer: _Layer) -> None:
        version = self.version(layer, "con_4", "con_5", "con_6")
        params = self.s.tensor()
        filters, kh, kw, sy, sx, py, px = self.ints(7)
        pad = 0 if layer.stride != 1 else layer.kernel // 2  # dlib's default padding rule
        self.expect(
            layer,
            "kernel, stride, padding",
            (kh, kw, sy, sx, py, px),
            (layer.kernel, layer.kernel, layer.stride, layer.stride, pad, pad),
        )
        if layer.level >= len(self.widths):
            if filters <= 0:
                raise self.fail(layer, f"{filters} filters")
            self.widths.append(filters)
        self.expect(layer, "filter count", filters, self.widths[layer.level])
        weight_shape = self.alias()
        self.expect(layer, "filter shape", weight_shape, (filters, self.channels, kh, kw))
        bias_shape = self.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers: training only
            self.s.read_float()
        use_bias = self.s.read_bool() if version != "con_4" else True
        if version == "con_6" and self.s.read_bool():
            raise self.fail(layer, "has a fused relu, which this network does not")
        self.expect(layer, "bias shape", bias_shape, (1, filters, 1, 1) if use_bias else (0, 0, 0, 0))
        n_weight = filters * self.channels * kh * kw
        self.expect(layer, "parameter tensor shape", params.shape, (n_weight + filters * use_bias, 1, 1, 1))
        flat = params.reshape(-1)
        self.state[f"{layer.name}.weight"] = flat[:n_weight].reshape(weight_shape)
        self.state[f"{layer.name}.bias"] = flat[n_weight:] if use_bias else np.zeros(filters, np.float32)
        self.channels = filters
        self.size = (self.size + 2 * pad - layer.kernel) // layer.stride + 1

    def _affine(self, layer: _Layer) -> None:
        version = self.version(layer, "affine_", "affine_2")
        params = self.s.tensor()
        scale_shape, shift_shape = self.alias(), self.alias()
        mode = self.s.read_int()
        if version == "affine_2" and self.s.read_bool():
            raise self.fail(layer, "is disabled, which this network's layers are not")
        k = self.channels
        self.expect(layer, "mode", mode, 0)  # CONV_MODE: one scale and shift per channel
        self.expect(layer, "scale and shift shapes", (scale_shape, shift_shape), ((1, k, 1, 1),) * 2)
        self.expect(layer, "parameter tensor shape", params.shape, (2 * k, 1, 1, 1))
        self.state[f"{layer.name}.scale"] = params.reshape(-1)[:k]
        self.state[f"{layer.name}.shift"] = params.reshape(-1)[k:]

    def _relu(self, layer: _Layer) -> None:
        if self.version(layer, "relu_", "relu_2") == "relu_2" and self.s.read_bool():
            raise self.fail(layer, "is disabled, which this network's layers are not")

    def _max_pool(self, layer: _Layer) -> None:
        self._pool(layer, "max_pool_2")

    def _avg_pool(self, layer: _Layer) -> None:
        self._pool(layer, "avg_pool_2")

    def _pool(self, layer: _Layer, version: str) -> None:
        self.version(layer, version)
        self.expect(layer, "window, stride, padding", self.ints(6), (layer.kernel,) * 2 + (layer.stride,) * 2 + (0, 0))
        self.size = (self.size - (layer.kernel or self.size)) // layer.stride + 1

    def _tag(self, layer: _Layer) -> None:
        self.tags[layer.tag] = (self.channels, self.size)

    def _skip(self, layer: _Layer) -> None:
        self.channels, self.size = self.tags[layer.tag]

    def _add_prev(self, layer: _Layer) -> None:
        self.version(layer, "add_prev_")
        # dlib adds tensors of different shapes by zero-padding both up to the larger of each dimension.
        channels, size = self.tags[layer.tag]
        self.channels, self.size = max(self.channels, channels), max(self.size, size)

    def _fc(self, layer: _Layer) -> None:
        version = self.version(layer, "fc_2", "fc_3")
        outputs, inputs = self.ints(2)
        params = self.s.tensor()
        weight_shape, bias_shape = self.alias(), self.alias()
        bias_mode = self.s.read_int()
        for _ in range(4):
            self.s.read_float()
        if version == "fc_3":
            self.s.read_bool()  # use_bias; meaningless without a bias vector
        self.expect(layer, "bias mode", bias_mode, 1)  # FC_NO_BIAS
        self.expect(layer, "input count", inputs, self.channels * self.size * self.size)
        if outputs <= 0:
            raise self.fail(layer, f"{outputs} outputs")
        self.expect(layer, "weight and bias shapes", (weight_shape, bias_shape), ((inputs, outputs, 1, 1), (0, 0, 0, 0)))
        self.expect(layer, "parameter tensor shape", params.shape, (inputs, outputs, 1, 1))
        self.state["fc.weight"] = np.ascontiguousarray(params.reshape(inputs, outputs).T)  # dlib stores (in, out)
        self.channels = outputs


def _read_trailer(s: DlibStream, version: int, over_input: bool) -> None:
    """The add_layer fields after a layer's body: three flags and tensors cached for training."""
    for _ in range(3):  # setup called, gradient input stale, output and gradient disabled
        s.read_bool()
    s.tensor()  # x_grad
    s.tensor()  # cached_output
    if over_input or version >= 2:
        s.tensor()  # grad_final (over the input layer) or params_grad
    if over_input and version >= 3:
        s.read_int()  # sample expansion factor


def parse_dlib_resnet(data: bytes, name: str = "<bytes>") -> DlibResNetFile:
    """Parse the bytes of a dlib face-recognition ResNet; ``name`` is what error messages call them."""
    return _parse(DlibStream(data, name))


def load_dlib_resnet(path: str | os.PathLike[str]) -> DlibResNetFile:
    """Read ``dlib_face_recognition_resnet_model_v1.dat`` (2017 or newer dlib) with its metadata."""
    return _parse(DlibStream.open(path))


def read_dlib_resnet(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The canonical state dict of a dlib face-recognition ResNet file (see :class:`DlibResNetFile`)."""
    return load_dlib_resnet(path).state


def _parse(s: DlibStream) -> DlibResNetFile:
    s.expect_int(1, "add_loss_layer version")
    loss = s.expect_str("loss_metric_2", "loss_metric_")
    margin, threshold = (s.read_float(), s.read_float()) if loss == "loss_metric_2" else (0.1, 0.75)

    wrapper_versions: list[int] = []
    for i, layer in enumerate(reversed(ARCHITECTURE)):
        over_input = i == len(ARCHITECTURE) - 1
        allowed = (1,) if not layer.has_body else _INPUT_ADD_LAYER_VERSIONS if over_input else _ADD_LAYER_VERSIONS
        start = s.pos
        v = s.read_int()
        if v not in allowed:
            s.pos = start
            wrapper = "add_layer" if layer.has_body else f"add_{layer.kind}_layer"
            raise s.error(
                f"{layer.name}: {wrapper} version {v}, expected {' or '.join(map(str, allowed))} "
                "(not dlib's face-recognition ResNet?)"
            )
        wrapper_versions.append(v)

    s.expect_str("input_rgb_image_sized")
    mean = (s.read_float(), s.read_float(), s.read_float())
    s.expect_int(INPUT_SIZE, "input rows")
    s.expect_int(INPUT_SIZE, "input columns")

    reader = _Reader(s)
    for layer, version in zip(ARCHITECTURE, reversed(wrapper_versions), strict=True):
        reader.layer(layer)
        if layer.has_body:
            _read_trailer(s, version, over_input=layer is ARCHITECTURE[0])
    s.end()
    # A NaN or Inf weight would convert and load, and surface only after training, blamed on a metric.
    for key, value in reader.state.items():
        if not np.isfinite(value).all():
            raise AgeGenderError(
                f"{s.name}: {key} holds {int((~np.isfinite(value)).sum())} non-finite values (NaN or Inf): corrupt weights"
            )
    if not all(np.isfinite(mean)):
        raise AgeGenderError(f"{s.name}: the input mean {mean} is not finite: corrupt file")
    return DlibResNetFile(
        state=reader.state,
        widths=tuple(reader.widths),
        descriptor_dim=reader.channels,
        input_mean_rgb=mean,
        input_size=INPUT_SIZE,
        loss_margin=margin,
        loss_distance_threshold=threshold,
        layer_versions=tuple(sorted(reader.versions)),
    )
