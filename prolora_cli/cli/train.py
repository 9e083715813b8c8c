"""`prolora train`: QLoRA fine-tuning with PRoLoRA (or --method) on chat data."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from prolora_cli.cli import render
from prolora_cli.cli.options import (
    ALPHA,
    CONFIG,
    DATA,
    DROPOUT,
    METHOD,
    MODEL,
    MODEL_PANEL,
    RANK,
    RUN,
    SCALING,
    TARGETS,
    TRAINING,
    adapter_config,
    with_method_flags,
)
from prolora_cli.training.args import TrainArgs

# The core loads inside the command: `prolora --help` must not import torch.


def option(default, *names: str, panel: str, help: str | None = None):
    return typer.Option(default, *names, help=help, rich_help_panel=panel)


@with_method_flags()
def train(
    ctx: typer.Context,
    data: List[Path] = option(..., "--data", panel=DATA, help="Chat data: .jsonl, .json, .parquet, .csv, a saved "
                              "dataset folder or a cached hub dataset id; messages, ShareGPT, Alpaca or "
                              "prompt/completion records. Repeat to mix several."),
    data_weights: Optional[str] = option(None, "--data-weights", panel=DATA, help="Mix several --data by these "
                                         "weights (like 0.7,0.3); default: concatenate."),
    data_split: str = option(TrainArgs.data_split, "--data-split", panel=DATA, help="Split of a hub dataset."),
    num_proc: Optional[int] = option(None, "--num-proc", panel=DATA, help="Processes that tokenize the data "
                                     "(default: the cores available; one per 10,000 examples at most)."),
    cache_dir: Optional[Path] = option(None, "--cache-dir", panel=DATA, help="Where tokenized data is kept for "
                                       "reruns (default: ~/.cache/prolora/data, or $PROLORA_CACHE/data)."),
    eval_data: Optional[Path] = option(None, "--eval-data", panel=DATA, help="Held-out chat JSONL for eval loss."),
    chat_format: str = option(TrainArgs.chat_format, "--chat-format", panel=DATA,
                              help="'tulu', 'template' (the tokenizer's) or 'auto'."),
    data_format: str = option(TrainArgs.data_format, "--data-format", panel=DATA, help="Shape of the records: "
                              "auto (detected per record), messages, sharegpt, alpaca or prompt-completion."),
    system_prompt: Optional[str] = option(None, "--system-prompt", panel=DATA, help="A system turn for every "
                                          "conversation that has none; the adapter records it, and chat and "
                                          "generate use it."),
    max_seq_len: int = option(TrainArgs.max_seq_len, "--max-seq-len", panel=DATA,
                              help="Truncate examples to this many tokens."),
    skip_bad_lines: bool = option(False, "--skip-bad-lines", panel=DATA,
                                  help="Skip malformed lines instead of stopping."),
    packing: bool = option(False, "--packing", panel=DATA, help="Pack several examples into each --max-seq-len "
                           "sequence (each attends only to itself): less padding."),
    model: Optional[str] = MODEL,
    quant: str = option(TrainArgs.quant, "--quant", panel=MODEL_PANEL,
                        help="'nf4' (4-bit QLoRA base) or 'none' (full precision)."),
    trust_remote_code: bool = option(False, "--trust-remote-code", panel=MODEL_PANEL,
                                     help="Allow model code from the hub."),
    device: Optional[str] = option(None, "--device", panel=MODEL_PANEL, help="'cpu' to stay off the GPU."),
    method: str = METHOD, rank: int = RANK, targets: Optional[str] = TARGETS, alpha: float = ALPHA,
    scaling: str = SCALING, dropout: float = DROPOUT,
    lr: float = option(TrainArgs.lr, "--lr", panel=TRAINING, help="Learning rate."),
    lr_shared: Optional[float] = option(None, "--lr-shared", panel=TRAINING,
                                        help="Learning rate of shared tensors (default: --lr)."),
    warmup_ratio: float = option(TrainArgs.warmup_ratio, "--warmup-ratio", panel=TRAINING,
                                 help="Linear warm-up, as a fraction of the steps."),
    weight_decay: float = option(TrainArgs.weight_decay, "--weight-decay", panel=TRAINING),
    max_grad_norm: float = option(TrainArgs.max_grad_norm, "--max-grad-norm", panel=TRAINING),
    optim: str = option(TrainArgs.optim, "--optim", panel=TRAINING,
                        help="'paged_adamw_32bit' (bitsandbytes) or 'adamw' (torch)."),
    batch_size: int = option(TrainArgs.batch_size, "--batch-size", panel=TRAINING,
                             help="Sequences per device per micro-batch."),
    grad_accum: int = option(TrainArgs.grad_accum, "--grad-accum", panel=TRAINING,
                             help="Micro-batches per optimizer step."),
    max_steps: Optional[int] = option(None, "--max-steps", panel=TRAINING, help="Optimizer steps (overrides --epochs)."),
    epochs: float = option(TrainArgs.epochs, "--epochs", panel=TRAINING),
    seed: int = option(TrainArgs.seed, "--seed", panel=TRAINING),
    group_by_length: bool = option(TrainArgs.group_by_length, "--group-by-length/--no-group-by-length",
                                   panel=TRAINING),
    gradient_checkpointing: bool = option(False, "--gradient-checkpointing", panel=TRAINING,
                                          help="Trade compute for memory."),
    loss: str = option(TrainArgs.loss, "--loss", panel=TRAINING,
                       help="'full' (transformers': logits of every position), 'chunked' (the answer positions "
                            "only, a chunk at a time: same loss, less memory) or 'liger' (Liger's fused kernel; "
                            "CUDA)."),
    kernels: str = option(TrainArgs.kernels, "--kernels", panel=TRAINING,
                          help="'none' or 'liger': Liger's fused RMSNorm, RoPE and SwiGLU (CUDA; "
                               "pip install 'prolora[kernels]')."),
    config: Optional[Path] = CONFIG,
    output: Path = option(Path("runs/prolora"), "--output", "-o", panel=RUN,
                          help="Run folder: adapter, log, plot, checkpoints."),
    eval_every: int = option(TrainArgs.eval_every, "--eval-every", panel=RUN,
                             help="Eval every N steps (0: at start and end only)."),
    save_every: int = option(TrainArgs.save_every, "--save-every", panel=RUN, help="Checkpoint every N steps (0: never)."),
    save_total_limit: int = option(TrainArgs.save_total_limit, "--save-total-limit", panel=RUN,
                                   help="Checkpoints to keep."),
    log_every: int = option(TrainArgs.log_every, "--log-every", panel=RUN, help="Log every N steps."),
    report_to: str = option(TrainArgs.report_to, "--report-to", panel=RUN, help="Also log to: none, tensorboard, "
                            "wandb, mlflow (comma-separated; each needs its package). TensorBoard writes to OUTPUT/logs."),
    resume: bool = option(False, "--resume", panel=RUN, help="Continue from the newest intact checkpoint in --output."),
    resume_from: Optional[Path] = option(None, "--resume-from", panel=RUN, help="Continue from this checkpoint "
                                         "folder (OUTPUT/checkpoints/step-N)."),
    overwrite: bool = option(False, "--overwrite", panel=RUN, help="Replace an existing run in --output."),
    dry_run: bool = option(False, "--dry-run", panel=RUN, help="Read, render and count everything up to the first "
                           "step, without the model's weights; print it and write nothing but the tokenized-data "
                           "cache."),
    as_json: bool = option(False, "--json", panel=RUN, help="With --dry-run: print the result as JSON."),
):
    """Fine-tune a model with PRoLoRA (or --method) as QLoRA on a 4-bit NF4 base, on chat data."""
    args = TrainArgs.from_flags(ctx.params, adapter_config(ctx.params))
    if dry_run:
        from prolora_cli.training.dry_run import dry_run as preview

        result = preview(args)
        if as_json:
            render.print_json(result)
        else:
            render.print_dry_run(result)
        return
    from prolora_cli.training.loop import Interrupted
    from prolora_cli.training.trainer import train as run_training

    reporter = render.TrainReporter(render.out)
    try:
        run_training(args, reporter)
    except Interrupted as e:
        reporter.stop()
        if render.rank_zero():
            render.err.print(f"interrupted ({e.signal_name}): checkpoint saved in {e.checkpoint}; continue with the "
                             f"same command and --resume", highlight=False)
        raise typer.Exit(e.exit_code)
    finally:
        reporter.stop()
