"""The checks on a written GGUF before it is renamed into place; a failing one writes nothing.

1. structure: the `gguf` package's reader reads the file back: every tensor planned, with its name,
   type and shape, and the metadata llama.cpp needs;
2. function: probes run through base + adapter (unmerged) and through the GGUF's own tensors (read back,
   dequantized, their Q/K rows put back in transformers' order), block by block as `merge --verify
   stream` does, one tensor in memory at a time. f32, f16 and bf16 must agree within a tolerance of the
   largest logit; for q8_0 and q4_0 the agreement of the top token is measured and reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from prolora_cli.errors import VerificationFailed
from prolora_cli.export.gguf_format import decode, heads_of, to_halves
from prolora_cli.merge.verify import DEFAULT_TOLERANCE, compare_runs, probe_inputs
from prolora_cli.merge.weights import stored_key
from prolora_cli.models.loading import empty_model

REQUIRED = ("general.architecture", "general.file_type", "llama.block_count", "llama.context_length",
            "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
            "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.eos_token_id", "tokenizer.chat_template")


def fail(what: str) -> VerificationFailed:
    return VerificationFailed(f"GGUF {what}; nothing was written")


def check_structure(reader: gguf.GGUFReader, planned: list) -> None:
    found = {t.name: t for t in reader.tensors}
    for p in planned:
        t = found.get(p.name)
        if t is None:
            raise fail(f"lacks tensor {p.name}")
        shape = tuple(int(n) for n in reversed(t.shape))  # the reader lists ggml's order, innermost first
        if (t.tensor_type, shape) != (p.qtype, p.shape):
            raise fail(f"tensor {p.name} is {t.tensor_type.name} {list(shape)}, expected {p.qtype.name} {list(p.shape)}")
    if len(found) != len(planned):
        raise fail(f"holds {len(found)} tensors, {len(planned)} were written")
    missing = [k for k in REQUIRED if k not in reader.fields]
    if missing:
        raise fail(f"lacks metadata {missing[0]}")


def gguf_reader_of(path: Path, reader: gguf.GGUFReader, planned: list, model):
    """read(name) -> the named transformers parameter from the file, in fp32 and transformers' row order.
    Plain reads at each tensor's offset: mapping the file would keep every page read in memory."""
    tensors = {t.name: t for t in reader.tensors}
    by_key = {p.key: p for p in planned}
    config = model.config

    def read(name: str):
        p = by_key[stored_key(model, by_key, name, path)]
        t = tensors[p.name]
        with open(path, "rb") as f:
            raw = os.pread(f.fileno(), int(t.n_bytes), int(t.data_offset))
        value = decode(raw, p.qtype, p.shape)
        heads = heads_of(p.name, config)
        return to_halves(value, heads) if heads else value

    return read


def check_gguf(path: Path, planned: list, weights, folder: Path, quant: str, tolerance: float | None) -> dict:
    reader = gguf.GGUFReader(path)
    check_structure(reader, planned)
    candidate = empty_model(folder)
    stats = compare_runs(weights.skeleton, weights.read, candidate, gguf_reader_of(path, reader, planned, candidate),
                         probe_inputs(folder, candidate.config.vocab_size))
    tolerance = DEFAULT_TOLERANCE.get({"f32": "fp32", "f16": "fp16"}.get(quant, quant)) if tolerance is None else tolerance
    if tolerance is not None and not stats["relative_diff"] <= tolerance:  # also catches NaN
        raise fail(f"differs from base + adapter by {stats['max_abs_logit_diff']:.3g} in logits, "
                   f"{stats['relative_diff']:.3g} of the largest logit (tolerance {tolerance:g})")
    if stats["top1_agreement"] != stats["top1_agreement"]:
        raise fail("gives NaN logits")
    return {**stats, "tolerance": tolerance}
