"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f Modelfile` then prompts the model in
the format it was trained with, and stops at its end-of-turn token.

Ollama's templates are Go templates, not Jinja, so the adapter's chat format is written out for the
formats whose shape is known: tulu (ours), and ChatML (`<|im_start|>role ... <|im_end|>`, SmolLM2's,
Qwen's). Training's system prompt, or the one the tokenizer's template puts in when a conversation has
none, becomes the Modelfile's SYSTEM.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prolora_cli.errors import UserError
from prolora_cli.fileio import write_text_atomic

CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")


def tulu(eos: str) -> str:
    return ("{{ if .System }}<|system|>\n{{ .System }}\n{{ end }}{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}"
            f"{{{{ if eq .Role \"assistant\" }}}}{eos}{{{{ end }}}}\n{{{{ end }}}}<|assistant|>\n")


def default_system(template_text: str, tokenizer) -> str | None:
    """The system turn a ChatML template writes for a conversation that has none, if any."""
    marker = "\x00user-turn\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True, chat_template=template_text)
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text.split(marker)[0], re.S)
    return found.group(1) if found else None


def modelfile_text(gguf_name: str, facts: dict, tokenizer) -> str:
    template = facts["chat_template"]
    if facts["chat_format"] == "tulu":
        go, system, stops = tulu(facts["eos"]), facts["system_prompt"], [facts["eos"]]
    elif "<|im_start|>" in template and "<|im_end|>" in template:
        go, system, stops = CHATML, default_system(template, tokenizer), ["<|im_end|>"]
    else:
        raise UserError("--ollama: the chat template is neither tulu nor ChatML, so no Ollama template is written "
                        "for it; export without --ollama and write the Modelfile's TEMPLATE by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, text: str) -> Path:
    path = gguf_path.with_name("Modelfile")
    write_text_atomic(path, text)
    return path
