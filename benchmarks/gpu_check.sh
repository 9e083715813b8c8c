#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, as one command on the device machine (it has torch, transformers,
# accelerate and peft, and reaches no registry). bitsandbytes travels as a wheel, prepared here with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and the call carries it: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600).
# Extra arguments go to benchmarks/gpu_check.py (e.g. --batch 8 if 16 x 512 does not fit).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
out="${OUT:-runs}"
mkdir -p "$out"
timeout 540 python3 benchmarks/gpu_check.py --output "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
