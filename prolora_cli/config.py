"""The adapter config: hyperparameters, targets and base model, as stored in adapter_config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from prolora_cli.errors import UserError

FORMAT = "prolora"
FORMAT_VERSION = 1
METHODS = ("prolora", "lora", "vera", "tied-lora", "sora", "prilora")

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
    # VeRA: the frozen projections' seed and the initial value of d.
    vera_seed: int = 0
    vera_d_init: float = 0.1
    # SoRA: the soft threshold moves from sora_lambda to sora_max_lambda in sora_stages stages.
    sora_lambda: float = 1e-4
    sora_max_lambda: float = 5e-4
    sora_stages: int = 5
    # PRILoRA: rank of the first and last block (default r/2 and 3r/2), and the pruning of A.
    rank_first: Optional[int] = None
    rank_last: Optional[int] = None
    prune_every: int = 50
    prune_fraction: float = 0.05
    max_sparsity: float = 0.5
    # Written when saving: each adapted module's [in, out], and its rank where ranks differ per
    # module (PRILoRA's ramp; SoRA's pruned LoRA, whose presence marks the adapter as compacted).
    modules: Optional[dict] = None
    ranks: Optional[dict] = None

    @classmethod
    def create(cls, rank: int, unshared: int | None = None, share: int | None = None,
               share_b: int | None = None, **kwargs) -> "AdapterConfig":
        """Fill in the CLI's defaults: u = r (plain LoRA), m = r - u, n = m."""
        method = kwargs.get("method", "prolora")
        if method != "prolora" and (unshared, share, share_b) != (None, None, None) and unshared != rank:
            raise UserError(f"--unshared/--share/--share-b are PRoLoRA's; --method {method} shares nothing")
        u = rank if unshared is None or method != "prolora" else unshared
        m = share if share is not None else max(rank - u, 1)
        n = share_b if share_b is not None else m
        if "targets" in kwargs:
            kwargs["targets"] = parse_targets(kwargs["targets"])
        cfg = cls(r=rank, u=u, m=m, n=n, **kwargs)
        if cfg.method == "prilora":  # record the ramp actually used
            cfg.rank_first, cfg.rank_last = cfg.prilora_ranks
        cfg.check()
        return cfg

    def check(self, h: int = 1 << 30, o: int = 1 << 30) -> None:
        """Raise UserError if these settings cannot build a layer of size h -> o."""
        from prolora_cli.adapters.prolora import validate

        if self.method not in METHODS:
            raise UserError(f"unknown adapter method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method != "prolora" and self.u != self.r:
            raise UserError(f"method {self.method} has no shared ranks: u must equal r")
        if self.method == "sora" and not (self.sora_lambda >= 0 and self.sora_max_lambda >= 0
                                          and self.sora_stages >= 1):
            raise UserError("SoRA needs --sparse-lambda, --max-lambda >= 0 and --lambda-stages >= 1")
        if self.method == "prilora":
            if min(self.prilora_ranks) < 1:
                raise UserError(f"PRILoRA ranks must be >= 1, got {self.prilora_ranks}")
            if not (0 <= self.prune_fraction <= 1 and 0 <= self.max_sparsity < 1 and self.prune_every >= 0):
                raise UserError("PRILoRA needs 0 <= --prune-fraction <= 1, 0 <= --max-sparsity < 1, "
                                "--prune-every >= 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        try:
            validate(h, o, self.r, self.u, self.m, self.n, self.broadcast, self.rotation, self.init)
        except ValueError as e:
            raise UserError(str(e)) from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def prilora_ranks(self) -> tuple[int, int]:
        first = self.rank_first if self.rank_first is not None else max(1, round(self.r / 2))
        last = self.rank_last if self.rank_last is not None else round(3 * self.r / 2)
        return first, last

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
                 "dropout": (int, float), "targets": list, "method": str, "modules": (dict, type(None)),
                 "ranks": (dict, type(None))}
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
