"""The model's configuration, without torch: ONNX inference reads it from an export's metadata.

What differs between backbones (their constants, input contracts, shape rules) lives in their own modules in
:mod:`agegender.backbones`; :class:`Preprocess` is re-exported from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..backbones import LEGACY_BACKBONE, Preprocess
from ..backbones import backbone as spec_of
from ..errors import AgeGenderError

__all__ = ["AGE_HEADS", "FITTED_AFTER_TRAINING", "ModelConfig", "Preprocess"]

AGE_HEADS = ("dex", "regression", "none")
# Fitted on the validation split after the last epoch: they never tell two training runs apart.
FITTED_AFTER_TRAINING = ("temperature", "age_pivot", "age_stretch")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an :class:`AgeGenderNet`; stored in every checkpoint."""

    # The defaults are what a stored config written before a field existed meant: the backbone was VGG-Face's.
    widths: tuple[int, ...] = spec_of(LEGACY_BACKBONE).widths
    image_size: int = 64
    backbone: str = LEGACY_BACKBONE  # a name in agegender.backbones.BACKBONES
    feature_layer: str = ""  # which backbone layer feeds the head; "" = the backbone's default
    descriptor_dim: int = 128  # dlib-resnet: the size of its face descriptor (tiny test nets use less)
    block_bn: bool = False
    hidden: tuple[int, ...] = (4096, 4096)
    dropout: tuple[float, ...] = (0.5, 0.5)
    head_bn: bool = True
    feature_bn: bool = False  # BatchNorm on the trunk output: frozen VGG features have no fixed scale
    age_head: str = "dex"
    age_min: int = 1
    age_max: int = 70
    freeze_trunk: bool = True
    temperature: float = 1.0  # P(male) = sigmoid(logit / temperature), fitted on validation data after training
    # Ages above the pivot are stretched, age + age_stretch * max(age - age_pivot, 0), then clamped to the trained
    # range: the head's pull towards the middle under-ages the old (DECISIONS.md: the old are aged by a stretch).
    age_pivot: float = 0.0
    age_stretch: float = 0.0

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.dropout = tuple(float(p) for p in self.dropout)
        spec = spec_of(self.backbone)
        self.feature_layer = spec.check_layer(self.feature_layer)
        spec.check(self)
        if not self.hidden or min(self.hidden) < 1:
            raise AgeGenderError(f"hidden needs at least one positive layer width, got {self.hidden}")
        if len(self.dropout) != len(self.hidden) or not all(0 <= p < 1 for p in self.dropout):
            raise AgeGenderError(
                f"dropout needs one probability in [0, 1) per hidden layer: hidden {self.hidden}, dropout {self.dropout}"
            )
        if self.age_head not in AGE_HEADS:
            raise AgeGenderError(f"age head must be one of {', '.join(AGE_HEADS)}, got {self.age_head!r}")
        if not (isinstance(self.temperature, int | float) and 0.05 <= self.temperature <= 20):
            raise AgeGenderError(f"temperature must be a number in [0.05, 20], got {self.temperature!r}")
        self.temperature = float(self.temperature)
        for name, high in (("age_pivot", 200), ("age_stretch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and 0 <= value <= high):
                raise AgeGenderError(f"{name} must be a number in [0, {high}], got {value!r}")
            setattr(self, name, float(value))
        if not 0 <= self.age_min < self.age_max:
            raise AgeGenderError(f"age range must satisfy 0 <= min < max, got {self.age_min}-{self.age_max}")

    @property
    def feature_dim(self) -> int:
        return spec_of(self.backbone).feature_dim(self)

    @property
    def ages(self) -> int:
        return self.age_max - self.age_min + 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def trained_part(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`FITTED_AFTER_TRAINING`: what two runs of the same training share."""
        return {k: v for k, v in self.to_dict().items() if k not in FITTED_AFTER_TRAINING}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
