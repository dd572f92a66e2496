"""What a checkpoint or an export says about itself, without torch: ONNX inference needs only this."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AgeGenderError, InputError
from ..files import os_reason
from ..labels import GENDERS
from ..rundir import RunDir
from .config import ModelConfig, Preprocess

FORMAT = "agegender.checkpoint/1"


@dataclass
class CheckpointMeta:
    config: ModelConfig
    preprocess: Preprocess
    genders: tuple[str, ...] = GENDERS
    weights_sha256: str | None = None  # the pretrained file the trunk came from (VGG-Face's, dlib's)
    extra: dict[str, Any] = field(default_factory=dict)  # data summary, headline metrics, epoch ...

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "config": self.config.to_dict(),
                "preprocess": self.preprocess.to_dict(),
                "genders": list(self.genders),
                "weights_sha256": self.weights_sha256,
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        from .schema import check_meta_document

        try:
            d = json.loads(text)
        except RecursionError:
            raise InputError("metadata nested too deeply to be a checkpoint's") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else None
            raise InputError(f"not an agegender checkpoint (format {str(fmt)[:40]!r})")
        check_meta_document(d)  # types and ranges, before anything is built from them
        try:
            return cls(
                ModelConfig.from_dict(d["config"]),
                Preprocess.from_dict(d["preprocess"]),
                tuple(d["genders"]),
                d.get("weights_sha256"),
                d.get("extra", {}),
            )
        except AgeGenderError as e:  # the config's own checks; the caller names the file
            raise InputError(f"metadata: {e}") from None


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The checkpoint file of ``model``: a checkpoint itself, or the best one inside a run directory."""
    path = Path(model)
    ckpt = RunDir(path).checkpoint if path.is_dir() else path
    if not ckpt.is_file():
        hint = f" (a run directory without {ckpt.name}: did training finish?)" if path.is_dir() else ""
        raise AgeGenderError(f"{ckpt}: no trained model here{hint}; train one with `agegender train`")
    try:  # say "permission denied" now, not "not a loadable model" from a reader later
        with open(ckpt, "rb"):
            pass
    except OSError as e:
        raise AgeGenderError(os_reason(ckpt, e, "cannot read")) from None
    return ckpt
