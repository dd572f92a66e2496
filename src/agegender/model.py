"""VGG16 trunk with VGG-Face layer names, the full VGG-Face identity model, and the age/gender net.

Layers are attributes named after the paper (``conv1_1`` ... ``conv5_3``, ``fc6`` ... ``fc8``), so
weights map by name and inserting BatchNorm never shifts an index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import (  # torch-free, so ONNX inference can read configs
    VGG16_BLOCKS,
    VGG16_WIDTHS,
    ModelConfig,
)

CONV_NAMES: tuple[str, ...] = tuple(
    f"conv{b + 1}_{i + 1}" for b, (_, n) in enumerate(VGG16_BLOCKS) for i in range(n)
)
FC_NAMES: tuple[str, ...] = ("fc6", "fc7", "fc8")
VGG_FACE_IDENTITIES = 2622
VGG_FACE_FC = 4096


def conv_shapes(widths: tuple[int, ...] = VGG16_WIDTHS, in_ch: int = 3) -> dict[str, tuple[int, int]]:
    """``{"conv1_1": (in, out), ...}`` for a VGG16 of the given block widths."""
    shapes: dict[str, tuple[int, int]] = {}
    for b, (width, (_, n)) in enumerate(zip(widths, VGG16_BLOCKS)):
        for i in range(n):
            shapes[f"conv{b + 1}_{i + 1}"] = (in_ch, width)
            in_ch = width
    return shapes


def vgg_face_shapes(widths: tuple[int, ...] = VGG16_WIDTHS, fc: int = VGG_FACE_FC,
                    classes: int = VGG_FACE_IDENTITIES) -> dict[str, tuple[int, ...]]:
    """Every parameter of the canonical VGG-Face state dict and its PyTorch shape."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout) in conv_shapes(widths).items():
        out[f"{name}.weight"] = (cout, cin, 3, 3)
        out[f"{name}.bias"] = (cout,)
    for name, (fin, fout) in zip(FC_NAMES, ((widths[-1] * 7 * 7, fc), (fc, fc), (fc, classes))):
        out[f"{name}.weight"] = (fout, fin)
        out[f"{name}.bias"] = (fout,)
    return out


class VGGTrunk(nn.Module):
    """The 13 conv layers of VGG16 (3x3, stride 1, same padding, ReLU) and 5 max-pools.

    ``block_bn`` adds a BatchNorm after the last ReLU of each block (the seed notebook's layout).
    """

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

    @property
    def out_channels(self) -> int:
        return self.widths[-1]

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

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS, fc: int = VGG_FACE_FC,
                 classes: int = VGG_FACE_IDENTITIES) -> None:
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


@dataclass
class Outputs:
    gender_logit: torch.Tensor  # (N,), sigmoid gives P(male)
    age_logits: torch.Tensor | None = None  # (N, ages) for dex, (N, 1) for regression
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class AgeGenderNet(nn.Module):
    """VGG16 trunk -> flatten -> FC stack -> gender logit and age head, in one forward pass.

    ``forward_features`` is the (usually frozen) trunk; ``forward_head`` is everything trained on top,
    so a feature cache can replace the first and feed the second.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = VGGTrunk(config.widths, config.block_bn)
        layers: list[nn.Module] = [nn.BatchNorm1d(config.feature_dim)] if config.feature_bn else []
        dim = config.feature_dim
        for i, (width, p) in enumerate(zip(config.hidden, config.dropout)):
            layers.append(nn.Linear(dim, width, bias=not config.head_bn))
            if config.head_bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            if p > 0:
                layers.append(nn.Dropout(p))
            dim = width
        self.fc = nn.Sequential(*layers)
        self.gender = nn.Linear(dim, 1)
        age_out = {"dex": config.ages, "regression": 1, "none": 0}[config.age_head]
        self.age = nn.Linear(dim, age_out) if age_out else None
        if config.freeze_trunk:
            self.freeze_trunk()

    # -- freezing ---------------------------------------------------------------------------
    def freeze_trunk(self) -> None:
        """Freeze the convs. BatchNorm inside the trunk (the seed's ``block_bn`` layout) stays trainable."""
        self.config.freeze_trunk = True
        for name in CONV_NAMES:
            getattr(self.trunk, name).requires_grad_(False)
        self.train(self.training)

    def unfreeze_trunk(self) -> None:
        self.config.freeze_trunk = False
        self.trunk.requires_grad_(True)

    @property
    def trunk_is_fixed(self) -> bool:
        """True when nothing in the trunk trains, so its outputs can be cached."""
        return not any(p.requires_grad for p in self.trunk.parameters())

    def train(self, mode: bool = True) -> AgeGenderNet:
        # A fixed trunk stays in eval mode whatever model.train() says, so it behaves the same in every pass.
        super().train(mode)
        if self.trunk_is_fixed:
            self.trunk.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # -- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.trunk(x), 1)

    def forward_head(self, features: torch.Tensor) -> Outputs:
        h = self.fc(features)
        age = self.age(h) if self.age is not None else None
        return Outputs(self.gender(h).squeeze(-1), age)

    def forward(self, x: torch.Tensor) -> Outputs:
        return self.forward_head(self.forward_features(x))

    # -- decoding ---------------------------------------------------------------------------
    def expected_age(self, age_logits: torch.Tensor) -> torch.Tensor:
        """Age in years from the age head: softmax expectation (DEX) or the regressed value."""
        return decode_age(self.config, age_logits)

    def load_trunk(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``conv1_1`` ... ``conv5_3`` from a canonical VGG-Face state dict, shapes asserted."""
        own = self.trunk.state_dict()
        for name in CONV_NAMES:
            for part in ("weight", "bias"):
                key = f"{name}.{part}"
                if key not in state:
                    raise KeyError(f"weights lack {key}")
                if tuple(state[key].shape) != tuple(own[key].shape):
                    raise ValueError(f"{key}: weights have shape {tuple(state[key].shape)}, "
                                     f"model expects {tuple(own[key].shape)}")
        with torch.no_grad():
            for name in CONV_NAMES:
                conv = getattr(self.trunk, name)
                conv.weight.copy_(state[f"{name}.weight"])
                conv.bias.copy_(state[f"{name}.bias"])


def decode_age(config: ModelConfig, age_logits: torch.Tensor) -> torch.Tensor:
    if config.age_head == "dex":
        ages = torch.arange(config.age_min, config.age_max + 1, dtype=age_logits.dtype,
                            device=age_logits.device)
        return torch.softmax(age_logits, -1) @ ages
    if config.age_head == "regression":
        # The regression head predicts age relative to the middle of the range, scaled to ~unit size.
        mid, half = (config.age_min + config.age_max) / 2, (config.age_max - config.age_min) / 2
        return age_logits.squeeze(-1) * half + mid
    raise ValueError("this model has no age head")
