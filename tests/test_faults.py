"""Machine faults, injected for real: two writers on one run folder, a file size limit (EFBIG), a full or
read-only disk (tmpfs mounts, skipped where mounting is not allowed), SIGTERM mid-training, a corrupt
newest checkpoint, and checkpoint files that would run code. Each: the exit code, one line on stderr
without a traceback, no temporary or partial file, the user's earlier files intact, and a rerun or
--resume that succeeds (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from prolora_cli.testing.synthetic import random_adapter

EXAMPLES = Path(__file__).parent.parent / "examples" / "chat"
PROLORA = [sys.executable, "-m", "prolora_cli"]


def train_args(model, out, *extra):
    return ["train", "--model", model, "--quant", "none", "--device", "cpu", "--data", EXAMPLES / "train.jsonl",
            "--rank", "8", "--unshared", "1", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64",
            "--output", out, *extra]


def limited(args, file_size: int) -> subprocess.CompletedProcess:
    """The CLI in a child whose files may not grow past `file_size` bytes: writes fail with EFBIG."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return subprocess.run([*PROLORA, *map(str, args)], capture_output=True, text=True, preexec_fn=limit, timeout=600)


def assert_fault(result, *needles):
    """Exit code 1 (a machine fault), one line naming it, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files anywhere below `folder` (a lock file may stay)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp" in p.name or p.name.endswith(".partial"))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    """A size-limited filesystem (root only); yields a function that mounts one and returns its path."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def merged_inputs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    return Path(tiny_model_dir), random_adapter(tiny_model_dir, folder / "ad", rank=8, unshared=1, scale=0.05)


def test_one_folder_one_writer_and_sigterm_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "a.log"
    with open(log, "w") as stdout:
        first = subprocess.Popen([*PROLORA, *map(str, train_args(tiny_model_dir, out, "--max-steps", "1500",
                                                                 "--save-every", "200"))],
                                 stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while "step 2/" not in log.read_text() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    written = (out / "run_config.json").read_bytes()
    second = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "2"))
    assert_one_line_error(second, f"{out} is being written by prolora pid {first.pid}")
    overwrite = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "2", "--overwrite"))
    assert_one_line_error(overwrite, "is being written by")
    assert (out / "run_config.json").read_bytes() == written  # --overwrite did not touch the holder's folder

    first.send_signal(signal.SIGTERM)  # what SLURM and Kubernetes send before they kill
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    assert "interrupted (SIGTERM): checkpoint saved" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert (tmp_path / "run.lock").read_text() == "" and not leftovers(out)
    resumed = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "1500", "--save-every", "200", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 1500


def test_a_lock_left_by_a_dead_holder_is_taken_over(merged_inputs, tmp_path):
    _, adapter = merged_inputs
    (tmp_path / "m.lock").write_text("prolora pid 999999 on elsewhere since 2026-01-01 00:00:00")
    result = run_cli("merge", "--adapter", adapter, "--output", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    assert "taking over" in result.stdout and "pid 999999" in result.stdout
    assert (tmp_path / "m.lock").read_text() == "" and (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize("command", [
    ["merge", "--output", "{out}/m"],
    ["export", "--format", "gguf", "--output", "{out}/m.gguf"],
    ["export", "--format", "peft", "--output", "{out}/p"],
])
def test_a_file_size_limit_fails_in_one_line_and_keeps_the_earlier_output(merged_inputs, tmp_path, command):
    _, adapter = merged_inputs
    args = ["--adapter", adapter, *(a.format(out=tmp_path) for a in command[1:])]
    target = Path(args[-1])
    first = run_cli(command[0], *args)  # an earlier, complete output
    assert first.returncode == 0, first.stderr
    before = contents(tmp_path)
    result = limited([command[0], *args, "--overwrite"], file_size=20_000)
    assert_fault(result, str(target), "File too large (EFBIG)")
    assert contents(tmp_path) == before and not leftovers(tmp_path)
    again = run_cli(command[0], *args, "--overwrite")
    assert again.returncode == 0, again.stderr


def test_a_checkpoint_that_cannot_be_written_names_the_one_to_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, out, "--save-every", "2", "--save-total-limit", "3")
    assert run_cli(*args, "--max-steps", "6").returncode == 0  # checkpoints at steps 2 and 4 (6 is the end)
    before = contents(out / "checkpoints")
    result = limited([*args, "--max-steps", "10", "--resume"], file_size=40_000)  # optimizer.bin is larger
    assert_fault(result, "checkpoint step-0000006 could not be written", "File too large (EFBIG)",
                 "the newest checkpoint, step-0000004, is intact", "--resume")
    assert contents(out / "checkpoints") == before and not leftovers(out)
    resumed = run_cli(*args, "--max-steps", "10", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006", "step-0000008"]


def test_a_full_disk_during_training_and_a_merge_too_large_for_it(tiny_model_dir, merged_inputs, tmpfs):
    disk = tmpfs("160k")
    args = train_args(tiny_model_dir, disk / "run", "--max-steps", "4", "--save-every", "2")
    result = run_cli(*args)
    assert_fault(result, "No space left on device (ENOSPC)", "is intact: free some space and run the same command "
                 "with --resume")
    assert not leftovers(disk)
    subprocess.run(["mount", "-o", "remount,size=10m", str(disk)], check=True)  # space freed
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0 and (disk / "run" / "adapter.safetensors").is_file(), resumed.stderr
    _, adapter = merged_inputs
    subprocess.run(["mount", "-o", "remount,size=300k", str(disk)], check=True)
    merged = run_cli("merge", "--adapter", adapter, "--output", disk / "m")
    assert_fault(merged, "not enough space for the merged model")
    assert not (disk / "m").exists() and not leftovers(disk)


def test_a_read_only_disk_is_one_line(merged_inputs, tmpfs):
    disk = tmpfs("1m", read_only=True)
    _, adapter = merged_inputs
    assert_fault(run_cli("export", "--adapter", adapter, "--format", "gguf", "--output", disk / "m.gguf"),
                 "Read-only file system (EROFS)")


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (it ends at 6); each test resumes a copy of it."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "6", "--save-every", "2",
                                 "--save-total-limit", "3"))
    assert result.returncode == 0, result.stderr
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run"


def test_resume_skips_a_broken_newest_checkpoint_and_resume_from_picks_one(tiny_model_dir, checkpointed, tmp_path):
    out = copy_run(checkpointed, tmp_path)
    newest = out / "checkpoints" / "step-0000004" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that filled mid-write
    result = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "8", "--resume"))
    assert result.returncode == 0, result.stderr
    assert "skipped checkpoint step-0000004: its adapter.safetensors cannot be read" in result.stdout
    assert "resuming from step-0000002" in result.stdout
    chosen = run_cli(*train_args(tiny_model_dir, tmp_path / "run2", "--max-steps", "8", "--resume-from",
                                 checkpointed / "checkpoints" / "step-0000002"))
    assert chosen.returncode == 0 and "resuming from step-0000002" in chosen.stdout, chosen.stderr
    assert "resume-from" not in (tmp_path / "run2" / "run_config.json").read_text()


class RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("name,refused", [("optimizer.bin", True), ("random_states_0.pkl", True),
                                          ("scheduler.json", False), ("adapter.safetensors", False)])
def test_a_checkpoint_file_that_would_run_code_never_runs(tiny_model_dir, checkpointed, tmp_path, name, refused):
    out = copy_run(checkpointed, tmp_path)
    sentinel = tmp_path / "ran"
    (out / "checkpoints" / "step-0000004" / name).write_bytes(pickle.dumps(RunsCode(sentinel)))
    result = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "8", "--resume"))
    assert not sentinel.exists()
    if refused:  # tampered, not broken: no quiet fallback to an older checkpoint
        assert_one_line_error(result, name, "refused: loading it would run code")
    else:  # unreadable as what it should be: the older checkpoint is used
        assert result.returncode == 0 and "skipped checkpoint step-0000004" in result.stdout, result.stderr
