"""Test-only Torch7 binary writer, and VGG_FACE.t7-shaped models at any channel width.

Written from the format description (tags, one pre-order object counter, "V 1" class headers,
tensor = sizes, strides, 1-based offset, storage), independently of agegender.torch7. ``ascii=True``
writes what ``torch.save(f, x, 'ascii')`` does: each write call's numbers as text (``%d``, ``%.17g`` for
doubles, ``%.9g`` for floats) separated by spaces and ended by a newline; strings and byte storages raw.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

BLOCK_CONVS = (2, 2, 3, 3, 3)  # convs per VGG16 block
FC_NAMES = ("fc6", "fc7", "fc8")
_KIND = {
    np.dtype("float32"): "Float",
    np.dtype("float64"): "Double",
    np.dtype("int64"): "Long",
    np.dtype("int32"): "Int",
    np.dtype("uint8"): "Byte",
}


@dataclass(eq=False)
class Obj:
    """A Torch class instance whose payload is a field table (every nn module)."""

    class_name: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Storage:
    data: np.ndarray  # 1-D; its dtype picks torch.FloatStorage, DoubleStorage, ...
    cuda: bool = False  # torch.CudaStorage / CudaDoubleStorage ...: the same bytes under cutorch's names


@dataclass(eq=False)
class Tensor:
    storage: Storage | None
    size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    offset: int = 0  # 0-based here, written 1-based
    dtype: np.dtype = np.dtype("float32")  # only used when there is no storage
    cuda: bool = False

    @classmethod
    def of(cls, array: np.ndarray, cuda: bool = False) -> Tensor:
        flat = np.ascontiguousarray(array).reshape(-1)
        strides = tuple(s // array.itemsize for s in np.empty(array.shape, array.dtype).strides)
        return cls(Storage(flat, cuda), tuple(array.shape), strides, 0, array.dtype, cuda)


def class_name(kind: str, cuda: bool, what: str) -> str:
    """``torch.FloatTensor``; cutorch: ``torch.CudaTensor`` (float), ``torch.CudaDoubleTensor`` ..."""
    if not cuda:
        return f"torch.{kind}{what}"
    return f"torch.Cuda{'' if kind == 'Float' else kind}{what}"


def empty(dtype: Any = np.float32) -> Tensor:
    """An empty tensor with no storage, as ``output``/``gradInput`` after clearState()."""
    return Tensor(None, dtype=np.dtype(dtype))


class T7Writer:
    def __init__(self, f: BinaryIO, long_size: int = 8, ascii: bool = False) -> None:
        self.f = f
        self.ascii = ascii
        self.long_fmt = {8: "q", 4: "i"}[long_size]
        self.next_index = 1
        self.index: dict[int, int] = {}
        self.alive: list[Any] = []  # keeps ids unique while writing
        self.tensors: dict[int, Tensor] = {}

    def _text(self, values: list[str]) -> None:  # one ASCII write call: values, spaces, a newline
        if values:
            self.f.write((" ".join(values) + "\n").encode())

    def _int(self, v: int) -> None:
        if self.ascii:
            self._text([str(int(v))])
        else:
            self.f.write(struct.pack("<i", v))

    def _longs(self, *v: int) -> None:
        if self.ascii:
            self._text([str(int(x)) for x in v])
        else:
            self.f.write(struct.pack(f"<{len(v)}{self.long_fmt}", *v))

    def _double(self, v: float) -> None:
        if self.ascii:
            self._text([f"{v:.17g}"])
        else:
            self.f.write(struct.pack("<d", v))

    def _raw(self, b: bytes) -> None:  # chars: raw bytes in both modes, plus the ASCII newline
        self.f.write(b)
        if self.ascii and b:
            self.f.write(b"\n")

    def _string(self, s: str | bytes) -> None:
        b = s.encode() if isinstance(s, str) else s
        self._int(len(b))
        self._raw(b)

    def _data(self, data: np.ndarray) -> None:
        if not self.ascii:
            self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        elif data.dtype.itemsize == 1:
            self._raw(data.tobytes())
        else:
            spec = {"f4": ".9g", "f8": ".17g"}.get(data.dtype.str[1:], "d")
            self._text([format(x, spec) for x in data.tolist()])

    def write(self, v: Any) -> None:
        if isinstance(v, np.ndarray):  # the same array twice is the same tensor object
            v = self.tensors.setdefault(id(v), Tensor.of(v))
            self.alive.append(v)
        if v is None:
            self._int(0)
        elif isinstance(v, bool):
            self._int(5)
            self._int(int(v))
        elif isinstance(v, (int, float, np.integer, np.floating)):
            self._int(1)
            self._double(float(v))
        elif isinstance(v, (str, bytes)):
            self._int(2)
            self._string(v)
        elif isinstance(v, (dict, list, Obj, Storage, Tensor)):
            self._int(3 if isinstance(v, (dict, list)) else 4)
            if id(v) in self.index:
                self._int(self.index[id(v)])
                return
            self.index[id(v)] = self.next_index
            self.alive.append(v)
            self._int(self.next_index)
            self.next_index += 1
            self._payload(v)
        else:
            raise TypeError(f"cannot write {type(v).__name__}")

    def _payload(self, v: Any) -> None:
        if isinstance(v, (dict, list)):
            items = list(enumerate(v, 1) if isinstance(v, list) else v.items())
            self._int(len(items))
            for key, value in items:
                self.write(key)
                self.write(value)
            return
        self._string("V 1")
        if isinstance(v, Obj):
            self._string(v.class_name)
            self.write(v.fields)
        elif isinstance(v, Storage):
            kind = _KIND[v.data.dtype]
            data = v.data.astype(np.int32) if kind == "Long" and self.long_fmt == "i" else v.data
            self._string(class_name(kind, v.cuda, "Storage"))
            self._longs(data.size)
            self._data(data)
        else:
            dtype = v.storage.data.dtype if v.storage is not None else v.dtype
            self._string(class_name(_KIND[dtype], v.cuda, "Tensor"))
            self._int(len(v.size))
            if v.size:
                self._longs(*v.size)
                self._longs(*v.stride)
            self._longs(v.offset + 1)
            self.write(v.storage)


def write_t7(path: str | os.PathLike[str], obj: Any, long_size: int = 8, ascii: bool = False) -> None:
    with open(path, "wb") as f:
        T7Writer(f, long_size, ascii).write(obj)


# -- VGG-Face ----------------------------------------------------------------------------------
def conv_names() -> list[str]:
    return [f"conv{b}_{i}" for b, n in enumerate(BLOCK_CONVS, 1) for i in range(1, n + 1)]


def vgg_face_params(widths: tuple[int, ...], fc: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 parameters in PyTorch shapes (He-scaled so activations survive 16 layers)."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for b, n in enumerate(BLOCK_CONVS):
        for i in range(n):
            shapes[f"conv{b + 1}_{i + 1}"] = (widths[b], cin, 3, 3)
            cin = widths[b]
    for name, (fin, fout) in zip(FC_NAMES, ((widths[-1] * 49, fc), (fc, fc), (fc, classes))):
        shapes[name] = (fout, fin)
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        params[f"{name}.weight"] = w
        params[f"{name}.bias"] = rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.01)
    return params


def _module(class_name: str, **fields: Any) -> Obj:
    return Obj(class_name, {**fields, "output": empty(), "gradInput": empty(), "train": False, "_type": "torch.FloatTensor"})


def vgg_face_model(
    params: dict[str, np.ndarray],
    conv_4d: bool = False,
    shared_storage: bool = False,
    cuda: bool = False,
    old_conv: bool = False,
    double: bool = False,
) -> Obj:
    """``nn.Sequential`` of the 40 VGG_FACE.t7 modules, in the file's order.

    ``conv_4d`` writes conv weights as (out, in, 3, 3) instead of SpatialConvolutionMM's 2-D (out, in*9);
    ``shared_storage`` puts every weight and bias in one storage, as Lua's ``getParameters()`` leaves them;
    ``cuda`` writes cutorch's classes (``torch.CudaTensor``, or ``CudaDoubleTensor`` with ``double``);
    ``old_conv`` leaves out dW, dH, padW and padH, as 2013-14 SpatialConvolutionMM modules do.
    """
    tensors: dict[str, Any] = {}
    for name, a in params.items():
        a = a.astype(np.float64) if double else a
        tensors[name] = a if conv_4d or a.ndim != 4 else a.reshape(a.shape[0], -1)
        if cuda:
            tensors[name] = Tensor.of(tensors[name], cuda=True)
    if shared_storage:
        assert not cuda
        storage = Storage(np.concatenate([a.ravel() for a in tensors.values()]))
        offset = 0
        for name, a in tensors.items():
            strides = tuple(s // a.itemsize for s in a.strides)
            tensors[name] = Tensor(storage, a.shape, strides, offset)
            offset += a.size

    modules: list[Obj] = []
    for b, n in enumerate(BLOCK_CONVS, 1):
        for i in range(1, n + 1):
            w = params[f"conv{b}_{i}.weight"]
            geometry = {} if old_conv else {"dW": 1, "dH": 1, "padW": 1, "padH": 1}
            modules.append(
                _module(
                    "nn.SpatialConvolutionMM",
                    nInputPlane=w.shape[1],
                    nOutputPlane=w.shape[0],
                    kW=3,
                    kH=3,
                    **geometry,
                    weight=tensors[f"conv{b}_{i}.weight"],
                    bias=tensors[f"conv{b}_{i}.bias"],
                )
            )
            modules.append(_module("nn.ReLU", threshold=0, val=0, inplace=False))
        modules.append(_module("nn.SpatialMaxPooling", kW=2, kH=2, dW=2, dH=2, padW=0, padH=0, ceil_mode=False, indices=empty()))
    flat = params["fc6.weight"].shape[1]
    modules.append(_module("nn.View", size=Storage(np.array([flat], np.int64)), numElements=flat))
    for name in FC_NAMES:
        modules.append(_module("nn.Linear", weight=tensors[f"{name}.weight"], bias=tensors[f"{name}.bias"]))
        if name != FC_NAMES[-1]:
            modules.append(_module("nn.ReLU", threshold=0, val=0, inplace=False))
            modules.append(_module("nn.Dropout", p=0.5, v2=True, noise=empty()))
    modules.append(_module("nn.SoftMax"))
    return _module("nn.Sequential", modules=modules)


def write_vgg_face_t7(
    path: str | os.PathLike[str],
    widths: tuple[int, ...] = (4, 8, 8, 16, 16),
    fc: int = 32,
    classes: int = 10,
    seed: int = 0,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Write a VGG_FACE.t7-shaped file; returns its parameters in PyTorch shapes."""
    params = vgg_face_params(widths, fc, classes, seed)
    write_t7(path, vgg_face_model(params, **options))
    return params


# -- reference forward pass --------------------------------------------------------------------
def torch7_forward(model: Obj, x: np.ndarray) -> np.ndarray:
    """Run a written ``nn.Sequential`` (evaluate mode) on one ``(C, H, W)`` input, in float64 NumPy.

    Each module does what its Torch7 ``updateOutput`` does; the conv unfolds its input the way
    SpatialConvolutionMM does (rows ordered channel, kernel row, kernel column) and multiplies by
    the 2-D weight.
    """
    x = x.astype(np.float64)
    for module in model.fields["modules"]:
        f = module.fields
        kind = module.class_name
        if kind == "nn.SpatialConvolutionMM":
            x = _conv_mm(
                x,
                np.asarray(f["weight"], np.float64).reshape(f["nOutputPlane"], -1),
                np.asarray(f["bias"], np.float64),
                f["kW"],
                f["kH"],
                f["padW"],
                f["padH"],
            )
        elif kind == "nn.ReLU":
            x = np.maximum(x, f["threshold"])
        elif kind == "nn.SpatialMaxPooling":
            c, h, w = x.shape
            x = x[:, : h - h % f["kH"], : w - w % f["kW"]]
            x = x.reshape(c, h // f["kH"], f["kH"], w // f["kW"], f["kW"]).max(axis=(2, 4))
        elif kind == "nn.View":
            x = x.reshape(f["numElements"])
        elif kind == "nn.Linear":
            x = np.asarray(f["weight"], np.float64) @ x + np.asarray(f["bias"], np.float64)
        elif kind == "nn.Dropout":
            pass  # v2 dropout scales while training, so evaluation is the identity
        elif kind == "nn.SoftMax":
            e = np.exp(x - x.max())
            x = e / e.sum()
        else:
            raise ValueError(f"no reference for {kind}")
    return x


def _conv_mm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, kw: int, kh: int, padw: int, padh: int) -> np.ndarray:
    c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (padh, padh), (padw, padw)))
    oh, ow = h + 2 * padh - kh + 1, w + 2 * padw - kw + 1
    finput = np.empty((c, kh, kw, oh, ow))
    for i in range(kh):
        for j in range(kw):
            finput[:, i, j] = xp[:, i : i + oh, j : j + ow]
    out = weight @ finput.reshape(c * kh * kw, oh * ow) + bias[:, None]
    return out.reshape(-1, oh, ow)
