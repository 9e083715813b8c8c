"""The training data pipeline: sources read and checked, tokenized, mixed, packed, ordered and batched,
and the number of optimizer steps that follows from it (the one count `train` and `--dry-run` share)."""

from __future__ import annotations

import math
from typing import Callable

import datasets
import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from prolora_cli.data.chat import IGNORE, pad_batch, tokenize_records
from prolora_cli.data.packing import collate_packed, pack
from prolora_cli.data.sources import describe_formats, read_data
from prolora_cli.errors import UserError
from prolora_cli.training.args import TrainArgs


def data_sources(args: TrainArgs) -> list:
    return list(args.data) if isinstance(args.data, (list, tuple)) else [args.data]


def read_sources(args: TrainArgs, say: Callable[[str], None]) -> list[tuple[str, list[dict], int]]:
    """Every --data source's records (checked before the model loads): [(source, records, skipped)]."""
    sources = []
    for path in data_sources(args):
        records, skipped = read_data(path, args.skip_bad_lines, args.data_format, args.data_split)
        say(f"{path}: {len(records):,} examples ({describe_formats(records)})"
            + (f", {skipped} bad record(s) skipped" if skipped else ""))
        sources.append((str(path), records, skipped))
    return sources


def read_eval_records(args: TrainArgs) -> list[dict]:
    return read_data(args.eval_data, args.skip_bad_lines, args.data_format)[0] if args.eval_data else []


def tokenize_split(path, records, tokenizer, args: TrainArgs, fmt: str, say: Callable[[str], None]):
    ds, dropped = tokenize_records(records, tokenizer, fmt, args.max_seq_len, str(path), args.num_proc,
                                   args.system_prompt)
    if dropped:
        say(f"{path}: dropped {dropped} example(s) with no assistant token within {args.max_seq_len} tokens")
    if len(ds) == 0:
        raise UserError(f"{path}: no example keeps an assistant token within --max-seq-len {args.max_seq_len}")
    return ds


def mix(parts: list, args: TrainArgs):
    """One training set from several: concatenated, or drawn with --data-weights (datasets'
    interleave_datasets, seeded, until every source has been seen whole)."""
    if len(parts) == 1:
        return parts[0]
    if not args.data_weights:
        return datasets.concatenate_datasets(parts)
    weights = parse_weights(args.data_weights, len(parts))
    return datasets.interleave_datasets(parts, probabilities=weights, seed=args.seed,
                                        stopping_strategy="all_exhausted")


def parse_weights(text: str, count: int) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--data-weights: cannot read {text!r} (like 0.7,0.3)") from None
    if len(weights) != count or any(w <= 0 for w in weights):
        raise UserError(f"--data-weights needs {count} positive numbers, one per --data, got {text!r}")
    return [w / sum(weights) for w in weights]


def training_rows(examples, args: TrainArgs):
    """The sequences the loader batches: the examples, or with --packing the rows they are packed into."""
    return pack(examples, args.max_seq_len) if args.packing else examples


def count_steps(rows: int, args: TrainArgs, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) for `rows` training sequences. A step takes
    --grad-accum micro-batches of --batch-size x processes sequences; an epoch's last step may take
    fewer. --max-steps wins over --epochs, which may be fractional."""
    micro_batches = math.ceil(rows / (args.batch_size * processes))
    per_epoch = math.ceil(micro_batches / args.grad_accum)
    return per_epoch, args.max_steps or max(1, math.ceil(args.epochs * per_epoch))


class EpochLengthSampler:
    """Length-grouped order whose shuffle depends only on (seed, epoch), so a resume can replay it."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.epoch = group_by_length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))
        return iter(torch.randperm(len(self.lengths), generator=g).tolist())


def collate(pad_id: int):
    def fn(examples):  # right padding: positions stay 0..len-1
        ids, mask = pad_batch([e["input_ids"] for e in examples], pad_id)
        labels, _ = pad_batch([e["labels"] for e in examples], IGNORE)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def make_loaders(rows, eval_ds, pad_id: int, args: TrainArgs, processes: int):
    """Loaders of global micro-batches (--batch-size x processes) over the training rows (see
    training_rows): the order, length grouping included, is decided on the global batch, and accelerate
    (split_batches) hands each process its slice. So the examples of a step do not depend on how many
    processes share them."""
    size = args.batch_size * processes
    columns = ["input_ids", "labels", *(["position_ids"] if args.packing else [])]
    sampler = EpochLengthSampler([len(x) for x in rows["input_ids"]], size, args.seed, args.group_by_length)
    # A dedicated generator: DataLoader draws a base seed per epoch, which must not touch the
    # global RNG (dropout) or a resumed run would drift.
    loader = DataLoader(rows.with_format(None, columns=columns), batch_size=size, sampler=sampler,
                        collate_fn=collate_packed(pad_id) if args.packing else collate(pad_id),
                        generator=torch.Generator().manual_seed(args.seed))
    eval_loader = None if eval_ds is None else DataLoader(
        eval_ds.with_format(None, columns=["input_ids", "labels"]), batch_size=size, collate_fn=collate(pad_id))
    return loader, eval_loader
