"""Chat data: record shapes, files, rendering with assistant-only labels, packing."""
