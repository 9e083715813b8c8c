"""Put PRoLoRA layers into a transformers model, and move their tensors in and out."""

from __future__ import annotations

import torch
from torch import nn

from prolora_cli.adapters.prolora import PRoLoRALinear, param_shapes
from prolora_cli.config import AdapterConfig
from prolora_cli.errors import UserError

TENSOR_NAMES = ("A_shared", "A_unshared", "B_shared", "B_unshared")


def inject(model: nn.Module, cfg: AdapterConfig) -> dict[str, PRoLoRALinear]:
    """Wrap every target linear layer, freeze everything else. Returns the new layers by path."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.targets)
    found = [(name, mod) for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear)]
    missing = targets - {name.rsplit(".", 1)[-1] for name, _ in found}
    if missing:
        raise UserError(f"the model has no {', '.join(sorted(missing))} layers to adapt")
    layers = {}
    for name, base in found:
        cfg.check(base.in_features, base.out_features)
        parent_name, _, child = name.rpartition(".")
        # New modules start in training mode; follow the model's mode so eval() models stay exact.
        layer = PRoLoRALinear(base, **cfg.layer_kwargs()).train(base.training)
        model.get_submodule(parent_name).register_module(child, layer)
        layers[name] = layer
    return layers


def remove_adapters(model: nn.Module) -> None:
    """Put the plain base layers back (undoing inject), e.g. to evaluate the next adapter."""
    for name, layer in adapter_layers(model).items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, layer.base_layer)


def adapter_layers(model: nn.Module) -> dict[str, PRoLoRALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, PRoLoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only, keyed '<module path>.A_shared' etc."""
    return {f"{name}.{t}": getattr(layer, t).detach()
            for name, layer in adapter_layers(model).items() for t in TENSOR_NAMES}


def expected_shapes(layers: dict[str, PRoLoRALinear]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, layer in layers.items():
        shapes = param_shapes(layer.in_features, layer.out_features, layer.r, layer.u,
                              layer.m, layer.n, layer.broadcast)
        out.update({f"{name}.{t}": shape for t, shape in shapes.items()})
    return out


def check_state(layers: dict[str, PRoLoRALinear], state: dict[str, torch.Tensor]) -> None:
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
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"adapter does not match the base model: it has {extra[0]}, "
                        f"but the base model has no such adapted module")


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = adapter_layers(model)
    check_state(layers, state)
    with torch.no_grad():
        for name, layer in layers.items():
            for t in TENSOR_NAMES:
                getattr(layer, t).copy_(state[f"{name}.{t}"])


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
