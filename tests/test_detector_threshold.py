"""RetinaFace's score threshold: the sweep's counting and rule, its run on real photos, and one default everywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from agegender.errors import AgeGenderError
from agegender.faces.detect import SCORE_THRESHOLD
from benchmarks.detector_threshold import (
    HARD,
    REVIEW,
    THRESHOLDS,
    Scanned,
    choose,
    face_found,
    harder,
    kept,
    load_review,
    main,
    paint_out,
    parser,
    phase_scramble,
    reviewed,
    shuffle_tiles,
    sweep,
)

REPO = Path(__file__).resolve().parents[1]


def test_a_box_counts_above_the_threshold_and_the_smallest_face() -> None:
    boxes = [(0, 0, 50, 60, 0.5), (0, 0, 30, 39, 0.99), (0, 0, 45, 20, 0.51)]
    assert kept(boxes, 0.5, 40) == [(0, 0, 45, 20, 0.51)]  # 0.5 is not above 0.5 (predict's `>`); 39 px too small
    assert kept(boxes, 0.3, 30) == boxes


def test_the_face_is_found_by_a_box_over_its_point() -> None:
    photo = Scanned("p", "lfw", 250, 250, [(10, 10, 60, 60, 0.99), (80, 70, 100, 120, 0.6)], (125, 125))
    assert face_found(photo, 0.55, 40)
    assert not face_found(photo, 0.6, 40)  # the corner face does not stand for the subject
    assert not face_found(Scanned("f", "phase", 250, 250, photo.boxes), 0.3, 40)  # face-free: nothing to find


def test_sweep_counts_misses_others_and_false_positives_per_threshold() -> None:
    photos = [
        Scanned("a", "lfw", 200, 200, [(50, 50, 100, 100, 0.97), (0, 0, 50, 50, 0.4)], (100, 100)),
        Scanned("b", "blurred", 200, 200, [(60, 40, 90, 110, 0.62), (0, 0, 50, 50, 0.4)], (100, 100)),
    ]
    free = [
        Scanned("c", "background", 300, 300, [(5, 5, 80, 80, 0.52), (100, 100, 50, 50, 0.33)]),
        Scanned("d", "tiles", 200, 200, []),
    ]
    rows = {r["threshold"]: r for r in sweep(photos, free, 40)}
    assert [t for t in rows] == list(THRESHOLDS)
    assert (rows[0.3]["misses"], rows[0.3]["other_boxes"], rows[0.3]["false_positives"], rows[0.3]["fp_images"]) == (0, 1, 2, 1)
    assert rows[0.5]["false_positives"] == 1 and rows[0.5]["other_boxes"] == 0
    assert rows[0.65]["misses"] == 1 and rows[0.65]["misses_by_kind"] == {"lfw": 0, "blurred": 1}
    assert rows[0.95]["miss_rate"] == 0.5 and rows[0.95]["fp_per_image"] == 0
    assert rows[0.3]["fp_by_source"] == {"background": 2, "tiles": 0}


def test_the_rule_minimises_misses_plus_false_positives_and_ties_go_low() -> None:
    def row(t: float, miss: float, fp: float) -> dict[str, float]:
        return {"threshold": t, "miss_rate": miss, "fp_per_image": fp}

    assert choose([row(0.3, 0.01, 0.05), row(0.5, 0.01, 0.02), row(0.7, 0.02, 0.0), row(0.9, 0.05, 0.0)])["threshold"] == 0.7
    assert choose([row(0.3, 0.0, 0.01), row(0.5, 0.0, 0.0), row(0.7, 0.0, 0.0)])["threshold"] == 0.5


def test_face_free_images_keep_the_photos_statistics_but_not_its_layout() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :80]
    photo = np.stack([(xx * 3) % 256, (yy * 2) % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    scrambled = phase_scramble(photo, rng)
    assert scrambled.shape == photo.shape and scrambled.dtype == np.uint8
    assert np.abs(scrambled.astype(float).mean((0, 1)) - photo.mean((0, 1))).max() < 3
    assert np.corrcoef(scrambled[..., 0].ravel(), photo[..., 0].ravel())[0, 1] < 0.5  # the layout is gone
    tiles = shuffle_tiles(photo, rng, tile_px=10)
    side = 80 // 10 * 10
    assert tiles.shape == (side, side, 3)
    top = (96 - side) // 2
    assert sorted(map(tuple, tiles.reshape(-1, 3))) == sorted(map(tuple, photo[top : top + side].reshape(-1, 3)))
    assert not np.array_equal(tiles, photo[top : top + side])
    painted = paint_out(photo, [(-5, 10, 20.5, 30)])
    assert (painted[10:30, :21] == painted[10, 0]).all() and np.array_equal(painted[30:], photo[30:])


def test_hard_copies_move_the_face_with_the_image() -> None:
    rng = np.random.default_rng(1)
    photo = np.full((200, 160, 3), 128, np.uint8)
    face = (40.0, 50.0, 80.0, 100.0)  # centre (80, 100)
    small, point = harder(photo, face, "small", rng)
    scale = small.shape[0] / 200
    assert 48 <= 100 * scale <= 80 and point == pytest.approx((80 * scale, 100 * scale), abs=0.5)
    for _ in range(8):  # a border through the face keeps 50-75% of it: 40-60 of its 80 px width, 50-75 of 100 px
        cut, (px, py) = harder(photo, face, "partial", rng)
        h, w = cut.shape[:2]
        assert (h == 200 and 80 <= w <= 100) or (w == 160 and 100 <= h <= 125), (h, w)
        assert 0 < px < w and 0 < py < h
    for kind in ("blurred", "dark"):
        image, point = harder(photo, face, kind, rng)
        assert image.shape == photo.shape and point == (80, 100)
    assert harder(photo, face, "dark", rng)[0].max() <= 0.3 * 128 + 1
    assert set(HARD) == {"small", "partial", "blurred", "dark"}


def test_a_reviewed_face_leaves_the_face_free_set(tmp_path: Path) -> None:
    free = [
        Scanned("background:a", "background", 100, 100, [(0, 0, 50, 50, 0.6)]),
        Scanned("background:b", "background", 100, 100, [(0, 0, 50, 50, 0.6)]),
        Scanned("background:c", "background", 100, 100, [(0, 0, 20, 20, 0.6)]),  # under --min-face
        Scanned("phase:d", "phase", 100, 100, [(0, 0, 50, 50, 0.6)]),
    ]
    left, out, unreviewed = reviewed(free, {"holds_a_face": {"background:a": "a bystander"}}, 40)
    assert [f.name for f in left] == ["background:b", "background:c", "phase:d"] and out == ["background:a"]
    assert unreviewed == ["background:b"]
    assert load_review(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text('{"holds_a_face": ["x"]}')
    with pytest.raises(AgeGenderError, match="bad.json: expected holds_a_face"):
        load_review(tmp_path / "bad.json")
    review = load_review(REVIEW)  # the one kept beside the script reads
    assert review["holds_a_face"] and all(name.startswith("background:") for name in review["holds_a_face"])


def test_the_sweep_runs_on_a_few_real_photos(shared_faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--faces", str(shared_faces), "--photos", "5", "--free", "6", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "threshold.json").read_text())
    portraits = sum(n for k, n in result["face_counts"].items() if k not in HARD)
    assert portraits == 5 and 5 <= result["faces"] <= 10  # each photo, and a hard copy of each whose face is sure
    assert result["free"] + len(result["left_out"]) == 6
    assert len([i for i in result["images"] if i["target"] is None]) == 6  # 3 background, 2 phase, 1 tiles
    rows = result["rows"]
    assert [r["threshold"] for r in rows] == list(THRESHOLDS)
    misses, fps = [r["misses"] for r in rows], [r["false_positives"] for r in rows]
    assert misses == sorted(misses) and fps == sorted(fps, reverse=True)  # a higher bar finds fewer boxes
    assert result["chosen"] == choose(rows)
    assert (tmp_path / "threshold.md").read_text().startswith("## 9. RetinaFace's score threshold")
    assert (tmp_path / "false_positives.png").exists() or rows[0]["false_positives"] == 0
    assert "| threshold |" in capsys.readouterr().out


def test_without_photos_it_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmarks.detector_threshold as sweep_module

    assert main(["--faces", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "none: faces folder does not exist" in capsys.readouterr().err
    monkeypatch.delenv("AGEGENDER_FACES", raising=False)
    monkeypatch.setattr(sweep_module, "faces_dir", lambda given: None)  # no ../shared/faces beside the checkout
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no labelled photos") and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_output_defaults_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGEGENDER_HOME", str(tmp_path / "home"))
    out = Path(parser().parse_args([]).out).resolve()
    assert out.is_relative_to(tmp_path / "home") and not out.is_relative_to(REPO)


def test_one_default_threshold_for_the_cli_serve_and_the_library() -> None:
    from agegender.cli import _detector, build_parser
    from agegender.faces.detect import RetinaFace, default_detector
    from agegender.infer.ray_predict import PredictorRecipe

    for argv in (["predict", "photo.jpg"], ["serve"]):
        args = build_parser(argv[0]).parse_args(argv)
        assert args.score_threshold == SCORE_THRESHOLD
        detector = _detector(args)  # what predict and serve run
        assert isinstance(detector, RetinaFace) and detector.score_threshold == SCORE_THRESHOLD
    assert PredictorRecipe().score_threshold == SCORE_THRESHOLD  # predict --ray
    detector = default_detector()  # the library's Predictor and serve() without a detector
    assert isinstance(detector, RetinaFace) and detector.score_threshold == SCORE_THRESHOLD


def test_benchmarks_md_reports_the_default_it_chose() -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text.split("## 9. RetinaFace's score threshold", 1)
    if len(section) == 1:
        pytest.fail("BENCHMARKS.md has no score-threshold section (python -m benchmarks.detector_threshold)")
    chosen = re.search(r"Chosen: \*\*([0-9.]+)\*\*", section[1])
    assert chosen and float(chosen.group(1)) == SCORE_THRESHOLD
