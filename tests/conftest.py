"""Shared fixtures: tiny random LLaMA models built from a config, so no test downloads anything."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _test_cache() -> None:
    """Tokenized data the tests cache goes to a scratch folder of its own (removed with the tests'
    temporaries), while the embedded model's conversion (540 MB, 15 s) stays shared with the user's
    cache. Every subprocess the tests start inherits it."""
    from prolora_cli.models.loading import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="prolora-test-cache-"))
    (scratch / "models").symlink_to(models)
    os.environ["PROLORA_CACHE"] = str(scratch)
    atexit.register(shutil.rmtree, scratch, True)


_test_cache()


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    # Odd sizes on purpose: hidden not divisible by the sharing ratios, GQA (k/v narrower than q).
    kwargs = dict(vocab_size=96, hidden_size=40, intermediate_size=70, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def attach_adapter(model, folder):
    """Put an adapter folder's layers and tensors on a model; returns its config."""
    from prolora_cli.adapter.files import read_config, read_tensors
    from prolora_cli.adapter.inject import attach

    cfg = read_config(folder)
    attach(model, cfg, read_tensors(folder))
    return cfg


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `prolora` entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "prolora_cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=timeout)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def train_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on the spot on the example chats (a second, no download)."""
    from prolora_cli.testing.synthetic import train_tokenizer as train

    lines = (Path(__file__).parent.parent / "examples" / "chat" / "train.jsonl").read_text().splitlines()
    return train(lines * 2, vocab_size)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real model folder on disk: a tiny random LLaMA and its own tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = train_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=96)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model():
    return tiny_llama()


# Linux counts a child's peak RSS from its parent's RSS at the fork (the old image's peak survives the
# exec), so a command forked from the test process would carry the tests' own memory. A small launcher
# forks it instead and reports the peak the kernel counted for the command alone.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(command: list[str], folder) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command as a child process; return its result and its own peak RSS in bytes, as the kernel
    counted it."""
    out, err, peak = folder / "stdout", folder / "stderr", folder / "peak_rss"
    with open(out, "w") as o, open(err, "w") as e:
        code = subprocess.run([sys.executable, "-c", _LAUNCHER, str(peak), *map(str, command)], stdout=o,
                              stderr=e).returncode
    done = subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())
    return done, int(peak.read_text()) * 1024
