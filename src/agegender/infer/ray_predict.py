"""Prediction over many machines on Ray Data: the same records as ``agegender predict``, in idempotent shards.

The driver lists the inputs and cuts them into shards of ``shard_size`` paths; a shard is one row of a Ray
dataset, and ``map_batches`` hands each to an actor that built its :class:`Predictor` once and decodes,
detects, frames and classifies the shard's images, then writes the shard's file (temp then rename). A shard's
file is named by a hash of its paths, so a retried actor rewrites the same file with the same records: a worker
that dies loses nothing and duplicates nothing, however Ray regroups the rows it retries. A rerun with
``resume`` reads the paths already written and shards only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AgeGenderError, one_line
from ..faces.detect import MIN_FACE_PX, SCORE_THRESHOLD, FaceDetector
from ..files import atomic_path, write_text_atomic
from ..images import expand_paths
from .predict import ImageResult, Predictor

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

FORMATS = {"jsonl": ".jsonl", "parquet": ".parquet"}
SHARD_PREFIX = "part-"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class PredictorRecipe:
    """How each actor builds its predictor: a plain value, so it pickles to workers (detectors do not)."""

    model: str | None = None  # None: the bundled model
    detector: str = "auto"
    min_face: int = MIN_FACE_PX
    score_threshold: float = SCORE_THRESHOLD
    max_faces: int | None = None
    no_detect: bool = False
    precision: str = "auto"
    min_confidence: float = 0.5
    flip: bool = False

    def check(self) -> None:
        """Load the model and the detector once, for their errors: a model that fails to load in an actor
        reaches the driver as a bare ActorDiedError, without the message that names the file."""
        from ..model.runtime import load_backend
        from ..weights.zoo import bundled_model

        if not 0.5 <= self.min_confidence < 1:
            raise AgeGenderError(f"min_confidence must be in [0.5, 1), got {self.min_confidence}")
        load_backend(bundled_model() if self.model is None else self.model, precision=self.precision)
        self._detector()

    def build(self) -> Predictor:
        return Predictor.from_path(
            self.model,
            self._detector(),
            no_detect=self.no_detect,
            precision=self.precision,
            min_confidence=self.min_confidence,
            flip=self.flip,
        )

    def _detector(self) -> FaceDetector | None:
        from ..faces.detect import default_detector

        if self.no_detect:
            return None
        return default_detector(self.min_face, self.score_threshold, self.max_faces, kind=self.detector)


@dataclass
class RaySummary:
    images: int  # predicted in this run
    faces: int
    errors: int
    no_face: int
    skipped: int  # already in the output folder (resume)
    shards: int
    workers: int
    seconds: float
    output_dir: str

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}

    def line(self) -> str:
        return (
            f"{self.images} images ({self.skipped} already done): {self.faces} faces, {self.no_face} without a "
            f"face, {self.errors} errors; {self.images_per_s:.1f} images/s on {self.workers} workers "
            f"in {self.seconds:.1f} s -> {self.output_dir}"
        )


# -- inputs and shards --------------------------------------------------------------------------


def list_inputs(specs: Iterable[str]) -> list[str]:
    """Paths from files, folders, globs, and lists of paths (a ``.txt`` with one per line, or a ``.parquet``
    with a ``path`` column); kept as given, since they key the records, and duplicates dropped."""
    out: dict[str, None] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_file() and p.suffix.lower() == ".txt":
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise AgeGenderError(f"{p}: cannot read the list of paths ({e})") from None
            out.update(dict.fromkeys(s for line in lines if (s := line.strip()) and not s.startswith("#")))
        elif p.is_file() and p.suffix.lower() == ".parquet":
            out.update(dict.fromkeys(_parquet_paths(p)))
        else:
            out.update(dict.fromkeys(expand_paths([spec])))
    if not out:
        raise AgeGenderError(f"no inputs in {', '.join(specs) or 'the arguments'}")
    return list(out)


def _parquet_paths(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "path" not in schema.names:
            raise AgeGenderError(f"{path}: no 'path' column (columns: {', '.join(schema.names)})")
        column = pq.read_table(path, columns=["path"]).column("path")
    except AgeGenderError:
        raise
    except Exception as e:  # pyarrow raises its own many kinds for a file that is not Parquet
        raise AgeGenderError(f"{path}: not a readable Parquet list of paths ({one_line(e)})") from None
    return [str(s) for s in column.to_pylist() if s]


def shard_name(paths: Sequence[str], fmt: str) -> str:
    """The file of a shard: the same paths always give the same name, so a retry overwrites, never adds."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"{SHARD_PREFIX}{digest}{FORMATS[fmt]}"


def make_shards(paths: Sequence[str], shard_size: int, fmt: str) -> list[dict[str, Any]]:
    if shard_size < 1:
        raise AgeGenderError(f"shard size must be at least 1, got {shard_size}")
    chunks = [list(paths[i : i + shard_size]) for i in range(0, len(paths), shard_size)]
    return [{"shard": shard_name(chunk, fmt), "paths": chunk} for chunk in chunks]


def shard_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.name.startswith(SHARD_PREFIX) and f.suffix in FORMATS.values())


def read_records(output_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record in the shards of ``output_dir`` (JSON Lines or Parquet), shard by shard."""
    for f in shard_files(output_dir):
        yield from _read_shard(f)


def _read_shard(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_from_parquet_row(row) for row in pq.read_table(path).to_pylist()]
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- Parquet: the JSON record's fields, typed ---------------------------------------------------


def _parquet_schema() -> pa.Schema:
    import pyarrow as pa

    box = pa.struct(
        [
            ("x", pa.int64()),
            ("y", pa.int64()),
            ("w", pa.int64()),
            ("h", pa.int64()),
            ("score", pa.float64()),
            ("landmarks", pa.list_(pa.list_(pa.float64()))),
        ]
    )
    face = pa.struct(
        [
            ("box", box),
            ("gender", pa.string()),
            ("p_male", pa.float64()),
            ("age", pa.float64()),
            ("age_group", pa.string()),
            ("age_low", pa.int64()),
            ("age_high", pa.int64()),
        ]
    )
    return pa.schema([("path", pa.string()), ("faces", pa.list_(face)), ("error", pa.string())])


def _from_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON Lines form: Parquet's fixed schema has nulls where JSON leaves optional keys out."""
    for face in row["faces"]:
        if face["box"] is not None and face["box"]["landmarks"] is None:
            del face["box"]["landmarks"]
        if face["age_low"] is None and face["age_high"] is None:
            del face["age_low"], face["age_high"]
    return row


def _write_shard(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records, schema=_parquet_schema()), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


# -- the actor ----------------------------------------------------------------------------------


def _one_thread_each(predictor: Predictor) -> None:
    """An actor holds one core: OpenCV's, the detector's and the classifier's own pools only oversubscribe it."""
    from ..process import set_process_threads

    predictor.workers = 1
    set_process_threads(1, torch=False)  # for the actor's life: its process is its own
    set_threads = getattr(predictor.detector, "set_threads", None)
    if set_threads is not None:
        set_threads(1)
    predictor.backend.set_threads(1)


class ShardPredictor:
    """A Ray actor: builds the predictor once, then predicts and writes one shard per call."""

    def __init__(self, make_predictor: Callable[[], Predictor], output_dir: str, batch_size: int, cwd: str) -> None:
        self.predictor = make_predictor()
        _one_thread_each(self.predictor)
        self.output_dir = Path(output_dir)
        self.batch_size = batch_size
        self.cwd = cwd

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows = []
        for name, paths in zip(batch.column("shard").to_pylist(), batch.column("paths").to_pylist()):
            dest = self.output_dir / name
            # A retry of a shard whose file landed before its actor died: the file is whole (renamed into place).
            records = _read_shard(dest) if dest.is_file() else self._predict(dest, paths)
            rows.append(
                {
                    "shard": name,
                    "images": len(records),
                    "faces": sum(len(r["faces"]) for r in records),
                    "errors": sum(r["error"] is not None for r in records),
                    "no_face": sum(r["error"] is None and not r["faces"] for r in records),
                }
            )
        return pa.Table.from_pylist(rows)

    def _predict(self, dest: Path, paths: list[str]) -> list[dict[str, Any]]:
        # Relative paths are the driver's. A local Ray's workers start in its folder, but nothing promises that.
        if os.getcwd() != self.cwd and os.path.isdir(self.cwd):
            os.chdir(self.cwd)
        results: list[ImageResult] = list(self.predictor.predict_many(paths, self.batch_size))
        records = [r.to_dict() for r in results]
        _write_shard(dest, records)
        return records


# -- the driver ---------------------------------------------------------------------------------


def require_ray() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise AgeGenderError("prediction on Ray needs Ray Data: pip install 'agegender[ray]'") from None


def start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address``, or start a local Ray without its dashboard; True when this call started it."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A local instance reports nothing anywhere. Ray 2.60 has no way to bind its servers to the loopback
        # (it replaces 127.0.0.1 by the machine's address); they take a token, which a new local Ray makes
        # itself. (Setting RAY_AUTH_MODE here would come after Ray read its config at import, and break it.)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from ..devices import usable_cores

        ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False)
    return True


def _check_output(output_dir: Path, fmt: str, resume: bool) -> set[str]:
    """The paths already written (resume), after refusing to mix formats or to add to an earlier run's shards."""
    existing = shard_files(output_dir)
    if not existing:
        return set()
    if not resume:
        raise AgeGenderError(f"{output_dir}: has {len(existing)} shards of an earlier run; resume it, or choose an empty folder")
    other = [f for f in existing if f.suffix != FORMATS[fmt]]
    if other:
        raise AgeGenderError(f"{other[0]}: shards of another format in the output folder; resume with that format")
    done: set[str] = set()
    for f in existing:
        try:
            done.update(r["path"] for r in _read_shard(f))
        except Exception as e:  # a shard is renamed in whole, so this is someone else's file
            raise AgeGenderError(f"{f}: unreadable shard ({one_line(e)})") from None
    return done


def predict_on_ray(
    inputs: Sequence[str],
    output_dir: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    address: str | None = None,
    *,
    recipe: PredictorRecipe | None = None,
    output_format: str = "jsonl",
    shard_size: int = 500,
    batch_size: int = 32,
    workers: int | None = None,
    num_cpus: int | None = None,
    resume: bool = False,
    retries: int = 3,
    make_predictor: Callable[[], Predictor] | None = None,
) -> RaySummary:
    """Predict every image of ``inputs`` on Ray into shards in ``output_dir``; the summary, also logged.

    ``address``: a Ray cluster to connect to (every node must have agegender installed and see the input
    paths and ``output_dir`` at the same place: a shared file system); None starts a local Ray on ``num_cpus``
    cores (default: every usable core). ``workers`` actors (default: one per CPU of the cluster) each build the
    predictor once: from ``recipe`` (``model`` overrides its model; neither: the bundled model), or by calling
    ``make_predictor``, which must pickle. A bad image gives a record with ``error`` set; a dying worker is
    restarted and its shard retried up to ``retries`` times.
    """
    if output_format not in FORMATS:
        raise AgeGenderError(f"unknown output format {output_format!r}; choose {' or '.join(FORMATS)}")
    if batch_size < 1:
        raise AgeGenderError(f"batch size must be at least 1, got {batch_size}")
    require_ray()  # before loading a model and listing a million files
    if make_predictor is None:
        recipe = recipe or PredictorRecipe()
        if model is not None:
            recipe = PredictorRecipe(**{**asdict(recipe), "model": os.fspath(model)})
        recipe.check()
        make_predictor = recipe.build
    if shard_size < 1:
        raise AgeGenderError(f"shard size must be at least 1, got {shard_size}")
    out = Path(output_dir)
    paths = list_inputs(inputs)
    done = _check_output(out, output_format, resume)
    todo = [p for p in paths if p not in done]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AgeGenderError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    started = start_ray(address, num_cpus)
    try:
        summary = _run(
            todo, out, output_format, make_predictor, shard_size, batch_size, workers, retries, skipped=len(paths) - len(todo)
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    for stale in out.glob(f".{SHARD_PREFIX}*.part"):  # temp files of attempts that died; none is running now
        stale.unlink(missing_ok=True)
    write_text_atomic(out / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2) + "\n")
    log.info("%s", summary.line())
    return summary


def _run(
    todo: list[str],
    out: Path,
    fmt: str,
    make_predictor: Callable[[], Predictor],
    shard_size: int,
    batch_size: int,
    workers: int | None,
    retries: int,
    skipped: int,
) -> RaySummary:
    import ray
    import ray.data

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = workers or cpus
    # Small jobs in smaller shards, at least 4 per worker, so that every worker has some and the last
    # one to finish is not left alone long; large jobs in shards of shard_size.
    size = max(1, min(shard_size, -(-len(todo) // (4 * workers))))
    shards = make_shards(todo, size, fmt)
    n = max(1, min(workers, len(shards)))
    counts = {"images": 0, "faces": 0, "errors": 0, "no_face": 0}
    begin = time.perf_counter()
    if shards:
        # A block per shard, so that Ray schedules shards one by one (about 10 ms each). Correctness does not
        # depend on it: a call takes one row, a whole shard, whatever the blocks.
        ds: Any = ray.data.from_items(shards, override_num_blocks=len(shards))
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for these yet and warns; without them it retries forever, and
            # an image that kills its decoder would kill every restart.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                ShardPredictor,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=n),
                fn_constructor_kwargs={
                    "make_predictor": make_predictor,
                    "output_dir": str(out.resolve()),
                    "batch_size": batch_size,
                    "cwd": os.getcwd(),
                },
                max_restarts=retries,
                max_task_retries=retries,
            )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for key in counts:
                counts[key] += sum(batch.column(key).to_pylist())
    seconds = time.perf_counter() - begin
    return RaySummary(
        counts["images"],
        counts["faces"],
        counts["errors"],
        counts["no_face"],
        skipped,
        len(shards),
        n,
        round(seconds, 3),
        str(out),
    )
