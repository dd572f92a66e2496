"""Self-describing model files: safetensors weights plus the config, preprocessing and labels to rebuild them.

:class:`CheckpointMeta` (and the run layout) is defined in :mod:`agegender.model.meta`, which does not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AgeGenderError, one_line
from ..files import atomic_path, safe_name
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


def check_stored_shapes(path: str | os.PathLike[str], meta: CheckpointMeta) -> None:
    """Every tensor the config implies is stored in the file with its shape, read from the safetensors header.

    The network is built on the ``meta`` device, which allocates nothing, so a 2 KB file whose config declares a
    30000-wide head is refused here instead of costing gigabytes: safetensors has already checked that every
    tensor it declares lies inside the file, so a file can only declare what it holds.
    """
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AgeGenderNet(meta.config).state_dict().items()}
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except AgeGenderError as e:
        raise AgeGenderError(f"{path}: {e}") from None
    except Exception as e:  # safetensors raises several types for a damaged header
        raise AgeGenderError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    problems = (
        [f"{k} is {stored[k]}, the config needs {s}" for k, s in expected.items() if stored.get(k, s) != s]
        + [f"{k} is missing" for k in expected if k not in stored]
        + [f"unexpected tensor {k}" for k in stored if k not in expected]
    )
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise AgeGenderError(safe_name(f"{path}: weights do not match the stored config ({problems[0]}{more})"))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[AgeGenderNet, CheckpointMeta]:
    """Rebuild the model from one file; returns it in eval mode."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    check_stored_shapes(path, meta)  # a lying config is refused before its network is allocated
    model = AgeGenderNet(meta.config)
    try:
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    except RuntimeError as e:
        raise AgeGenderError(f"{path}: weights do not match the stored config ({one_line(e)})") from None
    return model.to(device).eval(), meta
