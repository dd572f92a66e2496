"""agegender: gender and age from faces, by transfer learning from a face descriptor (dlib's ResNet, or VGG-Face).

Nothing happens at import time; heavy modules (torch, cv2, onnxruntime) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AgeGenderError": ("agegender.errors", "AgeGenderError"),
    "Preprocess": ("agegender.backbones", "Preprocess"),
    "VGG_FACE": ("agegender.weights.zoo", "VGG_FACE"),
    "ModelConfig": ("agegender.model.config", "ModelConfig"),
    "AgeGenderNet": ("agegender.model.net", "AgeGenderNet"),
    "VGGFace": ("agegender.model.vgg", "VGGFace"),
    "convert_weights": ("agegender.weights.convert", "convert_weights"),
    "load_checkpoint": ("agegender.model.checkpoint", "load_checkpoint"),
    "Predictor": ("agegender.infer.predict", "Predictor"),
    "configure": ("agegender.process", "configure"),
    "OptionError": ("agegender.errors", "OptionError"),
}

__all__ = [  # noqa: RUF022 - the lazy names, in _LAZY's order
    "AgeGenderError",
    "AgeGenderNet",
    "ModelConfig",
    "OptionError",
    "Predictor",
    "Preprocess",
    "VGGFace",
    "VGG_FACE",
    "__version__",
    "configure",
    "convert_weights",
    "load_checkpoint",
]

if TYPE_CHECKING:  # pragma: no cover
    from .backbones import Preprocess
    from .errors import AgeGenderError, OptionError
    from .infer.predict import Predictor
    from .model.checkpoint import load_checkpoint
    from .model.config import ModelConfig
    from .model.net import AgeGenderNet
    from .model.vgg import VGGFace
    from .process import configure
    from .weights.convert import convert_weights
    from .weights.zoo import VGG_FACE


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'agegender' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
