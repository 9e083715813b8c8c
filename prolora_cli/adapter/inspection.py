"""What an adapter holds: settings, sizes against LoRA, and per module the norm and rank of dW."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from prolora_cli.adapter.files import WEIGHTS_NAME, read_config, read_tensors
from prolora_cli.adapter.inject import standalone_layers
from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_path


def singular_values(layer):
    """Singular values of dW = scaling * B @ A from two thin QRs: O(r^2 (h + o)), never o x h."""
    a, b = layer.factors()
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
    folder = Path(folder)
    cfg, state = read_config(folder), read_tensors(folder)
    layers = standalone_layers(cfg, state)
    # Tensors shared by several modules (Tied-LoRA) count once, under the adapter, not per module.
    shared = {k: v for layer in layers.values() for k, v in layer.shared_state().items()}
    modules, by_type = [], {}
    for path, layer in layers.items():
        sv = singular_values(layer)
        tol = float(sv.max()) * 1e-6 if sv.numel() else 0.0
        shared_ids = {id(v) for v in layer.shared_state().values()}
        own = {n: p for n, p in layer.named_parameters()
               if not n.startswith("base_layer.") and id(p) not in shared_ids}
        params = sum(p.numel() for p in own.values())
        stored = sum(v.numel() for v in layer.state().values() if v.is_floating_point())
        rank = layer.rank
        lora = rank * (layer.in_features + layer.out_features)
        kind = path.rsplit(".", 1)[-1]
        row = dict(module=path, type=kind, in_features=layer.in_features, out_features=layer.out_features,
                   adapter_rank=rank, params=params, stored_values=stored,
                   dw_norm=float(sv.square().sum().sqrt()), rank=int((sv > tol).sum()) if tol else 0,
                   effective_rank=effective_rank(sv), **layer.stats())
        modules.append(row)
        t = by_type.setdefault(kind, dict(type=kind, modules=0, in_features=layer.in_features,
                                          out_features=layer.out_features, params=0, lora_params=0,
                                          shapes={name: list(v.shape) for name, v in own.items()}))
        t["modules"] += 1
        t["params"] += params
        t["lora_params"] += lora
    total = sum(m["params"] for m in modules) + sum(v.numel() for v in shared.values())
    lora_total = sum(t["lora_params"] for t in by_type.values())
    return {
        "adapter": str(folder), "method": cfg.method, "settings": cfg.impl.describe(cfg),
        "config": cfg.to_dict(),
        "trainable_params": total, "lora_params_same_rank": lora_total,
        "savings_vs_lora": lora_total / total if total else float("nan"),
        "bytes_on_disk": (folder / WEIGHTS_NAME).stat().st_size,
        "lora_bytes_fp32_same_rank": 4 * lora_total,
        "shared_params": sum(v.numel() for v in shared.values()),
        "per_type": list(by_type.values()),
        "per_module": modules,
    }


def plot_module(folder: str | Path, module: str | None, path: str | Path) -> str:
    """A heatmap of one module's dW beside its singular values; returns the module drawn."""
    # matplotlib picks its backend when pyplot is first imported: Agg first, so no display is needed.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax1.set_title(f"dW of {name}\n({layer.extra_repr()})", fontsize=9)
    ax1.set_xlabel(f"input feature (h={layer.in_features})")
    ax1.set_ylabel(f"output feature (o={layer.out_features})")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    shown = sv[: max(2 * layer.rank, 16)]
    ax2.semilogy(range(1, len(shown) + 1), shown.clamp_min(1e-12).numpy(), marker="o")
    ax2.axvline(layer.rank, color="grey", linestyle="--", label=f"r = {layer.rank}")
    ax2.set_title("singular values of dW")
    ax2.set_xlabel("index")
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return name
