"""VGG16 trunk with VGG-Face layer names, and the full VGG-Face identity model (the age/gender net is model.net's).

Layers are attributes named after the paper (``conv1_1`` ... ``conv5_3``, ``fc6`` ... ``fc8``), so
weights map by name and inserting BatchNorm never shifts an index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.vgg_face import VGG16_BLOCKS, VGG16_WIDTHS, VGG_FACE_FC, VGG_FACE_IDENTITIES
from .trunk import Trunk

if TYPE_CHECKING:
    from .config import ModelConfig

CONV_NAMES: tuple[str, ...] = tuple(f"conv{b + 1}_{i + 1}" for b, (_, n) in enumerate(VGG16_BLOCKS) for i in range(n))
FC_NAMES: tuple[str, ...] = ("fc6", "fc7", "fc8")


def conv_shapes(widths: tuple[int, ...] = VGG16_WIDTHS, in_ch: int = 3) -> dict[str, tuple[int, int]]:
    """``{"conv1_1": (in, out), ...}`` for a VGG16 of the given block widths."""
    shapes: dict[str, tuple[int, int]] = {}
    for b, (width, (_, n)) in enumerate(zip(widths, VGG16_BLOCKS)):
        for i in range(n):
            shapes[f"conv{b + 1}_{i + 1}"] = (in_ch, width)
            in_ch = width
    return shapes


def vgg_face_shapes(
    widths: tuple[int, ...] = VGG16_WIDTHS, fc: int = VGG_FACE_FC, classes: int = VGG_FACE_IDENTITIES
) -> dict[str, tuple[int, ...]]:
    """Every parameter of the canonical VGG-Face state dict and its PyTorch shape."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout) in conv_shapes(widths).items():
        out[f"{name}.weight"] = (cout, cin, 3, 3)
        out[f"{name}.bias"] = (cout,)
    for name, (fin, fout) in zip(FC_NAMES, ((widths[-1] * 7 * 7, fc), (fc, fc), (fc, classes))):
        out[f"{name}.weight"] = (fout, fin)
        out[f"{name}.bias"] = (fout,)
    return out


class VGGTrunk(Trunk):
    """The 13 conv layers of VGG16 (3x3, stride 1, same padding, ReLU) and 5 max-pools.

    ``block_bn`` adds a BatchNorm after the last ReLU of each block (the seed notebook's layout).
    """

    blocked_bf16 = True

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS, block_bn: bool = False) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.blocks: list[list[str]] = []
        for name, (cin, cout) in conv_shapes(self.widths).items():
            self.add_module(name, nn.Conv2d(cin, cout, 3, padding=1))
        for b, (_, n) in enumerate(VGG16_BLOCKS):
            self.blocks.append([f"conv{b + 1}_{i + 1}" for i in range(n)])
            if block_bn:
                self.add_module(f"bn{b + 1}", nn.BatchNorm2d(self.widths[b]))
        self.block_bn = block_bn

    @classmethod
    def from_config(cls, config: ModelConfig) -> VGGTrunk:
        return cls(config.widths, config.block_bn)

    @property
    def out_channels(self) -> int:
        return self.widths[-1]

    def load_pretrained(self, state: Mapping[str, Any]) -> None:
        """The convolutions of VGG-Face's canonical state dict (``conv1_1`` ... ``conv5_3``), shapes asserted; the
        identity net's fc layers are ignored."""
        own = self.state_dict()
        for name in CONV_NAMES:
            for part in ("weight", "bias"):
                key = f"{name}.{part}"
                if key not in state:
                    raise KeyError(f"weights lack {key}")
                if tuple(state[key].shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"{key}: weights have shape {tuple(state[key].shape)}, model expects {tuple(own[key].shape)}"
                    )
        with torch.no_grad():
            for name in CONV_NAMES:
                conv = getattr(self, name)
                conv.weight.copy_(state[f"{name}.weight"])
                conv.bias.copy_(state[f"{name}.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b, names in enumerate(self.blocks):
            for name in names:
                x = F.relu(getattr(self, name)(x), inplace=True)
            if self.block_bn:
                x = getattr(self, f"bn{b + 1}")(x)
            x = F.max_pool2d(x, 2, 2)
        return x


class VGGFace(nn.Module):
    """The full VGG-Face network: 224x224 BGR-mean-subtracted input -> 2622 identity logits."""

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS, fc: int = VGG_FACE_FC, classes: int = VGG_FACE_IDENTITIES) -> None:
        super().__init__()
        self.trunk = VGGTrunk(widths)
        self.fc6 = nn.Linear(widths[-1] * 7 * 7, fc)
        self.fc7 = nn.Linear(fc, fc)
        self.fc8 = nn.Linear(fc, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        if x.shape[-2:] != (7, 7):
            # fc6 was trained on 7x7 maps; other input sizes are pooled to it as VGG ports do.
            x = F.adaptive_avg_pool2d(x, (7, 7))
        x = torch.flatten(x, 1)  # C, H, W order, as Torch7's nn.View
        x = F.relu(self.fc6(x))
        x = F.relu(self.fc7(x))
        return self.fc8(x)

    def load_canonical(self, state: dict[str, torch.Tensor]) -> None:
        """Load a canonical state dict (``conv1_1.weight`` ... ``fc8.bias``)."""
        mapped = {(f"trunk.{k}" if k.startswith("conv") else k): v for k, v in state.items()}
        self.load_state_dict(mapped, strict=True)
