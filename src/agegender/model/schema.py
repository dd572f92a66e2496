"""The checkpoint metadata's schema: every field's JSON type and a sane range, checked before anything is built.

A model file is input like any other: its metadata decides what gets allocated (a head of ``hidden`` units, crops
of ``image_size`` pixels), so a lying or broken file must be refused here, in one line, not by an
AttributeError in a constructor or an allocation of gigabytes. Torch-free: ONNX inference reads it too.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any

from ..errors import InputError
from .config import ModelConfig

# Far above every real model (VGG-Face: widths 512, hidden 4096, 224 px; UTKFace ages reach 116), far below
# what a lying file could ask a machine to allocate.
LIMITS: dict[str, tuple[float, float]] = {
    "widths": (1, 4096),
    "hidden": (1, 16384),
    "dropout": (0, 1),
    "image_size": (1, 1024),
    "descriptor_dim": (1, 4096),
    "age_min": (0, 200),
    "age_max": (1, 200),
    "temperature": (1e-3, 1e3),
    "age_pivot": (0, 200),
    "age_stretch": (0, 1),
    "size": (1, 1024),
    "mean_rgb": (-1e4, 1e4),
    "scale": (-1e4, 1e4),
    "chip_padding": (0, 10),
}
MAX_LIST = {"widths": 16, "hidden": 16, "dropout": 16, "mean_rgb": 3}
MAX_TEXT = 256


def _where(name: str, section: str) -> str:
    return f"metadata {section}.{name}" if section else f"metadata {name}"


def _number(value: Any, name: str, section: str, integer: bool) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        raise InputError(f"{_where(name, section)} is {_shown(value)}, expected {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise InputError(f"{_where(name, section)} is {value}, expected a finite number")
    low, high = LIMITS.get(name, (-math.inf, math.inf))
    if not low <= value <= high:
        raise InputError(f"{_where(name, section)} is {value}, outside the sane range [{low:g}, {high:g}]")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _field(value: Any, default: Any, name: str, section: str) -> None:
    """``value`` has the JSON type of the field's default (a list for a tuple) and lies within its limits."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{_where(name, section)} is {_shown(value)}, expected true or false")
    elif isinstance(default, int | float):
        _number(value, name, section, integer=isinstance(default, int))
    elif isinstance(default, str):
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise InputError(f"{_where(name, section)} is {_shown(value)}, expected a short string")
    elif isinstance(default, tuple):
        if not isinstance(value, list) or len(value) > MAX_LIST.get(name, 16):
            raise InputError(
                f"{_where(name, section)} is {_shown(value)}, expected a list of at most {MAX_LIST.get(name, 16)} numbers"
            )
        integer = bool(default) and isinstance(default[0], int)
        for v in value:
            _number(v, name, section, integer)


def _section(d: Any, cls: type, section: str, required: tuple[str, ...] = (), example: Any = None) -> None:
    """``d``'s fields against ``cls``'s, each typed like its default (or like ``example``'s value)."""
    if not isinstance(d, dict):
        raise InputError(f"metadata {section} is {_shown(d)}, expected an object")
    for f in fields(cls):
        if f.name not in d:
            if f.name in required:
                raise InputError(f"metadata {section}.{f.name} is missing")
            continue
        default = (
            getattr(example, f.name) if example is not None else f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        )
        _field(d[f.name], default, f.name, section)


def check_meta_document(d: Any) -> None:
    """Raise ValueError naming the first field of a checkpoint metadata document that breaks the schema."""
    from .config import Preprocess

    if not isinstance(d, dict):
        raise InputError(f"metadata is {_shown(d)}, expected a JSON object")
    _section(d.get("config"), ModelConfig, "config")
    _section(
        d.get("preprocess"),
        Preprocess,
        "preprocess",
        required=("size", "mean_rgb"),
        example=Preprocess(size=1, mean_rgb=(0.0, 0.0, 0.0)),
    )
    if len(d["preprocess"]["mean_rgb"]) != 3:
        raise InputError("metadata preprocess.mean_rgb needs 3 numbers (R, G, B)")
    genders = d.get("genders")
    if not (isinstance(genders, list) and len(genders) == 2 and all(isinstance(g, str) and 0 < len(g) <= 32 for g in genders)):
        raise InputError(f"metadata genders is {_shown(genders)}, expected a list of 2 short names")
    if not isinstance(d.get("weights_sha256"), str | None):
        raise InputError(f"metadata weights_sha256 is {_shown(d['weights_sha256'])}, expected a string or null")
    if not isinstance(d.get("extra", {}), dict):
        raise InputError(f"metadata extra is {_shown(d['extra'])}, expected an object")
