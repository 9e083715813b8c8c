"""Capacity at equal budget, controlled: which adapter best imitates a teacher that needs rank?

The teacher is the base model plus a fixed random dW of rank k (default 16; `--teacher-rank full`)
on every adapted linear, scaled so that its next-token distribution is a clear KL away from the
base's. Each method trains, with the package's own layers, optimizer groups and scheduler, to
imitate the teacher (KL(teacher || student) per token) on chat text, with its learning rate picked
from a small grid on a tuning split (seed 0); then each is trained with 3 seeds at that rate and
scored on held-out text. A method that cannot express the teacher's dW plateaus above zero; more
rank per parameter shows as a lower KL at the same budget.

Why this size: the whole grid must fit in ~30 minutes on 2 CPU cores. The base is a 4-block LLaMA
(hidden 128, intermediate 344, vocab 512, initializer std 0.1, so that its outputs are not flat) with
a BPE tokenizer trained on the text; 64-token sequences, batch 8. Rank 16 is an eighth of the width,
as rank 512 would be of LLaMA-2-7B's; LoRA r=1..16 bracket it. Text: ../shared/datasets/bigbench-chat
when present, else examples/chat.

    python benchmarks/capacity.py --output docs/results/capacity-r16.json  # the full grid (~30 min)
    python benchmarks/capacity.py --quick --output x.json                 # every method, ~2 min
    python benchmarks/capacity.py --variants lora-r2-rslora prolora-r8-u1-rslora --output y.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [ROOT.parent / "shared" / "datasets" / "bigbench-chat" / "train.jsonl", ROOT / "examples" / "chat" / "train.jsonl"]
MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, initializer_range=0.1, max_position_embeddings=128)
VOCAB, SEQ, BATCH = 512, 64, 8
STANDARD_LRS, HIGH_LRS = (1e-3, 3e-3, 1e-2, 3e-2), (3e-3, 1e-2, 3e-2, 1e-1)

# label -> (method flags for AdapterConfig.create, learning-rate grid). Budgets are counted, not assumed.
VARIANTS = {
    "lora-r1": (dict(method="lora", rank=1), STANDARD_LRS),
    "lora-r2": (dict(method="lora", rank=2), STANDARD_LRS),
    "lora-r4": (dict(method="lora", rank=4), STANDARD_LRS),
    "lora-r8": (dict(method="lora", rank=8), STANDARD_LRS),
    "lora-r16": (dict(method="lora", rank=16), STANDARD_LRS),
    "prolora-r8-u1": (dict(method="prolora", rank=8, unshared=1), STANDARD_LRS),     # LoRA r=2's budget
    "prolora-r16-u2": (dict(method="prolora", rank=16, unshared=2), STANDARD_LRS),   # LoRA r=4's budget
    # With rsLoRA's alpha / sqrt(r), a higher rank no longer means a smaller step at the same lr.
    "lora-r2-rslora": (dict(method="lora", rank=2, scaling="rslora"), STANDARD_LRS),
    "prolora-r8-u1-rslora": (dict(method="prolora", rank=8, unshared=1, scaling="rslora"), STANDARD_LRS),
    "vera-r128": (dict(method="vera", rank=128), HIGH_LRS),
    "tied-lora-r16": (dict(method="tied-lora", rank=16, targets="all"), HIGH_LRS),
    "sora-r4": (dict(method="sora", rank=4), STANDARD_LRS),
    "prilora-r2": (dict(method="prilora", rank=2, prune_every=50), STANDARD_LRS),
}
FULL = [label for label in VARIANTS if not label.endswith("-rslora")]  # ~27 min; the rsLoRA pair is its own run
QUICK = ["lora-r2", "lora-r8", "prolora-r8-u1", "vera-r128", "tied-lora-r16", "sora-r4", "prilora-r2"]


def token_chunks(seed: int = 0):
    """(tokenizer, a LongTensor of SEQ-token chunks of the text, shuffled once)."""
    from prolora_cli.data.sources import read_jsonl
    from prolora_cli.testing.synthetic import train_tokenizer

    source = next(p for p in TEXTS if p.is_file())
    records, _ = read_jsonl(source)  # any of the chat shapes train accepts, as messages
    texts = [" ".join(m["content"] for m in r["messages"]) for r in records]
    tok = train_tokenizer(texts, VOCAB)
    ids = [t for text in texts for t in tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]]
    chunks = torch.tensor(ids[:len(ids) // SEQ * SEQ]).view(-1, SEQ)
    return tok, chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))]


def base_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **MODEL)).eval()


def mean_kl(model, chunks: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(chunks), 32):
            logp = model(chunks[i:i + 32]).logits.float().log_softmax(-1)
            t = teacher_logp[i:i + 32].float()
            total += (t.exp() * (t - logp)).sum(-1).mean(-1).sum().item()
    return total / len(chunks)


def log_probs(model, chunks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunks[i:i + 32]).logits.float().log_softmax(-1).to(dtype)
                          for i in range(0, len(chunks), 32)])


def make_teacher(base, rank: int | None, target_kl: float, probe: torch.Tensor):
    """base + s * U V^T on every linear of every block; s found by bisection so that the teacher is
    `target_kl` nats per token from the base on `probe`."""
    g = torch.Generator().manual_seed(99)
    directions = {}
    for name, module in base.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            o, h = module.weight.shape
            k = min(o, h) if rank is None else rank
            u, v = torch.randn(o, k, generator=g), torch.randn(h, k, generator=g)
            directions[name] = (u @ v.T) / math.sqrt(k * h) * module.weight.std()
    base_logp = log_probs(base, probe)

    def teacher_at(scale: float):
        t = copy.deepcopy(base)
        mods = dict(t.model.layers.named_modules())
        with torch.no_grad():
            for name, d in directions.items():
                mods[name].weight += scale * d
        return t

    low, high = 0.0, 1.0
    while mean_kl(teacher_at(high), probe, base_logp) < target_kl:  # KL(base || teacher): a scale finder
        low, high = high, high * 2
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_kl(teacher_at(mid), probe, base_logp) < target_kl else (low, mid)
    return teacher_at(high), high


def train_student(base, variant: dict, lr: float, seed: int, steps: int, train: torch.Tensor,
                  teacher_train: torch.Tensor) -> tuple:
    """One run: the package's layers, optimizer groups and scheduler; KL to the teacher as the loss."""
    from transformers import get_linear_schedule_with_warmup

    from prolora_cli.adapter.config import AdapterConfig
    from prolora_cli.adapter.inject import count_trainable, inject
    from prolora_cli.training.args import TrainArgs
    from prolora_cli.training.optimization import build_optimizer

    torch.manual_seed(seed)
    student = copy.deepcopy(base)
    for p in student.parameters():
        p.requires_grad_(False)
    cfg = AdapterConfig.create(dropout=0.0, **variant)
    layers = inject(student, cfg)
    trainable, _ = count_trainable(student)
    run_args = TrainArgs(data=[], output=Path("."), adapter=cfg, lr=lr, optim="adamw", weight_decay=0.0)
    optimizer = build_optimizer(student, layers, run_args)
    scheduler = get_linear_schedule_with_warmup(optimizer, steps // 20, steps)
    order = torch.Generator().manual_seed(seed)
    student.train()
    for step in range(steps):
        pick = torch.randint(len(train), (BATCH,), generator=order)
        logp = student(train[pick]).logits.float().log_softmax(-1)
        t = teacher_train[pick].float()
        loss = (t.exp() * (t - logp)).sum(-1).mean()
        penalty = cfg.impl.regularizer(cfg, layers)
        (loss if penalty is None else loss + penalty).backward()
        torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in layers.values():
            layer.after_step(step + 1, steps)
    student.eval()
    return student, trainable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, two rates, fewer steps, one variant per method")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--teacher-rank", default="16", help="rank of the teacher's dW, or 'full'")
    ap.add_argument("--target-kl", type=float, default=1.0, help="KL(base || teacher) in nats per token")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--output", type=Path, help="JSON to write (one record per run)")
    ap.add_argument("--plot", type=Path, help="only draw KL against trainable parameters from --results, to this PNG")
    ap.add_argument("--results", type=Path, nargs="+", help="JSON files of earlier runs, for --plot")
    args = ap.parse_args()
    if args.plot:
        return plot([r for path in args.results for r in json.loads(path.read_text())["runs"]], args.plot)
    if not args.output:
        ap.error("--output is required (or --plot with --results)")
    from prolora_cli.models.loading import quiet_libraries

    quiet_libraries()
    steps = args.steps or (150 if args.quick else 600)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    variants = args.variants or (QUICK if args.quick else FULL)
    started = time.perf_counter()

    tok, chunks = token_chunks()
    # 64 tuning and 128 test sequences, the next 2,048 for training (less on examples/chat's small text)
    n_tune, n_test = min(64, len(chunks) // 8), min(128, len(chunks) // 4)
    tune, test = chunks[:n_tune], chunks[n_tune:n_tune + n_test]
    train = chunks[n_tune + n_test:n_tune + n_test + 2048]
    base = base_model(len(tok))
    teacher, scale = make_teacher(base, None if args.teacher_rank == "full" else int(args.teacher_rank),
                                  args.target_kl, tune)
    teacher_train = log_probs(teacher, train, torch.float16)
    teacher_tune, teacher_test = log_probs(teacher, tune), log_probs(teacher, test)
    floor = {"base_kl_test": mean_kl(base, test, teacher_test)}
    print(f"teacher rank {args.teacher_rank}, scale {scale:.3f}; KL(teacher || base) on test {floor['base_kl_test']:.4f}; "
          f"{len(train)} train chunks of {SEQ}, {steps} steps of {BATCH}", flush=True)

    records = []
    for label in variants:
        variant, grid = VARIANTS[label]
        grid = grid[1:3] if args.quick else grid  # quick: 3e-3 and 1e-2 (VeRA, Tied-LoRA: 1e-2 and 3e-2)
        tuned = {}
        for lr in grid:
            student, trainable = train_student(base, variant, lr, 0, steps, train, teacher_train)
            tuned[lr] = mean_kl(student, tune, teacher_tune)
        lr = min(tuned, key=tuned.get)
        for seed in seeds:
            student, trainable = train_student(base, variant, lr, seed, steps, train, teacher_train)
            kl = mean_kl(student, test, teacher_test)
            records.append({"method": variant["method"], "label": label, "trainable_params": trainable, "seed": seed,
                            "lr": lr, "kl": kl, "tuning_kl": tuned, "steps": steps, "teacher_rank": args.teacher_rank})
            print(f"{label:16s} params {trainable:7,d}  lr {lr:g}  seed {seed}  KL {kl:.4f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": {"model": MODEL, "vocab": len(tok), "seq": SEQ, "batch": BATCH,
                                                    "steps": steps, "teacher_scale": scale, **floor,
                                                    "seconds": time.perf_counter() - started},
                                       "runs": records}, indent=1, default=str) + "\n")
    print(table(records))


def plot(records: list[dict], path: Path) -> None:
    """Mean KL (error bars: the seeds' spread) against trainable parameters, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = {}  # label -> (method, params, mean, spread)
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label]
        kls = [r["kl"] for r in runs]
        points[label] = (runs[0]["method"], runs[0]["trainable_params"], statistics.fmean(kls),
                         statistics.stdev(kls) if len(kls) > 1 else 0.0)
    lora = sorted(v[1:] for k, v in points.items() if v[0] == "lora" and not k.endswith("-rslora"))
    ax.errorbar(*zip(*lora), fmt="o-", color="gray", capsize=3, label="LoRA r=" + ",".join(
        k.split("-r")[1] for k, v in points.items() if v[0] == "lora" and not k.endswith("-rslora")))
    for label, (method, params, mean, spread) in points.items():
        if method != "lora" or label.endswith("-rslora"):
            ax.errorbar(params, mean, yerr=spread, fmt="s", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("KL(teacher || student), held out")
    ax.set_title("imitating a rank-16 teacher at a given budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(records: list[dict]) -> str:
    rows = ["| method | label | trainable params | lr | KL to teacher (mean ± sd over seeds) |", "|---|---|---|---|---|"]
    labels = dict.fromkeys(r["label"] for r in records)
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        kls = [r["kl"] for r in runs]
        sd = statistics.stdev(kls) if len(kls) > 1 else 0.0
        rows.append(f"| {runs[0]['method']} | {label} | {runs[0]['trainable_params']:,} | {runs[0]['lr']:g} | "
                    f"{statistics.fmean(kls):.4f} ± {sd:.4f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
