"""The adapter folder: adapter_config.json plus adapter.safetensors with the trainable tensors only."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.inject import adapter_layers, layers_state, saved_config
from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_path, write_text_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


def save_adapter(folder: str | Path, cfg: AdapterConfig, model) -> Path:
    """Write the adapter of `model` into `folder`."""
    layers = adapter_layers(model)
    return save_adapter_tensors(folder, saved_config(cfg, layers), layers_state(layers))


def save_adapter_tensors(folder: str | Path, cfg: AdapterConfig, state: dict) -> Path:
    """Write config and tensors; each file lands whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # Weights first, config last: a folder with a config always has its weights.
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "prolora"})
    write_text_atomic(folder / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return folder


def read_config(folder: str | Path) -> AdapterConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{folder} is not a prolora adapter: it has no {CONFIG_NAME}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return AdapterConfig.from_dict(d, str(path))


def read_tensors(folder: str | Path) -> dict:
    """The adapter's tensors, read with safetensors (never pickle)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupted or not a safetensors file ({e})") from None
