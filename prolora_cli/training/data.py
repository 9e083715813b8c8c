"""The training data pipeline: sources read and checked, tokenized (once: data/cache.py), mixed, packed,
ordered and batched, and the number of optimizer steps that follows from it (the one count `train` and
`--dry-run` share).

Memory stays flat as the data grows: records stream into Arrow files, tokens are written by
`datasets.map` and memory-mapped, lengths and counts are read as arrays from columns, packing keeps two
numbers per row, and the sampler orders an array of lengths.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from prolora_cli.data.cache import DATA_NAME, cached, source_stamp, tokenizer_stamp
from prolora_cli.data.chat import IGNORE, column, pad_batch, tokenize_records
from prolora_cli.data.packing import PackedRows, collate_packed
from prolora_cli.data.sources import describe_formats, load_hub, read_source
from prolora_cli.errors import UserError
from prolora_cli.models.loading import cache_dir
from prolora_cli.training.args import TrainArgs


def data_sources(args: TrainArgs) -> list:
    return list(args.data) if isinstance(args.data, (list, tuple)) else [args.data]


def cache_root(args: TrainArgs) -> Path:
    return Path(args.cache_dir) if args.cache_dir else cache_dir() / "data"


def processes_to_tokenize(args: TrainArgs) -> int:
    if args.num_proc:
        return args.num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenized_source(path, tokenizer, fmt: str, args: TrainArgs, say: Callable[[str], None]):
    """One source's examples, tokenized (input_ids, labels, length, trained): from the cache when this
    source was tokenized this way before, else read (checked record by record) and tokenized into it.
    Returns (dataset, meta: counts of records read, skipped, dropped, and of each shape)."""
    stamp = source_stamp(path)
    if "hub" in stamp:
        stamp["fingerprint"] = load_hub(str(path), args.data_split)._fingerprint
    key = {"source": stamp, "split": args.data_split, "tokenizer": tokenizer_stamp(tokenizer), "chat_format": fmt,
           "max_seq_len": args.max_seq_len, "system_prompt": args.system_prompt, "data_format": args.data_format,
           "skip_bad_lines": args.skip_bad_lines}

    def build(folder: Path):
        scratch = folder / "scratch"
        records, skipped, shapes = read_source(path, args.skip_bad_lines, args.data_format, args.data_split, scratch)
        processes = processes_to_tokenize(args)
        if processes > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are processes of their own
        ds, dropped = tokenize_records(records, tokenizer, fmt, args.max_seq_len, str(path), processes,
                                       args.system_prompt, str(folder / DATA_NAME))
        read = len(records)
        del records
        shutil.rmtree(scratch, ignore_errors=True)
        return ds, {"source": str(path), "read": read, "skipped": skipped, "dropped": dropped, "formats": dict(shapes)}

    ds, meta = cached(cache_root(args), key, build, say)
    where = f"reused from the cache {meta['entry']}" if meta["reused"] else f"cached in {meta['entry']}"
    say(f"{path}: {meta['read']:,} examples ({describe_formats(Counter(meta['formats']))})"
        + (f", {meta['skipped']} bad record(s) skipped" if meta["skipped"] else "") + f"; tokenized data {where}")
    if meta["dropped"]:
        say(f"{path}: dropped {meta['dropped']} example(s) with no assistant token within {args.max_seq_len} tokens")
    if len(ds) == 0:
        raise UserError(f"{path}: no example keeps an assistant token within --max-seq-len {args.max_seq_len}")
    return ds, meta


def training_examples(tokenizer, fmt: str, args: TrainArgs, say: Callable[[str], None]):
    """(the training set: every --data source tokenized and mixed; each source's meta)."""
    parts = [tokenized_source(path, tokenizer, fmt, args, say) for path in data_sources(args)]
    return mix([ds for ds, _ in parts], args), [meta for _, meta in parts]


def eval_examples(tokenizer, fmt: str, args: TrainArgs, say: Callable[[str], None]):
    return tokenized_source(args.eval_data, tokenizer, fmt, args, say)[0] if args.eval_data else None


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
    return PackedRows(examples, args.max_seq_len) if args.packing else examples


def row_lengths(rows) -> np.ndarray:
    """Each training sequence's length, as an array (read from the `length` column, never the tokens)."""
    if isinstance(rows, PackedRows):
        return rows.lengths
    return column(rows, "length")


def count_steps(rows: int, args: TrainArgs, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) for `rows` training sequences. A step takes
    --grad-accum micro-batches of --batch-size x processes sequences; an epoch's last step may take
    fewer. --max-steps wins over --epochs, which may be fractional."""
    micro_batches = math.ceil(rows / (args.batch_size * processes))
    per_epoch = math.ceil(micro_batches / args.grad_accum)
    return per_epoch, args.max_steps or max(1, math.ceil(args.epochs * per_epoch))


class EpochLengthSampler:
    """Length-grouped order whose shuffle depends only on (seed, epoch), so a resume can replay it."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool):
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
    sampler = EpochLengthSampler(row_lengths(rows), size, args.seed, args.group_by_length)
    dataset = rows if args.packing else rows.with_format(None, columns=["input_ids", "labels"])
    # A dedicated generator: DataLoader draws a base seed per epoch, which must not touch the
    # global RNG (dropout) or a resumed run would drift.
    loader = DataLoader(dataset, batch_size=size, sampler=sampler,
                        collate_fn=collate_packed(pad_id) if args.packing else collate(pad_id),
                        generator=torch.Generator().manual_seed(args.seed))
    eval_loader = None if eval_ds is None else DataLoader(
        eval_ds.with_format(None, columns=["input_ids", "labels"]), batch_size=size, collate_fn=collate(pad_id))
    return loader, eval_loader
