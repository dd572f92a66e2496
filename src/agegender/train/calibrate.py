"""Temperature scaling of P(male) (Guo et al., 2017), fitted on the validation split after training.

One scalar divides the gender logit. It changes no decision at 0.5, only how sure the model says it is, which is
what ``--min-confidence`` and the expected calibration error read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..model.meta import CheckpointMeta
from . import metrics

log = logging.getLogger(__name__)

# The search range of the temperature, as ModelConfig accepts it.
T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: np.ndarray, y: np.ndarray, inverse_t: float) -> float:
    z = logits * inverse_t
    # log(1 + e^z) - y z, written to stay finite for large |z|
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, y: np.ndarray, iterations: int = 60) -> float:
    """The temperature T in [0.05, 20] minimising the mean negative log-likelihood of ``sigmoid(logits / T)``.

    The NLL is convex in 1/T, so a golden-section search over log(1/T) finds its minimum.
    """
    logits, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
    if logits.shape != y.shape or logits.ndim != 1 or len(y) == 0 or not np.isfinite(logits).all():
        raise ValueError("fit_temperature needs matching, non-empty, finite 1-D logits and labels")
    lo, hi = math.log(1 / T_MAX), math.log(1 / T_MIN)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = _nll(logits, y, math.exp(a)), _nll(logits, y, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = _nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = _nll(logits, y, math.exp(b))
    return float(min(max(1 / math.exp((lo + hi) / 2), T_MIN), T_MAX))


def calibration_summary(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    """The fitted temperature with the ECE and NLL before and after it, on the data it was fitted on."""
    before, after = (1 / (1 + np.exp(-logits / t)) for t in (1.0, temperature))
    return {
        "temperature": round(temperature, 4),
        "fitted_on": "val",
        "faces": len(y),
        "ece_before": round(metrics.expected_calibration_error(y, before), 4),
        "ece_after": round(metrics.expected_calibration_error(y, after), 4),
        "nll_before": round(_nll(logits, y, 1.0), 4),
        "nll_after": round(_nll(logits, y, 1 / temperature), 4),
    }


def calibrate_checkpoint(path: Path, logits: np.ndarray, y: np.ndarray) -> CheckpointMeta:
    """Fit the temperature on validation ``logits`` (fp32, temperature 1) and labels, and store it in the
    checkpoint at ``path``: in its config, so every decode and export applies it, and its summary in the metadata."""
    from ..model.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(path)
    temperature = fit_temperature(logits, y)
    meta.config.temperature = model.config.temperature = temperature
    meta.extra["calibration"] = calibration_summary(logits, y, temperature)
    save_checkpoint(path, model, meta)
    log.info(
        "P(male) calibrated on %d validation faces: temperature %.3f, ECE %.4f -> %.4f",
        len(y),
        temperature,
        meta.extra["calibration"]["ece_before"],
        meta.extra["calibration"]["ece_after"],
    )
    return meta
