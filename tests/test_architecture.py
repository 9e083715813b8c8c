"""The shape of the package (docs/architecture.md): flags that stay, imports without cycles, and each
method's names and flags kept inside that method's own files."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

import prolora_cli

PACKAGE = Path(prolora_cli.__file__).parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_flags.json"
# Flags and commands added on purpose since the snapshot was taken: VeRA's d init had no flag, so no VeRA
# run_config.json could repeat its run (issue 28); the adapter records its system prompt, and chat and
# generate try what was trained (issue 29); export writes GGUF (issue 30); --resume-from picks a checkpoint
# (issue 31); --cache-dir keeps tokenized data (issue 33); --loss and --kernels (issue 32).
ADDED = {"train": {"--vera-d-init", "--system-prompt", "--resume-from", "--cache-dir", "--loss", "--kernels"},
         "export": {"--quant", "--base", "--model", "--ollama", "--json"}}
NEW_COMMANDS = {"chat", "generate"}


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
    found = cli_flags()
    assert set(found) == set(expected) | NEW_COMMANDS
    assert {name: found[name] for name in expected} == expected


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that `name` imports, anywhere in the file (inside functions too)."""
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def test_no_module_imports_a_module_that_imports_it_back():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    cycles = []

    def visit(node, trail):
        for nxt in sorted(graph[node]):
            if nxt in trail:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, trail + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert cycles == []


# Method names that are also another format's word: llama.cpp's adapter.type for A/B pairs is "lora".
FORMAT_WORDS = {"lora": ("export/gguf_format.py",)}


def method_files(name: str) -> set[Path]:
    """A method's own files: its package folder (or, for a single-module method, that module)."""
    from prolora_cli.methods import REGISTRY

    spec = importlib.util.find_spec(REGISTRY[name])
    if spec.submodule_search_locations:
        return set(Path(next(iter(spec.submodule_search_locations))).rglob("*.py"))
    return {Path(spec.origin)}


def test_method_names_and_flags_live_only_with_their_method():
    """Adding a method is its own files plus a registry line: no other module names it or its flags
    (docs/architecture.md). "prolora" is also the product's and the adapter format's name, so only its
    flags are checked."""
    from prolora_cli import methods

    registry = Path(methods.__file__)
    for name in methods.names():
        literals = [f"--{flag.replace('_', '-')}" for flag in methods.settings_class(name).flags()]
        assert literals or name in ("lora", "tied-lora"), name  # the test would pass vacuously
        words = literals + ([] if name == "prolora" else [f'"{name}"', f"'{name}'"])
        allowed = method_files(name) | {registry} | {PACKAGE / f for f in FORMAT_WORDS.get(name, ())}
        found = [f"{path.relative_to(PACKAGE)}:{i}: {word}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path not in allowed for i, line in enumerate(path.read_text().splitlines(), 1)
                 for word in words if re.search(re.escape(word) + r"(?![\w-])", line)]
        assert found == [], name
    comparisons = [f"{path.relative_to(PACKAGE)}:{i}" for path in sorted(PACKAGE.rglob("*.py"))
                   for i, line in enumerate(path.read_text().splitlines(), 1)
                   if re.search(r"\bmethod *(==|!=|in) ", line)]
    assert comparisons == []


def test_the_package_is_folders_by_stage():
    top = [p.name for p in PACKAGE.glob("*.py")]
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 8, top
    assert len(packages) >= 5 and "methods" in packages, packages


@pytest.mark.parametrize("name", ["prolora", "sora", "vera"])
def test_method_settings_import_no_torch(name):
    """The CLI builds its method flags from the settings modules, so `--help` must not pull in torch."""
    import subprocess
    import sys

    code = (f"import sys; from prolora_cli import methods; methods.settings_class({name!r}).flags()\n"
            "assert 'torch' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
