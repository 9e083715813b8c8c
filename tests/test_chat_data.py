"""Chat JSONL reading, rendering and label masking."""

from __future__ import annotations

import json

import pytest
from conftest import train_tokenizer

from prolora_cli.data.chat import IGNORE, encode, render, resolve_chat_format, tokenize_records
from prolora_cli.data.sources import read_jsonl
from prolora_cli.errors import UserError

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "Spell the word \"tiger\" letter by letter."},
    {"role": "assistant", "content": "T-I-G-E-R"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def trained_pieces(tok, enc):
    """Decode each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def test_tulu_trains_on_assistant_content_and_eos_only(tok):
    text, _ = render(CONVO, tok, "tulu")
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 12 + 30?\n<|assistant|>\n12 + 30 = 42.</s>\n"
                    "<|user|>\nSpell the word \"tiger\" letter by letter.\n<|assistant|>\nT-I-G-E-R</s>")
    enc = encode(CONVO, tok, "tulu", 512)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][0] == IGNORE
    assert trained_pieces(tok, enc) == ["12 + 30 = 42.</s>", "T-I-G-E-R</s>"]


def test_template_trains_on_assistant_content_and_end_of_turn(tok):
    enc = encode(CONVO, tok, "template", 512)
    assert trained_pieces(tok, enc) == ["12 + 30 = 42.<|im_end|>", "T-I-G-E-R<|im_end|>"]
    assert tok.decode(enc["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_smollm2_template_masking():
    pytest.importorskip("gguf")
    from prolora_cli.models.loading import load_tokenizer

    real = load_tokenizer(None)
    enc = encode(CONVO, real, resolve_chat_format(real, "auto"), 512)
    assert trained_pieces(real, enc) == ["12 + 30 = 42.<|im_end|>", "T-I-G-E-R<|im_end|>"]
    enc = encode(CONVO, real, "tulu", 512)
    assert trained_pieces(real, enc) == [f"12 + 30 = 42.{real.eos_token}", f"T-I-G-E-R{real.eos_token}"]


def test_truncation_and_drop_of_examples_without_targets(tok, tmp_path):
    long_user = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    records = [{"messages": CONVO, "line": 1}, {"messages": long_user, "line": 2}]
    ds, dropped = tokenize_records(records, tok, "tulu", 60, "x.jsonl")
    assert dropped == 1 and len(ds) == 1
    assert len(ds[0]["input_ids"]) == 60  # truncated, first answer kept


def write(tmp_path, text: str | bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize("line,problem", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"text": "hi"}), "needs \"messages\""),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"content": "hi"}]}), "has no \"role\""),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"prompt": "hi", "completion": 4}), "must both be strings"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path, line, problem):
    path = write(tmp_path, f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(UserError) as e:
        read_jsonl(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and problem in str(e.value)
    records, skipped = read_jsonl(path, skip_bad_lines=True)
    assert skipped == 1 and [r["line"] for r in records] == [1, 4]


def test_non_utf8_empty_and_missing_files(tmp_path):
    path = write(tmp_path, GOOD.encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(UserError, match="line 2: not valid UTF-8"):
        read_jsonl(path)
    with pytest.raises(UserError, match="no examples"):
        read_jsonl(write(tmp_path, "\n\n"))
    with pytest.raises(UserError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_prompt_completion_and_extra_keys(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "p", "completion": "c", "id": 7, "task": "t",
                                       "answers": ["c"], "choices": ["c", "d"]}) + "\n")
    (record,), _ = read_jsonl(path)
    assert record["messages"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert record["answers"] == ["c"] and record["choices"] == ["c", "d"] and record["task"] == "t"


def test_chat_format_resolution(tok):
    assert resolve_chat_format(tok, "auto") == "template"
    bare = train_tokenizer()
    bare.chat_template = None
    assert resolve_chat_format(bare, "auto") == "tulu"
    with pytest.raises(UserError, match="no chat template"):
        resolve_chat_format(bare, "template")
    with pytest.raises(UserError, match="--chat-format"):
        resolve_chat_format(tok, "alpaca")
