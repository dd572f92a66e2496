"""Self-describing model files: safetensors weights plus the config, preprocessing and labels to rebuild them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AgeGenderError
from .files import atomic_path
from .model import AgeGenderNet, ModelConfig
from .weights import GENDERS, Preprocess

FORMAT = "agegender.checkpoint/1"
RUN_CHECKPOINT = "model.safetensors"  # the best checkpoint inside a training run directory


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


def save_checkpoint(path: str | os.PathLike[str], model: AgeGenderNet, meta: CheckpointMeta) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"agegender": meta.to_json()})


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AgeGenderError(f"{path}: no such model file")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("agegender")
    except Exception as e:  # safetensors raises several types for non-safetensors input
        raise AgeGenderError(f"{path}: not a safetensors checkpoint ({type(e).__name__})") from None
    if raw is None:
        raise AgeGenderError(f"{path}: safetensors file without agegender metadata (not a trained model)")
    try:
        return CheckpointMeta.from_json(raw)
    except (ValueError, KeyError) as e:
        raise AgeGenderError(f"{path}: {e}") from None


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                    ) -> tuple[AgeGenderNet, CheckpointMeta]:
    """Rebuild the model from one file; returns it in eval mode."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    model = AgeGenderNet(meta.config)
    try:
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    except RuntimeError as e:
        raise AgeGenderError(f"{path}: weights do not match the stored config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta
