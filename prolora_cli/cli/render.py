"""Rich output for long-running commands: the training progress bar and its summary."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


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
