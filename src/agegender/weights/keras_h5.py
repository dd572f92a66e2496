"""Keras HDF5 copies of VGG-Face: deepface's ``vgg_face_weights.h5`` and rcmalli's keras-vggface (full or notop).

Layers are taken in the model's own order (the ``layer_names`` attribute Keras writes), and matched by
type and position, never by name: deepface's copies carry either keras-vggface-like names
(``conv1_1/conv1_1_2/kernel:0``) or Keras auto-names (``conv2d_1`` ...). Kernels are HWIO.

- deepface: ``ZeroPadding2D`` + ``Conv2D`` pairs; fc6 a 7x7 ``Conv2D``, fc7 and fc8 1x1 ``Conv2D``.
- keras-vggface: ``Dense`` fc6-fc8; fc6's kernel takes the 7x7xC map flattened channels-last (H, W, C).
- keras-vggface notop: the 13 convolutions only, which gives a trunk-only canonical state.

Both feed BGR minus the VGG mean, like VGG_FACE.t7, so conv1_1 needs no channel flip.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AgeGenderError, one_line
from ..model.vgg import CONV_NAMES
from .canonical import Params, assign_layers, fail, printable

log = logging.getLogger(__name__)

SLACK_BYTES = 1 << 20  # metadata a weights file may legitimately decompress to beyond its own size


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _names(attr: Any) -> list[str] | None:
    if attr is None:
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in np.atleast_1d(attr)]


def read_h5(path: Path, trust_pickle: bool = False) -> Params:
    try:
        import h5py
    except ImportError:
        raise AgeGenderError(f"{path}: reading .h5 needs h5py (pip install 'agegender[convert]')") from None
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open for good
        raise AgeGenderError(f"{path}: not a regular file")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # OSError for non-HDF5 bytes; h5py raises others for odd files
        raise AgeGenderError(f"{path}: not a readable HDF5 file ({one_line(e, with_type=True)})") from None
    budget = [2 * path.stat().st_size + SLACK_BYTES]
    try:
        with f:
            refuse_foreign_data(path, f, h5py)
            layers = _layers(path, f, h5py, budget)
    except AgeGenderError:
        raise
    except Exception as e:  # a corrupt file can make h5py raise almost anything (OSError, KeyError, ...)
        raise AgeGenderError(f"{path}: unreadable HDF5 content ({one_line(e, with_type=True)})") from None
    return _to_canonical(path, layers)


# Filters HDF5 has built in, and h5py's LZF: any other id makes HDF5 load a plugin library from disk.
_BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})  # deflate, shuffle, fletcher32, szip, nbit, scaleoffset, lzf
_VIRTUAL_LAYOUT = 3  # H5D_VIRTUAL
MAX_OBJECTS = 100_000  # a Keras VGG-Face file has about 100; a walk is bounded whatever the file declares


def refuse_foreign_data(path: Path, f: Any, h5py: Any) -> None:
    """Refuse, before any data is read, a file whose data would come from elsewhere: a weight file never
    reads another file.

    Every link of every group reachable from the root is looked at without following it: external links
    (and user-defined link classes) are refused; soft links are names inside this file, so once no external
    link exists they cannot leave it. Every dataset is refused if it has external storage (raw bytes read from
    another file), is virtual (mapped from other datasets, possibly in other files), or needs a filter plugin.
    """
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, Any]] = [("", f)]
    count = 0
    while stack:
        where, group = stack.pop()
        for name in group.keys():
            count += 1
            if count > MAX_OBJECTS:
                raise fail(path, f"more than {MAX_OBJECTS} HDF5 objects (not a Keras weights file)")
            at = f"{where}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise fail(
                    path, f"{at} is an external link to {link.filename}:{link.path}; a weight file may not read another file"
                )
            if isinstance(link, h5py.SoftLink):
                continue  # a path inside this file, to an object the walk reaches by its hard link
            if not isinstance(link, h5py.HardLink):
                raise fail(path, f"{at} is a {type(link).__name__}, a link class HDF5 weight files do not use")
            obj = group.get(name)
            info = h5py.h5o.get_info(obj.id)
            key = (info.fileno, info.addr)
            if key in seen:
                continue  # a second hard link to one object (or a cycle)
            seen.add(key)
            if isinstance(obj, h5py.Group):
                stack.append((at, obj))
            elif isinstance(obj, h5py.Dataset):
                _refuse_foreign_dataset(path, at, obj)


def _refuse_foreign_dataset(path: Path, at: str, d: Any) -> None:
    plist = d.id.get_create_plist()
    if plist.get_layout() == _VIRTUAL_LAYOUT:
        raise fail(
            path,
            f"{at} is a virtual dataset (its data lives in other datasets or files); a weight file may not read another file",
        )
    if plist.get_external_count():
        names = ", ".join(printable(str(plist.get_external(i)[0])) for i in range(min(plist.get_external_count(), 3)))
        raise fail(path, f"{at} stores its data in external files ({names}); a weight file may not read another file")
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in _BUILTIN_FILTERS:
            raise fail(path, f"{at} needs HDF5 filter {code}, which would load a plugin library")


def _layers(path: Path, f: Any, h5py: Any, budget: list[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(layer name, kernel, bias)`` of each layer with weights, in the model's order."""
    # Keras 2 save_weights puts layers at the top, model.save under model_weights, Keras 3 under layers.
    roots = [g for g in (f.get("model_weights"), f.get("layers"), f) if isinstance(g, h5py.Group)]
    root = next((g for g in roots if "layer_names" in g.attrs), roots[0])
    # Without Keras's own list, names sort naturally (conv2d_2 before conv2d_10), which is model order for
    # both naming schemes: conv1_1 ... conv5_3 < fc6 < fc8, and conv2d_1 ... conv2d_16.
    order = _names(root.attrs.get("layer_names")) or sorted(root.keys(), key=_natural)
    found = []
    for name in order:
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            continue
        datasets = _datasets(group, h5py)
        if not datasets:
            continue  # ZeroPadding2D, MaxPooling2D, Flatten, Activation, Dropout
        arrays = [(key, _read(path, name, key, d, budget)) for key, d in datasets]
        kernels = [a for key, a in arrays if a.ndim >= 2 or "kernel" in key]
        biases = [a for key, a in arrays if a.ndim == 1 and "kernel" not in key]
        if len(kernels) != 1 or len(biases) != 1:
            raise AgeGenderError(f"{path}: layer {name} holds {len(arrays)} arrays, expected a kernel and a bias")
        found.append((name, kernels[0], biases[0]))
    if not found:
        raise AgeGenderError(f"{path}: no Keras layers with weights (not a Keras weights file?)")
    return found


def _datasets(group: Any, h5py: Any) -> list[tuple[str, Any]]:
    """A layer's weight datasets, in its ``weight_names`` order when Keras recorded one."""
    names = _names(group.attrs.get("weight_names"))
    if names is not None:
        return [(n, group[n]) for n in names if isinstance(group.get(n), h5py.Dataset)]
    out: list[tuple[str, Any]] = []
    group.visititems(lambda key, d: out.append((key, d)) if isinstance(d, h5py.Dataset) else None)
    return sorted(out, key=lambda kd: _natural(kd[0]))


def _read(path: Path, layer: str, key: str, d: Any, budget: list[int]) -> np.ndarray:
    """One dataset, refused before reading if it is not float data or declares more than the file can hold."""
    if d.dtype.kind != "f" or not 1 <= d.ndim <= 4:
        raise AgeGenderError(f"{path}: layer {layer} {key} is {d.dtype} {d.shape}, not a float weight array")
    nbytes = int(np.prod(d.shape, dtype=object)) * d.dtype.itemsize
    if nbytes > budget[0]:
        raise AgeGenderError(f"{path}: layer {layer} {key} declares {nbytes} bytes, more than the file holds")
    budget[0] -= nbytes
    return np.asarray(d[()])


def _to_canonical(path: Path, layers: list[tuple[str, np.ndarray, np.ndarray]]) -> Params:
    out: list[tuple[str, Any, Any]] = []
    for i, (name, kernel, bias) in enumerate(layers):
        if kernel.ndim == 4:
            kernel = kernel.transpose(3, 2, 0, 1)  # (H, W, in, out) -> (out, in, H, W); fc as convs included
        elif kernel.ndim == 2 and i == len(CONV_NAMES):  # a Dense fc6 over the channels-last flatten
            cin = int(out[-1][1].shape[0]) if out else 0
            if cin < 1 or kernel.shape[0] != 49 * cin:
                raise AgeGenderError(
                    f"{path}: layer {name} (fc6) kernel {kernel.shape} does not take the 7x7x{cin} map of the last convolution"
                )
            # Keras flattened the map (H, W, C); canonical order is (C, H, W).
            kernel = kernel.reshape(7, 7, cin, kernel.shape[1]).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)
        elif kernel.ndim == 2:
            kernel = kernel.T  # Dense (in, out) -> Linear (out, in)
        out.append((name, kernel, bias))
    params = assign_layers(path, out)
    if len(layers) == len(CONV_NAMES):
        log.info("%s: convolutions only (a keras-vggface notop file): a trunk-only canonical state", path)
    return params
