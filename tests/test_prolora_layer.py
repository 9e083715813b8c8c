"""The PRoLoRA layer against the spec, read literally, and against PEFT's LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prolora_cli.methods.prolora.method import PRoLoRALinear, count_params, param_shapes


def spec_expand(layer: PRoLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's expansion written as plainly as possible: a Python loop over copies."""
    h, o, r, u, m, n = layer.in_features, layer.out_features, layer.r, layer.u, layer.m, layer.n
    r_s = r - u
    A, B = layer.A_shared.detach(), layer.B_shared.detach()
    a_copies, b_copies = [], []
    if r_s == 0:  # plain LoRA: nothing shared
        a_shared, b_shared = torch.zeros(0, h), torch.zeros(o, 0)
    elif layer.broadcast == "hidden":
        cA, cB = math.ceil(h / m), math.ceil(o / n)
        sA, sB = max(r_s // m, 1), max(r_s // n, 1)
        for j in range(m):
            if layer.rotation == "rank":
                a_copies.append(torch.stack([A[(k + j * sA) % r_s, :] for k in range(r_s)]))
            elif layer.rotation == "hidden":
                s = max(cA // m, 1)
                a_copies.append(torch.stack([A[:, (c + j * s) % cA] for c in range(cA)], dim=1))
            else:
                a_copies.append(A)
        for j in range(n):
            if layer.rotation == "rank":
                b_copies.append(torch.stack([B[:, (k + j * sB) % r_s] for k in range(r_s)], dim=1))
            elif layer.rotation == "hidden":
                s = max(cB // n, 1)
                b_copies.append(torch.stack([B[(c + j * s) % cB, :] for c in range(cB)]))
            else:
                b_copies.append(B)
        a_shared = torch.cat(a_copies, dim=1)[:, :h]
        b_shared = torch.cat(b_copies, dim=0)[:o, :]
    else:  # broadcast along the rank dimension
        cRa, cRb = A.shape[0], B.shape[1]
        for j in range(m):
            if layer.rotation == "rank":
                s = max(cRa // m, 1)
                a_copies.append(torch.stack([A[(t + j * s) % cRa, :] for t in range(cRa)]))
            elif layer.rotation == "hidden":
                s = max(h // m, 1)
                a_copies.append(torch.stack([A[:, (c + j * s) % h] for c in range(h)], dim=1))
            else:
                a_copies.append(A)
        for j in range(n):
            if layer.rotation == "rank":
                s = max(cRb // n, 1)
                b_copies.append(torch.stack([B[:, (t + j * s) % cRb] for t in range(cRb)], dim=1))
            elif layer.rotation == "hidden":
                s = max(o // n, 1)
                b_copies.append(torch.stack([B[(c + j * s) % o, :] for c in range(o)]))
            else:
                b_copies.append(B)
        a_shared = torch.cat(a_copies, dim=0)[:r_s, :]
        b_shared = torch.cat(b_copies, dim=1)[:, :r_s]
    full_a = torch.cat([a_shared, layer.A_unshared.detach()], dim=0)
    full_b = torch.cat([b_shared, layer.B_unshared.detach()], dim=1)
    return full_a, full_b


def make_layer(h=37, o=23, seed=0, randomize_b=True, **kw) -> PRoLoRALinear:
    torch.manual_seed(seed)
    layer = PRoLoRALinear(nn.Linear(h, o, bias=False), **kw)
    if randomize_b:  # B starts at zero; give it values so the test sees every entry
        with torch.no_grad():
            layer.B_shared.normal_()
            layer.B_unshared.normal_()
    return layer


CASES = [
    dict(r=8, u=1, m=7, n=7),
    dict(r=8, u=1, m=3, n=5),          # m != n, h and o not divisible
    dict(r=6, u=0, m=4, n=2),
    dict(r=5, u=2, m=6, n=9),          # m > r_s: stride falls back to 1
    dict(r=4, u=4, m=3, n=3),          # u = r: plain LoRA
    dict(r=7, u=3, m=1, n=1),
]


def _valid(case, broadcast):
    r_s = case["r"] - case["u"]  # broadcast along rank splits r - u, so m and n must fit in it
    return broadcast == "hidden" or r_s == 0 or max(case["m"], case["n"]) <= r_s


@pytest.mark.parametrize("case,broadcast,rotation", [
    (case, b, rot) for case in CASES for b in ("hidden", "rank") for rot in ("rank", "hidden", "none")
    if _valid(case, b)])
def test_expansion_matches_spec_loops(case, broadcast, rotation):
    layer = make_layer(broadcast=broadcast, rotation=rotation, **case)
    a, b = layer.expanded()
    ref_a, ref_b = spec_expand(layer)
    assert a.shape == (case["r"], 37) and b.shape == (23, case["r"])
    assert torch.equal(a, ref_a)
    assert torch.equal(b, ref_b)


def test_rotation_pins_one_entry_by_hand():
    # h=10, r=3, u=1 -> r_s=2, m=2: cA=5, sA=1; copy 1 swaps the two shared rows.
    layer = make_layer(h=10, o=4, r=3, u=1, m=2, n=1)
    a, _ = layer.expanded()
    assert torch.equal(a[0, 5:], layer.A_shared[1].detach())
    assert torch.equal(a[1, 5:], layer.A_shared[0].detach())
    assert torch.equal(a[0, :5], layer.A_shared[0].detach())


@pytest.mark.parametrize("h,o,r,u,m,n", [(37, 23, 8, 1, 7, 7), (40, 20, 8, 2, 3, 5), (576, 192, 8, 1, 7, 7),
                                         (4096, 11008, 32, 4, 7, 7), (64, 64, 4, 4, 1, 1), (9, 5, 3, 0, 4, 2)])
def test_trainable_count_is_the_spec_formula(h, o, r, u, m, n):
    r_s = r - u
    formula = u * (h + o) + r_s * (math.ceil(h / m) + math.ceil(o / n))
    assert count_params(h, o, r, u, m, n) == formula
    if h < 1000:
        layer = make_layer(h=h, o=o, r=r, u=u, m=m, n=n, randomize_b=False)
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) - h * o == formula
    if m == n == 1:
        assert count_params(h, o, r, u, m, n) == r * (h + o)


def test_shapes_follow_the_spec():
    assert param_shapes(37, 23, 8, 1, 7, 5) == {
        "A_shared": (7, 6), "A_unshared": (1, 37), "B_shared": (5, 7), "B_unshared": (23, 1)}
    assert param_shapes(37, 23, 8, 1, 3, 2, "rank") == {
        "A_shared": (3, 37), "A_unshared": (1, 37), "B_shared": (23, 4), "B_unshared": (23, 1)}


def test_rectified_and_vanilla_init_bounds():
    h = 400
    layer = make_layer(h=h, o=30, r=8, u=2, m=8, n=8, randomize_b=False, seed=1)
    bound = 1 / math.sqrt(h)
    for t in (layer.A_shared, layer.A_unshared):
        assert t.abs().max() <= bound + 1e-7
        assert t.abs().max() > 0.9 * bound  # really uses the full range, not the chunk's
    assert not layer.B_shared.any() and not layer.B_unshared.any()
    vanilla = make_layer(h=h, o=30, r=8, u=2, m=8, n=8, randomize_b=False, init="vanilla", seed=1)
    chunk_bound = 1 / math.sqrt(math.ceil(h / 8))
    assert vanilla.A_shared.abs().max() <= chunk_bound + 1e-7
    assert vanilla.A_shared.abs().max() > 0.9 * chunk_bound
    assert vanilla.A_unshared.abs().max() <= bound + 1e-7


def test_u_equals_r_is_lora_and_matches_peft():
    from peft import LoraConfig, inject_adapter_in_model

    h, o, r, alpha = 37, 23, 4, 16
    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(h, o, bias=True)

        def forward(self, x):
            return self.proj(x)

    holder = Holder()
    base_state = {k: v.clone() for k, v in holder.state_dict().items()}
    ours = PRoLoRALinear(holder.proj, r=r, u=r, m=1, alpha=alpha)
    with torch.no_grad():
        ours.B_unshared.normal_()
    a, b = ours.expanded()

    reference = Holder()
    reference.load_state_dict(base_state)
    reference = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                   target_modules=["proj"]), reference)
    with torch.no_grad():
        reference.proj.lora_A["default"].weight.copy_(a)
        reference.proj.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, h)
    manual = nn.functional.linear(x, base_state["proj.weight"], base_state["proj.bias"]) + (x @ a.T @ b.T) * alpha / r
    torch.testing.assert_close(ours(x), manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(r=8, u=1, m=7), dict(r=6, u=0, m=3, n=2, rotation="none"),
                                dict(r=4, u=2, m=2, broadcast="rank", rotation="hidden")])
def test_merge_then_forward_equals_unmerged(kw):
    layer = make_layer(h=37, o=23, **kw).double()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 37, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.base_layer(x), before, rtol=0, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)


def test_delta_weight_is_scaled_b_at_a():
    layer = make_layer(r=8, u=1, m=7, alpha=32)
    a, b = layer.expanded()
    torch.testing.assert_close(layer.delta_weight(), (b @ a) * 4.0)


def test_gradients_reach_shared_chunks_through_the_gather():
    layer = make_layer(r=8, u=1, m=7)
    layer(torch.randn(5, 37)).square().sum().backward()
    assert layer.A_shared.grad is not None and layer.A_shared.grad.abs().sum() > 0
    assert layer.B_shared.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is not None  # this bare layer is not frozen; inject() freezes


def test_nf4_base_forward_and_backward_on_cpu():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    full = nn.Linear(64, 48, bias=False)
    q = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(full.state_dict())
    q = q.to("cpu")
    layer = PRoLoRALinear(q, r=8, u=1, m=7)
    with torch.no_grad():
        layer.B_unshared.normal_()
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.shape == (3, 48)
    y.sum().backward()
    assert layer.A_shared.grad is not None and layer.B_unshared.grad is not None
    with pytest.raises(TypeError):
        layer.merge()


@pytest.mark.parametrize("bad,msg", [(dict(r=0, u=0, m=1), "rank"), (dict(r=4, u=5, m=1), "unshared"),
                                     (dict(r=4, u=1, m=0), "ratio"), (dict(r=4, u=1, m=40), "larger"),
                                     (dict(r=4, u=1, m=2, rotation="diag"), "rotation")])
def test_invalid_settings_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        PRoLoRALinear(nn.Linear(37, 23), **bad)


def test_rslora_scaling_is_alpha_over_sqrt_rank_and_is_stored():
    from prolora_cli.adapter.config import AdapterConfig

    lora = AdapterConfig.create(16, alpha=16, scaling="rslora", method="lora")
    assert lora.scaling == 4.0 and AdapterConfig.create(16, alpha=16, method="lora").scaling == 1.0
    layer = next(iter(lora.impl.build_layers(lora, {"m": torch.nn.Linear(32, 24, bias=False)}).values()))
    assert layer.scaling == 4.0
    stored = lora.to_dict()
    assert stored["scaling_rule"] == "rslora" and stored["format_version"] == 3  # older prolora refuses it
    assert AdapterConfig.from_dict(stored).scaling == 4.0
    assert AdapterConfig.create(16, method="lora").to_dict()["format_version"] == 2
    for method in ("prolora", "tied-lora", "sora", "prilora"):
        cfg = AdapterConfig.create(8, alpha=16, scaling="rslora", method=method)
        layers = cfg.impl.build_layers(cfg, {"model.layers.0.self_attn.q_proj": torch.nn.Linear(32, 32, bias=False)})
        assert {round(layer.scaling, 6) for layer in layers.values()} == {round(16 / 8 ** 0.5, 6)}, method
