"""What a checkpoint or an export says about itself, without torch: ONNX inference needs only this."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..labels import GENDERS
from .config import ModelConfig, Preprocess

FORMAT = "agegender.checkpoint/1"


@dataclass
class CheckpointMeta:
    config: ModelConfig
    preprocess: Preprocess
    genders: tuple[str, ...] = GENDERS
    weights_sha256: str | None = None  # the VGG-Face file the trunk came from
    extra: dict[str, Any] = field(default_factory=dict)  # data summary, headline metrics, epoch ...

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "config": self.config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "genders": list(self.genders),
            "weights_sha256": self.weights_sha256,
            "extra": self.extra,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"not an agegender checkpoint (format {d.get('format')!r})")
        return cls(ModelConfig.from_dict(d["config"]), Preprocess.from_dict(d["preprocess"]),
                   tuple(d["genders"]), d.get("weights_sha256"), d.get("extra", {}))
