"""The tokenizer and chat template a GGUF carries, so that llama.cpp tokenizes and prompts as training did.

A base that was itself a GGUF (the embedded SmolLM2) gives its tokenizer.* keys exactly as llama.cpp
wrote them (pre-tokenizer, BOS flag, token types, merges). Otherwise a byte-level BPE tokenizer
(tokenizer.json, the GPT-2 family: SmolLM2, LLaMA-3, Qwen, Mistral-Nemo) is written from its files: the
tokens in id order, merges and special ids from the `gguf` package's SpecialVocab, token types from
the added tokens. A SentencePiece tokenizer (LLaMA-2) is refused: its scores live in tokenizer.model,
which llama.cpp's own converter reads (merge, then convert_hf_to_gguf.py).

The chat template is the format the adapter was trained with: the tokenizer's own template, or tulu
written as a template, opened by the system prompt training used when a conversation has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import gguf

from prolora_cli.adapter.prompting import Prompting
from prolora_cli.data.chat import resolve_chat_format
from prolora_cli.errors import UserError

# data/chat.py's tulu rendering as a template: <|role|>\n{content}\n, assistant turns ending with eos;
# training strips the final newline of a whole conversation.
TULU_TEMPLATE = (
    "{%- for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{%- if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")
# Pre-tokenizers llama.cpp knows, by the tokenizer.json structure that means them.
PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      {"type": "ByteLevel", "use_regex": True}]},
}


def chat_template(prompting: Prompting, tokenizer) -> str:
    """The adapter's chat format as a Jinja template, with its system prompt as the default system turn."""
    fmt = resolve_chat_format(tokenizer, prompting.chat_format)
    template = TULU_TEMPLATE if fmt == "tulu" else tokenizer.chat_template
    if prompting.system_prompt:
        system = json.dumps(prompting.system_prompt)
        template = ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = "
                    f"[{{'role': 'system', 'content': {system}}}] + messages %}}{{%- endif %}}" + template)
    return template


def end_of_turn(tokenizer, fmt: str) -> tuple[int, str]:
    """(id, text) of the token that ends an assistant turn in this format."""
    vocab = tokenizer.get_vocab()
    if fmt != "tulu":
        for text in END_OF_TURN:
            if text in vocab and text in (tokenizer.chat_template or ""):
                return vocab[text], text
    return tokenizer.eos_token_id, tokenizer.eos_token


def copy_from_gguf(writer: gguf.GGUFWriter, source: Path) -> int:
    """The source GGUF's tokenizer.* keys (not its chat template); returns how many tokens it lists."""
    reader = gguf.GGUFReader(source)
    count = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key in (gguf.Keys.Tokenizer.CHAT_TEMPLATE, gguf.Keys.Tokenizer.EOT_ID):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)
        if key == gguf.Keys.Tokenizer.LIST:
            count = len(value)
    if count == 0:
        raise UserError(f"{source}: the GGUF lists no tokens to copy")
    return count


def pre_tokenizer(folder: Path) -> str:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    for name, known in PRE_TOKENIZERS.items():
        if contains(spec, known):
            return name
    return "default"


def contains(spec, known) -> bool:
    """Whether `spec` (a tokenizer.json node) has every field `known` names, with those values."""
    if isinstance(known, dict):
        return isinstance(spec, dict) and all(k in spec and contains(spec[k], v) for k, v in known.items())
    if isinstance(known, list):
        return isinstance(spec, list) and len(spec) == len(known) and all(map(contains, spec, known))
    return spec == known


def write_from_folder(writer: gguf.GGUFWriter, folder: Path, tokenizer, rows: int) -> tuple[int, str]:
    """A byte-level BPE tokenizer's keys from its files, its list padded with placeholder tokens to the
    embedding's rows as llama.cpp's converter pads it; returns (its own tokens, pre-tokenizer name)."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if spec.get("model", {}).get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise UserError(f"GGUF export writes byte-level BPE tokenizers; {folder} has "
                        f"{'a SentencePiece' if (folder / 'tokenizer.model').exists() else 'another'} tokenizer: "
                        f"merge the adapter and convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= rows:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model embeds only {rows}")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [gguf.TokenType.UNUSED] * len(tokens)
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    pre = pre_tokenizer(folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.chat_template = None  # the adapter's own is written instead
    special.add_to_gguf(writer, quiet=True)
    return len(vocab), pre


def chat_facts(tokenizer, prompting: Prompting) -> dict:
    """How the GGUF prompts: the resolved chat format, its template, and its end-of-turn token."""
    fmt = resolve_chat_format(tokenizer, prompting.chat_format)
    eot_id, eot_text = end_of_turn(tokenizer, fmt)
    return {"chat_format": fmt, "chat_template": chat_template(prompting, tokenizer), "eot_id": eot_id,
            "eot": eot_text, "eos": tokenizer.eos_token, "system_prompt": prompting.system_prompt}


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, gguf_source: Optional[Path], tokenizer,
                    facts: dict, rows: int) -> str:
    """Every tokenizer key, the chat template and the end-of-turn token (see chat_facts). Returns the
    pre-tokenizer llama.cpp will use."""
    if gguf_source is not None:
        count, pre = copy_from_gguf(writer, gguf_source), "copied from the base GGUF"
        if count != rows:
            raise UserError(f"{gguf_source} lists {count} tokens for {rows} embedding rows")
    else:
        count, pre = write_from_folder(writer, folder, tokenizer, rows)
    writer.add_chat_template(facts["chat_template"])
    writer.add_eot_token_id(facts["eot_id"])
    return pre
