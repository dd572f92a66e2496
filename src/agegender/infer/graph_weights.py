"""A trained network's weights as float32 numpy arrays, in the layouts Keras and TensorFlow graphs take.

Shared by the Keras and the TensorFlow SavedModel exports, so both read the PyTorch modules the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np
import torch
from torch import nn

from ..model.age_head import DexHead, RegressionHead
from ..model.config import ModelConfig
from ..model.dlib_resnet import Affine, DlibResNet, ResidualBlock

# Arrays per Keras layer name, in the layer's own weight order, set once the model exists.
Weights = dict[str, list[np.ndarray]]


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def bn_arrays(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> list[np.ndarray]:
    """gamma, beta, running mean, running variance: Keras BatchNormalization's weight order."""
    assert bn.running_mean is not None and bn.running_var is not None
    return [np32(bn.weight), np32(bn.bias), np32(bn.running_mean), np32(bn.running_var)]


def conv_arrays(conv: nn.Conv2d, affine: nn.Module | None = None) -> list[np.ndarray]:
    """HWIO kernel and bias; a per-channel affine after the convolution (dlib's) is folded into both.

    Folded, the graph computes the same function up to float rounding, with one pass over the activations
    instead of three.
    """
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    if isinstance(affine, Affine):
        scale, shift = affine.scale.detach().double(), affine.shift.detach().double()
        w = w * scale.view(-1, 1, 1, 1)
        b = b * scale + shift
    return [np32(w.permute(2, 3, 1, 0)), np32(b)]  # OIHW -> HWIO


def dense_arrays(linear: nn.Linear, scale: float = 1.0, offset: float = 0.0) -> list[np.ndarray]:
    """(in, out) kernel and bias (if any) of ``scale * linear(x) + offset``."""
    kernel = np32(linear.weight.T) * np.float32(scale)
    if linear.bias is None:
        return [kernel]
    return [kernel, np32(linear.bias) * np.float32(scale) + np.float32(offset)]


def regression_affine(config: ModelConfig) -> tuple[float, float]:
    """(scale, offset) with ``age = logit * scale + offset``: the regression head's own (its one home)."""
    return RegressionHead(config.age_min, config.age_max).affine


def age_values(config: ModelConfig) -> np.ndarray:
    """The ages of a DEX head's classes, in years."""
    return DexHead(config.age_min, config.age_max).values()


def conv_geometry(conv: nn.Conv2d) -> tuple[int, int, int]:
    """(kernel, stride, zero padding on each side) of a square convolution with numeric padding."""
    if (
        isinstance(conv.padding, str)
        or len(set(conv.kernel_size)) != 1
        or len(set(conv.stride)) != 1
        or len(set(conv.padding)) != 1
    ):
        raise TypeError(f"expected a square convolution with numeric padding, got {conv}")
    return conv.kernel_size[0], conv.stride[0], conv.padding[0]


def dlib_blocks(net: DlibResNet) -> Iterator[tuple[str, ResidualBlock]]:
    """Every residual block in order, named ``level<L>_<i>``."""
    for level_no, level in enumerate((net.level1, net.level2, net.level3, net.level4, net.level5), 1):
        for i, block in enumerate(level):
            yield f"level{level_no}_{i}", cast(ResidualBlock, block)
