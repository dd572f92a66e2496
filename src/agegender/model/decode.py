"""Network outputs -> what users get: calibrated P(male), age in years, and the age interval.

One function, :func:`decode`, in torch ops that trace into every export, so ``predict``, the evaluation report,
ONNX, Keras and ``torch.export`` all return the same numbers for the same face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ModelConfig

if TYPE_CHECKING:
    import torch

# The age interval is the 10th to 90th percentile of the DEX distribution: an 80% interval when the head's
# probabilities are calibrated. How often it holds the true age on held-out people is measured in MODEL_CARD.md.
AGE_INTERVAL = (0.1, 0.9)


def output_names(config: ModelConfig) -> list[str]:
    """The decoded outputs in order: ``p_male``; ``age`` unless there is no age head; DEX adds ``age_low``,
    ``age_high`` and ``age_probs``."""
    if config.age_head == "none":
        return ["p_male"]
    if config.age_head == "regression":
        return ["p_male", "age"]
    return ["p_male", "age", "age_low", "age_high", "age_probs"]


def decode(config: ModelConfig, gender_logit: torch.Tensor, age_logits: torch.Tensor | None
           ) -> tuple[torch.Tensor, ...]:
    """``(N,)`` gender logits and the age head's ``(N, ages)`` or ``(N, 1)`` outputs -> :func:`output_names`' tensors.

    P(male) is the sigmoid of the logit divided by the temperature fitted on validation data. Ages are clamped
    to the range the head was trained on (regression extrapolates; -2.6 years was seen).
    """
    import torch

    p_male = torch.sigmoid(gender_logit / config.temperature)
    if age_logits is None or config.age_head == "none":
        return (p_male,)
    if config.age_head == "regression":
        # The regression head predicts age relative to the middle of the range, scaled to ~unit size.
        mid, half = (config.age_min + config.age_max) / 2, (config.age_max - config.age_min) / 2
        age = age_logits.squeeze(-1) * half + mid
        return p_male, age.clamp(config.age_min, config.age_max)
    probs = torch.softmax(age_logits, -1)
    ages = torch.arange(config.age_min, config.age_max + 1, dtype=probs.dtype, device=probs.device)
    age = (probs @ ages).clamp(config.age_min, config.age_max)
    cdf = torch.cumsum(probs, -1)
    # The q-th percentile is the first age whose cumulative probability reaches q: count the ages below it.
    low, high = ((cdf < q).sum(-1).clamp(max=config.ages - 1).to(probs.dtype) + config.age_min for q in AGE_INTERVAL)
    return p_male, age, low, high, probs
