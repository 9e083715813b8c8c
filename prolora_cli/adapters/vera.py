"""VeRA (Kopiczko et al., 2023): frozen random A and B, trainable scaling vectors.

dW = diag(b) B diag(d) A. A (r x h) and B (o x r) are frozen, random, shared by every module of
the same shape, and regenerated from a seed instead of saved; each module trains only d (r, init
0.1) and b (o, init 0), so it costs r + o parameters whatever the rank (the paper uses r = 256).
"""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.adapters.base import AdapterLayer, kaiming_uniform_


def count_params(h: int, o: int, r: int) -> int:
    return r + o


def projections(h: int, o: int, r: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen A (r x h) and B (o x r) for modules of shape h -> o: a pure function of the seed.

    Drawn on the CPU from a generator seeded by (seed, h, o), so every machine rebuilds the same
    matrices; kaiming-uniform like PEFT's VeRA (fan-in h for A, r for B).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + h * 65_537 + o)
    a = kaiming_uniform_(torch.empty(r, h), h, generator=g)
    b = kaiming_uniform_(torch.empty(o, r), r, generator=g)
    return a.to(device), b.to(device)


class VeRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, projection: tuple[torch.Tensor, torch.Tensor],
                 d_init: float = 0.1, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, 1.0
        a, b = projection
        # Shared tensors, not saved: `projections` rebuilds them.
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        device = self.param_device
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init), device=device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, device=device))

    def factors(self):
        return self.vera_d[:, None] * self.vera_A, self.vera_b[:, None] * self.vera_B

    def state(self):
        return {"vera_d": self.vera_d, "vera_b": self.vera_b}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"
