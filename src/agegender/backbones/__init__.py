"""The face descriptors a head can sit on: one module per backbone, each registering its spec.

A backbone is its module: constants, input contract (:class:`Preprocess`), training defaults, and a
:class:`BackboneSpec` that builds its trunk, sizes its features, checks a config, names its pretrained file and says
which exports it has. Everything here is torch-free; the spec imports its implementations on first use.
"""

from __future__ import annotations

from . import dlib_resnet, vgg_face  # registers the built-in backbones
from .preprocess import ALIGNMENTS, Preprocess
from .registry import (
    BACKBONE_OPTIONS,
    BACKBONES,
    DEFAULT_BACKBONE,
    LEGACY_BACKBONE,
    OWN_PIXELS,
    BackboneSpec,
    TrunkShape,
    backbone,
    backbone_for_format,
    register,
)

__all__ = [
    "ALIGNMENTS",
    "BACKBONES",
    "BACKBONE_OPTIONS",
    "DEFAULT_BACKBONE",
    "LEGACY_BACKBONE",
    "OWN_PIXELS",
    "BackboneSpec",
    "Preprocess",
    "TrunkShape",
    "backbone",
    "backbone_for_format",
    "dlib_resnet",
    "register",
    "vgg_face",
]
