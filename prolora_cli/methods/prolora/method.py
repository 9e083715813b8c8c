"""PRoLoRA: partial rotation of shared LoRA chunks (Wang et al., ACL 2024).

This file holds the method's tensors: trainable shapes, the expansion index, the init and the
layer; its settings and flags are in settings.py. No I/O and no CLI here. `docs/method.md` and the spec it follows give the formulas.

A frozen linear layer W0 (o x h) gets dW = scaling * B @ A with A: r x h, B: o x r, where
  A = [expand(A_shared) ; A_unshared]      B = [expand(B_shared) | B_unshared]
and expand() lays m (resp. n) rotated copies of one trainable chunk side by side and cuts
them to length. u = r is exactly LoRA.
"""

from __future__ import annotations

import bisect
import functools

import torch
from torch import nn

from prolora_cli.errors import UserError
from prolora_cli.methods.base import AdapterLayer, Method, kaiming_uniform_
from prolora_cli.methods.prolora.settings import validate


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_shape(r_s: int, length: int, ratio: int, broadcast: str) -> tuple[int, int]:
    """(rank_len, other_len) of the trainable chunk that expands to an r_s x length matrix."""
    if broadcast == "hidden":
        return r_s, _ceil_div(length, ratio)
    return _ceil_div(r_s, ratio), length


def param_shapes(h: int, o: int, r: int, u: int, m: int, n: int,
                 broadcast: str = "hidden") -> dict[str, tuple[int, int]]:
    """Shapes of the four trainable tensors of one layer (empty ones included)."""
    r_s = r - u
    a_rank, a_other = chunk_shape(r_s, h, m, broadcast)
    b_rank, b_other = chunk_shape(r_s, o, n, broadcast)
    return {
        "A_shared": (a_rank, a_other),
        "A_unshared": (u, h),
        "B_shared": (b_other, b_rank),  # B is stored output-major, like nn.Linear weights
        "B_unshared": (o, u),
    }


def count_params(h: int, o: int, r: int, u: int, m: int, n: int, broadcast: str = "hidden") -> int:
    """Trainable numbers of one layer: u*(h+o) + r_s*(cA+cB) with the default broadcast."""
    return sum(a * b for a, b in param_shapes(h, o, r, u, m, n, broadcast).values())


def _chunk_coords(r_s: int, length: int, ratio: int, broadcast: str, rotation: str):
    """For every entry (k, c) of the expanded r_s x length matrix, the chunk entry it reads.

    Returns (rank_coord, other_coord) as two r_s x length index tensors.
    """
    k = torch.arange(r_s).unsqueeze(1)      # rank position, column vector
    c = torch.arange(length).unsqueeze(0)   # hidden position, row vector
    rank_len, other_len = chunk_shape(r_s, length, ratio, broadcast)
    if broadcast == "hidden":
        j, t = c // other_len, c % other_len   # copy index and offset within the copy
        rank, other = k.expand(r_s, length), t.expand(r_s, length)
    else:
        j, t = k // rank_len, k % rank_len
        rank, other = t.expand(r_s, length), c.expand(r_s, length)
    j = j.expand(r_s, length)
    if rotation == "rank":
        # The stride is taken from the chunk's rank length (r_s with the default broadcast).
        rank = (rank + j * max(rank_len // ratio, 1)) % rank_len
    elif rotation == "hidden":
        other = (other + j * max(other_len // ratio, 1)) % other_len
    return rank, other


def expansion_index(r_s: int, h: int, o: int, m: int, n: int, broadcast: str = "hidden",
                    rotation: str = "rank") -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into A_shared (r_s x h) and B_shared (o x r_s): expansion is one torch.take."""
    if r_s == 0:
        return torch.zeros(0, h, dtype=torch.long), torch.zeros(o, 0, dtype=torch.long)
    rank, other = _chunk_coords(r_s, h, m, broadcast, rotation)
    a_idx = rank * chunk_shape(r_s, h, m, broadcast)[1] + other
    rank, other = _chunk_coords(r_s, o, n, broadcast, rotation)
    b_idx = (other * chunk_shape(r_s, o, n, broadcast)[0] + rank).T.contiguous()
    return a_idx, b_idx


@functools.lru_cache(maxsize=None)
def shared_expansion_index(r_s: int, h: int, o: int, m: int, n: int, broadcast: str, rotation: str,
                           device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """expansion_index on `device`, one copy per setting and device: every layer of that shape, in every
    adapter, reads the same tensors (int64 indices are twice the size of the expanded fp32 A and B, so a
    copy per layer would cost more memory than the adapter itself)."""
    a_idx, b_idx = expansion_index(r_s, h, o, m, n, broadcast, rotation)
    return a_idx.to(device), b_idx.to(device)


class PRoLoRALinear(AdapterLayer):
    """A frozen nn.Linear (or bitsandbytes Linear4bit) plus a PRoLoRA update.

    forward(x) = base(x) + scaling * B @ (A @ dropout(x)), with A and B expanded from the
    shared chunks on every call (O(r*(h+o)), negligible next to the matmuls). `scaling` defaults
    to alpha / r; a LoRA whose rank was cut per module (SoRA) keeps its training-time scaling.
    """

    TENSORS = ("A_shared", "A_unshared", "B_shared", "B_unshared")
    SHARED = ("A_shared", "B_shared")

    def __init__(self, base_layer: nn.Module, r: int, u: int, m: int, n: int | None = None,
                 alpha: float = 16.0, dropout: float = 0.0, broadcast: str = "hidden",
                 rotation: str = "rank", init: str = "rectified", scaling: float | None = None):
        super().__init__(base_layer, dropout)
        n = m if n is None else n
        h, o = self.in_features, self.out_features
        validate(r, u, m, n, broadcast, rotation, init, h, o)
        self.r, self.u, self.m, self.n = r, u, m, n
        self.alpha, self.scaling = alpha, alpha / r if scaling is None else scaling
        self.broadcast, self.rotation, self.init = broadcast, rotation, init

        device = self.param_device
        for name, shape in param_shapes(h, o, r, u, m, n, broadcast).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device)))
        a_idx, b_idx = shared_expansion_index(r - u, h, o, m, n, broadcast, rotation, device)
        # Not persistent: the index is a pure function of the config, so it is never saved.
        self.register_buffer("a_index", a_idx, persistent=False)
        self.register_buffer("b_index", b_idx, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Rectified init: the shared chunk behaves like a slice of a full r x h matrix, so it
        # takes the full fan-in h; "vanilla" uses the chunk's own width (PRoLoRA^-i ablation).
        shared_fan_in = self.in_features if self.init == "rectified" else self.A_shared.shape[1]
        if self.A_shared.numel():
            kaiming_uniform_(self.A_shared, shared_fan_in)
        if self.A_unshared.numel():
            kaiming_uniform_(self.A_unshared, self.in_features)
        nn.init.zeros_(self.B_shared)
        nn.init.zeros_(self.B_unshared)

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full A (r x h) and B (o x r)."""
        a = torch.cat([torch.take(self.A_shared, self.a_index), self.A_unshared], dim=0)
        b = torch.cat([torch.take(self.B_shared, self.b_index), self.B_unshared], dim=1)
        return a, b

    factors = expanded

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, u={self.u}, "
                f"m={self.m}, n={self.n}, alpha={self.alpha}, broadcast={self.broadcast}, "
                f"rotation={self.rotation}, init={self.init}")


# ---------------------------------------------------------------------------------------------
# The method, as the rest of the package sees it


class PRoLoRA(Method):
    name = "prolora"

    def build_layers(self, cfg, bases):
        s = cfg.settings
        return {path: PRoLoRALinear(base, cfg.r, s.u, s.m, s.n, cfg.alpha, cfg.dropout, s.broadcast,
                                    s.rotation, s.init, scaling=cfg.scaling) for path, base in bases.items()}

    def count(self, cfg, shapes, num_layers):
        s = cfg.settings
        return {t: [count_params(h, o, cfg.r, s.u, s.m, s.n, s.broadcast)] * num_layers
                for t, (h, o) in shapes.items()}, 0

    def describe(self, cfg) -> str:
        s = cfg.settings
        return (f"r={cfg.r} u={s.u} m={s.m} n={s.n} alpha={cfg.alpha:g} dropout={cfg.dropout:g} "
                f"broadcast={s.broadcast} rotation={s.rotation} init={s.init}")

    def legacy_module_sizes(self, state):
        return unshared_sizes(state)

    @staticmethod
    def fit_budget(shapes: list[tuple[int, int]], layers: int, budget: int, max_rank: int = 64,
                   top: int = 15) -> list[dict]:
        """The best setting (r, u, m = n) within `budget` for each rank, highest rank first.

        For each r: the most unshared ranks u that fit (partial sharing helps, per the paper), then
        the smallest m (less sharing). m stays <= r - u: past that the rotation repeats itself, so
        further copies add no new directions. With broadcast along hidden,
        params = u * U + (r - u) * S(m), where U = sum(h + o) and S(m) = sum(ceil(h/m) + ceil(o/m)),
        both taken from count_params so the formula lives in one place.
        """
        per_unshared = layers * sum(count_params(h, o, 1, 1, 1, 1) for h, o in shapes)
        max_m = min(max_rank, min(min(h, o) for h, o in shapes))
        # S(m) is non-increasing in m; negate it so bisect can search an ascending list.
        neg_shared = [-layers * sum(count_params(h, o, 1, 0, m, m) for h, o in shapes)
                      for m in range(1, max_m + 1)]
        found = []
        for r in range(max_rank, 0, -1):
            for u in range(r, -1, -1):
                r_s, rest = r - u, budget - u * per_unshared
                if rest < 0:
                    continue
                if r_s == 0:
                    found.append(dict(r=r, u=u, m=1, n=1, trainable_params=u * per_unshared))
                    break
                i = bisect.bisect_left(neg_shared, -(rest / r_s))  # smallest m with r_s * S(m) <= rest
                if i < min(r_s, max_m):
                    params = u * per_unshared - r_s * neg_shared[i]
                    found.append(dict(r=r, u=u, m=i + 1, n=i + 1, trainable_params=params))
                    break
            if len(found) == top:
                break
        for row in found:
            row["equivalent_lora_rank"] = row["trainable_params"] / per_unshared
        return found


def unshared_sizes(state: dict) -> dict:
    """Each module's [in, out], read off its unshared tensors (adapters that predate `modules`)."""
    paths = {key.rsplit(".", 1)[0] for key in state}
    try:
        return {p: [state[f"{p}.A_unshared"].shape[1], state[f"{p}.B_unshared"].shape[0]] for p in paths}
    except KeyError as e:
        raise UserError(f"adapter tensors are incomplete: no {e.args[0]}") from None


METHOD = PRoLoRA()
