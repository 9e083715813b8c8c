"""PEFT LoRA adapters: export (every method expands exactly into plain A and B) and import (as plain LoRA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prolora_cli.adapter.config import ALL_TARGETS, AdapterConfig
from prolora_cli.adapter.files import read_config, read_tensors, save_adapter_tensors
from prolora_cli.adapter.inject import layers_state, saved_config, standalone_layers
from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_dir, check_output_free, exclusive
from prolora_cli.methods import PLAIN_LORA, get
from prolora_cli.models.loading import loadable_source

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules


def export_peft(adapter: str | Path, output: str | Path, scale_into_b: bool = False,
                overwrite: bool = False) -> dict:
    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    tensors, ranks, alphas = {}, {}, {}
    rslora = cfg.scaling_rule == "rslora" and not scale_into_b
    for path, layer in standalone_layers(cfg, state).items():
        a, b = layer.factors()  # every method is a LoRA once expanded, gated or masked
        scaling = layer.scaling
        if scale_into_b:  # for servers that ignore lora_alpha: scaling becomes 1
            b, scaling = b * scaling, 1.0
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().contiguous()
        # PEFT scales by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
        ranks[path], alphas[path] = a.shape[0], scaling * (math.sqrt(a.shape[0]) if rslora else a.shape[0])
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [t for t in ALL_TARGETS if any(p.endswith("." + t) for p in ranks)],
        "bias": "none", "fan_in_fan_out": False,
        "use_rslora": rslora, "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": loadable_base(cfg.base_model), "inference_mode": True,
        # Per-module exceptions, by full module path (PEFT matches a pattern at a name's end).
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }
    with exclusive(output), atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return {"output": str(output), "modules": len(tensors) // 2, "r": r, "lora_alpha": alpha,
            "base_model_name_or_path": peft_config["base_model_name_or_path"],
            "per_module_ranks": len(peft_config["rank_pattern"]) > 0}


def loadable_base(base_model: str) -> str:
    """A name PEFT and vLLM can load the base from: a preset's hub id, a folder's path, and for a GGUF base
    (the embedded default) the transformers folder it was converted to, which holds the weights the
    adapter was trained on (the hub's original weights are not exactly those: the GGUF is quantized)."""
    if not base_model:
        return base_model
    try:
        return loadable_source(base_model)[0]
    except UserError:  # the base has moved since training: say what the adapter recorded
        return base_model


def import_peft(peft_dir: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    """A PEFT LoRA adapter as a prolora adapter with u = r (exactly the same dW)."""
    peft_dir, output = Path(peft_dir), Path(output)
    check_output_free(output, overwrite)
    config_path, weights_path = peft_dir / PEFT_CONFIG, peft_dir / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{peft_dir} is not a PEFT adapter: it needs {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    try:
        pc = json.loads(config_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise UserError(f"{peft_dir}: cannot read the PEFT adapter ({e})") from None
    if pc.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type is {pc.get('peft_type')!r}; only LORA imports exactly")
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise UserError(f"{config_path}: per-module {key} is not supported")
    if pc.get("use_dora") or pc.get("fan_in_fan_out"):
        raise UserError(f"{config_path}: DoRA and fan_in_fan_out adapters are not plain LoRA")
    r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    if pc.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); prolora by alpha/r
    factors: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"{weights_path}: unexpected tensor {key} (only lora_A/lora_B import)")
        path = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        if path.rsplit(".", 1)[-1] not in ALL_TARGETS:
            raise UserError(f"{weights_path}: module {path} is not a LLaMA projection prolora adapts")
        role = "lora_A" if key.endswith(".lora_A.weight") else "lora_B"
        factors.setdefault(path, {})[role] = value.float()
    for path, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != r or pair["lora_B"].shape[1] != r:
            raise UserError(f"{weights_path}: module {path} needs lora_A ({r} x in) and lora_B (out x {r})")
    cfg = AdapterConfig.create(r, method=PLAIN_LORA, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0.0),
                               targets=sorted({p.rsplit(".", 1)[-1] for p in factors}, key=ALL_TARGETS.index),
                               base_model=pc.get("base_model_name_or_path") or "")
    layers = get(PLAIN_LORA).from_factors(cfg, {p: (f["lora_A"], f["lora_B"]) for p, f in factors.items()})
    with exclusive(output), atomic_dir(output, overwrite=overwrite) as tmp:
        save_adapter_tensors(tmp, saved_config(cfg, layers), layers_state(layers))
    return {"output": str(output), "modules": len(layers), "r": r, "alpha": alpha}
