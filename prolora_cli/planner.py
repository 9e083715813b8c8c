"""Parameter budgets from an architecture alone: no weights are loaded."""

from __future__ import annotations

import bisect

from prolora_cli.adapters.prolora import count_params
from prolora_cli.arch import Architecture
from prolora_cli.config import AdapterConfig
from prolora_cli.errors import UserError


def module_params(cfg: AdapterConfig, h: int, o: int, num_layers: int) -> list[int]:
    """Trainable numbers of each block's module of size h -> o (shared tensors excluded)."""
    from prolora_cli.adapters import prilora, sora, tied_lora, vera

    if cfg.method in ("prolora", "lora"):
        return [count_params(h, o, cfg.r, cfg.u, cfg.m, cfg.n, cfg.broadcast)] * num_layers
    if cfg.method == "vera":
        return [vera.count_params(h, o, cfg.r)] * num_layers
    if cfg.method == "tied-lora":
        return [tied_lora.count_params(h, o, cfg.r)] * num_layers
    if cfg.method == "sora":
        return [sora.count_params(h, o, cfg.r)] * num_layers
    return [prilora.count_params(h, o, r) for r in prilora.rank_ramp(*cfg.prilora_ranks, num_layers)]


NOTES = {
    "vera": "VeRA's frozen random A and B are rebuilt from a seed: neither trained nor saved.",
    "sora": "SoRA counts r_max ranks and the gates; the saved adapter keeps only the ranks left open.",
    "prilora": "PRILoRA before pruning; the saved A keeps (1 - max sparsity) of its entries.",
}


def plan(arch: Architecture, cfg: AdapterConfig) -> dict:
    """Trainable parameters of `cfg` on `arch`, per target and in total."""
    from prolora_cli.adapters import tied_lora

    shapes = arch.linear_shapes()
    rows = []
    for t in cfg.targets:
        h, o = shapes[t]
        try:
            cfg.check(h, o)
        except UserError as e:
            raise UserError(f"{t}: {e}") from None
        per = module_params(cfg, h, o, arch.num_layers)
        rows.append(dict(target=t, modules=arch.num_layers, in_features=h, out_features=o,
                         params_per_module=per[0] if len(set(per)) == 1 else None, params=sum(per)))
    shared = 0
    if cfg.method == "tied-lora":  # one A (r x h) and B (o_max x r) per tie group
        groups: dict[str, tuple[int, int]] = {}
        for row in rows:
            g = tied_lora.group_of(row["target"])
            h, o_max = groups.get(g, (row["in_features"], 0))
            groups[g] = (h, max(o_max, row["out_features"]))
        shared = sum(cfg.r * h + o_max * cfg.r for h, o_max in groups.values())
    total = sum(row["params"] for row in rows) + shared
    lora_rank1 = sum(row["modules"] * (row["in_features"] + row["out_features"]) for row in rows)
    return {
        "model": arch.name,
        "method": cfg.method,
        "r": cfg.r, "u": cfg.u, "m": cfg.m, "n": cfg.n, "broadcast": cfg.broadcast,
        "targets": list(cfg.targets),
        "per_target": rows,
        "shared_params": shared,
        "trainable_params": total,
        "bytes_fp32": 4 * total,
        "bytes_bf16": 2 * total,
        "lora_params_same_rank": cfg.r * lora_rank1,
        "equivalent_lora_rank": total / lora_rank1,
        "note": NOTES.get(cfg.method),
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


def fit_budget(arch: Architecture, targets: list[str], budget: int, max_rank: int = 64,
               top: int = 15) -> list[dict]:
    """The best PRoLoRA setting (r, u, m = n) within `budget` for each rank, highest rank first.

    For each r: the most unshared ranks u that fit (partial sharing helps, per the paper), then the
    smallest m (less sharing). m stays <= r - u: past that the rotation repeats itself, so further
    copies add no new directions.
    With broadcast along hidden, params = u * U + (r - u) * S(m), where U = sum(h + o) and
    S(m) = sum(ceil(h/m) + ceil(o/m)), both taken from count_params so the formula lives in one place.
    """
    shapes = [arch.linear_shapes()[t] for t in targets]
    layers = arch.num_layers
    per_unshared = layers * sum(count_params(h, o, 1, 1, 1, 1) for h, o in shapes)
    max_m = min(max_rank, min(min(h, o) for h, o in shapes))
    # S(m) is non-increasing in m; negate it so bisect can search an ascending list.
    neg_shared = [-layers * sum(count_params(h, o, 1, 0, m, m) for h, o in shapes)
                  for m in range(1, max_m + 1)]
    found = []
    for r in range(max_rank, 0, -1):
        for u in range(r, -1, -1):
            r_s, rest = r - u, budget - u * per_unshared
            if rest < 0:
                continue
            if r_s == 0:
                found.append(dict(r=r, u=u, m=1, n=1, trainable_params=u * per_unshared))
                break
            # smallest m with r_s * S(m) <= rest, i.e. -S(m) >= -rest / r_s
            i = bisect.bisect_left(neg_shared, -(rest / r_s))
            if i < min(r_s, max_m):
                params = u * per_unshared - r_s * neg_shared[i]
                found.append(dict(r=r, u=u, m=i + 1, n=i + 1, trainable_params=params))
                break
        if len(found) == top:
            break
    for row in found:
        row["equivalent_lora_rank"] = row["trainable_params"] / per_unshared
    return found
