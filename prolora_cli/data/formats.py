"""The shapes chat records come in, each read into one form: {"messages": [...], "format": shape, ...}.

Shapes (DATA_FORMATS), detected per record unless --data-format names one: OpenAI `messages`
(role/content), ShareGPT `conversations` (from/value; human/gpt/system), Alpaca `instruction` + optional
`input` -> `output`, and `prompt` + `completion`. A record that fits none, or fits badly, is a
BadRecord naming what is wrong; the reader adds where it was.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt-completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# What each shape needs to be recognised, in the order auto tries them.
SHAPE_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
              "prompt-completion": ("prompt", "completion")}


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


def _alpaca(obj, prompt_only: bool) -> list[dict]:
    fields = {k: obj.get(k) for k in ("instruction", "input", "output")}
    answered = not (prompt_only and fields["output"] is None)
    if not isinstance(fields["instruction"], str) or (answered and not isinstance(fields["output"], str)):
        raise BadRecord("\"instruction\" and \"output\" must both be strings")
    if fields["input"] not in (None, "") and not isinstance(fields["input"], str):
        raise BadRecord("\"input\" must be a string")
    prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    system = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) and obj["system"] else []
    answer = [{"role": "assistant", "content": fields["output"]}] if answered else []
    return [*system, {"role": "user", "content": prompt}, *answer]


def parse_record(obj, data_format: str = "auto", prompt_only: bool = False) -> dict:
    """A JSON value -> {"messages": [...], plus kept extras}, or BadRecord naming the problem.

    `prompt_only` (generation) also takes records with no answer (no assistant turn, a prompt without
    a completion, an instruction without an output) and keeps an "adapter" field (a name, or null for
    the base model)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    shape = detect_format(obj) if data_format == "auto" else data_format
    if shape is not None and data_format != "auto" and not all(k in obj for k in SHAPE_KEYS[shape][:1]):
        raise BadRecord(f"not a {shape} record: needs {' and '.join(repr(k) for k in SHAPE_KEYS[shape])}")
    if shape == "sharegpt":
        messages = _sharegpt(obj["conversations"])
    elif shape == "alpaca":
        messages = _alpaca(obj, prompt_only)
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
        answered = not (prompt_only and obj.get("completion") is None)
        if not isinstance(obj.get("prompt"), str) or (answered and not isinstance(obj.get("completion"), str)):
            raise BadRecord("\"prompt\" and \"completion\" must both be strings")
        messages = [{"role": "user", "content": obj["prompt"]}]
        if answered:
            messages.append({"role": "assistant", "content": obj["completion"]})
    else:
        raise BadRecord("needs \"messages\", \"conversations\" (ShareGPT), \"instruction\" and \"output\" "
                        "(Alpaca), or \"prompt\" and \"completion\"")
    if not prompt_only and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message")
    record = {"messages": messages, "format": shape or "prompt-completion"}
    if prompt_only and "adapter" in obj:
        if obj["adapter"] is not None and not isinstance(obj["adapter"], str):
            raise BadRecord("\"adapter\" must be an adapter's name, or null for the base model")
        record["adapter"] = obj["adapter"]
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
