"""`--loss chunked`: the loss over answer positions only, a chunk at a time, must be transformers' loss
(same value, same adapter gradients) while never holding the logits of the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_one_line_error, run_cli, tiny_llama

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.inject import inject
from prolora_cli.data.chat import IGNORE
from prolora_cli.data.packing import collate_packed
from prolora_cli.training.losses import AnswerLoss


def adapted_model():
    model = tiny_llama(vocab_size=96).train()
    inject(model, AdapterConfig.create(8, unshared=1, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: make both matter
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = IGNORE          # prompts
    labels[1, 30:] = IGNORE          # and a padded row
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batch():
    g = torch.Generator().manual_seed(2)
    rows = []
    for lengths in ((9, 14, 6), (20,)):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for n in lengths:
            ids = torch.randint(3, 96, (n,), generator=g).tolist()
            row["input_ids"] += ids
            row["labels"] += [IGNORE] * 4 + ids[4:]
            row["position_ids"] += list(range(n))
        rows.append(row)
    return collate_packed(pad_id=0)(rows)


def loss_and_grads(model, batch, wrapper=None):
    model.zero_grad()
    count = (batch["labels"][:, 1:] != IGNORE).sum().float() * 2  # as with grad accumulation over 2 batches
    loss = (wrapper or model)(**batch, num_items_in_batch=count).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk", [7, 1024], ids=["many-chunks", "one-chunk"])
def test_chunked_loss_and_gradients_equal_transformers(make_batch, chunk, monkeypatch):
    import prolora_cli.training.losses as losses

    monkeypatch.setattr(losses, "CHUNK", chunk)
    model, batch = adapted_model(), make_batch()
    reference, reference_grads = loss_and_grads(model, batch)
    wrapped = AnswerLoss(model, "chunked")
    loss, grads = loss_and_grads(model, batch, wrapped)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert reference_grads and grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_labels_it_is_the_model_itself():
    model, batch = adapted_model(), padded_batch()
    with torch.no_grad():
        ours = AnswerLoss(model, "chunked")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.inject import inject
    import prolora_cli.training.losses as losses
    losses.CHUNK = 256  # a quarter of the 1,024 trained positions: several chunks, one held at a time
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).train()
    inject(model, AdapterConfig.create(8, unshared=1, dropout=0.0))
    ids = torch.randint(3, 32000, (4, 512))
    labels = ids.clone()
    labels[:, :256] = -100
    def peak_kib():  # this process image's own peak RSS (getrusage's carries over from the forking parent)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    before = peak_kib()
    loss = losses.with_loss(model, sys.argv[1])(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids)).loss
    loss.backward()
    print((peak_kib() - before) // 1024)
""")


def test_chunked_loss_holds_far_less_memory():
    """4 x 512 positions over a 32,000-token vocabulary: transformers' loss holds 250 MiB of logits and as
    much again for their float copy and gradient; chunked holds one chunk's (256 positions here)."""
    # Large blocks through mmap, returned on free: the peak RSS then follows the live tensors instead of
    # what glibc's heap keeps after freeing each chunk's logits.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak_mib(kind):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.split()[-1])

    full, chunked = peak_mib("full"), peak_mib("chunked")
    assert full > 500 and chunked < full / 3, (full, chunked)


def test_training_with_the_chunked_loss_matches_and_plans_less_memory(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--quant", "none", "--device", "cpu", "--data", "examples/chat/train.jsonl",
              "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--optim", "adamw", "--rank", "8"]
    losses = {}
    for kind in ("full", "chunked"):
        result = run_cli("train", *common, "--loss", kind, "--output", tmp_path / kind)
        assert result.returncode == 0, result.stderr
        log = (tmp_path / kind / "train_log.jsonl").read_text().splitlines()
        losses[kind] = [json.loads(line)["loss"] for line in log if '"loss"' in line]
    assert len(losses["full"]) == 3 and losses["chunked"] == pytest.approx(losses["full"], rel=1e-5)
    from safetensors.torch import load_file
    full, chunked = (load_file(tmp_path / k / "adapter.safetensors") for k in ("full", "chunked"))
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    plans = {}
    for kind in ("full", "chunked"):
        result = run_cli("train", *common, "--loss", kind, "--output", tmp_path / "plan", "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        plans[kind] = json.loads(result.stdout)["memory_per_device_gib"]["activations"]
    assert plans["chunked"] <= plans["full"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("flags", [["--kernels", "liger"], ["--loss", "liger"]], ids=["kernels", "loss"])
def test_liger_without_a_gpu_is_one_line(tiny_model_dir, tmp_path, flags):
    result = run_cli("train", "--model", tiny_model_dir, "--quant", "none", "--device", "cpu", "--data",
                     "examples/chat/train.jsonl", "--max-steps", "1", "--output", tmp_path / "run", *flags)
    assert_one_line_error(result, "Liger")
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_an_unknown_loss_is_one_line(tmp_path):
    assert_one_line_error(run_cli("train", "--data", "examples/chat/train.jsonl", "--loss", "fused",
                                  "--output", tmp_path / "run"), "--loss")
