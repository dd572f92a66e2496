"""Data layer: file-name identities, dataset layouts, identity-safe splits, safe image decoding, batching."""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agegender.data.batches import augment_images as augment
from agegender.data.batches import decode_batch, iter_batches
from agegender.data.records import Dataset, FaceRecord, parse_identity, scan
from agegender.data.splits import folder_split, identity_split, make_splits, seed_split
from agegender.errors import AgeGenderError
from agegender.images import MAX_PIXELS, Skipped, load_rgb
from agegender.labels import ADIENCE_GROUP_NAMES, age_group, parse_age

# ---------------------------------------------------------------------------------------------
# identities and age groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nm0000100_rm1001569280_1955-1-6_2011.jpg", ("imdb", "imdb:nm0000100")),
        ("nm0000100_rm1001569280_1955-1-6_2011-1.jpg", ("imdb", "imdb:nm0000100")),
        ("nm1234567_rm12_1980-12-31_2009.JPG", ("imdb", "imdb:nm1234567")),
        ("10000217_1981-05-05_2009.jpg", ("wiki", "wiki:10000217")),
        ("10000217_1981-05-05_2009-1.jpg", ("wiki", "wiki:10000217")),
        # malformed birth dates seen in the real WIKI files
        ("32339345_1994-11-18._2015.jpg", ("wiki", "wiki:32339345")),
        ("706798_1989-08-019_2009.jpg", ("wiki", "wiki:706798")),
        ("landmark_aligned_face.2282.11597935265_29bcdfa4a5_o.jpg", ("adience", "adience:2282")),
        ("landmark_aligned_face.2282.11597935265_29bcdfa4a5_o-1.jpg", ("adience", "adience:2282")),
        ("combined/valid/25_M/nm0000001_rm1_1950-1-1_1975.jpg", ("imdb", "imdb:nm0000001")),
    ],
)
def test_parse_identity_known_patterns(name: str, expected: tuple[str, str]) -> None:
    assert parse_identity(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "AJ_Cook_0001.jpg",
        "photo.jpg",
        "nm12_something.jpg",
        "12345.jpg",
        "landmark_aligned_face.jpg",
        "25_0_2_20170116174525125.jpg.chip.jpg",
        "10000217_1981-05-05_2009.txt",
    ],
)
def test_parse_identity_falls_back_to_the_name(name: str) -> None:
    assert parse_identity(name) == ("unknown", name)
    assert parse_identity(Path("some/dir") / name)[1] == str(Path("some/dir") / name)


@pytest.mark.parametrize(
    ("age", "group"),
    [
        (0, "0-2"),
        (2, "0-2"),
        (3, "0-2"),
        (4, "4-6"),
        (7, "4-6"),
        (8, "8-13"),
        (13, "8-13"),
        (14, "8-13"),
        (15, "15-20"),
        (22, "15-20"),
        (23, "25-32"),
        (35, "25-32"),
        (36, "38-43"),
        (45, "38-43"),
        (46, "48-53"),
        (56, "48-53"),
        (57, "60+"),
        (60, "60+"),
        (99, "60+"),
    ],
)
def test_age_group_nearest_bracket_ties_to_younger(age: int, group: str) -> None:
    assert ADIENCE_GROUP_NAMES[age_group(age)] == group


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("29", 29),
        (" 29.0 ", 29),
        ("20-29", 24),
        ("0-2", 1),
        ("70+", 70),
        ("", None),
        ("0", 0),
        ("120", 120),
        ("100-120", 110),
        ("25 - 32", 28),
        ("60+", 60),
    ],
)
def test_parse_age(text: str, age: int | None) -> None:
    assert parse_age(text) == age


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1000-2000", "out of range (0-120)"),
        ("40-30", "range not ascending (40 > 30)"),
        ("-5", "out of range"),
        ("200", "out of range"),
        ("121", "out of range"),
        ("0-121", "out of range"),
        ("130+", "out of range"),
        ("9" * 5000 + "-1", "out of range"),
        ("old", "not a number or range"),
        ("1e3", "not a number or range"),
        ("nan", "not a number or range"),
        ("20-", "not a number or range"),
        ("1_0", "not a number or range"),
    ],
)
def test_parse_age_refuses_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_age(text)
    assert reason in str(e.value)


# ---------------------------------------------------------------------------------------------
# scanning layouts
# ---------------------------------------------------------------------------------------------


def _distinct(path: Path, size: int = 8) -> Image.Image:
    """Pixels of this path's own: scans count files with identical bytes as one face."""
    seed = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "little")
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _jpeg(path: Path, color: tuple[int, int, int] | None = None, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (_distinct(path, size) if color is None else Image.new("RGB", (size, size), color)).save(path, "JPEG")
    return path


TREE_FILES = {
    "aligned/25_M/nm0000001_rm11_1950-1-1_1975.jpg": ("imdb:nm0000001", 1, 25),
    "aligned/25_M/nm0000001_rm12_1950-1-1_1976-1.jpg": ("imdb:nm0000001", 1, 25),
    "aligned/03_F/landmark_aligned_face.7.123_abc_o.jpg": ("adience:7", 0, 3),
    "aligned/70_F/4242_1930-02-02_2000.jpg": ("wiki:4242", 0, 70),
    "aligned/70_F/mystery.jpg": ("aligned/70_F/mystery.jpg", 0, 70),
    "valid/25_M/nm0000001_rm13_1950-1-1_1975.jpg": ("imdb:nm0000001", 1, 25),
    "valid/70_F/mystery.jpg": ("valid/70_F/mystery.jpg", 0, 70),
}


@pytest.mark.parametrize("prefix", ["combined/", ""])
def test_scan_agegender_tree(tmp_path: Path, prefix: str) -> None:
    for rel in TREE_FILES:
        _jpeg(tmp_path / prefix / rel)
    _jpeg(tmp_path / prefix / "aligned/not_a_label/x.jpg")
    (tmp_path / prefix / "aligned/25_M/notes.txt").write_text("not an image")
    ds = scan(tmp_path)
    assert ds.kind == "agegender" and ds.root == tmp_path
    got = {r.path.relative_to(tmp_path / prefix).as_posix(): r for r in ds.records}
    assert set(got) == set(TREE_FILES)
    for rel, (identity, gender, age) in TREE_FILES.items():
        r = got[rel]
        assert (r.identity, r.gender, r.age, r.group) == (identity, gender, age, rel.split("/")[0])
    assert {r.source for r in ds.records} == {"imdb", "adience", "wiki", "unknown"}


def test_scan_utkface_names(tmp_path: Path) -> None:
    _jpeg(tmp_path / "25_0_2_20170116174525125.jpg.chip.jpg")
    _jpeg(tmp_path / "30_1_0_20170116174525126.jpg.chip.jpg")
    _jpeg(tmp_path / "61_1_20170109142408075.jpg.chip.jpg")  # real UTKFace name without a race
    _jpeg(tmp_path / "53__0_20170116184028385.jpg.chip.jpg")  # no gender: ignored
    _jpeg(tmp_path / "holiday.jpg")
    ds = scan(tmp_path)
    assert ds.kind == "utkface"
    got = {r.path.name.split("_2017")[0]: (r.gender, r.age, r.race, r.source) for r in ds.records}
    assert got == {"25_0_2": (1, 25, "Asian", "utkface"), "30_1_0": (0, 30, "White", "utkface"), "61_1": (0, 61, None, "utkface")}
    assert len({r.identity for r in ds.records}) == 3


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_scan_csv_manifest(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "sub/c.jpg", "10000217_1981-05-05_2009.jpg", "d.jpg"):
        _jpeg(tmp_path / name)
    _write_csv(
        tmp_path / "labels.csv",
        ["Path", "gender", "age", "identity", "race"],
        [
            ["a.jpg", "F", "29", "alice", "Asian"],
            ["b.jpg", "male", "20-29", "", ""],
            ["sub/c.jpg", "Female", "", "alice", ""],
            ["10000217_1981-05-05_2009.jpg", "m", "28", "10000217", ""],
            ["d.jpg", "M", "70+", "", ""],
            ["gone.jpg", "M", "30", "", ""],
        ],
    )
    for root in (tmp_path, tmp_path / "labels.csv"):
        ds = scan(root)
        assert ds.kind == "csv" and ds.root == tmp_path
        got = {r.path.relative_to(tmp_path).as_posix(): (r.gender, r.age, r.identity, r.race, r.source) for r in ds.records}
        assert got == {
            "a.jpg": (0, 29, "csv:alice", "Asian", "csv"),
            "b.jpg": (1, 24, "b.jpg", None, "csv"),
            "sub/c.jpg": (0, None, "csv:alice", None, "csv"),
            "10000217_1981-05-05_2009.jpg": (1, 28, "wiki:10000217", None, "wiki"),
            "d.jpg": (1, 70, "d.jpg", None, "csv"),
        }


def test_scan_json_manifest(tmp_path: Path) -> None:
    _jpeg(tmp_path / "f1.jpg")
    _jpeg(tmp_path / "f2.jpg")
    (tmp_path / "ground_truth.json").write_text(
        json.dumps(
            [
                {"id": "f1", "filename": "f1.jpg", "age": "3-9", "gender": "Female"},
                {"id": "f2", "filename": "f2.jpg", "age": "70+", "gender": "Male"},
            ]
        )
    )
    ds = scan(tmp_path)
    assert ds.kind == "json"
    assert [(r.gender, r.age) for r in ds.records] == [(0, 6), (1, 70)]


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["file", "gender"], ["a.jpg", "F"], "needs a 'path' or 'filename' column"),
        (["filename", "sex"], ["a.jpg", "F"], "needs a 'path' or 'filename' column"),
        (["filename", "gender"], ["a.jpg", "X"], "labels.csv:2: gender 'X'"),
        (["filename", "gender", "age"], ["a.jpg", "F", "old"], "labels.csv:2: age 'old': not a number or range"),
        (["filename", "gender", "age"], ["a.jpg", "F", "-5"], "labels.csv:2: age '-5': out of range"),
        (["filename", "gender", "age"], ["a.jpg", "F", "200"], "labels.csv:2: age '200': out of range"),
        (["filename", "gender", "age"], ["a.jpg", "F", "1000-2000"], "labels.csv:2: age '1000-2000': out of range"),
        (["filename", "gender", "age"], ["a.jpg", "F", "40-30"], "labels.csv:2: age '40-30': range not ascending"),
    ],
)
def test_scan_csv_errors_name_file_and_problem(tmp_path: Path, header: list[str], row: list[str], message: str) -> None:
    _jpeg(tmp_path / "a.jpg")
    _write_csv(tmp_path / "labels.csv", header, [row])
    with pytest.raises(AgeGenderError, match=message):
        scan(tmp_path)


def _image(path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _distinct(path).save(path, fmt)
    return path


OTHER_FORMATS = {
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".ppm": "PPM",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".png": "PNG",
    ".JPEG": "JPEG",
}


def test_scans_take_every_decodable_format_and_record_what_they_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "tree"
    for i, (suffix, fmt) in enumerate(sorted(OTHER_FORMATS.items())):
        _image(tree / "aligned" / "25_M" / f"nm000000{i}_rm1_1950-1-1_1975{suffix}", fmt)
    (tree / "aligned" / "25_M" / "notes.txt").write_text("not an image")
    (tree / "aligned" / "25_M" / "photo.heic").write_bytes(b"\0" * 10)
    (tree / "aligned" / "25_M" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level("WARNING", logger="agegender"):
        ds = scan(tree)
    assert sorted(r.path.suffix for r in ds.records) == sorted(OTHER_FORMATS)
    assert all(r.source == "imdb" for r in ds.records)  # identities parse whatever the image suffix
    assert sorted(p.name for p, _ in ds.skipped.items) == ["notes.txt", "photo.heic"]
    assert {why for _, why in ds.skipped.items} == {"not an image format the decoder reads"}
    assert "2 files skipped (2 not an image format the decoder reads)" in caplog.text

    utk = tmp_path / "utk"
    for suffix, fmt in OTHER_FORMATS.items():
        _image(utk / "sub" / f"25_0_2_2017011617452512{len(suffix)}{suffix}", fmt)
    _image(utk / "holiday.gif", "GIF")
    (utk / "readme.md").write_text("UTKFace")
    (utk / ".git" / "objects").mkdir(parents=True)
    (utk / ".git" / "objects" / "ab").write_bytes(b"x")
    ds = scan(utk)
    assert ds.kind == "utkface" and len(ds.records) == len(OTHER_FORMATS)
    assert sorted((p.name, why) for p, why in ds.skipped.items) == [
        ("holiday.gif", "no UTKFace labels (<age>_<gender>_...) in the name"),
        ("readme.md", "not an image format the decoder reads"),
    ]


def test_manifest_records_missing_images_as_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "a.tif", "TIFF")
    _image(tmp_path / "b.gif", "GIF")
    _write_csv(
        tmp_path / "labels.csv",
        ["path", "gender"],
        [["a.tif", "F"], ["b.gif", "M"], ["gone.jpg", "M"], ["x" * 5000 + ".jpg", "F"]],
    )
    ds = scan(tmp_path)
    assert sorted(r.path.name for r in ds.records) == ["a.tif", "b.gif"]
    assert [why for _, why in ds.skipped.items] == [
        "listed on line 4 of labels.csv but missing",
        "listed on line 5 of labels.csv but missing",
    ]


def test_scan_without_labels_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(AgeGenderError, match="no labelled face images.*agegender_cleaned.*UTKFace.*labels.csv"):
        scan(tmp_path)
    _jpeg(tmp_path / "holiday.jpg")
    with pytest.raises(AgeGenderError, match="no labelled face images"):
        scan(tmp_path)
    with pytest.raises(AgeGenderError, match="no such file"):
        scan(tmp_path / "missing")
    (tmp_path / "combined" / "aligned").mkdir(parents=True)
    with pytest.raises(AgeGenderError, match="no labelled face images"):
        scan(tmp_path)


@pytest.mark.slow
def test_shared_lfw_and_wiki_scan_and_every_image_loads(shared_faces: Path) -> None:
    for name in ("lfw", "wiki"):
        with (shared_faces / name / "labels.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        ds = scan(shared_faces / name)
        assert ds.kind == "csv" and len(ds.records) == len(rows)
        labelled = {r.get("path") or r["filename"]: r for r in rows}
        for rec in ds.records:
            row = labelled[rec.path.relative_to(shared_faces / name).as_posix()]
            assert rec.gender == "FM".index(row["gender"])
            assert rec.age == (int(row["age"]) if row.get("age") else None)
        skipped = Skipped()
        _, ok = decode_batch([r.path for r in ds.records], 32, workers=2, skipped=skipped)
        assert ok.all() and len(skipped) == 0
    wiki = scan(shared_faces / "wiki")
    assert all(r.source == "wiki" and r.identity.startswith("wiki:") for r in wiki.records)
    assert sum(r.age is None for r in wiki.records) == 2


def test_shared_fairface_json(shared_faces: Path) -> None:
    ds = scan(shared_faces / "fairface")
    assert ds.kind == "json" and len(ds.records) == 540
    assert collections.Counter(r.gender for r in ds.records) == {0: 270, 1: 270}
    assert sorted({r.age for r in ds.records}) == [1, 6, 14, 24, 34, 44, 54, 64, 70]


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def _records(spec: list[tuple[int, int, int | None]], group: str = "") -> list[FaceRecord]:
    """(identity, gender, age) triples -> records with unique paths."""
    return [FaceRecord(Path(f"{group or 'x'}/{i}.jpg"), g, a, f"p:{ident}", group) for i, (ident, g, a) in enumerate(spec)]


people = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1), st.one_of(st.none(), st.integers(0, 90))), max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=people,
    seed=st.integers(0, 2**32 - 1),
    fractions=st.sampled_from([(0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0), (0.8, 0.2, 0.0)]),
)
def test_identity_split_keeps_every_record_and_shares_no_identity(
    spec: list, seed: int, fractions: tuple[float, float, float]
) -> None:
    records = _records(spec)
    splits = identity_split(records, fractions, seed)
    combined = [r for part in splits.values() for r in part]
    assert sorted(combined, key=lambda r: r.path) == sorted(records, key=lambda r: r.path)
    assert splits.leaked_identities() == 0
    ids = [{r.identity for r in part} for part in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for name, fraction in zip(splits, fractions):
        if fraction == 0:
            assert splits[name] == []
    again = identity_split(records, fractions, seed)
    assert all(splits[k] == again[k] for k in splits)


def test_identity_split_is_stratified_and_sized() -> None:
    rng = np.random.default_rng(1)
    spec = []
    for person in range(3000):
        gender, age = int(rng.random() < 0.3), int(rng.integers(0, 80))
        spec += [(person, gender, age)] * int(rng.integers(1, 4))
    records = _records(spec)
    splits = identity_split(records, (0.7, 0.15, 0.15), seed=3)
    overall_male = np.mean([r.gender for r in records])
    overall_groups = np.bincount([age_group(r.age) for r in records], minlength=8) / len(records)
    for name, fraction in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        part = splits[name]
        assert abs(len(part) / len(records) - fraction) < 0.01
        assert abs(np.mean([r.gender for r in part]) - overall_male) < 0.02
        groups = np.bincount([age_group(r.age) for r in part], minlength=8) / len(part)
        assert np.abs(groups - overall_groups).max() < 0.02
    summary = splits.summary()
    assert sum(s["identities"] for s in summary.values()) == 3000
    assert sum(s["images"] for s in summary.values()) == len(records)


def test_identity_split_fills_val_and_test_from_many_tiny_strata() -> None:
    # 16 strata (2 genders x 8 age groups) of two people each: per-stratum rounding would give all to train.
    spec = [(g * 100 + a * 2 + k, g, a) for g in (0, 1) for a in (1, 5, 10, 17, 28, 40, 50, 65) for k in (0, 1)]
    splits = identity_split(_records(spec), seed=0)
    sizes = [len(splits[k]) for k in ("train", "val", "test")]
    assert sizes[1] >= 3 and sizes[2] >= 3 and sum(sizes) == 32


def test_identity_split_depends_on_seed_only() -> None:
    records = _records([(i // 2, i % 2, 20 + i % 40) for i in range(400)])
    a, b, c = (identity_split(records, seed=s) for s in (5, 5, 6))
    assert a["test"] == b["test"] and a["test"] != c["test"]


def test_identity_split_rejects_bad_fractions() -> None:
    with pytest.raises(AgeGenderError, match="fractions"):
        identity_split([], (0.5, 0.5, 0.5))


def _tree_records() -> list[FaceRecord]:
    aligned = _records([(i % 30, i % 2, 10 + i % 20) for i in range(120)], "aligned")
    valid = _records([(25 + i, i % 2, 10 + i % 20) for i in range(20)], "valid")  # people 25..29 also aligned
    return aligned + valid


def test_folder_split_tests_on_valid_and_reports_leakage() -> None:
    records = _tree_records()
    splits = folder_split(records, 0.2, seed=0)
    assert splits["test"] == [r for r in records if r.group == "valid"]
    assert {r.group for r in splits["train"] + splits["val"]} == {"aligned"}
    assert not {r.identity for r in splits["train"]} & {r.identity for r in splits["val"]}
    # people p:25 .. p:29 have images in aligned/ and valid/
    assert splits.leaked_identities() == 5
    with pytest.raises(AgeGenderError, match="valid/"):
        folder_split([r for r in records if r.group == "aligned"])


def test_seed_split_is_50_25_25_per_label_folder_of_aligned() -> None:
    records = _tree_records()
    splits = seed_split(records, seed=0)
    assert all(r.group == "aligned" for part in splits.values() for r in part)
    label = collections.Counter((r.gender, r.age) for r in records if r.group == "aligned")
    for key, n in label.items():
        counts = [sum((r.gender, r.age) == key for r in splits[k]) for k in ("train", "val", "test")]
        assert counts == [n // 2, n // 4, n - n // 2 - n // 4]
    # identity i has images i, i+30, i+60, i+90 in the same folder: random per-image splits scatter them
    assert splits.leaked_identities() > 20
    assert seed_split(records, seed=0)["val"] == splits["val"] != seed_split(records, seed=1)["val"]


def test_make_splits_dispatches(tmp_path: Path) -> None:
    ds = Dataset(_tree_records(), "agegender", tmp_path)
    assert make_splits(ds, "identity", 0).leaked_identities() == 0
    assert make_splits(ds, "folders", 0).protocol == "folders"
    assert make_splits(ds, "seed", 0).protocol == "seed"
    limited = make_splits(ds, "identity", 0, limit=50)
    assert sum(len(v) for v in limited.values()) == 50 and limited.leaked_identities() == 0
    assert make_splits(ds, "identity", 0, limit=50)["test"] == limited["test"]
    with pytest.raises(AgeGenderError, match="unknown split protocol 'random'"):
        make_splits(ds, "random", 0)


# ---------------------------------------------------------------------------------------------
# decoding untrusted images
# ---------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _bad(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero-byte", "empty file"),
        ("random bytes", "not an image in a supported format"),
        ("truncated", "truncated"),
        ("bomb 100k x 100k", "pixel limit"),
        ("over the cap", "pixel limit"),
        ("missing", "no such file"),
    ],
)
def test_bad_images_are_skipped_with_a_reason(tmp_path: Path, kind: str, reason: str) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    path = {
        "zero-byte": lambda: _bad(tmp_path, "a.jpg", b""),
        "random bytes": lambda: _bad(tmp_path, "a.jpg", rng.bytes(5000)),
        "truncated": lambda: _bad(tmp_path, "a.jpg", _jpeg_bytes(noisy)[:3000]),
        "bomb 100k x 100k": lambda: _bad(tmp_path, "a.png", _png_header(100_000, 100_000)),
        "over the cap": lambda: _bad(tmp_path, "a.png", _png_header(8000, 8000)),
        "missing": lambda: tmp_path / "nothing.jpg",
    }[kind]()
    assert MAX_PIXELS < 8000 * 8000
    skipped = Skipped()
    assert load_rgb(path, 64, skipped) is None
    assert len(skipped) == 1 and skipped.items[0][0] == path and reason in skipped.items[0][1]
    assert skipped.to_dict()["count"] == 1 and skipped.to_dict()["first"][0].startswith(path.name)


@pytest.mark.parametrize(
    "kind", ["png named jpg", "cmyk jpeg", "grayscale", "palette png", "rgba png", "progressive jpeg", "mpo-free big jpeg"]
)
def test_odd_but_valid_images_decode(tmp_path: Path, kind: str) -> None:
    red = (200, 30, 30)
    path = tmp_path / "x.jpg"
    if kind == "png named jpg":
        Image.new("RGB", (40, 40), red).save(path, "PNG")
    elif kind == "cmyk jpeg":
        Image.new("RGB", (40, 40), red).convert("CMYK").save(path, "JPEG", quality=95)
    elif kind == "grayscale":
        Image.new("L", (40, 40), 90).save(path, "JPEG")
    elif kind == "palette png":
        Image.new("RGB", (40, 40), red).convert("P").save(path, "PNG")
    elif kind == "rgba png":
        Image.new("RGBA", (40, 40), (*red, 128)).save(path, "PNG")
    elif kind == "progressive jpeg":
        Image.new("RGB", (40, 40), red).save(path, "JPEG", progressive=True, quality=95)
    else:
        Image.new("RGB", (2000, 1500), red).save(path, "JPEG", quality=95)
    skipped = Skipped()
    img = load_rgb(path, 32, skipped)
    assert img is not None and len(skipped) == 0
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    expected = (90, 90, 90) if kind == "grayscale" else red
    assert np.abs(img.reshape(-1, 3).mean(0) - expected).max() < 12


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:16] = (255, 0, 0)  # stored top half red
    arr[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored top becomes the right side
    Image.fromarray(arr).save(tmp_path / "r.jpg", "JPEG", exif=exif, quality=95)
    img = load_rgb(tmp_path / "r.jpg", 32).astype(int)
    assert img[:, 24:, 0].mean() > 200 and img[:, :8, 2].mean() > 200


def test_resize_is_antialiased_and_crops_the_centre(tmp_path: Path) -> None:
    checker = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "c.png")
    small = load_rgb(tmp_path / "c.png", 64).astype(float)
    assert abs(small.mean() - 127.5) < 2 and small.std() < 5  # nearest-neighbour would be all 0 or all 255
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 50:150] = (0, 255, 0)
    Image.fromarray(wide).save(tmp_path / "w.png")
    centre = load_rgb(tmp_path / "w.png", 20)[:, 1:-1]  # the edge columns blend in their outside neighbours
    assert (centre[..., 1] > 250).all() and (centre[..., [0, 2]] < 5).all()
    assert load_rgb(tmp_path / "w.png", None).shape == (100, 200, 3)


def test_jpeg_draft_fast_path_matches_full_decode(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:1024, 0:1024]
    smooth = np.stack([xx / 4, yy / 4, (xx + yy) / 8], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    fast = load_rgb(tmp_path / "big.jpg", 64).astype(float)
    full = np.asarray(Image.fromarray(smooth).resize((64, 64), Image.Resampling.BILINEAR), float)
    assert np.abs(fast - full).mean() < 3


def _colour_files(tmp_path: Path, n: int, bad: set[int]) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.jpg"
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            Image.new("RGB", (24, 24), (i * 20, 255 - i * 20, 100)).save(p, quality=95)
        paths.append(p)
    return paths


@pytest.mark.parametrize("workers", [1, 3])
def test_decode_batch_shapes_order_and_mask(tmp_path: Path, workers: int) -> None:
    paths = _colour_files(tmp_path, 8, bad={2, 5})
    skipped = Skipped()
    images, ok = decode_batch(paths, 16, workers=workers, skipped=skipped)
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    assert ok.tolist() == [i not in (2, 5) for i in range(8)]
    for i in np.flatnonzero(ok):
        assert abs(int(images[i, 8, 8, 0]) - i * 20) < 6
    assert not images[2].any() and sorted(p.name for p, _ in skipped.items) == ["2.jpg", "5.jpg"]


def test_iter_batches_prefetches_in_order_and_skips_bad(tmp_path: Path) -> None:
    paths = _colour_files(tmp_path, 11, bad={3, 8, 9})
    records = [FaceRecord(p, 0, 30, p.stem) for p in paths]
    skipped = Skipped()
    batches = list(iter_batches(records, 16, batch_size=4, workers=2, prefetch=1, skipped=skipped))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2], [4, 5, 6, 7], [10]]
    for indices, images in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (16, 16, 3)
        assert [abs(int(images[j, 8, 8, 0]) - i * 20) < 6 for j, i in enumerate(indices)] == [True] * len(indices)
    assert len(skipped) == 3
    # stopping early must not hang or leak the decoding threads
    first = next(iter(iter_batches(paths, 16, batch_size=2, workers=2)))
    assert first[0].tolist() == [0, 1]


def test_iter_batches_decodes_prefetch_batches_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from agegender.data import batches as data

    calls = []
    lock = threading.Lock()

    def counting(path: Path, size: int, skipped: Skipped | None = None, frame: object = None) -> np.ndarray | None:
        with lock:
            calls.append(path)
        return np.zeros((size, size, 3), np.uint8)

    pools: list[CountingPool] = []

    class CountingPool(ThreadPoolExecutor):
        """The decode pool, counting the tasks handed to it: what it will decode, whenever it gets to it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.submitted = 0
            pools.append(self)

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            self.submitted += 1
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(data, "load_rgb", counting)
    monkeypatch.setattr(data, "ThreadPoolExecutor", CountingPool)
    batches = iter_batches([tmp_path / f"{i}.jpg" for i in range(20)], 8, batch_size=2, workers=2, prefetch=2)
    next(batches)
    assert pools[0].submitted == 6  # the batch handed over plus two decoded ahead, no more
    deadline = time.monotonic() + 5
    while len(calls) < 6:  # and they are decoded without being asked for
        assert time.monotonic() < deadline, f"{len(calls)} of 6 decoded"
        time.sleep(0.01)
    assert sum(1 for _ in batches) == 9
    assert len(calls) == 20


def test_augment_is_a_seeded_flip_and_shift() -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (32, 12, 10, 3), dtype=torch.uint8, generator=g)
    out = augment(batch, torch.Generator().manual_seed(1), max_shift=2)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert torch.equal(out, augment(batch, torch.Generator().manual_seed(1), max_shift=2))
    # every output image is its input, maybe mirrored, shifted by at most 2 pixels with edge replication
    kinds = collections.Counter()
    for src, got in zip(batch.numpy(), out.numpy()):
        matches = []
        for flipped in (False, True):
            img = src[:, ::-1] if flipped else src
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    rows = np.clip(np.arange(12) + dy, 0, 11)
                    cols = np.clip(np.arange(10) + dx, 0, 9)
                    if np.array_equal(img[rows][:, cols], got):
                        matches.append((flipped, dy == 0 and dx == 0))
        assert matches
        kinds[matches[0]] += 1
    assert {flipped for flipped, _ in kinds} == {False, True}
    assert any(not unshifted for _, unshifted in kinds)


def test_manifest_records_say_which_have_person_ids_and_age_groups(tmp_path: Path) -> None:
    folder = tmp_path / "fairface"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(folder / name)
    _write_csv(
        folder / "labels.csv",
        ["path", "gender", "age", "identity"],
        [["a.jpg", "F", "20-29", ""], ["b.jpg", "M", "70+", "bob"], ["c.jpg", "M", "31", ""]],
    )
    got = {r.path.name: (r.age, r.age_interval, r.person_id, r.dataset) for r in scan(folder).records}
    assert got == {
        "a.jpg": (24, (20, 29), False, "fairface"),
        "b.jpg": (70, (70, None), True, "fairface"),
        "c.jpg": (31, None, False, "fairface"),
    }


def test_leakage_is_not_measurable_without_person_ids(tmp_path: Path) -> None:
    from agegender.data.synthetic import make_utkface_folder

    utk = scan(make_utkface_folder(tmp_path / "utk", n=60, seed=0))
    assert not any(r.person_id for r in utk.records)
    splits = make_splits(utk, "identity", 0)
    leak = splits.leakage()
    assert leak["leaked_identities"] is None and leak["leakage"].startswith("not measurable")
    assert "utk" in leak["leakage"]
    assert all("identities" not in s for s in splits.summary().values())  # a file name is not a person


def test_leakage_counts_named_people_and_states_the_rest(tmp_path: Path) -> None:
    recs = [FaceRecord(Path(f"{i}.jpg"), i % 2, 30, f"p:{i // 2}") for i in range(40)]
    recs += [FaceRecord(Path(f"u{i}.jpg"), i % 2, 30, f"u{i}.jpg", person_id=False, dataset="utk") for i in range(20)]
    splits = identity_split(recs, seed=0)
    leak = splits.leakage()
    assert leak["leaked_identities"] == 0
    assert leak["leakage"] == (
        "0 of 20 identities in more than one split; not measurable for 20 faces without person ids (20 in utk)"
    )


def test_scan_all_names_each_data_set_after_its_folder(tmp_path: Path) -> None:
    for folder in ("fairface", "lfw", "other/lfw"):
        for name in ("a.jpg", "b.jpg"):
            _jpeg(tmp_path / folder / name)
        _write_csv(tmp_path / folder / "labels.csv", ["path", "gender", "identity"], [["a.jpg", "F", "x"], ["b.jpg", "M", "y"]])
    from agegender.data.records import scan_all

    ds = scan_all([tmp_path / "fairface", tmp_path / "lfw", tmp_path / "other" / "lfw"])
    assert [r.dataset for r in ds.records] == ["fairface"] * 2 + ["lfw (1)"] * 2 + ["lfw (2)"] * 2
    assert len({r.identity for r in ds.records}) == 6  # listed ids stay per folder
    assert ds.roots == (tmp_path / "fairface", tmp_path / "lfw", tmp_path / "other" / "lfw")
    assert ds.kind == "fairface: csv, lfw (1): csv, lfw (2): csv"  # what a report of several sets shows


# -- manifests that escape their folder or list a file twice -----------------------------------------
@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "{abs}"])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    _jpeg(data / "a.jpg")
    _jpeg(tmp_path / "outside.jpg")
    name = name.replace("{abs}", str(tmp_path / "outside.jpg"))
    _write_csv(data / "labels.csv", ["path", "gender"], [["a.jpg", "F"], [name, "M"]])
    with pytest.raises(AgeGenderError, match=r"labels.csv:3: .*outside.jpg is outside .*data; a manifest may only"):
        scan(data)


def test_manifest_inside_paths_by_any_spelling_are_accepted(tmp_path: Path) -> None:
    _jpeg(tmp_path / "sub" / "a.jpg")
    _write_csv(tmp_path / "labels.csv", ["path", "gender"], [["sub/../sub/a.jpg", "F"], [str(tmp_path / "b.jpg"), "M"]])
    _jpeg(tmp_path / "b.jpg")
    assert len(scan(tmp_path).records) == 2


def test_a_file_listed_twice_is_counted_once_and_conflicts_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(tmp_path / name)
    (tmp_path / "sub").mkdir()
    os.link(tmp_path / "c.jpg", tmp_path / "c-hardlink.jpg")
    _write_csv(
        tmp_path / "labels.csv",
        ["path", "gender", "age"],
        [
            ["a.jpg", "F", "30"],
            ["./a.jpg", "F", "30"],  # the same file, the same labels: once
            ["b.jpg", "F", "30"],
            ["sub/../b.jpg", "M", "30"],  # the same file, different labels: neither
            ["c.jpg", "M", "40"],
            ["c-hardlink.jpg", "M", "41"],  # a hard link is the same file
        ],
    )
    with caplog.at_level("WARNING", logger="agegender"):
        ds = scan(tmp_path)
    assert [r.path.name for r in ds.records] == ["a.jpg"]
    assert [why for _, why in ds.skipped.items] == [
        "listed again on line 3 of labels.csv (line 2)",
        "lines 4 and 5 of labels.csv give it different labels",
        "lines 6 and 7 of labels.csv give it different labels",
    ]
    assert "2 files listed more than once with different labels; left out" in caplog.text


def test_splits_never_hold_one_file_twice(tmp_path: Path) -> None:
    from agegender.data.splits import make_splits

    for i in range(40):
        _jpeg(tmp_path / f"p{i}.jpg")
    (tmp_path / "sub").mkdir()
    rows = [[f"p{i}.jpg", "FM"[i % 2], str(20 + i)] for i in range(40)]
    rows += [[f"sub/../p{i}.jpg", "FM"[i % 2], str(20 + i)] for i in range(40)]  # every file again, spelt otherwise
    _write_csv(tmp_path / "labels.csv", ["path", "gender", "age"], rows)
    splits = make_splits(scan(tmp_path), "identity", 0)
    files = [os.path.realpath(r.path) for part in splits.values() for r in part]
    assert len(files) == len(set(files)) == 40


# -- copies: the same bytes under other names, in one folder or across several ----------------------------------
def test_identical_bytes_are_one_face_and_contradicting_labels_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        _jpeg(tmp_path / name)
    for src, copy in (("a.jpg", "sub/a-copy.jpg"), ("b.jpg", "b-copy.jpg"), ("c.jpg", "c-copy.jpg")):
        (tmp_path / copy).parent.mkdir(exist_ok=True)
        (tmp_path / copy).write_bytes((tmp_path / src).read_bytes())
    _write_csv(
        tmp_path / "labels.csv",
        ["path", "gender", "age"],
        [
            ["a.jpg", "F", "30"],
            ["sub/a-copy.jpg", "F", ""],  # agree: an unknown age fits any
            ["b.jpg", "F", "30"],
            ["b-copy.jpg", "M", "30"],  # contradict: neither is kept
            ["c.jpg", "M", "24"],
            ["c-copy.jpg", "M", "20-29"],  # agree: 24 is in the 20-29 group
            ["d.jpg", "M", "50"],
        ],
    )
    with caplog.at_level("WARNING", logger="agegender"):
        ds = scan(tmp_path)
    assert [r.path.name for r in ds.records] == ["a.jpg", "c.jpg", "d.jpg"]
    assert sorted((p.name, why.replace(str(tmp_path) + os.sep, "")) for p, why in ds.skipped.items) == [
        ("a-copy.jpg", "the same image as a.jpg"),
        ("b-copy.jpg", "the same image as b.jpg, with other labels"),
        ("b.jpg", "the same image as b-copy.jpg, with other labels"),
        ("c-copy.jpg", "the same image as c.jpg"),
    ]
    assert "3 images are copies of others (identical bytes): counted once; 1 with contradicting labels" in caplog.text


def test_copies_across_data_folders_are_counted_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from agegender.data.records import scan_all

    one, two = tmp_path / "one", tmp_path / "two"
    for i in range(6):
        _jpeg(one / f"p{i}.jpg")
    _write_csv(one / "labels.csv", ["path", "gender", "age"], [[f"p{i}.jpg", "FM"[i % 2], str(20 + i)] for i in range(6)])
    two.mkdir()
    (two / "same.jpg").write_bytes((one / "p0.jpg").read_bytes())  # p0 again, labelled alike
    (two / "other.jpg").write_bytes((one / "p1.jpg").read_bytes())  # p1 again, as a woman: neither is kept
    _jpeg(two / "new.jpg")
    _write_csv(
        two / "labels.csv", ["path", "gender", "age"], [["same.jpg", "F", "20"], ["other.jpg", "F", "21"], ["new.jpg", "M", "40"]]
    )
    with caplog.at_level("WARNING", logger="agegender"):
        ds = scan_all([one, two])
    assert sorted(str(r.path.relative_to(tmp_path)) for r in ds.records) == [
        "one/p0.jpg",
        "one/p2.jpg",
        "one/p3.jpg",
        "one/p4.jpg",
        "one/p5.jpg",
        "two/new.jpg",
    ]
    assert "2 images are copies of others (identical bytes): counted once; 1 with contradicting labels" in caplog.text
    # The same folder given twice: every file once.
    assert sorted(r.path for r in scan_all([one, one]).records) == sorted(r.path for r in scan(one).records)
    splits = make_splits(scan_all([one, two, one]), "identity", 0)
    files = [r.path.read_bytes() for part in splits.values() for r in part]
    assert len(files) == len(set(files)) == 6  # no image in two splits, by content
