"""`prolora export --format gguf`: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

The same streaming merge as `prolora merge` (merge/stream.py): each tensor of the base is read, gets its
dW if adapted (added in fp32), is reordered for llama.cpp if it is a query or key projection, encoded
(f32, f16, bf16, or quantized with the `gguf` package's own Q8_0 / Q4_0), and written; one tensor is in
memory at a time. The file is written beside its final name and checked (export/gguf_check.py) before
it is renamed into place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from transformers import AutoTokenizer

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import attach
from prolora_cli.adapter.prompting import adapter_prompting
from prolora_cli.errors import UserError
from prolora_cli.export.gguf_check import check_gguf
from prolora_cli.export.gguf_format import (
    FILE_TYPES,
    Q,
    check_quant,
    encode,
    gguf_name,
    heads_of,
    hyperparameters,
    nbytes,
    tensor_type,
    to_interleaved,
    write_tensor,
)
from prolora_cli.export.gguf_tokenizer import chat_facts, write_tokenizer
from prolora_cli.export.ollama import modelfile_text, write_modelfile
from prolora_cli.fileio import atomic_path, check_free_space, check_output_free, exclusive
from prolora_cli.merge.stream import merged_value
from prolora_cli.merge.weights import BASES, BaseWeights, base_folder
from prolora_cli.models.loading import quiet_libraries, resolve_source
from prolora_cli.models.safetensors_files import Checkpoint


@dataclass
class Planned:
    name: str            # llama.cpp's
    key: str             # the merged model's (transformers')
    shape: tuple[int, ...]
    qtype: Q


def plan(weights: BaseWeights, quant: str) -> list[Planned]:
    """Every tensor of the merged model, named and typed for llama.cpp (a tied head is the embedding)."""
    blocks = weights.skeleton.config.num_hidden_layers
    found = []
    for key, (_, shape) in weights.layout().items():
        name = gguf_name(key, blocks)
        found.append(Planned(name, key, tuple(shape), tensor_type(name, tuple(shape), quant)))
    return found


def write(path: Path, planned: list[Planned], metadata: Callable[[gguf.GGUFWriter], None], tensor_of) -> None:
    """A GGUF file: metadata, the tensors' table, then each tensor as `tensor_of(planned)` gives it."""
    writer = gguf.GGUFWriter(path, "llama")
    try:
        metadata(writer)
        for p in planned:
            writer.add_tensor_info(p.name, p.shape, np.float32, nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            write_tensor(writer, tensor_of(p))
    finally:
        writer.close()


def export_gguf(adapter: str | Path, output: str | Path, quant: str = "f16", base: str = "full",
                model: str | None = None, overwrite: bool = False, ollama: bool = False,
                tolerance: float | None = None, say=lambda _msg: None) -> dict:
    """Merge `adapter` into its base and write the result as a checked GGUF file (and an Ollama Modelfile)."""
    quiet_libraries()
    check_quant(quant)
    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, got {base!r}")
    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    source = model or cfg.base_model
    if not source:
        raise UserError(f"{adapter} records no base model; pass --model")
    folder, _ = base_folder(source)
    weights = BaseWeights(Checkpoint(folder), base, "fp32")
    layers = attach(weights.skeleton, cfg, state)  # names the first module that does not fit this base
    config = weights.skeleton.config
    gguf_source = Path(resolve_source(source)[0]) if resolve_source(source)[0].endswith(".gguf") else None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    planned = plan(weights, quant)
    adapted = {f"{path}.weight": layer for path, layer in layers.items()}
    facts = chat_facts(tokenizer, adapter_prompting(adapter, cfg))
    modelfile = modelfile_text(output.name, facts, tokenizer) if ollama else None  # refused before writing

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(f"{Path(adapter).resolve().name} on {Path(source).name}")
        writer.add_file_type(FILE_TYPES[quant])
        if quant in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        hyperparameters(writer, config)
        facts["pre_tokenizer"] = write_tokenizer(writer, folder, gguf_source, tokenizer, facts, config.vocab_size)

    def tensor_of(p: Planned) -> np.ndarray:
        value = merged_value(weights, adapted, p.key, weights.out)
        heads = heads_of(p.name, config)
        return encode(to_interleaved(value, heads) if heads else value, p.qtype)

    check_free_space(output, sum(nbytes(p.shape, p.qtype) for p in planned), "the GGUF")
    say(f"writing {len(planned)} tensors of {source} with {len(layers)} modules merged ({quant}, {base} base)")
    with exclusive(output, say), atomic_path(output) as tmp:
        write(tmp, planned, metadata, tensor_of)
        say("checking the file: read back, then probes against base + adapter, block by block")
        checks = check_gguf(tmp, planned, weights, folder, quant, tolerance)
    written = write_modelfile(output, modelfile) if modelfile else None
    return {"output": str(output), "format": "gguf", "quant": quant, "base": base, "base_model": source,
            "tensors": len(planned), "modules_merged": len(layers), "bytes": output.stat().st_size,
            "chat_format": facts["chat_format"], "pre_tokenizer": facts["pre_tokenizer"],
            "modelfile": str(written) if written else None, **checks}
