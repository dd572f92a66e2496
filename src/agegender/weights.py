"""What the published weights expect, and where the published archives live.

This module is the single home of the VGG-Face preprocessing constants. Everything else
(conversion metadata, data transforms, export metadata, prediction) reads them from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# VGG-Face (Parkhi et al., 2015) was trained on 224x224 crops, 0-255 pixels minus this per-channel
# mean, fed to conv1_1 in BGR order. The official demo.lua subtracts the R mean from the B channel;
# we use the per-channel mean as published with the model, which is the correct reading.
VGG_FACE_MEAN_RGB: tuple[float, float, float] = (129.1863, 104.7624, 93.5940)
GENDERS: tuple[str, str] = ("female", "male")  # the sigmoid output is P(male)


@dataclass(frozen=True)
class Preprocess:
    """How raw RGB uint8 pixels become network input: ``(rgb - mean_rgb) * scale``, then channel order."""

    size: int = 224
    mean_rgb: tuple[float, float, float] = VGG_FACE_MEAN_RGB
    scale: float = 1.0
    channel_order: str = "BGR"

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, not {self.channel_order!r}")

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


@dataclass(frozen=True)
class Archive:
    """A published file that `agegender fetch` downloads and verifies."""

    key: str
    filename: str
    url: str
    size: int | None  # bytes, when published
    sha256: str | None  # when unknown, recorded on first download and verified afterwards
    licence: str
    extracted: str  # a path inside the extraction directory that proves it is unpacked


VGG_FACE = Archive(
    key="weights",
    filename="vgg_face_torch.tar.gz",
    url="https://www.robots.ox.ac.uk/~vgg/software/vgg_face/src/vgg_face_torch.tar.gz",
    size=None,
    sha256=None,
    licence="VGG-Face: non-commercial research purposes only (Parkhi, Vedaldi, Zisserman, BMVC 2015)",
    extracted="vgg_face_torch/VGG_FACE.t7",
)

AGEGENDER_CLEANED = Archive(
    key="data",
    filename="agegender_cleaned.tar.gz",
    url="https://s3.amazonaws.com/matroid-web/datasets/agegender_cleaned.tar.gz",
    size=252_630_873,
    sha256=None,
    licence="Adience and IMDB-WIKI images: non-commercial research terms of the source datasets",
    extracted="combined",
)

ARCHIVES: dict[str, Archive] = {a.key: a for a in (VGG_FACE, AGEGENDER_CLEANED)}
