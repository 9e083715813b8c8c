"""What a training run is asked to do (the flags of `prolora train`), checked before any work.

Torch-free: the CLI imports it to build `train`'s options and their defaults.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.errors import UserError

OPTIMIZERS = ("paged_adamw_32bit", "adamw")
LOSSES = ("full", "chunked", "liger")  # training/losses.py
KERNELS = ("none", "liger")             # training/kernels.py
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: package it needs


@dataclass
class TrainArgs:
    data: list  # of Paths (or hub dataset ids); one Path also works
    output: Path
    adapter: AdapterConfig
    eval_data: Optional[Path] = None
    model: Optional[str] = None
    quant: str = "nf4"
    trust_remote_code: bool = False
    chat_format: str = "auto"
    data_format: str = "auto"
    system_prompt: Optional[str] = None  # opens every conversation without a system turn; recorded
    data_weights: Optional[str] = None  # "0.7,0.3": one per --data
    data_split: str = "train"           # of a hub dataset
    num_proc: Optional[int] = None      # processes that tokenize; None: the cores available
    cache_dir: Optional[Path] = None    # of tokenized data; None: PROLORA_CACHE/data
    max_seq_len: int = 512
    skip_bad_lines: bool = False
    lr: float = 2e-4
    lr_shared: Optional[float] = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"
    batch_size: int = 4
    grad_accum: int = 4
    max_steps: Optional[int] = None
    epochs: float = 1.0
    seed: int = 42
    group_by_length: bool = True
    packing: bool = False
    gradient_checkpointing: bool = False
    loss: str = "full"                  # see training/losses.py
    kernels: str = "none"               # see training/kernels.py
    eval_every: int = 0
    save_every: int = 0
    save_total_limit: int = 2
    log_every: int = 1
    report_to: str = "none"  # comma-separated: tensorboard, wandb, mlflow
    resume: bool = False
    resume_from: Optional[Path] = None  # a checkpoint folder, instead of the newest intact one
    overwrite: bool = False
    device: Optional[str] = None  # mainly for tests; accelerate picks otherwise

    @classmethod
    def from_flags(cls, values: dict, adapter: AdapterConfig) -> "TrainArgs":
        """From `prolora train`'s parsed flags, by name (each field is the flag of the same name; flags
        that are not run arguments, like --dry-run, are left out)."""
        own = {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name != "adapter"}
        if isinstance(own.get("data"), tuple):
            own["data"] = list(own["data"])
        return cls(adapter=adapter, **own)

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "save_total_limit", "num_proc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.epochs <= 0:
            raise UserError("--epochs must be > 0")
        if self.lr <= 0 or (self.lr_shared is not None and self.lr_shared <= 0):
            raise UserError("learning rates must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.optim not in OPTIMIZERS:
            raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.kernels not in KERNELS:
            raise UserError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        trackers_of(self.report_to)  # an unknown or missing tracker fails before any work
        if (self.resume or self.resume_from) and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")


def trackers_of(report_to: str) -> list[str]:
    """--report-to 'tensorboard,wandb' -> accelerate's tracker names; one line if one is unknown or
    its package is not installed (they are optional)."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--report-to: unknown tracker {name!r} (use none, {', '.join(TRACKERS)})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return names
