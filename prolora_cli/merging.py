"""Merge an adapter into its base and write a plain transformers model, verified after writing."""

from __future__ import annotations

from pathlib import Path

from prolora_cli.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BASES = ("full", "nf4")
# Allowed max |logit difference| between the written model and base + adapter, relative to the largest
# |logit|. fp32 differs only by summation order; fp16/bf16 round W0 + dW once more than the unmerged
# model does, and that rounding adds up over the layers (SmolLM2-135M in bf16: about 3%).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}


class VerificationFailed(Exception):
    """The written model does not reproduce base + adapter within the tolerance."""


def round_through_nf4(model) -> int:
    """Replace every linear weight that QLoRA quantizes (all but lm_head) by its NF4 round trip.

    That is the base the adapter was trained against: bitsandbytes' NF4 with double quantisation,
    blocksize 64, exactly as transformers' BitsAndBytesConfig used in `prolora train`.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from torch import nn

    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                w = module.weight.data
                q, state = bnbf.quantize_4bit(w.float(), blocksize=64, compress_statistics=True,
                                              quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(q, state).to(w.dtype)
                count += 1
    return count


def probe_inputs(tokenizer, vocab_size: int):
    """A few fixed prompts, plus fixed random ids so the check never depends on the text alone."""
    import torch

    texts = ["The capital of France is", "def fibonacci(n):", "PRoLoRA merges into the base weights."]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in texts]
    g = torch.Generator().manual_seed(0)
    ids.append(torch.randint(0, vocab_size, (16,), generator=g).tolist())
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id or 0
    batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return {"input_ids": batch, "attention_mask": mask}


def logits(model, probes):
    import torch

    with torch.no_grad():
        out = model(**probes).logits.float()
    return out * probes["attention_mask"].unsqueeze(-1)  # ignore padded positions


def merge_adapter(adapter: str | Path, output: str | Path, model: str | None = None, dtype: str = "auto",
                  base: str = "full", overwrite: bool = False, tolerance: float | None = None,
                  say=lambda _msg: None) -> dict:
    """Merge, write atomically, reload with plain transformers and compare logits.

    Raises VerificationFailed when the check fails; the output folder is then never created.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from prolora_cli.adapter_files import read_config, read_tensors
    from prolora_cli.fileio import atomic_dir, check_output_free
    from prolora_cli.inject import adapter_layers, attach, remove_adapters
    from prolora_cli.models import checkpoint_dtype, load_model, loadable_source

    if dtype not in DTYPES and dtype != "auto":
        raise UserError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if base not in BASES:
        raise UserError(f"--base must be one of {', '.join(BASES)}, got {base!r}")
    output = Path(output)
    check_output_free(output, overwrite)
    cfg, state = read_config(adapter), read_tensors(adapter)
    source = model or cfg.base_model
    if not source:
        raise UserError(f"{adapter} records no base model; pass --model")
    if dtype == "auto":  # the base checkpoint's own (a GGUF base: its converted cache, fp32)
        dtype = checkpoint_dtype(loadable_source(source)[0]) or "fp32"
    torch_dtype = getattr(torch, DTYPES[dtype])
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance

    say(f"loading base {source} ({base} weights, {dtype})")
    lm, tokenizer, _ = load_model(source, "none", device="cpu")
    if base == "nf4":
        round_through_nf4(lm)
    lm = lm.to(torch_dtype)
    attach(lm, cfg, state)  # names the first module that does not fit this base
    lm.eval()
    probes = probe_inputs(tokenizer, lm.config.vocab_size)
    reference = logits(lm, probes)

    # One layer's dW at a time, then the wrapper goes and the plain Linear takes its place.
    layers = adapter_layers(lm)
    for layer in layers.values():
        layer.merge()
    remove_adapters(lm)

    with atomic_dir(output, overwrite=overwrite) as tmp:
        lm.config.use_cache = True
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).eval()
        diff = (logits(merged, probes) - reference).abs().max().item()
        relative = diff / max(reference.abs().max().item(), 1e-12)
        if not relative <= tolerance:  # also catches NaN
            raise VerificationFailed(
                f"merged model differs from base + adapter by {diff:.3g} in logits, {relative:.3g} of the "
                f"largest logit (tolerance {tolerance:g}); nothing was written")
    return {"output": str(output), "max_abs_logit_diff": diff, "relative_diff": relative,
            "tolerance": tolerance, "dtype": dtype,
            "base": base, "base_model": source, "modules_merged": len(layers)}
