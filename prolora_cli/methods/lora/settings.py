"""LoRA's settings: only the ones every method has (rank, alpha, dropout, targets), so no flags of its own."""

from prolora_cli.methods.settings import Settings

TITLE = "LoRA"
SETTINGS = Settings
