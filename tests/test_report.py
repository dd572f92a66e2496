"""Report building and writing on small synthetic predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agegender.errors import AgeGenderError
from agegender.train.report import (
    SEED_REPORTED,
    Predictions,
    build_report,
    plot_training_curves,
    render_markdown,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROTOCOL = {
    "data_source": "toy",
    "kind": "agegender",
    "split": "identity",
    "counts": {"train": 500, "test": 160},
    "leaked_identities": 0,
    "skipped_images": {"count": 2, "first": ["bad1.jpg", "bad2.jpg"]},
}
HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.7 + 0.05 * e, "val_age_mae": 10 - e}
    for e in (1, 2, 3)
]


def _predictions(n: int = 160, seed: int = 0, age: bool = True) -> Predictions:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    race = rng.choice(["white", "black", "asian", ""], n).astype(object)  # as evaluate.py builds it
    p = np.clip(0.5 + (y - 0.5) * rng.uniform(0.1, 0.9, n) + rng.normal(0, 0.15, n), 0, 1)
    p[race == "black"] = 1 - p[race == "black"]  # one group the model gets mostly wrong
    age_true = rng.uniform(1, 80, n)
    age_true[:10] = np.nan
    return Predictions(
        gender_true=y,
        p_male=p,
        paths=[f"f{i}.jpg" for i in range(n)],
        age_true=age_true if age else None,
        age_pred=np.nan_to_num(age_true, nan=30.0) + rng.normal(0, 6, n) if age else None,
        race=race,
    )


def test_build_report_sections_and_values():
    pred = _predictions()
    sources = np.where(np.arange(len(pred.paths)) % 2 == 0, "imdb", "wiki")
    r = build_report(pred, PROTOCOL, sources=sources)
    assert r["protocol"] == PROTOCOL
    y_hat = (pred.p_male >= 0.5).astype(int)
    g = r["gender"]
    assert g["accuracy"] == pytest.approx(np.mean(y_hat == pred.gender_true))
    male = pred.gender_true == 1
    assert g["per_class"]["male"]["recall"] == pytest.approx(np.mean(y_hat[male] == 1))
    lo, hi = g["accuracy_ci95"]
    assert lo <= g["accuracy"] <= hi
    assert 0 < g["auc"] < 1 and 0 <= g["ece"] <= 1
    assert sum(b["count"] for b in g["calibration"]) == len(pred.paths)

    known = np.isfinite(pred.age_true)
    assert r["age"]["n"] == known.sum() == 150
    assert r["age"]["mae"] == pytest.approx(np.mean(np.abs(pred.age_true - pred.age_pred)[known]))
    bands = r["age"]["by_band"]
    assert sum(b["n"] for b in bands.values()) == 150 and next(iter(bands)) == "0-9"
    t, a = pred.age_true[known], pred.age_pred[known]
    old = (t >= 70) & (t < 80)
    assert bands["70-79"]["mean_error"] == pytest.approx(np.mean(a[old] - t[old]))
    assert bands["70-79"]["mae"] == pytest.approx(np.mean(np.abs(a[old] - t[old])))
    assert "| 70-79 |" in render_markdown(r)

    s = r["slices"]
    assert set(s["by"]) == {"age_group", "race", "source"}
    assert s["by"]["source"]["imdb"]["n"] == 80
    assert "" not in s["by"]["race"]
    assert s["worst"]["slice"] == "race" and s["worst"]["value"] == "black"
    assert s["worst"]["gap"] > 0.3

    rows = {row["metric"]: row for row in r["seed_comparison"]["rows"]}
    assert {k: row["seed"] for k, row in rows.items()} == SEED_REPORTED
    assert rows["precision"]["ours"] == g["per_class"]["male"]["precision"]
    assert rows["accuracy"]["ours"] == g["accuracy"]
    assert r["seed_comparison"]["positive_class"] == "male"

    assert build_report(pred, PROTOCOL, threshold=0.9)["gender"]["accuracy"] != g["accuracy"]
    with pytest.raises(AgeGenderError):
        build_report(pred, PROTOCOL, threshold=1.0)


@pytest.mark.slow
def test_write_report_files(tmp_path):
    pred = _predictions()
    r = build_report(pred, PROTOCOL)
    md = write_report(r, pred, tmp_path / "eval", history=HISTORY)
    out = tmp_path / "eval"
    assert md == out / "report.md"
    expected = {
        "report.json",
        "report.md",
        "predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "calibration.png",
        "age_scatter.png",
        "training_curves.png",
    }
    assert {p.name for p in out.iterdir()} == expected  # no temp files left
    back = Predictions.load_csv(out / "predictions.csv")  # the faces the report was computed from
    assert back.paths == pred.paths
    np.testing.assert_array_equal(back.p_male, pred.p_male)
    for name in expected - {"report.json", "report.md", "predictions.csv"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    loaded = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert loaded["gender"]["accuracy"] == pytest.approx(r["gender"]["accuracy"])
    assert loaded["protocol"]["skipped_images"]["first"] == ["bad1.jpg", "bad2.jpg"]

    text = md.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Protocol" and headings[-1] == "## Comparison with the seed notebook"
    assert text.rstrip().splitlines()[-1].startswith("| f1 (male) | 0.9250 |")
    assert "Worst group: **race = black**" in text
    assert "bad1.jpg" in text and "| female |" in text
    assert "![roc](roc.png)" in text


def test_report_without_age_or_both_classes(tmp_path):
    pred = _predictions(age=False)
    r = build_report(pred, {})
    assert "age" not in r and "age_group" not in r["slices"]["by"]
    write_report(r, pred, tmp_path)
    assert not (tmp_path / "age_scatter.png").exists() and not (tmp_path / "training_curves.png").exists()

    one = Predictions(gender_true=np.ones(20, int), p_male=np.linspace(0.2, 1, 20), paths=["x.jpg"] * 20)
    r = build_report(one, {})
    assert r["gender"]["auc"] is None
    md = write_report(r, one, tmp_path / "one")
    assert not (tmp_path / "one" / "roc.png").exists()
    assert "AUC n/a" in md.read_text()
    assert json.loads((tmp_path / "one" / "report.json").read_text())["gender"]["auc"] is None


def test_predictions_npz_roundtrip(tmp_path):
    pred = _predictions(n=30)
    path = pred.save_npz(tmp_path / "pred.npz")
    back = Predictions.load_npz(path)
    assert back.paths == pred.paths
    for name in ("gender_true", "p_male", "age_true", "age_pred", "race"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pred, name))
    assert [p.name for p in tmp_path.iterdir()] == ["pred.npz"]


def test_predictions_csv_roundtrip_is_exact(tmp_path):
    """Floats come back bit for bit; paths with commas, quotes, newlines or undecodable bytes come back as they
    were; age groups (open-ended included) and unknown ages survive; columns a model lacks are left out."""
    pred = _predictions(n=30)
    pred.paths[:4] = ["a,b.jpg", 'say "hi".jpg', "two\nlines.jpg", "caf\udce9.png"]
    pred.age_low = np.full(30, np.nan)
    pred.age_high = np.full(30, np.nan)
    pred.age_low[5:7], pred.age_high[5:7] = [20, 70], [29, np.inf]
    path = pred.save_csv(tmp_path / "pred.csv")
    back = Predictions.load_csv(path)
    assert back.paths == pred.paths
    for name in ("gender_true", "p_male", "age_true", "age_pred", "age_low", "age_high", "race"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pred, name), err_msg=name)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]
    plain = Predictions(gender_true=[0, 1], p_male=[0.25, 1 / 3], paths=["x.jpg", "y.jpg"])
    assert plain.save_csv(tmp_path / "plain.csv").read_text().splitlines()[0] == "path,gender_true,p_male"
    again = Predictions.load_csv(tmp_path / "plain.csv")
    assert again.age_pred is None and again.race is None and again.p_male.tolist() == [0.25, 1 / 3]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a predictions file"),
        ("path,p_male\nx,0.5\n", "not a predictions file"),
        ("path,gender_true,p_male,colour\nx,1,0.5,red\n", "not a predictions file"),
        ("path,gender_true,p_male\nx,1\n", "not a predictions file"),
        ("path,gender_true,p_male\nx,1,high\n", "could not convert"),
        ("path,gender_true,p_male\nx,1,1.5\n", "p_male"),
    ],
)
def test_a_damaged_predictions_csv_is_one_line_naming_it(tmp_path, text, why):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(AgeGenderError, match=f"bad.csv: .*{why}"):
        Predictions.load_csv(bad)


def test_predictions_validation(tmp_path):
    with pytest.raises(AgeGenderError, match="paths"):
        Predictions(gender_true=[0, 1], p_male=[0.1, 0.9], paths=["a.jpg"])
    with pytest.raises(AgeGenderError, match="p_male"):
        Predictions(gender_true=[0, 1], p_male=[0.1, 1.5], paths=["a", "b"])
    with pytest.raises(AgeGenderError, match="gender_true"):
        Predictions(gender_true=[0, 2], p_male=[0.1, 0.5], paths=["a", "b"])
    with pytest.raises(AgeGenderError, match="race"):
        Predictions(gender_true=[0, 1], p_male=[0.1, 0.5], paths=["a", "b"], race=["x"])
    with pytest.raises(AgeGenderError, match="sources"):
        build_report(Predictions(gender_true=[0, 1], p_male=[0.1, 0.5], paths=["a", "b"]), {}, sources=["x"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(AgeGenderError, match="bad.npz"):
        Predictions.load_npz(bad)
    truncated = tmp_path / "truncated.npz"
    whole = _predictions(n=50).save_npz(tmp_path / "whole.npz").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AgeGenderError, match="truncated.npz"):
        Predictions.load_npz(truncated)
    partial = tmp_path / "partial.npz"
    np.savez(partial, gender_true=np.array([0, 1]))
    with pytest.raises(AgeGenderError, match="partial.npz: .*lacks p_male, paths"):
        Predictions.load_npz(partial)


def test_plot_training_curves(tmp_path):
    path = plot_training_curves(HISTORY, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(AgeGenderError):
        plot_training_curves([], tmp_path / "empty.png")
    with pytest.raises(AgeGenderError):
        plot_training_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "nothing.png")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def _grouped(n: int = 90, seed: int = 1) -> Predictions:
    """FairFace-like labels: every face carries an age group, none an exact age."""
    rng = np.random.default_rng(seed)
    groups = [(0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, np.inf)]
    pick = rng.integers(0, len(groups), n)
    low = np.array([groups[i][0] for i in pick], dtype=float)
    high = np.array([groups[i][1] for i in pick], dtype=float)
    pred_age = np.clip(low + rng.normal(4, 6, n), 0, 100)
    return Predictions(
        gender_true=rng.integers(0, 2, n),
        p_male=rng.uniform(0, 1, n),
        paths=[f"g{i}.jpg" for i in range(n)],
        age_true=np.full(n, np.nan),
        age_pred=pred_age,
        age_low=low,
        age_high=high,
    )


def test_age_groups_are_scored_as_groups_never_as_midpoints(tmp_path):
    pred = _grouped()
    r = build_report(pred, {"kind": "json"})
    assert "age" not in r  # no MAE against a group's midpoint
    a = r["age_groups"]
    end = pred.age_high + 1
    inside = (pred.age_pred >= pred.age_low) & (pred.age_pred < end)
    assert a["n"] == 90 and a["exact"] == pytest.approx(inside.mean())
    outside = np.maximum(np.maximum(pred.age_low - pred.age_pred, pred.age_pred - end), 0)
    assert a["years_outside"] == pytest.approx(outside.mean())
    assert a["exact"] <= a["one_off"] <= 1
    assert sum(g["n"] for g in a["per_group"].values()) == 90 and "70+" in a["per_group"]
    assert set(r["slices"]["by"]["age_group"]) <= set(a["per_group"])  # the labelled groups, not Adience's
    md = write_report(r, pred, tmp_path / "g")
    text = md.read_text()
    assert "## Age groups" in text and "no MAE" in text and "MAE **" not in text
    assert not (tmp_path / "g" / "age_scatter.png").exists()  # no "true age" axis for group labels
    assert (tmp_path / "g" / "age_groups.png").read_bytes()[:8] == PNG_MAGIC
    assert "true age" not in text


def test_exact_ages_and_groups_in_one_report_are_scored_apart():
    exact, grouped = _predictions(n=60), _grouped(n=40)
    n = 100
    both = Predictions(
        gender_true=np.r_[exact.gender_true, grouped.gender_true],
        p_male=np.r_[exact.p_male, grouped.p_male],
        paths=exact.paths + grouped.paths,
        age_true=np.r_[exact.age_true, grouped.age_true],
        age_pred=np.r_[exact.age_pred, grouped.age_pred],
        age_low=np.r_[np.full(60, np.nan), grouped.age_low],
        age_high=np.r_[np.full(60, np.nan), grouped.age_high],
    )
    r = build_report(both, {})
    assert r["age"]["n"] == np.isfinite(exact.age_true).sum() and r["age_groups"]["n"] == 40
    assert r["age"]["mae"] == pytest.approx(build_report(exact, {})["age"]["mae"])
    assert sum(v["n"] for v in r["slices"]["by"]["age_group"].values()) == n - 10  # 10 exact ages unknown


def test_seed_comparison_only_for_agegender_cleaned(tmp_path):
    pred = _predictions()
    for kind in ("utkface", "csv", "agegender+utkface"):
        r = build_report(pred, {"kind": kind})
        assert "seed_comparison" not in r
        assert "seed notebook" not in write_report(r, pred, tmp_path / kind).read_text()
    assert "seed_comparison" in build_report(pred, {"kind": "agegender"})


def test_every_data_set_is_named_in_the_slices():
    pred = _predictions(n=120)
    datasets = np.repeat(["fairface", "wiki", "lfw"], 40)
    sources = np.r_[np.repeat("fairface", 40), np.repeat("wiki", 40), np.repeat("lfw", 40)]
    r = build_report(pred, {}, sources=sources, datasets=datasets)
    assert set(r["slices"]["by"]["data set"]) == {"fairface", "wiki", "lfw"}
    assert "source" not in r["slices"]["by"]  # the same grouping twice says nothing new
    mixed = np.where(np.arange(120) % 2 == 0, "imdb", "wiki")
    r = build_report(pred, {}, sources=mixed, datasets=np.repeat("agegender_cleaned", 120))
    assert "data set" not in r["slices"]["by"] and set(r["slices"]["by"]["source"]) == {"imdb", "wiki"}


def test_leakage_sentence_replaces_the_count_in_markdown(tmp_path):
    pred = _predictions()
    protocol = {
        "kind": "utkface",
        "leaked_identities": None,
        "leakage": "not measurable: the data has no person ids (160 in utkface)",
    }
    text = write_report(build_report(pred, protocol), pred, tmp_path).read_text()
    assert "leakage**: not measurable" in text and "leaked_identities" not in text


def test_training_curves_put_one_loss_in_each_panel():
    from agegender.train.report import _loss_panels

    new = [
        "train_age_loss",
        "train_gender_loss",
        "train_loss",
        "val_accuracy",
        "val_age_loss",
        "val_age_mae",
        "val_gender_loss",
        "val_loss",
    ]
    assert dict(_loss_panels(new)) == {
        "age loss": ["train_age_loss", "val_age_loss"],
        "gender loss": ["train_gender_loss", "val_gender_loss"],
    }
    old = dict(_loss_panels(["train_loss", "val_accuracy", "val_loss"]))  # runs from before the split
    assert old == {"train loss (gender + age)": ["train_loss"], "validation loss (gender)": ["val_loss"]}
