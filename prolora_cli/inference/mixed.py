"""Many adapters resident on one base, and a batch whose rows use different adapters run in one forward.

Resident, each adapter is what its file holds and nothing more: the bytes of its tensors in their compact
form (PRoLoRA's shared chunks, never its expanded A and B), in one buffer. Adapters of one layout (the
same method, settings and tensor shapes: one per user of a task, say) share one set of the method's
layers on the base, a template: to expand an adapter's factors, its tensors are loaded into the template
and the method computes A (r x h) and B (o x r) as it always does. Any method works: each is a LoRA after
expansion (methods/base.py).

Each adapted linear layer becomes a MixedAdapterLinear: the frozen base layer, whose matmul every row
shares, plus the adapters that touch it. Before a batch, `use_rows` says which adapter each row uses; the
layers then expand the factors of the adapters in the batch once, padded with zeros to the batch's
largest rank, and every forward of that batch (the prompt and each new token) adds each row's own
scaling * B (A x) with two batched matmuls. A layer an adapter does not touch adds nothing to its rows,
and base rows get nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.files import WEIGHTS_NAME
from prolora_cli.adapter.inject import build_layers, load_layers_state
from prolora_cli.errors import UserError
from prolora_cli.methods.base import AdapterLayer
from prolora_cli.models.safetensors_files import Entry, file_entries, torch_dtype


@dataclass
class ResidentAdapter:
    name: str
    folder: Path
    cfg: AdapterConfig
    entries: dict[str, Entry] = field(default_factory=dict)  # its tensors' places in its file
    data: Optional[torch.Tensor] = None                        # their bytes, read by attach_adapters
    base_offset: int = 0                                       # where `data` starts in the file

    @classmethod
    def open(cls, name: str, folder: Path, cfg: AdapterConfig) -> "ResidentAdapter":
        """The adapter's config and its weight file's header, checked; no tensor is read yet."""
        path = Path(folder) / WEIGHTS_NAME
        if not path.is_file():
            raise UserError(f"{folder} has no {WEIGHTS_NAME}")
        return cls(name, Path(folder), cfg, file_entries(path))

    def read(self) -> None:
        """Every tensor's bytes in one buffer, as the file holds them."""
        start = min(e.start for e in self.entries.values())
        data = torch.empty(max(e.end for e in self.entries.values()) - start, dtype=torch.uint8)
        with open(self.folder / WEIGHTS_NAME, "rb") as f:
            f.seek(start)
            f.readinto(data.numpy())
        self.data, self.base_offset = data, start

    def tensors(self, keys) -> dict[str, torch.Tensor]:
        """Views of some of its tensors (copies where the file's alignment does not allow a view)."""
        out = {}
        for key in keys:
            e = self.entries[key]
            raw = self.data[e.start - self.base_offset:e.end - self.base_offset]
            try:
                out[key] = raw.view(torch_dtype(e.dtype)).view(e.shape)
            except RuntimeError:
                out[key] = raw.clone().view(torch_dtype(e.dtype)).view(e.shape)
        return out

    def layout(self) -> str:
        """What decides its layers: method and settings, and every tensor's name, dtype and shape."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("base_model", "chat_format", "system_prompt")}
        tensors = sorted((k, e.dtype, e.shape) for k, e in self.entries.items())
        return json.dumps([cfg, tensors], sort_keys=True, default=list)


class Template:
    """One set of a layout's layers on the base; each adapter of that layout is loaded into it to expand."""

    def __init__(self, layers: dict[str, AdapterLayer]):
        self.layers = layers
        self.loaded: dict[str, Optional[str]] = dict.fromkeys(layers)  # which adapter each layer holds now

    def factors(self, path: str, adapter: ResidentAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T (h x r) and (scaling * B)^T (r x o) of `adapter` at module `path`."""
        layer = self.layers[path]
        if self.loaded[path] != adapter.name:
            prefix = f"{path}."
            own = adapter.tensors([k for k in adapter.entries if k.startswith(prefix)])
            with torch.no_grad():
                layer.load_state({k[len(prefix):]: v for k, v in own.items()})
                for key, value in layer.shared_state().items():
                    value.copy_(adapter.tensors([key])[key])
            self.loaded[path] = adapter.name
        a, b = layer.factors()
        return a.detach().T, (b.detach() * layer.scaling).T


class MixedAdapterLinear(nn.Module):
    """A frozen linear layer plus any number of adapters, each row of a batch with its own (or none)."""

    def __init__(self, base_layer: nn.Module, path: str):
        super().__init__()
        self.base_layer, self.path = base_layer, path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters: dict[str, tuple[ResidentAdapter, Template]] = {}  # name -> (its tensors, its layers)
        self.rows: Optional[list[Optional[str]]] = None
        self.active = False  # some row of the batch uses an adapter of this layer
        self.batch_factors: Optional[tuple] = None  # (A^T, B^T per row) or (A^T, B^T, row mask), expanded

    def use_rows(self, names: Sequence[Optional[str]]) -> None:
        """The adapter each row of the next batch uses (None: the base alone); factors expand lazily."""
        self.rows, self.batch_factors = list(names), None
        self.active = any(n in self.adapters for n in self.rows if n is not None)

    def expand(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """This batch's factors: the adapters it uses, expanded once, padded to their largest rank."""
        used = [n for n in dict.fromkeys(self.rows) if n is not None and n in self.adapters]
        factors = {}
        for name in used:  # transposed, so that the matmuls read them contiguously
            adapter, template = self.adapters[name]
            a_t, b_t = template.factors(self.path, adapter)
            factors[name] = (a_t.to(device, dtype), b_t.to(device, dtype))
        if len(used) == 1:  # one adapter: one shared low-rank product, masked to its rows
            mask = torch.tensor([n == used[0] for n in self.rows], device=device, dtype=dtype)
            a_t, b_t = factors[used[0]]
            return a_t.contiguous(), b_t.contiguous(), mask[:, None, None]
        rank = max(a_t.shape[1] for a_t, _ in factors.values())
        a_rows = torch.zeros(len(self.rows), self.in_features, rank, dtype=dtype, device=device)
        b_rows = torch.zeros(len(self.rows), rank, self.out_features, dtype=dtype, device=device)
        for i, name in enumerate(self.rows):
            if name in factors:
                a_t, b_t = factors[name]
                a_rows[i, :, : a_t.shape[1]], b_rows[i, : a_t.shape[1]] = a_t, b_t
        return a_rows, b_rows

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.active:
            return result
        if len(self.rows) != x.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows, but use_rows named {len(self.rows)}")
        if self.batch_factors is None:
            self.batch_factors = self.expand(result.dtype, x.device)
        x = x.to(result.dtype)
        if len(self.batch_factors) == 3:
            a_t, b_t, mask = self.batch_factors
            return result + (x @ a_t @ b_t) * mask
        a_rows, b_rows = self.batch_factors
        return result + torch.bmm(torch.bmm(x, a_rows), b_rows)


def attach_adapters(model: nn.Module, adapters: Sequence[ResidentAdapter]) -> dict[str, MixedAdapterLinear]:
    """Put every adapter on `model` at once; returns the mixed layers by module path. The first adapter
    of each layout is checked against the base (its modules and their sizes), naming the first misfit."""
    linears = {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    templates: dict[str, Template] = {}
    mixed: dict[str, MixedAdapterLinear] = {}
    for adapter in adapters:
        adapter.read()
        layout = adapter.layout()
        if layout not in templates:
            templates[layout] = build_template(linears, adapter)
        for path in templates[layout].layers:
            if path not in mixed:
                mixed[path] = MixedAdapterLinear(linears[path], path)
            mixed[path].adapters[adapter.name] = (adapter, templates[layout])
    for path, layer in mixed.items():
        parent, _, child = path.rpartition(".")
        model.get_submodule(parent).register_module(child, layer)
    return mixed


def build_template(linears: dict[str, nn.Module], adapter: ResidentAdapter) -> Template:
    targets = set(adapter.cfg.targets)
    bases = {path: m for path, m in linears.items() if path.rsplit(".", 1)[-1] in targets}
    try:
        if not bases:
            raise UserError(f"the model has no {', '.join(sorted(targets))} layers to adapt")
        layers = build_layers(adapter.cfg, bases)
        load_layers_state(layers, adapter.tensors(adapter.entries))  # names the first misfit
    except UserError as e:
        raise UserError(f"adapter {adapter.name} ({adapter.folder}): {e}") from None
    for layer in layers.values():
        layer.eval()
    template = Template(layers)
    template.loaded = dict.fromkeys(layers, adapter.name)
    return template


def use_rows(model: nn.Module, names: Sequence[Optional[str]]) -> None:
    """Say, for every mixed layer of `model`, which adapter each row of the next batch uses."""
    for module in model.modules():
        if isinstance(module, MixedAdapterLinear):
            module.use_rows(names)
