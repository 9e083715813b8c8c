"""What `generate` is asked for: the adapters given (`--adapter NAME=DIR`), and the rows of the input file,
each a prompt, its reference answer if it had one, and the adapter it names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prolora_cli.adapter.files import read_config
from prolora_cli.data.sources import read_data
from prolora_cli.errors import UserError
from prolora_cli.inference.mixed import ResidentAdapter

BASE = "base"  # the name that asks for the base model alone; no adapter may take it
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class Request:
    index: int                  # its place in the input, from 0
    unit: str                   # "line" (JSONL) or "row" (tables)
    position: int               # its line or row number in the input file
    messages: list[dict]        # the conversation to answer
    reference: Optional[str]    # the answer the input held, if any
    adapter: Optional[str]      # the adapter's name; None: the base model

    @property
    def at(self) -> str:
        return f"{self.unit} {self.position}"


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """--adapter NAME=DIR (or DIR alone, named after its folder) -> {name: folder}."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not NAME.fullmatch(name):
            name, folder = Path(spec).name, spec
        if not NAME.fullmatch(name) or name == BASE:
            raise UserError(f"--adapter {spec}: an adapter's name is letters, digits, '-' and '_', and not "
                            f"{BASE!r} (give it one with NAME=DIR)")
        if name in adapters:
            raise UserError(f"--adapter: two adapters are named {name!r}; give them different names (NAME=DIR)")
        adapters[name] = Path(folder)
    return adapters


def read_adapters(folders: dict[str, Path]) -> list[ResidentAdapter]:
    """Every adapter's config and weight file header, read before the model loads (a bad folder fails in
    a second); they must all have been trained on the same base model."""
    resident = [ResidentAdapter.open(name, folder, read_config(folder)) for name, folder in folders.items()]
    bases = {a.cfg.base_model for a in resident}
    if len(bases) > 1:
        first, other = resident[0], next(a for a in resident if a.cfg.base_model != resident[0].cfg.base_model)
        raise UserError(f"adapters for different base models: {first.name} was trained on {first.cfg.base_model}, "
                        f"{other.name} on {other.cfg.base_model}; serve them from separate runs")
    return resident


def default_adapter(names: list[str], default: Optional[str]) -> Optional[str]:
    """The adapter for rows that name none: --default-adapter, or the only adapter given."""
    if default is not None:
        if default != BASE and default not in names:
            raise UserError(f"--default-adapter {default}: no --adapter has that name ({', '.join(names) or 'none'})")
        return None if default == BASE else default
    return names[0] if len(names) == 1 else None


def read_requests(path: Path, names: list[str], default: Optional[str], data_format: str,
                  skip_bad_lines: bool) -> tuple[list[Request], int]:
    """Every row of the input as a Request, and how many bad rows were skipped. A last assistant turn
    becomes the reference; a row must end with a user turn to answer."""
    records, skipped = read_data(path, skip_bad_lines, data_format, prompt_only=True)
    chosen = default_adapter(names, default)
    requests = []
    for index, record in enumerate(records):
        unit = "line" if "line" in record else "row"
        at = f"{unit} {record[unit]}"
        messages, reference = record["messages"], None
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
        if not messages or messages[-1]["role"] != "user":
            raise UserError(f"{path}, {at}: nothing to answer (the conversation must end with a user turn)")
        adapter = adapter_of(record, names, chosen, path, at)
        requests.append(Request(index, unit, record[unit], messages, reference, adapter))
    return requests, skipped


def adapter_of(record: dict, names: list[str], chosen: Optional[str], path: Path, at: str) -> Optional[str]:
    if "adapter" not in record:
        if len(names) > 1 and chosen is None:
            raise UserError(f"{path}, {at}: the row names no adapter and there are several; add an \"adapter\" "
                            f"field or pass --default-adapter NAME")
        return chosen
    name = record["adapter"]
    if name is None or name == BASE:
        return None
    if name not in names:
        raise UserError(f"{path}, {at}: adapter {name!r} is not one of the --adapter given "
                        f"({', '.join(names) or 'none'})")
    return name
