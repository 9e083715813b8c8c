"""QLoRA training throughput on the GPU against what users would run instead, side by side in one call.

Every variant trains the same LLaMA-2-7B-shaped NF4 model (the one benchmarks/gpu_acceptance.py writes),
on the same data (examples/chat), 8 sequences x 2048 tokens per step, rank 8, for the same steps, each in a
child process of its own (its own peak GPU memory), in alternating order over the rounds:
  trl            TRL SFTTrainer + PEFT LoRA r=8 as TRL's QLoRA docs set it up: NF4 + double quantisation,
                 bf16, all linear layers, alpha 16, dropout 0.05, paged AdamW 32-bit, gradient
                 checkpointing, packing=True (TRL's default "bfd" strategy, which is padding-free: a batch is
                 one flattened row with position_ids restarting per example; sdpa attention, for which
                 transformers builds the block-causal mask from those position_ids)
  trl-wrapped    the same with packing_strategy="wrapped": rows of 2048 cut from the concatenated data, a
                 plain causal mask, so examples attend to each other (what packing did before "bfd")
  lora           prolora train --method lora --rank 8 --packing (4D block-causal mask)
  prolora        prolora train PRoLoRA r=8, u=1 --packing
  prolora-chunked, prolora-liger, prolora-liger-loss   prolora plus --loss chunked, --kernels liger, or both
                 Liger options (--kernels liger --loss liger)
Tokens/s counts non-padding tokens, from the median step after the warm-up ones; MFU takes 6 x parameters
+ 12 x layers x hidden x sequence FLOPs per token (the usual convention: no credit for the recomputation of
gradient checkpointing) over the GPU's dense bf16 peak.
  python3 benchmarks/gpu_throughput.py --output $OUT/gpu_throughput.json            # trl vs prolora
  python3 benchmarks/gpu_throughput.py --variants prolora prolora-chunked prolora-liger ...
  python3 benchmarks/gpu_throughput.py --cpu-smoke      # the whole path on a tiny model on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_acceptance import DATA, SIZES, environment, prolora, write_checkpoint  # noqa: E402

PROLORA_VARIANTS = {
    "lora": ["--method", "lora", "--rank", "8"],
    "prolora": ["--rank", "8", "--unshared", "1"],
    "prolora-chunked": ["--rank", "8", "--unshared", "1", "--loss", "chunked"],
    "prolora-liger": ["--rank", "8", "--unshared", "1", "--kernels", "liger"],
    "prolora-liger-loss": ["--rank", "8", "--unshared", "1", "--kernels", "liger", "--loss", "liger"],
}
TRL_VARIANTS = {"trl": "bfd", "trl-wrapped": "wrapped"}
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # dense bf16, by the GPU's name


def run_prolora(name: str, model: Path, work: Path, size: dict, steps: int) -> dict:
    folder = work / name
    command = prolora("train", "--model", model, *PROLORA_VARIANTS[name], "--data", DATA / "train.jsonl",
                      "--output", folder, "--overwrite", "--packing", "--gradient-checkpointing", "--max-seq-len",
                      size["seq"], "--batch-size", size["batch"], "--grad-accum", 1, "--max-steps", steps,
                      "--log-every", 1)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return {"step_tokens_per_s": [r["tokens_per_s"] for r in log if "tokens_per_s" in r],
            "peak_gpu_memory_gib": max((r.get("peak_gpu_memory_gib", 0.0) for r in log), default=None)}


def trl_worker(model: str, strategy: str, size: dict, steps: int, output: str) -> None:
    """One TRL run in this process; writes the step times, tokens and peak memory as JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from prolora_cli.data.sources import read_jsonl

    on_gpu = torch.cuda.is_available()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(model, quantization_config=bnb, attn_implementation="sdpa",
                                              dtype=torch.bfloat16 if on_gpu else torch.float32)
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(state.num_input_tokens_seen)

    config = SFTConfig(output_dir=str(Path(output).parent / "trl-run"), per_device_train_batch_size=size["batch"],
                       gradient_accumulation_steps=1, gradient_checkpointing=True, optim="paged_adamw_32bit",
                       learning_rate=2e-4, bf16=on_gpu, use_cpu=not on_gpu, max_length=size["seq"], packing=True,
                       packing_strategy=strategy, max_steps=steps, logging_steps=1, save_strategy="no",
                       report_to="none", include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    # The same conversations ours trains on, all as messages (the file mixes shapes, which TRL reads
    # as columns with gaps); TRL's default for messages: the loss over the whole conversation.
    records, _ = read_jsonl(DATA / "train.jsonl")
    data = Dataset.from_list([{"messages": r["messages"]} for r in records])
    trainer = SFTTrainer(model=lm, args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model),
                         peft_config=peft, callbacks=[Clock()])
    times.append(time.perf_counter())  # the first step's time includes the trainer's own set-up
    tokens.append(0)
    trainer.train()
    rates = [(b - a) / (t1 - t0) for a, b, t0, t1 in zip(tokens, tokens[1:], times, times[1:])]
    Path(output).write_text(json.dumps({
        "step_tokens_per_s": rates,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}))


def run_trl(name: str, model: Path, work: Path, size: dict, steps: int, cpu_smoke: bool) -> dict:
    result = work / f"{name}.json"
    command = [sys.executable, __file__, "--trl-worker", TRL_VARIANTS[name], "--model", str(model),
               "--steps", str(steps), "--worker-output", str(result)] + (["--cpu-smoke"] if cpu_smoke else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(result.read_text())


PROFILE = """
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from prolora_cli.cli import main
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
sys.argv = ["prolora", *sys.argv[2:]]
with profile(activities=activities) as prof:
    try:
        main()
    except SystemExit:
        pass
key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:25]
with open(OUTPUT, "w") as f:
    json.dump([{"name": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 1)} for e in rows], f)
"""


def profile_prolora(model: Path, work: Path, size: dict, steps: int) -> list:
    """torch.profiler's key averages (top 25 by own device time) over a short PRoLoRA run, load included."""
    result = work / "profile.json"
    train = ["train", "--model", model, *PROLORA_VARIANTS["prolora"], "--data", DATA / "train.jsonl", "--output",
             work / "profiled", "--overwrite", "--packing", "--gradient-checkpointing", "--max-seq-len", size["seq"],
             "--batch-size", size["batch"], "--grad-accum", 1, "--max-steps", steps]
    code = PROFILE.replace("OUTPUT", repr(str(result)))
    done = subprocess.run([sys.executable, "-c", code, "-", *map(str, train)], capture_output=True, text=True)
    return json.loads(result.read_text()) if done.returncode == 0 and result.is_file() else [
        {"error": done.stderr.strip()[-500:]}]


def summarise(runs: list[dict], warmup: int, flops_per_token: float, peak_tflops: float | None) -> dict:
    """Medians over the rounds of each round's median timed step."""
    good = [r for r in runs if "error" not in r and len(r["step_tokens_per_s"]) > warmup]
    if not good:
        return {"error": next((r["error"] for r in runs if "error" in r), "no timed steps")}
    per_round = [statistics.median(r["step_tokens_per_s"][warmup:]) for r in good]
    tokens_per_s = statistics.median(per_round)
    peaks = [r["peak_gpu_memory_gib"] for r in good if r.get("peak_gpu_memory_gib") is not None]
    return {"tokens_per_s": round(tokens_per_s, 1), "rounds_tokens_per_s": [round(t, 1) for t in per_round],
            "peak_gpu_memory_gib": round(max(peaks), 2) if peaks else None,
            "mfu": round(tokens_per_s * flops_per_token / (peak_tflops * 1e12), 4) if peak_tflops else None}


def flops_per_token(model: Path, seq: int) -> float:
    config = json.loads((model / "config.json").read_text())
    h, layers, inter, vocab = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                    "vocab_size"))
    params = layers * (4 * h * h + 3 * h * inter) + vocab * h  # blocks and the head (the embedding is a lookup)
    return 6 * params + 12 * layers * h * seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["trl", "prolora"],
                   choices=[*TRL_VARIANTS, *PROLORA_VARIANTS])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="per run, warm-up included (default 8; smoke 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile a short PRoLoRA run (key averages)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "prolora-gpu")
    p.add_argument("--output", type=Path, default=Path("runs/gpu_throughput.json"))
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = p.parse_args()
    size = SIZES["cpu-smoke" if args.cpu_smoke else "gpu"]
    steps = args.steps or (4 if args.cpu_smoke else 8)
    if args.trl_worker:
        return trl_worker(str(args.model), args.trl_worker, size, steps, args.worker_output)

    facts = environment(args.cpu_smoke)
    work = args.work.resolve()
    model = work / ("model-tiny" if args.cpu_smoke else "model-7b-shaped")
    if not (model / "config.json").is_file():
        write_checkpoint(model, size)
    order = [v for i in range(args.rounds) for v in (args.variants if i % 2 == 0 else args.variants[::-1])]
    runs: dict[str, list] = {v: [] for v in args.variants}
    for name in order:
        start = time.perf_counter()
        result = (run_trl(name, model, work, size, steps, args.cpu_smoke) if name in TRL_VARIANTS
                  else run_prolora(name, model, work, size, steps))
        runs[name].append({**result, "wall_s": round(time.perf_counter() - start, 1)})
        print(f"{name}: {json.dumps(runs[name][-1])[:300]}", flush=True)
    peak = next((v for k, v in PEAK_TFLOPS.items() if facts["gpu"] and k in facts["gpu"]), None)
    table = {v: summarise(r, args.warmup, flops_per_token(model, size["seq"]), peak) for v, r in runs.items()}
    base = table.get("trl", {})
    for row in table.values():
        if "tokens_per_s" in row and "tokens_per_s" in base:
            row["tokens_per_s_vs_trl"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            if row["peak_gpu_memory_gib"] and base.get("peak_gpu_memory_gib"):
                row["peak_memory_vs_trl"] = round(row["peak_gpu_memory_gib"] / base["peak_gpu_memory_gib"], 3)
    headline = table.get("prolora", {})
    report = {**facts, "batch": f"{size['batch']} x {size['seq']}", "steps_per_run": steps, "warmup": args.warmup,
              "rounds": args.rounds, "order": order, "peak_tflops": peak,
              "prolora_vs_trl_tokens_per_s": headline.get("tokens_per_s_vs_trl"),
              "prolora_vs_trl_peak_memory": headline.get("peak_memory_vs_trl"), "table": table, "runs": runs}
    if args.profile:
        report["profile"] = profile_prolora(model, work, size, steps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name:20s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
