"""`prolora train` end to end, through the real CLI in subprocesses, on a tiny LLaMA folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, attach_adapter, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

EXAMPLES = Path(__file__).parent.parent / "examples" / "chat"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (folder / "dev.jsonl").write_text((EXAMPLES / "dev.jsonl").read_text())
    return folder


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--quant", "none", "--data", data / "train.jsonl",
            "--output", out, "--rank", "8", "--unshared", "2", "--share", "3", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "2e-2", "--max-seq-len", "96", "--device", "cpu", *extra]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_run_writes_adapter_log_plot_and_lowers_eval_loss(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*train_args(tiny_model_dir, data, out, "--eval-data", data / "dev.jsonl",
                                 "--max-steps", "12", "--eval-every", "6"))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter.safetensors", "train_log.jsonl", "loss.png",
            "run_config.json"} <= names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = log_records(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 6, 12]
    losses = [loss for _, loss in evals]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, evals
    assert all(k in records[1] for k in ("loss", "lr", "tokens_per_s"))
    assert "training finished" in result.stdout and "eval loss" in result.stdout
    # Not a terminal (captured): a line per logged step rather than a bar that shows only at the end.
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/12" for s in range(1, 13)]
    assert "eval " in progress[5] and "eval " not in progress[4]

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["u"], cfg["m"], cfg["n"]) == (8, 2, 3, 3)
    assert cfg["base_model"] == str(Path(tiny_model_dir).resolve())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attach_adapter(model, out)
    tensors = load_file(out / "adapter.safetensors")
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("B_shared"))


def test_refuses_to_overwrite_a_finished_run(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(tiny_model_dir, data, out, "--max-steps", "1")).returncode == 0
    before = (out / "adapter.safetensors").read_bytes()
    result = run_cli(*train_args(tiny_model_dir, data, out, "--max-steps", "1"))
    assert_one_line_error(result, "already holds a finished run", "--overwrite")
    assert (out / "adapter.safetensors").read_bytes() == before
    assert run_cli(*train_args(tiny_model_dir, data, out, "--max-steps", "2", "--overwrite")).returncode == 0
    assert max(r["step"] for r in log_records(out)) == 2


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_model_dir, data, tmp_path):
    common = ("--max-steps", "40", "--save-every", "2", "--dropout", "0.1", "--seed", "7")
    straight = tmp_path / "straight"
    assert run_cli(*train_args(tiny_model_dir, data, straight, *common)).returncode == 0

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "prolora_cli", *map(str, train_args(tiny_model_dir, data, broken, *common))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = broken / "checkpoints" / "step-0000002"
    assert wait_for(first.exists, proc), proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (broken / "adapter.safetensors").exists()  # it really died mid-run

    resumed = run_cli(*train_args(tiny_model_dir, data, broken, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-" in resumed.stdout
    a, b = load_file(straight / "adapter.safetensors"), load_file(broken / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    steps = [r["step"] for r in log_records(broken) if "loss" in r]
    assert steps == list(range(1, 41))  # the log was rewound to the checkpoint, not duplicated
    assert len(list((broken / "checkpoints").glob("step-*"))) <= 2


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prolora_cli",
           *map(str, train_args(tiny_model_dir, data, out, "--max-steps", "400"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    assert wait_for(lambda: log.exists() and log.stat().st_size > 0, proc), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr and "interrupted (SIGINT)" in stderr
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()


def test_nf4_base_trains_on_cpu(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data, out, "--max-steps", "4", "--eval-data", data / "dev.jsonl")
    args[args.index("--quant") + 1] = "nf4"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    evals = [r["eval_loss"] for r in log_records(out) if "eval_loss" in r]
    assert evals[-1] < evals[0]


@pytest.mark.parametrize("change,needles", [
    ({"--data": "missing.jsonl"}, ["missing.jsonl", "not found"]),
    ({"--data": "bad.jsonl"}, ["bad.jsonl", "line 2", "unknown role"]),
    ({"--batch-size": "0"}, ["--batch-size"]),
    ({"--quant": "int3"}, ["--quant"]),
    ({"--unshared": "9"}, ["unshared"]),
    ({"--chat-format": "alpaca"}, ["--chat-format"]),
    ({"--model": "/no/such/model"}, ["/no/such/model"]),
])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, data, tmp_path, change, needles):
    (tmp_path / "bad.jsonl").write_text(
        (EXAMPLES / "train.jsonl").read_text().splitlines()[0] + "\n"
        + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    args = [str(a) for a in train_args(tiny_model_dir, data, tmp_path / "out", "--max-steps", "1")]
    for flag, value in change.items():
        if flag == "--data":
            value = str(tmp_path / value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert_one_line_error(run_cli(*args), *needles)
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, data, tmp_path):
    result = run_cli(*train_args(tiny_model_dir, data, tmp_path / "none", "--resume"))
    assert_one_line_error(result, "no intact checkpoint")


@pytest.mark.smollm
def test_embedded_smollm2_qlora_run(tmp_path):
    """The README's main job in miniature: the real embedded model, NF4, a few steps."""
    out = tmp_path / "run"
    result = run_cli("train", "--data", EXAMPLES / "train.jsonl", "--eval-data", EXAMPLES / "dev.jsonl",
                     "--output", out, "--rank", "8", "--unshared", "1", "--max-steps", "3",
                     "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64", "--lr", "1e-3",
                     env={"PROLORA_CACHE": os.environ.get("PROLORA_CACHE", "")} if os.environ.get("PROLORA_CACHE") else None)
    assert result.returncode == 0, result.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model"] == "smollm2-135m" and cfg["m"] == 7
    evals = [r["eval_loss"] for r in log_records(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]


def test_nf4_gradients_stay_exact_after_an_eval_pass(tiny_model_dir):
    """bitsandbytes 0.50 repacks 4-bit weights for CPU inference on the first eval-mode forward and
    then trains through a bf16 kernel without autograd; load_model must keep that off.

    Reference: a full-precision model holding the very same (dequantized) weights.
    """
    import bitsandbytes as bnb

    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.inject import adapter_layers, inject
    from prolora_cli.models.loading import load_model

    quantized, _, _ = load_model(str(tiny_model_dir), "nf4", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference.get_submodule(name).weight.data.copy_(weight)
    ids = torch.randint(3, 300, (2, 16))
    for model in (quantized, reference):
        torch.manual_seed(0)
        inject(model, AdapterConfig.create(8, unshared=1, share=3, dropout=0.0))
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.B_unshared.fill_(0.01)
        model.eval()
        with torch.no_grad():
            model(ids)  # the eval pass that used to trigger the repacking
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    ours, theirs = adapter_layers(quantized), adapter_layers(reference)
    for name in ours:  # A's gradient flows back through every later frozen 4-bit layer
        torch.testing.assert_close(ours[name].A_unshared.grad, theirs[name].A_unshared.grad, rtol=1e-4, atol=1e-7)


def test_report_to_tensorboard_logs_what_train_log_holds(tiny_model_dir, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_cli(*train_args(tiny_model_dir, data, out, "--max-steps", "4", "--report-to", "tensorboard",
                                 "--eval-data", data / "dev.jsonl", "--eval-every", "2"))
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(out / "logs" / "prolora"))
    events.Reload()
    logged = {(e.step, round(e.value, 5)) for e in events.Scalars("loss")}
    assert logged == {(r["step"], round(r["loss"], 5)) for r in log_records(out) if "loss" in r}
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 2, 4]
    assert list((out / "logs" / "prolora").glob("*/hparams.yml"))  # the run's flags as hyperparameters


def test_report_to_refuses_unknown_or_missing_trackers(tiny_model_dir, data, tmp_path):
    assert_one_line_error(run_cli(*train_args(tiny_model_dir, data, tmp_path / "r", "--report-to", "foo")),
                          "unknown tracker 'foo'")
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        assert_one_line_error(run_cli(*train_args(tiny_model_dir, data, tmp_path / "r", "--report-to", "mlflow")),
                              "needs the mlflow package")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra", [[], ["--packing"], ["--grad-accum", "3"],
                                   ["--epochs", "1.5", "--packing", "--grad-accum", "2"]])
def test_dry_run_counts_the_steps_the_run_trains(tiny_model_dir, data, tmp_path, extra):
    """One function counts the steps; `--dry-run` and the run it previews both call it."""
    args = ["train", "--model", tiny_model_dir, "--quant", "none", "--device", "cpu", "--data",
            data / "train.jsonl", "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "96",
            "--output", tmp_path / "run", *extra]
    dry = run_cli(*args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    steps = json.loads(dry.stdout)["steps"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    started = next(line for line in result.stdout.splitlines() if line.startswith("training "))
    assert f" {steps} steps of " in started
    assert max(r["step"] for r in log_records(tmp_path / "run")) == steps
