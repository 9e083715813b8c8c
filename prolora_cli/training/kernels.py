"""`--kernels liger`: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on a LLaMA model (CUDA, Triton).

They replace the norms' and the MLP's forward and the rotary embedding function; the projections they
call are still the model's own modules, so adapter layers that wrap them train exactly as before. The
fused loss is `--loss liger` (training/losses.py). Optional: `pip install 'prolora[kernels]'`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from prolora_cli.errors import UserError


def liger_module(name: str):
    """liger_kernel.transformers.<name>, or one line saying what is missing."""
    if not torch.cuda.is_available():
        raise UserError("Liger's kernels are Triton kernels for CUDA GPUs; there is no GPU here "
                        "(leave out --kernels liger / --loss liger)")
    try:
        return importlib.import_module(f"liger_kernel.transformers.{name}")
    except ImportError as err:
        raise UserError(f"Liger's kernels need the liger-kernel package: pip install 'prolora[kernels]' ({err})")


def apply_kernels(model: nn.Module, kind: str) -> None:
    if kind == "none":
        return
    patch = liger_module("monkey_patch")
    if model.config.model_type != "llama":
        raise UserError(f"--kernels liger is wired for LLaMA models; this one is {model.config.model_type!r}")
    patch.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=False, model=model)
