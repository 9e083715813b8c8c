"""The `prolora` command line: parse flags, call the core, print. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prolora_cli import __version__
from prolora_cli.errors import UserError

app = typer.Typer(
    help="Fine-tune LLaMA-family models with PRoLoRA, then merge, evaluate and inspect the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

# Flags shared by the commands that build an adapter.
RANK = typer.Option(8, "--rank", "-r", help="Rank r of dW.")
UNSHARED = typer.Option(None, "--unshared", "-u", help="Unshared ranks u (default: = rank, i.e. plain LoRA).")
SHARE = typer.Option(None, "--share", "-m", help="Sharing ratio m of A (default: rank - unshared).")
SHARE_B = typer.Option(None, "--share-b", "-n", help="Sharing ratio n of B (default: m).")
TARGETS = typer.Option("all", "--targets", help="Layers to adapt: q,k,v,o,gate,up,down or 'all'.")
BROADCAST = typer.Option("hidden", "--broadcast", help="Broadcast copies along 'hidden' (paper) or 'rank'.")
ROTATION = typer.Option("rank", "--rotation", help="Rotate copies along 'rank' (paper), 'hidden', or 'none'.")
INIT = typer.Option("rectified", "--init", help="'rectified' (fan-in of the full layer) or 'vanilla'.")


def _not_yet(name: str) -> None:
    raise UserError(f"`prolora {name}` is not implemented yet")


@app.command("count-params")
def count_params_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Preset (llama2-7b, llama2-13b, llama2-70b, "
                                        "smollm2-135m), model folder, config.json or .gguf. Default: smollm2-135m."),
    rank: int = RANK, unshared: Optional[int] = UNSHARED, share: Optional[int] = SHARE,
    share_b: Optional[int] = SHARE_B, targets: str = TARGETS, broadcast: str = BROADCAST,
    budget: Optional[str] = typer.Option(None, "--budget", help="List settings that fit N params (5M, 4997120)."),
    max_rank: int = typer.Option(64, "--max-rank", help="With --budget: the highest rank to consider."),
    top: int = typer.Option(15, "--top", help="With --budget: how many ranks to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Count trainable parameters for a setting, or find settings that fit a budget. Loads no weights."""
    from prolora_cli.arch import resolve_architecture
    from prolora_cli.config import AdapterConfig, parse_targets
    from prolora_cli.planner import fit_budget, parse_count, plan

    arch = resolve_architecture(model)
    if budget is not None:
        rows = fit_budget(arch, parse_targets(targets), parse_count(budget), max_rank, top)
        if as_json:
            out.print_json(json.dumps({"model": arch.name, "budget": parse_count(budget), "settings": rows}))
            return
        table = Table(title=f"Best PRoLoRA setting per rank within {parse_count(budget):,} params "
                            f"on {arch.name}")
        for col in ("r", "u", "m = n", "trainable params", "LoRA-equivalent rank"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(str(row["r"]), str(row["u"]), str(row["m"]), f"{row['trainable_params']:,}",
                          f"{row['equivalent_lora_rank']:.2f}")
        out.print(table)
        if not rows:
            out.print("Nothing fits: the budget is below a rank-1 PRoLoRA at the largest sharing ratio.")
        return
    cfg = AdapterConfig.create(rank, unshared, share, share_b, targets=targets, broadcast=broadcast)
    result = plan(arch, cfg)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"{arch.name}: PRoLoRA r={cfg.r} u={cfg.u} m={cfg.m} n={cfg.n}")
    for col in ("module", "layers", "in x out", "params / layer", "params"):
        table.add_column(col, justify="right")
    for row in result["per_target"]:
        table.add_row(row["target"], str(row["modules"]), f"{row['in_features']} x {row['out_features']}",
                      f"{row['params_per_module']:,}", f"{row['params']:,}")
    table.add_section()
    table.add_row("total", "", "", "", f"{result['trainable_params']:,}")
    out.print(table)
    out.print(f"bytes: {result['bytes_fp32']:,} fp32, {result['bytes_bf16']:,} bf16")
    out.print(f"same budget as LoRA rank {result['equivalent_lora_rank']:.2f}; "
              f"LoRA at rank {cfg.r} would need {result['lora_params_same_rank']:,} params")


@app.command()
def train():
    """Fine-tune a model with PRoLoRA (QLoRA on a 4-bit NF4 base) on chat JSONL."""
    _not_yet("train")


@app.command()
def merge():
    """Merge an adapter's dW into its base model and write a plain transformers model."""
    _not_yet("merge")


@app.command("eval")
def eval_cmd():
    """Evaluate a base model, adapters or a merged model on chat JSONL."""
    _not_yet("eval")


@app.command()
def inspect():
    """Show what an adapter holds: settings, sizes, per-layer norms and ranks."""
    _not_yet("inspect")


def _version(value: bool) -> None:
    if value:
        out.print(f"prolora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user error becomes one line on stderr and exit code 2."""
    try:
        code = app(args=argv, prog_name="prolora", standalone_mode=False)
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # bad flags and arguments (typer's bundled click errors)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "prolora"
        err.print(f"[bold red]error:[/] {where}: {e.format_message()} (see {where} --help)",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
