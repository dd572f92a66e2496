"""The Torch7 reader against the test writer and against torchfile, an independent reader."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agegender.errors import AgeGenderError
from agegender.weights.torch7 import T7Object, read_t7
from t7_writer import Obj, Storage, Tensor, empty, vgg_face_model, vgg_face_params, write_t7


def sample() -> Obj:
    """Every construct the reader supports: repeats, views with strides and offsets, each scalar type."""
    rng = np.random.default_rng(1)
    storage = Storage(rng.standard_normal(20).astype(np.float32))
    shared = {"shared": True}
    matrix = rng.standard_normal((3, 4))  # float64 -> DoubleTensor
    return Obj(
        "nn.Custom",
        {
            "transposed": Tensor(storage, (4, 3), (1, 4), offset=2),  # a view that starts at element 2
            "row": Tensor(storage, (5,), (1,), offset=14),
            "storage": storage,
            "matrix": matrix,
            "matrix_again": matrix,
            "longs": Storage(np.arange(5, dtype=np.int64)),
            "bytes": Tensor.of(np.arange(6, dtype=np.uint8).reshape(2, 3)),
            "empty": empty(),
            "a": shared,
            "b": shared,
            "list": [1, 2.5, "three", None, False, [], {}],
            "sparse": {1: "one", 3: "three", 2.5: "half"},
            "flags": {"yes": True, "no": False, "nothing": None},
            "text": "héllo",
            "inner": Obj("nn.Inner", {"x": -7, "y": 1e-3}),
        },
    )


def same(ours: Any, theirs: Any, where: str = "") -> None:
    """``ours`` (agegender.torch7) equals ``theirs`` (torchfile: bytes names, TorchObject, subclassed dicts)."""
    # torchfile reads an empty table as a list; we keep it a dict so field tables are always dicts.
    if isinstance(ours, dict) and not ours and theirs == []:
        return
    if isinstance(ours, T7Object):
        assert theirs.torch_typename().decode() == ours.class_name, where
        same(ours.fields, theirs._obj, where + "." + ours.class_name)
    elif isinstance(ours, dict):
        theirs = {k.decode() if isinstance(k, bytes) else k: v for k, v in theirs.items()}
        assert set(theirs) == set(ours), where
        for k in ours:
            same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(ours, list):
        assert isinstance(theirs, list) and len(theirs) == len(ours), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(ours, np.ndarray):
        assert isinstance(theirs, np.ndarray), where
        assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), where
        np.testing.assert_array_equal(ours, theirs, err_msg=where)
    elif isinstance(ours, str):
        assert theirs == ours.encode(), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_sample_matches_torchfile(tmp_path: Path) -> None:
    torchfile = pytest.importorskip("torchfile")
    path = tmp_path / "sample.t7"
    write_t7(path, sample())
    ours = read_t7(path)
    same(ours, torchfile.load(str(path)))
    f = ours.fields
    assert f["a"] is f["b"] and f["matrix"] is f["matrix_again"]  # repeats come back as one object
    assert np.shares_memory(f["transposed"], f["storage"])  # views, not copies
    np.testing.assert_array_equal(f["transposed"], f["storage"][2:14].reshape(3, 4).T)
    assert f["sparse"] == {1: "one", 3: "three", 2.5: "half"} and f["list"][5:] == [{}, {}]


@pytest.mark.parametrize("options", [{}, {"conv_4d": True}, {"shared_storage": True}])
def test_vgg_face_model_matches_torchfile(tmp_path: Path, options: dict[str, bool]) -> None:
    torchfile = pytest.importorskip("torchfile")
    params = vgg_face_params((4, 8, 8, 16, 16), fc=32, classes=10)
    path = tmp_path / "vgg.t7"
    write_t7(path, vgg_face_model(params, **options))
    ours = read_t7(path)
    same(ours, torchfile.load(str(path)))
    modules = ours.fields["modules"]
    assert len(modules) == 40 and [m.class_name for m in modules].count("nn.SpatialConvolutionMM") == 13
    conv1_1 = modules[0].fields["weight"]
    np.testing.assert_array_equal(conv1_1.reshape(params["conv1_1.weight"].shape), params["conv1_1.weight"])


def test_object_indices_are_one_preorder_counter(tmp_path: Path) -> None:
    # Hand-assembled bytes, not the writer: tag 4 index 1 (nn.X), its field table index 2, a repeat of 2.
    def i32(v: int) -> bytes:
        return struct.pack("<i", v)

    def s(text: str) -> bytes:
        return i32(len(text)) + text.encode()

    table = (
        i32(3)
        + i32(2)
        + i32(2)  # table, index 2, two pairs
        + i32(2)
        + s("self")
        + i32(3)
        + i32(2)  # "self" = table 2 again
        + i32(2)
        + s("n")
        + i32(1)
        + struct.pack("<d", 5)
    )
    path = tmp_path / "hand.t7"
    path.write_bytes(i32(4) + i32(1) + s("V 1") + s("nn.X") + table)
    obj = read_t7(path)
    assert obj.class_name == "nn.X" and obj.fields["n"] == 5 and obj.fields["self"] is obj.fields


def test_four_byte_longs(tmp_path: Path) -> None:
    eight, four = tmp_path / "eight.t7", tmp_path / "four.t7"
    write_t7(eight, sample())
    write_t7(four, sample(), long_size=4)
    a, b = read_t7(eight), read_t7(four, long_size=4)
    for key in ("transposed", "matrix", "bytes", "row"):
        np.testing.assert_array_equal(a.fields[key], b.fields[key])
    assert b.fields["longs"].dtype == np.int32
    with pytest.raises(AgeGenderError):
        read_t7(four)  # the wrong long size must fail cleanly, not crash or mis-read silently


@pytest.mark.slow
def test_every_truncation_is_reported(tmp_path: Path) -> None:
    full = tmp_path / "full.t7"
    write_t7(full, sample())
    data = full.read_bytes()
    cut = tmp_path / "cut.t7"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(AgeGenderError, match=f"cut.t7: truncated at byte {n} "):
            read_t7(cut)


@pytest.mark.slow
def test_random_bytes_raise_clean_errors(tmp_path: Path) -> None:
    path = tmp_path / "noise.t7"
    rng = np.random.default_rng(0)
    for _ in range(300):
        path.write_bytes(rng.bytes(int(rng.integers(1, 400))))
        with pytest.raises(AgeGenderError, match="noise.t7: "):
            read_t7(path)
    # Plausible tags followed by noise reach the deeper checks too.
    for _ in range(300):
        path.write_bytes(struct.pack("<ii", int(rng.integers(0, 6)), 1) + rng.bytes(int(rng.integers(0, 200))))
        try:
            read_t7(path)
        except AgeGenderError as e:
            assert "noise.t7: " in str(e) and "\n" not in str(e)


def _header(class_name: str) -> bytes:
    def s(text: str) -> bytes:
        return struct.pack("<i", len(text)) + text.encode()

    return struct.pack("<ii", 4, 1) + s("V 1") + s(class_name)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (struct.pack("<i", 6) + b"\0" * 16, "unknown type tag 6 at byte 0"),
        (_header("torch.CudaHalfTensor") + b"\0" * 16, "unsupported tensor class torch.CudaHalfTensor"),
        (_header("torch.HalfStorage") + b"\0" * 16, "unsupported tensor class torch.HalfStorage"),
        (_header("torch.FloatStorage") + struct.pack("<q", -5), "absurd size for storage data"),
        (_header("torch.FloatStorage") + struct.pack("<q", 1 << 50), "absurd size for storage data"),
        (_header("torch.FloatTensor") + struct.pack("<i", 1000), "absurd dimension count 1000"),
        (struct.pack("<iii", 3, 1, 1 << 30), "truncated at byte 12"),
        (struct.pack("<iii", 3, 1, -1), "absurd size for table"),
        (_header("torch.FloatTensor") + struct.pack("<iqqqi", 1, 4, 1, 1, 0), "has size [4] but no storage"),
        (
            _header("torch.FloatTensor")
            + struct.pack("<iqqq", 1, 4, 1, 3)
            + _header("torch.FloatStorage")[:4]
            + struct.pack("<i", 2)
            + _header("torch.FloatStorage")[8:]
            + struct.pack("<q", 5)
            + b"\0" * 20,
            "reaches element 5 of a storage of 5",
        ),
        (
            _header("torch.FloatTensor")
            + struct.pack("<iqqq", 1, 2, 1, 1)
            + _header("torch.DoubleStorage")[:4]
            + struct.pack("<i", 2)
            + _header("torch.DoubleStorage")[8:]
            + struct.pack("<q", 2)
            + b"\0" * 16,
            "does not point at a storage of its type",
        ),
    ],
)
def test_malformed_files(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad.t7"
    path.write_bytes(payload)
    with pytest.raises(AgeGenderError, match=f"bad.t7: .*{re.escape(message)}"):
        read_t7(path)


def equal(a: Any, b: Any, where: str = "") -> None:
    """Two results of read_t7 hold the same structure and values."""
    assert type(a) is type(b), where
    if isinstance(a, T7Object):
        assert a.class_name == b.class_name, where
        equal(a.fields, b.fields, where + "." + a.class_name)
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_ascii_reads_like_binary(tmp_path: Path) -> None:
    binary, text = tmp_path / "binary.t7", tmp_path / "ascii.t7"
    write_t7(binary, sample())
    write_t7(text, sample(), ascii=True)
    assert text.read_bytes().startswith(b"4\n1\n3\nV 1\n9\nnn.Custom\n")
    ours = read_t7(text)
    equal(ours, read_t7(binary))
    assert ours.fields["a"] is ours.fields["b"]  # object indices work the same in text
    weird = {"inf": float("inf"), "tiny": 5e-324, "neg": -0.0, "big": 1 << 52, "text": "a b\nc"}
    write_t7(text, weird, ascii=True)
    assert read_t7(text) == weird


def test_ascii_truncation_and_garbage(tmp_path: Path) -> None:
    full = tmp_path / "full.t7"
    write_t7(full, sample(), ascii=True)
    data = full.read_bytes()
    cut = tmp_path / "cut.t7"
    for n in range(2, len(data) - 40, 3):  # the last bytes are the final number, whose digits may be cut validly
        cut.write_bytes(data[:n])
        with pytest.raises(AgeGenderError, match="cut.t7: "):
            read_t7(cut)
    for payload, message in [
        (b"4\n1\n3\nV 1\nx\n", "is b'x', not a number"),
        (b"4\n1\n3\nV 1\n18\ntorch.FloatStorage\n3\n1 zz 2\n", "malformed number"),
        (b"4\n1\n3\nV 1\n18\ntorch.FloatStorage\n1000000\n1 2\n", "truncated"),
        (b"3\n1\n99999999999\n", "out of range"),
    ]:
        cut.write_bytes(payload)
        with pytest.raises(AgeGenderError, match=re.escape(message)):
            read_t7(cut)


def test_cuda_classes_read_as_their_cpu_types(tmp_path: Path) -> None:
    torchfile = pytest.importorskip("torchfile")
    rng = np.random.default_rng(2)
    obj = {
        "f": Tensor.of(rng.standard_normal((2, 3)).astype(np.float32), cuda=True),
        "d": Tensor.of(rng.standard_normal(4), cuda=True),
        "s": Storage(np.arange(3, dtype=np.float32), cuda=True),
    }
    path = tmp_path / "cuda.t7"
    write_t7(path, obj)
    assert b"torch.CudaTensor" in path.read_bytes() and b"torch.CudaDoubleTensor" in path.read_bytes()
    ours = read_t7(path)
    same(ours, torchfile.load(str(path)))
    assert ours["f"].dtype == np.float32 and ours["d"].dtype == np.float64


def test_views_beyond_their_storage_are_refused_before_any_view(tmp_path: Path) -> None:
    storage = Storage(np.zeros(10, np.float32))
    path = tmp_path / "view.t7"
    for size, stride, message in [
        ((1 << 16, 1 << 16), (0, 0), "zero or overlapping strides"),
        ((5, 5), (1, 1), "zero or overlapping strides"),  # 25 elements over 10
        ((4,), (4,), "reaches element 12 of a storage of 10"),
    ]:
        write_t7(path, {"t": Tensor(storage, size, stride)})
        with pytest.raises(AgeGenderError, match=re.escape(message)):
            read_t7(path)
    write_t7(path, {"t": Tensor(storage, (2, 5), (5, 1), 0), "u": Tensor(storage, (5, 2), (1, 5), 0)})
    t = read_t7(path)
    np.testing.assert_array_equal(t["u"], t["t"].T)  # legitimate transposed views still read


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AgeGenderError, match="nope.t7: cannot read"):
        read_t7(tmp_path / "nope.t7")
