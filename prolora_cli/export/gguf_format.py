"""llama.cpp's conventions for the LLaMA architecture in GGUF: tensor names, the Q/K row order, the
hyperparameter keys, and each tensor's type and bytes for a `--quant`.

Names come from the `gguf` package's own map (gguf.get_tensor_name_map). llama.cpp applies rotary
embeddings to interleaved pairs (x0, x1), (x2, x3), ... of each head, transformers' LLaMA to its two
halves (x_i, x_{i + d/2}); a converter therefore reorders the rows of the query and key projections
within each head, which `to_interleaved` does (and `to_halves` undoes, to read a GGUF back).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from prolora_cli.errors import UserError

Q = gguf.GGMLQuantizationType
QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# With --quant q4_0 the embedding and the output head take q8_0: they are the most sensitive weights,
# and llama.cpp's own quantizer also spends more bits on the output.
SENSITIVE = ("token_embd.weight", "output.weight")
LLAMA_CPP_LORA = "lora"  # llama.cpp's adapter.type for A/B pairs (a file format's word, not our method)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r} (for k-quants, requantize "
                        f"the f16 file with llama.cpp's llama-quantize)")


def gguf_name(hf_name: str, num_blocks: int) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"GGUF export: no llama.cpp tensor for {hf_name} (a LLaMA-architecture model is needed)")
    return name


def heads_of(gguf_tensor: str, config) -> int | None:
    """How many heads the rows of this tensor hold, if llama.cpp reorders them (queries and keys)."""
    if ".attn_q." in gguf_tensor:
        return config.num_attention_heads
    if ".attn_k." in gguf_tensor:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def to_interleaved(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' rotate-half order to llama.cpp's interleaved pairs."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def to_halves(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of to_interleaved."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> Q:
    """The GGML type a tensor is stored in: norms (1-D) in f32; a quantized type only where each row
    splits into whole blocks (else f16, as llama.cpp's converter does)."""
    if len(shape) == 1:
        return Q.F32
    qtype = Q.Q8_0 if quant == "q4_0" and name in SENSITIVE else QUANTS[quant]
    if qtype in (Q.Q8_0, Q.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """A tensor's values as the bytes (or numbers) GGUF stores for `qtype`."""
    values = tensor.detach().to(torch.float32).numpy()
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def decode(raw: bytes, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's stored bytes back to fp32 values (quantized types dequantized by the `gguf` package)."""
    data = np.frombuffer(raw, dtype=np.uint8).reshape(*shape[:-1], -1)
    values = gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def write_tensor(writer: gguf.GGUFWriter, data: np.ndarray) -> None:
    """gguf's write_tensor_data, with Python's own file write: numpy's tofile reports a short write (a full
    disk, a file size limit) without saying why, a file object raises the OS error itself."""
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    assert writer.tensors[0].pop(name).nbytes == data.nbytes
    writer.write_padding(fout, fout.tell())
    fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
    writer.write_padding(fout, data.nbytes)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


def hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The llama.* keys llama.cpp reads to build the model, from a transformers LlamaConfig."""
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind != "default":
        raise UserError(f"GGUF export: rope scaling {kind!r} is not supported here; export --format peft, or "
                        f"merge and convert with llama.cpp's convert_hf_to_gguf.py")


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
