"""MMLU (Hendrycks et al.): 57 subjects of four-option questions; zero-shot by default.

Files as published (`data.tar`): `test/{subject}_test.csv` and `dev/{subject}_dev.csv`, no header,
columns question, A, B, C, D, answer letter. `--task-data` is the folder holding `test/` (and `dev/`
for `--shots`), the `test/` folder itself, or one CSV. The prediction is the letter the model finds
most likely right after the prompt, as in the original evaluation and open-instruct's.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.evaluation.tasks.base import Item, Settings, Task, need

LETTERS = ("A", "B", "C", "D")


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    for i, row in enumerate(rows, 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise UserError(f"{path}, row {i}: expected question, A, B, C, D, answer letter")
    return rows


def question(row: list[str], with_answer: bool) -> str:
    text = row[0] + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, row[1:5]))
    return text + "\nAnswer:" + (f" {row[5].strip()}\n\n" if with_answer else "")


class MMLU(Task):
    name = "mmlu"
    description = "MMLU, 57 subjects, multiple choice (accuracy)"
    defaults = Settings(shots=0, max_new_tokens=1)
    metrics = ("accuracy",)

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        path = need(path, "MMLU's data folder (with test/ and dev/) or a subject CSV")
        test = path / "test" if (path / "test").is_dir() else path
        files = [test] if test.is_file() else sorted(test.glob("*_test.csv")) or sorted(test.glob("*.csv"))
        if not files:
            raise UserError(f"--task-data {path}: no MMLU *_test.csv files found")
        items = []
        for file in files:
            subject = file.stem.removesuffix("_test")
            title = subject.replace("_", " ")
            shots = self.shots(file, subject, settings.shots)
            header = f"The following are multiple choice questions (with answers) about {title}.\n\n"
            for i, row in enumerate(read_rows(file)):
                items.append(Item(id=f"{subject}/{i}", subtask=subject,
                                  prompt=header + shots + question(row, with_answer=False),
                                  chat_cue="The answer is:", references=[row[5].strip()],
                                  choices=[f" {letter}" for letter in LETTERS]))
        return items

    def shots(self, test_file: Path, subject: str, k: int) -> str:
        if k == 0:
            return ""
        dev = test_file.parent.parent / "dev" / f"{subject}_dev.csv"
        if not dev.is_file():
            raise UserError(f"--shots {k} needs {dev} (MMLU's dev split holds the examples)")
        return "".join(question(row, with_answer=True) for row in read_rows(dev)[:k])

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict[str, float]:
        return {"accuracy": float(completions[0].strip() == item.references[0])}


TASK = MMLU()
