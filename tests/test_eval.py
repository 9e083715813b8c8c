"""`prolora eval`: hand-checked loss, exact match, choice, comparisons and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli, train_tokenizer
from transformers import AutoModelForCausalLM

from prolora_cli.data.chat import IGNORE, encode
from prolora_cli.evaluation.chat_eval import EvalArgs, evaluate_model, option_losses, token_losses
from prolora_cli.evaluation.tasks.base import exact_match, normalize_answer, token_f1

QA = [("What is 12 + 30?", "12 + 30 = 42.", ["12 + 30 = 42.", "12 + 30 = 24."]),
      ("Reverse the order of these words: apple river", "river apple", ["apple river", "river apple"]),
      ("What is the capital of Peru?", "The capital of Peru is Lima.",
       ["The capital of Peru is Lima.", "The capital of Peru is Rome."]),
      ("Spell the word \"tiger\" letter by letter.", "T-I-G-E-R", ["T-I-G-E-R", "R-E-G-I-T"])]


def record(q, a, choices=None, line=1, task=None):
    r = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "line": line}
    if choices:
        r["choices"] = choices
    if task:
        r["task"] = task
    return r


def test_squad_normalisation_exact_match_and_f1_by_hand():
    # SQuAD: lower case, punctuation and the articles a/an/the removed, whitespace collapsed.
    assert normalize_answer("  The  Capital,\n is LIMA! ") == "capital is lima"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("the Lima.", ["Rome", "lima"]) == 1.0 and exact_match("Lima, Peru", ["Lima"]) == 0.0
    # pred {capital, is, lima} against {capital, of, peru, is, lima}: precision 1, recall 3/5.
    assert token_f1("the capital is lima", ["The capital of Peru is Lima"]) == pytest.approx(2 * 0.6 / 1.6)
    assert token_f1("lima", ["Rome", "Lima!"]) == 1.0  # the best reference counts
    assert token_f1("", [""]) == 1.0 and token_f1("x", ["y"]) == 0.0


def test_loss_equals_a_hand_computation(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = train_tokenizer()
    records = [record(q, a, line=i) for i, (q, a, _) in enumerate(QA)]
    summary, _ = evaluate_model(model, tok, records, "tulu", EvalArgs(data="x", metrics=("loss",), batch_size=3),
                                lambda _n: None)
    total, count = 0.0, 0
    for r in records:  # one sequence at a time, no padding, the textbook formula
        enc = encode(r["messages"], tok, "tulu", 512)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        labels = torch.tensor(enc["labels"][1:])
        keep = labels != IGNORE
        total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    assert summary["loss"] == pytest.approx(total / count, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert summary["loss_tokens"] == count


@pytest.mark.parametrize("fmt", ["tulu", "template"])
def test_option_scoring_with_a_shared_prompt_equals_scoring_each_option_alone(tiny_model_dir, fmt):
    # Options that share a first word too ("The capital ..."), and one that is a prefix of another.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = train_tokenizer()
    options = ["The capital of Peru is Lima.", "The capital of Peru is Rome.", "Lima", "Lima, Peru", "x"]
    before = [{"role": "user", "content": "What is the capital of Peru?"}]
    encoded = [encode(before + [{"role": "assistant", "content": o}], tok, fmt, 512) for o in options]
    alone = [token_losses(model, [e], tok.pad_token_id, 1, lambda _n: None)[0] for e in encoded]
    shared = option_losses(model, encoded, tok.pad_token_id)
    assert [n for _, n in shared] == [n for _, n in alone]
    assert [ce for ce, _ in shared] == pytest.approx([ce for ce, _ in alone], rel=1e-5)


def test_exact_match_scores_the_models_own_greedy_answer(tiny_model_dir):
    """References set to what the model greedily says (case and spacing changed) score 100%."""
    from prolora_cli.data.chat import render_prompt
    from prolora_cli.inference.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = train_tokenizer()
    prompts = [render_prompt([{"role": "user", "content": q}], tok, "template") for q, _, _ in QA]
    said = [s.strip() for (s,) in generate(model, tok, prompts, False, 6, 2, lambda _n: None)]
    records = [record(q, "unused", line=i) | {"answers": ["  " + s.upper() + " "]}
               for i, ((q, _, _), s) in enumerate(zip(QA, said))]
    summary, rows = evaluate_model(model, tok, records, "template",
                                   EvalArgs(data="x", metrics=("exact-match",), max_new_tokens=6, batch_size=3),
                                   lambda _n: None)
    assert [r["prediction"] for r in rows] == said  # batching with left padding changes nothing
    assert summary["exact_match"] == 1.0 and summary["f1"] == 1.0


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "choices": c, "answers": [a], "task": "arith" if "+" in q else "other"})
             for q, a, c in QA]
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "qa.jsonl"


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny LLaMA whose frozen lm_head can express confident answers.

    At the default init (std 0.02, hidden 64) no hidden state lifts a logit above about 1.3, so no
    adapter can push the loss below about 4.5 nats over 320 tokens; std 0.2 leaves room to memorise.
    """
    from conftest import tiny_llama

    folder = tmp_path_factory.mktemp("wide")
    tok = train_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=96, initializer_range=0.2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def memorizer(wide_model_dir, qa_files, tmp_path_factory):
    """An adapter trained until it answers the four questions."""
    out = tmp_path_factory.mktemp("memo") / "run"
    result = run_cli("train", "--model", wide_model_dir, "--quant", "none", "--data", qa_files, "--output", out,
                     "--rank", "8", "--unshared", "8", "--dropout", "0", "--max-steps", "150", "--batch-size", "4",
                     "--grad-accum", "1", "--lr", "1e-2", "--warmup-ratio", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


def test_trained_adapter_answers_and_the_table_lists_every_model(wide_model_dir, qa_files, memorizer, tmp_path):
    result = run_cli("eval", "--model", wide_model_dir, "--quant", "none", "--data", qa_files,
                     "--adapter", memorizer, "--adapter", memorizer, "--with-base", "--by-task",
                     "--max-new-tokens", "32", "--json", "--save-predictions", tmp_path / "pred.jsonl",
                     "--output", tmp_path / "res.json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["name"] for r in report["results"]] == ["base", str(memorizer), str(memorizer)]
    base, trained = report["results"][0], report["results"][1]
    assert trained["exact_match"] == 1.0 and trained["choice_acc_token"] == 1.0 == trained["choice_acc_norm"]
    assert base["exact_match"] == 0.0 and trained["loss"] < base["loss"] / 5
    assert trained["trainable_params"] > 0 and trained["bytes"] > 0
    assert set(trained["by_task"]) == {"arith", "other"}
    assert json.loads((tmp_path / "res.json").read_text())["results"] == report["results"]
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 3 * len(QA) and {"prediction", "references", "choice"} <= set(preds[-1])
    table = run_cli("eval", "--model", wide_model_dir, "--quant", "none", "--data", qa_files,
                    "--adapter", memorizer, "--with-base", "--metrics", "loss,choice", "--device", "cpu")
    assert table.returncode == 0 and "base" in table.stdout and "choice acc" in table.stdout


def test_limit_samples_reproducibly(tiny_model_dir, qa_files):
    def lines(seed):
        r = run_cli("eval", "--model", tiny_model_dir, "--quant", "none", "--data", qa_files, "--metrics", "loss",
                    "--limit", "2", "--seed", str(seed), "--json", "--device", "cpu")
        return json.loads(r.stdout)["results"][0]["loss"]

    assert lines(1) == lines(1)


@pytest.mark.parametrize("args,needles", [
    (["--data", "missing.jsonl"], ["missing.jsonl", "not found"]),
    (["--metrics", "bleu"], ["unknown metric 'bleu'"]),
    (["--adapter", "no-adapter-here"], ["no-adapter-here", "not found"]),
])
def test_bad_input_exits_2(tiny_model_dir, qa_files, tmp_path, args, needles):
    base = ["eval", "--model", tiny_model_dir, "--quant", "none", "--data", qa_files]
    if "--data" in args:
        base = base[:-2]
        args = ["--data", str(tmp_path / args[1])]
    elif "--adapter" in args:
        args = ["--adapter", str(tmp_path / args[1])]
    assert_one_line_error(run_cli(*base, *args), *needles)


@pytest.mark.smollm
def test_eval_on_the_embedded_model(tmp_path):
    from pathlib import Path

    dev = Path(__file__).parent.parent / "examples" / "chat" / "dev.jsonl"
    result = run_cli("eval", "--data", dev, "--limit", "4", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    base = json.loads(result.stdout)["results"][0]
    assert 0 < base["loss"] < 10 and 0 <= base["exact_match"] <= 1


def test_our_calls_into_transformers_raise_no_deprecation_warnings(tiny_model_dir):
    """pyproject hides deprecation warnings in tests; here they are shown and must not come from
    scoring options with a shared KV cache, nor from batched, sampled generation with stop strings."""
    import warnings

    from prolora_cli.inference.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = train_tokenizer()
    before = [{"role": "user", "content": "What is the capital of Peru?"}]
    options = [encode(before + [{"role": "assistant", "content": o}], tok, "tulu", 512) for o in ("Lima", "Rome")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        option_losses(model, options, tok.pad_token_id)
        generate(model, tok, ["<|user|>\nHi\n<|assistant|>\n"] * 3, True, 4, 2, lambda _n: None,
                 temperature=0.5, samples=2, stop=("\n",))
        generate(model, tok, ["<|user|>\nHi\n<|assistant|>\n"], True, 4, 2, lambda _n: None)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations
