"""Put adapter layers into a transformers model, and move their tensors in and out.

One entry point per direction for every method: `inject` builds the method's layers (and the
tensors its modules share), `adapter_state`/`load_state` move every saved tensor.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from prolora_cli.adapters.base import AdapterLayer
from prolora_cli.config import AdapterConfig
from prolora_cli.errors import UserError

_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(path: str) -> int:
    """The transformer block a module belongs to: 'model.layers.3.mlp.up_proj' -> 3."""
    m = _BLOCK.search(f".{path}.")
    return int(m.group(1)) if m else 0


def build_layers(cfg: AdapterConfig, bases: dict[str, nn.Module]) -> dict[str, AdapterLayer]:
    """One adapter layer per base linear layer, by module path; tensors shared across modules
    (VeRA's projections, Tied-LoRA's A and B) are created once here and handed to each layer."""
    from prolora_cli.adapters import prilora, sora, tied_lora, vera
    from prolora_cli.adapters.prolora import PRoLoRALinear

    def device_of(base):
        w = getattr(base, "weight", None)
        return w.device if w is not None and w.device.type != "meta" else None

    layers, shared = {}, {}
    num_blocks = max((block_index(p) for p in bases), default=0) + 1
    for path, base in bases.items():
        h, o = base.in_features, base.out_features
        cfg.check(h, o)
        kind = path.rsplit(".", 1)[-1]
        if cfg.method in ("prolora", "lora") or (cfg.method == "sora" and cfg.ranks is not None):
            r = cfg.r if cfg.ranks is None else cfg.ranks[path]
            if r == 0:
                continue  # a SoRA module whose every gate closed: no update at all
            kwargs = cfg.layer_kwargs() | dict(r=r, u=r if cfg.method != "prolora" else cfg.u)
            layer = PRoLoRALinear(base, **kwargs, scaling=cfg.scaling)
        elif cfg.method == "vera":
            key = (h, o)
            if key not in shared:
                shared[key] = vera.projections(h, o, cfg.r, cfg.vera_seed, device_of(base))
            layer = vera.VeRALinear(base, cfg.r, shared[key], cfg.vera_d_init, cfg.dropout)
        elif cfg.method == "tied-lora":
            group = tied_lora.group_of(kind)
            if group not in shared:
                o_max = max(b.out_features for p, b in bases.items()
                            if tied_lora.group_of(p.rsplit(".", 1)[-1]) == group)
                shared[group] = tied_lora.shared_params(h, o_max, cfg.r, device_of(base))
            layer = tied_lora.TiedLoRALinear(base, cfg.r, group, shared[group], cfg.alpha, cfg.dropout)
        elif cfg.method == "sora":
            layer = sora.SoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.sora_lambda,
                                    cfg.sora_max_lambda, cfg.sora_stages)
        else:  # prilora
            r = (cfg.ranks[path] if cfg.ranks is not None
                 else prilora.rank_ramp(*cfg.prilora_ranks, num_blocks)[block_index(path)])
            layer = prilora.PRILoRALinear(base, r, cfg.scaling, cfg.dropout, cfg.prune_every,
                                          cfg.prune_fraction, cfg.max_sparsity)
        layers[path] = layer
    return layers


def inject(model: nn.Module, cfg: AdapterConfig) -> dict[str, AdapterLayer]:
    """Wrap every target linear layer, freeze everything else. Returns the new layers by path."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.targets)
    found = {name: mod for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear)}
    missing = targets - {name.rsplit(".", 1)[-1] for name in found}
    if missing:
        raise UserError(f"the model has no {', '.join(sorted(missing))} layers to adapt")
    layers = build_layers(cfg, found)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        # New modules start in training mode; follow the model's mode so eval() models stay exact.
        layer.train(found[name].training)
        model.get_submodule(parent_name).register_module(child, layer)
    return layers


def remove_adapters(model: nn.Module) -> None:
    """Put the plain base layers back (undoing inject), e.g. to evaluate the next adapter."""
    for name, layer in adapter_layers(model).items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, layer.base_layer)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdapterLayer)}


def layers_state(layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    """Every saved tensor: '<module path>.<name>' per module, plus the shared ones once."""
    state = {}
    for name, layer in layers.items():
        state.update({f"{name}.{k}": v.detach() for k, v in layer.state().items()})
        state.update({k: v.detach() for k, v in layer.shared_state().items()})
    return state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return layers_state(adapter_layers(model))


def expected_shapes(layers: dict[str, AdapterLayer]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, layer in layers.items():
        out.update({f"{name}.{k}": shape for k, shape in layer.state_shapes().items()})
        out.update({k: tuple(v.shape) for k, v in layer.shared_state().items()})
    return out


def check_state(layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> None:
    """Fail on the first module whose tensors are missing, extra or the wrong shape."""
    expected = expected_shapes(layers)
    for key, shape in expected.items():
        module = key.rsplit(".", 1)[0]
        if key not in state:
            raise UserError(f"adapter does not match the base model: no tensor {key} for module {module}")
        got = tuple(state[key].shape)
        if got != tuple(shape):
            raise UserError(f"adapter does not match the base model at module {module}: "
                            f"{key.rsplit('.', 1)[1]} is {_fmt(got)} in the adapter, "
                            f"the base model needs {_fmt(shape)}")
    known = set(expected) | {f"{name}.{k}" for name, layer in layers.items() for k in layer.state()}
    extra = sorted(set(state) - known)
    if extra:
        raise UserError(f"adapter does not match the base model: it has {extra[0]}, "
                        f"but the base model has no such adapted module")


def load_layers_state(layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> None:
    check_state(layers, state)
    with torch.no_grad():
        for name, layer in layers.items():
            prefix = f"{name}."
            try:
                layer.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            except ValueError as e:
                raise UserError(f"adapter tensors of module {name} are inconsistent: {e}") from None
            for key, value in layer.shared_state().items():
                value.copy_(state[key])


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    load_layers_state(adapter_layers(model), state)


def saved_config(cfg: AdapterConfig, layers: dict[str, AdapterLayer]) -> AdapterConfig:
    """The config to write beside these layers: module sizes, and ranks where they vary."""
    from dataclasses import replace

    modules = {name: [layer.in_features, layer.out_features] for name, layer in layers.items()}
    ranks = cfg.ranks
    if cfg.method == "prilora":
        ranks = {name: layer.r for name, layer in layers.items()}
    return replace(cfg, modules=modules, ranks=ranks)


def finalize(model: nn.Module, cfg: AdapterConfig) -> AdapterConfig:
    """The adapter a finished run saves. SoRA: remove the ranks whose gate is zero, fold the gate
    into B, and leave a plain LoRA of its own rank per module (none where every gate closed).
    Other methods are saved as trained. Returns the config that describes the result."""
    from dataclasses import replace

    from prolora_cli.adapters.sora import SoRALinear

    layers = adapter_layers(model)
    if cfg.method != "sora" or cfg.ranks is not None:
        return cfg
    ranks, compact = {}, {}
    for name, layer in layers.items():
        assert isinstance(layer, SoRALinear)
        a, b = layer.compact()
        ranks[name] = a.shape[0]
        compact[name] = (layer, a, b)
    done = replace(cfg, ranks=ranks)
    remove_adapters(model)
    new_layers = inject(model, done)
    with torch.no_grad():
        for name, layer in new_layers.items():
            old, a, b = compact[name]
            layer.A_unshared.copy_(a)
            layer.B_unshared.copy_(b)
            layer.train(old.training)
    return done


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        # bitsandbytes packs two 4-bit values per byte; its quant_state knows the real shape.
        qs = getattr(p, "quant_state", None)
        total += qs.shape.numel() if qs is not None else p.numel()
    return trainable, total


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)
