"""Chat data as people have it: the same conversations in every supported shape and file type read the
same, as `prolora train --dry-run --json` counts them; bad rows are one line naming file and row."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli

PAIRS = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in [(2, 3), (10, 7), (41, 1), (6, 6), (9, 30)]]


def write_all(folder):
    """The same single-turn conversations as messages JSONL, ShareGPT JSON, Alpaca JSON (empty input),
    prompt/completion CSV, Parquet (messages) and a saved `datasets` folder (Alpaca)."""
    import datasets

    messages = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS]
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in PAIRS]
    files = {"messages.jsonl": folder / "messages.jsonl", "sharegpt.json": folder / "sharegpt.json",
             "alpaca.json": folder / "alpaca.json", "prompt.csv": folder / "prompt.csv",
             "messages.parquet": folder / "messages.parquet", "saved": folder / "saved"}
    # A byte-order mark first, as Windows editors write it.
    files["messages.jsonl"].write_text("\ufeff" + "\n".join(json.dumps(m) for m in messages) + "\n", encoding="utf-8")
    files["sharegpt.json"].write_text(json.dumps(sharegpt))
    files["alpaca.json"].write_text(json.dumps(alpaca))
    datasets.Dataset.from_list([{"prompt": q, "completion": a} for q, a in PAIRS]).to_csv(str(files["prompt.csv"]))
    datasets.Dataset.from_list(messages).to_parquet(str(files["messages.parquet"]))
    datasets.Dataset.from_list(alpaca).save_to_disk(str(files["saved"]))
    return files


def dry_run(model_dir, data, *extra):
    result = run_cli("train", "--model", model_dir, "--data", data, "--dry-run", "--json", "--rank", "8",
                     "--unshared", "1", "--batch-size", "2", "--grad-accum", "1", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_format_reads_the_same_conversations(tiny_model_dir, tmp_path):
    files = write_all(tmp_path)
    counts = {}
    for name, path in files.items():
        r = dry_run(tiny_model_dir, path)
        counts[name] = {k: r[k] for k in ("examples", "dropped", "tokens", "trained_tokens", "trainable_params", "steps")}
        assert r["data_format"] == {"messages.jsonl": "messages", "sharegpt.json": "sharegpt", "alpaca.json": "alpaca",
                                    "prompt.csv": "prompt-completion", "messages.parquet": "messages",
                                    "saved": "alpaca"}[name]
    first = counts["messages.jsonl"]
    assert first["examples"] == 5 and first["dropped"] == 0 and 0 < first["trained_tokens"] < first["tokens"]
    assert first["steps"] == 3  # 5 examples, batch 2
    assert all(c == first for c in counts.values()), counts
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_explicit_format_and_bad_rows_are_one_line(tiny_model_dir, tmp_path):
    files = write_all(tmp_path)
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", files["alpaca.json"], "--dry-run",
                                  "--data-format", "sharegpt"), "alpaca.json, row 0", "not a sharegpt record")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]))
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", bad, "--dry-run"),
                          "bad.json, row 0", "unknown role 'robot'")
    bad.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}, {"instruction": 3, "output": "x"}]))
    skipped = dry_run(tiny_model_dir, bad, "--skip-bad-lines")
    assert (skipped["examples"], skipped["skipped_bad_records"]) == (1, 1)
    before = sorted(p.name for p in files["saved"].iterdir())
    dry_run(tiny_model_dir, files["saved"])
    assert sorted(p.name for p in files["saved"].iterdir()) == before  # nothing written beside the user's data
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", tmp_path / "x.txt", "--dry-run"),
                          "x.txt")
    (tmp_path / "x.txt").write_text("hello")
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", tmp_path / "x.txt", "--dry-run"),
                          "unknown data file type")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", broken, "--dry-run"),
                          "broken.parquet", "cannot read it as PARQUET")


@pytest.mark.parametrize("shape", ["messages", "alpaca"])
def test_dry_run_prints_counts_and_a_highlighted_example(tiny_model_dir, tmp_path, shape):
    files = write_all(tmp_path)
    result = run_cli("train", "--model", tiny_model_dir, "--data", files[f"{shape}.json" if shape == "alpaca" else
                                                                           "messages.jsonl"], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing was trained or written" in result.stdout and "trained tokens" in result.stdout
    assert "41 + 1 = 42." in result.stdout or "2 + 3 = 5." in result.stdout


def test_several_sources_mix_and_a_missing_hub_dataset_is_one_line(tiny_model_dir, tmp_path):
    files = write_all(tmp_path)
    both = dry_run(tiny_model_dir, files["messages.jsonl"], "--data", files["sharegpt.json"])
    assert both["examples"] == 10 and both["tokens"] == 2 * dry_run(tiny_model_dir, files["alpaca.json"])["tokens"]
    assert "5 examples (messages)" in both["notes"][0] and "5 examples (sharegpt)" in both["notes"][1]
    weighted = dry_run(tiny_model_dir, files["messages.jsonl"], "--data", files["prompt.csv"], "--data-weights", "3,1")
    assert weighted["examples"] >= 10  # drawn until every source was seen whole
    config = tmp_path / "mix.yaml"
    config.write_text(f"data: [{files['messages.jsonl']}, {files['saved']}]\nmodel: {tiny_model_dir}\n")
    from_file = run_cli("train", "--config", config, "--dry-run", "--json")
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["examples"] == 10

    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", files["messages.jsonl"], "--data",
                                  files["saved"], "--data-weights", "1", "--dry-run"), "--data-weights needs 2")
    assert_one_line_error(run_cli("train", "--model", tiny_model_dir, "--data", "someorg/not-cached", "--dry-run"),
                          "someorg/not-cached", "no cached hub dataset")
