"""Base models: architectures and presets, loading (GGUF, NF4), safetensors files tensor by tensor."""
