"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``, Davis King, CC0): a 29-layer ResNet
whose 128-d descriptor tells faces apart.

Its constants, input contract and spec; the PyTorch port is :mod:`agegender.model.dlib_resnet`, its Keras and
TensorFlow graphs are in :mod:`agegender.infer.keras_dlib` and :mod:`agegender.infer.tf_graph`, and its ``.dat``
file is read by :mod:`agegender.weights.dlib_dat`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AgeGenderError
from .preprocess import Preprocess
from .registry import BackboneSpec, TrunkShape, register

# Input convention of the released model (its input layer is input_rgb_image_sized<150>).
INPUT_SIZE = 150
INPUT_MEAN_RGB = (122.782, 117.001, 104.298)
INPUT_SCALE = 1 / 256  # dlib divides by 256, not by a standard deviation
# (RGB - mean) / 256 on a 150 px chip from its 5-point shape predictor, padding 0.25.
DLIB_PREPROCESS = Preprocess(
    size=INPUT_SIZE, mean_rgb=INPUT_MEAN_RGB, scale=INPUT_SCALE, channel_order="RGB", alignment="chip5", chip_padding=0.25
)

DLIB_WIDTHS = (32, 64, 128, 256, 256)  # channels of the five residual levels (the stem has the first)
LEVEL_BLOCKS = (3, 4, 3, 3, 1)  # blocks per residual level, input to output
DESCRIPTOR_DIM = 128


def dlib_shape_of(state: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """``(level widths, descriptor size)`` of a canonical dlib ResNet state dict."""
    try:
        widths = tuple(int(state[f"level{i + 1}.0.conv2.weight"].shape[0]) for i in range(len(LEVEL_BLOCKS)))
        return widths, int(state["fc.weight"].shape[0])
    except KeyError as e:
        raise AgeGenderError(f"not a dlib ResNet state dict: no {e.args[0]!r}") from None


class DlibResNetSpec(BackboneSpec):
    """A fixed 150 px chip; the head reads the pooled activations, dlib's descriptor, or both."""

    def feature_dim(self, config: TrunkShape) -> int:
        pooled = config.widths[-1]
        return {"pooled": pooled, "descriptor": config.descriptor_dim, "both": pooled + config.descriptor_dim}[
            config.feature_layer
        ]

    def shape_of(self, state: Mapping[str, Any]) -> dict[str, Any]:
        widths, descriptor_dim = dlib_shape_of(state)
        return {"widths": widths, "descriptor_dim": descriptor_dim}


DLIB_RESNET = register(
    DlibResNetSpec(
        name="dlib-resnet",
        preprocess=DLIB_PREPROCESS,
        widths=DLIB_WIDTHS,
        # pooled: the 256-d global average pool before dlib's fc; descriptor: dlib's own 128-d face descriptor.
        feature_layers=("pooled", "descriptor", "both"),
        pretrained="dlib-face-recognition-resnet",
        formats=("dlib",),
        trunk="agegender.model.dlib_resnet:DlibTrunk",
        graphs={"keras": "agegender.infer.keras_dlib:dlib_trunk", "savedmodel": "agegender.infer.tf_graph:dlib_trunk"},
        train_options=frozenset({"alignment", "tune_levels"}),
        # Measured on UTKFace (4,899 faces, ages 1-116, its own held-out split): the DEX age head reached MAE 4.57 years
        # where regression gave 6.49-6.87 with the same features, and the pooled 256-d layer beat the 128-d descriptor
        # (4.84) and both together (4.62).
        train_defaults={"age_head": "dex", "hidden": (512, 512), "feature_layer": "pooled"},
        alignments=("chip5", "landmarks5"),
    )
)
