"""Tied-LoRA (Renduchintala et al., 2023), as the PRoLoRA paper runs it (its Table 2: rank 256 on
q, k and v of LLaMA-2-7B, 4.60M trainable parameters).

dW = alpha/r * diag(u) B_t diag(v) A for a module of projection type t in block l, where
- A (r x h) is one down-projection tied across q, k and v (they read the same input) of all blocks,
- B_t (o_t x r) is one up-projection per projection type, tied across all blocks,
- v (r) is one vector per block, shared by that block's q, k and v,
- u (o_t) is one vector per module.
With GQA, k and v are narrower than q: each type has its own B, so nothing is sliced.
Other targets (o, gate, up, down) each form a tie group of their own: one A and one B for that
projection type across all blocks, with v per block and u per module, as above.
A starts kaiming-uniform, B at zero (so dW = 0 at step 0), u and v at one.
"""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.errors import UserError
from prolora_cli.methods.base import AdapterLayer, Method, base_device, block_index, format_1_refused, kaiming_uniform_

QKV = ("q_proj", "k_proj", "v_proj")


def group_of(kind: str) -> str:
    """The tie group of a projection type: q, k and v share A; every other type ties alone."""
    return "qkv" if kind in QKV else kind


class TiedLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, tied: dict[str, nn.Parameter], scaling: float = 2.0,
                 dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, scaling
        self.tied = tied  # {saved key: Parameter} for A, B and v: the same objects in every sharer
        self.tied_A, self.tied_B, self.tied_v = tied.values()
        self.tied_u = nn.Parameter(torch.ones(self.out_features, device=self.param_device))

    def factors(self):
        return self.tied_v[:, None] * self.tied_A, self.tied_u[:, None] * self.tied_B

    def state(self):
        return {"tied_u": self.tied_u}

    def shared_state(self):
        return dict(self.tied)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


class TiedLoRA(Method):
    name = "tied-lora"
    default_targets = QKV

    def read_settings(self, d, version, source):
        if version < 2:
            raise format_1_refused(source, self.title, "which tied B per group and kept v per module")
        return super().read_settings(d, version, source)

    def build_layers(self, cfg, bases):
        tensors: dict[str, nn.Parameter] = {}  # every tied tensor, by saved key
        layers = {}
        for path, base in bases.items():
            kind, block = path.rsplit(".", 1)[-1], block_index(path)
            group, h, o, dev = group_of(kind), base.in_features, base.out_features, base_device(base)
            make = {f"tied.{group}.A": lambda: kaiming_uniform_(torch.empty(cfg.r, h, device=dev), h),
                    f"tied.{kind}.B": lambda: torch.zeros(o, cfg.r, device=dev),
                    f"tied.{group}.v.{block}": lambda: torch.ones(cfg.r, device=dev)}
            for key, new in make.items():
                if key not in tensors:
                    tensors[key] = nn.Parameter(new())
            tied = {key: tensors[key] for key in make}
            if next(iter(tied.values())).shape[1] != h:
                raise UserError(f"tie group {group} cannot serve {path}: its input size is {h}")
            layers[path] = TiedLoRALinear(base, cfg.r, tied, cfg.scaling, cfg.dropout)
        return layers

    def count(self, cfg, shapes, num_layers):
        """Per module: u (o). Shared: A per group (r h), B per type (o r), v per block and group (r)."""
        groups = {group_of(t): h for t, (h, o) in shapes.items()}
        shared = sum(cfg.r * h + num_layers * cfg.r for h in groups.values())
        shared += sum(o * cfg.r for h, o in shapes.values())
        return {t: [o] * num_layers for t, (h, o) in shapes.items()}, shared


METHOD = TiedLoRA()
