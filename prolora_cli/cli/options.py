"""Options several commands share, `--config` files, and each method's own flags built from its settings.

Defaults live with what they set (AdapterConfig, TrainArgs, each method's settings); None here means
"not given: the default". Help panels group a command's options so that a reader finds a flag in
`--help` without scrolling through all of them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from prolora_cli import methods
from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.training.run_config import read_config_file

DATA, MODEL_PANEL, ADAPTER, TRAINING, RUN, OUTPUT = "Data", "Model", "Adapter", "Optimisation", "Run and output", "Output"

RANK = typer.Option(AdapterConfig.r, "--rank", "-r", help="Rank r of dW.", rich_help_panel=ADAPTER)
TARGETS = typer.Option(None, "--targets", help="Layers to adapt: q,k,v,o,gate,up,down or 'all' "
                       "(default: the method's; all for most).", rich_help_panel=ADAPTER)
METHOD = typer.Option(methods.DEFAULT, "--method", help=f"Adapter method: {', '.join(methods.names())} "
                      "(see docs/methods.md).", rich_help_panel=ADAPTER)
ALPHA = typer.Option(AdapterConfig.alpha, "--alpha", help="LoRA alpha; scaling = alpha / rank (see --scaling).",
                     rich_help_panel=ADAPTER)
SCALING = typer.Option(AdapterConfig.scaling_rule, "--scaling", help="'standard' (alpha / rank) or 'rslora' "
                       "(alpha / sqrt(rank): the step size no longer shrinks as the rank grows).",
                       rich_help_panel=ADAPTER)
DROPOUT = typer.Option(AdapterConfig.dropout, "--dropout", help="Dropout on the adapter's input.",
                       rich_help_panel=ADAPTER)
MODEL = typer.Option(None, "--model", help="llama2-7b/13b/70b, a hub id, a local folder or a .gguf file. "
                     "Default: the embedded SmolLM2-135M-Instruct.", rich_help_panel=MODEL_PANEL)
ADAPTER_FOLDER = typer.Option(..., "--adapter", "-a", help="Adapter folder (adapter_config.json + "
                              "adapter.safetensors).")


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]):
    """--config: the file's values become the command's defaults, so flags given on the command line win."""
    if value is not None:
        params = {p.name: p for p in ctx.command.params if p.name}
        ctx.default_map = {**(ctx.default_map or {}), **read_config_file(value, params)}
    return value


CONFIG = typer.Option(None, "--config", is_eager=True, callback=load_config, rich_help_panel=RUN,
                      help="A YAML or JSON file of this command's flags (keys: long flag names); flags "
                      "given here win. A run's run_config.json is one.")


def method_parameters(counting_only: bool) -> list[inspect.Parameter]:
    """A keyword parameter per flag that a registered method declares, in a help panel per method;
    `counting_only` keeps the flags that change the number of trainable parameters."""
    found = []
    for name in methods.names():
        for param, (flag, kind, default) in methods.settings_class(name).flags().items():
            if counting_only and not flag.counts:
                continue
            shown = "" if default is None else f" Default: {default}."
            option = typer.Option(None, *flag.names, help=flag.help + shown, rich_help_panel=methods.title(name))
            found.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[kind]))
    names = [p.name for p in found]
    if len(set(names)) != len(names):  # two methods declared one flag: a programming error
        raise RuntimeError(f"method flags declared twice: {sorted({n for n in names if names.count(n) > 1})}")
    return found


def with_method_flags(counting_only: bool = False):
    """Add every method's own flags to a command. Typer reads options from the signature, so the
    wrapper's signature is the command's plus those; their values reach the command in ctx.params."""
    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = set(signature.parameters)

        def wrapper(**values):
            return command(**{k: v for k, v in values.items() if k in own})

        # In --help, the methods' panels follow the common adapter settings.
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
        at = 1 + max((i for i, p in enumerate(params) if getattr(p.default, "rich_help_panel", None) == ADAPTER),
                     default=len(params) - 1)
        wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
        wrapper.__signature__ = signature.replace(
            parameters=[*params[:at], *method_parameters(counting_only), *params[at:]])
        return wrapper
    return decorate


def adapter_config(values: dict) -> AdapterConfig:
    """The adapter that a command's parsed flags describe: the common settings, and the method's own
    flags that were given (a flag of another method is an error naming both)."""
    own = {name: values[name] for name in values if name in method_flag_names() and values[name] is not None}
    return AdapterConfig.create(values.get("rank"), method=values.get("method"), targets=values.get("targets"),
                                alpha=values.get("alpha"), dropout=values.get("dropout"),
                                scaling=values.get("scaling"), **own)


def method_flag_names() -> set[str]:
    return {p.name for p in method_parameters(counting_only=False)}
