"""`prolora inspect`: what an adapter holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render

# The core loads inside the command: `prolora --help` must not import torch.


def inspect(
    adapter: Path = typer.Argument(..., help="Adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: dW heatmap and singular values."),
    module: Optional[str] = typer.Option(None, "--module", help="Module for --plot (path or suffix, "
                                         "e.g. layers.3.self_attn.q_proj). Default: the first."),
):
    """Show what an adapter holds: settings, size against LoRA, per-module norm and rank of dW."""
    from prolora_cli.adapter.inspection import inspect_adapter, plot_module

    info = inspect_adapter(adapter)
    drawn = plot_module(adapter, module, plot) if plot else None
    if as_json:
        render.print_json({**info, "plot": str(plot) if plot else None, "plot_module": drawn})
        return
    render.print_inspection(adapter, info)
    if drawn:
        render.out.print(f"plot of {drawn} written to {plot}", highlight=False)
