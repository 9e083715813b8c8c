"""The adapter config: what every method has (rank, alpha, dropout, targets, base model) plus the
method's own settings, as stored in adapter_config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from prolora_cli import methods
from prolora_cli.errors import UserError

FORMAT = "prolora"
# 2: the method's own settings only (1 stored every method's fields); VeRA's one model-wide
# frozen pair; Tied-LoRA's B per projection type and v per block; SoRA's L1 weight and threshold.
FORMAT_VERSION = 2
# 3: scaling_rule "rslora" (alpha / sqrt(r)); written only by such adapters, so that an older prolora
# refuses them instead of scaling them by alpha / r.
RSLORA_FORMAT_VERSION = 3
NEWEST_FORMAT_VERSION = RSLORA_FORMAT_VERSION  # the newest this prolora reads
SCALING_RULES = ("standard", "rslora")  # alpha / r (LoRA), alpha / sqrt(r) (rsLoRA, PEFT's use_rslora)

# Short names users type, and the LLaMA module names they stand for.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
ALL_TARGETS = tuple(TARGET_ALIASES.values())


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'q,k,v' / 'q_proj,v_proj' / 'all' -> module names, in LLaMA's order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in names if s.strip()]
    if names == ["all"]:
        return list(ALL_TARGETS)
    out = []
    for name in names:
        full = TARGET_ALIASES.get(name, name)
        if full not in ALL_TARGETS:
            raise UserError(f"unknown target {name!r}; choose from {', '.join(TARGET_ALIASES)} or 'all'")
        if full not in out:
            out.append(full)
    if not out:
        raise UserError("no target modules given")
    return [t for t in ALL_TARGETS if t in out]


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter's layers on a base model."""

    method: str = methods.DEFAULT
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    scaling_rule: str = "standard"
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    base_model: str = ""
    chat_format: Optional[str] = None    # how training rendered its chats ("tulu" or "template")
    system_prompt: Optional[str] = None  # the system turn training opened conversations with, if any
    settings: Any = None             # the method's own settings (a methods.settings.Settings)
    modules: Optional[dict] = None   # written when saving: each adapted module's [in, out]

    @classmethod
    def create(cls, rank: Optional[int] = None, *, method: Optional[str] = None, targets=None,
               alpha: Optional[float] = None, dropout: Optional[float] = None, base_model: str = "",
               scaling: Optional[str] = None, **flags) -> "AdapterConfig":
        """From command-line values: None means the default; `flags` are the method's own flags."""
        common = dict(method=method, r=rank, alpha=alpha, dropout=dropout, scaling_rule=scaling)
        cfg = cls(base_model=base_model, **{k: v for k, v in common.items() if v is not None})
        impl = methods.get(cfg.method)
        targets = targets if targets is not None else (impl.default_targets or "all")
        cfg = replace(cfg, targets=parse_targets(targets),
                      settings=impl.settings(cfg.r, {k: v for k, v in flags.items() if v is not None}))
        cfg.check()
        return cfg

    @property
    def impl(self):
        """The method (methods.base.Method) these settings belong to."""
        return methods.get(self.method)

    @property
    def scaling(self) -> float:
        """dW = scaling * B A. rsLoRA's alpha / sqrt(r) keeps the update's size steady as r grows, so
        a higher rank does not silently mean a smaller step."""
        return self.alpha / (math.sqrt(self.r) if self.scaling_rule == "rslora" else self.r)

    def check(self, h: Optional[int] = None, o: Optional[int] = None) -> None:
        """Raise UserError if these settings cannot build a layer (of size h -> o, when given)."""
        if self.r < 1:
            raise UserError(f"rank must be >= 1, got {self.r}")
        if self.scaling_rule not in SCALING_RULES:
            raise UserError(f"--scaling must be one of {', '.join(SCALING_RULES)}, got {self.scaling_rule!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        self.settings.check(self.r, h, o)

    def to_flags(self) -> dict:
        """The train command's flags that create this config (the method's resolved settings included):
        what run_config.json records so that `--config` repeats the run."""
        return {"method": self.method, "rank": self.r, "targets": ",".join(self.targets), "alpha": self.alpha,
                "scaling": self.scaling_rule, "dropout": self.dropout, **self.settings.to_flags()}

    def to_dict(self) -> dict:
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("settings", "modules")}
        version = RSLORA_FORMAT_VERSION if self.scaling_rule == "rslora" else FORMAT_VERSION
        return {"format": FORMAT, "format_version": version, **common, **self.settings.to_stored(),
                "modules": self.modules}

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter_config.json") -> "AdapterConfig":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source}: not a prolora adapter config (no \"format\": \"prolora\")")
        version = d.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= NEWEST_FORMAT_VERSION:
            raise UserError(f"{source}: unsupported format_version {version!r} "
                            f"(this prolora reads 1..{NEWEST_FORMAT_VERSION}; upgrade prolora)")
        missing = [k for k in ("r", "alpha", "targets") if k not in d]
        if missing:
            raise UserError(f"{source}: missing {', '.join(missing)}")
        types = {"r": int, "alpha": (int, float), "dropout": (int, float), "targets": list, "method": str,
                 "chat_format": (str, type(None)), "system_prompt": (str, type(None)),
                 "base_model": str, "modules": (dict, type(None)), "scaling_rule": str}
        for k, t in types.items():
            if k in d and (not isinstance(d[k], t) or isinstance(d[k], bool)):
                raise UserError(f"{source}: {k} has the wrong type ({d[k]!r})")
        try:
            impl = methods.get(d.get("method", methods.DEFAULT))
            common = {k: d[k] for k in types if k in d}
            cfg = cls(**common, settings=impl.read_settings(d, version, source))
            cfg = replace(cfg, targets=parse_targets(cfg.targets))
            cfg.check()
        except UserError as e:
            raise UserError(e.args[0] if str(e).startswith(source) else f"{source}: {e}") from None
        return cfg
