"""The one loader of a backbone's pretrained weights: training, `identify`, `reproduce` and the bundled model's
network all read them here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backbones import BackboneSpec, Preprocess
from .locate import find
from .zoo import ZOO, ZooFile

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class Pretrained:
    """A backbone's canonical state dict and what its file says about it."""

    state: dict[str, torch.Tensor]
    preprocess: Preprocess  # the input contract the file records (a converted VGG-Face file), else the backbone's
    sha256: str  # the published file's sha256, as a converted file records it: it keys the feature cache
    shape: dict[str, Any]  # the model config fields the weights fix (widths, descriptor size)
    path: Path


def pretrained_entry(spec: BackboneSpec) -> ZooFile:
    """The zoo's description of ``spec``'s pretrained file."""
    return ZOO[spec.pretrained]


def load_pretrained(
    spec: BackboneSpec, path: str | os.PathLike[str] | None = None, *, full: bool = False, trust_pickle: bool = False
) -> Pretrained:
    """``spec``'s weights from ``path`` (a published encoding, converted in memory, or converted safetensors), or
    from where the zoo finds them when None. A file of another backbone is refused before it is read; ``full``
    refuses a trunk-only file (VGG-Face without fc6-fc8)."""
    from ..files import sha256_file
    from .convert import load_canonical, read_canonical

    file = find(pretrained_entry(spec), path)
    if file.suffix == ".safetensors":
        state, meta = load_canonical(file, full=full, backbone=spec.name)
    else:
        state, meta = read_canonical(file, full=full, backbone=spec.name, trust_pickle=trust_pickle)
    pre = Preprocess.from_dict(json.loads(meta["preprocess"])) if "preprocess" in meta else spec.preprocess
    return Pretrained(state, pre, meta.get("source_sha256") or sha256_file(file), spec.shape_of(state), file)
