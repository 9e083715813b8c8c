"""Adapter methods, one module each, found by name here.

Each module exports METHOD (an `adapters.base.Method`). The registry names modules rather than
importing them, so that `prolora --help` and flag parsing stay free of torch. Adding a method is a
new module plus one line below (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

from prolora_cli.errors import UserError

REGISTRY = {
    "prolora": "prolora_cli.adapters.prolora",
    "lora": "prolora_cli.adapters.lora",
    "vera": "prolora_cli.adapters.vera",
    "tied-lora": "prolora_cli.adapters.tied_lora",
    "sora": "prolora_cli.adapters.sora",
    "prilora": "prolora_cli.adapters.prilora",
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
