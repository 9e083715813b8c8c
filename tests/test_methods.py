"""The other methods (LoRA, VeRA, Tied-LoRA, SoRA, PRILoRA) through the same interface and commands."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import attach_adapter, run_cli, tiny_llama, tiny_llama_config
from transformers import AutoModelForCausalLM

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.files import save_adapter
from prolora_cli.adapter.inject import adapter_layers, count_trainable, finalize, inject
from prolora_cli.adapter.planner import plan
from prolora_cli.methods.prilora.method import PRILoRALinear, pack_bits, rank_ramp, unpack_bits
from prolora_cli.methods.sora.method import lambda_at, proximal_step
from prolora_cli.models.arch import resolve_architecture

METHODS = ("lora", "vera", "tied-lora", "sora", "prilora")
IDS = torch.tensor([[5, 17, 42, 9, 3, 25, 61, 8, 77, 12, 31]])
# The tiny model: h = 40; q, o: 40 -> 40; k, v: 40 -> 20 (GQA); gate, up: 40 -> 70; down: 70 -> 40; 2 blocks.
SHAPES = {"q_proj": (40, 40), "k_proj": (40, 20), "v_proj": (40, 20), "o_proj": (40, 40),
          "gate_proj": (40, 70), "up_proj": (40, 70), "down_proj": (70, 40)}


def by_hand(method: str, r: int) -> int:
    """Each method's trainable-parameter formula, written out independently of the code."""
    if method == "lora":
        return 2 * sum(r * (h + o) for h, o in SHAPES.values())
    if method == "vera":
        return 2 * sum(r + o for h, o in SHAPES.values())
    if method == "tied-lora":  # default targets q, k, v: one A, a B per type, v per block, u per module
        return r * 40 + (40 + 20 + 20) * r + 2 * r + 2 * (40 + 20 + 20)
    if method == "sora":
        return 2 * sum(r * (h + o) + r for h, o in SHAPES.values())
    first, last = max(1, round(r / 2)), round(3 * r / 2)  # PRILoRA: block 0 at r/2, block 1 at 3r/2
    return sum((first + last) * (h + o) for h, o in SHAPES.values())


def config(method: str, r: int = 4, **kw) -> AdapterConfig:
    return AdapterConfig.create(r, method=method, dropout=0.0, base_model="tiny", **kw)


def randomize(model, seed: int = 3) -> None:
    """Every trainable tensor random (a fresh adapter has dW = 0, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_equals_the_formula_and_the_planner(method, tmp_path):
    model = tiny_llama()
    inject(model, config(method))
    tiny_llama_config().save_pretrained(tmp_path)
    assert count_trainable(model)[0] == by_hand(method, 4) == plan(resolve_architecture(str(tmp_path)),
                                                                   config(method))["trainable_params"]


@pytest.mark.parametrize("method", METHODS)
def test_merge_save_load_and_peft_export_are_exact(method, tmp_path):
    from peft import PeftModel

    from prolora_cli.adapter.peft_format import export_peft

    model = tiny_llama()
    cfg = config(method)
    inject(model, cfg)
    randomize(model)
    if method == "sora":  # close some gates, so export and reload meet per-module ranks
        for layer in adapter_layers(model).values():
            layer.gate.data[::2] = 0
    if method == "prilora":
        for layer in adapter_layers(model).values():
            layer.input_norm_sq.uniform_(0.5, 2.0)
            layer.prune()
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny_llama())), "the adapter must change the output"

    # Merge: dW added into the weights gives the same logits, and unmerge restores the base.
    for layer in adapter_layers(model).values():
        layer.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)

    # Save and load into a fresh model.
    cfg, _ = finalize(model, cfg)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    save_adapter(tmp_path / "ad", cfg, model)
    stored = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert stored["method"] == method
    fresh = tiny_llama()
    attach_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(logits(fresh), unmerged, rtol=0, atol=1e-6)

    # PEFT loads the export as a plain LoRA with the same logits.
    tiny_llama().save_pretrained(tmp_path / "base")
    export_peft(tmp_path / "ad", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model), unmerged, rtol=0, atol=1e-5)


def test_vera_is_peft_vera_given_the_same_seed_and_vectors(tmp_path):
    """One frozen pair for the model, sized to the largest in/out and sliced per module, drawn as
    PEFT's VeraModel draws it: same seed, same matrices, same outputs."""
    from peft import VeraConfig, get_peft_model

    model = tiny_llama()
    layers = inject(model, config("vera", r=16))
    q0, k1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.k_proj"]
    assert q0.vera_A is k1.vera_A and q0.vera_A.shape == (16, 70) and q0.vera_B.shape == (70, 16)
    assert torch.all(q0.vera_d == 0.1) and torch.all(q0.vera_b == 0)
    randomize(model)
    reference = get_peft_model(tiny_llama(), VeraConfig(r=16, target_modules=list(SHAPES), vera_dropout=0.0,
                                                        projection_prng_key=0, d_initial=0.1))
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = reference.base_model.model.get_submodule(name)
            assert torch.equal(peft_layer.vera_A["default"], layer.vera_A)  # drawn identically
            assert torch.equal(peft_layer.vera_B["default"], layer.vera_B)
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_b)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    save_adapter(tmp_path / "ad", config("vera", r=16), model)
    from safetensors.torch import load_file

    assert {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "ad" / "adapter.safetensors")} == {"vera_d", "vera_b"}


def test_tied_lora_ties_as_the_paper_and_handles_gqa():
    layers = inject(tiny_llama(), config("tied-lora"))
    assert {p.rsplit(".", 1)[1] for p in layers} == {"q_proj", "k_proj", "v_proj"}  # the default targets
    q0, k0, v0 = (layers[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
    q1, k1 = layers["model.layers.1.self_attn.q_proj"], layers["model.layers.1.self_attn.k_proj"]
    assert q0.tied_A is k0.tied_A is v0.tied_A is q1.tied_A       # one A for q, k, v of all blocks
    assert q0.tied_B is q1.tied_B and k0.tied_B is k1.tied_B and q0.tied_B is not k0.tied_B  # B per type
    assert q0.tied_v is k0.tied_v is v0.tied_v and q0.tied_v is not q1.tied_v  # v per block
    assert k0.tied_B.shape == (20, 4) and k0.factors()[1].shape == (20, 4)      # GQA: k is narrower
    layers = inject(tiny_llama(), config("tied-lora", targets="all"))
    up, gate = layers["model.layers.0.mlp.up_proj"], layers["model.layers.0.mlp.gate_proj"]
    assert up.tied_A is not gate.tied_A and up.tied_A is layers["model.layers.1.mlp.up_proj"].tied_A


def test_tied_lora_count_with_every_target(tmp_path):
    r = 4
    groups_in = 40 + 40 + 40 + 40 + 70                  # A per group: qkv, o, gate, up, down
    outs = sum(o for h, o in SHAPES.values())          # B per type, and u per module in each block
    expected = r * groups_in + r * outs + 2 * 5 * r + 2 * outs
    model = tiny_llama()
    inject(model, config("tied-lora", targets="all"))
    tiny_llama_config().save_pretrained(tmp_path)
    assert count_trainable(model)[0] == expected == plan(resolve_architecture(str(tmp_path)),
                                                         config("tied-lora", targets="all"))["trainable_params"]


def test_sora_proximal_step_is_the_authors_by_hand():
    # Their SparseAdamW: |g| > xi loses xi, then every |g| < xi is zeroed, so (xi, 2 xi) ends at 0.
    g = torch.tensor([-0.5, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.25, 0.5])
    expected = torch.tensor([-0.4, 0.0, -0.1, 0.0, 0.0, 0.0, 0.1, 0.0, 0.15, 0.4])
    torch.testing.assert_close(proximal_step(g, 0.1), expected)


def test_sora_defaults_are_the_authors_no_schedule_run():
    s = config("sora").settings
    assert (s.sparse_lambda, s.sparse_lambda_2, s.lambda_stages) == (10.0, 3e-4, 1)


def test_sora_penalty_and_no_weight_decay_on_the_gate():
    from prolora_cli.training.args import TrainArgs
    from prolora_cli.training.optimization import build_optimizer

    model = tiny_llama()
    cfg = config("sora", r=4, sparse_lambda=2.0)
    layers = inject(model, cfg)
    gates = torch.cat([layer.gate.detach() for layer in layers.values()])
    penalty = cfg.impl.regularizer(cfg, layers)
    assert penalty.item() == pytest.approx(2.0 * gates.abs().sum().item() / (14 * 4), rel=1e-6)
    opt = build_optimizer(model, layers, TrainArgs(data=None, output=None, adapter=cfg, weight_decay=0.1))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert decay[id(q.gate)] == 0.0 and decay[id(q.lora_A)] == 0.1


def test_sora_lambda_moves_linearly_over_stages():
    lams = [lambda_at(s, 100, 1e-4, 5e-4, 5) for s in range(1, 101)]
    assert lams[0] == lams[19] == pytest.approx(1e-4)
    assert lams[20] == pytest.approx(2e-4) and lams[99] == pytest.approx(5e-4)
    assert lambda_at(7, 10, 3e-4, 9e-4, 1) == 3e-4


def test_sora_pruning_removes_closed_ranks_without_changing_outputs():
    model = tiny_llama()
    cfg = config("sora", r=6)
    inject(model, cfg)
    randomize(model)
    layers = adapter_layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.gate[: i % 7] = 0  # 0..6 closed gates: some modules lose every rank
    before = logits(model)
    done, _ = finalize(model, cfg)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
    expected = {name: 6 - i % 7 for i, name in enumerate(layers)}
    assert done.settings.ranks == expected
    left = adapter_layers(model)
    assert set(left) == {n for n, r in expected.items() if r > 0}
    assert all(layer.A_unshared.shape[0] == expected[n] for n, layer in left.items())


def test_sora_proximal_step_runs_after_each_optimizer_step():
    model = tiny_llama()
    inject(model, config("sora", r=4, sparse_lambda_2=0.3))
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.1, -0.2, 0.7, -1.0]))
    layer.after_step(1, 10)
    torch.testing.assert_close(layer.gate.detach(), torch.tensor([0.0, 0.0, 0.4, -0.7]))


def test_prilora_ranks_rise_with_depth():
    assert rank_ramp(4, 12, 5) == [4, 6, 8, 10, 12]
    assert sum(rank_ramp(4, 12, 5)) == 5 * 8  # the default ramp keeps uniform rank 8's total
    model = tiny_llama(num_hidden_layers=3)
    layers = inject(model, config("prilora", r=8))
    assert [layers[f"model.layers.{b}.mlp.down_proj"].r for b in range(3)] == [4, 8, 12]


def test_prilora_pruning_masks_the_least_important_and_they_stay_zero():
    torch.manual_seed(0)
    layer = PRILoRALinear(torch.nn.Linear(20, 10), r=3, alpha_scaling=1.0, prune_every=2, prune_fraction=0.25,
                          max_sparsity=0.5)
    x = torch.randn(64, 20) * torch.linspace(0.1, 3, 20)  # later features are larger
    layer.train()(x)
    score = layer.lora_A.detach().abs() * layer.input_norm_sq.sqrt()
    layer.prune()
    assert int((~layer.mask).sum(1).unique()) == 5  # 25% of 20 per row
    for row in range(3):  # the 5 lowest scores of each row went
        assert set(torch.nonzero(~layer.mask[row]).flatten().tolist()) == set(score[row].argsort()[:5].tolist())
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1)
    for step in range(1, 9):  # momentum would revive pruned entries if nothing stopped it
        (layer(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        layer.after_step(step, 8)
        assert torch.all(layer.lora_A[~layer.mask] == 0)
    assert int((~layer.mask).sum(1).unique()) == 10  # capped at max_sparsity 0.5


def test_prilora_saves_only_the_surviving_values(tmp_path):
    model = tiny_llama()
    cfg = config("prilora", r=4, prune_fraction=0.5, max_sparsity=0.5)
    layers = inject(model, cfg)
    for layer in layers.values():
        layer.prune()
    save_adapter(tmp_path / "ad", cfg, model)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ad" / "adapter.safetensors")
    q = layers["model.layers.1.self_attn.q_proj"]
    assert saved["model.layers.1.self_attn.q_proj.A_values"].numel() == q.lora_A.numel() // 2
    mask = torch.rand(3, 11) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), (3, 11)), mask)


@pytest.mark.parametrize("method,extra", [
    ("lora", []), ("vera", ["--rank", "32", "--lr", "1e-1"]), ("tied-lora", []),
    ("sora", ["--sparse-lambda-2", "1e-3", "--max-lambda", "1e-2", "--lambda-stages", "3"]),
    ("prilora", ["--prune-every", "3", "--prune-fraction", "0.1"])])
def test_train_merge_export_inspect_eval_through_the_cli(method, extra, tiny_model_dir, tmp_path):
    from peft import PeftModel

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": f"{w} {w} {w}."}]}) + "\n"
                            for w in ("apple", "river", "tiger", "lemon") * 4))
    run = tmp_path / "run"
    result = run_cli("train", "--model", tiny_model_dir, "--quant", "none", "--data", data, "--eval-data", data,
                     "--method", method, "--rank", "4", "--lr", "5e-3", "--max-steps", "12", "--batch-size", "4",
                     "--grad-accum", "1", "--warmup-ratio", "0", "--dropout", "0", "--output", run, *extra)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.1, evals
    assert json.loads((run / "adapter_config.json").read_text())["method"] == method

    assert run_cli("merge", "--adapter", run, "--output", tmp_path / "merged").returncode == 0
    assert run_cli("export", "--adapter", run, "--format", "peft", "--output", tmp_path / "peft").returncode == 0
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(peft_model), logits(merged), rtol=0, atol=1e-4)

    info = run_cli("inspect", run, "--json")
    assert info.returncode == 0, info.stderr
    modules = json.loads(info.stdout)["per_module"]
    assert modules and all(m["adapter_rank"] >= 1 for m in modules)
    ev = run_cli("eval", "--model", tiny_model_dir, "--quant", "none", "--data", data, "--adapter", run,
                 "--metrics", "loss", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["results"][0]["loss"] == pytest.approx(evals[-1], rel=1e-4)


def test_prolora_flags_with_another_method_exit_2(tmp_path):
    result = run_cli("count-params", "--method", "vera", "--unshared", "1")
    assert result.returncode == 2 and "--unshared is not a setting of --method vera" in result.stderr
    result = run_cli("count-params", "--method", "dora")
    assert result.returncode == 2 and "unknown adapter method" in result.stderr
