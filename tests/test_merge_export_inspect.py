"""merge, export/import (PEFT as the independent reference) and inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error, attach_adapter, run_cli
from transformers import AutoModelForCausalLM

from prolora_cli.adapter.config import NEWEST_FORMAT_VERSION, AdapterConfig
from prolora_cli.adapter.files import WEIGHTS_NAME, save_adapter
from prolora_cli.adapter.inject import adapter_layers, inject
from prolora_cli.merge.stream import merge_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 61, 8, 77, 120, 31]])


def make_adapter(model_dir, folder, seed=1, **settings):
    """An adapter with random B (a fresh one has dW = 0, which would test nothing)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = AdapterConfig.create(**{"rank": 8, "unshared": 2, "share": 3, "dropout": 0.0, **settings},
                               base_model=str(model_dir))
    inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for t in (layer.B_shared, layer.B_unshared):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    save_adapter(folder, cfg, model)
    return folder


def adapted_logits(model_dir, adapter, quant_nf4=False):
    if quant_nf4:
        from prolora_cli.models.loading import load_model

        model, _, _ = load_model(str(model_dir), "nf4", device="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    attach_adapter(model, adapter)
    with torch.no_grad():
        return model.eval()(IDS).logits


VARIANTS = [
    dict(),                                             # PRoLoRA, m = n
    dict(share_b=5),                                    # m != n
    dict(unshared=8),                                   # LoRA
    dict(unshared=0, rotation="none"),                  # CLoRA
    dict(unshared=0),                                   # RoLoRA
    dict(init="vanilla"),
    dict(rotation="hidden"),
    dict(broadcast="rank", rotation="hidden", share=2),
]


@pytest.mark.parametrize("settings", VARIANTS)
def test_merge_equals_base_plus_adapter(tiny_model_dir, tmp_path, settings):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", **settings)
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result["relative_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, adapted_logits(tiny_model_dir, adapter), rtol=0, atol=1e-4)


def test_nf4_merge_matches_the_quantized_training_model(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    merge_adapter(adapter, tmp_path / "merged", base="nf4")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(IDS).logits
    # Stated tolerance: the 4-bit model dequantizes per block inside its matmul; same weights, other
    # summation order. Merging into the original weights instead is far off.
    reference = adapted_logits(tiny_model_dir, adapter, quant_nf4=True)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-3)
    merge_adapter(adapter, tmp_path / "full", base="full")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        assert (full(IDS).logits - reference).abs().max() > 10 * (got - reference).abs().max()


def test_merged_folder_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    result = run_cli("merge", "--adapter", adapter, "--output", tmp_path / "m", "--dtype", "bf16", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["relative_diff"] <= 6e-2
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}); "
            f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'm')!r})\n"
            "assert m.dtype == torch.bfloat16, m.dtype\n"
            "assert not any(k.startswith('prolora_cli') for k in sys.modules)\n"
            "assert not any('base_layer' in n or 'A_shared' in n for n, _ in m.named_parameters())\n")
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert (tmp_path / "m" / "generation_config.json").is_file()


def test_merge_dtype_defaults_to_the_base_checkpoints(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from prolora_cli.models.safetensors_files import Checkpoint

    def checkpoint_dtype(folder):
        return Checkpoint(folder).dtype()

    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    assert merge_adapter(adapter, tmp_path / "m32")["dtype"] == "fp32" == checkpoint_dtype(tmp_path / "m32")
    bf16_base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_base)
    result = merge_adapter(adapter, tmp_path / "m16", model=str(bf16_base))
    assert result["dtype"] == "bf16" == checkpoint_dtype(tmp_path / "m16")
    assert result["relative_diff"] <= 6e-2


def test_merge_failure_paths(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("merge", "--adapter", adapter, "--output", tmp_path / "taken"), "--overwrite")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    from conftest import tiny_llama

    other = tmp_path / "other-base"
    tiny_llama(vocab_size=320, hidden_size=64, intermediate_size=80).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((tiny_model_dir / f).read_bytes())
    assert_one_line_error(run_cli("merge", "--adapter", adapter, "--output", tmp_path / "o", "--model", other),
                          "gate_proj")
    assert not (tmp_path / "o").exists()

    assert_one_line_error(run_cli("merge", "--adapter", tmp_path / "nothing", "--output", tmp_path / "o"),
                          "not found")
    broken = make_adapter(tiny_model_dir, tmp_path / "broken")
    (broken / WEIGHTS_NAME).write_bytes(b"\x00" * 100)
    assert_one_line_error(run_cli("merge", "--adapter", broken, "--output", tmp_path / "o"), "corrupted")

    # The post-write check: a tolerance no bf16 model can meet fails with exit 1, writing nothing.
    result = run_cli("merge", "--adapter", adapter, "--output", tmp_path / "strict", "--dtype", "bf16",
                     "--tolerance", "0")
    assert result.returncode == 1 and "nothing was written" in result.stderr
    assert not (tmp_path / "strict").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]


@pytest.mark.parametrize("settings,scale", [(dict(unshared=8), False), (dict(share_b=5), False),
                                            (dict(share_b=5), True), (dict(scaling="rslora"), False)])
def test_export_loads_in_peft_with_equal_logits(tiny_model_dir, tmp_path, settings, scale):
    from peft import PeftModel

    adapter = make_adapter(tiny_model_dir, tmp_path / "ad", **settings)
    args = ["export", "--adapter", adapter, "--format", "peft", "--output", tmp_path / "peft"]
    assert run_cli(*args, *(["--scale-into-b"] if scale else [])).returncode == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    # rsLoRA: PEFT's use_rslora scales by lora_alpha / sqrt(r), as prolora did while training.
    rslora = settings.get("scaling") == "rslora"
    assert config["use_rslora"] == rslora
    assert config["lora_alpha"] == pytest.approx(8 if scale else 16)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model.eval()(IDS).logits
    torch.testing.assert_close(theirs, adapted_logits(tiny_model_dir, adapter), rtol=0, atol=1e-5)


def test_import_a_real_peft_adapter_and_round_trip(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model.eval()(IDS).logits
    assert run_cli("import", "--peft", tmp_path / "peft", "--output", tmp_path / "ours").returncode == 0
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["method"], cfg["r"], cfg["alpha"]) == ("lora", 4, 8)
    assert cfg["targets"] == ["q_proj", "v_proj", "down_proj"]
    torch.testing.assert_close(adapted_logits(tiny_model_dir, tmp_path / "ours"), theirs, rtol=0, atol=1e-5)
    # and back: export of the import is the original adapter, tensor for tensor
    assert run_cli("export", "--adapter", tmp_path / "ours", "--output", tmp_path / "again").returncode == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_rejects_what_is_not_plain_lora(tmp_path):
    assert_one_line_error(run_cli("import", "--peft", tmp_path, "--output", tmp_path / "o"), "not a PEFT adapter")


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    from pathlib import Path

    out = tmp_path_factory.mktemp("trained") / "run"
    data = Path(__file__).parent.parent / "examples" / "chat" / "train.jsonl"
    result = run_cli("train", "--model", tiny_model_dir, "--quant", "none", "--data", data, "--output", out,
                     "--rank", "8", "--unshared", "1", "--max-steps", "3", "--batch-size", "4",
                     "--grad-accum", "1", "--lr", "2e-2", "--max-seq-len", "64", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out


def test_inspect_a_trained_adapter(trained_adapter, tmp_path):
    result = run_cli("inspect", trained_adapter, "--json", "--plot", tmp_path / "dw.png", "--module",
                     "layers.1.self_attn.q_proj")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["config"]["r"] == 8 and info["config"]["u"] == 1 and info["config"]["m"] == 7
    assert info["trainable_params"] < info["lora_params_same_rank"]
    assert info["savings_vs_lora"] == pytest.approx(info["lora_params_same_rank"] / info["trainable_params"])
    assert info["bytes_on_disk"] == (trained_adapter / WEIGHTS_NAME).stat().st_size
    assert len(info["per_module"]) == 2 * 7 and info["per_module"][0]["module"] == "model.layers.0.self_attn.q_proj"
    for m in info["per_module"]:
        assert 0 < m["rank"] <= 8 and 0 < m["effective_rank"] <= 8 and m["dw_norm"] > 0
    # rotation really raises the rank: 1 unshared + 7 shared ranks give rank 8
    assert max(m["rank"] for m in info["per_module"]) == 8
    assert info["plot_module"] == "model.layers.1.self_attn.q_proj"
    assert (tmp_path / "dw.png").read_bytes()[:4] == b"\x89PNG"
    table = run_cli("inspect", trained_adapter)
    assert table.returncode == 0 and "effective rank" in table.stdout and "q_proj" in table.stdout


def test_inspect_singular_values_match_a_full_svd(tiny_model_dir, tmp_path):
    from prolora_cli.adapter.files import read_config, read_tensors
    from prolora_cli.adapter.inspection import singular_values
    from prolora_cli.adapter.peft_format import standalone_layers

    adapter = make_adapter(tiny_model_dir, tmp_path / "ad")
    layer = next(iter(standalone_layers(read_config(adapter), read_tensors(adapter)).values()))
    full = torch.linalg.svdvals(layer.delta_weight().double())[: layer.r]
    torch.testing.assert_close(singular_values(layer), full, rtol=1e-6, atol=1e-9)


def test_inspect_rejects_non_adapters_and_newer_formats(trained_adapter, tmp_path):
    assert_one_line_error(run_cli("inspect", tmp_path), "is not a prolora adapter")
    newer = tmp_path / "newer"
    newer.mkdir()
    cfg = json.loads((trained_adapter / "adapter_config.json").read_text())
    (newer / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": NEWEST_FORMAT_VERSION + 1}))
    (newer / WEIGHTS_NAME).write_bytes((trained_adapter / WEIGHTS_NAME).read_bytes())
    assert_one_line_error(run_cli("inspect", newer), f"format_version {NEWEST_FORMAT_VERSION + 1}", "upgrade")
    assert_one_line_error(run_cli("inspect", trained_adapter, "--plot", tmp_path / "x.png", "--module", "nope"),
                          "no module 'nope'")
