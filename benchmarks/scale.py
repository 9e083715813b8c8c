"""Does `prolora merge` (and `train`) scale to the user's model? Peak memory and time against model size.

Models: the embedded SmolLM2-135M (its GGUF converted once to an fp32 safetensors cache) and random
checkpoints with LLaMA-2-7B's widths (hidden 4096, intermediate 11008, 32 heads) and 2, 8 or 32
blocks in bf16, written once into --scratch (the full 32 blocks: 13.5 GB). Each adapter: PRoLoRA r=8,
u=1 on all seven projections, random tensors.

Every measurement runs in a child process of its own; peak RSS is the kernel's count for that child
(os.wait4), time is its wall time. Per model:
  - `prolora merge` as a user runs it (streamed, --verify stream) and with --verify none (the write alone);
  - PEFT's merge as its users run it: transformers loads the base in its dtype, PeftModel.from_pretrained
    loads our adapter exported to PEFT's format, merge_and_unload(), save_pretrained() (skipped above
    --peft-max-blocks: it holds the whole model, twice while saving);
  - loading the 7B-shaped base as NF4 the way `prolora train` does (time, memory), and one `prolora train`
    run of 2 steps (NF4 base, r=8, u=1, batch 4 x 256 tokens) up to --train-max-blocks blocks.
The GGUF conversion of the embedded model is timed too (an empty cache in a child).

    python benchmarks/scale.py --scratch /path/with/40GB      # the table in docs/benchmarks.md
    python benchmarks/scale.py --blocks 2 --scratch /tmp/s    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROLORA = [sys.executable, "-m", "prolora_cli"]


def tree_anon_kib(pid: int) -> int:
    """Pss_Anon of a process and all its descendants, in KiB (0 for those already gone)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(tree_anon_kib(int(c)) for c in (task / "children").read_text().split())
    except OSError:
        pass
    return total


def measure(command: list[str], env: dict | None = None) -> dict:
    """Wall time, peak RSS and peak anonymous memory of one child process; its stdout.

    Peak RSS (the kernel's count, os.wait4) includes pages of memory-mapped files that were touched:
    a checkpoint read through safetensors' memory map counts in full although those pages are page
    cache the kernel drops under pressure. Peak anonymous memory (sampled every 50 ms) is what the
    process really holds: the sum over it and the processes it starts (datasets' tokenizing workers) of
    their proportional share (Pss_Anon), so that pages a forked worker still shares count once.
    """
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        anon = {"peak": 0}

        def sample():
            while child.returncode is None:
                anon["peak"] = max(anon["peak"], tree_anon_kib(child.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        sampler.join()
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:4])}... exited {child.returncode}: {err.read()[-2000:]}")
        return {"s": wall, "peak_gib": usage.ru_maxrss / 2**20, "anon_gib": anon["peak"] / 2**20,
                "stdout": out.read()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def seven_b_shaped(scratch: Path, blocks: int) -> Path:
    """Written once per block count; reused by later runs."""
    from prolora_cli.testing.synthetic import train_tokenizer, write_random_llama

    folder = scratch / f"llama2-7b-shaped-{blocks}"
    if not (folder / "config.json").is_file() or json.loads((folder / "config.json").read_text())[
            "num_hidden_layers"] != blocks:
        texts = (ROOT / "examples" / "chat" / "train.jsonl").read_text().splitlines()
        shutil.rmtree(folder, ignore_errors=True)
        write_random_llama(folder, blocks, dtype="bf16", tokenizer=train_tokenizer(texts * 2))
    return folder


PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

LOAD_NF4 = """
import sys, time
from prolora_cli.models.loading import load_model
start = time.perf_counter()
load_model(sys.argv[1], "nf4", device="cpu")
print(time.perf_counter() - start)
"""


def merge_rows(name: str, base: Path, scratch: Path, peft: bool) -> dict:
    from prolora_cli.testing.synthetic import random_adapter

    adapter = random_adapter(base, scratch / f"{name}-adapter", rank=8, unshared=1, scale=0.01)
    out = scratch / f"{name}-merged"
    row = {"model": name, "checkpoint_gib": folder_bytes(base) / 2**30}
    for verify in ("stream", "none"):
        r = measure([*PROLORA, "merge", "--adapter", str(adapter), "-o", str(out), "--verify", verify,
                     "--overwrite", "--json"])
        row[f"merge_{verify}"] = {k: r[k] for k in ("s", "peak_gib", "anon_gib")}
        if verify == "stream":
            result = json.loads(r["stdout"])
            row["check"] = {k: result[k] for k in ("relative_diff", "max_block_relative_diff", "dtype")}
    shutil.rmtree(out, ignore_errors=True)
    if peft:
        exported = scratch / f"{name}-peft"
        subprocess.run([*PROLORA, "export", "--adapter", str(adapter), "-o", str(exported), "--overwrite"],
                       check=True, capture_output=True)
        r = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(exported), str(out)])
        row["peft_merge"] = {k: r[k] for k in ("s", "peak_gib", "anon_gib")}
        shutil.rmtree(out, ignore_errors=True)
    return row


def load_row(base: Path) -> dict:
    """Loading the base as `prolora train` does (NF4 through transformers' loader)."""
    r = measure([sys.executable, "-c", LOAD_NF4, str(base)])
    return {"s": float(r["stdout"].strip().splitlines()[-1]), "peak_gib": r["peak_gib"], "anon_gib": r["anon_gib"]}


def train_row(name: str, base: Path, scratch: Path) -> dict:
    """`prolora train` for 2 steps: the first includes warm-up; the second is a plain step."""
    out = scratch / f"{name}-run"
    r = measure([*PROLORA, "train", "--model", str(base), "--data", str(ROOT / "examples/chat/train.jsonl"),
                 "--rank", "8", "--unshared", "1", "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "256",
                 "--output", str(out), "--overwrite"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [rec["elapsed_s"] for rec in log if "elapsed_s" in rec]
    shutil.rmtree(out, ignore_errors=True)
    return {"first_step_s": steps[0], "second_step_s": steps[1] - steps[0], "peak_gib": r["peak_gib"],
            "anon_gib": r["anon_gib"], "total_s": r["s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, required=True, help="where the 7B-shaped checkpoints go (40 GB free "
                    "for 32 blocks: the base and its merge)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--peft-max-blocks", type=int, default=8)
    ap.add_argument("--train-max-blocks", type=int, default=8)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--output", type=Path, default=ROOT / "runs" / "scale.json")
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.skip_embedded:
        with tempfile.TemporaryDirectory() as cache:  # an empty cache: the conversion runs
            conv = measure([sys.executable, "-c", "from prolora_cli.models.loading import embedded_gguf, gguf_as_folder; "
                            "print(gguf_as_folder(embedded_gguf()))"], env={"PROLORA_CACHE": cache})
        from prolora_cli.models.loading import embedded_gguf, gguf_as_folder

        row = merge_rows("smollm2-135m", gguf_as_folder(embedded_gguf()), args.scratch, peft=True)
        row["gguf_conversion"] = {k: conv[k] for k in ("s", "peak_gib", "anon_gib")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for blocks in args.blocks:
        name = f"7b-shaped-{blocks}"
        base = seven_b_shaped(args.scratch, blocks)
        row = merge_rows(name, base, args.scratch, peft=blocks <= args.peft_max_blocks)
        row["load_nf4"] = load_row(base)
        if blocks <= args.train_max_blocks:
            row["train"] = train_row(name, base, args.scratch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    def cell(d):
        return f"{d['s']:.0f} s, {d['peak_gib']:.2f} / {d['anon_gib']:.2f} GiB" if d else "-"

    print("Cells: wall time, peak RSS / peak anonymous memory.\n")
    print("| model | checkpoint | prolora merge (verified) | write only (--verify none) | PEFT merge_and_unload | "
          "merge peak RSS / checkpoint | logits rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['checkpoint_gib']:.2f} GiB | {cell(r['merge_stream'])} | {cell(r['merge_none'])} | "
              f"{cell(r.get('peft_merge'))} | {r['merge_stream']['peak_gib'] / r['checkpoint_gib']:.2f} | "
              f"{r['check']['relative_diff']:.2g} |")
    print()
    print("| model | load as NF4 | train: 1st step | 2nd step | train peak RSS / anon |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "load_nf4" in r:
            t = r.get("train")
            steps = f"{t['first_step_s']:.0f} s | {t['second_step_s']:.0f} s | {t['peak_gib']:.2f} / {t['anon_gib']:.2f} GiB" \
                if t else "- | - | -"
            print(f"| {r['model']} | {cell(r['load_nf4'])} | {steps} |")


if __name__ == "__main__":
    main()
