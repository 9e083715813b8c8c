"""What every benchmark task shares: the item it yields, its settings, and the SQuAD-style scoring.

A task reads its benchmark's published files into `Item`s (the prompt, the text the answer starts
with, the references) and scores one item's completions. How prompts are wrapped in a chat format,
generated and batched is `task_eval.py`'s business; a task never sees the model.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from prolora_cli.errors import UserError


@dataclass
class Item:
    id: str
    subtask: str
    prompt: str                # the text (few-shot examples included) the model continues
    cue: str = ""              # appended to the prompt when no chat format wraps it
    chat_cue: str = ""         # where the assistant's reply starts under a chat format
    user_turn: Optional[str] = None  # the user's turn under a chat format, if not the prompt
    references: list[str] = field(default_factory=list)
    choices: Optional[list[str]] = None  # scored by likelihood instead of generated
    extra: dict = field(default_factory=dict)


@dataclass
class Settings:
    """What a user may change per run; each task gives its published defaults."""
    shots: int = 0
    cot: bool = False
    max_new_tokens: int = 32
    temperature: float = 0.0
    samples: int = 1
    stop: tuple[str, ...] = ()
    timeout: float = 10.0      # seconds per program, for tasks that run code

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


class Task:
    name: ClassVar[str]
    description: ClassVar[str]
    defaults: ClassVar[Settings]
    metrics: ClassVar[tuple[str, ...]]      # the headline metric first
    average: ClassVar[str] = "items"        # "subtasks": the mean of per-subtask means (BBH, TyDi QA)
    executes_code: ClassVar[bool] = False

    def configure(self, **given) -> Settings:
        """The defaults with what the user gave (None: not given)."""
        return self.defaults.replace(**given)

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        raise NotImplementedError

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict:
        """The item's metrics (and any detail worth saving with the predictions)."""
        raise NotImplementedError


def need(path: Optional[Path], what: str) -> Path:
    if path is None:
        raise UserError(f"--task-data is required: {what}")
    if not path.exists():
        raise UserError(f"--task-data {path} does not exist")
    return path


# SQuAD's answer normalisation (its official evaluate script): lower case, no punctuation, no English
# articles, single spaces. Used by exact match and F1 everywhere in prolora.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD's token F1, the best over the references."""
    def f1(pred_text: str, ref_text: str) -> float:
        pred, ref = normalize_answer(pred_text).split(), normalize_answer(ref_text).split()
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)
    return max(f1(prediction, r) for r in references)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the earliest stop sequence."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text
