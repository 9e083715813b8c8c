"""The training loss, computed without the logits of the whole batch (`--loss chunked` or `liger`).

transformers' causal-LM loss projects every position onto the vocabulary (batch x length x vocabulary
logits, kept for the backward pass, then a float copy) and takes the cross-entropy of the trained ones.
On LLaMA-2 that is 8 x 2048 x 32,000 fp32 numbers, 2 GiB, for a batch whose answers may be a fraction of
its tokens. AnswerLoss takes the decoder's hidden states at the positions that predict a trained token
only and scores those: `chunked` projects CHUNK positions at a time in plain torch, recomputing each
chunk in the backward pass (activation checkpointing), so at most one chunk's logits exist at once;
`liger` hands them to Liger-Kernel's fused linear cross-entropy (Triton, CUDA only). The loss is the same
sum of token cross-entropies divided by the same count (num_items_in_batch) as transformers', in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

from prolora_cli.data.chat import IGNORE
from prolora_cli.errors import UserError

CHUNK = 1024  # positions projected at once: 1024 x 32,000 fp32 logits is 125 MiB


def chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), CHUNK):
        part = slice(start, start + CHUNK)
        total = total + checkpoint(chunk_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total


def liger_sum():
    from prolora_cli.training.kernels import liger_module  # needs CUDA and liger-kernel
    fused = liger_module("fused_linear_cross_entropy").LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def score(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if getattr(head, "bias", None) is not None:
            raise UserError("--loss liger: the output layer has a bias, which this loss does not take")
        return fused(head.weight, hidden, targets).float()
    return score


class AnswerLoss(nn.Module):
    """A causal LM whose forward, given labels, returns the loss over the trained positions only (see the
    module docstring); without labels (generation), the model's own output. `lm` is the wrapped model."""

    def __init__(self, lm: nn.Module, kind: str):
        super().__init__()
        self.lm = lm
        self.score = chunked_sum if kind == "chunked" else liger_sum()

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, num_items_in_batch=None,
                **kwargs):
        if labels is None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        trained = targets != IGNORE
        total = self.score(self.lm.get_output_embeddings(), hidden[:, :-1][trained], targets[trained])
        count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
        return CausalLMOutput(loss=total / count)


def with_loss(model: nn.Module, kind: str) -> nn.Module:
    """The model to train: itself for transformers' own loss (`full`), wrapped otherwise."""
    return model if kind == "full" else AnswerLoss(model, kind)


def without_loss(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, AnswerLoss) else model
