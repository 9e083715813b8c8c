"""PEFT LoRA adapters: export (expand PRoLoRA exactly into plain A and B) and import (u = r)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from prolora_cli.config import ALL_TARGETS, AdapterConfig
from prolora_cli.errors import UserError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules


def standalone_layers(cfg: AdapterConfig, state: dict) -> dict:
    """Rebuild each adapted module from the adapter alone (no base model): {path: AdapterLayer}.

    The base layers are meta-device stand-ins that only carry the sizes, which the config records
    per module (adapters from before that record read them off the unshared PRoLoRA tensors).
    """
    from torch import nn

    from prolora_cli.inject import build_layers, load_layers_state

    def natural(path):  # layers.2 before layers.10, projections in LLaMA's order
        parts = path.split(".")
        kind = ALL_TARGETS.index(parts[-1]) if parts[-1] in ALL_TARGETS else len(ALL_TARGETS)
        return [int(p) if p.isdigit() else -1 for p in parts[:-1]], kind, path

    sizes = cfg.modules
    if sizes is None:
        paths = {key.rsplit(".", 1)[0] for key in state}
        try:
            sizes = {p: [state[f"{p}.A_unshared"].shape[1], state[f"{p}.B_unshared"].shape[0]] for p in paths}
        except KeyError as e:
            raise UserError(f"adapter tensors are incomplete: no {e.args[0]}") from None
    bases = {p: nn.Linear(h, o, bias=False, device="meta") for p, (h, o) in sorted(sizes.items(),
                                                                                   key=lambda kv: natural(kv[0]))}
    layers = build_layers(cfg, bases)
    load_layers_state(layers, state)
    return layers


def export_peft(adapter: str | Path, output: str | Path, scale_into_b: bool = False,
                overwrite: bool = False) -> dict:
    from safetensors.torch import save_file

    from prolora_cli.adapter_files import read_config, read_tensors
    from prolora_cli.fileio import atomic_dir, check_output_free

    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in standalone_layers(cfg, state).items():
        a, b = layer.factors()  # every method is a LoRA once expanded, gated or masked
        scaling = layer.scaling
        if scale_into_b:  # for servers that ignore lora_alpha: scaling becomes 1
            b, scaling = b * scaling, 1.0
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().contiguous()
        ranks[path], alphas[path] = a.shape[0], scaling * a.shape[0]  # PEFT scales by alpha / r
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [t for t in ALL_TARGETS if any(p.endswith("." + t) for p in ranks)],
        "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": cfg.base_model, "inference_mode": True,
        # Per-module exceptions, by full module path (PEFT matches a pattern at a name's end).
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return {"output": str(output), "modules": len(tensors) // 2, "r": r, "lora_alpha": alpha,
            "per_module_ranks": len(peft_config["rank_pattern"]) > 0}


def import_peft(peft_dir: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    """A PEFT LoRA adapter as a prolora adapter with u = r (exactly the same dW)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from prolora_cli.adapter_files import save_adapter_tensors
    from prolora_cli.fileio import atomic_dir, check_output_free

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
    state, targets = {}, set()
    for key, value in tensors.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"{weights_path}: unexpected tensor {key} (only lora_A/lora_B import)")
        path = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        if path.rsplit(".", 1)[-1] not in ALL_TARGETS:
            raise UserError(f"{weights_path}: module {path} is not a LLaMA projection prolora adapts")
        targets.add(path.rsplit(".", 1)[-1])
        if key.endswith("lora_A.weight"):
            state[f"{path}.A_unshared"] = value.float()
            state[f"{path}.A_shared"] = value.new_zeros((0, value.shape[1])).float()
        else:
            state[f"{path}.B_unshared"] = value.float()
            state[f"{path}.B_shared"] = value.new_zeros((value.shape[0], 0)).float()
    cfg = AdapterConfig(r=r, u=r, m=1, n=1, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0.0),
                        targets=[t for t in ALL_TARGETS if t in targets],
                        base_model=pc.get("base_model_name_or_path") or "")
    cfg.check()
    standalone_layers(cfg, state)  # every module complete and of the right shape
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_adapter_tensors(tmp, cfg, state)
    return {"output": str(output), "modules": len(state) // 4, "r": r, "alpha": alpha}
