"""Label audit: planted label flips are found, the command writes its list and sheet and never overwrites, the
exclusion list leaves files out, and a missing cleanlab is one clear line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.cli import main
from agegender.data.records import scan_all
from agegender.data.synthetic import make_csv_folder, make_vgg_face_state, save_vgg_face
from agegender.errors import AgeGenderError

TINY = (16, 32, 32, 64, 64)
needs_cleanlab = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("cleanlab", "sklearn")),
    reason="cleanlab and scikit-learn are not installed (pip install 'agegender[audit]')",
)


def _planted(n: int, k: int, flips: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features of ``k`` separable-but-noisy classes, labels with ``flips`` of them changed to another class."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    centres = rng.normal(0, 1.5, (k, 24))
    x = centres[truth] + rng.normal(0, 1, (n, 24))
    flipped = rng.choice(n, flips, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, k, flips)) % k
    return x, truth, given, flipped


@needs_cleanlab
@pytest.mark.parametrize("k", [2, 4])
def test_the_audit_finds_most_planted_flips_and_little_else(k: int) -> None:
    from agegender.train.audit import find_issues, out_of_sample_probs

    x, _, given, flipped = _planted(1500, k, 45, seed=k)
    people = [f"p{i // 3}" for i in range(len(given))]  # three photos a person: the grouped folds
    probs = out_of_sample_probs(x, given, people, folds=5, classes=k)
    assert probs.shape == (1500, k) and np.allclose(probs.sum(axis=1), 1)
    found = find_issues(given, probs)
    hits = len(set(found.tolist()) & set(flipped.tolist()))
    assert hits >= 0.8 * len(flipped), (hits, len(found))
    assert len(found) - hits <= 0.25 * len(flipped), (hits, len(found))
    # Ranked most certain first: the flips come before the rest.
    first = found[: len(found) // 2]
    assert np.isin(first, flipped).mean() > 0.9


@needs_cleanlab
def test_folds_never_split_a_person() -> None:
    """Two photos of each person, with identical features: grouped folds judge both by one model that saw neither,
    so both get the same probabilities; ungrouped folds would judge each by a model that saw the other."""
    from agegender.train.audit import out_of_sample_probs

    x, _, given, _ = _planted(400, 2, 0, seed=5)
    x = np.repeat(x, 2, axis=0)
    given = np.repeat(given, 2)
    people = [f"p{i // 2}" for i in range(len(given))]
    probs = out_of_sample_probs(x, given, people, folds=4)
    assert np.allclose(probs[0::2], probs[1::2])


def test_age_groups_of_exact_ages_and_intervals() -> None:
    from agegender.data.records import FaceRecord
    from agegender.train.audit import AGE_GROUP_NAMES, age_group_of

    def group(age: int | None, interval: tuple[int, int | None] | None = None) -> str | None:
        g = age_group_of(FaceRecord(Path("a.jpg"), 0, age, "x", age_interval=interval))
        return None if g is None else AGE_GROUP_NAMES[g]

    assert [group(a) for a in (0, 2, 3, 19, 20, 69, 70, 116)] == ["0-2", "0-2", "3-9", "10-19", "20-29", "60-69", "70+", "70+"]
    assert group(24, (20, 29)) == "20-29" and group(70, (70, None)) == "70+"
    assert group(None) is None and group(30, (25, 35)) is None  # not one of the groups: not audited for age


@pytest.fixture(scope="module")
def flipped_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated faces in a labels.csv folder with four genders flipped, and tiny VGG-Face weights."""
    root = tmp_path_factory.mktemp("audit")
    data = make_csv_folder(root / "faces", n=120, seed=2, size=64)
    rows = list(csv.DictReader((data / "labels.csv").open()))
    for row in rows[1:9:2]:  # one photo of each of four people
        row["gender"] = "F" if row["gender"] == "M" else "M"
    with (data / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_vgg_face(root / "w.safetensors", make_vgg_face_state(widths=TINY, fc=16, classes=4, seed=1))
    return {"data": data, "weights": root / "w.safetensors", "root": root, "flipped": {r["path"] for r in rows[1:9:2]}}  # type: ignore[dict-item]


def _audit(world: dict[str, Path], out: Path, *extra: str) -> int:
    return main(
        [
            "audit",
            "--data",
            str(world["data"]),
            "--out",
            str(out),
            "--backbone",
            "vgg-face",
            "--weights",
            str(world["weights"]),
            "--folds",
            "3",
            "--precision",
            "fp32",
            "--sheet",
            "12",
            "--cache-dir",
            str(world["root"] / "cache"),
            *extra,
        ]
    )


@needs_cleanlab
def test_cli_writes_the_list_the_sheet_and_never_overwrites(flipped_folder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "audit"
    assert _audit(flipped_folder, out) == 0
    assert "label issues:" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "label_issues.csv").open()))
    assert rows and set(rows[0]) == {"rank", "label", "dataset", "file", "given", "suggested", "p_suggested", "p_given", "path"}
    gender = [r for r in rows if r["label"] == "gender"]
    assert {r["given"] for r in gender} <= {"F", "M"} and all(r["given"] != r["suggested"] for r in gender)
    # The generated faces carry their gender plainly: the flipped labels are among the issues, first.
    assert flipped_folder["flipped"] <= {r["file"] for r in gender[:8]}, gender[:8]  # type: ignore[operator]
    with Image.open(out / "label_issues.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 120 and summary["gender"]["issues"] == len(gender)
    listed = (out / "exclude_candidates.txt").read_text().splitlines()
    assert f"faces/{gender[0]['file']}" in listed
    before = (out / "label_issues.csv").read_bytes()
    assert _audit(flipped_folder, out) == 2
    err = capsys.readouterr().err
    assert "--force" in err and err.count("\n") == 1
    assert (out / "label_issues.csv").read_bytes() == before
    assert _audit(flipped_folder, out, "--force", "--no-ages") == 0
    assert "age" not in json.loads((out / "summary.json").read_text())
    assert not (out / "age_issues.jpg").exists()  # the first run's age sheet does not outlive it


def test_a_missing_cleanlab_is_one_clear_line(flipped_folder, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cleanlab" else real(name, *a))
    assert _audit(flipped_folder, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "cleanlab" in err and "agegender[audit]" in err
    assert not (tmp_path / "a").exists()


def test_bad_audit_options_are_one_line(flipped_folder, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _audit(flipped_folder, tmp_path / "a", "--folds", "1") == 2
    assert "--folds" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert _audit(flipped_folder, tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


def test_an_exclusion_list_leaves_files_out(tmp_path: Path) -> None:
    data = make_csv_folder(tmp_path / "faces", n=10, seed=0, size=32)
    (tmp_path / "exclude.txt").write_text(
        "# known wrong labels\nimages/face_0001.jpg   # by its path\nfaces/images/face_0004.jpg\nother/images/face_0005.jpg\n\n"
    )
    kept = {r.path.name for r in scan_all([data], exclude=tmp_path / "exclude.txt").records}
    assert kept == {f"face_{i:04d}.jpg" for i in range(10)} - {"face_0001.jpg", "face_0004.jpg"}
    with pytest.raises(AgeGenderError, match="exclusion list"):
        scan_all([data], exclude=tmp_path / "missing.txt")


def test_train_takes_an_exclusion_list(tmp_path: Path) -> None:
    from agegender.train.config import TrainConfig

    args = ["train", "--data", str(tmp_path), "--exclude", str(tmp_path / "x.txt")]
    from agegender.cli import _train_config, build_parser

    cfg = _train_config(build_parser("train").parse_args(args), str(tmp_path), str(tmp_path / "run"))
    assert cfg.exclude == str(tmp_path / "x.txt")
    with pytest.raises(AgeGenderError, match="exclude"):
        TrainConfig.from_preset("default", data=str(tmp_path), init="scratch", exclude=str(tmp_path / "x.txt")).validate()
