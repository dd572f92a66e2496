"""The benchmark suite: its generated tree, its arithmetic, and one tiny end-to-end run that writes both reports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.data.records import FaceRecord, scan
from agegender.errors import AgeGenderError
from benchmarks.__main__ import main, parser
from benchmarks.inputs import build_tree, faces_dir
from benchmarks.summary import summarise


def test_tree_has_the_agegender_layout_and_fills_every_folder(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "tree", 280)
    ds = scan(root)
    assert ds.kind == "agegender" and len(ds) == 280
    aligned = {p.name for p in (root / "combined" / "aligned").iterdir()}
    assert len(aligned) == 140 and all(re.fullmatch(r"\d{2}_[FM]", name) for name in aligned)
    assert sum(r.group == "valid" for r in ds.records) == 280 - round(280 * 29_437 / 33_118)
    with Image.open(ds.records[0].path) as im:
        assert im.size == (128, 128) and im.format == "JPEG" and im.info.get("progressive")
    # Built once: a second call reuses the tree untouched.
    mtime = ds.records[0].path.stat().st_mtime_ns
    build_tree(tmp_path / "tree", 280)
    assert ds.records[0].path.stat().st_mtime_ns == mtime


def test_tree_repeats_photos_as_one_identity_with_their_gender(tmp_path: Path) -> None:
    photos = []
    for i, gender in enumerate((0, 1, 1)):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
        photos.append(FaceRecord(path, gender, None, f"csv:{i}"))
    ds = scan(build_tree(tmp_path / "tree", 12, photos))
    by_identity: dict[str, list[FaceRecord]] = {}
    for r in ds.records:
        by_identity.setdefault(r.identity, []).append(r)
    assert len(by_identity) == 3 and all(len(v) == 4 for v in by_identity.values())
    assert sorted(v[0].gender for v in by_identity.values()) == [0, 1, 1]
    first = [np.asarray(Image.open(r.path)) for r in by_identity[ds.records[0].identity][:2]]
    assert not np.array_equal(*first)  # repeats are jittered or mirrored, not byte copies


def test_faces_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(AgeGenderError, match="does not exist"):
        faces_dir(str(tmp_path / "missing"))


def _grid(raw_fit: float, raw_best: float, ext_fit: float) -> list[dict[str, object]]:
    rows = []
    for dtype in ("fp32", "bf16"):
        # train.fit's row (its layout at the default 2 threads), the fastest raw row, and an NCHW row with no
        # extraction figure (extract_features runs the trunk in its own layout).
        for fmt, threads, raw, ext in (
            ("channels_last", 2, raw_fit, ext_fit),
            ("channels_last", 1, raw_best, 0.9 * raw_best),
            ("nchw", 2, raw_fit / 2, None),
        ):
            rows.append({"dtype": dtype, "format": fmt, "threads": threads, "raw": raw, "extract": ext})
    return rows


def test_summary_arithmetic_and_reasons() -> None:
    raw = {
        "throughput": {"grid": _grid(raw_fit=50.0, raw_best=200.0, ext_fit=40.0), "default_threads": 2},
        "extract": {"wall_seconds": 600.0, "peak_rss_gib": 1.5},
        "train": {
            "epoch_seconds": 100.0,
            "fit_wall_seconds": 130.0,
            "checkpoint_seconds": 2.0,
            "train_images": 700,
            "val_images": 150,
            "peak_rss_gib": 2.5,
        },
        "steps": {"naive": {"train_images_per_second": 10.0, "val_images_per_second": 15.0}},
        "predict": {"images_per_second": 30.0},
        "peer": {"error": "skipped (--no-peer)"},
    }
    s = summarise(raw, epochs=25)
    assert s["extraction_ratio"] == pytest.approx(40 / 200)
    assert s["extraction_ratio_best_settings"] == pytest.approx(0.9)
    assert s["train_speedup_vs_naive"] == pytest.approx((700 / 10 + 150 / 15) / 100)
    assert s["full_run_minutes"] == pytest.approx((600 + 130 + 24 * 102) / 60)
    assert s["peak_rss_gib"] == 2.5
    assert s["predict_ratio_vs_peer"] is None and s["reasons"]["predict_ratio_vs_peer"] == "skipped (--no-peer)"

    failed = summarise({"throughput": {"error": "phase throughput exited with status 1"}}, epochs=25)
    assert failed["extraction_ratio"] is None
    assert "status 1" in failed["reasons"]["extraction_ratio"]


@pytest.mark.slow
def test_tiny_run_writes_both_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGEGENDER_FACES", raising=False)
    out = tmp_path / "out"
    rc = main(["--tiny", "--no-peer", "--synthetic", "--out", str(out), "--work", str(tmp_path / "work")])
    doc = json.loads((out / "bench.json").read_text())
    errors = {k: v["error"] for k, v in doc["raw"].items() if k != "peer" and "error" in v}
    assert rc == 0 and not errors, errors

    for key in ("extraction_ratio", "train_speedup_vs_naive", "full_run_minutes", "peak_rss_gib"):
        assert isinstance(doc[key], float) and math.isfinite(doc[key]) and doc[key] > 0, key
    assert doc["predict_ratio_vs_peer"] is None
    assert "--no-peer" in doc["summary"]["reasons"]["predict_ratio_vs_peer"]
    assert doc["raw"]["predict"]["images_per_second"] > 0
    assert doc["raw"]["train"]["cache_hit"] and doc["raw"]["steps"]["cache_hit"]
    assert doc["machine"]["cpu"] and doc["machine"]["torch"] and doc["command"].startswith("python -m benchmarks")

    md = (out / "BENCHMARKS.md").read_text()
    for n in range(1, 7):
        assert f"## {n}." in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows and not any(re.search(r"\|\s*\|", line) for line in rows)  # no blank cells
    if doc["machine"]["gpu"] == "no GPU available":
        assert "no GPU available" in md
    assert not list(out.glob(".*part"))  # atomic writes leave no temp files

    # --reuse keeps every phase group that succeeded (here all but predict + peer), with who measured it.
    assert main(["--tiny", "--no-peer", "--synthetic", "--reuse", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    again = json.loads((out / "bench.json").read_text())
    assert again["raw"]["train"] == doc["raw"]["train"] and again["extraction_ratio"] == doc["extraction_ratio"]
    assert doc["raw"]["train"]["measured"]["command"] in (out / "BENCHMARKS.md").read_text()


# -- figure 7 (real-photo accuracy beside the peer): its pure arithmetic, judging and section ----------------------
def _truth() -> list[dict[str, object]]:
    # Four photos: two 20-29 (one exact age each), two 60-69; the last two Asian.
    return [
        {"path": f"p{i}", "male": m, "age": a, "group": g, "race": r}
        for i, (m, a, g, r) in enumerate(
            ((1, 25, "20-29", "white"), (0, 27, "20-29", "white"), (1, 61, "60-69", "asian"), (0, 65, "60-69", "asian"))
        )
    ]


def test_accuracy_score_applies_one_no_face_rule() -> None:
    from benchmarks.accuracy import score

    preds = {
        "p0": {"male": 1, "age": 30.0, "found": True},  # right, 5 years off
        "p1": {"male": 0, "age": 27.0, "found": False},  # right, from the whole frame
        "p2": {"male": 0, "age": 51.0, "found": True},
    }  # wrong; p3 missing: unscored, wrong
    s = score(_truth(), preds, exact_ages=True)
    assert (s["images"], s["no_face"], s["unscored"]) == (4, 1, 1)
    assert s["accuracy"] == pytest.approx(0.5) and s["accuracy_no_face_wrong"] == pytest.approx(0.25)
    lo, hi = s["accuracy_ci95"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert s["mae"] == pytest.approx((5 + 0 + 10) / 3) and s["age_n"] == 3
    assert list(s["slices"]["group"]) == ["20-29", "60-69"]
    assert s["slices"]["group"]["20-29"] == {"n": 2, "accuracy": 1.0, "mae": 2.5}
    assert s["slices"]["race"]["asian"] == {"n": 2, "accuracy": 0.0, "mae": 10.0}

    # Age groups only (FairFace): no MAE, the share of predicted ages inside the labelled group instead.
    grouped = [{**t, "age": None} for t in _truth()]
    g = score(grouped, preds, exact_ages=False)
    assert "mae" not in g and g["age_group_hit"] == pytest.approx(1 / 3)  # 27 in 20-29; 30 and 51 outside
    assert g["slices"]["group"]["60-69"]["mae"] is None


def test_accuracy_group_range_and_speed_medians() -> None:
    from benchmarks.accuracy import group_range
    from benchmarks.peer import speed_row

    assert group_range("20-29") == (20, 29) and group_range("70+") == (70, math.inf) and group_range("unknown") is None
    ours = [{"images_per_second": v, "faces": 10, "no_face": 0} for v in (30.0, 10.0, 20.0)]
    peer = [{"images_per_second": v, "faces": 9} for v in (4.0, 6.0)] + [{"error": "boom"}]
    row = speed_row(ours, peer, 10)
    assert row["ours_images_per_second"] == 20.0 and row["peer_images_per_second"] == 5.0 and row["ratio"] == 4.0
    assert row["peer_runs"] == [4.0, 6.0] and row["peer_faces"] == 9
    assert "ratio" not in speed_row(ours, [{"error": "no venv"}], 10)
    assert speed_row(ours, [{"error": "no venv"}], 10)["error"] == "no venv"


def _scored(acc: float, wrong: float, mae: float | None = None) -> dict[str, object]:
    out: dict[str, object] = {
        "images": 100,
        "no_face": 3,
        "unscored": 0,
        "accuracy": acc,
        "accuracy_ci95": [acc - 0.02, acc + 0.02],
        "accuracy_no_face_wrong": wrong,
        "slices": {"group": {"20-29": {"n": 100, "accuracy": acc, "mae": mae}}},
    }
    if mae is not None:
        out["mae"] = mae
    return out


def _accuracy_result() -> dict[str, object]:
    run = {"train_images": 900, "features": "per-set extraction (cache hit)", "fit_seconds": 10.0}
    return {
        "sets": {n: {"images": 100, "of": 1000, "data": n} for n in ("lfw", "fairface", "utkface")},
        "subsample": 100,
        "peer_version": "2.0.0",
        "no_face_rule": "one rule.",
        "omp_wait_policy": "PASSIVE",
        "feature_extraction": {"lfw": {"images": 100, "seconds": 6.0, "from_cache": False}},
        "accuracy_minutes": 3.0,
        "wall_minutes": 4.0,
        "load_average_start": [1.0, 1.0, 1.0],
        "in_domain": {
            "set": "utkface",
            **run,
            "test_images": 100,
            "ours": _scored(0.93, 0.92, 4.8),
            "peer": _scored(0.85, 0.80, 6.0),
        },
        "cross": {
            "lfw": {"trained_on": ["fairface", "utkface"], **run, "ours": _scored(0.97, 0.96), "peer": _scored(0.95, 0.96)},
            # Ahead with whole-frame predictions, behind once no face counts as wrong: missed.
            "fairface": {"trained_on": ["lfw", "utkface"], **run, "ours": _scored(0.91, 0.80), "peer": _scored(0.90, 0.85)},
            "utkface": {
                "trained_on": ["lfw", "fairface"],
                **run,
                "ours": _scored(0.88, 0.88, 9.0),
                "peer": {"error": "the peer failed on the photos: boom"},
            },
        },
        "speed": {
            "descriptor": {
                "images": 64,
                "torch_dtype": "bfloat16",
                "torch_threads": 2,
                "torch_images_per_s": 80.0,
                "dlib_images_per_s": 10.0,
                "ratio": 8.0,
            },
            "predict": {
                "predictor": {"detector": "retinaface", "min_face_px": 40, "precision": "bf16"},
                "lfw": {
                    "images": 10,
                    "ours_runs": [40.0],
                    "peer_runs": [10.0],
                    "ours_faces": 10,
                    "ours_no_face": 0,
                    "ours_images_per_second": 40.0,
                    "peer_images_per_second": 10.0,
                    "peer_faces": 10,
                    "ratio": 4.0,
                },
            },
        },
    }


def test_accuracy_targets_are_judged_from_the_given_numbers() -> None:
    from benchmarks.accuracy import judge

    rows = judge(_accuracy_result())
    find = lambda text: next(r for r in rows if text in r["target"])
    assert find("lfw (held out)")["met"] is True
    assert find("fairface (held out)")["met"] is False  # both scorings must be at least the peer's
    assert "-0.050" in find("fairface (held out)")["value"]
    assert find("utkface (held out)")["met"] is None and "boom" in find("utkface (held out)")["value"]
    assert find("utkface (in-domain test)")["met"] is True
    assert find("0.90 on FairFace")["met"] is True
    assert find("UTKFace age MAE")["met"] is True and find("UTKFace age MAE")["value"] == "4.80"
    assert find("descriptor")["met"] is False and find("descriptor")["value"] == "8.0"
    assert find("images/s on lfw")["met"] is True
    assert find("images/s on fairface")["met"] is None


def test_accuracy_section_renders_measured_numbers_only() -> None:
    from benchmarks.accuracy import judge
    from benchmarks.report import _accuracy

    result = _accuracy_result()
    result["targets"] = judge(result)
    md = "\n".join(_accuracy(result))
    assert md.startswith("## 7.") and "**Subsampled** (100 photos per set" in md and "OMP_WAIT_POLICY=PASSIVE" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows and not any(re.search(r"\|\s*\|", line) for line in rows)  # no blank cells
    assert "| 0.970 (0.950-0.990) | 0.960 |" in md and "the peer failed on the photos: boom" in md
    assert md.count("| missed |") == 2 and md.count("| met |") == 5 and md.count("| not measured |") == 2
    assert "\n".join(_accuracy({"skipped": "no real photos"})).endswith("Not measured: no real photos\n")


def test_only_runs_the_named_groups_and_accuracy_gets_passive_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.__main__ import selected
    from benchmarks.phases import _child_env

    assert selected(parser().parse_args(["--only", "accuracy"])) == [("accuracy",)]
    assert selected(parser().parse_args(["--only", "peer", "train"])) == [("extract", "train", "steps"), ("peer", "predict")]
    assert len(selected(parser().parse_args([]))) == 5
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _child_env("accuracy")["OMP_WAIT_POLICY"] == "PASSIVE" and _child_env("train")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in _child_env("predict")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert _child_env("accuracy")["OMP_WAIT_POLICY"] == "ACTIVE"  # the caller's setting wins


def test_interleaved_pairs_alternate_and_the_targets_read_their_medians() -> None:
    from benchmarks.interleave import interleave, ratio

    calls: list[str] = []
    values = {"a": iter([10.0, 30.0, 20.0]), "b": iter([5.0, 10.0, 5.0])}
    res = interleave({k: (lambda k=k: calls.append(k) or next(values[k])) for k in "ab"}, reps=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # A B, B A, A B: a drifting load hits both sides alike
    assert (res["a"]["median"], res["a"]["min"], res["a"]["max"]) == (20.0, 10.0, 30.0)
    assert ratio(res["a"], res["b"])["runs"] == [2.0, 3.0, 4.0] and ratio(res["a"], res["b"])["median"] == 3.0

    spread = lambda *v: {"median": sorted(v)[len(v) // 2], "min": min(v), "max": max(v), "runs": list(v), "load": 1.0}
    raw = {
        "throughput": {
            "grid": _grid(raw_fit=50.0, raw_best=200.0, ext_fit=40.0),
            "default_threads": 2,
            "pairs": {"ratio": spread(0.8, 0.95, 0.9)},
        },
        "extract": {"wall_seconds": 120.0, "peak_rss_gib": 1.0},
        "train": {
            "epoch_seconds": 10.0,
            "epochs": spread(9.0, 10.0, 12.0),
            "epochs_measured": 3,
            "fit_wall_seconds": 50.0,
            "checkpoint_seconds": 1.0,
            "train_images": 700,
            "val_images": 150,
            "peak_rss_gib": 2.0,
        },
        "steps": {
            "pairs": {
                "cached_epoch_seconds": spread(8.0, 9.0, 10.0),
                "naive_epoch_seconds": spread(300.0, 320.0, 310.0),
                "speedup": spread(31.0, 35.0, 33.0),
            }
        },
    }
    s = summarise(raw, epochs=25)
    assert s["extraction_ratio"] == 0.9 and s["spread"]["extraction_ratio"]["min"] == 0.8  # the pairs, not the grid
    assert s["train_speedup_vs_naive"] == 33.0 and s["train_speedup_fit_epochs"] == pytest.approx(310 / 10)
    assert s["full_run_minutes"] == pytest.approx((120 + 50 + 22 * 11) / 60)
    assert s["spread"]["full_run_minutes"]["max"] == pytest.approx((120 + 50 + 22 * 13) / 60)


def test_output_and_work_default_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.inputs import REPO

    monkeypatch.setenv("AGEGENDER_HOME", str(tmp_path / "home"))
    a = parser().parse_args(["--quick"])
    for folder in (a.out, a.work):
        assert Path(folder).resolve().is_relative_to(tmp_path / "home")
        assert not Path(folder).resolve().is_relative_to(REPO)  # BENCHMARKS.md and ~1 GB of work stay out
    assert parser().parse_args(["--out", "."]).out == "."  # the tracked report only when --out names it


def test_real_photos_are_found_as_the_tests_find_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.inputs as inputs

    monkeypatch.delenv("AGEGENDER_FACES", raising=False)
    monkeypatch.setattr(inputs, "REPO", tmp_path / "checkout")
    assert faces_dir(None) is None
    (tmp_path / "shared" / "faces").mkdir(parents=True)
    assert faces_dir(None) == tmp_path / "shared" / "faces"  # ../shared/faces, as tests/conftest.py looks
    assert faces_dir(None, synthetic=True) is None
    monkeypatch.setenv("AGEGENDER_FACES", str(tmp_path / "elsewhere"))
    with pytest.raises(AgeGenderError, match="does not exist"):
        faces_dir(None)
