"""Merge an adapter into its base checkpoint, streaming: one tensor in memory at a time, never the model.

The base is read tensor by tensor from its safetensors files; each adapted weight becomes
(W0 + dW) added in fp32 and rounded once to the output dtype; every other tensor is copied (or
only converted). The output is written into a temporary folder, checked (merge_check), and renamed
into place only if the check passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prolora_cli.models.safetensors_files import DEFAULT_MAX_SHARD_SIZE, FLOATS, INDEX_NAME, SHORT_DTYPES, TORCH_NAMES, Checkpoint
from prolora_cli.errors import UserError
from prolora_cli.models.loading import empty_model

DTYPES = {short: TORCH_NAMES[stored] for stored, short in SHORT_DTYPES.items()}  # --dtype -> torch's name
BASES = ("full", "nf4")
VERIFY = ("stream", "full", "none")
# Weight files a base folder may hold besides its safetensors; never copied into the merged model.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


class VerificationFailed(Exception):
    """The written model does not reproduce base + adapter within the tolerance."""


def nf4_round_trip(weight):
    """A weight as QLoRA's 4-bit base holds it: bitsandbytes NF4 with double quantisation, blocksize
    64 (transformers' BitsAndBytesConfig in `prolora train`), dequantized back to its dtype."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).to(weight.dtype)


class BaseWeights:
    """The base checkpoint as the adapter sees it: what each tensor of the merged model must hold."""

    def __init__(self, ckpt: Checkpoint, base: str, out_dtype: str):
        import torch
        from torch import nn

        self.ckpt = ckpt
        self.skeleton = empty_model(ckpt.folder)
        self.out = getattr(torch, DTYPES[out_dtype])
        # QLoRA quantizes every linear layer but the output head; --base nf4 reproduces exactly that.
        self.quantized = {f"{name}.weight" for name, m in self.skeleton.named_modules()
                          if isinstance(m, nn.Linear) and not name.endswith("lm_head")} if base == "nf4" else set()
        for name, _ in self.skeleton.named_parameters():
            self.key(name)  # a checkpoint missing a weight fails here, before anything is written

    def key(self, name: str) -> str:
        """The checkpoint key holding parameter `name` (a tied head may be stored as the embedding)."""
        if name in self.ckpt.entries:
            return name
        tied = getattr(self.skeleton, "_tied_weights_keys", None)
        if getattr(self.skeleton.config, "tie_word_embeddings", False) and isinstance(tied, dict):
            for head, embedding in tied.items():  # either may be the one stored (the GGUF cache keeps the head)
                other = {head: embedding, embedding: head}.get(name)
                if other in self.ckpt.entries:
                    return other
        raise UserError(f"{self.ckpt.folder}: the checkpoint has no tensor {name}, which its config.json needs")

    def read(self, name: str):
        """A base tensor as the adapter was trained against (NF4 round trip for --base nf4)."""
        w = self.ckpt.read(self.key(name))
        return nf4_round_trip(w) if name in self.quantized else w

    def layout(self) -> dict:
        """{key: (dtype, shape)} of the merged model: the base's tensors in the base's order."""
        from prolora_cli.models.safetensors_files import dtype_name

        out = dtype_name(self.out)
        entries = sorted(self.ckpt.entries.items(), key=lambda kv: (str(kv[1].file), kv[1].start))
        return {k: (out if e.dtype in FLOATS else e.dtype, e.shape) for k, e in entries}


def merged_tensors(weights: BaseWeights, layers: dict, layout: dict):
    """(key, chunks of bytes) for every tensor of the merged model, in layout order."""
    from prolora_cli.methods.base import merged_weight
    from prolora_cli.models.safetensors_files import tensor_bytes

    adapted = {f"{path}.weight": layer for path, layer in layers.items()}
    for key, (dtype, _) in layout.items():
        entry = weights.ckpt.entries[key]
        if key in adapted:
            w = weights.read(key)
            yield key, [tensor_bytes(merged_weight(w, adapted[key].delta_weight(), dtype=weights.out))]
        elif key in weights.quantized or dtype != entry.dtype:
            yield key, [tensor_bytes(weights.read(key).to(weights.out))]  # only floats change dtype
        else:
            yield key, weights.ckpt.chunks(key)  # unchanged: copied byte for byte


def write_config(base: Path, output: Path, dtype: str) -> None:
    """config.json with the merged dtype, and every non-weight file of the base (tokenizer, generation)."""
    from prolora_cli.fileio import write_text_atomic

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = DTYPES[dtype]
    if "torch_dtype" in config:  # the name before transformers 5; keep the two in agreement
        config["torch_dtype"] = DTYPES[dtype]
    write_text_atomic(output / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in base.iterdir():
        if (file.is_file() and file.name not in ("config.json", INDEX_NAME)
                and not file.name.endswith(WEIGHT_SUFFIXES) and not file.name.startswith(".")):
            shutil.copy2(file, output / file.name)


def base_folder(source: str) -> tuple[Path, str]:
    """(a local folder for a base, what it is): the folder itself, a GGUF's cached conversion
    (in fp32, see models.gguf_as_folder), or a hub id's local snapshot."""
    from prolora_cli.models.loading import loadable_source, resolve_source

    path = loadable_source(source)[0]
    if resolve_source(source)[0].endswith(".gguf"):
        return Path(path), "the GGUF's converted cache"
    if Path(path).is_dir():
        return Path(path), "the base checkpoint"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "tokenizer*"])), "the base checkpoint"
    except Exception as e:  # noqa: BLE001 - network, auth and missing repos all mean the same to the user
        raise UserError(f"cannot fetch base model {path}: {str(e).splitlines()[0]}") from None


def merge_adapter(adapter: str | Path, output: str | Path, model: str | None = None, dtype: str = "auto",
                  base: str = "full", overwrite: bool = False, tolerance: float | None = None,
                  verify: str = "stream", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  say=lambda _msg: None) -> dict:
    """Stream-merge into a temporary folder, check it, and only then rename it to `output`.

    Raises VerificationFailed when the check fails; the output folder is then never created.
    """
    from prolora_cli.adapter.files import read_config, read_tensors
    from prolora_cli.models.safetensors_files import parse_size, write_checkpoint
    from prolora_cli.fileio import atomic_dir, check_output_free
    from prolora_cli.adapter.inject import attach
    from prolora_cli.merge.verify import check_merged

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

    say(f"merging {len(layers)} modules into {source} ({base} weights, written as {dtype}, {dtype_from})")
    layout = weights.layout()
    with atomic_dir(output, overwrite=overwrite) as tmp:
        index = write_checkpoint(tmp, layout, merged_tensors(weights, layers, layout), shard_bytes)
        write_config(folder, tmp, dtype)
        checks = check_merged(tmp, weights, layers, layout, cfg, state, verify, tolerance, dtype, say)
    return {"output": str(output), "dtype": dtype, "base": base, "base_model": source, "base_folder": str(folder),
            "base_dtype": ckpt_dtype, "dtype_from": dtype_from, "modules_merged": len(layers), "tensors": len(layout),
            "shards": len(set(index["weight_map"].values())), "total_size": index["metadata"]["total_size"],
            "verify": verify, **checks}
