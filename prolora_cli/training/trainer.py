"""A training run from start to end: QLoRA + PRoLoRA (or any method) on chat data, driven by accelerate.

A plain loop (loop.py) rather than transformers' Trainer: Trainer refuses 4-bit models whose adapters
are not PEFT's. accelerate still brings devices, mixed precision, DDP/FSDP through `accelerate launch`,
and checkpoint state; transformers brings the schedule and length grouping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from accelerate.utils.other import load as load_weights_only

from prolora_cli import __version__
from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import count_trainable, inject
from prolora_cli.data.chat import resolve_chat_format
from prolora_cli.errors import MachineFault, UserError, os_fault
from prolora_cli.fileio import exclusive, write_text_atomic
from prolora_cli.models.loading import load_model, load_tokenizer, quiet_libraries
from prolora_cli.training.args import TrainArgs, trackers_of
from prolora_cli.training.checkpoints import LEGACY_SCHEDULER, SCHEDULER_NAME, STATE_NAME, CheckpointFault, resume_hint
from prolora_cli.training.data import count_steps, eval_examples, make_loaders, training_examples, training_rows
from prolora_cli.training.kernels import apply_kernels
from prolora_cli.training.loop import Progress, Reporter, Run
from prolora_cli.training.losses import with_loss, without_loss
from prolora_cli.training.optimization import build_optimizer, build_scheduler
from prolora_cli.training.run_config import RUN_KEY, flag_values
from prolora_cli.training.run_folder import LOG_NAME, RUN_CONFIG, prepare_output
from prolora_cli.training.sharding import check_shardable, fsdp_requested, param_shapes


def load_inputs(args: TrainArgs, accelerator: Accelerator, say):
    """Data first (a bad file should fail before the model loads; the main process tokenizes into the
    cache, the others then read it), then the model. Returns (model, tokenizer, model id, chat format,
    train dataset, eval dataset or None)."""
    tokenizer = load_tokenizer(args.model)
    fmt = resolve_chat_format(tokenizer, args.chat_format)
    with accelerator.main_process_first():
        train_ds, _ = training_examples(tokenizer, fmt, args, say)
        eval_ds = eval_examples(tokenizer, fmt, args, say)
    model, tokenizer, model_id = load_model(args.model, args.quant, device=accelerator.device,
                                            trust_remote_code=args.trust_remote_code, fsdp=fsdp_requested())
    return model, tokenizer, model_id, fmt, train_ds, eval_ds


def make_accelerator(args: TrainArgs) -> Accelerator:
    use_cpu = args.device == "cpu" or not torch.cuda.is_available()
    bf16 = not use_cpu and torch.cuda.is_bf16_supported()
    # Accumulation is done by hand (Run.train_step) to normalise the loss by the tokens of the
    # whole step; split_batches: each process takes its slice of every global micro-batch.
    return Accelerator(cpu=use_cpu, mixed_precision="bf16" if bf16 else "no",
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       log_with=trackers_of(args.report_to) or None,
                       project_config=ProjectConfiguration(project_dir=str(args.output),
                                                           logging_dir=str(args.output / "logs")))


def setup(args: TrainArgs, report: Reporter, resume_from: Optional[Path]) -> Run:
    """Everything up to the first step: accelerator, data, model with its adapter, optimizer."""
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    say = report.message if accelerator.is_main_process else (lambda _msg: None)
    n = accelerator.num_processes
    launch = f"{n} processes ({accelerator.distributed_type.value.lower()})" if n > 1 else "1 process"
    say(f"{launch}: batch {args.batch_size} per process x {n} x {args.grad_accum} accumulation = "
        f"{args.batch_size * n * args.grad_accum} sequences per step")
    model, tokenizer, model_id, fmt, train_ds, eval_ds = load_inputs(args, accelerator, say)
    # The adapter settings of a resumed run are the run's own, not this command line's. The adapter
    # records how it was prompted, so that chat and generate prompt it the same way.
    cfg = args.adapter if resume_from else replace(args.adapter, base_model=model_id, chat_format=fmt,
                                                   system_prompt=args.system_prompt)
    apply_kernels(model, args.kernels)
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
    model = with_loss(model, args.loss)
    rows = training_rows(train_ds, args)
    loader, eval_loader = make_loaders(rows, eval_ds, tokenizer.pad_token_id, args, n)
    sampler = loader.sampler
    total_steps = count_steps(len(rows), args, n)[1]
    optimizer = build_optimizer(model, layers, args)
    scheduler = build_scheduler(optimizer, args, total_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    # Stepped by hand once per optimizer step; checkpoints hold its state as JSON (never a pickle).
    info = dict(model=model_id, examples=len(train_ds), eval_examples=len(eval_ds) if eval_ds else 0,
                trainable=trainable, total_params=total_params, chat_format=fmt, device=str(accelerator.device),
                steps=total_steps, batch=args.batch_size * args.grad_accum * n, processes=n)
    return Run(args=args, cfg=cfg, report=report, accelerator=accelerator, model=model,
               raw_model=without_loss(accelerator.unwrap_model(model)), layers=layers, shapes=shapes, loader=loader,
               sampler=sampler, eval_loader=eval_loader, optimizer=optimizer, scheduler=scheduler,
               total_steps=total_steps, info=info, progress=Progress(processes=n))


def start_or_resume(run: Run, resume_from: Optional[Path]) -> None:
    """Checkpoints hold the adapter (never the frozen base); resume loads one, a run folder without a
    run_config.json gets one. Either way train_log.jsonl restarts from the history kept so far."""
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
        run.scheduler.load_state_dict(scheduler_state(resume_from))
        run.progress = progress
        run.say(f"resuming from {resume_from.name} (step {run.progress.step} of {run.total_steps})")
    if run.main and not (args.output / RUN_CONFIG).is_file():  # a new run, or --resume-from into a new folder
        args.output.mkdir(parents=True, exist_ok=True)
        facts = {"prolora": __version__, "base_model": run.cfg.base_model, "chat_format_used": run.info["chat_format"],
                 "processes": run.accelerator.num_processes, "adapter": run.cfg.to_dict()}
        write_text_atomic(args.output / RUN_CONFIG, json.dumps(
            {**flag_values(args, run.cfg.to_flags()), RUN_KEY: facts}, indent=2) + "\n")
    if run.main:  # on resume, forget what the interrupted run logged after its checkpoint
        write_text_atomic(args.output / LOG_NAME, "".join(json.dumps(r) + "\n" for r in run.progress.history))


def scheduler_state(checkpoint: Path) -> dict:
    """The scheduler's state in a checkpoint: JSON, or in checkpoints of prolora 0.1 the pickle accelerate
    wrote, read with torch's weights_only unpickler (numbers and lists only, never code)."""
    if (checkpoint / SCHEDULER_NAME).is_file():
        return json.loads((checkpoint / SCHEDULER_NAME).read_text(encoding="utf-8"))
    return load_weights_only(checkpoint / LEGACY_SCHEDULER, map_location="cpu")


def init_trackers(run: Run) -> None:
    """The run's flags as hyperparameters of --report-to's trackers (they take plain values only)."""
    flags = flag_values(run.args, run.cfg.to_flags())
    run.accelerator.init_trackers("prolora", config={k: ",".join(v) if isinstance(v, list) else v
                                                     for k, v in flags.items() if v is not None})


def train(args: TrainArgs, report: Reporter) -> dict:
    """Run (or resume) training, holding the run folder's lock (the main process takes it: under a
    launcher RANK 0). `report` receives progress events (see cli.render.TrainReporter)."""
    quiet_libraries()
    args.check()
    main = os.environ.get("RANK", "0") == "0"
    with exclusive(args.output, report.message) if main else contextlib.nullcontext():
        resume_from = prepare_output(args, report.message if main else lambda _m: None)
        if resume_from is not None:
            args = replace(args, adapter=read_config(resume_from))
        run = setup(args, report, resume_from)
        start_or_resume(run, resume_from)
        try:
            summary = run_until_done(run)
        except CheckpointFault:
            raise
        except (MachineFault, OSError) as e:  # the log, the plot or the final adapter could not be written
            reason = e if isinstance(e, MachineFault) else os_fault(e, "cannot write")
            raise MachineFault(f"{reason}; {resume_hint(args.output)}") from None
    if run.main:
        report.end(summary)
    return summary


def run_until_done(run: Run) -> dict:
    """The loop to the last step, then the finished adapter. Ctrl-C and SIGTERM (what schedulers such as
    SLURM and Kubernetes send before they kill) set a flag; the loop saves a checkpoint at the next step
    boundary, every process at the same one, and stops. A second signal stops at once."""
    stop = {"asked": None}

    def on_signal(signum, frame):
        if stop["asked"] is not None:
            raise KeyboardInterrupt
        stop["asked"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if run.accelerator.log_with:
        init_trackers(run)
    run.report.start(run.total_steps, run.progress.step, run.info, enabled=run.main)
    try:
        if run.eval_loader is not None and run.progress.step == 0:  # where the curve starts
            run.log(dict(step=0, epoch=0, eval_loss=run.evaluate()))
        run.loop(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    summary = run.finish()
    if run.accelerator.log_with:
        run.accelerator.end_training()
    return summary
