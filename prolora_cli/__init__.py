"""prolora: fine-tune LLaMA-family models with PRoLoRA, from planning to deployment."""

__version__ = "0.1.0"
