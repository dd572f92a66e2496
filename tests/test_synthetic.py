"""Generated data and weights: layouts that `scan` reads, real-style names, a learnable signal, sane weights."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agegender.backbones import Preprocess
from agegender.backbones.vgg_face import VGG16_WIDTHS, VGG_FACE_PREPROCESS
from agegender.data.batches import decode_batch
from agegender.data.records import FaceRecord, parse_identity, scan
from agegender.data.splits import folder_split, identity_split
from agegender.data.synthetic import (
    ADIENCE_FOLDER_AGES,
    make_agegender_tree,
    make_csv_folder,
    make_utkface_folder,
    make_vgg_face_state,
    save_vgg_face,
)
from agegender.errors import AgeGenderError
from agegender.model.vgg import VGGFace, VGGTrunk, vgg_face_shapes

TINY = (4, 8, 8, 16, 16)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_agegender_tree(tmp_path_factory.mktemp("tree"), per_folder=4, size=64, seed=0)


def test_tree_layout_counts_and_names(tree: Path) -> None:
    ds = scan(tree)
    assert ds.kind == "agegender"
    aligned = collections.Counter(r.path.parent.name for r in ds.records if r.group == "aligned")
    assert len(aligned) == 140 and set(aligned.values()) == {4}
    valid = [r for r in ds.records if r.group == "valid"]
    assert 0.06 * 560 < len(valid) < 0.2 * 560  # valid_fraction=0.12 on average
    assert not {r.path.name for r in valid} & {r.path.name for r in ds.records if r.group == "aligned"}
    patterns = {
        "imdb": re.compile(r"nm\d{7}_rm\d+_(\d{4})-(\d{1,2})-(\d{1,2})_(\d{4})(-\d)?\.jpg"),
        "wiki": re.compile(r"\d+_(\d{4})-(\d{2})-(\d{2})_(\d{4})(-\d)?\.jpg"),
        "adience": re.compile(r"landmark_aligned_face\.\d+\.\d+_[0-9a-f]{10}_o(-\d)?\.jpg"),
    }
    for r in ds.records:
        source, identity = parse_identity(r.path.name)
        assert (source, identity) == (r.source, r.identity) and source in patterns
        m = patterns[source].fullmatch(r.path.name)
        assert m, r.path.name
        if source == "adience":
            assert r.age in ADIENCE_FOLDER_AGES
        else:  # the folder age is photo year - birth year, or one less
            assert int(m.group(4)) - int(m.group(1)) - r.age in (0, 1)
    assert {r.source for r in ds.records} == {"imdb", "wiki", "adience"}
    assert any(re.search(r"_\d{4}-1\.jpg$|_o-1\.jpg$", r.path.name) for r in ds.records)


def test_tree_people_leak_into_valid_like_the_real_data(tree: Path) -> None:
    ds = scan(tree)
    people = collections.Counter(r.identity for r in ds.records if r.group == "aligned")
    assert max(people.values()) >= 2  # several images per person
    assert folder_split(ds.records, seed=0).leaked_identities() > 10
    assert identity_split(ds.records, seed=0).leaked_identities() == 0


def test_tree_images_are_128px_progressive_jpegs_and_deterministic(tmp_path: Path) -> None:
    a = make_agegender_tree(tmp_path / "a", per_folder=2, ages=range(1, 4), seed=3, valid_fraction=0.5)
    b = make_agegender_tree(tmp_path / "b", per_folder=2, ages=range(1, 4), seed=3, valid_fraction=0.5)
    c = make_agegender_tree(tmp_path / "c", per_folder=2, ages=range(1, 4), seed=4, valid_fraction=0.5)
    files = {p.relative_to(a): p.read_bytes() for p in a.rglob("*.jpg")}
    assert files == {p.relative_to(b): p.read_bytes() for p in b.rglob("*.jpg")}
    assert set(files) != {p.relative_to(c) for p in c.rglob("*.jpg")}
    for path in a.rglob("*.jpg"):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (128, 128)) and im.info.get("progressive")
    with pytest.raises(AgeGenderError, match="already exists"):
        make_agegender_tree(tmp_path / "a", per_folder=1, ages=[5])


def _features(records: list[FaceRecord], trunk: torch.nn.Module) -> torch.Tensor:
    images, ok = decode_batch([r.path for r in records], 64, workers=2)
    assert ok.all()
    with torch.no_grad():
        x = trunk(VGG_FACE_PREPROCESS.resized(64).normalize(torch.from_numpy(images))).flatten(1)
    return x


def _ridge(x: torch.Tensor, y: torch.Tensor, x_new: torch.Tensor, lam: float = 10.0) -> torch.Tensor:
    """Fit a ridge-regularised linear readout on (x, y) and apply it to x_new."""
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ y)
    return torch.cat([x_new, torch.ones(len(x_new), 1)], 1) @ w


@pytest.mark.slow
def test_gender_and_age_are_learnable_by_a_random_conv_net(tree: Path) -> None:
    torch.manual_seed(0)  # the trunk's default init; the rest uses explicit generators
    trunk = VGGTrunk((8, 16, 16, 32, 32)).eval()
    splits = identity_split(scan(tree).records, seed=0)
    train, test = _features(splits["train"], trunk), _features(splits["test"], trunk)
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    gender_train = torch.tensor([2.0 * r.gender - 1 for r in splits["train"]])
    gender_test = torch.tensor([float(r.gender) for r in splits["test"]])
    accuracy = ((_ridge(train, gender_train, test) > 0).float() == gender_test).float().mean().item()
    assert accuracy > 0.9, accuracy
    # age: the same readout beats predicting the training mean by a wide margin
    age_train = torch.tensor([float(r.age) for r in splits["train"]])
    age_test = torch.tensor([float(r.age) for r in splits["test"]])
    mae = (_ridge(train, age_train, test) - age_test).abs().mean()
    baseline = (age_train.mean() - age_test).abs().mean()
    assert mae < 0.6 * baseline, (mae, baseline)


def _centre_brightness(path: Path) -> float:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), float)
    h, w = arr.shape
    return float(arr[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].mean())


def test_utkface_folder(tmp_path: Path) -> None:
    ds = scan(make_utkface_folder(tmp_path / "utk", n=30, seed=1))
    assert ds.kind == "utkface" and len(ds.records) == 30
    assert all(r.path.name.endswith(".jpg.chip.jpg") and r.race is not None for r in ds.records)
    # UTKFace codes 0 = male; the faces drawn for records scanned as female must be the lighter ones
    light = {g: np.mean([_centre_brightness(r.path) for r in ds.records if r.gender == g]) for g in (0, 1)}
    assert light[0] > light[1] + 20


def test_csv_folder(tmp_path: Path) -> None:
    ds = scan(make_csv_folder(tmp_path / "csv", n=20, seed=2))
    assert ds.kind == "csv" and len(ds.records) == 20
    assert len({r.identity for r in ds.records}) == 10
    assert all(r.age is not None and r.race and r.source == "csv" for r in ds.records)
    splits = identity_split(ds.records, (0.6, 0.2, 0.2), seed=0)
    assert splits.leaked_identities() == 0


def test_vgg_face_state_shapes_and_determinism() -> None:
    state = make_vgg_face_state(TINY, fc=32, classes=10, seed=0)
    assert {k: tuple(v.shape) for k, v in state.items()} == vgg_face_shapes(TINY, 32, 10)
    assert all(v.dtype == torch.float32 for v in state.values())
    again, other = make_vgg_face_state(TINY, 32, 10, seed=0), make_vgg_face_state(TINY, 32, 10, seed=1)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["conv1_1.weight"], other["conv1_1.weight"])


@pytest.mark.parametrize(("widths", "size"), [(TINY, 64), (TINY, 224), pytest.param(VGG16_WIDTHS, 224, marks=pytest.mark.slow)])
def test_vgg_face_state_keeps_activations_finite(widths: tuple[int, ...], size: int) -> None:
    net = VGGFace(widths, fc=32, classes=10).eval()
    net.load_canonical(make_vgg_face_state(widths, fc=32, classes=10, seed=0))
    rgb = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = VGG_FACE_PREPROCESS.resized(size).normalize(rgb)
    with torch.no_grad():
        features, logits = net.trunk(x), net(x)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    # He init keeps the scale of the 0-255 input: neither vanished nor exploded after 13 ReLU convs
    assert 1 < features.std().item() < 1e4 and logits.std().item() > 1e-3


def test_save_vgg_face_writes_convert_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    state = make_vgg_face_state(TINY, fc=32, classes=10, seed=0)
    path = save_vgg_face(tmp_path / "w" / "vgg_face.safetensors", state)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    assert set(meta) == {"source_sha256", "source_format", "preprocess", "widths"}
    assert meta["source_format"] == "synthetic" and re.fullmatch(r"[0-9a-f]{64}", meta["source_sha256"])
    assert Preprocess.from_dict(json.loads(meta["preprocess"])) == VGG_FACE_PREPROCESS
    assert json.loads(meta["widths"]) == list(TINY)
    assert all(torch.equal(loaded[k], state[k]) for k in state) and set(loaded) == set(state)
    assert not list(path.parent.glob("*.part"))
    other = save_vgg_face(tmp_path / "other.safetensors", make_vgg_face_state(TINY, 32, 10, seed=1))
    with safe_open(str(other), "pt") as f:
        assert f.metadata()["source_sha256"] != meta["source_sha256"]
