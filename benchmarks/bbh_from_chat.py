"""Write BIG-bench chat JSONL (as in ../shared/datasets/bigbench-chat) in BBH's published layout, so
that `prolora eval --task bbh` runs its 3-shot direct protocol on those tasks.

Each task becomes `OUT/bbh/{task}.json` = {"examples": [...]}: its first SHOTS examples of the train
file (BBH's reader uses a task's first examples as the worked examples when there is no cot-prompts/
folder), then every dev example. input = the user's turn, target = the first accepted answer.

    python benchmarks/bbh_from_chat.py --train train.jsonl --dev dev.jsonl --output /tmp/bbh-shared
    prolora eval --task bbh --task-data /tmp/bbh-shared --by-task
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def examples(path: Path) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        user = next(m["content"] for m in row["messages"] if m["role"] == "user")
        answer = (row.get("answers") or [row["messages"][-1]["content"]])[0]
        by_task.setdefault(row["task"], []).append({"input": user, "target": answer})
    return by_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--shots", type=int, default=3)
    args = parser.parse_args()
    train, dev = examples(args.train), examples(args.dev)
    (args.output / "bbh").mkdir(parents=True, exist_ok=True)
    for task, rows in sorted(dev.items()):
        shots = train.get(task, [])[:args.shots]
        if len(shots) < args.shots:
            raise SystemExit(f"{task}: only {len(shots)} train examples for {args.shots} shots")
        (args.output / "bbh" / f"{task}.json").write_text(json.dumps({"examples": shots + rows}, indent=1))
        print(f"{task}: {len(rows)} examples")


if __name__ == "__main__":
    main()
