"""Test-only: Caffe ``.caffemodel`` files written by protobuf itself, from the few caffe.proto messages needed.

The messages are declared here with protobuf's descriptor API (no protoc, no generated code) using the
field numbers of caffe.proto, so the bytes come from protobuf's own serializer, independently of the
project's wire-format reader. ``packed=False`` declares the repeated numbers unpacked, as a proto2 file
without ``[packed = true]`` would write them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

CONVOLUTION, INNER_PRODUCT, RELU, POOLING, DROPOUT, SOFTMAX = 4, 14, 18, 17, 6, 20


@functools.cache
def messages(packed: bool = True) -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=f"caffe_test_{int(packed)}.proto", package="caffe", syntax="proto2")

    def message(name: str, *fields: tuple[str, int, int, int, str | None, bool]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name, pack in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if pack and packed:
                f.options.packed = True

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", ("dim", 1, F.TYPE_INT64, rep, None, True))
    message(
        "BlobProto",
        ("num", 1, F.TYPE_INT32, opt, None, False),
        ("channels", 2, F.TYPE_INT32, opt, None, False),
        ("height", 3, F.TYPE_INT32, opt, None, False),
        ("width", 4, F.TYPE_INT32, opt, None, False),
        ("data", 5, F.TYPE_FLOAT, rep, None, True),
        ("diff", 6, F.TYPE_FLOAT, rep, None, True),
        ("shape", 7, F.TYPE_MESSAGE, opt, ".caffe.BlobShape", False),
        ("double_data", 8, F.TYPE_DOUBLE, rep, None, True),
    )
    message(
        "LayerParameter",
        ("name", 1, F.TYPE_STRING, opt, None, False),
        ("type", 2, F.TYPE_STRING, opt, None, False),
        ("bottom", 3, F.TYPE_STRING, rep, None, False),
        ("top", 4, F.TYPE_STRING, rep, None, False),
        ("blobs", 7, F.TYPE_MESSAGE, rep, ".caffe.BlobProto", False),
    )
    message(
        "V1LayerParameter",
        ("bottom", 2, F.TYPE_STRING, rep, None, False),
        ("top", 3, F.TYPE_STRING, rep, None, False),
        ("name", 4, F.TYPE_STRING, opt, None, False),
        ("type", 5, F.TYPE_INT32, opt, None, False),
        ("blobs", 6, F.TYPE_MESSAGE, rep, ".caffe.BlobProto", False),
    )
    message(
        "NetParameter",
        ("name", 1, F.TYPE_STRING, opt, None, False),
        ("layers", 2, F.TYPE_MESSAGE, rep, ".caffe.V1LayerParameter", False),
        ("input", 3, F.TYPE_STRING, rep, None, False),
        ("input_dim", 4, F.TYPE_INT32, rep, None, False),
        ("layer", 100, F.TYPE_MESSAGE, rep, ".caffe.LayerParameter", False),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
        for name in ("BlobProto", "LayerParameter", "V1LayerParameter", "NetParameter")
    }


def _fill_blob(blob: Any, a: np.ndarray, legacy: bool, double: bool) -> None:
    if legacy:  # V1: always 4-D (num, channels, height, width), padded with leading 1s
        dims = (1,) * (4 - a.ndim) + tuple(a.shape)
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.dim.extend(a.shape)
    (blob.double_data if double else blob.data).extend(a.ravel().tolist())


def vgg_face_net(
    params: dict[str, np.ndarray],
    style: str = "new",
    double: bool = False,
    packed: bool = True,
    fully_convolutional: bool = False,
) -> bytes:
    """VGG_FACE.caffemodel's layer sequence (data layers omitted) holding ``params``; serialized bytes.

    ``style``: ``"v1"`` (``layers``, enum types, 4-D legacy blob dims) or ``"new"`` (``layer``, string
    types, ``shape``); ``double`` stores blobs in ``double_data``; ``fully_convolutional`` writes fc6-fc8
    as 7x7 and 1x1 convolutions, as Caffe's net surgery does.
    """
    m = messages(packed)
    net = m["NetParameter"](name="VGG_FACE_16_layers")
    net.input.append("data")
    net.input_dim.extend([1, 3, 224, 224])
    v1 = style == "v1"

    def layer(name: str, kind: str, weights: tuple[np.ndarray, ...] = ()) -> None:
        if v1:
            enum = {
                "Convolution": CONVOLUTION,
                "InnerProduct": INNER_PRODUCT,
                "ReLU": RELU,
                "Pooling": POOLING,
                "Dropout": DROPOUT,
                "Softmax": SOFTMAX,
            }[kind]
            entry = net.layers.add(name=name, type=enum)
        else:
            entry = net.layer.add(name=name, type=kind)
        entry.bottom.append("data")
        entry.top.append(name)
        for a in weights:
            _fill_blob(entry.blobs.add(), a, v1, double)

    blocks = (2, 2, 3, 3, 3)
    for b, n in enumerate(blocks, 1):
        for i in range(1, n + 1):
            name = f"conv{b}_{i}"
            layer(name, "Convolution", (params[f"{name}.weight"], params[f"{name}.bias"]))
            layer(f"relu{b}_{i}", "ReLU")
        layer(f"pool{b}", "Pooling")
    cin = params["conv5_3.weight"].shape[0]
    for name in ("fc6", "fc7", "fc8"):
        w, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        if fully_convolutional:
            k = 7 if name == "fc6" else 1
            layer(name, "Convolution", (w.reshape(w.shape[0], -1 if name != "fc6" else cin, k, k), bias))
        else:
            layer(name, "InnerProduct", (w, bias))
        if name != "fc8":
            layer(f"relu{name[2:]}", "ReLU")
            layer(f"drop{name[2:]}", "Dropout")
    layer("prob", "Softmax")
    return net.SerializeToString()
