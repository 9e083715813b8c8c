"""Merge an adapter into its base checkpoint, streaming: one tensor in memory at a time, never the model.

The base is read tensor by tensor from its safetensors files; each adapted weight becomes
(W0 + dW) added in fp32 and rounded once to the output dtype; every other tensor is copied (or
only converted). The output is written into a temporary folder, checked (merge_check), and renamed
into place only if the check passes.
"""

from __future__ import annotations

import json
import shutil
from math import prod
from pathlib import Path

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import attach
from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_dir, check_free_space, check_output_free, exclusive, write_text_atomic
from prolora_cli.merge.verify import check_merged
from prolora_cli.merge.weights import BASES, BaseWeights, base_folder
from prolora_cli.methods.base import merged_weight
from prolora_cli.models.safetensors_files import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPES,
    INDEX_NAME,
    ITEM_SIZE,
    Checkpoint,
    parse_size,
    tensor_bytes,
    write_checkpoint,
)

VERIFY = ("stream", "full", "none")
# Weight files a base folder may hold besides its safetensors; never copied into the merged model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def merged_value(weights: BaseWeights, adapted: dict, key: str, dtype):
    """One tensor of the merged model as a torch tensor: W0 + dW, added in fp32 and rounded once to `dtype`,
    for an adapted weight; the base's own (as the adapter saw it) in `dtype` for the rest."""
    if key in adapted:
        return merged_weight(weights.read(key), adapted[key].delta_weight(), dtype=dtype)
    return weights.read(key).to(dtype)


def merged_tensors(weights: BaseWeights, layers: dict, layout: dict):
    """(key, chunks of bytes) for every tensor of the merged model, in layout order."""
    adapted = {f"{path}.weight": layer for path, layer in layers.items()}
    for key, (dtype, _) in layout.items():
        entry = weights.ckpt.entries[weights.key(key)]
        if key in adapted or key in weights.quantized or dtype != entry.dtype:  # only floats change dtype
            yield key, [tensor_bytes(merged_value(weights, adapted, key, weights.out))]
        else:
            yield key, weights.ckpt.chunks(weights.key(key))  # unchanged: copied byte for byte


def write_config(base: Path, output: Path, dtype: str, architecture: str) -> None:
    """config.json with the merged dtype and the model class named (engines other than transformers
    need `architectures`), and every non-weight file of the base (tokenizer, generation)."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = DTYPES[dtype]
    config["architectures"] = config.get("architectures") or [architecture]
    if "torch_dtype" in config:  # the name before transformers 5; keep the two in agreement
        config["torch_dtype"] = DTYPES[dtype]
    write_text_atomic(output / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in base.iterdir():
        if (file.is_file() and file.name not in ("config.json", INDEX_NAME)
                and not file.name.endswith(WEIGHT_SUFFIXES) and not file.name.startswith(".")):
            shutil.copy2(file, output / file.name)


def merge_adapter(adapter: str | Path, output: str | Path, model: str | None = None, dtype: str = "auto",
                  base: str = "full", overwrite: bool = False, tolerance: float | None = None,
                  verify: str = "stream", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  say=lambda _msg: None) -> dict:
    """Stream-merge into a temporary folder, check it, and only then rename it to `output`.

    Raises errors.VerificationFailed when the check fails; the output folder is then never created.
    """
    for flag, value, allowed in (("--dtype", dtype, ("auto", *DTYPES)), ("--base", base, BASES),
                                 ("--verify", verify, VERIFY)):
        if value not in allowed:
            raise UserError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    shard_bytes = parse_size(max_shard_size)
    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    source = model or cfg.base_model
    if not source:
        raise UserError(f"{adapter} records no base model; pass --model")
    folder, what = base_folder(source)
    ckpt = Checkpoint(folder)
    ckpt_dtype = ckpt.dtype()
    dtype_from = f"--dtype auto: {what}'s" if dtype == "auto" else "--dtype"
    dtype = (ckpt_dtype or "fp32") if dtype == "auto" else dtype
    weights = BaseWeights(ckpt, base, dtype)
    layers = attach(weights.skeleton, cfg, state)  # names the first module that does not fit this base

    layout = weights.layout()
    check_free_space(output, sum(ITEM_SIZE[d] * prod(shape) for d, shape in layout.values()), "the merged model")
    say(f"merging {len(layers)} modules into {source} ({base} weights, written as {dtype}, {dtype_from})")
    with exclusive(output, say), atomic_dir(output, overwrite=overwrite) as tmp:
        index = write_checkpoint(tmp, layout, merged_tensors(weights, layers, layout), shard_bytes)
        write_config(folder, tmp, dtype, type(weights.skeleton).__name__)
        checks = check_merged(tmp, weights, layers, layout, cfg, state, verify, tolerance, dtype, say)
    return {"output": str(output), "dtype": dtype, "base": base, "base_model": source, "base_folder": str(folder),
            "base_dtype": ckpt_dtype, "dtype_from": dtype_from, "modules_merged": len(layers), "tensors": len(layout),
            "shards": len(set(index["weight_map"].values())), "total_size": index["metadata"]["total_size"],
            "verify": verify, **checks}
