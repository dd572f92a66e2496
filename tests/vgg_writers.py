"""Test-only: VGG-Face parameters (canonical: PyTorch shapes, BGR conv1_1) written in each published layout.

Each writer uses that format's own library (h5py, scipy.io, torch.save; Caffe in caffe_writer, Torch7 in
t7_writer) and encodes the parameters the way that copy does: HWIO kernels, fc layers as 7x7/1x1
convolutions, channels-last Dense flatten, RGB conv1_1 for MatConvNet-derived copies.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

BLOCK_CONVS = (2, 2, 3, 3, 3)
CONV_NAMES = tuple(f"conv{b}_{i}" for b, n in enumerate(BLOCK_CONVS, 1) for i in range(1, n + 1))
FC_NAMES = ("fc6", "fc7", "fc8")


def as_conv(params: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A canonical weight as a convolution (out, in, k, k): fc6 over the 7x7 map, fc7/fc8 as 1x1."""
    w = params[f"{name}.weight"]
    if w.ndim == 4:
        return w
    k = 7 if name == "fc6" else 1
    return w.reshape(w.shape[0], -1, k, k)


def rgb(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same network for RGB input (conv1_1's input channels reversed), as MatConvNet copies hold it."""
    out = dict(params)
    out["conv1_1.weight"] = np.ascontiguousarray(params["conv1_1.weight"][:, ::-1])
    return out


def hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


# -- Keras HDF5 ------------------------------------------------------------------------------------
def _keras_layer(f: Any, name: str, weights: list[tuple[str, np.ndarray]]) -> None:
    """Keras 2 ``save_weights``: a group per layer, ``weight_names``, datasets at ``layer/weight_name``."""
    group = f.create_group(name) if name not in f else f[name]
    group.attrs["weight_names"] = np.array([n.encode() for n, _ in weights], dtype="S")
    for wname, a in weights:
        group.create_dataset(wname, data=a)


def write_deepface_h5(
    path: str | os.PathLike[str], params: dict[str, np.ndarray], names: str = "vggface", layer_order: bool = True
) -> None:
    """deepface's ``vgg_face_weights.h5``: ZeroPadding2D + Conv2D pairs, fc6-fc8 as Conv2D, Flatten, softmax.

    ``names``: ``"vggface"`` (``conv1_1/conv1_1_2/kernel:0``, ``fc6/fc6_1/kernel:0``) or ``"auto"`` (Keras
    auto-names ``conv2d_1`` ...). ``layer_order=False`` leaves out the root ``layer_names`` attribute.
    """
    import h5py

    layers: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    counters: dict[str, int] = {}

    def auto(kind: str) -> str:
        counters[kind] = counters.get(kind, 0) + 1
        return f"{kind}_{counters[kind]}"

    def conv(name: str) -> None:
        lname = name if names == "vggface" else auto("conv2d")
        suffix = "_2" if name in CONV_NAMES else "_1"
        prefix = f"{lname}{suffix}" if names == "vggface" else lname
        layers.append(
            (lname, [(f"{prefix}/kernel:0", hwio(as_conv(params, name))), (f"{prefix}/bias:0", params[f"{name}.bias"])])
        )

    i = 0
    for n in BLOCK_CONVS:
        for _ in range(n):
            layers.append((auto("zero_padding2d"), []))
            conv(CONV_NAMES[i])
            i += 1
        layers.append((auto("max_pooling2d"), []))
    for name in FC_NAMES:
        conv(name)
        if name != "fc8":
            layers.append((auto("dropout"), []))
    layers += [(auto("flatten"), []), (auto("activation"), [])]
    with h5py.File(path, "w") as f:
        if layer_order:
            f.attrs["layer_names"] = np.array([n.encode() for n, _ in layers], dtype="S")
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for name, weights in layers:
            _keras_layer(f, name, weights)


def write_rcmalli_h5(path: str | os.PathLike[str], params: dict[str, np.ndarray], notop: bool = False) -> None:
    """keras-vggface ``rcmalli_vggface_tf_vgg16.h5`` (``model.save`` layout, under ``model_weights``).

    Dense fc6's kernel takes the 7x7xC map flattened channels-last, as Keras's Flatten does.
    """
    import h5py

    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        order = ["input_1"]
        root.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S")
        i = 0
        for b, n in enumerate(BLOCK_CONVS, 1):
            for _ in range(n):
                name = CONV_NAMES[i]
                _keras_layer(
                    root, name, [(f"{name}/kernel:0", hwio(params[f"{name}.weight"])), (f"{name}/bias:0", params[f"{name}.bias"])]
                )
                order.append(name)
                i += 1
            root.create_group(f"pool{b}").attrs["weight_names"] = np.array([], dtype="S")
            order.append(f"pool{b}")
        if not notop:
            order.append("flatten")
            root.create_group("flatten").attrs["weight_names"] = np.array([], dtype="S")
            for name, act in zip(FC_NAMES, ("relu", "relu", "softmax")):
                w = params[f"{name}.weight"]
                if name == "fc6":  # (out, C*7*7) in C,H,W order -> (7*7*C, out) in H,W,C order
                    kernel = w.reshape(w.shape[0], -1, 7, 7).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
                else:
                    kernel = w.T
                _keras_layer(
                    root, name, [(f"{name}/kernel:0", np.ascontiguousarray(kernel)), (f"{name}/bias:0", params[f"{name}.bias"])]
                )
                # The activation layers are named fc6/relu ...: in HDF5 a group inside the Dense layer's.
                root[name].create_group(act).attrs["weight_names"] = np.array([], dtype="S")
                order += [name, f"{name}/{act}"]
        root.attrs["layer_names"] = np.array([n.encode() for n in order], dtype="S")
        f.attrs["model_config"] = b'{"class_name": "Model"}'


def write_keras3_h5(path: str | os.PathLike[str], params: dict[str, np.ndarray]) -> None:
    """Keras 3 ``.weights.h5``: ``layers/<name>/vars/0`` (kernel), ``vars/1`` (bias); deepface's conv fc layers."""
    import h5py

    with h5py.File(path, "w") as f:
        names = ["conv2d"] + [f"conv2d_{i}" for i in range(1, len(CONV_NAMES) + len(FC_NAMES))]
        for lname, name in zip(names, (*CONV_NAMES, *FC_NAMES)):
            g = f.create_group(f"layers/{lname}/vars")
            g.create_dataset("0", data=hwio(as_conv(params, name)))
            g.create_dataset("1", data=params[f"{name}.bias"])
        f.create_group("layers/zero_padding2d/vars")
        f.create_group("layers/flatten/vars")


# -- MatConvNet --------------------------------------------------------------------------------------
def struct_array(records: list[dict[str, Any]]) -> np.ndarray:
    """A 1xN MATLAB struct array (scipy.io.savemat writes structured arrays as struct arrays)."""
    keys = list(records[0])
    arr = np.zeros((1, len(records)), dtype=[(k, object) for k in keys])
    for i, r in enumerate(records):
        for k in keys:
            arr[0, i][k] = r[k]
    return arr


def cell(*items: Any) -> np.ndarray:
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def write_dagnn_mat(path: str | os.PathLike[str], params: dict[str, np.ndarray], prefix: str = "") -> None:
    """``dagnn.DagNN.saveobj``: top-level ``vars``, ``params``, ``layers`` and ``meta``; RGB input.

    Params are named ``conv1_1f``, ``conv1_1b`` ... as MatConvNet's converters name them, or, with a
    ``prefix``, ``<prefix>0f``, ``<prefix>0b`` ... (only the layers' ``params`` lists tie them to layers).
    """
    from scipy.io import savemat

    p = rgb(params)
    entries, layers, prev = [], [], "data"
    blocks = iter(BLOCK_CONVS)
    left = next(blocks)
    for i, name in enumerate((*CONV_NAMES, *FC_NAMES)):
        w = hwio(as_conv(p, name))
        pname = f"{prefix}{i}" if prefix else name
        entries += [
            {"name": f"{pname}f", "value": w, "learningRate": 1.0, "weightDecay": 1.0},
            {"name": f"{pname}b", "value": p[f"{name}.bias"].reshape(-1, 1), "learningRate": 2.0, "weightDecay": 0.0},
        ]
        layers.append(
            {
                "name": name,
                "type": "dagnn.Conv",
                "inputs": cell(prev),
                "outputs": cell(name),
                "params": cell(f"{pname}f", f"{pname}b"),
                "block": {"size": np.array(w.shape, float)},
            }
        )
        layers.append(
            {
                "name": f"relu_{name}",
                "type": "dagnn.ReLU",
                "inputs": cell(name),
                "outputs": cell(f"{name}x"),
                "params": np.empty((0, 0), object),
                "block": {},
            }
        )
        prev = f"{name}x"
        if name in CONV_NAMES:
            left -= 1
            if left == 0:
                layers.append(
                    {
                        "name": f"pool{name[4]}",
                        "type": "dagnn.Pooling",
                        "inputs": cell(prev),
                        "outputs": cell(f"pool{name[4]}"),
                        "params": np.empty((0, 0), object),
                        "block": {},
                    }
                )
                prev = f"pool{name[4]}"
                left = next(blocks, 0)
    layers.append(
        {
            "name": "prob",
            "type": "dagnn.SoftMax",
            "inputs": cell(prev),
            "outputs": cell("prob"),
            "params": np.empty((0, 0), object),
            "block": {},
        }
    )
    savemat(
        path,
        {
            "vars": struct_array([{"name": "data", "precious": 0.0}]),
            "params": struct_array(entries),
            "layers": struct_array(layers),
            "meta": {"normalization": {"averageImage": np.array([129.1863, 104.7624, 93.5940])}},
        },
        do_compression=True,
    )


def write_simplenn_mat(path: str | os.PathLike[str], params: dict[str, np.ndarray]) -> None:
    """MatConvNet SimpleNN ``vgg-face.mat``: ``net.layers`` cell of conv/relu/pool structs; RGB input."""
    from scipy.io import savemat

    p = rgb(params)
    layers = []
    for name in (*CONV_NAMES, *FC_NAMES):
        layers.append(
            {
                "name": name,
                "type": "conv",
                "weights": cell(hwio(as_conv(p, name)), p[f"{name}.bias"].reshape(-1, 1)),
                "pad": 1 if name in CONV_NAMES else 0,
                "stride": 1,
            }
        )
        layers.append({"name": f"relu_{name}", "type": "relu"})
    savemat(path, {"net": {"layers": cell(*layers), "meta": {"inputs": "data"}}})


# -- PyTorch -----------------------------------------------------------------------------------------
def write_albanie_pth(path: str | os.PathLike[str], params: dict[str, np.ndarray]) -> None:
    """Albanie's ``vgg_face_dag.pth``: a state dict, fc6-fc8 as convolutions, conv1_1 for RGB input."""
    import torch

    p = rgb(params)
    state = {}
    for name in (*CONV_NAMES, *FC_NAMES):
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(as_conv(p, name)))
        state[f"{name}.bias"] = torch.from_numpy(p[f"{name}.bias"].copy())
    torch.save(state, path)
