"""What an adapter holds: settings, sizes against LoRA, and per module the norm and rank of dW."""

from __future__ import annotations

import math
from pathlib import Path


def singular_values(layer):
    """Singular values of dW = scaling * B @ A from two thin QRs: O(r^2 (h + o)), never o x h."""
    import torch

    a, b = layer.expanded()
    a, b = a.detach().double(), b.detach().double()
    _, r_b = torch.linalg.qr(b)        # B = Q_B R_B
    _, r_a = torch.linalg.qr(a.T)      # A^T = Q_A R_A, so B A = Q_B (R_B R_A^T) Q_A^T
    return torch.linalg.svdvals(r_b @ r_a.T) * layer.scaling


def effective_rank(sv) -> float:
    """Roy & Vetterli's entropy effective rank: exp of the entropy of the normalised spectrum."""
    total = float(sv.sum())
    if total == 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def inspect_adapter(folder: str | Path) -> dict:
    from prolora_cli.adapter_files import WEIGHTS_NAME, read_config, read_tensors
    from prolora_cli.peft_format import standalone_layers

    folder = Path(folder)
    cfg, state = read_config(folder), read_tensors(folder)
    layers = standalone_layers(cfg, state)
    modules, by_type = [], {}
    for path, layer in layers.items():
        sv = singular_values(layer)
        tol = float(sv.max()) * 1e-6 if sv.numel() else 0.0
        params = sum(getattr(layer, t).numel() for t in ("A_shared", "A_unshared", "B_shared", "B_unshared"))
        lora = layer.r * (layer.in_features + layer.out_features)
        kind = path.rsplit(".", 1)[-1]
        modules.append(dict(module=path, type=kind, in_features=layer.in_features,
                            out_features=layer.out_features, params=params,
                            dw_norm=float(sv.square().sum().sqrt()), rank=int((sv > tol).sum()) if tol else 0,
                            effective_rank=effective_rank(sv)))
        t = by_type.setdefault(kind, dict(type=kind, modules=0, in_features=layer.in_features,
                                          out_features=layer.out_features, params=0, lora_params=0,
                                          shapes={name: list(getattr(layer, name).shape) for name in
                                                  ("A_shared", "A_unshared", "B_shared", "B_unshared")}))
        t["modules"] += 1
        t["params"] += params
        t["lora_params"] += lora
    total = sum(m["params"] for m in modules)
    lora_total = sum(t["lora_params"] for t in by_type.values())
    return {
        "adapter": str(folder), "method": cfg.method, "format_version": 1,
        "config": cfg.to_dict(),
        "trainable_params": total, "lora_params_same_rank": lora_total,
        "savings_vs_lora": lora_total / total if total else float("nan"),
        "bytes_on_disk": (folder / WEIGHTS_NAME).stat().st_size,
        "lora_bytes_fp32_same_rank": 4 * lora_total,
        "per_type": list(by_type.values()),
        "per_module": modules,
    }


def plot_module(folder: str | Path, module: str | None, path: str | Path) -> str:
    """A heatmap of one module's dW beside its singular values; returns the module drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from prolora_cli.adapter_files import read_config, read_tensors
    from prolora_cli.errors import UserError
    from prolora_cli.fileio import atomic_path
    from prolora_cli.peft_format import standalone_layers

    layers = standalone_layers(read_config(folder), read_tensors(folder))
    if module is None:
        module = next(iter(layers))
    matches = [p for p in layers if p == module or p.endswith("." + module)]
    if not matches:
        raise UserError(f"no module {module!r} in the adapter; e.g. {next(iter(layers))}")
    name = matches[0]
    layer = layers[name]
    dw = layer.delta_weight().detach()
    sv = torch.linalg.svdvals(dw.double())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    lim = float(dw.abs().max()) or 1.0
    im = ax1.imshow(dw.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax1.set_title(f"dW of {name}\n(r={layer.r}, u={layer.u}, m={layer.m}, n={layer.n})")
    ax1.set_xlabel(f"input feature (h={layer.in_features})")
    ax1.set_ylabel(f"output feature (o={layer.out_features})")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    shown = sv[: max(2 * layer.r, 16)]
    ax2.semilogy(range(1, len(shown) + 1), shown.clamp_min(1e-12).numpy(), marker="o")
    ax2.axvline(layer.r, color="grey", linestyle="--", label=f"r = {layer.r}")
    ax2.set_title("singular values of dW")
    ax2.set_xlabel("index")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return name
