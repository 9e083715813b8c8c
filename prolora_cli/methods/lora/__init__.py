"""The lora method: settings.py (torch-free: its flags) and method.py (its layer and Method)."""
