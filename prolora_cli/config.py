"""The adapter config: hyperparameters, targets and base model, as stored in adapter_config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prolora_cli.errors import UserError

FORMAT = "prolora"
FORMAT_VERSION = 1

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

    r: int = 8
    u: int = 8
    m: int = 1
    n: int = 1
    alpha: float = 16.0
    dropout: float = 0.1
    broadcast: str = "hidden"
    rotation: str = "rank"
    init: str = "rectified"
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    base_model: str = ""
    method: str = "prolora"

    @classmethod
    def create(cls, rank: int, unshared: int | None = None, share: int | None = None,
               share_b: int | None = None, **kwargs) -> "AdapterConfig":
        """Fill in the CLI's defaults: u = r (plain LoRA), m = r - u, n = m."""
        u = rank if unshared is None else unshared
        m = share if share is not None else max(rank - u, 1)
        n = share_b if share_b is not None else m
        if "targets" in kwargs:
            kwargs["targets"] = parse_targets(kwargs["targets"])
        cfg = cls(r=rank, u=u, m=m, n=n, **kwargs)
        cfg.check()
        return cfg

    def check(self, h: int = 1 << 30, o: int = 1 << 30) -> None:
        """Raise UserError if these settings cannot build a layer of size h -> o."""
        from prolora_cli.adapters.prolora import validate

        if self.method != "prolora":
            raise UserError(f"unknown adapter method {self.method!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        try:
            validate(h, o, self.r, self.u, self.m, self.n, self.broadcast, self.rotation, self.init)
        except ValueError as e:
            raise UserError(str(e)) from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def layer_kwargs(self) -> dict:
        return dict(r=self.r, u=self.u, m=self.m, n=self.n, alpha=self.alpha, dropout=self.dropout,
                    broadcast=self.broadcast, rotation=self.rotation, init=self.init)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter_config.json") -> "AdapterConfig":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source}: not a prolora adapter config (no \"format\": \"prolora\")")
        version = d.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise UserError(f"{source}: unsupported format_version {version!r} "
                            f"(this prolora reads 1..{FORMAT_VERSION}; upgrade prolora)")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("r", "u", "m", "n", "alpha", "targets") if k not in fields]
        if missing:
            raise UserError(f"{source}: missing {', '.join(missing)}")
        types = {"r": int, "u": int, "m": int, "n": int, "alpha": (int, float),
                 "dropout": (int, float), "targets": list}
        for k, t in types.items():
            if k in fields and (not isinstance(fields[k], t) or isinstance(fields[k], bool)):
                raise UserError(f"{source}: {k} has the wrong type ({fields[k]!r})")
        try:
            fields["targets"] = parse_targets(fields["targets"])
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        cfg = cls(**fields)
        try:
            cfg.check()
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        return cfg
