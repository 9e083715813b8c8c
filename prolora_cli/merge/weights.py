"""The base checkpoint as an adapter sees it: its tensors (through the NF4 round trip for `--base nf4`),
where a base's local folder is, and what each tensor of a merged model must hold."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from torch import nn

from prolora_cli.errors import UserError
from prolora_cli.models.loading import empty_model, loadable_source, resolve_source
from prolora_cli.models.safetensors_files import DTYPES, FLOATS, Checkpoint, dtype_name

BASES = ("full", "nf4")


def nf4_round_trip(weight):
    """A weight as QLoRA's 4-bit base holds it: bitsandbytes NF4 with double quantisation, blocksize
    64 (transformers' BitsAndBytesConfig in `prolora train`), dequantized back to its dtype."""
    import bitsandbytes.functional as bnbf  # slow to import, and only --base nf4 needs it

    q, state = bnbf.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).to(weight.dtype)


def tied_heads(model) -> dict[str, str]:
    """{output head's weight name: input embedding's weight name} when the model ties them."""
    tied = getattr(model, "_tied_weights_keys", None)
    if not getattr(model.config, "tie_word_embeddings", False) or not isinstance(tied, dict):
        return {}
    return dict(tied)


def stored_key(model, entries, name: str, where) -> str:
    """The key under which a checkpoint holds parameter `name` of `model`; a tied pair is stored once,
    under either name."""
    if name in entries:
        return name
    for head, embedding in tied_heads(model).items():
        other = {head: embedding, embedding: head}.get(name)
        if other in entries:
            return other
    raise UserError(f"{where}: the checkpoint has no tensor {name}, which its config.json needs")


class BaseWeights:
    """The base checkpoint as the adapter sees it: what each tensor of the merged model must hold."""

    def __init__(self, ckpt: Checkpoint, base: str, out_dtype: str):
        self.ckpt = ckpt
        self.skeleton = empty_model(ckpt.folder)
        self.out = getattr(torch, DTYPES[out_dtype])
        # QLoRA quantizes every linear layer but the output head; --base nf4 reproduces exactly that.
        self.quantized = {f"{name}.weight" for name, m in self.skeleton.named_modules()
                          if isinstance(m, nn.Linear) and not name.endswith("lm_head")} if base == "nf4" else set()
        for name, _ in self.skeleton.named_parameters():
            self.key(name)  # a checkpoint missing a weight fails here, before anything is written

    def key(self, name: str) -> str:
        """The checkpoint key holding parameter `name` (a tied head may be stored as the embedding, or,
        in folders written before the Hub's convention was kept, the embedding as the head)."""
        return stored_key(self.skeleton, self.ckpt.entries, name, self.ckpt.folder)

    def read(self, name: str):
        """A base tensor as the adapter was trained against (NF4 round trip for --base nf4)."""
        w = self.ckpt.read(self.key(name))
        return nf4_round_trip(w) if name in self.quantized else w

    def layout(self) -> dict:
        """{key: (dtype, shape)} of the merged model: the base's tensors in the base's order, a tied
        weight stored once under the input embedding's name (the Hub's convention, which vLLM and
        llama.cpp's converter need)."""
        out = dtype_name(self.out)
        entries = sorted(self.ckpt.entries.items(), key=lambda kv: (str(kv[1].file), kv[1].start))
        heads = tied_heads(self.skeleton)
        return {heads.get(k, k): (out if e.dtype in FLOATS else e.dtype, e.shape) for k, e in entries}


def base_folder(source: str) -> tuple[Path, str]:
    """(a local folder for a base, what it is): the folder itself, a GGUF's cached conversion
    (in fp32, see models.gguf_as_folder), or a hub id's local snapshot."""
    path = loadable_source(source)[0]
    if resolve_source(source)[0].endswith(".gguf"):
        return Path(path), "the GGUF's converted cache"
    if Path(path).is_dir():
        return Path(path), "the base checkpoint"

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "tokenizer*"])), "the base checkpoint"
    except Exception as e:  # noqa: BLE001 - network, auth and missing repos all mean the same to the user
        raise UserError(f"cannot fetch base model {path}: {str(e).splitlines()[0]}") from None
