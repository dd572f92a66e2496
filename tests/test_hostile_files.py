"""Hostile weight and model files, generated here: each is refused with one line, reads no other file, allocates
nothing it declares beyond its own size, and leaves no output behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from agegender.cli import main
from agegender.data.synthetic import make_vgg_face_state
from agegender.errors import AgeGenderError
from agegender.weights.convert import convert_weights, load_canonical, read_weights
from dlib_net_writer import write_dlib_resnet
from vgg_writers import write_deepface_h5

WIDTHS, FC, CLASSES = (4, 8, 8, 16, 16), 32, 10
KERNEL = "conv1_1/conv1_1_2/kernel:0"  # deepface's name for conv1_1's kernel, HWIO (3, 3, 3, 4)
SECRET = b"TOP-SECRET-" * 40


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    state = make_vgg_face_state(WIDTHS, FC, CLASSES, seed=3)
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}


def _refused(capsys: pytest.CaptureFixture[str], src: Path, out: Path, *contains: str) -> str:
    """``convert src -o out`` exits 2 with one error line holding ``contains``; nothing is written."""
    rc = main(["convert", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("agegender: error:") == 1, err
    for text in contains:
        assert text in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


def _replace(path: Path, key: str, make: object) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        del f[key]
        make(f, key)  # type: ignore[operator]


# -- HDF5: a weight file never reads another file ------------------------------------------------
def test_h5_external_storage_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    _replace(
        src,
        KERNEL,
        lambda f, k: f.create_dataset(k, shape=(3, 3, 3, 4), dtype="<f4", external=[(str(secret), 0, 3 * 3 * 3 * 4 * 4)]),
    )
    err = _refused(capsys, src, tmp_path / "out.safetensors", "external files", "secret.bin")
    assert "TOP-SECRET" not in err


@pytest.mark.slow
def test_h5_external_storage_on_a_fifo_does_not_hang(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    _replace(
        src,
        KERNEL,
        lambda f, k: f.create_dataset(k, shape=(3, 3, 3, 4), dtype="<f4", external=[(str(fifo), 0, 3 * 3 * 3 * 4 * 4)]),
    )
    # A subprocess, so a regression hangs only it: reading the FIFO would block until a writer opens it.
    run = subprocess.run(
        [sys.executable, "-m", "agegender", "convert", str(src), "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert run.returncode == 2, run.stderr
    assert "external files" in run.stderr and "Traceback" not in run.stderr


def _other_h5(tmp_path: Path, data: np.ndarray) -> Path:
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=data)
    return other


def test_h5_external_link_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    import h5py

    other = _other_h5(tmp_path, np.full((3, 3, 3, 4), 7, "<f4"))
    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    _replace(src, KERNEL, lambda f, k: f.__setitem__(k, h5py.ExternalLink(str(other), "/x")))
    _refused(capsys, src, tmp_path / "out.safetensors", "external link", "other.h5")


def test_h5_soft_link_through_an_external_link_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    import h5py

    other = _other_h5(tmp_path, np.full((3, 3, 3, 4), 7, "<f4"))
    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    with h5py.File(src, "a") as f:  # the soft link names a path inside the file that leaves it
        f["hidden/door"] = h5py.ExternalLink(str(other), "/")
    _replace(src, KERNEL, lambda f, k: f.__setitem__(k, h5py.SoftLink("/hidden/door/x")))
    _refused(capsys, src, tmp_path / "out.safetensors", "external link")


def test_h5_soft_link_inside_the_file_still_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]
) -> None:
    import h5py

    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    with h5py.File(src, "a") as f:  # the kernel moves elsewhere in the file; its old name is a soft link
        f.move(KERNEL, "/stash/kernel")
        f[KERNEL] = h5py.SoftLink("/stash/kernel")
        f["conv1_1/conv1_1_2/loop"] = f["conv1_1"]  # a hard-link cycle: the walk must still end
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    assert torch.equal(load_canonical(out)[0]["conv1_1.bias"], torch.from_numpy(params["conv1_1.bias"]))


def test_h5_virtual_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    import h5py

    other = _other_h5(tmp_path, np.full((3, 3, 3, 4), 7, "<f4"))

    def virtual(f: h5py.File, k: str) -> None:
        layout = h5py.VirtualLayout(shape=(3, 3, 3, 4), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(other), "x", shape=(3, 3, 3, 4))
        f.create_virtual_dataset(k, layout)

    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    _replace(src, KERNEL, virtual)
    _refused(capsys, src, tmp_path / "out.safetensors", "virtual dataset")


def test_h5_filter_plugin_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray]) -> None:
    src = tmp_path / "vgg_face_weights.h5"
    write_deepface_h5(src, params)
    _replace(
        src,
        KERNEL,
        lambda f, k: f.create_dataset(
            k, shape=(3, 3, 3, 4), dtype="<f4", chunks=(3, 3, 3, 4), compression=32004, allow_unknown_filter=True
        ),
    )
    _refused(capsys, src, tmp_path / "out.safetensors", "filter 32004", "plugin")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_non_regular_weight_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    if kind == "fifo":
        src = tmp_path / "weights.h5"
        os.mkfifo(src)
    else:
        src = Path("/dev/zero")
        if not src.exists():
            pytest.skip("no /dev/zero")
    _refused(capsys, src, tmp_path / "out.safetensors", "not a regular file")


def test_h5_reader_refuses_a_fifo_itself(tmp_path: Path) -> None:
    from agegender.weights.keras_h5 import read_h5

    fifo = tmp_path / "weights.h5"
    os.mkfifo(fifo)
    with pytest.raises(AgeGenderError, match="not a regular file"):
        read_h5(fifo)


# -- Caffe, PyTorch archives, dlib: declared sizes and finite values ------------------------------
def test_caffe_blob_declaring_a_huge_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from caffe_writer import messages

    net = messages()["NetParameter"](name="x")
    blob = net.layer.add(name="conv1_1", type="Convolution").blobs.add()
    blob.shape.dim.extend([0, 2**62, 2**62])  # 0 values, so the counts agree: only the shape is absurd
    src = tmp_path / "VGG_FACE.caffemodel"
    src.write_bytes(net.SerializeToString())
    _refused(capsys, src, tmp_path / "out.safetensors", "has shape", "not a valid Caffe model")


@pytest.mark.slow
def test_pt_deflate_bomb_is_refused_before_inflating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"conv1_1.weight": torch.zeros(4, 3, 3, 3)}, plain)
    src = tmp_path / "vgg_face.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info))
        # The tensor's storage record, as 256 MB of zeros deflated to ~250 KB: torch would allocate it all.
        with zout.open("plain/data/0", "w", force_zip64=True) as bomb:
            chunk = bytes(1 << 20)
            for _ in range(256):
                bomb.write(chunk)
    assert src.stat().st_size < 2_000_000
    start = time.perf_counter()
    _refused(capsys, src, tmp_path / "out.safetensors", "entries inflate to 2684", "compression bomb")
    assert time.perf_counter() - start < 5


def _dat_with(value: float, key: str = "conv1.weight") -> bytes:
    data, state = write_dlib_resnet()
    first = np.ascontiguousarray(state[key], "<f4").ravel()[:1].tobytes()  # the tensor's first value on disk
    assert data.count(first) == 1
    return data.replace(first, np.array([value], "<f4").tobytes())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_dlib_dat_with_non_finite_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float) -> None:
    src = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    src.write_bytes(_dat_with(value))
    _refused(capsys, src, tmp_path / "out.safetensors", "conv1.weight", "non-finite")


@pytest.mark.parametrize("fmt", ["pt", "h5"])
def test_vgg_face_with_a_nan_weight_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], params: dict[str, np.ndarray], fmt: str
) -> None:
    bad = {k: v.copy() for k, v in params.items()}
    bad["fc7.weight"][3, 5] = np.nan
    src = tmp_path / f"vgg_face.{fmt}"
    if fmt == "pt":
        torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, src)
    else:
        write_deepface_h5(src, bad)
    _refused(capsys, src, tmp_path / "out.safetensors", "fc7.weight", "non-finite")


def test_converted_file_with_nan_is_refused_on_load(tmp_path: Path, params: dict[str, np.ndarray]) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "vgg_face.pt"
    torch.save({k: torch.from_numpy(v) for k, v in params.items()}, src)
    out = tmp_path / "vgg.safetensors"
    convert_weights(src, out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    state = load_file(str(out))
    state["conv2_1.bias"][0] = float("inf")
    save_file(state, str(out), metadata=meta)
    with pytest.raises(AgeGenderError, match="conv2_1.bias holds 1 non-finite"):
        load_canonical(out)
    assert read_weights(src)["conv2_1.bias"].isfinite().all()
