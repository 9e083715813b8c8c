"""Batched generation with the KV cache: greedy or sampled, left padding, stop sequences."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from prolora_cli.data.chat import pad_batch
from prolora_cli.evaluation.tasks.base import cut_at_stop


def end_of_turn_ids(tokenizer) -> list[int]:
    """eos and the chat formats' end-of-turn tokens this tokenizer has."""
    ids = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>")
                                      if t in tokenizer.get_vocab()}
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts: Sequence[str], add_special: bool, max_new_tokens: int, batch_size: int,
             advance: Callable[[int], None], temperature: float = 0.0, samples: int = 1,
             stop: Sequence[str] = (), seed: int = 0) -> list[list[str]]:
    """`samples` continuations of each prompt, each cut at its end of turn or first stop sequence.

    Prompts run longest first in batches of `batch_size` sequences (samples included), so that each
    batch pads little; greedy when temperature is 0, else sampled with a seed per batch (the same
    seed gives the same samples whatever else runs in the process).
    """
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, end_of_turn_ids(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // samples)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    results: list = [None] * len(prompts)
    for number, start in enumerate(range(0, len(order), per_batch)):
        chunk = order[start:start + per_batch]
        ids, mask = pad_batch([encoded[i] for i in chunk], pad, left=True)
        if temperature > 0:
            torch.manual_seed(seed + number)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_return_sequences=samples, stop_strings=list(stop) or None,
                                 tokenizer=tokenizer if stop else None, **sampling)
        rows = out[:, ids.shape[1]:].tolist()
        for j, i in enumerate(chunk):
            texts = []
            for row in rows[j * samples:(j + 1) * samples]:
                cut = next((k for k, t in enumerate(row) if t in eos), len(row))
                texts.append(cut_at_stop(tokenizer.decode(row[:cut], skip_special_tokens=True), tuple(stop)))
            results[i] = texts
        advance(len(chunk))
    return results
