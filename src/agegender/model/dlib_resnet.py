"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) in plain PyTorch.

The layers mirror dlib's one to one, so the canonical state dict read from the ``.dat`` file loads by name.
Two dlib behaviours shape the code:

* stride-2 convolutions and pools have no padding, stride-1 3x3 convolutions pad by 1;
* a residual sum of differently shaped tensors zero-pads both to the larger size in every dimension, at the
  end (more channels, more rows and columns at the bottom right). That happens at each downsampling block
  (the pooled input has fewer channels) and at the last two levels, where the stride-2 3x3 convolution
  gives 3x3 (1x1) but the 2x2 pool gives 4x4 (2x2). The pads are worked out once, at construction, from
  the input size, so the forward pass has no shape-dependent Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.dlib_resnet import (
    DESCRIPTOR_DIM,
    DLIB_WIDTHS,
    INPUT_SIZE,
    LEVEL_BLOCKS,
    dlib_shape_of,
)
from ..errors import AgeGenderError, InputError
from .trunk import Trunk

if TYPE_CHECKING:
    from .config import ModelConfig


def _out_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pad_to(channels: int, size: int, out_channels: int, out_size: int) -> tuple[int, ...]:
    """F.pad amounts (last dimension first) that grow (channels, size, size) at the end; () if none."""
    extra, grow = out_size - size, out_channels - channels
    return (0, extra, 0, extra, 0, grow) if extra or grow else ()


class Affine(nn.Module):
    """A per-channel scale and shift: dlib's stand-in for batch norm at inference."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class ResidualBlock(nn.Module):
    """relu(skip + affine(conv(relu(affine(conv(x)))))); a downsampling block pools its skip 2x2/2."""

    def __init__(self, in_channels: int, width: int, in_size: int, down: bool) -> None:
        super().__init__()
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=padding)
        self.affine1 = Affine(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.affine2 = Affine(width)
        self.down = down
        block_size = _out_size(in_size, 3, stride, padding)
        skip_size = _out_size(in_size, 2, 2) if down else in_size
        self.out_channels = max(width, in_channels)
        self.out_size = max(block_size, skip_size)
        self.block_pad = _pad_to(width, block_size, self.out_channels, self.out_size)
        self.skip_pad = _pad_to(in_channels, skip_size, self.out_channels, self.out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.avg_pool2d(x, 2) if self.down else x
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.block_pad:
            y = F.pad(y, self.block_pad)
        if self.skip_pad:
            skip = F.pad(skip, self.skip_pad)
        return F.relu(y + skip)


class DlibResNet(nn.Module):
    """The 29-layer ResNet behind dlib's 128-d face descriptor (not L2-normalised, as dlib's isn't).

    ``widths`` are the channels of the five residual levels (the stem has the first); tests build tiny
    ones. Input: float (N, 3, input_size, input_size) RGB, already normalised (``DLIB_PREPROCESS.normalize``).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = DLIB_WIDTHS,
        descriptor_dim: int = DESCRIPTOR_DIM,
        input_size: int = INPUT_SIZE,
    ) -> None:
        super().__init__()
        if len(widths) != len(LEVEL_BLOCKS):
            raise InputError(f"expected {len(LEVEL_BLOCKS)} level widths, got {widths}")
        self.widths = tuple(widths)
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2)
        self.conv1_affine = Affine(widths[0])
        size = _out_size(_out_size(input_size, 7, 2), 3, 2)  # conv1, then the 3x3/2 max pool
        channels = widths[0]
        levels = []
        for level, (width, blocks) in enumerate(zip(widths, LEVEL_BLOCKS, strict=True)):
            level_blocks = []
            for b in range(blocks):
                block = ResidualBlock(channels, width, size, down=level > 0 and b == 0)
                channels, size = block.out_channels, block.out_size
                level_blocks.append(block)
            levels.append(nn.Sequential(*level_blocks))
        self.level1, self.level2, self.level3, self.level4, self.level5 = levels
        self.feature_dim = channels
        self.fc = nn.Linear(channels, descriptor_dim, bias=False)

    @classmethod
    def from_canonical(cls, state: Mapping[str, np.ndarray | torch.Tensor]) -> DlibResNet:
        """A network shaped after ``state`` (e.g. from ``read_dlib_resnet``), with its weights loaded."""
        widths, descriptor_dim = dlib_shape_of(state)
        model = cls(widths, descriptor_dim)
        model.load_canonical(state)
        return model

    def load_canonical(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy a canonical state dict in; every name and shape must match this network exactly."""
        own = self.state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise AgeGenderError(f"dlib ResNet state dict: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        tensors = {}
        for key, value in state.items():
            t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            if tuple(t.shape) != tuple(own[key].shape):
                raise AgeGenderError(
                    f"dlib ResNet state dict: {key} has shape {tuple(t.shape)}, expected {tuple(own[key].shape)}"
                )
            tensors[key] = t.to(torch.float32)
        self.load_state_dict(tensors)

    @property
    def levels(self) -> tuple[nn.Sequential, ...]:
        return (self.level1, self.level2, self.level3, self.level4, self.level5)

    def lower(self, x: torch.Tensor, upper_levels: int = 0) -> torch.Tensor:
        """The activations in front of the last ``upper_levels`` residual levels."""
        x = F.max_pool2d(F.relu(self.conv1_affine(self.conv1(x))), 3, 2)
        for level in self.levels[: len(self.levels) - upper_levels]:
            x = level(x)
        return x

    def upper(self, x: torch.Tensor, upper_levels: int = 0) -> torch.Tensor:
        """The last ``upper_levels`` levels on :meth:`lower`'s activations, then the global average pool."""
        for level in self.levels[len(self.levels) - upper_levels :]:
            x = level(x)
        return x.mean(dim=(2, 3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, feature_dim) globally average-pooled activations that feed the descriptor."""
        return self.upper(self.lower(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, descriptor_dim) face descriptor, dlib's ``compute_face_descriptor``."""
        return self.fc(self.forward_features(x))


class DlibTrunk(Trunk):
    """dlib's face ResNet as a trunk: the pooled 256-d activations, its 128-d descriptor, or both."""

    levels = len(LEVEL_BLOCKS)

    def __init__(self, widths: tuple[int, ...], layer: str, descriptor_dim: int = DESCRIPTOR_DIM) -> None:
        super().__init__()
        self.net = DlibResNet(widths, descriptor_dim)
        self.layer = layer

    @classmethod
    def from_config(cls, config: ModelConfig) -> DlibTrunk:
        return cls(config.widths, config.feature_layer, config.descriptor_dim)

    def load_pretrained(self, state: Mapping[str, Any]) -> None:
        """Every layer of the ResNet, from its canonical state dict."""
        self.net.load_canonical(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(self.net.lower(x), 0)

    def lower(self, x: torch.Tensor, tuned: int) -> torch.Tensor:
        return self.net.lower(x, tuned)

    def upper(self, activations: torch.Tensor, tuned: int) -> torch.Tensor:
        pooled = self.net.upper(activations, tuned)
        if self.layer == "pooled":
            return pooled
        descriptor = self.net.fc(pooled)
        return descriptor if self.layer == "descriptor" else torch.cat([pooled, descriptor], 1)

    def tune(self, tuned: int) -> None:
        for module in [*self.net.levels[len(self.net.levels) - tuned :], *([self.net.fc] if self.layer != "pooled" else [])]:
            module.requires_grad_(True)
