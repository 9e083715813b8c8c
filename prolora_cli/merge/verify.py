"""Checks on a merged checkpoint before it is renamed into place; none loads the whole model by default.

1. structure: safetensors' own parser reads every written file: same keys and shapes as the base,
   the expected dtypes, an index that agrees with the shards;
2. values: every tensor read back (one at a time) equals what the base says it must be: untouched
   tensors bit for bit, adapted ones (W0 + dW) recomputed in fp32 and rounded to the output dtype;
3. function: a few probe sequences run through base + adapter (unmerged) and through the merged
   weights, in fp32, and their hidden states are compared after every block and at the logits.
   `--verify stream` gives each module its weights only while it runs (memory: one tensor);
   `--verify full` loads both models with plain transformers instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from prolora_cli.adapter.inject import attach
from prolora_cli.errors import VerificationFailed
from prolora_cli.merge.weights import nf4_round_trip, stored_key
from prolora_cli.models.loading import empty_model
from prolora_cli.models.safetensors_files import DTYPES, INDEX_NAME, ITEM_SIZE, SINGLE_NAME, Checkpoint

# Allowed max |logit difference| between the merged model and base + adapter, relative to the largest
# |logit|. fp32 differs only by summation order; fp16/bf16 round W0 + dW once more than the unmerged
# model does, and that rounding adds up over the layers (SmolLM2-135M in bf16: about 3%).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}


def fail(what: str) -> VerificationFailed:
    return VerificationFailed(f"merged model {what}; nothing was written")


def read_index(folder: Path, layout: dict) -> tuple[dict, int | None]:
    """(weight_map, stated total_size) of a written folder; a single file maps every key to itself."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return dict.fromkeys(layout, SINGLE_NAME), None
    written_index = json.loads(index.read_text())
    return written_index["weight_map"], written_index["metadata"]["total_size"]


def check_structure(folder: Path, layout: dict, weight_map: dict, stated_total: int | None) -> None:
    found, total = {}, 0
    for name in sorted(set(weight_map.values())):
        with safe_open(str(folder / name), framework="pt") as f:  # header only: no page is touched
            for key in f.keys():
                piece = f.get_slice(key)
                found[key] = (name, piece.get_dtype(), tuple(piece.get_shape()))
    for key, (dtype, shape) in layout.items():
        if key not in found:
            raise fail(f"lacks tensor {key}")
        name, got_dtype, got_shape = found[key]
        if weight_map.get(key) != name:
            raise fail(f"index puts {key} in {weight_map.get(key)}, but it is in {name}")
        if (got_dtype, got_shape) != (dtype, tuple(shape)):
            raise fail(f"tensor {key} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)}")
        total += torch.Size(shape).numel() * ITEM_SIZE[dtype]
    extra = sorted(set(found) - set(layout))
    if extra:
        raise fail(f"has tensor {extra[0]}, which the base has not")
    if stated_total is not None and stated_total != total:
        raise fail("index states a total_size that is not the sum of its tensors")


def written(file: Path, key: str) -> torch.Tensor:
    """One tensor read back by safetensors itself, its file opened (memory-mapped) for that tensor only."""
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_values(folder: Path, weights, layers: dict, layout: dict, weight_map: dict, say) -> dict:
    """Every tensor against the base: (W0.float() + dW).to(dtype) for adapted ones, else the base's own."""
    adapted = {f"{path}.weight": layer for path, layer in layers.items()}
    counts = {"identical": 0, "converted": 0, "adapted": 0}
    for i, key in enumerate(layout):
        base = weights.read(key)
        if key in adapted:
            wide = torch.promote_types(base.dtype, torch.float32)
            expected = (base.to(wide) + adapted[key].delta_weight().to(wide)).to(weights.out)
            kind = "adapted"
        elif base.is_floating_point() and (base.dtype != weights.out or key in weights.quantized):
            expected, kind = base.to(weights.out), "converted"
        else:
            expected, kind = base, "identical"
        if not same_bits(written(folder / weight_map[key], key), expected):
            raise fail(f"tensor {key} differs from the base" + (" + dW" if kind == "adapted" else ""))
        counts[kind] += 1
        if (i + 1) % 50 == 0:
            say(f"  {i + 1}/{len(layout)} tensors match")
    return counts


def probe_inputs(folder: Path, vocab_size: int) -> dict:
    """A few fixed prompts (if the model has a tokenizer) and fixed random ids, so the check never
    depends on the text alone."""
    texts = ["The capital of France is", "def fibonacci(n):", "PRoLoRA merges into the base weights."]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:16] for t in texts]
    except (OSError, ValueError):
        ids = []
    g = torch.Generator().manual_seed(0)
    ids.append(torch.randint(0, vocab_size, (16,), generator=g).tolist())
    ids = [x for x in ids if x and max(x) < vocab_size]
    width = max(len(x) for x in ids)
    batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return {"input_ids": batch, "attention_mask": mask}


def run_probes(model: nn.Module, probes: dict, read=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden states after each block) in fp32, padded positions zeroed.

    With `read`, the model's weights stay on the meta device and each module gets its tensors
    (read(name), made fp32) just before it runs and loses them just after.
    """
    mask = probes["attention_mask"].unsqueeze(-1)
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    hidden: list[torch.Tensor] = []
    handles = [b.register_forward_hook(
        lambda _m, _a, out: hidden.append((out[0] if isinstance(out, tuple) else out).float() * mask))
        for b in blocks]
    for name, module in model.named_modules() if read else []:
        metas = {n: p for n, p in module.named_parameters(recurse=False) if p.is_meta}
        if metas:
            handles += give_weights_while_running(module, name.replace(".base_layer", ""), metas, read)
    try:
        with torch.no_grad():
            logits = model(**probes).logits.float() * mask
    finally:
        for h in handles:
            h.remove()
    return logits, hidden


def give_weights_while_running(module: nn.Module, prefix: str, metas: dict, read) -> list:
    def load(mod, _args):
        for n in metas:
            mod._parameters[n] = nn.Parameter(read(f"{prefix}.{n}").float(), requires_grad=False)

    def drop(mod, _args, _out):
        mod._parameters.update(metas)

    return [module.register_forward_pre_hook(load), module.register_forward_hook(drop)]


def functional_models(folder: Path, weights, cfg, state, verify: str):
    """(base + adapter unmerged, merged, their weight readers) as `verify` asks: streamed or loaded."""
    if verify == "stream":
        merged_ckpt, merged = Checkpoint(folder), empty_model(folder)
        reference = weights.skeleton  # the adapter's layers are already on it
        return (reference, weights.read), (merged, lambda n: merged_ckpt.read(stored_key(merged, merged_ckpt.entries,
                                                                                         n, folder)))
    base_dtype = getattr(torch, DTYPES[weights.ckpt.dtype() or "fp32"])
    reference = AutoModelForCausalLM.from_pretrained(weights.ckpt.folder, dtype=base_dtype)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if f"{name}.weight" in weights.quantized:
                module.weight.copy_(nf4_round_trip(module.weight))
    reference = reference.float().eval()
    attach(reference, cfg, state)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return (reference, None), (merged, None)


def compare_runs(reference: nn.Module, read_ref, candidate: nn.Module, read_candidate, probes: dict) -> dict:
    """The same probes through both models: the largest logit difference (absolute, and relative to the
    largest logit), the worst block, and how often the top token agrees."""
    want, want_blocks = run_probes(reference, probes, read_ref)
    got, got_blocks = run_probes(candidate, probes, read_candidate)
    block_diffs = [((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
                   for w, g in zip(want_blocks, got_blocks)]
    diff = (got - want).abs().max().item()
    kept = probes["attention_mask"].bool()
    worst = max(range(len(block_diffs)), key=block_diffs.__getitem__) if block_diffs else None
    return {"max_abs_logit_diff": diff, "relative_diff": diff / max(want.abs().max().item(), 1e-12),
            "top1_agreement": (got.argmax(-1) == want.argmax(-1))[kept].float().mean().item(),
            "max_block_relative_diff": block_diffs[worst] if block_diffs else None, "worst_block": worst}


def check_function(folder: Path, weights, cfg, state, verify: str, tolerance: float) -> dict:
    (reference, read_ref), (merged, read_merged) = functional_models(folder, weights, cfg, state, verify)
    stats = compare_runs(reference, read_ref, merged, read_merged, probe_inputs(folder, merged.config.vocab_size))
    if not stats["relative_diff"] <= tolerance:  # also catches NaN
        raise fail(f"differs from base + adapter by {stats['max_abs_logit_diff']:.3g} in logits, "
                   f"{stats['relative_diff']:.3g} of the largest logit (tolerance {tolerance:g})")
    return {**stats, "tolerance": tolerance}


def check_merged(folder: Path, weights, layers: dict, layout: dict, cfg, state, verify: str,
                 tolerance: float | None, dtype: str, say) -> dict:
    """Run the checks `verify` asks for ('stream', 'full' or 'none'); raise VerificationFailed."""
    if verify == "none":
        return {}
    weight_map, stated_total = read_index(folder, layout)
    say("checking the written files' structure")
    check_structure(folder, layout, weight_map, stated_total)
    say("checking every tensor against the base")
    counts = check_values(folder, weights, layers, layout, weight_map, say)
    say(f"running probes through base + adapter and the merged model ({verify})")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    return {"tensors_identical": counts["identical"], "tensors_converted": counts["converted"],
            "tensors_adapted": counts["adapted"],
            **check_function(folder, weights, cfg, state, verify, tolerance)}
