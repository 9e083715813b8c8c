"""The GPU scripts, run here on CPU in their smoke modes: the GPU machine is lent only now and then, for
minutes, so what it runs must already work end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_acceptance_cpu_smoke_runs_every_step(tmp_path):
    done = subprocess.run(["bash", ROOT / "benchmarks" / "gpu_acceptance.sh", "--cpu-smoke", tmp_path / "out",
                           "--work", tmp_path / "work"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    report = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    steps = report["steps"]
    assert done.returncode == 0 and report["ok"], (done.stdout[-3000:], done.stderr[-3000:])
    assert list(steps) == ["checkpoint", "count_params", "dry_run", "train_interrupted", "train_resumed", "merge",
                           "eval", "export_peft", "peft_logits"]
    assert steps["train_interrupted"]["rc"] == 130 and steps["train_interrupted"]["checkpoints"]
    assert steps["train_resumed"]["final_step"] == steps["train_resumed"]["expected_steps"]
    assert steps["peft_logits"]["result"]["argmax_agree"] > 0.99
    assert report["mode"] == "cpu-smoke" and report["versions"]["torch"]


def test_gpu_throughput_cpu_smoke_writes_its_table(tmp_path):
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, ROOT / "benchmarks" / "gpu_throughput.py", "--cpu-smoke", "--variants",
                           "lora", "prolora", "prolora-chunked", "--rounds", "1", "--steps", "3", "--warmup", "1",
                           "--work", tmp_path, "--output", out], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["order"] == ["lora", "prolora", "prolora-chunked"]
    for row in report["table"].values():
        assert row["tokens_per_s"] > 0, row
    assert report["prolora_vs_trl_tokens_per_s"] is None  # TRL was not among the variants
