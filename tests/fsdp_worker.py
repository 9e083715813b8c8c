"""Run under torchrun by test_distributed.py: torch FSDP (v1, gloo, CPU) over a tiny LLaMA with PRoLoRA,
wrapped by prolora's policy. Rank 0 writes what it found to the JSON file named by argv[1]."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

from prolora_cli.adapter.config import AdapterConfig  # noqa: E402
from prolora_cli.adapter.inject import adapter_layers, inject, layers_state  # noqa: E402
from prolora_cli.training.sharding import (  # noqa: E402
    each_whole_layer,
    full_adapter_state,
    load_full_adapter_state,
    param_shapes,
    units,
    whole,
    wrap_policy,
)


def step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
                p.grad = None


def main() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(seed=0, num_hidden_layers=3)
    inject(model, AdapterConfig.create(8, unshared=2, share=3, dropout=0.0))
    layers = adapter_layers(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            for t in (layer.B_shared, layer.B_unshared):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    reference = copy.deepcopy(model)
    shapes = param_shapes(layers)

    model = FSDP(model, auto_wrap_policy=wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu"))
    blocks = [u for u in units(model) if type(u.module).__name__ == "LlamaDecoderLayer"]
    # Which unit makes each layer whole: it must be the unit of its own block.
    whole_under = {}
    for unit in units(model):
        with whole(unit, writeback=False):
            for path, layer in layers.items():
                if all(tuple(p.shape) == shapes[path][n] for n, p in layer.named_parameters(recurse=False)):
                    whole_under.setdefault(path, type(unit.module).__name__ + (
                        f".{blocks.index(unit)}" if unit in blocks else ""))
    assert len(dict(each_whole_layer(model, layers, shapes))) == len(layers)

    ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    share = ids.shape[0] // world
    step(model, ids[rank * share:(rank + 1) * share])  # FSDP averages the gradients of the shares
    step(reference, ids)                                 # equal lengths: the mean of means is the mean
    gathered = full_adapter_state(model, layers, shapes)
    expected = layers_state(adapter_layers(reference))
    diffs = {k: ((gathered[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in expected.items() if v.numel()}

    altered = {k: v + 1.0 for k, v in gathered.items()}
    load_full_adapter_state(model, layers, shapes, altered)
    round_trip = full_adapter_state(model, layers, shapes)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({
            "world": world, "blocks": len(blocks), "units": len(units(model)),
            "layers": len(layers), "whole_under": whole_under,
            "keys_equal": sorted(gathered) == sorted(expected), "max_relative_diff": max(diffs.values()),
            "round_trip_exact": all(torch.equal(round_trip[k], altered[k]) for k in altered)}))
    # Both ranks past their last collective before either tears gloo down: a rank that destroys the
    # group while its peer's work is still in flight makes the peer abort ("terminate called without
    # an active exception"), about one run in ten here.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
