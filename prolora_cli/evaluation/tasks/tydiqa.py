"""TyDi QA, gold passage task (Clark et al.): questions in 9 languages answered from a given passage;
one-shot by default; SQuAD exact match and F1, averaged over languages.

Files as published: `tydiqa-goldp-v1.1-dev.json` (and `-train.json`), SQuAD-style
{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]},
each id starting with its language ("english-..."). `--task-data` is that folder or one file. The
example for each language is its first question in the train file beside it, or else in the file
itself (then it is not scored). The instruction is in English for every language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.evaluation.tasks.base import Item, Settings, Task, exact_match, need, token_f1

INSTRUCTION = "Answer the following question based on the information in the given passage.\n\n"


def read_questions(path: Path) -> dict[str, list[dict]]:
    """Questions by language, in file order."""
    try:
        by_language: dict[str, list[dict]] = {}
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    language = qa["id"].split("-")[0]
                    by_language.setdefault(language, []).append({
                        "id": qa["id"], "context": paragraph["context"], "question": qa["question"],
                        "answers": [a["text"] for a in qa["answers"]]})
        return by_language
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: expected TyDi QA GoldP's SQuAD-style JSON") from None


def passage(q: dict) -> str:
    return f"Passage: {q['context']}\nQuestion: {q['question']}"


class TyDiQA(Task):
    name = "tydiqa"
    description = "TyDi QA gold passage, 9 languages (exact match and F1, averaged over languages)"
    defaults = Settings(shots=1, max_new_tokens=50, stop=("\n",))
    metrics = ("f1", "exact_match")
    average = "subtasks"

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        path = need(path, "the TyDi QA GoldP folder or its dev JSON")
        files = sorted(path.glob("*dev*.json")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"--task-data {path}: no TyDi QA *dev*.json file found")
        questions = read_questions(files[0])
        trains = sorted(files[0].parent.glob("*train*.json"))
        examples = read_questions(trains[0]) if trains and trains[0] != files[0] else None
        items = []
        for language, qs in questions.items():
            if examples is None:
                shots, qs = qs[:settings.shots], qs[settings.shots:]
            else:
                shots = examples.get(language, [])[:settings.shots]
            header = INSTRUCTION + "".join(f"{passage(s)}\nAnswer: {s['answers'][0]}\n\n" for s in shots)
            items += [Item(id=q["id"], subtask=language, prompt=header + passage(q), cue="\nAnswer:",
                           chat_cue="Answer:", references=q["answers"]) for q in qs]
        return items

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict[str, float]:
        answer = completions[0].strip()
        return {"f1": token_f1(answer, item.references), "exact_match": exact_match(answer, item.references)}


TASK = TyDiQA()
