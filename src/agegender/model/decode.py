"""Network outputs -> what users get: calibrated P(male), age in years, and the age interval.

One function, :func:`decode`, in torch ops that trace into every export, so ``predict``, the evaluation report,
ONNX, Keras and ``torch.export`` all return the same numbers for the same face. The age part is the age head's
own (:mod:`agegender.model.age_head`), the object that also sets its training targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .age_head import AGE_INTERVAL, age_head
from .config import ModelConfig

if TYPE_CHECKING:
    import torch

__all__ = ["AGE_INTERVAL", "decode", "output_names", "stretch_years", "stretch_years_numpy"]


def output_names(config: ModelConfig) -> list[str]:
    """The decoded outputs in order: ``p_male``; ``age`` unless there is no age head; DEX adds ``age_low``,
    ``age_high`` and ``age_probs``."""
    head = age_head(config)
    return ["p_male", *(head.outputs if head is not None else ())]


def decode(config: ModelConfig, gender_logit: torch.Tensor, age_logits: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``(N,)`` gender logits and the age head's ``(N, ages)`` or ``(N, 1)`` outputs -> :func:`output_names`' tensors.

    P(male) is the sigmoid of the logit divided by the temperature fitted on validation data; the age goes through
    the stretch fitted there (:func:`stretch_years`). Ages are clamped to the range the head was trained on
    (regression extrapolates; -2.6 years was seen).
    """
    import torch

    p_male = torch.sigmoid(gender_logit / config.temperature)
    head = age_head(config)
    if age_logits is None or head is None:
        return (p_male,)
    age, *rest = head.decode(age_logits)
    # The stretch corrects the age, the point estimate; the interval stays the distribution's own percentiles,
    # whose coverage is what MODEL_CARD.md measures (DECISIONS.md: the old are aged by a stretch).
    return (p_male, stretch_years(config, age), *rest)


def stretch_years(config: ModelConfig, years: torch.Tensor) -> torch.Tensor:
    """The age calibration fitted on validation data: ``years + age_stretch * max(years - age_pivot, 0)``, clamped
    to the trained range (``ModelConfig.age_stretch``; none before it is fitted)."""
    import torch

    if not config.age_stretch:
        return years
    over = torch.relu(years - config.age_pivot)
    return (years + config.age_stretch * over).clamp(config.age_min, config.age_max)


def stretch_years_numpy(years: np.ndarray, pivot: float, stretch: float, age_range: tuple[int, int]) -> np.ndarray:
    """:func:`stretch_years` in numpy (float64), for the fit and the exports' checks."""
    years = np.asarray(years, np.float64)
    if not stretch:
        return years
    return np.clip(years + stretch * np.maximum(years - pivot, 0.0), *age_range)
