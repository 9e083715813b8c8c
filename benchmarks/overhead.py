"""What PRoLoRA's sharing and rotation cost, against Hugging Face PEFT's LoRA at the same rank.

One process holds every variant on the same base model and runs them interleaved, in a rotating
order, over several repeats, so that drift in a noisy machine hits all of them alike:
  - peft-lora          PEFT LoraConfig(r), the reference
  - prolora-u=r        `prolora` with u = r (plain LoRA through our layer)
  - prolora-r8-u1-m7   PRoLoRA r=8, u=1, m=n=7 (the paper's half-budget setting at r=8)
each on the NF4 base (QLoRA) and on the full-precision base. Per variant: a training step
(forward + backward + AdamW), unmerged forward latency, merged forward latency (full-precision base)
against the bare base, peak memory of a training step (each in a child process of its own: peak RSS
after loading on CPU, peak allocated on CUDA), trainable parameters and adapter bytes on disk. Times are medians
over the repeats with the spread (min-max); a time ratio is the median over the repeats of the variant's
time over peft-lora's in the same repeat (they ran back to back, so the machine's drift cancels).

    python benchmarks/overhead.py                  # the table in docs/benchmarks.md
    python benchmarks/overhead.py --repeats 2 --seq-len 64   # a smoke run

On a CUDA machine it runs on the GPU and times with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prolora_cli.adapter.config import ALL_TARGETS, AdapterConfig
from prolora_cli.adapter.files import save_adapter
from prolora_cli.adapter.inject import adapter_layers, inject
from prolora_cli.models.loading import load_model

VARIANTS = ("peft-lora", "prolora-u=r", "prolora-r8-u1-m7")
BASES = ("nf4", "full")


def build(variant: str, base: str, args) -> tuple[torch.nn.Module, object]:
    """The base model with one variant's adapter; returns (model, config or PEFT model)."""
    model, _, model_id = load_model(args.model, "nf4" if base == "nf4" else "none")
    if variant == "bare":
        for p in model.parameters():
            p.requires_grad_(False)
        return model, None
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=args.dropout,
                                                 target_modules=list(ALL_TARGETS)))
        return model, None
    u = args.rank if variant == "prolora-u=r" else 1
    cfg = AdapterConfig.create(args.rank, unshared=u, alpha=16, dropout=args.dropout, base_model=model_id)
    inject(model, cfg)
    return model, cfg


def batch(args, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)


class Timer:
    """Wall time on CPU, CUDA events on a GPU (both in seconds)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def set_merged(model, cfg, merged: bool) -> None:
    if cfg is None:  # PEFT
        model.merge_adapter() if merged else model.unmerge_adapter()
        return
    for layer in adapter_layers(model).values():
        layer.merge() if merged else layer.unmerge()


def adapter_bytes(model, cfg) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if cfg is None:
            model.save_pretrained(tmp)
        else:
            save_adapter(tmp, cfg, model)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))


def child_peak_memory(args) -> None:
    """Run in a child: two training steps of one variant, then print their peak memory in bytes.

    On CPU the peak resident set is reset after loading (Linux: /proc/self/clear_refs), so the
    one-time load and conversion do not hide the training step's own peak.
    """
    model, _ = build(args.child_variant, args.child_base, args)
    model.train()
    device = next(model.parameters()).device
    ids = batch(args, model.config.vocab_size, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        status = Path("/proc/self/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(variant: str, base: str, args) -> int:
    cmd = [sys.executable, __file__, "--child-variant", variant, "--child-base", base,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--rank", str(args.rank)]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def measure(args) -> dict:
    results = {}
    for base in args.bases:
        print(f"[{base}] loading {len(args.variants) + 1} models", flush=True)
        models = {v: build(v, base, args) for v in ("bare", *args.variants)}
        device = next(models["bare"][0].parameters()).device
        timer = Timer(device)
        ids = batch(args, models["bare"][0].config.vocab_size, device)
        optims = {v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for v, (m, _) in models.items() if v != "bare"}
        times = {v: {"step": [], "forward": [], "merged_forward": []} for v in models}

        def step(v):
            model = models[v][0]
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            optims[v].step()
            optims[v].zero_grad(set_to_none=True)

        def forward(v):
            model = models[v][0]
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)

        for v in args.variants:  # warm-up: first calls allocate and pick kernels
            step(v)
            forward(v)
        forward("bare")
        order = list(models)
        for rep in range(args.repeats):
            k = rep % len(order)
            for v in order[k:] + order[:k]:  # rotate who goes first
                if v == "bare":
                    times[v]["forward"].append(timer(lambda: forward("bare")))
                    continue
                times[v]["step"].append(timer(lambda: step(v)))
                times[v]["forward"].append(timer(lambda: forward(v)))
                if base == "full":
                    set_merged(*models[v], True)
                    times[v]["merged_forward"].append(timer(lambda: forward(v)))
                    set_merged(*models[v], False)
            print(f"[{base}] repeat {rep + 1}/{args.repeats}", flush=True)
        for v, (model, cfg) in models.items():
            row = {k: stats(t) for k, t in times[v].items() if t}
            if "peft-lora" in times and v != "bare":
                # Paired within a repeat: both ran back to back, so the machine's drift cancels.
                row["ratio_to_peft"] = {k: stats([a / b for a, b in zip(t, times["peft-lora"][k])])
                                        for k, t in times[v].items() if t}
            if v != "bare":
                row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                row["adapter_bytes"] = adapter_bytes(model, cfg)
            results.setdefault(base, {})[v] = row
        models.clear()
        optims.clear()
        if not args.skip_memory:
            for v in args.variants:
                results[base][v]["peak_memory_bytes"] = peak_memory(v, base, args)
                print(f"[{base}] peak memory of {v}: {results[base][v]['peak_memory_bytes'] / 2**20:.0f} MiB",
                      flush=True)
        results[base]["_device"] = str(device)
    return results


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def table(results: dict, args) -> str:
    lines = []
    for base, rows in results.items():
        ref = rows["peft-lora"] if "peft-lora" in rows else None
        bare = rows["bare"]["forward"]["median"]
        lines += [f"\n**{'NF4 (QLoRA)' if base == 'nf4' else 'full-precision'} base** on {rows['_device']}; "
                  f"bare base forward {1000 * bare:.0f} ms\n",
                  "| variant | step (ms) | step / PEFT | forward (ms) | forward / PEFT | merged fwd / bare "
                  "| peak mem (MiB) | mem / PEFT | trainable params | adapter bytes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in args.variants:
            r = rows[v]

            def ratio(key):
                if ref is None or key not in r:
                    return "-"
                if key == "peak_memory_bytes":
                    return f"{r[key] / ref[key]:.3f}"
                s = r["ratio_to_peft"][key]
                return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

            def ms(key):
                s = r[key]
                return f"{1000 * s['median']:.0f} ({1000 * s['min']:.0f}-{1000 * s['max']:.0f})"

            merged = f"{r['merged_forward']['median'] / bare:.3f}" if "merged_forward" in r else "-"
            mem = r.get("peak_memory_bytes")
            lines.append(f"| {v} | {ms('step')} | {ratio('step')} | {ms('forward')} | {ratio('forward')} | {merged} "
                         f"| {mem / 2**20:.0f} | {ratio('peak_memory_bytes')} | "
                         f"{r['trainable_params']:,} | {r['adapter_bytes']:,} |" if mem else
                         f"| {v} | {ms('step')} | {ratio('step')} | {ms('forward')} | {ratio('forward')} | {merged} "
                         f"| - | - | {r['trainable_params']:,} | {r['adapter_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory child processes")
    p.add_argument("--output", type=Path, default=None, help="also write the raw numbers as JSON")
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    p.add_argument("--child-base", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_variant:
        child_peak_memory(args)
        return
    torch.manual_seed(0)
    started = time.perf_counter()
    results = measure(args)
    print(f"\nrank {args.rank}, batch {args.batch_size} x {args.seq_len} tokens, dropout {args.dropout}, "
          f"{args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(table(results, args))
    if args.output:
        args.output.write_text(json.dumps({"settings": vars(args) | {"output": str(args.output)},
                                           "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
