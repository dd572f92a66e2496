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
from benchmarks.__main__ import main
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
        # train.fit's row (channels_last at the default 2 threads), the fastest raw row, and an NCHW row
        # whose extraction figure is ignored (extract_features converts the trunk to channels_last).
        for fmt, threads, raw, ext in (("channels_last", 2, raw_fit, ext_fit), ("channels_last", 1, raw_best,
                                       0.9 * raw_best), ("nchw", 2, raw_fit / 2, 10 * raw_best)):
            rows.append({"dtype": dtype, "format": fmt, "threads": threads, "raw": raw, "extract": ext})
    return rows


def test_summary_arithmetic_and_reasons() -> None:
    raw = {
        "throughput": {"grid": _grid(raw_fit=50.0, raw_best=200.0, ext_fit=40.0), "default_threads": 2},
        "extract": {"wall_seconds": 600.0, "peak_rss_gib": 1.5},
        "train": {"epoch_seconds": 100.0, "fit_wall_seconds": 130.0, "checkpoint_seconds": 2.0,
                  "train_images": 700, "val_images": 150, "peak_rss_gib": 2.5},
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
    rc = main(["--tiny", "--no-peer", "--out", str(out), "--work", str(tmp_path / "work")])
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
    assert main(["--tiny", "--no-peer", "--reuse", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    again = json.loads((out / "bench.json").read_text())
    assert again["raw"]["train"] == doc["raw"]["train"] and again["extraction_ratio"] == doc["extraction_ratio"]
    assert doc["raw"]["train"]["measured"]["command"] in (out / "BENCHMARKS.md").read_text()
