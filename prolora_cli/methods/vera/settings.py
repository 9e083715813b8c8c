"""VeRA's settings and their flags (torch-free: the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass

from prolora_cli.methods.settings import Settings, flag

TITLE = "VeRA"


@dataclass
class VeRASettings(Settings):
    vera_seed: int = flag(0, "--vera-seed", help="Seed of the frozen random pair (PEFT's projection_prng_key).")
    vera_d_init: float = flag(0.1, "--vera-d-init", help="Initial value of the trainable vector d.")


SETTINGS = VeRASettings
