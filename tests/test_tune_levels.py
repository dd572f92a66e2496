"""``train --tune-levels``: dlib's last levels fine-tuned with the head, from mirrored activations cached in front of
them, starting from a trained frozen run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agegender.data.synthetic import make_agegender_tree
from agegender.errors import OptionError
from agegender.model.checkpoint import load_checkpoint, read_meta
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet
from agegender.train.config import TrainConfig
from agegender.train.loop import fit
from dlib_net_writer import write_dlib_resnet

TINY = dict(backbone="dlib-resnet", batch_size=16, hidden=(16,), dropout=(0.0,), progress=False, precision="fp32")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, tiny dlib weights, a frozen run on them)."""
    root = tmp_path_factory.mktemp("tune")
    weights = root / "tiny.dat"
    weights.write_bytes(write_dlib_resnet(seed=0)[0])
    data = make_agegender_tree(root / "data", per_folder=1, ages=range(20, 30), seed=1)
    cfg = TrainConfig.from_preset("default", data=str(data), out=str(root / "frozen"), weights=str(weights), epochs=2, **TINY)
    return data, weights, fit(cfg).out


def tuned_config(frozen: tuple[Path, Path, Path], out: Path, **given: object) -> TrainConfig:
    """A two-level fine-tune of the frozen run into ``out`` (``given`` overrides)."""
    data, weights, run = frozen
    options = {**TINY, "tune_levels": 2, "start_from": str(run / "model.safetensors"), **given}
    return TrainConfig.from_preset("default", data=str(data), out=str(out), weights=str(weights), **options)


@pytest.mark.parametrize("tuned", range(1, 6))
def test_lower_then_upper_is_the_trunk(tuned: int) -> None:
    torch.manual_seed(0)
    net = AgeGenderNet(ModelConfig(backbone="dlib-resnet", widths=(2, 3, 4, 5, 5), image_size=150, hidden=(8,), dropout=(0.0,)))
    for p in net.trunk.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 3, 150, 150)
    whole = net.eval()(x)
    split = net.forward_from(net.trunk.lower(x, tuned), tuned)
    assert torch.allclose(whole.gender_logit, split.gender_logit, atol=1e-5)


def test_a_tuned_run_trains_the_last_levels_only(frozen: tuple[Path, Path, Path], tmp_path: Path) -> None:
    start = frozen[2] / "model.safetensors"
    cfg = tuned_config(frozen, tmp_path / "tuned", cache_dir=str(tmp_path / "cache"), epochs=2)
    assert (cfg.epochs, cfg.lr, cfg.trunk_lr_mult) == (2, 2e-4, 0.015)  # the fine-tune's defaults, but what was given
    result = fit(cfg)
    before, after = load_file(str(start)), load_file(str(result.checkpoint))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    trunk_moved = {k.split(".")[2] for k in moved if k.startswith("trunk.")}
    assert trunk_moved == {"level4", "level5"}, trunk_moved
    assert any(not k.startswith("trunk.") for k in moved)  # the head trained with them
    meta = read_meta(result.checkpoint)
    assert meta.extra["train"]["tune_levels"] == 2 and len(meta.extra["start_from_sha256"]) == 64
    (cache,) = (tmp_path / "cache").glob("features-*.safetensors")
    rows = load_file(str(cache))["features"]
    assert rows.dtype == torch.float16 and rows.shape[1:] == (2, 4, 8, 8)  # image and mirror, level 3's (C, 8, 8)
    assert not torch.equal(rows[:, 0], rows[:, 1])
    model, _ = load_checkpoint(result.checkpoint)  # an ordinary model: a whole, fixed trunk
    assert model.trunk_is_fixed and result.report["gender"]["accuracy"] >= 0


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"backbone": "vgg-face"}, "vgg-face has no levels to tune"),
        ({"tune_levels": 6}, "must be 0 to 5"),
        ({"start_from": None}, "needs start_from"),
        ({"unfreeze": True}, "choose one"),
        ({"cache": False}, "needs the feature cache"),
    ],
)
def test_bad_tuning_options_are_refused(frozen: tuple[Path, Path, Path], tmp_path: Path, given: dict, message: str) -> None:
    cfg = tuned_config(frozen, tmp_path / "x", **given)
    if given.get("start_from", "") is None:
        cfg.start_from = None
    with pytest.raises(OptionError, match=message):
        cfg.validate()
    assert not (tmp_path / "x").exists()


def test_start_from_another_model_is_refused(frozen: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg = tuned_config(frozen, tmp_path / "x", hidden=(8,))
    with pytest.raises(OptionError, match="another hidden"):
        fit(cfg)
    assert not (tmp_path / "x").exists()


def test_the_command_line_names_the_option(
    frozen: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agegender.cli import main

    data, weights, _ = frozen
    out = tmp_path / "x"
    assert main(["train", "--data", str(data), "--weights", str(weights), "--out", str(out), "--tune-levels", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tune-levels" in err[0] and "--start-from" in err[0], err
    assert not out.exists()


def test_a_tuned_run_resumes(frozen: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A resumed fine-tune reads its weights and optimizer from its own state, not from `start_from` again."""
    cache = str(tmp_path / "cache")
    fit(tuned_config(frozen, tmp_path / "tuned", cache_dir=cache, epochs=1))
    one = load_file(str(tmp_path / "tuned" / "last.safetensors"))
    result = fit(tuned_config(frozen, tmp_path / "tuned", cache_dir=cache, epochs=2), resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]
    two = load_file(str(tmp_path / "tuned" / "last.safetensors"))
    assert not torch.equal(one["trunk.net.level5.0.conv1.weight"], two["trunk.net.level5.0.conv1.weight"])
    assert torch.equal(one["trunk.net.level1.0.conv1.weight"], two["trunk.net.level1.0.conv1.weight"])


def test_mirror_caches_both_sides_and_trains_on_them(frozen: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`mirror`: the cache holds each face's features and its mirror image's, and training draws from both."""
    data, weights, _ = frozen
    cfg = TrainConfig.from_preset(
        "default",
        data=str(data),
        out=str(tmp_path / "m"),
        weights=str(weights),
        mirror=True,
        cache_dir=str(tmp_path / "cache"),
        epochs=1,
        **TINY,
    )
    result = fit(cfg)
    (cache,) = (tmp_path / "cache").glob("features-*.safetensors")
    rows = load_file(str(cache))["features"]
    assert rows.dtype == torch.float32 and rows.shape[1:] == (2, 5)  # image and mirror image, the tiny trunk's 5
    assert not torch.equal(rows[:, 0], rows[:, 1])
    assert read_meta(result.checkpoint).extra["train"]["mirror"] is True
    with pytest.raises(OptionError, match="needs the cache"):
        TrainConfig.from_preset("default", data=str(data), out=str(tmp_path / "x"), mirror=True, cache=False, **TINY).validate()
