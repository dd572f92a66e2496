"""Prediction on Ray Data: the same records as the plain path, idempotent shards, a dying worker, resume."""

from __future__ import annotations

import collections
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agegender.errors import AgeGenderError
from agegender.images import expand_paths
from agegender.infer.predict import Predictor
from agegender.infer.ray_predict import (
    PredictorRecipe,
    list_inputs,
    make_shards,
    predict_on_ray,
    read_records,
    shard_files,
    shard_name,
)

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from test_predict import make_checkpoint, make_onnx  # noqa: E402


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module: starting it takes seconds on 2 cores."""
    # Test-only classes below travel to the workers by value: the tests folder is not on their path.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ray_models")
    return make_onnx(make_checkpoint(d / "tiny.safetensors"), d / "tiny.onnx")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos with faces, and three files that are not images."""
    from conftest import faces_dir

    shared = faces_dir()
    if shared is None:
        pytest.skip("real face photos (../shared/faces) not available")
    folder = tmp_path_factory.mktemp("ray_photos")
    for f in sorted((shared / "lfw").glob("*.jpg"))[:10]:
        shutil.copy(f, folder)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    return folder


def _plain(model: Path, paths: list[str]) -> list[dict[str, Any]]:
    predictor = PredictorRecipe(str(model)).build()
    return sorted((r.to_dict() for r in predictor.predict_many(paths)), key=lambda r: r["path"])


def _written(out: Path) -> list[dict[str, Any]]:
    return sorted(read_records(out), key=lambda r: r["path"])


# -- without Ray running ------------------------------------------------------------------------


def test_inputs_from_lists_folders_and_globs(photos: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = expand_paths([str(photos)])
    (tmp_path / "list.txt").write_text("# photos\n" + "\n".join(paths[:3]) + "\n\n" + paths[0] + "\n")
    pq.write_table(pa.table({"path": paths[2:5]}), tmp_path / "list.parquet")
    got = list_inputs([str(tmp_path / "list.txt"), str(tmp_path / "list.parquet"), str(photos / "*.png")])
    assert got == [*paths[:5], str(photos / "text.png")]
    pq.write_table(pa.table({"file": paths}), tmp_path / "bad.parquet")
    with pytest.raises(AgeGenderError, match="bad.parquet: no 'path' column"):
        list_inputs([str(tmp_path / "bad.parquet")])


def test_shard_names_depend_only_on_their_paths() -> None:
    paths = [f"/p/{i}.jpg" for i in range(10)]
    shards = make_shards(paths, 4, "jsonl")
    assert [len(s["paths"]) for s in shards] == [4, 4, 2]
    assert [s["shard"] for s in shards] == [s["shard"] for s in make_shards(list(paths), 4, "jsonl")]
    assert shard_name(paths[:4], "jsonl") != shard_name(paths[1:5], "jsonl")
    assert shard_name(paths[:4], "parquet").endswith(".parquet")


# -- on a local Ray -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_records_equal_plain_records_and_bad_images_are_errors(
    local_ray: None, onnx_model: Path, photos: Path, tmp_path: Path
) -> None:
    paths = expand_paths([str(photos)])
    summary = predict_on_ray([str(photos)], tmp_path / "out", onnx_model, shard_size=4, batch_size=3)
    got = _written(tmp_path / "out")
    assert got == _plain(onnx_model, paths)
    assert [r["path"] for r in got] == sorted(paths)  # each path exactly once
    errors = {Path(r["path"]).name: r["error"] for r in got if r["error"]}
    assert set(errors) == {"corrupt.jpg", "empty.jpg", "text.png"}
    assert all(e.startswith(str(photos)) for e in errors.values())  # the message names the file
    assert sum(len(r["faces"]) for r in got) >= 8  # the LFW photos' faces were found
    assert (summary.images, summary.errors, summary.workers) == (13, 3, 2)
    assert summary.faces == sum(len(r["faces"]) for r in got) and summary.images_per_s > 0
    assert summary.shards == len(shard_files(tmp_path / "out")) == 7  # 4 a worker at most: shards of 2
    assert (tmp_path / "out" / "summary.json").is_file()


@dataclass
class CrashOnce:
    """Builds the predictor, which kills its own process halfway through its first shard, once per marker."""

    recipe: PredictorRecipe
    marker: str

    def __call__(self) -> Predictor:
        predictor = self.recipe.build()
        plain = predictor.predict_many
        marker = self.marker

        def predict_many(paths: list[str], batch_size: int = 32) -> Any:
            for i, result in enumerate(plain(paths, batch_size)):
                if i == 1:
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        pass
                    else:
                        os.close(fd)
                        os._exit(1)  # no cleanup, no exception: the worker process is simply gone
                yield result

        predictor.predict_many = predict_many  # type: ignore[method-assign]
        return predictor


@pytest.mark.slow
def test_a_killed_worker_leaves_complete_output_without_duplicates(
    local_ray: None, onnx_model: Path, photos: Path, tmp_path: Path
) -> None:
    paths = expand_paths([str(photos)])
    marker = tmp_path / "crashed"
    crash = CrashOnce(PredictorRecipe(str(onnx_model)), str(marker))
    summary = predict_on_ray([str(photos)], tmp_path / "out", make_predictor=crash, shard_size=3, retries=2)
    assert marker.is_file()  # a worker did die mid-shard
    got = _written(tmp_path / "out")
    counts = collections.Counter(r["path"] for r in got)
    assert sorted(counts) == sorted(paths) and set(counts.values()) == {1}
    assert got == _plain(onnx_model, paths)
    assert summary.images == len(paths)
    assert not list((tmp_path / "out").glob(".part-*"))  # the dead attempt's temp file is gone


@pytest.mark.slow
def test_resume_skips_what_is_written_and_parquet_gives_the_same_records(
    local_ray: None, onnx_model: Path, photos: Path, tmp_path: Path
) -> None:
    paths = expand_paths([str(photos)])
    out = tmp_path / "out"
    first = predict_on_ray(paths[:5], out, onnx_model, shard_size=2, output_format="parquet")
    assert (first.images, first.skipped) == (5, 0)
    with pytest.raises(AgeGenderError, match="shards of an earlier run"):
        predict_on_ray([str(photos)], out, onnx_model, output_format="parquet")
    before = {f.name: f.stat().st_mtime_ns for f in shard_files(out)}
    second = predict_on_ray([str(photos)], out, onnx_model, shard_size=2, output_format="parquet", resume=True)
    assert (second.images, second.skipped) == (len(paths) - 5, 5)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # earlier shards untouched
    assert _written(out) == _plain(onnx_model, paths)
    done = predict_on_ray([str(photos)], out, onnx_model, output_format="parquet", resume=True)
    assert (done.images, done.skipped, done.shards) == (0, len(paths), 0)
    with pytest.raises(AgeGenderError, match="shards of another format"):
        predict_on_ray([str(photos)], out, onnx_model, output_format="jsonl", resume=True)


def test_a_retried_shard_whose_file_landed_is_read_back_not_redone(onnx_model: Path, photos: Path, tmp_path: Path) -> None:
    """The actor's own logic, in this process: Ray retries a call whose actor died after the rename."""
    import pyarrow as pa

    from agegender.infer.ray_predict import ShardPredictor
    from agegender.process import ThreadScope

    paths = expand_paths([str(photos)])[:4]
    (shard,) = make_shards(paths, 4, "jsonl")
    batch = pa.Table.from_pylist([shard])
    with ThreadScope():  # an actor sizes its process's pools for its life; here that process is the test's
        actor = ShardPredictor(PredictorRecipe(str(onnx_model)).build, str(tmp_path), 2, os.getcwd())
    first = actor(batch).to_pylist()
    written = (tmp_path / shard["shard"]).read_bytes()

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("predicted again")

    actor.predictor.predict_many = refuse  # type: ignore[method-assign]
    assert actor(batch).to_pylist() == first
    assert (tmp_path / shard["shard"]).read_bytes() == written
    assert first[0]["images"] == 4 and [r["path"] for r in read_records(tmp_path)] == paths


def test_a_bad_model_is_one_clear_error_before_ray_starts(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(AgeGenderError, match="bad.onnx: not a loadable ONNX model"):
        predict_on_ray([str(photos)], tmp_path / "out", tmp_path / "bad.onnx")
    with pytest.raises(AgeGenderError, match="no trained model here"):
        predict_on_ray([str(photos)], tmp_path / "out", tmp_path / "missing.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_predict_ray_writes_the_plain_commands_records(
    local_ray: None, onnx_model: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from agegender.cli import main

    assert main(["predict", str(photos), "--model", str(onnx_model), "-o", str(tmp_path / "plain.jsonl")]) == 0
    plain = sorted((json.loads(line) for line in open(tmp_path / "plain.jsonl")), key=lambda r: r["path"])
    assert main(["predict", str(photos), "--model", str(onnx_model), "--ray", "--out", str(tmp_path / "out")]) == 0
    assert _written(tmp_path / "out") == plain
    capsys.readouterr()
    assert main(["predict", "--ray", str(photos), "--model", str(onnx_model), "--out", str(tmp_path / "x")]) == 2
    assert f"--ray took '{photos}' for a Ray address" in capsys.readouterr().err
    assert main(["predict", str(photos), "--model", str(onnx_model), "--ray", "--out", str(tmp_path / "out")]) == 2
    assert "shards of an earlier run" in capsys.readouterr().err
