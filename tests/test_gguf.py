"""`prolora export --format gguf / gguf-lora --ollama`, read back by transformers' own GGUF loader and the
`gguf` package's reader; folders in the Hub's convention; a PEFT export that names a loadable base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, peak_rss, run_cli, tiny_llama, train_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from prolora_cli.adapter.files import read_config, read_tensors
from prolora_cli.adapter.inject import attach
from prolora_cli.adapter.peft_format import export_peft
from prolora_cli.data.chat import render_prompt
from prolora_cli.export.gguf_format import to_halves, to_interleaved
from prolora_cli.export.gguf_lora import export_gguf_lora
from prolora_cli.export.gguf_model import export_gguf
from prolora_cli.testing.synthetic import random_adapter, write_random_llama

ROOT = Path(__file__).parent.parent
CONVERSATION = [{"role": "user", "content": "What is 27 + 82?"}, {"role": "assistant", "content": "27 + 82 = 109."},
                {"role": "user", "content": "Reverse: candle cloud violin"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model folder (its own BPE tokenizer) and a random PRoLoRA adapter on it."""
    folder = tmp_path_factory.mktemp("gguf")
    return Path(tiny_model_dir), random_adapter(tiny_model_dir, folder / "ad", rank=8, unshared=1, scale=0.05)


def reference(base: Path, adapter: Path):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    attach(model, read_config(adapter), read_tensors(adapter))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def dev_ids(tokenizer, count: int = 12) -> list[list[int]]:
    rows = [json.loads(line) for line in (ROOT / "examples" / "chat" / "dev.jsonl").read_text().splitlines()][:count]
    chats = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
    return [tokenizer(render_prompt(c[:1], tokenizer, "template"), add_special_tokens=False)["input_ids"] for c in chats]


@pytest.mark.parametrize("quant,tolerance", [("f32", 1e-5), ("f16", 1e-2)])
def test_gguf_loads_in_transformers_and_gives_the_merged_logits(tiny, tmp_path, quant, tolerance):
    base, adapter = tiny
    result = export_gguf(adapter, tmp_path / "m.gguf", quant=quant)
    assert result["relative_diff"] <= result["tolerance"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor(dev_ids(AutoTokenizer.from_pretrained(base), 1))
    want = logits(reference(base, adapter), ids)
    assert (logits(loaded, ids) - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_files_load_and_report_top1_agreement(tiny, tmp_path, quant):
    base, adapter = tiny
    result = export_gguf(adapter, tmp_path / "m.gguf", quant=quant)
    assert 0.5 <= result["top1_agreement"] <= 1.0 and result["tolerance"] is None
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    # tiny rows of 64 split into whole blocks of 32; norms stay f32; q4_0 keeps the embedding in q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[quant.upper()]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)


def test_rows_that_do_not_split_into_blocks_stay_f16(tmp_path):
    tok = train_tokenizer()
    base = write_random_llama(tmp_path / "odd", 1, dtype="fp32", tokenizer=tok, vocab_size=len(tok), hidden_size=40,
                              intermediate_size=70, num_attention_heads=4, num_key_value_heads=2)
    adapter = random_adapter(base, tmp_path / "ad", rank=4, unshared=1)
    export_gguf(adapter, tmp_path / "m.gguf", quant="q8_0")  # rows of 40 are not whole blocks of 32
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 70


def gguf_tokenizer(folder: Path, name: str):
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("chat_format,system", [("template", None), ("tulu", None), ("tulu", "Be brief.")])
def test_the_gguf_tokenizes_and_prompts_as_training_did(tiny, tmp_path, chat_format, system):
    base, adapter = tiny
    folder = tmp_path / "ad"
    folder.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "chat_format": chat_format, "system_prompt": system}))
    (folder / "adapter.safetensors").write_bytes((adapter / "adapter.safetensors").read_bytes())
    export_gguf(folder, tmp_path / "m.gguf", quant="f16")
    original, read_back = AutoTokenizer.from_pretrained(base), gguf_tokenizer(tmp_path, "m.gguf")
    for ids in dev_ids(original):
        text = original.decode(ids)
        assert read_back(text, add_special_tokens=False)["input_ids"] == ids
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    trained = render_prompt(messages, original, chat_format)
    from_gguf = read_back.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert from_gguf == trained


def test_gguf_lora_pairs_are_what_llama_cpp_loads(tiny, tmp_path):
    base, adapter = tiny
    export_gguf_lora(adapter, tmp_path / "lora.gguf", quant="f32")
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert (fields["general.type"], fields["general.architecture"], fields["adapter.type"]) == ("adapter", "llama", "lora")
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(base)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    export_peft(adapter, tmp_path / "peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        peft = {k: f.get_tensor(k) for k in f.keys()}
    alpha = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"]
    assert fields["adapter.lora.alpha"] == pytest.approx(alpha)
    assert len(tensors) == len(peft)
    for block in range(model.config.num_hidden_layers):
        for hf, ours, h in (("self_attn.q_proj", "attn_q", heads), ("self_attn.k_proj", "attn_k", kv_heads),
                            ("mlp.down_proj", "ffn_down", None)):
            a, b = tensors[f"blk.{block}.{ours}.weight.lora_a"], tensors[f"blk.{block}.{ours}.weight.lora_b"]
            weight = model.get_submodule(f"model.layers.{block}.{hf}").weight
            # llama.cpp's checks (ggml order, innermost first): a.ne0 = in, b.ne1 = out, a.ne1 = b.ne0 = r
            assert (int(a.shape[0]), int(b.shape[1])) == (weight.shape[1], weight.shape[0])
            assert int(a.shape[1]) == int(b.shape[0])
            prefix = f"base_model.model.model.layers.{block}.{hf}"
            peft_b = peft[f"{prefix}.lora_B.weight"]
            want_b = to_interleaved(peft_b, h) if h else peft_b
            assert torch.equal(torch.from_numpy(np.array(a.data)), peft[f"{prefix}.lora_A.weight"])
            assert torch.equal(torch.from_numpy(np.array(b.data)), want_b)


def test_lora_arithmetic_on_the_gguf_tensors_gives_the_merged_gguf(tiny, tmp_path):
    """W0 + s B A from the GGUF adapter, on the base's permuted Q weight, equals the merged GGUF's."""
    base, adapter = tiny
    export_gguf_lora(adapter, tmp_path / "lora.gguf", quant="f32")
    export_gguf(adapter, tmp_path / "merged.gguf", quant="f32")
    lora = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(tmp_path / "lora.gguf").tensors}
    alpha = gguf.GGUFReader(tmp_path / "lora.gguf").fields["adapter.lora.alpha"].contents()
    merged = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors}
    model = AutoModelForCausalLM.from_pretrained(base)
    w0 = to_interleaved(model.model.layers[1].self_attn.q_proj.weight.detach(), model.config.num_attention_heads)
    a, b = lora["blk.1.attn_q.weight.lora_a"], lora["blk.1.attn_q.weight.lora_b"]
    torch.testing.assert_close(w0 + alpha / a.shape[0] * (b @ a), merged["blk.1.attn_q.weight"], rtol=0, atol=1e-6)
    assert torch.equal(to_halves(to_interleaved(w0, 4), 4), w0)


def test_ollama_modelfile_prompts_in_the_trained_format(tiny, tmp_path):
    base, adapter = tiny
    result = export_gguf(adapter, tmp_path / "m.gguf", quant="f16", ollama=True)
    text = Path(result["modelfile"]).read_text()
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text


def test_export_streams_a_7b_shaped_model_below_its_size_in_memory(tmp_path):
    """LLaMA-2-7B's widths with 4 blocks (2.1 GB of bf16): `export --format gguf` (a child process, peak
    RSS measured by the kernel) stays below the checkpoint's size, its block-by-block check included."""
    base = write_random_llama(tmp_path / "7b-shaped", 4, dtype="bf16", tokenizer=train_tokenizer())
    adapter = random_adapter(base, tmp_path / "ad", rank=8, unshared=1, scale=0.01)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    done, peak = peak_rss([sys.executable, "-m", "prolora_cli", "export", "--adapter", str(adapter), "--format", "gguf",
                           "--quant", "f16", "-o", str(tmp_path / "m.gguf"), "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["relative_diff"] <= result["tolerance"] and result["tensors"] == 3 + 4 * 9
    assert peak < size, (peak, size)


def test_merged_folders_keep_the_hubs_convention(tmp_path):
    tok = train_tokenizer()
    base = write_random_llama(tmp_path / "tied", 2, dtype="fp32", tokenizer=tok, vocab_size=len(tok),
                              tie_word_embeddings=True, hidden_size=64, intermediate_size=96,
                              num_attention_heads=4, num_key_value_heads=2)
    adapter = random_adapter(base, tmp_path / "ad", rank=4, unshared=1)
    assert run_cli("merge", "--adapter", adapter, "--output", tmp_path / "m").returncode == 0
    assert_hub_convention(tmp_path / "m")


def assert_hub_convention(folder: Path) -> None:
    """A loader that reads only the stored names (no tying for us) finds every weight the model needs."""
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    model = AutoModelForCausalLM.from_pretrained(folder)
    needed = {k for k in model.state_dict() if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    assert needed == stored


@pytest.mark.smollm
def test_the_embedded_model_exports_to_gguf_and_its_folders_follow_the_hub(tmp_path):
    from prolora_cli.models.loading import embedded_gguf, gguf_as_folder

    base = gguf_as_folder(embedded_gguf())
    assert_hub_convention(base)
    adapter = random_adapter(base, tmp_path / "ad", rank=8, unshared=1, scale=0.01)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model": "smollm2-135m"}))
    peft = run_cli("export", "--adapter", adapter, "--output", tmp_path / "peft", "--json")
    assert json.loads(peft.stdout)["base_model_name_or_path"] == str(base)
    assert run_cli("merge", "--adapter", adapter, "--output", tmp_path / "m").returncode == 0
    assert_hub_convention(tmp_path / "m")

    result = export_gguf(adapter, tmp_path / "q8.gguf", quant="q8_0", ollama=True)
    fields = gguf.GGUFReader(tmp_path / "q8.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "You are a helpful AI assistant named SmolLM" in Path(result["modelfile"]).read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32).eval()
    want = reference(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    agree = total = 0
    for ids in dev_ids(tokenizer, 24):
        ids = torch.tensor([ids])
        same = logits(loaded, ids).argmax(-1) == logits(want, ids).argmax(-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    assert agree / total >= 0.98, (agree, total)


@pytest.mark.parametrize("args,needles", [
    (["--quant", "q5_k"], ["--quant", "llama-quantize"]),
    (["--format", "onnx"], ["--format"]),
    (["--ollama", "--quant", "f16", "--chat-format-is-not-a-flag"], ["No such option"]),
])
def test_bad_export_flags_are_one_line(tiny, tmp_path, args, needles):
    base, adapter = tiny
    assert_one_line_error(run_cli("export", "--adapter", adapter, "--format", "gguf", "-o", tmp_path / "m.gguf", *args),
                          *needles)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_or_a_base_that_does_not_fit_writes_nothing(tiny, tmp_path):
    base, adapter = tiny
    (tmp_path / "m.gguf").write_text("keep me")
    assert_one_line_error(run_cli("export", "--adapter", adapter, "--format", "gguf", "-o", tmp_path / "m.gguf"),
                          "already exists", "--overwrite")
    assert (tmp_path / "m.gguf").read_text() == "keep me"
    other = tmp_path / "other"
    tiny_llama().save_pretrained(other)  # hidden 40, not the adapter's 64
    result = run_cli("export", "--adapter", adapter, "--format", "gguf", "--model", other, "-o", tmp_path / "x.gguf")
    assert_one_line_error(result, "does not match the base model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "other"]
