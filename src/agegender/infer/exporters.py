"""``agegender export``: one entry point over every export format, each written by its own module."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..backbones import backbone
from ..errors import AgeGenderError
from ..model.checkpoint import load_checkpoint
from ..model.meta import resolve_model
from .export import check_output, export_keras, export_onnx, export_torch
from .savedmodel import export_savedmodel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXPORTERS = {"onnx": export_onnx, "keras": export_keras, "torch": export_torch, "savedmodel": export_savedmodel}


def export(
    run: str | os.PathLike[str] | None, fmt: str, output: str | os.PathLike[str], verify_inputs: torch.Tensor | None = None
) -> dict[str, Any]:
    """Export a run directory (its ``model.safetensors``), a checkpoint file, or with None the bundled model (its
    float32 network: the heads shipped beside it on dlib's ResNet); see ``EXPORTERS``."""
    if fmt not in EXPORTERS:
        raise AgeGenderError(f"unknown export format {fmt!r} (choose from {', '.join(EXPORTERS)})")
    check_output(output, fmt)  # fail before the slow load
    if run is None:
        from .bundled import bundled_network

        net, meta = bundled_network()
    else:
        net, meta = load_checkpoint(resolve_model(run))
    spec = backbone(meta.config.backbone)
    if fmt not in spec.exports:
        raise AgeGenderError(
            f"{run or 'the bundled model'}: the {spec.name} backbone has no {fmt} export; it exports to {', '.join(spec.exports)}"
        )
    log.info("exporting %s to %s: trace, write, then a parity check on the reloaded file", run or "the bundled model", output)
    if meta.config.age_head == "none":
        log.warning('%s: the model has no age head; exporting p_male only ("age": null in metadata)', run)
    try:
        return EXPORTERS[fmt](net, meta, output, verify_inputs)
    except OSError as e:
        raise AgeGenderError(f"{output}: cannot write the export ({e.strerror or e})") from None
