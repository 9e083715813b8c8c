#!/usr/bin/env bash
# The real CLI on the GPU, end to end, on a LLaMA-2-7B-shaped checkpoint written there (no download):
# train (NF4, bf16, paged AdamW, gradient checkpointing, --packing, 8 x 2048) interrupted by SIGINT and
# resumed, merge --base nf4, eval, export --format peft checked by PEFT, count-params and --dry-run's
# memory estimate against the measured peak. One JSON: OUTDIR/gpu_acceptance.json (keep it as
# docs/results/gpu_acceptance-<gpu>.json). Steps and checks: benchmarks/gpu_acceptance.py.
#
#   gpu_acceptance.sh [--cpu-smoke] [OUTDIR [--work DIR]]
# OUTDIR (for the JSON): runs/gpu_acceptance, or $OUT/gpu_acceptance on the device machine; DIR (the
# checkpoint, written once and reused, the run, the merged model): /tmp/prolora-gpu.
#
# On the GPU machine (no package index there), the wheels it lacks travel in .whl/, fetched here by
#   bash benchmarks/device_wheels.sh      # transformers 5.24 and what it checks, bitsandbytes (CUDA 13
#                                         # and CPU libraries only), datasets, dill, multiprocess, gguf,
#                                         # peft, trl, liger-kernel: 29 MB, under the 64 MiB a run carries
# and one call runs both GPU scripts (about 8 minutes):
#   run(command="bash benchmarks/gpu_acceptance.sh && python3 benchmarks/gpu_throughput.py --output
#       $OUT/gpu_throughput.json", carry=[".whl"], timeout_s=560)
# --cpu-smoke runs the same steps on a tiny model on CPU in a few minutes (make test runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then mode=(--cpu-smoke); shift; fi
outdir="${1:-${OUT:+$OUT/gpu_acceptance}}"
outdir="${outdir:-runs/gpu_acceptance}"
shift || true  # the rest (--work DIR) goes to gpu_acceptance.py
if compgen -G ".whl/*.whl" >/dev/null && [[ ${#mode[@]} -eq 0 ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" && ${#mode[@]} -gt 0 ]] && python=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$python" benchmarks/gpu_acceptance.py "${mode[@]}" "$outdir" "$@"
