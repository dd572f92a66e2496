"""VGG-Face's convolutions (:class:`agegender.model.vgg.VGGTrunk`) as Keras 3 layers, channels-last, for the .keras
export. Only built-in layers, so a .keras file loads anywhere Keras 3 does, without this package."""

from __future__ import annotations

from typing import Any

from ..model.vgg import VGGTrunk
from .graph_weights import Weights, bn_arrays, conv_arrays


def vgg_trunk(keras: Any, x: Any, trunk: VGGTrunk, weights: Weights) -> Any:
    """VGG's conv blocks on NHWC ``x``, flattened in PyTorch's C, H, W order so the fc weights keep theirs.

    Records each new layer's weights in ``weights`` by layer name, to set once the model exists.
    """
    layers = keras.layers
    for b, names in enumerate(trunk.blocks, 1):
        for name in names:
            conv = getattr(trunk, name)
            x = layers.Conv2D(conv.out_channels, 3, padding="same", activation="relu", name=name)(x)
            weights[name] = conv_arrays(conv)
        if trunk.block_bn:
            bn = getattr(trunk, f"bn{b}")
            x = layers.BatchNormalization(epsilon=bn.eps, name=f"bn{b}")(x)
            weights[f"bn{b}"] = bn_arrays(bn)
        x = layers.MaxPooling2D(2, name=f"pool{b}")(x)
    x = layers.Permute((3, 1, 2), name="to_channels_first")(x)
    return layers.Flatten(name="flatten")(x)
