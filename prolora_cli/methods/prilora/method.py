"""PRILoRA (Benedek and Wolf, EACL Findings 2024): ranks that rise with depth, and a pruned A.

Block l of L gets rank r_l = round(r_first + (r_last - r_first) * l / (L - 1)); the default
r/2 -> 3r/2 has the same total as a uniform r. During training, every `prune_every` steps each row
of A loses the `prune_fraction` (of its h entries) with the lowest importance |A_ij| * ||x_j||,
where ||x_j|| is the L2 norm of input feature j accumulated over all tokens seen, until a row is
`max_sparsity` pruned. Pruned entries are masked to zero and stay zero. dW = B (A * mask) * alpha / r,
with the nominal r for every block, so a deeper block's larger rank does not shrink its update.
The saved A holds only the surviving values and a bit mask.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from prolora_cli.methods.base import AdapterLayer, Method, block_index, kaiming_uniform_


def rank_ramp(r_first: int, r_last: int, num_layers: int) -> list[int]:
    if num_layers == 1:
        return [round((r_first + r_last) / 2)]
    return [round(r_first + (r_last - r_first) * i / (num_layers - 1)) for i in range(num_layers)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    n = 1
    for s in shape:
        n *= s
    return bits.flatten()[:n].view(shape).bool()


class PRILoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, alpha_scaling: float, dropout: float = 0.0,
                 prune_every: int = 50, prune_fraction: float = 0.05, max_sparsity: float = 0.5):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, alpha_scaling
        self.prune_every, self.prune_fraction, self.max_sparsity = prune_every, prune_fraction, max_sparsity
        h, device = self.in_features, self.param_device
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(r, h, device=device), h))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.register_buffer("mask", torch.ones(r, h, dtype=torch.bool, device=device))
        self.register_buffer("input_norm_sq", torch.zeros(h, device=device))

    def forward(self, x, *args, **kwargs):
        if self.training:
            with torch.no_grad():  # the importance statistic: sum of x_j^2 over every token seen
                self.input_norm_sq += x.detach().float().pow(2).reshape(-1, self.in_features).sum(0)
        return super().forward(x, *args, **kwargs)

    def factors(self):
        return self.lora_A * self.mask, self.lora_B

    @torch.no_grad()
    def prune(self) -> None:
        """Mask the lowest-importance live entries of each row, up to max_sparsity per row."""
        h = self.in_features
        target_dead = min(int(round(self.max_sparsity * h)),
                          int((~self.mask).sum(1).max()) + int(round(self.prune_fraction * h)))
        score = self.lora_A.abs() * self.input_norm_sq.sqrt()
        score[~self.mask] = -1.0  # already dead: ranked first, so they count towards the target
        if target_dead > 0:
            dead = score.topk(target_dead, dim=1, largest=False).indices
            self.mask.scatter_(1, dead, False)
        self.lora_A.mul_(self.mask)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        if self.prune_every and step % self.prune_every == 0:
            self.prune()
        self.lora_A.mul_(self.mask)  # optimizer momentum must not revive a pruned entry

    @property
    def sparsity(self) -> float:
        return float((~self.mask).float().mean())

    def stats(self) -> dict:
        return {"a_sparsity": self.sparsity}

    def state(self):
        return {"A_values": self.lora_A[self.mask], "A_mask": pack_bits(self.mask), "lora_B": self.lora_B,
                "input_norm_sq": self.input_norm_sq}

    def state_shapes(self):
        shapes = {k: tuple(v.shape) for k, v in self.state().items()}
        del shapes["A_values"]  # its length is the mask's count, checked in load_state
        return shapes

    def load_state(self, state):
        mask = unpack_bits(state["A_mask"].to(self.mask.device), tuple(self.mask.shape))
        values = state["A_values"]
        if values.numel() != int(mask.sum()):
            raise ValueError(f"A_values has {values.numel()} entries, the mask keeps {int(mask.sum())}")
        with torch.no_grad():
            self.mask.copy_(mask)
            self.lora_A.zero_()
            self.lora_A[mask] = values.to(self.lora_A)
            self.lora_B.copy_(state["lora_B"])
            self.input_norm_sq.copy_(state["input_norm_sq"])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, sparsity={self.sparsity:.2f}"


class PRILoRA(Method):
    name = "prilora"
    note = "PRILoRA before pruning; the saved A keeps (1 - max sparsity) of its entries."

    def build_layers(self, cfg, bases):
        s = cfg.settings
        num_blocks = max((block_index(p) for p in bases), default=0) + 1
        ramp = rank_ramp(s.rank_first, s.rank_last, num_blocks)
        return {path: PRILoRALinear(base, s.ranks[path] if s.ranks else ramp[block_index(path)],
                                    cfg.scaling, cfg.dropout, s.prune_every, s.prune_fraction,
                                    s.max_sparsity) for path, base in bases.items()}

    def count(self, cfg, shapes, num_layers):
        ramp = rank_ramp(cfg.settings.rank_first, cfg.settings.rank_last, num_layers)
        return {t: [r * (h + o) for r in ramp] for t, (h, o) in shapes.items()}, 0

    def describe(self, cfg) -> str:
        s = cfg.settings
        return (f"r={cfg.r} ranks {s.rank_first}..{s.rank_last} by depth, alpha={cfg.alpha:g} "
                f"dropout={cfg.dropout:g}, prune {s.prune_fraction:g} every {s.prune_every} steps "
                f"up to {s.max_sparsity:g}")

    def record(self, cfg, layers):
        return replace(cfg.settings, ranks={path: layer.r for path, layer in layers.items()})


METHOD = PRILoRA()
