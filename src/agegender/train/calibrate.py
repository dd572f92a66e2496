"""What is fitted on the validation split after training, and stored in the model's config.

* Temperature scaling of P(male) (Guo et al., 2017): one scalar divides the gender logit. It changes no decision
  at 0.5, only how sure the model says it is, which is what ``--min-confidence`` and the expected calibration error
  read.
* The age stretch (``ModelConfig.age_stretch``): a head trained for the mean error pulls the old towards the
  middle, where most faces are. Stretching the ages above a pivot, chosen for the lowest MAE with every 10-year
  band weighed alike, trades a little overall MAE for the old's (DECISIONS.md: the old are aged by a stretch).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..model.decode import stretch_years_numpy
from ..model.meta import CheckpointMeta
from . import metrics

log = logging.getLogger(__name__)

# The search range of the temperature, as ModelConfig accepts it.
T_MIN, T_MAX = 0.05, 20.0
# The age stretch's search grid, and the faces a 10-year band needs to count in the balanced MAE (fewer would let
# a handful of validation faces set the stretch).
STRETCH_PIVOTS = (20.0, 30.0, 40.0, 50.0, 60.0)
STRETCHES = np.round(np.arange(0.0, 0.505, 0.01), 2)
BAND_YEARS, BAND_MIN_FACES = 10, 20


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


def balanced_mae(pred: np.ndarray, true: np.ndarray) -> float:
    """The mean over 10-year age bands of each band's MAE, bands with at least :data:`BAND_MIN_FACES` faces."""
    bands = metrics.age_error_by_band(true, pred, BAND_YEARS).values()
    per_band = [b["mae"] for b in bands if b["n"] >= BAND_MIN_FACES]
    return float(np.mean(per_band)) if per_band else math.nan


def fit_age_stretch(pred: np.ndarray, true: np.ndarray, age_range: tuple[int, int]) -> tuple[float, float]:
    """(pivot, stretch) on the grid minimising :func:`balanced_mae` of exact ages; (0, 0) when no band counts or
    nothing beats no stretch. Ties go to the smaller stretch."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 1 or not (np.isfinite(pred).all() and np.isfinite(true).all()):
        raise ValueError("fit_age_stretch needs matching, finite 1-D predicted and true ages")
    best = (balanced_mae(pred, true), 0.0, 0.0)
    if math.isnan(best[0]):
        return 0.0, 0.0
    for pivot in STRETCH_PIVOTS:
        for stretch in STRETCHES[1:]:
            score = balanced_mae(stretch_years_numpy(pred, pivot, float(stretch), age_range), true)
            if score < best[0] - 1e-9:
                best = (score, pivot, float(stretch))
    return best[1], best[2]


def age_stretch_summary(
    pred: np.ndarray, true: np.ndarray, pivot: float, stretch: float, age_range: tuple[int, int]
) -> dict[str, Any]:
    """The fitted stretch with the MAE, the band-balanced MAE and the 60+ bias before and after it, on the faces
    it was fitted on."""
    after = stretch_years_numpy(pred, pivot, stretch, age_range)
    old = true >= 60

    def bias60(p: np.ndarray) -> float | None:
        return round(float((p - true)[old].mean()), 3) if old.any() else None

    return {
        "age_pivot": pivot,
        "age_stretch": stretch,
        "fitted_on": "val",
        "faces": len(true),
        "mae_before": round(float(np.abs(pred - true).mean()), 3),
        "mae_after": round(float(np.abs(after - true).mean()), 3),
        "balanced_mae_before": round(balanced_mae(pred, true), 3),
        "balanced_mae_after": round(balanced_mae(after, true), 3),
        "bias_60_plus_before": bias60(pred),
        "bias_60_plus_after": bias60(after),
    }


def calibrate_checkpoint(
    path: Path, logits: np.ndarray, y: np.ndarray, ages: np.ndarray | None = None, true_ages: np.ndarray | None = None
) -> CheckpointMeta:
    """Fit the temperature on validation ``logits`` (fp32, temperature 1) and labels, and the age stretch on the
    unstretched ``ages`` of the faces with an exact ``true_ages``, and store them in the checkpoint at ``path``: in
    its config, so every decode and export applies them, and their summaries in the metadata."""
    from ..model.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(path)
    temperature = fit_temperature(logits, y)
    meta.config.temperature = model.config.temperature = temperature
    meta.extra["calibration"] = calibration_summary(logits, y, temperature)
    log.info(
        "P(male) calibrated on %d validation faces: temperature %.3f, ECE %.4f -> %.4f",
        len(y),
        temperature,
        meta.extra["calibration"]["ece_before"],
        meta.extra["calibration"]["ece_after"],
    )
    if ages is not None and true_ages is not None and len(true_ages):
        age_range = (meta.config.age_min, meta.config.age_max)
        pivot, stretch = fit_age_stretch(ages, true_ages, age_range)
        for cfg in (meta.config, model.config):
            cfg.age_pivot, cfg.age_stretch = pivot, stretch
        summary = meta.extra["age_calibration"] = age_stretch_summary(ages, true_ages, pivot, stretch, age_range)
        log.info(
            "ages calibrated on %d validation faces: stretch %.2f above %g years, band-balanced MAE %.2f -> %.2f",
            len(true_ages),
            stretch,
            pivot,
            summary["balanced_mae_before"],
            summary["balanced_mae_after"],
        )
    save_checkpoint(path, model, meta)
    return meta
