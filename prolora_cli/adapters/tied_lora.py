"""Tied-LoRA (Renduchintala et al., 2023): one A and B for many modules, per-module scaling vectors.

dW = diag(u) B diag(v) A * alpha / r. A (r x h) and B (o_max x r) are trainable and shared by every
module of a tie group: q, k and v of all layers form one group (the paper's setting), and each other
projection type (o, gate, up, down) forms its own group across layers. Each module trains u (its
out size, init 1) and v (r, init 1). GQA makes k and v narrower than q: the group's B has q's
height and a narrower module uses its first o rows, so the down-projection A stays fully tied.
A starts kaiming-uniform and B at zero, as in LoRA, so training starts from dW = 0.
"""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.adapters.base import AdapterLayer, kaiming_uniform_

QKV = ("q_proj", "k_proj", "v_proj")


def group_of(target: str) -> str:
    return "qkv" if target in QKV else target


def count_params(h: int, o: int, r: int) -> int:
    """Per module; each group adds r * h + o_max * r once."""
    return o + r


def shared_params(h: int, o_max: int, r: int, device=None) -> tuple[nn.Parameter, nn.Parameter]:
    a = nn.Parameter(kaiming_uniform_(torch.empty(r, h, device=device), h))
    b = nn.Parameter(torch.zeros(o_max, r, device=device))
    return a, b


class TiedLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, group: str, shared: tuple[nn.Parameter, nn.Parameter],
                 alpha: float = 16.0, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r, self.group, self.scaling = r, group, alpha / r
        self.tied_A, self.tied_B = shared  # the same Parameter objects in every module of the group
        if self.tied_A.shape[1] != self.in_features or self.tied_B.shape[0] < self.out_features:
            raise ValueError(f"tie group {group} cannot serve a {self.in_features} -> {self.out_features} module")
        device = self.param_device
        self.tied_u = nn.Parameter(torch.ones(self.out_features, device=device))
        self.tied_v = nn.Parameter(torch.ones(r, device=device))

    def factors(self):
        return self.tied_v[:, None] * self.tied_A, self.tied_u[:, None] * self.tied_B[: self.out_features]

    def state(self):
        return {"tied_u": self.tied_u, "tied_v": self.tied_v}

    def shared_state(self):
        return {f"tied.{self.group}.A": self.tied_A, f"tied.{self.group}.B": self.tied_B}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, group={self.group}"
