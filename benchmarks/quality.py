"""The PRoLoRA paper's comparison in miniature, on real data, through the real CLI.

Fine-tunes the embedded SmolLM2-135M-Instruct (NF4 base) on BIG-bench chat data with
  - LoRA r=2                (the budget)
  - PRoLoRA r=8 u=1 m=n=7   (the same budget, four times the rank)
  - LoRA r=8                (four times the budget)
with the same steps, learning rate and seeds, then scores every adapter (and the bare base) with one
`prolora eval` call on the dev split: loss, exact match and choice accuracy. Prints a markdown table
(mean and spread over seeds), writes the raw numbers as JSON and plots eval loss against trainable
parameters.

    python benchmarks/quality.py                     # the table in docs/benchmarks.md (~45 min, 2 CPUs)
    python benchmarks/quality.py --steps 2 --seeds 0 --eval-limit 16   # a smoke run

Every run is a plain `prolora train` / `prolora eval` command; the script prints each one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "bigbench-chat"

# label -> flags of `prolora train` that define the adapter
VARIANTS = {
    "lora-r2": ["--rank", "2"],
    "prolora-r8-u1-m7": ["--rank", "8", "--unshared", "1", "--share", "7"],
    "lora-r8": ["--rank", "8"],
    # The other methods near LoRA r=2's budget on SmolLM2 (610,560; see `prolora count-params --method`).
    # VeRA trains vectors only and cannot spend that budget: its paper rank 256 is 209,280 parameters.
    "sora-r2": ["--method", "sora", "--rank", "2"],
    "prilora-r2": ["--method", "prilora", "--rank", "2", "--prune-every", "10"],
    "tied-lora-r371": ["--method", "tied-lora", "--rank", "371"],  # q, k, v (its default targets)
    "vera-r256": ["--method", "vera", "--rank", "256", "--lr", "1e-2"],
}
DEFAULT_VARIANTS = ["lora-r2", "prolora-r8-u1-m7", "lora-r8"]


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is 0 for a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help="the paper's three by default; add sora-r2 prilora-r2 tied-lora-r371 vera-r256")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-limit", type=int, default=80, help="dev examples scored (a fixed sample)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "quality.png")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --work instead of retraining")
    args = p.parse_args()
    for split in ("train.jsonl", "dev.jsonl"):
        if not (args.data / split).is_file():
            sys.exit(f"quality.py: no {split} in {args.data} (pass --data)")

    prolora = [sys.executable, "-m", "prolora_cli"]
    started = time.perf_counter()
    adapters = {}
    for label in args.variants:
        for seed in args.seeds:
            out = args.work / f"{label}-seed{seed}"
            adapters[str(out)] = (label, seed)  # the run folder is the adapter folder
            if args.reuse and (out / "adapter.safetensors").is_file():
                continue
            # A variant's own --lr (VeRA's vectors need a larger one) comes last and wins.
            run(prolora + ["train", "--data", str(args.data / "train.jsonl"), "--output", str(out),
                           "--overwrite", "--max-steps", str(args.steps),
                           "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                           "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr),
                           "--seed", str(seed), "--log-every", "10", *VARIANTS[label]])
    train_minutes = (time.perf_counter() - started) / 60

    report_path = args.work / "eval.json"
    cmd = prolora + ["eval", "--data", str(args.data / "dev.jsonl"), "--with-base",
                     "--limit", str(args.eval_limit), "--max-seq-len", str(args.max_seq_len),
                     "--max-new-tokens", "24", "--output", str(report_path)]
    for path in adapters:
        cmd += ["--adapter", path]
    run(cmd)
    report = json.loads(report_path.read_text())
    total_minutes = (time.perf_counter() - started) / 60

    rows = {}  # label -> {"params": n, metric: [values over seeds]}
    for r in report["results"]:
        label = adapters[r["name"]][0] if r["adapter"] else "base (no adapter)"
        row = rows.setdefault(label, {"params": r["trainable_params"]})
        for key in ("loss", "exact_match", "choice_accuracy"):
            row.setdefault(key, []).append(r[key])
    summary = {"settings": vars(args) | {"data": str(args.data), "work": str(args.work), "plot": str(args.plot)},
               "examples": report["examples"], "train_minutes": train_minutes, "total_minutes": total_minutes,
               "rows": rows}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    print(f"\n{len(args.seeds)} seed(s), {args.steps} steps of {args.batch_size * args.grad_accum} sequences "
          f"(<= {args.max_seq_len} tokens), lr {args.lr}; {report['examples']} dev examples; "
          f"{total_minutes:.1f} min in all\n")
    print("| adapter | trainable params | eval loss | exact match | choice accuracy |")
    print("|---|---:|---:|---:|---:|")
    for label, row in rows.items():
        cells = []
        for key, scale, fmt in (("loss", 1, "{:.4f} ± {:.4f}"), ("exact_match", 100, "{:.1f} ± {:.1f}%"),
                                ("choice_accuracy", 100, "{:.1f} ± {:.1f}%")):
            mean, sd = spread([v * scale for v in row[key]])
            cells.append(fmt.format(mean, sd))
        print(f"| {label} | {row['params']:,} | " + " | ".join(cells) + " |")
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in rows.items():
        if not row["params"]:
            ax.axhline(statistics.fmean(row["loss"]), color="grey", ls="--", lw=1, label=label)
            continue
        mean, sd = spread(row["loss"])
        ax.errorbar([row["params"]], [mean], yerr=[sd], fmt="o", capsize=4, label=label)
        ax.scatter([row["params"]] * len(row["loss"]), row["loss"], s=8, color="black", alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("dev loss (lower is better)")
    ax.set_title("SmolLM2-135M (NF4) on BIG-bench chat")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
