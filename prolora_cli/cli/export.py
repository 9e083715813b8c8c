"""`prolora export` and `prolora import`: adapters in other tools' formats, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render
from prolora_cli.cli.options import ADAPTER_FOLDER
from prolora_cli.errors import UserError

# The core loads inside the command: `prolora --help` must not import torch.


FORMATS = ("peft", "gguf", "gguf-lora")


def export(
    adapter: Path = ADAPTER_FOLDER,
    output: Path = typer.Option(..., "--output", "-o", help="peft: a folder; gguf, gguf-lora: a .gguf file."),
    format: str = typer.Option("peft", "--format", help="'peft' (a standard LoRA adapter folder), 'gguf' (the "
                               "merged model for llama.cpp, Ollama, LM Studio) or 'gguf-lora' (the adapter alone "
                               "for llama.cpp's --lora)."),
    quant: str = typer.Option("f16", "--quant", help="gguf: f32, f16, bf16, q8_0 or q4_0; gguf-lora: f32, f16 or "
                              "bf16."),
    base: str = typer.Option("full", "--base", help="gguf: merge into the original weights ('full') or their NF4 "
                             "round trip ('nf4', what a QLoRA adapter was trained against)."),
    model: Optional[str] = typer.Option(None, "--model", help="gguf: the base model (default: the one the adapter "
                                        "records)."),
    ollama: bool = typer.Option(False, "--ollama", help="gguf: also write an Ollama Modelfile beside the file."),
    scale_into_b: bool = typer.Option(False, "--scale-into-b", help="peft: fold alpha/r into B (lora_alpha = r)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Export an adapter: a PEFT LoRA adapter (exact), the merged model as GGUF, or the adapter as GGUF."""
    from prolora_cli.adapter.peft_format import export_peft
    from prolora_cli.export.gguf_lora import export_gguf_lora
    from prolora_cli.export.gguf_model import export_gguf

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    say = (lambda _m: None) if as_json else (lambda m: render.out.print(m, highlight=False))
    if format == "peft":
        result = export_peft(adapter, output, scale_into_b, overwrite)
    elif format == "gguf":
        result = export_gguf(adapter, output, quant, base, model, overwrite, ollama, say=say)
    else:
        result = export_gguf_lora(adapter, output, quant, overwrite)
    if as_json:
        render.print_json(result)
    else:
        render.print_export(format, result)


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
