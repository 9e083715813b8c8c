"""`prolora generate`: completions for every row of a file, many adapters in one batch, resumable.

Rows are rendered as their adapter was trained to see them (adapter.prompting), batched longest first,
and generated with the KV cache; a batch mixing adapters runs in one forward (inference.mixed).
Finished rows go to a partial file beside the output as each batch ends, after a header that fingerprints
the job; `--resume` keeps them and does the rest. The output appears, in input order, by rename when
every row is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

from prolora_cli.adapter.prompting import AUTO, Prompting, adapter_prompting, overridden, shared_prompting
from prolora_cli.data.chat import prompt_ids, resolve_chat_format, with_system
from prolora_cli.errors import MachineFault, UserError, os_fault
from prolora_cli.fileio import atomic_path, exclusive
from prolora_cli.inference.generation import Completion, generate_batches
from prolora_cli.inference.mixed import ResidentAdapter, attach_adapters, use_rows
from prolora_cli.inference.requests import Request, parse_adapter_specs, read_adapters, read_requests
from prolora_cli.models.loading import load_model, quiet_libraries, resolve_source


@dataclass
class GenerateArgs:
    data: Path
    output: Path
    adapter: list[str] = field(default_factory=list)  # NAME=DIR or DIR, repeated
    default_adapter: Optional[str] = None
    model: Optional[str] = None
    quant: str = "nf4"
    chat_format: str = AUTO
    system_prompt: Optional[str] = None
    data_format: str = "auto"
    skip_bad_lines: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    resume: bool = False
    overwrite: bool = False
    device: Optional[str] = None

    @classmethod
    def from_flags(cls, values: dict) -> "GenerateArgs":
        own = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        return cls(**{**own, "adapter": list(values.get("adapter") or [])})

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if not self.adapter and self.model is None:
            raise UserError("give --adapter (one or more) or --model (a base or merged model)")


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def check_output(args: GenerateArgs) -> None:
    """Refuse, before any work, to overwrite an output or drop a partial one without being asked."""
    partial = partial_path(args.output)
    if args.output.exists() and not (args.overwrite or (args.resume and partial.exists())):
        raise UserError(f"--output {args.output} already exists; pass --overwrite to replace it")
    if partial.exists() and not (args.resume or args.overwrite):
        raise UserError(f"{partial} holds rows of an interrupted run; pass --resume to finish it or --overwrite "
                        f"to start again")
    if args.resume and not partial.exists():
        raise UserError(f"--resume: no partial output {partial} to continue")


def fingerprint(args: GenerateArgs, adapters: list[ResidentAdapter]) -> str:
    """What decides the rows' text: a resumed run must be the same job."""
    def stamp(path: Path) -> list:
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    job = {"data": stamp(args.data), "adapters": {a.name: stamp(a.folder / "adapter.safetensors") for a in adapters},
           **{k: v for k, v in asdict(args).items() if k not in ("data", "output", "adapter", "resume", "overwrite")}}
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_partial(partial: Path, job: str) -> dict[int, dict]:
    """The rows an interrupted run finished, by index; a last line cut short by the interruption is dropped."""
    lines = partial.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("job") != job:
        raise UserError(f"{partial} was written by a different job (data, adapters or settings changed); pass "
                        f"--overwrite to start again")
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["index"]] = row
    return done


def output_row(request: Request, completion: Completion) -> dict:
    row = {"index": request.index, request.unit: request.position, "messages": request.messages,
           "adapter": request.adapter, "completion": completion.text}
    if request.reference is not None:
        row["reference"] = request.reference
    return {**row, "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "finish_reason": "stop" if completion.finished else "length"}


def load_base(args: GenerateArgs, adapters: list[ResidentAdapter]):
    """The base model the adapters were trained on (or --model), loaded as eval loads it."""
    recorded = adapters[0].cfg.base_model if adapters else None
    if args.model and recorded and resolve_source(args.model)[1] != recorded:
        raise UserError(f"adapter {adapters[0].name} was trained on {recorded}, not on --model {args.model}")
    model, tokenizer, model_id = load_model(args.model or recorded, args.quant, device=args.device)
    model.eval()
    return model, tokenizer, model_id


def render(requests: list[Request], adapters: list[ResidentAdapter], tokenizer, args: GenerateArgs) -> list[list[int]]:
    """Each row's prompt ids, rendered with its adapter's prompting (base rows: the one the adapters share)."""
    promptings = {a.name: overridden(adapter_prompting(a.folder, a.cfg), args.chat_format, args.system_prompt)
                  for a in adapters}
    if any(r.adapter is None for r in requests):
        promptings[None] = shared_prompting(promptings, args.chat_format, args.system_prompt)

    def ids(request: Request) -> list[int]:
        prompting: Prompting = promptings[request.adapter]
        fmt = resolve_chat_format(tokenizer, prompting.chat_format)
        try:
            return prompt_ids(with_system(request.messages, prompting.system_prompt), tokenizer, fmt)
        except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors, ValueError)
            raise UserError(f"{args.data}, {request.at}: cannot render: {e}") from None

    return [ids(r) for r in requests]


def run_generate(args: GenerateArgs, progress: Callable[[str, int], Callable[[int], None]],
                 say: Callable[[str], None]) -> dict:
    """Generate every row not yet done; write the output when all are, holding the output's lock.
    Returns a summary."""
    quiet_libraries()
    args.check()
    with exclusive(args.output, say):
        return generate_rows(args, progress, say)


def generate_rows(args: GenerateArgs, progress, say) -> dict:
    """The job itself (see the module docstring), under the output's lock."""
    check_output(args)
    adapters = read_adapters(parse_adapter_specs(args.adapter))
    requests, skipped = read_requests(args.data, [a.name for a in adapters], args.default_adapter,
                                      args.data_format, args.skip_bad_lines)
    job, partial = fingerprint(args, adapters), partial_path(args.output)
    done = read_partial(partial, job) if args.resume else {}
    model, tokenizer, model_id = load_base(args, adapters)
    attach_adapters(model, adapters)
    encoded = render(requests, adapters, tokenizer, args)
    todo = [r for r in requests if r.index not in done]
    if done:
        say(f"resuming: {len(done)} of {len(requests)} rows were done, {len(todo)} to go")
    # The partial file anew: its header, then the rows kept (a line cut short by an interruption is gone).
    with atomic_path(partial) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in [{"job": job}, *done.values()]), encoding="utf-8")
    advance = progress("generate", len(todo))
    batches = generate_batches(model, tokenizer, [encoded[r.index] for r in todo], args.max_new_tokens,
                               args.batch_size, args.temperature, args.top_p, seed=args.seed,
                               prepare=lambda chunk: use_rows(model, [todo[i].adapter for i in chunk]))
    try:
        with partial.open("a", encoding="utf-8") as out:
            for chunk, completions in batches:
                for i, (completion,) in zip(chunk, completions):
                    done[todo[i].index] = output_row(todo[i], completion)
                    out.write(json.dumps(done[todo[i].index]) + "\n")
                out.flush()
                os.fsync(out.fileno())
                advance(len(chunk))
    except OSError as e:
        raise MachineFault(f"{os_fault(e, 'cannot write', partial)}; the rows finished so far are kept in it: free "
                           f"some space and run the same command with --resume") from None
    with atomic_path(args.output) as tmp:
        tmp.write_text("".join(json.dumps(done[r.index]) + "\n" for r in requests), encoding="utf-8")
    partial.unlink()
    rows = list(done.values())
    return {"output": str(args.output), "rows": len(requests), "generated": len(todo), "skipped_bad_rows": skipped,
            "model": model_id, "adapters": [a.name for a in adapters],
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "stopped_at_length": sum(r["finish_reason"] == "length" for r in rows)}
