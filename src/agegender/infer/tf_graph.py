"""The TensorFlow twin of ``InferenceModel``: plain TF ops over non-trainable variables, for the SavedModel export.

Not Keras: the .keras export builds on Keras's torch backend (so it never needs TensorFlow), that backend
cannot write a SavedModel (it would need torch_xla), and a process keeps the Keras backend it first imported.
Plain TF ops run in this process whatever Keras is doing, and TF Serving needs nothing but the graph.

Layout is channels-last throughout, as TensorFlow's CPU convolutions want; VGG's maps go back to C, H, W
before flattening so the fc weights keep PyTorch's feature order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from ..backbones import backbone
from ..model.age_head import AGE_INTERVAL
from ..model.dlib_resnet import DlibTrunk
from ..model.net import AgeGenderNet
from ..model.vgg import VGGTrunk
from .graph_weights import (
    age_values,
    bn_arrays,
    conv_arrays,
    conv_geometry,
    dense_arrays,
    dlib_blocks,
    np32,
    regression_affine,
)

Tensor = Any  # tf.Tensor; TensorFlow is imported only by the functions that need it
Layer = Callable[[Tensor], Tensor]

# The DEX age interval served beside the mean: the 10th and 90th percentiles of the age distribution.
AGE_QUANTILES = dict(zip(("age_low", "age_high"), AGE_INTERVAL))  # the interval decode() gives


class Variables:
    """Creates the graph's weights as non-trainable ``tf.Variable`` s and keeps them by name, for saving."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf
        self.by_name: dict[str, Any] = {}

    def __call__(self, name: str, array: np.ndarray) -> Any:
        if name in self.by_name:
            raise ValueError(f"variable {name} defined twice")
        self.by_name[name] = self.tf.Variable(array, trainable=False, name=name)
        return self.by_name[name]


def inference_graph(tf: Any, net: AgeGenderNet) -> tuple[Callable[[Tensor], dict[str, Tensor]], dict[str, Any]]:
    """``(forward, variables)``: forward maps normalised float32 NHWC input to the outputs ``InferenceModel``
    gives (``p_male``, ``age``, ``age_probs``, as the head has them), plus ``age_low`` and ``age_high`` for DEX."""
    var = Variables(tf)
    # the backbone's own TensorFlow trunk (BackboneSpec.graphs["savedmodel"]): vgg_trunk or dlib_trunk below
    trunk: Layer = backbone(net.config.backbone).graph("savedmodel")(tf, net.trunk, var)
    head = _head(tf, net, var)
    return (lambda x: head(trunk(x))), var.by_name


def age_percentile(tf: Any, probs: Tensor, q: float, age_min: int) -> Tensor:
    """The smallest age whose cumulative probability reaches ``q``, in years (float32)."""
    # cumsum is non-decreasing, so the ages before the first to reach q are exactly those below it.
    below = tf.reduce_sum(tf.cast(tf.math.cumsum(probs, axis=-1) < q, tf.int32), axis=-1)
    return tf.cast(tf.minimum(below, probs.shape[-1] - 1) + age_min, tf.float32)


def age_percentile_numpy(probs: np.ndarray, q: float, age_min: int) -> np.ndarray:
    """:func:`age_percentile` in numpy, on float64 sums: the reference the export is checked against."""
    below = (np.cumsum(probs.astype(np.float64), axis=-1) < q).sum(-1)
    return (np.minimum(below, probs.shape[-1] - 1) + age_min).astype(np.float32)


# -- layers -------------------------------------------------------------------------------------


def _conv(tf: Any, var: Variables, name: str, conv: nn.Conv2d, affine: nn.Module | None = None) -> Layer:
    kernel_array, bias_array = conv_arrays(conv, affine)
    kernel, bias = var(f"{name}.kernel", kernel_array), var(f"{name}.bias", bias_array)
    _, stride, pad = conv_geometry(conv)
    padding = [[0, 0], [pad, pad], [pad, pad], [0, 0]] if pad else "VALID"  # torch's symmetric zero padding

    def apply(x: Tensor) -> Tensor:
        return tf.nn.bias_add(tf.nn.conv2d(x, kernel, stride, padding), bias)

    return apply


def _batch_norm(tf: Any, var: Variables, name: str, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> Layer:
    gamma, beta, mean, variance = (
        var(f"{name}.{part}", a) for part, a in zip(("gamma", "beta", "mean", "variance"), bn_arrays(bn))
    )
    return lambda x: tf.nn.batch_normalization(x, mean, variance, beta, gamma, bn.eps)


def _dense(tf: Any, var: Variables, name: str, linear: nn.Linear, scale: float = 1.0, offset: float = 0.0) -> Layer:
    arrays = dense_arrays(linear, scale, offset)
    kernel = var(f"{name}.kernel", arrays[0])
    if len(arrays) == 1:
        return lambda x: tf.matmul(x, kernel)
    bias = var(f"{name}.bias", arrays[1])
    return lambda x: tf.nn.bias_add(tf.matmul(x, kernel), bias)


# -- trunks -------------------------------------------------------------------------------------


def vgg_trunk(tf: Any, trunk: VGGTrunk, var: Variables) -> Layer:
    """VGG's conv blocks on NHWC input, flattened in PyTorch's C, H, W order."""
    blocks = []
    for b, names in enumerate(trunk.blocks, 1):
        convs = [_conv(tf, var, name, getattr(trunk, name)) for name in names]
        bn = _batch_norm(tf, var, f"bn{b}", getattr(trunk, f"bn{b}")) if trunk.block_bn else None
        blocks.append((convs, bn))

    def apply(x: Tensor) -> Tensor:
        for convs, bn in blocks:
            for conv in convs:
                x = tf.nn.relu(conv(x))
            if bn is not None:
                x = bn(x)
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        return tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [-1, int(np.prod(x.shape[1:]))])

    return apply


def _pad_end(tf: Any, x: Tensor, pads: tuple[int, ...]) -> Tensor:
    """A ResidualBlock's ``F.pad(x, (0, cols, 0, rows, 0, channels))`` on an NHWC tensor."""
    if not pads:
        return x
    _, cols, _, rows, _, channels = pads
    return tf.pad(x, [[0, 0], [0, rows], [0, cols], [0, channels]])


def dlib_trunk(tf: Any, trunk: DlibTrunk, var: Variables) -> Layer:
    """dlib's ResNet on NHWC input: its pooled features, its descriptor, or both, as ``trunk.layer`` says."""
    net = trunk.net
    stem = _conv(tf, var, "conv1", net.conv1, net.conv1_affine)
    blocks = []
    for name, block in dlib_blocks(net):
        blocks.append(
            (
                block,
                _conv(tf, var, f"{name}_conv1", block.conv1, block.affine1),
                _conv(tf, var, f"{name}_conv2", block.conv2, block.affine2),
            )
        )
    descriptor = var("descriptor.kernel", np32(net.fc.weight.T))

    def apply(x: Tensor) -> Tensor:
        x = tf.nn.max_pool2d(tf.nn.relu(stem(x)), 3, 2, "VALID")
        for block, conv1, conv2 in blocks:
            skip = tf.nn.avg_pool2d(x, 2, 2, "VALID") if block.down else x
            y = _pad_end(tf, conv2(tf.nn.relu(conv1(x))), block.block_pad)
            x = tf.nn.relu(y + _pad_end(tf, skip, block.skip_pad))
        pooled = tf.reduce_mean(x, axis=[1, 2])
        if trunk.layer == "pooled":
            return pooled
        if trunk.layer == "descriptor":
            return tf.matmul(pooled, descriptor)
        return tf.concat([pooled, tf.matmul(pooled, descriptor)], axis=1)

    return apply


# -- head ---------------------------------------------------------------------------------------


def _head(tf: Any, net: AgeGenderNet, var: Variables) -> Callable[[Tensor], dict[str, Tensor]]:
    cfg = net.config
    stack: list[Layer] = []
    for i, module in enumerate(net.fc):
        if isinstance(module, nn.Linear):
            stack.append(_dense(tf, var, f"fc.{i}", module))
        elif isinstance(module, nn.BatchNorm1d):
            stack.append(_batch_norm(tf, var, f"fc.{i}", module))
        elif isinstance(module, nn.ReLU):
            stack.append(tf.nn.relu)
        elif not isinstance(module, nn.Dropout):  # dropout is the identity at inference
            raise TypeError(f"no TensorFlow equivalent for head layer {type(module).__name__}")
    gender = _dense(tf, var, "gender", net.gender, 1.0 / cfg.temperature)  # sigmoid(logit / T)
    age: Layer | None = None
    if net.age is not None:
        age = _dense(tf, var, "age", net.age, *(regression_affine(cfg) if cfg.age_head == "regression" else ()))
    ages = tf.constant(age_values(cfg)[:, None])

    def apply(x: Tensor) -> dict[str, Tensor]:
        for layer in stack:
            x = layer(x)
        out = {"p_male": tf.sigmoid(gender(x))[:, 0]}
        if age is None:
            return out
        if cfg.age_head == "regression":
            out["age"] = stretch(tf.clip_by_value(age(x)[:, 0], float(cfg.age_min), float(cfg.age_max)))
            return out
        probs = tf.nn.softmax(age(x), axis=-1)
        out.update(age=stretch(tf.matmul(probs, ages)[:, 0]), age_probs=probs)
        for name, q in AGE_QUANTILES.items():
            out[name] = age_percentile(tf, probs, q, cfg.age_min)
        return out

    def stretch(years: Tensor) -> Tensor:  # decode.stretch_years
        if not cfg.age_stretch:
            return years
        over = tf.nn.relu(years - cfg.age_pivot)
        return tf.clip_by_value(years + cfg.age_stretch * over, float(cfg.age_min), float(cfg.age_max))

    return apply
