"""Benchmark tasks for `prolora eval --task`, one module each, found by name here.

Each module exports TASK (a `tasks.base.Task`): it reads its benchmark's published files into items
and scores completions; `task_eval.py` does the rest. As with adapter methods, the registry names
modules, so flag parsing stays free of them; adding a task is a module plus one line below.
"""

from __future__ import annotations

import importlib

from prolora_cli.errors import UserError

REGISTRY = {
    "mmlu": "prolora_cli.evaluation.tasks.mmlu",
    "gsm8k": "prolora_cli.evaluation.tasks.gsm8k",
    "bbh": "prolora_cli.evaluation.tasks.bbh",
    "tydiqa": "prolora_cli.evaluation.tasks.tydiqa",
    "humaneval": "prolora_cli.evaluation.tasks.humaneval",
}


def get(name: str):
    if name not in REGISTRY:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).TASK
