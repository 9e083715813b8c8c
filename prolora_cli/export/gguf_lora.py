"""`prolora export --format gguf-lora`: the adapter alone as a llama.cpp LoRA adapter, for
`llama-cli -m base.gguf --lora adapter.gguf` on a GGUF of the same base.

Every method is a LoRA once expanded (methods/base.py), so the file holds, per adapted module, its A
(r x in) as `blk.N.<tensor>.weight.lora_a` and its B (out x r) as `.lora_b`, the pairs llama.cpp's loader
expects. B's rows of the query and key projections take llama.cpp's order (A's do not: they index the
input), as in the base GGUF. llama.cpp scales by `adapter.lora.alpha` / rank; where every module shares
rank and scaling that alpha is written, otherwise the scaling is folded into B and alpha is 0 (scale 1).
GGUF stores A and B in full, so PRoLoRA's compact form does not survive this format.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import standalone_layers
from prolora_cli.errors import UserError, VerificationFailed
from prolora_cli.export.gguf_format import (
    LLAMA_CPP_LORA,
    QUANTS,
    encode,
    gguf_name,
    nbytes,
    to_interleaved,
    write_tensor,
)
from prolora_cli.fileio import atomic_path, check_output_free, exclusive
from prolora_cli.models.arch import resolve_architecture
from prolora_cli.models.loading import quiet_libraries

ADAPTER_QUANTS = ("f32", "f16", "bf16")


def adapter_pairs(adapter: str | Path) -> tuple[dict, float, object]:
    """({llama.cpp tensor name: (A or B as llama.cpp wants it)}, alpha, the adapter's base architecture)."""
    cfg, state = read_config(adapter), read_tensors(adapter)
    arch = resolve_architecture(cfg.base_model or None)
    factors = {}
    for path, layer in standalone_layers(cfg, state).items():
        a, b = (t.detach().float() for t in layer.factors())
        factors[path] = (a, b, layer.scaling)
    products = {round(s * a.shape[0], 6) for a, _, s in factors.values()}
    alpha = products.pop() if len(products) == 1 else 0.0
    pairs = {}
    for path, (a, b, scaling) in factors.items():
        name = gguf_name(f"{path}.weight", arch.num_layers)
        if alpha == 0.0:
            b = b * scaling
        heads = arch.num_heads if ".attn_q." in name else arch.num_kv_heads if ".attn_k." in name else None
        pairs[f"{name}.lora_a"] = a
        pairs[f"{name}.lora_b"] = to_interleaved(b, heads) if heads else b
    return pairs, alpha, arch


def export_gguf_lora(adapter: str | Path, output: str | Path, quant: str = "f16", overwrite: bool = False) -> dict:
    quiet_libraries()
    if quant not in ADAPTER_QUANTS:
        raise UserError(f"--quant for gguf-lora must be one of {', '.join(ADAPTER_QUANTS)}, got {quant!r}")
    output = Path(output)
    check_output_free(output, overwrite)
    pairs, alpha, arch = adapter_pairs(adapter)
    qtype = QUANTS[quant]
    with exclusive(output), atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, LLAMA_CPP_LORA)
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for name, t in pairs.items():
                writer.add_tensor_info(name, tuple(t.shape), np.float32, nbytes(tuple(t.shape), qtype), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in pairs.values():
                write_tensor(writer, encode(t, qtype))
        finally:
            writer.close()
        check_pairs(tmp, pairs)
    return {"output": str(output), "format": "gguf-lora", "quant": quant, "pairs": len(pairs) // 2, "alpha": alpha,
            "base_architecture": arch.name, "bytes": output.stat().st_size}


def check_pairs(path: Path, pairs: dict) -> None:
    """Read back: every tensor with its shape, A and B in pairs of one rank, the adapter's metadata."""
    reader = gguf.GGUFReader(path)
    found = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    if found != {name: tuple(t.shape) for name, t in pairs.items()}:
        raise VerificationFailed("GGUF adapter does not hold the tensors written; nothing was written")
    for name, shape in found.items():
        if name.endswith(".lora_a") and found[name[:-1] + "b"][1] != shape[0]:
            raise VerificationFailed(f"GGUF adapter's {name} and its B disagree on the rank; nothing was written")
    if reader.fields[gguf.Keys.Adapter.TYPE].contents() != LLAMA_CPP_LORA:
        raise VerificationFailed("GGUF adapter's type was not written; nothing was written")
