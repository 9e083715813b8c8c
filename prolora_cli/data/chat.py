"""Conversations rendered for a model (Tulu or the tokenizer's chat template), with assistant-only labels.

Labels come from character spans: the rendered text is tokenized once with offsets, and a token is
trained on when it overlaps an assistant span (its content and end-of-turn token). That stays right
for any fast tokenizer, whatever it merges across turn boundaries.
"""

from __future__ import annotations

import gc

import torch
from datasets import Dataset

from prolora_cli.data.formats import BadRecord
from prolora_cli.errors import UserError

CHAT_FORMATS = ("auto", "tulu", "template")
PLAIN = "plain"  # eval --task only: no chat format, the prompt as a base model sees it
IGNORE = -100  # the label value transformers' loss skips


def resolve_chat_format(tokenizer, chat_format: str) -> str:
    if chat_format not in CHAT_FORMATS:
        raise UserError(f"--chat-format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    if chat_format == "auto":
        return "template" if getattr(tokenizer, "chat_template", None) else "tulu"
    if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template; use --chat-format tulu")
    return chat_format


def _tulu(messages, eos: str, generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """open-instruct's format: <|role|>\\n{content}\\n, assistant turns end with eos. With
    generation_prompt, the text ends where the next assistant reply begins."""
    text, spans = "", []
    for m in messages:
        text += f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += m["content"] + "\n"
    if generation_prompt:
        return text + "<|assistant|>\n", spans
    # Stripping the whole string, as the paper's code does, only ever trims the final newline.
    return text.strip(), spans


def _template(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The tokenizer's own chat template; assistant spans found by rendering growing prefixes."""
    def render(msgs, prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise BadRecord("the tokenizer's chat template is not prefix-stable here; "
                            "use --chat-format tulu")
        spans.append((len(before), len(upto.rstrip())))  # content + end-of-turn token
    return full, spans


def render(messages, tokenizer, chat_format: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one string, and the character spans the loss is taken on."""
    if chat_format == "tulu":
        return _tulu(messages, tokenizer.eos_token or "")
    return _template(messages, tokenizer)


def render_prompt(messages, tokenizer, chat_format: str) -> str:
    """The conversation so far, ending where the assistant's reply begins (for generation)."""
    if chat_format == "tulu":
        return _tulu(messages, tokenizer.eos_token or "", generation_prompt=True)[0]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(messages, tokenizer, chat_format: str) -> list[int]:
    """The token ids that prompt a model to answer `messages`: the conversation as training renders it,
    up to where the assistant's reply begins, with special tokens added as training adds them."""
    text = render_prompt(messages, tokenizer, chat_format)
    return tokenizer(text, add_special_tokens=chat_format == "tulu")["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False):
    """Token lists -> (ids, attention mask) tensors, padded on the right (or the left, to generate)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def encode(messages, tokenizer, chat_format: str, max_seq_len: int) -> dict:
    """input_ids and labels (IGNORE outside assistant spans), truncated to max_seq_len."""
    text, spans = render(messages, tokenizer, chat_format)
    # Tulu text is plain, so the tokenizer adds its BOS; a template writes its own special tokens.
    enc = tokenizer(text, add_special_tokens=chat_format == "tulu", return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        trained = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(tok if trained else IGNORE)
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation opened by `system_prompt`, unless it has a system turn of its own (or none is given)."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def tokenize_records(records, tokenizer, chat_format: str, max_seq_len: int, source: str = "data",
                     num_proc: int = 1, system_prompt: str | None = None, cache_file: str | None = None):
    """input_ids and labels of every record, with each example's `length` and `trained` token count as
    columns (so that counts, statistics and the sampler read arrays, not lists); examples left with no
    trained token are dropped. `records`: a dataset (or list) of chat records with their line or row.
    `system_prompt` opens every conversation that has no system turn (train --system-prompt). With
    `cache_file` the result is written there and memory-mapped from it.

    Returns (dataset, dropped_count).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("prolora needs a fast (Rust) tokenizer to place labels exactly")
    if isinstance(records, list):
        records = Dataset.from_list(records)
    unit = "line" if "line" in records.column_names else "row"

    def one(record):
        try:
            out = encode(with_system(record["messages"], system_prompt), tokenizer, chat_format, max_seq_len)
        except BadRecord as e:
            raise UserError(f"{source}, {unit} {record[unit]}: {e}") from None
        except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, ValueError)
            raise UserError(f"{source}, {unit} {record[unit]}: cannot render: {e}") from None
        return {**out, "length": len(out["input_ids"]), "trained": sum(label != IGNORE for label in out["labels"])}

    # Processes pay for themselves only on larger data: one per 10,000 examples, up to num_proc.
    procs = min(num_proc, len(records) // 10_000)
    # Forked workers share the parent's memory until they write to it; a full garbage collection in a
    # worker writes to every object it inherited (hundreds of MiB with torch loaded): frozen, they are skipped.
    gc.freeze()
    try:
        ds = records.map(one, remove_columns=records.column_names, num_proc=procs if procs > 1 else None)
    finally:
        gc.unfreeze()
    kept = ds.filter(lambda trained: [n > 0 for n in trained], input_columns="trained", batched=True)
    if cache_file is not None:
        kept = kept.flatten_indices(cache_file_name=cache_file)
    return kept, len(ds) - len(kept)


def column(examples, name: str):
    """One numeric column of tokenized examples (`length`, `trained`) as a NumPy array, read from Arrow
    without touching the tokens."""
    return examples.with_format("numpy", columns=[name])[:][name]
