"""`prolora chat` and `prolora generate`: prompts as training rendered them, many adapters in one batch,
greedy answers equal across chat, generate and the merged model, bad input, and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli, tiny_llama, train_tokenizer

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import adapters_disabled, attach, remove_adapters
from prolora_cli.adapter.peft_format import export_peft
from prolora_cli.data.chat import IGNORE, encode, with_system
from prolora_cli.inference.chat import ChatArgs, ChatSession
from prolora_cli.inference.generation import generate_batches
from prolora_cli.inference.mixed import ResidentAdapter, attach_adapters, use_rows
from prolora_cli.testing.synthetic import random_adapter

CONVERSATION = [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": "apple apple apple."},
                {"role": "user", "content": "And river?"}, {"role": "assistant", "content": "river river river."}]
WORDS = ("apple", "river", "tiger", "lemon")


def say_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n"
                            for w in WORDS * 4))
    return path


@pytest.mark.parametrize("chat_format", ["tulu", "template"])
@pytest.mark.parametrize("system", [None, "You repeat words."])
def test_chat_prompt_is_the_training_render_minus_the_last_answer(chat_format, system):
    tokenizer = train_tokenizer()
    training = encode(with_system(CONVERSATION, system), tokenizer, chat_format, 10_000)
    labels = training["labels"]
    # The last answer starts where the last run of trained tokens does.
    start = max(i for i in range(len(labels)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE))
    session = ChatSession(None, tokenizer, chat_format, system, ChatArgs(), has_adapter=False,
                          turns=CONVERSATION[:2])
    assert session.prompt(CONVERSATION[2]["content"]) == training["input_ids"][:start]


@pytest.fixture(scope="module")
def three_adapters(tmp_path_factory):
    """A tiny model folder and three random adapters of different methods, ranks and targets."""
    folder = tmp_path_factory.mktemp("mixed")
    tiny_llama().save_pretrained(folder / "base")
    specs = {"pro": dict(rank=8, unshared=1), "low": dict(rank=4, method="lora", targets="q,v"),
             "ve": dict(rank=16, method="vera")}
    return folder / "base", {name: random_adapter(folder / "base", folder / name, seed=i + 1, **flags)
                             for i, (name, flags) in enumerate(specs.items())}


def resident(adapters: dict) -> list[ResidentAdapter]:
    return [ResidentAdapter.open(name, path, read_config(path)) for name, path in adapters.items()]


ROWS = ["pro", "ve", None, "low", "pro", None]


def test_a_mixed_batch_gives_each_row_what_its_adapter_gives_alone(three_adapters):
    base_dir, adapters = three_adapters
    model = tiny_llama()
    ids = torch.randint(3, 96, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
    alone = {}
    for name, path in adapters.items():
        attach(model, read_config(path), read_tensors(path))
        with torch.no_grad():
            alone[name] = model(ids).logits
        remove_adapters(model)
    with torch.no_grad():
        alone[None] = model(ids).logits
    attach_adapters(model, resident(adapters))
    use_rows(model, ROWS)
    with torch.no_grad():
        mixed = model(ids).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-5)

    prompts = [ids[i, : 4 + i].tolist() for i in range(len(ROWS))]
    tokenizer = FakeTokenizer()
    mixed_tokens = greedy(model, tokenizer, prompts, ROWS)
    for name in set(ROWS):
        own = [i for i, n in enumerate(ROWS) if n == name]
        assert greedy(model, tokenizer, [prompts[i] for i in own], [name] * len(own)) == [mixed_tokens[i] for i in own]


class FakeTokenizer:
    """Just what generation needs from a tokenizer, for a model with no vocabulary of its own."""
    pad_token_id, eos_token_id = 0, 2

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def greedy(model, tokenizer, prompts, names) -> list[str]:
    out = [None] * len(prompts)
    for chunk, completions in generate_batches(model, tokenizer, prompts, 6, batch_size=len(prompts),
                                               prepare=lambda c: use_rows(model, [names[i] for i in c])):
        for i, (completion,) in zip(chunk, completions):
            out[i] = completion.text
    return out


def test_peft_mixed_batches_agree_with_ours(three_adapters, tmp_path):
    """PEFT, independently: its mixed-adapter generate on our PEFT exports of the LoRA-shaped adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapters = three_adapters
    pair = {name: adapters[name] for name in ("pro", "low")}
    for name, path in pair.items():
        export_peft(path, tmp_path / name)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pro",
                                           adapter_name="pro")
    peft_model.load_adapter(tmp_path / "low", adapter_name="low")
    peft_model.eval()
    rows = ["pro", "low", None, "low"]
    ids = torch.randint(3, 96, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                        do_sample=False, pad_token_id=0, eos_token_id=None,
                                        adapter_names=[n or "__base__" for n in rows])
    model = tiny_llama()
    attach_adapters(model, resident(pair))
    use_rows(model, rows)
    with torch.no_grad():
        ours = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, reference)


def test_base_turns_every_adapter_layer_off(three_adapters):
    base_dir, adapters = three_adapters
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        base = model(ids).logits
        attach(model, read_config(adapters["pro"]), read_tensors(adapters["pro"]))
        adapted = model(ids).logits
        with adapters_disabled(model):
            off = model(ids).logits
        again = model(ids).logits
    assert torch.equal(off, base) and torch.equal(again, adapted) and not torch.equal(adapted, base)
    session = ChatSession(model, None, "tulu", None, ChatArgs(), has_adapter=True)
    assert "base model alone" in session.command("/base") and session.base_only
    assert "adapter" in session.command("/base") and not session.base_only


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A PRoLoRA adapter trained on the tiny model's NF4 base, as `prolora train` does by default."""
    folder = tmp_path_factory.mktemp("trained")
    data = say_data(folder / "say.jsonl")
    result = run_cli("train", "--model", tiny_model_dir, "--data", data, "--device", "cpu", "--rank", "8",
                     "--unshared", "1", "--lr", "2e-2", "--max-steps", "8", "--batch-size", "4", "--grad-accum", "1",
                     "--warmup-ratio", "0", "--dropout", "0", "--system-prompt", "Repeat the word.",
                     "--output", folder / "run")
    assert result.returncode == 0, result.stderr
    return folder / "run", data


def test_the_adapter_records_how_it_was_prompted(trained):
    cfg = json.loads((trained[0] / "adapter_config.json").read_text())
    assert (cfg["chat_format"], cfg["system_prompt"]) == ("template", "Repeat the word.")


def test_chat_generate_and_the_merged_model_answer_alike(trained, tmp_path):
    run, data = trained
    prompts = [f"Say {w}." for w in WORDS]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    sampling = ["--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]

    chatted = []
    for prompt in prompts:  # one conversation each, as generate's rows are
        result = subprocess.run([sys.executable, "-m", "prolora_cli", "chat", "--adapter", run, *sampling],
                                input=prompt + "\n", capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("\n\n")
        chatted.append(result.stdout[:-2])

    generated = run_cli("generate", "--adapter", run, "--data", prompt_file, "--output", tmp_path / "a.jsonl", *sampling)
    assert generated.returncode == 0, generated.stderr
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == chatted
    assert all(r["adapter"] == "run" and r["completion_tokens"] >= 1 for r in rows)

    assert run_cli("merge", "--adapter", run, "--base", "nf4", "--output", tmp_path / "merged").returncode == 0
    merged = run_cli("generate", "--model", tmp_path / "merged", "--quant", "none", "--data", prompt_file,
                     "--output", tmp_path / "m.jsonl", "--system-prompt", "Repeat the word.", *sampling)
    assert merged.returncode == 0, merged.stderr
    assert [json.loads(line)["completion"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == chatted


def test_prompt_rows_keep_their_reference_and_name_their_adapter(tmp_path):
    from prolora_cli.inference.requests import read_requests

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hi"}, {"prompt": "Hi", "completion": "Hello"}, {"instruction": "Sum 1 and 2"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "adapter": "x"},
        {"messages": [{"role": "user", "content": "c"}], "adapter": None}]) + "\n")
    requests, skipped = read_requests(path, ["x", "y"], "y", "auto", False)
    assert [(r.reference, r.adapter, r.messages[-1]["content"]) for r in requests] == [
        (None, "y", "Hi"), ("Hello", "y", "Hi"), (None, "y", "Sum 1 and 2"), ("b", "x", "a"), (None, None, "c")]


@pytest.mark.parametrize("case,needles", [
    ("same-name", ["two adapters are named 'a'"]),
    ("other-base", ["adapters for different base models"]),
    ("unknown-adapter", ["line 2", "adapter 'zzz' is not one of"]),
    ("no-default", ["line 1", "--default-adapter"]),
    ("malformed", ["line 2", "malformed JSON"]),
    ("nothing-to-answer", ["line 1", "nothing to answer"]),
])
def test_bad_input_is_one_line_and_writes_nothing(three_adapters, tmp_path, case, needles):
    base_dir, adapters = three_adapters
    rows = [{"prompt": "Hi"}, {"prompt": "Ho", "adapter": "zzz" if case == "unknown-adapter" else "a"}]
    if case == "nothing-to-answer":
        rows[0] = {"messages": [{"role": "system", "content": "Be brief."}]}
    lines = [json.dumps(r) for r in rows]
    if case == "malformed":
        lines[1] = '{"prompt": "Ho"'
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(lines) + "\n")
    specs = {"same-name": [f"a={adapters['pro']}", f"a={adapters['low']}"],
             "other-base": [f"a={adapters['pro']}", f"b={other_base_adapter(tmp_path)}"],
             "no-default": [f"a={adapters['pro']}", f"b={adapters['low']}"]}.get(case, [f"a={adapters['pro']}"])
    result = run_cli("generate", "--data", data, "--output", tmp_path / "out.jsonl", "--quant", "none",
                     *[x for spec in specs for x in ("--adapter", spec)])
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


def other_base_adapter(tmp_path: Path) -> Path:
    tiny_llama(seed=5).save_pretrained(tmp_path / "other-base")
    return random_adapter(tmp_path / "other-base", tmp_path / "other-adapter", rank=8, unshared=1)


def test_an_interrupted_generate_resumes_without_redoing_rows(trained, tmp_path):
    run, _ = trained
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w} {i}."}) + "\n" for i in range(6) for w in WORDS))
    args = ["generate", "--adapter", run, "--data", data, "--batch-size", "1", "--max-new-tokens", "6",
            "--device", "cpu", "--json"]
    whole = run_cli(*args, "--output", tmp_path / "whole.jsonl")
    assert whole.returncode == 0, whole.stderr

    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen([sys.executable, "-m", "prolora_cli", *map(str, args), "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 300
    while (not partial.exists() or len(partial.read_text().splitlines()) < 4) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = partial.read_text().splitlines()[1:]
    assert 3 <= len(kept) < 24 and not out.exists()
    refused = run_cli(*args, "--output", out)
    assert_one_line_error(refused, "interrupted run", "--resume")

    resumed = run_cli(*args, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    finished = [json.loads(line) for line in kept if line.endswith("}")]
    assert summary["generated"] == 24 - len(finished)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not partial.exists()
