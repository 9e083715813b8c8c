"""`prolora train --config`: YAML/JSON files of flags, command-line overrides, run_config.json round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples" / "chat"


def train_flags():
    import typer

    from prolora_cli.cli import app

    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.jsonl").write_text("\n".join(EXAMPLES.joinpath("train.jsonl").read_text().splitlines()[:32]) + "\n")
    return folder / "train.jsonl"


def test_run_config_json_repeats_the_run_and_flags_override_it(tiny_model_dir, data, tmp_path):
    first = run_cli("train", "--model", tiny_model_dir, "--data", data, "--quant", "none", "--device", "cpu",
                    "--rank", "8", "--unshared", "2", "--max-steps", "3", "--batch-size", "2",
                    "--output", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    written = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert written["rank"] == 8 and written["unshared"] == 2 and written["share"] == 6  # resolved, flag-named
    assert written["run"]["adapter"]["u"] == 2 and "resume" not in written and "overwrite" not in written

    again = run_cli("train", "--config", tmp_path / "a" / "run_config.json", "--output", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {tiny_model_dir}\ndata: {data}\nquant: none\ndevice: cpu\nrank: 4\n"
                         f"unshared: 1\nmax_steps: 1\ntargets: [q, v]\noutput: {tmp_path / 'c'}\n")
    override = run_cli("train", "--config", yaml_file, "--rank", "8")
    assert override.returncode == 0, override.stderr
    written = json.loads((tmp_path / "c" / "run_config.json").read_text())
    assert (written["rank"], written["unshared"], written["targets"]) == (8, 1, "q_proj,v_proj")


@pytest.mark.parametrize("text,needles", [
    ("rank: 8\nbogus-key: 1\n", ["unknown key 'bogus-key'"]),
    ("rank: abc\n", ["--rank"]),
    ("- rank\n- 8\n", ["expected a mapping"]),
    ("rank: [8: 9\n", ["not valid YAML"]),
    ("lr: {a: 1}\n", ["lr must be a single value"]),
])
def test_bad_config_files_are_one_line(tmp_path, data, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_one_line_error(run_cli("train", "--config", path, "--data", data, "--output", tmp_path / "o"), *needles)
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("train", "--config", tmp_path / "none.yaml"), "file not found")


def test_example_configs_are_valid_and_the_paper_pair_has_one_budget():
    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.planner import plan
    from prolora_cli.models.arch import PRESETS
    from prolora_cli.training.run_config import read_config_file

    flags = train_flags()
    budgets = {}
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        values = read_config_file(path, flags)
        adapter = {k: values[k] for k in ("method", "targets", "alpha", "dropout", "unshared", "share", "share_b")
                   if k in values}
        cfg = AdapterConfig.create(values.get("rank"), **adapter)
        if values.get("model") == "llama2-7b":
            budgets[path.stem] = plan(PRESETS["llama2-7b"], cfg)["trainable_params"]
    assert budgets["llama2-7b-lora-r2"] == 4_997_120
    assert abs(budgets["llama2-7b-prolora"] - budgets["llama2-7b-lora-r2"]) / budgets["llama2-7b-lora-r2"] < 0.01


# A setting away from its default for each method, so that run_config.json must carry it.
METHOD_FLAGS = {"prolora": ["--unshared", "2", "--rotation", "hidden"], "lora": [], "vera": ["--vera-seed", "3"],
                "tied-lora": [], "sora": ["--sparse-lambda", "5"], "prilora": ["--prune-every", "1"]}


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_every_methods_run_config_repeats_its_run(method, tiny_model_dir, data, tmp_path):
    from prolora_cli.methods import names

    assert set(METHOD_FLAGS) == set(names())  # a new method gets a row here
    first = run_cli("train", "--model", tiny_model_dir, "--data", data, "--quant", "none", "--device", "cpu",
                    "--method", method, "--rank", "4", "--max-steps", "2", "--batch-size", "2",
                    "--max-seq-len", "64", "--output", tmp_path / "a", *METHOD_FLAGS[method])
    assert first.returncode == 0, first.stderr
    again = run_cli("train", "--config", tmp_path / "a" / "run_config.json", "--output", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
