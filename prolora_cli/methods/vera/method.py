"""VeRA (Kopiczko et al., 2023): frozen random A and B, trainable scaling vectors.

dW = diag(b) B diag(d) A. One frozen pair serves the whole model, in PEFT's layout: A is
r x max(in) and B is max(out) x r over the adapted modules, and a module of size h -> o uses
A[:, :h] and B[:o, :]. The pair is drawn on the CPU from a generator seeded by `vera_seed`,
A first, then B, kaiming-uniform with gain sqrt(2) (bound sqrt(6 / fan_in)), exactly as PEFT's
VeraModel draws it from `projection_prng_key`: the same seed gives the same matrices. It is
rebuilt on load, never saved. Each module trains only d (r, init `vera_d_init`) and b (o, init
0), so it costs r + o parameters whatever the rank (the paper uses r = 256).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prolora_cli.methods.base import AdapterLayer, Method, base_device, format_1_refused


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen A (r x max_in) and B (max_out x r): a pure function of the seed and sizes."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(shape):
        bound = math.sqrt(6.0 / shape[1])  # fan_in = columns
        return torch.empty(shape).uniform_(-bound, bound, generator=g)

    a = draw((r, max_in))
    return a, draw((max_out, r))


class VeRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, projection: tuple[torch.Tensor, torch.Tensor],
                 d_init: float = 0.1, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, 1.0
        a, b = projection
        # The model-wide frozen pair, sliced to this module: not saved, `projections` rebuilds it.
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        device = self.param_device
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init), device=device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, device=device))

    def factors(self):
        a = self.vera_A[:, : self.in_features]
        b = self.vera_B[: self.out_features, :]
        return self.vera_d[:, None] * a, self.vera_b[:, None] * b

    def state(self):
        return {"vera_d": self.vera_d, "vera_b": self.vera_b}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


class VeRA(Method):
    name = "vera"
    note = "VeRA's frozen random A and B are rebuilt from a seed: neither trained nor saved."

    def read_settings(self, d, version, source):
        if version < 2:
            raise format_1_refused(source, self.title, "which drew one frozen pair per module shape")
        return super().read_settings(d, version, source)

    def build_layers(self, cfg, bases):
        s = cfg.settings
        max_in = max(b.in_features for b in bases.values())
        max_out = max(b.out_features for b in bases.values())
        a, b = projections(cfg.r, max_in, max_out, s.vera_seed)
        layers = {}
        for path, base in bases.items():
            device = base_device(base)
            layers[path] = VeRALinear(base, cfg.r, (a.to(device), b.to(device)), s.vera_d_init, cfg.dropout)
        return layers

    def count(self, cfg, shapes, num_layers):
        return {t: [cfg.r + o] * num_layers for t, (h, o) in shapes.items()}, 0

    def describe(self, cfg) -> str:
        s = cfg.settings
        return f"r={cfg.r} seed={s.vera_seed} d_init={s.vera_d_init:g} dropout={cfg.dropout:g}"


METHOD = VeRA()
