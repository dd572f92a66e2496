"""Evaluation metrics as pure NumPy functions: gender classification, calibration, age error and sliced accuracy.

Bad inputs (length mismatch, empty arrays, labels out of range, non-finite values) raise ``AgeGenderError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import AgeGenderError

# The Adience brackets and the scalar age_group rule live with the data; re-exported for metric users.
from ..labels import ADIENCE_GROUP_NAMES as ADIENCE_GROUP_NAMES
from ..labels import ADIENCE_GROUPS as ADIENCE_GROUPS
from ..labels import age_group as age_group


def _labels(name: str, y: ArrayLike, n_classes: int) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.size == 0:
        raise AgeGenderError(f"metrics: {name} must be a non-empty 1-D array (got shape {a.shape})")
    if (
        a.dtype != bool
        and not np.issubdtype(a.dtype, np.integer)
        and not (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)))
    ):
        raise AgeGenderError(f"metrics: {name} must hold integer class labels")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= n_classes:
        raise AgeGenderError(f"metrics: {name} has labels outside 0..{n_classes - 1}")
    return a


def _floats(name: str, x: ArrayLike) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise AgeGenderError(f"metrics: {name} must hold numbers") from None
    if a.ndim != 1 or a.size == 0:
        raise AgeGenderError(f"metrics: {name} must be a non-empty 1-D array (got shape {a.shape})")
    if not np.all(np.isfinite(a)):
        raise AgeGenderError(f"metrics: {name} has NaN or infinite values")
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise AgeGenderError(f"metrics: arrays differ in length ({', '.join(f'{k}={n}' for k, n in lengths.items())})")


def _div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int = 2) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class."""
    t, p = _labels("y_true", y_true, n_classes), _labels("y_pred", y_pred, n_classes)
    _same_length(y_true=t, y_pred=p)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_report(y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[str] = ("female", "male")) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, accuracy, macro and support-weighted averages, confusion matrix.

    A ratio with a zero denominator (a class never predicted, or absent from ``y_true``) is reported as 0.0,
    so such a class pulls the macro average down rather than vanishing from it.
    """
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(labels):
        precision, recall = _div(tp[i], predicted[i]), _div(tp[i], support[i])
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _div(2 * precision * recall, precision + recall),
            "support": int(support[i]),
        }
    total = int(cm.sum())
    keys = ("precision", "recall", "f1")
    return {
        "labels": list(labels),
        "per_class": per_class,
        "accuracy": _div(tp.sum(), total),
        "macro_avg": {k: float(np.mean([c[k] for c in per_class.values()])) for k in keys} | {"support": total},
        "weighted_avg": {k: _div(sum(c[k] * c["support"] for c in per_class.values()), total) for k in keys} | {"support": total},
        "confusion_matrix": cm.tolist(),
    }


def _binary_scores(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, s = _labels("y_true", y_true, 2), _floats("scores", scores)
    _same_length(y_true=t, scores=s)
    if t.min() == t.max():
        raise AgeGenderError("metrics: ROC needs both classes in y_true")
    return t, s


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for "positive when score >= threshold", one point per distinct score, starting at (0, 0).

    Tied scores move together, so a tie contributes a diagonal segment (half credit), as in Mann-Whitney.
    The first threshold is +inf (nothing predicted positive).
    """
    t, s = _binary_scores(y_true, scores)
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC by the trapezoid rule; equals P(score_pos > score_neg) + 0.5 P(tie)."""
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def calibration_bins(y_true: ArrayLike, p: ArrayLike, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability-diagram data for the positive-class probability ``p`` over ``n_bins`` equal-width bins.

    Bins are [lo, hi) except the last, which includes 1.0. Empty bins have count 0 and NaN means.
    """
    t, q = _labels("y_true", y_true, 2), _floats("p", p)
    _same_length(y_true=t, p=q)
    if n_bins < 1:
        raise AgeGenderError(f"metrics: n_bins must be at least 1 (got {n_bins})")
    if q.min() < 0 or q.max() > 1:
        raise AgeGenderError("metrics: probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.minimum((q * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=q, minlength=n_bins) / count
        frac = np.bincount(idx, weights=t, minlength=n_bins) / count
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "mean_predicted": mean_p, "fraction_positive": frac}


def expected_calibration_error(y_true: ArrayLike, p: ArrayLike, n_bins: int = 15) -> float:
    """Count-weighted mean |fraction positive - mean predicted| over the bins of ``calibration_bins``.

    This calibrates the positive-class probability itself (not the top-label confidence), which is what the
    reliability diagram of ``p_male`` shows.
    """
    b = calibration_bins(y_true, p, n_bins)
    used = b["count"] > 0
    gaps = np.abs(b["fraction_positive"][used] - b["mean_predicted"][used])
    return float(np.sum(gaps * b["count"][used]) / b["count"].sum())


def _ages(age_true: ArrayLike, age_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, p = _floats("age_true", age_true), _floats("age_pred", age_pred)
    _same_length(age_true=t, age_pred=p)
    return t, p


def mae(age_true: ArrayLike, age_pred: ArrayLike) -> float:
    t, p = _ages(age_true, age_pred)
    return float(np.mean(np.abs(t - p)))


def cumulative_score(age_true: ArrayLike, age_pred: ArrayLike, k: float = 5) -> float:
    """Fraction of faces with absolute age error <= k years (CS@k)."""
    t, p = _ages(age_true, age_pred)
    return float(np.mean(np.abs(t - p) <= k))


def age_error_by_band(age_true: ArrayLike, age_pred: ArrayLike, width: int = 10) -> dict[str, dict[str, float]]:
    """Per band of ``width`` years of the true age ("0-9", "10-19", ...): faces, MAE and the mean signed error
    (negative: too young). A head's pull towards the middle shows as a positive error for the young and a
    negative one for the old."""
    t, p = _ages(age_true, age_pred)
    band = np.floor(t / width).astype(int)
    return {
        f"{b * width}-{b * width + width - 1}": {
            "n": int(m.sum()),
            "mae": float(np.abs(p[m] - t[m]).mean()),
            "mean_error": float((p[m] - t[m]).mean()),
        }
        for b in np.unique(band)
        for m in [band == b]
    }


def age_groups(ages: ArrayLike) -> np.ndarray:
    """``data.age_group`` for an array: nearest bracket, ties to the younger, 60+ open-ended.

    A regressor may predict below 0; such ages fall in the first bracket.
    """
    a = _floats("ages", np.atleast_1d(ages))
    lo = np.array([g[0] for g in ADIENCE_GROUPS], dtype=np.float64)
    hi = np.array([np.inf if g[1] is None else g[1] for g in ADIENCE_GROUPS], dtype=np.float64)
    distance = np.maximum(np.maximum(lo - a[:, None], a[:, None] - hi), 0.0)
    return np.argmin(distance, axis=1)  # argmin takes the first minimum: ties go to the younger bracket


def group_accuracy(age_true: ArrayLike, age_pred: ArrayLike) -> dict[str, float]:
    """Adience group accuracy: same group ("exact") and at most one group apart ("one_off")."""
    t, p = _ages(age_true, age_pred)
    gap = np.abs(age_groups(t) - age_groups(p))
    return {"exact": float(np.mean(gap == 0)), "one_off": float(np.mean(gap <= 1))}


def _numeric_first(value: str) -> tuple[int, float, str]:
    m = re.match(r"\d+(\.\d+)?", value)
    return (0, float(m.group()), value) if m else (1, 0.0, value)


def sliced_accuracy(
    y_true: ArrayLike, y_pred: ArrayLike, slices: Mapping[str, ArrayLike]
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Accuracy within each value of each slice: ``{slice: {value: {"n", "accuracy"}}}``.

    Values are compared as strings; the empty string means "unlabelled" and is left out. Values that start with
    a number (age groups such as "4-6", "15-20") are ordered by that number, the rest alphabetically.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    _same_length(y_true=t, y_pred=p)
    correct = t == p
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, values in slices.items():
        v = np.asarray(values).astype(str)
        if v.shape != correct.shape:
            raise AgeGenderError(f"metrics: slice {name!r} has {v.size} labels for {correct.size} predictions")
        out[name] = {}
        for value in sorted(set(v.tolist()) - {""}, key=_numeric_first):
            hit = correct[v == value]
            out[name][value] = {"n": int(hit.size), "accuracy": float(hit.mean())}
    return out


def worst_slice(
    sliced: Mapping[str, Mapping[str, Mapping[str, float | int]]], overall: float, min_n: int = 10
) -> dict[str, Any] | None:
    """The group with the lowest accuracy among those with at least ``min_n`` faces, and its gap to ``overall``.

    ``gap`` is overall minus group accuracy (positive = the group does worse). None if no group qualifies.
    """
    candidates = [
        (g["accuracy"], name, value, g["n"]) for name, groups in sliced.items() for value, g in groups.items() if g["n"] >= min_n
    ]
    if not candidates:
        return None
    acc, name, value, n = min(candidates)
    return {"slice": name, "value": value, "n": n, "accuracy": acc, "gap": float(overall - acc)}


def bootstrap_ci(y_true: ArrayLike, y_pred: ArrayLike, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval for accuracy, resampling faces with replacement."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    _same_length(y_true=t, y_pred=p)
    if t.size == 0 or n < 1 or not 0 < level < 1:
        raise AgeGenderError("metrics: bootstrap needs predictions, n >= 1 and 0 < level < 1")
    correct = (t == p).astype(np.float64)
    rng = np.random.default_rng(seed)
    # Chunked so that n resamples of a large test set never materialise at once.
    chunk = max(1, 2_000_000 // correct.size)
    accs = np.concatenate(
        [correct[rng.integers(0, correct.size, (min(chunk, n - i), correct.size))].mean(axis=1) for i in range(0, n, chunk)]
    )
    lo, hi = np.quantile(accs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval_scores(low: ArrayLike, high: ArrayLike, age_pred: ArrayLike) -> dict[str, Any]:
    """Age-group labels scored as groups: an interval ``[low, high]`` of whole years (``high`` inf: open-ended,
    as "70+") holds every age from ``low`` up to, not including, ``high + 1``.

    ``exact``: the prediction lies in the labelled group; ``one_off``: in it or in a neighbouring one (the groups
    being the distinct labelled intervals, ordered by their low end; a prediction between two groups belongs to
    the nearer); ``years_outside``: mean distance from the prediction to the labelled group (0 inside it).
    ``per_group``: ``{name: {"n", "exact", "mean_predicted"}}``.
    """
    lo, p = _floats("low", low), _floats("age_pred", age_pred)
    hi = np.asarray(high, dtype=np.float64)
    _same_length(low=lo, high=hi, age_pred=p)
    if np.isnan(hi).any() or (hi < lo).any():
        raise AgeGenderError("metrics: every age interval needs low <= high")
    end = hi + 1  # whole years: "20-29" holds 29.9
    inside = (p >= lo) & (p < end)
    outside = np.maximum(np.maximum(lo - p, p - end), 0.0)
    groups = sorted(set(zip(lo.tolist(), end.tolist())))
    g_lo = np.array([g[0] for g in groups])
    g_end = np.array([g[1] for g in groups])
    distance = np.maximum(np.maximum(g_lo - p[:, None], p[:, None] - g_end), 0.0)
    predicted = np.argmin(distance, axis=1)
    labelled = np.array([groups.index(g) for g in zip(lo.tolist(), end.tolist())])
    gap = np.abs(predicted - labelled)
    per_group: dict[str, dict[str, float | int]] = {}
    for i, (a, b) in enumerate(groups):
        mine = labelled == i
        name = f"{int(a)}+" if b == np.inf else f"{int(a)}-{int(b) - 1}"
        per_group[name] = {"n": int(mine.sum()), "exact": float(np.mean(inside[mine])), "mean_predicted": float(np.mean(p[mine]))}
    return {
        "n": int(p.size),
        "exact": float(np.mean(inside)),
        "one_off": float(np.mean(gap <= 1)),
        "years_outside": float(np.mean(outside)),
        "per_group": per_group,
    }
