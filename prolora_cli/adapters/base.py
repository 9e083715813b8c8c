"""What every adapter method shares: a frozen linear layer plus dW = scaling * B @ A.

A method says how its own tensors make the rank-r factors A (r x h) and B (o x r); forward, dW,
merge and unmerge follow from that, and so does exporting to plain LoRA (every method here is a
LoRA after expansion). Methods that act between optimizer steps (SoRA's proximal step, PRILoRA's
pruning) do it in `after_step`.
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Subclasses set self.scaling and implement factors(), state() and load_state()."""

    scaling: float = 1.0

    def __init__(self, base_layer: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def param_device(self):
        weight = getattr(self.base_layer, "weight", None)
        return weight.device if weight is not None and weight.device.type != "meta" else None

    # --- what a method defines --------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-r factors (A: r x h, B: o x r) with dW = scaling * B @ A."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """This module's tensors as saved, by short name (shared tensors excluded)."""
        raise NotImplementedError

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes load_state() requires, to name a mismatched adapter before copying anything."""
        return {k: tuple(v.shape) for k, v in self.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in self.state().items():
                value.copy_(state[name])

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors shared with other modules, by adapter-wide key (Tied-LoRA)."""
        return {}

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step; `step` counts from 1."""

    # --- what follows from it ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.factors()[0].shape[0]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        a, b = self.factors()
        update = self.dropout(x.to(a.dtype)) @ a.T @ b.T
        return result + (update * self.scaling).to(result.dtype)

    def _full_precision_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not isinstance(self.base_layer, nn.Linear) or weight.dtype not in (
                torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError("merge needs a full-precision base layer; dequantize the base first")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Add dW into the base weight, so forward costs exactly the base's."""
        if not self.merged:
            weight = self._full_precision_weight()
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self._full_precision_weight()
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch's default Linear/LoRA init (leaky-ReLU gain, a=sqrt(5)) with an explicit fan-in."""
    import math

    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)
