"""Injection into a tiny LLaMA (GQA, odd sizes), the adapter folder format and its failure modes."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import attach_adapter, tiny_llama

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.files import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from prolora_cli.adapter.inject import adapter_layers, adapter_state, count_trainable, inject
from prolora_cli.adapter.planner import plan
from prolora_cli.errors import UserError
from prolora_cli.models.arch import from_config_dict


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for t in (layer.B_shared, layer.B_unshared):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def test_inject_counts_match_planner_and_freeze_the_rest():
    model = tiny_llama()
    cfg = AdapterConfig.create(8, unshared=1, share=3, share_b=5)
    layers = inject(model, cfg)
    assert len(layers) == 2 * 7
    trainable, _ = count_trainable(model)
    arch = from_config_dict(model.config.to_dict(), "tiny")
    assert trainable == plan(arch, cfg)["trainable_params"]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("base_layer" in n or "embed" in n or "norm" in n or "lm_head" in n for n in frozen)
    assert layers["model.layers.0.self_attn.k_proj"].out_features == 20  # GQA: 2 kv heads x 10


def test_whole_model_matches_peft_lora_with_the_expanded_matrices():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    reference = copy.deepcopy(base)
    cfg = AdapterConfig.create(8, unshared=2, share=3, share_b=5, dropout=0.0, alpha=16)
    inject(base, cfg)
    randomize_adapters(base)
    reference = get_peft_model(reference, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=list(cfg.targets)))
    with torch.no_grad():
        for name, layer in adapter_layers(base).items():
            a, b = layer.expanded()
            peft_layer = reference.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    ids = torch.randint(3, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_a_training_step_changes_only_the_adapter():
    model = tiny_llama().train()
    inject(model, AdapterConfig.create(8, unshared=1, share=7, dropout=0.0))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {k: v.clone() for k, v in adapter_state(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (4, 16))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    after = adapter_state(model)
    changed = [k for k in after if not torch.equal(after[k], adapter_before[k])]
    assert any(k.endswith("A_shared") for k in changed) and any(k.endswith("B_shared") for k in changed)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_llama()
    cfg = AdapterConfig.create(8, unshared=1, share=3, share_b=5, base_model="tiny", rotation="hidden")
    inject(model, cfg)
    randomize_adapters(model)
    save_adapter(tmp_path / "ad", cfg, model)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    stored = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert stored["format"] == "prolora" and stored["format_version"] == 2
    assert (stored["r"], stored["u"], stored["m"], stored["n"]) == (8, 1, 3, 5)

    fresh = tiny_llama()
    loaded_cfg = attach_adapter(fresh, tmp_path / "ad")
    assert replace(loaded_cfg, modules=None) == cfg
    assert loaded_cfg.modules["model.layers.0.self_attn.k_proj"] == [40, 20]  # sizes recorded per module
    a, b = adapter_state(model), adapter_state(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.down_proj.B_shared" in a
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_mismatched_base_names_the_module(tmp_path):
    model = tiny_llama()
    cfg = AdapterConfig.create(4, unshared=1, share=2)
    inject(model, cfg)
    save_adapter(tmp_path / "ad", cfg, model)
    other = tiny_llama(intermediate_size=72)
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj.*A_shared|gate_proj"):
        attach_adapter(other, tmp_path / "ad")


def test_corrupted_and_missing_files_give_clear_errors(tmp_path):
    model = tiny_llama()
    cfg = AdapterConfig.create(4, unshared=1, share=2)
    inject(model, cfg)
    folder = save_adapter(tmp_path / "ad", cfg, model)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted"):
        attach_adapter(tiny_llama(), folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(UserError, match="has no adapter.safetensors"):
        attach_adapter(tiny_llama(), folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        attach_adapter(tiny_llama(), folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"format": "prolora", "format_version": 99}))
    with pytest.raises(UserError, match="format_version"):
        attach_adapter(tiny_llama(), folder)
    with pytest.raises(UserError, match="not found"):
        attach_adapter(tiny_llama(), tmp_path / "nope")
    with pytest.raises(UserError, match="no adapter_config.json"):
        attach_adapter(tiny_llama(), tmp_path)


def test_config_validation_rejects_bad_values():
    good = AdapterConfig.create(8, unshared=1, share=7).to_dict()
    for key, value, msg in [("u", 9, "unshared"), ("targets", ["q", "zz"], "unknown target"),
                            ("r", "8", "wrong type"), ("rotation", "diag", "rotation")]:
        with pytest.raises(UserError, match=msg):
            AdapterConfig.from_dict({**good, key: value})


# What prolora 0.1 wrote (format 1): every method's fields in one flat object.
V1 = {"format": "prolora", "format_version": 1, "r": 8, "u": 1, "m": 7, "n": 7, "alpha": 16.0, "dropout": 0.1,
      "broadcast": "hidden", "rotation": "rank", "init": "rectified", "targets": ["q_proj", "v_proj"],
      "base_model": "tiny", "method": "prolora", "vera_seed": 0, "vera_d_init": 0.1, "sora_lambda": 1e-4,
      "sora_max_lambda": 5e-4, "sora_stages": 5, "rank_first": None, "rank_last": None, "prune_every": 50,
      "prune_fraction": 0.05, "max_sparsity": 0.5, "modules": None, "ranks": None}


def test_format_1_adapters_still_read_or_say_how_to_convert():
    cfg = AdapterConfig.from_dict(V1)
    assert cfg == AdapterConfig.create(8, unshared=1, targets="q,v", base_model="tiny")
    sora = AdapterConfig.from_dict({**V1, "method": "sora", "u": 8, "m": 1, "n": 1,
                                    "ranks": {"model.layers.0.self_attn.q_proj": 3}})
    s = sora.settings
    assert (s.sparse_lambda, s.sparse_lambda_2, s.max_lambda, s.lambda_stages) == (0.0, 1e-4, 5e-4, 5)
    assert s.ranks == {"model.layers.0.self_attn.q_proj": 3}
    for method in ("vera", "tied-lora"):
        with pytest.raises(UserError, match="prolora export --format peft"):
            AdapterConfig.from_dict({**V1, "method": method, "u": 8, "m": 1, "n": 1})


def test_no_module_outside_adapters_names_a_method():
    """Adding a method is one new file under adapters/ plus a registry line (docs/architecture.md)."""
    import re
    from pathlib import Path

    import prolora_cli

    pattern = re.compile(r'"(lora|sora|prilora|vera|tied-lora)"|method *(==|!=|in) ')
    found = [f"{p.name}:{i}" for p in Path(prolora_cli.__file__).parent.glob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_files_written_atomically_get_the_usual_mode(tmp_path):
    """Temporary files are private while written; what lands gets the mode the user's umask gives."""
    import os
    import stat

    from prolora_cli.fileio import atomic_dir, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "f.json", "{}")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
