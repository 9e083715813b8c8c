"""The lm-evaluation-harness bridge: an exported adapter evaluated by lm-eval itself, on a local task.

Optional (`pip install prolora[lm-eval]`); skipped when lm-eval is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

pytest.importorskip("lm_eval")

QUESTIONS = [("What is 12 + 30?", ["42", "24"], 0), ("What is the capital of Peru?", ["Rome", "Lima"], 1),
             ("Spell tiger backwards.", ["regit", "tiger"], 0), ("Reverse: apple river", ["apple river", "river apple"], 1)]


def lm_eval(model_args: str, include: str, out) -> dict:
    """Run lm-eval's CLI in a child process; return its per-sample log-likelihoods and metrics."""
    result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
                             "--tasks", "prolora_local_choice", "--include_path", include, "--device", "cpu",
                             "--batch_size", "4", "--output_path", str(out), "--log_samples"],
                            capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["prolora_local_choice"]
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    loglik = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"], "loglik": loglik}


def test_lm_eval_scores_an_exported_adapter_like_the_merged_model(tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "prolora_local_choice.yaml").write_text(
        "task: prolora_local_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "completion": " " + c[a]}) + "\n"
                             for q, c, a in QUESTIONS))
    adapter, exported, merged = tmp_path / "adapter", tmp_path / "peft", tmp_path / "merged"
    steps = ["train", "--model", tiny_model_dir, "--quant", "none", "--data", chats, "--output", adapter,
             "--rank", "4", "--unshared", "1", "--max-steps", "30", "--lr", "5e-3", "--device", "cpu"]
    for args in (steps, ["export", "--adapter", adapter, "--output", exported],
                 ["merge", "--adapter", adapter, "--output", merged, "--dtype", "fp32"]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr

    base = lm_eval(f"pretrained={tiny_model_dir}", str(tmp_path / "task"), tmp_path / "out-base")
    peft = lm_eval(f"pretrained={tiny_model_dir},peft={exported}", str(tmp_path / "task"), tmp_path / "out-peft")
    whole = lm_eval(f"pretrained={merged}", str(tmp_path / "task"), tmp_path / "out-merged")
    flat = lambda r: [x for doc in r["loglik"] for x in doc]  # noqa: E731
    assert flat(peft) == pytest.approx(flat(whole), abs=1e-3)  # the adapter, loaded by PEFT, is the merge
    assert flat(peft) != pytest.approx(flat(base), abs=1e-2)   # and it was loaded: the base scores differently
    assert peft["acc"] == whole["acc"] and peft["acc_norm"] == whole["acc_norm"]
