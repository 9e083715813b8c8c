"""Generation with the KV cache: batches of prompts (greedy or sampled, left padding, stop sequences),
and one reply streamed token by token for chat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from prolora_cli.data.chat import pad_batch
from prolora_cli.evaluation.tasks.base import cut_at_stop


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int   # up to and including the end-of-turn token, if it came
    finished: bool           # ended at an end-of-turn token or a stop sequence, not at max_new_tokens


def end_of_turn_ids(tokenizer) -> list[int]:
    """eos and the chat formats' end-of-turn tokens this tokenizer has."""
    ids = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>")
                                      if t in tokenizer.get_vocab()}
    return sorted(i for i in ids if i is not None)


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict:
    """model.generate's arguments for greedy decoding (temperature 0) or plain sampling."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    return {"do_sample": False}


def generate_batches(model, tokenizer, encoded: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                     temperature: float = 0.0, top_p: float = 1.0, samples: int = 1, stop: Sequence[str] = (),
                     seed: int = 0, prepare: Optional[Callable[[list[int]], None]] = None
                     ) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yield (prompt indices, `samples` completions of each) batch by batch.

    Prompts (token ids) run longest first in batches of `batch_size` sequences (samples included), so
    that each batch pads little; `prepare(indices)` runs before each batch (to say which adapter each
    row uses). Greedy when temperature is 0, else sampled with a seed per batch (the same seed gives
    the same samples whatever else runs in the process).
    """
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, end_of_turn_ids(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // samples)
    for number, start in enumerate(range(0, len(order), per_batch)):
        chunk = order[start:start + per_batch]
        ids, mask = pad_batch([encoded[i] for i in chunk], pad, left=True)
        if prepare is not None:
            prepare(chunk)
        if temperature > 0:
            torch.manual_seed(seed + number)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_return_sequences=samples, stop_strings=list(stop) or None,
                                 tokenizer=tokenizer if stop else None, **sampling_kwargs(temperature, top_p))
        rows = out[:, ids.shape[1]:].tolist()
        yield chunk, [[completion(tokenizer, row, len(encoded[i]), eos, stop)
                       for row in rows[j * samples:(j + 1) * samples]] for j, i in enumerate(chunk)]


def completion(tokenizer, row: list[int], prompt_tokens: int, eos: list[int], stop: Sequence[str]) -> Completion:
    """A generated row cut at its end of turn (the token counts) and at its first stop sequence."""
    cut = next((k for k, t in enumerate(row) if t in eos), None)
    kept = row if cut is None else row[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    stopped = cut_at_stop(text, tuple(stop))
    return Completion(stopped, prompt_tokens, len(row) if cut is None else cut + 1,
                      cut is not None or stopped != text)


def generate(model, tokenizer, prompts: Sequence[str], add_special: bool, max_new_tokens: int, batch_size: int,
             advance: Callable[[int], None], temperature: float = 0.0, samples: int = 1,
             stop: Sequence[str] = (), seed: int = 0) -> list[list[str]]:
    """`samples` continuations of each prompt text, each cut at its end of turn or first stop sequence."""
    encoded = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in prompts]
    results: list = [None] * len(prompts)
    for chunk, completions in generate_batches(model, tokenizer, encoded, max_new_tokens, batch_size,
                                               temperature, 1.0, samples, stop, seed):
        for i, texts in zip(chunk, completions):
            results[i] = [c.text for c in texts]
        advance(len(chunk))
    return results


class TextStream(BaseStreamer):
    """Hands decoded text to `emit` as tokens arrive, holding back an end-of-turn token and any bytes
    that do not decode to whole characters yet."""

    def __init__(self, tokenizer, emit: Callable[[str], None], stop_ids: list[int]):
        self.tokenizer, self.emit, self.stop_ids = tokenizer, emit, set(stop_ids)
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        self.tokens += [t for t in value.flatten().tolist() if t not in self.stop_ids]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        self.emit(text[self.shown:])
        self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.emit(text[self.shown:])
        self.shown = len(text)


def stream_reply(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, emit: Callable[[str], None],
                 temperature: float = 0.0, top_p: float = 1.0) -> Completion:
    """One reply to a prompt, its text handed to `emit` piece by piece as it is generated."""
    device = next(model.parameters()).device
    eos = end_of_turn_ids(tokenizer)
    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             streamer=TextStream(tokenizer, emit, eos), **sampling_kwargs(temperature, top_p))
    return completion(tokenizer, out[0, len(prompt_ids):].tolist(), len(prompt_ids), eos, ())
