"""Chat data: strict reading in the shapes people have, rendering (Tulu or the tokenizer's template)
and assistant-only labels.

Shapes (DATA_FORMATS), detected per record unless --data-format names one: OpenAI `messages`
(role/content), ShareGPT `conversations` (from/value; human/gpt/system), Alpaca `instruction` + optional
`input` -> `output`, and `prompt` + `completion`. Files: JSONL read line by line (errors name the line),
and JSON, Parquet, CSV or a `datasets` folder read through `datasets` (errors name the row).

Labels come from character spans: the rendered text is tokenized once with offsets, and a token is
trained on when it overlaps an assistant span (its content and end-of-turn token). That stays right
for any fast tokenizer, whatever it merges across turn boundaries.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from prolora_cli.errors import UserError

ROLES = ("system", "user", "assistant")
CHAT_FORMATS = ("auto", "tulu", "template")
PLAIN = "plain"  # eval --task only: no chat format, the prompt as a base model sees it
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt-completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# What each shape needs to be recognised, in the order auto tries them.
SHAPE_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
              "prompt-completion": ("prompt", "completion")}
IGNORE = -100  # the label value transformers' loss skips


class BadRecord(ValueError):
    """One line's problem; the reader adds the file and line number."""


def detect_format(obj) -> str | None:
    """The shape of one record, or None."""
    if isinstance(obj, dict):
        for shape, keys in SHAPE_KEYS.items():
            if keys[0] in obj:
                return shape
    return None


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord("\"conversations\" must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise BadRecord(f"turn {i} has no \"from\"")
        if turn["from"] not in SHAREGPT_ROLES:
            raise BadRecord(f"turn {i} has unknown role {turn['from']!r} (use {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {i} value must be a string")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _alpaca(obj) -> list[dict]:
    fields = {k: obj.get(k) for k in ("instruction", "input", "output")}
    if not isinstance(fields["instruction"], str) or not isinstance(fields["output"], str):
        raise BadRecord("\"instruction\" and \"output\" must both be strings")
    if fields["input"] not in (None, "") and not isinstance(fields["input"], str):
        raise BadRecord("\"input\" must be a string")
    prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    system = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) and obj["system"] else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]


def parse_record(obj, data_format: str = "auto") -> dict:
    """A JSON value -> {"messages": [...], plus kept extras}, or BadRecord naming the problem."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    shape = detect_format(obj) if data_format == "auto" else data_format
    if shape is not None and data_format != "auto" and not all(k in obj for k in SHAPE_KEYS[shape][:1]):
        raise BadRecord(f"not a {shape} record: needs {' and '.join(repr(k) for k in SHAPE_KEYS[shape])}")
    if shape == "sharegpt":
        messages = _sharegpt(obj["conversations"])
    elif shape == "alpaca":
        messages = _alpaca(obj)
    elif "messages" in obj and shape == "messages":
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("\"messages\" must be a non-empty list")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise BadRecord(f"message {i} is not an object")
            if "role" not in msg:
                raise BadRecord(f"message {i} has no \"role\"")
            if msg["role"] not in ROLES:
                raise BadRecord(f"message {i} has unknown role {msg['role']!r} (use {', '.join(ROLES)})")
            if not isinstance(msg.get("content"), str):
                raise BadRecord(f"message {i} content must be a string")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif shape == "prompt-completion" or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise BadRecord("\"prompt\" and \"completion\" must both be strings")
        messages = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]}]
    else:
        raise BadRecord("needs \"messages\", \"conversations\" (ShareGPT), \"instruction\" and \"output\" "
                        "(Alpaca), or \"prompt\" and \"completion\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message")
    record = {"messages": messages, "format": shape or "prompt-completion"}
    for key in ("answers", "choices"):  # used by eval
        if key in obj:
            value = obj[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRecord(f"\"{key}\" must be a list of strings")
            record[key] = value
    if "task" in obj:
        record["task"] = str(obj["task"])
    return record


def where(record: dict) -> str:
    """Where a record came from, for messages: its line (JSONL) or row (other files)."""
    return f"line {record['line']}" if "line" in record else f"row {record['row']}"


def read_data(path: str | Path, skip_bad_lines: bool = False, data_format: str = "auto",
              split: str = "train") -> tuple:
    """(records, how many bad ones were skipped) of a chat data source (see the module docstring):
    a list for JSONL, a memory-mapped dataset for the rest. Each record says which shape it was read as
    ("format") and where it was ("line" or "row")."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if is_hub_id(path):
        return table_records(str(path), load_hub(str(path), split), data_format, skip_bad_lines)
    path = Path(path)
    if path.suffix == ".jsonl":
        return collect(path, "line", jsonl_objects(path), data_format, skip_bad_lines)
    return table_records(str(path), load_table(path), data_format, skip_bad_lines)


def table_records(source: str, table, data_format: str, skip_bad: bool):
    """A table's rows as chat records, converted and checked by `datasets.map`: the result is another
    memory-mapped dataset (messages, format, row), never a Python list. Its temporary files go to a
    scratch folder, not beside the user's data (datasets' caching is off meanwhile)."""
    import datasets

    def convert(row, i):
        try:
            record = parse_record(dict(row), data_format)  # map hands over a lazy mapping
            return {"messages": record["messages"], "format": record["format"], "row": i, "bad": ""}
        except BadRecord as e:
            return {"messages": [], "format": "", "row": i, "bad": str(e)}

    caching = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        ds = table.map(convert, with_indices=True, remove_columns=table.column_names)
        bad = ds.filter(lambda problem: problem != "", input_columns="bad")
        if len(bad) and not skip_bad:
            raise UserError(f"{source}, row {bad[0]['row']}: {bad[0]['bad']} "
                            f"(fix it, or pass --skip-bad-lines to skip such rows)")
        good = ds.filter(lambda problem: problem == "", input_columns="bad").remove_columns("bad")
    finally:
        if caching:
            datasets.enable_caching()
    if len(good) == 0:
        raise UserError(f"{source}: no examples" + (f" ({len(bad)} bad rows skipped)" if len(bad) else ""))
    return good, len(bad)


def is_hub_id(path) -> bool:
    """'org/name' that is no local path: a dataset on the Hugging Face hub (read from the local cache)."""
    text = str(path)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~")) \
        and not Path(text).suffix


def load_hub(name: str, split: str):
    """A hub dataset from the local cache only (`huggingface-cli download --repo-type dataset` or an
    earlier load_dataset fills it): a training run never waits on the network."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - not cached, or a bad split: both mean "not readable here"
        raise UserError(f"{name}: no such local file, and no cached hub dataset of that name with split "
                        f"{split!r} ({str(e).splitlines()[0]})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """A chat JSONL file's records (eval reads JSONL only)."""
    return collect(Path(path), "line", jsonl_objects(Path(path)), "auto", skip_bad_lines)


def collect(path: Path, unit: str, objects, data_format: str, skip_bad: bool) -> tuple[list[dict], int]:
    """Parse (position, object) pairs; a bad one stops with one line naming the file and position
    (or is skipped and counted). An object may be the BadRecord its line already raised."""
    records, skipped = [], 0
    for position, obj in objects:
        try:
            if isinstance(obj, BadRecord):
                raise obj
            record = parse_record(obj, data_format)
        except BadRecord as e:
            if not skip_bad:
                raise UserError(f"{path}, {unit} {position}: {e} "
                                f"(fix it, or pass --skip-bad-lines to skip such {unit}s)") from None
            skipped += 1
            continue
        record[unit] = position
        records.append(record)
    if not records:
        raise UserError(f"{path}: no examples" + (f" ({skipped} bad {unit}s skipped)" if skipped else ""))
    return records, skipped


def jsonl_objects(path: Path, strict: bool = False):
    """(line number, parsed JSON or the BadRecord saying why not) for each non-blank line; `strict`
    stops at the first bad line with a UserError instead. A `.gz` file is read through gzip (HumanEval
    ships that way)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # Windows editors start a UTF-8 file with a byte-order mark.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not text.strip():
                    continue
                yield lineno, json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad = BadRecord("not valid UTF-8" if isinstance(e, UnicodeDecodeError)
                                else f"malformed JSON ({e.msg} at column {e.colno})")
                if strict:
                    raise UserError(f"{path}, line {lineno}: {bad}") from None
                yield lineno, bad


def load_table(path: Path):
    """JSON, Parquet, CSV or a `datasets.save_to_disk` folder, through `datasets` (memory-mapped)."""
    import datasets

    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise UserError(f"{path}: a folder that is not a saved dataset (no dataset_info.json)")
        loaded = datasets.load_from_disk(str(path))
        return loaded[next(iter(loaded))] if isinstance(loaded, datasets.DatasetDict) else loaded
    builders = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if path.suffix not in builders:
        raise UserError(f"{path}: unknown data file type (use .jsonl, .json, .parquet, .csv or a saved dataset folder)")
    try:
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"{path}: cannot read it as {builders[path.suffix].upper()} ({str(e).splitlines()[0]})") from None


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


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool = False):
    """Token lists -> (ids, attention mask) tensors, padded on the right (or the left, to generate)."""
    import torch

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


def tokenize_records(records, tokenizer, chat_format: str, max_seq_len: int,
                     source: str = "data", num_proc: int = 1):
    """A datasets.Dataset of input_ids/labels; examples left with no trained token are dropped.

    Returns (dataset, dropped_count).
    """
    from datasets import Dataset

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("prolora needs a fast (Rust) tokenizer to place labels exactly")

    def one(record):
        try:
            return encode(record["messages"], tokenizer, chat_format, max_seq_len)
        except BadRecord as e:
            raise UserError(f"{source}, {record['at']}: {e}") from None
        except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, ValueError)
            raise UserError(f"{source}, {record['at']}: cannot render: {e}") from None

    if isinstance(records, list):  # JSONL, read line by line
        ds = Dataset.from_list([{"messages": r["messages"], "at": where(r)} for r in records])
    else:  # a table_records dataset
        ds = records.map(lambda row: {"at": f"row {row}"}, input_columns="row", remove_columns=["row", "format"])
    ds = ds.map(one, remove_columns=["messages"], desc=None, num_proc=num_proc if num_proc > 1 else None)
    kept = ds.filter(lambda ex: any(label != IGNORE for label in ex["labels"]))
    return kept, len(ds) - len(kept)


def describe_formats(records) -> str:
    """'alpaca' or '3 messages, 2 sharegpt': what --data-format auto found (records: a list or a dataset)."""
    from collections import Counter

    counts = Counter(r["format"] for r in records) if isinstance(records, list) else Counter(records["format"])
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{n} {f}" for f, n in counts.most_common())
