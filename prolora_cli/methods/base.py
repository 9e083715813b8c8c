"""What every adapter method shares: the layer contract, the method contract, and the one merge.

A layer is a frozen linear layer plus dW = scaling * B @ A. A method says how its own tensors make
the rank-r factors A (r x h) and B (o x r); forward, dW, merge and unmerge follow from that, and so
does exporting to plain LoRA (every method here is a LoRA after expansion).

A method (`Method`) is everything else the package needs to know about it, behind one object: its
own settings, how to build its layers on a model, how to count its parameters from an architecture,
what `inspect` says about it, and its training hooks. `methods/__init__.py` finds methods by name;
nothing outside this package knows which method it holds.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from prolora_cli import methods
from prolora_cli.errors import UserError
from prolora_cli.methods.settings import Settings


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W0 + dW (or - dW), added in fp32 (fp64 for fp64 weights) and rounded once to `dtype` (default:
    the weight's): the one merge, used by layers and by `prolora merge` alike."""
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)
    wide.add_(delta.to(wide.dtype), alpha=sign)  # in place: one full-size temporary, not two
    return wide.to(dtype or weight.dtype)


def base_device(base: nn.Module):
    """Where a base layer's adapter tensors go: its weight's device (None for a size-only stand-in on meta)."""
    weight = getattr(base, "weight", None)
    return weight.device if weight is not None and weight.device.type != "meta" else None


class AdapterLayer(nn.Module):
    """Subclasses set self.scaling and implement factors(), state() and load_state()."""

    scaling: float = 1.0
    # Names of this layer's parameters that the optimizer treats apart: SHARED ones take
    # --lr-shared, NO_DECAY ones get no weight decay (a gate regularised by its own penalty).
    SHARED: ClassVar[tuple[str, ...]] = ()
    NO_DECAY: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # the base alone answers (adapter.inject.adapters_disabled)

    @property
    def param_device(self):
        return base_device(self.base_layer)

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

    def stats(self) -> dict[str, float]:
        """Method-specific numbers `inspect` shows per module (PRILoRA: the share of A pruned)."""
        return {}

    # --- what follows from it ---------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.factors()[0].shape[0]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
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
            weight.copy_(merged_weight(weight, self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self._full_precision_weight()
            weight.copy_(merged_weight(weight, self.delta_weight(), sign=-1))
            self.merged = False


def kaiming_uniform_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PyTorch's default Linear/LoRA init (leaky-ReLU gain, a=sqrt(5)) with an explicit fan-in."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def block_index(path: str) -> int:
    """The transformer block a module belongs to: 'model.layers.3.mlp.up_proj' -> 3."""
    numbers = [int(p) for p in path.split(".") if p.isdigit()]
    return numbers[0] if numbers else 0


def format_1_refused(source: str, title: str, why: str) -> UserError:
    """The error for a format-1 adapter that this version builds differently, with the way out."""
    return UserError(f"{source}: this {title} adapter was saved by prolora 0.1, {why}; convert it with "
                     f"prolora 0.1's `prolora export --format peft` and `prolora import`, or retrain it")


class Method:
    """One adapter method, as the rest of the package sees it. Subclass it in the method's file
    and export an instance as METHOD; register its folder in methods/__init__.py."""

    name: ClassVar[str] = ""                              # its key in the registry
    default_targets: ClassVar[Optional[tuple[str, ...]]] = None   # None: every projection
    note: ClassVar[Optional[str]] = None                  # printed under count-params
    fit_budget = None  # optional: (shapes, num_layers, budget, max_rank, top) -> rows

    @property
    def title(self) -> str:
        """How people write it: "PRoLoRA" (its settings module's TITLE)."""
        return methods.title(self.name)

    @property
    def settings_class(self) -> type[Settings]:
        """Its settings (its settings module's SETTINGS)."""
        return methods.settings_class(self.name)

    def settings(self, r: int, flags: dict) -> Settings:
        return self.settings_class.from_flags(r, flags, self.name)

    def read_settings(self, d: dict, version: int, source: str) -> Settings:
        """This method's settings from a stored adapter_config.json of format `version`."""
        return self.settings_class.from_stored(d, d["r"], source)

    def build_layers(self, cfg, bases: dict[str, nn.Module]) -> dict[str, AdapterLayer]:
        """One layer per base linear layer, by module path; tensors shared across modules are
        created here, once, and handed to each layer."""
        raise NotImplementedError

    def count(self, cfg, shapes: dict[str, tuple[int, int]], num_layers: int) -> tuple[dict[str, list[int]], int]:
        """From an architecture alone: trainable numbers of each target's module in each block,
        and the trainable numbers shared by several modules."""
        raise NotImplementedError

    def describe(self, cfg) -> str:
        """One line with the settings that matter for this method."""
        return f"r={cfg.r} alpha={cfg.alpha:g} dropout={cfg.dropout:g}"

    def regularizer(self, cfg, layers: dict[str, AdapterLayer]) -> Optional[torch.Tensor]:
        """A penalty added to the training loss of every micro-batch (SoRA's L1 on its gates)."""
        return None

    def record(self, cfg, layers: dict[str, AdapterLayer]) -> Settings:
        """The settings to save beside these layers (e.g. ranks chosen per module)."""
        return cfg.settings

    def finalize(self, cfg, layers: dict[str, AdapterLayer]) -> tuple[Any, dict[str, AdapterLayer], Optional[str]]:
        """What a finished run saves: (config, layers, a line for the user). SoRA compacts here."""
        return cfg, layers, None

    def legacy_module_sizes(self, state: dict) -> Optional[dict]:
        """Module sizes of an old adapter whose config does not record them, read off its tensors."""
        return None
