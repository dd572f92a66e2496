"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest

from agegender.errors import AgeGenderError
from agegender.train import metrics as m

# 9 faces, male = 1: tp=3, fn=2 (males called female), fp=1 (female called male), tn=3.
Y_TRUE = [1, 1, 1, 1, 1, 0, 0, 0, 0]
Y_PRED = [1, 1, 1, 0, 0, 1, 0, 0, 0]


def test_confusion_matrix_by_hand():
    cm = m.confusion_matrix(Y_TRUE, Y_PRED)
    assert cm.tolist() == [[3, 1], [2, 3]]  # rows true (female, male), columns predicted
    assert m.confusion_matrix([0, 2, 1], [2, 2, 0], n_classes=3).tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 1]]


def test_classification_report_by_hand():
    r = m.classification_report(Y_TRUE, Y_PRED)
    male, female = r["per_class"]["male"], r["per_class"]["female"]
    assert male["precision"] == pytest.approx(3 / 4)  # tp / (tp + fp)
    assert male["recall"] == pytest.approx(3 / 5)  # tp / (tp + fn)
    assert male["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert male["support"] == 5
    assert female["precision"] == pytest.approx(3 / 5)
    assert female["recall"] == pytest.approx(3 / 4)
    assert female["support"] == 4
    assert r["accuracy"] == pytest.approx(6 / 9)
    assert r["macro_avg"]["precision"] == pytest.approx((0.75 + 0.6) / 2)
    assert r["weighted_avg"]["precision"] == pytest.approx((0.6 * 4 + 0.75 * 5) / 9)
    assert r["weighted_avg"]["recall"] == pytest.approx(r["accuracy"])  # always true for weighted recall
    assert r["macro_avg"]["support"] == r["weighted_avg"]["support"] == 9
    assert r["confusion_matrix"] == [[3, 1], [2, 3]]
    assert r["labels"] == ["female", "male"]


def test_zero_division_is_zero():
    # No males at all: male precision and recall are 0/0.
    r = m.classification_report([0, 0, 0], [0, 0, 0])
    assert r["per_class"]["male"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["per_class"]["female"]["f1"] == 1.0
    assert r["macro_avg"]["f1"] == pytest.approx(0.5)
    assert r["weighted_avg"]["f1"] == pytest.approx(1.0)
    # Males present but never predicted: precision 0/0 -> 0.
    r = m.classification_report([0, 1, 1], [0, 0, 0])
    assert r["per_class"]["male"]["precision"] == 0.0
    assert r["per_class"]["female"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["female"]["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        ([0, 1], [0, 1, 1]),  # length mismatch
        ([0, 2], [0, 1]),  # label out of range
        ([], []),
        (["f", "m"], [0, 1]),
        ([0.5, 1.0], [0, 1]),
    ],
)
def test_bad_labels_raise(y_true, y_pred):
    with pytest.raises(AgeGenderError):
        m.classification_report(y_true, y_pred)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.5 + 0.3 * y, 1)  # rounding makes many ties, also across classes
    assert len(np.unique(s)) < 20
    assert m.roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_roc_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert m.roc_auc(y, s) == pytest.approx(0.75)
    fpr, tpr, thr = m.roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thr[0] == np.inf and thr[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    assert m.roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5  # all tied: one diagonal segment
    fpr, tpr, _ = m.roc_curve([0, 1, 0, 1], [0.5] * 4)
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]
    assert m.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0


def test_roc_needs_both_classes():
    with pytest.raises(AgeGenderError, match="both classes"):
        m.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(AgeGenderError):
        m.roc_auc([0, 1], [0.2, np.nan])


def test_ece_by_hand_and_bins():
    p, y = [0.2, 0.2, 0.8, 0.8], [0, 0, 1, 0]
    # bin [0, .5): mean .2, fraction 0 -> gap .2; bin [.5, 1]: mean .8, fraction .5 -> gap .3.
    assert m.expected_calibration_error(y, p, n_bins=2) == pytest.approx((0.2 * 2 + 0.3 * 2) / 4)
    b = m.calibration_bins([0, 1, 1], [0.0, 1.0, 0.95], n_bins=10)
    assert b["count"].tolist() == [1] + [0] * 8 + [2]  # 1.0 lands in the last bin
    assert np.isnan(b["mean_predicted"][1]) and b["fraction_positive"][9] == 1.0
    assert b["lower"][0] == 0 and b["upper"][-1] == 1
    with pytest.raises(AgeGenderError):
        m.calibration_bins([0, 1], [0.5, 1.2])


def test_ece_calibrated_vs_miscalibrated():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)  # outcomes drawn with exactly the stated probability
    assert m.expected_calibration_error(y, p) < 0.01
    # Says 0.9 but only 60% are positive.
    y_over = np.r_[np.ones(60), np.zeros(40)]
    assert m.expected_calibration_error(y_over, np.full(100, 0.9)) == pytest.approx(0.3)
    assert m.expected_calibration_error(y, p**3) > 0.1


def test_mae_and_cumulative_score():
    t, p = [10, 20, 30, 40], [12, 26, 30, 35]  # errors 2, 6, 0, 5
    assert m.mae(t, p) == pytest.approx(13 / 4)
    assert m.cumulative_score(t, p) == pytest.approx(3 / 4)  # |err| = 5 counts
    assert m.cumulative_score(t, p, k=1) == pytest.approx(1 / 4)
    with pytest.raises(AgeGenderError):
        m.mae([10, np.nan], [10, 12])
    with pytest.raises(AgeGenderError):
        m.mae([10, 20], [10])
    with pytest.raises(AgeGenderError, match="numbers"):
        m.mae(["ten"], [10])


@pytest.mark.parametrize(
    "age, group",
    [
        (0, 0),
        (2, 0),
        (2.5, 0),
        (3, 0),
        (4, 1),
        (6, 1),
        (7, 1),
        (8, 2),
        (13, 2),
        (14, 2),
        (15, 3),
        (20, 3),
        (21, 3),
        (22, 3),
        (23, 4),
        (24, 4),
        (25, 4),
        (32, 4),
        (33, 4),
        (34, 4),
        (35, 4),
        (36, 5),
        (37, 5),
        (43, 5),
        (44, 5),
        (45, 5),
        (46, 6),
        (47, 6),
        (53, 6),
        (54, 6),
        (55, 6),
        (56, 6),
        (57, 7),
        (58, 7),
        (59, 7),
        (60, 7),
        (90, 7),
        (-3, 0),
    ],
)
def test_age_group_edges(age, group):
    assert m.age_group(age) == group
    assert m.age_groups([age]).tolist() == [group]


def test_vectorised_age_groups_match_scalar_rule():
    ages = np.arange(-2, 100, 0.25)
    assert m.age_groups(ages).tolist() == [m.age_group(a) for a in ages]


def test_age_group_names_and_group_accuracy():
    assert [m.ADIENCE_GROUP_NAMES[i] for i in (0, 3, 7)] == ["0-2", "15-20", "60+"]
    # groups true 0, 1, 4, 7, 0; predicted 0, 2, 5, 7, 3 -> gaps 0, 1, 1, 0, 3
    g = m.group_accuracy([1, 5, 30, 70, 1], [3, 10, 40, 61, 20])
    assert g == {"exact": pytest.approx(2 / 5), "one_off": pytest.approx(4 / 5)}


def _sliced_example():
    race = ["a"] * 12 + ["b"] * 15 + ["c"] * 3 + [""] * 5
    correct = [1] * 6 + [0] * 6 + [1] * 15 + [0] * 3 + [1] * 5
    y_true = np.ones(len(race), dtype=int)
    return y_true, np.array(correct), np.array(race)


def test_sliced_accuracy_and_worst_slice():
    y_true, y_pred, race = _sliced_example()
    s = m.sliced_accuracy(y_true, y_pred, {"race": race})
    assert s == {
        "race": {"a": {"n": 12, "accuracy": 0.5}, "b": {"n": 15, "accuracy": 1.0}, "c": {"n": 3, "accuracy": 0.0}}
    }  # "" (unlabelled) left out
    overall = 26 / 35
    w = m.worst_slice(s, overall, min_n=10)
    assert (w["slice"], w["value"], w["n"]) == ("race", "a", 12)
    assert w["gap"] == pytest.approx(overall - 0.5)
    assert m.worst_slice(s, overall, min_n=3)["value"] == "c"
    assert m.worst_slice(s, overall, min_n=100) is None
    with pytest.raises(AgeGenderError):
        m.sliced_accuracy(y_true, y_pred, {"race": race[:-1]})


def test_sliced_accuracy_orders_age_groups_numerically():
    groups = np.array(["60+", "4-6", "15-20", "0-2"])
    s = m.sliced_accuracy(np.zeros(4), np.zeros(4), {"age": groups})
    assert list(s["age"]) == ["0-2", "4-6", "15-20", "60+"]


def test_bootstrap_ci():
    y_true = np.ones(400, dtype=int)
    y_pred = np.r_[np.ones(320), np.zeros(80)].astype(int)  # accuracy 0.8
    lo, hi = m.bootstrap_ci(y_true, y_pred)
    assert lo < 0.8 < hi
    half = 1.96 * np.sqrt(0.8 * 0.2 / 400)  # normal approximation
    assert lo == pytest.approx(0.8 - half, abs=0.01) and hi == pytest.approx(0.8 + half, abs=0.01)
    assert m.bootstrap_ci(y_true, y_pred) == (lo, hi)  # seeded
    assert m.bootstrap_ci(y_true, y_pred, seed=1) != (lo, hi)
    assert m.bootstrap_ci(y_true, y_true, n=50) == (1.0, 1.0)


def test_interval_scores_by_hand():
    from agegender.train.metrics import interval_scores

    low = [20, 20, 20, 30, 70, 0]
    high = [29, 29, 29, 39, np.inf, 2]
    pred = [29.9, 30.5, 15.0, 45.0, 90.0, 3.0]
    s = interval_scores(low, high, pred)
    # inside: 29.9 (holds to 29.99), 90 (70+); 30.5 is 0.5 above, 15 is 5 below, 45 is 5 above, 3.0 is 0 above 2.99...
    assert s["exact"] == pytest.approx(2 / 6)
    assert s["years_outside"] == pytest.approx((0 + 0.5 + 5 + 5 + 0 + 0) / 6)
    # groups 0-2, 20-29, 30-39, 70+: 30.5 -> 30-39 (one off), 15 -> 20-29 is nearer than 0-2 (exact group),
    # 45 -> 30-39 (exact group, though outside), 3.0 -> 0-2
    assert s["one_off"] == 1.0
    assert s["per_group"]["20-29"] == {"n": 3, "exact": pytest.approx(1 / 3), "mean_predicted": pytest.approx(25.1333, abs=1e-3)}
    with pytest.raises(AgeGenderError):
        interval_scores([30], [20], [25])


def test_age_error_by_band_by_hand() -> None:
    """Bands of the true age; the mean error keeps its sign, so a pull towards the middle shows."""
    from agegender.train.metrics import age_error_by_band

    bands = age_error_by_band([5, 8, 72, 79, 80], [9, 10, 66, 75, 80], width=10)
    assert list(bands) == ["0-9", "70-79", "80-89"]
    assert bands["0-9"] == {"n": 2, "mae": 3.0, "mean_error": 3.0}
    assert bands["70-79"] == {"n": 2, "mae": 5.0, "mean_error": -5.0}
    assert bands["80-89"] == {"n": 1, "mae": 0.0, "mean_error": 0.0}
