"""The run folder (`--output`): what it holds, its checkpoints, and the checks against --resume and
--overwrite before a run starts.

A finished run holds adapter_config.json + adapter.safetensors, train_log.jsonl, run_config.json and
loss.png; checkpoints/step-N folders hold what `--resume` needs (checkpoints.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_path
from prolora_cli.training.args import TrainArgs
from prolora_cli.training.checkpoints import CHECKPOINTS, choose_checkpoint

LOG_NAME = "train_log.jsonl"
RUN_CONFIG = "run_config.json"
PLOT_NAME = "loss.png"


def is_finished(output: Path) -> bool:
    return (output / "adapter_config.json").is_file() and (output / LOG_NAME).is_file()


def prepare_output(args: TrainArgs, say: Callable[[str], None]) -> Optional[Path]:
    """Check the output folder against --resume/--overwrite; return the checkpoint to resume from (the
    newest intact one, or --resume-from's). Runs while the folder's lock is held."""
    out = args.output
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    for stale in (out / CHECKPOINTS).glob(".tmp-*"):  # a checkpoint whose writer was killed
        shutil.rmtree(stale, ignore_errors=True)
    if args.resume or args.resume_from:
        return choose_checkpoint(out, args.resume_from, say)
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            what = "a finished run" if is_finished(out) else "files (an unfinished run? use --resume)"
            raise UserError(f"--output {out} already holds {what}; pass --overwrite to replace it")
        shutil.rmtree(out)
    return None


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and eval loss against step, written atomically."""
    # matplotlib picks its backend when pyplot is first imported: Agg first, so no display is needed.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
