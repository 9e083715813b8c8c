"""`prolora count-params`: trainable parameters of a setting on an architecture, or the settings that
fit a budget. Loads no weights."""

from __future__ import annotations

from typing import Optional

import typer

from prolora_cli.adapter.planner import fit_budget, parse_count, plan
from prolora_cli.cli import render
from prolora_cli.cli.options import ADAPTER, METHOD, OUTPUT, RANK, TARGETS, adapter_config, with_method_flags
from prolora_cli.models.arch import resolve_architecture

BUDGET = "Budget"


@with_method_flags(counting_only=True)
def count_params(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Preset (llama2-7b, llama2-13b, llama2-70b, "
                                        "smollm2-135m), model folder, config.json or .gguf. Default: smollm2-135m.",
                                        rich_help_panel=ADAPTER),
    method: str = METHOD, rank: int = RANK, targets: Optional[str] = TARGETS,
    budget: Optional[str] = typer.Option(None, "--budget", help="List settings that fit N params (5M, 4997120).",
                                         rich_help_panel=BUDGET),
    max_rank: int = typer.Option(64, "--max-rank", help="With --budget: the highest rank to consider.",
                                 rich_help_panel=BUDGET),
    top: int = typer.Option(15, "--top", help="With --budget: how many ranks to list.", rich_help_panel=BUDGET),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.", rich_help_panel=OUTPUT),
):
    """Count trainable parameters for a setting, or find settings that fit a budget. Loads no weights."""
    arch = resolve_architecture(model)
    cfg = adapter_config(ctx.params)
    if budget is not None:
        rows = fit_budget(arch, cfg.method, cfg.targets, parse_count(budget), max_rank, top)
        if as_json:
            render.print_json({"model": arch.name, "budget": parse_count(budget), "settings": rows})
        else:
            render.print_budget(rows, f"Best {cfg.impl.title} setting per rank within {parse_count(budget):,} "
                                      f"params on {arch.name}")
        return
    result = plan(arch, cfg)
    if as_json:
        render.print_json(result)
    else:
        render.print_plan(result, f"{arch.name}: {cfg.impl.title} {cfg.impl.describe(cfg)}")
