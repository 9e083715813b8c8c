"""SoRA (Ding et al., EMNLP 2023): LoRA with a gate that a proximal step drives to exact zeros.

dW = B diag(g) A * alpha / r_max. As the authors' code runs it (their `run_glue_sora_*` scripts):
- the loss gets an L1 penalty on the gates, `sparse_lambda` (eta) times the mean |g| over every
  gate of the model;
- the gates get no weight decay, and after every optimizer step their proximal step with threshold
  `sparse_lambda_2` (xi), exactly as their SparseAdamW does it: g > xi loses xi, g < -xi gains xi,
  and then every |g| < xi becomes 0. That zeroes more than the textbook soft threshold: a gate
  that was in (xi, 2 xi) ends at 0, not at |g| - xi. A gate at exactly xi is left alone, as theirs.
- the default is their no-schedule run (eta 10, xi 3e-4); with `lambda_stages` > 1, xi rises
  linearly to `max_lambda` in that many equal stages of the run (their Algorithm 1, which steps
  once per epoch; here the run is cut into equal stages).
At the end the ranks whose gate is zero are removed and g is folded into B: what remains is a plain
LoRA with a rank of its own per module (`ranks`), saved with the training-time scaling alpha/r_max.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from prolora_cli.methods.base import AdapterLayer, Method, kaiming_uniform_
from prolora_cli.methods.lora.method import lora_layer


def proximal_step(g: torch.Tensor, xi: float) -> torch.Tensor:
    """The authors' thresholding: shrink every |g| > xi by xi, then zero every |g| < xi."""
    g = torch.where(g > xi, g - xi, torch.where(g < -xi, g + xi, g))
    return torch.where(g.abs() < xi, torch.zeros_like(g), g)


def lambda_at(step: int, total_steps: int, xi: float, max_xi: float, stages: int) -> float:
    """The threshold during optimizer step `step` (1-based): linspace(xi, max_xi, stages), one value per stage."""
    if stages <= 1:
        return xi
    stage = min((step - 1) * stages // max(total_steps, 1), stages - 1)
    return xi + (max_xi - xi) * stage / (stages - 1)


class SoRALinear(AdapterLayer):
    NO_DECAY = ("gate",)  # regularised by its L1 penalty and proximal step only

    def __init__(self, base_layer: nn.Module, r: int, scaling: float = 2.0, dropout: float = 0.0,
                 xi: float = 3e-4, max_xi: Optional[float] = None, stages: int = 1):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, scaling
        self.xi, self.max_xi, self.stages = xi, xi if max_xi is None else max_xi, stages
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
        self.gate.copy_(proximal_step(self.gate, lambda_at(step, total_steps, self.xi, self.max_xi, self.stages)))

    @torch.no_grad()
    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the plain LoRA left after removing gate-zero ranks; scaling unchanged."""
        keep = self.gate != 0
        return self.lora_A[keep].clone(), (self.lora_B * self.gate)[:, keep].clone()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_max={self.r}, live={int((self.gate != 0).sum())}"


class SoRA(Method):
    name = "sora"
    note = "SoRA counts r_max ranks and the gates; the saved adapter keeps only the ranks left open."

    def read_settings(self, d, version, source):
        if version < 2:  # prolora 0.1: a threshold schedule only, no L1 term, and different names
            d = {**d, "sparse_lambda": 0.0, "sparse_lambda_2": d.get("sora_lambda", 1e-4),
                 "max_lambda": d.get("sora_max_lambda"), "lambda_stages": d.get("sora_stages", 1)}
        return super().read_settings(d, version, source)

    def build_layers(self, cfg, bases):
        s = cfg.settings
        if s.ranks is None:
            return {path: SoRALinear(base, cfg.r, cfg.scaling, cfg.dropout, s.sparse_lambda_2, s.max_lambda,
                                     s.lambda_stages) for path, base in bases.items()}
        # Compacted: a plain LoRA per module at its own rank; modules whose gates all closed have none.
        return {path: lora_layer(base, s.ranks[path], cfg.alpha, cfg.dropout, scaling=cfg.scaling)
                for path, base in bases.items() if s.ranks[path] > 0}

    def count(self, cfg, shapes, num_layers):
        return {t: [cfg.r * (h + o) + cfg.r] * num_layers for t, (h, o) in shapes.items()}, 0

    def describe(self, cfg) -> str:
        s = cfg.settings
        schedule = f" -> {s.max_lambda:g} in {s.lambda_stages} stages" if s.lambda_stages > 1 else ""
        left = "" if s.ranks is None else f", {sum(s.ranks.values())} ranks left in all"
        return (f"r_max={cfg.r} alpha={cfg.alpha:g} dropout={cfg.dropout:g} L1 weight={s.sparse_lambda:g} "
                f"threshold={s.sparse_lambda_2:g}{schedule}{left}")

    def regularizer(self, cfg, layers):
        gates = [layer.gate for layer in layers.values() if isinstance(layer, SoRALinear)]
        if not gates or cfg.settings.sparse_lambda == 0:
            return None
        g = torch.cat(gates)
        return cfg.settings.sparse_lambda * g.abs().sum() / g.numel()

    def finalize(self, cfg, layers):
        """Remove the ranks whose gate is zero and fold g into B: a plain LoRA per module."""
        if cfg.settings.ranks is not None:
            return cfg, layers, None
        ranks, compact = {}, {}
        for path, layer in layers.items():
            a, b = layer.compact()
            ranks[path] = a.shape[0]
            if ranks[path]:
                compact[path] = lora_layer(layer.base_layer, ranks[path], cfg.alpha, cfg.dropout,
                                           scaling=layer.scaling, factors=(a, b))
        done = replace(cfg, settings=replace(cfg.settings, ranks=ranks))
        return done, compact, f"SoRA kept {sum(ranks.values())} of {cfg.r * len(ranks)} ranks"


METHOD = SoRA()
