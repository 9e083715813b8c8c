"""Put adapter layers into a transformers model, and move their tensors in and out.

One entry point per direction for every method: `inject` builds the method's layers (and the
tensors its modules share), `adapter_state`/`load_state` move every saved tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from prolora_cli.adapter.config import ALL_TARGETS, AdapterConfig
from prolora_cli.errors import UserError
from prolora_cli.methods.base import AdapterLayer


def build_layers(cfg: AdapterConfig, bases: dict[str, nn.Module]) -> dict[str, AdapterLayer]:
    """One adapter layer per base linear layer, by module path, built by the config's method."""
    for path, base in bases.items():
        try:
            cfg.check(base.in_features, base.out_features)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    return cfg.impl.build_layers(cfg, bases)


def target_layers(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """The linear layers of `model` that the config's targets name, by module path."""
    targets = set(cfg.targets)
    found = {name: mod for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear)}
    missing = targets - {name.rsplit(".", 1)[-1] for name in found}
    if missing:
        raise UserError(f"the model has no {', '.join(sorted(missing))} layers to adapt")
    return found


def inject(model: nn.Module, cfg: AdapterConfig) -> dict[str, AdapterLayer]:
    """Wrap every target linear layer, freeze everything else. Returns the new layers by path."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = target_layers(model, cfg)
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


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every adapter layer of `model` off while inside: the base model alone answers (chat's /base; the
    reference model of a preference objective). A merged adapter cannot be taken out this way."""
    layers = list(adapter_layers(model).values())
    if any(layer.merged for layer in layers):
        raise UserError("the adapter is merged into the weights; unmerge it before turning it off")
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


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


def attach(model: nn.Module, cfg: AdapterConfig, state: dict[str, torch.Tensor]) -> dict[str, AdapterLayer]:
    """Inject the layers a config describes and load their tensors (naming the first misfit)."""
    layers = inject(model, cfg)
    load_layers_state(layers, state)
    return layers


def saved_config(cfg: AdapterConfig, layers: dict[str, AdapterLayer]) -> AdapterConfig:
    """The config to write beside these layers: module sizes, and what the method records."""
    modules = {name: [layer.in_features, layer.out_features] for name, layer in layers.items()}
    return replace(cfg, modules=modules, settings=cfg.impl.record(cfg, layers))


def finalize(model: nn.Module, cfg: AdapterConfig) -> tuple[AdapterConfig, str | None]:
    """Swap in the layers a finished run saves (SoRA: its compacted LoRA), and return the config
    that describes them, with a line for the user if the method has one."""
    layers = adapter_layers(model)
    done, final, message = cfg.impl.finalize(cfg, layers)
    if final is not layers:
        remove_adapters(model)
        for name, layer in final.items():
            parent, _, child = name.rpartition(".")
            layer.train(layers[name].training)
            model.get_submodule(parent).register_module(child, layer)
    return done, message


def standalone_layers(cfg: AdapterConfig, state: dict) -> dict:
    """Rebuild each adapted module from the adapter alone (no base model): {path: AdapterLayer}.

    The base layers are meta-device stand-ins that only carry the sizes, which the config records
    per module (for adapters older than that record, the method reads them off its tensors).
    """
    def natural(path):  # layers.2 before layers.10, projections in LLaMA's order
        parts = path.split(".")
        kind = ALL_TARGETS.index(parts[-1]) if parts[-1] in ALL_TARGETS else len(ALL_TARGETS)
        return [int(p) if p.isdigit() else -1 for p in parts[:-1]], kind, path

    sizes = cfg.modules if cfg.modules is not None else cfg.impl.legacy_module_sizes(state)
    if sizes is None:
        raise UserError("the adapter config records no module sizes (\"modules\")")
    bases = {p: nn.Linear(h, o, bias=False, device="meta") for p, (h, o) in sorted(sizes.items(),
                                                                                   key=lambda kv: natural(kv[0]))}
    layers = build_layers(cfg, bases)
    load_layers_state(layers, state)
    return layers


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
