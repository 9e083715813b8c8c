"""Random LLaMA checkpoints with real widths, written as real sharded safetensors (nothing downloaded).

For tests and benchmarks at the user's scale: LLaMA-2-7B's widths with a few blocks, or all 32. The
checkpoint is written one tensor at a time (memory: one tensor, whatever the model's size).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from prolora_cli.adapter.config import AdapterConfig
from prolora_cli.adapter.files import save_adapter_tensors
from prolora_cli.adapter.inject import inject, layers_state, saved_config
from prolora_cli.models.loading import empty_model
from prolora_cli.models.safetensors_files import DTYPES, dtype_name, parse_size, tensor_bytes, write_checkpoint

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def train_tokenizer(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on the spot (a second), with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def write_random_llama(folder: str | Path, num_layers: int, dtype: str = "bf16", tokenizer=None,
                       max_shard_size: str = "5GB", seed: int = 0, **sizes) -> Path:
    """A LLaMA checkpoint (LLaMA-2-7B's widths unless `sizes` say otherwise) with random weights:
    N(0, 0.02) like LLaMA's init, norms at 1. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, DTYPES[dtype])
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": num_layers, "tie_word_embeddings": False,
                            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **sizes})
    config.dtype = torch_dtype
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    skeleton = empty_model(folder)
    params = dict(skeleton.named_parameters())
    if config.tie_word_embeddings:  # stored once, as transformers stores it: the head is the embedding
        for head in skeleton._tied_weights_keys or {}:
            params.pop(head, None)
    layout = {name: (dtype_name(torch_dtype), tuple(p.shape)) for name, p in params.items()}

    def tensors():
        g = torch.Generator().manual_seed(seed)
        for name, p in params.items():
            if p.dim() == 1:
                value = torch.ones(p.shape, dtype=torch_dtype)
            else:
                value = (torch.randn(p.shape, generator=g) * 0.02).to(torch_dtype)
            yield name, [tensor_bytes(value)]

    write_checkpoint(folder, layout, tensors(), parse_size(max_shard_size))
    return folder


def random_adapter(model_folder: str | Path, output: str | Path, seed: int = 1, scale: float = 0.05, **flags) -> Path:
    """An adapter for a model folder with every tensor random (a fresh one has dW = 0, which tests
    nothing), built on the model's meta-device skeleton: no weight is read."""
    cfg = AdapterConfig.create(**{"rank": 8, "dropout": 0.0, **flags}, base_model=str(Path(model_folder).resolve()))
    layers = inject(empty_model(Path(model_folder)), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in layers_state(layers).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * scale)
    return save_adapter_tensors(output, saved_config(cfg, layers), layers_state(layers))
