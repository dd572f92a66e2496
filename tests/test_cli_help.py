"""The command line explains itself: defaults and examples in every help, --version, no stale aliases listed
(they still work), dlib-resnet as the training default with per-backbone defaults shown, --precision/--device
wherever a network runs."""

from __future__ import annotations

import argparse
import re

import pytest

from agegender import __version__
from agegender.cli import COMMANDS, build_parser, main

STALE = ("--run", "--workdir", "--bf16", "vgg-face is its old name", "--input-format, --format")


def _flat(text: str) -> str:
    """Help text without its line breaks (argparse also breaks lines after hyphens)."""
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text))


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_has_examples_defaults_and_no_stale_alias(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(command, capsys)
    examples = text.split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.strip().startswith(f"agegender {command}") for line in examples if line.strip())
    assert not [s for s in STALE if s in text], text
    parser = _subparser(command)
    for action in parser._actions:
        if (
            not action.option_strings
            or action.help == argparse.SUPPRESS
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            continue
        entry = parser._get_formatter()._expand_help(action)  # the option's help as --help prints it
        assert "default" in entry and _flat(entry) in _flat(text), (command, action.option_strings, entry)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"agegender {__version__}"


def test_training_defaults_to_dlib_resnet_and_shows_each_backbones_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from agegender.train.config import TrainConfig

    args = build_parser("train").parse_args(["train", "--data", "x"])
    assert args.backbone == "dlib-resnet" and args.init == "pretrained"
    assert build_parser("reproduce").parse_args(["reproduce"]).backbone == "dlib-resnet"
    text = _flat(_help("train", capsys))
    for backbone in ("dlib-resnet", "vgg-face"):
        cfg = TrainConfig.from_preset("default", data="", backbone=backbone)
        assert f"{' '.join(map(str, cfg.hidden))} for {backbone}" in text
        assert f"{cfg.age_head} for {backbone}" in text
    assert "(default: 4096 4096)" not in text  # the old one-size-fits-all claim


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "x", "--init", "vgg-face"],
        ["train", "--data", "x", "--bf16"],
        ["demo", "--workdir", "w"],
        ["reproduce", "--workdir", "w"],
        ["convert", "a.t7", "-o", "b", "--format", "t7"],
        ["evaluate", "--run", "r"],
        ["export", "--run", "r", "--format", "onnx", "-o", "m.onnx"],
    ],
)
def test_old_names_are_gone(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser(argv[0]).parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("unrecognized arguments" in err or "invalid choice: 'vgg-face'" in err), err


def test_the_names_that_replaced_them() -> None:
    assert build_parser("demo").parse_args(["demo", "--out", "w"]).out == "w"
    assert build_parser("demo").parse_args(["demo"]).out == "demo"
    assert build_parser("reproduce").parse_args(["reproduce", "--out", "w"]).out == "w"
    assert build_parser("convert").parse_args(["convert", "a.t7", "-o", "b", "--input-format", "t7"]).input_format == "t7"
    assert build_parser("convert").parse_args(["convert", "a.t7", "-o", "b"]).input_format == "auto"
    assert build_parser("evaluate").parse_args(["evaluate", "--model", "r"]).model == "r"
    assert build_parser("train").parse_args(["train", "--data", "x", "--precision", "bf16"]).precision == "bf16"


def test_precision_and_device_wherever_a_network_runs() -> None:
    for command in ("predict", "serve", "evaluate", "export", "train", "reproduce"):
        dests = {a.dest for a in _subparser(command)._actions}
        assert {"precision", "device"} <= dests, command
    assert build_parser("evaluate").parse_args(["evaluate", "--model", "r"]).precision is None  # the run's own


def test_backbone_errors_point_one_flag_away(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "--data", str(tmp_path), "--backbone", "vgg-face", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--backbone dlib-resnet" in err and "--weights" in err
    assert main(["train", "--data", str(tmp_path), "--preset", "seed", "--out", str(tmp_path / "r")]) == 2
    assert "--backbone vgg-face" in capsys.readouterr().err
    assert (
        main(["export", "--model", str(tmp_path), "--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--precision", "bf16"]) == 2
    )
    assert "fp32" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "m.onnx").exists()
