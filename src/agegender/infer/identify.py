"""The VGG-Face weights' own check: which of the 2,622 training identities a face image looks like."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..backbones.vgg_face import VGG_FACE, VGG_FACE_PREPROCESS
from ..errors import AgeGenderError, OptionError
from ..images import load_image
from ..model.vgg import VGGFace


def identify(
    image: str | os.PathLike[str], weights: str | os.PathLike[str], names: str | os.PathLike[str], top: int = 5
) -> list[tuple[int, str, float]]:
    """Top-``top`` identities as ``(0-based class index, name, probability)``, most likely first.

    ``weights`` is converted safetensors, or any format ``agegender convert`` reads (converted in memory).
    """
    from ..weights.pretrained import load_pretrained

    if top < 1:
        raise OptionError(f"`top` must be at least 1, not {top}", "top")
    # full: a trunk-only (notop) file is refused with a message that says the fc layers are missing.
    pretrained = load_pretrained(VGG_FACE, weights, full=True)
    state = pretrained.state
    classes = int(state["fc8.weight"].shape[0])
    labels = read_names(names)
    if len(labels) != classes:
        raise AgeGenderError(f"{names}: {len(labels)} names, but the weights have {classes} identities")
    model = VGGFace(pretrained.shape["widths"], fc=int(state["fc7.weight"].shape[0]), classes=classes)
    model.load_canonical(state)
    x = torch.from_numpy(VGG_FACE_PREPROCESS.normalize_numpy(load_face(image))[None])
    with torch.inference_mode():
        probs = torch.softmax(model.eval()(x), dim=1)[0]
    values, indices = probs.topk(min(top, classes))
    return [(int(i), labels[int(i)], float(p)) for p, i in zip(values, indices)]


def read_names(path: str | os.PathLike[str]) -> list[str]:
    """names.txt: one identity per line, in class order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AgeGenderError(f"{path}: cannot read names ({getattr(e, 'strerror', None) or e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def load_face(path: str | os.PathLike[str]) -> np.ndarray:
    """The whole image, resized to the network input size, as uint8 RGB ``(H, W, 3)``."""
    from PIL import Image

    size = VGG_FACE_PREPROCESS.size
    rgb = Image.fromarray(load_image(path, draft=size))
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))
