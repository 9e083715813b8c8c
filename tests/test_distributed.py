"""`prolora train` under torchrun: 2 CPU processes (gloo) take the same steps as 1 with the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from safetensors.torch import load_file

EXAMPLES = Path(__file__).parent.parent / "examples" / "chat"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.jsonl").write_text("\n".join(EXAMPLES.joinpath("train.jsonl").read_text().splitlines()[:64]) + "\n")
    return folder / "train.jsonl"


def command(processes: int, model_dir, data, out, *extra) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "prolora_cli", "train", "--model", str(model_dir), "--data", str(data),
            "--output", str(out), "--device", "cpu", "--dropout", "0", "--lr", "1e-2", "--grad-accum", "2",
            "--max-seq-len", "96", "--seed", "3", *map(str, extra)]


def train(processes: int, batch: int, model_dir, data, out, *extra, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command(processes, model_dir, data, out, "--batch-size", batch, *extra),
                            capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_adapter(a_dir: Path, b_dir: Path, tolerance: float = 1e-4) -> None:
    a, b = load_file(a_dir / "adapter.safetensors"), load_file(b_dir / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if b[key].numel():
            relative = ((a[key] - b[key]).norm() / b[key].norm().clamp_min(1e-12)).item()
            assert relative < tolerance, (key, relative)


@pytest.mark.parametrize("quant,adapter", [
    ("nf4", ["--rank", "8", "--unshared", "1"]),                    # PRoLoRA on the QLoRA base
    ("none", ["--method", "tied-lora", "--rank", "8"]),             # tensors shared across blocks
    ("none", ["--rank", "8", "--unshared", "0"]),                   # zero-sized unshared parts
])
def test_two_processes_take_the_steps_of_one_with_the_global_batch(tiny_model_dir, data, tmp_path, quant, adapter):
    extra = ["--quant", quant, "--max-steps", "4", *adapter]  # length grouping is on by default
    one = train(1, 4, tiny_model_dir, data, tmp_path / "one", *extra)
    two = train(2, 2, tiny_model_dir, data, tmp_path / "two", *extra)
    assert two.stdout.startswith("2 processes (multi_cpu): batch 2 per process x 2 x 2 accumulation = 8")
    assert one.stdout.startswith("1 process: batch 4 per process x 1 x 2 accumulation = 8")
    assert two.stdout.count("training finished") == 1  # the other process stays quiet
    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    one_log = (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()
    two_log = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(one_log) == len(two_log) == 4  # one writer
    for a, b in zip(one_log, two_log):
        a, b = json.loads(a), json.loads(b)
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_two_processes_killed_and_resumed_end_as_an_uninterrupted_run(tiny_model_dir, data, tmp_path):
    common = ["--quant", "none", "--rank", "8", "--unshared", "2", "--max-steps", "30", "--save-every", "2"]
    train(2, 2, tiny_model_dir, data, tmp_path / "straight", *common)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(command(2, tiny_model_dir, data, broken, "--batch-size", 2, *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = broken / "checkpoints" / "step-0000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert first.exists(), proc.stderr.read()[-3000:]
    import psutil  # the launcher starts its workers in sessions of their own: kill each, mid-run

    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.kill()
    proc.kill()
    proc.wait()
    assert len(list((broken / "checkpoints").glob("step-*"))) >= 1
    assert not (broken / "adapter.safetensors").exists()

    refused = train(1, 4, tiny_model_dir, data, broken, *common, "--resume", check=False)
    assert_one_line_error(refused, "written by 2 process(es)")
    resumed = train(2, 2, tiny_model_dir, data, broken, *common, "--resume")
    assert "resuming from step-" in resumed.stdout
    assert_same_adapter(tmp_path / "straight", broken, tolerance=1e-5)
    steps = [line for line in (broken / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 30


def test_the_trained_adapter_differs_from_a_single_process_on_half_the_batch(tiny_model_dir, data, tmp_path):
    """The equality above is not vacuous: one process with only its own share of the batch differs."""
    extra = ["--quant", "none", "--max-steps", "4", "--rank", "8", "--unshared", "1"]
    train(1, 2, tiny_model_dir, data, tmp_path / "half", *extra)
    train(2, 2, tiny_model_dir, data, tmp_path / "two", *extra)
    with pytest.raises(AssertionError):
        assert_same_adapter(tmp_path / "half", tmp_path / "two")


def test_fsdp_keeps_each_block_with_its_adapters_and_gathers_them_whole(tmp_path):
    """torch FSDP (v1) on 2 gloo processes with prolora's wrap policy: one unit per decoder block,
    every adapter layer whole exactly when its own block's unit is; a step equals the unsharded step on
    the whole batch; the adapter gathered block by block round-trips through load."""
    out = tmp_path / "fsdp.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(Path(__file__).parent / "fsdp_worker.py"), str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["world"] == 2 and found["blocks"] == 3 and found["units"] == 4  # 3 blocks + the root
    assert len(found["whole_under"]) == found["layers"] == 21
    for path, unit in found["whole_under"].items():
        assert unit == f"LlamaDecoderLayer.{path.split('.')[2]}", (path, unit)
    assert found["keys_equal"] and found["max_relative_diff"] < 1e-5
    assert found["round_trip_exact"]


@pytest.mark.parametrize("flags,needle", [(dict(method="tied-lora"), "shared by modules of different blocks"),
                                          (dict(method="sora"), "rebuilds its layers")])
def test_fsdp_refuses_what_it_cannot_shard(tiny_model, flags, needle):
    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.inject import inject
    from prolora_cli.errors import UserError
    from prolora_cli.training.sharding import check_shardable

    cfg = AdapterConfig.create(8, **flags)
    with pytest.raises(UserError, match=needle):
        check_shardable(cfg, inject(tiny_model, cfg))
    check_shardable(AdapterConfig.create(8, unshared=1), {})  # PRoLoRA is fine


def test_train_takes_the_fsdp_path_on_cpu_where_accelerate_cannot_shard(tiny_model_dir, data, tmp_path):
    """Under `accelerate launch` with an FSDP config, accelerate sets ACCELERATE_USE_FSDP for every
    process: train then stores the 4-bit weights in the compute dtype and refuses what FSDP cannot
    shard. On a CPU accelerate runs it unsharded, which still runs that path end to end."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true"}
    def run(out, *adapter):
        return subprocess.run(command(1, tiny_model_dir, data, tmp_path / out, "--batch-size", 2, "--max-steps", 2,
                                      *adapter), capture_output=True, text=True, env=env)

    done = run("run", "--rank", "8", "--unshared", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    refused = run("tied", "--method", "tied-lora")
    assert_one_line_error(refused, "FSDP cannot shard this adapter")
