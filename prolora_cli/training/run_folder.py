"""The run folder (`--output`): what it holds, its checkpoints, and the checks against --resume and
--overwrite before a run starts.

A finished run holds adapter_config.json + adapter.safetensors, train_log.jsonl, run_config.json and
loss.png; checkpoints/step-N folders hold what `--resume` needs, and only complete ones carry that name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.fileio import atomic_path
from prolora_cli.training.args import TrainArgs

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
LOG_NAME = "train_log.jsonl"
RUN_CONFIG = "run_config.json"
PLOT_NAME = "loss.png"


def is_finished(output: Path) -> bool:
    return (output / "adapter_config.json").is_file() and (output / LOG_NAME).is_file()


def latest_checkpoint(output: Path) -> Optional[Path]:
    """The newest complete checkpoint. Incomplete ones never get their final name (see Run.save_checkpoint)."""
    folder = output / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_NAME).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def prepare_output(args: TrainArgs) -> Optional[Path]:
    """Check the output folder against --resume/--overwrite; return the checkpoint to resume from."""
    out = args.output
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}")
        return ckpt
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
