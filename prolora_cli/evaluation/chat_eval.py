"""Evaluate a base model, adapters on it, or a merged model on chat JSONL.

Metrics:
- loss: token-weighted cross-entropy over assistant tokens (the masking of training), and perplexity.
- exact-match / f1: greedy generation of the last assistant turn from the conversation before it,
  compared with `answers` (or the reference reply) after SQuAD's normalisation (tasks/base.py).
- choice: for examples with `choices`, the option with the highest log-likelihood per token
  (`choice_acc_token`) and per character (`choice_acc_norm`, lm-eval's acc_norm); accuracy against
  `answers[0]` (or the reference reply).

`compare_models` is the loop both this and `eval --task` (task_eval.py) run: one base, loaded once,
evaluated alone and with each adapter.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from prolora_cli.adapter.files import WEIGHTS_NAME, read_config, read_tensors
from prolora_cli.adapter.inject import attach, count_trainable, remove_adapters
from prolora_cli.data.chat import IGNORE, PLAIN, encode, pad_batch, render_prompt, resolve_chat_format
from prolora_cli.data.formats import BadRecord
from prolora_cli.data.sources import read_jsonl
from prolora_cli.errors import UserError
from prolora_cli.evaluation.tasks.base import exact_match, token_f1
from prolora_cli.inference.generation import generate
from prolora_cli.models.loading import load_model

METRICS = ("loss", "exact-match", "choice")
CHOICE_METRICS = ("choice_acc_token", "choice_acc_norm")


@dataclass
class EvalArgs:
    data: Optional[Path] = None
    model: Optional[str] = None
    adapters: list[Path] = field(default_factory=list)
    with_base: bool = False
    metrics: tuple[str, ...] = METRICS
    quant: str = "nf4"
    chat_format: str = "auto"
    max_seq_len: int = 512
    max_new_tokens: Optional[int] = None  # default: 32 for --data, the task's own for --task
    batch_size: int = 8
    limit: Optional[int] = None
    seed: int = 0
    by_task: bool = False
    skip_bad_lines: bool = False
    device: Optional[str] = None
    # eval --task (task_eval.py); None means the task's default
    task: Optional[str] = None
    task_data: Optional[Path] = None
    shots: Optional[int] = None
    cot: Optional[bool] = None
    temperature: Optional[float] = None
    samples: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    timeout: Optional[float] = None
    allow_code_execution: bool = False

    @classmethod
    def from_flags(cls, values: dict) -> "EvalArgs":
        """From `prolora eval`'s parsed flags, by name (--adapter is repeated: `adapters`; --metrics is
        comma-separated)."""
        own = {f.name: values[f.name] for f in fields(cls) if f.name in values and f.name not in ("metrics", "stop")}
        return cls(**own, adapters=list(values.get("adapter") or []), stop=list(values.get("stop") or []),
                   metrics=tuple(m.strip() for m in values.get("metrics", ",".join(METRICS)).split(",") if m.strip()))


def split_last_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation before the last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def references(record: dict) -> list[str]:
    return record.get("answers") or [split_last_turn(record["messages"])[1]]


def select(records: list[dict], limit: Optional[int], seed: int) -> list[dict]:
    """A reproducible subsample, kept in file order."""
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise UserError("--limit must be >= 1")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def token_losses(model, encoded: list[dict], pad_id: int, batch_size: int, advance: Callable[[int], None]):
    """Per example: (sum of cross-entropy over trained tokens, number of trained tokens).

    Examples are batched in length order (little padding), and the vocabulary projection runs only
    at the positions that predict a trained token: on a 49k vocabulary that head is a fifth of the
    compute and most of the memory of a full-logits pass.
    """
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out: list = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([encoded[i]["input_ids"] for i in chunk], pad_id, left=False)
        labels, _ = pad_batch([encoded[i]["labels"] for i in chunk], IGNORE, left=False)
        target = labels[:, 1:].to(device)
        trained = target != IGNORE
        with torch.no_grad():
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            logits = head(hidden[:, :-1][trained]).float()
        ce = F.cross_entropy(logits, target[trained], reduction="none")
        rows = trained.nonzero()[:, 0]
        sums = torch.zeros(len(chunk), device=ce.device).index_add_(0, rows, ce)
        counts = trained.sum(1)
        for j, i in enumerate(chunk):
            out[i] = (sums[j].item(), int(counts[j]))
        advance(len(chunk))
    return out


def option_losses(model, options: list[dict], pad_id: int) -> list[tuple[float, int]]:
    """token_losses for the answer options of one question, running their shared prompt once.

    The options share every token up to the reply, so the prompt goes through the model once and
    its KV cache is repeated for the options; only the few reply tokens are computed per option.
    The prefix is found on the token ids, so any tokenizer merge at the boundary stays exact.
    """
    seqs = [o["input_ids"] for o in options]
    common = 0
    while all(len(s) > common + 1 for s in seqs) and len({s[common] for s in seqs}) == 1:
        common += 1
    first_trained = min(next((i for i, t in enumerate(o["labels"]) if t != IGNORE), len(o["labels"]))
                        for o in options)
    # Position p predicts token p + 1, so the prefix ends before the position that predicts the
    # first trained token; everything from there on runs per option.
    prefix = min(common, first_trained) - 1
    if prefix < 1:
        return token_losses(model, options, pad_id, len(options), lambda _n: None)
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    tails = [s[prefix:] for s in seqs]
    ids, tail_mask = pad_batch(tails, pad_id, left=False)
    labels, _ = pad_batch([o["labels"][prefix:] for o in options], IGNORE, left=False)
    mask = torch.cat([torch.ones(len(options), prefix, dtype=torch.long), tail_mask], dim=1)
    with torch.no_grad():
        cache = decoder(input_ids=torch.tensor([seqs[0][:prefix]], device=device), use_cache=True).cache
        cache.batch_repeat_interleave(len(options))
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache,
                         use_cache=True).last_hidden_state
        target = labels[:, 1:].to(device)
        trained = target != IGNORE
        ce = F.cross_entropy(head(hidden[:, :-1][trained]).float(), target[trained], reduction="none")
    sums = torch.zeros(len(options), device=ce.device).index_add_(0, trained.nonzero()[:, 0], ce)
    return [(sums[j].item(), int(n)) for j, n in enumerate(trained.sum(1).tolist())]


def evaluate_model(model, tokenizer, records: list[dict], fmt: str, args: EvalArgs,
                   advance: Callable[[int], None]) -> tuple[dict, list[dict]]:
    """Every requested metric on one model; returns (summary, per-example rows)."""
    model.eval()
    rows = [{"line": r["line"], "task": r.get("task"), "references": references(r)} for r in records]

    def enc(messages, record):
        try:
            return encode(messages, tokenizer, fmt, args.max_seq_len)
        except BadRecord as e:
            raise UserError(f"{args.data}, line {record['line']}: {e}") from None

    summary: dict = {}
    if "loss" in args.metrics:
        losses = token_losses(model, [enc(r["messages"], r) for r in records], tokenizer.pad_token_id,
                              args.batch_size, advance)
        for row, (ce, n) in zip(rows, losses):
            row.update(loss_sum=ce, tokens=n)
        total, count = sum(ce for ce, _ in losses), sum(n for _, n in losses)
        summary["loss"] = total / count if count else float("nan")
        summary["perplexity"] = math.exp(summary["loss"]) if count else float("nan")
        summary["loss_tokens"] = count
    if "exact-match" in args.metrics:
        prompts = [render_prompt(split_last_turn(r["messages"])[0], tokenizer, fmt) for r in records]
        predictions = generate(model, tokenizer, prompts, fmt == "tulu", args.max_new_tokens or 32,
                               args.batch_size, advance)
        for row, (pred,) in zip(rows, predictions):
            row["prediction"] = pred.strip()
            row["exact_match"] = exact_match(pred, row["references"])
            row["f1"] = token_f1(pred, row["references"])
        summary["exact_match"] = sum(r["exact_match"] for r in rows) / len(rows)
        summary["f1"] = sum(r["f1"] for r in rows) / len(rows)
    if "choice" in args.metrics:
        with_choices = [(i, r) for i, r in enumerate(records) if r.get("choices")]
        for i, record in with_choices:
            before = split_last_turn(record["messages"])[0]
            options = [enc(before + [{"role": "assistant", "content": c}], record) for c in record["choices"]]
            scores = option_losses(model, options, tokenizer.pad_token_id)
            # Log-likelihood per token and per character (lm-eval's acc_norm), so that long options
            # are not penalised for their length.
            per_token = max(zip(record["choices"], scores), key=lambda cs: -cs[1][0] / max(cs[1][1], 1))[0]
            per_char = max(zip(record["choices"], scores), key=lambda cs: -cs[1][0] / max(len(cs[0]), 1))[0]
            rows[i].update(choice=per_token, choice_norm=per_char,
                           choice_acc_token=float(per_token == rows[i]["references"][0]),
                           choice_acc_norm=float(per_char == rows[i]["references"][0]))
            advance(1)
        for key in CHOICE_METRICS:
            graded = [rows[i][key] for i, _ in with_choices]
            summary[key] = sum(graded) / len(graded) if graded else None
        summary["choice_examples"] = len(with_choices)
    summary["examples"] = len(records)
    if args.by_task:
        summary["by_task"] = by_task(rows)
    return summary, rows


def by_task(rows: list[dict]) -> dict:
    tasks: dict[str, list[dict]] = {}
    for row in rows:
        tasks.setdefault(row["task"] or "(none)", []).append(row)
    out = {}
    for task, group in sorted(tasks.items()):
        s: dict = {"examples": len(group)}
        tokens = sum(r.get("tokens", 0) for r in group)
        if tokens:
            s["loss"] = sum(r["loss_sum"] for r in group) / tokens
        if any("exact_match" in r for r in group):
            s["exact_match"] = sum(r["exact_match"] for r in group) / len(group)
            s["f1"] = sum(r["f1"] for r in group) / len(group)
        for key in CHOICE_METRICS:
            graded = [r[key] for r in group if key in r]
            if graded:
                s[key] = sum(graded) / len(graded)
        out[task] = s
    return out


def run_eval(args: EvalArgs, progress) -> dict:
    """Evaluate the base (if asked or alone) and every adapter on the same chat examples.

    `progress(label, total)` returns an `advance(n)` callable for that model's pass.
    """
    unknown = set(args.metrics) - set(METRICS)
    if unknown:
        raise UserError(f"unknown metric {sorted(unknown)[0]!r}; choose from {', '.join(METRICS)}")
    if (args.max_new_tokens or 1) < 1:
        raise UserError("--max-new-tokens must be >= 1")
    records, skipped = read_jsonl(args.data, args.skip_bad_lines)
    records = select(records, args.limit, args.seed)
    per_pass = len(records) * (("loss" in args.metrics) + ("exact-match" in args.metrics)) + \
        sum(1 for r in records if r.get("choices")) * ("choice" in args.metrics)
    report = compare_models(args, progress, per_pass, lambda model, tokenizer, fmt, advance: evaluate_model(
        model, tokenizer, records, fmt, args, advance))
    return {"data": str(args.data), "examples": len(records), "skipped_lines": skipped,
            "metrics": list(args.metrics), **report}


def compare_models(args: EvalArgs, progress, per_pass: int, evaluate, plain_ok: bool = False) -> dict:
    """Load the base once; run `evaluate(model, tokenizer, chat_format, advance) -> (summary, rows)` on it
    (when asked, or when there is no adapter) and with each adapter attached in turn."""
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    plain = plain_ok and args.chat_format == PLAIN
    # Read every adapter before loading the model: a bad folder fails in a second.
    adapters = [(path, read_config(path), read_tensors(path)) for path in args.adapters]
    model_name = args.model or (adapters[0][1].base_model if adapters else None)
    model, tokenizer, model_id = load_model(model_name, args.quant, device=args.device)
    fmt = PLAIN if plain else resolve_chat_format(tokenizer, args.chat_format)

    results, predictions = [], []  # predictions: (name, rows), in the order of results
    if not adapters or args.with_base:
        summary, rows = evaluate(model, tokenizer, fmt, progress("base", per_pass))
        results.append({"name": "base", "adapter": None, "trainable_params": 0, "bytes": 0, **summary})
        predictions.append(("base", rows))
    for path, cfg, state in adapters:
        attach(model, cfg, state)
        trainable, _ = count_trainable(model)
        summary, rows = evaluate(model, tokenizer, fmt, progress(str(path), per_pass))
        results.append({"name": str(path), "adapter": str(path), "trainable_params": trainable,
                        "bytes": (Path(path) / WEIGHTS_NAME).stat().st_size, **summary})
        predictions.append((str(path), rows))
        remove_adapters(model)
    return {"model": model_id, "chat_format": fmt, "results": results, "predictions": predictions}
