"""SoRA (Ding et al., EMNLP 2023): LoRA with a gate that a proximal step drives to exact zeros.

dW = B diag(g) A * alpha / r_max. A and B train as in LoRA; after every optimizer step the gate
takes a proximal step for an L1 penalty, the soft threshold g <- sign(g) * max(|g| - lambda, 0).
(The authors' code subtracts lambda and then also zeroes every |g| < lambda, which kills gates that
were in (lambda, 2 lambda); this is the true soft threshold.) lambda moves linearly from `lam` to
`max_lam` in `stages` equal stages of the run. At the end the ranks whose gate is zero are
removed and g is folded into B: what remains is a plain LoRA with a rank of its own per module.
"""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.adapters.base import AdapterLayer, kaiming_uniform_


def count_params(h: int, o: int, r: int) -> int:
    return r * (h + o) + r


def soft_threshold(g: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.sign(g) * torch.clamp(g.abs() - lam, min=0)


def lambda_at(step: int, total_steps: int, lam: float, max_lam: float, stages: int) -> float:
    """lambda during optimizer step `step` (1-based): stage k of `stages` uses lam + k/(stages-1) of the way."""
    if stages <= 1:
        return lam
    stage = min((step - 1) * stages // max(total_steps, 1), stages - 1)
    return lam + (max_lam - lam) * stage / (stages - 1)


class SoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.0,
                 lam: float = 1e-4, max_lam: float = 1e-4, stages: int = 1):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, alpha / r
        self.lam, self.max_lam, self.stages = lam, max_lam, stages
        device = self.param_device
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, device=device),
                                                    self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.gate = nn.Parameter(torch.randn(r, device=device))

    def factors(self):
        return self.lora_A, self.lora_B * self.gate

    def state(self):
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "gate": self.gate}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        lam = lambda_at(step, total_steps, self.lam, self.max_lam, self.stages)
        self.gate.copy_(soft_threshold(self.gate, lam))

    @torch.no_grad()
    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the plain LoRA left after removing gate-zero ranks; scaling unchanged."""
        keep = self.gate != 0
        return self.lora_A[keep].clone(), (self.lora_B * self.gate)[:, keep].clone()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_max={self.r}, live={int((self.gate != 0).sum())}"
