"""`prolora train --dry-run`: everything up to the first step, without the model's weights, writing nothing.

Reads and renders the data, tokenizes (and packs) it as training does, counts what would be trained and
the steps (the same count the run makes), and sizes the run from the model's configuration alone (the
planner's parameter count, an estimate of memory per device).
"""

from __future__ import annotations

import os
import statistics

from prolora_cli.adapter.planner import plan
from prolora_cli.data.chat import IGNORE, resolve_chat_format
from prolora_cli.data.sources import describe_formats
from prolora_cli.models.arch import resolve_architecture
from prolora_cli.models.loading import load_tokenizer, quiet_libraries
from prolora_cli.training.args import TrainArgs
from prolora_cli.training.data import count_steps, mix, read_sources, tokenize_split, training_rows

NF4_BYTES = 4.127 / 8      # NF4 with double-quantised absmax: 4 + 8/64 + 32/(64*256) bits per weight
ADAM_BYTES = 16            # fp32 weight, gradient and two AdamW moments per trainable parameter
ACTIVATION_BYTES = 34      # per token, hidden unit and block in 16 bits (Korthikanti et al. 2022), no checkpointing


def dry_run(args: TrainArgs) -> dict:
    quiet_libraries()
    notes: list[str] = []
    sources = read_sources(args, notes.append)
    records = sum(len(rs) for _, rs, _ in sources)
    skipped = sum(n for _, _, n in sources)
    tokenizer = load_tokenizer(args.model)
    fmt = resolve_chat_format(tokenizer, args.chat_format)
    parts = [tokenize_split(src, rs, tokenizer, args, fmt, notes.append) for src, rs, _ in sources]
    dropped = records - sum(len(part) for part in parts)
    ds = mix(parts, args)  # with --data-weights, sources may be drawn more than once
    lengths = [len(x) for x in ds["input_ids"]]
    trained = [sum(1 for t in labels if t != IGNORE) for labels in ds["labels"]]
    arch = resolve_architecture(args.model)
    trainable = plan(arch, args.adapter)["trainable_params"]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    rows = len(training_rows(ds, args))
    steps_per_epoch, steps = count_steps(rows, args, processes)
    example = ds[0]
    return {"examples": len(lengths), "dropped": dropped, "skipped_bad_records": skipped,
            "data_format": ", ".join(describe_formats(rs) for _, rs, _ in sources), "chat_format": fmt, "notes": notes,
            "tokens": sum(lengths), "trained_tokens": sum(trained),
            "length": {"min": min(lengths), "median": statistics.median(lengths),
                       "p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))], "max": max(lengths)},
            "trainable_params": trainable, "processes": processes,
            "global_batch": args.batch_size * processes * args.grad_accum,
            "rows": rows if args.packing else None, "steps_per_epoch": steps_per_epoch, "steps": steps,
            "memory_per_device_gib": memory_estimate(arch, args, trainable, max(lengths), processes),
            "example": {"tokens": [tokenizer.decode([t]) for t in example["input_ids"]],
                        "trained": [label != IGNORE for label in example["labels"]]}}


def memory_estimate(arch, args, trainable: int, longest: int, processes: int) -> dict:
    """A rough GPU budget in GiB (bf16 compute): base weights, adapter with optimizer, activations."""
    linear = arch.num_layers * sum(h * o for h, o in arch.linear_shapes().values())
    embeddings = 2 * arch.vocab_size * arch.hidden_size
    base = linear * (NF4_BYTES if args.quant == "nf4" else 2) + embeddings * 2
    tokens = args.batch_size * min(longest, args.max_seq_len)
    per_block = tokens * arch.hidden_size * (2 if args.gradient_checkpointing else ACTIVATION_BYTES)
    activations = arch.num_layers * per_block + tokens * arch.vocab_size * 4  # fp32 logits
    parts = {"base": base, "adapter_and_optimizer": trainable * ADAM_BYTES, "activations": activations}
    out = {k: round(v / 2**30, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / 2**30, 2)
    return out
