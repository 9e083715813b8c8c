"""`prolora count-params` and the CLI's error contract, through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, run_cli, tiny_llama_config


def count(*args) -> dict:
    result = run_cli("count-params", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_llama2_7b_lora_budgets_from_the_paper():
    assert count("--model", "llama2-7b", "--rank", "2")["trainable_params"] == 4_997_120
    assert count("--model", "llama2-7b", "--rank", "16")["trainable_params"] == 39_976_960
    assert count("--model", "llama2-7b", "--rank", "8")["trainable_params"] == 19_988_480


def test_prolora_r8_u1_m7_has_lora_r2_budget():
    result = count("--model", "llama2-7b", "--rank", "8", "--unshared", "1")
    assert result["m"] == 7 and result["n"] == 7
    # 32 layers x [4 x (4096+4096) + 3 x (4096+11008)] x 1  +  7 x (ceil(h/7) + ceil(o/7)) per module
    assert result["trainable_params"] == 4_999_520
    assert abs(result["equivalent_lora_rank"] - 2.0) < 0.01
    assert result["bytes_fp32"] == 4 * 4_999_520 and result["bytes_bf16"] == 2 * 4_999_520


def test_tied_lora_rank_256_is_the_papers_4_60m():
    # One A (256 x 4096) for q, k, v; a B (4096 x 256) per type; v (256) per block; u (4096) per module.
    expected = 256 * 4096 + 3 * 4096 * 256 + 32 * 256 + 32 * 3 * 4096
    result = count("--model", "llama2-7b", "--method", "tied-lora", "--rank", "256")
    assert result["trainable_params"] == expected == 4_595_712
    assert result["targets"] == ["q_proj", "k_proj", "v_proj"]


def test_gqa_preset_and_local_config(tmp_path):
    result = count("--model", "llama2-70b", "--rank", "1", "--targets", "k")
    assert result["per_target"][0]["out_features"] == 1024  # 8 kv heads x 128
    cfg = tiny_llama_config()
    cfg.save_pretrained(tmp_path)
    result = count("--model", tmp_path, "--rank", "4", "--targets", "q,v")
    assert result["trainable_params"] == 2 * 4 * ((40 + 40) + (40 + 20))
    again = count("--model", tmp_path / "config.json", "--rank", "4", "--targets", "q,v")
    assert again["trainable_params"] == result["trainable_params"]


def test_budget_lists_the_papers_setting():
    rows = count("--model", "llama2-7b", "--budget", "5M", "--max-rank", "8")["settings"]
    assert [row["r"] for row in rows] == list(range(8, 0, -1))
    assert {k: rows[0][k] for k in ("r", "u", "m")} == {"r": 8, "u": 1, "m": 7}
    assert all(row["trainable_params"] <= 5_000_000 for row in rows)


def test_table_output_names_every_module():
    result = run_cli("count-params", "--model", "llama2-7b", "--rank", "2")
    assert result.returncode == 0
    for name in ("q_proj", "down_proj", "4,997,120"):
        assert name in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--rank", "2", "--unshared", "3"], "unshared"),
    (["--rank", "0"], "rank"),
    (["--rank", "4", "--unshared", "1", "--share", "0"], "ratio"),
    (["--rank", "4", "--unshared", "1", "--share", "5000"], "larger"),
    (["--targets", "q,attn"], "unknown target"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--budget", "lots"], "lots"),
    (["--rnak", "4"], "--rnak"),
])
def test_bad_settings_exit_2_with_one_line(args, needle):
    assert_one_line_error(run_cli("count-params", *args), needle)


@pytest.mark.parametrize("command", ["train", "merge", "eval", "inspect", "count-params"])
def test_every_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_help_does_not_import_torch():
    code = ("import sys; from prolora_cli.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
