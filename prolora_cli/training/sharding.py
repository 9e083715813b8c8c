"""FSDP for QLoRA: how the model is cut into units, and the adapter's tensors whole again.

`accelerate launch --config_file examples/accelerate/fsdp_qlora.yaml` shards the model with torch's
FSDP (version 1, `use_orig_params`, so frozen and trainable parameters can share a unit). Each decoder
block is one unit, its adapters inside it; an adapter whose tensors are shared across blocks
(Tied-LoRA) cannot be cut that way and is refused. The 4-bit base weights are stored in the compute
dtype (`bnb_4bit_quant_storage`, see models.load_model): FSDP shards only floating-point storage.

Saving and resuming gather one unit at a time (`summon_full_params(unit, recurse=False)`): memory holds
one block whole, never the model, and only the adapter's tensors are kept.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from prolora_cli.adapter.inject import layers_state, load_layers_state
from prolora_cli.errors import UserError
from prolora_cli.methods.base import Method


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate sets this for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def block_classes(model) -> set[type]:
    """The classes FSDP wraps one unit each: the model's own 'do not split' blocks (LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise UserError(f"{type(model).__name__} names no decoder block class; FSDP cannot wrap it")
    return classes


def wrap_policy(model):
    """torch FSDP's auto-wrap policy with one unit per decoder block (what the accelerate config's
    TRANSFORMER_BASED_WRAP builds from fsdp_transformer_layer_cls_to_wrap)."""
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=block_classes(model))


def check_shardable(cfg, layers: dict) -> None:
    """Refuse, before any work, what FSDP cannot shard: tensors shared across blocks, and a method that
    rebuilds its layers at the end of training (it would read sharded parameters)."""
    shared = sorted({key for layer in layers.values() for key in layer.shared_state()})
    if shared:
        raise UserError(f"FSDP cannot shard this adapter: {shared[0]} is shared by modules of different "
                        f"blocks; train it with DDP (torchrun) instead")
    if type(cfg.impl).finalize is not Method.finalize:
        raise UserError(f"FSDP cannot run {cfg.impl.title}: it rebuilds its layers after training; train it "
                        f"with DDP (torchrun) instead")


def units(model) -> list:
    return FSDP.fsdp_modules(model)


@contextmanager
def whole(unit, writeback: bool):
    """One FSDP unit's own parameters (not its sub-units') unsharded, on every process."""
    with FSDP.summon_full_params(unit, recurse=False, writeback=writeback):
        yield


def param_shapes(layers: dict) -> dict:
    """Each layer's own parameter shapes, taken before FSDP flattens and shards them."""
    return {path: {n: tuple(p.shape) for n, p in layer.named_parameters(recurse=False)}
            for path, layer in layers.items()}


def each_whole_layer(model, layers: dict, shapes: dict, writeback: bool = False):
    """Yield (path, layer) for every adapter layer while its tensors are whole: at once without FSDP,
    else unit by unit (a layer is whole once its parameters have their shapes from before sharding).
    Every process must run the whole loop: unsharding is collective."""
    found = units(model)
    if not found:
        yield from layers.items()
        return
    left = dict(layers)
    for unit in found:
        with whole(unit, writeback):
            for path, layer in list(left.items()):
                if all(tuple(p.shape) == shapes[path][n] for n, p in layer.named_parameters(recurse=False)):
                    yield path, layer
                    del left[path]
    if left:
        raise RuntimeError(f"FSDP: the tensors of {next(iter(left))} were never whole")


def full_adapter_state(model, layers: dict, shapes: dict) -> dict:
    """Every adapter tensor, whole and on the CPU, on every process (only the adapter is kept)."""
    state = {}
    for path, layer in each_whole_layer(model, layers, shapes):
        state.update({k: v.detach().to("cpu", copy=True) for k, v in layers_state({path: layer}).items()})
    return state


def load_full_adapter_state(model, layers: dict, shapes: dict, state: dict) -> None:
    """The reverse, for resume: each unit whole in turn, its layers' tensors copied in, sharded again."""
    for path, layer in each_whole_layer(model, layers, shapes, writeback=True):
        prefix = f"{path}."
        load_layers_state({path: layer}, {k: v for k, v in state.items() if k.startswith(prefix)})
