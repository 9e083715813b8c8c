"""BIG-Bench Hard (Suzgun et al.): 23 tasks; 3-shot, direct answers by default (`--cot` to reason).

Files as published (github.com/suzgun/BIG-Bench-Hard): `bbh/{task}.json`, each {"examples":
[{"input", "target"}]}, and `cot-prompts/{task}.txt` with the three worked examples every paper uses.
`--task-data` is the folder holding `bbh/` (and `cot-prompts/`), the `bbh/` folder, or one task's
JSON. Without `cot-prompts/`, each task's first `--shots` examples serve as the examples and are not
scored. Direct answers drop the worked reasoning and keep "So the answer is X" as "X". The score is
exact match of the answer (the first line, or the text after "So the answer is" with --cot).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.evaluation.tasks.base import Item, Settings, Task, need

ANSWER = re.compile(r"So the answer is (.*?)\.?\s*$", re.S)


def read_examples(path: Path) -> list[dict]:
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
        return [{"input": str(e["input"]), "target": str(e["target"])} for e in examples]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: expected BBH's {{\"examples\": [{{\"input\", \"target\"}}]}}") from None


def read_cot_prompt(path: Path) -> tuple[str, list[dict]]:
    """(task description, worked examples [{"input", "reasoning", "target"}]) from a cot-prompts file."""
    text = path.read_text(encoding="utf-8").split("-----\n")[-1].strip()
    description, *blocks = re.split(r"(?:^|\n\n)Q: ", text)
    examples = []
    for block in blocks:
        question, _, answer = block.partition("\nA: ")
        found = ANSWER.search(answer)
        if not found:
            raise UserError(f"{path}: a worked example does not end in \"So the answer is ...\"")
        examples.append({"input": question.strip(), "reasoning": answer.strip(), "target": found.group(1).strip()})
    return description.strip(), examples


def shot(example: dict, cot: bool) -> str:
    answer = example["reasoning"] if cot and "reasoning" in example else example["target"]
    return f"Q: {example['input']}\nA: {answer}\n\n"


def extract(completion: str, cot: bool) -> str:
    if cot:
        found = ANSWER.search(completion.strip().split("\n\n")[0])
        return found.group(1).strip() if found else completion.strip()
    lines = completion.strip().splitlines()
    return lines[0].strip() if lines else ""


class BBH(Task):
    name = "bbh"
    description = "BIG-Bench Hard, 23 tasks, few-shot (exact match, averaged over tasks)"
    defaults = Settings(shots=3, cot=False, max_new_tokens=32, stop=("\n\n", "\nQ:"))
    metrics = ("exact_match",)
    average = "subtasks"

    def configure(self, **given) -> Settings:
        settings = super().configure(**given)
        if settings.cot:  # reasoning needs room and may contain blank lines
            settings = settings.replace(max_new_tokens=given.get("max_new_tokens") or 256,
                                        stop=given.get("stop") or ("\n\nQ:",))
        return settings

    def read(self, path: Optional[Path], settings: Settings) -> list[Item]:
        path = need(path, "BIG-Bench Hard's folder (bbh/, cot-prompts/) or one task's JSON")
        folder = path / "bbh" if (path / "bbh").is_dir() else path
        files = [folder] if folder.is_file() else sorted(folder.glob("*.json"))
        if not files:
            raise UserError(f"--task-data {path}: no BBH task JSON files found")
        items = []
        for file in files:
            examples = read_examples(file)
            prompts = file.parent.parent / "cot-prompts" / f"{file.stem}.txt"
            if prompts.is_file():
                description, shots = read_cot_prompt(prompts)
                header = description + "\n\n"
            else:
                if settings.cot:
                    raise UserError(f"--cot needs BBH's worked examples: {prompts} is missing")
                header, shots, examples = "", examples[:settings.shots], examples[settings.shots:]
            header += "".join(shot(e, settings.cot) for e in shots[:settings.shots])
            for i, e in enumerate(examples):
                items.append(Item(id=f"{file.stem}/{i}", subtask=file.stem, prompt=header + f"Q: {e['input']}",
                                  cue="\nA:", chat_cue="A:", references=[e["target"]]))
        return items

    def score(self, item: Item, completions: list[str], settings: Settings) -> dict[str, float]:
        return {"exact_match": float(extract(completions[0], settings.cot) == item.references[0].strip())}


TASK = BBH()
