"""`prolora merge` streams: exact tensors, real shards, bounded memory, clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error, attach_adapter, peak_rss, train_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prolora_cli.adapter.inject import adapter_layers
from prolora_cli.errors import VerificationFailed
from prolora_cli.merge.stream import merge_adapter
from prolora_cli.models.safetensors_files import INDEX_NAME
from prolora_cli.testing.synthetic import random_adapter, write_random_llama

TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny LLaMA written by the 7B-shaped helper, in fp32 shards of at most 30 KB."""
    tok = train_tokenizer()
    return write_random_llama(tmp_path_factory.mktemp("sharded"), 2, dtype="fp32", tokenizer=tok,
                              max_shard_size="30KB", vocab_size=len(tok), **TINY)


def merged_state(folder):
    index = json.loads((folder / INDEX_NAME).read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / shard))
    assert set(state) == set(index["weight_map"])
    return state


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_streamed_merge_is_w0_plus_dw_bit_for_bit(sharded_dir, tmp_path, dtype):
    adapter = random_adapter(sharded_dir, tmp_path / "ad", rank=8, unshared=2, share=3)
    result = merge_adapter(adapter, tmp_path / "m", dtype=dtype, max_shard_size="30KB")
    assert result["shards"] > 2 and result["tensors_adapted"] == 14

    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 2  # the helper shards too

    base = AutoModelForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    attach_adapter(base, adapter)
    layers = {f"{path}.weight": layer for path, layer in adapter_layers(base).items()}
    state = merged_state(tmp_path / "m")
    assert set(state) == set(weights)
    for key, w0 in weights.items():
        if key in layers:
            expected = (w0.float() + layers[key].delta_weight()).to(DTYPES[dtype])
        else:
            expected = w0.to(DTYPES[dtype])
        assert state[key].dtype == DTYPES[dtype]
        assert torch.equal(state[key], expected), key
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]


def test_merge_keeps_tied_embeddings_tied(tmp_path):
    tok = train_tokenizer()
    base = write_random_llama(tmp_path / "tied", 2, dtype="bf16", tokenizer=tok, vocab_size=len(tok),
                              tie_word_embeddings=True, **TINY)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")  # as transformers stores it
    adapter = random_adapter(base, tmp_path / "ad", rank=4, unshared=1)
    result = merge_adapter(adapter, tmp_path / "m")
    assert result["dtype"] == "bf16" and result["relative_diff"] <= 6e-2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")


def test_verify_modes_write_the_same_files(sharded_dir, tmp_path):
    adapter = random_adapter(sharded_dir, tmp_path / "ad", rank=8, unshared=1)
    outputs = {}
    for verify in ("stream", "full", "none"):
        result = merge_adapter(adapter, tmp_path / verify, verify=verify, base="nf4")
        outputs[verify] = {p.name: p.read_bytes() for p in (tmp_path / verify).iterdir()}
        if verify != "none":
            assert result["relative_diff"] <= 1e-4, result
    assert outputs["stream"] == outputs["full"] == outputs["none"]


def test_a_wrong_merged_tensor_fails_the_check_and_writes_nothing(sharded_dir, tmp_path, monkeypatch):
    """The value check recomputes W0 + dW itself: a writer that is off by one ulp somewhere is caught."""
    import prolora_cli.merge.stream as writer

    adapter = random_adapter(sharded_dir, tmp_path / "ad", rank=8, unshared=1)
    honest = writer.merged_weight

    def off_by_a_bit(weight, delta, sign=1, dtype=None):
        out = honest(weight, delta, sign, dtype)
        out.view(-1)[7] = torch.nextafter(out.view(-1)[7], torch.tensor(float("inf"), dtype=out.dtype))
        return out

    monkeypatch.setattr(writer, "merged_weight", off_by_a_bit)  # the writer's, not the check's
    with pytest.raises(VerificationFailed, match="differs from the base"):
        merge_adapter(adapter, tmp_path / "m", verify="stream")
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def run_merge(*args):
    return subprocess.run([sys.executable, "-m", "prolora_cli", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_bad_checkpoints_fail_with_one_line_and_write_nothing(sharded_dir, tmp_path):
    import shutil

    adapter = random_adapter(sharded_dir, tmp_path / "ad", rank=8, unshared=1)
    shards = sorted(sharded_dir.glob("model-*.safetensors"))

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(sharded_dir, folder)
        change(folder)
        return folder

    truncated = broken("truncated", lambda f: os.truncate(f / shards[1].name, shards[1].stat().st_size - 100))
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--model", truncated), "truncated")

    def drop_from_index(folder):
        index = json.loads((folder / INDEX_NAME).read_text())
        del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        (folder / INDEX_NAME).write_text(json.dumps(index))

    unlisted = broken("unlisted", drop_from_index)
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--model", unlisted),
                          "model.layers.1.mlp.up_proj.weight")
    missing = broken("missing", lambda f: (f / shards[0].name).unlink())
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--model", missing),
                          shards[0].name, "missing")
    garbage = broken("garbage", lambda f: (f / shards[0].name).write_bytes(b"\xff" * 64))
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--model", garbage), shards[0].name)

    other = write_random_llama(tmp_path / "other", 2, dtype="fp32", vocab_size=320,
                               **{**TINY, "intermediate_size": 80})
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--model", other),
                          "adapter does not match")
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--max-shard-size", "lots"),
                          "--max-shard-size")
    assert_one_line_error(run_merge("--adapter", adapter, "-o", tmp_path / "o", "--verify", "maybe"), "--verify")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_merging_a_7b_shaped_model_stays_below_its_size_in_memory(tmp_path):
    """LLaMA-2-7B's widths with 4 blocks: 2.1 GB of bf16. Peak RSS of `prolora merge` (a child
    process, measured by the kernel) stays below the checkpoint's size, verification included."""
    base = write_random_llama(tmp_path / "7b-shaped", 4, dtype="bf16", tokenizer=train_tokenizer())
    adapter = random_adapter(base, tmp_path / "ad", rank=8, unshared=1, scale=0.01)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    done, peak = peak_rss([sys.executable, "-m", "prolora_cli", "merge", "--adapter", str(adapter),
                           "-o", str(tmp_path / "m"), "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dtype"] == "bf16" and result["tensors_adapted"] == 4 * 7
    assert result["relative_diff"] <= result["tolerance"]
    assert peak < size, (peak, size)


@pytest.mark.smollm
def test_merge_into_the_embedded_gguf_model(tmp_path):
    """The default base: a GGUF (Q4_1) converted once to an fp32 cache that stores the tied head, not
    the embedding. --dtype auto says where its dtype comes from."""
    from prolora_cli.models.loading import embedded_gguf, gguf_as_folder

    adapter = random_adapter(gguf_as_folder(embedded_gguf()), tmp_path / "ad", rank=8, unshared=1, scale=0.01)
    result = merge_adapter(adapter, tmp_path / "m", model="smollm2-135m")
    assert result["dtype"] == "fp32" and "GGUF" in result["dtype_from"]
    assert result["tensors_adapted"] == 30 * 7 and result["relative_diff"] <= 1e-4
