"""Process-wide state: thread pools come back as they were, the environment tuning is one call, and errors speak
the caller's vocabulary (parameters in Python, flags on the command line)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from agegender.cli import main
from agegender.errors import AgeGenderError, InputError, OptionError, one_line
from agegender.process import TUNING, ThreadScope, configure, set_process_threads

REPO = Path(__file__).resolve().parents[1]


def _pools() -> tuple[int, int]:
    return torch.get_num_threads(), cv2.getNumThreads()


@pytest.fixture
def known_pools() -> Iterator[tuple[int, int]]:
    """Pools at counts other than 1 (so that 1 is a change), put back after the test whatever it does."""
    with ThreadScope():
        torch.set_num_threads(2)
        cv2.setNumThreads(3)
        yield _pools()


def test_a_scope_restores_both_pools_even_on_an_error(known_pools: tuple[int, int]) -> None:
    with pytest.raises(RuntimeError, match="inside"), set_process_threads(1):
        assert _pools() == (1, 1)
        raise RuntimeError("inside")
    assert _pools() == known_pools
    set_process_threads(1, torch=False)  # a plain call stays set (a worker's own process)
    assert _pools() == (known_pools[0], 1)


def test_threads_must_be_positive(known_pools: tuple[int, int]) -> None:
    with pytest.raises(OptionError, match="^threads must be at least 1, got 0$"):
        set_process_threads(0)
    assert _pools() == known_pools


def test_batches_share_cores_inside_the_block_only(
    known_pools: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agegender.infer.predict import Predictor, share_cores_for_batches
    from test_predict import make_checkpoint

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    with share_cores_for_batches(Predictor.from_path(checkpoint, no_detect=True)):
        assert _pools() == known_pools  # no detection: the classifier keeps every core
    with share_cores_for_batches(Predictor.from_path(checkpoint)):
        assert _pools() == (1, 1)  # a task per core: no pools on top
    assert _pools() == known_pools
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    with share_cores_for_batches(Predictor.from_path(checkpoint)):
        assert _pools() == (known_pools[0], 1)  # the user's torch setting wins
    assert _pools() == known_pools


def test_the_predict_command_leaves_the_pools_as_it_found_them(known_pools: tuple[int, int], tmp_path: Path) -> None:
    """An in-process `agegender predict` (as tests and notebooks run it) must not leave the caller single-threaded."""
    from test_predict import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    photo = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", str(photo), "--model", str(checkpoint), "-o", str(tmp_path / "out.jsonl")]) == 0
    assert _pools() == known_pools
    assert main(["predict", str(tmp_path / "missing.png"), "--model", str(checkpoint)]) == 2  # failing too
    assert _pools() == known_pools


@pytest.mark.slow
def test_training_restores_torch_threads(known_pools: tuple[int, int], tmp_path: Path) -> None:
    from agegender.data.synthetic import make_agegender_tree

    data = make_agegender_tree(tmp_path / "data", per_folder=2, ages=range(20, 24), seed=0)
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--backbone",
        "vgg-face",
        "--init",
        "scratch",
        "--widths",
        "4",
        "4",
        "4",
        "4",
        "4",
        "--image-size",
        "32",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--no-cache",
    ]
    assert main(argv) == 0
    assert _pools() == known_pools


def test_configure_sets_only_what_the_user_left_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    import agegender

    for name in TUNING:
        monkeypatch.delenv(name, raising=False)
    assert agegender.configure() == TUNING
    assert all(os.environ[k] == v for k, v in TUNING.items())
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own choice stays
    assert "OMP_WAIT_POLICY" not in configure() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_importing_agegender_changes_nothing() -> None:
    """configure() is a call, never an import side effect: a fresh interpreter imports the package untouched."""
    code = (
        "import os, sys; before = dict(os.environ); import agegender, agegender.process; "
        "assert dict(os.environ) == before; assert 'torch' not in sys.modules and 'cv2' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k not in TUNING}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


# -- errors in the caller's vocabulary ------------------------------------------------------------


def test_option_errors_name_the_parameter_in_python_and_the_flag_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agegender.faces.detect import default_detector
    from test_predict import make_checkpoint

    with pytest.raises(OptionError) as e:
        default_detector(max_faces=0)
    assert str(e.value) == "max_faces must be at least 1, got 0" and e.value.parameter == "max_faces"
    assert isinstance(e.value, AgeGenderError) and isinstance(e.value, ValueError)
    checkpoint = make_checkpoint(tmp_path / "tiny.safetensors")
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40)).save(photo)
    assert main(["predict", str(photo), "--model", str(checkpoint), "--max-faces", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "agegender: error: --max-faces must be at least 1, got 0"


def test_an_option_error_rewrites_only_its_own_backticked_names() -> None:
    e = OptionError("/data/`batch_size`/x: `batch_size` 0 with `hidden` (16,); batch_size stays", "batch_size", "hidden")
    assert str(e) == "/data/batch_size/x: batch_size 0 with hidden (16,); batch_size stays"
    assert e.for_cli() == "/data/--batch-size/x: --batch-size 0 with --hidden (16,); batch_size stays"
    assert e.for_cli({"hidden": "--hidden-layers"}).endswith("--hidden-layers (16,); batch_size stays")
    assert pickle.loads(pickle.dumps(e)).for_cli() == e.for_cli()  # Ray sends errors between processes
    with pytest.raises(TypeError):
        OptionError("no parameter named")
    assert issubclass(OptionError, InputError) and issubclass(InputError, ValueError)


def test_faces_and_model_raise_the_projects_types_for_bad_arrays() -> None:
    from agegender.faces.align import face_chip, similarity_transform
    from agegender.faces.detect import HaarDetector
    from agegender.images import ImageError
    from agegender.model.meta import CheckpointMeta

    bad_image = np.zeros((10, 10), np.float32)
    for call in (lambda: HaarDetector().detect(bad_image), lambda: face_chip(bad_image, np.zeros((5, 2)))):
        with pytest.raises(ImageError):  # one type for an array that is no image, whoever checks it
            call()
    with pytest.raises(InputError, match="matching sets"):
        similarity_transform(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(InputError, match="not an agegender checkpoint"):
        CheckpointMeta.from_json("{}")
    assert issubclass(ImageError, InputError)  # still a ValueError, as these were before


def test_one_line() -> None:
    assert one_line(ValueError("first\n\tsecond  \x1b[31mred\x1b[0m")) == "first second red"
    assert one_line(KeyError()) == "KeyError" and one_line(OSError("full"), with_type=True) == "OSError: full"
    assert one_line("x" * 500, limit=10) == "x" * 10 and one_line("") == ""
