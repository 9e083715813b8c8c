"""The `prolora` command line: one module per command, which parses flags, calls the core and hands
the result to `render`. Heavy imports (torch, transformers) stay inside the commands, so `--help` is fast."""

from __future__ import annotations

import sys

import typer

from prolora_cli import __version__
from prolora_cli.cli import render
from prolora_cli.cli.chat import chat
from prolora_cli.cli.count_params import count_params
from prolora_cli.cli.evaluate import evaluate
from prolora_cli.cli.export import export, import_peft
from prolora_cli.cli.generate import generate
from prolora_cli.cli.inspect_adapter import inspect
from prolora_cli.cli.merge import merge
from prolora_cli.cli.train import train
from prolora_cli.errors import MachineFault, UserError, VerificationFailed, os_fault
from prolora_cli.models.loading import quiet_imports

app = typer.Typer(
    help="Fine-tune LLaMA-family models with PRoLoRA, then try, evaluate, merge and ship the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("count-params")(count_params)
app.command()(train)
app.command()(merge)
app.command()(export)
app.command("import")(import_peft)
app.command("eval")(evaluate)
app.command()(inspect)
app.command()(chat)
app.command()(generate)


def _version(value: bool) -> None:
    if value:
        render.out.print(f"prolora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user error becomes one line on stderr and exit code 2; a machine fault (a full
    disk, an unwritable file) or a written model that fails its check, one line and exit code 1; an
    interruption, exit code 130. Never a traceback (docs/reliability.md)."""
    quiet_imports()
    try:
        code = app(args=argv, prog_name="prolora", standalone_mode=False)
    except UserError as e:
        if render.rank_zero():  # under torchrun every process hits the same bad input
            render.error(str(e))
        sys.exit(2)
    except (MachineFault, VerificationFailed) as e:
        if render.rank_zero():
            render.error(str(e))
        sys.exit(1)
    except OSError as e:  # one no command turned into a MachineFault itself
        render.error(str(os_fault(e, "I/O error on")))
        sys.exit(1)
    except KeyboardInterrupt:
        render.err.print("interrupted; no partial output was left")
        sys.exit(130)
    except typer.Abort:
        render.err.print("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # bad flags and arguments (typer's bundled click errors)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "prolora"
        render.error(f"{where}: {e.format_message()} (see {where} --help)")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
