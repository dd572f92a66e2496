"""VGG-Face (Parkhi, Vedaldi, Zisserman, BMVC 2015): VGG16's convolutions, trained to tell 2,622 people apart.

Its constants, input contract and spec; the PyTorch trunk is :class:`agegender.model.vgg.VGGTrunk`, its Keras and
TensorFlow graphs are in :mod:`agegender.infer.keras_vgg` and :mod:`agegender.infer.tf_graph`, and its published
encodings are read by :mod:`agegender.weights.convert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AgeGenderError
from .preprocess import Preprocess
from .registry import BackboneSpec, TrunkShape, register

# (output channels, convs) per block of VGG16 at full width.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_WIDTHS: tuple[int, ...] = tuple(w for w, _ in VGG16_BLOCKS)
VGG_FACE_IDENTITIES = 2622  # fc8's classes
VGG_FACE_FC = 4096  # fc6's and fc7's width

# VGG-Face was trained on 224x224 crops, 0-255 pixels minus this per-channel mean, fed to conv1_1 in BGR order.
# The official demo.lua subtracts the R mean from the B channel; we use the per-channel mean as published with the
# model, which is the correct reading.
VGG_FACE_MEAN_RGB: tuple[float, float, float] = (129.1863, 104.7624, 93.5940)
VGG_FACE_PREPROCESS = Preprocess(size=224, mean_rgb=VGG_FACE_MEAN_RGB, scale=1.0, channel_order="BGR")
# The seed notebook fed /255 pixels in RGB order to the VGG-Face convs; kept for `--preset seed`.
SEED_PREPROCESS = Preprocess(size=64, mean_rgb=(0.0, 0.0, 0.0), scale=1.0 / 255.0, channel_order="RGB")


class VGGFaceSpec(BackboneSpec):
    """Any input size that is a multiple of 32; the head reads the last block's pooled maps, flattened."""

    def check_image_size(self, size: int) -> None:
        if size % 32 or size < 32:
            raise AgeGenderError(f"image size must be a positive multiple of 32 for {self.name}, got {size}")

    def feature_dim(self, config: TrunkShape) -> int:
        return config.widths[-1] * (config.image_size // 32) ** 2

    def shape_of(self, state: Mapping[str, Any]) -> dict[str, Any]:
        # a block's width: the output channels of its first conv
        return {"widths": tuple(int(state[f"conv{b + 1}_1.weight"].shape[0]) for b in range(len(VGG16_BLOCKS)))}


VGG_FACE = register(
    VGGFaceSpec(
        name="vgg-face",
        preprocess=VGG_FACE_PREPROCESS,
        widths=VGG16_WIDTHS,
        feature_layers=("pool5",),  # the conv5_3 block's pooled maps, flattened (C, H, W)
        pretrained="weights",  # the archive `agegender fetch weights` downloads; convert its VGG_FACE.t7
        formats=("t7", "pt", "mat", "h5", "caffe"),
        trunk="agegender.model.vgg:VGGTrunk",
        graphs={"keras": "agegender.infer.keras_vgg:vgg_trunk", "savedmodel": "agegender.infer.tf_graph:vgg_trunk"},
        train_options=frozenset({"image_size", "pixels", "widths", "block_bn"}),
        pixels={"seed": SEED_PREPROCESS},
    )
)
