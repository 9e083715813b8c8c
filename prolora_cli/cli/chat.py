"""`prolora chat`: talk to a trained adapter (or any model) in the format it was trained on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render

# The core loads inside the command: `prolora --help` must not import torch.

MODEL, SAMPLING = "Model and prompt", "Sampling"


def chat(
    ctx: typer.Context,
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="Adapter folder: its base loads as it "
                                           "was trained (NF4), the adapter on top.", rich_help_panel=MODEL),
    model: Optional[str] = typer.Option(None, "--model", help="A base or merged model (with --adapter: the base "
                                        "to put it on, default the one it records).", rich_help_panel=MODEL),
    quant: str = typer.Option("nf4", "--quant", help="Base weights: 'nf4' (as trained) or 'none'.",
                              rich_help_panel=MODEL),
    chat_format: str = typer.Option("auto", "--chat-format", help="'tulu' or 'template'; default: the adapter's, "
                                    "as it was trained.", rich_help_panel=MODEL),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Default: the adapter's, as it was "
                                                "trained.", rich_help_panel=MODEL),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU.", rich_help_panel=MODEL),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", rich_help_panel=SAMPLING),
    temperature: float = typer.Option(0.7, "--temperature", help="0 is greedy.", rich_help_panel=SAMPLING),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling (with --temperature > 0).",
                                rich_help_panel=SAMPLING),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling.", rich_help_panel=SAMPLING),
):
    """Chat with an adapter or a model: /reset, /base (the base alone, for comparison), /system TEXT, /exit.
    Off a terminal it reads a user turn per line and prints each reply followed by an empty line."""
    from prolora_cli.inference.chat import ChatArgs, open_session

    session, info = open_session(ChatArgs.from_flags(ctx.params))
    interactive = sys.stdin.isatty()
    if interactive:
        render.print_chat_banner(info)
    while True:
        try:
            line = render.out.input("[bold green]you>[/] ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:  # end of input
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line)
            if said is None:
                break
            render.chat_note(said, interactive)
            continue
        if interactive:
            render.out.print("[bold cyan]model>[/] ", end="")
        try:
            session.reply(line, render.write_raw)
        except KeyboardInterrupt:  # at a terminal, Ctrl-C stops this reply, not the chat
            if not interactive:
                raise
            render.write_raw(" (stopped)")
        render.write_raw("\n" if interactive else "\n\n")
