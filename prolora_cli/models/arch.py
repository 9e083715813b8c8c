"""Model architectures: the built-in presets and reading one from a config.json, without weights.

On the CLI's `--help` path (count-params' options): transformers loads only to read a GGUF header."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prolora_cli.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Architecture:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0  # 0: unknown

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LLaMA block's linear layers."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim  # grouped-query attention: narrower k and v
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


def _arch(name, layers, hidden, inter, heads, kv_heads, vocab):
    return Architecture(name, layers, hidden, inter, heads, kv_heads, hidden // heads, vocab)


# Real architectures, so budgets can be planned without downloading anything.
PRESETS = {
    "llama2-7b": _arch("llama2-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama2-13b": _arch("llama2-13b", 40, 5120, 13824, 40, 40, 32000),
    "llama2-70b": _arch("llama2-70b", 80, 8192, 28672, 64, 8, 32000),
    "smollm2-135m": _arch("smollm2-135m", 30, 576, 1536, 9, 3, 49152),
}

# What each preset loads as a model (`prolora train --model llama2-7b`).
HUB_IDS = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
}


def from_config_dict(d: dict, name: str) -> Architecture:
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        return Architecture(
            name=name,
            num_layers=int(d["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            vocab_size=int(d.get("vocab_size") or 0),
        )
    except KeyError as e:
        raise UserError(f"{name}: config has no {e.args[0]!r}; is it a LLaMA-architecture model?") from None
    except (TypeError, ValueError):
        raise UserError(f"{name}: config has a non-integer size") from None


def resolve_architecture(model: str | None) -> Architecture:
    """A preset name, a model folder, a config.json or a .gguf file -> its architecture."""
    model = model or DEFAULT_MODEL
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {model}")
        from transformers import AutoConfig  # reads the GGUF header only

        try:
            cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise UserError(f"{model}: cannot read GGUF header ({e})") from None
        return from_config_dict(cfg.to_dict(), model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        known = ", ".join(PRESETS)
        raise UserError(f"model {model!r} is not a preset ({known}), a model folder or a config.json")
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    return from_config_dict(d, model)
