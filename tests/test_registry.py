"""The backbone contract, for every registered backbone: build, load published weights, normalise, size, export.

A backbone added to the registry fails here until it has a writer of its published weights below: the contract is
then checked for it like for the others.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agegender.backbones import BACKBONE_OPTIONS, BACKBONES, DEFAULT_BACKBONE, LEGACY_BACKBONE, BackboneSpec
from agegender.errors import AgeGenderError
from agegender.model.checkpoint import CheckpointMeta
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet
from agegender.model.trunk import Trunk
from agegender.weights.convert import FORMATS, convert_weights
from agegender.weights.pretrained import load_pretrained, pretrained_entry
from agegender.weights.zoo import ZOO
from dlib_net_writer import write_dlib_resnet
from t7_writer import write_vgg_face_t7


def _vgg_face(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    src = path / "VGG_FACE.t7"
    return src, write_vgg_face_t7(src, widths=(4, 8, 8, 16, 16), fc=8, classes=4, seed=3)


def _dlib_resnet(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    data, state = write_dlib_resnet(seed=3)
    src = path / "dlib_face_recognition_resnet_model_v1.dat"
    src.write_bytes(data)
    return src, state


# Each backbone's published weights in its own format, tiny, with the canonical state dict they read back as.
WRITERS: dict[str, Callable[[Path], tuple[Path, dict[str, np.ndarray]]]] = {"vgg-face": _vgg_face, "dlib-resnet": _dlib_resnet}
NAMES = sorted(BACKBONES)


@pytest.fixture(params=NAMES)
def spec(request: pytest.FixtureRequest) -> BackboneSpec:
    return BACKBONES[request.param]


@pytest.fixture
def published(spec: BackboneSpec, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return WRITERS[spec.name](tmp_path)


def _config(spec: BackboneSpec, shape: dict[str, Any], layer: str = "", **kw: Any) -> ModelConfig:
    image_size = 64 if "image_size" in spec.train_options else spec.preprocess.size
    return ModelConfig(backbone=spec.name, image_size=image_size, feature_layer=layer, hidden=(8,), dropout=(0.0,), **shape, **kw)


def test_every_backbone_is_covered_and_described() -> None:
    assert set(WRITERS) == set(BACKBONES)
    assert DEFAULT_BACKBONE in BACKBONES and LEGACY_BACKBONE in BACKBONES
    assert {f for s in BACKBONES.values() for f in s.formats} == set(FORMATS)  # every format has one backbone
    for spec in BACKBONES.values():
        entry = pretrained_entry(spec)  # each names its file in the zoo
        assert entry is ZOO[spec.pretrained]
        assert entry.licence and entry.install and "--" not in entry.install  # a hint in words, not options
        assert spec.train_options <= BACKBONE_OPTIONS and set(spec.feature_layers)
        assert set(spec.exports) >= {"onnx", "torch"}
        # what the spec names by "module:attribute" exists (imported here, never by the spec itself)
        assert issubclass(spec.trunk_class(), Trunk) and all(callable(spec.graph(fmt)) for fmt in spec.graphs)


def test_specs_are_torch_free() -> None:
    """Reading a spec (what ONNX inference and `--help` do) imports neither torch nor any implementation."""
    code = (
        "import sys; from agegender.backbones import BACKBONES; from agegender.model.config import ModelConfig; "
        "[(s.check(ModelConfig(backbone=n, widths=s.widths, image_size=s.preprocess.size)), s.exports) "
        "for n, s in BACKBONES.items()]; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'keras', 'tensorflow') or m.startswith(('agegender.model.vgg', 'agegender.model.dlib', "
        "'agegender.infer', 'agegender.weights'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_builds_loads_normalises_and_sizes(
    spec: BackboneSpec, published: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    src, expected = published
    converted = tmp_path / "converted.safetensors"
    assert convert_weights(src, converted)["backbone"] == spec.name
    loaded = [load_pretrained(spec, path) for path in (src, converted)]  # in memory, and converted
    assert loaded[0].sha256 == loaded[1].sha256 and loaded[0].shape == loaded[1].shape
    for key, value in expected.items():
        if key in loaded[0].state:
            assert torch.equal(loaded[0].state[key], loaded[1].state[key]), key
            np.testing.assert_array_equal(loaded[0].state[key].numpy(), np.asarray(value, np.float32), err_msg=key)

    cfg0 = _config(spec, loaded[0].shape)
    pre = spec.input_contract(loaded[0].preprocess).resized(cfg0.image_size)
    rgb = np.random.default_rng(0).integers(0, 256, (2, cfg0.image_size, cfg0.image_size, 3), dtype=np.uint8)
    x = pre.normalize_numpy(rgb)
    assert x.shape == (2, 3, cfg0.image_size, cfg0.image_size) and x.dtype == np.float32
    np.testing.assert_allclose(pre.normalize(torch.from_numpy(rgb)).numpy(), x, atol=1e-6)  # both paths agree
    assert np.abs(x).max() < 200  # the contract's mean and scale, not raw pixels

    for layer in spec.feature_layers:
        cfg = _config(spec, loaded[0].shape, layer)
        net = AgeGenderNet(cfg).eval()
        assert isinstance(net.trunk, Trunk) and type(net.trunk) is spec.trunk_class()
        net.load_trunk(loaded[1].state)
        with torch.no_grad():
            features = net.forward_features(torch.from_numpy(x))
        assert features.shape == (2, cfg.feature_dim) == (2, spec.feature_dim(cfg)), layer
        assert torch.isfinite(features).all()


def test_refuses_another_backbones_weights(spec: BackboneSpec, tmp_path: Path) -> None:
    others = [name for name in NAMES if name != spec.name]
    for other in others:
        src, _ = WRITERS[other](tmp_path)
        with pytest.raises(AgeGenderError, match=f"holds {other} weights, not {spec.name}"):
            load_pretrained(spec, src)


def test_checks_its_configs(spec: BackboneSpec) -> None:
    with pytest.raises(AgeGenderError, match="stage widths"):
        ModelConfig(backbone=spec.name, widths=spec.widths[:-1], image_size=spec.preprocess.size)
    with pytest.raises(AgeGenderError, match="image size"):
        ModelConfig(backbone=spec.name, widths=spec.widths, image_size=spec.preprocess.size + 1)
    with pytest.raises(AgeGenderError, match="no feature layer"):
        ModelConfig(backbone=spec.name, widths=spec.widths, image_size=spec.preprocess.size, feature_layer="fc99")


def _net(spec: BackboneSpec, published: tuple[Path, dict[str, np.ndarray]]) -> tuple[AgeGenderNet, CheckpointMeta]:
    pretrained = load_pretrained(spec, published[0])
    cfg = _config(spec, pretrained.shape, age_head="dex", age_min=10, age_max=20)
    torch.manual_seed(0)
    net = AgeGenderNet(cfg)
    net.load_trunk(pretrained.state)
    pre = spec.input_contract(pretrained.preprocess).resized(cfg.image_size)
    return net.eval(), CheckpointMeta(cfg, pre, weights_sha256=pretrained.sha256)


def test_exports_to_onnx(spec: BackboneSpec, published: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    from agegender.infer.export import export_onnx

    net, meta = _net(spec, published)
    result = export_onnx(net, meta, tmp_path / "model.onnx")
    assert result["max_abs_diff"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_exports_to_its_graphs(
    spec: BackboneSpec, published: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, fmt: str
) -> None:
    from agegender.infer.exporters import EXPORTERS

    if fmt not in spec.exports:
        with pytest.raises(AgeGenderError, match=f"no {fmt}"):
            spec.graph(fmt)
        return
    needs = {"keras": "keras", "savedmodel": "tensorflow"}[fmt]
    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    net, meta = _net(spec, published)
    result = EXPORTERS[fmt](net, meta, tmp_path / ("model.keras" if fmt == "keras" else "saved"))
    assert result["max_abs_diff"] <= 1e-4


# -- files written before there was a choice of backbone keep their meaning -----------------------------------


def test_an_old_checkpoint_without_a_backbone_is_still_vgg_face(tmp_path: Path) -> None:
    """A checkpoint written before dlib's ResNet: no backbone, feature layer, descriptor size or framing recorded."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
    from agegender.model.checkpoint import load_checkpoint, save_checkpoint

    cfg = ModelConfig(widths=(4, 4, 8, 8, 8), image_size=32, hidden=(8,), dropout=(0.0,), backbone="vgg-face")
    torch.manual_seed(0)
    net = AgeGenderNet(cfg).eval()
    new = tmp_path / "new.safetensors"
    save_checkpoint(new, net, CheckpointMeta(cfg, VGG_FACE_PREPROCESS.resized(32)))
    with safe_open(str(new), "pt") as f:
        doc = json.loads((f.metadata() or {})["agegender"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("backbone", "feature_layer", "descriptor_dim"):
        del doc["config"][key]
    for key in ("alignment", "chip_padding"):
        del doc["preprocess"][key]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"agegender": json.dumps(doc)})

    loaded, meta = load_checkpoint(old)
    assert meta.config.backbone == "vgg-face" and meta.config.feature_layer == "pool5"
    assert meta.config == load_checkpoint(new)[1].config and meta.preprocess == VGG_FACE_PREPROCESS.resized(32)
    x = torch.from_numpy(meta.preprocess.normalize_numpy(np.full((1, 32, 32, 3), 128, np.uint8)))
    with torch.no_grad():
        assert torch.equal(loaded(x).gender_logit, net(x).gender_logit)


def test_an_old_run_config_without_a_backbone_resumes_as_vgg_face(tmp_path: Path) -> None:
    from agegender.rundir import RunDir
    from agegender.train.config import TrainConfig
    from agegender.train.loop import _stored_config

    (tmp_path / "config.json").write_text(json.dumps({"data": "x", "epochs": 3, "image_size": 64, "hidden": [8]}))
    stored = _stored_config(RunDir(tmp_path), TrainConfig(data="x"))  # the library's default backbone is dlib-resnet now
    assert TrainConfig(data="x").backbone == DEFAULT_BACKBONE and stored["backbone"] == LEGACY_BACKBONE == "vgg-face"
