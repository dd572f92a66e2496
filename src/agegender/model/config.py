"""The model's configuration and its input contract, without torch: ONNX inference reads them from an export's metadata.

This module is the single home of the preprocessing constants. Everything else (conversion metadata, data
transforms, export metadata, prediction) reads them from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AgeGenderError, InputError

if TYPE_CHECKING:
    import torch

# (output channels, convs) per block of VGG16 at full width.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_WIDTHS: tuple[int, ...] = tuple(w for w, _ in VGG16_BLOCKS)
AGE_HEADS = ("dex", "regression", "none")
ALIGNMENTS = ("crop", "chip5", "landmarks5")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an :class:`AgeGenderNet`; stored in every checkpoint."""

    widths: tuple[int, ...] = VGG16_WIDTHS
    image_size: int = 64
    backbone: str = "vgg-face"  # a name in model.backbones.BACKBONES
    feature_layer: str = ""  # which backbone layer feeds the head; "" = the backbone's default
    descriptor_dim: int = 128  # dlib-resnet: the size of its face descriptor (tiny test nets use less)
    block_bn: bool = False
    hidden: tuple[int, ...] = (4096, 4096)
    dropout: tuple[float, ...] = (0.5, 0.5)
    head_bn: bool = True
    feature_bn: bool = False  # BatchNorm on the trunk output: frozen VGG features have no fixed scale
    age_head: str = "dex"
    age_min: int = 1
    age_max: int = 70
    freeze_trunk: bool = True
    temperature: float = 1.0  # P(male) = sigmoid(logit / temperature), fitted on validation data after training

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.dropout = tuple(float(p) for p in self.dropout)
        from .backbones import backbone

        spec = backbone(self.backbone)
        self.feature_layer = spec.check_layer(self.feature_layer)
        if len(self.widths) != len(spec.widths) or min(self.widths, default=0) < 1:
            raise AgeGenderError(f"widths needs {len(spec.widths)} positive stage widths for {spec.name}, "
                                 f"got {self.widths}")
        if spec.name == "vgg-face" and (self.image_size % 32 or self.image_size < 32):
            raise AgeGenderError(f"image size must be a positive multiple of 32 for vgg-face, got {self.image_size}")
        if spec.name != "vgg-face" and self.image_size != spec.preprocess.size:
            raise AgeGenderError(f"image size must be {spec.preprocess.size} for {spec.name} "
                                 f"(its chips), got {self.image_size}")
        if not self.hidden or min(self.hidden) < 1:
            raise AgeGenderError(f"hidden needs at least one positive layer width, got {self.hidden}")
        if len(self.dropout) != len(self.hidden) or not all(0 <= p < 1 for p in self.dropout):
            raise AgeGenderError(f"dropout needs one probability in [0, 1) per hidden layer: hidden {self.hidden}, "
                                 f"dropout {self.dropout}")
        if self.age_head not in AGE_HEADS:
            raise AgeGenderError(f"age head must be one of {', '.join(AGE_HEADS)}, got {self.age_head!r}")
        if not (isinstance(self.temperature, int | float) and 0.05 <= self.temperature <= 20):
            raise AgeGenderError(f"temperature must be a number in [0.05, 20], got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not 0 <= self.age_min < self.age_max:
            raise AgeGenderError(f"age range must satisfy 0 <= min < max, got {self.age_min}-{self.age_max}")

    @property
    def feature_dim(self) -> int:
        from .backbones import feature_dim

        return feature_dim(self.backbone, self.widths, self.image_size, self.feature_layer, self.descriptor_dim)

    @property
    def ages(self) -> int:
        return self.age_max - self.age_min + 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# VGG-Face (Parkhi et al., 2015) was trained on 224x224 crops, 0-255 pixels minus this per-channel
# mean, fed to conv1_1 in BGR order. The official demo.lua subtracts the R mean from the B channel;
# we use the per-channel mean as published with the model, which is the correct reading.
VGG_FACE_MEAN_RGB: tuple[float, float, float] = (129.1863, 104.7624, 93.5940)


@dataclass(frozen=True)
class Preprocess:
    """How raw RGB uint8 pixels become network input: ``(rgb - mean_rgb) * scale``, then channel order."""

    size: int = 224
    mean_rgb: tuple[float, float, float] = VGG_FACE_MEAN_RGB
    scale: float = 1.0
    channel_order: str = "BGR"
    # How a face becomes a size x size input: "crop" = a square around the detector's box (the framing of
    # agegender_cleaned), "chip5" = dlib's 5-point chip with this padding from its shape predictor's landmarks,
    # "landmarks5" = the same chip placed from the detector's own 5 landmarks (RetinaFace), no shape predictor.
    alignment: str = "crop"
    chip_padding: float = 0.25

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be RGB or BGR, not {self.channel_order!r}")
        if self.alignment not in ALIGNMENTS:
            raise InputError(f"alignment must be one of {ALIGNMENTS}, not {self.alignment!r}")

    def resized(self, size: int) -> Preprocess:
        return replace(self, size=int(size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_rgb"] = list(self.mean_rgb)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            size=int(d["size"]),
            mean_rgb=tuple(float(v) for v in d["mean_rgb"]),  # type: ignore[arg-type]
            scale=float(d.get("scale", 1.0)),
            channel_order=str(d.get("channel_order", "BGR")),
            alignment=str(d.get("alignment", "crop")),  # files written before alignment was recorded
            chip_padding=float(d.get("chip_padding", 0.25)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def normalize_numpy(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` or ``(N, H, W, 3)`` uint8 RGB -> float32 channels-first network input."""
        x = (rgb.astype(np.float32) - np.asarray(self.mean_rgb, np.float32)) * np.float32(self.scale)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        return np.ascontiguousarray(np.moveaxis(x, -1, -3))

    def normalize(self, rgb: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 RGB tensor -> float32 ``(N, 3, H, W)`` network input, contiguous in
        ``memory_format`` (default NCHW; ``torch.channels_last`` keeps the pixels where they are, no copy)."""
        import torch

        mean = torch.tensor(self.mean_rgb, dtype=torch.float32)
        x = (rgb.to(torch.float32) - mean) * self.scale
        if self.channel_order == "BGR":
            x = x.flip(-1)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=memory_format or torch.contiguous_format)


VGG_FACE_PREPROCESS = Preprocess()
# The seed notebook fed /255 pixels in RGB order to the VGG-Face convs; kept for `--preset seed`.
SEED_PREPROCESS = Preprocess(size=64, mean_rgb=(0.0, 0.0, 0.0), scale=1.0 / 255.0, channel_order="RGB")
# dlib's face ResNet: (RGB - mean) / 256 on a 150 px chip from its 5-point shape predictor, padding 0.25.
DLIB_PREPROCESS = Preprocess(size=150, mean_rgb=(122.782, 117.001, 104.298), scale=1.0 / 256.0, channel_order="RGB",
                             alignment="chip5", chip_padding=0.25)
