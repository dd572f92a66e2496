"""PyTorch ports of VGG-Face (.pt/.pth): state dicts in several naming schemes, or whole pickled modules.

Albanie's ``vgg_face_dag.pth`` (converted from MatConvNet) is recognised by its signature, fc6-fc8 stored
as convolutions ``(4096, 512, 7, 7)``, ``(4096, 4096, 1, 1)``, ``(2622, 4096, 1, 1)``: its conv1_1 takes RGB
like MatConvNet's, so it is flipped to the canonical BGR.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..backbones.vgg_face import VGG16_BLOCKS
from ..errors import OptionError, one_line
from ..model.vgg import FC_NAMES
from .canonical import Params, fail, flip_to_bgr, linear_from_conv, printable

log = logging.getLogger(__name__)


def _torchvision_layers() -> dict[str, str]:
    """torchvision VGG16 module paths -> canonical names, derived from the layer structure."""
    names, i = {}, 0
    for b, (_, convs) in enumerate(VGG16_BLOCKS):
        for c in range(convs):
            names[f"features.{i}"] = f"conv{b + 1}_{c + 1}"
            i += 2  # Conv2d, ReLU
        i += 1  # MaxPool2d
    for j, name in enumerate(FC_NAMES):
        names[f"classifier.{3 * j}"] = name  # Linear, ReLU, Dropout
    return names


def canonical_key(key: str) -> str | None:
    """Map a key of any known PyTorch port to ``conv1_1.weight`` ... ``fc8.bias`` (None if unknown)."""
    key = key.removeprefix("module.")
    if m := re.fullmatch(r"(?:features\.|trunk\.)?conv_?(\d)_(\d)\.(weight|bias)", key):
        return f"conv{m[1]}_{m[2]}.{m[3]}"
    if m := re.fullmatch(r"(?:fc\.)?(fc[678])\.(weight|bias)", key):
        return f"{m[1]}.{m[2]}"
    layer, _, part = key.rpartition(".")
    name = _torchvision_layers().get(layer)
    return f"{name}.{part}" if name and part in ("weight", "bias") else None


def _torch_reason(e: BaseException) -> str:
    """torch's own reason, without the advice paragraphs around it."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        reason = one_line(text)
        return f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    return one_line(e, with_type=True)


SLACK_BYTES = 1 << 20  # what a torch.save archive's small records may add beyond the file's own size


def check_zip_inflation(path: Path, slack: int = SLACK_BYTES) -> None:
    """Refuse a zip archive whose entries declare more bytes than the file could hold, before any is inflated.

    torch.save stores its records uncompressed, so a real archive inflates to about its own size; a deflate
    bomb declares far more. torch's reader allocates what the central directory declares and stops there,
    so checking the declarations bounds the memory. Files that are not zip archives pass unchanged.
    """
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            declared = sum(max(i.file_size, 0) for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch reports an unreadable archive in its own words
    limit = 2 * path.stat().st_size + slack
    if declared > limit:
        raise fail(
            path,
            f"a zip archive whose entries inflate to {declared} bytes, more than {limit} for a "
            f"{path.stat().st_size}-byte file (a compression bomb?)",
        )


def _load(path: Path, trust_pickle: bool) -> Any:
    check_zip_inflation(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only runs no code from the file; anything it raises means unreadable bytes
        safe_error = e
    if not trust_pickle:
        if isinstance(safe_error, pickle.UnpicklingError) and "Unsupported global" in str(safe_error):
            raise OptionError(
                printable(
                    f"{path}: holds a pickled Python object (e.g. a whole nn.Module), and loading "
                    "it runs code from the file; pass `trust_pickle` only if you trust its "
                    "source"
                ),
                "trust_pickle",
            ) from None
        raise fail(path, f"not a readable PyTorch file ({_torch_reason(safe_error)})") from None
    log.warning("%s: unpickling it, as trust_pickle asks", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e2:  # arbitrary code ran; whatever it raised, report it on one line
        raise fail(path, f"unpickling failed ({_torch_reason(e2)})") from None


def read_pt(path: Path, trust_pickle: bool = False) -> Params:
    obj = _load(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise fail(path, f"holds a {type(obj).__name__}, not a state dict or module")
    params: Params = {}
    for key, value in obj.items():
        name = canonical_key(str(key))
        if name is None or not isinstance(value, torch.Tensor):
            log.debug("%s: ignoring %s", path, key)
            continue
        if name in params:
            raise fail(path, f"two entries map to {name} (the second is {key})")
        _check_extent(path, str(key), value)
        params[name] = value
    fc6 = params.get("fc6.weight")
    if fc6 is not None and fc6.ndim == 4:  # the vgg_face_dag signature: fc layers as convolutions
        for name in FC_NAMES:
            if f"{name}.weight" in params:
                params[f"{name}.weight"] = linear_from_conv(params[f"{name}.weight"], name, path)
        if "conv1_1.weight" in params:
            flip_to_bgr(params)
            log.info(
                "%s: fc6-fc8 are convolutions (Albanie's vgg_face_dag layout, from MatConvNet): "
                "conv1_1 flipped from RGB to BGR input",
                path,
            )
    return params


def _check_extent(path: Path, key: str, t: torch.Tensor) -> None:
    """A tensor may not view more elements than its storage holds (zero strides): copying it would explode."""
    if t.is_sparse or t.layout != torch.strided:
        raise fail(path, f"{key} is a {t.layout} tensor, not a dense weight")
    held = t.untyped_storage().nbytes() // max(t.element_size(), 1) - t.storage_offset()
    if t.numel() > max(held, 0):
        raise fail(
            path,
            f"{key} has size {tuple(t.shape)} with strides {t.stride()}: {t.numel()} elements over "
            f"a storage of {held} (zero or overlapping strides), not a weight tensor",
        )
