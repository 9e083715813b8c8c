"""The `prolora` command line: parse flags, call the core, print. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prolora_cli import __version__
from prolora_cli.errors import UserError

app = typer.Typer(
    help="Fine-tune LLaMA-family models with PRoLoRA, then merge, evaluate and inspect the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

# Flags shared by the commands that build an adapter.
RANK = typer.Option(8, "--rank", "-r", help="Rank r of dW.")
UNSHARED = typer.Option(None, "--unshared", "-u", help="Unshared ranks u (default: = rank, i.e. plain LoRA).")
SHARE = typer.Option(None, "--share", "-m", help="Sharing ratio m of A (default: rank - unshared).")
SHARE_B = typer.Option(None, "--share-b", "-n", help="Sharing ratio n of B (default: m).")
TARGETS = typer.Option("all", "--targets", help="Layers to adapt: q,k,v,o,gate,up,down or 'all'.")
BROADCAST = typer.Option("hidden", "--broadcast", help="Broadcast copies along 'hidden' (paper) or 'rank'.")
ROTATION = typer.Option("rank", "--rotation", help="Rotate copies along 'rank' (paper), 'hidden', or 'none'.")
INIT = typer.Option("rectified", "--init", help="'rectified' (fan-in of the full layer) or 'vanilla'.")
METHOD = typer.Option("prolora", "--method", help="prolora, lora, vera, tied-lora, sora or prilora "
                      "(see docs/methods.md).")
VERA_SEED = typer.Option(0, "--vera-seed", help="VeRA: seed of the frozen random projections.")
SPARSE_LAMBDA = typer.Option(1e-4, "--sparse-lambda", help="SoRA: soft threshold at the start.")
MAX_LAMBDA = typer.Option(5e-4, "--max-lambda", help="SoRA: soft threshold in the last stage.")
LAMBDA_STAGES = typer.Option(5, "--lambda-stages", help="SoRA: stages of the threshold schedule.")
RANK_FIRST = typer.Option(None, "--rank-first", help="PRILoRA: rank of the first block (default rank/2).")
RANK_LAST = typer.Option(None, "--rank-last", help="PRILoRA: rank of the last block (default 3*rank/2).")
PRUNE_EVERY = typer.Option(50, "--prune-every", help="PRILoRA: prune A every N steps (0: never).")
PRUNE_FRACTION = typer.Option(0.05, "--prune-fraction", help="PRILoRA: share of each row of A pruned each time.")
MAX_SPARSITY = typer.Option(0.5, "--max-sparsity", help="PRILoRA: stop pruning a row at this share.")


def method_options(method, vera_seed, sparse_lambda, max_lambda, lambda_stages, rank_first, rank_last,
                   prune_every, prune_fraction, max_sparsity) -> dict:
    return dict(method=method, vera_seed=vera_seed, sora_lambda=sparse_lambda, sora_max_lambda=max_lambda,
                sora_stages=lambda_stages, rank_first=rank_first, rank_last=rank_last, prune_every=prune_every,
                prune_fraction=prune_fraction, max_sparsity=max_sparsity)


@app.command("count-params")
def count_params_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Preset (llama2-7b, llama2-13b, llama2-70b, "
                                        "smollm2-135m), model folder, config.json or .gguf. Default: smollm2-135m."),
    rank: int = RANK, unshared: Optional[int] = UNSHARED, share: Optional[int] = SHARE,
    share_b: Optional[int] = SHARE_B, targets: str = TARGETS, broadcast: str = BROADCAST,
    method: str = METHOD, rank_first: Optional[int] = RANK_FIRST, rank_last: Optional[int] = RANK_LAST,
    budget: Optional[str] = typer.Option(None, "--budget", help="List settings that fit N params (5M, 4997120)."),
    max_rank: int = typer.Option(64, "--max-rank", help="With --budget: the highest rank to consider."),
    top: int = typer.Option(15, "--top", help="With --budget: how many ranks to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Count trainable parameters for a setting, or find settings that fit a budget. Loads no weights."""
    from prolora_cli.arch import resolve_architecture
    from prolora_cli.config import AdapterConfig, parse_targets
    from prolora_cli.planner import fit_budget, parse_count, plan

    arch = resolve_architecture(model)
    if budget is not None:
        rows = fit_budget(arch, parse_targets(targets), parse_count(budget), max_rank, top)
        if as_json:
            out.print_json(json.dumps({"model": arch.name, "budget": parse_count(budget), "settings": rows}))
            return
        table = Table(title=f"Best PRoLoRA setting per rank within {parse_count(budget):,} params "
                            f"on {arch.name}")
        for col in ("r", "u", "m = n", "trainable params", "LoRA-equivalent rank"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(str(row["r"]), str(row["u"]), str(row["m"]), f"{row['trainable_params']:,}",
                          f"{row['equivalent_lora_rank']:.2f}")
        out.print(table)
        if not rows:
            out.print("Nothing fits: the budget is below a rank-1 PRoLoRA at the largest sharing ratio.")
        return
    cfg = AdapterConfig.create(rank, unshared, share, share_b, targets=targets, broadcast=broadcast,
                               method=method, rank_first=rank_first, rank_last=rank_last)
    result = plan(arch, cfg)
    if as_json:
        out.print_json(json.dumps(result))
        return
    title = (f"PRoLoRA r={cfg.r} u={cfg.u} m={cfg.m} n={cfg.n}" if cfg.method == "prolora"
             else f"{cfg.method} r={cfg.r}")
    table = Table(title=f"{arch.name}: {title}")
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


MODEL = typer.Option(None, "--model", help="llama2-7b/13b/70b, a hub id, a local folder or a .gguf file. "
                     "Default: the embedded SmolLM2-135M-Instruct.")


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Chat JSONL: {\"messages\": [...]} or {\"prompt\", \"completion\"}."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out chat JSONL for eval loss."),
    output: Path = typer.Option(Path("runs/prolora"), "--output", "-o", help="Run folder: adapter, log, plot, checkpoints."),
    model: Optional[str] = MODEL,
    quant: str = typer.Option("nf4", "--quant", help="'nf4' (4-bit QLoRA base) or 'none' (full precision)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub."),
    rank: int = RANK, unshared: Optional[int] = UNSHARED, share: Optional[int] = SHARE,
    share_b: Optional[int] = SHARE_B, targets: str = TARGETS, broadcast: str = BROADCAST,
    rotation: str = ROTATION, init: str = INIT, method: str = METHOD,
    vera_seed: int = VERA_SEED, sparse_lambda: float = SPARSE_LAMBDA, max_lambda: float = MAX_LAMBDA,
    lambda_stages: int = LAMBDA_STAGES, rank_first: Optional[int] = RANK_FIRST,
    rank_last: Optional[int] = RANK_LAST, prune_every: int = PRUNE_EVERY, prune_fraction: float = PRUNE_FRACTION,
    max_sparsity: float = MAX_SPARSITY,
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha; scaling = alpha / rank."),
    dropout: float = typer.Option(0.1, "--dropout", help="Dropout on the adapter's input."),
    chat_format: str = typer.Option("auto", "--chat-format", help="'tulu', 'template' (the tokenizer's) or 'auto'."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Truncate examples to this many tokens."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed lines instead of stopping."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate."),
    lr_shared: Optional[float] = typer.Option(None, "--lr-shared", help="Learning rate of the shared chunks (default: --lr)."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Linear warm-up, as a fraction of the steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_grad_norm: float = typer.Option(0.3, "--max-grad-norm"),
    optim: str = typer.Option("paged_adamw_32bit", "--optim", help="'paged_adamw_32bit' (bitsandbytes) or 'adamw' (torch)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per device per micro-batch."),
    grad_accum: int = typer.Option(4, "--grad-accum", help="Micro-batches per optimizer step."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    epochs: float = typer.Option(1.0, "--epochs"),
    seed: int = typer.Option(42, "--seed"),
    group_by_length: bool = typer.Option(True, "--group-by-length/--no-group-by-length"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    eval_every: int = typer.Option(0, "--eval-every", help="Eval every N steps (0: at start and end only)."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: never)."),
    save_total_limit: int = typer.Option(2, "--save-total-limit", help="Checkpoints to keep."),
    log_every: int = typer.Option(1, "--log-every", help="Log every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --output."),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU."),
):
    """Fine-tune a model with PRoLoRA (or --method) as QLoRA on a 4-bit NF4 base, on chat JSONL."""
    from prolora_cli.config import AdapterConfig
    from prolora_cli.console import TrainReporter
    from prolora_cli.training import Interrupted, TrainArgs
    from prolora_cli.training import train as run_training

    adapter = AdapterConfig.create(rank, unshared, share, share_b, targets=targets, broadcast=broadcast,
                                   rotation=rotation, init=init, alpha=alpha, dropout=dropout,
                                   **method_options(method, vera_seed, sparse_lambda, max_lambda, lambda_stages,
                                                    rank_first, rank_last, prune_every, prune_fraction,
                                                    max_sparsity))
    args = TrainArgs(
        data=data, output=output, adapter=adapter, eval_data=eval_data, model=model, quant=quant,
        trust_remote_code=trust_remote_code, chat_format=chat_format, max_seq_len=max_seq_len,
        skip_bad_lines=skip_bad_lines, lr=lr, lr_shared=lr_shared, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, optim=optim, batch_size=batch_size,
        grad_accum=grad_accum, max_steps=max_steps, epochs=epochs, seed=seed,
        group_by_length=group_by_length, gradient_checkpointing=gradient_checkpointing,
        eval_every=eval_every, save_every=save_every, save_total_limit=save_total_limit,
        log_every=log_every, resume=resume, overwrite=overwrite, device=device)
    reporter = TrainReporter(out)
    try:
        run_training(args, reporter)
    except Interrupted as e:
        reporter.stop()
        err.print(f"interrupted: checkpoint saved in {e.checkpoint}; continue with the same command "
                  f"and --resume", highlight=False)
        raise typer.Exit(130)
    finally:
        reporter.stop()


ADAPTER = typer.Option(..., "--adapter", "-a", help="Adapter folder (adapter_config.json + adapter.safetensors).")


@app.command()
def merge(
    adapter: Path = ADAPTER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged transformers model."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the one the adapter records)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights of the merged model: fp32, bf16 or fp16."),
    base: str = typer.Option("full", "--base", help="'full': merge into the original weights; 'nf4': into their "
                             "NF4 round trip, the weights a QLoRA adapter was trained against."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max |logit difference| the check allows, "
                                              "relative to the largest logit (default: 1e-4 fp32, 1e-2 fp16, 6e-2 bf16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Merge an adapter's dW into its base model and write a plain transformers model."""
    from prolora_cli.merging import VerificationFailed, merge_adapter

    try:
        result = merge_adapter(adapter, output, model, dtype, base, overwrite, tolerance,
                               say=lambda msg: None if as_json else out.print(msg, highlight=False))
    except VerificationFailed as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"merged {result['modules_merged']} modules into {result['output']} ({dtype}, {base} base); "
              f"check: max |logit difference| {result['max_abs_logit_diff']:.3g}, "
              f"{result['relative_diff']:.2g} of the largest logit (tolerance {result['tolerance']:g})",
              highlight=False)


@app.command()
def export(
    adapter: Path = ADAPTER,
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the exported adapter."),
    format: str = typer.Option("peft", "--format", help="Only 'peft' (a standard LoRA adapter) for now."),
    scale_into_b: bool = typer.Option(False, "--scale-into-b", help="Fold alpha/r into B (lora_alpha = r)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --output if it exists."),
):
    """Export an adapter as a plain PEFT LoRA adapter (exact: A and B are expanded)."""
    from prolora_cli.peft_format import export_peft

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
    from prolora_cli.peft_format import import_peft

    result = import_peft(peft, output, overwrite)
    out.print(f"imported {result['modules']} modules (r={result['r']}, alpha={result['alpha']:g}) "
              f"into {result['output']}", highlight=False)


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="Chat JSONL; optional \"answers\", \"choices\", \"task\" keys."),
    model: Optional[str] = typer.Option(None, "--model", help="Base or merged model (default: the first adapter's "
                                        "base, else the embedded SmolLM2)."),
    adapter: list[Path] = typer.Option([], "--adapter", "-a", help="Adapter folder; repeat to compare several."),
    with_base: bool = typer.Option(False, "--with-base", help="Also evaluate the base without adapters."),
    metrics: str = typer.Option("loss,exact-match,choice", "--metrics", help="Any of loss, exact-match, choice."),
    quant: str = typer.Option("nf4", "--quant", help="Base weights: 'nf4' (as trained) or 'none'."),
    chat_format: str = typer.Option("auto", "--chat-format", help="'tulu', 'template' or 'auto'."),
    max_seq_len: int = typer.Option(512, "--max-seq-len"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Generation length for exact-match."),
    batch_size: int = typer.Option(8, "--batch-size"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate a reproducible sample of N examples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    by_task: bool = typer.Option(False, "--by-task", help="Break results down by the \"task\" field."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines"),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="JSONL of every prediction."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: Optional[str] = typer.Option(None, "--device", help="'cpu' to stay off the GPU."),
):
    """Evaluate a base model, adapters or a merged model on chat JSONL."""
    from prolora_cli.console import EvalProgress, human_bytes
    from prolora_cli.evaluation import EvalArgs, run_eval
    from prolora_cli.fileio import write_text_atomic

    args = EvalArgs(data=data, model=model, adapters=list(adapter), with_base=with_base,
                    metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), quant=quant,
                    chat_format=chat_format, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, limit=limit, seed=seed, by_task=by_task,
                    skip_bad_lines=skip_bad_lines, device=device)
    with EvalProgress(err, enabled=not as_json) as progress:
        report = run_eval(args, progress)
    predictions = report.pop("predictions")
    if save_predictions:
        write_text_atomic(save_predictions, "".join(
            json.dumps({"model": name, **row}) + "\n" for name, rows in predictions for row in rows))
    if output:
        write_text_atomic(output, json.dumps(report, indent=2) + "\n")
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"{report['model']} on {report['data']} ({report['examples']} examples)")
    columns = [("model", "name", str), ("params", "trainable_params", lambda v: f"{v:,}"),
               ("bytes", "bytes", lambda v: human_bytes(v) if v else "-"),
               ("loss", "loss", lambda v: f"{v:.4f}"), ("ppl", "perplexity", lambda v: f"{v:.2f}"),
               ("exact match", "exact_match", lambda v: f"{100 * v:.1f}%"), ("F1", "f1", lambda v: f"{100 * v:.1f}%"),
               ("choice acc", "choice_accuracy", lambda v: f"{100 * v:.1f}%")]
    shown = [c for c in columns if any(r.get(c[1]) is not None for r in report["results"])]
    for title, *_ in shown:
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in report["results"]:
        table.add_row(*[fmt(r[key]) if r.get(key) is not None else "-" for _, key, fmt in shown])
    out.print(table)
    if by_task:
        for r in report["results"]:
            t = Table(title=f"{r['name']} by task")
            keys = [k for k in ("examples", "loss", "exact_match", "f1", "choice_accuracy")
                    if any(k in v for v in r["by_task"].values())]
            t.add_column("task")
            for k in keys:
                t.add_column(k, justify="right")
            for task, v in r["by_task"].items():
                t.add_row(task, *[("-" if k not in v else str(v[k]) if k == "examples" else f"{v[k]:.4f}")
                                  for k in keys])
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
    from prolora_cli.console import human_bytes
    from prolora_cli.inspection import inspect_adapter, plot_module

    info = inspect_adapter(adapter)
    drawn = plot_module(adapter, module, plot) if plot else None
    if as_json:
        out.print_json(json.dumps({**info, "plot": str(plot) if plot else None, "plot_module": drawn}))
        return
    c = info["config"]
    out.print(f"[bold]{adapter}[/]: {c['method']} adapter, format {c['format_version']}, base {c['base_model'] or '?'}",
              highlight=False)
    out.print(method_settings(c), highlight=False)
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
    sparse = any("a_sparsity" in m for m in info["per_module"])
    for col in ("module", "adapter rank", "||dW||_F", "rank of dW", "effective rank") + (("A pruned",) * sparse):
        table.add_column(col, justify="right")
    for m in info["per_module"]:
        table.add_row(m["module"], str(m["adapter_rank"]), f"{m['dw_norm']:.4g}", str(m["rank"]),
                      f"{m['effective_rank']:.2f}", *([f"{100 * m['a_sparsity']:.0f}%"] if sparse else []))
    out.print(table)
    if drawn:
        out.print(f"plot of {drawn} written to {plot}", highlight=False)


def method_settings(c: dict) -> str:
    """One line with the settings that matter for this adapter's method."""
    common = f"alpha={c['alpha']:g} dropout={c['dropout']:g}"
    if c["method"] == "prolora":
        return (f"r={c['r']} u={c['u']} m={c['m']} n={c['n']} {common} broadcast={c['broadcast']} "
                f"rotation={c['rotation']} init={c['init']}")
    if c["method"] == "vera":
        return f"r={c['r']} seed={c['vera_seed']} d_init={c['vera_d_init']:g} dropout={c['dropout']:g}"
    if c["method"] == "sora":
        left = "" if c.get("ranks") is None else f", {sum(c['ranks'].values())} ranks left in all"
        return (f"r_max={c['r']} {common} lambda={c['sora_lambda']:g} -> {c['sora_max_lambda']:g} "
                f"in {c['sora_stages']} stages{left}")
    if c["method"] == "prilora":
        return (f"r={c['r']} ranks {c.get('rank_first') or '-'}..{c.get('rank_last') or '-'} by depth, {common}, "
                f"prune {c['prune_fraction']:g} every {c['prune_every']} steps up to {c['max_sparsity']:g}")
    return f"r={c['r']} {common}"


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
