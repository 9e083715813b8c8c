"""The optimizer (a parameter group per treatment), its schedule, and the eval loss the loop reports."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from prolora_cli.data.chat import IGNORE
from prolora_cli.training.args import TrainArgs


def build_optimizer(model, layers: dict, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW with a group per treatment: layers name their shared parameters (--lr-shared) and
    those that take no weight decay; everything else gets --lr and --weight-decay."""
    shared = {id(getattr(layer, n)) for layer in layers.values() for n in layer.SHARED}
    no_decay = {id(getattr(layer, n)) for layer in layers.values() for n in layer.NO_DECAY}
    lr_shared = args.lr_shared if args.lr_shared is not None else args.lr
    groups = {(s, d): {"params": [], "lr": lr_shared if s else args.lr, "weight_decay": 0.0 if d else args.weight_decay}
              for s in (False, True) for d in (False, True)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in shared, id(p) in no_decay)]["params"].append(p)
    groups = [g for g in groups.values() if g["params"]]
    if args.optim == "paged_adamw_32bit":
        # bitsandbytes pages optimizer state to host memory under GPU memory pressure; on CPU
        # there is nothing to page, and its 32-bit AdamW runs as a plain AdamW. Imported here:
        # bitsandbytes is slow to import and only this optimizer needs it.
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up over --warmup-ratio of the steps, then linear decay to zero."""
    return get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)


def mean_eval_loss(model, loader, accelerator) -> float:
    """Token-weighted mean cross-entropy over assistant tokens, each example counted once: with
    several processes, accelerate pads the last batch with repeats, which gather_for_metrics drops."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE,
                                         reduction="none")
            per_example = torch.stack([token_loss.sum(1).double(), (labels != IGNORE).sum(1).double()], 1)
            total += accelerator.gather_for_metrics(per_example).sum(0)
    model.train()
    return (total[0] / total[1]).item()
