"""`prolora merge`: dW into the base checkpoint, streamed and checked before it lands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render
from prolora_cli.cli.options import ADAPTER_FOLDER
from prolora_cli.models.safetensors_files import DEFAULT_MAX_SHARD_SIZE

# The core loads inside the command: `prolora --help` must not import torch.


def merge(
    adapter: Path = ADAPTER_FOLDER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged transformers model."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the one the adapter records)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights of the merged model: auto (the base "
                              "checkpoint's dtype), fp32, bf16 or fp16."),
    base: str = typer.Option("full", "--base", help="'full': merge into the original weights; 'nf4': into their "
                             "NF4 round trip, the weights a QLoRA adapter was trained against."),
    verify: str = typer.Option("stream", "--verify", help="'stream': check every tensor and run probes block by "
                               "block, one tensor in memory at a time; 'full': probes through both models "
                               "loaded whole; 'none'."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, "--max-shard-size", help="Largest weight file "
                                       "written (like 5GB or 500MB)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max |logit difference| the check allows, "
                                              "relative to the largest logit (default: 1e-4 fp32, 1e-2 fp16, 6e-2 bf16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Merge an adapter's dW into its base model and write a plain transformers model, streaming."""
    from prolora_cli.merge.stream import merge_adapter

    result = merge_adapter(adapter, output, model, dtype, base, overwrite, tolerance, verify, max_shard_size,
                           say=lambda msg: None if as_json else render.out.print(msg, highlight=False))
    if as_json:
        render.print_json(result)
    else:
        render.print_merge(result)
