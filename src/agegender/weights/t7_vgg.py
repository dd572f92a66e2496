"""VGG_FACE.t7: the 40-module ``nn.Sequential`` of the Oxford release -> canonical parameters.

Modules are matched by class and order. The geometry is checked by running the 224-pixel input size
through every convolution and pool, so a file whose modules lack fields (2013-14 ``SpatialConvolutionMM``
has no ``dW``, ``dH``, ``padW``, ``padH`` or ``padding``) is read with Torch's defaults where those are
consistent, and with what the layout implies where they are not (it is logged).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.vgg_face import VGG16_BLOCKS, VGG_FACE_PREPROCESS
from ..model.vgg import CONV_NAMES, FC_NAMES
from .canonical import Params, fail
from .torch7 import T7Object, read_t7

log = logging.getLogger(__name__)

T7_MODULES = 40  # VGG_FACE.t7: 13 convs + 15 ReLUs + 5 pools + View + 3 Linears + 2 Dropouts + SoftMax
T7_CONVS = ("nn.SpatialConvolutionMM", "nn.SpatialConvolution")
T7_POOL = "nn.SpatialMaxPooling"
FC6_MAP = 7  # VGG-Face's fc6 takes a 7x7 map: 224 px through five 2x2 pools with size-preserving convs


def read_t7_vgg(path: Path, trust_pickle: bool = False) -> Params:
    model = read_t7(path)
    modules = model.fields.get("modules") if isinstance(model, T7Object) else None
    if not isinstance(modules, list) or not all(isinstance(m, T7Object) for m in modules):
        raise fail(path, "not an nn.Sequential of modules")
    if len(modules) != T7_MODULES:
        raise fail(path, f"{len(modules)} modules, VGG_FACE.t7 has {T7_MODULES}")
    convs = [m for m in modules if m.class_name in T7_CONVS]
    linears = [m for m in modules if m.class_name == "nn.Linear"]
    pools = [m for m in modules if m.class_name == T7_POOL]
    if (len(convs), len(linears), len(pools)) != (len(CONV_NAMES), len(FC_NAMES), len(VGG16_BLOCKS)):
        raise fail(
            path,
            f"{len(convs)} convolutions, {len(linears)} linear layers and {len(pools)} "
            f"max-pools; VGG-Face has {len(CONV_NAMES)}, {len(FC_NAMES)} and {len(VGG16_BLOCKS)}",
        )
    _check_geometry(path, modules, convs, linears)
    params: Params = {}
    for name, conv in zip(CONV_NAMES, convs):
        f = conv.fields
        weight = _array(f, "weight", name, path)
        if weight.ndim == 2:  # SpatialConvolutionMM's (out, in*kH*kW) is row-major (out, in, kH, kW)
            cin = f.get("nInputPlane")
            if not isinstance(cin, int) or cin < 1 or weight.shape[1] != cin * 9:
                raise fail(path, f"{name} weight {weight.shape} does not match nInputPlane={cin}")
            weight = weight.reshape(weight.shape[0], cin, 3, 3)
        params[f"{name}.weight"], params[f"{name}.bias"] = weight, _array(f, "bias", name, path)
    for name, linear in zip(FC_NAMES, linears):
        params[f"{name}.weight"] = _array(linear.fields, "weight", name, path)
        params[f"{name}.bias"] = _array(linear.fields, "bias", name, path)
    return params


def _field(fields: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` that the module has (absent fields read as nil in Lua), else ``default``."""
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    return default


def _check_geometry(path: Path, modules: list[T7Object], convs: list[T7Object], linears: list[T7Object]) -> None:
    """Kernels, strides and paddings of every conv and pool, and the map size they leave for fc6."""
    names = dict(zip(map(id, convs), CONV_NAMES))
    size = VGG_FACE_PREPROCESS.size
    inferred: list[str] = []
    for m in modules:
        f = m.fields
        if m.class_name in T7_CONVS:
            name = names[id(m)]
            kernel = (f.get("kW"), f.get("kH"))
            stride = (_field(f, "dW", default=1), _field(f, "dH", default=1))  # Torch's default
            pad = (_field(f, "padW", "padding"), _field(f, "padH", "padding"))
            if pad == (None, None):
                inferred.append(name)
                pad = (1, 1)  # Torch's default is 0, which the 40-module layout rules out (checked below)
            if kernel != (3, 3) or stride != (1, 1) or pad != (1, 1):
                raise fail(path, f"{name} has kernel {kernel}, stride {stride}, padding {pad}; VGG-Face's are 3x3, 1 and 1")
            size = size + 2 - 3 + 1
        elif m.class_name == T7_POOL:
            geometry = (
                f.get("kW"),
                f.get("kH"),
                f.get("dW"),
                f.get("dH"),
                _field(f, "padW", default=0),
                _field(f, "padH", default=0),
            )
            if geometry != (2, 2, 2, 2, 0, 0):
                raise fail(path, f"a max-pool has kernel, stride and padding {geometry}; VGG-Face's are 2x2, 2 and 0")
            size = size // 2
    if inferred:
        # With Torch's default padding 0, the thirteen 3x3 convs would leave 1x1 (not 7x7) of the 224 px input.
        fc6 = linears[0].fields.get("weight")
        cin = convs[-1].fields.get("nOutputPlane")
        want = cin * FC6_MAP * FC6_MAP if isinstance(cin, int) else None
        if size != FC6_MAP or not isinstance(fc6, np.ndarray) or fc6.ndim != 2 or fc6.shape[1] != want:
            raise fail(
                path,
                f"{', '.join(inferred)} carry no padding fields, and fc6 does not take the "
                f"{FC6_MAP}x{FC6_MAP}x{cin} map that padding 1 gives",
            )
        log.info(
            "%s: %d convolutions carry no dW/dH/padW/padH/padding fields (2013-14 SpatialConvolutionMM); "
            "using stride 1 and padding 1, the only padding that gives fc6 its %dx%d map from %d px",
            path,
            len(inferred),
            FC6_MAP,
            FC6_MAP,
            VGG_FACE_PREPROCESS.size,
        )


def _array(fields: dict[str, Any], key: str, layer: str, path: Path) -> np.ndarray:
    value = fields.get(key)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise fail(path, f"{layer} has no floating-point {key} tensor")
    return value
