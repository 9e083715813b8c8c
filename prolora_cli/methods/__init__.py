"""Adapter methods, one folder each, found by name here.

A method's folder holds settings.py (torch-free: TITLE, and SETTINGS, whose fields declare the
method's flags) and method.py (its layer and METHOD, an `methods.base.Method`). The registry names
folders rather than importing them, so that `prolora --help` and flag parsing read only the settings
and stay free of torch. Adding a method is a new folder plus one line below (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

from prolora_cli.errors import UserError

REGISTRY = {
    "prolora": "prolora_cli.methods.prolora",
    "lora": "prolora_cli.methods.lora",
    "vera": "prolora_cli.methods.vera",
    "tied-lora": "prolora_cli.methods.tied_lora",
    "sora": "prolora_cli.methods.sora",
    "prilora": "prolora_cli.methods.prilora",
}
DEFAULT = "prolora"
PLAIN_LORA = "lora"  # what a PEFT LoRA adapter is imported as


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def _module(name: str, part: str):
    if name not in REGISTRY:
        raise UserError(f"unknown adapter method {name!r}; choose from {', '.join(REGISTRY)}")
    return importlib.import_module(f"{REGISTRY[name]}.{part}")


def get(name: str):
    """The Method registered as `name` (imports torch)."""
    return _module(name, "method").METHOD


def settings_class(name: str):
    """The Settings class of method `name`, without importing torch."""
    return _module(name, "settings").SETTINGS


def title(name: str) -> str:
    """How people write the method's name: "PRoLoRA"."""
    return _module(name, "settings").TITLE
