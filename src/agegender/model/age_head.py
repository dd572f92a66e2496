"""The age head, one object per kind: how labelled ages become its training targets and loss, and how its
outputs become years. Training's loss and :func:`agegender.model.decode.decode` both ask it, so the encoding
and the decoding cannot drift apart.

* ``dex`` (Rothe et al.): a softmax over every whole age of the trained range; the age is its expectation, and
  the 10th-90th percentiles give an interval.
* ``regression``: one number, the age relative to the middle of the range, scaled to about unit size.

Both clamp to the trained range: the head never answers an age it was not trained on (regression extrapolates;
-2.6 years was seen).

Torch-free at import: ONNX inference reads :attr:`AgeHead.outputs` without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

    from .config import ModelConfig

# The age interval is the 10th to 90th percentile of the DEX distribution: an 80% interval when the head's
# probabilities are calibrated. How often it holds the true age on held-out people is measured in MODEL_CARD.md.
AGE_INTERVAL = (0.1, 0.9)


@dataclass(frozen=True)
class AgeHead(ABC):
    """An age head over the whole ages ``age_min``..``age_max`` (the range the model was trained on)."""

    age_min: int
    age_max: int

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]  # the decoded tensors, in order, after p_male

    @property
    @abstractmethod
    def width(self) -> int:
        """Outputs of the head's linear layer."""
        ...

    @abstractmethod
    def targets(self, ages: torch.Tensor) -> torch.Tensor:
        """Labelled ages in years (no NaN) -> what the head's outputs are trained towards."""
        ...

    @abstractmethod
    def loss(self, logits: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """The mean loss of ``(N, width)`` outputs against ``(N,)`` labelled ages in years."""
        ...

    @abstractmethod
    def decode(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, width)`` outputs -> :attr:`outputs`' tensors: the age in years first, clamped to the range."""
        ...


@dataclass(frozen=True)
class RegressionHead(AgeHead):
    name: ClassVar[str] = "regression"
    outputs: ClassVar[tuple[str, ...]] = ("age",)

    @property
    def width(self) -> int:
        return 1

    @property
    def affine(self) -> tuple[float, float]:
        """(scale, offset) with ``age = output * scale + offset`` before the clamp (exports fold it into a layer)."""
        return (self.age_max - self.age_min) / 2, (self.age_min + self.age_max) / 2

    def targets(self, ages: torch.Tensor) -> torch.Tensor:
        scale, offset = self.affine
        return (ages - offset) / scale

    def loss(self, logits: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.smooth_l1_loss(logits.squeeze(-1), self.targets(ages))

    def decode(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale, offset = self.affine
        return ((logits.squeeze(-1) * scale + offset).clamp(self.age_min, self.age_max),)


@dataclass(frozen=True)
class DexHead(AgeHead):
    name: ClassVar[str] = "dex"
    outputs: ClassVar[tuple[str, ...]] = ("age", "age_low", "age_high", "age_probs")

    @property
    def width(self) -> int:
        return self.age_max - self.age_min + 1

    def values(self) -> np.ndarray:
        """The ages of the classes, in years (float32)."""
        return np.arange(self.age_min, self.age_max + 1, dtype=np.float32)

    def targets(self, ages: torch.Tensor) -> torch.Tensor:
        """The class of each age: rounded to a whole year, ages outside the range in its end classes."""
        return (ages.round().clamp(self.age_min, self.age_max) - self.age_min).long()

    def loss(self, logits: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits, self.targets(ages))

    def decode(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The expected age, its 10th and 90th percentiles, and the distribution over ages."""
        import torch

        probs = torch.softmax(logits, -1)
        ages = torch.arange(self.age_min, self.age_max + 1, dtype=probs.dtype, device=probs.device)
        age = (probs @ ages).clamp(self.age_min, self.age_max)
        cdf = torch.cumsum(probs, -1)
        # The q-th percentile is the first age whose cumulative probability reaches q: count the ages below it.
        low, high = ((cdf < q).sum(-1).clamp(max=self.width - 1).to(probs.dtype) + self.age_min for q in AGE_INTERVAL)
        return age, low, high, probs


AGE_HEADS: dict[str, type[AgeHead]] = {head.name: head for head in (DexHead, RegressionHead)}


def age_head(config: ModelConfig) -> AgeHead | None:
    """The age head ``config`` describes, or None for a model without one (``age_head="none"``)."""
    if config.age_head == "none":
        return None
    return AGE_HEADS[config.age_head](config.age_min, config.age_max)
