"""Parameter budgets from an architecture alone: no weights are loaded."""

from __future__ import annotations

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.errors import UserError
from prolora_cli.methods import get
from prolora_cli.models.arch import Architecture


def plan(arch: Architecture, cfg: AdapterConfig) -> dict:
    """Trainable parameters of `cfg` on `arch`, per target and in total."""
    shapes = {t: arch.linear_shapes()[t] for t in cfg.targets}
    for t, (h, o) in shapes.items():
        try:
            cfg.check(h, o)
        except UserError as e:
            raise UserError(f"{t}: {e}") from None
    per_target, shared = cfg.impl.count(cfg, shapes, arch.num_layers)
    rows = []
    for t, (h, o) in shapes.items():
        per = per_target[t]
        rows.append(dict(target=t, modules=arch.num_layers, in_features=h, out_features=o,
                         params_per_module=per[0] if len(set(per)) == 1 else None, params=sum(per)))
    total = sum(row["params"] for row in rows) + shared
    lora_rank1 = sum(row["modules"] * (row["in_features"] + row["out_features"]) for row in rows)
    return {
        "model": arch.name,
        "method": cfg.method,
        "r": cfg.r,
        **{k: v for k, v in cfg.settings.to_stored().items() if not isinstance(v, dict)},
        "targets": list(cfg.targets),
        "per_target": rows,
        "shared_params": shared,
        "trainable_params": total,
        "bytes_fp32": 4 * total,
        "bytes_bf16": 2 * total,
        "lora_params_same_rank": cfg.r * lora_rank1,
        "equivalent_lora_rank": total / lora_rank1,
        "note": cfg.impl.note,
    }


def parse_count(text: str) -> int:
    """'5M', '4.99m', '250k', '1G', '4997120', '4,997,120' -> an int."""
    s = text.strip().replace(",", "").replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(s[-1:].lower(), 1)
    if mult != 1:
        s = s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise UserError(f"cannot read {text!r} as a parameter count (try 5M or 4997120)") from None
    if value < 1:
        raise UserError(f"budget must be positive, got {text!r}")
    return int(value)


def fit_budget(arch: Architecture, method: str, targets: list[str], budget: int, max_rank: int = 64,
               top: int = 15) -> list[dict]:
    """The method's best setting for each rank within `budget`, highest rank first."""
    impl = get(method)
    if impl.fit_budget is None:
        raise UserError(f"--budget has no settings to search for --method {method}")
    shapes = [arch.linear_shapes()[t] for t in targets]
    return impl.fit_budget(shapes, arch.num_layers, budget, max_rank, top)
