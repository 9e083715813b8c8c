"""How an adapter was prompted in training: its chat format and system prompt, so that chat, generate
and eval render prompts the way the model learnt them.

adapter_config.json records both. For an adapter saved before it did, a run_config.json beside it says
which chat format the run used; failing that, `auto` (the tokenizer's template if it has one, else
tulu), which is what training chose when it was given `auto`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class Prompting:
    chat_format: str                 # "tulu", "template", or "auto" (resolved against the tokenizer)
    system_prompt: Optional[str]
    source: str                      # where it was read: for messages


def adapter_prompting(folder: str | Path, cfg: AdapterConfig) -> Prompting:
    """What the adapter in `folder` (config `cfg`) was trained with."""
    if cfg.chat_format:
        return Prompting(cfg.chat_format, cfg.system_prompt, f"{folder}/adapter_config.json")
    run_config = Path(folder) / "run_config.json"
    try:
        written = json.loads(run_config.read_text(encoding="utf-8"))
        return Prompting(written["run"]["chat_format_used"], written.get("system-prompt"), str(run_config))
    except (OSError, ValueError, KeyError, TypeError):
        return Prompting(AUTO, None, "the default (the adapter records no chat format)")


def overridden(prompting: Prompting, chat_format: str = AUTO, system_prompt: Optional[str] = None) -> Prompting:
    """--chat-format and --system-prompt, when given, win over what an adapter recorded."""
    return Prompting(chat_format if chat_format != AUTO else prompting.chat_format,
                     system_prompt if system_prompt is not None else prompting.system_prompt,
                     "the command line" if chat_format != AUTO or system_prompt is not None else prompting.source)


def shared_prompting(promptings: dict[str, Prompting], chat_format: str = AUTO,
                     system_prompt: Optional[str] = None) -> Prompting:
    """The one prompting several adapters share, for the base model's rows beside them. --chat-format and
    --system-prompt, when given, win; adapters that disagree need them."""
    formats = {p.chat_format for p in promptings.values()} - {AUTO}
    if chat_format == AUTO and len(formats) > 1:
        raise UserError(f"the adapters were trained with different chat formats ({', '.join(sorted(formats))}); "
                        f"pass --chat-format to render every prompt one way")
    systems = {p.system_prompt for p in promptings.values()}
    if system_prompt is None and len(systems) > 1:
        raise UserError("the adapters were trained with different system prompts; pass --system-prompt")
    fmt = chat_format if chat_format != AUTO else (formats.pop() if formats else AUTO)
    system = system_prompt if system_prompt is not None else (systems.pop() if systems else None)
    return Prompting(fmt, system or None, "the command line" if chat_format != AUTO else "the adapters")
