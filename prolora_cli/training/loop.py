"""The training run: QLoRA + PRoLoRA on chat data, driven by accelerate.

A plain loop rather than transformers' Trainer: Trainer refuses 4-bit models whose adapters are not
PEFT's. accelerate still brings devices, mixed precision, gradient accumulation, DDP/FSDP through
`accelerate launch`, and checkpoint state; transformers brings the schedule and length grouping.

Resume is exact: a checkpoint holds the adapter, optimizer, scheduler and every RNG state, and the
data order of each epoch is a pure function of (seed, epoch), so the resumed run skips the batches
already seen and continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from prolora_cli.data.chat import IGNORE
from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.errors import UserError
from prolora_cli.fileio import write_text_atomic

OPTIMIZERS = ("paged_adamw_32bit", "adamw")
CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"
RUN_CONFIG = "run_config.json"


@dataclass
class TrainArgs:
    data: list  # of Paths (or hub dataset ids); one Path also works
    output: Path
    adapter: AdapterConfig
    eval_data: Optional[Path] = None
    model: Optional[str] = None
    quant: str = "nf4"
    trust_remote_code: bool = False
    chat_format: str = "auto"
    data_format: str = "auto"
    data_weights: Optional[str] = None  # "0.7,0.3": one per --data
    data_split: str = "train"           # of a hub dataset
    num_proc: int = 1                   # processes that tokenize
    max_seq_len: int = 512
    skip_bad_lines: bool = False
    lr: float = 2e-4
    lr_shared: Optional[float] = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"
    batch_size: int = 4
    grad_accum: int = 4
    max_steps: Optional[int] = None
    epochs: float = 1.0
    seed: int = 42
    group_by_length: bool = True
    packing: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    save_total_limit: int = 2
    log_every: int = 1
    report_to: str = "none"  # comma-separated: tensorboard, wandb, mlflow
    resume: bool = False
    overwrite: bool = False
    device: Optional[str] = None  # mainly for tests; accelerate picks otherwise

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "save_total_limit", "num_proc"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.epochs <= 0:
            raise UserError("--epochs must be > 0")
        if self.lr <= 0 or (self.lr_shared is not None and self.lr_shared <= 0):
            raise UserError("learning rates must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.optim not in OPTIMIZERS:
            raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        trackers_of(self.report_to)  # an unknown or missing tracker fails before any work
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: package it needs


def trackers_of(report_to: str) -> list[str]:
    """--report-to 'tensorboard,wandb' -> accelerate's tracker names; one line if one is unknown or
    its package is not installed (they are optional)."""
    import importlib.util

    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--report-to: unknown tracker {name!r} (use none, {', '.join(TRACKERS)})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return names


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    elapsed: float = 0.0
    last_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None
    history: list = field(default_factory=list)
    processes: int = 1  # the data order and RNG states of a checkpoint belong to this many processes


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------
# The output folder


def is_finished(output: Path) -> bool:
    return (output / "adapter_config.json").is_file() and (output / LOG_NAME).is_file()


def latest_checkpoint(output: Path) -> Optional[Path]:
    """The newest complete checkpoint. Incomplete ones never get their final name (see _save)."""
    folder = output / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_NAME).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def prepare_output(args: TrainArgs) -> Optional[Path]:
    """Check the output folder against --resume/--overwrite; return the checkpoint to resume from."""
    out = args.output
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}")
        return ckpt
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            what = "a finished run" if is_finished(out) else "files (an unfinished run? use --resume)"
            raise UserError(f"--output {out} already holds {what}; pass --overwrite to replace it")
        shutil.rmtree(out)
    return None


# ---------------------------------------------------------------------------------------------
# Data


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
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))
        return iter(torch.randperm(len(self.lengths), generator=g).tolist())


def collate(pad_id: int):
    from prolora_cli.data.chat import pad_batch

    def fn(examples):  # right padding: positions stay 0..len-1
        ids, mask = pad_batch([e["input_ids"] for e in examples], pad_id)
        labels, _ = pad_batch([e["labels"] for e in examples], IGNORE)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def tokenize_split(path: Path, records: list[dict], tokenizer, args: TrainArgs, fmt: str,
                   say: Callable[[str], None]):
    from prolora_cli.data.chat import tokenize_records

    ds, dropped = tokenize_records(records, tokenizer, fmt, args.max_seq_len, str(path), args.num_proc)
    if dropped:
        say(f"{path}: dropped {dropped} example(s) with no assistant token within {args.max_seq_len} tokens")
    if len(ds) == 0:
        raise UserError(f"{path}: no example keeps an assistant token within --max-seq-len {args.max_seq_len}")
    return ds


def build_optimizer(model, layers: dict, args: TrainArgs):
    """AdamW with a group per treatment: layers name their shared parameters (--lr-shared) and
    those that take no weight decay; everything else gets --lr and --weight-decay."""
    import torch

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
        # there is nothing to page, and its 32-bit AdamW runs as a plain AdamW.
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def mean_eval_loss(model, loader, accelerator) -> float:
    """Token-weighted mean cross-entropy over assistant tokens, each example counted once: with
    several processes, accelerate pads the last batch with repeats, which gather_for_metrics drops."""
    import torch
    import torch.nn.functional as F

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


# ---------------------------------------------------------------------------------------------
# The run: set up, loop, evaluate, checkpoint, finish


@dataclass
class Run:
    """Everything a run holds between its steps."""
    args: TrainArgs
    cfg: AdapterConfig
    report: object
    accelerator: object
    model: object
    raw_model: object
    layers: dict
    loader: object
    eval_loader: object
    optimizer: object
    scheduler: object
    total_steps: int
    info: dict
    progress: Progress = field(default_factory=Progress)
    sampler: Optional[EpochLengthSampler] = None  # the training order, set to each epoch by hand
    shapes: dict = field(default_factory=dict)  # the layers' parameter shapes before any sharding

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.main:
            self.report.message(text)

    def log(self, record: dict) -> None:
        """Keep a record in the history (checkpoints carry it) and append it to train_log.jsonl."""
        self.progress.history.append(record)
        if self.main:
            with (self.args.output / LOG_NAME).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator.log_with:  # trackers get the same numbers, by step
            self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])

    def evaluate(self) -> float:
        self.progress.last_eval_loss = mean_eval_loss(self.model, self.eval_loader, self.accelerator)
        return self.progress.last_eval_loss

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically: only complete checkpoints ever carry that name."""
        acc, out = self.accelerator, self.args.output
        final = out / CHECKPOINTS / f"step-{self.progress.step:07d}"
        tmp = final.with_name(f".tmp-{final.name}")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.main:
            (tmp / STATE_NAME).write_text(json.dumps(vars(self.progress)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(final.parent.glob("step-*"))[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def train_step(self, group: list[dict]) -> float:
        """One optimizer step over a group of micro-batches (up to --grad-accum, on every process).

        The loss is the mean over every trained token of the global batch: each micro-batch's
        token losses are summed and divided by the token count of the whole group on all processes
        (transformers' num_items_in_batch), times the number of processes because DDP averages
        gradients. N processes x batch b then take the same step as 1 process x batch N*b. The
        method's penalty (SoRA) counts once per step. Returns that mean loss, the same on every rank.
        """
        import contextlib

        import torch

        from prolora_cli.data.packing import seen_tokens

        acc = self.accelerator
        local = [sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group), sum(seen_tokens(b) for b in group)]
        trained, seen = acc.reduce(torch.tensor(local, dtype=torch.float64, device=acc.device), "sum")
        total = torch.zeros((), device=acc.device)
        for i, batch in enumerate(group):
            # Gradients are exchanged once per step, with the last micro-batch's backward.
            with contextlib.nullcontext() if i == len(group) - 1 else acc.no_sync(self.model):
                loss = self.model(**batch, num_items_in_batch=trained.float()).loss
                penalty = self.cfg.impl.regularizer(self.cfg, self.layers)
                scaled = loss * acc.num_processes
                acc.backward(scaled if penalty is None else scaled + penalty / len(group))
            total += loss.detach().float()
        acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        for layer in self.layers.values():
            layer.after_step(self.progress.step + 1, self.total_steps)
        self.progress.tokens += int(seen.item())  # every token processed, on all processes
        self.progress.trained_tokens += int(trained.item())
        return acc.reduce(total, "sum").item()

    def end_of_step(self, window: dict) -> None:
        """Count the optimizer step; log and evaluate as asked."""
        args, p = self.args, self.progress
        self.scheduler.step()
        p.step += 1
        now = time.perf_counter()
        p.elapsed = now - window["started"]
        record = None
        if p.step % args.log_every == 0 or p.step == self.total_steps:
            p.last_loss = window["loss"] / window["steps"]
            seconds = max(now - window["start"], 1e-9)
            record = dict(step=p.step, epoch=p.epoch, loss=p.last_loss, lr=self.scheduler.get_last_lr()[0],
                          tokens_per_s=window["tokens"] / seconds, trained_tokens_per_s=window["trained"] / seconds,
                          elapsed_s=p.elapsed)
            window.update(tokens=0, trained=0, start=now, loss=0.0, steps=0)
        if self.eval_loader is not None and (
                p.step == self.total_steps or (args.eval_every and p.step % args.eval_every == 0)):
            record = {**(record or dict(step=p.step, epoch=p.epoch)), "eval_loss": self.evaluate()}
        if record is not None:
            self.log(record)
        self.report.step(p.step, record)

    def stop_asked(self, stop: dict) -> bool:
        """A Ctrl-C reaches the processes at different moments; they stop at the same step."""
        import torch

        flag = torch.tensor(float(stop["asked"]), device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def loop(self, stop: dict) -> None:
        """Train up to total_steps; a Ctrl-C (stop["asked"]) ends at the next step with a checkpoint."""
        import itertools

        p, acc, accum = self.progress, self.accelerator, self.args.grad_accum
        window = dict(started=time.perf_counter() - p.elapsed, start=time.perf_counter(), tokens=0, trained=0,
                      loss=0.0, steps=0)
        self.model.train()
        while p.step < self.total_steps:
            # accelerate's loaders re-set their sampler's epoch from their own counter on every
            # pass, so the epoch goes through them (a fresh skip loader would count from 0).
            batches = acc.skip_first_batches(self.loader, p.batch_in_epoch) if p.batch_in_epoch else self.loader
            batches.set_epoch(p.epoch)
            # Under several processes accelerate's skipping loader does not pass the epoch on to the
            # sampler (its batch sampler is wrapped twice), so it is set here as well.
            self.sampler.set_epoch(p.epoch)
            micro = iter(batches)
            while p.step < self.total_steps and (group := list(itertools.islice(micro, accum))):
                before = p.tokens, p.trained_tokens
                loss = self.train_step(group)
                p.batch_in_epoch += len(group)
                window.update(tokens=window["tokens"] + p.tokens - before[0], loss=window["loss"] + loss,
                              trained=window["trained"] + p.trained_tokens - before[1], steps=window["steps"] + 1)
                self.end_of_step(window)
                if self.stop_asked(stop):
                    raise Interrupted(self.save_checkpoint())
                if self.args.save_every and p.step % self.args.save_every == 0 and p.step < self.total_steps:
                    self.save_checkpoint()
            if p.step < self.total_steps:
                p.epoch += 1
                p.batch_in_epoch = 0

    def save_adapter(self, folder: Path, cfg: AdapterConfig) -> None:
        """Every process takes part (under FSDP the adapter is gathered block by block); the main
        one writes."""
        from prolora_cli.adapter.files import save_adapter_tensors
        from prolora_cli.adapter.inject import saved_config
        from prolora_cli.training.sharding import full_adapter_state

        state = full_adapter_state(self.model, self.layers, self.shapes)
        if self.main:
            save_adapter_tensors(folder, saved_config(cfg, self.layers), state)

    def load_adapter(self, state: dict) -> None:
        from prolora_cli.adapter.inject import load_layers_state
        from prolora_cli.training.sharding import load_full_adapter_state, units

        if units(self.model):
            load_full_adapter_state(self.model, self.layers, self.shapes, state)
        else:
            load_layers_state(self.layers, state)

    def finish(self) -> dict:
        """Save the final adapter (the method may compact it first), the loss plot, and summarise."""
        from prolora_cli.adapter.inject import adapter_layers, finalize
        from prolora_cli.training.sharding import units

        final_cfg, message = finalize(self.raw_model, self.cfg)
        if message:
            self.say(message)
        if not units(self.model):  # the layers the method finalized (FSDP refuses methods that rebuild)
            self.layers = adapter_layers(self.raw_model)
        self.save_adapter(self.args.output, final_cfg)
        if self.main:
            plot_losses(self.progress.history, self.args.output / "loss.png")
        self.accelerator.wait_for_everyone()
        p = self.progress
        first_eval = next((r["eval_loss"] for r in p.history if "eval_loss" in r), None)
        return dict(steps=p.step, time_s=p.elapsed, train_loss=p.last_loss, eval_loss=p.last_eval_loss,
                    eval_loss_start=first_eval, trainable_params=self.info["trainable"],
                    adapter_bytes=(self.args.output / "adapter.safetensors").stat().st_size,
                    output=str(self.args.output), tokens=p.tokens)


def read_sources(args: TrainArgs, say) -> list[tuple[str, list[dict], int]]:
    """Every --data source's records (checked before the model loads): [(source, records, skipped)]."""
    from prolora_cli.data.chat import describe_formats, read_data

    sources = []
    for path in data_sources(args):
        records, skipped = read_data(path, args.skip_bad_lines, args.data_format, args.data_split)
        say(f"{path}: {len(records):,} examples ({describe_formats(records)})"
            + (f", {skipped} bad record(s) skipped" if skipped else ""))
        sources.append((str(path), records, skipped))
    return sources


def data_sources(args: TrainArgs) -> list:
    return list(args.data) if isinstance(args.data, (list, tuple)) else [args.data]


def mix(datasets_: list, args: TrainArgs):
    """One training set from several: concatenated, or drawn with --data-weights (datasets'
    interleave_datasets, seeded, until every source has been seen whole)."""
    import datasets

    if len(datasets_) == 1:
        return datasets_[0]
    if not args.data_weights:
        return datasets.concatenate_datasets(datasets_)
    weights = parse_weights(args.data_weights, len(datasets_))
    return datasets.interleave_datasets(datasets_, probabilities=weights, seed=args.seed,
                                        stopping_strategy="all_exhausted")


def parse_weights(text: str, count: int) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--data-weights: cannot read {text!r} (like 0.7,0.3)") from None
    if len(weights) != count or any(w <= 0 for w in weights):
        raise UserError(f"--data-weights needs {count} positive numbers, one per --data, got {text!r}")
    return [w / sum(weights) for w in weights]


def load_inputs(args: TrainArgs, device, say):
    """Data first (a bad file should fail before the model loads), then model and tokenizer.
    Returns (model, model_id, chat format, train dataset, eval dataset or None)."""
    from prolora_cli.data.chat import read_data, resolve_chat_format
    from prolora_cli.models.loading import load_model
    from prolora_cli.training.sharding import fsdp_requested

    sources = read_sources(args, say)
    eval_records = read_data(args.eval_data, args.skip_bad_lines, args.data_format)[0] if args.eval_data else []
    model, tokenizer, model_id = load_model(args.model, args.quant, device=device,
                                            trust_remote_code=args.trust_remote_code, fsdp=fsdp_requested())
    fmt = resolve_chat_format(tokenizer, args.chat_format)
    train_ds = mix([tokenize_split(src, records, tokenizer, args, fmt, say) for src, records, _ in sources], args)
    eval_ds = tokenize_split(args.eval_data, eval_records, tokenizer, args, fmt, say) if args.eval_data else None
    return model, tokenizer, model_id, fmt, train_ds, eval_ds


def make_loaders(train_ds, eval_ds, pad_id: int, args: TrainArgs, processes: int):
    """Loaders of global micro-batches (--batch-size x processes): the order, length grouping
    included, is decided on the global batch, and accelerate (split_batches) hands each process its
    slice. So the examples of a step do not depend on how many processes share them."""
    import torch
    from torch.utils.data import DataLoader

    from prolora_cli.data.packing import collate_packed, pack

    size = args.batch_size * processes
    columns = ["input_ids", "labels"]
    if args.packing:  # rows of several examples, each attending only to itself
        train_ds, columns = pack(train_ds, args.max_seq_len), [*columns, "position_ids"]
    sampler = EpochLengthSampler([len(x) for x in train_ds["input_ids"]], size, args.seed, args.group_by_length)
    # A dedicated generator: DataLoader draws a base seed per epoch, which must not touch the
    # global RNG (dropout) or a resumed run would drift.
    loader = DataLoader(train_ds.with_format(None, columns=columns), batch_size=size, sampler=sampler,
                        collate_fn=collate_packed(pad_id) if args.packing else collate(pad_id),
                        generator=torch.Generator().manual_seed(args.seed))
    eval_loader = None if eval_ds is None else DataLoader(
        eval_ds.with_format(None, columns=["input_ids", "labels"]), batch_size=size, collate_fn=collate(pad_id))
    return loader, eval_loader


def setup(args: TrainArgs, report, resume_from: Optional[Path]) -> Run:
    """Everything up to the first step: accelerator, data, model with its adapter, optimizer."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from transformers import get_linear_schedule_with_warmup

    from prolora_cli.adapter.inject import count_trainable, inject
    from prolora_cli.training.sharding import check_shardable, fsdp_requested, param_shapes

    use_cpu = args.device == "cpu" or not torch.cuda.is_available()
    bf16 = not use_cpu and torch.cuda.is_bf16_supported()
    # Accumulation is done by hand (Run.train_step) to normalise the loss by the tokens of the
    # whole step; split_batches: each process takes its slice of every global micro-batch.
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="bf16" if bf16 else "no",
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              log_with=trackers_of(args.report_to) or None,
                              project_config=ProjectConfiguration(project_dir=str(args.output),
                                                                  logging_dir=str(args.output / "logs")))
    set_seed(args.seed)
    say = report.message if accelerator.is_main_process else (lambda _msg: None)
    n = accelerator.num_processes
    launch = f"{n} processes ({accelerator.distributed_type.value.lower()})" if n > 1 else "1 process"
    say(f"{launch}: batch {args.batch_size} per process x {n} x {args.grad_accum} accumulation = "
        f"{args.batch_size * n * args.grad_accum} sequences per step")
    model, tokenizer, model_id, fmt, train_ds, eval_ds = load_inputs(args, accelerator.device, say)
    # The adapter settings of a resumed run are the run's own, not this command line's.
    cfg = args.adapter if resume_from else replace(args.adapter, base_model=model_id)
    layers = inject(model, cfg)
    if fsdp_requested():
        check_shardable(cfg, layers)
    shapes = param_shapes(layers)
    for param in model.parameters():  # zero-sized (PRoLoRA with u = 0): nothing to learn, and DDP
        if param.numel() == 0:        # would wait for gradients they never get
            param.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total_params = count_trainable(model)
    loader, eval_loader = make_loaders(train_ds, eval_ds, tokenizer.pad_token_id, args, n)
    sampler = loader.sampler
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * math.ceil(len(loader) / args.grad_accum)))
    optimizer = build_optimizer(model, layers, args)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    # Stepped by hand once per optimizer step; registered so checkpoints hold it.
    accelerator.register_for_checkpointing(scheduler)
    raw_model = accelerator.unwrap_model(model)  # under FSDP its paths hold wrappers: keep `layers`
    info = dict(model=model_id, examples=len(train_ds), eval_examples=len(eval_ds) if eval_ds else 0,
                trainable=trainable, total_params=total_params, chat_format=fmt, device=str(accelerator.device),
                steps=total_steps, batch=args.batch_size * args.grad_accum * n, processes=n)
    return Run(args, cfg, report, accelerator, model, raw_model, layers, loader, eval_loader,
               optimizer, scheduler, total_steps, info, Progress(processes=n), sampler, shapes)


def start_or_resume(run: Run, resume_from: Optional[Path]) -> None:
    """Checkpoints hold the adapter (never the frozen base); resume loads one, a new run writes
    its run_config.json. Either way train_log.jsonl restarts from the history kept so far."""
    from prolora_cli.adapter.files import read_tensors

    def save_hook(models, weights, output_dir):
        weights.clear()
        run.save_adapter(Path(output_dir), run.cfg)

    def load_hook(models, input_dir):
        models.clear()
        run.load_adapter(read_tensors(input_dir))

    run.accelerator.register_save_state_pre_hook(save_hook)
    run.accelerator.register_load_state_pre_hook(load_hook)
    args = run.args
    if resume_from is not None:
        progress = Progress(**json.loads((resume_from / STATE_NAME).read_text()))
        if progress.processes != run.accelerator.num_processes:
            raise UserError(f"{resume_from} was written by {progress.processes} process(es); resume it with "
                            f"{progress.processes} (each process's random state and share of the data are in it)")
        run.accelerator.load_state(str(resume_from))
        run.progress = progress
        run.say(f"resuming from {resume_from.name} (step {run.progress.step} of {run.total_steps})")
    elif run.main:
        args.output.mkdir(parents=True, exist_ok=True)
        from prolora_cli import __version__
        from prolora_cli.training.run_config import RUN_KEY, flag_values

        facts = {"prolora": __version__, "base_model": run.cfg.base_model, "chat_format_used": run.info["chat_format"],
                 "processes": run.accelerator.num_processes, "adapter": run.cfg.to_dict()}
        write_text_atomic(args.output / RUN_CONFIG, json.dumps(
            {**flag_values(args, run.cfg.to_flags()), RUN_KEY: facts}, indent=2) + "\n")
    if run.main:  # on resume, forget what the interrupted run logged after its checkpoint
        write_text_atomic(args.output / LOG_NAME, "".join(json.dumps(r) + "\n" for r in run.progress.history))


def train(args: TrainArgs, report) -> dict:
    """Run (or resume) training. `report` receives progress events (see console.TrainReporter)."""
    from prolora_cli.adapter.files import read_config
    from prolora_cli.models.loading import quiet_libraries

    quiet_libraries()
    args.check()
    resume_from = prepare_output(args)
    if resume_from is not None:
        args = replace(args, adapter=read_config(resume_from))
    run = setup(args, report, resume_from)
    start_or_resume(run, resume_from)
    # Ctrl-C sets a flag; the loop saves a checkpoint at the next step boundary and stops.
    stop = {"asked": False}
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True

    signal.signal(signal.SIGINT, on_sigint)
    if run.accelerator.log_with:  # the run's flags as hyperparameters (trackers take plain values only)
        from prolora_cli.training.run_config import flag_values

        flags = flag_values(run.args, run.cfg.to_flags())
        run.accelerator.init_trackers("prolora", config={k: ",".join(v) if isinstance(v, list) else v
                                                         for k, v in flags.items() if v is not None})
    report.start(run.total_steps, run.progress.step, run.info, enabled=run.main)
    try:
        if run.eval_loader is not None and run.progress.step == 0:  # where the curve starts
            run.log(dict(step=0, epoch=0, eval_loss=run.evaluate()))
        run.loop(stop)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    summary = run.finish()
    if run.accelerator.log_with:
        run.accelerator.end_training()
    if run.main:
        report.end(summary)
    return summary


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and eval loss against step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prolora_cli.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
