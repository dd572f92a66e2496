"""Self-describing model files: safetensors weights plus the config, preprocessing and labels to rebuild them.

:class:`CheckpointMeta` (and the run layout) is defined in :mod:`agegender.model.meta`, which does not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AgeGenderError
from ..files import atomic_path
from .meta import CheckpointMeta
from .net import AgeGenderNet


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
