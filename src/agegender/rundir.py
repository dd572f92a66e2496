"""A training run's directory and an evaluation's report folder: every file either holds, named once.

``train`` writes a run, ``--resume`` continues it, ``evaluate`` reads its recorded splits and config, ``export``
and ``predict`` take its best checkpoint, and ``reproduce`` puts one in its work directory; each of them reaches
the files through :class:`RunDir`, so the layout lives here and nowhere else. Torch-free: reading a run's
config or splits needs no model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AgeGenderError
from .files import LOCK_NAME, write_text_atomic


@dataclass(frozen=True)
class ReportDir:
    """An evaluation's folder: the report (JSON and Markdown), its figures and the per-face predictions."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def json(self) -> Path:
        return self.path / "report.json"

    @property
    def md(self) -> Path:
        return self.path / "report.md"

    @property
    def predictions(self) -> Path:
        """One row per evaluated face: what the report's figures were computed from (see ``Predictions.save_csv``)."""
        return self.path / "predictions.csv"

    @property
    def markers(self) -> tuple[str, ...]:
        """The files that say a report is already here (an earlier evaluation is replaced only with force)."""
        return (self.md.name, self.json.name)


@dataclass(frozen=True)
class RunDir:
    """A training run's directory (``train --out``)::

        config.json          the training options that apply (resume reads them back)
        splits.json          the image paths of each split, as trained (evaluate reads them back)
        model.safetensors    the best epoch, self-describing: what predict, evaluate and export take
        last.safetensors     the latest epoch \\ what --resume continues from
        train_state.pt       its optimizer    /
        history.jsonl        one line of losses and metrics per epoch
        training_curves.png  the same, drawn
        report/              the test split's report (report.json, report.md, predictions.csv, figures)
        eval-<name>/         later evaluations (``evaluate --model RUN``)
        .lock                held while a process writes here

    Features cached for training live beside the run (``../cache``) unless ``--cache-dir`` says otherwise, so
    runs on the same data share them.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- the files ------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def splits(self) -> Path:
        return self.path / "splits.json"

    @property
    def checkpoint(self) -> Path:
        """The best epoch's checkpoint."""
        return self.path / "model.safetensors"

    @property
    def last(self) -> Path:
        return self.path / "last.safetensors"

    @property
    def train_state(self) -> Path:
        """The resume state; writing it commits an epoch (see ``train.loop._save_state``)."""
        return self.path / "train_state.pt"

    @property
    def pending(self) -> Path:
        """An epoch's weights waiting for its commit, moved to :attr:`last` once the state is written."""
        return self.path / ".last.pending.safetensors"

    @property
    def history(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def curves(self) -> Path:
        return self.path / "training_curves.png"

    @property
    def report(self) -> ReportDir:
        return ReportDir(self.path / "report")

    def evaluation(self, name: str) -> ReportDir:
        """Where ``evaluate`` reports on data set ``name`` (``test`` for the run's own test split)."""
        return ReportDir(self.path / f"eval-{name}")

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def default_cache(self) -> Path:
        """The feature cache without ``--cache-dir``: beside the run, shared by the runs next to it."""
        return self.path.parent / "cache"

    @property
    def markers(self) -> tuple[str, ...]:
        """The files that say a run is already here (a new run replaces it only with force)."""
        return (self.config.name, self.checkpoint.name)

    # -- what it says -------------------------------------------------------------------------
    @classmethod
    def holding(cls, checkpoint: str | os.PathLike[str]) -> RunDir | None:
        """The run directory ``checkpoint`` sits in, or None for a checkpoint or export outside one."""
        run = cls(Path(checkpoint).parent)
        return run if run.config.is_file() else None

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        """config.json as written by training; one line naming the file when it is not a run's config."""
        try:
            stored = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise AgeGenderError(f"{self.config}: unreadable run config ({type(e).__name__}: {e})") from None
        if not isinstance(stored, dict):
            raise AgeGenderError(f"{self.config}: not a run config")
        return stored

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_text_atomic(self.config, json.dumps(dict(config), indent=2))

    def read_splits(self) -> dict[str, list[str]] | None:
        """The image paths training put in each split, or None for a run that recorded none (older runs)."""
        if not self.splits.is_file():
            return None
        try:
            recorded = json.loads(self.splits.read_text(encoding="utf-8", errors="surrogateescape"))
        except (OSError, ValueError, RecursionError) as e:
            raise AgeGenderError(f"{self.splits}: unreadable splits ({type(e).__name__})") from None
        if not isinstance(recorded, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in recorded.values()
        ):
            raise AgeGenderError(f"{self.splits}: not a run's splits (split name -> list of image paths)")
        return recorded

    def write_splits(self, splits: Mapping[str, Sequence[str | os.PathLike[str]]]) -> None:
        write_text_atomic(self.splits, json.dumps({k: [str(p) for p in v] for k, v in splits.items()}))

    def write_history(self, history: Sequence[Mapping[str, float]]) -> None:
        write_text_atomic(self.history, "".join(json.dumps(dict(r)) + "\n" for r in history))
