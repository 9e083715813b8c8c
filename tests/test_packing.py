"""--packing: a packed row's loss equals the same examples' losses unpacked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_llama

from prolora_cli.data.chat import IGNORE
from prolora_cli.data.packing import PackedRows, collate_packed, seen_tokens


def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 11, 5):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        labels = [IGNORE] * 3 + ids[3:]  # the first tokens are the prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_losses(logits, labels):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")


def test_packed_loss_equals_unpacked_and_needs_the_mask():
    from datasets import Dataset

    model = tiny_llama(attn_implementation="sdpa")
    exs = examples()
    ds = PackedRows(Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in exs]), max_len=64)
    assert len(ds) == 1 and ds[0]["position_ids"][:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    batch = collate_packed(pad_id=0)([ds[0], {k: v[:5] for k, v in ds[0].items()}])  # a padded second row
    assert seen_tokens(batch) == 23 + 5
    with torch.no_grad():
        packed = token_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=batch["position_ids"]).logits, batch["labels"])[0]
        unpacked = torch.cat([torch.cat([token_losses(model(input_ids=torch.tensor([e["input_ids"]])).logits,
                                                      torch.tensor([e["labels"]]))[0], torch.zeros(1)])
                              for e in exs])[:-1]
        positions_only = token_losses(model(input_ids=batch["input_ids"][:1],
                                            position_ids=batch["position_ids"][:1]).logits, batch["labels"][:1])[0]
    torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-5)
    assert (positions_only - unpacked).abs().max() > 1e-2  # without the mask, examples see each other
    assert not torch.isnan(packed).any()


def test_train_with_packing_on_the_nf4_base(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = (Path(__file__).parent.parent / "examples" / "chat" / "train.jsonl").read_text().splitlines()[:40]
    data.write_text("\n".join(lines) + "\n")
    common = ["train", "--model", tiny_model_dir, "--data", data, "--device", "cpu", "--rank", "8", "--unshared", "1",
              "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "256", "--lr", "1e-2", "--dropout", "0"]
    packed = run_cli(*common, "--packing", "--max-steps", "3", "--output", tmp_path / "packed")
    assert packed.returncode == 0, packed.stderr
    log = [json.loads(line) for line in (tmp_path / "packed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["trained_tokens_per_s"] > 0 for r in log)  # no NaN
