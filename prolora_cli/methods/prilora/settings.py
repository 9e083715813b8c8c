"""PRILoRA's settings and their flags (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.methods.settings import Settings, flag

TITLE = "PRILoRA"


@dataclass
class PRILoRASettings(Settings):
    rank_first: Optional[int] = flag(None, "--rank-first", counts=True,
                                     help="Rank of the first block (default: rank/2).")
    rank_last: Optional[int] = flag(None, "--rank-last", counts=True, help="Rank of the last block (default: 3*rank/2).")
    prune_every: int = flag(50, "--prune-every", help="Prune A every N optimizer steps (0: never).")
    prune_fraction: float = flag(0.05, "--prune-fraction", help="Share of each row of A pruned each time.")
    max_sparsity: float = flag(0.5, "--max-sparsity", help="Stop pruning a row at this share.")
    ranks: Optional[dict] = None       # written when saving: the rank of each module

    def resolve(self, r: int) -> "PRILoRASettings":
        first = self.rank_first if self.rank_first is not None else max(1, round(r / 2))
        last = self.rank_last if self.rank_last is not None else round(3 * r / 2)
        return replace(self, rank_first=first, rank_last=last)

    def check(self, r, h=None, o=None) -> None:
        if min(self.rank_first, self.rank_last) < 1:
            raise UserError(f"PRILoRA ranks must be >= 1, got {self.rank_first} and {self.rank_last}")
        if not (0 <= self.prune_fraction <= 1 and 0 <= self.max_sparsity < 1 and self.prune_every >= 0):
            raise UserError("PRILoRA needs 0 <= --prune-fraction <= 1, 0 <= --max-sparsity < 1, --prune-every >= 0")


SETTINGS = PRILoRASettings
