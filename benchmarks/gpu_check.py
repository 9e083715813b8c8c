"""QLoRA training steps on a GPU at LLaMA-2-7B's full size: PEFT LoRA r=8 against PRoLoRA r=8, u=1.

No download: the model is LLaMA-2-7B's architecture (32 blocks, hidden 4096, intermediate 11008, 32
heads) with random weights, built in GPU memory in bf16, then every linear layer but the head is
replaced by bitsandbytes' NF4 Linear4bit (double quantisation, blocksize 64, bf16 compute): the
paper's QLoRA base. Both adapters train on it in turn with the paper's recipe (all seven projections,
alpha 16, dropout 0.05, paged AdamW 32-bit, gradient checkpointing), batch 16 x 512 tokens unless told
otherwise; random tokens (speed does not depend on the text). The variants alternate over --rounds so
drift hits both alike. Reported per variant: median step time, tokens/s, peak GPU memory, and
PRoLoRA's step-time ratio to PEFT's.

Run by benchmarks/gpu_check.sh on the device; on a CPU it runs a small smoke version:
    python benchmarks/gpu_check.py --blocks 2 --hidden 64 --intermediate 96 --heads 4 --batch 2 --seq 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantized_llama(args, device):
    """A random LLaMA in bf16 with NF4 linear layers (all but lm_head), built on `device`."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.blocks,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
                         max_position_embeddings=4096, use_cache=False)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(compute)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(device)
                setattr(module, child_name, q)
                del child
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def attach(model, variant: str, args):
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.05,
                                                target_modules=TARGETS))
    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.inject import inject

    cfg = AdapterConfig.create(args.rank, unshared=args.unshared, alpha=16, dropout=0.05, base_model="random")
    inject(model, cfg)
    return model


def detach(model, variant: str):
    if variant == "peft-lora":
        return model.unload()
    from prolora_cli.adapter.inject import remove_adapters

    remove_adapters(model)
    return model


def time_variant(base, variant: str, args, device) -> dict:
    import bitsandbytes as bnb

    model = attach(base, variant, args)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (bnb.optim.PagedAdamW32bit if device.type == "cuda" else torch.optim.AdamW)(params, lr=2e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch, args.seq), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    trainable = sum(p.numel() for p in params)
    del optimizer, params
    detach(model, variant)
    return {"times": times, "peak_gib": peak, "trainable": trainable, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--unshared", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", type=Path, default=Path("runs/gpu_check.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    base = quantized_llama(args, device)
    build_s = time.perf_counter() - start
    runs: dict[str, list] = {"peft-lora": [], "prolora": []}
    for r in range(args.rounds):
        for variant in (("peft-lora", "prolora") if r % 2 == 0 else ("prolora", "peft-lora")):
            runs[variant].append(time_variant(base, variant, args, device))
            print(variant, json.dumps(runs[variant][-1]), flush=True)
    tokens = args.batch * args.seq
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "args": vars(args) | {"output": str(args.output)},
               "build_and_quantize_s": build_s}
    for variant, rs in runs.items():
        step = statistics.median(t for r in rs for t in r["times"])
        summary[variant] = {"step_s": step, "tokens_per_s": tokens / step, "trainable": rs[0]["trainable"],
                            "peak_gib": max((r["peak_gib"] or 0) for r in rs) or None, "last_loss": rs[-1]["loss"]}
    summary["step_ratio_prolora_over_peft"] = summary["prolora"]["step_s"] / summary["peft-lora"]["step_s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
