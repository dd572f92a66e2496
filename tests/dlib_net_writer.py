"""Test-only: write small dlib face-recognition ResNet ``.dat`` files in the real layout.

Written independently of the reader: the network is assembled from the same template aliases as dlib's
example (residual, residual_down, block, ares, ...) and serialized by recursion, each wrapper writing its
version, then its subnetwork, then its own body and trailer, as dlib does. Channel widths and the descriptor
size are free, so fixtures stay a few kilobytes; dlib itself loads them too (it takes filter counts from
the file), which the tests use to check this writer against dlib.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

TINY_WIDTHS = (2, 3, 4, 5, 5)
MEAN_RGB = (122.782, 117.001, 104.298)

# Version strings by writer style: the 2017 release file and what current dlib writes.
STYLES = {
    "2017": {"con": "con_4", "affine": "affine_", "relu": "relu_", "fc": "fc_2", "input_add_layer": 2},
    "new": {"con": "con_6", "affine": "affine_2", "relu": "relu_2", "fc": "fc_3", "input_add_layer": 3},
}


def dlib_int(v: int) -> bytes:
    """Control byte (0x80 = negative, low bits = length) then the magnitude, little-endian, >= 1 byte."""
    mag = abs(v)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def dlib_float(v: float) -> bytes:
    """float_details: an integer mantissa and exponent, trailing zero bytes of the mantissa dropped."""
    if math.isinf(v):
        return dlib_int(0) + dlib_int(32000 if v > 0 else 32001)
    if math.isnan(v):
        return dlib_int(0) + dlib_int(32002)
    frac, exp = math.frexp(v)
    mantissa, exponent = int(frac * (1 << 53)), exp - 53
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return dlib_int(mantissa) + dlib_int(exponent)


def dlib_str(s: str) -> bytes:
    return dlib_int(len(s)) + s.encode("ascii")


def dlib_bool(b: bool) -> bytes:
    return b"1" if b else b"0"


def dlib_tensor(a: np.ndarray) -> bytes:
    shape = tuple(a.shape) + (1,) * (4 - a.ndim)
    return dlib_int(2) + b"".join(dlib_int(d) for d in shape) + np.ascontiguousarray(a, "<f4").tobytes()


EMPTY = np.zeros((0, 0, 0, 0), np.float32)


def dlib_alias(shape: tuple[int, ...]) -> bytes:
    return dlib_int(1) + b"".join(dlib_int(d) for d in shape)


@dataclass
class Net:
    """Layers from input to output, as (kind, body bytes); tags and skips have no body."""

    style: dict
    rng: np.random.Generator
    layers: list[tuple[str, bytes]] = field(default_factory=list)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    channels: int = 3

    def add(self, kind: str, body: bytes = b"") -> None:
        self.layers.append((kind, body))

    def con(self, name: str, filters: int, k: int, stride: int) -> None:
        pad = 0 if stride != 1 else k // 2
        w = self.rng.normal(0, (2 / (self.channels * k * k)) ** 0.5, (filters, self.channels, k, k)).astype(np.float32)
        b = self.rng.normal(0, 0.1, filters).astype(np.float32)
        self.state[f"{name}.weight"], self.state[f"{name}.bias"] = w, b
        version = self.style["con"]
        body = dlib_str(version) + dlib_tensor(np.concatenate([w.ravel(), b])[:, None, None, None])
        body += b"".join(dlib_int(v) for v in (filters, k, k, stride, stride, pad, pad))
        body += dlib_alias(w.shape) + dlib_alias((1, filters, 1, 1))
        body += b"".join(dlib_float(m) for m in (1.0, 1.0, 1.0, 0.0))
        if version != "con_4":
            body += dlib_bool(True)  # use_bias
        if version == "con_6":
            body += dlib_bool(False)  # use_relu
        self.add("con", body)
        self.channels = filters

    def affine(self, name: str) -> None:
        k = self.channels
        scale = self.rng.uniform(0.5, 1.5, k).astype(np.float32)
        shift = self.rng.normal(0, 0.1, k).astype(np.float32)
        self.state[f"{name}.scale"], self.state[f"{name}.shift"] = scale, shift
        version = self.style["affine"]
        body = dlib_str(version) + dlib_tensor(np.concatenate([scale, shift])[:, None, None, None])
        body += dlib_alias((1, k, 1, 1)) * 2 + dlib_int(0)  # CONV_MODE
        if version == "affine_2":
            body += dlib_bool(False)  # disabled
        self.add("affine", body)

    def relu(self) -> None:
        version = self.style["relu"]
        self.add("relu", dlib_str(version) + (dlib_bool(False) if version == "relu_2" else b""))

    def pool(self, version: str, k: int, stride: int) -> None:
        self.add("pool", dlib_str(version) + b"".join(dlib_int(v) for v in (k, k, stride, stride, 0, 0)))

    def fc(self, outputs: int) -> None:
        inputs = self.channels
        w = self.rng.normal(0, inputs**-0.5, (inputs, outputs)).astype(np.float32)  # dlib's (in, out)
        self.state["fc.weight"] = np.ascontiguousarray(w.T)
        version = self.style["fc"]
        body = dlib_str(version) + dlib_int(outputs) + dlib_int(inputs) + dlib_tensor(w[:, :, None, None])
        body += dlib_alias((inputs, outputs, 1, 1)) + dlib_alias((0, 0, 0, 0)) + dlib_int(1)  # FC_NO_BIAS
        body += b"".join(dlib_float(m) for m in (1.0, 1.0, 1.0, 0.0))
        if version == "fc_3":
            body += dlib_bool(True)
        self.add("fc", body)


def _block(net: Net, name: str, width: int, stride: int) -> None:
    net.con(f"{name}.conv1", width, 3, stride)
    net.affine(f"{name}.affine1")
    net.relu()
    net.con(f"{name}.conv2", width, 3, 1)
    net.affine(f"{name}.affine2")


def _ares(net: Net, name: str, width: int) -> None:
    input_channels = net.channels
    net.add("tag")
    _block(net, name, width, 1)
    net.add("add_prev", dlib_str("add_prev_"))
    net.relu()
    net.channels = max(net.channels, input_channels)


def _ares_down(net: Net, name: str, width: int) -> None:
    input_channels = net.channels
    net.add("tag")
    _block(net, name, width, 2)
    net.add("tag")
    net.add("skip")
    net.pool("avg_pool_2", 2, 2)
    net.add("add_prev", dlib_str("add_prev_"))
    net.relu()
    net.channels = max(net.channels, input_channels)


def build_net(
    widths: tuple[int, ...] = TINY_WIDTHS,
    descriptor_dim: int = 4,
    style: str = "2017",
    seed: int = 0,
    net_type: Callable[..., Net] = Net,
) -> Net:
    """The face-recognition ResNet at any widths; ``net_type`` lets a test write some layer wrong."""
    net = net_type(STYLES[style], np.random.default_rng(seed))
    net.con("conv1", widths[0], 7, 2)
    net.affine("conv1_affine")
    net.relu()
    net.pool("max_pool_2", 3, 2)
    for level, blocks in enumerate((3, 4, 3, 3, 1)):
        for b in range(blocks):
            (_ares_down if level and b == 0 else _ares)(net, f"level{level + 1}.{b}", widths[level])
    net.pool("avg_pool_2", 0, 1)
    net.fc(descriptor_dim)
    return net


def _trailer(over_input: bool, version: int) -> bytes:
    out = dlib_bool(True) + dlib_bool(True) + dlib_bool(False) + dlib_tensor(EMPTY) * 2
    if over_input:
        out += dlib_tensor(EMPTY)  # grad_final
        if version >= 3:
            out += dlib_int(1)  # sample expansion factor
    else:
        out += dlib_tensor(EMPTY)  # params_grad
    return out


def serialize(net: Net) -> bytes:
    """add_loss_layer<loss_metric_2, net>: the wrappers recurse from the output inwards."""
    input_layer = dlib_str("input_rgb_image_sized") + b"".join(dlib_float(m) for m in MEAN_RGB)
    input_layer += dlib_int(150) + dlib_int(150)

    def wrapped(i: int) -> bytes:  # layers[i] wrapped around everything below it
        kind, body = net.layers[i]
        if kind in ("tag", "skip"):
            return dlib_int(1) + wrapped(i - 1)
        if i == 0:
            version = net.style["input_add_layer"]
            return dlib_int(version) + input_layer + body + _trailer(True, version)
        return dlib_int(2) + wrapped(i - 1) + body + _trailer(False, 2)

    loss = dlib_int(1) + dlib_str("loss_metric_2") + dlib_float(0.04) + dlib_float(0.6)
    return loss + wrapped(len(net.layers) - 1)


def write_dlib_resnet(
    widths: tuple[int, ...] = TINY_WIDTHS, descriptor_dim: int = 4, style: str = "2017", seed: int = 0
) -> tuple[bytes, dict[str, np.ndarray]]:
    """A complete ``.dat`` file's bytes and the canonical state dict it should read back as."""
    net = build_net(widths, descriptor_dim, style, seed)
    return serialize(net), net.state
