"""Trying a trained model: chat, batched generation over a file, and many adapters served in one batch."""
