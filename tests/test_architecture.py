"""The shape of the package (docs/architecture.md): flags that stay, imports without cycles, and each
method's names and flags kept inside that method's own files."""

from __future__ import annotations

import json
from pathlib import Path

import prolora_cli

PACKAGE = Path(prolora_cli.__file__).parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_flags.json"
# Flags added on purpose since the snapshot was taken.
ADDED: dict[str, set[str]] = {}


def cli_flags() -> dict:
    import typer

    from prolora_cli.cli import app

    found = {}
    for name, command in typer.main.get_command(app).commands.items():
        flags = sorted(o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
        arguments = sorted(p.name for p in command.params if not any(o.startswith("-") for o in p.opts))
        found[name] = {"flags": flags, "arguments": arguments}
    return found


def test_every_subcommand_keeps_its_flags():
    expected = json.loads(SNAPSHOT.read_text())
    for name, added in ADDED.items():
        expected[name]["flags"] = sorted({*expected[name]["flags"], *added})
    assert cli_flags() == expected
