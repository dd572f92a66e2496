"""Every published copy of VGG-Face, each written by its own format's writer, converts to the same canonical file.

One small synthetic VGG-Face is saved in every layout (Torch7 binary/ASCII/cutorch/2013 modules, PyTorch
state dicts incl. Albanie's, MatConvNet SimpleNN/DagNN, Keras HDF5 from deepface/keras-vggface/Keras 3,
Caffe V1/new/double/unpacked/fully-convolutional); each must convert to exactly those tensors and give the
same `identify` top-5 on the same image as the NumPy Torch7 reference. Bad inputs of every kind give one
line and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.cli import main
from agegender.data.synthetic import make_vgg_face_state
from agegender.errors import AgeGenderError
from agegender.infer.identify import identify
from agegender.weights.caffe import read_caffe_layers
from agegender.weights.convert import FORMATS, convert_weights, load_canonical, read_weights
from agegender.weights.torch7 import read_t7
from caffe_writer import vgg_face_net
from dlib_net_writer import write_dlib_resnet
from t7_writer import Storage, Tensor, torch7_forward, vgg_face_model, write_t7
from vgg_writers import (
    cell,
    write_albanie_pth,
    write_dagnn_mat,
    write_deepface_h5,
    write_keras3_h5,
    write_rcmalli_h5,
    write_simplenn_mat,
)

WIDTHS, FC, CLASSES = (4, 8, 8, 16, 16), 32, 10
CONV_KEYS = [f"conv{b}_{i}.{p}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    state = make_vgg_face_state(WIDTHS, FC, CLASSES, seed=11)
    state["fc8.weight"] *= 0.02  # keep image-scale logits out of softmax saturation
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def _caffe(**options: object) -> Callable[[Path, dict[str, np.ndarray]], None]:
    return lambda path, p: path.write_bytes(vgg_face_net(p, **options))  # type: ignore[arg-type]


def _t7(**options: object) -> Callable[[Path, dict[str, np.ndarray]], None]:
    ascii = bool(options.pop("ascii", False))
    return lambda path, p: write_t7(path, vgg_face_model(p, **options), ascii=ascii)  # type: ignore[arg-type]


def _pt(path: Path, p: dict[str, np.ndarray]) -> None:
    torch.save({k: torch.from_numpy(v.copy()) for k, v in p.items()}, path)


# name -> (file name, writer, format the converter should report)
FIXTURES: dict[str, tuple[str, Callable[[Path, dict[str, np.ndarray]], None], str]] = {
    "t7": ("VGG_FACE.t7", _t7(), "t7"),
    "t7-ascii": ("VGG_FACE_ascii.t7", _t7(ascii=True), "t7"),
    "t7-cuda": ("VGG_FACE_cuda.t7", _t7(cuda=True), "t7"),
    "t7-cuda-double": ("VGG_FACE_cudadouble.t7", _t7(cuda=True, double=True), "t7"),
    "t7-2014-modules": ("VGG_FACE_old.t7", _t7(old_conv=True), "t7"),
    "t7-ascii-2014-modules": ("VGG_FACE_old_ascii.t7", _t7(old_conv=True, ascii=True), "t7"),
    "pt": ("vgg_face.pth", _pt, "pt"),
    "pt-albanie": ("vgg_face_dag.pth", write_albanie_pth, "pt"),
    "mat-simplenn": ("vgg-face.mat", write_simplenn_mat, "mat"),
    "mat-dagnn": ("vgg-face-dag.mat", write_dagnn_mat, "mat"),
    "h5-deepface": ("vgg_face_weights.h5", lambda path, p: write_deepface_h5(path, p, "vggface"), "h5"),
    "h5-deepface-autonames": (
        "vgg_face_weights_auto.h5",
        lambda path, p: write_deepface_h5(path, p, "auto", layer_order=False),
        "h5",
    ),
    "h5-deepface-autonames-ordered": ("deepface_ordered.h5", lambda path, p: write_deepface_h5(path, p, "auto"), "h5"),
    "h5-rcmalli": ("rcmalli_vggface_tf_vgg16.h5", write_rcmalli_h5, "h5"),
    "h5-keras3": ("vgg_face.weights.h5", write_keras3_h5, "h5"),
    "caffe-v1": ("VGG_FACE.caffemodel", _caffe(style="v1"), "caffe"),
    "caffe-new": ("VGG_FACE_new.caffemodel", _caffe(style="new"), "caffe"),
    "caffe-double": ("VGG_FACE_double.caffemodel", _caffe(style="new", double=True), "caffe"),
    "caffe-v1-unpacked": ("VGG_FACE_unpacked.caffemodel", _caffe(style="v1", packed=False), "caffe"),
    "caffe-fully-convolutional": ("VGG_FACE_fcn.caffemodel", _caffe(style="new", fully_convolutional=True), "caffe"),
}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, params: dict[str, np.ndarray]) -> dict[str, object]:
    """The face image, names.txt and the reference top-5 from the NumPy Torch7 forward pass."""
    root = tmp_path_factory.mktemp("formats")
    (root / "names.txt").write_text("".join(f"Person_{i}\n" for i in range(CLASSES)))
    rgb = np.random.default_rng(0).integers(0, 256, (60, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "face.png")
    resized = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR))
    ref = torch7_forward(vgg_face_model(params), VGG_FACE_PREPROCESS.normalize_numpy(resized))
    assert ref.max() < 0.99
    return {"root": root, "ref": ref}


def assert_equal(state: dict[str, torch.Tensor], params: dict[str, np.ndarray]) -> None:
    assert set(state) == set(params)
    for k, v in params.items():
        assert state[k].dtype == torch.float32 and state[k].is_contiguous(), k
        assert torch.equal(state[k], torch.from_numpy(np.ascontiguousarray(v, np.float32))), k


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *contains: str) -> None:
    """Exit 2 and exactly one ``agegender: error:`` line, the last on stderr (log lines may precede it)."""
    assert rc == 2, err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("agegender: error: ")] == lines[-1:], err
    assert "Traceback" not in err, err
    for text in contains:
        assert text in lines[-1], err


# -- every format, exactly, and the same identities ---------------------------------------------------
@pytest.mark.parametrize("name", list(FIXTURES))
def test_format_converts_exactly_and_identifies_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], scene: dict[str, object], name: str
) -> None:
    filename, writer, fmt = FIXTURES[name]
    src, out = tmp_path / filename, tmp_path / "out" / "vgg_face.safetensors"
    writer(src, params)
    rc, stdout, err = cli(capsys, "convert", src, "-o", out)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["format"] == fmt and summary["layers"] == "full" and summary["widths"] == list(WIDTHS)
    state, meta = load_canonical(out, full=True)
    assert_equal(state, params)
    assert meta["source_format"] == fmt and meta["backbone"] == "vgg-face"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]

    root, ref = scene["root"], scene["ref"]
    assert isinstance(root, Path) and isinstance(ref, np.ndarray)
    expected = list(np.argsort(-ref)[:5])
    for weights in (out, src):  # converted, and converted in memory by identify itself
        top = identify(root / "face.png", weights, root / "names.txt", top=5)
        assert [i for i, _, _ in top] == expected, (name, weights)
        np.testing.assert_allclose([p for _, _, p in top], ref[expected], atol=1e-5)


def test_formats_tuple_is_the_cli_choice_list(capsys: pytest.CaptureFixture[str]) -> None:
    from agegender.cli import build_parser

    assert {"t7", "pt", "mat", "h5", "caffe", "dlib"} == set(FORMATS)
    for fmt in FORMATS:
        assert build_parser().parse_args(["convert", "a", "-o", "b", "--input-format", fmt]).input_format == fmt
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "a", "-o", "b", "--input-format", "onnx"])
    capsys.readouterr()


def test_dagnn_layers_are_matched_by_type_and_order(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    """A DagNN file whose params have other names still reads: its dagnn.Conv layers, in order, name them."""
    src = tmp_path / "dag.mat"
    write_dagnn_mat(src, params, prefix="param")
    assert_equal(read_weights(src), params)


def test_t7_without_geometry_fields_logs_the_padding(
    tmp_path: Path, params: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "old.t7"
    write_t7(src, vgg_face_model(params, old_conv=True))
    conv = read_t7(src).fields["modules"][0]
    assert not {"dW", "dH", "padW", "padH", "padding"} & set(conv.fields)
    with caplog.at_level("INFO"):
        assert_equal(read_weights(src), params)
    assert "padding 1" in caplog.text and "7x7" in caplog.text
    # If fc6 does not take the 7x7 map that padding 1 implies, the file is refused, not guessed at.
    bad = dict(params)
    bad["fc6.weight"] = np.zeros((FC, WIDTHS[-1] * 36), np.float32)
    write_t7(src, vgg_face_model(bad, old_conv=True))
    with pytest.raises(AgeGenderError, match="carry no padding fields"):
        read_weights(src)


# -- notop (trunk only) ----------------------------------------------------------------------------
def test_notop_gives_a_trunk_only_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], scene: dict[str, object]
) -> None:
    src, out = tmp_path / "rcmalli_vggface_tf_notop_vgg16.h5", tmp_path / "trunk.safetensors"
    write_rcmalli_h5(src, params, notop=True)
    rc, stdout, err = cli(capsys, "convert", src, "-o", out)
    assert rc == 0, err
    assert json.loads(stdout)["layers"] == "trunk"
    state, meta = load_canonical(out)
    assert_equal(state, {k: params[k] for k in CONV_KEYS})
    assert meta["layers"] == "trunk"
    root = scene["root"]
    assert isinstance(root, Path)
    for weights in (out, src):  # identify says the fc layers are missing, for the converted file and the source
        rc, _, err = cli(capsys, "identify", root / "face.png", "--weights", weights, "--names", root / "names.txt")
        one_line_error(rc, err, "fc6, fc7 and fc8 are missing")
    full = tmp_path / "full.safetensors"  # what `convert --full` asks for
    with pytest.raises(AgeGenderError, match="fc6, fc7 and fc8 are missing"):
        convert_weights(src, full, full=True)
    assert not full.exists()

    from agegender.train.config import TrainConfig
    from agegender.train.loop import build_model

    cfg = TrainConfig.from_preset(data=str(tmp_path), backbone="vgg-face", weights=str(out), hidden=(8, 8), image_size=64)
    model = build_model(cfg)[0]  # training needs only the convolutions
    assert torch.equal(model.trunk.conv5_3.weight.detach().cpu(), torch.from_numpy(params["conv5_3.weight"]))


# -- dlib ------------------------------------------------------------------------------------------
def test_dlib_converts_and_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, expected = write_dlib_resnet(seed=4)
    src, out = tmp_path / "dlib_face_recognition_resnet_model_v1.dat", tmp_path / "dlib_resnet.safetensors"
    src.write_bytes(data)
    rc, stdout, err = cli(capsys, "convert", src, "-o", out)
    assert rc == 0, err
    assert json.loads(stdout)["backbone"] == "dlib-resnet"
    state, meta = load_canonical(out)
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], torch.from_numpy(np.asarray(v, np.float32))), k
    import hashlib

    assert meta["backbone"] == "dlib-resnet" and meta["source_format"] == "dlib"
    assert meta["source_sha256"] == hashlib.sha256(data).hexdigest()
    assert load_canonical(out, backbone="dlib-resnet")[0].keys() == state.keys()
    with pytest.raises(AgeGenderError, match="holds dlib-resnet weights, not vgg-face"):
        load_canonical(out, backbone="vgg-face")
    with pytest.raises(AgeGenderError, match="dlib-resnet weights, not VGG-Face"):
        read_weights(src)

    from agegender.backbones import backbone
    from agegender.weights.pretrained import load_pretrained

    for path in (out, src):  # the converted file, and the published one converted in memory
        loaded = load_pretrained(backbone("dlib-resnet"), path)
        assert loaded.sha256 == meta["source_sha256"] and loaded.state.keys() == state.keys()
        assert loaded.shape == {"widths": tuple(json.loads(meta["widths"])), "descriptor_dim": int(meta["descriptor_dim"])}


# -- what a mis-named file really is ----------------------------------------------------------------
def _torch_zip(path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, path)


def _pickle(path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)


def _h5(path: Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(2)


def _mat(path: Path) -> None:
    from scipy.io import savemat

    with open(path, "wb") as f:
        savemat(f, {"x": np.zeros(2)})


def _tiny() -> dict[str, np.ndarray]:
    from t7_writer import vgg_face_params

    return vgg_face_params((1, 1, 1, 1, 1), 2, 2)


SNIFF = [
    (
        "VGG_FACE.t7",
        lambda p: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 5\n"),
        None,
        "a Git LFS pointer",
    ),
    (
        "VGG_FACE.t7",
        _torch_zip,
        None,
        "is a PyTorch zip archive (torch.save), though its name says a Torch7 file; read it with --input-format pt",
    ),
    (
        "VGG_FACE.t7",
        _pickle,
        None,
        "is a Python pickle (legacy torch.save), though its name says a Torch7 file; read it with --input-format pt",
    ),
    ("weights.mat", _h5, None, "is an HDF5 file (Keras .h5), though its name says a MATLAB file; read it with --input-format h5"),
    ("weights.h5", _mat, None, "is a MATLAB 5 MAT-file, though its name says an HDF5 file; read it with --input-format mat"),
    ("vgg.mat", lambda p: p.write_bytes(b"MATLAB 7.3 MAT-file, Platform: x" + b"\0" * 600), None, "v7.3"),
    (
        "VGG_FACE.t7",
        lambda p: p.write_bytes(vgg_face_net(_tiny(), style="v1")),
        None,
        "looks like a Caffe protobuf (.caffemodel), though its name says a Torch7 file; read it with --input-format caffe",
    ),
    (
        "VGG_FACE.caffemodel",
        lambda p: write_t7(p, {"x": 1}),
        None,
        "is a Torch7 file, though its name says a Caffe model; read it with --input-format t7",
    ),
    ("model.pt", lambda p: p.write_bytes(write_dlib_resnet()[0]), None, "read it with --input-format dlib"),
    (
        "w.pt",
        _torch_zip,
        "t7",
        "is a PyTorch zip archive (torch.save), though --input-format t7 was given; read it with --input-format pt",
    ),
    ("vgg_face_torch.tar.gz", lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 40), None, "unpack it first"),
    ("VGG_FACE.t7", lambda p: p.write_bytes(b"<!DOCTYPE html><html>Not found</html>"), None, "an HTML or XML page"),
    ("w.bin", lambda p: p.write_bytes(b"\x07" * 64), None, "unrecognised weights format"),
]


@pytest.mark.parametrize(("filename", "write", "fmt", "message"), SNIFF)
def test_misnamed_files_say_what_they_are(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    filename: str,
    write: Callable[[Path], None],
    fmt: str | None,
    message: str,
) -> None:
    src, out = tmp_path / filename, tmp_path / "o" / "w.safetensors"
    write(src)
    rc, _, err = cli(capsys, "convert", src, "-o", out, *(("--input-format", fmt) if fmt else ()))
    one_line_error(rc, err, f"{src}: ", message)
    assert not out.parent.exists()


def test_the_suggested_format_works(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    src, out = tmp_path / "VGG_FACE.t7", tmp_path / "w.safetensors"
    _pt(src, params)
    assert cli(capsys, "convert", src, "-o", out)[0] == 2
    rc, _, err = cli(capsys, "convert", src, "-o", out, "--input-format", "pt")
    assert rc == 0, err
    assert_equal(load_canonical(out)[0], params)


def test_safetensors_input_is_refused_with_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    src, out = tmp_path / "VGG_FACE.t7", tmp_path / "w.safetensors"
    write_t7(src, vgg_face_model(params))
    assert cli(capsys, "convert", src, "-o", out)[0] == 0
    rc, _, err = cli(capsys, "convert", out, "-o", tmp_path / "again.safetensors", "--input-format", "pt")
    one_line_error(rc, err, "a safetensors file", "--weights")


# -- outputs ---------------------------------------------------------------------------------------
def test_output_that_is_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    src = tmp_path / "VGG_FACE.t7"
    write_t7(src, vgg_face_model(params))
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.t7")
    os.link(src, tmp_path / "hard.t7")
    for out in (src, tmp_path / "sub" / ".." / "VGG_FACE.t7", tmp_path / "link.t7", tmp_path / "hard.t7"):
        rc, stdout, err = cli(capsys, "convert", src, "-o", out)
        one_line_error(rc, err, "is the input file")
        assert stdout == ""
    rc, _, err = cli(capsys, "convert", tmp_path / "link.t7", "-o", src)  # the other way round
    one_line_error(rc, err, "is the input file")
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["VGG_FACE.t7", "hard.t7", "link.t7", "sub"]
    rc, _, err = cli(capsys, "convert", src, "-o", tmp_path / "sub")
    one_line_error(rc, err, "is a directory")
    assert not any((tmp_path / "sub").iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_mode_follows_the_umask(tmp_path: Path, params: dict[str, np.ndarray], umask: int) -> None:
    src, out = tmp_path / "VGG_FACE.t7", tmp_path / "w.safetensors"
    write_t7(src, vgg_face_model(params))
    old = os.umask(umask)
    try:
        convert_weights(src, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_broken_pickles_give_torchs_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from t7_writer import vgg_face_params
    from test_convert import TinyPort

    whole = tmp_path / "VGG_Face_pytorch.pt"
    torch.save(TinyPort(vgg_face_params(WIDTHS, FC, CLASSES)), whole, _use_new_zipfile_serialization=False)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rc, _, err = cli(capsys, "convert", broken, "-o", tmp_path / "w.safetensors", "--trust-pickle")
    one_line_error(rc, err, "unpickling failed (RuntimeError: unexpected EOF")  # torch's own words
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage")
    for extra in ((), ("--trust-pickle",)):
        rc, _, err = cli(capsys, "convert", garbage, "-o", tmp_path / "w.safetensors", *extra)
        one_line_error(rc, err, "UnpicklingError")
        assert "Weights only load failed" not in err and "\x1b" not in err
    assert sorted(os.listdir(tmp_path)) == ["VGG_Face_pytorch.pt", "broken.pt", "garbage.pt"]


# -- bounded readers ---------------------------------------------------------------------------------
def _zero_stride_t7(path: Path, params: dict[str, np.ndarray], side: int) -> None:
    model = vgg_face_model(params)
    storage = Storage(np.zeros(20_000, np.float32))  # 80 KB of real data ...
    fc6 = Tensor(storage, (side, side), (0, 0), 0)  # ... viewed as side x side elements
    next(m for m in model.fields["modules"] if m.class_name == "nn.Linear").fields["weight"] = fc6
    write_t7(path, model)


@pytest.mark.parametrize("side", [32768, 262144])  # 4 GiB and 256 GiB of float32
def test_zero_stride_view_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], side: int
) -> None:
    src, out = tmp_path / "bomb.t7", tmp_path / "w.safetensors"
    _zero_stride_t7(src, params, side)
    assert src.stat().st_size < 300_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(AgeGenderError, match="zero or overlapping strides"):
            read_weights(src)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0 and peak < 4 * src.stat().st_size + (1 << 20), (seconds, peak)
    rc, _, err = cli(capsys, "convert", src, "-o", out)
    one_line_error(rc, err, "zero or overlapping strides")
    assert not out.exists()


def test_expanded_pt_tensor_is_refused(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    state["fc6.weight"] = torch.zeros(1).expand(32768, 32768)
    src = tmp_path / "bomb.pth"
    torch.save(state, src)
    assert src.stat().st_size < 1_000_000
    start = time.perf_counter()
    with pytest.raises(AgeGenderError, match="zero or overlapping strides"):
        read_weights(src)
    assert time.perf_counter() - start < 2.0


def test_h5_dataset_larger_than_the_file_is_refused(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    import h5py

    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    with h5py.File(src, "a") as f:  # an unwritten 16 GiB dataset costs the file nothing
        del f["fc6/fc6_1/kernel:0"]
        f.create_dataset("fc6/fc6_1/kernel:0", shape=(65536, 65536), dtype="f4")
    assert src.stat().st_size < 1_000_000
    with pytest.raises(AgeGenderError, match="declares 17179869184 bytes, more than the file holds"):
        read_weights(src)


def test_mat_compression_bomb_and_oversized_cell_are_refused(tmp_path: Path) -> None:
    from scipy.io import savemat

    bomb = tmp_path / "bomb.mat"
    savemat(bomb, {"layers": np.zeros((2048, 2048))}, do_compression=True)  # 32 MiB in ~33 KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(AgeGenderError, match="inflates to more than"):
        read_weights(bomb)
    cells = tmp_path / "cells.mat"
    savemat(cells, {"layers": cell(np.zeros(1), np.zeros(1), np.zeros(1))})
    data = bytearray(cells.read_bytes())
    dims = data.index(struct.pack("<ii", 1, 3), 128)
    data[dims : dims + 8] = struct.pack("<ii", 20000, 20000)  # 400 M cells declared in a few hundred bytes
    cells.write_bytes(bytes(data))
    with pytest.raises(AgeGenderError, match="declares 400000000 members"):
        read_weights(cells)


def test_a_megabyte_of_small_objects_stays_small(tmp_path: Path) -> None:
    """The worst case per byte for the t7 reader: many tiny tables and strings; peak memory stays a small multiple."""
    src = tmp_path / "many.t7"
    write_t7(src, {i: ({} if i % 2 else "s") for i in range(1, 50_000)})
    size = src.stat().st_size
    tracemalloc.start()
    try:
        read_t7(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 500_000 < size < 2_000_000 and peak < 20 * size, (size, peak)


# -- truncated, corrupt and wrong-network input of every format -----------------------------------------
TRUNCATED = [
    "t7",
    "t7-ascii",
    "pt",
    "pt-albanie",
    "mat-simplenn",
    "mat-dagnn",
    "h5-deepface",
    "h5-rcmalli",
    "caffe-v1",
    "caffe-new",
]


def _exact_or_clean(src: Path, out: Path, params: dict[str, np.ndarray]) -> str:
    """Either the file still converts to exactly ``params`` (a cut after the last weight), or one clean line."""
    try:
        convert_weights(src, out)
    except AgeGenderError as e:
        assert "\n" not in str(e) and str(src) in str(e), str(e)
        assert not out.exists() and not any(p.name.startswith(".") for p in out.parent.iterdir())
        return "refused"
    assert_equal(load_canonical(out)[0], params)
    out.unlink()
    return "exact"


@pytest.mark.parametrize("name", TRUNCATED)
def test_truncation_at_many_offsets(tmp_path: Path, params: dict[str, np.ndarray], name: str) -> None:
    filename, writer, _ = FIXTURES[name]
    full = tmp_path / f"full_{filename}"
    writer(full, params)
    data = full.read_bytes()
    src, out = tmp_path / filename, tmp_path / "w.safetensors"
    cuts = sorted({*range(1, 64, 7), *np.linspace(64, len(data) - 1, 24).astype(int).tolist()})
    results = []
    for n in cuts:
        src.write_bytes(data[:n])
        results.append(_exact_or_clean(src, out, params))
    assert results.count("refused") >= len(cuts) - 2, results


@pytest.mark.parametrize("name", TRUNCATED + ["dlib"])
def test_corrupt_bytes(tmp_path: Path, params: dict[str, np.ndarray], name: str) -> None:
    """Bytes overwritten at random places: any outcome but an exception other than AgeGenderError."""
    if name == "dlib":
        filename, data = "dlib.dat", write_dlib_resnet(seed=5)[0]
    else:
        filename, writer, _ = FIXTURES[name]
        writer(tmp_path / "full", params)
        data = (tmp_path / "full").read_bytes()
    rng = np.random.default_rng(len(name))
    src, out = tmp_path / filename, tmp_path / "w.safetensors"
    for _ in range(12):
        corrupt = bytearray(data)
        at = int(rng.integers(0, min(len(data), 4096))) if rng.random() < 0.7 else int(rng.integers(0, len(data)))
        corrupt[at : at + 8] = rng.bytes(8)
        src.write_bytes(bytes(corrupt[: len(data)]))
        try:
            convert_weights(src, out)
        except AgeGenderError as e:
            assert "\n" not in str(e)
        if out.exists():
            out.unlink()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "full") == [filename]


@pytest.mark.parametrize(
    "name",
    [
        "t7",
        "t7-ascii",
        "pt",
        "pt-albanie",
        "mat-simplenn",
        "mat-dagnn",
        "h5-deepface",
        "h5-deepface-autonames",
        "h5-rcmalli",
        "h5-keras3",
        "caffe-v1",
        "caffe-new",
    ],
)
def test_wrong_network_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], name: str
) -> None:
    filename, writer, _ = FIXTURES[name]
    bad = dict(params)
    bad["conv2_1.weight"] = np.zeros((WIDTHS[1], WIDTHS[0] + 1, 3, 3), np.float32)  # takes 5 channels from 4
    src, out = tmp_path / filename, tmp_path / "out" / "w.safetensors"
    writer(src, bad)
    rc, _, err = cli(capsys, "convert", src, "-o", out)
    one_line_error(rc, err, f"{src}: ", "conv2_1.weight is (8, 5, 3, 3), expected (8, 4, 3, 3)")
    assert not out.parent.exists()


def test_caffe_layers_are_matched_by_type_and_order(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    from caffe_writer import messages

    NetParameter = messages()["NetParameter"]
    original = NetParameter()
    original.ParseFromString(vgg_face_net(params))
    layers = list(original.layer)

    def write(order: list[object]) -> Path:
        net = NetParameter(name="VGG_FACE")
        for layer in order:
            net.layer.add().CopyFrom(layer)
        src = tmp_path / "VGG_FACE.caffemodel"
        src.write_bytes(net.SerializeToString())
        return src

    bn = NetParameter().layer.add(name="bn1", type="BatchNorm")
    blob = bn.blobs.add()
    blob.shape.dim.append(1)
    blob.data.extend([1.0])
    with pytest.raises(AgeGenderError, match=r"bn1 \(BatchNorm\) has weights"):
        read_weights(write([*layers[:2], bn, *layers[2:]]))
    fc6 = next(layer for layer in layers if layer.name == "fc6")
    with pytest.raises(AgeGenderError, match="inner product at position 1"):
        read_weights(write([fc6, *layers]))
    renamed = []
    for i, layer in enumerate(layers):  # names are only for messages: layers are taken by type and order
        copy = NetParameter().layer.add()
        copy.CopyFrom(layer)
        copy.name = f"layer{i}"
        renamed.append(copy)
    assert_equal(read_weights(write(renamed)), params)


# -- fuzzing --------------------------------------------------------------------------------------
def _fuzz(reader: Callable[[Path], object], data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz"
        path.write_bytes(data)
        try:
            reader(path)
        except AgeGenderError as e:
            assert "\n" not in str(e)


_T7_SEED = b""
_CAFFE_SEED = b""


def _seeds() -> tuple[bytes, bytes]:
    global _T7_SEED, _CAFFE_SEED
    if not _T7_SEED:
        from t7_writer import vgg_face_params

        p = vgg_face_params((1, 1, 1, 1, 1), 2, 2)
        with tempfile.TemporaryDirectory() as d:
            write_t7(Path(d) / "s.t7", vgg_face_model(p))
            _T7_SEED = (Path(d) / "s.t7").read_bytes()
        _CAFFE_SEED = vgg_face_net(p, style="v1")
    return _T7_SEED, _CAFFE_SEED


def _mutated(seed_index: int) -> st.SearchStrategy[bytes]:
    def mutate(args: tuple[int, bytes, int]) -> bytes:
        at, patch, cut = args
        seed = _seeds()[seed_index]
        at %= len(seed)
        out = seed[:at] + patch + seed[at + len(patch) :]
        return out[: max(1, len(out) - cut)]

    return st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16), st.integers(0, 64)).map(mutate)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.binary(max_size=256).map(lambda b: b"4\n1\n3\nV 1\n" + b), _mutated(0)))
def test_fuzz_t7_reader(data: bytes) -> None:
    _fuzz(read_t7, data)


@FUZZ
@given(st.one_of(st.binary(max_size=512), _mutated(1)))
def test_fuzz_caffe_reader(data: bytes) -> None:
    _fuzz(read_caffe_layers, data)
    _fuzz(lambda p: read_weights(p, fmt="caffe"), data)
