"""The whole CLI on a GPU, end to end, as a user runs it (benchmarks/gpu_acceptance.sh runs this).

On a LLaMA-2-7B-shaped checkpoint (32 blocks, bf16, random weights, written here by the synthetic writer):
  count-params, train --dry-run (the plan and its memory estimate), train (NF4 + bf16 + paged AdamW +
  gradient checkpointing + --packing, 8 x 2048) stopped by a SIGINT mid-run, --resume to the end,
  merge --base nf4 (verified), eval of the base and the adapter, export --format peft loaded by PEFT with
  logits compared with ours. Each step's command, exit code, seconds and findings go into one JSON,
  rewritten after every step so that a run cut short still reports what it did.
--cpu-smoke: the same steps on a tiny model on CPU, in a few minutes (make test runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "chat"
SIZES = {  # the model, the batch and the run, per mode
    "gpu": dict(blocks=32, widths={}, vocab=8000, seq=2048, batch=8, steps=20, interrupt_at=8, limit=16),
    "cpu-smoke": dict(blocks=2, widths=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                            num_key_value_heads=4, vocab_size=600),
                      vocab=600, seq=256, batch=2, steps=40, interrupt_at=2, limit=4),
}


class Report:
    """The JSON being built: facts, then one entry per step."""

    def __init__(self, path: Path, facts: dict):
        self.path, self.data = path, {**facts, "steps": {}}
        self.write()

    def step(self, name: str, **outcome) -> dict:
        self.data["steps"][name] = outcome
        self.write()
        print(f"{name}: {json.dumps(outcome)[:400]}", flush=True)
        return outcome

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def prolora(*args) -> list[str]:
    return [sys.executable, "-m", "prolora_cli", *map(str, args)]


def run(report: Report, name: str, command: list[str], parse_json: bool = False, timeout: int = 600) -> dict:
    command = [str(c) for c in command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    shown = ["python -c", name, *command[3:]] if command[1] == "-c" else command[2:]
    outcome = dict(rc=done.returncode, s=round(time.perf_counter() - start, 1), command=" ".join(shown))
    if done.returncode != 0:
        outcome["stderr"] = done.stderr[-1500:]
    elif parse_json:
        outcome["result"] = json.loads(done.stdout)
    return report.step(name, **outcome)


def environment(cpu_smoke: bool) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "bitsandbytes", "peft", "datasets", "trl", "liger-kernel"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if not cpu_smoke and gpu is None:
        sys.exit("no CUDA GPU here: use --cpu-smoke")
    return dict(mode="cpu-smoke" if cpu_smoke else "gpu", gpu=gpu, python=platform.python_version(),
                versions=versions, date=time.strftime("%Y-%m-%d %H:%M:%S"))


def write_checkpoint(folder: Path, size: dict) -> None:
    from prolora_cli.testing.synthetic import train_tokenizer, write_random_llama

    texts = [line for f in DATA.glob("*.jsonl") for line in f.read_text().splitlines()]
    write_random_llama(folder, size["blocks"], dtype="bf16", tokenizer=train_tokenizer(texts * 2, size["vocab"]),
                       **size["widths"])


def wait_for_step(log: Path, step: int, process: subprocess.Popen, timeout: float) -> bool:
    """Until the run's log holds `step` (True), or the run ended or the time ran out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines()):
            return True
        time.sleep(0.1)
    return False


def interrupted_then_resumed(report: Report, train: list[str], run_dir: Path, size: dict) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old log would end the wait at once
    start = time.perf_counter()
    process = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached = wait_for_step(run_dir / "train_log.jsonl", size["interrupt_at"], process, timeout=400)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    report.step("train_interrupted", rc=process.returncode, expected_rc=130, reached_step=reached,
                checkpoints=checkpoints, s=round(time.perf_counter() - start, 1),
                ok=process.returncode == 130 and bool(checkpoints), stderr=err[-800:])
    outcome = run(report, "train_resumed", train + ["--resume"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    timed = [r for r in log if "tokens_per_s" in r][1:]  # the first step of a run warms up
    outcome.update(final_step=max((r["step"] for r in log), default=0), expected_steps=size["steps"],
                   tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
                   trained_tokens_per_s=statistics.median(r["trained_tokens_per_s"] for r in timed) if timed else None,
                   peak_gpu_memory_gib=max((r.get("peak_gpu_memory_gib", 0) for r in log), default=None),
                   loss_first_last=[timed[0]["loss"], timed[-1]["loss"]] if timed else None,
                   eval_loss=[r["eval_loss"] for r in log if "eval_loss" in r])
    outcome["ok"] = outcome["rc"] == 0 and outcome["final_step"] == size["steps"]
    report.step("train_resumed", **outcome)


PEFT_CHECK = """
import json, sys, torch
from peft import PeftModel
from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import attach
from prolora_cli.data.sources import read_jsonl
from prolora_cli.models.loading import load_model
model_dir, adapter, export = sys.argv[1:4]
ours, tok, _ = load_model(model_dir, "nf4")
attach(ours, read_config(adapter), read_tensors(adapter))
theirs = PeftModel.from_pretrained(load_model(model_dir, "nf4")[0], export).eval()
texts = [r["messages"][0]["content"] for r in read_jsonl("examples/chat/dev.jsonl")[0][:4]]
batch = tok(texts, return_tensors="pt", padding=True).to(ours.device)
with torch.no_grad():
    a, b = ours.eval()(**batch).logits.float(), theirs(**batch).logits.float()
print(json.dumps({"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
                  "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU (what make test runs)")
    p.add_argument("output", type=Path, nargs="?", default=Path("runs/gpu_acceptance"), help="for the JSON")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "prolora-gpu",
                   help="for the checkpoint (written once, reused), the run, the merged model, the export")
    args = p.parse_args()
    size = SIZES["cpu-smoke" if args.cpu_smoke else "gpu"]
    out, work = args.output.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "gpu_acceptance.json", environment(args.cpu_smoke))
    model, run_dir = work / ("model-tiny" if args.cpu_smoke else "model-7b-shaped"), work / "run"

    start = time.perf_counter()
    if not (model / "config.json").is_file():
        write_checkpoint(model, size)
    report.step("checkpoint", s=round(time.perf_counter() - start, 1), blocks=size["blocks"],
                bytes=sum(f.stat().st_size for f in model.glob("*.safetensors")), ok=True)

    method = ["--rank", "8", "--unshared", "1"]
    counted = run(report, "count_params", prolora("count-params", "--model", model, *method, "--json"), True)
    train = prolora("train", "--model", model, *method, "--data", DATA / "train.jsonl", "--output", run_dir,
                    "--packing", "--gradient-checkpointing", "--max-seq-len", size["seq"], "--batch-size",
                    size["batch"], "--grad-accum", 1, "--max-steps", size["steps"], "--save-every",
                    size["steps"] // 2, "--log-every", 1, "--eval-data", DATA / "dev.jsonl")
    planned = run(report, "dry_run", train + ["--dry-run", "--json"], True)
    interrupted_then_resumed(report, train, run_dir, size)

    merged = work / "merged"
    run(report, "merge", prolora("merge", "--adapter", run_dir, "--output", merged, "--base", "nf4",
                                 "--overwrite", "--json"), True)
    run(report, "eval", prolora("eval", "--model", model, "--adapter", run_dir, "--with-base", "--data",
                                DATA / "dev.jsonl", "--limit", size["limit"], "--metrics", "loss", "--json"), True)
    export = work / "peft"
    if run(report, "export_peft", prolora("export", "--adapter", run_dir, "--format", "peft", "--output", export,
                                          "--overwrite"))["rc"] == 0:
        outcome = run(report, "peft_logits", [sys.executable, "-c", PEFT_CHECK, model, run_dir, export], True)
        if outcome["rc"] == 0:
            r = outcome["result"]
            outcome["ok"] = r["max_abs_diff"] <= 2e-2 * r["max_abs_logit"]  # bf16 compute on both sides
            report.step("peft_logits", **outcome)

    steps = report.data["steps"]
    estimate = (planned.get("result") or {}).get("memory_per_device_gib", {}).get("total")
    peak = steps.get("train_resumed", {}).get("peak_gpu_memory_gib")
    report.data["memory"] = dict(estimated_gib=estimate, measured_peak_gib=peak,
                                 estimate_over_peak=round(estimate / peak, 2) if estimate and peak else None)
    trainable = (counted.get("result") or {})
    report.data["ok"] = all(s.get("ok", s.get("rc") == 0) for s in steps.values())
    report.data["trainable"] = trainable
    report.write()
    print(f"all steps ok: {report.data['ok']}; {out / 'gpu_acceptance.json'}")
    sys.exit(0 if report.data["ok"] else 1)


if __name__ == "__main__":
    main()
