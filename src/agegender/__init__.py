"""agegender: gender and age from faces, by transfer learning on the VGG-Face descriptor.

Nothing happens at import time; heavy modules (torch, cv2, onnxruntime) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AgeGenderError": ("agegender.errors", "AgeGenderError"),
    "Preprocess": ("agegender.weights", "Preprocess"),
    "VGG_FACE": ("agegender.weights", "VGG_FACE"),
    "ModelConfig": ("agegender.model", "ModelConfig"),
    "AgeGenderNet": ("agegender.model", "AgeGenderNet"),
    "VGGFace": ("agegender.model", "VGGFace"),
    "convert_weights": ("agegender.convert", "convert_weights"),
    "load_checkpoint": ("agegender.checkpoint", "load_checkpoint"),
    "Predictor": ("agegender.predict", "Predictor"),
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load_checkpoint
    from .convert import convert_weights
    from .errors import AgeGenderError
    from .model import AgeGenderNet, ModelConfig, VGGFace
    from .predict import Predictor
    from .weights import VGG_FACE, Preprocess


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'agegender' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
