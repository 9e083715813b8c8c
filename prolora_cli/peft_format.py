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
    """Rebuild each adapted module from the adapter alone (no base model): {path: PRoLoRALinear}.

    The base layer is a meta-device stand-in that only carries the sizes, read from the unshared
    tensors (u x h and o x u keep h and o even when u = 0).
    """
    import torch
    from torch import nn

    from prolora_cli.adapters.prolora import PRoLoRALinear
    from prolora_cli.inject import check_state

    def natural(path):  # layers.2 before layers.10, projections in LLaMA's order
        parts = path.split(".")
        kind = ALL_TARGETS.index(parts[-1]) if parts[-1] in ALL_TARGETS else len(ALL_TARGETS)
        return [int(p) if p.isdigit() else -1 for p in parts[:-1]], kind, path

    paths = sorted({key.rsplit(".", 1)[0] for key in state}, key=natural)
    layers = {}
    for path in paths:
        try:
            h = state[f"{path}.A_unshared"].shape[1]
            o = state[f"{path}.B_unshared"].shape[0]
        except KeyError as e:
            raise UserError(f"adapter tensors are incomplete: no {e.args[0]}") from None
        layer = PRoLoRALinear(nn.Linear(h, o, bias=False, device="meta"), **cfg.layer_kwargs())
        layers[path] = layer
    check_state(layers, state)
    with torch.no_grad():
        for path, layer in layers.items():
            for t in ("A_shared", "A_unshared", "B_shared", "B_unshared"):
                getattr(layer, t).copy_(state[f"{path}.{t}"])
    return layers


def export_peft(adapter: str | Path, output: str | Path, scale_into_b: bool = False,
                overwrite: bool = False) -> dict:
    from safetensors.torch import save_file

    from prolora_cli.adapter_files import read_config, read_tensors
    from prolora_cli.fileio import atomic_dir, check_output_free

    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    tensors = {}
    for path, layer in standalone_layers(cfg, state).items():
        a, b = layer.expanded()
        if scale_into_b:  # for servers that ignore lora_alpha: scaling becomes 1
            b = b * layer.scaling
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r,
        "lora_alpha": cfg.r if scale_into_b else cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": cfg.base_model, "inference_mode": True,
    }
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return {"output": str(output), "modules": len(tensors) // 2, "r": cfg.r,
            "lora_alpha": peft_config["lora_alpha"]}


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
