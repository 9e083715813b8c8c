"""Data at the size people train on: memory and time of the data pipeline as the dataset grows.

Synthetic chat JSONL (a user turn of 10-60 words, an answer of 5-40, as the issue that asked for this
measured), 10k to 1.6M conversations, on the tiny model (its own BPE tokenizer), each measurement a
child process of its own: peak anonymous memory (RssAnon sampled every 50 ms: memory-mapped Arrow
pages are the page cache's, not the process's) and wall time of
  - `train --dry-run`, first (nothing cached) and again (the tokenized data reused from the cache),
  - `train --max-steps 1`, after those: everything up to the first step, and the step.

    python benchmarks/data_scale.py --output docs/results/data_scale.json                 # ~1 hour
    python benchmarks/data_scale.py --sizes 10000 100000 --repo /path/to/an/older/checkout   # before/after

`--repo` runs another checkout's `prolora_cli` (same venv), to measure what the same sizes cost before.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from scale import measure  # noqa: E402


def write_conversations(path: Path, count: int, seed: int = 0) -> Path:
    """`count` chat records: a user turn of 10-60 words and an answer of 5-40, from a fixed vocabulary."""
    rng = random.Random(seed)
    words = sorted(set(re.findall(r"[A-Za-z]+", (ROOT / "examples" / "chat" / "train.jsonl").read_text())))
    with open(path, "w") as f:
        for _ in range(count):
            user = " ".join(rng.choices(words, k=rng.randint(10, 60)))
            answer = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def prolora(repo: Path) -> list[str]:
    """The command that runs `repo`'s prolora_cli: this checkout's as installed, another one's by taking
    the editable install's finder out of the way (it would import this checkout whatever PYTHONPATH says)."""
    if repo.resolve() == ROOT:
        return [sys.executable, "-m", "prolora_cli"]
    boot = ("import runpy, sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in "
            f"getattr(f, '__module__', '')]; sys.path.insert(0, {str(repo)!r}); sys.argv[0] = 'prolora'; "
            "runpy.run_module('prolora_cli', run_name='__main__')")
    return [sys.executable, "-c", boot]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 400_000, 1_600_000])
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose prolora_cli runs")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    from conftest import tiny_llama, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="prolora-data-scale-"))
    tok = train_tokenizer()
    model = work / "tiny"
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=96).save_pretrained(model)
    tok.save_pretrained(model)
    env = {"PROLORA_CACHE": str(work / "cache"), "HF_DATASETS_CACHE": str(work / "hf")}
    rows = []
    for size in args.sizes:
        data = write_conversations(work / f"chat-{size}.jsonl", size)
        common = [*prolora(args.repo), "train", "--model", str(model), "--quant", "none",
                  "--device", "cpu", "--data", str(data), "--output", str(work / f"run-{size}")]
        row = {"conversations": size, "bytes": data.stat().st_size}
        for name, extra in (("dry_run_first", ["--dry-run", "--json"]), ("dry_run_again", ["--dry-run", "--json"]),
                            ("first_step", ["--max-steps", "1", "--overwrite"])):
            result = measure([*common, *extra], env=env)
            row[name] = {"s": round(result["s"], 1), "anon_mib": round(result["anon_gib"] * 1024)}
            print(f"{size:>9,} {name:14s} {row[name]['anon_mib']:6,} MiB {row[name]['s']:8.1f} s", flush=True)
        rows.append(row)
        data.unlink()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"repo": "this checkout" if args.repo == ROOT else "another checkout",
                                           "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
