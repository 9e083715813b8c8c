"""Tokenized data cached on disk, so that a rerun, a --resume, or a --dry-run followed by the run reuse it.

An entry is one data source tokenized one way: a folder named by the hash of everything that decides
its content (the source's path with its size and modification time, or a hub dataset's fingerprint;
the tokenizer's full definition; the chat format, --max-seq-len, the system prompt, --data-format,
--skip-bad-lines), holding `data.arrow` (memory-mapped when used) and `meta.json` (what the key was
made of, the counts the run reports). Entries are written beside their name and renamed when
complete; one that does not load, or holds another row count than its meta says, is rebuilt, never
trusted. Packing is not cached: it is computed from the `length` column, which is cheap.

The cache lives in PROLORA_CACHE (default ~/.cache/prolora) under data/, next to the converted models,
or in --cache-dir. Deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from datasets import Dataset

from prolora_cli.data.sources import is_hub_id
from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_dir

VERSION = 1  # of the entry's layout and of what tokenizing does; a change makes every old entry a miss
DATA_NAME, META_NAME = "data.arrow", "meta.json"


def source_stamp(path) -> dict:
    """What identifies a source's content without reading it all: a file's size and modification time
    (every file of a folder), or, for a hub dataset id, its name (the fingerprint is added by the caller)."""
    if is_hub_id(path):
        return {"hub": str(path)}
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: file not found")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    return {"path": str(p.resolve()), "files": [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size,
                                                 f.stat().st_mtime_ns] for f in files]}


def tokenizer_stamp(tokenizer) -> str:
    """A hash of the tokenizer's whole definition (vocabulary, merges, normalisation, special tokens,
    chat template): two tokenizers with one hash encode every text alike."""
    parts = [type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), json.dumps(tokenizer.special_tokens_map,
             sort_keys=True, default=str), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def entry_for(root: Path, key: dict) -> Path:
    return root / hashlib.sha256(json.dumps({"version": VERSION, **key}, sort_keys=True).encode()).hexdigest()[:20]


def load_entry(entry: Path) -> Optional[tuple[Dataset, dict]]:
    """(dataset, meta) of a complete, readable entry; None (and the entry removed) otherwise."""
    if not (entry / META_NAME).is_file():
        return None
    try:
        meta = json.loads((entry / META_NAME).read_text(encoding="utf-8"))
        ds = Dataset.from_file(str(entry / DATA_NAME))
        if len(ds) == meta["rows"]:
            return ds, meta
    except Exception:  # noqa: BLE001 - a truncated or damaged entry of any kind is rebuilt
        pass
    shutil.rmtree(entry, ignore_errors=True)
    return None


def cached(root: Path, key: dict, build: Callable[[Path], tuple[Dataset, dict]],
           say: Callable[[str], None]) -> tuple[Dataset, dict]:
    """The entry for `key`, built by `build(folder)` (which writes DATA_NAME there and returns the dataset
    and its meta) when missing or unreadable. The meta says whether it was reused."""
    entry = entry_for(root, key)
    if entry.exists():
        found = load_entry(entry)
        if found is not None:
            ds, meta = found
            return ds, {**meta, "reused": True, "entry": str(entry)}
        say(f"rebuilding the damaged cache entry {entry}")
    with atomic_dir(entry, overwrite=True) as tmp:
        ds, meta = build(tmp)
        meta = {**meta, "rows": len(ds), "key": key}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        del ds  # the files move: load them again from their final place
    ds, meta = load_entry(entry)
    return ds, {**meta, "reused": False, "entry": str(entry)}
