"""The VGG16 trunk, freezing rules, age decoding and self-describing checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agegender.backbones.vgg_face import VGG_FACE_PREPROCESS
from agegender.data.synthetic import make_vgg_face_state
from agegender.errors import AgeGenderError
from agegender.model.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from agegender.model.config import ModelConfig
from agegender.model.net import AgeGenderNet, decode_age
from agegender.model.vgg import CONV_NAMES, VGGFace, vgg_face_shapes

TINY = (4, 8, 8, 16, 16)


def tiny(**kw: object) -> ModelConfig:
    return ModelConfig(**{"widths": TINY, "hidden": (16, 16), "image_size": 32, **kw})  # type: ignore[arg-type]


def test_full_vgg_face_has_the_published_parameter_count() -> None:
    shapes = vgg_face_shapes()
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 145_002_878
    conv = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("conv"))
    assert conv == 14_714_688
    assert len(CONV_NAMES) == 13 and CONV_NAMES[0] == "conv1_1" and CONV_NAMES[-1] == "conv5_3"


def test_vgg_face_loads_canonical_state_by_name() -> None:
    state = make_vgg_face_state(widths=TINY, fc=32, classes=7)
    net = VGGFace(TINY, fc=32, classes=7)
    net.load_canonical(state)
    assert torch.equal(net.trunk.conv3_2.weight, state["conv3_2.weight"])
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 7)


def test_outputs_and_feature_dim() -> None:
    m = AgeGenderNet(tiny(image_size=64)).eval()
    f = m.forward_features(torch.randn(3, 3, 64, 64))
    assert f.shape == (3, m.config.feature_dim) == (3, 16 * 2 * 2)
    out = m.forward_head(f)
    assert out.gender_logit.shape == (3,) and out.age_logits.shape == (3, 70)


def test_frozen_trunk_stays_in_eval_mode_and_out_of_the_optimizer() -> None:
    m = AgeGenderNet(tiny(block_bn=False))
    m.train()
    assert not m.trunk.training and m.fc.training
    assert all(not p.requires_grad for p in m.trunk.parameters())
    trainable = {id(p) for p in m.trainable_parameters()}
    assert not trainable & {id(p) for p in m.trunk.parameters()}
    m.unfreeze_trunk()
    m.train()
    assert m.trunk.training


def test_trunk_batchnorm_of_the_seed_layout_trains_while_convs_stay_frozen() -> None:
    m = AgeGenderNet(tiny(block_bn=True))
    m.train()
    assert m.trunk.training  # its BatchNorm layers must learn
    assert not m.trunk.conv1_1.weight.requires_grad and m.trunk.bn1.weight.requires_grad


def test_load_trunk_rejects_wrong_shapes() -> None:
    m = AgeGenderNet(tiny())
    state = make_vgg_face_state(widths=(4, 8, 8, 16, 32), fc=8, classes=2)
    with pytest.raises(ValueError, match="conv5_1.weight"):
        m.load_trunk(state)


@pytest.mark.parametrize("head", ["dex", "regression"])
def test_decode_age_stays_in_range(head: str) -> None:
    cfg = tiny(age_head=head)
    logits = torch.randn(5, cfg.ages if head == "dex" else 1)
    age = decode_age(cfg, logits)
    assert age.shape == (5,)
    if head == "dex":
        assert ((age >= 1) & (age <= 70)).all()
        one_hot = torch.full((1, 70), -1e4)
        one_hot[0, 33] = 0
        assert decode_age(cfg, one_hot).item() == pytest.approx(34)


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = AgeGenderNet(tiny(age_head="regression")).eval()
    meta = CheckpointMeta(m.config, VGG_FACE_PREPROCESS.resized(32), extra={"note": "x"})
    save_checkpoint(tmp_path / "m.safetensors", m, meta)
    m2, meta2 = load_checkpoint(tmp_path / "m.safetensors")
    assert meta2.config == m.config and meta2.preprocess.size == 32 and meta2.extra == {"note": "x"}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x).gender_logit, m2(x).gender_logit)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_checkpoints_get_one_line_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AgeGenderError, match="no such model file"):
        read_meta(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AgeGenderError, match="junk.safetensors: not a safetensors checkpoint"):
        read_meta(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(AgeGenderError, match="without agegender metadata"):
        load_checkpoint(plain)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.slow
def test_feature_extractor_matches_forward_features(bf16: bool) -> None:
    from agegender.model.net import feature_extractor

    torch.manual_seed(0)
    m = AgeGenderNet(ModelConfig(widths=(8, 8, 16, 16, 16), image_size=32, hidden=(16,), dropout=(0.0,))).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = m.forward_features(x)
        got = feature_extractor(m, bf16)(x).float()
        assert got.shape == want.shape
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert (0 < err < 0.03) if bf16 else err < 1e-5  # bf16 rounds, but only just
        assert m.trunk.conv1_1.weight.dtype == torch.float32 and isinstance(m.trunk.conv1_1, nn.Conv2d)  # a copy
        in_place = feature_extractor(m, bf16, in_place=True)
        assert torch.equal(in_place(x).float(), got)
        assert m.trunk.conv1_1.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_keeps_the_right_share_and_repeats_under_a_seed(p: float) -> None:
    from agegender.model.net import Dropout

    d = Dropout(p).train()
    x = torch.randn(256, 1024, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 262k draws: 5 points is > 5 sigma
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / (1 - p))  # the gradient flows through kept elements only
    torch.manual_seed(3)
    assert torch.equal(d(x), y)  # the default generator: seeded runs and resumes repeat
    assert torch.equal(d.eval()(x), x)
    assert isinstance(d, nn.Dropout)  # exports treat it as dropout (the identity at inference)
