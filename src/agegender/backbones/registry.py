"""The backbone registry: one torch-free spec per face descriptor, registered by that backbone's own module.

A spec names the code that needs torch, Keras or TensorFlow as ``"module:attribute"``, imported on first use. So the
spec stays importable where torch is not installed (ONNX inference), and the layers that implement a backbone
(``model``, ``weights``, ``infer``) import its spec, never the reverse: no import circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import AgeGenderError
from .preprocess import Preprocess

DEFAULT_BACKBONE = "dlib-resnet"  # its weights install with pip (CC0); VGG-Face's need a download and conversion
LEGACY_BACKBONE = "vgg-face"  # what a stored model config without a backbone means: the only one there was
OWN_PIXELS = "vgg-face"  # the stored spelling of "the backbone's own pixels" in a run's config (``pixels``)
# The training options whose meaning depends on the backbone; each spec says which of them it reads.
BACKBONE_OPTIONS = frozenset({"image_size", "pixels", "widths", "block_bn", "alignment", "tune_levels"})
# Every backbone exports to these: both are traced from the PyTorch network itself.
TRACED_EXPORTS = ("onnx", "torch")


class TrunkShape(Protocol):
    """What a spec reads of a model config (``agegender.model.config.ModelConfig`` has it)."""

    backbone: str
    widths: tuple[int, ...]
    image_size: int
    feature_layer: str
    descriptor_dim: int


@dataclass(frozen=True, eq=False)
class BackboneSpec:
    """Everything that differs between backbones: contract, shapes, files, training defaults, implementations.

    A backbone subclasses it where its rules differ (:meth:`feature_dim`, :meth:`shape_of`, :meth:`check`).
    """

    name: str
    preprocess: Preprocess  # the input contract, alignment included
    widths: tuple[int, ...]  # full-size channel widths of the stages
    feature_layers: tuple[str, ...]  # what a head may read; the first is the default
    pretrained: str  # its pretrained file's key in agegender.weights.zoo.ZOO
    formats: tuple[str, ...]  # the published encodings of its weights that `convert` reads
    trunk: str  # "module:Class" of its PyTorch trunk (agegender.model.trunk.Trunk)
    # export format -> "module:function" that writes the trunk in that format's graph; TRACED_EXPORTS need none
    graphs: Mapping[str, str] = field(default_factory=dict)
    train_options: frozenset[str] = frozenset()  # which of BACKBONE_OPTIONS a run of it reads
    train_defaults: Mapping[str, Any] = field(default_factory=dict)  # what the default preset changes for it
    alignments: tuple[str, ...] = ()  # framings a run may choose instead of the contract's own
    pixels: Mapping[str, Preprocess] = field(default_factory=dict)  # pixel recipes a run may choose instead

    # -- the model's shape ------------------------------------------------------------------------
    def check_layer(self, layer: str) -> str:
        """``layer``, or the default for ""; an error for a layer this backbone does not have."""
        layer = layer or self.feature_layers[0]
        if layer not in self.feature_layers:
            raise AgeGenderError(
                f"backbone {self.name} has no feature layer {layer!r}; choose from {', '.join(self.feature_layers)}"
            )
        return layer

    def check(self, config: TrunkShape) -> None:
        """Refuse a config this backbone cannot be built with (widths, image size), in one line."""
        if len(config.widths) != len(self.widths) or min(config.widths, default=0) < 1:
            raise AgeGenderError(f"widths needs {len(self.widths)} positive stage widths for {self.name}, got {config.widths}")
        self.check_image_size(config.image_size)

    def check_image_size(self, size: int) -> None:
        """A backbone of fixed input takes its contract's size only."""
        if size != self.preprocess.size:
            raise AgeGenderError(f"image size must be {self.preprocess.size} for {self.name} (its chips), got {size}")

    def feature_dim(self, config: TrunkShape) -> int:
        """Width of the vector the trunk hands the head."""
        raise NotImplementedError

    def shape_of(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The model config fields a pretrained state dict fixes (widths, ...), read from its shapes."""
        raise NotImplementedError

    # -- implementations, imported on first use ---------------------------------------------------
    def trunk_class(self) -> Any:
        return resolve(self.trunk)

    def build_trunk(self, config: TrunkShape) -> Any:
        """The PyTorch trunk for ``config``, freshly initialised."""
        return self.trunk_class().from_config(config)

    @property
    def exports(self) -> tuple[str, ...]:
        return (*TRACED_EXPORTS, *self.graphs)

    def graph(self, fmt: str) -> Callable[..., Any]:
        """The function that writes this trunk in ``fmt``'s graph (a format of :attr:`graphs`)."""
        if fmt not in self.graphs:
            raise AgeGenderError(f"the {self.name} backbone has no {fmt} graph; it exports to {', '.join(self.exports)}")
        return resolve(self.graphs[fmt])

    # -- training ---------------------------------------------------------------------------------
    def training_shape(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``widths``, ``image_size`` and ``block_bn`` for a run: from its options where this backbone reads
        them (empty widths: its own), else its own."""
        reads = self.train_options
        return {
            "widths": tuple(options["widths"] or self.widths) if "widths" in reads else self.widths,
            "image_size": int(options["image_size"]) if "image_size" in reads else self.preprocess.size,
            "block_bn": bool(options.get("block_bn")) and "block_bn" in reads,
        }

    def input_contract(self, stored: Preprocess | None = None, alignment: str = "", pixels: str = OWN_PIXELS) -> Preprocess:
        """A run's input contract: a pixel recipe it chose, else the one its weights file recorded, else the
        backbone's; then the framing it chose."""
        pre = self.pixels.get(pixels) or stored or self.preprocess
        return replace(pre, alignment=alignment) if alignment else pre


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` under its name (a backbone module calls this once); returns it."""
    if BACKBONES.get(spec.name, spec) is not spec:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    BACKBONES[spec.name] = spec
    return spec


def backbone(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise AgeGenderError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_for_format(fmt: str) -> BackboneSpec:
    """The backbone whose weights a file of encoding ``fmt`` holds."""
    for spec in BACKBONES.values():
        if fmt in spec.formats:
            return spec
    raise AgeGenderError(f"no backbone reads weights in the {fmt!r} format")


def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
