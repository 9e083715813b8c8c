"""`prolora generate`: completions for every row of a file, from one or many adapters in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render

# The core loads inside the command: `prolora --help` must not import torch.

INPUT, MODEL, SAMPLING, RUN = "Input and output", "Model and adapters", "Sampling", "Run"


def generate(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Prompts: any file `train --data` reads, and also rows with no "
                              "answer ({\"messages\": [user turns]} or {\"prompt\": ...}). A last assistant turn "
                              "is kept as the row's reference. A row may name its adapter: \"adapter\": NAME, or "
                              "null for the base model.", rich_help_panel=INPUT),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL: a line per input row, in input order.",
                                rich_help_panel=INPUT),
    data_format: str = typer.Option("auto", "--data-format", help="Shape of the records (as train's).",
                                    rich_help_panel=INPUT),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed rows instead of stopping.",
                                        rich_help_panel=INPUT),
    adapter: list[str] = typer.Option([], "--adapter", "-a", help="NAME=DIR (or DIR, named after its folder); "
                                      "repeat to serve several at once, each row getting its own.",
                                      rich_help_panel=MODEL),
    default_adapter: Optional[str] = typer.Option(None, "--default-adapter", help="The adapter of rows that name "
                                                  "none ('base': the base model). Default: the only --adapter.",
                                                  rich_help_panel=MODEL),
    model: Optional[str] = typer.Option(None, "--model", help="The base (default: the one the adapters were "
                                        "trained on) or, without --adapter, any model, merged ones included.",
                                        rich_help_panel=MODEL),
    quant: str = typer.Option("nf4", "--quant", help="Base weights: 'nf4' (as trained) or 'none'.",
                              rich_help_panel=MODEL),
    chat_format: str = typer.Option("auto", "--chat-format", help="'tulu' or 'template' for every row; default: "
                                    "each adapter's, as it was trained.", rich_help_panel=MODEL),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="For every row without a system "
                                                "turn; default: each adapter's, as it was trained.",
                                                rich_help_panel=MODEL),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU.", rich_help_panel=MODEL),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", rich_help_panel=SAMPLING),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy.", rich_help_panel=SAMPLING),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0).",
                                rich_help_panel=SAMPLING),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling.", rich_help_panel=SAMPLING),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per batch (longest first).", rich_help_panel=RUN),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run: its finished rows are kept.",
                                rich_help_panel=RUN),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output (and any partial one).",
                                   rich_help_panel=RUN),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.", rich_help_panel=RUN),
):
    """Generate a completion for every row of a file, with one adapter, several in one batch, or none."""
    from prolora_cli.inference.generate import GenerateArgs, partial_path, run_generate

    args = GenerateArgs.from_flags(ctx.params)
    say = (lambda _m: None) if as_json else (lambda m: render.err.print(m, highlight=False))
    try:
        with render.EvalProgress(render.err, enabled=not as_json) as progress:
            summary = run_generate(args, progress, say)
    except KeyboardInterrupt:
        render.err.print(f"interrupted: finished rows are kept in {partial_path(output)}; continue with the same "
                         f"command and --resume", highlight=False)
        raise typer.Exit(130)
    if as_json:
        render.print_json(summary)
    else:
        render.print_generated(summary)
