"""What the age/gender net needs of a backbone's PyTorch trunk; each backbone's trunk class subclasses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig


class Trunk(nn.Module):
    """A backbone's layers up to the features a head reads; ``forward`` maps normalised ``(N, 3, S, S)`` input to
    them. Its spec (:mod:`agegender.backbones`) names the class, so nothing else needs to know which it is."""

    # Whether it runs in oneDNN's blocked layout in bf16 on the CPU (see model.net.feature_extractor); padding
    # and averaging, which oneDNN tensors do not support, rule it out.
    blocked_bf16: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: ModelConfig) -> Trunk:
        """A freshly initialised trunk of ``config``'s shape."""
        raise NotImplementedError

    def load_pretrained(self, state: Mapping[str, Any]) -> None:
        """Copy the backbone's canonical state dict in, every name and shape checked."""
        raise NotImplementedError
