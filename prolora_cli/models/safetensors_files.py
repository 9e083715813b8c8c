"""A safetensors checkpoint folder, read and written one tensor at a time.

Why not `safetensors.safe_open` / `save_file`: pages read through safe_open's memory map count toward
the process's RSS until the file is closed (a whole shard, 5-50 GB), and `save_file` needs a whole
shard in memory. The format is simple (an 8-byte little-endian header length, a JSON header, then raw
little-endian bytes), so here tensors are read with plain file reads and written as their bytes
arrive: memory holds the tensor in hand, never a shard. Files written here are checked with
safetensors' own parser (`merge/verify.check_structure`).

The CLI reads DEFAULT_MAX_SHARD_SIZE from here for `merge --help`, so torch loads inside functions.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

from prolora_cli.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers 4's default and the Hub's norm (transformers 5 writes 50GB)
FLOATS = ("F64", "F32", "F16", "BF16")
SHORT_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
COPY_CHUNK = 64 << 20  # bytes per read when a tensor is copied through unchanged


# safetensors' dtype names and torch's; torch_dtype and dtype_name are the two directions of this table.
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def torch_dtype(name: str):
    import torch

    if name not in TORCH_NAMES:
        raise UserError(f"tensors of dtype {name} are not supported")
    return getattr(torch, TORCH_NAMES[name])


def dtype_name(dtype) -> str:
    return next(name for name, torch_name in TORCH_NAMES.items() if str(dtype) == f"torch.{torch_name}")


# --dtype's names -> torch's.
DTYPES = {short: TORCH_NAMES[stored] for stored, short in SHORT_DTYPES.items()}
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of one .safetensors file, checked against its size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{file} is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{file} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} is corrupted: its header is not JSON") from None
    return header, 8 + n


def file_entries(file: Path) -> dict[str, Entry]:
    header, data_start = read_header(file)
    size = file.stat().st_size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            entry = Entry(file, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file} is corrupted: bad header entry for {key}") from None
        if entry.dtype not in ITEM_SIZE or entry.nbytes != prod(entry.shape) * ITEM_SIZE[entry.dtype]:
            raise UserError(f"{file} is corrupted: {key} has dtype {entry.dtype} and {entry.nbytes} bytes "
                            f"for shape {list(entry.shape)}")
        if entry.end > size:
            raise UserError(f"{file} is truncated: {key} ends at byte {entry.end}, the file has {size}")
        entries[key] = entry
    return entries


class Checkpoint:
    """The tensors of a transformers safetensors folder (one file, or shards and their index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            self.entries = self._from_index(index)
        elif (self.folder / SINGLE_NAME).is_file():
            self.entries = file_entries(self.folder / SINGLE_NAME)
        else:
            raise UserError(f"{self.folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")

    def _from_index(self, index: Path) -> dict[str, Entry]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is corrupted: no weight_map") from None
        entries, shards = {}, {}
        for key, name in weight_map.items():
            if name not in shards:
                if not (self.folder / name).is_file():
                    raise UserError(f"{index} lists shard {name}, which is missing")
                shards[name] = file_entries(self.folder / name)
            if key not in shards[name]:
                raise UserError(f"{index} puts {key} in {name}, which does not hold it")
            entries[key] = shards[name][key]
        for name, held in shards.items():
            unlisted = sorted(set(held) - set(weight_map))
            if unlisted:
                raise UserError(f"{self.folder / name} holds {unlisted[0]}, which {INDEX_NAME} does not list")
        return entries

    def read(self, key: str):
        """One tensor, read with plain file reads into memory of its own (no memory map)."""
        import torch

        entry = self.entries[key]
        buffer = bytearray(entry.nbytes)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            if f.readinto(buffer) != entry.nbytes:
                raise UserError(f"{entry.file} is truncated at {key}")
        if not buffer:
            return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        return torch.frombuffer(buffer, dtype=torch_dtype(entry.dtype)).reshape(entry.shape)

    def chunks(self, key: str):
        """A tensor's raw bytes, a bounded chunk at a time."""
        entry = self.entries[key]
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            left = entry.nbytes
            while left:
                chunk = f.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise UserError(f"{entry.file} is truncated at {key}")
                left -= len(chunk)
                yield chunk

    def dtype(self) -> str | None:
        """'fp32', 'bf16' or 'fp16': what most of its floating numbers are stored in."""
        counts: Counter = Counter()
        for e in self.entries.values():
            if e.dtype in SHORT_DTYPES:
                counts[SHORT_DTYPES[e.dtype]] += prod(e.shape)
        return counts.most_common(1)[0][0] if counts else None


def shard_plan(layout: dict[str, tuple[str, tuple[int, ...]]], max_shard_size: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most max_shard_size bytes; a bigger tensor goes alone."""
    shards, size = [[]], 0
    for key, (dtype, shape) in layout.items():
        nbytes = prod(shape) * ITEM_SIZE[dtype]
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def parse_size(size: int | str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size.strip() if isinstance(size, str) else size)
    except ValueError:
        raise UserError(f"--max-shard-size: cannot read {size!r} (like 5GB, 500MB or a number of bytes)") from None
    if value <= 0:
        raise UserError(f"--max-shard-size must be positive, got {size!r}")
    return value


def write_checkpoint(folder: Path, layout: dict[str, tuple[str, tuple[int, ...]]], tensors,
                     max_shard_size: int) -> dict:
    """Write tensors as transformers-style shards and index, streaming each tensor's bytes.

    `layout` = {key: (dtype, shape)} in file order; `tensors` yields (key, bytes-like chunks) in that
    order. Returns the index written (one file: the same dict, without writing an index file).
    """
    shards = shard_plan(layout, max_shard_size)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    stream = iter(tensors)
    for name, keys in zip(names, shards):
        header, offset = {}, 0
        for key in keys:
            dtype, shape = layout[key]
            nbytes = prod(shape) * ITEM_SIZE[dtype]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key in keys:
                got_key, chunks = next(stream)
                assert got_key == key, (got_key, key)
                written = sum(f.write(chunk) for chunk in chunks)
                if written != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
                    raise RuntimeError(f"{key}: wrote {written} bytes, the header says otherwise")
            f.flush()
            os.fsync(f.fileno())  # durable before the folder is renamed into place
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if len(shards) > 1:
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


def tensor_bytes(tensor) -> memoryview:
    """A CPU tensor's bytes as stored in safetensors (little-endian, C order), without a copy."""
    import torch

    t = tensor.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())
