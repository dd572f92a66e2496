"""Published VGG-Face weights (.t7, .pt/.pth, .mat, .h5) -> one canonical safetensors state dict.

Canonical means: keys ``conv1_1.weight`` ... ``fc8.bias``, float32, PyTorch shapes, conv1_1 taking
BGR input, fc6 expecting the C,H,W flatten order of ``torch.flatten``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AgeGenderError
from ..files import atomic_path, sha256_file
from ..model.config import VGG16_BLOCKS, VGG_FACE_PREPROCESS
from ..model.vgg import CONV_NAMES, FC_NAMES, vgg_face_shapes

log = logging.getLogger(__name__)

LAYERS: tuple[str, ...] = (*CONV_NAMES, *FC_NAMES)
_KEYS = {f"{n}.{p}" for n in LAYERS for p in ("weight", "bias")}
FORMATS = ("t7", "pt", "mat", "h5")
_SUFFIXES = {".t7": "t7", ".pt": "pt", ".pth": "pt", ".mat": "mat", ".h5": "h5", ".hdf5": "h5"}
T7_MODULES = 40  # VGG_FACE.t7: 13 convs + 15 ReLUs + 5 pools + View + 3 Linears + 2 Dropouts + SoftMax
T7_CONVS = ("nn.SpatialConvolutionMM", "nn.SpatialConvolution")
Params = dict[str, Any]  # canonical name -> numpy array or tensor, before the final checks


def read_weights(src: str | os.PathLike[str], *, trust_pickle: bool = False,
                 fmt: str = "auto") -> dict[str, torch.Tensor]:
    """Read any supported encoding of VGG-Face into the canonical state dict, every shape checked."""
    path = _source(src)
    return _read(path, _format(path, fmt), trust_pickle)[0]


def convert_weights(src: str | os.PathLike[str], out: str | os.PathLike[str], *, trust_pickle: bool = False,
                    fmt: str = "auto") -> dict[str, Any]:
    """Convert ``src`` to canonical safetensors at ``out``; returns a summary of what was written."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = _source(src)
    fmt = _format(path, fmt)
    try:
        with atomic_path(out) as tmp:  # enter first: an unwritable destination fails before a long read
            state, widths = _read(path, fmt, trust_pickle)
            meta = {"source_sha256": sha256_file(path), "source_format": fmt,
                    "preprocess": VGG_FACE_PREPROCESS.to_json(), "widths": json.dumps(list(widths))}
            save_file(state, str(tmp), metadata=meta)
    except OSError as e:  # reading errors are AgeGenderErrors already, so this is the output side
        raise AgeGenderError(f"{out}: cannot write ({e.strerror or e})") from None
    summary = {"source": str(path), "output": str(out), "format": fmt, "source_sha256": meta["source_sha256"],
               "parameters": sum(t.numel() for t in state.values()), "widths": list(widths),
               "seconds": round(time.perf_counter() - start, 2)}
    log.info("converted %s (%s, %d parameters) in %.1fs", path, fmt, summary["parameters"], summary["seconds"])
    return summary


def load_canonical(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`convert_weights`: the state dict and its metadata, shapes checked."""
    from safetensors import safe_open

    path = _source(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a file that is not safetensors
        raise AgeGenderError(f"{path}: not a safetensors file ({_one_line(e)})") from None
    if "source_format" not in meta:
        raise AgeGenderError(f"{path}: not converted VGG-Face weights (run `agegender convert` first)")
    _check(state, path)
    return state, meta


def infer_widths(state: dict[str, Any]) -> tuple[int, ...]:
    """Block widths of a canonical state dict (the output channels of each block's first conv)."""
    return tuple(int(state[f"conv{b + 1}_1.weight"].shape[0]) for b in range(len(VGG16_BLOCKS)))


# -- shared plumbing ---------------------------------------------------------------------------
def _source(src: str | os.PathLike[str]) -> Path:
    path = Path(src)
    if not path.exists():
        raise AgeGenderError(f"{path}: no such file")
    if not path.is_file():
        raise AgeGenderError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise AgeGenderError(f"{path}: empty file")
    return path


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise AgeGenderError(f"{path}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        return fmt
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "pt"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head.startswith(b"MATLAB"):
        return "mat"
    if head[:4] in (b"\x03\x00\x00\x00", b"\x04\x00\x00\x00"):  # Torch7 table or object tag
        return "t7"
    raise AgeGenderError(f"{path}: unrecognised weights format (expected .t7, .pt/.pth, .mat or .h5; "
                         f"or pass --format)")


def _read(path: Path, fmt: str, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    readers: dict[str, Callable[[Path, bool], Params]] = {"t7": _read_t7, "pt": _read_pt,
                                                            "mat": _read_mat, "h5": _read_h5}
    try:
        params = readers[fmt](path, trust_pickle)
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None
    state = {k: _float32(v) for k, v in params.items() if k in _KEYS}
    return state, _check(state, path)


def _float32(v: Any) -> torch.Tensor:
    # torch.from_numpy shares memory, so the 540 MB of .t7 weights are never copied on their way to disk.
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v.astype(np.float32, copy=False)))
    return v.detach().cpu().to(torch.float32).contiguous()


def _check(state: dict[str, torch.Tensor], path: Path) -> tuple[int, ...]:
    """Every canonical key present with the shape implied by the file's own widths; returns the widths."""
    missing = sorted(_KEYS - set(state), key=lambda k: (LAYERS.index(k.split(".")[0]), k))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise AgeGenderError(f"{path}: VGG-Face parameters missing: {', '.join(missing[:3])}{more}")
    if any(state[k].ndim == 0 for k in _KEYS):
        raise AgeGenderError(f"{path}: a scalar where a VGG-Face weight or bias belongs")
    widths = infer_widths(state)
    expected = vgg_face_shapes(widths, fc=int(state["fc7.weight"].shape[0]), classes=int(state["fc8.weight"].shape[0]))
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {s}" for k, s in expected.items()
             if tuple(state[k].shape) != s]
    if wrong:
        raise AgeGenderError(f"{path}: not a VGG-Face network: {'; '.join(wrong[:3])}")
    return widths


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# -- Torch7 -------------------------------------------------------------------------------------
def _read_t7(path: Path, trust_pickle: bool) -> Params:
    from .torch7 import T7Object, read_t7

    model = read_t7(path)
    modules = model.fields.get("modules") if isinstance(model, T7Object) else None
    if not isinstance(modules, list) or not all(isinstance(m, T7Object) for m in modules):
        raise AgeGenderError(f"{path}: not an nn.Sequential of modules")
    if len(modules) != T7_MODULES:
        raise AgeGenderError(f"{path}: {len(modules)} modules, VGG_FACE.t7 has {T7_MODULES}")
    convs = [m for m in modules if m.class_name in T7_CONVS]
    linears = [m for m in modules if m.class_name == "nn.Linear"]
    pools = [m for m in modules if m.class_name == "nn.SpatialMaxPooling"]
    if (len(convs), len(linears), len(pools)) != (len(CONV_NAMES), len(FC_NAMES), len(VGG16_BLOCKS)):
        raise AgeGenderError(f"{path}: {len(convs)} convolutions, {len(linears)} linear layers and {len(pools)} "
                             f"max-pools; VGG-Face has {len(CONV_NAMES)}, {len(FC_NAMES)} and {len(VGG16_BLOCKS)}")
    params: Params = {}
    for name, conv in zip(CONV_NAMES, convs):
        f = conv.fields
        geometry = (f.get("kW"), f.get("kH"), f.get("dW", 1), f.get("dH", 1),
                    f.get("padW", f.get("padding")), f.get("padH", f.get("padding")))
        if geometry != (3, 3, 1, 1, 1, 1):
            raise AgeGenderError(f"{path}: {name} has kernel/stride/padding {geometry}, expected 3x3, 1, 1")
        weight = _array(f, "weight", name, path)
        if weight.ndim == 2:  # SpatialConvolutionMM's (out, in*kH*kW) is row-major (out, in, kH, kW)
            cin = f.get("nInputPlane")
            if not isinstance(cin, int) or cin < 1 or weight.shape[1] != cin * 9:
                raise AgeGenderError(f"{path}: {name} weight {weight.shape} does not match nInputPlane={cin}")
            weight = weight.reshape(weight.shape[0], cin, 3, 3)
        params[f"{name}.weight"], params[f"{name}.bias"] = weight, _array(f, "bias", name, path)
    for name, linear in zip(FC_NAMES, linears):
        params[f"{name}.weight"] = _array(linear.fields, "weight", name, path)
        params[f"{name}.bias"] = _array(linear.fields, "bias", name, path)
    return params


def _array(fields: dict[str, Any], key: str, layer: str, path: Path) -> np.ndarray:
    value = fields.get(key)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise AgeGenderError(f"{path}: {layer} has no floating-point {key} tensor")
    return value


# -- PyTorch ------------------------------------------------------------------------------------
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


def _read_pt(path: Path, trust_pickle: bool) -> Params:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise AgeGenderError(f"{path}: not a readable PyTorch file") from None
        if not trust_pickle:
            raise AgeGenderError(f"{path}: holds a pickled Python object (e.g. a whole nn.Module), and loading it "
                                 f"runs code from the file; pass --trust-pickle only if you trust its source") from None
        log.warning("%s: unpickling with --trust-pickle", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # arbitrary code ran; whatever it raised, report it on one line
            raise AgeGenderError(f"{path}: unpickling failed ({_one_line(e2)})") from None
    except Exception as e:  # weights_only runs no code from the file; anything else means unreadable bytes
        raise AgeGenderError(f"{path}: not a readable PyTorch file ({_one_line(e)})") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AgeGenderError(f"{path}: holds a {type(obj).__name__}, not a state dict or module")
    params: Params = {}
    for key, value in obj.items():
        name = canonical_key(str(key))
        if name is None or not isinstance(value, torch.Tensor):
            log.debug("%s: ignoring %s", path, key)
            continue
        if name in params:
            raise AgeGenderError(f"{path}: two entries map to {name} (the second is {key})")
        params[name] = value
    return params


# -- MatConvNet ---------------------------------------------------------------------------------
def _read_mat(path: Path, trust_pickle: bool) -> Params:
    """MatConvNet: conv W (H, W, in, out), b (out, 1); fc6-fc8 stored as 7x7 and 1x1 convolutions.

    Layouts: ``layers`` (SimpleNN cell array, top level or under ``net``; W/b in ``weights`` or the older
    ``filters``/``biases``), ``params`` (DagNN: ``conv1_1f``, ``conv1_1b``), or one top-level struct
    per layer with fields ``W`` and ``b``.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise AgeGenderError(f"{path}: reading .mat needs scipy (pip install 'agegender[convert]')") from None
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except NotImplementedError:  # scipy's message for v7.3 files
        raise AgeGenderError(f"{path}: MATLAB v7.3 files are not supported; re-save with save(..., '-v7')") from None
    except Exception as e:  # scipy raises ValueError, TypeError, ... for non-MATLAB bytes
        raise AgeGenderError(f"{path}: not a readable MATLAB file ({_one_line(e)})") from None
    root: Any = mat.get("net", mat)
    get = root.get if isinstance(root, dict) else lambda k: getattr(root, k, None)
    found: dict[str, tuple[Any, Any]] = {}
    layers, dag_params = get("layers"), get("params")
    if layers is not None:
        for layer in np.atleast_1d(layers):
            name = getattr(layer, "name", None)
            wb = getattr(layer, "weights", None)
            if wb is None:
                wb = (getattr(layer, "filters", None), getattr(layer, "biases", None))
            if name in LAYERS and len(wb) == 2:
                found[name] = (wb[0], wb[1])
    elif dag_params is not None:
        values = {p.name: p.value for p in np.atleast_1d(dag_params)}
        found = {n: (values[f"{n}f"], values.get(f"{n}b")) for n in LAYERS if f"{n}f" in values}
    else:
        found = {n: (getattr(mat[n], "W", None), getattr(mat[n], "b", None)) for n in LAYERS if n in mat}
    params: Params = {}
    for name, (w, b) in found.items():
        if not isinstance(w, np.ndarray) or not isinstance(b, np.ndarray):
            raise AgeGenderError(f"{path}: {name} lacks numeric W and b arrays")
        if w.ndim == 2 and name in FC_NAMES:
            w = w[None, None]  # squeeze_me turned the 1x1 conv (1, 1, in, out) into (in, out)
        if w.ndim != 4:
            raise AgeGenderError(f"{path}: {name} W has shape {w.shape}, expected (H, W, in, out)")
        w = w.transpose(3, 2, 0, 1)  # (H, W, in, out) -> (out, in, H, W)
        if name in FC_NAMES:
            w = w.reshape(w.shape[0], -1)  # a kxk conv over a kxk map is a Linear over the C,H,W flatten
        elif name == CONV_NAMES[0]:
            w = w[:, ::-1]  # MatConvNet feeds RGB; canonical conv1_1 takes BGR like VGG_FACE.t7
        params[f"{name}.weight"], params[f"{name}.bias"] = w, b.reshape(-1)
    return params


# -- Keras --------------------------------------------------------------------------------------
def _read_h5(path: Path, trust_pickle: bool) -> Params:
    """keras-vggface: layers named conv1_1 ... fc8, HWIO conv kernels, Dense (in, out) kernels.

    keras-vggface feeds BGR minus the same mean as VGG_FACE.t7, so conv1_1 needs no channel flip.
    """
    try:
        import h5py
    except ImportError:
        raise AgeGenderError(f"{path}: reading .h5 needs h5py (pip install 'agegender[convert]')") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise AgeGenderError(f"{path}: not a readable HDF5 file ({_one_line(e)})") from None
    params: Params = {}
    with f:
        # Keras 2 save_weights puts layers at the top, model.save under model_weights, Keras 3 under layers.
        roots = [g for g in (f, f.get("model_weights"), f.get("layers")) if g is not None and "conv1_1" in g]
        if not roots:
            raise AgeGenderError(f"{path}: no keras-vggface layer named conv1_1")
        for name in LAYERS:
            if name not in roots[0]:
                continue
            arrays: list[np.ndarray] = []
            roots[0][name].visititems(lambda _, d, found=arrays: found.append(d[()]) if isinstance(d, h5py.Dataset) else None)
            kernels = [a for a in arrays if a.ndim >= 2]
            biases = [a for a in arrays if a.ndim == 1]
            if len(kernels) != 1 or len(biases) != 1:
                raise AgeGenderError(f"{path}: layer {name} should hold one kernel and one bias")
            k = kernels[0]
            if name in CONV_NAMES:
                k = k.transpose(3, 2, 0, 1)  # (H, W, in, out) -> (out, in, H, W)
            elif name == FC_NAMES[0] and k.ndim == 2:
                # Keras flattened the 7x7xC map channels-last (H, W, C); canonical order is C, H, W.
                cin, rest = divmod(k.shape[0], 49)
                if rest:
                    raise AgeGenderError(f"{path}: fc6 kernel {k.shape} does not take a 7x7 feature map")
                k = k.reshape(7, 7, cin, k.shape[1]).transpose(3, 2, 0, 1).reshape(k.shape[1], -1)
            else:
                k = k.T
            params[f"{name}.weight"], params[f"{name}.bias"] = k, biases[0]
    return params
