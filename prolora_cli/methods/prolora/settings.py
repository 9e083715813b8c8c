"""PRoLoRA's settings and their flags (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from prolora_cli.errors import UserError
from prolora_cli.methods.settings import Settings, flag

TITLE = "PRoLoRA"
BROADCASTS = ("hidden", "rank")
ROTATIONS = ("rank", "hidden", "none")
INITS = ("rectified", "vanilla")


def validate(r: int, u: int, m: int, n: int, broadcast: str, rotation: str, init: str,
             h: int | None = None, o: int | None = None) -> None:
    """Raise ValueError with one readable sentence if the settings cannot build a layer
    (of size h -> o, when the sizes are given)."""
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    if not 0 <= u <= r:
        raise ValueError(f"unshared rank must be between 0 and rank ({r}), got {u}")
    if m < 1 or n < 1:
        raise ValueError(f"sharing ratios must be >= 1, got m={m}, n={n}")
    if broadcast not in BROADCASTS:
        raise ValueError(f"broadcast must be one of {', '.join(BROADCASTS)}, got {broadcast!r}")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if r > u:  # ratios only matter when something is shared
        a_dim, b_dim = (h, o) if broadcast == "hidden" else (r - u, r - u)
        if a_dim is not None and m > a_dim:
            raise ValueError(f"sharing ratio m={m} is larger than the dimension it splits ({a_dim})")
        if b_dim is not None and n > b_dim:
            raise ValueError(f"sharing ratio n={n} is larger than the dimension it splits ({b_dim})")


@dataclass
class PRoLoRASettings(Settings):
    u: Optional[int] = flag(None, "--unshared", "-u", counts=True,
                            help="Unshared ranks u (default: = rank, i.e. plain LoRA).")
    m: Optional[int] = flag(None, "--share", "-m", counts=True,
                            help="Sharing ratio m of A (default: rank - unshared, at least 1).")
    n: Optional[int] = flag(None, "--share-b", "-n", counts=True, help="Sharing ratio n of B (default: m).")
    broadcast: str = flag("hidden", "--broadcast", counts=True,
                          help="Copies along 'hidden' (the paper's) or 'rank'.")
    rotation: str = flag("rank", "--rotation", help="Rotate copies along 'rank' (the paper's), 'hidden', or 'none'.")
    init: str = flag("rectified", "--init", help="'rectified' (fan-in of the full layer, the paper's) or 'vanilla'.")

    def resolve(self, r: int) -> "PRoLoRASettings":
        u = r if self.u is None else self.u
        m = self.m if self.m is not None else max(r - u, 1)
        return replace(self, u=u, m=m, n=self.n if self.n is not None else m)

    def check(self, r, h=None, o=None) -> None:
        try:
            validate(r, self.u, self.m, self.n, self.broadcast, self.rotation, self.init, h, o)
        except ValueError as e:
            raise UserError(str(e)) from None


SETTINGS = PRoLoRASettings
