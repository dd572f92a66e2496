"""The canonical VGG-Face state dict, and the one way every reader's layers become it.

Canonical means: keys ``conv1_1.weight`` ... ``fc8.bias``, float32, PyTorch shapes, conv1_1 taking BGR
input, fc6 expecting the C,H,W flatten order of ``torch.flatten``. A trunk-only file (a keras-vggface
``notop``) has the conv keys and none of the fc keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones.vgg_face import VGG_FACE
from ..errors import AgeGenderError
from ..model.vgg import CONV_NAMES, FC_NAMES, vgg_face_shapes

LAYERS: tuple[str, ...] = (*CONV_NAMES, *FC_NAMES)
TRUNK_KEYS = tuple(f"{n}.{p}" for n in CONV_NAMES for p in ("weight", "bias"))
FC_KEYS = tuple(f"{n}.{p}" for n in FC_NAMES for p in ("weight", "bias"))
KEYS = frozenset((*TRUNK_KEYS, *FC_KEYS))
FC_KERNELS = {"fc6": 7, "fc7": 1, "fc8": 1}  # fc layers stored as convolutions: fc6 sees the 7x7 map
Params = dict[str, Any]  # canonical name -> numpy array or tensor, before the final checks


def printable(text: str) -> str:
    """``text`` with newlines and other control characters escaped, so a message stays one line."""
    return text if text.isprintable() else repr(text)[1:-1]


def fail(path: str | os.PathLike[str], message: str) -> AgeGenderError:
    return AgeGenderError(printable(f"{path}: {message}"))


def linear_from_conv(weight: Any, name: str, path: Path) -> Any:
    """fc6/fc7/fc8 stored as convolutions ``(out, C, k, k)`` -> Linear ``(out, C*k*k)``.

    A k x k convolution over a k x k map is a Linear over that map's flatten. Reshaping ``(out, C, H, W)``
    row-major gives input index ``c*H*W + h*W + w``: exactly the C,H,W order of ``torch.flatten`` that the
    canonical fc6 expects, so the only thing to check is that the kernel covers the whole map.
    """
    if weight.ndim == 2:
        return weight
    k = FC_KERNELS[name]
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (k, k):
        raise fail(
            path, f"{name} is {tuple(weight.shape)}, expected a Linear (out, in) or a {k}x{k} convolution (out, in, {k}, {k})"
        )
    return weight.reshape(weight.shape[0], -1)


def assign_layers(path: Path, layers: list[tuple[str, Any, Any]]) -> Params:
    """Layers with weights, in network order, as ``(name in the file, weight, bias)`` -> canonical params.

    The first 13 are the convolutions (weights already ``(out, in, 3, 3)``), the next 3, if present,
    fc6-fc8 (Linear ``(out, in)`` or convolutions). Names in the file are only for messages.
    """
    if len(layers) not in (len(CONV_NAMES), len(LAYERS)):
        raise fail(
            path,
            f"{len(layers)} layers with weights; VGG-Face has {len(LAYERS)} ({len(CONV_NAMES)} "
            f"convolutions, then {len(FC_NAMES)} fully connected) or {len(CONV_NAMES)} without the top",
        )
    params: Params = {}
    for (source, weight, bias), name in zip(layers, LAYERS):
        if name in FC_NAMES:
            weight = linear_from_conv(weight, name, path)
        elif weight.ndim != 4:
            raise fail(
                path,
                f"layer {source} (VGG-Face's {name}) has a {weight.ndim}-D weight {tuple(weight.shape)}, expected a convolution",
            )
        if bias.size != weight.shape[0]:
            raise fail(path, f"layer {source} (VGG-Face's {name}) has {bias.size} biases for {weight.shape[0]} outputs")
        params[f"{name}.weight"], params[f"{name}.bias"] = weight, bias.reshape(-1)
    return params


def flip_to_bgr(params: Params) -> None:
    """conv1_1 of a network fed RGB -> the same filters for BGR input (the canonical convention)."""
    w = params["conv1_1.weight"]
    params["conv1_1.weight"] = w.flip(1) if isinstance(w, torch.Tensor) else w[:, ::-1]


def float32(v: Any) -> torch.Tensor:
    # torch.from_numpy shares memory, so the 540 MB of .t7 weights are never copied on their way to disk.
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v.astype(np.float32, copy=False)))
    return v.detach().cpu().to(torch.float32).contiguous()


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Every tensor finite: a NaN or Inf weight would surface only after training, blamed on a metric."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise fail(path, f"{k} holds {bad} non-finite values (NaN or Inf) of {v.numel()}: corrupt weights")


def infer_widths(state: dict[str, Any]) -> tuple[int, ...]:
    """Block widths of a canonical state dict (the output channels of each block's first conv)."""
    return tuple(VGG_FACE.shape_of(state)["widths"])


def has_fc(state: dict[str, Any]) -> bool:
    return any(k in state for k in FC_KEYS)


def check(state: dict[str, Any], path: str | os.PathLike[str], *, full: bool = False) -> tuple[int, ...]:
    """Every canonical key present with the shape implied by the file's own widths; returns the widths.

    A trunk-only state (all conv keys, no fc key) passes unless ``full``.
    """
    trunk_only = not has_fc(state)
    wanted = set(TRUNK_KEYS) if trunk_only else set(KEYS)
    missing = sorted(wanted - set(state), key=lambda k: (LAYERS.index(k.split(".")[0]), k))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise fail(path, f"VGG-Face parameters missing: {', '.join(missing[:3])}{more}")
    if trunk_only and full:
        raise fail(
            path,
            "trunk-only VGG-Face weights (conv1_1 ... conv5_3, like keras-vggface's notop file): "
            "fc6, fc7 and fc8 are missing, and identifying faces needs them (training needs only the convs)",
        )
    if any(state[k].ndim == 0 for k in wanted):
        raise fail(path, "a scalar where a VGG-Face weight or bias belongs")
    widths = infer_widths(state)
    if trunk_only:
        expected = {k: s for k, s in vgg_face_shapes(widths, fc=1, classes=1).items() if k in wanted}
    else:
        expected = vgg_face_shapes(widths, fc=int(state["fc7.weight"].shape[0]), classes=int(state["fc8.weight"].shape[0]))
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {s}" for k, s in expected.items() if tuple(state[k].shape) != s]
    if wrong:
        raise fail(path, f"not a VGG-Face network: {'; '.join(wrong[:3])}")
    return widths
