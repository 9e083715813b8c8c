"""Checkpoints (OUTPUT/checkpoints/step-N): which one to resume from, what makes one intact, and what
to say when one cannot be written.

A checkpoint holds the adapter (safetensors), the optimizer and every process's RNG states (accelerate's
files, loaded only with torch's weights_only unpickler, which builds tensors and numbers and never runs
code), the scheduler's state (JSON) and where the run stood (trainer_state.json). Only complete ones get
their final name (loop.Run.save_checkpoint). Before a resume each file is read: a checkpoint that cannot
be read (truncated by a full disk, a lost file) is skipped for the newest intact one, saying why; one
whose pickle would run code is refused outright: it was tampered with, not broken.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Callable, Optional

from accelerate.utils.other import load as load_weights_only

from prolora_cli.errors import MachineFault, UserError, os_fault
from prolora_cli.fileio import write_failure_reason
from prolora_cli.models.safetensors_files import file_entries

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.json"
LEGACY_SCHEDULER = "custom_checkpoint_0.pkl"  # prolora before 0.2 let accelerate pickle the scheduler
# How torch's zip writer reports a write that failed (short write, or a position it did not reach).
TORCH_WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "write failed", "failed writing")
NEEDED = (STATE_NAME, "adapter_config.json", "adapter.safetensors", "optimizer.bin")


class CheckpointFault(MachineFault):
    """A checkpoint could not be written; the message says which one can be resumed."""


def checkpoint_path(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(output: Path) -> list[Path]:
    """Checkpoints that got their final name, newest first."""
    folder = output / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / STATE_NAME).is_file()] if folder.is_dir() else []
    return sorted(found, reverse=True)


def verify_checkpoint(folder: Path) -> Optional[str]:
    """Why `folder` cannot be resumed from, or None if every file of it reads. Raises UserError for a file
    that would run code when loaded."""
    for name in NEEDED:
        if not (folder / name).is_file():
            return f"it has no {name}"
    for name in (STATE_NAME, SCHEDULER_NAME):
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            return f"its {name} cannot be read"
    try:
        file_entries(folder / "adapter.safetensors")
    except UserError as e:
        return f"its adapter.safetensors cannot be read ({str(e).split(': ', 1)[-1]})"
    for path in sorted([*folder.glob("*.bin"), *folder.glob("*.pkl")]):
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of a crafted file
                warnings.simplefilter("ignore")
                load_weights_only(path, map_location="cpu")
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise UserError(f"{path}: refused: loading it would run code, which no checkpoint of ours holds "
                                f"(it was tampered with); resume from another with --resume-from, or delete it") from None
            return f"its {path.name} cannot be read"
        except (RuntimeError, EOFError, OSError, ValueError):
            return f"its {path.name} cannot be read"
    return None


def choose_checkpoint(output: Path, resume_from: Optional[Path], say: Callable[[str], None]) -> Path:
    """--resume-from PATH, checked; else the newest intact checkpoint in OUTPUT, saying which were skipped."""
    if resume_from is not None:
        if not (Path(resume_from) / STATE_NAME).is_file():
            raise UserError(f"--resume-from {resume_from}: not a checkpoint (no {STATE_NAME})")
        problem = verify_checkpoint(Path(resume_from))
        if problem:
            raise UserError(f"--resume-from {resume_from}: {problem}")
        return Path(resume_from)
    skipped = []
    for folder in complete_checkpoints(output):
        problem = verify_checkpoint(folder)
        if problem is None:
            for name, why in skipped:
                say(f"skipped checkpoint {name}: {why}")
            return folder
        skipped.append((folder.name, problem))
    why = "; ".join(f"{name}: {problem}" for name, problem in skipped)
    raise UserError(f"--resume: no intact checkpoint in {output / CHECKPOINTS}" + (f" ({why})" if why else ""))


def resume_hint(output: Path) -> str:
    """What the user can do after a failed write: which checkpoint is there to resume, and how."""
    done = complete_checkpoints(output)
    if not done:
        return "no checkpoint was written yet: free some space and start the run again"
    return f"the newest checkpoint, {done[0].name}, is intact: free some space and run the same command with --resume"


def checkpoint_fault(e: Exception, name: str, output: Path) -> Exception:
    """The one line for a checkpoint that could not be written; any other error is returned as it was."""
    if isinstance(e, (OSError, MachineFault)):
        reason = str(e if isinstance(e, MachineFault) else os_fault(e, "cannot write"))
    elif isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILED):
        # torch's writer says only that the write failed
        reason = write_failure_reason(output) or f"cannot write ({str(e).splitlines()[0]})"
    else:
        return e
    return CheckpointFault(f"checkpoint {name} could not be written: {reason}; {resume_hint(output)}")
