"""`prolora eval --task`: a published benchmark on the base, adapters or a merged model.

The task (`tasks/`) reads its files into items and scores completions; here each item becomes a
prompt (wrapped in the chat format, or plain), multiple-choice items are scored by the likelihood of
each option, the rest are generated in batches, and scores are averaged per subtask and overall.
"""

from __future__ import annotations

from typing import Callable

from prolora_cli.data.chat import IGNORE, PLAIN, render_prompt
from prolora_cli.errors import UserError
from prolora_cli.evaluation import tasks
from prolora_cli.evaluation.chat_eval import compare_models, option_losses, select
from prolora_cli.evaluation.sandbox import interpreter
from prolora_cli.evaluation.tasks.base import Item, Settings, Task
from prolora_cli.inference.generation import generate


def prompt_text(item: Item, tokenizer, fmt: str) -> str:
    if fmt == PLAIN:
        return item.prompt + item.cue
    return render_prompt([{"role": "user", "content": item.user_turn or item.prompt}], tokenizer, fmt) + item.chat_cue


def most_likely(model, tokenizer, text: str, choices: list[str], add_special: bool) -> str:
    """The choice the model finds most likely to follow `text` (summed log-likelihood)."""
    context = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    options = []
    for choice in choices:
        ids = tokenizer(text + choice, add_special_tokens=add_special)["input_ids"]
        shared = next((k for k, (a, b) in enumerate(zip(ids, context)) if a != b), min(len(ids), len(context)))
        options.append({"input_ids": ids, "labels": [IGNORE] * shared + ids[shared:]})
    losses = option_losses(model, options, tokenizer.pad_token_id)
    return choices[min(range(len(choices)), key=lambda j: losses[j][0])]


def evaluate_task(model, tokenizer, task: Task, items: list[Item], settings: Settings, fmt: str,
                  batch_size: int, seed: int, advance: Callable[[int], None]) -> tuple[dict, list[dict]]:
    model.eval()
    add_special = fmt != "template"  # a chat template writes its own special tokens
    texts = [prompt_text(item, tokenizer, fmt) for item in items]
    completions: list = [None] * len(items)
    for i, item in enumerate(items):
        if item.choices:
            completions[i] = [most_likely(model, tokenizer, texts[i], item.choices, add_special)]
            advance(1)
    open_ended = [i for i, item in enumerate(items) if not item.choices]
    generated = generate(model, tokenizer, [texts[i] for i in open_ended], add_special, settings.max_new_tokens,
                         batch_size, advance, settings.temperature, settings.samples, settings.stop, seed)
    for i, texts_i in zip(open_ended, generated):
        completions[i] = texts_i
    rows = []
    for item, completion in zip(items, completions):
        scores = task.score(item, completion, settings)
        rows.append({"id": item.id, "subtask": item.subtask, "completions": completion,
                     "references": item.references, **scores})
    return summarize(task, rows), rows


def summarize(task: Task, rows: list[dict]) -> dict:
    """Each metric per subtask and overall (over items, or over subtasks for tasks reported that way)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["subtask"], []).append(row)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    subtasks = {name: {"examples": len(group), **{m: mean([r[m] for r in group]) for m in task.metrics}}
                for name, group in sorted(groups.items())}
    pool = list(subtasks.values()) if task.average == "subtasks" else rows
    return {**{m: mean([r[m] for r in pool]) for m in task.metrics}, "examples": len(rows), "subtasks": subtasks}


def run_task_eval(args, progress) -> dict:
    """`args` is evaluation.EvalArgs with `task` set; `progress` as in evaluation.run_eval."""
    task = tasks.get(args.task)
    if task.executes_code and not args.allow_code_execution:
        raise UserError(f"{task.name} runs the code the model writes; pass --allow-code-execution to allow it "
                        "(each program runs in a sandbox: its own process, time and memory limits, no access "
                        "to your files)")
    settings = task.configure(shots=args.shots, cot=args.cot, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, samples=args.samples,
                              stop=tuple(args.stop) if args.stop else None, timeout=args.timeout)
    if settings.samples < 1 or settings.max_new_tokens < 1 or settings.shots < 0 or settings.temperature < 0:
        raise UserError("--samples and --max-new-tokens must be >= 1, --shots and --temperature >= 0")
    if settings.samples > 1 and settings.temperature == 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    items = select(task.read(args.task_data, settings), args.limit, args.seed)
    if not items:
        raise UserError(f"--task-data {args.task_data}: no {task.name} examples to evaluate")
    if task.executes_code:
        interpreter()  # fail now, not after generating, if programs cannot be run

    report = compare_models(args, progress, len(items), lambda model, tokenizer, fmt, advance: evaluate_task(
        model, tokenizer, task, items, settings, fmt, args.batch_size, args.seed, advance), plain_ok=True)
    return {"task": task.name, "description": task.description, "task_data": str(args.task_data or "(packaged)"),
            "settings": {k: v for k, v in vars(settings).items()}, "metrics": list(task.metrics),
            "examples": len(items), **report}
