"""One decode for every consumer: temperature, the age stretch, clamping, the age interval; the calibration that
fits the temperature and the stretch; the feature cache that reuses rows across runs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from agegender.model.config import ModelConfig
from agegender.model.decode import AGE_INTERVAL, decode, output_names, stretch_years_numpy
from agegender.train.calibrate import (
    age_stretch_summary,
    balanced_mae,
    calibration_summary,
    fit_age_stretch,
    fit_temperature,
)

TINY = {"widths": (4, 8, 8, 16, 16), "hidden": (8,), "dropout": (0.0,)}


def test_interval_is_the_distribution_percentiles() -> None:
    cfg = ModelConfig(**TINY, age_min=1, age_max=10)
    probs = torch.tensor([[0.04, 0.04, 0.2, 0.2, 0.2, 0.2, 0.06, 0.06, 0.0, 0.0]])
    _, age, low, high, back = decode(cfg, torch.zeros(1), probs.log())
    cdf = probs.cumsum(-1)[0]
    # the first age whose cumulative probability reaches q
    assert low.item() == 1 + int((cdf < AGE_INTERVAL[0]).sum()) == 3
    assert high.item() == 1 + int((cdf < AGE_INTERVAL[1]).sum()) == 7
    assert age.item() == pytest.approx(float((probs[0] * torch.arange(1, 11)).sum()), abs=1e-5)
    torch.testing.assert_close(back, probs)


def test_one_certain_age_gives_a_point_interval() -> None:
    cfg = ModelConfig(**TINY, age_min=1, age_max=70)
    logits = torch.full((1, 70), -50.0)
    logits[0, 33] = 50.0
    _, age, low, high, _ = decode(cfg, torch.zeros(1), logits)
    assert age.item() == pytest.approx(34) and low.item() == high.item() == 34


def test_temperature_scales_the_logit_and_regression_is_clamped() -> None:
    cfg = ModelConfig(**TINY, age_head="regression", temperature=2.0)
    p, age = decode(cfg, torch.tensor([2.0, -4.0]), torch.tensor([[5.0], [-5.0]]))
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([1.0, -2.0])))
    assert age.tolist() == [70.0, 1.0]
    assert output_names(cfg) == ["p_male", "age"]
    assert output_names(ModelConfig(**TINY, age_head="none")) == ["p_male"]


@pytest.mark.parametrize("kind", ["dex", "regression"])
def test_the_age_head_decodes_its_own_targets_back_to_the_ages(kind: str) -> None:
    """Encoding (training's targets) and decoding (every consumer's ages) live in one object and invert each
    other over the trained range; ages outside it train towards the range's ends and decode clamped."""
    from agegender.model.age_head import age_head
    from agegender.model.net import AgeGenderNet

    cfg = ModelConfig(**TINY, age_head=kind, age_min=1, age_max=90)
    head = age_head(cfg)
    assert head is not None and head.name == kind and AgeGenderNet(cfg).age.out_features == head.width  # type: ignore[union-attr]
    ages = torch.tensor([1.0, 7.0, 34.0, 90.0, 120.0, -3.0])
    targets = head.targets(ages)
    # The outputs that minimise the loss: the regression target itself; DEX's class, made certain.
    logits = targets[:, None] if kind == "regression" else torch.nn.functional.one_hot(targets, head.width) * 60.0
    decoded = decode(cfg, torch.zeros(len(ages)), logits.float())
    assert output_names(cfg) == ["p_male", *head.outputs]
    torch.testing.assert_close(decoded[1], ages.clamp(1, 90), rtol=0, atol=1e-4)
    assert float(head.loss(logits.float(), ages)) < 1e-3
    assert float(head.loss(logits.float(), ages + 10)) > float(head.loss(logits.float(), ages))
    assert age_head(ModelConfig(**TINY, age_head="none")) is None


@pytest.mark.parametrize("bad", [0.0, -1.0, 50.0, float("nan"), "2"])
def test_temperature_is_checked(bad: object) -> None:
    from agegender.errors import AgeGenderError

    with pytest.raises(AgeGenderError, match="temperature"):
        ModelConfig(**TINY, temperature=bad)  # type: ignore[arg-type]


def test_fit_temperature_recovers_a_known_one() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logits))).astype(float)
    overconfident = true_logits * 3.0  # a model three times too sure of itself
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.08)
    summary = calibration_summary(overconfident, y, t)
    assert summary["ece_after"] < summary["ece_before"] and summary["nll_after"] < summary["nll_before"]
    with pytest.raises(ValueError):
        fit_temperature(np.array([np.nan]), np.array([1.0]))


@pytest.mark.parametrize("kind", ["dex", "regression"])
def test_the_age_stretch_moves_the_age_alone(kind: str) -> None:
    """The age above the pivot is stretched, then clamped to the trained range; the interval's ends (the
    distribution's percentiles), the distribution and P(male) are untouched."""
    plain = ModelConfig(**TINY, age_head=kind, age_min=1, age_max=90)
    cfg = ModelConfig(**TINY, age_head=kind, age_min=1, age_max=90, age_pivot=40, age_stretch=0.25)
    torch.manual_seed(0)
    logits = torch.randn(64, 90 if kind == "dex" else 1) * (3 if kind == "dex" else 1)
    before, after = decode(plain, torch.zeros(64), logits), decode(cfg, torch.zeros(64), logits)
    np.testing.assert_allclose(after[1].numpy(), stretch_years_numpy(before[1].numpy(), 40, 0.25, (1, 90)), rtol=0, atol=1e-4)
    for a, b in zip(before[:1] + before[2:], after[:1] + after[2:], strict=True):  # all but the age
        torch.testing.assert_close(a, b)
    assert (after[1] >= before[1]).all() and (after[1] > before[1]).any() and after[1].max() <= 90
    from agegender.model.net import decode_age

    torch.testing.assert_close(decode_age(cfg, logits), after[1])


@pytest.mark.parametrize("field,bad", [("age_stretch", -0.1), ("age_stretch", 1.5), ("age_pivot", -1), ("age_pivot", "40")])
def test_the_age_stretch_is_checked(field: str, bad: object) -> None:
    from agegender.errors import AgeGenderError

    with pytest.raises(AgeGenderError, match=field):
        ModelConfig(**TINY, **{field: bad})  # type: ignore[arg-type]


def test_fit_age_stretch_undoes_a_pull_towards_the_middle_and_leaves_honest_ages_alone() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 90, 5000).round()
    honest = true + rng.normal(0, 3, len(true))
    # A head that pulls ages above 35 a third of the way back towards 35 (the old under-aged, as DEX does).
    pulled = np.where(honest > 35, 35 + (honest - 35) / 1.5, honest)
    pivot, stretch = fit_age_stretch(pulled, true, (1, 90))
    assert 30 <= pivot <= 40 and 0.3 <= stretch <= 0.5
    summary = age_stretch_summary(pulled, true, pivot, stretch, (1, 90))
    assert summary["balanced_mae_after"] < summary["balanced_mae_before"] - 1
    assert abs(summary["bias_60_plus_after"]) < 1 < -summary["bias_60_plus_before"]
    assert fit_age_stretch(honest, true, (1, 90))[1] <= 0.05  # noise, against 0.3-0.5 for the pulled ages
    # Too few faces in every band: nothing to weigh, so no stretch.
    assert fit_age_stretch(pulled[:5], true[:5], (1, 90)) == (0.0, 0.0)
    assert np.isnan(balanced_mae(pulled[:5], true[:5]))
    with pytest.raises(ValueError):
        fit_age_stretch(np.array([np.nan]), np.array([30.0]), (1, 90))


def test_feature_cache_reuses_rows_across_record_sets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run over A then one over A+B extracts only B's images, and gives A's rows unchanged."""
    from PIL import Image

    from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
    from agegender.data import features as F
    from agegender.data.records import FaceRecord
    from agegender.model.net import AgeGenderNet

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, image_size=32)
    model = AgeGenderNet(cfg).eval()
    pre = VGG_FACE_PREPROCESS.resized(32)
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        records.append(FaceRecord(path, i % 2, 20 + i, str(i)))
    calls: list[int] = []
    extract = F.extract_features

    def counting(model: AgeGenderNet, recs: list, *args: object, **kwargs: object) -> F.FeatureSet:
        calls.append(len(recs))
        return extract(model, recs, *args, **kwargs)  # type: ignore[arg-type]

    cache = tmp_path / "cache"
    F.extract_features = counting  # type: ignore[assignment]
    try:
        first = F.cached_features(model, records[:4], pre, cache, progress=False, workers=1)
        with caplog.at_level(logging.INFO, logger="agegender.data.features"):
            both = F.cached_features(model, records[2:], pre, cache, progress=False, workers=1)
        again = F.cached_features(model, records[::-1], pre, cache, progress=False, workers=1)
    finally:
        F.extract_features = extract  # type: ignore[assignment]
    assert calls == [4, 2]  # the second run extracted images 4 and 5 only; the third nothing
    assert "2 of 4 images known" in caplog.text
    torch.testing.assert_close(both.features[:2], first.features[2:])
    torch.testing.assert_close(again.features, torch.cat([both.features.flip(0)[:4], first.features[:2].flip(0)]))
    assert again.cached and bool(again.ok.all())
