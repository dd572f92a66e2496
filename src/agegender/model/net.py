"""The age/gender network: a backbone trunk, then the trained head (FC stack, gender logit, age head).

``forward_features`` is the (usually frozen) trunk; ``forward_head`` is everything trained on top, so a feature
cache can replace the first and feed the second.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones import backbone
from ..errors import InputError
from .age_head import age_head
from .config import ModelConfig
from .decode import stretch_years
from .trunk import Trunk


class Dropout(nn.Dropout):
    """nn.Dropout whose training mask on the CPU comes from 16 random bits per element.

    torch's CPU dropout draws its mask element by element on one thread; bits from ``torch.randint`` (the same
    generator, so seeds and resumes repeat) take under a third of that (DECISIONS.md: dropout masks).
    Elsewhere (evaluation, p = 0, in place, GPUs) it is nn.Dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
        # int16 is uniform on [-32768, 32767]: below round(keep * 65536) - 32768 with probability keep
        scale = (bits < round(keep * 65536) - 32768).view(x.shape).to(x.dtype).mul_(1.0 / keep)
        return x * scale


def build_trunk(config: ModelConfig) -> Trunk:
    """The trunk of ``config``'s backbone, as its spec builds it."""
    trunk = backbone(config.backbone).build_trunk(config)
    assert isinstance(trunk, Trunk)
    return trunk


@dataclass
class Outputs:
    gender_logit: torch.Tensor  # (N,), sigmoid gives P(male)
    age_logits: torch.Tensor | None = None  # (N, ages) for dex, (N, 1) for regression
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class AgeGenderNet(nn.Module):
    """The backbone's trunk -> flatten -> FC stack -> gender logit and age head, in one forward pass.

    ``forward_features`` is the (usually frozen) trunk; ``forward_head`` is everything trained on top,
    so a feature cache can replace the first and feed the second.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk: Trunk = build_trunk(config)
        layers: list[nn.Module] = [nn.BatchNorm1d(config.feature_dim)] if config.feature_bn else []
        dim = config.feature_dim
        for width, p in zip(config.hidden, config.dropout):
            layers.append(nn.Linear(dim, width, bias=not config.head_bn))
            if config.head_bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            if p > 0:
                layers.append(Dropout(p))
            dim = width
        self.fc = nn.Sequential(*layers)
        self.gender = nn.Linear(dim, 1)
        head = age_head(config)
        self.age = nn.Linear(dim, head.width) if head is not None else None
        if config.freeze_trunk:
            self.freeze_trunk()

    # -- freezing ---------------------------------------------------------------------------
    def freeze_trunk(self) -> None:
        """Freeze the pretrained trunk. BatchNorm inside the VGG trunk (the seed's ``block_bn`` layout) stays trainable."""
        self.config.freeze_trunk = True
        for module in self.trunk.modules():
            if not isinstance(module, nn.BatchNorm2d):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        self.train(self.training)

    def unfreeze_trunk(self) -> None:
        self.config.freeze_trunk = False
        self.trunk.requires_grad_(True)

    def tune_trunk(self, levels: int) -> None:
        """Train the trunk's last ``levels`` levels (the rest stays frozen), from activations cached in front of
        them (:meth:`forward_from`). The model's config does not change: at inference it is a whole fixed trunk."""
        if not 0 < levels <= self.trunk.levels:
            raise InputError(f"the {self.config.backbone} trunk can tune 1 to {self.trunk.levels} levels, not {levels}")
        self.trunk.tune(levels)

    @property
    def trunk_is_fixed(self) -> bool:
        """True when nothing in the trunk trains, so its outputs can be cached."""
        return not any(p.requires_grad for p in self.trunk.parameters())

    def train(self, mode: bool = True) -> AgeGenderNet:
        # A fixed trunk stays in eval mode whatever model.train() says, so it behaves the same in every pass.
        super().train(mode)
        if self.trunk_is_fixed:
            self.trunk.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # -- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.trunk(x), 1)

    def forward_head(self, features: torch.Tensor) -> Outputs:
        h = self.fc(features)
        age = self.age(h) if self.age is not None else None
        return Outputs(self.gender(h).squeeze(-1), age)

    def forward(self, x: torch.Tensor) -> Outputs:
        return self.forward_head(self.forward_features(x))

    def forward_from(self, cached: torch.Tensor, tuned: int = 0) -> Outputs:
        """The forward pass from what a feature cache holds: the trunk's features, or with ``tuned`` levels the
        activations in front of them (:meth:`Trunk.lower`)."""
        if tuned:
            cached = torch.flatten(self.trunk.upper(cached, tuned), 1)
        return self.forward_head(cached)

    # -- decoding ---------------------------------------------------------------------------
    def expected_age(self, age_logits: torch.Tensor) -> torch.Tensor:
        """Age in years from the age head: softmax expectation (DEX) or the regressed value."""
        return decode_age(self.config, age_logits)

    def load_trunk(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the pretrained trunk from its backbone's canonical state dict, shapes asserted."""
        self.trunk.load_pretrained(state)


def decode_age(config: ModelConfig, age_logits: torch.Tensor) -> torch.Tensor:
    """Age in years from the age head's outputs, as :func:`~agegender.model.decode.decode` gives it."""
    head = age_head(config)
    if head is None:
        raise InputError("this model has no age head")
    return stretch_years(config, head.decode(age_logits)[0])


def inference_layout(model: AgeGenderNet, bf16: bool, device: str | torch.device = "cpu") -> str:
    """The layout :func:`feature_extractor` runs the trunk in: "onednn" (blocked) or "channels_last"."""
    from ..devices import native_bf16

    # oneDNN's bf16 kernels need the CPU's bf16 units; forced bf16 elsewhere takes the autocast path. Only some
    # trunks run in oneDNN's tensors (Trunk.blocked_bf16).
    cpu = torch.device(device).type == "cpu"
    blocked = getattr(model.trunk, "blocked_bf16", False)  # a trunk already converted to oneDNN is a plain module
    return "onednn" if bf16 and cpu and blocked and native_bf16("cpu") else "channels_last"


def feature_extractor(
    model: AgeGenderNet, bf16: bool, device: str | torch.device = "cpu", *, in_place: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward_features`` for inference with a fixed trunk, in its fastest form here: normalised input in,
    flattened features out (bf16 when ``bf16``). The head is untouched.

    A VGG trunk in bf16 on the CPU runs in oneDNN's own blocked layout with its weights reordered once, not on
    every call: 1.3-1.5x the channels_last trunk under autocast at batches 32-512 (BENCHMARKS.md figure 1).
    Everything else runs channels_last (oneDNN's convolutions want NHWC: 1.5x fp32, 1.8x bf16), under
    autocast when ``bf16``. ``in_place`` converts ``model.trunk`` itself instead of a copy (an inference-only
    model); otherwise the model is left as it was.
    """
    device = torch.device(device)
    if inference_layout(model, bf16, device) == "onednn":
        with warnings.catch_warnings():  # its modules are TorchScript, whose decorators warn of deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.utils import mkldnn
        trunk = mkldnn.to_mkldnn(model.trunk if in_place else copy.deepcopy(model.trunk).eval(), torch.bfloat16)
        if in_place:
            model.trunk = trunk

        def blocked(x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(trunk(x.to(device, torch.bfloat16).to_mkldnn()).to_dense(), 1)

        return blocked
    if in_place:  # an inference-only model: bf16 weights, no casts per call
        trunk = model.trunk.to(
            dtype=torch.bfloat16 if bf16 else torch.float32,  # type: ignore[call-overload]
            memory_format=torch.channels_last,
        )
        dtype, cast = (torch.bfloat16 if bf16 else torch.float32), False
    else:  # fp32 weights under autocast, as the uncached training path runs them
        trunk = copy.deepcopy(model.trunk).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        dtype, cast = torch.float32, bf16

    def nhwc(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, dtype, memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cast):
            return torch.flatten(trunk(x), 1)

    return nhwc
