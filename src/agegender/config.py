"""The model's configuration, without torch: ONNX inference reads it from an export's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# (output channels, convs) per block of VGG16 at full width.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_WIDTHS: tuple[int, ...] = tuple(w for w, _ in VGG16_BLOCKS)
AGE_HEADS = ("dex", "regression", "none")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an :class:`AgeGenderNet`; stored in every checkpoint."""

    widths: tuple[int, ...] = VGG16_WIDTHS
    image_size: int = 64
    block_bn: bool = False
    hidden: tuple[int, ...] = (4096, 4096)
    dropout: tuple[float, ...] = (0.5, 0.5)
    head_bn: bool = True
    feature_bn: bool = False  # BatchNorm on the trunk output: frozen VGG features have no fixed scale
    age_head: str = "dex"
    age_min: int = 1
    age_max: int = 70
    freeze_trunk: bool = True

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.dropout = tuple(float(p) for p in self.dropout)
        if len(self.widths) != len(VGG16_BLOCKS):
            raise ValueError(f"widths needs {len(VGG16_BLOCKS)} block widths, got {self.widths}")
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if len(self.dropout) != len(self.hidden):
            raise ValueError("dropout needs one probability per hidden layer")
        if self.age_head not in AGE_HEADS:
            raise ValueError(f"age_head must be one of {AGE_HEADS}, got {self.age_head!r}")

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * (self.image_size // 32) ** 2

    @property
    def ages(self) -> int:
        return self.age_max - self.age_min + 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
