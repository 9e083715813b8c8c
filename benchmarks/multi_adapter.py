"""Many adapters on one base: resident memory per adapter, and tokens/s of a batch that mixes them.

On the embedded SmolLM2-135M (full-precision base, fp32, CPU unless a GPU is there), side by side:
  memory      resident memory per extra adapter for 1, 8, 32 and 128 adapters held at once:
              prolora  PRoLoRA r=8, u=1 in its compact form, in our mixed layers (`prolora generate`)
              peft-r8  PEFT LoRA r=8: the PEFT export of that same adapter, loaded with load_adapter
              peft-r2  PEFT LoRA r=2 (the budget PRoLoRA r=8/u=1 matches)
              Each count in a child process of its own: anonymous RSS before and after the adapters are
              loaded, and the adapter tensors' exact bytes.
  throughput  one batch of 32 chat prompts, 32 new tokens each (greedy, no early stop), rotating order:
              mixed     32 PRoLoRA adapters, a different one per row, in one batch (ours)
              single    the same batch, every row on one adapter (ours)
              peft      PEFT's mixed batch, generate(adapter_names=...), on the 32 PEFT exports
              one-by-one  each adapter's row alone, one adapter after another (ours)
              base      the same batch on the base model alone
              Each variant runs once untimed first (kernel selection); times are medians over the repeats.

    python benchmarks/multi_adapter.py --output docs/results/multi_adapter.json
    python benchmarks/multi_adapter.py --quick                      # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prolora_cli.adapter.files import read_config  # noqa: E402
from prolora_cli.adapter.peft_format import export_peft  # noqa: E402
from prolora_cli.data.chat import prompt_ids, resolve_chat_format  # noqa: E402
from prolora_cli.inference.mixed import MixedAdapterLinear, ResidentAdapter, attach_adapters, use_rows  # noqa: E402
from prolora_cli.models.loading import load_model, loadable_source  # noqa: E402
from prolora_cli.testing.synthetic import random_adapter  # noqa: E402

KINDS = ("prolora", "peft-r8", "peft-r2")
VARIANTS = ("mixed", "single", "peft", "one-by-one", "base")


def anon_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return 1024 * next(int(line.split()[1]) for line in text.splitlines() if line.startswith("RssAnon:"))


def make_adapters(folder: Path) -> dict[str, Path]:
    """PRoLoRA r=8/u=1 with random tensors (dW != 0), its PEFT export, and a PEFT LoRA r=2."""
    base = Path(loadable_source(None)[0])
    prolora = random_adapter(base, folder / "prolora", rank=8, unshared=1, scale=0.02)
    export_peft(prolora, folder / "peft-r8")
    lora2 = random_adapter(base, folder / "lora-r2", rank=2, method="lora", scale=0.02)
    export_peft(lora2, folder / "peft-r2")
    return {"prolora": prolora, "peft-r8": folder / "peft-r8", "peft-r2": folder / "peft-r2"}


def load_many(model, kind: str, folder: Path, count: int):
    """`count` copies of one adapter resident on `model` (ours: mixed layers; PEFT: load_adapter)."""
    if kind == "prolora":
        cfg = read_config(folder)
        attach_adapters(model, [ResidentAdapter.open(f"a{i}", folder, cfg) for i in range(count)])
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, folder, adapter_name="a0")
    for i in range(1, count):
        model.load_adapter(folder, adapter_name=f"a{i}")
    return model


def adapter_tensor_bytes(model, kind: str) -> int:
    """Exact bytes of every adapter tensor held, each counted once: ours, every adapter's buffer plus the
    template layers its layout shares (index buffers included); PEFT's, every lora_A and lora_B."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if kind == "prolora" and isinstance(module, MixedAdapterLinear):
            tensors = [t for adapter, template in module.adapters.values()
                       for t in [adapter.data, *template.layers[module.path].parameters(recurse=False),
                                 *template.layers[module.path].buffers(recurse=False)]]
        elif kind != "prolora" and name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            tensors = list(module.parameters())
        else:
            continue
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def memory_child(kind: str, folder: Path, count: int) -> dict:
    model, _, _ = load_model(None, "none", device="cpu")
    gc.collect()
    before = anon_bytes()
    model = load_many(model, kind, folder, count)
    gc.collect()
    after = anon_bytes()
    return {"kind": kind, "count": count, "anon_before": before, "anon_after": after,
            "tensor_bytes": adapter_tensor_bytes(model, kind)}


def memory(adapters: dict[str, Path], counts: list[int]) -> list[dict]:
    rows = []
    for count in counts:
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(adapters[kind]), str(count)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["per_adapter_anon"] = (row["anon_after"] - row["anon_before"]) / count
            row["per_adapter_tensor_bytes"] = row["tensor_bytes"] / count
            rows.append(row)
            print(f"memory {kind:8s} x{count:<4d} {row['per_adapter_anon'] / 2**20:8.2f} MiB per adapter "
                  f"(tensors {row['per_adapter_tensor_bytes'] / 2**20:.2f} MiB)", flush=True)
    return rows


def prompts(tokenizer, count: int) -> list[list[int]]:
    lines = (ROOT / "examples" / "chat" / "dev.jsonl").read_text().splitlines()
    fmt = resolve_chat_format(tokenizer, "auto")
    found = []
    for line in lines:
        record = json.loads(line)
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        found.append(prompt_ids([m for m in messages if m["role"] != "assistant"][:1], tokenizer, fmt))
        if len(found) == count:
            return found
    raise SystemExit(f"examples/chat/dev.jsonl has fewer than {count} prompts")


def batch(encoded: list[list[int]], pad: int) -> dict:
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), pad)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, seq in enumerate(encoded):
        ids[i, width - len(seq):], mask[i, width - len(seq):] = torch.tensor(seq), 1
    return {"input_ids": ids, "attention_mask": mask}


def timed_generate(model, inputs: dict, new_tokens: int, pad: int, **extra) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad, **extra)
    return time.perf_counter() - start


def throughput(adapters: dict[str, Path], rows: int, new_tokens: int, repeats: int) -> dict:
    from peft import PeftModel

    ours, tokenizer, _ = load_model(None, "none")
    names = [f"a{i}" for i in range(rows)]
    cfg = read_config(adapters["prolora"])
    attach_adapters(ours, [ResidentAdapter.open(n, adapters["prolora"], cfg) for n in names])
    peft = PeftModel.from_pretrained(load_model(None, "none")[0], adapters["peft-r8"], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters["peft-r8"], adapter_name=name)
    peft.eval()
    pad = tokenizer.pad_token_id
    encoded = prompts(tokenizer, rows)
    inputs = batch(encoded, pad)

    def run(variant: str) -> float:
        if variant == "mixed":
            use_rows(ours, names)
        elif variant in ("single", "base"):
            use_rows(ours, [names[0] if variant == "single" else None] * rows)
        elif variant == "peft":
            return timed_generate(peft, inputs, new_tokens, pad, adapter_names=names)
        else:  # one adapter after another, each on its own row
            total = 0.0
            for i, name in enumerate(names):
                use_rows(ours, [name])
                total += timed_generate(ours, batch([encoded[i]], pad), new_tokens, pad)
            return total
        return timed_generate(ours, inputs, new_tokens, pad)

    for variant in VARIANTS:  # warm-up: the first pass of each shape pays for kernel selection
        if variant != "one-by-one":
            run(variant)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]
        for variant in order:
            times[variant].append(run(variant))
            print(f"repeat {repeat}: {variant:10s} {rows * new_tokens / times[variant][-1]:8.1f} tokens/s", flush=True)
    tokens = rows * new_tokens
    result = {v: {"seconds": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), "runs": t}
              for v, t in times.items()}
    for v in VARIANTS:
        result[v]["vs_single"] = result["single"]["seconds"] / result[v]["seconds"]
    return {"rows": rows, "new_tokens": new_tokens, "repeats": repeats, "variants": result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--rows", type=int, default=32, help="rows in the throughput batch, each its own adapter")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="counts 1 and 8, 8 rows, 8 tokens, 1 repeat")
    p.add_argument("--output", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, folder, count = args.child
        print(json.dumps(memory_child(kind, Path(folder), int(count))))
        return
    if args.quick:
        args.counts, args.rows, args.new_tokens, args.repeats = [1, 8], 8, 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp))
        report = {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
                  "memory": memory(adapters, args.counts),
                  "throughput": throughput(adapters, args.rows, args.new_tokens, args.repeats)}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({v: round(r["tokens_per_s"], 1) for v, r in report["throughput"]["variants"].items()}))


if __name__ == "__main__":
    main()
