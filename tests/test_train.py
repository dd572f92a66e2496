"""Training end to end on generated data: learning, cache equivalence, resume, freezing, presets, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agegender.cli import main
from agegender.data.synthetic import make_agegender_tree, make_vgg_face_state, save_vgg_face
from agegender.train.config import TrainConfig
from agegender.train.loop import fit

TINY = (16, 32, 32, 64, 64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    make_agegender_tree(root / "data", per_folder=2, seed=3)
    save_vgg_face(root / "w.safetensors", make_vgg_face_state(widths=TINY, fc=16, classes=4, seed=1))
    return {"data": root / "data", "weights": root / "w.safetensors", "root": root}


def _split(out: Path, name: str) -> list[str]:
    import json

    return json.loads((out / "splits.json").read_text())[name]


def config(world: dict[str, Path], out: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=str(world["data"]),
        out=str(out),
        backbone="vgg-face",
        weights=str(world["weights"]),
        epochs=3,
        batch_size=32,
        hidden=(32, 32),
        progress=False,
        cache_dir=str(world["root"] / "cache"),
    )
    return TrainConfig.from_preset(str(kw.pop("preset", "default")), **{**base, **kw})


@pytest.mark.slow
def test_default_preset_learns_the_signal_and_writes_a_full_report(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = fit(config(world, tmp_path / "run", epochs=5))
    assert run.report["gender"]["accuracy"] > 0.75  # chance is ~0.5 on the balanced generated tree
    ages_train = [int(Path(p).parent.name[:2]) for p in _split(run.out, "train")]
    ages_test = [int(Path(p).parent.name[:2]) for p in _split(run.out, "test")]
    baseline = float(np.mean(np.abs(np.mean(ages_train) - np.array(ages_test))))
    assert run.report["age"]["mae"] < baseline  # better than always answering the training mean
    for name in (
        "model.safetensors",
        "last.safetensors",
        "train_state.pt",
        "history.jsonl",
        "config.json",
        "splits.json",
        "training_curves.png",
        "report/report.md",
        "report/report.json",
        "report/confusion_matrix.png",
        "report/roc.png",
    ):
        assert (run.out / name).is_file(), name
    assert run.report["protocol"]["leaked_identities"] == 0
    assert len(run.history) == 5


@pytest.mark.slow
def test_trunk_weights_never_change_when_frozen(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = fit(config(world, tmp_path / "run", epochs=2))
    trained = load_file(str(run.checkpoint))
    source = load_file(str(world["weights"]))
    for name in ("conv1_1", "conv3_3", "conv5_3"):
        assert torch.equal(trained[f"trunk.{name}.weight"], source[f"{name}.weight"])


@pytest.mark.slow
def test_cached_and_uncached_training_give_the_same_head(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cached = fit(config(world, tmp_path / "cached", epochs=2, precision="fp32"))
    naive = fit(config(world, tmp_path / "naive", epochs=2, cache=False, precision="fp32"))
    # The two trunk paths differ only by float rounding (channels_last vs plain convs), so the heads trained
    # on them must agree in what they output, not bit for bit in every weight.
    from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
    from agegender.data.batches import decode_batch
    from agegender.model.checkpoint import load_checkpoint

    paths = _split(cached.out, "test")
    images, ok = decode_batch(paths, 64)
    x = VGG_FACE_PREPROCESS.resized(64).normalize(torch.from_numpy(images[ok]))
    (a, _), (b, _) = load_checkpoint(cached.out / "last.safetensors"), load_checkpoint(naive.out / "last.safetensors")
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(torch.sigmoid(oa.gender_logit), torch.sigmoid(ob.gender_logit), rtol=0, atol=2e-3)
    torch.testing.assert_close(a.expected_age(oa.age_logits), b.expected_age(ob.age_logits), rtol=0, atol=0.1)
    assert cached.report["gender"]["accuracy"] == pytest.approx(naive.report["gender"]["accuracy"], abs=0.03)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = fit(config(world, tmp_path / "whole", epochs=4))
    fit(config(world, tmp_path / "part", epochs=2))
    resumed = fit(config(world, tmp_path / "part", epochs=4), resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a, b = load_file(str(whole.out / "last.safetensors")), load_file(str(resumed.out / "last.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    np.testing.assert_allclose([h["train_loss"] for h in whole.history], [h["train_loss"] for h in resumed.history], rtol=1e-6)


@pytest.mark.slow
def test_same_seed_same_result(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = fit(config(world, tmp_path / "a", epochs=2, seed=5))
    b = fit(config(world, tmp_path / "b", epochs=2, seed=5))
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


@pytest.mark.slow
def test_seed_preset_trains_trunk_batchnorm_but_not_convs(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = fit(config(world, tmp_path / "seed", preset="seed", epochs=1, hidden=(32, 32)))
    state = load_file(str(run.checkpoint))
    source = load_file(str(world["weights"]))
    assert torch.equal(state["trunk.conv2_1.weight"], source["conv2_1.weight"])
    assert not torch.equal(state["trunk.bn2.running_mean"], torch.zeros_like(state["trunk.bn2.running_mean"]))
    assert "age" not in run.report or not run.report["age"]


@pytest.mark.slow
def test_unfreeze_fine_tunes_the_convs(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = fit(config(world, tmp_path / "ft", epochs=1, unfreeze=True, limit=120))
    state, source = load_file(str(run.checkpoint)), load_file(str(world["weights"]))
    assert not torch.equal(state["trunk.conv1_1.weight"], source["conv1_1.weight"])


@pytest.mark.slow
def test_cli_train_then_evaluate(world, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                "--backbone",
                "vgg-face",
                "--data",
                str(world["data"]),
                "--weights",
                str(world["weights"]),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--limit",
                "150",
                "--hidden",
                "16",
                "16",
            ]
        )
        == 0
    )
    assert (out / "report" / "report.md").is_file()
    assert main(["evaluate", "--model", str(out)]) == 0
    assert (out / "eval-test" / "report.md").is_file()
    assert (
        main(["evaluate", "--model", str(out / "model.safetensors"), "--data", str(world["data"]), "--out", str(tmp_path / "ev")])
        == 0
    )
    assert "Comparison with the seed notebook" in (tmp_path / "ev" / "report.md").read_text()


def test_cli_errors_are_one_line(world, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "--backbone", "vgg-face", "--data", str(world["data"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--weights" in err and "--init scratch" in err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--init", "scratch"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--data", str(world["data"]), "--out", str(tmp_path / "y"), "--resume", "--init", "scratch"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_scratch_training_on_real_photos_beats_chance(shared_faces: Path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A small net trained from scratch on the shared WIKI photos beats chance on held-out people."""
    run = fit(
        TrainConfig.from_preset(
            "default",
            data=str(shared_faces / "wiki"),
            out=str(tmp_path / "wiki"),
            backbone="vgg-face",
            init="scratch",
            widths=(8, 16, 16, 32, 32),
            hidden=(64, 64),
            epochs=6,
            batch_size=32,
            lr=3e-3,
            progress=False,
        )
    )
    test = run.report["protocol"]["splits"]["test"]["images"]
    assert test > 100
    assert run.report["gender"]["accuracy"] > 0.6  # WIKI here is 550 M / 558 F: chance is 0.5


STEP_FAULTS = """
import resource, sys, torch
from torch import nn
from agegender.devices import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096))
opt = torch.optim.Adam(net.parameters(), fused=True)
x = torch.randn(256, 1024)

def step():
    opt.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    opt.step()

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
def test_retained_memory_stops_the_page_faults_of_training_steps() -> None:
    import platform
    import subprocess
    import sys

    from agegender.devices import retain_freed_memory

    if platform.libc_ver()[0] != "glibc":
        assert retain_freed_memory() is False
        return

    def faults(mode: str) -> int:  # a process each: the setting is process-wide and cannot be undone
        run = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    plain, retained = faults("plain"), faults("retain")
    # Each step frees and reallocates ~80 MB of gradients and Adam's temporaries: glibc hands them back to the
    # kernel and faults them in again (measured: 84k-100k faults over the 5 steps; retained: 0-11k).
    if plain < 20_000:
        pytest.skip(f"only {plain} page faults without it: this kernel backs big blocks with huge pages")
    assert retained < plain / 4


@pytest.mark.slow
def test_training_report_and_evaluate_agree_at_the_same_precision(world, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    run = fit(config(world, tmp_path / "run", epochs=2, precision="bf16"))
    assert run.report["protocol"]["precision"].startswith("torch: trunk bf16, heads fp32")
    assert main(["evaluate", "--model", str(run.out)]) == 0  # the run's own precision, its own test split
    ev = json.loads((run.out / "eval-test" / "report.json").read_text())
    assert ev["protocol"]["precision"] == run.report["protocol"]["precision"]
    assert ev["gender"]["n"] == run.report["gender"]["n"]
    for key in ("accuracy", "auc", "ece"):
        assert ev["gender"][key] == pytest.approx(run.report["gender"][key], abs=1e-9), key
    assert ev["age"]["mae"] == pytest.approx(run.report["age"]["mae"], abs=1e-6)
    # A run written before splits were recorded evaluates too: its split is made again, as it was trained.
    (run.out / "splits.json").unlink()
    assert main(["evaluate", "--model", str(run.out), "--out", str(tmp_path / "old")]) == 0
    old = json.loads((tmp_path / "old" / "report.json").read_text())
    assert old["gender"] == ev["gender"] and old["protocol"]["splits"] == ev["protocol"]["splits"]
    assert main(["evaluate", "--model", str(run.out), "--precision", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    assert json.loads((tmp_path / "fp32" / "report.json").read_text())["protocol"]["precision"].startswith("torch: trunk fp32")


@pytest.mark.slow
def test_a_run_records_its_losses_apart_and_only_the_options_that_apply(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    run = fit(config(world, tmp_path / "run", epochs=1))
    row = run.history[0]
    assert {"train_gender_loss", "train_age_loss", "val_gender_loss", "val_age_loss"} <= set(row)
    assert row["train_loss"] == pytest.approx(row["train_gender_loss"] + row["train_age_loss"], rel=1e-5)
    stored = json.loads((run.out / "config.json").read_text())
    assert "alignment" not in stored and "widths" not in stored and stored["image_size"] == 64
    dlib = TrainConfig.from_preset("default", data="x", backbone="dlib-resnet").applicable_dict()
    assert not {"image_size", "pixels", "widths", "block_bn"} & set(dlib)
    assert dlib["hidden"] == [512, 512] and dlib["alignment"] == ""
    protocol = run.report["protocol"]
    assert protocol["leaked_identities"] == 0 and protocol["leakage"].endswith("identities in more than one split")
    assert "seed notebook" in (run.out / "report" / "report.md").read_text()  # agegender_cleaned's layout


@pytest.mark.slow
def test_evaluations_go_to_a_folder_per_data_set_and_never_overwrite(world, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from agegender.data.synthetic import make_csv_folder, make_utkface_folder

    run = fit(config(world, tmp_path / "run", epochs=1))
    utk = make_utkface_folder(tmp_path / "utk", n=24, seed=1)
    other = make_csv_folder(tmp_path / "faces", n=24, seed=2)
    assert main(["evaluate", "--model", str(run.out), "--data", str(utk)]) == 0
    assert main(["evaluate", "--model", str(run.out), "--data", str(other)]) == 0
    first = (run.out / "eval-utk" / "report.md").read_text()
    assert (run.out / "eval-faces" / "report.md").is_file()
    assert "leakage**: not measured" in first and "seed notebook" not in first
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run.out), "--data", str(utk)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "eval-utk" in err and "--force" in err
    assert main(["evaluate", "--model", str(run.out), "--data", str(utk), "--force"]) == 0
    # Two sets at once: both named, per source and in the protocol.
    assert main(["evaluate", "--model", str(run.out), "--data", str(utk), "--data", str(other)]) == 0
    both = (run.out / "eval-utk+faces" / "report.json").read_text()
    import json

    r = json.loads(both)
    assert r["protocol"]["data"] == [str(utk), str(other)]
    assert set(r["slices"]["by"]["data set"]) == {"utk", "faces"}
    # A second train into the same folder is refused too.
    capsys.readouterr()
    args = [
        "train",
        "--backbone",
        "vgg-face",
        "--data",
        str(world["data"]),
        "--weights",
        str(world["weights"]),
        "--out",
        str(run.out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--limit",
        "150",
        "--hidden",
        "16",
        "16",
    ]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (run.out / "eval-utk").is_dir()


@pytest.mark.slow
def test_two_data_folders_train_evaluate_and_match_predict_and_onnx(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A run on two --data folders evaluates from its recorded splits (no --data); the per-face predictions the
    report wrote, predict on the checkpoint and predict on the ONNX export give the same P(male) and ages."""
    import json

    from agegender.infer.exporters import export
    from agegender.infer.predict import Predictor
    from agegender.rundir import RunDir
    from agegender.train.report import Predictions

    second = tmp_path / "second"
    make_agegender_tree(second, per_folder=1, seed=9)
    run = fit(config(world, tmp_path / "run", epochs=2, data=(str(world["data"]), str(second))))
    assert run.run == RunDir(tmp_path / "run") and run.report_md == run.run.report.md
    trained = Predictions.load_csv(run.run.report.predictions)  # training's own report wrote its faces too
    assert set(trained.paths) == set(_split(run.out, "test"))
    assert main(["evaluate", "--model", str(run.out), "--precision", "fp32"]) == 0
    evaluation = run.run.evaluation("test")
    report = json.loads(evaluation.json.read_text())
    assert report["protocol"]["precision"].startswith("torch: trunk fp32")
    test = _split(run.out, "test")
    assert report["protocol"]["splits"]["test"]["images"] == len(test)
    assert {str(Path(p).parents[3]) for p in test} == {str(world["data"]), str(second)}  # faces of both folders
    reported = Predictions.load_csv(evaluation.predictions)
    assert sorted(reported.paths) == sorted(test) and reported.age_pred is not None
    assert report["gender"]["n"] == len(reported.paths)
    export(run.out, "onnx", tmp_path / "m.onnx")
    for model in (run.out, tmp_path / "m.onnx"):
        # predict frames a whole image as the report does (the centre square), so the numbers agree
        predictor = Predictor.from_path(model, no_detect=True, precision="fp32")
        faces = [predictor.predict(p)[0] for p in reported.paths]
        np.testing.assert_allclose([f.p_male for f in faces], reported.p_male, atol=1e-4, err_msg=str(model))
        np.testing.assert_allclose([f.age for f in faces], reported.age_pred, rtol=1e-4, err_msg=str(model))
    assert (
        main(["evaluate", "--model", str(tmp_path / "m.onnx"), "--data", str(second), "--out", str(tmp_path / "eval-onnx")]) == 0
    )
    assert (tmp_path / "eval-onnx" / "report.md").is_file()


def test_fit_trains_on_the_features_handed_to_it(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A feature source (a benchmark's per-set extraction) replaces the run's cache: the same features give the
    same weights, nothing is extracted; a source lacking an image leaves it to the cache; a wrong one is refused."""
    from dataclasses import replace

    from agegender.data.batches import FeatureSet
    from agegender.data.features import FeatureBank, cached_features
    from agegender.errors import AgeGenderError
    from agegender.faces.detect import photo_framer
    from agegender.train.loop import age_range, build_model, fit_splits

    cfg = config(world, tmp_path / "a", epochs=2, precision="fp32", cache_dir=str(tmp_path / "cache-a"))
    a = fit(cfg)
    assert a.features_cached is False  # extracted by this run
    _, splits = fit_splits(cfg)
    records = splits.train + splits.val + splits.test
    model, pre, sha = build_model(cfg, age_range(splits.train))
    fs = cached_features(model, records, pre, tmp_path / "cache-a", weights_sha256=sha, frame=photo_framer(pre), progress=False)
    bank = FeatureBank()
    bank.add(records, fs)
    b = fit(replace(cfg, out=str(tmp_path / "b"), cache_dir=str(tmp_path / "cache-b")), features=bank)
    assert b.features_cached and not (tmp_path / "cache-b").exists()
    wa, wb = load_file(str(a.out / "last.safetensors")), load_file(str(b.out / "last.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    partial = FeatureBank()
    partial.add(records[1:], FeatureSet(fs.features[1:], fs.ok[1:]))
    c = fit(replace(cfg, out=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache-c"), epochs=1), features=partial)
    assert c.features_cached is False and list((tmp_path / "cache-c").glob("features-*.safetensors"))
    with pytest.raises(AgeGenderError, match="the given features have shape"):
        fit(
            replace(cfg, out=str(tmp_path / "d")),
            features=lambda recs: FeatureSet(torch.zeros(len(recs), 3), torch.ones(len(recs), dtype=torch.bool)),
        )
    assert not (tmp_path / "d").exists()  # nothing half-written


@pytest.mark.slow
def test_fit_calibrates_p_male_on_validation(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agegender.model.checkpoint import read_meta

    run = fit(config(world, tmp_path / "run", epochs=2))
    meta = read_meta(run.checkpoint)
    cal = meta.extra["calibration"]
    assert cal["temperature"] == pytest.approx(meta.config.temperature, abs=1e-4)
    assert 0.05 <= meta.config.temperature <= 20 and cal["fitted_on"] == "val" and cal["faces"] > 0
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    # The age stretch, fitted on the same split's exact ages: never worse there than none, and in the config.
    ages = meta.extra["age_calibration"]
    assert (ages["age_pivot"], ages["age_stretch"]) == (meta.config.age_pivot, meta.config.age_stretch)
    assert ages["fitted_on"] == "val" and ages["faces"] > 0 and 0 <= meta.config.age_stretch <= 0.5
    if ages["balanced_mae_before"] == ages["balanced_mae_before"]:  # not NaN: some band had enough faces
        assert ages["balanced_mae_after"] <= ages["balanced_mae_before"]


def test_the_best_epoch_covers_both_heads() -> None:
    """A gender point weighs as much as a year of age MAE: an epoch a hair better on gender but with an age head
    that had not converged loses; without ages, gender alone decides. Old states are rescored the new way."""
    from agegender.train.loop import _rescored_best, epoch_score

    early = {"val_accuracy": 0.951, "val_loss": 0.12, "val_age_mae": 8.1}
    later = {"val_accuracy": 0.950, "val_loss": 0.13, "val_age_mae": 4.8}
    assert epoch_score(later) > epoch_score(early)
    assert epoch_score({"val_accuracy": 0.9, "val_loss": 0.2}) > epoch_score({"val_accuracy": 0.8, "val_loss": 0.1})
    history = [{"epoch": 1, **early}, {"epoch": 2, **later}, {"epoch": 3, "val_accuracy": 0.99, "val_loss": 0.1}]
    # The old rule kept epoch 1 (the best accuracy up to epoch 2); its score is what epoch 3 must beat.
    assert _rescored_best(history, 2) == (epoch_score(early), 0.12)
    assert _rescored_best([{"epoch": "x"}], 2) == (-math.inf, math.inf)
