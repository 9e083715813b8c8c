"""`prolora chat`: a conversation with a model, rendered turn by turn exactly as its training data was.

Every turn renders the whole conversation so far (system prompt, earlier turns, the new user turn) with
the adapter's recorded chat format, by the code that rendered the training data (data.chat.prompt_ids),
so the model sees the prompt shape it learnt. `/base` answers the same conversation with every adapter
layer turned off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import adapters_disabled, attach
from prolora_cli.adapter.prompting import AUTO, Prompting, adapter_prompting, overridden
from prolora_cli.data.chat import prompt_ids, resolve_chat_format, with_system
from prolora_cli.errors import UserError
from prolora_cli.inference.generation import Completion, stream_reply
from prolora_cli.models.loading import load_model, quiet_libraries

COMMANDS = {"/reset": "forget the conversation", "/base": "answer with the base model alone (again: the adapter)",
            "/system TEXT": "set the system prompt (/system alone: none)", "/exit": "leave"}


@dataclass
class ChatArgs:
    adapter: Optional[Path] = None
    model: Optional[str] = None
    quant: str = "nf4"
    chat_format: str = AUTO
    system_prompt: Optional[str] = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    device: Optional[str] = None

    @classmethod
    def from_flags(cls, values: dict) -> "ChatArgs":
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def check(self) -> None:
        if self.adapter is None and self.model is None:
            raise UserError("give --adapter (it loads its base as trained) or --model (a base or merged model)")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    chat_format: str                  # resolved: "tulu" or "template"
    system_prompt: Optional[str]
    args: ChatArgs
    has_adapter: bool
    turns: list[dict] = field(default_factory=list)
    base_only: bool = False           # /base: the adapter's layers are off

    def prompt(self, user_text: str) -> list[int]:
        """The token ids the model is given to answer `user_text` after the conversation so far."""
        messages = with_system([*self.turns, {"role": "user", "content": user_text}], self.system_prompt)
        return prompt_ids(messages, self.tokenizer, self.chat_format)

    def reply(self, user_text: str, emit: Callable[[str], None]) -> Completion:
        """Answer a user turn, streaming the text to `emit`; both turns join the conversation."""
        ids = self.prompt(user_text)
        with adapters_disabled(self.model) if self.base_only else contextlib.nullcontext():
            answer = stream_reply(self.model, self.tokenizer, ids, self.args.max_new_tokens, emit,
                                  self.args.temperature, self.args.top_p)
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer.text}]
        return answer

    def command(self, line: str) -> Optional[str]:
        """Run a /command; returns what to tell the user, or None for /exit."""
        name, _, rest = line.strip().partition(" ")
        if name == "/exit":
            return None
        if name == "/reset":
            self.turns = []
            return "conversation forgotten"
        if name == "/base":
            if not self.has_adapter:
                return "no adapter to turn off: this is the model itself"
            self.base_only = not self.base_only
            return "answering with the base model alone" if self.base_only else "answering with the adapter"
        if name == "/system":
            self.system_prompt = rest.strip() or None
            return f"system prompt: {self.system_prompt!r}" if self.system_prompt else "no system prompt"
        return f"unknown command {name}; commands: {', '.join(COMMANDS)}"


def open_session(args: ChatArgs) -> tuple[ChatSession, dict]:
    """Load the model (and adapter) and the prompting to chat with; returns the session and what to say
    about it."""
    quiet_libraries()
    args.check()
    prompting = Prompting(AUTO, None, "the default")
    if args.adapter is not None:
        cfg, state = read_config(args.adapter), read_tensors(args.adapter)
        prompting = adapter_prompting(args.adapter, cfg)
    prompting = overridden(prompting, args.chat_format, args.system_prompt)
    model, tokenizer, model_id = load_model(args.model or cfg.base_model, args.quant, device=args.device)
    if args.adapter is not None:
        attach(model, cfg, state)
    model.eval()
    torch.manual_seed(args.seed)
    fmt = resolve_chat_format(tokenizer, prompting.chat_format)
    session = ChatSession(model, tokenizer, fmt, prompting.system_prompt, args, args.adapter is not None)
    return session, {"model": model_id, "adapter": str(args.adapter) if args.adapter else None, "chat_format": fmt,
                     "system_prompt": prompting.system_prompt, "prompting_from": prompting.source}
