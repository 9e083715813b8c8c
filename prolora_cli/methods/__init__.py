"""Adapter methods, one module each, found by name here.

Each module exports METHOD (an `adapters.base.Method`). The registry names modules rather than
importing them, so that `prolora --help` and flag parsing stay free of torch. Adding a method is a
new module plus one line below (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

from prolora_cli.errors import UserError

REGISTRY = {
    "prolora": "prolora_cli.methods.prolora.method",
    "lora": "prolora_cli.methods.lora.method",
    "vera": "prolora_cli.methods.vera.method",
    "tied-lora": "prolora_cli.methods.tied_lora.method",
    "sora": "prolora_cli.methods.sora.method",
    "prilora": "prolora_cli.methods.prilora.method",
}
DEFAULT = "prolora"
PLAIN_LORA = "lora"  # what a PEFT LoRA adapter is imported as


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str):
    """The Method registered as `name`."""
    if name not in REGISTRY:
        raise UserError(f"unknown adapter method {name!r}; choose from {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).METHOD
