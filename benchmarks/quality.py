"""The paper's comparison on real data, powered: every method, its learning rate tuned, 3 seeds, intervals.

Fine-tunes the embedded SmolLM2-135M-Instruct (NF4 base, all seven projections) on the BIG-bench chat
training split with each method near LoRA r=2's budget (and LoRA r=8 at four times it), through the real
CLI (`prolora train` / `prolora eval`; every command is printed). The dev split is cut once, by task and
with a fixed seed, into a tuning half and a test half:

1. `--check`: LoRA r=2 and r=8 at one learning rate, scored on the tuning half every `--check-every` steps,
   to see when rank starts to matter (they must separate within the steps the grid trains).
2. Learning rate per method, on the tuning half (seed 0): from 1e-3 (1e-2 for VeRA and Tied-LoRA, 5e-3
   for LoRA r=8, whose alpha/r is PRoLoRA r=8's, 2e-3 for PRoLoRA with rsLoRA's larger scaling) on the
   grid 1e-4, 2e-4, 5e-4, 1e-3, ..., 5e-2 (to 2e-1 for VeRA), the neighbours are tried until the best
   rate is bracketed (the paper's grid {1e-4, 2e-4, 5e-4, 1e-3, 2e-3}, extended upward, as short runs want
   larger steps and VeRA's and Tied-LoRA's vectors more still).
3. At that rate, seeds 0, 1, 2, scored on the test half only: loss over answer tokens, exact match of
   greedy answers, choice accuracy per character (lm-eval's acc_norm).
4. The paired difference of each method to LoRA r=2 on the same test examples and seeds, with a 95%
   bootstrap interval over test examples (each resampled example keeps its three seeds).

Every run's numbers go to `--results` (one small JSON per run, keyed by its full settings and the data's
hash): a run whose JSON matches is not repeated, so the grid can be finished over several sittings and the
committed JSONs reproduce the tables without training. Methods, seeds and the rates of a search step run
as threads; `--workers` bounds how many runs go at once.

    python benchmarks/quality.py --check                  # step 1 (~30 min)
    python benchmarks/quality.py                          # the grid (cached; ~9 h for every method)
    python benchmarks/quality.py --methods lora-r2 prolora-r8-u1 lora-r8     # the paper's three first
    python benchmarks/quality.py --report-only            # tables from the committed JSONs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "bigbench-chat"
GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1)
STANDARD, HIGH = (1e-4, 1e-2, 1e-3), (1e-3, 5e-2, 1e-2)  # (lowest, highest, first tried)
# VeRA trains only two scaling vectors per layer (d starts at 0.1) and was still improving at 5e-2
VERA = (1e-3, 2e-1, 1e-2)
# rank 8 at alpha 16 has PRoLoRA r=8's scaling (alpha/r = 2), whose best rate was 5e-3: start there (the
# search still brackets; the start only saves runs)
SCALE2 = (1e-4, 1e-2, 5e-3)
# rsLoRA scales PRoLoRA r=8 by alpha/sqrt(8) = 5.7 instead of 2, so the step that matched 5e-3 is about
# 2.8x smaller (Adam's step is set by the rate; dW's by rate x scaling): start at 2e-3
RSLORA8 = (1e-4, 1e-2, 2e-3)

# label -> (flags of `prolora train` that define the adapter, learning-rate range). Budgets on SmolLM2-135M
# (`prolora count-params`): LoRA r=2 610,560; PRoLoRA r=8/u=1 (m=n=7) 612,510; SoRA r=2 610,980 before it
# prunes; PRILoRA r=2 610,560 (ranks 1..3 over depth); Tied-LoRA r=371 on q, k, v 609,786 (the paper's
# rank 256 is LoRA r=2's budget on LLaMA-2-7B; here r=256 would be 429,696); VeRA r=256 209,280 (vectors
# only: it cannot spend the budget); LoRA r=8 2,442,240.
VARIANTS = {
    "lora-r2": (["--method", "lora", "--rank", "2"], STANDARD),
    "prolora-r8-u1": (["--method", "prolora", "--rank", "8", "--unshared", "1"], STANDARD),
    "lora-r8": (["--method", "lora", "--rank", "8"], SCALE2),
    "lora-r2-rslora": (["--method", "lora", "--rank", "2", "--scaling", "rslora"], STANDARD),
    "prolora-r8-u1-rslora": (["--method", "prolora", "--rank", "8", "--unshared", "1", "--scaling", "rslora"],
                             RSLORA8),
    "sora-r2": (["--method", "sora", "--rank", "2"], STANDARD),
    "prilora-r2": (["--method", "prilora", "--rank", "2"], STANDARD),
    "tied-lora-r371": (["--method", "tied-lora", "--rank", "371"], HIGH),
    "vera-r256": (["--method", "vera", "--rank", "256"], VERA),
}
DEFAULT_METHODS = ["lora-r2", "prolora-r8-u1", "lora-r8", "tied-lora-r371", "vera-r256", "sora-r2", "prilora-r2",
                   "lora-r2-rslora", "prolora-r8-u1-rslora"]
METRICS = ("loss", "exact_match", "choice_acc_norm")
PRINT_LOCK = threading.Lock()


def say(*parts) -> None:
    with PRINT_LOCK:
        print(*parts, flush=True)


def split_dev(dev: Path, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """Cut dev into a tuning half and a test half, per task (so both halves hold every task alike)."""
    by_task: dict[str, list[str]] = {}
    for line in dev.read_text().splitlines():
        if line.strip():
            by_task.setdefault(json.loads(line).get("task", ""), []).append(line)
    rng, tuning, test = random.Random(seed), [], []
    for task in sorted(by_task):
        lines = by_task[task][:]
        rng.shuffle(lines)
        tuning += lines[: len(lines) // 2]
        test += lines[len(lines) // 2:]
    work.mkdir(parents=True, exist_ok=True)
    paths = work / "tuning.jsonl", work / "test.jsonl"
    for path, lines in zip(paths, (tuning, test)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class Grid:
    """The runs of one benchmark invocation: commands, the cache, and the two stages of a run."""

    def __init__(self, args, tuning: Path, test: Path):
        self.args, self.tuning_path, self.test_path = args, tuning, test
        self.data_hash = digest(args.data / "train.jsonl", tuning, test)
        self.prolora = [sys.executable, "-m", "prolora_cli"]
        self.slots = threading.Semaphore(args.workers)  # runs at once; methods, seeds and rates are threads

    def train_flags(self, label: str, lr: float, seed: int, steps: int, eval_every: int = 0) -> list[str]:
        a = self.args
        return ["--max-steps", str(steps), "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                "--max-seq-len", str(a.max_seq_len), "--packing", "--lr", f"{lr:g}", "--seed", str(seed),
                "--eval-every", str(eval_every), *VARIANTS[label][0]]

    def result_path(self, label: str, lr: float, seed: int, steps: int, eval_every: int = 0) -> Path:
        every = f"-every{eval_every}" if eval_every else ""
        return self.args.results / label / f"steps{steps}-lr{lr:g}-seed{seed}{every}.json"

    def run(self, cmd: list[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads))
        with self.slots:
            say("$", shlex.join(cmd))
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"quality.py: failed ({done.returncode}): {shlex.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def train(self, label: str, lr: float, seed: int, steps: int, eval_every: int = 0) -> dict:
        """Train one run (unless its JSON says it was) and record its tuning-half loss curve."""
        flags = self.train_flags(label, lr, seed, steps, eval_every)
        path = self.result_path(label, lr, seed, steps, eval_every)
        key = {"flags": flags, "data": self.data_hash}
        if path.is_file() and (cached := json.loads(path.read_text()))["key"] == key:
            return cached
        out = self.args.work / "runs" / label / path.stem
        done = out / "key.json"  # a finished run folder (a JSON may be missing after an interruption)
        if not (done.is_file() and json.loads(done.read_text()) == key):
            self.run(self.prolora + ["train", "--data", str(self.args.data / "train.jsonl"), "--eval-data",
                                     str(self.tuning_path), "--output", str(out), "--overwrite", "--log-every", "10", *flags])
            write_json(done, key)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        curve = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
        record = {"key": key, "label": label, "lr": lr, "seed": seed, "steps": steps,
                  "tuning_loss": curve[steps], "tuning_curve": curve,
                  "train_loss": [r["loss"] for r in log if "loss" in r], "adapter": portable(out)}
        write_json(path, record)
        return record

    def test(self, record: dict) -> dict:
        """Score a trained run on the test half (once): summary and per-example numbers."""
        if "test" in record:
            return record
        out = ROOT / record["adapter"]  # relative to the checkout (absolute when --work is outside it)
        if not (out / "adapter.safetensors").is_file():  # committed JSON, adapter gone: retrain it
            self.result_path(record["label"], record["lr"], record["seed"], record["steps"]).unlink()
            record = self.train(record["label"], record["lr"], record["seed"], record["steps"])
        report, preds = out / "test_eval.json", out / "test_predictions.jsonl"
        self.run(self.prolora + ["eval", "--data", str(self.test_path), "--adapter", str(out), "--max-seq-len", "512",
                                 "--max-new-tokens", str(self.args.max_new_tokens), "--output", str(report),
                                 "--save-predictions", str(preds)])
        summary = json.loads(report.read_text())["results"][0]
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        record["trainable_params"] = summary["trainable_params"]
        per_example = {k: [r.get(k) for r in rows] for k in ("loss_sum", "tokens", "exact_match", "choice_acc_norm")}
        record["test"] = {m: summary[m] for m in METRICS} | {"examples": len(rows), "per_example": per_example}
        write_json(self.result_path(record["label"], record["lr"], record["seed"], record["steps"]), record)
        return record

    def search_lr(self, label: str) -> tuple[float, dict]:
        """Seed 0 on the tuning half: from the first rate, try neighbours until the best is bracketed."""
        low, high, first = VARIANTS[label][1]
        grid = [lr for lr in GRID if low <= lr <= high]
        losses = {}

        def loss(i):
            if grid[i] not in losses:
                losses[grid[i]] = self.train(label, grid[i], 0, self.args.steps)["tuning_loss"]
                say(f"{label}: lr {grid[i]:g} -> tuning loss {losses[grid[i]]:.4f}")
            return losses[grid[i]]

        i = grid.index(first)
        while True:
            around = [j for j in (i - 1, i, i + 1) if 0 <= j < len(grid)]
            with ThreadPoolExecutor(len(around)) as pool:
                list(pool.map(loss, around))
            best = min(around, key=loss)
            if best == i:
                if i in (0, len(grid) - 1):
                    say(f"{label}: the best rate {grid[i]:g} is at the end of its range: widen it")
                return grid[i], losses
            i = best

    def method(self, label: str) -> dict:
        lr, losses = self.search_lr(label)
        with ThreadPoolExecutor(len(self.args.seeds)) as pool:
            runs = list(pool.map(lambda seed: self.test(self.train(label, lr, seed, self.args.steps)), self.args.seeds))
        say(f"{label}: lr {lr:g}; test loss " + ", ".join(f"{r['test']['loss']:.4f}" for r in runs))
        return {"label": label, "lr": lr, "tuning": losses, "runs": runs}


def portable(path: Path) -> str:
    """A path as committed JSONs hold it: relative to the checkout where it can be."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def load_results(results: Path, steps: int) -> dict[str, list[dict]]:
    """label -> every run JSON of that label at these steps (tuning runs and seeds)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(results.glob(f"*/steps{steps}-lr*-seed*.json")):
        if "-every" not in path.stem:
            record = json.loads(path.read_text())
            out.setdefault(record["label"], []).append(record)
    return out


def chosen(runs: list[dict]) -> tuple[float, dict[float, float]]:
    """The rate with the lowest tuning loss at seed 0 (what the search ends on), and every rate tried."""
    tried = {r["lr"]: r["tuning_loss"] for r in runs if r["seed"] == 0}
    return min(tried, key=tried.get), tried


def paired(method: list[dict], reference: list[dict], samples: int = 2000) -> dict[str, tuple]:
    """Method minus reference on the same test examples and seeds: (estimate, low, high) per metric, the
    95% interval from resampling test examples (each keeps all its seeds)."""
    import numpy as np

    seeds = sorted({r["seed"] for r in method} & {r["seed"] for r in reference})
    m = {r["seed"]: r["test"]["per_example"] for r in method}
    ref = {r["seed"]: r["test"]["per_example"] for r in reference}
    arr = lambda runs, key: np.array([[np.nan if v is None else v for v in runs[s][key]] for s in seeds], float)
    tokens = arr(ref, "tokens")
    if not np.array_equal(tokens, arr(m, "tokens")):
        sys.exit("quality.py: the test examples differ between runs (tokens per example do not match)")
    d = {"loss": arr(m, "loss_sum") - arr(ref, "loss_sum"), "exact_match": arr(m, "exact_match") - arr(ref, "exact_match"),
         "choice_acc_norm": arr(m, "choice_acc_norm") - arr(ref, "choice_acc_norm")}

    def stats(idx):
        return {"loss": d["loss"][:, idx].sum() / tokens[:, idx].sum(),
                "exact_match": d["exact_match"][:, idx].mean(), "choice_acc_norm": np.nanmean(d["choice_acc_norm"][:, idx])}

    n = tokens.shape[1]
    rng = np.random.default_rng(0)
    boots = [stats(rng.integers(0, n, n)) for _ in range(samples)]
    point = stats(np.arange(n))
    return {k: (float(point[k]), *map(float, np.percentile([b[k] for b in boots], [2.5, 97.5]))) for k in METRICS} | {
        "seeds": seeds}


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    if low > 0 or high < 0:
        return "ahead" if (high < 0) == lower_is_better else "behind"
    return "level (interval holds 0)"


def report(args) -> dict:
    """Markdown tables from the result JSONs (only finished methods: every seed scored on test)."""
    runs = load_results(args.results, args.steps)
    rows, unfinished = {}, {}
    for label in args.methods:
        if label not in runs:
            continue
        lr, tried = chosen(runs[label])
        final = [r for r in runs[label] if r["lr"] == lr and "test" in r and r["seed"] in args.seeds]
        if len(final) == len(args.seeds):
            rows[label] = {"lr": lr, "tried": tried, "runs": final, "params": final[0]["trainable_params"]}
        else:
            unfinished[label] = (tried, final)
    if unfinished:
        print(f"\nNot finished yet ({args.steps} steps; tuning-half loss at each rate tried, seed 0):\n")
        print("| method | rates tried | seeds scored on test |")
        print("|---|---|---|")
        for label, (tried, final) in unfinished.items():
            print(f"| {label} | " + ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in sorted(tried.items())) +
                  f" | {', '.join(str(r['seed']) for r in final) or '-'} |")
    if not rows:
        return rows
    print(f"\n{args.steps} steps of {args.batch_size} x {args.grad_accum} packed sequences of {args.max_seq_len} "
          f"tokens; seeds {', '.join(map(str, args.seeds))}; test half of dev "
          f"({next(iter(rows.values()))['runs'][0]['test']['examples']} examples)\n")
    print("| method | trainable params | lr (tuning loss at each rate tried) | test loss | exact match | choice acc_norm |")
    print("|---|---:|---|---:|---:|---:|")
    for label, row in rows.items():
        tried = ", ".join(f"{'**' if lr == row['lr'] else ''}{lr:g}: {loss:.4f}{'**' if lr == row['lr'] else ''}"
                          for lr, loss in sorted(row["tried"].items()))
        cells = []
        for key, scale, fmt in (("loss", 1, "{:.4f} ± {:.4f}"), ("exact_match", 100, "{:.1f} ± {:.1f}%"),
                                ("choice_acc_norm", 100, "{:.1f} ± {:.1f}%")):
            values = [r["test"][key] * scale for r in row["runs"]]
            cells.append(fmt.format(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0))
        print(f"| {label} | {row['params']:,} | {tried} | " + " | ".join(cells) + " |")
    ref = args.reference
    if ref in rows:
        print(f"\nPaired difference to {ref} (method minus {ref}; 95% bootstrap interval over test "
              "examples, seeds pooled); loss: lower is better, the others higher:\n")
        print("| method | Δ test loss | Δ exact match (points) | Δ choice acc_norm (points) |")
        print("|---|---|---|---|")
        for label, row in rows.items():
            if label == ref:
                continue
            row["paired"] = p = paired(row["runs"], rows[ref]["runs"])
            cell = lambda k, s, lower: (f"{p[k][0] * s:+.{4 if s == 1 else 1}f} [{p[k][1] * s:+.{4 if s == 1 else 1}f}, "
                                        f"{p[k][2] * s:+.{4 if s == 1 else 1}f}] {verdict(p[k][1], p[k][2], lower)}")
            print(f"| {label} | {cell('loss', 1, True)} | {cell('exact_match', 100, False)} | "
                  f"{cell('choice_acc_norm', 100, False)} |")
    return rows


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    placed = []
    for label, row in rows.items():
        losses = [r["test"]["loss"] for r in row["runs"]]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0
        # methods at one budget would hide each other: step each one a little to the right of the last
        x = row["params"] * 1.04 ** sum(abs(p / row["params"] - 1) < 0.05 for p in placed)
        placed.append(row["params"])
        ax.errorbar([x], [statistics.fmean(losses)], yerr=[sd], fmt="o", capsize=4, label=label)
        ax.scatter([x] * len(losses), losses, s=8, color="black", alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (points at one budget set side by side)")
    ax.set_ylabel("test loss (lower is better)")
    ax.set_title("SmolLM2-135M (NF4) on BIG-bench chat, lr tuned per method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def check(grid: Grid) -> None:
    """LoRA r=2 and r=8 at one rate: their tuning-half loss every --check-every steps."""
    a = grid.args
    with ThreadPoolExecutor(a.workers) as pool:
        curves = dict(zip(("lora-r2", "lora-r8"), pool.map(
            lambda label: grid.train(label, a.check_lr, 0, a.check_steps, a.check_every)["tuning_curve"],
            ("lora-r2", "lora-r8"))))
    print(f"\nlr {a.check_lr:g}, seed 0: tuning-half loss by step\n")
    print("| step | LoRA r=2 | LoRA r=8 | r=8 minus r=2 |")
    print("|---:|---:|---:|---:|")
    for step in curves["lora-r2"]:
        r2, r8 = curves["lora-r2"][step], curves["lora-r8"][step]
        print(f"| {step} | {r2:.4f} | {r8:.4f} | {r8 - r2:+.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder with train.jsonl and dev.jsonl")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="runs at once (2 one-thread runs beat one two-thread run)")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--check", action="store_true", help="only the check: when do LoRA r=2 and r=8 separate?")
    p.add_argument("--check-lr", type=float, default=1e-3)
    p.add_argument("--check-steps", type=int, default=240)
    p.add_argument("--check-every", type=int, default=40)
    p.add_argument("--report-only", action="store_true", help="tables from --results; train nothing")
    p.add_argument("--reference", default="lora-r2", choices=list(VARIANTS), help="the paired differences' baseline")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality", help="run folders (adapters)")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "quality", help="one JSON per run")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "quality.png")
    args = p.parse_args()
    if args.report_only:
        if rows := report(args):
            plot(rows, args.plot)
        return
    for split in ("train.jsonl", "dev.jsonl"):
        if not (args.data / split).is_file():
            sys.exit(f"quality.py: no {split} in {args.data} (pass --data)")
    grid = Grid(args, *split_dev(args.data / "dev.jsonl", args.work))
    if args.check:
        check(grid)
        return
    with ThreadPoolExecutor(len(args.methods)) as pool:
        list(pool.map(grid.method, args.methods))
    if rows := report(args):
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
