"""Weight conversion: every source format to the canonical safetensors, and every bad input refused cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agegender.backbones.vgg_face import VGG16_WIDTHS, VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.model.vgg import CONV_NAMES, FC_NAMES, VGGFace
from agegender.weights.convert import canonical_key, load_canonical, read_weights
from t7_writer import Obj, torch7_forward, vgg_face_model, vgg_face_params, write_t7, write_vgg_face_t7

WIDTHS, FC, CLASSES = (4, 8, 8, 16, 16), 32, 10
BLOCK_CONVS = (2, 2, 3, 3, 3)


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    return vgg_face_params(WIDTHS, FC, CLASSES, seed=3)


def convert(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_equal(state: dict[str, torch.Tensor], params: dict[str, np.ndarray]) -> None:
    assert set(state) == set(params)
    for k, v in params.items():
        assert state[k].dtype == torch.float32 and state[k].is_contiguous(), k
        assert torch.equal(state[k], torch.from_numpy(np.ascontiguousarray(v, np.float32))), k


# -- Torch7 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"conv_4d": True}, {"shared_storage": True}])
def test_t7_round_trip_is_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], options: dict[str, bool]
) -> None:
    src, out = tmp_path / "VGG_FACE.t7", tmp_path / "out" / "vgg_face.safetensors"
    write_t7(src, vgg_face_model(params, **options))
    rc, stdout, err = convert(capsys, src, "-o", out)
    assert rc == 0, err
    summary = json.loads(stdout)
    state, meta = load_canonical(out)
    assert_equal(state, params)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source_sha256"] == summary["source_sha256"] == sha
    assert meta["source_format"] == summary["format"] == "t7"
    assert meta["preprocess"] == VGG_FACE_PREPROCESS.to_json()
    assert json.loads(meta["widths"]) == summary["widths"] == list(WIDTHS)
    assert summary["parameters"] == sum(v.size for v in params.values())
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp files left


def test_forward_matches_numpy_torch7_network(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    src = tmp_path / "VGG_FACE.t7"
    model_t7 = vgg_face_model(params)
    write_t7(src, model_t7)
    net = VGGFace(WIDTHS, fc=FC, classes=CLASSES).eval()
    net.load_canonical(read_weights(src))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    for i in range(len(x)):
        ref = torch7_forward(model_t7, x[i])
        assert ref.max() < 0.99  # not saturated, so the comparison says something
        np.testing.assert_allclose(probs[i], ref, atol=1e-5)


@pytest.mark.slow
def test_full_width_conv_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "wide.t7", tmp_path / "wide.safetensors"
    params = write_vgg_face_t7(src, widths=VGG16_WIDTHS, fc=8, classes=4, seed=1)
    assert convert(capsys, src, "-o", out)[0] == 0
    state, meta = load_canonical(out)
    assert_equal(state, params)
    assert json.loads(meta["widths"]) == list(VGG16_WIDTHS)
    assert sum(state[f"{n}.weight"].numel() + state[f"{n}.bias"].numel() for n in CONV_NAMES) == 14_714_688


# -- PyTorch ports --------------------------------------------------------------------------------
def torchvision_vgg16(params: dict[str, np.ndarray]) -> nn.Module:
    """A torchvision-layout VGG16 (features / classifier Sequentials) holding ``params``."""
    layers: list[nn.Module] = []
    cin = 3
    for width, convs in zip(WIDTHS, BLOCK_CONVS):
        for _ in range(convs):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
        layers.append(nn.MaxPool2d(2, 2))
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.classifier = nn.Sequential(
        nn.Linear(cin * 49, FC),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(FC, FC),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(FC, CLASSES),
    )
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for name, layer in zip((*CONV_NAMES, *FC_NAMES), convs + linears):
            layer.weight.copy_(torch.from_numpy(params[f"{name}.weight"]))
            layer.bias.copy_(torch.from_numpy(params[f"{name}.bias"]))
    return net


def _renamed(params: dict[str, np.ndarray], rename: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in params.items():
        layer, part = key.split(".")
        out[f"{rename[layer]}.{part}"] = torch.from_numpy(value.copy())
    return out


SCHEMES = {
    "canonical": {n: n for n in (*CONV_NAMES, *FC_NAMES)},
    "prlz77": {**{n: n.replace("conv", "conv_") for n in CONV_NAMES}, **{n: n for n in FC_NAMES}},
    "pyvggface": {**{n: "features." + n.replace("conv", "conv_") for n in CONV_NAMES}, **{n: f"fc.{n}" for n in FC_NAMES}},
}


@pytest.mark.parametrize("scheme", [*SCHEMES, "torchvision"])
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module.", "float64"])
def test_pt_key_schemes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], scheme: str, wrap: str
) -> None:
    state: dict[str, torch.Tensor] = (
        dict(torchvision_vgg16(params).state_dict()) if scheme == "torchvision" else _renamed(params, SCHEMES[scheme])
    )
    if wrap == "module.":
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap == "float64":
        state = {k: v.double() for k, v in state.items()}
    src, out = tmp_path / "weights.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": state, "epoch": 3} if wrap == "state_dict" else state, src)
    rc, _, err = convert(capsys, src, "-o", out)
    assert rc == 0, err
    assert_equal(load_canonical(out)[0], params)


def test_torchvision_names_are_derived_from_structure() -> None:
    assert canonical_key("features.0.weight") == "conv1_1.weight"
    assert canonical_key("features.28.bias") == "conv5_3.bias"
    assert canonical_key("classifier.6.weight") == "fc8.weight"
    assert canonical_key("features.4.weight") is None  # a max-pool, no parameters
    assert canonical_key("num_batches_tracked") is None


class TinyPort(nn.Module):
    """A whole-module port in the style of VGG_Face_pytorch.pt (conv_1_1 ... fc8 attributes)."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        for name in (*CONV_NAMES, *FC_NAMES):
            w = torch.from_numpy(params[f"{name}.weight"]).double()  # the known file is float64
            layer = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1) if w.ndim == 4 else nn.Linear(*w.shape[::-1])
            layer.weight = nn.Parameter(w)
            layer.bias = nn.Parameter(torch.from_numpy(params[f"{name}.bias"]).double())
            setattr(self, name.replace("conv", "conv_"), layer)


def test_pickled_module_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    src, out = tmp_path / "VGG_Face_pytorch.pt", tmp_path / "w.safetensors"
    torch.save(TinyPort(params), src)
    rc, _, err = convert(capsys, src, "-o", out)
    assert rc == 2 and "--trust-pickle" in err and str(src) in err and err.count("\n") == 1
    assert not out.exists()
    rc, _, err = convert(capsys, src, "-o", out, "--trust-pickle")
    assert rc == 0, err
    assert_equal(load_canonical(out)[0], params)


# -- MatConvNet and Keras ---------------------------------------------------------------------------
def kernel_size(name: str) -> int:
    return 7 if name == "fc6" else 1 if name in FC_NAMES else 3


def to_matconvnet(params: dict[str, np.ndarray], channels_flip: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Canonical -> (W (H, W, in, out), b (out, 1)); fc layers as convolutions over the previous map."""
    out = {}
    for name in (*CONV_NAMES, *FC_NAMES):
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        k = kernel_size(name)
        w = w.reshape(w.shape[0], -1, k, k)
        if channels_flip and name == "conv1_1":
            w = w[:, ::-1]
        out[name] = (np.ascontiguousarray(w.transpose(2, 3, 1, 0)), b.reshape(-1, 1))
    return out


def check_hwio_semantics(params: dict[str, np.ndarray], hwio: dict[str, np.ndarray], rgb: bool) -> None:
    """The test's own encoding computes what the canonical layer computes, on a random receptive field."""
    rng = np.random.default_rng(5)
    for name, w_hwio in hwio.items():
        k = kernel_size(name)
        patch = rng.standard_normal((k, k, w_hwio.shape[2]))  # H, W, C as MatConvNet/Keras hold maps
        canonical_in = patch[..., ::-1] if rgb and name == "conv1_1" else patch  # the same pixels in BGR
        w = params[f"{name}.weight"].reshape(w_hwio.shape[3], -1, k, k)
        np.testing.assert_allclose(
            np.einsum("hwio,hwi->o", w_hwio, patch), np.einsum("oihw,hwi->o", w, canonical_in), rtol=1e-4, atol=1e-4
        )


def _cell(*items: object) -> np.ndarray:
    cell = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        cell[0, i] = item
    return cell


@pytest.mark.parametrize("layout", ["simplenn", "dagnn", "flat"])
def test_matconvnet(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], layout: str) -> None:
    from scipy.io import savemat

    mcn = to_matconvnet(params, channels_flip=True)
    check_hwio_semantics(params, {n: w for n, (w, _) in mcn.items()}, rgb=True)
    if layout == "simplenn":
        layers = []
        for name, (w, b) in mcn.items():
            layers.append({"name": name, "type": "conv", "weights": _cell(w, b), "pad": 1})
            layers.append({"name": f"relu_{name}", "type": "relu"})
        mat = {"net": {"layers": _cell(*layers), "meta": {"inputs": "data"}}}
    elif layout == "dagnn":
        entries = [{"name": f"{n}{s}", "value": v} for n, (w, b) in mcn.items() for s, v in (("f", w), ("b", b))]
        mat = {"params": _cell(*entries)}
    else:
        mat = {name: {"W": w, "b": b} for name, (w, b) in mcn.items()}
    src, out = tmp_path / "vgg_face.mat", tmp_path / "w.safetensors"
    savemat(src, mat)
    rc, _, err = convert(capsys, src, "-o", out)
    assert rc == 0, err
    state, meta = load_canonical(out)
    assert_equal(state, params)
    assert meta["source_format"] == "mat"


@pytest.mark.parametrize("root", ["", "model_weights/"])
def test_keras_h5(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], root: str) -> None:
    import h5py

    hwio = {n: w for n, (w, _) in to_matconvnet(params, channels_flip=False).items()}
    check_hwio_semantics(params, hwio, rgb=False)
    src, out = tmp_path / "rcmalli_vggface_tf_vgg16.h5", tmp_path / "w.safetensors"
    with h5py.File(src, "w") as f:
        for name in (*CONV_NAMES, "pool1", *FC_NAMES):
            group = f.create_group(f"{root}{name}")
            if name.startswith("pool"):
                group.attrs["weight_names"] = []
                continue
            w = hwio[name]
            # Keras Dense kernels are (in, out); fc6's input is the 7x7xC map flattened channels-last.
            kernel = w if name in CONV_NAMES else w.reshape(-1, w.shape[3])
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=params[f"{name}.bias"])
    # The flatten-order claim, independently: channels-last features @ kernel == canonical fc6.
    x = np.random.default_rng(2).standard_normal((WIDTHS[-1], 7, 7))
    fc6 = hwio["fc6"].reshape(-1, FC)
    np.testing.assert_allclose(x.transpose(1, 2, 0).ravel() @ fc6, params["fc6.weight"] @ x.ravel(), rtol=1e-4)
    rc, _, err = convert(capsys, src, "-o", out)
    assert rc == 0, err
    assert_equal(load_canonical(out)[0], params)


# -- bad input ----------------------------------------------------------------------------------------
def _write_bad(kind: str, directory: Path, params: dict[str, np.ndarray]) -> Path:
    rng = np.random.default_rng(9)
    if kind == "truncated":
        path = directory / "VGG_FACE.t7"
        write_t7(path, vgg_face_model(params))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind in ("random.t7", "random.pt", "random.mat", "random.h5", "random.bin"):
        path = directory / kind
        path.write_bytes(rng.bytes(4096))
    elif kind == "empty":
        path = directory / "empty.t7"
        path.touch()
    elif kind == "39 modules":
        model = vgg_face_model(params)
        model.fields["modules"].pop()
        write_t7(path := directory / "short.t7", model)
    elif kind == "conv as linear":
        model = vgg_face_model(params)
        model.fields["modules"][2] = Obj("nn.Linear", dict(model.fields["modules"][2].fields))
        write_t7(path := directory / "relabelled.t7", model)
    elif kind == "wrong fc6":
        bad = dict(params, **{"fc6.weight": rng.standard_normal((FC, WIDTHS[-1] * 36)).astype(np.float32)})
        write_t7(path := directory / "fc6.t7", vgg_face_model(bad))
    elif kind == "not a sequential":
        write_t7(path := directory / "table.t7", {"weights": np.zeros(3, np.float32)})
    elif kind == "pt without weights":
        torch.save({"something": torch.zeros(3)}, path := directory / "other.pt")
    elif kind == "missing":
        path = directory / "missing.t7"
    else:
        raise AssertionError(kind)
    return path


BAD = [
    "truncated",
    "random.t7",
    "random.pt",
    "random.mat",
    "random.h5",
    "random.bin",
    "empty",
    "39 modules",
    "conv as linear",
    "wrong fc6",
    "not a sequential",
    "pt without weights",
    "missing",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], kind: str
) -> None:
    src = _write_bad(kind, tmp_path, params)
    out = tmp_path / "out" / "w.safetensors"
    rc, stdout, err = convert(capsys, src, "-o", out)
    assert rc == 2
    assert err.startswith(f"agegender: error: {src}: ") and err.count("\n") == 1, err
    assert stdout == ""
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("truncated", "truncated at byte"),
        ("empty", "empty file"),
        ("39 modules", "39 modules"),
        ("conv as linear", "12 convolutions, 4 linear layers"),
        ("wrong fc6", "fc6.weight is (32, 576)"),
        ("missing", "no such file"),
        ("random.bin", "unrecognised weights format"),
        ("pt without weights", "parameters missing: conv1_1.bias, conv1_1.weight"),
    ],
)
def test_bad_input_messages(tmp_path: Path, params: dict[str, np.ndarray], kind: str, expected: str) -> None:
    from agegender.errors import AgeGenderError

    with pytest.raises(AgeGenderError, match=re.escape(expected)):
        read_weights(_write_bad(kind, tmp_path, params))


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    src = tmp_path / "VGG_FACE.t7"
    write_t7(src, vgg_face_model(params))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "w.safetensors"
    rc, _, err = convert(capsys, src, "-o", out)
    assert rc == 2 and str(out) in err and err.count("\n") == 1
    out_dir = tmp_path / "dir.safetensors"  # an existing directory cannot be replaced by the file
    out_dir.mkdir()
    rc, _, err = convert(capsys, src, "-o", out_dir)
    assert rc == 2 and str(out_dir) in err and not any(out_dir.iterdir())
    assert sorted(os.listdir(tmp_path)) == ["VGG_FACE.t7", "a_file", "dir.safetensors"]


def test_load_canonical_refuses_other_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from agegender.errors import AgeGenderError

    noise, plain = tmp_path / "noise.safetensors", tmp_path / "plain.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(100))
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AgeGenderError, match="noise.safetensors: not a safetensors file"):
        load_canonical(noise)
    with pytest.raises(AgeGenderError, match="plain.safetensors: not converted VGG-Face weights"):
        load_canonical(plain)


def test_explicit_format_overrides_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    src, out = tmp_path / "weights.bin", tmp_path / "w.safetensors"
    write_t7(src, vgg_face_model(params))
    assert convert(capsys, src, "-o", out, "--input-format", "t7")[0] == 0
    assert convert(capsys, src, "-o", out, "--input-format", "pt")[0] == 2
