"""GSM8K (Cobbe et al.): grade-school maths word problems; 8-shot chain of thought by default.

Files as published (`grade_school_math/data/`): `test.jsonl` and `train.jsonl`, one
{"question", "answer"} per line, the answer's reasoning ending in "#### <number>". `--task-data` is
that folder (examples come from the first lines of `train.jsonl`) or one JSONL file (then its first
`--shots` problems are the examples and are not scored). The score is exact match of the last number
the model writes with the reference number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from prolora_cli.data.sources import jsonl_objects
from prolora_cli.errors import UserError
from prolora_cli.evaluation.tasks.base import Item, Settings, Task, need

NUMBER = re.compile(r"-?[\d,]*\.?\d+")
CALCULATOR = re.compile(r"<<[^>]*>>")


def read_problems(path: Path) -> list[dict]:
    problems = []
    for i, row in jsonl_objects(path, strict=True):
        try:
            reasoning, answer = row["answer"].split("####")
            problems.append({"question": row["question"].strip(), "reasoning": reasoning.strip(),
                             "answer": answer.strip().replace(",", "")})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path}, line {i}: expected {{\"question\", \"answer\": \"... #### N\"}}") from None
    return problems


def example(problem: dict, cot: bool) -> str:
    """A worked example: the reasoning without GSM8K's calculator annotations, then the number."""
    reasoning = " ".join(CALCULATOR.sub("", problem["reasoning"]).split()) + " " if cot else ""
    return f"Question: {problem['question']}\nAnswer: {reasoning}The answer is {problem['answer']}.\n\n"


def last_number(text: str) -> Optional[str]:
    numbers = NUMBER.findall(text.replace(",", ""))
    return numbers[-1].rstrip(".") if numbers else None


def same_number(a: Optional[str], b: str) -> bool:
    try:
        return a is not None and float(a) == float(b)
    except ValueError:
        return False


class GSM8K(Task):
    name = "gsm8k"
    description = "GSM8K maths word problems, chain of thought (exact match of the last number)"
    defaults = Settings(shots=8, cot=True, max_new_tokens=512, stop=("\n\nQuestion:", "Question:"))
    metrics = ("exact_match",)

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        path = need(path, "GSM8K's data folder (test.jsonl, train.jsonl) or a JSONL file")
        test = path / "test.jsonl" if path.is_dir() else path
        if not test.is_file():
            raise UserError(f"--task-data {path}: no test.jsonl there")
        problems = read_problems(test)
        train = path / "train.jsonl"
        if settings.shots and train.is_file():
            shots = read_problems(train)[:settings.shots]
        else:
            shots, problems = problems[:settings.shots], problems[settings.shots:]
        header = "".join(example(p, settings.cot) for p in shots)
        return [Item(id=str(i), subtask="gsm8k", prompt=header + f"Question: {p['question']}",
                     cue="\nAnswer:", chat_cue="Answer:", references=[p["answer"]])
                for i, p in enumerate(problems)]

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict[str, float]:
        return {"exact_match": float(same_number(last_number(completions[0]), item.references[0]))}


TASK = GSM8K()
