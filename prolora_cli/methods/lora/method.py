"""LoRA (Hu et al., 2021): dW = alpha/r * B A with A (r x h) and B (o x r) both trained.

Plain LoRA is PRoLoRA with every rank unshared (u = r), exactly (the spec's own definition), so
its layer is PRoLoRA's with nothing shared; adapters keep PRoLoRA's tensor names, with empty
shared chunks. SoRA's compacted result and imported PEFT adapters are LoRAs built here.
"""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.methods.base import Method
from prolora_cli.methods.prolora.method import PRoLoRALinear, count_params, unshared_sizes


def lora_layer(base: nn.Module, r: int, alpha: float, dropout: float, scaling: float | None = None,
               factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> PRoLoRALinear:
    """A LoRA layer of rank r on `base`; with `factors` (A, B), starting from those values."""
    layer = PRoLoRALinear(base, r, u=r, m=1, n=1, alpha=alpha, dropout=dropout, scaling=scaling)
    if factors is not None:
        with torch.no_grad():
            layer.A_unshared.copy_(factors[0])
            layer.B_unshared.copy_(factors[1])
    return layer


class LoRA(Method):
    name = "lora"

    def build_layers(self, cfg, bases):
        return {path: lora_layer(base, cfg.r, cfg.alpha, cfg.dropout, scaling=cfg.scaling) for path, base in bases.items()}

    def count(self, cfg, shapes, num_layers):
        return {t: [count_params(h, o, cfg.r, cfg.r, 1, 1)] * num_layers for t, (h, o) in shapes.items()}, 0

    def legacy_module_sizes(self, state):
        return unshared_sizes(state)

    def from_factors(self, cfg, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, PRoLoRALinear]:
        """Layers holding given (A, B) per module path, on size-only stand-ins for the base."""
        return {path: lora_layer(nn.Linear(a.shape[1], b.shape[0], bias=False, device="meta"), cfg.r,
                                 cfg.alpha, cfg.dropout, scaling=cfg.scaling, factors=(a, b))
                for path, (a, b) in factors.items()}


METHOD = LoRA()
