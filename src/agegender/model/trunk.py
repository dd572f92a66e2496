"""What the age/gender net needs of a backbone's PyTorch trunk; each backbone's trunk class subclasses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig


class Trunk(nn.Module):
    """A backbone's layers up to the features a head reads; ``forward`` maps normalised ``(N, 3, S, S)`` input to
    them. Its spec (:mod:`agegender.backbones`) names the class, so nothing else needs to know which it is."""

    # Whether it runs in oneDNN's blocked layout in bf16 on the CPU (see model.net.feature_extractor); padding
    # and averaging, which oneDNN tensors do not support, rule it out.
    blocked_bf16: ClassVar[bool] = False
    # How many of its last levels a run may train (``train --tune-levels``) from cached activations in front of
    # them; 0: none (the trunk trains whole, with ``--unfreeze``, or not at all).
    levels: ClassVar[int] = 0

    @classmethod
    def from_config(cls, config: ModelConfig) -> Trunk:
        """A freshly initialised trunk of ``config``'s shape."""
        raise NotImplementedError

    def load_pretrained(self, state: Mapping[str, Any]) -> None:
        """Copy the backbone's canonical state dict in, every name and shape checked."""
        raise NotImplementedError

    def lower(self, x: torch.Tensor, tuned: int) -> torch.Tensor:
        """The activations in front of the last ``tuned`` levels: what a fine-tune of them caches."""
        raise NotImplementedError

    def upper(self, activations: torch.Tensor, tuned: int) -> torch.Tensor:
        """The last ``tuned`` levels on :meth:`lower`'s activations, to what :meth:`forward` returns."""
        raise NotImplementedError

    def tune(self, tuned: int) -> None:
        """Let the weights of the last ``tuned`` levels (and what follows them) train; the rest stays fixed."""
        raise NotImplementedError
