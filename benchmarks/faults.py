"""The fault matrix: what survives a bad day on the machine, tried for real on the tiny model.

Each row injects one fault into a real `prolora` process and checks what is left: the exit code, one
line on stderr without a traceback, no partial file under a final name, the user's earlier files intact
(byte for byte), no temporaries once the next command on that output has run, and a rerun or --resume
that succeeds. SIGKILL rows kill at several random moments of the command's run (seeded).

    python benchmarks/faults.py                      # the table in docs/reliability.md (about 10 minutes)
    python benchmarks/faults.py --kills 2            # fewer kill moments per row
    python benchmarks/faults.py --output runs/faults.json

Rows that need a tmpfs mount (a full disk, a read-only disk) are skipped where mounting is not allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
PROLORA = [sys.executable, "-m", "prolora_cli"]
DATA = ROOT / "examples" / "chat" / "train.jsonl"


def run(args, limit: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    def preexec():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([*PROLORA, *map(str, args)], capture_output=True, text=True, preexec_fn=preexec,
                          timeout=timeout)


def killed_at(args, seconds: float, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([*PROLORA, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def one_line(result) -> bool:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in result.stderr


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name]


def train_args(model, out, *extra):
    return ["train", "--model", model, "--quant", "none", "--device", "cpu", "--data", DATA, "--rank", "8",
            "--unshared", "1", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64", "--output", out, *extra]


class Matrix:
    def __init__(self, work: Path, kills: int, seed: int):
        self.work, self.kills, self.rng, self.rows = work, kills, random.Random(seed), []

    def row(self, fault: str, command: str, happened: str, survived: bool) -> None:
        happened = happened.replace(str(self.work), "WORK")  # the scratch folder's name says nothing
        self.rows.append({"fault": fault, "command": command, "what happened": happened, "survived": survived})
        print(f"{'ok ' if survived else 'LOST'}  {fault:55s} {command:10s} {happened}", flush=True)

    def timed(self, args) -> float:
        start = time.perf_counter()
        result = run(args)
        assert result.returncode == 0, result.stderr
        return time.perf_counter() - start

    def sigkill_rows(self, name: str, args, output: Path, rerun) -> None:
        """SIGKILL at random moments of a command that replaces an earlier output: that output stays
        whole (or is put back), and the next run cleans up and succeeds."""
        duration = self.timed(args)
        before = snapshot(output.parent)
        survived, moments = True, []
        for _ in range(self.kills):
            moment = self.rng.uniform(0.3, 1.0) * duration
            moments.append(f"{moment:.1f}s")
            killed_at([*args, "--overwrite"], moment)
            after = run(rerun())  # the next command on that output
            survived &= after.returncode == 0 and not leftovers(output.parent)
            if name != "train":
                survived &= snapshot(output.parent).keys() >= before.keys()
        self.row(f"SIGKILL at {self.kills} moments ({', '.join(moments)})", name,
                 "earlier output whole; the next run cleaned up and succeeded" if survived else "see output", survived)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=6, help="kill moments per SIGKILL row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    from conftest import tiny_llama, train_tokenizer

    from prolora_cli.testing.synthetic import random_adapter

    work = Path(tempfile.mkdtemp(prefix="prolora-faults-"))
    try:
        tok = train_tokenizer()
        model = work / "tiny"
        tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=96).save_pretrained(model)
        tok.save_pretrained(model)
        adapter = random_adapter(model, work / "ad", rank=8, unshared=1, scale=0.05)
        matrix = Matrix(work, args.kills, args.seed)
        run_matrix(matrix, model, adapter, work)
        table = render(matrix.rows)
        print("\n" + table)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(matrix.rows, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_matrix(m: Matrix, model: Path, adapter: Path, work: Path) -> None:
    merge = ["merge", "--adapter", adapter, "--output", work / "merge" / "m"]
    m.sigkill_rows("merge", merge, work / "merge" / "m", lambda: [*merge, "--overwrite"])
    gguf = ["export", "--adapter", adapter, "--format", "gguf", "--output", work / "gguf" / "m.gguf"]
    m.sigkill_rows("export", gguf, work / "gguf" / "m.gguf", lambda: [*gguf, "--overwrite"])
    evals = ["eval", "--model", model, "--quant", "none", "--adapter", adapter, "--data", DATA, "--limit", "64",
             "--metrics", "loss", "--output", work / "eval" / "r.json"]
    (work / "eval").mkdir()
    m.sigkill_rows("eval", evals, work / "eval" / "r.json", lambda: evals)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(48)))
    generate = ["generate", "--adapter", adapter, "--model", model, "--quant", "none", "--data", prompts,
                "--batch-size", "1", "--max-new-tokens", "8", "--output", work / "gen" / "out.jsonl"]
    (work / "gen").mkdir()
    partial = work / "gen" / "out.jsonl.partial"
    m.sigkill_rows("generate", generate, work / "gen" / "out.jsonl",
                   lambda: [*generate, "--resume" if partial.exists() else "--overwrite"])
    out = work / "train" / "run"
    training = train_args(model, out, "--max-steps", "300", "--save-every", "1")
    m.sigkill_rows("train", training, out,
                   lambda: [*training, "--resume" if list((out / "checkpoints").glob("step-*")) else "--overwrite"])
    limited_rows(m, model, adapter, work)
    signal_rows(m, model, work)
    checkpoint_rows(m, model, work)
    disk_rows(m, model, adapter, work)


def limited_rows(m: Matrix, model: Path, adapter: Path, work: Path) -> None:
    """A file size limit (EFBIG): merge, export and a checkpoint write fail in one line, nothing lost."""
    for name, args in (("merge", ["merge", "--adapter", adapter, "--output", work / "lim" / "m"]),
                       ("export", ["export", "--adapter", adapter, "--format", "gguf", "--output", work / "lim" / "m.gguf"])):
        assert run(args).returncode == 0
        before = snapshot(work / "lim")
        result = run([*args, "--overwrite"], limit=20_000)
        ok = result.returncode == 1 and one_line(result) and snapshot(work / "lim") == before and not leftovers(work / "lim")
        m.row("file size limit (RLIMIT_FSIZE: EFBIG)", name, f"exit {result.returncode}: {result.stderr.strip()[:90]}", ok)
    out = work / "lim" / "run"
    assert run(train_args(model, out, "--max-steps", "6", "--save-every", "2")).returncode == 0
    result = run([*train_args(model, out, "--max-steps", "10", "--save-every", "2"), "--resume"], limit=40_000)
    again = run([*train_args(model, out, "--max-steps", "10", "--save-every", "2"), "--resume"])
    ok = result.returncode == 1 and one_line(result) and "--resume" in result.stderr and again.returncode == 0
    m.row("file size limit during a checkpoint write", "train", f"exit {result.returncode}, names step-0000004; "
          f"--resume then exit {again.returncode}", ok)


def signal_rows(m: Matrix, model: Path, work: Path) -> None:
    out = work / "sig" / "run"
    args = train_args(model, out, "--max-steps", "2000", "--save-every", "500")
    first = subprocess.Popen([*PROLORA, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "train_log.jsonl").is_file() or not (out / "train_log.jsonl").read_text().strip():
        time.sleep(0.05)
    second = run(train_args(model, out, "--max-steps", "2", "--overwrite"))
    m.row("a second writer on the same run folder (--overwrite)", "train",
          f"exit {second.returncode}: {second.stderr.strip()[:80]}", second.returncode == 2 and one_line(second))
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    resumed = run([*args, "--resume"])
    m.row("SIGTERM (a scheduler's stop)", "train", f"exit {first.returncode}, checkpoint saved; --resume exit "
          f"{resumed.returncode}", first.returncode == 143 and "--resume" in err and resumed.returncode == 0)


class RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def checkpoint_rows(m: Matrix, model: Path, work: Path) -> None:
    out = work / "ck" / "run"
    args = train_args(model, out, "--max-steps", "6", "--save-every", "2")
    assert run(args).returncode == 0
    saved = work / "ck" / "saved"
    shutil.copytree(out, saved)
    newest = out / "checkpoints" / "step-0000004"
    adapter = newest / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    result = run([*args, "--max-steps", "8", "--resume"])
    m.row("newest checkpoint truncated", "train --resume", "skipped it, resumed from step-0000002",
          result.returncode == 0 and "skipped checkpoint step-0000004" in result.stdout)
    sentinel = work / "ran"
    for name in ("optimizer.bin", "random_states_0.pkl"):
        shutil.rmtree(out)
        shutil.copytree(saved, out)
        (newest / name).write_bytes(pickle.dumps(RunsCode(sentinel)))
        result = run([*args, "--max-steps", "8", "--resume"])
        m.row(f"a pickle that would run code in {name}", "train --resume",
              f"exit {result.returncode}: refused, naming {name}; nothing ran",
              result.returncode == 2 and one_line(result) and not sentinel.exists())


def disk_rows(m: Matrix, model: Path, adapter: Path, work: Path) -> None:
    disk = work / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True).returncode:
        m.rows.append({"fault": "full or read-only disk", "command": "-", "what happened": "skipped: cannot mount",
                       "survived": None})
        return
    try:
        args = train_args(model, disk / "run", "--max-steps", "4", "--save-every", "2")
        result = run(args)
        subprocess.run(["mount", "-o", "remount,size=10m", str(disk)], check=True)
        resumed = run([*args, "--resume"])
        m.row("disk full (tmpfs of 160 KB)", "train", f"exit {result.returncode}: ENOSPC named; --resume after "
              f"freeing space exit {resumed.returncode}", result.returncode == 1 and one_line(result)
              and resumed.returncode == 0 and not leftovers(disk))
        subprocess.run(["mount", "-o", "remount,size=200k", str(disk)], check=True)
        result = run(["merge", "--adapter", adapter, "--output", disk / "m"])
        m.row("disk too small for the output", "merge", f"exit {result.returncode}: refused before writing",
              result.returncode == 1 and one_line(result) and not (disk / "m").exists())
        subprocess.run(["mount", "-o", "remount,size=10m,ro", str(disk)], check=True)
        result = run(["export", "--adapter", adapter, "--format", "gguf", "--output", disk / "m.gguf"])
        m.row("read-only disk", "export", f"exit {result.returncode}: "
              f"{'names the lock it could not create (EROFS)' if 'EROFS' in result.stderr else result.stderr}",
              result.returncode == 1 and one_line(result) and "EROFS" in result.stderr)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def render(rows: list[dict]) -> str:
    lines = ["| fault | command | what happened | survived |", "|---|---|---|---|"]
    for r in rows:
        mark = "skipped" if r["survived"] is None else "yes" if r["survived"] else "**no**"
        lines.append(f"| {r['fault']} | `{r['command']}` | {r['what happened']} | {mark} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
