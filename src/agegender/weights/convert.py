"""Published face-descriptor weights -> one canonical safetensors state dict.

The dispatcher: it recognises a file's format (suffix and magic bytes, see :mod:`.sniff`), hands it to that
format's reader, checks the result against the canonical VGG-Face layout (:mod:`.canonical`) and writes it
atomically. VGG-Face readers: Torch7 (:mod:`.t7_vgg`), PyTorch (:mod:`.pytorch`), MatConvNet
(:mod:`.matconvnet`), Keras HDF5 (:mod:`.keras_h5`), Caffe (:mod:`.caffe`). dlib's face ResNet
(:mod:`.dlib_dat`) is stored with its own canonical names and ``backbone: dlib-resnet`` in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backbones import BACKBONES, LEGACY_BACKBONE, backbone_for_format
from ..errors import AgeGenderError, OptionError, one_line
from ..files import atomic_path, regular_file, sha256_file
from .canonical import KEYS, Params, check, check_finite, float32, has_fc, infer_widths, printable
from .pytorch import canonical_key
from .sniff import read_head, sniff

log = logging.getLogger(__name__)

# The single list of input formats (the CLI's --input-format choices are read from it).
FORMATS = ("t7", "pt", "mat", "h5", "caffe", "dlib")
FORMAT_NAMES = {
    "t7": "a Torch7 file",
    "pt": "a PyTorch file",
    "mat": "a MATLAB file",
    "h5": "an HDF5 file",
    "caffe": "a Caffe model",
    "dlib": "a dlib network",
}
_SUFFIXES = {
    ".t7": "t7",
    ".pt": "pt",
    ".pth": "pt",
    ".mat": "mat",
    ".h5": "h5",
    ".hdf5": "h5",
    ".caffemodel": "caffe",
    ".dat": "dlib",
}

__all__ = ["FORMATS", "canonical_key", "convert_weights", "infer_widths", "load_canonical", "read_canonical", "read_weights"]


def read_weights(
    src: str | os.PathLike[str], *, trust_pickle: bool = False, fmt: str = "auto", full: bool = False
) -> dict[str, torch.Tensor]:
    """Read any supported encoding of VGG-Face into the canonical state dict, every shape checked.

    A trunk-only file (keras-vggface notop) gives the conv keys only, unless ``full`` asks for fc6-fc8 too.
    """
    path = _source(src)
    fmt = _format(path, fmt)
    if fmt not in _readers():
        other = backbone_for_format(fmt).name
        raise OptionError(
            f"{path}: {FORMAT_NAMES[fmt]} of {other} weights, not VGG-Face (use it with `backbone` {other})", "backbone"
        )
    return _read(path, fmt, trust_pickle, full)[0]


def read_canonical(
    src: str | os.PathLike[str], *, trust_pickle: bool = False, fmt: str = "auto", full: bool = False, backbone: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any published encoding of a backbone's weights -> its canonical state dict and the metadata
    :func:`convert_weights` stores with it (``backbone``, ``source_sha256``, ``widths``, ...).

    ``backbone`` refuses a file of another backbone before it is read; ``full`` refuses a trunk-only VGG-Face file.
    """
    path = _source(src)
    fmt = _format(path, fmt)
    spec = backbone_for_format(fmt)
    if backbone is not None and spec.name != backbone:
        raise AgeGenderError(printable(f"{path}: holds {spec.name} weights, not {backbone} weights"))
    if fmt == "dlib":
        return _read_dlib(path)
    state, widths = _read(path, fmt, trust_pickle, full)
    meta = {
        "backbone": spec.name,
        "source_sha256": sha256_file(path),
        "source_format": fmt,
        "preprocess": spec.preprocess.to_json(),
        "widths": json.dumps(list(widths)),
        "layers": "full" if has_fc(state) else "trunk",
    }
    return state, meta


def convert_weights(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, trust_pickle: bool = False, fmt: str = "auto", full: bool = False
) -> dict[str, Any]:
    """Convert ``src`` to canonical safetensors at ``out``; returns a summary of what was written.

    Everything is checked before anything is written: the output may not be the input (by any path) or a
    directory, and a failed read leaves nothing behind.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = _source(src)
    out = Path(out)
    _check_output(path, out)
    state, meta = read_canonical(path, trust_pickle=trust_pickle, fmt=fmt, full=full)
    widths: tuple[int, ...] = tuple(json.loads(meta["widths"]))
    try:
        with atomic_path(out) as tmp:
            mode = tmp.stat().st_mode & 0o777  # what atomic_path chose from the umask
            save_file(state, str(tmp), metadata=meta)
            os.chmod(tmp, mode)  # safetensors writes its file 0600
    except OSError as e:  # reading errors are AgeGenderErrors already, so this is the output side
        raise AgeGenderError(f"{out}: cannot write ({e.strerror or e})") from None
    fmt = meta["source_format"]
    summary = {
        "source": str(path),
        "output": str(out),
        "format": fmt,
        "backbone": meta["backbone"],
        "source_sha256": meta["source_sha256"],
        "parameters": sum(t.numel() for t in state.values()),
        "widths": list(widths),
        "layers": meta.get("layers", "full"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if meta.get("layers") == "trunk":
        log.warning(
            "%s: no fc6-fc8 (a notop file): %s holds the convolutions only, enough for training, not for identify", path, out
        )
    log.info("converted %s (%s, %d parameters) in %.1fs", path, fmt, summary["parameters"], summary["seconds"])
    return summary


def load_canonical(
    path: str | os.PathLike[str], *, full: bool = False, backbone: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`convert_weights`: the state dict and its metadata, shapes checked.

    ``backbone`` (a name in :data:`agegender.backbones.BACKBONES`) refuses a file of another; ``full`` refuses
    a trunk-only VGG-Face file.
    """
    from safetensors import safe_open

    path = _source(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a file that is not safetensors
        raise AgeGenderError(f"{path}: not a safetensors file ({one_line(e, with_type=True)})") from None
    if "source_format" not in meta:
        raise AgeGenderError(f"{path}: not converted VGG-Face weights (run `agegender convert` first)")
    kind = meta.get("backbone", LEGACY_BACKBONE)  # files converted before dlib's ResNet held VGG-Face
    if backbone is not None and kind != backbone:
        raise AgeGenderError(printable(f"{path}: holds {kind} weights, not {backbone} weights"))
    if kind not in BACKBONES:
        raise AgeGenderError(printable(f"{path}: unknown backbone {kind!r} in its metadata"))
    # the canonical layout is its readers': dlib's own names, or VGG-Face's
    if "dlib" in BACKBONES[kind].formats:
        _check_dlib(state, path)
    else:
        check(state, path, full=full)
    check_finite(state, path)
    return state, meta


# -- shared plumbing ---------------------------------------------------------------------------
def _source(src: str | os.PathLike[str]) -> Path:
    path = regular_file(src)
    if path.stat().st_size == 0:
        raise AgeGenderError(f"{path}: empty file")
    return path


def _check_output(src: Path, out: Path) -> None:
    """The output may not be the input (same file by any name) nor a directory, and must be creatable."""
    if out.is_dir():
        raise AgeGenderError(f"{out}: is a directory; give the output file's name (e.g. {out / 'vgg_face.safetensors'})")
    if out.exists() and os.path.samefile(src, out):
        raise AgeGenderError(f"{out}: is the input file; choose another output name")
    parent = out.parent if str(out.parent) else Path(".")
    while not parent.exists():  # atomic_path creates the missing folders; the first existing one must allow it
        parent = parent.parent
    if not parent.is_dir():
        raise AgeGenderError(f"{out}: cannot write here ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AgeGenderError(f"{out}: cannot write here ({parent} is not writable)")


def _format(path: Path, fmt: str) -> str:
    """The format to read ``path`` with; refuses files whose bytes say they are something else."""
    if fmt != "auto" and fmt not in FORMATS:
        raise AgeGenderError(f"{path}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    found = sniff(*read_head(path))
    if found is not None and not found.usable:
        raise AgeGenderError(f"{path}: is {found.what}")
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    wanted = fmt if fmt != "auto" else by_suffix
    if found is not None and found.fmt and wanted and found.fmt != wanted and (found.strong or fmt == "auto"):
        said = f"`fmt` {fmt} was given" if fmt != "auto" else f"its name says {FORMAT_NAMES[wanted]}"
        verb = "is" if found.strong else "looks like"
        raise OptionError(f"{path}: {verb} {found.what}, though {said}; read it with `fmt` {found.fmt}", "fmt")
    if wanted:
        return wanted
    if found is not None and found.fmt:
        return found.fmt
    raise OptionError(
        f"{path}: unrecognised weights format (expected .t7, .pt/.pth, .mat, .h5, .caffemodel or .dat; or pass `fmt`)", "fmt"
    )


def _readers() -> dict[str, Callable[[Path, bool], Params]]:
    from .caffe import read_caffe
    from .keras_h5 import read_h5
    from .matconvnet import read_mat
    from .pytorch import read_pt
    from .t7_vgg import read_t7_vgg

    return {"t7": read_t7_vgg, "pt": read_pt, "mat": read_mat, "h5": read_h5, "caffe": read_caffe}


def _read(path: Path, fmt: str, trust_pickle: bool, full: bool) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    try:
        params = _readers()[fmt](path, trust_pickle)
    except AgeGenderError as e:  # names from the file may hold newlines: the message stays one line
        if not str(e).isprintable():
            raise AgeGenderError(printable(str(e))) from None
        raise
    except OSError as e:
        raise AgeGenderError(f"{path}: cannot read ({e.strerror or e})") from None
    except MemoryError:
        raise AgeGenderError(f"{path}: declares more data than fits in memory (corrupt file?)") from None
    widths = check(params, path, full=full)  # shapes first: nothing is copied for a file that is not VGG-Face
    state = {k: float32(v) for k, v in params.items() if k in KEYS}
    check_finite(state, path)
    return state, widths


# -- dlib ---------------------------------------------------------------------------------------
def _read_dlib(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .dlib_dat import load_dlib_resnet

    net = load_dlib_resnet(path)
    state = {k: torch.from_numpy(v.astype("float32", copy=False)).contiguous() for k, v in net.state.items()}
    check_finite(state, path)
    meta = {
        "backbone": backbone_for_format("dlib").name,
        "source_sha256": sha256_file(path),
        "source_format": "dlib",
        "widths": json.dumps(list(net.widths)),
        "descriptor_dim": str(net.descriptor_dim),
        "input_mean_rgb": json.dumps(list(net.input_mean_rgb)),
        "input_size": str(net.input_size),
        "layer_versions": json.dumps(list(net.layer_versions)),
    }
    return state, meta


def _check_dlib(state: dict[str, torch.Tensor], path: Path) -> None:
    from ..model.dlib_resnet import DlibResNet

    try:
        DlibResNet.from_canonical(state)  # every name and shape, against the network it will be loaded into
    except AgeGenderError as e:
        raise AgeGenderError(f"{path}: {e}") from None
