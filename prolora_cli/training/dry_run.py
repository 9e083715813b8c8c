"""`prolora train --dry-run`: everything up to the first step, without the model's weights, writing nothing.

Reads and renders the data, tokenizes (and packs) it as training does, counts what would be trained and
the steps (the same count the run makes), and sizes the run from the model's configuration alone (the
planner's parameter count, an estimate of memory per device).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from prolora_cli.adapter.planner import plan
from prolora_cli.data.chat import IGNORE, column, resolve_chat_format
from prolora_cli.data.sources import describe_formats
from prolora_cli.models.arch import resolve_architecture
from prolora_cli.models.loading import load_tokenizer, quiet_libraries
from prolora_cli.training.args import TrainArgs
from prolora_cli.training.data import count_steps, row_lengths, training_examples, training_rows
from prolora_cli.training.losses import CHUNK

NF4_BYTES = 4.127 / 8      # NF4 with double-quantised absmax: 4 + 8/64 + 32/(64*256) bits per weight
ADAM_BYTES = 16            # fp32 weight, gradient and two AdamW moments per trainable parameter
ACTIVATION_BYTES = 34      # per token, hidden unit and block in 16 bits (Korthikanti et al. 2022), no checkpointing


def dry_run(args: TrainArgs) -> dict:
    quiet_libraries()
    notes: list[str] = []
    tokenizer = load_tokenizer(args.model)
    fmt = resolve_chat_format(tokenizer, args.chat_format)
    ds, metas = training_examples(tokenizer, fmt, args, notes.append)  # fills the cache the run then reuses
    lengths = row_lengths(ds)
    trained = column(ds, "trained")
    arch = resolve_architecture(args.model)
    trainable = plan(arch, args.adapter)["trainable_params"]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    rows = len(training_rows(ds, args))
    steps_per_epoch, steps = count_steps(rows, args, processes)
    example = ds[0]
    shapes = sum((Counter(m["formats"]) for m in metas), Counter())
    return {"examples": len(lengths), "dropped": sum(m["dropped"] for m in metas),
            "skipped_bad_records": sum(m["skipped"] for m in metas), "data_format": describe_formats(shapes),
            "chat_format": fmt, "notes": notes, "tokens": int(lengths.sum()), "trained_tokens": int(trained.sum()),
            "length": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                       "p90": int(np.sort(lengths)[int(0.9 * (len(lengths) - 1))]), "max": int(lengths.max())},
            "trainable_params": trainable, "processes": processes,
            "global_batch": args.batch_size * processes * args.grad_accum,
            "rows": rows if args.packing else None, "steps_per_epoch": steps_per_epoch, "steps": steps,
            "memory_per_device_gib": memory_estimate(arch, args, trainable, int(lengths.max()), processes),
            "cache": [m["entry"] for m in metas], "cache_reused": all(m["reused"] for m in metas),
            "example": {"tokens": [tokenizer.decode([t]) for t in example["input_ids"]],
                        "trained": [label != IGNORE for label in example["labels"]]}}


def memory_estimate(arch, args, trainable: int, longest: int, processes: int) -> dict:
    """A rough GPU budget in GiB (bf16 compute): base weights, adapter with optimizer, activations."""
    linear = arch.num_layers * sum(h * o for h, o in arch.linear_shapes().values())
    embeddings = 2 * arch.vocab_size * arch.hidden_size
    base = linear * (NF4_BYTES if args.quant == "nf4" else 2) + embeddings * 2
    tokens = args.batch_size * min(longest, args.max_seq_len)
    per_block = tokens * arch.hidden_size * (2 if args.gradient_checkpointing else ACTIVATION_BYTES)
    scored = tokens if args.loss == "full" else min(tokens, CHUNK)  # positions whose logits exist at once
    activations = arch.num_layers * per_block + scored * arch.vocab_size * 4  # fp32 logits
    parts = {"base": base, "adapter_and_optimizer": trainable * ADAM_BYTES, "activations": activations}
    out = {k: round(v / 2**30, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / 2**30, 2)
    return out
