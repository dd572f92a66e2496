"""dlib's face ResNet (:mod:`agegender.model.dlib_resnet`) as Keras 3 layers, channels-last, for the .keras export.

Only built-in layers, so a .keras file loads anywhere Keras 3 does, without this package. dlib's details map as:

* convolutions: stride-2 ones and the 7x7 stem have no padding ("valid"), the stride-1 3x3 ones pad by 1 ("same");
  each affine is folded into its convolution (one pass over the activations instead of three);
* the residual sum of differently shaped tensors: zeros appended at the end of rows, columns and channels,
  with ZeroPadding3D over a trailing unit axis, because Keras has no layer that pads channels.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model.dlib_resnet import DlibTrunk, ResidualBlock
from .graph_weights import Weights, conv_arrays, conv_geometry, dlib_blocks, np32


def dlib_trunk(keras: Any, x: Any, trunk: DlibTrunk, weights: Weights) -> Any:
    """The trunk's output (pooled, descriptor or both, as ``trunk.layer`` says) for NHWC input ``x``.

    Records each new layer's weights in ``weights`` by layer name, to set once the model exists.
    """
    layers, net = keras.layers, trunk.net
    x = _conv(layers, x, "conv1", net.conv1, net.conv1_affine, weights, relu=True)
    x = layers.MaxPooling2D(3, 2, name="conv1_pool")(x)
    for name, block in dlib_blocks(net):
        x = _block(layers, x, name, block, weights)
    pooled = layers.GlobalAveragePooling2D(name="pooled")(x)
    if trunk.layer == "pooled":
        return pooled
    descriptor = layers.Dense(net.fc.out_features, use_bias=False, name="descriptor")(pooled)
    weights["descriptor"] = [np32(net.fc.weight.T)]
    if trunk.layer == "descriptor":
        return descriptor
    return layers.Concatenate(name="pooled_descriptor")([pooled, descriptor])


def _block(layers: Any, x: Any, name: str, block: ResidualBlock, weights: Weights) -> Any:
    skip = layers.AveragePooling2D(2, name=f"{name}_skip_pool")(x) if block.down else x
    y = _conv(layers, x, f"{name}_conv1", block.conv1, block.affine1, weights, relu=True)
    y = _conv(layers, y, f"{name}_conv2", block.conv2, block.affine2, weights, relu=False)
    y = _pad_end(layers, y, block.block_pad, f"{name}_pad")
    skip = _pad_end(layers, skip, block.skip_pad, f"{name}_skip_pad")
    return layers.Activation("relu", name=f"{name}_relu")(layers.Add(name=f"{name}_add")([y, skip]))


def _conv(layers: Any, x: Any, name: str, conv: nn.Conv2d, affine: nn.Module, weights: Weights, relu: bool) -> Any:
    k, stride, pad = conv_geometry(conv)
    # torch pads both sides by `pad`; Keras's "same" does exactly that for stride 1 and an odd kernel.
    same = pad > 0 and stride == 1 and 2 * pad == k - 1
    if pad and not same:
        x = layers.ZeroPadding2D(pad, name=f"{name}_zero_pad")(x)
    x = layers.Conv2D(
        conv.out_channels, k, strides=stride, padding="same" if same else "valid", activation="relu" if relu else None, name=name
    )(x)
    weights[name] = conv_arrays(conv, affine)
    return x


def _pad_end(layers: Any, x: Any, pads: tuple[int, ...], name: str) -> Any:
    """``F.pad(x, pads)`` of a ResidualBlock, ``(0, cols, 0, rows, 0, channels)`` or (), on an NHWC tensor."""
    if not pads:
        return x
    _, cols, _, rows, _, channels = pads
    if not channels:
        return layers.ZeroPadding2D(((0, rows), (0, cols)), name=name)(x)
    h, w, c = x.shape[1:]
    x = layers.Reshape((h, w, c, 1), name=f"{name}_unit_axis")(x)
    x = layers.ZeroPadding3D(((0, rows), (0, cols), (0, channels)), name=name)(x)
    return layers.Reshape((h + rows, w + cols, c + channels), name=f"{name}_merge")(x)
