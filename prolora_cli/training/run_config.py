"""Runs written down: `prolora train --config run.yaml`, and the run_config.json every run writes.

A config file holds the train command's long flags as keys (`max-seq-len` or `max_seq_len`); flags
given on the command line win. The run_config.json a run writes is such a file (its flags, named as
flags, with resolved values), plus one block under RUN_KEY of facts that are not flags, which the
loader skips: `prolora train --config out/run_config.json --output out2` repeats the run.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import yaml

from prolora_cli.errors import UserError

RUN_KEY = "run"  # facts about a run (base model id, chat format used, adapter config), not flags
NOT_WRITTEN = ("config", "resume", "resume_from", "overwrite", "dry_run", "as_json", "cache_dir")  # what one invocation decides, not the run


def read_config_file(path: str | Path, params: dict) -> dict:
    """{parameter name: value} from a YAML or JSON file. `params` = the command's click parameters by
    name; an unknown key or a value of the wrong shape is one line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                        f"({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        if key == RUN_KEY:
            continue
        name = str(key).lstrip("-").replace("-", "_")
        if name not in params or name == "config":
            raise UserError(f"{path}: unknown key {key!r} (not a flag of this command)")
        repeated = getattr(params[name], "multiple", False)  # --data a --data b: always a list
        if repeated and not isinstance(value, list):
            value = [value]
        scalars = isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)
        if scalars and not repeated:
            value = ",".join(str(v) for v in value)  # targets: [q, v] as --targets q,v
        if isinstance(value, dict) or (isinstance(value, list) and not scalars):
            raise UserError(f"{path}: {key} must be a single value or a list of values, got {type(value).__name__}")
        values[name] = value
    return values


def flag_values(args, adapter_flags: dict) -> dict:
    """What run_config.json holds: every flag of the run with its value, named as on the command line."""
    out = {}
    for f in fields(args):
        if f.name == "adapter" or f.name in NOT_WRITTEN:
            continue
        value = getattr(args, f.name)
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        out[f.name.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    out.update({k.replace("_", "-"): v for k, v in adapter_flags.items()})
    return out
