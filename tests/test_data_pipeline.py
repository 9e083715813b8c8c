"""The training data pipeline at scale: streamed records, tokens cached once, packing and lengths from
arrays. What it yields must be exactly what a plain in-memory reading of the same files yields, and a
cached rerun must train the same adapter bit for bit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from conftest import run_cli, train_tokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.data import chat
from prolora_cli.data.chat import IGNORE, encode
from prolora_cli.data.formats import parse_record
from prolora_cli.data.sources import read_source
from prolora_cli.errors import UserError
from prolora_cli.training.args import TrainArgs
from prolora_cli.training.data import make_loaders, tokenized_source, training_examples, training_rows

EXAMPLES = Path(__file__).parent.parent / "examples" / "chat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    lines = EXAMPLES.joinpath("train.jsonl").read_text().splitlines()
    (folder / "a.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(lines[200:230]) + "\n")
    return folder


def args_for(files: Path, tmp_path: Path, **overrides) -> TrainArgs:
    base = dict(data=[files / "a.jsonl"], output=tmp_path / "run", adapter=AdapterConfig.create(8, unshared=1),
                max_seq_len=64, batch_size=4, seed=3, cache_dir=tmp_path / "cache")
    return TrainArgs(**{**base, **overrides})


def reference_examples(path: Path, tokenizer, args: TrainArgs) -> list[dict]:
    """The plain way: every line parsed into a list, encoded, the untrained ones dropped."""
    records = [parse_record(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    encoded = [encode(r["messages"], tokenizer, "template", args.max_seq_len) for r in records]
    return [e for e in encoded if any(label != IGNORE for label in e["labels"])]


def reference_batches(tokenizer, args: TrainArgs) -> list[dict]:
    parts = [datasets.Dataset.from_list(reference_examples(Path(p), tokenizer, args)) for p in args.data]
    if len(parts) == 1:
        examples = parts[0].to_list()
    else:
        weights = [float(w) for w in args.data_weights.split(",")]
        examples = datasets.interleave_datasets(parts, probabilities=[w / sum(weights) for w in weights],
                                                seed=args.seed, stopping_strategy="all_exhausted").to_list()
    rows = pack_in_memory(examples, args.max_seq_len) if args.packing else examples
    order = LengthGroupedSampler(args.batch_size, lengths=[len(r["input_ids"]) for r in rows],
                                 generator=torch.Generator().manual_seed(args.seed))
    order = list(order)
    return [[rows[i] for i in order[k:k + args.batch_size]] for k in range(0, len(order), args.batch_size)]


def pack_in_memory(examples: list[dict], max_len: int) -> list[dict]:
    rows, row = [], {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        if row["input_ids"] and len(row["input_ids"]) + len(e["input_ids"]) > max_len:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE] + e["labels"][1:]
        row["position_ids"] += list(range(len(e["input_ids"])))
    return [*rows, row]


@pytest.mark.parametrize("case", ["plain", "packing", "mixed"])
def test_the_pipeline_yields_what_an_in_memory_reading_yields(files, tmp_path, case):
    tokenizer = train_tokenizer()
    extra = {"plain": {}, "packing": {"packing": True},
             "mixed": {"data": [files / "a.jsonl", files / "b.jsonl"], "data_weights": "0.7,0.3"}}[case]
    args = args_for(files, tmp_path, **extra)
    examples, _ = training_examples(tokenizer, "template", args, lambda _m: None)
    loader, _ = make_loaders(training_rows(examples, args), None, tokenizer.pad_token_id, args, processes=1)
    loader.sampler.set_epoch(0)
    want = reference_batches(tokenizer, args)
    got = list(loader)
    assert len(got) == len(want)
    for batch, rows in zip(got, want):
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
            assert batch["labels"][i, :n].tolist() == row["labels"]
            if case == "packing":
                assert batch["position_ids"][i, :n].tolist() == row["position_ids"]


@pytest.mark.parametrize("extra", [[], ["--packing"], ["--data-weights", "0.7,0.3"]])
def test_a_cached_rerun_trains_the_same_adapter_bit_for_bit(files, tiny_model_dir, tmp_path, extra):
    data = ["--data", files / "a.jsonl"] + (["--data", files / "b.jsonl"] if "--data-weights" in extra else [])
    common = ["train", "--model", tiny_model_dir, "--quant", "none", "--device", "cpu", *data, "--max-steps", "3",
              "--batch-size", "4", "--max-seq-len", "64", "--cache-dir", tmp_path / "cache", *extra]
    first = run_cli(*common, "--output", tmp_path / "a")
    second = run_cli(*common, "--output", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "tokenized data cached in" in first.stdout and "tokenized data reused from the cache" in second.stdout
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()


def test_the_cache_is_reused_only_for_the_same_data_tokenizer_and_options(files, tmp_path, monkeypatch):
    tokenizer = train_tokenizer()
    source = tmp_path / "a.jsonl"
    source.write_text((files / "a.jsonl").read_text())
    args = args_for(files, tmp_path, data=[source])
    first, meta = tokenized_source(source, tokenizer, "template", args, lambda _m: None)
    assert not meta["reused"]

    def no_tokenizing(*_args, **_kwargs):
        raise AssertionError("the tokenizer ran on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(chat, "encode", no_tokenizing)
        again, meta = tokenized_source(source, tokenizer, "template", args, lambda _m: None)
    assert meta["reused"] and again[:] == first[:]

    changed = {"max_seq_len": replace(args, max_seq_len=48), "skip_bad_lines": replace(args, skip_bad_lines=True),
               "system_prompt": replace(args, system_prompt="Be brief.")}
    for name, other in changed.items():
        assert not tokenized_source(source, tokenizer, "template", other, lambda _m: None)[1]["reused"], name
    assert not tokenized_source(source, train_tokenizer(vocab_size=300), "template", args,
                                lambda _m: None)[1]["reused"]
    assert not tokenized_source(source, tokenizer, "tulu", args, lambda _m: None)[1]["reused"]
    source.write_text("\n".join(source.read_text().splitlines()[:50]) + "\n")  # the file changed
    shorter, meta = tokenized_source(source, tokenizer, "template", args, lambda _m: None)
    assert not meta["reused"] and len(shorter) < len(first)
    expected = shorter[:]
    del shorter  # it maps the file damaged below

    data = Path(meta["entry"]) / "data.arrow"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a damaged entry
    said = []
    rebuilt, meta = tokenized_source(source, tokenizer, "template", args, said.append)
    assert not meta["reused"] and rebuilt[:] == expected and any("rebuilding" in s for s in said)


def test_a_bad_line_deep_in_a_large_file_is_still_named(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]})
    lines = [good] * 30_000
    lines[24_999] = '{"messages": [}'
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"big.jsonl, line 25000: malformed JSON"):
        read_source(path, False, "auto", "train", tmp_path / "scratch")
    records, skipped, shapes = read_source(path, True, "auto", "train", tmp_path / "scratch2")
    assert (len(records), skipped, shapes["messages"]) == (29_999, 1, 29_999)
    assert records[24_999]["line"] == 25_001
