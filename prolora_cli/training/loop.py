"""The training loop: steps with exact gradient accumulation, evaluation, logging, checkpoints, and the
finished adapter. `trainer.setup` builds a Run; `trainer.train` drives it.

Resume is exact: a checkpoint holds the adapter, optimizer, scheduler and every RNG state, and the
data order of each epoch is a pure function of (seed, epoch), so the resumed run skips the batches
already seen and continues bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.files import save_adapter_tensors
from prolora_cli.adapter.inject import adapter_layers, finalize, load_layers_state, saved_config
from prolora_cli.data.chat import IGNORE
from prolora_cli.data.packing import seen_tokens
from prolora_cli.errors import MachineFault
from prolora_cli.methods.base import AdapterLayer
from prolora_cli.training.args import TrainArgs
from prolora_cli.training.checkpoints import (
    SCHEDULER_NAME,
    STATE_NAME,
    checkpoint_fault,
    checkpoint_path,
    complete_checkpoints,
)
from prolora_cli.training.data import EpochLengthSampler
from prolora_cli.training.optimization import mean_eval_loss
from prolora_cli.training.run_folder import LOG_NAME, PLOT_NAME, plot_losses
from prolora_cli.training.sharding import full_adapter_state, load_full_adapter_state, units


class Reporter(Protocol):
    """Where a run's events go (the CLI's render.TrainReporter)."""

    def message(self, text: str) -> None: ...
    def start(self, total: int, done: int, info: dict, enabled: bool = True) -> None: ...
    def step(self, step: int, record: dict | None) -> None: ...
    def end(self, summary: dict) -> None: ...


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
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during training: a checkpoint was saved."""

    def __init__(self, checkpoint: Path, signum: int):
        super().__init__(str(checkpoint))
        self.checkpoint, self.signal_name = checkpoint, signal.Signals(signum).name
        self.exit_code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them


@dataclass(kw_only=True)
class Run:
    """Everything a run holds between its steps."""
    args: TrainArgs
    cfg: AdapterConfig
    report: Reporter
    accelerator: Accelerator
    model: nn.Module                     # as accelerate prepared it (DDP/FSDP wrapped)
    raw_model: nn.Module                 # unwrapped; under FSDP its paths hold wrappers, so keep `layers`
    layers: dict[str, AdapterLayer]
    shapes: dict[str, dict]              # the layers' parameter shapes before any sharding
    loader: DataLoader
    sampler: EpochLengthSampler          # the training order, set to each epoch by hand
    eval_loader: Optional[DataLoader]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    info: dict                           # what the first line of output says about the run
    progress: Progress

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
        """Write checkpoints/step-N atomically: only complete checkpoints ever carry that name. A write that
        fails (a full disk) leaves no partial checkpoint and names the one that can be resumed."""
        acc, out = self.accelerator, self.args.output
        final = checkpoint_path(out, self.progress.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # before any process writes its RNG states into it
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))  # the adapter (our hook), the optimizer, every process's RNG states
            acc.wait_for_everyone()  # all of them written before the folder takes its final name
            if self.main:
                (tmp / SCHEDULER_NAME).write_text(json.dumps(self.scheduler.state_dict()))
                (tmp / STATE_NAME).write_text(json.dumps(vars(self.progress)))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        except (OSError, RuntimeError, MachineFault) as e:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_fault(e, final.name, out) from None
        if self.main:
            for old in complete_checkpoints(out)[self.args.save_total_limit:]:
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
            if self.accelerator.device.type == "cuda":  # the peak so far, as a GPU budget needs it
                record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
            window.update(tokens=0, trained=0, start=now, loss=0.0, steps=0)
        if self.eval_loader is not None and (
                p.step == self.total_steps or (args.eval_every and p.step % args.eval_every == 0)):
            record = {**(record or dict(step=p.step, epoch=p.epoch)), "eval_loss": self.evaluate()}
        if record is not None:
            self.log(record)
        self.report.step(p.step, record)

    def stop_asked(self, stop: dict) -> bool:
        """A Ctrl-C or SIGTERM reaches the processes at different moments; they stop at the same step."""
        flag = torch.tensor(float(stop["asked"] is not None), device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def loop(self, stop: dict) -> None:
        """Train up to total_steps; a Ctrl-C or SIGTERM (stop["asked"]: the signal) ends at the next step
        with a checkpoint."""
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
                    raise Interrupted(self.save_checkpoint(), stop["asked"] or signal.SIGTERM)
                if self.args.save_every and p.step % self.args.save_every == 0 and p.step < self.total_steps:
                    self.save_checkpoint()
            if p.step < self.total_steps:
                p.epoch += 1
                p.batch_in_epoch = 0

    def save_adapter(self, folder: Path, cfg: AdapterConfig) -> None:
        """Every process takes part (under FSDP the adapter is gathered block by block); the main
        one writes."""
        state = full_adapter_state(self.model, self.layers, self.shapes)
        if self.main:
            save_adapter_tensors(folder, saved_config(cfg, self.layers), state)

    def load_adapter(self, state: dict) -> None:
        if units(self.model):
            load_full_adapter_state(self.model, self.layers, self.shapes, state)
        else:
            load_layers_state(self.layers, state)

    def finish(self) -> dict:
        """Save the final adapter (the method may compact it first), the loss plot, and summarise."""
        final_cfg, message = finalize(self.raw_model, self.cfg)
        if message:
            self.say(message)
        if not units(self.model):  # the layers the method finalized (FSDP refuses methods that rebuild)
            self.layers = adapter_layers(self.raw_model)
        self.save_adapter(self.args.output, final_cfg)
        if self.main:
            plot_losses(self.progress.history, self.args.output / PLOT_NAME)
        self.accelerator.wait_for_everyone()
        p = self.progress
        first_eval = next((r["eval_loss"] for r in p.history if "eval_loss" in r), None)
        return dict(steps=p.step, time_s=p.elapsed, train_loss=p.last_loss, eval_loss=p.last_eval_loss,
                    eval_loss_start=first_eval, trainable_params=self.info["trainable"],
                    adapter_bytes=(self.args.output / "adapter.safetensors").stat().st_size,
                    output=str(self.args.output), tokens=p.tokens)
