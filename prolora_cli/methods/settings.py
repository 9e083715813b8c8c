"""A method's own settings and the command-line flags that set them, declared together (torch-free).

Each field of a method's `Settings` dataclass is a key of adapter_config.json. A field made with
`flag(...)` is also a flag of `prolora train` (and of `count-params` when it changes the number of
trainable parameters): the CLI builds those options from here, so a method's flag is written once,
beside the setting it sets, with its help and its default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional

from prolora_cli.errors import UserError


@dataclasses.dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the long name first, then any short ones
    help: str
    counts: bool = False    # changes the trainable count: count-params offers it too

    @property
    def param(self) -> str:
        """The parameter the flag fills: its long name in snake case."""
        return self.names[0].lstrip("-").replace("-", "_")


def flag(default, *names: str, help: str, counts: bool = False):
    """A settings field that a command-line flag sets."""
    return dataclasses.field(default=default, metadata={"flag": Flag(names, help, counts)})


def _fits(value, hint) -> bool:
    """isinstance against a settings field's annotation (Optional[...], int, float, str, dict)."""
    if hint is Any:
        return True
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, typing.get_origin(hint) or hint)


def value_type(hint) -> type:
    """The type a flag's value is parsed as: Optional[int] -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


@dataclasses.dataclass
class Settings:
    """A method's own settings (none, for a method that has only the common ones)."""

    @classmethod
    def flags(cls) -> dict[str, tuple[Flag, type, Any]]:
        """{parameter name: (flag, value type, default)} of every field a flag sets."""
        hints = typing.get_type_hints(cls)
        return {f.metadata["flag"].param: (f.metadata["flag"], value_type(hints[f.name]), f.default)
                for f in dataclasses.fields(cls) if "flag" in f.metadata}

    @classmethod
    def from_flags(cls, r: int, flags: dict, method: str) -> "Settings":
        """From the values of the flags given (parameter names); a flag of another method is an error."""
        fields = {f.metadata["flag"].param: f.name for f in dataclasses.fields(cls) if "flag" in f.metadata}
        for name in flags:
            if name not in fields:
                raise UserError(f"--{name.replace('_', '-')} is not a setting of --method {method}")
        return cls(**{fields[name]: value for name, value in flags.items()}).resolve(r)

    @classmethod
    def from_stored(cls, d: dict, r: int, source: str) -> "Settings":
        hints = typing.get_type_hints(cls)
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key, value in values.items():
            if not _fits(value, hints[key]):
                raise UserError(f"{source}: {key} has the wrong type ({value!r})")
        return cls(**values).resolve(r)

    def resolve(self, r: int) -> "Settings":
        """Fill in the defaults that depend on the rank."""
        return self

    def check(self, r: int, h: Optional[int] = None, o: Optional[int] = None) -> None:
        """Raise UserError if these settings cannot build a layer (of size h -> o, when given)."""

    def to_stored(self) -> dict:
        return dataclasses.asdict(self)

    def to_flags(self) -> dict:
        """{parameter name: value} of the flags that recreate these settings (resolved values)."""
        return {f.metadata["flag"].param: getattr(self, f.name) for f in dataclasses.fields(self)
                if "flag" in f.metadata and getattr(self, f.name) is not None}
