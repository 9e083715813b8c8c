"""What --packing buys: trained (assistant) tokens per second with and without it, on real chat data.

Both runs train PRoLoRA r=8, u=1 on the embedded SmolLM2-135M-Instruct (NF4 base) with the same flags
(batch 4 x --max-seq-len 512, no accumulation) for --steps optimizer steps, through the real CLI, one
after the other, alternating over --repeats; each reads its speed from its own train_log.jsonl (the
median over steps after the first) and the ratio is taken within a repeat.

    python benchmarks/packing.py                 # needs ../shared/datasets/bigbench-chat (or --data FILE)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "bigbench-chat" / "train.jsonl"


def run(data: Path, packing: bool, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "prolora_cli", "train", "--data", str(data), "--rank", "8", "--unshared", "1",
           "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "512", "--max-steps", str(steps),
           "--output", str(out), "--overwrite", *(["--packing"] if packing else [])]
    subprocess.run(cmd, check=True, capture_output=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    later = [r for r in log if "loss" in r][1:]
    return {"trained_tokens_per_s": statistics.median(r["trained_tokens_per_s"] for r in later),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data} not found; pass --data")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            got = {packing: run(args.data, packing, args.steps, Path(tmp) / f"run-{packing}") for packing in order}
            rows.append(got)
            print(json.dumps({"repeat": repeat, "plain": got[False], "packed": got[True]}), flush=True)
    ratio = statistics.median(r[True]["trained_tokens_per_s"] / r[False]["trained_tokens_per_s"] for r in rows)
    plain = statistics.median(r[False]["trained_tokens_per_s"] for r in rows)
    packed = statistics.median(r[True]["trained_tokens_per_s"] for r in rows)
    print(f"| setting | trained tokens/s | ratio |\n|---|---:|---:|\n| no packing | {plain:.0f} | 1.00 |\n"
          f"| --packing | {packed:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
