"""`prolora export` and `prolora import`: adapters in other tools' formats, and back."""

from __future__ import annotations

from pathlib import Path

import typer

from prolora_cli.cli import render
from prolora_cli.cli.options import ADAPTER_FOLDER
from prolora_cli.errors import UserError

# The core loads inside the command: `prolora --help` must not import torch.


def export(
    adapter: Path = ADAPTER_FOLDER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the exported adapter."),
    format: str = typer.Option("peft", "--format", help="Only 'peft' (a standard LoRA adapter) for now."),
    scale_into_b: bool = typer.Option(False, "--scale-into-b", help="Fold alpha/r into B (lora_alpha = r)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Export an adapter as a plain PEFT LoRA adapter (exact: A and B are expanded)."""
    from prolora_cli.adapter.peft_format import export_peft

    if format != "peft":
        raise UserError(f"--format must be 'peft', got {format!r}")
    result = export_peft(adapter, output, scale_into_b, overwrite)
    render.out.print(f"wrote a PEFT LoRA adapter (r={result['r']}, lora_alpha={result['lora_alpha']:g}, "
                     f"{result['modules']} modules) to {result['output']}", highlight=False)


def import_peft(
    peft: Path = typer.Option(..., "--peft", help="A PEFT LoRA adapter folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the prolora adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Import a PEFT LoRA adapter as a prolora adapter with u = r (the same dW)."""
    from prolora_cli.adapter.peft_format import import_peft as read_peft

    result = read_peft(peft, output, overwrite)
    render.out.print(f"imported {result['modules']} modules (r={result['r']}, alpha={result['alpha']:g}) "
                     f"into {result['output']}", highlight=False)
