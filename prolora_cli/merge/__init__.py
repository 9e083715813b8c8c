"""Merging dW into the base checkpoint, streamed one tensor at a time, and checking the result."""
