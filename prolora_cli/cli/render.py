"""Everything the CLI prints: tables of results, the training progress bar and its summary, eval
progress. Commands hand over plain dicts; nothing here computes a result."""

from __future__ import annotations

import json
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# Off a terminal (CI logs, `| tee`) rich assumes 80 columns and squeezes tables; give it room instead.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def rank_zero() -> bool:
    """The process that speaks under a launcher (torchrun sets RANK); the only one otherwise."""
    return os.environ.get("RANK", "0") == "0"


def print_json(value) -> None:
    out.print_json(json.dumps(value))


def error(text: str) -> None:
    """One line on stderr: what went wrong."""
    err.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class TrainReporter:
    """Receives training events; shows a progress bar with loss, lr, tokens/s and ETA. When the console
    is not a terminal (nohup, a cluster's log file, `| tee`), a bar would show nothing until the end, so
    each logged step prints a line instead."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = None
        self.task = None
        self.lines = None  # (total, start time) when printing lines

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def start(self, total: int, done: int, info: dict, enabled: bool = True) -> None:
        if not enabled:
            return
        evals = f" (+{info['eval_examples']:,} eval)" if info["eval_examples"] else ""
        self.console.print(
            f"[bold]training[/] {info['model']} on {info['device']}: {info['examples']:,} examples{evals}, "
            f"{info['trainable']:,} trainable of {info['total_params']:,} params, "
            f"{info['steps']} steps of {info['batch']} sequences, chat format {info['chat_format']}",
            highlight=False)
        if not self.console.is_terminal:
            self.lines = (total, time.monotonic())
            return
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[metrics]}"), TimeRemainingColumn(), console=self.console,
            transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, metrics="")

    def step(self, step: int, record: dict | None) -> None:
        metrics = self.metrics(record) if record else None
        if self.lines and metrics:
            total, start = self.lines
            self.console.print(f"step {step}/{total}  {metrics}  ({time.monotonic() - start:.0f} s)", highlight=False)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **({"metrics": metrics} if metrics else {}))

    @staticmethod
    def metrics(record: dict) -> str:
        parts = []
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s")
        if "eval_loss" in record:
            parts.append(f"eval {record['eval_loss']:.4f}")
        return "  ".join(parts)

    def stop(self) -> None:
        self.lines = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def end(self, summary: dict) -> None:
        self.stop()
        table = Table(title="training finished", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row("steps", str(summary["steps"]))
        table.add_row("time", f"{summary['time_s']:.1f} s")
        table.add_row("tokens", f"{summary['tokens']:,}")
        table.add_row("final train loss", fmt(summary["train_loss"]))
        if summary["eval_loss"] is not None:
            table.add_row("eval loss (start -> end)",
                          f"{fmt(summary['eval_loss_start'])} -> {fmt(summary['eval_loss'])}")
        table.add_row("trainable params", f"{summary['trainable_params']:,}")
        table.add_row("adapter on disk", human_bytes(summary["adapter_bytes"]))
        table.add_row("output", summary["output"])
        self.console.print(table)


class EvalProgress:
    """One progress bar per evaluated model; use as a context manager. When the console is not a
    terminal (CI logs, `| tee`), a bar would show nothing until the end, so it prints a line at every
    tenth of the way instead."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.lines = enabled and not console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
                                 TimeRemainingColumn(), console=console, disable=not enabled or self.lines)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, label: str, total: int):
        if not self.lines:
            task = self.progress.add_task(label, total=total)
            return lambda n: self.progress.advance(task, n)
        start, state = time.monotonic(), {"done": 0, "shown": 0}

        def advance(n: int) -> None:
            state["done"] += n
            tenth = state["done"] * 10 // max(total, 1)
            if tenth > state["shown"] or state["done"] == total:
                state["shown"] = tenth
                self.console.print(f"{label}: {state['done']}/{total} ({100 * state['done'] // max(total, 1)}%) "
                                   f"in {time.monotonic() - start:.0f} s", highlight=False)
        return advance


# ---------------------------------------------------------------------------------------------
# count-params


def print_budget(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    columns = [k for k in (rows[0] if rows else {}) if k not in ("trainable_params", "equivalent_lora_rank")]
    for col in columns + ["trainable params", "LoRA-equivalent rank"]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[str(row[k]) for k in columns], f"{row['trainable_params']:,}",
                      f"{row['equivalent_lora_rank']:.2f}")
    out.print(table)
    if not rows:
        out.print("Nothing fits: the budget is below the smallest setting at rank 1.")


def print_plan(result: dict, title: str) -> None:
    table = Table(title=title)
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
              f"LoRA at rank {result['r']} would need {result['lora_params_same_rank']:,} params")
    if result.get("note"):
        out.print(result["note"])


# ---------------------------------------------------------------------------------------------
# train --dry-run, merge


def print_dry_run(r: dict) -> None:
    for note in r["notes"]:
        out.print(note, highlight=False)
    table = Table(title="dry run: nothing was trained or written", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    lengths = r["length"]
    mem = r["memory_per_device_gib"]
    rows = f" ({r['rows']:,} packed rows)" if r.get("rows") is not None else ""
    for name, value in [
            ("examples kept / dropped / bad", f"{r['examples']:,} / {r['dropped']:,} / {r['skipped_bad_records']:,}"),
            ("data format / chat format", f"{r['data_format']} / {r['chat_format']}"),
            ("tokens / trained tokens", f"{r['tokens']:,} / {r['trained_tokens']:,}"),
            ("length min / median / p90 / max", f"{lengths['min']} / {lengths['median']:g} / {lengths['p90']} / {lengths['max']}"),
            ("trainable params", f"{r['trainable_params']:,}"),
            ("global batch (processes)", f"{r['global_batch']} ({r['processes']})"),
            ("steps per epoch / steps", f"{r['steps_per_epoch']:,} / {r['steps']:,}{rows}"),
            ("memory per device (estimate)", f"{mem['total']:.2f} GiB: base {mem['base']:.2f}, adapter+optimizer "
                                             f"{mem['adapter_and_optimizer']:.2f}, activations {mem['activations']:.2f}")]:
        table.add_row(name, value)
    out.print(table)
    example = Text()
    for token, trained in zip(r["example"]["tokens"], r["example"]["trained"]):
        example.append(token, style="bold green" if trained else "dim")
    out.print("first example (trained tokens in bold green):")
    out.print(example)


def print_merge(r: dict) -> None:
    out.print(f"merged {r['modules_merged']} modules into {r['output']}: {r['tensors']} tensors in {r['shards']} "
              f"file(s), {r['total_size'] / 2**30:.2f} GiB, {r['dtype']} ({r['base']} base)", highlight=False)
    if r["verify"] != "none":
        out.print(f"checked: {r['tensors_identical']} tensors identical to the base, {r['tensors_converted']} "
                  f"converted, {r['tensors_adapted']} equal to W0 + dW; logits differ by at most "
                  f"{r['max_abs_logit_diff']:.3g}, {r['relative_diff']:.2g} of the largest "
                  f"(tolerance {r['tolerance']:g}; worst block {r['worst_block']}: "
                  f"{r['max_block_relative_diff']:.2g})", highlight=False)


# ---------------------------------------------------------------------------------------------
# eval


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


# ---------------------------------------------------------------------------------------------
# inspect


def print_inspection(adapter, info: dict) -> None:
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


# ---------------------------------------------------------------------------------------------
# chat, generate


def write_raw(text: str) -> None:
    """Text exactly as given (a model's reply as it streams): no markup, no wrapping."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_chat_banner(info: dict) -> None:
    what = f"adapter {info['adapter']} on {info['model']}" if info["adapter"] else info["model"]
    out.print(f"[bold]chatting with {what}[/]: chat format {info['chat_format']} (from {info['prompting_from']}), "
              f"system prompt {info['system_prompt']!r}", highlight=False)
    out.print("commands: /reset, /base (the base model alone; again for the adapter), /system TEXT, /exit",
              style="dim", highlight=False)


def chat_note(text: str, interactive: bool) -> None:
    """What a /command did: on the terminal, or on stderr off it (stdout holds only replies then)."""
    (out if interactive else err).print(f"[dim]{text}[/]" if interactive else text, highlight=False)


def print_generated(summary: dict) -> None:
    adapters = ", ".join(summary["adapters"]) or "none"
    out.print(f"wrote {summary['rows']:,} rows to {summary['output']} ({summary['generated']:,} generated now; "
              f"adapters: {adapters}; base {summary['model']}): {summary['completion_tokens']:,} completion tokens, "
              f"{summary['stopped_at_length']:,} cut at --max-new-tokens", highlight=False)


def print_export(format: str, r: dict) -> None:
    if format == "peft":
        out.print(f"wrote a PEFT LoRA adapter (r={r['r']}, lora_alpha={r['lora_alpha']:g}, {r['modules']} modules) "
                  f"to {r['output']}; its base: {r['base_model_name_or_path']}", highlight=False)
        return
    if format == "gguf-lora":
        out.print(f"wrote a llama.cpp LoRA adapter ({r['pairs']} A/B pairs, {r['quant']}, alpha {r['alpha']:g}) "
                  f"to {r['output']}: use it with `llama-cli -m BASE.gguf --lora {r['output']}`", highlight=False)
        return
    out.print(f"wrote {r['output']}: {r['tensors']} tensors, {r['quant']}, {human_bytes(r['bytes'])}, "
              f"{r['modules_merged']} modules merged ({r['base']} base), chat format {r['chat_format']}", highlight=False)
    limit = f" (tolerance {r['tolerance']:g})" if r.get("tolerance") else ""
    out.print(f"checked: read back whole; logits differ from base + adapter by {r['relative_diff']:.2g} of the largest"
              f"{limit}, top token agrees at {100 * r['top1_agreement']:.1f}% of probe positions", highlight=False)
    if r.get("modelfile"):
        out.print(f"Ollama: ollama create NAME -f {r['modelfile']}", highlight=False)
