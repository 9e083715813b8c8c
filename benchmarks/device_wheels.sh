#!/usr/bin/env bash
# The wheels the GPU machine lacks, fetched here into .whl/ (ignored by git) for the device run to carry.
# That machine has torch (CUDA 13), accelerate, peft, pyarrow, triton, rich, typer and transformers 5.17,
# and reaches no package index. It lacks transformers >= 5.24 (and the tokenizers, huggingface-hub,
# safetensors and regex versions it checks at import), bitsandbytes, datasets (with dill and multiprocess),
# gguf, trl and liger-kernel; peft travels too, for a version known to work with that transformers.
# A run carries at most 64 MiB, tree included: bitsandbytes' wheel (43 MB) holds a library for every CUDA
# and ROCm release, so it is repacked with the CUDA 13 and CPU ones only (about 3 MB).
#   bash benchmarks/device_wheels.sh        # then: run(command=..., carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==1.31.0 safetensors==0.8.0 regex==2026.11.19
    bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
    peft==0.21.2 trl==1.16.0 liger-kernel==0.8.5
)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
python3 - .whl/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = lambda name: not re.search(r"libbitsandbytes_(?!cpu|cuda13)", name)  # noqa: E731
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not keep(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith("/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if keep(line.decode()))
        dst.writestr(item, data)
slim.replace(wheel)
EOF
du -sh .whl
