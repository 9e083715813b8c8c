"""Helpers for tests and benchmarks: random LLaMA checkpoints with real widths, tokenizers trained on
the spot. Not used by any command."""
